//! Segment index files (`<first id:020>.idx`): the index entries of a sealed
//! segment, so `open` can rebuild the in-memory index without reading the
//! segment's bytes.
//!
//! ```text
//! [magic u32 = 0x5849_5145][count u32][first id u64][segment length u64]
//! count × [id u64][offset u64][total u32][readings u32][created_ms u64]
//! [crc32 u32 over everything before it]
//! ```
//!
//! All integers little-endian; CRC-32/ISO-HDLC as for records. The file is
//! only an optimisation: anything wrong with it (missing, torn, CRC
//! mismatch, implausible entries, a first id or segment length that differs
//! from the `.seg` file's name or length) makes `open` fall back to scanning the segment.

use super::segment::{CRC, FRAME_BYTES, MAX_LEN, OVERHEAD, RecInfo};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

const MAGIC: u32 = 0x5849_5145;
const HEADER_BYTES: usize = 4 + 4 + 8 + 8;
const ENTRY_BYTES: usize = 8 + 8 + 4 + 4 + 8;
const CRC_BYTES: usize = 4;

/// `…/<first id>.seg` → `…/<first id>.idx`.
pub(crate) fn idx_path(seg_path: &Path) -> PathBuf {
    seg_path.with_extension("idx")
}

pub(crate) fn encode(first_id: u64, seg_len: u64, records: &[RecInfo]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_BYTES + records.len() * ENTRY_BYTES + CRC_BYTES);
    b.extend_from_slice(&MAGIC.to_le_bytes());
    b.extend_from_slice(&(records.len() as u32).to_le_bytes());
    b.extend_from_slice(&first_id.to_le_bytes());
    b.extend_from_slice(&seg_len.to_le_bytes());
    for r in records {
        b.extend_from_slice(&r.id.to_le_bytes());
        b.extend_from_slice(&r.offset.to_le_bytes());
        b.extend_from_slice(&r.total.to_le_bytes());
        b.extend_from_slice(&r.readings.to_le_bytes());
        b.extend_from_slice(&r.created_ms.to_le_bytes());
    }
    let crc = CRC.checksum(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The records of an index file, if and only if it is intact and describes
/// a segment of exactly `seg_len` bytes named `first_id` following a segment
/// whose last id is `after_id`: CRC, magic, exact size, at least one entry,
/// ids strictly increasing, >= `first_id` and > `after_id`, plausible record
/// sizes, records in order, not overlapping, inside the segment.
pub(crate) fn decode(b: &[u8], seg_len: u64, first_id: u64, after_id: u64) -> Option<Vec<RecInfo>> {
    if b.len() < HEADER_BYTES + CRC_BYTES {
        return None;
    }
    let body = &b[..b.len() - CRC_BYTES];
    if CRC.checksum(body) != u32_at(b, body.len()) || u32_at(b, 0) != MAGIC {
        return None;
    }
    let count = u32_at(b, 4) as usize;
    if count == 0
        || body.len() != HEADER_BYTES + count * ENTRY_BYTES
        || u64_at(b, 8) != first_id
        || u64_at(b, 16) != seg_len
    {
        return None;
    }
    let mut out = Vec::with_capacity(count);
    let (mut last_id, mut end) = (after_id.max(first_id.saturating_sub(1)), 0u64);
    for e in body[HEADER_BYTES..].chunks_exact(ENTRY_BYTES) {
        let r = RecInfo {
            id: u64_at(e, 0),
            offset: u64_at(e, 8),
            total: u32_at(e, 16),
            readings: u32_at(e, 20),
            created_ms: u64_at(e, 24),
        };
        let total = r.total as u64;
        if r.id <= last_id
            || !(OVERHEAD as u64..=(FRAME_BYTES + MAX_LEN) as u64).contains(&total)
            || r.offset < end
            || r.offset.checked_add(total)? > seg_len
        {
            return None;
        }
        last_id = r.id;
        end = r.offset + total;
        out.push(r);
    }
    Some(out)
}

/// Read and validate the index of the segment at `seg_path`. Missing,
/// unreadable or invalid: `None` (the caller scans the segment instead).
pub(crate) fn load(seg_path: &Path, seg_len: u64, first_id: u64, after_id: u64) -> Option<Vec<RecInfo>> {
    let p = idx_path(seg_path);
    let bytes = match fs::read(&p) {
        Ok(b) => b,
        Err(e) => {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(index = %p.display(), error = %e, "cannot read segment index; scanning the segment");
            }
            return None;
        }
    };
    let r = decode(&bytes, seg_len, first_id, after_id);
    if r.is_none() {
        tracing::info!(index = %p.display(), "segment index invalid or stale; scanning the segment");
    }
    r
}

/// Write the index of a sealed (fdatasync'ed) segment: temp file, fdatasync,
/// rename over `<first id>.idx`. The rename becomes durable with the next
/// fsync of `segments/`; until then a crash may lose it, which only costs a
/// scan. On error the temp file is removed (or left for `open` to clean up).
pub(crate) fn write(
    seg_path: &Path,
    first_id: u64,
    seg_len: u64,
    records: &[RecInfo],
    fsyncs: &mut u64,
) -> io::Result<()> {
    let p = idx_path(seg_path);
    let tmp = seg_path.with_extension("idx.tmp");
    let res = super::replace_file(&tmp, &p, &encode(first_id, seg_len, records), fsyncs).map(drop);
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Remove the index of a segment (absent is fine).
pub(crate) fn remove(seg_path: &Path) -> io::Result<()> {
    match fs::remove_file(idx_path(seg_path)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs() -> Vec<RecInfo> {
        vec![
            RecInfo { offset: 0, total: 40, id: 5, readings: 1, created_ms: 10 },
            RecInfo { offset: 40, total: 60, id: 6, readings: 2, created_ms: 20 },
            RecInfo { offset: 100, total: 31, id: 9, readings: 3, created_ms: 30 },
        ]
    }

    #[test]
    fn roundtrip_and_rejections() {
        let b = encode(5, 131, &recs());
        assert_eq!(decode(&b, 131, 5, 4), Some(recs()));
        assert_eq!(decode(&b, 132, 5, 4), None, "segment length differs");
        assert_eq!(decode(&b, 131, 5, 5), None, "ids must follow the previous segment");
        assert_eq!(decode(&b, 131, 4, 0), None, "first id differs");
        assert_eq!(decode(&encode(6, 131, &recs()), 131, 6, 0), None, "ids must be >= the segment's first id");
        for cut in 0..b.len() {
            assert_eq!(decode(&b[..cut], 131, 5, 4), None, "torn at {cut}");
        }
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x10;
            assert_eq!(decode(&c, 131, 5, 4), None, "flip at {i}");
        }
        let mut overlap = recs();
        overlap[1].offset = 39;
        assert_eq!(decode(&encode(5, 131, &overlap), 131, 5, 4), None);
        assert_eq!(decode(&encode(5, 131, &[]), 131, 5, 4), None);
    }
}
