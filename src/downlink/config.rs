//! `[commands]`: commands from the cloud to the devices ([`crate::downlink`]).

use crate::units::de_duration;
use serde::Deserialize;
use std::time::Duration;

/// `[commands]`: present = the uplink subscribes to `topic` and the gateway
/// delivers what arrives there to the devices.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CommandsConfig {
    /// Where the cloud publishes commands (QoS 2, in the uplink's session).
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Where the replies go (through the queue, exactly once).
    #[serde(default = "default_reply_topic")]
    pub reply_topic: String,
    /// For a command without `ttl`.
    #[serde(default = "default_ttl", deserialize_with = "de_duration")]
    pub default_ttl: Duration,
    /// A command sent to its device and not answered is sent again after this.
    #[serde(default = "default_retry", deserialize_with = "de_duration")]
    pub retry_every: Duration,
    /// More commands waiting than this: new ones are rejected.
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        CommandsConfig {
            topic: default_topic(),
            reply_topic: default_reply_topic(),
            default_ttl: default_ttl(),
            retry_every: default_retry(),
            max_pending: default_max_pending(),
        }
    }
}

fn default_topic() -> String {
    "gateways/{gateway}/commands".into()
}
fn default_reply_topic() -> String {
    "gateways/{gateway}/commands/reply".into()
}
fn default_ttl() -> Duration {
    Duration::from_secs(600)
}
fn default_retry() -> Duration {
    Duration::from_secs(5)
}
fn default_max_pending() -> usize {
    1000
}

impl CommandsConfig {
    /// Checks serde cannot express; the offending key and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (key, t) in [("commands.topic", &self.topic), ("commands.reply_topic", &self.reply_topic)] {
            if t.is_empty() || t.contains(['+', '#', '\0']) {
                return Err((key.into(), "must be a topic name (no wildcards, not empty)".into()));
            }
        }
        if self.topic == self.reply_topic {
            return Err(("commands.reply_topic".into(), "must differ from commands.topic".into()));
        }
        if self.retry_every.is_zero() || self.default_ttl.is_zero() {
            let key = if self.retry_every.is_zero() { "commands.retry_every" } else { "commands.default_ttl" };
            return Err((key.into(), "must be more than 0".into()));
        }
        if self.max_pending == 0 {
            return Err(("commands.max_pending".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}
