//! Model-based test of rules with exactly once, in process: devices stream
//! heart rate, skin temperature, accelerometer and debug readings through a
//! pipeline with a filter, a route to two topics, a downsample and two
//! aggregates (one keeping raw readings, one holding them back), while the
//! pipeline is dropped as a SIGKILL would leave it, closed cleanly, and
//! reopened. Devices resend what was not acked. At the end, in the queue:
//!
//! * every device reading is stored once (a routed one with both its topics,
//!   in one record owning an id per topic);
//!   filtered ones never; every one acked;
//! * every aggregate output appears exactly once per (window, stat) and
//!   equals the statistic computed offline from the acked readings;
//! * downsampled: exactly one stored reading per interval of device time
//!   that has any.
//!
//! The offline aggregate is the whole check of "rule state survives a
//! crash": a window whose open state were lost at a kill would miss
//! readings, one closed twice would appear twice. (Planted: replay without
//! `Engine::replay` fails the count/mean check; without `replay_closed`
//! windows appear twice.)

use edge_gateway::config::Config;
use edge_gateway::metrics::Metrics;
use edge_gateway::pipeline::Pipeline;
use edge_gateway::queue::Queue;
use edge_gateway::reading::{Ack, Batch, Incoming, Reading, RecordHeader, RecordKind, Value};
use edge_gateway::rng::XorShift;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

static CLOCK: AtomicU64 = AtomicU64::new(1_800_000_000_000);

fn clock() -> u64 {
    CLOCK.load(Ordering::SeqCst)
}

const EVERY_MS: u64 = 1000;
const WINDOW_MS: u64 = 10_000;
const SKIN_WINDOW_MS: u64 = 5_000;

fn config(dir: &std::path::Path, rng: &mut XorShift) -> Config {
    let src = format!(
        r#"[gateway]
id = "rm"
data_dir = {:?}
[pipeline]
batch_max_readings = {}
batch_max_age = "40ms"
ack_gap_timeout = "2s"
[store]
fsync_interval = "30ms"
segment_bytes = {}

[[rules]]
name = "drop-debug"
match = {{ sensor = "debug_*" }}
filter = true

[[rules]]
name = "hr-alarm"
match = {{ sensor = "heart_rate" }}
when = "value > 170"
lane = "alarm"
route = ["alarms/{{device}}", "gateways/{{gateway}}/alarms"]

[[rules]]
name = "accel-1hz"
match = {{ sensor = "accel" }}
downsample = {{ every = "{EVERY_MS}ms" }}

[[rules]]
name = "hr-10s"
match = {{ sensor = "heart_rate" }}
aggregate = {{ window = "{WINDOW_MS}ms", emit = ["min", "max", "mean", "count", "p95"] }}

[[rules]]
name = "skin-5s"
match = {{ sensor = "skin_temp" }}
aggregate = {{ window = "{SKIN_WINDOW_MS}ms", emit = ["count", "last"], keep_raw = false, idle_close = "20s" }}
"#,
        dir.display().to_string(),
        1 + rng.below(30),
        2048 + rng.below(8192),
    );
    Config::parse(&src, "rules-model.toml").unwrap()
}

struct Device {
    name: String,
    next_seq: u64,
    clock_ms: u64,
    pending: BTreeMap<u64, Reading>,
    acked: Vec<Reading>,
}

impl Device {
    fn create(&mut self, rng: &mut XorShift) -> Reading {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.clock_ms += 50 + rng.below(700);
        let (sensor, value) = match rng.below(10) {
            0..=3 => ("heart_rate", Value::Number(60.0 + rng.below(130) as f64)),
            4..=5 => ("skin_temp", Value::Number(33.0 + rng.below(40) as f64 / 10.0)),
            6..=8 => ("accel", Value::Array(vec![rng.below(3) as f64, 0.5, 9.8])),
            _ => ("debug_rssi", Value::Number(-(rng.below(90) as f64))),
        };
        let r = Reading {
            device: self.name.clone(),
            sensor: sensor.into(),
            seq: Some(seq),
            ts: self.clock_ms,
            value,
            boot: None,
        };
        self.pending.insert(seq, r.clone());
        r
    }

    fn ack(&mut self, a: &Ack) {
        let covered: Vec<u64> = self.pending.range(..=a.seq).map(|(k, _)| *k).collect();
        for k in covered {
            let r = self.pending.remove(&k).unwrap();
            self.acked.push(r);
        }
    }
}

fn run(seed: u64, steps: usize) -> (usize, usize, usize) {
    let mut rng = XorShift::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &mut rng);
    let mut devices: Vec<Device> = (0..3)
        .map(|i| Device {
            name: format!("w-{i}"),
            next_seq: 0,
            clock_ms: 1_764_000_000_000 + rng.below(WINDOW_MS),
            pending: BTreeMap::new(),
            acked: Vec::new(),
        })
        .collect();
    let base = Instant::now();
    let mut virtual_ms = 0u64;
    let metrics = Arc::new(Metrics::default());
    let open = |virtual_ms: u64| {
        CLOCK.store(1_800_000_000_000 + virtual_ms, Ordering::SeqCst);
        let (mut p, _) = Pipeline::open_with_clock(&cfg, metrics.clone(), clock).unwrap();
        p.start_clock_at(base + Duration::from_millis(virtual_ms));
        p
    };
    let mut p = open(0);
    let (mut kills, mut closes) = (0, 0);
    // Seqs the ack tracker acked past as gaps, over every pipeline instance.
    let mut skipped = 0;
    let feed = |p: &mut Pipeline, r: Reading, virtual_ms: u64| {
        CLOCK.store(1_800_000_000_000 + virtual_ms, Ordering::SeqCst);
        let now = base + Duration::from_millis(virtual_ms);
        p.ingest(Incoming::new(r, true, edge_gateway::Origin::Serial(0)), now, clock()).unwrap();
    };
    let deliver = |devices: &mut Vec<Device>, acks: Vec<(edge_gateway::Origin, Ack)>| {
        for (_, a) in acks {
            devices.iter_mut().find(|d| d.name == a.device).unwrap().ack(&a);
        }
    };
    for _ in 0..steps {
        match rng.below(100) {
            0..=69 => {
                let d = rng.below(devices.len() as u64) as usize;
                let r = devices[d].create(&mut rng);
                feed(&mut p, r, virtual_ms);
            }
            70..=89 => {
                virtual_ms += 1 + rng.below(200);
                CLOCK.store(1_800_000_000_000 + virtual_ms, Ordering::SeqCst);
                let acks = p.tick(base + Duration::from_millis(virtual_ms)).unwrap();
                deliver(&mut devices, acks);
            }
            90..=95 => {
                // SIGKILL: whatever was written stays, nothing else runs.
                skipped += Metrics::get(&metrics.ack_gap_skipped);
                drop(p);
                kills += 1;
                p = open(virtual_ms);
                for d in devices.iter_mut() {
                    let again: Vec<Reading> = d.pending.values().cloned().collect();
                    for r in again {
                        feed(&mut p, r, virtual_ms);
                    }
                }
            }
            _ => {
                let acks = p.close().unwrap();
                deliver(&mut devices, acks);
                skipped += Metrics::get(&metrics.ack_gap_skipped);
                drop(p);
                closes += 1;
                p = open(virtual_ms);
            }
        }
    }
    // Devices resend until everything is acked; then idle windows close.
    for _ in 0..200 {
        if devices.iter().all(|d| d.pending.is_empty()) {
            break;
        }
        for d in devices.iter_mut() {
            let again: Vec<Reading> = d.pending.values().cloned().collect();
            for r in again {
                feed(&mut p, r, virtual_ms);
            }
        }
        virtual_ms += 100;
        CLOCK.store(1_800_000_000_000 + virtual_ms, Ordering::SeqCst);
        let acks = p.tick(base + Duration::from_millis(virtual_ms)).unwrap();
        deliver(&mut devices, acks);
    }
    assert!(devices.iter().all(|d| d.pending.is_empty()), "seed {seed}: every reading is acked in the end");
    virtual_ms += 60_000;
    CLOCK.store(1_800_000_000_000 + virtual_ms, Ordering::SeqCst);
    deliver(&mut devices, p.tick(base + Duration::from_millis(virtual_ms)).unwrap());
    deliver(&mut devices, p.close().unwrap());
    drop(p);
    // These devices lose nothing on the wire: a gap the ack tracker had to
    // time out means a restart forgot readings a rule dropped (their keys
    // ride with the next record: `RecordHeader::dropped`).
    skipped += Metrics::get(&metrics.ack_gap_skipped);
    assert_eq!(skipped, 0, "seed {seed}: {skipped} seqs acked past as gaps after restarts");

    // What the queue holds.
    let (q, _) = Queue::open_readonly(&dir.path().join("queue")).unwrap();
    let records = q.read_all_on_disk_after(0).unwrap();
    let mut stored: HashMap<(String, u64), usize> = HashMap::new();
    let mut stored_accel: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut derived: HashMap<(String, String, u64), Vec<f64>> = HashMap::new();
    for (meta, payload) in &records {
        let (h, _) = RecordHeader::split(payload).unwrap();
        let h = h.unwrap_or_else(|| panic!("seed {seed}: record {} has no rules header", meta.id));
        let b = Batch::decode(payload).unwrap();
        for r in b.readings {
            match h.kind {
                RecordKind::Derived => {
                    derived.entry((r.device.clone(), r.sensor.clone(), r.ts)).or_default().push(r.value_number());
                    assert_eq!(h.window.as_ref().unwrap().start, r.ts, "seed {seed}");
                }
                RecordKind::Reply => panic!("seed {seed}: a command reply without [commands]"),
                RecordKind::Raw | RecordKind::Hold => {
                    *stored.entry((r.device.clone(), r.seq.unwrap())).or_default() += 1;
                    if r.sensor == "accel" {
                        stored_accel.entry(r.device.clone()).or_default().push(r.ts);
                    }
                    assert_eq!(h.kind == RecordKind::Hold, r.sensor == "skin_temp", "seed {seed}: {r:?} {h:?}");
                    // Two topics: one record owning two ids (both copies or neither).
                    assert_eq!(
                        h.topics.len(),
                        if h.lane == 1 { 2 } else { 0 },
                        "seed {seed}: alarms are routed: {h:?}"
                    );
                    assert_eq!(meta.span as usize, h.topics.len().max(1), "seed {seed}: {h:?}");
                    if !h.topics.is_empty() {
                        assert!(r.sensor == "heart_rate" && r.value_number() > 170.0, "seed {seed}: {r:?} {h:?}");
                    }
                }
            }
        }
    }
    // Device readings: once each; filtered never; accel downsampled to one
    // per interval of device time.
    let acked: Vec<&Reading> = devices.iter().flat_map(|d| d.acked.iter()).collect();
    for r in &acked {
        let got = stored.get(&(r.device.clone(), r.seq.unwrap())).copied().unwrap_or(0);
        let want = match r.sensor.as_str() {
            "debug_rssi" => 0,
            "accel" => got.min(1),
            _ => 1,
        };
        assert_eq!(got, want, "seed {seed}: {r:?} stored");
        if r.sensor == "accel" && got == 0 {
            let kept = &stored_accel[&r.device];
            assert!(
                kept.iter().any(|t| t / EVERY_MS == r.ts / EVERY_MS),
                "seed {seed}: accel {r:?} skipped with no kept reading in its {EVERY_MS} ms interval"
            );
        }
    }
    for ts in stored_accel.values() {
        let mut buckets: Vec<u64> = ts.iter().map(|t| t / EVERY_MS).collect();
        buckets.sort();
        let n = buckets.len();
        buckets.dedup();
        assert_eq!(buckets.len(), n, "seed {seed}: two accel readings kept in one {EVERY_MS} ms interval");
    }
    // Aggregates: exactly once, equal to the offline statistic.
    let mut windows: BTreeMap<(String, &str, u64), Vec<f64>> = BTreeMap::new();
    for r in &acked {
        let w = match r.sensor.as_str() {
            "heart_rate" => WINDOW_MS,
            "skin_temp" => SKIN_WINDOW_MS,
            _ => continue,
        };
        let sensor = if w == WINDOW_MS { "heart_rate" } else { "skin_temp" };
        windows.entry((r.device.clone(), sensor, r.ts - r.ts % w)).or_default().push(r.value_number());
    }
    let mut expected = 0;
    for ((device, sensor, start), mut vals) in windows {
        // Readings arrive in ts order per device: each window is complete.
        vals.sort_by(f64::total_cmp);
        let by_seq: Vec<f64> = {
            let mut rs: Vec<&&Reading> = acked
                .iter()
                .filter(|r| {
                    r.device == device
                        && r.sensor == sensor
                        && r.ts - r.ts % (if sensor == "heart_rate" { WINDOW_MS } else { SKIN_WINDOW_MS }) == start
                })
                .collect();
            rs.sort_by_key(|r| r.seq);
            rs.iter().map(|r| r.value_number()).collect()
        };
        let n = vals.len() as f64;
        let stats: Vec<(&str, f64)> = if sensor == "heart_rate" {
            let p95 = vals[((0.95 * n).ceil() as usize).clamp(1, vals.len()) - 1];
            vec![
                ("min_10s", vals[0]),
                ("max_10s", *vals.last().unwrap()),
                ("mean_10s", by_seq.iter().sum::<f64>() / n),
                ("count_10s", n),
                ("p95_10s", p95),
            ]
        } else {
            vec![("count_5s", n), ("last_5s", *by_seq.last().unwrap())]
        };
        for (stat, want) in stats {
            let key = (device.clone(), format!("{sensor}.{stat}"), start);
            let got = derived.remove(&key).unwrap_or_default();
            assert_eq!(got.len(), 1, "seed {seed}: {key:?} emitted {} times (want once): {got:?}", got.len());
            assert!(
                (got[0] - want).abs() < 1e-9,
                "seed {seed}: {key:?} = {} but the acked readings say {want}",
                got[0]
            );
            expected += 1;
        }
    }
    assert!(derived.is_empty(), "seed {seed}: outputs for windows no acked reading is in: {derived:?}");
    (kills, closes, expected)
}

trait Num {
    fn value_number(&self) -> f64;
}

impl Num for Reading {
    fn value_number(&self) -> f64 {
        match &self.value {
            Value::Number(n) => *n,
            Value::Array(a) => a[0],
        }
    }
}

#[test]
fn rules_outputs_are_exactly_once_across_kills_and_restarts() {
    let seeds: u64 = std::env::var("RULES_MODEL_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(24);
    let first = std::env::var("RULES_MODEL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let (mut kills, mut closes, mut outputs) = (0, 0, 0);
    for seed in first..first + seeds {
        let (k, c, o) = run(seed, 1500);
        kills += k;
        closes += c;
        outputs += o;
    }
    eprintln!("{seeds} runs: {kills} kills, {closes} clean restarts, {outputs} aggregate outputs checked");
    assert!(kills > seeds as usize && outputs > 100 * seeds as usize, "the runs exercised kills and windows");
}

/// The LAN broker gets what the rules emit: transformed readings and
/// aggregate outputs, not dropped ones, not ones a rule keeps off it.
#[test]
fn republished_readings_are_what_the_rules_emit() {
    let dir = tempfile::tempdir().unwrap();
    let src = format!(
        r#"[gateway]
id = "rp"
data_dir = {:?}
[[rules]]
name = "drop-debug"
match = {{ sensor = "debug" }}
filter = true
[[rules]]
name = "skin-c"
match = {{ sensor = "skin_f" }}
transform = {{ rename = "skin_c", offset = -32.0, scale = 0.5 }}
[[rules]]
name = "private"
match = {{ device = "private-*" }}
republish = false
[[rules]]
name = "hr-1s"
match = {{ sensor = "hr" }}
aggregate = {{ window = "1s", emit = ["count"], lateness = "0s" }}
"#,
        dir.path().display().to_string()
    );
    let cfg = Config::parse(&src, "rp.toml").unwrap();
    let (mut p, _) = Pipeline::open(&cfg, Arc::new(Metrics::default())).unwrap();
    let (tx, mut rx) = edge_gateway::channel::channel(100, 1 << 20);
    p.set_republish(tx);
    let now = Instant::now();
    let r = |device: &str, sensor: &str, seq: u64, ts: u64, v: f64| Reading {
        device: device.into(),
        sensor: sensor.into(),
        seq: Some(seq),
        ts,
        value: Value::Number(v),
        boot: None,
    };
    for x in [
        r("w1", "debug", 0, 1000, 1.0),
        r("w1", "skin_f", 1, 1000, 100.0),
        r("private-1", "skin_f", 0, 1000, 100.0),
        r("w1", "hr", 2, 1100, 60.0),
        r("w1", "hr", 3, 2100, 61.0),
    ] {
        p.ingest(Incoming::new(x, true, edge_gateway::Origin::Serial(0)), now, 5000).unwrap();
    }
    let mut got = Vec::new();
    while let Ok(x) = rx.try_recv() {
        got.push((x.device, x.sensor, x.value));
    }
    let n = |v: f64| Value::Number(v);
    assert_eq!(
        got,
        [
            ("w1".to_string(), "skin_c".to_string(), n(18.0)),
            ("w1".to_string(), "hr".to_string(), n(60.0)),
            // The 1 s window closed by the reading at 2,100, before it.
            ("w1".to_string(), "hr.count_1s".to_string(), n(1.0)),
            ("w1".to_string(), "hr".to_string(), n(61.0)),
        ]
    );
}
