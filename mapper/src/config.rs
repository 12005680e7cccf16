//! The mapper's command line. Every flag is also an environment variable.

use std::time::Duration;

use clap::Parser;
use common::config::{parse_duration, NatsArgs};
use common::transform::DEFAULT_ROUNDS;

/// chunkmill mapper: asks the fetcher for chunks, transforms them on all cores, sends the results
/// to a saver, and asks again.
#[derive(Debug, Clone, Parser)]
#[command(name = "mapper", version)]
pub struct Config {
    /// SHA-256 rounds per object (0: no digest, pure pipeline overhead).
    #[arg(long, env = "MAPPER_ROUNDS", default_value_t = DEFAULT_ROUNDS)]
    pub rounds: u32,

    /// Chunks held at once: one is transformed while others travel, so the cores never wait.
    #[arg(long, env = "MAPPER_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub concurrency: u32,

    /// Transform threads (0: one per core).
    #[arg(long, env = "MAPPER_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// On SIGTERM, how long to finish held chunks before handing them back to the fetcher.
    #[arg(long, env = "MAPPER_SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Exit 0 when the fetcher reports the run complete (otherwise wait for the next run).
    #[arg(long, env = "MAPPER_EXIT_WHEN_DONE")]
    pub exit_when_done: bool,

    /// Address of the /metrics, /healthz and /readyz endpoint.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9102")]
    pub metrics_addr: String,

    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
}

impl Config {
    /// Defaults for `nats` (tests and tools).
    pub fn new(nats: NatsArgs) -> Self {
        Config {
            rounds: DEFAULT_ROUNDS,
            concurrency: 4,
            threads: 0,
            shutdown_grace: Duration::from_secs(20),
            exit_when_done: true,
            metrics_addr: "127.0.0.1:0".into(),
            nats,
        }
    }
}
