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
        let new_sink = match self.sink.check(&request.sink) {
            SinkCheck::Other(ours) => return self.refuse_other_sink(&message, &request, ours).await,
            SinkCheck::Missing => return self.malformed(&message, &"an ack without a sink id"),
            SinkCheck::Ours => None,
            SinkCheck::Unbound => Some(request.sink.clone()),
        };
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
        let commit_needed = self.commit.needs_recording(request.commit) && (self.sink.is_bound() || new_sink.is_some());
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
            self.sink.bind(sink);
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
                    settles_a_record |= self.dead.waiting(ack.chunk);
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
                self.dead.settled(ack.chunk);
                self.suspects.settled(ack.chunk);
            }
        }
        verdicts
    }
}

/// The sink this run saves into: one run, one sink. Unbound until the first ack that saves
/// something of the run binds it (recorded in the store, so a restarted fetcher keeps it).
#[derive(Debug)]
pub(super) struct SinkBinding {
    ours: Option<String>,
}

/// What an ack's sink is to the run.
#[derive(Debug, PartialEq)]
pub(super) enum SinkCheck {
    /// The run's own sink.
    Ours,
    /// No sink is bound yet: this ack's may become it.
    Unbound,
    /// No sink is bound and the ack names none.
    Missing,
    /// Another sink than the run's, which is given.
    Other(String),
}

impl SinkBinding {
    /// The binding a run resumes with (`None` for a run no ack saved anything of yet).
    pub(super) fn new(recovered: Option<String>) -> Self {
        SinkBinding { ours: recovered }
    }

    /// What `theirs` (an ack's sink id) is to this run.
    pub(super) fn check(&self, theirs: &str) -> SinkCheck {
        match &self.ours {
            Some(ours) if ours != theirs => SinkCheck::Other(ours.clone()),
            Some(_) => SinkCheck::Ours,
            None if theirs.is_empty() => SinkCheck::Missing,
            None => SinkCheck::Unbound,
        }
    }

    /// Binds the run to `sink` (once its entry is durable).
    pub(super) fn bind(&mut self, sink: String) {
        self.ours = Some(sink);
    }

    /// Whether a sink is bound.
    pub(super) fn is_bound(&self) -> bool {
        self.ours.is_some()
    }

    /// The bound sink, if any.
    pub(super) fn ours(&self) -> Option<&str> {
        self.ours.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unbound_run_refuses_an_ack_without_a_sink_and_lets_any_other_bind_it() {
        let binding = SinkBinding::new(None);
        assert!(!binding.is_bound());
        assert_eq!(binding.check(""), SinkCheck::Missing);
        assert_eq!(binding.check("dir-a"), SinkCheck::Unbound);
    }

    #[test]
    fn a_bound_run_accepts_only_its_own_sink_and_names_it_to_the_others() {
        let mut binding = SinkBinding::new(None);
        binding.bind("dir-a".into());
        assert!(binding.is_bound());
        assert_eq!(binding.ours(), Some("dir-a"));
        assert_eq!(binding.check("dir-a"), SinkCheck::Ours);
        assert_eq!(binding.check("dir-b"), SinkCheck::Other("dir-a".into()));
        assert_eq!(binding.check(""), SinkCheck::Other("dir-a".into()));
    }

    #[test]
    fn a_resumed_run_keeps_the_sink_it_recorded() {
        let binding = SinkBinding::new(Some("pg-x".into()));
        assert_eq!(binding.check("pg-x"), SinkCheck::Ours);
        assert_eq!(binding.check("dir-a"), SinkCheck::Other("pg-x".into()));
    }
}
