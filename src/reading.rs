//! The one type that travels through the gateway: a [`Reading`], and the
//! [`Batch`] that carries many of them from the queue to the cloud.
//!
//! Encoding lives here too, because the batch payload *is* the contract with
//! every consumer: `json` is readable by anything, `postcard` is compact. Both
//! carry `(gateway, batch)` so a consumer can drop a batch it already has.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A measured value: one number, or several (e.g. RR intervals, accelerometer axes).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Number(f64),
    Array(Vec<f64>),
}

impl Value {
    /// Encoded size estimate used for `batch_max_bytes` accounting.
    /// Upper-bound-ish size in JSON (the larger format).
    pub fn approx_len(&self) -> usize {
        match self {
            Value::Number(_) => 24,
            Value::Array(v) => 2 + 25 * v.len(),
        }
    }
}

// Human-readable formats (JSON) see a bare number or an array; binary formats
// (postcard) see a tagged enum, because postcard cannot guess which it is.
impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            match self {
                Value::Number(n) => s.serialize_f64(*n),
                Value::Array(v) => v.serialize(s),
            }
        } else {
            #[derive(Serialize)]
            enum Tagged<'a> {
                Number(f64),
                Array(&'a [f64]),
            }
            match self {
                Value::Number(n) => Tagged::Number(*n).serialize(s),
                Value::Array(v) => Tagged::Array(v).serialize(s),
            }
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Value;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a number or an array of numbers")
                }
                fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
                    Ok(Value::Number(v))
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
                    Ok(Value::Number(v as f64))
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
                    Ok(Value::Number(v as f64))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
                    let mut out = Vec::with_capacity(a.size_hint().unwrap_or(4).min(64));
                    while let Some(x) = a.next_element::<f64>()? {
                        out.push(x);
                    }
                    Ok(Value::Array(out))
                }
            }
            d.deserialize_any(V)
        } else {
            #[derive(Deserialize)]
            enum Tagged {
                Number(f64),
                Array(Vec<f64>),
            }
            Ok(match Tagged::deserialize(d)? {
                Tagged::Number(n) => Value::Number(n),
                Tagged::Array(v) => Value::Array(v),
            })
        }
    }
}

/// One measurement from one sensor of one device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    pub device: String,
    pub sensor: String,
    /// Per-device counter that grows by one per reading; the device's resend key.
    pub seq: Option<u64>,
    /// Unix time in milliseconds (the device's, or the receive time when it sent none).
    pub ts: u64,
    pub value: Value,
    /// The device's boot counter, when its firmware sends one: `seq` counts
    /// within a boot, so `(device, boot, seq)` names a reading even across
    /// reboots that restart the counter. Absent from JSON when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<u32>,
}

impl Reading {
    /// Rough encoded size, for `batch_max_bytes` (exactness is not needed:
    /// it only decides when a batch is "big enough").
    pub fn approx_len(&self) -> usize {
        // {"device":"","sensor":"","seq":,"ts":,"value":}, + digits
        48 + self.device.len() + self.sensor.len() + 20 + 13 + self.value.approx_len()
    }
}

/// A group of readings that travels as one message; `(gateway, batch)` is
/// unique for the gateway's lifetime.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub gateway: String,
    pub batch: u64,
    pub readings: Vec<Reading>,
}

/// Payload format of a batch on disk and on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Json,
    Postcard,
}

/// First two bytes of a postcard batch: never the start of a JSON document,
/// so `decode` can tell the formats apart. Version 1 readings have no
/// `boot`; a batch where no reading has one is still written as version 1,
/// so older readers keep working until a device sends `boot`.
pub const POSTCARD_MAGIC: [u8; 2] = [0xEB, 0x01];
/// A postcard batch whose readings carry `boot` (postcard is not
/// self-describing, so a new field needs a new version).
pub const POSTCARD_MAGIC_V2: [u8; 2] = [0xEB, 0x02];

/// A reading as postcard version 1 stored it (no `boot`).
#[derive(Serialize, Deserialize)]
struct ReadingV1 {
    device: String,
    sensor: String,
    seq: Option<u64>,
    ts: u64,
    value: Value,
}

#[derive(Serialize, Deserialize)]
struct BatchV1 {
    gateway: String,
    batch: u64,
    readings: Vec<ReadingV1>,
}

/// [`BatchV1`] as `encode` writes it: the same bytes, borrowed from the
/// batch (copying every reading's strings cost ~3 allocations a reading in
/// the uplink bench's heap profile, issue 18).
#[derive(Serialize)]
struct BatchV1Ref<'a> {
    gateway: &'a str,
    batch: u64,
    #[serde(serialize_with = "readings_v1")]
    readings: &'a [Reading],
}

/// [`ReadingV1`], borrowed.
#[derive(Serialize)]
struct ReadingV1Ref<'a> {
    device: &'a str,
    sensor: &'a str,
    seq: Option<u64>,
    ts: u64,
    value: &'a Value,
}

fn readings_v1<S: serde::Serializer>(readings: &&[Reading], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(readings.iter().map(|r| ReadingV1Ref {
        device: &r.device,
        sensor: &r.sensor,
        seq: r.seq,
        ts: r.ts,
        value: &r.value,
    }))
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a JSON batch: {0}")]
    Json(#[from] serde_json::Error),
    #[error("not a postcard batch: {0}")]
    Postcard(#[from] postcard::Error),
    #[error("empty payload")]
    Empty,
}

impl Batch {
    pub fn encode(&self, format: Format) -> Vec<u8> {
        match format {
            Format::Json => serde_json::to_vec(self).expect("batch serializes"),
            Format::Postcard if self.readings.iter().all(|r| r.boot.is_none()) => {
                let v1 = BatchV1Ref { gateway: &self.gateway, batch: self.batch, readings: &self.readings };
                postcard::to_extend(&v1, POSTCARD_MAGIC.to_vec()).expect("batch serializes")
            }
            Format::Postcard => postcard::to_extend(self, POSTCARD_MAGIC_V2.to_vec()).expect("batch serializes"),
        }
    }

    /// Decode either format, telling them apart by the postcard magic. A
    /// queue record's [`RecordHeader`], if any, is skipped.
    pub fn decode(payload: &[u8]) -> Result<Batch, DecodeError> {
        let (_, payload) = RecordHeader::split(payload)?;
        let trimmed = payload.trim_ascii_start();
        if trimmed.is_empty() {
            return Err(DecodeError::Empty);
        }
        if let Some(rest) = payload.strip_prefix(&POSTCARD_MAGIC[..]) {
            let v1: BatchV1 = postcard::from_bytes(rest)?;
            Ok(Batch {
                gateway: v1.gateway,
                batch: v1.batch,
                readings: v1
                    .readings
                    .into_iter()
                    .map(|r| Reading {
                        device: r.device,
                        sensor: r.sensor,
                        seq: r.seq,
                        ts: r.ts,
                        value: r.value,
                        boot: None,
                    })
                    .collect(),
            })
        } else if let Some(rest) = payload.strip_prefix(&POSTCARD_MAGIC_V2[..]) {
            Ok(postcard::from_bytes(rest)?)
        } else {
            Ok(serde_json::from_slice(trimmed)?)
        }
    }

    /// The readings as the flat JSON lines every tool of ours prints:
    /// `{"gateway","batch","device","sensor","seq","ts","value"}`, plus
    /// `"boot"` for readings that carry one.
    pub fn json_lines(&self) -> impl Iterator<Item = String> + '_ {
        self.readings.iter().map(move |r| {
            #[derive(Serialize)]
            struct Line<'a> {
                gateway: &'a str,
                batch: u64,
                device: &'a str,
                sensor: &'a str,
                seq: Option<u64>,
                ts: u64,
                value: &'a Value,
                #[serde(skip_serializing_if = "Option::is_none")]
                boot: Option<u32>,
            }
            serde_json::to_string(&Line {
                gateway: &self.gateway,
                batch: self.batch,
                device: &r.device,
                sensor: &r.sensor,
                seq: r.seq,
                ts: r.ts,
                value: &r.value,
                boot: r.boot,
            })
            .expect("reading serializes")
        })
    }
}

/// Where a reading came in: the link its acks (and, later, commands from
/// the cloud) go back over ([`crate::route`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    /// A serial port (a charging dock, a BLE-UART dongle), numbered as the
    /// ports are configured; a reload never reuses a number.
    Serial(u32),
    /// A LAN device through the embedded broker: its acks are MQTT's, one
    /// per message.
    Lan,
    /// A Bluetooth LE device: it takes no acks.
    Ble,
}

impl Origin {
    /// The kinds, for metrics labels; [`Origin::kind`] indexes this.
    pub const KINDS: [&'static str; 3] = ["serial", "lan", "ble"];

    /// The kind of source, as an index into [`Origin::KINDS`].
    pub fn kind(self) -> usize {
        match self {
            Origin::Serial(_) => 0,
            Origin::Lan => 1,
            Origin::Ble => 2,
        }
    }

    /// Whether the device forgets everything at or below an ack. A serial
    /// device does, so an ack must never start above a seq the gateway did
    /// not see. A LAN device gets one MQTT ack per message, for that message
    /// only. (BLE devices take no acks.)
    pub fn cumulative_acks(self) -> bool {
        self != Origin::Lan
    }
}

/// A reading on its way from a source to the pipeline.
#[derive(Clone, Debug)]
pub struct Incoming {
    pub reading: Reading,
    /// True when the device sent `ts` itself (then a resend carries the same ts).
    pub ts_from_device: bool,
    /// The link it came over (where its ack goes).
    pub origin: Origin,
    /// A BTHome packet id: not a sequence (a u8 that wraps), it only says
    /// "the same measurement as the device's previous advert" when repeated.
    pub packet_id: Option<u8>,
}

impl Incoming {
    pub fn new(reading: Reading, ts_from_device: bool, origin: Origin) -> Incoming {
        Incoming { reading, ts_from_device, origin, packet_id: None }
    }
}

/// What a reading holds: itself, its ids and its numbers (a long array
/// weighs what it costs, so channels of readings are bounded in bytes).
impl crate::channel::Weigh for Reading {
    fn weight(&self) -> usize {
        let numbers = match &self.value {
            Value::Number(_) => 0,
            Value::Array(v) => v.capacity() * std::mem::size_of::<f64>(),
        };
        std::mem::size_of::<Reading>() + self.device.capacity() + self.sensor.capacity() + numbers
    }
}

impl crate::channel::Weigh for Incoming {
    fn weight(&self) -> usize {
        std::mem::size_of::<Incoming>() - std::mem::size_of::<Reading>() + self.reading.weight()
    }
}

/// A cumulative acknowledgement: every reading of `device` (of boot `boot`,
/// when the device sends one) with `seq <= seq` is durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub device: String,
    pub seq: u64,
    /// The boot the ack is about: an ack never covers readings of another boot.
    pub boot: Option<u32>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Batch {
        Batch {
            gateway: "gw-1".into(),
            batch: 42,
            readings: vec![
                Reading {
                    device: "wrist-01".into(),
                    sensor: "heart_rate".into(),
                    seq: Some(17),
                    ts: 1_764_000_000_000,
                    value: Value::Number(72.0),
                    boot: None,
                },
                Reading {
                    device: "wrist-02".into(),
                    sensor: "rr".into(),
                    seq: None,
                    ts: 5,
                    value: Value::Array(vec![0.8, 0.81]),
                    boot: None,
                },
            ],
        }
    }

    #[test]
    fn both_formats_round_trip_and_autodetect() {
        let b = sample();
        for f in [Format::Json, Format::Postcard] {
            let bytes = b.encode(f);
            assert_eq!(Batch::decode(&bytes).unwrap(), b, "{f:?}");
        }
        assert!(b.encode(Format::Postcard).len() < b.encode(Format::Json).len());
    }

    #[test]
    fn postcard_v1_is_written_borrowed_with_the_owned_struct_s_bytes() {
        let b = sample();
        let owned = BatchV1 {
            gateway: b.gateway.clone(),
            batch: b.batch,
            readings: b
                .readings
                .iter()
                .map(|r| ReadingV1 {
                    device: r.device.clone(),
                    sensor: r.sensor.clone(),
                    seq: r.seq,
                    ts: r.ts,
                    value: r.value.clone(),
                })
                .collect(),
        };
        let want = postcard::to_extend(&owned, POSTCARD_MAGIC.to_vec()).unwrap();
        assert_eq!(b.encode(Format::Postcard), want);
        // And pinned, so both cannot drift together.
        assert_eq!(
            want,
            [
                0xEB, 0x01, 4, b'g', b'w', b'-', b'1', 42, 2, 8, b'w', b'r', b'i', b's', b't', b'-', b'0', b'1', 10,
                b'h', b'e', b'a', b'r', b't', b'_', b'r', b'a', b't', b'e', 1, 17, 0x80, 0xD0, 0xDF, 0xB4, 0xAB, 0x33,
                0, 0, 0, 0, 0, 0, 0, 0x52, 0x40, 8, b'w', b'r', b'i', b's', b't', b'-', b'0', b'2', 2, b'r', b'r', 0,
                5, 1, 2, 0x9A, 0x99, 0x99, 0x99, 0x99, 0x99, 0xE9, 0x3F, 0xEC, 0x51, 0xB8, 0x1E, 0x85, 0xEB, 0xE9,
                0x3F
            ]
        );
    }

    #[test]
    fn json_lines_have_the_documented_fields() {
        let lines: Vec<_> = sample().json_lines().collect();
        assert_eq!(
            lines[0],
            r#"{"gateway":"gw-1","batch":42,"device":"wrist-01","sensor":"heart_rate","seq":17,"ts":1764000000000,"value":72.0}"#
        );
        assert!(lines[1].contains(r#""seq":null"#) && lines[1].contains("[0.8,0.81]"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Batch::decode(b"").is_err());
        assert!(Batch::decode(b"{\"gateway\":").is_err());
        assert!(Batch::decode(&[0xEB, 0x01, 0xff, 0xff]).is_err());
    }
}

/// First two bytes of a queue record that starts with a [`RecordHeader`]
/// (records written while `[[rules]]` are configured). Never the start of a
/// JSON document nor of a postcard batch ([`POSTCARD_MAGIC`]).
pub const RECORD_HEADER_MAGIC: [u8; 2] = [0xEB, 0x10];

/// What kind of readings a queue record holds (see [`crate::rules`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RecordKind {
    /// Readings as the devices sent them; the uplink applies transforms.
    Raw,
    /// Readings an aggregate consumed (`keep_raw = false`): kept for a
    /// crash, never sent.
    Hold,
    /// Aggregate outputs, final as stored.
    Derived,
    /// A reply to a command from the cloud ([`crate::downlink`]): the body
    /// is the reply's JSON, sent as it is to the header's one topic.
    Reply,
}

/// Which window a `Derived` (or empty `Hold`) record closed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WindowRef {
    pub rule: String,
    pub device: String,
    pub sensor: String,
    pub start: u64,
}

/// Header of a queue record written with rules: where it goes and what it is.
/// Layout: [`RECORD_HEADER_MAGIC`], this struct in postcard, then the batch
/// payload exactly as without rules.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordHeader {
    pub kind: RecordKind,
    /// Upstream topics, rendered; empty: the default readings topic. The
    /// record owns one queue id per topic (its span) and goes out as one
    /// message per topic, copy j with batch id `id + j`.
    pub topics: Vec<String>,
    /// 0 bulk, 1 alarm.
    pub lane: u8,
    /// Index into [`Origin::KINDS`].
    pub source: u8,
    /// The uplink applies the rules' transforms before sending.
    pub transformed: bool,
    pub window: Option<WindowRef>,
    /// Readings rules dropped since the previous record (a filter, a
    /// downsample skip): acked like stored ones, so their acks must be as
    /// durable. Replay marks them durable again, or a restart would wait
    /// `ack_gap_timeout` for each as a gap.
    pub dropped: Vec<DroppedKey>,
}

/// A reading a rule dropped, by the keys the ack tracker knows it by.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroppedKey {
    pub device: String,
    pub boot: Option<u32>,
    pub seq: u64,
    pub ts: u64,
}

impl RecordHeader {
    /// A record the uplink never sends: held readings, or none at all (a
    /// window's close, dropped readings' keys).
    pub fn hold(window: Option<WindowRef>) -> RecordHeader {
        RecordHeader {
            kind: RecordKind::Hold,
            topics: Vec::new(),
            lane: 0,
            source: 0,
            transformed: false,
            window,
            dropped: Vec::new(),
        }
    }

    /// `header + payload` as one record.
    pub fn wrap(&self, payload: &[u8]) -> Vec<u8> {
        let mut out = RECORD_HEADER_MAGIC.to_vec();
        let mut out = postcard::to_extend(self, std::mem::take(&mut out)).expect("header serializes");
        out.extend_from_slice(payload);
        out
    }

    /// Split a queue record into its header (if it has one) and the batch payload.
    pub fn split(record: &[u8]) -> Result<(Option<RecordHeader>, &[u8]), DecodeError> {
        match record.strip_prefix(&RECORD_HEADER_MAGIC[..]) {
            Some(rest) => {
                let (h, payload) = postcard::take_from_bytes::<RecordHeader>(rest)?;
                Ok((Some(h), payload))
            }
            None => Ok((None, record)),
        }
    }
}
