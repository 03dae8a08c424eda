//! Turns durable readings into cumulative acks for the devices.
//!
//! An ack `(device, seq)` promises: every reading of `device` with a seq up
//! to `seq` is on disk. The device then forgets them, so an ack that runs
//! ahead of the disk loses data at the next power cut. Hence:
//!
//! * acks are computed only from readings the queue has *committed*;
//! * the acked seq is a *contiguous* watermark: if seq 15 never arrived
//!   (garbled on the wire) while 16 and 17 did, the ack stays at 14 and the
//!   device's resend brings 15; only if the gap outlives `gap_timeout` *of
//!   the device talking* does the gateway assume 15 never existed and move
//!   on. A device that is away (unplugged, out of range) is never skipped
//!   past: when it comes back its resend fills the gap. A device that keeps
//!   resending for the whole timeout without 15 does not have it;
//! * a durable seq at or below the watermark is already covered and changes
//!   nothing. Such a reading gets past dedup when it is a stale resend whose
//!   key was forgotten (window or memory bound), and a stale resend must not
//!   drag the watermark back;
//! * the one exception is a device that restarted its counter: an accepted
//!   seq at or below the watermark whose *device* timestamp is newer than any
//!   seen from it. Then the watermark restarts below that seq, because the
//!   old high ack would cover readings the new incarnation has not sent yet
//!   (a lower ack is always safe; a higher one is not). Without device
//!   timestamps a counter restart cannot be told from a stale resend, so
//!   devices without `ts` must not reset `seq` (docs/firmware-protocol.md);
//! * a device the gateway knows nothing about starts its watermark at its
//!   first durable seq: devices send oldest first, so nothing below it is
//!   pending. Except right after a restart: the previous run may have
//!   received (and lost, unacked) older readings of a device it never made
//!   durable, and the device may send a new reading before resending those.
//!   A device met for the first time after a restart cannot be told from
//!   such a one, so its first durable seqs wait as an open gap below them,
//!   filled by its resend or given up after `gap_timeout` of it talking
//!   (found by the pipeline's model-based test). That costs each new device
//!   one such wait per gateway lifetime, since the state persists;
//! * a seq the queue refused (full, `reject_new`) is known to exist and to be
//!   held by the device: no gap below it is ever given up on, however long
//!   the queue stays full (found by the model-based test);
//! * a duplicate means the device missed an ack, so the current watermark is
//!   sent again after the next commit.

use super::HashMap;
use crate::reading::{Ack, Origin};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Who an ack speaks for: a device, and its boot when its firmware sends one
/// (seqs count within a boot, so each boot has a watermark of its own).
type Who = (String, Option<u32>);

/// [`Who`], borrowed: a device's entry is found without building a key
/// (the lookup runs three times a reading; a `String` each time was three
/// allocations a reading in the uplink bench's heap profile, issue 18).
trait WhoRef {
    fn who(&self) -> (&str, Option<u32>);
}

impl WhoRef for Who {
    fn who(&self) -> (&str, Option<u32>) {
        (&self.0, self.1)
    }
}

impl WhoRef for (&str, Option<u32>) {
    fn who(&self) -> (&str, Option<u32>) {
        *self
    }
}

impl<'a> std::borrow::Borrow<dyn WhoRef + 'a> for Who {
    fn borrow(&self) -> &(dyn WhoRef + 'a) {
        self
    }
}

/// Hashes as `Who` does: a `&str` hashes as the `String` it borrows.
impl std::hash::Hash for dyn WhoRef + '_ {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.who().hash(h)
    }
}

impl PartialEq for dyn WhoRef + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.who() == other.who()
    }
}

impl Eq for dyn WhoRef + '_ {}

#[derive(Debug, Default)]
struct DeviceAck {
    watermark: Option<u64>,
    /// Newest device timestamp seen, to tell a counter restart from a stale resend.
    max_ts: u64,
    /// Durable seqs above `watermark + 1`, waiting for the gap to fill.
    above: BTreeSet<u64>,
    gap_since_ms: Option<u64>,
    origin: Option<Origin>,
    dirty: bool,
    /// When the device last sent anything (new or resent).
    last_seen_ms: u64,
    /// Seqs the queue refused (full) and that have not become durable since:
    /// the device still holds them, so no gap below them is ever given up on.
    refused: BTreeSet<u64>,
    /// Ranges at or below the watermark that were given up on, never stored:
    /// a reading in one is stored if it ever comes (the device did hold it),
    /// not answered as "already covered". Bounded by [`MAX_SKIPPED`].
    skipped: Vec<(u64, u64)>,
    /// The incarnation before a counter restart: `(highest seq, newest ts)`.
    /// A reading no newer than it is the old incarnation's: at or below its
    /// highest seq it is a stale resend, and it never moves this watermark.
    prev: Option<(u64, u64)>,
    /// Highest seq accepted in this incarnation (durable or not yet).
    max_seq: Option<u64>,
}

/// What a reading dedup let through is, as far as the acks know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not stored yet: queue it.
    New,
    /// Already covered by an ack (durable earlier, its dedup key forgotten):
    /// answer with the ack again, do not store it twice.
    Covered,
}

/// Silence longer than this means the device was away: a gap's clock restarts.
const AWAY_MS: u64 = 5_000;

/// [`AWAY_MS`], or half the gap timeout if that is less: with a timeout of
/// 2 s, a device that sent a reading and then fell silent for 4 s had its gap
/// given up on at its next word, without having resent anything (found by
/// the pipeline's model-based test once it ran a consumer that keeps up).
fn away_ms(gap_timeout_ms: u64) -> u64 {
    AWAY_MS.min(gap_timeout_ms / 2)
}

/// Bound on `above`: a device far ahead of a gap is not waited for forever
/// in memory either.
const MAX_ABOVE: usize = 65_536;

/// Bound on the skipped ranges kept per device (oldest forgotten first).
const MAX_SKIPPED: usize = 16;

/// Whether acks over this link are cumulative in the device's eyes (see
/// [`Origin::cumulative_acks`]). A serial (or unknown) link's device forgets
/// everything at or below an ack, so an
/// ack must never start above a seq the gateway did not see. LAN devices get
/// one MQTT ack per message, for that message only, so the front door can
/// use the watermark from the first durable seq on.
fn cumulative(origin: Option<Origin>) -> bool {
    origin.is_none_or(Origin::cumulative_acks)
}

impl DeviceAck {
    /// The highest seq this incarnation has shown: acked, durable or accepted.
    fn high(&self) -> Option<u64> {
        self.watermark.max(self.above.last().copied()).max(self.max_seq)
    }

    fn in_skipped(&self, seq: u64) -> bool {
        self.skipped.iter().any(|&(a, b)| a <= seq && seq <= b)
    }

    fn skip(&mut self, from: u64, to: u64) {
        if from > to {
            return;
        }
        if self.skipped.len() >= MAX_SKIPPED {
            self.skipped.remove(0);
        }
        self.skipped.push((from, to));
    }

    /// A skipped seq came after all and is being stored: from now on it is
    /// covered like any other.
    fn unskip(&mut self, seq: u64) {
        if let Some(i) = self.skipped.iter().position(|&(a, b)| a <= seq && seq <= b) {
            let (a, b) = self.skipped.remove(i);
            if a < seq {
                self.skipped.push((a, seq - 1));
            }
            if seq < b {
                self.skipped.push((seq + 1, b));
            }
            while self.skipped.len() > MAX_SKIPPED {
                self.skipped.remove(0);
            }
        }
    }

    /// A new incarnation of the device (its counter restarted): nothing of
    /// the old watermark applies, and nothing below its first seq is known.
    fn restart(&mut self) {
        if let Some(high) = self.high() {
            self.prev = Some((high, self.max_ts));
        }
        self.max_seq = None;
        self.watermark = None;
        self.above.clear();
        self.refused.clear();
        self.skipped.clear();
        self.gap_since_ms = None;
        self.dirty = true;
    }
}

pub struct AckTracker {
    gap_timeout_ms: u64,
    /// Each device's place in `slots`.
    index: HashMap<Who, usize>,
    /// The devices with their keys, in the order they were first seen.
    slots: Vec<(Who, DeviceAck)>,
    /// The slot found last. A reading's `route` and `accepted`, and mostly
    /// the next reading's (a port reads a device's frames in bursts), find
    /// it again without hashing: two lookups per call here were ~3 % of the
    /// gateway's CPU in the uplink bench (issue 18).
    last: usize,
    /// A device got its first watermark since the last checkpoint: until a
    /// checkpoint names it, a restart would hold it again for a gap timeout.
    newly_named: bool,
    /// A device's counter restart was detected since the last snapshot.
    restarted: bool,
    /// Seqs acked past because they never came (gap timeout), since start.
    pub skipped_seqs: u64,
}

impl AckTracker {
    pub fn new(gap_timeout: std::time::Duration) -> Self {
        AckTracker {
            gap_timeout_ms: gap_timeout.as_millis() as u64,
            index: HashMap::default(),
            slots: Vec::new(),
            last: 0,
            newly_named: false,
            restarted: false,
            skipped_seqs: 0,
        }
    }

    fn dev(&mut self, device: &str, boot: Option<u32>) -> &mut DeviceAck {
        // No allocation once the device is known: this runs per reading.
        let hit = self.slots.get(self.last).is_some_and(|((n, b), _)| *b == boot && n == device);
        if !hit {
            let key: &dyn WhoRef = &(device, boot);
            self.last = match self.index.get(key) {
                Some(&i) => i,
                None => {
                    // Once per device incarnation and gateway run: the journal's
                    // DEVICE= field finds it (`journalctl DEVICE=wrist-01`).
                    match boot {
                        Some(b) => tracing::info!(device, boot = b, "device {device} (boot {b}) seen"),
                        None => tracing::info!(device, "device {device} seen"),
                    }
                    let who = (device.to_string(), boot);
                    self.index.insert(who.clone(), self.slots.len());
                    self.slots.push((who, DeviceAck::default()));
                    self.slots.len() - 1
                }
            };
        }
        &mut self.slots[self.last].1
    }

    /// The device sent a reading over `origin` (acks go back there).
    pub fn route(&mut self, device: &str, boot: Option<u32>, origin: Origin, now_ms: u64) {
        let away = away_ms(self.gap_timeout_ms);
        let d = self.dev(device, boot);
        d.origin = Some(origin);
        if now_ms.saturating_sub(d.last_seen_ms) > away && d.gap_since_ms.is_some() {
            // Back from being away: the gap has to outlast a timeout of talk.
            d.gap_since_ms = Some(now_ms);
        }
        d.last_seen_ms = now_ms;
    }

    /// A reading dedup let through (not yet durable): is it new, or covered
    /// by an ack already? Detects a counter restart; see the module doc.
    pub fn accepted(&mut self, device: &str, boot: Option<u32>, seq: u64, ts: u64, ts_from_device: bool) -> Seen {
        let d = self.dev(device, boot);
        let mut restarted = false;
        // With a boot id, seqs never restart within it: the timestamp rule
        // is for devices without one. A seq at or below the highest this
        // incarnation showed, with a newer clock, is a new incarnation's
        // (a resend carries its old ts; a gap filled late is older than
        // what came after it).
        if ts_from_device && boot.is_none() {
            if d.prev.is_some_and(|(high, t)| seq <= high && ts <= t) {
                return Seen::Covered;
            }
            let newer = ts > d.max_ts;
            // (A skipped seq that comes late is older than what came after it.)
            if newer && d.high().is_some_and(|h| seq <= h) {
                tracing::info!(device, "device {device} restarted its counter (seq {seq} again, with a newer clock)");
                d.restart();
                restarted = true;
            }
            d.max_ts = d.max_ts.max(ts);
        }
        let seen = match d.watermark {
            Some(w) if seq <= w && !d.in_skipped(seq) => Seen::Covered,
            // Durable already, waiting above a gap (found by the model test).
            _ if d.above.contains(&seq) => Seen::Covered,
            _ => Seen::New,
        };
        if seen == Seen::New {
            d.max_seq = d.max_seq.max(Some(seq));
        }
        // A restart must reach the state file before anything of the new
        // incarnation is stored: replayed readings cannot tell incarnations
        // apart (found by the model test). See `take_restarted`.
        self.restarted |= restarted;
        seen
    }

    /// Dedup remembers this seq of the device with another device `ts`: a new
    /// incarnation reused it, whatever the clocks say (two reboots in a row
    /// can make a new incarnation's first readings look older than the last
    /// one's; found by the model test). For devices without boot id.
    ///
    /// `old_ts` is the ts the seq was remembered with: only a conflict
    /// inside the current incarnation (newer than its start) is a restart; a
    /// key of an incarnation already left behind says nothing (the current
    /// one's late first frame reusing it, found by the model test).
    pub fn reused(&mut self, device: &str, ts: u64, old_ts: u64) {
        let d = self.dev(device, None);
        if d.prev.is_some_and(|(_, t)| old_ts <= t) {
            return;
        }
        tracing::info!(device, "device {device} restarted its counter (a seq reused with another timestamp)");
        d.restart();
        // Older than this reading is the old incarnation's; this one (and
        // anything newer) is the new one's.
        if let Some(p) = d.prev.as_mut() {
            p.1 = p.1.min(ts.saturating_sub(1));
        }
        d.max_ts = d.max_ts.max(ts);
        self.restarted = true;
    }

    /// A reading of `device` with `seq` is now durable.
    pub fn durable(&mut self, device: &str, boot: Option<u32>, seq: u64, now_ms: u64) {
        self.durable_at(device, boot, seq, u64::MAX, now_ms)
    }

    /// [`Self::durable`] for a reading stamped `ts`: a reading of the
    /// incarnation before a counter restart (no newer than it) is stored,
    /// but moves nothing of the new one.
    pub fn durable_at(&mut self, device: &str, boot: Option<u32>, seq: u64, ts: u64, now_ms: u64) {
        let timeout = self.gap_timeout_ms;
        let d = self.dev(device, boot);
        if d.prev.is_some_and(|(_, t)| ts <= t) {
            return;
        }
        let was_named = d.watermark.is_some();
        d.refused.remove(&seq);
        let cumulative = cumulative(d.origin);
        let hold = d.refused.first().is_some_and(|&r| r < seq) || !d.above.is_empty();
        match d.watermark {
            // Nothing can be below 0: a device that counts from 0 is acked at once.
            None if seq == 0 && !hold => d.watermark = Some(0),
            None if !cumulative && !hold => {
                d.watermark = Some(seq);
                d.skip(0, seq.saturating_sub(1).min(seq));
                if seq == 0 {
                    d.skipped.pop();
                }
            }
            // First contact (or a new incarnation): the device may hold seqs
            // below this one that never arrived (a port opened mid-line, a
            // garbled first frame). They wait as an open gap.
            None => {
                d.above.insert(seq);
                d.gap_since_ms.get_or_insert(now_ms);
            }
            Some(w) if seq <= w => {
                // Covered: a stale resend, or a skipped seq that came after all.
                d.unskip(seq);
                return;
            }
            Some(w) if seq == w + 1 => d.watermark = Some(seq),
            Some(_) => {
                d.above.insert(seq);
                d.gap_since_ms.get_or_insert(now_ms);
            }
        }
        d.dirty = true;
        let skipped = Self::advance(device, d, now_ms, timeout, false);
        let named = !was_named && d.watermark.is_some();
        self.skipped_seqs += skipped;
        self.newly_named |= named;
    }

    /// A reading of `device` was refused by the queue: it never becomes
    /// durable here, and the device keeps it.
    pub fn refused(&mut self, device: &str, boot: Option<u32>, seq: u64) {
        let d = self.dev(device, boot);
        if d.watermark.is_none_or(|w| seq > w) && d.refused.len() < MAX_ABOVE {
            d.refused.insert(seq);
        }
    }

    /// Replay at start-up: the device timestamps of queued readings, so a
    /// stale resend after a restart is still recognised as stale.
    pub fn seen_ts(&mut self, device: &str, boot: Option<u32>, ts: u64) {
        let d = self.dev(device, boot);
        d.max_ts = d.max_ts.max(ts);
    }

    /// Returns how many seqs it acked past as never sent.
    fn advance(device: &str, d: &mut DeviceAck, now_ms: u64, gap_timeout_ms: u64, allow_skip: bool) -> u64 {
        let mut skipped = 0;
        loop {
            // Refused seqs the watermark has passed (counter restart, bound) say nothing any more.
            while let (Some(w), Some(&r)) = (d.watermark, d.refused.first()) {
                if r > w {
                    break;
                }
                d.refused.pop_first();
            }
            if let Some(w) = d.watermark
                && d.above.first() == Some(&(w + 1))
            {
                d.above.pop_first();
                d.watermark = Some(w + 1);
                continue;
            }
            // Nothing is below 0: a first contact that reached 0 is no gap.
            if d.watermark.is_none() && d.above.first() == Some(&0) {
                d.above.pop_first();
                d.watermark = Some(0);
                continue;
            }
            if d.above.is_empty() {
                d.gap_since_ms = None;
                return skipped;
            }
            let expired = d.gap_since_ms.is_some_and(|t| now_ms.saturating_sub(t) >= gap_timeout_ms);
            let talking = now_ms.saturating_sub(d.last_seen_ms) <= away_ms(gap_timeout_ms);
            // A refused seq inside the gap is known to exist: wait for it.
            let next = *d.above.first().expect("not empty");
            let refused_inside = d.refused.range(..next).next().is_some();
            // A LAN device's acks are per message: nothing to wait for below
            // its first seq (see `cumulative`).
            let first_lan = d.watermark.is_none() && !cumulative(d.origin) && !refused_inside;
            if first_lan || (allow_skip && expired && talking && !refused_inside) || d.above.len() > MAX_ABOVE {
                // Give up on the gap (or on finding anything below a new
                // device's first seq): the missing seqs never existed.
                let from = d.watermark.map_or(0, |w| w + 1);
                if from < next && !first_lan {
                    skipped += next - from;
                    let why = if d.above.len() > MAX_ABOVE { "too far ahead of the gap" } else { "gap timeout" };
                    tracing::info!(
                        device,
                        "device {device}: seqs {from}..={} never came; acking past them ({why})",
                        next - 1
                    );
                }
                d.skip(from, next.saturating_sub(1).max(from.min(next)));
                if from >= next {
                    d.skipped.pop();
                }
                d.above.pop_first();
                d.watermark = Some(next);
                d.gap_since_ms = if d.above.is_empty() { None } else { Some(now_ms) };
                d.dirty = true;
                continue;
            }
            return skipped;
        }
    }

    /// The device resent something already durable or pending: ack it again.
    pub fn duplicate(&mut self, device: &str, boot: Option<u32>) {
        self.dev(device, boot).dirty = true;
    }

    /// Acks to send now, one per device that changed, with its link.
    /// Also resolves gaps that outlived the timeout.
    pub fn take_acks(&mut self, now_ms: u64) -> Vec<(Origin, Ack)> {
        let mut out = Vec::new();
        let timeout = self.gap_timeout_ms;
        for ((name, boot), d) in self.slots.iter_mut() {
            // A non-empty `above` (gap or held device) always has a gap clock.
            if d.gap_since_ms.is_some() {
                let was_named = d.watermark.is_some();
                self.skipped_seqs += Self::advance(name, d, now_ms, timeout, true);
                self.newly_named |= !was_named && d.watermark.is_some();
            }
            if !d.dirty {
                continue;
            }
            if let (Some(origin), Some(w)) = (d.origin, d.watermark) {
                d.dirty = false;
                out.push((origin, Ack { device: name.clone(), seq: w, boot: *boot }));
            }
        }
        out
    }

    /// Whether a device got its first watermark since [`Self::snapshot`]
    /// last ran. Such a device should be checkpointed soon: the checkpoint is
    /// what spares it the wait for its first ack after a restart, and power
    /// cuts may come sooner than the periodic checkpoint (found by the
    /// power-cut rig).
    pub fn newly_named(&self) -> bool {
        self.newly_named
    }

    /// Whether [`Self::accepted`] saw a counter restart since the last
    /// snapshot. The caller must checkpoint before storing the reading that
    /// showed it: the queue's records do not say which incarnation a
    /// reading belongs to, so a replay must never span a restart.
    pub fn restarted_since_snapshot(&self) -> bool {
        self.restarted
    }

    pub fn watermark(&self, device: &str, boot: Option<u32>) -> Option<u64> {
        let i = self.index.get(&(device, boot) as &dyn WhoRef)?;
        self.slots[*i].1.watermark
    }

    pub fn snapshot(&mut self) -> AckSnapshot {
        self.newly_named = false;
        self.restarted = false;
        AckSnapshot {
            devices: self
                .slots
                .iter()
                // A device held without a watermark (first contact) must be
                // kept too: its durable seqs are covered by this checkpoint
                // and will not be replayed.
                .filter(|(_, d)| d.watermark.is_some() || !d.above.is_empty() || d.prev.is_some())
                .map(|((n, boot), d)| SnapAck {
                    device: n.clone(),
                    boot: *boot,
                    watermark: d.watermark,
                    max_ts: d.max_ts,
                    above: d.above.iter().copied().collect(),
                    skipped: d.skipped.clone(),
                    prev: d.prev,
                    max_seq: d.max_seq,
                })
                .collect(),
        }
    }

    pub fn restore(&mut self, snap: AckSnapshot, now_ms: u64) {
        for s in snap.devices {
            let d = self.dev(&s.device, s.boot);
            d.watermark = s.watermark;
            d.max_ts = s.max_ts;
            d.above = s.above.into_iter().collect();
            d.skipped = s.skipped;
            d.prev = s.prev;
            d.max_seq = s.max_seq;
            if !d.above.is_empty() {
                d.gap_since_ms = Some(now_ms);
            }
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AckSnapshot {
    devices: Vec<SnapAck>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct SnapAck {
    device: String,
    boot: Option<u32>,
    watermark: Option<u64>,
    max_ts: u64,
    above: Vec<u64>,
    skipped: Vec<(u64, u64)>,
    prev: Option<(u64, u64)>,
    max_seq: Option<u64>,
}

/// The state file's ack part before boot ids (state format 1).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct AckSnapshotV1 {
    devices: Vec<(String, Option<u64>, u64, Vec<u64>)>,
}

impl From<AckSnapshotV1> for AckSnapshot {
    fn from(v1: AckSnapshotV1) -> AckSnapshot {
        AckSnapshot {
            devices: v1
                .devices
                .into_iter()
                .map(|(device, watermark, max_ts, above)| SnapAck {
                    device,
                    boot: None,
                    watermark,
                    max_ts,
                    above,
                    skipped: Vec::new(),
                    prev: None,
                    max_seq: None,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const N: Option<u32> = None;

    fn acks(t: &mut AckTracker, now: u64) -> Vec<u64> {
        t.take_acks(now).into_iter().map(|(_, a)| a.seq).collect()
    }

    /// A tracker that already acked `a` through `w` on port 0.
    fn named(w: u64) -> AckTracker {
        let mut t = AckTracker::new(Duration::from_secs(30));
        t.route("a", N, Origin::Serial(0), 0);
        for s in 0..=w {
            t.durable("a", N, s, 0);
        }
        assert_eq!(acks(&mut t, 0), vec![w]);
        t
    }

    #[test]
    fn contiguous_run_is_acked_once_per_change() {
        let mut t = AckTracker::new(Duration::from_secs(30));
        t.route("a", N, Origin::Serial(0), 0);
        for s in 0..=9 {
            t.durable("a", N, s, 0);
        }
        assert_eq!(acks(&mut t, 0), vec![9]);
        assert_eq!(acks(&mut t, 0), Vec::<u64>::new());
        t.duplicate("a", N);
        assert_eq!(acks(&mut t, 0), vec![9]);
    }

    #[test]
    fn gap_holds_the_ack_until_filled() {
        let mut t = named(1);
        t.durable("a", N, 3, 0);
        t.durable("a", N, 4, 0);
        assert_eq!(acks(&mut t, 1), vec![1], "not past the gap at 2");
        t.durable("a", N, 2, 2);
        assert_eq!(acks(&mut t, 2), vec![4]);
    }

    #[test]
    fn gap_is_skipped_after_the_timeout_of_a_talking_device() {
        let mut t = named(1);
        t.route("a", N, Origin::Serial(3), 0);
        t.durable("a", N, 5, 0);
        // The device keeps resending (5 and later) without ever sending 2..4.
        for ms in (0..=30_000).step_by(1000) {
            t.route("a", N, Origin::Serial(3), ms);
        }
        assert_eq!(acks(&mut t, 29_999), vec![1]);
        let out = t.take_acks(30_000);
        assert_eq!(out, vec![(Origin::Serial(3), Ack { device: "a".into(), seq: 5, boot: None })]);
    }

    /// L2: a port opened mid-line garbles seq 41; 42 arrives first. An ack of
    /// 42 would free 41, which the gateway never stored.
    #[test]
    fn first_contact_never_acks_above_a_seq_it_did_not_see() {
        let mut t = AckTracker::new(Duration::from_secs(30));
        t.route("a", N, Origin::Serial(0), 0);
        t.durable("a", N, 42, 0);
        assert!(acks(&mut t, 0).is_empty(), "42 must not cover 41");
        // The resend brings 41: still nothing until the device has talked for
        // the timeout (40 might come too).
        t.route("a", N, Origin::Serial(0), 500);
        t.durable("a", N, 41, 500);
        assert!(acks(&mut t, 500).is_empty());
        for ms in (1000..=30_500).step_by(1000) {
            t.route("a", N, Origin::Serial(0), ms);
        }
        assert_eq!(acks(&mut t, 30_500), vec![42]);
        // A device that counts from 0 needs no wait: nothing is below 0.
        t.route("b", N, Origin::Serial(0), 40_000);
        t.durable("b", N, 0, 40_000);
        assert_eq!(t.take_acks(40_000), vec![(Origin::Serial(0), Ack { device: "b".into(), seq: 0, boot: None })]);
    }

    #[test]
    fn a_lan_device_gets_its_watermark_from_its_first_durable_seq() {
        // LAN acks are per message (the front door's PUBACK), not cumulative
        // in the device's eyes: no reason to wait.
        let mut t = AckTracker::new(Duration::from_secs(30));
        t.route("l", N, Origin::Lan, 0);
        t.durable("l", N, 7, 0);
        assert_eq!(acks(&mut t, 0), vec![7]);
    }

    #[test]
    fn a_refused_seq_is_never_skipped_past() {
        let mut t = named(1);
        t.refused("a", N, 2); // queue full
        t.durable("a", N, 3, 0); // space again
        for ms in (0..=120_000).step_by(1000) {
            t.route("a", N, Origin::Serial(0), ms); // the device keeps resending 2, refused each time
            t.refused("a", N, 2);
        }
        assert_eq!(acks(&mut t, 120_000), vec![1], "2 exists: never ack past it");
        t.durable("a", N, 2, 121_000);
        assert_eq!(acks(&mut t, 121_000), vec![3]);
    }

    #[test]
    fn a_device_that_is_away_is_never_skipped_past() {
        let mut t = named(1);
        t.durable("a", N, 5, 0);
        assert_eq!(acks(&mut t, 0), vec![1]);
        // Unplugged for a minute: nothing moves.
        assert!(acks(&mut t, 60_000).is_empty());
        // Back: its resend brings 2..4 well within a fresh timeout.
        t.route("a", N, Origin::Serial(0), 60_000);
        assert!(acks(&mut t, 61_000).is_empty(), "the gap clock restarted on return");
        for s in 2..=4 {
            t.durable("a", N, s, 61_000);
        }
        assert_eq!(acks(&mut t, 61_000), vec![5]);
    }

    /// With a gap timeout shorter than [`AWAY_MS`] (2 s, as in the model
    /// test), a device silent for 4.4 s after the gap opened was taken for
    /// one that had talked all along: its next frame (its resend of the
    /// missing seq lost on the wire) had the gap given up and acked past a
    /// seq never stored. Seen failing with [`AWAY_MS`] alone.
    #[test]
    fn a_short_silence_restarts_a_short_gap_clock() {
        let mut t = AckTracker::new(Duration::from_secs(2));
        t.route("a", N, Origin::Serial(0), 0);
        t.durable("a", N, 0, 0);
        t.durable("a", N, 1, 0);
        t.route("a", N, Origin::Serial(0), 100);
        t.durable("a", N, 3, 100); // 2 lost
        assert_eq!(acks(&mut t, 100), vec![1]);
        // Silent until 4.5 s, then a frame without 2 (its resend lost too).
        assert!(acks(&mut t, 4_000).is_empty());
        t.route("a", N, Origin::Serial(0), 4_500);
        assert!(acks(&mut t, 4_500).is_empty(), "2 given up on without a resend");
        // Talking for the timeout without 2: it does not hold it.
        for ms in (5_000..=6_500).step_by(500) {
            t.route("a", N, Origin::Serial(0), ms);
        }
        assert_eq!(acks(&mut t, 6_500), vec![3]);
    }

    /// L2 on a counter restart: the new incarnation's first seq that arrives
    /// is not its first; the watermark must not restart from it.
    #[test]
    fn counter_restart_waits_for_the_new_incarnation_like_a_first_contact() {
        let mut t = AckTracker::new(Duration::from_secs(30));
        t.route("a", N, Origin::Serial(0), 0);
        assert_eq!(t.accepted("a", N, 0, 4000, true), Seen::New);
        t.durable("a", N, 0, 0);
        for s in 1..=100 {
            assert_eq!(t.accepted("a", N, s, 5000 + s, true), Seen::New);
            t.durable("a", N, s, 0);
        }
        assert_eq!(acks(&mut t, 1), vec![100]);
        // The device rebooted: its seq 3 was garbled, 4 arrives with a newer clock.
        assert_eq!(t.accepted("a", N, 4, 9000, true), Seen::New);
        t.durable("a", N, 4, 1);
        assert!(acks(&mut t, 1).is_empty(), "neither the old 100 nor 4 may be acked: 3 is unseen");
        t.route("a", N, Origin::Serial(0), 500);
        assert_eq!(t.accepted("a", N, 3, 8999, true), Seen::New, "the resend of 3 is new, not stale");
        t.durable("a", N, 3, 500);
        // 1 and 2 may still come; once the device has talked for the timeout without them:
        for ms in (1000..=31_000).step_by(1000) {
            t.route("a", N, Origin::Serial(0), ms);
        }
        assert_eq!(acks(&mut t, 31_000), vec![4]);
        // A stale resend of the old incarnation (old ts) stays covered.
        assert_eq!(t.accepted("a", N, 50, 5050, true), Seen::Covered);
    }

    /// D1: a seq an ack covers is answered, not stored again.
    #[test]
    fn a_stale_resend_is_covered_and_does_not_drag_the_watermark_back() {
        let mut t = AckTracker::new(Duration::from_secs(30));
        t.route("a", N, Origin::Serial(0), 0);
        for s in 0..=100 {
            assert_eq!(t.accepted("a", N, s, 1000 + s, true), Seen::New);
            t.durable("a", N, s, 0);
        }
        assert_eq!(acks(&mut t, 0), vec![100]);
        // seq 7 again, with its old timestamp (dedup had forgotten it), and a
        // device without timestamps: both are covered already.
        assert_eq!(t.accepted("a", N, 7, 1007, true), Seen::Covered);
        assert_eq!(t.accepted("a", N, 8, 999_999, false), Seen::Covered);
        assert_eq!(t.accepted("a", N, 101, 1101, true), Seen::New);
        t.durable("a", N, 101, 0);
        assert_eq!(acks(&mut t, 0), vec![101]);
    }

    #[test]
    fn a_skipped_seq_that_comes_after_all_is_stored_once() {
        let mut t = named(1);
        t.durable("a", N, 5, 0);
        for ms in (0..=30_000).step_by(1000) {
            t.route("a", N, Origin::Serial(0), ms);
        }
        assert_eq!(acks(&mut t, 30_000), vec![5]);
        // 3 was given up on (never stored): if it comes, store it...
        assert_eq!(t.accepted("a", N, 3, 0, false), Seen::New);
        t.durable("a", N, 3, 30_000);
        // ... once.
        assert_eq!(t.accepted("a", N, 3, 0, false), Seen::Covered);
        assert_eq!(t.accepted("a", N, 4, 0, false), Seen::New);
        assert_eq!(t.accepted("a", N, 1, 0, false), Seen::Covered);
    }

    #[test]
    fn boots_have_watermarks_of_their_own() {
        let mut t = AckTracker::new(Duration::from_secs(30));
        t.route("a", Some(6), Origin::Serial(0), 0);
        for s in 0..=40 {
            t.durable("a", Some(6), s, 0);
        }
        // Rebooted: boot 7 counts from 0 again, same values, no clock.
        t.route("a", Some(7), Origin::Serial(0), 0);
        assert_eq!(t.accepted("a", Some(7), 0, 0, false), Seen::New);
        t.durable("a", Some(7), 0, 0);
        let mut out = t.take_acks(0);
        out.sort_by_key(|(_, a)| a.boot);
        assert_eq!(
            out,
            vec![
                (Origin::Serial(0), Ack { device: "a".into(), seq: 40, boot: Some(6) }),
                (Origin::Serial(0), Ack { device: "a".into(), seq: 0, boot: Some(7) })
            ]
        );
        assert_eq!(t.accepted("a", Some(6), 3, 0, false), Seen::Covered);
        assert_eq!(t.accepted("a", Some(7), 3, 0, false), Seen::New);
    }

    #[test]
    fn no_port_no_ack_until_routed_and_snapshot_round_trip() {
        let mut t = AckTracker::new(Duration::from_secs(30));
        t.durable("a", N, 0, 0);
        t.durable("a", N, 1, 0);
        t.durable("a", N, 3, 0);
        t.durable("b", Some(2), 0, 0);
        assert!(t.take_acks(0).is_empty());
        let snap = t.snapshot();
        let bytes = postcard::to_allocvec(&snap).unwrap();
        let mut u = AckTracker::new(Duration::from_secs(30));
        u.restore(postcard::from_bytes(&bytes).unwrap(), 0);
        u.route("a", N, Origin::Serial(1), 0);
        u.durable("a", N, 2, 0);
        assert_eq!(acks(&mut u, 0), vec![3]);
        u.route("b", Some(2), Origin::Serial(1), 0);
        u.duplicate("b", Some(2));
        assert_eq!(u.take_acks(0), vec![(Origin::Serial(1), Ack { device: "b".into(), seq: 0, boot: Some(2) })]);
    }

    #[test]
    fn a_format_1_snapshot_converts() {
        let v1 = AckSnapshotV1 { devices: vec![("a".into(), Some(9), 77, vec![11])] };
        let bytes = postcard::to_allocvec(&v1).unwrap();
        let snap: AckSnapshot = postcard::from_bytes::<AckSnapshotV1>(&bytes).unwrap().into();
        let mut t = AckTracker::new(Duration::from_secs(30));
        t.restore(snap, 0);
        t.route("a", N, Origin::Serial(0), 0);
        t.durable("a", N, 10, 0);
        assert_eq!(acks(&mut t, 0), vec![11]);
    }
}
