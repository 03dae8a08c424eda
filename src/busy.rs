//! Whether a loop is under load: a count over windows of [`WINDOW`] against
//! a rate. The serial ports and the pipeline thread wait a little between
//! wake-ups only when busy (issue 18), so a site's pace keeps its latency
//! and its commit timing.

use std::time::{Duration, Instant};

pub const WINDOW: Duration = Duration::from_millis(100);

pub struct Busy {
    /// The rate, per second, from which the loop counts as busy.
    per_second: u64,
    /// (start, count since): the current window.
    window: (Instant, u64),
}

impl Busy {
    pub fn new(per_second: u64, now: Instant) -> Busy {
        Busy { per_second, window: (now, 0) }
    }

    /// Count `n` more at `now`: true once this window's count reached the
    /// rate's share of it (a new window starts every [`WINDOW`]).
    pub fn add(&mut self, now: Instant, n: usize) -> bool {
        if now.duration_since(self.window.0) >= WINDOW {
            self.window = (now, 0);
        }
        self.window.1 += n as u64;
        self.window.1 as u128 * 1000 >= self.per_second as u128 * WINDOW.as_millis()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_from_the_rate_s_share_of_a_window_and_quiet_again_in_the_next() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut b = Busy::new(2_000, t0);
        // 2,000/s is 200 in 100 ms.
        assert!(!b.add(ms(10), 199));
        assert!(b.add(ms(20), 1));
        assert!(b.add(ms(99), 1));
        // A new window: counted from zero.
        assert!(!b.add(ms(100), 1));
        assert!(b.add(ms(150), 250));
    }
}
