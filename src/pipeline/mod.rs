//! The pipeline: dedup → batch → queue, and acks back once durable.
//!
//! [`Pipeline`] is plain synchronous code that owns the dedup state, the open
//! batch, the ack tracker and the writing side of the queue. It runs on a
//! thread of its own (see [`crate::app`]) because committing means fsync,
//! and fsync must not stall the runtime that serves the ports. Benchmarks
//! drive the same struct directly.
//!
//! ## Checkpoint
//! Dedup and ack state must survive restarts, yet rewriting a state file on
//! every commit would wear the SD card. So the state file is written rarely
//! (at shutdown, before the queue deletes a segment, and otherwise once the
//! queue has taken [`CHECKPOINT_DATA_RATIO`] times the last state file's
//! size, at most every `CHECKPOINT_EVERY` and at least every
//! `CHECKPOINT_LONGEST`) and names the last queue record it covers; at
//! start-up the records after that one — still on disk, because segments
//! are only deleted after a checkpoint — are replayed into the state.
//!
//! ## Dedup from the queue
//! Every remembered key (~8 bytes each, ~1 MB at 200 readings/s with a
//! 10-minute window) in every state file was most of what the gateway wrote
//! besides its records at a site's pace (issue 18). Yet the keys are in the
//! queue's records already: so, without rules, the queue keeps its acked
//! records for the dedup window ([`Queue::keep_from`], bounded by
//! [`DEDUP_REPLAY_MAX`]) and the state file names the first record of the
//! window (`dedup_from`) instead of listing the keys; start-up rebuilds them
//! by replaying from there, as it always did after `covers_id`. Only BTHome
//! packet ids, which records do not carry, are still written. The full list
//! is written when the window is not all on disk (after a full disk or
//! queue deleted records, with a backlog larger than the bound, in the
//! first window after an older state), and with rules, whose records do not
//! carry every reading dedup accepted (a downsampled one).

pub mod acks;
pub mod batch;
pub mod config;
pub mod dedup;
pub mod task;

use crate::events::Event;
use crate::fatal::Fatal;
use crate::metrics::DeviceCounters;
use crate::metrics::Metrics;
use crate::queue::config::FsyncPolicy;
use crate::queue::{AppendOutcome, CRC, OpenReport, Queue, QueueError, QueueOptions, RecordMeta};
use crate::reading::{Ack, Batch, Format, Incoming, Origin, Reading, RecordHeader, RecordKind, now_ms};
use crate::rules::{Closed, Dest, Engine, Rules};
use config::Setup;

/// The pipeline's per-reading maps (devices, sensors, streams, batch
/// destinations) hash with foldhash, randomly seeded like std's SipHash but
/// ~0.2 CPU-s per million readings cheaper (docs/performance.md, "jsonl in").
/// Ids come from devices and LAN clients: foldhash's seeds rule out collision
/// lists that work for every instance, and the LAN broker caps devices.
pub(crate) type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use acks::{AckSnapshot, AckSnapshotV1, AckTracker, Seen};
use batch::Batcher;
use dedup::{Dedup, DedupSnapshot, DedupSnapshotV1, Verdict};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Least time between periodic checkpoints.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(60);
/// Most time between checkpoints while anything changed: bounds what a
/// start-up replays at a site's pace.
const CHECKPOINT_LONGEST: Duration = Duration::from_secs(600);
/// A periodic checkpoint waits until the queue took this many times the
/// last state file's bytes: the state file (every remembered key, ~2.5 MB
/// at 200 readings/s with a 10-minute window) then costs at most a quarter of
/// a byte written per byte queued, and a start-up replays at most four
/// state files' worth of records. Writing it every 60 s regardless was
/// ~2.6 bytes written per encoded byte at a site's pace (issue 18).
const CHECKPOINT_DATA_RATIO: u64 = 4;
/// How often the rules look for idle aggregate windows to close.
const RULES_TICK: Duration = Duration::from_secs(1);
/// Least time between checkpoints forced by reclaiming segments.
const CHECKPOINT_MIN_GAP: Duration = Duration::from_secs(5);
/// Least time between checkpoints forced by a device's first ack: new
/// devices are named within a second, and a fleet switched on at once costs
/// a state write per second, not one per device.
const NEW_DEVICE_CHECKPOINT_GAP: Duration = Duration::from_secs(1);
/// First pause after a failed checkpoint (the state file could not be
/// written: a full disk, a data dir gone); it doubles up to
/// [`CHECKPOINT_EVERY`]. Retried at every tick instead, with its deadline
/// already past, a failing checkpoint kept the pipeline thread at 100 % of a
/// core (found 2026-12-05 on a gateway whose data dir was deleted under it).
const CHECKPOINT_RETRY_MIN: Duration = Duration::from_secs(1);
/// State file format 2: keys and acks per device *boot*. Format 1 (before
/// boot ids) is still read, so an upgrade keeps its dedup and ack state.
/// Format 3 adds the rules' state. Format 4 writes each dedup key as
/// differences from the one before ([`dedup::DedupSeed`]'s `delta`): ~8
/// bytes a key instead of ~23. Format 5 adds `dedup_from`: a state file
/// may leave the keys a replay of the queue rebuilds out (see "Dedup from
/// the queue" above). Formats 4, 3, 2 and 1 are still read.
const STATE_MAGIC: &[u8; 4] = b"EGS5";
const STATE_MAGIC_V4: &[u8; 4] = b"EGS4";
const STATE_MAGIC_V3: &[u8; 4] = b"EGS3";
const STATE_MAGIC_V2: &[u8; 4] = b"EGS2";
const STATE_MAGIC_V1: &[u8; 4] = b"EGS1";

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    #[error("state file {path}: {source}")]
    State { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Fatal(#[from] Fatal),
}

/// What the state file holds besides the dedup keys, which are read straight
/// into the pipeline's [`Dedup`] ([`dedup::DedupSeed`]); written as
/// [`StateOut`]: `covers_id`, dedup, acks, rules, in that order.
#[derive(Default)]
struct State {
    /// Every queue record with id <= this is reflected in the state.
    covers_id: u64,
    acks: AckSnapshot,
    /// Downsample memory and open aggregate windows.
    rules: crate::rules::Snapshot,
    /// 0: the file holds every dedup key. Else it holds only the keys no
    /// record carries, and the rest are rebuilt from the records from this
    /// id on (see "Dedup from the queue" above).
    dedup_from: u64,
}

/// Reads a format-5 or -4 (`delta`) or format-3 state file's body into a
/// [`State`] and the dedup keys into the [`Dedup`]; `dedup_from` is read
/// from format 5 only.
struct StateSeed<'a> {
    dedup: &'a mut Dedup,
    delta: bool,
    dedup_from: bool,
}

impl<'de> serde::de::DeserializeSeed<'de> for StateSeed<'_> {
    type Value = State;

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<State, D::Error> {
        struct V<'a>(StateSeed<'a>);
        impl<'de> serde::de::Visitor<'de> for V<'_> {
            type Value = State;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a state file")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<State, A::Error> {
                let missing = |what| <A::Error as serde::de::Error>::custom(format_args!("state file: {what} missing"));
                let covers_id = seq.next_element()?.ok_or_else(|| missing("covers_id"))?;
                let StateSeed { dedup, delta, dedup_from } = self.0;
                seq.next_element_seed(dedup::DedupSeed { dedup, delta })?.ok_or_else(|| missing("dedup"))?;
                let acks = seq.next_element()?.ok_or_else(|| missing("acks"))?;
                let rules = seq.next_element()?.ok_or_else(|| missing("rules"))?;
                let dedup_from =
                    if dedup_from { seq.next_element()?.ok_or_else(|| missing("dedup_from"))? } else { 0 };
                Ok(State { covers_id, acks, rules, dedup_from })
            }
        }
        de.deserialize_struct("State", &["covers_id", "dedup", "acks", "rules", "dedup_from"], V(self))
    }
}

/// [`State`] as the checkpoint writes it: the same fields in the same
/// order, the dedup part serialized straight from its rings.
#[derive(Serialize)]
struct StateOut<'a> {
    covers_id: u64,
    dedup: crate::pipeline::dedup::DedupView<'a>,
    acks: AckSnapshot,
    rules: crate::rules::SnapshotView<'a>,
    dedup_from: u64,
}

#[derive(Deserialize)]
struct StateV2 {
    covers_id: u64,
    dedup: DedupSnapshot,
    acks: AckSnapshot,
}

#[derive(Deserialize)]
struct StateV1 {
    covers_id: u64,
    dedup: DedupSnapshotV1,
    acks: AckSnapshotV1,
}

/// What start-up found, for logs and tests.
#[derive(Debug, Default)]
pub struct StartReport {
    pub queue: OpenReport,
    pub replayed_records: u64,
    pub state_file_ok: bool,
    /// Records before `covers_id` replayed into dedup only (the state file
    /// named `dedup_from`).
    pub dedup_records: u64,
}

pub struct Pipeline {
    gateway: String,
    format: Format,
    dedup: Dedup,
    batcher: Batcher,
    /// `[[rules]]`, when there are any (without, records carry no header).
    engine: Option<Engine>,
    /// With rules: one open batch per destination.
    batchers: HashMap<Dest, Batcher>,
    /// Readings rules dropped, not yet written with a record (see
    /// [`RecordHeader::dropped`]).
    dropped: Vec<crate::reading::DroppedKey>,
    batch_limits: (usize, u64, Duration),
    /// When idle windows were last looked for (see `RULES_TICK`).
    rules_ticked: Instant,
    acks: AckTracker,
    queue: Arc<Mutex<Queue>>,
    metrics: Arc<Metrics>,
    fsync: FsyncPolicy,
    fsync_interval: Duration,
    /// `(device, boot, seq, ts)` of readings appended but not yet committed.
    uncommitted: Vec<(String, Option<u32>, u64, u64)>,
    dirty_since: Option<Instant>,
    state_path: PathBuf,
    last_checkpoint: Instant,
    /// After a failed checkpoint: no new try before this, and the pause
    /// that led to it (see [`CHECKPOINT_RETRY_MIN`]).
    checkpoint_retry: Option<(Instant, Duration)>,
    /// The latest `now` a caller passed in ([`Pipeline::ingest`],
    /// [`Pipeline::tick`]): checkpoints use it, so a test that drives time
    /// gets the same run every time.
    last_now: Instant,
    changed_since_checkpoint: bool,
    /// Queue payload bytes appended since the last checkpoint.
    queued_since_checkpoint: u64,
    /// Size of the last state file written (0: none yet).
    state_bytes: u64,
    /// The last state file left dedup's keys to the queue's records.
    dedup_in_queue: bool,
    /// When [`Pipeline::tick`] last looked for segments to reclaim.
    reclaim_checked: Instant,
    /// `Queue::fsyncs()` already added to `fsyncs_total{file="queue"}`.
    queue_fsyncs_counted: AtomicU64,
    /// `Queue::pad_bytes()` already added to `queue_pad_bytes_total`.
    queue_pads_counted: AtomicU64,
    /// `Queue::prefill_bytes()` already added to `queue_prefill_bytes_total`.
    queue_prefill_counted: AtomicU64,
    /// `Queue::deflate_saved_bytes()` already added to `queue_deflate_saved_bytes_total`.
    queue_deflate_counted: AtomicU64,
    /// `Queue::reused_segments()` already added to `queue_reused_segments_total`.
    queue_reused_counted: AtomicU64,
    /// `Queue::direct_commits()` already added to `queue_direct_commits_total`.
    queue_direct_counted: AtomicU64,
    /// A batch was refused (full queue or disk) since the last checkpoint.
    refused_since_checkpoint: bool,
    last_error_log: Option<Instant>,
    /// Wall clock in unix ms; a test can drive it.
    clock: fn() -> u64,
    /// Where accepted readings are republished (the embedded broker), if anywhere.
    republish: Option<crate::channel::Sender<Reading>>,
    /// Per-device counts since the last tick, handed to [`Metrics`] in one go.
    /// Keyed by device, then by source kind ([`Origin::KINDS`]).
    tallies: HashMap<String, [DeviceCounters; Origin::KINDS.len()]>,
    /// Ids of the records `drop_oldest` evicted, newest last (bounded).
    evicted: std::collections::VecDeque<std::ops::RangeInclusive<u64>>,
    /// Every state file lists every dedup key (tests of that form; see
    /// "Dedup from the queue").
    pub(crate) keys_in_state: bool,
}

/// Most bytes of queue records kept for a start-up to rebuild dedup from
/// (see "Dedup from the queue"), and at most an eighth of `max_bytes`:
/// beyond, the state file lists the keys.
const DEDUP_REPLAY_MAX: u64 = 64 << 20;

/// How often [`Pipeline::tick`] looks for sealed segments worth a
/// checkpoint to reclaim.
const RECLAIM_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Records a start-up replay reads at a time.
const REPLAY_CHUNK: usize = 1024;

/// How many eviction ranges [`Pipeline::evicted_records`] remembers.
const MAX_EVICTED_RANGES: usize = 4096;

/// Where the queue lives under the gateway's `data_dir`.
pub fn queue_dir(data_dir: impl AsRef<Path>) -> PathBuf {
    data_dir.as_ref().join("queue")
}

impl Pipeline {
    /// Open the queue, load the checkpoint and replay what came after it.
    pub fn open(cfg: impl Into<Setup>, metrics: Arc<Metrics>) -> Result<(Pipeline, StartReport), PipelineError> {
        Self::open_with_clock(cfg, metrics, now_ms)
    }

    /// [`Pipeline::open`] with a wall clock of the caller's (unix ms), for
    /// tests that drive time: dedup windows and ack gap timeouts read it.
    pub fn open_with_clock(
        cfg: impl Into<Setup>,
        metrics: Arc<Metrics>,
        clock: fn() -> u64,
    ) -> Result<(Pipeline, StartReport), PipelineError> {
        let cfg: Setup = cfg.into();
        let dir = &cfg.data_dir;
        crate::queue::create_dir_all_durable(dir)
            .map_err(|source| PipelineError::State { path: dir.clone(), source })?;
        // A queue directory means an earlier run, which may have received
        // (and lost, unacked) readings of devices it never made durable.
        let qdir = queue_dir(dir);
        let (queue, qreport) = Queue::open(&qdir, QueueOptions::from(&cfg.store))?;
        Event::QueueRepaired { torn_bytes: qreport.truncated_bytes, corrupt_records: qreport.corrupt_records }
            .emit(&metrics);
        let p = &cfg.pipeline;
        let engine = if cfg.rules.is_empty() {
            None
        } else {
            let rules = Rules::compile(&cfg.rules, &cfg.gateway).map_err(|e| PipelineError::State {
                path: dir.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            })?;
            Some(Engine::new(Arc::new(rules)))
        };
        let mut me = Pipeline {
            gateway: cfg.gateway.clone(),
            format: p.format,
            dedup: Dedup::new(p.dedup_window, p.dedup_max_per_device),
            batcher: Batcher::new(p.batch_max_readings, p.batch_max_bytes, p.batch_max_age),
            engine,
            batchers: HashMap::default(),
            dropped: Vec::new(),
            rules_ticked: Instant::now(),
            batch_limits: (p.batch_max_readings, p.batch_max_bytes, p.batch_max_age),
            acks: AckTracker::new(p.ack_gap_timeout),
            queue: Arc::new(Mutex::new(queue)),
            metrics,
            fsync: cfg.store.fsync,
            fsync_interval: cfg.store.fsync_interval,
            uncommitted: Vec::new(),
            dirty_since: None,
            state_path: dir.join("state.bin"),
            last_checkpoint: Instant::now(),
            checkpoint_retry: None,
            last_now: Instant::now(),
            changed_since_checkpoint: false,
            queued_since_checkpoint: 0,
            state_bytes: 0,
            dedup_in_queue: false,
            reclaim_checked: Instant::now(),
            queue_fsyncs_counted: AtomicU64::new(0),
            queue_pads_counted: AtomicU64::new(0),
            queue_prefill_counted: AtomicU64::new(0),
            queue_deflate_counted: AtomicU64::new(0),
            queue_reused_counted: AtomicU64::new(0),
            queue_direct_counted: AtomicU64::new(0),
            refused_since_checkpoint: false,
            last_error_log: None,
            clock,
            republish: None,
            tallies: HashMap::default(),
            evicted: Default::default(),
            keys_in_state: false,
        };
        let mut report = StartReport { queue: qreport, ..Default::default() };
        let state = match read_state(&me.state_path, &mut me.dedup) {
            Ok(Some(s)) => {
                report.state_file_ok = true;
                s
            }
            Ok(None) => State::default(),
            Err(e) => {
                // A bad state file costs dedup memory, never data: the queue
                // is the source of truth for readings.
                tracing::warn!("ignoring unreadable state file {}: {e}", me.state_path.display());
                me.dedup.clear();
                State::default()
            }
        };
        let now = clock();
        let covers = state.covers_id;
        if let Some(e) = &mut me.engine {
            e.restore(state.rules);
        }
        // A device the state does not know starts as at first contact:
        // its first durable seqs wait as an open gap (see `acks`).
        me.acks.restore(state.acks, now);
        let dedup_from = state.dedup_from.min(covers + 1);
        let mut after = if dedup_from > 0 { dedup_from - 1 } else { covers };
        if dedup_from > 0 {
            // Keep them until the next checkpoint says what to keep.
            me.queue().keep_from(after);
        }
        let mut first = true;
        loop {
            // Skip (and count) records that rotted in a sealed segment: one
            // bad record must not keep the gateway from starting. In chunks:
            // the dedup window's records alone may be tens of MB.
            let (records, corrupt) = me.queue().read_valid_on_disk_after(after, REPLAY_CHUNK)?;
            let ids = || records.iter().map(|(m, _)| m.id).chain(corrupt.iter().copied());
            let Some(last) = ids().max() else { break };
            if first && dedup_from > 0 && dedup_from <= covers {
                let seen = ids().min().unwrap_or(last);
                if seen > dedup_from {
                    tracing::warn!(
                        "dedup is rebuilt from queue record {seen} on, but the state file named {dedup_from}: \
                         the records in between were deleted (a full disk or queue); resends of their readings \
                         may be queued again"
                    );
                }
            }
            first = false;
            after = last;
            if !corrupt.is_empty() {
                Event::ReplayCorrupt { ids: &corrupt }.emit(&me.metrics);
            }
            for (meta, payload) in records {
                me.replay(&meta, &payload, covers, now, &mut report);
            }
        }
        me.dedup.prune(now);
        Ok((me, report))
    }

    /// Replay one queue record found at start-up: into dedup only if the
    /// state covers it (`id <= covers`), else into dedup, acks and rules.
    fn replay(&mut self, meta: &RecordMeta, payload: &[u8], covers: u64, now: u64, report: &mut StartReport) {
        // With rules: a window's close is on disk right where it happened;
        // derived readings are not device readings (see `crate::rules`).
        let header = RecordHeader::split(payload).ok().and_then(|(h, _)| h);
        let covered = meta.id <= covers;
        if let Some(h) = header.as_ref().filter(|_| !covered) {
            for k in &h.dropped {
                self.acks.seen_ts(&k.device, k.boot, k.ts);
                self.acks.durable_at(&k.device, k.boot, k.seq, k.ts, now);
            }
            if let (Some(w), Some(e)) = (&h.window, self.engine.as_mut()) {
                e.replay_closed(w);
            }
        }
        if header.as_ref().is_some_and(|h| matches!(h.kind, RecordKind::Derived | RecordKind::Reply)) {
            report.replayed_records += !covered as u64;
            return;
        }
        match Batch::decode(payload) {
            Ok(batch) if covered => {
                // Before the state file's point: dedup's keys only.
                for r in &batch.readings {
                    self.dedup.remember(r, meta.created_ms);
                }
                report.dedup_records += 1;
            }
            Ok(batch) => {
                for r in &batch.readings {
                    self.dedup.remember(r, meta.created_ms);
                    self.acks.seen_ts(&r.device, r.boot, r.ts);
                    if let Some(seq) = r.seq {
                        self.acks.durable_at(&r.device, r.boot, seq, r.ts, now);
                    }
                    if let (Some(h), Some(e)) = (&header, self.engine.as_mut()) {
                        e.replay(r, h.source, now);
                    }
                }
                report.replayed_records += 1;
            }
            Err(e) => tracing::warn!("queue record {} does not decode as a batch: {e}", meta.id),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue records `drop_oldest` evicted in this run, as id ranges (the
    /// last `MAX_EVICTED_RANGES` evictions): what was lost, by name.
    pub fn evicted_records(&self) -> impl Iterator<Item = &std::ops::RangeInclusive<u64>> {
        self.evicted.iter()
    }

    /// Start the pipeline's monotonic clock at `now` instead of the real
    /// `Instant::now()` of [`Pipeline::open`]: for tests that drive time, so
    /// that a run is the same every time.
    pub fn start_clock_at(&mut self, now: Instant) {
        self.last_checkpoint = now;
        self.last_now = now;
        self.rules_ticked = now;
        self.reclaim_checked = now;
    }

    /// The queue, shared with its readers (the uplink).
    pub fn queue_handle(&self) -> Arc<Mutex<Queue>> {
        self.queue.clone()
    }

    /// Hand every reading dedup accepts, from any source, to `tx` too. Never
    /// waits: when `tx` is full the reading is not republished (counted).
    pub fn set_republish(&mut self, tx: crate::channel::Sender<Reading>) {
        if let Some(e) = &mut self.engine {
            e.set_republish(true);
        }
        self.republish = Some(tx);
    }

    /// Take one reading from a source. An `Err` is a failed commit: from
    /// then on nothing more may be acked (see [`crate::fatal`]).
    pub fn ingest(&mut self, inc: Incoming, now: Instant, now_ms: u64) -> Result<(), Fatal> {
        let Incoming { reading, ts_from_device, origin, packet_id } = inc;
        self.last_now = self.last_now.max(now);
        if reading.seq.is_some() {
            self.acks.route(&reading.device, reading.boot, origin, now_ms);
        }
        let (mut verdict, reused) = self.dedup.check_full(&reading, ts_from_device, packet_id, now_ms);
        if let Some(old_ts) = reused.filter(|_| reading.boot.is_none()) {
            self.acks.reused(&reading.device, reading.ts, old_ts);
        }
        // A seq an ack already covers is not stored again, even when dedup
        // forgot its key (a device redocked after the window): the device
        // just missed the ack.
        if verdict == Verdict::Accept
            && let Some(seq) = reading.seq
            && self.acks.accepted(&reading.device, reading.boot, seq, reading.ts, ts_from_device) == Seen::Covered
        {
            Metrics::inc(&self.metrics.stale_resends);
            verdict = Verdict::Duplicate;
        }
        self.tally(origin, &reading.device, verdict);
        match verdict {
            Verdict::Duplicate => {
                Metrics::inc(&self.metrics.duplicates_dropped);
                if reading.seq.is_some() {
                    self.acks.duplicate(&reading.device, reading.boot);
                }
            }
            Verdict::Accept => {
                Metrics::inc(&self.metrics.readings_accepted);
                // With rules, what they emit is republished (ingest_ruled).
                if self.engine.is_none()
                    && let Some(tx) = &self.republish
                    && tx.try_send(reading.clone()).is_err()
                {
                    Metrics::inc(&self.metrics.republish_dropped);
                }
                if self.engine.is_some() {
                    self.ingest_ruled(reading, origin, now, now_ms)?;
                } else if let Some(batch) = self.batcher.push(reading, now) {
                    self.seal(batch, None, now, now_ms)?;
                }
            }
        }
        // A counter restart goes to the state file together with the new
        // incarnation's first reading, committed: the queue's records do not
        // say which incarnation a reading is of, so no replay may span a
        // restart (see `AckTracker::restarted_since_snapshot`). And not
        // before that reading is durable: the snapshot holds its dedup key.
        // Rare: a reboot of a device without boot id.
        if self.acks.restarted_since_snapshot() {
            match self.checkpoint() {
                Ok(()) => {}
                Err(PipelineError::Fatal(f)) => return Err(f),
                Err(e) => self.log_error(format_args!("checkpoint after a device's counter restart failed: {e}")),
            }
        }
        Ok(())
    }

    fn tally(&mut self, origin: Origin, device: &str, verdict: Verdict) {
        let kind = origin.kind();
        // No allocation once the device is known: this runs per reading.
        let t = match self.tallies.get_mut(device) {
            Some(t) => &mut t[kind],
            None => &mut self.tallies.entry(device.to_string()).or_default()[kind],
        };
        match verdict {
            Verdict::Accept => t.readings += 1,
            Verdict::Duplicate => t.duplicates += 1,
        }
    }

    /// Hand the per-device counts to [`Metrics`] (once per tick).
    fn flush_tallies(&mut self) {
        if self.tallies.is_empty() {
            return;
        }
        let drained = self.tallies.drain().flat_map(|(device, per_kind)| {
            Origin::KINDS
                .iter()
                .zip(per_kind)
                .filter(|(_, c)| c.readings + c.duplicates > 0)
                .map(move |(k, c)| ((*k, device.clone()), c))
        });
        self.metrics.add_devices(drained);
    }

    /// Run the rules on an accepted reading: append the windows it closed,
    /// then batch it for each destination (or drop it, acked as handled).
    fn ingest_ruled(&mut self, reading: Reading, origin: Origin, now: Instant, now_ms: u64) -> Result<(), Fatal> {
        let engine = self.engine.as_mut().expect("rules");
        let outcome = engine.ingest(&reading, origin.kind() as u8, now_ms);
        // In queue order: the windows this reading closed, then the reading.
        let closed = outcome.closed.iter().flat_map(|c| c.republish.iter().cloned());
        self.republish_all(closed.chain(outcome.republish));
        self.append_closed(outcome.closed, now, now_ms)?;
        if outcome.store.is_empty() {
            // Dropped by a rule: that is its outcome. It is acked with the
            // next commit, like the readings before it, and its key goes to
            // disk with the next record (before that commit).
            if let Some(seq) = reading.seq {
                self.uncommitted.push((reading.device.clone(), reading.boot, seq, reading.ts));
                self.dropped.push(crate::reading::DroppedKey {
                    device: reading.device,
                    boot: reading.boot,
                    seq,
                    ts: reading.ts,
                });
                self.dirty_since.get_or_insert(now);
            }
            return Ok(());
        }
        let (n, bytes, age) = self.batch_limits;
        let last = outcome.store.len() - 1;
        let mut reading = Some(reading);
        for (k, dest) in outcome.store.into_iter().enumerate() {
            let r = if k == last { reading.take().expect("once") } else { reading.clone().expect("kept") };
            // (no clone of the destination once its batcher exists)
            let b = match self.batchers.get_mut(&dest) {
                Some(b) => b,
                None => self.batchers.entry(dest.clone()).or_insert_with(|| Batcher::new(n, bytes, age)),
            };
            if let Some(batch) = b.push(r, now) {
                self.seal(batch, Some(dest.header(None)), now, now_ms)?;
            }
        }
        Ok(())
    }

    /// Hand readings to the LAN broker's republisher; never waits (a full
    /// channel drops them, counted).
    fn republish_all(&self, readings: impl Iterator<Item = Reading>) {
        let Some(tx) = &self.republish else { return };
        for r in readings {
            if tx.try_send(r).is_err() {
                Metrics::inc(&self.metrics.republish_dropped);
            }
        }
    }

    /// Append closed windows: every open batch first (so a window's output
    /// follows each reading it counted in the queue), then one record per
    /// destination of its outputs (an empty `Hold` record when rules after
    /// the aggregate dropped them all, so the close is on disk).
    fn append_closed(&mut self, closed: Vec<Closed>, now: Instant, now_ms: u64) -> Result<(), Fatal> {
        if closed.is_empty() {
            return Ok(());
        }
        self.seal_all(now, now_ms)?;
        for c in closed {
            if c.outputs.is_empty() {
                let h = RecordHeader::hold(Some(c.window));
                self.seal(Vec::new(), Some(h), now, now_ms)?;
                continue;
            }
            let mut groups: Vec<(Dest, Vec<Reading>)> = Vec::new();
            for (r, d) in c.outputs {
                match groups.iter_mut().find(|g| g.0 == d) {
                    Some(g) => g.1.push(r),
                    None => groups.push((d, vec![r])),
                }
            }
            for (d, rs) in groups {
                self.seal(rs, Some(d.header(Some(c.window.clone()))), now, now_ms)?;
            }
        }
        Ok(())
    }

    /// Seal every open batch of the rules' destinations, oldest first.
    fn seal_all(&mut self, now: Instant, now_ms: u64) -> Result<(), Fatal> {
        let mut open: Vec<(Instant, Dest)> =
            self.batchers.iter().filter_map(|(d, b)| b.deadline().map(|t| (t, d.clone()))).collect();
        open.sort_by_key(|(t, _)| *t);
        for (_, d) in open {
            if let Some(batch) = self.batchers.get_mut(&d).and_then(|b| b.take()) {
                self.seal(batch, Some(d.header(None)), now, now_ms)?;
            }
        }
        Ok(())
    }

    /// Close a batch into the queue (not yet durable), behind `header` when
    /// rules decided where it goes.
    fn seal(
        &mut self,
        readings: Vec<Reading>,
        header: Option<RecordHeader>,
        now: Instant,
        now_ms: u64,
    ) -> Result<(), Fatal> {
        let mut header = header;
        if let Some(h) = &mut header {
            h.dropped = std::mem::take(&mut self.dropped);
        }
        let mut q = self.queue();
        let batch = Batch { gateway: self.gateway.clone(), batch: q.next_id(), readings };
        let payload = match &header {
            None => batch.encode(self.format),
            Some(h) => h.wrap(&batch.encode(self.format)),
        };
        // The alarm lane's batches may be sent ahead of the backlog; a batch
        // for k topics owns k ids (one per message).
        let priority = header.as_ref().is_some_and(|h| h.lane == crate::rules::config::Lane::Alarm as u8);
        let span = header.as_ref().map_or(1, |h| h.topics.len().max(1) as u32);
        let result = q.append_with(batch.readings.len() as u32, now_ms, &payload, priority, span);
        let evicted = q.last_evicted();
        crate::crashpoint::hit_losing("after-append", || q.unsynced_segments());
        drop(q);
        match result {
            Ok(AppendOutcome::Appended { dropped_records, dropped_readings }) => {
                if let Some(ids) = evicted.filter(|_| dropped_records > 0) {
                    Metrics::add(&self.metrics.readings_dropped_full, dropped_readings);
                    self.log_error(format_args!(
                        "queue full: dropped the oldest {dropped_records} batches ({dropped_readings} readings), \
                         records {}..={}",
                        ids.start(),
                        ids.end()
                    ));
                    if self.evicted.len() >= MAX_EVICTED_RANGES {
                        self.evicted.pop_front();
                    }
                    self.evicted.push_back(ids);
                }
                Metrics::inc(&self.metrics.batches_queued);
                Metrics::add(&self.metrics.batch_bytes_queued, payload.len() as u64);
                self.uncommitted
                    .extend(batch.readings.iter().filter_map(|r| r.seq.map(|s| (r.device.clone(), r.boot, s, r.ts))));
                self.dirty_since.get_or_insert(now);
                self.changed_since_checkpoint = true;
                self.queued_since_checkpoint += payload.len() as u64;
                if self.fsync == FsyncPolicy::Always {
                    self.commit()?;
                }
            }
            Err(e) if e.storage_failed() => {
                // The disk broke (EIO, remounted read-only): nothing more can
                // be made durable, as when a commit's fsync fails. The batch
                // was never acked; the devices resend it to the restart.
                return Err(Fatal(format!("queue append failed: {e}; a restart rescans the queue")));
            }
            Err(e) => {
                // The dropped keys it carried go with the next record.
                if let Some(h) = header {
                    self.dropped.extend(h.dropped);
                }
                // Refused (reject_new, a record too big, a full disk): the
                // readings were never acked, so the device still has them.
                // Forget them in dedup so that its resend is accepted.
                Metrics::inc(&self.metrics.batches_rejected_full);
                Metrics::add(&self.metrics.readings_rejected_full, batch.readings.len() as u64);
                self.refused_since_checkpoint = true;
                for r in &batch.readings {
                    self.dedup.forget(r);
                    if let Some(seq) = r.seq {
                        self.acks.refused(&r.device, r.boot, seq);
                    }
                }
                self.log_error(format_args!("batch of {} readings not queued: {e}", batch.readings.len()));
            }
        }
        Ok(())
    }

    fn log_error(&mut self, msg: std::fmt::Arguments) {
        // One line per 10 s: a full queue under load would otherwise flood.
        let now = Instant::now();
        if self.last_error_log.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
            self.last_error_log = Some(now);
            tracing::warn!("{msg}");
        }
    }

    /// Make everything appended durable; acks for it become due.
    pub fn commit(&mut self) -> Result<(), Fatal> {
        if self.dirty_since.is_none() {
            return Ok(());
        }
        if !self.dropped.is_empty() {
            // Dropped readings with no record to ride on: a record of their own.
            let h = RecordHeader::hold(None);
            let now = self.last_now;
            self.seal(Vec::new(), Some(h), now, (self.clock)())?;
        }
        // Acks reach the ledger at most every five seconds from here (see
        // `Queue::commit_paced`); the readings appended are durable now.
        let res = self.queue().commit_paced();
        match res {
            Ok(()) => {
                crate::crashpoint::hit("after-commit");
                Metrics::inc(&self.metrics.queue_commits);
                // For benches timing publish → durable (off unless asked for).
                tracing::trace!(through = self.queue().committed_id(), "queue committed");
                let now = (self.clock)();
                for (dev, boot, seq, ts) in self.uncommitted.drain(..) {
                    self.acks.durable_at(&dev, boot, seq, ts, now);
                }
                self.dirty_since = None;
                Ok(())
            }
            // After a failed fsync the kernel may have dropped the dirty
            // pages, and a retry could "succeed" over lost data. Nothing was
            // acked, so the honest move is a restart: start-up rescans what
            // really is on disk and the devices resend the rest. (The queue
            // refuses every write from now on.)
            Err(e) => Err(Fatal(format!("queue commit failed: {e}; a restart rescans the queue"))),
        }
    }

    /// When [`Pipeline::tick`] next has work, if nothing arrives before.
    pub fn next_deadline(&self) -> Instant {
        let mut checkpoint = self.last_checkpoint + CHECKPOINT_EVERY;
        if self.acks.newly_named() {
            checkpoint = checkpoint.min(self.last_checkpoint + NEW_DEVICE_CHECKPOINT_GAP);
        }
        if let Some((not_before, _)) = self.checkpoint_retry {
            checkpoint = checkpoint.max(not_before);
        }
        let mut d = checkpoint;
        if let Some(b) = self.batcher.deadline() {
            d = d.min(b);
        }
        for b in self.batchers.values() {
            if let Some(t) = b.deadline() {
                d = d.min(t);
            }
        }
        if self.engine.is_some() {
            // Idle windows close on the gateway's clock: look once a second.
            d = d.min(self.rules_ticked + RULES_TICK);
        }
        if let Some(t) = self.dirty_since {
            d = d.min(t + self.fsync_interval);
        }
        d
    }

    /// Time-driven work: close aged batches, group commit, checkpoint.
    /// Returns the acks to write to the devices.
    pub fn tick(&mut self, now: Instant) -> Result<Vec<(Origin, Ack)>, Fatal> {
        self.last_now = self.last_now.max(now);
        let ms = (self.clock)();
        self.flush_tallies();
        if let Some(b) = self.batcher.poll_age(now) {
            self.seal(b, None, now, ms)?;
        }
        let due: Vec<Dest> = self
            .batchers
            .iter()
            .filter(|(_, b)| b.deadline().is_some_and(|t| t <= now))
            .map(|(d, _)| d.clone())
            .collect();
        for d in due {
            if let Some(b) = self.batchers.get_mut(&d).and_then(|b| b.poll_age(now)) {
                self.seal(b, Some(d.header(None)), now, ms)?;
            }
        }
        // Idle windows and rule counters: once a second, not at every tick
        // (the pipeline ticks after each burst of readings).
        if let Some(e) = &mut self.engine
            && now.duration_since(self.rules_ticked) >= RULES_TICK
        {
            self.rules_ticked = now;
            let closed = e.tick(ms);
            self.metrics.set_rules(e.rules().names().zip(e.counts.iter().copied()));
            self.republish_all(closed.iter().flat_map(|c| c.republish.iter().cloned()));
            self.append_closed(closed, now, ms)?;
        }
        if self.dirty_since.is_some_and(|t| now.duration_since(t) >= self.fsync_interval) {
            self.commit()?;
        }
        let since = now.duration_since(self.last_checkpoint);
        // Checkpoint early to free disk space only for sealed segments worth
        // the state file (at least CHECKPOINT_DATA_RATIO times its size, or
        // an eighth of `max_bytes`), or when a batch was refused (a full
        // disk) since the last one: the active segment is all acked whenever
        // the uplink keeps up, and a state file every 5 s for it, then one
        // for every sealed segment, were most of what the gateway wrote at
        // a site's pace (issue 18, docs/performance.md).
        // The records kept for dedup count as the checkpoint would keep
        // them: it moves the hold (the state file on disk still needs the
        // records it names until the next one is written).
        // Looked at once a second at most: the pipeline ticks after every
        // burst of readings under load.
        let reclaim =
            since >= CHECKPOINT_MIN_GAP && now.duration_since(self.reclaim_checked) >= RECLAIM_CHECK_EVERY && {
                self.reclaim_checked = now;
                let q = self.queue();
                let keep = self.dedup_span_of(&q, ms).map_or(0, |s| s.keep);
                let worth = (CHECKPOINT_DATA_RATIO * self.state_bytes).min(q.max_bytes() / 8).max(1);
                q.reclaimable_sealed_bytes_keeping(keep) >= worth
                    || (self.refused_since_checkpoint && q.reclaimable_for_space())
            };
        let new_device = self.acks.newly_named() && since >= NEW_DEVICE_CHECKPOINT_GAP;
        // A state file that leaves dedup to the queue is small, but a start
        // replays the window's records anyway: one every CHECKPOINT_LONGEST
        // (and at each reclaim) is enough; one a minute would write it and
        // its directory again every minute for nothing.
        let periodic = self.changed_since_checkpoint
            && (since >= CHECKPOINT_LONGEST
                || (since >= CHECKPOINT_EVERY
                    && !self.dedup_in_queue
                    && self.queued_since_checkpoint >= CHECKPOINT_DATA_RATIO * self.state_bytes));
        let may_try = self.checkpoint_retry.is_none_or(|(not_before, _)| now >= not_before);
        if (reclaim || new_device || periodic) && may_try {
            match self.checkpoint() {
                Ok(()) => {}
                Err(PipelineError::Fatal(f)) => return Err(f),
                Err(e) => {
                    let pause =
                        self.checkpoint_retry.map_or(CHECKPOINT_RETRY_MIN, |(_, p)| (p * 2).min(CHECKPOINT_EVERY));
                    self.checkpoint_retry = Some((now + pause, pause));
                    Metrics::inc(&self.metrics.checkpoints_failed);
                    self.log_error(format_args!("checkpoint failed: {e} (next try in {}s)", pause.as_secs()));
                }
            }
        }
        let acks = self.acks.take_acks(ms);
        Metrics::add(&self.metrics.acks_sent, acks.len() as u64);
        Metrics::set(&self.metrics.ack_gap_skipped, self.acks.skipped_seqs);
        self.count_queue_fsyncs();
        Ok(acks)
    }

    /// Add the queue's fsyncs and padding since the last call to their counters.
    fn count_queue_fsyncs(&self) {
        let q = self.queue();
        Metrics::add_growth(&self.metrics.fsyncs_queue, &self.queue_fsyncs_counted, q.fsyncs());
        Metrics::add_growth(&self.metrics.queue_pad_bytes, &self.queue_pads_counted, q.pad_bytes());
        Metrics::add_growth(&self.metrics.queue_prefill_bytes, &self.queue_prefill_counted, q.prefill_bytes());
        Metrics::add_growth(
            &self.metrics.queue_deflate_saved_bytes,
            &self.queue_deflate_counted,
            q.deflate_saved_bytes(),
        );
        Metrics::add_growth(&self.metrics.queue_reused_segments, &self.queue_reused_counted, q.reused_segments());
        Metrics::add_growth(&self.metrics.queue_direct_commits, &self.queue_direct_counted, q.direct_commits());
    }

    /// Seal, commit, write the state file, then let the queue delete what
    /// is consumed. Order matters: state first, deletion after.
    pub fn checkpoint(&mut self) -> Result<(), PipelineError> {
        let now = self.last_now.max(self.last_checkpoint);
        if let Some(b) = self.batcher.take() {
            self.seal(b, None, now, (self.clock)())?;
        }
        self.seal_all(now, (self.clock)())?;
        // A failed commit returns here, so from here the state claims only
        // what is on disk.
        self.commit()?;
        let covers_id = self.queue().committed_id();
        let now_ms = (self.clock)();
        let refused = std::mem::take(&mut self.refused_since_checkpoint);
        let span = if refused { None } else { self.dedup_span(now_ms) };
        let dedup_from = span.filter(|s| s.complete).map_or(0, |s| s.from);
        let state = StateOut {
            covers_id,
            acks: self.acks.snapshot(),
            rules: self.engine.as_ref().map(Engine::view).unwrap_or_default(),
            dedup: if dedup_from > 0 { self.dedup.view_unrecorded(now_ms) } else { self.dedup.view(now_ms) },
            dedup_from,
        };
        let written = write_state(&self.state_path, &state);
        if written.is_err() {
            self.refused_since_checkpoint = refused;
        }
        self.state_bytes = written?;
        self.dedup_in_queue = dedup_from > 0;
        // The file, then its directory.
        Metrics::add(&self.metrics.fsyncs_state, 2);
        crate::crashpoint::hit("after-checkpoint");
        self.last_checkpoint = now;
        self.checkpoint_retry = None;
        self.changed_since_checkpoint = false;
        self.queued_since_checkpoint = 0;
        let mut q = self.queue();
        // What the next start replays dedup from stays; so does the record
        // before it, for the next checkpoint to see the window whole.
        q.keep_from(span.map_or(0, |s| s.keep));
        if refused {
            // A full disk, perhaps: kept segment files are space too.
            q.reclaim_space()?;
        } else if q.reclaimable() {
            q.reclaim()?;
        }
        Ok(())
    }

    /// The records the next state file may rebuild dedup from (see "Dedup
    /// from the queue"), if the queue may keep them.
    fn dedup_span(&self, now_ms: u64) -> Option<crate::queue::DedupSpan> {
        self.dedup_span_of(&self.queue(), now_ms)
    }

    /// [`Pipeline::dedup_span`] with the queue already locked.
    fn dedup_span_of(&self, q: &Queue, now_ms: u64) -> Option<crate::queue::DedupSpan> {
        if self.engine.is_some() || self.keys_in_state {
            return None;
        }
        // A second more than the window: keys are kept in rounded units.
        let since = now_ms.saturating_sub(self.dedup.window_ms() + 1_000);
        let span = q.dedup_span(since);
        (span.bytes <= DEDUP_REPLAY_MAX.min(q.max_bytes() / 8)).then_some(span)
    }

    /// Shutdown: everything in the open batch goes to disk; returns the final acks.
    pub fn close(&mut self) -> Result<Vec<(Origin, Ack)>, Fatal> {
        self.flush_tallies();
        match self.checkpoint() {
            Ok(()) => {}
            Err(PipelineError::Fatal(f)) => return Err(f),
            Err(e) => tracing::error!("final checkpoint failed: {e}"),
        }
        if let Err(e) = self.queue().trim() {
            tracing::warn!("cannot cut the zeros or old records after the queue's last record off: {e}");
        }
        let acks = self.acks.take_acks((self.clock)());
        Metrics::add(&self.metrics.acks_sent, acks.len() as u64);
        self.count_queue_fsyncs();
        Ok(acks)
    }
}

/// Read the state file: the dedup keys into `dedup`, the rest returned.
fn read_state(path: &Path, dedup: &mut Dedup) -> std::io::Result<Option<State>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let magics = [STATE_MAGIC, STATE_MAGIC_V4, STATE_MAGIC_V3, STATE_MAGIC_V2, STATE_MAGIC_V1];
    if bytes.len() < 8 || !magics.contains(&&bytes[..4].try_into().expect("4")) {
        return Err(bad("bad magic"));
    }
    let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if CRC.checksum(&bytes[8..]) != crc {
        return Err(bad("checksum mismatch"));
    }
    if &bytes[..4] == STATE_MAGIC_V1 {
        let v1: StateV1 = postcard::from_bytes(&bytes[8..]).map_err(|e| bad(&e.to_string()))?;
        dedup.restore(v1.dedup.into());
        return Ok(Some(State { covers_id: v1.covers_id, acks: v1.acks.into(), ..Default::default() }));
    }
    if &bytes[..4] == STATE_MAGIC_V2 {
        let v2: StateV2 = postcard::from_bytes(&bytes[8..]).map_err(|e| bad(&e.to_string()))?;
        dedup.restore(v2.dedup);
        return Ok(Some(State { covers_id: v2.covers_id, acks: v2.acks, ..Default::default() }));
    }
    use serde::de::DeserializeSeed;
    let mut de = postcard::Deserializer::from_bytes(&bytes[8..]);
    let dedup_from = &bytes[..4] == STATE_MAGIC;
    let delta = dedup_from || &bytes[..4] == STATE_MAGIC_V4;
    StateSeed { dedup, delta, dedup_from }.deserialize(&mut de).map(Some).map_err(|e| bad(&e.to_string()))
}

/// Atomic replace: temp file, fsync, rename, fsync the directory — a power
/// cut leaves either the old file or the new one, never a mix. The body is
/// serialized straight into the file (through a buffer, its CRC computed on
/// the way and written into the header last), not built in memory first.
/// Returns the file's size.
fn write_state(path: &Path, state: &StateOut) -> Result<u64, PipelineError> {
    use std::os::unix::fs::FileExt;
    let err = |source| PipelineError::State { path: path.to_path_buf(), source };
    let tmp = path.with_extension("tmp");
    let f = std::fs::File::create(&tmp).map_err(err)?;
    let mut out = CrcWriter { w: std::io::BufWriter::new(f), crc: CRC.digest(), err: None, len: 8 };
    out.w.write_all(STATE_MAGIC).map_err(err)?;
    out.w.write_all(&[0; 4]).map_err(err)?;
    let mut out = postcard::to_extend(state, out).map_err(|e| err(std::io::Error::other(e)))?;
    if let Some(e) = out.err.take() {
        return Err(err(e));
    }
    let f = out.w.into_inner().map_err(|e| err(e.into_error()))?;
    f.write_all_at(&out.crc.finalize().to_le_bytes(), 4).map_err(err)?;
    f.sync_all().map_err(err)?;
    crate::crashpoint::hit("before-state-rename");
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
    }
    Ok(out.len)
}

/// Where postcard writes the state: the file (buffered) and the CRC. The
/// first write error is kept for after the serializer returns.
struct CrcWriter {
    w: std::io::BufWriter<std::fs::File>,
    crc: crc::Digest<'static, u32, crc::Table<16>>,
    err: Option<std::io::Error>,
    /// Bytes written, the header's included.
    len: u64,
}

impl Extend<u8> for CrcWriter {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, bytes: I) {
        let mut chunk = [0u8; 256];
        let mut n = 0;
        for b in bytes {
            chunk[n] = b;
            n += 1;
            if n == chunk.len() {
                self.put(&chunk);
                n = 0;
            }
        }
        self.put(&chunk[..n]);
    }
}

impl CrcWriter {
    fn put(&mut self, bytes: &[u8]) {
        if self.err.is_none() {
            self.len += bytes.len() as u64;
            self.crc.update(bytes);
            if let Err(e) = self.w.write_all(bytes) {
                self.err = Some(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::reading::Value;

    fn cfg(dir: &Path, extra: &str) -> Config {
        let src = format!(
            "[gateway]\nid = \"t\"\ndata_dir = {:?}\n[pipeline]\nbatch_max_readings = 5\nbatch_max_bytes = 2048\n{extra}",
            dir.display().to_string()
        );
        Config::parse(&src, "t.toml").unwrap()
    }

    fn inc(seq: u64) -> Incoming {
        Incoming {
            reading: Reading {
                device: "d".into(),
                sensor: "hr".into(),
                seq: Some(seq),
                ts: 1000 + seq,
                value: Value::Number(seq as f64),
                boot: None,
            },
            ts_from_device: true,
            origin: Origin::Serial(0),
            packet_id: None,
        }
    }

    fn feed(p: &mut Pipeline, seqs: impl IntoIterator<Item = u64>) {
        for s in seqs {
            p.ingest(inc(s), Instant::now(), now_ms()).unwrap();
        }
    }

    fn queued(p: &Pipeline) -> Vec<u64> {
        let q = p.queue();
        q.read_from(0, usize::MAX)
            .unwrap()
            .into_iter()
            .flat_map(|(_, b)| Batch::decode(&b).unwrap().readings)
            .map(|r| r.seq.unwrap())
            .collect()
    }

    #[test]
    fn acks_wait_for_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), "[store]\nfsync_interval = \"1h\"\n");
        let (mut p, _) = Pipeline::open(&c, Arc::default()).unwrap();
        feed(&mut p, 0..=4); // one full batch, appended, not committed
        assert!(p.tick(Instant::now()).unwrap().is_empty(), "no ack before the fsync");
        p.commit().unwrap();
        assert_eq!(
            p.tick(Instant::now()).unwrap(),
            vec![(Origin::Serial(0), Ack { device: "d".into(), seq: 4, boot: None })]
        );
    }

    #[test]
    fn restart_without_a_state_file_rebuilds_dedup_from_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), "");
        {
            let (mut p, _) = Pipeline::open(&c, Arc::default()).unwrap();
            feed(&mut p, 1..=12);
            p.close().unwrap();
        }
        std::fs::remove_file(dir.path().join("state.bin")).unwrap();
        let m = Arc::new(Metrics::default());
        let (mut p, report) = Pipeline::open(&c, m.clone()).unwrap();
        assert!(!report.state_file_ok && report.replayed_records == 3);
        feed(&mut p, 8..=14); // 8..=12 are resends
        p.close().unwrap();
        assert_eq!(Metrics::get(&m.duplicates_dropped), 5);
        assert_eq!(queued(&p), (1..=14).collect::<Vec<_>>());
    }

    #[test]
    fn state_file_covers_readings_whose_segments_were_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), "[store]\nmax_bytes = 8192\nsegment_bytes = 4096\n");
        {
            let (mut p, _) = Pipeline::open(&c, Arc::default()).unwrap();
            feed(&mut p, 1..=40);
            p.commit().unwrap();
            // A consumer took everything: the segments go, after a checkpoint.
            let id = p.queue().committed_id();
            p.queue().ack_through(id).unwrap();
            p.checkpoint().unwrap();
            assert!(p.queue().read_all_on_disk_after(0).unwrap().len() < 8, "segments were reclaimed");
        }
        let m = Arc::new(Metrics::default());
        let (mut p, _) = Pipeline::open(&c, m.clone()).unwrap();
        feed(&mut p, 1..=40);
        assert_eq!(Metrics::get(&m.duplicates_dropped), 40, "resends of delivered readings stay out");
    }

    /// A checkpoint that fails (here: `state.tmp` is a directory, as good as
    /// a full disk or a data dir deleted under the gateway) is tried again
    /// after 1 s, then 2 s, 4 s…, not at every tick, and the pipeline's next
    /// deadline is not in the past meanwhile (it was: the thread spun at
    /// 100 % of a core, found 2026-12-05). Counted, and over once it works.
    #[test]
    fn a_failed_checkpoint_waits_before_it_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), "");
        let m = Arc::new(Metrics::default());
        let (mut p, _) = Pipeline::open(&c, m.clone()).unwrap();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let blocker = dir.path().join("state.tmp");
        std::fs::create_dir(&blocker).unwrap();
        feed(&mut p, 1..=5);
        p.commit().unwrap();
        let failed = || Metrics::get(&m.checkpoints_failed);
        // Readings and ten minutes: a periodic checkpoint is due.
        let f = 601_000;
        p.tick(at(f)).unwrap();
        assert_eq!(failed(), 1);
        for ms in [1, 500, 999] {
            p.tick(at(f + ms)).unwrap();
            assert_eq!(failed(), 1, "tried again {ms} ms after a failure");
            assert!(p.next_deadline() > at(f + ms), "a deadline in the past makes the pipeline spin");
        }
        p.tick(at(f + 1_000)).unwrap();
        assert_eq!(failed(), 2, "a second try after 1 s");
        p.tick(at(f + 2_500)).unwrap();
        assert_eq!(failed(), 2, "the pause doubles");
        assert!(p.next_deadline() >= at(f + 3_000));
        p.tick(at(f + 3_000)).unwrap();
        assert_eq!(failed(), 3);
        std::fs::remove_dir(&blocker).unwrap();
        assert!(!dir.path().join("state.bin").exists());
        p.tick(at(f + 6_999)).unwrap();
        assert_eq!(failed(), 3, "4 s after the third failure, not before");
        assert!(!dir.path().join("state.bin").exists());
        p.tick(at(f + 7_000)).unwrap();
        assert!(dir.path().join("state.bin").exists(), "the next try writes the state file");
        assert_eq!((failed(), p.checkpoint_retry), (3, None));
    }

    /// `fsyncs_total{file="queue"}` follows the queue's own count (opening,
    /// commits, rolls) at each tick, and `{file="state"}` counts two for each
    /// state file (the file and its directory).
    #[test]
    fn fsyncs_are_counted_by_file() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), "[store]\nsegment_bytes = 4096\n");
        let m = Arc::new(Metrics::default());
        let (mut p, _) = Pipeline::open(&c, m.clone()).unwrap();
        let t0 = Instant::now();
        let counted = || (Metrics::get(&m.fsyncs_queue), Metrics::get(&m.fsyncs_state));
        p.tick(t0).unwrap();
        let opened = p.queue().fsyncs();
        assert!(opened > 0, "opening syncs the directories");
        assert_eq!(counted(), (opened, 0));
        feed(&mut p, 1..=200);
        p.commit().unwrap();
        p.tick(t0 + Duration::from_millis(1)).unwrap();
        let q = p.queue().fsyncs();
        assert!(q > opened + 1, "commits and segment rolls: {opened} -> {q}");
        assert_eq!(counted(), (q, 0));
        p.checkpoint().unwrap();
        p.tick(t0 + Duration::from_millis(2)).unwrap();
        assert_eq!(counted(), (p.queue().fsyncs(), 2));
    }

    /// Issue 18: with an uplink that keeps up, the segment appended to is
    /// all acked most of the time; a state file every CHECKPOINT_MIN_GAP for
    /// it was most of what a gateway wrote at a site's pace.
    #[test]
    fn an_all_acked_active_segment_is_no_reason_to_checkpoint_but_a_sealed_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), "[store]\nsegment_bytes = 4096\n");
        let state = dir.path().join("state.bin");
        let (mut p, _) = Pipeline::open(&c, Arc::default()).unwrap();
        p.keys_in_state = true; // the state file's cadence with every key in it
        let t0 = Instant::now();
        let ack_all = |p: &mut Pipeline| {
            p.commit().unwrap();
            let id = p.queue().committed_id();
            p.queue().ack_through(id).unwrap();
        };
        feed(&mut p, 1..=5);
        ack_all(&mut p);
        p.tick(t0 + Duration::from_secs(1)).unwrap();
        p.tick(t0 + Duration::from_secs(3)).unwrap(); // the new device's checkpoint, if any
        p.checkpoint().unwrap();
        assert!(state.exists());
        std::fs::remove_file(&state).unwrap();
        feed(&mut p, 6..=10); // one whole batch (batch_max_readings = 5)
        ack_all(&mut p);
        assert!(p.queue().reclaimable_sealed_bytes() == 0 && p.queue().reclaimable());
        p.tick(t0 + Duration::from_secs(9)).unwrap();
        assert!(!state.exists(), "a checkpoint for the all-acked active segment alone");
        // Past the first segment: a sealed one, all acked, is worth one.
        let mut next = 11;
        while p.queue().reclaimable_sealed_bytes() == 0 {
            feed(&mut p, [next]);
            next += 1;
            ack_all(&mut p);
        }
        p.tick(t0 + Duration::from_secs(16)).unwrap();
        assert!(state.exists(), "no checkpoint to reclaim a sealed segment");
        assert!(p.queue().reclaimable_sealed_bytes() == 0);
    }

    /// Issue 18: sealed, all-acked segments are reclaimed (which takes a
    /// checkpoint) once they are worth the state file: four times its size,
    /// or an eighth of `max_bytes` if that is less. A state file for every
    /// sealed segment was ~0.6 bytes written per encoded byte at a site's
    /// pace with 1 MiB segments over 6 minutes, and ~1 once the dedup window
    /// is full.
    #[test]
    fn sealed_segments_wait_until_they_are_worth_four_state_files() {
        for max_bytes in [None, Some(64 << 10)] {
            let dir = tempfile::tempdir().unwrap();
            let max = max_bytes.map_or(String::new(), |m| format!("max_bytes = {m}\n"));
            let c = cfg(dir.path(), &format!("[store]\nsegment_bytes = 4096\n{max}"));
            let state = dir.path().join("state.bin");
            let (mut p, _) = Pipeline::open(&c, Arc::default()).unwrap();
            p.keys_in_state = true; // the state file's cadence with every key in it
            let t0 = Instant::now();
            let mut next = 1;
            let mut ack_more = |p: &mut Pipeline, n: u64| {
                feed(p, next..next + n);
                next += n;
                p.commit().unwrap();
                let id = p.queue().committed_id();
                p.queue().ack_through(id).unwrap();
            };
            ack_more(&mut p, 2_000);
            p.checkpoint().unwrap();
            let size = p.state_bytes;
            assert!(size > 10_000, "{size}");
            std::fs::remove_file(&state).unwrap();
            let worth = max_bytes.map_or(4 * size, |m| m / 8);
            assert!(worth < 4 * size || max_bytes.is_none());
            while p.queue().reclaimable_sealed_bytes() + 4096 < worth {
                ack_more(&mut p, 1);
            }
            assert!(p.queue().reclaimable_sealed_bytes() > 0, "a sealed segment, all acked");
            p.tick(t0 + Duration::from_secs(10)).unwrap();
            assert!(
                !state.exists(),
                "a state file of {size} bytes to reclaim {} bytes",
                p.queue().reclaimable_sealed_bytes()
            );
            while p.queue().reclaimable_sealed_bytes() < worth {
                ack_more(&mut p, 1);
            }
            p.tick(t0 + Duration::from_secs(20)).unwrap();
            assert!(state.exists(), "no checkpoint to reclaim {worth} bytes or more");
            assert_eq!(p.queue().reclaimable_sealed_bytes(), 0, "reclaimed");
        }
    }

    /// Issue 18: the periodic state file (every remembered key) waits until
    /// the queue took four times its size, or ten minutes; writing it every
    /// minute regardless was ~2.6 bytes per queued byte at a site's pace.
    #[test]
    fn a_periodic_checkpoint_waits_for_four_state_files_of_data_or_ten_minutes() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), "[store]\nfsync_interval = \"1ms\"\n");
        let state = dir.path().join("state.bin");
        let (mut p, _) = Pipeline::open(&c, Arc::default()).unwrap();
        p.keys_in_state = true; // the state file's cadence with every key in it
        let t0 = Instant::now();
        // Many remembered keys: a big state file.
        let mut next = 1;
        let feed_to = |p: &mut Pipeline, next: &mut u64, n: u64| {
            feed(p, *next..*next + n);
            *next += n;
            p.commit().unwrap();
        };
        feed_to(&mut p, &mut next, 2_000);
        p.checkpoint().unwrap();
        let size = std::fs::metadata(&state).unwrap().len();
        assert!(size > 10_000, "{size}");
        std::fs::remove_file(&state).unwrap();
        // A little data: no checkpoint after 1 or 9 minutes, one after 10.
        feed_to(&mut p, &mut next, 5);
        p.tick(t0 + Duration::from_secs(61)).unwrap();
        p.tick(t0 + Duration::from_secs(540)).unwrap();
        assert!(!state.exists(), "a state file of {size} bytes for a few readings");
        p.tick(t0 + Duration::from_secs(601)).unwrap();
        assert!(state.exists(), "no checkpoint after ten minutes");
        std::fs::remove_file(&state).unwrap();
        // Four state files' worth of readings: one after a minute.
        let per_reading = p.queue().disk_bytes() / next;
        feed_to(&mut p, &mut next, 4 * size / per_reading.max(1) + 500);
        p.tick(t0 + Duration::from_secs(640)).unwrap();
        assert!(!state.exists(), "less than a minute after the last");
        p.tick(t0 + Duration::from_secs(662)).unwrap();
        assert!(state.exists(), "no checkpoint after four state files of data");
    }

    #[test]
    fn a_refused_batch_is_forgotten_so_the_resend_gets_in() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), "[store]\nmax_bytes = 4096\nwhen_full = \"reject_new\"\n");
        let m = Arc::new(Metrics::default());
        let (mut p, _) = Pipeline::open(&c, m.clone()).unwrap();
        let (mut seq, mut next) = (0, 0);
        while Metrics::get(&m.batches_rejected_full) == 0 {
            seq = next;
            feed(&mut p, [seq]);
            next += 1;
        }
        p.commit().unwrap();
        let acked = p.tick(Instant::now()).unwrap().pop().unwrap().1.seq;
        assert!(acked < seq, "the refused readings are not acked");
        // Space comes back; the device resends what was not acked.
        let id = p.queue().committed_id();
        p.queue().ack_through(id).unwrap();
        feed(&mut p, acked + 1..=acked + 5);
        p.commit().unwrap();
        assert_eq!(p.tick(Instant::now()).unwrap().pop().unwrap().1.seq, acked + 5);
        assert_eq!(queued(&p), (acked + 1..=acked + 5).collect::<Vec<_>>());
    }

    /// A refused batch (a full disk, say) makes the next checkpoint delete
    /// the segment files kept for reuse too: they are space. (A queue that
    /// refuses for `max_bytes` has used its kept files in its rolls; the
    /// disk can fill with others' files while the queue is small.)
    #[test]
    fn a_refused_batch_deletes_the_kept_segment_files_at_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), "[store]\nsegment_bytes = 1048576\n");
        let (mut p, _) = Pipeline::open(&c, Arc::default()).unwrap();
        p.keys_in_state = true; // the state file's cadence with every key in it
        let kept = || {
            std::fs::read_dir(dir.path().join("queue/segments"))
                .unwrap()
                .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".tmp"))
                .count()
        };
        let mut next = 0;
        // Three sealed segments, all acked as they come: kept at the checkpoint.
        while p.queue().reclaimable_sealed_bytes() < 3 << 20 {
            feed(&mut p, next..next + 500);
            next += 500;
            p.commit().unwrap();
            let id = p.queue().committed_id();
            p.queue().ack_through(id).unwrap();
        }
        p.checkpoint().unwrap();
        let n = kept();
        assert!(n >= 3, "{n} kept");
        p.checkpoint().unwrap();
        assert_eq!(kept(), n, "kept while nothing is refused");
        // As `ingest` marks a batch the queue refused (ENOSPC).
        p.refused_since_checkpoint = true;
        p.checkpoint().unwrap();
        assert_eq!(kept(), 0, "kept segment files left on a full disk");
    }

    /// The power-cut soak's reject_new finding: a refused batch holds the
    /// device's ack below it for longer than `dedup_window` while readings
    /// above it are stored. The device keeps resending those (they are above
    /// its ack); once their dedup keys aged out they must be answered, not
    /// stored a second time.
    #[test]
    fn readings_above_a_refused_gap_are_not_stored_twice_after_the_dedup_window() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path(), "[store]\nmax_bytes = 4096\nwhen_full = \"reject_new\"\n");
        c.pipeline.dedup_window = Duration::from_millis(1);
        let m = Arc::new(Metrics::default());
        let (mut p, _) = Pipeline::open(&c, m.clone()).unwrap();
        let mut next = 0;
        while Metrics::get(&m.batches_rejected_full) == 0 {
            feed(&mut p, [next]);
            next += 1;
        }
        p.commit().unwrap();
        let acked = p.tick(Instant::now()).unwrap().pop().unwrap().1.seq;
        assert!(acked < next - 1, "the refused readings are not acked");
        // Space comes back; the refused ones are still missing, newer ones get in.
        let id = p.queue().committed_id();
        p.queue().ack_through(id).unwrap();
        let above: Vec<u64> = (next..next + 5).collect();
        feed(&mut p, above.clone());
        p.commit().unwrap();
        assert_eq!(p.tick(Instant::now()).unwrap().pop().map(|(_, a)| a.seq), Some(acked), "the gap holds the ack");
        let stored = queued(&p).len();
        // Past the dedup window the device resends what is above its ack.
        std::thread::sleep(Duration::from_millis(5));
        let stale = Metrics::get(&m.stale_resends);
        feed(&mut p, above.clone());
        p.commit().unwrap();
        assert_eq!(queued(&p).len(), stored, "resends of durable readings above the gap stored again");
        assert_eq!(Metrics::get(&m.stale_resends) - stale, 5);
        // The refused ones come at last: everything is acked, once.
        feed(&mut p, acked + 1..next);
        p.commit().unwrap();
        assert_eq!(p.tick(Instant::now()).unwrap().pop().map(|(_, a)| a.seq), Some(next + 4));
        let mut all = queued(&p);
        all.sort();
        let n = all.len();
        all.dedup();
        assert_eq!(all.len(), n, "a reading queued twice");
    }

    fn reading(seq: u64, ts: u64, v: f64, boot: Option<u32>) -> Reading {
        Reading { device: "d".into(), sensor: "hr".into(), seq: Some(seq), ts, value: Value::Number(v), boot }
    }

    /// State formats 5 (this version's), 4 and 3 (read after an upgrade)
    /// restore the same dedup keys, and format 5 its `dedup_from`; a body
    /// under another format's magic is refused, not misread. Seen failing
    /// with format 3 read as deltas, with format 4 read as format 3, with
    /// `dts` taken from `n`, and with format 4 read as format 5.
    #[test]
    fn state_files_of_formats_5_4_and_3_restore_the_same_dedup_keys() {
        let dir = tempfile::tempdir().unwrap();
        let t = now_ms();
        let now = t + 20_000;
        let mut d = Dedup::new(Duration::from_secs(600), 1_000);
        for s in 0..100 {
            d.check(&reading(1_000 + s, t + s * 100, (60 + s % 7) as f64, Some(1)), true, t + s * 100 + 3);
        }
        let want = d.snapshot(now);
        let path5 = dir.path().join("v5.bin");
        let out = StateOut {
            covers_id: 42,
            dedup: d.view(now),
            acks: AckSnapshot::default(),
            rules: Default::default(),
            dedup_from: 7,
        };
        write_state(&path5, &out).unwrap();
        #[derive(Serialize)]
        struct V3<'a> {
            covers_id: u64,
            dedup: &'a DedupSnapshot,
            acks: AckSnapshot,
            rules: crate::rules::Snapshot,
        }
        let v3 = V3 { covers_id: 42, dedup: &want, acks: AckSnapshot::default(), rules: Default::default() };
        let body3 = postcard::to_allocvec(&v3).unwrap();
        let file = |magic: &[u8; 4], body: &[u8]| {
            let mut b = magic.to_vec();
            b.extend(CRC.checksum(body).to_le_bytes());
            b.extend(body);
            b
        };
        let path3 = dir.path().join("v3.bin");
        std::fs::write(&path3, file(STATE_MAGIC_V3, &body3)).unwrap();
        // Format 4 is format 5 without its last field (7: one byte).
        let body5 = std::fs::read(&path5).unwrap()[8..].to_vec();
        assert_eq!(body5.last(), Some(&7));
        let path4 = dir.path().join("v4.bin");
        std::fs::write(&path4, file(STATE_MAGIC_V4, &body5[..body5.len() - 1])).unwrap();
        for (p, from) in [(&path5, 7), (&path4, 0), (&path3, 0)] {
            let mut e = Dedup::new(Duration::from_secs(600), 1_000);
            let st = read_state(p, &mut e).unwrap().unwrap();
            assert_eq!((st.covers_id, st.dedup_from), (42, from), "{p:?}");
            assert_eq!(e.snapshot(now), want, "{p:?}");
        }
        let swapped = dir.path().join("swapped.bin");
        for (magic, body) in
            [(STATE_MAGIC_V3, &body5), (STATE_MAGIC, &body3), (STATE_MAGIC, &body5[..body5.len() - 1].to_vec())]
        {
            std::fs::write(&swapped, file(magic, body)).unwrap();
            let mut e = Dedup::new(Duration::from_secs(600), 1_000);
            assert!(read_state(&swapped, &mut e).is_err(), "{:?} over another format's body", magic);
        }
    }

    /// Feeds readings, commits and returns the acks the device got.
    fn round(p: &mut Pipeline, rs: &[Reading], from_device: bool) -> Vec<Ack> {
        for r in rs {
            p.ingest(Incoming::new(r.clone(), from_device, Origin::Serial(0)), Instant::now(), now_ms()).unwrap();
        }
        p.checkpoint().unwrap();
        p.tick(Instant::now()).unwrap().into_iter().map(|(_, a)| a).collect()
    }

    fn all_queued(p: &Pipeline) -> Vec<Reading> {
        let q = p.queue();
        q.read_from(0, usize::MAX).unwrap().into_iter().flat_map(|(_, b)| Batch::decode(&b).unwrap().readings).collect()
    }

    /// L1: a device that reboots within the dedup window, restarts its
    /// counter and repeats a value must get its new readings stored, and no
    /// ack that covers them before they are.
    #[test]
    fn a_rebooted_device_repeating_values_is_stored_not_acked_early() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), "");
        let (mut p, _) = Pipeline::open(&c, Arc::default()).unwrap();
        // A 0/1 sensor with a clock: seqs 0..=5 alternate values.
        let first: Vec<_> = (0..=5).map(|s| reading(s, 10_000 + s, (s % 2) as f64, None)).collect();
        let acks = round(&mut p, &first, true);
        assert_eq!(acks.last().map(|a| a.seq), Some(5));
        // Reboot: the counter restarts at 0 with the same values, a later clock.
        let second: Vec<_> = (0..=2).map(|s| reading(s, 20_000 + s, (s % 2) as f64, None)).collect();
        let acks = round(&mut p, &second, true);
        assert!(acks.iter().all(|a| a.seq <= 2), "an ack above 2 would cover readings not sent yet: {acks:?}");
        assert_eq!(all_queued(&p).len(), 9, "the three new readings are stored");
        // The same with a boot id and no clock (ts is the receive time).
        let (mut p, _) = {
            let dir2 = tempfile::tempdir().unwrap();
            let c2 = cfg(dir2.path(), "");
            let r = Pipeline::open(&c2, Arc::default()).unwrap();
            std::mem::forget(dir2);
            r
        };
        let b1: Vec<_> = (0..=5).map(|s| reading(s, now_ms(), 1.0, Some(1))).collect();
        assert_eq!(round(&mut p, &b1, false), vec![Ack { device: "d".into(), seq: 5, boot: Some(1) }]);
        let b2: Vec<_> = (0..=2).map(|s| reading(s, now_ms(), 1.0, Some(2))).collect();
        assert_eq!(round(&mut p, &b2, false), vec![Ack { device: "d".into(), seq: 2, boot: Some(2) }]);
        assert_eq!(all_queued(&p).len(), 9);
    }

    /// D1: a wearable undocked before its ack and redocked after the dedup
    /// window resends what it holds: acked again, not stored twice.
    #[test]
    fn a_resend_after_the_dedup_window_is_acked_not_stored_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path(), "");
        c.pipeline.dedup_window = Duration::from_millis(1);
        let m = Arc::new(Metrics::default());
        let (mut p, _) = Pipeline::open(&c, m.clone()).unwrap();
        let rs: Vec<_> = (0..=4).map(|s| reading(s, 10_000 + s, 70.0, None)).collect();
        assert_eq!(round(&mut p, &rs, true).last().map(|a| a.seq), Some(4));
        std::thread::sleep(Duration::from_millis(5));
        let acks = round(&mut p, &rs, true);
        assert_eq!(acks, vec![Ack { device: "d".into(), seq: 4, boot: None }], "answered with the ack");
        assert_eq!(all_queued(&p).len(), 5, "not stored twice");
        assert_eq!(Metrics::get(&m.stale_resends), 5);
        // And across a restart (the state file carries the watermark).
        drop(p);
        let (mut p, _) = Pipeline::open(&c, m.clone()).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        round(&mut p, &rs, true);
        assert_eq!(all_queued(&p).len(), 5);
    }

    /// A wearable that stamps its readings but numbers none (keyed by ts).
    fn stamped(i: u64) -> Incoming {
        let r = Reading {
            device: "w".into(),
            sensor: "temp".into(),
            seq: None,
            ts: 1_700_000_000_000 + i * 1000,
            value: Value::Number(i as f64),
            boot: None,
        };
        Incoming::new(r, true, Origin::Serial(0))
    }

    /// Issue 18, "Dedup from the queue": without rules the state file names
    /// the dedup window's first queue record instead of listing every key;
    /// the queue keeps the window's records, acked or not, and a start
    /// rebuilds the same keys from them, so the resends of readings no ack
    /// covers (stamped, without seq) are still duplicates after a restart.
    /// As the window moves, older segments go, at the next tick. A refused batch (a full disk)
    /// or a window larger than the bound writes every key again and frees
    /// the held segments (a refused batch at the next tick, even when only
    /// held segments are acked). Seen failing with the start-up replaying from
    /// `covers_id` only, with no hold (`keep_from` never set), with the
    /// keys written whatever the form, and with the reclaim rule counting
    /// the hold of the last checkpoint (it then moved every ten minutes only).
    #[test]
    fn dedup_is_rebuilt_from_the_queues_records_not_listed_in_the_state_file() {
        use std::sync::atomic::Ordering::Relaxed;
        static CLOCK: AtomicU64 = AtomicU64::new(1_800_000_000_000);
        fn clock() -> u64 {
            CLOCK.load(Relaxed)
        }
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), "[store]\nsegment_bytes = 16384\n");
        let m = Arc::new(Metrics::default());
        let (mut p, _) = Pipeline::open_with_clock(&c, m.clone(), clock).unwrap();
        let feed_acked = |p: &mut Pipeline, from: u64, n: u64| {
            for i in from..from + n {
                p.ingest(inc(i), Instant::now(), clock()).unwrap();
                p.ingest(stamped(i), Instant::now(), clock()).unwrap();
                CLOCK.fetch_add(100, Relaxed);
            }
            p.commit().unwrap();
            let id = p.queue().committed_id();
            p.queue().ack_through(id).unwrap();
        };
        // 200 s of two readings every 100 ms, all acked upstream.
        feed_acked(&mut p, 0, 2_000);
        p.checkpoint().unwrap();
        let keys = p.dedup.len();
        assert_eq!(keys, 4_000);
        assert!(p.state_bytes < 1_000, "a state file of {} bytes for {keys} keys", p.state_bytes);
        assert_eq!(p.queue().read_all_on_disk_after(0).unwrap()[0].0.id, 1, "the window's records kept");
        drop(p);
        let (mut p, report) = Pipeline::open_with_clock(&c, m.clone(), clock).unwrap();
        assert!(report.dedup_records > 0);
        assert_eq!(p.dedup.len(), keys, "the same keys rebuilt");
        let queued = all_queued(&p).len();
        for i in 0..2_000 {
            p.ingest(stamped(i), Instant::now(), clock()).unwrap();
        }
        p.checkpoint().unwrap();
        assert_eq!(all_queued(&p).len(), queued, "stamped readings queued again after a restart");

        // Eleven minutes on: the old records leave the window, and the disk
        // at the next tick (a checkpoint moves the hold), not ten minutes on.
        CLOCK.fetch_add(660_000, Relaxed);
        feed_acked(&mut p, 2_000, 100);
        p.tick(Instant::now() + Duration::from_secs(30)).unwrap();
        assert_eq!(p.dedup.len(), 200);
        assert!(p.state_bytes < 1_000);
        // Old records: 800; new ones: 40, kept with the segment before them.
        let first = p.queue().read_all_on_disk_after(0).unwrap()[0].0.id;
        assert!(first > 700, "old records from {first} on still on disk");
        drop(p);
        let (mut p, _) = Pipeline::open_with_clock(&c, m.clone(), clock).unwrap();
        assert_eq!(p.dedup.len(), 200);

        // A full disk: at the next tick, every key in the state file and
        // nothing held (the held records are space too).
        p.refused_since_checkpoint = true;
        p.tick(Instant::now() + Duration::from_secs(60)).unwrap();
        assert!(p.state_bytes > 1_000, "{} bytes for 200 keys", p.state_bytes);
        assert!(p.queue().read_all_on_disk_after(0).unwrap().is_empty(), "held segments on a full disk");
        drop(p);
        let (mut p, report) = Pipeline::open_with_clock(&c, m.clone(), clock).unwrap();
        assert_eq!((p.dedup.len(), report.dedup_records), (200, 0));
        // The window is not all on disk again until it has passed: every
        // key is listed meanwhile.
        feed_acked(&mut p, 2_100, 10);
        p.checkpoint().unwrap();
        assert!(p.state_bytes > 1_000, "records of the window were deleted, yet {} bytes", p.state_bytes);
        CLOCK.fetch_add(660_000, Relaxed);
        feed_acked(&mut p, 2_110, 10);
        p.checkpoint().unwrap();
        assert!(p.state_bytes < 1_000, "{} bytes once the window is on disk", p.state_bytes);
    }

    /// A state file that leaves dedup to the queue comes every ten minutes
    /// while readings flow, not every minute (the full form's cadence for
    /// four state files of data). Seen failing with the full form's rule.
    #[test]
    fn a_state_file_that_leaves_dedup_to_the_queue_is_written_every_ten_minutes() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), "[store]\nfsync_interval = \"1ms\"\n");
        let state = dir.path().join("state.bin");
        let (mut p, _) = Pipeline::open(&c, Arc::default()).unwrap();
        let t0 = Instant::now();
        p.start_clock_at(t0);
        feed(&mut p, 0..2_000); // from 0: no open gap in the acks' state
        p.checkpoint().unwrap();
        assert!(p.dedup_in_queue && p.state_bytes < 1_000, "{} bytes", p.state_bytes);
        std::fs::remove_file(&state).unwrap();
        feed(&mut p, 2_000..4_000);
        p.commit().unwrap();
        p.tick(t0 + Duration::from_secs(61)).unwrap();
        p.tick(t0 + Duration::from_secs(540)).unwrap();
        assert!(!state.exists(), "a state file every minute");
        p.tick(t0 + Duration::from_secs(601)).unwrap();
        assert!(state.exists(), "no state file after ten minutes");
    }

    /// The bound on what the queue keeps for dedup: an eighth of `max_bytes`
    /// here; past it, the state file lists the keys and nothing is held.
    #[test]
    fn a_dedup_window_larger_than_its_bound_is_listed_in_the_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), "[store]\nsegment_bytes = 4096\nmax_bytes = 65536\n");
        let (mut p, _) = Pipeline::open(&c, Arc::default()).unwrap();
        for i in 0..1_000 {
            p.ingest(stamped(i), Instant::now(), now_ms()).unwrap();
        }
        p.commit().unwrap();
        let id = p.queue().committed_id();
        p.queue().ack_through(id).unwrap();
        assert!(p.queue().disk_bytes() > 65536 / 8);
        p.checkpoint().unwrap();
        assert!(p.state_bytes > 4_000, "{} bytes for 1,000 keys", p.state_bytes);
        assert!(p.queue().read_all_on_disk_after(0).unwrap().len() < 20, "held beyond the bound");
    }

    /// L3: BTHome packet ids wrap (u8); a sensor measuring every 2 s reuses
    /// an id within the dedup window. Only a repeat of the *last* id is one.
    #[test]
    fn bthome_packet_ids_that_wrap_are_not_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), "");
        let m = Arc::new(Metrics::default());
        let (mut p, _) = Pipeline::open(&c, m.clone()).unwrap();
        let advert = |id: u8| Incoming {
            packet_id: Some(id),
            ..Incoming::new(
                Reading {
                    device: "th".into(),
                    sensor: "humidity".into(),
                    seq: None,
                    ts: now_ms(),
                    value: Value::Number(50.0),
                    boot: None,
                },
                false,
                Origin::Ble,
            )
        };
        for i in 0..600u32 {
            let id = (i % 256) as u8;
            p.ingest(advert(id), Instant::now(), now_ms()).unwrap();
            // Each advert is repeated (sensors send it several times).
            p.ingest(advert(id), Instant::now(), now_ms()).unwrap();
        }
        p.checkpoint().unwrap();
        assert_eq!(all_queued(&p).len(), 600, "every measurement once, across two wraps");
        assert_eq!(Metrics::get(&m.duplicates_dropped), 600);
        // The repeat rule survives a restart (state file).
        drop(p);
        let (mut p, _) = Pipeline::open(&c, m.clone()).unwrap();
        p.ingest(advert((599 % 256) as u8), Instant::now(), now_ms()).unwrap();
        p.checkpoint().unwrap();
        assert_eq!(all_queued(&p).len(), 600);
    }
}
