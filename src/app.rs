//! Wires the parts together and owns every task.
//!
//! Ownership, start to stop:
//! * one tokio task per serial port ([`crate::source::serial::run`]);
//! * with `[broker] enabled`, the embedded MQTT broker ([`Broker`]), which
//!   owns its listeners, the LAN ingest task and its threads;
//! * one tokio task for Bluetooth LE ([`crate::source::ble::run`]), which
//!   owns a task per `[[ble]]` device;
//! * one OS thread for the [`Pipeline`], with a single-threaded runtime of its
//!   own, because it fsyncs and fsync must not stall the ports' runtime;
//! * one OS thread for the [`Uplink`] (when `[upstream]` is configured), for
//!   the same reason;
//! * the signal handler, which starts shutdown.
//!
//! Shutdown runs in two stages so no reading is stranded: first the
//! pipeline drains its channel, seals the open batch, commits, checkpoints
//! and hands out the final acks; only then are the sources told to stop, so
//! they are still there to write those acks to the devices. The broker goes
//! first of all: its clients are closed and what it already took in is
//! handed to the pipeline before the pipeline drains (with `broker.ack =
//! "received"` LAN devices were PUBACKed already, so nothing of theirs may
//! be left behind).

use crate::broker::{Broker, StatusSource};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::reading::{Ack, Incoming, PortId, now_ms};
use crate::shutdown::{self, Shutdown};
use crate::source::{ble, serial};
use crate::uplink::{self, Uplink};
use anyhow::Context;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Readings waiting between the sources and the pipeline. Enough to ride
/// out one slow fsync at full rate; beyond it the ports are back-pressured
/// (the devices keep their readings and resend).
const INGEST_CHANNEL: usize = 16_384;
/// Overall budget between the signal and exit (the CLI promises 5 s).
const PIPELINE_STOP_BUDGET: Duration = Duration::from_secs(4);
const SOURCE_STOP_BUDGET: Duration = Duration::from_millis(800);
/// The uplink stops alongside the pipeline; this is what it may take beyond it.
const UPLINK_STOP_BUDGET: Duration = Duration::from_millis(700);
const BROKER_STOP_BUDGET: Duration = Duration::from_millis(600);
/// BLE tasks stop delivering at once; this bounds their unsubscribe/disconnect.
const BLE_STOP_BUDGET: Duration = Duration::from_millis(200);

/// Run the gateway until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let started = Instant::now();
    let (mut pipeline, report) = Pipeline::open(&cfg, metrics.clone())
        .with_context(|| format!("cannot open the queue in {}", cfg.gateway.data_dir.display()))?;
    let q = &report.queue;
    if q.truncated_bytes > 0 || q.corrupt_records > 0 {
        tracing::warn!(
            "queue repaired at start-up: cut {} torn bytes, skipped {} corrupt records",
            q.truncated_bytes,
            q.corrupt_records
        );
    }
    tracing::info!(
        "queue open: {} records on disk, {} replayed into dedup state, in {:.0?}",
        q.records,
        report.replayed_records,
        started.elapsed()
    );

    let sources_stop = Shutdown::new();
    let pipeline_stop = Shutdown::new();
    let (tx, rx) = mpsc::channel(INGEST_CHANNEL);
    // The broker first: a taken port must stop start-up before anything runs.
    let mut broker = None;
    // LAN readings' port id: their acks come back after the serial ports'.
    let lan_port = cfg.serial.len();
    let mut lan_acks = None;
    if cfg.broker.enabled {
        let (ack_tx, ack_rx) = mpsc::channel(1024);
        lan_acks = Some(ack_tx);
        let status = StatusSource {
            gateway: cfg.gateway.id.clone(),
            queue: pipeline.queue_handle(),
            upstream_configured: cfg.upstream.is_some(),
        };
        let b = Broker::start(&cfg, tx.clone(), lan_port, ack_rx, metrics.clone(), status)
            .await
            .context("cannot start the embedded MQTT broker")?;
        if !cfg.broker.republish.is_empty()
            && let Some(rp) = &b.republish
        {
            pipeline.set_republish(rp.clone());
        }
        broker = Some(b);
    }
    let mut ack_routes = Vec::new();
    let mut sources = tokio::task::JoinSet::new();
    for (port_id, port) in cfg.serial.iter().enumerate() {
        let (ack_tx, ack_rx) = mpsc::channel(256);
        ack_routes.push(ack_tx);
        sources.spawn(serial::run(
            port.clone(),
            port_id,
            tx.clone(),
            ack_rx,
            metrics.clone(),
            sources_stop.subscribe(),
        ));
    }
    if let Some(ack_tx) = lan_acks {
        debug_assert_eq!(ack_routes.len(), lan_port);
        ack_routes.push(ack_tx);
    }
    // BLE readings carry `ble::BLE_PORT`, which has no ack route. BLE stops
    // first at shutdown (it needs no final acks, and a notification that
    // came after the pipeline's last drain would be lost: BLE devices never
    // resend).
    let ble_stop = Shutdown::new();
    let ble_task = (!cfg.ble.is_empty()).then(|| {
        tokio::spawn(ble::run(cfg.ble.clone(), cfg.ble_scan.clone(), tx.clone(), metrics.clone(), ble_stop.subscribe()))
    });
    // Held until the end: the pipeline must outlive its sources, even when
    // there are none (a gateway with no ports still owns its queue).
    let _tx = tx;

    let uplink_stop = Shutdown::new();
    let uplink = match &cfg.upstream {
        Some(up) => {
            let u = Uplink::new(up, &cfg.gateway.id, &cfg.gateway.data_dir, pipeline.queue_handle(), metrics.clone())
                .context("cannot start the uplink")?;
            Some(uplink::spawn(u, uplink_stop.subscribe()).context("cannot start the uplink thread")?)
        }
        None => {
            tracing::info!("no [upstream] configured: batches stay in the queue");
            None
        }
    };

    let stop_rx = pipeline_stop.subscribe();
    let worker = std::thread::Builder::new()
        .name("pipeline".into())
        .spawn(move || run_pipeline(pipeline, rx, ack_routes, stop_rx))
        .context("cannot start the pipeline thread")?;
    tracing::info!(
        "edge-gateway {} running with {} serial port(s), {} BLE device(s)",
        cfg.gateway.id,
        cfg.serial.len(),
        cfg.ble.len()
    );

    wait_for_signal().await?;
    if let Some(b) = &mut broker {
        tracing::info!("stopping: closing the broker's clients");
        b.stop(BROKER_STOP_BUDGET).await;
    }
    if let Some(mut task) = ble_task {
        ble_stop.trigger();
        if tokio::time::timeout(BLE_STOP_BUDGET, &mut task).await.is_err() {
            task.abort();
        }
    }
    tracing::info!("stopping: closing the open batch into the queue");
    pipeline_stop.trigger();
    uplink_stop.trigger();
    let joined = tokio::task::spawn_blocking(move || worker.join());
    let _rx = match tokio::time::timeout(PIPELINE_STOP_BUDGET, joined).await {
        Ok(Ok(Ok(Ok(rx)))) => Some(rx),
        Ok(Ok(Ok(Err(e)))) => {
            tracing::error!("pipeline stopped with an error: {e:#}");
            None
        }
        Ok(Ok(Err(_))) | Ok(Err(_)) => {
            tracing::error!("pipeline thread panicked");
            None
        }
        Err(_) => {
            tracing::error!("pipeline did not stop within {PIPELINE_STOP_BUDGET:?}");
            None
        }
    };
    if let Some(u) = uplink {
        let joined = tokio::task::spawn_blocking(move || u.join());
        if tokio::time::timeout(UPLINK_STOP_BUDGET, joined).await.is_err() {
            tracing::warn!("uplink did not stop within {UPLINK_STOP_BUDGET:?}");
        }
    }
    sources_stop.trigger();
    let _ = tokio::time::timeout(SOURCE_STOP_BUDGET, async { while sources.join_next().await.is_some() {} }).await;
    sources.abort_all();
    if let Some(b) = &mut broker {
        b.finish(SOURCE_STOP_BUDGET).await;
    }
    log_summary(&metrics);
    Ok(())
}

/// The counters, once, at exit: what a test or an operator reading the
/// journal after a restart wants to know.
fn log_summary(m: &Metrics) {
    for (name, c) in m.ports() {
        tracing::info!("port {name}: {} readings, {} malformed, {} reconnects", c.readings, c.malformed, c.reconnects);
    }
    for (topic, c) in m.topics() {
        tracing::info!("mqtt topic {topic}: {} readings, {} malformed", c.readings, c.malformed);
    }
    if Metrics::get(&m.broker_refused) + Metrics::get(&m.readings_republished) > 0 {
        tracing::info!(
            "broker: {} connections refused, {} clients disconnected for a forbidden publish, {} readings republished, {} not republished (behind)",
            Metrics::get(&m.broker_refused),
            Metrics::get(&m.broker_denied_publishes),
            Metrics::get(&m.readings_republished),
            Metrics::get(&m.republish_dropped),
        );
    }
    tracing::info!(
        "stopped: {} readings accepted, {} duplicates dropped, {} batches queued, {} readings dropped (queue full), {} readings refused (queue full), {} acks sent",
        Metrics::get(&m.readings_accepted),
        Metrics::get(&m.duplicates_dropped),
        Metrics::get(&m.batches_queued),
        Metrics::get(&m.readings_dropped_full),
        Metrics::get(&m.readings_rejected_full),
        Metrics::get(&m.acks_sent),
    );
    if Metrics::get(&m.upstream_connects) + Metrics::get(&m.upstream_connect_failures) > 0 {
        tracing::info!(
            "uplink: {} batches ({} readings) delivered, {} connects, {} failed attempts, {} PUBLISH re-sent with DUP, {} PUBREL re-sent, {} batches re-sent after a lost session, {} refused by the broker, {} too large, {} corrupt skipped",
            Metrics::get(&m.batches_delivered),
            Metrics::get(&m.readings_delivered),
            Metrics::get(&m.upstream_connects),
            Metrics::get(&m.upstream_connect_failures),
            Metrics::get(&m.publishes_resent_dup),
            Metrics::get(&m.pubrels_resent),
            Metrics::get(&m.batches_resent_session_lost),
            Metrics::get(&m.batches_refused),
            Metrics::get(&m.batches_too_large),
            Metrics::get(&m.batches_corrupt_skipped),
        );
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// The pipeline thread's loop: take readings as they come, wake for batch
/// ages and group commits, and route acks back to their ports.
fn run_pipeline(
    mut p: Pipeline,
    mut rx: mpsc::Receiver<Incoming>,
    routes: Vec<mpsc::Sender<Ack>>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<mpsc::Receiver<Incoming>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
    let rx = rt.block_on(async move {
        loop {
            let deadline = tokio::time::Instant::from_std(p.next_deadline());
            tokio::select! {
                biased;
                _ = shutdown::wait(&mut stop) => break,
                msg = rx.recv() => match msg {
                    Some(first) => {
                        let (now, ms) = (Instant::now(), now_ms());
                        p.ingest(first, now, ms);
                        // Take what is already queued without waking again.
                        for _ in 0..4096 {
                            match rx.try_recv() {
                                Ok(inc) => p.ingest(inc, now, ms),
                                Err(_) => break,
                            }
                        }
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => {}
            }
            send_acks(&routes, p.tick(Instant::now()));
        }
        // Whatever the sources handed over is the pipeline's to keep.
        let (now, ms) = (Instant::now(), now_ms());
        while let Ok(inc) = rx.try_recv() {
            p.ingest(inc, now, ms);
        }
        send_acks(&routes, p.close());
        // The channel goes back to `run`, alive: a port whose channel closed
        // would stop at once, before writing the final acks.
        rx
    });
    Ok(rx)
}

fn send_acks(routes: &[mpsc::Sender<Ack>], acks: Vec<(PortId, Ack)>) {
    for (port, ack) in acks {
        // A full or closed route means the port is busy or down: the device
        // resends, and its duplicate triggers a fresh cumulative ack.
        if let Some(route) = routes.get(port) {
            let _ = route.try_send(ack);
        }
    }
}
