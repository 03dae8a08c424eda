//! `[upstream]`: the MQTT broker the uplink drains the queue to.

use crate::units::de_duration;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

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

pub fn default_topic() -> String {
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

    /// Checks serde cannot express; returns the offending key.
    pub fn validate(&self) -> Result<(), (String, String)> {
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
