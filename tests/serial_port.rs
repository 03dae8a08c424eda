//! The real serial task on real PTYs, with a simulated wearable on the
//! master side and the test playing the pipeline (cumulative acks).

use edge_gateway::config::{Framing, SerialConfig};
use edge_gateway::demo::sim::{Malformed, SimConfig, SimDevice, open_pty, point_symlink};
use edge_gateway::metrics::{Metrics, PortCounters};
use edge_gateway::route::ToDevice;
use edge_gateway::source::serial;
use edge_gateway::{Ack, Incoming, Origin};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

const PORT: &str = "dock1";
const PATIENCE: Duration = Duration::from_secs(10);

/// Everything logged by any test, captured by one global subscriber:
/// `set_default` is per thread and tracing caches per-callsite interest
/// globally, which loses events when tests run in parallel. Tests tell
/// their lines apart by port name.
#[derive(Clone, Default)]
struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_capture() -> &'static LogCapture {
    static LOG: OnceLock<LogCapture> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = LogCapture::default();
        let me = log.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || me.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_global_default(sub).expect("no other global subscriber");
        log
    })
}

/// The log lines of serial port `port`.
fn port_log(port: &str) -> Vec<String> {
    let needle = format!("serial {port}:");
    String::from_utf8_lossy(&log_capture().0.lock().unwrap())
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_string)
        .collect()
}

fn count(lines: &[String], what: &str) -> usize {
    lines.iter().filter(|l| l.contains(what)).count()
}

/// The serial task plus a stand-in pipeline that acks, per device, the
/// highest seq received so far (readings on one port arrive in order).
struct Gateway {
    name: String,
    metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    received: Arc<Mutex<Vec<Incoming>>>,
}

impl Gateway {
    fn start(path: &Path, framing: Framing) -> Gateway {
        Gateway::start_holding_acks(PORT, path, framing, Duration::ZERO)
    }

    /// Like `start`, but the pipeline acks nothing until `hold` has passed,
    /// as when the queue is slow to commit.
    fn start_holding_acks(name: &str, path: &Path, framing: Framing, hold: Duration) -> Gateway {
        log_capture();
        let metrics = Arc::new(Metrics::default());
        let (tx, mut rx) = edge_gateway::channel::channel::<Incoming>(64, 1 << 20);
        let (ack_tx, ack_rx) = mpsc::channel::<ToDevice>(64);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(serial::run(
            config(name, path, framing),
            Origin::Serial(3),
            tx,
            ack_rx,
            metrics.clone(),
            stop_rx,
        ));
        let received = Arc::new(Mutex::new(Vec::new()));
        let rec = received.clone();
        let acks_from = tokio::time::Instant::now() + hold;
        tokio::spawn(async move {
            let mut highest: HashMap<String, u64> = HashMap::new();
            while let Some(inc) = rx.recv().await {
                rec.lock().unwrap().push(inc.clone());
                if let Some(seq) = inc.reading.seq {
                    let h = highest.entry(inc.reading.device.clone()).or_insert(seq);
                    *h = (*h).max(seq);
                    tokio::time::sleep_until(acks_from).await;
                    let _ = ack_tx.send(ToDevice::Ack(Ack { device: inc.reading.device, seq: *h, boot: None })).await;
                }
            }
        });
        Gateway { name: name.to_string(), metrics, stop, task, received }
    }

    fn port(&self) -> PortCounters {
        self.metrics.ports().get(&self.name).cloned().unwrap_or_default()
    }

    fn received(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Stop the task and check it ends within a second.
    async fn shutdown(self) {
        let t = Instant::now();
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(1), self.task)
            .await
            .expect("serial task did not stop within 1 s")
            .unwrap();
        eprintln!("shutdown took {:?}", t.elapsed());
    }
}

fn config(name: &str, path: &Path, framing: Framing) -> SerialConfig {
    SerialConfig {
        name: name.into(),
        path: path.to_path_buf(),
        baud: 115_200,
        framing,
        device: None,
        devices: None,
        time_sync: true,
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Run blocking device code off the runtime.
async fn device<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn send_and_wait_acked(dev: &mut SimDevice, n: usize) {
    for _ in 0..n {
        dev.send_next().unwrap();
    }
    assert!(dev.wait_all_acked(PATIENCE).unwrap(), "device still has unacked readings: {:?}", dev.stats());
}

async fn streaming(framing: Framing) {
    let pty = open_pty().unwrap();
    let gw = Gateway::start(&pty.slave_path, framing);
    let mut cfg = SimConfig::new("wrist-01", framing);
    cfg.duplicate_probability = 0.05;
    cfg.malformed_probability = 0.01;
    cfg.seed = 42;
    cfg.first_seq = 1;
    let mut dev = SimDevice::on_pty(cfg, pty).unwrap();
    let dev = device(move || {
        for i in 0..1000 {
            dev.send_next().unwrap();
            if i % 50 == 0 {
                dev.send_malformed(Malformed::ALL[(i / 50) % Malformed::ALL.len()]).unwrap();
            }
        }
        assert!(dev.wait_all_acked(PATIENCE).unwrap(), "{:?}", dev.stats());
        dev
    })
    .await;
    let stats = dev.stats();
    eprintln!("{framing:?}: {stats:?}");
    assert_eq!((stats.pending, stats.sent_unique, stats.acked_through), (0, 1000, Some(1000)));
    assert!(stats.duplicates_injected > 0 && stats.malformed_sent > 20);
    assert_eq!(stats.bad_acks, 0);

    wait_until("every frame sent arrives", || gw.received() as u64 == stats.sent_total).await;
    wait_until("malformed frames are counted", || gw.port().malformed == stats.malformed_sent).await;
    // Nothing extra trickles in afterwards.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gw.received() as u64, stats.sent_total);
    let port = gw.port();
    assert_eq!(port.malformed, stats.malformed_sent);
    assert_eq!(port.readings, stats.sent_total);
    assert!(port.connected);
    assert_eq!(port.reconnects, 0);
    assert!(Metrics::get(&gw.metrics.acks_sent) > 0);

    let unique: BTreeMap<u64, _> = {
        let rec = gw.received.lock().unwrap();
        assert!(rec.iter().all(|i| i.origin == Origin::Serial(3) && i.ts_from_device));
        rec.iter().map(|i| (i.reading.seq.unwrap(), i.reading.clone())).collect()
    };
    assert_eq!(unique.into_values().collect::<Vec<_>>(), dev.created());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_jsonl_with_duplicates_and_malformed_lines() {
    streaming(Framing::Jsonl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_cobs_with_duplicates_and_malformed_frames() {
    streaming(Framing::Cobs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_resends_until_acked_and_the_late_acks_cover_everything() {
    let pty = open_pty().unwrap();
    let gw = Gateway::start_holding_acks(PORT, &pty.slave_path, Framing::Cobs, Duration::from_millis(1500));
    let mut cfg = SimConfig::new("wrist-05", Framing::Cobs);
    cfg.resend_after = Duration::from_millis(300);
    cfg.first_seq = 1;
    let mut dev = SimDevice::on_pty(cfg, pty).unwrap();
    let dev = device(move || {
        send_and_wait_acked(&mut dev, 50);
        dev
    })
    .await;
    let stats = dev.stats();
    assert!(stats.resent >= 50, "no ack for 1.5 s must trigger resends: {stats:?}");
    assert_eq!((stats.pending, stats.acked_through), (0, Some(50)));
    wait_until("resends reach the pipeline too", || gw.received() as u64 == stats.sent_total).await;
    assert_eq!(gw.port().readings, stats.sent_total);
    gw.shutdown().await;
}

#[tokio::test]
async fn hot_plug_via_symlink_resumes_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("ttyDock");
    let mut next_seq = 1;
    let mut gw: Option<Gateway> = None;
    for round in 0..3u64 {
        let pty = open_pty().unwrap();
        point_symlink(&link, &pty.slave_path).unwrap();
        let gw =
            gw.get_or_insert_with(|| Gateway::start_holding_acks("hotplug", &link, Framing::Jsonl, Duration::ZERO));
        let mut cfg = SimConfig::new("wrist-07", Framing::Jsonl);
        cfg.first_seq = next_seq;
        cfg.seed = round + 1;
        let mut dev = SimDevice::on_pty(cfg, pty).unwrap();
        let dev = device(move || {
            send_and_wait_acked(&mut dev, 100);
            dev
        })
        .await;
        wait_until("connected", || gw.port().connected).await;
        assert_eq!(gw.port().reconnects, round, "one connection per plug-in");
        next_seq = dev.next_seq();
        device(move || dev.unplug()).await;
        wait_until("disconnected after unplug", || !gw.port().connected).await;
    }
    let gw = gw.unwrap();
    let seqs: Vec<u64> = gw.received.lock().unwrap().iter().map(|i| i.reading.seq.unwrap()).collect();
    assert_eq!(seqs, (1..=300).collect::<Vec<_>>());
    // Retries while the symlink dangled are not logged one by one.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let log = port_log("hotplug");
    let text = log.join("\n");
    eprintln!("{text}");
    assert_eq!(count(&log, "connected"), 3, "one line per plug-in:\n{text}");
    assert_eq!(count(&log, "unplugged"), 3, "one line per unplug:\n{text}");
    assert!(count(&log, "cannot open") <= 3, "at most one per gap:\n{text}");
    gw.shutdown().await;
}

#[tokio::test]
async fn missing_path_at_start_is_retried_until_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    let link: PathBuf = dir.path().join("not-yet");
    let gw = Gateway::start_holding_acks("late", &link, Framing::Cobs, Duration::ZERO);
    // Long enough for several retries (100 + 200 + 400 ms …).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(!gw.task.is_finished());
    assert!(!gw.port().connected);
    let log = port_log("late");
    assert_eq!(count(&log, "cannot open"), 1, "one line, not one per retry:\n{log:#?}");

    let pty = open_pty().unwrap();
    point_symlink(&link, &pty.slave_path).unwrap();
    let mut dev = SimDevice::on_pty(SimConfig::new("wrist-02", Framing::Cobs), pty).unwrap();
    // Keep the device plugged in (returned, not dropped) while checking.
    let _dev = device(move || {
        send_and_wait_acked(&mut dev, 20);
        dev
    })
    .await;
    let port = gw.port();
    assert!(port.connected);
    assert_eq!((port.readings, port.reconnects, port.malformed), (20, 0, 0));
    let log = port_log("late");
    assert_eq!(count(&log, "connected"), 1, "{log:#?}");
    gw.shutdown().await;
}

#[tokio::test]
async fn shutdown_is_prompt_when_the_port_is_missing() {
    let gw = Gateway::start(Path::new("/nonexistent/ttyNothing"), Framing::Jsonl);
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_writes_acks_already_received_then_stops() {
    let pty = open_pty().unwrap();
    let metrics = Arc::new(Metrics::default());
    let (tx, mut rx) = edge_gateway::channel::channel(8, 1 << 20);
    let (ack_tx, ack_rx) = mpsc::channel(8);
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(serial::run(
        config(PORT, &pty.slave_path, Framing::Jsonl),
        Origin::Serial(0),
        tx,
        ack_rx,
        metrics.clone(),
        stop_rx,
    ));
    let mut sim = SimConfig::new("wrist-03", Framing::Jsonl);
    sim.first_seq = 1;
    let mut dev = SimDevice::on_pty(sim, pty).unwrap();
    let mut dev = device(move || {
        dev.send_next().unwrap();
        dev
    })
    .await;
    let inc = tokio::time::timeout(PATIENCE, rx.recv()).await.unwrap().unwrap();
    assert_eq!(inc.reading.seq, Some(1));

    // The ack and the shutdown arrive together: the ack must still go out.
    ack_tx.send(ToDevice::Ack(Ack { device: "wrist-03".into(), seq: 1, boot: None })).await.unwrap();
    let t = Instant::now();
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(1), task).await.expect("stops within 1 s").unwrap();
    assert!(t.elapsed() < Duration::from_secs(1));
    let dev = device(move || {
        let ok = dev.wait_all_acked(PATIENCE).unwrap();
        (ok, dev)
    })
    .await;
    assert!(dev.0, "ack written before stopping: {:?}", dev.1.stats());
    assert_eq!(dev.1.stats().acked_through, Some(1));
    assert_eq!(Metrics::get(&metrics.acks_sent), 1);
    assert!(!metrics.ports()[PORT].connected);
}
