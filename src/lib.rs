//! edge-gateway: readings from wearables to the cloud, exactly once.
//!
//! The modules follow the path of a reading:
//!
//! * [`source`] — where readings come in, each source started by [`app`]
//!   with one [`source::SourceContext`]: [`source::serial`] (charging docks,
//!   BLE-UART dongles), [`source::ble`] (Bluetooth LE wearables and BTHome
//!   sensors through BlueZ) and [`source::lan`] (LAN devices publishing into
//!   the embedded MQTT broker, [`broker`]). Each parses its wire format
//!   ([`wire`], or the BLE decoders) into a [`reading::Incoming`] tagged with
//!   its [`reading::Origin`].
//! * [`rules`] — the operator's `[[rules]]` (filter, transform, route,
//!   lane, downsample, aggregate), run by the pipeline on each accepted
//!   reading; their outputs are as durable as the readings they come from.
//! * [`pipeline`] — [`pipeline::dedup`] drops what a device resent,
//!   [`pipeline::batch`] groups readings into [`reading::Batch`]es,
//!   [`pipeline::acks`] turns durable readings into cumulative acks, and
//!   [`pipeline::task`] is the thread that runs it and sends the acks back
//!   down each device's link through the [`route`] table.
//! * [`queue`] — the durable on-disk queue: append-only segments with
//!   length + CRC framing, group commit, an ack ledger, torn-tail repair.
//! * [`uplink`] — drains the queue to the upstream MQTT broker over TLS,
//!   QoS 2 with its in-flight state on disk, so a batch is delivered once
//!   across crashes and outages.
//! * [`downlink`] — the other way: commands from the cloud (received by the
//!   uplink, kept durably) delivered to a device over its link, with
//!   retries, expiry and replies that go up through the queue.
//!
//! Beside them: [`broker`] (the embedded MQTT broker and its front door),
//! [`allow`] (which device ids each source may speak for), [`busy`] (whether a loop is under load),
//! [`channel`] (channels of readings, bounded in items and in bytes),
//! [`config`] (the TOML file; each component above owns its section's
//! types in its own `config` module, with [`units`] for durations and
//! sizes), [`metrics`] (the counter table, `/metrics`, `/status` and the one
//! `GatewayStatus`, the exit summary), [`events`] (internal events that log
//! and count, each told in one place), [`service`] (systemd notify, watchdog, heartbeat, journald), [`app`]
//! (start order, shutdown and reload of every task), [`shutdown`] (the
//! signal every task listens to), [`fatal`] (errors after which only a
//! restart is honest, exited on in one place), [`perms`] (file modes of
//! the data dir and secrets), [`cli`] (the `edge-gateway` command),
//! [`demo`] (the demo, and [`demo::sim`], the simulated devices the demo,
//! tests and benches use), [`rng`] (a small seedable generator), and [`crashpoint`] (named places where a debug
//! build can be told to abort, one per durability window, so each window
//! has a deterministic test).

pub mod allow;
pub mod app;
pub mod broker;
pub mod busy;
pub mod channel;
pub mod cli;
pub mod config;
pub mod crashpoint;
pub mod demo;
pub mod downlink;
pub mod events;
pub mod fatal;
pub mod metrics;
pub mod perms;
pub mod pipeline;
pub mod queue;
pub mod reading;
pub mod rng;
pub mod route;
pub mod rules;
pub mod service;
pub mod shutdown;
pub mod source;
pub mod units;
pub mod uplink;
pub mod wire;

pub use reading::{Ack, Batch, Format, Incoming, Origin, Reading, Value};
