//! Commands from the cloud (`[commands]`, issue "Downlink"), end to end: a
//! real Mosquitto (the cloud publishes with `mosquitto_pub -q 2`), the real
//! binary, simulated wearables on PTYs that answer `{"cmd":...}` lines with
//! `{"cmd_ack":...}`, and a subscriber on the reply topic. What a device and
//! the cloud can do around a command: answer, stay away (past or within the
//! ttl), send garbage, send the same command twice; and the gateway is
//! killed in each window between the broker and the reply.

mod common;
use common::mosquitto::*;
use common::*;
use edge_gateway::config::Framing;
use edge_gateway::demo::sim::SimDevice;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

const PIPELINE: &str = "batch_max_age = \"20ms\"";
const STORE: &str = "fsync_interval = \"20ms\"";
const COMMANDS: &str = "gateways/test-gw/commands";
const REPLIES: &str = "gateways/test-gw/commands/reply";

struct Rig {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    broker: Mosquitto,
    replies: Subscriber,
    devices: Vec<SimDevice>,
    cfg: PathBuf,
    metrics_port: u16,
}

/// Two wearables, `wrist-00` and `wrist-01`, each on its dock; `[commands]`
/// with `extra` settings.
fn rig(extra: &str) -> Rig {
    rig_n(2, extra)
}

/// [`rig`] with `n` wearables `wrist-00`...
fn rig_n(n: usize, extra: &str) -> Rig {
    rig_with(n, |_| Framing::Jsonl, extra)
}

/// [`rig_n`] with each wearable's framing.
fn rig_with(n: usize, framing: fn(usize) -> Framing, extra: &str) -> Rig {
    need("mosquitto_pub", "mosquitto-clients");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let certs = make_certs(&dir);
    let broker = Mosquitto::start(&dir.join("broker"), &certs, false);
    let replies = Subscriber::start(broker.plain_port, "replies", REPLIES, &dir.join("replies.out"));
    let metrics_port = free_port();
    let up = format!(
        "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[upstream]\nurl = \"mqtts://localhost:{}\"\nca_file = {:?}\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\nkeep_alive = \"5s\"\n[commands]\nretry_every = \"300ms\"\n{extra}",
        broker.tls_port,
        certs.ca.display().to_string()
    );
    let (devices, cfg) = fleet_with(&dir, n, 40, 0.0, framing, PIPELINE, STORE, &up);
    Rig { _tmp: tmp, dir, broker, replies, devices, cfg, metrics_port }
}

impl Rig {
    /// The cloud sends `msg` on the commands topic, QoS 2.
    fn command(&self, msg: &str) {
        let st = std::process::Command::new("mosquitto_pub")
            .args(["-p", &self.broker.plain_port.to_string(), "-q", "2", "-t", COMMANDS, "-m", msg])
            .status()
            .unwrap();
        assert!(st.success(), "mosquitto_pub failed");
    }

    /// Every reply so far, as JSON.
    fn replies(&self) -> Vec<Value> {
        self.replies.messages().iter().map(|(_, p)| serde_json::from_slice(p).expect("a reply is JSON")).collect()
    }

    fn replies_to(&self, id: &str) -> Vec<Value> {
        self.replies().into_iter().filter(|r| r["id"] == id).collect()
    }

    /// Wait for a reply to `id`; panics with the gateway's log if none.
    fn wait_reply(&self, id: &str, gw: &Gateway, timeout: Duration) -> Value {
        let ok = wait_until(timeout, || !self.replies_to(id).is_empty());
        assert!(ok, "no reply to {id} (replies {:?}); log:\n{}", self.replies(), gw.log_text());
        self.replies_to(id).remove(0)
    }

    /// The devices say something, so the gateway knows where they are; and
    /// the gateway has subscribed (a command published before that has no
    /// subscriber: the broker drops it).
    fn devices_speak(&mut self, gw: &Gateway) {
        let subscribed = wait_until(Duration::from_secs(15), || gw.log_text().contains("subscribed to commands"));
        assert!(subscribed, "the gateway did not subscribe; log:\n{}", gw.log_text());
        stream(&mut self.devices, 3, Duration::from_millis(5));
        all_acked(&mut self.devices, gw);
    }

    fn pending(&self) -> Vec<Value> {
        let (code, out, err) = cli(&["commands", "list", "--config", self.cfg.to_str().unwrap()]);
        assert_eq!(code, 0, "commands list: {err}");
        out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

fn wait_commands(d: &SimDevice, n: usize) -> bool {
    wait_until(Duration::from_secs(15), || d.commands().len() >= n)
}

/// A command reaches the device it names (and no other), once; the device's
/// answer becomes a `delivered` reply with its result, once. The same
/// command sent again by the cloud is acked and not carried out again.
/// Garbage and incomplete commands get a `rejected` reply, never silence.
#[test]
fn a_command_reaches_its_serial_device_and_is_replied_once() {
    let mut r = rig("");
    let gw = Gateway::start(&r.cfg);
    r.devices_speak(&gw);
    r.command(r#"{"id":"c-1","device":"wrist-01","name":"alert","args":{"level":2}}"#);
    assert!(wait_commands(&r.devices[1], 1), "wrist-01 got no command; log:\n{}", gw.log_text());
    let got = r.devices[1].answer_commands(true).unwrap();
    assert_eq!((got[0].id.as_str(), got[0].name.as_str()), ("c-1", "alert"));
    assert_eq!(serde_json::from_str::<Value>(&got[0].args).unwrap(), serde_json::json!({"level": 2}));
    let reply = r.wait_reply("c-1", &gw, Duration::from_secs(15));
    assert_eq!(reply["status"], "delivered", "{reply}");
    assert_eq!(reply["result"], serde_json::json!({"done": "alert"}));
    assert_eq!(reply["device"], "wrist-01");
    assert!(r.devices[0].commands().is_empty() && r.devices[0].commands_received() == 0, "not for wrist-00");
    // The cloud sends it again: acked, not carried out twice.
    r.command(r#"{"id":"c-1","device":"wrist-01","name":"alert","args":{"level":2}}"#);
    // Garbage, and a command without a name.
    r.command("vibrate!");
    r.command(r#"{"id":"c-2","device":"wrist-01"}"#);
    let c2 = r.wait_reply("c-2", &gw, Duration::from_secs(15));
    assert_eq!(c2["status"], "rejected", "{c2}");
    assert!(c2["result"].as_str().unwrap().contains("name"), "{c2}");
    assert!(wait_until(Duration::from_secs(10), || r.replies().iter().any(|x| x["id"].is_null())));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(r.devices[1].commands().is_empty(), "c-1 was sent to the device again: {:?}", r.devices[1].commands());
    assert_eq!(r.replies_to("c-1").len(), 1, "one reply to c-1: {:?}", r.replies());
    let m = fetch_metrics(r.metrics_port);
    assert!(m.contains("edge_gateway_commands_total{status=\"delivered\"} 1"), "{m}");
    assert!(m.contains("edge_gateway_commands_repeated_total 1"), "{m}");
    assert!(m.contains("edge_gateway_commands_total{status=\"rejected\"} 2"), "{m}");
    terminate_ok(gw);
    assert!(r.pending().is_empty());
}

/// A device that is slow: sent again every `retry_every` while its ttl
/// lasts (`commands list` shows the attempts), delivered when it answers;
/// one that never answers expires with a reply; a command for a device
/// this gateway never heard of is rejected at once.
#[test]
fn a_command_waits_for_its_device_until_the_ttl_and_then_expires() {
    let mut r = rig("");
    let gw = Gateway::start(&r.cfg);
    r.devices_speak(&gw);
    r.command(r#"{"id":"late","device":"wrist-00","name":"rate","args":{"hz":5},"ttl":"30s"}"#);
    r.command(r#"{"id":"ghost","device":"wrist-99","name":"alert","ttl":"2s"}"#);
    r.command(r#"{"id":"mute","device":"wrist-01","name":"alert","ttl":"2s"}"#);
    // wrist-00 hears it but does not answer for a while.
    assert!(wait_until(Duration::from_secs(15), || r.devices[0].commands_received() >= 3), "no retries");
    let pending = r.pending();
    let late = pending.iter().find(|p| p["id"] == "late").expect("late is pending");
    assert!(late["attempts"].as_u64().unwrap() >= 2, "{late}");
    assert_eq!(late["device"], "wrist-00");
    r.devices[0].answer_commands(true).unwrap();
    assert_eq!(r.wait_reply("late", &gw, Duration::from_secs(15))["status"], "delivered");
    let ghost = r.wait_reply("ghost", &gw, Duration::from_secs(15));
    assert_eq!(ghost["status"], "rejected", "{ghost}");
    assert!(ghost["result"].as_str().unwrap().contains("unknown device"), "{ghost}");
    let mute = r.wait_reply("mute", &gw, Duration::from_secs(15));
    assert_eq!(mute["status"], "expired", "{mute}");
    assert_eq!(mute["result"], "the device did not answer");
    assert!(r.devices[1].commands_received() >= 2, "retried until the ttl");
    std::thread::sleep(Duration::from_millis(800));
    let once = ["late", "ghost", "mute"].map(|id| r.replies_to(id).len());
    assert_eq!(once, [1, 1, 1], "{:?}", r.replies());
    terminate_ok(gw);
    assert!(r.pending().is_empty());
}

/// The gateway dies in each window of a command's way: after the command is
/// on disk but before the broker got our PUBREC (the broker sends it again:
/// one command), after the device answered but before anything of it is on
/// disk (the command goes to the device again: at least once to the device,
/// which acts on each id once), after the reply's note but before the reply
/// is in the queue, and with the reply appended but not synced (cut back,
/// as by a power cut). Each time: one reply upstream.
/// Planted: without the note's check at start the reply of the second and
/// third crash is lost.
#[test]
fn commands_and_replies_are_exactly_once_across_crashes_in_each_window() {
    let mut r = rig("");
    let points = ["after-command-accepted", "after-device-answer", "after-reply-noted", "after-reply-appended"];
    for (i, point) in points.iter().enumerate() {
        let id = format!("k-{i}");
        let mut gw = Gateway::start_with_env(&r.cfg, &[("EDGE_GATEWAY_CRASH_AT", point)]);
        r.devices_speak(&gw);
        r.command(&format!(r#"{{"id":"{id}","device":"wrist-00","name":"alert"}}"#));
        if *point != "after-command-accepted" {
            assert!(wait_commands(&r.devices[0], 1), "{point}: no command; log:\n{}", gw.log_text());
            r.devices[0].answer_commands(true).unwrap();
        }
        let crashed = wait_until(Duration::from_secs(15), || gw.child.try_wait().unwrap().is_some());
        assert!(crashed && gw.log_text().contains("crash point"), "{point}: no crash; log:\n{}", gw.log_text());
        let gw = Gateway::start(&r.cfg);
        r.devices_speak(&gw);
        if *point == "after-command-accepted" || *point == "after-device-answer" {
            assert!(wait_commands(&r.devices[0], 1), "{point}: no command after the restart; log:\n{}", gw.log_text());
            let got = r.devices[0].answer_commands(true).unwrap();
            assert_eq!(got.len(), 1, "{point}: one command: {got:?}");
            assert_eq!(got[0].id, id);
        }
        let reply = r.wait_reply(&id, &gw, Duration::from_secs(20));
        assert_eq!(reply["status"], "delivered", "{point}: {reply}");
        std::thread::sleep(Duration::from_millis(1000));
        assert_eq!(r.replies_to(&id).len(), 1, "{point}: one reply: {:?}", r.replies());
        assert!(r.devices[0].commands().is_empty(), "{point}: carried out again: {:?}", r.devices[0].commands());
        terminate_ok(gw);
        let _ = &r.dir;
    }
}

/// `check-config` names the key of a bad `[commands]` section.
#[test]
fn bad_commands_settings_name_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = "[gateway]\nid = \"gw\"\ndata_dir = \"/tmp/x\"\n";
    let up = "[upstream]\nurl = \"mqtt://localhost\"\nallow_plaintext = true\n";
    for (text, key) in [
        (format!("{base}[commands]\n"), "commands"),
        (format!("{base}{up}[commands]\ntopic = \"a/#\"\n"), "commands.topic"),
        (format!("{base}{up}[commands]\nretry_every = \"0s\"\n"), "commands.retry_every"),
    ] {
        let p = dir.path().join("c.toml");
        std::fs::write(&p, &text).unwrap();
        let (code, out, err) = cli(&["check-config", p.to_str().unwrap()]);
        assert_ne!(code, 0, "{text}");
        assert!(format!("{out}{err}").contains(&format!("`{key}`")), "{key}: {out}{err}");
    }
    let _ = Path::new("");
}

/// A LAN device through the embedded broker: it published a reading (so the
/// gateway knows it is on the LAN), gets the command on `commands/{device}`
/// and answers on `commands/{device}/ack`; the reply carries its result.
#[test]
fn a_command_reaches_a_lan_device_over_the_embedded_broker() {
    need("mosquitto_sub", "mosquitto-clients");
    let lan = free_port();
    let r = rig(&format!("[broker]\nenabled = true\ntcp = \"127.0.0.1:{lan}\"\nallow_anonymous = true\n"));
    let gw = Gateway::start(&r.cfg);
    let ready = wait_until(Duration::from_secs(20), || {
        let l = gw.log_text();
        l.contains("broker: ingest") && l.contains("subscribed to commands")
    });
    assert!(ready, "log:\n{}", gw.log_text());
    let port = lan.to_string();
    // The device listens for its commands (a fresh client per try: retries
    // every 300 ms mean one arrives whenever it is subscribed).
    let mut sub = std::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-t", "commands/lan-01", "-C", "1", "-W", "20"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let publish = |topic: &str, msg: &str| {
        let st = std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-t", topic, "-m", msg])
            .status()
            .unwrap();
        assert!(st.success(), "mosquitto_pub to the gateway's broker failed");
    };
    publish("sensors/lan-01/heart_rate", r#"{"seq":0,"value":71}"#);
    r.command(r#"{"id":"c-lan","device":"lan-01","name":"alert","args":{"level":3}}"#);
    let mut got = String::new();
    std::io::Read::read_to_string(sub.stdout.as_mut().unwrap(), &mut got).unwrap();
    let _ = sub.wait();
    let cmd: Value =
        serde_json::from_str(got.trim()).unwrap_or_else(|e| panic!("{e}: {got:?}; log:\n{}", gw.log_text()));
    assert_eq!(cmd, serde_json::json!({"id": "c-lan", "name": "alert", "args": {"level": 3}}));
    publish("commands/lan-01/ack", r#"{"id":"c-lan","ok":true,"result":"buzzed"}"#);
    let reply = r.wait_reply("c-lan", &gw, Duration::from_secs(15));
    assert_eq!((reply["status"].as_str(), reply["result"].as_str()), (Some("delivered"), Some("buzzed")), "{reply}");
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(r.replies_to("c-lan").len(), 1);
    terminate_ok(gw);
}

#[path = "common/fake_bluez.rs"]
mod fake_bluez;

/// A BLE wearable (the fake BlueZ on a private bus): `alert` is a write of
/// the Immediate Alert Service's Alert Level, seen by BlueZ, and replied
/// `delivered`; a command the device cannot carry out (no such service on
/// the second strap, an unknown name) is replied `failed`, not dropped.
#[test]
fn an_alert_for_a_ble_wearable_is_an_immediate_alert_write() {
    use fake_bluez::{Bus, CharSpec, FakeBluez};
    let bus = Bus::start();
    let mut fake = FakeBluez::start(&bus.address);
    let hr = CharSpec { service: 0x180D, uuid: 0x2A37, flags: &["notify"], value: vec![] };
    let ias = CharSpec { service: 0x1802, uuid: 0x2A06, flags: &["write-without-response"], value: vec![] };
    let cts = CharSpec { service: 0x1805, uuid: 0x2A2B, flags: &["read", "write"], value: vec![] };
    let strap = fake.add_gatt_device("C0:FF:EE:00:00:07", "Strap 7", vec![hr.clone(), ias, cts]);
    fake.add_gatt_device("C0:FF:EE:00:00:08", "Strap 8", vec![hr]);
    let ble = "[[ble]]\nname = \"s7\"\nmatch = { name_prefix = \"Strap 7\" }\nprofile = \"heart_rate\"\ndevice = \"wrist-07\"\n\
               [[ble]]\nname = \"s8\"\nmatch = { name_prefix = \"Strap 8\" }\nprofile = \"heart_rate\"\ndevice = \"wrist-08\"\n\
               [ble_scan]\nhealth_interval = \"200ms\"\n";
    let r = rig(ble);
    let gw = Gateway::start_with_env(&r.cfg, &[("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)]);
    for addr in ["C0:FF:EE:00:00:07", "C0:FF:EE:00:00:08"] {
        assert!(fake.wait_notifying(addr, 0x2A37, Duration::from_secs(20)), "{}", gw.log_text());
    }
    assert!(wait_until(Duration::from_secs(15), || gw.log_text().contains("subscribed to commands")));
    r.command(r#"{"id":"b-1","device":"wrist-07","name":"alert","args":{"level":1}}"#);
    let reply = r.wait_reply("b-1", &gw, Duration::from_secs(15));
    assert_eq!(reply["status"], "delivered", "{reply}");
    assert_eq!(reply["result"], serde_json::json!({"alert_level": 1}));
    let alerts = |s: &fake_bluez::DevStats| -> Vec<Vec<u8>> {
        s.writes.lock().unwrap().iter().filter(|w| w.0 == 0x2A06).map(|w| w.1.clone()).collect()
    };
    assert_eq!(alerts(&strap), [vec![1u8]], "one Alert Level write");
    // Time for the wearable: the Current Time Service's Current Time, written at connect.
    let times: Vec<Vec<u8>> =
        strap.writes.lock().unwrap().iter().filter(|w| w.0 == 0x2A2B).map(|w| w.1.clone()).collect();
    let now = edge_gateway::reading::now_ms();
    let want = edge_gateway::source::ble::current_time(now);
    assert!(
        times.len() == 1 && times[0].len() == 10 && times[0][..4] == want[..4],
        "one Current Time write for today ({want:?}): {times:?}"
    );
    r.command(r#"{"id":"b-2","device":"wrist-08","name":"alert"}"#);
    r.command(r#"{"id":"b-3","device":"wrist-07","name":"rate"}"#);
    for id in ["b-2", "b-3"] {
        let reply = r.wait_reply(id, &gw, Duration::from_secs(15));
        assert_eq!(reply["status"], "failed", "{reply}");
    }
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(alerts(&strap).len(), 1, "no second Alert Level write");
    assert_eq!(r.replies().len(), 3, "{:?}", r.replies());
    terminate_ok(gw);
}

/// 1,000 commands to 20 wearables while they send 20,000 readings: every
/// command is replied `delivered` exactly once, and every reading arrives
/// upstream exactly once (commands and readings share the port, the queue
/// and the uplink).
#[test]
fn a_thousand_commands_to_twenty_devices_beside_twenty_thousand_readings() {
    let mut r = rig_n(20, "");
    let readings =
        Subscriber::start(r.broker.plain_port, "readings", "gateways/test-gw/readings", &r.dir.join("r.out"));
    let gw = Gateway::start(&r.cfg);
    r.devices_speak(&gw);
    let lines: String = (0..1000)
        .map(|i| {
            format!(
                "{{\"id\":\"m-{i}\",\"device\":\"wrist-{:02}\",\"name\":\"rate\",\"args\":{{\"i\":{i}}}}}\n",
                i % 20
            )
        })
        .collect();
    let mut cloud = std::process::Command::new("mosquitto_pub")
        .args(["-p", &r.broker.plain_port.to_string(), "-q", "2", "-t", COMMANDS, "-l"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(cloud.stdin.as_mut().unwrap(), lines.as_bytes()).unwrap();
    drop(cloud.stdin.take());
    let mut answered = 0;
    for _ in 0..997 {
        stream(&mut r.devices, 1, Duration::from_millis(2));
        for d in r.devices.iter_mut() {
            answered += d.answer_commands(true).unwrap().len();
        }
    }
    assert!(cloud.wait().unwrap().success());
    let done = wait_until(Duration::from_secs(60), || {
        for d in r.devices.iter_mut() {
            answered += d.answer_commands(true).unwrap().len();
        }
        r.replies().len() >= 1000
    });
    assert!(done, "{} replies, {answered} answers; log:\n{}", r.replies().len(), gw.log_text());
    all_acked(&mut r.devices, &gw);
    let want: usize = r.devices.iter().map(|d| d.created().len()).sum();
    assert_eq!(want, 20_000);
    wait_received(&readings, Duration::from_secs(60), |g| g.readings.len() >= want);
    std::thread::sleep(Duration::from_millis(1000));
    terminate_ok(gw);
    let replies = r.replies();
    let mut ids: Vec<&str> = replies.iter().map(|x| x["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((replies.len(), ids.len()), (1000, 1000), "each command replied once");
    assert!(replies.iter().all(|x| x["status"] == "delivered"), "all delivered");
    let got = decode_all(&readings.messages());
    assert_eq!(missing_and_doubled(&r.devices, &got), (20_000, 0, 0), "readings: (expected, missing, doubled)");
    eprintln!("1,000 commands ({answered} answers, retries included) beside 20,000 readings: all once");
}

/// The cobs framing carries the same: a `Command` frame to the device, its
/// `CommandAck` frame back (with a JSON result), and a `Time` frame at
/// connect (docs/firmware-protocol.md, `wire::frame`).
#[test]
fn a_cobs_device_gets_commands_and_the_time_as_frames() {
    let mut r = rig_with(2, |i| if i == 1 { Framing::Cobs } else { Framing::Jsonl }, "");
    let gw = Gateway::start(&r.cfg);
    r.devices_speak(&gw);
    for d in &r.devices {
        let told = d.time_told().expect("told the time");
        assert!(told.abs_diff(edge_gateway::reading::now_ms()) < 10_000, "{told}");
    }
    r.command(r#"{"id":"f-1","device":"wrist-01","name":"rate","args":{"hz":25}}"#);
    assert!(wait_commands(&r.devices[1], 1), "no command frame; log:\n{}", gw.log_text());
    let got = r.devices[1].answer_commands(true).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&got[0].args).unwrap(), serde_json::json!({"hz": 25}));
    let reply = r.wait_reply("f-1", &gw, Duration::from_secs(15));
    assert_eq!(reply["status"], "delivered", "{reply}");
    assert_eq!(reply["result"], serde_json::json!({"done": "rate"}));
    assert_eq!(r.devices[1].stats().bad_acks, 0, "every frame from the gateway understood");
    terminate_ok(gw);
}

/// A `custom`-profile BLE device with a `command_characteristic`: any
/// command is written there in the entry's framing, and the device's answer
/// comes back on its notify characteristic like its readings.
#[test]
fn a_custom_ble_device_gets_any_command_on_its_command_characteristic() {
    use fake_bluez::{Bus, CharSpec, FakeBluez};
    const ADDR: &str = "C0:FF:EE:00:00:09";
    let bus = Bus::start();
    let mut fake = FakeBluez::start(&bus.address);
    let notify = CharSpec { service: 0xFFE0, uuid: 0xFFE1, flags: &["notify"], value: vec![] };
    let write = CharSpec { service: 0xFFE0, uuid: 0xFFE2, flags: &["write"], value: vec![] };
    let dongle = fake.add_gatt_device(ADDR, "Dongle 9", vec![notify, write]);
    let ble = "[[ble]]\nname = \"d9\"\nmatch = { name_prefix = \"Dongle 9\" }\nprofile = \"custom\"\ndevice = \"wrist-09\"\n\
               service = \"ffe0\"\ncharacteristic = \"ffe1\"\ncommand_characteristic = \"ffe2\"\n\
               [ble_scan]\nhealth_interval = \"200ms\"\n";
    let r = rig(ble);
    let gw = Gateway::start_with_env(&r.cfg, &[("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)]);
    assert!(fake.wait_notifying(ADDR, 0xFFE1, Duration::from_secs(20)), "{}", gw.log_text());
    assert!(wait_until(Duration::from_secs(15), || gw.log_text().contains("subscribed to commands")));
    r.command(r#"{"id":"d-1","device":"wrist-09","name":"rate","args":{"hz":50}}"#);
    let written = || -> Vec<Vec<u8>> {
        dongle.writes.lock().unwrap().iter().filter(|w| w.0 == 0xFFE2).map(|w| w.1.clone()).collect()
    };
    assert!(wait_until(Duration::from_secs(15), || !written().is_empty()), "no command write; log:\n{}", gw.log_text());
    let line = written()[0].clone();
    let cmd = edge_gateway::wire::parse_command_jsonl(line.strip_suffix(b"\n").unwrap()).expect("a cmd line");
    assert_eq!((cmd.id.as_str(), cmd.device.as_str(), cmd.name.as_str()), ("d-1", "wrist-09", "rate"));
    let ack = edge_gateway::route::CommandAck {
        device: "wrist-09".into(),
        id: "d-1".into(),
        ok: true,
        result: Some(serde_json::json!(50)),
    };
    assert!(fake.notify(ADDR, 0xFFE1, &edge_gateway::wire::encode_command_ack_jsonl(&ack)));
    let reply = r.wait_reply("d-1", &gw, Duration::from_secs(15));
    assert_eq!((reply["status"].as_str(), reply["result"].as_u64()), (Some("delivered"), Some(50)), "{reply}");
    terminate_ok(gw);
}

/// A wearable taken off its dock (the dock's link gone, as udev removes it):
/// a command for it with a short ttl expires; one with a longer ttl is
/// delivered when the wearable is docked again (a new PTY behind the same
/// link) before its ttl runs out.
#[test]
fn a_device_away_past_the_ttl_expires_and_one_back_in_time_gets_its_command() {
    use edge_gateway::demo::sim::{SimConfig, open_pty, point_symlink};
    let mut r = rig_n(1, "");
    let link = r.dir.join("dock0-link");
    let slave = r.devices[0].slave_path().unwrap().to_path_buf();
    point_symlink(&link, &slave).unwrap();
    let text = std::fs::read_to_string(&r.cfg).unwrap();
    std::fs::write(
        &r.cfg,
        text.replace(&format!("{:?}", slave.display().to_string()), &format!("{:?}", link.display().to_string())),
    )
    .unwrap();
    let gw = Gateway::start(&r.cfg);
    r.devices_speak(&gw);
    // Off the dock.
    std::fs::remove_file(&link).unwrap();
    let sent = r.devices.remove(0).unplug().sent_unique;
    assert!(wait_until(Duration::from_secs(10), || gw.log_text().contains("unplugged")), "{}", gw.log_text());
    r.command(r#"{"id":"gone","device":"wrist-00","name":"alert","ttl":"1s"}"#);
    r.command(r#"{"id":"back","device":"wrist-00","name":"alert","ttl":"60s"}"#);
    let gone = r.wait_reply("gone", &gw, Duration::from_secs(15));
    assert_eq!(gone["status"], "expired", "{gone}");
    // Docked again, before "back" expires.
    let pty = open_pty().unwrap();
    let new_slave = pty.slave_path.clone();
    let mut cfg = SimConfig::new("wrist-00", Framing::Jsonl);
    cfg.first_seq = sent;
    let mut d = SimDevice::on_pty(cfg, pty).unwrap();
    point_symlink(&link, &new_slave).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || !d.commands().is_empty()),
        "no command after the redock; log:\n{}",
        gw.log_text()
    );
    let got = d.answer_commands(true).unwrap();
    assert_eq!(got.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), ["back"], "only the live command");
    assert_eq!(r.wait_reply("back", &gw, Duration::from_secs(15))["status"], "delivered");
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!((r.replies_to("gone").len(), r.replies_to("back").len()), (1, 1), "{:?}", r.replies());
    terminate_ok(gw);
}

/// The broker loses the gateway's session (restarted without its database):
/// the uplink subscribes again on the new session, and the next command
/// arrives and is replied once.
#[test]
fn after_a_lost_session_the_commands_subscription_is_made_again() {
    let mut r = rig("");
    let gw = Gateway::start(&r.cfg);
    r.devices_speak(&gw);
    r.broker.stop();
    let _ = std::fs::remove_file(r.broker.db());
    r.broker.restart();
    let again = wait_until(Duration::from_secs(20), || gw.log_text().matches("subscribed to commands").count() >= 2);
    assert!(again, "no second subscription; log:\n{}", gw.log_text());
    let new_sessions =
        gw.log_text().lines().filter(|l| l.contains("connected (MQTT") && l.contains("session new")).count();
    assert!(new_sessions >= 2, "the broker really lost the session; log:\n{}", gw.log_text());
    // The replies subscriber lost its session too: it subscribes again on reconnect.
    std::thread::sleep(Duration::from_secs(2));
    r.command(r#"{"id":"s-1","device":"wrist-00","name":"alert"}"#);
    assert!(wait_commands(&r.devices[0], 1), "no command after the lost session; log:\n{}", gw.log_text());
    r.devices[0].answer_commands(true).unwrap();
    assert_eq!(r.wait_reply("s-1", &gw, Duration::from_secs(15))["status"], "delivered");
    terminate_ok(gw);
}
