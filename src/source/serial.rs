//! Serial input: one task per configured port (charging dock, BLE-UART dongle).
//!
//! The task owns its port for the gateway's lifetime. Docks get unplugged,
//! re-enumerate under a new `/dev/ttyACM*`, or are not there at boot, so port
//! problems are never errors of the task: it reopens the configured path with
//! exponential backoff (100 ms doubling to 5 s) and logs one line per state
//! change, not per attempt, so an absent dock does not flood the journal.
//!
//! Acks are written back on the port they came from. While the port is down,
//! acks for it are dropped. That is safe because acks are cumulative and the
//! device keeps every unacked reading and resends it: a resend that reaches
//! the pipeline as a duplicate is acked again, and that fresh ack covers
//! everything the dropped one did.

use crate::config::SerialConfig;
use crate::metrics::Metrics;
use crate::reading::{Ack, Incoming, PortId, now_ms};
use crate::wire::{self, FrameSplitter, WireError};
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_serial::{SerialPortBuilderExt, SerialStream};
use tracing::{debug, info, warn};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A session that lasted this long was a real connection, so the next
/// failure starts again from the shortest backoff. Shorter sessions (a port
/// that opens and then fails at once) keep doubling, so they cannot spin.
const STABLE_SESSION: Duration = Duration::from_secs(1);
/// A UART drains at line rate whether or not the device reads, so a write
/// this slow means something is wedged; the acks are dropped (see module doc).
const ACK_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Shutdown must be prompt; acks already received get this long to go out.
const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_millis(50);
const MALFORMED_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// Capacity of the ack channel created by [`SerialSource::spawn`].
pub const ACK_CHANNEL_CAPACITY: usize = 256;

/// Handle to a running serial port task.
#[derive(Debug)]
pub struct SerialSource {
    pub name: String,
    pub port: PortId,
    /// Where the pipeline sends this port's acks.
    pub acks: mpsc::Sender<Ack>,
    /// Ends after shutdown fires (or if the pipeline's receiver is gone).
    pub task: JoinHandle<()>,
}

impl SerialSource {
    /// Spawn [`run`] for one port, creating its ack channel.
    pub fn spawn(
        cfg: SerialConfig,
        port: PortId,
        tx: mpsc::Sender<Incoming>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> SerialSource {
        let (ack_tx, ack_rx) = mpsc::channel(ACK_CHANNEL_CAPACITY);
        let name = cfg.name.clone();
        let task = tokio::spawn(run(cfg, port, tx, ack_rx, metrics, shutdown));
        SerialSource { name, port, acks: ack_tx, task }
    }
}

/// Runs until `shutdown` fires. Never returns an error for port problems: a
/// missing, unplugged or failing port is retried with exponential backoff
/// (100 ms doubling to 5 s), logging one line per state change.
///
/// Also returns if `tx`'s receiver is dropped (nothing could use a reading)
/// or if the shutdown sender is dropped (nothing could stop the task).
///
/// Metrics: `connected` follows the port; `reconnects` counts connections
/// after the first one made by this task; `readings` counts readings handed
/// to `tx`; `malformed` counts frames that failed to parse (an over-long one
/// counts once).
pub async fn run(
    cfg: SerialConfig,
    port_id: PortId,
    tx: mpsc::Sender<Incoming>,
    acks: mpsc::Receiver<Ack>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) {
    let splitter = FrameSplitter::new(cfg.framing);
    Port {
        cfg,
        port_id,
        tx,
        acks,
        acks_open: true,
        metrics,
        shutdown,
        splitter,
        malformed_log: RateLimit::default(),
        ever_connected: false,
    }
    .run()
    .await
}

enum End {
    Shutdown,
    Lost(String),
    PipelineClosed,
}

struct Port {
    cfg: SerialConfig,
    port_id: PortId,
    tx: mpsc::Sender<Incoming>,
    acks: mpsc::Receiver<Ack>,
    /// False once every ack sender is gone, so `recv` is not polled in a
    /// tight loop on a closed channel.
    acks_open: bool,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    splitter: FrameSplitter,
    malformed_log: RateLimit,
    ever_connected: bool,
}

/// Completes when shutdown is requested or can no longer be requested.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        warn!("shutdown channel closed without a shutdown signal; stopping serial input");
    }
}

impl Port {
    async fn run(mut self) {
        let name = self.cfg.name.clone();
        let path = self.cfg.path.display().to_string();
        // Register the port, so it shows up (disconnected) before it ever connects.
        self.metrics.port(&name, |c| c.connected = false);
        let mut backoff = BACKOFF_MIN;
        // The last thing logged about a failure: repeats are not logged again.
        let mut last_failure: Option<String> = None;
        loop {
            if *self.shutdown.borrow() {
                return;
            }
            match tokio_serial::new(path.as_str(), self.cfg.baud).open_native_async() {
                Ok(mut stream) => {
                    info!(port = %name, "serial {name}: {path} connected");
                    let again = self.ever_connected;
                    self.ever_connected = true;
                    self.metrics.port(&name, |c| {
                        c.connected = true;
                        if again {
                            c.reconnects += 1;
                        }
                    });
                    let started = Instant::now();
                    let end = self.session(&mut stream).await;
                    // TIOCEXCL outlives our fd while anything else holds the
                    // tty open, and would then make our own reopen fail
                    // (EBUSY) unless running as root. Best effort: a port
                    // that is gone cannot be unlocked and needs no unlocking.
                    let _ = stream.set_exclusive(false);
                    drop(stream);
                    self.metrics.port(&name, |c| c.connected = false);
                    match end {
                        End::Shutdown => {
                            info!(port = %name, "serial {name}: stopped");
                            return;
                        }
                        End::PipelineClosed => {
                            warn!(port = %name, "serial {name}: pipeline gone, stopping");
                            return;
                        }
                        End::Lost(reason) => {
                            warn!(port = %name, "serial {name}: {path} {reason}, retrying");
                            last_failure = None;
                        }
                    }
                    if started.elapsed() >= STABLE_SESSION {
                        backoff = BACKOFF_MIN;
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    if last_failure.as_deref() != Some(msg.as_str()) {
                        warn!(port = %name, "serial {name}: cannot open {path}: {msg} (will retry)");
                        last_failure = Some(msg);
                    }
                }
            }
            if !self.idle(backoff).await {
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Wait out a backoff while the port is down, dropping acks for it.
    /// Returns false on shutdown.
    async fn idle(&mut self, d: Duration) -> bool {
        let sleep = tokio::time::sleep(d);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                biased;
                _ = stopped(&mut self.shutdown) => return false,
                _ = &mut sleep => return true,
                ack = self.acks.recv(), if self.acks_open => match ack {
                    Some(ack) => debug!(port = %self.cfg.name, device = %ack.device, seq = ack.seq,
                        "port down, dropping ack (the device will resend)"),
                    None => self.acks_open = false,
                },
            }
        }
    }

    async fn session(&mut self, port: &mut SerialStream) -> End {
        // A partial frame from before the reconnect may belong to another device.
        self.splitter.reset();
        let mut buf = vec![0u8; 4096];
        loop {
            tokio::select! {
                biased;
                _ = stopped(&mut self.shutdown) => {
                    self.flush_acks_on_shutdown(port).await;
                    return End::Shutdown;
                }
                ack = self.acks.recv(), if self.acks_open => match ack {
                    Some(ack) => {
                        if let Err(e) = self.write_acks(port, ack).await {
                            return End::Lost(describe(&e));
                        }
                    }
                    None => self.acks_open = false,
                },
                r = port.read(&mut buf) => match r {
                    // A PTY whose master closed, or a USB device gone.
                    Ok(0) => return End::Lost("unplugged (EOF)".into()),
                    Ok(n) => {
                        for inc in self.parse_chunk(&buf[..n]) {
                            if let Err(end) = self.deliver(port, inc).await {
                                return end;
                            }
                        }
                    }
                    Err(e) => return End::Lost(describe(&e)),
                },
            }
        }
    }

    fn parse_chunk(&mut self, chunk: &[u8]) -> Vec<Incoming> {
        let mut out = Vec::new();
        let mut malformed: Vec<WireError> = Vec::new();
        let now = now_ms();
        let (framing, default_device, port) = (self.cfg.framing, self.cfg.device.as_deref(), self.port_id);
        self.splitter.feed(chunk, |frame| {
            match frame.and_then(|f| wire::parse_reading(framing, f, default_device, now)) {
                Ok((reading, ts_from_device)) => out.push(Incoming { reading, ts_from_device, port }),
                Err(e) => malformed.push(e),
            }
        });
        if !malformed.is_empty() {
            let n = malformed.len() as u64;
            self.metrics.port(&self.cfg.name, |c| c.malformed += n);
            if let Some(suppressed) = self.malformed_log.allow(n) {
                let name = &self.cfg.name;
                let last = &malformed[malformed.len() - 1];
                let more =
                    if suppressed > 0 { format!(" ({suppressed} more since the last report)") } else { String::new() };
                warn!(port = %name, framing = ?framing, "serial {name}: malformed frame: {last}{more}");
            }
        }
        out
    }

    /// Hand one reading to the pipeline, waiting for room (backpressure),
    /// while still writing acks: the pipeline may need its acks to drain
    /// before it makes room for more readings.
    async fn deliver(&mut self, port: &mut SerialStream, inc: Incoming) -> Result<(), End> {
        let mut inc = Some(inc);
        loop {
            tokio::select! {
                biased;
                _ = stopped(&mut self.shutdown) => {
                    // Undelivered readings were never acked; the device resends them.
                    self.flush_acks_on_shutdown(port).await;
                    return Err(End::Shutdown);
                }
                // Sending inside the future keeps the permit's borrow of
                // `tx` from outliving the select.
                sent = async {
                    let permit = self.tx.reserve().await.ok()?;
                    permit.send(inc.take()?);
                    Some(())
                } => {
                    if sent.is_none() {
                        return Err(End::PipelineClosed);
                    }
                    self.metrics.port(&self.cfg.name, |c| c.readings += 1);
                    return Ok(());
                }
                ack = self.acks.recv(), if self.acks_open => match ack {
                    Some(ack) => {
                        if let Err(e) = self.write_acks(port, ack).await {
                            return Err(End::Lost(describe(&e)));
                        }
                    }
                    None => self.acks_open = false,
                },
            }
        }
    }

    /// Collect `first` and every ack already queued, keeping only the
    /// highest seq per device: acks are cumulative, so that one says it all.
    fn take_acks(&mut self, first: Option<Ack>) -> Vec<Ack> {
        let mut acks: Vec<Ack> = first.into_iter().collect();
        while let Ok(a) = self.acks.try_recv() {
            match acks.iter_mut().find(|x| x.device == a.device) {
                Some(x) => x.seq = x.seq.max(a.seq),
                None => acks.push(a),
            }
        }
        acks
    }

    fn encode_acks(&self, acks: &[Ack]) -> Vec<u8> {
        let mut out = Vec::new();
        for a in acks {
            match wire::encode_ack(self.cfg.framing, a) {
                Ok(b) => out.extend_from_slice(&b),
                // Only an id no reading could have carried gets here.
                Err(e) => {
                    warn!(port = %self.cfg.name, device = %a.device, "serial {}: cannot encode ack: {e}", self.cfg.name)
                }
            }
        }
        out
    }

    /// Write `first` and every queued ack in one go. Returns only port
    /// errors that end the session.
    async fn write_acks(&mut self, port: &mut SerialStream, first: Ack) -> io::Result<()> {
        let acks = self.take_acks(Some(first));
        let bytes = self.encode_acks(&acks);
        let write = async {
            port.write_all(&bytes).await?;
            port.flush().await
        };
        match tokio::time::timeout(ACK_WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => {
                Metrics::add(&self.metrics.acks_sent, acks.len() as u64);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                // A half-written ack line/frame is terminated by the next
                // one's delimiter; the device discards it and resends.
                warn!(port = %self.cfg.name, "serial {}: ack write stalled, dropped {} ack(s)", self.cfg.name, acks.len());
                Ok(())
            }
        }
    }

    async fn flush_acks_on_shutdown(&mut self, port: &mut SerialStream) {
        let acks = self.take_acks(None);
        if acks.is_empty() {
            return;
        }
        let bytes = self.encode_acks(&acks);
        let write = async {
            port.write_all(&bytes).await?;
            port.flush().await
        };
        if let Ok(Ok(())) = tokio::time::timeout(SHUTDOWN_FLUSH_TIMEOUT, write).await {
            Metrics::add(&self.metrics.acks_sent, acks.len() as u64);
        }
    }
}

fn describe(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) if code == nix::errno::Errno::EIO as i32 => "unplugged (EIO)".into(),
        _ => format!("failed: {e}"),
    }
}

/// At most one log line per interval; counts what it held back.
#[derive(Default)]
struct RateLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    /// `n` events happened; `Some(held_back_before)` if one may be logged now.
    fn allow(&mut self, n: u64) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < MALFORMED_LOG_INTERVAL) {
            self.suppressed += n;
            return None;
        }
        self.last = Some(now);
        let held = std::mem::take(&mut self.suppressed);
        Some(held + n - 1)
    }
}
