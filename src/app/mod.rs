//! Wires the parts together and owns every task.
//!
//! Ownership, start to stop:
//! * one tokio task per serial port ([`crate::source::serial::run`]), each
//!   with its own stop signal so a reload can remove one;
//! * with `[broker] enabled`, the embedded MQTT broker ([`Broker`]), which
//!   owns its listeners, the LAN ingest task and its threads;
//! * one tokio task for Bluetooth LE ([`crate::source::ble::run`]), which
//!   owns a task per `[[ble]]` device;
//! * one OS thread for the [`Pipeline`], with a single-threaded runtime of its
//!   own, because it fsyncs and fsync must not stall the ports' runtime. It
//!   also sends systemd's `WATCHDOG=1` (see [`crate::service`]);
//! * one OS thread for the [`Uplink`] (when `[upstream]` is configured), for
//!   the same reason;
//! * the `/metrics` server and a heartbeat task (watchdog beat, `STATUS=`);
//! * the signal loop: SIGTERM/SIGINT stop, SIGHUP reloads the config;
//!   a [`Fatal`] from the pipeline or the uplink thread (a failed fsync)
//!   ends the process at once with status 75 ([`crate::fatal`]).
//!
//! Shutdown runs in two stages so no reading is stranded: first the
//! pipeline drains its channel, seals the open batch, commits, checkpoints
//! and hands out the final acks; only then are the sources told to stop, so
//! they are still there to write those acks to the devices. The broker goes
//! first of all: its clients are closed and what it already took in is
//! handed to the pipeline before the pipeline drains (with `broker.ack =
//! "received"` LAN devices were PUBACKed already, so nothing of theirs may
//! be left behind).
//!
//! A reload (SIGHUP) re-reads the file. An invalid file is refused with its
//! `PATH:LINE:COL` and the running config stays. Otherwise serial ports and
//! BLE devices that were added, removed or changed are started/stopped, a
//! changed `[upstream]` reconnects, the broker's ACL (`[[broker.acl]]`,
//! `denied_publish`, the users' `publish` prefixes) is replaced at once, and
//! sections that need a restart (`[gateway]`, `[pipeline]`, `[store]`, the
//! rest of `[broker]`, `[metrics]`, `[log]`) are logged as such and keep
//! their running values. The queue is never
//! touched by a reload. What a reload does is planned by the pure
//! `reload::plan` and carried out by `Sources::apply` (`reload.rs`).

mod reload;

use crate::broker::Broker;
use crate::config::{Config, SerialConfig};
use crate::events::Event;
use crate::fatal::{EXIT_FATAL, Fatal, FatalTx};
use crate::metrics::Metrics;
use crate::metrics::status::Probe;
use crate::pipeline::Pipeline;
use crate::queue::Queue;
use crate::reading::{Incoming, Origin};
use crate::route::RouteTable;
use crate::service::{Beat, Notifier, Watchdog};
use crate::shutdown::Shutdown;
use crate::source::{SourceContext, ble, lan, serial};
use crate::uplink::{self, Uplink};
use anyhow::Context;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Readings waiting between the sources and the pipeline. Enough to ride
/// out one slow fsync at full rate (~18 ms at 450k readings/s, 40 s at a
/// site's 200/s); beyond it the ports are back-pressured (the devices keep
/// their readings and resend). 16,384 held ~1.5 MB more at the uplink
/// bench's peak for no throughput (issue 18, docs/performance.md).
const INGEST_CHANNEL: usize = 8_192;
/// ... and the bytes they may hold ([`crate::channel`]): 8,192 ordinary
/// readings weigh ~1.1 MiB, so this binds only for readings with long
/// arrays (a 256 KiB LAN payload of numbers is a 1 MiB reading).
const INGEST_BYTES: usize = 2 << 20;
/// Overall budget between the signal and exit (the CLI promises 5 s).
const PIPELINE_STOP_BUDGET: Duration = Duration::from_secs(4);
const SOURCE_STOP_BUDGET: Duration = Duration::from_millis(800);
/// The uplink stops alongside the pipeline; this is what it may take beyond it.
const UPLINK_STOP_BUDGET: Duration = Duration::from_millis(700);
/// What a reload waits for the old uplink (it stops at once unless wedged).
const UPLINK_RELOAD_BUDGET: Duration = Duration::from_secs(3);
const BROKER_STOP_BUDGET: Duration = Duration::from_millis(600);
/// BLE tasks stop delivering at once; this bounds their unsubscribe/disconnect.
const BLE_STOP_BUDGET: Duration = Duration::from_millis(200);

struct SerialTask {
    source: serial::SerialSource,
    stop: Shutdown,
}

struct BleTask {
    stop: Shutdown,
    task: JoinHandle<()>,
}

/// The parts a reload can change, and what they need to restart.
struct Sources {
    cfg: Config,
    serial: BTreeMap<String, SerialTask>,
    /// The number of the next serial port (`Origin::Serial`); never reused.
    next_port: u32,
    routes: RouteTable,
    ble: Option<BleTask>,
    uplink: Option<(Shutdown, std::thread::JoinHandle<()>)>,
    /// An uplink thread that did not stop may still own the PUBREC log.
    uplink_wedged: bool,
    uplink_beat: Beat,
    tx: crate::channel::Sender<Incoming>,
    metrics: Arc<Metrics>,
    queue: Arc<Mutex<Queue>>,
    /// The running broker's ACL, which a reload replaces at once.
    broker_acl: Option<Arc<crate::broker::acl::Store>>,
    /// Handed to the uplink thread: a failed sync there ends the run.
    fatal: FatalTx,
    /// `[commands]`: every uplink started hands commands to it.
    downlink: Option<Arc<crate::downlink::Downlink>>,
}

/// Run the gateway until SIGTERM or SIGINT; SIGHUP reloads `config_path`.
pub async fn run(cfg: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let notifier = Arc::new(Notifier::from_env());
    let metrics = Arc::new(Metrics::default());
    // Components on their own threads report what only a restart can cure.
    let (fatal_tx, mut fatal_rx) = crate::fatal::channel();
    let started = Instant::now();
    crate::perms::private_data_dir(&cfg.gateway.data_dir)
        .with_context(|| format!("cannot create data_dir {}", cfg.gateway.data_dir.display()))?;
    crate::perms::warn_readable_secrets(&cfg, config_path.as_deref());
    let (mut pipeline, report) = Pipeline::open(&cfg, metrics.clone())
        .with_context(|| format!("cannot open the queue in {}", cfg.gateway.data_dir.display()))?;
    let q = &report.queue;
    tracing::info!(
        "queue open: {} records on disk, {} replayed into dedup state, in {:.0?}",
        q.records,
        report.replayed_records,
        started.elapsed()
    );
    let queue = pipeline.queue_handle();
    let probe = Probe {
        gateway: cfg.gateway.id.clone(),
        metrics: metrics.clone(),
        queue: queue.clone(),
        max_bytes: cfg.store.max_bytes,
        started,
    };

    let pipeline_stop = Shutdown::new();
    let (tx, rx) = crate::channel::channel(INGEST_CHANNEL, INGEST_BYTES);
    let routes = RouteTable::default();
    // The broker first: a taken port must stop start-up before anything runs.
    let mut broker = None;
    if cfg.broker.enabled {
        let (route, acks) = routes.register(Origin::Lan, 1024);
        let (mut b, feed) = Broker::start(&cfg.broker, route, acks, metrics.clone(), probe.clone())
            .await
            .context("cannot start the embedded MQTT broker")?;
        // The LAN source, like any other; it stops with the broker, which
        // also supervises it (an end of its own closes the LAN side).
        let ctx = SourceContext {
            ingest: tx.clone(),
            metrics: metrics.clone(),
            routes: routes.clone(),
            shutdown: b.stopping(),
        };
        let failure = b.ingest_failure();
        b.adopt_ingest(tokio::spawn(tracing::Instrument::instrument(
            async move {
                if let Err(why) = lan::run(feed, ctx).await {
                    failure.report(why);
                }
            },
            tracing::info_span!("lan", source = "lan"),
        )));
        if !cfg.broker.republish.is_empty()
            && let Some(rp) = &b.republish
        {
            pipeline.set_republish(rp.clone());
        }
        broker = Some(b);
    }

    let mut watchdog = Watchdog::new(notifier.clone());
    let runtime_beat = watchdog.beat("async runtime");
    let uplink_beat = watchdog.beat("uplink");
    let mut sources = Sources {
        cfg: cfg.clone(),
        serial: BTreeMap::new(),
        next_port: 0,
        routes: routes.clone(),
        ble: None,
        uplink: None,
        uplink_wedged: false,
        uplink_beat,
        tx: tx.clone(),
        metrics: metrics.clone(),
        queue: queue.clone(),
        broker_acl: broker.as_ref().map(|b| b.acl.clone()),
        fatal: fatal_tx.clone(),
        downlink: None,
    };
    // Commands from the cloud: the store opens before the uplink that
    // feeds it; the delivery task stops with the side tasks.
    let downlink_stop = Shutdown::new();
    let mut downlink_task = None;
    if let Some(c) = &cfg.commands {
        let d = crate::downlink::Downlink::open(
            c,
            &cfg.gateway.id,
            &cfg.gateway.data_dir,
            queue.clone(),
            metrics.clone(),
            routes.clone(),
        )
        .context("cannot open the command store")?;
        let (tx, rx) = mpsc::channel(256);
        routes.set_command_acks(tx);
        downlink_task = Some(tokio::spawn(tracing::Instrument::instrument(
            d.clone().run(rx, downlink_stop.subscribe()),
            tracing::info_span!("commands", source = "commands"),
        )));
        sources.downlink = Some(d);
    }
    for port in &cfg.serial {
        sources.start_serial(port.clone());
    }
    sources.start_ble();
    sources.start_uplink().context("cannot start the uplink")?;
    // Held until the end: the pipeline must outlive its sources, even when
    // there are none (a gateway with no ports still owns its queue).
    let _tx = tx;

    let stop_rx = pipeline_stop.subscribe();
    let pipeline_fatal = fatal_tx.clone();
    let worker = std::thread::Builder::new()
        .name("pipeline".into())
        .spawn(move || crate::pipeline::task::run(pipeline, rx, routes, stop_rx, watchdog, pipeline_fatal))
        .context("cannot start the pipeline thread")?;

    let side_stop = Shutdown::new();
    let metrics_task = crate::metrics::http::start(&cfg.metrics, probe.clone(), side_stop.subscribe()).await;
    let heartbeat =
        tokio::spawn(crate::service::heartbeat(runtime_beat, notifier.clone(), probe.clone(), side_stop.subscribe()));
    tracing::info!(
        "edge-gateway {} running with {} serial port(s), {} BLE device(s), ready in {:.0?}",
        cfg.gateway.id,
        cfg.serial.len(),
        cfg.ble.len(),
        started.elapsed()
    );
    notifier.notify("READY=1");
    notifier.status(&probe.take().line(0.0));

    // LAN ingest stopping on its own ends the run like SIGTERM, then exits
    // non-zero so systemd restarts the gateway (Restart=on-failure).
    let broker_failure = broker.as_ref().map(|b| b.failure());
    let failed = tokio::select! {
        r = signal_loop(&mut sources, config_path.as_deref(), &notifier) => { r?; None }
        why = async { match broker_failure { Some(f) => f.await, None => std::future::pending().await } } => Some(why),
        f = fatal_rx.recv() => exit_fatal(&f, &notifier),
    };
    notifier.notify("STOPPING=1\nSTATUS=stopping: sealing the open batch into the queue");
    if let Some(b) = &mut broker {
        tracing::info!("stopping: closing the broker's clients");
        b.stop(BROKER_STOP_BUDGET).await;
    }
    sources.stop_ble().await;
    tracing::info!("stopping: closing the open batch into the queue");
    pipeline_stop.trigger();
    let uplink = sources.uplink.take();
    if let Some((stop, _)) = &uplink {
        stop.trigger();
    }
    let joined = tokio::task::spawn_blocking(move || worker.join());
    let _rx = match tokio::time::timeout(PIPELINE_STOP_BUDGET, joined).await {
        Ok(Ok(Ok(Ok(rx)))) => Some(rx),
        Ok(Ok(Ok(Err(e)))) => {
            if let Some(f) = e.downcast_ref::<Fatal>() {
                exit_fatal(f, &notifier);
            }
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
    if let Some((_, u)) = uplink {
        let joined = tokio::task::spawn_blocking(move || u.join());
        if tokio::time::timeout(UPLINK_STOP_BUDGET, joined).await.is_err() {
            tracing::warn!("uplink did not stop within {UPLINK_STOP_BUDGET:?}");
        }
    }
    sources.stop_all_serial().await;
    downlink_stop.trigger();
    if let Some(t) = downlink_task {
        let _ = t.await;
    }
    if let Some(b) = &mut broker {
        b.finish(SOURCE_STOP_BUDGET).await;
    }
    side_stop.trigger();
    let _ = heartbeat.await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    crate::metrics::summary::log(&metrics);
    match failed {
        Some(why) => anyhow::bail!("LAN ingest stopped ({why}); exiting so that the service is restarted"),
        None => Ok(()),
    }
}

impl Sources {
    /// What every source is started with; `stop` is its own stop signal.
    fn context(&self, stop: &Shutdown) -> SourceContext {
        SourceContext {
            ingest: self.tx.clone(),
            metrics: self.metrics.clone(),
            routes: self.routes.clone(),
            shutdown: stop.subscribe(),
        }
    }

    fn start_serial(&mut self, port: SerialConfig) {
        let number = self.next_port;
        self.next_port += 1;
        let stop = Shutdown::new();
        let source = serial::SerialSource::spawn(port, number, self.context(&stop));
        self.serial.insert(source.name.clone(), SerialTask { source, stop });
    }

    async fn stop_serial(&mut self, name: &str) {
        let Some(t) = self.serial.remove(name) else { return };
        t.stop.trigger();
        let mut task = t.source.task;
        if tokio::time::timeout(SOURCE_STOP_BUDGET, &mut task).await.is_err() {
            task.abort();
        }
        self.metrics.forget_port(name);
    }

    async fn stop_all_serial(&mut self) {
        let mut set = tokio::task::JoinSet::new();
        let mut aborts = Vec::new();
        for t in std::mem::take(&mut self.serial).into_values() {
            t.stop.trigger();
            aborts.push(t.source.task.abort_handle());
            set.spawn(t.source.task);
        }
        let _ = tokio::time::timeout(SOURCE_STOP_BUDGET, async { while set.join_next().await.is_some() {} }).await;
        aborts.iter().for_each(|a| a.abort());
    }

    /// BLE readings carry `ble::BLE_PORT`, which has no ack route. BLE stops
    /// first at shutdown (it needs no final acks, and a notification that
    /// came after the pipeline's last drain would be lost: BLE devices never
    /// resend).
    fn start_ble(&mut self) {
        if self.cfg.ble.is_empty() {
            return;
        }
        let stop = Shutdown::new();
        let task = tokio::spawn(tracing::Instrument::instrument(
            ble::run(
                self.cfg.ble.clone(),
                self.cfg.ble_scan.clone(),
                self.cfg.gateway.data_dir.clone(),
                self.context(&stop),
            ),
            tracing::info_span!("ble", source = "ble"),
        ));
        self.ble = Some(BleTask { stop, task });
    }

    async fn stop_ble(&mut self) {
        if let Some(BleTask { stop, mut task }) = self.ble.take() {
            stop.trigger();
            if tokio::time::timeout(BLE_STOP_BUDGET, &mut task).await.is_err() {
                task.abort();
            }
        }
    }

    fn start_uplink(&mut self) -> anyhow::Result<()> {
        Metrics::set(&self.metrics.upstream_configured, u64::from(self.cfg.upstream.is_some()));
        anyhow::ensure!(!self.uplink_wedged, "the previous uplink never stopped; restart the gateway");
        let Some(up) = &self.cfg.upstream else {
            tracing::info!("no [upstream] configured: batches stay in the queue");
            // Nothing to prove alive.
            self.uplink_beat.park();
            return Ok(());
        };
        let mut u = Uplink::new(
            up,
            &self.cfg.gateway.id,
            &self.cfg.gateway.data_dir,
            self.queue.clone(),
            self.metrics.clone(),
        )?;
        if !self.cfg.rules.is_empty() {
            let rules =
                crate::rules::Rules::compile(&self.cfg.rules, &self.cfg.gateway.id).map_err(anyhow::Error::msg)?;
            u.set_rules(Arc::new(rules));
        }
        u.set_lanes(self.cfg.lanes.clone());
        if let Some(d) = &self.downlink {
            u.set_downlink(d.clone());
        }
        let stop = Shutdown::new();
        let thread = uplink::spawn(u, stop.subscribe(), Some(self.uplink_beat.clone()), self.fatal.clone())
            .context("cannot start the uplink thread")?;
        self.uplink = Some((stop, thread));
        Ok(())
    }

    /// Stop the uplink thread and wait for it, at most
    /// `UPLINK_RELOAD_BUDGET`: two uplinks must never share the PUBREC log,
    /// so false (and no new uplink) when it did not stop. Its beat then goes
    /// stale and the watchdog restarts the gateway.
    async fn stop_uplink(&mut self) -> bool {
        let Some((stop, thread)) = self.uplink.take() else { return true };
        stop.trigger();
        let t0 = Instant::now();
        let joined = tokio::task::spawn_blocking(move || thread.join());
        if tokio::time::timeout(UPLINK_RELOAD_BUDGET, joined).await.is_err() {
            tracing::error!(
                "reload: the uplink did not stop within {UPLINK_RELOAD_BUDGET:?}; not starting a second one beside it \
                 (the watchdog restarts the gateway)"
            );
            self.uplink_wedged = true;
            return false;
        }
        // After the join: its loop cannot beat any more.
        self.uplink_beat.park();
        if t0.elapsed() > Duration::from_secs(1) {
            tracing::warn!("reload: the uplink took {:.1?} to stop", t0.elapsed());
        }
        true
    }
}

/// Wait for SIGTERM/SIGINT; SIGHUP reloads the config in between.
async fn signal_loop(sources: &mut Sources, config_path: Option<&Path>, notifier: &Notifier) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                let Some(path) = config_path else {
                    tracing::warn!("SIGHUP: no config file to re-read");
                    continue;
                };
                notifier.notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
                match Config::load(path) {
                    Ok(new) => sources.apply(new).await,
                    Err(e) => {
                        Event::ReloadRefused { error: &e }.emit(&sources.metrics);
                    }
                }
                notifier.notify("READY=1");
            }
        }
    }
}

/// CLOCK_MONOTONIC in µs, which `Type=notify-reload` wants with RELOADING=1.
fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0)
}

/// The one place the process exits on a [`Fatal`] (see [`crate::fatal`]).
fn exit_fatal(f: &Fatal, notifier: &Notifier) -> ! {
    tracing::error!("{f}; exiting with status {EXIT_FATAL} (the service manager restarts the gateway)");
    notifier.notify(&format!("STATUS=fatal: {f}"));
    std::process::exit(EXIT_FATAL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::Weigh;

    /// The ingest channel's two bounds: ordinary readings meet the count
    /// first (the byte bound changes nothing measured at full load), a LAN
    /// payload of 256 KiB of numbers (a 1 MiB reading) meets the bytes.
    #[test]
    fn ordinary_readings_meet_the_count_and_long_arrays_the_bytes() {
        let line = br#"{"device":"wrist-0042","sensor":"heart_rate","seq":123456,"ts":1764000000000,"value":72}"#;
        let (r, _) = crate::wire::parse_jsonl(line, None, 0).unwrap();
        let ordinary = Incoming::new(r, true, crate::reading::Origin::Serial(0)).weight();
        assert!((100..=256).contains(&ordinary), "an ordinary reading weighs {ordinary} bytes");
        assert!(INGEST_CHANNEL * ordinary < INGEST_BYTES, "{INGEST_CHANNEL} ordinary readings fit the byte bound");

        let mut payload = b"{\"value\":[".to_vec();
        while payload.len() < 256 * 1024 - 4 {
            payload.extend_from_slice(b"1,");
        }
        payload.extend_from_slice(b"1]}");
        let (r, _) = crate::wire::parse_mqtt_payload(&payload, "w-1", "ecg", 0).unwrap();
        let heavy = Incoming::new(r, false, crate::reading::Origin::Lan).weight();
        assert!(heavy > 1 << 20, "131,000 numbers as f64 weigh {heavy} bytes");
        assert!(INGEST_BYTES / heavy <= 2, "at most two such readings wait in the channel");
    }
}
