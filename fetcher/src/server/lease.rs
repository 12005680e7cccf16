//! The lease exchanges (docs/PROTOCOL.md §3.4–3.7, §5): a mapper's heartbeat extends the
//! leases it holds, a release hands one back (shutdown, failure, a probe, cannot run); only
//! the holder may do either. Also what the search for an object that kills its mappers
//! ([`crate::poison`]) says to do after an expiry or a probe.

use std::time::Instant;

use async_nats::Message;
use common::protocol::{
    self, ChunkId, ExtendReply, ExtendRequest, ReleaseReason, ReleaseReply, ReleaseRequest, VERSION,
};
use common::text::escaped;

use crate::ledger::{Extension, ReleaseOutcome};
use crate::poison::Verdict;

use super::Server;

impl Server {
    pub(super) async fn on_extend(&mut self, message: Message) {
        let request: ExtendRequest = match protocol::decode_bounded(&message.payload) {
            Ok(r) => r,
            Err(e) => return self.malformed(&message, &e),
        };
        let now = Instant::now();
        let ttl = self.config.lease_timeout;
        let mut valid = Vec::with_capacity(request.leases.len());
        for lease in &request.leases {
            let extension = self.ledger.extend(lease.chunk, lease.lease, &request.mapper, now, ttl);
            if extension == Extension::NotHolder {
                self.refuse_non_holder("extend", &request.mapper, lease.chunk);
            }
            valid.push(extension == Extension::Extended);
        }
        if let Some(reply) = &message.reply {
            let body = protocol::encode(&ExtendReply { v: VERSION, lease_ms: ttl.as_millis() as u64, valid });
            self.reply(reply, body).await;
        }
    }

    pub(super) async fn on_release(&mut self, message: Message) {
        let request: ReleaseRequest = match protocol::decode_bounded(&message.payload) {
            Ok(r) => r,
            Err(e) => return self.malformed(&message, &e),
        };
        let failed = request.reason == ReleaseReason::Failed;
        let (chunk, lease) = (request.lease.chunk, request.lease.lease);
        let outcome = self.ledger.release(chunk, lease, &request.mapper, failed, self.config.max_attempts);
        let error = request.error.as_deref().unwrap_or("no reason given");
        let mapper = escaped(&request.mapper);
        match (outcome, request.reason) {
            (ReleaseOutcome::Requeued, ReleaseReason::Failed) => {
                tracing::warn!(
                    chunk = chunk.0,
                    "chunk {chunk} failed on {mapper}: {}; it will be retried",
                    escaped(error)
                )
            }
            (ReleaseOutcome::Requeued, ReleaseReason::CannotRun) => {
                if self.fleet.said_cannot_run(&request.mapper) {
                    tracing::error!(
                        "mapper {mapper} cannot run this run's job ({}): {}; it gets no chunks of this run",
                        self.job.transform.describe(),
                        escaped(error)
                    );
                }
            }
            (ReleaseOutcome::Requeued, ReleaseReason::Probed) => {
                let verdict = self.suspects.probed(chunk, request.lease.lease);
                self.act_on(chunk, verdict).await;
            }
            (ReleaseOutcome::Requeued, _) => {
                tracing::info!(chunk = chunk.0, "chunk {chunk} handed back by {mapper} (shutting down)")
            }
            (ReleaseOutcome::DeadLettered, _) => {
                tracing::error!(
                    chunk = chunk.0,
                    "chunk {chunk} failed {} times, last on {mapper}: {}; dead-lettered",
                    self.config.max_attempts,
                    escaped(error)
                );
                self.record_dead(chunk, error).await;
            }
            (ReleaseOutcome::NotCurrent, _) => {
                tracing::debug!(chunk = chunk.0, "release of a lease that is no longer current")
            }
            (ReleaseOutcome::NotHolder, _) => self.refuse_non_holder("release", &request.mapper, chunk),
        }
        if let Some(reply) = &message.reply {
            let accepted = matches!(outcome, ReleaseOutcome::Requeued | ReleaseOutcome::DeadLettered);
            self.reply(reply, protocol::encode(&ReleaseReply { v: VERSION, accepted })).await;
        }
        self.serve_waiters().await;
    }

    /// Counts and logs (rate-limited) an extend or release of a current lease by a mapper that
    /// does not hold it: refused, as if the lease were not current.
    fn refuse_non_holder(&mut self, what: &str, mapper: &str, chunk: ChunkId) {
        self.metrics.refused("not_lease_holder");
        let holder = self.ledger.lease_of(chunk).map(|lease| lease.mapper.clone()).unwrap_or_default();
        self.warn_peer("not_lease_holder", || {
            format!(
                "refused a {what} of chunk {chunk}'s lease from {}: the lease is held by {}; only its holder may {what} it",
                escaped(mapper),
                escaped(&holder)
            )
        });
    }

    /// Does what the search for an object that kills its mappers says.
    pub(super) async fn act_on(&mut self, chunk: ChunkId, verdict: Verdict) {
        match verdict {
            Verdict::Nothing => {}
            Verdict::Searching(candidates) => tracing::warn!(
                chunk = chunk.0,
                "chunk {chunk} keeps killing its mappers ({} leases expired): probing its objects to find the one that does, {candidates} candidates left",
                self.ledger.deaths(chunk)
            ),
            Verdict::Found(index) => {
                let line = self.index.chunks[chunk.index()].first_line + u64::from(index);
                tracing::error!(
                    chunk = chunk.0,
                    "object {index} of chunk {chunk} (around input line {line}) kills every mapper that transforms it: it is dead-lettered, the rest of the chunk is leased again"
                );
                self.ledger.forgive(chunk);
            }
            Verdict::Forgive => {
                tracing::info!(chunk = chunk.0, "no object of chunk {chunk} kills on its own: its lease expiries are forgiven");
                self.ledger.forgive(chunk);
            }
            Verdict::GiveUp(reason) => {
                tracing::error!(chunk = chunk.0, "chunk {chunk}: {reason}; dead-lettered");
                self.suspects.settled(chunk);
                self.dead_letter(chunk, &reason).await;
            }
        }
    }
}
