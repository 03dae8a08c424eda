//! The durable half of QoS 2: which batches the broker has PUBREC'd.
//!
//! A sender that has sent PUBREL must never send that PUBLISH again (the
//! broker forgets the packet id at PUBREL, so a re-sent PUBLISH would be a
//! new message: a duplicate). After a restart the uplink must therefore
//! know, for every batch not yet acked in the queue, whether it got as far
//! as PUBREC. This file answers that: one 13-byte record per PUBREC,
//! `[b'R'][batch id u64 LE][crc32 u32 LE]`, appended and fdatasynced
//! *before* the PUBRELs go out (many PUBRECs share one fdatasync).
//!
//! Nothing is written before a PUBLISH: the packet id is a pure function of
//! the batch id ([`packet_id`]), so "which id did batch N use" needs no disk.
//!
//! Entries are dropped once the queue's ack of their batch is durable
//! (until then a restart re-sends PUBREL for them, which the broker answers
//! with PUBCOMP whether it still knows the id or not). The file is rewritten
//! (temp + rename) when it grows past [`COMPACT_AT`], and truncated when the
//! broker reports a lost session, because a PUBREL for a batch the broker
//! no longer holds would be answered with PUBCOMP and the batch lost.

use crate::queue::{CRC, replace_file, sync_dir};
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

const REC: usize = 13;
const COMPACT_AT: u64 = 64 * 1024;

/// Packet ids 1..=65534 come from batch ids; 65535 is kept for the status
/// message. With fewer than 65,534 batches in flight no two batches in
/// flight share an id.
pub const STATUS_PID: u16 = 65535;
pub fn packet_id(batch: u64) -> u16 {
    (batch % 65534) as u16 + 1
}

pub struct PubrecLog {
    path: PathBuf,
    file: File,
    ids: BTreeSet<u64>,
    bytes: u64,
    pub fsyncs: u64,
}

impl PubrecLog {
    /// Load the log in `dir`, keeping entries above `acked_through` (the
    /// queue's durable head); a torn or corrupt tail is ignored.
    pub fn open(dir: &Path, acked_through: u64) -> io::Result<PubrecLog> {
        let path = dir.join("uplink.pubrec");
        let mut ids = BTreeSet::new();
        let mut valid = 0u64;
        let mut on_disk = 0u64;
        match File::open(&path) {
            Ok(mut f) => {
                let mut buf = Vec::new();
                f.read_to_end(&mut buf)?;
                on_disk = buf.len() as u64;
                for r in buf.chunks_exact(REC) {
                    if r[0] != b'R' || CRC.checksum(&r[..9]) != u32::from_le_bytes(r[9..].try_into().unwrap()) {
                        break;
                    }
                    valid += REC as u64;
                    let id = u64::from_le_bytes(r[1..9].try_into().unwrap());
                    if id > acked_through {
                        ids.insert(id);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut log = PubrecLog {
            file: OpenOptions::new().create(true).append(true).open(&path)?,
            path,
            ids,
            bytes: valid,
            fsyncs: 0,
        };
        if on_disk == 0 {
            sync_dir(dir, &mut log.fsyncs)?;
        } else if valid != on_disk || log.ids.len() as u64 * REC as u64 != valid {
            log.rewrite()?;
        }
        Ok(log)
    }

    pub fn contains(&self, id: u64) -> bool {
        self.ids.contains(&id)
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Make "PUBREC seen" durable for `ids`: one write, one fdatasync.
    pub fn record(&mut self, ids: &[u64]) -> io::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let buf = encode(ids.iter().copied());
        self.file.write_all(&buf)?;
        crate::crashpoint::hit("before-pubrec-sync");
        self.file.sync_data()?;
        self.fsyncs += 1;
        self.bytes += buf.len() as u64;
        self.ids.extend(ids);
        Ok(())
    }

    /// The queue's ack of every batch <= `durable_head` is on disk: their
    /// entries are no longer needed. Rewrites the file when it is big.
    pub fn forget_through(&mut self, durable_head: u64) -> io::Result<()> {
        self.ids = self.ids.split_off(&(durable_head + 1));
        if self.bytes >= COMPACT_AT && (self.ids.len() * REC) as u64 <= self.bytes / 2 {
            self.rewrite()?;
        }
        Ok(())
    }

    /// The broker lost the session: no PUBREC it sent still counts.
    pub fn clear(&mut self) -> io::Result<()> {
        self.ids.clear();
        self.file.set_len(0)?;
        self.file.sync_data()?;
        self.fsyncs += 1;
        self.bytes = 0;
        Ok(())
    }

    fn rewrite(&mut self) -> io::Result<()> {
        let buf = encode(self.ids.iter().copied());
        let tmp = self.path.with_extension("pubrec.tmp");
        drop(replace_file(&tmp, &self.path, &buf, &mut self.fsyncs)?);
        if let Some(dir) = self.path.parent() {
            sync_dir(dir, &mut self.fsyncs)?;
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.bytes = buf.len() as u64;
        Ok(())
    }
}

/// `[b'R'][id u64 LE][crc32 u32 LE]` per id.
fn encode(ids: impl ExactSizeIterator<Item = u64>) -> Vec<u8> {
    let mut buf = Vec::with_capacity(ids.len() * REC);
    for id in ids {
        let at = buf.len();
        buf.push(b'R');
        buf.extend_from_slice(&id.to_le_bytes());
        let crc = CRC.checksum(&buf[at..]);
        buf.extend_from_slice(&crc.to_le_bytes());
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn entries_survive_reopen_and_acked_ones_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = PubrecLog::open(dir.path(), 0).unwrap();
        log.record(&[3, 4, 5]).unwrap();
        log.record(&[7]).unwrap();
        drop(log);
        let log = PubrecLog::open(dir.path(), 4).unwrap();
        assert!(!log.contains(3) && !log.contains(4) && log.contains(5) && log.contains(7));
        // The reopen rewrote the file down to the live entries.
        assert_eq!(fs::metadata(dir.path().join("uplink.pubrec")).unwrap().len(), 2 * REC as u64);
    }

    #[test]
    fn a_torn_tail_is_ignored_and_clear_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = PubrecLog::open(dir.path(), 0).unwrap();
        log.record(&[1, 2]).unwrap();
        drop(log);
        let p = dir.path().join("uplink.pubrec");
        let mut bytes = fs::read(&p).unwrap();
        bytes.extend_from_slice(&[b'R', 9, 9]); // torn
        fs::write(&p, &bytes).unwrap();
        let mut log = PubrecLog::open(dir.path(), 0).unwrap();
        assert!(log.contains(1) && log.contains(2) && log.len() == 2);
        log.record(&[3]).unwrap();
        drop(log);
        let mut log = PubrecLog::open(dir.path(), 0).unwrap();
        assert_eq!(log.len(), 3, "a record appended after the repaired tail is readable");
        log.clear().unwrap();
        drop(log);
        assert!(PubrecLog::open(dir.path(), 0).unwrap().is_empty());
    }

    #[test]
    fn compaction_keeps_live_entries() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = PubrecLog::open(dir.path(), 0).unwrap();
        let ids: Vec<u64> = (1..=6000).collect();
        for chunk in ids.chunks(100) {
            log.record(chunk).unwrap();
        }
        log.forget_through(5990).unwrap();
        assert!(fs::metadata(dir.path().join("uplink.pubrec")).unwrap().len() < 20 * REC as u64);
        log.record(&[6001]).unwrap();
        drop(log);
        let log = PubrecLog::open(dir.path(), 0).unwrap();
        assert_eq!(log.len(), 11);
        assert!(log.contains(5991) && log.contains(6001));
    }

    #[test]
    fn packet_ids_never_zero_and_never_the_status_id() {
        for b in [0, 1, 65533, 65534, 65535, u64::MAX] {
            let p = packet_id(b);
            assert!(p != 0 && p != STATUS_PID);
        }
        assert_ne!(packet_id(10), packet_id(11));
    }
}
