//! parse → dedup → batch → queue commit, measured.
//!
//! `cargo bench --bench pipeline` prints, per stage set, the median of
//! several runs: readings/s, bytes written to disk per encoded batch byte,
//! and fsyncs per second. The baseline (JSON parse only) runs in the same go
//! so the ratios hold on a busy machine too.

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

fn lines(n: usize) -> Vec<Vec<u8>> {
    let base = 1_764_000_000_000u64;
    (0..n)
        .map(|i| {
            let dev = i % DEVICES;
            let seq = i / DEVICES;
            // 20 % resends of an earlier reading, as devices do.
            let seq = if i % 5 == 4 { seq.saturating_sub(3) } else { seq };
            format!(
                r#"{{"device":"wrist-{dev:02}","sensor":"heart_rate","seq":{seq},"ts":{},"value":{}}}"#,
                base + seq as u64 * 100,
                60 + (seq % 40)
            )
            .into_bytes()
        })
        .collect()
}

struct Run {
    rate: f64,
    disk_per_encoded: f64,
    fsyncs_per_s: f64,
}

fn config(dir: &std::path::Path, fsync: FsyncPolicy, format: Format) -> Config {
    let mut cfg = Config::parse(
        &format!("[gateway]\nid = \"bench\"\ndata_dir = {:?}\n", dir.display().to_string()),
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
    Run { rate: n as f64 / t.elapsed().as_secs_f64(), disk_per_encoded: 0.0, fsyncs_per_s: 0.0 }
}

/// Bytes this process has passed to write(2) so far (/proc/self/io `wchar`):
/// segments, ledger and state file alike.
fn written() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("wchar: ").map(|v| v.trim().parse().ok())))
        .flatten()
        .unwrap_or(0)
}

fn full(lines: &[Vec<u8>], fsync: FsyncPolicy, format: Format) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), fsync, format);
    let metrics = Arc::new(Metrics::default());
    let (mut p, _) = Pipeline::open(&cfg, metrics.clone()).expect("pipeline");
    let w0 = written();
    let t = Instant::now();
    let mut now = Instant::now();
    for (i, l) in lines.iter().enumerate() {
        if i % 1024 == 0 {
            now = Instant::now();
            p.tick(now).unwrap();
        }
        let ms = edge_gateway::reading::now_ms();
        let (reading, ts_from_device) = wire::parse_jsonl(l, None, ms).expect("valid line");
        p.ingest(Incoming::new(reading, ts_from_device, edge_gateway::Origin::Serial(0)), now, ms).unwrap();
    }
    p.close().unwrap();
    let secs = t.elapsed().as_secs_f64();
    let wrote = (written() - w0) as f64;
    let q = p.queue_handle();
    let q = q.lock().unwrap();
    let encoded = Metrics::get(&metrics.batch_bytes_queued) as f64;
    Run { rate: lines.len() as f64 / secs, disk_per_encoded: wrote / encoded, fsyncs_per_s: q.fsyncs() as f64 / secs }
}

fn median(mut runs: Vec<Run>) -> Run {
    runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    runs.swap_remove(runs.len() / 2)
}

fn main() {
    let (n, runs) = if full_run() { (1_000_000, 5) } else { (20_000, 1) };
    let lines = lines(n);
    println!("{n} readings (20 % resends) from {DEVICES} devices, median of {runs} runs\n");
    println!(
        "{:<44} {:>14} {:>10} {:>19} {:>10}",
        "stages", "readings/s", "vs parse", "written B/encoded B", "fsyncs/s"
    );
    type Case<'a> = (&'a str, Box<dyn Fn() -> Run + 'a>);
    let cases: Vec<Case> = vec![
        ("baseline: JSON parse only", Box::new(|| parse_only(&lines))),
        (
            "parse+dedup+batch+queue, fsync interval, json",
            Box::new(|| full(&lines, FsyncPolicy::Interval, Format::Json)),
        ),
        (
            "parse+dedup+batch+queue, fsync interval, postcard",
            Box::new(|| full(&lines, FsyncPolicy::Interval, Format::Postcard)),
        ),
        ("parse+dedup+batch+queue, fsync always, json", Box::new(|| full(&lines, FsyncPolicy::Always, Format::Json))),
    ];
    let mut base = 0.0;
    for (name, f) in cases {
        let m = median((0..runs).map(|_| f()).collect());
        if base == 0.0 {
            base = m.rate;
        }
        println!(
            "{name:<44} {:>14.0} {:>9.2}x {:>19.3} {:>10.1}",
            m.rate,
            m.rate / base,
            m.disk_per_encoded,
            m.fsyncs_per_s
        );
    }
}
