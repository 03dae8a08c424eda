//! TEMPORARY stub; replaced by branch `serial`.
use crate::config::SerialConfig;
use crate::metrics::Metrics;
use crate::reading::{Ack, Incoming, PortId};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
pub async fn run(_cfg: SerialConfig, _port_id: PortId, _tx: mpsc::Sender<Incoming>, _acks: mpsc::Receiver<Ack>, _metrics: Arc<Metrics>, _shutdown: watch::Receiver<bool>) {}
