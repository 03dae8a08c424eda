//! MQTT 5 at the front door, with real clients (`mosquitto_pub`/`mosquitto_sub`)
//! and raw sockets, against the real binary: what rumqttd 0.20 gets wrong
//! and the door puts right (src/broker/v3.rs, session.rs, the QoS tag in
//! acl.rs).

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn write_cfg(dir: &Path, port: u16) -> PathBuf {
    let broker = format!(
        "[metrics]\nenabled = false\n[broker]\nenabled = true\ntcp = \"127.0.0.1:{port}\"\nallow_anonymous = true\n"
    );
    write_config_extra(dir, &[], "batch_max_age = \"50ms\"", "fsync_interval = \"50ms\"", &broker)
}

fn start(dir: &Path) -> (Gateway, u16) {
    need("mosquitto_sub", "mosquitto-clients");
    let port = free_port();
    let gw = Gateway::start(&write_cfg(dir, port));
    let ok = wait_until(Duration::from_secs(20), || gw.log_text().contains("broker: ingest"));
    assert!(ok, "broker did not start; log:\n{}", gw.log_text());
    (gw, port)
}

/// `mosquitto_sub` printing `QOS TOPIC PAYLOAD` lines into `out`.
fn subscriber(port: u16, v: &str, id: &str, qos: &str, topic: &str, extra: &[&str], out: &Path) -> Child {
    Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", v, "-i", id, "-q", qos, "-t", topic])
        .args(["-F", "%q %t %p"])
        .args(extra)
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mosquitto_sub")
}

/// SIGTERM (mosquitto_sub then sends DISCONNECT) and the lines it printed.
fn stop(mut sub: Child, out: &Path) -> Vec<String> {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(sub.id() as i32), nix::sys::signal::SIGTERM);
    let _ = sub.wait();
    std::fs::read_to_string(out).unwrap().lines().map(str::to_string).collect()
}

fn publish(port: u16, v: &str, qos: &str, topic: &str, msg: &str, extra: &[&str]) {
    let o = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", v, "-q", qos, "-t", topic, "-m", msg])
        .args(extra)
        .output()
        .expect("mosquitto_pub");
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "mosquitto_pub -V {v} -q {qos} -t {topic}: {:?}: {out}{err}", o.status);
}

fn wait_lines(out: &Path, n: usize) -> bool {
    wait_until(Duration::from_secs(10), || std::fs::read_to_string(out).is_ok_and(|s| s.lines().count() >= n))
}

// ---- raw MQTT 5 -----------------------------------------------------------------

use common::{mqtt_packet as packet, mqtt_str as s};

struct Raw(TcpStream);

impl Raw {
    /// MQTT 5 CONNECT; returns the connection and CONNACK's session-present flag.
    fn connect(port: u16, id: &str, clean_start: bool, expiry: u32, receive_max: Option<u16>) -> (Raw, bool) {
        let mut body = s("MQTT");
        body.extend([5, if clean_start { 0x02 } else { 0 }, 0, 60]);
        let mut props = vec![0x11];
        props.extend(expiry.to_be_bytes());
        if let Some(m) = receive_max {
            props.push(0x21);
            props.extend(m.to_be_bytes());
        }
        body.push(props.len() as u8);
        body.extend(props);
        body.extend(s(id));
        let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        sock.write_all(&packet(0x10, &body)).unwrap();
        let mut r = Raw(sock);
        let (first, body) = r.read().expect("CONNACK");
        assert_eq!((first, body[1]), (0x20, 0), "CONNACK success");
        (r, body[0] & 1 == 1)
    }

    /// The next packet: (first byte, body); None on timeout or close.
    fn read(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut b = [0u8; 1];
        self.0.read_exact(&mut b).ok()?;
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let mut x = [0u8; 1];
            self.0.read_exact(&mut x).ok()?;
            len |= ((x[0] & 0x7f) as usize) << shift;
            shift += 7;
            if x[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        self.0.read_exact(&mut body).ok()?;
        Some((b[0], body))
    }

    fn subscribe(&mut self, filter: &str, qos: u8) {
        let mut body = 1u16.to_be_bytes().to_vec();
        body.push(0);
        body.extend(s(filter));
        body.push(qos);
        self.0.write_all(&packet(0x82, &body)).unwrap();
        let (first, body) = self.read().expect("SUBACK");
        assert_eq!((first, body[3]), (0x90, qos), "SUBACK granting QoS {qos}");
    }

    fn disconnect(mut self) {
        let _ = self.0.write_all(&[0xe0, 0]);
    }
}

#[test]
fn a_311_subscriber_survives_mqtt5_properties_and_can_come_back() {
    // rumqttd 0.20 panics writing an MQTT 5 message with properties to a
    // 3.1.1 connection: the subscriber was cut off, and its client id
    // refused from then on. Now every client reaches rumqttd as MQTT 5.
    let dir = tempfile::tempdir().unwrap();
    let (gw, port) = start(dir.path());
    let out = dir.path().join("sub.txt");
    let sub = subscriber(port, "mqttv311", "dash-311", "1", "ward/#", &[], &out);
    std::thread::sleep(Duration::from_millis(700));
    publish(port, "mqttv5", "1", "ward/a", "plain", &[]);
    publish(port, "mqttv5", "1", "ward/b", "with-props", &["-D", "publish", "user-property", "k", "v"]);
    publish(port, "mqttv5", "1", "ward/c", "content-type", &["-D", "publish", "content-type", "text/plain"]);
    publish(port, "mqttv311", "1", "ward/d", "after", &[]);
    assert!(wait_lines(&out, 4), "{:?}", std::fs::read_to_string(&out));
    let lines = stop(sub, &out);
    assert_eq!(lines, ["1 ward/a plain", "1 ward/b with-props", "1 ward/c content-type", "1 ward/d after"]);
    // The same client id comes back (it used to be refused: "broker unavailable").
    let out2 = dir.path().join("sub2.txt");
    let sub = subscriber(port, "mqttv311", "dash-311", "1", "ward/#", &[], &out2);
    std::thread::sleep(Duration::from_millis(700));
    publish(port, "mqttv5", "1", "ward/e", "again", &["-D", "publish", "user-property", "k", "v"]);
    assert!(wait_lines(&out2, 1));
    assert_eq!(stop(sub, &out2), ["1 ward/e again"]);
    let log = gw.log_text();
    assert!(!log.contains("panicked"), "rumqttd panicked:\n{log}");
    gw.terminate();
}

#[test]
fn mqtt5_messages_arrive_at_the_qos_they_were_published_with() {
    // rumqttd 0.20 delivers at the subscription's QoS (bytebeamio/rumqtt#707).
    let dir = tempfile::tempdir().unwrap();
    let (gw, port) = start(dir.path());
    let out = dir.path().join("sub.txt");
    let sub = subscriber(port, "mqttv5", "qos-sub", "2", "q/#", &["-F", "%q %t %p %P"], &out);
    std::thread::sleep(Duration::from_millis(700));
    let prop = ["-D", "publish", "user-property", "k", "v"];
    for q in ["0", "1", "2"] {
        publish(port, "mqttv5", q, &format!("q/{q}"), "m", &prop);
    }
    assert!(wait_lines(&out, 3));
    let mut lines = stop(sub, &out);
    lines.sort();
    // At its own QoS, with the publisher's user property and nothing of ours.
    assert_eq!(lines, ["0 q/0 m k:v", "1 q/1 m k:v", "2 q/2 m k:v"]);
    gw.terminate();
}

#[test]
fn an_mqtt5_session_lives_for_its_expiry_interval_and_no_longer() {
    // rumqttd 0.20 keeps a session exactly when the clean flag is 0; MQTT 5
    // asks for Clean Start and Session Expiry Interval separately.
    let dir = tempfile::tempdir().unwrap();
    let (gw, port) = start(dir.path());
    // Clean Start 1 and expiry 3 s: kept after the connection.
    let (mut c, present) = Raw::connect(port, "s1", true, 3, None);
    assert!(!present);
    c.subscribe("s/#", 1);
    c.disconnect();
    std::thread::sleep(Duration::from_millis(300));
    publish(port, "mqttv5", "1", "s/a", "while-away", &[]);
    let (mut c, present) = Raw::connect(port, "s1", false, 3, None);
    assert!(present, "the session was kept");
    let (first, body) = c.read().expect("the message queued while away");
    assert_eq!(first & 0xf0, 0x30);
    assert!(body.ends_with(b"while-away"), "{body:?}");
    c.disconnect();
    // Past its 3 s: gone.
    std::thread::sleep(Duration::from_secs(5));
    let (c, present) = Raw::connect(port, "s1", false, 3, None);
    assert!(!present, "expired after 3 s");
    c.disconnect();
    std::thread::sleep(Duration::from_millis(300));
    // Expiry 0 (the default), even with Clean Start 0: gone at the disconnect.
    let (mut c, _) = Raw::connect(port, "s2", false, 0, None);
    c.subscribe("s/#", 1);
    c.disconnect();
    std::thread::sleep(Duration::from_millis(300));
    let (c, present) = Raw::connect(port, "s2", false, 0, None);
    assert!(!present, "expiry 0 ends the session with the connection");
    c.disconnect();
    // Clean Start 1 ends a kept session at once.
    let (mut c, _) = Raw::connect(port, "s3", true, 60, None);
    c.subscribe("s/#", 1);
    c.disconnect();
    std::thread::sleep(Duration::from_millis(300));
    let (c, present) = Raw::connect(port, "s3", true, 60, None);
    assert!(!present, "Clean Start 1 starts afresh");
    c.disconnect();
    gw.terminate();
}

#[test]
fn the_clients_receive_maximum_is_respected() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, port) = start(dir.path());
    let (mut c, _) = Raw::connect(port, "rm1", true, 0, Some(1));
    c.subscribe("rm/#", 1);
    for i in 0..3 {
        publish(port, "mqttv5", "1", "rm/x", &format!("m{i}"), &[]);
    }
    let (first, body) = c.read().expect("the first message");
    assert_eq!(first & 0xf6, 0x32, "QoS 1 PUBLISH");
    let id = [body[6], body[7]];
    // Nothing more until it is acked (rumqttd alone would send all three).
    c.0.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
    assert!(c.read().is_none(), "a second message before the first was acked");
    c.0.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut id = id;
    for n in 1..3 {
        c.0.write_all(&packet(0x40, &id)).unwrap();
        let (_, body) = c.read().expect("the next message after the ack");
        assert!(body.ends_with(format!("m{n}").as_bytes()), "{body:?}");
        id = [body[6], body[7]];
    }
    c.0.write_all(&packet(0x40, &id)).unwrap();
    c.disconnect();
    gw.terminate();
}
