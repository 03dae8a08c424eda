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

/// What a key is about, interned per device: `(sensor, kind, boot)`. A key
/// is a stream and a number (the seq, the ts, or 0 for a packet key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Stream {
    sensor: u32,
    kind: u8,
    boot: Option<u32>,
}

/// One remembered key, 32 bytes. `stream == DEAD`: forgotten or
/// remembered again later in the ring (skipped when popped).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Slot {
    n: u64,
    /// The reading's `ts` ([`TS_UNKNOWN`] from a state file written before
    /// it was kept). For packet keys: the packet id.
    ts: u64,
    at_ms: u64,
    stream: u32,
    /// Fingerprint of the value.
    fp: u32,
}

const DEAD: u32 = u32::MAX;
/// An empty place in the index.
const EMPTY: u32 = u32::MAX;

/// A device's remembered keys: a ring in acceptance order (for eviction by
/// age and count) and an open-addressing index of ring positions (linear
/// probing, at most 70 % full, backward-shift deletion). About 40 bytes per
/// key: the 32-byte slot, 4-8 bytes of index; a std `HashMap` of keys plus
/// an order queue took ~200 (issue 18).
#[derive(Default, Debug)]
struct DeviceKeys {
    /// `max_per_device`: the ring grows to it exactly, not past it by
    /// doubling.
    max: usize,
    sensors: Vec<String>,
    sensor_idx: HashMap<String, u32>,
    streams: Vec<Stream>,
    stream_idx: HashMap<Stream, u32>,
    ring: VecDeque<Slot>,
    /// Absolute number of `ring[0]` (slots ever popped).
    head: u64,
    /// Slots not dead.
    live: usize,
    /// Low 32 bits of absolute ring numbers; `EMPTY` where free. Any
    /// length (a hash is mapped onto it by multiply-shift).
    index: Vec<u32>,
}

/// splitmix64's finalizer over the key: seqs are consecutive, the index
/// needs them spread.
fn key_hash(stream: u32, n: u64) -> u64 {
    let mut z = n ^ (u64::from(stream) << 32 | u64::from(stream)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl DeviceKeys {
    fn new(max: usize) -> Self {
        DeviceKeys { max, ..Default::default() }
    }

    fn sensor(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.sensor_idx.get(name) {
            return i;
        }
        let i = self.sensors.len() as u32;
        self.sensors.push(name.to_string());
        self.sensor_idx.insert(name.to_string(), i);
        i
    }

    fn stream(&mut self, sensor: &str, kind: u8, boot: Option<u32>) -> u32 {
        let st = Stream { sensor: self.sensor(sensor), kind, boot };
        if let Some(&i) = self.stream_idx.get(&st) {
            return i;
        }
        let i = self.streams.len() as u32;
        self.streams.push(st);
        self.stream_idx.insert(st, i);
        i
    }

    /// The stream, without interning it.
    fn find_stream(&self, sensor: &str, kind: u8, boot: Option<u32>) -> Option<u32> {
        let sensor = *self.sensor_idx.get(sensor)?;
        self.stream_idx.get(&Stream { sensor, kind, boot }).copied()
    }

    fn pos(&self, e: u32) -> usize {
        e.wrapping_sub(self.head as u32) as usize
    }

    fn home(&self, stream: u32, n: u64) -> usize {
        ((u128::from(key_hash(stream, n)) * self.index.len() as u128) >> 64) as usize
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.index.len() { 0 } else { i + 1 }
    }

    /// (index place, ring position) of a live key.
    fn find(&self, stream: u32, n: u64) -> Option<(usize, usize)> {
        if self.index.is_empty() {
            return None;
        }
        let mut i = self.home(stream, n);
        loop {
            let e = self.index[i];
            if e == EMPTY {
                return None;
            }
            let p = self.pos(e);
            let s = &self.ring[p];
            if s.stream == stream && s.n == n {
                return Some((i, p));
            }
            i = self.next(i);
        }
    }

    fn get(&self, stream: u32, n: u64) -> Option<&Slot> {
        self.find(stream, n).map(|(_, p)| &self.ring[p])
    }

    fn place(&mut self, e: u32) {
        let s = self.ring[self.pos(e)];
        let mut i = self.home(s.stream, s.n);
        while self.index[i] != EMPTY {
            i = self.next(i);
        }
        self.index[i] = e;
    }

    /// Rebuild the index with `cap` places from the ring.
    fn reindex(&mut self, cap: usize) {
        self.index = vec![EMPTY; cap];
        for p in 0..self.ring.len() {
            if self.ring[p].stream != DEAD {
                self.place(self.head.wrapping_add(p as u64) as u32);
            }
        }
    }

    /// Free index place `i` (backward-shift deletion: later entries of the
    /// same probe run move up, so lookups never stop early).
    fn unindex(&mut self, mut i: usize) {
        let mut j = i;
        loop {
            j = self.next(j);
            let e = self.index[j];
            if e == EMPTY {
                break;
            }
            let s = self.ring[self.pos(e)];
            let k = self.home(s.stream, s.n);
            // Move j's entry into the hole at i unless its home lies
            // cyclically in (i, j].
            let stays = if i <= j { i < k && k <= j } else { i < k || k <= j };
            if !stays {
                self.index[i] = e;
                i = j;
            }
        }
        self.index[i] = EMPTY;
    }

    fn insert(&mut self, stream: u32, n: u64, fp: u32, ts: u64, at_ms: u64) {
        let abs = self.head.wrapping_add(self.ring.len() as u64) as u32;
        if self.ring.len() == self.ring.capacity() {
            // Doubling, but to `max + 1` exactly when that is the next step
            // (the bound is reached and pruned right after this insert).
            let mut want = (self.ring.capacity() * 2).max(16);
            if self.ring.len() <= self.max {
                want = want.min(self.max + 1);
            }
            self.ring.reserve_exact(want - self.ring.len());
        }
        self.ring.push_back(Slot { n, ts, at_ms, stream, fp });
        if let Some((i, p)) = self.find(stream, n) {
            self.ring[p].stream = DEAD;
            self.index[i] = abs;
            return;
        }
        self.live += 1;
        if self.live * 10 > self.index.len() * 7 {
            let cap = (self.index.len() * 2).min(Self::cap_for(self.max + 1)).max(Self::cap_for(self.live));
            self.reindex(cap);
        } else {
            self.place(abs);
        }
    }

    fn forget(&mut self, stream: u32, n: u64) {
        if let Some((i, p)) = self.find(stream, n) {
            self.unindex(i);
            self.ring[p].stream = DEAD;
            self.live -= 1;
        }
    }

    fn pop_front(&mut self) {
        let Some(s) = self.ring.front().copied() else { return };
        if s.stream != DEAD {
            let (i, _) = self.find(s.stream, s.n).expect("a live slot is indexed");
            self.unindex(i);
            self.live -= 1;
        }
        self.ring.pop_front();
        self.head = self.head.wrapping_add(1);
    }

    fn prune(&mut self, oldest_ms: u64, max: usize) {
        while let Some(s) = self.ring.front() {
            if s.stream != DEAD && s.at_ms >= oldest_ms && self.live <= max {
                break;
            }
            self.pop_front();
        }
        // Dead slots (keys remembered again, as a BTHome sensor's packet key
        // is with every advert) are dropped once they are half the ring, and
        // memory goes back when a device sends less.
        let dead = self.ring.len() - self.live;
        if dead > 64 && dead > self.live {
            self.ring.retain(|s| s.stream != DEAD);
            self.head = 0;
            self.ring.shrink_to_fit();
            self.reindex(Self::cap_for(self.live));
        } else if self.index.len() > 64 && self.live * 8 < self.index.len() {
            self.ring.shrink_to(self.live * 2);
            self.reindex(Self::cap_for(self.live));
        }
    }

    /// Index places for `live` keys: at most 70 % full.
    fn cap_for(live: usize) -> usize {
        (live * 10 / 7 + 1).max(16)
    }

    fn bytes(&self) -> usize {
        self.ring.capacity() * std::mem::size_of::<Slot>()
            + self.index.capacity() * 4
            + self.streams.capacity() * std::mem::size_of::<Stream>()
            + self.stream_idx.capacity() * (std::mem::size_of::<(Stream, u32)>() + 1)
            + self.sensors.iter().map(|s| s.capacity() * 2 + 56).sum::<usize>()
    }

    fn live_slots(&self) -> impl Iterator<Item = (&Stream, &Slot)> {
        self.ring.iter().filter(|s| s.stream != DEAD).map(|s| (&self.streams[s.stream as usize], s))
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

    /// The reading's key, `(stream, n)`.
    fn key_of(dev: &mut DeviceKeys, r: &Reading, ts_from_device: bool) -> Option<(u32, u64)> {
        let (kind, n) = match r.seq {
            Some(n) => (KIND_SEQ, n),
            None if ts_from_device => (KIND_TS, r.ts),
            None => return None,
        };
        Some((dev.stream(&r.sensor, kind, r.boot), n))
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
            None => self.devices.entry(r.device.clone()).or_insert_with(|| DeviceKeys::new(self.max_per_device)),
        };
        let fp = fingerprint(&r.value);
        let oldest = now_ms.saturating_sub(self.window_ms);
        if let (None, Some(id)) = (r.seq, packet_id) {
            let stream = dev.stream(&r.sensor, KIND_PACKET, r.boot);
            let id = id as u64;
            let repeat_since = now_ms.saturating_sub(PACKET_REPEAT_MS.min(self.window_ms));
            if let Some(e) = dev.get(stream, 0)
                && e.fp == fp
                && e.ts == id
                && e.at_ms >= repeat_since
            {
                return (Verdict::Duplicate, None);
            }
            dev.insert(stream, 0, fp, id, now_ms);
            dev.prune(oldest, self.max_per_device);
            return (Verdict::Accept, None);
        }
        let Some((stream, n)) = Self::key_of(dev, r, ts_from_device) else {
            return (Verdict::Accept, None);
        };
        let seen = dev.get(stream, n).copied();
        if let Some(e) = seen
            && e.fp == fp
            && e.at_ms >= oldest
            // A device that stamps its readings resends the same ts; the
            // stored reading, being the same device's, was stamped too.
            && (!ts_from_device || e.ts == TS_UNKNOWN || e.ts == r.ts)
        {
            return (Verdict::Duplicate, None);
        }
        let reused = seen
            .filter(|e| ts_from_device && r.seq.is_some() && e.at_ms >= oldest && e.ts != TS_UNKNOWN && e.ts != r.ts)
            .map(|e| e.ts);
        dev.insert(stream, n, fp, r.ts, now_ms);
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
        if let Some(stream) = dev.find_stream(&r.sensor, kind, r.boot) {
            dev.forget(stream, n);
        }
    }

    /// Remember a reading found in the queue at start-up (accepted at `at_ms`).
    pub fn remember(&mut self, r: &Reading, at_ms: u64) {
        let dev = self.devices.entry(r.device.clone()).or_insert_with(|| DeviceKeys::new(self.max_per_device));
        // Replayed readings lost the "ts from device" bit; a seq-less reading
        // is keyed by ts, which at worst keeps one receive-time key too many.
        // The ts fingerprint is only compared for readings stamped by the
        // device, whose resends carry this same ts.
        let (stream, n) = Self::key_of(dev, r, true).expect("with ts_from_device every reading has a key");
        let fp = fingerprint(&r.value);
        dev.insert(stream, n, fp, r.ts, at_ms);
    }

    /// Drop keys older than the window for every device (devices that went
    /// quiet are otherwise only pruned when they speak again).
    pub fn prune(&mut self, now_ms: u64) {
        let oldest = now_ms.saturating_sub(self.window_ms);
        let max = self.max_per_device;
        self.devices.retain(|_, d| {
            d.prune(oldest, max);
            d.live > 0
        });
    }

    /// Keys remembered, all devices.
    pub fn len(&self) -> usize {
        self.devices.values().map(|d| d.live).sum()
    }

    /// Heap bytes held for the remembered keys (capacities, not lengths;
    /// the device map's own entries included).
    pub fn memory_bytes(&self) -> usize {
        self.devices.iter().map(|(name, d)| name.capacity() + std::mem::size_of::<DeviceKeys>() + 24 + d.bytes()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The checkpoint's state as an owned copy, as a restart reads it (the
    /// checkpoint itself serializes [`Dedup::view`], without the copy).
    #[cfg(test)]
    pub fn snapshot(&mut self, now_ms: u64) -> DedupSnapshot {
        let bytes = postcard::to_allocvec(&self.view(now_ms)).expect("the dedup state serializes");
        postcard::from_bytes(&bytes).expect("and reads back")
    }

    /// The state for the checkpoint, serialized straight from the rings in
    /// [`DedupSnapshot`]'s format: a copy of every key (48 bytes each, ~15
    /// MiB at 20 devices × 16,384 keys) was most of the gateway's peak heap
    /// (issue 18, heaptrack). Prunes first.
    pub fn view(&mut self, now_ms: u64) -> DedupView<'_> {
        self.prune(now_ms);
        DedupView(self)
    }

    pub fn restore(&mut self, snap: DedupSnapshot) {
        for d in snap.devices {
            let mut keys = DeviceKeys::new(self.max_per_device);
            for s in &d.sensors {
                keys.sensor(s);
            }
            for k in d.keys {
                let Some(sensor) = d.sensors.get(k.sensor as usize) else { continue };
                let stream = keys.stream(sensor, k.kind, k.boot);
                keys.insert(stream, k.n, k.fp, k.ts, k.at_ms);
            }
            self.devices.insert(d.name, keys);
        }
    }
}

/// [`Dedup`] serialized as a [`DedupSnapshot`] without building one.
pub struct DedupView<'a>(&'a Dedup);

impl Serialize for DedupView<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeSeq, SerializeStruct};
        struct Devices<'a>(&'a HashMap<String, DeviceKeys>);
        struct Device<'a>(&'a str, &'a DeviceKeys);
        struct Keys<'a>(&'a DeviceKeys);
        impl Serialize for Devices<'_> {
            fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                let mut seq = ser.serialize_seq(Some(self.0.len()))?;
                for (name, d) in self.0 {
                    seq.serialize_element(&Device(name, d))?;
                }
                seq.end()
            }
        }
        impl Serialize for Device<'_> {
            fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                let mut st = ser.serialize_struct("SnapDevice", 3)?;
                st.serialize_field("name", self.0)?;
                st.serialize_field("sensors", &self.1.sensors)?;
                st.serialize_field("keys", &Keys(self.1))?;
                st.end()
            }
        }
        impl Serialize for Keys<'_> {
            fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                let mut seq = ser.serialize_seq(Some(self.0.live))?;
                for (st, s) in self.0.live_slots() {
                    seq.serialize_element(&SnapKey {
                        sensor: st.sensor,
                        kind: st.kind,
                        boot: st.boot,
                        n: s.n,
                        fp: s.fp,
                        ts: s.ts,
                        at_ms: s.at_ms,
                    })?;
                }
                seq.end()
            }
        }
        let mut st = ser.serialize_struct("DedupSnapshot", 1)?;
        st.serialize_field("devices", &Devices(&self.0.devices))?;
        st.end()
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

    /// The ring and its index against the plainest model of what they keep
    /// (a list in acceptance order, one entry per key), through inserts,
    /// repeats, forgets and prunes that grow, shrink and compact them.
    /// Planted while writing: `unindex` without the backward shift (a plain
    /// hole) → lookups past the hole miss and this fails.
    mod ring_and_index {
        use super::super::*;
        use proptest::prelude::*;

        #[derive(Clone, Debug)]
        enum Op {
            Insert(u32, u64, u32),
            Forget(u32, u64),
            Prune(u64, usize),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                8 => (0..4u32, 0..300u64, any::<u32>()).prop_map(|(s, n, fp)| Op::Insert(s, n, fp)),
                1 => (0..4u32, 0..300u64).prop_map(|(s, n)| Op::Forget(s, n)),
                1 => (0..400u64, 1..400usize).prop_map(|(w, m)| Op::Prune(w, m)),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]
            #[test]
            fn keeps_what_a_list_keeps(ops in proptest::collection::vec(op(), 1..1500)) {
                let mut d = DeviceKeys::new(200);
                for s in 0..4 {
                    d.stream(&format!("s{s}"), KIND_SEQ, None);
                }
                // (stream, n, fp, at)
                let mut model: Vec<(u32, u64, u32, u64)> = Vec::new();
                for (t, op) in ops.into_iter().enumerate() {
                    let now = t as u64;
                    match op {
                        Op::Insert(s, n, fp) => {
                            model.retain(|e| (e.0, e.1) != (s, n));
                            model.push((s, n, fp, now));
                            d.insert(s, n, fp, n ^ 7, now);
                        }
                        Op::Forget(s, n) => {
                            model.retain(|e| (e.0, e.1) != (s, n));
                            d.forget(s, n);
                        }
                        Op::Prune(w, max) => {
                            let oldest = now.saturating_sub(w);
                            while model.first().is_some_and(|e| e.3 < oldest || model.len() > max) {
                                model.remove(0);
                            }
                            d.prune(oldest, max);
                        }
                    }
                    prop_assert_eq!(d.live, model.len());
                    let kept: Vec<(u32, u64, u32, u64)> =
                        d.ring.iter().filter(|s| s.stream != DEAD).map(|s| (s.stream, s.n, s.fp, s.at_ms)).collect();
                    prop_assert_eq!(&kept, &model);
                    for &(s, n, fp, at) in &model {
                        let got = d.get(s, n).map(|x| (x.fp, x.ts, x.at_ms));
                        prop_assert_eq!(got, Some((fp, n ^ 7, at)), "key ({}, {}) lost", s, n);
                    }
                    for n in 300..310 {
                        prop_assert!(d.get(0, n).is_none());
                    }
                    prop_assert!(d.ring.len() <= 2 * d.live + 65, "dead slots pile up: {} for {}", d.ring.len(), d.live);
                }
            }
        }
    }

    /// Issue 18: bytes per remembered key at the default bound (20 devices
    /// × 16,384 keys, the uplink bench's full load). A guard against
    /// regressions, from capacities (RSS is measured by the benches).
    #[test]
    fn memory_per_key_at_the_default_bound() {
        let mut d = Dedup::new(Duration::from_secs(600), 16_384);
        for dev in 0..20 {
            for i in 0..40_000u64 {
                d.check(&r(&format!("wrist-{dev:02}"), "hr", Some(i), 1_000 + i, i as f64), true, 1_000 + i);
            }
        }
        assert_eq!(d.len(), 20 * 16_384);
        let per_key = d.memory_bytes() as f64 / d.len() as f64;
        println!("dedup: {per_key:.1} bytes per remembered key");
        assert!(per_key <= 40.0, "{per_key:.1} bytes per key (37.7 when written)");
    }

    /// The checkpoint serializes the rings directly; what it writes must
    /// read back as the owned snapshot the state file always held.
    #[test]
    fn the_streamed_view_is_the_snapshot_format() {
        let mut d = Dedup::new(Duration::from_secs(60), 100);
        for i in 0..150 {
            let mut x = r(if i % 3 == 0 { "a" } else { "b" }, if i % 2 == 0 { "hr" } else { "t" }, Some(i), i, 1.0);
            x.boot = (i % 5 == 0).then_some(7);
            d.check(&x, true, 1000 + i);
        }
        d.forget(&r("b", "t", Some(149), 149, 1.0));
        let bytes = postcard::to_allocvec(&d.view(1100)).unwrap();
        let snap: DedupSnapshot = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(snap.devices.iter().map(|d| d.keys.len()).sum::<usize>(), d.len());
        let mut e = Dedup::new(Duration::from_secs(60), 100);
        e.restore(snap);
        assert_eq!(e.len(), d.len());
        assert_eq!(postcard::to_allocvec(&e.view(1100)).unwrap().len(), bytes.len());
        assert_eq!(e.check(&r("a", "hr", Some(144), 144, 1.0), true, 1200), Verdict::Duplicate);
    }
}
