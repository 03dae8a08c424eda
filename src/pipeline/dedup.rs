//! Drops readings a device sent again.
//!
//! Devices resend everything not yet acked, so overlap is normal, not an
//! error. A reading is a duplicate when its `(device, sensor, seq)` — or
//! `(device, sensor, ts)` when it has no seq and the device stamped it — was
//! accepted within `dedup_window`. Readings with neither seq nor a device
//! timestamp cannot be told apart from a resend and are always accepted.
//!
//! A key seen again *with a different value* is not a duplicate: the device
//! rebooted and restarted its counter. Storing a 32-bit fingerprint of the
//! value per key makes that distinction for four bytes.
//!
//! Memory is bounded per device (`max_per_device` keys, oldest evicted
//! first) and by time (keys older than the window are pruned). Sensor names
//! are interned per device so a key is 24 bytes, not a heap string.

use crate::reading::{Reading, Value};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    sensor: u32,
    by_ts: bool,
    n: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Entry {
    fp: u32,
    at_ms: u64,
}

#[derive(Default, Debug)]
struct DeviceKeys {
    sensors: Vec<String>,
    sensor_idx: HashMap<String, u32>,
    seen: HashMap<Key, Entry>,
    /// Insertion order, for eviction by age and count. May hold stale keys
    /// (forgotten or re-inserted); they are skipped when popped.
    order: VecDeque<(Key, Entry)>,
}

impl DeviceKeys {
    fn sensor(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.sensor_idx.get(name) {
            return i;
        }
        let i = self.sensors.len() as u32;
        self.sensors.push(name.to_string());
        self.sensor_idx.insert(name.to_string(), i);
        i
    }

    fn insert(&mut self, k: Key, e: Entry) {
        self.seen.insert(k, e);
        self.order.push_back((k, e));
    }

    /// Whether an `order` entry is still the key's current one (not
    /// forgotten or re-inserted since).
    fn is_live(&self, k: &Key, e: &Entry) -> bool {
        self.seen.get(k) == Some(e)
    }

    fn prune(&mut self, oldest_ms: u64, max: usize) {
        while let Some(&(k, e)) = self.order.front() {
            let live = self.is_live(&k, &e);
            if live && e.at_ms >= oldest_ms && self.seen.len() <= max {
                break;
            }
            self.order.pop_front();
            if live {
                self.seen.remove(&k);
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Duplicate,
}

pub struct Dedup {
    window_ms: u64,
    max_per_device: usize,
    devices: HashMap<String, DeviceKeys>,
}

fn fingerprint(v: &Value) -> u32 {
    // FNV-1a over the value's bits: stable across runs and versions (it is
    // persisted), unlike std's randomly seeded hasher.
    let mut h: u32 = 0x811c_9dc5;
    let mut eat = |x: f64| {
        for b in x.to_bits().to_le_bytes() {
            h = (h ^ b as u32).wrapping_mul(0x0100_0193);
        }
    };
    match v {
        Value::Number(x) => eat(*x),
        Value::Array(xs) => xs.iter().copied().for_each(&mut eat),
    }
    h
}

impl Dedup {
    pub fn new(window: std::time::Duration, max_per_device: usize) -> Self {
        Dedup { window_ms: window.as_millis() as u64, max_per_device, devices: HashMap::new() }
    }

    fn key_of(dev: &mut DeviceKeys, r: &Reading, ts_from_device: bool) -> Option<Key> {
        match r.seq {
            Some(n) => Some(Key { sensor: dev.sensor(&r.sensor), by_ts: false, n }),
            None if ts_from_device => Some(Key { sensor: dev.sensor(&r.sensor), by_ts: true, n: r.ts }),
            None => None,
        }
    }

    /// Decide on one reading and, if accepted, remember it (as of `now_ms`).
    pub fn check(&mut self, r: &Reading, ts_from_device: bool, now_ms: u64) -> Verdict {
        let dev = match self.devices.get_mut(&r.device) {
            Some(d) => d,
            None => self.devices.entry(r.device.clone()).or_default(),
        };
        let Some(key) = Self::key_of(dev, r, ts_from_device) else {
            return Verdict::Accept;
        };
        let fp = fingerprint(&r.value);
        let oldest = now_ms.saturating_sub(self.window_ms);
        if let Some(e) = dev.seen.get(&key)
            && e.fp == fp
            && e.at_ms >= oldest
        {
            return Verdict::Duplicate;
        }
        dev.insert(key, Entry { fp, at_ms: now_ms });
        dev.prune(oldest, self.max_per_device);
        Verdict::Accept
    }

    /// Un-accept a reading whose batch the queue refused (`reject_new`): the
    /// device was not acked and will resend it, and that resend must not be
    /// mistaken for a duplicate.
    pub fn forget(&mut self, r: &Reading) {
        let Some(dev) = self.devices.get_mut(&r.device) else { return };
        // Without seq, `ts` was the device's own only if a key exists for it.
        let key = match r.seq {
            Some(n) => dev.sensor_idx.get(&r.sensor).map(|&s| Key { sensor: s, by_ts: false, n }),
            None => dev.sensor_idx.get(&r.sensor).map(|&s| Key { sensor: s, by_ts: true, n: r.ts }),
        };
        if let Some(k) = key {
            dev.seen.remove(&k);
        }
    }

    /// Remember a reading found in the queue at start-up (accepted at `at_ms`).
    pub fn remember(&mut self, r: &Reading, at_ms: u64) {
        let dev = self.devices.entry(r.device.clone()).or_default();
        // Replayed readings lost the "ts from device" bit; a seq-less reading
        // is keyed by ts, which at worst keeps one receive-time key too many.
        let key = Self::key_of(dev, r, true).expect("with ts_from_device every reading has a key");
        dev.insert(key, Entry { fp: fingerprint(&r.value), at_ms });
    }

    /// Drop keys older than the window for every device (devices that went
    /// quiet are otherwise only pruned when they speak again).
    pub fn prune(&mut self, now_ms: u64) {
        let oldest = now_ms.saturating_sub(self.window_ms);
        let max = self.max_per_device;
        self.devices.retain(|_, d| {
            d.prune(oldest, max);
            !d.seen.is_empty()
        });
    }

    /// Keys remembered, all devices.
    pub fn len(&self) -> usize {
        self.devices.values().map(|d| d.seen.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Serializable state for the checkpoint.
    pub fn snapshot(&mut self, now_ms: u64) -> DedupSnapshot {
        self.prune(now_ms);
        DedupSnapshot {
            devices: self
                .devices
                .iter()
                .map(|(name, d)| SnapDevice {
                    name: name.clone(),
                    sensors: d.sensors.clone(),
                    keys: d
                        .order
                        .iter()
                        .filter(|(k, e)| d.is_live(k, e))
                        .map(|&(k, e)| (k.sensor, k.by_ts, k.n, e.fp, e.at_ms))
                        .collect(),
                })
                .collect(),
        }
    }

    pub fn restore(&mut self, snap: DedupSnapshot) {
        for d in snap.devices {
            let mut keys = DeviceKeys::default();
            for s in &d.sensors {
                keys.sensor(s);
            }
            for (sensor, by_ts, n, fp, at_ms) in d.keys {
                keys.insert(Key { sensor, by_ts, n }, Entry { fp, at_ms });
            }
            self.devices.insert(d.name, keys);
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DedupSnapshot {
    devices: Vec<SnapDevice>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct SnapDevice {
    name: String,
    sensors: Vec<String>,
    keys: Vec<(u32, bool, u64, u32, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn r(dev: &str, sensor: &str, seq: Option<u64>, ts: u64, v: f64) -> Reading {
        Reading { device: dev.into(), sensor: sensor.into(), seq, ts, value: Value::Number(v) }
    }

    #[test]
    fn resend_is_a_duplicate_other_sensor_or_device_is_not() {
        let mut d = Dedup::new(Duration::from_secs(60), 100);
        assert_eq!(d.check(&r("a", "hr", Some(1), 5, 70.0), true, 1000), Verdict::Accept);
        assert_eq!(d.check(&r("a", "hr", Some(1), 5, 70.0), true, 2000), Verdict::Duplicate);
        assert_eq!(d.check(&r("a", "spo2", Some(1), 5, 70.0), true, 2000), Verdict::Accept);
        assert_eq!(d.check(&r("b", "hr", Some(1), 5, 70.0), true, 2000), Verdict::Accept);
    }

    #[test]
    fn window_expires() {
        let mut d = Dedup::new(Duration::from_secs(10), 100);
        d.check(&r("a", "hr", Some(1), 5, 70.0), true, 1000);
        assert_eq!(d.check(&r("a", "hr", Some(1), 5, 70.0), true, 10_999), Verdict::Duplicate);
        assert_eq!(d.check(&r("a", "hr", Some(1), 5, 70.0), true, 11_001), Verdict::Accept);
    }

    #[test]
    fn ts_key_without_seq_and_no_key_without_either() {
        let mut d = Dedup::new(Duration::from_secs(60), 100);
        assert_eq!(d.check(&r("a", "t", None, 5, 1.0), true, 0), Verdict::Accept);
        assert_eq!(d.check(&r("a", "t", None, 5, 1.0), true, 0), Verdict::Duplicate);
        assert_eq!(d.check(&r("a", "t", None, 6, 1.0), false, 0), Verdict::Accept);
        assert_eq!(d.check(&r("a", "t", None, 6, 1.0), false, 0), Verdict::Accept);
    }

    #[test]
    fn counter_restart_with_new_value_is_accepted() {
        let mut d = Dedup::new(Duration::from_secs(60), 100);
        d.check(&r("a", "hr", Some(1), 5, 70.0), true, 0);
        assert_eq!(d.check(&r("a", "hr", Some(1), 9, 71.0), true, 1), Verdict::Accept);
    }

    #[test]
    fn memory_is_bounded_per_device() {
        let mut d = Dedup::new(Duration::from_secs(3600), 50);
        for i in 0..1000 {
            d.check(&r("a", "hr", Some(i), i, 1.0), true, i);
        }
        assert!(d.len() <= 51, "{}", d.len());
        assert_eq!(d.check(&r("a", "hr", Some(999), 999, 1.0), true, 1000), Verdict::Duplicate);
    }

    #[test]
    fn forget_lets_the_resend_in() {
        let mut d = Dedup::new(Duration::from_secs(60), 100);
        let x = r("a", "hr", Some(1), 5, 70.0);
        d.check(&x, true, 0);
        d.forget(&x);
        assert_eq!(d.check(&x, true, 1), Verdict::Accept);
    }

    #[test]
    fn snapshot_round_trip_keeps_duplicates_out() {
        let mut d = Dedup::new(Duration::from_secs(60), 100);
        for i in 0..20 {
            d.check(&r("a", "hr", Some(i), i, 1.0), true, 1000 + i);
        }
        let bytes = postcard::to_allocvec(&d.snapshot(2000)).unwrap();
        let mut e = Dedup::new(Duration::from_secs(60), 100);
        e.restore(postcard::from_bytes(&bytes).unwrap());
        assert_eq!(e.check(&r("a", "hr", Some(7), 7, 1.0), true, 3000), Verdict::Duplicate);
        assert_eq!(e.check(&r("a", "hr", Some(20), 20, 1.0), true, 3000), Verdict::Accept);
    }
}
