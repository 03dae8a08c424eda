//! The uplink: drains the queue to the upstream broker, in order, exactly once.
//!
//! One batch = one queue record = one MQTT message on `topic`. A batch
//! leaves the queue (`ack_through`) only after PUBCOMP (QoS 2) or PUBACK
//! (QoS 1). The QoS 2 sender is our own ([`codec`] + this file), because
//! each step must happen in a known order relative to the disk:
//!
//! | step | on disk first | after a crash the next run sends |
//! |---|---|---|
//! | PUBLISH batch N | nothing: its packet id is [`inflight::packet_id`]`(N)` | PUBLISH, DUP=1, same id |
//! | PUBREC for N arrives | "N got PUBREC" in [`inflight::PubrecLog`], fdatasynced | PUBREL, same id |
//! | PUBCOMP for N arrives | nothing yet; the ack of N reaches the queue's ledger at the next commit | PUBREL again (answered with PUBCOMP) |
//!
//! A resumed session (CONNACK session-present) gets exactly those packets.
//! A lost session (broker restarted without persistence, session expired)
//! gets every unfinished batch again as a new message, counted in
//! `batches_resent_session_lost`; consumers dedup by `(gateway, batch)`.
//! Under MQTT 5 a PUBREC/PUBACK with a reason code >= 0x80 (e.g. 0x97 quota
//! exceeded) means "not delivered": the batch is sent again after a pause.
//!
//! The uplink runs on its own OS thread with a single-threaded runtime: it
//! reads the queue and fsyncs its log, and must not stall the sources.

pub mod codec;
pub mod inflight;
pub mod tls;

use crate::config::{BrokerUrl, MqttProtocol, UpstreamConfig};
use crate::metrics::Metrics;
use crate::queue::{Queue, QueueError};
use crate::shutdown;
use codec::{ConnAck, Connect, Packet, Protocol, Will};
use inflight::{PubrecLog, STATUS_PID, packet_id};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// How long acks may sit in memory before the uplink commits the queue
/// itself (the pipeline's own commits usually carry them sooner). Until
/// then a crash re-sends PUBRELs, which is harmless; fewer fsyncs is not.
const ACK_COMMIT_EVERY: Duration = Duration::from_secs(1);
/// First pause after a refused batch (reason >= 0x80); doubles up to reconnect_max.
const REFUSAL_PAUSE: Duration = Duration::from_millis(200);
/// The broker kept the session for as long as it can (MQTT 5).
const SESSION_EXPIRY: u32 = u32::MAX;
/// Largest packet we accept from the broker (it only sends small acks).
const MAX_INCOMING: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("TLS handshake with {host} failed: {source}")]
    Tls { host: String, source: std::io::Error },
    #[error("broker refused the connection: {0}")]
    Refused(String),
    #[error("broker does not speak MQTT {0}")]
    ProtocolRefused(&'static str),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("connection closed by the broker")]
    Closed,
    #[error("no packet from the broker for {0:?} (keep-alive)")]
    Silent(Duration),
    #[error("{0}")]
    Queue(#[from] QueueError),
    #[error("{0}")]
    Setup(String),
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not on the wire in this session (new, refused, or session lost).
    Unsent,
    /// PUBLISH sent; waiting for PUBREC (QoS 2) or PUBACK (QoS 1).
    AwaitRec,
    /// PUBREC durable (this run or an earlier one); PUBREL not yet sent in this session.
    NeedRel,
    /// PUBREC durable, PUBREL sent; waiting for PUBCOMP.
    AwaitComp,
    /// Delivered (or skipped); leaves the queue when everything before it has.
    Done,
}

struct Flight {
    id: u64,
    readings: u32,
    payload: Vec<u8>,
    stage: Stage,
    /// A PUBLISH for it may have reached the broker before (an earlier
    /// connection or run): the next PUBLISH carries DUP=1 if the session
    /// was resumed.
    maybe_sent: bool,
    /// Refused by the broker: not before this instant.
    retry_at: Option<Instant>,
}

pub struct Uplink {
    cfg: UpstreamConfig,
    url: BrokerUrl,
    client_id: String,
    topic: String,
    status_topic: String,
    password: Option<Vec<u8>>,
    tls: Option<(Arc<rustls::ClientConfig>, rustls::pki_types::ServerName<'static>)>,
    queue: Arc<Mutex<Queue>>,
    commits: watch::Receiver<u64>,
    log: PubrecLog,
    metrics: Arc<Metrics>,
    window: VecDeque<Flight>,
    /// Highest queue id pulled into `window`.
    cursor: u64,
    protocol: Protocol,
    /// Last batch acked in the queue (in memory) by us.
    acked: u64,
    /// The queue's durable head when we last looked.
    durable: u64,
    last_commit: Instant,
    refusal_pause: Duration,
    rng: crate::sim::XorShift,
}

impl Uplink {
    /// Prepare the uplink: read TLS files and the password, load the PUBREC
    /// log. Fails on bad files, so `run` refuses to start with them.
    pub fn new(
        cfg: &UpstreamConfig,
        gateway: &str,
        data_dir: &Path,
        queue: Arc<Mutex<Queue>>,
        metrics: Arc<Metrics>,
    ) -> Result<Uplink, UplinkError> {
        let url = BrokerUrl::parse(&cfg.url).map_err(UplinkError::Setup)?;
        let tls = if url.tls {
            let c = tls::client_config(cfg).map_err(|e| UplinkError::Setup(e.to_string()))?;
            Some((c, tls::server_name(&url.host).map_err(|e| UplinkError::Setup(e.to_string()))?))
        } else {
            None
        };
        let password = match &cfg.password_file {
            Some(p) => {
                let s = std::fs::read(p).map_err(|e| {
                    UplinkError::Setup(format!("cannot read upstream.password_file {}: {e}", p.display()))
                })?;
                let end = s.iter().rposition(|b| !b"\r\n".contains(b)).map_or(0, |i| i + 1);
                Some(s[..end].to_vec())
            }
            None => None,
        };
        let (head, commits) = {
            let q = queue.lock().unwrap_or_else(|e| e.into_inner());
            (q.durable_head(), q.subscribe_commits())
        };
        let log = PubrecLog::open(data_dir, head)
            .map_err(|e| UplinkError::Setup(format!("cannot open {}/uplink.pubrec: {e}", data_dir.display())))?;
        let protocol = if cfg.protocol == MqttProtocol::V311 { Protocol::V311 } else { Protocol::V5 };
        let seed = crate::reading::now_ms() ^ u64::from(std::process::id()) << 32;
        Ok(Uplink {
            url,
            client_id: cfg.client_id_for(gateway),
            topic: cfg.topic.replace("{gateway}", gateway),
            status_topic: cfg.status_topic.replace("{gateway}", gateway),
            password,
            tls,
            queue,
            commits,
            log,
            metrics,
            window: VecDeque::new(),
            cursor: head,
            protocol,
            acked: head,
            durable: head,
            last_commit: Instant::now(),
            refusal_pause: REFUSAL_PAUSE,
            rng: crate::sim::XorShift::new(seed),
            cfg: cfg.clone(),
        })
    }

    /// Connect, drain, reconnect with backoff, until `stop`.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        // Batches a previous run may have published: the first window's worth.
        self.mark_previous_run();
        let mut backoff = self.cfg.reconnect_min;
        let mut failures = 0u64;
        let mut last_reason = String::new();
        let target = format!("{}:{}", self.url.host, self.url.port);
        while !*stop.borrow() {
            let attempt = tokio::time::timeout(self.cfg.connect_timeout, self.connect());
            let res = tokio::select! {
                r = attempt => r.unwrap_or(Err(UplinkError::Timeout(self.cfg.connect_timeout))),
                _ = shutdown::wait(&mut stop) => break,
            };
            let err = match res {
                Ok((stream, connack, leftover)) => {
                    if failures > 0 {
                        tracing::info!("upstream {target}: connected after {failures} failed attempt(s)");
                    } else {
                        tracing::info!(
                            "upstream {target}: connected (MQTT {}, session {})",
                            if self.protocol == Protocol::V5 { "5" } else { "3.1.1" },
                            if connack.session_present { "resumed" } else { "new" }
                        );
                    }
                    failures = 0;
                    last_reason.clear();
                    backoff = self.cfg.reconnect_min;
                    Metrics::inc(&self.metrics.upstream_connects);
                    Metrics::set(&self.metrics.upstream_connected, 1);
                    let r = self.session(stream, connack, leftover, &mut stop).await;
                    Metrics::set(&self.metrics.upstream_connected, 0);
                    self.commit_acks(true);
                    match r {
                        Ok(()) => break, // stopped
                        Err(e) => {
                            tracing::warn!("upstream {target}: connection lost: {e}");
                            last_reason = e.to_string();
                            continue_after(&mut stop, self.jitter(self.cfg.reconnect_min)).await;
                            continue;
                        }
                    }
                }
                Err(UplinkError::ProtocolRefused(v))
                    if self.cfg.protocol == MqttProtocol::Auto && self.protocol == Protocol::V5 =>
                {
                    tracing::info!("upstream {target}: broker refused MQTT {v}; falling back to 3.1.1");
                    self.protocol = Protocol::V311;
                    continue;
                }
                Err(e) => e,
            };
            failures += 1;
            Metrics::inc(&self.metrics.upstream_connect_failures);
            let reason = err.to_string();
            // Once per series of attempts failing the same way: a broker
            // that is down for an hour must not fill the journal.
            if reason != last_reason {
                tracing::warn!(
                    "upstream {target}: cannot connect: {reason} (retrying with backoff; readings stay queued)"
                );
                last_reason = reason;
            } else {
                tracing::debug!("upstream {target}: attempt {failures} failed: {reason}");
            }
            if self.cfg.protocol == MqttProtocol::Auto && self.protocol == Protocol::V311 && failures % 2 == 0 {
                self.protocol = Protocol::V5; // the broker may have been upgraded
            }
            let pause = self.jitter(backoff);
            backoff = (backoff * 2).min(self.cfg.reconnect_max);
            if !continue_after(&mut stop, pause).await {
                break;
            }
        }
        self.commit_acks(true);
        tracing::info!("uplink stopped");
    }

    /// Between d/2 and d.
    fn jitter(&mut self, d: Duration) -> Duration {
        let ms = d.as_millis().max(2) as u64;
        Duration::from_millis(ms / 2 + self.rng.below(ms / 2 + 1))
    }

    fn mark_previous_run(&mut self) {
        if let Err(e) = self.fill(self.cfg.max_inflight as usize) {
            tracing::warn!("uplink: cannot read the queue: {e}");
        }
        for f in self.window.iter_mut() {
            f.maybe_sent = true;
        }
    }

    async fn connect(&mut self) -> Result<(Box<dyn Stream>, ConnAck, Vec<u8>), UplinkError> {
        let tcp = tokio::net::TcpStream::connect((self.url.host.as_str(), self.url.port)).await?;
        tcp.set_nodelay(true)?;
        let mut s: Box<dyn Stream> = match &self.tls {
            Some((cfg, name)) => Box::new(
                tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|source| UplinkError::Tls { host: self.url.host.clone(), source })?,
            ),
            None => Box::new(tcp),
        };
        let will_payload = b"offline";
        let mut out = Vec::new();
        codec::encode_connect(
            &Connect {
                protocol: self.protocol,
                client_id: &self.client_id,
                keep_alive_secs: self.cfg.keep_alive.as_secs() as u16,
                clean_start: false,
                session_expiry_secs: SESSION_EXPIRY,
                will: Some(Will { topic: &self.status_topic, payload: will_payload, qos: 1, retain: true }),
                username: self.cfg.username.as_deref(),
                password: self.password.as_deref(),
            },
            &mut out,
        );
        s.write_all(&out).await?;
        let mut buf = Vec::with_capacity(256);
        loop {
            match codec::decode(self.protocol, &buf, MAX_INCOMING) {
                Ok(Some((Packet::ConnAck(c), n))) => {
                    buf.drain(..n);
                    let v5 = self.protocol == Protocol::V5;
                    if v5 && (c.code == 0x84 || (c.short_form && c.code == 1)) {
                        return Err(UplinkError::ProtocolRefused("5"));
                    }
                    if c.code != 0 {
                        return Err(UplinkError::Refused(connack_reason(v5 && !c.short_form, c.code, &c)));
                    }
                    return Ok((s, c, buf));
                }
                Ok(Some((p, _))) => return Err(UplinkError::Protocol(format!("expected CONNACK, got {p:?}"))),
                Ok(None) => {}
                Err(e) => return Err(UplinkError::Protocol(e.to_string())),
            }
            if s.read_buf(&mut buf).await? == 0 {
                // Some 3.1.1-only brokers just hang up on a v5 CONNECT.
                if self.protocol == Protocol::V5 && self.cfg.protocol == MqttProtocol::Auto {
                    return Err(UplinkError::ProtocolRefused("5"));
                }
                return Err(UplinkError::Closed);
            }
        }
    }

    /// Pull more committed records into the window, up to `limit` entries.
    fn fill(&mut self, limit: usize) -> Result<(), UplinkError> {
        // Nothing new committed since the last read: skip the lock (the
        // pipeline holds it through its fsyncs).
        if self.window.len() >= limit || self.cursor >= *self.commits.borrow_and_update() {
            return Ok(());
        }
        let q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        while self.window.len() < limit {
            let want = limit - self.window.len();
            let recs = match q.read_from(self.cursor, want) {
                Ok(r) => r,
                Err(QueueError::Corrupt { .. }) => {
                    // Find which one, keep the good ones before it.
                    match q.read_from(self.cursor, 1) {
                        Ok(r) => r,
                        Err(QueueError::Corrupt { id, path }) => {
                            tracing::error!(id, path = %path.display(), "queue record corrupt on disk; skipped");
                            Metrics::inc(&self.metrics.batches_corrupt_skipped);
                            self.window.push_back(Flight {
                                id,
                                readings: 0,
                                payload: Vec::new(),
                                stage: Stage::Done,
                                maybe_sent: false,
                                retry_at: None,
                            });
                            self.cursor = id;
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            };
            if recs.is_empty() {
                break;
            }
            for (meta, payload) in recs {
                self.cursor = meta.id;
                let stage = if self.log.contains(meta.id) { Stage::NeedRel } else { Stage::Unsent };
                self.window.push_back(Flight {
                    id: meta.id,
                    readings: meta.readings,
                    payload,
                    stage,
                    maybe_sent: stage == Stage::NeedRel,
                    retry_at: None,
                });
            }
        }
        Ok(())
    }

    /// One connection: `Ok` once `stop` fired (offline sent, DISCONNECT),
    /// `Err` when the connection was lost or the broker ended it.
    async fn session(
        &mut self,
        stream: Box<dyn Stream>,
        connack: ConnAck,
        mut inbuf: Vec<u8>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), UplinkError> {
        let proto = self.protocol;
        let inflight_max = (self.cfg.max_inflight as usize).min(connack.receive_maximum.unwrap_or(u16::MAX) as usize);
        let max_packet = connack.maximum_packet_size.unwrap_or(u32::MAX) as usize;
        let mut qos = self.cfg.qos;
        if connack.maximum_qos.is_some_and(|m| m < qos) {
            tracing::warn!("upstream broker accepts at most QoS {}; publishing at that", connack.maximum_qos.unwrap());
            qos = connack.maximum_qos.unwrap().max(1);
        }
        let keep_alive = self.cfg.keep_alive;
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut out = Vec::with_capacity(64 * 1024);

        self.resume(connack.session_present)?;
        codec::encode_publish(proto, &self.status_topic, b"online", 1, true, false, STATUS_PID, &mut out);

        let mut last_sent = Instant::now();
        let mut last_heard = Instant::now();
        let mut ping_out = false;
        let mut rbuf = vec![0u8; 64 * 1024];
        loop {
            // Fill the window and put every sendable batch on the wire.
            if let Err(e) = self.fill(inflight_max) {
                tracing::warn!("uplink: cannot read the queue: {e}");
            }
            self.send_ready(proto, qos, inflight_max, max_packet, &mut out);
            if !out.is_empty() {
                wr.write_all(&out).await?;
                out.clear();
                last_sent = Instant::now();
            }
            let now = Instant::now();
            let mut wake = now + Duration::from_secs(3600);
            if !keep_alive.is_zero() {
                wake = wake.min(last_heard + keep_alive + keep_alive / 2);
                if !ping_out {
                    wake = wake.min(last_sent + keep_alive);
                }
            }
            // A retry that is due but waits for a free slot is woken by the
            // ack that frees it, not by a timer (that would spin).
            if let Some(t) = self.window.iter().filter_map(|f| f.retry_at).filter(|t| *t > now).min() {
                wake = wake.min(t);
            }
            if self.acked > self.durable {
                wake = wake.min(self.last_commit + ACK_COMMIT_EVERY);
            }
            tokio::select! {
                biased;
                _ = shutdown::wait(stop) => {
                    codec::encode_publish(proto, &self.status_topic, b"offline", 1, true, false, STATUS_PID, &mut out);
                    codec::encode_disconnect(&mut out);
                    let _ = tokio::time::timeout(Duration::from_millis(500), async {
                        wr.write_all(&out).await?;
                        wr.shutdown().await
                    }).await;
                    return Ok(());
                }
                n = rd.read(&mut rbuf) => {
                    let n = n?;
                    if n == 0 {
                        return Err(UplinkError::Closed);
                    }
                    inbuf.extend_from_slice(&rbuf[..n]);
                    last_heard = Instant::now();
                    ping_out = false;
                    self.handle_packets(&mut inbuf, proto, qos, &mut out)?;
                }
                _ = self.commits.changed() => {}
                _ = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    if !keep_alive.is_zero() {
                        if now >= last_heard + keep_alive + keep_alive / 2 {
                            return Err(UplinkError::Silent(now - last_heard));
                        }
                        if now >= last_sent + keep_alive && !ping_out {
                            codec::encode_pingreq(&mut out);
                            ping_out = true;
                        }
                    }
                }
            }
            self.advance();
            self.commit_acks(false);
        }
    }

    /// Put the window in the state the new session needs.
    fn resume(&mut self, session_present: bool) -> Result<(), UplinkError> {
        if session_present {
            // `send_ready` re-sends these: PUBLISH with DUP=1, or PUBREL.
            for f in self.window.iter_mut() {
                match f.stage {
                    Stage::AwaitRec => f.stage = Stage::Unsent,
                    Stage::AwaitComp => f.stage = Stage::NeedRel,
                    _ => {}
                }
            }
            return Ok(());
        }
        // The broker has no state for us: nothing it PUBREC'd is safe.
        let mut resent = 0;
        for f in self.window.iter_mut() {
            if matches!(f.stage, Stage::AwaitRec | Stage::AwaitComp | Stage::NeedRel)
                || (f.stage == Stage::Unsent && f.maybe_sent)
            {
                resent += 1;
                f.stage = Stage::Unsent;
            }
            f.maybe_sent = false;
        }
        let unseen = self.log.len() as u64;
        if resent > 0 || unseen > 0 {
            tracing::warn!(
                "upstream broker has no session for us: re-sending {resent} unfinished batch(es) as new messages \
                 (consumers dedup by (gateway, batch))"
            );
            Metrics::add(&self.metrics.batches_resent_session_lost, resent);
        }
        if !self.log.is_empty() {
            // Must be durable before any of them goes out again: a stale
            // entry would make a restart send PUBREL for a batch the broker
            // never got, and take its PUBCOMP for delivery. (Also at QoS 1:
            // entries left by an earlier QoS 2 run would do the same.)
            self.log.clear().map_err(|e| UplinkError::Setup(format!("cannot clear uplink.pubrec: {e}")))?;
        }
        Ok(())
    }

    fn send_ready(&mut self, proto: Protocol, qos: u8, inflight_max: usize, max_packet: usize, out: &mut Vec<u8>) {
        let mut inflight = self.window.iter().filter(|f| matches!(f.stage, Stage::AwaitRec | Stage::AwaitComp)).count();
        let now = Instant::now();
        // PUBRELs first: the broker holds these already, whatever the limit.
        for f in self.window.iter_mut().filter(|f| f.stage == Stage::NeedRel) {
            codec::encode_pubrel(packet_id(f.id), out);
            Metrics::inc(&self.metrics.pubrels_resent);
            f.stage = Stage::AwaitComp;
            inflight += 1;
        }
        for f in self.window.iter_mut() {
            if inflight >= inflight_max {
                break;
            }
            if f.retry_at.is_some_and(|t| t > now) {
                // Refused and pausing: back off as a whole, and keep later
                // batches behind it (only those already in flight can overtake it).
                break;
            }
            if f.stage != Stage::Unsent {
                continue;
            }
            let len = codec::publish_len(proto, &self.topic, qos, f.payload.len());
            if len > max_packet {
                tracing::error!(
                    batch = f.id,
                    "batch of {} readings is {len} bytes, over the broker's maximum packet size {max_packet}; \
                     dropped from the queue (lower pipeline.batch_max_bytes)",
                    f.readings
                );
                Metrics::inc(&self.metrics.batches_too_large);
                f.stage = Stage::Done;
                f.readings = 0;
                f.payload = Vec::new(); // not counted as delivered
                continue;
            }
            if f.maybe_sent {
                Metrics::inc(&self.metrics.publishes_resent_dup);
            }
            codec::encode_publish(proto, &self.topic, &f.payload, qos, false, f.maybe_sent, packet_id(f.id), out);
            f.stage = Stage::AwaitRec;
            f.maybe_sent = true;
            f.retry_at = None;
            inflight += 1;
        }
    }

    fn handle_packets(
        &mut self,
        inbuf: &mut Vec<u8>,
        proto: Protocol,
        qos: u8,
        out: &mut Vec<u8>,
    ) -> Result<(), UplinkError> {
        let mut consumed = 0;
        let mut pubrecs = Vec::new();
        loop {
            let p = match codec::decode(proto, &inbuf[consumed..], MAX_INCOMING) {
                Ok(Some((p, n))) => {
                    consumed += n;
                    p
                }
                Ok(None) => break,
                Err(e) => return Err(UplinkError::Protocol(e.to_string())),
            };
            match p {
                Packet::PubRec { pid, reason } | Packet::PubAck { pid, reason } if pid != STATUS_PID => {
                    let is_rec = matches!(p, Packet::PubRec { .. });
                    let Some(f) = self.find(pid, Stage::AwaitRec) else {
                        if is_rec && self.find(pid, Stage::AwaitComp).is_some() {
                            // A repeated PUBREC: our PUBREL may be lost; send it again.
                            codec::encode_pubrel(pid, out);
                        } else {
                            tracing::debug!("uplink: ack for unknown packet id {pid}");
                        }
                        continue;
                    };
                    if reason >= 0x80 {
                        let f_id = f.id;
                        self.refused(f_id, reason);
                        continue;
                    }
                    if is_rec && qos == 2 {
                        pubrecs.push(f.id);
                    } else {
                        f.stage = Stage::Done;
                    }
                }
                Packet::PubComp { pid, reason } => {
                    if let Some(f) = self.find(pid, Stage::AwaitComp) {
                        if reason != 0 {
                            // 0x92: the broker no longer knows the id, i.e. it
                            // completed it before we last heard (our PUBREL
                            // was a re-send).
                            tracing::debug!(batch = f.id, "PUBCOMP reason {reason:#x}");
                        }
                        f.stage = Stage::Done;
                    }
                }
                Packet::PubRel { pid, .. } => codec::encode_pubcomp(pid, out),
                Packet::Disconnect { reason } => {
                    return Err(UplinkError::Refused(format!("broker sent DISCONNECT, reason {reason:#04x}")));
                }
                _ => {}
            }
        }
        inbuf.drain(..consumed);
        if !pubrecs.is_empty() {
            self.log.record(&pubrecs).map_err(|e| UplinkError::Setup(format!("cannot write uplink.pubrec: {e}")))?;
            crate::crashpoint::hit("after-pubrec-sync");
            for id in pubrecs {
                if let Some(f) = self.window.iter_mut().find(|f| f.id == id) {
                    f.stage = Stage::AwaitComp;
                    codec::encode_pubrel(packet_id(id), out);
                }
            }
        }
        Ok(())
    }

    fn find(&mut self, pid: u16, stage: Stage) -> Option<&mut Flight> {
        self.window.iter_mut().find(|f| f.stage == stage && packet_id(f.id) == pid)
    }

    fn refused(&mut self, id: u64, reason: u8) {
        Metrics::inc(&self.metrics.batches_refused);
        let pause = self.jitter(self.refusal_pause);
        self.refusal_pause = (self.refusal_pause * 2).min(self.cfg.reconnect_max);
        tracing::warn!(batch = id, "upstream broker refused batch {id} (reason {reason:#04x}); retrying in {pause:?}");
        if let Some(f) = self.window.iter_mut().find(|f| f.id == id) {
            f.stage = Stage::Unsent;
            // Refused means the broker dropped it: the retry is a new message.
            f.maybe_sent = false;
            f.retry_at = Some(Instant::now() + pause);
        }
    }

    /// Pop delivered batches off the front and ack them in the queue.
    fn advance(&mut self) {
        let mut last = None;
        while self.window.front().is_some_and(|f| f.stage == Stage::Done) {
            let f = self.window.pop_front().unwrap();
            if f.readings > 0 || !f.payload.is_empty() {
                Metrics::inc(&self.metrics.batches_delivered);
                Metrics::add(&self.metrics.readings_delivered, f.readings as u64);
            }
            last = Some(f.id);
        }
        if self.window.iter().all(|f| f.retry_at.is_none()) {
            self.refusal_pause = REFUSAL_PAUSE;
        }
        if let Some(id) = last {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = q.ack_through(id) {
                tracing::error!(batch = id, "uplink: cannot ack batch {id} in the queue: {e}");
                return;
            }
            crate::crashpoint::hit("after-pubcomp-ack");
            self.acked = id;
        }
    }

    /// Make acks durable now and then (or now, when `force`), and drop
    /// PUBREC entries the durable ledger now covers.
    fn commit_acks(&mut self, force: bool) {
        if !force && self.last_commit.elapsed() < ACK_COMMIT_EVERY {
            return;
        }
        self.last_commit = Instant::now();
        let durable = {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.durable_head() < self.acked {
                if let Err(e) = q.commit() {
                    // As in the pipeline: after a failed fsync only a rescan
                    // of the disk knows what is durable.
                    tracing::error!("queue commit failed: {e}; exiting (status 75) to rescan the queue on restart");
                    std::process::exit(75);
                }
            }
            q.durable_head()
        };
        self.durable = durable;
        if let Err(e) = self.log.forget_through(durable) {
            tracing::warn!("uplink: cannot compact uplink.pubrec: {e}");
        }
    }
}

fn connack_reason(v5: bool, code: u8, c: &ConnAck) -> String {
    let what = match (v5, code) {
        (false, 1) | (true, 0x84) => "unsupported protocol version",
        (false, 2) | (true, 0x85) => "client identifier not valid",
        (false, 3) | (true, 0x88) => "server unavailable",
        (false, 4) | (true, 0x86) => "bad user name or password",
        (false, 5) | (true, 0x87) => "not authorized",
        (true, 0x8A) => "banned",
        (true, 0x89) => "server busy",
        (true, 0x97) => "quota exceeded",
        _ => "refused",
    };
    match &c.reason_string {
        Some(r) => format!("{what} (code {code:#04x}: {r})"),
        None => format!("{what} (code {code:#04x})"),
    }
}

/// Sleep unless stopped; false when stopped.
async fn continue_after(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shutdown::wait(stop) => false,
    }
}

/// Start the uplink on its own thread; returns its join handle.
///
/// `beat`, if given, is beaten from the uplink's own runtime, so the systemd watchdog learns when this thread is wedged.
pub fn spawn(
    uplink: Uplink,
    stop: watch::Receiver<bool>,
    beat: Option<crate::service::Beat>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("uplink".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("uplink runtime");
        if let Some(beat) = beat {
            rt.spawn(async move {
                let mut tick = tokio::time::interval(beat.every());
                loop {
                    tick.tick().await;
                    beat.beat();
                }
            });
        }
        rt.block_on(tracing::Instrument::instrument(
            uplink.run(stop),
            tracing::info_span!("uplink", source = "uplink"),
        ));
    })
}
