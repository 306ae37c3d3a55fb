//! One retry schedule: attempts spaced by a delay that doubles after every failure, up to a cap,
//! and back to the minimum after a success or a new opportunity (the peer came online, the
//! host's addresses changed). Sans-IO: a state machine asks [`Backoff::is_due`] with its clock; a
//! task that sleeps between attempts takes [`Backoff::next_delay`].

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    delay: Duration,
    due: Instant,
}

impl Backoff {
    /// Due at once.
    pub fn new(min: Duration, max: Duration, now: Instant) -> Backoff {
        Backoff {
            min,
            max,
            delay: min,
            due: now,
        }
    }

    pub fn is_due(&self, now: Instant) -> bool {
        now >= self.due
    }

    pub fn due_at(&self) -> Instant {
        self.due
    }

    /// The delay the next failure will wait.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// An attempt failed (or timed out) now: the next one waits the current delay, which then
    /// doubles up to the cap.
    pub fn failed(&mut self, now: Instant) {
        self.due = now + self.delay;
        self.delay = (self.delay * 2).min(self.max);
    }

    /// An attempt failed: how long to wait before the next (the current delay, which then
    /// doubles up to the cap). For tasks that sleep between attempts.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.delay;
        self.delay = (self.delay * 2).min(self.max);
        d
    }

    /// An attempt succeeded: the next failure starts from the minimum delay again.
    pub fn succeeded(&mut self) {
        self.delay = self.min;
    }

    /// A new opportunity: retry by `at` at the latest, from the minimum delay.
    pub fn retry_by(&mut self, at: Instant) {
        self.delay = self.min;
        self.due = self.due.min(at);
    }

    /// Not before `at` (e.g. while an attempt is under way).
    pub fn hold_until(&mut self, at: Instant) {
        self.due = self.due.max(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sleeping_task_waits_the_same_schedule() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(200), ms(1000), Instant::now());
        let waits: Vec<Duration> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(waits, [ms(200), ms(400), ms(800), ms(1000), ms(1000)]);
        b.succeeded();
        assert_eq!(b.next_delay(), ms(200));
    }

    #[test]
    fn delays_double_to_the_cap_and_reset() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut b = Backoff::new(s(2), s(10), t0);
        assert!(b.is_due(t0));
        b.failed(t0);
        assert_eq!(b.due_at(), t0 + s(2));
        b.failed(t0 + s(2));
        assert_eq!(b.due_at(), t0 + s(6));
        b.failed(t0 + s(6));
        b.failed(t0 + s(14));
        assert_eq!(b.due_at(), t0 + s(24), "capped at 10 s");
        b.retry_by(t0 + s(15));
        assert_eq!(b.due_at(), t0 + s(15));
        assert_eq!(b.delay(), s(2));
        b.hold_until(t0 + s(30));
        assert!(!b.is_due(t0 + s(29)));
        b.succeeded();
        assert_eq!(b.delay(), s(2));
    }
}
