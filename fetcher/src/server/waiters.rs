//! The held work requests (long polls): a request that finds nothing pending waits here, in
//! arrival order, until a chunk is pending, its wait is over, or its mapper went silent. Bounded,
//! so a flood of requests cannot make the fetcher keep more than it was told to. Pure: the
//! server does the answering; time is passed in.

use std::collections::{HashSet, VecDeque};
use std::time::Instant;

use async_nats::Subject;

/// A held work request.
#[derive(Debug)]
pub(super) struct Waiter {
    /// Where its answer goes.
    pub(super) reply: Subject,
    /// The mapper that asked.
    pub(super) mapper: String,
    /// Most chunks it asked for (already clamped to what one reply may carry).
    pub(super) max: u32,
    /// When it must be answered, chunks or not.
    pub(super) deadline: Instant,
}

/// The held requests, oldest first, at most `limit` of them.
#[derive(Debug)]
pub(super) struct Waiters {
    queue: VecDeque<Waiter>,
    limit: usize,
}

impl Waiters {
    /// No request held; at most `limit` at once.
    pub(super) fn new(limit: usize) -> Self {
        Waiters { queue: VecDeque::new(), limit }
    }

    /// Holds `waiter` behind the others, or gives it back when `limit` are held already.
    pub(super) fn hold(&mut self, waiter: Waiter) -> Result<(), Waiter> {
        if self.queue.len() >= self.limit {
            return Err(waiter);
        }
        self.queue.push_back(waiter);
        Ok(())
    }

    /// The oldest request, to be served.
    pub(super) fn next(&mut self) -> Option<Waiter> {
        self.queue.pop_front()
    }

    /// Puts a request taken by [`Waiters::next`] back in front (nothing could be handed to it).
    pub(super) fn put_back(&mut self, waiter: Waiter) {
        self.queue.push_front(waiter);
    }

    /// The oldest requests whose deadline is at or before `now`, in order: taken from the front
    /// only, up to the first that still has time.
    pub(super) fn expired(&mut self, now: Instant) -> Vec<Waiter> {
        let mut expired = Vec::new();
        while self.queue.front().is_some_and(|w| w.deadline <= now) {
            expired.extend(self.queue.pop_front());
        }
        expired
    }

    /// Takes the requests of `silent` mappers out (a lease of theirs expired: served, a dead
    /// mapper's request would swallow a chunk); the others keep their order.
    pub(super) fn drop_of(&mut self, silent: &HashSet<String>) -> Vec<Waiter> {
        if silent.is_empty() {
            return Vec::new();
        }
        let (stale, live): (VecDeque<Waiter>, VecDeque<Waiter>) =
            std::mem::take(&mut self.queue).into_iter().partition(|w| silent.contains(&w.mapper));
        self.queue = live;
        stale.into()
    }

    /// Takes every request, oldest first (the run is complete: all are answered `done`).
    pub(super) fn take_all(&mut self) -> Vec<Waiter> {
        std::mem::take(&mut self.queue).into()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn waiter(mapper: &str, deadline: Instant) -> Waiter {
        Waiter { reply: Subject::from(format!("_INBOX.{mapper}")), mapper: mapper.to_string(), max: 1, deadline }
    }

    fn names(waiters: &[Waiter]) -> Vec<&str> {
        waiters.iter().map(|w| w.mapper.as_str()).collect()
    }

    #[test]
    fn requests_beyond_the_limit_are_given_back_not_held() {
        let now = Instant::now();
        let mut waiters = Waiters::new(2);
        assert!(waiters.hold(waiter("a", now)).is_ok());
        assert!(waiters.hold(waiter("b", now)).is_ok());
        let refused = waiters.hold(waiter("c", now)).expect_err("a third request over a limit of two");
        assert_eq!(refused.mapper, "c");
        assert_eq!(names(&waiters.take_all()), ["a", "b"]);
    }

    #[test]
    fn requests_are_served_oldest_first_and_one_put_back_stays_first() {
        let now = Instant::now();
        let mut waiters = Waiters::new(8);
        for name in ["a", "b", "c"] {
            waiters.hold(waiter(name, now)).unwrap();
        }
        let first = waiters.next().unwrap();
        assert_eq!(first.mapper, "a");
        waiters.put_back(first);
        assert_eq!(names(&waiters.take_all()), ["a", "b", "c"]);
        assert!(waiters.next().is_none());
    }

    #[test]
    fn expired_takes_the_front_requests_whose_deadline_passed_and_stops_at_the_first_with_time() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut waiters = Waiters::new(8);
        waiters.hold(waiter("a", t0 + s)).unwrap();
        waiters.hold(waiter("b", t0 + 2 * s)).unwrap();
        waiters.hold(waiter("c", t0 + 5 * s)).unwrap();
        waiters.hold(waiter("d", t0 + s)).unwrap();
        assert!(waiters.expired(t0).is_empty());
        assert_eq!(names(&waiters.expired(t0 + 2 * s)), ["a", "b"]);
        // "d" is past its deadline but waits behind "c", which still has time.
        assert!(waiters.expired(t0 + 3 * s).is_empty());
        assert_eq!(names(&waiters.expired(t0 + 5 * s)), ["c", "d"]);
    }

    #[test]
    fn the_requests_of_silent_mappers_are_dropped_and_the_others_keep_their_order() {
        let now = Instant::now();
        let mut waiters = Waiters::new(8);
        for name in ["a", "dead", "b", "dead", "c"] {
            waiters.hold(waiter(name, now)).unwrap();
        }
        assert!(waiters.drop_of(&HashSet::new()).is_empty());
        let silent: HashSet<String> = ["dead".to_string()].into();
        assert_eq!(names(&waiters.drop_of(&silent)), ["dead", "dead"]);
        assert_eq!(names(&waiters.take_all()), ["a", "b", "c"]);
    }
}
