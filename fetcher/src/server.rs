//! The task that owns the ledger and answers every request about it: work (leases), job,
//! extend, release and ack. Requests are handled one at a time, so the ledger needs no lock and
//! every decision sees the latest state. Anything that must wait on the network (publishing
//! events, saving dead-letter records into the sink) is handed to other tasks.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, Message, Subject};
use common::backoff::Backoff;
use common::events::{Event, EventBody};
use common::input::{ChunkReader, InputError, InputIndex, ReadErrorKind};
use common::protocol::{
    self, AckReply, AckRequest, AckVerdict, ChunkHead, ChunkId, ChunksHead, CommitRequest, ExtendReply, ExtendRequest,
    JobReply, JobRequest, ProtocolError, ReleaseReason, ReleaseReply, ReleaseRequest, ResultHead, ResultReply,
    ResultStatus, Subjects, WorkReplyKind, WorkRequest, VERSION,
};
use common::text::{escaped, held_back, RateLimit};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use transform::Job;

use crate::commit::{CommitState, CommitStep};
use crate::config::Config;
use crate::events::Publisher;
use crate::kv_lock::LockStatus;
use crate::ledger::{Extension, Ledger, ReleaseOutcome};
use crate::metrics::FetcherMetrics;
use crate::poison::{Suspects, Verdict};
use crate::progress::{milestone, Progress};
use crate::store::{DeadLetter, Entry, LedgerStore, Recovered, StoreHealth};
use crate::{FetcherError, RunSummary};

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
pub struct Io {
    /// The NATS connection.
    pub client: Client,
    /// The fetcher's metrics.
    pub metrics: FetcherMetrics,
    /// Pipeline events.
    pub events: Publisher,
    /// Readiness (`/readyz`).
    pub ready: Arc<AtomicBool>,
    /// The `status` endpoint of the fetcher's NATS micro service (`fetcher status`).
    pub status: Option<async_nats::service::endpoint::Endpoint>,
    /// Status requests of the status page (`/status.json`, [`crate::page`]).
    pub page: crate::page::StatusRequests,
    /// The work subscription made before the scan, with the requests held meanwhile.
    pub early: Option<crate::early::Held>,
}

/// A held work request.
struct Waiter {
    reply: Subject,
    mapper: String,
    max: u32,
    deadline: Instant,
}

/// What [`Server::lease_one`] came to.
enum Leased {
    /// A chunk leased and read; `last` when nothing may follow it in the reply (a suspect).
    Chunk { head: ChunkHead, objects: Vec<u8>, last: bool },
    /// The chunk granted could not be handed out (changed input, dead-lettered): try the next.
    Skipped,
    /// Nothing more for this reply.
    Stop,
}

/// What the fetcher knows about a mapper that asked for work.
struct MapperSeen {
    first: Instant,
    last: Instant,
    able: bool,
    /// Chunks of its leases that were saved and confirmed.
    done: u64,
}

/// The server of one run.
pub struct Server {
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
    waiters: VecDeque<Waiter>,
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
    sink: Option<String>,
    /// Dead-lettered chunks whose record is not in the sink yet: the run completes once a saver
    /// has saved each (see [`Server::send_marker`]).
    unmarked: HashSet<ChunkId>,
    /// Mappers that asked for work, and whether they can run the job.
    mappers: HashMap<String, MapperSeen>,
    /// The `status` endpoint, taken by `serve`.
    status: Option<async_nats::service::endpoint::Endpoint>,
    /// The status page's requests.
    page: crate::page::StatusRequests,
    /// The latest dead letters, for the status (newest last).
    recent_dead: VecDeque<crate::status::DeadLetterStatus>,
    /// Mappers that said they cannot run this run's job (release reason `cannot_run`).
    cannot_run: HashSet<String>,
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
    pub fn new(
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
            waiters: VecDeque::new(),
            completed_logged: false,
            dying: Vec::new(),
            unwritten_records: VecDeque::new(),
            health: StoreHealth::new(ready),
            warnings: RateLimit::new(WARN_INTERVAL),
            lock: store.lock(),
            unserved: 0,
            sink: recovered.sink,
            unmarked,
            mappers: HashMap::new(),
            cannot_run: HashSet::new(),
            markers: CancellationToken::new(),
            suspects: Suspects::new(config.max_attempts),
            early,
            changed: HashMap::new(),
            refused_markers: tokio::sync::mpsc::unbounded_channel(),
            status,
            page,
            recent_dead: VecDeque::new(),
            store,
            config,
        })
    }

    /// Lists a fresh run's skipped input records in the dead-letter record.
    pub async fn record_bad_records(&self) -> Result<(), FetcherError> {
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
    pub fn announce(&mut self, fresh: bool, instance: &str) {
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
        self.ledger.is_complete() && self.unmarked.is_empty()
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
    pub async fn serve(mut self, shutdown: CancellationToken) -> Result<RunSummary, FetcherError> {
        let (mut inbox, held) = self.inbox().await?;
        self.metrics.start(self.index.objects);
        self.health.ready.store(true, Ordering::Relaxed);
        for (message, received) in held {
            if self.serving() {
                self.on_work(message, received).await;
            }
        }
        for chunk in self.unmarked.clone() {
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
                let sink = self.sink.clone().unwrap_or_default();
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

    /// A dead chunk's record the sink refused: the run does not wait for it.
    fn on_refused_marker(&mut self, chunk: ChunkId, error: &str) {
        tracing::error!(
            chunk = chunk.0,
            "the sink refused the record of dead-lettered chunk {chunk} ({}); the run does not wait for it, and verify will report its objects missing",
            escaped(error)
        );
        self.unmarked.remove(&chunk);
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

    /// Answers `fetcher status`.
    async fn on_status(&mut self, request: async_nats::service::Request) {
        let body = common::json::to_vec_own(&self.status());
        if let Err(e) = request.respond(Ok(body.into())).await {
            tracing::debug!("cannot answer a status request: {e}");
        }
    }

    fn status(&self) -> crate::status::Status {
        let now = Instant::now();
        let elapsed = self.progress.elapsed();
        let mut mappers: Vec<crate::status::MapperStatus> = self
            .mappers
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
            dead_letters: self.recent_dead.iter().cloned().collect(),
        }
    }

    fn summary(&self) -> RunSummary {
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

    // -----------------------------------------------------------------------------------------
    // work

    /// Remembers that `mapper` asked, and whether it can run the job; returns that.
    fn saw_mapper(&mut self, mapper: &str, can: &[String]) -> bool {
        let able = can.iter().any(|c| *c == self.job.transform.capability()) && !self.cannot_run.contains(mapper);
        let now = Instant::now();
        if self.mappers.len() >= MAX_MAPPERS && !self.mappers.contains_key(mapper) {
            if let Some(oldest) = self.mappers.iter().min_by_key(|(_, m)| m.last).map(|(n, _)| n.clone()) {
                self.mappers.remove(&oldest);
            }
        }
        let seen =
            self.mappers.entry(mapper.to_string()).or_insert(MapperSeen { first: now, last: now, able, done: 0 });
        (seen.last, seen.able) = (now, able);
        able
    }

    /// Mappers that asked recently: (able to run the job, unable).
    fn asking(&self, now: Instant) -> (usize, usize) {
        let recent = self.mappers.values().filter(|m| now.duration_since(m.last) < ASKING);
        recent.fold((0, 0), |(able, unable), m| if m.able { (able + 1, unable) } else { (able, unable + 1) })
    }

    /// The progress line's note when mappers ask but none can run the job: never a silent hang.
    fn nobody_can(&self, now: Instant) -> Option<String> {
        match self.asking(now) {
            (0, unable) if unable > 0 => Some(format!(
                "{unable} mapper{} asking, none offers {}",
                if unable == 1 { "" } else { "s" },
                self.job.transform.describe()
            )),
            _ => None,
        }
    }

    /// A work request that came at `received` (earlier than now if it was held during the scan):
    /// its wait runs from then.
    async fn on_work(&mut self, message: Message, received: Instant) {
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
            let why = if self.cannot_run.contains(&request.mapper) {
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
            } else if self.waiters.len() >= MAX_HELD {
                self.metrics.refused("held_requests_full");
                self.warn_peer("held_requests_full", || {
                    format!("{MAX_HELD} work requests are held already; answering idle at once (a flood, or a fleet far larger than expected)")
                });
                self.reply(&waiter.reply, protocol::encode_status_reply(WorkReplyKind::Idle, 200, None)).await;
            } else {
                self.waiters.push_back(waiter);
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
    async fn drop_waiters_of(&mut self, silent: &HashSet<String>) {
        if silent.is_empty() {
            return;
        }
        let (stale, live): (VecDeque<Waiter>, VecDeque<Waiter>) =
            std::mem::take(&mut self.waiters).into_iter().partition(|w| silent.contains(&w.mapper));
        self.waiters = live;
        for waiter in stale {
            self.reply(&waiter.reply, protocol::encode_status_reply(WorkReplyKind::Idle, 0, None)).await;
        }
    }

    async fn serve_waiters(&mut self) {
        while let Some(waiter) = self.waiters.pop_front() {
            if !self.hand_out(&waiter).await {
                self.waiters.push_front(waiter);
                break;
            }
        }
    }

    async fn on_job(&mut self, message: Message) {
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

    // -----------------------------------------------------------------------------------------
    // leases

    async fn on_extend(&mut self, message: Message) {
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

    async fn on_release(&mut self, message: Message) {
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
                if self.cannot_run.len() < MAX_MAPPERS && self.cannot_run.insert(request.mapper.clone()) {
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
    async fn act_on(&mut self, chunk: ChunkId, verdict: Verdict) {
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

    // -----------------------------------------------------------------------------------------
    // acks

    async fn on_ack(&mut self, message: Message) {
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
            if let (Some(AckVerdict::Done), Some(seen)) =
                (verdicts.last(), holder.and_then(|mapper| self.mappers.get_mut(&mapper)))
            {
                seen.done += 1;
            }
            if verdicts.last() != Some(&AckVerdict::Unknown) {
                self.unmarked.remove(&ack.chunk);
                self.suspects.settled(ack.chunk);
            }
        }
        verdicts
    }

    // -----------------------------------------------------------------------------------------
    // dead letters

    /// Dead-letters a chunk that can never be handed out.
    async fn dead_letter(&mut self, chunk: ChunkId, error: &str) {
        self.ledger.give_up(chunk);
        self.record_dead(chunk, error).await;
    }

    /// Records a chunk the ledger gave up on ([`crate::ledger::ChunkState::Dying`]) durably,
    /// then marks it dead and sends its record to the sink; if the store fails, the chunk stays
    /// dying and is retried every tick.
    async fn record_dead(&mut self, chunk: ChunkId, error: &str) {
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
        self.unmarked.insert(chunk);
        self.send_marker(chunk, error.to_string());
        let body = EventBody::ChunkDead {
            chunk,
            reason: error.to_string(),
            first_line: span.first_line,
            objects: u64::from(span.objects),
        };
        self.events.emit(Event::new(&self.index.run_id, body));
        if self.recent_dead.len() == crate::status::DEAD_LETTERS_SHOWN {
            self.recent_dead.pop_front();
        }
        self.recent_dead.push_back(crate::status::DeadLetterStatus {
            chunk,
            first_line: span.first_line,
            objects: u64::from(span.objects),
            reason: error.to_string(),
        });
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
    fn send_marker(&self, chunk: ChunkId, error: String) {
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
    async fn retry_store(&mut self) {
        for (chunk, error) in std::mem::take(&mut self.dying) {
            self.record_dead(chunk, &error).await;
        }
        self.write_records().await;
    }

    // -----------------------------------------------------------------------------------------
    // time

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
        while self.waiters.front().is_some_and(|w| w.deadline <= now) {
            if let Some(waiter) = self.waiters.pop_front() {
                self.reply(&waiter.reply, protocol::encode_status_reply(WorkReplyKind::Idle, 0, None)).await;
            }
        }
        self.progress.observe(&self.ledger, now);
        let eta = self.progress.eta(&self.ledger, now);
        self.metrics.sync(&self.ledger, eta);
        let (able, unable) = self.asking(now);
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
        while let Some(waiter) = self.waiters.pop_front() {
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
