//! Configuration: one TOML file, parsed with serde into these types.
//!
//! Every struct denies unknown keys, and every error is reported as
//! `PATH:LINE:COL: key: message`, because the person reading it is editing a
//! file on a Raspberry Pi over SSH and needs to know exactly where to look.

//! Each component owns its section's types and their `validate()` (as in
//! Vector): [`crate::source::serial`], [`crate::source::ble::config`],
//! [`crate::pipeline::config`], [`crate::queue::config`],
//! [`crate::uplink::config`], [`crate::broker::config`] and
//! [`crate::metrics::config`]. This module holds the top-level [`Config`],
//! `[gateway]` and `[log]`, loading, and the locating of errors; it
//! re-exports the sections' types so `config::X` names every one.

pub use crate::broker::config::{
    AclAccess, AclPermission, AclRule, BrokerAck, BrokerConfig, BrokerUser, DeniedPublish,
};
pub use crate::metrics::config::{MetricsConfig, default_metrics_listen};
pub use crate::pipeline::config::PipelineConfig;
pub use crate::queue::config::{FsyncPolicy, OpenCheck, StoreConfig, WhenFull};
pub use crate::source::ble::config::{BleConfig, BleMatch, BleProfile, BleScanConfig};
pub use crate::source::serial::SerialConfig;
pub use crate::units::parse_size;
use crate::units::valid_id;
pub use crate::uplink::config::{BrokerUrl, MqttProtocol, UpstreamConfig};
pub use crate::wire::Framing;
use serde::Deserialize;
use std::path::PathBuf;

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
    /// Filter, transform, route, downsample and aggregate (docs/rules.md).
    #[serde(default)]
    pub rules: Vec<crate::rules::config::RuleConfig>,
    /// Per-lane settings (ttl) for what rules put in the `alarm` and `bulk` lanes.
    #[serde(default)]
    pub lanes: crate::rules::config::LanesConfig,
    /// Commands from the cloud to the devices (docs/commands.md); absent: none.
    #[serde(default)]
    pub commands: Option<crate::downlink::config::CommandsConfig>,
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

impl From<&Config> for crate::pipeline::config::Setup {
    fn from(c: &Config) -> Self {
        crate::pipeline::config::Setup {
            gateway: c.gateway.id.clone(),
            data_dir: c.gateway.data_dir.clone(),
            pipeline: c.pipeline.clone(),
            store: c.store.clone(),
            rules: c.rules.clone(),
        }
    }
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
    /// Checks serde cannot express, section by section (each component
    /// checks its own); returns the offending key.
    fn validate(&self) -> Result<(), (String, String)> {
        if !valid_id(&self.gateway.id) {
            return Err(("gateway.id".into(), "must be 1-64 characters of letters, digits, '-', '_' or '.'".into()));
        }
        self.pipeline.validate()?;
        self.store.validate()?;
        let (p, s) = (&self.pipeline, &self.store);
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
        SerialConfig::validate_all(&self.serial)?;
        self.broker.validate()?;
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err((
                "log.level".into(),
                "is not a log filter (try \"info\", \"debug\" or \"edge_gateway=debug,info\")".into(),
            ));
        }
        crate::rules::validate(&self.rules)?;
        if let Some(c) = &self.commands {
            if self.upstream.is_none() {
                return Err(("commands".into(), "needs an [upstream] section: commands arrive through it".into()));
            }
            c.validate()?;
        }
        if self.lanes.alarm.drain != crate::rules::config::Drain::OldestFirst {
            return Err((
                "lanes.alarm.drain".into(),
                "must be \"oldest_first\": alarms go in order, ahead of any backlog (drain applies to lanes.bulk)"
                    .into(),
            ));
        }
        crate::source::ble::config::validate(&self.ble, &self.ble_scan)
    }
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
    use crate::reading::Format;
    use std::time::Duration;

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
    fn device_patterns_are_checked_where_they_are_written() {
        let e = err(&GOOD.replace("baud = 9600", "baud = 9600\ndevices = [\"wrist 1\"]"));
        assert!(e.starts_with("gw.toml:15:1: key `serial.1.devices`"), "{e}");
        assert!(e.contains("pattern \"wrist 1\""), "{e}");
        let e = err(&GOOD.replace("baud = 9600", "baud = 9600\ndevice = \"hub-1\"\ndevices = [\"wrist-*\"]"));
        assert!(e.contains("key `serial.1.devices`") && e.contains("\"hub-1\""), "{e}");
        let ok =
            Config::parse(&GOOD.replace("baud = 9600", "baud = 9600\ndevices = [\"wrist-*\", \"hub\"]"), "gw.toml");
        assert!(ok.unwrap().serial[1].devices.as_ref().unwrap().permits("wrist-3"));
        let e = err(&format!("{GOOD}\n[broker]\ndevices = [\"a/b\"]\n"));
        assert!(e.contains("key `broker.devices`"), "{e}");
        let e = err(&format!("{GOOD}\n[broker]\nanonymous_devices = [\"{{user}}-*\"]\n"));
        assert!(e.contains("key `broker.anonymous_devices`"), "{{user}} is for logins: {e}");
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
