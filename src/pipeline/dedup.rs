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
//! are interned per device so a key does not hold a heap string; a key is
//! 14 bytes of offsets in its stream's ring (see [`Keys`]), exact: no
//! hashing of keys, so no reading is ever taken for another.

use super::HashMap;
use crate::reading::{Reading, Value};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, VecDeque};

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

/// One remembered key, 14 bytes: offsets from its stream's bases.
#[derive(Clone, Copy, Debug)]
#[repr(C, packed(2))]
struct Slot {
    /// `n - base_n`, or [`WIDE`]: the key's `(n, ts)` did not fit and is in
    /// `Keys::wide`.
    n: u32,
    /// `ts - base_ts` (the reading's `ts`; for a packet key, the packet id).
    ts: u32,
    /// Fingerprint of the value.
    fp: u32,
    /// Acceptance time in units since `base_at`, rounded up; [`DEAD`] once
    /// forgotten or remembered again later in the ring.
    at: u16,
}

const WIDE: u32 = u32::MAX;
const DEAD: u16 = u16::MAX;
/// An empty place in an index.
const EMPTY: u32 = u32::MAX;

/// Slots per block of a [`Ring`]: 3,584 bytes.
const BLOCK: usize = 256;

/// A deque of slots in fixed blocks: it grows and shrinks a block at a
/// time, so a stream wastes at most one block and nothing is copied or left
/// behind by reallocation (a doubling `VecDeque` left up to half its
/// capacity unused, and the allocator kept what its moves freed).
#[derive(Default, Debug)]
struct Ring {
    blocks: VecDeque<Box<[Slot; BLOCK]>>,
    /// Position of the front slot in `blocks[0]`.
    off: usize,
    len: usize,
}

impl Ring {
    const FREE: Slot = Slot { n: 0, ts: 0, fp: 0, at: DEAD };

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn capacity(&self) -> usize {
        self.blocks.len() * BLOCK
    }

    fn front(&self) -> Option<&Slot> {
        (self.len > 0).then(|| &self[0])
    }

    fn back(&self) -> Option<&Slot> {
        self.len.checked_sub(1).map(|p| &self[p])
    }

    fn push_back(&mut self, s: Slot) {
        let q = self.off + self.len;
        if q == self.capacity() {
            self.blocks.push_back(Box::new([Self::FREE; BLOCK]));
        }
        self.len += 1;
        self.blocks[q / BLOCK][q % BLOCK] = s;
    }

    fn pop_front(&mut self) {
        if self.len == 0 {
            return;
        }
        self.len -= 1;
        self.off += 1;
        if self.off == BLOCK || self.len == 0 {
            self.blocks.pop_front();
            self.off = 0;
        }
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Slot> {
        let (off, len) = (self.off, self.len);
        self.blocks.iter_mut().flat_map(|b| b.iter_mut()).skip(off).take(len)
    }
}

impl std::ops::Index<usize> for Ring {
    type Output = Slot;
    fn index(&self, p: usize) -> &Slot {
        debug_assert!(p < self.len);
        let q = self.off + p;
        &self.blocks[q / BLOCK][q % BLOCK]
    }
}

impl std::ops::IndexMut<usize> for Ring {
    fn index_mut(&mut self, p: usize) -> &mut Slot {
        debug_assert!(p < self.len);
        let q = self.off + p;
        &mut self.blocks[q / BLOCK][q % BLOCK]
    }
}

/// A remembered key, decoded.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Entry {
    n: u64,
    ts: u64,
    fp: u32,
    at_ms: u64,
}

/// splitmix64's finalizer: seqs are consecutive, an index needs them spread.
fn key_hash(n: u64) -> u64 {
    let mut z = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One stream's keys, in acceptance order: a ring of 14-byte slots holding
/// offsets from the stream's bases (`n`, `ts`, acceptance time), which are
/// moved when a value falls outside (a stream runs 49 days of ms before its
/// `ts` offsets need a new base). Keys whose `n` never went down are found
/// by position or binary search, with no index; a stream whose `n` went
/// down (a counter restart, a resend after a forget) gets an
/// open-addressing index until the slot that went down has left the ring.
///
/// Invariants: the front slot is live; of the slots with one `n`, only
/// the newest can be live.
#[derive(Default, Debug)]
struct Keys {
    ring: Ring,
    /// Absolute number of `ring[0]` (slots ever popped).
    head: u64,
    live: usize,
    base_n: u64,
    base_ts: u64,
    /// In units of `DeviceKeys::unit_ms`.
    base_at: u64,
    /// `(n, ts)` of [`WIDE`] slots, by absolute number.
    wide: HashMap<u64, (u64, u64)>,
    /// The newest slot pushed with a smaller `n` than the slot before it
    /// (absolute number). While it is in the ring, `n` is not sorted and
    /// lookups go through `index`.
    unsorted: Option<u64>,
    /// Low 32 bits of absolute numbers of live slots, [`EMPTY`] where free;
    /// linear probing, at most 70 % full, backward-shift deletion. Empty
    /// while sorted.
    index: Vec<u32>,
    /// No new base is tried for `n`/`ts` before this absolute number (the
    /// range did not fit: a clock that jumps back and forth).
    rebase_from: u64,
}

impl Keys {
    fn abs(&self, p: usize) -> u64 {
        self.head + p as u64
    }

    fn is_live(&self, p: usize) -> bool {
        self.ring[p].at != DEAD
    }

    fn n_at(&self, p: usize) -> u64 {
        let s = self.ring[p];
        if s.n == WIDE { self.wide[&self.abs(p)].0 } else { self.base_n + u64::from(s.n) }
    }

    fn nts_at(&self, p: usize) -> (u64, u64) {
        let s = self.ring[p];
        if s.n == WIDE {
            self.wide[&self.abs(p)]
        } else {
            (self.base_n + u64::from(s.n), self.base_ts + u64::from(s.ts))
        }
    }

    /// Acceptance time of a live slot, in units.
    fn at_at(&self, p: usize) -> u64 {
        self.base_at + u64::from(self.ring[p].at)
    }

    fn entry(&self, p: usize, unit_ms: u64) -> Entry {
        let (n, ts) = self.nts_at(p);
        Entry { n, ts, fp: self.ring[p].fp, at_ms: self.at_at(p) * unit_ms }
    }

    /// Ring position of the live slot with `n`.
    fn find(&self, n: u64) -> Option<usize> {
        if self.unsorted.is_some() {
            return self.find_indexed(n).map(|(_, p)| p);
        }
        let len = self.ring.len();
        if len == 0 {
            return None;
        }
        let first = self.n_at(0);
        // Above the last: a new reading, the usual case (without this check
        // it binary-searched the whole ring, a cache miss per step).
        if n < first || n > self.n_at(len - 1) {
            return None;
        }
        // Consecutive seqs: the key is where its distance from the first says.
        let guess = n - first;
        let p = if guess < len as u64
            && self.n_at(guess as usize) == n
            && (guess as usize + 1 == len || self.n_at(guess as usize + 1) > n)
        {
            guess as usize
        } else {
            // The last slot with `n_at <= n`.
            let (mut lo, mut hi) = (0, len);
            while lo < hi {
                let mid = (lo + hi) / 2;
                if self.n_at(mid) <= n { lo = mid + 1 } else { hi = mid }
            }
            lo.checked_sub(1)?
        };
        (self.n_at(p) == n && self.is_live(p)).then_some(p)
    }

    fn pos(&self, e: u32) -> usize {
        e.wrapping_sub(self.head as u32) as usize
    }

    fn home(&self, n: u64) -> usize {
        ((u128::from(key_hash(n)) * self.index.len() as u128) >> 64) as usize
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.index.len() { 0 } else { i + 1 }
    }

    /// (index place, ring position) of a live key, through the index.
    fn find_indexed(&self, n: u64) -> Option<(usize, usize)> {
        if self.index.is_empty() {
            return None;
        }
        let mut i = self.home(n);
        loop {
            let e = self.index[i];
            if e == EMPTY {
                return None;
            }
            let p = self.pos(e);
            if self.n_at(p) == n {
                return Some((i, p));
            }
            i = self.next(i);
        }
    }

    fn place(&mut self, p: usize) {
        let mut i = self.home(self.n_at(p));
        while self.index[i] != EMPTY {
            i = self.next(i);
        }
        self.index[i] = self.abs(p) as u32;
    }

    /// Rebuild the index with `cap` places from the ring.
    fn reindex(&mut self, cap: usize) {
        self.index = vec![EMPTY; cap];
        for p in 0..self.ring.len() {
            if self.is_live(p) {
                self.place(p);
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
            let k = self.home(self.n_at(self.pos(e)));
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

    /// Index places for `live` keys: at most 70 % full.
    fn cap_for(live: usize) -> usize {
        (live * 10 / 7 + 1).max(16)
    }

    /// Append a key not live in the ring.
    fn push(&mut self, n: u64, ts: u64, fp: u32, at: u64) {
        if self.ring.is_empty() {
            (self.base_n, self.base_ts, self.base_at) = (n, ts, at);
        }
        if at >= self.base_at + u64::from(DEAD) {
            self.rebase_at(at);
        }
        let abs = self.abs(self.ring.len());
        let fits = |k: &Keys| {
            n.checked_sub(k.base_n).is_some_and(|d| d < u64::from(WIDE))
                && ts.checked_sub(k.base_ts).is_some_and(|d| d < u64::from(WIDE))
        };
        if !fits(self) && abs >= self.rebase_from {
            self.rebase(n, ts, abs);
        }
        // An acceptance time before the base is rounded up to it: the key is
        // kept a little longer, never shorter.
        let at_off = at.saturating_sub(self.base_at) as u16;
        let slot = if fits(self) {
            Slot { n: (n - self.base_n) as u32, ts: (ts - self.base_ts) as u32, fp, at: at_off }
        } else {
            self.wide.insert(abs, (n, ts));
            Slot { n: WIDE, ts: 0, fp, at: at_off }
        };
        let below = self.ring.back().is_some() && n < self.n_at(self.ring.len() - 1);
        self.ring.push_back(slot);
        self.live += 1;
        if below {
            let was_sorted = self.unsorted.is_none();
            self.unsorted = Some(abs);
            if was_sorted {
                self.reindex(Self::cap_for(self.live));
                return;
            }
        }
        if self.unsorted.is_some() {
            if self.live * 10 > self.index.len() * 7 {
                self.reindex(Self::cap_for(self.live * 2));
            } else {
                self.place(self.ring.len() - 1);
            }
        }
    }

    /// New bases for `n` and `ts` that hold every slot and the key about to
    /// be pushed, if the ranges fit; otherwise no new try for a while.
    fn rebase(&mut self, n: u64, ts: u64, abs: u64) {
        let all: Vec<(u64, u64)> = (0..self.ring.len()).map(|p| self.nts_at(p)).collect();
        let (lo_n, hi_n) = all.iter().fold((n, n), |(lo, hi), &(x, _)| (lo.min(x), hi.max(x)));
        let (lo_ts, hi_ts) = all.iter().fold((ts, ts), |(lo, hi), &(_, x)| (lo.min(x), hi.max(x)));
        if hi_n - lo_n >= u64::from(WIDE) || hi_ts - lo_ts >= u64::from(WIDE) {
            self.rebase_from = abs + (self.ring.len() as u64).max(64);
            return;
        }
        (self.base_n, self.base_ts) = (lo_n, lo_ts);
        self.wide.clear();
        for (s, (x, t)) in self.ring.iter_mut().zip(all) {
            s.n = (x - lo_n) as u32;
            s.ts = (t - lo_ts) as u32;
        }
    }

    /// A new base for acceptance times so that `at` fits; slots older than
    /// the range are rounded up to its start (kept longer, never shorter;
    /// the range is at least four dedup windows, so they are long expired).
    fn rebase_at(&mut self, at: u64) {
        let oldest = (0..self.ring.len()).filter(|&p| self.is_live(p)).map(|p| self.at_at(p)).min().unwrap_or(at);
        let base = oldest.max(at - (u64::from(DEAD) - 1));
        let old = self.base_at;
        for s in self.ring.iter_mut().filter(|s| s.at != DEAD) {
            s.at = (old + u64::from(s.at)).saturating_sub(base) as u16;
        }
        self.base_at = base;
    }

    /// Forget the live slot at `p`.
    fn kill(&mut self, p: usize) {
        if self.unsorted.is_some() {
            let (i, _) = self.find_indexed(self.n_at(p)).expect("a live slot is indexed");
            self.unindex(i);
        }
        self.ring[p].at = DEAD;
        self.live -= 1;
        self.trim();
    }

    /// Drop dead slots from the front (their blocks go back as they empty);
    /// compact when dead slots are half the ring (a BTHome sensor's packet
    /// key is remembered again with every advert).
    fn trim(&mut self) {
        while self.ring.front().is_some_and(|s| s.at == DEAD) {
            if self.ring[0].n == WIDE {
                self.wide.remove(&self.head);
            }
            self.ring.pop_front();
            self.head += 1;
        }
        if self.unsorted.is_some_and(|u| u < self.head) {
            self.unsorted = None;
            self.index = Vec::new();
        }
        let dead = self.ring.len() - self.live;
        if dead > 64 && dead > self.live {
            self.compact();
        }
    }

    /// Rebuild with the live slots only.
    fn compact(&mut self) {
        // With a unit of 1, `at_ms` is the acceptance time in units.
        let keep: Vec<Entry> = (0..self.ring.len()).filter(|&p| self.is_live(p)).map(|p| self.entry(p, 1)).collect();
        *self = Keys::default();
        for e in keep {
            self.push(e.n, e.ts, e.fp, e.at_ms);
        }
    }

    fn bytes(&self) -> usize {
        std::mem::size_of::<Keys>()
            + self.ring.capacity() * std::mem::size_of::<Slot>()
            + self.ring.blocks.capacity() * 8
            + self.index.capacity() * 4
            + self.wide.capacity() * (std::mem::size_of::<(u64, (u64, u64))>() + 1)
    }
}

/// A device's remembered keys: one [`Keys`] per stream, and the streams'
/// oldest keys in order (for eviction by age and count). About 14 bytes per
/// key; a std `HashMap` of keys plus an order queue took ~200, a ring of
/// 32-byte slots with a `u32` index ~40 (issue 18).
#[derive(Default, Debug)]
struct DeviceKeys {
    /// `max_per_device`.
    max: usize,
    /// Acceptance times are kept in units of this many ms (a 16,384th of
    /// the dedup window, at least 1: 37 ms for the default 10 minutes).
    unit_ms: u64,
    sensors: Vec<String>,
    sensor_idx: HashMap<String, u32>,
    streams: Vec<Stream>,
    stream_idx: HashMap<Stream, u32>,
    /// By stream number.
    keys: Vec<Keys>,
    /// `(acceptance time of the front key, stream)` for every stream with keys.
    fronts: BTreeSet<(u64, u32)>,
    /// Live keys, all streams.
    live: usize,
}

impl DeviceKeys {
    fn new(max: usize, unit_ms: u64) -> Self {
        DeviceKeys { max, unit_ms: unit_ms.max(1), ..Default::default() }
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
        self.stream_of(st)
    }

    fn stream_of(&mut self, st: Stream) -> u32 {
        if let Some(&i) = self.stream_idx.get(&st) {
            return i;
        }
        let i = self.streams.len() as u32;
        self.streams.push(st);
        self.keys.push(Keys::default());
        self.stream_idx.insert(st, i);
        i
    }

    /// The stream, without interning it.
    fn find_stream(&self, sensor: &str, kind: u8, boot: Option<u32>) -> Option<u32> {
        let sensor = *self.sensor_idx.get(sensor)?;
        self.stream_idx.get(&Stream { sensor, kind, boot }).copied()
    }

    fn front(&self, s: u32) -> Option<(u64, u32)> {
        let k = &self.keys[s as usize];
        (!k.ring.is_empty()).then(|| (k.at_at(0), s))
    }

    /// Change stream `s`'s keys, keeping the count and the fronts in step.
    fn edit<R>(&mut self, s: u32, f: impl FnOnce(&mut Keys) -> R) -> R {
        let before = self.front(s);
        let live = self.keys[s as usize].live;
        let r = f(&mut self.keys[s as usize]);
        self.live = self.live - live + self.keys[s as usize].live;
        let after = self.front(s);
        if before != after {
            if let Some(b) = before {
                self.fronts.remove(&b);
            }
            if let Some(a) = after {
                self.fronts.insert(a);
            }
        }
        r
    }

    fn get(&self, stream: u32, n: u64) -> Option<Entry> {
        let k = &self.keys[stream as usize];
        k.find(n).map(|p| k.entry(p, self.unit_ms))
    }

    fn insert(&mut self, stream: u32, n: u64, fp: u32, ts: u64, at_ms: u64) {
        let at = at_ms.div_ceil(self.unit_ms);
        if let Some(p) = self.keys[stream as usize].find(n) {
            self.edit(stream, |k| k.kill(p));
        } else if self.live >= self.max {
            self.evict_oldest();
        }
        self.edit(stream, |k| k.push(n, ts, fp, at));
    }

    fn evict_oldest(&mut self) {
        if let Some(&(_, s)) = self.fronts.first() {
            self.edit(s, |k| k.kill(0));
        }
    }

    fn forget(&mut self, stream: u32, n: u64) {
        if let Some(p) = self.keys[stream as usize].find(n) {
            self.edit(stream, |k| k.kill(p));
        }
    }

    fn prune(&mut self, oldest_ms: u64, max: usize) {
        while let Some(&(at, _)) = self.fronts.first() {
            if at * self.unit_ms >= oldest_ms && self.live <= max {
                break;
            }
            self.evict_oldest();
        }
        // Streams without keys (an old boot's) are dropped once they are
        // half of many. (A stream has keys iff it has a front.)
        let empty = self.streams.len() - self.fronts.len();
        if self.streams.len() > 64 && empty * 2 > self.streams.len() {
            let keys = std::mem::take(&mut self.keys);
            let streams = std::mem::take(&mut self.streams);
            self.stream_idx.clear();
            self.fronts.clear();
            for (st, k) in streams.into_iter().zip(keys).filter(|(_, k)| k.live > 0) {
                let i = self.streams.len() as u32;
                self.stream_idx.insert(st, i);
                self.streams.push(st);
                self.fronts.insert((k.at_at(0), i));
                self.keys.push(k);
            }
        }
    }

    /// A key from a state file (its sensor already interned by number).
    fn restore_key(&mut self, k: SnapKey) {
        if k.sensor as usize >= self.sensors.len() {
            return;
        }
        let stream = self.stream_of(Stream { sensor: k.sensor, kind: k.kind, boot: k.boot });
        self.insert(stream, k.n, k.fp, k.ts, k.at_ms);
    }

    fn bytes(&self) -> usize {
        self.keys.iter().map(Keys::bytes).sum::<usize>()
            + self.streams.capacity() * std::mem::size_of::<Stream>()
            + self.stream_idx.capacity() * (std::mem::size_of::<(Stream, u32)>() + 1)
            + self.fronts.len() * 32
            + self.sensors.iter().map(|s| s.capacity() * 2 + 56).sum::<usize>()
    }

    /// Live keys, stream by stream, each in acceptance order.
    fn live_keys(&self) -> impl Iterator<Item = (&Stream, Entry)> {
        self.keys.iter().zip(&self.streams).flat_map(move |(k, st)| {
            (0..k.ring.len()).filter(|&p| k.is_live(p)).map(move |p| (st, k.entry(p, self.unit_ms)))
        })
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
    /// Acceptance times are kept in units of this (see [`DeviceKeys`]).
    unit_ms: u64,
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
        let window_ms = window.as_millis() as u64;
        // 65,534 units reach at least four windows back.
        let unit_ms = window_ms.div_ceil(16_384).max(1);
        Dedup { window_ms, max_per_device, unit_ms, devices: HashMap::default() }
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
            None => self
                .devices
                .entry(r.device.clone())
                .or_insert_with(|| DeviceKeys::new(self.max_per_device, self.unit_ms)),
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
        let seen = dev.get(stream, n);
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
        let (max, unit) = (self.max_per_device, self.unit_ms);
        let dev = self.devices.entry(r.device.clone()).or_insert_with(|| DeviceKeys::new(max, unit));
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

    /// Forget everything (a state file that could not be read to its end).
    pub fn clear(&mut self) {
        self.devices.clear();
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

    /// The checkpoint's state as an owned copy, devices by name (the
    /// checkpoint itself serializes [`Dedup::view`], without the copy).
    #[cfg(test)]
    pub fn snapshot(&mut self, now_ms: u64) -> DedupSnapshot {
        self.prune(now_ms);
        let mut devices: Vec<SnapDevice> = self
            .devices
            .iter()
            .map(|(name, d)| SnapDevice {
                name: name.clone(),
                sensors: d.sensors.clone(),
                keys: d.live_keys().map(|(st, e)| SnapKey::of(st, e)).collect(),
            })
            .collect();
        devices.sort_by(|a, b| a.name.cmp(&b.name));
        DedupSnapshot { devices }
    }

    /// The state for the checkpoint, serialized straight from the rings in
    /// [`DedupSnapshot`]'s format: a copy of every key (48 bytes each, ~15
    /// MiB at 20 devices × 16,384 keys) was most of the gateway's peak heap
    /// (issue 18, heaptrack). Prunes first.
    pub fn view(&mut self, now_ms: u64) -> DedupView<'_> {
        self.prune(now_ms);
        DedupView(self, false)
    }

    /// [`Dedup::view`] with only the keys a replay of the queue's records
    /// cannot rebuild ([`Dedup::remember`]): BTHome packet ids, which the
    /// records do not carry.
    pub fn view_unrecorded(&mut self, now_ms: u64) -> DedupView<'_> {
        self.prune(now_ms);
        DedupView(self, true)
    }

    /// `dedup_window`, in ms.
    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// Restore an owned snapshot (state files of formats 1 and 2; format 3
    /// is read straight in through [`DedupSeed`]).
    pub fn restore(&mut self, snap: DedupSnapshot) {
        for d in snap.devices {
            let mut keys = DeviceKeys::new(self.max_per_device, self.unit_ms);
            for s in &d.sensors {
                keys.sensor(s);
            }
            for k in d.keys {
                keys.restore_key(k);
            }
            self.devices.insert(d.name, keys);
        }
    }
}

/// Reads the dedup part of a state file straight into a [`Dedup`], key by
/// key: the owned snapshot (48 bytes a key, ~15 MiB at 20 devices × 16,384
/// keys) was most of a restart's peak memory (issue 18, the uplink bench's
/// backlog run). `delta`: the keys are [`DeltaKey`]s (state format 4), else
/// [`SnapKey`]s (format 3, a [`DedupSnapshot`]).
pub struct DedupSeed<'a> {
    pub dedup: &'a mut Dedup,
    pub delta: bool,
}

impl<'de> serde::de::DeserializeSeed<'de> for DedupSeed<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        use serde::de::{SeqAccess, Visitor};
        use std::fmt;
        struct Top<'a>(&'a mut Dedup, bool);
        struct Devices<'a>(&'a mut Dedup, bool);
        struct Device<'a>(&'a mut Dedup, bool);
        struct KeysOf<'a>(&'a mut DeviceKeys, bool);
        fn missing<E: serde::de::Error>(what: &str) -> E {
            E::custom(format_args!("dedup state: {what} missing"))
        }
        impl<'de> Visitor<'de> for Top<'_> {
            type Value = ();
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a dedup snapshot")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
                seq.next_element_seed(Devices(self.0, self.1))?.ok_or_else(|| missing("devices"))
            }
        }
        impl<'de> serde::de::DeserializeSeed<'de> for Devices<'_> {
            type Value = ();
            fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
                de.deserialize_seq(self)
            }
        }
        impl<'de> Visitor<'de> for Devices<'_> {
            type Value = ();
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("dedup devices")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
                while seq.next_element_seed(Device(&mut *self.0, self.1))?.is_some() {}
                Ok(())
            }
        }
        impl<'de> serde::de::DeserializeSeed<'de> for Device<'_> {
            type Value = ();
            fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
                de.deserialize_struct("SnapDevice", &["name", "sensors", "keys"], self)
            }
        }
        impl<'de> Visitor<'de> for Device<'_> {
            type Value = ();
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a dedup device")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
                let name: String = seq.next_element()?.ok_or_else(|| missing("device name"))?;
                let sensors: Vec<String> = seq.next_element()?.ok_or_else(|| missing("sensors"))?;
                let mut keys = DeviceKeys::new(self.0.max_per_device, self.0.unit_ms);
                for s in &sensors {
                    keys.sensor(s);
                }
                seq.next_element_seed(KeysOf(&mut keys, self.1))?.ok_or_else(|| missing("keys"))?;
                if keys.live > 0 {
                    self.0.devices.insert(name, keys);
                }
                Ok(())
            }
        }
        impl<'de> serde::de::DeserializeSeed<'de> for KeysOf<'_> {
            type Value = ();
            fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
                de.deserialize_seq(self)
            }
        }
        impl<'de> Visitor<'de> for KeysOf<'_> {
            type Value = ();
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("dedup keys")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
                if !self.1 {
                    while let Some(k) = seq.next_element::<SnapKey>()? {
                        self.0.restore_key(k);
                    }
                    return Ok(());
                }
                let mut prev = Prev::default();
                while let Some(k) = seq.next_element::<DeltaKey>()? {
                    let k = prev.decode(k).ok_or_else(|| missing::<A::Error>("the first key's stream"))?;
                    self.0.restore_key(k);
                }
                Ok(())
            }
        }
        de.deserialize_struct("DedupSnapshot", &["devices"], Top(self.dedup, self.delta))
    }
}

/// [`Dedup`] serialized in state format 4 without building a copy: a
/// [`DedupSnapshot`]'s shape with each key a [`DeltaKey`]; with `true`, the
/// packet keys only ([`Dedup::view_unrecorded`]).
pub struct DedupView<'a>(&'a Dedup, bool);

impl Serialize for DedupView<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeSeq, SerializeStruct};
        struct Devices<'a>(&'a HashMap<String, DeviceKeys>, bool);
        struct Device<'a>(&'a str, &'a DeviceKeys, bool);
        struct KeyList<'a>(&'a DeviceKeys, bool);
        impl Serialize for Devices<'_> {
            fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                let mut seq = ser.serialize_seq(Some(self.0.len()))?;
                for (name, d) in self.0 {
                    seq.serialize_element(&Device(name, d, self.1))?;
                }
                seq.end()
            }
        }
        impl Serialize for Device<'_> {
            fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                let mut st = ser.serialize_struct("SnapDevice", 3)?;
                st.serialize_field("name", self.0)?;
                st.serialize_field("sensors", &self.1.sensors)?;
                st.serialize_field("keys", &KeyList(self.1, self.2))?;
                st.end()
            }
        }
        impl Serialize for KeyList<'_> {
            fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                let only_packets = self.1;
                let keys = || self.0.live_keys().filter(move |(st, _)| !only_packets || st.kind == KIND_PACKET);
                let len = if only_packets { keys().count() } else { self.0.live };
                let mut seq = ser.serialize_seq(Some(len))?;
                let mut prev = Prev::default();
                for (st, e) in keys() {
                    seq.serialize_element(&prev.encode(st, e))?;
                }
                seq.end()
            }
        }
        let mut st = ser.serialize_struct("DedupSnapshot", 1)?;
        st.serialize_field("devices", &Devices(&self.0.devices, self.1))?;
        st.end()
    }
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Clone)]
pub struct DedupSnapshot {
    devices: Vec<SnapDevice>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Clone)]
struct SnapDevice {
    name: String,
    sensors: Vec<String>,
    keys: Vec<SnapKey>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Clone)]
struct SnapKey {
    sensor: u32,
    kind: u8,
    boot: Option<u32>,
    n: u64,
    fp: u32,
    ts: u64,
    at_ms: u64,
}

impl SnapKey {
    fn of(st: &Stream, e: Entry) -> SnapKey {
        SnapKey { sensor: st.sensor, kind: st.kind, boot: st.boot, n: e.n, fp: e.fp, ts: e.ts, at_ms: e.at_ms }
    }
}

/// One key of a format-4 state file: its `n`, `ts` and acceptance time as
/// differences from the key before it in its device's list (the first from
/// zero; wrapping, so any `u64` round-trips), its stream only where it
/// differs from the key before's. A device counting up costs ~8 bytes a key
/// (the fingerprint's 4 and one or two for each difference) against ~23 in
/// format 3; the state file is rewritten whole at every checkpoint, ~0.5
/// bytes written per encoded byte at a site's pace before (issue 18).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct DeltaKey {
    stream: Option<(u32, u8, Option<u32>)>,
    dn: i64,
    dts: i64,
    fp: [u8; 4],
    dat: i64,
}

/// The key before, while a device's [`DeltaKey`]s are written or read.
#[derive(Default)]
struct Prev {
    stream: Option<Stream>,
    n: u64,
    ts: u64,
    at_ms: u64,
}

impl Prev {
    fn encode(&mut self, st: &Stream, e: Entry) -> DeltaKey {
        let stream = (self.stream != Some(*st)).then_some((st.sensor, st.kind, st.boot));
        let k = DeltaKey {
            stream,
            dn: e.n.wrapping_sub(self.n) as i64,
            dts: e.ts.wrapping_sub(self.ts) as i64,
            fp: e.fp.to_le_bytes(),
            dat: e.at_ms.wrapping_sub(self.at_ms) as i64,
        };
        *self = Prev { stream: Some(*st), n: e.n, ts: e.ts, at_ms: e.at_ms };
        k
    }

    /// `None` if the first key names no stream (a damaged file).
    fn decode(&mut self, k: DeltaKey) -> Option<SnapKey> {
        if let Some((sensor, kind, boot)) = k.stream {
            self.stream = Some(Stream { sensor, kind, boot });
        }
        let st = self.stream?;
        self.n = self.n.wrapping_add(k.dn as u64);
        self.ts = self.ts.wrapping_add(k.dts as u64);
        self.at_ms = self.at_ms.wrapping_add(k.dat as u64);
        let e = Entry { n: self.n, ts: self.ts, fp: u32::from_le_bytes(k.fp), at_ms: self.at_ms };
        Some(SnapKey::of(&st, e))
    }
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

    /// The per-stream rings, their bases and their indexes against the
    /// plainest model of what they keep (a list in acceptance order, one
    /// entry per key), through inserts in order (found by position or
    /// binary search), out of order (indexed), repeats, values far apart
    /// (new bases, or kept wide), forgets and prunes that grow, shrink and
    /// compact them.
    /// Planted while writing: `unindex` without the backward shift (a plain
    /// hole) → lookups past the hole miss and this fails.
    mod rings_and_indexes {
        use super::super::*;
        use proptest::prelude::*;

        #[derive(Clone, Debug)]
        enum Op {
            /// The stream's next n (its largest so far + 1).
            Next(u32, u32),
            Insert(u32, u64, u32),
            /// Anywhere in u64: offsets do not fit.
            Far(u32, u64, u32),
            Forget(u32, u64),
            Prune(u64, usize),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                8 => (0..4u32, any::<u32>()).prop_map(|(s, fp)| Op::Next(s, fp)),
                4 => (0..4u32, 0..300u64, any::<u32>()).prop_map(|(s, n, fp)| Op::Insert(s, n, fp)),
                1 => (0..4u32, any::<u64>(), any::<u32>()).prop_map(|(s, n, fp)| Op::Far(s, n, fp)),
                1 => (0..4u32, 0..300u64).prop_map(|(s, n)| Op::Forget(s, n)),
                1 => (0..400u64, 1..400usize).prop_map(|(w, m)| Op::Prune(w, m)),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]
            #[test]
            fn keep_what_a_list_keeps(ops in proptest::collection::vec(op(), 1..1500)) {
                let mut d = DeviceKeys::new(200, 1);
                for s in 0..4 {
                    d.stream(&format!("s{s}"), KIND_SEQ, None);
                }
                let ts_of = |n: u64| n ^ 7;
                let mut top = [0u64; 4];
                // (stream, n, fp, at)
                let mut model: Vec<(u32, u64, u32, u64)> = Vec::new();
                for (t, op) in ops.into_iter().enumerate() {
                    let now = t as u64;
                    let insert = match op {
                        Op::Next(s, fp) => Some((s, top[s as usize].saturating_add(1), fp)),
                        Op::Insert(s, n, fp) | Op::Far(s, n, fp) => Some((s, n, fp)),
                        _ => None,
                    };
                    match op {
                        Op::Next(..) | Op::Insert(..) | Op::Far(..) => {
                            let (s, n, fp) = insert.unwrap();
                            model.retain(|e| (e.0, e.1) != (s, n));
                            model.push((s, n, fp, now));
                            if model.len() > 200 {
                                model.remove(0);
                            }
                            top[s as usize] = top[s as usize].max(n);
                            d.insert(s, n, fp, ts_of(n), now);
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
                    let mut kept: Vec<(u32, u64, u32, u64)> =
                        d.live_keys().map(|(st, e)| (st.sensor, e.n, e.fp, e.at_ms)).collect();
                    kept.sort_by_key(|e| e.3);
                    prop_assert_eq!(&kept, &model);
                    for &(s, n, fp, at) in &model {
                        let got = d.get(s, n).map(|x| (x.fp, x.ts, x.at_ms));
                        prop_assert_eq!(got, Some((fp, ts_of(n), at)), "key ({}, {}) lost", s, n);
                    }
                    for s in 0..4u32 {
                        let k = &d.keys[s as usize];
                        prop_assert!(k.ring.front().is_none_or(|x| x.at != DEAD), "a dead front");
                        prop_assert!(k.ring.len() <= 2 * k.live + 65, "dead slots pile up: {} for {}", k.ring.len(), k.live);
                        prop_assert!(k.ring.capacity() < k.ring.len() + 2 * BLOCK, "blocks kept: {} for {}", k.ring.capacity(), k.ring.len());
                        for n in [top[s as usize].saturating_add(1), top[s as usize].saturating_add(1000), u64::MAX] {
                            prop_assert!(model.iter().any(|e| (e.0, e.1) == (s, n)) || d.get(s, n).is_none());
                        }
                    }
                    let fronts: BTreeSet<(u64, u32)> = (0..4).filter_map(|s| d.front(s)).collect();
                    prop_assert_eq!(&fronts, &d.fronts);
                }
            }
        }
    }

    /// Acceptance times far apart: a new base for them, and a key older than
    /// the range is kept (rounded up), never dropped early.
    #[test]
    fn acceptance_times_get_a_new_base() {
        let mut d = DeviceKeys::new(100, 1);
        let s = d.stream("hr", KIND_SEQ, None);
        d.insert(s, 1, 9, 1, 10);
        d.insert(s, 2, 9, 2, 60_000);
        d.insert(s, 3, 9, 3, 100_000);
        assert_eq!(d.get(s, 3).unwrap().at_ms, 100_000);
        assert_eq!(d.get(s, 2).unwrap().at_ms, 60_000);
        assert_eq!(d.get(s, 1).unwrap().at_ms, 100_000 - 65_534, "rounded up to the range");
        d.prune(50_000, 100);
        assert!(d.get(s, 1).is_none() && d.get(s, 2).is_some());
        // Units: a time is rounded up to the next unit.
        let mut d = DeviceKeys::new(100, 37);
        let s = d.stream("hr", KIND_SEQ, None);
        d.insert(s, 1, 9, 1, 1000);
        assert_eq!(d.get(s, 1).unwrap().at_ms, 28 * 37, "1000 ms is 27.03 units, kept as 28");
    }

    /// A hostile device (a new boot id every reading) cannot pile up
    /// streams: empty ones are dropped once they are most of them.
    #[test]
    fn streams_of_old_boots_are_dropped() {
        let mut d = Dedup::new(Duration::from_secs(10), 100);
        for i in 0..10_000u64 {
            let mut x = r("a", "hr", Some(1), i, 1.0);
            x.boot = Some(i as u32);
            assert_eq!(d.check(&x, true, i * 100), Verdict::Accept);
        }
        let dev = &d.devices["a"];
        assert!(dev.streams.len() <= 200, "{} streams", dev.streams.len());
        assert_eq!(dev.live, 100);
        let mut x = r("a", "hr", Some(1), 9_999, 1.0);
        x.boot = Some(9_999);
        assert_eq!(d.check(&x, true, 1_000_000), Verdict::Duplicate);
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
        assert!(per_key <= 16.0, "{per_key:.1} bytes per key (14.x when written)");
    }

    /// The checkpoint serializes the rings directly in format 4 (keys as
    /// differences); a restart reads that, and format 3 (the owned
    /// snapshot's shape) still, straight into the rings: the same state
    /// either way. Seen failing with the stream not written when it changes.
    #[test]
    fn the_streamed_view_reads_back_as_the_same_state_in_formats_4_and_3() {
        use serde::de::DeserializeSeed;
        let mut d = Dedup::new(Duration::from_secs(60), 100);
        for i in 0..150 {
            let mut x = r(if i % 3 == 0 { "a" } else { "b" }, if i % 2 == 0 { "hr" } else { "t" }, Some(i), i, 1.0);
            x.boot = (i % 5 == 0).then_some(7);
            d.check(&x, true, 1000 + i);
        }
        d.forget(&r("b", "t", Some(149), 149, 1.0));
        let want = d.snapshot(1100);
        let read = |bytes: &[u8], delta: bool| {
            let mut f = Dedup::new(Duration::from_secs(60), 100);
            DedupSeed { dedup: &mut f, delta }.deserialize(&mut postcard::Deserializer::from_bytes(bytes)).unwrap();
            f
        };
        let v4 = postcard::to_allocvec(&d.view(1100)).unwrap();
        let v3 = postcard::to_allocvec(&want).unwrap();
        for (what, bytes, delta) in [("format 4", &v4, true), ("format 3", &v3, false)] {
            let mut f = read(bytes, delta);
            assert_eq!(f.len(), d.len(), "{what}");
            assert_eq!(f.snapshot(1100), want, "{what}");
            assert_eq!(f.check(&r("a", "hr", Some(144), 144, 1.0), true, 1200), Verdict::Duplicate, "{what}");
            assert_eq!(
                f.check(&r("b", "t", Some(149), 149, 1.0), true, 1200),
                Verdict::Accept,
                "{what}: forgotten stays forgotten"
            );
        }
        let mut e = Dedup::new(Duration::from_secs(60), 100);
        e.restore(want.clone());
        assert_eq!(e.snapshot(1100), want, "restore (formats 2 and 1) agrees");
        assert!(v4.len() < v3.len(), "format 4 {} bytes, format 3 {}", v4.len(), v3.len());
    }

    /// Format 4 round-trips any key: every kind, boot ids, values that jump
    /// back, far, to the ends of u64 (a format-1 key's unknown ts), streams
    /// interleaved. Keys go in through `restore` (as a state file would put
    /// them) and come out of the rings. Seen failing with `dts` taken from
    /// `n` and with the stream not written when it changes.
    #[test]
    fn format_4_round_trips_keys_far_apart() {
        use serde::de::DeserializeSeed;
        let mut rng = crate::rng::XorShift::new(0x5eed);
        let big = |rng: &mut crate::rng::XorShift| match rng.next_u64() % 4 {
            0 => rng.next_u64(),
            1 => u64::MAX - rng.next_u64() % 3,
            2 => rng.next_u64() % 3,
            _ => 1_700_000_000_000 + rng.next_u64() % 1_000_000,
        };
        let mut devices = Vec::new();
        for dev in 0..4 {
            let mut keys = Vec::new();
            for _ in 0..300 {
                let kind = (rng.next_u64() % 3) as u8;
                keys.push(SnapKey {
                    sensor: (rng.next_u64() % 3) as u32,
                    kind,
                    boot: (rng.next_u64() % 2 == 0).then(|| rng.next_u64() as u32),
                    n: if kind == KIND_PACKET { 0 } else { big(&mut rng) },
                    fp: rng.next_u64() as u32,
                    ts: if rng.next_u64() % 10 == 0 { TS_UNKNOWN } else { big(&mut rng) },
                    at_ms: 1_000_000 + rng.next_u64() % 50_000,
                });
            }
            devices.push(SnapDevice {
                name: format!("dev-{dev}"),
                sensors: vec!["hr".into(), "t".into(), "spo2".into()],
                keys,
            });
        }
        let mut d = Dedup::new(Duration::from_secs(600), 1_000);
        d.restore(DedupSnapshot { devices });
        assert!(d.len() > 800, "{} keys restored", d.len());
        let want = d.snapshot(1_050_000);
        let bytes = postcard::to_allocvec(&d.view(1_050_000)).unwrap();
        let mut f = Dedup::new(Duration::from_secs(600), 1_000);
        DedupSeed { dedup: &mut f, delta: true }.deserialize(&mut postcard::Deserializer::from_bytes(&bytes)).unwrap();
        let got = f.snapshot(1_050_000);
        // Restoring rounds acceptance times up to the rings' unit again (a
        // key may live up to a unit longer after a restart, in any format):
        // compare with the same keys restored from the owned snapshot.
        let mut e = Dedup::new(Duration::from_secs(600), 1_000);
        e.restore(want.clone());
        let want = e.snapshot(1_050_000);
        for (g, w) in got.devices.iter().zip(&want.devices) {
            assert_eq!(g.keys.len(), w.keys.len(), "{}", w.name);
            if let Some(i) = (0..w.keys.len()).find(|&i| g.keys[i] != w.keys[i]) {
                panic!("{} key {i}: {:?} read back as {:?}", w.name, w.keys[i], g.keys[i]);
            }
        }
        assert_eq!(got, want);
    }

    /// A first key without its stream is a damaged file, refused, not a
    /// panic or keys put in a stream nobody named.
    #[test]
    fn a_format_4_device_whose_first_key_names_no_stream_is_refused() {
        use serde::de::DeserializeSeed;
        let k = DeltaKey { stream: None, dn: 1, dts: 1, fp: [0; 4], dat: 1 };
        let snap = (vec![(String::from("a"), vec![String::from("hr")], vec![k])],);
        let bytes = postcard::to_allocvec(&snap).unwrap();
        let mut f = Dedup::new(Duration::from_secs(60), 100);
        let r = DedupSeed { dedup: &mut f, delta: true }.deserialize(&mut postcard::Deserializer::from_bytes(&bytes));
        // (postcard keeps no message for a custom error)
        assert!(r.is_err(), "a damaged file");
    }

    /// Issue 18: what a checkpoint writes per remembered key at a site's
    /// pace (readings 100 ms apart, seqs counting up, one boot).
    #[test]
    fn format_4_bytes_per_key() {
        let mut d = Dedup::new(Duration::from_secs(600), 16_384);
        let t0 = 1_764_900_000_000u64;
        for dev in 0..20 {
            for i in 0..6_000u64 {
                let mut x =
                    r(&format!("wrist-{dev:02}"), "hr", Some(1_000_000 + i), t0 + i * 100, (60 + i % 40) as f64);
                x.boot = Some(3);
                d.check(&x, true, t0 + i * 100 + 5);
            }
        }
        let now = t0 + 600_000;
        let v4 = postcard::to_allocvec(&d.view(now)).unwrap().len() as f64 / d.len() as f64;
        let v3 = postcard::to_allocvec(&d.snapshot(now)).unwrap().len() as f64 / d.len() as f64;
        println!("state file: {v4:.2} bytes per key in format 4, {v3:.2} in format 3");
        assert!(v4 <= 10.5, "{v4:.2} bytes per key");
    }
}
