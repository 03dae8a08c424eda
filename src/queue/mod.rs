//! The durable on-disk queue: append-only segment files plus a small ack
//! ledger (the Kafka / Vector disk-buffer shape).
//!
//! # Layout of `dir`
//!
//! ```text
//! dir/lock                          flock'ed by the one writer (Queue::open)
//! dir/ledger                        ack ledger, 20-byte entries (see ledger.rs)
//! dir/segments/<first id:020>.seg   records, appended in id order
//! dir/segments/<first id:020>.idx   index of a sealed segment (see seg_index.rs)
//! ```
//!
//! *Why segments:* the only writes are appends and whole-file deletes, which
//! is what SD cards tolerate (no small in-place rewrites). Zero-padded names
//! sort lexically in id order, so listing the directory is enough to order
//! them. A segment is rolled when it would exceed
//! `min(segment_bytes, max(max_bytes / 4, 4096))`, so even a small queue is
//! spread over a few files and space comes back in reasonable steps.
//!
//! # Record (all integers little-endian)
//!
//! ```text
//! [magic u16 = 0xE9B7][len u32][crc32 u32][id u64][created_ms u64][readings u32][payload]
//! ```
//!
//! * `len` counts the bytes after the crc field (20 + payload), so a reader
//!   knows where the next record starts without trusting anything else.
//! * `crc` is CRC-32/ISO-HDLC over those `len` bytes: a record is valid only
//!   if it matches, which is how a torn write or a flipped bit is detected.
//! * The magic is what the resync scan looks for after corruption; with the
//!   CRC and "ids strictly increase" a false match is practically impossible.
//! * `id`, `created_ms`, `readings` sit inside the CRC so the in-memory index
//!   can be rebuilt from the segments alone.
//! * `readings`: bit 31 ([`PRIORITY`]) marks a *priority* record (the rules'
//!   alarm lane), which the uplink may send ahead of older ones
//!   ([`Queue::priority_after`]); bits 24-30 are the record's *span* minus
//!   one: a record of span k owns ids `id ..= id + k - 1` (the uplink sends
//!   it as k messages, one per topic its rules route it to), and the next
//!   record's id is `id + k`; bit 23 ([`DEFLATED`]) says the payload is
//!   stored deflated (below); bits 0-22 count the readings. Records written
//!   before lanes and routes have the flags clear (span 1).
//!
//! # Pads
//!
//! ```text
//! [magic u16 = 0xE9B8][len u32][crc32 u32][len zero bytes]
//! ```
//!
//! A commit that made records durable ends the segment on a 4 KiB page
//! boundary with a pad (10 bytes up to a page; none when fewer than 10
//! are missing), so the next commit's records start on a fresh page: each
//! fdatasync writes only pages no earlier one wrote. Without it, every
//! commit at a site's pace rewrote the last, partly filled page of the one
//! before (~1.6 pages per ~2.5 KB commit instead of ~1). Pads are written only while
//! the backlog is small (live bytes at most an eighth of `max_bytes`: the
//! segment is acked and reclaimed soon, so its pads do not take space a
//! long outage needs) and when a segment may grow to at least
//! [`PAD_MIN_SEGMENT`]. A pad is no record: it owns no id, is not indexed,
//! and the scan steps over it; a torn pad is a torn tail like any other,
//! and a repaired segment is rewritten without its pads. A build before
//! pads reads a pad as a corrupt region: it counts it, repairs the segment
//! and loses no record.
//!
//! # Zeros ahead
//!
//! While pads are written, a small commit (under [`PREFILL_BELOW`] new
//! bytes) also makes sure the segment has zeros written ahead of its end:
//! when fewer than 16 KiB are left it writes the next 64 KiB of zeros, durable
//! with that commit. Later commits then overwrite blocks the file already
//! has, within its size, so their fdatasync changes no metadata: on a
//! journalling file system (ext4 on a Pi's SD card) that is one journal
//! commit per 64 KiB instead of one per commit, each several 4 KiB blocks,
//! more than the readings themselves at a site's pace. The cost is that each
//! segment byte is written twice (zeros, then records). Zeros after the last
//! record are the end of the segment, not damage: `open` cuts them off
//! without reporting a torn tail, and sealing a segment cuts them off too.
//!
//! # Reused segment files
//!
//! While the backlog is small, `reclaim` keeps up to [`SPARES_MAX`] acked
//! segment files (past the first, an eighth of `max_bytes` at most) instead
//! of deleting them: renamed to `segments/spare.tmp` (`spare.1.tmp`, ...),
//! and renamed again to the next segments' names by the next rolls. A reused
//! file has its size already, so its commits overwrite blocks within it like
//! zeros ahead do, without writing the zeros first (each segment byte is
//! written once, and the file grows no journal commit). Its old records stay
//! after the new ones until they are overwritten, and are never read as
//! records: every record of a segment has at least the id in the segment's
//! name, and the old ones have lower ids (they were acked before the file was kept).
//! After a crash, `open` cuts them off with the rest of the tail, and counts
//! as a torn tail only the bytes before the first old record, pad or
//! all-zero rest (`old_from` in segment.rs); at a clean shutdown the pipeline
//! cuts them off first ([`Queue::trim`]). Sealing cuts them off as it cuts
//! zeros. `open` deletes a kept file (a `.tmp`) a crash left. A build from
//! before reads a reused segment's old records as a torn tail or, if its
//! first new record never reached the disk, as the segment's records: all
//! acked, so nothing is sent twice.
//!
//! # Direct commits
//!
//! Through the page cache, every fdatasync writes whole 4 KiB pages: at a
//! site's pace a commit of ~2.5 KB of records cost a page and its pad
//! (1.7 bytes per byte). So while pads are written and the file system
//! offers direct I/O (`statx` reports the alignment: ext4 on a Pi's SD card,
//! not tmpfs), `append` *holds* its records in memory, and the commit writes
//! them with one `O_DIRECT` write in whole logical blocks (512 bytes on an
//! SD card): from a block boundary, padded to the next one (a pad of 10 to
//! 521 bytes, a block more when fewer than a pad's frame are missing), and
//! within the file's size (zeros ahead or a reused file: the write allocates
//! nothing and changes no metadata), then the fdatasync as before. No block
//! holding committed records is ever written again. Holding stops at
//! [`HOLD_MAX`] (16 KiB, the pad's room included) and where the file's size
//! ends: what is held is then written through the page cache and the rest of
//! the commit follows it there, as before (holding starts again only after
//! that commit's fdatasync: a direct write over a dirty page would make the
//! kernel write the page first, twice in one commit); so do a roll's sealing
//! commit and a commit whose pad was refused. Held records are read from memory until
//! their commit, and a dropped queue writes them to the file (through the
//! page cache), where uncommitted records always went. A crash (SIGKILL)
//! loses held records where the page cache used to keep them; they were not
//! committed, so no device was acked for them, and a device that waits for
//! acks sends them again. Readings that nobody acks (BLE, LAN QoS 0) could
//! be lost in that window before too: the batch they wait in is memory, and
//! a power cut takes the page cache with it. Where a direct write is refused
//! (`EINVAL`), commits go through the page cache from then on.
//!
//! # Deflated records
//!
//! A record that, as it is, would be held for a direct commit (at most
//! [`HOLD_MAX`] held, while commits are direct: a site's pace) is stored
//! deflated when that is shorter (`[store] compress`, on by default; see
//! `deflate.rs` for the bytes): the commit writes whole 512-byte blocks, and
//! a batch of ~40 readings (~1.7 KB of postcard) shrinks ~2.7×, usually a
//! block or two fewer per commit. Bit 23 of `readings` marks it; the CRC
//! covers the stored bytes; every read inflates, so readers (the uplink,
//! dedup's rebuild, `queue dead`, `queue dump`) see the payload that was
//! appended. `max_bytes` and eviction count what is stored. Under full
//! load nothing is held, so no CPU goes into deflating there. A build from before reads a
//! deflated record's bytes as its payload: do not downgrade with such
//! records in the queue.
//!
//! # Durability
//!
//! `append` writes each record with one write(2) and no fsync (or holds it
//! for a direct commit). `commit` is
//! the group commit: one fdatasync of the segment written since the last
//! commit, one fsync of `segments/` if a segment file was created (a new file
//! is only durable once its directory entry is), and a ledger entry + fsync
//! if the ack head moved. The pipeline's commits (`commit_paced`) write the
//! ledger at most once per [`LEDGER_EVERY`] (5 s): at a site's pace that is
//! one 4 KiB page rewritten every five seconds instead of one per commit. Rolling to a
//! new segment commits first, so only the newest segment ever holds
//! uncommitted bytes; that keeps recovery simple (a torn tail can only be
//! in the last segment) at the cost of one extra fsync per segment.
//!
//! Acks and DropOldest evictions both just move the *head* (`acked_through`);
//! the ledger records it at the next commit whose entry is due (or reclaim). Segment files are
//! deleted by `reclaim` only once every record in them is at or below a
//! head that is already durable in the ledger, so a record can never vanish
//! while the ledger could still say it is pending. Nor, acked or not, while
//! it is at or after [`Queue::keep_from`]: the pipeline rebuilds dedup from
//! the records of its window at start-up (`reclaim_space`, for a full disk,
//! frees them).
//!
//! # Segment index files
//!
//! When `append` rolls to a new segment, the previous one is *sealed*: the
//! roll has just fdatasync'ed it and nothing is ever appended to it again.
//! Its index entries (id, offset, length, readings, created_ms per record)
//! are then written to `<first id>.idx` together with the segment's first
//! id and byte length and a CRC-32 over all of it (temp file, fdatasync,
//! rename; the rename is made durable by the `segments/` fsync of the next
//! commit). An index is never updated in place; it is deleted with its
//! segment (reclaim, removal at open), before its segment is repaired or
//! truncated, and when its segment becomes the append target again (the
//! segment after it was empty or all torn and removed at open). Indexes
//! without a segment are deleted at open. Losing an index, at any point,
//! only costs a scan.
//!
//! # Start-up (`open`)
//!
//! Every segment except the last is loaded from its index if the index is
//! intact (CRC, plausible entries, ids above the previous segment's) and
//! names the same first id and byte length as the `.seg` file: those bytes
//! are not read at all, so start-up time is proportional to the number of
//! records plus the size of the last segment, not to bytes on disk. The
//! length check ties the index to the file's final state: appends, torn
//! tails and repairs all change the length of a sealed segment.
//!
//! The last segment, and any segment whose index is missing, torn, stale or
//! mismatched, is read and every record validated as before (a sealed
//! segment read this way is indexed afterwards):
//! * invalid bytes at the end of the *last* segment with nothing valid after
//!   them are the normal torn tail of a power cut: truncated (`truncated_bytes`);
//! * invalid bytes followed by a valid record, or at the end of an older
//!   segment, are corruption: skipped by sliding forward byte by byte to the
//!   next fully valid record, counted once per region (`corrupt_records`), and
//!   the segment is rewritten without them (temp file, fsync, rename, dir
//!   fsync: `repaired_segments`), so the next start is clean;
//! * empty or all-garbage segment files are removed.
//!
//! *What is checked when:* a record of an indexed segment is CRC-checked
//! only when it is read (`read_from`, `read_all_on_disk_after`). Bit rot
//! inside a sealed, indexed segment (the bytes change but the length does
//! not) is therefore not found or repaired at open; it surfaces as
//! [`QueueError::Corrupt`] for exactly the damaged record when that record
//! is read, never as wrong data. Torn writes cannot hit an indexed segment:
//! it was fdatasync'ed before its index was written, and only the last
//! segment (always scanned) has unsynced bytes. This is the trade for an
//! open that does not read a 1 GiB backlog; deleting the `.idx` files
//! forces the full check and repair at the next open.
//!
//! Then the last segment, the ledger and both directories are fsynced, because
//! after a SIGKILL what we just read may still be only in the page cache, and
//! from here on everything on disk is reported as committed.
//!
//! `next_id` = 1 + max(highest id on disk, ledger `acked_through`, ledger
//! `high_water`): ids of committed records are never reused, even after
//! every segment was reclaimed.
//!
//! Errors: if an fsync fails, the kernel may already have dropped the dirty
//! pages and a retry would falsely succeed, so the queue refuses further
//! writes ([`QueueError::NeedsReopen`]); reopening rescans what really is on disk.
//!
//! # What callers must know
//!
//! * A commit that makes records durable first checks that `dir/lock` and
//!   the segment appended to are still the files this queue opened; if the
//!   directory was deleted, moved or replaced it fails with
//!   [`QueueError::Gone`] and commits nothing (fdatasync on an unlinked
//!   file succeeds, so nothing else would tell).
//! * Acks and DropOldest evictions are durable only after the next `commit()`
//!   (or `reclaim()`). Without that, a restart redelivers those records: at
//!   least once, never lost. It also means live bytes can be above
//!   `max_bytes` right after `open`; DropOldest trims at the next append,
//!   RejectNew keeps refusing until acks bring it down.
//! * `append` commits implicitly when it rolls to a new segment, so
//!   `committed_id()` can advance without an explicit `commit()`.
//! * DropOldest may evict records the uplink has already read; acks for ids
//!   at or below the head are simply no-ops.
//! * Disk use is live bytes + acked segments not yet reclaimed (those kept
//!   for dedup among them) + up to one partly acked segment + kept segment
//!   files; call `reclaim()` after persisting dedup state.
//! * `open` reads the last segment and every segment without a valid index;
//!   `open_readonly` does the same without touching anything (it uses valid
//!   indexes but never writes or deletes one).
//! * `read_from` and `read_all_on_disk_after` return [`QueueError::Corrupt`]
//!   `{ id, path }` when a record's bytes no longer match their CRC (or id):
//!   with indexes this is how corruption in a sealed segment is reported,
//!   not only a change after start-up. The whole call fails; records before
//!   `id` can be read with a smaller `max`, records after it with
//!   `after_id = id`, and `ack_through(id)` skips it for good.
//!   `read_valid_on_disk_after` is the variant for start-up replays: it
//!   leaves corrupt records out and returns their ids instead of failing.

pub mod config;
mod deflate;
mod ledger;
mod open;
#[cfg(test)]
use open::parse_segment_name;
mod sector;
/// For other modules' tests of what reaches the disk.
#[cfg(test)]
pub(crate) use sector::tests::{disk_dir, write_bytes};
mod seg_index;
mod segment;

/// How often [`Queue::commit_paced`] writes the ack ledger (acks only; every
/// other commit writes it whenever the head moved).
pub const LEDGER_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Commits pad segments to a page boundary only if a segment may grow to
/// at least this (a 4 KiB pad is then at most 1/256 of it).
pub const PAD_MIN_SEGMENT: u64 = 1 << 20;

/// A commit of fewer new bytes than this writes zeros ahead (see the
/// module docs): below it the journal commit it saves costs more than the
/// zeros.
pub const PREFILL_BELOW: u64 = 16 << 10;
/// How many bytes of zeros ahead at a time.
const PREFILL_CHUNK: u64 = 64 << 10;
/// The most a segment holds in memory for a direct commit (see "Direct
/// commits" in the module docs), its pad included: more is written through
/// the page cache at once, as before.
const HOLD_MAX: u64 = PREFILL_BELOW;

pub(crate) use sector::{SectorFile, only_zeros};
/// The CRC-32 (ISO-HDLC) of every record, index and ledger entry; other
/// small files of the gateway use it too.
pub(crate) use segment::CRC;
#[cfg(test)]
mod tests;

use config::{OpenCheck, StoreConfig, WhenFull};
use ledger::{Ledger, LedgerState};
use segment::{FRAME_BYTES, OVERHEAD, PAGE, RecInfo};
use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// How the queue is bounded and split into files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueOptions {
    /// Bound on live bytes (records not yet acked/dropped, frame included).
    /// Acked records waiting for `reclaim` do not count.
    pub max_bytes: u64,
    pub when_full: WhenFull,
    /// Roll to a new segment file when the current one would exceed this;
    /// effectively `min(segment_bytes, max(max_bytes / 4, 4096))`.
    pub segment_bytes: u64,
    /// At open, trust a sealed segment's valid `.idx` instead of reading and
    /// CRC-checking its bytes: start-up in milliseconds instead of seconds
    /// per GiB, but bit rot in sealed segments is then found when a record
    /// is read (`Corrupt`), not repaired at start-up. Off: every byte is
    /// checked at every start (indexes are still written, to be ready).
    pub trust_index: bool,
    /// Store a record deflated when it is small enough to be held for a
    /// direct commit and deflating shortens it (module docs, "Deflated
    /// records").
    pub compress: bool,
}

impl From<&StoreConfig> for QueueOptions {
    fn from(c: &StoreConfig) -> Self {
        QueueOptions {
            max_bytes: c.max_bytes,
            when_full: c.when_full,
            segment_bytes: c.segment_bytes,
            trust_index: c.open_check == OpenCheck::Index,
            compress: c.compress,
        }
    }
}

/// A record as read back: metadata and payload.
pub type Record = (RecordMeta, Vec<u8>);

/// Bit 31 of a record's `readings` field: a priority record (see the format above).
pub const PRIORITY: u32 = 1 << 31;
/// Bits 24-30: span - 1.
const SPAN_SHIFT: u32 = 24;
const SPAN_MASK: u32 = 0x7F << SPAN_SHIFT;
/// Bit 23: the payload is stored deflated (module docs, "Deflated records").
const DEFLATED: u32 = 1 << 23;
const COUNT_MASK: u32 = DEFLATED - 1;
/// Most ids one record may own.
pub const MAX_SPAN: u32 = 128;
/// Most readings one record may count.
pub const MAX_READINGS: u32 = COUNT_MASK;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMeta {
    pub id: u64,
    pub readings: u32,
    pub created_ms: u64,
    /// Appended as a priority record ([`Queue::append_with`]).
    pub priority: bool,
    /// Ids it owns: `id ..= id + span - 1`.
    pub span: u32,
}

/// What `open` found and fixed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Live (not acked) records after open.
    pub records: u64,
    /// Bytes of torn tail dropped from the last segment (normal after power loss).
    pub truncated_bytes: u64,
    /// Corrupt regions skipped (each contiguous bad region counts once).
    pub corrupt_records: u64,
    /// Segment files rewritten (or removed) to drop corruption.
    pub repaired_segments: u64,
}

/// See [`Queue::dedup_span`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupSpan {
    /// The first record created at or after the time asked for.
    pub from: u64,
    /// Every record created since then is still on disk.
    pub complete: bool,
    /// Keep records from this id on ([`Queue::keep_from`]).
    pub keep: u64,
    /// Bytes on disk from `keep`'s segment on.
    pub bytes: u64,
}

/// Live records only: appended (committed or not) and not acked or dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStatus {
    pub batches: u64,
    pub readings: u64,
    pub bytes: u64,
    pub oldest_created_ms: Option<u64>,
    /// Of those, in priority records (the alarm lane).
    pub priority_readings: u64,
    pub priority_oldest_created_ms: Option<u64>,
    /// The oldest record that is not a priority one.
    pub bulk_oldest_created_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// `dropped_*` > 0 when DropOldest evicted the oldest live records to make room.
    Appended { dropped_records: u64, dropped_readings: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The message carries what was being done and to which path; the kind is preserved.
    #[error("queue I/O error: {0}")]
    Io(#[from] io::Error),
    /// RejectNew and the record does not fit. `needed` = bytes the record
    /// takes on disk (payload + 30), `max` = `max_bytes`.
    #[error("queue full: record needs {needed} bytes, live bytes bounded by {max}")]
    Full { needed: u64, max: u64 },
    /// The record alone is bigger than `max_bytes` (or than the 64 MiB format limit).
    #[error("record of {size} bytes can never fit (max {max})")]
    TooLarge { size: u64, max: u64 },
    /// Another process (or another `Queue` in this one) holds `dir/lock`.
    #[error("queue directory is locked by another process")]
    Locked,
    /// A write method was called on a queue from `open_readonly`.
    #[error("queue was opened read-only")]
    ReadOnly,
    /// An fsync failed earlier; what is durable is unknown until the queue is reopened.
    #[error("an earlier fsync failed; reopen the queue")]
    NeedsReopen,
    /// A record's bytes do not match their CRC (or id) when read: changed on
    /// disk after start-up, or bit rot in a sealed segment that `open` loaded
    /// from its index without reading it. The caller may skip it with `ack_through(id)`.
    #[error("record {id} in {path} is corrupt on disk")]
    Corrupt { id: u64, path: PathBuf },
    /// `path` (the queue's lock, or the segment being appended to) no
    /// longer names the file this queue opened: the data dir was deleted,
    /// moved or replaced under the running process. fdatasync on such a
    /// file succeeds, but what it holds is gone at the next start, so the
    /// commit that finds this acks nothing and the queue refuses every
    /// write from then on (as after a failed fsync).
    #[error("{path} is no longer the file this queue opened (deleted, moved or replaced while running)")]
    Gone { path: PathBuf },
}

type Result<T> = std::result::Result<T, QueueError>;

impl QueueError {
    /// Whether an append that failed this way says the storage itself broke
    /// (EIO, a file system gone read-only, …), as opposed to a refusal the
    /// configured policy covers: `reject_new`'s full queue, a record too
    /// big, or a full disk or quota (space comes back as the uplink drains).
    pub fn storage_failed(&self) -> bool {
        match self {
            QueueError::Io(e) => !matches!(e.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded),
            QueueError::NeedsReopen | QueueError::Gone { .. } => true,
            _ => false,
        }
    }
}

/// Attach "what + where" to an io::Error while keeping its kind.
trait Ctx<T> {
    fn ctx(self, what: &str, path: &Path) -> Result<T>;
}
impl<T> Ctx<T> for io::Result<T> {
    fn ctx(self, what: &str, path: &Path) -> Result<T> {
        self.map_err(|e| QueueError::Io(io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))))
    }
}

/// Write `bytes` to `tmp`, fdatasync it and rename it over `path`, so a crash
/// leaves either the old file or the new one whole. The rename becomes
/// durable with the next fsync of the directory, which is the caller's to
/// do. Returns the new file, still open for writing.
pub(crate) fn replace_file(tmp: &Path, path: &Path, bytes: &[u8], fsyncs: &mut u64) -> io::Result<File> {
    let f = File::create(tmp)?;
    f.write_all_at(bytes, 0)?;
    f.sync_data()?;
    *fsyncs += 1;
    fs::rename(tmp, path)?;
    Ok(f)
}

/// Replace `path` with `bytes` durably ([`replace_file`] to `path` with
/// extension `tmp_ext`, then the directory's fsync) and return it open for
/// appending: how the small logs beside the queue compact themselves.
pub(crate) fn rewrite_durably(path: &Path, tmp_ext: &str, bytes: &[u8], fsyncs: &mut u64) -> io::Result<File> {
    drop(replace_file(&path.with_extension(tmp_ext), path, bytes, fsyncs)?);
    if let Some(dir) = path.parent() {
        sync_dir(dir, fsyncs)?;
    }
    fs::OpenOptions::new().append(true).open(path)
}

/// `create_dir_all`, and fsync the parent of every directory it created
/// (top down), so a power cut cannot take the new directory, and everything
/// later made durable inside it, with it.
pub fn create_dir_all_durable(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut d = dir;
    while !d.as_os_str().is_empty() && !d.exists() {
        missing.push(d.to_path_buf());
        match d.parent() {
            Some(p) => d = p,
            None => break,
        }
    }
    fs::create_dir_all(dir)?;
    let mut fsyncs = 0;
    for created in missing.iter().rev() {
        let parent = created.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        sync_dir(parent, &mut fsyncs)?;
    }
    Ok(())
}

/// fsync a directory so entries created, renamed or removed in it are durable.
pub(crate) fn sync_dir(dir: &Path, fsyncs: &mut u64) -> io::Result<()> {
    File::open(dir)?.sync_all()?;
    *fsyncs += 1;
    Ok(())
}

/// One segment file that is on disk and holds at least one valid record
/// (except, briefly, a freshly rolled one).
#[derive(Debug)]
struct Segment {
    /// From the file name; the id of the first record ever written to it.
    first_id: u64,
    path: PathBuf,
    /// Kept open: reads use pread on it, and the last one is appended to.
    file: File,
    len: u64,
    /// Id of the last record in the file (0 while empty).
    last_id: u64,
    /// Length known durable (for tests that simulate losing the rest).
    synced_len: u64,
    /// The file's size: zeros written ahead between `len` and it (held
    /// bytes, not yet written, may end past it).
    filled: u64,
    /// Records (and at the commit, a pad) appended since `held_from` and not
    /// written yet: the commit writes them in whole blocks with one direct
    /// write (module docs, "Direct commits"). Empty when nothing is held.
    held: Vec<u8>,
    /// Where `held` goes in the file: a block boundary.
    held_from: u64,
    /// The file opened for direct writes, once a hold was tried.
    direct: Option<Direct>,
    /// Records were written through the page cache since the last commit:
    /// no hold until its fdatasync has cleaned their page (a direct write
    /// over a dirty page makes the kernel write that page first, so a
    /// commit would write it twice).
    buffered: bool,
}

/// A segment's direct writes (see "Direct commits").
#[derive(Debug)]
struct Direct {
    /// Opened with `O_DIRECT`; `None` in tests on tmpfs, which write held
    /// bytes through `Segment::file` in the same blocks.
    file: Option<File>,
    /// The device's logical block: held bytes start and end on one.
    block: u64,
    /// Scratch for the aligned write.
    scratch: Vec<u8>,
}

/// What a commit did with the held bytes.
enum Held {
    Nothing,
    /// Written with one direct write.
    Direct,
    /// The direct write was refused (`EINVAL`): written through the page
    /// cache; direct writes are off from now on.
    Refused,
}

impl Segment {
    /// A segment whose first `len` bytes are on disk (and durable, as far
    /// as the queue knows), followed by zeros up to `filled`.
    fn new(first_id: u64, path: PathBuf, file: File, len: u64, last_id: u64, filled: u64) -> Segment {
        let (held, held_from, direct, buffered) = (Vec::new(), 0, None, false);
        Segment { first_id, path, file, len, last_id, synced_len: len, filled, held, held_from, direct, buffered }
    }

    /// Hold `bytes` for the next commit's direct write instead of writing
    /// them now, if they fit: the held bytes start on a block boundary, stay
    /// under [`HOLD_MAX`], and end, with room for a pad to the next block,
    /// within the file's size (the direct write allocates nothing). False:
    /// not held, the caller writes them.
    fn hold(&mut self, bytes: &[u8]) -> bool {
        if !self.would_hold(bytes.len()) {
            return false;
        }
        let from = if self.held.is_empty() { self.len } else { self.held_from };
        self.held_from = from;
        self.held.extend_from_slice(bytes);
        self.len += bytes.len() as u64;
        true
    }

    /// Whether [`Segment::hold`] would take `len` more bytes now.
    fn would_hold(&self, len: usize) -> bool {
        let Some(d) = self.direct.as_ref().filter(|_| !self.buffered) else { return false };
        let from = if self.held.is_empty() { self.len } else { self.held_from };
        let end = self.len + len as u64 + d.block + FRAME_BYTES as u64;
        from.is_multiple_of(d.block) && end - from <= HOLD_MAX && end <= self.filled
    }

    /// Write the held bytes through the page cache: an append that cannot
    /// be held follows them, or the commit could not pad them to a block.
    fn release_held(&mut self) -> io::Result<()> {
        if !self.held.is_empty() {
            self.file.write_all_at(&self.held, self.held_from)?;
            self.filled = self.filled.max(self.len);
            self.held.clear();
        }
        Ok(())
    }

    /// At a commit: write the held bytes with one direct write (through the
    /// page cache if they are not whole blocks, i.e. the pad was skipped).
    fn write_held(&mut self) -> io::Result<Held> {
        let Some(d) = self.direct.as_mut().filter(|_| !self.held.is_empty()) else {
            return Ok(Held::Nothing);
        };
        if !(self.held.len() as u64).is_multiple_of(d.block) {
            self.release_held()?;
            return Ok(Held::Nothing);
        }
        let written = match &d.file {
            None => self.file.write_all_at(&self.held, self.held_from),
            Some(f) => {
                let buf = sector::aligned_zeros(&mut d.scratch, self.held.len());
                buf.copy_from_slice(&self.held);
                match f.write_at(buf, self.held_from) {
                    Ok(n) if n == buf.len() => Ok(()),
                    Ok(n) => Err(io::Error::other(format!("short direct write: {n} of {} bytes", buf.len()))),
                    Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                        tracing::warn!(segment = %self.path.display(), "direct write refused ({e}); commits go through the page cache");
                        self.direct = None;
                        self.release_held()?;
                        return Ok(Held::Refused);
                    }
                    Err(e) => Err(e),
                }
            }
        };
        written?;
        self.filled = self.filled.max(self.len);
        self.held.clear();
        Ok(Held::Direct)
    }

    /// Write `bytes` at the end in one write(2) and count them in `len`. A
    /// failed write is cut off again, so the next append starts clean; the
    /// `bool` says that even the cut failed (garbage may follow `len`: never
    /// append to this file again).
    fn append(&mut self, bytes: &[u8]) -> std::result::Result<(), (io::Error, bool)> {
        match self.file.write_all_at(bytes, self.len) {
            Ok(()) => {
                self.len += bytes.len() as u64;
                self.filled = self.filled.max(self.len);
                self.buffered = true;
                Ok(())
            }
            Err(e) => {
                self.filled = self.len;
                Err((e, self.file.set_len(self.len).is_err()))
            }
        }
    }

    /// Write zeros from the end of the file up to `to` (see "Zeros ahead"
    /// in the module docs). A failure is cut off again; the bool as for
    /// `append`.
    fn fill_to(&mut self, to: u64) -> std::result::Result<(), (io::Error, bool)> {
        let from = self.filled;
        if to <= from {
            return Ok(());
        }
        let written = if crate::crashpoint::fail("queue-prefill") {
            Err(io::Error::from(io::ErrorKind::StorageFull))
        } else {
            // A page per write(2): one 64 KiB write makes the page cache
            // hold it as one 64 KiB folio, and every later commit writing a
            // page of it would dirty (and count, in the process's
            // write_bytes) all 64 KiB.
            let zeros = [0u8; PAGE as usize];
            (from..to).step_by(PAGE as usize).try_for_each(|at| {
                let n = (to - at).min(PAGE) as usize;
                self.file.write_all_at(&zeros[..n], at)
            })
        };
        match written {
            Ok(()) => {
                self.filled = to;
                Ok(())
            }
            Err(e) => Err((e, self.file.set_len(from).is_err())),
        }
    }
}

/// In-memory index entry: one per valid record still on disk, acked or not.
/// 40 bytes per record, independent of payload size.
#[derive(Debug, Clone, Copy)]
struct Entry {
    id: u64,
    /// `first_id` of the segment holding it.
    seg: u64,
    offset: u64,
    total: u32,
    readings: u32,
    created_ms: u64,
}

impl Entry {
    fn new(r: &RecInfo, seg: u64) -> Entry {
        Entry { id: r.id, seg, offset: r.offset, total: r.total, readings: r.readings, created_ms: r.created_ms }
    }

    fn info(&self) -> RecInfo {
        RecInfo {
            offset: self.offset,
            total: self.total,
            id: self.id,
            readings: self.readings,
            created_ms: self.created_ms,
        }
    }

    fn meta(&self) -> RecordMeta {
        RecordMeta {
            id: self.id,
            readings: self.count(),
            created_ms: self.created_ms,
            priority: self.priority(),
            span: self.span(),
        }
    }

    /// Readings in it (`readings` without the flags).
    fn count(&self) -> u32 {
        self.readings & COUNT_MASK
    }

    fn span(&self) -> u32 {
        ((self.readings & SPAN_MASK) >> SPAN_SHIFT) + 1
    }

    /// The last id it owns.
    fn last_id(&self) -> u64 {
        self.id + self.span() as u64 - 1
    }

    fn priority(&self) -> bool {
        self.readings & PRIORITY != 0
    }
}

pub struct Queue {
    dir: PathBuf,
    seg_dir: PathBuf,
    opts: QueueOptions,
    seg_limit: u64,
    readonly: bool,
    /// Holds the flock for as long as the queue lives; each commit also
    /// checks that `dir/lock` is still this file ([`QueueError::Gone`]).
    lock: Option<File>,
    segments: VecDeque<Segment>,
    /// Every valid record on disk in id order, including acked ones not yet reclaimed.
    index: VecDeque<Entry>,
    /// Every record with id <= head is acked or dropped (in memory; the
    /// ledger catches up at the next commit or reclaim).
    head: u64,
    next_id: u64,
    committed_id: u64,
    /// Sends `committed_id` to whoever waits for new records (the uplink).
    commits: tokio::sync::watch::Sender<u64>,
    live_bytes: u64,
    live_readings: u64,
    ledger: Ledger,
    /// The last segment has writes not yet fdatasync'ed.
    seg_dirty: bool,
    /// `segments/` has a new entry not yet fsync'ed.
    seg_dir_dirty: bool,
    /// A failed write may have left garbage at the end of the last segment:
    /// never append after it.
    force_roll: bool,
    /// Ids of the records the last append evicted (`drop_oldest`), if any.
    last_evicted: Option<std::ops::RangeInclusive<u64>>,
    /// An fsync failed: refuse writes (see module docs).
    failed: bool,
    fsyncs: u64,
    /// Segments `open` loaded from their `.idx` without reading them.
    indexed_segments: u64,
    /// When the ledger was last written: [`Queue::commit_paced`] writes it
    /// again only [`LEDGER_EVERY`] later.
    ledger_at: Option<std::time::Instant>,
    /// [`LEDGER_EVERY`] except in tests.
    pub(crate) ledger_every: std::time::Duration,
    /// Bytes of padding written by commits (see the module docs).
    pad_bytes: u64,
    /// [`PAD_MIN_SEGMENT`] except in tests.
    pub(crate) pad_min_segment: u64,
    /// `roll` is committing the segment it seals: no zeros ahead for it.
    sealing: bool,
    /// Bytes of zeros written ahead (see the module docs).
    prefill_bytes: u64,
    /// Reclaimed segment files kept for the next rolls (module docs,
    /// "Reused segment files"); the last one is `spare_name(len - 1)`.
    spares: Vec<Spare>,
    /// Segment files a roll took from `spares` (for tests and the bench).
    reused_segments: u64,
    /// Direct writes are unavailable here (module docs, "Direct commits").
    pub(crate) direct_off: bool,
    /// Tests on tmpfs (no direct I/O): hold appends in blocks of this size
    /// and write them through the page cache.
    pub(crate) hold_block_for_tests: Option<u64>,
    /// Commits that wrote their records with one direct write.
    direct_commits: u64,
    /// Bytes deflated records did not take (payloads less what was stored).
    deflate_saved: u64,
    /// [`Queue::reclaim`] keeps every segment whose last record's id is at
    /// least this (0: none): the pipeline rebuilds dedup from them at the
    /// next start (see [`Queue::dedup_span`]).
    keep_from: u64,
}

/// An acked segment file renamed to [`spare_name`], and its size.
#[derive(Debug)]
struct Spare {
    file: File,
    size: u64,
}

/// At most this many kept segment files (and, past the first, at most an
/// eighth of `max_bytes`): a checkpoint reclaims several sealed segments at
/// once when the state file is large (the pipeline waits until they are four times its
/// size), the rolls until the next one need as many, and each one kept saves
/// a segment's zeros. With 4, one roll in five made a new file at a site's
/// pace with 1 MiB segments.
const SPARES_MAX: usize = 8;

/// The name of the `n`th kept segment file in `segments/`: a `.tmp`, so
/// `open` deletes it like any temp file a crash left.
fn spare_name(n: usize) -> String {
    if n == 0 { "spare.tmp".to_string() } else { format!("spare.{n}.tmp") }
}

impl Drop for Queue {
    /// Held appends go to the file (through the page cache), where a
    /// dropped queue left its uncommitted records before direct commits.
    fn drop(&mut self) {
        let writable = self.writable().is_ok();
        if let Some(s) = self.segments.back_mut().filter(|_| writable)
            && let Err(e) = s.release_held()
        {
            tracing::debug!(segment = %s.path.display(), error = %e, "cannot write the held records");
        }
    }
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("dir", &self.dir)
            .field("readonly", &self.readonly)
            .field("segments", &self.segments.len())
            .field("head", &self.head)
            .field("next_id", &self.next_id)
            .field("committed_id", &self.committed_id)
            .field("status", &self.status())
            .finish()
    }
}

impl Queue {
    /// The id the next append will get (first ever is 1). Never reused for a
    /// committed record, across restarts and reclaims.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    fn writable(&self) -> Result<()> {
        if self.readonly {
            Err(QueueError::ReadOnly)
        } else if self.failed {
            Err(QueueError::NeedsReopen)
        } else {
            Ok(())
        }
    }

    /// Index position of the first live record.
    fn first_live(&self) -> usize {
        self.index.partition_point(|e| e.id <= self.head)
    }

    fn live_count(&self) -> usize {
        self.index.len() - self.first_live()
    }

    /// Append one record with id `next_id()`. Not durable until `commit()`.
    /// May commit implicitly when it rolls to a new segment.
    pub fn append(&mut self, readings: u32, created_ms: u64, payload: &[u8]) -> Result<AppendOutcome> {
        self.append_with(readings, created_ms, payload, false, 1)
    }

    /// [`Queue::append`] with flags: `priority`, a record the uplink may
    /// send ahead of older ones (its ack still waits for theirs); `span`
    /// (1..=[`MAX_SPAN`]), the ids it owns (one per message it becomes).
    pub fn append_with(
        &mut self,
        readings: u32,
        created_ms: u64,
        payload: &[u8],
        priority: bool,
        span: u32,
    ) -> Result<AppendOutcome> {
        assert!((1..=MAX_SPAN).contains(&span), "span {span}");
        assert!(readings <= MAX_READINGS, "{readings} readings in one record");
        let flags = if priority { PRIORITY } else { 0 } | (span - 1) << SPAN_SHIFT;
        self.append_flagged(readings | flags, created_ms, payload)
    }

    fn append_flagged(&mut self, readings: u32, created_ms: u64, payload: &[u8]) -> Result<AppendOutcome> {
        self.writable()?;
        if payload.len() > segment::MAX_LEN - segment::META_BYTES {
            let size = (OVERHEAD + payload.len()) as u64;
            return Err(QueueError::TooLarge { size, max: self.opts.max_bytes });
        }
        // Deflated only where the record, as it is, would be held for a
        // direct commit (a site's pace): that commit writes whole blocks,
        // and fewer bytes are often a block fewer. Under full load nothing
        // is held (commits go through the page cache), so no CPU goes into
        // deflating there.
        let deflated = (self.opts.compress
            && !self.segments.is_empty()
            && self.can_hold()
            && self.segments.back().unwrap().would_hold(OVERHEAD + payload.len()))
        .then(|| deflate::shrink(payload))
        .flatten();
        let (readings, stored) = match &deflated {
            Some(d) => (readings | DEFLATED, &d[..]),
            None => (readings, payload),
        };
        let size = (OVERHEAD + stored.len()) as u64;
        let max = self.opts.max_bytes;
        if size > max {
            return Err(QueueError::TooLarge { size, max });
        }

        // Plan evictions first but apply them only once the write succeeded,
        // so a failed append changes nothing.
        let first_live = self.first_live();
        self.last_evicted = None;
        let (mut evict, mut freed, mut dropped_readings) = (0usize, 0u64, 0u64);
        if self.live_bytes + size > max {
            if self.opts.when_full == WhenFull::RejectNew {
                return Err(QueueError::Full { needed: size, max });
            }
            while self.live_bytes - freed + size > max {
                let e = &self.index[first_live + evict];
                freed += e.total as u64;
                dropped_readings += e.count() as u64;
                evict += 1;
            }
        }

        let id = self.next_id;
        let rec = segment::encode(id, readings, created_ms, stored);
        let need_roll = match self.segments.back() {
            None => true,
            Some(s) => self.force_roll || (s.len > 0 && s.len + size > self.seg_limit),
        };
        if need_roll {
            self.roll(id)?;
        }
        let hold = self.can_hold();
        let seg = self.segments.back_mut().unwrap();
        let offset = seg.len;
        if !(hold && seg.hold(&rec)) {
            if let Err(e) = seg.release_held() {
                // Records appended before are indexed but not in the file.
                self.failed = true;
                return Err(e).ctx("appending to", &seg.path);
            }
            if let Err((e, garbage)) = seg.append(&rec) {
                self.force_roll |= garbage;
                return Err(e).ctx("appending to", &seg.path);
            }
        }
        let seg_id = seg.first_id;
        self.seg_dirty = true;
        let entry = Entry { id, seg: seg_id, offset, total: size as u32, readings, created_ms };
        let last = entry.last_id();
        seg.last_id = last;
        self.live_readings += entry.count() as u64;
        self.index.push_back(entry);
        self.live_bytes += size;
        self.next_id = last + 1;
        self.deflate_saved += (payload.len() - stored.len()) as u64;

        if evict > 0 {
            let last_dropped = self.index[first_live + evict - 1].last_id();
            self.last_evicted = Some(self.index[first_live].id..=last_dropped);
            self.move_head(last_dropped);
        }
        Ok(AppendOutcome::Appended { dropped_records: evict as u64, dropped_readings })
    }

    /// The ids of the records the last [`Queue::append`] evicted to make
    /// room (`drop_oldest`); `None` when it evicted nothing.
    pub fn last_evicted(&self) -> Option<std::ops::RangeInclusive<u64>> {
        self.last_evicted.clone()
    }

    /// Commit what the current segment holds (so only the newest segment ever
    /// has uncommitted bytes), then start `dir/segments/<first_id>.seg`.
    fn roll(&mut self, first_id: u64) -> Result<()> {
        if let Some(s) = self.segments.back_mut() {
            // Sealed through the page cache (held bytes first), and no
            // direct file kept open for a segment never appended to again.
            if let Err(e) = s.release_held() {
                self.failed = true;
                return Err(e).ctx("appending to", &s.path);
            }
            s.direct = None;
        }
        if let Some(s) = self.segments.back_mut()
            && s.filled > s.len
        {
            // Sealed without its zeros ahead (durable with the commit below).
            if let Err(e) = s.file.set_len(s.len) {
                tracing::debug!(segment = %s.path.display(), error = %e, "cannot cut the zeros ahead off");
            }
            s.filled = s.len;
            self.seg_dirty = true;
        }
        if !self.segments.is_empty() {
            self.sealing = true;
            let committed = self.commit();
            self.sealing = false;
            committed?;
            self.write_sealed_index();
        }
        let path = self.seg_dir.join(format!("{first_id:020}.seg"));
        if crate::crashpoint::fail("queue-roll") {
            // As ext4 answers once it remounted itself read-only after an
            // I/O error (found by the power-cut rig's eio cycles).
            return Err(io::Error::from(io::ErrorKind::ReadOnlyFilesystem)).ctx("creating segment", &path);
        }
        // A kept segment file, renamed: its old records are overwritten,
        // and the file has its size already (no zeros ahead, no journal
        // commit for the growth). Old records after the new ones are never
        // read as records: their ids are below this segment's first id.
        let spare = self.spares.pop().and_then(|sp| {
            let from = self.seg_dir.join(spare_name(self.spares.len()));
            match fs::rename(&from, &path) {
                Ok(()) => Some(sp),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot reuse the kept segment file");
                    let _ = fs::remove_file(&from);
                    None
                }
            }
        });
        let (file, filled) = match spare {
            Some(Spare { file, size }) => {
                // The renames must be durable before any new record is
                // written into the file: a power cut could otherwise bring
                // it back under its old name, before younger segments, with
                // the new records in it (ext4 writes the data in place, and
                // the renames wait for a journal commit).
                if let Err(e) = sync_dir(&self.seg_dir, &mut self.fsyncs) {
                    self.failed = true;
                    return Err(e).ctx("syncing directory", &self.seg_dir);
                }
                self.reused_segments += 1;
                (file, size)
            }
            None => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .ctx("creating segment", &path)?;
                // A new directory entry: durable with the next commit.
                self.seg_dir_dirty = true;
                (file, 0)
            }
        };
        self.segments.push_back(Segment::new(first_id, path, file, 0, 0, filled));
        self.force_roll = false;
        Ok(())
    }

    /// Write the `.idx` of the last segment, which `roll` just committed and
    /// will never append to again. Skipped if the file may hold garbage past
    /// `len` (failed write) or is not fully synced; failure is only logged,
    /// because the index is an optimisation (`open` scans without it). Its
    /// rename is made durable by the directory fsync of the commit that
    /// follows the new segment's creation.
    fn write_sealed_index(&mut self) {
        let s = self.segments.back().unwrap();
        if self.force_roll || s.len == 0 || s.synced_len != s.len || self.seg_dirty {
            return;
        }
        let mut recs: Vec<RecInfo> =
            self.index.iter().rev().take_while(|e| e.seg == s.first_id).map(Entry::info).collect();
        recs.reverse();
        if recs.is_empty() {
            return;
        }
        if let Err(e) = seg_index::write(&s.path, s.first_id, s.len, &recs, &mut self.fsyncs) {
            tracing::warn!(segment = %s.path.display(), error = %e, "cannot write segment index");
            // An index from before this segment last became the append
            // target would not match its length anyway; do not keep it around.
            let _ = seg_index::remove(&s.path);
        }
    }

    /// Group commit: fdatasync the segment written since the last commit,
    /// fsync `segments/` if a file was created, write + fsync a ledger entry if
    /// the head moved. A no-op (no syscalls) when nothing changed.
    pub fn commit(&mut self) -> Result<()> {
        self.commit_with(true)
    }

    /// The pipeline's group commit: as [`Queue::commit`], but the ledger
    /// entry only if the last one is [`LEDGER_EVERY`] old. Appended records
    /// are durable when it returns; acks may wait for a later paced commit
    /// (the uplink makes one each second while acks wait) or shutdown's
    /// full one, about six seconds at most. A crash in
    /// between re-sends what was acked since: the uplink's PUBREC log (whose
    /// entries stay until the ledger covers their batches) turns those into
    /// PUBRELs, which the broker answers with PUBCOMP. At a site's pace this
    /// saves a 4 KiB page (and its fdatasync) at about 16 commits out of 17.
    pub fn commit_paced(&mut self) -> Result<()> {
        let due = self.ledger_at.is_none_or(|t| t.elapsed() >= self.ledger_every);
        self.commit_with(due)
    }

    fn commit_with(&mut self, ledger: bool) -> Result<()> {
        self.writable()?;
        let r = self.commit_inner(ledger);
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn commit_inner(&mut self, ledger: bool) -> Result<()> {
        if self.seg_dirty {
            self.pad_to_page();
            self.fill_ahead();
            let s = self.segments.back_mut().unwrap();
            match s.write_held().ctx("writing", &s.path)? {
                Held::Nothing => {}
                Held::Direct => self.direct_commits += 1,
                Held::Refused => self.direct_off = true,
            }
            s.file.sync_data().ctx("syncing", &s.path)?;
            s.synced_len = s.len;
            s.buffered = false;
            self.fsyncs += 1;
            self.seg_dirty = false;
            // Records become committed (and their devices acked) only if
            // they are where the next start will look for them.
            self.check_in_place()?;
        }
        if self.seg_dir_dirty {
            sync_dir(&self.seg_dir, &mut self.fsyncs).ctx("syncing directory", &self.seg_dir)?;
            self.seg_dir_dirty = false;
        }
        let committed = self.next_id - 1;
        if ledger && self.head != self.ledger.state.acked_through {
            self.write_ledger(committed)?;
        }
        self.committed_id = committed;
        self.commits.send_if_modified(|c| std::mem::replace(c, committed) != committed);
        Ok(())
    }

    /// End the segment on a page boundary with a pad, so the next commit's
    /// records start on a fresh page instead of dirtying (and rewriting) this
    /// commit's last, partly filled one. Only while the backlog is small
    /// (live bytes at most an eighth of `max_bytes`: the padded segment is
    /// acked and reclaimed soon, so the space is not kept) and segments are
    /// at least [`PAD_MIN_SEGMENT`] (a small queue keeps its capacity). A pad
    /// that cannot be written is cut off again and skipped: it only saves
    /// writes. Held records (a direct commit) are padded to a block instead.
    fn pad_to_page(&mut self) {
        let s = self.segments.back_mut().unwrap();
        if let Some(d) = s.direct.as_ref().filter(|_| !s.held.is_empty()) {
            // Held bytes end on a block boundary (a block further when a
            // pad's frame does not fit), within the room `hold` kept.
            let block = d.block;
            let mut gap = (block - s.len % block) % block;
            if gap > 0 && gap < FRAME_BYTES as u64 {
                gap += block;
            }
            // A refused pad (crash point, as for the page's pad below)
            // leaves the held bytes to the page cache.
            if gap > 0 && !crate::crashpoint::fail("queue-pad") {
                s.held.extend_from_slice(&segment::encode_pad(gap as usize));
                s.len += gap;
                self.pad_bytes += gap;
            }
            return;
        }
        if !self.small_backlog() {
            return;
        }
        let s = self.segments.back_mut().unwrap();
        let gap = (PAGE - s.len % PAGE) % PAGE;
        if gap < FRAME_BYTES as u64 {
            // Aligned already, or no room for a pad's frame.
            return;
        }
        let written = if crate::crashpoint::fail("queue-pad") {
            // As a full disk answers (the pad needs a new block).
            Err((io::Error::from(io::ErrorKind::StorageFull), false))
        } else {
            s.append(&segment::encode_pad(gap as usize))
        };
        match written {
            Ok(()) => self.pad_bytes += gap,
            Err((e, garbage)) => {
                tracing::debug!(segment = %s.path.display(), error = %e, "cannot pad the segment");
                self.force_roll |= garbage;
            }
        }
    }

    /// Whether the last segment may hold appends for a direct commit (while
    /// pads are written and direct writes work); opens its direct file the
    /// first time.
    fn can_hold(&mut self) -> bool {
        if self.direct_off || !self.small_backlog() {
            return false;
        }
        let test_block = self.hold_block_for_tests;
        let s = self.segments.back_mut().unwrap();
        if s.direct.is_none() {
            let (file, block) = match test_block {
                Some(block) => (None, block),
                None => match sector::open_direct(&s.path) {
                    Some((f, block)) => (Some(f), block),
                    None => {
                        self.direct_off = true;
                        return false;
                    }
                },
            };
            s.direct = Some(Direct { file, block, scratch: Vec::new() });
        }
        true
    }

    /// Pads and zeros ahead only while the backlog is small and segments
    /// may reach [`PAD_MIN_SEGMENT`] (see the module docs).
    fn small_backlog(&self) -> bool {
        self.seg_limit >= self.pad_min_segment && self.live_bytes <= self.opts.max_bytes / 8
    }

    /// After a small commit's pad: zeros ahead of the segment's end, if
    /// fewer than a quarter of [`PREFILL_CHUNK`] are left (module docs). A
    /// failure is skipped like a pad's: zeros only save writes.
    fn fill_ahead(&mut self) {
        let seg_limit = self.seg_limit;
        if self.sealing || !self.small_backlog() {
            return;
        }
        let s = self.segments.back_mut().unwrap();
        if s.len - s.synced_len >= PREFILL_BELOW || s.filled >= s.len + PREFILL_CHUNK / 4 {
            return;
        }
        let to = (s.len + PREFILL_CHUNK).next_multiple_of(PAGE).min(seg_limit.max(s.len));
        let from = s.filled;
        match s.fill_to(to) {
            Ok(()) => self.prefill_bytes += to.saturating_sub(from),
            Err((e, garbage)) => {
                tracing::debug!(segment = %s.path.display(), error = %e, "cannot write zeros ahead");
                self.force_roll |= garbage;
            }
        }
    }

    /// [`QueueError::Gone`] unless `dir/lock` and the segment appended to
    /// are still the files this queue opened (same device and inode). Two
    /// stat calls per commit that made records durable.
    fn check_in_place(&self) -> Result<()> {
        fn same(f: &File, path: &Path) -> io::Result<bool> {
            use std::os::unix::fs::MetadataExt;
            let open = f.metadata()?;
            match std::fs::metadata(path) {
                Ok(m) => Ok(m.dev() == open.dev() && m.ino() == open.ino()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(e),
            }
        }
        let lock = self.dir.join("lock");
        let files = self.lock.iter().map(|f| (f, lock.as_path()));
        for (f, path) in files.chain(self.segments.back().map(|s| (&s.file, s.path.as_path()))) {
            if !same(f, path).ctx("checking", path)? {
                return Err(QueueError::Gone { path: path.to_path_buf() });
            }
        }
        Ok(())
    }

    fn write_ledger(&mut self, high_water: u64) -> Result<()> {
        let st = LedgerState { acked_through: self.head, high_water };
        let created = self.ledger.write(st, &mut self.fsyncs).ctx("writing", &Ledger::path_in(&self.dir))?;
        self.ledger_at = Some(std::time::Instant::now());
        if created {
            sync_dir(&self.dir, &mut self.fsyncs).ctx("syncing directory", &self.dir)?;
        }
        Ok(())
    }

    /// Id of the last record made durable by `commit()` (0 if none).
    /// Readers must only see records <= this.
    pub fn committed_id(&self) -> u64 {
        self.committed_id
    }

    /// Notified with [`Queue::committed_id`] after each commit that moved it:
    /// how the uplink learns there is something new to send.
    pub fn subscribe_commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.commits.subscribe()
    }

    /// The head as the ledger on disk has it: acks at or below it survive a crash.
    pub fn durable_head(&self) -> u64 {
        self.ledger.state.acked_through
    }

    /// Move the head to `id` (acks and evictions alike) and drop the newly
    /// dead records from the live counters.
    fn move_head(&mut self, id: u64) {
        if id <= self.head {
            return;
        }
        let from = self.first_live();
        for e in self.index.range(from..).take_while(|e| e.id <= id) {
            self.live_bytes -= e.total as u64;
            self.live_readings -= e.count() as u64;
        }
        self.head = id;
    }

    fn read_entry(&self, e: &Entry) -> Result<(RecordMeta, Vec<u8>)> {
        let i = self.segments.binary_search_by_key(&e.seg, |s| s.first_id).expect("index entry without segment");
        let s = &self.segments[i];
        let mut buf = vec![0u8; e.total as usize];
        if !s.held.is_empty() && e.offset >= s.held_from {
            let at = (e.offset - s.held_from) as usize;
            buf.copy_from_slice(&s.held[at..at + e.total as usize]);
        } else {
            s.file.read_exact_at(&mut buf, e.offset).ctx("reading", &s.path)?;
        }
        let payload = match segment::payload_of(&buf, e.id) {
            Some(p) if e.readings & DEFLATED == 0 => Some(p.to_vec()),
            Some(p) => deflate::inflate(p),
            None => None,
        };
        match payload {
            Some(p) => Ok((e.meta(), p)),
            None => Err(QueueError::Corrupt { id: e.id, path: s.path.clone() }),
        }
    }

    /// Live (not acked, not dropped), committed records with id > `after_id`,
    /// in order, at most `max`, payloads read from disk and CRC-checked.
    pub fn read_from(&self, after_id: u64, max: usize) -> Result<Vec<(RecordMeta, Vec<u8>)>> {
        self.read_range(after_id, u64::MAX, max)
    }

    /// [`Queue::read_from`] stopping at id `upto` (inclusive).
    pub fn read_range(&self, after_id: u64, upto: u64, max: usize) -> Result<Vec<(RecordMeta, Vec<u8>)>> {
        let start = after_id.max(self.head);
        let upto = upto.min(self.committed_id);
        let from = self.index.partition_point(|e| e.id <= start);
        self.index.range(from..).take_while(|e| e.id <= upto).take(max).map(|e| self.read_entry(e)).collect()
    }

    /// Metadata (no payloads read) of live, committed records with
    /// `after_id < id < before_id`, at most `max`: the lowest ids first, or
    /// the highest first when `newest_first`.
    pub fn metas_between(&self, after_id: u64, before_id: u64, max: usize, newest_first: bool) -> Vec<RecordMeta> {
        let start = after_id.max(self.head);
        let end = before_id.min(self.committed_id.saturating_add(1));
        if start.saturating_add(1) >= end {
            return Vec::new();
        }
        let from = self.index.partition_point(|e| e.id <= start);
        let to = self.index.partition_point(|e| e.id < end);
        let range = self.index.range(from..to.max(from));
        if newest_first {
            range.rev().take(max).map(|e| e.meta()).collect()
        } else {
            range.take(max).map(|e| e.meta()).collect()
        }
    }

    /// Ids of live, committed priority records with id > `after_id`, in
    /// order, at most `max`.
    pub fn priority_after(&self, after_id: u64, max: usize) -> Vec<u64> {
        let start = after_id.max(self.head);
        let from = self.index.partition_point(|e| e.id <= start);
        self.index
            .range(from..)
            .take_while(|e| e.id <= self.committed_id)
            .filter(|e| e.priority())
            .take(max)
            .map(|e| e.id)
            .collect()
    }

    /// Acknowledge every record with id <= `id` (cumulative). Ids beyond the
    /// last appended one are clamped to it. Durable at the next `commit()`
    /// (or `reclaim()`).
    pub fn ack_through(&mut self, id: u64) -> Result<()> {
        self.writable()?;
        self.move_head(id.min(self.next_id - 1));
        Ok(())
    }

    /// Whether `reclaim` would delete at least one segment file.
    pub fn reclaimable(&self) -> bool {
        self.front_deletable(true)
    }

    /// Whether `reclaim_space` would delete a segment file, kept ones
    /// included ([`Queue::keep_from`] does not hold there).
    pub fn reclaimable_for_space(&self) -> bool {
        !self.readonly && (!self.spares.is_empty() || self.front_deletable(false))
    }

    /// The first segment is all acked or dropped (and, with `hold`, before
    /// [`Queue::keep_from`]'s id).
    fn front_deletable(&self, hold: bool) -> bool {
        !self.readonly
            && self.segments.front().is_some_and(|s| s.last_id <= self.head && !(hold && self.held(s.last_id)))
    }

    fn held(&self, last_id: u64) -> bool {
        self.keep_from != 0 && last_id >= self.keep_from
    }

    /// Keep every segment holding a record with id >= `id` through
    /// [`Queue::reclaim`], acked or not (0: keep none beyond the unacked).
    /// Not [`Queue::reclaim_space`]: a full disk or queue frees them.
    pub fn keep_from(&mut self, id: u64) {
        self.keep_from = id;
    }

    /// What the pipeline needs kept to rebuild dedup from the records
    /// created at or after `since_ms` instead of writing every key to its
    /// state file (issue 18): the id of the first such record (or the next
    /// id, if none), and whether every such record is still here, i.e. an
    /// older record is still on disk before them (records are deleted
    /// oldest first); then the id from which to keep records (the one before
    /// the first, so the next call finds an older record still here) and
    /// the bytes on disk from that record's segment on, unacked included.
    /// Ids follow `created_ms` as long as the wall clock does not step back.
    pub fn dedup_span(&self, since_ms: u64) -> DedupSpan {
        let i = self.index.partition_point(|e| e.created_ms < since_ms);
        let from = self.index.get(i).map_or(self.next_id, |e| e.id);
        let (complete, keep) = match i.checked_sub(1).map(|j| self.index[j].id) {
            Some(before) => (true, before),
            // Nothing older on disk: what came before may have been deleted,
            // unless nothing came before (the first id ever is 1).
            None => {
                let first = self.index.front().map_or(self.next_id, |e| e.id);
                (first == 1, first)
            }
        };
        let bytes = self.segments.iter().filter(|s| s.last_id >= keep).map(|s| s.len).sum();
        DedupSpan { from, complete, keep, bytes }
    }

    /// The most live bytes the queue keeps (`[store] max_bytes`).
    pub fn max_bytes(&self) -> u64 {
        self.opts.max_bytes
    }

    /// The bytes of the sealed segments `reclaim` would delete (all acked
    /// or dropped), not counting the one appended to (which, with an uplink
    /// that keeps up, is all acked most of the time: deleting it is worth no
    /// checkpoint of its own).
    pub fn reclaimable_sealed_bytes(&self) -> u64 {
        self.reclaimable_sealed_bytes_keeping(self.keep_from)
    }

    /// [`Queue::reclaimable_sealed_bytes`] were [`Queue::keep_from`] set to
    /// `keep` (0: none): whether moving the hold, which takes a checkpoint,
    /// would free enough.
    pub fn reclaimable_sealed_bytes_keeping(&self, keep: u64) -> u64 {
        let sealed = self.segments.len().saturating_sub(1);
        self.segments
            .iter()
            .take(sealed)
            .take_while(|s| s.last_id <= self.head && (keep == 0 || s.last_id < keep))
            .map(|s| s.len)
            .sum()
    }

    /// Delete segment files whose records are all acked or dropped; returns
    /// how many. Makes the ledger durable first, so a deleted record can
    /// never be one the ledger still calls pending. The unlinks themselves
    /// are not fsynced: a segment that comes back after a crash holds only
    /// records at or below the durable head and is deleted again.
    pub fn reclaim(&mut self) -> Result<u64> {
        self.reclaim_keeping(true)
    }

    /// As [`Queue::reclaim`], but for disk space (a record was refused):
    /// the kept segment files are deleted too, and none is kept.
    pub fn reclaim_space(&mut self) -> Result<u64> {
        self.writable()?;
        while self.spares.pop().is_some() {
            let path = self.seg_dir.join(spare_name(self.spares.len()));
            if let Err(e) = fs::remove_file(&path)
                && e.kind() != io::ErrorKind::NotFound
            {
                return Err(e).ctx("deleting kept segment", &path);
            }
        }
        self.reclaim_keeping(false)
    }

    fn reclaim_keeping(&mut self, keep_spares: bool) -> Result<u64> {
        self.writable()?;
        // `keep_spares` is the ordinary reclaim; without, disk space counts first.
        let hold = keep_spares;
        if !self.front_deletable(hold) {
            return Ok(0);
        }
        if self.head != self.ledger.state.acked_through {
            let hw = self.committed_id;
            if let Err(e) = self.write_ledger(hw) {
                self.failed = true;
                return Err(e);
            }
        }
        let durable = self.ledger.state.acked_through;
        let mut n = 0;
        while self.segments.front().is_some_and(|s| s.last_id <= durable && !(hold && self.held(s.last_id))) {
            // Keep a few files for the next rolls while the backlog is
            // small (module docs, "Reused segment files"); delete the rest.
            let s = &self.segments[0];
            let kept_bytes: u64 = self.spares.iter().map(|k| k.size).sum();
            // The segment appended to, partly filled, only if nothing else
            // is kept: a roll takes the last file kept first, and the rest
            // of a partly filled one takes zeros ahead.
            let sealed = self.segments.len() > 1;
            let keep = keep_spares
                && (sealed || self.spares.is_empty())
                && self.spares.len() < SPARES_MAX
                && (kept_bytes == 0 || kept_bytes + s.filled.max(s.len) <= self.opts.max_bytes / 8)
                && self.small_backlog();
            let kept = keep && fs::rename(&s.path, self.seg_dir.join(spare_name(self.spares.len()))).is_ok();
            match if kept { Ok(()) } else { fs::remove_file(&s.path) } {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(e).ctx("deleting segment", &s.path);
                }
                _ => {}
            }
            if let Err(e) = seg_index::remove(&s.path) {
                // Harmless: `open` removes indexes without a segment.
                tracing::warn!(segment = %s.path.display(), error = %e, "cannot delete segment index");
            }
            let s = self.segments.pop_front().unwrap();
            while self.index.front().is_some_and(|e| e.seg == s.first_id) {
                self.index.pop_front();
            }
            if kept {
                let size = s.file.metadata().map_or(s.filled, |m| m.len());
                self.spares.push(Spare { file: s.file, size });
            }
            if self.segments.is_empty() {
                // It was the active segment; its unsynced bytes are all acked.
                self.seg_dirty = false;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Live records only (appended, committed or not, and not acked/dropped).
    pub fn status(&self) -> QueueStatus {
        let first = self.first_live();
        let mut s = QueueStatus {
            batches: (self.index.len() - first) as u64,
            readings: self.live_readings,
            bytes: self.live_bytes,
            oldest_created_ms: self.index.get(first).map(|e| e.created_ms),
            ..Default::default()
        };
        for e in self.index.range(first..) {
            if e.priority() {
                s.priority_readings += e.count() as u64;
                s.priority_oldest_created_ms.get_or_insert(e.created_ms);
            } else if s.bulk_oldest_created_ms.is_none() {
                s.bulk_oldest_created_ms = Some(e.created_ms);
            }
        }
        s
    }

    /// Highest id in any segment file still on disk (acked or not), or the
    /// ledger's head if that is higher; 0 for a queue that never held anything.
    pub fn last_id_on_disk(&self) -> u64 {
        self.index.back().map_or(0, |e| e.last_id()).max(self.ledger.state.acked_through)
    }

    /// Every valid record still on disk with id > `after_id`, acked or not,
    /// committed or not (at open time everything on disk counts as committed).
    pub fn read_all_on_disk_after(&self, after_id: u64) -> Result<Vec<(RecordMeta, Vec<u8>)>> {
        let from = self.index.partition_point(|e| e.id <= after_id);
        self.index.range(from..).map(|e| self.read_entry(e)).collect()
    }

    /// Like [`Queue::read_all_on_disk_after`], but a record whose bytes fail
    /// their CRC is left out instead of failing the call; its id is returned
    /// in the second list (for start-up replays that must not stop at one
    /// rotten record in a sealed segment). I/O errors still fail the call.
    /// At most `max` records, valid or not.
    pub fn read_valid_on_disk_after(&self, after_id: u64, max: usize) -> Result<(Vec<Record>, Vec<u64>)> {
        let from = self.index.partition_point(|e| e.id <= after_id);
        let (mut ok, mut corrupt) = (Vec::new(), Vec::new());
        for e in self.index.range(from..).take(max) {
            match self.read_entry(e) {
                Ok(r) => ok.push(r),
                Err(QueueError::Corrupt { id, path }) => {
                    tracing::warn!(id, path = %path.display(), "queue record corrupt on disk; skipped");
                    corrupt.push(id);
                }
                Err(err) => return Err(err),
            }
        }
        Ok((ok, corrupt))
    }

    /// Total bytes of segment files + ledger on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum::<u64>() + self.ledger.len()
    }

    /// At a clean shutdown: cut off what follows the last record of the
    /// segment appended to (zeros ahead, a reused file's old records) and
    /// make that durable, so the next start finds the file ending at its
    /// last record. After a crash, `open` tells those bytes from a torn
    /// write itself.
    pub fn trim(&mut self) -> Result<()> {
        if self.writable().is_err() {
            return Ok(());
        }
        let Some(s) = self.segments.back_mut().filter(|s| s.filled > s.len) else {
            return Ok(());
        };
        s.file.set_len(s.len).ctx("truncating", &s.path)?;
        s.filled = s.len;
        s.file.sync_data().ctx("syncing", &s.path)?;
        s.synced_len = s.len;
        self.fsyncs += 1;
        Ok(())
    }

    /// Commits that wrote their records with a direct write ("Direct
    /// commits" in the module docs).
    pub fn direct_commits(&self) -> u64 {
        self.direct_commits
    }

    /// Segment files a roll reused instead of creating one.
    pub fn reused_segments(&self) -> u64 {
        self.reused_segments
    }

    /// How many segments `open` loaded from their `.idx` file without reading
    /// (or CRC-checking) their bytes; see the module docs.
    pub fn indexed_segments(&self) -> u64 {
        self.indexed_segments
    }

    /// Number of fsync/fdatasync calls made so far (files and directories).
    pub fn fsyncs(&self) -> u64 {
        self.fsyncs
    }

    /// Payload bytes deflated records did not store, so far (module docs,
    /// "Deflated records").
    pub fn deflate_saved_bytes(&self) -> u64 {
        self.deflate_saved
    }

    /// Bytes of padding commits wrote so far (see the module docs).
    pub fn pad_bytes(&self) -> u64 {
        self.pad_bytes
    }

    /// Bytes of zeros written ahead of segments' ends so far.
    pub fn prefill_bytes(&self) -> u64 {
        self.prefill_bytes
    }

    /// The ledger head as last written (and synced).
    #[cfg(test)]
    fn durable_acked_through(&self) -> u64 {
        self.ledger.state.acked_through
    }

    /// (path, synced length) of every segment with bytes not yet fsynced:
    /// what a power cut now would cut (for [`crate::crashpoint::hit_losing`]).
    pub fn unsynced_segments(&self) -> Vec<(PathBuf, u64)> {
        self.segments.iter().filter(|s| s.len > s.synced_len).map(|s| (s.path.clone(), s.synced_len)).collect()
    }
}
