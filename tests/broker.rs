//! The embedded broker with real MQTT clients (`mosquitto_pub`/`mosquitto_sub`
//! from Debian's mosquitto-clients, plus raw sockets for what no client would
//! send) against the real binary on free loopback ports.

mod common;

use common::*;
use edge_gateway::config::Framing;
use edge_gateway::demo::sim::{SimConfig, SimDevice, open_pty};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const PIPELINE: &str = "batch_max_age = \"50ms\"\nbatch_max_readings = 200";
const STORE: &str = "fsync_interval = \"50ms\"";

/// A gateway config with a `[broker]` table (`broker` is its body) and optional serial ports.
fn config(dir: &Path, ports: &[Port], broker: &str) -> PathBuf {
    config_with(dir, ports, PIPELINE, broker)
}

fn config_with(dir: &Path, ports: &[Port], pipeline: &str, broker: &str) -> PathBuf {
    let path = write_config(dir, ports, pipeline, STORE);
    let mut s = std::fs::read_to_string(&path).unwrap();
    s += &format!("\n[broker]\n{broker}\n");
    std::fs::write(&path, s).unwrap();
    path
}

/// Start the gateway and wait until the broker listens.
fn start(cfg: &Path) -> Gateway {
    let gw = Gateway::start(cfg);
    let ok = wait_until(Duration::from_secs(20), || gw.log_text().contains("broker: ingest"));
    assert!(ok, "broker did not start; log:\n{}", gw.log_text());
    gw
}

fn pub_args(port: u16, extra: &[&str]) -> Command {
    let mut c = Command::new("mosquitto_pub");
    c.args(["-h", "127.0.0.1", "-p", &port.to_string()]).args(extra);
    c
}

/// One `mosquitto_pub -l` process: every line of `lines` is one message on `topic`.
fn publish_lines(port: u16, topic: &str, qos: u8, lines: &str, auth: &[&str]) -> Child {
    let mut c = pub_args(port, &["-t", topic, "-q", &qos.to_string(), "-l"]);
    c.args(auth).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn mosquitto_pub");
    child.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
    child
}

fn finish(child: Child) -> Output {
    child.wait_with_output().expect("mosquitto client")
}

/// A normal client: publish one reading at QoS 1; true when the broker took it.
fn normal_client(port: u16, auth: &[&str], device: &str, seq: u64) -> bool {
    let out = pub_args(port, &["-t", &format!("sensors/{device}/hr"), "-q", "1", "-m"])
        .arg(format!("{{\"seq\":{seq},\"value\":60}}"))
        .args(auth)
        .output()
        .expect("mosquitto_pub");
    if !out.status.success() {
        eprintln!("normal client failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    out.status.success()
}

fn queued_keys(cfg: &Path) -> std::collections::HashMap<(String, String, u64), usize> {
    count_by_key(&queue_dump(cfg))
}

#[test]
fn lan_readings_at_qos_1_and_2_reach_the_queue_exactly_once() {
    need("mosquitto_pub", "mosquitto-clients");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = config(dir.path(), &[], &format!("enabled = true\ntcp = \"127.0.0.1:{port}\"\nallow_anonymous = true"));
    let gw = start(&cfg);
    // 10 devices at QoS 1 and 10 at QoS 2, 100 readings each, plus a resend
    // of the last 10 (what a device does when it missed a PUBACK).
    let mut children = Vec::new();
    for qos in [1u8, 2] {
        for d in 0..10 {
            let mut lines: String =
                (1..=100).map(|s| format!("{{\"seq\":{s},\"ts\":{},\"value\":{s}}}\n", 1_000 + s)).collect();
            lines += &(91..=100)
                .map(|s| format!("{{\"seq\":{s},\"ts\":{},\"value\":{s}}}\n", 1_000 + s))
                .collect::<String>();
            children.push(publish_lines(port, &format!("sensors/q{qos}-dev{d:02}/spo2"), qos, &lines, &[]));
        }
    }
    // A malformed payload is counted for its topic and skipped.
    children.push(publish_lines(port, "sensors/bad-01/spo2", 1, "{\"seq\":1}\nnot json\n", &[]));
    for c in children {
        let out = finish(c);
        assert!(out.status.success(), "mosquitto_pub: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Every reading was PUBACKed (PUBCOMPed): stop at once. The broker's
    // clients go first and what rumqttd took is handed to the pipeline
    // before it seals, so nothing acked over MQTT is left behind.
    let (code, log) = gw_stop(gw, |log| {
        assert!(log.contains("mqtt topic sensors/bad-01/spo2: 0 readings, 2 malformed"), "{log}");
        assert!(log.contains("200 duplicates dropped"), "{log}");
    });
    assert_eq!(code, Some(0), "{log}");
    let keys = queued_keys(&cfg);
    assert_eq!(keys.len(), 2000, "{log}");
    for qos in [1, 2] {
        for d in 0..10 {
            for s in 1..=100u64 {
                let k = (format!("q{qos}-dev{d:02}"), "spo2".to_string(), s);
                assert_eq!(keys.get(&k), Some(&1), "{k:?}");
            }
        }
    }
}

/// SIGTERM, check the log, return the exit code.
fn gw_stop(gw: Gateway, check: impl FnOnce(&str)) -> (Option<i32>, String) {
    let log_path = gw.log.clone();
    let (code, _) = gw.terminate();
    let log = std::fs::read_to_string(log_path).unwrap_or_default();
    check(&log);
    (code, log)
}

#[test]
fn a_dashboard_sees_serial_and_lan_readings_and_the_status() {
    need("mosquitto_sub", "mosquitto-clients");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let pty = open_pty().expect("openpty");
    let dock = pty.slave_path.clone();
    let mut sim = SimDevice::on_pty(SimConfig::new("wrist-serial", Framing::Jsonl), pty).expect("sim");
    let cfg = config(
        dir.path(),
        &[Port { name: "dock0", path: &dock, framing: "jsonl" }],
        &format!("enabled = true\ntcp = \"127.0.0.1:{port}\"\nallow_anonymous = true\nstatus_interval = \"200ms\""),
    );
    let gw = start(&cfg);
    let dashboard = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "readings/#", "-v", "-W", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500)); // let it subscribe
    for _ in 0..3 {
        sim.send_next().unwrap();
    }
    assert!(normal_client(port, &[], "lan-01", 1));
    assert!(sim.wait_all_acked(Duration::from_secs(10)).unwrap(), "serial readings acked");
    let ok = wait_until(Duration::from_secs(10), || queue_dump(&cfg).len() >= 4);
    assert!(ok, "{}", gw.log_text());
    std::thread::sleep(Duration::from_millis(300));
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(dashboard.id() as i32), nix::sys::signal::SIGTERM);
    let seen = String::from_utf8_lossy(&finish(dashboard).stdout).into_owned();
    assert!(seen.contains("readings/wrist-serial/"), "serial reading republished: {seen}");
    assert!(seen.contains("readings/lan-01/hr {\"device\":\"lan-01\",\"sensor\":\"hr\",\"seq\":1,"), "{seen}");
    // Retained: a late dashboard gets the last value at once, and the status.
    let late = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "readings/lan-01/hr", "-C", "1", "-W", "5"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&late.stdout).contains("\"seq\":1"), "retained: {late:?}");
    let status = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "$SYS/edge-gateway/status", "-C", "1", "-W", "5"])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status is JSON");
    assert_eq!(status["gateway"], "test-gw");
    assert!(status["queue"]["readings"].as_u64().is_some(), "{status}");
    let dock0 = status["links"].as_array().and_then(|l| l.iter().find(|l| l["link"] == "dock0")).cloned();
    assert_eq!(dock0.map(|l| (l["source"].clone(), l["up"].clone())), Some(("serial".into(), true.into())), "{status}");
    gw.terminate();
}

/// A CONNECT (MQTT 3.1.1, clean session, keep-alive 60) with optional credentials.
fn connect_packet(client_id: &str, login: Option<(&str, &str)>) -> Vec<u8> {
    let s = |x: &str| [&(x.len() as u16).to_be_bytes()[..], x.as_bytes()].concat();
    let mut body = s("MQTT");
    body.push(4);
    body.push(0x02 | if login.is_some() { 0xC0 } else { 0 });
    body.extend_from_slice(&60u16.to_be_bytes());
    body.extend(s(client_id));
    if let Some((u, p)) = login {
        body.extend(s(u));
        body.extend(s(p));
    }
    let mut out = vec![0x10, body.len() as u8];
    out.extend(body);
    out
}

/// The CONNACK return code the broker answers `packet` with (None: closed without one).
fn connack_code(stream: &mut TcpStream) -> Option<u8> {
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 4];
    stream.read_exact(&mut b).ok()?;
    (b[0] == 0x20).then_some(b[3])
}

fn hash(password: &str) -> String {
    let mut c = Command::new(bin()).arg("hash-password").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    c.stdin.take().unwrap().write_all(format!("{password}\n").as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn hostile_clients_do_not_keep_normal_clients_out() {
    need("mosquitto_pub", "mosquitto-clients");
    need("openssl", "openssl");
    let dir = tempfile::tempdir().unwrap();
    let (port, tls_port) = (free_port(), free_port());
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "openssl: {}", String::from_utf8_lossy(&made.stderr));
    let h = hash("good-pass");
    let max = 20;
    let cfg = config(
        dir.path(),
        &[],
        &format!(
            "enabled = true\ntcp = \"127.0.0.1:{port}\"\ntls = \"127.0.0.1:{tls_port}\"\ntls_cert = {cert:?}\ntls_key = {key:?}\n\
             max_connections = {max}\nmax_payload = \"64KiB\"\nconnect_timeout = \"3s\"\n\
             max_handshakes_per_address = 1024\n\
             [[broker.users]]\nname = \"dev\"\npassword_hash = \"{h}\"\n\
             [[broker.users]]\nname = \"site1\"\npassword_hash = \"{h}\"\npublish = [\"sensors/site1-\"]\n"
        ),
    );
    // Every client here comes from 127.0.0.1: this test checks the global
    // limits; the per-address ones (and their cost) are tests/security.rs's.
    let gw = start(&cfg);
    let auth = ["-u", "dev", "-P", "good-pass"];
    let mut seq = 0;
    let mut normal = |what: &str| {
        seq += 1;
        assert!(normal_client(port, &auth, "normal", seq), "normal client after {what}; log:\n{}", gw.log_text());
    };
    normal("start-up");

    // 1. The same client id with a '/' twice (rumqttd 0.20 #1062), the first still connected.
    let first = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-i", "site1/dev1", "-t", "x", "-W", "5"])
        .args(auth)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let second =
        pub_args(port, &["-i", "site1/dev1", "-t", "sensors/dup-id/hr", "-q", "1", "-m", "{\"seq\":1,\"value\":1}"])
            .args(auth)
            .output()
            .unwrap();
    assert!(second.status.success(), "second site1/dev1: {}", String::from_utf8_lossy(&second.stderr));
    let _ = finish(first);
    normal("the same client id twice");

    // 2. 200 connections that send half a CONNECT and idle (still open while the normal client comes).
    let half: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(&connect_packet("idle", None)[..6]).unwrap();
            s
        })
        .collect();
    normal("200 half CONNECTs");
    // And a stalled TLS handshake: a TLS normal client must still get in.
    let stalled = TcpStream::connect(("127.0.0.1", tls_port)).unwrap();
    let tls_ok = pub_args(tls_port, &["--cafile", cert.to_str().unwrap(), "--insecure", "-t", "sensors/tls-01/hr"])
        .args(["-q", "1", "-m", "{\"seq\":1,\"value\":1}"])
        .args(auth)
        .output()
        .unwrap();
    assert!(tls_ok.status.success(), "TLS client: {}", String::from_utf8_lossy(&tls_ok.stderr));
    drop(stalled);
    drop(half);

    // 3. A 2 MiB publish: that client is cut off.
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 2 << 20]).unwrap();
    let _ = pub_args(port, &["-t", "sensors/big-01/hr", "-q", "1", "-f", big.to_str().unwrap()]).args(auth).output();
    normal("a 2 MiB publish");

    // 4. Random bytes, before and after a valid CONNECT.
    let mut x = 0x2545F4914F6CDD1Du64;
    let noise: Vec<u8> = (0..8192)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let _ = s.write_all(&noise);
    let mut s2 = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s2.write_all(&connect_packet("noisy", Some(("dev", "good-pass")))).unwrap();
    assert_eq!(connack_code(&mut s2), Some(0));
    let _ = s2.write_all(&noise);
    normal("random bytes");
    drop((s, s2));

    // 5. Wrong password: a proper CONNACK "bad user name or password", no wedge.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&connect_packet("wrong", Some(("dev", "bad-pass")))).unwrap();
    assert_eq!(connack_code(&mut s), Some(4));
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&connect_packet("anon", None)).unwrap();
    assert_eq!(connack_code(&mut s), Some(5), "anonymous refused: not authorised");
    let wrong =
        pub_args(port, &["-t", "sensors/w/hr", "-m", "{\"value\":1}", "-u", "dev", "-P", "nope"]).output().unwrap();
    assert!(!wrong.status.success());
    normal("a wrong password");

    // 6. max_connections + 50 at once: exactly max get in, the rest get CONNACK 3.
    let mut crowd = Vec::new();
    for i in 0..max + 50 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(&connect_packet(&format!("crowd-{i}"), Some(("dev", "good-pass")))).unwrap();
        crowd.push(s);
    }
    let codes: Vec<Option<u8>> = crowd.iter_mut().map(connack_code).collect();
    let accepted = codes.iter().filter(|c| **c == Some(0)).count();
    let busy = codes.iter().filter(|c| **c == Some(3)).count();
    assert_eq!((accepted, busy), (max, 50), "{codes:?}");
    drop(crowd);
    std::thread::sleep(Duration::from_millis(300));
    normal("max_connections + 50 clients");

    // 7. Per-user topic permissions: site1 may publish only under sensors/site1-.
    let site1 = ["-u", "site1", "-P", "good-pass"];
    assert!(normal_client(port, &site1, "site1-w1", 1));
    let denied = pub_args(port, &["-t", "sensors/site2-w1/hr", "-q", "1", "-m", "{\"seq\":1,\"value\":1}"])
        .args(site1)
        .output()
        .unwrap();
    // Dropped and counted, as Mosquitto does (MQTT 3.1.1 has no negative PUBACK); not queued (checked below).
    assert!(denied.status.success(), "a denied publish no longer costs the connection");
    normal("a forbidden publish");
    // Nor through a will message, which rumqttd would publish for it.
    let will =
        pub_args(port, &["-t", "sensors/site1-w1/hr", "-m", "{\"value\":1}", "--will-topic", "sensors/site2-w1/hr"])
            .args(["--will-payload", "{\"value\":1}"])
            .args(site1)
            .output()
            .unwrap();
    assert!(!will.status.success(), "a will outside the prefixes is refused");

    // MQTT 5 clients take the same door (their CONNECT is re-encoded for rumqttd's v5 listener).
    let v5 = pub_args(port, &["-V", "5", "-t", "sensors/v5-01/hr", "-q", "1", "-m", "{\"seq\":1,\"value\":1}"])
        .args(auth)
        .output()
        .unwrap();
    assert!(v5.status.success(), "MQTT 5 client: {}", String::from_utf8_lossy(&v5.stderr));
    // From another address: a third failure from 127.0.0.1 would back it
    // off (tests/security.rs), and every client here comes from there.
    let v5_wrong =
        pub_args(port, &["-V", "5", "-t", "sensors/v5-01/hr", "-m", "{\"value\":1}", "-u", "dev", "-P", "no"])
            .args(["-A", "127.0.0.9"])
            .output()
            .unwrap();
    assert!(!v5_wrong.status.success());
    assert!(
        String::from_utf8_lossy(&v5_wrong.stderr).to_lowercase().contains("bad user name or password"),
        "{v5_wrong:?}"
    );
    normal("MQTT 5 clients");

    let ok = wait_until(Duration::from_secs(10), || {
        let k = queued_keys(&cfg);
        k.keys().filter(|(d, ..)| d == "normal").count() == seq as usize
    });
    let keys = queued_keys(&cfg);
    assert!(ok, "every normal reading queued: {keys:?}");
    assert!(keys.contains_key(&("site1-w1".into(), "hr".into(), 1)));
    assert!(keys.contains_key(&("tls-01".into(), "hr".into(), 1)));
    assert!(keys.contains_key(&("dup-id".into(), "hr".into(), 1)));
    assert!(keys.contains_key(&("v5-01".into(), "hr".into(), 1)));
    assert!(!keys.keys().any(|(d, ..)| d == "site2-w1" || d == "big-01"), "{keys:?}");
    let log = gw.log_text();
    assert!(!log.contains("good-pass") && !log.contains("bad-pass"), "no secrets in the log");
    assert!(log.contains("over max_payload; disconnected"), "{log}");
    assert!(log.contains("may not publish to \"sensors/site2-w1/hr\""), "{log}");
    assert!(log.contains("no CONNECT within connect_timeout") || log.contains("closed before CONNECT"), "{log}");
    if std::env::var_os("SHOW_LOG").is_some() {
        eprintln!("{log}");
    }
    gw.terminate();
}

#[test]
fn a_taken_port_fails_start_up_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = config(dir.path(), &[], &format!("enabled = true\ntcp = \"127.0.0.1:{port}\"\nallow_anonymous = true"));
    let out = Command::new(bin()).args(["run", "--config"]).arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(err.contains(&format!("127.0.0.1:{port}")) && err.contains("broker.tcp"), "{err}");
}

/// Listening TCP sockets the process holds (inodes matched against /proc/net/tcp*).
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_string))
        .collect();
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                let port = f[1].rsplit(':').next().unwrap();
                out.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    out
}

#[test]
fn a_disabled_broker_listens_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // (/metrics off too: this test counts every listening socket.)
    let body =
        format!("enabled = false\ntcp = \"127.0.0.1:{port}\"\nallow_anonymous = true\n\n[metrics]\nenabled = false");
    let cfg = config(dir.path(), &[], &body);
    let gw = Gateway::start(&cfg);
    assert!(wait_until(Duration::from_secs(10), || gw.log_text().contains("running with")), "{}", gw.log_text());
    assert_eq!(listening_ports(gw.child.id()), Vec::<u16>::new());
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    gw.terminate();
    // Control: enabled, the same check sees the public port (and rumqttd's two loopback ones).
    let cfg = config(dir.path(), &[], &body.replacen("enabled = false", "enabled = true", 1));
    let gw = start(&cfg);
    let ports = listening_ports(gw.child.id());
    assert!(ports.contains(&port) && ports.len() == 3, "{ports:?}");
    gw.terminate();
}

#[test]
fn websocket_clients_publish_too_even_after_a_stalled_handshake() {
    use async_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = config(
        dir.path(),
        &[],
        &format!("enabled = true\nwebsocket = \"127.0.0.1:{port}\"\nallow_anonymous = true\nconnect_timeout = \"2s\""),
    );
    let gw = start(&cfg);
    // A client that opens the TCP connection and never sends its HTTP upgrade.
    let stalled = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut req = format!("ws://127.0.0.1:{port}/mqtt").into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (mut ws, _) = tungstenite::client(req, sock).expect("WebSocket handshake while another one stalls");
    let read_binary = |ws: &mut tungstenite::WebSocket<TcpStream>| loop {
        match ws.read().expect("ws read") {
            Message::Binary(b) => return b.to_vec(),
            _ => continue,
        }
    };
    ws.send(Message::Binary(connect_packet("ws-client", None).into())).unwrap();
    assert_eq!(&read_binary(&mut ws)[..4], &[0x20, 2, 0, 0], "CONNACK accepted");
    let topic = b"sensors/ws-01/hr";
    let payload = br#"{"seq":1,"value":70}"#;
    let mut publish = vec![0x32, (2 + topic.len() + 2 + payload.len()) as u8, 0, topic.len() as u8];
    publish.extend_from_slice(topic);
    publish.extend_from_slice(&[0, 7]);
    publish.extend_from_slice(payload);
    ws.send(Message::Binary(publish.into())).unwrap();
    assert_eq!(read_binary(&mut ws), vec![0x40, 2, 0, 7], "PUBACK");
    let ok = wait_until(Duration::from_secs(10), || queued_keys(&cfg).contains_key(&("ws-01".into(), "hr".into(), 1)));
    assert!(ok, "{}", gw.log_text());
    drop(stalled);
    gw.terminate();
}

#[test]
fn a_wedged_internal_listener_is_restarted() {
    need("mosquitto_pub", "mosquitto-clients");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = config(dir.path(), &[], &format!("enabled = true\ntcp = \"127.0.0.1:{port}\"\nallow_anonymous = true"));
    // Debug-build hook: client ids reach rumqttd unescaped, so its #1062 bites for real.
    let gw = Gateway::start_with_env(&cfg, &[("EDGE_GATEWAY_BROKER_RAW_CLIENT_IDS", "1")]);
    assert!(wait_until(Duration::from_secs(20), || gw.log_text().contains("broker: ingest")), "{}", gw.log_text());
    assert!(normal_client(port, &[], "before", 1));
    for _ in 0..2 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(&connect_packet("site1/dev1", None)).unwrap();
        assert_ne!(connack_code(&mut s), Some(0), "rumqttd refuses the id");
    }
    // rumqttd's listener is wedged now: it panics on every CONNECT.
    assert!(!normal_client(port, &[], "wedged", 1), "bare rumqttd 0.20 refuses everyone after #1062");
    // The supervisor restarts it on a new port; clients get in again.
    let mut seq = 0;
    let back = wait_until(Duration::from_secs(10), || {
        seq += 1;
        normal_client(port, &[], "after", seq)
    });
    assert!(back, "{}", gw.log_text());
    assert!(gw.log_text().contains("internal listener stopped answering; restarting it"));
    gw.terminate();
}

/// Publish 40 readings at QoS 1 and 40 at QoS 2, SIGKILL the gateway the
/// moment the last ack arrives, and count what the queue kept.
fn acked_then_killed(ack: &str) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Batches close after 2 s: whatever was acked before that is only in memory.
    let pipeline = "batch_max_age = \"2s\"\nbatch_max_readings = 1000";
    let body = format!("enabled = true\ntcp = \"127.0.0.1:{port}\"\nallow_anonymous = true\nack = \"{ack}\"");
    let cfg = config_with(dir.path(), &[], pipeline, &body);
    let gw = start(&cfg);
    let lines: String = (1..=40).map(|s| format!("{{\"seq\":{s},\"value\":{s}}}\n")).collect();
    let pubs = [1u8, 2].map(|q| publish_lines(port, &format!("sensors/kill-q{q}/hr"), q, &lines, &[]));
    for p in pubs {
        let out = finish(p);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    gw.kill9();
    queue_dump(&cfg).len()
}

#[test]
fn with_ack_durable_a_puback_means_the_reading_is_on_disk() {
    need("mosquitto_pub", "mosquitto-clients");
    assert_eq!(acked_then_killed("durable"), 80, "every acked reading survives SIGKILL");
    // The window `received` leaves open (docs/lan-mqtt.md): acked, then lost.
    assert!(acked_then_killed("received") < 80, "with ack = received the same kill loses acked readings");
}
