//! Where readings come in. Every source gets the same [`SourceContext`] from
//! [`crate::app`], which starts them all: [`serial`] (one task per port),
//! [`ble`] (one task for the adapter, one per device) and [`lan`] (one task
//! reading the embedded broker's local link, [`crate::broker::LanFeed`]).

pub mod ble;
pub mod lan;
mod port_fd;
pub mod serial;

use crate::metrics::Metrics;
use crate::reading::Incoming;
use crate::route::RouteTable;
use std::sync::Arc;
use tokio::sync::watch;

/// What a source needs from the gateway around it.
#[derive(Clone, Debug)]
pub struct SourceContext {
    /// Where readings go: the pipeline's channel (waiting when it is behind
    /// back-pressures the devices, which keep their readings).
    pub ingest: crate::channel::Sender<Incoming>,
    /// Counters and per-port gauges.
    pub metrics: Arc<Metrics>,
    /// Where a source with a way back to its devices registers its link
    /// ([`RouteTable::register`]): acks today, commands later.
    pub routes: RouteTable,
    /// Fires when this source is to stop (its own signal: a reload stops one
    /// port, not all).
    pub shutdown: watch::Receiver<bool>,
}

impl SourceContext {
    /// The same context with another stop signal.
    pub fn with_shutdown(&self, shutdown: watch::Receiver<bool>) -> SourceContext {
        SourceContext { shutdown, ..self.clone() }
    }
}
