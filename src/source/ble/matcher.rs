//! Which advertiser a `[[ble]]` entry is: addresses, UUIDs, and the match rules.

use super::*;

/// `AA:BB:CC:DD:EE:FF` (either case) as bytes, most significant first.
pub fn parse_address(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// A UUID: 4 hex digits (16-bit SIG UUID), 8 (32-bit) or the full form.
pub fn parse_uuid(s: &str) -> Option<Uuid> {
    let s = s.trim();
    match s.len() {
        4 => u16::from_str_radix(s, 16).ok().map(btleplug::api::bleuuid::uuid_from_u16),
        8 => u32::from_str_radix(s, 16).ok().map(btleplug::api::bleuuid::uuid_from_u32),
        _ => Uuid::parse_str(s).ok(),
    }
}

pub(super) fn address_string(a: &[u8; 6]) -> String {
    a.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// A `[[ble]]` entry's `match`, parsed.
#[derive(Debug, Clone, Copy)]
pub struct Matcher<'a> {
    pub address: Option<[u8; 6]>,
    pub name_prefix: Option<&'a str>,
    pub service: Option<Uuid>,
}

impl Matcher<'_> {
    /// Whether an advertiser is this device: every key given must match.
    /// A service matches when advertised as a service UUID or as service data.
    pub fn matches(
        &self,
        address: &[u8; 6],
        name: Option<&str>,
        services: &[Uuid],
        service_data: &HashMap<Uuid, Vec<u8>>,
    ) -> bool {
        self.address.is_none_or(|a| a == *address)
            && self.name_prefix.is_none_or(|p| name.is_some_and(|n| n.starts_with(p)))
            && self.service.is_none_or(|s| services.contains(&s) || service_data.contains_key(&s))
    }
}
