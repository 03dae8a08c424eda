//! Binary frames for the `cobs` framing: `no_std`, allocation-free, so
//! firmware written in Rust can use this module as is.
//!
//! # Layout (for implementing it in C)
//!
//! On the wire each frame is
//!
//! ```text
//! COBS( body ‖ crc32_le(body) ) 0x00
//! ```
//!
//! * `body` is the [postcard](https://postcard.jamesmunns.com/wire-format)
//!   encoding of [`Frame`] (below).
//! * `crc32` is CRC-32/ISO-HDLC (the zlib/Ethernet CRC: reflected poly
//!   0xEDB88320, init 0xFFFFFFFF, xorout 0xFFFFFFFF; `"123456789"` →
//!   0xCBF43926) over `body`, appended as 4 bytes little-endian.
//! * COBS (consistent overhead byte stuffing) removes every 0x00 from
//!   `body ‖ crc`, so the single 0x00 after it delimits frames. A receiver
//!   that lost sync simply waits for the next 0x00.
//! * Between two 0x00 there are at most [`MAX_FRAME_LEN`] bytes.
//!
//! Postcard primitives used by `body`:
//!
//! ```text
//! varint(n)  unsigned LEB128: 7 bits per byte, least significant group
//!            first, high bit set on every byte but the last
//!            (0 → 00, 17 → 11, 300 → AC 02). u64 fields are varints too.
//! str        varint(byte length) then the UTF-8 bytes (no terminator)
//! option(x)  00 (None) | 01 x (Some)
//! f64        8 bytes, IEEE-754 binary64, little-endian
//! seq(x)     varint(count) then each element
//! enum       varint(variant index) then the variant's fields in order
//! ```
//!
//! The [`Frame`] enum:
//!
//! ```text
//! Frame::Reading = varint(0)
//!                  option(str)  device    (None → the port's default device)
//!                  str          sensor    (1..=64 bytes)
//!                  option(u64)  seq
//!                  option(u64)  ts        (unix ms; None → receive time)
//!                  seq(f64)     value     (1..=16 elements; 1 = a single number)
//! Frame::Ack     = varint(1)
//!                  str          device
//!                  u64          seq       (cumulative: all seq <= this are durable)
//! Frame::ReadingBoot = varint(2)
//!                  u32          boot      (the device's boot counter)
//!                  ...          the fields of Frame::Reading, in the same order
//! Frame::AckBoot = varint(3)
//!                  str          device
//!                  u32          boot      (covers readings of this boot only)
//!                  u64          seq
//! Frame::Command = varint(4)           (gateway → device, see docs/commands.md)
//!                  str          id        (1..=64 bytes)
//!                  str          device
//!                  str          name
//!                  str          args      (JSON text, <= 256 bytes; "{}" when none)
//! Frame::CommandAck = varint(5)        (device → gateway)
//!                  str          device
//!                  str          id
//!                  bool         ok        (00 false, 01 true)
//!                  str          result    (JSON text, <= 256 bytes; "" when none)
//! Frame::Time    = varint(6)           (gateway → device, at connect and hourly)
//!                  u64          ms        (unix milliseconds)
//! ```
//!
//! A device that sends `ReadingBoot` gets `AckBoot`; one that sends
//! `Reading` gets `Ack`, as before boot ids existed. A device ignores a
//! `Command` or `Time` it does not handle; it answers each `Command` with a
//! `CommandAck` (and acts on each `id` once: the gateway resends a command
//! until it hears the answer).
//!
//! Example: `Ack { device: "w1", seq: 300 }` has body `01 02 77 31 AC 02`,
//! CRC-32 `0x3FA3A42D`, i.e. `01 02 77 31 AC 02 2D A4 A3 3F` before COBS;
//! that holds no 0x00, so COBS only prepends the block length and the wire
//! carries `0B 01 02 77 31 AC 02 2D A4 A3 3F 00` (checked by the unit
//! test `frame_layout_matches_the_docs`).

use serde::{Deserialize, Serialize};

pub use super::MAX_FRAME_LEN;

/// Longest id a frame can carry (bytes).
pub const MAX_ID: usize = 64;
/// Most numbers in one `value`.
pub const MAX_VALUES: usize = 16;
/// Longest JSON text of a command's `args` or an answer's `result`.
pub const MAX_JSON: usize = 256;
/// Longest possible `body`: a Reading with every field at its maximum, or
/// a Command (the larger).
pub const MAX_BODY_LEN: usize = max(
    1 + 5 + (1 + 1 + MAX_ID) + (1 + MAX_ID) + (1 + 10) + (1 + 10) + (1 + 8 * MAX_VALUES),
    1 + 3 * (1 + MAX_ID) + (2 + MAX_JSON),
);

const fn max(a: usize, b: usize) -> usize {
    if a > b { a } else { b }
}
/// Longest possible encoded frame, trailing 0x00 included: a buffer this
/// big always suffices for [`encode`].
pub const MAX_ENCODED_LEN: usize = cobs_max_len(MAX_BODY_LEN + 4) + 1;

/// CRC-32/ISO-HDLC, the frame checksum.
pub static CRC: crc::Crc<u32, crc::Table<16>> = crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISO_HDLC);

const fn cobs_max_len(n: usize) -> usize {
    n + n / 254 + 1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireReading {
    pub device: Option<heapless::String<MAX_ID>>,
    pub sensor: heapless::String<MAX_ID>,
    pub seq: Option<u64>,
    pub ts: Option<u64>,
    /// One element is a single number; more are an array.
    pub value: heapless::Vec<f64, MAX_VALUES>,
}

// Boxing the big variant would need `alloc`; a frame is short-lived and
// usually lives on the stack, so the size difference is fine.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    Reading(WireReading),
    Ack {
        device: heapless::String<MAX_ID>,
        seq: u64,
    },
    ReadingBoot {
        boot: u32,
        reading: WireReading,
    },
    AckBoot {
        device: heapless::String<MAX_ID>,
        boot: u32,
        seq: u64,
    },
    Command {
        id: heapless::String<MAX_ID>,
        device: heapless::String<MAX_ID>,
        name: heapless::String<MAX_ID>,
        args: heapless::String<MAX_JSON>,
    },
    CommandAck {
        device: heapless::String<MAX_ID>,
        id: heapless::String<MAX_ID>,
        ok: bool,
        result: heapless::String<MAX_JSON>,
    },
    Time {
        ms: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The output buffer cannot hold the encoded frame.
    BufferTooSmall,
    /// More than [`MAX_FRAME_LEN`] bytes between delimiters.
    TooLong { len: usize },
    /// Not valid COBS (a 0x00 inside, or a block running past the end).
    Cobs,
    /// Decoded frame shorter than its 4-byte CRC plus a 1-byte body.
    TooShort { len: usize },
    /// Checksum mismatch: a corrupted or truncated frame.
    Crc { expected: u32, actual: u32 },
    /// The body is not a valid postcard `Frame`.
    Postcard(postcard::Error),
    /// A valid `Frame` followed by extra bytes before the CRC.
    TrailingBytes { extra: usize },
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::BufferTooSmall => write!(f, "output buffer too small for the frame"),
            Error::TooLong { len } => write!(f, "frame of {len} bytes exceeds the {MAX_FRAME_LEN}-byte limit"),
            Error::Cobs => write!(f, "invalid COBS encoding"),
            Error::TooShort { len } => write!(f, "frame of {len} decoded bytes is too short for body + CRC"),
            Error::Crc { expected, actual } => {
                write!(f, "CRC mismatch: frame says {expected:#010x}, body has {actual:#010x}")
            }
            Error::Postcard(e) => write!(f, "invalid frame body: {e}"),
            Error::TrailingBytes { extra } => write!(f, "{extra} unexpected bytes after the frame body"),
        }
    }
}

impl core::error::Error for Error {}

/// Encode `frame` into `out`; returns the bytes written, including the
/// trailing 0x00 delimiter.
pub fn encode(frame: &Frame, out: &mut [u8]) -> Result<usize, Error> {
    // Body and CRC are assembled in a bounded stack buffer because COBS
    // cannot encode in place.
    let mut raw = [0u8; MAX_BODY_LEN + 4];
    let body_len = postcard::to_slice(frame, &mut raw[..MAX_BODY_LEN]).map_err(|_| Error::BufferTooSmall)?.len();
    let crc = CRC.checksum(&raw[..body_len]);
    raw[body_len..body_len + 4].copy_from_slice(&crc.to_le_bytes());
    let n = cobs::try_encode(&raw[..body_len + 4], out).map_err(|_| Error::BufferTooSmall)?;
    let delim = out.get_mut(n).ok_or(Error::BufferTooSmall)?;
    *delim = 0;
    Ok(n + 1)
}

/// Decode one frame: `buf` holds the COBS bytes between two delimiters
/// (delimiter excluded) and is overwritten by the decoded bytes.
pub fn decode(buf: &mut [u8]) -> Result<Frame, Error> {
    if buf.len() > MAX_FRAME_LEN {
        return Err(Error::TooLong { len: buf.len() });
    }
    // The cobs crate stops silently at a 0x00; here it can only mean the
    // caller split the stream wrongly or the bytes are garbage.
    if buf.contains(&0) {
        return Err(Error::Cobs);
    }
    let len = cobs::decode_in_place(buf).map_err(|_| Error::Cobs)?;
    if len < 5 {
        return Err(Error::TooShort { len });
    }
    let (body, crc) = buf[..len].split_at(len - 4);
    let expected = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let actual = CRC.checksum(body);
    if expected != actual {
        return Err(Error::Crc { expected, actual });
    }
    let (frame, rest) = postcard::take_from_bytes::<Frame>(body).map_err(Error::Postcard)?;
    if !rest.is_empty() {
        return Err(Error::TrailingBytes { extra: rest.len() });
    }
    Ok(frame)
}
