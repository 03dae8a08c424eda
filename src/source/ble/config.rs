//! `[[ble]]` and `[ble_scan]`: which devices, what they speak, and the
//! adapter's scan watchdog.

use super::{parse_address, parse_uuid};
use crate::allow::Devices;
use crate::units::{de_duration, de_opt_duration, valid_id};
use crate::wire::Framing;
use serde::Deserialize;
use std::time::Duration;

/// What a `[[ble]]` device speaks.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BleProfile {
    /// Heart Rate service 0x180D, notify 0x2A37.
    HeartRate,
    /// Health Thermometer service 0x1809, indicate 0x2A1C.
    HealthThermometer,
    /// Battery service 0x180F, read + notify 0x2A19.
    Battery,
    /// BTHome v2 advertisements (service data 0xFCD2); never connected.
    Bthome,
    /// Any service/characteristic carrying `jsonl` or `cobs` frames.
    Custom,
}

/// Which advertiser a `[[ble]]` entry is: every key given must match.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct BleMatch {
    pub name_prefix: Option<String>,
    /// `AA:BB:CC:DD:EE:FF`.
    pub address: Option<String>,
    /// An advertised service UUID (`"180d"` or the full 128-bit form).
    pub service: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BleConfig {
    /// Short name used in logs and metrics.
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: BleMatch,
    /// Device id of the readings (default: the BLE address).
    #[serde(default)]
    pub device: Option<String>,
    pub profile: BleProfile,
    /// BTHome: 32 hex digits, for encrypted adverts.
    #[serde(default)]
    pub bindkey: Option<String>,
    /// Custom profile: service and characteristic UUIDs, and the framing.
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub characteristic: Option<String>,
    #[serde(default)]
    pub framing: Option<Framing>,
    /// Custom profile: a characteristic (in `service`) the gateway writes
    /// commands from the cloud to, in `framing` (`{"cmd":...}` / a Command
    /// frame); the device answers on `characteristic`. Absent: only
    /// `alert` (Immediate Alert Service) reaches the device.
    #[serde(default)]
    pub command_characteristic: Option<String>,
    /// Custom profile: the devices its frames may name (patterns, `*` = any
    /// run). Absent: only the entry's own id (`device`, or the address).
    #[serde(default)]
    pub devices: Option<Devices>,
    /// An `rssi` reading at most this often (default: none).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub rssi_interval: Option<Duration>,
    /// Connected devices: no notification for this long → reconnect.
    #[serde(default = "default_stale_after", deserialize_with = "de_duration")]
    pub stale_after: Duration,
}

fn default_stale_after() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BleScanConfig {
    /// BlueZ adapter, e.g. `hci0` (default: the first one).
    pub adapter: Option<String>,
    /// No advertisement for this long → restart discovery; as long again → power-cycle the adapter.
    #[serde(deserialize_with = "de_duration")]
    pub scan_stale_after: Duration,
    /// How often BlueZ and the adapter are checked to be there.
    #[serde(deserialize_with = "de_duration")]
    pub health_interval: Duration,
    /// Encrypted BTHome counters are saved at most this often when one
    /// moved (and at shutdown); see `replay`.
    #[serde(deserialize_with = "de_duration")]
    pub counter_save_interval: Duration,
}

impl Default for BleScanConfig {
    fn default() -> Self {
        BleScanConfig {
            adapter: None,
            scan_stale_after: Duration::from_secs(60),
            health_interval: Duration::from_secs(5),
            counter_save_interval: Duration::from_secs(60),
        }
    }
}

/// Checks serde cannot express; returns the offending key.
pub fn validate(devices: &[BleConfig], scan: &BleScanConfig) -> Result<(), (String, String)> {
    let bad = |k: String, m: &str| Err((k, m.to_string()));
    for (i, b) in devices.iter().enumerate() {
        let k = |key: &str| format!("ble.{i}.{key}");
        if b.name.is_empty() || devices[..i].iter().any(|o| o.name == b.name) {
            return Err((k("name"), format!("must be non-empty and unique (got {:?})", b.name)));
        }
        let m = &b.matcher;
        if m.name_prefix.is_none() && m.address.is_none() && m.service.is_none() {
            return bad(k("match"), "needs at least one of name_prefix, address, service");
        }
        if m.address.as_deref().is_some_and(|a| parse_address(a).is_none()) {
            return bad(k("match.address"), "must be a BLE address like \"AA:BB:CC:DD:EE:FF\"");
        }
        if m.service.as_deref().is_some_and(|u| parse_uuid(u).is_none()) {
            return bad(k("match.service"), "must be a UUID: \"180d\" or \"0000180d-0000-1000-8000-00805f9b34fb\"");
        }
        if b.device.as_deref().is_some_and(|d| !valid_id(d)) {
            return bad(k("device"), "must be 1-64 characters of letters, digits, '-', '_' or '.'");
        }
        let custom = b.profile == BleProfile::Custom;
        for (key, v) in [("service", &b.service), ("characteristic", &b.characteristic)] {
            match v {
                None if custom => return bad(k(key), "is required by profile \"custom\""),
                Some(_) if !custom => return bad(k(key), "is only for profile \"custom\""),
                Some(u) if parse_uuid(u).is_none() => return bad(k(key), "must be a UUID"),
                _ => {}
            }
        }
        if b.framing.is_some() && !custom {
            return bad(k("framing"), "is only for profile \"custom\"");
        }
        match &b.command_characteristic {
            Some(_) if !custom => return bad(k("command_characteristic"), "is only for profile \"custom\""),
            Some(u) if parse_uuid(u).is_none() => return bad(k("command_characteristic"), "must be a UUID"),
            _ => {}
        }
        match &b.devices {
            Some(_) if !custom => return bad(k("devices"), "is only for profile \"custom\""),
            Some(d) => {
                if let Err(e) = d.check(false) {
                    return bad(k("devices"), &e);
                }
            }
            None => {}
        }
        match (&b.bindkey, b.profile) {
            (Some(_), p) if p != BleProfile::Bthome => return bad(k("bindkey"), "is only for profile \"bthome\""),
            (Some(key), _) if super::bthome::parse_bindkey(key).is_none() => {
                return bad(k("bindkey"), "must be 32 hex digits (16 bytes)");
            }
            _ => {}
        }
        if b.stale_after.is_zero() {
            return bad(k("stale_after"), "must be greater than 0");
        }
        if b.rssi_interval.is_some_and(|d| d.is_zero()) {
            return bad(k("rssi_interval"), "must be greater than 0 (leave it out for no rssi readings)");
        }
    }
    if scan.scan_stale_after.is_zero() || scan.health_interval.is_zero() || scan.counter_save_interval.is_zero() {
        return bad("ble_scan".into(), "durations must be greater than 0");
    }
    Ok(())
}
