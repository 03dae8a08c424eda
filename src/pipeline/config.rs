//! `[pipeline]`: batching, dedup and acks.

use crate::queue::config::StoreConfig;
use crate::reading::Format;
use crate::units::{de_duration, de_size};
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

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

impl PipelineConfig {
    /// Checks serde cannot express; returns the offending key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: &str| Err((format!("pipeline.{k}"), m.to_string()));
        if self.batch_max_readings == 0 || self.batch_max_readings > crate::queue::MAX_READINGS as usize {
            return bad("batch_max_readings", "must be 1 to 8,388,607 (what a queue record can count)");
        }
        if self.batch_max_bytes < 64 {
            return bad("batch_max_bytes", "must be at least 64 bytes");
        }
        if self.batch_max_age.is_zero() {
            return bad("batch_max_age", "must be greater than 0");
        }
        if self.dedup_max_per_device == 0 {
            return bad("dedup_max_per_device", "must be at least 1");
        }
        Ok(())
    }
}

/// What [`super::Pipeline`] is opened with: its section, the queue's, and the
/// gateway's id and data directory (`From<&Config>` builds it).
#[derive(Debug, Clone)]
pub struct Setup {
    pub gateway: String,
    pub data_dir: PathBuf,
    pub pipeline: PipelineConfig,
    pub store: StoreConfig,
    /// `[[rules]]`, applied in order to every accepted reading (none: as before).
    pub rules: Vec<crate::rules::config::RuleConfig>,
}
