//! The counters, once, in the log at exit.

use super::Metrics;

/// The counters, once, at exit: what a test or an operator reading the
/// journal after a restart wants to know.
pub fn log(m: &Metrics) {
    for (name, c) in m.ports() {
        tracing::info!("port {name}: {} readings, {} malformed, {} reconnects", c.readings, c.malformed, c.reconnects);
    }
    for (topic, c) in m.topics() {
        tracing::info!("mqtt topic {topic}: {} readings, {} malformed", c.readings, c.malformed);
    }
    if Metrics::get(&m.broker_refused) + Metrics::get(&m.readings_republished) > 0 {
        tracing::info!(
            "broker: {} connections refused, {} clients disconnected for a forbidden publish, {} readings republished, {} not republished (behind)",
            Metrics::get(&m.broker_refused),
            Metrics::get(&m.broker_denied_publishes),
            Metrics::get(&m.readings_republished),
            Metrics::get(&m.republish_dropped),
        );
    }
    tracing::info!(
        "stopped: {} readings accepted, {} duplicates dropped, {} batches queued, {} readings dropped (queue full), {} readings refused (queue full), {} acks sent",
        Metrics::get(&m.readings_accepted),
        Metrics::get(&m.duplicates_dropped),
        Metrics::get(&m.batches_queued),
        Metrics::get(&m.readings_dropped_full),
        Metrics::get(&m.readings_rejected_full),
        Metrics::get(&m.acks_sent),
    );
    if Metrics::get(&m.upstream_connects) + Metrics::get(&m.upstream_connect_failures) > 0 {
        tracing::info!(
            "uplink: {} batches ({} readings) delivered, {} connects, {} failed attempts, {} PUBLISH re-sent with DUP, {} PUBREL re-sent, {} batches re-sent after a lost session, {} refused by the broker, {} too large, {} corrupt skipped",
            Metrics::get(&m.batches_delivered),
            Metrics::get(&m.readings_delivered),
            Metrics::get(&m.upstream_connects),
            Metrics::get(&m.upstream_connect_failures),
            Metrics::get(&m.publishes_resent_dup),
            Metrics::get(&m.pubrels_resent),
            Metrics::get(&m.batches_resent_session_lost),
            Metrics::get(&m.batches_refused),
            Metrics::get(&m.batches_too_large),
            Metrics::get(&m.batches_corrupt_skipped),
        );
    }
}
