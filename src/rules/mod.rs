//! Rules: filter, transform, route, lane, downsample and aggregate readings,
//! without giving up exactly once (docs/rules.md).
//!
//! ## Where rules run, and why that keeps exactly once
//!
//! Rules run in the pipeline, on each reading dedup accepted, before it is
//! batched. What they decide is stored with the reading, and only then is
//! the reading acked, so every decision is as durable as the reading:
//!
//! * the queue keeps the **raw** reading (what dedup, acks and replay
//!   need), in a record whose [`RecordHeader`] names its upstream topics,
//!   lane and source; transforms are applied again when the uplink drains
//!   it ([`Rules::transform_stored`]), a pure function of the reading;
//! * a reading a `filter`, a downsample skip or a late aggregate reading
//!   with `keep_raw = false` drops is not stored at all: it is acked with
//!   the next commit like any durable reading (dropping it *is* its outcome);
//! * a reading an aggregate consumes with `keep_raw = false` is stored in a
//!   `Hold` record the uplink never sends: it must outlive a crash, or the
//!   window it belongs to would lose it;
//! * when a window closes, every open batch is sealed first and the
//!   window's outputs are appended as a `Derived` record right after: in the
//!   queue, a window's output always comes after every reading it counted
//!   and before any reading that arrived after it closed.
//!
//! Rule state (downsample memory, open windows) is in the pipeline's
//! checkpoint; at start-up the records after the checkpoint are replayed
//! through [`Engine::replay`] / [`Engine::replay_closed`], which rebuild the
//! state without emitting: a window whose `Derived` record is on disk is
//! closed, one whose record was lost in a power cut is still open (and so is
//! every reading after it: a torn tail only cuts whole suffixes), and closes
//! again later. So every output is appended once, and the uplink sends each
//! record exactly once.

pub mod config;
pub mod expr;
mod samples;

use crate::allow::glob;
use crate::reading::{Origin, Reading, RecordHeader, RecordKind, Value};
use config::{AggregateConfig, DownsampleConfig, Lane, RuleConfig, Stat, TransformConfig};
use expr::Condition;
use samples::Samples;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Duration;

pub use config::validate;

/// A downsampled series whose device clock goes back more than this
/// starts afresh (the device reset its clock); less is a resend or
/// reordering, dropped.
pub const CLOCK_RESET_MS: u64 = 3_600_000;

/// Per-rule counts (for `/metrics`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RuleCounts {
    pub matched: u64,
    pub dropped: u64,
    pub emitted: u64,
    /// Aggregate readings that came after their window closed.
    pub late: u64,
    /// Conditions that failed to evaluate (counted as false).
    pub errors: u64,
}

struct Rule {
    name: String,
    device: Option<String>,
    sensor: Option<String>,
    source: Option<String>,
    when: Option<Condition>,
    filter: bool,
    transform: Option<TransformConfig>,
    route: Vec<String>,
    lane: Option<Lane>,
    downsample: Option<DownsampleConfig>,
    aggregate: Option<AggregateConfig>,
    republish: Option<bool>,
    /// `10s` in `heart_rate.mean_10s`.
    window_suffix: String,
}

impl Rule {
    /// Where a matching reading goes: its routes add topics (once each),
    /// its lane and republish settings replace earlier ones.
    fn steer(&self, rules: &Rules, r: &Reading, topics: &mut Vec<String>, lane: &mut Lane, republish: &mut bool) {
        for t in &self.route {
            let t = rules.render(t, r);
            if !topics.contains(&t) {
                topics.push(t);
            }
        }
        if let Some(l) = self.lane {
            *lane = l;
        }
        if let Some(b) = self.republish {
            *republish = b;
        }
    }
}

/// The compiled `[[rules]]`, shared by the pipeline (which decides) and
/// the uplink (which re-applies transforms to what it drains).
pub struct Rules {
    rules: Vec<Rule>,
    gateway: String,
}

impl Rules {
    /// Compile validated rule configs (see [`config::validate`]).
    pub fn compile(cfgs: &[RuleConfig], gateway: &str) -> Result<Rules, String> {
        let mut rules = Vec::with_capacity(cfgs.len());
        for c in cfgs {
            let when = match &c.when {
                Some(w) => Some(Condition::compile(w).map_err(|e| format!("rule {:?}: when: {e}", c.name))?),
                None => None,
            };
            rules.push(Rule {
                name: c.name.clone(),
                device: c.matches.device.clone(),
                sensor: c.matches.sensor.clone(),
                source: c.matches.source.clone(),
                when,
                filter: c.filter,
                transform: c.transform.clone(),
                route: c.route.clone(),
                lane: c.lane,
                downsample: c.downsample.clone(),
                aggregate: c.aggregate.clone(),
                republish: c.republish,
                window_suffix: c.aggregate.as_ref().map(|a| window_suffix(a.window)).unwrap_or_default(),
            });
        }
        Ok(Rules { rules, gateway: gateway.to_string() })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.name.as_str())
    }

    /// Does rule `i` apply to `r` (from a source of kind `source`)? A
    /// condition that fails to evaluate is false, counted in `counts` if given.
    fn applies(&self, i: usize, r: &Reading, source: u8, counts: Option<&mut [RuleCounts]>) -> bool {
        let rule = &self.rules[i];
        let kind = Origin::KINDS.get(source as usize).copied().unwrap_or("");
        let m = rule.device.as_deref().is_none_or(|p| glob(p, &r.device))
            && rule.sensor.as_deref().is_none_or(|p| glob(p, &r.sensor))
            && rule.source.as_deref().is_none_or(|p| glob(p, kind));
        if !m {
            return false;
        }
        match &rule.when {
            None => true,
            Some(c) => match c.eval(r) {
                Ok(b) => b,
                Err(_) => {
                    if let Some(c) = counts {
                        c[i].errors += 1;
                    }
                    false
                }
            },
        }
    }

    /// The transforms of every rule, in order, on a reading the pipeline
    /// stored raw: what the uplink sends. A pure function of the reading
    /// and the rules (stored readings passed every filter and downsample).
    pub fn transform_stored(&self, r: &mut Reading, source: u8) {
        for i in 0..self.rules.len() {
            if let Some(t) = &self.rules[i].transform
                && self.applies(i, r, source, None)
            {
                apply_transform(t, r);
            }
        }
    }

    fn render(&self, template: &str, r: &Reading) -> String {
        template.replace("{gateway}", &self.gateway).replace("{device}", &r.device).replace("{sensor}", &r.sensor)
    }
}

fn window_suffix(w: Duration) -> String {
    let ms = w.as_millis();
    if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 && ms >= 600_000 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn apply_transform(t: &TransformConfig, r: &mut Reading) {
    if let Some(n) = &t.rename {
        r.sensor.clone_from(n);
    }
    if let Some(i) = t.pick
        && let Value::Array(a) = &r.value
    {
        // Out of range: the reading keeps its array (the operator sees it).
        if let Some(x) = a.get(i) {
            r.value = Value::Number(*x);
        }
    }
    let f = |x: f64| {
        let mut y = x * t.scale.unwrap_or(1.0) + t.offset.unwrap_or(0.0);
        if let Some(d) = t.round {
            let p = 10f64.powi(d as i32);
            y = (y * p).round() / p;
        }
        y
    };
    match &mut r.value {
        Value::Number(n) => *n = f(*n),
        Value::Array(a) => a.iter_mut().for_each(|x| *x = f(*x)),
    }
}

/// Where a stored reading goes: one queue record per distinct destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Dest {
    pub kind: RecordKind,
    /// Upstream topics, in the order rules named them; empty: the default
    /// readings topic. A record with k topics becomes k messages (one
    /// queue record owning k ids, so a power cut keeps all or none).
    pub topics: Vec<String>,
    pub lane: Lane,
    pub source: u8,
    /// The uplink must apply transforms ([`Rules::transform_stored`]).
    pub transformed: bool,
}

impl Dest {
    pub fn header(&self, window: Option<WindowRef>) -> RecordHeader {
        RecordHeader {
            kind: self.kind,
            topics: self.topics.clone(),
            lane: self.lane as u8,
            source: self.source,
            transformed: self.transformed,
            window,
            dropped: Vec::new(),
        }
    }
}

/// Which window a `Derived` record closed.
pub type WindowRef = crate::reading::WindowRef;

/// A window that closed: its outputs, ready to append (after sealing
/// every open batch).
#[derive(Debug, Clone, PartialEq)]
pub struct Closed {
    pub window: WindowRef,
    pub outputs: Vec<(Reading, Dest)>,
    /// Outputs to republish on the LAN broker (see `republish`).
    pub republish: Vec<Reading>,
}

/// What to do with one ingested reading.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    /// Windows this reading closed: append them before storing it.
    pub closed: Vec<Closed>,
    /// Where the raw reading is stored (empty: dropped, acked as handled).
    pub store: Vec<Dest>,
    /// The reading as it goes upstream, to republish on the LAN broker
    /// (`None`: dropped, held, or a rule said `republish = false`).
    pub republish: Option<Reading>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Series {
    /// `every`: `hi` is the newest interval (ts / every) a reading was kept
    /// in, `recent` a bitmap of kept intervals `hi - 63 ..= hi` (bit 0 =
    /// `hi`). Deadband / on_change: the last kept reading's ts and value.
    Down { hi: u64, recent: u64, ts: u64, value: Value },
    /// Readings with ts < `closed_through` are late; `open` by start, oldest
    /// first; `max_ts` is the newest ts counted (it closes windows).
    Agg { closed_through: u64, open: Vec<Window>, max_ts: u64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Window {
    start: u64,
    count: u64,
    min: f64,
    max: f64,
    sum: f64,
    last: f64,
    /// Every value, only when a percentile is asked for (held as runs of
    /// equal values where they repeat; see samples.rs).
    values: Samples,
    /// Gateway time (unix ms) of the last reading: idle close counts from it.
    last_arrival_ms: u64,
    /// Source kind of the readings (what later rules' `match.source` sees).
    source: u8,
}

/// Rule state as the pipeline's checkpoint keeps it: series by (rule name, device, sensor).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    series: Vec<(String, String, String, Series)>,
}

/// [`Snapshot`] as [`Engine::view`] writes it (the same bytes; a
/// checkpoint is read back as a `Snapshot`).
#[derive(Default, Serialize)]
pub struct SnapshotView<'a> {
    series: Vec<(&'a str, &'a str, &'a str, &'a Series)>,
}

/// Series state by device, then (rule, sensor): found per reading without
/// allocating (a key of owned strings would cost two allocations a lookup).
#[derive(Default)]
struct SeriesMap(HashMap<String, Vec<(u16, String, Series)>>);

impl SeriesMap {
    fn get(&self, rule: u16, device: &str, sensor: &str) -> Option<&Series> {
        self.0.get(device)?.iter().find(|(r, s, _)| *r == rule && s == sensor).map(|(_, _, v)| v)
    }

    fn get_mut(&mut self, rule: u16, device: &str, sensor: &str) -> Option<&mut Series> {
        self.0.get_mut(device)?.iter_mut().find(|(r, s, _)| *r == rule && s == sensor).map(|(_, _, v)| v)
    }

    fn entry(&mut self, rule: u16, device: &str, sensor: &str, init: impl FnOnce() -> Series) -> &mut Series {
        if !self.0.contains_key(device) {
            self.0.insert(device.to_string(), Vec::new());
        }
        let list = self.0.get_mut(device).expect("just made");
        let at = match list.iter().position(|(r, s, _)| *r == rule && s == sensor) {
            Some(k) => k,
            None => {
                list.push((rule, sensor.to_string(), init()));
                list.len() - 1
            }
        };
        &mut list[at].2
    }

    fn insert(&mut self, rule: u16, device: &str, sensor: &str, v: Series) {
        match self.get_mut(rule, device, sensor) {
            Some(s) => *s = v,
            None => {
                self.entry(rule, device, sensor, || v);
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = (u16, &str, &str, &Series)> {
        self.0.iter().flat_map(|(d, l)| l.iter().map(move |(r, s, v)| (*r, d.as_str(), s.as_str(), v)))
    }
}

/// The stateful half: downsample memory and open windows, per (rule, device, sensor).
pub struct Engine {
    rules: std::sync::Arc<Rules>,
    series: SeriesMap,
    pub counts: Vec<RuleCounts>,
    /// Whether outcomes carry the reading to republish (a LAN broker wants them).
    republish: bool,
}

impl Engine {
    pub fn new(rules: std::sync::Arc<Rules>) -> Engine {
        let n = rules.rules.len();
        Engine { rules, series: SeriesMap::default(), counts: vec![RuleCounts::default(); n], republish: false }
    }

    /// Outcomes carry `republish` readings only when asked (they cost a clone).
    pub fn set_republish(&mut self, on: bool) {
        self.republish = on;
    }

    pub fn rules(&self) -> &std::sync::Arc<Rules> {
        &self.rules
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Run every rule on one reading dedup accepted.
    pub fn ingest(&mut self, r: &Reading, source: u8, now_ms: u64) -> Outcome {
        let mut out = Outcome::default();
        self.walk(r, source, now_ms, Some(&mut out));
        out
    }

    /// Start-up: a raw or held reading read back from the queue. Rebuilds state as [`Engine::ingest`] did; emits nothing.
    pub fn replay(&mut self, r: &Reading, source: u8, now_ms: u64) {
        self.walk(r, source, now_ms, None);
    }

    /// Start-up: a `Derived` record says this window closed.
    pub fn replay_closed(&mut self, w: &WindowRef) {
        let Some(i) = self.rules.rules.iter().position(|r| r.name == w.rule) else { return };
        let Some(a) = &self.rules.rules[i].aggregate else { return };
        let end = w.start.saturating_add(a.window.as_millis() as u64);
        let s = self.series.entry(i as u16, &w.device, &w.sensor, || Series::Agg {
            closed_through: 0,
            open: Vec::new(),
            max_ts: 0,
        });
        if let Series::Agg { closed_through, open, .. } = s {
            *closed_through = (*closed_through).max(end);
            open.retain(|o| o.start >= end);
        }
    }

    /// `ingest` when `out` is given; replay otherwise.
    fn walk(&mut self, raw: &Reading, source: u8, now_ms: u64, mut out: Option<&mut Outcome>) {
        let rules = self.rules.clone();
        // Cloned only when a transform changes it.
        let mut r = std::borrow::Cow::Borrowed(raw);
        let mut topics: Vec<String> = Vec::new();
        let mut lane = Lane::Bulk;
        let mut transformed = false;
        let mut hold = false;
        let mut republish = true;
        for i in 0..rules.rules.len() {
            if !rules.applies(i, &r, source, Some(&mut self.counts)) {
                continue;
            }
            let rule = &rules.rules[i];
            if out.is_some() {
                self.counts[i].matched += 1;
            }
            if rule.filter {
                self.drop_at(i, &out);
                return;
            }
            if let Some(t) = &rule.transform {
                apply_transform(t, r.to_mut());
                transformed = true;
            }
            rule.steer(&rules, &r, &mut topics, &mut lane, &mut republish);
            if let Some(d) = &rule.downsample
                && !self.downsample(i, d, &r)
            {
                self.drop_at(i, &out);
                return;
            }
            if let Some(a) = &rule.aggregate {
                let (late, closed) = self.aggregate(i, a, &r, source, now_ms);
                if let Some(o) = out.as_deref_mut() {
                    for w in closed.into_iter() {
                        let c = self.close_outputs(i, &r.device, &r.sensor, w, source);
                        o.closed.push(c);
                    }
                }
                if late {
                    self.counts[i].late += u64::from(out.is_some());
                    if !a.keep_raw {
                        self.drop_at(i, &out);
                        return;
                    }
                } else if !a.keep_raw {
                    hold = true;
                    break;
                }
            }
        }
        let Some(o) = out else { return };
        if hold {
            o.store.push(Dest { kind: RecordKind::Hold, topics: Vec::new(), lane, source, transformed: false });
            return;
        }
        o.store.push(Dest { kind: RecordKind::Raw, topics, lane, source, transformed });
        if republish && self.republish {
            o.republish = Some(r.into_owned());
        }
    }

    fn drop_at(&mut self, i: usize, out: &Option<&mut Outcome>) {
        if out.is_some() {
            self.counts[i].dropped += 1;
        }
    }

    /// Keep this reading? Updates the series' memory when it does.
    fn downsample(&mut self, i: usize, d: &DownsampleConfig, r: &Reading) -> bool {
        let prev = self.series.get(i as u16, &r.device, &r.sensor);
        if let Some(every) = d.every {
            // One reading per interval of device time: the first that
            // arrives. A resend that arrives after newer readings (after a
            // kill, a device catching up) still gets its interval if no
            // reading was kept there, as long as it is among the last 64.
            let every = every.as_millis() as u64;
            let b = r.ts / every;
            let (keep, hi, recent) = match prev {
                Some(Series::Down { hi, recent, .. }) if b > *hi => {
                    (true, b, if b - hi >= 64 { 1 } else { (recent << (b - hi)) | 1 })
                }
                Some(Series::Down { hi, recent, .. }) if hi - b < 64 => {
                    let bit = 1u64 << (hi - b);
                    (recent & bit == 0, *hi, recent | bit)
                }
                // Older than 64 intervals: dropped, unless the clock went
                // back so far that the device must have reset it.
                Some(Series::Down { ts, .. }) if ts.saturating_sub(r.ts) <= CLOCK_RESET_MS => (false, 0, 0),
                _ => (true, b, 1),
            };
            if keep {
                self.series.insert(
                    i as u16,
                    &r.device,
                    &r.sensor,
                    Series::Down { hi, recent, ts: r.ts, value: r.value.clone() },
                );
            }
            return keep;
        }
        let keep = match prev {
            // Older than the last kept reading: a resend of a reading
            // dropped before (its drop was never acked, e.g. a kill came
            // first), or readings out of order: dropped again. Unless the
            // device's clock went back more than CLOCK_RESET_MS (it
            // reset): then the series starts afresh.
            Some(Series::Down { ts, .. }) if r.ts < *ts => ts - r.ts > CLOCK_RESET_MS,
            Some(Series::Down { value, .. }) => match d.deadband {
                Some(band) => moved(value, &r.value) >= band,
                None => *value != r.value,
            },
            _ => true,
        };
        if keep {
            self.series.insert(
                i as u16,
                &r.device,
                &r.sensor,
                Series::Down { hi: 0, recent: 0, ts: r.ts, value: r.value.clone() },
            );
        }
        keep
    }

    /// Count `r` into its window. Returns (late, the windows that closed:
    /// those whose end + `lateness` the newest ts has passed, oldest first).
    fn aggregate(
        &mut self,
        i: usize,
        a: &AggregateConfig,
        r: &Reading,
        source: u8,
        now_ms: u64,
    ) -> (bool, Vec<Window>) {
        let Value::Number(v) = r.value else {
            // Arrays are not aggregated (pick an element first); they go on.
            return (false, Vec::new());
        };
        let w = a.window.as_millis() as u64;
        let lateness = a.lateness.unwrap_or(a.window).as_millis() as u64;
        let start = r.ts - r.ts % w;
        let s = self.series.entry(i as u16, &r.device, &r.sensor, || Series::Agg {
            closed_through: 0,
            open: Vec::new(),
            max_ts: 0,
        });
        let Series::Agg { closed_through, open, max_ts } = s else {
            return (false, Vec::new());
        };
        if r.ts < *closed_through {
            return (true, Vec::new());
        }
        let pct = a.emit.iter().any(|s| matches!(s, Stat::P50 | Stat::P95));
        let at = match open.binary_search_by_key(&start, |o| o.start) {
            Ok(k) => k,
            Err(k) => {
                open.insert(
                    k,
                    Window {
                        start,
                        count: 0,
                        min: f64::INFINITY,
                        max: f64::NEG_INFINITY,
                        sum: 0.0,
                        last: v,
                        values: Samples::default(),
                        last_arrival_ms: now_ms,
                        source,
                    },
                );
                k
            }
        };
        let o = &mut open[at];
        o.count += 1;
        o.min = o.min.min(v);
        o.max = o.max.max(v);
        o.sum += v;
        o.last = v;
        o.last_arrival_ms = now_ms;
        if pct {
            o.values.push(v);
        }
        *max_ts = (*max_ts).max(r.ts);
        let due = open.iter().take_while(|o| o.start + w + lateness <= *max_ts).count();
        let closed: Vec<Window> = open.drain(..due).collect();
        if let Some(last) = closed.last() {
            *closed_through = (*closed_through).max(last.start + w);
        }
        (false, closed)
    }

    /// Windows no reading closed, idle for their `idle_close` (gateway
    /// clock) since their last reading: close them now.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Closed> {
        let rules = self.rules.clone();
        let mut due = Vec::new();
        for (i, dev, sensor, s) in self.series.iter() {
            let Some(a) = &rules.rules[i as usize].aggregate else { continue };
            let idle = a.idle_close.unwrap_or(a.window + a.lateness.unwrap_or(a.window)).as_millis() as u64;
            if let Series::Agg { open, .. } = s
                && let Some(newest) = open.iter().map(|o| o.last_arrival_ms).max()
                && now_ms.saturating_sub(newest) >= idle
            {
                due.push((i, dev.to_string(), sensor.to_string()));
            }
        }
        // Same order every time (the map's is not).
        due.sort();
        let mut out = Vec::new();
        for (i, dev, sensor) in due {
            let w = rules.rules[i as usize].aggregate.as_ref().expect("aggregate").window.as_millis() as u64;
            let Some(Series::Agg { closed_through, open, .. }) = self.series.get_mut(i, &dev, &sensor) else {
                continue;
            };
            let windows = std::mem::take(open);
            if let Some(last) = windows.last() {
                *closed_through = (*closed_through).max(last.start + w);
            }
            for o in windows {
                let source = o.source;
                out.push(self.close_outputs(i as usize, &dev, &sensor, o, source));
            }
        }
        out
    }

    /// Open windows (for tests and `rules test`, which flushes them at the end).
    pub fn flush(&mut self) -> Vec<Closed> {
        self.tick(u64::MAX)
    }

    /// The stat readings of a closed window, through the rules after the
    /// aggregate (their filter, transform, route and lane; downsample and
    /// aggregate rules pass derived readings by).
    fn close_outputs(&mut self, i: usize, device: &str, sensor: &str, w: Window, source: u8) -> Closed {
        let rules = self.rules.clone();
        let rule = &rules.rules[i];
        let a = rule.aggregate.as_ref().expect("an aggregate rule");
        let window = WindowRef {
            rule: rule.name.clone(),
            device: device.to_string(),
            sensor: sensor.to_string(),
            start: w.start,
        };
        let mut outputs = Vec::new();
        let mut republished = Vec::new();
        // Nearest rank, both in one pass over the sorted values (none kept,
        // and NaN at once, unless a percentile is asked for).
        let pct = w.values.percentiles(&[0.50, 0.95]);
        'stats: for stat in &a.emit {
            let v = match stat {
                Stat::Count => w.count as f64,
                Stat::Min => w.min,
                Stat::Max => w.max,
                Stat::Sum => w.sum,
                Stat::Mean => w.sum / w.count.max(1) as f64,
                Stat::Last => w.last,
                Stat::P50 => pct[0],
                Stat::P95 => pct[1],
            };
            let mut d = Reading {
                device: device.to_string(),
                sensor: format!("{sensor}.{}_{}", stat.as_str(), rule.window_suffix),
                seq: None,
                ts: w.start,
                value: Value::Number(v),
                boot: None,
            };
            self.counts[i].emitted += 1;
            let mut topics: Vec<String> = Vec::new();
            let mut lane = Lane::Bulk;
            let mut republish = true;
            for j in i + 1..rules.rules.len() {
                if !rules.applies(j, &d, source, Some(&mut self.counts)) {
                    continue;
                }
                let later = &rules.rules[j];
                self.counts[j].matched += 1;
                if later.filter {
                    self.counts[j].dropped += 1;
                    continue 'stats;
                }
                if let Some(t) = &later.transform {
                    apply_transform(t, &mut d);
                }
                later.steer(&rules, &d, &mut topics, &mut lane, &mut republish);
            }
            if republish {
                republished.push(d.clone());
            }
            outputs.push((d, Dest { kind: RecordKind::Derived, topics, lane, source, transformed: false }));
        }
        Closed { window, outputs, republish: republished }
    }

    /// The state for the pipeline's checkpoint: [`Snapshot`]'s format, borrowed
    /// (cloning every series, a percentile window's values included, made a
    /// transient copy of all of it at every checkpoint: issue 18).
    pub fn view(&self) -> SnapshotView<'_> {
        let mut series: Vec<_> =
            self.series.iter().map(|(i, d, s, v)| (self.rules.rules[i as usize].name.as_str(), d, s, v)).collect();
        series.sort_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
        SnapshotView { series }
    }

    /// Load a checkpoint's state; series of rules that no longer exist (or
    /// changed kind) are dropped.
    pub fn restore(&mut self, snap: Snapshot) {
        for (name, d, s, v) in snap.series {
            let Some(i) = self.rules.rules.iter().position(|r| r.name == name) else { continue };
            let rule = &self.rules.rules[i];
            let fits = match &v {
                Series::Down { .. } => rule.downsample.is_some(),
                Series::Agg { .. } => rule.aggregate.is_some(),
            };
            if fits {
                self.series.insert(i as u16, &d, &s, v);
            }
        }
    }
}

/// How far a value moved (largest change of any element).
fn moved(a: &Value, b: &Value) -> f64 {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => (x - y).abs(),
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max)
        }
        _ => f64::INFINITY,
    }
}
