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
//! "Batch N completed" (PUBCOMP, or PUBACK at QoS 1), `[b'C'][id][crc]`,
//! rides in this log's next write, the next PUBREC's (or, after 2 s
//! without one, a write of its own without fsync), not in a device write
//! per batch as large as the PUBREC's own. Until then it survives a SIGKILL
//! in `uplink.done` ([`DoneNotes`]), written through the page cache at
//! once; a power cut before it reached this log may lose it, which only
//! means the batch's PUBREL goes out again after the restart.
//!
//! Entries are dropped once the queue's ack of their batch is durable
//! (until then a restart re-sends PUBREL for them, which the broker answers
//! with PUBCOMP whether it still knows the id or not). The file is rewritten
//! (temp + rename) when it grows past `COMPACT_AT`, and truncated when the
//! broker reports a lost session, because a PUBREL for a batch the broker
//! no longer holds would be answered with PUBCOMP and the batch lost.

use crate::queue::{CRC, SectorFile, only_zeros, rewrite_durably, sync_dir};
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const REC: usize = 13;
const COMPACT_AT: u64 = 64 * 1024;
/// `uplink.done` starts with room for this many notes (16 KiB).
const DONE_SLOTS: u64 = 1260;
/// Completed notes wait this long for a PUBREC write to ride in.
pub const RIDE_MAX: Duration = Duration::from_secs(2);

/// Packet ids 1..=65534 come from batch ids; 65535 is kept for the status
/// message. With fewer than 65,534 batches in flight no two batches in
/// flight share an id.
pub const STATUS_PID: u16 = 65535;
pub fn packet_id(batch: u64) -> u16 {
    (batch % 65534) as u16 + 1
}

/// A write to one of the uplink's logs failed. `Write`: nothing is
/// recorded (a partial write was cut off again), the caller may retry
/// later. `Sync`: fdatasync failed, so what is on disk is unknown; like the
/// queue, the gateway exits (status 75) and trusts only what it reads back
/// at the next start.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("write failed: {0}")]
    Write(io::Error),
    #[error("fdatasync failed: {0}")]
    Sync(io::Error),
}

/// Why [`PubrecLog::open`] started from an empty log although the file had
/// entries or named a broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reset {
    /// The log was written for another broker URL or client id.
    OtherBroker { was: String, entries: usize },
    /// A log without a broker record (written by an older version) that
    /// still had entries.
    Unknown { entries: usize },
}

pub struct PubrecLog {
    path: PathBuf,
    /// Appends write 512-byte blocks, not 4 KiB pages (see [`SectorFile`]).
    file: SectorFile,
    ids: BTreeSet<u64>,
    /// Batches whose PUBCOMP (or QoS 1 PUBACK) arrived while their queue ack
    /// may not be durable yet: they are delivered, whatever became of the
    /// broker's session, and must never be sent again.
    completed: BTreeSet<u64>,
    /// Completed batches not yet noted in this log, and since when.
    pending: Vec<u64>,
    pending_since: Option<Instant>,
    /// Where every completed note goes at once (see the module docs).
    done: DoneNotes,
    bytes: u64,
    /// `url client-id` of the broker session these entries belong to.
    identity: String,
    /// The file starts with `identity`: a session under it was established
    /// (CONNACK) since the log was last reset. Until then the uplink
    /// connects with Clean Start, so the broker drops any session it kept
    /// for us from an earlier time.
    confirmed: bool,
    pub fsyncs: u64,
    /// Tests: the next write stops after this many bytes with ENOSPC.
    #[cfg(test)]
    short_write: Option<usize>,
}

/// `[b'I'][len u16 LE][identity][crc32 u32 LE]`: the first record.
fn encode_identity(identity: &str) -> Vec<u8> {
    let id = &identity.as_bytes()[..identity.len().min(u16::MAX as usize)];
    let mut buf = vec![b'I'];
    buf.extend_from_slice(&(id.len() as u16).to_le_bytes());
    buf.extend_from_slice(id);
    let crc = CRC.checksum(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf
}

/// The identity record at the start of `buf`: (identity, its length).
fn decode_identity(buf: &[u8]) -> Option<(String, usize)> {
    if buf.first() != Some(&b'I') {
        return None;
    }
    let n = u16::from_le_bytes(buf.get(1..3)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(buf.get(3 + n..7 + n)?.try_into().ok()?);
    if CRC.checksum(&buf[..3 + n]) != crc {
        return None;
    }
    Some((String::from_utf8_lossy(&buf[3..3 + n]).into_owned(), 7 + n))
}

impl PubrecLog {
    /// Load the log in `dir` for the broker session `identity` (broker URL
    /// and client id), keeping entries above `acked_through` (the queue's
    /// durable head); a torn or corrupt tail is ignored. A log written for
    /// another identity (or by an older version, without one) is emptied,
    /// durably, and the reason returned: its PUBRECs came from another
    /// broker, and a PUBREL for them here would be answered with PUBCOMP
    /// for a message this broker never had.
    pub fn open(dir: &Path, acked_through: u64, identity: &str) -> io::Result<(PubrecLog, Option<Reset>)> {
        let path = dir.join("uplink.pubrec");
        let mut ids = BTreeSet::new();
        let mut completed = BTreeSet::new();
        let mut valid = 0u64;
        let mut on_disk = 0u64;
        let mut found = None;
        let mut entries = 0;
        match File::open(&path) {
            Ok(mut f) => {
                let mut buf = Vec::new();
                f.read_to_end(&mut buf)?;
                on_disk = buf.len() as u64;
                let mut at = 0;
                if let Some((id, n)) = decode_identity(&buf) {
                    found = Some(id);
                    at = n;
                }
                valid = at as u64;
                for r in buf[at..].chunks_exact(REC) {
                    let Some((kind, id)) = decode_kind(r).filter(|(k, _)| matches!(k, b'R' | b'C')) else {
                        break;
                    };
                    valid += REC as u64;
                    if id <= acked_through {
                        continue;
                    }
                    if kind == b'R' {
                        entries += 1;
                        ids.insert(id);
                    } else {
                        completed.insert(id);
                    }
                }
                if only_zeros(&buf[valid as usize..]) {
                    // The zero padding of a direct append: not a torn tail.
                    on_disk = valid;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let confirmed = found.as_deref() == Some(identity);
        let reset = match found {
            _ if confirmed => None,
            Some(was) => Some(Reset::OtherBroker { was, entries: ids.len() }),
            None if entries > 0 => Some(Reset::Unknown { entries: ids.len() }),
            None => None,
        };
        if !confirmed {
            ids.clear();
        }
        // Notes a SIGKILL left only in `uplink.done` make `completed` larger
        // than this log's entries: the rewrite below writes them here.
        let done = DoneNotes::open(dir, acked_through, &mut completed)?;
        let mut log = PubrecLog {
            file: SectorFile::open(&path, valid)?,
            path,
            ids,
            completed,
            pending: Vec::new(),
            pending_since: None,
            done,
            bytes: valid,
            identity: identity.to_string(),
            confirmed,
            fsyncs: 0,
            #[cfg(test)]
            short_write: None,
        };
        if on_disk == 0 {
            sync_dir(dir, &mut log.fsyncs)?;
        } else if !confirmed {
            // No PUBREC entries and no identity until a clean session
            // confirms one (completed batches stay completed).
            log.rewrite()?;
        } else if valid != on_disk || log.entry_bytes() + identity_len(identity) != valid {
            log.rewrite()?;
        }
        Ok((log, reset))
    }

    /// A session under this log's identity was established since the log
    /// was reset (see [`PubrecLog::confirm`]).
    pub fn confirmed(&self) -> bool {
        self.confirmed
    }

    /// The broker accepted a Clean Start session: from now on the log's
    /// entries belong to it. Empties the log and writes the identity,
    /// durably (before any PUBLISH of the session goes out).
    pub fn confirm(&mut self) -> io::Result<()> {
        self.ids.clear();
        self.confirmed = true;
        self.rewrite()
    }

    pub fn contains(&self, id: u64) -> bool {
        self.ids.contains(&id)
    }

    /// Batch `id` was completed upstream (PUBCOMP/PUBACK) by an earlier
    /// run whose queue ack did not become durable.
    pub fn is_completed(&self, id: u64) -> bool {
        self.completed.contains(&id)
    }

    /// PUBREC entries above `id` (batches beyond the uplink's window) that
    /// were not completed.
    pub fn count_above(&self, id: u64) -> usize {
        self.ids.range(id + 1..).filter(|i| !self.completed.contains(i)).count()
    }

    /// Note that `ids` were completed upstream: in `uplink.done` now,
    /// through the page cache (no device write of its own), and in this log
    /// with its next write ([`PubrecLog::record`], or
    /// [`PubrecLog::flush_completed`]). A note lost in a power cut only means
    /// the batch's PUBREL may go out again (as before it was noted); a failed
    /// write to `uplink.done` is ignored for the same reason.
    pub fn record_completed(&mut self, ids: &[u64]) {
        if ids.is_empty() || !self.confirmed {
            return;
        }
        self.completed.extend(ids);
        self.pending.extend(ids);
        self.pending_since.get_or_insert_with(Instant::now);
        if let Err(e) = self.done.append(ids, &self.completed) {
            tracing::debug!("uplink.done: cannot note completed batches: {e}");
        }
    }

    /// Write completed notes that waited at least `min_age` for a PUBREC to
    /// ride with, on their own (no fsync, as they never had one). A failed
    /// write is cut off; they wait another `min_age` (the uplink's loop
    /// wakes for them, and must not spin on a full disk).
    pub fn flush_completed(&mut self, min_age: Duration) {
        if self.pending_since.is_none_or(|t| t.elapsed() < min_age) {
            return;
        }
        let buf = encode_kind(b'C', self.pending.iter().copied());
        if let Err(e) = self.write(&buf) {
            tracing::debug!("uplink.pubrec: cannot note completed batches: {e}");
            let _ = self.file.truncate(self.bytes);
            self.pending_since = Some(Instant::now());
            return;
        }
        self.bytes += buf.len() as u64;
        self.pending.clear();
        self.pending_since = None;
    }

    /// Since when completed notes wait for their write to this log.
    pub fn pending_since(&self) -> Option<Instant> {
        self.pending_since
    }

    fn entry_bytes(&self) -> u64 {
        ((self.ids.len() + self.completed.len()) * REC) as u64
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Make "PUBREC seen" durable for `ids`: one write, one fdatasync. The
    /// completed notes waiting for it go in the same write.
    pub fn record(&mut self, ids: &[u64]) -> Result<(), WriteError> {
        if ids.is_empty() {
            return Ok(());
        }
        debug_assert!(self.confirmed, "PUBRECs before the session was confirmed");
        let mut buf = encode_kind(b'C', self.pending.iter().copied());
        buf.extend(encode(ids.iter().copied()));
        if let Err(e) = self.write(&buf) {
            // Cut a partial record off: the next append must start on a
            // record boundary, or every entry after it would be unreadable.
            if let Err(t) = self.file.truncate(self.bytes) {
                return Err(WriteError::Sync(io::Error::other(format!("{e}; and cutting it off failed: {t}"))));
            }
            return Err(WriteError::Write(e));
        }
        // A power cut: what this write carries is lost, and so may be
        // every note in `uplink.done` (the page cache's).
        crate::crashpoint::hit_losing("before-pubrec-sync", || {
            vec![(self.path.clone(), self.bytes), (self.done.path.clone(), 0)]
        });
        if crate::crashpoint::fail("pubrec-sync") {
            return Err(WriteError::Sync(io::Error::other("injected fdatasync failure (EDGE_GATEWAY_FAIL_AT)")));
        }
        self.file.sync_data().map_err(WriteError::Sync)?;
        self.fsyncs += 1;
        self.bytes += buf.len() as u64;
        self.ids.extend(ids);
        self.pending.clear();
        self.pending_since = None;
        Ok(())
    }

    /// The queue's ack of every batch <= `durable_head` is on disk: their
    /// entries are no longer needed. Rewrites the file when it is big.
    pub fn forget_through(&mut self, durable_head: u64) -> io::Result<()> {
        self.ids = self.ids.split_off(&(durable_head + 1));
        self.completed = self.completed.split_off(&(durable_head + 1));
        // A note under the durable ack is needed nowhere.
        self.pending.retain(|id| *id > durable_head);
        if self.pending.is_empty() {
            self.pending_since = None;
        }
        if self.bytes >= COMPACT_AT && self.entry_bytes() <= self.bytes / 2 {
            self.rewrite()?;
        }
        Ok(())
    }

    /// The broker lost the session: no PUBREC it sent still counts
    /// (completed batches stay completed).
    pub fn clear(&mut self) -> Result<(), WriteError> {
        self.ids.clear();
        if !self.completed.is_empty() {
            return self.rewrite().map_err(WriteError::Sync);
        }
        let keep = if self.confirmed { identity_len(&self.identity) } else { 0 };
        self.file.truncate(keep).map_err(WriteError::Write)?;
        self.file.sync_data().map_err(WriteError::Sync)?;
        self.fsyncs += 1;
        self.bytes = keep;
        Ok(())
    }

    fn rewrite(&mut self) -> io::Result<()> {
        let mut buf = if self.confirmed { encode_identity(&self.identity) } else { Vec::new() };
        buf.extend(encode(self.ids.iter().copied()));
        buf.extend(encode_kind(b'C', self.completed.iter().copied()));
        drop(rewrite_durably(&self.path, "pubrec.tmp", &buf, &mut self.fsyncs)?);
        self.file = SectorFile::open(&self.path, buf.len() as u64)?;
        self.bytes = buf.len() as u64;
        self.pending.clear();
        self.pending_since = None;
        Ok(())
    }
}

impl PubrecLog {
    #[cfg(not(test))]
    fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.append(buf)
    }

    #[cfg(test)]
    fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        match self.short_write {
            Some(n) if n < buf.len() => {
                self.file.append(&buf[..n])?;
                Err(io::Error::from_raw_os_error(28)) // ENOSPC
            }
            _ => self.file.append(buf),
        }
    }
}

/// `uplink.done`: "batch N completed upstream" notes, `[b'C'][id u64
/// LE][crc32 u32 LE]` in 13-byte slots from the start, zeros in free slots:
/// what keeps a note until the PUBREC log has it through a SIGKILL.
///
/// Every valid note in the file is true (the batch was delivered), wherever
/// it sits, so the reader takes all of them (those above the queue's durable
/// head count) and a torn note is skipped. Notes are written through the
/// page cache into a file of fixed size: no fsync, and no change of size,
/// hence no journal commit, while it runs. When the next notes do not fit,
/// the live set (notes above the durable head) is written from the start
/// and the rest of the file zeroed; the file doubles when the live set
/// would fill more than half of it.
struct DoneNotes {
    path: PathBuf,
    file: File,
    /// Offset of the next note.
    at: u64,
    /// The file's size, a whole number of slots.
    cap: u64,
}

impl DoneNotes {
    /// Read the notes in `dir` above `acked_through` into `live` (which may
    /// hold notes from the PUBREC log already) and rewrite the file with
    /// exactly those.
    fn open(dir: &Path, acked_through: u64, live: &mut BTreeSet<u64>) -> io::Result<DoneNotes> {
        let named = |e: io::Error| io::Error::new(e.kind(), format!("uplink.done: {e}"));
        let path = dir.join("uplink.done");
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(named)?;
        let mut buf = Vec::new();
        (&file).read_to_end(&mut buf).map_err(named)?;
        for r in buf.chunks_exact(REC) {
            if let Some((b'C', id)) = decode_kind(r)
                && id > acked_through
            {
                live.insert(id);
            }
        }
        let mut done = DoneNotes { path, file, at: 0, cap: buf.len() as u64 / REC as u64 * REC as u64 };
        done.rewrite(live).map_err(named)?;
        if buf.len() as u64 > done.cap {
            done.file.set_len(done.cap).map_err(named)?; // a torn slot at the end
        }
        Ok(done)
    }

    /// Note `ids`; `live` is every note above the durable head, `ids` included.
    fn append(&mut self, ids: &[u64], live: &BTreeSet<u64>) -> io::Result<()> {
        let buf = encode_kind(b'C', ids.iter().copied());
        if self.at + buf.len() as u64 > self.cap {
            return self.rewrite(live);
        }
        self.file.write_all_at(&buf, self.at)?;
        self.at += buf.len() as u64;
        Ok(())
    }

    /// `live` from the start, zeros after it, growing the file if `live`
    /// would fill more than half of it.
    fn rewrite(&mut self, live: &BTreeSet<u64>) -> io::Result<()> {
        let mut buf = encode_kind(b'C', live.iter().copied());
        let notes = buf.len() as u64;
        let mut cap = self.cap.max(DONE_SLOTS * REC as u64);
        while notes * 2 > cap {
            cap *= 2;
        }
        buf.resize(cap as usize, 0);
        // A failed write leaves old notes (true ones) and some new ones; the
        // next append tries the whole rewrite again.
        self.at = cap;
        self.file.write_all_at(&buf, 0)?;
        self.cap = cap;
        self.at = notes;
        Ok(())
    }
}

fn identity_len(identity: &str) -> u64 {
    encode_identity(identity).len() as u64
}

/// `[b'R'][id u64 LE][crc32 u32 LE]` per id.
fn encode(ids: impl ExactSizeIterator<Item = u64>) -> Vec<u8> {
    encode_kind(b'R', ids)
}

/// One record of [`encode_kind`]: its kind and id, if its CRC holds.
fn decode_kind(r: &[u8]) -> Option<(u8, u64)> {
    let crc = u32::from_le_bytes(r.get(9..REC)?.try_into().ok()?);
    (CRC.checksum(&r[..9]) == crc).then(|| (r[0], u64::from_le_bytes(r[1..9].try_into().unwrap())))
}

/// `[kind][id u64 LE][crc32 u32 LE]` per id: `R` = PUBREC seen, `C` = completed.
fn encode_kind(kind: u8, ids: impl ExactSizeIterator<Item = u64>) -> Vec<u8> {
    let mut buf = Vec::with_capacity(ids.len() * REC);
    for id in ids {
        let at = buf.len();
        buf.push(kind);
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

    const A: &str = "mqtts://a.example:8883 gw-1";
    const B: &str = "mqtts://b.example:8883 gw-1";

    /// Open for `A`, confirming a fresh log as a Clean Start CONNACK would.
    fn open(dir: &Path, acked: u64) -> PubrecLog {
        let (mut log, _) = PubrecLog::open(dir, acked, A).unwrap();
        if !log.confirmed() {
            log.confirm().unwrap();
        }
        log
    }

    #[test]
    fn entries_survive_reopen_and_acked_ones_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 0);
        log.record(&[3, 4, 5]).unwrap();
        log.record(&[7]).unwrap();
        drop(log);
        let log = open(dir.path(), 4);
        assert!(!log.contains(3) && !log.contains(4) && log.contains(5) && log.contains(7));
        // The reopen rewrote the file down to the identity and the live entries.
        assert_eq!(fs::metadata(dir.path().join("uplink.pubrec")).unwrap().len(), identity_len(A) + 2 * REC as u64);
    }

    #[test]
    fn a_torn_tail_is_ignored_and_clear_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 0);
        log.record(&[1, 2]).unwrap();
        drop(log);
        let p = dir.path().join("uplink.pubrec");
        let mut bytes = fs::read(&p).unwrap();
        bytes.extend_from_slice(&[b'R', 9, 9]); // torn
        fs::write(&p, &bytes).unwrap();
        let mut log = open(dir.path(), 0);
        assert!(log.contains(1) && log.contains(2) && log.len() == 2);
        log.record(&[3]).unwrap();
        drop(log);
        let mut log = open(dir.path(), 0);
        assert_eq!(log.len(), 3, "a record appended after the repaired tail is readable");
        log.clear().unwrap();
        drop(log);
        let (log, reset) = PubrecLog::open(dir.path(), 0, A).unwrap();
        assert!(log.is_empty() && log.confirmed() && reset.is_none(), "clear keeps the identity");
    }

    #[test]
    fn compaction_keeps_live_entries() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 0);
        let ids: Vec<u64> = (1..=6000).collect();
        for chunk in ids.chunks(100) {
            log.record(chunk).unwrap();
        }
        log.forget_through(5990).unwrap();
        assert!(fs::metadata(dir.path().join("uplink.pubrec")).unwrap().len() < 20 * REC as u64 + identity_len(A));
        log.record(&[6001]).unwrap();
        drop(log);
        let log = open(dir.path(), 0);
        assert_eq!(log.len(), 11);
        assert!(log.contains(5991) && log.contains(6001));
    }

    #[test]
    fn a_log_from_another_broker_or_client_id_starts_clean_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 0);
        log.record(&[5, 6]).unwrap();
        drop(log);
        // Same URL, same client id: kept.
        let (log, reset) = PubrecLog::open(dir.path(), 0, A).unwrap();
        assert!(log.confirmed() && reset.is_none() && log.len() == 2);
        drop(log);
        // Another broker: emptied, not confirmed (Clean Start next), and durably so.
        let (log, reset) = PubrecLog::open(dir.path(), 0, B).unwrap();
        assert_eq!(reset, Some(Reset::OtherBroker { was: A.into(), entries: 2 }));
        assert!(!log.confirmed() && log.is_empty());
        drop(log);
        // Back to A before B was ever confirmed: nothing of A's is left either.
        let (log, reset) = PubrecLog::open(dir.path(), 0, A).unwrap();
        assert!(log.is_empty() && !log.confirmed() && reset.is_none(), "{reset:?}");
    }

    #[test]
    fn a_log_without_identity_with_entries_is_reset() {
        let dir = tempfile::tempdir().unwrap();
        // What the previous version wrote: bare `R` records.
        fs::write(dir.path().join("uplink.pubrec"), encode([8u64, 9].into_iter())).unwrap();
        let (log, reset) = PubrecLog::open(dir.path(), 0, A).unwrap();
        assert_eq!(reset, Some(Reset::Unknown { entries: 2 }));
        assert!(log.is_empty() && !log.confirmed());
    }

    #[test]
    fn a_failed_write_is_cut_off_so_later_records_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 0);
        log.record(&[1]).unwrap();
        log.short_write = Some(7); // ENOSPC after 7 bytes
        assert!(matches!(log.record(&[2, 3]), Err(WriteError::Write(_))));
        assert!(!log.contains(2), "not recorded");
        log.short_write = None;
        log.record(&[4]).unwrap();
        drop(log);
        let log = open(dir.path(), 0);
        assert!(log.contains(1) && log.contains(4) && !log.contains(2) && log.len() == 2);
    }

    /// Zeros after the last record (a direct append pads its 512-byte block
    /// with them; written by hand here, whatever the file system) end the
    /// log: the entries stand and the file is not rewritten (same inode).
    #[test]
    fn zeros_after_the_last_record_end_the_log_without_a_rewrite() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("uplink.pubrec");
        let mut log = open(dir.path(), 0);
        log.record(&[1, 2]).unwrap();
        log.record_completed(&[1]);
        log.flush_completed(Duration::ZERO);
        drop(log);
        let valid = identity_len(A) + 3 * REC as u64;
        let mut bytes = fs::read(&p).unwrap();
        bytes.truncate(valid as usize);
        bytes.resize(1024, 0);
        fs::write(&p, &bytes).unwrap();
        let ino = fs::metadata(&p).unwrap().ino();
        let mut log = open(dir.path(), 0);
        assert!(log.contains(1) && log.contains(2) && log.is_completed(1) && log.len() == 2);
        assert_eq!(fs::metadata(&p).unwrap().ino(), ino, "not rewritten");
        log.record(&[3]).unwrap();
        drop(log);
        let log = open(dir.path(), 0);
        assert!(log.contains(3) && log.len() == 3 && log.is_completed(1));
    }

    #[test]
    fn completed_batches_survive_reopen_a_lost_session_and_a_broker_change() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 0);
        log.record(&[3, 4, 5]).unwrap();
        log.record_completed(&[3, 4]);
        drop(log);
        let mut log = open(dir.path(), 0);
        assert!(log.is_completed(3) && log.is_completed(4) && !log.is_completed(5));
        log.clear().unwrap(); // the broker lost the session
        drop(log);
        let (log, _) = PubrecLog::open(dir.path(), 3, B).unwrap();
        assert!(log.is_empty() && !log.is_completed(3) && log.is_completed(4), "acked ones are forgotten");
    }

    /// The `C` records in `uplink.pubrec`.
    fn c_records_in_the_log(dir: &Path) -> usize {
        let bytes = fs::read(dir.join("uplink.pubrec")).unwrap();
        let at = decode_identity(&bytes).map_or(0, |(_, n)| n);
        bytes[at..].chunks_exact(REC).filter(|r| r[0] == b'C').count()
    }

    /// A completed note is in `uplink.done` at once (through the page cache)
    /// and rides in the PUBREC log's next write: after a SIGKILL before that
    /// write, the next start has it and writes it to the log.
    #[test]
    fn completed_notes_ride_in_the_next_pubrec_write_and_survive_a_sigkill_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 0);
        log.record(&[1, 2, 3]).unwrap();
        let (bytes, fsyncs) = (log.bytes, log.fsyncs);
        log.record_completed(&[1]);
        log.record_completed(&[2]);
        assert_eq!((log.bytes, log.fsyncs), (bytes, fsyncs), "nothing written to the log yet");
        log.record(&[4]).unwrap();
        assert_eq!((log.bytes, log.fsyncs), (bytes + 3 * REC as u64, fsyncs + 1), "one write, one fdatasync");
        assert_eq!(c_records_in_the_log(dir.path()), 2);
        log.record_completed(&[3]);
        drop(log); // as a SIGKILL would: no flush
        assert_eq!(c_records_in_the_log(dir.path()), 2);
        let log = open(dir.path(), 1);
        assert!(!log.is_completed(1) && log.is_completed(2) && log.is_completed(3) && log.contains(4));
        assert_eq!(c_records_in_the_log(dir.path()), 2, "2 and 3 (1 is acked): rewritten at the start");
    }

    /// The point of it: on a disk with direct I/O, a PUBREC and the
    /// previous batch's completed note cost one block, not two.
    #[test]
    fn a_pubrec_and_the_completed_note_before_it_cost_one_block() {
        let dir = crate::queue::disk_dir();
        let mut log = open(dir.path(), 0);
        let block = log.file.block().unwrap_or_else(|| {
            panic!("direct I/O unavailable in {}: needs ext4/xfs/btrfs on Linux >= 6.1", dir.path().display())
        });
        log.record(&[1]).unwrap(); // grows the file (zeros ahead)
        let before = crate::queue::write_bytes();
        for id in 1..=20 {
            log.record_completed(&[id]);
            log.record(&[id + 1]).unwrap();
        }
        let wrote = crate::queue::write_bytes() - before;
        // Two writes each would be 40 blocks; allow a page more for ext4.
        assert!(wrote <= 20 * block + 4096, "{wrote} bytes for 20 PUBRECs with a completed note each (block {block})");
        drop(log);
        let log = open(dir.path(), 0);
        assert!((1..=20).all(|id| log.is_completed(id)) && log.contains(21));
    }

    /// Notes with no PUBREC to ride in go out on their own once they waited
    /// `min_age`; notes the durable ack covers are not written at all.
    #[test]
    fn completed_notes_without_a_pubrec_are_flushed_and_acked_ones_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 0);
        log.record(&[5, 6, 7]).unwrap();
        let (bytes, fsyncs) = (log.bytes, log.fsyncs);
        log.record_completed(&[5]);
        log.forget_through(5).unwrap();
        assert!(log.pending_since().is_none());
        log.flush_completed(Duration::ZERO);
        assert_eq!(log.bytes, bytes, "5 is acked durably: no note needed");
        log.record_completed(&[6]);
        log.flush_completed(RIDE_MAX);
        assert_eq!(log.bytes, bytes, "too young");
        // A failed write (a full disk): the notes wait again, from now.
        let since = log.pending_since().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        log.short_write = Some(3);
        log.flush_completed(Duration::ZERO);
        log.short_write = None;
        assert_eq!(log.bytes, bytes);
        assert!(log.pending_since().unwrap() > since, "retried no sooner than min_age later");
        log.flush_completed(Duration::ZERO);
        assert_eq!((log.bytes, log.fsyncs), (bytes + REC as u64, fsyncs), "written, no fdatasync");
        log.record(&[8]).unwrap();
        assert_eq!(c_records_in_the_log(dir.path()), 1, "not written twice");
    }

    /// Many notes while the durable head follows 300 batches behind: the
    /// file wraps (the live notes written again from its start) and keeps
    /// its size; a reopen has exactly the live notes.
    #[test]
    fn the_done_file_wraps_in_place_and_keeps_every_live_note() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("uplink.done");
        let mut log = open(dir.path(), 0);
        let cap = fs::metadata(&p).unwrap().len();
        assert_eq!(cap, DONE_SLOTS * REC as u64);
        for round in 1..=100u64 {
            let ids: Vec<u64> = (round * 100 - 99..=round * 100).collect();
            log.record_completed(&ids);
            log.forget_through((round * 100).saturating_sub(300)).unwrap();
        }
        assert_eq!(fs::metadata(&p).unwrap().len(), cap, "wrapped in place");
        drop(log);
        let log = open(dir.path(), 9700);
        assert!((9701..=10_000).all(|id| log.is_completed(id)));
        assert_eq!(log.completed.len(), 300);
        // More live notes than half the file: it grows.
        let mut log = log;
        let ids: Vec<u64> = (10_001..=11_000).collect();
        log.record_completed(&ids);
        assert!(fs::metadata(&p).unwrap().len() >= 2 * 1300 * REC as u64);
        drop(log);
        let log = open(dir.path(), 9700);
        assert_eq!(log.completed.len(), 1300);
    }

    /// A torn or garbled note in `uplink.done` is skipped, the others stand.
    #[test]
    fn a_garbled_note_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 0);
        log.record(&[1, 2]).unwrap();
        log.record_completed(&[5, 6, 7]);
        drop(log);
        let p = dir.path().join("uplink.done");
        let mut bytes = fs::read(&p).unwrap();
        bytes[REC + 4] ^= 0xff; // note 6
        bytes.truncate(bytes.len() - 5); // and a torn slot at the end
        fs::write(&p, &bytes).unwrap();
        let log = open(dir.path(), 0);
        assert!(log.is_completed(5) && !log.is_completed(6) && log.is_completed(7));
        assert_eq!(fs::metadata(&p).unwrap().len() % REC as u64, 0);
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
