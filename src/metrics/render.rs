//! [`Metrics`] as Prometheus text (exposition format 0.0.4).
//!
//! Every family is named `edge_gateway_*`. Per-device and per-link families
//! carry `source` (`serial`, `ble`, `lan`) and `device` / `link` labels.

use super::Metrics;
use crate::queue::QueueStatus;
use std::fmt::Write;

/// What `/metrics` shows beyond the counters: read at scrape time.
pub struct Snapshot<'a> {
    pub metrics: &'a Metrics,
    pub gateway: &'a str,
    pub queue: QueueStatus,
    pub queue_max_bytes: u64,
    pub uptime_s: f64,
    pub now_ms: u64,
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP edge_gateway_{name} {help}\n# TYPE edge_gateway_{name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str("edge_gateway_");
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
    /// A family with one unlabelled sample.
    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// `ble:NAME` ports are BLE links; the rest are serial ports.
fn link_source(port: &str) -> (&'static str, &str) {
    match port.strip_prefix("ble:") {
        Some(name) => ("ble", name),
        None => ("serial", port),
    }
}

pub fn render(s: &Snapshot<'_>) -> String {
    let m = s.metrics;
    let g = |c: &std::sync::atomic::AtomicU64| Metrics::get(c);
    let mut o = Out(String::with_capacity(8192));

    o.family("info", "gauge", "Constant 1, labelled with the version and gateway id.");
    o.sample("info", &[("version", env!("CARGO_PKG_VERSION")), ("gateway", s.gateway)], 1);

    // Readings in, per source and device (as the pipeline saw them).
    let devices = m.devices();
    o.family("device_readings_total", "counter", "Readings accepted, per source and device.");
    for ((source, device), c) in &devices {
        o.sample("device_readings_total", &[("source", source), ("device", device)], c.readings);
    }
    o.family("device_duplicates_total", "counter", "Resent readings dropped by dedup, per source and device.");
    for ((source, device), c) in &devices {
        o.sample("device_duplicates_total", &[("source", source), ("device", device)], c.duplicates);
    }

    // Links: serial ports and BLE devices; LAN topics for malformed input.
    let ports = m.ports();
    let topics = m.topics();
    o.family("link_up", "gauge", "1 while a serial port is open / a BLE device is connected.");
    for (port, c) in &ports {
        let (source, link) = link_source(port);
        o.sample("link_up", &[("source", source), ("link", link)], u8::from(c.connected));
    }
    o.family("link_reconnects_total", "counter", "Connections after the first, per link.");
    for (port, c) in &ports {
        let (source, link) = link_source(port);
        o.sample("link_reconnects_total", &[("source", source), ("link", link)], c.reconnects);
    }
    o.family("link_readings_total", "counter", "Readings parsed, per link (serial port, BLE device, LAN topic).");
    for (port, c) in &ports {
        let (source, link) = link_source(port);
        o.sample("link_readings_total", &[("source", source), ("link", link)], c.readings);
    }
    for (topic, c) in &topics {
        o.sample("link_readings_total", &[("source", "lan"), ("link", topic)], c.readings);
    }
    o.family("malformed_total", "counter", "Malformed frames / payloads counted and skipped, per link.");
    for (port, c) in &ports {
        let (source, link) = link_source(port);
        o.sample("malformed_total", &[("source", source), ("link", link)], c.malformed);
    }
    for (topic, c) in &topics {
        o.sample("malformed_total", &[("source", "lan"), ("link", topic)], c.malformed);
    }

    // Drops by policy and re-sends, labelled by why.
    let age = s.queue.oldest_created_ms.map(|t| s.now_ms.saturating_sub(t) as f64 / 1000.0).unwrap_or(0.0);
    o.family("readings_dropped_total", "counter", "Readings lost to the queue-full policy.");
    o.sample("readings_dropped_total", &[("policy", "drop_oldest")], g(&m.readings_dropped_full));
    o.sample("readings_dropped_total", &[("policy", "reject_new")], g(&m.readings_rejected_full));
    o.family("batches_resent_total", "counter", "Batches sent again, by why.");
    o.sample("batches_resent_total", &[("reason", "dup_publish")], g(&m.publishes_resent_dup));
    o.sample("batches_resent_total", &[("reason", "pubrel")], g(&m.pubrels_resent));
    o.sample("batches_resent_total", &[("reason", "session_lost")], g(&m.batches_resent_session_lost));
    o.sample("batches_resent_total", &[("reason", "refused")], g(&m.batches_refused));

    o.family("broker_acl_denied_total", "counter", "LAN MQTT publishes and subscriptions the ACL denied, per user.");
    for ((user, action), n) in &m.acl_denials() {
        o.sample("broker_acl_denied_total", &[("user", user), ("action", action)], *n);
    }

    // Unlabelled families: (name, type, help, value).
    // A Vec, not an array: its length is not written down (every branch
    // that adds a family used to conflict on it).
    let singles: Vec<(&str, &str, &str, String)> = vec![
        ("uptime_seconds", "gauge", "Seconds since the gateway started.", format!("{:.1}", s.uptime_s)),
        (
            "readings_accepted_total",
            "counter",
            "Readings accepted by dedup, all sources.",
            g(&m.readings_accepted).to_string(),
        ),
        (
            "duplicates_dropped_total",
            "counter",
            "Duplicates dropped by dedup, all sources.",
            g(&m.duplicates_dropped).to_string(),
        ),
        (
            "stale_resends_total",
            "counter",
            "Resends of readings an ack already covered (counted in duplicates_dropped_total too); acked again, not stored.",
            g(&m.stale_resends).to_string(),
        ),
        ("batches_queued_total", "counter", "Batches appended to the queue.", g(&m.batches_queued).to_string()),
        ("queue_commits_total", "counter", "Queue group commits (fsyncs).", g(&m.queue_commits).to_string()),
        ("queue_batches", "gauge", "Batches queued and not yet delivered.", s.queue.batches.to_string()),
        ("queue_readings", "gauge", "Readings queued and not yet delivered.", s.queue.readings.to_string()),
        ("queue_bytes", "gauge", "Bytes queued and not yet delivered.", s.queue.bytes.to_string()),
        ("queue_max_bytes", "gauge", "The queue's configured limit (store.max_bytes).", s.queue_max_bytes.to_string()),
        ("queue_oldest_age_seconds", "gauge", "Age of the oldest undelivered batch.", format!("{age:.1}")),
        (
            "batches_rejected_total",
            "counter",
            "Batches refused by reject_new (not acked; devices resend).",
            g(&m.batches_rejected_full).to_string(),
        ),
        (
            "queue_repaired_bytes_total",
            "counter",
            "Torn bytes cut off the queue tail at start-up.",
            g(&m.queue_repaired_bytes).to_string(),
        ),
        (
            "queue_corrupt_records_total",
            "counter",
            "Corrupt records skipped at start-up.",
            g(&m.queue_corrupt_records).to_string(),
        ),
        ("acks_sent_total", "counter", "Acks written back to devices.", g(&m.acks_sent).to_string()),
        ("upstream_configured", "gauge", "1 when [upstream] is configured.", g(&m.upstream_configured).to_string()),
        ("upstream_connected", "gauge", "1 while the uplink has a session.", g(&m.upstream_connected).to_string()),
        ("upstream_connects_total", "counter", "Sessions established upstream.", g(&m.upstream_connects).to_string()),
        (
            "upstream_connect_failures_total",
            "counter",
            "Failed upstream connection attempts.",
            g(&m.upstream_connect_failures).to_string(),
        ),
        (
            "batches_delivered_total",
            "counter",
            "Batches completed upstream (PUBCOMP/PUBACK).",
            g(&m.batches_delivered).to_string(),
        ),
        ("readings_delivered_total", "counter", "Readings in delivered batches.", g(&m.readings_delivered).to_string()),
        (
            "batches_too_large_total",
            "counter",
            "Batches over the broker's maximum packet size (dropped).",
            g(&m.batches_too_large).to_string(),
        ),
        (
            "batches_corrupt_skipped_total",
            "counter",
            "Corrupt queue records skipped by the uplink.",
            g(&m.batches_corrupt_skipped).to_string(),
        ),
        (
            "batches_dead_lettered_total",
            "counter",
            "Batches refused for good and moved to the dead-letter store.",
            g(&m.batches_dead_lettered).to_string(),
        ),
        (
            "readings_dead_lettered_total",
            "counter",
            "Readings in batches moved to the dead-letter store.",
            g(&m.readings_dead_lettered).to_string(),
        ),
        (
            "dead_letter_batches",
            "gauge",
            "Batches in the dead-letter store (queue dead list/replay/drop).",
            g(&m.dead_letter_batches).to_string(),
        ),
        (
            "pubrec_log_resets_total",
            "counter",
            "PUBREC logs reset because they belonged to another broker or client id.",
            g(&m.pubrec_log_resets).to_string(),
        ),
        (
            "upstream_mqtt_version",
            "gauge",
            "MQTT version of the upstream session (5, 4 = 3.1.1, 0 = none).",
            g(&m.upstream_mqtt_version).to_string(),
        ),
        (
            "upstream_write_timeouts_total",
            "counter",
            "Upstream sessions ended by a write stuck for keep-alive x 1.5.",
            g(&m.upstream_write_timeouts).to_string(),
        ),
        ("broker_connections", "gauge", "LAN MQTT clients connected now.", g(&m.broker_connections).to_string()),
        ("broker_refused_total", "counter", "LAN connections refused.", g(&m.broker_refused).to_string()),
        (
            "broker_denied_publishes_total",
            "counter",
            "LAN publishes refused (ACL or max_payload).",
            g(&m.broker_denied_publishes).to_string(),
        ),
        (
            "broker_login_busy_total",
            "counter",
            "LAN logins refused because the password checks were busy.",
            g(&m.broker_login_busy).to_string(),
        ),
        (
            "broker_acl_filtered_total",
            "counter",
            "Messages not delivered to a LAN client that may not read them.",
            g(&m.broker_acl_filtered).to_string(),
        ),
        (
            "readings_republished_total",
            "counter",
            "Readings republished on the broker.",
            g(&m.readings_republished).to_string(),
        ),
        (
            "republish_dropped_total",
            "counter",
            "Readings not republished (publisher behind).",
            g(&m.republish_dropped).to_string(),
        ),
        ("reloads_total", "counter", "Config reloads applied (SIGHUP).", g(&m.reloads).to_string()),
        (
            "reloads_failed_total",
            "counter",
            "Config reloads refused (invalid config; old one kept).",
            g(&m.reloads_failed).to_string(),
        ),
    ];
    for (name, kind, help, value) in singles {
        o.one(name, kind, help, value);
    }
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_labels_and_escaping() {
        let m = Metrics::default();
        Metrics::set(&m.upstream_configured, 1);
        Metrics::add(&m.batches_delivered, 7);
        m.port("dock0", |c| {
            c.connected = true;
            c.malformed = 2;
        });
        m.port("ble:strap \"1\"", |c| c.readings = 5);
        m.add_devices([(
            ("serial", "wrist-01".to_string()),
            super::super::DeviceCounters { readings: 3, duplicates: 1 },
        )]);
        let text = render(&Snapshot {
            metrics: &m,
            gateway: "gw",
            queue: QueueStatus { batches: 2, readings: 9, bytes: 100, oldest_created_ms: Some(1_000) },
            queue_max_bytes: 1000,
            uptime_s: 1.0,
            now_ms: 3_500,
        });
        assert!(text.contains("edge_gateway_batches_delivered_total 7\n"));
        assert!(text.contains("edge_gateway_link_up{source=\"serial\",link=\"dock0\"} 1\n"));
        assert!(text.contains("edge_gateway_link_readings_total{source=\"ble\",link=\"strap \\\"1\\\"\"} 5\n"));
        assert!(text.contains("edge_gateway_device_readings_total{source=\"serial\",device=\"wrist-01\"} 3\n"));
        assert!(text.contains("edge_gateway_device_duplicates_total{source=\"serial\",device=\"wrist-01\"} 1\n"));
        assert!(text.contains("edge_gateway_queue_oldest_age_seconds 2.5\n"));
        assert!(text.contains("edge_gateway_malformed_total{source=\"serial\",link=\"dock0\"} 2\n"));
        m.acl_denied("", "publish");
        m.acl_denied("nurse", "subscribe");
        m.acl_denied("nurse", "subscribe");
        let text = render(&Snapshot {
            metrics: &m,
            gateway: "gw",
            queue: QueueStatus::default(),
            queue_max_bytes: 1,
            uptime_s: 1.0,
            now_ms: 0,
        });
        assert!(
            text.contains("edge_gateway_broker_acl_denied_total{user=\"nurse\",action=\"subscribe\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("edge_gateway_broker_acl_denied_total{user=\"\",action=\"publish\"} 1\n"), "{text}");
        // Every sample belongs to a family declared once.
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                assert!(declared.insert(rest.split(' ').next().unwrap().to_string()), "declared twice: {line}");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(declared.contains(name), "sample without a family: {line}");
            }
        }
    }
}
