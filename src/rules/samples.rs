//! A percentile window's values, kept exactly in less memory.
//!
//! A window that emits `p50` or `p95` must remember every value it counted
//! (nearest rank needs them all). Kept as a plain `Vec<f64>` that is 8 bytes
//! a value: a 60 s window of a 1 kHz stream is ~0.5 MB per series, and the
//! uplink bench's ten rules spent ~5 MiB of the gateway's peak RSS there
//! (issue 18). Sensor values repeat (a heart rate is a whole number of
//! beats, a thermometer has a resolution), so values are folded into
//! *runs*: each distinct value once, ascending, with how often it was seen.
//! New values go to a small buffer first, merged into the runs every
//! [`MERGE_EVERY`] values. When the values do not repeat enough to gain
//! (more than one distinct value in [`DENSE`]), the runs are given up for
//! good and the window keeps a plain list as before: never more than ~8
//! bytes a value plus the buffer.
//!
//! Equal means equal under `f64::total_cmp`, the order percentiles sort by,
//! so the answer is the same value, bit for bit, as sorting the plain list.
//! Serialized as the plain list of every value in ascending order: the
//! checkpoint format is unchanged (a list of f64), and the same values give
//! the same bytes whatever was merged when.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cmp::Ordering;

/// Values buffered before they are merged into the runs.
const MERGE_EVERY: usize = 256;
/// Runs are kept while distinct values are at most 1 in `DENSE` of all
/// values (a run is 16 bytes, a plain value 8).
const DENSE: u64 = 3;

#[derive(Debug, Clone, Default)]
pub(crate) struct Samples {
    /// Distinct values, ascending by `total_cmp`, each with its count.
    runs: Vec<(f64, u64)>,
    /// Values not merged yet, in arrival order; every value once the runs
    /// were given up (`plain`).
    buf: Vec<f64>,
    /// Values counted in `runs`.
    in_runs: u64,
    plain: bool,
}

impl Samples {
    pub(crate) fn push(&mut self, v: f64) {
        self.buf.push(v);
        if !self.plain && self.buf.len() >= MERGE_EVERY {
            self.merge();
        }
    }

    /// How many values were pushed.
    pub(crate) fn len(&self) -> u64 {
        self.in_runs + self.buf.len() as u64
    }

    /// Fold the buffer into the runs, or give the runs up.
    fn merge(&mut self) {
        self.buf.sort_by(f64::total_cmp);
        let mut merged: Vec<(f64, u64)> = Vec::with_capacity(self.runs.len() + self.buf.len().min(64));
        let mut add = |v: f64, n: u64| match merged.last_mut() {
            Some((last, c)) if last.total_cmp(&v) == Ordering::Equal => *c += n,
            _ => merged.push((v, n)),
        };
        let (mut i, mut j) = (0, 0);
        while i < self.runs.len() || j < self.buf.len() {
            let take_run = match (self.runs.get(i), self.buf.get(j)) {
                (Some(r), Some(b)) => r.0.total_cmp(b) != Ordering::Greater,
                (Some(_), None) => true,
                _ => false,
            };
            if take_run {
                add(self.runs[i].0, self.runs[i].1);
                i += 1;
            } else {
                add(self.buf[j], 1);
                j += 1;
            }
        }
        self.in_runs += self.buf.len() as u64;
        self.buf.clear();
        if merged.len() as u64 * DENSE > self.in_runs {
            // Too few repeats: a plain list is smaller.
            self.buf = Vec::with_capacity(self.in_runs as usize);
            for (v, n) in merged {
                self.buf.extend(std::iter::repeat_n(v, n as usize));
            }
            self.buf.shrink_to_fit();
            self.runs = Vec::new();
            self.in_runs = 0;
            self.plain = true;
        } else {
            merged.shrink_to_fit();
            self.runs = merged;
        }
    }

    /// Every value, ascending by `total_cmp`.
    pub(crate) fn sorted(&self) -> impl Iterator<Item = f64> + '_ {
        let mut tail = self.buf.clone();
        tail.sort_by(f64::total_cmp);
        let mut runs = self.runs.iter().flat_map(|&(v, n)| std::iter::repeat_n(v, n as usize)).peekable();
        let mut tail = tail.into_iter().peekable();
        std::iter::from_fn(move || match (runs.peek(), tail.peek()) {
            (Some(r), Some(t)) if r.total_cmp(t) != Ordering::Greater => runs.next(),
            (_, Some(_)) => tail.next(),
            _ => runs.next(),
        })
    }

    /// Nearest-rank percentiles (`ps` in 0..=1), NaN for an empty window;
    /// one pass over the sorted values for all of them.
    pub(crate) fn percentiles(&self, ps: &[f64]) -> Vec<f64> {
        let n = self.len();
        let ranks: Vec<u64> = ps.iter().map(|p| ((p * n as f64).ceil() as u64).clamp(1, n.max(1)) - 1).collect();
        let mut out = vec![f64::NAN; ps.len()];
        if n == 0 {
            return out;
        }
        let last = *ranks.iter().max().expect("at least one rank");
        for (k, v) in self.sorted().enumerate().take(last as usize + 1) {
            for (o, &r) in out.iter_mut().zip(&ranks) {
                if r == k as u64 {
                    *o = v;
                }
            }
        }
        out
    }
}

impl PartialEq for Samples {
    /// The same values, however they are held.
    fn eq(&self, other: &Samples) -> bool {
        self.len() == other.len() && self.sorted().zip(other.sorted()).all(|(a, b)| a.total_cmp(&b) == Ordering::Equal)
    }
}

impl Serialize for Samples {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        // The length up front: postcard (the checkpoint) needs it.
        let mut seq = s.serialize_seq(Some(self.len() as usize))?;
        for v in self.sorted() {
            seq.serialize_element(&v)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for Samples {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Samples, D::Error> {
        let mut s = Samples::default();
        for v in Vec::<f64>::deserialize(d)? {
            s.push(v);
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::XorShift as Rng;

    /// Nearest rank on a sorted plain list: what the window did before.
    fn plain_pct(values: &[f64], p: f64) -> f64 {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let k = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1)) - 1;
        v.get(k).copied().unwrap_or(f64::NAN)
    }

    fn check(values: &[f64]) -> Samples {
        let mut s = Samples::default();
        for &v in values {
            s.push(v);
        }
        assert_eq!(s.len(), values.len() as u64);
        let ps = [0.0, 0.01, 0.5, 0.95, 0.99, 1.0];
        let got = s.percentiles(&ps);
        for (p, g) in ps.iter().zip(got) {
            let want = plain_pct(values, *p);
            assert!(g.total_cmp(&want) == Ordering::Equal, "p{p} of {} values: {g} vs {want}", values.len());
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let mine: Vec<f64> = s.sorted().collect();
        assert_eq!(mine.len(), sorted.len());
        assert!(mine.iter().zip(&sorted).all(|(a, b)| a.total_cmp(b) == Ordering::Equal));
        // The checkpoint's bytes: a plain ascending list, read back equal.
        let bytes = postcard::to_allocvec(&s).unwrap();
        assert_eq!(bytes, postcard::to_allocvec(&sorted).unwrap());
        let back: Samples = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, s);
        s
    }

    #[test]
    fn repeating_values_are_held_as_runs_with_the_same_percentiles() {
        let mut rng = Rng::new(7);
        // A heart rate: 60 distinct values, 20,000 readings.
        let hr: Vec<f64> = (0..20_000).map(|_| 55.0 + rng.below(60) as f64).collect();
        let s = check(&hr);
        assert!(!s.plain && s.runs.len() <= 60, "{} runs, plain {}", s.runs.len(), s.plain);
        // Memory: the runs and at most one buffer, not 20,000 values.
        assert!(s.runs.capacity() * 16 + s.buf.capacity() * 8 < 20_000 * 8 / 10);
        // -0.0 and 0.0 differ under total_cmp, as they did when sorted.
        check(&[0.0, -0.0, 0.0, -0.0, 1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY]);
        check(&(0..1000).map(|i| [0.0, -0.0][i % 2]).collect::<Vec<_>>());
    }

    #[test]
    fn values_that_do_not_repeat_fall_back_to_a_plain_list() {
        let mut rng = Rng::new(9);
        let distinct: Vec<f64> = (0..5_000).map(|_| rng.below(1 << 30) as f64 / 7.0).collect();
        let s = check(&distinct);
        assert!(s.plain && s.runs.is_empty());
        assert!(s.buf.capacity() <= 2 * 5_000, "plain list capacity {}", s.buf.capacity());
        // Everything in between, and the empty window.
        check(&[]);
        check(&[42.5]);
        for n in [255, 256, 257, 511, 512, 513, 1_000] {
            let some: Vec<f64> = (0..n).map(|_| rng.below(40) as f64 / 4.0).collect();
            check(&some);
        }
        assert!(Samples::default().percentiles(&[0.5])[0].is_nan());
    }
}
