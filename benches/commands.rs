//! Command latency (issue "Downlink"): the cloud publishes a command (QoS 2,
//! Mosquitto) → the uplink takes it (on disk first) → the serial wearable's
//! PTY gets the `{"cmd":...}` line → the wearable answers at once → the
//! reply is queued and sent upstream (QoS 2) → the cloud's subscriber has
//! it. Commands one at a time, the device connected, release binary.
//! Prints p50/p99 of cloud → device and cloud → reply.
//!
//! `cargo bench --bench commands`; without `--bench` (as under `cargo
//! test`) a small smoke run.

#[path = "../tests/common/mod.rs"]
mod common;

use common::mosquitto::{Mosquitto, make_certs, need};
use common::{Gateway, Port, wait_until, write_config_extra};
use edge_gateway::config::Framing;
use edge_gateway::demo::sim::{SimConfig, SimDevice, open_pty};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full { 300 } else { 5 };
    need("mosquitto_pub", "mosquitto-clients");
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let certs = make_certs(dir);
    // Nagle off on the broker too: else its small PUBLISHes wait out our delayed ACK (40 ms).
    let broker = Mosquitto::start_with(&dir.join("broker"), &certs, false, "set_tcp_nodelay true");
    let port = broker.plain_port.to_string();
    // The cloud's reply subscriber: each line's arrival time by command id.
    let arrived: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut sub = Command::new("mosquitto_sub")
        .args(["-p", &port, "-q", "2", "-t", "gateways/bench/commands/reply"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let (out, arrived) = (sub.stdout.take().unwrap(), arrived.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                arrived.lock().unwrap().insert(v["id"].as_str().unwrap_or("").to_string(), Instant::now());
            }
        });
    }
    let pty = open_pty().unwrap();
    let path = pty.slave_path.clone();
    let mut device = SimDevice::on_pty(SimConfig::new("wrist-01", Framing::Jsonl), pty).unwrap();
    let up = format!(
        "[upstream]\nurl = \"mqtts://localhost:{}\"\nca_file = {:?}\n[commands]\n",
        broker.tls_port,
        certs.ca.display().to_string()
    );
    let cfg = write_config_extra(dir, &[Port { name: "dock", path: &path, framing: "jsonl" }], "", "", &up);
    let text = std::fs::read_to_string(&cfg).unwrap().replace("test-gw", "bench");
    std::fs::write(&cfg, text).unwrap();
    let gw = Gateway::start(&cfg);
    assert!(
        wait_until(Duration::from_secs(20), || gw.log_text().contains("subscribed to commands")),
        "{}",
        gw.log_text()
    );
    device.send_next().unwrap();
    assert!(device.wait_all_acked(Duration::from_secs(20)).unwrap());
    let mut cloud = Command::new("mosquitto_pub")
        .args(["-p", &port, "-q", "2", "-t", "gateways/bench/commands", "-l", "--nodelay"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = cloud.stdin.as_mut().unwrap();
    let (mut to_device, mut to_reply) = (Vec::new(), Vec::new());
    for i in 0..n {
        let id = format!("b-{i}");
        let t0 = Instant::now();
        writeln!(stdin, "{{\"id\":\"{id}\",\"device\":\"wrist-01\",\"name\":\"alert\"}}").unwrap();
        stdin.flush().unwrap();
        // The device answers as soon as it sees the line.
        let seen = loop {
            if !device.commands().is_empty() {
                break Instant::now();
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "{id} never reached the device: {}", gw.log_text());
            std::thread::sleep(Duration::from_micros(200));
        };
        device.answer_commands(true).unwrap();
        let replied = loop {
            if let Some(t) = arrived.lock().unwrap().get(&id) {
                break *t;
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "no reply to {id}: {}", gw.log_text());
            std::thread::sleep(Duration::from_micros(200));
        };
        to_device.push((seen - t0).as_secs_f64() * 1e3);
        to_reply.push((replied - t0).as_secs_f64() * 1e3);
    }
    drop(cloud.stdin.take());
    let _ = cloud.wait();
    let _ = sub.kill();
    let _ = sub.wait();
    let _ = gw.terminate();
    println!(
        "commands ({n}, one at a time, device connected, serial jsonl, TLS QoS 2 both ways): \
         cloud → device p50 {:.1} ms, p99 {:.1} ms; cloud → reply at the cloud p50 {:.1} ms, p99 {:.1} ms",
        pct(&mut to_device.clone(), 0.5),
        pct(&mut to_device, 0.99),
        pct(&mut to_reply.clone(), 0.5),
        pct(&mut to_reply, 0.99)
    );
}
