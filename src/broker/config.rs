//! `[broker]`: the embedded MQTT broker, its users and access rules.

use crate::allow::Devices;
use crate::units::{de_duration, de_size};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// The devices a logged-in user may publish readings for, unless its
    /// `[[broker.users]]` entry lists its own (`{user}` is the login, e.g.
    /// `"{user}-*"`); absent: any. Re-read on SIGHUP. See [`crate::allow`].
    pub devices: Option<Devices>,
    /// The devices anonymous clients may publish readings for; absent: any.
    pub anonymous_devices: Option<Devices>,
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
            devices: None,
            anonymous_devices: None,
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
    /// The devices this user may publish readings for (patterns, `*` = any
    /// run, `{user}` = the login); absent: `broker.devices`.
    #[serde(default)]
    pub devices: Option<Devices>,
}

impl BrokerConfig {
    /// Checks serde cannot express; returns the offending key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        use super::topic::TopicPattern;
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
            if let Some(Err(e)) = u.devices.as_ref().map(|d| d.check(true)) {
                return bad(&format!("users.{i}.devices"), e);
            }
        }
        for (k, d, user) in [("devices", &self.devices, true), ("anonymous_devices", &self.anonymous_devices, false)] {
            if let Some(Err(e)) = d.as_ref().map(|d| d.check(user)) {
                return bad(k, e);
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
