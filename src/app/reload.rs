//! SIGHUP: what a new config changes, planned by a pure function
//! ([`plan`], unit-tested below), then carried out on the running parts
//! (`Sources::apply`). See the module doc of [`crate::app`] for the rules.

use super::Sources;
use crate::broker::acl;
use crate::config::{Config, SerialConfig};
use crate::metrics::Metrics;
use std::collections::BTreeMap;

/// What a reload from `old` to `new` must do.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Sections that changed but take effect only at the next restart (the
    /// running values are kept).
    pub restart_only: Vec<&'static str>,
    /// Serial ports to stop, by name: removed, or changed (started again).
    pub serial_stop: Vec<String>,
    /// Serial ports to start: added, or changed.
    pub serial_start: Vec<SerialConfig>,
    /// One phrase per serial change, for the log: "serial X added" etc.
    pub serial_changes: Vec<String>,
    /// BLE devices or scanning changed: one hub owns the adapter, so any
    /// change restarts it.
    pub ble_restart: bool,
    /// BLE devices no longer configured (their metrics go).
    pub ble_removed: Vec<String>,
    /// `[upstream]` changed: a new uplink (the PUBREC log handles a
    /// different broker).
    pub upstream: bool,
}

/// Compare two valid configs. The broker's ACL (rules, `denied_publish`,
/// the users' `publish` prefixes and the `devices` lists) is not in the plan: it is replaced on
/// every reload, and the store says whether that changed anything.
pub fn plan(old: &Config, new: &Config) -> Plan {
    let restart_only = [
        ("[gateway]", old.gateway != new.gateway),
        ("[pipeline]", old.pipeline != new.pipeline),
        ("[store]", old.store != new.store),
        // Rule state (windows, downsample memory) is the pipeline's, and
        // the uplink transforms with the same rules: both restart.
        ("[[rules]]", old.rules != new.rules),
        ("[lanes]", old.lanes != new.lanes),
        ("[commands]", old.commands != new.commands),
        ("[broker]", acl::without_acl(&old.broker) != acl::without_acl(&new.broker)),
        ("[metrics]", old.metrics != new.metrics),
        ("[log]", old.log != new.log),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect();
    let running: BTreeMap<&str, &SerialConfig> = old.serial.iter().map(|p| (p.name.as_str(), p)).collect();
    let wanted: BTreeMap<&str, &SerialConfig> = new.serial.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut p = Plan { restart_only, ..Plan::default() };
    for (name, cfg) in &running {
        match wanted.get(name) {
            None => {
                p.serial_stop.push(name.to_string());
                p.serial_changes.push(format!("serial {name} removed"));
            }
            Some(w) if w != cfg => p.serial_stop.push(name.to_string()),
            Some(_) => {}
        }
    }
    for (name, cfg) in &wanted {
        match running.get(name) {
            None => p.serial_changes.push(format!("serial {name} added")),
            Some(r) if r != cfg => p.serial_changes.push(format!("serial {name} changed")),
            Some(_) => continue,
        }
        p.serial_start.push((*cfg).clone());
    }
    p.ble_restart = old.ble != new.ble || old.ble_scan != new.ble_scan;
    if p.ble_restart {
        p.ble_removed =
            old.ble.iter().filter(|b| !new.ble.iter().any(|n| n.name == b.name)).map(|b| b.name.clone()).collect();
    }
    p.upstream = old.upstream != new.upstream;
    p
}

impl Sources {
    /// Apply a new, valid config (see the module doc of [`crate::app`]).
    pub(super) async fn apply(&mut self, new: Config) {
        let plan = plan(&self.cfg, &new);
        if !plan.restart_only.is_empty() {
            tracing::warn!(
                "reload: {} changed; these take effect at the next restart (running values kept)",
                plan.restart_only.join(", ")
            );
        }
        let mut changes = Vec::new();
        // The broker's ACL: in force for every connection's next packet.
        if let Some(store) = &self.broker_acl
            && store.replace(acl::Acl::from_config(&new.broker))
        {
            changes.push(format!("broker ACL replaced ({} rule(s))", store.get().len()));
        }
        self.cfg.broker.acl = new.broker.acl.clone();
        self.cfg.broker.denied_publish = new.broker.denied_publish;
        self.cfg.broker.devices = new.broker.devices.clone();
        self.cfg.broker.anonymous_devices = new.broker.anonymous_devices.clone();
        for u in &mut self.cfg.broker.users {
            let n = new.broker.users.iter().find(|n| n.name == u.name);
            u.publish = n.and_then(|n| n.publish.clone());
            u.devices = n.and_then(|n| n.devices.clone());
        }
        // Serial ports: by name; a changed entry is stopped and started again.
        for name in &plan.serial_stop {
            self.stop_serial(name).await;
        }
        for port in plan.serial_start {
            self.start_serial(port);
        }
        changes.extend(plan.serial_changes);
        self.cfg.serial = new.serial.clone();
        if plan.ble_restart {
            self.stop_ble().await;
            for name in &plan.ble_removed {
                self.metrics.forget_port(&format!("ble:{name}"));
            }
            changes.push(format!("BLE restarted with {} device(s)", new.ble.len()));
            self.cfg.ble = new.ble.clone();
            self.cfg.ble_scan = new.ble_scan.clone();
            self.start_ble();
        }
        if plan.upstream && !self.stop_uplink().await {
            changes.push("upstream NOT restarted (the old uplink is stuck)".to_string());
        } else if plan.upstream {
            Metrics::set(&self.metrics.upstream_connected, 0);
            let previous = std::mem::replace(&mut self.cfg.upstream, new.upstream.clone());
            match self.start_uplink() {
                Ok(()) => changes.push("upstream reconnecting with the new settings".to_string()),
                Err(e) => {
                    tracing::error!(
                        "reload: cannot start the uplink with the new [upstream] ({e:#}); keeping the old one"
                    );
                    self.cfg.upstream = previous;
                    if let Err(e) = self.start_uplink() {
                        tracing::error!("reload: the old uplink does not start either: {e:#}");
                    }
                }
            }
        }
        Metrics::inc(&self.metrics.reloads);
        if changes.is_empty() {
            tracing::info!("reload: config re-read; no source or upstream changes");
        } else {
            tracing::info!("reload: {}", changes.join(", "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[gateway]
id = "gw"
data_dir = "/nonexistent"

[[serial]]
name = "dock0"
path = "/dev/ttyACM0"

[[serial]]
name = "dock1"
path = "/dev/ttyACM1"
"#;

    fn cfg(extra: &str) -> Config {
        Config::parse(&format!("{BASE}{extra}"), "t.toml").unwrap()
    }

    #[test]
    fn the_same_config_plans_nothing() {
        assert_eq!(plan(&cfg(""), &cfg("")), Plan::default());
    }

    #[test]
    fn serial_ports_are_added_removed_and_restarted_by_name() {
        let old = cfg("");
        let mut new = cfg("\n[[serial]]\nname = \"dock2\"\npath = \"/dev/ttyACM2\"\n");
        new.serial.retain(|p| p.name != "dock0");
        new.serial.iter_mut().find(|p| p.name == "dock1").unwrap().path = "/dev/ttyUSB1".into();
        let p = plan(&old, &new);
        assert_eq!(p.serial_stop, ["dock0", "dock1"]);
        let started: Vec<&str> = p.serial_start.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(started, ["dock1", "dock2"]);
        assert_eq!(p.serial_changes, ["serial dock0 removed", "serial dock1 changed", "serial dock2 added"]);
        assert!(p.restart_only.is_empty() && !p.ble_restart && !p.upstream, "{p:?}");
    }

    #[test]
    fn restart_only_sections_are_named_and_the_acl_is_not_one() {
        let old = cfg("");
        let mut new = cfg("");
        new.pipeline.batch_max_readings += 1;
        new.gateway.id = "gw2".into();
        assert_eq!(plan(&old, &new).restart_only, ["[gateway]", "[pipeline]"]);

        let broker = "\n[broker]\nenabled = true\ntcp = \"127.0.0.1:1883\"\nallow_anonymous = true\n";
        let acl = format!("{broker}\n[[broker.acl]]\ntopic = \"a/#\"\naccess = \"subscribe\"\npermission = \"deny\"\n");
        let p = plan(&cfg(broker), &cfg(&acl));
        assert!(p.restart_only.is_empty(), "an ACL change needs no restart: {p:?}");
        let devices = broker.replace("allow_anonymous = true\n", "allow_anonymous = true\ndevices = [\"{user}-*\"]\n");
        let p = plan(&cfg(broker), &cfg(&devices));
        assert!(p.restart_only.is_empty(), "nor does a change of who may speak for which device: {p:?}");
    }

    #[test]
    fn ble_and_upstream_changes_restart_them() {
        let dev = "\n[[ble]]\nname = \"hr1\"\nmatch = { address = \"AA:BB:CC:DD:EE:01\" }\nprofile = \"heart_rate\"\n";
        let old = cfg(dev);
        let p = plan(&old, &cfg(""));
        assert!(p.ble_restart);
        assert_eq!(p.ble_removed, ["hr1"]);
        let up = "\n[upstream]\nurl = \"mqtt://127.0.0.1:1883\"\nallow_plaintext = true\n";
        let p = plan(&old, &cfg(&format!("{dev}{up}")));
        assert!(p.upstream && !p.ble_restart, "{p:?}");
    }
}
