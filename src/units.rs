//! Units in the config file, for every component's serde types: durations
//! (`"200ms"`, `"10m"`), sizes (bytes, or `"64MiB"`), and the rule for ids.

use serde::{Deserialize, Deserializer};
use std::time::Duration;

pub fn yes() -> bool {
    true
}

/// Gateway and device ids: 1-64 letters, digits, `-`, `_` or `.`.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

pub fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

pub fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("bad duration {s:?} ({e}); use e.g. \"200ms\", \"10m\"")))
}

/// Sizes: an integer number of bytes, or a string like `"64MiB"`, `"512KiB"`, `"1GB"`.
pub fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
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
