//! A fake BlueZ for the BLE tests and the BLE load bench: a private
//! `dbus-daemon` ([`Bus`]) and an `org.bluez` service on it, served from this
//! process with zbus ([`FakeBluez`]), with just what btleplug 0.13 /
//! bluez-async 0.9 use: `GetManagedObjects` on `/`, Adapter1 (+ `Powered`,
//! `SetDiscoveryFilter`, `StartDiscovery`), Device1 (`Connect` sets
//! `Connected`, then `ServicesResolved`), GATT services/characteristics as
//! introspectable child nodes, `StartNotify`, and values as
//! `PropertiesChanged(GattCharacteristic1, {Value: ay})`.
//!
//! It follows BlueZ where the gateway's recovery depends on it (issue 20,
//! item 9): adverts reach clients only while the adapter is powered and
//! discovering; `StartDiscovery` and `Connect` on a powered-off adapter fail
//! with `org.bluez.Error.NotReady`; a device's GATT objects exist only while
//! it is connected (exported on `Connect`, removed on disconnect or a lost
//! link), so a `StartNotify` or `ReadValue` on a disconnected device fails;
//! errors carry BlueZ's names (`org.bluez.Error.Failed`, `NotReady`,
//! `AlreadyConnected`).
//!
//! Point the gateway at it with `DBUS_SYSTEM_BUS_ADDRESS` = [`Bus::address`].
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};
use zbus::{ObjectServer, interface};

/// A private bus: `dbus-daemon` with a session-like config in a temp dir.
pub struct Bus {
    child: Child,
    pub address: String,
    dir: tempfile::TempDir,
}

impl Bus {
    pub fn start() -> Bus {
        let exe = "dbus-daemon";
        if Command::new(exe).arg("--version").output().is_err() {
            panic!("`dbus-daemon` not found: install it with `apt-get install dbus` (Debian package `dbus`)");
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let (child, address) = Self::spawn(&dir);
        Bus { child, address, dir }
    }

    /// The system bus dies and comes back at the same address (every
    /// client connection is lost).
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(self.dir.path().join("bus"));
        let (child, address) = Self::spawn(&self.dir);
        assert_eq!(address, self.address, "same socket");
        self.child = child;
        self.address = address;
    }

    fn spawn(dir: &tempfile::TempDir) -> (Child, String) {
        let exe = "dbus-daemon";
        let conf = dir.path().join("bus.conf");
        std::fs::write(
            &conf,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}/bus</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
                dir.path().display()
            ),
        )
        .expect("write bus config");
        let mut child = Command::new(exe)
            .arg(format!("--config-file={}", conf.display()))
            .arg("--nofork")
            .arg("--print-address=1")
            .stdout(Stdio::piped())
            // It warns that it cannot raise its fd limit; nothing else to say.
            .stderr(Stdio::null())
            .spawn()
            .expect("start dbus-daemon");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("dbus-daemon prints its address");
        // Without the `guid=`: like the real system bus address, it stays
        // valid when the daemon restarts (libdbus refuses a changed guid).
        let address = line.trim().split(",guid=").next().unwrap_or_default().to_string();
        assert!(!address.is_empty(), "dbus-daemon printed no address");
        (child, address)
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const HCI0: &str = "/org/bluez/hci0";

pub fn uuid16(u: u16) -> String {
    format!("0000{u:04x}-0000-1000-8000-00805f9b34fb")
}

/// Counters a test checks (shared across BlueZ restarts).
#[derive(Default, Debug)]
pub struct DevStats {
    pub connects: AtomicU32,
    pub disconnects: AtomicU32,
    pub start_notify: AtomicU32,
    /// Every `WriteValue`: (characteristic uuid, value).
    pub writes: std::sync::Mutex<Vec<(u16, Vec<u8>)>>,
}

#[derive(Default, Debug)]
pub struct AdapterStats {
    pub start_discovery: AtomicU32,
    pub power_off: AtomicU32,
}

/// A GATT characteristic of a fake device.
#[derive(Clone, Debug)]
pub struct CharSpec {
    pub service: u16,
    pub uuid: u16,
    pub flags: &'static [&'static str],
    /// What `ReadValue` returns.
    pub value: Vec<u8>,
}

#[derive(Clone, Debug)]
struct DeviceSpec {
    address: String,
    name: String,
    uuids: Vec<String>,
    chars: Vec<CharSpec>,
    service_data: Option<Vec<u8>>,
    stats: Arc<DevStats>,
}

/// Errors as BlueZ names them.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.bluez.Error")]
enum BluezError {
    #[zbus(error)]
    ZBus(zbus::Error),
    Failed(String),
    NotReady(String),
    AlreadyConnected(String),
}

fn dev_path(address: &str) -> String {
    format!("{HCI0}/dev_{}", address.replace(':', "_"))
}

/// `(service path, char path)` of the `i`th characteristic.
fn char_paths(address: &str, chars: &[CharSpec], i: usize) -> (String, String) {
    let mut services: Vec<u16> = Vec::new();
    for c in chars {
        if !services.contains(&c.service) {
            services.push(c.service);
        }
    }
    let si = services.iter().position(|s| *s == chars[i].service).unwrap();
    let sp = format!("{}/service{:04x}", dev_path(address), 0x10 * (si + 1));
    (sp.clone(), format!("{sp}/char{:04x}", 0x10 * (si + 1) + i + 1))
}

struct Adapter1 {
    powered: bool,
    discovering: bool,
    stats: Arc<AdapterStats>,
}

#[interface(name = "org.bluez.Adapter1")]
impl Adapter1 {
    async fn set_discovery_filter(&self, _filter: HashMap<String, OwnedValue>) {}
    async fn start_discovery(&mut self, #[zbus(signal_emitter)] e: SignalEmitter<'_>) -> Result<(), BluezError> {
        if !self.powered {
            return Err(BluezError::NotReady("Resource Not Ready".into()));
        }
        self.stats.start_discovery.fetch_add(1, Ordering::SeqCst);
        self.discovering = true;
        let _ = self.discovering_changed(&e).await;
        Ok(())
    }
    async fn stop_discovery(&mut self, #[zbus(signal_emitter)] e: SignalEmitter<'_>) {
        self.discovering = false;
        let _ = self.discovering_changed(&e).await;
    }
    async fn remove_device(&self, _device: OwnedObjectPath) {}
    #[zbus(property)]
    fn address(&self) -> String {
        "00:1A:7D:DA:71:13".into()
    }
    #[zbus(property)]
    fn address_type(&self) -> String {
        "public".into()
    }
    #[zbus(property)]
    fn modalias(&self) -> String {
        "usb:v1D6Bp0246d0540".into()
    }
    #[zbus(property)]
    fn name(&self) -> String {
        "fake-hci0".into()
    }
    #[zbus(property)]
    fn alias(&self) -> String {
        "fake-hci0".into()
    }
    #[zbus(property)]
    fn powered(&self) -> bool {
        self.powered
    }
    #[zbus(property)]
    async fn set_powered(&mut self, on: bool) {
        if !on {
            self.stats.power_off.fetch_add(1, Ordering::SeqCst);
            self.discovering = false;
        }
        self.powered = on;
    }
    #[zbus(property)]
    fn discovering(&self) -> bool {
        self.discovering
    }
}

struct Device1 {
    spec: DeviceSpec,
    connected: bool,
    services_resolved: bool,
    rssi: i16,
    service_data: HashMap<String, OwnedValue>,
}

fn service_data_map(data: &Option<Vec<u8>>) -> HashMap<String, OwnedValue> {
    let mut m = HashMap::new();
    if let Some(d) = data {
        m.insert(uuid16(0xFCD2), OwnedValue::try_from(Value::from(d.clone())).unwrap());
    }
    m
}

#[interface(name = "org.bluez.Device1")]
impl Device1 {
    async fn connect(
        &mut self,
        #[zbus(signal_emitter)] e: SignalEmitter<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<(), BluezError> {
        let powered = match server.interface::<_, Adapter1>(HCI0).await {
            Ok(a) => a.get().await.powered,
            Err(_) => false,
        };
        if !powered {
            return Err(BluezError::NotReady("Resource Not Ready".into()));
        }
        if self.spec.chars.is_empty() {
            return Err(BluezError::Failed("le-connection-abort-by-local".into()));
        }
        if self.connected {
            return Err(BluezError::AlreadyConnected("Already Connected".into()));
        }
        self.spec.stats.connects.fetch_add(1, Ordering::SeqCst);
        // The GATT database is exported once connected (not cached: no bond).
        add_gatt(server, &self.spec).await?;
        self.connected = true;
        let _ = self.connected_changed(&e).await;
        self.services_resolved = true;
        let _ = self.services_resolved_changed(&e).await;
        Ok(())
    }
    async fn disconnect(
        &mut self,
        #[zbus(signal_emitter)] e: SignalEmitter<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) {
        self.spec.stats.disconnects.fetch_add(1, Ordering::SeqCst);
        remove_gatt(server, &self.spec).await;
        self.connected = false;
        self.services_resolved = false;
        let _ = self.services_resolved_changed(&e).await;
        let _ = self.connected_changed(&e).await;
    }
    #[zbus(property)]
    fn address(&self) -> String {
        self.spec.address.clone()
    }
    #[zbus(property)]
    fn address_type(&self) -> String {
        "public".into()
    }
    #[zbus(property)]
    fn name(&self) -> String {
        self.spec.name.clone()
    }
    #[zbus(property)]
    fn alias(&self) -> String {
        self.spec.name.clone()
    }
    #[zbus(property)]
    fn adapter(&self) -> OwnedObjectPath {
        OwnedObjectPath::try_from(HCI0).unwrap()
    }
    #[zbus(property)]
    fn paired(&self) -> bool {
        false
    }
    #[zbus(property)]
    fn trusted(&self) -> bool {
        false
    }
    #[zbus(property)]
    fn blocked(&self) -> bool {
        false
    }
    #[zbus(property)]
    fn legacy_pairing(&self) -> bool {
        false
    }
    #[zbus(property)]
    fn connected(&self) -> bool {
        self.connected
    }
    #[zbus(property)]
    fn services_resolved(&self) -> bool {
        self.services_resolved
    }
    #[zbus(property, name = "RSSI")]
    fn rssi(&self) -> i16 {
        self.rssi
    }
    #[zbus(property, name = "UUIDs")]
    fn uuids(&self) -> Vec<String> {
        self.spec.uuids.clone()
    }
    #[zbus(property)]
    fn service_data(&self) -> HashMap<String, OwnedValue> {
        self.service_data.iter().map(|(k, v)| (k.clone(), v.try_clone().unwrap())).collect()
    }
    #[zbus(property)]
    fn manufacturer_data(&self) -> HashMap<u16, OwnedValue> {
        HashMap::new()
    }
}

struct GattService1 {
    uuid: u16,
    device: String,
}

#[interface(name = "org.bluez.GattService1")]
impl GattService1 {
    #[zbus(property, name = "UUID")]
    fn uuid(&self) -> String {
        uuid16(self.uuid)
    }
    #[zbus(property)]
    fn primary(&self) -> bool {
        true
    }
    #[zbus(property)]
    fn device(&self) -> OwnedObjectPath {
        OwnedObjectPath::try_from(self.device.as_str()).unwrap()
    }
}

struct GattCharacteristic1 {
    spec: CharSpec,
    service: String,
    value: Vec<u8>,
    notifying: bool,
    stats: Arc<DevStats>,
}

#[interface(name = "org.bluez.GattCharacteristic1")]
impl GattCharacteristic1 {
    async fn read_value(&self, _options: HashMap<String, OwnedValue>) -> Vec<u8> {
        self.spec.value.clone()
    }
    async fn write_value(&self, value: Vec<u8>, _options: HashMap<String, OwnedValue>) -> Result<(), BluezError> {
        // GATT objects exist only while the device is connected.
        self.stats.writes.lock().unwrap().push((self.spec.uuid, value));
        Ok(())
    }
    async fn start_notify(&mut self, #[zbus(signal_emitter)] e: SignalEmitter<'_>) {
        self.stats.start_notify.fetch_add(1, Ordering::SeqCst);
        self.notifying = true;
        let _ = self.notifying_changed(&e).await;
    }
    async fn stop_notify(&mut self, #[zbus(signal_emitter)] e: SignalEmitter<'_>) {
        self.notifying = false;
        let _ = self.notifying_changed(&e).await;
    }
    #[zbus(property, name = "UUID")]
    fn uuid(&self) -> String {
        uuid16(self.spec.uuid)
    }
    #[zbus(property)]
    fn service(&self) -> OwnedObjectPath {
        OwnedObjectPath::try_from(self.service.as_str()).unwrap()
    }
    #[zbus(property)]
    fn flags(&self) -> Vec<String> {
        self.spec.flags.iter().map(|s| s.to_string()).collect()
    }
    #[zbus(property)]
    fn value(&self) -> Vec<u8> {
        self.value.clone()
    }
    #[zbus(property)]
    fn notifying(&self) -> bool {
        self.notifying
    }
    #[zbus(property, name = "MTU")]
    fn mtu(&self) -> u16 {
        247
    }
}

/// `org.bluez` on a [`Bus`], driven synchronously from a test.
pub struct FakeBluez {
    rt: tokio::runtime::Runtime,
    address: String,
    conn: Option<zbus::Connection>,
    devices: Vec<DeviceSpec>,
    pub adapter: Arc<AdapterStats>,
}

impl FakeBluez {
    pub fn start(bus_address: &str) -> FakeBluez {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let mut f = FakeBluez {
            rt,
            address: bus_address.to_string(),
            conn: None,
            devices: Vec::new(),
            adapter: Arc::default(),
        };
        f.up();
        f
    }

    /// Serve the adapter and every device, then take the name (so a client
    /// never sees `org.bluez` half populated).
    pub fn up(&mut self) {
        let (address, devices, stats) = (self.address.clone(), self.devices.clone(), self.adapter.clone());
        let conn = self.rt.block_on(async move {
            let conn = zbus::connection::Builder::address(address.as_str())?.build().await?;
            let server = conn.object_server();
            server.at("/", zbus::fdo::ObjectManager).await?;
            server.at(HCI0, Adapter1 { powered: true, discovering: false, stats }).await?;
            for d in &devices {
                add_device(server, d).await?;
            }
            conn.request_name("org.bluez").await?;
            zbus::Result::Ok(conn)
        });
        self.conn = Some(conn.expect("fake BlueZ starts"));
    }

    /// BlueZ stops: its name and every object vanish.
    pub fn down(&mut self) {
        if let Some(c) = self.conn.take() {
            self.rt.block_on(async move {
                let _ = c.release_name("org.bluez").await;
                let _ = c.close().await;
            });
        }
    }

    /// `systemctl restart bluetooth`: everything comes back disconnected.
    pub fn restart(&mut self) {
        self.down();
        std::thread::sleep(Duration::from_millis(300));
        self.up();
    }

    /// The USB dongle is pulled: the adapter and its devices vanish
    /// (InterfacesRemoved), BlueZ itself stays.
    pub fn unplug_adapter(&self) {
        let conn = self.conn().clone();
        let devices = self.devices.clone();
        self.rt.block_on(async move {
            let server = conn.object_server();
            for d in &devices {
                let _ = server.remove::<Device1, _>(dev_path(&d.address).as_str()).await;
                for i in 0..d.chars.len() {
                    let (sp, cp) = char_paths(&d.address, &d.chars, i);
                    let _ = server.remove::<GattCharacteristic1, _>(cp.as_str()).await;
                    let _ = server.remove::<GattService1, _>(sp.as_str()).await;
                }
            }
            let _ = server.remove::<Adapter1, _>(HCI0).await;
        });
    }

    /// The dongle is back: adapter and devices reappear, disconnected.
    pub fn plug_adapter(&self) {
        let conn = self.conn().clone();
        let (devices, stats) = (self.devices.clone(), self.adapter.clone());
        self.rt
            .block_on(async move {
                let server = conn.object_server();
                server.at(HCI0, Adapter1 { powered: true, discovering: false, stats }).await?;
                for d in &devices {
                    add_device(server, d).await?;
                }
                zbus::Result::Ok(())
            })
            .expect("plug adapter");
    }

    fn conn(&self) -> &zbus::Connection {
        self.conn.as_ref().expect("fake BlueZ is up")
    }

    fn spec(&self, address: &str) -> &DeviceSpec {
        self.devices.iter().find(|d| d.address == address).expect("known device")
    }

    /// A connectable device with GATT characteristics.
    pub fn add_gatt_device(&mut self, address: &str, name: &str, chars: Vec<CharSpec>) -> Arc<DevStats> {
        let mut uuids: Vec<String> = chars.iter().map(|c| uuid16(c.service)).collect();
        uuids.dedup();
        self.add(DeviceSpec {
            address: address.into(),
            name: name.into(),
            uuids,
            chars,
            service_data: None,
            stats: Arc::default(),
        })
    }

    /// An advertiser (BTHome) with this service data; not connectable.
    pub fn add_advertiser(&mut self, address: &str, name: &str, service_data: Vec<u8>) -> Arc<DevStats> {
        self.add(DeviceSpec {
            address: address.into(),
            name: name.into(),
            uuids: vec![uuid16(0xFCD2)],
            chars: Vec::new(),
            service_data: Some(service_data),
            stats: Arc::default(),
        })
    }

    fn add(&mut self, spec: DeviceSpec) -> Arc<DevStats> {
        let stats = spec.stats.clone();
        self.devices.push(spec.clone());
        let conn = self.conn().clone();
        self.rt.block_on(async move { add_device(conn.object_server(), &spec).await }).expect("add device");
        stats
    }

    /// Whether the adapter is powered and discovering (what a radio needs to hear adverts).
    pub fn scanning(&self) -> bool {
        let Some(conn) = self.conn.clone() else { return false };
        self.rt.block_on(async move {
            match conn.object_server().interface::<_, Adapter1>(HCI0).await {
                Ok(a) => {
                    let g = a.get().await;
                    g.powered && g.discovering
                }
                Err(_) => false,
            }
        })
    }

    /// A new advert: the device's ServiceData changes (and a PropertiesChanged
    /// goes out), heard only while the adapter scans: waits up to 5 s for
    /// that, then drops the advert (false) as the air would.
    pub fn advertise(&self, address: &str, service_data: Vec<u8>) -> bool {
        let scanning = Instant::now() + Duration::from_secs(5);
        while !self.scanning() {
            if Instant::now() >= scanning {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.advertise_now(address, service_data);
        true
    }

    fn advertise_now(&self, address: &str, service_data: Vec<u8>) {
        let path = dev_path(address);
        let conn = self.conn().clone();
        self.rt
            .block_on(async move {
                let d = conn.object_server().interface::<_, Device1>(path.as_str()).await?;
                let mut g = d.get_mut().await;
                g.service_data = service_data_map(&Some(service_data));
                g.rssi = -40 - (g.rssi.abs() % 20);
                g.service_data_changed(d.signal_emitter()).await?;
                g.r_s_s_i_changed(d.signal_emitter()).await
            })
            .expect("advertise");
    }

    /// Notify a value if the characteristic is being listened to; true if sent.
    pub fn notify(&self, address: &str, char_uuid: u16, value: &[u8]) -> bool {
        let spec = self.spec(address);
        let i = spec.chars.iter().position(|c| c.uuid == char_uuid).expect("known characteristic");
        let (_, cp) = char_paths(address, &spec.chars, i);
        let conn = self.conn().clone();
        let value = value.to_vec();
        self.rt
            .block_on(async move {
                let c = conn.object_server().interface::<_, GattCharacteristic1>(cp.as_str()).await?;
                let mut g = c.get_mut().await;
                if !g.notifying {
                    return zbus::Result::Ok(false);
                }
                g.value = value;
                g.value_changed(c.signal_emitter()).await?;
                Ok(true)
            })
            .unwrap_or(false)
    }

    pub fn is_notifying(&self, address: &str, char_uuid: u16) -> bool {
        let spec = self.spec(address);
        let i = spec.chars.iter().position(|c| c.uuid == char_uuid).expect("known characteristic");
        let (_, cp) = char_paths(address, &spec.chars, i);
        let Some(conn) = self.conn.clone() else { return false };
        self.rt.block_on(async move {
            match conn.object_server().interface::<_, GattCharacteristic1>(cp.as_str()).await {
                Ok(c) => c.get().await.notifying,
                Err(_) => false,
            }
        })
    }

    pub fn wait_notifying(&self, address: &str, char_uuid: u16, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.is_notifying(address, char_uuid) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The radio link drops (out of range): Connected goes false, notifications stop.
    pub fn drop_link(&self, address: &str) {
        let spec = self.spec(address).clone();
        let conn = self.conn().clone();
        self.rt
            .block_on(async move {
                let server = conn.object_server();
                remove_gatt(server, &spec).await;
                let d = server.interface::<_, Device1>(dev_path(&spec.address).as_str()).await?;
                let mut g = d.get_mut().await;
                g.connected = false;
                g.services_resolved = false;
                g.services_resolved_changed(d.signal_emitter()).await?;
                g.connected_changed(d.signal_emitter()).await
            })
            .expect("drop link");
    }
}

impl Drop for FakeBluez {
    fn drop(&mut self) {
        self.down();
    }
}

/// The device's GATT services and characteristics, exported on connect.
async fn add_gatt(server: &ObjectServer, d: &DeviceSpec) -> zbus::Result<()> {
    let path = dev_path(&d.address);
    for (i, c) in d.chars.iter().enumerate() {
        let (sp, cp) = char_paths(&d.address, &d.chars, i);
        server.at(sp.as_str(), GattService1 { uuid: c.service, device: path.clone() }).await?;
        let ch = GattCharacteristic1 {
            spec: c.clone(),
            service: sp.clone(),
            value: c.value.clone(),
            notifying: false,
            stats: d.stats.clone(),
        };
        server.at(cp.as_str(), ch).await?;
    }
    Ok(())
}

/// Gone on disconnect: a client still holding their paths gets UnknownObject.
async fn remove_gatt(server: &ObjectServer, d: &DeviceSpec) {
    for i in 0..d.chars.len() {
        let (sp, cp) = char_paths(&d.address, &d.chars, i);
        let _ = server.remove::<GattCharacteristic1, _>(cp.as_str()).await;
        let _ = server.remove::<GattService1, _>(sp.as_str()).await;
    }
}

async fn add_device(server: &ObjectServer, d: &DeviceSpec) -> zbus::Result<()> {
    let path = dev_path(&d.address);
    let dev = Device1 {
        spec: d.clone(),
        connected: false,
        services_resolved: false,
        rssi: -50,
        service_data: service_data_map(&d.service_data),
    };
    server.at(path.as_str(), dev).await?;
    Ok(())
}
