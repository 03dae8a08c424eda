//! Commands from the cloud to the devices, durable, with expiry and replies.
//!
//! The way down, and the disk at each step:
//!
//! 1. The uplink subscribes to `[commands] topic` (QoS 2, in its persistent
//!    session). A command that arrives is parsed and written to
//!    `commands.log` ([`store`], fdatasynced) by [`Downlink::receive`]
//!    *before* the uplink answers the PUBLISH (PUBREC / PUBACK), so a command
//!    the broker let go of is on our disk. A repeat of an id the store knows
//!    (the broker's DUP after our crash, or the cloud sending it again) is
//!    acked and ignored: each command is carried out once.
//! 2. [`Downlink::run`] sends each pending command to its device over the
//!    link the device was last heard on ([`crate::route::RouteTable`]):
//!    serial (jsonl `{"cmd":{...}}` or a cobs `Frame::Command`), LAN
//!    (`commands/{device}` through the embedded broker) or BLE (an Immediate
//!    Alert write, or a `custom` device's command characteristic), again
//!    every `retry_every` until the device answers (`{"cmd_ack":{...}}`, a
//!    `Frame::CommandAck`, `commands/{device}/ack`, or for BLE the write
//!    itself) or the command's ttl runs out.
//!    A device may see a command more than once (its answer was lost): it
//!    acts on each id once.
//! 3. The reply (`delivered`, `failed`, `expired` or `rejected`) is a queue
//!    record (priority, like an alarm) to `[commands] reply_topic`, sent by
//!    the uplink exactly once like any batch. Its store note comes first,
//!    naming the queue id it gets, so after a crash the reply is queued
//!    again only if that id never made it to the queue.
//!
//! docs/commands.md tells the whole story, firmware side included.

pub mod config;
pub mod store;

use crate::metrics::Metrics;
use crate::queue::Queue;
use crate::reading::{RecordHeader, RecordKind, now_ms};
use crate::route::{CommandAck, DeviceCommand, RouteTable, ToDevice};
use config::CommandsConfig;
use serde::Deserialize;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{Command, CommandStore, Pending};
use tokio::sync::{Notify, mpsc, watch};

/// How often pending commands are looked at without a reason to.
const TICK: Duration = Duration::from_millis(500);
/// Longest id, device or name accepted.
const MAX_ID: usize = 128;
/// Longest `args` (JSON text): a jsonl line to a device is at most
/// [`crate::wire::MAX_FRAME_LEN`], so no serial device could take more, and
/// a command waiting for its link is bounded in bytes like a reading.
const MAX_ARGS: usize = 3 * 1024;
/// The devices this gateway has heard, one per line.
pub const KNOWN_FILE: &str = "devices.known";

#[derive(Debug, thiserror::Error)]
pub enum DownlinkError {
    /// The store could not be made durable: what is on disk is unknown.
    #[error("{path}: {source}")]
    Store { path: String, source: std::io::Error },
}

/// What a reply says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Delivered,
    Failed,
    Expired,
    Rejected,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Delivered => "delivered",
            Status::Failed => "failed",
            Status::Expired => "expired",
            Status::Rejected => "rejected",
        }
    }
}

/// A command as the cloud writes it.
#[derive(Deserialize)]
struct Wire {
    id: Option<serde_json::Value>,
    device: Option<String>,
    name: Option<String>,
    #[serde(default)]
    args: Option<serde_json::Value>,
    ttl: Option<String>,
}

/// Why a command from the cloud is refused: its id and device when it had
/// them (so the `rejected` reply can name them), and the reason.
#[derive(Debug)]
pub struct Refused {
    pub id: Option<String>,
    pub device: Option<String>,
    pub why: String,
}

/// The command in `payload` (bytes from the cloud), with `default_ttl` when
/// it names none, received at `now` (ms).
pub fn parse_command(payload: &[u8], default_ttl: Duration, now: u64) -> Result<Command, Refused> {
    let w: Wire = serde_json::from_slice(payload).map_err(|e| Refused {
        id: None,
        device: None,
        why: format!("not a command: {e}"),
    })?;
    let id = match &w.id {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        _ => return Err(Refused { id: None, device: w.device, why: "no \"id\" (a string)".into() }),
    };
    let bad = |why: String| Refused { id: Some(id.clone()), device: w.device.clone(), why };
    if id.is_empty() || id.len() > MAX_ID {
        return Err(bad(format!("\"id\" must be 1-{MAX_ID} bytes")));
    }
    let Some(device) = w.device.clone().filter(|d| crate::units::valid_id(d)) else {
        return Err(bad("no valid \"device\"".into()));
    };
    let Some(name) = w.name.filter(|n| !n.is_empty() && n.len() <= MAX_ID) else {
        return Err(bad("no \"name\"".into()));
    };
    let ttl = match &w.ttl {
        None => default_ttl,
        Some(t) => match humantime::parse_duration(t) {
            Ok(d) if !d.is_zero() => d,
            _ => return Err(bad(format!("\"ttl\" {t:?} is not a duration such as \"10m\""))),
        },
    };
    let args = w.args.unwrap_or_else(|| serde_json::json!({})).to_string();
    if args.len() > MAX_ARGS {
        return Err(bad(format!("\"args\" is {} bytes of JSON; at most {MAX_ARGS}", args.len())));
    }
    Ok(Command { id, device, name, args, received_ms: now, expires_ms: now.saturating_add(ttl.as_millis() as u64) })
}

pub struct Downlink {
    cfg: CommandsConfig,
    gateway: String,
    topic: String,
    reply_topic: String,
    store: Mutex<CommandStore>,
    /// The store's file, for errors (taken without its lock: an error is
    /// raised while the lock is held).
    store_path: std::path::PathBuf,
    queue: Arc<Mutex<Queue>>,
    metrics: Arc<Metrics>,
    routes: RouteTable,
    wake: Notify,
    /// Every device this gateway has heard (`data_dir/devices.known`, one
    /// id per line, appended): a command for any other is rejected.
    known: Mutex<std::collections::HashSet<String>>,
    known_path: std::path::PathBuf,
    /// The store's fsyncs already added to `fsyncs_total{file="commands"}`.
    fsyncs_counted: std::sync::atomic::AtomicU64,
}

impl Downlink {
    /// Open the store in `data_dir`.
    pub fn open(
        cfg: &CommandsConfig,
        gateway: &str,
        data_dir: &Path,
        queue: Arc<Mutex<Queue>>,
        metrics: Arc<Metrics>,
        routes: RouteTable,
    ) -> Result<Arc<Downlink>, DownlinkError> {
        let store = CommandStore::open(data_dir).map_err(|source| DownlinkError::Store {
            path: data_dir.join(store::FILE_NAME).display().to_string(),
            source,
        })?;
        Metrics::set(&metrics.commands_pending, store.pending_count() as u64);
        let known_path = data_dir.join(KNOWN_FILE);
        let known = match std::fs::read_to_string(&known_path) {
            Ok(s) => s.lines().filter(|l| !l.is_empty()).map(str::to_string).collect(),
            Err(_) => Default::default(),
        };
        Ok(Arc::new(Downlink {
            known: Mutex::new(known),
            known_path,
            topic: cfg.topic.replace("{gateway}", gateway),
            reply_topic: cfg.reply_topic.replace("{gateway}", gateway),
            cfg: cfg.clone(),
            gateway: gateway.to_string(),
            store_path: store.path().to_path_buf(),
            store: Mutex::new(store),
            queue,
            metrics,
            routes,
            wake: Notify::new(),
            fsyncs_counted: Default::default(),
        }))
    }

    /// Add the store's fsyncs since the last call to `fsyncs_total`.
    pub fn count_fsyncs(&self) {
        let n = self.store().fsyncs;
        Metrics::add_growth(&self.metrics.fsyncs_commands, &self.fsyncs_counted, n);
    }

    /// The topic the uplink subscribes to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    fn store(&self) -> std::sync::MutexGuard<'_, CommandStore> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn store_error(&self, source: std::io::Error) -> DownlinkError {
        // Not `self.store()`: callers hold that lock (`self.store().accept(…)
        // .map_err(…)` keeps its guard to the end of the statement).
        DownlinkError::Store { path: self.store_path.display().to_string(), source }
    }

    /// A PUBLISH on the commands topic: keep it durably (or reply why not)
    /// before the caller acks it. `Err` only when the disk failed.
    pub fn receive(&self, payload: &[u8]) -> Result<(), DownlinkError> {
        let now = now_ms();
        let cmd = match parse_command(payload, self.cfg.default_ttl, now) {
            Ok(c) => c,
            Err(Refused { id, device, why }) => {
                Metrics::inc(&self.metrics.commands_rejected);
                tracing::warn!("command rejected: {why}");
                if let Some(id) = &id
                    && self.store().knows(id)
                {
                    return Ok(());
                }
                let result = serde_json::Value::String(why);
                return self.reply(id.as_deref(), device.as_deref(), Status::Rejected, Some(result), now);
            }
        };
        self.learn_devices();
        // One look at the store (`reply` takes the queue's lock before the
        // store's, so no guard is held across it).
        let (known_id, pending) = {
            let s = self.store();
            (s.knows(&cmd.id), s.pending_count())
        };
        if !known_id
            && self.routes.origin_of(&cmd.device).is_none()
            && !self.known.lock().unwrap_or_else(|e| e.into_inner()).contains(&cmd.device)
        {
            Metrics::inc(&self.metrics.commands_rejected);
            let why = format!("unknown device {:?}: never heard by this gateway", cmd.device);
            tracing::warn!(command = %cmd.id, "command rejected: {why}");
            let (id, device) = (cmd.id.clone(), cmd.device.clone());
            return self.reply(Some(&id), Some(&device), Status::Rejected, Some(why.into()), now);
        }
        if pending >= self.cfg.max_pending && !known_id {
            Metrics::inc(&self.metrics.commands_rejected);
            let why = format!("{} commands already pending (commands.max_pending)", self.cfg.max_pending);
            let (id, device) = (cmd.id.clone(), cmd.device.clone());
            return self.reply(Some(&id), Some(&device), Status::Rejected, Some(why.into()), now);
        }
        let id = cmd.id.clone();
        let accepted = self.store().accept(cmd).map_err(|e| self.store_error(e))?;
        if accepted {
            crate::crashpoint::hit("after-command-accepted");
            Metrics::inc(&self.metrics.commands_received);
            Metrics::set(&self.metrics.commands_pending, self.store().pending_count() as u64);
            tracing::info!(command = %id, "command {id} accepted");
            self.wake.notify_one();
        } else {
            Metrics::inc(&self.metrics.commands_repeated);
            tracing::debug!(command = %id, "command {id} again: already accepted");
        }
        Ok(())
    }

    /// Queue the reply for `id` (exactly once, see the module doc).
    fn reply(
        &self,
        id: Option<&str>,
        device: Option<&str>,
        status: Status,
        result: Option<serde_json::Value>,
        now: u64,
    ) -> Result<(), DownlinkError> {
        let mut body = serde_json::json!({
            "id": id,
            "gateway": self.gateway,
            "status": status.as_str(),
            "ts": now,
        });
        if let Some(d) = device {
            body["device"] = d.into();
        }
        if let Some(r) = result {
            body["result"] = r;
        }
        let body = body.to_string();
        self.queue_reply(id, &body)
    }

    fn queue_reply(&self, id: Option<&str>, body: &str) -> Result<(), DownlinkError> {
        let header = RecordHeader {
            kind: RecordKind::Reply,
            topics: vec![self.reply_topic.clone()],
            lane: crate::rules::config::Lane::Alarm as u8,
            source: 0,
            transformed: false,
            window: None,
            dropped: Vec::new(),
        };
        let record = header.wrap(body.as_bytes());
        // The queue's lock first, then the store's (the order everywhere).
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = id {
            self.store().replying(id, body, q.next_id()).map_err(|e| self.store_error(e))?;
            crate::crashpoint::hit("after-reply-noted");
        }
        Metrics::set(&self.metrics.commands_pending, self.store().pending_count() as u64);
        let r = q.append_with(0, now_ms(), &record, true, 1).and_then(|_| {
            // A power cut here: the append is gone, the note stays.
            crate::crashpoint::hit_losing("after-reply-appended", || q.unsynced_segments());
            q.commit()
        });
        if let Err(e) = r {
            // The note names an id the queue never got: a restart queues the
            // reply again (and the next reply takes the id).
            tracing::error!(command = ?id, "cannot queue the reply to command {id:?}: {e}");
        }
        Ok(())
    }

    /// Send pending commands, expire old ones, take the devices' answers.
    pub async fn run(self: Arc<Self>, mut answers: mpsc::Receiver<CommandAck>, mut stop: watch::Receiver<bool>) {
        let me = self.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || me.recover()).await {
            tracing::error!("commands: {e}");
        }
        loop {
            let mut batch = Vec::new();
            tokio::select! {
                _ = crate::shutdown::wait(&mut stop) => return,
                a = answers.recv() => match a {
                    Some(a) => batch.push(a),
                    None => return,
                },
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(TICK) => {}
            }
            while let Ok(a) = answers.try_recv() {
                batch.push(a);
            }
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.step(batch)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("commands: {e}"),
                Err(e) => tracing::error!("commands: {e}"),
            }
        }
    }

    /// Replies an earlier run noted but may not have queued.
    fn recover(&self) -> Result<(), DownlinkError> {
        let noted = self.store().take_replying();
        let next = self.queue.lock().unwrap_or_else(|e| e.into_inner()).next_id();
        for (id, body, queue_id) in noted {
            if queue_id >= next {
                tracing::warn!(command = %id, "the reply to command {id} was lost with a crash: queued again");
                self.queue_reply(Some(&id), &body)?;
            }
        }
        Ok(())
    }

    /// Remember the devices heard since the last look (appended, not
    /// synced: one lost to a power cut is learnt again when it next talks).
    fn learn_devices(&self) {
        let new = self.routes.take_new_devices();
        if new.is_empty() {
            return;
        }
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let mut lines = String::new();
        for d in new {
            if known.insert(d.clone()) {
                lines += &d;
                lines.push('\n');
            }
        }
        if lines.is_empty() {
            return;
        }
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.known_path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, lines.as_bytes()));
        if let Err(e) = r {
            tracing::warn!("cannot note known devices in {}: {e}", self.known_path.display());
        }
    }

    fn step(&self, answers: Vec<CommandAck>) -> Result<(), DownlinkError> {
        let now = now_ms();
        self.learn_devices();
        for a in answers {
            let Some(p) = self.store().get(&a.id).cloned() else {
                Metrics::inc(&self.metrics.command_answers_unknown);
                tracing::debug!(command = %a.id, "answer to command {} that is not pending", a.id);
                continue;
            };
            if p.cmd.device != a.device {
                Metrics::inc(&self.metrics.command_answers_unknown);
                continue;
            }
            crate::crashpoint::hit("after-device-answer");
            let status = if a.ok { Status::Delivered } else { Status::Failed };
            let c = if a.ok { &self.metrics.commands_delivered } else { &self.metrics.commands_failed };
            Metrics::inc(c);
            Metrics::add(&self.metrics.command_latency_ms, now.saturating_sub(p.cmd.received_ms));
            tracing::info!(command = %a.id, device = %a.device, "command {} {}", a.id, status.as_str());
            self.reply(Some(&a.id), Some(&a.device), status, a.result, now)?;
        }
        let pending: Vec<Pending> = self.store().pending().cloned().collect();
        for p in pending {
            let c = &p.cmd;
            if now >= c.expires_ms {
                Metrics::inc(&self.metrics.commands_expired);
                tracing::info!(command = %c.id, device = %c.device, "command {} expired after {} attempt(s)", c.id, p.attempts);
                let why = if p.attempts == 0 { "the device was not reachable" } else { "the device did not answer" };
                self.reply(Some(&c.id), Some(&c.device), Status::Expired, Some(why.into()), now)?;
                continue;
            }
            if p.last_attempt_ms.is_some_and(|t| now < t + self.cfg.retry_every.as_millis() as u64) {
                continue;
            }
            let Some(origin) = self.routes.origin_of(&c.device) else { continue };
            let down = DeviceCommand {
                id: c.id.clone(),
                device: c.device.clone(),
                name: c.name.clone(),
                args: c.args.clone(),
            };
            if self.routes.try_send(origin, ToDevice::Command(down)) {
                Metrics::inc(&self.metrics.command_attempts);
                self.store().attempt(&c.id, now);
            }
        }
        Ok(())
    }
}

/// The pending commands in `data_dir` (for `commands list`), read only.
pub fn list(data_dir: &Path) -> std::io::Result<Vec<Pending>> {
    if !data_dir.join(store::FILE_NAME).exists() {
        return Ok(Vec::new());
    }
    CommandStore::read_pending(data_dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreConfig;
    use crate::queue::QueueOptions;

    fn downlink(dir: &Path) -> Arc<Downlink> {
        std::fs::write(dir.join(KNOWN_FILE), "w-1\n").unwrap();
        let (q, _) = Queue::open(&dir.join("queue"), QueueOptions::from(&StoreConfig::default())).unwrap();
        let cfg = CommandsConfig::default();
        let metrics = Arc::new(Metrics::default());
        Downlink::open(&cfg, "gw", dir, Arc::new(Mutex::new(q)), metrics, RouteTable::default()).unwrap()
    }

    /// A disk that refuses the command's entry is an error the uplink acts
    /// on (it does not ack the PUBLISH), not a thread stuck on its own lock.
    /// Planted: `store_error` taking the store's lock again → this hangs.
    #[test]
    fn a_store_that_cannot_write_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let d = downlink(dir.path());
        d.store().fail_writes_for_test();
        let (tx, rx) = std::sync::mpsc::channel();
        let d2 = d.clone();
        std::thread::spawn(move || {
            let _ = tx.send(d2.receive(br#"{"id":"c-1","device":"w-1","name":"alert"}"#).map_err(|e| e.to_string()));
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(r) => {
                let e = r.expect_err("a failed write must be an error");
                assert!(e.contains("commands.log"), "the error names the file: {e}");
            }
            Err(_) => panic!("Downlink::receive hung on a failed store write (its own lock taken twice)"),
        }
    }

    #[test]
    fn commands_from_the_cloud_are_parsed_or_refused_with_their_id() {
        let c = parse_command(
            br#"{"id":7,"device":"w-1","name":"alert","ttl":"2s","args":{"level":2}}"#,
            Duration::from_secs(60),
            1_000,
        )
        .unwrap();
        assert_eq!((c.id.as_str(), c.device.as_str(), c.name.as_str()), ("7", "w-1", "alert"));
        assert_eq!((c.received_ms, c.expires_ms), (1_000, 3_000));
        assert_eq!(c.args, r#"{"level":2}"#);
        let r = parse_command(br#"{"id":"c-2","device":"w-1","name":"alert","ttl":"soon"}"#, Duration::ZERO, 0)
            .unwrap_err();
        assert_eq!((r.id.as_deref(), r.device.as_deref()), (Some("c-2"), Some("w-1")));
        assert!(r.why.contains("ttl"), "{}", r.why);
        let r = parse_command(b"{\"id\":", Duration::ZERO, 0).unwrap_err();
        assert!(r.id.is_none() && r.why.starts_with("not a command"), "{r:?}");
        let r = parse_command(br#"{"id":"c-3","device":"no such/dev","name":"x"}"#, Duration::ZERO, 0).unwrap_err();
        assert!(r.why.contains("device"), "{r:?}");
        let long = |n: usize| format!(r#"{{"id":"c-4","device":"w-1","name":"x","args":{{"s":"{}"}}}}"#, "a".repeat(n));
        let fits = MAX_ARGS - r#"{"s":""}"#.len();
        let c = parse_command(long(fits).as_bytes(), Duration::from_secs(1), 0).unwrap();
        assert_eq!(c.args.len(), MAX_ARGS);
        let r = parse_command(long(fits + 1).as_bytes(), Duration::ZERO, 0).unwrap_err();
        assert_eq!(r.id.as_deref(), Some("c-4"));
        assert!(r.why.contains("args") && r.why.contains("3072"), "{r:?}");
    }
}
