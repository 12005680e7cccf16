//! The work and job exchanges (docs/PROTOCOL.md §3.1–3.3, §4): a mapper's request for work is
//! answered at once with as many chunks as it asked for and one reply can carry, or held until
//! a chunk is pending or its wait is over; a mapper that cannot run the job is told why.
//! Requests of mappers that went silent are dropped, never served.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use async_nats::Message;
use common::input::{InputError, ReadErrorKind};
use common::protocol::{
    self, ChunkHead, ChunksHead, JobReply, JobRequest, ProtocolError, WorkReplyKind, WorkRequest, VERSION,
};
use common::text::escaped;

use super::waiters::Waiter;
use super::{Server, CANNOT_RETRY_MS, MAX_HELD, MAX_WAIT};

/// What [`Server::lease_one`] came to.
enum Leased {
    /// A chunk leased and read; `last` when nothing may follow it in the reply (a suspect).
    Chunk { head: ChunkHead, objects: Vec<u8>, last: bool },
    /// The chunk granted could not be handed out (changed input, dead-lettered): try the next.
    Skipped,
    /// Nothing more for this reply.
    Stop,
}

impl Server {
    /// Remembers that `mapper` asked, and whether it can run the job; returns that.
    fn saw_mapper(&mut self, mapper: &str, can: &[String]) -> bool {
        let offers = can.iter().any(|c| *c == self.job.transform.capability());
        self.fleet.saw(mapper, offers, Instant::now())
    }

    /// The progress line's note when mappers ask but none can run the job: never a silent hang.
    pub(super) fn nobody_can(&self, now: Instant) -> Option<String> {
        self.fleet.nobody_can(now).map(|unable| {
            format!(
                "{unable} mapper{} asking, none offers {}",
                if unable == 1 { "" } else { "s" },
                self.job.transform.describe()
            )
        })
    }

    /// A work request that came at `received` (earlier than now if it was held during the scan):
    /// its wait runs from then.
    pub(super) async fn on_work(&mut self, message: Message, received: Instant) {
        let request: WorkRequest = match protocol::decode_bounded(&message.payload) {
            Ok(r) => r,
            Err(ProtocolError::Version(1)) => {
                // An old mapper: it gets a refusal it understands, never a chunk it would map
                // under rules this run does not follow.
                self.metrics.refused("protocol_v1");
                self.warn_peer("protocol_v1", || {
                    format!(
                        "a mapper speaking protocol version 1 asked for work on {}; it is told to wait: upgrade it",
                        message.subject
                    )
                });
                if let Some(reply) = &message.reply {
                    self.reply(reply, protocol::encode_v1_refusal()).await;
                }
                return;
            }
            Err(e) => return self.malformed(&message, &e),
        };
        let Some(reply) = message.reply.clone() else {
            return self.malformed(&message, &"work request without a reply subject");
        };
        self.progress.asked(Instant::now());
        if self.is_complete() {
            return self.reply(&reply, protocol::encode_status_reply(WorkReplyKind::Done, 1000, None)).await;
        }
        if !self.saw_mapper(&request.mapper, &request.can) {
            let why = if self.fleet.cannot_run(&request.mapper) {
                format!("this run needs {}, which this mapper said it cannot run", self.job.transform.capability())
            } else {
                format!(
                    "this run needs {}, which this mapper does not offer (it offers: {})",
                    self.job.transform.capability(),
                    request.can.join(", ")
                )
            };
            let body = protocol::encode_status_reply(WorkReplyKind::Idle, CANNOT_RETRY_MS, Some(&why));
            return self.reply(&reply, body).await;
        }
        let wait = Duration::from_millis(request.wait_ms).min(MAX_WAIT);
        let max = request.max.clamp(1, protocol::MAX_CHUNKS_PER_REPLY);
        let waiter = Waiter { reply, mapper: request.mapper, max, deadline: received + wait };
        if !self.hand_out(&waiter).await {
            if wait.is_zero() {
                self.reply(&waiter.reply, protocol::encode_status_reply(WorkReplyKind::Idle, 200, None)).await;
            } else if let Err(waiter) = self.waiters.hold(waiter) {
                self.metrics.refused("held_requests_full");
                self.warn_peer("held_requests_full", || {
                    format!("{MAX_HELD} work requests are held already; answering idle at once (a flood, or a fleet far larger than expected)")
                });
                self.reply(&waiter.reply, protocol::encode_status_reply(WorkReplyKind::Idle, 200, None)).await;
            }
        }
    }

    /// Leases up to `waiter.max` pending chunks to it, in one reply kept under the server's
    /// max_payload; false if none is pending.
    async fn hand_out(&mut self, waiter: &Waiter) -> bool {
        let max_payload = common::nats::max_payload(&self.client);
        let lease_ms = self.config.lease_timeout.as_millis() as u64;
        let run = self.index.run_id.clone();
        let fingerprint = self.fingerprint.clone();
        let head = ChunksHead { run: &run, job: &fingerprint, lease_ms };
        let mut size = protocol::chunks_reply_overhead(&head);
        let mut chunks: Vec<(ChunkHead, Vec<u8>)> = Vec::new();
        while chunks.len() < waiter.max as usize {
            let Some(next) = self.ledger.next_pending() else { break };
            // Stop before a chunk that may not fit: its bytes are at most its span, plus its
            // head (ids, and line numbers when they are not consecutive).
            let next_span = self.index.chunks[next.index()];
            let estimate = next_span.len as usize + 512 + 12 * next_span.objects as usize;
            if !chunks.is_empty() && size + estimate > max_payload {
                break;
            }
            let room = max_payload.saturating_sub(protocol::chunks_reply_overhead(&head));
            let (chunk, objects, last) = match self.lease_one(waiter, chunks.is_empty(), room).await {
                Leased::Chunk { head, objects, last } => (head, objects, last),
                Leased::Skipped => continue,
                Leased::Stop => break,
            };
            let entry = protocol::chunk_entry_size(&chunk, &objects);
            let lease = (chunk.chunk, chunk.lease);
            if !chunks.is_empty() && size + entry > max_payload {
                // Fits alone, not with the others: it goes in the next reply.
                self.ledger.unlease(lease.0, lease.1);
                break;
            }
            if protocol::chunks_reply_overhead(&head) + entry > max_payload {
                self.dead_letter_oversized(&chunk, entry, max_payload).await;
                continue;
            }
            if chunk.attempt > 1 {
                tracing::info!(
                    chunk = lease.0 .0,
                    attempt = chunk.attempt,
                    "re-leasing chunk {} to {} (attempt {})",
                    lease.0,
                    escaped(&waiter.mapper),
                    chunk.attempt
                );
            }
            size += entry;
            chunks.push((chunk, objects));
            if last {
                break;
            }
        }
        if chunks.is_empty() {
            return false;
        }
        let body = protocol::encode_chunks_reply(&head, &chunks);
        self.reply(&waiter.reply, body.into()).await;
        true
    }

    /// A chunk too large for any reply under the server's `max_payload` (`entry` bytes with its
    /// head): dead-lettered at once, since no retry can make it fit.
    async fn dead_letter_oversized(&mut self, chunk: &ChunkHead, entry: usize, max_payload: usize) {
        tracing::error!(
            chunk = chunk.chunk.0,
            "chunk {} (input line {}) is {entry} bytes, over the NATS server's max_payload of {max_payload} bytes; dead-lettering it. Lower --chunk-size or raise max_payload",
            chunk.chunk,
            chunk.first_line,
        );
        let error = format!("chunk is {entry} bytes, over the NATS server's max_payload of {max_payload} bytes");
        self.dead_letter(chunk.chunk, &error).await;
    }

    /// A chunk whose records alone take more than `room` (what a reply under the server's
    /// `max_payload` leaves for one chunk): dead-lettered from the size the scan recorded,
    /// without reading it (a record of a gigabyte is never loaded). True if it was.
    async fn dead_letter_if_too_large(&mut self, grant: &crate::ledger::Grant, room: usize) -> bool {
        let span = self.index.chunks[grant.chunk.index()];
        let head = ChunkHead {
            chunk: grant.chunk,
            lease: grant.lease,
            attempt: grant.attempt,
            first_line: span.first_line,
            lines: None,
            skip: vec![],
            probe: false,
        };
        // The records, the commas between them and the smallest head a chunk has.
        let least =
            span.bytes + u64::from(span.objects.saturating_sub(1)) + protocol::chunk_entry_size(&head, &[]) as u64;
        if least <= room as u64 {
            return false;
        }
        let max_payload = common::nats::max_payload(&self.client);
        tracing::error!(
            chunk = grant.chunk.0,
            "chunk {} (input line {}) holds {} bytes of records, over the NATS server's max_payload of {max_payload} bytes; dead-lettering it without reading it. Lower --chunk-size or raise max_payload (a single record over it can never be sent)",
            grant.chunk,
            span.first_line,
            span.bytes,
        );
        let error = format!(
            "chunk holds {} bytes of records, over the NATS server's max_payload of {max_payload} bytes",
            span.bytes
        );
        self.dead_letter(grant.chunk, &error).await;
        true
    }

    /// Leases the next chunk `waiter` may have and reads its objects from the input (unless
    /// they cannot fit in `room`: see [`Server::dead_letter_if_too_large`]).
    async fn lease_one(&mut self, waiter: &Waiter, first: bool, room: usize) -> Leased {
        // A chunk suspected of killing its mappers goes alone to a mapper that holds nothing
        // else, so that a death can be blamed on it (and a probe is a probe of one chunk).
        let alone = first && self.ledger.leases_of(&waiter.mapper) == 0;
        let suspects = &self.suspects;
        let (changed, spans) = (&self.changed, &self.index.chunks);
        let grant = self.ledger.lease_where(&waiter.mapper, Instant::now(), self.config.lease_timeout, |c, deaths| {
            let unchanged = changed.is_empty() || !changed.contains_key(&spans[c.index()].object);
            unchanged && (alone || (deaths == 0 && !suspects.searching(c)))
        });
        let Some(grant) = grant else { return Leased::Stop };
        if self.dead_letter_if_too_large(&grant, room).await {
            return Leased::Skipped;
        }
        let span = self.index.chunks[grant.chunk.index()];
        let is_suspect = self.ledger.deaths(grant.chunk) > 0 || self.suspects.searching(grant.chunk);
        // Off the runtime thread when it may wait on the store (its retries included), so that
        // NATS, the metrics and the lock keep running; the caller waits for it, so the ledger
        // still sees one request at a time.
        let (objects, lines) = match self.reader.read_with_lines_async(&span).await {
            Ok(read) => read,
            Err(InputError::Read(e)) if e.kind == ReadErrorKind::Changed => {
                // Never a chunk of another version: this object's chunks stay where they are.
                self.ledger.unlease(grant.chunk, grant.lease);
                if self.changed.insert(span.object, e.message.clone()).is_none() {
                    tracing::error!(
                        chunk = grant.chunk.0,
                        "{e}; its chunks are no longer handed out (the others go on; the run stops when they are done)"
                    );
                }
                return Leased::Skipped;
            }
            Err(InputError::Read(e)) if e.kind == ReadErrorKind::Unavailable => {
                // The store is down, or the fetcher is out of file descriptors: the chunk is not
                // at fault. It is read again when a mapper next asks.
                self.ledger.unlease(grant.chunk, grant.lease);
                self.warn_peer("input_unavailable", || {
                    format!("cannot read chunk {} now: {e}; it stays pending and is read again later", grant.chunk)
                });
                return Leased::Stop;
            }
            Err(e) => {
                tracing::error!(chunk = grant.chunk.0, "cannot read chunk {}: {e}; dead-lettering it", grant.chunk);
                self.dead_letter(grant.chunk, &e.to_string()).await;
                return Leased::Skipped;
            }
        };
        let plan = self.suspects.plan(grant.chunk, span.objects, grant.lease);
        let head = ChunkHead {
            chunk: grant.chunk,
            lease: grant.lease,
            attempt: grant.attempt,
            first_line: span.first_line,
            lines,
            skip: plan.skip,
            probe: plan.probe,
        };
        Leased::Chunk { head, objects, last: is_suspect }
    }

    /// Answers `idle` to the held requests of mappers that went silent (a lease of theirs
    /// expired). A mapper killed while it held a request for more work leaves that request here;
    /// served, it would swallow a chunk (a probe, even, since the dead mapper now holds nothing
    /// and so looks like the ideal mapper to probe on) whose lease then expires in turn and is
    /// blamed on the chunk. A mapper that is alive after all just asks again.
    pub(super) async fn drop_waiters_of(&mut self, silent: &HashSet<String>) {
        for waiter in self.waiters.drop_of(silent) {
            self.reply(&waiter.reply, protocol::encode_status_reply(WorkReplyKind::Idle, 0, None)).await;
        }
    }

    pub(super) async fn serve_waiters(&mut self) {
        while let Some(waiter) = self.waiters.next() {
            if !self.hand_out(&waiter).await {
                self.waiters.put_back(waiter);
                break;
            }
        }
    }

    pub(super) async fn on_job(&mut self, message: Message) {
        if let Err(e) = protocol::decode_bounded::<JobRequest>(&message.payload) {
            return self.malformed(&message, &e);
        }
        let Some(reply) = &message.reply else { return };
        let body = JobReply {
            v: VERSION,
            run: self.index.run_id.clone(),
            job: self.fingerprint.clone(),
            spec: common::json::to_value_own(&self.job),
            describe: self.job.describe(),
        };
        self.reply(reply, protocol::encode(&body)).await;
    }
}
