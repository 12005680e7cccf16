//! The one retry policy every service uses when a peer is not there yet (NATS, the fetcher, a
//! saver, PostgreSQL, JetStream): exponential backoff from a first delay up to a cap, and a
//! warn-once flag so that a long outage logs one line when it starts and one when it ends, not
//! one per retry.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Doubling delays between `first` and `max`, with a flag for "this outage was already logged".
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
    warned: bool,
}

impl Backoff {
    /// Delays `first`, `2 × first`, ... up to `max`.
    pub const fn new(first: Duration, max: Duration) -> Self {
        Backoff { first, max, next: first, warned: false }
    }

    /// The delay to wait now; the next one doubles, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_up_to(self.max)
    }

    /// As [`Self::next_delay`] with a lower cap for this failure (a cheap failure may be retried
    /// sooner than an expensive one).
    pub fn next_delay_up_to(&mut self, cap: Duration) -> Duration {
        let cap = cap.min(self.max);
        let delay = self.next.min(cap);
        self.next = (delay * 2).min(cap);
        delay
    }

    /// Waits [`Self::next_delay`] unless `token` is cancelled first; true if it waited in full.
    pub async fn wait(&mut self, token: &CancellationToken) -> bool {
        let delay = self.next_delay();
        sleep_unless(delay, token).await
    }

    /// As [`Self::wait`], capped at `cap` for this failure.
    pub async fn wait_up_to(&mut self, cap: Duration, token: &CancellationToken) -> bool {
        let delay = self.next_delay_up_to(cap);
        sleep_unless(delay, token).await
    }

    /// True the first time it is asked after a success (or ever): the moment to log the failure.
    pub fn first_failure(&mut self) -> bool {
        !std::mem::replace(&mut self.warned, true)
    }

    /// A success: back to the first delay. True if a failure had been logged since the last
    /// success (the moment to log the recovery).
    pub fn reset(&mut self) -> bool {
        self.next = self.first;
        std::mem::replace(&mut self.warned, false)
    }
}

/// Sleeps `duration` unless `token` is cancelled first; true if it slept in full.
pub async fn sleep_unless(duration: Duration, token: &CancellationToken) -> bool {
    tokio::select! {
        _ = token.cancelled() => false,
        _ = tokio::time::sleep(duration) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_double_up_to_the_cap_and_start_over_after_a_success() {
        let mut b = Backoff::new(100 * MS, 450 * MS);
        let delays: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(delays, [100 * MS, 200 * MS, 400 * MS, 450 * MS, 450 * MS]);
        b.reset();
        assert_eq!(b.next_delay(), 100 * MS);
    }

    #[test]
    fn a_lower_cap_for_one_failure_bounds_that_delay_and_the_next() {
        let mut b = Backoff::new(50 * MS, 2000 * MS);
        let delays: Vec<_> = (0..4).map(|_| b.next_delay_up_to(200 * MS)).collect();
        assert_eq!(delays, [50 * MS, 100 * MS, 200 * MS, 200 * MS]);
        assert_eq!((b.next_delay(), b.next_delay()), (200 * MS, 400 * MS), "the normal cap applies again");
    }

    #[test]
    fn an_outage_is_reported_once_and_its_end_once() {
        let mut b = Backoff::new(MS, MS);
        assert!(!b.reset(), "no outage yet, no recovery to report");
        assert!(b.first_failure());
        assert!(!b.first_failure());
        assert!(b.reset());
        assert!(!b.reset());
        assert!(b.first_failure());
    }

    #[tokio::test]
    async fn a_wait_ends_early_on_cancellation() {
        let token = CancellationToken::new();
        token.cancel();
        let mut b = Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600));
        assert!(!b.wait(&token).await);
    }
}
