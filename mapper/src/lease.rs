//! The lease seen from the mapper (docs/PROTOCOL.md §3.4–3.5, §5): the leases it holds, the
//! heartbeat that extends them three times per lease period, whether one is still ours, and
//! handing one back (release).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::protocol::{self, ExtendReply, ExtendRequest, LeaseRef, ReleaseReason, ReleaseRequest, VERSION};
use common::sync::lock;
use common::text::escaped;

use crate::Shared;

/// A lease this mapper holds.
#[derive(Debug)]
struct Held {
    /// False once the fetcher said the lease is gone.
    alive: bool,
    /// When the fetcher last confirmed it (leased or extended): a lease not confirmed for one
    /// and a half lease periods is surely expired there, and its result not worth resending.
    confirmed: Instant,
}

/// The leases this mapper holds, and what the fetcher last said of each. Pure: time is passed in.
#[derive(Debug, Default)]
pub(crate) struct HeldLeases {
    leases: HashMap<LeaseRef, Held>,
}

impl HeldLeases {
    /// A lease granted at `now` (the fetcher's grant confirms it).
    pub(crate) fn hold(&mut self, lease: LeaseRef, now: Instant) {
        self.leases.insert(lease, Held { alive: true, confirmed: now });
    }

    /// Forgets a lease (its chunk is saved, lost or handed back); true if it was held.
    pub(crate) fn forget(&mut self, lease: &LeaseRef) -> bool {
        self.leases.remove(lease).is_some()
    }

    /// Whether `lease` is still ours at `now` as far as we know: held, not refused by the
    /// fetcher, and confirmed within one and a half lease `period`s.
    pub(crate) fn still_ours(&self, lease: &LeaseRef, period: Duration, now: Instant) -> bool {
        self.leases.get(lease).is_some_and(|h| h.alive && now.duration_since(h.confirmed) < period + period / 2)
    }

    /// The leases to extend: every one the fetcher has not refused, at most `max` (one request).
    pub(crate) fn to_extend(&self, max: usize) -> Vec<LeaseRef> {
        self.leases.iter().filter(|(_, h)| h.alive).map(|(l, _)| *l).take(max).collect()
    }

    /// The fetcher's answer to an extend of `leases` sent at `sent`: each valid one is confirmed
    /// as of then, each invalid one is no longer ours. Leases dropped meanwhile stay dropped.
    pub(crate) fn extended(&mut self, leases: &[LeaseRef], valid: &[bool], sent: Instant) {
        for (lease, valid) in leases.iter().zip(valid) {
            if let Some(h) = self.leases.get_mut(lease) {
                if *valid {
                    h.confirmed = sent;
                } else {
                    h.alive = false;
                }
            }
        }
    }
}

/// How often the heartbeat beats for a lease of `lease_ms`: three times per lease period, and
/// not more often than every 30 ms.
fn beat_period(lease_ms: u64) -> Duration {
    Duration::from_millis(lease_ms / 3).max(Duration::from_millis(30))
}

pub(crate) async fn release(shared: &Arc<Shared>, lease: LeaseRef, reason: ReleaseReason, error: String) {
    let body = protocol::encode(&ReleaseRequest {
        v: VERSION,
        mapper: shared.name.clone(),
        lease,
        reason,
        error: Some(protocol::truncate_to(error, protocol::MAX_REASON)),
    });
    let request = async_nats::Request::new().payload(body).timeout(Some(Duration::from_secs(2)));
    if let Err(e) = shared.client.send_request(shared.subjects.release.clone(), request).await {
        tracing::warn!(
            chunk = lease.chunk.0,
            "could not hand chunk {} back ({e}); its lease will expire instead",
            lease.chunk
        );
    }
}

/// Extends every held lease at least every third of the lease period. A new lease can make the
/// next beat come sooner (its period may be shorter), never later: leases arriving all the time
/// must not starve the ones already held.
pub(crate) async fn heartbeat(shared: Arc<Shared>) {
    let period = |shared: &Shared| beat_period(shared.lease_ms.load(Ordering::Relaxed));
    let mut next = tokio::time::Instant::now() + period(&shared);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = shared.new_lease.notified() => {
                next = next.min(tokio::time::Instant::now() + period(&shared));
                continue;
            }
        }
        let beat = period(&shared);
        next = tokio::time::Instant::now() + beat;
        let leases = lock(&shared.held, "held leases").to_extend(protocol::MAX_ITEMS);
        // Nothing held: nothing to say.
        if leases.is_empty() {
            continue;
        }
        let sent = Instant::now();
        let body = protocol::encode(&ExtendRequest { v: VERSION, mapper: shared.name.clone(), leases: leases.clone() });
        let request = async_nats::Request::new().payload(body).timeout(Some(beat.max(Duration::from_millis(500))));
        match shared.client.send_request(shared.subjects.extend.clone(), request).await {
            Ok(message) => match protocol::decode::<ExtendReply>(&message.payload) {
                Ok(reply) => {
                    shared.lease_ms.store(reply.lease_ms.max(100), Ordering::Relaxed);
                    lock(&shared.held, "held leases").extended(&leases, &reply.valid, sent);
                }
                Err(e) => tracing::warn!("ignoring an extend reply: {}", escaped(&e.to_string())),
            },
            Err(e) => tracing::debug!("extending leases failed ({e}); retrying next beat"),
        }
    }
}

pub(crate) fn lost(shared: &Arc<Shared>, lease: LeaseRef) {
    shared.drop_lease(&lease);
    shared.given_back.fetch_add(1, Ordering::Relaxed);
    tracing::info!(chunk = lease.chunk.0, "lease of chunk {} is no longer ours; dropping its result", lease.chunk);
}

pub(crate) async fn give_back(shared: &Arc<Shared>, lease: LeaseRef, reason: ReleaseReason, error: String) {
    shared.drop_lease(&lease);
    shared.given_back.fetch_add(1, Ordering::Relaxed);
    release(shared, lease, reason, error).await;
}

impl Shared {
    pub(crate) fn hold(&self, lease: LeaseRef) {
        lock(&self.held, "held leases").hold(lease, Instant::now());
        self.metrics.in_flight.inc();
        self.new_lease.notify_one();
    }

    pub(crate) fn drop_lease(&self, lease: &LeaseRef) {
        let removed = lock(&self.held, "held leases").forget(lease);
        if removed {
            self.metrics.in_flight.dec();
        }
    }

    /// Whether the lease is still ours as far as we know: not refused by the fetcher, and
    /// confirmed within the last lease period.
    pub(crate) fn still_ours(&self, lease: &LeaseRef) -> bool {
        let period = Duration::from_millis(self.lease_ms.load(Ordering::Relaxed));
        lock(&self.held, "held leases").still_ours(lease, period, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use common::protocol::ChunkId;

    use super::*;

    const PERIOD: Duration = Duration::from_millis(300);

    fn lease(chunk: u32) -> LeaseRef {
        LeaseRef { chunk: ChunkId(chunk), lease: uuid::Uuid::from_u128(u128::from(chunk) + 1) }
    }

    #[test]
    fn a_lease_is_ours_until_one_and_a_half_periods_pass_without_a_confirmation() {
        let t0 = Instant::now();
        let mut held = HeldLeases::default();
        held.hold(lease(1), t0);
        assert!(held.still_ours(&lease(1), PERIOD, t0 + PERIOD));
        assert!(!held.still_ours(&lease(1), PERIOD, t0 + PERIOD + PERIOD / 2));
        held.extended(&[lease(1)], &[true], t0 + PERIOD);
        assert!(held.still_ours(&lease(1), PERIOD, t0 + 2 * PERIOD), "the extend confirmed it again");
        assert!(!held.still_ours(&lease(2), PERIOD, t0), "never held");
    }

    #[test]
    fn a_lease_the_fetcher_refused_is_no_longer_ours_nor_extended() {
        let t0 = Instant::now();
        let mut held = HeldLeases::default();
        held.hold(lease(1), t0);
        held.hold(lease(2), t0);
        held.extended(&[lease(1), lease(2)], &[false, true], t0);
        assert!(!held.still_ours(&lease(1), PERIOD, t0));
        assert!(held.still_ours(&lease(2), PERIOD, t0));
        assert_eq!(held.to_extend(10), [lease(2)]);
        held.extended(&[lease(1)], &[true], t0);
        assert!(!held.still_ours(&lease(1), PERIOD, t0), "a refused lease never comes back");
    }

    #[test]
    fn a_dropped_lease_stays_dropped_whatever_a_late_extend_reply_says() {
        let t0 = Instant::now();
        let mut held = HeldLeases::default();
        held.hold(lease(1), t0);
        assert!(held.forget(&lease(1)));
        assert!(!held.forget(&lease(1)), "dropped once");
        held.extended(&[lease(1)], &[true], t0);
        assert!(!held.still_ours(&lease(1), PERIOD, t0));
        assert!(held.to_extend(10).is_empty());
    }

    #[test]
    fn one_extend_carries_at_most_max_leases() {
        let t0 = Instant::now();
        let mut held = HeldLeases::default();
        for chunk in 0..5 {
            held.hold(lease(chunk), t0);
        }
        assert_eq!(held.to_extend(3).len(), 3);
        assert_eq!(held.to_extend(10).len(), 5);
    }

    #[test]
    fn the_heartbeat_beats_three_times_per_lease_period_and_at_most_every_30_ms() {
        assert_eq!(beat_period(300), Duration::from_millis(100));
        assert_eq!(beat_period(60), Duration::from_millis(30));
        assert_eq!(beat_period(5000), Duration::from_millis(1666));
    }
}
