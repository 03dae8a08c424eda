//! Our front door: every LAN client connects here, never to rumqttd directly.
//!
//! rumqttd 0.20's listener can be wedged or abused (see the crate docs in
//! [`crate::broker`]), so each public listener is a tokio acceptor of ours
//! that never awaits a client in its accept loop. Per connection, in a task
//! of its own and within `connect_timeout`, it finishes the TLS or WebSocket
//! handshake and reads the CONNECT, then:
//! * refuses what rumqttd would mishandle, with a proper CONNACK code: bad
//!   credentials (4 / 0x86), no credentials (5 / 0x87), too many clients
//!   (3 / 0x88), MQTT 3.1 (1);
//! * rewrites the client id to `user:id` (both %-escaped: `/ + # $ % :`;
//!   rumqttd 0.20 rejects such ids and then panics on the second try,
//!   #1062), so users cannot kick or take over each other's sessions and no
//!   client can take the local link's id; turns keep-alive 0 (which rumqttd
//!   refuses without a CONNACK) into 600 s, and swaps the client's
//!   credentials for the internal ones;
//! * before all that, limits what one address, one user and one login may
//!   hold ([`super::limits`], docs/security.md): half-open connections per
//!   address, a first-byte deadline, password-check backoff per address,
//!   connections per user;
//! * forwards the connection to rumqttd's internal listener on loopback,
//!   checking each PUBLISH on the way: bigger than `max_payload`, to the
//!   empty topic (MQTT 5 topic aliases: we advertise none) or for more
//!   devices than the user may have closes the connection (MQTT 3.1.1 has
//!   no negative PUBACK; closing is what §3.3.5 allows);
//! * applies the ACL ([`super::acl`]) both ways through an [`acl::Gate`]:
//!   denied PUBLISHes are dropped (or close the connection with
//!   `denied_publish = "disconnect"`), denied SUBSCRIBE filters get SUBACK
//!   0x80 / 0x87, and no PUBLISH reaches a client that may not read its topic.

use super::acl::{self, ClientAcl, Denial, Gate};
use super::auth::{Login, Users};
use super::limits::{DeviceLimit, Limits, Slot};
use super::{Internal, internal_client_id};
use crate::events::{Ended as End, Event};
use crate::metrics::Metrics;
use crate::shutdown;
use crate::wire;
use bytes::BytesMut;
use rumqttd::protocol::{ConnAck, ConnectReturnCode, Packet, Protocol, v4::V4, v5::V5};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout_at};
use tracing::{debug, info, warn};

/// Largest CONNECT we read (will message included): bounds memory per handshake.
pub const MAX_CONNECT: usize = 64 * 1024;
/// Bytes a PUBLISH may carry beyond its payload (topic, packet id, v5 properties).
const PUBLISH_OVERHEAD: usize = 65_535 + 2 + 2 + 4096;
/// A new connection must send its first byte (TLS ClientHello, HTTP
/// upgrade or CONNECT) within this, or `connect_timeout` if shorter: idle
/// sockets must not hold handshake slots for the whole `connect_timeout`.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(2);
/// The internal rumqttd listener must answer a CONNECT within this (its
/// own budget, so a slow password check is never blamed on rumqttd).
const INTERNAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A client asking for keep-alive 0 ("none"; rumqttd refuses it) gets this
/// instead: silent for 1.5 times as long, it is disconnected.
const KEEP_ALIVE_FOR_ZERO: u16 = 600;
/// TCP keep-alive on client sockets: a peer that vanished (power cut, Wi-Fi
/// gone) is found after about 60 s + 4 × 15 s, whatever its MQTT keep-alive.
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
const TCP_KEEPALIVE_PROBES: u32 = 4;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Clone)]
pub enum Kind {
    Tcp,
    Tls(tokio_rustls::TlsAcceptor),
    Ws,
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::Tcp => "tcp",
            Kind::Tls(_) => "tls",
            Kind::Ws => "websocket",
        }
    }
}

pub struct Shared {
    pub users: Arc<Users>,
    /// The ACL in force (a reload swaps it).
    pub acl: Arc<acl::Store>,
    pub internal: Arc<Internal>,
    /// Connected clients (after a successful CONNACK).
    pub connections: Arc<Semaphore>,
    /// Connections still in their handshake (TLS/WS/CONNECT).
    pub handshakes: Arc<Semaphore>,
    pub connect_timeout: Duration,
    pub max_payload: usize,
    pub metrics: Arc<Metrics>,
    /// When a refusal was last logged at info, and how many were not since.
    pub refusal_log: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
    /// PUBLISHes to these topics wait for room in `flow`.
    pub ingest: super::topic::TopicPattern,
    pub flow: Arc<super::Flow>,
    /// False only in a debug build told to (see `raw_client_ids`).
    pub escape_ids: bool,
    /// With `broker.ack = "durable"`: PUBACK/PUBCOMP for readings wait for this.
    pub durable: Option<Arc<super::Durable>>,
    /// Per-address, per-user and per-origin limits ([`super::limits`]).
    pub limits: Arc<Limits>,
    /// `broker.websocket_origins`: empty lets any Origin in.
    pub ws_origins: Arc<[String]>,
    /// MQTT 5 session lifetimes ([`super::session`]).
    pub sessions: Arc<super::session::Sessions>,
}

/// Accept on `listener` until shutdown, then close every connection it made.
pub async fn serve(listener: TcpListener, kind: Kind, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    let mut last_refusal_log: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown::wait(&mut stop) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            r = listener.accept() => match r {
                Ok((sock, peer)) => {
                    // One address gets a share of the half-open slots
                    // (issue 19, H1): past it, its newcomers are closed.
                    let mut quiet = || {
                        let log = last_refusal_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
                        if log {
                            last_refusal_log = Some(std::time::Instant::now());
                        }
                        log
                    };
                    let Some(mine) = shared.limits.handshake(peer.ip()) else {
                        let log = quiet();
                        Event::HandshakesFull { listener: kind.name(), from: Some(peer.ip()), peer, log }.emit(&shared.metrics);
                        continue;
                    };
                    // Past the handshake limit the oldest half-open
                    // connections keep their slots until their timeout;
                    // newcomers are closed at once rather than queued.
                    let Ok(permit) = shared.handshakes.clone().try_acquire_owned() else {
                        let log = quiet();
                        Event::HandshakesFull { listener: kind.name(), from: None, peer, log }.emit(&shared.metrics);
                        continue;
                    };
                    let _ = sock.set_nodelay(true);
                    let keepalive = socket2::TcpKeepalive::new()
                        .with_time(TCP_KEEPALIVE_IDLE)
                        .with_interval(TCP_KEEPALIVE_INTERVAL)
                        .with_retries(TCP_KEEPALIVE_PROBES);
                    let _ = socket2::SockRef::from(&sock).set_tcp_keepalive(&keepalive);
                    conns.spawn(handle(sock, peer, kind.clone(), shared.clone(), (permit, mine)));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!("broker {}: accept failed: {e}", kind.name());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

async fn handle(
    sock: TcpStream,
    peer: SocketAddr,
    kind: Kind,
    shared: Arc<Shared>,
    handshake: (OwnedSemaphorePermit, Slot),
) {
    let deadline = Instant::now() + shared.connect_timeout;
    let name = kind.name();
    let first_byte = Instant::now() + FIRST_BYTE_TIMEOUT.min(shared.connect_timeout);
    match timeout_at(first_byte, sock.peek(&mut [0u8; 1])).await {
        Ok(Ok(0)) => return refused(&shared, name, peer, "closed before its first byte"),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return refused(&shared, name, peer, &e.to_string()),
        Err(_) => return refused(&shared, name, peer, "nothing sent within the first-byte timeout"),
    }
    let mut client: Box<dyn Io> = match kind {
        Kind::Tcp => Box::new(sock),
        Kind::Tls(acceptor) => match timeout_at(deadline, acceptor.accept(sock)).await {
            Ok(Ok(s)) => Box::new(s),
            Ok(Err(e)) => return refused(&shared, name, peer, &format!("TLS handshake failed: {e}")),
            Err(_) => return refused(&shared, name, peer, "TLS handshake timed out"),
        },
        Kind::Ws => match timeout_at(
            deadline,
            async_tungstenite::tokio::accept_hdr_async_with_config(
                sock,
                WsMqtt { origins: shared.ws_origins.clone() },
                Some(ws_config(shared.max_payload)),
            ),
        )
        .await
        {
            Ok(Ok(ws)) => Box::new(ws_stream_tungstenite::WsStream::new(ws)),
            Ok(Err(e)) => return refused(&shared, name, peer, &format!("WebSocket handshake failed: {e}")),
            Err(_) => return refused(&shared, name, peer, "WebSocket handshake timed out"),
        },
    };
    let mut buf = BytesMut::with_capacity(256);
    let raw = match timeout_at(deadline, read_packet(&mut client, &mut buf, MAX_CONNECT)).await {
        Ok(Ok(Some(p))) => p,
        Ok(Ok(None)) => return refused(&shared, name, peer, "closed before CONNECT"),
        Ok(Err(e)) => return refused(&shared, name, peer, &e),
        Err(_) => return refused(&shared, name, peer, "no CONNECT within connect_timeout"),
    };
    let level = match protocol_level(&raw) {
        Ok(l) => l,
        Err(e) => return refused(&shared, name, peer, &e),
    };
    let v5 = level == 5;
    if level != 4 && level != 5 {
        let _ = write_connack(&mut client, false, ConnectReturnCode::RefusedProtocolVersion).await;
        return refused(&shared, name, peer, &format!("MQTT protocol level {level} (3.1.1 and 5 are supported)"));
    }
    let mut raw = raw;
    let parsed = if v5 { V5.read_mut(&mut raw, MAX_CONNECT) } else { V4.read_mut(&mut raw, MAX_CONNECT) };
    let Ok(Packet::Connect(mut connect, props, will, will_props, login)) = parsed else {
        return refused(&shared, name, peer, "malformed CONNECT");
    };
    let creds = login.as_ref().map(|l| (l.username.as_str(), l.password.as_str()));
    let user_name = creds.map(|c| c.0.to_string());
    // An address that keeps failing waits, unchecked (issue 19, H2).
    if let Some(left) = shared.limits.backoff(peer.ip()) {
        let code = if v5 { ConnectReturnCode::ConnectionRateExceeded } else { ConnectReturnCode::ServiceUnavailable };
        let _ = write_connack(&mut client, v5, code).await;
        return refused(&shared, name, peer, &format!("failed logins from this address: backing off {left:.0?}"));
    }
    // The check must end within connect_timeout; the queue is bounded.
    let outcome = timeout_at(deadline, shared.users.login(creds)).await.unwrap_or(Login::Busy);
    if outcome == Login::BadCredentials {
        shared.limits.login_failed(peer.ip());
    }
    let user = match outcome {
        Login::Ok { user, .. } => user,
        Login::Busy => {
            Metrics::inc(&shared.metrics.broker_login_busy);
            let code = if v5 { ConnectReturnCode::ServerBusy } else { ConnectReturnCode::ServiceUnavailable };
            let _ = write_connack(&mut client, v5, code).await;
            return refused(&shared, name, peer, "password checks busy (more waiting than can finish in time)");
        }
        Login::BadCredentials => {
            let _ = write_connack(&mut client, v5, ConnectReturnCode::BadUserNamePassword).await;
            return refused(
                &shared,
                name,
                peer,
                &format!("bad username or password (user {:?})", user_name.unwrap_or_default()),
            );
        }
        Login::NotAuthorized => {
            let _ = write_connack(&mut client, v5, ConnectReturnCode::NotAuthorized).await;
            return refused(&shared, name, peer, "no username and allow_anonymous = false");
        }
    };
    // rumqttd publishes the will itself: it must obey the publish ACL now.
    let mut client_acl = ClientAcl::new(shared.acl.clone(), user.clone(), connect.client_id.clone());
    if let Some(w) = &will {
        let topic = String::from_utf8_lossy(&w.topic).into_owned();
        if !client_acl.may_publish(&topic) {
            shared.metrics.acl_denied(user.as_deref().unwrap_or(""), "publish");
            let _ = write_connack(&mut client, v5, ConnectReturnCode::NotAuthorized).await;
            return refused(&shared, name, peer, &format!("the ACL denies publishing the will to {topic:?}"));
        }
    }
    let max_packet = props.as_ref().and_then(|p| p.max_packet_size);
    let receive_max = props.as_ref().and_then(|p| p.receive_maximum);
    let Ok(slot) = shared.connections.clone().try_acquire_owned() else {
        let code = if v5 { ConnectReturnCode::ServerBusy } else { ConnectReturnCode::ServiceUnavailable };
        let _ = write_connack(&mut client, v5, code).await;
        return refused(&shared, name, peer, "max_connections reached");
    };
    let origin = user_name.clone().unwrap_or_default();
    let Some(user_slot) = shared.limits.connection(&origin) else {
        let code = if v5 { ConnectReturnCode::QuotaExceeded } else { ConnectReturnCode::ServiceUnavailable };
        let _ = write_connack(&mut client, v5, code).await;
        return refused(&shared, name, peer, &format!("max_connections_per_user reached (user {origin:?})"));
    };
    drop(handshake);

    // The CONNECT rumqttd will see.
    let client_id = connect.client_id.clone();
    if shared.escape_ids {
        connect.client_id = internal_client_id(user_name.as_deref(), &connect.client_id);
    }
    if connect.keep_alive == 0 {
        connect.keep_alive = KEEP_ALIVE_FOR_ZERO;
    }
    // MQTT 5 session lifetimes are the door's ([`super::session`]).
    let mut expiry = props.as_ref().and_then(|p| p.session_expiry_interval).unwrap_or(0);
    let claim = if v5 && !connect.client_id.is_empty() {
        match shared.sessions.claim(&connect.client_id, connect.clean_session, expiry, &shared.internal).await {
            Ok(c) => {
                connect.clean_session = !super::session::keeps(connect.clean_session, expiry);
                Some(c)
            }
            Err(e) => {
                shared.internal.failed();
                let _ = write_connack(&mut client, v5, ConnectReturnCode::ServerUnavailable).await;
                return refused(&shared, name, peer, &format!("internal broker: emptying the session: {e}"));
            }
        }
    } else {
        // No id: rumqttd assigns one, which no later connection can resume.
        connect.clean_session |= v5;
        None
    };
    let internal_login = Some(shared.internal.login());
    let mut out = BytesMut::new();
    let packet = Packet::Connect(connect, props, will, will_props, internal_login);
    // Every client reaches rumqttd as MQTT 5 ([`super::v3`]).
    if V5.write(packet, &mut out).is_err() {
        return refused(&shared, name, peer, "CONNECT could not be re-encoded");
    }
    let addr = shared.internal.addr(true);
    let connected = timeout_at(Instant::now() + INTERNAL_CONNECT_TIMEOUT, async {
        let mut up = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let _ = up.set_nodelay(true);
        up.write_all(&out).await.map_err(|e| e.to_string())?;
        // rumqttd's CONNACK, forwarded as is: the client's session starts here.
        let mut ack = BytesMut::with_capacity(64);
        match read_packet(&mut up, &mut ack, MAX_CONNECT).await? {
            Some(p) if p.first().is_some_and(|b| b >> 4 == 2) => Ok((up, p, ack)),
            Some(_) => Err("expected CONNACK".to_string()),
            None => Err("closed before CONNACK".to_string()),
        }
    })
    .await;
    let (mut up, connack, rest) = match connected {
        Ok(Ok(x)) => {
            shared.internal.healthy();
            x
        }
        Ok(Err(e)) => {
            shared.internal.failed();
            let code = if v5 { ConnectReturnCode::ServerUnavailable } else { ConnectReturnCode::ServiceUnavailable };
            let _ = write_connack(&mut client, v5, code).await;
            return refused(&shared, name, peer, &format!("internal broker: {e}"));
        }
        Err(_) => {
            shared.internal.failed();
            let code = if v5 { ConnectReturnCode::ServerUnavailable } else { ConnectReturnCode::ServiceUnavailable };
            let _ = write_connack(&mut client, v5, code).await;
            return refused(&shared, name, peer, "internal broker did not answer CONNECT");
        }
    };
    // MQTT 5: rumqttd advertises topic aliases, which would let PUBLISHes
    // through with an empty topic; we advertise none (issue 19, M2b).
    let connack = match v5 {
        true => without_topic_aliases(connack),
        false => match super::v3::down(&connack, 2) {
            Some(c) => BytesMut::from(&c[..]),
            None => return refused(&shared, name, peer, "internal broker: unreadable CONNACK"),
        },
    };
    if client.write_all(&connack).await.is_err() {
        return;
    }
    let accepted = connack.len() >= 4 && connack[3] == 0;
    // The id's set-up is done: a wipe of an older session may run now.
    let mut claim = claim;
    if let Some(c) = claim.as_mut() {
        c.set_up();
    }
    let end_session = |claim: Option<super::session::Claim>, expiry: u32| {
        if let Some(c) = claim {
            shared.sessions.ended(c, expiry, shared.internal.clone());
        }
    };
    if !accepted {
        end_session(claim, expiry);
        debug!("broker {name}: {peer} client {client_id:?} refused by the broker (code {:?})", connack.get(3));
        return;
    }
    Metrics::inc(&shared.metrics.broker_connections);
    debug!("broker {name}: {peer} connected as {client_id:?}");
    if client_acl.dangerous() {
        warn!(
            "broker {name}: {client_id:?} ({peer}): '+' or '#' in its user name or client id, which an ACL rule substitutes; it may neither publish nor subscribe"
        );
    }
    let who = Who { listener: name, peer, client_id: client_id.clone(), user: user.unwrap_or_default() };
    let mut gate = Gate::new(client_acl, v5);
    gate.max_packet = max_packet;
    gate.receive_max = receive_max;
    let gate = std::sync::Mutex::new(gate);
    // The client's DISCONNECT starts its session's expiry at once: it may
    // reconnect before this relay has noticed the end.
    let on_disconnect = |e: Option<u32>| {
        if let Some(c) = &claim {
            shared.sessions.ending(c, e.unwrap_or(expiry));
        }
    };
    let max = shared.max_payload + PUBLISH_OVERHEAD;
    let why = relay(&mut client, &mut up, (buf, rest), &gate, &who, &shared, v5, max, &on_disconnect).await;
    if let Some(e) = gate.lock().unwrap_or_else(|e| e.into_inner()).disconnect_expiry {
        expiry = e;
    }
    end_session(claim, expiry);
    Metrics::sub(&shared.metrics.broker_connections, 1);
    Event::LanClientEnded { listener: name, client_id: &client_id, peer, user: &who.user, why: &why }
        .emit(&shared.metrics);
    drop((slot, user_slot));
}

/// Count a refused connection; log it at debug, and at info at most once a
/// second (an attack must not flood the journal).
fn refused(shared: &Shared, listener: &str, peer: SocketAddr, why: &str) {
    Metrics::inc(&shared.metrics.broker_refused);
    debug!("broker {listener}: refused {peer}: {why}");
    let mut log = shared.refusal_log.lock().unwrap_or_else(|e| e.into_inner());
    if log.0.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
        log.1 += 1;
        return;
    }
    let more = std::mem::take(&mut log.1);
    log.0 = Some(std::time::Instant::now());
    let more = if more > 0 { format!(" ({more} more refused since the last report)") } else { String::new() };
    info!("broker {listener}: refused {peer}: {why}{more}");
}

async fn write_connack(client: &mut Box<dyn Io>, v5: bool, code: ConnectReturnCode) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(8);
    let packet = Packet::ConnAck(ConnAck { session_present: false, code }, None);
    let _ = if v5 { V5.write(packet, &mut out) } else { V4.write(packet, &mut out) };
    client.write_all(&out).await?;
    client.flush().await?;
    // Let the client read it before the close (a reset could discard it).
    let _ = client.shutdown().await;
    Ok(())
}

/// Who is on a relayed connection, for the log and the per-user metrics.
struct Who {
    listener: &'static str,
    peer: SocketAddr,
    client_id: String,
    /// The login's user name; empty for anonymous clients.
    user: String,
}

/// ACL refusals are logged once per client and reason every this often,
/// with the count of those not logged in between.
const DENIAL_LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
struct DenialLog {
    /// (last logged, not logged since), for publishes and for subscribes.
    publish: (Option<std::time::Instant>, u64),
    subscribe: (Option<std::time::Instant>, u64),
}

impl DenialLog {
    fn denied(&mut self, d: &Denial, who: &Who, shared: &Shared) {
        let (slot, action, what) = match d {
            Denial::Publish(t) => (&mut self.publish, "publish", format!("may not publish to {t:?}; dropped")),
            Denial::Subscribe(f) => (&mut self.subscribe, "subscribe", format!("may not subscribe to {f:?}; refused")),
        };
        shared.metrics.acl_denied(&who.user, action);
        if action == "publish" {
            Metrics::inc(&shared.metrics.broker_denied_publishes);
        }
        if slot.0.is_some_and(|t| t.elapsed() < DENIAL_LOG_EVERY) {
            slot.1 += 1;
            return;
        }
        let more = std::mem::take(&mut slot.1);
        slot.0 = Some(std::time::Instant::now());
        let more =
            if more > 0 { format!(" ({more} more {action} denials since the last report)") } else { String::new() };
        warn!("broker {}: {:?} ({}, user {:?}) {what}{more}", who.listener, who.client_id, who.peer, who.user);
    }
}

/// Copy both ways until either side closes, packet by packet, through the
/// ACL [`Gate`]; broker → client acks wait for durability when configured.
#[allow(clippy::too_many_arguments)]
async fn relay(
    client: &mut Box<dyn Io>,
    up: &mut TcpStream,
    // What the client and rumqttd sent past their CONNECT and CONNACK.
    (mut buf, from_up): (BytesMut, BytesMut),
    gate: &std::sync::Mutex<Gate>,
    who: &Who,
    shared: &Shared,
    v5: bool,
    max_packet: usize,
    on_disconnect: &(dyn Fn(Option<u32>) + Sync),
) -> End {
    let (mut up_r, up_w) = up.split();
    let (mut cl_r, cl_w) = tokio::io::split(client);
    // Both directions write to both sides (acks the gate answers itself):
    // whole packets under a lock.
    let (up_w, cl_w) = (tokio::sync::Mutex::new(up_w), tokio::sync::Mutex::new(cl_w));
    let gate = || gate.lock().unwrap_or_else(|e| e.into_inner());
    let denials = std::sync::Mutex::new(DenialLog::default());
    // Packet ids of readings whose final ack must wait: id → (ack packet type, device, seq, generation).
    // QoS 1: the PUBACK (4). QoS 2: the PUBCOMP (7), because rumqttd hands a
    // QoS 2 message on only at PUBREL, which the client sends after PUBREC:
    // holding the PUBREC would wait for ever.
    let held: std::sync::Mutex<std::collections::HashMap<u16, (u8, String, u64, u64)>> = Default::default();
    // rumqttd speaks MQTT 5 to every client; a 3.1.1 one needs translating.
    fn up_bytes(v5: bool, bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
        if v5 { bytes.into() } else { super::v3::up_all(bytes) }
    }
    let down = async {
        let mut b = from_up;
        loop {
            while let Frame::Len { total, mut header } = frame_len(&b) {
                if b.len() < total {
                    break;
                }
                let mut p = b.split_to(total);
                if !v5 {
                    match super::v3::down(&p, header) {
                        Some(std::borrow::Cow::Borrowed(_)) => {}
                        Some(std::borrow::Cow::Owned(t)) => {
                            p = BytesMut::from(&t[..]);
                            header = match frame_len(&p) {
                                Frame::Len { header, .. } => header,
                                _ => return End::Malformed,
                            };
                        }
                        None => continue,
                    }
                }
                let total = p.len();
                let kind = p[0] >> 4;
                // Acks to rumqttd must leave in the order the gate queued them:
                // hold the writer while asking it (PUBLISH and PUBREL may produce one).
                let mut w = if kind == 3 || kind == 6 { Some(up_w.lock().await) } else { None };
                let v = gate().from_broker(&p, header);
                if v.filtered {
                    Metrics::inc(&shared.metrics.broker_acl_filtered);
                }
                if let (Some(reply), Some(w)) = (v.reply, w.as_mut())
                    && w.write_all(&up_bytes(v5, &reply)).await.is_err()
                {
                    return End::Closed;
                }
                drop(w);
                if let Some(r) = v.rewritten {
                    p = BytesMut::from(&r[..]);
                } else if !v.forward {
                    continue;
                }
                // PUBACK (4) or PUBCOMP (7): wait until the reading is on disk.
                if let Some(durable) = &shared.durable
                    && (kind == 4 || kind == 7)
                    && total >= header + 2
                {
                    let id = u16::from_be_bytes([p[header], p[header + 1]]);
                    let waiting = {
                        let mut h = held.lock().unwrap_or_else(|e| e.into_inner());
                        match h.get(&id) {
                            Some((k, ..)) if *k == kind => h.remove(&id),
                            _ => None,
                        }
                    };
                    if let Some((_, device, seq, generation)) = waiting {
                        durable.wait(&device, seq, generation).await;
                    }
                }
                if cl_w.lock().await.write_all(&p).await.is_err() {
                    return End::Closed;
                }
            }
            if b.capacity() - b.len() < 4096 {
                b.reserve(4096);
            }
            match up_r.read_buf(&mut b).await {
                Ok(0) | Err(_) => return End::Closed,
                Ok(_) => {}
            }
        }
    };
    let upward = async {
        loop {
            // Forward every complete packet in the buffer, checking PUBLISHes.
            loop {
                match frame_len(&buf) {
                    Frame::Need => break,
                    Frame::Bad => return End::Malformed,
                    Frame::Len { total, .. } if total > max_packet => return End::TooBig(total),
                    Frame::Len { total, header } => {
                        if buf.len() < total {
                            buf.reserve(total - buf.len());
                            break;
                        }
                        let mut packet = buf.split_to(total);
                        // Invalid in MQTT 3.1.1, a topic alias in 5 (none advertised).
                        if packet[0] >> 4 == 3 && publish_topic(&packet[header..]).is_some_and(str::is_empty) {
                            return End::EmptyTopic;
                        }
                        // Client acks go to rumqttd in the gate's order: hold the writer.
                        let mut w = if matches!(packet[0] >> 4, 4 | 5 | 7) { Some(up_w.lock().await) } else { None };
                        let (v, resolved) = gate().from_client(&packet, header);
                        if packet[0] >> 4 == 14 {
                            on_disconnect(gate().disconnect_expiry);
                        }
                        for d in &v.denied {
                            if let Denial::Publish(topic) = d
                                && gate().acl.current().disconnect_denied()
                            {
                                return End::Denied(topic.clone());
                            }
                            denials.lock().unwrap_or_else(|e| e.into_inner()).denied(d, who, shared);
                        }
                        if let Some(reply) = v.reply
                            && cl_w.lock().await.write_all(&reply).await.is_err()
                        {
                            return End::Closed;
                        }
                        if let Some(r) = v.rewritten {
                            packet = BytesMut::from(&r[..]);
                        } else if !v.forward {
                            continue;
                        }
                        if let Some(w) = w.as_mut() {
                            if w.write_all(&up_bytes(v5, &packet)).await.is_err() {
                                return End::Closed;
                            }
                            continue;
                        }
                        let parts = if packet[0] >> 4 == 3 {
                            match publish_parts(&packet, header, v5) {
                                Ok(p) => p,
                                Err(_) => return End::Malformed,
                            }
                        } else {
                            None
                        };
                        if let Some(p) = parts
                            && let Some(topic) = resolved.as_deref()
                            && let Some((device, sensor)) = shared.ingest.matches(topic)
                        {
                            if !gate().acl.current().may_speak_for(device) {
                                return End::NotItsDevice(device.to_string());
                            }
                            if let Err(limit) = shared.limits.admit_reading(&who.user, device, sensor) {
                                return End::TooManyDevices(match limit {
                                    DeviceLimit::Devices(n) => format!("{n} devices (max_devices_per_user)"),
                                    DeviceLimit::Sensors(n) => format!("{n} sensors on one device"),
                                });
                            }
                            shared.flow.admit((topic.len() + p.payload.len()) as u64).await;
                            if let Some(durable) = &shared.durable
                                && let Some(id) = p.id
                            {
                                // Only what the ingest will accept with a seq gets an ack from the pipeline.
                                if let Ok((r, _)) = wire::parse_mqtt_payload(p.payload, device, sensor, 0)
                                    && let Some(seq) = r.seq
                                {
                                    let ack = if p.qos == 1 { 4 } else { 7 };
                                    let key = super::Durable::key(&r.device, r.boot);
                                    let g = durable.generation(&key);
                                    held.lock().unwrap_or_else(|e| e.into_inner()).insert(id, (ack, key, seq, g));
                                }
                            }
                        }
                        if up_w.lock().await.write_all(&up_bytes(v5, &packet)).await.is_err() {
                            return End::Closed;
                        }
                    }
                }
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(4096);
            }
            match cl_r.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return End::Closed,
                Ok(_) => {}
            }
        }
    };
    tokio::select! {
        e = down => e,
        e = upward => e,
    }
}

/// What [`frame_len`] found at the start of a buffer.
pub enum Frame {
    Need,
    Bad,
    Len { total: usize, header: usize },
}

/// Length of the MQTT packet at the start of `b` (fixed header included).
/// This and the other parsing functions below are `pub` for the fuzz
/// targets (fuzz/), which feed them what a LAN client could send.
pub fn frame_len(b: &[u8]) -> Frame {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&byte) = b.get(1 + i) else { return Frame::Need };
        len |= ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return Frame::Len { total: 2 + i + len, header: 2 + i };
        }
    }
    Frame::Bad
}

/// What the front door reads of a client's PUBLISH.
pub struct PublishParts<'a> {
    pub topic: &'a str,
    pub qos: u8,
    /// The packet id (QoS 1 and 2).
    pub id: Option<u16>,
    pub payload: &'a [u8],
}

/// Take a whole packet (fixed header of `header` bytes) apart if it is a
/// PUBLISH with a UTF-8 topic (`Ok(None)` for anything else). A QoS 1 or 2
/// PUBLISH that ends before its packet id is malformed (`Err`).
pub fn publish_parts(packet: &[u8], header: usize, v5: bool) -> Result<Option<PublishParts<'_>>, Malformed> {
    if packet[0] >> 4 != 3 {
        return Ok(None);
    }
    let Some(topic) = publish_topic(&packet[header..]) else { return Ok(None) };
    let qos = (packet[0] >> 1) & 3;
    let payload_len = publish_payload_len(packet, header, v5);
    let id = if qos > 0 {
        let at = header + 2 + topic.len();
        let id = packet.get(at..at + 2).ok_or(Malformed)?;
        Some(u16::from_be_bytes([id[0], id[1]]))
    } else {
        None
    };
    let payload = &packet[packet.len() - payload_len..];
    Ok(Some(PublishParts { topic, qos, id, payload }))
}

/// A packet the front door closes the connection for.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

/// The topic of a PUBLISH (variable header first), if it is UTF-8.
fn publish_topic(body: &[u8]) -> Option<&str> {
    let n = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    std::str::from_utf8(body.get(2..2 + n)?).ok()
}

/// Payload length of a whole PUBLISH packet whose fixed header is `header` bytes.
fn publish_payload_len(packet: &[u8], header: usize, v5: bool) -> usize {
    let qos = (packet[0] >> 1) & 3;
    let topic = u16::from_be_bytes([packet[header], packet[header + 1]]) as usize;
    let mut at = header + 2 + topic + if qos > 0 { 2 } else { 0 };
    if v5 {
        // Properties: a variable byte integer length, then that many bytes.
        let mut len = 0usize;
        for i in 0..4 {
            let Some(&b) = packet.get(at) else { return 0 };
            at += 1;
            len |= ((b & 0x7f) as usize) << (7 * i);
            if b & 0x80 == 0 {
                break;
            }
        }
        at += len;
    }
    packet.len().saturating_sub(at)
}

/// Read one whole packet into a fresh buffer (extra bytes stay in `buf`).
async fn read_packet<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<BytesMut>, String> {
    loop {
        match frame_len(buf) {
            Frame::Bad => return Err("malformed packet length".into()),
            Frame::Len { total, .. } if total > max => return Err(format!("first packet of {total} bytes is too big")),
            Frame::Len { total, .. } if buf.len() >= total => return Ok(Some(buf.split_to(total))),
            _ => {}
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(1024);
        }
        match r.read_buf(buf).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The protocol level byte of a CONNECT, after checking it is one.
pub fn protocol_level(p: &[u8]) -> Result<u8, String> {
    if p[0] != 0x10 {
        return Err(format!("first packet is not CONNECT (type {})", p[0] >> 4));
    }
    let Frame::Len { header, .. } = frame_len(p) else { return Err("malformed CONNECT".into()) };
    let body = &p[header..];
    let n = u16::from_be_bytes([*body.first().ok_or("short CONNECT")?, *body.get(1).ok_or("short CONNECT")?]) as usize;
    let name = body.get(2..2 + n).ok_or("short CONNECT")?;
    let level = *body.get(2 + n).ok_or("short CONNECT")?;
    match name {
        b"MQTT" => Ok(level),
        b"MQIsdp" => Ok(3),
        _ => Err("not an MQTT CONNECT".into()),
    }
}

/// WebSocket limits near `max_payload`: tungstenite's defaults (64 MiB
/// messages, 16 MiB frames) let an unauthenticated client make us buffer
/// that much before any check (issue 19, M1). One MQTT packet may span
/// messages, so this bounds memory, not packets.
fn ws_config(max_payload: usize) -> async_tungstenite::tungstenite::protocol::WebSocketConfig {
    let max = max_payload + PUBLISH_OVERHEAD;
    async_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// A v5 CONNACK with its Topic Alias Maximum property (0x22) removed
/// (absent means 0). rumqttd cannot parse a CONNACK (its server-side
/// reader panics on one), so the properties are walked here. Anything we
/// cannot walk is passed on unchanged.
fn without_topic_aliases(connack: BytesMut) -> BytesMut {
    fn varint(b: &[u8]) -> Option<(usize, usize)> {
        let mut n = 0usize;
        for (i, &x) in b.iter().take(4).enumerate() {
            n |= ((x & 0x7f) as usize) << (7 * i);
            if x & 0x80 == 0 {
                return Some((n, i + 1));
            }
        }
        None
    }
    fn encode(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let b = (n % 128) as u8;
            n /= 128;
            out.push(if n > 0 { b | 0x80 } else { b });
            if n == 0 {
                return;
            }
        }
    }
    let rebuilt = (|| {
        let (_, fixed) = varint(connack.get(1..)?)?;
        let body = connack.get(1 + fixed..)?;
        let (props_len, n) = varint(body.get(2..)?)?;
        let props = body.get(2 + n..2 + n + props_len)?;
        let mut kept = Vec::with_capacity(props.len());
        let mut i = 0;
        while i < props.len() {
            let str_len = |at: usize| Some(u16::from_be_bytes([*props.get(at)?, *props.get(at + 1)?]) as usize);
            let len = match props[i] {
                0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
                0x21 | 0x22 | 0x13 => 2,
                0x11 | 0x27 => 4,
                0x12 | 0x1A | 0x1C | 0x1F | 0x15 | 0x16 => 2 + str_len(i + 1)?,
                0x26 => {
                    let k = str_len(i + 1)?;
                    2 + k + 2 + str_len(i + 3 + k)?
                }
                _ => return None,
            };
            let prop = props.get(i..i + 1 + len)?;
            if prop[0] != 0x22 {
                kept.extend_from_slice(prop);
            }
            i += 1 + len;
        }
        let mut rest = body[..2].to_vec();
        encode(kept.len(), &mut rest);
        rest.extend_from_slice(&kept);
        rest.extend_from_slice(body.get(2 + n + props_len..)?);
        let mut out = vec![connack[0]];
        encode(rest.len(), &mut out);
        out.extend_from_slice(&rest);
        Some(BytesMut::from(&out[..]))
    })();
    rebuilt.unwrap_or(connack)
}

/// Answers the WebSocket upgrade with the `mqtt` subprotocol clients ask
/// for; refuses (403) an `Origin` not in `broker.websocket_origins` when
/// that list is set. Requests without `Origin` come from no browser.
struct WsMqtt {
    origins: Arc<[String]>,
}

impl async_tungstenite::tungstenite::handshake::server::Callback for WsMqtt {
    fn on_request(
        self,
        request: &async_tungstenite::tungstenite::handshake::server::Request,
        mut response: async_tungstenite::tungstenite::handshake::server::Response,
    ) -> Result<
        async_tungstenite::tungstenite::handshake::server::Response,
        async_tungstenite::tungstenite::handshake::server::ErrorResponse,
    > {
        if !self.origins.is_empty()
            && let Some(origin) = request.headers().get("origin")
            && !self.origins.iter().any(|o| o.as_bytes().eq_ignore_ascii_case(origin.as_bytes()))
        {
            let mut refusal = async_tungstenite::tungstenite::handshake::server::ErrorResponse::new(Some(
                "Origin not allowed (broker.websocket_origins)\n".into(),
            ));
            *refusal.status_mut() = async_tungstenite::tungstenite::http::StatusCode::FORBIDDEN;
            return Err(refusal);
        }
        response.headers_mut().insert("sec-websocket-protocol", "mqtt".parse().expect("static header value"));
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_topics() {
        assert!(matches!(frame_len(&[0x30]), Frame::Need));
        assert!(matches!(frame_len(&[0x30, 0x05]), Frame::Len { total: 7, header: 2 }));
        assert!(matches!(frame_len(&[0x30, 0x80, 0x01]), Frame::Len { total: 131, header: 3 }));
        assert!(matches!(frame_len(&[0x30, 0xff, 0xff, 0xff, 0xff]), Frame::Bad));
        assert_eq!(publish_topic(&[0, 3, b'a', b'/', b'b', 1, 2]), Some("a/b"));
        assert_eq!(publish_topic(&[0, 9, b'a']), None);
        // QoS 1 PUBLISH "a/b", id 7, payload "xyz"; then the same in MQTT 5 with 2 property bytes.
        let v4 = [0x32, 10, 0, 3, b'a', b'/', b'b', 0, 7, b'x', b'y', b'z'];
        assert_eq!(publish_payload_len(&v4, 2, false), 3);
        let v5 = [0x32, 13, 0, 3, b'a', b'/', b'b', 0, 7, 2, 0x23, 1, b'x', b'y', b'z'];
        assert_eq!(publish_payload_len(&v5, 2, true), 3);
        let p = publish_parts(&v4, 2, false).unwrap().unwrap();
        assert_eq!((p.topic, p.qos, p.id, p.payload), ("a/b", 1, Some(7), &b"xyz"[..]));
        assert!(publish_parts(&[0x40, 2, 0, 7], 2, false).unwrap().is_none(), "a PUBACK");
    }

    /// Found by fuzzing (fuzz/regressions/front_door/): a QoS 1 or 2 PUBLISH
    /// that ends right after its topic, or one byte into its packet id, read
    /// past the packet (a panic in the connection's task) with
    /// `broker.ack = "durable"`. It is malformed: the connection is closed.
    #[test]
    fn a_qos_publish_without_its_packet_id_is_malformed() {
        for packet in [
            &[0x32, 13, 0, 11, b's', b'e', b'n', b's', b'o', b'r', b's', b'/', b'a', b'/', b'b'][..],
            &[0x34, 14, 0, 11, b's', b'e', b'n', b's', b'o', b'r', b's', b'/', b'a', b'/', b'b', 0],
            &[0x34, 3, 0, 0, 0],
        ] {
            for v5 in [false, true] {
                assert_eq!(publish_parts(packet, 2, v5).err(), Some(Malformed), "{packet:?}");
            }
        }
        // QoS 0 has no packet id: the same bytes are a PUBLISH with an empty payload.
        let p = publish_parts(
            &[0x30, 13, 0, 11, b's', b'e', b'n', b's', b'o', b'r', b's', b'/', b'a', b'/', b'b'],
            2,
            false,
        );
        assert_eq!(p.unwrap().unwrap().payload, b"");
    }

    #[test]
    fn connack_loses_its_topic_alias_maximum_only() {
        // Session present 0, success; properties: receive max 100, topic alias max 4096, max QoS 1.
        let ack = [0x20, 11, 0, 0, 8, 0x21, 0, 100, 0x22, 0x10, 0, 0x24, 1];
        let out = without_topic_aliases(BytesMut::from(&ack[..]));
        assert_eq!(&out[..], &[0x20, 8, 0, 0, 5, 0x21, 0, 100, 0x24, 1]);
        // Nothing to remove, or an unknown property: unchanged.
        for same in [&[0x20, 3, 0, 0, 0][..], &[0x20, 5, 0, 0, 2, 0x7f, 1][..]] {
            assert_eq!(&without_topic_aliases(BytesMut::from(same))[..], same);
        }
    }
}
