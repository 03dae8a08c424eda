//! The gateway as a systemd service: `sd_notify` over a real unix datagram
//! socket (what systemd listens on), the watchdog tied to live loops,
//! journald's native protocol on a real socket at the real path (inside a
//! private mount namespace), `/metrics` and `edge-gateway status`.

mod common;

use common::*;
use edge_gateway::config::Framing;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A notify socket as systemd provides one; records what arrives, when.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    got: Vec<(Instant, String)>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        NotifySocket { sock, path, got: Vec::new() }
    }

    fn env(&self) -> String {
        self.path.display().to_string()
    }

    /// Receive for `d`, keeping every datagram.
    fn pump(&mut self, d: Duration) {
        let end = Instant::now() + d;
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            if let Ok(n) = self.sock.recv(&mut buf) {
                self.got.push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned()));
            }
        }
    }

    /// Pump until a datagram has a line `line`; panics after `timeout`.
    fn wait_for(&mut self, line: &str, timeout: Duration, gw: &Gateway) -> Instant {
        let end = Instant::now() + timeout;
        loop {
            if let Some((t, _)) = self.got.iter().find(|(_, m)| m.lines().any(|l| l == line)) {
                return *t;
            }
            assert!(Instant::now() < end, "no {line:?} within {timeout:?}; got {:?}\n{}", self.got, gw.log_text());
            self.pump(Duration::from_millis(50));
        }
    }

    fn count_since(&self, since: Instant, line: &str) -> usize {
        self.got.iter().filter(|(t, m)| *t >= since && m.lines().any(|l| l == line)).count()
    }
}

fn metrics_extra(port: u16) -> String {
    format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n")
}

/// The value of one sample line, e.g. `edge_gateway_link_up{source="serial",link="dock0"}`.
fn sample(text: &str, head: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(head)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn notify_ready_status_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::bind(dir.path());
    let (mut dev, dock) = device("wrist-01", Framing::Jsonl, 1, 0.0);
    let mport = free_port();
    let cfg = write_config_extra(
        dir.path(),
        &[Port { name: "dock0", path: &dock, framing: "jsonl" }],
        "batch_max_age = \"50ms\"",
        "fsync_interval = \"10ms\"",
        &metrics_extra(mport),
    );
    let started = Instant::now();
    let gw = Gateway::start_with_env(&cfg, &[("NOTIFY_SOCKET", &notify.env()), ("WATCHDOG_USEC", "400000")]);
    let ready = notify.wait_for("READY=1", Duration::from_secs(20), &gw);
    eprintln!("READY=1 after {:.0?} (debug build)", ready - started);
    // READY means ready: the queue is open and /metrics answers at once.
    assert!(gw.log_text().contains("queue open"), "{}", gw.log_text());
    let m = fetch_metrics(mport);
    assert!(m.contains("edge_gateway_info{"), "{m}");
    // STATUS= may be its own datagram, a moment after READY=1: read until it
    // comes (it was read for only 50 ms, and failed under load).
    let end = Instant::now() + Duration::from_secs(10);
    while !notify.got.iter().any(|(_, m)| m.starts_with("STATUS=")) && Instant::now() < end {
        notify.pump(Duration::from_millis(50));
    }
    let status = notify.got.iter().find(|(_, m)| m.starts_with("STATUS=")).map(|(_, m)| m.clone());
    let status = status.unwrap_or_else(|| panic!("no STATUS= with READY; got {:?}", notify.got));
    assert!(status.contains("readings/s in") && status.contains("queue"), "{status}");

    // WATCHDOG=1 at half of WATCHDOG_USEC (400 ms): ~10 in 2 s.
    for _ in 0..40 {
        dev.send_next().unwrap();
    }
    let t0 = Instant::now();
    notify.pump(Duration::from_secs(2));
    let pings = notify.count_since(t0, "WATCHDOG=1");
    assert!((5..=14).contains(&pings), "{pings} WATCHDOG=1 in 2 s with WATCHDOG_USEC=400000");
    assert!(dev.wait_all_acked(Duration::from_secs(10)).unwrap(), "{:?}", dev.stats());

    gw.signal(nix::sys::signal::Signal::SIGTERM);
    notify.wait_for("STOPPING=1", Duration::from_secs(5), &gw);
    let (log, _) = terminate_ok(gw);
    assert!(log.contains("40 readings accepted"), "{log}");
}

/// The pings come from the pipeline's loop, gated on the other loops: a
/// wedged pipeline thread or a wedged async runtime stops them, so systemd
/// restarts the service. A bare timer would keep pinging in both cases.
#[test]
fn watchdog_stops_when_a_loop_is_wedged() {
    for (point, expect_log) in [
        ("pipeline-loop:15", "stall point pipeline-loop reached"),
        ("heartbeat:6", "the async runtime loop has not run"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut notify = NotifySocket::bind(dir.path());
        let cfg = write_config_extra(dir.path(), &[], "", "", "[metrics]\nenabled = false\n");
        let gw = Gateway::start_with_env(
            &cfg,
            &[("NOTIFY_SOCKET", &notify.env()), ("WATCHDOG_USEC", "400000"), ("EDGE_GATEWAY_STALL_AT", point)],
        );
        notify.wait_for("READY=1", Duration::from_secs(20), &gw);
        notify.wait_for("WATCHDOG=1", Duration::from_secs(5), &gw);
        assert!(
            wait_until(Duration::from_secs(15), || gw.log_text().contains(expect_log)),
            "{point}: no {expect_log:?}\n{}",
            gw.log_text()
        );
        // Whatever was in flight when it wedged may still land; then silence.
        notify.pump(Duration::from_millis(300));
        let t0 = Instant::now();
        notify.pump(Duration::from_millis(1500));
        assert_eq!(notify.count_since(t0, "WATCHDOG=1"), 0, "{point}: still pinging while wedged");
        let mut gw = gw;
        assert!(gw.child.try_wait().unwrap().is_none(), "{point}: the process must still run (systemd kills it)");
        gw.kill9();
    }
}

/// One journal entry in the native protocol: `KEY=value\n`, or `KEY\n`
/// + little-endian u64 length + bytes + `\n` for values with newlines.
fn parse_journal(mut d: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while !d.is_empty() {
        let nl = d.iter().position(|&b| b == b'\n').unwrap_or(d.len());
        let line = &d[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            out.push((String::from_utf8_lossy(&line[..eq]).into(), String::from_utf8_lossy(&line[eq + 1..]).into()));
            d = &d[(nl + 1).min(d.len())..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &d[nl + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            out.push((key, String::from_utf8_lossy(&rest[8..8 + len]).into()));
            d = &rest[(8 + len + 1).min(rest.len())..];
        }
    }
    out
}

#[test]
fn under_systemd_logs_go_to_journald_with_structured_fields() {
    need("unshare", "util-linux");
    let dir = tempfile::tempdir().unwrap();
    let journal_path = dir.path().join("journal.sock");
    let journal = UnixDatagram::bind(&journal_path).unwrap();
    journal.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let missing = dir.path().join("no-such-dock");
    let cfg = write_config_extra(
        dir.path(),
        &[Port { name: "dock7", path: &missing, framing: "jsonl" }],
        "",
        "",
        "[metrics]\nenabled = false\n",
    );
    // stderr is "the journal stream": JOURNAL_STREAM names its dev:inode,
    // exactly as systemd sets it for a service.
    let stderr_path = dir.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let meta = std::fs::metadata(&stderr_path).unwrap();
    // The journal's socket path is fixed (/run/systemd/journal/socket): give
    // the gateway a private /run with our socket bound there.
    let script = r#"mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && touch /run/systemd/journal/socket \
        && mount --bind "$1" /run/systemd/journal/socket && exec "$2" run --config "$3""#;
    let mut child = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", script, "sh"])
        .arg(&journal_path)
        .arg(bin())
        .arg(&cfg)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut entries = Vec::new();
    let end = Instant::now() + Duration::from_secs(20);
    let mut buf = vec![0u8; 65536];
    let found = |entries: &Vec<Vec<(String, String)>>| {
        entries.iter().any(|e| e.iter().any(|(k, v)| k == "MESSAGE" && v.contains("serial dock7: cannot open")))
    };
    while Instant::now() < end && !found(&entries) {
        if let Ok(n) = journal.recv(&mut buf) {
            entries.push(parse_journal(&buf[..n]));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let stderr_text = std::fs::read_to_string(&stderr_path).unwrap();
    let entry = entries
        .iter()
        .find(|e| e.iter().any(|(k, v)| k == "MESSAGE" && v.contains("serial dock7: cannot open")))
        .unwrap_or_else(|| panic!("no journal entry for the missing dock; entries {entries:?}\nstderr: {stderr_text}"));
    let field = |k: &str| entry.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    assert_eq!(field("PRIORITY"), Some("4"), "{entry:?}");
    assert_eq!(field("SYSLOG_IDENTIFIER"), Some("edge-gateway"), "{entry:?}");
    assert_eq!(field("PORT"), Some("dock7"), "{entry:?}");
    assert_eq!(field("SOURCE"), Some("serial"), "{entry:?}");
    assert!(entries.iter().any(|e| e.iter().any(|(k, v)| k == "MESSAGE" && v.contains("queue open"))), "{entries:?}");
    // Nothing went to stderr as text: journald had it all.
    assert!(!stderr_text.contains("cannot open"), "{stderr_text}");
}

#[test]
fn metrics_endpoint_and_status_command() {
    let dir = tempfile::tempdir().unwrap();
    let mport = free_port();
    let (mut devices, cfg) =
        fleet_with(dir.path(), 2, 7, 0.3, |_| Framing::Jsonl, "batch_max_age = \"50ms\"", "", &metrics_extra(mport));
    let gw = Gateway::start(&cfg);
    for _ in 0..30 {
        for d in devices.iter_mut() {
            d.send_next().unwrap();
        }
    }
    devices[0].send_malformed(edge_gateway::demo::sim::Malformed::Garbage).unwrap();
    all_acked(&mut devices, &gw);
    let m = fetch_metrics(mport);
    for i in 0..2 {
        assert_eq!(
            sample(&m, &format!("edge_gateway_device_readings_total{{source=\"serial\",device=\"wrist-0{i}\"}}")),
            Some(30.0),
            "{m}"
        );
        assert_eq!(
            sample(&m, &format!("edge_gateway_link_up{{source=\"serial\",link=\"dock{i}\"}}")),
            Some(1.0),
            "{m}"
        );
    }
    let dups: f64 = (0..2)
        .filter_map(|i| {
            sample(&m, &format!("edge_gateway_device_duplicates_total{{source=\"serial\",device=\"wrist-0{i}\"}}"))
        })
        .sum();
    assert_eq!(Some(dups), sample(&m, "edge_gateway_duplicates_dropped_total"), "{m}");
    assert!(sample(&m, "edge_gateway_malformed_total{source=\"serial\",link=\"dock0\"}").unwrap() >= 1.0, "{m}");
    assert_eq!(sample(&m, "edge_gateway_readings_accepted_total"), Some(60.0), "{m}");
    assert_eq!(sample(&m, "edge_gateway_upstream_configured"), Some(0.0), "{m}");
    assert!(sample(&m, "edge_gateway_queue_bytes").unwrap() > 0.0, "{m}");

    let cfg_s = cfg.to_str().unwrap();
    let (code, out, err) = cli(&["status", "--config", cfg_s]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("dock1") && out.contains("wrist-00") && out.contains("health: ok"), "{out}");

    // A dock unplugged: unhealthy, and the table says which.
    let d1 = devices.pop().unwrap();
    d1.unplug();
    assert!(
        wait_until(Duration::from_secs(10), || sample(
            &fetch_metrics(mport),
            "edge_gateway_link_up{source=\"serial\",link=\"dock1\"}"
        ) == Some(0.0)),
        "{}",
        gw.log_text()
    );
    let (code, out, _) = cli(&["status", "--config", cfg_s]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("UNHEALTHY: serial dock1 down"), "{out}");

    // Not running: exit 2 and a sentence saying so.
    terminate_ok(gw);
    let (code, _, err) = cli(&["status", "--config", cfg_s]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot reach the gateway's metrics"), "{err}");
}
