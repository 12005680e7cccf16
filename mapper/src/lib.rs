//! The mapper: a generic worker that pulls chunks of any job it can run. Three stages keep its
//! cores busy without ever holding more than `--concurrency` chunks waiting for or in the
//! transform, and `--results-in-flight` results travelling to a saver:
//!
//! - the **pump** asks the fetcher for as many chunks as it has room for, in one request (which
//!   is how a mapper says it is ready, and what it can run);
//! - **transformers** take them in order and run the job's transform on the rayon pool
//!   ([`work`]), never on tokio's thread;
//! - each result is **delivered** to a saver by its own task, resent until a saver answers
//!   `saved`, while the pump and transformers go on: a transformed chunk frees its room in
//!   `--concurrency` at once, so the next chunk is asked for while the saver's fsyncs and the
//!   fetcher's ack are still under way (their latency would otherwise idle the cores).
//!
//! A heartbeat extends every held lease three times per lease period, so a slow mapper is never
//! mistaken for a dead one; a lease the fetcher no longer recognises is dropped. The job itself
//! comes from the fetcher ([`jobs`]), never from this mapper's flags.
//!
//! On shutdown the pump stops, the chunks in hand are finished within the grace period, and
//! whatever is left is handed back (released), so the fetcher re-leases it at once.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod config;
pub mod jobs;
pub mod metrics;
pub mod work;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::{Client, RequestErrorKind};
use bytes::Bytes;
use common::backoff::{sleep_unless as pause, Backoff};
use common::protocol::{
    self, ChunkHead, ExtendReply, ExtendRequest, LeaseRef, ReleaseReason, ReleaseRequest, ResultReply, ResultStatus,
    Subjects, WorkReply, WorkReplyKind, WorkRequest, VERSION,
};
use common::service::Service;
use common::sync::lock;
use common::text::escaped;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use transform::Registry;

pub use config::Config;

/// How long to wait for a saver's answer before resending a result.
const RESULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a work request may be held by the fetcher when nothing is pending.
const WORK_WAIT: Duration = Duration::from_secs(2);

/// Longest pause between work requests while no fetcher is listening.
const NO_FETCHER_RETRY: Duration = Duration::from_millis(200);

/// Chunks transformed at once: one more than fits the pool, so the next chunk is decoded and
/// queued while the pool works.
const TRANSFORMERS: usize = 2;

/// Why the mapper could not start.
#[derive(Debug, thiserror::Error)]
pub enum MapperError {
    /// The metrics endpoint or the NATS connection could not start.
    #[error(transparent)]
    Start(#[from] common::service::StartError),
    /// The rayon pool could not be built.
    #[error("cannot start {threads} transform threads: {source}")]
    Pool {
        /// Requested threads.
        threads: usize,
        /// Why.
        source: rayon::ThreadPoolBuildError,
    },
}

/// What the mapper did, returned when it stops.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MapperSummary {
    /// Chunks whose result a saver confirmed.
    pub chunks: u64,
    /// Objects in them.
    pub objects: u64,
    /// Chunks given back (shutdown, failure or lost lease).
    pub given_back: u64,
}

/// A lease this mapper holds.
struct Held {
    /// False once the fetcher said the lease is gone.
    alive: bool,
    /// When the fetcher last confirmed it (leased or extended): a lease not confirmed for one
    /// and a half lease periods is surely expired there, and its result not worth resending.
    confirmed: Instant,
}

/// What every stage shares.
pub(crate) struct Shared {
    client: Client,
    subjects: Subjects,
    name: String,
    pool: rayon::ThreadPool,
    jobs: jobs::Jobs,
    held: Mutex<HashMap<LeaseRef, Held>>,
    lease_ms: AtomicU64,
    chunks: AtomicU64,
    objects: AtomicU64,
    given_back: AtomicU64,
    metrics: metrics::MapperMetrics,
    /// Wakes the heartbeat when a lease is taken, so it can beat sooner (never later).
    new_lease: tokio::sync::Notify,
    /// Cancelled when the run is over (exit-when-done) or the grace period ends.
    hard_stop: CancellationToken,
}

impl Shared {
    fn new(
        client: Client,
        subjects: Subjects,
        name: String,
        pool: rayon::ThreadPool,
        jobs: jobs::Jobs,
        metrics: metrics::MapperMetrics,
    ) -> Self {
        Shared {
            client,
            subjects,
            name,
            pool,
            jobs,
            held: Mutex::default(),
            lease_ms: AtomicU64::new(5000),
            chunks: AtomicU64::new(0),
            objects: AtomicU64::new(0),
            given_back: AtomicU64::new(0),
            metrics,
            new_lease: tokio::sync::Notify::new(),
            hard_stop: CancellationToken::new(),
        }
    }

    /// What this mapper did, logged.
    fn summary(&self) -> MapperSummary {
        let summary = MapperSummary {
            chunks: self.chunks.load(Ordering::Relaxed),
            objects: self.objects.load(Ordering::Relaxed),
            given_back: self.given_back.load(Ordering::Relaxed),
        };
        tracing::info!(
            "mapper {} stopped: {} chunks, {} objects saved, {} given back",
            escaped(&self.name),
            summary.chunks,
            summary.objects,
            summary.given_back
        );
        summary
    }

    fn hold(&self, lease: LeaseRef) {
        lock(&self.held, "held leases").insert(lease, Held { alive: true, confirmed: Instant::now() });
        self.metrics.in_flight.inc();
        self.new_lease.notify_one();
    }

    fn drop_lease(&self, lease: &LeaseRef) {
        let removed = lock(&self.held, "held leases").remove(lease).is_some();
        if removed {
            self.metrics.in_flight.dec();
        }
    }

    /// Whether the lease is still ours as far as we know: not refused by the fetcher, and
    /// confirmed within the last lease period.
    fn still_ours(&self, lease: &LeaseRef) -> bool {
        let period = Duration::from_millis(self.lease_ms.load(Ordering::Relaxed));
        lock(&self.held, "held leases")
            .get(lease)
            .is_some_and(|h| h.alive && h.confirmed.elapsed() < period + period / 2)
    }
}

/// A leased chunk waiting for a transformer, with the room it takes.
pub(crate) struct InHand {
    /// The work reply it came in.
    payload: Bytes,
    /// Where its objects are in that reply.
    objects: Vec<std::ops::Range<usize>>,
    /// Its lease.
    head: ChunkHead,
    /// Run and job fingerprint of the reply.
    run: String,
    job: String,
    /// Its room in `--concurrency` (none for a chunk beyond what was asked for), freed once it
    /// is transformed.
    permit: Option<OwnedSemaphorePermit>,
}

/// Runs the stock mapper (built-in transforms and the `--command` programs) until `shutdown`
/// (then drains within the grace period) or, with `exit_when_done`, until the fetcher reports
/// the run complete.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<MapperSummary, MapperError> {
    run_with(config, Registry::builtin(), shutdown).await
}

/// [`run`] with extra transforms: a user's own Rust transforms registered by name, e.g.
/// `mapper::run_with(config, Registry::builtin().with("mine", make_mine), shutdown)`.
pub async fn run_with(
    config: Config,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<MapperSummary, MapperError> {
    let threads = config.transform_threads();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("transform-{i}"))
        .build()
        .map_err(|source| MapperError::Pool { threads, source })?;
    let registry = config
        .commands
        .iter()
        .fold(registry.with_command_options(config.command_options()), |r, c| r.with_command(c.clone()));
    let metrics = metrics::MapperMetrics::new();
    let registry = registry.with_jq_options(jq_options(&config, &metrics));
    let subjects = Subjects::new(&config.nats.subject_prefix);
    metrics.common.watch_subjects(&[&subjects.work]);
    let service = Service::start(
        "mapper",
        &config.nats,
        common::metrics::MetricsAddr::new(config.metrics_addr.as_deref(), config::DEFAULT_METRICS_ADDR),
        &metrics.common,
        &shutdown,
    )
    .await?;
    // Ready while it waits for NATS: a mapper has nothing to warm up, and /readyz still follows
    // the connection.
    service.set_ready();
    let client = service.connect(&config.nats, &shutdown).await?;
    // Kept to the end of the run: dropping it would leave the NATS service API.
    let _micro = service.register(&client, &config.nats.subject_prefix, &shutdown).await;
    let name = service.name.clone();
    tracing::info!(
        "mapper {}: runs {}; {} chunks in hand and {} results in flight at most, {threads} transform threads",
        escaped(&name),
        registry.capabilities().join(", "),
        config.concurrency,
        config.results_in_flight
    );
    let shared = Arc::new(Shared::new(client, subjects, name, pool, jobs::Jobs::new(registry), metrics));
    let heartbeat = tokio::spawn(heartbeat(shared.clone()));
    let (mut stages, deliveries) = start_stages(&shared, &config, &shutdown);
    let timer = tokio::spawn(grace_timer(shutdown.clone(), config.shutdown_grace, shared.hard_stop.clone()));
    while stages.join_next().await.is_some() {}
    deliveries.tasks.close();
    deliveries.tasks.wait().await;
    timer.abort();
    shared.hard_stop.cancel();
    heartbeat.abort();
    let _ = tokio::time::timeout(Duration::from_secs(2), shared.client.flush()).await;
    Ok(shared.summary())
}

/// How this mapper runs jq: its `--jq-timeout` and `--jq-memory`, sandbox restarts counted.
fn jq_options(config: &Config, metrics: &metrics::MapperMetrics) -> transform::jq::JqOptions {
    let restarts = metrics.jq_restarts.clone();
    let count = move |why: transform::jq::Restart| restarts.with_label_values(&[why.as_str()]).inc();
    transform::jq::JqOptions { on_restart: Some(Arc::new(count)), ..config.jq.options("mapper") }
}

/// The pump (asks for work, up to `--concurrency` chunks in hand) and the transformers, which
/// hand each result to a delivery task (up to `--results-in-flight`).
fn start_stages(
    shared: &Arc<Shared>,
    config: &Config,
    shutdown: &CancellationToken,
) -> (tokio::task::JoinSet<()>, Deliveries) {
    let room = Arc::new(Semaphore::new(config.concurrency as usize));
    let (queue, chunks) = mpsc::channel::<InHand>(config.concurrency as usize);
    let chunks = Arc::new(tokio::sync::Mutex::new(chunks));
    let deliveries =
        Deliveries { tasks: TaskTracker::new(), room: Arc::new(Semaphore::new(config.results_in_flight as usize)) };
    let mut stages = tokio::task::JoinSet::new();
    stages.spawn(pump(shared.clone(), room, queue, shutdown.clone(), config.exit_when_done));
    for _ in 0..TRANSFORMERS {
        stages.spawn(transformer(shared.clone(), chunks.clone(), deliveries.clone()));
    }
    (stages, deliveries)
}

/// After `shutdown`, waits out the grace period, then stops everything still in hand: held
/// chunks are handed back.
async fn grace_timer(shutdown: CancellationToken, grace: Duration, hard_stop: CancellationToken) {
    shutdown.cancelled().await;
    tokio::time::sleep(grace).await;
    tracing::warn!("shutdown grace period ({grace:?}) is over: handing back held chunks");
    hard_stop.cancel();
}

/// A whole mapper binary that runs `registry`'s transforms: serves as a jq sandbox if started
/// as one, else parses the command line (including `--command`), logs, and runs until
/// SIGTERM/Ctrl-C. A user's binary with their own Rust transforms is
/// `fn main() -> ExitCode { mapper::main_with(Registry::builtin().with("mine", ...)) }`.
pub fn main_with(registry: Registry) -> std::process::ExitCode {
    use clap::Parser;
    // A jq sandbox is this binary started again: it must become one before anything else.
    transform::jq::sandbox::enter_if_child();
    let config = Config::parse();
    // One tokio thread for messaging; the cores belong to the rayon transform pool.
    common::service::main("mapper", common::service::Runtime::CurrentThread, |shutdown| async move {
        run_with(config, registry, shutdown).await?;
        Ok(std::process::ExitCode::SUCCESS)
    })
}

/// Asks for as many chunks as there is room for, and queues them for the transformers. Ends on
/// shutdown (or, with `exit_when_done`, when the run is complete); the queue then closes.
async fn pump(
    shared: Arc<Shared>,
    room: Arc<Semaphore>,
    queue: mpsc::Sender<InHand>,
    shutdown: CancellationToken,
    exit_when_done: bool,
) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    let mut told_why = String::new();
    while !shutdown.is_cancelled() && !shared.hard_stop.is_cancelled() {
        let Some(mut permits) = take_room(&shared, &room, &shutdown).await else { break };
        let message = match ask(&shared, permits.len() as u32, &shutdown).await {
            Asked::Reply(message) => {
                if backoff.reset() {
                    tracing::info!("the fetcher answers again");
                }
                message
            }
            Asked::Stop => break,
            Asked::Failed(e) => {
                drop(permits);
                wait_after_failed_ask(&shared, &e, &mut backoff, &shutdown).await;
                continue;
            }
        };
        let reply: WorkReply = match protocol::decode(&message.payload) {
            Ok(reply) => reply,
            Err(e) => {
                drop(permits);
                on_undecodable(&shared, &message, &e, &shutdown).await;
                continue;
            }
        };
        match reply.kind {
            WorkReplyKind::Chunks => {
                if !take_chunks(&shared, &message.payload, reply, &mut permits, &queue).await {
                    break;
                }
            }
            WorkReplyKind::Done if exit_when_done => {
                // Not a hard stop: results still being delivered finish normally.
                tracing::info!("the fetcher reports the run complete");
                break;
            }
            kind => {
                drop(permits);
                no_work(reply, kind, &mut told_why, &shutdown).await;
            }
        }
    }
}

/// After a failed request for work: logs the first failure of a streak, then waits.
async fn wait_after_failed_ask(
    shared: &Shared,
    e: &async_nats::RequestError,
    backoff: &mut Backoff,
    shutdown: &CancellationToken,
) {
    if backoff.first_failure() {
        match e.kind() {
            RequestErrorKind::NoResponders => {
                tracing::warn!("no fetcher is listening on {}; waiting for one", shared.subjects.work)
            }
            _ => tracing::warn!("asking for work failed ({e}); retrying"),
        }
    }
    // "No responders" is the NATS server's own instant answer and costs the fetcher nothing, so
    // keep asking often: a fetcher that has just finished its scan gets its mappers within
    // NO_FETCHER_RETRY, not after a long backoff. Anything else (a timeout: the fetcher may be
    // overloaded) backs off to 2 s.
    let cap = if e.kind() == RequestErrorKind::NoResponders { NO_FETCHER_RETRY } else { Duration::from_secs(2) };
    backoff.wait_up_to(cap, shutdown).await;
}

/// A work reply this mapper cannot decode. Chunks we cannot read are leased to us all the same:
/// they are given back as failed, so the fetcher counts them towards --max-attempts instead of
/// re-leasing them forever. A reply without readable leases is ignored, after a pause.
async fn on_undecodable(
    shared: &Arc<Shared>,
    message: &async_nats::Message,
    e: &protocol::ProtocolError,
    shutdown: &CancellationToken,
) {
    shared.metrics.common.malformed(&message.subject);
    if let Some(leases) = protocol::decode_leases_only(&message.payload) {
        for lease in leases {
            give_back_failed(shared, lease, format!("the mapper cannot decode chunk {}: {e}", lease.chunk)).await;
        }
        return;
    }
    tracing::warn!(subject = %message.subject, "ignoring a work reply: {}", escaped(&e.to_string()));
    pause(Duration::from_secs(1), shutdown).await;
}

/// A reply without chunks (idle, done, or this mapper cannot run the job): says why once per
/// reason, then waits as long as the fetcher asks before the next request.
async fn no_work(reply: WorkReply<'_>, kind: WorkReplyKind, told_why: &mut String, shutdown: &CancellationToken) {
    if let Some(why) = reply.reason.filter(|why| why != &*told_why) {
        tracing::warn!("the fetcher has no work for this mapper: {}", escaped(&why));
        *told_why = why;
    }
    let retry = Duration::from_millis(reply.retry_ms.unwrap_or(500).min(5000));
    if kind == WorkReplyKind::Idle || kind == WorkReplyKind::Done {
        pause(retry, shutdown).await;
    }
}

/// Waits for room for one chunk, then takes whatever else is free (up to what one reply may
/// carry): one request for all of it. `None` when stopping.
async fn take_room(
    shared: &Shared,
    room: &Arc<Semaphore>,
    shutdown: &CancellationToken,
) -> Option<Vec<OwnedSemaphorePermit>> {
    let first = tokio::select! {
        _ = shutdown.cancelled() => return None,
        _ = shared.hard_stop.cancelled() => return None,
        permit = room.clone().acquire_owned() => permit.ok()?,
    };
    let mut permits = vec![first];
    while permits.len() < protocol::MAX_CHUNKS_PER_REPLY as usize {
        match room.clone().try_acquire_owned() {
            Ok(permit) => permits.push(permit),
            Err(_) => break,
        }
    }
    Some(permits)
}

/// What asking for work came to.
enum Asked {
    Reply(async_nats::Message),
    Failed(async_nats::RequestError),
    /// Shutting down (anything leased into the reply meanwhile was handed back).
    Stop,
}

/// Asks the fetcher for up to `max` chunks, waiting up to [`WORK_WAIT`] for them.
async fn ask(shared: &Arc<Shared>, max: u32, shutdown: &CancellationToken) -> Asked {
    let body = protocol::encode(&WorkRequest {
        v: VERSION,
        mapper: shared.name.clone(),
        wait_ms: WORK_WAIT.as_millis() as u64,
        max,
        can: shared.jobs.capabilities(),
    });
    let asked = async_nats::Request::new().payload(body).timeout(Some(WORK_WAIT + Duration::from_secs(3)));
    let waiting = Instant::now();
    let request = shared.client.send_request(shared.subjects.work.clone(), asked);
    tokio::pin!(request);
    let reply = tokio::select! {
        _ = shared.hard_stop.cancelled() => return Asked::Stop,
        reply = &mut request => reply,
        _ = shutdown.cancelled() => {
            // The fetcher may already have leased chunks into this reply: wait for it (at most
            // the wait asked for) and hand them straight back, rather than leave them to expire
            // while nobody works on them.
            tokio::select! {
                _ = shared.hard_stop.cancelled() => {}
                reply = &mut request => if let Some(leases) = reply.ok().and_then(|m| protocol::decode_leases_only(&m.payload)) {
                    for lease in leases {
                        shared.given_back.fetch_add(1, Ordering::Relaxed);
                        release(shared, lease, ReleaseReason::Shutdown, "shutting down".into()).await;
                    }
                },
            }
            return Asked::Stop;
        }
    };
    shared.metrics.idle.inc_by(waiting.elapsed().as_secs_f64());
    match reply {
        Ok(message) => Asked::Reply(message),
        Err(e) => Asked::Failed(e),
    }
}

/// Holds the chunks of a `chunks` reply and queues them for the transform, each with one of
/// `permits`; false once the queue is closed (stopping).
async fn take_chunks(
    shared: &Arc<Shared>,
    payload: &Bytes,
    reply: WorkReply<'_>,
    permits: &mut Vec<OwnedSemaphorePermit>,
    queue: &mpsc::Sender<InHand>,
) -> bool {
    let lease_ms = reply.lease_ms.unwrap_or(5000).max(100);
    shared.lease_ms.store(lease_ms, Ordering::Relaxed);
    let (run, job) = (reply.run.unwrap_or_default(), reply.job.unwrap_or_default());
    let mut leased = Vec::with_capacity(reply.chunks.len());
    for chunk in reply.chunks {
        match work::object_ranges(payload, &chunk.objects) {
            Some(objects) => leased.push((chunk.head, objects)),
            None => {
                // Leased to us all the same: hand it back as failed so that it counts towards
                // --max-attempts rather than waiting for its lease to expire.
                let lease = LeaseRef { chunk: chunk.head.chunk, lease: chunk.head.lease };
                give_back_failed(shared, lease, format!("chunk {}'s objects are not in the work reply", lease.chunk))
                    .await;
            }
        }
    }
    for (head, objects) in leased {
        shared.hold(LeaseRef { chunk: head.chunk, lease: head.lease });
        // A fetcher sends at most what was asked for; more would be kept all the same.
        let permit = permits.pop();
        let in_hand = InHand { payload: payload.clone(), objects, head, run: run.clone(), job: job.clone(), permit };
        if queue.send(in_hand).await.is_err() {
            return false;
        }
    }
    true
}

/// Hands a chunk this mapper cannot use back as failed, so that it counts towards the
/// fetcher's --max-attempts instead of waiting for its lease to expire.
async fn give_back_failed(shared: &Arc<Shared>, lease: LeaseRef, error: String) {
    tracing::error!(chunk = lease.chunk.0, "{error}; handing it back as failed");
    shared.metrics.failures.with_label_values(&["chunk"]).inc();
    shared.given_back.fetch_add(1, Ordering::Relaxed);
    release(shared, lease, ReleaseReason::Failed, error).await;
}

/// The delivery tasks, and their bound (`--results-in-flight`).
#[derive(Clone)]
struct Deliveries {
    tasks: TaskTracker,
    room: Arc<Semaphore>,
}

/// Takes chunks from the queue in order, transforms each on the rayon pool, and starts its
/// delivery. After shutdown it hands back what is still queued.
async fn transformer(
    shared: Arc<Shared>,
    chunks: Arc<tokio::sync::Mutex<mpsc::Receiver<InHand>>>,
    deliveries: Deliveries,
) {
    loop {
        let next = chunks.lock().await.recv().await;
        let Some(in_hand) = next else { return };
        let lease = LeaseRef { chunk: in_hand.head.chunk, lease: in_hand.head.lease };
        if shared.hard_stop.is_cancelled() {
            give_back(&shared, lease, ReleaseReason::Shutdown, "shutting down before transforming it".into()).await;
            continue;
        }
        if !shared.still_ours(&lease) {
            lost(&shared, lease);
            continue;
        }
        match work::transform_chunk(&shared, in_hand).await {
            work::Transformed::Deliver { body, objects, permit } => {
                // Wait for room among the results in flight (keeping this chunk's room until
                // then, so a slow saver slows the asking), then free the chunk's room: the
                // pump asks for the next one while this result travels.
                let Ok(in_flight) = deliveries.room.clone().acquire_owned().await else { return };
                drop(permit);
                let shared = shared.clone();
                deliveries.tasks.spawn(async move {
                    let outcome = deliver(&shared, lease, body).await;
                    finish(&shared, lease, objects, outcome).await;
                    drop(in_flight);
                });
            }
            work::Transformed::Probed(permit) => {
                shared.drop_lease(&lease);
                release(&shared, lease, ReleaseReason::Probed, "probe finished".into()).await;
                drop(permit);
            }
            work::Transformed::GiveBack(reason, error, permit) => {
                if reason == ReleaseReason::Failed {
                    shared.metrics.failures.with_label_values(&["chunk"]).inc();
                    tracing::error!(chunk = lease.chunk.0, "chunk {} failed: {}", lease.chunk, escaped(&error));
                }
                give_back(&shared, lease, reason, error).await;
                drop(permit);
            }
        }
    }
}

/// What became of a delivered result.
enum Delivery {
    Saved,
    LeaseLost,
    GiveBack(ReleaseReason, String),
}

async fn finish(shared: &Arc<Shared>, lease: LeaseRef, objects: u64, outcome: Delivery) {
    match outcome {
        Delivery::Saved => {
            shared.drop_lease(&lease);
            shared.chunks.fetch_add(1, Ordering::Relaxed);
            shared.objects.fetch_add(objects, Ordering::Relaxed);
            shared.metrics.chunks.inc();
            shared.metrics.objects.inc_by(objects);
        }
        Delivery::LeaseLost => lost(shared, lease),
        Delivery::GiveBack(reason, error) => {
            if reason == ReleaseReason::Failed {
                shared.metrics.failures.with_label_values(&["chunk"]).inc();
                tracing::error!(chunk = lease.chunk.0, "chunk {} failed: {}", lease.chunk, escaped(&error));
            }
            give_back(shared, lease, reason, error).await;
        }
    }
}

fn lost(shared: &Arc<Shared>, lease: LeaseRef) {
    shared.drop_lease(&lease);
    shared.given_back.fetch_add(1, Ordering::Relaxed);
    tracing::info!(chunk = lease.chunk.0, "lease of chunk {} is no longer ours; dropping its result", lease.chunk);
}

async fn give_back(shared: &Arc<Shared>, lease: LeaseRef, reason: ReleaseReason, error: String) {
    shared.drop_lease(&lease);
    shared.given_back.fetch_add(1, Ordering::Relaxed);
    release(shared, lease, reason, error).await;
}

/// Sends a result to a saver until one answers `saved`: resent after `failed`, `not_acked`, a
/// timeout or no responders, with backoff, while the lease is still ours.
async fn deliver(shared: &Arc<Shared>, lease: LeaseRef, body: Bytes) -> Delivery {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        // `valid: false` from the heartbeat may come before the saver's `saved` for the same
        // chunk (the saver acks the fetcher first): the chunk is done or lost, stop resending.
        if !shared.still_ours(&lease) {
            return Delivery::LeaseLost;
        }
        if shared.hard_stop.is_cancelled() {
            return Delivery::GiveBack(ReleaseReason::Shutdown, "shutting down".into());
        }
        let request = async_nats::Request::new().payload(body.clone()).timeout(Some(RESULT_TIMEOUT));
        let reply = tokio::select! {
            reply = shared.client.send_request(shared.subjects.result.clone(), request) => reply,
            _ = shared.hard_stop.cancelled() => return Delivery::GiveBack(ReleaseReason::Shutdown, "shutting down".into()),
        };
        let problem = match reply {
            Ok(message) => match protocol::decode::<ResultReply>(&message.payload) {
                Ok(ResultReply { status: ResultStatus::Saved, .. }) => return Delivery::Saved,
                Ok(ResultReply { status: ResultStatus::Rejected, error, .. }) => {
                    return Delivery::GiveBack(
                        ReleaseReason::Failed,
                        format!("the saver rejected the result: {}", escaped(&error.unwrap_or_default())),
                    );
                }
                Ok(ResultReply { status, error, .. }) => {
                    format!("saver answered {status:?}: {}", escaped(&error.unwrap_or_default()))
                }
                Err(e) => format!("unreadable saver reply: {e}"),
            },
            Err(e) if e.kind() == RequestErrorKind::MaxPayloadExceeded => {
                return Delivery::GiveBack(
                    ReleaseReason::Failed,
                    format!(
                        "result of chunk {} is {} bytes, over the NATS server's max_payload ({} bytes); lower the fetcher's --chunk-size",
                        lease.chunk,
                        body.len(),
                        common::nats::max_payload(&shared.client)
                    ),
                );
            }
            Err(e) if e.kind() == RequestErrorKind::NoResponders => {
                format!("no saver is listening on {}", shared.subjects.result)
            }
            Err(e) => format!("sending the result failed: {e}"),
        };
        if backoff.first_failure() {
            tracing::warn!(chunk = lease.chunk.0, "chunk {}: {problem}; retrying", lease.chunk);
        }
        if !backoff.wait(&shared.hard_stop).await {
            return Delivery::GiveBack(ReleaseReason::Shutdown, "shutting down".into());
        }
    }
}

async fn release(shared: &Arc<Shared>, lease: LeaseRef, reason: ReleaseReason, error: String) {
    let body = protocol::encode(&ReleaseRequest {
        v: VERSION,
        mapper: shared.name.clone(),
        lease,
        reason,
        error: Some(protocol::truncate_to(error, protocol::MAX_REASON)),
    });
    let request = async_nats::Request::new().payload(body).timeout(Some(Duration::from_secs(2)));
    if let Err(e) = shared.client.send_request(shared.subjects.release.clone(), request).await {
        tracing::warn!(
            chunk = lease.chunk.0,
            "could not hand chunk {} back ({e}); its lease will expire instead",
            lease.chunk
        );
    }
}

/// Extends every held lease at least every third of the lease period. A new lease can make the
/// next beat come sooner (its period may be shorter), never later: leases arriving all the time
/// must not starve the ones already held.
async fn heartbeat(shared: Arc<Shared>) {
    let period = |shared: &Shared| {
        Duration::from_millis(shared.lease_ms.load(Ordering::Relaxed) / 3).max(Duration::from_millis(30))
    };
    let mut next = tokio::time::Instant::now() + period(&shared);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = shared.new_lease.notified() => {
                next = next.min(tokio::time::Instant::now() + period(&shared));
                continue;
            }
        }
        let beat = period(&shared);
        next = tokio::time::Instant::now() + beat;
        let leases: Vec<LeaseRef> = lock(&shared.held, "held leases")
            .iter()
            .filter(|(_, h)| h.alive)
            .map(|(l, _)| *l)
            .take(protocol::MAX_ITEMS)
            .collect();
        // Nothing held: nothing to say.
        if leases.is_empty() {
            continue;
        }
        let sent = Instant::now();
        let body = protocol::encode(&ExtendRequest { v: VERSION, mapper: shared.name.clone(), leases: leases.clone() });
        let request = async_nats::Request::new().payload(body).timeout(Some(beat.max(Duration::from_millis(500))));
        match shared.client.send_request(shared.subjects.extend.clone(), request).await {
            Ok(message) => match protocol::decode::<ExtendReply>(&message.payload) {
                Ok(reply) => {
                    shared.lease_ms.store(reply.lease_ms.max(100), Ordering::Relaxed);
                    {
                        let mut held = lock(&shared.held, "held leases");
                        for (lease, valid) in leases.iter().zip(reply.valid) {
                            if let Some(h) = held.get_mut(lease) {
                                if valid {
                                    h.confirmed = sent;
                                } else {
                                    h.alive = false;
                                }
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!("ignoring an extend reply: {}", escaped(&e.to_string())),
            },
            Err(e) => tracing::debug!("extending leases failed ({e}); retrying next beat"),
        }
    }
}

/// Runs `f` on the rayon pool and awaits its result without blocking tokio. A panic inside `f`
/// becomes an error (rayon would otherwise abort the process).
pub async fn on_rayon<T: Send + 'static>(
    pool: &rayon::ThreadPool,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    pool.spawn(move || {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .unwrap_or_else(|_| Err("the transform panicked".to_string()));
        let _ = tx.send(outcome);
    });
    rx.await.unwrap_or_else(|_| Err("the transform thread went away".to_string()))
}
