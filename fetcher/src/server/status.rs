//! The status exchange (`P.status`, docs/PROTOCOL.md §2 and §12): what `fetcher status` and the
//! status page are answered, and the run's summary when the fetcher stops.

use std::time::{Duration, Instant};

use crate::RunSummary;

use super::Server;

impl Server {
    /// Answers `fetcher status`.
    pub(super) async fn on_status(&mut self, request: async_nats::service::Request) {
        let body = common::json::to_vec_own(&self.status());
        if let Err(e) = request.respond(Ok(body.into())).await {
            tracing::debug!("cannot answer a status request: {e}");
        }
    }

    pub(super) fn status(&self) -> crate::status::Status {
        let now = Instant::now();
        let elapsed = self.progress.elapsed();
        let mut mappers: Vec<crate::status::MapperStatus> = self
            .fleet
            .iter()
            .map(|(name, seen)| crate::status::MapperStatus {
                name: name.clone(),
                held: self.ledger.leases_of(name) as u64,
                done: seen.done,
                chunks_per_second: seen.done as f64 / now.duration_since(seen.first).as_secs_f64().max(1e-3),
                last_seen_seconds: now.duration_since(seen.last).as_secs_f64(),
                able: seen.able,
            })
            .collect();
        mappers.sort_by(|a, b| a.name.cmp(&b.name));
        let chunks_complete = self.is_complete();
        let complete = chunks_complete && self.commit.settled();
        crate::status::Status {
            run: self.index.run_id.clone(),
            input: self.index.input.clone(),
            transform: self.job.describe(),
            chunks: self.ledger.len() as u64,
            done: self.ledger.done(),
            pending: self.ledger.pending(),
            leased: self.ledger.leased() as u64,
            dead: self.ledger.dead(),
            objects: self.index.objects,
            objects_done: self.ledger.objects_done(),
            objects_per_second: self.progress.rate(now).unwrap_or(0.0),
            eta_seconds: if complete { None } else { self.progress.eta(&self.ledger, now) },
            elapsed_seconds: elapsed.as_secs_f64(),
            complete,
            committing: self.commit.committing(chunks_complete),
            mappers,
            dead_letters: self.dead.recent(),
        }
    }

    pub(super) fn summary(&self) -> RunSummary {
        RunSummary {
            run_id: self.index.run_id.clone(),
            chunks: self.ledger.len() as u64,
            objects: self.index.objects,
            done: self.ledger.done(),
            dead: self.ledger.dead(),
            bad_records: self.index.bad.len() as u64,
            stats: self.ledger.stats().clone(),
            elapsed: self.progress.elapsed(),
            scan: Duration::ZERO,
            input_bytes: self.index.parts.iter().map(|p| p.len).sum(),
            complete: self.is_complete() && self.commit.settled(),
        }
    }
}
