//! Small logs that write disk sectors, not pages.
//!
//! The uplink's PUBREC log and the queue's ack ledger append 13-20-byte
//! entries and fdatasync them up to a few times a second at a site's pace.
//! Through the page cache each of those fdatasyncs writes the whole 4 KiB
//! page the entry landed in (the kernel dirties, counts and writes pages):
//! 200-300 times the entry, and at a site's pace the largest share of what
//! the gateway wrote. A [`SectorFile`] opens its file with `O_DIRECT` where
//! the file system supports it and writes only the device's logical blocks
//! (512 bytes on an SD card) that hold new bytes: the last, partial block is
//! kept in memory and written again, padded with zeros, with each append.
//! So the file on disk may end in zeros after its last entry until the next
//! open cuts them off; readers take zeros after the last valid entry as the
//! end of the log ([`only_zeros`]).
//!
//! Where `O_DIRECT` is refused, or `statx` reports no direct-I/O alignment
//! (tmpfs, kernels before 6.1, some network file systems), it appends through
//! the page cache as before. Durability is the same either way: nothing
//! counts until the caller's [`SectorFile::sync_data`] (a direct write may
//! still sit in the device's cache until then). A power cut during an append
//! can tear the block it rewrites, which holds earlier entries: the page cache
//! rewrote the whole page around them, so the exposure is smaller, not new.
//!
//! The number of writes is unchanged (one per append); what an SD card's
//! controller makes of a 512-byte write is its own business (many program a
//! whole flash page either way). What the host sends is ~8× less.
//!
//! *Zeros ahead:* an append that would end past the file's size writes
//! [`ZEROS_AHEAD`] of zeros after its bytes in the same write(2), so the
//! appends after it overwrite blocks within the file's size. On a journalling
//! file system (a Pi's ext4) an fdatasync after a write that grew the file
//! commits a journal transaction (the new size and blocks: a few 4 KiB
//! blocks, written to the journal and again in place), and a direct write
//! grows the file with every block it starts: that was one journal commit
//! per ~512 bytes of log, several times the bytes of the log itself. Now it
//! is one per 32 KiB. The zeros read as the end of the log, like the
//! padding of the last block.

use nix::libc;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// How far past an append's end the file is grown with zeros, when it
/// grows at all (see the module docs).
pub(crate) const ZEROS_AHEAD: u64 = 32 << 10;

/// Memory alignment of the buffers handed to direct writes (at least what
/// any device asks for; `statx` reports 4-512 bytes on common ones).
const MEM_ALIGN: usize = 4096;

/// Nothing but zero bytes: the zero padding after a log's last entry.
pub(crate) fn only_zeros(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// An append-only file whose entries end at [`SectorFile::len`].
pub(crate) struct SectorFile {
    path: PathBuf,
    file: File,
    len: u64,
    /// The file's size on disk: `len`, and zeros after it.
    size: u64,
    direct: Option<Direct>,
}

struct Direct {
    /// The device's logical block: offsets and lengths are multiples of it.
    block: u64,
    /// The file's bytes from the start of the block holding `len` to `len`.
    tail: Vec<u8>,
    /// Scratch for the aligned write, over-allocated by `MEM_ALIGN`.
    scratch: Vec<u8>,
}

impl SectorFile {
    /// Open (or create) `path`, whose entries end at `len`: anything after
    /// it (zero padding, a torn entry) is cut off now.
    pub fn open(path: &Path, len: u64) -> io::Result<SectorFile> {
        let opts = |flags| {
            let mut o = OpenOptions::new();
            o.write(true).create(true).truncate(false).custom_flags(flags);
            o
        };
        let (file, block) = match opts(libc::O_DIRECT).open(path) {
            Ok(f) => match dio_block(&f) {
                Some(block) => (f, Some(block)),
                None => (opts(0).open(path)?, None),
            },
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (opts(0).open(path)?, None),
            Err(e) => return Err(e),
        };
        if file.metadata()?.len() != len {
            file.set_len(len)?;
        }
        let mut f = SectorFile { path: path.to_path_buf(), file, len, size: len, direct: None };
        if let Some(block) = block {
            f.direct = Some(Direct { block, tail: Vec::new(), scratch: Vec::new() });
            f.load_tail()?;
        }
        Ok(f)
    }

    /// Whether appends write blocks directly (else through the page cache).
    #[cfg(test)]
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The block direct appends write in, if they do.
    #[cfg(test)]
    pub fn block(&self) -> Option<u64> {
        self.direct.as_ref().map(|d| d.block)
    }

    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Write `bytes` after the last entry (not yet durable: see
    /// [`SectorFile::sync_data`]). On an error the file may hold part of
    /// them: [`SectorFile::truncate`] to the old length cuts that off.
    pub fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        // The end of the file after this write: past the current size, it
        // grows by `ZEROS_AHEAD` of zeros more (page-aligned).
        let grow = |end: u64, size: u64| if end > size { (end + ZEROS_AHEAD).next_multiple_of(4096) } else { end };
        let Some(d) = &mut self.direct else {
            let end = grow(self.len + bytes.len() as u64, self.size);
            let mut buf = bytes.to_vec();
            buf.resize((end - self.len) as usize, 0);
            self.file.write_all_at(&buf, self.len)?;
            self.len += bytes.len() as u64;
            self.size = self.size.max(end);
            return Ok(());
        };
        let start = self.len - d.tail.len() as u64;
        let data = d.tail.len() + bytes.len();
        let padded = grow(start + (data as u64).div_ceil(d.block) * d.block, self.size) - start;
        let buf = aligned_zeros(&mut d.scratch, padded as usize);
        buf[..d.tail.len()].copy_from_slice(&d.tail);
        buf[d.tail.len()..data].copy_from_slice(bytes);
        match self.file.write_at(buf, start) {
            Ok(n) if n == buf.len() => {}
            Ok(n) => return Err(io::Error::other(format!("short direct write: {n} of {} bytes", buf.len()))),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // The alignment statx promised was refused: append through
                // the page cache from now on (nothing was written).
                self.to_page_cache(format_args!("direct write refused ({e})"))?;
                return self.append(bytes);
            }
            Err(e) => return Err(e),
        }
        self.len += bytes.len() as u64;
        self.size = self.size.max(start + padded);
        let keep = (self.len % d.block) as usize;
        d.tail.clear();
        d.tail.extend_from_slice(&buf[data - keep..data]);
        Ok(())
    }

    /// Make every append so far durable.
    pub fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Cut the file to `len` (a partial append, or entries dropped).
    pub fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        (self.len, self.size) = (len, len);
        if let Err(e) = self.load_tail() {
            // Without the last block's bytes a direct append would write
            // over them.
            self.to_page_cache(format_args!("cannot read its last block back ({e})"))?;
        }
        Ok(())
    }

    /// Append through the page cache from now on (`why` is logged).
    fn to_page_cache(&mut self, why: std::fmt::Arguments) -> io::Result<()> {
        tracing::warn!("{}: {why}; appending through the page cache", self.path.display());
        self.file = OpenOptions::new().write(true).open(&self.path)?;
        self.direct = None;
        Ok(())
    }

    fn load_tail(&mut self) -> io::Result<()> {
        if let Some(d) = &mut self.direct {
            let start = self.len - self.len % d.block;
            d.tail.resize((self.len - start) as usize, 0);
            // A buffered read: the direct fd only reads whole blocks.
            File::open(&self.path)?.read_exact_at(&mut d.tail, start)?;
        }
        Ok(())
    }
}

/// `len` zero bytes of `scratch` at an address direct I/O accepts
/// (`scratch` is over-allocated by [`MEM_ALIGN`] to find one).
pub(crate) fn aligned_zeros(scratch: &mut Vec<u8>, len: usize) -> &mut [u8] {
    scratch.clear();
    scratch.resize(len + MEM_ALIGN, 0);
    let at = scratch.as_ptr().align_offset(MEM_ALIGN);
    &mut scratch[at..at + len]
}

/// Open `path` for direct writes, with the offset alignment they need, if
/// the kernel and the file system offer one we can meet.
pub(crate) fn open_direct(path: &Path) -> Option<(File, u64)> {
    let f = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).ok()?;
    let block = dio_block(&f)?;
    Some((f, block))
}

/// The offset alignment direct I/O needs on `file`, if the kernel and the
/// file system report one we can meet.
fn dio_block(file: &File) -> Option<u64> {
    // SAFETY: statx is plain data; the kernel fills what the mask names.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    let (off, mem) = (stx.stx_dio_offset_align as usize, stx.stx_dio_mem_align as usize);
    let fits = |a: usize| a.is_power_of_two() && a <= MEM_ALIGN;
    (fits(off) && fits(mem)).then_some(off as u64)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// This thread's write_bytes (/proc/thread-self/io): what it sent to
    /// block devices, whatever other tests in the process write meanwhile.
    pub(crate) fn write_bytes() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
        io.lines().find_map(|l| l.strip_prefix("write_bytes: ")).unwrap().trim().parse().unwrap()
    }

    /// A directory on a disk file system (/tmp is tmpfs on some systems):
    /// beside this test binary, in the build's target dir.
    pub(crate) fn disk_dir() -> tempfile::TempDir {
        let exe = std::env::current_exe().unwrap();
        tempfile::tempdir_in(exe.parent().unwrap()).unwrap()
    }

    #[test]
    fn appends_read_back_whole_after_reopen_and_cut_offs() {
        let dir = disk_dir();
        let p = dir.path().join("log");
        let mut f = SectorFile::open(&p, 0).unwrap();
        let mut want = Vec::new();
        for i in 0..300u32 {
            let e: Vec<u8> = (0..13).map(|k| (i as u8).wrapping_mul(7).wrapping_add(k) | 1).collect();
            f.append(&e).unwrap();
            want.extend_from_slice(&e);
        }
        f.sync_data().unwrap();
        let disk = std::fs::read(&p).unwrap();
        assert_eq!(&disk[..want.len()], &want[..], "every entry as written, in order");
        assert!(only_zeros(&disk[want.len()..]), "only zero padding after the last entry");
        if f.is_direct() {
            assert_eq!(disk.len() as u64 % dio_block(&f.file).unwrap(), 0, "whole blocks written");
        }
        // A partial append is cut off again; the next append follows the last entry.
        let len = f.len();
        f.append(&[0xAB; 5]).unwrap();
        f.truncate(len).unwrap();
        f.append(b"next").unwrap();
        drop(f);
        want.extend_from_slice(b"next");
        let mut f = SectorFile::open(&p, want.len() as u64).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), want, "open cuts the zero padding off");
        f.append(b"!").unwrap();
        want.push(b'!');
        assert_eq!(&std::fs::read(&p).unwrap()[..want.len()], &want[..]);
    }

    /// The point of it: on a disk file system with direct I/O, 100 appends
    /// of 13 bytes, each fdatasynced, send ~100 blocks, not ~100 pages.
    #[test]
    fn synced_small_appends_write_blocks_not_pages() {
        let dir = disk_dir();
        let mut f = SectorFile::open(&dir.path().join("log"), 0).unwrap();
        assert!(
            f.is_direct(),
            "direct I/O unavailable in {} (statx reports no alignment): this test needs ext4/xfs/btrfs on Linux >= 6.1",
            dir.path().display()
        );
        let block = dio_block(&f.file).unwrap();
        let before = write_bytes();
        for i in 0..100u8 {
            f.append(&[i | 1; 13]).unwrap();
            f.sync_data().unwrap();
        }
        let wrote = write_bytes() - before;
        // Allow the zeros ahead and a few blocks more for ext4's allocation
        // of the file's first page.
        assert!(
            wrote <= 100 * block + ZEROS_AHEAD + 4 * 4096,
            "wrote {wrote} bytes for 100 synced appends of 13 bytes (block {block})"
        );
    }

    /// Zeros ahead: 3,000 appends of 13 bytes (39 KB) change the file's
    /// size twice, not with every block (direct) or append (page cache),
    /// and read back whole, the zeros after them read as the end.
    #[test]
    fn appends_grow_the_file_once_per_zeros_ahead() {
        let dir = disk_dir();
        let p = dir.path().join("log");
        let mut f = SectorFile::open(&p, 0).unwrap();
        let mut sizes = std::collections::BTreeSet::new();
        let mut want = Vec::new();
        for i in 0..3000u32 {
            let e: Vec<u8> = (0..13u8).map(|k| (i as u8) ^ k | 1).collect();
            f.append(&e).unwrap();
            want.extend_from_slice(&e);
            sizes.insert(std::fs::metadata(&p).unwrap().len());
        }
        // The first append's end + 32 KiB, page-aligned; then again past it.
        assert_eq!(sizes, [36 << 10, 72 << 10].into(), "the sizes the file had");
        let disk = std::fs::read(&p).unwrap();
        assert_eq!(&disk[..want.len()], &want[..]);
        assert!(only_zeros(&disk[want.len()..]));
    }
}
