//! The saver: takes processed chunks from the `result` subject (in a queue group, so any replica
//! may take any chunk), saves each durably and idempotently through its [`sink::Sink`], then
//! acknowledges it to the fetcher, and only then tells the mapper it is saved.
//!
//! Writes and acknowledgements are batched (group commit): while one batch is being made durable
//! or acknowledged, newly arrived chunks queue up and go together in the next, so the syncs and
//! round trips per chunk fall as load rises.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod batch;
mod commit;
pub mod config;
pub mod decoded;
pub mod metrics;
pub mod sink;
pub mod verify;

use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, Message};
use batch::{AckSlot, AckerConfig, WriteSlot, ACK_BATCH, WRITE_BATCH};
use common::protocol::{self, Ack, AckVerdict, ResultReply, ResultStatus, Subjects, SAVER_QUEUE_GROUP, VERSION};
use common::service::Service;
use decoded::Decoded;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
use sink::{SaveOutcome, Sink, SinkError};

/// Why the saver could not start.
#[derive(Debug, thiserror::Error)]
pub enum SaverError {
    /// The sink cannot be opened.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The metrics endpoint or the NATS connection could not start.
    #[error(transparent)]
    Start(#[from] common::service::StartError),
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

/// Repeated warnings about what mappers send are logged once per this interval, with a count.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

impl Shared {
    /// Logs `line` at warn unless a line of this `key` was logged within [`WARN_INTERVAL`].
    fn warn_peer(&self, key: &str, line: impl FnOnce() -> String) {
        let allowed = common::sync::lock(&self.warnings, "peer warnings").allow(key, std::time::Instant::now());
        if let Some(held) = allowed {
            tracing::warn!("{}{}", line(), common::text::held_back(held, WARN_INTERVAL));
        }
    }
}

struct Shared {
    /// Warnings about what mappers send: one line per kind per interval, with a count.
    warnings: std::sync::Mutex<common::text::RateLimit>,
    client: Client,
    writes: mpsc::Sender<WriteSlot>,
    acks: mpsc::Sender<AckSlot>,
    saved: std::sync::atomic::AtomicU64,
    duplicates: std::sync::atomic::AtomicU64,
    metrics: metrics::SaverMetrics,
    /// This saver's sink.
    sink_id: String,
    /// Runs whose fetcher said they save into another sink: their results are refused unwritten.
    refused_runs: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Runs the saver until `shutdown`; in-flight chunks are finished before it returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<SaverSummary, SaverError> {
    let metrics = metrics::SaverMetrics::new();
    // Health first, so a probe sees a live process while it waits for its database.
    let service = Service::start(
        "saver",
        &config.nats,
        common::metrics::MetricsAddr::new(config.metrics_addr.as_deref(), config::DEFAULT_METRICS_ADDR),
        &metrics.common,
        &shutdown,
    )
    .await?;
    let name = service.name.clone();
    let Some(sink) = open_sink(&config, &name, &shutdown).await? else {
        return Ok(SaverSummary::default());
    };
    let client = service.connect(&config.nats, &shutdown).await?;
    // Kept to the end of the run: dropping it would leave the NATS service API.
    let _micro = service.register(&client, &config.nats.subject_prefix, &shutdown).await;
    let subjects = Subjects::new(&config.nats.subject_prefix);
    let results = client
        .queue_subscribe(subjects.result.clone(), SAVER_QUEUE_GROUP.to_string())
        .await
        .map_err(|source| SaverError::Subscribe { subject: subjects.result.clone(), source })?;
    let commits = client
        .queue_subscribe(subjects.commit.clone(), SAVER_QUEUE_GROUP.to_string())
        .await
        .map_err(|source| SaverError::Subscribe { subject: subjects.commit.clone(), source })?;
    tracing::info!("saver {name}: saving to {} (sink {})", sink.describe(), sink.id());
    metrics.common.watch_subjects(&[&subjects.result, &subjects.commit]);
    let committer = tokio::spawn(commit::serve(client.clone(), sink.clone(), commits, shutdown.clone()));
    service.set_ready();
    let (shared, tasks) = Shared::start(client, &subjects, name.clone(), sink, metrics, config.commit_window);
    serve(&shared, results, config.max_in_flight, &shutdown).await;
    let summary = SaverSummary {
        saved: shared.saved.load(std::sync::atomic::Ordering::Relaxed),
        duplicates: shared.duplicates.load(std::sync::atomic::Ordering::Relaxed),
    };
    drop(shared);
    for task in tasks {
        let _ = task.await;
    }
    let _ = committer.await;
    tracing::info!("saver {name} stopped: {} chunks saved, {} duplicates absorbed", summary.saved, summary.duplicates);
    Ok(summary)
}

impl Shared {
    /// The state every result's task shares, with the writer and acker tasks it feeds (they end
    /// once the last `Shared` is dropped and their queues are drained).
    fn start(
        client: Client,
        subjects: &Subjects,
        saver: String,
        sink: Sink,
        metrics: metrics::SaverMetrics,
        commit_window: Duration,
    ) -> (Arc<Shared>, [tokio::task::JoinHandle<()>; 2]) {
        let sink_id = sink.id().to_string();
        let (acks, ack_queue) = mpsc::channel(4 * ACK_BATCH);
        let acker_config = AckerConfig {
            client: client.clone(),
            subject: subjects.ack.clone(),
            saver,
            sink: sink_id.clone(),
            commit: sink.needs_commit(),
        };
        let acker = tokio::spawn(batch::acker(acker_config, ack_queue));
        let (writes, write_queue) = mpsc::channel(WRITE_BATCH);
        let writer = tokio::spawn(batch::writer(sink, write_queue, metrics.clone(), commit_window));
        let shared = Arc::new(Shared {
            warnings: std::sync::Mutex::new(common::text::RateLimit::new(WARN_INTERVAL)),
            client,
            writes,
            acks,
            saved: Default::default(),
            duplicates: Default::default(),
            metrics,
            sink_id,
            refused_runs: Default::default(),
        });
        (shared, [writer, acker])
    }
}

/// Handles results from `results`, at most `max_in_flight` at once, until `shutdown`; then stops
/// taking results (unsaved ones are resent by their mappers) and finishes the ones in hand.
async fn serve(
    shared: &Arc<Shared>,
    mut results: async_nats::Subscriber,
    max_in_flight: u32,
    shutdown: &CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(max_in_flight as usize));
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
    let _ = results.unsubscribe().await;
    tracker.close();
    tracker.wait().await;
}

/// What became of one result, as its mapper is told.
enum Outcome {
    /// Saved (now or before) and the fetcher confirmed it.
    Saved,
    /// Saved, but the fetcher did not confirm it: resend later.
    NotAcked(String),
    /// Not saved (a sink error, or the fetcher refuses this sink): resend later.
    Failed(String),
    /// Never savable: do not resend.
    Rejected(String),
    /// From a mapper speaking protocol 1: told so in its own version.
    OldProtocol,
}

async fn handle(shared: &Arc<Shared>, message: Message) {
    let Some(reply_to) = message.reply.clone() else {
        shared.warn_peer("no_reply", || format!("ignoring a result without a reply subject on {}", message.subject));
        return;
    };
    shared.metrics.in_flight.inc();
    let outcome = match decode(shared, &message) {
        Ok(result) => match save(shared, result.clone()).await {
            Ok((outcome, dead)) => ack(shared, &result, outcome, dead).await,
            Err(outcome) => outcome,
        },
        Err(outcome) => outcome,
    };
    shared.metrics.in_flight.dec();
    let body = match outcome {
        Outcome::OldProtocol => protocol::encode(&serde_json::json!({
            "v": 1, "status": "rejected",
            "error": "this saver speaks chunkmill protocol version 2; upgrade the mapper",
        })),
        outcome => {
            let (status, error) = match outcome {
                Outcome::Saved => (ResultStatus::Saved, None),
                Outcome::NotAcked(e) => (ResultStatus::NotAcked, Some(e)),
                Outcome::Failed(e) => (ResultStatus::Failed, Some(e)),
                Outcome::Rejected(e) => (ResultStatus::Rejected, Some(e)),
                Outcome::OldProtocol => (ResultStatus::Rejected, None),
            };
            let error = error.map(|e| protocol::truncate_to(e, protocol::MAX_REASON));
            protocol::encode(&ResultReply { v: VERSION, status, error })
        }
    };
    if let Err(e) = shared.client.publish(reply_to, body).await {
        tracing::warn!("cannot answer the mapper ({e}); it will resend and the save is idempotent");
    }
}

/// Decodes and checks a result: what a saver must not take on trust.
fn decode(shared: &Shared, message: &Message) -> Result<Arc<Decoded>, Outcome> {
    match Decoded::decode(message.payload.clone()) {
        Ok(decoded) => Ok(Arc::new(decoded)),
        Err(common::protocol::ProtocolError::Version(1)) => {
            shared.metrics.common.malformed(&message.subject);
            shared.warn_peer("protocol_v1", || {
                format!(
                    "a mapper speaking protocol version 1 sent a result on {}; refused: upgrade it",
                    message.subject
                )
            });
            Err(Outcome::OldProtocol)
        }
        Err(e) => {
            shared.metrics.common.malformed(&message.subject);
            let error = e.to_string();
            shared.warn_peer(&message.subject, || {
                format!("rejecting a result on {}: {}", message.subject, common::text::escaped(&error))
            });
            Err(Outcome::Rejected(error))
        }
    }
}

/// Saves a result through the group-commit writer; on success, how many of its objects are
/// dead-lettered in the sink (the mapper's, and any the sink refused).
async fn save(shared: &Shared, result: Arc<Decoded>) -> Result<(SaveOutcome, u64), Outcome> {
    // A run whose fetcher said it saves elsewhere: do not write a stray copy into this sink.
    if common::sync::lock(&shared.refused_runs, "refused runs").contains(&result.head.run) {
        return Err(Outcome::Failed(format!(
            "run {} saves into another sink than this saver's ({})",
            result.head.run, shared.sink_id
        )));
    }
    let (tx, rx) = oneshot::channel();
    if shared.writes.send((result.clone(), tx)).await.is_err() {
        return Err(Outcome::NotAcked("the saver is stopping".into()));
    }
    let saved = match rx.await {
        Ok(Ok(outcome)) => outcome,
        // Never savable here: refuse, so the chunk ends dead-lettered instead of looping.
        Ok(Err(error @ SinkError::Invalid(_))) => return Err(Outcome::Rejected(error.to_string())),
        Ok(Err(error)) => {
            shared.metrics.failures.inc();
            tracing::error!("cannot save a result: {error}");
            return Err(Outcome::Failed(error.to_string()));
        }
        Err(_) => return Err(Outcome::Failed("the writer stopped".into())),
    };
    let mut dead = result.dead.len() as u64;
    match saved {
        SaveOutcome::Saved | SaveOutcome::SavedRefusing(_) => {
            if let SaveOutcome::SavedRefusing(refused) = saved {
                tracing::warn!(
                    chunk = result.head.chunk.0,
                    "chunk {} of run {}: the sink refused {refused} object(s); they are dead-lettered with its reason",
                    result.head.chunk,
                    result.head.run
                );
                dead += refused;
            }
            shared.saved.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            shared.metrics.chunks.inc();
            shared.metrics.objects.inc_by(result.objects() as u64 - dead.min(result.objects() as u64));
        }
        SaveOutcome::Duplicate => {
            shared.duplicates.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            shared.metrics.duplicates.inc();
        }
    }
    Ok((saved, dead))
}

/// Acknowledges a saved chunk to the fetcher and turns its verdict into the mapper's answer.
async fn ack(shared: &Shared, result: &Decoded, _saved: SaveOutcome, dead: u64) -> Outcome {
    let ack = Ack {
        run: result.head.run.clone(),
        chunk: result.head.chunk,
        lease: result.head.lease,
        attempt: result.head.attempt,
        objects: result.objects() as u64,
        dead,
        outputs: result.value_count() as u64,
    };
    let (tx, rx) = oneshot::channel();
    if shared.acks.send((ack, tx)).await.is_err() {
        return Outcome::NotAcked("the saver is stopping".into());
    }
    let (chunk, run) = (result.head.chunk, &result.head.run);
    match rx.await.ok().flatten() {
        Some(AckVerdict::Unknown) => {
            // Saved, but the fetcher cannot count it (another run, or a wrong object count from a
            // buggy mapper): refuse, so the mapper gives the lease back as failed and a chunk that
            // can never complete ends dead-lettered instead of looping.
            let error = format!(
                "the fetcher does not accept chunk {chunk} of run {run} (another run, or a wrong object count)"
            );
            tracing::warn!(chunk = chunk.0, "{error}");
            Outcome::Rejected(error)
        }
        Some(AckVerdict::WrongSink) => {
            {
                let mut runs = common::sync::lock(&shared.refused_runs, "refused runs");
                if runs.len() < 1024 && runs.insert(run.clone()) {
                    tracing::error!(
                        "the fetcher says run {run} saves into another sink, not this saver's ({}): this saver takes no more of its results. Give every saver the same --out (a shared volume) or --sink",
                        shared.sink_id
                    );
                }
            }
            Outcome::Failed(format!("run {run} saves into another sink than this saver's ({})", shared.sink_id))
        }
        Some(_) => Outcome::Saved,
        None => Outcome::NotAcked(format!("chunk {chunk} is saved but the fetcher did not confirm it")),
    }
}

/// Opens the configured sink; `None` if shut down while waiting for it (a database not up yet).
async fn open_sink(config: &Config, name: &str, shutdown: &CancellationToken) -> Result<Option<Sink>, SaverError> {
    let sink = config.sink.config(&config.out, config.pg_pool as usize, name)?;
    Ok(sink.open(shutdown).await?)
}
