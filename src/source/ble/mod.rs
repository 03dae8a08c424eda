//! Bluetooth LE input: wearables and sensors through BlueZ, with btleplug.
//!
//! Tasks, all owned by [`run`] and stopped by the shutdown signal:
//! * the **hub** (the task running [`run`]): owns the btleplug manager and
//!   adapter, scans, matches advertisers to `[[ble]]` entries, and hands each
//!   device task its peripheral; it forwards the events a device task needs
//!   (BTHome service data, RSSI, link loss). It runs in *sessions*: a
//!   session ends when BlueZ goes away or restarts (`ServiceUnknown` /
//!   `UnknownObject` on the periodic health check), when the adapter
//!   disappears, when the event stream ends, or when the scan watchdog gives
//!   up; the next session starts with backoff and hands out fresh
//!   peripherals.
//! * one **device task** per `[[ble]]` entry: GATT profiles connect (with
//!   retries and backoff), subscribe and decode notifications, with a
//!   per-device watchdog (`stale_after` without a notification → disconnect
//!   and reconnect); BTHome devices decode the adverts the hub forwards.
//!
//! Things about btleplug 0.13 / bluez-async 0.9 this design works around:
//! * the D-Bus connection's task handle is dropped inside btleplug, so a
//!   lost bus or a restarted BlueZ is never reported: the hub polls the
//!   adapter (`health_interval`) and treats errors as "start a new session";
//! * after a link loss the notification stream stays open and silent: the
//!   hub forwards `DeviceDisconnected`, and the watchdog catches the rest;
//! * `adapter.events()` can go silent after hours (btleplug #332): the scan
//!   watchdog restarts discovery, then power-cycles the adapter (through
//!   the `dbus` crate directly: btleplug has no power API);
//! * `peripherals()` lists every cached device and never shrinks: the hub
//!   never polls it, it classifies devices once per session from events,
//!   and bounds its own cache.
//!
//! BLE has no acks: every reading goes to the pipeline as
//! [`Origin::Ble`], which has no ack route.

pub mod bthome;
pub mod config;
pub mod decode;

use crate::metrics::Metrics;
use crate::reading::{Incoming, Origin, Reading, Value, now_ms};
use crate::source::SourceContext;
use crate::wire::Framing;
use crate::wire::{self, FrameSplitter};
use btleplug::api::{
    Central, CentralEvent, CentralState, CharPropFlags, Characteristic, Manager as _, Peripheral as _, ScanFilter,
};
use btleplug::platform::{Adapter, Manager, Peripheral, PeripheralId};
use config::{BleConfig, BleProfile, BleScanConfig};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};
use uuid::Uuid;

/// The port id of every BLE reading: no ack route exists for it, so the
/// pipeline's acks for BLE devices are dropped (BLE devices do not resend).

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const STABLE_SESSION: Duration = Duration::from_secs(10);
/// Connect + service resolution (bluez-async waits up to 30 s itself).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(40);
/// One GATT operation (discover, read, subscribe).
const OP_TIMEOUT: Duration = Duration::from_secs(10);
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The health check reads one adapter property, which BlueZ answers in
/// milliseconds; silence this long means the bus connection is dead.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);
/// The hub forgets devices it classified once it knows this many.
const CLASSIFY_CACHE_MAX: usize = 4096;
const MALFORMED_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// `AA:BB:CC:DD:EE:FF` (either case) as bytes, most significant first.
pub fn parse_address(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// A UUID: 4 hex digits (16-bit SIG UUID), 8 (32-bit) or the full form.
pub fn parse_uuid(s: &str) -> Option<Uuid> {
    let s = s.trim();
    match s.len() {
        4 => u16::from_str_radix(s, 16).ok().map(btleplug::api::bleuuid::uuid_from_u16),
        8 => u32::from_str_radix(s, 16).ok().map(btleplug::api::bleuuid::uuid_from_u32),
        _ => Uuid::parse_str(s).ok(),
    }
}

fn address_string(a: &[u8; 6]) -> String {
    a.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// The `(service, characteristic)` a GATT profile reads.
fn gatt_target(cfg: &BleConfig) -> Option<(Uuid, Uuid)> {
    use btleplug::api::bleuuid::uuid_from_u16 as u16id;
    match cfg.profile {
        BleProfile::HeartRate => Some((u16id(0x180D), u16id(0x2A37))),
        BleProfile::HealthThermometer => Some((u16id(0x1809), u16id(0x2A1C))),
        BleProfile::Battery => Some((u16id(0x180F), u16id(0x2A19))),
        BleProfile::Custom => Some((parse_uuid(cfg.service.as_deref()?)?, parse_uuid(cfg.characteristic.as_deref()?)?)),
        BleProfile::Bthome => None,
    }
}

/// A matched peripheral, handed from the hub to a device task.
#[derive(Clone)]
struct Found {
    peripheral: Peripheral,
    address: [u8; 6],
    /// The hub session that found it.
    session: u64,
}

/// What the hub knows of a peripheral it has seen.
#[derive(Clone, Copy)]
enum Class {
    /// The `[[ble]]` entry at this index.
    Device(usize),
    /// None of ours.
    Other,
    /// None of ours so far, but it had no name yet (a `name_prefix` may
    /// match once it has one): asked again after this instant.
    Unnamed(Instant),
}

/// How long an unnamed, unmatched device is left alone before BlueZ is asked again.
const UNNAMED_RECHECK: Duration = Duration::from_secs(30);

/// What the hub forwards to a device task.
#[derive(Debug)]
enum DevEvent {
    ServiceData(Vec<u8>),
    Rssi(i16),
    Disconnected,
}

struct DeviceHandle {
    cfg: BleConfig,
    address: Option<[u8; 6]>,
    service: Option<Uuid>,
    found: watch::Sender<Option<Found>>,
    events: mpsc::Sender<DevEvent>,
    connected: Arc<AtomicBool>,
    /// The peripheral matched in this session.
    matched: Option<PeripheralId>,
}

/// A `[[ble]]` entry's `match`, parsed.
#[derive(Debug, Clone, Copy)]
pub struct Matcher<'a> {
    pub address: Option<[u8; 6]>,
    pub name_prefix: Option<&'a str>,
    pub service: Option<Uuid>,
}

impl Matcher<'_> {
    /// Whether an advertiser is this device: every key given must match.
    /// A service matches when advertised as a service UUID or as service data.
    pub fn matches(
        &self,
        address: &[u8; 6],
        name: Option<&str>,
        services: &[Uuid],
        service_data: &HashMap<Uuid, Vec<u8>>,
    ) -> bool {
        self.address.is_none_or(|a| a == *address)
            && self.name_prefix.is_none_or(|p| name.is_some_and(|n| n.starts_with(p)))
            && self.service.is_none_or(|s| services.contains(&s) || service_data.contains_key(&s))
    }
}

impl DeviceHandle {
    fn matcher(&self) -> Matcher<'_> {
        Matcher { address: self.address, name_prefix: self.cfg.matcher.name_prefix.as_deref(), service: self.service }
    }
}

/// Run every `[[ble]]` device until `shutdown` fires. Never returns an
/// error: BlueZ and radio problems are retried (see the module doc).
pub async fn run(devices: Vec<BleConfig>, scan: BleScanConfig, ctx: SourceContext) {
    // BLE devices take no acks: nothing to register in `ctx.routes` yet.
    let SourceContext { ingest: tx, metrics, shutdown, .. } = ctx;
    let mut tasks = JoinSet::new();
    let mut handles = Vec::new();
    for cfg in devices {
        let (found_tx, found_rx) = watch::channel(None);
        let (ev_tx, ev_rx) = mpsc::channel(256);
        let connected = Arc::new(AtomicBool::new(false));
        let dev = Device {
            port_name: format!("ble:{}", cfg.name),
            bindkey: cfg.bindkey.as_deref().and_then(bthome::parse_bindkey),
            splitter: FrameSplitter::new(cfg.framing.unwrap_or(Framing::Jsonl)),
            cfg: cfg.clone(),
            found: found_rx,
            events: ev_rx,
            tx: tx.clone(),
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
            connected: connected.clone(),
            last_rssi: None,
            malformed_log: None,
            ever_connected: false,
            session_ok: false,
        };
        let span = tracing::info_span!("device", device = %cfg.name);
        tasks.spawn(tracing::Instrument::instrument(dev.run(), span));
        handles.push(DeviceHandle {
            address: cfg.matcher.address.as_deref().and_then(parse_address),
            service: cfg.matcher.service.as_deref().and_then(parse_uuid),
            cfg,
            found: found_tx,
            events: ev_tx,
            connected,
            matched: None,
        });
    }
    let mut hub = Hub {
        scan,
        handles,
        shutdown,
        session: 0,
        classified: HashMap::new(),
        manager: None,
        last_power_cycle: None,
        scanned: false,
    };
    hub.run().await;
    // Device tasks watch the same shutdown signal; they end on their own.
    while tasks.join_next().await.is_some() {}
}

enum HubEnd {
    Shutdown,
    Lost(String),
}

struct Hub {
    scan: BleScanConfig,
    handles: Vec<DeviceHandle>,
    shutdown: watch::Receiver<bool>,
    session: u64,
    /// What each peripheral seen this session is.
    classified: HashMap<PeripheralId, Class>,
    manager: Option<Manager>,
    last_power_cycle: Option<Instant>,
    /// The current session got as far as scanning.
    scanned: bool,
}

impl Hub {
    async fn run(&mut self) {
        let mut backoff = BACKOFF_MIN;
        let mut last_failure: Option<String> = None;
        loop {
            let started = Instant::now();
            self.scanned = false;
            let end = self.session().await;
            if let HubEnd::Shutdown = end {
                return;
            }
            // Whatever was found in that session is stale now.
            self.classified.clear();
            for h in &mut self.handles {
                h.matched = None;
                h.found.send_replace(None);
            }
            if self.scanned {
                // It worked for a while: a repeat of the old failure is news.
                last_failure = None;
            }
            match end {
                HubEnd::Shutdown => return,
                HubEnd::Lost(reason) => {
                    if last_failure.as_deref() != Some(reason.as_str()) {
                        warn!("ble: {reason}; starting over");
                        last_failure = Some(reason.clone());
                    }
                    if bus_level(&reason) {
                        // A new D-Bus connection; the old one is unusable.
                        self.manager = None;
                    }
                }
            }
            if started.elapsed() >= STABLE_SESSION {
                backoff = BACKOFF_MIN;
            }
            if !sleep_or_stop(&mut self.shutdown, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn manager(&mut self) -> Result<Manager, String> {
        if let Some(m) = &self.manager {
            return Ok(m.clone());
        }
        // bluez-async connects with a blocking libdbus call: keep it off the
        // runtime's worker threads. `block_on` through the handle lets the
        // connection's I/O task be spawned onto this runtime.
        let rt = tokio::runtime::Handle::current();
        let m = tokio::task::spawn_blocking(move || rt.block_on(Manager::new()))
            .await
            .map_err(|e| format!("D-Bus connect task failed: {e}"))?
            .map_err(|e| format!("cannot connect to the system D-Bus: {e}"))?;
        self.manager = Some(m.clone());
        Ok(m)
    }

    async fn adapter(&mut self) -> Result<(Adapter, String), String> {
        let manager = self.manager().await?;
        let adapters = timeout(manager.adapters()).await.map_err(|e| format!("cannot list adapters: {e}"))?;
        for a in adapters {
            let info = timeout(a.adapter_info()).await.map_err(|e| format!("cannot read the adapter: {e}"))?;
            let name = info.split_whitespace().next().unwrap_or_default().to_string();
            if self.scan.adapter.as_deref().is_none_or(|want| want == name) {
                return Ok((a, name));
            }
        }
        Err(match &self.scan.adapter {
            Some(want) => format!("adapter {want} not found"),
            None => "no Bluetooth adapter".into(),
        })
    }

    async fn session(&mut self) -> HubEnd {
        let (adapter, name) = match self.adapter().await {
            Ok(a) => a,
            Err(e) => return HubEnd::Lost(e),
        };
        self.session += 1;
        if let Ok(Ok(CentralState::PoweredOff)) = tokio::time::timeout(OP_TIMEOUT, adapter.adapter_state()).await {
            info!("ble: adapter {name} is off, powering it on");
            if let Err(e) = set_powered(&name, &[true]).await {
                return HubEnd::Lost(format!("cannot power on {name}: {e}"));
            }
        }
        let mut events = match timeout(adapter.events()).await {
            Ok(ev) => ev,
            Err(e) => return HubEnd::Lost(format!("cannot subscribe to {name} events: {e}")),
        };
        if let Err(e) = timeout(adapter.start_scan(ScanFilter::default())).await {
            return HubEnd::Lost(format!("cannot start scanning on {name}: {e}"));
        }
        info!("ble: scanning on {name} for {} device(s)", self.handles.len());
        self.scanned = true;
        let mut health = tokio::time::interval(self.scan.health_interval);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_advert = Instant::now();
        let mut restarted_scan = false;
        loop {
            tokio::select! {
                biased;
                _ = stopped(&mut self.shutdown) => {
                    let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, adapter.stop_scan()).await;
                    return HubEnd::Shutdown;
                }
                ev = events.next() => match ev {
                    None => return HubEnd::Lost(format!("{name} event stream ended")),
                    Some(ev) => {
                        if is_advert(&ev) {
                            last_advert = Instant::now();
                            restarted_scan = false;
                        }
                        self.on_event(&adapter, ev).await;
                    }
                },
                _ = health.tick() => {
                    // btleplug never reports a lost BlueZ or bus: ask. A lost
                    // bus shows as a call that is never answered.
                    match tokio::time::timeout(HEALTH_TIMEOUT, adapter.adapter_info()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return HubEnd::Lost(format!("BlueZ or {name} gone ({})", describe(&e))),
                        Err(_) => return HubEnd::Lost(format!("BlueZ or the bus gone (no answer within {HEALTH_TIMEOUT:?})")),
                    }
                    if !self.wants_adverts() {
                        last_advert = Instant::now();
                    } else if last_advert.elapsed() >= self.scan.scan_stale_after {
                        if !restarted_scan || !self.may_power_cycle() {
                            // Power-cycling would drop connected devices: then
                            // restarting discovery is all the watchdog does.
                            if !restarted_scan {
                                warn!("ble: no advertisement on {name} for {:?}, restarting discovery", self.scan.scan_stale_after);
                            }
                            let _ = timeout(adapter.stop_scan()).await;
                            if let Err(e) = timeout(adapter.start_scan(ScanFilter::default())).await {
                                return HubEnd::Lost(format!("cannot restart scanning on {name}: {e}"));
                            }
                            restarted_scan = true;
                            last_advert = Instant::now();
                        } else {
                            self.last_power_cycle = Some(Instant::now());
                            warn!("ble: still no advertisement on {name}, power-cycling the adapter");
                            if let Err(e) = set_powered(&name, &[false, true]).await {
                                return HubEnd::Lost(format!("cannot power-cycle {name}: {e}"));
                            }
                            return HubEnd::Lost(format!("scan watchdog power-cycled {name}"));
                        }
                    }
                }
            }
        }
    }

    /// Power-cycling drops every connection, so it is only done when no
    /// device is connected, and at most once per 10 × `scan_stale_after`
    /// (a sensor that is simply away must not cycle the radio forever).
    fn may_power_cycle(&self) -> bool {
        !self.handles.iter().any(|h| h.connected.load(Ordering::Relaxed))
            && self.last_power_cycle.is_none_or(|t| t.elapsed() >= self.scan.scan_stale_after * 10)
    }

    /// The scan watchdog only applies while some device needs adverts:
    /// a BTHome sensor, or a GATT device not connected (connected devices
    /// usually stop advertising).
    fn wants_adverts(&self) -> bool {
        self.handles.iter().any(|h| h.cfg.profile == BleProfile::Bthome || !h.connected.load(Ordering::Relaxed))
    }

    async fn on_event(&mut self, adapter: &Adapter, ev: CentralEvent) {
        match ev {
            CentralEvent::DeviceDiscovered(id)
            | CentralEvent::DeviceUpdated(id)
            | CentralEvent::ServicesAdvertisement { id, .. }
            | CentralEvent::ManufacturerDataAdvertisement { id, .. } => {
                self.classify(adapter, &id).await;
            }
            CentralEvent::ServiceDataAdvertisement { id, service_data } => {
                if let Some(i) = self.classify(adapter, &id).await {
                    let h = &self.handles[i];
                    if h.cfg.profile == BleProfile::Bthome {
                        let key = btleplug::api::bleuuid::uuid_from_u16(bthome::SERVICE_UUID16);
                        if let Some(data) = service_data.get(&key) {
                            forward(h, DevEvent::ServiceData(data.clone()));
                        }
                    }
                }
            }
            CentralEvent::RssiUpdate { id, rssi } => {
                if let Some(i) = self.classify(adapter, &id).await {
                    forward(&self.handles[i], DevEvent::Rssi(rssi));
                }
            }
            CentralEvent::DeviceDisconnected(id) => {
                if let Some(Class::Device(i)) = self.classified.get(&id) {
                    forward(&self.handles[*i], DevEvent::Disconnected);
                }
            }
            CentralEvent::StateUpdate(state) => info!("ble: adapter state {state:?}"),
            CentralEvent::DeviceConnected(_) | CentralEvent::DeviceServicesModified(_) => {}
        }
    }

    /// Which configured device `id` is, asking BlueZ once per peripheral
    /// and session; hands a newly matched peripheral to its device task.
    async fn classify(&mut self, adapter: &Adapter, id: &PeripheralId) -> Option<usize> {
        match self.classified.get(id) {
            Some(Class::Device(i)) => return Some(*i),
            Some(Class::Other) => return None,
            Some(Class::Unnamed(recheck)) if Instant::now() < *recheck => return None,
            _ => {}
        }
        let peripheral = timeout(adapter.peripheral(id)).await.ok()?;
        let props = timeout(peripheral.properties()).await.ok()??;
        let address = parse_address(&props.address.to_string())?;
        let name = props.local_name.as_deref();
        let found = self.handles.iter().position(|h| {
            h.matched.is_none() && h.matcher().matches(&address, name, &props.services, &props.service_data)
        });
        let class = match (found, name) {
            (Some(i), _) => Class::Device(i),
            (None, Some(_)) => Class::Other,
            (None, None) => Class::Unnamed(Instant::now() + UNNAMED_RECHECK),
        };
        if self.classified.len() >= CLASSIFY_CACHE_MAX {
            self.classified.retain(|_, v| matches!(v, Class::Device(_)));
        }
        self.classified.insert(id.clone(), class);
        let i = found?;
        let h = &mut self.handles[i];
        h.matched = Some(id.clone());
        info!("ble {}: found {} ({})", h.cfg.name, address_string(&address), name.unwrap_or("no name"));
        h.found.send_replace(Some(Found { peripheral, address, session: self.session }));
        // Adverts that came with the discovery itself.
        if h.cfg.profile == BleProfile::Bthome {
            let key = btleplug::api::bleuuid::uuid_from_u16(bthome::SERVICE_UUID16);
            if let Some(data) = props.service_data.get(&key) {
                forward(h, DevEvent::ServiceData(data.clone()));
            }
        }
        Some(i)
    }
}

fn forward(h: &DeviceHandle, ev: DevEvent) {
    // A device task that is behind loses adverts, not the hub's time.
    if h.events.try_send(ev).is_err() {
        debug!("ble {}: device task busy, event dropped", h.cfg.name);
    }
}

fn is_advert(ev: &CentralEvent) -> bool {
    matches!(
        ev,
        CentralEvent::DeviceDiscovered(_)
            | CentralEvent::DeviceUpdated(_)
            | CentralEvent::ServiceDataAdvertisement { .. }
            | CentralEvent::ManufacturerDataAdvertisement { .. }
            | CentralEvent::ServicesAdvertisement { .. }
            | CentralEvent::RssiUpdate { .. }
    )
}

/// Errors after which the hub makes a new D-Bus connection: the bus said
/// this one is gone, or a call got no answer at all (a dead bus connection
/// inside btleplug reports nothing, its calls just hang). BlueZ being away
/// (`ServiceUnknown`, `UnknownObject`, `org.bluez.Error.*`) keeps it.
fn bus_level(reason: &str) -> bool {
    reason.contains("org.freedesktop.DBus.Error.Disconnected")
        || reason.contains("org.freedesktop.DBus.Error.NoServer")
        || reason.contains("cannot connect to the system D-Bus")
        || reason.contains("no answer within")
}

async fn timeout<T>(f: impl Future<Output = btleplug::Result<T>>) -> Result<T, String> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(describe(&e)),
        Err(_) => Err(format!("no answer within {OP_TIMEOUT:?}")),
    }
}

/// btleplug's errors wrap bluez-async's, which wrap the D-Bus error; the
/// D-Bus error *name* is what tells the cases apart, so keep it.
fn describe(e: &btleplug::Error) -> String {
    let mut s = e.to_string();
    let dbg = format!("{e:?}");
    if let Some(at) = dbg.find("org.") {
        let name: String = dbg[at..].chars().take_while(|c| c.is_alphanumeric() || *c == '.').collect();
        if !s.contains(&name) {
            s = format!("{s} [{name}]");
        }
    }
    s
}

/// Set the adapter's `Powered` property through the `dbus` crate (btleplug
/// has no API for it), on a blocking thread with a connection of its own.
async fn set_powered(adapter: &str, states: &[bool]) -> Result<(), String> {
    let path = format!("/org/bluez/{adapter}");
    let states = states.to_vec();
    tokio::task::spawn_blocking(move || -> Result<(), dbus::Error> {
        use dbus::blocking::stdintf::org_freedesktop_dbus::Properties;
        let conn = dbus::blocking::Connection::new_system()?;
        let proxy = conn.with_proxy("org.bluez", path, Duration::from_secs(5));
        for (i, on) in states.iter().enumerate() {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(300));
            }
            proxy.set("org.bluez.Adapter1", "Powered", *on)?;
        }
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("{e} [{}]", e.name().unwrap_or("?")))
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Sleep `d` unless shutdown comes first (then false).
async fn sleep_or_stop(rx: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        biased;
        _ = stopped(rx) => false,
        _ = tokio::time::sleep(d) => true,
    }
}

enum DevEnd {
    Shutdown,
    /// The hub's session ended or it found the device anew.
    Replaced,
    Lost(String),
    PipelineClosed,
}

struct Device {
    cfg: BleConfig,
    port_name: String,
    bindkey: Option<[u8; 16]>,
    splitter: FrameSplitter,
    found: watch::Receiver<Option<Found>>,
    events: mpsc::Receiver<DevEvent>,
    tx: mpsc::Sender<Incoming>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    connected: Arc<AtomicBool>,
    last_rssi: Option<Instant>,
    malformed_log: Option<Instant>,
    ever_connected: bool,
    /// The current attempt connected and subscribed.
    session_ok: bool,
}

impl Device {
    async fn run(mut self) {
        let name = self.cfg.name.clone();
        self.metrics.port(&self.port_name, |c| c.connected = false);
        let mut backoff = BACKOFF_MIN;
        let mut last_failure: Option<String> = None;
        loop {
            let Some(found) = self.wait_found().await else { return };
            let started = Instant::now();
            let end = if self.cfg.profile == BleProfile::Bthome {
                self.adverts(&found).await
            } else {
                self.gatt(&found).await
            };
            if self.connected.swap(false, Ordering::Relaxed) {
                self.metrics.port(&self.port_name, |c| c.connected = false);
            }
            match end {
                DevEnd::Shutdown => {
                    if self.cfg.profile != BleProfile::Bthome {
                        let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, found.peripheral.disconnect()).await;
                    }
                    info!("ble {name}: stopped");
                    return;
                }
                DevEnd::PipelineClosed => {
                    warn!("ble {name}: pipeline gone, stopping");
                    return;
                }
                DevEnd::Replaced => {
                    last_failure = None;
                    continue;
                }
                DevEnd::Lost(reason) => {
                    if std::mem::take(&mut self.session_ok) {
                        last_failure = None;
                    }
                    if last_failure.as_deref() != Some(reason.as_str()) {
                        warn!("ble {name}: {reason}; reconnecting");
                        last_failure = Some(reason);
                    }
                    let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, found.peripheral.disconnect()).await;
                }
            }
            if started.elapsed() >= STABLE_SESSION {
                backoff = BACKOFF_MIN;
            }
            // A new hub session (BlueZ back, adapter back) cuts the backoff short.
            tokio::select! {
                biased;
                _ = stopped(&mut self.shutdown) => return,
                _ = tokio::time::sleep(backoff) => {}
                _ = self.found.changed() => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// The peripheral the hub found for this device (`None`: shutdown).
    async fn wait_found(&mut self) -> Option<Found> {
        loop {
            if let Some(f) = self.found.borrow_and_update().clone() {
                return Some(f);
            }
            // Drop events meant for a previous session meanwhile.
            tokio::select! {
                biased;
                _ = stopped(&mut self.shutdown) => return None,
                r = self.found.changed() => if r.is_err() { return None },
                // The hub is gone only at shutdown.
                ev = self.events.recv() => if ev.is_none() { return None },
            }
        }
    }

    fn device_id(&self, found: &Found) -> String {
        self.cfg.device.clone().unwrap_or_else(|| address_string(&found.address))
    }

    fn replaced(&self, found: &Found) -> bool {
        self.found.borrow().as_ref().is_none_or(|f| f.session != found.session)
    }

    /// BTHome: no connection, decode what the hub forwards.
    async fn adverts(&mut self, found: &Found) -> DevEnd {
        let device = self.device_id(found);
        loop {
            tokio::select! {
                biased;
                _ = stopped(&mut self.shutdown) => return DevEnd::Shutdown,
                _ = self.found.changed() => if self.replaced(found) { return DevEnd::Replaced },
                ev = self.events.recv() => match ev {
                    None => return DevEnd::Shutdown,
                    Some(DevEvent::ServiceData(data)) => {
                        match bthome::decode(&data, found.address, self.bindkey.as_ref()) {
                            Ok(p) => {
                                if let Some(id) = p.unknown_object {
                                    self.malformed(&format!("unknown BTHome object {id:#04x}, rest of the advert skipped"));
                                }
                                let now = now_ms();
                                // The packet id is not a seq: a u8 that wraps, saying
                                // only "same measurement as the last advert" when
                                // repeated. Dedup treats it so (pipeline::dedup).
                                for (sensor, value) in p.measurements {
                                    let r = Reading { device: device.clone(), sensor, seq: None, ts: now, value, boot: None };
                                    if let Err(end) = self.deliver_advert(r, p.packet_id).await {
                                        return end;
                                    }
                                }
                            }
                            Err(e) => self.malformed(&e.to_string()),
                        }
                    }
                    Some(DevEvent::Rssi(rssi)) => {
                        if let Err(end) = self.rssi(&device, rssi).await {
                            return end;
                        }
                    }
                    Some(DevEvent::Disconnected) => {}
                },
            }
        }
    }

    /// GATT profiles: connect, subscribe, decode; returns when the link is
    /// lost, the watchdog fires, or the hub replaced the peripheral.
    async fn gatt(&mut self, found: &Found) -> DevEnd {
        let Some((service, characteristic)) = gatt_target(&self.cfg) else {
            return DevEnd::Lost("no characteristic configured".into());
        };
        let p = &found.peripheral;
        let device = self.device_id(found);
        let addr = address_string(&found.address);
        // Link events from before this attempt (e.g. our own disconnect) are stale.
        while self.events.try_recv().is_ok() {}
        match tokio::time::timeout(CONNECT_TIMEOUT, p.connect()).await {
            Ok(Ok(())) => {}
            // Still connected from before a hub session change: carry on.
            Ok(Err(e)) if describe(&e).contains("org.bluez.Error.AlreadyConnected") => {}
            Ok(Err(e)) => return DevEnd::Lost(format!("cannot connect to {addr}: {}", describe(&e))),
            Err(_) => return DevEnd::Lost(format!("cannot connect to {addr}: no answer within {CONNECT_TIMEOUT:?}")),
        }
        if let Err(e) = timeout(p.discover_services()).await {
            return DevEnd::Lost(format!("service discovery on {addr} failed: {e}"));
        }
        let Some(ch) = p
            .services()
            .into_iter()
            .filter(|s| s.uuid == service)
            .flat_map(|s| s.characteristics)
            .find(|c| c.uuid == characteristic)
        else {
            return DevEnd::Lost(format!("{addr} has no characteristic {characteristic} in service {service}"));
        };
        // The stream first, so the first notification is not missed.
        let mut notes = match timeout(p.notifications()).await {
            Ok(n) => n,
            Err(e) => return DevEnd::Lost(format!("cannot listen to {addr}: {e}")),
        };
        let can_notify = ch.properties.intersects(CharPropFlags::NOTIFY | CharPropFlags::INDICATE);
        if can_notify && let Err(e) = timeout(p.subscribe(&ch)).await {
            return DevEnd::Lost(format!("cannot subscribe to {addr}: {e}"));
        }
        self.session_ok = true;
        let again = std::mem::replace(&mut self.ever_connected, true);
        self.connected.store(true, Ordering::Relaxed);
        self.metrics.port(&self.port_name, |c| {
            c.connected = true;
            if again {
                c.reconnects += 1;
            }
        });
        info!("ble {}: connected to {addr}, {}", self.cfg.name, if can_notify { "subscribed" } else { "polling" });
        self.splitter.reset();
        if ch.properties.contains(CharPropFlags::READ)
            && !can_notify
            && let Err(end) = self.read_once(p, &ch, &device).await
        {
            return end;
        }
        if self.cfg.profile == BleProfile::Battery
            && ch.properties.contains(CharPropFlags::READ)
            && let Err(end) = self.read_once(p, &ch, &device).await
        {
            return end;
        }
        let stale_after = self.cfg.stale_after;
        let mut deadline = tokio::time::Instant::now() + stale_after;
        loop {
            tokio::select! {
                biased;
                _ = stopped(&mut self.shutdown) => {
                    if can_notify {
                        let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, p.unsubscribe(&ch)).await;
                    }
                    return DevEnd::Shutdown;
                }
                _ = self.found.changed() => if self.replaced(found) { return DevEnd::Replaced },
                ev = self.events.recv() => match ev {
                    None => return DevEnd::Shutdown,
                    // Signals race: a `Connected=false` from before this
                    // connection may arrive after it. BlueZ's word decides.
                    Some(DevEvent::Disconnected) => if !matches!(timeout(p.is_connected()).await, Ok(true)) {
                        return DevEnd::Lost(format!("link to {addr} lost"));
                    },
                    Some(DevEvent::Rssi(rssi)) => if let Err(end) = self.rssi(&device, rssi).await { return end },
                    Some(DevEvent::ServiceData(_)) => {}
                },
                n = notes.next() => match n {
                    None => return DevEnd::Lost(format!("notification stream from {addr} ended")),
                    Some(n) if n.uuid == characteristic && n.service_uuid == service => {
                        deadline = tokio::time::Instant::now() + stale_after;
                        if let Err(end) = self.value(&device, &n.value).await {
                            return end;
                        }
                    }
                    Some(_) => {}
                },
                _ = tokio::time::sleep_until(deadline) => {
                    // A battery level rarely changes: read it instead of reconnecting.
                    if (self.cfg.profile == BleProfile::Battery || !can_notify) && ch.properties.contains(CharPropFlags::READ) {
                        if let Err(end) = self.read_once(p, &ch, &device).await {
                            return end;
                        }
                        deadline = tokio::time::Instant::now() + stale_after;
                    } else {
                        return DevEnd::Lost(format!("no notification from {addr} for {stale_after:?} (watchdog)"));
                    }
                }
            }
        }
    }

    async fn read_once(&mut self, p: &Peripheral, ch: &Characteristic, device: &str) -> Result<(), DevEnd> {
        match timeout(p.read(ch)).await {
            Ok(v) => self.value(device, &v).await,
            Err(e) => Err(DevEnd::Lost(format!("read failed: {e}"))),
        }
    }

    /// One characteristic value: decode it per profile and deliver.
    async fn value(&mut self, device: &str, data: &[u8]) -> Result<(), DevEnd> {
        let now = now_ms();
        if self.cfg.profile == BleProfile::Custom {
            let framing = self.cfg.framing.unwrap_or(Framing::Jsonl);
            let mut out = Vec::new();
            let mut bad = Vec::new();
            self.splitter.feed(data, |frame| {
                match frame.and_then(|f| wire::parse_reading(framing, f, Some(device), now)) {
                    Ok(r) => out.push(r),
                    Err(e) => bad.push(e.to_string()),
                }
            });
            for e in bad {
                self.malformed(&e);
            }
            for (r, from_device) in out {
                self.deliver(r, from_device).await?;
            }
            return Ok(());
        }
        let decoded = match self.cfg.profile {
            BleProfile::HeartRate => decode::heart_rate(data),
            BleProfile::HealthThermometer => decode::health_thermometer(data),
            _ => decode::battery(data),
        };
        match decoded {
            Ok(d) => {
                for m in d.measurements {
                    let r = Reading {
                        device: device.to_string(),
                        sensor: m.sensor.to_string(),
                        seq: None,
                        ts: d.device_ts_ms.unwrap_or(now),
                        value: m.value,
                        boot: None,
                    };
                    self.deliver(r, d.device_ts_ms.is_some()).await?;
                }
                Ok(())
            }
            Err(e) => {
                self.malformed(&e.to_string());
                Ok(())
            }
        }
    }

    async fn rssi(&mut self, device: &str, rssi: i16) -> Result<(), DevEnd> {
        let Some(every) = self.cfg.rssi_interval else { return Ok(()) };
        if self.last_rssi.is_some_and(|t| t.elapsed() < every) {
            return Ok(());
        }
        self.last_rssi = Some(Instant::now());
        let r = Reading {
            device: device.to_string(),
            sensor: "rssi".into(),
            seq: None,
            ts: now_ms(),
            value: Value::Number(rssi as f64),
            boot: None,
        };
        self.deliver(r, false).await
    }

    fn malformed(&mut self, what: &str) {
        self.metrics.port(&self.port_name, |c| c.malformed += 1);
        if self.malformed_log.is_none_or(|t| t.elapsed() >= MALFORMED_LOG_INTERVAL) {
            self.malformed_log = Some(Instant::now());
            warn!("ble {}: malformed data skipped: {what}", self.cfg.name);
        }
    }

    async fn deliver(&mut self, reading: Reading, ts_from_device: bool) -> Result<(), DevEnd> {
        self.send(Incoming::new(reading, ts_from_device, Origin::Ble)).await
    }

    /// A BTHome measurement, with the advert's packet id (if it has one).
    async fn deliver_advert(&mut self, reading: Reading, packet_id: Option<u8>) -> Result<(), DevEnd> {
        self.send(Incoming { packet_id, ..Incoming::new(reading, false, Origin::Ble) }).await
    }

    async fn send(&mut self, inc: Incoming) -> Result<(), DevEnd> {
        tokio::select! {
            biased;
            _ = stopped(&mut self.shutdown) => Err(DevEnd::Shutdown),
            r = self.tx.send(inc) => match r {
                Ok(()) => {
                    self.metrics.port(&self.port_name, |c| c.readings += 1);
                    Ok(())
                }
                Err(_) => Err(DevEnd::PipelineClosed),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_uuids() {
        assert_eq!(parse_address("aa:BB:cc:00:11:22"), Some([0xAA, 0xBB, 0xCC, 0x00, 0x11, 0x22]));
        assert_eq!(parse_address("AA:BB:CC:00:11"), None);
        assert_eq!(parse_address("AA:BB:CC:00:11:22:33"), None);
        assert_eq!(parse_address("AABBCC001122"), None);
        assert_eq!(address_string(&[0xAA, 0xBB, 0xCC, 0x00, 0x11, 0x22]), "AA:BB:CC:00:11:22");
        assert_eq!(parse_uuid("180d").unwrap().to_string(), "0000180d-0000-1000-8000-00805f9b34fb");
        assert_eq!(parse_uuid("0000180D-0000-1000-8000-00805F9B34FB"), parse_uuid("180D"));
        assert!(parse_uuid("18").is_none());
    }

    #[test]
    fn matching_needs_every_key_given() {
        let addr = [1, 2, 3, 4, 5, 6];
        let hr = parse_uuid("180d").unwrap();
        let bthome = parse_uuid("fcd2").unwrap();
        let data: HashMap<Uuid, Vec<u8>> = [(bthome, vec![0x40])].into();
        let none = HashMap::new();
        let m = Matcher { address: None, name_prefix: Some("Polar"), service: None };
        assert!(m.matches(&addr, Some("Polar H10 1"), &[], &none));
        assert!(!m.matches(&addr, Some("Garmin"), &[], &none));
        assert!(!m.matches(&addr, None, &[], &none), "no name yet is no match");
        let m = Matcher { address: Some(addr), name_prefix: None, service: Some(hr) };
        assert!(m.matches(&addr, None, &[hr], &none));
        assert!(!m.matches(&addr, None, &[], &none), "service missing");
        assert!(!m.matches(&[9; 6], None, &[hr], &none), "other address");
        let m = Matcher { address: None, name_prefix: None, service: Some(bthome) };
        assert!(m.matches(&addr, None, &[], &data), "service data counts as the service");
    }

    #[test]
    fn bus_level_errors() {
        assert!(bus_level("x [org.freedesktop.DBus.Error.Disconnected]"));
        assert!(bus_level("cannot list adapters: no answer within 10s"));
        assert!(!bus_level("x [org.freedesktop.DBus.Error.ServiceUnknown]"));
    }
}
