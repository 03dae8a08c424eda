//! `Queue::open` start-up time with a large backlog, with and without the
//! per-segment `.idx` files.
//!
//! `cargo bench --bench queue_open` builds a ~1 GiB queue (50 KiB payloads,
//! 8 MiB segments, one commit at the end) in a temp dir under /tmp and
//! prints the median of 5 opens per mode, first with a warm page cache, then
//! with `sync` + `echo 1 > /proc/sys/vm/drop_caches` before every open (if
//! that file is writable; the output says when it is not). Without
//! `--bench` (`cargo test --all-targets`) it does a 17 MiB smoke run.

use edge_gateway::config::WhenFull;
use edge_gateway::queue::{Queue, QueueOptions};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

const PAYLOAD: usize = 50 << 10;
const RUNS: usize = 5;

fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Default segment size; `max_bytes` high enough not to shrink it (the
/// effective size is `min(segment_bytes, max_bytes / 4)`).
fn opts() -> QueueOptions {
    QueueOptions {
        max_bytes: 4 << 30,
        when_full: WhenFull::DropOldest,
        segment_bytes: 8 << 20,
        trust_index: true,
        compress: false,
    }
}

fn remove_indexes(dir: &Path) {
    for e in fs::read_dir(dir.join("segments")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|e| e == "idx") {
            fs::remove_file(p).unwrap();
        }
    }
}

/// `sync`, then drop clean page-cache pages. Err says why not.
fn drop_caches() -> Result<(), String> {
    nix_sync();
    fs::write("/proc/sys/vm/drop_caches", b"1").map_err(|e| format!("writing /proc/sys/vm/drop_caches: {e}"))
}

fn nix_sync() {
    let _ = std::process::Command::new("sync").status();
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// `Queue::open` with every sealed segment indexed (the new path).
    Indexed,
    /// `.idx` deleted before each open: `Queue::open` scans every segment
    /// and writes the indexes again (the one-time cost after an upgrade).
    ScanAndIndex,
    /// `.idx` deleted, `open_readonly`: the full scan alone, i.e. what the
    /// old `open` spent reading (it wrote nothing on a clean queue).
    ScanOnly,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Indexed => "open, with .idx (new)",
            Mode::ScanAndIndex => "open, .idx deleted (scan + write .idx)",
            Mode::ScanOnly => "open_readonly, .idx deleted (full scan = old)",
        }
    }
}

/// One open; returns (time, live records, indexed segments).
fn open_once(dir: &Path, o: QueueOptions, mode: Mode, cold: bool) -> Result<(Duration, u64, u64), String> {
    if mode != Mode::Indexed {
        remove_indexes(dir);
    }
    if cold {
        drop_caches()?;
    }
    let t = Instant::now();
    let (q, rep) = match mode {
        Mode::ScanOnly => Queue::open_readonly(dir),
        _ => Queue::open(dir, o),
    }
    .unwrap();
    let el = t.elapsed();
    let indexed = q.indexed_segments();
    drop(q);
    if mode == Mode::ScanOnly {
        // Leave the queue indexed for the next mode.
        drop(Queue::open(dir, o).unwrap());
    }
    Ok((el, rep.records, indexed))
}

fn main() {
    let full = full_run();
    // Smoke: 17 MiB, so there are two sealed segments to index.
    let total: u64 = if full { 1 << 30 } else { 17 << 20 };
    let o = opts();
    let fstype = std::process::Command::new("df")
        .args(["-T", "/tmp"])
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|s| s.lines().nth(1).and_then(|l| l.split_whitespace().nth(1).map(str::to_owned)))
        .unwrap_or_else(|| "unknown".into());
    let d = tempfile::tempdir_in("/tmp").unwrap();
    let dir = d.path().join("queue");

    let t = Instant::now();
    let (mut q, _) = Queue::open(&dir, o).unwrap();
    let mut payload = vec![0u8; PAYLOAD];
    let mut n = 0u64;
    while q.disk_bytes() + (PAYLOAD as u64 + 30) <= total {
        n += 1;
        for (i, b) in payload.iter_mut().enumerate().step_by(64) {
            *b = (n as usize).wrapping_mul(31).wrapping_add(i) as u8;
        }
        q.append(1, n, &payload).unwrap();
    }
    q.commit().unwrap();
    let bytes = q.disk_bytes();
    drop(q);
    let segments = fs::read_dir(dir.join("segments"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|e| e == "seg"))
        .count();
    println!(
        "queue_open: {n} records of {} KiB, {:.1} MiB in {segments} segments of 8 MiB, /tmp is {fstype}, built in {:.1?}",
        PAYLOAD >> 10,
        bytes as f64 / (1 << 20) as f64,
        t.elapsed()
    );

    let caches: &[bool] = if full { &[false, true] } else { &[false] };
    println!("{:<48} {:>6} {:>12} {:>12} {:>12} {:>8}", "mode", "cache", "median", "min", "max", "indexed");
    for &cold in caches {
        for mode in [Mode::Indexed, Mode::ScanAndIndex, Mode::ScanOnly] {
            let mut times = Vec::new();
            let mut indexed = 0;
            let mut err = None;
            for _ in 0..RUNS {
                match open_once(&dir, o, mode, cold) {
                    Ok((el, records, idx)) => {
                        assert_eq!(records, n, "every record found");
                        times.push(el);
                        indexed = idx;
                    }
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
            }
            let cache = if cold { "cold" } else { "warm" };
            if let Some(e) = err {
                println!("{:<48} {cache:>6} skipped: cannot drop caches ({e})", mode.name());
                continue;
            }
            if mode == Mode::Indexed {
                assert_eq!(indexed as usize, segments - 1, "all sealed segments indexed");
            } else {
                assert_eq!(indexed, 0);
            }
            times.sort();
            println!(
                "{:<48} {cache:>6} {:>12.2?} {:>12.2?} {:>12.2?} {indexed:>8}",
                mode.name(),
                times[RUNS / 2],
                times[0],
                times[RUNS - 1]
            );
        }
    }
}
