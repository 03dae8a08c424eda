//! A real Mosquitto as the upstream broker: TLS listener with certificates
//! made at test time, a plaintext loopback listener for the test's own
//! subscriber, persistence on. And a persistent QoS 2 subscriber
//! (`mosquitto_sub`) that records every payload it receives.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use super::{free_port, need};

/// PEM files: a CA, a server cert for `localhost` signed by it, a client
/// cert signed by it, an expired client cert, and an unrelated CA.
pub struct Certs {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub expired_cert: PathBuf,
    pub expired_key: PathBuf,
    pub other_ca: PathBuf,
}

pub fn make_certs(dir: &Path) -> Certs {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_params = |name: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p
    };
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params("edge-gateway test CA").self_signed(&ca_key).unwrap();
    let other_key = KeyPair::generate().unwrap();
    let other = ca_params("some other CA").self_signed(&other_key).unwrap();
    let leaf = |sans: Vec<String>, cn: &str, expired: bool| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into()], "localhost", false);
    let (client_cert, client_key) = leaf(vec![], "edge-gateway-client", false);
    let (expired_cert, expired_key) = leaf(vec![], "edge-gateway-expired", true);
    let w = |name: &str, body: String| {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    Certs {
        ca: w("ca.pem", ca.pem()),
        server_cert: w("server.pem", server_cert),
        server_key: w("server.key", server_key),
        client_cert: w("client.pem", client_cert),
        client_key: w("client.key", client_key),
        expired_cert: w("expired.pem", expired_cert),
        expired_key: w("expired.key", expired_key),
        other_ca: w("other-ca.pem", other.pem()),
    }
}

pub struct Mosquitto {
    pub dir: PathBuf,
    pub tls_port: u16,
    pub plain_port: u16,
    conf: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    /// Start on free ports in `dir` (which holds the config, log and database).
    pub fn start(dir: &Path, certs: &Certs, require_certificate: bool) -> Mosquitto {
        Self::start_with(dir, certs, require_certificate, "")
    }

    /// [`Mosquitto::start`] with `extra` global config lines.
    pub fn start_with(dir: &Path, certs: &Certs, require_certificate: bool, extra: &str) -> Mosquitto {
        Self::start_full(dir, certs, require_certificate, extra, None)
    }

    /// The TLS listener takes only `user` with `password` (anonymous clients
    /// are refused there); the plain listener stays open for the test's subscriber.
    pub fn start_with_password(dir: &Path, certs: &Certs, user: &str, password: &str) -> Mosquitto {
        need("mosquitto_passwd", "mosquitto");
        std::fs::create_dir_all(dir).unwrap();
        let file = dir.join("passwd");
        let ok = Command::new("mosquitto_passwd")
            .args(["-c", "-b"])
            .arg(&file)
            .args([user, password])
            .status()
            .expect("mosquitto_passwd")
            .success();
        assert!(ok, "mosquitto_passwd failed");
        Self::start_full(dir, certs, false, "", Some(&file))
    }

    fn start_full(
        dir: &Path,
        certs: &Certs,
        require_certificate: bool,
        extra: &str,
        passwd: Option<&Path>,
    ) -> Mosquitto {
        need("mosquitto", "mosquitto");
        std::fs::create_dir_all(dir).unwrap();
        let (tls_port, plain_port) = (free_port(), free_port());
        let conf = dir.join("mosquitto.conf");
        let text = format!(
            "per_listener_settings true\nuser root\n\
             persistence true\npersistence_location {db}/\nautosave_interval 1\n\
             max_queued_messages 1000000\n{extra}\n\
             log_dest file {db}/mosquitto.log\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
             listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\nrequire_certificate {req}\n{auth}\n\
             listener {plain_port} 127.0.0.1\nallow_anonymous true\n",
            auth = match passwd {
                Some(f) => format!("allow_anonymous false\npassword_file {}", f.display()),
                None => "allow_anonymous true".into(),
            },
            db = dir.display(),
            ca = certs.ca.display(),
            cert = certs.server_cert.display(),
            key = certs.server_key.display(),
            req = require_certificate,
        );
        std::fs::write(&conf, text).unwrap();
        let mut m = Mosquitto { dir: dir.to_path_buf(), tls_port, plain_port, conf, child: None };
        m.restart();
        m
    }

    /// [`Mosquitto::start_with`], plus `tls_extra` lines in the TLS
    /// listener's own section (with `per_listener_settings` that is where
    /// `acl_file` goes). The plain listener stays open to anyone.
    pub fn start_tls_extra(dir: &Path, certs: &Certs, extra: &str, tls_extra: &str) -> Mosquitto {
        need("mosquitto", "mosquitto");
        std::fs::create_dir_all(dir).unwrap();
        let (tls_port, plain_port) = (free_port(), free_port());
        let conf = dir.join("mosquitto.conf");
        let text = format!(
            "per_listener_settings true\nuser root\n\
             persistence true\npersistence_location {db}/\nautosave_interval 1\n\
             max_queued_messages 1000000\n{extra}\n\
             log_dest file {db}/mosquitto.log\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
             listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\nrequire_certificate false\n\
             allow_anonymous true\n{tls_extra}\n\
             listener {plain_port} 127.0.0.1\nallow_anonymous true\n",
            db = dir.display(),
            ca = certs.ca.display(),
            cert = certs.server_cert.display(),
            key = certs.server_key.display(),
        );
        std::fs::write(&conf, text).unwrap();
        let mut m = Mosquitto { dir: dir.to_path_buf(), tls_port, plain_port, conf, child: None };
        m.restart();
        m
    }

    /// SIGHUP: Mosquitto re-reads its config's ACL and password files.
    pub fn reload(&self) {
        if let Some(c) = &self.child {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::SIGHUP).unwrap();
        }
    }

    /// Start again on the same ports (after `stop` or `kill9`).
    /// The broker process's pid (it must be running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        let port = self.plain_port;
        let up =
            super::wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(up, "mosquitto did not start; log:\n{}", self.log());
    }

    /// SIGTERM: Mosquitto saves its database (sessions included) and exits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::SIGTERM);
            let _ = c.wait();
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn db(&self) -> PathBuf {
        self.dir.join("mosquitto.db")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `mosquitto_sub` with a persistent session (clean session off, QoS 2),
/// printing each payload as hex on its own line into a file.
pub struct Subscriber {
    child: Child,
    out: PathBuf,
}

impl Subscriber {
    pub fn start(port: u16, id: &str, topic: &str, out: &Path) -> Subscriber {
        need("mosquitto_sub", "mosquitto-clients");
        need("mosquitto_pub", "mosquitto-clients");
        let file = std::fs::File::create(out).unwrap();
        // A second filter, for a probe: once a probe published there comes
        // out, the subscription is in place. (`-d` would say so too, but its
        // unflushed debug lines slow the subscriber down enough to change
        // what a broker holds for it at a SIGKILL.)
        let probe = format!("edge-test-probe/{id}");
        let mut child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-i", id, "-c", "-q", "2", "-t", topic, "-t", &probe])
            .args(["-F", "%t %x"])
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto_sub");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("mosquitto_sub exited ({status}) before subscribing");
            }
            let _ = Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", &probe, "-m", "probe"])
                .output();
            if super::wait_until(Duration::from_millis(300), || {
                std::fs::read_to_string(out).is_ok_and(|t| t.lines().any(|l| l.starts_with(&format!("{probe} "))))
            }) {
                break;
            }
            assert!(Instant::now() < deadline, "mosquitto_sub did not subscribe within 10 s");
        }
        Subscriber { child, out: out.to_path_buf() }
    }

    /// (topic, payload) of every message received so far. Only whole lines:
    /// mosquitto_sub's output is block-buffered, so a read can end in the
    /// middle of a message that is still being written.
    pub fn messages(&self) -> Vec<(String, Vec<u8>)> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        whole
            .lines()
            .filter_map(|l| {
                let (t, hex) = l.split_once(' ')?;
                if t.starts_with("edge-test-probe/") {
                    return None;
                }
                let bytes = (0..hex.len() / 2)
                    .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
                    .collect::<Option<Vec<u8>>>()?;
                Some((t.to_string(), bytes))
            })
            .collect()
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Decoded batches: `(gateway, batch)` → readings, plus how often each
/// batch arrived.
pub struct Received {
    pub batches: HashMap<(String, u64), usize>,
    /// `(device, sensor, seq)` → times seen, over every message (duplicate batches counted twice).
    pub readings: HashMap<(String, String, u64), usize>,
    /// Readings per device in arrival order: (seq).
    pub order: HashMap<String, Vec<u64>>,
    pub total_readings: usize,
}

pub fn decode_all(msgs: &[(String, Vec<u8>)]) -> Received {
    let mut r =
        Received { batches: HashMap::new(), readings: HashMap::new(), order: HashMap::new(), total_readings: 0 };
    for (_, payload) in msgs {
        let b = edge_gateway::Batch::decode(payload).expect("payload is a batch");
        *r.batches.entry((b.gateway.clone(), b.batch)).or_default() += 1;
        for x in &b.readings {
            let seq = x.seq.expect("seq");
            *r.readings.entry((x.device.clone(), x.sensor.clone(), seq)).or_default() += 1;
            r.order.entry(x.device.clone()).or_default().push(seq);
            r.total_readings += 1;
        }
    }
    r
}

/// Wait until `f(received)` holds, polling the subscriber's output.
pub fn wait_received(sub: &Subscriber, timeout: Duration, mut f: impl FnMut(&Received) -> bool) -> Received {
    let end = Instant::now() + timeout;
    loop {
        let r = decode_all(&sub.messages());
        if f(&r) || Instant::now() >= end {
            return r;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Missing and duplicated readings at the reading level.
pub fn missing_and_doubled(devices: &[edge_gateway::demo::sim::SimDevice], got: &Received) -> (usize, usize, usize) {
    let (mut missing, mut doubled, mut expected) = (0, 0, 0);
    let mut known = 0;
    for d in devices {
        for r in d.created() {
            expected += 1;
            match got.readings.get(&(r.device.clone(), r.sensor.clone(), r.seq.unwrap())) {
                None => missing += 1,
                Some(n) => {
                    known += n;
                    doubled += n - 1;
                }
            }
        }
    }
    // Readings no device sent count as extra too: (expected, 0, 0) means
    // exactly the readings sent, each once.
    (expected, missing, doubled + (got.total_readings - known))
}
