//! The uplink: drains the queue to the upstream broker, in order, exactly once.
//!
//! One batch = one queue record = one MQTT message on `topic`. A batch
//! leaves the queue (`ack_through`) only after PUBCOMP (QoS 2) or PUBACK
//! (QoS 1), or after it was moved to the dead-letter store ([`dead`]). The
//! QoS 2 sender is our own ([`codec`] + this file), because each step must
//! happen in a known order relative to the disk:
//!
//! | step | on disk first | after a crash the next run sends |
//! |---|---|---|
//! | PUBLISH batch N | nothing: its packet id is [`inflight::packet_id`]`(N)` | PUBLISH, DUP=1, same id |
//! | PUBREC for N arrives | "N got PUBREC" in [`inflight::PubrecLog`], fdatasynced | PUBREL, same id |
//! | PUBCOMP for N arrives | "N completed" in `uplink.done` through the page cache at once (it survives a SIGKILL), and appended to the PUBREC log with its next write (the next PUBREC's, or its own after 2 s; no fsync of its own); the ack of N reaches the queue's ledger within about six seconds (commits write the ledger at most every five) | nothing if the note survived; else PUBREL again (answered with PUBCOMP) |
//! | broker refuses N for good | N in `uplink.dead`, fdatasynced, then acked in the queue | nothing (`queue dead replay` sends it again) |
//!
//! The PUBREC log names the broker URL and client id it belongs to; a log
//! written for another broker is reset, and the next CONNECT asks for a
//! Clean Start so the broker drops any session it kept for us.
//!
//! A resumed session (CONNACK session-present) gets exactly the packets in
//! the last column; every PUBLISH sent again carries DUP=1. A lost session
//! (broker restarted without persistence, session expired), and a
//! session-present that cannot be trusted (it follows a CONNECT whose
//! CONNACK never came, which may have created that session) gets every
//! unfinished batch again as a new message, counted in
//! `batches_resent_session_lost`; consumers dedup by `(gateway, batch)`.
//! The same happens to a batch whose re-sent PUBREL the broker answers with
//! PUBCOMP 0x92 (packet identifier not found, MQTT 5).
//!
//! Under MQTT 5 a PUBREC/PUBACK with a reason code >= 0x80 means "not
//! delivered" ([`classify`]): transient codes (0x97 quota exceeded, 0x89
//! server busy, ...) are retried with backoff for as long as it takes;
//! permanent ones (0x87 not authorized, 0x90, 0x95, 0x99, ...) are retried
//! `dead_letter_after` times, then the batch goes to the dead-letter store
//! and later batches flow again.
//!
//! Every write to the broker is bounded by keep-alive x 1.5 (the broker's
//! Server Keep Alive when it sends one) and gives way to `stop`. The
//! uplink's loop feeds the systemd watchdog itself ([`crate::service::Beat`]),
//! beating through waits that are bounded, so a loop stuck anywhere else
//! stops `WATCHDOG=1`.
//!
//! The uplink runs on its own OS thread with a single-threaded runtime: it
//! reads the queue and fsyncs its logs, and must not stall the sources.

pub mod codec;
pub mod config;
pub mod dead;
pub mod inflight;
pub mod tls;

use crate::events::Event;
use crate::fatal::{Fatal, FatalTx};
use crate::metrics::Metrics;
use crate::queue::{Queue, QueueError};
use crate::service::Beat;
use crate::shutdown;
use codec::{ConnAck, Connect, Packet, Protocol, Will};
use config::{BrokerUrl, MqttProtocol, UpstreamConfig};
use dead::{DeadBatch, DeadStore};
use inflight::{PubrecLog, STATUS_PID, WriteError, packet_id};
use std::collections::VecDeque;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// How long acks may sit in memory before the uplink commits the queue
/// itself (the pipeline's own commits usually carry them sooner; both write
/// the ledger at most once per [`crate::queue::LEDGER_EVERY`]). Until then a
/// crash re-sends PUBRELs, which is harmless; fewer fsyncs is not.
const ACK_COMMIT_EVERY: Duration = Duration::from_secs(1);
/// First pause after a refused batch (reason >= 0x80); doubles up to reconnect_max.
const REFUSAL_PAUSE: Duration = Duration::from_millis(200);
/// The broker kept the session for as long as it can (MQTT 5).
const SESSION_EXPIRY: u32 = u32::MAX;
/// Largest packet we accept from the broker (it only sends small acks).
const MAX_INCOMING: usize = 1 << 20;
/// Most priority records (alarm lane) pulled ahead of the window at a time.
const AHEAD_MAX: usize = 64;
/// `drain = "newest_first"`: most records pulled from the top of a backlog
/// before the part below them drains oldest first (each one finished ahead
/// of the queue's ack costs a "completed" note in the PUBREC log until the
/// ack gets there).
const NEWEST_MAX: usize = 16_384;
/// Bound on one write when keep-alive is off (0).
const WRITE_LIMIT_NO_KEEPALIVE: Duration = Duration::from_secs(60);

/// What a PUBREC/PUBACK reason code >= 0x80 means for the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The broker may take it later: retry with backoff, for as long as it takes.
    Transient,
    /// The broker will refuse it again (its content, size, topic or our
    /// rights): retry `dead_letter_after` times, then dead-letter it.
    Permanent,
}

/// Classify a refusal. Transient: 0x89 server busy, 0x91 packet identifier
/// in use, 0x93 receive maximum exceeded, 0x96 message rate too high, 0x97
/// quota exceeded, 0x9F connection rate exceeded. Everything else >= 0x80
/// (0x80 unspecified, 0x83 implementation specific, 0x87 not authorized,
/// 0x90 topic name invalid, 0x95 packet too large, 0x99 payload format
/// invalid, 0x9A retain not supported, ...) is permanent: a code nobody
/// listed is retried a few times, then kept in the dead-letter store rather
/// than blocking every later batch.
pub fn classify(reason: u8) -> Refusal {
    match reason {
        0x89 | 0x91 | 0x93 | 0x96 | 0x97 | 0x9F => Refusal::Transient,
        _ => Refusal::Permanent,
    }
}

/// The MQTT 5 name of a PUBREC/PUBACK/DISCONNECT reason code.
pub fn reason_name(reason: u8) -> &'static str {
    match reason {
        0x00 => "success",
        0x10 => "no matching subscribers",
        0x80 => "unspecified error",
        0x83 => "implementation specific error",
        0x87 => "not authorized",
        0x89 => "server busy",
        0x90 => "topic name invalid",
        0x91 => "packet identifier in use",
        0x92 => "packet identifier not found",
        0x93 => "receive maximum exceeded",
        0x95 => "packet too large",
        0x96 => "message rate too high",
        0x97 => "quota exceeded",
        0x99 => "payload format invalid",
        0x9A => "retain not supported",
        0x9B => "QoS not supported",
        0x9F => "connection rate exceeded",
        _ => "refused",
    }
}

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
    #[error("broker does not support a retained Will (CONNACK 0x9a)")]
    RetainRefused,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("a write to the broker did not finish within {0:?} (keep-alive x 1.5): the peer stopped reading")]
    WriteTimeout(Duration),
    #[error("connection closed by the broker")]
    Closed,
    #[error("no packet from the broker for {0:?} (keep-alive)")]
    Silent(Duration),
    #[error("{0}")]
    Queue(#[from] QueueError),
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Fatal(#[from] Fatal),
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
    /// Delivered, dead-lettered or skipped; leaves the queue when everything before it has.
    Done,
}

struct Flight {
    id: u64,
    readings: u32,
    created_ms: u64,
    payload: Vec<u8>,
    /// Where `[[rules]]` routed it; `None`: the readings topic.
    topic: Option<String>,
    stage: Stage,
    /// A PUBLISH for it may have reached the broker before (an earlier
    /// connection or run): the next PUBLISH carries DUP=1.
    maybe_sent: bool,
    /// The PUBREL outstanding for it was sent again after a reconnect or
    /// restart (so a PUBCOMP 0x92 is ambiguous).
    rel_resent: bool,
    /// Refused by the broker: not before this instant.
    retry_at: Option<Instant>,
    /// Refusals so far (reason >= 0x80).
    refusals: u32,
    /// The last id of the queue record it is a message of: the queue is
    /// acked through a record only once its last message is done.
    record_last: u64,
    /// The record's first id.
    record_first: u64,
    /// Of a priority record (the alarm lane): sent before anything else.
    priority: bool,
}

impl Flight {
    /// A record (ids `first..=last`) that is done without being sent.
    fn skipped(first: u64, last: u64) -> Flight {
        Flight {
            id: last,
            readings: 0,
            created_ms: 0,
            payload: Vec::new(),
            topic: None,
            stage: Stage::Done,
            maybe_sent: false,
            rel_resent: false,
            retry_at: None,
            refusals: 0,
            record_last: last,
            record_first: first,
            priority: false,
        }
    }
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
    dead: DeadStore,
    /// `log.fsyncs` and `dead.fsyncs` already added to `fsyncs_total`.
    fsyncs_counted: (AtomicU64, AtomicU64),
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
    rng: crate::rng::XorShift,
    /// Batches up to this one may have been published by an earlier run
    /// (or connection) whose session the broker may still hold: their
    /// PUBLISH carries DUP=1.
    maybe_sent_through: u64,
    /// The Will and the status messages are retained (until the broker says
    /// it does not support retained messages).
    retain: bool,
    /// A CONNECT went out and no CONNACK came back: the broker may have
    /// created a session for us that we never heard of.
    awaiting_connack: bool,
    /// So the next session-present=1 may be that session, not ours.
    suspect_session: bool,
    /// Fed by the loop itself; `None` without a watchdog.
    beat: Option<Beat>,
    /// `[[rules]]`: their transforms are applied to raw records as they
    /// are drained (see [`crate::rules`]).
    rules: Option<Arc<crate::rules::Rules>>,
    /// `[lanes]`: ttl per lane.
    lanes: crate::rules::config::LanesConfig,
    /// Highest queue id looked at for priority records to pull ahead.
    ahead_scan: u64,
    /// `[commands]`: the uplink subscribes and hands what arrives here.
    downlink: Option<Arc<crate::downlink::Downlink>>,
    /// Records beyond `cursor` finished ahead of it (pulled ahead, then
    /// completed or dead-lettered), as sorted `(first, last)` id ranges: the
    /// window skips them when it gets there.
    done_ahead: Vec<(u64, u64)>,
    /// `drain = "newest_first"`: the ids `(low, high)` the pull from the top
    /// has covered since the window last passed it, and how many records.
    newest: Option<(u64, u64)>,
    newest_pulled: usize,
    newest_max: usize,
}

/// Await `fut`, beating `beat` meanwhile. Only for waits bounded by a
/// timeout of their own: what is stuck beyond its bound must stop beating.
async fn beating<F: Future>(beat: &Option<Beat>, fut: F) -> F::Output {
    let Some(b) = beat else { return fut.await };
    let mut fut = std::pin::pin!(fut);
    let mut tick = tokio::time::interval(b.every());
    loop {
        tokio::select! {
            r = &mut fut => return r,
            _ = tick.tick() => b.beat(),
        }
    }
}

impl Uplink {
    /// Prepare the uplink: read TLS files and the password, load the PUBREC
    /// log and the dead-letter store. Fails on bad files, so `run` refuses
    /// to start with them.
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
        let (head, last, commits) = {
            let q = queue.lock().unwrap_or_else(|e| e.into_inner());
            (q.durable_head(), q.committed_id(), q.subscribe_commits())
        };
        let client_id = cfg.client_id_for(gateway);
        let identity = session_identity(&url, &client_id);
        let (log, reset) = PubrecLog::open(data_dir, head, &identity).map_err(|e| {
            UplinkError::Setup(format!("cannot open uplink.pubrec / uplink.done in {}: {e}", data_dir.display()))
        })?;
        match reset {
            Some(inflight::Reset::OtherBroker { was, entries }) => {
                Event::PubrecLogReset { was: Some(&was), identity: &identity, entries }.emit(&metrics)
            }
            Some(inflight::Reset::Unknown { entries }) => {
                Event::PubrecLogReset { was: None, identity: &identity, entries }.emit(&metrics)
            }
            None => {}
        }
        let dead = DeadStore::open(data_dir)
            .map_err(|e| UplinkError::Setup(format!("cannot open {}/{}: {e}", data_dir.display(), dead::FILE_NAME)))?;
        Metrics::set(&metrics.dead_letter_batches, dead.batches());
        if dead.batches() > 0 {
            tracing::warn!(
                "{} batch(es) in the dead-letter store {} (see `edge-gateway queue dead list`)",
                dead.batches(),
                dead.path().display()
            );
        }
        let protocol = if cfg.protocol == MqttProtocol::V311 { Protocol::V311 } else { Protocol::V5 };
        let seed = crate::reading::now_ms() ^ u64::from(std::process::id()) << 32;
        Ok(Uplink {
            url,
            client_id,
            topic: cfg.topic.replace("{gateway}", gateway),
            status_topic: cfg.status_topic.replace("{gateway}", gateway),
            password,
            tls,
            queue,
            commits,
            log,
            dead,
            metrics,
            window: VecDeque::new(),
            cursor: head,
            protocol,
            acked: head,
            durable: head,
            last_commit: Instant::now(),
            refusal_pause: REFUSAL_PAUSE,
            rng: crate::rng::XorShift::new(seed),
            // Any batch already queued may have been published by the last run.
            maybe_sent_through: last,
            retain: true,
            awaiting_connack: false,
            suspect_session: false,
            beat: None,
            rules: None,
            lanes: Default::default(),
            ahead_scan: head,
            done_ahead: Vec::new(),
            downlink: None,
            newest: None,
            newest_pulled: 0,
            newest_max: NEWEST_MAX,
            fsyncs_counted: Default::default(),
            cfg: cfg.clone(),
        })
    }

    /// The compiled `[[rules]]` (the same the pipeline decides with).
    pub fn set_rules(&mut self, rules: Arc<crate::rules::Rules>) {
        self.rules = Some(rules);
    }

    /// `[commands]`: subscribe to its topic and keep what arrives there.
    pub fn set_downlink(&mut self, d: Arc<crate::downlink::Downlink>) {
        self.downlink = Some(d);
    }

    /// `[lanes]` (ttl per lane).
    pub fn set_lanes(&mut self, lanes: crate::rules::config::LanesConfig) {
        self.lanes = lanes;
    }

    /// A queue record as it goes out: one (topic, payload) per message
    /// (topic `None`: the readings topic; a record routed to k topics is k
    /// messages, copy j carrying batch id `id + j`), or `None` for a record
    /// that is never sent (a `Hold` record of readings an aggregate consumed).
    fn outgoing(&self, id: u64, record: Vec<u8>) -> Option<Vec<(Option<String>, Vec<u8>)>> {
        let (header, body) = match crate::reading::RecordHeader::split(&record) {
            Ok((None, _)) => return Some(vec![(None, record)]),
            Ok((Some(h), body)) => (h, body),
            Err(e) => {
                // Sent as it is: the consumer sees what we could not read.
                tracing::warn!(batch = id, "queue record {id} has a bad rules header ({e}); sent as it is");
                return Some(vec![(None, record)]);
            }
        };
        if header.kind == crate::reading::RecordKind::Hold {
            return None;
        }
        let transform = header.transformed && self.rules.is_some();
        if !transform && header.topics.len() <= 1 {
            return Some(vec![(header.topics.into_iter().next(), body.to_vec())]);
        }
        let mut b = match crate::reading::Batch::decode(body) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(batch = id, "queue record {id} does not decode ({e}); sent as it is");
                let n = header.topics.len().max(1);
                return Some(
                    header
                        .topics
                        .into_iter()
                        .map(Some)
                        .chain(std::iter::repeat(None))
                        .take(n)
                        .map(|t| (t, body.to_vec()))
                        .collect(),
                );
            }
        };
        if transform && let Some(rules) = &self.rules {
            for r in &mut b.readings {
                rules.transform_stored(r, header.source);
            }
        }
        let format = if body.starts_with(&crate::reading::POSTCARD_MAGIC)
            || body.starts_with(&crate::reading::POSTCARD_MAGIC_V2)
        {
            crate::reading::Format::Postcard
        } else {
            crate::reading::Format::Json
        };
        if header.topics.is_empty() {
            return Some(vec![(None, b.encode(format))]);
        }
        let first = b.batch;
        Some(
            header
                .topics
                .into_iter()
                .enumerate()
                .map(|(j, t)| {
                    b.batch = first + j as u64;
                    (Some(t), b.encode(format))
                })
                .collect(),
        )
    }

    fn alive(&self) {
        if let Some(b) = &self.beat {
            b.beat();
        }
    }

    /// Add the PUBREC log's, the dead-letter store's and the commands
    /// store's fsyncs since the last call to `fsyncs_total`.
    fn count_fsyncs(&self) {
        Metrics::add_growth(&self.metrics.fsyncs_pubrec, &self.fsyncs_counted.0, self.log.fsyncs);
        Metrics::add_growth(&self.metrics.fsyncs_dead, &self.fsyncs_counted.1, self.dead.fsyncs);
        if let Some(d) = &self.downlink {
            d.count_fsyncs();
        }
    }

    /// Connect, drain, reconnect with backoff, until `stop` (`Ok`) or a
    /// failed sync (a [`Fatal`]: nothing more is acked, see [`crate::fatal`]).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), Fatal> {
        let mut backoff = self.cfg.reconnect_min;
        let mut failures = 0u64;
        let mut last_reason = String::new();
        let target = format!("{}:{}", self.url.host, self.url.port);
        // The last attempt was an MQTT 5 CONNECT the broker explicitly
        // refused as a version it does not speak: this one speaks 3.1.1.
        let mut fallback = false;
        while !*stop.borrow() {
            self.alive();
            self.count_fsyncs();
            self.protocol = match self.cfg.protocol {
                MqttProtocol::V311 => Protocol::V311,
                MqttProtocol::V5 => Protocol::V5,
                MqttProtocol::Auto if fallback => Protocol::V311,
                MqttProtocol::Auto => Protocol::V5,
            };
            fallback = false;
            let beat = self.beat.clone();
            let timeout = self.cfg.connect_timeout;
            let res = {
                let attempt = beating(&beat, tokio::time::timeout(timeout, self.connect()));
                tokio::select! {
                    r = attempt => r.unwrap_or(Err(UplinkError::Timeout(timeout))),
                    _ = shutdown::wait(&mut stop) => break,
                }
            };
            if res.is_err() && self.awaiting_connack {
                self.suspect_session = true;
            }
            self.awaiting_connack = false;
            let err = match res {
                Ok((stream, connack, leftover)) => {
                    let suspect = std::mem::take(&mut self.suspect_session);
                    tracing::info!(
                        "upstream {target}: connected (MQTT {}, session {}){}",
                        if self.protocol == Protocol::V5 { "5" } else { "3.1.1" },
                        match (connack.session_present, suspect) {
                            (true, false) => "resumed",
                            (true, true) => "present, not trusted",
                            (false, _) => "new",
                        },
                        if failures > 0 { format!(" after {failures} failed attempt(s)") } else { String::new() }
                    );
                    failures = 0;
                    last_reason.clear();
                    backoff = self.cfg.reconnect_min;
                    Metrics::inc(&self.metrics.upstream_connects);
                    Metrics::set(&self.metrics.upstream_connected, 1);
                    let r = self.session(stream, connack, leftover, suspect, &mut stop).await;
                    Metrics::set(&self.metrics.upstream_connected, 0);
                    Metrics::set(&self.metrics.upstream_mqtt_version, 0);
                    if let Err(UplinkError::Fatal(f)) = r {
                        return Err(f);
                    }
                    self.commit_acks(true)?;
                    match r {
                        Ok(()) => break, // stopped
                        Err(e) => {
                            tracing::warn!("upstream {target}: connection lost: {e}");
                            last_reason = e.to_string();
                            let pause = self.jitter(self.cfg.reconnect_min);
                            if !beating(&beat, continue_after(&mut stop, pause)).await {
                                break;
                            }
                            continue;
                        }
                    }
                }
                Err(UplinkError::ProtocolRefused(v))
                    if self.cfg.protocol == MqttProtocol::Auto && self.protocol == Protocol::V5 =>
                {
                    // Only an explicit answer counts (CONNACK 0x84, or a
                    // 3.1.1-style CONNACK 1); a hang-up before CONNACK is a
                    // busy broker, a proxy or a restart, not a version.
                    tracing::info!(
                        "upstream {target}: broker refused MQTT {v}; falling back to 3.1.1 for this connection \
                         (MQTT 5 is tried again on the next)"
                    );
                    fallback = true;
                    continue;
                }
                Err(UplinkError::RetainRefused) if self.retain => {
                    tracing::info!(
                        "upstream {target}: broker does not support retained messages; the Will and status \
                         messages go out unretained"
                    );
                    self.retain = false;
                    continue;
                }
                Err(UplinkError::Fatal(f)) => return Err(f),
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
            let pause = self.jitter(backoff);
            backoff = (backoff * 2).min(self.cfg.reconnect_max);
            if !beating(&beat, continue_after(&mut stop, pause)).await {
                break;
            }
        }
        self.commit_acks(true)?;
        tracing::info!("uplink stopped");
        Ok(())
    }

    /// Between d/2 and d.
    fn jitter(&mut self, d: Duration) -> Duration {
        let ms = d.as_millis().max(2) as u64;
        Duration::from_millis(ms / 2 + self.rng.below(ms / 2 + 1))
    }

    /// Connect, with a session the broker keeps. Until the PUBREC log is
    /// confirmed for this broker and client id, any session the broker kept
    /// for us is stale, so the first CONNECT asks for a Clean Start. But
    /// Mosquitto (2.0.x; `persist__client_save`) writes to its database only
    /// the sessions whose last CONNECT had Clean Start = 0: a Clean Start
    /// session is lost at a broker restart, and with it every batch it had
    /// delivered at our PUBREL before we heard PUBCOMP, which we would then
    /// send again as new (found by the power-cut rig, seed 552448845). So a
    /// Clean Start connection confirms the log, says DISCONNECT before
    /// anything goes out, and connects again with Clean Start = 0: from then
    /// on the session survives the broker's restarts.
    async fn connect(&mut self) -> Result<(Box<dyn Stream>, ConnAck, Vec<u8>), UplinkError> {
        if self.log.confirmed() {
            return self.connect_once(false).await;
        }
        let (mut s, _, _) = self.connect_once(true).await?;
        // The broker has no state for us: everything unfinished goes out
        // again as new (counted), and the log now belongs to this broker
        // and client id, durably before anything of the session goes out.
        self.resume(false)?;
        self.log.confirm().map_err(|e| UplinkError::Setup(format!("cannot write uplink.pubrec: {e}")))?;
        let mut out = Vec::new();
        codec::encode_disconnect(&mut out);
        let _ = s.write_all(&out).await;
        let _ = s.shutdown().await;
        drop(s);
        let (s, mut connack, leftover) = self.connect_once(false).await?;
        // Whatever the broker says, this session began with our Clean Start:
        // nothing of ours is in it.
        connack.session_present = false;
        Ok((s, connack, leftover))
    }

    async fn connect_once(&mut self, clean_start: bool) -> Result<(Box<dyn Stream>, ConnAck, Vec<u8>), UplinkError> {
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
                clean_start,
                session_expiry_secs: SESSION_EXPIRY,
                will: Some(Will { topic: &self.status_topic, payload: will_payload, qos: 1, retain: self.retain }),
                username: self.cfg.username.as_deref(),
                password: self.password.as_deref(),
            },
            &mut out,
        );
        self.awaiting_connack = true;
        s.write_all(&out).await?;
        let mut buf = Vec::with_capacity(256);
        loop {
            match codec::decode(self.protocol, &buf, MAX_INCOMING) {
                Ok(Some((Packet::ConnAck(c), n))) => {
                    self.awaiting_connack = false;
                    buf.drain(..n);
                    let v5 = self.protocol == Protocol::V5;
                    if v5 && (c.code == 0x84 || (c.short_form && c.code == 1)) {
                        return Err(UplinkError::ProtocolRefused("5"));
                    }
                    if v5 && !c.short_form && c.code == 0x9A && self.retain {
                        return Err(UplinkError::RetainRefused);
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
                // Not a version refusal: a broker at max_connections, a
                // proxy in front of a restarting broker, a load balancer.
                return Err(UplinkError::Closed);
            }
        }
    }

    /// Pull more committed records into the window, up to `limit` entries
    /// in queue order (from `cursor`), then pull ahead of it: priority
    /// records (the alarm lane), and with `drain = "newest_first"` the top of
    /// the backlog. What is pulled ahead is sent first; the queue's ack
    /// still waits for every record before it (`advance`), and the window
    /// steps over it when it gets there.
    fn fill(&mut self, limit: usize) -> Result<(), UplinkError> {
        // Nothing new committed since the last read: skip the lock (the
        // pipeline holds it through its fsyncs).
        let committed = *self.commits.borrow_and_update();
        let first_ahead = self.first_ahead();
        let fill_window = first_ahead < limit && self.cursor < committed;
        let pull_priority = self.ahead_priority() < AHEAD_MAX && self.ahead_scan.max(self.cursor) < committed;
        if !fill_window && !pull_priority && !self.newest_wanted(limit, committed) {
            return Ok(());
        }
        let queue = self.queue.clone();
        let q = queue.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let in_order = self.first_ahead();
            if in_order >= limit {
                break;
            }
            // Read up to the next record pulled ahead; with nothing left
            // before it, step over it.
            let barrier = self.barrier();
            let upto = barrier.map_or(u64::MAX, |b| b.0 - 1);
            let recs = if self.cursor >= upto {
                Vec::new()
            } else {
                match q.read_range(self.cursor, upto, limit - in_order) {
                    Ok(r) => r,
                    Err(QueueError::Corrupt { .. }) => {
                        // Find which one, keep the good ones before it.
                        match q.read_range(self.cursor, upto, 1) {
                            Ok(r) => r,
                            Err(QueueError::Corrupt { id, path }) => {
                                Event::CorruptRecordSkipped { id, path: &path }.emit(&self.metrics);
                                self.place(Flight::skipped(id, id));
                                self.cursor = id;
                                continue;
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            if recs.is_empty() {
                let Some((_, last)) = barrier else { break };
                self.cursor = last;
                let keep = self.done_ahead.partition_point(|r| r.1 <= last);
                self.done_ahead.drain(..keep);
                if self.newest.is_some_and(|(_, high)| high <= self.cursor) {
                    self.newest = None;
                    self.newest_pulled = 0;
                }
                continue;
            }
            for (meta, record) in recs {
                self.cursor = meta.id + meta.span as u64 - 1;
                for f in self.flights(meta, record) {
                    self.place(f);
                }
            }
        }
        // Priority records beyond the window, in queue order.
        let mut ahead = self.ahead_priority();
        while ahead < AHEAD_MAX && self.ahead_scan.max(self.cursor) < committed {
            let from = self.ahead_scan.max(self.cursor);
            let ids = q.priority_after(from, AHEAD_MAX - ahead);
            if ids.len() < AHEAD_MAX - ahead {
                self.ahead_scan = committed;
            }
            for id in ids {
                self.ahead_scan = self.ahead_scan.max(id);
                if self.pulled(id) {
                    continue;
                }
                let rec = match q.read_range(id - 1, id, 1) {
                    Ok(mut r) if r.len() == 1 => r.pop().expect("one"),
                    // Corrupt or gone: the window meets it in order.
                    _ => continue,
                };
                self.ahead_scan = self.ahead_scan.max(id + rec.0.span as u64 - 1);
                for f in self.flights(rec.0, rec.1) {
                    self.place(f);
                    ahead += 1;
                }
            }
        }
        // `drain = "newest_first"`: what was committed above the part
        // pulled so far (the live records), then down from it.
        while self.newest_wanted(limit, committed) {
            let pending = self.window.range(self.first_ahead()..).filter(|f| f.stage != Stage::Done).count();
            let budget = limit.saturating_sub(pending).min(self.newest_max - self.newest_pulled);
            let (low, high) = self.newest.unwrap_or((committed + 1, committed));
            let mut metas = q.metas_between(high, committed + 1, budget, false);
            if metas.is_empty() {
                metas = q.metas_between(self.cursor, low, budget, true);
            }
            if metas.is_empty() {
                // Nothing live between the window and the part pulled.
                break;
            }
            for meta in metas {
                let last = meta.id + meta.span as u64 - 1;
                let (low, high) = self.newest.unwrap_or((meta.id, last));
                self.newest = Some((low.min(meta.id), high.max(last)));
                self.newest_pulled += 1;
                if self.pulled(meta.id) {
                    continue;
                }
                if (meta.id..=last).all(|id| self.log.is_completed(id)) {
                    // Completed by an earlier run (no need to read it).
                    self.add_done(meta.id, last);
                    continue;
                }
                match q.read_range(meta.id - 1, meta.id, 1) {
                    Ok(mut r) if r.len() == 1 => {
                        let (meta, record) = r.pop().expect("one");
                        for f in self.flights(meta, record) {
                            self.place(f);
                        }
                    }
                    // Corrupt or gone: the window meets it in order.
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Whether `drain = "newest_first"` has more to pull from the top: a
    /// backlog beyond the window, room for unsent flights, the bound not
    /// reached, and records not pulled yet.
    fn newest_wanted(&self, limit: usize, committed: u64) -> bool {
        if self.lanes.bulk.drain != crate::rules::config::Drain::NewestFirst
            || self.cursor >= committed
            || self.newest_pulled >= self.newest_max
        {
            return false;
        }
        let pending = self.window.range(self.first_ahead()..).filter(|f| f.stage != Stage::Done).count();
        pending < limit && self.newest.is_none_or(|(low, high)| high < committed || low > self.cursor + 1)
    }

    /// Index of the first flight beyond the cursor (pulled ahead).
    fn first_ahead(&self) -> usize {
        self.window.partition_point(|f| f.id <= self.cursor)
    }

    /// Priority flights pulled ahead.
    fn ahead_priority(&self) -> usize {
        self.window.range(self.first_ahead()..).filter(|f| f.priority).count()
    }

    /// The lowest record beyond the cursor already pulled ahead (in the
    /// window or finished): `(first id, last id)`.
    fn barrier(&self) -> Option<(u64, u64)> {
        let w = self.window.get(self.first_ahead()).map(|f| (f.record_first, f.record_last));
        match (w, self.done_ahead.first().copied()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the record starting at `first` was pulled already.
    fn pulled(&self, first: u64) -> bool {
        if first <= self.cursor {
            return true;
        }
        let r = self.done_ahead.partition_point(|r| r.1 < first);
        if self.done_ahead.get(r).is_some_and(|r| r.0 <= first) {
            return true;
        }
        let i = self.window.partition_point(|f| f.id < first);
        self.window.get(i).is_some_and(|f| f.record_first == first)
    }

    /// Note record `first..=last` as finished ahead of the cursor.
    fn add_done(&mut self, first: u64, last: u64) {
        let at = self.done_ahead.partition_point(|r| r.0 < first);
        self.done_ahead.insert(at, (first, last));
        // Join it with its neighbours when they touch.
        if at + 1 < self.done_ahead.len() && self.done_ahead[at + 1].0 == last + 1 {
            self.done_ahead[at].1 = self.done_ahead[at + 1].1;
            self.done_ahead.remove(at + 1);
        }
        if at > 0 && self.done_ahead[at - 1].1 + 1 == first {
            self.done_ahead[at - 1].1 = self.done_ahead[at].1;
            self.done_ahead.remove(at);
        }
    }

    /// Records beyond the cursor whose every message is done leave the
    /// window (counted as delivered now) for `done_ahead`.
    fn compact_ahead(&mut self) {
        let first = self.first_ahead();
        if !self.window.range(first..).any(|f| f.stage == Stage::Done) {
            return;
        }
        let mut done = Vec::new();
        let mut i = first;
        while i < self.window.len() {
            let last = self.window[i].record_last;
            let mut j = i;
            let mut all = true;
            while j < self.window.len() && self.window[j].record_last == last {
                all &= self.window[j].stage == Stage::Done;
                j += 1;
            }
            if all {
                done.push((self.window[i].record_first, last));
                for f in self.window.range(i..j) {
                    count_delivered(&self.metrics, f);
                }
            }
            i = j;
        }
        if done.is_empty() {
            return;
        }
        let lasts: std::collections::HashSet<u64> = done.iter().map(|d| d.1).collect();
        let cursor = self.cursor;
        self.window.retain(|f| f.id <= cursor || !lasts.contains(&f.record_last));
        for (first, last) in done {
            self.add_done(first, last);
        }
    }

    /// Into the window, in id order.
    fn place(&mut self, f: Flight) {
        if self.window.back().is_none_or(|b| b.id < f.id) {
            self.window.push_back(f);
        } else {
            let at = self.window.partition_point(|x| x.id < f.id);
            self.window.insert(at, f);
        }
    }

    /// The flights for a record read from the queue: one per message.
    fn flights(&self, meta: crate::queue::RecordMeta, record: Vec<u8>) -> Vec<Flight> {
        let last = meta.id + meta.span as u64 - 1;
        let stage_of = |id: u64| {
            if self.log.is_completed(id) {
                // Completed by an earlier run: never sent again.
                Stage::Done
            } else if self.log.contains(id) {
                Stage::NeedRel
            } else {
                Stage::Unsent
            }
        };
        let maybe_sent = |id: u64| stage_of(id) == Stage::NeedRel || id <= self.maybe_sent_through;
        // Past its lane's ttl and none of it ever on the wire: dropped,
        // counted. (One that may have reached the broker is finished, or its
        // packet id would stay open in the broker's session.)
        let ttl = if meta.priority { self.lanes.alarm.ttl } else { self.lanes.bulk.ttl };
        if ttl.is_some_and(|t| crate::reading::now_ms().saturating_sub(meta.created_ms) > t.as_millis() as u64)
            && (meta.id..=last).all(|id| stage_of(id) == Stage::Unsent && !maybe_sent(id))
        {
            let c =
                if meta.priority { &self.metrics.readings_expired_alarm } else { &self.metrics.readings_expired_bulk };
            Metrics::add(c, meta.readings as u64);
            tracing::debug!(batch = meta.id, "batch {} expired undelivered (lane ttl)", meta.id);
            return vec![Flight::skipped(meta.id, last)];
        }
        let Some(messages) = self.outgoing(meta.id, record) else {
            // Kept for a crash, never sent: done once reached.
            return vec![Flight::skipped(meta.id, last)];
        };
        if messages.len() as u64 != last - meta.id + 1 {
            tracing::warn!(
                batch = meta.id,
                "queue record {} owns {} ids for {} messages",
                meta.id,
                meta.span,
                messages.len()
            );
        }
        messages
            .into_iter()
            .zip(meta.id..=last)
            .map(|((topic, payload), id)| Flight {
                id,
                // Readings count once, on the first copy.
                readings: if id == meta.id { meta.readings } else { 0 },
                created_ms: meta.created_ms,
                payload,
                topic,
                stage: stage_of(id),
                maybe_sent: maybe_sent(id),
                rel_resent: false,
                retry_at: None,
                refusals: 0,
                record_last: last,
                record_first: meta.id,
                priority: meta.priority,
            })
            .collect()
    }

    /// One connection: `Ok` once `stop` fired (offline sent, DISCONNECT),
    /// `Err` when the connection was lost or the broker ended it.
    async fn session(
        &mut self,
        stream: Box<dyn Stream>,
        connack: ConnAck,
        mut inbuf: Vec<u8>,
        suspect: bool,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), UplinkError> {
        let proto = self.protocol;
        Metrics::set(&self.metrics.upstream_mqtt_version, if proto == Protocol::V5 { 5 } else { 4 });
        let inflight_max = (self.cfg.max_inflight as usize).min(connack.receive_maximum.unwrap_or(u16::MAX) as usize);
        let max_packet = connack.maximum_packet_size.unwrap_or(u32::MAX) as usize;
        let mut qos = self.cfg.qos;
        if connack.maximum_qos.is_some_and(|m| m < qos) {
            tracing::warn!("upstream broker accepts at most QoS {}; publishing at that", connack.maximum_qos.unwrap());
            qos = connack.maximum_qos.unwrap().max(1);
        }
        let keep_alive = match connack.server_keep_alive {
            Some(k) if Duration::from_secs(k.into()) != self.cfg.keep_alive => {
                tracing::info!("upstream broker sets keep-alive to {k} s (Server Keep Alive); using it");
                Duration::from_secs(k.into())
            }
            _ => self.cfg.keep_alive,
        };
        let write_limit = if keep_alive.is_zero() { WRITE_LIMIT_NO_KEEPALIVE } else { keep_alive + keep_alive / 2 };
        if connack.retain_available == Some(false) && self.retain {
            tracing::info!(
                "upstream broker does not support retained messages; status messages (and the Will, from the \
                 next connect) go out unretained"
            );
            self.retain = false;
        }
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut out = Vec::with_capacity(64 * 1024);

        if connack.session_present && suspect {
            tracing::warn!(
                "upstream broker says it kept our session, but an earlier CONNECT got no CONNACK and may have \
                 created that session: treating it as lost"
            );
        }
        self.resume(connack.session_present && !suspect)?;
        debug_assert!(self.log.confirmed(), "connect() confirms the log");
        match &self.downlink {
            // Every session (a lost one has no subscription). It shares the
            // status message's packet id, so "online" waits for the SUBACK.
            Some(d) => codec::encode_subscribe(proto, STATUS_PID, d.topic(), 2, &mut out),
            None => {
                codec::encode_publish(proto, &self.status_topic, b"online", 1, self.retain, false, STATUS_PID, &mut out)
            }
        }

        let beat = self.beat.clone();
        let beat_every = beat.as_ref().map_or(Duration::from_secs(3600), |b| b.every());
        let mut last_sent = Instant::now();
        let mut last_heard = Instant::now();
        let mut ping_out = false;
        let mut rbuf = vec![0u8; 64 * 1024];
        loop {
            self.alive();
            self.count_fsyncs();
            crate::crashpoint::stall_async("uplink-loop").await;
            // Fill the window and put every sendable batch on the wire.
            // Records an earlier run completed come in as done: they leave
            // at once and make room (else a window of them would wait for
            // the next packet or timer, one window at a time).
            loop {
                if let Err(e) = self.fill(inflight_max) {
                    tracing::warn!("uplink: cannot read the queue: {e}");
                    break;
                }
                if !self.advance() {
                    break;
                }
            }
            self.send_ready(proto, qos, inflight_max, max_packet, &mut out)?;
            if !out.is_empty() {
                // Bounded, and it gives way to `stop`: a peer that stopped
                // reading must not wedge the uplink, a reload or the exit.
                let write = beating(&beat, tokio::time::timeout(write_limit, wr.write_all(&out)));
                let r = tokio::select! {
                    biased;
                    _ = shutdown::wait(stop) => {
                        tracing::info!("uplink: stopping in the middle of a write (the broker publishes our Will)");
                        return Ok(());
                    }
                    r = write => r,
                };
                match r {
                    Err(_) => {
                        Metrics::inc(&self.metrics.upstream_write_timeouts);
                        return Err(UplinkError::WriteTimeout(write_limit));
                    }
                    Ok(r) => r?,
                }
                out.clear();
                last_sent = Instant::now();
                // A PUBREL is on the wire and its PUBCOMP not in: the broker
                // may deliver the batch and we would not know.
                if self.window.iter().any(|f| f.stage == Stage::AwaitComp) {
                    crate::crashpoint::hit("after-pubrel-write");
                }
            }
            let now = Instant::now();
            let mut wake = now + beat_every;
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
            if let Some(t) = self.log.pending_since() {
                wake = wake.min(t + inflight::RIDE_MAX);
            }
            tokio::select! {
                biased;
                _ = shutdown::wait(stop) => {
                    codec::encode_publish(proto, &self.status_topic, b"offline", 1, self.retain, false, STATUS_PID, &mut out);
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
            let _ = self.advance();
            self.commit_acks(false)?;
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
            // Whatever this run published may be in the session.
            self.maybe_sent_through = self.maybe_sent_through.max(self.cursor);
            return Ok(());
        }
        // The broker has no state for us: nothing it PUBREC'd is safe.
        // (Done batches were completed: they are never sent again.)
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
        // PUBREC'd batches not in the window yet go out again as new too.
        let pulled_ahead = self.window.iter().filter(|f| f.id > self.cursor && self.log.contains(f.id)).count();
        let beyond = (self.log.count_above(self.cursor) - pulled_ahead) as u64;
        self.maybe_sent_through = 0;
        if resent + beyond > 0 {
            tracing::warn!(
                "upstream broker has no session for us: re-sending {} unfinished batch(es) as new messages \
                 (consumers dedup by (gateway, batch))",
                resent + beyond
            );
            Metrics::add(&self.metrics.batches_resent_session_lost, resent + beyond);
        }
        if !self.log.is_empty() {
            // Must be durable before any of them goes out again: a stale
            // entry would make a restart send PUBREL for a batch the broker
            // never got, and take its PUBCOMP for delivery. (Also at QoS 1:
            // entries left by an earlier QoS 2 run would do the same.)
            self.log.clear().map_err(|e| self.log_failed("clear", e))?;
        }
        Ok(())
    }

    /// A failed write to `uplink.pubrec`: a failed fdatasync is fatal (as in
    /// the queue, only a fresh read of the disk knows what is on it).
    fn log_failed(&self, what: &str, e: WriteError) -> UplinkError {
        if let WriteError::Sync(e) = &e {
            return UplinkError::Fatal(Fatal(format!(
                "uplink.pubrec: {what}: fdatasync failed: {e}; a restart re-reads it"
            )));
        }
        UplinkError::Setup(format!("cannot {what} uplink.pubrec: {e}"))
    }

    fn send_ready(
        &mut self,
        proto: Protocol,
        qos: u8,
        inflight_max: usize,
        max_packet: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), Fatal> {
        let mut inflight = self.window.iter().filter(|f| matches!(f.stage, Stage::AwaitRec | Stage::AwaitComp)).count();
        let now = Instant::now();
        // PUBRELs first: the broker holds these already, whatever the limit.
        for f in self.window.iter_mut().filter(|f| f.stage == Stage::NeedRel) {
            codec::encode_pubrel(packet_id(f.id), out);
            Metrics::inc(&self.metrics.pubrels_resent);
            tracing::debug!(batch = f.id, "PUBREL re-sent for batch {}", f.id);
            f.stage = Stage::AwaitComp;
            f.rel_resent = true;
            inflight += 1;
        }
        // Priority records pulled ahead go first. With them in the window,
        // two flights can share a packet id (ids 65,534 apart): the later
        // one waits until the other is finished.
        let first_ahead = self.first_ahead();
        let mut busy: std::collections::HashSet<u16> = if first_ahead < self.window.len() {
            self.window
                .iter()
                .filter(|f| matches!(f.stage, Stage::AwaitRec | Stage::AwaitComp | Stage::NeedRel))
                .map(|f| packet_id(f.id))
                .collect()
        } else {
            Default::default()
        };
        let w = &self.window;
        let order: Vec<usize> = (first_ahead..w.len())
            .filter(|&i| w[i].priority)
            // Pulled from the top of a backlog (newest first): the newest first.
            .chain((first_ahead..w.len()).rev().filter(|&i| !w[i].priority))
            .chain(0..first_ahead)
            .collect();
        for i in order {
            if inflight >= inflight_max {
                break;
            }
            let ahead = i >= first_ahead;
            let f = &mut self.window[i];
            if f.retry_at.is_some_and(|t| t > now) {
                if ahead {
                    continue;
                }
                // Refused and pausing: back off as a whole, and keep later
                // batches behind it (only those already in flight can overtake it).
                break;
            }
            if f.stage != Stage::Unsent {
                continue;
            }
            if !busy.is_empty() && !busy.insert(packet_id(f.id)) {
                continue;
            }
            let topic = f.topic.as_deref().unwrap_or(&self.topic);
            let len = codec::publish_len(proto, topic, qos, f.payload.len());
            if len > max_packet {
                Metrics::inc(&self.metrics.batches_too_large);
                let reason = format!(
                    "{len} bytes, over the broker's maximum packet size {max_packet} (lower pipeline.batch_max_bytes)"
                );
                self.dead_letter(i, 0x95, reason)?;
                continue;
            }
            if f.maybe_sent {
                Metrics::inc(&self.metrics.publishes_resent_dup);
            }
            codec::encode_publish(proto, topic, &f.payload, qos, false, f.maybe_sent, packet_id(f.id), out);
            f.stage = Stage::AwaitRec;
            f.maybe_sent = true;
            f.rel_resent = false;
            f.retry_at = None;
            inflight += 1;
        }
        Ok(())
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
        let mut completed = Vec::new();
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
                        self.refused(f_id, reason)?;
                        continue;
                    }
                    if is_rec && qos == 2 {
                        pubrecs.push(f.id);
                    } else {
                        f.stage = Stage::Done;
                        completed.push(f.id);
                    }
                }
                Packet::PubComp { pid, reason } => {
                    if let Some(f) = self.find(pid, Stage::AwaitComp) {
                        if reason == 0x92 {
                            // "Packet identifier not found": either the broker
                            // completed it before we last heard (our PUBREL was
                            // a re-send), or it lost the message with its
                            // session state (restored an old save, or the
                            // session is not the one we left). Only a new
                            // PUBLISH cannot lose it; consumers dedup a copy
                            // by (gateway, batch).
                            let id = f.id;
                            tracing::warn!(
                                batch = id,
                                "upstream broker does not know batch {id}'s packet id (PUBCOMP 0x92{}): sending \
                                 it again as a new message",
                                if f.rel_resent { " after a re-sent PUBREL" } else { "" }
                            );
                            f.stage = Stage::Unsent;
                            f.maybe_sent = false;
                            f.rel_resent = false;
                            Metrics::inc(&self.metrics.batches_resent_session_lost);
                            continue;
                        }
                        if reason != 0 {
                            tracing::debug!(batch = f.id, "PUBCOMP reason {reason:#x}");
                        }
                        f.stage = Stage::Done;
                        completed.push(f.id);
                    }
                }
                Packet::PubRel { pid, .. } => codec::encode_pubcomp(pid, out),
                Packet::Publish(p) => {
                    // A command: on our disk before we ack it (crate::downlink).
                    match &self.downlink {
                        Some(d) if p.topic == d.topic() => {
                            if let Err(e) = d.receive(&p.payload) {
                                return Err(Fatal(format!("commands: {e}; a restart re-reads the store")).into());
                            }
                        }
                        _ => tracing::debug!(topic = %p.topic, "uplink: message on a topic we did not subscribe to"),
                    }
                    match p.qos {
                        1 => codec::encode_puback(p.pid, out),
                        2 => codec::encode_pubrec(p.pid, out),
                        _ => {}
                    }
                }
                Packet::SubAck { pid: STATUS_PID, codes } => {
                    if codes.iter().any(|c| *c >= 0x80) {
                        tracing::error!(
                            "upstream broker refused the commands subscription (reason {:#04x}): no commands arrive",
                            codes[0]
                        );
                    } else if let Some(d) = &self.downlink {
                        tracing::info!("upstream: subscribed to commands on {}", d.topic());
                    }
                    let retain = self.retain;
                    codec::encode_publish(proto, &self.status_topic, b"online", 1, retain, false, STATUS_PID, out);
                }
                Packet::Disconnect { reason } => {
                    return Err(UplinkError::Refused(format!(
                        "broker sent DISCONNECT, reason {reason:#04x} ({})",
                        reason_name(reason)
                    )));
                }
                _ => {}
            }
        }
        inbuf.drain(..consumed);
        // Ahead of the PUBREC write below, so they ride in it.
        self.log.record_completed(&completed);
        for id in &completed {
            tracing::debug!(batch = id, "batch {id} completed upstream");
        }
        if !pubrecs.is_empty() {
            self.log.record(&pubrecs).map_err(|e| self.log_failed("write", e))?;
            crate::crashpoint::hit("after-pubrec-sync");
            for id in pubrecs {
                if let Some(f) = self.window.iter_mut().find(|f| f.id == id) {
                    f.stage = Stage::AwaitComp;
                    f.rel_resent = false;
                    codec::encode_pubrel(packet_id(id), out);
                }
            }
        }
        Ok(())
    }

    fn find(&mut self, pid: u16, stage: Stage) -> Option<&mut Flight> {
        self.window.iter_mut().find(|f| f.stage == stage && packet_id(f.id) == pid)
    }

    fn refused(&mut self, id: u64, reason: u8) -> Result<(), Fatal> {
        Metrics::inc(&self.metrics.batches_refused);
        let Some(i) = self.window.iter().position(|f| f.id == id) else { return Ok(()) };
        self.window[i].refusals += 1;
        let refusals = self.window[i].refusals;
        let kind = classify(reason);
        let name = reason_name(reason);
        if kind == Refusal::Permanent && refusals >= self.cfg.dead_letter_after {
            let why = format!("refused {refusals} time(s) by the broker, last with reason {reason:#04x} ({name})");
            return self.dead_letter(i, reason, why);
        }
        let pause = match kind {
            Refusal::Transient => {
                let p = self.jitter(self.refusal_pause);
                self.refusal_pause = (self.refusal_pause * 2).min(self.cfg.reconnect_max);
                p
            }
            Refusal::Permanent => {
                let d = (REFUSAL_PAUSE * 2u32.saturating_pow(refusals - 1)).min(self.cfg.reconnect_max);
                self.jitter(d)
            }
        };
        if refusals == 1 {
            tracing::warn!(
                batch = id,
                "upstream broker refused batch {id} (reason {reason:#04x}, {name}, {}); retrying in {pause:?}",
                match kind {
                    Refusal::Transient => "transient".to_string(),
                    Refusal::Permanent =>
                        format!("permanent: dead-lettered after {} attempt(s)", self.cfg.dead_letter_after),
                }
            );
        } else {
            tracing::debug!(batch = id, "batch {id} refused again (reason {reason:#04x}, attempt {refusals})");
        }
        let f = &mut self.window[i];
        f.stage = Stage::Unsent;
        // Refused means the broker dropped it: the retry is a new message.
        f.maybe_sent = false;
        f.retry_at = Some(Instant::now() + pause);
        Ok(())
    }

    /// Move `window[i]` to the dead-letter store (durably), then let it
    /// leave the queue like a delivered batch.
    fn dead_letter(&mut self, i: usize, code: u8, reason: String) -> Result<(), Fatal> {
        let f = &self.window[i];
        let rec = DeadBatch {
            queue_id: f.id,
            readings: f.readings,
            created_ms: f.created_ms,
            dead_ms: crate::reading::now_ms(),
            reason_code: code,
            reason: reason.clone(),
            payload: f.payload.clone(),
        };
        let (id, readings) = (f.id, f.readings);
        match self.dead.append(&rec) {
            Ok(()) => {}
            Err(WriteError::Write(e)) => {
                tracing::error!(
                    batch = id,
                    "cannot write batch {id} to the dead-letter store {}: {e}; it stays in the queue and is tried again",
                    self.dead.path().display()
                );
                let pause = self.cfg.reconnect_max;
                let f = &mut self.window[i];
                f.stage = Stage::Unsent;
                f.maybe_sent = false;
                f.retry_at = Some(Instant::now() + pause);
                return Ok(());
            }
            Err(WriteError::Sync(e)) => {
                return Err(Fatal(format!(
                    "dead-letter store {}: fdatasync failed: {e}; a restart re-reads it",
                    self.dead.path().display()
                )));
            }
        }
        crate::crashpoint::hit("after-dead-letter");
        Event::BatchDeadLettered {
            id,
            readings,
            why: &reason,
            store: self.dead.path(),
            store_batches: self.dead.batches(),
        }
        .emit(&self.metrics);
        let f = &mut self.window[i];
        f.stage = Stage::Done;
        f.readings = 0;
        f.payload = Vec::new(); // not counted as delivered
        f.retry_at = None;
        Ok(())
    }

    /// Pop delivered batches off the front and ack them in the queue;
    /// whether the window has room it did not have before.
    fn advance(&mut self) -> bool {
        let flights = self.window.len();
        let mut last = None;
        // Only up to the cursor: beyond it are records pulled ahead, with
        // records before them not read yet.
        while self.window.front().is_some_and(|f| f.stage == Stage::Done && f.id <= self.cursor) {
            let f = self.window.pop_front().unwrap();
            count_delivered(&self.metrics, &f);
            // A record's ack waits for its last message.
            if f.id == f.record_last {
                last = Some(f.id);
            }
        }
        // Nothing left at or below the cursor: everything through it is
        // done (the cursor may have stepped over records finished ahead).
        if self.window.front().is_none_or(|f| f.id > self.cursor) && self.cursor > self.acked {
            last = Some(self.cursor);
        }
        self.compact_ahead();
        if self.window.iter().all(|f| f.retry_at.is_none()) {
            self.refusal_pause = REFUSAL_PAUSE;
        }
        if let Some(id) = last {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = q.ack_through(id) {
                tracing::error!(batch = id, "uplink: cannot ack batch {id} in the queue: {e}");
                return self.window.len() < flights;
            }
            crate::crashpoint::hit("after-pubcomp-ack");
            self.acked = id;
        }
        self.window.len() < flights
    }

    /// Make acks durable now and then (or now, when `force`), and drop
    /// PUBREC entries the durable ledger now covers; completed notes that
    /// waited [`inflight::RIDE_MAX`] for a PUBREC (all of them when `force`)
    /// go to the PUBREC log on their own.
    fn commit_acks(&mut self, force: bool) -> Result<(), Fatal> {
        if force || self.last_commit.elapsed() >= ACK_COMMIT_EVERY {
            self.commit_queue(force)?;
        }
        self.log.flush_completed(if force { Duration::ZERO } else { inflight::RIDE_MAX });
        Ok(())
    }

    fn commit_queue(&mut self, force: bool) -> Result<(), Fatal> {
        self.last_commit = Instant::now();
        let durable = {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.durable_head() < self.acked {
                // Paced as the pipeline's commits are: one ledger entry a
                // second between them, whoever writes it.
                let r = if force { q.commit() } else { q.commit_paced() };
                if let Err(e) = r {
                    // As in the pipeline: after a failed fsync only a rescan
                    // of the disk knows what is durable.
                    return Err(Fatal(format!("queue commit failed: {e}; a restart rescans the queue")));
                }
            }
            q.durable_head()
        };
        self.durable = durable;
        if let Err(e) = self.log.forget_through(durable) {
            tracing::warn!("uplink: cannot compact uplink.pubrec: {e}");
        }
        Ok(())
    }
}

/// A flight leaving the window: counted as delivered unless it was skipped
/// or dead-lettered.
fn count_delivered(metrics: &Metrics, f: &Flight) {
    if f.readings > 0 || !f.payload.is_empty() {
        Metrics::inc(&metrics.batches_delivered);
        Metrics::add(&metrics.readings_delivered, f.readings as u64);
    }
}

/// What the PUBREC log is tied to: scheme, host, port and client id.
fn session_identity(url: &BrokerUrl, client_id: &str) -> String {
    format!("{}://{}:{} {client_id}", if url.tls { "mqtts" } else { "mqtt" }, url.host, url.port)
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
/// `beat`, if given, is beaten by the uplink's own loop (and through its
/// bounded waits), so the systemd watchdog learns when the loop is wedged,
/// even while the thread and its runtime are free.
pub fn spawn(
    mut uplink: Uplink,
    stop: watch::Receiver<bool>,
    beat: Option<crate::service::Beat>,
    fatal: FatalTx,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    uplink.beat = beat;
    std::thread::Builder::new().name("uplink".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("uplink runtime");
        let r = rt.block_on(tracing::Instrument::instrument(
            uplink.run(stop),
            tracing::info_span!("uplink", source = "uplink"),
        ));
        if let Err(f) = r {
            fatal.raise(f);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, StoreConfig};
    use crate::queue::QueueOptions;

    fn cfg(extra: &str) -> UpstreamConfig {
        let src = format!(
            "[gateway]\nid = \"gw\"\ndata_dir = \"/nonexistent\"\n[upstream]\nurl = \"mqtt://127.0.0.1:1\"\nallow_plaintext = true\nmax_inflight = 3\n{extra}"
        );
        Config::parse(&src, "t.toml").unwrap().upstream.unwrap()
    }

    /// An uplink over a queue holding `n` committed batches.
    fn uplink(dir: &Path, n: u64, extra: &str) -> Uplink {
        let (mut q, _) = Queue::open(&dir.join("queue"), QueueOptions::from(&StoreConfig::default())).unwrap();
        for i in 0..n {
            q.append(1, i, format!("batch {i}").as_bytes()).unwrap();
        }
        q.commit().unwrap();
        let queue = Arc::new(Mutex::new(q));
        Uplink::new(&cfg(extra), "gw", dir, queue, Arc::new(Metrics::default())).unwrap()
    }

    #[test]
    fn reason_codes_are_classified() {
        for c in [0x89, 0x91, 0x93, 0x96, 0x97, 0x9F] {
            assert_eq!(classify(c), Refusal::Transient, "{c:#x}");
        }
        for c in [0x80, 0x83, 0x87, 0x90, 0x95, 0x99, 0x9A, 0xA2] {
            assert_eq!(classify(c), Refusal::Permanent, "{c:#x}");
        }
    }

    /// Every batch already queued at start-up may have been published by
    /// the previous run, not only the first window's worth: each one's first
    /// PUBLISH in a resumed session carries DUP=1.
    #[test]
    fn every_batch_queued_before_a_restart_goes_out_with_dup_in_a_resumed_session() {
        let dir = tempfile::tempdir().unwrap();
        let mut u = uplink(dir.path(), 10, "");
        u.log.confirm().unwrap();
        u.resume(true).unwrap();
        let mut dups = Vec::new();
        for _ in 0..4 {
            u.fill(3).unwrap();
            let mut out = Vec::new();
            u.send_ready(Protocol::V5, 2, 3, usize::MAX, &mut out).unwrap();
            let mut at = 0;
            while let Some((p, n)) = codec::decode(Protocol::V5, &out[at..], 1 << 20).unwrap() {
                at += n;
                if let Packet::Publish(p) = p {
                    dups.push(p.dup);
                }
            }
            // Complete them all.
            for f in u.window.iter_mut() {
                f.stage = Stage::Done;
            }
            let _ = u.advance();
        }
        assert_eq!(dups.len(), 10);
        assert!(dups.iter().all(|d| *d), "DUP flags {dups:?}");
    }

    /// A priority record far behind a backlog goes out first, and the queue
    /// ack never passes the records before it that were not delivered; when
    /// the window reaches it, it is not sent again.
    #[test]
    fn a_priority_record_goes_out_ahead_and_its_ack_waits_for_the_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let (mut q, _) = Queue::open(&dir.path().join("queue"), QueueOptions::from(&StoreConfig::default())).unwrap();
        for i in 1..=100u64 {
            let p = format!("batch {i}");
            q.append_with(1, i, p.as_bytes(), i == 90, 1).unwrap();
        }
        q.commit().unwrap();
        let queue = Arc::new(Mutex::new(q));
        let mut u = Uplink::new(&cfg(""), "gw", dir.path(), queue.clone(), Arc::new(Metrics::default())).unwrap();
        u.log.confirm().unwrap();
        u.resume(true).unwrap();
        let sent = |u: &mut Uplink| {
            let mut out = Vec::new();
            u.send_ready(Protocol::V5, 2, 3, usize::MAX, &mut out).unwrap();
            let (mut at, mut ids) = (0, Vec::new());
            while let Some((p, n)) = codec::decode(Protocol::V5, &out[at..], 1 << 20).unwrap() {
                at += n;
                if let Packet::Publish(p) = p {
                    ids.push(String::from_utf8(p.payload.to_vec()).unwrap());
                }
            }
            ids
        };
        u.fill(3).unwrap();
        assert_eq!(sent(&mut u), ["batch 90", "batch 1", "batch 2"], "the priority record first");
        // Everything in flight completes: the ack stops at the window's cursor.
        for f in u.window.iter_mut() {
            f.stage = Stage::Done;
        }
        let _ = u.advance();
        assert_eq!(u.acked, 3, "acked through the window, not through the priority record");
        // The window gets there without sending it again.
        let mut later = Vec::new();
        for _ in 0..40 {
            u.fill(3).unwrap();
            later.extend(sent(&mut u));
            for f in u.window.iter_mut() {
                f.stage = Stage::Done;
            }
            let _ = u.advance();
        }
        assert_eq!(u.acked, 100);
        assert_eq!(later.len(), 96, "batches 4..=100 but 90: {later:?}");
        assert!(!later.contains(&"batch 90".to_string()));
    }

    /// A queue of `n` committed batches `"batch {i}"` (ids 1..=n), those in
    /// `priority` as priority records, and an uplink over it draining
    /// newest first, in a resumed session.
    fn newest_first(dir: &Path, n: u64, priority: &[u64]) -> Uplink {
        let (mut q, _) = Queue::open(&dir.join("queue"), QueueOptions::from(&StoreConfig::default())).unwrap();
        for i in q.next_id()..=n {
            q.append_with(1, i, format!("batch {i}").as_bytes(), priority.contains(&i), 1).unwrap();
        }
        q.commit().unwrap();
        let mut u = Uplink::new(&cfg(""), "gw", dir, Arc::new(Mutex::new(q)), Arc::new(Metrics::default())).unwrap();
        u.lanes.bulk.drain = crate::rules::config::Drain::NewestFirst;
        u.log.confirm().unwrap();
        u.resume(true).unwrap();
        u
    }

    /// One round with 3 in flight: fill, send, and complete what was sent
    /// (noted in the PUBREC log as PUBCOMP does); the batch numbers sent.
    fn round(u: &mut Uplink) -> Vec<u64> {
        u.fill(3).unwrap();
        let mut out = Vec::new();
        u.send_ready(Protocol::V5, 2, 3, usize::MAX, &mut out).unwrap();
        let (mut at, mut sent) = (0, Vec::new());
        while let Some((p, n)) = codec::decode(Protocol::V5, &out[at..], 1 << 20).unwrap() {
            at += n;
            if let Packet::Publish(p) = p {
                let s = String::from_utf8(p.payload.to_vec()).unwrap();
                sent.push(s.trim_start_matches("batch ").parse().unwrap());
            }
        }
        let done: Vec<u64> = u.window.iter().filter(|f| f.stage == Stage::AwaitRec).map(|f| f.id).collect();
        for f in u.window.iter_mut().filter(|f| f.stage == Stage::AwaitRec) {
            f.stage = Stage::Done;
        }
        u.log.record_completed(&done);
        let _ = u.advance();
        sent
    }

    /// `drain = "newest_first"`: the top of the backlog goes first, newest
    /// first; a batch committed meanwhile goes
    /// ahead of the older ones; the queue's ack waits until the oldest are
    /// delivered; nothing is sent twice.
    #[test]
    fn newest_first_sends_the_top_of_a_backlog_first_and_the_ack_waits_for_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let mut u = newest_first(dir.path(), 100, &[]);
        let mut sent = Vec::new();
        for _ in 0..4 {
            sent.extend(round(&mut u));
        }
        assert_eq!(sent, (89..=100).rev().collect::<Vec<_>>());
        assert_eq!(u.acked, 0, "batches 1..=3 are not delivered yet");
        assert_eq!(u.done_ahead, [(89, 100)], "finished ahead, out of the window");
        assert!(u.window.len() <= 6, "{} flights in the window", u.window.len());
        // A live batch goes ahead of the older backlog.
        {
            let mut q = u.queue.lock().unwrap();
            q.append(1, 0, b"batch 101").unwrap();
            q.commit().unwrap();
        }
        sent.extend(round(&mut u));
        assert_eq!(sent[12..], [101, 88, 87]);
        for _ in 0..60 {
            sent.extend(round(&mut u));
        }
        assert_eq!(u.acked, 101);
        assert_eq!(&sent[sent.len() - 3..], [1, 2, 3], "the oldest last");
        let mut all = sent.clone();
        all.sort();
        assert_eq!(all, (1..=101).collect::<Vec<_>>(), "each batch once");
        assert!(u.done_ahead.is_empty() && u.window.is_empty() && u.newest.is_none());
        assert_eq!(Metrics::get(&u.metrics.batches_delivered), 101);
    }

    /// A crash in the middle of a newest-first drain: batches completed
    /// ahead of the queue's ack are known from the PUBREC log's notes and
    /// never sent again; the rest is.
    #[test]
    fn newest_first_after_a_crash_sends_only_what_was_not_completed() {
        let dir = tempfile::tempdir().unwrap();
        let mut u = newest_first(dir.path(), 50, &[]);
        let mut sent = Vec::new();
        for _ in 0..5 {
            sent.extend(round(&mut u));
        }
        assert_eq!(u.acked, 0);
        drop(u); // the queue's ack never became durable
        let mut u = newest_first(dir.path(), 50, &[]);
        for _ in 0..40 {
            sent.extend(round(&mut u));
        }
        assert_eq!(u.acked, 50);
        let mut all = sent.clone();
        all.sort();
        assert_eq!(all, (1..=50).collect::<Vec<_>>(), "each batch once across the crash: {sent:?}");
    }

    /// Past its bound the pull from the top stops: the part below drains
    /// oldest first, then the top is pulled again. A priority record still
    /// goes first of all.
    #[test]
    fn newest_first_is_bounded_and_priority_records_still_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut u = newest_first(dir.path(), 40, &[20]);
        u.newest_max = 6;
        let mut sent = Vec::new();
        for _ in 0..30 {
            sent.extend(round(&mut u));
        }
        assert_eq!(sent[..7], [20, 40, 39, 38, 37, 36, 35], "{sent:?}");
        let after: Vec<u64> = sent[7..].to_vec();
        assert_eq!(after, (1..=34).filter(|i| *i != 20).collect::<Vec<_>>(), "then oldest first");
        assert_eq!(u.acked, 40);
    }

    /// Lost session: PUBREC entries beyond the window are counted (they go
    /// out again as new messages), completed ones are neither counted nor sent.
    #[test]
    fn a_lost_session_counts_log_entries_beyond_the_window_and_skips_completed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut u = uplink(dir.path(), 10, "");
        u.log.confirm().unwrap();
        u.log.record(&[2, 3, 7, 8]).unwrap();
        u.log.record_completed(&[2, 3]);
        drop(u);
        let mut u = uplink(dir.path(), 0, "");
        assert!(u.log.confirmed());
        u.resume(false).unwrap();
        assert_eq!(Metrics::get(&u.metrics.batches_resent_session_lost), 2, "7 and 8");
        u.fill(3).unwrap();
        let stages: Vec<(u64, Stage)> = u.window.iter().map(|f| (f.id, f.stage)).collect();
        assert_eq!(stages, [(1, Stage::Unsent), (2, Stage::Done), (3, Stage::Done)]);
    }

    /// A permanently refused batch is retried `dead_letter_after` times, then
    /// stored and let go; a transient refusal is never dead-lettered.
    #[test]
    fn permanent_refusals_end_in_the_dead_letter_store_transient_ones_never() {
        let dir = tempfile::tempdir().unwrap();
        let mut u = uplink(dir.path(), 2, "dead_letter_after = 3");
        u.fill(3).unwrap();
        for _ in 0..10 {
            u.refused(2, 0x97).unwrap();
        }
        assert_eq!(u.window[1].stage, Stage::Unsent);
        for i in 1..=3 {
            u.refused(1, 0x87).unwrap();
            assert_eq!(u.window[0].stage == Stage::Done, i == 3, "after {i} refusals");
        }
        let dead = dead::read(dir.path()).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!((dead[0].queue_id, dead[0].reason_code, dead[0].payload.as_slice()), (1, 0x87, &b"batch 0"[..]));
        assert!(dead[0].reason.contains("not authorized"), "{}", dead[0].reason);
        let _ = u.advance();
        assert_eq!(u.acked, 1, "the dead batch left the queue");
        assert_eq!(Metrics::get(&u.metrics.batches_delivered), 0, "and was not counted as delivered");
        assert_eq!(Metrics::get(&u.metrics.dead_letter_batches), 1);
    }
}
