//! The task that owns the ledger and answers every request about it. Requests are handled one
//! at a time, so the ledger needs no lock and every decision sees the latest state. Anything that
//! must wait on the network (publishing events, saving dead-letter records into the sink) is
//! handed to other tasks.
//!
//! This module holds the [`Server`], its construction, the serve loop, the tick and the run's
//! completion; each exchange of docs/PROTOCOL.md is answered in a module of its name: [`work`]
//! (work and job), [`lease`] (extend, release), [`ack`], [`dead_letter`] and [`status`].

mod ack;
mod dead_letter;
mod fleet;
mod lease;
mod status;
mod waiters;
mod work;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, Message, Subject};
use common::events::{Event, EventBody};
use common::input::{ChunkReader, InputIndex};
use common::protocol::{self, ChunkId, CommitRequest, Subjects, WorkReplyKind, VERSION};
use common::text::{escaped, held_back, RateLimit};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use transform::Job;

use crate::commit::{CommitState, CommitStep};
use crate::config::Config;
use crate::events::Publisher;
use crate::kv_lock::LockStatus;
use crate::ledger::Ledger;
use crate::metrics::FetcherMetrics;
use crate::poison::Suspects;
use crate::progress::{milestone, Progress};
use crate::store::{DeadLetter, Entry, LedgerStore, Recovered, StoreHealth};
use crate::{FetcherError, RunSummary};
use ack::SinkBinding;
use dead_letter::DeadChunks;
use fleet::Fleet;
use waiters::Waiters;

/// Longest a work request is held when nothing is pending (the mapper asks again after that).
const MAX_WAIT: Duration = Duration::from_secs(5);
/// How often leases and held requests are checked.
const TICK: Duration = Duration::from_millis(50);
/// Most work requests held at once (long polls); more are answered `idle` at once. Far above any
/// real fleet (each mapper holds one), it bounds what a flood of requests can make us keep.
const MAX_HELD: usize = 1024;
/// Repeated warnings about what peers send: one line per kind per interval, with a count.
const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// A mapper counts as asking for work if it asked within this long.
const ASKING: Duration = Duration::from_secs(10);
/// Most mappers remembered (for "who is asking" and the status); the least recent go first.
const MAX_MAPPERS: usize = 4096;
/// How long a mapper that cannot run the job is told to wait before asking again.
const CANNOT_RETRY_MS: u64 = 2000;

/// What the fetcher talks through: NATS, its metrics, the events queue and its readiness flag.
pub(crate) struct Io {
    /// The NATS connection.
    pub(crate) client: Client,
    /// The fetcher's metrics.
    pub(crate) metrics: FetcherMetrics,
    /// Pipeline events.
    pub(crate) events: Publisher,
    /// Readiness (`/readyz`).
    pub(crate) ready: Arc<AtomicBool>,
    /// The `status` endpoint of the fetcher's NATS micro service (`fetcher status`).
    pub(crate) status: Option<async_nats::service::endpoint::Endpoint>,
    /// Status requests of the status page (`/status.json`, [`crate::page`]).
    pub(crate) page: crate::page::StatusRequests,
    /// The work subscription made before the scan, with the requests held meanwhile.
    pub(crate) early: Option<crate::early::Held>,
}

/// The server of one run.
pub(crate) struct Server {
    config: Config,
    job: Job,
    fingerprint: String,
    subjects: Subjects,
    client: Client,
    metrics: FetcherMetrics,
    store: LedgerStore,
    index: InputIndex,
    reader: ChunkReader,
    ledger: Ledger,
    /// Work requests held until a chunk is pending or their wait is over.
    waiters: Waiters,
    progress: Progress,
    completed_logged: bool,
    events: Publisher,
    /// The highest progress milestone (percent) already passed, so none is announced twice, also
    /// across a restart (it starts from the resumed state).
    milestone: u32,
    /// The run was complete before this fetcher started: its completion was announced before.
    complete_at_start: bool,
    /// Chunks given up on whose dead letter is not durable yet (the store failed): retried
    /// every tick, and only then dead.
    dying: Vec<(ChunkId, String)>,
    /// Dead-letter records for people that could not be written yet: retried every tick.
    unwritten_records: VecDeque<DeadLetter>,
    /// Whether the durable store works, for readiness, a metric and one log line per outage.
    health: StoreHealth,
    /// Rate limit for warnings about what peers send.
    warnings: RateLimit,
    /// The single-fetcher lock, when it can be lost (`--ledger kv`): while it is not known to be
    /// held, nothing is answered.
    lock: Option<Arc<LockStatus>>,
    /// Messages dropped because the lock was not held, for one log line per lapse.
    unserved: u64,
    /// The sink this run saves into (its first ack records it); acks from another are refused.
    sink: SinkBinding,
    /// Dead-lettered chunks whose record is not in the sink yet: the run completes once a saver
    /// has saved each (see [`Server::send_marker`]); the latest dead letters, for the status.
    dead: DeadChunks,
    /// Mappers that asked for work, whether they can run the job, which said they cannot.
    fleet: Fleet,
    /// The `status` endpoint, taken by `serve`.
    status: Option<async_nats::service::endpoint::Endpoint>,
    /// The status page's requests.
    page: crate::page::StatusRequests,
    /// Stops the dead-letter record senders.
    markers: CancellationToken,
    /// Chunks whose leases keep expiring: the search for the object that kills their mappers.
    suspects: Suspects,
    /// The work subscription made before the scan and its held requests, taken by `serve`.
    early: Option<crate::early::Held>,
    /// Input objects that changed since the scan (by index, with the message): their chunks are
    /// no longer handed out, and the run stops once nothing else can be done.
    changed: HashMap<u32, String>,
    /// Dead chunks whose record the sink refused (it never will take it): the run must not wait
    /// for them.
    refused_markers: (RefusedMarkers, tokio::sync::mpsc::UnboundedReceiver<(ChunkId, String)>),
    /// The run's commit, when its sink needs one ([`crate::commit`]).
    commit: CommitState,
    /// Where the commit request task reports that a saver answered `committed`.
    committed: (tokio::sync::mpsc::UnboundedSender<()>, tokio::sync::mpsc::UnboundedReceiver<()>),
}

/// The ledger of `index` with what the store `recovered` marked done and dead, and the dead
/// chunks whose record must be sent to the sink again: which of them have theirs in the sink is
/// not in the ledger, so all are sent (saving one twice is a duplicate).
fn resume(index: &InputIndex, recovered: &Recovered) -> (Ledger, HashSet<ChunkId>) {
    let mut ledger = Ledger::new(index.chunks.iter().map(|c| c.objects).collect());
    for chunk in &recovered.done {
        ledger.mark_done(*chunk);
    }
    for chunk in &recovered.dead {
        ledger.dead_letter(*chunk);
    }
    let unmarked =
        recovered.dead.iter().copied().filter(|c| ledger.state(*c) == Some(crate::ledger::ChunkState::Dead)).collect();
    (ledger, unmarked)
}

/// The subscriptions the fetcher serves.
struct Inbox {
    work: async_nats::Subscriber,
    job: async_nats::Subscriber,
    extend: async_nats::Subscriber,
    release: async_nats::Subscriber,
    ack: async_nats::Subscriber,
    status: futures::stream::BoxStream<'static, async_nats::service::Request>,
}

/// Where marker tasks report a dead chunk whose record the sink refused, with its error.
type RefusedMarkers = tokio::sync::mpsc::UnboundedSender<(ChunkId, String)>;

impl Server {
    /// A server for `index` under `job`, resuming from `recovered`.
    pub(crate) fn new(
        config: Config,
        job: Job,
        index: InputIndex,
        io: Io,
        store: LedgerStore,
        recovered: Recovered,
    ) -> Result<Self, FetcherError> {
        let Io { client, metrics, events, ready, status, page, early } = io;
        let reader = ChunkReader::open(&index)?;
        let (ledger, unmarked) = resume(&index, &recovered);
        if !recovered.is_fresh() {
            tracing::info!(
                run = %index.run_id,
                "resuming run {} from {}: {} chunks already done, {} dead-lettered, {} to go",
                index.run_id,
                config.ledger_location(),
                ledger.done(),
                ledger.dead(),
                ledger.pending()
            );
        }
        let finished = ledger.done() + ledger.dead();
        let commit = CommitState::recovered(recovered.commit_needed, recovered.committed);
        Ok(Server {
            milestone: milestone(finished, ledger.len() as u64),
            complete_at_start: ledger.is_complete() && commit.settled(),
            commit,
            committed: tokio::sync::mpsc::unbounded_channel(),
            fingerprint: job.fingerprint(),
            job,
            events,
            subjects: Subjects::new(&config.nats.subject_prefix),
            progress: Progress::new(index.objects, config.progress()).with_bar_on_terminal(index.chunks.len() as u64),
            client,
            metrics,
            index,
            reader,
            ledger,
            waiters: Waiters::new(MAX_HELD),
            completed_logged: false,
            dying: Vec::new(),
            unwritten_records: VecDeque::new(),
            health: StoreHealth::new(ready),
            warnings: RateLimit::new(WARN_INTERVAL),
            lock: store.lock(),
            unserved: 0,
            sink: SinkBinding::new(recovered.sink),
            dead: DeadChunks::new(unmarked, crate::status::DEAD_LETTERS_SHOWN),
            fleet: Fleet::new(MAX_MAPPERS, ASKING),
            markers: CancellationToken::new(),
            suspects: Suspects::new(config.max_attempts),
            early,
            changed: HashMap::new(),
            refused_markers: tokio::sync::mpsc::unbounded_channel(),
            status,
            page,
            store,
            config,
        })
    }

    /// Lists a fresh run's skipped input records in the dead-letter record.
    pub(crate) async fn record_bad_records(&self) -> Result<(), FetcherError> {
        for bad in &self.index.bad {
            let several = self.index.parts.len() > 1;
            let record = DeadLetter::BadRecord {
                run: self.index.run_id.clone(),
                input: self.index.input.clone(),
                object: self.index.parts.get(bad.object as usize).filter(|_| several).map(|part| part.name.clone()),
                line: bad.line,
                error: bad.error.clone(),
            };
            self.store.dead_letter(&record).await?;
        }
        if !self.index.bad.is_empty() {
            tracing::warn!("{} invalid input records listed in {}", self.index.bad.len(), self.store.dead_letters());
        }
        Ok(())
    }

    /// Announces a fresh run as `started`, or an unfinished one picked up again as `resumed`.
    pub(crate) fn announce(&mut self, fresh: bool, instance: &str) {
        let run = &self.index.run_id;
        let body = if fresh {
            EventBody::Started {
                objects: self.index.objects,
                chunks: self.ledger.len() as u64,
                chunk_size: self.index.chunk_size,
                transform: self.job.transform.describe(),
            }
        } else if !self.ledger.is_complete() {
            EventBody::Resumed {
                chunks: self.ledger.len() as u64,
                chunks_done: self.ledger.done(),
                chunks_dead: self.ledger.dead(),
                instance: instance.to_string(),
            }
        } else {
            return;
        };
        self.events.emit(Event::new(run, body));
    }

    /// Once an input object changed: nothing is leased and every pending chunk belongs to a
    /// changed object, so the run cannot go on. The error names the objects.
    fn stopped_by_changed_input(&self) -> Option<FetcherError> {
        if self.changed.is_empty() || self.ledger.leased() > 0 {
            return None;
        }
        let spans = &self.index.chunks;
        let blocked = (0..spans.len() as u32)
            .map(ChunkId)
            .filter(|c| self.ledger.state(*c) == Some(crate::ledger::ChunkState::Pending))
            .try_fold(0u64, |n, c| self.changed.contains_key(&spans[c.index()].object).then_some(n + 1))?;
        let mut objects: Vec<&String> = self.changed.values().collect();
        objects.sort();
        let listing: Vec<&str> = objects.iter().map(|m| m.as_str()).collect();
        Some(FetcherError::InputChanged(format!(
            "run {} stopped: {blocked} chunks were not handed out because their input changed during the run ({} of {} chunks done). {}",
            self.index.run_id,
            self.ledger.done(),
            self.ledger.len(),
            listing.join("; ")
        )))
    }

    /// Every chunk done or dead-lettered, and each dead one's record in the sink.
    fn is_complete(&self) -> bool {
        self.ledger.is_complete() && self.dead.all_settled()
    }

    /// Announces the highest milestone passed since the last one, if any (several passed at once,
    /// as in a small run, give one message, not a burst).
    fn check_milestone(&mut self) {
        let total = self.ledger.len() as u64;
        let finished = self.ledger.done() + self.ledger.dead();
        let now = milestone(finished, total);
        if now > self.milestone && finished < total {
            self.milestone = now;
            let body = EventBody::Progress {
                percent: now,
                chunks_done: finished,
                chunks: total,
                objects_done: self.ledger.objects_done(),
                objects: self.index.objects,
                elapsed_ms: self.progress.elapsed().as_millis() as u64,
            };
            self.events.emit(Event::new(&self.index.run_id, body));
        }
    }

    async fn subscribe(&self, subject: &str) -> Result<async_nats::Subscriber, FetcherError> {
        self.client
            .subscribe(subject.to_string())
            .await
            .map_err(|source| FetcherError::Subscribe { subject: subject.to_string(), source })
    }

    /// Serves until the run is complete (with `--exit-when-done`) or `shutdown`.
    pub(crate) async fn serve(mut self, shutdown: CancellationToken) -> Result<RunSummary, FetcherError> {
        let (mut inbox, held) = self.inbox().await?;
        self.metrics.start(self.index.objects);
        self.health.ready.store(true, Ordering::Relaxed);
        for (message, received) in held {
            if self.serving() {
                self.on_work(message, received).await;
            }
        }
        for chunk in self.dead.unsettled() {
            self.send_marker(chunk, "dead-lettered before this fetcher started (see the dead-letter record)".into());
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let lost = self.lock.as_ref().map(|lock| lock.lost().clone()).unwrap_or_default();
        let outcome = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                _ = lost.cancelled() => {
                    let why = self.lock.as_ref().map(|lock| lock.why()).unwrap_or_default();
                    break Err(FetcherError::LockLost(why));
                }
                Some(message) = inbox.ack.next() => if self.serving() { self.on_ack(message).await },
                Some(message) = inbox.extend.next() => if self.serving() { self.on_extend(message).await },
                Some(message) = inbox.release.next() => if self.serving() { self.on_release(message).await },
                Some(message) = inbox.job.next() => if self.serving() { self.on_job(message).await },
                Some(message) = inbox.work.next() => if self.serving() { self.on_work(message, Instant::now()).await },
                Some(request) = inbox.status.next() => self.on_status(request).await,
                Some(reply) = self.page.recv() => drop(reply.send(self.status())),
                Some((chunk, error)) = self.refused_markers.1.recv() => self.on_refused_marker(chunk, &error),
                Some(()) = self.committed.1.recv() => self.commit.answered(),
                _ = tick.tick() => self.on_tick().await,
            }
            self.check_milestone();
            if let Some(error) = self.stopped_by_changed_input() {
                break Err(error);
            }
            if self.is_complete() && self.advance_commit().await {
                self.on_complete().await;
                if self.config.exit_when_done {
                    break Ok(());
                }
            }
        };
        self.wind_down(outcome).await
    }

    /// Subscribes to every subject the fetcher answers (the work subject was subscribed to before
    /// the scan), and takes the `status` endpoint. Also the work requests held during the scan.
    async fn inbox(&mut self) -> Result<(Inbox, Vec<(Message, Instant)>), FetcherError> {
        let (work, held) = match self.early.take() {
            Some(early) => (early.subscriber, early.requests),
            None => (self.subscribe(&self.subjects.work).await?, Vec::new()),
        };
        let subjects = &self.subjects;
        let inbox = Inbox {
            work,
            job: self.subscribe(&subjects.job).await?,
            extend: self.subscribe(&subjects.extend).await?,
            release: self.subscribe(&subjects.release).await?,
            ack: self.subscribe(&subjects.ack).await?,
            status: match self.status.take() {
                Some(endpoint) => endpoint.boxed(),
                None => futures::stream::pending().boxed(),
            },
        };
        let subjects = &self.subjects;
        self.metrics.common.watch_subjects(&[
            &subjects.work,
            &subjects.job,
            &subjects.extend,
            &subjects.release,
            &subjects.ack,
        ]);
        Ok((inbox, held))
    }

    /// Moves the commit of a complete run on (asks the savers, or records their answer); true
    /// once the run needs no commit or its commit is durable.
    async fn advance_commit(&mut self) -> bool {
        match self.commit.step(true) {
            CommitStep::Nothing => {}
            CommitStep::Ask => {
                let sink = self.sink.ours().unwrap_or_default().to_string();
                tracing::info!(run = %self.index.run_id, "run {} is complete: asking a saver to commit it into sink {}", self.index.run_id, escaped(&sink));
                let request = CommitRequest {
                    v: VERSION,
                    run: self.index.run_id.clone(),
                    sink,
                    job: self.fingerprint.clone(),
                    spec: serde_json::to_value(&self.job).expect("a job serialises: plain fields"),
                    input: self.index.input.clone(),
                    chunk_size: self.index.chunk_size,
                    chunks: self.ledger.len() as u32,
                    objects: self.index.objects,
                };
                let (client, subject) = (self.client.clone(), self.subjects.commit.clone());
                let (done, stop) = (self.committed.0.clone(), self.markers.clone());
                tokio::spawn(crate::commit::ask(client, subject, request, done, stop));
                self.commit.asked();
            }
            CommitStep::Record => match self.store.record(&[Entry::Committed]).await {
                Ok(()) => {
                    self.health.succeeded(&self.metrics);
                    self.commit.recorded_committed();
                    tracing::info!(run = %self.index.run_id, "run {} is committed", self.index.run_id);
                }
                Err(e) => self.health.failed(&e, &self.metrics, "the run's commit waits to be recorded"),
            },
        }
        self.commit.settled()
    }

    /// After serving: the last replies and events leave, then the summary (or the error).
    async fn wind_down(mut self, outcome: Result<(), FetcherError>) -> Result<RunSummary, FetcherError> {
        self.markers.cancel();
        // Make sure the last replies (acks, "done") leave before we go.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
        // Pipeline events still queued get a short grace (the completion is usually among them).
        std::mem::replace(&mut self.events, Publisher::off()).close(Duration::from_secs(2)).await;
        self.progress.finish();
        outcome?;
        let summary = self.summary();
        if !self.completed_logged {
            tracing::info!("{summary}");
        }
        Ok(summary)
    }

    fn malformed(&mut self, message: &Message, error: &dyn std::fmt::Display) {
        self.metrics.common.malformed(&message.subject);
        if let Some(held) = self.warnings.allow(&message.subject, Instant::now()) {
            let error = error.to_string();
            tracing::warn!(
                subject = %message.subject,
                "ignoring message on {}: {}{}",
                message.subject,
                escaped(&error),
                held_back(held, WARN_INTERVAL)
            );
        }
    }

    /// A warning about a peer, rate-limited per `key`.
    fn warn_peer(&mut self, key: &str, line: impl FnOnce() -> String) {
        if let Some(held) = self.warnings.allow(key, Instant::now()) {
            tracing::warn!("{}{}", line(), held_back(held, WARN_INTERVAL));
        }
    }

    async fn reply(&self, to: &Subject, body: bytes::Bytes) {
        if let Err(e) = self.client.publish(to.clone(), body).await {
            tracing::warn!("cannot reply on {to}: {e}");
        }
    }

    /// Whether to answer requests now: always with a file lock; with `--ledger kv` only while the
    /// lock is known to be held (another fetcher may take an expired one). What is not answered
    /// is asked again by its sender.
    fn serving(&mut self) -> bool {
        let held = self.lock.as_ref().is_none_or(|lock| lock.held(Instant::now()));
        if !held {
            if self.unserved == 0 {
                tracing::warn!(
                    "not serving: the fetcher lock is not refreshed (NATS or JetStream unreachable); requests wait until it is held again"
                );
            }
            self.unserved += 1;
            self.health.ready.store(false, Ordering::Relaxed);
        } else if self.unserved > 0 {
            tracing::info!("the fetcher lock is held again; serving ({} requests were left unanswered)", self.unserved);
            self.unserved = 0;
        }
        held
    }

    async fn on_tick(&mut self) {
        let serving = self.serving();
        self.health.ready.store(serving && self.health.ok(), Ordering::Relaxed);
        if !serving {
            return;
        }
        if !self.dying.is_empty() || !self.unwritten_records.is_empty() {
            self.retry_store().await;
        }
        let now = Instant::now();
        let mut silent = HashSet::new();
        for (chunk, lease) in self.ledger.expire(now) {
            // Summed into one line per interval by the progress report.
            tracing::debug!(
                chunk = chunk.0,
                "lease of chunk {chunk} (attempt {}) held by {} expired",
                lease.attempt,
                escaped(&lease.mapper)
            );
            self.progress.expired(chunk.0, &lease.mapper);
            let (deaths, objects) = (self.ledger.deaths(chunk), self.index.chunks[chunk.index()].objects);
            let verdict = self.suspects.expired(chunk, lease.id, deaths, objects);
            self.act_on(chunk, verdict).await;
            silent.insert(lease.mapper);
        }
        self.drop_waiters_of(&silent).await;
        self.serve_waiters().await;
        for waiter in self.waiters.expired(now) {
            self.reply(&waiter.reply, protocol::encode_status_reply(WorkReplyKind::Idle, 0, None)).await;
        }
        self.progress.observe(&self.ledger, now);
        let eta = self.progress.eta(&self.ledger, now);
        self.metrics.sync(&self.ledger, eta);
        let (able, unable) = self.fleet.asking(now);
        self.metrics.mappers(able, unable);
        if self.commit.committing(self.is_complete()) && self.warnings.allow("committing", now).is_some() {
            tracing::info!(run = %self.index.run_id, "run {} is complete: committing (waiting for a saver to commit it)", self.index.run_id);
        }
        if !self.ledger.is_complete() {
            let note = self.nobody_can(now);
            if let Some(note) = &note {
                if self.warnings.allow("nobody_can", now).is_some() {
                    tracing::warn!("{note}: start mappers that can run it (mapper --command NAME=PROGRAM, or a mapper binary with the Rust transform)");
                }
            }
            self.progress.tick(&self.index.run_id, &self.ledger, now, note.as_deref());
        }
    }

    async fn on_complete(&mut self) {
        for waiter in self.waiters.take_all() {
            self.reply(&waiter.reply, protocol::encode_status_reply(WorkReplyKind::Done, 1000, None)).await;
        }
        if !self.completed_logged {
            self.completed_logged = true;
            self.metrics.sync(&self.ledger, None);
            self.metrics.complete();
            self.progress.report(&self.index.run_id, &self.ledger, Instant::now(), true, None);
            self.progress.finish();
            let summary = self.summary();
            tracing::info!(run = %self.index.run_id, "{summary}");
            if !self.complete_at_start {
                let body = EventBody::Completed {
                    chunks: summary.chunks,
                    objects: summary.objects,
                    duration_ms: summary.elapsed.as_millis() as u64,
                    dead_chunks: summary.dead,
                    dead_objects: summary.stats.objects_dead,
                    bad_records: summary.bad_records,
                };
                self.events.emit(Event::new(&self.index.run_id, body));
            }
        }
    }
}
