//! The fuzz corpora replayed as ordinary tests (docs/field-proof-fuzz.md):
//! every file under `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`
//! goes through the same harness the fuzz target runs (`fuzz/src/lib.rs`),
//! on stable, in seconds. A harness fails by panicking, as under the fuzzer.
//! The fuzzing itself (nightly, cargo-fuzz, millions of runs) is by hand.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;

use std::path::Path;

fn replay(dir: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(dir);
    let mut n = 0;
    for (target, run) in harness::TARGETS {
        let Ok(entries) = std::fs::read_dir(root.join(target)) else { continue };
        let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
        files.sort();
        for f in files {
            let data = std::fs::read(&f).unwrap();
            // Name the file if it panics.
            let r = std::panic::catch_unwind(|| run(&data));
            assert!(r.is_ok(), "{target}: {} panicked", f.display());
            n += 1;
        }
    }
    n
}

#[test]
fn every_corpus_file_passes_its_target() {
    let n = replay("corpus");
    // The seeds alone are more than this; an empty or missing corpus is a
    // broken checkout, not a pass.
    assert!(n >= 80, "only {n} corpus files under fuzz/corpus");
    for (target, _) in harness::TARGETS {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
        assert!(dir.read_dir().is_ok_and(|mut d| d.next().is_some()), "no corpus for {target}");
    }
}

#[test]
fn every_crash_found_by_fuzzing_stays_fixed() {
    replay("regressions");
}

#[path = "../fuzz/src/seeds.rs"]
mod seeds;

/// Rewrites the seed files (not the corpus the fuzzer grew): run by hand
/// after changing fuzz/src/seeds.rs.
#[test]
#[ignore = "writes fuzz/corpus/*/seed-*: run by hand"]
fn write_seeds() {
    seeds::write_all();
}
