//! Internal events that both log and count, each told in one place.
//!
//! A call site says what happened (`Event::BatchDeadLettered { .. }.emit(&m)`);
//! this file says how: the words, the level and the counters, together, so
//! that a counter cannot move without its log line or the other way round
//! (the pattern of Vector's `internal_events`). Events that only count (one
//! relaxed add on the hot path) or only log stay where they happen.

use crate::metrics::Metrics;
use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};
use tracing::{debug, error, warn};

/// At most one log line per interval; counts what it held back.
#[derive(Debug)]
pub struct RateLimit {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(every: Duration) -> RateLimit {
        RateLimit { every, last: None, suppressed: 0 }
    }

    /// `n` events happened; `Some(held_back_before)` if one may be logged now.
    pub fn allow(&mut self, n: u64) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < self.every) {
            self.suppressed += n;
            return None;
        }
        self.last = Some(now);
        let held = std::mem::take(&mut self.suppressed);
        Some(held + n - 1)
    }
}

/// Why a relayed LAN MQTT connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The client or the broker hung up.
    Closed,
    /// A publish the ACL denies, with `acl_action = "disconnect"`.
    Denied(String),
    /// A packet over `max_payload`, in bytes.
    TooBig(usize),
    Malformed,
    /// An empty topic (or a topic alias, which we do not offer).
    EmptyTopic,
    /// Readings for more devices (or sensors) than one user may publish:
    /// the words say which limit.
    TooManyDevices(String),
    /// A reading for a device the login may not speak for.
    NotItsDevice(String),
}

pub enum Event<'a> {
    /// Start-up cut a torn tail off the queue and/or skipped corrupt records.
    QueueRepaired { torn_bytes: u64, corrupt_records: u64 },
    /// Records of the queue failed their CRC when replayed into dedup.
    ReplayCorrupt { ids: &'a [u64] },
    /// SIGHUP with a config that does not load.
    ReloadRefused { error: &'a dyn Display },
    /// `uplink.pubrec` belongs to another broker or client id (`was`), or
    /// names none (`None`: an older version): reset, its batches resent.
    PubrecLogReset { was: Option<&'a str>, identity: &'a str, entries: usize },
    /// The uplink found a queue record corrupt on disk.
    CorruptRecordSkipped { id: u64, path: &'a Path },
    /// A batch refused for good moved to the dead-letter store, which now
    /// holds `store_batches`.
    BatchDeadLettered { id: u64, readings: u32, why: &'a str, store: &'a Path, store_batches: u64 },
    /// The broker's half-open connection slots are full (`from`: the share
    /// of one address). `log` is false while the caller keeps it quiet.
    HandshakesFull { listener: &'a str, from: Option<IpAddr>, peer: SocketAddr, log: bool },
    /// A reading of a device its source may not speak for (`devices`
    /// patterns, see [`crate::allow`]): refused, not stored, not acked.
    /// `log`: `Some(held back since the last line)` when it may be logged.
    DeviceRefused { source: &'static str, link: &'a str, device: &'a str, log: Option<u64> },
    /// An encrypted BTHome advert whose counter is older than the last
    /// accepted from that address: a replay (or a counter reset).
    BthomeReplay { link: &'a str, address: &'a str, counter: u32, last: u32, log: Option<u64> },
    /// A relayed LAN MQTT connection ended.
    LanClientEnded { listener: &'a str, client_id: &'a str, peer: SocketAddr, user: &'a str, why: &'a Ended },
}

impl Event<'_> {
    pub fn emit(self, m: &Metrics) {
        match self {
            Event::QueueRepaired { torn_bytes, corrupt_records } => {
                Metrics::add(&m.queue_repaired_bytes, torn_bytes);
                Metrics::add(&m.queue_corrupt_records, corrupt_records);
                if torn_bytes > 0 || corrupt_records > 0 {
                    warn!(
                        "queue repaired at start-up: cut {torn_bytes} torn bytes, skipped {corrupt_records} corrupt records"
                    );
                }
            }
            Event::ReplayCorrupt { ids } => {
                Metrics::add(&m.queue_corrupt_records, ids.len() as u64);
                warn!("queue records {ids:?} failed their CRC when replayed; skipped");
            }
            Event::ReloadRefused { error: e } => {
                Metrics::inc(&m.reloads_failed);
                error!("reload refused, keeping the running config: {e}");
            }
            Event::PubrecLogReset { was, identity, entries } => {
                Metrics::inc(&m.pubrec_log_resets);
                Metrics::add(&m.batches_resent_session_lost, entries as u64);
                match was {
                    Some(was) => warn!(
                        "uplink.pubrec was written for {was:?}, not {identity:?}: starting clean ({entries} batch(es) \
                         PUBREC'd there are sent again as new messages; the first connect asks for a Clean Start)"
                    ),
                    None => warn!(
                        "uplink.pubrec names no broker (older version): starting clean ({entries} batch(es) sent again \
                         as new messages; the first connect asks for a Clean Start)"
                    ),
                }
            }
            Event::CorruptRecordSkipped { id, path } => {
                Metrics::inc(&m.batches_corrupt_skipped);
                error!(id, path = %path.display(), "queue record corrupt on disk; skipped");
            }
            Event::BatchDeadLettered { id, readings, why, store, store_batches } => {
                Metrics::inc(&m.batches_dead_lettered);
                Metrics::add(&m.readings_dead_lettered, readings as u64);
                Metrics::set(&m.dead_letter_batches, store_batches);
                error!(
                    batch = id,
                    "batch {id} ({readings} readings) moved to the dead-letter store {}: {why}; \
                     `edge-gateway queue dead list` shows it, `queue dead replay` queues it again once the cause is fixed",
                    store.display()
                );
            }
            Event::HandshakesFull { listener, from, peer, log } => {
                Metrics::inc(&m.broker_refused);
                match (log, from) {
                    (false, _) => {}
                    (true, Some(ip)) => {
                        warn!("broker {listener}: too many connections in their handshake from {ip}, closing")
                    }
                    (true, None) => warn!("broker {listener}: too many connections in their handshake, closing {peer}"),
                }
            }
            Event::DeviceRefused { source, link, device, log } => {
                Metrics::inc(match source {
                    "serial" => &m.readings_refused_serial,
                    "ble" => &m.readings_refused_ble,
                    _ => &m.readings_refused_lan,
                });
                if let Some(held) = log {
                    let more = if held > 0 { format!(" ({held} more since the last report)") } else { String::new() };
                    warn!(
                        source,
                        device,
                        "{source} {link}: may not speak for device {device:?} (its `devices` patterns); reading refused{more}"
                    );
                }
            }
            Event::BthomeReplay { link, address, counter, last, log } => {
                Metrics::inc(&m.bthome_replays);
                if let Some(held) = log {
                    let more = if held > 0 { format!(" ({held} more since the last report)") } else { String::new() };
                    warn!(
                        "ble {link}: encrypted advert from {address} with counter {counter}, not newer than {last}: \
                         refused as a replay{more} (a device that reset its counter: see docs/security.md, M5)"
                    );
                }
            }
            Event::LanClientEnded { listener, client_id, peer, user, why } => {
                let who = format!("broker {listener}: {client_id:?} ({peer})");
                match why {
                    Ended::Closed => debug!("{who} disconnected"),
                    Ended::Malformed => warn!("{who} sent a malformed packet; disconnected"),
                    Ended::Denied(topic) => {
                        m.acl_denied(user, "publish");
                        Metrics::inc(&m.broker_denied_publishes);
                        warn!("{who} may not publish to {topic:?}; disconnected");
                    }
                    Ended::TooBig(n) => {
                        Metrics::inc(&m.broker_denied_publishes);
                        warn!("{who} sent a {n}-byte packet over max_payload; disconnected");
                    }
                    Ended::EmptyTopic => {
                        Metrics::inc(&m.broker_denied_publishes);
                        warn!("{who} published to an empty topic (or a topic alias); disconnected");
                    }
                    Ended::TooManyDevices(what) => {
                        Metrics::inc(&m.broker_denied_publishes);
                        warn!("{who} published for more than {what} as user {user:?}; disconnected");
                    }
                    Ended::NotItsDevice(device) => {
                        Metrics::inc(&m.broker_denied_publishes);
                        Metrics::inc(&m.readings_refused_lan);
                        warn!(
                            device = device.as_str(),
                            "{who} published for device {device:?}, which user {user:?} may not speak for; disconnected"
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_counts_what_it_logs() {
        let m = Metrics::default();
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let lan =
            |why: &Ended| Event::LanClientEnded { listener: "tcp", client_id: "c", peer, user: "u", why }.emit(&m);
        lan(&Ended::Closed);
        lan(&Ended::Malformed);
        assert_eq!(Metrics::get(&m.broker_denied_publishes), 0);
        lan(&Ended::Denied("x".into()));
        lan(&Ended::TooBig(9));
        assert_eq!(Metrics::get(&m.broker_denied_publishes), 2);
        assert_eq!(m.acl_denials().get(&("u".to_string(), "publish")), Some(&1));
        Event::BatchDeadLettered { id: 4, readings: 7, why: "w", store: Path::new("d"), store_batches: 3 }.emit(&m);
        assert_eq!(
            (
                Metrics::get(&m.batches_dead_lettered),
                Metrics::get(&m.readings_dead_lettered),
                Metrics::get(&m.dead_letter_batches)
            ),
            (1, 7, 3)
        );
        Event::PubrecLogReset { was: None, identity: "i", entries: 5 }.emit(&m);
        assert_eq!((Metrics::get(&m.pubrec_log_resets), Metrics::get(&m.batches_resent_session_lost)), (1, 5));
    }
}
