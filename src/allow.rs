//! Which device ids a source may speak for (issue 19, H3).
//!
//! A reading names its device, and acks, dedup and the watermark follow
//! that name. A source allowed to name any device could move another
//! device's acks or raise its watermark past readings that are not on disk.
//! So each source can be bound to a list of patterns: a serial port's
//! `devices`, a BLE entry's `devices` (default: only its own id), a LAN
//! user's `devices` (default: `broker.devices`, where `{user}` stands for
//! the login) and `broker.anonymous_devices`. A reading whose device no
//! pattern matches is refused and counted (`readings_refused_total`); see
//! docs/security.md for the trust model.

use serde::{Deserialize, Serialize};

/// `*` matches any run of characters; everything else is literal.
pub fn glob(pattern: &str, s: &str) -> bool {
    let Some((first, rest)) = pattern.split_once('*') else { return pattern == s };
    let Some(mut s) = s.strip_prefix(first) else { return false };
    // No allocation: rules and source checks run this per reading.
    let (middle, last) = rest.rsplit_once('*').unwrap_or(("", rest));
    for p in middle.split('*').filter(|p| !p.is_empty()) {
        match s.find(p) {
            Some(i) => s = &s[i + p.len()..],
            None => return false,
        }
    }
    s.len() >= last.len() && s.ends_with(last)
}

/// Device-id patterns; `None` in a config means "any device".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Devices(Vec<String>);

impl Devices {
    pub fn new(patterns: impl IntoIterator<Item = impl Into<String>>) -> Devices {
        Devices(patterns.into_iter().map(Into::into).collect())
    }

    pub fn permits(&self, device: &str) -> bool {
        self.0.iter().any(|p| glob(p, device))
    }

    /// With `{user}` replaced by `user` (LAN logins). A login with a `*` in
    /// it would widen the pattern: such patterns match nothing for it.
    pub fn for_user(&self, user: &str) -> Devices {
        Devices(
            self.0
                .iter()
                .filter(|p| !(p.contains("{user}") && user.contains('*')))
                .map(|p| p.replace("{user}", user))
                .collect(),
        )
    }

    /// Config check: every pattern is a device id with `*` (and, where
    /// `user` is allowed, `{user}`) in it. Returns what is wrong.
    pub fn check(&self, user: bool) -> Result<(), String> {
        if self.0.is_empty() {
            return Err("must list at least one pattern (leave the key out to allow any device)".into());
        }
        for p in &self.0 {
            let bare = if user { p.replace("{user}", "u") } else { p.clone() };
            let ok = !bare.is_empty()
                && bare.len() <= 64
                && bare.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '*'));
            if !ok {
                return Err(format!(
                    "pattern {p:?}: device ids are 1-64 of letters, digits, '-', '_', '.'; '*' matches any run{}",
                    if user { ", {user} the login" } else { "" }
                ));
            }
        }
        Ok(())
    }
}

/// `None` permits every device.
pub fn permits(devices: Option<&Devices>, device: &str) -> bool {
    devices.is_none_or(|d| d.permits(device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("sensor-*", "sensor-7") && glob("sensor-*", "sensor-"));
        assert!(glob("*-ward-*", "a-ward-3") && !glob("*-ward-*", "award3"));
        assert!(glob("a*b*c", "abc") && glob("a*b*c", "a-b-b-c") && !glob("a*b*c", "acb"));
        assert!(glob("x", "x") && !glob("x", "xy"));
        assert!(!glob("ab*ba", "aba"), "prefix and suffix may not share characters");
    }

    #[test]
    fn patterns_users_and_checks() {
        let d = Devices::new(["wrist-*", "hub"]);
        assert!(d.permits("wrist-01") && d.permits("hub") && !d.permits("hub2") && !d.permits("xwrist-01"));
        assert!(permits(None, "anything"));
        let u = Devices::new(["{user}-*"]).for_user("alice");
        assert!(u.permits("alice-1") && !u.permits("bob-1"));
        assert!(!Devices::new(["{user}-*"]).for_user("*").permits("bob-1"), "a login named * gets no wildcard");
        assert!(Devices::new(["{user}-*"]).check(true).is_ok());
        assert!(Devices::new(["{user}-*"]).check(false).is_err());
        assert!(Devices::new(["a b"]).check(false).is_err());
        assert!(Devices::new(Vec::<String>::new()).check(false).is_err());
    }
}
