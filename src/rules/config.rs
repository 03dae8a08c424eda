//! `[[rules]]`: what an operator writes (see docs/rules.md for the whole story).
//!
//! ```toml
//! [[rules]]
//! name = "hr-alarm"
//! match = { sensor = "heart_rate" }   # device, sensor, source: exact or glob
//! when = "value > 180"                # optional condition (evalexpr)
//! lane = "alarm"
//! route = ["gateways/{gateway}/alarms"]
//! ```
//!
//! Each rule has one or more actions: `filter`, `transform`, `route`,
//! `lane`, `downsample`, `aggregate`. [`validate`] checks everything serde
//! cannot (names, one downsample mode, conditions compile), naming the key.

use crate::units::de_duration;
use serde::{Deserialize, Deserializer};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    /// Which readings the rule looks at; every one when empty.
    #[serde(rename = "match", default)]
    pub matches: MatchConfig,
    /// A condition on the reading (`value`, `device`, `sensor`, `ts`, `seq`),
    /// e.g. `value > 180` or `len(value) == 3`.
    #[serde(default)]
    pub when: Option<String>,
    /// Drop what matches.
    #[serde(default)]
    pub filter: bool,
    #[serde(default)]
    pub transform: Option<TransformConfig>,
    /// Upstream topics instead of the default readings topic; `{gateway}`,
    /// `{device}`, `{sensor}` are filled in.
    #[serde(default)]
    pub route: Vec<String>,
    #[serde(default)]
    pub lane: Option<Lane>,
    #[serde(default)]
    pub downsample: Option<DownsampleConfig>,
    #[serde(default)]
    pub aggregate: Option<AggregateConfig>,
    /// Whether matching readings are republished on the LAN broker
    /// (`[broker] republish`, which is on by default): `false` keeps them
    /// off it, `true` puts them back. Without rules every accepted reading
    /// is; with rules, what the rules emit is (transformed, aggregates too).
    #[serde(default)]
    pub republish: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    #[serde(default)]
    pub device: Option<String>,
    #[serde(default)]
    pub sensor: Option<String>,
    /// `serial`, `ble` or `lan` (or a glob of them).
    #[serde(default)]
    pub source: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    /// New sensor name.
    #[serde(default)]
    pub rename: Option<String>,
    /// `value * scale + offset` (each element of an array).
    #[serde(default)]
    pub scale: Option<f64>,
    #[serde(default)]
    pub offset: Option<f64>,
    /// Round to this many decimals (after scale and offset).
    #[serde(default)]
    pub round: Option<u32>,
    /// Keep only this element of an array value (0-based): the value becomes a number.
    #[serde(default)]
    pub pick: Option<usize>,
}

/// Which upstream lane a reading travels in.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    #[default]
    Bulk,
    Alarm,
}

impl Lane {
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Bulk => "bulk",
            Lane::Alarm => "alarm",
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DownsampleConfig {
    /// At most one reading per interval of device time.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub every: Option<Duration>,
    /// Only when the value moved by at least this much since the last one kept.
    #[serde(default)]
    pub deadband: Option<f64>,
    /// Only when the value differs from the last one kept.
    #[serde(default)]
    pub on_change: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// Tumbling window length, by device time.
    #[serde(deserialize_with = "de_duration")]
    pub window: Duration,
    pub emit: Vec<Stat>,
    /// Whether the readings also go on as they are (default true).
    #[serde(default = "yes")]
    pub keep_raw: bool,
    /// How long (device time) after its end a window still takes
    /// readings: it closes once a reading of the series is this far past
    /// its end. Later readings are late: not counted (`rule_late_total`).
    /// Default: the window length.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub lateness: Option<Duration>,
    /// Open windows of a series with no reading for this long (gateway
    /// clock) are closed. Default: window + lateness.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub idle_close: Option<Duration>,
}

/// `[lanes]`: what happens to each lane's readings upstream.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LanesConfig {
    #[serde(default)]
    pub alarm: LaneConfig,
    #[serde(default)]
    pub bulk: LaneConfig,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LaneConfig {
    /// Readings not sent upstream this long after they were queued are
    /// dropped and counted (`lane_expired_readings_total`). Absent: kept
    /// until delivered.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub ttl: Option<Duration>,
    /// The order a backlog drains in (bulk lane only; alarms always go in
    /// order, ahead of any backlog).
    #[serde(default)]
    pub drain: Drain,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Drain {
    /// FIFO: the queue's order.
    #[default]
    OldestFirst,
    /// FILO: the newest batches of a backlog first, the live ones ahead of
    /// everything older (see `uplink::fill`).
    NewestFirst,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stat {
    Count,
    Min,
    Max,
    Mean,
    Sum,
    Last,
    P50,
    P95,
}

impl Stat {
    pub fn as_str(self) -> &'static str {
        match self {
            Stat::Count => "count",
            Stat::Min => "min",
            Stat::Max => "max",
            Stat::Mean => "mean",
            Stat::Sum => "sum",
            Stat::Last => "last",
            Stat::P50 => "p50",
            Stat::P95 => "p95",
        }
    }
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// Checks serde cannot express; returns the offending key (`rules.N.key`).
pub fn validate(rules: &[RuleConfig]) -> Result<(), (String, String)> {
    let mut names = std::collections::HashSet::new();
    // A reading's topics are one queue record's ids (its span).
    let routes: usize = rules.iter().map(|r| r.route.len()).sum();
    if routes > crate::queue::MAX_SPAN as usize {
        let i = rules.iter().rposition(|r| !r.route.is_empty()).expect("some route");
        return Err((
            format!("rules.{i}.route"),
            format!(
                "{routes} route topics in all: at most {} (a reading's copies are one queue record)",
                crate::queue::MAX_SPAN
            ),
        ));
    }
    for (i, r) in rules.iter().enumerate() {
        let key = |k: &str| format!("rules.{i}.{k}");
        if r.name.is_empty()
            || r.name.len() > 64
            || !r.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err((key("name"), "must be 1-64 characters of letters, digits, '-', '_' or '.'".into()));
        }
        if !names.insert(r.name.as_str()) {
            return Err((key("name"), format!("{:?} names two rules: each rule needs its own name", r.name)));
        }
        let actions = [
            r.filter,
            r.transform.is_some(),
            !r.route.is_empty(),
            r.lane.is_some(),
            r.downsample.is_some(),
            r.aggregate.is_some(),
            r.republish.is_some(),
        ];
        if !actions.contains(&true) {
            return Err((
                key("name"),
                format!(
                    "rule {:?} does nothing: give it filter, transform, route, lane, downsample, aggregate or republish",
                    r.name
                ),
            ));
        }
        if r.filter && actions.iter().filter(|a| **a).count() > 1 {
            return Err((key("filter"), "a filter rule drops what it matches: it can have no other action".into()));
        }
        if let Some(w) = &r.when {
            super::expr::Condition::compile(w).map_err(|e| (key("when"), e))?;
        }
        if let Some(t) = &r.transform {
            if t == &TransformConfig::default() {
                return Err((key("transform"), "is empty: give rename, scale, offset, round or pick".into()));
            }
            if let Some(n) = &t.rename
                && (n.is_empty() || n.len() > 128)
            {
                return Err((key("transform"), "rename must be 1-128 characters".into()));
            }
            if t.scale.is_some_and(|s| !s.is_finite()) || t.offset.is_some_and(|s| !s.is_finite()) {
                return Err((key("transform"), "scale and offset must be finite numbers".into()));
            }
            if t.round.is_some_and(|r| r > 12) {
                return Err((key("transform"), "round takes 0-12 decimals".into()));
            }
        }
        for (j, t) in r.route.iter().enumerate() {
            if let Err(m) = check_topic_template(t) {
                return Err((format!("rules.{i}.route.{j}"), m));
            }
        }

        if let Some(d) = &r.downsample {
            let modes = [d.every.is_some(), d.deadband.is_some(), d.on_change].iter().filter(|m| **m).count();
            if modes != 1 {
                return Err((key("downsample"), "give exactly one of every, deadband or on_change = true".into()));
            }
            if d.every.is_some_and(|e| e.is_zero()) {
                return Err((key("downsample"), "every must be greater than 0".into()));
            }
            if d.deadband.is_some_and(|b| !(b.is_finite() && b >= 0.0)) {
                return Err((key("downsample"), "deadband must be a number >= 0".into()));
            }
        }
        if let Some(a) = &r.aggregate {
            if a.window < Duration::from_millis(1) {
                return Err((key("aggregate"), "window must be at least 1ms".into()));
            }
            if a.emit.is_empty() {
                return Err((
                    key("aggregate"),
                    "emit needs at least one of count, min, max, mean, sum, last, p50, p95".into(),
                ));
            }
            if a.idle_close.is_some_and(|d| d.is_zero()) {
                return Err((key("aggregate"), "idle_close must be greater than 0".into()));
            }
        }
        if let Some(s) = &r.matches.source
            && !["serial", "ble", "lan"].iter().any(|k| crate::allow::glob(s, k))
        {
            return Err((key("match"), format!("source {s:?} matches none of serial, ble, lan")));
        }
    }
    Ok(())
}

/// An upstream topic template: an MQTT topic name (no wildcards) once
/// `{gateway}`, `{device}` and `{sensor}` are filled in.
fn check_topic_template(t: &str) -> Result<(), String> {
    if t.is_empty() || t.len() > 1024 {
        return Err("a route topic must be 1-1024 bytes".into());
    }
    if t.contains(['+', '#', '\0']) {
        return Err(format!("{t:?}: a route is a topic name, without '+', '#' or NUL"));
    }
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        let close = rest[open..].find('}').ok_or_else(|| format!("{t:?}: '{{' without '}}'"))? + open;
        let name = &rest[open + 1..close];
        if !["gateway", "device", "sensor"].contains(&name) {
            return Err(format!("{t:?}: unknown placeholder {{{name}}} (use {{gateway}}, {{device}}, {{sensor}})"));
        }
        rest = &rest[close + 1..];
    }
    Ok(())
}
