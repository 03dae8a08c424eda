//! What real wearables do at the edges, against the real binary: a
//! hand-driven device on a kernel PTY writes jsonl lines and reads the acks.
//! Each test is the field event an issue reproduced (docs/firmware-protocol.md;
//! docs/exactly-once.md): a device that reboots and repeats a value,
//! a dock opened mid-line, a wearable redocked after the dedup window.

mod common;
use common::*;
use edge_gateway::demo::sim::open_pty;
use std::io::{BufRead, BufReader, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A device on a PTY that sends lines it is given and records every ack.
struct Dev {
    master: std::fs::File,
    acks: Arc<Mutex<Vec<serde_json::Value>>>,
    /// Every `{"time":...}` line the gateway wrote.
    times: Arc<Mutex<Vec<u64>>>,
    _slave_keep: edge_gateway::demo::sim::Pty,
}

impl Dev {
    fn new() -> (Dev, std::path::PathBuf) {
        let pty = open_pty().unwrap();
        let path = pty.slave_path.clone();
        let master = pty.master.try_clone().unwrap();
        let reader = pty.master.try_clone().unwrap();
        let acks = Arc::new(Mutex::new(Vec::new()));
        let times = Arc::new(Mutex::new(Vec::new()));
        let (sink, time_sink) = (acks.clone(), times.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { return };
                if let Some(ms) = edge_gateway::wire::parse_time_jsonl(line.as_bytes()) {
                    time_sink.lock().unwrap().push(ms);
                }
                // Acks only: a device ignores lines it does not know (the time).
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v.get("ack").is_some()
                {
                    sink.lock().unwrap().push(v["ack"].clone());
                }
            }
        });
        (Dev { master, acks, times, _slave_keep: pty }, path)
    }

    fn send(&mut self, line: &str) {
        self.master.write_all(line.as_bytes()).unwrap();
        self.master.write_all(b"\n").unwrap();
    }

    fn reading(&mut self, seq: u64, ts: Option<u64>, value: f64, boot: Option<u32>) {
        let mut v = serde_json::json!({"device": "w1", "sensor": "door", "seq": seq, "value": value});
        if let Some(ts) = ts {
            v["ts"] = ts.into();
        }
        if let Some(b) = boot {
            v["boot"] = b.into();
        }
        self.send(&v.to_string());
    }

    fn acks(&self) -> Vec<serde_json::Value> {
        self.acks.lock().unwrap().clone()
    }

    fn wait_ack(&self, seq: u64, boot: Option<u32>) -> bool {
        wait_until(Duration::from_secs(10), || {
            self.acks().iter().any(|a| a["seq"] == seq && a["boot"].as_u64().map(|b| b as u32) == boot)
        })
    }
}

fn gateway(dir: &std::path::Path, path: &std::path::Path, pipeline: &str) -> (std::path::PathBuf, Gateway) {
    gateway_with(dir, path, pipeline, "")
}

/// [`gateway`] with `extra` tables.
fn gateway_with(
    dir: &std::path::Path,
    path: &std::path::Path,
    pipeline: &str,
    extra: &str,
) -> (std::path::PathBuf, Gateway) {
    let cfg = write_config_extra(
        dir,
        &[Port { name: "dock0", path, framing: "jsonl" }],
        &format!("batch_max_age = \"20ms\"\n{pipeline}"),
        "fsync_interval = \"20ms\"",
        extra,
    );
    let gw = Gateway::start(&cfg);
    assert!(wait_until(Duration::from_secs(10), || gw.log_text().contains("connected")), "{}", gw.log_text());
    (cfg, gw)
}

fn stop(gw: Gateway) -> String {
    let log = std::fs::read_to_string(&gw.log).unwrap_or_default();
    let (code, _) = gw.terminate();
    assert_eq!(code, Some(0), "{log}");
    log
}

/// L1: a wearable reboots inside the dedup window, restarts its counter and
/// repeats its values (a 0/1 door sensor). Its new readings must be stored,
/// and no ack may cover them before they are.
#[test]
fn a_rebooted_wearable_repeating_values_is_stored_and_never_acked_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, path) = Dev::new();
    let (cfg, gw) = gateway(dir.path(), &path, "");
    for s in 0..=5 {
        d.reading(s, Some(1_764_000_000_000 + s), (s % 2) as f64, None);
    }
    assert!(d.wait_ack(5, None), "{:?}", d.acks());
    let before = d.acks().len();
    // Reboot: counter from 0 again, same values, its clock moved on.
    for s in 0..=2 {
        d.reading(s, Some(1_764_000_100_000 + s), (s % 2) as f64, None);
    }
    assert!(d.wait_ack(2, None), "{:?}", d.acks());
    std::thread::sleep(Duration::from_millis(300));
    let after: Vec<_> = d.acks()[before..].to_vec();
    assert!(
        after.iter().all(|a| a["seq"].as_u64().unwrap() <= 2),
        "an ack above 2 frees readings never sent: {after:?}"
    );
    stop(gw);
    assert_eq!(queue_dump(&cfg).len(), 9, "six readings, then three new ones");
}

/// The same reboot by a wearable with a boot id and no clock: acks name the boot.
#[test]
fn a_boot_id_keeps_incarnations_apart_without_a_clock() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, path) = Dev::new();
    let (cfg, gw) = gateway(dir.path(), &path, "");
    for s in 0..=5 {
        d.reading(s, None, 1.0, Some(7));
    }
    assert!(d.wait_ack(5, Some(7)), "{:?}", d.acks());
    for s in 0..=2 {
        d.reading(s, None, 1.0, Some(8));
    }
    assert!(d.wait_ack(2, Some(8)), "{:?}", d.acks());
    // A resend of boot 7 is still a duplicate of boot 7.
    d.reading(3, None, 1.0, Some(7));
    std::thread::sleep(Duration::from_millis(300));
    let log = stop(gw);
    let dump = queue_dump(&cfg);
    assert_eq!(dump.len(), 9, "{log}");
    assert_eq!(dump.iter().filter(|r| r["boot"] == 8).count(), 3, "the boot travels with the reading: {dump:?}");
}

/// L2: the dock is opened mid-line: seq 41 arrives garbled, 42 whole. An
/// ack of 42 would free 41, which the gateway never stored.
#[test]
fn a_port_opened_mid_line_never_acks_the_garbled_reading() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, path) = Dev::new();
    let (cfg, gw) = gateway(dir.path(), &path, "ack_gap_timeout = \"2s\"");
    d.send(r#"ice":"w1","sensor":"door","seq":41,"ts":1764000000041,"value":1}"#);
    d.reading(42, Some(1_764_000_000_042), 0.0, None);
    std::thread::sleep(Duration::from_millis(800));
    assert!(d.acks().is_empty(), "nothing may be acked while 41 may exist: {:?}", d.acks());
    // The device resends what it holds, 41 included, for a while.
    for _ in 0..6 {
        d.reading(41, Some(1_764_000_000_041), 1.0, None);
        d.reading(42, Some(1_764_000_000_042), 0.0, None);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(d.wait_ack(42, None), "acked once the device has talked for ack_gap_timeout: {:?}", d.acks());
    stop(gw);
    let seqs: Vec<u64> = queue_dump(&cfg).iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![42, 41], "both stored, once");
}

/// D1: a wearable undocked before its ack and redocked after the dedup
/// window resends: it gets its ack again, and nothing is stored twice.
#[test]
fn a_redocked_wearable_resending_after_the_dedup_window_is_acked_not_stored_again() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, path) = Dev::new();
    let (cfg, gw) = gateway(dir.path(), &path, "dedup_window = \"1s\"");
    for s in 0..=4 {
        d.reading(s, Some(1_764_000_000_000 + s), 70.0, None);
    }
    assert!(d.wait_ack(4, None), "{:?}", d.acks());
    std::thread::sleep(Duration::from_millis(1500));
    let before = d.acks().len();
    for s in 0..=4 {
        d.reading(s, Some(1_764_000_000_000 + s), 70.0, None);
    }
    assert!(wait_until(Duration::from_secs(10), || d.acks().len() > before), "the resend is answered");
    assert_eq!(d.acks().last().unwrap()["seq"], 4);
    std::thread::sleep(Duration::from_millis(300));
    stop(gw);
    assert_eq!(queue_dump(&cfg).len(), 5, "stored once");
}

/// Time for the devices: a device is told the gateway's time when its port
/// connects; a device whose clock is 90 s behind shows it in
/// `device_clock_offset_milliseconds` and in one warning, and its readings
/// keep the ts it sent (docs/firmware-protocol.md, "Time").
#[test]
fn a_device_is_told_the_time_and_a_skewed_clock_is_measured_not_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, path) = Dev::new();
    let port = free_port();
    let (cfg, gw) = gateway_with(dir.path(), &path, "", &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
    assert!(wait_until(Duration::from_secs(10), || !d.times.lock().unwrap().is_empty()), "no time line");
    let told = d.times.lock().unwrap()[0] as i64;
    let now = edge_gateway::reading::now_ms() as i64;
    assert!((now - told).abs() < 10_000, "told {told}, now {now}");
    let behind = now as u64 - 90_000;
    for s in 0..=3 {
        d.reading(s, Some(behind + s), 1.0, None);
        std::thread::sleep(Duration::from_millis(400));
    }
    assert!(d.wait_ack(3, None), "{:?}", d.acks());
    let m = fetch_metrics(port);
    let line = m.lines().find(|l| l.starts_with("edge_gateway_device_clock_offset_milliseconds{device=\"w1\"}"));
    let offset: f64 = line.unwrap_or_else(|| panic!("{m}")).rsplit(' ').next().unwrap().parse().unwrap();
    assert!((-95_000.0..-85_000.0).contains(&offset), "offset {offset}");
    let log = stop(gw);
    assert_eq!(log.matches("clock is").count(), 1, "one warning: {log}");
    assert!(log.contains("w1's clock is 9") && log.contains("behind"), "{log}");
    let dump = queue_dump(&cfg);
    assert_eq!(dump[0]["ts"], behind, "the device's ts is kept");
}
