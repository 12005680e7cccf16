//! The mappers the fetcher has seen asking for work: when each first and last asked, whether it
//! can run the job, how many of its chunks were saved, and which said they cannot run it
//! (release reason `cannot_run`). It tells who is asking now (the progress line's "nobody can",
//! a metric) and feeds the status. Bounded: the least recently seen mapper is forgotten first.
//! Pure: time is passed in.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// What the fetcher knows about a mapper that asked for work.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct MapperSeen {
    /// When it first asked.
    pub(super) first: Instant,
    /// When it last asked.
    pub(super) last: Instant,
    /// Whether it can run the job (as of its last request).
    pub(super) able: bool,
    /// Chunks of its leases that were saved and confirmed.
    pub(super) done: u64,
}

/// The mappers seen, at most `limit` (and at most `limit` that said they cannot run the job).
#[derive(Debug)]
pub(super) struct Fleet {
    seen: HashMap<String, MapperSeen>,
    cannot_run: HashSet<String>,
    limit: usize,
    /// A mapper counts as asking if it asked within this long.
    window: Duration,
}

impl Fleet {
    /// No mapper seen yet.
    pub(super) fn new(limit: usize, window: Duration) -> Self {
        Fleet { seen: HashMap::new(), cannot_run: HashSet::new(), limit, window }
    }

    /// `mapper` asked at `now`, offering the job's capability or not; returns whether it can run
    /// the job (it offers it and never said it cannot).
    pub(super) fn saw(&mut self, mapper: &str, offers: bool, now: Instant) -> bool {
        let able = offers && !self.cannot_run.contains(mapper);
        if self.seen.len() >= self.limit && !self.seen.contains_key(mapper) {
            if let Some(oldest) = self.seen.iter().min_by_key(|(_, m)| m.last).map(|(n, _)| n.clone()) {
                self.seen.remove(&oldest);
            }
        }
        let seen = self.seen.entry(mapper.to_string()).or_insert(MapperSeen { first: now, last: now, able, done: 0 });
        (seen.last, seen.able) = (now, able);
        able
    }

    /// `mapper` said it cannot run the job: it is unable from its next request on. True the
    /// first time (so it is logged once); nothing is remembered past `limit` such mappers.
    pub(super) fn said_cannot_run(&mut self, mapper: &str) -> bool {
        self.cannot_run.len() < self.limit && self.cannot_run.insert(mapper.to_string())
    }

    /// Whether `mapper` said it cannot run the job.
    pub(super) fn cannot_run(&self, mapper: &str) -> bool {
        self.cannot_run.contains(mapper)
    }

    /// A chunk leased to `mapper` was saved and confirmed.
    pub(super) fn saved(&mut self, mapper: &str) {
        if let Some(seen) = self.seen.get_mut(mapper) {
            seen.done += 1;
        }
    }

    /// Mappers that asked within the window before `now`: (able to run the job, unable).
    pub(super) fn asking(&self, now: Instant) -> (usize, usize) {
        let recent = self.seen.values().filter(|m| now.duration_since(m.last) < self.window);
        recent.fold((0, 0), |(able, unable), m| if m.able { (able + 1, unable) } else { (able, unable + 1) })
    }

    /// How many mappers ask when some do but none can run the job: never a silent hang.
    pub(super) fn nobody_can(&self, now: Instant) -> Option<usize> {
        match self.asking(now) {
            (0, unable) if unable > 0 => Some(unable),
            _ => None,
        }
    }

    /// Every mapper seen, in no order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&String, &MapperSeen)> {
        self.seen.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(10);

    #[test]
    fn a_mapper_is_able_only_if_it_offers_the_capability_and_never_said_it_cannot_run_it() {
        let now = Instant::now();
        let mut fleet = Fleet::new(8, WINDOW);
        assert!(fleet.saw("a", true, now));
        assert!(!fleet.saw("b", false, now));
        assert!(fleet.said_cannot_run("a"));
        assert!(!fleet.said_cannot_run("a"), "said twice, logged once");
        assert!(fleet.cannot_run("a") && !fleet.cannot_run("b"));
        assert!(!fleet.saw("a", true, now), "it said it cannot, whatever it offers");
        assert_eq!(fleet.asking(now), (0, 2));
    }

    #[test]
    fn only_mappers_that_asked_within_the_window_count_as_asking() {
        let t0 = Instant::now();
        let mut fleet = Fleet::new(8, WINDOW);
        fleet.saw("early", true, t0);
        fleet.saw("late", false, t0 + Duration::from_secs(5));
        assert_eq!(fleet.asking(t0 + Duration::from_secs(9)), (1, 1));
        assert_eq!(fleet.asking(t0 + WINDOW), (0, 1));
        assert_eq!(fleet.asking(t0 + Duration::from_secs(15)), (0, 0));
    }

    #[test]
    fn nobody_can_counts_the_asking_mappers_only_when_none_is_able() {
        let t0 = Instant::now();
        let mut fleet = Fleet::new(8, WINDOW);
        assert_eq!(fleet.nobody_can(t0), None, "nobody asks: nothing to say");
        fleet.saw("a", false, t0);
        fleet.saw("b", false, t0);
        assert_eq!(fleet.nobody_can(t0), Some(2));
        fleet.saw("c", true, t0);
        assert_eq!(fleet.nobody_can(t0), None);
        assert_eq!(fleet.nobody_can(t0 + WINDOW), None, "nobody asks any more");
    }

    #[test]
    fn the_least_recently_seen_mapper_is_forgotten_at_the_limit() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut fleet = Fleet::new(2, WINDOW);
        fleet.saw("a", true, t0);
        fleet.saw("b", true, t0 + s);
        fleet.saw("a", true, t0 + 2 * s);
        fleet.saw("c", true, t0 + 3 * s);
        let mut names: Vec<&str> = fleet.iter().map(|(n, _)| n.as_str()).collect();
        names.sort();
        assert_eq!(names, ["a", "c"]);
    }

    #[test]
    fn a_mapper_keeps_its_first_sighting_and_counts_its_saved_chunks() {
        let t0 = Instant::now();
        let mut fleet = Fleet::new(8, WINDOW);
        fleet.saw("a", true, t0);
        fleet.saw("a", true, t0 + WINDOW);
        fleet.saved("a");
        fleet.saved("a");
        fleet.saved("unknown");
        let (_, seen) = fleet.iter().next().unwrap();
        assert_eq!(*seen, MapperSeen { first: t0, last: t0 + WINDOW, able: true, done: 2 });
        assert_eq!(fleet.iter().count(), 1);
    }
}
