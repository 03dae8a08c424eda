//! Model-based test of the core promise, in process and fast: random
//! devices send, resend and duplicate readings; the pipeline batches,
//! commits, acks, checkpoints, is stopped cleanly or dropped as a SIGKILL
//! would leave it, and is reopened. After every reopen and at the end:
//!
//! * every reading a device saw acked is queued or consumed, exactly once
//!   (under `drop_oldest`, up to the counted evictions may be missing);
//! * no reading is queued or consumed twice;
//! * at the end, once devices resend what they hold, every reading ever
//!   created is queued or consumed exactly once (less the counted evictions).
//!
//! Runs use a large queue, a tiny `reject_new` one drained by a consumer
//! (standing in for the uplink), or a tiny `drop_oldest` one that overflows.
//!
//! A dropped `Pipeline` models SIGKILL exactly: what it had written is in
//! the page cache (and so in the files), nothing after that point ran.

use edge_gateway::config::Config;
use edge_gateway::metrics::Metrics;
use edge_gateway::pipeline::Pipeline;
use edge_gateway::reading::{Batch, Incoming, Reading, Value};
use edge_gateway::sim::XorShift;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Virtual wall clock (unix ms) the pipeline reads: time moves only when the
/// model says so, so timeouts relate to steps, not to how fast this runs.
static CLOCK: AtomicU64 = AtomicU64::new(1_800_000_000_000);

fn clock() -> u64 {
    CLOCK.load(Ordering::SeqCst)
}

struct Device {
    name: String,
    next_seq: u64,
    pending: BTreeMap<u64, Reading>,
    acked: Option<u64>,
    created: Vec<Reading>,
    /// Virtual ms of the last full resend: real devices resend on a timer.
    last_resend_ms: u64,
}

impl Device {
    fn new(i: usize, rng: &mut XorShift) -> Device {
        // Devices do not start at 1: they existed before this gateway.
        Device {
            name: format!("dev-{i}"),
            next_seq: 1 + rng.below(1000),
            pending: BTreeMap::new(),
            acked: None,
            created: Vec::new(),
            last_resend_ms: 0,
        }
    }

    fn create(&mut self, rng: &mut XorShift) -> Reading {
        let seq = self.next_seq;
        self.next_seq += 1;
        let sensor = ["hr", "temp", "spo2"][rng.below(3) as usize];
        let r = Reading {
            device: self.name.clone(),
            sensor: sensor.into(),
            seq: Some(seq),
            ts: 1_764_000_000_000 + seq * 10,
            value: Value::Number(rng.below(200) as f64),
            boot: None,
        };
        self.pending.insert(seq, r.clone());
        self.created.push(r.clone());
        r
    }

    fn ack(&mut self, seq: u64) {
        if self.acked.is_none_or(|a| seq > a) {
            self.acked = Some(seq);
        }
        self.pending = self.pending.split_off(&(seq + 1));
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
         batch_max_bytes = {batch_bytes:?}\n\
         [store]\nfsync_interval = \"30ms\"\nsegment_bytes = {}\nmax_bytes = {max_bytes:?}\nwhen_full = {when_full:?}\nopen_check = {:?}\n",
        dir.display().to_string(),
        1 + rng.below(20),
        2048 + rng.below(8192),
        if rng.chance(0.5) { "full" } else { "index" },
    );
    Config::parse(&src, "model.toml").unwrap()
}

/// `(device, sensor, seq)` → copies in the queue (every record still live).
fn queued(p: &Pipeline) -> HashMap<(String, String, u64), usize> {
    let q = p.queue_handle();
    let q = q.lock().unwrap();
    let mut m = HashMap::new();
    for (_, payload) in q.read_from(0, usize::MAX).unwrap() {
        for r in Batch::decode(&payload).unwrap().readings {
            *m.entry((r.device, r.sensor, r.seq.unwrap())).or_insert(0) += 1;
        }
    }
    m
}

type Key = (String, String, u64);

/// A consumer (the future uplink) takes up to `n` batches off the queue and
/// acknowledges them durably; what it took counts as delivered.
fn consume(p: &Pipeline, n: usize, delivered: &mut HashMap<Key, usize>) {
    let q = p.queue_handle();
    let mut q = q.lock().unwrap();
    let records = q.read_from(0, n).unwrap();
    let Some((last, _)) = records.last() else { return };
    let last = last.id;
    for (_, payload) in records {
        for r in Batch::decode(&payload).unwrap().readings {
            *delivered.entry((r.device, r.sensor, r.seq.unwrap())).or_insert(0) += 1;
        }
    }
    q.ack_through(last).unwrap();
    q.commit().unwrap();
}

/// `dropped`: readings the `drop_oldest` policy evicted (counted); acked
/// readings may be missing up to that many, never more.
fn check(p: &Pipeline, devices: &[Device], delivered: &HashMap<Key, usize>, dropped: u64, seed: u64, step: usize) {
    let mut q = queued(p);
    for (k, n) in delivered {
        *q.entry(k.clone()).or_insert(0) += n;
    }
    if let Some((k, n)) = q.iter().find(|(_, n)| **n > 1) {
        panic!("seed {seed} step {step}: {k:?} is queued or delivered {n} times");
    }
    let mut missing = Vec::new();
    for d in devices {
        for r in d.created.iter().filter(|r| d.acked.is_some_and(|a| r.seq.unwrap() <= a)) {
            let k = (r.device.clone(), r.sensor.clone(), r.seq.unwrap());
            if !q.contains_key(&k) {
                missing.push(k);
            }
        }
    }
    assert!(
        missing.len() as u64 <= dropped,
        "seed {seed} step {step}: {} acked readings are neither queued nor delivered ({dropped} dropped by policy): {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

/// Returns how many batches the queue refused and how many readings it
/// evicted (to prove both policies ran).
fn run(seed: u64, steps: usize) -> (u64, u64) {
    let mut rng = XorShift::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &mut rng, seed % 3);
    // Only `reject_new` queues need a consumer to make progress; without one,
    // the small `drop_oldest` queue really overflows.
    let consumer = cfg.store.when_full == edge_gateway::config::WhenFull::RejectNew;
    let mut devices: Vec<Device> = (0..3).map(|i| Device::new(i, &mut rng)).collect();
    let base = Instant::now();
    let mut virtual_ms = 0u64;
    let mut delivered: HashMap<Key, usize> = HashMap::new();
    let metrics = Arc::new(Metrics::default());
    let (mut p, _) = Pipeline::open_with_clock(&cfg, metrics.clone(), clock).unwrap();
    let feed = |p: &mut Pipeline, r: Reading, virtual_ms: u64| {
        let now = base + Duration::from_millis(virtual_ms);
        CLOCK.store(1_800_000_000_000 + virtual_ms, Ordering::SeqCst);
        p.ingest(Incoming::new(r, true, 0), now, clock());
    };
    let deliver = |devices: &mut Vec<Device>, acks: Vec<(usize, edge_gateway::Ack)>, rng: &mut XorShift| {
        for (_, a) in acks {
            // Acks get lost on the wire too.
            if std::env::var("MODEL_TRACE").is_ok() {
                eprintln!("  ack {a:?}");
            }
            if rng.chance(0.9) {
                devices.iter_mut().find(|d| d.name == a.device).unwrap().ack(a.seq);
            }
        }
    };
    let trace = std::env::var("MODEL_TRACE").is_ok();
    for step in 0..steps {
        let d = rng.below(devices.len() as u64) as usize;
        let op = rng.below(100);
        if trace {
            eprintln!(
                "step {step}: dev {d} op {op} pending {:?} acked {:?}",
                devices[d].pending.keys().collect::<Vec<_>>(),
                devices[d].acked
            );
        }
        // A device's resend timer (1 s virtual) fires before it does anything else.
        if !devices[d].pending.is_empty() && virtual_ms.saturating_sub(devices[d].last_resend_ms) >= 1000 {
            devices[d].last_resend_ms = virtual_ms;
            let pending: Vec<Reading> = devices[d].pending.values().cloned().collect();
            for r in pending {
                feed(&mut p, r, virtual_ms);
            }
        }
        match op {
            0..=54 => {
                let r = devices[d].create(&mut rng);
                feed(&mut p, r, virtual_ms);
            }
            55..=64 => {
                // Resend everything pending (a device's timeout).
                let pending: Vec<Reading> = devices[d].pending.values().cloned().collect();
                for r in pending {
                    feed(&mut p, r, virtual_ms);
                }
            }
            65..=72 => {
                // A duplicate of anything recent, acked or not.
                let n = devices[d].created.len();
                if n > 0 {
                    let r = devices[d].created[n - 1 - rng.below(n.min(50) as u64) as usize].clone();
                    feed(&mut p, r, virtual_ms);
                }
            }
            89..=92 if consumer => consume(&p, 1 + rng.below(5) as usize, &mut delivered),
            89..=92 => {}
            73..=88 => {
                virtual_ms += rng.below(60);
                CLOCK.store(1_800_000_000_000 + virtual_ms, Ordering::SeqCst);
                let acks = p.tick(base + Duration::from_millis(virtual_ms));
                deliver(&mut devices, acks, &mut rng);
            }
            93..=96 => {
                // SIGKILL: nothing more runs; whatever was written stays.
                drop(p);
                p = Pipeline::open_with_clock(&cfg, metrics.clone(), clock).unwrap().0;
                check(&p, &devices, &delivered, Metrics::get(&metrics.readings_dropped_full), seed, step);
            }
            _ => {
                let acks = p.close();
                deliver(&mut devices, acks, &mut rng);
                drop(p);
                p = Pipeline::open_with_clock(&cfg, metrics.clone(), clock).unwrap().0;
                check(&p, &devices, &delivered, Metrics::get(&metrics.readings_dropped_full), seed, step);
            }
        }
    }
    // Drain: devices resend what they hold until all of it is acked.
    for round in 0.. {
        if round >= 50 {
            let q = queued(&p);
            for d in &devices {
                let held: Vec<_> = d
                    .pending
                    .values()
                    .map(|r| {
                        (
                            r.seq.unwrap(),
                            r.sensor.clone(),
                            q.contains_key(&(r.device.clone(), r.sensor.clone(), r.seq.unwrap())),
                        )
                    })
                    .collect();
                eprintln!("{}: acked {:?}, pending (seq, sensor, queued?) {:?}", d.name, d.acked, held);
            }
            panic!("seed {seed}: acks never caught up");
        }
        if devices.iter().all(|d| d.pending.is_empty()) {
            break;
        }
        // The consumer keeps up, so a full queue refuses nothing for long.
        if consumer {
            consume(&p, usize::MAX, &mut delivered);
        }
        let all: Vec<Reading> = devices.iter().flat_map(|d| d.pending.values().cloned()).collect();
        for r in all {
            feed(&mut p, r, virtual_ms);
        }
        // Devices resend every 500 ms (virtual): well inside the 2 s gap timeout.
        virtual_ms += 500;
        CLOCK.store(1_800_000_000_000 + virtual_ms, Ordering::SeqCst);
        let acks = p.close();
        for (_, a) in acks {
            devices.iter_mut().find(|d| d.name == a.device).unwrap().ack(a.seq);
        }
    }
    check(&p, &devices, &delivered, Metrics::get(&metrics.readings_dropped_full), seed, steps);
    let mut all = queued(&p);
    for (k, n) in &delivered {
        *all.entry(k.clone()).or_insert(0) += n;
    }
    let created: usize = devices.iter().map(|d| d.created.len()).sum();
    let dropped = Metrics::get(&metrics.readings_dropped_full) as usize;
    assert!(
        all.len() <= created && all.len() + dropped >= created,
        "seed {seed}: {} of {created} readings queued or delivered, {dropped} dropped by policy",
        all.len()
    );
    assert!(all.values().all(|&n| n == 1), "seed {seed}: ... exactly once");
    (Metrics::get(&metrics.batches_rejected_full), Metrics::get(&metrics.readings_dropped_full))
}

#[test]
fn random_sends_resends_duplicates_kills_and_restarts_keep_exactly_once() {
    let seeds: u64 = std::env::var("EDGE_GATEWAY_MODEL_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(12);
    let (refused, dropped) = (1..=seeds).map(|seed| run(seed, 600)).fold((0, 0), |(r, d), (r1, d1)| (r + r1, d + d1));
    assert!(refused > 0, "no run filled its queue: the reject_new path went untested");
    assert!(dropped > 0, "no run evicted anything: the drop_oldest path went untested");
}
