//! Hostile LAN clients against the real binary (issue 19): who may speak for
//! which link, and a front door that holds under attack. Real clients
//! (mosquitto_pub/sub, raw sockets bound to chosen loopback addresses,
//! tungstenite) on free loopback ports; 127.0.0.2.. stand for other hosts.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PIPELINE: &str = "batch_max_age = \"50ms\"\nbatch_max_readings = 200";
const STORE: &str = "fsync_interval = \"50ms\"";

/// A gateway config whose `[broker]` body is `broker`; `extra` follows it (other tables).
fn config(dir: &Path, broker: &str, extra: &str) -> PathBuf {
    let path = write_config(dir, &[], PIPELINE, STORE);
    let mut s = std::fs::read_to_string(&path).unwrap();
    s += &format!("\n[broker]\n{broker}\n{extra}\n");
    std::fs::write(&path, s).unwrap();
    path
}

fn start_env(cfg: &Path, env: &[(&str, &str)]) -> Gateway {
    let gw = Gateway::start_with_env(cfg, env);
    let ok = wait_until(Duration::from_secs(30), || gw.log_text().contains("broker: ingest"));
    assert!(ok, "broker did not start; log:\n{}", gw.log_text());
    gw
}

fn start(cfg: &Path) -> Gateway {
    start_env(cfg, &[])
}

fn pub_args(port: u16, extra: &[&str]) -> Command {
    let mut c = Command::new("mosquitto_pub");
    c.args(["-h", "127.0.0.1", "-p", &port.to_string()]).args(extra);
    c
}

/// One QoS 1 reading from `from` (a loopback address); true when PUBACKed.
fn publish_from(port: u16, from: &str, auth: &[&str], device: &str, seq: u64) -> bool {
    let out = pub_args(port, &["-A", from, "-t", &format!("sensors/{device}/hr"), "-q", "1", "-m"])
        .arg(format!("{{\"seq\":{seq},\"value\":60}}"))
        .args(auth)
        .output()
        .expect("mosquitto_pub");
    if !out.status.success() {
        // Expected for refusals; when it is not, this says why (a CI run once
        // failed here with the reason thrown away).
        eprintln!(
            "mosquitto_pub {device} seq {seq} as user {:?}: {}; stderr: {}",
            auth.iter().skip_while(|a| **a != "-u").nth(1),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    out.status.success()
}

fn publish(port: u16, auth: &[&str], device: &str, seq: u64) -> bool {
    publish_from(port, "127.0.0.1", auth, device, seq)
}

fn subscriber(port: u16, args: &[&str]) -> Child {
    Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mosquitto_sub")
}

fn stop_child(mut c: Child) -> String {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::SIGTERM);
    let _ = c.wait();
    let mut out = String::new();
    let _ = c.stdout.take().unwrap().read_to_string(&mut out);
    out
}

fn queued(cfg: &Path) -> std::collections::HashMap<(String, String, u64), usize> {
    count_by_key(&queue_dump(cfg))
}

fn mqtt_str(x: &[u8]) -> Vec<u8> {
    [&(x.len() as u16).to_be_bytes()[..], x].concat()
}

/// Remaining length, MQTT's variable byte integer.
fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    [&[first][..], &varint(body.len()), body].concat()
}

/// A clean-session CONNECT, MQTT 3.1.1 (level 4) or 5, keep-alive 60.
fn connect_packet(level: u8, client_id: &str, login: Option<(&str, &str)>) -> Vec<u8> {
    let mut body = mqtt_str(b"MQTT");
    body.push(level);
    body.push(0x02 | if login.is_some() { 0xC0 } else { 0 });
    body.extend_from_slice(&60u16.to_be_bytes());
    if level == 5 {
        body.push(0); // no properties
    }
    body.extend(mqtt_str(client_id.as_bytes()));
    if let Some((u, p)) = login {
        body.extend(mqtt_str(u.as_bytes()));
        body.extend(mqtt_str(p.as_bytes()));
    }
    packet(0x10, &body)
}

/// A TCP connection to 127.0.0.1:`port` from `from`.
fn connect_from(from: &str, port: u16) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    s.bind(&local.into()).unwrap();
    let remote: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    s.connect(&remote.into()).unwrap();
    s.into()
}

/// Read one whole MQTT packet (None: closed, or nothing within 10 s).
fn read_packet(s: &mut TcpStream) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = [0u8; 1];
    s.read_exact(&mut head).ok()?;
    let (mut len, mut shift, mut lenbytes) = (0usize, 0, Vec::new());
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).ok()?;
        lenbytes.push(b[0]);
        len |= ((b[0] & 0x7f) as usize) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some([&head[..], &lenbytes, &body].concat())
}

/// The CONNACK code (v4 return code / v5 reason code), None when closed without one.
fn connack_code(s: &mut TcpStream) -> Option<u8> {
    let p = read_packet(s)?;
    let header = 1 + p[1..].iter().position(|b| b & 0x80 == 0)? + 1;
    (p[0] == 0x20).then(|| p[header + 1])
}

/// True when the server closes `s` within 10 s (EOF or reset), reading whatever it sends first.
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

fn hash(password: &str) -> String {
    let mut c = Command::new(bin()).arg("hash-password").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    c.stdin.take().unwrap().write_all(format!("{password}\n").as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

// ---------------------------------------------------------------- C1 --

#[test]
fn c1_no_client_id_can_take_the_ingest_link() {
    need("mosquitto_sub", "mosquitto-clients");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let h = hash("pw");
    let cfg = config(
        dir.path(),
        &format!(
            "enabled = true\ntcp = \"127.0.0.1:{port}\"\nallow_anonymous = true\n\
             [[broker.users]]\nname = \"edge-gateway\"\npassword_hash = \"{h}\"\n"
        ),
        "",
    );
    let gw = start(&cfg);
    assert!(publish(port, &[], "c1-dev", 1));
    // The old link id, the new one, and both under a user named like them.
    let user = ["-u", "edge-gateway", "-P", "pw"];
    let mut subs = Vec::new();
    for (id, auth) in [
        ("edge-gateway", &[][..]),
        ("edge-gateway%ingest", &[][..]),
        ("edge-gateway", &user[..]),
        ("edge-gateway%ingest", &user[..]),
        ("", &user[..]),
    ] {
        let mut args = vec!["-t", "x/y"];
        if !id.is_empty() {
            args.extend(["-i", id]);
        }
        args.extend(auth);
        subs.push(subscriber(port, &args));
    }
    std::thread::sleep(Duration::from_millis(500));
    // Every QoS 1 publish that is acked must be stored: with ack = "received"
    // rumqttd acks as soon as it has the message, so a dead link would drop them.
    for seq in 2..=6 {
        assert!(publish(port, &[], "c1-dev", seq), "publish {seq}; log:\n{}", gw.log_text());
    }
    let ok = wait_until(Duration::from_secs(10), || {
        (1..=6).all(|s| queued(&cfg).contains_key(&("c1-dev".into(), "hr".into(), s)))
    });
    assert!(ok, "acked readings not stored: {:?}\n{}", queued(&cfg), gw.log_text());
    assert!(!gw.log_text().contains("LAN ingest stop"), "{}", gw.log_text());
    for s in subs {
        stop_child(s);
    }
    terminate_ok(gw);
}

#[test]
fn c1_if_lan_ingest_dies_nothing_more_is_acked_and_the_gateway_exits_non_zero() {
    need("mosquitto_sub", "mosquitto-clients");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let body = format!("enabled = true\ntcp = \"127.0.0.1:{port}\"\nallow_anonymous = true\nack = \"durable\"");
    let cfg = config(dir.path(), &body, "");
    // Debug-build hook: client ids reach rumqttd unescaped and unprefixed,
    // so a client can still take the link's id and kill LAN ingest for real.
    let mut gw = start_env(&cfg, &[("EDGE_GATEWAY_BROKER_RAW_CLIENT_IDS", "1")]);
    assert!(publish(port, &[], "sup-dev", 1));
    // A steady publisher, one reading per process: success = PUBACKed.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = std::sync::Arc::new(std::sync::Mutex::new(vec![1u64]));
    let publisher = {
        let (stop, acked) = (stop.clone(), acked.clone());
        std::thread::spawn(move || {
            let mut seq = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seq += 1;
                if publish(port, &[], "sup-dev", seq) {
                    acked.lock().unwrap().push(seq);
                }
                std::thread::sleep(Duration::from_millis(30));
            }
        })
    };
    let going = wait_until(Duration::from_secs(20), || acked.lock().unwrap().len() >= 3);
    assert!(going, "the publisher got going; log:\n{}", gw.log_text());
    let thief = subscriber(port, &["-i", "edge-gateway%ingest", "-t", "x/y"]);
    let end = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = gw.child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > end {
            // Still running: kill it, so publishers waiting for acks end too.
            let _ = gw.child.kill();
            let _ = gw.child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    publisher.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    stop_child(thief);
    let log = gw.log_text();
    let status = status.unwrap_or_else(|| panic!("the gateway went on without LAN ingest; log:\n{log}"));
    assert!(!status.success(), "exit status {status:?} must be non-zero for systemd; log:\n{log}");
    assert!(log.contains("LAN ingest stopped"), "{log}");
    let keys = queued(&cfg);
    for s in &acked {
        assert!(keys.contains_key(&("sup-dev".into(), "hr".into(), *s)), "seq {s} acked, not stored: {keys:?}\n{log}");
    }
}

// ---------------------------------------------------------------- H1 --

#[test]
fn h1_a_thousand_half_open_sockets_from_one_host_keep_nobody_else_out() {
    need("mosquitto_pub", "mosquitto-clients");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Default max_connections (256): 1,024 handshake slots in all.
    let body = format!("enabled = true\ntcp = \"127.0.0.1:{port}\"\nallow_anonymous = true\nconnect_timeout = \"30s\"");
    let cfg = config(dir.path(), &body, "");
    let gw = start(&cfg);
    // 1,030 connections from 127.0.0.1 that send one byte (past the
    // first-byte deadline) and then nothing.
    let idle: Vec<TcpStream> = (0..1030)
        .map(|_| {
            let mut s = connect_from("127.0.0.1", port);
            s.write_all(&[0x10]).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        publish_from(port, "127.0.0.2", &[], "h1-other-host", 1),
        "another host is kept out; log:\n{}",
        gw.log_text()
    );
    let ok =
        wait_until(Duration::from_secs(10), || queued(&cfg).contains_key(&("h1-other-host".into(), "hr".into(), 1)));
    assert!(ok, "{}", gw.log_text());
    assert!(gw.log_text().contains("too many connections in their handshake from 127.0.0.1"), "{}", gw.log_text());
    drop(idle);

    // A socket that never sends a byte is closed long before connect_timeout (30 s).
    let mut silent = connect_from("127.0.0.3", port);
    assert!(closed_by_server(&mut silent), "a silent socket holds its slot until connect_timeout");
    terminate_ok(gw);
}

// ---------------------------------------------------------------- H2 --

/// Send `n` CONNECTs (MQTT 3.1.1) at once from `from`, then collect their CONNACK codes.
fn connect_burst(from: &str, port: u16, n: usize, login: (&str, &str)) -> Vec<Option<u8>> {
    connect_burst_level(4, from, port, n, login)
}

fn connect_burst_level(level: u8, from: &str, port: u16, n: usize, login: (&str, &str)) -> Vec<Option<u8>> {
    let mut socks: Vec<TcpStream> = (0..n)
        .map(|i| {
            let mut s = connect_from(from, port);
            s.write_all(&connect_packet(level, &format!("burst-{i}"), Some(login))).unwrap();
            s
        })
        .collect();
    socks.iter_mut().map(connack_code).collect()
}

#[test]
fn h2_a_password_flood_locks_nobody_out_and_backs_the_flooder_off() {
    need("mosquitto_pub", "mosquitto-clients");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let h = hash("good-pass");
    let body = format!(
        "enabled = true\ntcp = \"127.0.0.1:{port}\"\n\
         [[broker.users]]\nname = \"dev\"\npassword_hash = \"{h}\"\n\
         [[broker.users]]\nname = \"late\"\npassword_hash = \"{h}\"\n"
    );
    let cfg = config(dir.path(), &body, "");
    let gw = start(&cfg);
    let dev = ["-u", "dev", "-P", "good-pass"];
    assert!(publish_from(port, "127.0.0.2", &dev, "h2-dev", 1), "{}", gw.log_text());

    // 60 wrong passwords at once from two hosts (30 each: more from one
    // host would be cut by max_handshakes_per_address = 32 already).
    let flood = std::thread::spawn(move || {
        let other = std::thread::spawn(move || connect_burst("127.0.0.4", port, 30, ("dev", "wrong")));
        let mut codes = connect_burst("127.0.0.1", port, 30, ("dev", "wrong"));
        codes.extend(other.join().unwrap());
        codes
    });
    // Meanwhile a device that logged in before gets in from its own address.
    let mut seq = 1;
    for _ in 0..5 {
        seq += 1;
        assert!(
            publish_from(port, "127.0.0.2", &dev, "h2-dev", seq),
            "a known device during the flood\n{}",
            gw.log_text()
        );
    }
    let codes = flood.join().unwrap();
    let bad = codes.iter().filter(|c| **c == Some(4)).count();
    let busy = codes.iter().filter(|c| **c == Some(3)).count();
    assert_eq!(bad + busy, 60, "each got CONNACK 4 or 3: {codes:?}");
    assert!(busy > 0, "the password queue is bounded: later CONNECTs are refused at once: {codes:?}");

    // A guesser (one at a time, so every guess is checked) is soon backing
    // off, growing from 1 s; then even the right password waits.
    let mut codes = Vec::new();
    while codes.len() < 12 && codes.last() != Some(&Some(3)) {
        let mut s = connect_from("127.0.0.3", port);
        s.write_all(&connect_packet(4, "guesser", Some(("dev", "guess")))).unwrap();
        codes.push(connack_code(&mut s));
    }
    assert_eq!(codes.last(), Some(&Some(3)), "the guesser backs off: {codes:?}");
    assert!(codes[..3].iter().all(|c| *c == Some(4)), "three free failures: {codes:?}");
    let mut s = connect_from("127.0.0.3", port);
    s.write_all(&connect_packet(4, "guesser", Some(("dev", "good-pass")))).unwrap();
    assert_eq!(connack_code(&mut s), Some(3), "backing off: not even checked");
    let mut s = connect_from("127.0.0.3", port);
    s.write_all(&connect_packet(5, "guesser-v5", Some(("dev", "good-pass")))).unwrap();
    assert_eq!(connack_code(&mut s), Some(0x9F), "MQTT 5: connection rate exceeded");
    // A valid login in between does not wipe an address's failures: else
    // one account would reset the backoff between guesses at another.
    let mut codes = Vec::new();
    for password in ["guess-1", "guess-2", "good-pass", "guess-3", "guess-4"] {
        let mut s = connect_from("127.0.0.7", port);
        s.write_all(&connect_packet(4, "mixed", Some(("dev", password)))).unwrap();
        codes.push(connack_code(&mut s));
    }
    assert_eq!(codes, [Some(4), Some(4), Some(0), Some(4), Some(3)], "the third failure starts the backoff");
    // A first-time login from elsewhere is checked (nothing left queued).
    assert!(publish_from(port, "127.0.0.2", &["-u", "late", "-P", "good-pass"], "h2-late", 1), "{}", gw.log_text());
    let log = gw.log_text();
    assert!(!log.contains("internal listener stopped answering"), "late logins blamed on rumqttd:\n{log}");
    assert!(!log.contains("good-pass") && !log.contains("wrong"), "no secrets in the log");
    terminate_ok(gw);
}

#[test]
fn h2_an_unknown_user_costs_a_password_check_like_a_known_one() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let h = hash("good-pass");
    let body = format!(
        "enabled = true\ntcp = \"127.0.0.1:{port}\"\n[[broker.users]]\nname = \"dev\"\npassword_hash = \"{h}\"\n"
    );
    let cfg = config(dir.path(), &body, "");
    let gw = start(&cfg);
    // Refused at once without a check, an unknown user would tell the name
    // does not exist (and never fill the queue); checked against the dummy
    // hash, a burst of them queues like wrong passwords for a known user.
    // MQTT 5 reason codes tell the refusals apart: 0x86 checked and wrong,
    // 0x89 queue full (server busy), 0x9F the address backing off.
    for (from, user) in [("127.0.0.5", "nobody"), ("127.0.0.6", "dev")] {
        let codes = connect_burst_level(5, from, port, 30, (user, "wrong"));
        let count = |c: u8| codes.iter().filter(|x| **x == Some(c)).count();
        assert_eq!(count(0x86) + count(0x89) + count(0x9F), 30, "{user}: {codes:?}");
        assert!(count(0x89) > 0, "{user}: the burst filled the password queue: {codes:?}");
    }
    terminate_ok(gw);
}

// ---------------------------------------------------------------- M1 --

fn ws_client(port: u16) -> TcpStream {
    use async_tungstenite::tungstenite::{self, client::IntoClientRequest};
    let mut req = format!("ws://127.0.0.1:{port}/mqtt").into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (ws, _) = tungstenite::client(req, sock).expect("WebSocket handshake");
    ws.get_ref().try_clone().unwrap()
}

/// A masked client frame header: `fin`, `opcode`, 64-bit length, zero mask.
fn ws_frame_header(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
    let mut h = vec![if fin { 0x80 } else { 0 } | opcode, 0x80 | 127];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0]); // mask key 0: the payload goes as is
    h
}

#[test]
fn m1_websocket_frames_and_messages_are_bounded_before_any_login() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let body =
        format!("enabled = true\nwebsocket = \"127.0.0.1:{port}\"\nallow_anonymous = true\nconnect_timeout = \"30s\"");
    let cfg = config(dir.path(), &body, "");
    let gw = start(&cfg);
    // One 16 MiB frame announced: refused on its header, not after 16 MiB.
    let mut s = ws_client(port);
    s.write_all(&ws_frame_header(true, 2, 16 << 20)).unwrap();
    let _ = s.write_all(&[0u8; 1024]);
    assert!(closed_by_server(&mut s), "a 16 MiB frame is read (connect_timeout 30 s)");
    // A message in 64 KiB fragments: refused once past max_payload + overhead (~330 KiB).
    let mut s = ws_client(port);
    let chunk = vec![0u8; 64 << 10];
    for i in 0..12 {
        let opcode = if i == 0 { 2 } else { 0 };
        if s.write_all(&ws_frame_header(false, opcode, chunk.len() as u64)).is_err() || s.write_all(&chunk).is_err() {
            break;
        }
    }
    assert!(closed_by_server(&mut s), "a 768 KiB message is buffered");
    // A normal client still gets in.
    let mut s = ws_client(port);
    let mut ws = async_tungstenite::tungstenite::WebSocket::from_raw_socket(
        s.try_clone().unwrap(),
        async_tungstenite::tungstenite::protocol::Role::Client,
        None,
    );
    ws.send(async_tungstenite::tungstenite::Message::Binary(connect_packet(4, "ws-ok", None).into())).unwrap();
    let m = ws.read().expect("CONNACK");
    assert_eq!(&m.into_data()[..4], &[0x20, 2, 0, 0]);
    drop(s.flush());
    terminate_ok(gw);
}

// ------------------------------------------------------------ M2, M2b --

#[test]
fn m2_an_empty_topic_is_refused_and_cannot_cut_off_wildcard_subscribers() {
    need("mosquitto_sub", "mosquitto-clients");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let body = format!("enabled = true\ntcp = \"127.0.0.1:{port}\"\nallow_anonymous = true\nstatus_topic = \"\"");
    let cfg = config(dir.path(), &body, "");
    let gw = start(&cfg);
    let sub = subscriber(port, &["-t", "#", "-v"]);
    std::thread::sleep(Duration::from_millis(500));
    // A retained QoS 0 PUBLISH to "".
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&connect_packet(4, "empty-topic", None)).unwrap();
    assert_eq!(connack_code(&mut s), Some(0));
    s.write_all(&packet(0x31, &[mqtt_str(b""), b"x".to_vec()].concat())).unwrap();
    assert!(closed_by_server(&mut s), "a PUBLISH to the empty topic disconnects");
    assert!(publish(port, &[], "m2-after", 1));
    std::thread::sleep(Duration::from_millis(500));
    // A late `#` subscriber is not cut off by anything retained either.
    let late = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "#", "-v", "-C", "1", "-W", "5"])
        .output()
        .unwrap();
    let seen = stop_child(sub);
    assert!(seen.contains("readings/m2-after/hr"), "the # subscriber was cut off: {seen:?}\n{}", gw.log_text());
    assert!(late.status.success(), "late # subscriber: {late:?}");
    assert!(gw.log_text().contains("published to an empty topic"), "{}", gw.log_text());
    terminate_ok(gw);
}

#[test]
fn m2b_mqtt5_clients_are_offered_no_topic_aliases_and_cannot_use_them() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let body = format!("enabled = true\ntcp = \"127.0.0.1:{port}\"\nallow_anonymous = true\nack = \"durable\"");
    let cfg = config(dir.path(), &body, "");
    let gw = start(&cfg);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&connect_packet(5, "alias-user", None)).unwrap();
    let ack = read_packet(&mut s).unwrap_or_else(|| panic!("no CONNACK; log:\n{}", gw.log_text()));
    assert_eq!((ack[0], ack[3]), (0x20, 0), "{ack:?}");
    // Properties: id 0x22 is Topic Alias Maximum (absent = 0).
    let props = &ack[5..];
    let mut i = 0;
    while i < props.len() {
        let id = props[i];
        assert_ne!(id, 0x22, "CONNACK advertises topic aliases: {ack:?}");
        i += 1 + match id {
            0x24 | 0x25 | 0x28 | 0x29 | 0x2A | 0x01 | 0x17 | 0x19 => 1,
            0x13 | 0x21 | 0x23 => 2,
            0x11 | 0x27 | 0x02 | 0x18 => 4,
            0x12 | 0x1A | 0x1C | 0x1F | 0x15 | 0x16 => 2 + u16::from_be_bytes([props[i + 1], props[i + 2]]) as usize,
            0x26 => {
                let k = u16::from_be_bytes([props[i + 1], props[i + 2]]) as usize;
                2 + k + 2 + u16::from_be_bytes([props[i + 3 + k], props[i + 4 + k]]) as usize
            }
            other => panic!("unexpected property {other:#x} in {ack:?}"),
        };
    }
    // Set alias 1 on a reading, then use it with an empty topic: disconnected, not stored twice.
    let reading = br#"{"seq":1,"value":1}"#;
    let set = [mqtt_str(b"sensors/alias-01/hr"), vec![0, 1, 3, 0x23, 0, 1], reading.to_vec()].concat();
    s.write_all(&packet(0x32, &set)).unwrap();
    let used = [mqtt_str(b""), vec![0, 2, 3, 0x23, 0, 1], br#"{"seq":2,"value":2}"#.to_vec()].concat();
    s.write_all(&packet(0x32, &used)).unwrap();
    assert!(closed_by_server(&mut s), "a topic-alias PUBLISH disconnects");
    std::thread::sleep(Duration::from_millis(500));
    let keys = queued(&cfg);
    assert!(!keys.contains_key(&("alias-01".into(), "hr".into(), 2)), "{keys:?}");
    terminate_ok(gw);
}

// ---------------------------------------------------------------- M3 --

#[test]
fn m3_one_user_cannot_invent_devices_without_bound() {
    need("mosquitto_pub", "mosquitto-clients");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let h = hash("pw");
    let body = format!(
        "enabled = true\ntcp = \"127.0.0.1:{port}\"\nmax_devices_per_user = 3\n\
         [[broker.users]]\nname = \"a\"\npassword_hash = \"{h}\"\n\
         [[broker.users]]\nname = \"b\"\npassword_hash = \"{h}\"\n"
    );
    let cfg = config(dir.path(), &body, "");
    let gw = start(&cfg);
    let a = ["-u", "a", "-P", "pw"];
    for d in 1..=3 {
        assert!(publish(port, &a, &format!("m3-a{d}"), 1), "device {d} of 3; gateway log:\n{}", gw.log_text());
    }
    assert!(!publish(port, &a, "m3-a4", 1), "a fourth device for user a");
    assert!(publish(port, &a, "m3-a1", 2), "known devices go on");
    assert!(publish(port, &["-u", "b", "-P", "pw"], "m3-b1", 1), "the cap is per user");
    let ok = wait_until(Duration::from_secs(10), || queued(&cfg).contains_key(&("m3-b1".into(), "hr".into(), 1)));
    assert!(ok);
    let keys = queued(&cfg);
    assert!(!keys.keys().any(|(d, ..)| d == "m3-a4"), "{keys:?}");
    assert!(keys.contains_key(&("m3-a1".into(), "hr".into(), 2)));
    assert!(gw.log_text().contains("max_devices_per_user"), "{}", gw.log_text());
    terminate_ok(gw);
}

// ---------------------------------------------------------------- H3 --

/// A rogue dock names a wearable docked elsewhere, with seqs far ahead of
/// it, for longer than `ack_gap_timeout`. Without `devices` its readings
/// were stored under the wearable's name, where they could move its
/// watermark and its ack route (planted: the test fails at "the rogue's
/// readings were stored"). With `devices` they are refused and counted,
/// and the wearable is acked for exactly what it sent.
#[test]
fn h3_a_dock_cannot_speak_for_a_wearable_it_may_not() {
    use edge_gateway::config::Framing;
    let dir = tempfile::tempdir().unwrap();
    let (mut real, real_path) = device("wrist-00", Framing::Jsonl, 11, 0.0);
    let rogue = edge_gateway::demo::sim::open_pty().unwrap();
    let mut rogue_w = rogue.master.try_clone().unwrap();
    // Drain what the gateway writes back (acks), so it never blocks.
    let mut rogue_r = rogue.master.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while rogue_r.read(&mut buf).is_ok_and(|n| n > 0) {}
    });
    let body = format!(
        "[gateway]\nid = \"test-gw\"\ndata_dir = {:?}\n\n\
         [[serial]]\nname = \"dock0\"\npath = {:?}\ndevices = [\"wrist-*\"]\n\n\
         [[serial]]\nname = \"rogue\"\npath = {:?}\ndevices = [\"rogue-*\"]\n\n\
         [pipeline]\n{PIPELINE}\nack_gap_timeout = \"1s\"\n\n[store]\n{STORE}\n\n[metrics]\nenabled = false\n",
        dir.path().join("data").display().to_string(),
        real_path.display().to_string(),
        rogue.slave_path.display().to_string(),
    );
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(&cfg, body).unwrap();
    let gw = Gateway::start(&cfg);
    assert!(wait_until(Duration::from_secs(30), || gw.log_text().contains("running with")), "{}", gw.log_text());
    let until = Instant::now() + Duration::from_secs(4);
    let mut i = 0u64;
    while Instant::now() < until {
        real.send_next().unwrap();
        for (device, seq) in [("wrist-00", 1000 + i), ("rogue-1", i)] {
            let line = format!("{{\"device\":\"{device}\",\"sensor\":\"hr\",\"seq\":{seq},\"value\":1}}\n");
            rogue_w.write_all(line.as_bytes()).unwrap();
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(real.wait_all_acked(Duration::from_secs(30)).unwrap(), "{:?}\n{}", real.stats(), gw.log_text());
    let last_sent = real.next_seq() - 1;
    let acked = real.stats().acked_through;
    assert_eq!(acked, Some(last_sent), "the wearable must be acked for what it sent, no further");
    let (log, _) = terminate_ok(gw);
    let keys = queued(&cfg);
    assert!(!keys.keys().any(|(d, _, seq)| d == "wrist-00" && *seq >= 1000), "the rogue's readings were stored");
    assert_eq!(keys.keys().filter(|(d, ..)| d == "wrist-00").count() as u64, last_sent + 1);
    assert!(keys.contains_key(&("rogue-1".into(), "hr".into(), 0)), "the rogue's own devices still go through");
    assert_eq!(summary_number(&log, "readings refused (serial port may not speak for the device)"), i, "{log}");
    assert!(log.contains("serial rogue: may not speak for device \"wrist-00\""), "{log}");
}

/// LAN logins are bound to their devices: a user's own list, the default
/// `broker.devices` with `{user}` (password_file users too), anonymous.
#[test]
fn h3_a_lan_user_cannot_speak_for_another_users_devices() {
    need("mosquitto_pub", "mosquitto-clients");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let h = hash("pw");
    let pwfile = dir.path().join("passwd");
    std::fs::write(&pwfile, format!("carol:{h}\n")).unwrap();
    std::fs::set_permissions(&pwfile, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let body = format!(
        "enabled = true\ntcp = \"127.0.0.1:{port}\"\nallow_anonymous = true\n\
         devices = [\"{{user}}-*\"]\nanonymous_devices = [\"guest-*\"]\npassword_file = {:?}\n\
         [[broker.users]]\nname = \"alice\"\npassword_hash = \"{h}\"\ndevices = [\"ward3-*\"]\n\
         [[broker.users]]\nname = \"bob\"\npassword_hash = \"{h}\"\n",
        pwfile.display().to_string()
    );
    let cfg = config(dir.path(), &body, "[metrics]\nenabled = false\n");
    let gw = start(&cfg);
    let login = |u: &'static str| -> Vec<&'static str> { vec!["-u", u, "-P", "pw"] };
    let cases: [(&[&str], &str, bool); 8] = [
        (&login("alice"), "ward3-01", true),
        (&login("alice"), "alice-01", false), // her own list, not the default
        (&login("bob"), "bob-01", true),
        (&login("bob"), "ward3-01", false),
        (&login("carol"), "carol-01", true), // password_file: the default
        (&login("carol"), "bob-01", false),
        (&[], "guest-01", true),
        (&[], "ward3-01", false),
    ];
    for (auth, device, ok) in cases {
        assert_eq!(publish(port, auth, device, 7), ok, "{auth:?} for {device}\n{}", gw.log_text());
    }
    let ok = wait_until(Duration::from_secs(10), || queued(&cfg).len() == 4);
    let keys = queued(&cfg);
    assert!(ok, "{keys:?}");
    for d in ["ward3-01", "bob-01", "carol-01", "guest-01"] {
        assert_eq!(keys.get(&(d.to_string(), "hr".to_string(), 7)), Some(&1), "{keys:?}");
    }
    let (log, _) = terminate_ok(gw);
    assert_eq!(summary_number(&log, "readings refused (LAN user may not speak for the device)"), 4, "{log}");
    assert!(log.contains("which user \"bob\" may not speak for; disconnected"), "{log}");
}

// ---------------------------------------------------------------- M4 --

#[test]
fn m4_one_user_cannot_kick_another_users_session() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let h = hash("pw");
    let body = format!(
        "enabled = true\ntcp = \"127.0.0.1:{port}\"\nallow_anonymous = true\n\
         [[broker.users]]\nname = \"alice\"\npassword_hash = \"{h}\"\n\
         [[broker.users]]\nname = \"mallory\"\npassword_hash = \"{h}\"\n"
    );
    let cfg = config(dir.path(), &body, "");
    let gw = start(&cfg);
    let mut alice = TcpStream::connect(("127.0.0.1", port)).unwrap();
    alice.write_all(&connect_packet(4, "wrist-07", Some(("alice", "pw")))).unwrap();
    assert_eq!(connack_code(&mut alice), Some(0));
    for login in [Some(("mallory", "pw")), None] {
        let mut m = TcpStream::connect(("127.0.0.1", port)).unwrap();
        m.write_all(&connect_packet(4, "wrist-07", login)).unwrap();
        assert_eq!(connack_code(&mut m), Some(0));
        std::thread::sleep(Duration::from_millis(300));
        // Alice's connection is still hers: PINGREQ → PINGRESP.
        alice.write_all(&[0xC0, 0]).unwrap();
        assert_eq!(read_packet(&mut alice), Some(vec![0xD0, 0]), "{login:?} took alice's session");
    }
    // The same user with the same id still replaces its own session (MQTT's rule).
    let mut again = TcpStream::connect(("127.0.0.1", port)).unwrap();
    again.write_all(&connect_packet(4, "wrist-07", Some(("alice", "pw")))).unwrap();
    assert_eq!(connack_code(&mut again), Some(0));
    assert!(closed_by_server(&mut alice), "a reconnecting device replaces its old connection");
    terminate_ok(gw);
}

// --------------------------------------------------------------- Low --

#[test]
fn low_per_user_cap_websocket_origins_and_keep_alive_zero() {
    use async_tungstenite::tungstenite::{self, client::IntoClientRequest};
    let dir = tempfile::tempdir().unwrap();
    let (port, ws_port) = (free_port(), free_port());
    let h = hash("pw");
    let body = format!(
        "enabled = true\ntcp = \"127.0.0.1:{port}\"\nwebsocket = \"127.0.0.1:{ws_port}\"\nallow_anonymous = true\n\
         max_connections_per_user = 2\nwebsocket_origins = [\"https://dash.example\"]\n\
         [[broker.users]]\nname = \"u\"\npassword_hash = \"{h}\"\n"
    );
    let cfg = config(dir.path(), &body, "");
    let gw = start(&cfg);
    let mut held = Vec::new();
    for i in 0..2 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(&connect_packet(4, &format!("u-{i}"), Some(("u", "pw")))).unwrap();
        assert_eq!(connack_code(&mut s), Some(0));
        held.push(s);
    }
    let mut third = TcpStream::connect(("127.0.0.1", port)).unwrap();
    third.write_all(&connect_packet(4, "u-2", Some(("u", "pw")))).unwrap();
    assert_eq!(connack_code(&mut third), Some(3), "max_connections_per_user");
    let mut anon = TcpStream::connect(("127.0.0.1", port)).unwrap();
    anon.write_all(&connect_packet(4, "anon-1", None)).unwrap();
    assert_eq!(connack_code(&mut anon), Some(0), "another user is not affected");
    drop(held);

    // Keep-alive 0 (rumqttd alone refuses it) is let in.
    let mut c = connect_packet(4, "ka0", None);
    let at = c.len() - mqtt_str(b"ka0").len() - 2;
    c[at..at + 2].copy_from_slice(&[0, 0]);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&c).unwrap();
    assert_eq!(connack_code(&mut s), Some(0), "keep-alive 0");
    // And the gateway's end of the socket has TCP keep-alive on (`ss -o` shows its timer).
    need("ss", "iproute2");
    let me = s.local_addr().unwrap().port();
    // (Polled: while a segment is unacknowledged the timer shown is the retransmit one.)
    let mut ss = String::new();
    let keepalive = wait_until(Duration::from_secs(5), || {
        let out = Command::new("ss").args(["-tnoH", "state", "established"]).output().unwrap();
        ss = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = ss.lines();
        lines.any(|l| {
            l.contains(&format!("127.0.0.1:{port} ")) && l.contains(&format!(":{me} ")) && l.contains("keepalive")
        })
    });
    assert!(keepalive, "no TCP keep-alive on the gateway's socket:\n{ss}");

    // WebSocket Origin: a foreign page is refused, the dashboard and non-browser clients are not.
    let ws = |origin: Option<&str>| {
        let mut req = format!("ws://127.0.0.1:{ws_port}/mqtt").into_client_request().unwrap();
        req.headers_mut().insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
        if let Some(o) = origin {
            req.headers_mut().insert("Origin", o.parse().unwrap());
        }
        let sock = TcpStream::connect(("127.0.0.1", ws_port)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // Ok, or the HTTP status of a refusal (0: failed otherwise).
        tungstenite::client(req, sock).map(|_| ()).map_err(|e| match e {
            tungstenite::handshake::HandshakeError::Failure(tungstenite::Error::Http(r)) => r.status().as_u16(),
            _ => 0,
        })
    };
    assert_eq!(ws(Some("https://evil.example")), Err(403), "a foreign Origin");
    assert_eq!(ws(Some("https://dash.example")), Ok(()));
    assert_eq!(ws(None), Ok(()));
    terminate_ok(gw);
}

#[test]
fn low_metrics_off_loopback_warns_and_idle_sockets_do_not_block_a_scrape() {
    let dir = tempfile::tempdir().unwrap();
    let (port, mport) = (free_port(), free_port());
    let body = format!("enabled = true\ntcp = \"127.0.0.1:{port}\"\nallow_anonymous = true");
    let cfg = config(dir.path(), &body, &format!("[metrics]\nlisten = \"0.0.0.0:{mport}\""));
    let gw = start(&cfg);
    assert!(gw.log_text().contains("is not loopback"), "{}", gw.log_text());
    let idle: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(("127.0.0.1", mport)).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    // fetch_metrics gives up after 3 s; eight idle sockets used to hold every slot for 5 s.
    assert!(fetch_metrics(mport).contains("broker_refused_total"));
    drop(idle);
    terminate_ok(gw);
}

#[test]
fn low_the_data_dir_is_private_and_readable_secrets_are_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let pwfile = dir.path().join("passwd");
    std::fs::write(&pwfile, format!("dev:{}\n", hash("pw"))).unwrap();
    std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o644)).unwrap();
    let body =
        format!("enabled = true\ntcp = \"127.0.0.1:{port}\"\npassword_file = {:?}", pwfile.display().to_string());
    let cfg = config(dir.path(), &body, "");
    let gw = start(&cfg);
    assert!(publish(port, &["-u", "dev", "-P", "pw"], "perm-01", 1));
    let data = dir.path().join("data");
    assert!(wait_until(Duration::from_secs(10), || queue_dump(&cfg).len() == 1));
    let log = gw.log_text();
    assert!(log.contains("passwd") && log.contains("readable by group or others"), "{log}");
    terminate_ok(gw);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "data_dir");
    let mut files = 0;
    let mut stack = vec![data];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            assert_eq!(mode(&p) & 0o077, 0, "{} is open to group/others", p.display());
            if p.is_dir() {
                stack.push(p);
            } else {
                files += 1;
            }
        }
    }
    assert!(files > 0);
}
