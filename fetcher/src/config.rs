//! The fetcher's command line: `fetcher --input FILE ...` runs a pipeline, `fetcher generate`
//! writes a data set. Every flag is also an environment variable.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use common::config::{parse_duration, NatsArgs};

use crate::generate::OutputFormat;

fn parse_lock_ttl(text: &str) -> Result<Duration, String> {
    let ttl = parse_duration(text)?;
    if ttl < Duration::from_secs(1) {
        return Err("the lock TTL is at least 1s (it is refreshed every third of it)".into());
    }
    Ok(ttl)
}

fn parse_percent(text: &str) -> Result<f64, String> {
    match text.trim().trim_end_matches('%').parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("`{text}` is not a percentage from 0 to 100")),
    }
}

/// The process's command line, after the job file of `--job` (`FETCHER_JOB`): its settings are
/// the defaults of their flags (transform::job_file). Exits as clap does on an error.
pub fn parse_cli() -> Cli {
    transform::job_file::parse_cli()
}

/// Where the metrics endpoint listens when `--metrics-addr` is not given.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9101";

/// chunkmill fetcher: reads the input, hands chunks to mappers that ask, and keeps the ledger
/// until savers confirm every chunk.
#[derive(Debug, Parser)]
#[command(name = "fetcher", version = common::metrics::LONG_VERSION, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Cli {
    /// A helper command instead of running the pipeline.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Run settings.
    #[command(flatten)]
    pub run: Config,
}

/// Helper commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a deterministic data set (mock users, or shop orders).
    Generate(GenerateArgs),
    /// Ask the running fetcher how far its run is (chunks, objects/s, ETA, per mapper).
    // Boxed: its NATS arguments make it much larger than `Generate`.
    Status(Box<StatusArgs>),
}

/// `fetcher status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print the answer as JSON (the fields of docs/PROTOCOL.md's status reply).
    #[arg(long)]
    pub json: bool,
    /// How long to wait for NATS and for the fetcher's answer.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
}

/// `fetcher generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// What to generate: `users` (the digest job's data) or `orders` (for jq and command jobs).
    #[arg(long, value_enum, default_value = "users")]
    pub kind: crate::generate::Kind,
    /// Number of objects.
    #[arg(long, default_value_t = 100_000)]
    pub objects: u64,
    /// Seed: the same seed gives a byte-identical file.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output file.
    #[arg(long)]
    pub output: PathBuf,
    /// Layout: JSON Lines or one JSON array.
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: OutputFormat,
}

/// What to do with input records that are not valid (not strict JSON objects, refused by the
/// job's own check such as the digest's users schema, or a repeated id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BadRecords {
    /// Refuse to start and list them: nothing runs on data you did not expect.
    Fail,
    /// Leave them out, log each with its line, and report them in the run summary.
    Skip,
}

/// Where the durable ledger lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LedgerKind {
    /// An fsynced log in --state-dir (a PersistentVolume in Kubernetes).
    File,
    /// A NATS JetStream key-value bucket (--kv-bucket): no volume needed.
    Kv,
}

/// Whether the fetcher publishes pipeline events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Events {
    /// Publish run started, milestones, dead letters, completion and resumes to JetStream
    /// (`<prefix>.events.<kind>`) for the broadcaster; dropped quietly if there is no stream.
    On,
    /// Publish nothing.
    Off,
}

/// Settings of a pipeline run.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Input data (JSON Lines, or one JSON array, per file): a file, a quoted glob
    /// ('data/part-*.jsonl'), s3://BUCKET/KEY, s3://BUCKET/PREFIX/ (every object under it, in key
    /// order), gs://, az://, https://HOST/PATH; .gz and .zst are decompressed (spooled once to
    /// STATE_DIR/spool). Store credentials come from the store's standard variables (AWS_*,
    /// GOOGLE_*, AZURE_*, each secret also as NAME_FILE).
    #[arg(long, env = "FETCHER_INPUT", required = true)]
    pub input: Option<PathBuf>,

    /// The job: what each object becomes.
    #[command(flatten)]
    pub job: transform::JobArgs,

    /// Start this run although the state directory holds an unfinished run of the same input
    /// with another job (by default the fetcher refuses: a changed flag, or a restart with
    /// another configuration, would otherwise leave the old run half done).
    #[arg(long, env = "FETCHER_NEW_RUN")]
    pub new_run: bool,

    /// Objects per chunk.
    #[arg(long, env = "FETCHER_CHUNK_SIZE", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub chunk_size: u32,

    /// How long a lease lasts without a heartbeat from its mapper (e.g. 500ms, 5s, 2m).
    #[arg(long, env = "FETCHER_LEASE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub lease_timeout: Duration,

    /// Failed attempts after which a chunk is dead-lettered instead of retried.
    #[arg(long, env = "FETCHER_MAX_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=255))]
    pub max_attempts: u32,

    /// Exit 0 once every chunk is done (otherwise stay up and report the run complete).
    #[arg(long, env = "FETCHER_EXIT_WHEN_DONE")]
    pub exit_when_done: bool,

    /// Write the run's summary (the last log line's numbers) as JSON to this file when the
    /// fetcher stops, for scripts and tests: its fields do not change when the log is reworded.
    #[arg(long, env = "FETCHER_SUMMARY_JSON")]
    pub summary_json: Option<PathBuf>,

    /// Invalid input records: `fail` (default: refuse to start, listing them) or `skip`.
    #[arg(long, env = "FETCHER_BAD_RECORDS", value_enum, default_value = "fail")]
    pub bad_records: BadRecords,

    /// Directory of the durable ledger (a PersistentVolume in Kubernetes): a restarted fetcher
    /// resumes from it, and its lock keeps a second fetcher out.
    #[arg(long, env = "FETCHER_STATE_DIR", default_value = "state")]
    pub state_dir: PathBuf,

    /// How much of the state directory the decompressed copies of compressed inputs may take.
    #[command(flatten)]
    pub spool: input::SpoolArgs,

    /// Skip the duplicate-id check of the input scan (ids at --id-field), e.g. for ids known
    /// to be unique: it saves the check's memory (see --duplicate-check-memory) or its spill.
    #[arg(long, env = "FETCHER_NO_DUPLICATE_CHECK")]
    pub no_duplicate_check: bool,

    /// MiB of memory the duplicate-id check may use (64 MiB hold about 0.9 M ids); past it the
    /// check spills its hashes to --state-dir (32 bytes an object) and finds the duplicates
    /// after the scan, so a large input fits a small memory limit.
    #[arg(long, env = "FETCHER_DUPLICATE_CHECK_MEMORY", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1048576))]
    pub duplicate_check_memory: u64,

    /// Where the durable ledger lives: `file` (in --state-dir) or `kv` (JetStream key-value).
    #[arg(long, env = "FETCHER_LEDGER", value_enum, default_value = "file")]
    pub ledger: LedgerKind,

    /// The JetStream key-value bucket of `--ledger kv` (its lock is in `<bucket>-lock`).
    #[arg(long, env = "FETCHER_KV_BUCKET", default_value = "chunkmill-ledger")]
    pub kv_bucket: String,

    /// With `--ledger kv`: how many NATS servers keep a copy of the ledger and lock buckets
    /// (JetStream replicas, 1 to 5). 1 for a single server; 3 on a 3-node cluster, so the
    /// ledger survives losing a node. An existing bucket is changed to this count.
    #[arg(long, env = "FETCHER_KV_REPLICAS", default_value = "1", value_parser = common::jetstream::parse_replicas)]
    pub kv_replicas: usize,

    /// With `--ledger kv`: how long the single-fetcher lock outlives its last refresh (it is
    /// refreshed every third of this). A fetcher that cannot refresh it for this long stops
    /// serving until it holds it again; another fetcher can take it over after this long.
    #[arg(long, env = "FETCHER_LOCK_TTL", default_value = "15s", value_parser = parse_lock_ttl)]
    pub lock_ttl: Duration,

    /// How often the progress line is logged while the run is not complete (e.g. 10s, 1m).
    #[arg(long, env = "FETCHER_PROGRESS_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub progress_interval: Duration,

    /// Also log the progress line each time this many percent more of the run's chunks are
    /// finished, at most once a second (0: by time only).
    #[arg(long, env = "FETCHER_PROGRESS_STEP", default_value_t = 1.0, value_parser = parse_percent)]
    pub progress_step: f64,

    /// Pipeline events for the broadcaster (docs/PROTOCOL.md §11): `on` or `off`.
    #[arg(long, env = "FETCHER_EVENTS", value_enum, default_value = "on")]
    pub events: Events,

    /// Address of the /metrics, /healthz and /readyz endpoint; when the default port is taken
    /// (a second replica on one host), any free one, logged [default: 0.0.0.0:9101]
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<String>,

    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
}

impl Config {
    /// Where the ledger is kept, for people: the state directory or the JetStream bucket.
    pub fn ledger_location(&self) -> String {
        match self.ledger {
            LedgerKind::File => self.state_dir.display().to_string(),
            LedgerKind::Kv => format!("JetStream bucket {}", self.kv_bucket),
        }
    }

    /// When progress lines are due.
    pub(crate) fn progress(&self) -> crate::progress::Settings {
        crate::progress::Settings { interval: self.progress_interval, step_percent: self.progress_step }
    }

    /// A configuration for `input` with defaults (tests and tools).
    pub fn new(input: impl Into<PathBuf>, nats: NatsArgs) -> Self {
        Config {
            input: Some(input.into()),
            job: transform::JobArgs::default(),
            new_run: false,
            chunk_size: 100,
            lease_timeout: Duration::from_secs(5),
            max_attempts: 3,
            exit_when_done: true,
            summary_json: None,
            bad_records: BadRecords::Fail,
            metrics_addr: Some("127.0.0.1:0".into()),
            state_dir: PathBuf::from("state"),
            spool: input::SpoolArgs::default(),
            ledger: LedgerKind::File,
            no_duplicate_check: false,
            duplicate_check_memory: 64,
            kv_bucket: "chunkmill-ledger".into(),
            kv_replicas: 1,
            lock_ttl: crate::store::KV_LOCK_TTL,
            events: Events::On,
            progress_interval: std::time::Duration::from_secs(10),
            progress_step: 1.0,
            nats,
        }
    }
}
