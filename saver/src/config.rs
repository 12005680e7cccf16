//! The saver's command line: `saver --out DIR` saves, `saver verify` checks a sink against its
//! input. Every flag is also an environment variable.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use common::config::NatsArgs;
use common::transform::DEFAULT_ROUNDS;

/// chunkmill saver: saves processed chunks durably and idempotently, then acknowledges them to
/// the fetcher.
#[derive(Debug, Parser)]
#[command(name = "saver", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// A helper command instead of saving.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Saver settings.
    #[command(flatten)]
    pub run: Config,
}

/// Helper commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Compare a sink with the input it was made from: counts missing, duplicated and wrong objects.
    Verify(VerifyArgs),
}

/// `saver verify`.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// The input file the run read.
    #[arg(long)]
    pub input: PathBuf,
    /// The sink directory.
    #[arg(long, default_value = "out")]
    pub out: PathBuf,
    /// The mappers' rounds.
    #[arg(long, default_value_t = DEFAULT_ROUNDS)]
    pub rounds: u32,
    /// The fetcher's chunk size (it selects the run directory).
    #[arg(long, default_value_t = 100)]
    pub chunk_size: u32,
}

/// Settings of a saver.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Directory of the file sink: one JSON Lines file per chunk under OUT/<run>/.
    #[arg(long, env = "SAVER_OUT", default_value = "out")]
    pub out: PathBuf,

    /// Results saved at once; more wait in NATS's buffer, bounded by the mappers' concurrency.
    #[arg(long, env = "SAVER_MAX_IN_FLIGHT", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_in_flight: u32,

    /// Address of the /metrics, /healthz and /readyz endpoint.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9103")]
    pub metrics_addr: String,

    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
}

impl Config {
    /// Defaults for `out` and `nats` (tests and tools).
    pub fn new(out: impl Into<PathBuf>, nats: NatsArgs) -> Self {
        Config { out: out.into(), max_in_flight: 64, metrics_addr: "127.0.0.1:0".into(), nats }
    }
}
