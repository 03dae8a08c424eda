//! Counters shared by every part of the gateway, declared once.
//!
//! Each row of the `counters!` table below makes a field of [`Metrics`]
//! (plain atomics behind one `Arc`, so the hot path pays one relaxed add per
//! event), its Prometheus family with HELP and TYPE ([`render`]), and its
//! words in the exit summary ([`summary`]). Per-port and per-device counters
//! live in small mutex-guarded maps: they change on every reading too, but a
//! gateway has tens of ports, not millions. [`status`] turns all of it into
//! the one [`status::GatewayStatus`] that `STATUS=`, the broker's status
//! message and `edge-gateway status` show; [`http`] serves `/metrics` and
//! `/status`.

pub mod config;
pub mod http;
pub mod render;
pub mod status;
pub mod summary;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counter or gauge, as Prometheus calls them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// Which exit-summary line a counter is logged on (see [`summary`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line {
    /// `stopped: ...`, always logged.
    Stopped,
    /// `uplink: ...`, logged when the uplink tried to connect.
    Uplink,
    /// `broker: ...`, logged when the broker saw anything.
    Broker,
}

/// One row of the counter table: everything written about a counter.
#[derive(Debug)]
pub struct Def {
    /// The field of [`Metrics`].
    pub field: &'static str,
    pub get: fn(&Metrics) -> &AtomicU64,
    pub kind: Kind,
    /// Prometheus family, without the `edge_gateway_` prefix. Rows that
    /// share a family follow each other and differ by their `labels`; the
    /// first one's `help` is the family's HELP (the others leave it empty).
    pub family: &'static str,
    pub labels: &'static [(&'static str, &'static str)],
    pub help: &'static str,
    /// Where the exit summary logs it, with the words after the number.
    pub summary: Option<(Line, &'static str)>,
}

/// The table: each row makes a field of [`Metrics`] (documented by its
/// HELP), its Prometheus sample and its place in the exit summary.
macro_rules! counters {
    ($(
        $(#[doc = $doc:literal])*
        $field:ident: $kind:ident $family:literal $({ $($lk:literal = $lv:literal),+ })?,
            $help:literal $(, $line:ident $phrase:literal)?;
    )*) => {
        #[derive(Default, Debug)]
        pub struct Metrics {
            $(
                #[doc = $help]
                $(#[doc = ""] #[doc = $doc])*
                pub $field: AtomicU64,
            )*
            per_port: Mutex<BTreeMap<String, PortCounters>>,
            per_topic: Mutex<BTreeMap<String, TopicCounters>>,
            per_device: Mutex<BTreeMap<(&'static str, String), DeviceCounters>>,
            /// ACL denials per (user, "publish" | "subscribe"); user "" = anonymous.
            acl_denied: Mutex<BTreeMap<(String, &'static str), u64>>,
            /// Per `[[rules]]` name, as the pipeline's engine counted them.
            per_rule: Mutex<BTreeMap<String, crate::rules::RuleCounts>>,
            /// Per device: its clock minus the gateway's, in ms (smoothed).
            clock_offset: Mutex<BTreeMap<String, i64>>,
        }

        /// Every counter of [`Metrics`], in the order `/metrics` and the
        /// exit summary show them.
        pub const TABLE: &[Def] = &[$(
            Def {
                field: stringify!($field),
                get: |m: &Metrics| &m.$field,
                kind: Kind::$kind,
                family: $family,
                labels: &[$($(($lk, $lv)),+)?],
                help: $help,
                summary: counters!(@line $($line $phrase)?),
            },
        )*];
    };
    (@line) => { None };
    (@line $line:ident $phrase:literal) => { Some((Line::$line, $phrase)) };
}

counters! {
    // The pipeline: dedup, batches, the queue, acks.
    readings_accepted: Counter "readings_accepted_total",
        "Readings accepted by dedup, all sources.", Stopped "readings accepted";
    duplicates_dropped: Counter "duplicates_dropped_total",
        "Duplicates dropped by dedup (device resends), all sources.", Stopped "duplicates dropped";
    /// Their dedup key was forgotten (window or memory bound).
    stale_resends: Counter "stale_resends_total",
        "Resends of readings an ack already covered (counted in duplicates_dropped_total too); acked again, not stored.",
        Stopped "stale resends acked again";
    batches_queued: Counter "batches_queued_total", "Batches appended to the queue.", Stopped "batches queued";
    batch_bytes_queued: Counter "batch_bytes_queued_total",
        "Encoded batch bytes appended to the queue (payloads only).", Stopped "batch bytes queued";
    readings_dropped_full: Counter "readings_dropped_total" { "policy" = "drop_oldest" },
        "Readings lost to the queue-full policy.", Stopped "readings dropped (queue full)";
    /// Readings refused by `reject_new`; not acked: the devices resend them.
    readings_rejected_full: Counter "readings_dropped_total" { "policy" = "reject_new" },
        "", Stopped "readings refused (queue full)";
    /// `[lanes.alarm] ttl` ran out before the reading went upstream.
    readings_expired_alarm: Counter "lane_expired_readings_total" { "lane" = "alarm" },
        "Readings dropped undelivered because their lane's ttl ran out.", Stopped "alarm readings expired (lane ttl)";
    /// `[lanes.bulk] ttl` ran out.
    readings_expired_bulk: Counter "lane_expired_readings_total" { "lane" = "bulk" },
        "", Stopped "bulk readings expired (lane ttl)";
    /// See [`crate::allow`]: the source's `devices` patterns do not match.
    readings_refused_serial: Counter "readings_refused_total" { "source" = "serial" },
        "Readings refused because their source may not speak for the device they name.",
        Stopped "readings refused (serial port may not speak for the device)";
    /// The same, from a BLE entry.
    readings_refused_ble: Counter "readings_refused_total" { "source" = "ble" },
        "", Stopped "readings refused (BLE entry may not speak for the device)";
    /// The same, from a LAN login.
    readings_refused_lan: Counter "readings_refused_total" { "source" = "lan" },
        "", Stopped "readings refused (LAN user may not speak for the device)";
    /// See `source::ble::replay`.
    bthome_replays: Counter "bthome_replays_total",
        "Encrypted BTHome adverts refused because their counter was older than the last accepted (replays).",
        Stopped "BTHome replays refused";
    batches_rejected_full: Counter "batches_rejected_total",
        "Batches refused by reject_new (not acked; devices resend).";
    queue_commits: Counter "queue_commits_total", "Queue group commits (fsyncs).", Stopped "queue commits";
    /// Every fsync/fdatasync of the data dir, by the file it made durable
    /// (issue 18's SD-card wear: each one writes at least a 4 KiB page).
    /// `queue`: segments, their indexes, the ack ledger and directories.
    fsyncs_queue: Counter "fsyncs_total" { "file" = "queue" },
        "fsync/fdatasync calls on the data dir, by the file made durable (each writes at least one 4 KiB page).";
    /// The checkpoint's state file (the file and its directory).
    fsyncs_state: Counter "fsyncs_total" { "file" = "state" }, "";
    /// The uplink's PUBREC log.
    fsyncs_pubrec: Counter "fsyncs_total" { "file" = "pubrec" }, "";
    /// The dead-letter store.
    fsyncs_dead: Counter "fsyncs_total" { "file" = "dead" }, "";
    /// The commands store (downlink).
    fsyncs_commands: Counter "fsyncs_total" { "file" = "commands" }, "";
    /// See `Queue::pad_to_page`.
    queue_pad_bytes: Counter "queue_pad_bytes_total",
        "Padding queue commits wrote to end a segment on a 4 KiB page while the backlog is small (the next commit then rewrites no page).";
    /// See `Queue::deflate_saved_bytes`.
    queue_deflate_saved_bytes: Counter "queue_deflate_saved_bytes_total",
        "Payload bytes small queue records did not write to disk because they were stored deflated ([store] compress).";
    /// See `Queue::fill_ahead`.
    queue_prefill_bytes: Counter "queue_prefill_bytes_total",
        "Zeros small queue commits wrote ahead of the segment's end, so later commits change no file size (no journal commit each).";
    /// See `Queue::reused_segments`.
    queue_reused_segments: Counter "queue_reused_segments_total",
        "Segment files a roll took over from a reclaimed segment instead of creating one (no zeros ahead, no growth).";
    /// See `Queue::direct_commits`.
    queue_direct_commits: Counter "queue_direct_commits_total",
        "Queue commits that wrote their records in whole 512-byte blocks with one direct write, not through the page cache's 4 KiB pages.";
    /// See `pipeline::CHECKPOINT_RETRY_MIN`.
    checkpoints_failed: Counter "checkpoints_failed_total",
        "Checkpoints (the dedup and ack state file) that could not be written; each is tried again after a pause.";
    queue_repaired_bytes: Counter "queue_repaired_bytes_total", "Torn bytes cut off the queue tail at start-up.";
    queue_corrupt_records: Counter "queue_corrupt_records_total", "Corrupt records skipped at start-up.";
    acks_sent: Counter "acks_sent_total", "Acks written back to devices.", Stopped "acks sent";
    /// Set from the ack tracker once per tick.
    ack_gap_skipped: Counter "ack_gap_skipped_total",
        "Seqs acked past because they never came within ack_gap_timeout (lost frames, or a device that skipped them).",
        Stopped "seqs acked past a gap";

    // The uplink.
    /// A reload can change it.
    upstream_configured: Gauge "upstream_configured", "1 when the `[upstream]` section is configured.";
    upstream_connected: Gauge "upstream_connected", "1 while the uplink has a session.";
    upstream_mqtt_version: Gauge "upstream_mqtt_version",
        "MQTT version of the upstream session (5, 4 = 3.1.1, 0 = none).";
    batches_delivered: Counter "batches_delivered_total",
        "Batches completed upstream (PUBCOMP/PUBACK).", Uplink "batches delivered";
    readings_delivered: Counter "readings_delivered_total",
        "Readings in delivered batches.", Uplink "readings delivered";
    upstream_connects: Counter "upstream_connects_total", "Sessions established upstream.", Uplink "connects";
    /// TCP, TLS, CONNACK refusals, timeouts.
    upstream_connect_failures: Counter "upstream_connect_failures_total",
        "Failed upstream connection attempts.", Uplink "failed attempts";
    /// PUBLISH re-sent with DUP=1 in a resumed session.
    publishes_resent_dup: Counter "batches_resent_total" { "reason" = "dup_publish" },
        "Batches sent again, by why.", Uplink "PUBLISH re-sent with DUP";
    /// PUBREL re-sent in a resumed session.
    pubrels_resent: Counter "batches_resent_total" { "reason" = "pubrel" },
        "", Uplink "PUBREL re-sent";
    /// Sent again as new messages: the broker had lost the session.
    batches_resent_session_lost: Counter "batches_resent_total" { "reason" = "session_lost" },
        "", Uplink "batches re-sent after a lost session";
    /// PUBREC/PUBACK with a reason code >= 0x80: not delivered; retried.
    batches_refused: Counter "batches_resent_total" { "reason" = "refused" },
        "", Uplink "refused by the broker";
    batches_too_large: Counter "batches_too_large_total",
        "Batches over the broker's maximum packet size (dropped).", Uplink "too large";
    batches_corrupt_skipped: Counter "batches_corrupt_skipped_total",
        "Corrupt queue records skipped by the uplink.", Uplink "corrupt skipped";
    /// After permanent refusals (see `uplink::dead`).
    batches_dead_lettered: Counter "batches_dead_lettered_total",
        "Batches refused for good and moved to the dead-letter store.", Uplink "batches dead-lettered";
    readings_dead_lettered: Counter "readings_dead_lettered_total",
        "Readings in batches moved to the dead-letter store.", Uplink "readings dead-lettered";
    // Commands from the cloud (`crate::downlink`).
    commands_received: Counter "commands_received_total", "Commands accepted from the cloud (written durably).",
        Stopped "commands accepted";
    commands_repeated: Counter "commands_repeated_total",
        "Commands received again with an id already accepted (acked, not carried out twice).";
    commands_delivered: Counter "commands_total" { "status" = "delivered" },
        "Commands finished, by the status of their reply.", Stopped "commands delivered";
    /// The device answered `ok: false`.
    commands_failed: Counter "commands_total" { "status" = "failed" }, "";
    /// Its ttl ran out before the device answered.
    commands_expired: Counter "commands_total" { "status" = "expired" }, "", Stopped "commands expired";
    /// Malformed, incomplete, or over `max_pending`.
    commands_rejected: Counter "commands_total" { "status" = "rejected" }, "";
    command_attempts: Counter "command_attempts_total", "Commands sent to a device (first sends and retries).";
    /// Sum over delivered and failed commands of receipt → the device's answer.
    command_latency_ms: Counter "command_answer_milliseconds_total",
        "Milliseconds from a command's receipt to its device's answer, summed over answered commands.";
    command_answers_unknown: Counter "command_answers_unknown_total",
        "Answers from devices to commands that are not pending (already finished, or never sent).";
    commands_pending: Gauge "commands_pending", "Commands waiting for their device.";
    dead_letter_batches: Gauge "dead_letter_batches",
        "Batches in the dead-letter store (queue dead list/replay/drop).";
    /// Or by an older version; the next connect starts clean.
    pubrec_log_resets: Counter "pubrec_log_resets_total",
        "PUBREC logs reset because they belonged to another broker or client id.", Uplink "PUBREC log resets";
    upstream_write_timeouts: Counter "upstream_write_timeouts_total",
        "Upstream sessions ended by a write stuck for keep-alive x 1.5.", Uplink "write timeouts";

    // The LAN broker.
    broker_connections: Gauge "broker_connections", "LAN MQTT clients connected now.";
    /// Handshake timeouts, bad CONNECTs, logins, limits.
    broker_refused: Counter "broker_refused_total", "LAN connections refused.", Broker "connections refused";
    /// Denied by the ACL (dropped or disconnected), or over max_payload.
    broker_denied_publishes: Counter "broker_denied_publishes_total",
        "LAN publishes refused (ACL or max_payload).", Broker "publishes refused";
    /// Or would not finish within `connect_timeout`.
    broker_login_busy: Counter "broker_login_busy_total",
        "LAN logins refused because the password checks were busy.", Broker "logins refused (busy)";
    broker_acl_filtered: Counter "broker_acl_filtered_total",
        "Messages not delivered to a LAN client that may not read them.", Broker "messages filtered by the ACL";
    readings_republished: Counter "readings_republished_total",
        "Readings republished on the broker.", Broker "readings republished";
    republish_dropped: Counter "republish_dropped_total",
        "Readings not republished (publisher behind).", Broker "not republished (behind)";

    // The service.
    reloads: Counter "reloads_total", "Config reloads applied (SIGHUP).";
    reloads_failed: Counter "reloads_failed_total", "Config reloads refused (invalid config; old one kept).";
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
    /// Add to counter `c` what a running total (e.g. a file's fsync count)
    /// grew by since the last call; `seen` keeps the total of that call.
    pub fn add_growth(c: &AtomicU64, seen: &AtomicU64, total: u64) {
        let before = seen.swap(total, Ordering::Relaxed);
        Metrics::add(c, total.saturating_sub(before));
    }
    pub fn sub(c: &AtomicU64, n: u64) {
        c.fetch_sub(n, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub fn port<R>(&self, port: &str, f: impl FnOnce(&mut PortCounters) -> R) -> R {
        let mut map = self.per_port.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(port) {
            Some(c) => f(c),
            None => f(map.entry(port.to_string()).or_default()),
        }
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

    /// A device's clock offset estimate (its `ts` minus the gateway's receive
    /// time, smoothed); returns the new estimate.
    pub fn clock_offset(&self, device: &str, sample_ms: i64) -> i64 {
        let mut map = self.clock_offset.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(device) {
            // A jump (a reset or set clock) replaces the estimate; drift is smoothed.
            Some(o) if (sample_ms - *o).abs() < 60_000 => {
                *o += (sample_ms - *o) / 4;
                *o
            }
            Some(o) => {
                *o = sample_ms;
                sample_ms
            }
            None => {
                map.insert(device.to_string(), sample_ms);
                sample_ms
            }
        }
    }

    pub fn clock_offsets(&self) -> BTreeMap<String, i64> {
        self.clock_offset.lock().unwrap_or_else(|e| e.into_inner()).clone()
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

    /// The pipeline's per-rule counts (totals since start, set once per tick).
    pub fn set_rules<'a>(&self, counts: impl IntoIterator<Item = (&'a str, crate::rules::RuleCounts)>) {
        let mut map = self.per_rule.lock().unwrap_or_else(|e| e.into_inner());
        for (name, c) in counts {
            match map.get_mut(name) {
                Some(v) => *v = c,
                None => {
                    map.insert(name.to_string(), c);
                }
            }
        }
    }

    pub fn rules(&self) -> BTreeMap<String, crate::rules::RuleCounts> {
        self.per_rule.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn devices(&self) -> BTreeMap<(&'static str, String), DeviceCounters> {
        self.per_device.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_growth_adds_what_a_running_total_grew_by() {
        let (c, seen) = (AtomicU64::new(0), AtomicU64::new(0));
        Metrics::add_growth(&c, &seen, 3);
        Metrics::add_growth(&c, &seen, 3);
        Metrics::add_growth(&c, &seen, 7);
        assert_eq!(Metrics::get(&c), 7, "3, nothing, then 4 more");
        // A total that starts again (a store reopened) adds nothing until it grows.
        Metrics::add_growth(&c, &seen, 2);
        Metrics::add_growth(&c, &seen, 5);
        assert_eq!(Metrics::get(&c), 10);
    }

    #[test]
    fn a_family_is_one_run_of_rows_with_one_kind_and_help() {
        let mut seen = std::collections::HashSet::new();
        for (i, d) in TABLE.iter().enumerate() {
            let first = i == 0 || TABLE[i - 1].family != d.family;
            if first {
                assert!(seen.insert(d.family), "{}: its rows must follow each other", d.family);
                assert!(!d.help.is_empty(), "{}: a family needs its HELP", d.family);
            } else {
                let prev = &TABLE[i - 1];
                assert_eq!(prev.kind, d.kind, "{}", d.family);
                assert!(d.help.is_empty(), "{}: the HELP is the first row's", d.family);
                assert_ne!(prev.labels, d.labels, "{}: two rows, one sample", d.family);
            }
            assert_eq!(d.kind == Kind::Counter, d.family.ends_with("_total"), "{}: counters end in _total", d.family);
        }
        // The accessor reads its own field.
        let m = Metrics::default();
        for (i, d) in TABLE.iter().enumerate() {
            Metrics::set((d.get)(&m), i as u64 + 1);
        }
        for (i, d) in TABLE.iter().enumerate() {
            assert_eq!(Metrics::get((d.get)(&m)), i as u64 + 1, "{}", d.field);
        }
    }
}
