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
//!    serial jsonl today (`{"cmd":{...}}`), again every `retry_every` until
//!    the device answers (`{"cmd_ack":{...}}`) or the command's ttl runs out.
//!    A device may see a command more than once (its answer was lost): it
//!    acts on each id once.
//! 3. The reply (`delivered`, `failed`, `expired` or `rejected`) is a queue
//!    record (priority, like an alarm) to `[commands] reply_topic`, sent by
//!    the uplink exactly once like any batch. Its store note comes first,
//!    naming the queue id it gets, so after a crash the reply is queued
//!    again only if that id never made it to the queue.
//!
//! Not built yet (issue "Downlink"): BLE (Immediate Alert writes) and LAN
//! delivery, the cobs framing's command frames, time for the devices.

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

pub struct Downlink {
    cfg: CommandsConfig,
    gateway: String,
    topic: String,
    reply_topic: String,
    store: Mutex<CommandStore>,
    queue: Arc<Mutex<Queue>>,
    metrics: Arc<Metrics>,
    routes: RouteTable,
    wake: Notify,
    /// Every device this gateway has heard (`data_dir/devices.known`, one
    /// id per line, appended): a command for any other is rejected.
    known: Mutex<std::collections::HashSet<String>>,
    known_path: std::path::PathBuf,
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
            store: Mutex::new(store),
            queue,
            metrics,
            routes,
            wake: Notify::new(),
        }))
    }

    /// The topic the uplink subscribes to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    fn store(&self) -> std::sync::MutexGuard<'_, CommandStore> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn store_error(&self, source: std::io::Error) -> DownlinkError {
        DownlinkError::Store { path: self.store().path().display().to_string(), source }
    }

    /// A PUBLISH on the commands topic: keep it durably (or reply why not)
    /// before the caller acks it. `Err` only when the disk failed.
    pub fn receive(&self, payload: &[u8]) -> Result<(), DownlinkError> {
        let now = now_ms();
        let cmd = match self.parse(payload, now) {
            Ok(c) => c,
            Err((id, device, why)) => {
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
        if !self.store().knows(&cmd.id)
            && self.routes.origin_of(&cmd.device).is_none()
            && !self.known.lock().unwrap_or_else(|e| e.into_inner()).contains(&cmd.device)
        {
            Metrics::inc(&self.metrics.commands_rejected);
            let why = format!("unknown device {:?}: never heard by this gateway", cmd.device);
            tracing::warn!(command = %cmd.id, "command rejected: {why}");
            let (id, device) = (cmd.id.clone(), cmd.device.clone());
            return self.reply(Some(&id), Some(&device), Status::Rejected, Some(why.into()), now);
        }
        if self.store().pending_count() >= self.cfg.max_pending && !self.store().knows(&cmd.id) {
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

    /// The command in `payload`, or (its id, its device, why it is refused).
    #[allow(clippy::type_complexity)]
    fn parse(&self, payload: &[u8], now: u64) -> Result<Command, (Option<String>, Option<String>, String)> {
        let w: Wire = serde_json::from_slice(payload).map_err(|e| (None, None, format!("not a command: {e}")))?;
        let id = match &w.id {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => return Err((None, w.device, "no \"id\" (a string)".into())),
        };
        let bad = |why: String| (Some(id.clone()), w.device.clone(), why);
        if id.is_empty() || id.len() > MAX_ID {
            return Err(bad(format!("\"id\" must be 1-{MAX_ID} bytes")));
        }
        let Some(device) = w.device.clone().filter(|d| crate::units::valid_id(d)) else {
            return Err(bad("no valid \"device\"".into()));
        };
        let Some(name) = w.name.clone().filter(|n| !n.is_empty() && n.len() <= MAX_ID) else {
            return Err(bad("no \"name\"".into()));
        };
        let ttl = match &w.ttl {
            None => self.cfg.default_ttl,
            Some(t) => match humantime::parse_duration(t) {
                Ok(d) if !d.is_zero() => d,
                _ => return Err(bad(format!("\"ttl\" {t:?} is not a duration such as \"10m\""))),
            },
        };
        let args = w.args.clone().unwrap_or_else(|| serde_json::json!({}));
        Ok(Command {
            id: id.clone(),
            device,
            name,
            args: args.to_string(),
            received_ms: now,
            expires_ms: now.saturating_add(ttl.as_millis() as u64),
        })
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
