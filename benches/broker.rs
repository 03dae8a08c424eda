//! LAN publishers → embedded broker → queue, side by side with Mosquitto.
//!
//! `cargo bench --bench broker` runs the release `edge-gateway` binary with
//! its broker on a free loopback port, and `mosquitto` (Debian package
//! `mosquitto`) with the same load in the same go, and prints the median of
//! the runs:
//! * readings/s: for the gateway, all readings in the queue (checked with
//!   `queue status`) per second since the first publish; for Mosquitto,
//!   all PUBACKs per second (it has no queue behind it);
//! * p99 publish→PUBACK, and for the gateway p99 publish→queued (the
//!   reading's send time is its `value`; the batch's append time is in the
//!   queue record) and p99 publish→durable (the first group commit that
//!   covers the batch, from the gateway's `queue committed` trace lines);
//!   the queue must hold every reading once, checked by (device, seq);
//! * RSS of the whole process with 100 connected idle clients, and its peak
//!   (VmHWM) after the load.
//!
//! A third row runs the gateway with `broker.ack = "durable"` (a tenth of
//! the readings, one run): PUBACKs then wait for the queue's fsync. Two more
//! rows run both brokers with 20 ACL rules (`[[broker.acl]]`, and the
//! equivalent Mosquitto `acl_file`), the rule that admits the bench's
//! topics last, interleaved run by run with the rows without.
//!
//! Publishers are raw MQTT 3.1.1 clients (QoS 1, a window of 64 in flight,
//! ~100-byte payloads), the same code against both brokers. Under `cargo
//! test` (no `--bench`) a small smoke run against the gateway only keeps it
//! compiling and working.

use edge_gateway::queue::Queue;
use edge_gateway::reading::{Batch, Value};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const WINDOW: usize = 64;

fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

fn s(x: &[u8]) -> Vec<u8> {
    [&(x.len() as u16).to_be_bytes()[..], x].concat()
}

fn remaining_len(n: usize, out: &mut Vec<u8>) {
    edge_gateway::uplink::codec::put_varint(out, n)
}

/// Connect with MQTT 3.1.1 and wait for a successful CONNACK.
fn mqtt_connect(port: u16, id: &str) -> TcpStream {
    let mut sock = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    sock.set_nodelay(true).unwrap();
    let mut body = s(b"MQTT");
    body.extend([4, 0x02, 0, 60]);
    body.extend(s(id.as_bytes()));
    let mut p = vec![0x10];
    remaining_len(body.len(), &mut p);
    p.extend(body);
    sock.write_all(&p).unwrap();
    let mut ack = [0u8; 4];
    sock.read_exact(&mut ack).expect("CONNACK");
    assert_eq!((ack[0], ack[3]), (0x20, 0), "CONNACK refused");
    sock
}

struct PubResult {
    acks_us: Vec<u64>,
}

/// One publisher: `n` QoS 1 readings on `sensors/{device}/hr`, WINDOW in flight.
fn publisher(port: u16, device: String, n: u64) -> PubResult {
    let sock = mqtt_connect(port, &device);
    let mut reader = sock.try_clone().unwrap();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..65_536).map(|_| AtomicU64::new(0)).collect());
    let (credit_tx, credit_rx) = std::sync::mpsc::channel::<()>();
    for _ in 0..WINDOW {
        credit_tx.send(()).unwrap();
    }
    let sent_r = sent.clone();
    let acks = std::thread::spawn(move || {
        let mut lat = Vec::with_capacity(n as usize);
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut chunk = [0u8; 16 * 1024];
        while (lat.len() as u64) < n {
            let k = reader.read(&mut chunk).expect("read PUBACKs");
            assert!(k > 0, "broker closed the connection");
            buf.extend_from_slice(&chunk[..k]);
            let mut at = 0;
            while buf.len() - at >= 4 {
                assert_eq!(buf[at], 0x40, "expected PUBACK");
                let pkid = u16::from_be_bytes([buf[at + 2], buf[at + 3]]) as usize;
                lat.push(now_us() - sent_r[pkid].load(Ordering::Relaxed));
                let _ = credit_tx.send(());
                at += 4;
            }
            buf.drain(..at);
        }
        lat
    });
    let topic = format!("sensors/{device}/hr");
    let mut w = sock;
    let mut out = Vec::with_capacity(256);
    for i in 0..n {
        credit_rx.recv().unwrap();
        let pkid = (i % 65_535 + 1) as u16;
        let t = now_us();
        let payload =
            format!(r#"{{"seq":{},"ts":{},"value":{t},"note":"xxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}"#, i + 1, t / 1000);
        let mut body = s(topic.as_bytes());
        body.extend(pkid.to_be_bytes());
        body.extend(payload.as_bytes());
        out.clear();
        out.push(0x32);
        remaining_len(body.len(), &mut out);
        out.extend(body);
        sent[pkid as usize].store(t, Ordering::Relaxed);
        w.write_all(&out).expect("publish");
    }
    PubResult { acks_us: acks.join().unwrap() }
}

fn percentile(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn rss_kb(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn wait_port(port: u16) {
    for _ in 0..500 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("nothing listens on {port}");
}

struct Server {
    child: Child,
    port: u16,
    config: Option<std::path::PathBuf>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 20 ACL rules where the one that lets the bench's publishes through comes
/// last, so each PUBLISH is checked against all of them: 19 deny rules on
/// other topics (some for other users and client ids), then allow `sensors/+/+`.
/// As `[[broker.acl]]` tables and as the equivalent Mosquitto `acl_file`.
const ACL_RULES: usize = 20;

fn acl_toml() -> String {
    let mut s = String::new();
    for i in 0..ACL_RULES - 1 {
        let who = match i % 3 {
            0 => String::new(),
            1 => format!("user = \"nurse-{i}\"\n"),
            _ => format!("client_id = \"tablet-{i}-*\"\n"),
        };
        s += &format!(
            "[[broker.acl]]\n{who}topic = \"ward-{i}/+/private/#\"\naccess = \"readwrite\"\npermission = \"deny\"\n"
        );
    }
    s + "[[broker.acl]]\ntopic = \"sensors/+/+\"\naccess = \"readwrite\"\npermission = \"allow\"\n"
}

fn acl_file() -> String {
    // Anonymous clients get the lines before the first `user` line; the
    // per-user lines follow, as Mosquitto's format wants.
    let mut anon = String::new();
    let mut users = String::new();
    for i in 0..ACL_RULES - 1 {
        match i % 3 {
            1 => users += &format!("user nurse-{i}\ntopic deny ward-{i}/+/private/#\n"),
            _ => anon += &format!("topic deny ward-{i}/+/private/#\n"),
        }
    }
    format!("{anon}topic readwrite sensors/+/+\n{users}")
}

fn gateway(dir: &Path, ack: &str, acl: bool) -> Server {
    let port = free_port();
    let _ = std::fs::remove_dir_all(dir.join("data"));
    let cfg = dir.join("gw.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nid = \"bench\"\ndata_dir = {:?}\n[store]\nmax_bytes = \"2GiB\"\n[broker]\nenabled = true\n\
             tcp = \"127.0.0.1:{port}\"\nallow_anonymous = true\nmax_connections = 512\nack = \"{ack}\"\n{}",
            dir.join("data").display().to_string(),
            if acl { acl_toml() } else { String::new() },
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_edge-gateway"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info,rumqttd=warn,edge_gateway::pipeline=trace")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("gw.log")).unwrap())
        .spawn()
        .expect("spawn edge-gateway");
    wait_port(port);
    Server { child, port, config: Some(cfg) }
}

fn mosquitto(dir: &Path, acl: bool) -> Option<Server> {
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    let mut text = format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n");
    if acl {
        std::fs::write(dir.join("acl_file"), acl_file()).unwrap();
        text += &format!("acl_file {}\n", dir.join("acl_file").display());
    }
    std::fs::write(&conf, text).unwrap();
    let child =
        Command::new("mosquitto").arg("-c").arg(&conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok()?;
    wait_port(port);
    Some(Server { child, port, config: None })
}

fn queued_readings(cfg: &Path) -> u64 {
    let out = Command::new(env!("CARGO_BIN_EXE_edge-gateway"))
        .args(["queue", "status", "--config"])
        .arg(cfg)
        .output()
        .expect("queue status");
    serde_json::from_slice::<serde_json::Value>(&out.stdout).ok().and_then(|v| v["readings"].as_u64()).unwrap_or(0)
}

struct Run {
    rate: f64,
    p99_ack_ms: f64,
    p99_queued_ms: Option<f64>,
    p99_durable_ms: Option<f64>,
    hwm_kb: u64,
}

/// The log line without its colour codes (`ESC [ … m`).
fn strip_ansi(l: &str) -> String {
    let mut out = String::with_capacity(l.len());
    let mut chars = l.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// (µs since the epoch, committed through id) of every `queue committed`
/// trace line in the gateway's log, in order.
fn commits(log: &str) -> Vec<(u64, u64)> {
    log.lines()
        .filter(|l| l.contains("queue committed"))
        .map(strip_ansi)
        .filter_map(|l| {
            let l = l.as_str();
            let ts = l.split_whitespace().next()?;
            let ts = ts.trim_start_matches(|c: char| !c.is_ascii_digit());
            let ts = ts.get(..ts.find('Z')? + 1)?;
            let t = humantime::parse_rfc3339(ts).ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_micros() as u64;
            let id = l[l.find("through=")? + 8..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
            Some((t, id))
        })
        .collect()
}

fn load(server: &Server, publishers: usize, per: u64) -> Run {
    let total = publishers as u64 * per;
    let start = Instant::now();
    let handles: Vec<_> = (0..publishers)
        .map(|p| {
            let port = server.port;
            std::thread::spawn(move || publisher(port, format!("bench-{p:03}"), per))
        })
        .collect();
    let mut acks: Vec<u64> = handles.into_iter().flat_map(|h| h.join().unwrap().acks_us).collect();
    let mut elapsed = start.elapsed();
    let mut p99_queued_ms = None;
    let mut p99_durable_ms = None;
    if let Some(cfg) = &server.config {
        let deadline = Instant::now() + Duration::from_secs(20);
        while queued_readings(cfg) < total {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(cfg.parent().unwrap().join("gw.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                let jumps = log.matches("jumping").count();
                panic!(
                    "only {} of {total} readings reached the queue ({jumps} rumqttd skips); log tail:\n{}",
                    queued_readings(cfg),
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        elapsed = start.elapsed();
        // Publish → queued, from each batch's append time; publish →
        // durable, from the first commit through the batch's id.
        std::thread::sleep(Duration::from_millis(300)); // the last commit's trace line
        let log = std::fs::read_to_string(cfg.parent().unwrap().join("gw.log")).unwrap_or_default();
        let commits = commits(&log);
        let (q, _) = Queue::open_readonly(&cfg.parent().unwrap().join("data").join("queue")).expect("queue");
        let mut lat = Vec::with_capacity(total as usize);
        let mut durable = Vec::with_capacity(total as usize);
        let mut seen = std::collections::HashSet::with_capacity(total as usize);
        for (meta, payload) in q.read_from(0, usize::MAX).expect("read queue") {
            let at = commits.iter().find(|(_, through)| *through >= meta.id).map(|(t, _)| *t);
            for r in Batch::decode(&payload).expect("batch").readings {
                assert!(seen.insert((r.device.clone(), r.seq)), "{} seq {:?} queued twice", r.device, r.seq);
                if let Value::Number(sent_us) = r.value {
                    lat.push((meta.created_ms * 1000).saturating_sub(sent_us as u64));
                    if let Some(at) = at {
                        durable.push(at.saturating_sub(sent_us as u64));
                    }
                }
            }
        }
        assert_eq!(lat.len() as u64, total, "every reading queued exactly once");
        assert_eq!(seen.len() as u64, total, "distinct readings");
        assert_eq!(durable.len() as u64, total, "a commit line for every batch ({} lines)", commits.len());
        p99_queued_ms = Some(percentile(&mut lat, 0.99) as f64 / 1000.0);
        p99_durable_ms = Some(percentile(&mut durable, 0.99) as f64 / 1000.0);
    }
    Run {
        rate: total as f64 / elapsed.as_secs_f64(),
        p99_ack_ms: percentile(&mut acks, 0.99) as f64 / 1000.0,
        p99_queued_ms,
        p99_durable_ms,
        hwm_kb: rss_kb(server.child.id(), "VmHWM:"),
    }
}

/// RSS (kB) of the broker process with `n` connected idle clients.
fn idle_rss(server: &Server, n: usize) -> u64 {
    let clients: Vec<TcpStream> = (0..n).map(|i| mqtt_connect(server.port, &format!("idle-{i:03}"))).collect();
    std::thread::sleep(Duration::from_secs(1));
    let kb = rss_kb(server.child.id(), "VmRSS:");
    drop(clients);
    kb
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let (publishers, per, runs) = if full_run() { (10, 20_000u64, 3) } else { (2, 200, 1) };
    let dir = tempfile::tempdir().unwrap();
    let have_mosquitto = full_run() && Command::new("mosquitto").arg("-h").output().is_ok();
    if full_run() && !have_mosquitto {
        println!("mosquitto not found: `sudo apt-get install -y mosquitto` to compare against it\n");
    }
    println!(
        "{publishers} publishers x {per} readings, QoS 1, ~100 B payloads, window {WINDOW}; median of {runs} runs\n"
    );
    let mut gw_runs = Vec::new();
    let mut gw_acl_runs = Vec::new();
    let mut mq_runs = Vec::new();
    let mut mq_acl_runs = Vec::new();
    // Interleaved, so each pair shares the machine's state of the moment.
    for _ in 0..runs {
        let gw = gateway(dir.path(), "received", false);
        gw_runs.push(load(&gw, publishers, per));
        drop(gw);
        let gw = gateway(dir.path(), "received", true);
        gw_acl_runs.push(load(&gw, publishers, per));
        drop(gw);
        if have_mosquitto && let Some(mq) = mosquitto(dir.path(), false) {
            mq_runs.push(load(&mq, publishers, per));
        }
        if have_mosquitto && let Some(mq) = mosquitto(dir.path(), true) {
            mq_acl_runs.push(load(&mq, publishers, per));
        }
    }
    // broker.ack = "durable": acks wait for the queue's fsync, so far fewer readings in one run.
    let durable_runs = vec![load(&gateway(dir.path(), "durable", false), publishers, (per / 10).max(50))];
    let gw_idle = idle_rss(&gateway(dir.path(), "received", false), 100);
    let mq_idle = if have_mosquitto { mosquitto(dir.path(), false).map(|m| idle_rss(&m, 100)) } else { None };

    let row = |name: &str, r: &[Run], idle: Option<u64>| {
        if r.is_empty() {
            return;
        }
        let rate = median(r.iter().map(|x| x.rate).collect());
        let ack = median(r.iter().map(|x| x.p99_ack_ms).collect());
        let queued = r[0].p99_queued_ms.map(|_| median(r.iter().filter_map(|x| x.p99_queued_ms).collect()));
        let durable = r[0].p99_durable_ms.map(|_| median(r.iter().filter_map(|x| x.p99_durable_ms).collect()));
        let hwm = median(r.iter().map(|x| x.hwm_kb as f64).collect());
        println!(
            "{name:<22} {rate:>12.0} {ack:>14.1} {:>16} {:>17} {:>18} {:>14.1}",
            queued.map_or("-".into(), |q| format!("{q:.1}")),
            durable.map_or("-".into(), |q| format!("{q:.1}")),
            idle.map_or("-".into(), |kb| format!("{:.1}", kb as f64 / 1024.0)),
            hwm / 1024.0,
        );
    };
    println!(
        "{:<22} {:>12} {:>14} {:>16} {:>17} {:>18} {:>14}",
        "broker", "readings/s", "p99 PUBACK ms", "p99 queued ms", "p99 durable ms", "RSS 100 idle MiB", "peak RSS MiB"
    );
    row("edge-gateway (rumqttd)", &gw_runs, Some(gw_idle));
    row(&format!("  with {ACL_RULES} ACL rules"), &gw_acl_runs, None);
    row("  with ack = durable", &durable_runs, None);
    row("mosquitto", &mq_runs, mq_idle);
    row(&format!("  with {ACL_RULES}-line acl_file"), &mq_acl_runs, None);
    let rate = |r: &[Run]| median(r.iter().map(|x| x.rate).collect());
    println!("\nedge-gateway with/without ACL readings/s: {:.3}x", rate(&gw_acl_runs) / rate(&gw_runs));
    if !mq_runs.is_empty() && !mq_acl_runs.is_empty() {
        println!("mosquitto with/without acl_file readings/s: {:.3}x", rate(&mq_acl_runs) / rate(&mq_runs));
    }
    if let (Some(g), false) = (gw_runs.first(), mq_runs.is_empty()) {
        let _ = g;
        let ratio = median(gw_runs.iter().map(|x| x.rate).collect()) / median(mq_runs.iter().map(|x| x.rate).collect());
        println!("\nedge-gateway/mosquitto readings/s: {ratio:.2}x");
    }
}
