//! Deflated records: what the queue stores instead of a small record's
//! payload when that is shorter (see "Deflated records" in the module docs).
//!
//! ```text
//! [raw length u32 LE][raw DEFLATE stream (RFC 1951), level 1]
//! ```
//!
//! The record's CRC covers these bytes, so a torn or flipped record is found
//! as before; `inflate` failing on bytes whose CRC matched means a foreign
//! writer or a bug, and the record reads as corrupt.

use super::segment::MAX_LEN;

/// Level 1: at a site's pace a batch of ~40 readings (~1.7 KB of postcard)
/// shrinks ~2.7× (level 6: ~2.8×) at ~65 MB/s on this VM.
const LEVEL: u8 = 1;

/// `payload` deflated with its length in front, if that is shorter.
pub(crate) fn shrink(payload: &[u8]) -> Option<Vec<u8>> {
    let packed = miniz_oxide::deflate::compress_to_vec(payload, LEVEL);
    if 4 + packed.len() >= payload.len() {
        return None;
    }
    let mut out = Vec::with_capacity(4 + packed.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&packed);
    Some(out)
}

/// The payload `shrink` stored; `None` when the bytes do not inflate to
/// exactly the length they name.
pub(crate) fn inflate(stored: &[u8]) -> Option<Vec<u8>> {
    let (len, packed) = stored.split_first_chunk::<4>()?;
    let len = u32::from_le_bytes(*len) as usize;
    if len > MAX_LEN {
        return None;
    }
    let raw = miniz_oxide::inflate::decompress_to_vec_with_limit(packed, len).ok()?;
    (raw.len() == len).then_some(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let payload: Vec<u8> = (0..2000u32).flat_map(|i| (i % 50).to_le_bytes()).collect();
        let stored = shrink(&payload).expect("repetitive bytes shrink");
        assert!(stored.len() < payload.len() / 4, "{} of {}", stored.len(), payload.len());
        assert_eq!(inflate(&stored).unwrap(), payload);
        // Bytes that do not shrink are stored as they are.
        let noise: Vec<u8> = (0..64u64).map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8).collect();
        assert_eq!(shrink(&noise), None);
        // A wrong length, a cut stream, garbage: refused, never a short payload.
        let mut longer = stored.clone();
        longer[0..4].copy_from_slice(&(payload.len() as u32 + 1).to_le_bytes());
        assert_eq!(inflate(&longer), None);
        let mut shorter = stored.clone();
        shorter[0..4].copy_from_slice(&(payload.len() as u32 - 1).to_le_bytes());
        assert_eq!(inflate(&shorter), None);
        assert_eq!(inflate(&stored[..stored.len() / 2]), None);
        assert_eq!(inflate(&[1, 2]), None);
        let mut huge = stored.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(inflate(&huge), None);
    }
}
