//! Named crash points for tests: `EDGE_GATEWAY_CRASH_AT=NAME[:N]` makes the
//! process abort (as abruptly as SIGKILL) the N-th time (default 1st) it
//! reaches the point called NAME. Each durability window gets a
//! deterministic test this way; random SIGKILLs then look for windows
//! nobody named.
//!
//! Compiled in debug builds only: a release binary ignores the variable.

#[cfg(debug_assertions)]
pub fn hit(name: &str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let target = TARGET.get_or_init(|| {
        let v = std::env::var("EDGE_GATEWAY_CRASH_AT").ok()?;
        let (n, count) = match v.split_once(':') {
            Some((n, c)) => (n.to_string(), c.parse().unwrap_or(1)),
            None => (v, 1),
        };
        Some((n, count))
    });
    if let Some((n, count)) = target
        && n == name
        && HITS.fetch_add(1, Ordering::SeqCst) + 1 >= *count
    {
        eprintln!("crash point {name} reached: aborting");
        std::process::abort();
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn hit(_name: &str) {}
