//! The fetcher: the one process that owns a run. It scans the input into chunks (byte ranges,
//! never the objects themselves), owns the job (the transform every object goes through, part of
//! the run id), keeps the [`ledger::Ledger`], hands a chunk only to a mapper that asks and can
//! run the job, takes leases back when their mapper goes silent, and marks a chunk done only when
//! a saver acknowledges it as durably saved.
//!
//! This module wires it up ([`run`]); `server` is the one task that owns the ledger.
//!
//! The public surface is what the fetcher binary, the benchmarks and the end-to-end tests use:
//! [`run`] with its [`Config`], [`RunSummary`] and [`FetcherError`] (and [`StoreError`] in it),
//! [`config`] (the command line and its helper commands), [`generate`] (the data sets of
//! `fetcher generate`), [`status`] (what `fetcher status` answers and prints) and [`ledger`]
//! (benchmarked). Every other module is `pub(crate)`.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub(crate) mod commit;
pub mod config;
pub(crate) mod early;
pub(crate) mod events;
pub mod generate;
pub(crate) mod kv_lock;
pub mod ledger;
pub(crate) mod metrics;
pub(crate) mod page;
pub(crate) mod poison;
pub(crate) mod progress;
pub(crate) mod scan;
pub(crate) mod server;
pub mod status;
pub(crate) mod store;

use std::time::Duration;

use common::input::{InputError, InputIndex, ScanOptions};
use common::protocol::Subjects;
use common::service::Service;
use tokio_util::sync::CancellationToken;
use transform::{Job, Registry, Transform};

pub use config::{BadRecords, Config};
use events::Publisher;
use ledger::LedgerStats;
use metrics::FetcherMetrics;
use server::{Io, Server};
pub use store::StoreError;
use store::{FileStore, KvStore, LedgerStore, OtherRun, Recovered, RunRecord};

/// Why the fetcher stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum FetcherError {
    /// No `--input`.
    #[error("no input: pass --input FILE (or a glob, s3://BUCKET/KEY, s3://BUCKET/PREFIX/, gs://, az://, https://) or set FETCHER_INPUT")]
    NoInput,
    /// The input cannot be read.
    #[error(transparent)]
    Input(#[from] InputError),
    /// The input cannot be found, listed or opened (a missing object, refused credentials).
    #[error(transparent)]
    Source(#[from] input::SourceError),
    /// An input object changed during the run: its chunks were no longer handed out.
    #[error("{0}")]
    InputChanged(String),
    /// The state holds an unfinished run of this input whose objects have changed since.
    #[error("the input {input} changed since run {run} was started on it ({finished} of {chunks} chunks done): a run never mixes two versions of its input. Restore the input to resume run {run}, or pass --new-run to start run {new} on the new version")]
    ChangedInput {
        /// The input as given.
        input: String,
        /// The unfinished run.
        run: String,
        /// Its progress.
        finished: u64,
        /// Its chunks.
        chunks: u64,
        /// The run the input makes now.
        new: String,
    },
    /// Invalid records under `--bad-records fail`.
    #[error("input {path} has {count} invalid record(s):\n{listing}\nfix them, or pass --bad-records skip to process the rest (the skipped ones are logged with their lines)")]
    BadRecords {
        /// The input file.
        path: String,
        /// How many.
        count: usize,
        /// The first few, one per line.
        listing: String,
    },
    /// The metrics endpoint or the NATS connection could not start.
    #[error(transparent)]
    Start(#[from] common::service::StartError),
    /// `--summary-json` cannot be written.
    #[error("cannot write the run summary to {path} (--summary-json): {source}")]
    Summary {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
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
    /// The job flags do not make a job.
    #[error(transparent)]
    Job(#[from] transform::spec::JobError),
    /// The job is invalid (a jq program that does not compile).
    #[error("the job cannot run: {0}")]
    Transform(String),
    /// The state holds an unfinished run of the same input with another job.
    #[error("the state directory holds run {run} of this input with another job ({theirs}), {finished} of {chunks} chunks done; this one ({ours}) would be a new run {new}. Finish the old run by starting the fetcher with its job, or remove it, or pass --new-run to start this one anyway")]
    OtherRun {
        /// The unfinished run.
        run: String,
        /// Its job.
        theirs: String,
        /// Its progress.
        finished: u64,
        /// Its chunks.
        chunks: u64,
        /// The job asked for.
        ours: String,
        /// The run id that job gives.
        new: String,
    },
}

/// What a run did, returned when the fetcher stops (and written by `--summary-json`).
#[derive(Debug, Clone, serde::Serialize)]
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
    #[serde(rename = "elapsed_seconds", serialize_with = "as_seconds")]
    pub elapsed: Duration,
    /// How long the input scan took (zero until [`run`] fills it in).
    #[serde(rename = "scan_seconds", serialize_with = "as_seconds")]
    pub scan: Duration,
    /// Bytes of input scanned (decompressed), every object together.
    pub input_bytes: u64,
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

/// The job from the flags, checked, and the transform built from it when the scan checks
/// records by its rules (the digest's users schema). A jq program is compiled here, so one that
/// does not compile is refused before the fetcher connects anywhere; it is run only by mappers.
pub(crate) fn load_job(config: &Config) -> Result<(Job, Option<std::sync::Arc<dyn Transform>>), FetcherError> {
    let job = config.job.job()?;
    let built = match &job.transform {
        transform::TransformSpec::Digest { .. } => {
            Some(Registry::builtin().build(&job.transform).map_err(|e| FetcherError::Transform(e.to_string()))?)
        }
        transform::TransformSpec::Jq { filter } => {
            transform::jq::check(filter).map_err(|e| FetcherError::Transform(e.to_string()))?;
            None
        }
        // Commands and Rust transforms live in the mappers; the fetcher only names them.
        _ => None,
    };
    Ok((job, built))
}

/// Opens the input (see [`scan::open`]) and scans it under `job`, reporting progress into
/// `metrics`; applies the bad-records policy.
pub(crate) async fn load_input(
    config: &Config,
    job: &Job,
    transform: Option<std::sync::Arc<dyn Transform>>,
    metrics: &scan::InputMetrics,
) -> Result<InputIndex, FetcherError> {
    let input = config.input.clone().ok_or(FetcherError::NoInput)?.display().to_string();
    let state_dir = config.state_dir.clone();
    let opened = metrics.clone();
    let opened_input = input.clone();
    let spool = config.spool.limits();
    let source = tokio::task::spawn_blocking(move || scan::open(&opened_input, &state_dir, spool, &opened))
        .await
        .map_err(|e| FetcherError::Scan(e.to_string()))??;
    if source.objects().len() > 1 {
        tracing::info!(
            "input {input}: {} objects, {:.1} MB, in {} order",
            source.objects().len(),
            source.total_size() as f64 / 1e6,
            if source.location().is_remote() { "key" } else { "path" }
        );
    }
    let done = CancellationToken::new();
    let reporter = tokio::spawn(scan::report(source.clone(), metrics.clone(), done.clone()));
    let index = scan_in_pool(config, job, transform, source, &input).await;
    done.cancel();
    let _ = reporter.await;
    let index = index?;
    if index.bom {
        tracing::info!("input {} starts with a UTF-8 byte-order mark; skipped", index.input);
    }
    apply_bad_records(config.bad_records, &index)?;
    Ok(index)
}

/// Scans `source` under `job` on the blocking pool: the records' checks, the duplicate-id check
/// (bounded by `--duplicate-check-memory`, spilling into the state directory) and the chunks.
async fn scan_in_pool(
    config: &Config,
    job: &Job,
    transform: Option<std::sync::Arc<dyn Transform>>,
    source: input::Source,
    input: &str,
) -> Result<InputIndex, FetcherError> {
    let chunk_size = config.chunk_size;
    let id_field = job.id_field.clone().filter(|_| !config.no_duplicate_check);
    let fingerprint = job.fingerprint();
    let dup_memory = config.duplicate_check_memory.saturating_mul(1 << 20) as usize;
    let spill_dir = config.state_dir.clone();
    let input = input.to_string();
    tokio::task::spawn_blocking(move || {
        let check = |record: &[u8]| transform.as_ref().map_or(Ok(()), |t| t.check(record));
        let id = |record: &[u8]| id_field.as_ref().and_then(|f| f.key(record));
        let options = ScanOptions {
            check: Some(&check),
            id: Some(&id).filter(|_| id_field.is_some()).map(|f| f as _),
            job: &fingerprint,
            dup_memory,
            spill_dir: Some(&spill_dir),
        };
        common::input::scan_source(std::sync::Arc::new(source), &input, chunk_size, &options)
    })
    .await
    .map_err(|e| FetcherError::Scan(e.to_string()))?
    .map_err(FetcherError::from)
}

/// The bad-records policy: with `fail`, invalid records stop the run before it starts (the
/// first 20 listed); with `skip`, each is logged and left out.
fn apply_bad_records(policy: BadRecords, index: &InputIndex) -> Result<(), FetcherError> {
    if index.bad.is_empty() {
        return Ok(());
    }
    match policy {
        BadRecords::Fail => {
            let listing: String = index
                .bad
                .iter()
                .take(20)
                .map(|b| format!("  {}: {}\n", index.locate(b), b.error))
                .chain((index.bad.len() > 20).then(|| format!("  ... and {} more\n", index.bad.len() - 20)))
                .collect();
            Err(FetcherError::BadRecords {
                path: index.input.clone(),
                count: index.bad.len(),
                listing: listing.trim_end().to_string(),
            })
        }
        BadRecords::Skip => {
            for bad in &index.bad {
                tracing::warn!(
                    line = bad.line,
                    "skipping invalid record in {}, {}: {}",
                    index.input,
                    index.locate(bad),
                    bad.error
                );
            }
            Ok(())
        }
    }
}

/// Refuses to start a run while an unfinished run of the same input with another job is in the
/// store (unless `--new-run`): changing a flag by mistake must not leave the old run half done.
fn check_other_runs(config: &Config, record: &RunRecord, others: &[OtherRun]) -> Result<(), FetcherError> {
    for other in others {
        if other.finished >= other.record.chunks {
            continue;
        }
        if other.record.content != record.content {
            // The same input (as given) with the same job and chunk size, and other content:
            // the input changed under an unfinished run.
            if config.new_run {
                tracing::warn!(
                    "input {} changed since run {} was started on it ({} of {} chunks done); starting run {} on the new version (--new-run)",
                    record.input,
                    other.record.run,
                    other.finished,
                    other.record.chunks,
                    record.run
                );
                continue;
            }
            return Err(FetcherError::ChangedInput {
                input: record.input.clone(),
                run: other.record.run.clone(),
                finished: other.finished,
                chunks: other.record.chunks,
                new: record.run.clone(),
            });
        }
        if config.new_run {
            tracing::warn!(
                "run {} of this input with another job ({}) is unfinished ({} of {} chunks); starting run {} anyway (--new-run)",
                other.record.run,
                other.record.describe,
                other.finished,
                other.record.chunks,
                record.run
            );
            continue;
        }
        return Err(FetcherError::OtherRun {
            run: other.record.run.clone(),
            theirs: other.record.describe.clone(),
            finished: other.finished,
            chunks: other.record.chunks,
            ours: record.describe.clone(),
            new: record.run.clone(),
        });
    }
    Ok(())
}

/// Runs the fetcher until the run completes (with `exit_when_done`) or `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<RunSummary, FetcherError> {
    // First: a job that cannot run (a jq program that does not compile) is refused at once, not
    // once NATS is reachable.
    let (job, transform) = load_job(&config)?;
    let metrics = FetcherMetrics::new();
    let service = Service::start(
        "fetcher",
        &config.nats,
        common::metrics::MetricsAddr::new(config.metrics_addr.as_deref(), config::DEFAULT_METRICS_ADDR),
        &metrics.common,
        &shutdown,
    )
    .await?;
    let (pages, page) = page::pages();
    service.set_pages(pages);
    let client = service.connect(&config.nats, &shutdown).await?;
    let name = service.name.clone();
    // Mappers asking while we scan are held, not told "no responders" (which pauses them).
    let early = early::EarlyWork::start(&client, &Subjects::new(&config.nats.subject_prefix)).await?;
    let input_metrics = scan::InputMetrics::new(metrics.common.maker());
    let scan_started = std::time::Instant::now();
    let index = load_input(&config, &job, transform, &input_metrics).await?;
    let scan = scan_started.elapsed();
    log_scan(&index, scan, &job);
    let record = run_record(&index, &job);
    let (store, recovered, others) = open_store(&config, &client, &record, &name, &shutdown).await?;
    // With --ledger kv: released when the store is dropped (the run served, or an error), so a
    // successor takes it at once; waited for below, so the process does not exit first.
    let lock = store.lock();
    let parts = Parts { job, index, scan, client, metrics, service, page, early };
    let outcome = serve(config, parts, store, (recovered, others, record), shutdown).await;
    if let Some(lock) = lock {
        lock.wait_released(Duration::from_secs(2)).await;
    }
    outcome
}

/// What [`serve`] needs of what [`run`] set up.
struct Parts {
    job: Job,
    index: InputIndex,
    /// How long the input scan took.
    scan: Duration,
    client: async_nats::Client,
    metrics: FetcherMetrics,
    service: Service,
    page: page::StatusRequests,
    early: early::EarlyWork,
}

/// Checks the other runs in the store, records this one, and serves it until it completes (with
/// `--exit-when-done`) or `shutdown`.
async fn serve(
    config: Config,
    parts: Parts,
    store: LedgerStore,
    (recovered, others, record): (Recovered, Vec<OtherRun>, RunRecord),
    shutdown: CancellationToken,
) -> Result<RunSummary, FetcherError> {
    let Parts { job, index, scan, client, metrics, service, page, early } = parts;
    let name = service.name.clone();
    check_other_runs(&config, &record, &others)?;
    store.record_run(&record).await?;
    let fresh = recovered.is_fresh();
    let events = match config.events {
        config::Events::On => Publisher::start(client.clone(), config.nats.subject_prefix.clone()),
        config::Events::Off => Publisher::off(),
    };
    // Kept to the end of the run: dropping it would leave the NATS service API.
    let micro = service.register(&client, &config.nats.subject_prefix, &shutdown).await;
    let status = match &micro {
        Some(micro) => status_endpoint(micro, &config.nats.subject_prefix).await,
        None => None,
    };
    let early = early.finish().await;
    let io = Io { client, metrics, events, ready: service.readiness(), status, page, early };
    let summary_json = config.summary_json.clone();
    let mut server = Server::new(config, job, index, io, store, recovered)?;
    if fresh {
        server.record_bad_records().await?;
    }
    server.announce(fresh, &name);
    let summary = RunSummary { scan, ..server.serve(shutdown).await? };
    if let Some(path) = summary_json {
        write_summary(&path, &summary)?;
    }
    Ok(summary)
}

/// The scan's one summary line.
fn log_scan(index: &InputIndex, scan: Duration, job: &Job) {
    let input_bytes: u64 = index.parts.iter().map(|p| p.len).sum();
    tracing::info!(
        run = %index.run_id,
        "input {}: {} objects in {} chunks of up to {} ({} invalid records skipped), {:.1} MB scanned in {:.2} s ({:.0} MB/s); job: {}",
        index.input,
        index.objects,
        index.chunks.len(),
        index.chunk_size,
        index.bad.len(),
        input_bytes as f64 / 1e6,
        scan.as_secs_f64(),
        input_bytes as f64 / 1e6 / seconds(scan),
        job.describe()
    );
}

/// What the store records about this run.
fn run_record(index: &InputIndex, job: &Job) -> RunRecord {
    RunRecord {
        run: index.run_id.clone(),
        input: index.input.clone(),
        content: index.content.clone(),
        chunk_size: index.chunk_size,
        chunks: index.chunks.len() as u64,
        objects: index.objects,
        job: common::json::to_value_own(job),
        describe: job.describe(),
    }
}

/// Opens the ledger's store (`--ledger`): what it recovered of this run, and the other runs it
/// holds.
async fn open_store(
    config: &Config,
    client: &async_nats::Client,
    record: &RunRecord,
    name: &str,
    shutdown: &CancellationToken,
) -> Result<(LedgerStore, Recovered, Vec<OtherRun>), FetcherError> {
    Ok(match config.ledger {
        config::LedgerKind::File => {
            let (store, recovered, others) = FileStore::open(&config.state_dir, record)?;
            (LedgerStore::File(store), recovered, others)
        }
        config::LedgerKind::Kv => {
            let (store, recovered, others) =
                KvStore::open(client, &config.kv_bucket, record, name, config.lock_ttl, config.kv_replicas, shutdown)
                    .await?;
            (LedgerStore::Kv(Box::new(store)), recovered, others)
        }
    })
}

/// The `status` endpoint (`fetcher status`) of the fetcher's NATS micro service, if the server
/// lets it be served.
async fn status_endpoint(
    micro: &async_nats::service::Service,
    prefix: &str,
) -> Option<async_nats::service::endpoint::Endpoint> {
    let subject = Subjects::new(prefix).status;
    match micro.endpoint_builder().name("status").add(subject.clone()).await {
        Ok(endpoint) => Some(endpoint),
        Err(e) => {
            tracing::warn!("cannot serve {subject} (fetcher status): {e}");
            None
        }
    }
}

fn as_seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Writes `summary` as JSON to `path` (whole or not at all: a temporary file renamed over it).
fn write_summary(path: &std::path::Path, summary: &RunSummary) -> Result<(), FetcherError> {
    let error = |source| FetcherError::Summary { path: path.to_path_buf(), source };
    let body = serde_json::to_vec_pretty(summary).map_err(std::io::Error::other).map_err(error)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, body).and_then(|()| std::fs::rename(&tmp, path)).map_err(error)
}

/// How long a run took, for the summary.
pub(crate) fn seconds(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-6)
}
