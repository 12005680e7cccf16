//! The saver: takes processed chunks from the `result` subject (in a queue group, so any replica
//! may take any chunk), saves each durably and idempotently through its [`sink::Sink`], then
//! acknowledges it to the fetcher, and only then tells the mapper it is saved.
//!
//! Writes and acknowledgements are batched (group commit): while one batch is being made durable
//! or acknowledged, newly arrived chunks queue up and go together in the next, so the syncs and
//! round trips per chunk fall as load rises.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod config;
pub mod metrics;
pub mod sink;
pub mod verify;

use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, Message};
use common::protocol::{
    self, Ack, AckReply, AckRequest, AckVerdict, ChunkResult, ResultReply, ResultStatus, Subjects, SAVER_QUEUE_GROUP,
    VERSION,
};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
use config::SinkChoice;
use sink::{SaveOutcome, Sink, SinkError};

/// Most acks in one request.
const ACK_BATCH: usize = 256;

/// Why the saver could not start.
#[derive(Debug, thiserror::Error)]
pub enum SaverError {
    /// The sink cannot be opened.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// NATS connection set-up failed.
    #[error(transparent)]
    Connect(#[from] common::nats::ConnectError),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] common::metrics::ServeError),
    /// The subscription could not be made.
    #[error("cannot subscribe to {subject}: {source}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// Why.
        source: async_nats::SubscribeError,
    },
}

/// What the saver did, returned when it stops.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SaverSummary {
    /// Chunks written.
    pub saved: u64,
    /// Chunks that were already saved.
    pub duplicates: u64,
}

type AckSlot = (Ack, oneshot::Sender<Option<AckVerdict>>);
type WriteSlot = (Arc<ChunkResult>, oneshot::Sender<Result<SaveOutcome, SinkError>>);

/// Repeated warnings about what mappers send are logged once per this interval, with a count.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

impl Shared {
    /// Logs `line` at warn unless a line of this `key` was logged within [`WARN_INTERVAL`].
    fn warn_peer(&self, key: &str, line: impl FnOnce() -> String) {
        let allowed = self.warnings.lock().ok().and_then(|mut w| w.allow(key, std::time::Instant::now()));
        if let Some(held) = allowed {
            tracing::warn!("{}{}", line(), common::text::held_back(held, WARN_INTERVAL));
        }
    }
}

/// Most chunks saved with one round of syncs.
const WRITE_BATCH: usize = 128;

struct Shared {
    /// Warnings about what mappers send: one line per kind per interval, with a count.
    warnings: std::sync::Mutex<common::text::RateLimit>,
    client: Client,
    writes: mpsc::Sender<WriteSlot>,
    acks: mpsc::Sender<AckSlot>,
    saved: std::sync::atomic::AtomicU64,
    duplicates: std::sync::atomic::AtomicU64,
    metrics: metrics::SaverMetrics,
}

/// Runs the saver until `shutdown`; in-flight chunks are finished before it returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<SaverSummary, SaverError> {
    let name = config.nats.instance_name("saver");
    let metrics = metrics::SaverMetrics::new();
    // Health first, so a probe sees a live process while it waits for its database.
    let (connection, ready) = common::metrics::start(&config.metrics_addr, &metrics.common, &shutdown).await?;
    let Some(sink) = open_sink(&config, &name, &shutdown).await? else {
        return Ok(SaverSummary::default());
    };
    let client =
        common::nats::connect(&config.nats, &format!("chunkmill-saver {name}"), &connection, &shutdown).await?;
    let subjects = Subjects::new(&config.nats.subject_prefix);
    let mut results = client
        .queue_subscribe(subjects.result.clone(), SAVER_QUEUE_GROUP.to_string())
        .await
        .map_err(|source| SaverError::Subscribe { subject: subjects.result.clone(), source })?;
    tracing::info!("saver {name}: saving to {}", sink.describe());
    metrics.common.watch_subjects(&[&subjects.result]);
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acks, ack_queue) = mpsc::channel(4 * ACK_BATCH);
    let acker = tokio::spawn(acker(client.clone(), subjects.ack.clone(), name.clone(), ack_queue));
    let (writes, write_queue) = mpsc::channel(WRITE_BATCH);
    let writer = tokio::spawn(writer(sink, write_queue, metrics.clone()));
    let shared = Arc::new(Shared {
        warnings: std::sync::Mutex::new(common::text::RateLimit::new(WARN_INTERVAL)),
        client,
        writes,
        acks,
        saved: Default::default(),
        duplicates: Default::default(),
        metrics,
    });
    let limit = Arc::new(Semaphore::new(config.max_in_flight as usize));
    let tracker = TaskTracker::new();
    loop {
        // Take a message only when a slot is free: back-pressure instead of unbounded tasks.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = limit.clone().acquire_owned() => permit,
        };
        let Ok(permit) = permit else { break };
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            message = results.next() => message,
        };
        let Some(message) = message else { break };
        let shared = shared.clone();
        tracker.spawn(async move {
            handle(&shared, message).await;
            drop(permit);
        });
    }
    // Stop taking results (unsaved ones are resent by their mappers), finish the ones in hand.
    let _ = results.unsubscribe().await;
    tracker.close();
    tracker.wait().await;
    let summary = SaverSummary {
        saved: shared.saved.load(std::sync::atomic::Ordering::Relaxed),
        duplicates: shared.duplicates.load(std::sync::atomic::Ordering::Relaxed),
    };
    drop(shared);
    let _ = writer.await;
    let _ = acker.await;
    tracing::info!("saver {name} stopped: {} chunks saved, {} duplicates absorbed", summary.saved, summary.duplicates);
    Ok(summary)
}

async fn handle(shared: &Arc<Shared>, message: Message) {
    let Some(reply_to) = message.reply.clone() else {
        shared.warn_peer("no_reply", || format!("ignoring a result without a reply subject on {}", message.subject));
        return;
    };
    shared.metrics.in_flight.inc();
    let (status, error) = save_and_ack(shared, &message).await;
    shared.metrics.in_flight.dec();
    let error = error.map(|e| protocol::truncate_to(e, protocol::MAX_REASON));
    let reply = ResultReply { v: VERSION, status, error };
    if let Err(e) = shared.client.publish(reply_to, protocol::encode(&reply)).await {
        tracing::warn!("cannot answer the mapper ({e}); it will resend and the save is idempotent");
    }
}

async fn save_and_ack(shared: &Arc<Shared>, message: &Message) -> (ResultStatus, Option<String>) {
    let payload = message.payload.clone();
    // Parse and check off the async threads (100 records); then queue for the group-commit writer.
    let decoded = tokio::task::spawn_blocking(move || -> Result<ChunkResult, String> {
        let result: ChunkResult = protocol::decode_bounded(&payload).map_err(|e| e.to_string())?;
        result.validate().map_err(|e| e.to_string())?;
        Ok(result)
    })
    .await
    .unwrap_or_else(|e| Err(format!("the decode task failed: {e}")));
    let saved = match decoded {
        Err(error) => Err((ResultStatus::Rejected, error)),
        Ok(result) => {
            let result = Arc::new(result);
            let (tx, rx) = oneshot::channel();
            if shared.writes.send((result.clone(), tx)).await.is_err() {
                return (ResultStatus::NotAcked, Some("the saver is stopping".into()));
            }
            match rx.await {
                Ok(Ok(outcome)) => Ok((result, outcome)),
                // Never savable here: refuse, so the chunk ends dead-lettered instead of looping.
                Ok(Err(error @ SinkError::Invalid(_))) => Err((ResultStatus::Rejected, error.to_string())),
                Ok(Err(error)) => Err((ResultStatus::Failed, error.to_string())),
                Err(_) => Err((ResultStatus::Failed, "the writer stopped".to_string())),
            }
        }
    };
    let (result, outcome) = match saved {
        Ok(saved) => saved,
        Err((status, error)) => {
            match status {
                ResultStatus::Rejected => {
                    shared.metrics.common.malformed(&message.subject);
                    shared.warn_peer(&message.subject, || {
                        format!("rejecting a result on {}: {}", message.subject, common::text::escaped(&error))
                    })
                }
                _ => {
                    shared.metrics.failures.inc();
                    tracing::error!("cannot save a result: {error}")
                }
            }
            return (status, Some(error));
        }
    };
    let mut dead = result.dead.len() as u64;
    match outcome {
        SaveOutcome::Saved | SaveOutcome::SavedRefusing(_) => {
            let refused = match outcome {
                SaveOutcome::SavedRefusing(n) => n,
                _ => 0,
            };
            if refused > 0 {
                tracing::warn!(
                    chunk = result.chunk,
                    "chunk {} of run {}: the sink refused {refused} object(s); they are dead-lettered with its reason",
                    result.chunk,
                    result.run
                );
                dead += refused;
            }
            shared.saved.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            shared.metrics.chunks.inc();
            shared.metrics.objects.inc_by((result.records.len() as u64).saturating_sub(refused));
        }
        SaveOutcome::Duplicate => {
            shared.duplicates.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            shared.metrics.duplicates.inc();
        }
    }
    let ack = Ack {
        run: result.run.clone(),
        chunk: result.chunk,
        lease: result.lease,
        attempt: result.attempt,
        objects: result.objects(),
        dead,
    };
    let (tx, rx) = oneshot::channel();
    if shared.acks.send((ack, tx)).await.is_err() {
        return (ResultStatus::NotAcked, Some("the saver is stopping".into()));
    }
    match rx.await.ok().flatten() {
        Some(AckVerdict::Unknown) => {
            // Saved, but the fetcher cannot count it (another run, or a wrong object count from a
            // buggy mapper): refuse, so the mapper gives the lease back as failed and a chunk that
            // can never complete ends dead-lettered instead of looping.
            let error = format!(
                "the fetcher does not accept chunk {} of run {} (another run, or a wrong object count)",
                result.chunk, result.run
            );
            tracing::warn!(chunk = result.chunk, "{error}");
            (ResultStatus::Rejected, Some(error))
        }
        Some(_) => (ResultStatus::Saved, None),
        None => (
            ResultStatus::NotAcked,
            Some(format!("chunk {} is saved but the fetcher did not confirm it", result.chunk)),
        ),
    }
}

/// Opens the configured sink; `None` if shut down while waiting for a database.
async fn open_sink(config: &Config, name: &str, shutdown: &CancellationToken) -> Result<Option<Sink>, SaverError> {
    match &config.sink.sink {
        None | Some(SinkChoice::File) => {
            let out = config.out.clone();
            let sink = tokio::task::spawn_blocking(move || sink::file::FileSink::open(out)).await.map_err(|e| {
                SinkError::Io { action: "open", path: config.out.clone(), source: std::io::Error::other(e) }
            })??;
            Ok(Some(Sink::File(Arc::new(sink))))
        }
        Some(SinkChoice::Unknown) => Err(SinkError::Config(config::UNKNOWN_SINK.into()).into()),
        Some(SinkChoice::Postgres(url)) => {
            let password = config.sink.password().map_err(|e| SinkError::Config(e.to_string()))?;
            let options = sink::postgres::PgOptions {
                url: url.clone(),
                password,
                pool_size: config.pg_pool as usize,
                saver: name.to_string(),
            };
            Ok(sink::postgres::PgSink::connect(options, shutdown).await?.map(Sink::Postgres))
        }
    }
}

/// Saves queued results in batches: while one batch is being made durable, the next gathers, so
/// the syncs or commits per chunk fall as load rises (group commit). A database sink commits
/// several batches at once, one per pooled connection.
async fn writer(sink: Sink, mut queue: mpsc::Receiver<WriteSlot>, metrics: metrics::SaverMetrics) {
    let slots = Arc::new(Semaphore::new(sink.parallel_batches()));
    let tracker = TaskTracker::new();
    loop {
        // Wait for a free slot before gathering, so the batch takes everything that queued meanwhile.
        let Ok(slot) = slots.clone().acquire_owned().await else { break };
        let Some(first) = queue.recv().await else { break };
        let mut batch = vec![first];
        while batch.len() < WRITE_BATCH {
            match queue.try_recv() {
                Ok(slot) => batch.push(slot),
                Err(_) => break,
            }
        }
        let (results, waiters): (Vec<Arc<ChunkResult>>, Vec<_>) = batch.into_iter().unzip();
        let sink = sink.clone();
        let metrics = metrics.clone();
        tracker.spawn(async move {
            let started = std::time::Instant::now();
            let outcomes = sink.save_batch(results).await;
            let took = started.elapsed().as_secs_f64();
            for (waiter, outcome) in waiters.into_iter().zip(outcomes) {
                metrics.write.observe(took);
                let _ = waiter.send(outcome);
            }
            drop(slot);
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// Sends saved chunks to the fetcher in batches and hands each waiting task its verdict
/// (`None`: the fetcher did not answer; the mapper will resend and we will ack again).
async fn acker(client: Client, subject: String, saver: String, mut queue: mpsc::Receiver<AckSlot>) {
    let mut warned = false;
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < ACK_BATCH {
            match queue.try_recv() {
                Ok(slot) => batch.push(slot),
                Err(_) => break,
            }
        }
        let (acks, waiters): (Vec<Ack>, Vec<_>) = batch.into_iter().unzip();
        let body = protocol::encode(&AckRequest { v: VERSION, saver: saver.clone(), acks });
        let mut verdicts = None;
        for attempt in 0..3u32 {
            let request = async_nats::Request::new().payload(body.clone()).timeout(Some(Duration::from_secs(5)));
            match client.send_request(subject.clone(), request).await {
                Ok(message) => match protocol::decode::<AckReply>(&message.payload) {
                    Ok(reply) if reply.verdicts.len() == waiters.len() => {
                        verdicts = Some(reply.verdicts);
                        break;
                    }
                    Ok(_) => tracing::warn!("the fetcher's ack reply has the wrong number of verdicts; retrying"),
                    Err(e) => tracing::warn!("unreadable ack reply: {e}; retrying"),
                },
                Err(e) => {
                    if !warned {
                        tracing::warn!("acknowledging to the fetcher failed ({e}); retrying");
                        warned = true;
                    }
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
        if verdicts.is_some() {
            warned = false;
        }
        match verdicts {
            Some(verdicts) => {
                for (waiter, verdict) in waiters.into_iter().zip(verdicts) {
                    let _ = waiter.send(Some(verdict));
                }
            }
            None => {
                for waiter in waiters {
                    let _ = waiter.send(None);
                }
            }
        }
    }
}
