//! SIGHUP: the config is re-read; serial ports start and stop, a changed
//! `[upstream]` reconnects, an invalid file is refused and the running
//! config kept, and the queue is never touched. Real PTY docks, a real
//! Mosquitto upstream, the real binary.

mod common;

use common::mosquitto::{Mosquitto, Subscriber, make_certs, wait_received};
use common::*;
use edge_gateway::config::Framing;
use nix::sys::signal::Signal;
use std::path::Path;
use std::time::Duration;

/// Wait for the n-th occurrence of `needle` in the log.
fn wait_log(gw: &Gateway, needle: &str, n: usize) {
    assert!(
        wait_until(Duration::from_secs(15), || gw.log_text().matches(needle).count() >= n),
        "no {n}x {needle:?} in the log:\n{}",
        gw.log_text()
    );
}

fn write(dir: &Path, ports: &[Port], extra: &str) {
    write_config_extra(dir, ports, "batch_max_age = \"50ms\"", "fsync_interval = \"10ms\"", extra);
}

#[test]
fn sighup_adds_and_removes_ports_reconnects_upstream_and_refuses_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, dock_a) = device("wrist-a", Framing::Jsonl, 11, 0.0);
    let (mut b, dock_b) = device("wrist-b", Framing::Cobs, 12, 0.0);
    let port_a = Port { name: "dockA", path: &dock_a, framing: "jsonl" };
    let port_b = Port { name: "dockB", path: &dock_b, framing: "cobs" };
    let mport = free_port();
    let metrics = format!("[metrics]\nlisten = \"127.0.0.1:{mport}\"\n");
    write(dir.path(), &[Port { ..port_a }], &metrics);
    let cfg = dir.path().join("gateway.toml");
    let gw = Gateway::start(&cfg);
    for _ in 0..20 {
        a.send_next().unwrap();
    }
    assert!(a.wait_all_acked(Duration::from_secs(20)).unwrap(), "{:?}\n{}", a.stats(), gw.log_text());

    // 1. A dock added: it starts, its wearable gets acks.
    write(dir.path(), &[Port { ..port_a }, Port { ..port_b }], &metrics);
    gw.signal(Signal::SIGHUP);
    wait_log(&gw, "reload: serial dockB added", 1);
    for _ in 0..20 {
        a.send_next().unwrap();
        b.send_next().unwrap();
    }
    assert!(b.wait_all_acked(Duration::from_secs(20)).unwrap(), "{:?}\n{}", b.stats(), gw.log_text());
    assert!(a.wait_all_acked(Duration::from_secs(20)).unwrap(), "{:?}", a.stats());

    // 2. An invalid file: refused with PATH:LINE:COL and the key; both docks keep working.
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, good.replace("batch_max_age = \"50ms\"", "batch_max_age = \"soon\"")).unwrap();
    gw.signal(Signal::SIGHUP);
    wait_log(&gw, "reload refused, keeping the running config", 1);
    let log = gw.log_text();
    let line = log.lines().find(|l| l.contains("reload refused")).unwrap();
    assert!(line.contains("gateway.toml:") && line.contains("pipeline.batch_max_age"), "{line}");
    for _ in 0..10 {
        a.send_next().unwrap();
        b.send_next().unwrap();
    }
    assert!(a.wait_all_acked(Duration::from_secs(20)).unwrap(), "{:?}", a.stats());
    assert!(b.wait_all_acked(Duration::from_secs(20)).unwrap(), "{:?}", b.stats());

    // 3. A dock removed (and a restart-only section changed): dockA stops,
    //    its wearable gets no more acks; the [pipeline] change is named.
    write_config_extra(
        dir.path(),
        &[Port { ..port_b }],
        "batch_max_age = \"60ms\"",
        "fsync_interval = \"10ms\"",
        &metrics,
    );
    gw.signal(Signal::SIGHUP);
    wait_log(&gw, "reload: serial dockA removed", 1);
    assert!(gw.log_text().contains("[pipeline] changed; these take effect at the next restart"), "{}", gw.log_text());
    let acked_a = a.stats().acked_through;
    for _ in 0..5 {
        a.send_next().unwrap();
    }
    std::thread::sleep(Duration::from_millis(1500));
    a.resend_if_stalled().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(a.stats().acked_through, acked_a, "a removed dock must not ack");
    let m = fetch_metrics(mport);
    assert!(!m.contains("link=\"dockA\""), "a removed port leaves /metrics:\n{m}");
    assert!(m.contains("edge_gateway_link_up{source=\"serial\",link=\"dockB\"} 1"), "{m}");
    assert!(m.contains("edge_gateway_reloads_total 2\n") && m.contains("edge_gateway_reloads_failed_total 1\n"), "{m}");

    // 4. An upstream added: the queue so far drains to it, exactly once.
    need("mosquitto", "mosquitto");
    std::fs::create_dir_all(dir.path().join("certs")).unwrap();
    let certs = make_certs(&dir.path().join("certs"));
    let broker = Mosquitto::start(&dir.path().join("broker"), &certs, false);
    let sub = Subscriber::start(broker.plain_port, "reload-sub", "batches/#", &dir.path().join("sub.out"));
    let upstream = |topic: &str| {
        format!(
            "{metrics}\n[upstream]\nurl = \"mqtt://127.0.0.1:{}\"\nallow_plaintext = true\nreconnect_min = \"100ms\"\ntopic = \"{topic}\"\n",
            broker.plain_port
        )
    };
    write(dir.path(), &[Port { ..port_b }], &upstream("batches/{gateway}/readings"));
    gw.signal(Signal::SIGHUP);
    wait_log(&gw, "reload: upstream reconnecting with the new settings", 1);
    // 50 from wrist-a (acked while dockA lived) + 30 from wrist-b.
    let r = wait_received(&sub, Duration::from_secs(30), |r| r.readings.len() >= 80);
    assert_eq!(r.readings.len(), 80, "{}", gw.log_text());
    let m = fetch_metrics(mport);
    assert!(m.contains("edge_gateway_upstream_configured 1\n"), "{m}");

    // 5. The upstream changed (another topic): a new session; new readings go there.
    write(dir.path(), &[Port { ..port_b }], &upstream("batches/{gateway}/v2"));
    gw.signal(Signal::SIGHUP);
    wait_log(&gw, "reload: upstream reconnecting with the new settings", 2);
    for _ in 0..15 {
        b.send_next().unwrap();
    }
    assert!(b.wait_all_acked(Duration::from_secs(20)).unwrap(), "{:?}", b.stats());
    let r = wait_received(&sub, Duration::from_secs(30), |r| r.readings.len() >= 95);
    assert_eq!(r.readings.len(), 95, "{}", gw.log_text());
    assert!(r.readings.values().all(|&n| n == 1), "a reading arrived twice");
    let on_v2 = sub.messages().iter().filter(|(t, _)| t.ends_with("/v2")).count();
    assert!(on_v2 >= 1, "nothing on the new topic: {:?}", sub.messages().iter().map(|m| &m.0).collect::<Vec<_>>());
    let (log, _) = terminate_ok(gw);
    assert!(log.contains("95 readings accepted"), "{log}");
}
