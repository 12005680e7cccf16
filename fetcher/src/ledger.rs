//! The ledger: the state of every chunk of a run. Pure and synchronous (time is passed in), so
//! its rules are unit-tested without NATS:
//!
//! - a chunk is `pending`, `leased` (to one mapper, with a lease id, a deadline and an attempt
//!   number), `done` or `dead` (dead-lettered after too many failures);
//! - only a pending chunk is leased; an expired or released lease makes it pending again;
//! - a lease is extended or released only by the mapper it was granted to (by name: one that
//!   saw another's lease id cannot keep it alive, hand it back as failed, or bar its holder);
//! - only a saver's acknowledgement makes a chunk done, whatever lease the saved result came
//!   with (results are deterministic, so a late result saves the same bytes); acknowledgements
//!   for unknown chunks or with the wrong object count change nothing.
//!
//! Memory per chunk: the span in the fetcher (32 bytes) plus 8 bytes here; leases in flight
//! cost about 100 bytes each.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use common::protocol::{AckVerdict, ChunkId};
use uuid::Uuid;

/// The state of one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ChunkState {
    /// Waiting for a mapper.
    Pending,
    /// Handed to a mapper.
    Leased,
    /// Durably saved.
    Done,
    /// Given up on after `max_attempts` failures.
    Dead,
    /// Being given up on: decided, but not yet recorded durably. Not handed out, not complete;
    /// [`Ledger::dead_letter`] finishes it once the record is written (a full disk must not
    /// turn a decision into a state that a restart forgets).
    Dying,
}

/// A current lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Lease id.
    pub id: Uuid,
    /// The mapper holding it.
    pub mapper: String,
    /// When it expires unless extended.
    pub deadline: Instant,
    /// 1 for the chunk's first lease.
    pub attempt: u32,
}

/// A lease just granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Chunk index.
    pub chunk: ChunkId,
    /// Lease id.
    pub lease: Uuid,
    /// Attempt number.
    pub attempt: u32,
}

/// What a release did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The chunk is pending again.
    Requeued,
    /// The chunk failed `max_attempts` times: it is [`ChunkState::Dying`] until its dead letter
    /// is recorded and [`Ledger::dead_letter`] is called.
    DeadLettered,
    /// The lease was not current: nothing changed.
    NotCurrent,
    /// The lease is current but another mapper holds it: nothing changed.
    NotHolder,
}

/// What an extension did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extension {
    /// The deadline moved.
    Extended,
    /// The lease was not current.
    NotCurrent,
    /// The lease is current but another mapper holds it: nothing changed.
    NotHolder,
}

/// Counters a person (and the metrics) care about.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LedgerStats {
    /// Leases granted, first and repeated.
    pub leases_granted: u64,
    /// Leases granted for a chunk that had been leased before.
    pub re_leases: u64,
    /// Leases that ran out.
    pub expiries: u64,
    /// Leases handed back by mappers that are shutting down.
    pub releases_shutdown: u64,
    /// Leases handed back because processing failed.
    pub releases_failed: u64,
    /// Acks that completed a chunk.
    pub acks_done: u64,
    /// Of those, acks that came with a lease that was no longer current.
    pub acks_late: u64,
    /// Acks for chunks already done.
    pub acks_duplicate: u64,
    /// Acks for unknown chunks or with a wrong object count.
    pub acks_unknown: u64,
    /// Objects the mappers could not transform (dead-lettered inside otherwise saved chunks).
    pub objects_dead: u64,
}

/// The ledger of one run.
#[derive(Debug)]
pub struct Ledger {
    state: Vec<ChunkState>,
    objects: Vec<u32>,
    attempts: Vec<u16>,
    failures: Vec<u8>,
    /// Leases of the chunk that expired (their mapper went silent, or died) since the count was
    /// last reset: how the fetcher finds chunks that kill their mappers.
    deaths: Vec<u8>,
    pending: VecDeque<ChunkId>,
    leases: HashMap<ChunkId, Lease>,
    done: u64,
    dead: u64,
    dying: u64,
    objects_done: u64,
    stats: LedgerStats,
}

impl Ledger {
    /// A ledger with every chunk pending; `objects[i]` is chunk i's object count.
    pub fn new(objects: Vec<u32>) -> Self {
        let n = objects.len();
        Ledger {
            state: vec![ChunkState::Pending; n],
            attempts: vec![0; n],
            failures: vec![0; n],
            deaths: vec![0; n],
            pending: (0..n as u32).map(ChunkId).collect(),
            objects,
            leases: HashMap::new(),
            done: 0,
            dead: 0,
            dying: 0,
            objects_done: 0,
            stats: LedgerStats::default(),
        }
    }

    /// Number of chunks.
    pub fn len(&self) -> usize {
        self.state.len()
    }

    /// True for a run without chunks.
    pub fn is_empty(&self) -> bool {
        self.state.is_empty()
    }

    /// A chunk's state.
    pub fn state(&self, chunk: ChunkId) -> Option<ChunkState> {
        self.state.get(chunk.index()).copied()
    }

    /// A chunk's current lease.
    pub fn lease_of(&self, chunk: ChunkId) -> Option<&Lease> {
        self.leases.get(&chunk)
    }

    /// Counters.
    pub fn stats(&self) -> &LedgerStats {
        &self.stats
    }

    /// Chunks done.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// Chunks dead-lettered.
    pub fn dead(&self) -> u64 {
        self.dead
    }

    /// Objects in done chunks.
    pub fn objects_done(&self) -> u64 {
        self.objects_done
    }

    /// Leases in flight.
    pub fn leased(&self) -> usize {
        self.leases.len()
    }

    /// Chunks decided dead whose record is not written yet.
    pub fn dying(&self) -> u64 {
        self.dying
    }

    /// Chunks waiting for a mapper.
    pub fn pending(&self) -> u64 {
        self.state.len() as u64 - self.done - self.dead - self.dying - self.leases.len() as u64
    }

    /// Every chunk is done or dead-lettered.
    pub fn is_complete(&self) -> bool {
        self.done + self.dead == self.state.len() as u64
    }

    /// Marks a chunk done without an ack (used when resuming from a durable record).
    pub fn mark_done(&mut self, chunk: ChunkId) {
        if let Some(state) = self.state.get_mut(chunk.index()) {
            if *state != ChunkState::Done {
                match *state {
                    ChunkState::Dead => self.dead -= 1,
                    ChunkState::Dying => self.dying -= 1,
                    _ => {}
                }
                *state = ChunkState::Done;
                self.leases.remove(&chunk);
                self.done += 1;
                self.objects_done += u64::from(self.objects[chunk.index()]);
            }
        }
    }

    /// The chunk [`Ledger::lease`] would hand out next, if any (without leasing it): the
    /// fetcher sizes a reply before it leases.
    pub fn next_pending(&mut self) -> Option<ChunkId> {
        while let Some(&chunk) = self.pending.front() {
            if self.state[chunk.index()] == ChunkState::Pending {
                return Some(chunk);
            }
            self.pending.pop_front(); // done by a late ack, or given up on, while queued
        }
        None
    }

    /// Leases the next pending chunk to `mapper` for `ttl`, if any.
    pub fn lease(&mut self, mapper: &str, now: Instant, ttl: Duration) -> Option<Grant> {
        self.lease_where(mapper, now, ttl, |_, _| true)
    }

    /// Leases the first pending chunk that `allowed(chunk, deaths)` accepts (the fetcher hands
    /// a chunk suspected of killing its mappers only to a mapper that holds nothing else).
    pub fn lease_where(
        &mut self,
        mapper: &str,
        now: Instant,
        ttl: Duration,
        allowed: impl Fn(ChunkId, u32) -> bool,
    ) -> Option<Grant> {
        // Drop what is no longer pending from the front (done by a late ack while queued).
        while let Some(&front) = self.pending.front() {
            if self.state[front.index()] == ChunkState::Pending {
                break;
            }
            self.pending.pop_front();
        }
        let position = self.pending.iter().position(|&c| {
            self.state[c.index()] == ChunkState::Pending && allowed(c, u32::from(self.deaths[c.index()]))
        })?;
        if let Some(chunk) = self.pending.remove(position) {
            let attempts = &mut self.attempts[chunk.index()];
            *attempts = attempts.saturating_add(1);
            let attempt = u32::from(*attempts);
            if attempt > 1 {
                self.stats.re_leases += 1;
            }
            self.stats.leases_granted += 1;
            let id = Uuid::new_v4();
            self.state[chunk.index()] = ChunkState::Leased;
            self.leases.insert(chunk, Lease { id, mapper: mapper.to_string(), deadline: now + ttl, attempt });
            return Some(Grant { chunk, lease: id, attempt });
        }
        None
    }

    /// Takes back a lease that was never sent (its reply would have been too big): as if it
    /// had not been granted, first in line again.
    pub fn unlease(&mut self, chunk: ChunkId, lease: Uuid) {
        if !matches!(self.leases.get(&chunk), Some(current) if current.id == lease) {
            return;
        }
        if let Some(taken) = self.leases.remove(&chunk) {
            self.attempts[chunk.index()] = self.attempts[chunk.index()].saturating_sub(1);
            self.stats.leases_granted = self.stats.leases_granted.saturating_sub(1);
            if taken.attempt > 1 {
                self.stats.re_leases = self.stats.re_leases.saturating_sub(1);
            }
            self.state[chunk.index()] = ChunkState::Pending;
            self.pending.push_front(chunk);
        }
    }

    /// Leases `mapper` holds now.
    pub fn leases_of(&self, mapper: &str) -> usize {
        self.leases.values().filter(|l| l.mapper == mapper).count()
    }

    /// Times the chunk's lease expired since [`Ledger::forgive`].
    pub fn deaths(&self, chunk: ChunkId) -> u32 {
        self.deaths.get(chunk.index()).map_or(0, |d| u32::from(*d))
    }

    /// Forgets the chunk's expiries (the object that killed its mappers was found, or none).
    pub fn forgive(&mut self, chunk: ChunkId) {
        if let Some(deaths) = self.deaths.get_mut(chunk.index()) {
            *deaths = 0;
        }
    }

    /// Pushes the deadline of `mapper`'s lease to `now + ttl`.
    pub fn extend(&mut self, chunk: ChunkId, lease: Uuid, mapper: &str, now: Instant, ttl: Duration) -> Extension {
        match self.leases.get_mut(&chunk) {
            Some(current) if current.id == lease && current.mapper == mapper => {
                current.deadline = now + ttl;
                Extension::Extended
            }
            Some(current) if current.id == lease => Extension::NotHolder,
            _ => Extension::NotCurrent,
        }
    }

    /// Takes `mapper`'s lease back. `failed` counts towards `max_attempts`; past it the chunk is
    /// dead.
    pub fn release(
        &mut self,
        chunk: ChunkId,
        lease: Uuid,
        mapper: &str,
        failed: bool,
        max_attempts: u32,
    ) -> ReleaseOutcome {
        match self.leases.get(&chunk) {
            Some(current) if current.id == lease && current.mapper == mapper => {}
            Some(current) if current.id == lease => return ReleaseOutcome::NotHolder,
            _ => return ReleaseOutcome::NotCurrent,
        }
        self.leases.remove(&chunk);
        if failed {
            self.stats.releases_failed += 1;
        } else {
            self.stats.releases_shutdown += 1;
        }
        if failed {
            let failures = &mut self.failures[chunk.index()];
            *failures = failures.saturating_add(1);
            if u32::from(*failures) >= max_attempts {
                self.state[chunk.index()] = ChunkState::Dying;
                self.dying += 1;
                return ReleaseOutcome::DeadLettered;
            }
        }
        self.state[chunk.index()] = ChunkState::Pending;
        self.pending.push_front(chunk);
        ReleaseOutcome::Requeued
    }

    /// Gives up on a chunk that can never be handed out (unreadable, over max_payload): it is
    /// [`ChunkState::Dying`] until its record is written and [`Ledger::dead_letter`] called.
    pub fn give_up(&mut self, chunk: ChunkId) {
        if let Some(state) = self.state.get_mut(chunk.index()) {
            if matches!(*state, ChunkState::Pending | ChunkState::Leased) {
                *state = ChunkState::Dying;
                self.leases.remove(&chunk);
                self.dying += 1;
            }
        }
    }

    /// Marks a chunk dead-lettered: once its record is durable (from [`ChunkState::Dying`]), or
    /// when resuming from the durable record.
    pub fn dead_letter(&mut self, chunk: ChunkId) {
        if let Some(state) = self.state.get_mut(chunk.index()) {
            match *state {
                ChunkState::Pending | ChunkState::Leased => {}
                ChunkState::Dying => self.dying -= 1,
                ChunkState::Done | ChunkState::Dead => return,
            }
            *state = ChunkState::Dead;
            self.leases.remove(&chunk);
            self.dead += 1;
        }
    }

    /// What [`Ledger::ack`] would answer, without changing anything: the fetcher records the
    /// chunks that would become done durably first, and only then applies the acks.
    pub fn check_ack(&self, chunk: ChunkId, objects: u64, dead: u64) -> AckVerdict {
        let Some(index) = Some(chunk).filter(|c| c.index() < self.state.len()) else {
            return AckVerdict::Unknown;
        };
        if u64::from(self.objects[index.index()]) != objects {
            return AckVerdict::Unknown;
        }
        match self.state[index.index()] {
            ChunkState::Done => AckVerdict::AlreadyDone,
            ChunkState::Dead if dead >= objects => AckVerdict::AlreadyDone,
            _ => AckVerdict::Done,
        }
    }

    /// Records a saver's acknowledgement that `chunk` is saved with `objects` objects, `dead` of
    /// them dead-lettered. The caller makes a `Done` durable before calling this (see
    /// [`Ledger::check_ack`]): nothing is done in memory that a restart would forget.
    pub fn ack(&mut self, chunk: ChunkId, lease: Uuid, objects: u64, dead: u64) -> AckVerdict {
        let Some(index) = Some(chunk).filter(|c| c.index() < self.state.len()) else {
            self.stats.acks_unknown += 1;
            return AckVerdict::Unknown;
        };
        if u64::from(self.objects[index.index()]) != objects {
            self.stats.acks_unknown += 1;
            return AckVerdict::Unknown;
        }
        match self.state[index.index()] {
            ChunkState::Done => {
                self.stats.acks_duplicate += 1;
                AckVerdict::AlreadyDone
            }
            // The sink's record of a dead-lettered chunk (every object dead): it stays dead.
            ChunkState::Dead if dead >= objects => AckVerdict::AlreadyDone,
            _ => {
                if !matches!(self.leases.get(&index), Some(current) if current.id == lease) {
                    self.stats.acks_late += 1;
                }
                self.mark_done(index);
                self.stats.acks_done += 1;
                self.stats.objects_dead += dead.min(objects);
                AckVerdict::Done
            }
        }
    }

    /// Counts an ack that names no chunk of this run (it came for another run): the ledger
    /// cannot look it up, but it counts among the unknown acks all the same.
    pub fn unknown_ack(&mut self) -> AckVerdict {
        self.stats.acks_unknown += 1;
        AckVerdict::Unknown
    }

    /// Returns leases past their deadline to pending (front of the queue, so they finish soon).
    pub fn expire(&mut self, now: Instant) -> Vec<(ChunkId, Lease)> {
        let expired: Vec<ChunkId> = self.leases.iter().filter(|(_, l)| l.deadline <= now).map(|(c, _)| *c).collect();
        let mut out = Vec::with_capacity(expired.len());
        for chunk in expired {
            if let Some(lease) = self.leases.remove(&chunk) {
                self.state[chunk.index()] = ChunkState::Pending;
                self.pending.push_front(chunk);
                self.stats.expiries += 1;
                let deaths = &mut self.deaths[chunk.index()];
                *deaths = deaths.saturating_add(1);
                out.push((chunk, lease));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(5);

    fn ledger(chunks: usize) -> Ledger {
        Ledger::new(vec![100; chunks])
    }

    #[test]
    fn leases_hand_out_each_pending_chunk_once() {
        let mut l = ledger(3);
        let now = Instant::now();
        let chunks: Vec<ChunkId> = (0..3).map(|_| l.lease("m", now, TTL).expect("pending").chunk).collect();
        assert_eq!(chunks, vec![ChunkId(0), ChunkId(1), ChunkId(2)]);
        assert_eq!(l.lease("m", now, TTL), None);
        assert_eq!(l.leased(), 3);
        assert_eq!(l.stats().re_leases, 0);
    }

    #[test]
    fn a_lease_never_sent_is_taken_back_as_if_never_granted() {
        let mut l = ledger(2);
        let now = Instant::now();
        let first = l.lease("m", now, TTL).expect("pending");
        l.unlease(first.chunk, first.lease);
        assert_eq!((l.leased(), l.pending(), l.stats().leases_granted), (0, 2, 0));
        let again = l.lease("m", now, TTL).expect("pending");
        assert_eq!((again.chunk, again.attempt), (first.chunk, 1));
        // Another lease's id takes nothing back.
        l.unlease(again.chunk, first.lease);
        assert_eq!(l.leased(), 1);
    }

    #[test]
    fn an_expired_lease_is_handed_out_again_with_the_next_attempt() {
        let mut l = ledger(2);
        let now = Instant::now();
        let first = l.lease("a", now, TTL).expect("pending");
        assert!(l.expire(now + TTL - Duration::from_millis(1)).is_empty());
        let expired = l.expire(now + TTL);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].0, first.chunk);
        let again = l.lease("b", now + TTL, TTL).expect("re-leased first");
        assert_eq!(again.chunk, first.chunk);
        assert_eq!(again.attempt, 2);
        assert_ne!(again.lease, first.lease);
        assert_eq!(l.stats().re_leases, 1);
        assert_eq!(l.stats().expiries, 1);
    }

    #[test]
    fn extending_keeps_a_slow_mapper_s_lease() {
        let mut l = ledger(1);
        let now = Instant::now();
        let g = l.lease("slow", now, TTL).expect("pending");
        assert_eq!(l.extend(g.chunk, g.lease, "slow", now + Duration::from_secs(4), TTL), Extension::Extended);
        assert!(l.expire(now + Duration::from_secs(8)).is_empty());
        let forged = l.extend(g.chunk, Uuid::new_v4(), "slow", now, TTL);
        assert_eq!(forged, Extension::NotCurrent, "a forged lease id extends nothing");
    }

    #[test]
    fn only_the_holder_extends_or_releases_a_lease() {
        let mut l = ledger(1);
        let now = Instant::now();
        let g = l.lease("holder", now, TTL).expect("pending");
        // Another mapper that saw the lease id keeps nothing alive and hands nothing back.
        assert_eq!(l.extend(g.chunk, g.lease, "other", now + TTL, TTL), Extension::NotHolder);
        for _ in 0..3 {
            assert_eq!(l.release(g.chunk, g.lease, "other", true, 3), ReleaseOutcome::NotHolder);
        }
        assert_eq!(l.expire(now + TTL).len(), 1, "its extension did not move the deadline");
        let g = l.lease("holder", now + TTL, TTL).expect("pending again");
        assert_eq!(l.release(g.chunk, g.lease, "other", false, 3), ReleaseOutcome::NotHolder);
        assert_eq!(l.state(g.chunk), Some(ChunkState::Leased), "its failed releases counted nothing");
        assert_eq!(l.release(g.chunk, g.lease, "holder", true, 3), ReleaseOutcome::Requeued, "1 failure of 3");
        assert_eq!(l.stats().releases_failed, 1);
    }

    #[test]
    fn only_an_ack_makes_a_chunk_done() {
        let mut l = ledger(2);
        let now = Instant::now();
        let g = l.lease("m", now, TTL).expect("pending");
        assert_eq!(l.state(g.chunk), Some(ChunkState::Leased));
        assert_eq!(l.ack(g.chunk, g.lease, 100, 0), AckVerdict::Done);
        assert_eq!(l.state(g.chunk), Some(ChunkState::Done));
        assert_eq!(l.objects_done(), 100);
        assert!(!l.is_complete());
        assert_eq!(l.extend(g.chunk, g.lease, "m", now, TTL), Extension::NotCurrent, "a done chunk's lease is gone");
    }

    #[test]
    fn late_duplicate_and_unknown_acks_are_harmless_and_counted() {
        let mut l = ledger(2);
        let now = Instant::now();
        let first = l.lease("a", now, TTL).expect("pending");
        l.expire(now + TTL);
        let second = l.lease("b", now + TTL, TTL).expect("re-leased");
        // The first mapper's result was saved after all: a late ack still completes the chunk.
        assert_eq!(l.ack(first.chunk, first.lease, 100, 0), AckVerdict::Done);
        assert_eq!(l.stats().acks_late, 1);
        // The second mapper's result then is a duplicate.
        assert_eq!(l.ack(second.chunk, second.lease, 100, 0), AckVerdict::AlreadyDone);
        assert_eq!(l.ack(ChunkId(99), Uuid::nil(), 100, 0), AckVerdict::Unknown);
        assert_eq!(l.ack(ChunkId(1), Uuid::nil(), 7, 0), AckVerdict::Unknown, "wrong object count");
        assert_eq!(l.stats().acks_duplicate, 1);
        assert_eq!(l.stats().acks_unknown, 2);
        assert_eq!(l.done(), 1);
    }

    #[test]
    fn a_shutdown_release_requeues_at_once_and_failures_dead_letter() {
        let mut l = ledger(1);
        let now = Instant::now();
        let g = l.lease("m", now, TTL).expect("pending");
        assert_eq!(l.release(g.chunk, g.lease, "m", false, 3), ReleaseOutcome::Requeued);
        assert_eq!(l.release(g.chunk, g.lease, "m", false, 3), ReleaseOutcome::NotCurrent);
        for attempt in 1..=3 {
            let g = l.lease("m", now, TTL).expect("pending again");
            let outcome = l.release(g.chunk, g.lease, "m", true, 3);
            let expected = if attempt < 3 { ReleaseOutcome::Requeued } else { ReleaseOutcome::DeadLettered };
            assert_eq!(outcome, expected);
        }
        assert_eq!(l.state(ChunkId(0)), Some(ChunkState::Dying), "decided, not yet recorded");
        assert!(!l.is_complete(), "a run is not complete on a decision a restart would forget");
        assert_eq!(l.lease("m", now, TTL), None, "nor is the chunk handed out again");
        l.dead_letter(ChunkId(0));
        assert_eq!(l.state(ChunkId(0)), Some(ChunkState::Dead));
        assert!(l.is_complete());
        assert_eq!(l.lease("m", now, TTL), None);
    }

    #[test]
    fn checking_an_ack_changes_nothing_until_it_is_applied() {
        let mut l = ledger(2);
        let now = Instant::now();
        let g = l.lease("m", now, TTL).expect("pending");
        assert_eq!(l.check_ack(g.chunk, 100, 0), AckVerdict::Done);
        assert_eq!(l.check_ack(g.chunk, 7, 0), AckVerdict::Unknown);
        assert_eq!(l.check_ack(ChunkId(99), 100, 0), AckVerdict::Unknown);
        assert_eq!(l.state(g.chunk), Some(ChunkState::Leased), "a check is not an ack");
        assert_eq!((l.done(), l.stats().acks_done), (0, 0));
        assert_eq!(l.ack(g.chunk, g.lease, 100, 0), AckVerdict::Done);
        assert_eq!(l.check_ack(g.chunk, 100, 0), AckVerdict::AlreadyDone);
    }

    #[test]
    fn the_sinks_record_of_a_dead_chunk_leaves_it_dead_and_saved_data_makes_it_done() {
        let mut l = ledger(2);
        l.give_up(ChunkId(0));
        l.dead_letter(ChunkId(0));
        l.give_up(ChunkId(1));
        l.dead_letter(ChunkId(1));
        assert_eq!(l.check_ack(ChunkId(0), 100, 100), AckVerdict::AlreadyDone);
        assert_eq!(l.ack(ChunkId(0), Uuid::nil(), 100, 100), AckVerdict::AlreadyDone);
        assert_eq!(l.state(ChunkId(0)), Some(ChunkState::Dead));
        assert_eq!(l.ack(ChunkId(1), Uuid::nil(), 100, 3), AckVerdict::Done, "a late result was saved after all");
        assert_eq!((l.done(), l.dead()), (1, 1));
    }

    #[test]
    fn a_chunk_given_up_on_is_dying_until_recorded() {
        let mut l = ledger(2);
        let now = Instant::now();
        let g = l.lease("m", now, TTL).expect("pending");
        l.give_up(g.chunk);
        assert_eq!((l.state(g.chunk), l.leased(), l.pending(), l.dying()), (Some(ChunkState::Dying), 0, 1, 1));
        l.dead_letter(g.chunk);
        assert_eq!((l.dead(), l.dying()), (1, 0));
    }

    #[test]
    fn expiries_are_counted_per_chunk_and_a_chunk_can_be_leased_selectively() {
        let mut l = ledger(3);
        let now = Instant::now();
        let g = l.lease("a", now, TTL).expect("pending");
        l.lease("a", now, TTL).expect("pending");
        assert_eq!(l.leases_of("a"), 2);
        l.expire(now + TTL);
        assert_eq!((l.deaths(g.chunk), l.deaths(ChunkId(1)), l.deaths(ChunkId(2))), (1, 1, 0));
        // Skip the suspects: chunk 2 is leased although 0 and 1 are ahead of it.
        let next = l.lease_where("b", now + TTL, TTL, |_, deaths| deaths == 0).expect("an innocent chunk");
        assert_eq!(next.chunk, ChunkId(2));
        l.forgive(g.chunk);
        assert_eq!(l.deaths(g.chunk), 0);
        let again = l.lease("b", now + TTL, TTL).expect("an expired chunk, from the front").chunk;
        assert!(again < ChunkId(2), "{again}");
    }

    #[test]
    fn a_chunk_done_while_queued_is_not_leased_again() {
        let mut l = ledger(2);
        let now = Instant::now();
        let g = l.lease("a", now, TTL).expect("pending");
        l.expire(now + TTL);
        assert_eq!(l.ack(g.chunk, g.lease, 100, 0), AckVerdict::Done);
        let next = l.lease("b", now + TTL, TTL).expect("the other chunk");
        assert_ne!(next.chunk, g.chunk);
        assert_eq!(l.lease("b", now + TTL, TTL), None);
    }
}
