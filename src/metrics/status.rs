//! `edge-gateway status`: read `/metrics` back and print a small table for
//! a person on the Pi, with a verdict that scripts can test.

use std::collections::BTreeMap;
use std::fmt::Write;

/// One sample of the text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parse Prometheus text (what [`super::render`] writes; enough of the
/// format for that: no timestamps, no exemplars).
pub fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (head, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = match head.split_once('{') {
            Some((n, rest)) => (n, parse_labels(rest.trim_end_matches('}'))),
            None => (head, BTreeMap::new()),
        };
        out.push(Sample { name: name.to_string(), labels, value });
    }
    out
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            break;
        }
        let mut val = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => val.push('\n'),
                    Some(c) => val.push(c),
                    None => break,
                },
                '"' => break,
                c => val.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').to_string(), val);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    out
}

/// The verdict and the table.
pub struct Report {
    pub healthy: bool,
    pub problems: Vec<String>,
    pub text: String,
}

const P: &str = "edge_gateway_";

fn get(samples: &[Sample], name: &str) -> f64 {
    samples.iter().find(|s| s.name.strip_prefix(P) == Some(name) && s.labels.is_empty()).map(|s| s.value).unwrap_or(0.0)
}

fn labelled<'a>(samples: &'a [Sample], name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
    samples.iter().filter(move |s| s.name.strip_prefix(P) == Some(name))
}

fn label<'a>(s: &'a Sample, k: &str) -> &'a str {
    s.labels.get(k).map(String::as_str).unwrap_or("")
}

/// Build the report. Unhealthy: the upstream is configured but not
/// connected, a configured link is down, or the queue is 90 % full.
pub fn report(samples: &[Sample]) -> Report {
    let mut problems = Vec::new();
    let mut t = String::new();
    let info = labelled(samples, "info").next();
    let _ = writeln!(
        t,
        "edge-gateway {} (version {}), up {}",
        info.map(|s| label(s, "gateway")).unwrap_or("?"),
        info.map(|s| label(s, "version")).unwrap_or("?"),
        humantime::format_duration(std::time::Duration::from_secs(get(samples, "uptime_seconds") as u64))
    );

    let configured = get(samples, "upstream_configured") > 0.0;
    let connected = get(samples, "upstream_connected") > 0.0;
    let upstream = if !configured {
        "not configured (batches stay queued)".to_string()
    } else {
        if !connected {
            problems.push("upstream disconnected".to_string());
        }
        format!(
            "{}, {} connects, {} failed attempts",
            if connected { "connected" } else { "DISCONNECTED" },
            get(samples, "upstream_connects_total"),
            get(samples, "upstream_connect_failures_total")
        )
    };
    let _ = writeln!(t, "  upstream   {upstream}");
    let _ = writeln!(
        t,
        "  delivered  {} batches, {} readings",
        get(samples, "batches_delivered_total"),
        get(samples, "readings_delivered_total")
    );
    let (qb, qmax) = (get(samples, "queue_bytes"), get(samples, "queue_max_bytes"));
    let full = if qmax > 0.0 { 100.0 * qb / qmax } else { 0.0 };
    if full >= 90.0 {
        problems.push(format!("queue {full:.0}% full"));
    }
    let _ = writeln!(
        t,
        "  queue      {} batches, {} readings, {} of {} bytes ({full:.1}%), oldest {:.1} s",
        get(samples, "queue_batches"),
        get(samples, "queue_readings"),
        qb,
        qmax,
        get(samples, "queue_oldest_age_seconds")
    );
    let dropped: f64 = labelled(samples, "readings_dropped_total").map(|s| s.value).sum();
    let malformed: f64 = labelled(samples, "malformed_total").map(|s| s.value).sum();
    let _ = writeln!(
        t,
        "  readings   {} accepted, {} duplicates dropped, {malformed} malformed, {dropped} dropped by the queue-full policy",
        get(samples, "readings_accepted_total"),
        get(samples, "duplicates_dropped_total"),
    );

    let links: Vec<&Sample> = labelled(samples, "link_up").collect();
    if !links.is_empty() {
        let _ = writeln!(
            t,
            "\n  {:<24} {:<7} {:<5} {:>10} {:>10} {:>10}",
            "LINK", "SOURCE", "STATE", "READINGS", "MALFORMED", "RECONNECTS"
        );
        for l in links {
            let (source, link) = (label(l, "source"), label(l, "link"));
            let find = |name: &str| {
                labelled(samples, name)
                    .find(|s| label(s, "source") == source && label(s, "link") == link)
                    .map(|s| s.value)
                    .unwrap_or(0.0)
            };
            let up = l.value > 0.0;
            if !up {
                problems.push(format!("{source} {link} down"));
            }
            let _ = writeln!(
                t,
                "  {link:<24} {source:<7} {:<5} {:>10} {:>10} {:>10}",
                if up { "up" } else { "DOWN" },
                find("link_readings_total"),
                find("malformed_total"),
                find("link_reconnects_total")
            );
        }
    }
    let devices: Vec<&Sample> = labelled(samples, "device_readings_total").collect();
    if !devices.is_empty() {
        let _ = writeln!(t, "\n  {:<24} {:<7} {:>10} {:>10}", "DEVICE", "SOURCE", "READINGS", "DUPLICATES");
        for d in devices {
            let (source, device) = (label(d, "source"), label(d, "device"));
            let dups = labelled(samples, "device_duplicates_total")
                .find(|s| label(s, "source") == source && label(s, "device") == device)
                .map(|s| s.value)
                .unwrap_or(0.0);
            let _ = writeln!(t, "  {device:<24} {source:<7} {:>10} {dups:>10}", d.value);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::metrics::render::{Snapshot, render};
    use crate::queue::QueueStatus;

    fn page(m: &Metrics, upstream: bool, queue_bytes: u64) -> String {
        Metrics::set(&m.upstream_configured, u64::from(upstream));
        render(&Snapshot {
            metrics: m,
            gateway: "gw-1",
            queue: QueueStatus { batches: 1, readings: 3, bytes: queue_bytes, oldest_created_ms: None },
            queue_max_bytes: 1000,
            uptime_s: 65.0,
            now_ms: 0,
        })
    }

    #[test]
    fn round_trip_and_verdicts() {
        let m = Metrics::default();
        m.port("dock \"0\"", |c| {
            c.connected = true;
            c.readings = 12;
        });
        let r = report(&parse(&page(&m, false, 10)));
        assert!(r.healthy, "{}", r.text);
        assert!(r.text.contains("dock \"0\""), "{}", r.text);
        assert!(r.text.contains("edge-gateway gw-1"), "{}", r.text);

        // Upstream configured but down, a link down, queue nearly full.
        m.port("ble:strap", |c| c.connected = false);
        let r = report(&parse(&page(&m, true, 950)));
        assert!(!r.healthy);
        assert_eq!(r.problems, vec!["upstream disconnected", "queue 95% full", "ble strap down"], "{}", r.text);
        Metrics::set(&m.upstream_connected, 1);
        m.forget_port("ble:strap");
        assert!(report(&parse(&page(&m, true, 10))).healthy);
    }
}
