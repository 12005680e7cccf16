//! The lease seen from the mapper (docs/PROTOCOL.md §3.4–3.5, §5): the leases it holds, the
//! heartbeat that extends them three times per lease period, whether one is still ours, and
//! handing one back (release).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::protocol::{self, ExtendReply, ExtendRequest, LeaseRef, ReleaseReason, ReleaseRequest, VERSION};
use common::sync::lock;
use common::text::escaped;

use crate::Shared;

/// A lease this mapper holds.
pub(crate) struct Held {
    /// False once the fetcher said the lease is gone.
    alive: bool,
    /// When the fetcher last confirmed it (leased or extended): a lease not confirmed for one
    /// and a half lease periods is surely expired there, and its result not worth resending.
    confirmed: Instant,
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
    let period = |shared: &Shared| {
        Duration::from_millis(shared.lease_ms.load(Ordering::Relaxed) / 3).max(Duration::from_millis(30))
    };
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
        let leases: Vec<LeaseRef> = lock(&shared.held, "held leases")
            .iter()
            .filter(|(_, h)| h.alive)
            .map(|(l, _)| *l)
            .take(protocol::MAX_ITEMS)
            .collect();
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
                    {
                        let mut held = lock(&shared.held, "held leases");
                        for (lease, valid) in leases.iter().zip(reply.valid) {
                            if let Some(h) = held.get_mut(lease) {
                                if valid {
                                    h.confirmed = sent;
                                } else {
                                    h.alive = false;
                                }
                            }
                        }
                    }
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
        lock(&self.held, "held leases").insert(lease, Held { alive: true, confirmed: Instant::now() });
        self.metrics.in_flight.inc();
        self.new_lease.notify_one();
    }

    pub(crate) fn drop_lease(&self, lease: &LeaseRef) {
        let removed = lock(&self.held, "held leases").remove(lease).is_some();
        if removed {
            self.metrics.in_flight.dec();
        }
    }

    /// Whether the lease is still ours as far as we know: not refused by the fetcher, and
    /// confirmed within the last lease period.
    pub(crate) fn still_ours(&self, lease: &LeaseRef) -> bool {
        let period = Duration::from_millis(self.lease_ms.load(Ordering::Relaxed));
        lock(&self.held, "held leases")
            .get(lease)
            .is_some_and(|h| h.alive && h.confirmed.elapsed() < period + period / 2)
    }
}
