//! Named crash points for tests: `EDGE_GATEWAY_CRASH_AT=NAME[:N]` makes the
//! process abort (as abruptly as SIGKILL) the N-th time (default 1st) it
//! reaches the point called NAME. Each durability window gets a
//! deterministic test this way; random SIGKILLs then look for windows
//! nobody named.
//!
//! Compiled in debug builds only: a release binary ignores the variable.

#[cfg(debug_assertions)]
use std::sync::{OnceLock, atomic::AtomicU64};

/// `VAR=NAME[:N]`, parsed once; true the N-th time (and after) NAME is reached.
#[cfg(debug_assertions)]
fn reached(var: &str, name: &str, target: &OnceLock<Option<(String, u64)>>, hits: &AtomicU64) -> bool {
    let target = target.get_or_init(|| {
        let v = std::env::var(var).ok()?;
        let (n, count) = match v.split_once(':') {
            Some((n, c)) => (n.to_string(), c.parse().unwrap_or(1)),
            None => (v, 1),
        };
        Some((n, count))
    });
    matches!(target, Some((n, count)) if n == name && hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 >= *count)
}

#[cfg(debug_assertions)]
pub fn hit(name: &str) {
    static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    if reached("EDGE_GATEWAY_CRASH_AT", name, &TARGET, &HITS) {
        eprintln!("crash point {name} reached: aborting");
        std::process::abort();
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn hit(_name: &str) {}

/// [`hit`] at a point between a write and its fsync: before aborting, cut
/// every file `unsynced()` names back to its synced length, as a power cut
/// would (a plain abort leaves the write in the page cache, and the point
/// would behave like the one after the fsync). Logs how many bytes it cut.
#[cfg(debug_assertions)]
pub fn hit_losing(name: &str, unsynced: impl FnOnce() -> Vec<(std::path::PathBuf, u64)>) {
    static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    if reached("EDGE_GATEWAY_CRASH_AT", name, &TARGET, &HITS) {
        let mut cut = 0;
        for (path, synced) in unsynced() {
            let f = std::fs::OpenOptions::new().write(true).open(&path);
            let len = f.as_ref().ok().and_then(|f| f.metadata().ok()).map_or(0, |m| m.len());
            if let Ok(f) = f
                && len > synced
                && f.set_len(synced).is_ok()
            {
                cut += len - synced;
            }
        }
        eprintln!("crash point {name} reached: cut {cut} unsynced bytes (a power cut); aborting");
        std::process::abort();
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn hit_losing(_name: &str, _unsynced: impl FnOnce() -> Vec<(std::path::PathBuf, u64)>) {}

/// `EDGE_GATEWAY_STALL_AT=NAME[:N]`: the N-th time the thread reaches NAME
/// it sleeps for good, like a thread stuck in a hung fsync. The watchdog
/// test uses it to show that a stalled pipeline stops `WATCHDOG=1`.
#[cfg(debug_assertions)]
pub fn stall(name: &str) {
    static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    if reached("EDGE_GATEWAY_STALL_AT", name, &TARGET, &HITS) {
        eprintln!("stall point {name} reached: this thread stops here");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn stall(_name: &str) {}

/// `EDGE_GATEWAY_STALL_AT=NAME[:N]` for async loops: the N-th time the task
/// reaches NAME it awaits forever, like a task stuck on a write to a peer
/// that stopped reading. Unlike [`stall`] the thread and its runtime stay
/// free, so only a watchdog fed by the loop itself (not by a timer task
/// beside it) notices.
#[cfg(debug_assertions)]
pub async fn stall_async(name: &str) {
    static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    if reached("EDGE_GATEWAY_STALL_AT", name, &TARGET, &HITS) {
        eprintln!("stall point {name} reached: this task stops here");
        std::future::pending::<()>().await;
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub async fn stall_async(_name: &str) {}

/// `EDGE_GATEWAY_FAIL_AT=NAME[:N]`: true the N-th time (and after) NAME is
/// reached, so the caller reports an I/O error there (e.g. a failed
/// fdatasync, which a test cannot provoke on a healthy disk).
#[cfg(debug_assertions)]
pub fn fail(name: &str) -> bool {
    static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    reached("EDGE_GATEWAY_FAIL_AT", name, &TARGET, &HITS)
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn fail(_name: &str) -> bool {
    false
}
