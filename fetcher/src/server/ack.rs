//! The ack exchange (docs/PROTOCOL.md §3.10, §6.3–6.5): a saver's acks make chunks done,
//! durably first and only then in the ledger and the answer. The first ack that saves something
//! binds the run to its sink; acks from another sink are refused.

use std::time::Instant;

use async_nats::Message;
use common::protocol::{self, AckReply, AckRequest, AckVerdict, VERSION};
use common::text::{escaped, held_back};

use crate::store::Entry;

use super::{Server, WARN_INTERVAL};

impl Server {
    pub(super) async fn on_ack(&mut self, message: Message) {
        let request: AckRequest = match protocol::decode_bounded(&message.payload) {
            Ok(r) => r,
            Err(e) => return self.malformed(&message, &e),
        };
        // One run, one sink: the first ack records which; acks from another sink (a saver with
        // another --out, on another volume) are refused loudly.
        let mut new_sink = None;
        match &self.sink {
            Some(sink) if *sink != request.sink => {
                return self.refuse_other_sink(&message, &request, sink.clone()).await
            }
            Some(_) => {}
            None if request.sink.is_empty() => return self.malformed(&message, &"an ack without a sink id"),
            None => new_sink = Some(request.sink.clone()),
        }
        // First what would become done, then make that durable, and only then change the ledger
        // and answer: a chunk is never done in memory before it is done on disk. If the write
        // fails nothing changes and nothing is answered; the saver resends the ack.
        let (mut entries, settles_a_record) = self.entries_for(&request);
        // The sink is recorded with the first ack that saves something of the run (a chunk, or a
        // dead chunk's record), never by acks that save nothing (a forged ack for an unknown
        // chunk must not choose the run's sink).
        let new_sink = new_sink.filter(|_| !entries.is_empty() || settles_a_record);
        if let Some(sink) = &new_sink {
            entries.insert(0, Entry::Sink(sink.clone()));
        }
        // A sink that commits runs says so on every ack: recorded once, before the answer, so
        // that a restarted fetcher asks for the commit too.
        let commit_needed = self.commit.needs_recording(request.commit) && (self.sink.is_some() || new_sink.is_some());
        if commit_needed {
            entries.push(Entry::CommitNeeded);
        }
        if let Err(e) = self.store.record(&entries).await {
            self.health.failed(&e, &self.metrics, "not answering acks until it can; the savers resend them");
            return;
        }
        if !entries.is_empty() {
            self.health.succeeded(&self.metrics);
        }
        if commit_needed {
            self.commit.recorded_needed();
        }
        if let Some(sink) = new_sink {
            tracing::info!("run {} saves into sink {}", self.index.run_id, escaped(&sink));
            self.sink = Some(sink);
        }
        let verdicts = self.apply_acks(&request);
        if let Some(reply) = &message.reply {
            self.reply(reply, protocol::encode(&AckReply { v: VERSION, verdicts })).await;
        }
    }

    /// Answers `wrong_sink` to every ack of a saver that saves into another sink than `ours`, loudly.
    async fn refuse_other_sink(&mut self, message: &Message, request: &AckRequest, ours: String) {
        self.metrics.refused("wrong_sink");
        let (saver, theirs) = (escaped(&request.saver), escaped(&request.sink));
        self.warn_peer("wrong_sink", || {
            format!(
                "saver {saver} saves into sink {theirs}, but this run saves into sink {ours}: its {} acks are refused. Give every saver the same --out (a shared volume) or --sink",
                request.acks.len()
            )
        });
        if let Some(reply) = &message.reply {
            let verdicts = vec![AckVerdict::WrongSink; request.acks.len()];
            self.reply(reply, protocol::encode(&AckReply { v: VERSION, verdicts })).await;
        }
    }

    /// The store entries the acks would add (chunks that become done), and whether any of them
    /// confirms a dead chunk's record in the sink.
    fn entries_for(&self, request: &AckRequest) -> (Vec<Entry>, bool) {
        let mut entries: Vec<Entry> = Vec::new();
        let mut settles_a_record = false;
        for ack in request.acks.iter().filter(|a| a.run == self.index.run_id) {
            match self.ledger.check_ack(ack.chunk, ack.objects, ack.dead) {
                AckVerdict::Done => {
                    let entry = Entry::Done(ack.chunk);
                    if !entries.contains(&entry) {
                        entries.push(entry);
                    }
                }
                AckVerdict::AlreadyDone => {
                    settles_a_record |= self.unmarked.contains(&ack.chunk);
                }
                _ => {}
            }
        }
        (entries, settles_a_record)
    }

    /// Applies acks whose entries are durable to the ledger: one verdict each, in order.
    fn apply_acks(&mut self, request: &AckRequest) -> Vec<AckVerdict> {
        let mut verdicts = Vec::with_capacity(request.acks.len());
        for ack in &request.acks {
            if ack.run != self.index.run_id {
                let (saver, run, ours) = (escaped(&request.saver), escaped(&ack.run), &self.index.run_id);
                if let Some(held) = self.warnings.allow("ack_other_run", Instant::now()) {
                    tracing::warn!(
                        chunk = ack.chunk.0,
                        "ack from {saver} for run {run}, not this run ({ours}){}",
                        held_back(held, WARN_INTERVAL)
                    );
                }
                verdicts.push(self.ledger.unknown_ack());
                continue;
            }
            let holder =
                self.ledger.lease_of(ack.chunk).filter(|lease| lease.id == ack.lease).map(|lease| lease.mapper.clone());
            verdicts.push(self.ledger.ack(ack.chunk, ack.lease, ack.objects, ack.dead));
            if let (Some(AckVerdict::Done), Some(mapper)) = (verdicts.last(), holder) {
                self.fleet.saved(&mapper);
            }
            if verdicts.last() != Some(&AckVerdict::Unknown) {
                self.unmarked.remove(&ack.chunk);
                self.suspects.settled(ack.chunk);
            }
        }
        verdicts
    }
}
