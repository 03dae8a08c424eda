//! parse → dedup → batch → queue commit, measured.
//!
//! `cargo bench --bench pipeline` prints, per stage set, the median of
//! several runs: readings/s, bytes per encoded batch byte as passed to
//! write(2) and as they reached the block device, and fsyncs per second.
//! The baseline (JSON parse only) runs in the same go so the ratios hold on
//! a busy machine too. Each run checks its own input: the unique readings
//! are accepted and the resends dropped, exactly.

use edge_gateway::config::{Config, FsyncPolicy};
use edge_gateway::metrics::Metrics;
use edge_gateway::pipeline::Pipeline;
use edge_gateway::reading::{Format, Incoming};
use edge_gateway::wire;
use std::sync::Arc;
use std::time::{Duration, Instant};

const DEVICES: usize = 10;

/// `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
/// binary without it, and then a tiny smoke run keeps the bench from rotting
/// without spending CI minutes.
fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// The input: `n` lines from `DEVICES` devices, of which `RESEND_PCT` %
/// repeat, byte for byte, one of the last 64 readings of a random device
/// (a lost ack: the device sends it again). Returns (lines, unique, resends).
const RESEND_PCT: u64 = 20;

fn line(dev: usize, seq: u64) -> Vec<u8> {
    let base = 1_764_000_000_000u64;
    format!(
        r#"{{"device":"wrist-{dev:02}","sensor":"heart_rate","seq":{seq},"ts":{},"value":{}}}"#,
        base + seq * 100,
        60 + (seq % 40)
    )
    .into_bytes()
}

fn lines(n: usize) -> (Vec<Vec<u8>>, u64, u64) {
    let mut rng = edge_gateway::rng::XorShift::new(0x5EED);
    let mut next = [0u64; DEVICES];
    let (mut out, mut unique, mut resends) = (Vec::with_capacity(n), 0, 0);
    for _ in 0..n {
        let dev = rng.below(DEVICES as u64) as usize;
        if next[dev] > 0 && rng.below(100) < RESEND_PCT {
            let back = 1 + rng.below(next[dev].min(64));
            out.push(line(dev, next[dev] - back));
            resends += 1;
        } else {
            out.push(line(dev, next[dev]));
            next[dev] += 1;
            unique += 1;
        }
    }
    (out, unique, resends)
}

struct Run {
    rate: f64,
    /// Bytes passed to write(2) per encoded batch byte (`wchar`).
    syscall_per_encoded: f64,
    /// Bytes that reached the block layer per encoded batch byte, after a
    /// sync (`write_bytes`: whole pages, rewritten as often as they were dirtied).
    block_per_encoded: f64,
    fsyncs_per_s: f64,
}

/// Ten rules as a site might write them: three match every reading (a
/// rounding, a condition that never holds, a 60 s aggregate), three match
/// some (an alarm lane with a route, a second aggregate, a routed subset),
/// four match nothing here but are checked for every reading.
const TEN_RULES: &str = r#"
[[rules]]
name = "drop-debug"
match = { sensor = "debug_*" }
filter = true
[[rules]]
name = "f-to-c"
match = { sensor = "skin_temp_f" }
transform = { rename = "skin_temp", scale = 0.5555556, offset = -17.7777778 }
[[rules]]
name = "hr-round"
match = { sensor = "heart_rate" }
transform = { round = 0 }
[[rules]]
name = "hr-impossible"
match = { sensor = "heart_rate" }
when = "value < 0"
filter = true
[[rules]]
name = "hr-alarm"
match = { sensor = "heart_rate" }
when = "value > 97"
lane = "alarm"
route = ["gateways/{gateway}/alarms"]
[[rules]]
name = "accel-1hz"
match = { sensor = "accel" }
downsample = { every = "1s" }
[[rules]]
name = "ward-3"
match = { device = "wrist-0*" }
when = "value > 90"
route = ["gateways/{gateway}/ward-3"]
[[rules]]
name = "hr-10s"
match = { sensor = "heart_rate", source = "serial" }
aggregate = { window = "10s", emit = ["min", "max", "mean", "count"] }
[[rules]]
name = "hr-60s"
match = { sensor = "heart_rate" }
aggregate = { window = "60s", emit = ["p50", "p95"] }
[[rules]]
name = "battery"
match = { sensor = "battery" }
downsample = { deadband = 5.0 }
"#;

fn config_with(dir: &std::path::Path, fsync: FsyncPolicy, format: Format, extra: &str) -> Config {
    // (the data dir is on the target's disk, not a tmpfs: the block layer is measured)
    let mut cfg = Config::parse(
        &format!("[gateway]\nid = \"bench\"\ndata_dir = {:?}\n{extra}", dir.display().to_string()),
        "bench.toml",
    )
    .expect("bench config");
    cfg.store.fsync = fsync;
    cfg.store.fsync_interval = Duration::from_millis(100);
    cfg.pipeline.format = format;
    cfg.store.max_bytes = 4 << 30;
    cfg
}

fn parse_only(lines: &[Vec<u8>]) -> Run {
    let t = Instant::now();
    let mut n = 0usize;
    for l in lines {
        if wire::parse_jsonl(l, None, 0).is_ok() {
            n += 1;
        }
    }
    assert_eq!(n, lines.len());
    Run {
        rate: n as f64 / t.elapsed().as_secs_f64(),
        syscall_per_encoded: 0.0,
        block_per_encoded: 0.0,
        fsyncs_per_s: 0.0,
    }
}

/// A counter of /proc/self/io: `wchar` (bytes passed to write(2): segments,
/// ledger and state file alike) or `write_bytes` (bytes this process caused
/// to be sent to the block layer).
fn io(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(": ")?.trim().parse().ok()))
        .unwrap_or(0)
}

/// The full path over `input`; `pace`: readings per second to offer (none:
/// as fast as it goes).
fn full(input: &Input, fsync: FsyncPolicy, format: Format, pace: Option<f64>) -> Run {
    full_with(input, fsync, format, pace, "")
}

fn full_with(input: &Input, fsync: FsyncPolicy, format: Format, pace: Option<f64>, rules: &str) -> Run {
    let lines = &input.lines;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let cfg = config_with(dir.path(), fsync, format, rules);
    let metrics = Arc::new(Metrics::default());
    let (mut p, _) = Pipeline::open(&cfg, metrics.clone()).expect("pipeline");
    nix::unistd::sync();
    let (w0, b0) = (io("wchar"), io("write_bytes"));
    let t = Instant::now();
    let mut now = Instant::now();
    for (i, l) in lines.iter().enumerate() {
        if let Some(rate) = pace {
            let due = t + Duration::from_secs_f64(i as f64 / rate);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
            now = Instant::now();
            p.tick(now).unwrap();
        } else if i % 1024 == 0 {
            now = Instant::now();
            p.tick(now).unwrap();
        }
        let ms = edge_gateway::reading::now_ms();
        let (reading, ts_from_device) = wire::parse_jsonl(l, None, ms).expect("valid line");
        p.ingest(Incoming::new(reading, ts_from_device, edge_gateway::Origin::Serial(0)), now, ms).unwrap();
    }
    p.close().unwrap();
    let secs = t.elapsed().as_secs_f64();
    nix::unistd::sync();
    let (wrote, blocks) = ((io("wchar") - w0) as f64, (io("write_bytes") - b0) as f64);
    // The input says what must have happened.
    assert_eq!(Metrics::get(&metrics.readings_accepted), input.unique, "unique readings accepted");
    assert_eq!(Metrics::get(&metrics.duplicates_dropped), input.resends, "resends dropped");
    let q = p.queue_handle();
    let q = q.lock().unwrap();
    let encoded = Metrics::get(&metrics.batch_bytes_queued) as f64;
    Run {
        rate: lines.len() as f64 / secs,
        syscall_per_encoded: wrote / encoded,
        block_per_encoded: blocks / encoded,
        fsyncs_per_s: q.fsyncs() as f64 / secs,
    }
}

struct Input {
    lines: Vec<Vec<u8>>,
    unique: u64,
    resends: u64,
}

impl Input {
    fn new(n: usize) -> Input {
        let (lines, unique, resends) = lines(n);
        Input { lines, unique, resends }
    }
}

fn median(mut runs: Vec<Run>) -> Run {
    runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    runs.swap_remove(runs.len() / 2)
}

fn main() {
    let (n, runs) = if full_run() { (1_000_000, 5) } else { (20_000, 1) };
    let input = Input::new(n);
    // ~200 readings/s for 10 s (a busy ward), defaults: the pages of the
    // open segment are rewritten at every group commit.
    let paced = Input::new(if full_run() { 2_000 } else { 200 });
    println!(
        "{n} lines from {DEVICES} devices: {} readings + {} resends ({:.1} %), median of {runs} runs\n",
        input.unique,
        input.resends,
        100.0 * input.resends as f64 / n as f64
    );
    println!(
        "{:<52} {:>12} {:>9} {:>16} {:>14} {:>9}",
        "stages", "readings/s", "vs parse", "write(2) B/enc B", "block B/enc B", "fsyncs/s"
    );
    type Case<'a> = (&'a str, Box<dyn Fn() -> Run + 'a>);
    let cases: Vec<Case> = vec![
        ("baseline: JSON parse only", Box::new(|| parse_only(&input.lines))),
        (
            "parse+dedup+batch+queue, fsync interval, json",
            Box::new(|| full(&input, FsyncPolicy::Interval, Format::Json, None)),
        ),
        (
            "parse+dedup+batch+queue, fsync interval, postcard",
            Box::new(|| full(&input, FsyncPolicy::Interval, Format::Postcard, None)),
        ),
        (
            "parse+dedup+batch+queue, fsync always, json",
            Box::new(|| full(&input, FsyncPolicy::Always, Format::Json, None)),
        ),
        (
            "the same with 10 rules, fsync interval, json",
            Box::new(|| full_with(&input, FsyncPolicy::Interval, Format::Json, None, TEN_RULES)),
        ),
        (
            "same, paced at 200 readings/s, interval, json",
            Box::new(|| full(&paced, FsyncPolicy::Interval, Format::Json, Some(200.0))),
        ),
    ];
    let mut base = 0.0;
    // BENCH_ONLY=text runs the baseline and the cases whose name has it (for a profile).
    let only = std::env::var("BENCH_ONLY").ok();
    for (name, f) in cases {
        if only.as_ref().is_some_and(|o| !name.contains(o.as_str()) && !name.starts_with("baseline")) {
            continue;
        }
        let runs = if name.contains("paced") { runs.min(3) } else { runs };
        let m = median((0..runs).map(|_| f()).collect());
        if base == 0.0 {
            base = m.rate;
        }
        // A paced run's rate is the offered one: no ratio.
        let vs = if name.contains("paced") { "-".to_string() } else { format!("{:.2}x", m.rate / base) };
        println!(
            "{name:<52} {:>12.0} {vs:>9} {:>16.3} {:>14.3} {:>9.1}",
            m.rate, m.syscall_per_encoded, m.block_per_encoded, m.fsyncs_per_s
        );
    }
    aggregate_bytes();
}

/// Upstream bytes with a 60 s aggregate (`keep_raw = false`) against raw:
/// 20 devices at 10 Hz for 10 minutes of device time, json batches. What
/// goes upstream is every queue record but the held ones.
fn aggregate_bytes() {
    let minutes = if full_run() { 10 } else { 1 };
    let rules = r#"
[[rules]]
name = "hr-60s"
match = { sensor = "heart_rate" }
aggregate = { window = "60s", emit = ["min", "max", "mean", "count"], keep_raw = false }
"#;
    let upstream = |rules: &str| -> (u64, u64) {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
        let cfg = config_with(dir.path(), FsyncPolicy::Interval, Format::Json, rules);
        let (mut p, _) = Pipeline::open(&cfg, Arc::new(Metrics::default())).expect("pipeline");
        let now = Instant::now();
        for seq in 0..minutes * 600 {
            for dev in 0..20 {
                let ms = edge_gateway::reading::now_ms();
                let (reading, from_device) = wire::parse_jsonl(&line(dev, seq), None, ms).expect("valid line");
                p.ingest(Incoming::new(reading, from_device, edge_gateway::Origin::Serial(0)), now, ms).unwrap();
            }
        }
        // Idle windows close on the gateway's clock: the last one too.
        p.tick(now + Duration::from_secs(600)).unwrap();
        p.close().unwrap();
        let q = p.queue_handle();
        let q = q.lock().unwrap();
        let (mut bytes, mut readings) = (0u64, 0u64);
        for (meta, payload) in q.read_from(0, usize::MAX).unwrap() {
            let (header, body) = edge_gateway::reading::RecordHeader::split(&payload).unwrap();
            if header.is_some_and(|h| h.kind == edge_gateway::reading::RecordKind::Hold) {
                continue;
            }
            bytes += body.len() as u64;
            readings += meta.readings as u64;
        }
        (bytes, readings)
    };
    let (raw, raw_n) = upstream("");
    let (agg, agg_n) = upstream(rules);
    println!(
        "\nupstream, 20 devices at 10 Hz for {minutes} min, json: raw {raw_n} readings in {raw} bytes; \
         60 s aggregate (min, max, mean, count; keep_raw = false) {agg_n} readings in {agg} bytes: {:.0}x fewer bytes",
        raw as f64 / agg.max(1) as f64
    );
}
