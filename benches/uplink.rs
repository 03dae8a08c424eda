//! End to end at QoS 2, against the Mosquitto bridge as the baseline, in one go.
//!
//! (a) simulated wearables on PTYs → `edge-gateway` (release binary) → TLS,
//!     QoS 2 → upstream Mosquitto;
//! (b) `mosquitto_pub -l -q 2` publishers → a local Mosquitto bridged over
//!     TLS at QoS 2 → the same upstream Mosquitto.
//!
//! A QoS 2 subscriber on the upstream broker (in this process, delivering at
//! PUBREL like a careful consumer) counts readings decoded from payloads.
//! Printed: readings/s delivered exactly once (unique readings over the time
//! from the first write to the last receipt), lost and duplicated readings,
//! p50/p99 latency from the device write to upstream receipt (a paced run
//! below saturation), and peak RSS of the gateway / the local broker.
//! In the throughput runs each device writes 16 frames per write(2)
//! (`BENCH_BURST`; see [`burst`]); one run writes one frame at a time.
//! Devices write jsonl lines (`BENCH_FRAMING=cobs`: postcard in COBS frames,
//! see [`framing`]).
//!
//! `cargo bench --bench uplink`; without `--bench` (as under `cargo test`)
//! a small smoke run.

#[path = "../tests/common/mod.rs"]
#[allow(dead_code)]
mod common;

use common::mosquitto::{Mosquitto, make_certs, need};
use common::{Gateway, Port, write_config_extra};
use edge_gateway::config::Framing;
use edge_gateway::demo::sim::{SimConfig, SimDevice, open_pty};
use edge_gateway::uplink::codec::{self, Connect, Packet, Protocol};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Inbox = Arc<Mutex<Vec<(Instant, Vec<u8>)>>>;

fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// A QoS 2 receiver that delivers at PUBREL (MQTT "method B").
fn subscriber(port: u16, filters: &[&str], inbox: Inbox, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    subscriber_as(port, filters, inbox, stop, None)
}

/// [`subscriber`]; with `session`, a persistent session under that client
/// id (what the broker queues while it is away is delivered when it comes
/// back), and a broker going away just ends the thread.
fn subscriber_as(
    port: u16,
    filters: &[&str],
    inbox: Inbox,
    stop: Arc<AtomicBool>,
    session: Option<&str>,
) -> std::thread::JoinHandle<()> {
    let filters: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
    let session = session.map(str::to_string);
    std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("subscriber connect");
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut out = Vec::new();
        let id = session.clone().unwrap_or_else(|| format!("bench-sub-{}", std::process::id()));
        let mut connect = Connect::anonymous(Protocol::V311, &id, 0);
        connect.clean_start = session.is_none();
        codec::encode_connect(&connect, &mut out);
        for (i, f) in filters.iter().enumerate() {
            codec::encode_subscribe(Protocol::V311, i as u16 + 1, f, 2, &mut out);
        }
        s.write_all(&out).unwrap();
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 256 * 1024];
        let mut pending: HashMap<u16, Vec<u8>> = HashMap::new();
        while !stop.load(Ordering::Relaxed) {
            match s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
                Err(_) if session.is_some() => break,
                Err(e) => panic!("subscriber: {e}"),
            }
            let now = Instant::now();
            let mut used = 0;
            out.clear();
            while let Some((p, n)) = codec::decode(Protocol::V311, &buf[used..], 64 << 20).expect("decode") {
                used += n;
                match p {
                    Packet::Publish(p) if p.qos == 2 => {
                        pending.entry(p.pid).or_insert(p.payload);
                        codec::encode_pubrec(p.pid, &mut out);
                    }
                    Packet::Publish(p) => {
                        if p.qos == 1 {
                            codec::encode_puback(p.pid, &mut out);
                        }
                        inbox.lock().unwrap().push((now, p.payload));
                    }
                    Packet::PubRel { pid, .. } => {
                        if let Some(payload) = pending.remove(&pid) {
                            inbox.lock().unwrap().push((now, payload));
                        }
                        codec::encode_pubcomp(pid, &mut out);
                    }
                    _ => {}
                }
            }
            buf.drain(..used);
            if !out.is_empty() {
                s.write_all(&out).unwrap();
            }
        }
    })
}

#[derive(Clone, Copy)]
struct Outcome {
    unique: usize,
    lost: usize,
    /// Bridge runs: readings that never reached the local broker (a
    /// subscriber there), i.e. lost before the bridge, not by it.
    lost_local: Option<usize>,
    doubled: usize,
    rate: f64,
    p50: Duration,
    p99: Duration,
    rss_kib: u64,
    /// User + system CPU seconds of the process (the gateway; for bridge
    /// runs the local Mosquitto that bridges) over its life.
    cpu_s: f64,
}

/// Wait until `expected` distinct readings came in, or nothing new for 5 s.
fn settle(inbox: &Inbox, expected: usize, key_of: &dyn Fn(&[u8]) -> Vec<(String, u64)>) {
    let mut last = (0, Instant::now());
    loop {
        let n = inbox.lock().unwrap().len();
        let keys: HashSet<(String, u64)> = inbox.lock().unwrap().iter().flat_map(|(_, p)| key_of(p)).collect();
        if keys.len() >= expected || last.1.elapsed() > Duration::from_secs(5) {
            return;
        }
        if n != last.0 {
            last = (n, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn outcome(
    inbox: &Inbox,
    sent_at: &HashMap<(String, u64), Instant>,
    first: Instant,
    key_of: &dyn Fn(&[u8]) -> Vec<(String, u64)>,
    rss_kib: u64,
) -> Outcome {
    let msgs = inbox.lock().unwrap();
    let mut seen: HashMap<(String, u64), usize> = HashMap::new();
    let mut lat = Vec::new();
    let mut last = first;
    for (at, p) in msgs.iter() {
        for k in key_of(p) {
            let c = seen.entry(k.clone()).or_default();
            *c += 1;
            if *c == 1
                && let Some(t) = sent_at.get(&k)
            {
                lat.push(at.saturating_duration_since(*t));
                last = last.max(*at);
            }
        }
    }
    lat.sort();
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or_default()
    };
    let unique = seen.keys().filter(|k| sent_at.contains_key(*k)).count();
    Outcome {
        unique,
        lost: sent_at.len() - unique,
        lost_local: None,
        doubled: seen.values().filter(|&&c| c > 1).count(),
        rate: unique as f64 / (last - first).as_secs_f64().max(1e-9),
        p50: pct(0.5),
        p99: pct(0.99),
        rss_kib,
        cpu_s: 0.0,
    }
}

/// utime + stime of `pid` from /proc/PID/stat, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after ')'.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // /proc counts in USER_HZ, which Linux fixes at 100 for user space.
    ticks as f64 / 100.0
}

fn peak_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Device readings (aggregate outputs have no seq: not counted).
fn batch_keys(p: &[u8]) -> Vec<(String, u64)> {
    match edge_gateway::Batch::decode(p) {
        Ok(b) => b.readings.into_iter().filter_map(|r| Some((r.device, r.seq?))).collect(),
        Err(_) => Vec::new(),
    }
}

/// Ten rules on the simulator's sensors, none of which drops a reading
/// (so delivery still counts every one): conversions, conditions, a route
/// with the alarm lane, two aggregates.
const TEN_RULES: &str = r#"
[[rules]]
name = "drop-debug"
match = { sensor = "debug_*" }
filter = true
[[rules]]
name = "skin-c"
match = { sensor = "skin_temp" }
transform = { rename = "skin_c", scale = 0.5, offset = 1.0, round = 2 }
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
when = "value > 110"
lane = "alarm"
route = ["gateways/{gateway}/alarms"]
[[rules]]
name = "accel-x"
match = { sensor = "accel" }
when = "len(value) == 3"
transform = { pick = 0, rename = "accel_x" }
[[rules]]
name = "battery"
match = { sensor = "battery" }
downsample = { deadband = 5.0 }
[[rules]]
name = "hr-10s"
match = { sensor = "heart_rate" }
aggregate = { window = "10s", emit = ["min", "max", "mean", "count"] }
[[rules]]
name = "hr-60s"
match = { sensor = "heart_rate" }
aggregate = { window = "60s", emit = ["p50", "p95"] }
[[rules]]
name = "skin-array"
match = { sensor = "skin_c" }
when = "len(value) == 3"
filter = true
"#;

fn line_keys(p: &[u8]) -> Vec<(String, u64)> {
    match serde_json::from_slice::<serde_json::Value>(p) {
        Ok(v) => vec![(v["device"].as_str().unwrap_or("").to_string(), v["seq"].as_u64().unwrap_or(0))],
        Err(_) => Vec::new(),
    }
}

/// Frames each device writes back to back in one write(2) in the
/// throughput runs: `BENCH_BURST`, default 16, as a dock handing over what
/// it stored. One frame per write (`BENCH_BURST=1`, also one row of the
/// full bench) measures the bench more than the gateway: its single writer
/// thread, the 20 devices' ack readers and the tty layer's work per write
/// took ~40 % of this 2-core machine against the gateway's ~11 %, capping
/// the gateway at ~160-240k readings/s (issue 18, docs/performance.md).
fn burst() -> u64 {
    std::env::var("BENCH_BURST").ok().and_then(|v| v.parse().ok()).unwrap_or(16).max(1)
}

/// How the simulated devices frame readings: `BENCH_FRAMING=jsonl` (the
/// default since 2026-12-06, the issue's "jsonl in") or `cobs` (postcard in
/// COBS frames, what every run before that date used).
fn framing() -> (Framing, &'static str) {
    match std::env::var("BENCH_FRAMING").as_deref() {
        Ok("cobs") => (Framing::Cobs, "cobs"),
        Ok("jsonl") | Err(_) => (Framing::Jsonl, "jsonl"),
        Ok(other) => panic!("BENCH_FRAMING={other}: jsonl or cobs"),
    }
}

/// (a) PTY devices → edge-gateway → upstream. `per_device` readings from
/// each of `devices`; `pace` between rounds (zero = as fast as it goes);
/// at full speed each device writes `burst` frames per write.
fn gateway_run(
    dir: &Path,
    upstream: &Mosquitto,
    ca: &Path,
    devices: usize,
    per_device: u64,
    pace: Duration,
    rules: &str,
    burst: u64,
) -> Outcome {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let inbox: Inbox = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sub =
        subscriber(upstream.plain_port, &["gateways/+/readings", "gateways/+/alarms"], inbox.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let mut sims = Vec::new();
    let mut paths = Vec::new();
    for i in 0..devices {
        let pty = open_pty().unwrap();
        paths.push(pty.slave_path.clone());
        let mut c = SimConfig::new(&format!("wrist-{i:02}"), framing().0);
        c.resend_after = Duration::from_secs(2);
        sims.push(SimDevice::on_pty(c, pty).unwrap());
    }
    let ports: Vec<Port> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| Port { name: Box::leak(format!("dock{i}").into_boxed_str()), path: p, framing: framing().1 })
        .collect();
    let up = format!(
        "[upstream]\nurl = \"mqtts://localhost:{}\"\nca_file = {:?}\nmax_inflight = 20\n{rules}",
        upstream.tls_port,
        ca.display().to_string()
    );
    let cfg = write_config_extra(
        dir,
        &ports,
        "batch_max_readings = 1000\nbatch_max_age = \"50ms\"\nformat = \"postcard\"",
        "fsync_interval = \"10ms\"",
        &up,
    );
    let gw = Gateway::start_with_env(&cfg, &[("RUST_LOG", "warn")]);
    std::thread::sleep(Duration::from_millis(500));
    // The devices are written by BENCH_WRITERS threads (default 1; each
    // device writes every reading on its own either way). The writer ran at
    // 85-100 % of a core at ~210k readings/s, so it measured the bench more
    // than the gateway (issue 18): it now looks for stalled acks every 64
    // rounds rather than after every reading. Two writers were no faster on
    // 2 cores; on more cores they may be.
    let writers: usize = std::env::var("BENCH_WRITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1).max(1);
    // `burst` frames back to back in one write per device (full speed only).
    let burst = if pace.is_zero() { burst.max(1) } else { 1 };
    let first = Instant::now();
    let chunk = sims.len().div_ceil(writers).max(1);
    let sent_at: HashMap<(String, u64), Instant> = std::thread::scope(|s| {
        let handles: Vec<_> = sims
            .chunks_mut(chunk)
            .map(|group| {
                s.spawn(move || {
                    let mut sent = HashMap::with_capacity(group.len() * per_device as usize);
                    for (i, round) in (0..per_device).step_by(burst as usize).enumerate() {
                        for d in group.iter_mut() {
                            for r in d.send_burst(burst.min(per_device - round) as usize).unwrap() {
                                sent.insert((r.device, r.seq.unwrap()), Instant::now());
                            }
                            // Resends wait for 2 s without progress: a look
                            // every 64 rounds is often enough.
                            if i % 64 == 0 || !pace.is_zero() {
                                d.resend_if_stalled().unwrap();
                            }
                        }
                        if !pace.is_zero() {
                            std::thread::sleep(pace);
                        }
                    }
                    sent
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    settle(&inbox, sent_at.len(), &batch_keys);
    let rss = peak_rss_kib(gw.child.id());
    let mut o = outcome(&inbox, &sent_at, first, &batch_keys, rss);
    o.cpu_s = cpu_seconds(gw.child.id());
    gw.terminate();
    stop.store(true, Ordering::Relaxed);
    sub.join().unwrap();
    o
}

/// The bridge's capacity: offered rates doubling from 1,000 msg/s, `secs`
/// of load each, until one loses a reading or its p99 passes 1 s; if 1,000
/// msg/s already does, halving down to 125 msg/s instead. Returns every
/// step (offered rate, outcome); the capacity is the fastest clean one.
fn bridge_capacity(
    dir: &Path,
    upstream: &Mosquitto,
    ca: &Path,
    publishers: usize,
    secs: f64,
    max: f64,
) -> Vec<(f64, Outcome)> {
    let mut steps = Vec::new();
    let step = |rate: f64, steps: &mut Vec<(f64, Outcome)>| -> bool {
        let per_pub = ((rate * secs) / publishers as f64).max(1.0) as u64;
        let pace = Duration::from_secs_f64(publishers as f64 / rate);
        let o = bridge_run(&dir.join(format!("cap{rate:.0}")), upstream, ca, publishers, per_pub, pace, true);
        let clean = o.lost == 0 && o.p99 <= Duration::from_secs(1);
        eprintln!(
            "bridge at {rate:.0} msg/s offered: {:.0} delivered/s, lost {} ({} before the local broker), p99 {:.0} ms",
            o.rate,
            o.lost,
            o.lost_local.unwrap_or(0),
            o.p99.as_secs_f64() * 1e3
        );
        steps.push((rate, o));
        clean
    };
    let mut rate = 1_000.0;
    if step(rate, &mut steps) {
        rate *= 2.0;
        while rate <= max && step(rate, &mut steps) {
            rate *= 2.0;
        }
    } else {
        rate /= 2.0;
        while rate >= 125.0 && !step(rate, &mut steps) {
            rate /= 2.0;
        }
    }
    steps
}

/// (b) `mosquitto_pub -l -q 2` → local Mosquitto bridged over TLS at QoS 2 → upstream.
/// `unbounded`: `max_queued_messages 0` instead of Mosquitto's default 1000,
/// which drops what the bridge cannot forward fast enough.
fn bridge_run(
    dir: &Path,
    upstream: &Mosquitto,
    ca: &Path,
    publishers: usize,
    per_pub: u64,
    pace: Duration,
    unbounded: bool,
) -> Outcome {
    need("mosquitto_pub", "mosquitto-clients");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let port = common::mosquitto::free_port();
    let conf = dir.join("bridge.conf");
    std::fs::write(
        &conf,
        format!(
            "user root\nallow_anonymous true\nlistener {port} 127.0.0.1\n{}\n\
             connection up\naddress localhost:{}\nbridge_cafile {}\ncleansession false\n\
             topic readings/# out 2 \"\" bridge/\n",
            if unbounded { "max_queued_messages 0" } else { "" },
            upstream.tls_port,
            ca.display()
        ),
    )
    .unwrap();
    let mut broker = Command::new("mosquitto").arg("-c").arg(&conf).stderr(Stdio::null()).spawn().unwrap();
    common::wait_until(Duration::from_secs(5), || TcpStream::connect(("127.0.0.1", port)).is_ok());
    let inbox: Inbox = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sub = subscriber(upstream.plain_port, &["bridge/readings/#"], inbox.clone(), stop.clone());
    // And one on the local broker: where a lost reading went missing.
    let local: Inbox = Arc::default();
    let local_sub = subscriber(port, &["readings/#"], local.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(1000));
    let mut pubs: Vec<Child> = (0..publishers)
        .map(|i| {
            Command::new("mosquitto_pub")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-q",
                    "2",
                    "-l",
                    "-t",
                    &format!("readings/wrist-{i:02}"),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut sent_at = HashMap::new();
    let first = Instant::now();
    for seq in 0..per_pub {
        for (i, p) in pubs.iter_mut().enumerate() {
            let dev = format!("wrist-{i:02}");
            let line = format!(
                "{{\"device\":\"{dev}\",\"sensor\":\"heart_rate\",\"seq\":{seq},\"ts\":{},\"value\":72}}\n",
                1_764_000_000_000u64 + seq
            );
            p.stdin.as_mut().unwrap().write_all(line.as_bytes()).unwrap();
            sent_at.insert((dev, seq), Instant::now());
        }
        if !pace.is_zero() {
            std::thread::sleep(pace);
        }
    }
    // stdin stays open until the end: on EOF mosquitto_pub -l exits without
    // sending what it still holds (measured: 1,060 of 2,500 reached the broker).
    settle(&inbox, sent_at.len(), &line_keys);
    let rss = peak_rss_kib(broker.id());
    let mut o = outcome(&inbox, &sent_at, first, &line_keys, rss);
    o.cpu_s = cpu_seconds(broker.id());
    let at_local: HashSet<(String, u64)> = local.lock().unwrap().iter().flat_map(|(_, p)| line_keys(p)).collect();
    o.lost_local = Some(sent_at.keys().filter(|k| !at_local.contains(*k)).count());
    for mut p in pubs {
        let _ = p.kill();
        let _ = p.wait();
    }
    // The subscribers first: the local one would see the broker's reset.
    stop.store(true, Ordering::Relaxed);
    sub.join().unwrap();
    local_sub.join().unwrap();
    let _ = broker.kill();
    let _ = broker.wait();
    o
}

fn median_by<T: Clone>(mut v: Vec<T>, key: impl Fn(&T) -> f64) -> T {
    v.sort_by(|a, b| key(a).partial_cmp(&key(b)).unwrap());
    v[v.len() / 2].clone()
}

fn row(name: &str, o: &Outcome, base: f64) {
    let lost = match o.lost_local {
        Some(l) => format!("{} ({l})", o.lost),
        None => o.lost.to_string(),
    };
    println!(
        "| {name} | {} | {:.0} | {:.1}x | {lost} | {} | {:.1} | {:.1} | {:.1} | {:.2} |",
        o.unique,
        o.rate,
        o.rate / base,
        o.doubled,
        o.p50.as_secs_f64() * 1e3,
        o.p99.as_secs_f64() * 1e3,
        o.rss_kib as f64 / 1024.0,
        // CPU seconds per million readings (messages) delivered once.
        o.cpu_s / (o.unique.max(1) as f64 / 1e6)
    );
}

fn ab_runs(dir: &Path, upstream: &Mosquitto, ca: &Path, dev: usize, per_dev: u64) {
    let a: &'static str = common::bin();
    let b: &'static str = Box::leak(
        std::env::var("EDGE_GATEWAY_BIN_B").expect("BENCH_ONLY=ab needs EDGE_GATEWAY_BIN_B").into_boxed_str(),
    );
    let pairs = std::env::var("BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(8usize);
    println!("uplink bench, A/B: {} frames per write, {} in\nA = {a}\nB = {b}\n", burst(), framing().1);
    println!(
        "| pair | A readings/s | A CPU-s per M | B readings/s | B CPU-s per M | B/A CPU |\n|---|---:|---:|---:|---:|---:|"
    );
    let per_m = |o: &Outcome| o.cpu_s / (o.unique.max(1) as f64 / 1e6);
    let (mut ca_, mut cb, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..pairs {
        let run = |which: &'static str, tag: &str| {
            common::use_bin(Some(which));
            let o =
                gateway_run(&dir.join(format!("ab{tag}{i}")), upstream, ca, dev, per_dev, Duration::ZERO, "", burst());
            assert_eq!((o.lost, o.doubled), (0, 0), "{which} lost or doubled readings");
            o
        };
        // A B, then B A: a drift over the pair weighs on both alike.
        let (oa, ob) = if i % 2 == 0 {
            let oa = run(a, "a");
            (oa, run(b, "b"))
        } else {
            let ob = run(b, "b");
            (run(a, "a"), ob)
        };
        let (pa, pb) = (per_m(&oa), per_m(&ob));
        println!("| {i} | {:.0} | {pa:.2} | {:.0} | {pb:.2} | {:.3} |", oa.rate, ob.rate, pb / pa);
        ca_.push(pa);
        cb.push(pb);
        ratios.push(pb / pa);
    }
    common::use_bin(None);
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|x, y| x.partial_cmp(y).unwrap());
        v[v.len() / 2]
    };
    println!(
        "\nmedians: A {:.2}, B {:.2} CPU-s per million; B/A per pair {:.3} (range {:.3}-{:.3})",
        med(&mut ca_),
        med(&mut cb),
        med(&mut ratios),
        ratios[0],
        ratios[ratios.len() - 1]
    );
}

fn main() {
    need("mosquitto", "mosquitto");
    let full = full_run();
    let tmp = tempfile::tempdir().unwrap();
    let certs = make_certs(tmp.path());
    let upstream = Mosquitto::start(&tmp.path().join("upstream"), &certs, false);
    let runs = if full { 3 } else { 1 };
    // BENCH_ONLY=alarm: only the alarm-lane run; BENCH_ONLY=gateway: only
    // the gateway's runs (no bridge), e.g. to compare two builds through
    // EDGE_GATEWAY_BIN.
    let alarm_only = std::env::var("BENCH_ONLY").is_ok_and(|v| v == "alarm");
    let gateway_only = std::env::var("BENCH_ONLY").is_ok_and(|v| v == "gateway");
    // BENCH_ONLY=backlog: a queue of BACKLOG_READINGS (1,000,000) drained
    // after a restart: drain rate and peak RSS.
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "backlog") || !full {
        let n = std::env::var("BACKLOG_READINGS").ok().and_then(|v| v.parse().ok());
        let n = if full { n.unwrap_or(1_000_000) } else { 5_000 };
        let b = backlog_run(&tmp.path().join("backlog"), &upstream, &certs.ca, n);
        println!(
            "backlog drain after a restart: {} readings ({:.1} MiB of queue) queued, gateway started → every reading \
             at the subscriber in {:.2} s ({:.0} readings/s; {:.0} readings/s from the first receipt, which came {:.2} s \
             after the start); lost {}, doubled {}; peak RSS {:.1} MiB; {:.2} CPU-s per million\n",
            b.readings,
            b.queue_bytes as f64 / 1048576.0,
            b.total.as_secs_f64(),
            b.readings as f64 / b.total.as_secs_f64(),
            b.readings as f64 / (b.total - b.first).as_secs_f64(),
            b.first.as_secs_f64(),
            b.lost,
            b.doubled,
            b.rss_kib as f64 / 1024.0,
            b.cpu_s / (b.readings as f64 / 1e6),
        );
        assert_eq!((b.lost, b.doubled), (0, 0), "the backlog drain lost or doubled readings");
        if full {
            return;
        }
    }
    // Throughput: as fast as the producers go. Latency: a paced run.
    let (dev, per_dev, pubs, per_pub) = if full { (20, 50_000, 20, 2_500) } else { (4, 500, 2, 200) };
    let (lat_per_dev, lat_pace) = if full { (500, Duration::from_millis(2)) } else { (50, Duration::from_millis(2)) };

    if alarm_only {
        print_alarms(&alarm_run(
            &tmp.path().join("alarm"),
            &certs,
            if full { 20 } else { 4 },
            if full { 50_000 } else { 500 },
        ));
        return;
    }
    // BENCH_ONLY=paced: only the paced (latency) run, BENCH_RUNS times
    // (default 5), e.g. to compare two builds' p99.
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "paced") {
        let n = std::env::var("BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
        println!("uplink bench, paced runs only, binary {}\n", common::bin());
        println!("| run | delivered | readings/s | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|");
        for i in 0..n {
            let o = gateway_run(
                &tmp.path().join(format!("gl{i}")),
                &upstream,
                &certs.ca,
                dev,
                lat_per_dev,
                lat_pace,
                "",
                1,
            );
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!("| {i} | {} | {:.0} | {:.1} | {:.1} |", o.unique, o.rate, ms(o.p50), ms(o.p99));
            assert_eq!((o.lost, o.doubled), (0, 0), "the gateway lost or doubled readings");
        }
        return;
    }
    // BENCH_ONLY=ab: EDGE_GATEWAY_BIN against EDGE_GATEWAY_BIN_B, full-speed
    // runs only, alternating A B B A ... (BENCH_RUNS pairs, default 8), so
    // both see the same minutes of a noisy machine; prints every run and
    // the median of the pairs' B/A ratios.
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "ab") {
        ab_runs(tmp.path(), &upstream, &certs.ca, dev, per_dev);
        return;
    }
    if gateway_only {
        let (mut gw, mut gw_rules) = (Vec::new(), Vec::new());
        for i in 0..runs {
            let d = |n: &str| tmp.path().join(format!("{n}{i}"));
            gw.push(gateway_run(&d("g"), &upstream, &certs.ca, dev, per_dev, Duration::ZERO, "", burst()));
            gw_rules.push(gateway_run(
                &d("gr"),
                &upstream,
                &certs.ca,
                dev,
                per_dev,
                Duration::ZERO,
                TEN_RULES,
                burst(),
            ));
        }
        let gw_lat = gateway_run(&tmp.path().join("gl"), &upstream, &certs.ca, dev, lat_per_dev, lat_pace, "", 1);
        let (g, gr) = (median_by(gw, |o| o.rate), median_by(gw_rules, |o| o.rate));
        println!("uplink bench, gateway only ({}), binary {}\n", if full { "full" } else { "smoke" }, common::bin());
        println!(
            "| path | delivered | readings/s delivered once | vs the run without rules | lost (before the local broker) | duplicated | p50 ms | p99 ms | peak RSS MiB | CPU-s per M delivered |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        row(
            &format!("edge-gateway: {dev} PTY devices ({} in) → TLS QoS 2, {} frames per write", framing().1, burst()),
            &g,
            g.rate,
        );
        row("edge-gateway, the same with 10 rules", &gr, g.rate);
        row("edge-gateway, paced (latency)", &gw_lat, g.rate);
        assert_eq!((g.lost, g.doubled, gr.lost, gr.doubled), (0, 0, 0, 0), "the gateway lost or doubled readings");
        return;
    }
    let (mut bridge, mut bridge_default, mut gw, mut gw_rules) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let d = |n: &str| tmp.path().join(format!("{n}{i}"));
        bridge.push(bridge_run(&d("b"), &upstream, &certs.ca, pubs, per_pub, Duration::ZERO, true));
        bridge_default.push(bridge_run(&d("bd"), &upstream, &certs.ca, pubs, per_pub, Duration::ZERO, false));
        gw.push(gateway_run(&d("g"), &upstream, &certs.ca, dev, per_dev, Duration::ZERO, "", burst()));
        gw_rules.push(gateway_run(&d("gr"), &upstream, &certs.ca, dev, per_dev, Duration::ZERO, TEN_RULES, burst()));
    }
    // One run with one frame per write: what the bench's own writer allows.
    let gw_single = gateway_run(&tmp.path().join("g1"), &upstream, &certs.ca, dev, per_dev, Duration::ZERO, "", 1);
    let bridge_lat = bridge_run(&tmp.path().join("bl"), &upstream, &certs.ca, pubs, lat_per_dev / 4, lat_pace, true);
    let gw_lat = gateway_run(&tmp.path().join("gl"), &upstream, &certs.ca, dev, lat_per_dev, lat_pace, "", 1);
    // The bridge's capacity (Debian's Mosquitto 2.0.11, the newest any
    // registry here offers): step the offered rate until loss or latency breaks.
    let (cap_secs, cap_max) = if full { (3.0, 64_000.0) } else { (0.5, 2_000.0) };
    let steps = bridge_capacity(&tmp.path().join("cap"), &upstream, &certs.ca, pubs, cap_secs, cap_max);
    let b = median_by(bridge, |o| o.rate);
    let bd = median_by(bridge_default, |o| o.rate);
    let g = median_by(gw, |o| o.rate);
    let gr = median_by(gw_rules, |o| o.rate);
    let capacity =
        steps.iter().filter(|(_, o)| o.lost == 0 && o.p99 <= Duration::from_secs(1)).map(|(_, o)| o.clone()).last();
    println!(
        "uplink bench ({}): median of {runs} throughput runs; latency from a paced run\n",
        if full { "full" } else { "smoke" }
    );
    // Ratios are against the bridge's capacity: the fastest offered rate it
    // delivered without loss and with p99 <= 1 s (not what it was offered).
    // If it lost readings at every step, against its paced run's rate.
    let base = match &capacity {
        Some(c) => c.rate,
        None => {
            println!(
                "(the bridge lost readings at every offered rate tried: no loss-free capacity; ratios are against its paced run)\n"
            );
            bridge_lat.rate
        }
    };
    println!(
        "| path | delivered | readings/s delivered once | vs bridge capacity | lost (before the local broker) | duplicated | p50 ms | p99 ms | peak RSS MiB | CPU-s per M delivered |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (offered, o) in &steps {
        row(&format!("bridge capacity step: {offered:.0} msg/s offered, paced"), o, base);
    }
    if let Some(c) = &capacity {
        row("baseline: the bridge's capacity (above)", c, base);
    }
    row(
        &format!("{pubs} x mosquitto_pub -q 2 → Mosquitto (max_queued_messages 0) → TLS QoS 2 bridge, unpaced"),
        &b,
        base,
    );
    row("same bridge, Mosquitto's default max_queued_messages (1000), unpaced", &bd, base);
    row(
        &format!("edge-gateway: {dev} PTY devices ({} in) → TLS QoS 2, {} frames per write", framing().1, burst()),
        &g,
        base,
    );
    row("edge-gateway, the same with 10 rules", &gr, base);
    row("edge-gateway, one frame per write (one run; the bench's writer is the limit)", &gw_single, base);
    row("bridge (max_queued_messages 0), paced (latency)", &bridge_lat, base);
    row("edge-gateway, paced (latency)", &gw_lat, base);
    println!(
        "\n(gateway: batch_max_age 50ms, fsync_interval 10ms, postcard, max_inflight 20; {} readings per throughput run)",
        dev as u64 * per_dev
    );
    println!("\n10 rules vs none: {:.0} % of the no-rules rate", 100.0 * gr.rate / g.rate.max(1e-9));
    let (backlog_dev, backlog_per) = if full { (20, 50_000) } else { (4, 500) };
    let a = alarm_run(&tmp.path().join("alarm"), &certs, backlog_dev, backlog_per);
    print_alarms(&a);

    if !full {
        assert_eq!((g.lost, g.doubled), (0, 0), "the gateway lost or doubled readings");
        assert_eq!((gr.lost, gr.doubled), (0, 0), "the gateway with rules lost or doubled readings");
        assert_eq!((gw_single.lost, gw_single.doubled), (0, 0), "the gateway lost or doubled single frames");
        assert!(!a.latencies.is_empty(), "alarms were measured");
    }
}

struct Backlog {
    readings: u64,
    queue_bytes: u64,
    /// Gateway start → first receipt, and → the last reading received.
    first: Duration,
    total: Duration,
    lost: usize,
    doubled: usize,
    rss_kib: u64,
    cpu_s: f64,
}

/// A queue of `n` readings (20 devices, 1,000-reading postcard batches),
/// written through the library's own pipeline into the data dir of a
/// gateway configured as the throughput runs are; then the gateway started
/// on it, with the broker up, until every reading is at the subscriber.
fn backlog_run(dir: &Path, upstream: &Mosquitto, ca: &Path, n: u64) -> Backlog {
    use edge_gateway::config::Config;
    use edge_gateway::metrics::Metrics;
    use edge_gateway::pipeline::Pipeline;
    use edge_gateway::reading::Incoming;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let up = format!(
        "[upstream]\nurl = \"mqtts://localhost:{}\"\nca_file = {:?}\nmax_inflight = 20\n",
        upstream.tls_port,
        ca.display().to_string()
    );
    let cfg_path = write_config_extra(
        dir,
        &[],
        "batch_max_readings = 1000\nbatch_max_age = \"50ms\"\nformat = \"postcard\"",
        "fsync_interval = \"10ms\"\nmax_bytes = \"40GiB\"",
        &up,
    );
    let cfg = Config::parse(&std::fs::read_to_string(&cfg_path).unwrap(), "backlog.toml").expect("bench config");
    {
        let (mut p, _) = Pipeline::open(&cfg, Arc::new(Metrics::default())).expect("pipeline");
        let now = Instant::now();
        let ms = edge_gateway::reading::now_ms();
        for i in 0..n {
            let (dev, seq) = (i % 20, i / 20);
            let r = edge_gateway::Reading {
                device: format!("wrist-{dev:02}"),
                sensor: "hr".into(),
                seq: Some(seq),
                ts: ms - 3_600_000 + seq,
                value: edge_gateway::Value::Number((60 + seq % 40) as f64),
                boot: None,
            };
            p.ingest(Incoming::new(r, true, edge_gateway::Origin::Serial(dev as u32)), now, ms).unwrap();
        }
        p.close().unwrap();
    }
    let queue_bytes = dir_bytes(&dir.join("data"));
    let inbox: Inbox = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sub = subscriber(upstream.plain_port, &["gateways/+/readings"], inbox.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let batches = n.div_ceil(1000) as usize;
    let start = Instant::now();
    let gw = Gateway::start_with_env(&cfg_path, &[("RUST_LOG", "warn")]);
    // Count messages while it drains (decoding them here would compete
    // with the gateway for the CPU); every batch holds 1,000 readings.
    while inbox.lock().unwrap().len() < batches && start.elapsed() < Duration::from_secs(1800) {
        std::thread::sleep(Duration::from_millis(2));
    }
    let msgs = std::mem::take(&mut *inbox.lock().unwrap());
    let rss_kib = peak_rss_kib(gw.child.id());
    let cpu_s = cpu_seconds(gw.child.id());
    gw.terminate();
    stop.store(true, Ordering::Relaxed);
    sub.join().unwrap();
    let first = msgs.first().map_or(Duration::ZERO, |(t, _)| t.duration_since(start));
    let total = msgs.last().map_or(Duration::ZERO, |(t, _)| t.duration_since(start));
    let mut seen = HashSet::new();
    let mut doubled = 0;
    for (_, p) in &msgs {
        for k in batch_keys(p) {
            if !seen.insert(k) {
                doubled += 1;
            }
        }
    }
    Backlog { readings: n, queue_bytes, first, total, lost: n as usize - seen.len(), doubled, rss_kib, cpu_s }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn print_alarms(a: &Alarms) {
    println!(
        "\nalarm lane during a backlog drain: {} readings queued while the broker was away; {} alarms sent every 5 ms \
         while it drained ({:.1} s): alarm latency device write → upstream receipt p50 {} ms, p99 {} ms, max {} ms; \
         {} of them arrived while backlog was still undelivered",
        a.backlog,
        a.latencies.len(),
        a.drain.as_secs_f64(),
        a.p(0.5).as_millis(),
        a.p(0.99).as_millis(),
        a.latencies.last().copied().unwrap_or_default().as_millis(),
        a.overtook
    );
}

struct Alarms {
    backlog: usize,
    drain: Duration,
    /// Sorted.
    latencies: Vec<Duration>,
    overtook: usize,
}

impl Alarms {
    fn p(&self, q: f64) -> Duration {
        let l = &self.latencies;
        l.get(((l.len() as f64 * q) as usize).min(l.len().saturating_sub(1))).copied().unwrap_or_default()
    }
}

/// A backlog builds while the broker is away (its own Mosquitto, stopped);
/// when it is back, a panic button sends an alarm every 20 ms for as long
/// as the backlog drains. Latency: the alarm's write to the PTY → its
/// receipt by the upstream subscriber.
fn alarm_run(dir: &Path, certs: &common::mosquitto::Certs, devices: usize, per_device: u64) -> Alarms {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    // Nagle off in the broker (BENCH_NAGLE=1 keeps Mosquitto's default): else
    // its small PUBLISHes to the subscriber wait out delayed ACKs (~40 ms),
    // which is the broker's latency, not ours (docs/performance.md, Commands).
    let nodelay = if std::env::var("BENCH_NAGLE").is_ok_and(|v| v == "1") { "" } else { "set_tcp_nodelay true" };
    let mut broker = Mosquitto::start_with(&dir.join("broker"), certs, false, nodelay);
    let inbox: Inbox = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    // A persistent session: it outlives the broker's stop and restart.
    let filters = ["gateways/+/readings", "gateways/+/alarms"];
    let session = Some("bench-alarm-sub");
    let first_sub = subscriber_as(broker.plain_port, &filters, inbox.clone(), stop.clone(), session);
    std::thread::sleep(Duration::from_millis(300));
    let mut sims = Vec::new();
    let mut paths = Vec::new();
    for i in 0..=devices {
        let pty = open_pty().unwrap();
        paths.push(pty.slave_path.clone());
        let name = if i == devices { "panic-01".to_string() } else { format!("wrist-{i:02}") };
        let mut c = SimConfig::new(&name, framing().0);
        c.resend_after = Duration::from_secs(2);
        if i == devices {
            c.sensors = vec!["panic".into()];
        }
        sims.push(SimDevice::on_pty(c, pty).unwrap());
    }
    let mut panic = sims.pop().unwrap();
    let ports: Vec<Port> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| Port { name: Box::leak(format!("dock{i}").into_boxed_str()), path: p, framing: framing().1 })
        .collect();
    let up = format!(
        "[upstream]\nurl = \"mqtts://localhost:{}\"\nca_file = {:?}\nmax_inflight = 20\nreconnect_min = \"50ms\"\nreconnect_max = \"200ms\"\n\
         [[rules]]\nname = \"panic\"\nmatch = {{ device = \"panic-*\" }}\nlane = \"alarm\"\nroute = [\"gateways/{{gateway}}/alarms\"]\n",
        broker.tls_port,
        certs.ca.display().to_string()
    );
    let cfg = write_config_extra(
        dir,
        &ports,
        "batch_max_readings = 1000\nbatch_max_age = \"50ms\"\nformat = \"postcard\"",
        "fsync_interval = \"10ms\"\nmax_bytes = \"4GiB\"",
        &up,
    );
    let gw = Gateway::start_with_env(&cfg, &[("RUST_LOG", "warn")]);
    std::thread::sleep(Duration::from_millis(500));
    broker.stop();
    for _ in 0..per_device {
        for d in sims.iter_mut() {
            d.send_next().unwrap();
            d.resend_if_stalled().unwrap();
        }
    }
    for d in sims.iter_mut() {
        assert!(d.wait_all_acked(Duration::from_secs(300)).unwrap(), "the backlog was not all acked");
    }
    let backlog = devices * per_device as usize;
    let _ = first_sub.join();
    broker.restart();
    let sub = subscriber_as(broker.plain_port, &filters, inbox.clone(), stop.clone(), session);
    // Backlog readings received so far, counted as they come (decoding the
    // whole inbox at every look would slow the loop that times the alarms).
    let (mut looked, mut received) = (0usize, 0usize);
    let mut readings = |inbox: &Inbox| -> usize {
        let msgs = inbox.lock().unwrap();
        received += msgs[looked..].iter().flat_map(|(_, p)| batch_keys(p)).filter(|(d, _)| d != "panic-01").count();
        looked = msgs.len();
        received
    };
    let start = Instant::now();
    while readings(&inbox) == 0 && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let drain_start = Instant::now();
    let mut sent_at: HashMap<u64, (Instant, usize)> = HashMap::new();
    // At least one alarm, then one every 5 ms while the backlog drains.
    loop {
        let r = panic.send_next().unwrap();
        sent_at.insert(r.seq.unwrap(), (Instant::now(), readings(&inbox)));
        std::thread::sleep(Duration::from_millis(5));
        if readings(&inbox) >= backlog || drain_start.elapsed() > Duration::from_secs(120) {
            break;
        }
    }
    let drain = drain_start.elapsed();
    assert!(panic.wait_all_acked(Duration::from_secs(30)).unwrap());
    // Every alarm sent has arrived (bounded: a busy machine is slower).
    let alarms_in = |inbox: &Inbox| {
        inbox.lock().unwrap().iter().flat_map(|(_, p)| batch_keys(p)).filter(|(d, _)| d == "panic-01").count()
    };
    let until = Instant::now() + Duration::from_secs(30);
    while alarms_in(&inbox) < sent_at.len() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut latencies = Vec::new();
    let mut overtook = 0;
    for (at, p) in inbox.lock().unwrap().iter() {
        for (d, seq) in batch_keys(p) {
            if d == "panic-01"
                && let Some((t, _)) = sent_at.remove(&seq)
            {
                latencies.push(at.saturating_duration_since(t));
                if *at < drain_start + drain {
                    overtook += 1;
                }
            }
        }
    }
    latencies.sort();
    gw.terminate();
    stop.store(true, Ordering::Relaxed);
    sub.join().unwrap();
    Alarms { backlog, drain, latencies, overtook }
}
