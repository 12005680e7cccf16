//! The fetcher: the one process that owns a run. It scans the input into chunks (byte ranges,
//! never the objects themselves), keeps the [`ledger::Ledger`], hands a chunk to a mapper only
//! when that mapper asks, takes leases back when their mapper goes silent, and marks a chunk done
//! only when a saver acknowledges it as durably saved.
//!
//! Everything runs on one task that owns the ledger: requests are handled one at a time, so the
//! ledger needs no lock and every decision sees the latest state.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod config;
pub mod events;
pub mod generate;
pub mod kv_lock;
pub mod ledger;
pub mod metrics;
pub mod progress;
pub mod store;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, Message, Subject};
use common::events::{Event, EventBody};
use common::input::{ChunkReader, InputError, InputIndex};
use common::protocol::{
    self, AckReply, AckRequest, AckVerdict, ChunkLease, ExtendReply, ExtendRequest, ReleaseReason, ReleaseReply,
    ReleaseRequest, Subjects, WorkReplyKind, WorkRequest, VERSION,
};
use common::text::{escaped, held_back, RateLimit};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

pub use config::{BadRecords, Config};
use events::Publisher;
use ledger::{Ledger, LedgerStats, ReleaseOutcome};
use metrics::FetcherMetrics;
use progress::Progress;
use store::{Entry, FileStore, KvStore, LedgerStore};

/// Longest a work request is held when nothing is pending (the mapper asks again after that).
const MAX_WAIT: Duration = Duration::from_secs(5);
/// How often leases and held requests are checked.
const TICK: Duration = Duration::from_millis(50);
/// Most work requests held at once (long polls); more are answered `idle` at once. Far above any
/// real fleet (each mapper holds one), it bounds what a flood of requests can make us keep.
const MAX_HELD: usize = 1024;
/// Repeated warnings about what peers send: one line per kind per interval, with a count.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Why the fetcher stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum FetcherError {
    /// No `--input`.
    #[error("no input file: pass --input FILE or set FETCHER_INPUT")]
    NoInput,
    /// The input cannot be read.
    #[error(transparent)]
    Input(#[from] InputError),
    /// Invalid records under `--bad-records fail`.
    #[error("input file {path} has {count} invalid record(s):\n{listing}\nfix them, or pass --bad-records skip to process the rest (the skipped ones are logged with their lines)")]
    BadRecords {
        /// The input file.
        path: String,
        /// How many.
        count: usize,
        /// The first few, one per line.
        listing: String,
    },
    /// NATS connection set-up failed.
    #[error(transparent)]
    Connect(#[from] common::nats::ConnectError),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] common::metrics::ServeError),
    /// The durable ledger cannot be used.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// A subscription could not be made.
    #[error("cannot subscribe to {subject}: {source}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// Why.
        source: async_nats::SubscribeError,
    },
    /// The scan task died.
    #[error("the input scan failed: {0}")]
    Scan(String),
    /// The single-fetcher lock went to another fetcher (`--ledger kv`).
    #[error("{0}")]
    LockLost(String),
}

/// What a run did, returned when the fetcher stops.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Run id.
    pub run_id: String,
    /// Chunks in the run.
    pub chunks: u64,
    /// Valid input objects.
    pub objects: u64,
    /// Chunks done.
    pub done: u64,
    /// Chunks dead-lettered.
    pub dead: u64,
    /// Input records skipped as invalid.
    pub bad_records: u64,
    /// Ledger counters.
    pub stats: LedgerStats,
    /// Wall time from start (after the scan) to the end.
    pub elapsed: Duration,
    /// Every chunk done or dead-lettered.
    pub complete: bool,
}

impl std::fmt::Display for RunSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-6);
        write!(
            f,
            "run {} {}: {}/{} chunks done, {} objects in {:.2}s ({:.0} objects/s), {} chunks dead-lettered, {} objects dead-lettered, {} bad input records skipped, {} leases granted, {} re-leases, {} expiries, acks: {} done ({} late), {} duplicate, {} unknown",
            self.run_id,
            if self.complete { "complete" } else { "stopped" },
            self.done,
            self.chunks,
            self.objects,
            secs,
            self.objects as f64 / secs,
            self.dead,
            self.stats.objects_dead,
            self.bad_records,
            self.stats.leases_granted,
            self.stats.re_leases,
            self.stats.expiries,
            self.stats.acks_done,
            self.stats.acks_late,
            self.stats.acks_duplicate,
            self.stats.acks_unknown,
        )
    }
}

/// Scans the input and applies the bad-records policy.
pub async fn load_input(config: &Config) -> Result<InputIndex, FetcherError> {
    let path = config.input.clone().ok_or(FetcherError::NoInput)?;
    let chunk_size = config.chunk_size;
    let check_duplicates = !config.no_duplicate_check;
    let index = tokio::task::spawn_blocking(move || common::input::scan_with(&path, chunk_size, check_duplicates))
        .await
        .map_err(|e| FetcherError::Scan(e.to_string()))??;
    if index.bom {
        tracing::info!("input {} starts with a UTF-8 byte-order mark; skipped", index.path.display());
    }
    if !index.bad.is_empty() {
        let listing: String = index
            .bad
            .iter()
            .take(20)
            .map(|b| format!("  line {}: {}\n", b.line, b.error))
            .chain((index.bad.len() > 20).then(|| format!("  ... and {} more\n", index.bad.len() - 20)))
            .collect();
        match config.bad_records {
            BadRecords::Fail => {
                return Err(FetcherError::BadRecords {
                    path: index.path.display().to_string(),
                    count: index.bad.len(),
                    listing: listing.trim_end().to_string(),
                })
            }
            BadRecords::Skip => {
                for bad in &index.bad {
                    tracing::warn!(
                        line = bad.line,
                        "skipping invalid record in {}, line {}: {}",
                        index.path.display(),
                        bad.line,
                        bad.error
                    );
                }
            }
        }
    }
    Ok(index)
}

/// Runs the fetcher until the run completes (with `exit_when_done`) or `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<RunSummary, FetcherError> {
    let name = config.nats.instance_name("fetcher");
    let metrics = FetcherMetrics::new();
    let (connection, ready) = common::metrics::start(&config.metrics_addr, &metrics.common, &shutdown).await?;
    let client =
        common::nats::connect(&config.nats, &format!("chunkmill-fetcher {name}"), &connection, &shutdown).await?;
    let index = load_input(&config).await?;
    tracing::info!(
        run = %index.run_id,
        "input {}: {} objects in {} chunks of up to {} ({} invalid records skipped)",
        index.path.display(),
        index.objects,
        index.chunks.len(),
        index.chunk_size,
        index.bad.len()
    );
    let (store, recovered) = match config.ledger {
        config::LedgerKind::File => {
            let (store, recovered) = FileStore::open(&config.state_dir, &index.run_id)?;
            (LedgerStore::File(store), recovered)
        }
        config::LedgerKind::Kv => {
            let (store, recovered) =
                KvStore::open(&client, &config.kv_bucket, &index.run_id, &name, config.lock_ttl).await?;
            (LedgerStore::Kv(Box::new(store)), recovered)
        }
    };
    let fresh = recovered.done.is_empty() && recovered.dead.is_empty();
    let events = match config.events {
        config::Events::On => Publisher::start(client.clone(), config.nats.subject_prefix.clone()),
        config::Events::Off => Publisher::off(),
    };
    let io = Io { client, metrics, events, ready };
    let mut fetcher = Fetcher::new(config, index, io, store, recovered)?;
    if fresh {
        fetcher.record_bad_records().await?;
    }
    fetcher.announce(fresh, &name);
    fetcher.serve(shutdown).await
}

/// What the fetcher talks through: NATS, its metrics, the events queue and its readiness flag.
struct Io {
    client: Client,
    metrics: FetcherMetrics,
    events: Publisher,
    ready: Arc<AtomicBool>,
}

struct Waiter {
    reply: Subject,
    mapper: String,
    deadline: Instant,
}

struct Fetcher {
    config: Config,
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
    dying: Vec<(u32, String)>,
    /// Dead-letter records for people that could not be written yet: retried every tick.
    unwritten_records: VecDeque<serde_json::Value>,
    /// Whether the durable store works, for readiness, a metric and one log line per outage.
    health: StoreHealth,
    /// Rate limit for warnings about what peers send.
    warnings: RateLimit,
    /// The single-fetcher lock, when it can be lost (`--ledger kv`): while it is not known to be
    /// held, nothing is answered.
    lock: Option<Arc<kv_lock::LockStatus>>,
    /// Messages dropped because the lock was not held, for one log line per lapse.
    unserved: u64,
}

/// Tracks failures of the durable store. While it fails, the fetcher answers no ack (the savers
/// resend), reports not-ready, and says so once, then every 30 s with a count; it resumes by
/// itself when a write succeeds again (space freed, say).
struct StoreHealth {
    ready: Arc<AtomicBool>,
    failing_since: Option<Instant>,
    failures: u64,
    last_reminder: Instant,
}

impl StoreHealth {
    fn failed(&mut self, error: &store::StoreError, metrics: &FetcherMetrics, what: &str) {
        metrics.store_failed();
        self.failures += 1;
        self.ready.store(false, Ordering::Relaxed);
        let now = Instant::now();
        match self.failing_since {
            None => {
                self.failing_since = Some(now);
                self.last_reminder = now;
                tracing::error!(
                    "{error}; {what}. The fetcher reports not-ready and resumes by itself once the store can be written (free space in --state-dir, or bring JetStream back)"
                );
            }
            Some(since) if now.duration_since(self.last_reminder) >= Duration::from_secs(30) => {
                self.last_reminder = now;
                tracing::error!(
                    "the ledger store still fails ({} failed writes in {:.0} s): {error}",
                    self.failures,
                    now.duration_since(since).as_secs_f64()
                );
            }
            Some(_) => {}
        }
    }

    fn succeeded(&mut self, metrics: &FetcherMetrics) {
        if let Some(since) = self.failing_since.take() {
            tracing::info!(
                "the ledger store works again after {} failed writes in {:.1} s; serving acks again",
                self.failures,
                since.elapsed().as_secs_f64()
            );
            self.failures = 0;
            metrics.store_recovered();
        }
    }
}

/// The progress milestone (0, 10, ... 90) that `finished` of `total` chunks has passed; 100 % is
/// not a milestone (the run's completion is announced instead).
fn milestone(finished: u64, total: u64) -> u32 {
    if total == 0 {
        return 0;
    }
    ((finished * 100 / total) as u32 / 10 * 10).min(90)
}

impl Fetcher {
    fn new(
        config: Config,
        index: InputIndex,
        io: Io,
        store: LedgerStore,
        recovered: store::Recovered,
    ) -> Result<Self, FetcherError> {
        let Io { client, metrics, events, ready } = io;
        let reader = ChunkReader::open(&index)?;
        let mut ledger = Ledger::new(index.chunks.iter().map(|c| c.objects).collect());
        let fresh = recovered.done.is_empty() && recovered.dead.is_empty();
        for chunk in &recovered.done {
            ledger.mark_done(*chunk);
        }
        for chunk in &recovered.dead {
            ledger.dead_letter(*chunk);
        }
        if !fresh {
            tracing::info!(
                run = %index.run_id,
                "resuming run {} from {}: {} chunks already done, {} dead-lettered, {} to go",
                index.run_id,
                match config.ledger {
                    config::LedgerKind::File => config.state_dir.display().to_string(),
                    config::LedgerKind::Kv => format!("JetStream bucket {}", config.kv_bucket),
                },
                ledger.done(),
                ledger.dead(),
                ledger.pending()
            );
        }
        let finished = ledger.done() + ledger.dead();
        Ok(Fetcher {
            milestone: milestone(finished, ledger.len() as u64),
            complete_at_start: ledger.is_complete(),
            events,
            subjects: Subjects::new(&config.nats.subject_prefix),
            progress: Progress::new(index.objects).with_bar_on_terminal(index.chunks.len() as u64),
            config,
            client,
            metrics,
            index,
            reader,
            ledger,
            waiters: VecDeque::new(),
            completed_logged: false,
            dying: Vec::new(),
            unwritten_records: VecDeque::new(),
            health: StoreHealth { ready, failing_since: None, failures: 0, last_reminder: Instant::now() },
            warnings: RateLimit::new(WARN_INTERVAL),
            lock: store.lock(),
            unserved: 0,
            store,
        })
    }

    /// Lists a fresh run's skipped input records in the dead-letter record.
    async fn record_bad_records(&self) -> Result<(), FetcherError> {
        for bad in &self.index.bad {
            let record = serde_json::json!({
                "kind": "bad_record", "run": self.index.run_id, "input": self.index.path.display().to_string(),
                "line": bad.line, "error": bad.error,
            });
            self.store.dead_letter(&record).await?;
        }
        if !self.index.bad.is_empty() {
            tracing::warn!("{} invalid input records listed in {}", self.index.bad.len(), self.store.dead_letters());
        }
        Ok(())
    }

    /// Announces a fresh run as `started`, or an unfinished one picked up again as `resumed`.
    fn announce(&mut self, fresh: bool, instance: &str) {
        let run = &self.index.run_id;
        let body = if fresh {
            EventBody::Started {
                objects: self.index.objects,
                chunks: self.ledger.len() as u64,
                chunk_size: self.index.chunk_size,
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

    async fn serve(mut self, shutdown: CancellationToken) -> Result<RunSummary, FetcherError> {
        let mut work = self.subscribe(&self.subjects.work).await?;
        let mut extend = self.subscribe(&self.subjects.extend).await?;
        let mut release = self.subscribe(&self.subjects.release).await?;
        let mut ack = self.subscribe(&self.subjects.ack).await?;
        self.metrics.start(self.index.objects);
        let subjects = &self.subjects;
        self.metrics.common.watch_subjects(&[&subjects.work, &subjects.extend, &subjects.release, &subjects.ack]);
        self.health.ready.store(true, Ordering::Relaxed);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let lost = self.lock.as_ref().map(|lock| lock.lost().clone()).unwrap_or_default();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = lost.cancelled() => {
                    let why = self.lock.as_ref().map(|lock| lock.why()).unwrap_or_default();
                    return Err(FetcherError::LockLost(why));
                }
                Some(message) = ack.next() => if self.serving() { self.on_ack(message).await },
                Some(message) = extend.next() => if self.serving() { self.on_extend(message).await },
                Some(message) = release.next() => if self.serving() { self.on_release(message).await },
                Some(message) = work.next() => if self.serving() { self.on_work(message).await },
                _ = tick.tick() => self.on_tick().await,
            }
            self.check_milestone();
            if self.ledger.is_complete() {
                self.on_complete().await;
                if self.config.exit_when_done {
                    break;
                }
            }
        }
        // Make sure the last replies (acks, "done") leave before we go.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
        // Pipeline events still queued get a short grace (the completion is usually among them).
        std::mem::replace(&mut self.events, Publisher::off()).close(Duration::from_secs(2)).await;
        self.progress.finish();
        let summary = self.summary();
        if !self.completed_logged {
            tracing::info!("{summary}");
        }
        Ok(summary)
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
            complete: self.ledger.is_complete(),
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

    async fn on_work(&mut self, message: Message) {
        let request: WorkRequest = match protocol::decode_bounded(&message.payload) {
            Ok(r) => r,
            Err(e) => return self.malformed(&message, &e),
        };
        let Some(reply) = message.reply.clone() else {
            return self.malformed(&message, &"work request without a reply subject");
        };
        if self.ledger.is_complete() {
            return self.reply(&reply, protocol::encode_status_reply(WorkReplyKind::Done, 1000)).await;
        }
        let wait = Duration::from_millis(request.wait_ms).min(MAX_WAIT);
        let waiter = Waiter { reply, mapper: request.mapper, deadline: Instant::now() + wait };
        if !self.hand_out(&waiter).await {
            if wait.is_zero() {
                self.reply(&waiter.reply, protocol::encode_status_reply(WorkReplyKind::Idle, 200)).await;
            } else if self.waiters.len() >= MAX_HELD {
                self.metrics.refused("held_requests_full");
                self.warn_peer("held_requests_full", || {
                    format!("{MAX_HELD} work requests are held already; answering idle at once (a flood, or a fleet far larger than expected)")
                });
                self.reply(&waiter.reply, protocol::encode_status_reply(WorkReplyKind::Idle, 200)).await;
            } else {
                self.waiters.push_back(waiter);
            }
        }
    }

    /// Leases the next pending chunk to `waiter`; false if none is pending.
    async fn hand_out(&mut self, waiter: &Waiter) -> bool {
        let max_payload = common::nats::max_payload(&self.client);
        loop {
            let Some(grant) = self.ledger.lease(&waiter.mapper, Instant::now(), self.config.lease_timeout) else {
                return false;
            };
            let span = self.index.chunks[grant.chunk as usize];
            let objects = match self.reader.read(&span) {
                Ok(objects) => objects,
                Err(e) => {
                    tracing::error!(chunk = grant.chunk, "cannot read chunk {}: {e}; dead-lettering it", grant.chunk);
                    self.dead_letter(grant.chunk, &e.to_string()).await;
                    continue;
                }
            };
            let lease = ChunkLease {
                run: self.index.run_id.clone(),
                chunk: u64::from(grant.chunk),
                lease: grant.lease,
                attempt: grant.attempt,
                lease_ms: self.config.lease_timeout.as_millis() as u64,
                first_line: span.first_line,
            };
            let body = protocol::encode_chunk_reply(&lease, &objects);
            if body.len() > max_payload {
                tracing::error!(
                    chunk = grant.chunk,
                    "chunk {} (input line {}) is {} bytes, over the NATS server's max_payload of {max_payload} bytes; dead-lettering it. Lower --chunk-size or raise max_payload",
                    grant.chunk,
                    span.first_line,
                    body.len()
                );
                let error =
                    format!("chunk is {} bytes, over the NATS server's max_payload of {max_payload} bytes", body.len());
                self.dead_letter(grant.chunk, &error).await;
                continue;
            }
            if grant.attempt > 1 {
                tracing::info!(
                    chunk = grant.chunk,
                    attempt = grant.attempt,
                    "re-leasing chunk {} to {} (attempt {})",
                    grant.chunk,
                    escaped(&waiter.mapper),
                    grant.attempt
                );
            }
            self.reply(&waiter.reply, body.into()).await;
            return true;
        }
    }

    async fn on_extend(&mut self, message: Message) {
        let request: ExtendRequest = match protocol::decode_bounded(&message.payload) {
            Ok(r) => r,
            Err(e) => return self.malformed(&message, &e),
        };
        let now = Instant::now();
        let ttl = self.config.lease_timeout;
        let valid = request
            .leases
            .iter()
            .map(|l| u32::try_from(l.chunk).is_ok_and(|c| self.ledger.extend(c, l.lease, now, ttl)))
            .collect();
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
        let outcome = match u32::try_from(request.lease.chunk) {
            Ok(chunk) => self.ledger.release(chunk, request.lease.lease, failed, self.config.max_attempts),
            Err(_) => ReleaseOutcome::NotCurrent,
        };
        let chunk = request.lease.chunk;
        let error = request.error.as_deref().unwrap_or("no reason given");
        let mapper = escaped(&request.mapper);
        match outcome {
            ReleaseOutcome::Requeued if failed => {
                tracing::warn!(chunk, "chunk {chunk} failed on {mapper}: {}; it will be retried", escaped(error))
            }
            ReleaseOutcome::Requeued => {
                tracing::info!(chunk, "chunk {chunk} handed back by {mapper} (shutting down)")
            }
            ReleaseOutcome::DeadLettered => {
                tracing::error!(
                    chunk,
                    "chunk {chunk} failed {} times, last on {mapper}: {}; dead-lettered",
                    self.config.max_attempts,
                    escaped(error)
                );
                self.record_dead(chunk as u32, error).await;
            }
            ReleaseOutcome::NotCurrent => tracing::debug!(chunk, "release of a lease that is no longer current"),
        }
        if let Some(reply) = &message.reply {
            let accepted = outcome != ReleaseOutcome::NotCurrent;
            self.reply(reply, protocol::encode(&ReleaseReply { v: VERSION, accepted })).await;
        }
        self.serve_waiters().await;
    }

    async fn on_ack(&mut self, message: Message) {
        let request: AckRequest = match protocol::decode_bounded(&message.payload) {
            Ok(r) => r,
            Err(e) => return self.malformed(&message, &e),
        };
        // First what would become done, then make that durable, and only then change the ledger
        // and answer: a chunk is never done in memory before it is done on disk. If the write
        // fails nothing changes and nothing is answered; the saver resends the ack.
        let mut done: Vec<Entry> = Vec::new();
        for ack in &request.acks {
            if ack.run == self.index.run_id && self.ledger.check_ack(ack.chunk, ack.objects) == AckVerdict::Done {
                let entry = Entry::Done(ack.chunk as u32);
                if !done.contains(&entry) {
                    done.push(entry);
                }
            }
        }
        if let Err(e) = self.store.record(&done).await {
            self.health.failed(&e, &self.metrics, "not answering acks until it can; the savers resend them");
            return;
        }
        if !done.is_empty() {
            self.health.succeeded(&self.metrics);
        }
        let verdicts: Vec<AckVerdict> = request
            .acks
            .iter()
            .map(|ack| {
                if ack.run != self.index.run_id {
                    let (saver, run, ours) = (escaped(&request.saver), escaped(&ack.run), &self.index.run_id);
                    if let Some(held) = self.warnings.allow("ack_other_run", Instant::now()) {
                        tracing::warn!(
                            chunk = ack.chunk,
                            "ack from {saver} for run {run}, not this run ({ours}){}",
                            held_back(held, WARN_INTERVAL)
                        );
                    }
                    self.ledger.ack(u64::MAX, ack.lease, ack.objects, ack.dead)
                } else {
                    self.ledger.ack(ack.chunk, ack.lease, ack.objects, ack.dead)
                }
            })
            .collect();
        if let Some(reply) = &message.reply {
            self.reply(reply, protocol::encode(&AckReply { v: VERSION, verdicts })).await;
        }
    }

    /// Dead-letters a chunk that can never be handed out.
    async fn dead_letter(&mut self, chunk: u32, error: &str) {
        self.ledger.give_up(chunk);
        self.record_dead(chunk, error).await;
    }

    /// Records a chunk the ledger gave up on ([`ledger::ChunkState::Dying`]) durably, then
    /// marks it dead; if the store fails, the chunk stays dying and is retried every tick.
    async fn record_dead(&mut self, chunk: u32, error: &str) {
        if let Err(e) = self.store.record(&[Entry::Dead(chunk)]).await {
            self.health.failed(&e, &self.metrics, "a dead-lettered chunk waits to be recorded");
            self.dying.push((chunk, error.to_string()));
            return;
        }
        self.health.succeeded(&self.metrics);
        self.ledger.dead_letter(chunk);
        let span = self.index.chunks[chunk as usize];
        let ids: Vec<String> = self
            .reader
            .read_array(&span)
            .ok()
            .and_then(|array| {
                #[derive(serde::Deserialize)]
                struct Id {
                    uuid: Option<String>,
                }
                serde_json::from_slice::<Vec<Id>>(&array).ok()
            })
            .map(|ids| ids.into_iter().filter_map(|i| i.uuid).collect())
            .unwrap_or_default();
        let record = serde_json::json!({
            "kind": "chunk", "run": self.index.run_id, "chunk": chunk, "first_line": span.first_line,
            "objects": span.objects, "ids": ids, "error": error,
        });
        self.unwritten_records.push_back(record);
        self.write_records().await;
        let body = EventBody::ChunkDead {
            chunk: u64::from(chunk),
            reason: error.to_string(),
            first_line: span.first_line,
            objects: u64::from(span.objects),
        };
        self.events.emit(Event::new(&self.index.run_id, body));
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
        self.health.ready.store(serving && self.health.failing_since.is_none(), Ordering::Relaxed);
        if !serving {
            return;
        }
        if !self.dying.is_empty() || !self.unwritten_records.is_empty() {
            self.retry_store().await;
        }
        let now = Instant::now();
        for (chunk, lease) in self.ledger.expire(now) {
            tracing::warn!(
                chunk,
                "lease of chunk {chunk} (attempt {}) held by {} expired; it will be handed out again",
                lease.attempt,
                escaped(&lease.mapper)
            );
        }
        self.serve_waiters().await;
        while self.waiters.front().is_some_and(|w| w.deadline <= now) {
            if let Some(waiter) = self.waiters.pop_front() {
                self.reply(&waiter.reply, protocol::encode_status_reply(WorkReplyKind::Idle, 0)).await;
            }
        }
        let eta = self.progress.eta(&self.ledger, now);
        self.metrics.sync(&self.ledger, eta);
        if !self.ledger.is_complete() {
            if let Some(line) = self.progress.line(&self.ledger, now, false) {
                tracing::info!("{line}");
            }
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

    async fn on_complete(&mut self) {
        while let Some(waiter) = self.waiters.pop_front() {
            self.reply(&waiter.reply, protocol::encode_status_reply(WorkReplyKind::Done, 1000)).await;
        }
        if !self.completed_logged {
            self.completed_logged = true;
            self.metrics.sync(&self.ledger, None);
            self.metrics.complete();
            if let Some(line) = self.progress.line(&self.ledger, Instant::now(), true) {
                tracing::info!("{line}");
            }
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

#[cfg(test)]
mod tests {
    use super::milestone;

    #[test]
    fn milestones_are_tens_below_a_hundred() {
        assert_eq!(milestone(0, 200), 0);
        assert_eq!(milestone(19, 200), 0);
        assert_eq!(milestone(20, 200), 10);
        assert_eq!(milestone(199, 200), 90);
        assert_eq!(milestone(200, 200), 90, "100 % is the completion, not a milestone");
        assert_eq!(milestone(1, 3), 30, "a small run jumps straight to the highest milestone passed");
        assert_eq!(milestone(0, 0), 0);
    }
}
