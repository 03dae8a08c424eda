//! MQTT 5 session lifetimes, kept by the front door.
//!
//! rumqttd 0.20 ties a session's life to the CONNECT's clean flag as MQTT
//! 3.1.1 does: it keeps a session after the connection exactly when the
//! client connected with Clean Session 0. MQTT 5 splits that in two: Clean
//! Start (discard what was there before this connection) and Session
//! Expiry Interval (how long to keep it after; 0, the default, means not at
//! all). The door maps one onto the other ([`keeps`]):
//! * Clean Start 1 and expiry 0 (what most clients send) is rumqttd's clean
//!   flag 1: nothing else to do;
//! * otherwise rumqttd is asked to keep the session (clean flag 0), and
//!   - with Clean Start 1, a short connection of ours with the same client
//!     id and clean flag 1 first empties what rumqttd kept (a "wipe");
//!   - after the connection, once its interval (the CONNECT's, or the
//!     DISCONNECT's if it set one) has passed, the same wipe, unless a newer
//!     connection with that client id came in the meantime; 0xFFFFFFFF
//!     never expires (until the gateway restarts: rumqttd keeps sessions in
//!     memory). A client that comes back with Clean Start 0 after its
//!     session expired but before the wipe ran gets the wipe first.
//!
//! Per client id, a connection's set-up and a wipe never overlap (an async
//! lock), so a wipe cannot end a newer connection's session.

use super::Internal;
use rumqttd::protocol::{Connect, Packet, Protocol, v4::V4};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedMutexGuard;

/// A wipe must be done within this (it is two packets on loopback).
const WIPE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a wipe waits after rumqttd closed its connection (see [`wipe`]).
const WIPE_SETTLE: Duration = Duration::from_millis(50);

#[derive(Default)]
pub struct Sessions {
    ids: Mutex<HashMap<String, Entry>>,
    next: AtomicU64,
    /// The expiry timers; dropping the `Sessions` (the broker stopped) ends them.
    timers: Mutex<tokio::task::JoinSet<()>>,
}

struct Entry {
    /// The newest connection's number.
    current: u64,
    lock: Arc<tokio::sync::Mutex<()>>,
    /// When the newest connection's session expires, once it has ended
    /// (or sent its DISCONNECT).
    expires: Option<Instant>,
}

/// One MQTT 5 connection's claim on its client id's session.
pub struct Claim {
    id: String,
    number: u64,
    /// Whether rumqttd keeps the session after the connection (see [`keeps`]).
    kept: bool,
    /// Held while the connection is set up.
    guard: Option<OwnedMutexGuard<()>>,
}

impl Claim {
    /// rumqttd has answered the CONNECT: a wipe of an older session may run.
    pub fn set_up(&mut self) {
        self.guard = None;
    }
}

impl Sessions {
    /// A new MQTT 5 connection for (internal) client id `id`: becomes the
    /// newest, waits for a wipe in progress, empties the session if it asks
    /// to (`clean_start`, when rumqttd's own clean flag will not, see
    /// [`keeps`]) or if the one before expired and was not wiped yet, and
    /// holds the id until [`Claim::set_up`] (after rumqttd's CONNACK).
    pub async fn claim(&self, id: &str, clean_start: bool, expiry: u32, internal: &Internal) -> Result<Claim, String> {
        let kept = keeps(clean_start, expiry);
        let number = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let lock = {
            let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
            let e = ids.entry(id.to_string()).or_insert_with(|| Entry {
                current: 0,
                lock: Arc::new(tokio::sync::Mutex::new(())),
                expires: None,
            });
            e.current = number;
            e.lock.clone()
        };
        let guard = lock.lock_owned().await;
        let expired = {
            let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
            let e = ids.get_mut(id).and_then(|e| e.expires.take());
            e.is_some_and(|t| t <= Instant::now())
        };
        if (clean_start && kept) || (!clean_start && expired) {
            wipe(internal, id).await?;
        }
        Ok(Claim { id: id.to_string(), number, kept, guard: Some(guard) })
    }

    /// The client of `claim` sent DISCONNECT (or its connection ended):
    /// its session expires `expiry` seconds from now, unless a newer
    /// connection with its id came first.
    pub fn ending(&self, claim: &Claim, expiry: u32) {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = ids.get_mut(&claim.id)
            && e.current == claim.number
        {
            e.expires = Instant::now().checked_add(Duration::from_secs(expiry.into()));
        }
    }

    /// The connection of `claim` ended; its session expires after
    /// `expiry` seconds unless a newer connection claims the id first.
    pub fn ended(self: &Arc<Self>, claim: Claim, expiry: u32, internal: Arc<Internal>) {
        self.ending(&claim, expiry);
        let Claim { id, number, kept, guard } = claim;
        drop(guard);
        if !kept || expiry == u32::MAX {
            return;
        }
        let sessions = Arc::downgrade(self);
        let mut timers = self.timers.lock().unwrap_or_else(|e| e.into_inner());
        while timers.try_join_next().is_some() {}
        timers.spawn(async move {
            if expiry > 0 {
                tokio::time::sleep(Duration::from_secs(expiry.into())).await;
            }
            if let Some(sessions) = sessions.upgrade() {
                sessions.expire(&id, number, &internal).await;
            }
        });
    }

    async fn expire(&self, id: &str, number: u64, internal: &Internal) {
        let lock = {
            let ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
            match ids.get(id) {
                Some(e) if e.current == number => e.lock.clone(),
                _ => return,
            }
        };
        let _held = lock.clone().lock_owned().await;
        // A newer connection may have claimed the id while we waited.
        if self.ids.lock().unwrap_or_else(|e| e.into_inner()).get(id).is_none_or(|e| e.current != number) {
            return;
        }
        if let Err(e) = wipe(internal, id).await {
            tracing::debug!("broker: could not end the expired MQTT 5 session of {id:?}: {e}");
        }
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        // Forget the id unless someone else holds (or waits for) its lock.
        if ids.get(id).is_some_and(|e| e.current == number && Arc::strong_count(&e.lock) <= 3) {
            ids.remove(id);
        }
    }
}

/// Whether rumqttd is asked to keep the session after the connection
/// (clean flag 0): unless the client wants a fresh session that ends with
/// the connection (Clean Start 1, expiry 0, what most clients ask for),
/// which is rumqttd's clean flag 1 exactly and needs no wipe at all.
pub fn keeps(clean_start: bool, expiry: u32) -> bool {
    !clean_start || expiry > 0
}

/// Connect to rumqttd as `id` with the clean flag set, and leave: rumqttd
/// drops whatever session it kept for `id` (and ends a connection that
/// still uses it, as a takeover would). A will pending for `id` stays.
async fn wipe(internal: &Internal, id: &str) -> Result<(), String> {
    let mut out = bytes::BytesMut::new();
    let connect = Connect { keep_alive: 10, client_id: id.to_string(), clean_session: true };
    V4.write(Packet::Connect(connect, None, None, None, Some(internal.login())), &mut out)
        .map_err(|e| format!("{e:?}"))?;
    tokio::time::timeout(WIPE_TIMEOUT, async {
        let mut up = TcpStream::connect(internal.addr(false)).await.map_err(|e| e.to_string())?;
        up.write_all(&out).await.map_err(|e| e.to_string())?;
        let mut ack = [0u8; 4];
        up.read_exact(&mut ack).await.map_err(|e| e.to_string())?;
        if ack[0] >> 4 != 2 || ack[3] != 0 {
            return Err(format!("CONNACK {ack:?}"));
        }
        // No DISCONNECT: rumqttd would take it for the session's and drop a
        // will its last connection left pending. Close, and wait for rumqttd
        // to close too: by then it has queued the end of this connection
        // before any newer one for the same id.
        up.shutdown().await.map_err(|e| e.to_string())?;
        while up.read(&mut [0u8; 64]).await.is_ok_and(|n| n > 0) {}
        // rumqttd fires "publish the will of `id`" a timer tick after any
        // connection for `id` ends, ours too, and publishes whatever will is
        // registered for `id` then: the next connection's, if it came in
        // that tick. Give the tick time to pass before anyone connects.
        tokio::time::sleep(WIPE_SETTLE).await;
        Ok(())
    })
    .await
    .map_err(|_| "timed out".to_string())?
}
