//! The demo's "cloud": a small MQTT 3.1.1 receiver on loopback that plays
//! the broker's side of QoS 2 (PUBREC, deliver at PUBREL, PUBCOMP), keeps
//! sessions across reconnects like a real broker, and counts what it
//! delivered, including any batch delivered twice (there should be none).
//! `set_down(true)` is the simulated outage: connections are cut and new
//! ones refused until it is lifted. It answers the gateway's SUBSCRIBE, and
//! [`DemoUpstream::send_command`] publishes a command (QoS 2) to it; the
//! replies it receives are kept ([`DemoUpstream::replies`]).

use crate::reading::Batch;
use crate::uplink::codec::{self, Packet, Protocol};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Default)]
pub struct Counts {
    pub batches: AtomicU64,
    pub readings: AtomicU64,
    /// Batches delivered a second time (the gateway's promise says 0).
    pub duplicate_batches: AtomicU64,
    pub connections: AtomicU64,
}

/// A reading by what names it: (device, sensor, seq).
pub type Key = (String, String, u64);

struct State {
    counts: Counts,
    /// How often each reading (with a seq) was delivered, whatever batch
    /// carried it: a reading in two batches is doubled too.
    readings: Mutex<HashMap<Key, u32>>,
    /// (gateway, batch) of every delivered batch.
    seen: Mutex<HashSet<(String, u64)>>,
    /// Per client id: packet ids received (PUBREC sent) and not yet released.
    sessions: Mutex<HashMap<String, HashMap<u16, Vec<u8>>>>,
    down: watch::Sender<bool>,
    is_down: AtomicBool,
    /// Commands to publish to the subscribed gateway; the number bumps when one is added.
    outbox: Mutex<Vec<Vec<u8>>>,
    outbox_added: watch::Sender<u64>,
    /// Replies to commands (JSON), in arrival order.
    replies: Mutex<Vec<serde_json::Value>>,
}

pub struct DemoUpstream {
    pub port: u16,
    state: Arc<State>,
}

impl DemoUpstream {
    /// Listen on a free loopback port and serve on the current runtime.
    pub async fn start() -> std::io::Result<DemoUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(State {
            counts: Counts::default(),
            seen: Mutex::default(),
            readings: Mutex::default(),
            sessions: Mutex::default(),
            down: watch::channel(false).0,
            is_down: AtomicBool::new(false),
            outbox: Mutex::default(),
            outbox_added: watch::channel(0).0,
            replies: Mutex::default(),
        });
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if st.is_down.load(Ordering::Relaxed) {
                    drop(stream); // the outage: hang up at once
                    continue;
                }
                st.counts.connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(stream, st.clone()));
            }
        });
        Ok(DemoUpstream { port, state })
    }

    pub fn counts(&self) -> &Counts {
        &self.state.counts
    }

    /// Every reading delivered, with how often.
    pub fn delivered(&self) -> HashMap<Key, u32> {
        self.state.readings.lock().unwrap().clone()
    }

    pub fn is_down(&self) -> bool {
        self.state.is_down.load(Ordering::Relaxed)
    }

    /// Publish `json` on `topic` (QoS 2) to the gateway once it has
    /// subscribed (kept until then, as a broker keeps it in the session).
    pub fn send_command(&self, topic: &str, json: &str) {
        let mut out = Vec::new();
        let pid = 1 + self.state.outbox.lock().unwrap().len() as u16;
        codec::encode_publish(Protocol::V311, topic, json.as_bytes(), 2, false, false, pid, &mut out);
        self.state.outbox.lock().unwrap().push(out);
        self.state.outbox_added.send_modify(|n| *n += 1);
    }

    /// Replies to commands received so far.
    pub fn replies(&self) -> Vec<serde_json::Value> {
        self.state.replies.lock().unwrap().clone()
    }

    pub fn set_down(&self, down: bool) {
        self.state.is_down.store(down, Ordering::Relaxed);
        self.state.down.send_replace(down);
    }
}

async fn serve(mut s: TcpStream, st: Arc<State>) {
    let mut down = st.down.subscribe();
    let mut added = st.outbox_added.subscribe();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut client: Option<String> = None;
    let mut subscribed = false;
    loop {
        let n = tokio::select! {
            _ = down.wait_for(|d| *d) => return,
            _ = added.changed(), if subscribed => None,
            r = s.read(&mut chunk) => match r { Ok(0) | Err(_) => return, Ok(n) => Some(n) },
        };
        let Some(n) = n else {
            // New commands: to the gateway (each goes once; QoS 2 from here).
            let cmds: Vec<Vec<u8>> = std::mem::take(&mut *st.outbox.lock().unwrap());
            for c in cmds {
                if s.write_all(&c).await.is_err() {
                    return;
                }
            }
            continue;
        };
        buf.extend_from_slice(&chunk[..n]);
        loop {
            let mut out = Vec::new();
            let used = if client.is_none() {
                // The first packet must be CONNECT; parsed here because the
                // uplink's codec only reads what a broker sends.
                match parse_connect(&buf) {
                    Some(Ok((id, used))) => {
                        let present = st.sessions.lock().unwrap().contains_key(&id);
                        st.sessions.lock().unwrap().entry(id.clone()).or_default();
                        out.extend_from_slice(&[0x20, 2, u8::from(present), 0]);
                        client = Some(id);
                        used
                    }
                    Some(Err(())) => return,
                    None => break,
                }
            } else if buf.first().is_some_and(|b| *b == 0x82) {
                // SUBSCRIBE (a client's packet, not in the uplink's codec):
                // grant QoS 2 to its one filter, then send what is waiting.
                match subscribe_pid(&buf) {
                    Some((pid, used)) => {
                        out.extend_from_slice(&[0x90, 3]);
                        out.extend_from_slice(&pid.to_be_bytes());
                        out.push(2);
                        subscribed = true;
                        for c in std::mem::take(&mut *st.outbox.lock().unwrap()) {
                            out.extend_from_slice(&c);
                        }
                        used
                    }
                    None => break,
                }
            } else {
                match codec::decode(Protocol::V311, &buf, 1 << 24) {
                    Ok(Some((p, used))) => {
                        handle(&st, client.as_deref().unwrap_or_default(), p, &mut out);
                        used
                    }
                    Ok(None) => break,
                    Err(_) => return,
                }
            };
            buf.drain(..used);
            if !out.is_empty() && s.write_all(&out).await.is_err() {
                return;
            }
        }
    }
}

fn handle(st: &State, client: &str, p: Packet, out: &mut Vec<u8>) {
    match p {
        Packet::Publish(p) if p.qos == 2 => {
            let mut sessions = st.sessions.lock().unwrap();
            sessions.entry(client.to_string()).or_default().entry(p.pid).or_insert(p.payload);
            codec::encode_pubrec(p.pid, out);
        }
        Packet::Publish(p) => {
            // QoS 0/1 (the status topic): delivered as is.
            if p.qos == 1 {
                codec::encode_puback(p.pid, out);
            }
        }
        Packet::PubRel { pid, .. } => {
            let payload = st.sessions.lock().unwrap().get_mut(client).and_then(|s| s.remove(&pid));
            if let Some(payload) = payload {
                deliver(st, &payload);
            }
            codec::encode_pubcomp(pid, out);
        }
        Packet::PingReq => out.extend_from_slice(&[0xD0, 0]),
        // Our command's QoS 2 flow.
        Packet::PubRec { pid, .. } => codec::encode_pubrel(pid, out),
        _ => {}
    }
}

/// SUBSCRIBE: `(packet id, bytes used)`, `None` when more bytes are needed.
fn subscribe_pid(buf: &[u8]) -> Option<(u16, usize)> {
    let (mut len, mut i) = (0usize, 1);
    loop {
        let b = *buf.get(i)?;
        len |= ((b & 0x7f) as usize) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 || i > 4 {
            break;
        }
    }
    let body = buf.get(i..i + len)?;
    Some((u16::from_be_bytes([*body.first()?, *body.get(1)?]), i + len))
}

fn deliver(st: &State, payload: &[u8]) {
    let Ok(batch) = Batch::decode(payload) else {
        // Not a batch: a reply to a command?
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload)
            && v.get("status").is_some()
        {
            st.replies.lock().unwrap().push(v);
        }
        return;
    };
    let c = &st.counts;
    if st.seen.lock().unwrap().insert((batch.gateway.clone(), batch.batch)) {
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.readings.fetch_add(batch.readings.len() as u64, Ordering::Relaxed);
        let mut seen = st.readings.lock().unwrap();
        for r in batch.readings {
            if let Some(seq) = r.seq {
                *seen.entry((r.device, r.sensor, seq)).or_default() += 1;
            }
        }
    } else {
        c.duplicate_batches.fetch_add(1, Ordering::Relaxed);
    }
}

/// CONNECT (3.1.1): `Some(Ok((client id, bytes used)))`, `None` when more
/// bytes are needed, `Some(Err)` for anything else.
fn parse_connect(buf: &[u8]) -> Option<Result<(String, usize), ()>> {
    let first = *buf.first()?;
    if first >> 4 != 1 {
        return Some(Err(()));
    }
    let (mut len, mut i) = (0usize, 1);
    loop {
        let b = *buf.get(i)?;
        len |= ((b & 0x7f) as usize) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Some(Err(()));
        }
    }
    let body = buf.get(i..i + len)?;
    // "MQTT", level, flags, keep-alive, then the client id.
    let at = 2 + 4 + 1 + 1 + 2;
    let id_len = body.get(at..at + 2).map(|x| u16::from_be_bytes([x[0], x[1]]) as usize);
    let id = id_len.and_then(|n| body.get(at + 2..at + 2 + n)).map(|x| String::from_utf8_lossy(x).into_owned());
    Some(id.map(|id| (id, i + len)).ok_or(()))
}
