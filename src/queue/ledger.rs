//! The ack ledger: an append-only file of fixed 20-byte entries
//! `[acked_through u64 LE][high_water u64 LE][crc32 u32 LE]` (CRC over the
//! first 16 bytes). The last valid entry wins.
//!
//! Why append-only entries instead of one rewritten 16-byte file: rewriting a
//! small file in place on every commit wears an SD card's erase blocks and is
//! not atomic; appending 20 bytes is both cheap and torn-write safe (a torn
//! entry fails its CRC and the previous one still stands). The file is
//! compacted (rewrite-to-temp, fsync, rename, fsync dir) when it passes
//! [`COMPACT_AT`], i.e. about once every 3,000 ledger updates. Appends
//! write 512-byte blocks where the file system allows, so the file may end
//! in zeros after its last entry ([`super::SectorFile`]).

use super::sector::{SectorFile, only_zeros};
use super::segment::CRC;
use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

pub(crate) const ENTRY_BYTES: u64 = 20;
/// Compact once the file would grow past this.
pub(crate) const COMPACT_AT: u64 = 64 << 10;

/// The state one ledger entry records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LedgerState {
    /// Every record with an id <= this was acked or dropped.
    pub acked_through: u64,
    /// The highest id known committed when the entry was written. Lets
    /// `next_id` stay above ids whose segments are already gone, even if the
    /// last committed record was later damaged.
    pub high_water: u64,
}

impl LedgerState {
    fn encode(self) -> [u8; ENTRY_BYTES as usize] {
        let mut e = [0u8; ENTRY_BYTES as usize];
        e[0..8].copy_from_slice(&self.acked_through.to_le_bytes());
        e[8..16].copy_from_slice(&self.high_water.to_le_bytes());
        let crc = CRC.checksum(&e[..16]);
        e[16..20].copy_from_slice(&crc.to_le_bytes());
        e
    }

    fn decode(e: &[u8]) -> Option<Self> {
        let crc = u32::from_le_bytes(e[16..20].try_into().unwrap());
        (CRC.checksum(&e[..16]) == crc).then(|| LedgerState {
            acked_through: u64::from_le_bytes(e[0..8].try_into().unwrap()),
            high_water: u64::from_le_bytes(e[8..16].try_into().unwrap()),
        })
    }
}

/// What [`Ledger::load`] found on disk.
pub(crate) struct Loaded {
    pub state: LedgerState,
    /// False if there is a torn or corrupt entry (or a partial one that
    /// would misalign later appends): the writer must compact before appending.
    pub clean: bool,
    /// Where the entries end (zero padding after them not counted).
    pub len: u64,
}

pub(crate) struct Ledger {
    path: PathBuf,
    tmp_path: PathBuf,
    /// Opened lazily on the first write, so a queue that never acks never
    /// creates the file (and `open_readonly` never creates anything).
    file: Option<SectorFile>,
    len: u64,
    /// Compaction threshold; [`COMPACT_AT`] except in tests, which lower it
    /// rather than issue thousands of fsyncs.
    pub compact_at: u64,
    /// The state of the last entry written (and synced — every write is
    /// followed by a sync before the caller relies on it).
    pub state: LedgerState,
}

impl Ledger {
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join("ledger")
    }

    /// Read the ledger, ignoring invalid entries. A missing file is an empty ledger.
    pub fn load(dir: &Path) -> io::Result<Loaded> {
        let bytes = match fs::read(Self::path_in(dir)) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut state = LedgerState::default();
        let mut clean = true;
        let mut len = bytes.len();
        for (at, chunk) in (0..).step_by(ENTRY_BYTES as usize).zip(bytes.chunks(ENTRY_BYTES as usize)) {
            if only_zeros(&bytes[at..]) {
                // The zero padding of a direct append (no entry is all zeros).
                len = at;
                break;
            }
            match (chunk.len() == ENTRY_BYTES as usize).then(|| LedgerState::decode(chunk)).flatten() {
                Some(s) => state = s,
                None => clean = false,
            }
        }
        Ok(Loaded { state, clean, len: len as u64 })
    }

    pub fn new(dir: &Path, loaded: &Loaded) -> Self {
        Ledger {
            path: Self::path_in(dir),
            tmp_path: dir.join("ledger.tmp"),
            file: None,
            len: loaded.len,
            compact_at: COMPACT_AT,
            state: loaded.state,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Make `state` durable: append one entry + fdatasync, or compact when
    /// the file is big. Returns whether the file may have been created, in
    /// which case the caller must fsync the directory too.
    pub fn write(&mut self, state: LedgerState, fsyncs: &mut u64) -> io::Result<bool> {
        if self.len + ENTRY_BYTES > self.compact_at {
            self.compact(state, fsyncs)?;
            return Ok(false);
        }
        // A file we open while it is empty may be brand new: its directory
        // entry is not durable until the caller fsyncs the directory.
        let created = self.file.is_none() && self.len == 0;
        if self.file.is_none() {
            self.file = Some(SectorFile::open(&self.path, self.len)?);
        }
        let f = self.file.as_mut().unwrap();
        if let Err(e) = f.append(&state.encode()) {
            // Leave no partial entry behind to misalign the next append.
            let _ = f.truncate(self.len);
            return Err(e);
        }
        self.len += ENTRY_BYTES;
        f.sync_data()?;
        *fsyncs += 1;
        self.state = state;
        Ok(created)
    }

    /// Replace the file with a single entry holding `state`: write a temp
    /// file, fsync it, rename it over the ledger, fsync the directory. At every
    /// instant either the old or the new ledger is the one on disk.
    pub fn compact(&mut self, state: LedgerState, fsyncs: &mut u64) -> io::Result<()> {
        drop(super::replace_file(&self.tmp_path, &self.path, &state.encode(), fsyncs)?);
        super::sync_dir(self.path.parent().unwrap(), fsyncs)?;
        self.file = Some(SectorFile::open(&self.path, ENTRY_BYTES)?);
        self.len = ENTRY_BYTES;
        self.state = state;
        Ok(())
    }

    /// fdatasync the ledger as it is (used at start-up: entries a killed
    /// process wrote may still sit only in the page cache).
    pub fn sync_existing(&self, fsyncs: &mut u64) -> io::Result<()> {
        match OpenOptions::new().write(true).open(&self.path) {
            Ok(f) => {
                f.sync_data()?;
                *fsyncs += 1;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_valid_entry_wins_and_torn_entries_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut n = 0;
        let mut l = Ledger::new(dir.path(), &Ledger::load(dir.path()).unwrap());
        assert!(l.write(LedgerState { acked_through: 5, high_water: 9 }, &mut n).unwrap());
        assert!(!l.write(LedgerState { acked_through: 7, high_water: 9 }, &mut n).unwrap());
        let got = Ledger::load(dir.path()).unwrap();
        assert!(got.clean);
        assert_eq!(got.state, LedgerState { acked_through: 7, high_water: 9 });

        // A torn third entry: the second still stands, and the file is flagged.
        let p = Ledger::path_in(dir.path());
        let mut bytes = fs::read(&p).unwrap();
        bytes.extend_from_slice(&[1, 2, 3]);
        fs::write(&p, &bytes).unwrap();
        let got = Ledger::load(dir.path()).unwrap();
        assert!(!got.clean);
        assert_eq!(got.state.acked_through, 7);
    }

    #[test]
    fn compaction_keeps_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut n = 0;
        let mut l = Ledger::new(dir.path(), &Ledger::load(dir.path()).unwrap());
        l.compact_at = 10 * ENTRY_BYTES;
        let last = 25;
        for i in 1..=last {
            l.write(LedgerState { acked_through: i, high_water: i + 1 }, &mut n).unwrap();
            assert!(l.len() <= l.compact_at);
        }
        let got = Ledger::load(dir.path()).unwrap();
        assert!(got.clean);
        assert_eq!(got.state, LedgerState { acked_through: last, high_water: last + 1 });
        assert_eq!(got.len, 5 * ENTRY_BYTES, "compacted at 21, then 4 appends");
        assert!(!dir.path().join("ledger.tmp").exists());
    }

    /// A direct append leaves zeros after the last entry, up to the end of
    /// its 512-byte block (whatever file system this test runs on, the zeros
    /// are written here by hand): they end the ledger, they are no torn entry.
    #[test]
    fn zeros_after_the_last_entry_are_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = Ledger::path_in(dir.path());
        let (a, b) =
            (LedgerState { acked_through: 256, high_water: 0 }, LedgerState { acked_through: 3, high_water: 4 });
        let entries = [a.encode(), b.encode()].concat();
        for zeros in [0, 1, 19, 20, 512 - 40, 4096] {
            fs::write(&p, [&entries[..], &vec![0; zeros]].concat()).unwrap();
            let got = Ledger::load(dir.path()).unwrap();
            assert!(got.clean, "{zeros} zeros");
            assert_eq!((got.state, got.len), (b, 2 * ENTRY_BYTES), "{zeros} zeros");
            // The next append goes right after the last entry.
            let mut n = 0;
            let mut l = Ledger::new(dir.path(), &got);
            l.write(a, &mut n).unwrap();
            let got = Ledger::load(dir.path()).unwrap();
            assert_eq!((got.state, got.len, got.clean), (a, 3 * ENTRY_BYTES, true), "{zeros} zeros");
        }
        // Zeros with something after them are a damaged file, not padding.
        fs::write(&p, [&entries[..], &[0; 30], &[7]].concat()).unwrap();
        assert!(!Ledger::load(dir.path()).unwrap().clean);
    }
}
