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
//!   devices without `ts` must not reset `seq` (README);
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

use crate::reading::{Ack, PortId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Default)]
struct DeviceAck {
    watermark: Option<u64>,
    /// Newest device timestamp seen, to tell a counter restart from a stale resend.
    max_ts: u64,
    /// Durable seqs above `watermark + 1`, waiting for the gap to fill.
    above: BTreeSet<u64>,
    gap_since_ms: Option<u64>,
    port: Option<PortId>,
    dirty: bool,
    /// When the device last sent anything (new or resent).
    last_seen_ms: u64,
    /// Seqs the queue refused (full) and that have not become durable since:
    /// the device still holds them, so no gap below them is ever given up on.
    refused: BTreeSet<u64>,
}

/// Silence longer than this means the device was away: a gap's clock restarts.
const AWAY_MS: u64 = 5_000;

/// Bound on `above`: a device far ahead of a gap is not waited for forever
/// in memory either.
const MAX_ABOVE: usize = 65_536;

pub struct AckTracker {
    gap_timeout_ms: u64,
    /// Set after a restart: a device without a watermark does not get one
    /// from its first durable seq (see the module doc).
    restarted: bool,
    devices: HashMap<String, DeviceAck>,
    /// A device got its first watermark since the last checkpoint: until a
    /// checkpoint names it, a restart would hold it again for a gap timeout.
    newly_named: bool,
}

impl AckTracker {
    pub fn new(gap_timeout: std::time::Duration) -> Self {
        AckTracker {
            gap_timeout_ms: gap_timeout.as_millis() as u64,
            restarted: false,
            devices: HashMap::new(),
            newly_named: false,
        }
    }

    /// This is a restart: devices unknown to the restored state wait for a
    /// gap timeout of talking before their first ack.
    pub fn restarted(&mut self) {
        self.restarted = true;
    }

    fn dev(&mut self, device: &str) -> &mut DeviceAck {
        if !self.devices.contains_key(device) {
            self.devices.insert(device.to_string(), DeviceAck::default());
        }
        self.devices.get_mut(device).expect("just inserted")
    }

    /// The device sent a reading through `port` (acks go back there).
    pub fn route(&mut self, device: &str, port: PortId, now_ms: u64) {
        let d = self.dev(device);
        d.port = Some(port);
        if now_ms.saturating_sub(d.last_seen_ms) > AWAY_MS && d.gap_since_ms.is_some() {
            // Back from being away: the gap has to outlast a timeout of talk.
            d.gap_since_ms = Some(now_ms);
        }
        d.last_seen_ms = now_ms;
    }

    /// A reading was accepted by dedup (not yet durable). Detects a counter
    /// restart; see the module doc.
    pub fn accepted(&mut self, device: &str, seq: u64, ts: u64, ts_from_device: bool) {
        let d = self.dev(device);
        if !ts_from_device {
            return;
        }
        let newer = ts > d.max_ts;
        d.max_ts = d.max_ts.max(ts);
        if newer && d.watermark.is_some_and(|w| seq <= w) {
            d.watermark = seq.checked_sub(1);
            d.above.clear();
            d.refused.clear();
            d.gap_since_ms = None;
            d.dirty = true;
        }
    }

    /// A reading of `device` with `seq` (device time `ts`) is now durable.
    pub fn durable(&mut self, device: &str, seq: u64, now_ms: u64) {
        let timeout = self.gap_timeout_ms;
        let hold = self.restarted;
        let d = self.dev(device);
        let was_named = d.watermark.is_some();
        d.refused.remove(&seq);
        let hold = hold || d.refused.first().is_some_and(|&r| r < seq) || !d.above.is_empty();
        match d.watermark {
            None if hold => {
                d.above.insert(seq);
                d.gap_since_ms.get_or_insert(now_ms);
            }
            None => d.watermark = Some(seq),
            // Already covered (a stale resend dedup no longer remembered).
            Some(w) if seq <= w => return,
            Some(w) if seq == w + 1 => d.watermark = Some(seq),
            Some(_) => {
                d.above.insert(seq);
                d.gap_since_ms.get_or_insert(now_ms);
            }
        }
        d.dirty = true;
        Self::advance(d, now_ms, timeout, false);
        self.newly_named |= !was_named && d.watermark.is_some();
    }

    /// A reading of `device` was refused by the queue: it never becomes
    /// durable here, and the device keeps it.
    pub fn refused(&mut self, device: &str, seq: u64) {
        let d = self.dev(device);
        if d.watermark.is_none_or(|w| seq > w) && d.refused.len() < MAX_ABOVE {
            d.refused.insert(seq);
        }
    }

    /// Replay at start-up: the device timestamps of queued readings, so a
    /// stale resend after a restart is still recognised as stale.
    pub fn seen_ts(&mut self, device: &str, ts: u64) {
        let d = self.dev(device);
        d.max_ts = d.max_ts.max(ts);
    }

    fn advance(d: &mut DeviceAck, now_ms: u64, gap_timeout_ms: u64, allow_skip: bool) {
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
            if d.above.is_empty() {
                d.gap_since_ms = None;
                return;
            }
            let expired = d.gap_since_ms.is_some_and(|t| now_ms.saturating_sub(t) >= gap_timeout_ms);
            let talking = now_ms.saturating_sub(d.last_seen_ms) <= AWAY_MS;
            // A refused seq inside the gap is known to exist: wait for it.
            let next = *d.above.first().expect("not empty");
            let refused_inside = d.refused.range(..next).next().is_some();
            if (allow_skip && expired && talking && !refused_inside) || d.above.len() > MAX_ABOVE {
                // Give up on the gap (or on finding anything below an unknown
                // device's first seq): the missing seqs never existed.
                d.watermark = d.above.pop_first();
                d.gap_since_ms = if d.above.is_empty() { None } else { Some(now_ms) };
                d.dirty = true;
                continue;
            }
            return;
        }
    }

    /// The device resent something already durable or pending: ack it again.
    pub fn duplicate(&mut self, device: &str) {
        self.dev(device).dirty = true;
    }

    /// Acks to send now, one per device that changed, with its port.
    /// Also resolves gaps that outlived the timeout.
    pub fn take_acks(&mut self, now_ms: u64) -> Vec<(PortId, Ack)> {
        let mut out = Vec::new();
        let timeout = self.gap_timeout_ms;
        for (name, d) in self.devices.iter_mut() {
            // A non-empty `above` (gap or held device) always has a gap clock.
            if d.gap_since_ms.is_some() {
                let was_named = d.watermark.is_some();
                Self::advance(d, now_ms, timeout, true);
                self.newly_named |= !was_named && d.watermark.is_some();
            }
            if !d.dirty {
                continue;
            }
            if let (Some(port), Some(w)) = (d.port, d.watermark) {
                d.dirty = false;
                out.push((port, Ack { device: name.clone(), seq: w }));
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

    pub fn watermark(&self, device: &str) -> Option<u64> {
        self.devices.get(device).and_then(|d| d.watermark)
    }

    pub fn snapshot(&mut self) -> AckSnapshot {
        self.newly_named = false;
        AckSnapshot {
            devices: self
                .devices
                .iter()
                // A device held without a watermark (unknown after a
                // restart) must be kept too: its durable seqs are covered by
                // this checkpoint and will not be replayed.
                .filter(|(_, d)| d.watermark.is_some() || !d.above.is_empty())
                .map(|(n, d)| (n.clone(), d.watermark, d.max_ts, d.above.iter().copied().collect()))
                .collect(),
        }
    }

    pub fn restore(&mut self, snap: AckSnapshot, now_ms: u64) {
        for (name, w, max_ts, above) in snap.devices {
            let d = self.dev(&name);
            d.watermark = w;
            d.max_ts = max_ts;
            d.above = above.into_iter().collect();
            if !d.above.is_empty() {
                d.gap_since_ms = Some(now_ms);
            }
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AckSnapshot {
    devices: Vec<(String, Option<u64>, u64, Vec<u64>)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn acks(t: &mut AckTracker, now: u64) -> Vec<u64> {
        t.take_acks(now).into_iter().map(|(_, a)| a.seq).collect()
    }

    #[test]
    fn contiguous_run_is_acked_once_per_change() {
        let mut t = AckTracker::new(Duration::from_secs(30));
        t.route("a", 0, 0);
        for s in 5..=9 {
            t.durable("a", s, 0);
        }
        assert_eq!(acks(&mut t, 0), vec![9]);
        assert_eq!(acks(&mut t, 0), Vec::<u64>::new());
        t.duplicate("a");
        assert_eq!(acks(&mut t, 0), vec![9]);
    }

    #[test]
    fn gap_holds_the_ack_until_filled() {
        let mut t = AckTracker::new(Duration::from_secs(30));
        t.route("a", 0, 0);
        t.durable("a", 1, 0);
        t.durable("a", 3, 0);
        t.durable("a", 4, 0);
        assert_eq!(acks(&mut t, 1), vec![1]);
        t.durable("a", 2, 2);
        assert_eq!(acks(&mut t, 2), vec![4]);
    }

    #[test]
    fn gap_is_skipped_after_the_timeout_of_a_talking_device() {
        let mut t = AckTracker::new(Duration::from_secs(30));
        t.route("a", 3, 0);
        t.durable("a", 1, 0);
        t.durable("a", 5, 0);
        // The device keeps resending (5 and later) without ever sending 2..4.
        for ms in (0..=30_000).step_by(1000) {
            t.route("a", 3, ms);
        }
        assert_eq!(acks(&mut t, 29_999), vec![1]);
        let out = t.take_acks(30_000);
        assert_eq!(out, vec![(3, Ack { device: "a".into(), seq: 5 })]);
    }

    #[test]
    fn after_a_restart_an_unknown_device_is_not_acked_past_what_it_may_still_hold() {
        let mut t = AckTracker::new(Duration::from_secs(30));
        t.restarted();
        t.route("a", 0, 0);
        // 738 was sent to the previous run and lost; 739 is new.
        t.durable("a", 739, 0);
        assert!(acks(&mut t, 0).is_empty(), "739 must not cover 738");
        // The resend brings 738: still nothing acked until the device has
        // talked for the timeout (737 might come too).
        t.route("a", 0, 500);
        t.durable("a", 738, 500);
        assert!(acks(&mut t, 500).is_empty());
        for ms in (1000..=30_000).step_by(1000) {
            t.route("a", 0, ms);
        }
        assert_eq!(acks(&mut t, 30_000), vec![739]);
        // A device never seen before waits the same way (it cannot be told
        // from one the last run lost readings of) ...
        t.route("b", 0, 40_000);
        t.durable("b", 5, 40_000);
        assert!(t.take_acks(40_000).iter().all(|(_, a)| a.device != "b"));
        // ... while a device with a watermark is acked at once.
        t.route("a", 0, 40_000);
        t.durable("a", 740, 40_000);
        assert_eq!(acks(&mut t, 40_000), vec![740]);
    }

    #[test]
    fn on_a_first_run_a_new_device_is_acked_at_once() {
        let mut t = AckTracker::new(Duration::from_secs(30));
        t.route("b", 0, 0);
        t.durable("b", 5, 0);
        assert_eq!(acks(&mut t, 0), vec![5]);
    }

    #[test]
    fn a_refused_seq_is_never_skipped_past() {
        let mut t = AckTracker::new(Duration::from_secs(30));
        t.route("a", 0, 0);
        t.durable("a", 1, 0);
        t.refused("a", 2); // queue full
        t.durable("a", 3, 0); // space again
        for ms in (0..=120_000).step_by(1000) {
            t.route("a", 0, ms); // the device keeps resending 2, refused each time
            t.refused("a", 2);
        }
        assert_eq!(acks(&mut t, 120_000), vec![1], "2 exists: never ack past it");
        t.durable("a", 2, 121_000);
        assert_eq!(acks(&mut t, 121_000), vec![3]);
    }

    #[test]
    fn a_device_that_is_away_is_never_skipped_past() {
        let mut t = AckTracker::new(Duration::from_secs(30));
        t.route("a", 0, 0);
        t.durable("a", 1, 0);
        t.durable("a", 5, 0);
        assert_eq!(acks(&mut t, 0), vec![1]);
        // Unplugged for a minute: nothing moves.
        assert!(acks(&mut t, 60_000).is_empty());
        // Back: its resend brings 2..4 well within a fresh timeout.
        t.route("a", 0, 60_000);
        assert!(acks(&mut t, 61_000).is_empty(), "the gap clock restarted on return");
        for s in 2..=4 {
            t.durable("a", s, 61_000);
        }
        assert_eq!(acks(&mut t, 61_000), vec![5]);
    }

    #[test]
    fn counter_restart_restarts_the_watermark() {
        let mut t = AckTracker::new(Duration::from_secs(30));
        t.route("a", 0, 0);
        t.accepted("a", 100, 5000, true);
        t.durable("a", 100, 0);
        assert_eq!(acks(&mut t, 1), vec![100]);
        // The device rebooted: seq 3 again, but with a newer clock.
        t.accepted("a", 3, 6000, true);
        assert!(acks(&mut t, 1).iter().all(|&a| a < 3), "never ack the new incarnation early");
        t.durable("a", 3, 1);
        t.accepted("a", 4, 6001, true);
        t.durable("a", 4, 1);
        assert_eq!(acks(&mut t, 1), vec![4]);
    }

    #[test]
    fn a_stale_resend_does_not_drag_the_watermark_back() {
        let mut t = AckTracker::new(Duration::from_secs(30));
        t.route("a", 0, 0);
        for s in 1..=100 {
            t.accepted("a", s, 1000 + s, true);
            t.durable("a", s, 0);
        }
        assert_eq!(acks(&mut t, 0), vec![100]);
        // seq 7 again, with its old timestamp (dedup had forgotten it), and a
        // device without timestamps: both are covered already.
        t.accepted("a", 7, 1007, true);
        t.durable("a", 7, 0);
        t.accepted("a", 8, 999_999, false);
        t.durable("a", 8, 0);
        t.accepted("a", 101, 1101, true);
        t.durable("a", 101, 0);
        assert_eq!(acks(&mut t, 0), vec![101]);
    }

    #[test]
    fn no_port_no_ack_until_routed_and_snapshot_round_trip() {
        let mut t = AckTracker::new(Duration::from_secs(30));
        t.durable("a", 7, 0);
        t.durable("a", 9, 0);
        assert!(t.take_acks(0).is_empty());
        let snap = t.snapshot();
        let mut u = AckTracker::new(Duration::from_secs(30));
        u.restore(snap, 0);
        u.route("a", 1, 0);
        u.durable("a", 8, 0);
        assert_eq!(acks(&mut u, 0), vec![9]);
    }
}
