//! LAN MQTT input: readings LAN devices publish into the embedded broker.
//!
//! One task reads the broker's local link (subscribed to the `ingest`
//! filter, e.g. `sensors/+/+`) with rumqttd's async `next()`, takes device
//! and sensor from the topic and the rest from the JSON payload
//! ([`wire::parse_mqtt_payload`]), and hands each reading to the pipeline
//! like any other source, waiting when the pipeline is behind.
//!
//! A LAN device's ack is MQTT's: PUBACK (QoS 1) or PUBCOMP (QoS 2). With
//! `broker.ack = "received"` rumqttd sends it once the message is in its
//! in-memory log, before the reading is in our queue (docs/lan-mqtt.md says
//! where that leaves the window); with `"durable"` the front door holds it
//! until the pipeline's ack for the reading comes back on this source's ack
//! route ([`crate::broker::Durable`]).
//!
//! Malformed payloads are counted per topic ([`Metrics::topic`]) and skipped.
//!
//! Each message taken is reported to [`Flow`], which holds LAN publishers
//! back in the front door while this task is behind (rumqttd itself would
//! drop what a slow subscriber has not read yet).

use crate::broker::topic::TopicPattern;
use crate::broker::{Flow, LanFeed};
use crate::metrics::Metrics;
use crate::reading::{Incoming, Origin, now_ms};
use crate::route::RouteTable;
use crate::shutdown;
use crate::source::SourceContext;
use crate::wire;
use rumqttd::Notification;
use rumqttd::local::LinkRx;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

/// Topics counted one by one; past this many, the rest share one counter,
/// so a client inventing topics cannot grow the metrics without bound.
const MAX_COUNTED_TOPICS: usize = 4096;
const OTHER_TOPICS: &str = "(other topics)";
const MALFORMED_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// At shutdown, what the router already forwarded is taken until it stays quiet this long.
const DRAIN_QUIET: Duration = Duration::from_millis(150);

/// Runs until `stop` fires, then drains what the router already forwarded
/// and returns Ok. Returns Err, at once, when it cannot go on (the local
/// link closed, or the pipeline is gone while not stopping): the broker
/// then closes its listeners and the gateway exits non-zero (see
/// [`crate::broker`], "LAN ingest supervision"). `ctx.shutdown` is the
/// broker's stop signal ([`crate::broker::Broker::stopping`]).
pub async fn run(feed: LanFeed, ctx: SourceContext) -> Result<(), String> {
    let LanFeed { mut link, pattern, flow } = feed;
    let SourceContext { ingest: tx, metrics, shutdown: mut stop, routes } = ctx;
    let mut ingest = Ingest {
        pattern,
        flow,
        tx,
        metrics,
        topics: HashSet::new(),
        last_log: None,
        suppressed: 0,
        routes,
        last_device: String::new(),
    };
    loop {
        tokio::select! {
            biased;
            _ = shutdown::wait(&mut stop) => break,
            n = idle_next(&ingest.flow, &mut link) => match n {
                Ok(Some(n)) => {
                    if !ingest.take(&mut link, n).await {
                        return Err("the pipeline is gone".into());
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    error!("broker: local link closed ({e}); LAN ingest stops");
                    return Err(format!("local link closed ({e})"));
                }
            },
        }
    }
    // The listeners are closed by now; take what the router still holds.
    let mut drained = 0u64;
    while let Ok(Ok(Some(n))) = tokio::time::timeout(DRAIN_QUIET, link.next()).await {
        drained += 1;
        if !ingest.take(&mut link, n).await {
            break;
        }
    }
    info!("broker: LAN ingest stopped ({drained} notifications drained)");
    Ok(())
}

/// `link.next()`, telling [`Flow`] while it waits for rumqttd.
async fn idle_next(flow: &Flow, link: &mut LinkRx) -> Result<Option<Notification>, rumqttd::local::LinkError> {
    flow.set_idle(true);
    let n = link.next().await;
    flow.set_idle(false);
    n
}

struct Ingest {
    pattern: TopicPattern,
    flow: Arc<Flow>,
    tx: crate::channel::Sender<Incoming>,
    metrics: Arc<Metrics>,
    topics: HashSet<String>,
    last_log: Option<Instant>,
    suppressed: u64,
    /// Devices heard here are noted for commands; their answers go there.
    routes: RouteTable,
    last_device: String,
}

impl Ingest {
    /// Returns false when the pipeline is gone.
    async fn take(&mut self, link: &mut LinkRx, n: Notification) -> bool {
        let publish = match n {
            Notification::Forward(f) => f.publish,
            // The router paused us because our buffer filled: ask for more.
            Notification::Unschedule => {
                if let Err(e) = link.wake().await {
                    error!("broker: cannot resume the local link: {e}");
                }
                return true;
            }
            _ => return true,
        };
        let topic = String::from_utf8_lossy(&publish.topic);
        // Counted as taken once handed over (or skipped), below.
        let bytes = (publish.topic.len() + publish.payload.len()) as u64;
        if let Some(device) = topic.strip_prefix("commands/").and_then(|t| t.strip_suffix("/ack")) {
            self.flow.taken(bytes);
            self.command_ack(device, &publish.payload);
            return true;
        }
        let key = self.counter_key(&topic);
        let parsed = match self.pattern.matches(&topic) {
            Some((device, sensor)) => {
                wire::parse_mqtt_payload(&publish.payload, device, sensor, now_ms()).map_err(|e| e.to_string())
            }
            None => Err("topic does not fit the ingest pattern".to_string()),
        };
        match parsed {
            Ok((reading, ts_from_device)) => {
                self.metrics.topic(&key, |c| c.readings += 1);
                if reading.device != self.last_device {
                    self.last_device.clone_from(&reading.device);
                    self.routes.note_device(&reading.device, Origin::Lan);
                }
                let sent = self.tx.send(Incoming::new(reading, ts_from_device, Origin::Lan)).await.is_ok();
                self.flow.taken(bytes);
                sent
            }
            Err(e) => {
                self.flow.taken(bytes);
                self.metrics.topic(&key, |c| c.malformed += 1);
                let now = Instant::now();
                if self.last_log.is_some_and(|t| now.duration_since(t) < MALFORMED_LOG_INTERVAL) {
                    self.suppressed += 1;
                } else {
                    let more = std::mem::take(&mut self.suppressed);
                    let more = if more > 0 { format!(" ({more} more since the last report)") } else { String::new() };
                    warn!("broker: malformed reading on {topic:?}: {e}{more}");
                    self.last_log = Some(now);
                }
                true
            }
        }
    }

    /// `commands/{device}/ack` with `{"id","ok","result"?}`: a device's
    /// answer to a command (the front door's ACL decides who may publish it).
    fn command_ack(&mut self, device: &str, payload: &[u8]) {
        match crate::wire::parse_command_ack_mqtt(device, payload) {
            Ok(a) => {
                if !self.routes.command_ack(a) {
                    debug!("broker: answer to a command dropped (no [commands], or busy)");
                }
            }
            Err(e) => warn!("broker: malformed answer to a command on commands/{device}/ack: {e}"),
        }
    }

    fn counter_key(&mut self, topic: &str) -> String {
        if self.topics.contains(topic) {
            return topic.to_string();
        }
        if self.topics.len() >= MAX_COUNTED_TOPICS {
            return OTHER_TOPICS.to_string();
        }
        self.topics.insert(topic.to_string());
        topic.to_string()
    }
}
