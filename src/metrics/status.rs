//! One [`GatewayStatus`] snapshot, taken by a [`Probe`], feeds all three
//! places that say how the gateway is: the `STATUS=` line `systemctl status`
//! shows ([`GatewayStatus::line`]), the broker's retained status JSON (the
//! struct, serialised), and `edge-gateway status`, which reads the same JSON
//! from `/status` and prints [`GatewayStatus::report`].

use super::Metrics;
use super::render::{Snapshot, render};
use crate::queue::Queue;
use crate::reading::now_ms;
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What the status is read from: made once by `app`, cloned to the
/// heartbeat, the broker's publisher and the HTTP server.
#[derive(Clone)]
pub struct Probe {
    pub gateway: String,
    pub metrics: Arc<Metrics>,
    pub queue: Arc<Mutex<Queue>>,
    /// `store.max_bytes`.
    pub max_bytes: u64,
    pub started: Instant,
}

impl Probe {
    fn with<R>(&self, f: impl FnOnce(&Snapshot<'_>) -> R) -> R {
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner()).status();
        f(&Snapshot {
            metrics: &self.metrics,
            gateway: &self.gateway,
            queue,
            queue_max_bytes: self.max_bytes,
            uptime_s: self.started.elapsed().as_secs_f64(),
            now_ms: now_ms(),
        })
    }

    pub fn take(&self) -> GatewayStatus {
        self.with(GatewayStatus::of)
    }

    /// The Prometheus page (`/metrics`).
    pub fn page(&self) -> String {
        self.with(render)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Upstream {
    #[serde(rename = "not configured")]
    NotConfigured,
    #[serde(rename = "disconnected")]
    Disconnected,
    #[serde(rename = "connected")]
    Connected,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueView {
    pub batches: u64,
    pub readings: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub oldest_age_s: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    pub batches: u64,
    pub readings: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readings {
    pub accepted: u64,
    pub duplicates_dropped: u64,
    pub malformed: u64,
    /// Lost or refused by the queue-full policy.
    pub dropped_queue_full: u64,
}

/// A serial port or a BLE device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// `serial` or `ble`.
    pub source: String,
    pub link: String,
    pub up: bool,
    pub readings: u64,
    pub malformed: u64,
    pub reconnects: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub source: String,
    pub device: String,
    pub readings: u64,
    pub duplicates: u64,
}

/// How the gateway is, at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayStatus {
    pub gateway: String,
    pub version: String,
    /// When it was taken (ms since the Unix epoch).
    pub ts: u64,
    pub uptime_s: u64,
    pub upstream: Upstream,
    pub upstream_connects: u64,
    pub upstream_connect_failures: u64,
    pub delivered: Delivered,
    pub queue: QueueView,
    pub readings: Readings,
    pub lan_clients: u64,
    pub links: Vec<Link>,
    pub devices: Vec<Device>,
}

/// `ble:NAME` ports are BLE links; the rest are serial ports.
pub(super) fn link_source(port: &str) -> (&'static str, &str) {
    match port.strip_prefix("ble:") {
        Some(name) => ("ble", name),
        None => ("serial", port),
    }
}

impl GatewayStatus {
    pub fn of(s: &Snapshot<'_>) -> GatewayStatus {
        let m = s.metrics;
        let g = |c| Metrics::get(c);
        let ports = m.ports();
        let malformed =
            ports.values().map(|p| p.malformed).sum::<u64>() + m.topics().values().map(|t| t.malformed).sum::<u64>();
        GatewayStatus {
            gateway: s.gateway.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ts: s.now_ms,
            uptime_s: s.uptime_s as u64,
            upstream: match (g(&m.upstream_configured) > 0, g(&m.upstream_connected) > 0) {
                (false, _) => Upstream::NotConfigured,
                (true, false) => Upstream::Disconnected,
                (true, true) => Upstream::Connected,
            },
            upstream_connects: g(&m.upstream_connects),
            upstream_connect_failures: g(&m.upstream_connect_failures),
            delivered: Delivered { batches: g(&m.batches_delivered), readings: g(&m.readings_delivered) },
            queue: QueueView {
                batches: s.queue.batches,
                readings: s.queue.readings,
                bytes: s.queue.bytes,
                max_bytes: s.queue_max_bytes,
                oldest_age_s: s.queue.oldest_created_ms.map_or(0.0, |t| s.now_ms.saturating_sub(t) as f64 / 1000.0),
            },
            readings: Readings {
                accepted: g(&m.readings_accepted),
                duplicates_dropped: g(&m.duplicates_dropped),
                malformed,
                dropped_queue_full: g(&m.readings_dropped_full) + g(&m.readings_rejected_full),
            },
            lan_clients: g(&m.broker_connections),
            links: ports
                .iter()
                .map(|(port, c)| {
                    let (source, link) = link_source(port);
                    Link {
                        source: source.to_string(),
                        link: link.to_string(),
                        up: c.connected,
                        readings: c.readings,
                        malformed: c.malformed,
                        reconnects: c.reconnects,
                    }
                })
                .collect(),
            devices: m
                .devices()
                .into_iter()
                .map(|((source, device), c)| Device {
                    source: source.to_string(),
                    device,
                    readings: c.readings,
                    duplicates: c.duplicates,
                })
                .collect(),
        }
    }

    /// Unhealthy: the upstream is configured but not connected, a
    /// configured link is down, or the queue is 90 % full.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.upstream == Upstream::Disconnected {
            problems.push("upstream disconnected".to_string());
        }
        let full = self.queue_full_percent();
        if full >= 90.0 {
            problems.push(format!("queue {full:.0}% full"));
        }
        for l in self.links.iter().filter(|l| !l.up) {
            problems.push(format!("{} {} down", l.source, l.link));
        }
        problems
    }

    fn queue_full_percent(&self) -> f64 {
        let q = &self.queue;
        if q.max_bytes > 0 { 100.0 * q.bytes as f64 / q.max_bytes as f64 } else { 0.0 }
    }

    /// The one line `systemctl status` shows (`STATUS=`); `rate` is readings
    /// per second in, measured by the caller between two snapshots.
    pub fn line(&self, rate: f64) -> String {
        format!(
            "{rate:.0} readings/s in, {} duplicates dropped; queue {} batches ({} KiB, oldest {} s); upstream {}, {} readings delivered; links {}/{} up",
            self.readings.duplicates_dropped,
            self.queue.batches,
            self.queue.bytes / 1024,
            self.queue.oldest_age_s as u64,
            self.upstream.as_str(),
            self.delivered.readings,
            self.links.iter().filter(|l| l.up).count(),
            self.links.len()
        )
    }

    /// The table `edge-gateway status` prints, and its verdict.
    pub fn report(&self) -> Report {
        let problems = self.problems();
        let mut t = String::new();
        let _ = writeln!(
            t,
            "edge-gateway {} (version {}), up {}",
            self.gateway,
            self.version,
            humantime::format_duration(std::time::Duration::from_secs(self.uptime_s))
        );
        let upstream = match self.upstream {
            Upstream::NotConfigured => "not configured (batches stay queued)".to_string(),
            u => format!(
                "{}, {} connects, {} failed attempts",
                if u == Upstream::Connected { "connected" } else { "DISCONNECTED" },
                self.upstream_connects,
                self.upstream_connect_failures
            ),
        };
        let _ = writeln!(t, "  upstream   {upstream}");
        let _ = writeln!(t, "  delivered  {} batches, {} readings", self.delivered.batches, self.delivered.readings);
        let q = &self.queue;
        let _ = writeln!(
            t,
            "  queue      {} batches, {} readings, {} of {} bytes ({:.1}%), oldest {:.1} s",
            q.batches,
            q.readings,
            q.bytes,
            q.max_bytes,
            self.queue_full_percent(),
            q.oldest_age_s
        );
        let r = &self.readings;
        let _ = writeln!(
            t,
            "  readings   {} accepted, {} duplicates dropped, {} malformed, {} dropped by the queue-full policy",
            r.accepted, r.duplicates_dropped, r.malformed, r.dropped_queue_full
        );
        if !self.links.is_empty() {
            let _ = writeln!(
                t,
                "\n  {:<24} {:<7} {:<5} {:>10} {:>10} {:>10}",
                "LINK", "SOURCE", "STATE", "READINGS", "MALFORMED", "RECONNECTS"
            );
            for l in &self.links {
                let _ = writeln!(
                    t,
                    "  {:<24} {:<7} {:<5} {:>10} {:>10} {:>10}",
                    l.link,
                    l.source,
                    if l.up { "up" } else { "DOWN" },
                    l.readings,
                    l.malformed,
                    l.reconnects
                );
            }
        }
        if !self.devices.is_empty() {
            let _ = writeln!(t, "\n  {:<24} {:<7} {:>10} {:>10}", "DEVICE", "SOURCE", "READINGS", "DUPLICATES");
            for d in &self.devices {
                let _ = writeln!(t, "  {:<24} {:<7} {:>10} {:>10}", d.device, d.source, d.readings, d.duplicates);
            }
        }
        let healthy = problems.is_empty();
        let _ = writeln!(
            t,
            "\nhealth: {}",
            if healthy { "ok".to_string() } else { format!("UNHEALTHY: {}", problems.join("; ")) }
        );
        Report { healthy, problems, text: t }
    }
}

impl Upstream {
    pub fn as_str(self) -> &'static str {
        match self {
            Upstream::NotConfigured => "not configured",
            Upstream::Disconnected => "disconnected",
            Upstream::Connected => "connected",
        }
    }
}

/// The verdict and the table.
pub struct Report {
    pub healthy: bool,
    pub problems: Vec<String>,
    pub text: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::QueueStatus;

    /// The status as `edge-gateway status` gets it: through JSON.
    fn fetched(m: &Metrics, upstream: bool, queue_bytes: u64) -> GatewayStatus {
        Metrics::set(&m.upstream_configured, u64::from(upstream));
        let st = GatewayStatus::of(&Snapshot {
            metrics: m,
            gateway: "gw-1",
            queue: QueueStatus {
                batches: 1,
                readings: 3,
                bytes: queue_bytes,
                oldest_created_ms: Some(500),
                ..Default::default()
            },
            queue_max_bytes: 1000,
            uptime_s: 65.0,
            now_ms: 2_000,
        });
        let back: GatewayStatus = serde_json::from_slice(&serde_json::to_vec(&st).unwrap()).unwrap();
        assert_eq!(back, st);
        back
    }

    #[test]
    fn one_snapshot_three_views_and_the_verdicts() {
        let m = Metrics::default();
        m.port("dock \"0\"", |c| {
            c.connected = true;
            c.readings = 12;
        });
        Metrics::add(&m.readings_accepted, 12);
        let st = fetched(&m, false, 10);
        let r = st.report();
        assert!(r.healthy, "{}", r.text);
        assert!(r.text.contains("dock \"0\""), "{}", r.text);
        assert!(r.text.contains("edge-gateway gw-1"), "{}", r.text);
        assert!(r.text.contains("oldest 1.5 s"), "{}", r.text);
        assert_eq!(
            st.line(4.0),
            "4 readings/s in, 0 duplicates dropped; queue 1 batches (0 KiB, oldest 1 s); upstream not configured, 0 readings delivered; links 1/1 up"
        );
        let json: serde_json::Value = serde_json::to_value(&st).unwrap();
        assert_eq!(json["upstream"], "not configured");
        assert_eq!(json["links"][0]["up"], true);
        assert_eq!(json["readings"]["accepted"], 12);

        // Upstream configured but down, a link down, queue nearly full.
        m.port("ble:strap", |c| c.connected = false);
        let r = fetched(&m, true, 950).report();
        assert!(!r.healthy);
        assert_eq!(r.problems, vec!["upstream disconnected", "queue 95% full", "ble strap down"], "{}", r.text);
        Metrics::set(&m.upstream_connected, 1);
        m.forget_port("ble:strap");
        assert!(fetched(&m, true, 10).report().healthy);
    }
}
