//! Record framing inside segment files: encoding, validation and the
//! start-up scan that separates valid records from torn or corrupt bytes.
//!
//! Pure functions over byte slices, so the tricky part (what counts as a
//! record, how to resynchronise after garbage) is testable without files.

use crc::{CRC_32_ISO_HDLC, Crc, Table};

/// Marks the start of a record. Non-zero, so the zero-filled blocks a file
/// system may leave after a power cut never look like a record; 0xE9B7 is
/// neither ASCII nor a common UTF-8 pair, so JSON payloads rarely contain it
/// and the resync scan seldom has to compute a CRC for nothing.
pub(crate) const MAGIC: u16 = 0xE9B7;
/// Marks padding: `[PAD_MAGIC u16][len u32][crc32 u32][len zero bytes]`,
/// written by a commit to end the segment on a 4 KiB page boundary (see the
/// module docs of `queue`). It holds no record and owns no id.
pub(crate) const PAD_MAGIC: u16 = 0xE9B8;
/// The page size padding aligns to, and the longest pad.
pub(crate) const PAGE: u64 = 4096;
/// `magic u16 + len u32 + crc u32`.
pub(crate) const FRAME_BYTES: usize = 2 + 4 + 4;
/// `id u64 + created_ms u64 + readings u32`: the CRC-covered fields before the payload.
pub(crate) const META_BYTES: usize = 8 + 8 + 4;
/// Everything a record costs besides its payload.
pub(crate) const OVERHEAD: usize = FRAME_BYTES + META_BYTES;
/// A length field above this is treated as garbage, so a flipped high bit in
/// `len` cannot make the scanner swallow the rest of a segment in one step.
pub(crate) const MAX_LEN: usize = 64 << 20;

/// Slice-by-16 tables (16 KiB, in a static so no use copies them): several
/// times faster than the byte table over a batch (issue 18); same checksums.
pub(crate) static CRC: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_ISO_HDLC);

/// Where a valid record sits in its segment, plus its metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecInfo {
    pub offset: u64,
    /// Whole record including the frame.
    pub total: u32,
    pub id: u64,
    pub readings: u32,
    pub created_ms: u64,
}

/// Serialise one record (frame + meta + payload) into a fresh buffer, so it
/// reaches the file in a single write(2).
pub(crate) fn encode(id: u64, readings: u32, created_ms: u64, payload: &[u8]) -> Vec<u8> {
    let len = META_BYTES + payload.len();
    let mut buf = Vec::with_capacity(FRAME_BYTES + len);
    buf.extend_from_slice(&MAGIC.to_le_bytes());
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]); // crc, filled in below
    buf.extend_from_slice(&id.to_le_bytes());
    buf.extend_from_slice(&created_ms.to_le_bytes());
    buf.extend_from_slice(&readings.to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = CRC.checksum(&buf[FRAME_BYTES..]);
    buf[6..10].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// A pad of exactly `total` bytes (`FRAME_BYTES..=PAGE`).
pub(crate) fn encode_pad(total: usize) -> Vec<u8> {
    assert!((FRAME_BYTES..=PAGE as usize).contains(&total), "pad of {total} bytes");
    let mut buf = vec![0; total];
    buf[0..2].copy_from_slice(&PAD_MAGIC.to_le_bytes());
    buf[2..6].copy_from_slice(&((total - FRAME_BYTES) as u32).to_le_bytes());
    let crc = CRC.checksum(&buf[FRAME_BYTES..]);
    buf[6..10].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// The length of the valid pad starting at `buf[pos..]`, if there is one:
/// magic, a length that fits and is at most a page, zeros, matching CRC.
pub(crate) fn pad_at(buf: &[u8], pos: usize) -> Option<usize> {
    let rest = buf.len().checked_sub(pos)?;
    if rest < FRAME_BYTES || u16_at(buf, pos) != PAD_MAGIC {
        return None;
    }
    let len = u32_at(buf, pos + 2) as usize;
    if len > PAGE as usize - FRAME_BYTES || len > rest - FRAME_BYTES {
        return None;
    }
    let body = &buf[pos + FRAME_BYTES..pos + FRAME_BYTES + len];
    (body.iter().all(|&b| b == 0) && CRC.checksum(body) == u32_at(buf, pos + 6)).then_some(FRAME_BYTES + len)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Parse the record starting at `buf[pos..]` if, and only if, it is entirely
/// valid: magic, plausible length that fits in the buffer, matching CRC and
/// an id greater than `after_id` (ids are strictly increasing, which also
/// rejects stale records a resync might otherwise pick up).
pub(crate) fn parse_at(buf: &[u8], pos: usize, after_id: u64) -> Option<RecInfo> {
    let rest = buf.len().checked_sub(pos)?;
    if rest < OVERHEAD || u16_at(buf, pos) != MAGIC {
        return None;
    }
    let len = u32_at(buf, pos + 2) as usize;
    if !(META_BYTES..=MAX_LEN).contains(&len) || len > rest - FRAME_BYTES {
        return None;
    }
    let body = &buf[pos + FRAME_BYTES..pos + FRAME_BYTES + len];
    if CRC.checksum(body) != u32_at(buf, pos + 6) {
        return None;
    }
    let id = u64_at(body, 0);
    if id <= after_id {
        return None;
    }
    Some(RecInfo {
        offset: pos as u64,
        total: (FRAME_BYTES + len) as u32,
        id,
        created_ms: u64_at(body, 8),
        readings: u32_at(body, 16),
    })
}

/// Where the bytes from `tail` (the end of a segment's valid records) on
/// stop looking like damage: `tail` itself if only zeros follow (written
/// ahead, or an append whose data never reached the disk), else the first
/// offset where a pad or a record from an earlier use of a reused file
/// starts (its id below `first_id`, the segment's own first). Bytes before
/// it are damage (a torn write, or the rest of an old record the new ones
/// ended in); `None`: damage to the end.
pub(crate) fn old_from(buf: &[u8], tail: usize, first_id: u64) -> Option<usize> {
    if super::only_zeros(&buf[tail..]) {
        return Some(tail);
    }
    (tail..buf.len()).find(|&q| pad_at(buf, q).is_some() || parse_at(buf, q, 0).is_some_and(|r| r.id < first_id))
}

/// Check a record read back from disk (by the index) and return its payload.
/// `None` means the bytes changed since start-up (bit rot, or a foreign writer).
pub(crate) fn payload_of(rec: &[u8], id: u64) -> Option<&[u8]> {
    let info = parse_at(rec, 0, id.saturating_sub(1))?;
    (info.id == id && info.total as usize == rec.len()).then(|| &rec[OVERHEAD..])
}

/// What the start-up scan found in one segment.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// Valid records in order.
    pub records: Vec<RecInfo>,
    /// Garbage regions *followed by* a valid record: real corruption.
    pub corrupt_regions: u64,
    /// Start of trailing bytes that contain no valid record: a torn tail in
    /// the last segment, corruption anywhere else.
    pub tail_start: Option<u64>,
}

/// Walk a segment record by record, stepping over pads. On an invalid record, slide forward one
/// byte at a time until a whole valid record parses (magic + length + CRC +
/// increasing id) and carry on from there, so one flipped byte costs exactly
/// the record it hit and never the intact records behind it.
pub(crate) fn scan(buf: &[u8], after_id: u64) -> Scan {
    let mut out = Scan::default();
    let mut last = after_id;
    let mut pos = 0;
    while pos < buf.len() {
        if let Some(r) = parse_at(buf, pos, last) {
            last = r.id;
            pos += r.total as usize;
            out.records.push(r);
            continue;
        }
        if let Some(n) = pad_at(buf, pos) {
            pos += n;
            continue;
        }
        match (pos + 1..buf.len()).find(|&q| parse_at(buf, q, last).is_some()) {
            Some(q) => {
                out.corrupt_regions += 1;
                pos = q;
            }
            None => {
                out.tail_start = Some(pos as u64);
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Vec<u8> {
        let mut b = encode(1, 3, 10, b"first");
        b.extend(encode(2, 4, 20, b"second record"));
        b.extend(encode(3, 5, 30, b"third"));
        b
    }

    #[test]
    fn roundtrip_and_clean_scan() {
        let b = three();
        let s = scan(&b, 0);
        assert_eq!(s.records.len(), 3);
        assert_eq!(s.corrupt_regions, 0);
        assert_eq!(s.tail_start, None);
        let r = s.records[1];
        assert_eq!((r.id, r.readings, r.created_ms), (2, 4, 20));
        let rec = &b[r.offset as usize..(r.offset + r.total as u64) as usize];
        assert_eq!(payload_of(rec, 2), Some(&b"second record"[..]));
        assert_eq!(payload_of(rec, 3), None);
    }

    #[test]
    fn every_single_byte_flip_costs_one_record() {
        let b = three();
        let second = scan(&b, 0).records[1];
        for i in second.offset..second.offset + second.total as u64 {
            let mut c = b.clone();
            c[i as usize] ^= 0x40;
            let s = scan(&c, 0);
            let ids: Vec<u64> = s.records.iter().map(|r| r.id).collect();
            assert_eq!(ids, vec![1, 3], "flip at {i}");
            assert_eq!(s.corrupt_regions, 1);
            assert_eq!(s.tail_start, None);
        }
    }

    #[test]
    fn torn_tail_and_zero_fill() {
        let b = three();
        let cut = b.len() - 3;
        let s = scan(&b[..cut], 0);
        assert_eq!(s.records.len(), 2);
        assert_eq!(s.tail_start, Some(s.records[1].offset + s.records[1].total as u64));
        let mut z = b.clone();
        z.extend([0u8; 100]);
        let s = scan(&z, 0);
        assert_eq!((s.records.len(), s.tail_start), (3, Some(b.len() as u64)));
    }

    #[test]
    fn pads_are_stepped_over_and_a_torn_pad_is_a_torn_tail() {
        let mut b = encode(1, 3, 10, b"first");
        let first = b.len();
        b.extend(encode_pad(PAGE as usize - first));
        b.extend(encode(2, 4, 20, b"second"));
        let s = scan(&b, 0);
        assert_eq!(s.records.iter().map(|r| (r.id, r.offset)).collect::<Vec<_>>(), vec![(1, 0), (2, PAGE)]);
        assert_eq!((s.corrupt_regions, s.tail_start), (0, None));
        // The smallest and the largest pad.
        for n in [FRAME_BYTES, PAGE as usize] {
            let mut c = encode(1, 3, 10, b"first");
            c.extend(encode_pad(n));
            let s = scan(&c, 0);
            assert_eq!((s.records.len(), s.corrupt_regions, s.tail_start), (1, 0, None), "pad of {n}");
        }
        // A pad cut off by a power cut is the torn tail, from where it starts.
        let cut = scan(&b[..first + 100], 0);
        assert_eq!((cut.records.len(), cut.tail_start), (1, Some(first as u64)));
        // A pad with a non-zero byte is not a pad: the bytes up to the next record are corrupt.
        let mut c = b.clone();
        c[first + 50] = 1;
        let s = scan(&c, 0);
        assert_eq!((s.records.len(), s.corrupt_regions), (2, 1));
    }

    #[test]
    fn ids_must_increase() {
        let b = three();
        let s = scan(&b, 2);
        assert_eq!(s.records.iter().map(|r| r.id).collect::<Vec<_>>(), vec![3]);
        assert_eq!(s.corrupt_regions, 1);
    }
}
