//! Counters shared by every part of the gateway.
//!
//! Plain atomics behind one `Arc`, so the hot path pays one relaxed add per
//! event. Per-port and per-device counters live in small mutex-guarded maps:
//! they change on every reading too, but a gateway has tens of ports, not
//! millions. [`render`] turns this struct into Prometheus text, [`http`]
//! serves it on `[metrics] listen`, and [`status`] reads it back for the
//! `edge-gateway status` command.

pub mod config;
pub mod http;
pub mod render;
pub mod status;
pub mod summary;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default, Debug)]
pub struct Metrics {
    /// Readings accepted by dedup and handed to the batcher.
    pub readings_accepted: AtomicU64,
    /// Readings dropped because they were already accepted (device resends).
    pub duplicates_dropped: AtomicU64,
    /// Of those: resends of a seq an ack already covers, whose dedup key was
    /// forgotten (window or memory bound); answered with the ack, not stored.
    pub stale_resends: AtomicU64,
    /// Batches appended to the queue.
    pub batches_queued: AtomicU64,
    /// Encoded batch bytes appended to the queue (payloads only).
    pub batch_bytes_queued: AtomicU64,
    /// Readings dropped by the `drop_oldest` policy.
    pub readings_dropped_full: AtomicU64,
    /// Batches refused by the `reject_new` policy (their readings were not acked).
    pub batches_rejected_full: AtomicU64,
    /// Readings in those refused batches.
    pub readings_rejected_full: AtomicU64,
    /// Queue commits (fsyncs of the queue).
    pub queue_commits: AtomicU64,
    /// Bytes cut off a torn/corrupt queue tail at start-up.
    pub queue_repaired_bytes: AtomicU64,
    /// Corrupt records skipped at start-up.
    pub queue_corrupt_records: AtomicU64,
    /// Acks written back to devices.
    pub acks_sent: AtomicU64,
    /// 1 while `[upstream]` is configured (a reload can change it).
    pub upstream_configured: AtomicU64,
    /// 1 while the uplink has a session with the upstream broker.
    pub upstream_connected: AtomicU64,
    /// Sessions established with the upstream broker.
    pub upstream_connects: AtomicU64,
    /// Failed connection attempts (TCP, TLS, CONNACK refusals, timeouts).
    pub upstream_connect_failures: AtomicU64,
    /// Batches (and their readings) completed upstream: PUBCOMP (QoS 2) / PUBACK (QoS 1).
    pub batches_delivered: AtomicU64,
    pub readings_delivered: AtomicU64,
    /// PUBLISH packets re-sent with DUP=1 in a resumed session.
    pub publishes_resent_dup: AtomicU64,
    /// PUBREL packets re-sent in a resumed session.
    pub pubrels_resent: AtomicU64,
    /// Batches re-sent as new messages because the broker had lost the session.
    pub batches_resent_session_lost: AtomicU64,
    /// PUBREC/PUBACK with a reason code >= 0x80 (not delivered; retried).
    pub batches_refused: AtomicU64,
    /// Batches bigger than the broker accepts (dropped from the queue, logged).
    pub batches_too_large: AtomicU64,
    /// Queue records found corrupt when read for sending (skipped).
    pub batches_corrupt_skipped: AtomicU64,
    /// Batches (and their readings) moved to the dead-letter store after
    /// permanent refusals (see `uplink::dead`).
    pub batches_dead_lettered: AtomicU64,
    pub readings_dead_lettered: AtomicU64,
    /// Batches in the dead-letter store now (a gauge).
    pub dead_letter_batches: AtomicU64,
    /// `uplink.pubrec` was written for another broker URL / client id (or
    /// by an older version) and was reset; the next connect starts clean.
    pub pubrec_log_resets: AtomicU64,
    /// MQTT version of the current upstream session: 5, 4 (= 3.1.1), 0 when none.
    pub upstream_mqtt_version: AtomicU64,
    /// Upstream sessions ended because a write did not finish within keep-alive x 1.5.
    pub upstream_write_timeouts: AtomicU64,
    /// LAN MQTT clients connected through the embedded broker now (a gauge).
    pub broker_connections: AtomicU64,
    /// Broker connections refused: handshake timeouts, bad CONNECTs, logins, limits.
    pub broker_refused: AtomicU64,
    /// PUBLISHes refused: denied by the ACL (dropped or disconnected), or over max_payload.
    pub broker_denied_publishes: AtomicU64,
    /// Logins refused because too many password checks were waiting (or
    /// would not finish within `connect_timeout`).
    pub broker_login_busy: AtomicU64,
    /// PUBLISHes not delivered to a LAN client that may not read their topic.
    pub broker_acl_filtered: AtomicU64,
    /// Readings republished on the broker's `republish` topic.
    pub readings_republished: AtomicU64,
    /// Readings not republished because the broker's publisher was behind.
    pub republish_dropped: AtomicU64,
    /// Config reloads applied / refused (invalid new config).
    pub reloads: AtomicU64,
    pub reloads_failed: AtomicU64,
    per_port: Mutex<BTreeMap<String, PortCounters>>,
    per_topic: Mutex<BTreeMap<String, TopicCounters>>,
    per_device: Mutex<BTreeMap<(&'static str, String), DeviceCounters>>,
    /// ACL denials per (user, "publish" | "subscribe"); user "" = anonymous.
    acl_denied: Mutex<BTreeMap<(String, &'static str), u64>>,
}

/// Readings per device, as the pipeline saw them (after every source).
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct DeviceCounters {
    pub readings: u64,
    pub duplicates: u64,
}

/// LAN MQTT ingest counters, per topic.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct TopicCounters {
    pub readings: u64,
    pub malformed: u64,
}

#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct PortCounters {
    pub readings: u64,
    pub malformed: u64,
    pub connected: bool,
    pub reconnects: u64,
}

impl Metrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn set(c: &AtomicU64, v: u64) {
        c.store(v, Ordering::Relaxed);
    }
    pub fn sub(c: &AtomicU64, n: u64) {
        c.fetch_sub(n, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub fn port<R>(&self, port: &str, f: impl FnOnce(&mut PortCounters) -> R) -> R {
        let mut map = self.per_port.lock().unwrap_or_else(|e| e.into_inner());
        f(map.entry(port.to_string()).or_default())
    }

    pub fn ports(&self) -> BTreeMap<String, PortCounters> {
        self.per_port.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn topic<R>(&self, topic: &str, f: impl FnOnce(&mut TopicCounters) -> R) -> R {
        let mut map = self.per_topic.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(topic) {
            Some(c) => f(c),
            None => f(map.entry(topic.to_string()).or_default()),
        }
    }

    pub fn topics(&self) -> BTreeMap<String, TopicCounters> {
        self.per_topic.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A port (serial or `ble:NAME`) removed by a config reload: its link
    /// state and counters go, so `/metrics` shows what is configured.
    pub fn forget_port(&self, port: &str) {
        self.per_port.lock().unwrap_or_else(|e| e.into_inner()).remove(port);
    }

    /// Add the pipeline's per-device tallies (it batches them, so the hot
    /// path takes this lock once per tick, not once per reading).
    pub fn add_devices(&self, tallies: impl IntoIterator<Item = ((&'static str, String), DeviceCounters)>) {
        let mut map = self.per_device.lock().unwrap_or_else(|e| e.into_inner());
        for (key, t) in tallies {
            let c = map.entry(key).or_default();
            c.readings += t.readings;
            c.duplicates += t.duplicates;
        }
    }

    /// The broker's ACL denied `user` (empty: anonymous) a publish or a subscribe.
    pub fn acl_denied(&self, user: &str, action: &'static str) {
        let mut map = self.acl_denied.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(&(user.to_string(), action)) {
            Some(n) => *n += 1,
            None => {
                map.insert((user.to_string(), action), 1);
            }
        }
    }

    pub fn acl_denials(&self) -> BTreeMap<(String, &'static str), u64> {
        self.acl_denied.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn devices(&self) -> BTreeMap<(&'static str, String), DeviceCounters> {
        self.per_device.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
