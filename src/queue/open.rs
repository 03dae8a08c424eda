//! Opening the queue: list the segments, check or trust each one, repair
//! what a crash left, rebuild the index, read the ledger (the format and
//! its rules are in [`super`]).

use super::*;

/// `<20 digits>.seg` → first id.
pub(super) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

/// Segment files sorted by first id. A missing directory is an empty queue.
fn list_segments(seg_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let rd = match fs::read_dir(seg_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).ctx("listing", seg_dir),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.ctx("listing", seg_dir)?;
        if let Some(id) = ent.file_name().to_str().and_then(parse_segment_name) {
            out.push((id, ent.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Remove temp files a crash left mid-repair or mid-compaction: the rename
/// never happened, so the originals are still authoritative.
fn remove_stale_temps(dir: &Path, seg_dir: &Path) -> Result<()> {
    let lt = dir.join("ledger.tmp");
    match fs::remove_file(&lt) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e).ctx("removing", &lt),
        _ => {}
    }
    for ent in fs::read_dir(seg_dir).ctx("listing", seg_dir)? {
        let p = ent.ctx("listing", seg_dir)?.path();
        if p.extension().is_some_and(|e| e == "tmp") {
            fs::remove_file(&p).ctx("removing", &p)?;
        }
    }
    Ok(())
}

/// Remove `.idx` files whose segment is gone (a crash after a reclaim or
/// removal unlinked the segment but lost the index's unlink), so a segment
/// created later under the same name never meets a stale index.
fn remove_orphan_indexes(seg_dir: &Path, segs: &[(u64, PathBuf)]) -> Result<()> {
    for ent in fs::read_dir(seg_dir).ctx("listing", seg_dir)? {
        let p = ent.ctx("listing", seg_dir)?.path();
        let id = p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".idx")).and_then(|d| {
            (d.len() == 20 && d.bytes().all(|b| b.is_ascii_digit())).then(|| d.parse::<u64>().ok()).flatten()
        });
        if let Some(id) = id
            && segs.binary_search_by_key(&id, |s| s.0).is_err()
        {
            fs::remove_file(&p).ctx("removing orphan index", &p)?;
        }
    }
    Ok(())
}

impl Queue {
    /// Open (creating the dir if needed) for writing, holding `dir/lock`.
    /// Loads sealed segments from valid `.idx` files, validates every record
    /// of the others (always the last), truncates a torn tail, repairs
    /// corruption, rebuilds the index and reads the ledger. Everything on
    /// disk counts as committed afterwards.
    pub fn open(dir: &Path, opts: QueueOptions) -> Result<(Queue, OpenReport)> {
        Self::open_impl(dir, opts, false)
    }

    /// Open without the lock and without modifying anything (for `queue
    /// status` / `queue dump` while the gateway runs). Corrupt or torn data
    /// is skipped in memory only; write methods return `ReadOnly`.
    pub fn open_readonly(dir: &Path) -> Result<(Queue, OpenReport)> {
        // Read-only inspection is for operators: fast, and corruption in a
        // sealed segment surfaces as `Corrupt` on read anyway.
        let opts = QueueOptions {
            max_bytes: u64::MAX,
            when_full: WhenFull::RejectNew,
            segment_bytes: u64::MAX,
            trust_index: true,
            compress: false,
        };
        Self::open_impl(dir, opts, true)
    }

    fn open_impl(dir: &Path, opts: QueueOptions, readonly: bool) -> Result<(Queue, OpenReport)> {
        let seg_dir = dir.join("segments");
        let mut fsyncs = 0;
        let lock = if readonly {
            // A typo in --data-dir should say so, not report an empty queue.
            fs::metadata(dir).ctx("opening queue directory", dir)?;
            None
        } else {
            let fresh = !dir.exists();
            fs::create_dir_all(&seg_dir).ctx("creating", &seg_dir)?;
            if fresh {
                // The new directory's own entry must be durable too, or a
                // power cut could take the whole queue with it.
                if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                    sync_dir(parent, &mut fsyncs).ctx("syncing directory", parent)?;
                }
            }
            let lock_path = dir.join("lock");
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&lock_path)
                .ctx("opening", &lock_path)?;
            match f.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Err(QueueError::Locked),
                Err(TryLockError::Error(e)) => return Err(e).ctx("locking", &lock_path),
            }
            remove_stale_temps(dir, &seg_dir)?;
            Some(f)
        };

        let loaded = Ledger::load(dir).ctx("reading", &Ledger::path_in(dir))?;
        let mut report = OpenReport::default();
        let mut segments = VecDeque::new();
        let mut index = VecDeque::new();
        let mut last_id = 0;
        let names = list_segments(&seg_dir)?;
        if !readonly {
            remove_orphan_indexes(&seg_dir, &names)?;
        }
        let n = names.len();
        let mut indexed_segments = 0;
        for (i, (first_id, path)) in names.into_iter().enumerate() {
            let is_last = i + 1 == n;
            // Whether a valid index describes this sealed segment as it is.
            let mut has_index = false;
            if !is_last {
                // A sealed segment: with `trust_index`, a valid index whose
                // recorded length matches the file stands in for reading the
                // segment's bytes.
                let file = match OpenOptions::new().read(true).write(!readonly).open(&path) {
                    Ok(f) => f,
                    // A running gateway may reclaim it between listing and reading.
                    Err(e) if readonly && e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e).ctx("opening", &path),
                };
                let len = file.metadata().ctx("reading metadata of", &path)?.len();
                if let Some(records) = seg_index::load(&path, len, first_id, last_id) {
                    if opts.trust_index {
                        index.extend(records.iter().map(|r| Entry::new(r, first_id)));
                        last_id = index.back().expect("records").last_id();
                        segments.push_back(Segment::new(first_id, path, file, len, last_id, len));
                        indexed_segments += 1;
                        continue;
                    }
                    has_index = true;
                }
            }
            if !readonly && !has_index {
                // Whatever index there is does not describe this file (or it
                // is the last segment, which will be appended to): remove it
                // before the segment is truncated or repaired. The removal is
                // durable with the directory fsync at the end of `open`.
                seg_index::remove(&path).ctx("removing stale index of", &path)?;
            }
            let bytes = match fs::read(&path) {
                Ok(b) => b,
                // A running gateway may reclaim it between listing and reading.
                Err(e) if readonly && e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).ctx("reading", &path),
            };
            // Every record of a segment has at least the id in its name:
            // older ones in it are from the file's earlier use (reused).
            let scan = segment::scan(&bytes, last_id.max(first_id.saturating_sub(1)));
            let tail = scan.tail_start.map(|t| (t, bytes.len() as u64 - t));
            let mut corrupt = scan.corrupt_regions;
            // After the last record: zeros written ahead (or an append whose
            // data never reached the disk) and a reused file's old records
            // are not damage; bytes before them are (a torn write). All of
            // it is cut off below.
            let damaged =
                tail.map_or(0, |(t, n)| segment::old_from(&bytes, t as usize, first_id).map_or(n, |q| q as u64 - t));
            match tail {
                _ if damaged == 0 => {}
                Some(_) if is_last => report.truncated_bytes += damaged,
                Some(_) => corrupt += 1,
                None => {}
            }
            report.corrupt_records += corrupt;
            if corrupt > 0 {
                tracing::warn!(
                    segment = %path.display(),
                    corrupt_regions = corrupt,
                    kept = scan.records.len(),
                    "queue segment corrupt; skipping bad bytes{}",
                    if readonly { "" } else { " and repairing" }
                );
            }
            let mut records = scan.records;
            let mut len = bytes.len() as u64;
            if records.is_empty() {
                // Empty, all torn, or all garbage: nothing to keep.
                if !readonly {
                    fs::remove_file(&path).ctx("removing empty segment", &path)?;
                    if corrupt > 0 {
                        report.repaired_segments += 1;
                    }
                }
                continue;
            }
            if !readonly {
                if has_index && (corrupt > 0 || tail.is_some()) {
                    // The full check found what the index did not know.
                    seg_index::remove(&path).ctx("removing stale index of", &path)?;
                    has_index = false;
                }
                if corrupt > 0 {
                    len = Self::rewrite_segment(&path, &bytes, &mut records, &mut fsyncs)?;
                    report.repaired_segments += 1;
                } else if let Some((start, _)) = tail {
                    let f = OpenOptions::new().write(true).open(&path).ctx("opening", &path)?;
                    f.set_len(start).ctx("truncating torn tail of", &path)?;
                    f.sync_data().ctx("syncing", &path)?;
                    fsyncs += 1;
                    len = start;
                }
                if !is_last && !has_index {
                    // Sealed, and now verified (and synced, if repaired): index
                    // it so the next start need not read it again.
                    if let Err(e) = seg_index::write(&path, first_id, len, &records, &mut fsyncs) {
                        tracing::warn!(segment = %path.display(), error = %e, "cannot write segment index");
                    }
                }
            }
            let file = match OpenOptions::new()
                .read(true)
                // Writable in every segment: if the last file turns out empty
                // and is removed, the one before it becomes the append target.
                .write(!readonly)
                .open(&path)
            {
                Ok(f) => f,
                // Reclaimed by a running gateway since it was read (seen in
                // CI: `queue status` while the uplink drained).
                Err(e) if readonly && e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).ctx("opening", &path),
            };
            index.extend(records.iter().map(|r| Entry::new(r, first_id)));
            // A record may own several ids (its span).
            last_id = index.back().expect("records").last_id();
            segments.push_back(Segment::new(first_id, path, file, len, last_id, len));
        }
        if !readonly && let Some(s) = segments.back() {
            // The append target (possibly an indexed segment whose successor
            // was empty and removed) must not keep an index: it will grow.
            seg_index::remove(&s.path).ctx("removing index of", &s.path)?;
        }

        let st = loaded.state;
        let next_id = last_id.max(st.acked_through).max(st.high_water) + 1;
        let mut ledger = Ledger::new(dir, &loaded);
        if !readonly {
            // What we just read may only be in the page cache (the previous
            // process was killed, not the power): make it durable before
            // calling it committed. Older segments were synced when rolled.
            if let Some(s) = segments.back() {
                s.file.sync_data().ctx("syncing", &s.path)?;
                fsyncs += 1;
            }
            let lp = Ledger::path_in(dir);
            if loaded.clean {
                ledger.sync_existing(&mut fsyncs).ctx("syncing", &lp)?;
            } else {
                // A torn entry would misalign later appends.
                ledger.compact(st, &mut fsyncs).ctx("compacting", &lp)?;
            }
            sync_dir(&seg_dir, &mut fsyncs).ctx("syncing directory", &seg_dir)?;
            sync_dir(dir, &mut fsyncs).ctx("syncing directory", dir)?;
        }

        let seg_limit = opts.segment_bytes.min((opts.max_bytes / 4).max(4096));
        let mut q = Queue {
            dir: dir.to_path_buf(),
            seg_dir,
            opts,
            seg_limit,
            readonly,
            lock,
            segments,
            index,
            head: st.acked_through,
            next_id,
            committed_id: next_id - 1,
            commits: tokio::sync::watch::Sender::new(next_id - 1),
            live_bytes: 0,
            live_readings: 0,
            ledger,
            seg_dirty: false,
            seg_dir_dirty: false,
            force_roll: false,
            last_evicted: None,
            failed: false,
            fsyncs,
            indexed_segments,
            ledger_at: None,
            ledger_every: super::LEDGER_EVERY,
            pad_bytes: 0,
            pad_min_segment: super::PAD_MIN_SEGMENT,
            sealing: false,
            prefill_bytes: 0,
            spares: Vec::new(),
            reused_segments: 0,
            direct_off: false,
            hold_block_for_tests: None,
            deflate_saved: 0,
            direct_commits: 0,
            keep_from: 0,
        };
        for e in q.index.range(q.first_live()..) {
            q.live_bytes += e.total as u64;
            q.live_readings += e.count() as u64;
        }
        report.records = q.live_count() as u64;
        Ok((q, report))
    }

    /// Write only the valid `records` of `bytes` to a temp file, fsync, rename
    /// over `path`. Updates the records' offsets; returns the new length.
    /// The directory fsync that makes the rename durable happens once at the
    /// end of `open`.
    fn rewrite_segment(path: &Path, bytes: &[u8], records: &mut [RecInfo], fsyncs: &mut u64) -> Result<u64> {
        let mut out = Vec::with_capacity(bytes.len());
        for r in records.iter_mut() {
            let start = r.offset as usize;
            r.offset = out.len() as u64;
            out.extend_from_slice(&bytes[start..start + r.total as usize]);
        }
        replace_file(&path.with_extension("seg.tmp"), path, &out, fsyncs).ctx("rewriting repaired segment", path)?;
        Ok(out.len() as u64)
    }
}
