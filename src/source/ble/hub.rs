//! The hub: one task owns the adapter (power, scan, the event stream) and hands
//! each configured device the events that are its own.

use super::*;

pub(super) enum HubEnd {
    Shutdown,
    Lost(String),
}

pub(super) struct Hub {
    pub(super) scan: BleScanConfig,
    pub(super) handles: Vec<DeviceHandle>,
    pub(super) shutdown: watch::Receiver<bool>,
    pub(super) session: u64,
    /// What each peripheral seen this session is.
    pub(super) classified: HashMap<PeripheralId, Class>,
    pub(super) manager: Option<Manager>,
    pub(super) last_power_cycle: Option<Instant>,
    /// The current session got as far as scanning.
    pub(super) scanned: bool,
}

impl Hub {
    pub(super) async fn run(&mut self) {
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

    pub(super) async fn manager(&mut self) -> Result<Manager, String> {
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

    pub(super) async fn adapter(&mut self) -> Result<(Adapter, String), String> {
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

    pub(super) async fn session(&mut self) -> HubEnd {
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
    pub(super) fn may_power_cycle(&self) -> bool {
        !self.handles.iter().any(|h| h.connected.load(Ordering::Relaxed))
            && self.last_power_cycle.is_none_or(|t| t.elapsed() >= self.scan.scan_stale_after * 10)
    }

    /// The scan watchdog only applies while some device needs adverts:
    /// a BTHome sensor, or a GATT device not connected (connected devices
    /// usually stop advertising).
    pub(super) fn wants_adverts(&self) -> bool {
        self.handles.iter().any(|h| h.cfg.profile == BleProfile::Bthome || !h.connected.load(Ordering::Relaxed))
    }

    pub(super) async fn on_event(&mut self, adapter: &Adapter, ev: CentralEvent) {
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
    pub(super) async fn classify(&mut self, adapter: &Adapter, id: &PeripheralId) -> Option<usize> {
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

pub(super) fn forward(h: &DeviceHandle, ev: DevEvent) {
    // A device task that is behind loses adverts, not the hub's time.
    if h.events.try_send(ev).is_err() {
        debug!("ble {}: device task busy, event dropped", h.cfg.name);
    }
}

pub(super) fn is_advert(ev: &CentralEvent) -> bool {
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
