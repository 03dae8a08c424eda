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
//! touched by a reload.

use crate::broker::{Broker, StatusSource, acl};
use crate::config::{Config, SerialConfig};
use crate::fatal::{EXIT_FATAL, Fatal, FatalTx};
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::queue::Queue;
use crate::reading::{Ack, Incoming, LAN_PORT, PortId, now_ms};
use crate::service::{Beat, Notifier, Watchdog};
use crate::shutdown::{self, Shutdown};
use crate::source::{ble, serial};
use crate::uplink::{self, Uplink};
use anyhow::Context;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Readings waiting between the sources and the pipeline. Enough to ride
/// out one slow fsync at full rate; beyond it the ports are back-pressured
/// (the devices keep their readings and resend).
const INGEST_CHANNEL: usize = 16_384;
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
/// How often the heartbeat task refreshes `STATUS=`.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Ack routes by port: serial ports come and go with reloads.
type Routes = Arc<Mutex<HashMap<PortId, mpsc::Sender<Ack>>>>;

struct SerialTask {
    cfg: SerialConfig,
    port_id: PortId,
    stop: Shutdown,
    task: JoinHandle<()>,
}

struct BleTask {
    stop: Shutdown,
    task: JoinHandle<()>,
}

/// The parts a reload can change, and what they need to restart.
struct Sources {
    cfg: Config,
    serial: BTreeMap<String, SerialTask>,
    next_port: PortId,
    routes: Routes,
    ble: Option<BleTask>,
    uplink: Option<(Shutdown, std::thread::JoinHandle<()>)>,
    /// An uplink thread that did not stop may still own the PUBREC log.
    uplink_wedged: bool,
    uplink_beat: Beat,
    tx: mpsc::Sender<Incoming>,
    metrics: Arc<Metrics>,
    queue: Arc<Mutex<Queue>>,
    /// The running broker's ACL, which a reload replaces at once.
    broker_acl: Option<Arc<crate::broker::acl::Store>>,
    /// Handed to the uplink thread: a failed sync there ends the run.
    fatal: FatalTx,
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
    let queue = pipeline.queue_handle();

    let pipeline_stop = Shutdown::new();
    let (tx, rx) = mpsc::channel(INGEST_CHANNEL);
    let routes: Routes = Arc::default();
    // The broker first: a taken port must stop start-up before anything runs.
    let mut broker = None;
    if cfg.broker.enabled {
        let (ack_tx, ack_rx) = mpsc::channel(1024);
        routes.lock().unwrap_or_else(|e| e.into_inner()).insert(LAN_PORT, ack_tx);
        let status = StatusSource { gateway: cfg.gateway.id.clone(), queue: queue.clone() };
        let b = Broker::start(&cfg, tx.clone(), LAN_PORT, ack_rx, metrics.clone(), status)
            .await
            .context("cannot start the embedded MQTT broker")?;
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
    };
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
        .spawn(move || run_pipeline(pipeline, rx, routes, stop_rx, watchdog, pipeline_fatal))
        .context("cannot start the pipeline thread")?;

    let side_stop = Shutdown::new();
    let metrics_task = start_metrics(&cfg, metrics.clone(), queue.clone(), started, side_stop.subscribe()).await;
    let heartbeat =
        tokio::spawn(heartbeat(runtime_beat, notifier.clone(), metrics.clone(), queue.clone(), side_stop.subscribe()));
    tracing::info!(
        "edge-gateway {} running with {} serial port(s), {} BLE device(s), ready in {:.0?}",
        cfg.gateway.id,
        cfg.serial.len(),
        cfg.ble.len(),
        started.elapsed()
    );
    notifier.notify("READY=1");
    notifier.status(&status_line(&metrics, &queue, 0.0));

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
    if let Some(b) = &mut broker {
        b.finish(SOURCE_STOP_BUDGET).await;
    }
    side_stop.trigger();
    let _ = heartbeat.await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    log_summary(&metrics);
    match failed {
        Some(why) => anyhow::bail!("LAN ingest stopped ({why}); exiting so that the service is restarted"),
        None => Ok(()),
    }
}

impl Sources {
    fn start_serial(&mut self, port: SerialConfig) {
        let port_id = self.next_port;
        self.next_port += 1;
        let (ack_tx, ack_rx) = mpsc::channel(256);
        self.routes.lock().unwrap_or_else(|e| e.into_inner()).insert(port_id, ack_tx);
        let stop = Shutdown::new();
        let span = tracing::info_span!("serial", source = "serial");
        let task = tokio::spawn(tracing::Instrument::instrument(
            serial::run(port.clone(), port_id, self.tx.clone(), ack_rx, self.metrics.clone(), stop.subscribe()),
            span,
        ));
        self.serial.insert(port.name.clone(), SerialTask { cfg: port, port_id, stop, task });
    }

    async fn stop_serial(&mut self, name: &str) {
        let Some(t) = self.serial.remove(name) else { return };
        t.stop.trigger();
        let mut task = t.task;
        if tokio::time::timeout(SOURCE_STOP_BUDGET, &mut task).await.is_err() {
            task.abort();
        }
        self.routes.lock().unwrap_or_else(|e| e.into_inner()).remove(&t.port_id);
        self.metrics.forget_port(name);
    }

    async fn stop_all_serial(&mut self) {
        let mut set = tokio::task::JoinSet::new();
        let mut aborts = Vec::new();
        for t in std::mem::take(&mut self.serial).into_values() {
            t.stop.trigger();
            aborts.push(t.task.abort_handle());
            set.spawn(t.task);
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
                self.tx.clone(),
                self.metrics.clone(),
                stop.subscribe(),
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
        let u = Uplink::new(
            up,
            &self.cfg.gateway.id,
            &self.cfg.gateway.data_dir,
            self.queue.clone(),
            self.metrics.clone(),
        )?;
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

    /// Apply a new, valid config (see the module doc).
    async fn apply(&mut self, new: Config) {
        let old = &self.cfg;
        let restart_only: Vec<&str> = [
            ("[gateway]", old.gateway != new.gateway),
            ("[pipeline]", old.pipeline != new.pipeline),
            ("[store]", old.store != new.store),
            ("[broker]", acl::without_acl(&old.broker) != acl::without_acl(&new.broker)),
            ("[metrics]", old.metrics != new.metrics),
            ("[log]", old.log != new.log),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect();
        if !restart_only.is_empty() {
            tracing::warn!(
                "reload: {} changed; these take effect at the next restart (running values kept)",
                restart_only.join(", ")
            );
        }
        let mut changes = Vec::new();
        // The broker's ACL: in force for every connection's next packet.
        if let Some(store) = &self.broker_acl
            && store.replace(acl::Acl::from_config(&new.broker))
        {
            changes.push(format!("broker ACL replaced ({} rule(s))", store.get().len()));
        }
        self.cfg.broker.acl = new.broker.acl.clone();
        self.cfg.broker.denied_publish = new.broker.denied_publish;
        for u in &mut self.cfg.broker.users {
            u.publish = new.broker.users.iter().find(|n| n.name == u.name).and_then(|n| n.publish.clone());
        }
        // Serial ports: by name; a changed entry is stopped and started again.
        let wanted: BTreeMap<String, SerialConfig> = new.serial.iter().map(|p| (p.name.clone(), p.clone())).collect();
        let gone: Vec<String> = self
            .serial
            .iter()
            .filter(|(name, t)| wanted.get(*name) != Some(&t.cfg))
            .map(|(name, _)| name.clone())
            .collect();
        for name in &gone {
            self.stop_serial(name).await;
            if !wanted.contains_key(name) {
                changes.push(format!("serial {name} removed"));
            }
        }
        for (name, port) in wanted {
            if !self.serial.contains_key(&name) {
                changes.push(if gone.contains(&name) {
                    format!("serial {name} changed")
                } else {
                    format!("serial {name} added")
                });
                self.start_serial(port);
            }
        }
        self.cfg.serial = new.serial.clone();
        // BLE: one hub owns the adapter, so any change restarts it.
        if self.cfg.ble != new.ble || self.cfg.ble_scan != new.ble_scan {
            self.stop_ble().await;
            for b in &self.cfg.ble {
                if !new.ble.iter().any(|n| n.name == b.name) {
                    self.metrics.forget_port(&format!("ble:{}", b.name));
                }
            }
            changes.push(format!("BLE restarted with {} device(s)", new.ble.len()));
            self.cfg.ble = new.ble.clone();
            self.cfg.ble_scan = new.ble_scan.clone();
            self.start_ble();
        }
        // Upstream: a new session (the PUBREC log handles a different broker).
        if self.cfg.upstream != new.upstream && !self.stop_uplink().await {
            changes.push("upstream NOT restarted (the old uplink is stuck)".to_string());
        } else if self.cfg.upstream != new.upstream {
            Metrics::set(&self.metrics.upstream_connected, 0);
            let previous = std::mem::replace(&mut self.cfg.upstream, new.upstream.clone());
            match self.start_uplink() {
                Ok(()) => changes.push("upstream reconnecting with the new settings".to_string()),
                Err(e) => {
                    tracing::error!(
                        "reload: cannot start the uplink with the new [upstream] ({e:#}); keeping the old one"
                    );
                    self.cfg.upstream = previous;
                    if let Err(e) = self.start_uplink() {
                        tracing::error!("reload: the old uplink does not start either: {e:#}");
                    }
                }
            }
        }
        Metrics::inc(&self.metrics.reloads);
        if changes.is_empty() {
            tracing::info!("reload: config re-read; no source or upstream changes");
        } else {
            tracing::info!("reload: {}", changes.join(", "));
        }
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
                        Metrics::inc(&sources.metrics.reloads_failed);
                        tracing::error!("reload refused, keeping the running config: {e}");
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

/// Bind `[metrics] listen` and serve. A taken port is logged, not fatal:
/// collecting readings matters more than being scraped.
async fn start_metrics(
    cfg: &Config,
    metrics: Arc<Metrics>,
    queue: Arc<Mutex<Queue>>,
    started: Instant,
    stop: watch::Receiver<bool>,
) -> Option<JoinHandle<()>> {
    if !cfg.metrics.enabled {
        return None;
    }
    let listener = match tokio::net::TcpListener::bind(cfg.metrics.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("metrics: cannot listen on {}: {e}; /metrics is off until restart", cfg.metrics.listen);
            return None;
        }
    };
    tracing::info!("metrics on http://{}/metrics", listener.local_addr().unwrap_or(cfg.metrics.listen));
    if !cfg.metrics.listen.ip().is_loopback() {
        tracing::warn!(
            "metrics: {} is not loopback: /metrics has no authentication and names workers' devices; \
             anyone on that network can read it (bind 127.0.0.1 and scrape through SSH or a proxy)",
            cfg.metrics.listen
        );
    }
    let (gateway, max_bytes) = (cfg.gateway.id.clone(), cfg.store.max_bytes);
    let render: crate::metrics::http::Render = Arc::new(move || {
        let st = queue.lock().unwrap_or_else(|e| e.into_inner()).status();
        crate::metrics::render::render(&crate::metrics::render::Snapshot {
            metrics: &metrics,
            gateway: &gateway,
            queue: st,
            queue_max_bytes: max_bytes,
            uptime_s: started.elapsed().as_secs_f64(),
            now_ms: now_ms(),
        })
    });
    Some(tokio::spawn(crate::metrics::http::serve(listener, render, stop)))
}

/// Beats for the watchdog (proving this runtime runs) and refreshes the
/// one-line `STATUS=` that `systemctl status` shows.
async fn heartbeat(
    beat: Beat,
    notifier: Arc<Notifier>,
    metrics: Arc<Metrics>,
    queue: Arc<Mutex<Queue>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(beat.every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last, mut last_count) = (Instant::now(), Metrics::get(&metrics.readings_accepted));
    loop {
        tokio::select! {
            _ = shutdown::wait(&mut stop) => return,
            _ = tick.tick() => {}
        }
        beat.beat();
        crate::crashpoint::stall("heartbeat");
        if last.elapsed() >= STATUS_EVERY {
            let count = Metrics::get(&metrics.readings_accepted);
            let rate = (count - last_count) as f64 / last.elapsed().as_secs_f64();
            (last, last_count) = (Instant::now(), count);
            notifier.status(&status_line(&metrics, &queue, rate));
        }
    }
}

fn status_line(m: &Metrics, queue: &Mutex<Queue>, rate: f64) -> String {
    let st = queue.lock().unwrap_or_else(|e| e.into_inner()).status();
    let ports = m.ports();
    let up = ports.values().filter(|p| p.connected).count();
    let age = st.oldest_created_ms.map(|t| now_ms().saturating_sub(t) / 1000).unwrap_or(0);
    format!(
        "{rate:.0} readings/s in, {} duplicates dropped; queue {} batches ({} KiB, oldest {age} s); upstream {}, {} readings delivered; links {up}/{} up",
        Metrics::get(&m.duplicates_dropped),
        st.batches,
        st.bytes / 1024,
        match (Metrics::get(&m.upstream_configured) > 0, Metrics::get(&m.upstream_connected)) {
            (false, _) => "not configured",
            (true, 0) => "disconnected",
            _ => "connected",
        },
        Metrics::get(&m.readings_delivered),
        ports.len()
    )
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

/// The pipeline thread's loop: take readings as they come, wake for batch
/// ages, group commits and watchdog pings, and route acks back to their ports.
fn run_pipeline(
    mut p: Pipeline,
    mut rx: mpsc::Receiver<Incoming>,
    routes: Routes,
    mut stop: watch::Receiver<bool>,
    mut watchdog: Watchdog,
    fatal: FatalTx,
) -> anyhow::Result<mpsc::Receiver<Incoming>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
    let r = rt.block_on(async move {
        loop {
            let deadline = tokio::time::Instant::from_std(p.next_deadline().min(watchdog.next_due()));
            tokio::select! {
                biased;
                _ = shutdown::wait(&mut stop) => break,
                msg = rx.recv() => match msg {
                    Some(first) => {
                        let (now, ms) = (Instant::now(), now_ms());
                        p.ingest(first, now, ms)?;
                        // Take what is already queued without waking again.
                        for _ in 0..4096 {
                            match rx.try_recv() {
                                Ok(inc) => p.ingest(inc, now, ms)?,
                                Err(_) => break,
                            }
                        }
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => {}
            }
            send_acks(&routes, p.tick(Instant::now())?);
            crate::crashpoint::stall("pipeline-loop");
            watchdog.alive(Instant::now());
        }
        // Whatever the sources handed over is the pipeline's to keep.
        let (now, ms) = (Instant::now(), now_ms());
        while let Ok(inc) = rx.try_recv() {
            p.ingest(inc, now, ms)?;
        }
        send_acks(&routes, p.close()?);
        // The channel goes back to `run`, alive: a port whose channel closed
        // would stop at once, before writing the final acks.
        Ok::<_, Fatal>(rx)
    });
    // A fatal error stops the loop before anything more is acked; `run`
    // exits on it.
    r.map_err(|f| {
        fatal.raise(f.clone());
        f.into()
    })
}

/// The one place the process exits on a [`Fatal`] (see [`crate::fatal`]).
fn exit_fatal(f: &Fatal, notifier: &Notifier) -> ! {
    tracing::error!("{f}; exiting with status {EXIT_FATAL} (the service manager restarts the gateway)");
    notifier.notify(&format!("STATUS=fatal: {f}"));
    std::process::exit(EXIT_FATAL)
}

fn send_acks(routes: &Routes, acks: Vec<(PortId, Ack)>) {
    if acks.is_empty() {
        return;
    }
    let routes = routes.lock().unwrap_or_else(|e| e.into_inner());
    for (port, ack) in acks {
        // A full or closed route means the port is busy or down: the device
        // resends, and its duplicate triggers a fresh cumulative ack.
        if let Some(route) = routes.get(&port) {
            let _ = route.try_send(ack);
        }
    }
}
