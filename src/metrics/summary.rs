//! The counters, once, in the log at exit: what a test or an operator
//! reading the journal after a restart wants to know. The lines and their
//! words come from the counter table ([`super::TABLE`]).

use super::{Line, Metrics, TABLE};

/// `stopped: 40 readings accepted, 3 duplicates dropped, …`: every counter
/// of `line`, or `None` when the line is not worth logging (the uplink or
/// the broker never did anything).
pub fn line(m: &Metrics, line: Line) -> Option<String> {
    let rows: Vec<(u64, &str)> = TABLE
        .iter()
        .filter_map(|d| match d.summary {
            Some((l, words)) if l == line => Some((Metrics::get((d.get)(m)), words)),
            _ => None,
        })
        .collect();
    if line != Line::Stopped && rows.iter().all(|(v, _)| *v == 0) {
        return None;
    }
    let head = match line {
        Line::Stopped => "stopped",
        Line::Uplink => "uplink",
        Line::Broker => "broker",
    };
    let body: Vec<String> = rows.iter().map(|(v, words)| format!("{v} {words}")).collect();
    Some(format!("{head}: {}", body.join(", ")))
}

pub fn log(m: &Metrics) {
    for (name, c) in m.ports() {
        tracing::info!("port {name}: {} readings, {} malformed, {} reconnects", c.readings, c.malformed, c.reconnects);
    }
    for (topic, c) in m.topics() {
        tracing::info!("mqtt topic {topic}: {} readings, {} malformed", c.readings, c.malformed);
    }
    for l in [Line::Broker, Line::Stopped, Line::Uplink] {
        if let Some(text) = line(m, l) {
            tracing::info!("{text}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_from_the_table() {
        let m = Metrics::default();
        Metrics::add(&m.readings_accepted, 40);
        Metrics::add(&m.readings_dropped_full, 2);
        assert_eq!(line(&m, Line::Uplink), None, "an idle uplink is not logged");
        let stopped = line(&m, Line::Stopped).unwrap();
        assert!(stopped.starts_with("stopped: 40 readings accepted, 0 duplicates dropped"), "{stopped}");
        assert!(stopped.contains(", 2 readings dropped (queue full),"), "{stopped}");
        Metrics::inc(&m.batches_refused);
        let uplink = line(&m, Line::Uplink).unwrap();
        assert!(uplink.contains(", 1 refused by the broker,"), "{uplink}");
    }
}
