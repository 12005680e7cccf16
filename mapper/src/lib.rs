//! The mapper: a generic worker that pulls chunks of any job it can run. Three stages keep its
//! cores busy without ever holding more than `--concurrency` chunks waiting for or in the
//! transform, and `--results-in-flight` results travelling to a saver:
//!
//! - the **pump** (`pump`) asks the fetcher for as many chunks as it has room for, in one
//!   request (which is how a mapper says it is ready, and what it can run);
//! - **transformers** (`transformer`) take them in order and run the job's transform on the
//!   rayon pool ([`work`], through `transformer::on_rayon`), never on tokio's thread;
//! - each result is **delivered** (`deliver`) to a saver by its own task, resent until a saver
//!   answers `saved`, while the pump and transformers go on: a transformed chunk frees its room
//!   in `--concurrency` at once, so the next chunk is asked for while the saver's fsyncs and the
//!   fetcher's ack are still under way (their latency would otherwise idle the cores).
//!
//! A heartbeat (`lease`) extends every held lease three times per lease period, so a slow mapper
//! is never mistaken for a dead one; a lease the fetcher no longer recognises is dropped. The job
//! itself comes from the fetcher ([`jobs`]), never from this mapper's flags.
//!
//! On shutdown the pump stops, the chunks in hand are finished within the grace period, and
//! whatever is left is handed back (released), so the fetcher re-leases it at once. This module
//! is the wiring: [`run`], [`run_with`] and [`main_with`].
//!
//! The public surface is what the mapper binary, a user's own mapper binary (examples/), the
//! benchmarks and the end-to-end tests use: [`run`], [`run_with`], [`main_with`], [`Config`],
//! [`MapperSummary`] and [`MapperError`], [`config`] (its flags and metrics address), and
//! [`work::map_chunk`] with [`jobs::Built`] for the benchmarks. Everything else is `pub(crate)`.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod config;
pub mod jobs;
pub(crate) mod metrics;
pub mod work;

mod deliver;
mod lease;
mod pump;
mod transformer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Client;
use bytes::Bytes;
use common::protocol::{ChunkHead, Subjects};
use common::service::Service;
use common::text::escaped;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use transform::Registry;

pub use config::Config;

use deliver::Deliveries;
use lease::{heartbeat, HeldLeases};
use pump::pump;
use transformer::{transformer, TRANSFORMERS};

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

/// What every stage shares.
pub(crate) struct Shared {
    client: Client,
    subjects: Subjects,
    name: String,
    pool: rayon::ThreadPool,
    jobs: jobs::Jobs,
    held: Mutex<HeldLeases>,
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
