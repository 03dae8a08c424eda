//! Groups accepted readings into batches.
//!
//! A batch closes at `batch_max_readings`, at `batch_max_bytes` (estimated
//! encoded size) or when its first reading is `batch_max_age` old, whichever
//! comes first. Age bounds latency; size bounds the upstream message.

use crate::reading::Reading;
use std::time::{Duration, Instant};

pub struct Batcher {
    max_readings: usize,
    max_bytes: u64,
    max_age: Duration,
    current: Vec<Reading>,
    bytes: u64,
    opened_at: Option<Instant>,
}

impl Batcher {
    pub fn new(max_readings: usize, max_bytes: u64, max_age: Duration) -> Self {
        Batcher { max_readings, max_bytes, max_age, current: Vec::new(), bytes: 0, opened_at: None }
    }

    /// Add a reading; returns a closed batch when this reading filled it.
    /// A reading that would push the batch past `max_bytes` closes the
    /// current batch first and opens the next one.
    pub fn push(&mut self, r: Reading, now: Instant) -> Option<Vec<Reading>> {
        let len = r.approx_len() as u64;
        let mut closed = None;
        if !self.current.is_empty() && self.bytes + len > self.max_bytes {
            closed = self.take();
        }
        if self.current.is_empty() {
            self.opened_at = Some(now);
            self.current.reserve(self.max_readings.min(4096));
        }
        self.bytes += len;
        self.current.push(r);
        if closed.is_none() && (self.current.len() >= self.max_readings || self.bytes >= self.max_bytes) {
            closed = self.take();
        }
        closed
    }

    /// When the open batch must close by age, if one is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.opened_at.map(|t| t + self.max_age)
    }

    /// Close the open batch if it is due at `now`.
    pub fn poll_age(&mut self, now: Instant) -> Option<Vec<Reading>> {
        match self.deadline() {
            Some(d) if d <= now => self.take(),
            _ => None,
        }
    }

    /// Close the open batch now (shutdown, checkpoint).
    pub fn take(&mut self) -> Option<Vec<Reading>> {
        if self.current.is_empty() {
            return None;
        }
        self.opened_at = None;
        self.bytes = 0;
        Some(std::mem::take(&mut self.current))
    }

    pub fn len(&self) -> usize {
        self.current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::Value;

    fn r(i: u64) -> Reading {
        Reading { device: "d".into(), sensor: "s".into(), seq: Some(i), ts: i, value: Value::Number(1.0), boot: None }
    }

    #[test]
    fn closes_at_count() {
        let mut b = Batcher::new(3, 1 << 20, Duration::from_secs(1));
        let t = Instant::now();
        assert!(b.push(r(1), t).is_none());
        assert!(b.push(r(2), t).is_none());
        assert_eq!(b.push(r(3), t).unwrap().len(), 3);
        assert!(b.is_empty() && b.deadline().is_none());
    }

    #[test]
    fn closes_at_bytes_without_exceeding() {
        let one = r(1).approx_len() as u64;
        let mut b = Batcher::new(1000, one * 2 + 1, Duration::from_secs(1));
        let t = Instant::now();
        assert!(b.push(r(1), t).is_none());
        assert!(b.push(r(2), t).is_none());
        let closed = b.push(r(3), t).unwrap();
        assert_eq!(closed.len(), 2, "third reading would exceed the limit, so it opens the next batch");
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn closes_at_age() {
        let mut b = Batcher::new(1000, 1 << 20, Duration::from_millis(200));
        let t = Instant::now();
        b.push(r(1), t);
        assert!(b.poll_age(t + Duration::from_millis(199)).is_none());
        assert_eq!(b.poll_age(t + Duration::from_millis(200)).unwrap().len(), 1);
        assert!(b.poll_age(t + Duration::from_secs(9)).is_none());
    }
}
