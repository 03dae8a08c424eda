//! The gateway's cost with many BLE wearables: 20 simulated heart-rate
//! straps notifying at 10 Hz for 60 s, through the real binary, btleplug,
//! and a fake BlueZ on a private `dbus-daemon` (the one the tests use).
//!
//! `cargo bench --bench ble_load` prints the gateway process's CPU time as
//! a share of one core, and its RSS at the start and end of the run (after
//! a warm-up, so start-up allocation is not counted as growth).
//! `BLE_BENCH_SECS` shortens or lengthens the run. Without `--bench` (as in
//! `cargo test --all-targets`) it is a 2-second smoke run of 3 devices.

#[path = "../tests/common/fake_bluez.rs"]
mod fake_bluez;

use fake_bluez::{Bus, CharSpec, FakeBluez};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the parenthesised command name; utime, stime are 14, 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// /proc reports CPU time in USER_HZ, which Linux fixes at 100 on every
/// architecture the gateway runs on.
fn clock_ticks_per_sec() -> f64 {
    100.0
}

fn main() {
    let full = full_run();
    let devices = if full { 20 } else { 3 };
    let secs: u64 =
        if full { std::env::var("BLE_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60) } else { 2 };
    let hz = 10u64;

    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::start();
    let mut fake = FakeBluez::start(&bus.address);
    let addrs: Vec<String> = (0..devices).map(|i| format!("C0:FF:EE:00:01:{i:02X}")).collect();
    let mut cfg =
        format!("[gateway]\nid = \"bench\"\ndata_dir = {:?}\n\n", dir.path().join("data").display().to_string());
    for (i, a) in addrs.iter().enumerate() {
        fake.add_gatt_device(
            a,
            &format!("Strap {i}"),
            vec![CharSpec { service: 0x180D, uuid: 0x2A37, flags: &["notify"], value: vec![] }],
        );
        cfg += &format!("[[ble]]\nname = \"strap{i}\"\nmatch = {{ address = \"{a}\" }}\nprofile = \"heart_rate\"\n\n");
    }
    let cfg_path = dir.path().join("gateway.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let log = std::fs::File::create(dir.path().join("gateway.log")).unwrap();
    let mut gw = Command::new(env!("CARGO_BIN_EXE_edge-gateway"))
        .args(["run", "--config"])
        .arg(&cfg_path)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the gateway");
    let pid = gw.id();
    let ready = addrs.iter().all(|a| fake.wait_notifying(a, 0x2A37, Duration::from_secs(60)));
    assert!(ready, "not every device subscribed; see {}", dir.path().join("gateway.log").display());

    // Warm-up: one second of load before measuring.
    let period = Duration::from_micros(1_000_000 / hz);
    let mut sent = 0u64;
    let drive = |until: Instant, sent: &mut u64| {
        let mut next = Instant::now();
        while Instant::now() < until {
            for a in &addrs {
                let hr = 60 + (*sent % 100) as u16;
                let mut v = vec![0x11];
                v.extend_from_slice(&hr.to_le_bytes());
                v.extend_from_slice(&[0x00, 0x04]);
                if fake.notify(a, 0x2A37, &v) {
                    *sent += 1;
                }
            }
            next += period;
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
    };
    drive(Instant::now() + Duration::from_secs(1), &mut sent);
    let (cpu0, rss0, t0) = (cpu_ticks(pid), rss_kib(pid), Instant::now());
    let sent0 = sent;
    drive(t0 + Duration::from_secs(secs), &mut sent);
    let (cpu1, rss1, elapsed) = (cpu_ticks(pid), rss_kib(pid), t0.elapsed());
    let cpu_pct = (cpu1 - cpu0) as f64 / clock_ticks_per_sec() / elapsed.as_secs_f64() * 100.0;
    let rate = (sent - sent0) as f64 / elapsed.as_secs_f64();

    let queued = || {
        let out = Command::new(env!("CARGO_BIN_EXE_edge-gateway"))
            .args(["queue", "status", "--config"])
            .arg(&cfg_path)
            .output()
            .unwrap();
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        status["readings"].as_u64().unwrap_or(0)
    };
    // Notifications already emitted are on the bus: let them land (bounded),
    // then stop; the stop drains what the gateway holds.
    let settle = Instant::now() + Duration::from_secs(10);
    while queued() < sent * 2 && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
    let _ = gw.wait();
    let queued = queued();
    println!(
        "ble_load: {devices} devices x {hz} Hz for {:.0} s ({rate:.0} notifications/s): gateway CPU {cpu_pct:.1} % of one core, \
         RSS {rss0} KiB -> {rss1} KiB (growth {} KiB); {queued} readings queued of {} sent (HR + RR each)",
        elapsed.as_secs_f64(),
        rss1 as i64 - rss0 as i64,
        sent * 2
    );
    // Each notification is two readings (HR and one RR interval), none with a
    // seq, so dedup keeps them all: exactly twice the notifications emitted.
    assert_eq!(queued, sent * 2, "readings lost or doubled: {queued} queued for {sent} notifications");
}
