//! Chunks that kill their mappers: a record whose transform aborts the process, runs it out of
//! memory or hangs it never comes back as a result, so the mapper never reports a failure; the
//! chunk's lease just expires, again and again. After `--max-attempts` expiries the fetcher
//! splits the chunk to find the object that does it, then dead-letters that object alone
//! ("its mapper died N times") and has the rest saved.
//!
//! The split never saves halves (the sink keeps whole chunks: a half saved and then the whole
//! would double objects). It leases *probes* instead: the chunk with every object but the half
//! under test skipped, transformed and delivered nowhere, the lease released as `probed`. A probe
//! that comes back clears its half; one that dies convicts it. Halving until one object is
//! left, and confirming that one `--max-attempts` times, takes about log2(chunk size) + N lease
//! periods. The object found is then skipped (dead-lettered by the mapper with the reason) in
//! every later lease of the chunk; if the chunk still kills, the search starts again among the
//! rest. A search that ends on an object that does not kill (the deaths were someone else's)
//! forgives the chunk; after three such searches the whole chunk is dead-lettered.
//!
//! Pure, like the ledger: the server feeds it what happened and does what it says. Its state is
//! not durable: a restarted fetcher starts the search over.

use std::collections::{BTreeMap, HashMap};

use common::protocol::{ChunkId, Skip};
use uuid::Uuid;

/// Searches that may end without finding an object before the chunk is given up on whole.
const MAX_FAILED_SEARCHES: u32 = 3;

/// A search for the object that kills: candidates `[lo, hi)`, a probe of the first half at a
/// time, or of the last one left (`confirming`).
#[derive(Debug, Clone)]
struct Search {
    candidates: Vec<u32>,
    lo: usize,
    hi: usize,
    confirming: bool,
    confirm_deaths: u32,
    probe: Option<Uuid>,
}

impl Search {
    fn new(candidates: Vec<u32>) -> Self {
        let hi = candidates.len();
        Search { confirming: hi == 1, candidates, lo: 0, hi, confirm_deaths: 0, probe: None }
    }

    /// The objects the next probe runs.
    fn under_test(&self) -> &[u32] {
        if self.confirming {
            &self.candidates[self.lo..self.lo + 1]
        } else {
            &self.candidates[self.lo..self.lo + (self.hi - self.lo) / 2]
        }
    }

    fn narrow(&mut self, first_half_kills: bool) {
        let mid = self.lo + (self.hi - self.lo) / 2;
        if first_half_kills {
            self.hi = mid;
        } else {
            self.lo = mid;
        }
        self.confirming = self.hi - self.lo == 1;
    }
}

#[derive(Debug, Default, Clone)]
struct Suspect {
    /// Objects found to kill, with the reason to dead-letter them with.
    killers: BTreeMap<u32, String>,
    search: Option<Search>,
    failed_searches: u32,
}

/// What the server is to do after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing to do.
    Nothing,
    /// A search began (or went on) among these many candidates.
    Searching(usize),
    /// The object at this index kills: it is skipped from now on; forget the chunk's deaths.
    Found(u32),
    /// The deaths were not the chunk's: forget them.
    Forgive,
    /// The chunk cannot be made to pass: dead-letter it whole, with this reason.
    GiveUp(String),
}

/// How to lease a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeasePlan {
    /// A probe (nothing is delivered).
    pub(crate) probe: bool,
    /// Objects the mapper must not run.
    pub(crate) skip: Vec<Skip>,
}

/// The chunks under suspicion.
#[derive(Debug)]
pub(crate) struct Suspects {
    chunks: HashMap<ChunkId, Suspect>,
    max_deaths: u32,
}

impl Suspects {
    /// Searches start after `max_deaths` expiries (`--max-attempts`), and confirm with as many.
    pub(crate) fn new(max_deaths: u32) -> Self {
        Suspects { chunks: HashMap::new(), max_deaths: max_deaths.max(1) }
    }

    /// Whether the chunk is being searched (leased only as a probe, alone).
    pub(crate) fn searching(&self, chunk: ChunkId) -> bool {
        self.chunks.get(&chunk).is_some_and(|s| s.search.is_some())
    }

    /// How to lease `chunk` of `objects` objects, as lease `lease`: a probe while searching,
    /// else a normal lease with the killers found so far skipped.
    pub(crate) fn plan(&mut self, chunk: ChunkId, objects: u32, lease: Uuid) -> LeasePlan {
        let Some(suspect) = self.chunks.get_mut(&chunk) else { return LeasePlan { probe: false, skip: vec![] } };
        let killers = |s: &Suspect| -> Vec<Skip> {
            s.killers.iter().map(|(&index, error)| Skip { index, error: error.clone() }).collect()
        };
        match &mut suspect.search {
            None => LeasePlan { probe: false, skip: killers(suspect) },
            Some(search) => {
                search.probe = Some(lease);
                let tested: std::collections::HashSet<u32> = search.under_test().iter().copied().collect();
                let skip = (0..objects)
                    .filter(|i| !tested.contains(i))
                    .map(|index| Skip { index, error: "not under test (a probe)".into() })
                    .collect();
                LeasePlan { probe: true, skip }
            }
        }
    }

    /// A lease of `chunk` expired; `deaths` is the chunk's count of expiries.
    pub(crate) fn expired(&mut self, chunk: ChunkId, lease: Uuid, deaths: u32, objects: u32) -> Verdict {
        let max = self.max_deaths;
        let suspect = self.chunks.entry(chunk).or_default();
        match &mut suspect.search {
            None if deaths >= max => {
                let candidates: Vec<u32> = (0..objects).filter(|i| !suspect.killers.contains_key(i)).collect();
                if candidates.is_empty() {
                    return Verdict::GiveUp(format!("its mappers died {deaths} times with every object skipped"));
                }
                let count = candidates.len();
                suspect.search = Some(Search::new(candidates));
                Verdict::Searching(count)
            }
            None => Verdict::Nothing,
            Some(search) if search.probe != Some(lease) => Verdict::Nothing,
            Some(search) if search.confirming => {
                search.confirm_deaths += 1;
                search.probe = None;
                if search.confirm_deaths < max {
                    return Verdict::Searching(1);
                }
                let index = search.candidates[search.lo];
                let reason = format!(
                    "its mapper died {} times while transforming it (found by splitting its chunk after {max} lease expiries)",
                    search.confirm_deaths
                );
                suspect.killers.insert(index, reason);
                suspect.search = None;
                Verdict::Found(index)
            }
            Some(search) => {
                search.probe = None;
                search.narrow(true);
                Verdict::Searching(search.hi - search.lo)
            }
        }
    }

    /// A probe of `chunk` came back: the objects it ran do not kill.
    pub(crate) fn probed(&mut self, chunk: ChunkId, lease: Uuid) -> Verdict {
        let Some(suspect) = self.chunks.get_mut(&chunk) else { return Verdict::Nothing };
        let Some(search) = suspect.search.as_mut().filter(|s| s.probe == Some(lease)) else { return Verdict::Nothing };
        search.probe = None;
        if !search.confirming {
            search.narrow(false);
            return Verdict::Searching(search.hi - search.lo);
        }
        // The last candidate does not kill: the deaths were someone else's (or need company).
        suspect.search = None;
        suspect.failed_searches += 1;
        if suspect.failed_searches >= MAX_FAILED_SEARCHES {
            return Verdict::GiveUp(format!(
                "its mappers kept dying, but {MAX_FAILED_SEARCHES} searches found no single object that kills them"
            ));
        }
        Verdict::Forgive
    }

    /// The chunk is done or dead: nothing to find any more.
    pub(crate) fn settled(&mut self, chunk: ChunkId) {
        self.chunks.remove(&chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays the fetcher and a fleet of mappers that die on `killer`: returns what was found and
    /// how many leases it took.
    fn find(objects: u32, killer: u32, max: u32) -> (Verdict, u32) {
        let mut s = Suspects::new(max);
        let mut deaths = 0;
        let mut leases = 0;
        loop {
            let lease = Uuid::new_v4();
            leases += 1;
            let plan = s.plan(ChunkId(0), objects, lease);
            let skipped: Vec<u32> = plan.skip.iter().map(|k| k.index).collect();
            let dies = !skipped.contains(&killer);
            let verdict = if dies {
                deaths += 1;
                s.expired(ChunkId(0), lease, deaths, objects)
            } else if plan.probe {
                s.probed(ChunkId(0), lease)
            } else {
                return (Verdict::Nothing, leases); // a normal lease that passes: the chunk is saved
            };
            match verdict {
                Verdict::Found(index) => {
                    assert_eq!(index, killer);
                    return (verdict, leases);
                }
                Verdict::GiveUp(_) => return (verdict, leases),
                Verdict::Forgive => deaths = 0,
                _ => {}
            }
            assert!(leases < 100, "no end");
        }
    }

    #[test]
    fn the_object_that_kills_is_found_alone_in_about_log2_n_plus_n_leases() {
        for killer in [0, 1, 37, 50, 99] {
            let (verdict, leases) = find(100, killer, 3);
            assert_eq!(verdict, Verdict::Found(killer));
            assert!(leases <= 3 + 7 + 3, "{leases} leases for killer {killer}");
        }
        assert_eq!(find(1, 0, 2).0, Verdict::Found(0));
    }

    #[test]
    fn once_found_the_killer_is_skipped_with_its_reason_and_the_rest_is_leased_normally() {
        let mut s = Suspects::new(1);
        let mut lease = Uuid::new_v4();
        assert_eq!(s.expired(ChunkId(0), lease, 1, 2), Verdict::Searching(2));
        lease = Uuid::new_v4();
        assert!(s.plan(ChunkId(0), 2, lease).probe);
        assert_eq!(s.expired(ChunkId(0), lease, 2, 2), Verdict::Searching(1), "the probe of object 0 died");
        lease = Uuid::new_v4();
        assert_eq!(s.plan(ChunkId(0), 2, lease).skip.iter().map(|k| k.index).collect::<Vec<_>>(), vec![1]);
        assert_eq!(s.expired(ChunkId(0), lease, 3, 2), Verdict::Found(0));
        let plan = s.plan(ChunkId(0), 2, Uuid::new_v4());
        assert!(!plan.probe);
        assert_eq!(plan.skip.len(), 1);
        assert!(plan.skip[0].error.contains("its mapper died 1 times"), "{:?}", plan.skip);
    }

    #[test]
    fn deaths_that_were_not_the_chunks_are_forgiven_and_after_three_searches_it_is_given_up() {
        let mut s = Suspects::new(1);
        for search in 1..=3 {
            let lease = Uuid::new_v4();
            assert_eq!(s.expired(ChunkId(0), lease, 1, 1), Verdict::Searching(1));
            let probe = Uuid::new_v4();
            assert!(s.plan(ChunkId(0), 1, probe).probe);
            let verdict = s.probed(ChunkId(0), probe);
            if search < 3 {
                assert_eq!(verdict, Verdict::Forgive);
            } else {
                assert!(matches!(verdict, Verdict::GiveUp(_)), "{verdict:?}");
            }
        }
    }

    #[test]
    fn events_of_other_leases_change_nothing() {
        let mut s = Suspects::new(2);
        assert_eq!(s.expired(ChunkId(0), Uuid::new_v4(), 1, 10), Verdict::Nothing, "one death is not enough");
        assert_eq!(s.probed(ChunkId(0), Uuid::new_v4()), Verdict::Nothing);
        assert_eq!(s.expired(ChunkId(0), Uuid::new_v4(), 2, 10), Verdict::Searching(10));
        assert_eq!(s.expired(ChunkId(0), Uuid::new_v4(), 3, 10), Verdict::Nothing, "not the probe's lease");
        s.settled(ChunkId(0));
        assert!(!s.searching(ChunkId(0)));
    }
}
