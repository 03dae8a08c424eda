//! Queue tests: round trips, crash shapes (torn tails, flipped bytes),
//! both full policies, ack/reclaim, a model-based random test, read-only
//! opening and the lock.

use super::sector::tests::{disk_dir, write_bytes};
use super::segment::{self, OVERHEAD, PAGE};
use super::*;
use std::collections::{HashMap, HashSet};
use tempfile::TempDir;

fn opts(max_bytes: u64, when_full: WhenFull, segment_bytes: u64) -> QueueOptions {
    QueueOptions { max_bytes, when_full, segment_bytes, trust_index: true, compress: false }
}

fn big() -> QueueOptions {
    opts(1 << 30, WhenFull::DropOldest, 8 << 20)
}

fn tmp() -> TempDir {
    tempfile::tempdir().unwrap()
}

/// tmpfs when available, for tests about logic rather than fsync latency.
fn fast_tmp() -> TempDir {
    if Path::new("/dev/shm").is_dir() { tempfile::tempdir_in("/dev/shm").unwrap() } else { tmp() }
}

/// Distinct, recognisable payload of `len` bytes for record `i`.
fn payload(i: u64, len: usize) -> Vec<u8> {
    let seed = format!("batch-{i}:");
    seed.bytes().cycle().take(len).collect()
}

/// Live committed records as (id, payload).
fn live(q: &Queue) -> Vec<(u64, Vec<u8>)> {
    q.read_from(0, usize::MAX).unwrap().into_iter().map(|(m, p)| (m.id, p)).collect()
}

/// Files in `segments/` with extension `ext`, sorted.
fn files_with(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

fn seg_files(dir: &Path) -> Vec<PathBuf> {
    files_with(dir, "seg")
}

fn idx_files(dir: &Path) -> Vec<PathBuf> {
    files_with(dir, "idx")
}

/// Delete every `.idx`, so the next open scans every segment (the old behaviour).
fn remove_indexes(dir: &Path) {
    for p in idx_files(dir) {
        fs::remove_file(p).unwrap();
    }
}

/// Valid records of a segment file, as the start-up scan sees them.
fn records_in(path: &Path) -> Vec<RecInfo> {
    segment::scan(&fs::read(path).unwrap(), 0).records
}

fn clean(records: u64) -> OpenReport {
    OpenReport { records, ..OpenReport::default() }
}

#[test]
fn queue_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<Queue>();
}

/// Test 1: round trip, next_id continuity, no id reuse after everything is reclaimed.
#[test]
fn append_commit_reopen_roundtrip_and_ids_never_reused() {
    let d = tmp();
    let (mut q, rep) = Queue::open(d.path(), big()).unwrap();
    assert_eq!(rep, clean(0));
    assert_eq!(q.next_id(), 1);
    assert_eq!(q.committed_id(), 0);
    for i in 1..=50u64 {
        assert_eq!(q.next_id(), i);
        let out = q.append(i as u32, 1000 + i, &payload(i, (i * 7 % 300) as usize)).unwrap();
        assert_eq!(out, AppendOutcome::Appended { dropped_records: 0, dropped_readings: 0 });
    }
    // Not committed yet: invisible to readers.
    assert!(q.read_from(0, 10).unwrap().is_empty());
    q.commit().unwrap();
    assert_eq!(q.committed_id(), 50);
    let fs_before = q.fsyncs();
    q.commit().unwrap();
    assert_eq!(q.fsyncs(), fs_before, "commit with nothing new must not fsync");
    drop(q);

    let (mut q, rep) = Queue::open(d.path(), big()).unwrap();
    assert_eq!(rep, clean(50));
    assert_eq!(q.next_id(), 51);
    assert_eq!(q.committed_id(), 50);
    let got = q.read_from(0, usize::MAX).unwrap();
    assert_eq!(got.len(), 50);
    for (k, (m, p)) in got.iter().enumerate() {
        let i = k as u64 + 1;
        assert_eq!(*m, RecordMeta { id: i, readings: i as u32, created_ms: 1000 + i, priority: false, span: 1 });
        assert_eq!(*p, payload(i, (i * 7 % 300) as usize));
    }
    assert_eq!(q.read_from(10, 3).unwrap().iter().map(|r| r.0.id).collect::<Vec<_>>(), [11, 12, 13]);
    let st = q.status();
    assert_eq!((st.batches, st.readings, st.oldest_created_ms), (50, (1..=50).sum::<u64>(), Some(1001)));
    assert_eq!(q.last_id_on_disk(), 50);

    // Consume everything and let the files go.
    q.ack_through(50).unwrap();
    assert!(q.reclaimable());
    assert_eq!(q.reclaim().unwrap(), 1);
    assert!(seg_files(d.path()).is_empty());
    assert_eq!(q.status(), QueueStatus::default());
    drop(q);

    let (mut q, rep) = Queue::open(d.path(), big()).unwrap();
    assert_eq!(rep, clean(0));
    assert_eq!(q.next_id(), 51, "ids continue from the ledger with no segment left");
    assert_eq!(q.last_id_on_disk(), 50);
    q.append(1, 1, b"after").unwrap();
    q.commit().unwrap();
    drop(q);
    let (q, _) = Queue::open(d.path(), big()).unwrap();
    assert_eq!(live(&q), vec![(51, b"after".to_vec())]);
    assert_eq!(q.next_id(), 52);
}

/// An ack is durable only at commit (or reclaim): dropped before that, the
/// records are delivered again (at-least-once, never lost).
#[test]
fn ack_without_commit_is_not_durable() {
    let d = tmp();
    let (mut q, _) = Queue::open(d.path(), big()).unwrap();
    for i in 1..=3 {
        q.append(1, i, &payload(i, 10)).unwrap();
    }
    q.commit().unwrap();
    q.ack_through(2).unwrap();
    assert_eq!(live(&q).len(), 1);
    drop(q);
    let (mut q, _) = Queue::open(d.path(), big()).unwrap();
    assert_eq!(live(&q).len(), 3);
    q.ack_through(2).unwrap();
    q.commit().unwrap();
    drop(q);
    let (q, rep) = Queue::open(d.path(), big()).unwrap();
    assert_eq!(rep.records, 1);
    assert_eq!(live(&q), vec![(3, payload(3, 10))]);
}

/// `commit_paced` (the pipeline's group commit) makes every appended record
/// durable at once but writes the ack ledger only when the last entry is
/// `ledger_every` old; `commit` and `reclaim` always write it.
#[test]
fn paced_commit_writes_the_ledger_once_a_period() {
    let d = tmp();
    let (mut q, _) = Queue::open(d.path(), big()).unwrap();
    q.ledger_every = std::time::Duration::from_secs(3600);
    let ledger_len = |d: &TempDir| ledger::Ledger::load(d.path()).unwrap().len;
    for i in 1..=3 {
        q.append(1, i, &payload(i, 10)).unwrap();
    }
    q.ack_through(1).unwrap();
    q.commit_paced().unwrap();
    assert_eq!(q.durable_head(), 1, "the first paced commit writes the ledger");
    assert_eq!(ledger_len(&d), 20);
    q.ack_through(2).unwrap();
    q.append(1, 4, &payload(4, 10)).unwrap();
    q.commit_paced().unwrap();
    assert_eq!(q.committed_id(), 4, "records are durable at every paced commit");
    assert_eq!(q.durable_head(), 1, "the ack waits for the period");
    assert_eq!(ledger_len(&d), 20);
    drop(q);
    // A crash here: record 4 is on disk, the ack of 2 is not (2 comes back,
    // to be sent again; the uplink's PUBREC log turns that into a PUBREL).
    let (mut q, _) = Queue::open(d.path(), big()).unwrap();
    assert_eq!(live(&q).iter().map(|r| r.0).collect::<Vec<_>>(), [2, 3, 4]);
    q.ledger_every = std::time::Duration::from_secs(3600);
    q.ack_through(2).unwrap();
    q.commit_paced().unwrap();
    assert_eq!(q.durable_head(), 2, "no entry written since open: due");
    q.ack_through(3).unwrap();
    q.commit_paced().unwrap();
    assert_eq!(q.durable_head(), 2);
    q.commit().unwrap();
    assert_eq!(q.durable_head(), 3, "a full commit writes it whatever its age");
    q.ack_through(4).unwrap();
    q.ledger_every = std::time::Duration::ZERO;
    q.commit_paced().unwrap();
    assert_eq!(q.durable_head(), 4, "due once the period passed");
}

/// Test 2: a torn last record at many cut points.
#[test]
fn torn_tail_is_truncated() {
    let len = 40usize;
    let total = OVERHEAD + len;
    for cut in [1, 2, 6, 9, 10, 17, 29, 30, 31, total - 1] {
        let d = tmp();
        let (mut q, _) = Queue::open(d.path(), big()).unwrap();
        for i in 1..=5 {
            q.append(i as u32, i, &payload(i, len)).unwrap();
        }
        q.commit().unwrap();
        drop(q);
        let seg = &seg_files(d.path())[0];
        let last = records_in(seg)[4];
        let f = OpenOptions::new().write(true).open(seg).unwrap();
        f.set_len(last.offset + cut as u64).unwrap();
        drop(f);

        let (mut q, rep) = Queue::open(d.path(), big()).unwrap();
        assert_eq!(rep, OpenReport { records: 4, truncated_bytes: cut as u64, ..Default::default() }, "cut {cut}");
        assert_eq!(live(&q), (1..=4).map(|i| (i, payload(i, len))).collect::<Vec<_>>());
        assert_eq!(fs::metadata(seg).unwrap().len(), last.offset, "truncated on disk");
        q.append(9, 9, b"next").unwrap();
        q.commit().unwrap();
        drop(q);
        let (q, rep) = Queue::open(d.path(), big()).unwrap();
        assert_eq!(rep, clean(5), "cut {cut}");
        assert_eq!(live(&q).last().unwrap(), &(5, b"next".to_vec()));
    }
}

/// A tail of zeros (what ext4 can leave after a power cut) and a last
/// segment that holds only a torn first record.
#[test]
fn zero_tail_and_all_torn_last_segment() {
    let d = tmp();
    let o = opts(1 << 30, WhenFull::DropOldest, 500);
    let (mut q, _) = Queue::open(d.path(), o).unwrap();
    for i in 1..=6 {
        q.append(1, i, &payload(i, 170)).unwrap(); // 200 bytes: 2 per 500-byte segment
    }
    q.commit().unwrap();
    drop(q);
    let segs = seg_files(d.path());
    assert_eq!(segs.len(), 3);
    let mut bytes = fs::read(&segs[2]).unwrap();
    bytes.truncate(50); // first record of the last segment torn: whole file is garbage
    bytes.extend([0u8; 4000]);
    fs::write(&segs[2], &bytes).unwrap();

    let (mut q, rep) = Queue::open(d.path(), o).unwrap();
    assert_eq!(rep, OpenReport { records: 4, truncated_bytes: 4050, ..Default::default() });
    assert!(!segs[2].exists(), "all-garbage last segment removed");
    assert_eq!(q.next_id(), 5);
    q.append(1, 1, b"x").unwrap();
    q.commit().unwrap();
    drop(q);
    let (q, rep) = Queue::open(d.path(), o).unwrap();
    assert_eq!(rep, clean(5));
    assert_eq!(live(&q).iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
}

/// Test 3: one flipped byte in the middle of a segment (last or not), at
/// every interesting field, costs exactly one record and is repaired on disk.
#[test]
fn flipped_byte_is_skipped_and_repaired() {
    // 100-byte records, 1000-byte segments: 10 records per segment, 3 segments.
    let o = opts(1 << 30, WhenFull::DropOldest, 1000);
    let len = 70;
    // (which segment, which record in it)
    let targets = [(0usize, 4usize), (2, 2), (0, 9), (1, 0)];
    // magic, len low byte, len high byte, crc, id, created, readings, payload
    let fields = [0usize, 2, 5, 7, 12, 20, 28, 30, 60, 99];
    for (seg_i, rec_i) in targets {
        for field in fields {
            let d = fast_tmp();
            let (mut q, _) = Queue::open(d.path(), o).unwrap();
            for i in 1..=25 {
                q.append(i as u32, i, &payload(i, len)).unwrap();
            }
            q.commit().unwrap();
            drop(q);
            let segs = seg_files(d.path());
            assert_eq!(segs.len(), 3);
            let rec = records_in(&segs[seg_i])[rec_i];
            let lost = rec.id;
            let mut bytes = fs::read(&segs[seg_i]).unwrap();
            let at = rec.offset as usize + field;
            bytes[at] ^= if field == 5 { 0x80 } else { 0x01 };
            fs::write(&segs[seg_i], &bytes).unwrap();
            // Sealed segments are only scanned without a valid index (see
            // `corruption_in_indexed_segment_is_reported_at_read` for the other case).
            remove_indexes(d.path());

            let what = format!("segment {seg_i} record {rec_i} byte {field}");
            let (q, rep) = Queue::open(d.path(), o).unwrap();
            assert_eq!(
                rep,
                OpenReport { records: 24, truncated_bytes: 0, corrupt_records: 1, repaired_segments: 1 },
                "{what}"
            );
            let want: Vec<_> = (1..=25).filter(|&i| i != lost).map(|i| (i, payload(i, len))).collect();
            assert_eq!(live(&q), want, "{what}");
            assert_eq!(q.next_id(), 26);
            drop(q);
            let (q, rep) = Queue::open(d.path(), o).unwrap();
            assert_eq!(rep, clean(24), "second open is clean: {what}");
            assert_eq!(live(&q), want);
            assert!(
                fs::read_dir(d.path().join("segments"))
                    .unwrap()
                    .all(|e| { e.unwrap().path().extension().unwrap() != "tmp" }),
                "no temp files left"
            );
        }
    }
}

/// A non-last segment that is entirely garbage is removed and counted.
#[test]
fn garbage_middle_segment_removed() {
    let d = tmp();
    let o = opts(1 << 30, WhenFull::DropOldest, 1000);
    let (mut q, _) = Queue::open(d.path(), o).unwrap();
    for i in 1..=25 {
        q.append(1, i, &payload(i, 70)).unwrap();
    }
    q.commit().unwrap();
    drop(q);
    let segs = seg_files(d.path());
    fs::write(&segs[1], vec![0xAB; 1000]).unwrap();
    // Same length as before: with its index the segment is trusted at open
    // and the garbage only shows when a record is read.
    let (q, rep) = Queue::open(d.path(), o).unwrap();
    assert_eq!(rep, clean(25));
    assert_eq!(q.indexed_segments(), 2);
    match q.read_from(0, usize::MAX) {
        Err(QueueError::Corrupt { id: 11, path }) => assert_eq!(path, segs[1]),
        other => panic!("expected Corrupt for 11, got {other:?}"),
    }
    drop(q);
    remove_indexes(d.path());
    let (q, rep) = Queue::open(d.path(), o).unwrap();
    assert_eq!(rep, OpenReport { records: 15, truncated_bytes: 0, corrupt_records: 1, repaired_segments: 1 });
    assert!(!segs[1].exists());
    let ids: Vec<u64> = live(&q).iter().map(|r| r.0).collect();
    assert_eq!(ids, (1..=10).chain(21..=25).collect::<Vec<_>>());
}

/// Test 4: DropOldest evicts exactly the oldest, counts their readings,
/// keeps live bytes bounded, and the eviction survives a reopen.
#[test]
fn drop_oldest_evicts_oldest() {
    let d = tmp();
    let o = opts(1000, WhenFull::DropOldest, 8 << 20);
    let (mut q, _) = Queue::open(d.path(), o).unwrap();
    // 100-byte records: ten fit exactly.
    for i in 1..=10 {
        let out = q.append(i as u32, i, &payload(i, 70)).unwrap();
        assert_eq!(out, AppendOutcome::Appended { dropped_records: 0, dropped_readings: 0 });
    }
    assert_eq!(q.status().bytes, 1000);
    let out = q.append(11, 11, &payload(11, 70)).unwrap();
    assert_eq!(out, AppendOutcome::Appended { dropped_records: 1, dropped_readings: 1 });
    // A 300-byte record pushes out 2, 3 and 4.
    let out = q.append(12, 12, &payload(12, 270)).unwrap();
    assert_eq!(out, AppendOutcome::Appended { dropped_records: 3, dropped_readings: 2 + 3 + 4 });
    let st = q.status();
    assert!(st.bytes <= 1000);
    assert_eq!((st.batches, st.bytes, st.oldest_created_ms), (8, 1000, Some(5)));
    assert_eq!(st.readings, (5..=12).sum::<u64>());
    q.commit().unwrap();
    assert_eq!(live(&q).iter().map(|r| r.0).collect::<Vec<_>>(), (5..=12).collect::<Vec<_>>());
    assert!(matches!(q.append(0, 0, &[0; 971]), Err(QueueError::TooLarge { size: 1001, max: 1000 })));
    drop(q);

    let (q, rep) = Queue::open(d.path(), o).unwrap();
    assert_eq!(rep.records, 8);
    assert_eq!(live(&q).iter().map(|r| r.0).collect::<Vec<_>>(), (5..=12).collect::<Vec<_>>());
    assert_eq!(q.next_id(), 13);
    assert_eq!(q.status().bytes, 1000);
}

/// Test 5: RejectNew refuses without side effects and recovers after acks.
#[test]
fn reject_new_when_full() {
    let d = tmp();
    let o = opts(1000, WhenFull::RejectNew, 8 << 20);
    let (mut q, _) = Queue::open(d.path(), o).unwrap();
    for i in 1..=10 {
        q.append(1, i, &payload(i, 70)).unwrap();
    }
    q.commit().unwrap();
    let before = (q.status(), q.disk_bytes(), q.next_id());
    match q.append(1, 11, &payload(11, 70)) {
        Err(QueueError::Full { needed: 100, max: 1000 }) => {}
        other => panic!("expected Full, got {other:?}"),
    }
    assert_eq!((q.status(), q.disk_bytes(), q.next_id()), before, "nothing appended");
    assert_eq!(live(&q).len(), 10);

    q.ack_through(3).unwrap();
    q.reclaim().unwrap();
    for i in 11..=13 {
        q.append(1, i, &payload(i, 70)).unwrap();
    }
    assert!(matches!(q.append(1, 14, b"x"), Err(QueueError::Full { .. })));
    q.commit().unwrap();
    assert_eq!(live(&q).iter().map(|r| r.0).collect::<Vec<_>>(), (4..=13).collect::<Vec<_>>());
}

/// Test 6: reclaim deletes exactly the fully consumed segments; acks stick;
/// ledger compaction keeps the state.
#[test]
fn ack_reclaim_and_ledger_compaction() {
    let d = tmp();
    // 200-byte records in 1000-byte segments: ids 1-5, 6-10, 11-15, 16-20, 21-23.
    let o = opts(1 << 30, WhenFull::DropOldest, 1000);
    let (mut q, _) = Queue::open(d.path(), o).unwrap();
    for i in 1..=23 {
        q.append(1, i, &payload(i, 170)).unwrap();
    }
    q.commit().unwrap();
    let names = |d: &Path| -> Vec<u64> {
        seg_files(d).iter().map(|p| parse_segment_name(p.file_name().unwrap().to_str().unwrap()).unwrap()).collect()
    };
    assert_eq!(names(d.path()), [1, 6, 11, 16, 21]);
    assert!(!q.reclaimable());
    assert_eq!(q.reclaim().unwrap(), 0);

    q.ack_through(12).unwrap();
    assert!(q.reclaimable());
    assert_eq!(q.reclaim().unwrap(), 2);
    assert_eq!(names(d.path()), [11, 16, 21]);
    assert!(!q.reclaimable());
    assert_eq!(q.durable_acked_through(), 12, "reclaim made the ledger durable first");
    assert_eq!(live(&q)[0].0, 13);
    // Acked-but-on-disk records are still visible to the start-up replay.
    assert_eq!(q.read_all_on_disk_after(0).unwrap()[0].0.id, 11);
    assert_eq!(q.disk_bytes(), 13 * 200 + 20);

    q.ack_through(17).unwrap();
    q.commit().unwrap();
    drop(q);
    let (mut q, rep) = Queue::open(d.path(), o).unwrap();
    assert_eq!(rep, clean(6));
    assert_eq!(live(&q).iter().map(|r| r.0).collect::<Vec<_>>(), (18..=23).collect::<Vec<_>>());
    assert_eq!(q.read_all_on_disk_after(12).unwrap().len(), 11);
    assert_eq!(q.reclaim().unwrap(), 1);
    assert_eq!(names(d.path()), [16, 21]);

    // Compaction: a low threshold instead of thousands of fsyncs.
    q.ledger.compact_at = 5 * ledger::ENTRY_BYTES;
    for i in 18..=23 {
        q.ack_through(i).unwrap();
        q.commit().unwrap();
        assert!(ledger::Ledger::load(d.path()).unwrap().len <= 5 * ledger::ENTRY_BYTES);
    }
    assert_eq!(q.reclaim().unwrap(), 2);
    assert!(seg_files(d.path()).is_empty());
    drop(q);
    let (q, rep) = Queue::open(d.path(), o).unwrap();
    assert_eq!(rep, clean(0));
    assert_eq!(q.next_id(), 24);
    assert_eq!(q.last_id_on_disk(), 23);
}

/// A torn ledger entry is ignored and the ledger rewritten so later appends
/// stay aligned.
#[test]
fn torn_ledger_entry() {
    let d = tmp();
    let (mut q, _) = Queue::open(d.path(), big()).unwrap();
    for i in 1..=5 {
        q.append(1, i, b"r").unwrap();
    }
    q.commit().unwrap();
    q.ack_through(2).unwrap();
    q.commit().unwrap();
    drop(q);
    let lp = d.path().join("ledger");
    let mut b = fs::read(&lp).unwrap();
    b.extend_from_slice(&[9; 7]);
    fs::write(&lp, &b).unwrap();
    let (mut q, rep) = Queue::open(d.path(), big()).unwrap();
    assert_eq!(rep.records, 3);
    assert_eq!(fs::metadata(&lp).unwrap().len(), 20, "rewritten clean");
    q.ack_through(4).unwrap();
    q.commit().unwrap();
    drop(q);
    let (q, rep) = Queue::open(d.path(), big()).unwrap();
    assert_eq!(rep.records, 1);
    assert_eq!(live(&q)[0].0, 5);
}

/// Test 8a: open_readonly changes nothing on disk, even with a torn tail
/// and corruption, and works while the writer holds the lock.
#[test]
fn readonly_open_modifies_nothing() {
    let d = tmp();
    let o = opts(1 << 30, WhenFull::DropOldest, 1000);
    let (mut q, _) = Queue::open(d.path(), o).unwrap();
    for i in 1..=25 {
        q.append(1, i, &payload(i, 70)).unwrap();
    }
    q.commit().unwrap();
    q.ack_through(3).unwrap();
    q.commit().unwrap();
    drop(q);
    let segs = seg_files(d.path());
    let mut b = fs::read(&segs[0]).unwrap();
    b[450] ^= 0xFF; // record 5 corrupt
    fs::write(&segs[0], &b).unwrap();
    let last = fs::read(&segs[2]).unwrap();
    fs::write(&segs[2], &last[..last.len() - 10]).unwrap(); // record 25 torn
    remove_indexes(d.path()); // so the corruption in segment 0 is found at open

    let snapshot = |d: &Path| -> Vec<(PathBuf, Vec<u8>)> {
        let mut all = vec![(d.join("ledger"), fs::read(d.join("ledger")).unwrap())];
        all.extend(seg_files(d).into_iter().map(|p| {
            let b = fs::read(&p).unwrap();
            (p, b)
        }));
        all
    };
    let before = snapshot(d.path());
    let (ro, rep) = Queue::open_readonly(d.path()).unwrap();
    assert_eq!(rep, OpenReport { records: 20, truncated_bytes: 90, corrupt_records: 1, repaired_segments: 0 });
    let ids: Vec<u64> = live(&ro).iter().map(|r| r.0).collect();
    assert_eq!(ids, (4..=24).filter(|&i| i != 5).collect::<Vec<_>>());
    assert!(matches!(ro.status(), QueueStatus { batches: 20, .. }));
    drop(ro);
    assert_eq!(snapshot(d.path()), before);

    // While a writer holds the lock, read-only still works.
    let (mut w, rep) = Queue::open(d.path(), o).unwrap();
    assert_eq!(rep.corrupt_records, 1);
    w.append(1, 1, b"new").unwrap();
    w.commit().unwrap();
    let (mut ro, rep) = Queue::open_readonly(d.path()).unwrap();
    assert_eq!(rep, clean(21));
    assert!(matches!(ro.append(1, 1, b"x"), Err(QueueError::ReadOnly)));
    assert!(matches!(ro.commit(), Err(QueueError::ReadOnly)));
    assert!(matches!(ro.ack_through(9), Err(QueueError::ReadOnly)));
    assert!(matches!(ro.reclaim(), Err(QueueError::ReadOnly)));

    assert!(matches!(Queue::open_readonly(&d.path().join("nope")), Err(QueueError::Io(_))));
}

/// Test 8b: a second writer is refused while the first lives, allowed after.
#[test]
fn second_open_is_locked() {
    let d = tmp();
    let (q, _) = Queue::open(d.path(), big()).unwrap();
    assert!(matches!(Queue::open(d.path(), big()), Err(QueueError::Locked)));
    drop(q);
    Queue::open(d.path(), big()).unwrap();
}

/// The data dir deleted, moved or replaced under a running queue: fdatasync
/// on the unlinked files still succeeds, so without a check the pipeline
/// went on acking readings into files the next start would not find (seen
/// 2026-12-05 with a bench gateway whose temp dir was deleted). The commit
/// that finds it commits nothing and the queue refuses writes from then on.
#[test]
fn a_commit_into_a_data_dir_no_longer_there_commits_nothing() {
    type Change = fn(&Path);
    let changes: [(&str, Change); 4] = [
        ("deleted", |d| fs::remove_dir_all(d).unwrap()),
        ("moved", |d| fs::rename(d, d.with_extension("moved")).unwrap()),
        ("segments replaced", |d| {
            fs::rename(d.join("segments"), d.join("segments.old")).unwrap();
            fs::create_dir(d.join("segments")).unwrap();
        }),
        ("lock deleted", |d| fs::remove_file(d.join("lock")).unwrap()),
    ];
    for (what, change) in changes {
        let root = tmp();
        let d = root.path().join("q");
        let (mut q, _) = Queue::open(&d, big()).unwrap();
        q.append(1, 1, &payload(1, 50)).unwrap();
        q.commit().unwrap();
        q.append(1, 2, &payload(2, 50)).unwrap();
        change(&d);
        match q.commit() {
            Err(QueueError::Gone { path }) => assert!(path.starts_with(&d), "{what}: {path:?}"),
            r => panic!("{what}: commit answered {r:?}"),
        }
        assert!(QueueError::Gone { path: d.clone() }.storage_failed());
        assert_eq!(q.committed_id(), 1, "{what}: record 2 was not committed");
        assert!(matches!(q.append(1, 3, &payload(3, 50)), Err(QueueError::NeedsReopen)), "{what}");
    }
    // A commit with nothing new to make durable does not look (and a
    // queue left alone commits as before).
    let d = tmp();
    let (mut q, _) = Queue::open(d.path(), big()).unwrap();
    q.append(1, 1, &payload(1, 50)).unwrap();
    q.commit().unwrap();
    q.append(1, 2, &payload(2, 50)).unwrap();
    q.commit().unwrap();
    assert_eq!(q.committed_id(), 2);
}

/// Record read back corrupted after open: an error naming the id, not garbage.
#[test]
fn corruption_after_open_is_reported_on_read() {
    let d = tmp();
    let (mut q, _) = Queue::open(d.path(), big()).unwrap();
    for i in 1..=3 {
        q.append(1, i, &payload(i, 50)).unwrap();
    }
    q.commit().unwrap();
    let seg = &seg_files(d.path())[0];
    let mut b = fs::read(seg).unwrap();
    b[80 + 40] ^= 1; // payload of record 2
    fs::write(seg, &b).unwrap();
    assert!(matches!(q.read_from(0, 10), Err(QueueError::Corrupt { id: 2, .. })));
    assert_eq!(q.read_from(2, 10).unwrap().len(), 1);
}

/// 25 records of 100 bytes in 1000-byte segments: ids 1-10, 11-20, 21-25.
fn three_segments(d: &Path) -> QueueOptions {
    let o = opts(1 << 30, WhenFull::DropOldest, 1000);
    let (mut q, _) = Queue::open(d, o).unwrap();
    for i in 1..=25 {
        q.append(i as u32, i, &payload(i, 70)).unwrap();
    }
    q.commit().unwrap();
    o
}

fn all_25() -> Vec<(u64, Vec<u8>)> {
    (1..=25).map(|i| (i, payload(i, 70))).collect()
}

/// Rolling seals the previous segment and writes its index, which matches a
/// scan of the segment exactly; the active segment never has one.
#[test]
fn index_written_at_roll() {
    let d = tmp();
    let o = opts(1 << 30, WhenFull::DropOldest, 1000);
    let (mut q, _) = Queue::open(d.path(), o).unwrap();
    for i in 1..=10 {
        q.append(i as u32, i, &payload(i, 70)).unwrap();
    }
    assert!(idx_files(d.path()).is_empty());
    q.append(11, 11, &payload(11, 70)).unwrap(); // rolls
    let segs = seg_files(d.path());
    assert_eq!(idx_files(d.path()), vec![seg_index::idx_path(&segs[0])]);
    let bytes = fs::read(seg_index::idx_path(&segs[0])).unwrap();
    let len = fs::metadata(&segs[0]).unwrap().len();
    assert_eq!(seg_index::decode(&bytes, len, 1, 0).unwrap(), records_in(&segs[0]));
    for i in 12..=25 {
        q.append(i as u32, i, &payload(i, 70)).unwrap();
    }
    q.commit().unwrap();
    drop(q);
    let segs = seg_files(d.path());
    assert_eq!(idx_files(d.path()), segs[..2].iter().map(|p| seg_index::idx_path(p)).collect::<Vec<_>>());
    let (q, rep) = Queue::open(d.path(), o).unwrap();
    assert_eq!(rep, clean(25));
    assert_eq!(q.indexed_segments(), 2);
    assert_eq!(live(&q), all_25());
    assert_eq!(q.read_all_on_disk_after(0).unwrap().len(), 25);
    assert_eq!(q.next_id(), 26);
}

/// Proof that open does not read indexed segments: every payload byte of
/// segment 0 replaced (same length) goes unnoticed at open, and each record
/// read is then `Corrupt`, never garbage; the other segments still read fine.
#[test]
fn open_trusts_index_and_read_catches_garbage() {
    let d = tmp();
    let o = three_segments(d.path());
    let segs = seg_files(d.path());
    let mut b = fs::read(&segs[0]).unwrap();
    for r in records_in(&segs[0]) {
        for x in &mut b[r.offset as usize + OVERHEAD..(r.offset + r.total as u64) as usize] {
            *x = !*x;
        }
    }
    fs::write(&segs[0], &b).unwrap();

    let (q, rep) = Queue::open(d.path(), o).unwrap();
    assert_eq!(rep, clean(25), "open did not read segment 0");
    assert_eq!(q.indexed_segments(), 2);
    assert_eq!(q.status().batches, 25);
    for id in 0..10 {
        match q.read_from(id, 1) {
            Err(QueueError::Corrupt { id: bad, path }) => assert_eq!((bad, &path), (id + 1, &segs[0])),
            other => panic!("expected Corrupt for {}, got {other:?}", id + 1),
        }
    }
    assert!(matches!(q.read_all_on_disk_after(0), Err(QueueError::Corrupt { id: 1, .. })));
    assert_eq!(
        q.read_from(10, usize::MAX).unwrap(),
        all_25()[10..].iter().map(|(i, p)| (meta(*i), p.clone())).collect::<Vec<_>>()
    );
    assert_eq!(q.read_all_on_disk_after(10).unwrap().len(), 15);
    drop(q);

    // Without the index the old full scan finds and removes it at open.
    remove_indexes(d.path());
    let (q, rep) = Queue::open(d.path(), o).unwrap();
    assert_eq!(rep, OpenReport { records: 15, truncated_bytes: 0, corrupt_records: 1, repaired_segments: 1 });
    assert_eq!(live(&q), all_25()[10..].to_vec());
}

fn meta(i: u64) -> RecordMeta {
    RecordMeta { id: i, readings: i as u32, created_ms: i, priority: false, span: 1 }
}

/// One flipped bit in an indexed segment: not found at open, `Corrupt` for
/// exactly that record at read, the records around it intact; the caller
/// can ack past it.
#[test]
fn corruption_in_indexed_segment_is_reported_at_read() {
    for (seg_i, rec_i) in [(0usize, 4usize), (1, 0), (1, 9)] {
        let d = fast_tmp();
        let o = three_segments(d.path());
        let segs = seg_files(d.path());
        let rec = records_in(&segs[seg_i])[rec_i];
        let mut b = fs::read(&segs[seg_i]).unwrap();
        b[rec.offset as usize + 50] ^= 0x04;
        fs::write(&segs[seg_i], &b).unwrap();
        let (mut q, rep) = Queue::open(d.path(), o).unwrap();
        assert_eq!(rep, clean(25));
        match q.read_from(0, usize::MAX) {
            Err(QueueError::Corrupt { id, path }) => assert_eq!((id, &path), (rec.id, &segs[seg_i])),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert_eq!(q.read_from(0, (rec.id - 1) as usize).unwrap().len(), (rec.id - 1) as usize);
        let after: Vec<u64> = q.read_from(rec.id, usize::MAX).unwrap().iter().map(|r| r.0.id).collect();
        assert_eq!(after, (rec.id + 1..=25).collect::<Vec<_>>());
        assert!(matches!(q.read_all_on_disk_after(0), Err(QueueError::Corrupt { id, .. }) if id == rec.id));
        let (valid, bad) = q.read_valid_on_disk_after(0, usize::MAX).unwrap();
        assert_eq!(bad, vec![rec.id]);
        assert_eq!(
            valid.iter().map(|r| r.0.id).collect::<Vec<_>>(),
            (1..=25).filter(|&i| i != rec.id).collect::<Vec<_>>()
        );
        q.ack_through(rec.id).unwrap();
        assert_eq!(q.read_from(0, usize::MAX).unwrap().len(), (25 - rec.id) as usize);
    }
}

/// Missing, torn, bit-flipped or mismatched indexes all fall back to the
/// scan with results identical to a queue without indexes, and the index is
/// rewritten so the next open uses it again.
#[test]
fn bad_index_falls_back_to_scan() {
    type Spoil = fn(&Path, &Path);
    let spoils: Vec<(&str, Spoil)> = vec![
        ("missing", |_, idx| fs::remove_file(idx).unwrap()),
        ("empty", |_, idx| fs::write(idx, b"").unwrap()),
        ("torn", |_, idx| {
            let b = fs::read(idx).unwrap();
            fs::write(idx, &b[..b.len() - 1]).unwrap();
        }),
        ("torn half", |_, idx| {
            let b = fs::read(idx).unwrap();
            fs::write(idx, &b[..b.len() / 2]).unwrap();
        }),
        ("flipped", |_, idx| {
            let mut b = fs::read(idx).unwrap();
            b[30] ^= 1;
            fs::write(idx, &b).unwrap();
        }),
        ("other segment's index", |seg, idx| {
            let other = seg_index::idx_path(&seg.with_file_name(format!("{:020}.seg", 11)));
            fs::copy(other, idx).unwrap();
        }),
        ("length mismatch", |seg, idx| {
            let len = fs::metadata(seg).unwrap().len();
            let recs = records_in(seg);
            fs::write(idx, seg_index::encode(1, len + 1, &recs)).unwrap();
        }),
    ];
    for (what, spoil) in spoils {
        let d = fast_tmp();
        let o = three_segments(d.path());
        let segs = seg_files(d.path());
        let idx0 = seg_index::idx_path(&segs[0]);
        let good = fs::read(&idx0).unwrap();
        spoil(&segs[0], &idx0);
        let (q, rep) = Queue::open(d.path(), o).unwrap();
        assert_eq!(rep, clean(25), "{what}");
        assert_eq!(q.indexed_segments(), 1, "{what}");
        assert_eq!(live(&q), all_25(), "{what}");
        assert_eq!(q.next_id(), 26);
        drop(q);
        assert_eq!(fs::read(&idx0).unwrap(), good, "{what}: rewritten after the scan");
        let (q, _) = Queue::open(d.path(), o).unwrap();
        assert_eq!(q.indexed_segments(), 2, "{what}");
        assert_eq!(live(&q), all_25(), "{what}");
    }

    // A sealed segment that lost its end: the length no longer matches, the
    // scan finds the cut (corruption in a non-last segment) and repairs it.
    let d = fast_tmp();
    let o = three_segments(d.path());
    let segs = seg_files(d.path());
    let f = OpenOptions::new().write(true).open(&segs[1]).unwrap();
    f.set_len(950).unwrap();
    drop(f);
    let (q, rep) = Queue::open(d.path(), o).unwrap();
    assert_eq!(rep, OpenReport { records: 24, truncated_bytes: 0, corrupt_records: 1, repaired_segments: 1 });
    assert_eq!(live(&q).iter().map(|r| r.0).collect::<Vec<_>>(), (1..=25).filter(|&i| i != 20).collect::<Vec<_>>());
    drop(q);
    let (q, rep) = Queue::open(d.path(), o).unwrap();
    assert_eq!((rep, q.indexed_segments()), (clean(24), 2));
}

/// Read-only opening uses valid indexes but never writes or deletes any.
#[test]
fn readonly_uses_but_never_writes_indexes() {
    let d = tmp();
    three_segments(d.path());
    let (ro, rep) = Queue::open_readonly(d.path()).unwrap();
    assert_eq!((rep, ro.indexed_segments()), (clean(25), 2));
    assert_eq!(live(&ro), all_25());
    drop(ro);
    remove_indexes(d.path());
    let (ro, rep) = Queue::open_readonly(d.path()).unwrap();
    assert_eq!((rep, ro.indexed_segments()), (clean(25), 0));
    assert_eq!(live(&ro), all_25());
    assert!(idx_files(d.path()).is_empty());
}

/// Reclaim deletes a segment's index with it; open deletes orphan indexes.
#[test]
fn reclaim_deletes_index_and_open_removes_orphans() {
    let d = tmp();
    let o = three_segments(d.path());
    let (mut q, _) = Queue::open(d.path(), o).unwrap();
    q.ack_through(10).unwrap();
    assert_eq!(q.reclaim().unwrap(), 1);
    let segs = seg_files(d.path());
    assert_eq!(idx_files(d.path()), vec![seg_index::idx_path(&segs[0])]);
    q.ack_through(25).unwrap();
    assert_eq!(q.reclaim().unwrap(), 2);
    assert!(idx_files(d.path()).is_empty());
    assert!(seg_files(d.path()).is_empty());
    drop(q);
    // As if a crash lost the index's unlink but kept the segment's.
    let orphan = d.path().join("segments").join(format!("{:020}.idx", 26));
    fs::write(&orphan, seg_index::encode(26, 100, &records_in_fake())).unwrap();
    let (mut q, _) = Queue::open(d.path(), o).unwrap();
    assert!(!orphan.exists());
    q.append(1, 1, &payload(26, 70)).unwrap();
    q.commit().unwrap();
    drop(q);
    let (q, rep) = Queue::open(d.path(), o).unwrap();
    assert_eq!(rep, clean(1));
    assert_eq!(live(&q), vec![(26, payload(26, 70))]);
}

fn records_in_fake() -> Vec<RecInfo> {
    vec![RecInfo { offset: 0, total: 100, id: 26, readings: 1, created_ms: 1 }]
}

/// The last segment is lost entirely (all torn): the indexed one before it
/// becomes the append target, loses its index at open, grows, and is
/// indexed afresh when it rolls.
#[test]
fn indexed_segment_becoming_last_drops_its_index() {
    let d = tmp();
    let o = three_segments(d.path());
    let segs = seg_files(d.path());
    let b = fs::read(&segs[2]).unwrap();
    fs::write(&segs[2], &b[..50]).unwrap();
    // Make segment 1 hold 9 records so the next append fits in it.
    let (mut q, _) = Queue::open(d.path(), o).unwrap();
    assert!(!segs[2].exists());
    assert_eq!(idx_files(d.path()), vec![seg_index::idx_path(&segs[0])]);
    assert_eq!(q.next_id(), 21);
    q.append(21, 21, &payload(21, 70)).unwrap(); // segment 11 is full: rolls and indexes it again
    q.commit().unwrap();
    drop(q);
    assert_eq!(idx_files(d.path()).len(), 2);
    let (q, rep) = Queue::open(d.path(), o).unwrap();
    assert_eq!((rep, q.indexed_segments()), (clean(21), 2));
    assert_eq!(live(&q), all_25()[..21].to_vec());

    // Same with room left in the former-indexed segment: appends land in it.
    let d = tmp();
    let o = opts(1 << 30, WhenFull::DropOldest, 1000);
    let (mut q, _) = Queue::open(d.path(), o).unwrap();
    for i in 1..=10 {
        // 9 × 100 bytes, then 150 bytes that do not fit: record 10 rolls.
        q.append(i as u32, i, &payload(i, 70 + (i == 10) as usize * 50)).unwrap();
    }
    q.commit().unwrap();
    drop(q);
    let segs = seg_files(d.path());
    assert_eq!(segs.len(), 2, "record 10 rolled");
    fs::write(&segs[1], b"torn").unwrap();
    let (mut q, rep) = Queue::open(d.path(), o).unwrap();
    assert_eq!(rep.records, 9);
    assert!(idx_files(d.path()).is_empty(), "append target keeps no index");
    q.append(10, 10, &payload(10, 70)).unwrap(); // fits in segment 1
    q.commit().unwrap();
    assert_eq!(seg_files(d.path()).len(), 1);
    drop(q);
    let (q, rep) = Queue::open(d.path(), o).unwrap();
    assert_eq!(rep, clean(10));
    assert_eq!(live(&q), (1..=10).map(|i| (i, payload(i, 70))).collect::<Vec<_>>());
}

/// xorshift64*: deterministic, no crate needed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the model knows about one record.
#[derive(Debug, Clone)]
struct ModelRec {
    id: u64,
    readings: u32,
    payload: Vec<u8>,
    committed: bool,
}

/// Test 7: random operations against a model.
///
/// Model invariants checked after every reopen: every committed record above
/// the durable ledger head is present, in order, with its payload; records
/// that were not committed may be missing, but only as a suffix (they all live
/// in the last segment) and never altered; ids of committed records are never
/// given to a different payload.
#[test]
fn model_based_random_ops() {
    let start = std::time::Instant::now();
    let mut indexed = 0;
    for seed in 1..=8u64 {
        indexed += run_model(seed, 500);
    }
    assert!(indexed > 0, "reopens never used an index: the test does not cover them");
    // Generous: the point is that it stays quick in debug builds.
    assert!(start.elapsed().as_secs() < 20, "model test too slow: {:?}", start.elapsed());
}

/// What the model itself saw on disk when the queue last promised
/// durability (a successful `commit()`, an open, and any ledger write, each
/// of which the ledger fsyncs before returning): segment lengths and the
/// ledger's bytes, with the head that ledger names (parsed here from the
/// file). A crash keeps at least this and loses anything beyond it at
/// random; none of it is the queue's own bookkeeping (`synced_len`,
/// `durable_acked_through`), so a commit that returns before its bytes
/// reach the file, or a ledger never written, shows up as lost records.
struct Durable {
    segs: HashMap<PathBuf, u64>,
    ledger: Option<Vec<u8>>,
    head: u64,
}

impl Durable {
    fn capture(dir: &Path) -> Durable {
        let segs = seg_files(dir).into_iter().map(|p| (p.clone(), fs::metadata(&p).unwrap().len())).collect();
        let mut d = Durable { segs, ledger: None, head: 0 };
        d.ledger_now(dir);
        d
    }

    /// The ledger as it is on disk now (every ledger write is synced).
    fn ledger_now(&mut self, dir: &Path) {
        self.ledger = fs::read(Ledger::path_in(dir)).ok();
        self.head = Ledger::load(dir).unwrap().state.acked_through;
    }
}

fn run_model(seed: u64, steps: usize) -> u64 {
    let d = fast_tmp();
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let when_full = if seed.is_multiple_of(3) { WhenFull::RejectNew } else { WhenFull::DropOldest };
    let max_bytes = if when_full == WhenFull::RejectNew { 1500 + rng.below(1500) } else { 3000 + rng.below(4000) };
    let mut o = opts(max_bytes, when_full, 600 + rng.below(1500));
    // Even seeds run with `open_check = "full"`: indexes written, never trusted.
    o.trust_index = seed % 2 == 1;
    let (mut q, _) = Queue::open(d.path(), o).unwrap();
    // Seeds 4k+2 and 4k+3 pad commits to pages whatever the segment size.
    let pad = seed % 4 >= 2;
    // Seeds 8k+6 and 8k+7 also hold appends for direct commits, in 128-byte
    // blocks (through the page cache: /dev/shm has no direct I/O).
    let hold = (seed % 8 >= 6).then_some(128);
    if pad {
        q.pad_min_segment = 0;
    }
    q.hold_block_for_tests = hold;
    let (mut pads, mut directs) = (0, 0);

    // Every record the queue may still hold, in id order; `head` as in memory.
    let mut recs: VecDeque<ModelRec> = VecDeque::new();
    let mut head = 0u64;
    // Committed id -> payload: an id must never name two different payloads.
    let mut committed_ever: HashMap<u64, Vec<u8>> = HashMap::new();
    let ctx = |step: usize| format!("seed {seed} step {step}");
    let mut indexed_total = 0;
    let mut durable = Durable::capture(d.path());
    let mut last_committed = q.committed_id();

    for step in 0..steps {
        match rng.below(100) {
            0..=44 => {
                let id = q.next_id();
                let len = rng.below(250) as usize;
                let mut p = payload(id, len);
                // Random tail so a reused id would carry a different payload.
                p.extend(rng.next().to_le_bytes());
                let readings = rng.below(50) as u32;
                let size = (OVERHEAD + p.len()) as u64;
                let live_bytes: u64 =
                    recs.iter().filter(|r| r.id > head).map(|r| (OVERHEAD + r.payload.len()) as u64).sum();
                match q.append(readings, id * 10, &p) {
                    Ok(AppendOutcome::Appended { dropped_records, dropped_readings }) => {
                        // The model's own idea of what had to go.
                        let (mut n, mut rd, mut freed, mut new_head) = (0u64, 0u64, 0u64, head);
                        for r in recs.iter().filter(|r| r.id > head) {
                            if live_bytes - freed + size <= o.max_bytes {
                                break;
                            }
                            freed += (OVERHEAD + r.payload.len()) as u64;
                            rd += r.readings as u64;
                            n += 1;
                            new_head = r.id;
                        }
                        head = new_head;
                        assert_eq!((dropped_records, dropped_readings), (n, rd), "{}", ctx(step));
                        recs.push_back(ModelRec { id, readings, payload: p, committed: false });
                        // Only after a successful append: a reopen can revive
                        // acked/dropped records whose head move never became
                        // durable, so RejectNew may sit above the bound until
                        // the consumer acks again.
                        assert!(q.status().bytes <= o.max_bytes, "{}", ctx(step));
                    }
                    Err(QueueError::Full { .. }) => {
                        assert_eq!(when_full, WhenFull::RejectNew);
                        assert!(live_bytes + size > o.max_bytes);
                        assert_eq!(q.next_id(), id);
                    }
                    Err(e) => panic!("{}: {e}", ctx(step)),
                }
            }
            45..=64 => {
                q.commit().unwrap();
                durable = Durable::capture(d.path());
                // commit() promises the acks and evictions made so far too.
                assert_eq!(durable.head, head, "{}: commit left the ledger behind", ctx(step));
            }
            65..=79 => {
                // Ack up to a random committed live record (or nothing new).
                let cands: Vec<u64> =
                    recs.iter().filter(|r| r.id > head && r.id <= q.committed_id()).map(|r| r.id).collect();
                if !cands.is_empty() {
                    let id = cands[rng.below(cands.len() as u64) as usize];
                    q.ack_through(id).unwrap();
                    head = id;
                }
            }
            80..=87 => {
                if q.reclaim().unwrap() > 0 {
                    assert_eq!(q.durable_acked_through(), head, "ledger durable before deleting");
                }
                assert!(!q.reclaimable());
            }
            _ => {
                // Reopen; half the time as a crash that loses unsynced bytes.
                let crash = rng.below(2) == 0;
                pads += q.pad_bytes();
                directs += q.direct_commits();
                if !crash {
                    // As the pipeline's shutdown does.
                    q.trim().unwrap();
                }
                drop(q);
                if crash {
                    // From the model's own record: a segment made since the
                    // last promise may be gone; the others keep what was
                    // promised and any part of what came after; the ledger
                    // is the one last written under a promise.
                    for path in seg_files(d.path()) {
                        let len = fs::metadata(&path).unwrap().len();
                        match durable.segs.get(&path) {
                            None if rng.below(2) == 0 => fs::remove_file(&path).unwrap(),
                            None => {
                                OpenOptions::new().write(true).open(&path).unwrap().set_len(rng.below(len + 1)).unwrap()
                            }
                            Some(&kept) => {
                                assert!(len >= kept, "{}: a segment shrank after a commit", ctx(step));
                                let cut = kept + rng.below(len - kept + 1);
                                OpenOptions::new().write(true).open(&path).unwrap().set_len(cut).unwrap();
                            }
                        }
                    }
                    let ledger = Ledger::path_in(d.path());
                    match &durable.ledger {
                        Some(bytes) => fs::write(&ledger, bytes).unwrap(),
                        None => {
                            let _ = fs::remove_file(&ledger);
                        }
                    }
                    // Index files are written without a directory fsync of
                    // their own: a crash may lose them or (as if torn)
                    // leave any prefix.
                    for idx in idx_files(d.path()) {
                        match rng.below(4) {
                            0 => fs::remove_file(&idx).unwrap(),
                            1 => {
                                let l = fs::metadata(&idx).unwrap().len();
                                OpenOptions::new().write(true).open(&idx).unwrap().set_len(rng.below(l)).unwrap();
                            }
                            _ => {}
                        }
                    }
                }
                let (q2, rep) = Queue::open(d.path(), o).unwrap();
                q = q2;
                if pad {
                    q.pad_min_segment = 0;
                }
                q.hold_block_for_tests = hold;
                assert_eq!(rep.corrupt_records, 0, "{}", ctx(step));
                indexed_total += q.indexed_segments();
                assert!(idx_files(d.path()).len() < seg_files(d.path()).len().max(1), "{}", ctx(step));
                if !crash {
                    assert_eq!(rep.truncated_bytes, 0, "{}", ctx(step));
                }
                // The head the last durable ledger names, as the model saw it.
                head = durable.head;
                // Open syncs what it calls committed: that is the new promise.
                durable = Durable::capture(d.path());
                let got = q.read_from(0, usize::MAX).unwrap();
                let expect: Vec<&ModelRec> = recs.iter().filter(|r| r.id > head).collect();
                // `got` must be a prefix of `expect` that contains every committed one.
                assert!(got.len() <= expect.len(), "{}: extra records", ctx(step));
                for (g, e) in got.iter().zip(&expect) {
                    assert_eq!(g.0.id, e.id, "{}", ctx(step));
                    assert_eq!(g.0.readings, e.readings, "{}", ctx(step));
                    assert_eq!(g.0.created_ms, e.id * 10);
                    assert_eq!(g.1, e.payload, "{}: payload of {}", ctx(step), e.id);
                }
                for lost in &expect[got.len()..] {
                    assert!(!lost.committed, "{}: committed record {} lost", ctx(step), lost.id);
                }
                if !crash {
                    assert_eq!(got.len(), expect.len(), "{}: clean reopen loses nothing", ctx(step));
                }
                // Survivors are now committed; the lost are forgotten.
                let keep: std::collections::HashSet<u64> = got.iter().map(|g| g.0.id).collect();
                recs.retain(|r| r.id <= head || keep.contains(&r.id));
                let max_committed = committed_ever.keys().max().copied().unwrap_or(0);
                assert!(q.next_id() > max_committed, "{}: id reuse possible", ctx(step));
            }
        }
        // A ledger write is a promise too (an ack or an eviction made
        // durable); a deleted segment is gone. The ledger never names a head
        // beyond the model's.
        // So is a committed id that moved (an append that rolled a segment
        // commits the old one).
        if q.committed_id() != last_committed {
            last_committed = q.committed_id();
            durable = Durable::capture(d.path());
        }
        if fs::read(Ledger::path_in(d.path())).ok() != durable.ledger {
            durable.ledger_now(d.path());
            assert!(durable.head <= head, "{}: the ledger names head {} beyond {head}", ctx(step), durable.head);
        }
        durable.segs.retain(|p, _| p.exists());
        // Track what is committed now and check id uniqueness.
        let c = q.committed_id();
        for r in recs.iter_mut().filter(|r| r.id <= c && !r.committed) {
            r.committed = true;
            if let Some(old) = committed_ever.insert(r.id, r.payload.clone()) {
                assert_eq!(old, r.payload, "{}: id {} reused", ctx(step), r.id);
            }
        }
        // Readers see exactly the committed live records.
        let want: Vec<u64> = recs.iter().filter(|r| r.id > head && r.id <= c).map(|r| r.id).collect();
        let got: Vec<u64> = q.read_from(0, usize::MAX).unwrap().iter().map(|g| g.0.id).collect();
        assert_eq!(got, want, "{}", ctx(step));
        // Forget what reclaim may have deleted (ids at or below the head).
        while recs.front().is_some_and(|r| r.id <= head && r.id <= q.durable_acked_through()) {
            recs.pop_front();
        }
        // Everything on disk, acked or not, still reads back intact.
        let on_disk = q.read_all_on_disk_after(0).unwrap();
        assert!(on_disk.windows(2).all(|w| w[0].0.id < w[1].0.id), "{}", ctx(step));
    }
    pads += q.pad_bytes();
    assert_eq!(pads > 0, pad, "seed {seed}: padded {pads} bytes");
    directs += q.direct_commits();
    assert_eq!(directs > 0, hold.is_some(), "seed {seed}: {directs} commits of held records");
    indexed_total
}

/// `queue status` reads the queue while the gateway drains it: a segment
/// reclaimed between listing, reading and opening it is skipped, never an
/// error (CI saw "opening …0001.seg: No such file or directory").
#[test]
fn readonly_open_races_a_draining_writer_without_errors() {
    let d = fast_tmp();
    let dir = d.path().to_path_buf();
    let (mut q, _) = Queue::open(&dir, opts(1 << 30, WhenFull::DropOldest, 4096)).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for _ in 0..40 {
                    i += 1;
                    q.append(1, i, &payload(i, 200)).unwrap();
                }
                q.commit().unwrap();
                q.ack_through(q.committed_id()).unwrap();
                q.commit().unwrap();
                q.reclaim().unwrap();
            }
        })
    };
    let mut opened = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        Queue::open_readonly(&dir).unwrap_or_else(|e| panic!("after {opened} opens: {e}"));
        opened += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert!(opened > 10);
}

#[test]
fn priority_records_are_found_ahead_counted_apart_and_survive_index_and_scan_reopens() {
    let dir = tmp();
    // Small segments: the early records end up in sealed, indexed segments.
    let o = opts(1 << 30, WhenFull::DropOldest, 4096);
    let (mut q, _) = Queue::open(dir.path(), o).unwrap();
    for i in 1..=40u64 {
        let p = payload(i, 300);
        if i % 10 == 0 { q.append_with(2, i, &p, true, 1) } else { q.append(3, i, &p) }.unwrap();
    }
    q.commit().unwrap();
    let check = |q: &Queue| {
        assert_eq!(q.priority_after(0, 10), [10, 20, 30, 40]);
        assert_eq!(q.priority_after(10, 2), [20, 30]);
        let s = q.status();
        assert_eq!((s.readings, s.priority_readings), (36 * 3 + 4 * 2, 8));
        assert_eq!((s.priority_oldest_created_ms, s.bulk_oldest_created_ms), (Some(10), Some(1)));
        let metas: Vec<RecordMeta> = q.read_from(0, usize::MAX).unwrap().into_iter().map(|(m, _)| m).collect();
        assert!(metas.iter().all(|m| m.priority == (m.id % 10 == 0) && m.readings == if m.priority { 2 } else { 3 }));
    };
    check(&q);
    drop(q);
    assert!(!idx_files(dir.path()).is_empty(), "the test needs sealed, indexed segments");
    let (q, _) = Queue::open(dir.path(), o).unwrap();
    check(&q);
    drop(q);
    remove_indexes(dir.path());
    let (mut q, _) = Queue::open(dir.path(), o).unwrap();
    check(&q);
    // Acked ones are not ahead any more; acks count readings without the flag.
    q.ack_through(20).unwrap();
    assert_eq!(q.priority_after(0, 10), [30, 40]);
    assert_eq!(q.status().readings, 18 * 3 + 2 * 2);
}

#[test]
fn a_record_with_a_span_owns_its_ids_across_reopens_acks_and_reclaims() {
    let dir = tmp();
    let o = opts(1 << 30, WhenFull::DropOldest, 4096);
    let (mut q, _) = Queue::open(dir.path(), o).unwrap();
    // Ids: 1, 2..=4 (span 3), 5, then more to seal segments.
    q.append(1, 1, &payload(1, 200)).unwrap();
    assert_eq!(q.next_id(), 2);
    q.append_with(2, 2, &payload(2, 200), false, 3).unwrap();
    assert_eq!(q.next_id(), 5, "a span of 3 owns 2..=4");
    q.append(1, 5, &payload(5, 200)).unwrap();
    for i in 6..40u64 {
        q.append_with(1, i, &payload(i, 300), i % 7 == 0, if i % 5 == 0 { 2 } else { 1 }).unwrap();
    }
    q.commit().unwrap();
    let next = q.next_id();
    let metas = |q: &Queue| -> Vec<(u64, u32)> {
        q.read_from(0, usize::MAX).unwrap().iter().map(|(m, _)| (m.id, m.span)).collect()
    };
    let before = metas(&q);
    assert_eq!(&before[..3], [(1, 1), (2, 3), (5, 1)]);
    assert_eq!(q.committed_id(), next - 1, "committed through the last record's last id");
    drop(q);
    for reindex in [false, true] {
        if reindex {
            remove_indexes(dir.path());
        }
        let (q, _) = Queue::open(dir.path(), o).unwrap();
        assert_eq!(q.next_id(), next, "ids owned by a span are never reused (reindex {reindex})");
        assert_eq!(metas(&q), before);
        assert_eq!(q.status().readings, 1 + 2 + 1 + 34);
    }
    let (mut q, _) = Queue::open(dir.path(), o).unwrap();
    // Reading on from the middle of a span skips the record; acking
    // through its last id acks it.
    assert_eq!(q.read_from(3, 1).unwrap()[0].0.id, 5);
    q.ack_through(4).unwrap();
    assert_eq!(q.read_from(0, 1).unwrap()[0].0.id, 5);
    q.ack_through(next - 1).unwrap();
    q.commit().unwrap();
    q.reclaim().unwrap();
    assert_eq!(q.status().batches, 0);
    drop(q);
    let (q, _) = Queue::open(dir.path(), o).unwrap();
    assert_eq!(q.next_id(), next);
}

#[test]
fn a_broken_disk_is_told_from_a_refusal() {
    use std::io::{Error, ErrorKind};
    let io = |k: ErrorKind| QueueError::Io(Error::new(k, "x"));
    assert!(io(ErrorKind::ReadOnlyFilesystem).storage_failed());
    assert!(io(ErrorKind::Other).storage_failed());
    assert!(QueueError::NeedsReopen.storage_failed());
    assert!(!io(ErrorKind::StorageFull).storage_failed());
    assert!(!io(ErrorKind::QuotaExceeded).storage_failed());
    assert!(!QueueError::Full { needed: 1, max: 0 }.storage_failed());
    assert!(!QueueError::TooLarge { size: 1, max: 0 }.storage_failed());
}

/// While the backlog is small, a commit ends the segment on a 4 KiB page
/// with a pad, so the next commit writes fresh pages instead of rewriting
/// the last one; records read back the same through a scan, an index and a
/// torn pad. A big backlog or small segments get no pads.
#[test]
fn commits_pad_to_a_page_while_the_backlog_is_small() {
    let d = tmp();
    // Where the records and pads end (the file has zeros written ahead).
    let seg_len = |q: &Queue| q.segments.iter().map(|s| s.len).collect::<Vec<_>>();
    let (mut q, _) = open_page_cache(d.path(), big()).unwrap();
    for i in 1..=3 {
        q.append(1, i, &payload(i, 100)).unwrap();
    }
    q.commit().unwrap();
    assert_eq!(seg_len(&q), [PAGE]);
    assert_eq!(q.pad_bytes(), PAGE - 3 * (OVERHEAD as u64 + 100));
    q.append(1, 4, &payload(4, 5000)).unwrap();
    q.commit().unwrap();
    assert_eq!(seg_len(&q), [3 * PAGE], "the next commit starts on a fresh page");
    q.commit().unwrap();
    assert_eq!(seg_len(&q), [3 * PAGE], "nothing appended, nothing padded");
    let want: Vec<(u64, Vec<u8>)> = (1..=4).map(|i| (i, payload(i, if i == 4 { 5000 } else { 100 }))).collect();
    assert_eq!(live(&q), want);
    drop(q);
    let (mut q, rep) = open_page_cache(d.path(), big()).unwrap();
    assert_eq!((rep.records, rep.corrupt_records, rep.truncated_bytes), (4, 0, 0));
    assert_eq!(live(&q), want);
    // A power cut in the middle of the last pad: a torn tail from the pad on.
    q.append(1, 5, &payload(5, 100)).unwrap();
    q.commit().unwrap();
    drop(q);
    let seg = &seg_files(d.path())[0];
    let f = OpenOptions::new().write(true).open(seg).unwrap();
    f.set_len(3 * PAGE + OVERHEAD as u64 + 100 + 30).unwrap();
    let (q, rep) = open_page_cache(d.path(), big()).unwrap();
    assert_eq!((rep.records, rep.corrupt_records, rep.truncated_bytes), (5, 0, 30));
    assert_eq!(live(&q).len(), 5);
    drop(q);

    // A sealed, padded segment loads the same from its index and by a scan.
    let d = tmp();
    let o = opts(1 << 30, WhenFull::DropOldest, PAD_MIN_SEGMENT);
    let (mut q, _) = open_page_cache(d.path(), o).unwrap();
    let mut want = Vec::new();
    for i in 1..=400 {
        q.append(1, i, &payload(i, 3000)).unwrap();
        want.push((i, payload(i, 3000)));
        q.commit().unwrap();
    }
    assert!(seg_files(d.path()).len() >= 2 && !idx_files(d.path()).is_empty());
    assert!(q.pad_bytes() >= 300 * (PAGE - 3000 - OVERHEAD as u64), "{}", q.pad_bytes());
    drop(q);
    let (q, rep) = open_page_cache(d.path(), o).unwrap();
    assert!(q.indexed_segments() >= 1);
    assert_eq!((rep.records, rep.corrupt_records, rep.truncated_bytes), (400, 0, 0));
    assert_eq!(live(&q), want);
    drop(q);
    remove_indexes(d.path());
    let (q, rep) = open_page_cache(d.path(), o).unwrap();
    assert_eq!((rep.records, rep.corrupt_records, rep.truncated_bytes, q.indexed_segments()), (400, 0, 0, 0));
    assert_eq!(live(&q), want);
    drop(q);

    // A backlog above an eighth of max_bytes: no pads.
    let d = tmp();
    let o = opts(8 << 20, WhenFull::DropOldest, 8 << 20);
    let (mut q, _) = open_page_cache(d.path(), o).unwrap();
    for i in 1..=400 {
        q.append(1, i, &payload(i, 3000)).unwrap();
    }
    q.commit().unwrap();
    q.append(1, 401, &payload(401, 3000)).unwrap();
    q.commit().unwrap();
    assert_eq!(q.pad_bytes(), 0, "a 1.2 MB backlog in an 8 MiB queue");
    q.ack_through(400).unwrap();
    q.append(1, 402, &payload(402, 3000)).unwrap();
    q.commit().unwrap();
    assert!(q.pad_bytes() > 0, "drained: padded again");
    assert_eq!(seg_len(&q).iter().sum::<u64>() % PAGE, 0);
    drop(q);
    // Segments under PAD_MIN_SEGMENT: no pads.
    let d = tmp();
    let (mut q, _) = open_page_cache(d.path(), opts(1 << 30, WhenFull::DropOldest, PAD_MIN_SEGMENT - 1)).unwrap();
    q.append(1, 1, &payload(1, 100)).unwrap();
    q.commit().unwrap();
    assert_eq!((q.pad_bytes(), seg_len(&q)), (0, vec![OVERHEAD as u64 + 100]));
}

/// Small commits write zeros ahead of the segment's end (64 KiB when fewer
/// than 16 KiB are left), so later commits overwrite blocks within the file's
/// size; a big commit does not. A reopen cuts the zeros off without calling
/// them a torn tail, and a sealed segment has none (its index still loads).
#[test]
fn small_commits_write_zeros_ahead_and_reopen_and_seal_cut_them_off() {
    let d = tmp();
    let file_len = |d: &TempDir| seg_files(d.path()).iter().map(|p| fs::metadata(p).unwrap().len()).collect::<Vec<_>>();
    let (mut q, _) = open_page_cache(d.path(), big()).unwrap();
    let mut want = Vec::new();
    let add = |q: &mut Queue, want: &mut Vec<(u64, Vec<u8>)>, i: u64, n: usize| {
        q.append(1, i, &payload(i, n)).unwrap();
        want.push((i, payload(i, n)));
    };
    for i in 1..=3 {
        add(&mut q, &mut want, i, 100);
    }
    q.commit().unwrap();
    assert_eq!(file_len(&d), [PAGE + PREFILL_CHUNK], "zeros ahead of the first page");
    let bytes = fs::read(&seg_files(d.path())[0]).unwrap();
    assert!(only_zeros(&bytes[PAGE as usize..]));
    for i in 4..=9 {
        add(&mut q, &mut want, i, 1000);
        q.commit().unwrap();
    }
    assert_eq!(q.segments[0].len, 7 * PAGE);
    assert_eq!(file_len(&d), [PAGE + PREFILL_CHUNK], "written within the zeros: the file kept its size");
    for i in 10..=21 {
        add(&mut q, &mut want, i, 3000);
        q.commit().unwrap();
    }
    assert_eq!(q.segments[0].len, 19 * PAGE);
    // At 14 pages fewer than 16 KiB of zeros were left: 64 KiB from there.
    assert_eq!(file_len(&d), [14 * PAGE + PREFILL_CHUNK], "zeros written ahead again");
    drop(q);
    let (mut q, rep) = open_page_cache(d.path(), big()).unwrap();
    assert_eq!(rep, clean(21), "zeros ahead are no torn tail");
    assert_eq!(file_len(&d), [19 * PAGE], "cut off at open");
    assert_eq!(live(&q), want);
    add(&mut q, &mut want, 22, 20_000);
    q.commit().unwrap();
    assert_eq!(file_len(&d), [24 * PAGE], "a big commit writes no zeros ahead");
    drop(q);

    // Sealed segments keep no zeros and load from their index: a record that
    // does not fit rolls to a new segment while the old one has zeros ahead.
    let d = tmp();
    let o = opts(1 << 30, WhenFull::DropOldest, PAD_MIN_SEGMENT);
    let (mut q, _) = open_page_cache(d.path(), o).unwrap();
    let mut want = Vec::new();
    for i in 1..=30 {
        let n = if i % 10 == 0 { 1_020_000 } else { 2000 };
        add(&mut q, &mut want, i, n);
        q.commit().unwrap();
    }
    let sealed = seg_files(d.path()).len() - 1;
    assert!(sealed >= 3, "rolled at 10 (with zeros ahead of 36 KiB of records) and after");
    for s in q.segments.iter().take(sealed) {
        assert_eq!(
            fs::metadata(&s.path).unwrap().len(),
            s.len,
            "sealed segment {} ends at its last record",
            s.first_id
        );
    }
    drop(q);
    let (q, rep) = open_page_cache(d.path(), o).unwrap();
    assert_eq!(q.indexed_segments(), sealed as u64);
    assert_eq!(rep, clean(30));
    assert_eq!(live(&q), want);
}

/// Reused segment files: an acked segment is kept as `spare.tmp` and the
/// next roll renames it into place instead of creating a file, so no zeros
/// are written ahead (it has its size). Its old records are never read as
/// records: after a crash the new ones come back; the old ones after them
/// are cut off without being called damage, a torn write before them is;
/// a reused file whose first new record never reached the disk is removed;
/// a kept file a crash left is deleted at open.
#[test]
fn acked_segment_files_are_reused_and_their_old_records_never_come_back() {
    use std::os::unix::fs::MetadataExt;
    let d = tmp();
    let spare = d.path().join("segments").join(spare_name(0));
    let rec = |i: u64| (i, payload(i, 1000));
    let (mut q, _) = open_page_cache(d.path(), big()).unwrap();
    // 20 records, a commit (and so a page, with its pad) each.
    for i in 1..=20 {
        q.append(1, i, &payload(i, 1000)).unwrap();
        q.commit().unwrap();
    }
    let ino = fs::metadata(&seg_files(d.path())[0]).unwrap().ino();
    q.ack_through(20).unwrap();
    assert_eq!(q.reclaim().unwrap(), 1);
    assert!(seg_files(d.path()).is_empty() && spare.exists(), "kept for the next roll");
    let zeros = q.prefill_bytes();
    let fsyncs = q.fsyncs();
    q.append(1, 21, &payload(21, 1000)).unwrap();
    assert_eq!(q.fsyncs(), fsyncs + 1, "the renames made durable before a record is written into the file");
    q.commit().unwrap();
    for i in 22..=25 {
        q.append(1, i, &payload(i, 1000)).unwrap();
        q.commit().unwrap();
    }
    let seg = seg_files(d.path())[0].clone();
    assert_eq!((q.reused_segments(), fs::metadata(&seg).unwrap().ino()), (1, ino), "the same file, renamed");
    assert!(!spare.exists());
    assert_eq!(q.prefill_bytes(), zeros, "no zeros ahead in a file that has its size");
    let old_ones = segment::scan(&fs::read(&seg).unwrap()[5 * PAGE as usize..], 0).records;
    assert_eq!(old_ones.len(), 15, "records 6-20 of the first use follow 21-25");
    drop(q); // a crash: nothing cut off
    // A torn write over the start of the old record 6: damage up to its pad.
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(&[0xAB; 100], 5 * PAGE).unwrap();
    drop(f);
    let (mut q, rep) = open_page_cache(d.path(), big()).unwrap();
    assert_eq!(rep, OpenReport { records: 5, truncated_bytes: OVERHEAD as u64 + 1000, ..Default::default() });
    assert_eq!(live(&q), (21..=25).map(rec).collect::<Vec<_>>());
    assert_eq!(fs::metadata(&seg).unwrap().len(), 5 * PAGE, "old records cut off at open");

    // Reused again; a crash; the old records 22-25 after the new 26 are no damage.
    q.ack_through(25).unwrap();
    q.reclaim().unwrap();
    q.append(1, 26, &payload(26, 1000)).unwrap();
    q.commit().unwrap();
    assert_eq!(q.reused_segments(), 1);
    drop(q);
    let (mut q, rep) = open_page_cache(d.path(), big()).unwrap();
    assert_eq!(rep, clean(1));
    assert_eq!(live(&q), [rec(26)]);

    // Reused once more, and the crash comes before record 27 reached the
    // disk (its page still holds record 26): no record 26 from the dead.
    q.ack_through(26).unwrap();
    q.reclaim().unwrap();
    let old = fs::read(&spare).unwrap();
    q.append(1, 27, &payload(27, 1000)).unwrap();
    let seg = seg_files(d.path())[0].clone();
    fs::write(&seg, &old).unwrap();
    drop(q);
    let (mut q, rep) = open_page_cache(d.path(), big()).unwrap();
    assert_eq!(rep, clean(0));
    assert!(seg_files(d.path()).is_empty(), "a reused file without a new record is removed");
    assert_eq!(q.next_id(), 27);

    // A kept file a crash left behind is deleted at open.
    q.append(1, 27, &payload(27, 10)).unwrap();
    q.commit().unwrap();
    q.ack_through(27).unwrap();
    q.reclaim().unwrap();
    assert!(spare.exists());
    drop(q);
    let (q, rep) = open_page_cache(d.path(), big()).unwrap();
    assert_eq!((rep, q.next_id()), (clean(0), 28));
    assert!(!spare.exists());
}

/// [`Queue::open`] with direct commits off: tests of the page cache's
/// path (pads to a page, zeros ahead, reused files) on a disk that has
/// direct I/O.
fn open_page_cache(dir: &Path, o: QueueOptions) -> Result<(Queue, OpenReport)> {
    let (mut q, rep) = Queue::open(dir, o)?;
    q.direct_off = true;
    Ok((q, rep))
}

/// Direct commits: on a file system with direct I/O, a small commit writes
/// its records, padded to the next 512-byte block, with one direct write:
/// ~2.5 KB of records cost their blocks, not a 4 KiB page. Records held
/// for it read back before the commit (from memory), after it (from disk)
/// and after a reopen; a record appended after the last commit is written
/// by a clean drop and lost by a crash (never committed, so never acked).
#[test]
fn small_commits_write_their_blocks_directly_not_pages() {
    let d = disk_dir();
    let (mut q, _) = Queue::open(d.path(), big()).unwrap();
    let mut want = vec![(1, payload(1, 100))];
    q.append(1, 1, &payload(1, 100)).unwrap();
    // Through the page cache: the new file has no zeros ahead yet.
    q.commit().unwrap();
    assert_eq!(q.direct_commits(), 0);
    let (wrote0, zeros0, pads0) = (write_bytes(), q.prefill_bytes(), q.pad_bytes());
    let mut encoded = 0;
    for c in 0..200u64 {
        for k in 0..3 {
            let i = 2 + 3 * c + k;
            q.append(1, i, &payload(i, 780)).unwrap();
            want.push((i, payload(i, 780)));
            encoded += OVERHEAD as u64 + 780;
        }
        q.commit().unwrap();
    }
    let wrote = write_bytes() - wrote0 - (q.prefill_bytes() - zeros0);
    assert_eq!(
        q.direct_commits(),
        200,
        "direct I/O unavailable in {} (statx reports no alignment): this test needs ext4/xfs/btrfs on Linux >= 6.1",
        d.path().display()
    );
    // 2,430 bytes a commit: 2,560 in blocks, 4,096 in pages.
    let per = 3 * (OVERHEAD as u64 + 780);
    assert_eq!(q.pad_bytes() - pads0, 200 * (per.next_multiple_of(512) - per), "each commit padded to its next block");
    assert!(
        (encoded..=encoded * 11 / 10).contains(&wrote),
        "wrote {wrote} bytes (zeros ahead aside) for {encoded} encoded"
    );
    assert_eq!(live(&q), want, "read back from the disk");
    // Held, not yet written: read from memory.
    q.append(1, 602, &payload(602, 500)).unwrap();
    assert!(!q.segments[0].held.is_empty());
    let all = q.read_all_on_disk_after(600).unwrap();
    assert_eq!(
        all.iter().map(|(m, p)| (m.id, p.clone())).collect::<Vec<_>>(),
        [(601, want[600].1.clone()), (602, payload(602, 500))]
    );
    // A clean drop writes it (as the page cache kept it before).
    drop(q);
    want.push((602, payload(602, 500)));
    let (mut q, rep) = Queue::open(d.path(), big()).unwrap();
    assert_eq!(rep, clean(602));
    assert_eq!(live(&q), want);
    q.commit().unwrap();
    // A crash after the commit of 603 and before that of 604: 604 never
    // reached the file, and nothing before it is hurt.
    for i in 603..=604 {
        q.append(1, i, &payload(i, 500)).unwrap();
        if i == 603 {
            q.commit().unwrap();
            want.push((i, payload(i, 500)));
        }
    }
    assert!(!q.segments[0].held.is_empty(), "604 held");
    q.segments[0].held.clear();
    drop(q);
    let (q, rep) = Queue::open(d.path(), big()).unwrap();
    assert_eq!(rep, clean(603));
    assert_eq!((live(&q), q.next_id()), (want, 604));
}

/// A commit whose appends pass [`HOLD_MAX`] goes through the page cache from
/// there on, even where a later record starts on a block boundary: a direct
/// write over the dirty page would make the kernel write that page first
/// (twice in one commit). The next commit holds again.
#[test]
fn a_commit_released_to_the_page_cache_holds_nothing_more() {
    let d = disk_dir();
    let (mut q, _) = Queue::open(d.path(), big()).unwrap();
    // 512-byte records: each ends on a block boundary.
    let p = payload(0, 512 - OVERHEAD);
    let mut id = 0;
    let mut append = |q: &mut Queue| {
        id += 1;
        q.append(1, id, &p).unwrap();
    };
    append(&mut q);
    q.commit().unwrap();
    // Small (direct) commits until zeros ahead leave room past HOLD_MAX,
    // so only HOLD_MAX stops the hold below.
    for _ in 0..100 {
        append(&mut q);
        q.commit().unwrap();
        if q.segments[0].filled - q.segments[0].len >= 2 * HOLD_MAX {
            break;
        }
    }
    let direct = q.direct_commits();
    assert!(direct > 0, "direct I/O unavailable in {} (statx reports no alignment)", d.path().display());
    assert!(q.segments[0].filled - q.segments[0].len >= 2 * HOLD_MAX);
    let mut released = false;
    for _ in 0..HOLD_MAX / 512 + 4 {
        append(&mut q);
        released |= q.segments[0].held.is_empty();
        assert!(!released || q.segments[0].held.is_empty(), "held again after the release");
    }
    assert!(released, "HOLD_MAX released the held records");
    q.commit().unwrap();
    assert_eq!(q.direct_commits(), direct, "that commit went through the page cache");
    append(&mut q);
    q.commit().unwrap();
    assert_eq!(q.direct_commits(), direct + 1, "the next one is direct");
    let n = id;
    drop(q);
    let (q, rep) = Queue::open(d.path(), big()).unwrap();
    assert_eq!(rep, clean(n));
    assert_eq!(live(&q).len() as u64, n);
}

fn big64k() -> QueueOptions {
    opts(1 << 30, WhenFull::DropOldest, 64 << 10)
}

/// A reclaim that frees several acked segments (the pipeline waits until
/// they are worth a state file) keeps up to SPARES_MAX of them, and the next
/// rolls reuse each one; a reclaim for disk space (`reclaim_space`) keeps
/// none and deletes those kept.
#[test]
fn several_acked_segments_are_kept_for_the_next_rolls_and_a_full_disk_deletes_them() {
    let d = tmp();
    let spares = |d: &TempDir| {
        let mut n: Vec<String> = fs::read_dir(d.path().join("segments"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        n.sort();
        n
    };
    let o = big64k;
    let (mut q, _) = open_page_cache(d.path(), o()).unwrap();
    q.pad_min_segment = 0;
    let mut id = 0;
    // Appends (a commit each) until `n` more segments were started; the
    // last id, the first record of the newest one.
    let mut fill = |q: &mut Queue, n: usize| {
        let target = q.segments.len() + n;
        while q.segments.len() < target {
            id += 1;
            q.append(1, id, &payload(id, 4000)).unwrap();
            q.commit().unwrap();
        }
        id
    };
    let last = fill(&mut q, SPARES_MAX + 3);
    assert_eq!(seg_files(d.path()).len(), SPARES_MAX + 3);
    q.ack_through(last - 1).unwrap();
    assert!(q.reclaimable_sealed_bytes() >= (SPARES_MAX as u64 + 2) * (60 << 10));
    assert_eq!(q.reclaim().unwrap(), SPARES_MAX as u64 + 2);
    assert_eq!(q.reclaimable_sealed_bytes(), 0);
    let mut want_names: Vec<String> = (0..SPARES_MAX).map(spare_name).collect();
    want_names.sort();
    assert_eq!(spares(&d), want_names, "SPARES_MAX kept, two deleted");
    let zeros = q.prefill_bytes();
    let last = fill(&mut q, SPARES_MAX);
    assert_eq!(q.reused_segments(), SPARES_MAX as u64);
    assert!(spares(&d).is_empty());
    assert_eq!(q.prefill_bytes(), zeros, "no zeros ahead in the reused files");
    fill(&mut q, 1);
    assert_eq!(q.reused_segments(), SPARES_MAX as u64, "a new file once none is kept");
    // A full disk: what is kept goes, and nothing more is kept.
    q.ack_through(last).unwrap();
    q.reclaim().unwrap();
    assert_eq!(spares(&d).len(), SPARES_MAX);
    q.reclaim_space().unwrap();
    assert!(spares(&d).is_empty());
    let last = fill(&mut q, 2);
    q.ack_through(last).unwrap();
    q.reclaim_space().unwrap();
    assert!(spares(&d).is_empty());
    // Every record after the ack comes back after a reopen.
    let want: Vec<u64> = ((last + 1)..=fill(&mut q, 0)).collect();
    drop(q);
    let (q, _) = open_page_cache(d.path(), o()).unwrap();
    assert_eq!(live(&q).iter().map(|(i, _)| *i).collect::<Vec<_>>(), want);

    // Kept files stay within an eighth of max_bytes: two 64 KiB ones of 1 MiB.
    let d = tmp();
    let o = || opts(1 << 20, WhenFull::DropOldest, 64 << 10);
    let (mut q, _) = open_page_cache(d.path(), o()).unwrap();
    q.pad_min_segment = 0;
    for id in 1..=100 {
        q.append(1, id, &payload(id, 4000)).unwrap();
        q.commit().unwrap();
    }
    assert!(seg_files(d.path()).len() >= 5);
    q.ack_through(100).unwrap();
    q.reclaim().unwrap();
    assert_eq!(spares(&d).len(), 2, "{:?}", spares(&d));

    // All acked, the segment appended to too: the sealed ones are kept, not
    // that partly filled one (its rest would take zeros when reused).
    let d = tmp();
    let (mut q, _) = open_page_cache(d.path(), big64k()).unwrap();
    q.pad_min_segment = 0;
    let mut id = 0;
    while q.segments.len() < 3 || q.segments[2].len < 8192 {
        id += 1;
        q.append(1, id, &payload(id, 4000)).unwrap();
        q.commit().unwrap();
    }
    q.ack_through(id).unwrap();
    assert_eq!(q.reclaim().unwrap(), 3);
    assert_eq!(spares(&d).len(), 2, "the two sealed ones");
    assert!(q.spares.iter().all(|k| k.size >= 60 << 10), "{:?}", q.spares);
}

/// Issue 18: the pipeline rebuilds dedup from the records of its window, so
/// `keep_from` keeps their segments through `reclaim`, acked or not, but not
/// through `reclaim_space`; `dedup_span` finds the window's first record and
/// says whether the window is all on disk (an older record still is, or
/// nothing was ever deleted). Seen failing with `reclaim` ignoring the hold,
/// with `reclaimable_sealed_bytes` counting held segments, and with a span
/// called complete when its records' predecessors were deleted.
#[test]
fn kept_records_for_dedup_survive_reclaim_until_space_is_needed() {
    let d = tmp();
    // 200-byte records in 1000-byte segments: ids 1-5, 6-10, 11-15, 16-20;
    // record i created at i * 1000 ms.
    let o = opts(1 << 30, WhenFull::DropOldest, 1000);
    let (mut q, _) = Queue::open(d.path(), o).unwrap();
    let span = q.dedup_span(0);
    assert_eq!((span.from, span.complete), (1, true), "an empty queue that never deleted: complete");
    for i in 1..=20 {
        q.append(1, i * 1000, &payload(i, 170)).unwrap();
    }
    q.commit().unwrap();
    // The window starts at record 12: keep from record 11 (segment 11-15).
    let span = q.dedup_span(11_500);
    assert_eq!((span.from, span.complete, span.keep), (12, true, 11));
    assert_eq!(span.bytes, 10 * 200, "segments 11-15 and 16-20");
    q.keep_from(span.keep);
    q.ack_through(20).unwrap();
    q.commit().unwrap();
    assert_eq!(q.reclaimable_sealed_bytes(), 2 * 1000, "segments 1-5 and 6-10 only");
    assert_eq!(q.reclaim().unwrap(), 2);
    assert_eq!(q.read_all_on_disk_after(0).unwrap()[0].0.id, 11, "held, though acked");
    assert!(!q.reclaimable());
    assert_eq!(q.reclaim().unwrap(), 0);
    // The window moved past record 15: the oldest on disk (11) is older.
    let span = q.dedup_span(16_000);
    assert_eq!((span.from, span.complete, span.keep), (16, true, 15));
    // A window starting before everything on disk: what came before record
    // 11 was deleted, so the window is not known whole.
    let span = q.dedup_span(5_000);
    assert_eq!((span.from, span.complete, span.keep), (11, false, 11));
    // Across a restart nothing held is deleted by `open`.
    drop(q);
    let (mut q, _) = Queue::open(d.path(), o).unwrap();
    assert_eq!(q.read_all_on_disk_after(0).unwrap()[0].0.id, 11);
    // A full disk frees held segments too.
    q.keep_from(11);
    assert_eq!(q.reclaim().unwrap(), 0);
    assert_eq!(q.reclaim_space().unwrap(), 2);
    assert!(q.read_all_on_disk_after(0).unwrap().is_empty());
}

/// A payload like a small batch's: repetitive (device ids, sensor names)
/// with a varying part, so deflate shrinks it.
fn batch_like(i: u64, readings: usize) -> Vec<u8> {
    let mut p = Vec::new();
    for k in 0..readings as u64 {
        p.extend(format!("wrist-{:02}|heart_rate|{}|{};", k % 20, i * 100 + k, 55 + (i * 7 + k * 13) % 60).bytes());
    }
    p
}

/// A queue in `dir` that deflates, and pads whatever its segment size.
fn deflating_queue(dir: &Path, segment_bytes: u64) -> (Queue, QueueOptions) {
    let mut o = opts(64 << 20, WhenFull::DropOldest, segment_bytes);
    o.compress = true;
    let (mut q, _) = Queue::open(dir, o).unwrap();
    q.pad_min_segment = 0;
    (q, o)
}

#[test]
fn small_records_are_stored_deflated_and_read_back_as_appended() {
    // On the build's own disk (ext4 here): the direct commits of a site's
    // pace, where records are deflated.
    let d = disk_dir();
    let (mut q, mut o) = deflating_queue(d.path(), 8 << 20);
    if q.segments.is_empty() {
        // The first append rolls to the first segment; it is not deflated.
        q.append(1, 1, b"first").unwrap();
        q.commit().unwrap();
    }
    let mut want = vec![(1u64, b"first".to_vec())];
    let noise = |i: u64| -> Vec<u8> {
        (0..300u64).map(|k| ((i * 977 + k).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8).collect()
    };
    let mut raw = 0;
    // Which records should be deflated: small, compressible ones that the
    // commit can hold, i.e. none after a large one until the next commit
    // (that one went through the page cache, and the rest follow it).
    let (mut expect, mut buffered) = (HashSet::new(), false);
    for i in 2..=40u64 {
        let p = match i % 10 {
            // Incompressible: stored as it is.
            3 => noise(i),
            // Larger than what a commit holds: written as it is.
            7 => batch_like(i, 900),
            _ => batch_like(i, 40),
        };
        buffered |= i % 10 == 7;
        if !buffered && i % 10 != 3 {
            expect.insert(i);
        }
        raw += p.len();
        assert_eq!(
            q.append(40, i * 10, &p).unwrap(),
            AppendOutcome::Appended { dropped_records: 0, dropped_readings: 0 }
        );
        want.push((i, p));
        if i % 4 == 0 {
            q.commit().unwrap();
            buffered = false;
        }
    }
    // Uncommitted (held) records read back inflated too.
    let all: Vec<(u64, Vec<u8>)> = q.read_all_on_disk_after(0).unwrap().into_iter().map(|(m, p)| (m.id, p)).collect();
    assert_eq!(all, want);
    q.commit().unwrap();
    assert_eq!(live(&q), want);
    assert!(q.read_from(0, 100).unwrap().iter().skip(1).all(|(m, _)| m.readings == 40), "the flag is not a count");
    let saved = q.deflate_saved_bytes();
    // Only direct commits hold records (ext4 here; tmpfs has no direct I/O).
    if sector::open_direct(&seg_files(d.path())[0]).is_none() {
        eprintln!("no direct I/O where the build lives: nothing is deflated here");
        expect.clear();
    } else {
        assert!(q.direct_commits() > 0);
    }

    // On disk: the batch-like small ones deflated (well under half), the
    // noise and the large ones not.
    let seg = &seg_files(d.path())[0];
    let recs = records_in(seg);
    assert_eq!(recs.len(), 40);
    for r in &recs[1..] {
        let raw_len = want[(r.id - 1) as usize].1.len();
        let deflated = r.readings & DEFLATED != 0;
        assert_eq!(deflated, expect.contains(&r.id), "record {}", r.id);
        if deflated {
            assert!((r.total as usize - OVERHEAD) * 2 < raw_len, "record {}: {} of {raw_len}", r.id, r.total);
        } else {
            assert_eq!(r.total as usize - OVERHEAD, raw_len, "record {}", r.id);
        }
    }
    let stored: usize = recs[1..].iter().map(|r| r.total as usize - OVERHEAD).sum();
    assert_eq!(saved as usize, raw - stored);
    assert_eq!(
        q.status().bytes as usize,
        recs.iter().map(|r| r.total as usize).sum::<usize>(),
        "the bound counts what is stored"
    );

    // After a restart, with or without compression configured: the same.
    drop(q);
    let (q, _) = Queue::open(d.path(), o).unwrap();
    assert_eq!(live(&q), want);
    drop(q);
    o.compress = false;
    let (mut q, _) = Queue::open(d.path(), o).unwrap();
    assert_eq!(live(&q), want);
    // Off: nothing new is deflated.
    q.pad_min_segment = 0;
    q.append(40, 1, &batch_like(99, 40)).unwrap();
    q.commit().unwrap();
    assert_eq!(q.deflate_saved_bytes(), 0);
    assert_eq!(records_in(&seg_files(d.path())[0]).last().unwrap().readings & DEFLATED, 0);
}

#[test]
fn a_deflated_record_that_does_not_inflate_reads_as_corrupt_and_loses_no_other() {
    let d = fast_tmp();
    let (mut q, _) = Queue::open(d.path(), big()).unwrap();
    for i in 1..=3 {
        q.append(1, i, &payload(i, 50)).unwrap();
    }
    q.commit().unwrap();
    drop(q);
    // Record 2 rewritten with the flag and bytes that are no deflate stream
    // (its CRC matches: what a bug or a foreign writer would leave).
    let seg = &seg_files(d.path())[0];
    let mut bytes = segment::encode(1, 1, 1, &payload(1, 50));
    let mut bad = 40u32.to_le_bytes().to_vec();
    bad.extend(std::iter::repeat_n(0xFF, 46));
    bytes.extend(segment::encode(2, 1 | DEFLATED, 2, &bad));
    bytes.extend(segment::encode(3, 1, 3, &payload(3, 50)));
    fs::write(seg, &bytes).unwrap();
    let (q, _) = Queue::open(d.path(), big()).unwrap();
    assert!(matches!(q.read_from(1, 1), Err(QueueError::Corrupt { id: 2, .. })));
    let (ok, corrupt) = q.read_valid_on_disk_after(0, 10).unwrap();
    assert_eq!(corrupt, vec![2]);
    assert_eq!(
        ok.into_iter().map(|(m, p)| (m.id, p)).collect::<Vec<_>>(),
        vec![(1, payload(1, 50)), (3, payload(3, 50))]
    );
}

#[test]
fn deflated_records_in_sealed_segments_read_back_through_their_index() {
    let d = disk_dir();
    let (mut q, o) = deflating_queue(d.path(), 24 << 10);
    let mut want = Vec::new();
    for i in 1..=120u64 {
        let p = batch_like(i, 30);
        q.append(30, i, &p).unwrap();
        want.push((i, p));
        q.commit().unwrap();
    }
    let segs = seg_files(d.path());
    assert!(segs.len() >= 3 && idx_files(d.path()).len() == segs.len() - 1, "{segs:?}");
    let deflated = |p: &PathBuf| records_in(p).iter().filter(|r| r.readings & DEFLATED != 0).count();
    if q.direct_commits() > 0 {
        assert!(deflated(&segs[1]) > 0, "a sealed segment holds deflated records");
    }
    drop(q);
    let (q, _) = Queue::open(d.path(), o).unwrap();
    assert!(q.indexed_segments() >= 2, "sealed segments loaded from their index");
    assert_eq!(live(&q), want);
}
