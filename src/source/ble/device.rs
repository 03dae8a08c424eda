//! One task per `[[ble]]` device: connect, subscribe, decode, reconnect.

use super::*;

pub(super) enum DevEnd {
    Shutdown,
    /// The hub's session ended or it found the device anew.
    Replaced,
    Lost(String),
    PipelineClosed,
}

pub(super) struct Device {
    pub(super) cfg: BleConfig,
    pub(super) port_name: String,
    pub(super) bindkey: Option<[u8; 16]>,
    pub(super) splitter: FrameSplitter,
    pub(super) found: watch::Receiver<Option<Found>>,
    pub(super) events: mpsc::Receiver<DevEvent>,
    pub(super) tx: crate::channel::Sender<Incoming>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) shutdown: watch::Receiver<bool>,
    pub(super) connected: Arc<AtomicBool>,
    pub(super) last_rssi: Option<Instant>,
    pub(super) malformed_log: Option<Instant>,
    /// Custom frames naming a device the entry may not speak for.
    pub(super) refused_log: RateLimit,
    /// Encrypted BTHome: the last counters accepted (`None`: unreadable, so
    /// encrypted adverts are refused), and the log of replays.
    pub(super) counters: Option<Arc<replay::Counters>>,
    pub(super) replay_log: RateLimit,
    pub(super) ever_connected: bool,
    /// The current attempt connected and subscribed.
    pub(super) session_ok: bool,
    /// Where the device is noted for commands and its answers go.
    pub(super) routes: crate::route::RouteTable,
}

impl Device {
    pub(super) async fn run(mut self) {
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
    pub(super) async fn wait_found(&mut self) -> Option<Found> {
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

    pub(super) fn device_id(&self, found: &Found) -> String {
        self.cfg.device.clone().unwrap_or_else(|| address_string(&found.address))
    }

    pub(super) fn replaced(&self, found: &Found) -> bool {
        self.found.borrow().as_ref().is_none_or(|f| f.session != found.session)
    }

    /// BTHome: no connection, decode what the hub forwards.
    pub(super) async fn adverts(&mut self, found: &Found) -> DevEnd {
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
                                if let Some(counter) = p.counter {
                                    let addr = address_string(&found.address);
                                    let verdict = match &self.counters {
                                        Some(c) => c.admit(&addr, counter),
                                        None => {
                                            self.malformed("encrypted advert while the replay counters are unreadable");
                                            continue;
                                        }
                                    };
                                    match verdict {
                                        replay::Verdict::Fresh => {}
                                        replay::Verdict::Repeat => continue,
                                        replay::Verdict::Replay { last } => {
                                            let log = self.replay_log.allow(1);
                                            let link = &self.cfg.name;
                                            Event::BthomeReplay { link, address: &addr, counter, last, log }.emit(&self.metrics);
                                            continue;
                                        }
                                    }
                                }
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
                    // Not connectable: commands wait for their ttl.
                    Some(DevEvent::Command(_)) => {}
                },
            }
        }
    }

    /// GATT profiles: connect, subscribe, decode; returns when the link is
    /// lost, the watchdog fires, or the hub replaced the peripheral.
    pub(super) async fn gatt(&mut self, found: &Found) -> DevEnd {
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
        self.routes.note_device(&device, Origin::Ble);
        // The Current Time Service's Current Time, if the wearable lets us
        // write it: at once, then hourly.
        let cts = {
            use btleplug::api::bleuuid::uuid_from_u16 as u16id;
            p.services().into_iter().filter(|s| s.uuid == u16id(0x1805)).flat_map(|s| s.characteristics).find(|c| {
                c.uuid == u16id(0x2A2B)
                    && c.properties.intersects(CharPropFlags::WRITE | CharPropFlags::WRITE_WITHOUT_RESPONSE)
            })
        };
        let mut clock = tokio::time::interval(TIME_EVERY);
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
                _ = clock.tick(), if cts.is_some() => {
                    let ch = cts.as_ref().expect("cts");
                    let kind = if ch.properties.contains(CharPropFlags::WRITE) { btleplug::api::WriteType::WithResponse } else { btleplug::api::WriteType::WithoutResponse };
                    match timeout(p.write(ch, &current_time(now_ms()), kind)).await {
                        Ok(()) => debug!("ble {}: told {addr} the time (Current Time Service)", self.cfg.name),
                        Err(e) => warn!("ble {}: cannot write the Current Time to {addr}: {e}", self.cfg.name),
                    }
                }
                ev = self.events.recv() => match ev {
                    None => return DevEnd::Shutdown,
                    // Signals race: a `Connected=false` from before this
                    // connection may arrive after it. BlueZ's word decides.
                    Some(DevEvent::Disconnected) => if !matches!(timeout(p.is_connected()).await, Ok(true)) {
                        return DevEnd::Lost(format!("link to {addr} lost"));
                    },
                    Some(DevEvent::Rssi(rssi)) => if let Err(end) = self.rssi(&device, rssi).await { return end },
                    Some(DevEvent::ServiceData(_)) => {}
                    Some(DevEvent::Command(c)) => if c.device == device {
                        self.command(p, &c).await;
                    },
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

    /// Carry out a command on the connected peripheral and answer it:
    /// `alert` writes the Immediate Alert Service's Alert Level (0x1802 /
    /// 0x2A06; `args.level` 0 none, 1 mild, 2 high, default 2). The write
    /// itself is the delivery: a device whose GATT write fails, or that has
    /// no such service, answers `ok: false`.
    async fn command(&mut self, p: &Peripheral, c: &crate::route::DeviceCommand) {
        let args: serde_json::Value = serde_json::from_str(&c.args).unwrap_or_default();
        let (ok, result) = match c.name.as_str() {
            "alert" => {
                let level = args["level"].as_u64().unwrap_or(2).min(2) as u8;
                use btleplug::api::bleuuid::uuid_from_u16 as u16id;
                let (ias, alert) = (u16id(0x1802), u16id(0x2A06));
                let ch = p
                    .services()
                    .into_iter()
                    .filter(|s| s.uuid == ias)
                    .flat_map(|s| s.characteristics)
                    .find(|ch| ch.uuid == alert);
                match ch {
                    None => (false, serde_json::json!("no Immediate Alert Service (0x1802) on the device")),
                    Some(ch) => {
                        match timeout(p.write(&ch, &[level], btleplug::api::WriteType::WithoutResponse)).await {
                            Ok(()) => (true, serde_json::json!({ "alert_level": level })),
                            Err(e) => (false, serde_json::json!(format!("Alert Level write failed: {e}"))),
                        }
                    }
                }
            }
            _ if self.cfg.command_characteristic.is_some() => {
                // The custom profile's command characteristic: the device
                // answers on its notify characteristic (`value`).
                let uuid = self.cfg.command_characteristic.as_deref().and_then(parse_uuid);
                let ch = p.services().into_iter().flat_map(|s| s.characteristics).find(|ch| Some(ch.uuid) == uuid);
                let framing = self.cfg.framing.unwrap_or(Framing::Jsonl);
                let why = match (ch, wire::encode_command(framing, c)) {
                    (None, _) => {
                        format!("no command characteristic {:?} on the device", self.cfg.command_characteristic)
                    }
                    (_, Err(e)) => e.to_string(),
                    (Some(ch), Ok(bytes)) => {
                        match timeout(p.write(&ch, &bytes, btleplug::api::WriteType::WithResponse)).await {
                            Ok(()) => {
                                debug!("ble {}: command {} written; waiting for the answer", self.cfg.name, c.id);
                                return;
                            }
                            Err(e) => format!("command write failed: {e}"),
                        }
                    }
                };
                (false, serde_json::json!(why))
            }
            other => {
                (false, serde_json::json!(format!("command {other:?} is not supported over BLE (only \"alert\")")))
            }
        };
        info!("ble {}: command {} ({}) {}", self.cfg.name, c.id, c.name, if ok { "done" } else { "failed" });
        let a = crate::route::CommandAck { device: c.device.clone(), id: c.id.clone(), ok, result: Some(result) };
        self.routes.command_ack(a);
    }

    pub(super) async fn read_once(&mut self, p: &Peripheral, ch: &Characteristic, device: &str) -> Result<(), DevEnd> {
        match timeout(p.read(ch)).await {
            Ok(v) => self.value(device, &v).await,
            Err(e) => Err(DevEnd::Lost(format!("read failed: {e}"))),
        }
    }

    /// One characteristic value: decode it per profile and deliver.
    pub(super) async fn value(&mut self, device: &str, data: &[u8]) -> Result<(), DevEnd> {
        let now = now_ms();
        if self.cfg.profile == BleProfile::Custom {
            let framing = self.cfg.framing.unwrap_or(Framing::Jsonl);
            let mut out = Vec::new();
            let mut bad = Vec::new();
            let mut answers = Vec::new();
            self.splitter.feed(data, |frame| {
                match frame.and_then(|f| wire::parse_from_device(framing, f, Some(device), now)) {
                    Ok(wire::FromDevice::Reading(r, own_ts)) => out.push((r, own_ts)),
                    Ok(wire::FromDevice::CommandAck(a)) => answers.push(a),
                    Err(e) => bad.push(e.to_string()),
                }
            });
            for e in bad {
                self.malformed(&e);
            }
            for a in answers {
                // Only for the entry's own device (a frame may not answer for another).
                if a.device == device {
                    self.routes.command_ack(a);
                } else {
                    self.malformed(&format!("answer to a command for {:?}, not {device:?}", a.device));
                }
            }
            for (r, from_device) in out {
                let allowed = match &self.cfg.devices {
                    Some(d) => d.permits(&r.device),
                    None => r.device == device,
                };
                if !allowed {
                    let log = self.refused_log.allow(1);
                    let link = &self.cfg.name;
                    Event::DeviceRefused { source: "ble", link, device: &r.device, log }.emit(&self.metrics);
                    continue;
                }
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

    pub(super) async fn rssi(&mut self, device: &str, rssi: i16) -> Result<(), DevEnd> {
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

    pub(super) fn malformed(&mut self, what: &str) {
        self.metrics.port(&self.port_name, |c| c.malformed += 1);
        if self.malformed_log.is_none_or(|t| t.elapsed() >= MALFORMED_LOG_INTERVAL) {
            self.malformed_log = Some(Instant::now());
            warn!("ble {}: malformed data skipped: {what}", self.cfg.name);
        }
    }

    pub(super) async fn deliver(&mut self, reading: Reading, ts_from_device: bool) -> Result<(), DevEnd> {
        self.send(Incoming::new(reading, ts_from_device, Origin::Ble)).await
    }

    /// A BTHome measurement, with the advert's packet id (if it has one).
    pub(super) async fn deliver_advert(&mut self, reading: Reading, packet_id: Option<u8>) -> Result<(), DevEnd> {
        self.send(Incoming { packet_id, ..Incoming::new(reading, false, Origin::Ble) }).await
    }

    pub(super) async fn send(&mut self, inc: Incoming) -> Result<(), DevEnd> {
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

/// How often a connected wearable is told the time.
const TIME_EVERY: Duration = Duration::from_secs(3600);

/// The Current Time characteristic (0x2A2B) for `unix_ms`, in UTC: year
/// (u16 LE), month, day, hours, minutes, seconds, day of week (1 = Monday),
/// fractions of 1/256 s, adjust reason (0x02: external reference time).
pub fn current_time(unix_ms: u64) -> [u8; 10] {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as u16;
    // 1970-01-01 was a Thursday (4).
    let weekday = ((days + 3).rem_euclid(7) + 1) as u8;
    let y = year.to_le_bytes();
    let frac = ((unix_ms % 1000) * 256 / 1000) as u8;
    [y[0], y[1], month, day, (rem / 3600) as u8, (rem % 3600 / 60) as u8, (rem % 60) as u8, weekday, frac, 0x02]
}

#[cfg(test)]
mod tests {
    #[test]
    fn current_time_is_the_civil_date_in_utc() {
        // 2026-12-04 10:30:15.500 UTC, a Friday.
        let t = super::current_time(1_796_380_215_500);
        assert_eq!(t, [0xEA, 0x07, 12, 4, 10, 30, 15, 5, 128, 0x02]);
        // 2024-02-29 00:00:00 UTC, a Thursday.
        assert_eq!(super::current_time(1_709_164_800_000), [0xE8, 0x07, 2, 29, 0, 0, 0, 4, 0, 0x02]);
    }
}
