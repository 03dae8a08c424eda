//! The embedded MQTT broker for LAN devices and dashboards (rumqttd 0.20).
//!
//! LAN devices publish readings to `ingest` (`sensors/{device}/{sensor}`);
//! [`crate::source::lan`] takes them off a local rumqttd link into the same
//! dedup → batch → queue path as serial readings. Every accepted reading,
//! from any source, is republished retained on `republish`
//! (`readings/{device}/{sensor}`), and the gateway's status on
//! `status_topic` every `status_interval`.
//!
//! ## What runs where, and who stops it
//! * rumqttd's router: one OS thread of its own (`Router::spawn`). rumqttd
//!   has no way to stop it (#771): it ends with the process.
//! * rumqttd's listeners, internal only: an MQTT 3.1.1 and an MQTT 5 server
//!   on loopback ports, as tasks on a current-thread runtime in the
//!   `broker-internal` thread (rumqttd's connection code blocks on channel
//!   sends, so it must not share our runtime). A supervisor restarts a
//!   server whose task ends or that stops answering CONNECTs, on a new port.
//!   They require an internal password, so local processes cannot bypass
//!   the front door. Every client goes through the MQTT 5 one ([`v3`]);
//!   the 3.1.1 one only serves the door's session wipes ([`session`]).
//! * Our front door ([`proxy`]): one tokio task per public listener (tcp,
//!   tls, websocket) on the main runtime, one task per client.
//! * The ingest task ([`crate::source::lan`]) on the main runtime, reading
//!   the local link ([`LanFeed`]) with its async `next()`. [`crate::app`]
//!   starts it like every source; the broker supervises it
//!   ([`Broker::adopt_ingest`], [`IngestFailure`]): should it
//!   ever stop on its own (the link closed), rumqttd would go on acking
//!   LAN publishes nobody takes, so the broker closes every LAN connection
//!   and listener at once and the gateway exits non-zero for systemd to
//!   restart it ([`Broker::failure`]). No client can close the link by
//!   taking its id (`LINK_CLIENT_ID`, [`internal_client_id`]).
//! * The `broker-publish` thread: republishes readings and status through
//!   the local link (its `send` blocks when the router is busy).
//! * The ack task: takes the pipeline's acks for LAN devices (the LAN
//!   source's ack route) into [`Durable`], which the front door waits on
//!   before it forwards a PUBACK/PUBCOMP when `broker.ack = "durable"`.
//!   It ends with the pipeline, the route's only sender.
//!
//! Shutdown ([`Broker::stop`]): the listeners close every client
//! connection, the internal servers stop, and the ingest task hands over
//! what the router already forwarded — all before the pipeline drains, so
//! the last LAN readings reach the queue. The publish thread ends when the
//! pipeline drops its sender.
//!
//! ## rumqttd 0.20 problems handled at our boundary
//! * A rejected client id (`/ + # $`) that connects twice panics inside the
//!   listener while holding a mutex (#1062): ids are %-escaped by the proxy.
//! * A stalled TLS or WebSocket handshake blocks the whole listener: ours
//!   run in per-connection tasks with `connect_timeout`.
//! * `Broker::start()` blocks and returns Ok even when the port is taken:
//!   we bind the public ports ourselves, first, and fail with the port named.
//! * No connection limit before CONNECT, no CONNACK code on a failed login,
//!   no ACLs: the proxy counts connections (globally, per address and per
//!   user), answers CONNACK 3/4/5, and applies the ACL ([`acl`]) to
//!   PUBLISH, SUBSCRIBE, the will, and every message on its way to a client.
//! * A client id that connects again replaces the older connection, the
//!   local link's included: ids are `user:id` (see [`internal_client_id`]).
//! * MQTT 5 topic aliases (rumqttd advertises 4096) would carry PUBLISHes
//!   past the topic checks with an empty topic: the proxy removes the
//!   advertisement from the CONNACK and refuses empty topics.
//! * No backpressure from a slow subscriber: rumqttd skips ahead for it and
//!   loses what it had not read. [`Flow`] holds publishers back instead.

pub mod acl;
pub mod auth;
pub mod config;
pub mod limits;
pub mod proxy;
pub mod session;
pub mod topic;
pub mod v3;

use crate::metrics::Metrics;
use crate::metrics::status::Probe;
use crate::reading::{Ack, Reading};
use crate::route::{DeviceCommand, Route, ToDevice};
use crate::shutdown::{self, Shutdown};
use argon2::password_hash::rand_core::{OsRng, RngCore};
use config::{BrokerAck, BrokerConfig};
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use topic::TopicPattern;
use tracing::{error, info, warn};

/// Readings waiting to be republished; past this they are dropped (counted):
/// republishing is best effort and must never slow the pipeline.
const REPUBLISH_CHANNEL: usize = 8192;
/// ... and the bytes they may hold ([`crate::channel`]).
const REPUBLISH_BYTES: usize = 2 << 20;
/// Commands for LAN devices waiting for the publish thread.
const COMMAND_CHANNEL: usize = 256;
/// Where LAN devices answer commands: `commands/{device}/ack`.
pub const COMMAND_ACK_FILTER: &str = "commands/+/ack";
/// rumqttd keeps every published message in per-filter in-memory segments
/// until they rotate out (3 MiB a filter here, kept once filled): this bounds
/// the broker's memory, and how far a subscriber may lag before rumqttd skips
/// messages for it. Smaller segments cost no throughput in the bench and cut
/// its peak RSS from 60 to 46 MiB.
const SEGMENT_BYTES: usize = 512 << 10;
const SEGMENT_COUNT: usize = 6;
/// How far (topic + payload bytes) the ingest task may lag behind what the
/// front door let into the ingest topics before the front door stops reading
/// from publishers: well inside rumqttd's retention above, so rumqttd never
/// skips a LAN reading; TCP pushes back on the devices instead.
const INGEST_LAG_LIMIT: u64 = 1 << 20;
/// Consecutive CONNECTs the internal server left unanswered before it is restarted.
const INTERNAL_FAILURES_BEFORE_RESTART: u32 = 3;
const INTERNAL_USER: &str = "edge-gateway-proxy";
/// The local link's client id. No LAN client can produce it: the front door
/// hands rumqttd only ids of the form `user:id` ([`internal_client_id`]),
/// which always hold a `:`, and whose `%` is always followed by one of the
/// escape codes below (`%in` is none). rumqttd drops the older connection
/// when an id connects twice, so a client that could take this id would cut
/// LAN ingest off (issue 19, C1).
const LINK_CLIENT_ID: &str = "edge-gateway%ingest";

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr} (broker.{key}): {source}")]
    Listen { key: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("broker.{key} {path}: {message}")]
    Tls { key: &'static str, path: String, message: String },
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("internal broker: {0}")]
    Internal(String),
}

/// `site1/dev1` → `site1%2Fdev1`: the characters rumqttd refuses in client
/// ids, `:` (our user separator, see [`internal_client_id`]) and `%` itself
/// so that the mapping stays one-to-one.
pub fn escape_client_id(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for c in id.chars() {
        match c {
            '%' => out.push_str("%25"),
            ':' => out.push_str("%3A"),
            '/' => out.push_str("%2F"),
            '+' => out.push_str("%2B"),
            '#' => out.push_str("%23"),
            '$' => out.push_str("%24"),
            c => out.push(c),
        }
    }
    out
}

/// The client id rumqttd sees for a client logged in as `user` (None:
/// anonymous) with id `id`: `user:id`, both parts escaped, so one user can
/// neither take over another user's session nor kick its connection (a
/// second connection with the same id replaces the first), and no client
/// can produce `LINK_CLIENT_ID`. An empty id stays empty: rumqttd then
/// assigns a random one (and MQTT 5 clients are told it).
pub fn internal_client_id(user: Option<&str>, id: &str) -> String {
    if id.is_empty() {
        return String::new();
    }
    format!("{}:{}", escape_client_id(user.unwrap_or("")), escape_client_id(id))
}

/// Debug builds only: `EDGE_GATEWAY_BROKER_RAW_CLIENT_IDS=1` hands client ids
/// to rumqttd unescaped, so a test can wedge it for real (#1062) and watch
/// the supervisor restart it. A release binary ignores the variable.
fn raw_client_ids() -> bool {
    cfg!(debug_assertions) && std::env::var_os("EDGE_GATEWAY_BROKER_RAW_CLIENT_IDS").is_some()
}

/// The internal rumqttd servers, as the proxy sees them.
pub struct Internal {
    v4: AtomicU16,
    v5: AtomicU16,
    password: String,
    failures: AtomicU32,
    restart: Notify,
}

impl Internal {
    pub fn login(&self) -> rumqttd::protocol::Login {
        rumqttd::protocol::Login { username: INTERNAL_USER.into(), password: self.password.clone() }
    }
    pub fn addr(&self, v5: bool) -> SocketAddr {
        let port = if v5 { &self.v5 } else { &self.v4 }.load(Ordering::Relaxed);
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
    }
    pub fn healthy(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }
    pub fn failed(&self) {
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= INTERNAL_FAILURES_BEFORE_RESTART {
            self.failures.store(0, Ordering::Relaxed);
            self.restart.notify_waiters();
        }
    }
}

/// Flow control between the front door and the ingest task.
///
/// rumqttd acks a PUBLISH once it is in its in-memory log and drops the
/// oldest log segment when the log is full, whether or not every subscriber
/// has read it; it has no backpressure from a slow subscriber to the
/// publishers. So the front door counts what it lets into the ingest topics,
/// the ingest task counts what it took, and publishers wait while the
/// difference is over a limit (1 MiB).
///
/// The two counts can drift apart (a PUBLISH rumqttd refused, a QoS 2
/// resend it deduplicated): when publishers are held back while the ingest
/// task sits waiting for the router with nothing to take, the difference is
/// not real, and it is forgotten.
pub struct Flow {
    admitted: AtomicU64,
    taken: AtomicU64,
    limit: u64,
    room: Notify,
    /// The ingest task is waiting for rumqttd (not busy, not held by the pipeline).
    idle: AtomicBool,
}

impl Flow {
    pub fn new(limit: u64) -> Flow {
        Flow {
            admitted: AtomicU64::new(0),
            taken: AtomicU64::new(0),
            limit,
            room: Notify::new(),
            idle: AtomicBool::new(true),
        }
    }

    pub fn lag(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed).saturating_sub(self.taken.load(Ordering::Relaxed))
    }

    /// Wait until there is room, then count `bytes` as admitted.
    pub async fn admit(&self, bytes: u64) {
        let mut idle_polls = 0;
        while self.lag() >= self.limit {
            // The timeout covers a wake-up that raced with the check.
            if tokio::time::timeout(Duration::from_millis(5), self.room.notified()).await.is_err()
                && self.idle.load(Ordering::Relaxed)
            {
                idle_polls += 1;
                if idle_polls >= 10 {
                    self.admitted.store(self.taken.load(Ordering::Relaxed), Ordering::Relaxed);
                }
            } else {
                idle_polls = 0;
            }
        }
        self.admitted.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The ingest task took `bytes`.
    pub fn taken(&self, bytes: u64) {
        self.taken.fetch_add(bytes, Ordering::Relaxed);
        if self.lag() < self.limit {
            self.room.notify_waiters();
        }
    }

    /// The ingest task waits for rumqttd (true) or works (false).
    pub fn set_idle(&self, idle: bool) {
        self.idle.store(idle, Ordering::Relaxed);
    }
}

/// The pipeline's acks for LAN devices, which the front door waits on
/// before it forwards a PUBACK or PUBCOMP when `broker.ack = "durable"`.
///
/// A reading `(device, seq)` registered at generation `g` (the count of the
/// device's acks so far) is durable once an ack for the device numbered
/// after `g` says `seq` or more. Acks are cumulative, and "after
/// registration" keeps an old high ack from covering a device that restarted
/// its counter (the pipeline then acks from the new, lower seqs).
#[derive(Default)]
pub struct Durable {
    /// [`Durable::key`] → (latest acked seq, number of acks so far)
    acked: Mutex<std::collections::HashMap<String, (u64, u64)>>,
    changed: Notify,
}

impl Durable {
    /// Who an ack speaks for: the device, and its boot when it sends one
    /// (each boot has its own seqs and acks). NUL cannot be in a device id.
    pub fn key(device: &str, boot: Option<u32>) -> String {
        match boot {
            None => device.to_string(),
            Some(b) => format!("{device}\0{b}"),
        }
    }

    pub fn acked(&self, ack: &Ack) {
        let mut m = self.acked.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(Self::key(&ack.device, ack.boot)).or_insert((0, 0));
        *e = (ack.seq, e.1 + 1);
        drop(m);
        self.changed.notify_waiters();
    }

    /// The device's ack generation now: pass it to [`Durable::wait`].
    pub fn generation(&self, device: &str) -> u64 {
        self.acked.lock().unwrap_or_else(|e| e.into_inner()).get(device).map_or(0, |e| e.1)
    }

    fn is_durable(&self, device: &str, seq: u64, generation: u64) -> bool {
        self.acked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(device)
            .is_some_and(|(acked, g)| *g > generation && *acked >= seq)
    }

    /// Wait until `(device, seq)`, registered at `generation`, is durable.
    pub async fn wait(&self, device: &str, seq: u64, generation: u64) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.is_durable(device, seq, generation) {
                return;
            }
            changed.await;
        }
    }
}

/// What the LAN source ([`crate::source::lan`]) reads: the broker's local
/// link, subscribed to `ingest`, and the [`Flow`] it reports to.
pub struct LanFeed {
    pub link: LinkRx,
    pub pattern: TopicPattern,
    pub flow: Arc<Flow>,
}

/// How the LAN source says it stopped on its own. Nothing would take LAN
/// readings any more, yet rumqttd would go on acking them: every LAN
/// connection and listener is closed at once, and [`Broker::failure`]
/// resolves so the gateway exits non-zero.
#[derive(Clone)]
pub struct IngestFailure {
    gate: Shutdown,
    failed: Arc<tokio::sync::watch::Sender<Option<String>>>,
}

impl IngestFailure {
    pub fn report(&self, why: String) {
        error!("broker: LAN ingest stopped ({why}); closing the LAN listeners, the gateway will exit");
        self.gate.trigger();
        self.failed.send_replace(Some(why));
    }
}

/// A running broker; see the module docs for what it owns.
pub struct Broker {
    stop: Shutdown,
    listeners: JoinSet<()>,
    /// The LAN source's task, once [`Broker::adopt_ingest`] handed it over.
    ingest: Option<tokio::task::JoinHandle<()>>,
    ingest_failure: IngestFailure,
    acks: tokio::task::JoinHandle<()>,
    internal: Option<std::thread::JoinHandle<()>>,
    publisher: Option<std::thread::JoinHandle<()>>,
    /// For the pipeline: every accepted reading goes here (see
    /// `Pipeline::set_republish`). Held until [`Broker::finish`] so the
    /// status keeps going even when `republish` is disabled.
    pub republish: Option<crate::channel::Sender<Reading>>,
    pub local_addrs: Vec<(&'static str, SocketAddr)>,
    /// Becomes `Some(why)` if LAN ingest stopped on its own.
    failed: tokio::sync::watch::Receiver<Option<String>>,
    /// The ACL in force; a reload replaces it (see [`acl::Store::replace`]).
    pub acl: Arc<acl::Store>,
}

impl Broker {
    /// Resolves (with the reason) if LAN ingest ever stops on its own; by
    /// then the broker has closed its listeners and every LAN connection.
    pub fn failure(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut rx = self.failed.clone();
        async move {
            let why = rx.wait_for(|f| f.is_some()).await.map(|f| f.clone().unwrap_or_default());
            match why {
                Ok(why) => why,
                // The supervisor is gone without a failure: never resolves.
                Err(_) => std::future::pending().await,
            }
        }
    }

    /// Bind the listeners (failing with the port named if one is taken),
    /// start rumqttd and the ingest and publish sides.
    /// LAN readings reach the pipeline as `Origin::Lan`; the pipeline's
    /// acks for them come back on `acks`, the link registered as `route`
    /// (held for as long as the broker takes acks).
    pub async fn start(
        b: &BrokerConfig,
        route: Route,
        acks: mpsc::Receiver<ToDevice>,
        metrics: Arc<Metrics>,
        status: Probe,
    ) -> Result<(Broker, LanFeed), BrokerError> {
        // Bind first: nothing is started if a port is taken.
        let mut bound = Vec::new();
        for (key, addr) in [("tcp", b.tcp), ("tls", b.tls), ("websocket", b.websocket)] {
            if let Some(addr) = addr {
                let l = TcpListener::bind(addr).await.map_err(|source| BrokerError::Listen { key, addr, source })?;
                bound.push((key, l));
            }
        }
        let tls = match b.tls {
            Some(_) => Some(tls_acceptor(b)?),
            None => None,
        };
        // Reading password_file and hashing the dummy password block.
        let users = {
            let b = b.clone();
            Arc::new(
                tokio::task::spawn_blocking(move || auth::Users::load(&b))
                    .await
                    .map_err(|e| BrokerError::Internal(e.to_string()))??,
            )
        };
        let acl = Arc::new(acl::Store::new(acl::Acl::from_config(b)));
        let ingest = TopicPattern::parse(&b.ingest).map_err(BrokerError::Internal)?;
        let republish = if b.republish.is_empty() {
            None
        } else {
            Some(TopicPattern::parse(&b.republish).map_err(BrokerError::Internal)?)
        };

        let router_tx = Router::new(0, router_config(b)).spawn();
        let internal = Arc::new(Internal {
            v4: AtomicU16::new(0),
            v5: AtomicU16::new(0),
            password: random_secret(),
            failures: AtomicU32::new(0),
            restart: Notify::new(),
        });
        let stop = Shutdown::new();
        let internal_thread = {
            let (internal, router_tx, settings, stop) =
                (internal.clone(), router_tx.clone(), b.clone(), stop.subscribe());
            let password = internal.password.clone();
            // rumqttd does not export the router channel's type: a closure carries it.
            let servers = move |p4: u16, p5: u16| {
                use rumqttd::protocol::{v4::V4, v5::V5};
                let v4 = Server::new(server_settings(&settings, "internal-v4", p4, &password), router_tx.clone(), V4);
                let v5 = Server::new(server_settings(&settings, "internal-v5", p5, &password), router_tx.clone(), V5);
                (v4, v5)
            };
            std::thread::Builder::new()
                .name("broker-internal".into())
                .spawn(move || run_internal(internal, servers, stop))
                .map_err(|e| BrokerError::Internal(format!("cannot start its thread: {e}")))?
        };
        wait_internal_ready(&internal).await?;

        // One local link: its receiving half feeds ingest, its sending half publishes.
        let filter = ingest.filter();
        let (link_tx, link_rx) = tokio::task::spawn_blocking(move || -> Result<(LinkTx, LinkRx), String> {
            let (mut tx, rx, _ack) = LinkBuilder::new(LINK_CLIENT_ID, router_tx).build().map_err(|e| e.to_string())?;
            tx.subscribe(filter).map_err(|e| e.to_string())?;
            // Devices' answers to commands (crate::downlink).
            tx.subscribe(COMMAND_ACK_FILTER).map_err(|e| e.to_string())?;
            Ok((tx, rx))
        })
        .await
        .map_err(|e| BrokerError::Internal(e.to_string()))?
        .map_err(BrokerError::Internal)?;

        let flow = Arc::new(Flow::new(INGEST_LAG_LIMIT));
        let (failed_tx, failed) = tokio::sync::watch::channel(None);
        let feed = LanFeed { link: link_rx, pattern: ingest.clone(), flow: flow.clone() };

        let (rp_tx, rp_rx) = crate::channel::channel(REPUBLISH_CHANNEL, REPUBLISH_BYTES);
        let (cmd_tx, cmd_rx) = mpsc::channel::<DeviceCommand>(COMMAND_CHANNEL);
        let publisher = {
            let (topic, every, m) = (b.status_topic.clone(), b.status_interval, metrics.clone());
            std::thread::Builder::new()
                .name("broker-publish".into())
                .spawn(move || run_publisher(link_tx, rp_rx, cmd_rx, republish, topic, every, status, m))
                .map_err(|e| BrokerError::Internal(format!("cannot start its thread: {e}")))?
        };

        // Ends when the pipeline, the route's only sender, is gone.
        let durable = Arc::new(Durable::default());
        let ack_task = {
            let (durable, mut acks) = (durable.clone(), acks);
            tokio::spawn(async move {
                let _route = route;
                while let Some(down) = acks.recv().await {
                    match down {
                        ToDevice::Ack(ack) => durable.acked(&ack),
                        // LAN delivery of commands is not built yet: the
                        // command stays pending until its ttl.
                        // Published by the publish thread; when it is busy
                        // the downlink sends the command again later.
                        ToDevice::Command(c) => {
                            if cmd_tx.try_send(c).is_err() {
                                tracing::debug!("broker: command for a LAN device dropped (publisher busy)");
                            }
                        }
                    }
                }
            })
        };

        let shared = Arc::new(proxy::Shared {
            users,
            acl: acl.clone(),
            internal,
            connections: Arc::new(tokio::sync::Semaphore::new(b.max_connections)),
            handshakes: Arc::new(tokio::sync::Semaphore::new((4 * b.max_connections).max(256))),
            connect_timeout: b.connect_timeout,
            max_payload: b.max_payload as usize,
            metrics,
            refusal_log: Default::default(),
            ingest,
            flow,
            escape_ids: !raw_client_ids(),
            durable: (b.ack == BrokerAck::Durable).then_some(durable),
            limits: Arc::new(limits::Limits::new(
                b.max_handshakes_per_address,
                b.max_connections_per_user,
                b.max_devices_per_user,
            )),
            ws_origins: b.websocket_origins.clone().into(),
            sessions: Default::default(),
        });
        let mut listeners = JoinSet::new();
        let mut local_addrs = Vec::new();
        for (key, l) in bound {
            let kind = match key {
                "tls" => proxy::Kind::Tls(tls.clone().expect("tls acceptor built when tls is set")),
                "websocket" => proxy::Kind::Ws,
                _ => proxy::Kind::Tcp,
            };
            if let Ok(a) = l.local_addr() {
                info!("broker: {key} listening on {a}");
                local_addrs.push((key, a));
            }
            listeners.spawn(proxy::serve(l, kind, shared.clone(), stop.subscribe()));
        }
        info!(
            "broker: ingest {:?}, republish {:?}, status {:?}, {} user(s), {} ACL rule(s), anonymous {}",
            b.ingest,
            b.republish,
            b.status_topic,
            shared.users.count(),
            acl.get().len(),
            if b.allow_anonymous { "allowed" } else { "refused" }
        );
        let failure = IngestFailure { gate: stop.clone(), failed: Arc::new(failed_tx) };
        let broker = Broker {
            stop,
            listeners,
            ingest: None,
            ingest_failure: failure,
            acks: ack_task,
            internal: Some(internal_thread),
            publisher: Some(publisher),
            republish: Some(rp_tx),
            local_addrs,
            failed,
            acl,
        };
        Ok((broker, feed))
    }

    /// The broker's stop signal: the LAN source stops with it.
    pub fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Supervise the LAN source's task (started by [`crate::app`] on the
    /// [`LanFeed`]): [`Broker::stop`] waits for it to hand over what the
    /// router already forwarded, and it reports an end of its own through
    /// [`Broker::ingest_failure`].
    pub fn adopt_ingest(&mut self, task: tokio::task::JoinHandle<()>) {
        self.ingest = Some(task);
    }

    /// For the LAN source's task: how to say it stopped on its own.
    pub fn ingest_failure(&self) -> IngestFailure {
        self.ingest_failure.clone()
    }

    /// Close every listener and client, stop the internal servers, and let
    /// the ingest task hand over what rumqttd already forwarded.
    pub async fn stop(&mut self, budget: Duration) {
        self.stop.trigger();
        let end = tokio::time::Instant::now() + budget;
        let _ = tokio::time::timeout_at(end, async { while self.listeners.join_next().await.is_some() {} }).await;
        self.listeners.abort_all();
        if let Some(ingest) = &mut self.ingest
            && tokio::time::timeout_at(end, &mut *ingest).await.is_err()
        {
            warn!("broker: ingest did not finish within {budget:?}");
            ingest.abort();
        }
        if let Some(t) = self.internal.take() {
            let _ = tokio::time::timeout_at(end, tokio::task::spawn_blocking(move || t.join())).await;
        }
    }

    /// After the pipeline has stopped (and dropped its republish sender).
    pub async fn finish(&mut self, budget: Duration) {
        self.republish = None;
        self.acks.abort();
        if let Some(t) = self.publisher.take() {
            let _ = tokio::time::timeout(budget, tokio::task::spawn_blocking(move || t.join())).await;
        }
    }
}

fn router_config(b: &BrokerConfig) -> RouterConfig {
    RouterConfig {
        // Our proxy enforces max_connections; the router only needs room
        // for them, our local link, and sessions being replaced.
        max_connections: b.max_connections + 16,
        max_outgoing_packet_count: 200,
        max_segment_size: SEGMENT_BYTES,
        max_segment_count: SEGMENT_COUNT,
        ..Default::default()
    }
}

fn random_secret() -> String {
    let mut b = [0u8; 24];
    OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn server_settings(b: &BrokerConfig, name: &str, port: u16, password: &str) -> ServerSettings {
    let mut auth = std::collections::HashMap::new();
    auth.insert(INTERNAL_USER.to_string(), password.to_string());
    ServerSettings {
        name: name.to_string(),
        listen: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: b.connect_timeout.as_millis().min(u16::MAX as u128) as u16,
            // The proxy already enforces max_payload on whole packets.
            max_payload_size: b.max_payload as usize + 70_000,
            max_inflight_count: 100,
            auth: Some(auth),
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

/// A loopback port nobody listens on right now.
pub(crate) fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

/// The internal servers' thread: a current-thread runtime supervising one
/// MQTT 3.1.1 and one MQTT 5 rumqttd server until shutdown.
fn run_internal(
    internal: Arc<Internal>,
    servers: impl Fn(u16, u16) -> (Server<rumqttd::protocol::v4::V4>, Server<rumqttd::protocol::v5::V5>),
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        error!("broker: cannot build the internal runtime");
        return;
    };
    rt.block_on(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let (Ok(p4), Ok(p5)) = (free_port(), free_port()) else {
                error!("broker: no free loopback port for the internal listeners");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            internal.v4.store(p4, Ordering::Relaxed);
            internal.v5.store(p5, Ordering::Relaxed);
            let (mut s4, mut s5) = servers(p4, p5);
            let started = tokio::time::Instant::now();
            tokio::select! {
                biased;
                _ = shutdown::wait(&mut stop) => return,
                _ = internal.restart.notified() => warn!("broker: internal listener stopped answering; restarting it"),
                r = s4.start(LinkType::Remote) => warn!("broker: internal v4 listener ended: {r:?}; restarting it"),
                r = s5.start(LinkType::Remote) => warn!("broker: internal v5 listener ended: {r:?}; restarting it"),
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            tokio::select! {
                _ = shutdown::wait(&mut stop) => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
}

/// Wait until both internal ports are bound (checked by failing to bind them).
async fn wait_internal_ready(internal: &Internal) -> Result<(), BrokerError> {
    let taken = |a: SocketAddr| std::net::TcpListener::bind(a).is_err();
    for _ in 0..250 {
        let (a4, a5) = (internal.addr(false), internal.addr(true));
        if a4.port() != 0 && a5.port() != 0 && taken(a4) && taken(a5) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(BrokerError::Internal("internal listeners did not start within 5 s".into()))
}

fn tls_acceptor(b: &BrokerConfig) -> Result<tokio_rustls::TlsAcceptor, BrokerError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let (cert_path, key_path) = (b.tls_cert.as_ref().expect("validated"), b.tls_key.as_ref().expect("validated"));
    let err = |key, path: &std::path::Path, message: String| BrokerError::Tls {
        key,
        path: path.display().to_string(),
        message,
    };
    let read = |key, path: &std::path::Path| std::fs::read(path).map_err(|e| err(key, path, e.to_string()));
    let cert_pem = read("tls_cert", cert_path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| err("tls_cert", cert_path, e.to_string()))?;
    if certs.is_empty() {
        return Err(err("tls_cert", cert_path, "no PEM certificate in it".into()));
    }
    let key_pem = read("tls_key", key_path)?;
    // The first PKCS#1, PKCS#8 or SEC1 key in the file.
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| err("tls_key", key_path, "no PEM private key in it".into()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err("tls", cert_path, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| err("tls_key", key_path, format!("does not fit the certificate: {e}")))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The publish thread: republish readings (retained) and the status.
#[allow(clippy::too_many_arguments)]
fn run_publisher(
    mut link: LinkTx,
    mut rx: crate::channel::Receiver<Reading>,
    mut commands: mpsc::Receiver<DeviceCommand>,
    republish: Option<TopicPattern>,
    status_topic: String,
    every: Duration,
    status: Probe,
    metrics: Arc<Metrics>,
) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_time().build() else {
        error!("broker: cannot build the publish runtime");
        return;
    };
    rt.block_on(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => {
                        if let Some(p) = &republish {
                            let topic = acl::internal_topic(&p.topic(&r.device, &r.sensor)).into_owned();
                            let mut payload = crate::wire::encode_reading_jsonl(&r);
                            payload.pop(); // the '\n'
                            if link.send(Packet::Publish(Publish::new(topic.into_bytes(), payload, true), None)).await.is_err() {
                                error!("broker: the router is gone; republishing stops");
                                return;
                            }
                            Metrics::inc(&metrics.readings_republished);
                        }
                    }
                    None => return,
                },
                Some(c) = commands.recv() => {
                    // `commands/{device}`: {"id","name","args"}; the device
                    // answers on `commands/{device}/ack`.
                    let topic = format!("commands/{}", c.device);
                    let args: serde_json::Value = serde_json::from_str(&c.args).unwrap_or_default();
                    let payload = serde_json::json!({"id": c.id, "name": c.name, "args": args}).to_string();
                    let p = Packet::Publish(Publish::new(topic.into_bytes(), payload.into_bytes(), false), None);
                    if link.send(p).await.is_err() {
                        error!("broker: the router is gone; commands stop");
                        return;
                    }
                }
                _ = tick.tick(), if !status_topic.is_empty() => {
                    let payload = serde_json::to_vec(&status.take()).unwrap_or_default();
                    let topic = acl::internal_topic(&status_topic).into_owned();
                    let _ = link.send(Packet::Publish(Publish::new(topic.into_bytes(), payload, true), None)).await;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn flow_holds_publishers_while_ingest_lags_and_forgets_phantom_lag() {
        let flow = Arc::new(Flow::new(100));
        flow.set_idle(false);
        flow.admit(60).await;
        flow.admit(60).await; // lag 120 >= 100: the next one waits
        let f = flow.clone();
        let waiting = tokio::spawn(async move { f.admit(10).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "held while the busy ingest lags");
        flow.taken(60);
        waiting.await.unwrap();
        assert_eq!(flow.lag(), 70);
        // 200 bytes rumqttd never delivered: once ingest is idle, the lag is forgotten.
        flow.admit(200).await;
        flow.set_idle(true);
        tokio::time::timeout(Duration::from_secs(1), flow.admit(1)).await.expect("phantom lag forgotten");
        assert_eq!(flow.lag(), 1);
    }

    #[tokio::test]
    async fn durable_needs_an_ack_after_registration() {
        let d = Durable::default();
        let ack = |seq| Ack { device: "w".into(), seq, boot: None };
        d.acked(&ack(500));
        // The device restarted its counter: seq 1 is not covered by the old 500.
        let g = d.generation("w");
        assert!(tokio::time::timeout(Duration::from_millis(50), d.wait("w", 1, g)).await.is_err());
        d.acked(&ack(1));
        tokio::time::timeout(Duration::from_millis(50), d.wait("w", 1, g)).await.expect("acked after registration");
        let g = d.generation("w");
        d.acked(&ack(3));
        tokio::time::timeout(Duration::from_millis(50), d.wait("w", 2, g)).await.expect("cumulative");
        // An ack of another boot covers nothing of this one.
        let k = Durable::key("w", Some(2));
        let g = d.generation(&k);
        d.acked(&Ack { device: "w".into(), seq: 9, boot: Some(1) });
        assert!(tokio::time::timeout(Duration::from_millis(50), d.wait(&k, 0, g)).await.is_err());
        d.acked(&Ack { device: "w".into(), seq: 0, boot: Some(2) });
        tokio::time::timeout(Duration::from_millis(50), d.wait(&k, 0, g)).await.expect("same boot");
    }

    #[test]
    fn client_ids_escape_one_to_one() {
        assert_eq!(escape_client_id("site1/dev1"), "site1%2Fdev1");
        assert_eq!(escape_client_id("a+#$%b"), "a%2B%23%24%25b");
        assert_ne!(escape_client_id("site1%2Fdev1"), escape_client_id("site1/dev1"));
        assert_eq!(escape_client_id("plain-id"), "plain-id");
        assert_eq!(escape_client_id("a:b"), "a%3Ab");
        // Users cannot reach each other's ids, nor the local link's.
        assert_eq!(internal_client_id(Some("site1"), "dev1"), "site1:dev1");
        assert_eq!(internal_client_id(None, "dev1"), ":dev1");
        assert_ne!(internal_client_id(Some("a:b"), "c"), internal_client_id(Some("a"), "b:c"));
        assert_eq!(internal_client_id(Some("u"), ""), "");
        for (u, id) in [(None, LINK_CLIENT_ID), (Some("edge-gateway%ingest"), ""), (Some(""), "edge-gateway%ingest")] {
            assert_ne!(internal_client_id(u, id), LINK_CLIENT_ID);
        }
    }
}
