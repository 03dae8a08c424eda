//! SD-card wear at a site's pace (issue "Performance"): one gateway (release
//! build), 20 wearables on PTYs at 10 readings/s each (200/s), TLS QoS 2 to a
//! Mosquitto, for a minute. Prints the bytes the gateway made the block
//! layer write (`/proc/PID/io` `write_bytes`: queue, ledger, checkpoint and
//! PUBREC log together) per reading and per encoded byte, queue commits per
//! second, and the projected life of a 32 GB card with 3,000 P/E cycles; and
//! beside it, in the same go, a Mosquitto with `persistence true` and
//! `autosave_interval 1` taking the same 200 messages/s at QoS 1 from one
//! `mosquitto_pub -l`, forwarding to a subscriber (its own write_bytes).
//!
//! `cargo bench --bench sdwear`; without `--bench` a 3-second smoke run.
//! `SDWEAR_PIPELINE` and `SDWEAR_STORE` add lines to `[pipeline]` and `[store]`;
//! `SDWEAR_SECS` sets the gateway's run length (60; Mosquitto's stays ≤ 60 s).
//! `SDWEAR_RATE=full`: full load instead, every wearable writing 16 frames
//! at a time as fast as the acks let it, `SDWEAR_READINGS` (50,000) each;
//! no Mosquitto part then. fsyncs per second are printed by file, from
//! `edge_gateway_fsyncs_total`.
//!
//! The data dirs live in `TMPDIR`. On a disk with a journal, as a Pi's ext4
//! has (this VM's has none), the device's own figure is the one that counts:
//! `truncate -s 2G img && mkfs.ext4 -E lazy_itable_init=0,lazy_journal_init=0
//! img && mount -o loop img /mnt/pi`, then `TMPDIR=/mnt/pi cargo bench --bench
//! sdwear` (the loop device then carries that file system's writes alone).
//! The upstream broker (the cloud) keeps its files in /dev/shm, off that
//! device; on ext4 the journal commits per second are printed too.

#[path = "../tests/common/mod.rs"]
mod common;

use common::mosquitto::{Mosquitto, Subscriber, make_certs};
use common::{Gateway, Port, fetch_metrics, free_port, wait_until, write_config_extra};
use edge_gateway::config::Framing;
use edge_gateway::demo::sim::{SimConfig, SimDevice, open_pty};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn write_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("write_bytes:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Bytes written to the block device holding `path` so far, from
/// `/sys/dev/block/MAJ:MIN/stat` (sectors written × 512): what reached the
/// disk from everything on the machine, file-system metadata and any journal included, which
/// `write_bytes` does not count (the kernel's journal thread writes it).
fn device_bytes(path: &std::path::Path) -> Option<u64> {
    device_stat(path, 6).map(|s| s * 512)
}

/// Write requests the block device holding `path` completed so far (the
/// same file's fifth field): a card's controller programs at least a flash
/// page per request, however few bytes it carries.
fn device_writes(path: &std::path::Path) -> Option<u64> {
    device_stat(path, 4)
}

fn device_stat(path: &std::path::Path, field: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("{}/stat", sys_block(path)?)).ok()?;
    stat.split_whitespace().nth(field)?.parse::<u64>().ok()
}

/// `/sys/dev/block/MAJ:MIN` of the device holding `path`.
fn sys_block(path: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    let (major, minor) = (((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff), (dev & 0xff) | ((dev >> 12) & !0xff));
    Some(format!("/sys/dev/block/{major}:{minor}"))
}

/// Journal commits (jbd2 transactions) of the ext4 file system holding
/// `path` so far, from `/proc/fs/jbd2/DEV-8/info`; `None` without a journal.
/// Each is a few 4 KiB blocks (descriptor, the changed metadata, commit),
/// written twice (to the journal, and later in place).
fn journal_commits(path: &std::path::Path) -> Option<u64> {
    let uevent = std::fs::read_to_string(format!("{}/uevent", sys_block(path)?)).ok()?;
    let name = uevent.lines().find_map(|l| l.strip_prefix("DEVNAME="))?;
    let info = std::fs::read_to_string(format!("/proc/fs/jbd2/{name}-8/info")).ok()?;
    info.split_whitespace().next()?.parse().ok()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Years a card of `card_bytes` with `cycles` P/E cycles lasts at `per_sec`
/// bytes/s (no write amplification counted: the card's own adds to it).
fn years(per_sec: f64, card_bytes: f64, cycles: f64) -> f64 {
    card_bytes * cycles / per_sec.max(1e-9) / (365.25 * 86_400.0)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    // SDWEAR_SECS: a longer run sees the dedup state at its steady size (10 min window).
    let secs = if full { std::env::var("SDWEAR_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60) } else { 3 };
    let (devices_n, hz) = (20usize, 10.0);
    let full_load = std::env::var("SDWEAR_RATE").is_ok_and(|v| v == "full");
    let per_device: u64 =
        if full { std::env::var("SDWEAR_READINGS").ok().and_then(|s| s.parse().ok()).unwrap_or(50_000) } else { 2_000 };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The upstream broker stands for the cloud: its persistence (a db saved
    // every second or two) must not land on the device measured for the
    // gateway, nor the comparison subscriber's output on Mosquitto's. Both
    // go to /dev/shm where there is one (until 2026-12-06 they did not, and
    // the device figures of the gateway's run held the broker's writes).
    let off = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).unwrap();
    let certs = make_certs(off.path());
    let broker = Mosquitto::start(&off.path().join("broker"), &certs, false);
    if sys_block(off.path()) == sys_block(dir) {
        println!("note: no /dev/shm: the upstream broker's writes are in the device figures below");
    }

    // The gateway.
    let mut devices = Vec::new();
    let mut paths = Vec::new();
    for i in 0..devices_n {
        let pty = open_pty().unwrap();
        paths.push(pty.slave_path.clone());
        devices.push(SimDevice::on_pty(SimConfig::new(&format!("wrist-{i:02}"), Framing::Jsonl), pty).unwrap());
    }
    let names: Vec<String> = (0..devices_n).map(|i| format!("dock{i}")).collect();
    let ports: Vec<Port> = names.iter().zip(&paths).map(|(n, p)| Port { name: n, path: p, framing: "jsonl" }).collect();
    let mport = free_port();
    let up = format!(
        "[upstream]\nurl = \"mqtts://localhost:{}\"\nca_file = {:?}\n\n[metrics]\nlisten = \"127.0.0.1:{mport}\"\n",
        broker.tls_port,
        certs.ca.display().to_string()
    );
    // SDWEAR_PIPELINE / SDWEAR_STORE: extra lines for [pipeline] / [store],
    // e.g. `batch_max_age = "1s"` / `fsync_interval = "1s"` (docs/performance.md).
    let pipeline = format!("format = \"postcard\"\n{}", std::env::var("SDWEAR_PIPELINE").unwrap_or_default());
    let store = std::env::var("SDWEAR_STORE").unwrap_or_default();
    println!("settings: [pipeline] {pipeline:?} [store] {store:?}");
    let cfg = write_config_extra(dir, &ports, &pipeline, &store, &up);
    // What the machine writes anyway (its logs, other processes), to set
    // the device-level figures against; before the gateway starts, so its
    // own start-up writes are not taken for the machine's.
    nix::unistd::sync();
    let (idle0, idle_w0, idle_j0) = (device_bytes(dir), device_writes(dir), journal_commits(dir));
    let idle_secs = if full { 10 } else { 1 };
    std::thread::sleep(Duration::from_secs(idle_secs));
    nix::unistd::sync();
    let idle = idle0.zip(device_bytes(dir)).map_or(0.0, |(a, b)| (b - a) as f64 / idle_secs as f64);
    let idle_w = idle_w0.zip(device_writes(dir)).map_or(0.0, |(a, b)| (b - a) as f64 / idle_secs as f64);
    let idle_j = idle_j0.zip(journal_commits(dir)).map_or(0.0, |(a, b)| (b - a) as f64 / idle_secs as f64);
    // The log level a service runs at: debug lines (the tests' level) were
    // ~1 KiB/s of the gateway's own writes here, into a file in TMPDIR.
    let gw = Gateway::start_with_env(&cfg, &[("RUST_LOG", "info")]);
    assert!(wait_until(Duration::from_secs(20), || gw.log_text().contains("connected (MQTT")), "{}", gw.log_text());
    std::thread::sleep(Duration::from_secs(1));
    let pid = gw.child.id();
    let (w0, m0) = (write_bytes(pid), fetch_metrics(mport));
    nix::unistd::sync();
    let (d0, dw0, j0) = (device_bytes(dir), device_writes(dir), journal_commits(dir));
    let t0 = Instant::now();
    let period = Duration::from_secs_f64(1.0 / hz);
    let mut next = t0;
    if full_load {
        for round in (0..per_device).step_by(16) {
            for d in devices.iter_mut() {
                d.send_burst(16.min(per_device - round) as usize).unwrap();
                if round % 1024 == 0 {
                    d.resend_if_stalled().unwrap();
                }
            }
        }
    }
    while !full_load && t0.elapsed() < Duration::from_secs(secs) {
        if Instant::now() >= next {
            for d in devices.iter_mut() {
                d.send_next().unwrap();
                d.resend_if_stalled().unwrap();
            }
            next += period;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    for d in devices.iter_mut() {
        assert!(d.wait_all_acked(Duration::from_secs(30)).unwrap());
    }
    std::thread::sleep(Duration::from_secs(2)); // the uplink's last acks and their commit
    let elapsed = t0.elapsed().as_secs_f64();
    let (w1, m1) = (write_bytes(pid), fetch_metrics(mport));
    nix::unistd::sync();
    let dev_bytes = d0.zip(device_bytes(dir)).map(|(a, b)| (b - a) as f64);
    let dev_writes = dw0.zip(device_writes(dir)).map(|(a, b)| ((b - a) as f64 - idle_w * elapsed).max(0.0) / elapsed);
    let journal = j0.zip(journal_commits(dir)).map(|(a, b)| ((b - a) as f64 - idle_j * elapsed).max(0.0) / elapsed);
    let dev_writes_line = dev_writes.map_or(String::new(), |w| format!("; {w:.1} write requests/s"))
        + &journal.map_or(String::new(), |j| format!(", {j:.2} journal commits/s"));
    let readings =
        metric(&m1, "edge_gateway_readings_accepted_total") - metric(&m0, "edge_gateway_readings_accepted_total");
    let encoded =
        metric(&m1, "edge_gateway_batch_bytes_queued_total") - metric(&m0, "edge_gateway_batch_bytes_queued_total");
    let commits = metric(&m1, "edge_gateway_queue_commits_total") - metric(&m0, "edge_gateway_queue_commits_total");
    let fsyncs: Vec<(&str, f64)> = ["queue", "state", "pubrec"]
        .into_iter()
        .map(|f| {
            let name = format!("edge_gateway_fsyncs_total{{file=\"{f}\"}}");
            (f, (metric(&m1, &name) - metric(&m0, &name)) / elapsed)
        })
        .collect();
    let growth = |name: &str| metric(&m1, name) - metric(&m0, name);
    let pads = growth("edge_gateway_queue_pad_bytes_total");
    let zeros = growth("edge_gateway_queue_prefill_bytes_total");
    let reused = growth("edge_gateway_queue_reused_segments_total");
    let direct = growth("edge_gateway_queue_direct_commits_total");
    let deflated = growth("edge_gateway_queue_deflate_saved_bytes_total");
    let log_bytes = std::fs::metadata(&gw.log).map_or(0, |m| m.len());
    let fsyncs_line = fsyncs.iter().map(|(f, n)| format!("{f} {n:.1}")).collect::<Vec<_>>().join(", ")
        + &format!(
            " (queue padding written: {:.2}, zeros ahead: {:.2}, not written thanks to deflated records: {:.2} bytes per encoded byte; {reused:.0} segment files reused; {direct:.0} direct commits; its log at RUST_LOG=info: {log_bytes} bytes)",
            pads / encoded.max(1.0),
            zeros / encoded.max(1.0),
            deflated / encoded.max(1.0)
        );
    let gw_bytes = (w1 - w0) as f64;
    let _ = gw.terminate();
    let card = 32e9;
    let per_sec = gw_bytes / elapsed;
    if full_load {
        println!(
            "SD-card wear at full load ({devices_n} wearables × {per_device} readings, 16 frames per write, postcard, \
             TLS QoS 2, {elapsed:.1} s):\n  edge-gateway: {gw_bytes:.0} bytes written to the block device for \
             {readings:.0} readings ({:.0}/s) = {:.1} bytes/reading, {:.3} bytes per encoded byte ({encoded:.0} \
             encoded); {:.1} queue commits/s; fsyncs/s by file: {fsyncs_line}; {:.1} MiB/s",
            readings / elapsed,
            gw_bytes / readings.max(1.0),
            gw_bytes / encoded.max(1.0),
            commits / elapsed,
            per_sec / 1048576.0,
        );
        if let Some(g) = dev_bytes {
            let g = (g - idle * elapsed).max(0.0);
            println!(
                "  the whole block device (file-system metadata and any journal included, less {:.1} KiB/s idle): {:.3} bytes per encoded byte{dev_writes_line}",
                idle / 1024.0,
                g / encoded.max(1.0)
            );
        }
        assert!(readings > 0.0, "the gateway accepted readings");
        return;
    }

    // Mosquitto with persistence doing the same job: 200 QoS 1 messages/s.
    let mq = Mosquitto::start_with(&dir.join("persist"), &certs, false, "autosave_interval 1");
    let sub = Subscriber::start(mq.plain_port, "sd-sub", "sensors/#", &off.path().join("sd.out"));
    let mut publisher = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &mq.plain_port.to_string(), "-q", "1", "-t", "sensors/wrist/hr", "-l"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mq_pid = mq.pid();
    let mw0 = write_bytes(mq_pid);
    nix::unistd::sync();
    let md0 = device_bytes(dir);
    let t1 = Instant::now();
    let mut sent = 0u64;
    let stdin = publisher.stdin.as_mut().unwrap();
    while t1.elapsed() < Duration::from_secs(secs.min(60)) {
        let due = (t1.elapsed().as_secs_f64() * hz * devices_n as f64) as u64;
        while sent < due {
            writeln!(stdin, "{{\"device\":\"wrist-{:02}\",\"seq\":{sent},\"value\":72}}", sent % devices_n as u64)
                .unwrap();
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_secs(2));
    let mq_elapsed = t1.elapsed().as_secs_f64();
    let mq_bytes = (write_bytes(mq_pid) - mw0) as f64;
    nix::unistd::sync();
    let mq_dev = md0.zip(device_bytes(dir)).map(|(a, b)| (b - a) as f64);
    drop(publisher.stdin.take());
    let _ = publisher.wait();
    let got = sub.messages().len();

    println!(
        "SD-card wear at a site's pace ({devices_n} wearables × {hz}/s = {:.0} readings/s, {secs} s, postcard, TLS QoS 2):\n  \
         edge-gateway: {gw_bytes:.0} bytes written to the block device for {readings:.0} readings = {:.1} bytes/reading, \
         {:.2} bytes per encoded byte ({encoded:.0} encoded); {:.1} queue commits/s; fsyncs/s by file: {fsyncs_line}; {:.1} KiB/s → a 32 GB card with 3,000 P/E \
         cycles lasts {:.0} years (before the card's own write amplification)\n  \
         Mosquitto, persistence true + autosave_interval 1, {sent} QoS 1 messages ({got} at its subscriber): {mq_bytes:.0} bytes = \
         {:.1} bytes/message, {:.1} KiB/s → {:.0} years",
        devices_n as f64 * hz,
        gw_bytes / readings.max(1.0),
        gw_bytes / encoded.max(1.0),
        commits / elapsed,
        per_sec / 1024.0,
        years(per_sec, card, 3000.0),
        mq_bytes / sent.max(1) as f64,
        mq_bytes / mq_elapsed / 1024.0,
        years(mq_bytes / mq_elapsed, card, 3000.0),
    );
    match (dev_bytes, mq_dev) {
        (Some(g), Some(m)) => {
            // Less what the idle machine wrote in the same time.
            let (g, m) = ((g - idle * elapsed).max(0.0), (m - idle * mq_elapsed).max(0.0));
            println!(
                "  the whole block device (file-system metadata and any journal included; less the {:.1} KiB/s this machine wrote while idle \
                 just before; run it on a quiet machine): {g:.0} bytes during the gateway's run = {:.1} bytes/reading, \
                 {:.2} bytes per encoded byte, {:.1} KiB/s → {:.0} years{dev_writes_line}; during Mosquitto's: {m:.0} bytes = {:.1} \
                 bytes/message, {:.1} KiB/s → {:.0} years",
                idle / 1024.0,
                g / readings.max(1.0),
                g / encoded.max(1.0),
                g / elapsed / 1024.0,
                years(g / elapsed, card, 3000.0),
                m / sent.max(1) as f64,
                m / mq_elapsed / 1024.0,
                years(m / mq_elapsed, card, 3000.0),
            )
        }
        _ => println!("  (no /sys/dev/block counters for this disk: device-level bytes not measured)"),
    }
    assert!(readings > 0.0, "the gateway accepted readings");
}
