//! `[store]`: the queue's size, what it does when full, and when it syncs.

use crate::units::{de_duration, de_size};
use serde::Deserialize;
use std::time::Duration;

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
    /// Store small records (a site's pace) deflated when that makes them
    /// shorter: fewer bytes on the SD card. Readers see the same payload.
    pub compress: bool,
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
            compress: true,
        }
    }
}

impl StoreConfig {
    /// Checks serde cannot express; returns the offending key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: &str| Err((format!("store.{k}"), m.to_string()));
        if self.max_bytes < 4096 {
            return bad("max_bytes", "must be at least 4096 bytes");
        }
        if self.fsync == FsyncPolicy::Interval && self.fsync_interval.is_zero() {
            return bad("fsync_interval", "must be greater than 0 (or use fsync = \"always\")");
        }
        Ok(())
    }
}
