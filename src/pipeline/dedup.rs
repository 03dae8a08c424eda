//! Drops readings a device sent again.
//!
//! Devices resend everything not yet acked, so overlap is normal, not an
//! error. A reading is a duplicate when its `(device, boot, sensor, seq)` —
//! or `(device, boot, sensor, ts)` when it has no seq and the device stamped
//! it — was accepted within `dedup_window` *with the same content*: the same
//! value and, when the device stamps its readings, the same timestamp (a
//! resend carries the `ts` of the original). `boot` is the device's boot
//! counter when its firmware sends one. Readings with neither seq nor a
//! device timestamp cannot be told apart from a resend and are always
//! accepted.
//!
//! A key seen again *with other content* is not a duplicate: the device
//! rebooted and restarted its counter. Without a boot id that is told by the
//! timestamp (a new incarnation stamps a newer `ts`) or, for devices without
//! a clock, only by the value: such a device must send `boot` or never
//! restart its counter (docs/firmware-protocol.md). A 32-bit fingerprint of
//! the value and the ts per key make the distinction.
//!
//! BTHome sensors number their adverts with a packet id, a `u8` that wraps
//! every 256 measurements: not a sequence. A reading repeats the previous one
//! only if the device's *last* packet id, for that sensor, is the same, with
//! the same value, within [`PACKET_REPEAT_MS`].
//!
//! Memory is bounded per device (`max_per_device` keys, oldest evicted
//! first) and by time (keys older than the window are pruned). Sensor names
//! are interned per device so a key does not hold a heap string.

use crate::reading::{Reading, Value};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};

/// A repeated BTHome packet id is a repeat only this soon after the last
/// advert (sensors repeat an advert for a few seconds; after 256 new
/// measurements the id comes round again).
pub const PACKET_REPEAT_MS: u64 = 60_000;

/// An entry restored from a format-1 state file, which kept no ts.
const TS_UNKNOWN: u64 = u64::MAX;

const KIND_SEQ: u8 = 0;
const KIND_TS: u8 = 1;
const KIND_PACKET: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    sensor: u32,
    kind: u8,
    boot: Option<u32>,
    n: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Entry {
    /// Fingerprint of the value.
    fp: u32,
    /// The reading's `ts` ([`TS_UNKNOWN`] from a state file written before
    /// it was kept). For packet keys: the packet id.
    ts: u64,
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

// FNV-1a: stable across runs and versions (it is persisted), unlike std's
// randomly seeded hasher.
fn fnv(h: &mut u32, x: u64) {
    for b in x.to_le_bytes() {
        *h = (*h ^ b as u32).wrapping_mul(0x0100_0193);
    }
}

fn fingerprint(v: &Value) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    match v {
        Value::Number(x) => fnv(&mut h, x.to_bits()),
        Value::Array(xs) => xs.iter().for_each(|x| fnv(&mut h, x.to_bits())),
    }
    h
}

impl Dedup {
    pub fn new(window: std::time::Duration, max_per_device: usize) -> Self {
        Dedup { window_ms: window.as_millis() as u64, max_per_device, devices: HashMap::new() }
    }

    fn key_of(dev: &mut DeviceKeys, r: &Reading, ts_from_device: bool) -> Option<Key> {
        let (kind, n) = match r.seq {
            Some(n) => (KIND_SEQ, n),
            None if ts_from_device => (KIND_TS, r.ts),
            None => return None,
        };
        Some(Key { sensor: dev.sensor(&r.sensor), kind, boot: r.boot, n })
    }

    /// Decide on one reading and, if accepted, remember it (as of `now_ms`).
    pub fn check(&mut self, r: &Reading, ts_from_device: bool, now_ms: u64) -> Verdict {
        self.check_with_packet(r, ts_from_device, None, now_ms)
    }

    /// [`Dedup::check`] for a reading that may carry a BTHome packet id.
    pub fn check_with_packet(
        &mut self,
        r: &Reading,
        ts_from_device: bool,
        packet_id: Option<u8>,
        now_ms: u64,
    ) -> Verdict {
        self.check_full(r, ts_from_device, packet_id, now_ms).0
    }

    /// [`Dedup::check_with_packet`], also saying, for an accepted reading of
    /// a device that stamps `ts`, the `ts` its seq was remembered with when
    /// that differs: the same seq with another ts is another incarnation's
    /// reading (a resend carries its original ts).
    pub fn check_full(
        &mut self,
        r: &Reading,
        ts_from_device: bool,
        packet_id: Option<u8>,
        now_ms: u64,
    ) -> (Verdict, Option<u64>) {
        let dev = match self.devices.get_mut(&r.device) {
            Some(d) => d,
            None => self.devices.entry(r.device.clone()).or_default(),
        };
        let fp = fingerprint(&r.value);
        let oldest = now_ms.saturating_sub(self.window_ms);
        if let (None, Some(id)) = (r.seq, packet_id) {
            let key = Key { sensor: dev.sensor(&r.sensor), kind: KIND_PACKET, boot: r.boot, n: 0 };
            let id = id as u64;
            let repeat_since = now_ms.saturating_sub(PACKET_REPEAT_MS.min(self.window_ms));
            if let Some(e) = dev.seen.get(&key)
                && e.fp == fp
                && e.ts == id
                && e.at_ms >= repeat_since
            {
                return (Verdict::Duplicate, None);
            }
            dev.insert(key, Entry { fp, ts: id, at_ms: now_ms });
            dev.prune(oldest, self.max_per_device);
            return (Verdict::Accept, None);
        }
        let Some(key) = Self::key_of(dev, r, ts_from_device) else {
            return (Verdict::Accept, None);
        };
        if let Some(e) = dev.seen.get(&key)
            && e.fp == fp
            && e.at_ms >= oldest
            // A device that stamps its readings resends the same ts; the
            // stored reading, being the same device's, was stamped too.
            && (!ts_from_device || e.ts == TS_UNKNOWN || e.ts == r.ts)
        {
            return (Verdict::Duplicate, None);
        }
        let reused = dev
            .seen
            .get(&key)
            .filter(|e| ts_from_device && r.seq.is_some() && e.at_ms >= oldest && e.ts != TS_UNKNOWN && e.ts != r.ts)
            .map(|e| e.ts);
        dev.insert(key, Entry { fp, ts: r.ts, at_ms: now_ms });
        dev.prune(oldest, self.max_per_device);
        (Verdict::Accept, reused)
    }

    /// Un-accept a reading whose batch the queue refused (`reject_new`): the
    /// device was not acked and will resend it, and that resend must not be
    /// mistaken for a duplicate.
    pub fn forget(&mut self, r: &Reading) {
        let Some(dev) = self.devices.get_mut(&r.device) else { return };
        // Without seq, `ts` was the device's own only if a key exists for it.
        let (kind, n) = match r.seq {
            Some(n) => (KIND_SEQ, n),
            None => (KIND_TS, r.ts),
        };
        if let Some(&sensor) = dev.sensor_idx.get(&r.sensor) {
            dev.seen.remove(&Key { sensor, kind, boot: r.boot, n });
        }
    }

    /// Remember a reading found in the queue at start-up (accepted at `at_ms`).
    pub fn remember(&mut self, r: &Reading, at_ms: u64) {
        let dev = self.devices.entry(r.device.clone()).or_default();
        // Replayed readings lost the "ts from device" bit; a seq-less reading
        // is keyed by ts, which at worst keeps one receive-time key too many.
        // The ts fingerprint is only compared for readings stamped by the
        // device, whose resends carry this same ts.
        let key = Self::key_of(dev, r, true).expect("with ts_from_device every reading has a key");
        let fp = fingerprint(&r.value);
        dev.insert(key, Entry { fp, ts: r.ts, at_ms });
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
                        .map(|&(k, e)| SnapKey {
                            sensor: k.sensor,
                            kind: k.kind,
                            boot: k.boot,
                            n: k.n,
                            fp: e.fp,
                            ts: e.ts,
                            at_ms: e.at_ms,
                        })
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
            for k in d.keys {
                keys.insert(
                    Key { sensor: k.sensor, kind: k.kind, boot: k.boot, n: k.n },
                    Entry { fp: k.fp, ts: k.ts, at_ms: k.at_ms },
                );
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
    keys: Vec<SnapKey>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct SnapKey {
    sensor: u32,
    kind: u8,
    boot: Option<u32>,
    n: u64,
    fp: u32,
    ts: u64,
    at_ms: u64,
}

/// The state file's dedup part before boot ids (state format 1): keys of
/// `(sensor, by_ts, n, value fingerprint, at_ms)`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DedupSnapshotV1 {
    devices: Vec<(String, Vec<String>, Vec<(u32, bool, u64, u32, u64)>)>,
}

impl From<DedupSnapshotV1> for DedupSnapshot {
    fn from(v1: DedupSnapshotV1) -> DedupSnapshot {
        DedupSnapshot {
            devices: v1
                .devices
                .into_iter()
                .map(|(name, sensors, keys)| SnapDevice {
                    name,
                    sensors,
                    keys: keys
                        .into_iter()
                        .map(|(sensor, by_ts, n, fp, at_ms)| SnapKey {
                            sensor,
                            kind: if by_ts { KIND_TS } else { KIND_SEQ },
                            boot: None,
                            n,
                            fp,
                            ts: TS_UNKNOWN,
                            at_ms,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn r(dev: &str, sensor: &str, seq: Option<u64>, ts: u64, v: f64) -> Reading {
        Reading { device: dev.into(), sensor: sensor.into(), seq, ts, value: Value::Number(v), boot: None }
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
