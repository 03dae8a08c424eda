//! Configuration: one TOML file, parsed with serde into these types.
//!
//! Every struct denies unknown keys, and every error is reported as
//! `PATH:LINE:COL: key: message`, because the person reading it is editing a
//! file on a Raspberry Pi over SSH and needs to know exactly where to look.

use crate::reading::Format;
use serde::{Deserialize, Deserializer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewayConfig,
    #[serde(default)]
    pub serial: Vec<SerialConfig>,
    /// Bluetooth LE wearables and sensors, one entry per device.
    #[serde(default)]
    pub ble: Vec<BleConfig>,
    /// Settings shared by every `[[ble]]` device (adapter, scan watchdog).
    #[serde(default)]
    pub ble_scan: BleScanConfig,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    #[serde(default)]
    pub store: StoreConfig,
    /// Where batches go; without it they stay in the queue (store only).
    #[serde(default)]
    pub upstream: Option<UpstreamConfig>,
    /// The embedded MQTT broker for LAN devices and dashboards.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// Prometheus text at `/metrics` (read by `edge-gateway status`).
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics` at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Where to listen: loopback by default (the numbers name devices).
    #[serde(default = "default_metrics_listen")]
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { enabled: true, listen: default_metrics_listen() }
    }
}

fn yes() -> bool {
    true
}

pub fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9898))
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter: `info`, `debug`, `edge_gateway::uplink=debug,info`.
    /// `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: default_log_level() }
    }
}

fn default_log_level() -> String {
    "info".to_string()
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Identifies this gateway in every batch (`gateway` field) and topic.
    pub id: String,
    /// Where the queue and the dedup state live.
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Framing {
    #[default]
    Jsonl,
    Cobs,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Short name used in logs and metrics.
    pub name: String,
    /// Device path, e.g. `/dev/ttyACM0` or a stable `/dev/serial/by-id/...` link.
    pub path: PathBuf,
    #[serde(default = "default_baud")]
    pub baud: u32,
    #[serde(default)]
    pub framing: Framing,
    /// Device id for readings that do not name one.
    #[serde(default)]
    pub device: Option<String>,
}

fn default_baud() -> u32 {
    115_200
}

/// What a `[[ble]]` device speaks.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BleProfile {
    /// Heart Rate service 0x180D, notify 0x2A37.
    HeartRate,
    /// Health Thermometer service 0x1809, indicate 0x2A1C.
    HealthThermometer,
    /// Battery service 0x180F, read + notify 0x2A19.
    Battery,
    /// BTHome v2 advertisements (service data 0xFCD2); never connected.
    Bthome,
    /// Any service/characteristic carrying `jsonl` or `cobs` frames.
    Custom,
}

/// Which advertiser a `[[ble]]` entry is: every key given must match.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct BleMatch {
    pub name_prefix: Option<String>,
    /// `AA:BB:CC:DD:EE:FF`.
    pub address: Option<String>,
    /// An advertised service UUID (`"180d"` or the full 128-bit form).
    pub service: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BleConfig {
    /// Short name used in logs and metrics.
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: BleMatch,
    /// Device id of the readings (default: the BLE address).
    #[serde(default)]
    pub device: Option<String>,
    pub profile: BleProfile,
    /// BTHome: 32 hex digits, for encrypted adverts.
    #[serde(default)]
    pub bindkey: Option<String>,
    /// Custom profile: service and characteristic UUIDs, and the framing.
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub characteristic: Option<String>,
    #[serde(default)]
    pub framing: Option<Framing>,
    /// An `rssi` reading at most this often (default: none).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub rssi_interval: Option<Duration>,
    /// Connected devices: no notification for this long → reconnect.
    #[serde(default = "default_stale_after", deserialize_with = "de_duration")]
    pub stale_after: Duration,
}

fn default_stale_after() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BleScanConfig {
    /// BlueZ adapter, e.g. `hci0` (default: the first one).
    pub adapter: Option<String>,
    /// No advertisement for this long → restart discovery; as long again → power-cycle the adapter.
    #[serde(deserialize_with = "de_duration")]
    pub scan_stale_after: Duration,
    /// How often BlueZ and the adapter are checked to be there.
    #[serde(deserialize_with = "de_duration")]
    pub health_interval: Duration,
}

impl Default for BleScanConfig {
    fn default() -> Self {
        BleScanConfig {
            adapter: None,
            scan_stale_after: Duration::from_secs(60),
            health_interval: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    #[serde(deserialize_with = "de_duration")]
    pub dedup_window: Duration,
    /// Most `(sensor, seq)` keys remembered per device; the oldest go first.
    pub dedup_max_per_device: usize,
    pub batch_max_readings: usize,
    #[serde(deserialize_with = "de_size")]
    pub batch_max_bytes: u64,
    #[serde(deserialize_with = "de_duration")]
    pub batch_max_age: Duration,
    pub format: Format,
    /// How long a gap in a device's seq may hold back its cumulative ack
    /// before the gateway assumes the missing readings never existed.
    #[serde(deserialize_with = "de_duration")]
    pub ack_gap_timeout: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            dedup_window: Duration::from_secs(600),
            dedup_max_per_device: 16_384,
            batch_max_readings: 1000,
            batch_max_bytes: 256 * 1024,
            batch_max_age: Duration::from_millis(200),
            format: Format::Json,
            ack_gap_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    #[default]
    DropOldest,
    RejectNew,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    Always,
    #[default]
    Interval,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    #[serde(deserialize_with = "de_size")]
    pub max_bytes: u64,
    pub when_full: WhenFull,
    pub fsync: FsyncPolicy,
    #[serde(deserialize_with = "de_duration")]
    pub fsync_interval: Duration,
    /// Size of one segment file; whole segments are deleted once consumed.
    #[serde(deserialize_with = "de_size")]
    pub segment_bytes: u64,
    /// How much of the queue start-up checks (see [`OpenCheck`]).
    pub open_check: OpenCheck,
}

/// What the queue checks at start-up.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OpenCheck {
    /// CRC-check every record of every segment, repairing what is corrupt:
    /// seconds per GiB (25-50 s on an SD card) before the first reading.
    Full,
    /// Trust the index of sealed segments (start-up in milliseconds even with
    /// a GiB backlog); corruption there is found when the record is read,
    /// and skipped and counted then. The last segment, the only one a power
    /// cut can tear, is always scanned. The default since the service issue:
    /// a rotten record is lost either way, and a gateway that comes back
    /// from a power cut should take readings at once, not after a scan.
    #[default]
    Index,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_bytes: 1 << 30,
            when_full: WhenFull::DropOldest,
            fsync: FsyncPolicy::Interval,
            fsync_interval: Duration::from_millis(100),
            segment_bytes: 8 << 20,
            open_check: OpenCheck::Index,
        }
    }
}

/// `[upstream]`: the MQTT broker the uplink drains the queue to.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `mqtts://host[:port]` (8883 by default), or `mqtt://host[:port]`
    /// (1883) with `allow_plaintext = true`.
    pub url: String,
    #[serde(default)]
    pub allow_plaintext: bool,
    /// Default `edge-gateway-{gateway id}`. Must stay the same across
    /// restarts: the broker keeps the QoS 2 session under it.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default = "default_topic")]
    pub topic: String,
    #[serde(default = "default_status_topic")]
    pub status_topic: String,
    #[serde(default = "default_qos")]
    pub qos: u8,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub username: Option<String>,
    /// A file holding the password (trailing newline ignored); never the
    /// password itself, so configs can be shared and logged.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default = "default_keep_alive", deserialize_with = "de_duration")]
    pub keep_alive: Duration,
    /// Batches published and not yet completed, at most (the broker's
    /// Receive Maximum lowers it further).
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    #[serde(default = "default_reconnect_min", deserialize_with = "de_duration")]
    pub reconnect_min: Duration,
    #[serde(default = "default_reconnect_max", deserialize_with = "de_duration")]
    pub reconnect_max: Duration,
    #[serde(default)]
    pub protocol: MqttProtocol,
    /// TCP connect + TLS handshake + CONNACK, at most.
    #[serde(default = "default_connect_timeout", deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// Attempts before a batch the broker refuses with a permanent reason
    /// code (0x87 not authorized, 0x90, 0x95, 0x99, ...) goes to the
    /// dead-letter store (`edge-gateway queue dead list`).
    #[serde(default = "default_dead_letter_after")]
    pub dead_letter_after: u32,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
pub enum MqttProtocol {
    /// MQTT 5, falling back to 3.1.1 when the broker refuses version 5.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    #[serde(rename = "5")]
    V5,
    #[serde(rename = "3.1.1")]
    V311,
}

fn default_topic() -> String {
    "gateways/{gateway}/readings".into()
}
fn default_status_topic() -> String {
    "gateways/{gateway}/status".into()
}
fn default_qos() -> u8 {
    2
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_max_inflight() -> u16 {
    20
}
fn default_reconnect_min() -> Duration {
    Duration::from_millis(500)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}
fn default_dead_letter_after() -> u32 {
    5
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Scheme, host and port of an upstream URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl BrokerUrl {
    pub fn parse(url: &str) -> Result<BrokerUrl, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else {
            return Err(format!("{url:?} must start with mqtts:// (or mqtt:// with allow_plaintext = true)"));
        };
        let rest = rest.trim_end_matches('/');
        let default_port = if tls { 8883 } else { 1883 };
        let port_of = |p: &str| p.parse::<u16>().map_err(|_| format!("bad port {p:?} in {url:?}"));
        // `[v6 address]:port`, `host:port`, or either without the port.
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, tail) = v6.split_once(']').ok_or_else(|| format!("unclosed '[' in {url:?}"))?;
            match tail.strip_prefix(':') {
                Some(p) => (h, port_of(p)?),
                None if tail.is_empty() => (h, default_port),
                None => return Err(format!("bad host in {url:?}")),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, port_of(p)?),
                None => (rest, default_port),
            }
        };
        if host.is_empty() || host.contains('/') || host.contains('@') {
            return Err(format!("bad host in {url:?}; use mqtts://host:port"));
        }
        Ok(BrokerUrl { tls, host: host.to_string(), port })
    }
}

impl UpstreamConfig {
    pub fn client_id_for(&self, gateway: &str) -> String {
        self.client_id.clone().unwrap_or_else(|| format!("edge-gateway-{gateway}"))
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((format!("upstream.{k}"), m));
        match BrokerUrl::parse(&self.url) {
            Err(m) => return bad("url", m),
            Ok(u) if !u.tls && !self.allow_plaintext => {
                return bad(
                    "url",
                    "mqtt:// sends readings and credentials in plaintext; use mqtts://, or set allow_plaintext = true"
                        .into(),
                );
            }
            Ok(_) => {}
        }
        if !(1..=2).contains(&self.qos) {
            return bad("qos", format!("must be 1 or 2 (got {})", self.qos));
        }
        if self.dead_letter_after == 0 || self.dead_letter_after > 1000 {
            return bad("dead_letter_after", "must be 1..=1000 attempts".into());
        }
        if self.max_inflight == 0 || self.max_inflight > 1000 {
            return bad("max_inflight", "must be 1..=1000".into());
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            let k = if self.cert_file.is_some() { "key_file" } else { "cert_file" };
            return bad(k, "cert_file and key_file go together (mutual TLS)".into());
        }
        if self.reconnect_min.is_zero() || self.reconnect_max < self.reconnect_min {
            return bad("reconnect_max", "need 0 < reconnect_min <= reconnect_max".into());
        }
        if self.keep_alive.as_secs() > u16::MAX as u64 {
            return bad("keep_alive", "must be at most 65535 s".into());
        }
        for (k, t) in [("topic", &self.topic), ("status_topic", &self.status_topic)] {
            if t.is_empty() || t.contains(['+', '#']) {
                return bad(k, format!("{t:?} must be a topic name without wildcards"));
            }
        }
        if self.client_id.as_deref().is_some_and(|c| c.is_empty() || c.len() > 128) {
            return bad("client_id", "must be 1-128 characters".into());
        }
        Ok(())
    }
}

/// `[broker]`: the embedded MQTT broker (see [`crate::broker`]).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    pub enabled: bool,
    /// Plain MQTT listener, e.g. `"0.0.0.0:1883"`.
    pub tcp: Option<SocketAddr>,
    /// MQTT over TLS listener, e.g. `"0.0.0.0:8883"`; needs `tls_cert` and `tls_key` (PEM).
    pub tls: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// MQTT over WebSocket listener, e.g. `"0.0.0.0:8083"`.
    pub websocket: Option<SocketAddr>,
    /// Connected MQTT clients, all listeners together; more are refused with CONNACK "server unavailable".
    pub max_connections: usize,
    /// Largest PUBLISH payload; a client sending a bigger packet is disconnected.
    #[serde(deserialize_with = "de_size")]
    pub max_payload: u64,
    /// Clients without a username may connect (and publish anywhere).
    pub allow_anonymous: bool,
    pub users: Vec<BrokerUser>,
    /// Lines of `user:PHC-hash` (e.g. from `edge-gateway hash-password`); `#` starts a comment.
    pub password_file: Option<PathBuf>,
    /// Topic LAN devices publish readings to; `{device}` and `{sensor}` are whole levels.
    pub ingest: String,
    /// Topic every accepted reading is republished to (retained); empty disables it.
    pub republish: String,
    /// Retained gateway status topic, refreshed every `status_interval`; empty disables it.
    /// A `$` topic (the default) is not matched by `#` or `+/…` subscriptions (MQTT §4.7.2).
    pub status_topic: String,
    #[serde(deserialize_with = "de_duration")]
    pub status_interval: Duration,
    /// A client must finish its TLS/WebSocket handshake and send CONNECT within this.
    #[serde(deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// When a LAN device's QoS 1/2 reading is acknowledged (PUBACK / PUBCOMP).
    pub ack: BrokerAck,
    /// Connections in their handshake (before CONNACK) from one address
    /// (IPv4, or IPv6 /64); more from it are closed at once. See docs/security.md.
    pub max_handshakes_per_address: usize,
    /// Connected clients per user (anonymous clients count as one user); absent: only `max_connections`.
    pub max_connections_per_user: Option<usize>,
    /// Distinct device ids one LAN user (anonymous clients together) may publish readings for.
    pub max_devices_per_user: usize,
    /// Browser origins allowed to open the WebSocket listener (`Origin` header,
    /// e.g. `"https://dashboard.example"`); empty: any. Non-browser clients send none and are let in.
    pub websocket_origins: Vec<String>,
    /// Access control rules, first match wins (see [`crate::broker::acl`]);
    /// with any rule here, what no rule allows is denied. Re-read on SIGHUP.
    pub acl: Vec<AclRule>,
    /// What a PUBLISH the ACL denies costs the client. Re-read on SIGHUP.
    pub denied_publish: DeniedPublish,
}

/// `[[broker.acl]]`: one access rule.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// The user name it is for (`*` matches any run of characters); absent: every client, anonymous too.
    #[serde(default)]
    pub user: Option<String>,
    /// The client id it is for (`*` as in `user`); absent: any.
    #[serde(default)]
    pub client_id: Option<String>,
    /// An MQTT topic filter; `%u` and `%c` stand for the client's user name and client id.
    pub topic: String,
    pub access: AclAccess,
    pub permission: AclPermission,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AclAccess {
    Publish,
    Subscribe,
    Readwrite,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AclPermission {
    Allow,
    Deny,
}

/// `broker.denied_publish`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeniedPublish {
    /// Drop the message (counted, logged): MQTT 5 clients get PUBACK/PUBREC
    /// 0x87 "not authorized", MQTT 3.1.1 clients a plain ack (as Mosquitto).
    #[default]
    Drop,
    /// Close the connection (MQTT 3.1.1 §3.3.5 allows it).
    Disconnect,
}

/// `broker.ack`: when LAN devices get their PUBACK (QoS 1) or PUBCOMP (QoS 2).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BrokerAck {
    /// As soon as the broker has the message in memory (fast; see docs/lan-mqtt.md for the window).
    #[default]
    Received,
    /// Once the reading is fsynced in the queue (readings with a `seq`), like serial acks.
    Durable,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            enabled: false,
            tcp: None,
            tls: None,
            tls_cert: None,
            tls_key: None,
            websocket: None,
            max_connections: 256,
            max_payload: 256 * 1024,
            allow_anonymous: false,
            users: Vec::new(),
            password_file: None,
            ingest: "sensors/{device}/{sensor}".into(),
            republish: "readings/{device}/{sensor}".into(),
            status_topic: "$SYS/edge-gateway/status".into(),
            status_interval: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            ack: BrokerAck::Received,
            max_handshakes_per_address: 32,
            max_connections_per_user: None,
            max_devices_per_user: 1024,
            websocket_origins: Vec::new(),
            acl: Vec::new(),
            denied_publish: DeniedPublish::Drop,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BrokerUser {
    pub name: String,
    /// A PHC string, e.g. `$argon2id$v=19$m=19456,t=2,p=1$...` (`edge-gateway hash-password`).
    pub password_hash: String,
    /// Topic prefixes this user may publish under; absent means anywhere.
    #[serde(default)]
    pub publish: Option<Vec<String>>,
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("bad duration {s:?} ({e}); use e.g. \"200ms\", \"10m\"")))
}

/// Sizes: an integer number of bytes, or a string like `"64MiB"`, `"512KiB"`, `"1GB"`.
fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }
    match Raw::deserialize(d)? {
        Raw::N(n) => Ok(n),
        Raw::S(s) => parse_size(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("bad size {s:?}; use bytes or e.g. \"64MiB\", \"512KiB\", \"1GB\""))
        }),
    }
}

pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// A configuration error located in its file: renders as
/// `PATH:LINE:COL: key `a.b`: message`.
#[derive(Debug, thiserror::Error)]
#[error("{path}:{line}:{col}: {}{message}", key.as_deref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
pub struct ConfigError {
    pub path: String,
    pub line: usize,
    pub col: usize,
    pub key: Option<String>,
    pub message: String,
}

impl Config {
    /// Read and validate a config file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: shown.clone(),
            line: 0,
            col: 0,
            key: None,
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&src, &shown)
    }

    /// Parse and validate TOML text; `path` is only used in error messages.
    pub fn parse(src: &str, path: &str) -> Result<Config, ConfigError> {
        let at = |span: Option<std::ops::Range<usize>>, key: Option<String>, message: String| {
            let (line, col) = span.map(|s| line_col(src, s.start)).unwrap_or((1, 1));
            ConfigError { path: path.to_string(), line, col, key, message }
        };
        let de = toml::de::Deserializer::parse(src).map_err(|e| at(e.span(), None, e.message().trim().to_string()))?;
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = dotted(e.path());
            let inner = e.into_inner();
            // Prefer the span of the key we can name; fall back to toml's own.
            let span = inner.span().or_else(|| key_span(src, &key));
            let key = if key.is_empty() || key == "?" { None } else { Some(key) };
            at(span, key, inner.message().trim().to_string())
        })?;
        if let Err((key, message)) = cfg.validate() {
            // Point at the key when it is written; else at its section.
            let section = key.rsplit_once('.').map(|(s, _)| s).unwrap_or("");
            let span = key_span(src, &key).or_else(|| key_span(src, section));
            return Err(at(span, Some(key), message));
        }
        Ok(cfg)
    }

    /// Checks serde cannot express; returns the offending key.
    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: &str| Err((k.to_string(), m.to_string()));
        if !valid_id(&self.gateway.id) {
            return bad("gateway.id", "must be 1-64 characters of letters, digits, '-', '_' or '.'");
        }
        let p = &self.pipeline;
        if p.batch_max_readings == 0 {
            return bad("pipeline.batch_max_readings", "must be at least 1");
        }
        if p.batch_max_bytes < 64 {
            return bad("pipeline.batch_max_bytes", "must be at least 64 bytes");
        }
        if p.batch_max_age.is_zero() {
            return bad("pipeline.batch_max_age", "must be greater than 0");
        }
        if p.dedup_max_per_device == 0 {
            return bad("pipeline.dedup_max_per_device", "must be at least 1");
        }
        let s = &self.store;
        if s.max_bytes < 4096 {
            return bad("store.max_bytes", "must be at least 4096 bytes");
        }
        if s.fsync == FsyncPolicy::Interval && s.fsync_interval.is_zero() {
            return bad("store.fsync_interval", "must be greater than 0 (or use fsync = \"always\")");
        }
        if p.batch_max_bytes > s.max_bytes / 2 {
            return Err((
                "pipeline.batch_max_bytes".into(),
                format!(
                    "{} is more than half of store.max_bytes ({}): lower it, or raise store.max_bytes",
                    p.batch_max_bytes, s.max_bytes
                ),
            ));
        }
        if let Some(u) = &self.upstream {
            u.validate()?;
        }
        for (i, port) in self.serial.iter().enumerate() {
            if port.name.is_empty() || self.serial[..i].iter().any(|o| o.name == port.name) {
                return Err((
                    format!("serial.{i}.name"),
                    format!("must be non-empty and unique (got {:?})", port.name),
                ));
            }
            if port.device.as_deref().is_some_and(|d| !valid_id(d)) {
                return Err((
                    format!("serial.{i}.device"),
                    "must be 1-64 characters of letters, digits, '-', '_' or '.'".into(),
                ));
            }
        }
        self.broker.validate()?;
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return bad("log.level", "is not a log filter (try \"info\", \"debug\" or \"edge_gateway=debug,info\")");
        }
        self.validate_ble()
    }

    fn validate_ble(&self) -> Result<(), (String, String)> {
        use crate::source::ble::{parse_address, parse_uuid};
        let bad = |k: String, m: &str| Err((k, m.to_string()));
        for (i, b) in self.ble.iter().enumerate() {
            let k = |key: &str| format!("ble.{i}.{key}");
            if b.name.is_empty() || self.ble[..i].iter().any(|o| o.name == b.name) {
                return Err((k("name"), format!("must be non-empty and unique (got {:?})", b.name)));
            }
            let m = &b.matcher;
            if m.name_prefix.is_none() && m.address.is_none() && m.service.is_none() {
                return bad(k("match"), "needs at least one of name_prefix, address, service");
            }
            if m.address.as_deref().is_some_and(|a| parse_address(a).is_none()) {
                return bad(k("match.address"), "must be a BLE address like \"AA:BB:CC:DD:EE:FF\"");
            }
            if m.service.as_deref().is_some_and(|u| parse_uuid(u).is_none()) {
                return bad(k("match.service"), "must be a UUID: \"180d\" or \"0000180d-0000-1000-8000-00805f9b34fb\"");
            }
            if b.device.as_deref().is_some_and(|d| !valid_id(d)) {
                return bad(k("device"), "must be 1-64 characters of letters, digits, '-', '_' or '.'");
            }
            let custom = b.profile == BleProfile::Custom;
            for (key, v) in [("service", &b.service), ("characteristic", &b.characteristic)] {
                match v {
                    None if custom => return bad(k(key), "is required by profile \"custom\""),
                    Some(_) if !custom => return bad(k(key), "is only for profile \"custom\""),
                    Some(u) if parse_uuid(u).is_none() => return bad(k(key), "must be a UUID"),
                    _ => {}
                }
            }
            if b.framing.is_some() && !custom {
                return bad(k("framing"), "is only for profile \"custom\"");
            }
            match (&b.bindkey, b.profile) {
                (Some(_), p) if p != BleProfile::Bthome => return bad(k("bindkey"), "is only for profile \"bthome\""),
                (Some(key), _) if crate::source::ble::bthome::parse_bindkey(key).is_none() => {
                    return bad(k("bindkey"), "must be 32 hex digits (16 bytes)");
                }
                _ => {}
            }
            if b.stale_after.is_zero() {
                return bad(k("stale_after"), "must be greater than 0");
            }
            if b.rssi_interval.is_some_and(|d| d.is_zero()) {
                return bad(k("rssi_interval"), "must be greater than 0 (leave it out for no rssi readings)");
            }
        }
        if self.ble_scan.scan_stale_after.is_zero() || self.ble_scan.health_interval.is_zero() {
            return bad("ble_scan".into(), "durations must be greater than 0");
        }
        Ok(())
    }
}

impl BrokerConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        use crate::broker::topic::TopicPattern;
        let bad = |k: &str, m: String| Err((format!("broker.{k}"), m));
        if self.max_connections == 0 {
            return bad("max_connections", "must be at least 1".into());
        }
        // rumqttd keeps messages in 512 KiB in-memory segments (see crate::broker).
        if self.max_payload < 128 || self.max_payload > 512 << 10 {
            return bad("max_payload", "must be between 128 bytes and 512KiB".into());
        }
        if self.status_interval.is_zero() {
            return bad("status_interval", "must be greater than 0".into());
        }
        if self.connect_timeout.is_zero() {
            return bad("connect_timeout", "must be greater than 0".into());
        }
        if self.max_handshakes_per_address == 0 {
            return bad("max_handshakes_per_address", "must be at least 1".into());
        }
        if self.max_connections_per_user == Some(0) {
            return bad("max_connections_per_user", "must be at least 1 (leave it out for no per-user cap)".into());
        }
        if self.max_devices_per_user == 0 {
            return bad("max_devices_per_user", "must be at least 1".into());
        }
        let ingest = match TopicPattern::parse(&self.ingest) {
            Ok(p) => p,
            Err(e) => return bad("ingest", e),
        };
        if !self.republish.is_empty() {
            let republish = match TopicPattern::parse(&self.republish) {
                Ok(p) => p,
                Err(e) => return bad("republish", e),
            };
            if ingest.overlaps(&republish) {
                return bad(
                    "republish",
                    format!(
                        "{:?} overlaps ingest {:?}: republished readings would be ingested again",
                        self.republish, self.ingest
                    ),
                );
            }
        }
        if !self.status_topic.is_empty() {
            if !crate::broker::topic::valid_topic(&self.status_topic) {
                return bad("status_topic", "must be a topic name without wildcards".into());
            }
            if ingest.matches(&self.status_topic).is_some() {
                return bad("status_topic", format!("matches ingest {:?}", self.ingest));
            }
        }
        if self.tls.is_some() && (self.tls_cert.is_none() || self.tls_key.is_none()) {
            return bad("tls", "needs tls_cert and tls_key (PEM files)".into());
        }
        for (i, u) in self.users.iter().enumerate() {
            if u.name.is_empty() || self.users[..i].iter().any(|o| o.name == u.name) {
                return bad(&format!("users.{i}.name"), format!("must be non-empty and unique (got {:?})", u.name));
            }
            if let Err(e) = crate::broker::auth::check_hash(&u.password_hash) {
                return bad(&format!("users.{i}.password_hash"), e);
            }
        }
        for (i, r) in self.acl.iter().enumerate() {
            if let Err(e) = crate::broker::acl::check_filter(&r.topic) {
                return bad(&format!("acl.{i}.topic"), format!("{e} (an MQTT topic filter, e.g. \"ward-3/#\")"));
            }
            for (k, v) in [("user", &r.user), ("client_id", &r.client_id)] {
                if v.as_deref().is_some_and(str::is_empty) {
                    return bad(
                        &format!("acl.{i}.{k}"),
                        "must not be empty (leave it out to match every client)".into(),
                    );
                }
            }
        }
        if self.enabled {
            if self.tcp.is_none() && self.tls.is_none() && self.websocket.is_none() {
                return bad("enabled", "the broker needs at least one of tcp, tls, websocket".into());
            }
            if self.users.is_empty() && self.password_file.is_none() && !self.allow_anonymous {
                return bad(
                    "enabled",
                    "no client could log in: add [[broker.users]] or password_file, or set allow_anonymous = true"
                        .into(),
                );
            }
        }
        Ok(())
    }
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// `serial[1].baud` as `serial.1.baud`, matching [`key_span`]'s input.
fn dotted(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|seg| match seg {
            Segment::Seq { index } => Some(index.to_string()),
            Segment::Map { key } => Some(key.clone()),
            Segment::Enum { variant } => Some(variant.clone()),
            Segment::Unknown => None,
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Where `a.b.0.c` is written in the file: the span of its key (or of the
/// table when the key itself is missing).
fn key_span(src: &str, dotted: &str) -> Option<std::ops::Range<usize>> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(src).ok()?;
    let mut span = None;
    let mut table: Option<&DeTable> = Some(root.get_ref());
    let mut value: Option<&toml::Spanned<DeValue>> = None;
    for part in dotted.split('.').filter(|p| !p.is_empty()) {
        if let Some(t) = table.take() {
            let (k, v) = t.get_key_value(part)?;
            span = Some(k.span());
            value = Some(v);
        } else if let (Some(v), Ok(i)) = (value, part.parse::<usize>()) {
            let item = v.get_ref().as_array()?.get(i)?;
            span = Some(item.span());
            value = Some(item);
        } else {
            break;
        }
        table = value.and_then(|v| v.get_ref().as_table());
    }
    span
}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map(|i| before.len() - i).unwrap_or(before.len() + 1);
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[gateway]
id = "gw-1"
data_dir = "/tmp/x"

[[serial]]
name = "dock1"
path = "/dev/ttyACM0"

[[serial]]
name = "dock2"
path = "/dev/ttyACM1"
framing = "cobs"
baud = 9600

[pipeline]
dedup_window = "10m"
batch_max_bytes = "64KiB"
batch_max_age = "200ms"
format = "postcard"

[store]
max_bytes = "64MiB"
when_full = "reject_new"
fsync = "interval"
fsync_interval = "100ms"
"#;

    fn err(src: &str) -> String {
        Config::parse(src, "gw.toml").unwrap_err().to_string()
    }

    #[test]
    fn good_config_parses_with_units() {
        let c = Config::parse(GOOD, "gw.toml").unwrap();
        assert_eq!(c.serial[1].framing, Framing::Cobs);
        assert_eq!(c.serial[0].baud, 115_200);
        assert_eq!(c.pipeline.batch_max_bytes, 64 * 1024);
        assert_eq!(c.pipeline.dedup_window, Duration::from_secs(600));
        assert_eq!(c.store.max_bytes, 64 << 20);
        assert_eq!(c.store.when_full, WhenFull::RejectNew);
        assert_eq!(c.pipeline.format, Format::Postcard);
    }

    #[test]
    fn unknown_key_names_file_line_col_and_key() {
        let e = err(&GOOD.replace("baud = 9600", "baud = 9600\nparity = \"even\""));
        assert!(e.starts_with("gw.toml:15:1: "), "{e}");
        assert!(e.contains("parity"), "{e}");
    }

    #[test]
    fn wrong_type_points_at_the_value() {
        let e = err(&GOOD.replace("baud = 9600", "baud = \"fast\""));
        assert!(e.starts_with("gw.toml:14:8: key `serial.1.baud`"), "{e}");
    }

    #[test]
    fn bad_duration_and_size_are_explained() {
        let e = err(&GOOD.replace("\"200ms\"", "\"soon\""));
        assert!(e.starts_with("gw.toml:19:17: key `pipeline.batch_max_age`"), "{e}");
        assert!(e.contains("bad duration"), "{e}");
        let e = err(&GOOD.replace("\"64MiB\"", "\"lots\""));
        assert!(e.contains("store.max_bytes") && e.contains("bad size"), "{e}");
    }

    #[test]
    fn semantic_errors_point_at_the_key() {
        let e = err(&GOOD.replace("name = \"dock2\"", "name = \"dock1\""));
        assert!(e.starts_with("gw.toml:11:1: key `serial.1.name`"), "{e}");
        let e = err(&GOOD.replace("[pipeline]", "[pipeline]\nbatch_max_readings = 0"));
        assert!(e.contains(":17:1: key `pipeline.batch_max_readings`"), "{e}");
    }

    #[test]
    fn upstream_defaults_and_checks() {
        let up = |extra: &str| format!("{GOOD}\n[upstream]\nurl = \"mqtts://cloud.example:8884\"\n{extra}");
        let c = Config::parse(&up(""), "gw.toml").unwrap();
        let u = c.upstream.unwrap();
        assert_eq!((u.qos, u.max_inflight, u.protocol), (2, 20, MqttProtocol::Auto));
        assert_eq!(u.client_id_for("gw1"), "edge-gateway-gw1");
        assert_eq!(
            BrokerUrl::parse(&u.url).unwrap(),
            BrokerUrl { tls: true, host: "cloud.example".into(), port: 8884 }
        );
        assert_eq!(BrokerUrl::parse("mqtt://[::1]").unwrap().port, 1883);
        // Plaintext only by explicit opt-in, and the error names the key.
        let plain = up("").replace("mqtts://", "mqtt://");
        let e = err(&plain);
        assert!(e.contains(": key `upstream.url`: ") && e.contains("allow_plaintext"), "{e}");
        assert!(Config::parse(&format!("{plain}allow_plaintext = true\n"), "gw.toml").is_ok());
        assert!(err(&up("qos = 0")).contains("key `upstream.qos`"));
        assert!(err(&up("protocol = \"4\"")).contains("key `upstream.protocol`"));
        assert!(err(&up("cert_file = \"c.pem\"")).contains("key `upstream.key_file`"));
        assert!(err(&up("topic = \"a/#\"")).contains("key `upstream.topic`"));
        assert!(err(&up("password = \"hunter2\"")).contains("unknown field `password`"));
    }

    #[test]
    fn syntax_errors_and_missing_sections() {
        let e = err("[gateway\nid = 1");
        assert!(e.starts_with("gw.toml:1:"), "{e}");
        let e = err("[store]\nmax_bytes = 100000\n");
        assert!(e.contains("gateway"), "{e}");
    }

    #[test]
    fn broker_errors_name_the_key() {
        let base = format!("{GOOD}\n[broker]\nenabled = true\ntcp = \"127.0.0.1:1883\"\nallow_anonymous = true\n");
        assert!(Config::parse(&base, "gw.toml").is_ok());
        let e = err(&base.replace("allow_anonymous = true", "allow_anonymous = false"));
        assert!(e.contains("key `broker.enabled`") && e.contains("no client could log in"), "{e}");
        let e = err(&format!("{base}max_payload = \"2MiB\"\n"));
        assert!(e.contains("key `broker.max_payload`"), "{e}");
        let e = err(&format!("{base}republish = \"sensors/{{sensor}}/{{device}}\"\n"));
        assert!(e.contains("key `broker.republish`") && e.contains("overlaps"), "{e}");
        let e = err(&format!("{base}ingest = \"sensors/+/+\"\n"));
        assert!(e.contains("key `broker.ingest`"), "{e}");
        let e = err(&format!("{base}[[broker.users]]\nname = \"a\"\npassword_hash = \"secret\"\n"));
        assert!(e.contains("key `broker.users.0.password_hash`") && e.contains("PHC"), "{e}");
        let e = err(&format!("{base}tls = \"0.0.0.0:8883\"\n"));
        assert!(e.contains("key `broker.tls`") && e.contains("tls_cert"), "{e}");
        let e = err(&base.replace("tcp = ", "tpc = "));
        assert!(e.contains("tpc"), "unknown keys are errors: {e}");
    }

    #[test]
    fn acl_rules_parse_and_errors_name_the_key() {
        let base = format!("{GOOD}\n[broker]\nenabled = true\ntcp = \"127.0.0.1:1883\"\nallow_anonymous = true\n");
        let rule = |body: &str| {
            format!(
                "{base}\n[[broker.acl]]\ntopic = \"a/#\"\naccess = \"subscribe\"\npermission = \"allow\"\n\n[[broker.acl]]\n{body}\n"
            )
        };
        let c = Config::parse(
            &rule("user = \"nurse-*\"\ntopic = \"ward/%u/#\"\naccess = \"readwrite\"\npermission = \"deny\""),
            "gw.toml",
        )
        .unwrap();
        assert_eq!(c.broker.acl.len(), 2);
        assert_eq!((c.broker.acl[1].access, c.broker.acl[1].permission), (AclAccess::Readwrite, AclPermission::Deny));
        assert_eq!(c.broker.denied_publish, DeniedPublish::Drop);
        let e = err(&rule("topic = \"a/#/b\"\naccess = \"publish\"\npermission = \"deny\""));
        assert!(e.contains(":39:1: key `broker.acl.1.topic`") && e.contains("'#' must be"), "{e}");
        let e = err(&rule("topic = \"a\"\naccess = \"write\"\npermission = \"deny\""));
        assert!(e.contains("key `broker.acl.1.access`") && e.contains("unknown variant"), "{e}");
        let e = err(&rule("topic = \"a\"\naccess = \"publish\"\npermission = \"maybe\""));
        assert!(e.starts_with("gw.toml:41:14: key `broker.acl.1.permission`"), "{e}");
        let e = err(&rule("client_id = \"\"\ntopic = \"a\"\naccess = \"publish\"\npermission = \"deny\""));
        assert!(e.contains("key `broker.acl.1.client_id`"), "{e}");
        let e = err(&rule("topic = \"a\"\naccess = \"publish\""));
        assert!(e.contains("permission"), "{e}");
        let e = err(&format!("{base}denied_publish = \"kick\"\n"));
        assert!(e.contains("key `broker.denied_publish`"), "{e}");
    }

    const BLE: &str = r#"
[gateway]
id = "gw-1"
data_dir = "/tmp/x"

[[ble]]
name = "strap"
match = { name_prefix = "Polar H10" }
profile = "heart_rate"

[[ble]]
name = "env"
match = { address = "A4:C1:38:00:11:22" }
profile = "bthome"
bindkey = "231d39c1d7cc1ab1aee224cd096db932"
rssi_interval = "30s"

[[ble]]
name = "band"
match = { service = "6e400001-b5a3-f393-e0a9-e50e24dcca9e" }
device = "band-7"
profile = "custom"
service = "6e400001-b5a3-f393-e0a9-e50e24dcca9e"
characteristic = "6e400003-b5a3-f393-e0a9-e50e24dcca9e"
framing = "cobs"
stale_after = "5s"
"#;

    #[test]
    fn ble_entries_parse_with_defaults() {
        let c = Config::parse(BLE, "gw.toml").unwrap();
        assert_eq!(c.ble.len(), 3);
        assert_eq!(c.ble[0].profile, BleProfile::HeartRate);
        assert_eq!(c.ble[0].stale_after, Duration::from_secs(30));
        assert_eq!(c.ble[0].rssi_interval, None);
        assert_eq!(c.ble[1].rssi_interval, Some(Duration::from_secs(30)));
        assert_eq!(c.ble[2].framing, Some(Framing::Cobs));
        assert_eq!(c.ble_scan, BleScanConfig::default());
    }

    #[test]
    fn ble_errors_name_the_key() {
        let e = err(&BLE.replace("profile = \"heart_rate\"", "profile = \"heart_rate\"\ncolour = 1"));
        assert!(e.starts_with("gw.toml:10:1: ") && e.contains("colour"), "{e}");
        let e = err(&BLE.replace("A4:C1:38:00:11:22", "A4:C1:38"));
        assert!(e.starts_with("gw.toml:13:11: key `ble.1.match.address`"), "{e}");
        let e = err(&BLE.replace("231d39c1d7cc1ab1aee224cd096db932", "abc"));
        assert!(e.starts_with("gw.toml:15:1: key `ble.1.bindkey`"), "{e}");
        let e = err(&BLE.replace("characteristic = \"6e400003-b5a3-f393-e0a9-e50e24dcca9e\"\n", ""));
        assert!(e.contains("key `ble.2.characteristic`") && e.contains("required"), "{e}");
        let e = err(&BLE.replace("match = { name_prefix = \"Polar H10\" }", "match = {}"));
        assert!(e.starts_with("gw.toml:8:1: key `ble.0.match`"), "{e}");
        let e = err(&BLE.replace("profile = \"heart_rate\"", "profile = \"ecg\""));
        assert!(e.contains("key `ble.0.profile`"), "{e}");
        let e = err(&BLE.replace("name = \"env\"", "name = \"strap\""));
        assert!(e.contains("key `ble.1.name`"), "{e}");
        let e = err(&BLE.replace("stale_after = \"5s\"", "stale_after = \"0s\""));
        assert!(e.starts_with("gw.toml:26:1: key `ble.2.stale_after`"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("10 KB"), Some(10_000));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("1.5MiB"), None);
        assert_eq!(parse_size("99999999999999GiB"), None);
    }
}
