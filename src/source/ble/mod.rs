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
//! Rooms: `hub` (the adapter and its event stream), `device` (one task per
//! device), `matcher` (which advertiser an entry is), [`config`], [`decode`]
//! (GATT payloads) and [`bthome`] (BTHome v2 adverts).
//!
//! BLE has no acks: every reading goes to the pipeline as
//! [`Origin::Ble`], which has no ack route.

pub mod bthome;
pub mod config;
pub mod decode;
mod device;
mod hub;
mod matcher;
pub mod replay;

use crate::events::{Event, RateLimit};
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

pub use device::current_time;
use device::*;
use hub::*;
use matcher::*;
pub use matcher::{Matcher, parse_address, parse_uuid};

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
    /// A command from the cloud for the device named in it: every device
    /// task gets it, the one that is that device and connected carries it
    /// out ([`crate::downlink`]).
    Command(crate::route::DeviceCommand),
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

impl DeviceHandle {
    fn matcher(&self) -> Matcher<'_> {
        Matcher { address: self.address, name_prefix: self.cfg.matcher.name_prefix.as_deref(), service: self.service }
    }
}

/// Run every `[[ble]]` device until `shutdown` fires. Never returns an
/// error: BlueZ and radio problems are retried (see the module doc).
pub async fn run(devices: Vec<BleConfig>, scan: BleScanConfig, data_dir: std::path::PathBuf, ctx: SourceContext) {
    // BLE devices take no acks; commands come down the `Ble` link.
    let SourceContext { ingest: tx, metrics, shutdown, routes } = ctx;
    let (route, mut down) = routes.register(Origin::Ble, 64);
    // Fail closed: without the saved counters, encrypted adverts could be replays.
    let counters = match replay::Counters::open(&data_dir) {
        Ok(c) => Some(Arc::new(c)),
        Err(e) if devices.iter().any(|d| d.bindkey.is_some()) => {
            tracing::error!(
                "ble: cannot read the BTHome replay counters ({e}); encrypted adverts are refused until it is \
                 fixed (stop the gateway and remove the file to start over)"
            );
            None
        }
        Err(_) => None,
    };
    let saver = counters.clone().map(|c| {
        let (every, mut stop) = (scan.counter_save_interval, shutdown.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = crate::shutdown::wait(&mut stop) => break,
                    _ = tokio::time::sleep(every) => save_counters(&c).await,
                }
            }
            c
        })
    });
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
            refused_log: RateLimit::new(Duration::from_secs(10)),
            replay_log: RateLimit::new(Duration::from_secs(10)),
            counters: counters.clone(),
            ever_connected: false,
            session_ok: false,
            routes: routes.clone(),
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
    // Commands: to every device task (a handful); the one it names acts.
    let senders: Vec<mpsc::Sender<DevEvent>> = handles.iter().map(|h| h.events.clone()).collect();
    let dispatch = tokio::spawn(async move {
        let _route = route;
        while let Some(d) = down.recv().await {
            if let crate::route::ToDevice::Command(c) = d {
                for s in &senders {
                    let _ = s.try_send(DevEvent::Command(c.clone()));
                }
            }
        }
    });
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
    dispatch.abort();
    if let Some(saver) = saver
        && let Ok(c) = saver.await
    {
        save_counters(&c).await;
    }
}

/// Save the replay counters off the runtime (an fsync on an SD card can take a while).
async fn save_counters(c: &Arc<replay::Counters>) {
    let c2 = c.clone();
    match tokio::task::spawn_blocking(move || c2.save()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => warn!("ble: cannot save the BTHome replay counters to {}: {e}", c.path().display()),
        Err(e) => warn!("ble: saving the BTHome replay counters failed: {e}"),
    }
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
