//! Model-based test of the core promise, in process and fast: random
//! devices send, resend and duplicate readings, reboot, go away for longer
//! than the dedup window and lose frames; the pipeline batches, commits,
//! acks, checkpoints, is stopped cleanly or dropped as a SIGKILL would leave
//! it, and is reopened. After every reopen and at the end:
//!
//! * every reading a device saw acked is queued or consumed, exactly once —
//!   or it is in a queue record the `drop_oldest` policy evicted, by id;
//! * no reading is queued or consumed twice;
//! * what is missing is exactly the evicted records' readings that were not
//!   consumed (identity, not a count);
//! * at the end, once devices resend what they hold, every reading a device
//!   did not throw away itself is queued or consumed exactly once.
//!
//! Devices come in the kinds a gateway meets (docs/firmware-protocol.md):
//!
//! * **boot id**: sends `boot`, bumped at each start; its seq restarts at 0
//!   per boot, and it keeps unacked readings across a reboot (flash);
//! * **clock**: stamps `ts` from a clock that survives reboots; without a
//!   boot id it restarts its counter at 0 on reboot and loses what it held
//!   (RAM only);
//! * **plain**: neither: it must not restart its counter, so a reboot only
//!   reconnects it (its seq and its unacked readings persist);
//! * **stamp**: no seq, its own `ts` (a BLE thermometer syncing its history):
//!   gets no acks and resends what it measured in the last
//!   [`STAMP_HISTORY_MS`] at every resend, across gateway restarts too, so
//!   only dedup (its keys rebuilt at start-up) keeps those readings single.
//!
//! Every kind repeats values often (a 0/1 sensor, a battery %), loses the
//! first frame after a (re)connect now and then (a port opened mid-line),
//! and goes away for longer than `dedup_window` before resending.
//!
//! Runs use a large queue, a tiny `reject_new` one drained by a consumer
//! (standing in for the uplink), or a tiny `drop_oldest` one that overflows.
//!
//! A dropped `Pipeline` models SIGKILL exactly: what it had written is in
//! the page cache (and so in the files), nothing after that point ran.

use edge_gateway::config::Config;
use edge_gateway::metrics::Metrics;
use edge_gateway::pipeline::Pipeline;
use edge_gateway::reading::{Ack, Batch, Incoming, Reading, Value};
use edge_gateway::rng::XorShift;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Virtual wall clock (unix ms) the pipeline reads: time moves only when the
/// model says so, so timeouts relate to steps, not to how fast this runs.
static CLOCK: AtomicU64 = AtomicU64::new(1_800_000_000_000);

fn clock() -> u64 {
    CLOCK.load(Ordering::SeqCst)
}

const DEDUP_WINDOW_MS: u64 = 3_000;

/// How far back a `Kind::Stamp` device resends: inside the dedup window
/// (an older resend is a new reading to any gateway; docs/exactly-once.md).
const STAMP_HISTORY_MS: u64 = 2_000;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Boot,
    Clock,
    Plain,
    Stamp,
}

/// What names one reading for the model, whatever the device kind:
/// `(device, boot, seq, ts)`, with ts only for clocked devices (whose
/// counter restarts, or who send no seq: `u64::MAX` then) and 0 otherwise
/// (a plain device's resend gets a new receive time).
type Key = (String, Option<u32>, u64, u64);

struct Device {
    name: String,
    kind: Kind,
    boot: u32,
    next_seq: u64,
    /// Device clock (unix ms), for `Kind::Clock`.
    clock_ms: u64,
    /// Unacked readings, by (boot, seq).
    pending: BTreeMap<(u32, u64), Reading>,
    /// Readings an ack covered (the device forgot them).
    acked: Vec<Reading>,
    /// Readings the device threw away itself (a RAM-only reboot).
    discarded: Vec<Reading>,
    created: Vec<Reading>,
    /// Virtual ms of the last full resend: real devices resend on a timer.
    last_resend_ms: u64,
    /// The next frame it sends is lost (just (re)connected mid-line).
    lose_next: bool,
    /// Index in `created` of this incarnation's first reading: a RAM-only
    /// device can resend nothing from before its last reboot.
    incarnation: usize,
    /// Away (undocked, out of range) until this virtual ms: sends nothing,
    /// gets no acks.
    away_until: u64,
    /// `Kind::Stamp`: what it measured, with the virtual ms it did.
    history: Vec<(u64, Reading)>,
}

impl Device {
    fn new(i: usize, rng: &mut XorShift) -> Device {
        let kind = [Kind::Boot, Kind::Clock, Kind::Plain, Kind::Stamp][i % 4];
        // Devices do not always start at 0: they existed before this gateway.
        Device {
            name: format!("dev-{i}"),
            kind,
            boot: rng.below(5) as u32,
            next_seq: if rng.chance(0.5) { 0 } else { 1 + rng.below(1000) },
            clock_ms: 1_764_000_000_000,
            pending: BTreeMap::new(),
            acked: Vec::new(),
            discarded: Vec::new(),
            created: Vec::new(),
            last_resend_ms: 0,
            lose_next: rng.chance(0.5),
            incarnation: 0,
            away_until: 0,
            history: Vec::new(),
        }
    }

    fn key(&self, r: &Reading) -> Key {
        let ts = if matches!(self.kind, Kind::Clock | Kind::Stamp) { r.ts } else { 0 };
        (r.device.clone(), r.boot, r.seq.unwrap_or(u64::MAX), ts)
    }

    fn create(&mut self, rng: &mut XorShift, virtual_ms: u64) -> Reading {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.clock_ms += 10 + rng.below(50);
        let sensor = ["hr", "temp", "door"][rng.below(3) as usize];
        // Values repeat a lot: a 0/1 sensor, a resting heart rate.
        let value = if rng.chance(0.6) { rng.below(2) as f64 } else { 60.0 + rng.below(5) as f64 };
        let r = Reading {
            device: self.name.clone(),
            sensor: sensor.into(),
            seq: Some(seq),
            // Plain devices send no ts: the pipeline sees the receive time.
            ts: self.clock_ms,
            value: Value::Number(value),
            boot: (self.kind == Kind::Boot).then_some(self.boot),
        };
        if self.kind == Kind::Stamp {
            let r = Reading { seq: None, ..r };
            self.history.push((virtual_ms, r.clone()));
            self.created.push(r.clone());
            return r;
        }
        self.pending.insert((self.boot, seq), r.clone());
        self.created.push(r.clone());
        r
    }

    /// What a `Kind::Stamp` device resends now.
    fn recent(&self, virtual_ms: u64) -> Vec<Reading> {
        let since = virtual_ms.saturating_sub(STAMP_HISTORY_MS);
        self.history.iter().filter(|(at, _)| *at >= since).map(|(_, r)| r.clone()).collect()
    }

    fn ack(&mut self, a: &Ack) {
        // Firmware rule (docs/firmware-protocol.md): an ack at or above the next seq is from
        // before a reboot (the gateway never acks what it was not sent):
        // ignore it. Without it a device without boot id that reboots loses
        // its first readings to the old incarnation's ack still on the wire.
        if a.seq >= self.next_seq && a.boot.is_none_or(|b| b == self.boot) {
            return;
        }
        let boot_of = |r: &Reading| r.boot;
        let covered: Vec<(u32, u64)> = self
            .pending
            .iter()
            .filter(|(_, r)| boot_of(r) == a.boot && r.seq.unwrap() <= a.seq)
            .map(|(k, _)| *k)
            .collect();
        for k in covered {
            let r = self.pending.remove(&k).unwrap();
            self.acked.push(r);
        }
    }

    /// This incarnation had an ack covering a seq of 2 or more. Below that,
    /// a reboot is a case the gateway cannot see (docs/exactly-once.md, "What
    /// remains"): after an incarnation acked up to seq 0, a new one whose
    /// first frame (seq 0) is lost sends seq 1, which looks like the old
    /// incarnation's next (found once the model ran four devices).
    fn acked_since_reboot(&self) -> bool {
        self.acked.iter().any(|r| r.seq.is_some_and(|s| s >= 2) && self.created[self.incarnation..].contains(r))
    }

    fn reboot(&mut self, rng: &mut XorShift) {
        self.lose_next = rng.chance(0.5);
        match self.kind {
            Kind::Boot => {
                self.boot += 1;
                self.next_seq = 0;
            }
            Kind::Clock => {
                self.next_seq = if rng.chance(0.5) { 0 } else { 1 };
                let lost: Vec<Reading> = std::mem::take(&mut self.pending).into_values().collect();
                self.discarded.extend(lost);
                self.incarnation = self.created.len();
            }
            // A stamp device keeps its history (flash) and its clock.
            Kind::Plain | Kind::Stamp => {}
        }
    }
}

fn config(dir: &std::path::Path, rng: &mut XorShift, mode: u64) -> Config {
    // A third of the runs have a tiny queue that refuses new batches when
    // full (`reject_new`), a third one that evicts the oldest (`drop_oldest`),
    // so both policies are exercised.
    let (max_bytes, when_full, batch_bytes) = match mode {
        0 => ("8KiB", "reject_new", "2KiB"),
        1 => ("8KiB", "drop_oldest", "2KiB"),
        _ => ("64MiB", "drop_oldest", "64KiB"),
    };
    let src = format!(
        "[gateway]\nid = \"model\"\ndata_dir = {:?}\n[pipeline]\nbatch_max_readings = {}\nbatch_max_age = \"40ms\"\nack_gap_timeout = \"2s\"\n\
         dedup_window = \"{DEDUP_WINDOW_MS}ms\"\nbatch_max_bytes = {batch_bytes:?}\n\
         [store]\nfsync_interval = \"30ms\"\nsegment_bytes = {}\nmax_bytes = {max_bytes:?}\nwhen_full = {when_full:?}\nopen_check = {:?}\n",
        dir.display().to_string(),
        1 + rng.below(20),
        2048 + rng.below(8192),
        if rng.chance(0.5) { "full" } else { "index" },
    );
    Config::parse(&src, "model.toml").unwrap()
}

struct Model {
    devices: Vec<Device>,
    /// Every record ever seen in the queue: id → its readings' keys.
    records: HashMap<u64, Vec<Key>>,
    /// Records `drop_oldest` evicted (from the pipeline's report), by id.
    evicted: HashSet<u64>,
    /// Consumed (delivered) readings, with copies.
    delivered: HashMap<Key, usize>,
    /// Highest record id in `records`.
    seen_through: u64,
    seed: u64,
}

impl Model {
    fn key_of(&self, r: &Reading) -> Key {
        let d = self.devices.iter().find(|d| d.name == r.device).unwrap();
        d.key(r)
    }

    /// Remember which readings each new record holds (called after every
    /// pipeline call, so no record is evicted unseen), and note what the
    /// pipeline says it evicted.
    fn observe(&mut self, p: &Pipeline) {
        for ids in p.evicted_records() {
            self.evicted.extend(ids.clone());
        }
        let q = p.queue_handle();
        let q = q.lock().unwrap();
        for (meta, payload) in q.read_all_on_disk_after(self.seen_through).unwrap() {
            let keys: Vec<Key> = Batch::decode(&payload).unwrap().readings.iter().map(|r| self.key_of(r)).collect();
            self.records.insert(meta.id, keys);
            self.seen_through = self.seen_through.max(meta.id);
        }
    }

    /// `key` → copies in the queue (live records).
    fn queued(&mut self, p: &Pipeline) -> HashMap<Key, usize> {
        self.observe(p);
        let q = p.queue_handle();
        let q = q.lock().unwrap();
        let mut m = HashMap::new();
        for (meta, _) in q.read_from(0, usize::MAX).unwrap() {
            for k in &self.records[&meta.id] {
                *m.entry(k.clone()).or_insert(0) += 1;
            }
        }
        m
    }

    /// A consumer (the uplink) takes up to `n` batches off the queue and
    /// acknowledges them durably; what it took counts as delivered.
    fn consume(&mut self, p: &Pipeline, n: usize) {
        let q = p.queue_handle();
        let mut q = q.lock().unwrap();
        let records = q.read_from(0, n).unwrap();
        let Some((last, _)) = records.last() else { return };
        let last = last.id;
        for (_, payload) in records {
            for r in Batch::decode(&payload).unwrap().readings {
                *self.delivered.entry(self.key_of(&r)).or_insert(0) += 1;
            }
        }
        q.ack_through(last).unwrap();
        q.commit().unwrap();
    }

    fn check(&mut self, p: &Pipeline, step: usize) {
        let seed = self.seed;
        let mut have = self.queued(p);
        for (k, n) in &self.delivered {
            *have.entry(k.clone()).or_insert(0) += n;
        }
        if let Some((k, n)) = have.iter().find(|(_, n)| **n > 1) {
            panic!("seed {seed} step {step}: {k:?} is queued or delivered {n} times");
        }
        // Readings of evicted records that were never delivered: lost by policy.
        let evicted: HashSet<&Key> = self
            .evicted
            .iter()
            .flat_map(|id| {
                self.records.get(id).unwrap_or_else(|| panic!("seed {seed}: evicted record {id} never seen"))
            })
            .filter(|k| !self.delivered.contains_key(*k))
            .collect();
        // (An evicted reading may be queued again: its device, not acked, resent it.)
        let mut missing = Vec::new();
        for d in &self.devices {
            for r in &d.acked {
                let k = d.key(r);
                if !have.contains_key(&k) && !evicted.contains(&k) {
                    missing.push(k);
                }
            }
        }
        assert!(
            missing.is_empty(),
            "seed {seed} step {step}: {} acked readings are neither queued, delivered nor in an evicted record: {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
    }
}

/// Returns how many batches the queue refused, how many readings it
/// evicted, and how many reboots and stale resends the run had (to prove
/// each path ran).
fn run(seed: u64, steps: usize) -> [u64; 4] {
    let mut rng = XorShift::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let mode = seed % 3;
    let cfg = config(dir.path(), &mut rng, mode);
    // The large queue (mode 2)'s consumer keeps up, as an uplink mostly does.
    let keeps_up = mode == 2;
    // Only `reject_new` queues need a consumer to make progress; without one,
    // the small `drop_oldest` queue really overflows. The large one has one
    // too, so that acked records are deleted while dedup may still need them.
    let consumer = cfg.store.when_full == edge_gateway::config::WhenFull::RejectNew || keeps_up;
    let mut m = Model {
        devices: (0..4).map(|i| Device::new(i, &mut rng)).collect(),
        records: HashMap::new(),
        evicted: HashSet::new(),
        delivered: HashMap::new(),
        seen_through: 0,
        seed,
    };
    let base = Instant::now();
    let mut virtual_ms = 0u64;
    let mut reboots = 0;
    let metrics = Arc::new(Metrics::default());
    let (mut p, _) = Pipeline::open_with_clock(&cfg, metrics.clone(), clock).unwrap();
    p.start_clock_at(base);
    let trace = std::env::var("MODEL_TRACE").is_ok();
    // One frame from device `d` to the pipeline (or lost on the wire).
    let feed = |p: &mut Pipeline, dev: &mut Device, r: Reading, virtual_ms: u64| {
        if std::mem::take(&mut dev.lose_next) {
            return;
        }
        let now = base + Duration::from_millis(virtual_ms);
        CLOCK.store(1_800_000_000_000 + virtual_ms, Ordering::SeqCst);
        let from_device = dev.kind != Kind::Plain;
        let r = if from_device { r } else { Reading { ts: clock(), ..r } };
        p.ingest(Incoming::new(r, from_device, edge_gateway::Origin::Serial(0)), now, clock()).unwrap();
    };
    let deliver = |devices: &mut Vec<Device>,
                   acks: Vec<(edge_gateway::Origin, Ack)>,
                   rng: &mut XorShift,
                   now_ms: u64,
                   lossy: bool| {
        for (_, a) in acks {
            if trace {
                eprintln!("  ack {a:?}");
            }
            let dev = devices.iter_mut().find(|d| d.name == a.device).unwrap();
            // Acks get lost on the wire too, and never reach a device that is away.
            if (!lossy || rng.chance(0.9)) && dev.away_until <= now_ms {
                dev.ack(&a);
            }
        }
    };
    let resend_all = |p: &mut Pipeline, dev: &mut Device, virtual_ms: u64| {
        let mut pending: Vec<Reading> = dev.pending.values().cloned().collect();
        pending.extend(dev.recent(virtual_ms));
        for r in pending {
            feed(p, dev, r, virtual_ms);
        }
    };
    for step in 0..steps {
        let d = rng.below(m.devices.len() as u64) as usize;
        let op = rng.below(100);
        if trace {
            eprintln!(
                "step {step}: dev {d} op {op} pending {:?} acked {}",
                m.devices[d].pending.keys().collect::<Vec<_>>(),
                m.devices[d].acked.len()
            );
        }
        let away = m.devices[d].away_until > virtual_ms;
        if away && op < 69 {
            continue; // it is not here to do anything
        }
        // A device's resend timer (1 s virtual) fires before it does anything else.
        let holds = !m.devices[d].pending.is_empty() || !m.devices[d].recent(virtual_ms).is_empty();
        if !away && holds && virtual_ms.saturating_sub(m.devices[d].last_resend_ms) >= 1000 {
            m.devices[d].last_resend_ms = virtual_ms;
            resend_all(&mut p, &mut m.devices[d], virtual_ms);
        }
        match op {
            0..=49 => {
                let r = m.devices[d].create(&mut rng, virtual_ms);
                feed(&mut p, &mut m.devices[d], r, virtual_ms);
            }
            50..=57 => resend_all(&mut p, &mut m.devices[d], virtual_ms),
            58..=63 => {
                // A duplicate of anything recent, acked or not, of this boot.
                // (A RAM-only device has nothing from before its reboot.)
                // (A stamp device repeats only what it would resend: older is new.)
                let dev = &m.devices[d];
                let n = if dev.kind == Kind::Stamp {
                    dev.recent(virtual_ms).len()
                } else {
                    dev.created.len() - dev.incarnation
                };
                if n > 0 {
                    let r = dev.created[dev.created.len() - 1 - rng.below(n.min(50) as u64) as usize].clone();
                    feed(&mut p, &mut m.devices[d], r, virtual_ms);
                }
            }
            // A device without boot id reboots only once its incarnation had
            // an ack: two reboots in a row with the second's first frame lost
            // can look like one incarnation (docs/exactly-once.md, "What
            // remains"); firmware that reboots often must send `boot`.
            64..=66 if m.devices[d].kind != Kind::Clock || m.devices[d].acked_since_reboot() => {
                reboots += 1;
                m.devices[d].reboot(&mut rng);
            }
            64..=66 => {}
            67..=68 => {
                // Away (undocked, out of range) for longer than the dedup
                // window; back, it loses a frame now and then and resends
                // what it holds (its resend timer has long fired).
                m.devices[d].away_until = virtual_ms + DEDUP_WINDOW_MS + 500 + rng.below(2000);
                m.devices[d].lose_next = rng.chance(0.5);
            }
            89..=90 if consumer => m.consume(&p, if keeps_up { usize::MAX } else { 1 + rng.below(3) as usize }),
            89..=92 => {}
            69..=88 => {
                // Time passes: up to 400 ms, so a device (picked every third
                // step or so) still resends within its 1 s timer.
                virtual_ms += rng.below(400);
                CLOCK.store(1_800_000_000_000 + virtual_ms, Ordering::SeqCst);
                let acks = p.tick(base + Duration::from_millis(virtual_ms)).unwrap();
                deliver(&mut m.devices, acks, &mut rng, virtual_ms, true);
            }
            93..=96 => {
                // SIGKILL: nothing more runs; whatever was written stays.
                m.observe(&p);
                drop(p);
                p = Pipeline::open_with_clock(&cfg, metrics.clone(), clock).unwrap().0;
                p.start_clock_at(base + Duration::from_millis(virtual_ms));
                m.check(&p, step);
            }
            _ => {
                let acks = p.close().unwrap();
                m.observe(&p);
                deliver(&mut m.devices, acks, &mut rng, virtual_ms, true);
                drop(p);
                p = Pipeline::open_with_clock(&cfg, metrics.clone(), clock).unwrap().0;
                p.start_clock_at(base + Duration::from_millis(virtual_ms));
                m.check(&p, step);
            }
        }
        m.observe(&p);
    }
    // Drain: devices resend what they hold until all of it is acked.
    for round in 0.. {
        if round >= 80 {
            let q = m.queued(&p);
            for d in &m.devices {
                let held: Vec<_> =
                    d.pending.values().map(|r| (r.boot, r.seq.unwrap(), q.contains_key(&d.key(r)))).collect();
                eprintln!("{} ({:?}): pending (boot, seq, queued?) {:?}", d.name, d.kind, held);
            }
            panic!("seed {seed}: acks never caught up");
        }
        if m.devices.iter().all(|d| d.pending.is_empty()) {
            break;
        }
        for d in m.devices.iter_mut() {
            d.away_until = 0; // everyone is back for the drain
        }
        // The consumer keeps up, so a full queue refuses nothing for long.
        if consumer {
            m.consume(&p, usize::MAX);
        }
        for d in 0..m.devices.len() {
            resend_all(&mut p, &mut m.devices[d], virtual_ms);
        }
        // Devices resend every 500 ms (virtual): well inside the 2 s gap timeout.
        virtual_ms += 500;
        CLOCK.store(1_800_000_000_000 + virtual_ms, Ordering::SeqCst);
        let acks = p.close().unwrap();
        m.observe(&p);
        deliver(&mut m.devices, acks, &mut rng, virtual_ms, false);
    }
    m.check(&p, steps);
    let mut all = m.queued(&p);
    for (k, n) in &m.delivered {
        *all.entry(k.clone()).or_insert(0) += n;
    }
    assert!(all.values().all(|&n| n == 1), "seed {seed}: ... exactly once");
    // Every reading a device did not throw away is here, or evicted by name.
    // (A stamp device gets no acks: what the wire or a full queue lost in
    // every send is gone, and it knows nothing of it.)
    let evicted: HashSet<Key> = m.evicted.iter().flat_map(|id| m.records[id].clone()).collect();
    for d in m.devices.iter().filter(|d| d.kind != Kind::Stamp) {
        for r in d.created.iter().filter(|r| !d.discarded.contains(r)) {
            let k = d.key(r);
            assert!(all.contains_key(&k) || evicted.contains(&k), "seed {seed}: {k:?} ({:?}) never stored", d.kind);
        }
    }
    [
        Metrics::get(&metrics.batches_rejected_full),
        Metrics::get(&metrics.readings_dropped_full),
        reboots,
        Metrics::get(&metrics.stale_resends),
    ]
}

#[test]
fn random_sends_resends_reboots_absences_kills_and_restarts_keep_exactly_once() {
    let seeds: u64 = std::env::var("EDGE_GATEWAY_MODEL_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(40);
    let first: u64 = std::env::var("EDGE_GATEWAY_MODEL_FIRST_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let totals = (first..first + seeds).map(|seed| run(seed, 600)).fold([0; 4], |mut t, r| {
        t.iter_mut().zip(r).for_each(|(a, b)| *a += b);
        t
    });
    let [refused, dropped, reboots, stale] = totals;
    assert!(refused > 0, "no run filled its queue: the reject_new path went untested");
    assert!(dropped > 0, "no run evicted anything: the drop_oldest path went untested");
    assert!(reboots > 0, "no device rebooted");
    assert!(stale > 0, "no resend came after its dedup key expired: the covered-seq path went untested");
}
