//! Dedup's memory per remembered key and time per reading (issue 18).
//!
//! `cargo bench --bench dedup`: 20 devices, each sending 40,000 readings
//! with consecutive seqs (the default `dedup_max_per_device` of 16,384 keys
//! is reached and held), then every device resending its last 1,000 (all
//! duplicates). Prints the process's RSS growth per remembered key (from
//! `/proc/self/statm`, the allocator's slack included) and the median
//! nanoseconds per `check` of 5 runs, beside a baseline in the same go: the
//! same readings into a `HashSet<(String, String, u64)>`, the plainest
//! structure that could remember them. Without `--bench` (as under `cargo
//! test`) a small smoke run.

use edge_gateway::pipeline::dedup::{Dedup, Verdict};
use edge_gateway::{Reading, Value};
use std::collections::HashSet;
use std::time::{Duration, Instant};

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn reading(dev: &str, seq: u64) -> Reading {
    Reading {
        device: dev.to_string(),
        sensor: "hr".into(),
        seq: Some(seq),
        ts: 1_764_000_000_000 + seq * 100,
        value: Value::Number((60 + seq % 40) as f64),
        boot: None,
    }
}

struct Run {
    bytes_per_key: f64,
    ns_per_check: f64,
    keys: usize,
}

fn run_dedup(devices: &[String], per_device: u64, max: usize) -> Run {
    let before = rss_bytes();
    let mut d = Dedup::new(Duration::from_secs(600), max);
    let start = Instant::now();
    let mut n = 0u64;
    for seq in 0..per_device {
        for dev in devices {
            assert_eq!(d.check(&reading(dev, seq), true, seq), Verdict::Accept);
            n += 1;
        }
    }
    for seq in per_device - 1_000.min(per_device)..per_device {
        for dev in devices {
            assert_eq!(d.check(&reading(dev, seq), true, per_device), Verdict::Duplicate);
            n += 1;
        }
    }
    measured(before, start, n, d.len(), &d)
}

/// The figures of a run that started at `before` (RSS) and `start`, made
/// `n` checks and keeps `keys` keys in `kept`.
fn measured<T>(before: usize, start: Instant, n: u64, keys: usize, kept: &T) -> Run {
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    let grown = rss_bytes().saturating_sub(before);
    std::hint::black_box(kept);
    Run { bytes_per_key: grown as f64 / keys as f64, ns_per_check: ns, keys }
}

fn run_baseline(devices: &[String], per_device: u64, max: usize) -> Run {
    let before = rss_bytes();
    let mut set: HashSet<(String, String, u64)> = HashSet::new();
    let start = Instant::now();
    let mut n = 0u64;
    // Only the last `max` per device, as dedup keeps.
    let from = per_device.saturating_sub(max as u64);
    for seq in 0..per_device {
        for dev in devices {
            let r = reading(dev, seq);
            if seq >= from {
                set.insert((r.device, r.sensor, seq));
            }
            n += 1;
        }
    }
    measured(before, start, n, set.len(), &set)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One run in a process of its own (so no run grows into memory an
/// earlier one freed): this binary again with `--child WHICH`.
fn child(which: &str, full: bool) -> Run {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--child", which]);
    if full {
        cmd.arg("--bench");
    }
    let out = cmd.output().expect("run the bench again as a child");
    assert!(out.status.success(), "child {which}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let f: Vec<f64> = text.split_whitespace().map(|x| x.parse().unwrap()).collect();
    Run { keys: f[0] as usize, bytes_per_key: f[1], ns_per_check: f[2] }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench");
    let (devs, per_device, max, runs) = if full { (20, 40_000, 16_384, 5) } else { (3, 3_000, 1_000, 1) };
    let devices: Vec<String> = (0..devs).map(|i| format!("wrist-{i:02}")).collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let r = match args[i + 1].as_str() {
            "dedup" => run_dedup(&devices, per_device, max),
            _ => run_baseline(&devices, per_device, max),
        };
        println!("{} {} {}", r.keys, r.bytes_per_key, r.ns_per_check);
        return;
    }
    let mut d = Vec::new();
    let mut b = Vec::new();
    for _ in 0..runs {
        d.push(child("dedup", full));
        b.push(child("baseline", full));
    }
    assert_eq!(d[0].keys, devs * max, "dedup keeps max_per_device keys per device");
    println!("{devs} devices x {per_device} readings, dedup_max_per_device {max}, median of {runs}:");
    println!("| structure | keys | RSS bytes per key | ns per reading |");
    println!("|---|---:|---:|---:|");
    for (name, rs) in [("edge-gateway dedup", &d), ("baseline: HashSet<(String, String, u64)>", &b)] {
        println!(
            "| {name} | {} | {:.1} | {:.0} |",
            rs[0].keys,
            median(rs.iter().map(|r| r.bytes_per_key).collect()),
            median(rs.iter().map(|r| r.ns_per_check).collect())
        );
    }
}
