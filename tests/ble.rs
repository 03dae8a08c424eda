//! BLE end to end: the real gateway binary, btleplug inside it, talking to a
//! fake BlueZ (zbus, this process) over a private `dbus-daemon`; every
//! scenario ends with the readings in the queue exactly once.

mod common;
#[path = "common/fake_bluez.rs"]
mod fake_bluez;

use common::{Gateway, queue_dump, summary_number, wait_until};
use edge_gateway::source::ble::bthome;
use fake_bluez::{Bus, CharSpec, FakeBluez};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

const HR_ADDR: &str = "C0:FF:EE:00:00:01";
const THERMO_ADDR: &str = "C0:FF:EE:00:00:02";
const KEY: &str = "231d39c1d7cc1ab1aee224cd096db932";

fn hr_chars() -> Vec<CharSpec> {
    vec![CharSpec { service: 0x180D, uuid: 0x2A37, flags: &["notify"], value: vec![] }]
}

fn write_config(dir: &Path, ble: &str, scan: &str) -> PathBuf {
    let s = format!(
        "[gateway]\nid = \"test-gw\"\ndata_dir = {:?}\n\n{ble}\n\n[ble_scan]\nhealth_interval = \"200ms\"\n{scan}\n",
        dir.join("data").display().to_string()
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, s).unwrap();
    path
}

fn start(cfg: &Path, bus: &Bus) -> Gateway {
    let gw = Gateway::start_with_env(cfg, &[("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)]);
    assert!(wait_until(Duration::from_secs(20), || gw.log_text().contains("running")), "{}", gw.log_text());
    gw
}

/// Let in-flight D-Bus signals land, stop the gateway, return its whole log
/// (with the per-port counters it prints at exit).
fn stop(gw: Gateway) -> String {
    std::thread::sleep(Duration::from_millis(700));
    let path = gw.log.clone();
    let (code, _) = gw.terminate();
    let log = std::fs::read_to_string(path).unwrap_or_default();
    assert_eq!(code, Some(0), "{log}");
    log
}

/// A heart-rate notification: u16 HR `hr`, and RR intervals when `i` is even.
fn hr_value(hr: u16, i: usize) -> Vec<u8> {
    let mut v = vec![if i.is_multiple_of(2) { 0x11 } else { 0x01 }];
    v.extend_from_slice(&hr.to_le_bytes());
    if i.is_multiple_of(2) {
        v.extend_from_slice(&[0x00, 0x04, 0x00, 0x02]); // 1 s, 0.5 s
    }
    v
}

fn send_hr(fake: &FakeBluez, addr: &str, values: std::ops::Range<u16>) {
    for hr in values {
        assert!(fake.notify(addr, 0x2A37, &hr_value(hr, hr as usize)), "not notifying at {hr}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `value` → how many `sensor` readings of `device` carry it.
fn values_of(dump: &[serde_json::Value], device: &str, sensor: &str) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in dump.iter().filter(|r| r["device"] == device && r["sensor"] == sensor) {
        *m.entry(r["value"].to_string()).or_insert(0) += 1;
    }
    m
}

fn assert_hr_exactly_once(dump: &[serde_json::Value], device: &str, values: std::ops::Range<u16>) {
    let hr = values_of(dump, device, "heart_rate");
    let n = values.len();
    for v in values.clone() {
        assert_eq!(hr.get(&format!("{v}.0")), Some(&1), "heart_rate {v} of {device}: {hr:?}");
    }
    assert_eq!(hr.len(), n, "{hr:?}");
    let rr: Vec<_> = dump.iter().filter(|r| r["device"] == device && r["sensor"] == "rr_interval").collect();
    assert_eq!(rr.len(), values.filter(|v| v % 2 == 0).count());
    assert!(rr.iter().all(|r| r["value"] == serde_json::json!([1.0, 0.5])));
}

#[test]
fn heart_rate_strap_100_notifications_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::start();
    let mut fake = FakeBluez::start(&bus.address);
    let stats = fake.add_gatt_device(HR_ADDR, "Polar H10 1234", hr_chars());
    let ble = "[[ble]]\nname = \"strap\"\nmatch = { name_prefix = \"Polar H10\" }\nprofile = \"heart_rate\"\n";
    let cfg = write_config(dir.path(), ble, "");
    let gw = start(&cfg, &bus);
    assert!(fake.wait_notifying(HR_ADDR, 0x2A37, Duration::from_secs(20)), "{}", gw.log_text());
    send_hr(&fake, HR_ADDR, 1000..1100);
    // Malformed: counted and skipped.
    assert!(fake.notify(HR_ADDR, 0x2A37, &[0x01, 0x50]));
    let log = stop(gw);
    let dump = queue_dump(&cfg);
    assert_hr_exactly_once(&dump, HR_ADDR, 1000..1100);
    assert_eq!(dump.len(), 150, "100 HR + 50 RR readings");
    assert_eq!(stats.connects.load(Ordering::SeqCst), 1);
    assert!(log.contains("port ble:strap: 150 readings, 1 malformed, 0 reconnects"), "{log}");
}

#[test]
fn health_thermometer_indications() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::start();
    let mut fake = FakeBluez::start(&bus.address);
    let chars = vec![CharSpec { service: 0x1809, uuid: 0x2A1C, flags: &["indicate"], value: vec![] }];
    fake.add_gatt_device(THERMO_ADDR, "Thermo", chars);
    let ble = format!(
        "[[ble]]\nname = \"thermo\"\nmatch = {{ address = \"{THERMO_ADDR}\", service = \"1809\" }}\ndevice = \"thermo-1\"\nprofile = \"health_thermometer\"\n"
    );
    let cfg = write_config(dir.path(), &ble, "");
    let gw = start(&cfg, &bus);
    assert!(fake.wait_notifying(THERMO_ADDR, 0x2A1C, Duration::from_secs(20)), "{}", gw.log_text());
    // 36.4 °C; 98.6 °F with a time stamp; NaN (no reading); truncated (malformed).
    assert!(fake.notify(THERMO_ADDR, 0x2A1C, &[0x00, 0x6C, 0x01, 0x00, 0xFF]));
    let mut f = vec![0x07, 0xDA, 0x03, 0x00, 0xFF, 0xEA, 0x07, 11, 26, 12, 30, 15, 0x02];
    assert!(fake.notify(THERMO_ADDR, 0x2A1C, &f));
    assert!(fake.notify(THERMO_ADDR, 0x2A1C, &[0x00, 0xFF, 0xFF, 0x7F, 0x00]));
    assert!(fake.notify(THERMO_ADDR, 0x2A1C, &[0x00, 0x6C]));
    // The same time-stamped measurement again (a re-sent indication): dropped by dedup.
    f[1] = 0xDA;
    assert!(fake.notify(THERMO_ADDR, 0x2A1C, &f));
    stop(gw);
    let dump = queue_dump(&cfg);
    let temps: Vec<f64> = dump.iter().map(|r| r["value"].as_f64().unwrap()).collect();
    assert_eq!(dump.len(), 2, "{dump:?}");
    assert!((temps[0] - 36.4).abs() < 1e-9 && (temps[1] - 37.0).abs() < 1e-9, "{temps:?}");
    assert!(dump.iter().all(|r| r["device"] == "thermo-1" && r["sensor"] == "body_temp"));
    assert_eq!(dump[1]["ts"], 1_795_696_215_000u64);
}

#[test]
fn three_bthome_sensors_one_encrypted_dedup_by_packet_id() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::start();
    let mut fake = FakeBluez::start(&bus.address);
    let addrs = ["A4:C1:38:00:00:01", "A4:C1:38:00:00:02", "A4:C1:38:00:00:03"];
    let key = bthome::parse_bindkey(KEY).unwrap();
    let mac3 = edge_gateway::source::ble::parse_address(addrs[2]).unwrap();
    let advert = |sensor: usize, pid: u8| -> Vec<u8> {
        let temp = (2000 + pid as i16 * 10 + sensor as i16).to_le_bytes();
        let objects = [0x00, pid, 0x01, 90 - pid, 0x02, temp[0], temp[1]];
        if sensor == 2 {
            bthome::encrypt(&objects, mac3, &key, 100 + pid as u32)
        } else {
            let mut v = vec![0x40];
            v.extend_from_slice(&objects);
            v
        }
    };
    for (i, a) in addrs.iter().enumerate() {
        fake.add_advertiser(a, &format!("ATC_{i}"), advert(i, 0));
    }
    let ble = format!(
        "[[ble]]\nname = \"env1\"\nmatch = {{ address = \"{}\" }}\nprofile = \"bthome\"\n\n\
         [[ble]]\nname = \"env2\"\nmatch = {{ address = \"{}\" }}\ndevice = \"env-2\"\nprofile = \"bthome\"\nrssi_interval = \"1h\"\n\n\
         [[ble]]\nname = \"env3\"\nmatch = {{ address = \"{}\" }}\nprofile = \"bthome\"\nbindkey = \"{KEY}\"\n",
        addrs[0], addrs[1], addrs[2]
    );
    let cfg = write_config(dir.path(), &ble, "");
    let gw = start(&cfg, &bus);
    assert!(
        wait_until(Duration::from_secs(20), || gw.log_text().matches(": found ").count() == 3),
        "{}",
        gw.log_text()
    );
    for pid in 1..=10u8 {
        for (i, a) in addrs.iter().enumerate() {
            // Every advert twice: BlueZ passes repeats on; the packet id dedups them.
            assert!(fake.advertise(a, advert(i, pid)), "the adapter is not scanning");
            assert!(fake.advertise(a, advert(i, pid)), "the adapter is not scanning");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Sensor 3 with a plaintext advert (downgrade) and garbage: skipped, counted.
    assert!(fake.advertise(addrs[2], vec![0x40, 0x00, 77, 0x01, 5]), "the adapter is not scanning");
    assert!(fake.advertise(addrs[0], vec![0x40, 0x02, 0x01]), "the adapter is not scanning");
    let log = stop(gw);
    assert!(log.contains("port ble:env1: ") && log.contains(" 1 malformed"), "{log}");
    assert!(log.contains("plaintext advert from a device with a bindkey"), "{log}");
    let dump = queue_dump(&cfg);
    // A BTHome packet id is not a seq (it wraps): readings carry none, and
    // each advert's values (which encode its packet id here) name it.
    let by_key = count_by_value(&dump);
    let devices = [addrs[0], "env-2", addrs[2]];
    for (i, d) in devices.iter().enumerate() {
        for pid in 1..=10u64 {
            let temp = format!("{}", (2000 + pid as i64 * 10 + i as i64) as f64 / 100.0);
            for (sensor, value) in [("battery", format!("{}", 90 - pid)), ("temperature", temp)] {
                let k = (d.to_string(), sensor.to_string(), value);
                assert_eq!(by_key.get(&k), Some(&1), "{k:?} (sensor {i}) in {by_key:?}");
            }
        }
    }
    assert!(dump.iter().all(|r| r["seq"].is_null()), "no BTHome reading carries a seq");
    assert!(by_key.contains_key(&(addrs[2].to_string(), "temperature".to_string(), "20.42".to_string())));
    assert!(
        !by_key.contains_key(&(addrs[2].to_string(), "battery".to_string(), "5".to_string())),
        "downgraded advert was accepted"
    );
    // Only env-2 asked for rssi, at most once an hour.
    let rssi: Vec<_> = dump.iter().filter(|r| r["sensor"] == "rssi").collect();
    assert_eq!(rssi.len(), 1, "{rssi:?}");
    assert_eq!(rssi[0]["device"], "env-2");
}

/// Encrypted BTHome frames recorded off the air and sent again (issue 19,
/// M5): refused as long as their counter is not newer than the last one
/// accepted, also after the gateway was killed (the counters are saved every
/// `counter_save_interval`) and restarted. These adverts have no packet id,
/// so dedup alone would store a replay again.
#[test]
fn encrypted_bthome_replays_are_refused_across_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::start();
    let mut fake = FakeBluez::start(&bus.address);
    let addr = "A4:C1:38:00:00:09";
    let key = bthome::parse_bindkey(KEY).unwrap();
    let mac = edge_gateway::source::ble::parse_address(addr).unwrap();
    // Counter c carries temperature 20.00 + c/100, so each value names its frame.
    let adv = |c: u32| {
        bthome::encrypt(
            &{
                let t = (2000 + c as i16).to_le_bytes();
                [0x02, t[0], t[1]]
            },
            mac,
            &key,
            c,
        )
    };
    fake.add_advertiser(addr, "ATC_9", adv(10));
    let ble = format!(
        "[[ble]]\nname = \"env9\"\nmatch = {{ address = \"{addr}\" }}\nprofile = \"bthome\"\nbindkey = \"{KEY}\"\n"
    );
    let cfg = write_config(dir.path(), &ble, "counter_save_interval = \"200ms\"");
    let temps = |cfg: &Path| -> HashMap<String, usize> {
        count_by_value(&queue_dump(cfg))
            .into_iter()
            .filter(|((d, ..), _)| d == addr)
            .map(|((_, _, v), n)| (v, n))
            .collect()
    };
    let gw = start(&cfg, &bus);
    assert!(wait_until(Duration::from_secs(20), || gw.log_text().contains(": found ")), "{}", gw.log_text());
    for c in [11, 12, 12, 11, 10] {
        assert!(fake.advertise(addr, adv(c)), "the adapter is not scanning"); // 12 again: a repeat; 11 and 10: replays
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(wait_until(Duration::from_secs(10), || temps(&cfg).contains_key("20.12")), "{}", gw.log_text());
    assert!(
        wait_until(Duration::from_secs(5), || gw.log_text().matches("refused as a replay").count() >= 1),
        "{}",
        gw.log_text()
    );
    std::thread::sleep(Duration::from_millis(600)); // past counter_save_interval
    gw.kill9();
    let gw = start(&cfg, &bus);
    assert!(wait_until(Duration::from_secs(20), || gw.log_text().contains(": found ")), "{}", gw.log_text());
    assert!(fake.advertise(addr, adv(12)), "the adapter is not scanning"); // recorded before the kill
    assert!(fake.advertise(addr, adv(11)), "the adapter is not scanning");
    assert!(fake.advertise(addr, adv(13)), "the adapter is not scanning");
    assert!(wait_until(Duration::from_secs(10), || temps(&cfg).contains_key("20.13")), "{}", gw.log_text());
    let log = stop(gw);
    let t = temps(&cfg);
    for v in ["20.11", "20.12", "20.13"] {
        assert_eq!(t.get(v), Some(&1), "{v}: {t:?}\n{log}");
    }
    assert!(t.values().all(|n| *n == 1), "{t:?}");
    assert!(summary_number(&log, "BTHome replays refused") >= 2, "{log}");
    assert!(log.contains("not newer than 12: refused as a replay"), "the first replay after the kill is logged: {log}");
}

fn hr_gateway(
    extra: &str,
    scan: &str,
) -> (tempfile::TempDir, Bus, FakeBluez, PathBuf, Gateway, std::sync::Arc<fake_bluez::DevStats>) {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::start();
    let mut fake = FakeBluez::start(&bus.address);
    let stats = fake.add_gatt_device(HR_ADDR, "Strap", hr_chars());
    let ble =
        format!("[[ble]]\nname = \"strap\"\nmatch = {{ address = \"{HR_ADDR}\" }}\nprofile = \"heart_rate\"\n{extra}");
    let cfg = write_config(dir.path(), &ble, scan);
    let gw = start(&cfg, &bus);
    assert!(fake.wait_notifying(HR_ADDR, 0x2A37, Duration::from_secs(20)), "{}", gw.log_text());
    (dir, bus, fake, cfg, gw, stats)
}

#[test]
fn link_loss_then_reconnect() {
    let (_dir, _bus, fake, cfg, gw, stats) = hr_gateway("", "");
    send_hr(&fake, HR_ADDR, 100..120);
    fake.drop_link(HR_ADDR);
    assert!(!fake.notify(HR_ADDR, 0x2A37, &hr_value(999, 1)), "a lost link carries nothing");
    assert!(fake.wait_notifying(HR_ADDR, 0x2A37, Duration::from_secs(20)), "{}", gw.log_text());
    send_hr(&fake, HR_ADDR, 120..140);
    let log = stop(gw);
    assert_hr_exactly_once(&queue_dump(&cfg), HR_ADDR, 100..140);
    assert_eq!(stats.connects.load(Ordering::SeqCst), 2, "{log}");
    assert!(log.contains("lost"), "{log}");
}

#[test]
fn bluez_restart_is_survived() {
    let (_dir, _bus, mut fake, cfg, gw, stats) = hr_gateway("", "");
    send_hr(&fake, HR_ADDR, 200..220);
    fake.restart();
    assert!(fake.wait_notifying(HR_ADDR, 0x2A37, Duration::from_secs(30)), "{}", gw.log_text());
    send_hr(&fake, HR_ADDR, 220..240);
    let log = stop(gw);
    assert_hr_exactly_once(&queue_dump(&cfg), HR_ADDR, 200..240);
    assert_eq!(stats.connects.load(Ordering::SeqCst), 2, "{log}");
    assert!(log.contains("BlueZ or hci0 gone"), "{log}");
}

#[test]
fn system_bus_restart_is_survived() {
    let (_dir, mut bus, mut fake, cfg, gw, stats) = hr_gateway("", "");
    send_hr(&fake, HR_ADDR, 500..520);
    std::thread::sleep(Duration::from_millis(300));
    fake.down();
    bus.restart();
    fake.up();
    assert!(fake.wait_notifying(HR_ADDR, 0x2A37, Duration::from_secs(40)), "{}", gw.log_text());
    send_hr(&fake, HR_ADDR, 520..540);
    let log = stop(gw);
    assert_hr_exactly_once(&queue_dump(&cfg), HR_ADDR, 500..540);
    assert_eq!(stats.connects.load(Ordering::SeqCst), 2, "{log}");
    // btleplug's connection to the old bus hangs; the hub notices, and connects anew.
    assert!(log.contains("BlueZ or the bus gone (no answer within 3s)"), "{log}");
}

#[test]
fn adapter_unplugged_and_back() {
    let (_dir, _bus, fake, cfg, gw, stats) = hr_gateway("", "");
    send_hr(&fake, HR_ADDR, 400..420);
    fake.unplug_adapter();
    assert!(
        wait_until(Duration::from_secs(10), || gw.log_text().contains("no Bluetooth adapter")),
        "{}",
        gw.log_text()
    );
    fake.plug_adapter();
    assert!(fake.wait_notifying(HR_ADDR, 0x2A37, Duration::from_secs(30)), "{}", gw.log_text());
    send_hr(&fake, HR_ADDR, 420..440);
    let log = stop(gw);
    assert_hr_exactly_once(&queue_dump(&cfg), HR_ADDR, 400..440);
    assert_eq!(stats.connects.load(Ordering::SeqCst), 2, "{log}");
}

#[test]
fn silent_device_trips_the_watchdog_and_reconnects() {
    let (_dir, _bus, fake, cfg, gw, stats) = hr_gateway("stale_after = \"1s\"\n", "");
    send_hr(&fake, HR_ADDR, 300..310);
    // Connected, subscribed, and silent: the watchdog disconnects and reconnects.
    assert!(wait_until(Duration::from_secs(20), || stats.connects.load(Ordering::SeqCst) >= 2), "{}", gw.log_text());
    assert!(fake.wait_notifying(HR_ADDR, 0x2A37, Duration::from_secs(20)), "{}", gw.log_text());
    send_hr(&fake, HR_ADDR, 310..320);
    let log = stop(gw);
    assert_hr_exactly_once(&queue_dump(&cfg), HR_ADDR, 300..320);
    assert!(stats.disconnects.load(Ordering::SeqCst) >= 1);
    assert!(log.contains("(watchdog)"), "{log}");
}

#[test]
fn scan_watchdog_restarts_discovery_then_power_cycles() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::start();
    let mut fake = FakeBluez::start(&bus.address);
    let addr = "A4:C1:38:00:00:09";
    fake.add_advertiser(addr, "ATC_9", vec![0x40, 0x00, 1, 0x01, 50]);
    let ble = format!("[[ble]]\nname = \"env\"\nmatch = {{ address = \"{addr}\" }}\nprofile = \"bthome\"\n");
    let cfg = write_config(dir.path(), &ble, "scan_stale_after = \"1s\"\n");
    let gw = start(&cfg, &bus);
    // No adverts at all: discovery restarted, then the adapter power-cycled,
    // then a new session scans again.
    assert!(
        wait_until(Duration::from_secs(20), || fake.adapter.power_off.load(Ordering::SeqCst) >= 1
            && fake.adapter.start_discovery.load(Ordering::SeqCst) >= 3),
        "{}",
        gw.log_text()
    );
    assert!(
        wait_until(Duration::from_secs(10), || gw.log_text().matches(": found ").count() >= 2),
        "{}",
        gw.log_text()
    );
    assert!(fake.advertise(addr, vec![0x40, 0x00, 2, 0x01, 49]), "the adapter is not scanning");
    let log = stop(gw);
    assert!(log.contains("restarting discovery") && log.contains("power-cycling"), "{log}");
    let by_key = count_by_value(&queue_dump(&cfg));
    assert_eq!(by_key.get(&(addr.to_string(), "battery".to_string(), "50".to_string())), Some(&1), "{by_key:?}");
    assert_eq!(by_key.get(&(addr.to_string(), "battery".to_string(), "49".to_string())), Some(&1), "{by_key:?}");
}

#[test]
fn battery_read_and_custom_jsonl_profile() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::start();
    let mut fake = FakeBluez::start(&bus.address);
    let bat = "C0:FF:EE:00:00:03";
    let band = "C0:FF:EE:00:00:04";
    fake.add_gatt_device(
        bat,
        "Tag",
        vec![CharSpec { service: 0x180F, uuid: 0x2A19, flags: &["read", "notify"], value: vec![77] }],
    );
    fake.add_gatt_device(
        band,
        "Band",
        vec![CharSpec { service: 0xFFE0, uuid: 0xFFE1, flags: &["notify"], value: vec![] }],
    );
    let ble = format!(
        "[[ble]]\nname = \"tag\"\nmatch = {{ address = \"{bat}\" }}\ndevice = \"tag-1\"\nprofile = \"battery\"\n\n\
         [[ble]]\nname = \"band\"\nmatch = {{ address = \"{band}\", service = \"ffe0\" }}\ndevice = \"band-1\"\nprofile = \"custom\"\n\
         service = \"ffe0\"\ncharacteristic = \"0000ffe1-0000-1000-8000-00805f9b34fb\"\nframing = \"jsonl\"\n"
    );
    let cfg = write_config(dir.path(), &ble, "");
    let gw = start(&cfg, &bus);
    assert!(fake.wait_notifying(bat, 0x2A19, Duration::from_secs(20)), "{}", gw.log_text());
    assert!(fake.wait_notifying(band, 0xFFE1, Duration::from_secs(20)), "{}", gw.log_text());
    assert!(fake.notify(bat, 0x2A19, &[76]));
    // A jsonl line split over two notifications (20-byte ATT payloads), then a resend of it.
    let line = br#"{"sensor":"steps","seq":5,"ts":1764000000000,"value":1234}
"#;
    assert!(fake.notify(band, 0xFFE1, &line[..20]));
    assert!(fake.notify(band, 0xFFE1, &line[20..]));
    assert!(fake.notify(band, 0xFFE1, line));
    assert!(fake.notify(band, 0xFFE1, b"not json\n"));
    // A frame naming another device: the entry speaks only for band-1 (issue 19, H3).
    assert!(fake.notify(
        band,
        0xFFE1,
        br#"{"device":"wrist-07","sensor":"hr","seq":9,"value":70}
"#
    ));
    assert!(fake.notify(
        band,
        0xFFE1,
        br#"{"device":"band-1","sensor":"steps","seq":6,"value":1240}
"#
    ));
    assert!(
        wait_until(Duration::from_secs(10), || queue_dump(&cfg).iter().any(|r| r["seq"] == 6)),
        "{}",
        gw.log_text()
    );
    let log = stop(gw);
    let dump = queue_dump(&cfg);
    let bat_values: Vec<_> = dump.iter().filter(|r| r["device"] == "tag-1").map(|r| r["value"].clone()).collect();
    assert_eq!(bat_values, [serde_json::json!(77.0), serde_json::json!(76.0)], "{dump:?}");
    let steps: Vec<_> = dump.iter().filter(|r| r["device"] == "band-1").collect();
    assert_eq!(steps.len(), 2, "{dump:?}");
    assert_eq!((steps[0]["sensor"].as_str(), steps[0]["seq"].as_u64()), (Some("steps"), Some(5)));
    assert!(log.contains("malformed"), "{log}");
    assert!(!dump.iter().any(|r| r["device"] == "wrist-07"), "{dump:?}");
    assert!(log.contains("ble band: may not speak for device \"wrist-07\""), "{log}");
    assert_eq!(summary_number(&log, "readings refused (BLE entry may not speak for the device)"), 1, "{log}");
}

/// SIGHUP with a `[[ble]]` added, then one removed: the hub restarts with
/// the new list, the added strap is connected and delivers, the removed one
/// is disconnected and delivers no more; every value queued exactly once.
#[test]
fn reload_adds_and_removes_ble_devices() {
    const HR2_ADDR: &str = "C0:FF:EE:00:00:03";
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::start();
    let mut fake = FakeBluez::start(&bus.address);
    let s1 = fake.add_gatt_device(HR_ADDR, "Polar H10 1111", hr_chars());
    let s2 = fake.add_gatt_device(HR2_ADDR, "Polar H10 2222", hr_chars());
    let strap = |name: &str, addr: &str| {
        format!("[[ble]]\nname = \"{name}\"\nmatch = {{ address = \"{addr}\" }}\nprofile = \"heart_rate\"\n")
    };
    let cfg = write_config(dir.path(), &strap("one", HR_ADDR), "");
    let gw = start(&cfg, &bus);
    let hup = || gw.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(fake.wait_notifying(HR_ADDR, 0x2A37, Duration::from_secs(20)), "{}", gw.log_text());
    send_hr(&fake, HR_ADDR, 1000..1010);
    assert_eq!(s2.connects.load(Ordering::SeqCst), 0, "not configured yet");

    write_config(dir.path(), &(strap("one", HR_ADDR) + &strap("two", HR2_ADDR)), "");
    hup();
    assert!(
        wait_until(Duration::from_secs(15), || gw.log_text().contains("reload: BLE restarted with 2 device(s)")),
        "{}",
        gw.log_text()
    );
    assert!(
        wait_until(Duration::from_secs(20), || s1.connects.load(Ordering::SeqCst) >= 2
            && fake.is_notifying(HR_ADDR, 0x2A37)),
        "{}",
        gw.log_text()
    );
    assert!(fake.wait_notifying(HR2_ADDR, 0x2A37, Duration::from_secs(20)), "{}", gw.log_text());
    send_hr(&fake, HR_ADDR, 1010..1020);
    send_hr(&fake, HR2_ADDR, 2000..2010);

    write_config(dir.path(), &strap("two", HR2_ADDR), "");
    hup();
    assert!(
        wait_until(Duration::from_secs(15), || gw.log_text().contains("reload: BLE restarted with 1 device(s)")),
        "{}",
        gw.log_text()
    );
    assert!(
        wait_until(Duration::from_secs(20), || s2.connects.load(Ordering::SeqCst) >= 2
            && fake.is_notifying(HR2_ADDR, 0x2A37)),
        "{}",
        gw.log_text()
    );
    send_hr(&fake, HR2_ADDR, 2010..2020);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(s1.connects.load(Ordering::SeqCst), 2, "a removed strap is not connected again");
    assert!(!fake.is_notifying(HR_ADDR, 0x2A37), "the removed strap was left subscribed");
    let log = stop(gw);
    let dump = queue_dump(&cfg);
    assert_hr_exactly_once(&dump, HR_ADDR, 1000..1020);
    assert_hr_exactly_once(&dump, HR2_ADDR, 2000..2020);
    assert!(!log.contains("port ble:one:"), "a removed device leaves the counters: {log}");
}

/// `(device, sensor, value)` → how many times it is in the queue (rssi
/// left out): for BTHome readings, which carry no seq.
fn count_by_value(dump: &[serde_json::Value]) -> std::collections::HashMap<(String, String, String), usize> {
    let mut m = std::collections::HashMap::new();
    for r in dump.iter().filter(|r| r["sensor"] != "rssi") {
        let key = (
            r["device"].as_str().unwrap().to_string(),
            r["sensor"].as_str().unwrap().to_string(),
            format!("{}", r["value"].as_f64().unwrap()),
        );
        *m.entry(key).or_insert(0) += 1;
    }
    m
}
