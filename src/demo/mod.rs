//! `edge-gateway demo`: the whole story on one machine, no hardware, no
//! setup. This process plays the world around a gateway:
//!
//! * three charging docks (PTYs) with simulated wearables that resend what
//!   is not acked, now and then twice ([`crate::demo::sim`]);
//! * two Wi-Fi sensors publishing at QoS 1 into the embedded broker;
//! * the cloud: [`upstream::DemoUpstream`], a QoS 2 receiver on loopback
//!   that counts what it got and anything it got twice;
//!
//! and runs the real gateway (this binary's `run`) as a child between them,
//! reading its `/metrics` once a second for the live view. Half-way the
//! cloud goes away for a while: the queue grows, then drains when it comes
//! back, and the final tally shows every acked reading delivered once.

pub mod sim;
pub mod upstream;

use crate::config::Framing;
use crate::demo::sim::{SimConfig, SimDevice, open_pty};
use crate::metrics::status::{GatewayStatus, Upstream};
use crate::uplink::codec::{self, Connect, Packet, Protocol};
use anyhow::Context;
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct DemoOptions {
    /// How long devices stream (the backlog drains after).
    pub duration: Duration,
    /// How long the simulated cloud outage lasts (starts half-way).
    pub outage: Duration,
    /// Keep the demo's directory (queue, config, gateway log) afterwards.
    pub keep: bool,
}

const DOCKS: usize = 3;
const DOCK_RATE: f64 = 20.0;
const LAN_DEVICES: usize = 2;
const LAN_RATE: f64 = 10.0;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: i32) {
    STOP.store(true, Ordering::SeqCst);
}

pub fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let handler = nix::sys::signal::SigHandler::Handler(on_signal);
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        nix::sys::signal::signal(nix::sys::signal::Signal::SIGINT, handler)?;
        nix::sys::signal::signal(nix::sys::signal::Signal::SIGTERM, handler)?;
    }
    let dir = std::env::temp_dir().join(format!("edge-gateway-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let cloud = rt.block_on(upstream::DemoUpstream::start()).context("cannot start the demo upstream")?;
    let result = run_in(&dir, &opts, &cloud);
    if opts.keep {
        eprintln!("demo files kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    drop(rt);
    result
}

fn run_in(dir: &Path, opts: &DemoOptions, cloud: &upstream::DemoUpstream) -> anyhow::Result<()> {
    // The docks and their wearables.
    let mut devices = Vec::new();
    let mut serial = String::new();
    for i in 0..DOCKS {
        let pty = open_pty().context("cannot open a PTY for a simulated dock")?;
        serial += &format!("[[serial]]\nname = \"dock{i}\"\npath = {:?}\n\n", pty.slave_path.display().to_string());
        let mut cfg = SimConfig::new(&format!("wrist-{:02}", i + 1), Framing::Jsonl);
        cfg.seed = crate::reading::now_ms() + i as u64;
        cfg.duplicate_probability = 0.05;
        devices.push(SimDevice::on_pty(cfg, pty)?);
    }
    use crate::broker::free_port;
    let (broker_port, metrics_port) = (free_port()?, free_port()?);
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "# Written by `edge-gateway demo`.\n[gateway]\nid = \"demo-gw\"\ndata_dir = {:?}\n\n{serial}\
             [pipeline]\nbatch_max_age = \"200ms\"\n\n[store]\nmax_bytes = \"64MiB\"\n\n\
             [broker]\nenabled = true\ntcp = \"127.0.0.1:{broker_port}\"\nallow_anonymous = true\n\n\
             [upstream]\nurl = \"mqtt://127.0.0.1:{}\"\nallow_plaintext = true   # loopback demo cloud\n\
             protocol = \"3.1.1\"\nreconnect_min = \"200ms\"\nreconnect_max = \"2s\"\n\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
             [commands]\nretry_every = \"1s\"\n",
            dir.join("data").display().to_string(),
            cloud.port
        ),
    )?;
    let log_path = dir.join("gateway.log");
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()
        .context("cannot start the gateway")?;
    println!(
        "edge-gateway demo: {DOCKS} docks × {DOCK_RATE}/s over serial, {LAN_DEVICES} Wi-Fi sensors × {LAN_RATE}/s over MQTT, \
         a cloud on 127.0.0.1:{}\n  gateway log: {}   metrics: http://127.0.0.1:{metrics_port}/metrics\n  \
         the cloud goes away after {} for {}; Ctrl-C ends early",
        cloud.port,
        log_path.display(),
        humantime::format_duration(opts.duration / 2),
        humantime::format_duration(opts.outage),
    );

    let lan_stop = Arc::new(AtomicBool::new(false));
    let lan_sent: Arc<Mutex<Vec<upstream::Key>>> = Arc::default();
    let lan: Vec<_> = (0..LAN_DEVICES)
        .map(|i| {
            let (stop, sent) = (lan_stop.clone(), lan_sent.clone());
            std::thread::spawn(move || lan_device(broker_port, &format!("wifi-{:02}", i + 1), stop, sent))
        })
        .collect();

    let started = Instant::now();
    let outage_at = opts.duration / 2;
    let mut outage = None::<Instant>;
    let (mut next_view, mut last_in, mut last_t) = (started, 0, started);
    let period = Duration::from_secs_f64(1.0 / DOCK_RATE);
    let mut next_send = started;
    let mut streaming = true;
    let mut drained_at = None;
    // One command from the cloud, a quarter of the way in.
    let command_at = opts.duration / 4;
    let (mut command_sent, mut command_replied) = (None::<Instant>, false);
    let view = |st: &GatewayStatus, label: &str, last_in: &mut u64, last_t: &mut Instant| {
        let accepted = st.readings.accepted;
        let rate = (accepted - *last_in) as f64 / last_t.elapsed().as_secs_f64().max(0.001);
        (*last_in, *last_t) = (accepted, Instant::now());
        println!(
            "[{:>3}s] in {rate:>4.0}/s  dups dropped {:>4}  queue {:>4} batches {:>5} readings  delivered {:>6}  {label}",
            started.elapsed().as_secs(),
            st.readings.duplicates_dropped,
            st.queue.batches,
            st.queue.readings,
            cloud.counts().readings.load(Ordering::Relaxed),
        );
    };
    while !STOP.load(Ordering::SeqCst) {
        let now = Instant::now();
        if streaming && now >= next_send {
            for d in devices.iter_mut() {
                d.send_next()?;
            }
            next_send += period;
        }
        for d in devices.iter_mut() {
            d.resend_if_stalled()?;
            for c in d.answer_commands(true)? {
                println!("--- {} got command {} ({} {}) on its dock and answered ---", c.device, c.id, c.name, c.args);
            }
        }
        let elapsed = now - started;
        if command_sent.is_none() && elapsed >= command_at {
            let cmd = r#"{"id":"demo-1","device":"wrist-01","name":"alert","args":{"level":2},"ttl":"1m"}"#;
            cloud.send_command("gateways/demo-gw/commands", cmd);
            command_sent = Some(now);
            println!("--- the cloud sends wrist-01 an alert: {cmd} ---");
        }
        if !command_replied && let Some(r) = cloud.replies().first() {
            command_replied = true;
            let took = command_sent.map_or(0, |t| t.elapsed().as_millis());
            println!("--- the cloud has the reply, {took} ms after sending: {r} ---");
        }
        if outage.is_none() && elapsed >= outage_at && elapsed < outage_at + opts.outage {
            cloud.set_down(true);
            outage = Some(now);
            println!(
                "--- the cloud goes away for {} (store-and-forward: the queue keeps everything) ---",
                humantime::format_duration(opts.outage)
            );
        }
        if let Some(t) = outage
            && now - t >= opts.outage
            && cloud.is_down()
        {
            cloud.set_down(false);
            println!("--- the cloud is back: the backlog drains ---");
        }
        if streaming && elapsed >= opts.duration {
            streaming = false;
            lan_stop.store(true, Ordering::SeqCst);
            println!("--- devices stop sending; waiting for the queue to drain ---");
        }
        if now >= next_view {
            next_view += Duration::from_secs(1);
            if let Ok(st) =
                crate::metrics::http::fetch_status(([127, 0, 0, 1], metrics_port).into(), Duration::from_secs(1))
            {
                let label = if cloud.is_down() {
                    "cloud DOWN"
                } else if st.upstream == Upstream::Connected {
                    "cloud connected"
                } else {
                    "connecting"
                };
                view(&st, label, &mut last_in, &mut last_t);
                let pending: usize = devices.iter().map(|d| d.stats().pending).sum();
                if !streaming && st.queue.readings == 0 && pending == 0 {
                    drained_at.get_or_insert(now);
                }
            } else if let Some(st) = child.try_wait()? {
                anyhow::bail!("the gateway exited ({st}); see {}", log_path.display());
            }
        }
        if drained_at.is_some_and(|t| now - t >= Duration::from_secs(1)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    lan_stop.store(true, Ordering::SeqCst);
    cloud.set_down(false);
    for t in lan {
        let _ = t.join();
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    let status = child.wait()?;
    // Every reading a device was acked for, by name: the LAN sensors' PUBACKed
    // ones, and each wearable's up to its cumulative ack.
    let lan_acked = std::mem::take(&mut *lan_sent.lock().unwrap());
    let (mut created, mut acked) = (lan_acked.len() as u64, lan_acked.len() as u64);
    let mut acked_keys: HashSet<upstream::Key> = lan_acked.into_iter().collect();
    let mut sent_keys = acked_keys.clone();
    for d in devices {
        let through = d.stats().acked_through;
        for r in d.created() {
            let key = (r.device.clone(), r.sensor.clone(), r.seq.unwrap_or_default());
            if through.is_some_and(|t| key.2 <= t) {
                acked_keys.insert(key.clone());
            }
            sent_keys.insert(key);
        }
        let s = d.unplug();
        created += s.sent_unique;
        acked += s.sent_unique - s.pending as u64;
    }
    let delivered = cloud.delivered();
    let missing = acked_keys.iter().filter(|k| !delivered.contains_key(*k)).count();
    let twice = delivered.values().filter(|n| **n > 1).count();
    let unknown = delivered.keys().filter(|k| !sent_keys.contains(*k)).count();
    let c = cloud.counts();
    let replies = cloud.replies();
    println!(
        "commands: {} sent, {} replied ({})",
        u8::from(command_sent.is_some()),
        replies.len(),
        replies.iter().filter_map(|r| r["status"].as_str()).collect::<Vec<_>>().join(", ")
    );
    println!(
        "\ndone: devices handed over {created} readings, {acked} acked by the gateway; the cloud received {} readings in {} batches, {} batches twice; \
         by (device, sensor, seq): {missing} acked readings missing, {twice} delivered twice, {unknown} never sent; \
         the gateway exited with {status} after {} upstream connections",
        c.readings.load(Ordering::Relaxed),
        c.batches.load(Ordering::Relaxed),
        c.duplicate_batches.load(Ordering::Relaxed),
        c.connections.load(Ordering::Relaxed),
    );
    Ok(())
}

/// A Wi-Fi sensor: QoS 1 publishes into the embedded broker, resending a
/// reading until PUBACKed (reconnecting if need be). `sent` gets every reading
/// PUBACKed (with the default `broker.ack = "received"` that is the ack).
fn lan_device(port: u16, name: &str, stop: Arc<AtomicBool>, sent: Arc<Mutex<Vec<upstream::Key>>>) {
    let mut seq = 1u64;
    let mut rng = crate::rng::XorShift::new(crate::reading::now_ms() ^ port as u64 ^ name.len() as u64);
    let period = Duration::from_secs_f64(1.0 / LAN_RATE);
    while !stop.load(Ordering::SeqCst) {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut out = Vec::new();
        codec::encode_connect(&Connect::anonymous(Protocol::V311, name, 30), &mut out);
        if s.write_all(&out).is_err() || !matches!(read_packet(&mut s), Some(Packet::ConnAck(c)) if c.code == 0) {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        while !stop.load(Ordering::SeqCst) {
            let value = 36.0 + rng.below(20) as f64 / 10.0;
            let payload = format!("{{\"seq\":{seq},\"value\":{value}}}");
            let mut out = Vec::new();
            let topic = format!("sensors/{name}/temperature");
            codec::encode_publish(
                Protocol::V311,
                &topic,
                payload.as_bytes(),
                1,
                false,
                false,
                (seq % 65535 + 1) as u16,
                &mut out,
            );
            // Now and then a sensor resends (a lost PUBACK): dedup drops it.
            if rng.chance(0.05) {
                let copy = out.clone();
                out.extend_from_slice(&copy);
            }
            if s.write_all(&out).is_err() || !matches!(read_packet(&mut s), Some(Packet::PubAck { .. })) {
                break; // reconnect and resend this seq
            }
            sent.lock().unwrap().push((name.to_string(), "temperature".to_string(), seq));
            seq += 1;
            std::thread::sleep(period);
        }
    }
}

fn read_packet(s: &mut TcpStream) -> Option<Packet> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    loop {
        if let Ok(Some((p, _))) = codec::decode(Protocol::V311, &buf, 1 << 20) {
            return Some(p);
        }
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
