//! Wires the parts together and owns every task.
//!
//! Ownership, start to stop:
//! * one tokio task per serial port ([`crate::source::serial::run`]);
//! * one tokio task for Bluetooth LE ([`crate::source::ble::run`]), which
//!   owns a task per `[[ble]]` device;
//! * one OS thread for the [`Pipeline`], with a single-threaded runtime of its
//!   own, because it fsyncs and fsync must not stall the ports' runtime;
//! * the signal handler, which starts shutdown.
//!
//! Shutdown runs in two stages so no reading is stranded: first the
//! pipeline drains its channel, seals the open batch, commits, checkpoints
//! and hands out the final acks; only then are the sources told to stop, so
//! they are still there to write those acks to the devices.

use crate::config::Config;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::reading::{Ack, Incoming, PortId, now_ms};
use crate::shutdown::{self, Shutdown};
use crate::source::{ble, serial};
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
/// BLE tasks stop delivering at once; this bounds their unsubscribe/disconnect.
const BLE_STOP_BUDGET: Duration = Duration::from_millis(200);

/// Run the gateway until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let started = Instant::now();
    let (pipeline, report) = Pipeline::open(&cfg, metrics.clone())
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
    if let Some(mut task) = ble_task {
        ble_stop.trigger();
        if tokio::time::timeout(BLE_STOP_BUDGET, &mut task).await.is_err() {
            task.abort();
        }
    }
    tracing::info!("stopping: closing the open batch into the queue");
    pipeline_stop.trigger();
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
    sources_stop.trigger();
    let _ = tokio::time::timeout(SOURCE_STOP_BUDGET, async { while sources.join_next().await.is_some() {} }).await;
    sources.abort_all();
    log_summary(&metrics);
    Ok(())
}

/// The counters, once, at exit: what a test or an operator reading the
/// journal after a restart wants to know.
fn log_summary(m: &Metrics) {
    for (name, c) in m.ports() {
        tracing::info!("port {name}: {} readings, {} malformed, {} reconnects", c.readings, c.malformed, c.reconnects);
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
