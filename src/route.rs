//! The way back to a device: one table from each [`Origin`] to its link.
//!
//! Readings go up one shared channel to the pipeline. What goes down to a
//! device (today the pipeline's acks; commands from the cloud will take the
//! same way) needs the link the device is on. A source registers its link
//! with [`RouteTable::register`] and keeps the returned [`Route`] for as long
//! as the link runs: dropping it (the task ended, a reload removed the port)
//! takes the entry out, so nothing is ever sent into a link that is gone.
//!
//! Sending never waits: a link that is busy or gone drops the message, and
//! for acks that is safe (the device resends, and its duplicate triggers a
//! fresh cumulative ack).

use crate::reading::{Ack, Origin};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// What travels down a link to a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToDevice {
    /// Every reading of the device up to the ack's seq is durable.
    Ack(Ack),
    /// A command from the cloud ([`crate::downlink`]); the device answers
    /// with a [`CommandAck`].
    Command(DeviceCommand),
}

/// A command as a device sees it (jsonl: `{"cmd":{...}}`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceCommand {
    pub id: String,
    pub device: String,
    pub name: String,
    /// JSON text of the command's `args` (`{}` when absent).
    pub args: String,
}

/// A device's answer to a command (jsonl: `{"cmd_ack":{...}}`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CommandAck {
    pub device: String,
    pub id: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

type Links = HashMap<Origin, mpsc::Sender<ToDevice>>;

/// Origin → link; cheap to clone, shared by the sources and the pipeline.
/// It also knows which link each device was last heard on, and where the
/// devices' answers to commands go.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    links: Arc<Mutex<Links>>,
    devices: Arc<Mutex<HashMap<String, Origin>>>,
    /// Devices heard for the first time since the downlink last looked.
    new_devices: Arc<Mutex<Vec<String>>>,
    command_acks: Arc<Mutex<Option<mpsc::Sender<CommandAck>>>>,
}

impl RouteTable {
    /// Register `origin`'s link with room for `capacity` messages: they
    /// arrive on the returned receiver until the [`Route`] is dropped. A
    /// second registration of the same origin replaces the first.
    pub fn register(&self, origin: Origin, capacity: usize) -> (Route, mpsc::Receiver<ToDevice>) {
        let (tx, rx) = mpsc::channel(capacity);
        self.lock().insert(origin, tx.clone());
        (Route { table: self.clone(), origin, tx }, rx)
    }

    /// Hand `msg` to `origin`'s link without waiting. False when the origin
    /// has no link now, or its link is full or closed.
    pub fn try_send(&self, origin: Origin, msg: ToDevice) -> bool {
        self.lock().get(&origin).is_some_and(|tx| tx.try_send(msg).is_ok())
    }

    /// `device` was heard on `origin` (a source calls this when the device
    /// of its readings changes, not per reading).
    pub fn note_device(&self, device: &str, origin: Origin) {
        let mut d = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        if d.get(device) != Some(&origin) && d.insert(device.to_string(), origin).is_none() {
            let mut n = self.new_devices.lock().unwrap_or_else(|e| e.into_inner());
            // Bounded: only the downlink drains it.
            if n.len() < 4096 {
                n.push(device.to_string());
            }
        }
    }

    /// Devices heard for the first time since the last call.
    pub fn take_new_devices(&self) -> Vec<String> {
        std::mem::take(&mut *self.new_devices.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The link `device` was last heard on.
    pub fn origin_of(&self, device: &str) -> Option<Origin> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner()).get(device).copied()
    }

    /// Where devices' answers to commands go (the downlink).
    pub fn set_command_acks(&self, tx: mpsc::Sender<CommandAck>) {
        *self.command_acks.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    }

    /// Hand a device's answer to the downlink without waiting; false when
    /// there is none or it is full (the device answers again when the
    /// command is sent again).
    pub fn command_ack(&self, ack: CommandAck) -> bool {
        self.command_acks.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|tx| tx.try_send(ack).is_ok())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A registered link; unregisters on drop.
#[derive(Debug)]
pub struct Route {
    table: RouteTable,
    origin: Origin,
    tx: mpsc::Sender<ToDevice>,
}

impl Drop for Route {
    fn drop(&mut self) {
        let mut links = self.table.lock();
        // Only our own entry: a newer registration of the origin stays.
        if links.get(&self.origin).is_some_and(|tx| tx.same_channel(&self.tx)) {
            links.remove(&self.origin);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(seq: u64) -> ToDevice {
        ToDevice::Ack(Ack { device: "d".into(), seq, boot: None })
    }

    #[test]
    fn a_route_lives_as_long_as_its_guard() {
        let t = RouteTable::default();
        assert!(!t.try_send(Origin::Serial(0), ack(1)), "no link yet");
        let (route, mut rx) = t.register(Origin::Serial(0), 4);
        assert!(t.try_send(Origin::Serial(0), ack(1)));
        assert!(!t.try_send(Origin::Lan, ack(1)), "only the registered origin");
        assert_eq!(rx.try_recv().unwrap(), ack(1));
        drop(route);
        assert!(!t.try_send(Origin::Serial(0), ack(2)), "the route went with its guard");
        assert!(t.links.lock().unwrap().is_empty());
    }

    #[test]
    fn a_full_link_drops_instead_of_waiting() {
        let t = RouteTable::default();
        let (_route, _rx) = t.register(Origin::Lan, 1);
        assert!(t.try_send(Origin::Lan, ack(1)));
        assert!(!t.try_send(Origin::Lan, ack(2)));
    }

    #[test]
    fn an_old_guard_does_not_remove_a_newer_registration() {
        let t = RouteTable::default();
        let (old, _rx1) = t.register(Origin::Serial(3), 4);
        let (_new, mut rx2) = t.register(Origin::Serial(3), 4);
        drop(old);
        assert!(t.try_send(Origin::Serial(3), ack(7)));
        assert_eq!(rx2.try_recv().unwrap(), ack(7));
    }
}
