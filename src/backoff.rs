//! Delays between the retries of something that keeps failing (a reconcile, a broker
//! connection, an alert receiver): exponential, capped, reset by a success. One policy
//! type for every shell, on [`backon`]'s exponential backoff.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// The retry delays of one failing thing.
#[derive(Debug)]
pub struct Backoff {
    policy: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// Delays from `min`, doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self::with_policy(
            ExponentialBuilder::new()
                .with_min_delay(min)
                .with_max_delay(max),
            max,
        )
    }

    /// Delays from `min`, doubling up to `max`, each one cut to a random point between
    /// its half and its whole, so that the retries of many failing things spread out.
    pub fn jittered(min: Duration, max: Duration) -> Self {
        // backon's jitter adds up to the delay itself: start from the halves.
        Self::with_policy(
            ExponentialBuilder::new()
                .with_min_delay(min / 2)
                .with_max_delay(max / 2)
                .with_jitter(),
            max,
        )
    }

    fn with_policy(policy: ExponentialBuilder, max: Duration) -> Self {
        let policy = policy.without_max_times();
        Backoff {
            policy,
            delays: policy.build(),
            max,
            failures: 0,
        }
    }

    /// Records a failure and gives the delay before the next attempt.
    pub fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        // An exponential backoff without a limit of attempts or total delay never ends.
        self.delays.next().unwrap_or(self.max)
    }

    /// Records a success: the next failure starts again from the first delay.
    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.delays = self.policy.build();
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_restart_after_a_success() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let delays: Vec<u64> = (0..5).map(|_| b.failed().as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 5, 5]);
        assert_eq!(b.failures(), 5);
        b.succeeded();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.failed(), Duration::from_secs(1));
    }

    #[test]
    fn jittered_delays_lie_between_half_and_the_whole_of_each_step() {
        let between = |d: Duration, low: u64, high: u64| {
            assert!(
                d >= Duration::from_millis(low) && d <= Duration::from_millis(high),
                "{d:?} not in [{low}, {high}] ms"
            );
        };
        for _ in 0..50 {
            let mut b = Backoff::jittered(Duration::from_millis(100), Duration::from_millis(1000));
            between(b.failed(), 50, 100);
            between(b.failed(), 100, 200);
            between(b.failed(), 200, 400);
            for _ in 0..10 {
                b.failed();
            }
            between(b.failed(), 500, 1000);
        }
    }
}
