//! [`Metrics`] as Prometheus text (exposition format 0.0.4).
//!
//! Every family is named `edge_gateway_*`. Per-device and per-link families
//! carry `source` (`serial`, `ble`, `lan`) and `device` / `link` labels.

use super::Metrics;
use super::status::link_source;
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

pub fn render(s: &Snapshot<'_>) -> String {
    let m = s.metrics;
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

    // Device clocks (sources that see a device's own ts).
    let offsets = m.clock_offsets();
    o.family(
        "device_clock_offset_milliseconds",
        "gauge",
        "A device's clock minus the gateway's (its ts minus receive time, smoothed; negative = behind).",
    );
    for (device, ms) in &offsets {
        o.sample("device_clock_offset_milliseconds", &[("device", device)], ms);
    }

    // Rules, per rule name.
    let rules = m.rules();
    let per_rule: [(&str, &str, fn(&crate::rules::RuleCounts) -> u64); 5] = [
        ("rule_matched_total", "Readings a rule matched (its match and when).", |c| c.matched),
        ("rule_dropped_total", "Readings a rule dropped (filter, downsample skip, late with keep_raw = false).", |c| {
            c.dropped
        }),
        ("rule_emitted_total", "Readings an aggregate rule emitted.", |c| c.emitted),
        ("rule_late_total", "Readings that came after their aggregate window closed (not counted in it).", |c| c.late),
        ("rule_errors_total", "Conditions that failed to evaluate for a reading (taken as false).", |c| c.errors),
    ];
    for (family, help, get) in per_rule {
        o.family(family, "counter", help);
        for (name, c) in &rules {
            o.sample(family, &[("rule", name)], get(c));
        }
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

    o.family("broker_acl_denied_total", "counter", "LAN MQTT publishes and subscriptions the ACL denied, per user.");
    for ((user, action), n) in &m.acl_denials() {
        o.sample("broker_acl_denied_total", &[("user", user), ("action", action)], *n);
    }

    // What the snapshot knows beyond the counters.
    let age = s.queue.oldest_created_ms.map(|t| s.now_ms.saturating_sub(t) as f64 / 1000.0).unwrap_or(0.0);
    o.one("uptime_seconds", "gauge", "Seconds since the gateway started.", format!("{:.1}", s.uptime_s));
    o.one("queue_batches", "gauge", "Batches queued and not yet delivered.", s.queue.batches);
    o.one("queue_readings", "gauge", "Readings queued and not yet delivered.", s.queue.readings);
    o.one("queue_bytes", "gauge", "Bytes queued and not yet delivered.", s.queue.bytes);
    o.one("queue_max_bytes", "gauge", "The queue's configured limit (store.max_bytes).", s.queue_max_bytes);
    o.one("queue_oldest_age_seconds", "gauge", "Age of the oldest undelivered batch.", format!("{age:.1}"));
    let lane_age =
        |t: Option<u64>| format!("{:.1}", t.map(|t| s.now_ms.saturating_sub(t) as f64 / 1000.0).unwrap_or(0.0));
    o.family("lane_queued_readings", "gauge", "Readings queued and not yet delivered, per rules lane.");
    o.sample("lane_queued_readings", &[("lane", "alarm")], s.queue.priority_readings);
    o.sample("lane_queued_readings", &[("lane", "bulk")], s.queue.readings.saturating_sub(s.queue.priority_readings));
    o.family("lane_oldest_age_seconds", "gauge", "Age of the oldest undelivered batch, per rules lane.");
    o.sample("lane_oldest_age_seconds", &[("lane", "alarm")], lane_age(s.queue.priority_oldest_created_ms));
    o.sample("lane_oldest_age_seconds", &[("lane", "bulk")], lane_age(s.queue.bulk_oldest_created_ms));

    // The counter table, row by row; rows of one family follow each other.
    let mut declared = "";
    for def in super::TABLE {
        if def.family != declared {
            o.family(def.family, def.kind.as_str(), def.help);
            declared = def.family;
        }
        o.sample(def.family, def.labels, Metrics::get((def.get)(m)));
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
            queue: QueueStatus {
                batches: 2,
                readings: 9,
                bytes: 100,
                oldest_created_ms: Some(1_000),
                ..Default::default()
            },
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
