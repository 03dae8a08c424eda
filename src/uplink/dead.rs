//! The dead-letter store: batches the upstream broker refused for good.
//!
//! A batch the broker keeps refusing with a permanent reason code (0x87 not
//! authorized, 0x90 topic name invalid, 0x95 packet too large, 0x99 payload
//! format invalid, ...; see [`super::classify`]) would otherwise block every
//! later batch forever. After a few attempts the uplink moves it here and
//! only then acks it in the queue, so it is never silently lost:
//! `data_dir/uplink.dead` is append-only, one record per batch,
//!
//! ```text
//! [magic u16 = 0xDEAD][len u32][crc32 u32][queue id u64][readings u32]
//! [created_ms u64][dead_ms u64][reason code u8][reason len u16][reason][payload]
//! ```
//!
//! (little-endian; `len` counts the bytes after the crc, the crc covers
//! them). Each record is written with one write(2) and fdatasynced *before*
//! the batch leaves the queue; a torn tail is cut at open. The payload is the
//! batch exactly as it was queued, so `(gateway, batch)` stays the same when
//! `edge-gateway queue dead replay` puts it back into the queue.

use super::inflight::WriteError;
use crate::queue::{CRC, sync_dir};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: u16 = 0xDEAD;
const HEAD: usize = 10;
/// queue id + readings + created + dead + code + reason len.
const FIXED: usize = 8 + 4 + 8 + 8 + 1 + 2;

pub const FILE_NAME: &str = "uplink.dead";

/// One refused batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadBatch {
    pub queue_id: u64,
    pub readings: u32,
    pub created_ms: u64,
    /// When it was moved here (ms since the epoch).
    pub dead_ms: u64,
    /// The MQTT 5 reason code of the last refusal (0 when it never reached
    /// the broker, e.g. over its advertised Maximum Packet Size).
    pub reason_code: u8,
    pub reason: String,
    pub payload: Vec<u8>,
}

fn encode(b: &DeadBatch) -> Vec<u8> {
    let reason = &b.reason.as_bytes()[..b.reason.len().min(u16::MAX as usize)];
    let len = FIXED + reason.len() + b.payload.len();
    let mut out = Vec::with_capacity(HEAD + len);
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&b.queue_id.to_le_bytes());
    out.extend_from_slice(&b.readings.to_le_bytes());
    out.extend_from_slice(&b.created_ms.to_le_bytes());
    out.extend_from_slice(&b.dead_ms.to_le_bytes());
    out.push(b.reason_code);
    out.extend_from_slice(&(reason.len() as u16).to_le_bytes());
    out.extend_from_slice(reason);
    out.extend_from_slice(&b.payload);
    let crc = CRC.checksum(&out[HEAD..]);
    out[6..10].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The valid records at the start of `buf`, and how many bytes they take.
fn decode_all(buf: &[u8]) -> (Vec<DeadBatch>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() >= at + HEAD {
        let h = &buf[at..at + HEAD];
        if u16::from_le_bytes([h[0], h[1]]) != MAGIC {
            break;
        }
        let len = u32::from_le_bytes(h[2..6].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(h[6..10].try_into().unwrap());
        let Some(body) = buf.get(at + HEAD..at + HEAD + len) else { break };
        if len < FIXED || CRC.checksum(body) != crc {
            break;
        }
        let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().unwrap());
        let rlen = u16::from_le_bytes([body[29], body[30]]) as usize;
        if FIXED + rlen > len {
            break;
        }
        out.push(DeadBatch {
            queue_id: u64_at(0),
            readings: u32::from_le_bytes(body[8..12].try_into().unwrap()),
            created_ms: u64_at(12),
            dead_ms: u64_at(20),
            reason_code: body[28],
            reason: String::from_utf8_lossy(&body[FIXED..FIXED + rlen]).into_owned(),
            payload: body[FIXED + rlen..].to_vec(),
        });
        at += HEAD + len;
    }
    (out, at)
}

/// Read every valid record of `data_dir/uplink.dead` (none if it does not
/// exist). Read-only: safe while the gateway runs; a torn tail is ignored.
pub fn read(data_dir: &Path) -> io::Result<Vec<DeadBatch>> {
    match std::fs::read(data_dir.join(FILE_NAME)) {
        Ok(buf) => Ok(decode_all(&buf).0),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The writer side, owned by the uplink (or by `queue dead replay|drop`
/// while the gateway is stopped).
pub struct DeadStore {
    path: PathBuf,
    file: File,
    len: u64,
    batches: u64,
    pub fsyncs: u64,
}

impl DeadStore {
    /// Open for appending; cuts a torn tail (a crash mid-append).
    pub fn open(data_dir: &Path) -> io::Result<DeadStore> {
        let path = data_dir.join(FILE_NAME);
        let existed = path.exists();
        let mut file = OpenOptions::new().create(true).read(true).append(true).open(&path)?;
        let mut fsyncs = 0;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        let (recs, valid) = decode_all(&buf);
        if valid != buf.len() {
            tracing::warn!(
                "{}: cut {} bytes of a torn or corrupt tail ({} dead batches kept)",
                path.display(),
                buf.len() - valid,
                recs.len()
            );
            file.set_len(valid as u64)?;
            file.sync_data()?;
            fsyncs += 1;
        }
        if !existed {
            sync_dir(data_dir, &mut fsyncs)?;
        }
        Ok(DeadStore { path, file, len: valid as u64, batches: recs.len() as u64, fsyncs })
    }

    /// Batches in the store.
    pub fn batches(&self) -> u64 {
        self.batches
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one batch durably: one write, one fdatasync. A failed write is
    /// cut off again and returned (the caller keeps the batch in the queue);
    /// a failed fdatasync is [`WriteError::Sync`]: what reached the disk is
    /// unknown, the caller must not go on as if it were there.
    pub fn append(&mut self, b: &DeadBatch) -> Result<(), WriteError> {
        let buf = encode(b);
        if let Err(e) = self.file.write_all(&buf) {
            // A partial write must not stay in front of the next record.
            if let Err(t) = self.file.set_len(self.len) {
                return Err(WriteError::Sync(io::Error::other(format!("{e}; and cutting it off failed: {t}"))));
            }
            return Err(WriteError::Write(e));
        }
        self.file.sync_data().map_err(WriteError::Sync)?;
        self.fsyncs += 1;
        self.len += buf.len() as u64;
        self.batches += 1;
        Ok(())
    }

    /// Empty the store, durably.
    pub fn clear(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_data()?;
        self.fsyncs += 1;
        self.len = 0;
        self.batches = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(id: u64, payload: &[u8]) -> DeadBatch {
        DeadBatch {
            queue_id: id,
            readings: 3,
            created_ms: 1000 + id,
            dead_ms: 2000 + id,
            reason_code: 0x87,
            reason: "not authorized".into(),
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn records_survive_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DeadStore::open(dir.path()).unwrap();
        s.append(&batch(4, b"{\"a\":1}")).unwrap();
        s.append(&batch(9, &[0u8; 300])).unwrap();
        drop(s);
        let p = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&p).unwrap();
        let whole = bytes.len();
        bytes.extend_from_slice(&encode(&batch(11, b"torn"))[..15]);
        std::fs::write(&p, &bytes).unwrap();
        // A reader skips the torn tail; the writer cuts it.
        assert_eq!(read(dir.path()).unwrap(), vec![batch(4, b"{\"a\":1}"), batch(9, &[0u8; 300])]);
        let mut s = DeadStore::open(dir.path()).unwrap();
        assert_eq!(s.batches(), 2);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), whole as u64);
        s.append(&batch(12, b"x")).unwrap();
        assert_eq!(read(dir.path()).unwrap().len(), 3, "a record after the cut tail is readable");
        s.clear().unwrap();
        assert!(read(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn a_flipped_bit_ends_the_valid_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DeadStore::open(dir.path()).unwrap();
        s.append(&batch(1, b"one")).unwrap();
        s.append(&batch(2, b"two")).unwrap();
        drop(s);
        let p = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(read(dir.path()).unwrap(), vec![batch(1, b"one")]);
    }
}
