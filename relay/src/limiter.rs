//! Per-source token buckets with a bounded table: when the table is full the stalest entries are
//! evicted, so a flood from spoofed addresses cannot grow memory.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

pub struct Limiter<K> {
    rate: f64,
    burst: f64,
    max_entries: usize,
    buckets: HashMap<K, (f64, Instant)>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    pub fn new(rate: f64, burst: f64, max_entries: usize) -> Self {
        Limiter {
            rate,
            burst,
            max_entries: max_entries.max(1),
            buckets: HashMap::new(),
        }
    }

    /// True if `key` may send one more packet at `now`.
    pub fn allow(&mut self, key: &K, now: Instant) -> bool {
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.max_entries {
            self.evict(now);
        }
        let (rate, burst) = (self.rate, self.burst);
        let e = self.buckets.entry(key.clone()).or_insert((burst, now));
        e.0 = (e.0 + now.saturating_duration_since(e.1).as_secs_f64() * rate).min(burst);
        e.1 = now;
        if e.0 >= 1.0 {
            e.0 -= 1.0;
            true
        } else {
            false
        }
    }

    /// Drops buckets that have refilled (they carry no state), or the oldest half if none has.
    fn evict(&mut self, now: Instant) {
        let full_after = self.burst / self.rate.max(1e-9);
        self.buckets
            .retain(|_, (_, last)| now.saturating_duration_since(*last).as_secs_f64() < full_after);
        if self.buckets.len() >= self.max_entries {
            let mut ages: Vec<Instant> = self.buckets.values().map(|(_, t)| *t).collect();
            ages.sort();
            let cutoff = ages[ages.len() / 2];
            self.buckets.retain(|_, (_, t)| *t > cutoff);
        }
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let mut l = Limiter::new(10.0, 3.0, 100);
        let t = Instant::now();
        assert!((0..3).all(|_| l.allow(&1, t)));
        assert!(!l.allow(&1, t), "burst spent");
        assert!(
            l.allow(&1, t + Duration::from_millis(100)),
            "refilled one token after 100 ms at 10/s"
        );
        assert!(l.allow(&2, t), "other sources are independent");
    }

    #[test]
    fn table_stays_bounded_under_a_spoofed_flood() {
        let mut l = Limiter::new(1.0, 2.0, 1000);
        let t = Instant::now();
        for k in 0..100_000u32 {
            l.allow(&k, t + Duration::from_micros(k as u64));
        }
        assert!(l.len() <= 1000, "{}", l.len());
    }
}
