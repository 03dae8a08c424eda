//! Being a good systemd citizen: `sd_notify` and journald logging.
//!
//! * [`Notifier`] speaks the `sd_notify` datagram protocol on
//!   `$NOTIFY_SOCKET` (`READY=1`, `STATUS=`, `WATCHDOG=1`, `RELOADING=1`,
//!   `STOPPING=1`). Twenty lines of std instead of libsystemd: the protocol
//!   is one datagram of `KEY=value` lines, and linking libsystemd would drag
//!   a C library into the Pi cross builds.
//! * [`Watchdog`] decides *when* `WATCHDOG=1` may be sent. It is pinged from
//!   the pipeline thread's loop, and only while the other loops that must
//!   keep running (the async runtime that carries the sources, the uplink)
//!   have checked in recently. A bare timer would keep a wedged gateway
//!   "alive" forever; this way a stuck fsync, a dead runtime or a hung
//!   uplink stops the pings and systemd restarts the service.
//! * [`init_logging`] logs to journald with structured fields when stderr is
//!   the journal (`$JOURNAL_STREAM`, what systemd sets for a service),
//!   otherwise human-readable lines on stderr.
//! * [`heartbeat`] beats for the async runtime and refreshes the one-line
//!   `STATUS=` ([`GatewayStatus::line`](crate::metrics::status::GatewayStatus::line)) that `systemctl status` shows.

use crate::metrics::Metrics;
use crate::metrics::status::Probe;
use crate::shutdown;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The `$NOTIFY_SOCKET` client. Without the variable every call is a no-op,
/// so the gateway behaves the same outside systemd.
pub struct Notifier {
    target: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Read `NOTIFY_SOCKET` and `WATCHDOG_USEC` (honouring `WATCHDOG_PID`).
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let addr = socket_addr(path.as_encoded_bytes())?;
            let sock = UnixDatagram::unbound().ok()?;
            // Never block the pipeline on a supervisor that stopped reading
            // (a unix datagram queue holds only ~10 messages): drop instead.
            sock.set_nonblocking(true).ok()?;
            Some((sock, addr))
        });
        let for_us = std::env::var("WATCHDOG_PID").map(|p| p.trim() == std::process::id().to_string()).unwrap_or(true);
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&us| us > 0 && for_us)
            .map(Duration::from_micros);
        Notifier { target, watchdog }
    }

    /// The watchdog timeout systemd asked for (`WatchdogSec=`), if any.
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Send one notification (`"READY=1\nSTATUS=..."`). Errors are ignored:
    /// a missing supervisor must never stop the gateway.
    pub fn notify(&self, msg: &str) {
        if let Some((sock, addr)) = &self.target {
            let _ = sock.send_to_addr(msg.as_bytes(), addr);
        }
    }

    pub fn status(&self, line: &str) {
        // One line: systemd shows it in `systemctl status`.
        self.notify(&format!("STATUS={}", line.replace('\n', " ")));
    }
}

fn socket_addr(path: &[u8]) -> Option<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    match path.split_first() {
        Some((b'@', name)) => std::os::unix::net::SocketAddr::from_abstract_name(name).ok(),
        Some((b'/', _)) => {
            let p = std::path::Path::new(std::ffi::OsStr::from_bytes(path));
            std::os::unix::net::SocketAddr::from_pathname(p).ok()
        }
        _ => None,
    }
}

/// A loop that must keep running for the gateway to be alive. The loop
/// calls [`Beat::beat`] each time round; [`Watchdog`] reads the age.
#[derive(Clone)]
pub struct Beat {
    name: &'static str,
    last_ms: Arc<AtomicU64>,
    epoch: Instant,
    every: Duration,
}

impl Beat {
    /// How often the loop should beat: often enough that a healthy loop is
    /// never mistaken for a late one.
    pub fn every(&self) -> Duration {
        self.every
    }
    pub fn beat(&self) {
        self.last_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    /// Not running on purpose (e.g. no `[upstream]`): never late until the
    /// next [`Beat::beat`].
    pub fn park(&self) {
        self.last_ms.store(u64::MAX, Ordering::Relaxed);
    }
    fn age(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Decides when `WATCHDOG=1` goes out (see the module doc).
pub struct Watchdog {
    notifier: Arc<Notifier>,
    timeout: Option<Duration>,
    epoch: Instant,
    beats: Vec<Beat>,
    next_ping: Instant,
    /// The loop last reported as late, so it is logged once, not every tick.
    reported_late: Option<&'static str>,
}

impl Watchdog {
    pub fn new(notifier: Arc<Notifier>) -> Watchdog {
        let now = Instant::now();
        Watchdog {
            timeout: notifier.watchdog_timeout(),
            notifier,
            epoch: now,
            beats: Vec::new(),
            next_ping: now,
            reported_late: None,
        }
    }

    /// How often the pinging loop must wake: half the timeout, as
    /// `sd_watchdog_enabled(3)` recommends. `None` when there is no watchdog.
    pub fn period(&self) -> Option<Duration> {
        self.timeout.map(|t| t / 2)
    }

    /// Register another loop that must check in for pings to continue.
    pub fn beat(&mut self, name: &'static str) -> Beat {
        let every = self.timeout.map_or(Duration::from_millis(500), |t| (t / 8).min(Duration::from_millis(500)));
        let b = Beat { name, last_ms: Arc::new(AtomicU64::new(0)), epoch: self.epoch, every };
        b.beat();
        self.beats.push(b.clone());
        b
    }

    /// When the pinging loop must run next (far away without a watchdog).
    pub fn next_due(&self) -> Instant {
        match self.timeout {
            Some(_) => self.next_ping,
            None => Instant::now() + Duration::from_secs(3600),
        }
    }

    /// Called by the pinging loop (the pipeline) each time round: sends
    /// `WATCHDOG=1` when it is due and every registered loop checked in
    /// within the timeout.
    pub fn alive(&mut self, now: Instant) {
        let (Some(timeout), true) = (self.timeout, now >= self.next_ping) else { return };
        if let Some(late) = self.beats.iter().find(|b| b.age() > timeout / 2 + timeout / 4) {
            if self.reported_late != Some(late.name) {
                tracing::error!(
                    "watchdog: the {} loop has not run for {:.1?}; withholding WATCHDOG=1 so systemd restarts the gateway",
                    late.name,
                    late.age()
                );
                self.reported_late = Some(late.name);
            }
            self.next_ping = now + timeout / 8;
            return;
        }
        self.reported_late = None;
        self.notifier.notify("WATCHDOG=1");
        self.next_ping = now + timeout / 2;
    }
}

/// Set up logging: journald when stderr is the journal, stderr otherwise.
/// `RUST_LOG` wins over `level` (the config's `[log] level`).
pub fn init_logging(level: Option<&str>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level.unwrap_or("info")));
    // rumqttd logs every ordinary disconnect as an error; our broker module
    // logs what matters. RUST_LOG=rumqttd=debug brings it back.
    let filter = if std::env::var("RUST_LOG").is_ok_and(|v| v.contains("rumqttd")) {
        filter
    } else {
        filter.add_directive("rumqttd=off".parse().expect("static directive"))
    };
    // Stderr is the journal *and* journald's socket is there (else every
    // line would vanish): structured entries. Otherwise plain stderr.
    let journal = (systemd_journal_logger::connected_to_journal()
        && std::path::Path::new("/run/systemd/journal/socket").exists())
    .then(|| systemd_journal_logger::JournalLog::new().ok())
    .flatten()
    .map(|j| j.with_syslog_identifier("edge-gateway".to_string()));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match journal {
        Some(j) => registry.with(crate::service::journal::JournalLayer::new(j)).try_init(),
        None => registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).try_init(),
    };
}

/// How often [`heartbeat`] refreshes `STATUS=`.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Beats for the watchdog (proving this runtime runs) and refreshes the
/// one-line `STATUS=` that `systemctl status` shows.
pub async fn heartbeat(beat: Beat, notifier: Arc<Notifier>, probe: Probe, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(beat.every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last, mut last_count) = (Instant::now(), Metrics::get(&probe.metrics.readings_accepted));
    loop {
        tokio::select! {
            _ = shutdown::wait(&mut stop) => return,
            _ = tick.tick() => {}
        }
        beat.beat();
        crate::crashpoint::stall("heartbeat");
        if last.elapsed() >= STATUS_EVERY {
            let status = probe.take();
            let rate = (status.readings.accepted - last_count) as f64 / last.elapsed().as_secs_f64();
            (last, last_count) = (Instant::now(), status.readings.accepted);
            notifier.status(&status.line(rate));
        }
    }
}

pub mod journal {
    //! A `tracing` layer that hands each event to `systemd-journal-logger`,
    //! with the event's and its spans' fields as journal fields (`DEVICE=`,
    //! `SOURCE=`, `BATCH=` ...), so `journalctl -u edge-gateway DEVICE=wrist-01`
    //! works.

    use std::fmt::Write as _;
    use tracing::field::{Field, Visit};
    use tracing::{Event, Subscriber};
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::Context;
    use tracing_subscriber::registry::LookupSpan;

    pub struct JournalLayer {
        log: systemd_journal_logger::JournalLog,
    }

    impl JournalLayer {
        pub fn new(log: systemd_journal_logger::JournalLog) -> Self {
            JournalLayer { log }
        }
    }

    /// The fields of one span, kept in its extensions.
    struct SpanFields(Vec<(String, String)>);

    #[derive(Default)]
    struct Collect {
        message: String,
        fields: Vec<(String, String)>,
    }

    impl Visit for Collect {
        fn record_str(&mut self, field: &Field, value: &str) {
            if field.name() == "message" {
                self.message.push_str(value);
            } else {
                self.fields.push((field.name().to_string(), value.to_string()));
            }
        }
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                let _ = write!(self.message, "{value:?}");
            } else {
                self.fields.push((field.name().to_string(), format!("{value:?}")));
            }
        }
    }

    impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for JournalLayer {
        fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, id: &tracing::span::Id, ctx: Context<'_, S>) {
            let mut c = Collect::default();
            attrs.record(&mut c);
            if let Some(span) = ctx.span(id) {
                span.extensions_mut().insert(SpanFields(c.fields));
            }
        }

        fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
            let mut c = Collect::default();
            event.record(&mut c);
            if let Some(scope) = ctx.event_scope(event) {
                for span in scope.from_root() {
                    if let Some(f) = span.extensions().get::<SpanFields>() {
                        c.fields.extend(f.0.iter().cloned());
                    }
                }
            }
            let meta = event.metadata();
            let level = match *meta.level() {
                tracing::Level::ERROR => log::Level::Error,
                tracing::Level::WARN => log::Level::Warn,
                tracing::Level::INFO => log::Level::Info,
                tracing::Level::DEBUG => log::Level::Debug,
                tracing::Level::TRACE => log::Level::Trace,
            };
            let kvs: Vec<(&str, &str)> = c.fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            log::Log::log(
                &self.log,
                &log::Record::builder()
                    .args(format_args!("{}", c.message))
                    .level(level)
                    .target(meta.target())
                    .module_path(meta.module_path())
                    .file(meta.file())
                    .line(meta.line())
                    .key_values(&kvs)
                    .build(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abstract_and_path_sockets_parse() {
        assert!(socket_addr(b"@/org/freedesktop/systemd1/notify").is_some());
        assert!(socket_addr(b"/run/systemd/notify").is_some());
        assert!(socket_addr(b"relative").is_none());
        assert!(socket_addr(b"").is_none());
    }

    #[test]
    fn watchdog_withholds_pings_while_a_loop_is_late() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        server.set_nonblocking(true).unwrap();
        let addr = socket_addr(path.as_os_str().as_encoded_bytes()).unwrap();
        let notifier = Arc::new(Notifier {
            target: Some((UnixDatagram::unbound().unwrap(), addr)),
            watchdog: Some(Duration::from_millis(400)),
        });
        let mut wd = Watchdog::new(notifier);
        let runtime = wd.beat("runtime");
        let recv = |s: &UnixDatagram| {
            let mut buf = [0u8; 64];
            s.recv(&mut buf).ok().map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
        };
        wd.alive(Instant::now());
        assert_eq!(recv(&server).as_deref(), Some("WATCHDOG=1"));
        // Not due yet: nothing.
        wd.alive(Instant::now());
        assert_eq!(recv(&server), None);
        // The runtime stops checking in: no ping although one is due.
        std::thread::sleep(Duration::from_millis(350));
        wd.alive(Instant::now() + Duration::from_millis(250));
        assert_eq!(recv(&server), None);
        // It comes back: pings resume.
        runtime.beat();
        wd.alive(Instant::now() + Duration::from_millis(300));
        assert_eq!(recv(&server).as_deref(), Some("WATCHDOG=1"));
    }
}
