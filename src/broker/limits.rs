//! Per-address and per-user limits of the front door (issue 19).
//!
//! One host must not be able to keep everyone else out, and one login must
//! not be able to grow the gateway's memory without bound:
//! * half-open connections (TLS/WebSocket handshake and CONNECT not done
//!   yet) are capped per address, on top of the global handshake cap;
//! * failed logins put the address into an exponential backoff, during
//!   which its CONNECTs are refused without a password check (this also
//!   covers the remembered-password fast path, which would otherwise let
//!   guesses through at network speed). A successful login does not clear
//!   the count (else one valid account would reset the backoff between
//!   guesses at another): it goes after 10 minutes without a failure;
//! * connected clients are capped per user (optional);
//! * the device ids (and sensors per device) a LAN user may publish
//!   readings for are capped, since every new device/sensor pair costs
//!   retained messages, metrics and ack state downstream.
//!
//! "Address" is the IPv4 address, or the /64 prefix of an IPv6 address (a
//! single host usually owns a whole /64). Every table here is bounded.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Failed logins from one address before its backoff starts.
const FREE_FAILURES: u32 = 3;
/// First backoff, doubled per further failure, up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// An address with no failure for this long starts afresh.
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Addresses whose failures are remembered at most (oldest expired first).
const MAX_TRACKED_ADDRESSES: usize = 4096;
/// Distinct sensors a LAN device may publish readings for.
pub const MAX_SENSORS_PER_DEVICE: usize = 64;

/// An address as the limits count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrKey {
    V4([u8; 4]),
    /// The /64 prefix.
    V6([u8; 8]),
}

impl From<IpAddr> for AddrKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(a) => AddrKey::V4(a.octets()),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => AddrKey::V4(v4.octets()),
                None => AddrKey::V6(a.octets()[..8].try_into().expect("8 bytes")),
            },
        }
    }
}

struct Failures {
    count: u32,
    last: Instant,
    until: Option<Instant>,
}

/// Why a reading was refused by [`Limits::admit_reading`].
#[derive(Debug, PartialEq, Eq)]
pub enum DeviceLimit {
    Devices(usize),
    Sensors(usize),
}

pub struct Limits {
    per_address: usize,
    per_user: Option<usize>,
    max_devices: usize,
    handshakes: Mutex<HashMap<AddrKey, usize>>,
    users: Mutex<HashMap<String, usize>>,
    failures: Mutex<HashMap<AddrKey, Failures>>,
    /// origin (user name, "" = anonymous) → device → sensors.
    devices: Mutex<HashMap<String, HashMap<String, HashSet<String>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Limits {
    pub fn new(per_address: usize, per_user: Option<usize>, max_devices: usize) -> Limits {
        Limits {
            per_address,
            per_user,
            max_devices,
            handshakes: Mutex::default(),
            users: Mutex::default(),
            failures: Mutex::default(),
            devices: Mutex::default(),
        }
    }

    /// A half-open slot for `ip`, or None when the address has its share.
    pub fn handshake(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let key = AddrKey::from(ip);
        let mut m = lock(&self.handshakes);
        let n = m.entry(key).or_insert(0);
        if *n >= self.per_address {
            return None;
        }
        *n += 1;
        Some(Slot { limits: self.clone(), key: SlotKey::Addr(key) })
    }

    /// A connection slot for `user` ("" = anonymous), or None at the per-user cap.
    pub fn connection(self: &Arc<Self>, user: &str) -> Option<Slot> {
        let mut m = lock(&self.users);
        let n = m.entry(user.to_string()).or_insert(0);
        if self.per_user.is_some_and(|max| *n >= max) {
            if *n == 0 {
                m.remove(user);
            }
            return None;
        }
        *n += 1;
        Some(Slot { limits: self.clone(), key: SlotKey::User(user.to_string()) })
    }

    /// How long `ip` must still wait before its next login is checked.
    pub fn backoff(&self, ip: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        lock(&self.failures).get(&AddrKey::from(ip)).and_then(|f| f.until).and_then(|u| u.checked_duration_since(now))
    }

    /// A login from `ip` failed (bad credentials).
    pub fn login_failed(&self, ip: IpAddr) {
        let now = Instant::now();
        let key = AddrKey::from(ip);
        let mut m = lock(&self.failures);
        if !m.contains_key(&key) && m.len() >= MAX_TRACKED_ADDRESSES {
            m.retain(|_, f| now.duration_since(f.last) < FORGET_AFTER);
            if m.len() >= MAX_TRACKED_ADDRESSES {
                // Full of recent offenders: the bounded password queue still holds.
                return;
            }
        }
        let f = m.entry(key).or_insert(Failures { count: 0, last: now, until: None });
        if now.duration_since(f.last) >= FORGET_AFTER {
            f.count = 0;
        }
        f.count += 1;
        f.last = now;
        if f.count >= FREE_FAILURES {
            let doublings = (f.count - FREE_FAILURES).min(16);
            f.until = Some(now + (FIRST_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF));
        }
    }

    /// May `origin` publish a reading for `(device, sensor)`? Remembers the
    /// pair when it may.
    pub fn admit_reading(&self, origin: &str, device: &str, sensor: &str) -> Result<(), DeviceLimit> {
        let mut m = lock(&self.devices);
        let devices = match m.get_mut(origin) {
            Some(d) => d,
            None => m.entry(origin.to_string()).or_default(),
        };
        if let Some(sensors) = devices.get_mut(device) {
            if sensors.contains(sensor) {
                return Ok(());
            }
            if sensors.len() >= MAX_SENSORS_PER_DEVICE {
                return Err(DeviceLimit::Sensors(MAX_SENSORS_PER_DEVICE));
            }
            sensors.insert(sensor.to_string());
            return Ok(());
        }
        if devices.len() >= self.max_devices {
            return Err(DeviceLimit::Devices(self.max_devices));
        }
        devices.insert(device.to_string(), HashSet::from([sensor.to_string()]));
        Ok(())
    }
}

enum SlotKey {
    Addr(AddrKey),
    User(String),
}

/// A counted slot, given back on drop.
pub struct Slot {
    limits: Arc<Limits>,
    key: SlotKey,
}

impl Drop for Slot {
    fn drop(&mut self) {
        fn release<K: std::hash::Hash + Eq>(m: &Mutex<HashMap<K, usize>>, k: &K) {
            let mut m = lock(m);
            if let Some(n) = m.get_mut(k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(k);
                }
            }
        }
        match &self.key {
            SlotKey::Addr(k) => release(&self.limits.handshakes, k),
            SlotKey::User(u) => release(&self.limits.users, u),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_open_slots_are_per_address_and_come_back() {
        let l = Arc::new(Limits::new(2, None, 10));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = l.handshake(a).unwrap();
        let _s2 = l.handshake(a).unwrap();
        assert!(l.handshake(a).is_none());
        assert!(l.handshake(b).is_some(), "another address is not affected");
        drop(s1);
        assert!(l.handshake(a).is_some());
        // One IPv6 /64 is one address; v4-mapped is its v4 address.
        let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
        assert_eq!(AddrKey::from(v6("2001:db8::1")), AddrKey::from(v6("2001:db8::ffff:1")));
        assert_ne!(AddrKey::from(v6("2001:db8::1")), AddrKey::from(v6("2001:db8:0:1::1")));
        assert_eq!(AddrKey::from(v6("::ffff:10.0.0.1")), AddrKey::from(a));
    }

    #[test]
    fn failed_logins_back_off_per_address() {
        let l = Limits::new(2, None, 10);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..FREE_FAILURES - 1 {
            l.login_failed(a);
            assert_eq!(l.backoff(a), None);
        }
        l.login_failed(a);
        assert!(l.backoff(a).is_some_and(|d| d <= FIRST_BACKOFF));
        for _ in 0..10 {
            l.login_failed(a);
        }
        assert!(l.backoff(a).is_some_and(|d| d > Duration::from_secs(30) && d <= MAX_BACKOFF));
        assert_eq!(l.backoff("10.0.0.2".parse().unwrap()), None);
    }

    #[test]
    fn users_and_devices_are_capped() {
        let l = Arc::new(Limits::new(2, Some(1), 2));
        let c = l.connection("u").unwrap();
        assert!(l.connection("u").is_none());
        assert!(l.connection("v").is_some());
        drop(c);
        assert!(l.connection("u").is_some());
        assert!(Arc::new(Limits::new(2, None, 2)).connection("u").is_some());

        assert_eq!(l.admit_reading("u", "d1", "hr"), Ok(()));
        assert_eq!(l.admit_reading("u", "d2", "hr"), Ok(()));
        assert_eq!(l.admit_reading("u", "d3", "hr"), Err(DeviceLimit::Devices(2)));
        assert_eq!(l.admit_reading("u", "d1", "hr"), Ok(()), "known devices go on");
        assert_eq!(l.admit_reading("v", "d3", "hr"), Ok(()), "per origin");
        for i in 1..MAX_SENSORS_PER_DEVICE {
            assert_eq!(l.admit_reading("u", "d1", &format!("s{i}")), Ok(()));
        }
        assert_eq!(l.admit_reading("u", "d1", "one-too-many"), Err(DeviceLimit::Sensors(MAX_SENSORS_PER_DEVICE)));
    }
}
