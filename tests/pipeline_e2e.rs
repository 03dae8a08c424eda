//! The whole path with real parts: simulated wearables on kernel PTYs, the
//! real `edge-gateway` binary (killed with SIGKILL where the test says so),
//! and the queue read back through `edge-gateway queue dump`.

mod common;
use common::*;
use edge_gateway::config::Framing;
use edge_gateway::demo::sim::{Malformed, SimConfig, SimDevice, open_pty};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

// The simulated devices inject duplicates picked from their whole history;
// real devices resend only what is unacked. Remember enough keys for that.
// After a restart, devices the state file does not name wait one
// ack_gap_timeout of talking for their first ack; 2 s keeps tests quick.
const PIPELINE: &str =
    "batch_max_age = \"50ms\"\nbatch_max_readings = 200\ndedup_max_per_device = 200000\nack_gap_timeout = \"2s\"";
const STORE: &str = "fsync_interval = \"50ms\"";

/// `n` devices with this file's pipeline and store settings.
fn fleet(
    dir: &std::path::Path,
    n: usize,
    seed: u64,
    dup: f64,
    framing: impl Fn(usize) -> Framing,
) -> (Vec<SimDevice>, PathBuf) {
    fleet_with(dir, n, seed, dup, framing, PIPELINE, STORE, "")
}

/// Every reading every device created is in the dump exactly once, and the
/// dump holds nothing else.
fn assert_exactly_once(devices: &[SimDevice], dump: &[serde_json::Value]) {
    let counts = count_by_key(dump);
    let mut missing = 0;
    let mut doubled = 0;
    let mut expected = 0;
    for d in devices {
        for r in d.created() {
            expected += 1;
            match counts.get(&(r.device.clone(), r.sensor.clone(), r.seq.unwrap())) {
                None => missing += 1,
                Some(1) => {}
                Some(_) => doubled += 1,
            }
        }
    }
    assert_eq!((missing, doubled), (0, 0), "of {expected} readings: {missing} missing, {doubled} duplicated");
    assert_eq!(dump.len(), expected, "the queue holds readings nobody sent");
}

#[test]
fn ten_thousand_readings_with_duplicates_and_garbage_are_queued_once_and_acked() {
    let dir = tempfile::tempdir().unwrap();
    // Half the docks speak jsonl, half cobs.
    let (mut devices, cfg) =
        fleet(dir.path(), 10, 100, 0.2, |i| if i % 2 == 0 { Framing::Jsonl } else { Framing::Cobs });
    let gw = Gateway::start(&cfg);

    // 1,000 readings per device, interleaved; 5 malformed frames per device.
    for step in 0..1000 {
        for d in devices.iter_mut() {
            d.send_next().unwrap();
            if step % 200 == 100 {
                d.send_malformed(Malformed::ALL[step / 200 % 4]).unwrap();
            }
            d.resend_if_stalled().unwrap();
        }
    }
    all_acked(&mut devices, &gw);
    let dups: u64 = devices.iter().map(|d| d.stats().duplicates_injected).sum();
    let malformed: u64 = devices.iter().map(|d| d.stats().malformed_sent).sum();
    assert_eq!(malformed, 50);
    assert!(dups >= 1500, "about 20 % duplicates expected, got {dups}");
    let log = gw_terminate(gw);
    let dump = queue_dump(&cfg);
    assert_exactly_once(&devices, &dump);
    assert_eq!(dump.len(), 10_000);
    for d in &devices {
        let st = d.stats();
        // Sim devices count from 0.
        assert_eq!((st.pending, st.acked_through), (0, Some(999)), "{:?}", st);
    }
    // Malformed frames are counted per port, exactly.
    let counted: u64 =
        log.lines().filter(|l| l.contains(" malformed, ")).map(|l| summary_number(l, "malformed,")).sum();
    assert_eq!(counted, 50, "{log}");
    assert!(summary_number(&log, "duplicates dropped") >= dups, "{log}");
}

/// Keep `d` sending (and resending) until the gateway exits or `timeout`
/// passes; whether it exited.
fn talk_until_exit(gw: &mut Gateway, d: &mut SimDevice, timeout: Duration) -> bool {
    wait_until(timeout, || {
        if gw.child.try_wait().unwrap().is_some() {
            return true;
        }
        let _ = d.send_next();
        let _ = d.resend_if_stalled();
        std::thread::sleep(Duration::from_millis(5));
        false
    })
}

/// SIGTERM, assert exit 0 within 5 s, return the log.
fn gw_terminate(gw: Gateway) -> String {
    let (text, took) = terminate_ok(gw);
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    text
}

#[test]
fn sigkill_three_times_while_streaming_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut devices, cfg) = fleet(dir.path(), 4, 7, 0.05, |_| Framing::Jsonl);
    let mut gw = Gateway::start(&cfg);
    let mut rng = edge_gateway::rng::XorShift::new(42);
    // EDGE_GATEWAY_SOAK_KILLS=30 (say) turns this into a soak run by hand.
    let want: usize = std::env::var("EDGE_GATEWAY_SOAK_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let mut kills = 0;
    let mut next_kill = Instant::now() + Duration::from_millis(300 + rng.below(700));
    let mut sent = 0;
    while kills < want || sent < 6000 {
        for d in devices.iter_mut() {
            d.send_next().unwrap();
            d.resend_if_stalled().unwrap();
        }
        sent += devices.len();
        std::thread::sleep(Duration::from_micros(300));
        if kills < want && Instant::now() >= next_kill {
            gw.kill9();
            kills += 1;
            std::thread::sleep(Duration::from_millis(rng.below(300)));
            gw = Gateway::start(&cfg);
            next_kill = Instant::now() + Duration::from_millis(300 + rng.below(1200));
        }
    }
    all_acked(&mut devices, &gw);
    gw_terminate(gw);
    let dump = queue_dump(&cfg);
    assert_exactly_once(&devices, &dump);
}

#[test]
fn crash_between_commit_and_ack_and_during_checkpoint_loses_nothing() {
    // The named windows: after the queue commit but before the device saw
    // its ack (it resends; dedup must drop the resend), after append before
    // commit (never acked, the resend is queued), and with a half-written
    // state file (the old one stays valid).
    for point in ["after-commit:3", "after-append:2", "before-state-rename:1"] {
        let dir = tempfile::tempdir().unwrap();
        let (mut d, p) = device("wrist-00", Framing::Jsonl, 3, 0.0);
        let cfg = write_config(dir.path(), &[Port { name: "dock0", path: &p, framing: "jsonl" }], PIPELINE, STORE);
        let mut gw = Gateway::start_with_env(&cfg, &[("EDGE_GATEWAY_CRASH_AT", point)]);
        // Signal handlers must be in place before the SIGTERM below.
        assert!(wait_until(Duration::from_secs(30), || gw.log_text().contains("running")), "{}", gw.log_text());
        // Stop writing once the gateway is gone: a device writing into a
        // dock nobody reads blocks when the PTY buffer is full.
        for _ in 0..300 {
            if gw.child.try_wait().unwrap().is_some() {
                break;
            }
            d.send_next().unwrap();
            d.resend_if_stalled().unwrap();
            std::thread::sleep(Duration::from_micros(500));
        }
        if point.starts_with("before-state") {
            // The checkpoint runs at shutdown: ask for one.
            gw.signal(nix::sys::signal::Signal::SIGTERM);
        }
        assert!(
            // Keep the device talking until the point is reached: on a
            // loaded machine the 300 readings may have fit in fewer commits
            // than the point waits for.
            wait_until(Duration::from_secs(60), || {
                if gw.child.try_wait().unwrap().is_some() {
                    return true;
                }
                let _ = d.send_next();
                let _ = d.resend_if_stalled();
                false
            }),
            "crash point {point} never reached:\n{}",
            gw.log_text()
        );
        let first = gw.log_text();
        assert!(first.contains("crash point"), "{first}");
        if point.starts_with("after-append") {
            // Cut back to the last fsync like a power cut: the batch appended
            // (and everything else not yet committed) is gone, never acked.
            assert!(first.contains("unsynced bytes") && !first.contains("cut 0 unsynced"), "{first}");
        }
        gw = Gateway::start(&cfg);
        for _ in 0..100 {
            d.send_next().unwrap();
        }
        assert!(d.wait_all_acked(Duration::from_secs(60)).unwrap(), "{point}: {:?}\n{}", d.stats(), gw.log_text());
        gw_terminate(gw);
        assert_exactly_once(std::slice::from_ref(&d), &queue_dump(&cfg));
    }
}

#[test]
fn a_device_is_named_by_a_checkpoint_soon_after_its_first_ack() {
    // Found by the power-cut rig: the periodic checkpoint comes every 60 s,
    // so a gateway whose power was cut sooner after a device's first ack
    // restarted without the device in its state, held its acks for a whole
    // ack_gap_timeout, and after every further early cut held them again:
    // power cycling every minute, the wearable was never acked. Now its
    // first ack forces a checkpoint. Crash right after that checkpoint; the
    // restarted gateway must ack the device at once, not after the 30 s.
    let dir = tempfile::tempdir().unwrap();
    let (mut d, p) = device("wrist-00", Framing::Jsonl, 5, 0.0);
    let pipeline = "batch_max_age = \"50ms\"\nack_gap_timeout = \"30s\"";
    let cfg = write_config(dir.path(), &[Port { name: "dock0", path: &p, framing: "jsonl" }], pipeline, STORE);
    let mut gw = Gateway::start_with_env(&cfg, &[("EDGE_GATEWAY_CRASH_AT", "after-checkpoint:1")]);
    let crashed = talk_until_exit(&mut gw, &mut d, Duration::from_secs(15));
    assert!(crashed && gw.log_text().contains("crash point"), "no checkpoint after the first ack:\n{}", gw.log_text());
    gw = Gateway::start(&cfg);
    for _ in 0..20 {
        d.send_next().unwrap();
    }
    let t = Instant::now();
    assert!(
        d.wait_all_acked(Duration::from_secs(10)).unwrap(),
        "held after a restart: {:?}\n{}",
        d.stats(),
        gw.log_text()
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    gw_terminate(gw);
    assert_exactly_once(std::slice::from_ref(&d), &queue_dump(&cfg));
}

/// Fill a queue through the binary: one device, `n` readings, batches of 10.
/// `settle`: how long to wait for the last acks (all of them, unless the queue refuses).
fn fill(dir: &std::path::Path, store: &str, n: usize, settle: Duration) -> (PathBuf, SimDevice, String) {
    let (mut d, p) = device("wrist-00", Framing::Jsonl, 11, 0.0);
    let cfg = write_config(
        dir,
        &[Port { name: "dock0", path: &p, framing: "jsonl" }],
        "batch_max_age = \"20ms\"\nbatch_max_readings = 10\nbatch_max_bytes = \"2KiB\"\nack_gap_timeout = \"2s\"",
        store,
    );
    let gw = Gateway::start(&cfg);
    for _ in 0..n {
        d.send_next().unwrap();
        d.resend_if_stalled().unwrap();
        std::thread::sleep(Duration::from_micros(300));
    }
    // Let the tail settle (acks for everything that will be acked).
    let _ = d.wait_all_acked(settle);
    let log = gw_terminate(gw);
    (cfg, d, log)
}

fn segments(cfg: &std::path::Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(cfg.parent().unwrap().join("data/queue/segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

fn batches(dump: &[serde_json::Value]) -> BTreeSet<u64> {
    dump.iter().map(|r| r["batch"].as_u64().unwrap()).collect()
}

#[test]
fn torn_tail_and_flipped_byte_are_repaired_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, d, _) = fill(dir.path(), "segment_bytes = 4096\nopen_check = \"full\"", 400, Duration::from_secs(20));
    assert_eq!(d.stats().pending, 0);
    let before = queue_dump(&cfg);
    assert_eq!(before.len(), 400);
    let segs = segments(&cfg);
    assert!(segs.len() >= 3, "want several segments, got {segs:?}");

    // 1. Cut the last segment in the middle of its last record.
    let last = segs.last().unwrap();
    let len = std::fs::metadata(last).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(last).unwrap().set_len(len - 7).unwrap();
    // 2. Flip one byte in the middle of the first segment.
    let first = &segs[0];
    let mut bytes = std::fs::read(first).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(first, bytes).unwrap();

    let gw = Gateway::start(&cfg);
    assert!(wait_until(Duration::from_secs(10), || gw.log_text().contains("running")), "{}", gw.log_text());
    let log = gw_terminate(gw);
    assert!(log.contains("queue repaired at start-up"), "{log}");
    // The whole torn record goes (the 7 bytes cut were its end), and exactly
    // one corrupt record is skipped.
    assert!(summary_number(&log, "torn bytes") > 7, "{log}");
    assert!(log.contains("skipped 1 corrupt records"), "{log}");

    let after = queue_dump(&cfg);
    let lost: Vec<u64> = batches(&before).difference(&batches(&after)).copied().collect();
    assert_eq!(lost.len(), 2, "exactly the torn and the corrupt record are gone: {lost:?}");
    assert!(lost.contains(batches(&before).last().unwrap()), "the torn one is the last batch");
    let kept: Vec<_> = before.iter().filter(|r| !lost.contains(&r["batch"].as_u64().unwrap())).collect();
    assert_eq!(kept.len(), after.len());
    assert!(kept.iter().zip(&after).all(|(a, b)| *a == b), "intact records kept, in order");

    // The repair is on disk: the next start finds nothing to repair.
    let gw = Gateway::start(&cfg);
    assert!(wait_until(Duration::from_secs(10), || gw.log_text().contains("running")), "{}", gw.log_text());
    let log = gw_terminate(gw);
    assert!(!log.contains("repaired"), "{log}");
}

#[test]
fn drop_oldest_drops_exactly_the_counted_oldest_readings() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, d, log) = fill(dir.path(), "max_bytes = 8192\nwhen_full = \"drop_oldest\"", 600, Duration::from_secs(20));
    assert_eq!(d.stats().pending, 0, "drop_oldest keeps acking");
    let dropped = summary_number(&log, "readings dropped (queue full)");
    let dump = queue_dump(&cfg);
    assert!(dropped > 0, "the queue should have overflowed");
    assert_eq!(dump.len() as u64 + dropped, 600, "{log}");
    // What is left is the newest, contiguous tail.
    let mut seqs: Vec<u64> = dump.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    seqs.sort(); // resends come after the new readings
    assert_eq!(seqs, (dropped..600).collect::<Vec<_>>());
    let st = queue_status(&cfg);
    assert!(st["bytes"].as_u64().unwrap() <= 8192, "{st}");
    assert_eq!(st["readings"].as_u64().unwrap(), dump.len() as u64);
}

#[test]
fn reject_new_stops_acking_so_the_device_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, d, log) = fill(dir.path(), "max_bytes = 8192\nwhen_full = \"reject_new\"", 600, Duration::from_secs(2));
    assert!(summary_number(&log, "readings refused (queue full)") > 0, "{log}");
    // The queue holds a prefix, each reading once, nothing was dropped. (A
    // batch sealed later may still fit after bigger ones were refused, and
    // then sits beyond a gap: the small last one at shutdown, or, on a busy
    // machine, a device's resend of refused readings, e.g. [0..=78, 599,
    // 519, 520]: not in order, still each once.)
    let seqs: Vec<u64> = queue_dump(&cfg).iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    let prefix = seqs.iter().zip(0..).take_while(|(s, i)| **s == *i).count() as u64;
    assert!(prefix > 0, "the queue holds the first readings: {seqs:?}");
    let mut once = seqs.clone();
    once.sort();
    once.dedup();
    assert_eq!(once.len(), seqs.len(), "each once: {seqs:?}");
    assert!((seqs.len() as u64) < 600);
    // ... and exactly the prefix is acked (the last ack may still be in the
    // device's reader when the gateway exits; a cumulative ack never covers
    // a gap), so the device keeps everything past it.
    assert!(
        wait_until(Duration::from_secs(3), || d.stats().acked_through == Some(prefix - 1)),
        "acked {:?}, queued prefix 0..{prefix}",
        d.stats()
    );
    assert_eq!(d.stats().pending as u64, 600 - prefix, "the device keeps what was refused");
    assert_eq!(summary_number(&log, "readings dropped (queue full)"), 0);
}

#[test]
fn unplugged_dock_resumes_after_replug_without_restart() {
    let log = replug_dock(&[]);
    assert!(!log.contains("termios fallback"), "{log}");
}

/// The serial driver's ENOSYS fallback (plain termios, as under qemu-user),
/// forced in a debug build: the same unplug/replug run, and the fallback is
/// announced once for the port, not once per connection.
#[test]
fn termios_fallback_streams_acks_and_survives_a_replug() {
    let log = replug_dock(&[("EDGE_GATEWAY_FORCE_TERMIOS", "1")]);
    assert_eq!(log.matches("using the plain termios fallback").count(), 1, "{log}");
}

/// 50 readings, the dock unplugged, a new dock at the same path, 50 more:
/// all 100 queued exactly once. Returns the gateway's log.
fn replug_dock(env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("dock0");
    let (mut d, p) = device("wrist-00", Framing::Jsonl, 5, 0.0);
    edge_gateway::demo::sim::point_symlink(&link, &p).unwrap();
    let cfg = write_config(dir.path(), &[Port { name: "dock0", path: &link, framing: "jsonl" }], PIPELINE, STORE);
    let gw = Gateway::start_with_env(&cfg, env);
    for _ in 0..50 {
        d.send_next().unwrap();
    }
    assert!(d.wait_all_acked(Duration::from_secs(20)).unwrap(), "{}", gw.log_text());
    let next = d.next_seq();
    let mut created = d.created().to_vec();
    d.unplug();
    // A new dock appears at the same path.
    let pty = open_pty().unwrap();
    edge_gateway::demo::sim::point_symlink(&link, &pty.slave_path).unwrap();
    let mut c = SimConfig::new("wrist-00", Framing::Jsonl);
    c.first_seq = next;
    c.seed = 6;
    let mut d2 = SimDevice::on_pty(c, pty).unwrap();
    for _ in 0..50 {
        d2.send_next().unwrap();
    }
    assert!(d2.wait_all_acked(Duration::from_secs(30)).unwrap(), "{:?}\n{}", d2.stats(), gw.log_text());
    let log = gw_terminate(gw);
    assert!(log.contains("unplugged") || log.contains("disconnected"), "{log}");
    created.extend_from_slice(d2.created());
    let counts = count_by_key(&queue_dump(&cfg));
    assert_eq!(counts.len(), 100);
    let want: HashMap<_, _> =
        created.iter().map(|r| ((r.device.clone(), r.sensor.clone(), r.seq.unwrap()), 1)).collect();
    assert_eq!(counts, want);
    log
}

#[test]
fn sigterm_seals_the_open_batch_and_acks_it_before_exit() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, p) = device("wrist-00", Framing::Jsonl, 9, 0.0);
    // Batches that would stay open for an hour: only shutdown closes this one.
    let cfg = write_config(
        dir.path(),
        &[Port { name: "dock0", path: &p, framing: "jsonl" }],
        "batch_max_age = \"1h\"\nbatch_max_readings = 100000",
        STORE,
    );
    let gw = Gateway::start(&cfg);
    assert!(wait_until(Duration::from_secs(10), || gw.log_text().contains("connected")), "{}", gw.log_text());
    for _ in 0..20 {
        d.send_next().unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.stats().acked_through, None, "nothing is durable yet, so nothing is acked");
    let log = gw_terminate(gw);
    assert!(log.contains("port dock0: 20 readings"), "{log}");
    assert_exactly_once(std::slice::from_ref(&d), &queue_dump(&cfg));
    assert!(
        wait_until(Duration::from_secs(2), || d.stats().acked_through == Some(19)),
        "the final ack reaches the device before the port closes: {:?}",
        d.stats()
    );
}

#[test]
fn with_open_check_index_a_rotten_record_is_skipped_when_read_not_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _d, _) = fill(dir.path(), "segment_bytes = 4096\nopen_check = \"index\"", 300, Duration::from_secs(20));
    let before = queue_dump(&cfg);
    let segs = segments(&cfg);
    assert!(segs.len() >= 3 && segs[0].with_extension("idx").exists(), "sealed segments are indexed");
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&segs[0], bytes).unwrap();

    let gw = Gateway::start(&cfg);
    assert!(wait_until(Duration::from_secs(10), || gw.log_text().contains("running")), "{}", gw.log_text());
    let log = gw_terminate(gw);
    assert!(!log.contains("queue repaired"), "the index was trusted, the bytes not read: {log}");
    let (code, out, err) = cli(&["queue", "dump", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("fails its CRC; skipped"), "{err}");
    let after: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let lost: Vec<u64> = batches(&before).difference(&batches(&after)).copied().collect();
    assert_eq!(lost.len(), 1, "exactly the rotten record is missing: {lost:?}");
    let in_lost = before.iter().filter(|r| r["batch"].as_u64() == Some(lost[0])).count();
    assert!(in_lost > 0);
    assert_eq!(after.len() + in_lost, before.len(), "exactly its readings are missing");
}

/// The data dir deleted under a running gateway (an operator "resetting"
/// it while the service runs, a cleanup script): fdatasync on the unlinked
/// files still succeeds, so the gateway used to go on acking readings the
/// next start would not find (seen 2026-12-05 with a bench gateway whose
/// temp dir was deleted). Now the first commit after it acks nothing and the
/// gateway exits with 75 (systemd restarts it); the device keeps what was not
/// acked, and the restarted gateway queues it in a fresh data dir, once.
#[test]
fn a_data_dir_deleted_under_the_gateway_gets_no_more_acks() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, p) = device("wrist-00", Framing::Jsonl, 11, 0.0);
    let cfg = write_config(dir.path(), &[Port { name: "dock0", path: &p, framing: "jsonl" }], PIPELINE, STORE);
    let mut gw = Gateway::start(&cfg);
    for _ in 0..20 {
        d.send_next().unwrap();
    }
    assert!(d.wait_all_acked(Duration::from_secs(30)).unwrap(), "{:?}\n{}", d.stats(), gw.log_text());
    let acked = d.stats().acked_through;
    let before = d.created().len();
    std::fs::remove_dir_all(dir.path().join("data")).unwrap();
    let exited = talk_until_exit(&mut gw, &mut d, Duration::from_secs(30));
    let log = gw.log_text();
    assert!(exited, "the gateway went on running with its data dir deleted:\n{log}");
    assert_eq!(gw.child.wait().unwrap().code(), Some(75), "{log}");
    assert!(log.contains("no longer the file this queue opened"), "{log}");
    let after = d.created().len() - before;
    assert!(after > 0);
    let st = d.stats();
    assert_eq!(st.acked_through, acked, "a reading sent after the deletion was acked:\n{log}");
    assert_eq!(st.pending, after, "{st:?}");
    // The restarted gateway starts a fresh data dir and takes what the
    // device still holds; what was acked before the deletion went with it.
    let gw = Gateway::start(&cfg);
    for _ in 0..10 {
        d.send_next().unwrap();
    }
    assert!(d.wait_all_acked(Duration::from_secs(60)).unwrap(), "{:?}\n{}", d.stats(), gw.log_text());
    gw_terminate(gw);
    let dump = queue_dump(&cfg);
    let mut seqs: Vec<u64> = dump.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    seqs.sort(); // resends come after the new readings
    let expected: Vec<u64> = d.created()[before..].iter().map(|r| r.seq.unwrap()).collect();
    assert_eq!(seqs, expected, "the readings sent after the deletion, once each, and nothing else");
}
