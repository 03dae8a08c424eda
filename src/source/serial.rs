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
//!
//! Ports are opened through mio-serial (tokio-serial's core). Where its
//! set-up fails with ENOSYS (it asks for the `TCGETS2` ioctl, which
//! qemu-user 7.2 and old kernels lack), the port is opened with plain
//! termios instead ([`fallback`]): raw mode at the configured baud rate.
//! Either way the fd is driven through a `PortFd` (`source::port_fd`:
//! tokio's `AsyncFd`, left while a busy port pauses between reads).

use super::port_fd::PortFd;
use crate::allow::{self, Devices};
use crate::events::{Event, RateLimit};
use crate::metrics::Metrics;
use crate::reading::{Ack, Incoming, Origin, now_ms};
use crate::route::{CommandAck, DeviceCommand, Route, RouteTable, ToDevice};
use crate::source::SourceContext;
use crate::units::valid_id;
use crate::wire::Framing;
use crate::wire::{self, FrameSplitter, FromDevice, WireError};
use serde::Deserialize;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
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
/// How often a connected port tells its devices the time.
const TIME_EVERY: Duration = Duration::from_secs(3600);
/// How often (at most) a port samples a device's clock offset.
const OFFSET_SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// A device clock off by more than this is logged (once per device and port session).
const OFFSET_WARN_MS: i64 = 60_000;
/// Shutdown must be prompt; acks already received get this long to go out.
const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_millis(50);
const MALFORMED_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// Under load (more than [`BUSY_FRAMES`] frames a second on the port, see
/// [`crate::busy`]), a read that did not fill the buffer is
/// followed by this pause before the next one, so the kernel gathers
/// several frames per read: one read and one wake-up per frame cost the
/// gateway most of its CPU in the kernel (issue 18). A real UART keeps
/// gathering meanwhile (at 1 Mbaud ~100 bytes a millisecond, far below the
/// line discipline's 4 KiB), and a PTY writer just waits.
const READ_LINGER: Duration = Duration::from_millis(1);
const BUSY_FRAMES: u64 = 1_000;
/// Capacity of the ack channel created by [`SerialSource::spawn`].
pub const ACK_CHANNEL_CAPACITY: usize = 256;

/// Handle to a running serial port task.
#[derive(Debug)]
pub struct SerialSource {
    pub name: String,
    /// Ends after shutdown fires (or if the pipeline's receiver is gone).
    pub task: JoinHandle<()>,
}

impl SerialSource {
    /// Spawn [`run`] for one port as `Origin::Serial(number)`, its link
    /// registered in the context's route table for as long as the task runs.
    pub fn spawn(cfg: SerialConfig, number: u32, ctx: SourceContext) -> SerialSource {
        let origin = Origin::Serial(number);
        let (route, down) = ctx.routes.register(origin, ACK_CHANNEL_CAPACITY);
        let SourceContext { ingest: tx, metrics, shutdown, routes } = ctx;
        let name = cfg.name.clone();
        let span = tracing::info_span!("serial", source = "serial");
        let task = tokio::spawn(tracing::Instrument::instrument(
            async move {
                let _route: Route = route;
                Port::new(cfg, origin, tx, down, metrics, shutdown, Some(routes)).run().await
            },
            span,
        ));
        SerialSource { name, task }
    }
}

/// `[[serial]]`: one port.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Short name used in logs and metrics.
    pub name: String,
    /// Device path, e.g. `/dev/ttyACM0` or a stable `/dev/serial/by-id/...` link.
    pub path: PathBuf,
    #[serde(default = "default_baud")]
    pub baud: u32,
    #[serde(default)]
    pub framing: Framing,
    /// Device id for readings that do not name one.
    #[serde(default)]
    pub device: Option<String>,
    /// The devices this port may speak for (patterns, `*` = any run);
    /// absent: any. Readings of others are refused and counted.
    #[serde(default)]
    pub devices: Option<Devices>,
    /// Tell the devices the time (jsonl `{"time":{"ms":N}}`) when the port
    /// connects and every hour.
    #[serde(default = "yes")]
    pub time_sync: bool,
}

fn default_baud() -> u32 {
    115_200
}

fn yes() -> bool {
    true
}

impl SerialConfig {
    /// `[[serial]]` checks serde cannot express; returns the offending key.
    pub fn validate_all(ports: &[SerialConfig]) -> Result<(), (String, String)> {
        for (i, port) in ports.iter().enumerate() {
            if port.name.is_empty() || ports[..i].iter().any(|o| o.name == port.name) {
                return Err((
                    format!("serial.{i}.name"),
                    format!("must be non-empty and unique (got {:?})", port.name),
                ));
            }
            if port.device.as_deref().is_some_and(|d| !valid_id(d)) {
                return Err((
                    format!("serial.{i}.device"),
                    "must be 1-64 characters of letters, digits, '-', '_' or '.'".into(),
                ));
            }
            if let Some(devices) = &port.devices {
                devices.check(false).map_err(|e| (format!("serial.{i}.devices"), e))?;
                if let Some(d) = port.device.as_deref().filter(|d| !devices.permits(d)) {
                    return Err((
                        format!("serial.{i}.devices"),
                        format!("does not permit the port's own device {d:?}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Keep only the highest seq per device and boot: acks are cumulative, so
/// that one says it all. Never across boots: an ack of one boot says
/// nothing about another's readings (merging by device alone once turned
/// "boot 7 through 0" followed by "boot 6 through 40" into "boot 7 through
/// 40", freeing readings of boot 7 the gateway had never stored).
fn merge_acks(acks: impl IntoIterator<Item = Ack>) -> Vec<Ack> {
    let mut out: Vec<Ack> = Vec::new();
    for a in acks {
        match out.iter_mut().find(|x| x.device == a.device && x.boot == a.boot) {
            Some(x) => x.seq = x.seq.max(a.seq),
            None => out.push(a),
        }
    }
    out
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
    origin: Origin,
    tx: crate::channel::Sender<Incoming>,
    acks: mpsc::Receiver<ToDevice>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) {
    Port::new(cfg, origin, tx, acks, metrics, shutdown, None).run().await
}

enum End {
    Shutdown,
    Lost(String),
    PipelineClosed,
}

struct Port {
    cfg: SerialConfig,
    origin: Origin,
    tx: crate::channel::Sender<Incoming>,
    acks: mpsc::Receiver<ToDevice>,
    /// False once every ack sender is gone, so `recv` is not polled in a
    /// tight loop on a closed channel.
    acks_open: bool,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    splitter: FrameSplitter,
    malformed_log: RateLimit,
    /// Readings of devices this port may not speak for (`devices`).
    refused_log: RateLimit,
    ever_connected: bool,
    /// The termios fallback is announced once per port, not per reconnect.
    fallback_logged: bool,
    /// Where the devices heard here are noted and their answers to
    /// commands go ([`crate::downlink`]); `None` when run on its own.
    routes: Option<RouteTable>,
    /// The device of the last reading (noted in `routes` when it changes).
    last_device: String,
    /// A read's readings, kept for the next read (no allocation per read).
    parsed: Vec<Incoming>,
    /// Commands taken off the link channel while collecting acks.
    commands: Vec<DeviceCommand>,
    /// When a device's clock offset was last sampled on this port.
    last_offset_sample: Option<Instant>,
    /// Devices whose clock was reported off this session.
    clock_warned: std::collections::HashSet<String>,
}

/// Completes when shutdown is requested or can no longer be requested.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        warn!("shutdown channel closed without a shutdown signal; stopping serial input");
    }
}

impl Port {
    fn new(
        cfg: SerialConfig,
        origin: Origin,
        tx: crate::channel::Sender<Incoming>,
        acks: mpsc::Receiver<ToDevice>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
        routes: Option<RouteTable>,
    ) -> Port {
        let splitter = FrameSplitter::new(cfg.framing);
        Port {
            cfg,
            origin,
            tx,
            acks,
            acks_open: true,
            metrics,
            shutdown,
            splitter,
            malformed_log: RateLimit::new(MALFORMED_LOG_INTERVAL),
            refused_log: RateLimit::new(Duration::from_secs(10)),
            ever_connected: false,
            fallback_logged: false,
            routes,
            last_device: String::new(),
            parsed: Vec::new(),
            commands: Vec::new(),
            last_offset_sample: None,
            clock_warned: Default::default(),
        }
    }

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
            match self.open(&path) {
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
                    stream.release();
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
                Err(msg) => {
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

    /// Open the port with mio-serial, or with plain termios where that
    /// fails with ENOSYS (see the module doc). Errors are log text.
    fn open(&mut self, path: &str) -> Result<Link, String> {
        let forced = fallback::forced();
        if !forced {
            match mio_serial::SerialStream::open(&mio_serial::new(path, self.cfg.baud)) {
                Ok(stream) => return PortFd::new(stream).map(Link::Native).map_err(|e| e.to_string()),
                // serialport turns an errno it has no kind for into its text.
                Err(e) if e.description != nix::errno::Errno::ENOSYS.desc() => return Err(e.to_string()),
                Err(_) => {}
            }
        }
        let port = fallback::open(path.as_ref(), self.cfg.baud).map_err(|e| e.to_string())?;
        if !self.fallback_logged {
            self.fallback_logged = true;
            let why = if forced {
                "forced by EDGE_GATEWAY_FORCE_TERMIOS"
            } else {
                "the serial driver's set-up failed with ENOSYS: no TCGETS2 (qemu-user or an old kernel)"
            };
            warn!(port = %self.cfg.name, "serial {}: {path}: using the plain termios fallback at {} baud ({why})",
                self.cfg.name, self.cfg.baud);
        }
        Ok(Link::Termios(port))
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
                    Some(ToDevice::Ack(ack)) => debug!(port = %self.cfg.name, device = %ack.device, seq = ack.seq,
                        "port down, dropping ack (the device will resend)"),
                    Some(ToDevice::Command(c)) => debug!(port = %self.cfg.name, device = %c.device, id = %c.id,
                        "port down, dropping command (the downlink sends it again)"),
                    None => self.acks_open = false,
                },
            }
        }
    }

    async fn session(&mut self, port: &mut Link) -> End {
        // A partial frame from before the reconnect may belong to another device.
        self.splitter.reset();
        self.clock_warned.clear();
        let mut buf = vec![0u8; 4096];
        // The time at once (first tick), then hourly.
        let mut time = tokio::time::interval(TIME_EVERY);
        let time_sync = self.cfg.time_sync;
        // One shutdown future for the whole session (a new one per read
        // was a few per cent of the CPU under load).
        let mut stop_rx = self.shutdown.clone();
        let stop = stopped(&mut stop_rx);
        tokio::pin!(stop);
        // Reads wait until this instant (see READ_LINGER).
        let mut hold: Option<tokio::time::Instant> = None;
        let mut pacer = ReadPacer::new(Instant::now());
        loop {
            tokio::select! {
                biased;
                _ = &mut stop => {
                    self.flush_acks_on_shutdown(port).await;
                    return End::Shutdown;
                }
                _ = time.tick(), if time_sync => {
                    let line = wire::encode_time(self.cfg.framing, now_ms());
                    let write = async {
                        port.write_all(&line).await?;
                        port.flush().await
                    };
                    match tokio::time::timeout(ACK_WRITE_TIMEOUT, write).await {
                        Ok(Err(e)) => return End::Lost(describe(&e)),
                        Err(_) => debug!(port = %self.cfg.name, "time line write stalled"),
                        Ok(Ok(())) => debug!(port = %self.cfg.name, "told the devices the time"),
                    }
                }
                ack = self.acks.recv(), if self.acks_open => match ack {
                    Some(down) => {
                        if let Err(e) = self.write_down(port, down).await {
                            return End::Lost(describe(&e));
                        }
                    }
                    None => self.acks_open = false,
                },
                _ = tokio::time::sleep_until(hold.unwrap_or_else(tokio::time::Instant::now)), if hold.is_some() => {
                    hold = None;
                }
                r = port.read(&mut buf), if hold.is_none() => match r {
                    // A PTY whose master closed, or a USB device gone.
                    Ok(0) => return End::Lost("unplugged (EOF)".into()),
                    Ok(n) => {
                        let mut readings = self.parse_chunk(&buf[..n]);
                        let frames = readings.len();
                        let (mut delivered, mut ended) = (0u64, None);
                        // All at once when there is room (the usual case).
                        match self.tx.try_send_all(&mut readings) {
                            Ok(true) => delivered = frames as u64,
                            Ok(false) => {}
                            Err(crate::channel::Closed) => return End::PipelineClosed,
                        }
                        for inc in readings.drain(..) {
                            if let Err(end) = self.deliver(port, inc).await {
                                ended = Some(end);
                                break;
                            }
                            delivered += 1;
                        }
                        self.parsed = readings;
                        if delivered > 0 {
                            self.metrics.port(&self.cfg.name, |c| c.readings += delivered);
                        }
                        if let Some(end) = ended {
                            return end;
                        }
                        hold = pacer.after_read(Instant::now(), frames, n == buf.len()).map(tokio::time::Instant::from_std);
                        if hold.is_some() {
                            port.pause();
                        }
                    }
                    Err(e) => return End::Lost(describe(&e)),
                },
            }
        }
    }

    fn parse_chunk(&mut self, chunk: &[u8]) -> Vec<Incoming> {
        let mut out = std::mem::take(&mut self.parsed);
        out.clear();
        let mut malformed: Vec<WireError> = Vec::new();
        let now = now_ms();
        let (framing, default_device, port) = (self.cfg.framing, self.cfg.device.as_deref(), self.origin);
        let mut refused: Vec<String> = Vec::new();
        let mut answers: Vec<CommandAck> = Vec::new();
        let devices = self.cfg.devices.as_ref();
        self.splitter.feed(chunk, |frame| {
            let frame = match frame {
                Ok(f) => f,
                Err(e) => return malformed.push(e),
            };
            match wire::parse_from_device(framing, frame, default_device, now) {
                Ok(FromDevice::Reading(reading, _)) if !allow::permits(devices, &reading.device) => {
                    refused.push(reading.device)
                }
                Ok(FromDevice::Reading(reading, ts_from_device)) => {
                    out.push(Incoming::new(reading, ts_from_device, port))
                }
                Ok(FromDevice::CommandAck(a)) if allow::permits(devices, &a.device) => answers.push(a),
                Ok(FromDevice::CommandAck(a)) => refused.push(a.device),
                Err(e) => malformed.push(e),
            }
        });
        self.sample_offset(&out, now);
        if let Some(routes) = &self.routes {
            for inc in &out {
                if inc.reading.device != self.last_device {
                    self.last_device.clone_from(&inc.reading.device);
                    routes.note_device(&self.last_device, port);
                }
            }
            for a in answers {
                routes.note_device(&a.device, port);
                if !routes.command_ack(a) {
                    debug!(port = %self.cfg.name, "answer to a command dropped (no downlink, or it is busy)");
                }
            }
        }
        for device in &refused {
            let log = self.refused_log.allow(1);
            Event::DeviceRefused { source: "serial", link: &self.cfg.name, device, log }.emit(&self.metrics);
        }
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
    async fn deliver(&mut self, port: &mut Link, inc: Incoming) -> Result<(), End> {
        // Room at once: no waiting, no select (the usual case).
        let inc = match self.tx.try_send(inc) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(End::PipelineClosed),
            Err(mpsc::error::TrySendError::Full(inc)) => inc,
        };
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
                    let permit = self.tx.reserve(inc.as_ref()?).await.ok()?;
                    permit.send(inc.take()?);
                    Some(())
                } => {
                    if sent.is_none() {
                        return Err(End::PipelineClosed);
                    }
                    return Ok(());
                }
                ack = self.acks.recv(), if self.acks_open => match ack {
                    Some(down) => {
                        if let Err(e) = self.write_down(port, down).await {
                            return Err(End::Lost(describe(&e)));
                        }
                    }
                    None => self.acks_open = false,
                },
            }
        }
    }

    /// Now and then, a device's clock offset from a reading that carries
    /// the device's own ts (receive time is later than the send by the
    /// link's latency, a few ms).
    fn sample_offset(&mut self, readings: &[Incoming], now: u64) {
        if self.last_offset_sample.is_some_and(|t| t.elapsed() < OFFSET_SAMPLE_EVERY) {
            return;
        }
        let Some(inc) = readings.iter().rev().find(|i| i.ts_from_device) else { return };
        self.last_offset_sample = Some(Instant::now());
        let r = &inc.reading;
        let offset = self.metrics.clock_offset(&r.device, r.ts as i64 - now as i64);
        if offset.abs() > OFFSET_WARN_MS && self.clock_warned.insert(r.device.clone()) {
            warn!(port = %self.cfg.name, device = %r.device,
                "serial {}: {}'s clock is {:.1} s {} the gateway's (its ts are kept as sent; the time is sent to it hourly)",
                self.cfg.name, r.device, offset.abs() as f64 / 1000.0, if offset < 0 { "behind" } else { "ahead of" });
        }
    }

    /// Collect `first` and every ack already queued (see [`merge_acks`]);
    /// commands met on the way wait in `self.commands`.
    fn take_acks(&mut self, first: Option<Ack>) -> Vec<Ack> {
        let mut queued = Vec::new();
        while let Ok(down) = self.acks.try_recv() {
            match down {
                ToDevice::Ack(a) => queued.push(a),
                ToDevice::Command(c) => self.commands.push(c),
            }
        }
        merge_acks(first.into_iter().chain(queued))
    }

    /// Write what came down the link: acks (with every one queued), or a
    /// command (with every ack queued behind it).
    async fn write_down(&mut self, port: &mut Link, down: ToDevice) -> io::Result<()> {
        match down {
            ToDevice::Ack(ack) => self.write_acks(port, Some(ack)).await,
            ToDevice::Command(c) => {
                self.commands.push(c);
                self.write_acks(port, None).await
            }
        }
    }

    /// Commands taken off the channel, encoded for the port's framing.
    fn encode_commands(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for c in std::mem::take(&mut self.commands) {
            match wire::encode_command(self.cfg.framing, &c) {
                Ok(b) => {
                    debug!(port = %self.cfg.name, device = %c.device, id = %c.id, "command {} to {}", c.id, c.device);
                    out.extend_from_slice(&b);
                }
                // Too big for a cobs frame: it expires (and says why in the log).
                Err(e) => warn!(port = %self.cfg.name, id = %c.id, "command {} not sent: {e}", c.id),
            }
        }
        out
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

    /// Write `first` and every queued ack (and command) in one go. Returns
    /// only port errors that end the session.
    async fn write_acks(&mut self, port: &mut Link, first: Option<Ack>) -> io::Result<()> {
        let acks = self.take_acks(first);
        let mut bytes = self.encode_acks(&acks);
        bytes.extend(self.encode_commands());
        if bytes.is_empty() {
            return Ok(());
        }
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

    async fn flush_acks_on_shutdown(&mut self, port: &mut Link) {
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

/// When the next read may run (see [`READ_LINGER`]): at once on a quiet
/// port, so a site's readings wait for nothing; a millisecond later on a
/// busy one, so each read takes several frames.
struct ReadPacer {
    frames: crate::busy::Busy,
}

impl ReadPacer {
    fn new(now: Instant) -> ReadPacer {
        ReadPacer { frames: crate::busy::Busy::new(BUSY_FRAMES, now) }
    }

    /// After a read of `frames` frames (`filled`: it filled the buffer, so
    /// more is waiting): `Some(when)` to wait before the next read.
    fn after_read(&mut self, now: Instant, frames: usize, filled: bool) -> Option<Instant> {
        let busy = self.frames.add(now, frames);
        (busy && !filled).then(|| now + READ_LINGER)
    }
}

/// An open port: the serial driver's (mio-serial, what tokio-serial wraps),
/// or the termios fallback's.
enum Link {
    Native(PortFd<mio_serial::SerialStream>),
    Termios(PortFd<std::fs::File>),
}

impl Link {
    /// TIOCEXCL outlives our fd while anything else holds the tty open, and
    /// would then make our own reopen fail (EBUSY) unless running as root.
    /// Best effort: a port that is gone cannot be unlocked and needs no
    /// unlocking.
    fn release(&mut self) {
        let _ = match self {
            Link::Native(s) => match s.get_mut() {
                Some(s) => s.set_exclusive(false).map_err(io::Error::from),
                None => Ok(()),
            },
            Link::Termios(t) => t.get_ref().map_or(Ok(()), |f| fallback::set_exclusive(f, false)),
        };
    }

    /// Out of the runtime's epoll until a read or write would block (see
    /// [`PortFd`]): a busy port waiting between reads.
    fn pause(&mut self) {
        match self {
            Link::Native(s) => s.pause(),
            Link::Termios(t) => t.pause(),
        }
    }
}

impl AsyncRead for Link {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Native(s) => Pin::new(s).poll_read(cx, buf),
            Link::Termios(t) => Pin::new(t).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Link {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Link::Native(s) => Pin::new(s).poll_write(cx, buf),
            Link::Termios(t) => Pin::new(t).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Native(s) => Pin::new(s).poll_flush(cx),
            Link::Termios(t) => Pin::new(t).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Native(s) => Pin::new(s).poll_shutdown(cx),
            Link::Termios(t) => Pin::new(t).poll_shutdown(cx),
        }
    }
}

fn describe(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) if code == nix::errno::Errno::EIO as i32 => "unplugged (EIO)".into(),
        _ => format!("failed: {e}"),
    }
}

/// Plain termios for ports the serial driver cannot set up (see the module
/// doc): `TCGETS`/`TCSETS` through libc, raw mode, the configured baud rate,
/// TIOCEXCL like mio-serial, and a nonblocking fd driven by a `PortFd`
/// (`source::port_fd`).
pub mod fallback {
    use super::PortFd;
    use nix::errno::Errno;
    use nix::fcntl::OFlag;
    use nix::libc;
    use nix::sys::termios::{self, BaudRate, ControlFlags, SetArg};
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;
    use std::path::Path;

    /// Debug builds only: `EDGE_GATEWAY_FORCE_TERMIOS` (any value) makes
    /// every port use the fallback, so tests can drive it on a host whose
    /// driver works.
    pub fn forced() -> bool {
        cfg!(debug_assertions) && std::env::var_os("EDGE_GATEWAY_FORCE_TERMIOS").is_some()
    }

    /// The termios constant for a standard rate; other rates need `TCSETS2`.
    pub fn baud_rate(baud: u32) -> Option<BaudRate> {
        use BaudRate::*;
        Some(match baud {
            1200 => B1200,
            2400 => B2400,
            4800 => B4800,
            9600 => B9600,
            19_200 => B19200,
            38_400 => B38400,
            57_600 => B57600,
            115_200 => B115200,
            230_400 => B230400,
            460_800 => B460800,
            500_000 => B500000,
            576_000 => B576000,
            921_600 => B921600,
            1_000_000 => B1000000,
            1_500_000 => B1500000,
            2_000_000 => B2000000,
            3_000_000 => B3000000,
            _ => return None,
        })
    }

    /// Open `path` exclusively in raw mode at `baud` (8N1, no flow
    /// control, modem lines ignored). Needs a tokio runtime.
    pub fn open(path: &Path, baud: u32) -> io::Result<PortFd<File>> {
        let speed = baud_rate(baud).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{baud} baud is not a standard rate"))
        })?;
        let flags = OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let file = File::from(nix::fcntl::open(path, flags, nix::sys::stat::Mode::empty())?);
        set_exclusive(&file, true)?;
        let mut t = termios::tcgetattr(&file)?;
        termios::cfmakeraw(&mut t);
        t.control_flags |= ControlFlags::CREAD | ControlFlags::CLOCAL;
        t.control_flags &= !(ControlFlags::CSTOPB | ControlFlags::CRTSCTS);
        termios::cfsetspeed(&mut t, speed)?;
        termios::tcsetattr(&file, SetArg::TCSANOW, &t)?;
        PortFd::new(file)
    }

    /// TIOCEXCL on or off (see `Link::release`).
    pub fn set_exclusive(fd: &impl AsRawFd, on: bool) -> io::Result<()> {
        let req = if on { libc::TIOCEXCL } else { libc::TIOCNXCL };
        // SAFETY: TIOCEXCL/TIOCNXCL take no argument; the fd is open.
        Errno::result(unsafe { libc::ioctl(fd.as_raw_fd(), req) })?;
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::demo::sim::open_pty;
        use std::io::{Read, Write};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        #[test]
        fn standard_rates_map_and_odd_ones_are_refused() {
            assert_eq!(baud_rate(115_200), Some(BaudRate::B115200));
            assert_eq!(baud_rate(9600), Some(BaudRate::B9600));
            assert_eq!(baud_rate(250_000), None);
        }

        /// TIOCGEXCL: whether TIOCEXCL is set (root bypasses the lock, so
        /// a second open would not show it).
        fn exclusive(fd: &impl AsRawFd) -> bool {
            let mut on: libc::c_int = 0;
            // SAFETY: TIOCGEXCL writes one int.
            Errno::result(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGEXCL, &mut on) }).unwrap();
            on != 0
        }

        /// Read exactly `n` bytes from the PTY master, failing after 5 s.
        fn read_master(master: &File, n: usize) -> Vec<u8> {
            use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
            use std::os::fd::AsFd;
            let mut got = Vec::new();
            while got.len() < n {
                let mut fds = [PollFd::new(master.as_fd(), PollFlags::POLLIN)];
                assert_eq!(poll(&mut fds, PollTimeout::from(5000u16)).unwrap(), 1, "PTY master: nothing to read");
                let mut buf = vec![0u8; n - got.len()];
                let k = (&*master).read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..k]);
            }
            got
        }

        /// On a real PTY left cooked (echo, canonical, CR/LF mapping): the
        /// port comes up raw at the configured speed and exclusive, and
        /// bytes cross both ways through `AsyncFd` unchanged.
        #[tokio::test]
        async fn opens_a_pty_raw_at_the_baud_rate_and_moves_bytes_both_ways() {
            let pty = open_pty().unwrap();
            let mut t = termios::tcgetattr(&pty.slave).unwrap();
            t.local_flags |= termios::LocalFlags::ECHO | termios::LocalFlags::ICANON;
            t.output_flags |= termios::OutputFlags::OPOST | termios::OutputFlags::ONLCR;
            termios::tcsetattr(&pty.slave, SetArg::TCSANOW, &t).unwrap();

            let mut port = open(&pty.slave_path, 57_600).unwrap();
            let t = termios::tcgetattr(&pty.slave).unwrap();
            assert_eq!(termios::cfgetospeed(&t), BaudRate::B57600);
            assert!(!t.local_flags.intersects(termios::LocalFlags::ECHO | termios::LocalFlags::ICANON));
            assert!(!t.output_flags.contains(termios::OutputFlags::OPOST));
            assert!(t.control_flags.contains(ControlFlags::CREAD | ControlFlags::CLOCAL));
            assert!(exclusive(&pty.slave), "TIOCEXCL not set");

            // Canonical mode would hold back the bytes after the newline.
            let sent = b"{\"seq\":1}\n\x00\x01";
            (&pty.master).write_all(sent).unwrap();
            let mut got = Vec::new();
            while got.len() < sent.len() {
                let mut buf = [0u8; 64];
                let n = tokio::time::timeout(std::time::Duration::from_secs(5), port.read(&mut buf))
                    .await
                    .expect("read timed out")
                    .unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got, sent);

            // No echo of what came in, and no \n -> \r\n on the way out.
            port.write_all(b"ack 1\n").await.unwrap();
            port.flush().await.unwrap();
            assert_eq!(read_master(&pty.master, 6), b"ack 1\n");

            set_exclusive(port.get_ref().unwrap(), false).unwrap();
            assert!(!exclusive(&pty.slave), "TIOCNXCL did not clear the lock");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(device: &str, boot: Option<u32>, seq: u64) -> Ack {
        Ack { device: device.into(), seq, boot }
    }

    #[test]
    fn a_busy_port_reads_a_millisecond_apart_and_a_quiet_one_at_once() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // A site's pace: 20 devices at 10 Hz on one dock, a frame per read.
        let mut quiet = ReadPacer::new(t0);
        for i in 0..2_000 {
            assert_eq!(quiet.after_read(ms(i * 5), 1, false), None, "read {i} of a quiet port was held");
        }
        // A flood: a frame every 100 µs. The first reads of a window go at
        // once; from the 100th frame in 100 ms on, each read waits a millisecond.
        let mut busy = ReadPacer::new(t0);
        let mut held = 0;
        for i in 0..1_000u64 {
            let now = t0 + Duration::from_micros(i * 100);
            match busy.after_read(now, 1, false) {
                Some(when) => {
                    assert_eq!(when, now + READ_LINGER);
                    held += 1
                }
                None => assert!(i < 99, "read {i} of a busy port was not held"),
            }
        }
        assert_eq!(held, 901);
        // A read that filled the buffer: more is there, read it at once.
        assert_eq!(busy.after_read(t0 + Duration::from_millis(99), 40, true), None);
    }

    #[test]
    fn queued_acks_merge_per_device_and_boot_never_across_boots() {
        // A rebooted device (boot 7) whose old readings of boot 6 were
        // resent and stored after the new boot's first ack was queued.
        let merged = merge_acks([ack("a", Some(7), 0), ack("a", Some(6), 40), ack("a", Some(7), 3), ack("b", None, 9)]);
        assert_eq!(merged, [ack("a", Some(7), 3), ack("a", Some(6), 40), ack("b", None, 9)]);
        assert_eq!(merge_acks([ack("a", None, 5), ack("a", None, 2)]), [ack("a", None, 5)]);
    }
}
