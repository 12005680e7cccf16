//! The mapper's command line. Every flag is also an environment variable. The job (what each
//! object becomes) is not here: the fetcher owns it and tells the mappers; a mapper only says
//! which transforms it can run, and which programs its operator allows (`--command`).

use std::time::Duration;

use clap::Parser;
use common::config::{parse_duration, NatsArgs};
use transform::command::{CommandOptions, CommandSpec};

/// Where the metrics endpoint listens when `--metrics-addr` is not given.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9102";

/// chunkmill mapper: asks the fetcher for chunks of any job it can run, transforms them on all
/// cores, sends the results to a saver, and asks again.
#[derive(Debug, Clone, Parser)]
#[command(name = "mapper", version = common::metrics::LONG_VERSION)]
pub struct Config {
    /// A program this mapper may run for a job's `--transform command --command NAME`:
    /// `NAME=PROGRAM [ARGS...]` (quotes group words). Repeat the flag for more; in the
    /// environment, MAPPER_COMMANDS holds one per line. The fetcher can only name these.
    #[arg(long = "command", env = "MAPPER_COMMANDS", value_delimiter = '\n', value_parser = parse_command)]
    pub commands: Vec<CommandSpec>,

    /// Longest a command may take for one object before its child is restarted and the object
    /// retried, then dead-lettered.
    #[arg(long, env = "MAPPER_COMMAND_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub command_timeout: Duration,

    /// Child processes per command (0: one per transform thread).
    #[arg(long, env = "MAPPER_COMMAND_WORKERS", default_value_t = 0)]
    pub command_workers: usize,

    /// Fresh children of a command that may fail in a row before answering anything; then the
    /// command is broken on this mapper: its chunks are handed back as `cannot_run` instead of
    /// their objects being dead-lettered (a program that exits at once, a missing model file).
    #[arg(long, env = "MAPPER_COMMAND_BREAKER", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub command_breaker: u32,

    /// Time and memory limits of a jq job's objects (each transform thread runs jq in a sandbox
    /// process of this binary).
    #[command(flatten)]
    pub jq: transform::jq::JqLimitArgs,

    /// Chunks in hand at once (leased and not yet transformed): a few transform while the next
    /// wait in hand, so the cores never wait for a round trip to the fetcher.
    #[arg(long, env = "MAPPER_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub concurrency: u32,

    /// Results travelling to a saver at once (transformed, not yet saved). Their leases stay
    /// held and extended; each costs its result's bytes of memory (at most NATS max_payload).
    /// Enough of them hide the saver's fsyncs and the fetcher's ack from the transform pool.
    #[arg(long, env = "MAPPER_RESULTS_IN_FLIGHT", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub results_in_flight: u32,

    /// Transform threads (0: the CPUs this process may use, cgroup quota included).
    #[arg(long, env = "MAPPER_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// On SIGTERM, how long to finish held chunks before handing them back to the fetcher.
    #[arg(long, env = "MAPPER_SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Exit 0 when the fetcher reports the run complete (otherwise wait for the next run).
    #[arg(long, env = "MAPPER_EXIT_WHEN_DONE")]
    pub exit_when_done: bool,

    /// Address of the /metrics, /healthz and /readyz endpoint; when the default port is taken
    /// (a second replica on one host), any free one, logged [default: 0.0.0.0:9102]
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<String>,

    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
}

fn parse_command(text: &str) -> Result<CommandSpec, String> {
    text.parse()
}

impl Config {
    /// Defaults for `nats` (tests and tools).
    pub fn new(nats: NatsArgs) -> Self {
        Config {
            commands: Vec::new(),
            command_timeout: Duration::from_secs(30),
            command_workers: 0,
            command_breaker: 10,
            jq: transform::jq::JqLimitArgs::default(),
            concurrency: 8,
            results_in_flight: 32,
            threads: 0,
            shutdown_grace: Duration::from_secs(20),
            exit_when_done: true,
            metrics_addr: Some("127.0.0.1:0".into()),
            nats,
        }
    }

    /// Transform threads: `--threads`, else the CPUs this process may use.
    pub fn transform_threads(&self) -> usize {
        if self.threads > 0 {
            return self.threads;
        }
        // Rust's count follows the cgroup CPU quota (a pod's limit), not the node's cores.
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    }

    /// How command children run.
    pub fn command_options(&self) -> CommandOptions {
        let workers = if self.command_workers == 0 { self.transform_threads() } else { self.command_workers };
        CommandOptions {
            workers,
            timeout: self.command_timeout,
            breaker: self.command_breaker,
            ..CommandOptions::default()
        }
    }
}
