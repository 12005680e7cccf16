//! Dead letters: a chunk given up on is recorded durably, listed for people in the
//! dead-letter record, and its record (every object dead with cause `chunk`) is sent to
//! the savers like a mapper's result, so the sink alone tells what became of every object.
//! The run completes only once a saver saved each (docs/PROTOCOL.md §6.6).

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use common::backoff::Backoff;
use common::events::{Event, EventBody};
use common::protocol::{self, ChunkId, ResultHead, ResultReply, ResultStatus};
use common::text::escaped;

use crate::status::DeadLetterStatus;
use crate::store::{DeadLetter, Entry};

use super::Server;

impl Server {
    /// Dead-letters a chunk that can never be handed out.
    pub(super) async fn dead_letter(&mut self, chunk: ChunkId, error: &str) {
        self.ledger.give_up(chunk);
        self.record_dead(chunk, error).await;
    }

    /// Records a chunk the ledger gave up on ([`crate::ledger::ChunkState::Dying`]) durably,
    /// then marks it dead and sends its record to the sink; if the store fails, the chunk stays
    /// dying and is retried every tick.
    pub(super) async fn record_dead(&mut self, chunk: ChunkId, error: &str) {
        if let Err(e) = self.store.record(&[Entry::Dead(chunk)]).await {
            self.health.failed(&e, &self.metrics, "a dead-lettered chunk waits to be recorded");
            self.dying.push((chunk, error.to_string()));
            return;
        }
        self.health.succeeded(&self.metrics);
        self.ledger.dead_letter(chunk);
        let span = self.index.chunks[chunk.index()];
        let ids: Vec<Option<String>> = self.chunk_ids(chunk);
        let record = DeadLetter::Chunk {
            run: self.index.run_id.clone(),
            chunk,
            first_line: span.first_line,
            objects: span.objects,
            ids: ids.into_iter().flatten().collect(),
            error: error.to_string(),
        };
        self.unwritten_records.push_back(record);
        self.write_records().await;
        self.dead.died(crate::status::DeadLetterStatus {
            chunk,
            first_line: span.first_line,
            objects: u64::from(span.objects),
            reason: error.to_string(),
        });
        self.send_marker(chunk, error.to_string());
        let body = EventBody::ChunkDead {
            chunk,
            reason: error.to_string(),
            first_line: span.first_line,
            objects: u64::from(span.objects),
        };
        self.events.emit(Event::new(&self.index.run_id, body));
    }

    /// The ids of a chunk's objects (the job's id field), for its dead-letter records; none for
    /// a chunk too large to be sent, which is never read.
    fn chunk_ids(&self, chunk: ChunkId) -> Vec<Option<String>> {
        let span = self.index.chunks[chunk.index()];
        let too_large = span.bytes > common::nats::max_payload(&self.client) as u64;
        let Some(field) = self.job.id_field.as_ref().filter(|_| !too_large) else {
            return vec![None; span.objects as usize];
        };
        self.reader
            .read_array(&span)
            .ok()
            .and_then(|array| {
                serde_json::from_slice::<Vec<&serde_json::value::RawValue>>(&array).ok().map(|raws| {
                    raws.iter()
                        .map(|raw| field.extract(raw.get().as_bytes()).filter(|id| id.len() <= protocol::MAX_ID))
                        .collect::<Vec<_>>()
                })
            })
            .unwrap_or_else(|| vec![None; span.objects as usize])
    }

    /// Saves the record of a dead-lettered chunk into the sink, so that the sink alone tells
    /// what became of every object (`saver verify` reads nothing else): a result in which every
    /// object is dead with cause `chunk`, sent like a mapper's, resent until a saver answers
    /// `saved`. The ack that follows completes it (see [`Server::is_complete`]).
    pub(super) fn send_marker(&self, chunk: ChunkId, error: String) {
        let span = self.index.chunks[chunk.index()];
        let ids = self.chunk_ids(chunk);
        let head = ResultHead {
            run: self.index.run_id.clone(),
            job: self.fingerprint.clone(),
            chunk,
            lease: uuid::Uuid::new_v4(),
            attempt: 0,
            mapper: protocol::truncate_to(
                format!("fetcher:{}", self.config.nats.instance_name("fetcher")),
                protocol::MAX_NAME,
            ),
        };
        let reason = protocol::truncate_to(format!("its chunk was dead-lettered: {error}"), 1024);
        let with_ids = self.job.id_field.is_some().then_some(ids.as_slice());
        let body = protocol::encode_chunk_dead(&head, span.objects, with_ids, &reason);
        // Without ids if they make it too large for the server (they only help verify match).
        let body = if body.len() > common::nats::max_payload(&self.client) {
            protocol::encode_chunk_dead(&head, span.objects, None, &reason)
        } else {
            body
        };
        let client = self.client.clone();
        let subject = self.subjects.result.clone();
        let stop = self.markers.clone();
        let refused = self.refused_markers.0.clone();
        tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
            loop {
                let request =
                    async_nats::Request::new().payload(body.clone().into()).timeout(Some(Duration::from_secs(5)));
                let outcome = tokio::select! {
                    _ = stop.cancelled() => return,
                    reply = client.send_request(subject.clone(), request) => reply,
                };
                match outcome.map(|m| protocol::decode::<ResultReply>(&m.payload)) {
                    Ok(Ok(ResultReply { status: ResultStatus::Saved, .. })) => return,
                    Ok(Ok(ResultReply { status: ResultStatus::Rejected, error, .. })) => {
                        let _ = refused.send((chunk, error.unwrap_or_default()));
                        return;
                    }
                    _ => {}
                }
                if !backoff.wait(&stop).await {
                    return;
                }
            }
        });
    }

    /// Writes the queued dead-letter records for people, oldest first, until one fails.
    async fn write_records(&mut self) {
        while let Some(record) = self.unwritten_records.front() {
            if let Err(e) = self.store.dead_letter(record).await {
                self.health.failed(&e, &self.metrics, "dead-letter records wait to be written");
                return;
            }
            self.unwritten_records.pop_front();
        }
    }

    /// Retries what a failing store could not take.
    pub(super) async fn retry_store(&mut self) {
        for (chunk, error) in std::mem::take(&mut self.dying) {
            self.record_dead(chunk, &error).await;
        }
        self.write_records().await;
    }

    /// A dead chunk's record the sink refused: the run does not wait for it.
    pub(super) fn on_refused_marker(&mut self, chunk: ChunkId, error: &str) {
        tracing::error!(
            chunk = chunk.0,
            "the sink refused the record of dead-lettered chunk {chunk} ({}); the run does not wait for it, and verify will report its objects missing",
            escaped(error)
        );
        self.dead.settled(chunk);
    }
}

/// The chunks dead-lettered whose record is not in the sink yet (the run completes only once a
/// saver saved each, or the sink refused it for good), and the latest dead letters the status
/// shows, newest last.
#[derive(Debug)]
pub(super) struct DeadChunks {
    unsettled: HashSet<ChunkId>,
    recent: VecDeque<DeadLetterStatus>,
    shown: usize,
}

impl DeadChunks {
    /// Resumes with the dead chunks whose record must be sent again; shows the last `shown`.
    pub(super) fn new(unsettled: HashSet<ChunkId>, shown: usize) -> Self {
        DeadChunks { unsettled, recent: VecDeque::new(), shown }
    }

    /// A chunk was dead-lettered: its record is awaited, and it is shown.
    pub(super) fn died(&mut self, dead: DeadLetterStatus) {
        self.unsettled.insert(dead.chunk);
        if self.recent.len() == self.shown {
            self.recent.pop_front();
        }
        self.recent.push_back(dead);
    }

    /// Whether `chunk`'s record is still awaited.
    pub(super) fn waiting(&self, chunk: ChunkId) -> bool {
        self.unsettled.contains(&chunk)
    }

    /// `chunk`'s record is in the sink, or never will be: the run no longer waits for it.
    pub(super) fn settled(&mut self, chunk: ChunkId) {
        self.unsettled.remove(&chunk);
    }

    /// Whether no record is awaited.
    pub(super) fn all_settled(&self) -> bool {
        self.unsettled.is_empty()
    }

    /// The chunks whose record is awaited, in no order.
    pub(super) fn unsettled(&self) -> Vec<ChunkId> {
        self.unsettled.iter().copied().collect()
    }

    /// The latest dead letters, newest last.
    pub(super) fn recent(&self) -> Vec<DeadLetterStatus> {
        self.recent.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead(chunk: u32) -> DeadLetterStatus {
        DeadLetterStatus { chunk: ChunkId(chunk), first_line: 1, objects: 1, reason: format!("r{chunk}") }
    }

    #[test]
    fn a_dead_chunk_is_awaited_until_its_record_is_settled() {
        let mut dead_chunks = DeadChunks::new(HashSet::new(), 4);
        assert!(dead_chunks.all_settled());
        dead_chunks.died(dead(3));
        assert!(dead_chunks.waiting(ChunkId(3)) && !dead_chunks.waiting(ChunkId(4)));
        assert!(!dead_chunks.all_settled());
        dead_chunks.settled(ChunkId(3));
        assert!(dead_chunks.all_settled() && !dead_chunks.waiting(ChunkId(3)));
    }

    #[test]
    fn a_resumed_run_awaits_the_records_of_the_chunks_it_was_given() {
        let mut dead_chunks = DeadChunks::new([ChunkId(1), ChunkId(2)].into(), 4);
        let mut unsettled = dead_chunks.unsettled();
        unsettled.sort_by_key(|c| c.0);
        assert_eq!(unsettled, [ChunkId(1), ChunkId(2)]);
        assert!(dead_chunks.recent().is_empty(), "shown are only this fetcher's dead letters");
        dead_chunks.settled(ChunkId(1));
        dead_chunks.settled(ChunkId(2));
        assert!(dead_chunks.all_settled());
    }

    #[test]
    fn only_the_latest_dead_letters_are_shown_newest_last() {
        let mut dead_chunks = DeadChunks::new(HashSet::new(), 2);
        for chunk in 0..3 {
            dead_chunks.died(dead(chunk));
        }
        assert_eq!(dead_chunks.recent(), [dead(1), dead(2)]);
        dead_chunks.settled(ChunkId(0));
        assert!(dead_chunks.waiting(ChunkId(1)), "shown or not, every record is awaited");
    }
}
