//! The mapper: a worker that pulls chunks. Each of `--concurrency` workers asks the fetcher for a
//! chunk (which is how a mapper announces it is ready), transforms it on the rayon pool, sends the
//! result to a saver and waits for the saver's word that it is saved and acknowledged, then asks
//! again. A heartbeat task extends every lease the mapper holds, so a slow mapper is never
//! mistaken for a dead one; a lease the fetcher no longer recognises is dropped.
//!
//! On shutdown the workers stop asking for work, finish what they hold within the grace period,
//! and hand back (release) whatever is left, so the fetcher re-leases it at once.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod config;
pub mod metrics;
pub mod work;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::{Client, RequestErrorKind};
use bytes::Bytes;
use common::protocol::{
    self, ExtendReply, ExtendRequest, LeaseRef, ReleaseReason, ReleaseRequest, ResultReply, ResultStatus, Subjects,
    WorkReply, WorkReplyKind, WorkRequest, VERSION,
};
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// How long to wait for a saver's answer before resending a result.
const RESULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a work request may be held by the fetcher when nothing is pending.
const WORK_WAIT: Duration = Duration::from_secs(2);

/// Why the mapper could not start.
#[derive(Debug, thiserror::Error)]
pub enum MapperError {
    /// NATS connection set-up failed.
    #[error(transparent)]
    Connect(#[from] common::nats::ConnectError),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] common::metrics::ServeError),
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

/// Leases this mapper holds; `false` once the fetcher says the lease is gone.
type Held = Arc<Mutex<HashMap<LeaseRef, bool>>>;

struct Shared {
    client: Client,
    subjects: Subjects,
    name: String,
    rounds: u32,
    pool: rayon::ThreadPool,
    held: Held,
    lease_ms: AtomicU64,
    chunks: AtomicU64,
    objects: AtomicU64,
    given_back: AtomicU64,
    metrics: metrics::MapperMetrics,
    /// Wakes the heartbeat when a lease is taken, so its first beat comes within a third of it.
    new_lease: tokio::sync::Notify,
    /// Cancelled when the run is over (exit-when-done) or the grace period ends.
    hard_stop: CancellationToken,
}

/// Runs the mapper until `shutdown` (then drains within the grace period) or, with
/// `exit_when_done`, until the fetcher reports the run complete.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<MapperSummary, MapperError> {
    let threads = if config.threads == 0 {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    } else {
        config.threads
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("transform-{i}"))
        .build()
        .map_err(|source| MapperError::Pool { threads, source })?;
    let name = config.nats.instance_name("mapper");
    let metrics = metrics::MapperMetrics::new();
    let subjects = Subjects::new(&config.nats.subject_prefix);
    metrics.common.watch_subjects(&[&subjects.work]);
    let (connection, ready) = common::metrics::start(&config.metrics_addr, &metrics.common, &shutdown).await?;
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    let client =
        common::nats::connect(&config.nats, &format!("chunkmill-mapper {name}"), &connection, &shutdown).await?;
    tracing::info!(
        "mapper {name}: {} rounds, {} chunks at a time, {threads} transform threads",
        config.rounds,
        config.concurrency
    );
    let shared = Arc::new(Shared {
        client,
        subjects,
        name,
        rounds: config.rounds,
        pool,
        held: Arc::default(),
        lease_ms: AtomicU64::new(5000),
        chunks: AtomicU64::new(0),
        objects: AtomicU64::new(0),
        given_back: AtomicU64::new(0),
        metrics,
        new_lease: tokio::sync::Notify::new(),
        hard_stop: CancellationToken::new(),
    });
    let heartbeat = tokio::spawn(heartbeat(shared.clone()));
    let exit_when_done = config.exit_when_done;
    let mut workers = tokio::task::JoinSet::new();
    for id in 0..config.concurrency {
        workers.spawn(worker(shared.clone(), id, shutdown.clone(), exit_when_done));
    }
    let grace = config.shutdown_grace;
    let hard_stop = shared.hard_stop.clone();
    let timer = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
            tracing::warn!("shutdown grace period ({grace:?}) is over: handing back held chunks");
            hard_stop.cancel();
        }
    });
    while workers.join_next().await.is_some() {}
    timer.abort();
    shared.hard_stop.cancel();
    heartbeat.abort();
    let _ = tokio::time::timeout(Duration::from_secs(2), shared.client.flush()).await;
    let summary = MapperSummary {
        chunks: shared.chunks.load(Ordering::Relaxed),
        objects: shared.objects.load(Ordering::Relaxed),
        given_back: shared.given_back.load(Ordering::Relaxed),
    };
    tracing::info!(
        "mapper {} stopped: {} chunks, {} objects saved, {} given back",
        shared.name,
        summary.chunks,
        summary.objects,
        summary.given_back
    );
    Ok(summary)
}

/// Sleeps `duration` unless `token` is cancelled first; true if it slept in full.
async fn pause(duration: Duration, token: &CancellationToken) -> bool {
    tokio::select! {
        _ = token.cancelled() => false,
        _ = tokio::time::sleep(duration) => true,
    }
}

async fn worker(shared: Arc<Shared>, id: u32, shutdown: CancellationToken, exit_when_done: bool) {
    let request = protocol::encode(&WorkRequest {
        v: VERSION,
        mapper: shared.name.clone(),
        wait_ms: WORK_WAIT.as_millis() as u64,
    });
    let mut warned = false;
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() && !shared.hard_stop.is_cancelled() {
        let asked =
            async_nats::Request::new().payload(request.clone()).timeout(Some(WORK_WAIT + Duration::from_secs(3)));
        let waiting = Instant::now();
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = shared.hard_stop.cancelled() => break,
            reply = shared.client.send_request(shared.subjects.work.clone(), asked) => reply,
        };
        shared.metrics.idle.inc_by(waiting.elapsed().as_secs_f64());
        let message = match message {
            Ok(message) => {
                if warned {
                    tracing::info!("worker {id}: the fetcher answers again");
                }
                warned = false;
                backoff = Duration::from_millis(100);
                message
            }
            Err(e) => {
                if !warned {
                    match e.kind() {
                        RequestErrorKind::NoResponders => tracing::warn!(
                            "worker {id}: no fetcher is listening on {}; waiting for one",
                            shared.subjects.work
                        ),
                        _ => tracing::warn!("worker {id}: asking for work failed ({e}); retrying"),
                    }
                    warned = true;
                }
                pause(backoff, &shutdown).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let reply: WorkReply = match protocol::decode(&message.payload) {
            Ok(reply) => reply,
            Err(e) => {
                shared.metrics.common.malformed(&message.subject);
                // A chunk we cannot read is leased to us all the same: give it back as failed, so
                // the fetcher counts it towards --max-attempts instead of re-leasing it forever.
                if let Some(lease) = protocol::decode_lease_only(&message.payload) {
                    let held = LeaseRef { chunk: lease.chunk, lease: lease.lease };
                    let error = format!("the mapper cannot decode chunk {}: {e}", lease.chunk);
                    tracing::error!(chunk = lease.chunk, "worker {id}: {error}; handing it back as failed");
                    shared.metrics.failures.with_label_values(&["chunk"]).inc();
                    shared.given_back.fetch_add(1, Ordering::Relaxed);
                    release(&shared, held, ReleaseReason::Failed, error).await;
                    continue;
                }
                tracing::warn!(
                    subject = %message.subject,
                    "worker {id}: ignoring a work reply: {}",
                    common::text::escaped(&e.to_string())
                );
                pause(Duration::from_secs(1), &shutdown).await;
                continue;
            }
        };
        match (reply.kind, reply.lease) {
            (WorkReplyKind::Chunk, Some(lease)) => {
                let held = LeaseRef { chunk: lease.chunk, lease: lease.lease };
                shared.lease_ms.store(lease.lease_ms.max(100), Ordering::Relaxed);
                process(&shared, held, message.payload).await;
            }
            (WorkReplyKind::Done, _) if exit_when_done => {
                tracing::info!("worker {id}: the fetcher reports the run complete");
                shared.hard_stop.cancel();
                break;
            }
            (WorkReplyKind::Chunk, None) => {
                tracing::warn!("worker {id}: a chunk reply without a lease; ignored");
            }
            (_, _) => {
                let retry = Duration::from_millis(reply.retry_ms.unwrap_or(500).min(5000));
                pause(retry, &shutdown).await;
            }
        }
    }
}

/// Transforms a leased chunk and delivers its result; gives the lease back if it cannot.
async fn process(shared: &Arc<Shared>, lease: LeaseRef, payload: Bytes) {
    shared.held.lock().map(|mut h| h.insert(lease, true)).ok();
    shared.new_lease.notify_one();
    shared.metrics.in_flight.inc();
    let (rounds, name) = (shared.rounds, shared.name.clone());
    let started = Instant::now();
    let mapped = tokio::select! {
        mapped = on_rayon(&shared.pool, move || work::map_chunk(&payload, rounds, &name)) => Some(mapped),
        _ = shared.hard_stop.cancelled() => None,
    };
    let took = started.elapsed().as_secs_f64();
    shared.metrics.busy.inc_by(took);
    let outcome = match mapped {
        // The grace period ended mid-transform: not the chunk's fault, hand it back as such.
        None => Delivery::GiveBack(ReleaseReason::Shutdown, "shutting down mid-transform".into()),
        Some(Ok(mapped)) => {
            shared.metrics.transform.observe(took);
            if mapped.dead > 0 {
                shared.metrics.failures.with_label_values(&["object"]).inc_by(mapped.dead);
                tracing::warn!(
                    chunk = lease.chunk,
                    "chunk {}: {} objects could not be transformed; they go to the dead-letter record",
                    lease.chunk,
                    mapped.dead
                );
            }
            deliver(shared, lease, Bytes::from(mapped.body), mapped.records).await
        }
        Some(Err(error)) => Delivery::GiveBack(ReleaseReason::Failed, error),
    };
    match outcome {
        Delivery::Saved(objects) => {
            shared.chunks.fetch_add(1, Ordering::Relaxed);
            shared.objects.fetch_add(objects, Ordering::Relaxed);
            shared.metrics.chunks.inc();
            shared.metrics.objects.inc_by(objects);
        }
        Delivery::LeaseLost => {
            shared.given_back.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                chunk = lease.chunk,
                "lease of chunk {} is no longer ours; dropping its result",
                lease.chunk
            );
        }
        Delivery::GiveBack(reason, error) => {
            shared.given_back.fetch_add(1, Ordering::Relaxed);
            if reason == ReleaseReason::Failed {
                shared.metrics.failures.with_label_values(&["chunk"]).inc();
                tracing::error!(chunk = lease.chunk, "chunk {} failed: {error}", lease.chunk);
            }
            release(shared, lease, reason, error).await;
        }
    }
    shared.held.lock().map(|mut h| h.remove(&lease)).ok();
    shared.metrics.in_flight.dec();
}

enum Delivery {
    Saved(u64),
    LeaseLost,
    GiveBack(ReleaseReason, String),
}

/// Sends the result to a saver until one confirms it saved and acknowledged, the lease is lost,
/// or the grace period ends. Resending is safe: savers save idempotently.
async fn deliver(shared: &Arc<Shared>, lease: LeaseRef, body: Bytes, objects: u64) -> Delivery {
    let mut backoff = Duration::from_millis(100);
    let mut warned = false;
    loop {
        if shared.held.lock().map(|h| h.get(&lease) == Some(&false)).unwrap_or(false) {
            return Delivery::LeaseLost;
        }
        // Short: a saver that died holding the request never answers, and resending is safe.
        let request = async_nats::Request::new().payload(body.clone()).timeout(Some(RESULT_TIMEOUT));
        let reply = tokio::select! {
            _ = shared.hard_stop.cancelled() => return Delivery::GiveBack(ReleaseReason::Shutdown, "shutting down".into()),
            reply = shared.client.send_request(shared.subjects.result.clone(), request) => reply,
        };
        let problem = match reply {
            Ok(message) => match protocol::decode::<ResultReply>(&message.payload) {
                Ok(ResultReply { status: ResultStatus::Saved, .. }) => return Delivery::Saved(objects),
                Ok(ResultReply { status: ResultStatus::Rejected, error, .. }) => {
                    return Delivery::GiveBack(
                        ReleaseReason::Failed,
                        format!("the saver rejected the result: {}", common::text::escaped(&error.unwrap_or_default())),
                    );
                }
                Ok(ResultReply { status, error, .. }) => {
                    format!("saver answered {status:?}: {}", common::text::escaped(&error.unwrap_or_default()))
                }
                Err(e) => format!("unreadable saver reply: {e}"),
            },
            Err(e) if e.kind() == RequestErrorKind::MaxPayloadExceeded => {
                return Delivery::GiveBack(
                    ReleaseReason::Failed,
                    format!("result of chunk {} is {} bytes, over the NATS server's max_payload ({} bytes); lower the fetcher's --chunk-size", lease.chunk, body.len(), common::nats::max_payload(&shared.client)),
                );
            }
            Err(e) if e.kind() == RequestErrorKind::NoResponders => {
                format!("no saver is listening on {}", shared.subjects.result)
            }
            Err(e) => format!("sending the result failed: {e}"),
        };
        if !warned {
            tracing::warn!(chunk = lease.chunk, "chunk {}: {problem}; retrying", lease.chunk);
            warned = true;
        }
        if !pause(backoff, &shared.hard_stop).await {
            return Delivery::GiveBack(ReleaseReason::Shutdown, "shutting down".into());
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
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
            chunk = lease.chunk,
            "could not hand chunk {} back ({e}); its lease will expire instead",
            lease.chunk
        );
    }
}

/// Extends every held lease a few times per lease period.
async fn heartbeat(shared: Arc<Shared>) {
    loop {
        let period = Duration::from_millis(shared.lease_ms.load(Ordering::Relaxed) / 3).max(Duration::from_millis(30));
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            // A new lease may be shorter than the last: start over with its period.
            _ = shared.new_lease.notified() => continue,
        }
        let leases: Vec<LeaseRef> = match shared.held.lock() {
            Ok(held) => held.iter().filter(|(_, alive)| **alive).map(|(l, _)| *l).collect(),
            Err(_) => continue,
        };
        if leases.is_empty() {
            continue;
        }
        let body = protocol::encode(&ExtendRequest { v: VERSION, mapper: shared.name.clone(), leases: leases.clone() });
        let request = async_nats::Request::new().payload(body).timeout(Some(period.max(Duration::from_millis(500))));
        match shared.client.send_request(shared.subjects.extend.clone(), request).await {
            Ok(message) => match protocol::decode::<ExtendReply>(&message.payload) {
                Ok(reply) => {
                    shared.lease_ms.store(reply.lease_ms.max(100), Ordering::Relaxed);
                    if let Ok(mut held) = shared.held.lock() {
                        for (lease, valid) in leases.iter().zip(reply.valid) {
                            if !valid {
                                if let Some(alive) = held.get_mut(lease) {
                                    *alive = false;
                                }
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!("ignoring an extend reply: {e}"),
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
