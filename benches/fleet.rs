//! A fleet, simulated (issue "Performance"): N gateway processes (release
//! build), each with its own data dir and one simulated dock writing 50
//! readings/s, all into one Mosquitto over TLS at QoS 2. The broker is
//! restarted once (down for a while, then back). Prints: the reconnect
//! spread after the restart (first to last gateway reconnected, and the most
//! in any one second: the backoff jitter must keep them apart), the time
//! until every backlog drained, the fleet's total RSS (peak of the sum), and
//! exactly once at one subscriber across the fleet.
//!
//! `cargo bench --bench fleet` (50 gateways; `FLEET=N` for another size);
//! without `--bench` (as under `cargo test`) a 3-gateway smoke run.

#[path = "../tests/common/mod.rs"]
mod common;

use common::mosquitto::{Mosquitto, Subscriber, decode_all, make_certs, missing_and_doubled};
use common::{Gateway, Port, log_time_ms, unix_ms, wait_until, write_config_extra};
use edge_gateway::config::Framing;
use edge_gateway::demo::sim::{SimConfig, SimDevice, open_pty};
use std::time::{Duration, Instant};

const RATE: f64 = 50.0;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("FLEET").ok().and_then(|v| v.parse().ok()).unwrap_or(if full { 50 } else { 3 });
    let (warm, down, after) = if full {
        (Duration::from_secs(15), Duration::from_secs(10), Duration::from_secs(15))
    } else {
        (Duration::from_secs(2), Duration::from_secs(2), Duration::from_secs(2))
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = make_certs(dir);
    let mut broker = Mosquitto::start(&dir.join("broker"), &certs, false);
    let sub = Subscriber::start(broker.plain_port, "fleet-sub", "gateways/+/readings", &dir.join("sub.out"));
    let mut devices = Vec::new();
    let mut gateways = Vec::new();
    for i in 0..n {
        let gdir = dir.join(format!("gw{i:02}"));
        std::fs::create_dir_all(&gdir).unwrap();
        let pty = open_pty().unwrap();
        let path = pty.slave_path.clone();
        let mut c = SimConfig::new(&format!("wrist-{i:02}"), Framing::Jsonl);
        c.seed = 7 + i as u64;
        devices.push(SimDevice::on_pty(c, pty).unwrap());
        let up = format!(
            "[upstream]\nurl = \"mqtts://localhost:{}\"\nca_file = {:?}\n\n[metrics]\nenabled = false\n",
            broker.tls_port,
            certs.ca.display().to_string()
        );
        let cfg = write_config_extra(&gdir, &[Port { name: "dock", path: &path, framing: "jsonl" }], "", "", &up);
        let text = std::fs::read_to_string(&cfg).unwrap().replace("\"test-gw\"", &format!("\"fleet-{i:02}\""));
        std::fs::write(&cfg, text).unwrap();
        gateways.push(Gateway::start(&cfg));
    }
    let started = Instant::now();
    let mut peak_rss = 0u64;
    let mut last_sample = Instant::now() - Duration::from_secs(1);
    let period = Duration::from_secs_f64(1.0 / RATE);
    let mut next = Instant::now();
    let mut restarted_at: Option<u64> = None;
    let mut stopped_at: Option<Instant> = None;
    let phase_end = warm + down + after;
    loop {
        let now = Instant::now();
        if now >= next && now - started < phase_end {
            for d in devices.iter_mut() {
                d.send_next().unwrap();
            }
            next += period;
        }
        for d in devices.iter_mut() {
            d.resend_if_stalled().unwrap();
        }
        if stopped_at.is_none() && now - started >= warm {
            broker.stop();
            stopped_at = Some(now);
            println!("broker stopped at {:.1} s", (now - started).as_secs_f64());
        }
        if restarted_at.is_none() && stopped_at.is_some_and(|t| now - t >= down) {
            broker.restart();
            restarted_at = Some(unix_ms());
            println!("broker back at {:.1} s", (now - started).as_secs_f64());
        }
        if now - last_sample >= Duration::from_secs(1) {
            last_sample = now;
            peak_rss = peak_rss.max(gateways.iter().map(|g| rss_kib(g.child.id())).sum());
        }
        if now - started >= phase_end {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    for d in devices.iter_mut() {
        assert!(d.wait_all_acked(Duration::from_secs(60)).unwrap(), "not all acked");
    }
    let back = restarted_at.unwrap();
    let want: usize = devices.iter().map(|d| d.created().len()).sum();
    let drained = wait_until(Duration::from_secs(300), || {
        if last_sample.elapsed() >= Duration::from_secs(1) {
            last_sample = Instant::now();
            peak_rss = peak_rss.max(gateways.iter().map(|g| rss_kib(g.child.id())).sum());
        }
        decode_all(&sub.messages()).readings.len() >= want
    });
    let drained_ms = unix_ms() - back;
    assert!(drained, "the fleet's backlogs did not drain");
    std::thread::sleep(Duration::from_millis(1000));
    // When each gateway reconnected after the restart (its log's timestamp).
    let mut reconnects: Vec<u64> = gateways
        .iter()
        .filter_map(|g| {
            g.log_text()
                .lines()
                .filter(|l| l.contains("connected (MQTT"))
                .filter_map(log_time_ms)
                .find(|t| *t + 50 >= back)
        })
        .collect();
    reconnects.sort();
    let per_gw_rss: Vec<u64> = {
        let mut v: Vec<u64> = gateways.iter().map(|g| rss_kib(g.child.id())).collect();
        v.sort();
        v
    };
    let mut codes = Vec::new();
    for g in gateways {
        codes.push(g.terminate().0);
    }
    let got = decode_all(&sub.messages());
    let (expected, missing, doubled) = missing_and_doubled(&devices, &got);
    let spread = reconnects.last().unwrap_or(&0) - reconnects.first().unwrap_or(&0);
    let first = reconnects.first().map_or(0, |t| t.saturating_sub(back));
    let mut per_second = std::collections::HashMap::<u64, usize>::new();
    for t in &reconnects {
        *per_second.entry(t / 1000).or_default() += 1;
    }
    let busiest = per_second.values().max().copied().unwrap_or(0);
    let secs = reconnects.last().map_or(0, |t| t.saturating_sub(back) / 1000 + 1);
    let histogram: Vec<usize> =
        (0..secs).map(|s| reconnects.iter().filter(|t| t.saturating_sub(back) / 1000 == s).count()).collect();
    println!(
        "fleet of {n} gateways × 1 dock at {RATE}/s into one Mosquitto (TLS QoS 2), broker down {} s once:\n  \
         reconnected {} of {n}: first {first} ms after the broker was back, spread {spread} ms, at most {busiest} in one second\n  \
         reconnects per second after the broker was back: {histogram:?}\n  \
         every backlog drained {:.1} s after the broker was back\n  \
         RSS: fleet peak {:.1} MiB (sum), per gateway median {:.1} MiB at the end\n  \
         readings: {expected} sent, {missing} missing, {doubled} doubled at the subscriber; exits {:?}",
        down.as_secs(),
        reconnects.len(),
        drained_ms as f64 / 1000.0,
        peak_rss as f64 / 1024.0,
        per_gw_rss[per_gw_rss.len() / 2] as f64 / 1024.0,
        codes.iter().filter(|c| **c != Some(0)).count(),
    );
    assert_eq!((missing, doubled), (0, 0), "exactly once across the fleet");
    assert!(codes.iter().all(|c| *c == Some(0)), "every gateway exits 0: {codes:?}");
}
