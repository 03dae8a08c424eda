//! The gateway as a service: start-to-READY and idle memory, measured on
//! the real binary with a real `NOTIFY_SOCKET`.
//!
//! `cargo bench --bench service` prints:
//! * spawn → `READY=1`, median of 7, with an empty queue and with a ~1 GiB
//!   backlog (built through the real pipeline, closed with its checkpoint,
//!   as a gateway that ran offline for a long time leaves it); warm page
//!   cache, and cold too when `/proc/sys/vm/drop_caches` is writable;
//! * RSS after 10 s idle (3 serial ports waiting for their docks, the
//!   embedded broker, `/metrics`, an unreachable upstream), beside an idle
//!   Mosquitto 2 started in the same go as the baseline;
//! * the size of the binary.
//!
//! Without `--bench` (`cargo test --all-targets`) it does a small smoke run.

use edge_gateway::config::Config;
use edge_gateway::metrics::Metrics;
use edge_gateway::pipeline::Pipeline;
use edge_gateway::reading::{Incoming, Reading, Value};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn config_text(dir: &Path, store: &str) -> String {
    let mut s = format!("[gateway]\nid = \"bench\"\ndata_dir = {:?}\n\n", dir.join("data").display().to_string());
    for i in 0..3 {
        s += &format!(
            "[[serial]]\nname = \"dock{i}\"\npath = {:?}\n\n",
            dir.join(format!("dock{i}")).display().to_string()
        );
    }
    s += &format!(
        "[store]\nmax_bytes = \"2GiB\"\n{store}\n\n[broker]\nenabled = true\ntcp = \"127.0.0.1:{}\"\nallow_anonymous = true\n\n\
         [metrics]\nlisten = \"127.0.0.1:{}\"\n\n[upstream]\nurl = \"mqtt://127.0.0.1:{}\"\nallow_plaintext = true\n",
        free_port(),
        free_port(),
        free_port()
    );
    s
}

/// Fill the queue to `bytes` through the real pipeline, then close it (seal,
/// commit, checkpoint) as a clean stop does.
fn fill(dir: &Path, bytes: u64) {
    let mut cfg = Config::parse(&config_text(dir, ""), "bench.toml").unwrap();
    cfg.upstream = None;
    let (mut p, _) = Pipeline::open(&cfg, Arc::new(Metrics::default())).unwrap();
    let q = p.queue_handle();
    let (mut seq, t) = (0u64, Instant::now());
    loop {
        let now = Instant::now();
        let ms = edge_gateway::reading::now_ms();
        for d in 0..20 {
            let reading = Reading {
                device: format!("wrist-{d:02}"),
                sensor: "heart_rate".into(),
                seq: Some(seq),
                ts: 1_764_000_000_000 + seq * 100,
                value: Value::Number(60.0 + (seq % 40) as f64),
                boot: None,
            };
            p.ingest(Incoming::new(reading, true, edge_gateway::Origin::Serial(0)), now, ms).unwrap();
        }
        seq += 1;
        if seq % 2048 == 0 {
            p.tick(now).unwrap();
            if q.lock().unwrap().status().bytes >= bytes {
                break;
            }
        }
    }
    p.close().unwrap();
    let st = q.lock().unwrap().status();
    eprintln!(
        "  backlog: {} readings in {} batches, {:.2} GiB, built in {:.1?}",
        st.readings,
        st.batches,
        st.bytes as f64 / (1u64 << 30) as f64,
        t.elapsed()
    );
}

struct Started {
    child: Child,
    ready: Duration,
}

fn start(config: &Path, notify: &Path) -> Started {
    let _ = std::fs::remove_file(notify);
    let sock = UnixDatagram::bind(notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let t = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_edge-gateway"))
        .args(["run", "--config"])
        .arg(config)
        .env("NOTIFY_SOCKET", notify)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 1024];
    loop {
        let n = sock.recv(&mut buf).expect("READY=1 within 60 s");
        if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1") {
            return Started { child, ready: t.elapsed() };
        }
    }
}

fn stop(mut s: Started) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(s.child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    let _ = s.child.wait();
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").parse().ok()))
        })
        .flatten()
        .unwrap_or(0)
}

fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", b"1").is_ok()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ready_times(config: &Path, notify: &Path, runs: usize, cold: bool) -> Duration {
    let mut v = Vec::new();
    for _ in 0..runs {
        if cold {
            drop_caches();
        }
        let s = start(config, notify);
        v.push(s.ready);
        stop(s);
    }
    median(v)
}

fn main() {
    let full = full_run();
    let (runs, backlog, idle) =
        if full { (7, 1u64 << 30, Duration::from_secs(10)) } else { (1, 2 << 20, Duration::from_millis(300)) };
    let base = std::env::temp_dir().join(format!("edge-gateway-service-bench-{}", std::process::id()));
    let empty = base.join("empty");
    let full_q = base.join("backlog");
    for d in [&empty, &full_q] {
        std::fs::create_dir_all(d).unwrap();
    }
    let (cfg_empty, cfg_full) = (empty.join("gateway.toml"), full_q.join("gateway.toml"));
    std::fs::write(&cfg_empty, config_text(&empty, "")).unwrap();
    std::fs::write(&cfg_full, config_text(&full_q, "")).unwrap();
    let cfg_scan = full_q.join("scan.toml");
    std::fs::write(&cfg_scan, config_text(&full_q, "open_check = \"full\"")).unwrap();
    let notify = base.join("notify.sock");

    println!("service bench ({})", if full { "full" } else { "smoke" });
    let exe = env!("CARGO_BIN_EXE_edge-gateway");
    println!("  binary: {exe}, {:.1} MB", std::fs::metadata(exe).unwrap().len() as f64 / 1e6);

    let warm_empty = ready_times(&cfg_empty, &notify, runs, false);
    println!("  start → READY=1, empty queue:          median {warm_empty:>8.1?} of {runs}");
    fill(&full_q, backlog);
    let warm_full = ready_times(&cfg_full, &notify, runs, false);
    println!(
        "  start → READY=1, {:>4} MiB backlog:      median {warm_full:>8.1?} of {runs} (warm page cache; {:.1}× the empty start)",
        backlog >> 20,
        warm_full.as_secs_f64() / warm_empty.as_secs_f64()
    );
    let scan = ready_times(&cfg_scan, &notify, runs, false);
    println!(
        "  the same with open_check = \"full\":        median {scan:>8.1?} of {runs} (warm; every record CRC-checked)"
    );
    if full {
        if drop_caches() {
            let cold = ready_times(&cfg_full, &notify, runs, true);
            println!(
                "  start → READY=1, {:>4} MiB backlog:      median {cold:>8.1?} of {runs} (caches dropped before each)",
                backlog >> 20
            );
            let cold = ready_times(&cfg_scan, &notify, runs, true);
            println!(
                "  the same with open_check = \"full\":        median {cold:>8.1?} of {runs} (caches dropped before each)"
            );
        } else {
            println!("  (cold-cache runs skipped: /proc/sys/vm/drop_caches is not writable)");
        }
    }

    for (name, cfg) in [("empty queue", &cfg_empty), ("1 GiB backlog", &cfg_full)] {
        let s = start(cfg, &notify);
        std::thread::sleep(idle);
        println!("  RSS after {idle:?} idle, {name}: {:.1} MiB", rss_kib(s.child.id()) as f64 / 1024.0);
        stop(s);
    }
    if Command::new("sh").args(["-c", "command -v mosquitto"]).output().is_ok_and(|o| o.status.success()) {
        let port = free_port();
        let mut m = Command::new("mosquitto")
            .args(["-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(idle);
        println!("  baseline: idle Mosquitto RSS {:.1} MiB", rss_kib(m.id()) as f64 / 1024.0);
        let _ = m.kill();
        let _ = m.wait();
    } else {
        println!("  (baseline skipped: mosquitto not installed; apt-get install -y mosquitto)");
    }
    let _ = std::fs::remove_dir_all(&base);
}
