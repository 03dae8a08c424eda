//! Wire formats between a dock (or any serial device) and the gateway.
//!
//! This is a contract with firmware authors, so it is spelled out here and
//! kept deliberately small. A port speaks one of two framings (config
//! `framing`):
//!
//! * **jsonl** — one JSON object per `\n`-terminated line (a trailing `\r` is
//!   ignored, empty lines are skipped):
//!   `{"device":"wrist-01","sensor":"heart_rate","seq":17,"ts":1764000000000,"value":72}`
//!   - `sensor` (required): 1..=64 bytes of UTF-8, no control characters.
//!   - `device` (optional): same rules; when absent the port's configured
//!     `device` is used, and when there is none the line is malformed.
//!   - `seq` (optional): u64 per-device counter, the resend/ack key.
//!   - `ts` (optional): unix milliseconds; when absent the receive time is used.
//!   - `boot` (optional): u32, the device's boot counter, bumped by the
//!     firmware at each start; `seq` then counts within the boot (from 0 for
//!     an immediate first ack), and `(device, boot, seq)` names a reading.
//!   - `value` (required): a number or an array of numbers.
//!   - Unknown fields are ignored, so firmware can add fields before we read them.
//!
//!   The gateway answers with cumulative acks, one per line:
//!   `{"ack":{"device":"wrist-01","seq":17}}` — "everything from `wrist-01`
//!   with `seq <= 17` is durable, forget it". For readings that carried a
//!   `boot` the ack names it, `{"ack":{"device":"wrist-01","boot":7,"seq":17}}`,
//!   and covers readings of that boot only.
//! * **cobs** — binary frames, see [`frame`] for the exact byte layout.
//!
//! Any frame (line or COBS frame) longer than [`MAX_FRAME_LEN`] bytes between
//! delimiters is discarded and counted as malformed once.

use crate::reading::{Ack, Reading, Value};
use crate::route::{CommandAck, DeviceCommand};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// Longest frame accepted between two delimiters, delimiter excluded.
pub const MAX_FRAME_LEN: usize = 4096;
/// Longest device or sensor id, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// How a serial port (or a `custom` BLE characteristic) frames readings:
/// config `framing`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Framing {
    #[default]
    Jsonl,
    Cobs,
}

pub mod frame;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("invalid JSON line: {0}")]
    Json(#[from] serde_json::Error),
    #[error("reading has no \"sensor\"")]
    MissingSensor,
    #[error("reading names no device and the port has no default `device` configured")]
    MissingDevice,
    #[error("bad {field} id {value:?}: {reason}")]
    BadId { field: &'static str, value: String, reason: &'static str },
    #[error("frame longer than {MAX_FRAME_LEN} bytes, discarded")]
    TooLong,
    #[error("bad frame: {0}")]
    Frame(#[from] frame::Error),
    #[error("expected a reading, got an ack")]
    UnexpectedAck,
    #[error("expected an ack, got a reading")]
    UnexpectedReading,
    #[error("a {0} frame where none is expected")]
    UnexpectedFrame(&'static str),
    #[error("{field} of {len} bytes is over the frame's {max}-byte limit")]
    TooLongForFrame { field: &'static str, len: usize, max: usize },
    #[error("value has {0} numbers; a cobs frame carries 1..={max}", max = frame::MAX_VALUES)]
    TooManyValues(usize),
    #[error("payload names {field} {payload:?} but the topic says {topic:?}")]
    TopicMismatch { field: &'static str, payload: String, topic: String },
}

fn check_id(field: &'static str, id: &str) -> Result<(), WireError> {
    let reason = if id.is_empty() {
        "empty"
    } else if id.len() > MAX_ID_LEN {
        "longer than 64 bytes"
    } else if id.chars().any(char::is_control) {
        "contains control characters"
    } else {
        return Ok(());
    };
    Err(WireError::BadId { field, value: id.chars().take(80).collect(), reason })
}

#[allow(clippy::too_many_arguments)]
fn finish(
    device: Option<&str>,
    sensor: &str,
    seq: Option<u64>,
    ts: Option<u64>,
    value: Value,
    boot: Option<u32>,
    default_device: Option<&str>,
    now_ms: u64,
) -> Result<(Reading, bool), WireError> {
    let device = device.or(default_device).ok_or(WireError::MissingDevice)?;
    check_id("device", device)?;
    check_id("sensor", sensor)?;
    let reading =
        Reading { device: device.to_string(), sensor: sensor.to_string(), seq, ts: ts.unwrap_or(now_ms), value, boot };
    Ok((reading, ts.is_some()))
}

/// The fields a device sends, on a serial line or in a LAN MQTT payload.
/// Ids are borrowed from the line unless they hold escapes: the reading's
/// own copies are the only allocations for them (issue 18's CPU per reading).
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default, deserialize_with = "borrowed_id")]
    device: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "borrowed_id")]
    sensor: Option<Cow<'a, str>>,
    seq: Option<u64>,
    ts: Option<u64>,
    value: Value,
    boot: Option<u32>,
}

/// An optional id, borrowed where it can be. (`#[serde(borrow)]` on an
/// `Option<Cow<str>>` field still copies: serde borrows only a `Cow` that
/// is the field itself, as here in the newtype.)
fn borrowed_id<'de: 'a, 'a, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Cow<'a, str>>, D::Error> {
    #[derive(Deserialize)]
    struct Id<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Id<'a>>::deserialize(d)?.map(|id| id.0))
}

/// Parse one jsonl line (without its `\n`). Returns the reading and whether
/// `ts` came from the device.
pub fn parse_jsonl(line: &[u8], default_device: Option<&str>, now_ms: u64) -> Result<(Reading, bool), WireError> {
    let l: Fields<'_> = serde_json::from_slice(line)?;
    let sensor = l.sensor.ok_or(WireError::MissingSensor)?;
    finish(l.device.as_deref(), &sensor, l.seq, l.ts, l.value, l.boot, default_device, now_ms)
}

/// Parse a LAN MQTT payload, `{"seq":12,"ts":1764000000000,"value":97}`
/// (`seq` and `ts` optional, as on serial); device and sensor come from the
/// topic. A payload that names a different device or sensor is malformed.
pub fn parse_mqtt_payload(
    payload: &[u8],
    device: &str,
    sensor: &str,
    now_ms: u64,
) -> Result<(Reading, bool), WireError> {
    let p: Fields<'_> = serde_json::from_slice(payload)?;
    for (field, said, topic) in [("device", &p.device, device), ("sensor", &p.sensor, sensor)] {
        if let Some(said) = said
            && said != topic
        {
            let payload = said.chars().take(80).collect();
            return Err(WireError::TopicMismatch { field, payload, topic: topic.to_string() });
        }
    }
    finish(Some(device), sensor, p.seq, p.ts, p.value, p.boot, None, now_ms)
}

#[derive(Serialize, Deserialize)]
struct AckLine<'a> {
    #[serde(borrow)]
    ack: AckBody<'a>,
}

#[derive(Serialize, Deserialize)]
struct AckBody<'a> {
    #[serde(borrow)]
    device: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    boot: Option<u32>,
    seq: u64,
}

/// `{"ack":{"device":"…","seq":N}}\n`, or with `"boot":B` before `seq`.
pub fn encode_ack_jsonl(ack: &Ack) -> Vec<u8> {
    let line = AckLine { ack: AckBody { device: ack.device.as_str().into(), boot: ack.boot, seq: ack.seq } };
    // Serializing a struct of a string and an integer cannot fail.
    let mut out = serde_json::to_vec(&line).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Parse an ack line (without its `\n`), as a device does.
pub fn parse_ack_jsonl(line: &[u8]) -> Result<Ack, WireError> {
    let l: AckLine = serde_json::from_slice(line)?;
    Ok(Ack { device: l.ack.device.into_owned(), seq: l.ack.seq, boot: l.ack.boot })
}

/// The gateway's time for a device, one jsonl line: `{"time":{"ms":N}}`
/// (unix milliseconds), sent when a port connects and every hour.
pub fn encode_time_jsonl(now_ms: u64) -> Vec<u8> {
    format!("{{\"time\":{{\"ms\":{now_ms}}}}}\n").into_bytes()
}

/// A time line as a device reads it.
pub fn parse_time_jsonl(line: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Line {
        time: Body,
    }
    #[derive(Deserialize)]
    struct Body {
        ms: u64,
    }
    serde_json::from_slice::<Line>(line).ok().map(|l| l.time.ms)
}

/// A command for a device as one jsonl line, `\n` included:
/// `{"cmd":{"id":"c-1","device":"wrist-07","name":"alert","args":{...}}}`.
pub fn encode_command_jsonl(c: &DeviceCommand) -> Vec<u8> {
    let args: serde_json::Value = serde_json::from_str(&c.args).unwrap_or(serde_json::Value::Null);
    let line = serde_json::json!({"cmd": {"id": c.id, "device": c.device, "name": c.name, "args": args}});
    let mut out = serde_json::to_vec(&line).unwrap_or_default();
    out.push(b'\n');
    out
}

/// A command line as a device reads it; `None` when the line is no command.
pub fn parse_command_jsonl(line: &[u8]) -> Option<DeviceCommand> {
    #[derive(Deserialize)]
    struct Line {
        cmd: Body,
    }
    #[derive(Deserialize)]
    struct Body {
        id: String,
        device: String,
        name: String,
        #[serde(default)]
        args: serde_json::Value,
    }
    let l: Line = serde_json::from_slice(line).ok()?;
    Some(DeviceCommand { id: l.cmd.id, device: l.cmd.device, name: l.cmd.name, args: l.cmd.args.to_string() })
}

/// A device's answer, `{"cmd_ack":{"device":..,"id":..,"ok":true,"result":..}}`,
/// `\n` included.
pub fn encode_command_ack_jsonl(a: &CommandAck) -> Vec<u8> {
    let mut out = serde_json::to_vec(&serde_json::json!({ "cmd_ack": a })).unwrap_or_default();
    out.push(b'\n');
    out
}

/// A `cmd_ack` line from a device; `None` when the line is not one (then it
/// is whatever else it fails to be).
pub fn parse_command_ack_jsonl(line: &[u8]) -> Option<Result<CommandAck, WireError>> {
    if !line.windows(9).any(|w| w == b"\"cmd_ack\"") {
        return None;
    }
    #[derive(Deserialize)]
    struct Line {
        cmd_ack: CommandAck,
    }
    Some(serde_json::from_slice::<Line>(line).map(|l| l.cmd_ack).map_err(WireError::from))
}

/// A LAN device's answer on `commands/{device}/ack`: `{"id","ok","result"?}`
/// (the device is the one in the topic).
pub fn parse_command_ack_mqtt(device: &str, payload: &[u8]) -> Result<CommandAck, WireError> {
    #[derive(Deserialize)]
    struct Body {
        id: String,
        ok: bool,
        #[serde(default)]
        result: Option<serde_json::Value>,
    }
    let b: Body = serde_json::from_slice(payload)?;
    Ok(CommandAck { device: device.to_string(), id: b.id, ok: b.ok, result: b.result })
}

/// A reading as one jsonl line, `\n` included (what a device sends). `ts`
/// is always included.
pub fn encode_reading_jsonl(r: &Reading) -> Vec<u8> {
    #[derive(Serialize)]
    struct Line<'a> {
        device: &'a str,
        sensor: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        ts: u64,
        value: &'a Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        boot: Option<u32>,
    }
    let line = Line { device: &r.device, sensor: &r.sensor, seq: r.seq, ts: r.ts, value: &r.value, boot: r.boot };
    let mut out = serde_json::to_vec(&line).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Turn a decoded frame into a reading, applying the same rules as jsonl.
pub fn reading_from_frame(
    f: frame::Frame,
    default_device: Option<&str>,
    now_ms: u64,
) -> Result<(Reading, bool), WireError> {
    let (w, boot) = match f {
        frame::Frame::Reading(w) => (w, None),
        frame::Frame::ReadingBoot { boot, reading } => (reading, Some(boot)),
        frame::Frame::Ack { .. } | frame::Frame::AckBoot { .. } => return Err(WireError::UnexpectedAck),
        frame::Frame::Command { .. } => return Err(WireError::UnexpectedFrame("command")),
        frame::Frame::CommandAck { .. } => return Err(WireError::UnexpectedFrame("command ack")),
        frame::Frame::Time { .. } => return Err(WireError::UnexpectedFrame("time")),
    };
    let value = match w.value.as_slice() {
        [x] => Value::Number(*x),
        xs => Value::Array(xs.to_vec()),
    };
    finish(w.device.as_deref(), &w.sensor, w.seq, w.ts, value, boot, default_device, now_ms)
}

/// Decode and parse one cobs frame (bytes between delimiters, modified in place).
pub fn parse_cobs(buf: &mut [u8], default_device: Option<&str>, now_ms: u64) -> Result<(Reading, bool), WireError> {
    reading_from_frame(frame::decode(buf)?, default_device, now_ms)
}

fn id_string(field: &'static str, s: &str) -> Result<heapless::String<{ frame::MAX_ID }>, WireError> {
    check_id(field, s)?;
    // check_id bounded the length, so this cannot fail.
    heapless::String::try_from(s).map_err(|_| WireError::BadId {
        field,
        value: s.chars().take(80).collect(),
        reason: "longer than 64 bytes",
    })
}

fn encode_frame(f: &frame::Frame) -> Result<Vec<u8>, WireError> {
    let mut out = [0u8; frame::MAX_ENCODED_LEN];
    let n = frame::encode(f, &mut out)?;
    Ok(out[..n].to_vec())
}

/// A reading as one cobs frame, trailing 0x00 included (what a device sends).
pub fn encode_reading_cobs(r: &Reading) -> Result<Vec<u8>, WireError> {
    let value = match &r.value {
        Value::Number(x) => heapless::Vec::from_slice(&[*x]),
        Value::Array(xs) => heapless::Vec::from_slice(xs),
    }
    .map_err(|_| {
        WireError::TooManyValues(match &r.value {
            Value::Number(_) => 1,
            Value::Array(xs) => xs.len(),
        })
    })?;
    let w = frame::WireReading {
        device: Some(id_string("device", &r.device)?),
        sensor: id_string("sensor", &r.sensor)?,
        seq: r.seq,
        ts: Some(r.ts),
        value,
    };
    match r.boot {
        None => encode_frame(&frame::Frame::Reading(w)),
        Some(boot) => encode_frame(&frame::Frame::ReadingBoot { boot, reading: w }),
    }
}

/// An ack as one cobs frame, trailing 0x00 included. Fails only for a device
/// id that no reading could have carried (empty, > 64 bytes, control chars).
pub fn encode_ack_cobs(ack: &Ack) -> Result<Vec<u8>, WireError> {
    let device = id_string("device", &ack.device)?;
    match ack.boot {
        None => encode_frame(&frame::Frame::Ack { device, seq: ack.seq }),
        Some(boot) => encode_frame(&frame::Frame::AckBoot { device, boot, seq: ack.seq }),
    }
}

/// Decode an ack frame (bytes between delimiters), as a device does.
pub fn parse_ack_cobs(buf: &mut [u8]) -> Result<Ack, WireError> {
    match frame::decode(buf)? {
        frame::Frame::Ack { device, seq } => Ok(Ack { device: device.as_str().to_string(), seq, boot: None }),
        frame::Frame::AckBoot { device, boot, seq } => {
            Ok(Ack { device: device.as_str().to_string(), seq, boot: Some(boot) })
        }
        frame::Frame::Reading(_) | frame::Frame::ReadingBoot { .. } => Err(WireError::UnexpectedReading),
        frame::Frame::Command { .. } => Err(WireError::UnexpectedFrame("command")),
        frame::Frame::CommandAck { .. } => Err(WireError::UnexpectedFrame("command ack")),
        frame::Frame::Time { .. } => Err(WireError::UnexpectedFrame("time")),
    }
}

/// What a device sends: a reading, or its answer to a command.
#[derive(Debug, Clone, PartialEq)]
pub enum FromDevice {
    Reading(Reading, bool),
    CommandAck(CommandAck),
}

/// Parse one frame a device sent (a reading or a command answer).
pub fn parse_from_device(
    framing: Framing,
    buf: &mut [u8],
    default_device: Option<&str>,
    now_ms: u64,
) -> Result<FromDevice, WireError> {
    match framing {
        Framing::Jsonl => match parse_jsonl(buf, default_device, now_ms) {
            Ok((r, own_ts)) => Ok(FromDevice::Reading(r, own_ts)),
            Err(e) => match parse_command_ack_jsonl(buf) {
                Some(a) => a.map(FromDevice::CommandAck),
                None => Err(e),
            },
        },
        Framing::Cobs => match frame::decode(buf)? {
            frame::Frame::CommandAck { device, id, ok, result } => {
                let result = (!result.is_empty())
                    .then(|| serde_json::from_str(&result).unwrap_or_else(|_| result.as_str().into()));
                Ok(FromDevice::CommandAck(CommandAck { device: device.to_string(), id: id.to_string(), ok, result }))
            }
            f => reading_from_frame(f, default_device, now_ms).map(|(r, t)| FromDevice::Reading(r, t)),
        },
    }
}

/// What the gateway sends a device.
#[derive(Debug, Clone, PartialEq)]
pub enum FromGateway {
    Ack(Ack),
    Command(DeviceCommand),
    Time(u64),
}

/// Parse one frame from the gateway, as a device does.
pub fn parse_from_gateway(framing: Framing, buf: &mut [u8]) -> Result<FromGateway, WireError> {
    match framing {
        Framing::Jsonl => {
            if let Ok(a) = parse_ack_jsonl(buf) {
                return Ok(FromGateway::Ack(a));
            }
            if let Some(c) = parse_command_jsonl(buf) {
                return Ok(FromGateway::Command(c));
            }
            parse_time_jsonl(buf).map(FromGateway::Time).ok_or(WireError::UnexpectedFrame("unknown line"))
        }
        Framing::Cobs => match frame::decode(buf)? {
            frame::Frame::Ack { device, seq } => {
                Ok(FromGateway::Ack(Ack { device: device.to_string(), seq, boot: None }))
            }
            frame::Frame::AckBoot { device, boot, seq } => {
                Ok(FromGateway::Ack(Ack { device: device.to_string(), seq, boot: Some(boot) }))
            }
            frame::Frame::Command { id, device, name, args } => Ok(FromGateway::Command(DeviceCommand {
                id: id.to_string(),
                device: device.to_string(),
                name: name.to_string(),
                args: args.to_string(),
            })),
            frame::Frame::Time { ms } => Ok(FromGateway::Time(ms)),
            _ => Err(WireError::UnexpectedReading),
        },
    }
}

fn bounded<const N: usize>(field: &'static str, s: &str) -> Result<heapless::String<N>, WireError> {
    heapless::String::try_from(s).map_err(|_| WireError::TooLongForFrame { field, len: s.len(), max: N })
}

/// A command for a device in the port's framing (cobs: fails when an id or
/// the args are over the frame's limits).
pub fn encode_command(framing: Framing, c: &DeviceCommand) -> Result<Vec<u8>, WireError> {
    match framing {
        Framing::Jsonl => Ok(encode_command_jsonl(c)),
        Framing::Cobs => encode_frame(&frame::Frame::Command {
            id: bounded("id", &c.id)?,
            device: bounded("device", &c.device)?,
            name: bounded("name", &c.name)?,
            args: bounded("args", &c.args)?,
        }),
    }
}

/// A device's answer in its framing (what the simulated devices send).
pub fn encode_command_ack(framing: Framing, a: &CommandAck) -> Result<Vec<u8>, WireError> {
    match framing {
        Framing::Jsonl => Ok(encode_command_ack_jsonl(a)),
        Framing::Cobs => encode_frame(&frame::Frame::CommandAck {
            device: bounded("device", &a.device)?,
            id: bounded("id", &a.id)?,
            ok: a.ok,
            result: bounded("result", &a.result.as_ref().map_or(String::new(), |r| r.to_string()))?,
        }),
    }
}

/// The gateway's time in the port's framing.
pub fn encode_time(framing: Framing, now_ms: u64) -> Vec<u8> {
    match framing {
        Framing::Jsonl => encode_time_jsonl(now_ms),
        Framing::Cobs => encode_frame(&frame::Frame::Time { ms: now_ms }).unwrap_or_default(),
    }
}

/// Parse one frame from [`FrameSplitter`] per the port's framing.
pub fn parse_reading(
    framing: Framing,
    buf: &mut [u8],
    default_device: Option<&str>,
    now_ms: u64,
) -> Result<(Reading, bool), WireError> {
    match framing {
        Framing::Jsonl => parse_jsonl(buf, default_device, now_ms),
        Framing::Cobs => parse_cobs(buf, default_device, now_ms),
    }
}

/// Encode an ack per the port's framing, delimiter included.
pub fn encode_ack(framing: Framing, ack: &Ack) -> Result<Vec<u8>, WireError> {
    match framing {
        Framing::Jsonl => Ok(encode_ack_jsonl(ack)),
        Framing::Cobs => encode_ack_cobs(ack),
    }
}

/// Parse an ack frame per the port's framing (device side).
pub fn parse_ack(framing: Framing, buf: &mut [u8]) -> Result<Ack, WireError> {
    match framing {
        Framing::Jsonl => parse_ack_jsonl(buf),
        Framing::Cobs => parse_ack_cobs(buf),
    }
}

/// Encode a reading per the framing, delimiter included (device side).
pub fn encode_reading(framing: Framing, r: &Reading) -> Result<Vec<u8>, WireError> {
    match framing {
        Framing::Jsonl => Ok(encode_reading_jsonl(r)),
        Framing::Cobs => encode_reading_cobs(r),
    }
}

/// Cuts a byte stream into frames at `\n` (jsonl) or 0x00 (cobs).
///
/// Memory is bounded by [`MAX_FRAME_LEN`]: a frame that grows past it is
/// reported once as [`WireError::TooLong`] and the rest of it, up to the next
/// delimiter, is skipped without buffering.
#[derive(Debug)]
pub struct FrameSplitter {
    delim: u8,
    strip_cr: bool,
    buf: Vec<u8>,
    /// Inside an over-long frame: drop bytes until the next delimiter.
    discarding: bool,
}

impl FrameSplitter {
    pub fn new(framing: Framing) -> Self {
        let (delim, strip_cr) = match framing {
            Framing::Jsonl => (b'\n', true),
            Framing::Cobs => (0, false),
        };
        FrameSplitter { delim, strip_cr, buf: Vec::with_capacity(512), discarding: false }
    }

    /// Forget a partial frame, e.g. after the port was reopened: its first
    /// half came from a device that may no longer be there.
    pub fn reset(&mut self) {
        self.buf.clear();
        self.discarding = false;
    }

    /// Bytes of an incomplete frame currently held.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Feed a chunk; `on_frame` is called for each complete, non-empty frame
    /// (delimiter and, for jsonl, a trailing `\r` removed) and once per
    /// over-long frame with `Err(TooLong)`. The frame slice is mutable so
    /// COBS can be decoded in place.
    pub fn feed(&mut self, mut chunk: &[u8], mut on_frame: impl FnMut(Result<&mut [u8], WireError>)) {
        while !chunk.is_empty() {
            let (part, complete) = match chunk.iter().position(|&b| b == self.delim) {
                Some(i) => (&chunk[..i], Some(i + 1)),
                None => (chunk, None),
            };
            if !self.discarding {
                if self.buf.len() + part.len() > MAX_FRAME_LEN {
                    self.buf.clear();
                    self.discarding = true;
                    on_frame(Err(WireError::TooLong));
                } else {
                    self.buf.extend_from_slice(part);
                }
            }
            match complete {
                Some(next) => {
                    if !self.discarding {
                        let mut end = self.buf.len();
                        if self.strip_cr && self.buf.last() == Some(&b'\r') {
                            end -= 1;
                        }
                        if end > 0 {
                            on_frame(Ok(&mut self.buf[..end]));
                        }
                    }
                    self.buf.clear();
                    self.discarding = false;
                    chunk = &chunk[next..];
                }
                None => chunk = &[],
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::frame::{Frame, WireReading};
    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    #[test]
    fn mqtt_payloads_take_ids_from_the_topic() {
        let (r, from_dev) = parse_mqtt_payload(br#"{"seq":12,"ts":5,"value":97}"#, "wrist-07", "spo2", NOW).unwrap();
        assert_eq!(
            (r.device.as_str(), r.sensor.as_str(), r.seq, r.ts, from_dev),
            ("wrist-07", "spo2", Some(12), 5, true)
        );
        let (r, from_dev) = parse_mqtt_payload(br#"{"value":[1,2]}"#, "w", "acc", NOW).unwrap();
        assert_eq!((r.seq, r.ts, from_dev, r.value), (None, NOW, false, Value::Array(vec![1.0, 2.0])));
        assert!(parse_mqtt_payload(br#"{"device":"w","value":1}"#, "w", "s", NOW).is_ok());
        for bad in [&br#"{"device":"other","value":1}"#[..], br#"{"seq":1}"#, b"97", b"\xff"] {
            assert!(parse_mqtt_payload(bad, "w", "s", NOW).is_err(), "{bad:?}");
        }
        assert!(parse_mqtt_payload(br#"{"value":1}"#, "", "s", NOW).is_err(), "empty device level");
    }

    fn reading(seq: u64, value: Value) -> Reading {
        Reading {
            device: "wrist-01".into(),
            sensor: "heart_rate".into(),
            seq: Some(seq),
            ts: 1_764_000_000_000,
            value,
            boot: None,
        }
    }

    fn split_all(framing: Framing, chunks: &[&[u8]]) -> Vec<Result<Vec<u8>, String>> {
        let mut s = FrameSplitter::new(framing);
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, |f| out.push(f.map(|b| b.to_vec()).map_err(|e| e.to_string())));
        }
        out
    }

    #[test]
    fn jsonl_example_from_the_docs() {
        let line = br#"{"device":"wrist-01","sensor":"heart_rate","seq":17,"ts":1764000000000,"value":72}"#;
        let (r, from_dev) = parse_jsonl(line, None, NOW).unwrap();
        assert_eq!(r, reading(17, Value::Number(72.0)));
        assert!(from_dev);
    }

    #[test]
    fn jsonl_defaults_and_extras() {
        let (r, from_dev) =
            parse_jsonl(br#"{"sensor":"rr","value":[0.8,0.81],"fw":"1.2","extra":{"x":1}}"#, Some("dock-dev"), NOW)
                .unwrap();
        assert_eq!(r.device, "dock-dev");
        assert_eq!(r.ts, NOW);
        assert_eq!(r.seq, None);
        assert_eq!(r.value, Value::Array(vec![0.8, 0.81]));
        assert!(!from_dev);
        // The device's own id wins over the port default.
        let (r, _) = parse_jsonl(br#"{"device":"w2","sensor":"t","value":1}"#, Some("dock-dev"), NOW).unwrap();
        assert_eq!(r.device, "w2");
        // Escaped strings and a null device.
        let (r, _) =
            parse_jsonl(br#"{"device":"w\u00e9\"2","sensor":"h\/r","value":1}"#, Some("dock-dev"), NOW).unwrap();
        assert_eq!((r.device.as_str(), r.sensor.as_str()), ("w\u{e9}\"2", "h/r"));
        let (r, _) = parse_jsonl(br#"{"device":null,"sensor":"t","value":1}"#, Some("dock-dev"), NOW).unwrap();
        assert_eq!(r.device, "dock-dev");
        assert!(parse_jsonl(br#"{"device":7,"sensor":"t","value":1}"#, Some("dock-dev"), NOW).is_err());
    }

    /// Planted: `#[serde(borrow)]` alone on the `Option<Cow>` fields (no
    /// `borrowed_id`) copies every id, and the first assertion fails.
    #[test]
    fn plain_ids_are_borrowed_from_the_line_escaped_ones_copied() {
        let f: Fields<'_> = serde_json::from_slice(br#"{"device":"w1","sensor":"hr","value":1}"#).unwrap();
        assert!(matches!(f.device, Some(Cow::Borrowed("w1"))), "{:?}", f.device);
        assert!(matches!(f.sensor, Some(Cow::Borrowed("hr"))), "{:?}", f.sensor);
        let f: Fields<'_> = serde_json::from_slice(br#"{"device":"w\"1","sensor":"h\/r","value":1}"#).unwrap();
        assert!(matches!(f.device.as_deref(), Some("w\"1")) && matches!(f.device, Some(Cow::Owned(_))));
        assert!(matches!(f.sensor.as_deref(), Some("h/r")));
        let f: Fields<'_> = serde_json::from_slice(br#"{"device":null,"value":1}"#).unwrap();
        assert!(f.device.is_none() && f.sensor.is_none(), "null and absent ids are none");
    }

    #[test]
    fn jsonl_round_trip() {
        for r in [reading(0, Value::Number(-1.5)), reading(u64::MAX, Value::Array(vec![1.0, 2.5, 3e10]))] {
            let line = encode_reading_jsonl(&r);
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(parse_jsonl(&line[..line.len() - 1], None, NOW).unwrap(), (r, true));
        }
    }

    #[test]
    fn jsonl_malformed_kinds() {
        let cases: &[(&[u8], &str)] = &[
            (b"garbage", "invalid JSON"),
            (br#"{"sensor":"hr","value":"#, "invalid JSON"),
            (br#"{"device":"w","value":1}"#, "no \"sensor\""),
            (br#"{"device":"w","sensor":"","value":1}"#, "empty"),
            (br#"{"device":"w","sensor":"hr"}"#, "missing field `value`"),
            (br#"{"device":"w","sensor":"hr","value":"high"}"#, "invalid JSON"),
            (br#"{"device":"w","sensor":"hr","value":1,"seq":-1}"#, "invalid JSON"),
            (br#"{"device":"w","sensor":"hr","value":1,"ts":1.5}"#, "invalid JSON"),
            (br#"{"sensor":"hr","value":1}"#, "no default `device`"),
            (b"{\"device\":\"w\x01\",\"sensor\":\"hr\",\"value\":1}", "invalid JSON"),
            (br#"{"device":"w\u0007","sensor":"hr","value":1}"#, "control characters"),
            (b"{\"device\":\"w\0\",\"sensor\":\"hr\",\"value\":1}", "invalid JSON"),
            (b"\0\0\0", "invalid JSON"),
            (&[0xff, 0xfe, 0x7b], "invalid JSON"),
            (br#"[1,2]"#, "invalid JSON"),
            (br#"{"ack":{"device":"w","seq":1}}"#, "invalid JSON"),
        ];
        for (line, want) in cases {
            let err = parse_jsonl(line, None, NOW).unwrap_err().to_string();
            assert!(err.contains(want), "{:?}: {err}", String::from_utf8_lossy(line));
        }
        let long = format!(r#"{{"device":"{}","sensor":"hr","value":1}}"#, "x".repeat(65));
        assert!(parse_jsonl(long.as_bytes(), None, NOW).unwrap_err().to_string().contains("longer than 64"));
        let ok64 = format!(r#"{{"device":"{}","sensor":"hr","value":1}}"#, "x".repeat(64));
        assert!(parse_jsonl(ok64.as_bytes(), None, NOW).is_ok());
    }

    #[test]
    fn ack_jsonl_round_trip() {
        let ack = Ack { device: "wrist-01".into(), seq: 17, boot: None };
        let line = encode_ack_jsonl(&ack);
        assert_eq!(line, b"{\"ack\":{\"device\":\"wrist-01\",\"seq\":17}}\n");
        assert_eq!(parse_ack_jsonl(&line[..line.len() - 1]).unwrap(), ack);
        assert!(parse_ack_jsonl(br#"{"sensor":"x"}"#).is_err());
    }

    #[test]
    fn frame_layout_matches_the_docs() {
        assert_eq!(frame::CRC.checksum(b"123456789"), 0xCBF4_3926);
        let f = Frame::Ack { device: "w1".try_into().unwrap(), seq: 300 };
        let body = postcard::to_allocvec(&f).unwrap();
        assert_eq!(body, [0x01, 0x02, b'w', b'1', 0xAC, 0x02]);
        assert_eq!(frame::CRC.checksum(&body), 0x3FA3_A42D);
        let mut out = [0u8; 64];
        let n = frame::encode(&f, &mut out).unwrap();
        assert_eq!(&out[..n], [0x0B, 0x01, 0x02, b'w', b'1', 0xAC, 0x02, 0x2D, 0xA4, 0xA3, 0x3F, 0x00]);
        assert_eq!(frame::decode(&mut out[..n - 1]).unwrap(), f);

        let r = Frame::Reading(WireReading {
            device: None,
            sensor: "t".try_into().unwrap(),
            seq: Some(1),
            ts: None,
            value: heapless::Vec::from_slice(&[1.0]).unwrap(),
        });
        let body = postcard::to_allocvec(&r).unwrap();
        let mut want = vec![0x00, 0x00, 0x01, b't', 0x01, 0x01, 0x00, 0x01];
        want.extend_from_slice(&1.0f64.to_le_bytes());
        assert_eq!(body, want);
    }

    /// The command frames as the module doc spells them, and both ways
    /// through the helpers the gateway and a device use.
    #[test]
    fn command_and_time_frames_match_the_docs_and_round_trip() {
        let t = postcard::to_allocvec(&Frame::Time { ms: 300 }).unwrap();
        assert_eq!(t, [0x06, 0xAC, 0x02]);
        let a = Frame::CommandAck {
            device: "w".try_into().unwrap(),
            id: "c".try_into().unwrap(),
            ok: true,
            result: "1".try_into().unwrap(),
        };
        assert_eq!(postcard::to_allocvec(&a).unwrap(), [0x05, 0x01, b'w', 0x01, b'c', 0x01, 0x01, b'1']);
        let c =
            DeviceCommand { id: "c-1".into(), device: "w1".into(), name: "alert".into(), args: "{\"level\":2}".into() };
        for framing in [Framing::Jsonl, Framing::Cobs] {
            let mut b = encode_command(framing, &c).unwrap();
            let n = b.len() - 1; // the delimiter
            assert_eq!(
                parse_from_gateway(framing, &mut b[..n]).unwrap(),
                FromGateway::Command(c.clone()),
                "{framing:?}"
            );
            let ack = CommandAck {
                device: "w1".into(),
                id: "c-1".into(),
                ok: false,
                result: Some(serde_json::json!({"why": "busy"})),
            };
            let mut b = encode_command_ack(framing, &ack).unwrap();
            let n = b.len() - 1;
            assert_eq!(
                parse_from_device(framing, &mut b[..n], None, 0).unwrap(),
                FromDevice::CommandAck(ack),
                "{framing:?}"
            );
            let mut b = encode_time(framing, 1_764_000_000_123);
            let n = b.len() - 1;
            assert_eq!(parse_from_gateway(framing, &mut b[..n]).unwrap(), FromGateway::Time(1_764_000_000_123));
        }
        let big = DeviceCommand { args: "x".repeat(300), ..c };
        assert!(matches!(encode_command(Framing::Cobs, &big), Err(WireError::TooLongForFrame { field: "args", .. })));
    }

    #[test]
    fn biggest_frame_fits_the_declared_bounds() {
        let id: heapless::String<64> = "x".repeat(64).as_str().try_into().unwrap();
        let f = Frame::ReadingBoot {
            boot: u32::MAX,
            reading: WireReading {
                device: Some(id.clone()),
                sensor: id,
                seq: Some(u64::MAX),
                ts: Some(u64::MAX),
                value: heapless::Vec::from_slice(&[f64::MAX; 16]).unwrap(),
            },
        };
        assert_eq!(postcard::to_allocvec(&f).unwrap().len(), 288, "the biggest reading");
        let s = |n: usize| -> heapless::String<64> { "x".repeat(n).as_str().try_into().unwrap() };
        let c = Frame::Command {
            id: s(64),
            device: s(64),
            name: s(64),
            args: "y".repeat(256).as_str().try_into().unwrap(),
        };
        assert_eq!(postcard::to_allocvec(&c).unwrap().len(), frame::MAX_BODY_LEN, "the biggest frame: a command");
        for f in [&f, &c] {
            let mut out = [0u8; frame::MAX_ENCODED_LEN];
            let n = frame::encode(f, &mut out).unwrap();
            assert!(n <= frame::MAX_ENCODED_LEN);
            assert_eq!(frame::decode(&mut out[..n - 1]).unwrap(), *f);
        }
        let mut small = [0u8; 100];
        assert_eq!(frame::encode(&f, &mut small), Err(frame::Error::BufferTooSmall));
    }

    #[test]
    fn cobs_round_trip() {
        for r in [
            reading(17, Value::Number(72.0)),
            reading(0, Value::Array(vec![0.0, -0.0, 1e-300])),
            reading(u64::MAX, Value::Array(vec![])),
        ] {
            let mut bytes = encode_reading_cobs(&r).unwrap();
            assert_eq!(bytes.pop(), Some(0));
            assert!(!bytes.contains(&0));
            assert_eq!(parse_cobs(&mut bytes, None, NOW).unwrap(), (r, true));
        }
        let ack = Ack { device: "wrist-01".into(), seq: 99, boot: None };
        let mut bytes = encode_ack_cobs(&ack).unwrap();
        bytes.pop();
        assert_eq!(parse_ack_cobs(&mut bytes.clone()).unwrap(), ack);
        assert!(matches!(parse_cobs(&mut bytes, None, NOW), Err(WireError::UnexpectedAck)));
    }

    #[test]
    fn cobs_frame_defaults() {
        let f = Frame::Reading(WireReading {
            device: None,
            sensor: "spo2".try_into().unwrap(),
            seq: None,
            ts: None,
            value: heapless::Vec::from_slice(&[97.0]).unwrap(),
        });
        let (r, from_dev) = reading_from_frame(f.clone(), Some("dock"), NOW).unwrap();
        assert_eq!((r.device.as_str(), r.ts, r.seq, from_dev), ("dock", NOW, None, false));
        assert!(matches!(reading_from_frame(f, None, NOW), Err(WireError::MissingDevice)));
    }

    #[test]
    fn cobs_malformed_kinds() {
        let good = {
            let mut b = encode_reading_cobs(&reading(5, Value::Number(1.0))).unwrap();
            b.pop();
            b
        };
        // Flip one bit anywhere but the COBS code bytes: the CRC must notice.
        let mut bad_crc = good.clone();
        bad_crc[5] ^= 0x10;
        assert!(matches!(parse_cobs(&mut bad_crc, None, NOW), Err(WireError::Frame(frame::Error::Crc { .. }))));
        // Truncated: the first COBS block claims more bytes than remain.
        let mut truncated = good[..good.len() / 2].to_vec();
        assert!(matches!(parse_cobs(&mut truncated, None, NOW), Err(WireError::Frame(frame::Error::Cobs))));
        // An embedded NUL: never produced by a correct encoder.
        let mut nul = good.clone();
        nul[3] = 0;
        assert!(matches!(parse_cobs(&mut nul, None, NOW), Err(WireError::Frame(frame::Error::Cobs))));
        let mut short = vec![0x03, 0x01, 0x02];
        assert!(matches!(parse_cobs(&mut short, None, NOW), Err(WireError::Frame(frame::Error::TooShort { .. }))));
        let mut long = vec![0x01; MAX_FRAME_LEN + 1];
        assert!(matches!(parse_cobs(&mut long, None, NOW), Err(WireError::Frame(frame::Error::TooLong { .. }))));
        // A valid frame with extra body bytes before the CRC.
        let mut raw = postcard::to_allocvec(&Frame::Ack { device: "w".try_into().unwrap(), seq: 1 }).unwrap();
        raw.push(7);
        raw.extend_from_slice(&frame::CRC.checksum(&raw).to_le_bytes());
        let mut enc = cobs::encode_vec(&raw);
        assert!(matches!(
            parse_cobs(&mut enc, None, NOW),
            Err(WireError::Frame(frame::Error::TrailingBytes { extra: 1 }))
        ));
        // Valid CRC over a body that is not a Frame (variant 9).
        let mut raw = vec![9u8, 1, 2];
        raw.extend_from_slice(&frame::CRC.checksum(&raw).to_le_bytes());
        let mut enc = cobs::encode_vec(&raw);
        assert!(matches!(parse_cobs(&mut enc, None, NOW), Err(WireError::Frame(frame::Error::Postcard(_)))));
        // Empty sensor passes postcard but not our id rules.
        let f = Frame::Reading(WireReading {
            device: Some("w".try_into().unwrap()),
            sensor: heapless::String::new(),
            seq: None,
            ts: None,
            value: heapless::Vec::new(),
        });
        assert!(matches!(reading_from_frame(f, None, NOW), Err(WireError::BadId { field: "sensor", .. })));
        // Encoding refuses what the frame cannot carry.
        assert!(matches!(
            encode_reading_cobs(&reading(1, Value::Array(vec![0.0; 17]))),
            Err(WireError::TooManyValues(17))
        ));
        assert!(encode_ack_cobs(&Ack { device: "d".repeat(65), seq: 1, boot: None }).is_err());
    }

    #[test]
    fn random_bytes_never_panic_and_rarely_pass() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut accepted = 0;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 64) as usize;
            let mut buf: Vec<u8> = (0..len)
                .map(|i| {
                    let b = (x >> ((i % 8) * 8)) as u8 ^ (i as u8).wrapping_mul(31);
                    if b == 0 { 1 } else { b }
                })
                .collect();
            let _ = parse_jsonl(&buf, Some("d"), NOW);
            if parse_cobs(&mut buf, Some("d"), NOW).is_ok() {
                accepted += 1;
            }
        }
        assert_eq!(accepted, 0, "random bytes passed a CRC-32 check");
    }

    #[test]
    fn splitter_across_chunk_boundaries() {
        let data = b"{\"a\":1}\r\n\n\r\n{\"b\":2}\n{\"c\"";
        // Every possible single cut gives the same frames.
        for cut in 0..=data.len() {
            let got = split_all(Framing::Jsonl, &[&data[..cut], &data[cut..], b":3}\n"]);
            let want: Vec<Result<Vec<u8>, String>> =
                vec![Ok(b"{\"a\":1}".to_vec()), Ok(b"{\"b\":2}".to_vec()), Ok(b"{\"c\":3}".to_vec())];
            assert_eq!(got, want, "cut at {cut}");
        }
        // Byte by byte.
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(split_all(Framing::Jsonl, &bytes).len(), 2);
    }

    #[test]
    fn splitter_cobs_keeps_cr_and_skips_empty_frames() {
        let got = split_all(Framing::Cobs, &[b"\0\0ab\r", b"\0\0c\n\0"]);
        assert_eq!(got, vec![Ok(b"ab\r".to_vec()), Ok(b"c\n".to_vec())]);
    }

    #[test]
    fn splitter_overlong_frame_is_reported_once_and_not_buffered() {
        let mut s = FrameSplitter::new(Framing::Jsonl);
        let mut errors = 0;
        let mut frames = Vec::new();
        let mut feed = |s: &mut FrameSplitter, chunk: &[u8]| {
            s.feed(chunk, |f| match f {
                Ok(b) => frames.push(b.to_vec()),
                Err(_) => errors += 1,
            });
        };
        feed(&mut s, b"ok1\n");
        for _ in 0..100 {
            feed(&mut s, &[b'x'; 1000]);
            assert!(s.pending() <= MAX_FRAME_LEN);
        }
        feed(&mut s, b"tail\nok2\n");
        // Exactly at the limit is still accepted.
        let mut exact = vec![b'y'; MAX_FRAME_LEN];
        exact.push(b'\n');
        feed(&mut s, &exact);
        let mut over = vec![b'z'; MAX_FRAME_LEN + 1];
        over.push(b'\n');
        feed(&mut s, &over);
        feed(&mut s, b"ok3\n");
        assert_eq!(errors, 2);
        assert_eq!(frames.len(), 4);
        assert_eq!(frames[0], b"ok1");
        assert_eq!(frames[1], b"ok2");
        assert_eq!(frames[2].len(), MAX_FRAME_LEN);
        assert_eq!(frames[3], b"ok3");
    }

    #[test]
    fn splitter_reset_drops_partial_frame() {
        let mut s = FrameSplitter::new(Framing::Jsonl);
        let mut got = Vec::new();
        s.feed(b"half-a-li", |f| got.push(f.unwrap().to_vec()));
        s.reset();
        s.feed(b"whole\n", |f| got.push(f.unwrap().to_vec()));
        assert_eq!(got, vec![b"whole".to_vec()]);
    }

    #[test]
    fn cobs_stream_through_splitter() {
        let mut stream = Vec::new();
        for i in 0..50 {
            stream.extend(encode_reading_cobs(&reading(i, Value::Array(vec![i as f64; 3]))).unwrap());
        }
        stream.extend_from_slice(&[0x05, 0x01, 0x00]); // truncated garbage frame
        let mut s = FrameSplitter::new(Framing::Cobs);
        let (mut ok, mut bad) = (0, 0);
        for chunk in stream.chunks(7) {
            s.feed(chunk, |f| match parse_cobs(f.unwrap(), None, NOW) {
                Ok((r, _)) => {
                    assert_eq!(r.seq, Some(ok));
                    ok += 1
                }
                Err(_) => bad += 1,
            });
        }
        assert_eq!((ok, bad), (50, 1));
    }
}
