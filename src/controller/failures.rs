//! The pools whose last reconcile failed, and when each is retried.
//!
//! A failed reconcile is retried after a delay that doubles (the error policy's
//! [`Backoff`]). Wakes do not wait for it on their own: the queue probe wakes a pool's
//! reconcile whenever the queue changes, and the pod watch with every change of its
//! pods, so during an API server outage a busy pool would be reconciled, and fail,
//! about once a second whatever the backoff. Here a reconcile of a failing pool waits
//! until its retry is due, unless the pool's spec changed since the failure (its
//! generation), which may be what fixes it, and never longer than [`WAKE_HOLD`] after
//! the failure: once the API server is back, a pool that something woke is reconciled
//! within that, not only at a retry that may be minutes away.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;

/// The longest a wake of a failing pool waits after its last failure: at most one
/// reconcile every this long per woken pool during a long outage.
pub const WAKE_HOLD: Duration = Duration::from_secs(30);

/// One failing pool.
#[derive(Debug)]
struct Failing {
    backoff: Backoff,
    failed_at: Instant,
    retry_at: Instant,
    generation: Option<i64>,
}

/// The failing pools, by key.
#[derive(Debug)]
pub struct Failures<K> {
    pools: HashMap<K, Failing>,
    new_backoff: fn() -> Backoff,
}

impl<K: Hash + Eq> Failures<K> {
    /// No failing pool; each one's retry delays from `new_backoff`.
    pub fn new(new_backoff: fn() -> Backoff) -> Self {
        Self {
            pools: HashMap::new(),
            new_backoff,
        }
    }

    /// Records that the reconcile of `key`, at `generation`, failed at `now`; returns
    /// the delay before its retry.
    pub fn failed(&mut self, key: K, generation: Option<i64>, now: Instant) -> Duration {
        let new_backoff = self.new_backoff;
        let failing = self.pools.entry(key).or_insert_with(|| Failing {
            backoff: new_backoff(),
            failed_at: now,
            retry_at: now,
            generation,
        });
        let delay = failing.backoff.failed();
        failing.failed_at = now;
        failing.retry_at = now + delay;
        failing.generation = generation;
        delay
    }

    /// How much longer a reconcile of `key`, at `generation`, waits at `now`: until the
    /// retry of its last failure is due, or [`WAKE_HOLD`] after that failure if sooner,
    /// unless its generation changed since; `None` when it may run.
    pub fn hold(&self, key: &K, generation: Option<i64>, now: Instant) -> Option<Duration> {
        let failing = self.pools.get(key)?;
        if failing.generation != generation {
            return None;
        }
        failing
            .retry_at
            .min(failing.failed_at + WAKE_HOLD)
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())
    }

    /// Records that the reconcile of `key` succeeded: its next failure starts again
    /// from the first delay.
    pub fn succeeded(&mut self, key: &K) {
        self.pools.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_to_ten() -> Backoff {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(10))
    }

    #[test]
    fn wakes_of_a_failing_pool_wait_until_its_retry_is_due() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut failures = Failures::new(one_to_ten);
        assert_eq!(failures.hold(&"a", Some(1), t0), None, "not failing");
        assert_eq!(failures.failed("a", Some(1), t0), s(1));
        assert_eq!(
            failures.hold(&"a", Some(1), t0 + Duration::from_millis(400)),
            Some(Duration::from_millis(600))
        );
        assert_eq!(failures.hold(&"b", Some(1), t0), None, "another pool");
        assert_eq!(failures.hold(&"a", Some(1), t0 + s(1)), None, "due");
        // The retry fails too: the next one is two seconds later, then four.
        assert_eq!(failures.failed("a", Some(1), t0 + s(1)), s(2));
        assert_eq!(failures.hold(&"a", Some(1), t0 + s(2)), Some(s(1)));
        assert_eq!(failures.failed("a", Some(1), t0 + s(3)), s(4));
        assert_eq!(failures.hold(&"a", Some(1), t0 + s(3)), Some(s(4)));
        assert_eq!(failures.hold(&"a", Some(1), t0 + s(7)), None);
    }

    #[test]
    fn after_a_long_outage_a_wake_waits_at_most_the_wake_hold() {
        let t0 = Instant::now();
        let mut failures =
            Failures::new(|| Backoff::new(Duration::from_secs(60), Duration::from_secs(300)));
        assert_eq!(failures.failed("a", Some(1), t0), Duration::from_secs(60));
        assert_eq!(failures.hold(&"a", Some(1), t0), Some(WAKE_HOLD));
        assert_eq!(failures.hold(&"a", Some(1), t0 + WAKE_HOLD), None);
        // Failing again, it waits the hold again, not the doubled retry.
        assert_eq!(
            failures.failed("a", Some(1), t0 + WAKE_HOLD),
            Duration::from_secs(120)
        );
        assert_eq!(
            failures.hold(&"a", Some(1), t0 + WAKE_HOLD + Duration::from_secs(10)),
            Some(Duration::from_secs(20))
        );
    }

    #[test]
    fn a_changed_spec_is_reconciled_at_once() {
        let t0 = Instant::now();
        let mut failures = Failures::new(one_to_ten);
        failures.failed("a", Some(1), t0);
        assert_eq!(failures.hold(&"a", Some(2), t0), None);
        // Its failure restarts the wait, the delays still doubling.
        assert_eq!(failures.failed("a", Some(2), t0), Duration::from_secs(2));
        assert!(failures.hold(&"a", Some(2), t0).is_some());
    }

    #[test]
    fn a_success_forgets_the_failures() {
        let t0 = Instant::now();
        let mut failures = Failures::new(one_to_ten);
        failures.failed("a", Some(1), t0);
        failures.failed("a", Some(1), t0);
        failures.succeeded(&"a");
        assert_eq!(failures.hold(&"a", Some(1), t0), None);
        assert_eq!(
            failures.failed("a", Some(1), t0),
            Duration::from_secs(1),
            "from the first delay again"
        );
    }
}
