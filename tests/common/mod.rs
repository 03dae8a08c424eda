//! Shared helpers for the integration tests: the real binary as a child
//! process, configs in temp dirs, and reading the queue back through the CLI.
#![allow(dead_code)]

pub mod mosquitto;

use edge_gateway::config::Framing;
use edge_gateway::demo::sim::{SimConfig, SimDevice, open_pty};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The gateway binary under test; `EDGE_GATEWAY_BIN` names another one
/// (a bench run A/B against an older build in the same go).
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(b) = *BIN_NOW.lock().unwrap() {
        return b;
    }
    BIN.get_or_init(|| std::env::var("EDGE_GATEWAY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_edge-gateway").into()))
}

static BIN_NOW: std::sync::Mutex<Option<&'static str>> = std::sync::Mutex::new(None);

/// Gateways started from now on run `path` (None: back to [`bin`]'s
/// default). For a bench that alternates two builds run by run.
pub fn use_bin(path: Option<&'static str>) {
    *BIN_NOW.lock().unwrap() = path;
}

/// Poll `f` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Port<'a> {
    pub name: &'a str,
    pub path: &'a Path,
    pub framing: &'a str,
}

/// Write a config into `dir` with the given ports; `extra` is appended
/// verbatim (e.g. a `[store]` table).
pub fn write_config(dir: &Path, ports: &[Port], pipeline: &str, store: &str) -> PathBuf {
    write_config_extra(dir, ports, pipeline, store, "")
}

/// [`write_config`] plus `extra` TOML at the end (e.g. an `[upstream]` table).
pub fn write_config_extra(dir: &Path, ports: &[Port], pipeline: &str, store: &str, extra: &str) -> PathBuf {
    let mut s = format!("[gateway]\nid = \"test-gw\"\ndata_dir = {:?}\n\n", dir.join("data").display().to_string());
    for p in ports {
        s += &format!(
            "[[serial]]\nname = {:?}\npath = {:?}\nframing = {:?}\n\n",
            p.name,
            p.path.display().to_string(),
            p.framing
        );
    }
    s += &format!("[pipeline]\n{pipeline}\n\n[store]\n{store}\n\n{extra}\n");
    let path = dir.join("gateway.toml");
    std::fs::write(&path, s).expect("write config");
    path
}

/// The gateway binary, running; its stderr goes to `log`.
pub struct Gateway {
    pub child: Child,
    pub log: PathBuf,
}

impl Gateway {
    pub fn start(config: &Path) -> Gateway {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Gateway {
        let log = config.with_extension(format!("log.{}", now_nanos()));
        let err = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(bin());
        cmd.args(["run", "--config"]).arg(config).stdin(Stdio::null()).stdout(Stdio::null()).stderr(err);
        cmd.env("RUST_LOG", "edge_gateway=debug,info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Gateway { child: cmd.spawn().expect("spawn edge-gateway"), log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    /// SIGTERM and wait; returns the exit code and how long it took.
    pub fn terminate(self) -> (Option<i32>, Duration) {
        self.stop_with(nix::sys::signal::Signal::SIGTERM)
    }

    /// Send `sig` without waiting (SIGHUP to reload, SIGTERM to watch the stop).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).expect("kill(2)");
    }

    /// Send `sig` and wait; returns the exit code and how long it took.
    pub fn stop_with(mut self, sig: nix::sys::signal::Signal) -> (Option<i32>, Duration) {
        let t = Instant::now();
        self.signal(sig);
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return (st.code(), t.elapsed());
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!("gateway did not exit within 10 s of {sig}; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

/// Run the CLI; returns (exit code, stdout, stderr).
pub fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin()).args(args).output().expect("run edge-gateway");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn queue_dump(config: &Path) -> Vec<serde_json::Value> {
    let (code, out, err) = cli(&["queue", "dump", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "queue dump failed: {err}");
    out.lines().map(|l| serde_json::from_str(l).expect("dump line is JSON")).collect()
}

pub fn queue_status(config: &Path) -> serde_json::Value {
    let (code, out, err) = cli(&["queue", "status", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "queue status failed: {err}");
    serde_json::from_str(out.trim()).expect("status is JSON")
}

/// `(device, sensor, seq)` → how many times it is in the queue.
pub fn count_by_key(dump: &[serde_json::Value]) -> HashMap<(String, String, u64), usize> {
    let mut m = HashMap::new();
    for r in dump {
        let key = (
            r["device"].as_str().unwrap().to_string(),
            r["sensor"].as_str().unwrap().to_string(),
            r["seq"].as_u64().expect("seq"),
        );
        *m.entry(key).or_insert(0) += 1;
    }
    m
}

/// A simulated wearable on a fresh PTY (its dock's path returned beside it).
pub fn device(name: &str, framing: Framing, seed: u64, dup: f64) -> (SimDevice, PathBuf) {
    let pty = open_pty().expect("openpty");
    let path = pty.slave_path.clone();
    let mut cfg = SimConfig::new(name, framing);
    cfg.seed = seed;
    cfg.duplicate_probability = dup;
    cfg.resend_after = Duration::from_millis(400);
    (SimDevice::on_pty(cfg, pty).expect("sim device"), path)
}

/// `n` devices `wrist-00`.., each on its own dock `dock0`.., and a config
/// naming the docks, with `pipeline`/`store` settings and `extra` tables.
pub fn fleet_with(
    dir: &Path,
    n: usize,
    seed: u64,
    dup: f64,
    framing: impl Fn(usize) -> Framing,
    pipeline: &str,
    store: &str,
    extra: &str,
) -> (Vec<SimDevice>, PathBuf) {
    let mut devices = Vec::new();
    let mut docks = Vec::new();
    for i in 0..n {
        let (d, p) = device(&format!("wrist-{i:02}"), framing(i), seed + i as u64, dup);
        let f = if framing(i) == Framing::Jsonl { "jsonl" } else { "cobs" };
        devices.push(d);
        docks.push((format!("dock{i}"), p, f));
    }
    let ports: Vec<Port> = docks.iter().map(|(n, p, f)| Port { name: n, path: p, framing: f }).collect();
    (devices, write_config_extra(dir, &ports, pipeline, store, extra))
}

/// `steps` rounds of one new reading per device (and a resend of what
/// stalled), `pace` apart.
pub fn stream(devices: &mut [SimDevice], steps: usize, pace: Duration) {
    for _ in 0..steps {
        for d in devices.iter_mut() {
            d.send_next().unwrap();
            d.resend_if_stalled().unwrap();
        }
        std::thread::sleep(pace);
    }
}

/// Wait (resending) until every device has every reading acked.
pub fn all_acked(devices: &mut [SimDevice], gw: &Gateway) {
    for d in devices.iter_mut() {
        let done = d.wait_all_acked(Duration::from_secs(60)).unwrap();
        assert!(done, "not all acked: {:?}\n{}", d.stats(), gw.log_text());
    }
}

/// The number just before `pattern` in the last log line that has it:
/// "… 123 readings dropped (queue full) …" → 123.
pub fn summary_number(log: &str, pattern: &str) -> u64 {
    let i = log.rfind(pattern).unwrap_or_else(|| panic!("{pattern:?} not in log:\n{log}"));
    log[..i].split_whitespace().last().unwrap().parse().unwrap()
}

/// Fail (not skip) when a tool is missing, saying how to get it.
pub fn need(tool: &str, package: &str) {
    let found =
        Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success());
    assert!(found, "`{tool}` not found: install it with `sudo apt-get install -y {package}` (scripts/test.sh does)");
}

/// `GET /metrics` from a gateway whose `[metrics] listen` is 127.0.0.1:`port`.
pub fn fetch_metrics(port: u16) -> String {
    edge_gateway::metrics::http::fetch(([127, 0, 0, 1], port).into(), Duration::from_secs(3)).expect("GET /metrics")
}

/// A loopback port nobody listens on (just now).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// SIGTERM; asserts exit status 0; returns the log and how long the exit took.
pub fn terminate_ok(gw: Gateway) -> (String, Duration) {
    let log = gw.log.clone();
    let (code, took) = gw.terminate();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(code, Some(0), "{text}");
    (text, took)
}

/// Unix ms now (wall clock, as the gateway's log lines).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// The UTC timestamp a gateway log line starts with (after any colour
/// codes), `2026-12-04T10:08:07.403380Z`, as unix ms.
pub fn log_time_ms(line: &str) -> Option<u64> {
    let at = line.find("20")?;
    let t = line.get(at..at + 26)?;
    let (date, time) = t.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, dd) = (d.next()??, d.next()??, d.next()??);
    let mut h = time.trim_end_matches('Z').split(':');
    let (hh, mm) = (h.next()?.parse::<i64>().ok()?, h.next()?.parse::<i64>().ok()?);
    let ss: f64 = h.next()?.parse().ok()?;
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3600 + mm * 60) * 1000 + (ss * 1000.0) as i64) as u64)
}

/// An MQTT UTF-8 string: two length bytes and the bytes.
pub fn mqtt_str(x: &str) -> Vec<u8> {
    [&(x.len() as u16).to_be_bytes()[..], x.as_bytes()].concat()
}

/// A fixed header byte and a body, as one MQTT packet.
pub fn mqtt_packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    edge_gateway::uplink::codec::put_varint(&mut p, body.len());
    p.extend_from_slice(body);
    p
}
