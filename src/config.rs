//! Configuration: one TOML file, parsed with serde into these types.
//!
//! Every struct denies unknown keys, and every error is reported as
//! `PATH:LINE:COL: key: message`, because the person reading it is editing a
//! file on a Raspberry Pi over SSH and needs to know exactly where to look.

use crate::reading::Format;
use serde::{Deserialize, Deserializer};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewayConfig,
    #[serde(default)]
    pub serial: Vec<SerialConfig>,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    #[serde(default)]
    pub store: StoreConfig,
    /// Accepted now so configs stay stable; the uplink issue gives it meaning.
    #[serde(default)]
    pub upstream: Option<toml::Table>,
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
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_bytes: 1 << 30,
            when_full: WhenFull::DropOldest,
            fsync: FsyncPolicy::Interval,
            fsync_interval: Duration::from_millis(100),
            segment_bytes: 8 << 20,
        }
    }
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
