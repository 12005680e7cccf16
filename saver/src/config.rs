//! The saver's command line: `saver --out DIR` saves, `saver verify` checks a sink against its
//! input. Every flag is also an environment variable.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use common::config::NatsArgs;

use crate::sink::{SinkConfig, SinkContext, SinkError, SinkKind, SINKS};

/// The process's command line, after the job file of `saver verify --job` (`FETCHER_JOB`): its
/// settings are the defaults of verify's flags (transform::job_file). Exits as clap does on an
/// error.
pub fn parse_cli() -> Cli {
    transform::job_file::parse_cli()
}

/// Where the metrics endpoint listens when `--metrics-addr` is not given.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9103";

/// chunkmill saver: saves processed chunks durably and idempotently, then acknowledges them to
/// the fetcher.
#[derive(Debug, Parser)]
#[command(name = "saver", version = common::metrics::LONG_VERSION, args_conflicts_with_subcommands = true)]
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
    /// Compare a sink with the input and job it was made from: recomputes the transform (digest,
    /// jq, Rust) and compares every output value, or checks a command job for completeness.
    Verify(VerifyArgs),
}

/// `saver verify`.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// The input the run read, as given to the fetcher (a file, a glob, s3://BUCKET/KEY,
    /// s3://BUCKET/PREFIX/, gs://, az://, https://).
    #[arg(long)]
    pub input: PathBuf,
    /// The file sink's directory.
    #[arg(long, default_value = "out")]
    pub out: PathBuf,
    /// The sink to read (as the saver's --sink): a postgres:// URL reads the database instead of --out.
    #[command(flatten)]
    pub sink: SinkArgs,
    /// The run's job, with the same flags (and FETCHER_* variables) as the fetcher.
    #[command(flatten)]
    pub job: transform::JobArgs,
    /// The fetcher's chunk size (part of the run id).
    #[arg(long, env = "FETCHER_CHUNK_SIZE", default_value_t = 100)]
    pub chunk_size: u32,
    /// The mappers' jq limits (MAPPER_JQ_* too): an object over them is expected dead-lettered.
    #[command(flatten)]
    pub jq: transform::jq::JqLimitArgs,
    /// For a command job: run the command too and compare its outputs (needs --recompute-with).
    #[arg(long)]
    pub recompute: bool,
    /// For a command job with --recompute: the program, as a mapper registers it
    /// (`NAME=PROGRAM [ARGS...]`).
    #[arg(long, value_parser = parse_command)]
    pub recompute_with: Vec<transform::command::CommandSpec>,
    /// How many dead-lettered objects to list with their reasons.
    #[arg(long, default_value_t = 10)]
    pub show_dead: usize,
    /// As the fetcher's --no-duplicate-check: scan without the duplicate-id check (a run
    /// scanned without it cuts other chunks, so verify must scan the same way).
    #[arg(long, env = "FETCHER_NO_DUPLICATE_CHECK")]
    pub no_duplicate_check: bool,
    /// As the fetcher's: how much verify's own spool (compressed inputs decompressed into the
    /// system's temporary directory) may hold.
    #[command(flatten)]
    pub spool: input::SpoolArgs,
}

fn parse_command(text: &str) -> Result<transform::command::CommandSpec, String> {
    text.parse()
}

/// Settings of a saver.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Directory of the file sink: JSON Lines part files and an index under OUT/<run>/.
    #[arg(long, env = "SAVER_OUT", default_value = "out")]
    pub out: PathBuf,

    /// Where to save instead of files.
    #[command(flatten)]
    pub sink: SinkArgs,

    /// PostgreSQL connections: batches committed at once by this saver.
    #[arg(long, env = "SAVER_PG_POOL", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub pg_pool: u32,

    /// The most a batch waits for more results after its first. It waits for about 8 of the
    /// recent gaps between results, at least 10 ms, up to this: at a moderate rate several
    /// chunks then share one commit (two fsyncs, or one transaction) and one ack request, which
    /// saves CPU in the saver, the fetcher and NATS, while the last batch of a run waits only a
    /// few chunks' worth of time. Each chunk is saved up to this much later. 0 commits whatever
    /// has queued at once.
    #[arg(long, env = "SAVER_COMMIT_WINDOW", default_value = "50ms", value_parser = common::config::parse_duration)]
    pub commit_window: std::time::Duration,

    /// Results saved at once; more wait in NATS's buffer, bounded by the mappers' concurrency.
    #[arg(long, env = "SAVER_MAX_IN_FLIGHT", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_in_flight: u32,

    /// Address of the /metrics, /healthz and /readyz endpoint; when the default port is taken
    /// (a second replica on one host), any free one, logged [default: 0.0.0.0:9103]
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<String>,

    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
}

impl Config {
    /// Defaults for `out` and `nats` (tests and tools).
    pub fn new(out: impl Into<PathBuf>, nats: NatsArgs) -> Self {
        Config {
            out: out.into(),
            sink: SinkArgs::default(),
            pg_pool: 4,
            max_in_flight: 64,
            commit_window: std::time::Duration::from_millis(50),
            metrics_addr: Some("127.0.0.1:0".into()),
            nats,
        }
    }
}

/// The sink choice and each sink's own flags, shared by saving and `verify`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SinkArgs {
    /// `file` (the default: --out), an object-store prefix, s3://BUCKET/PREFIX/ (gs://, az://, or
    /// file:///DIR/ for the same layout in a directory: parts, a manifest and _SUCCESS per run), or
    /// a PostgreSQL URL, postgres://USER@HOST:PORT/DATABASE; put the
    /// password in --pg-password-file rather than in the URL. TLS as libpq: ?sslmode=disable,
    /// prefer (default), require, verify-ca or verify-full, and &sslrootcert=/path/ca.pem (the CA
    /// to trust; without it verify-* trust the system's roots).
    #[arg(long, env = "SAVER_SINK", hide_env_values = true, default_value = "file", value_parser = SinkParser)]
    pub sink: SinkChoice,

    /// The PostgreSQL sink's flags.
    #[command(flatten)]
    pub postgres: crate::sink::postgres::PgArgs,

    /// The object-store sink's flags.
    #[command(flatten)]
    pub object: crate::sink::object::ObjectArgs,
}

/// A parsed `--sink`: the kind of sink it names, and its text (which may hold a password: never
/// print it, use [`Self::describe`]).
#[derive(Clone)]
pub struct SinkChoice {
    kind: &'static dyn SinkKind,
    text: String,
}

impl Default for SinkChoice {
    fn default() -> Self {
        SinkChoice { kind: SINKS[0], text: String::new() }
    }
}

impl PartialEq for SinkChoice {
    fn eq(&self, other: &Self) -> bool {
        self.kind.name() == other.kind.name() && self.text == other.text
    }
}

impl Eq for SinkChoice {}

impl SinkChoice {
    /// The sink `text` names, if any does.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        SINKS.iter().find(|kind| kind.accepts(text)).map(|kind| SinkChoice { kind: *kind, text: text.to_string() })
    }

    /// Its kind's name: `file`, `postgres`.
    pub fn kind(&self) -> &'static str {
        self.kind.name()
    }

    /// For logs: without its secrets.
    pub fn describe(&self) -> String {
        self.kind.redacted(&self.text)
    }
}

impl std::fmt::Debug for SinkChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Parses `--sink` when the command line is read, and refuses anything else there: with a message
/// of its own, because clap's would repeat the value, and this one may be a connection string
/// with a password.
#[derive(Clone)]
struct SinkParser;

impl clap::builder::TypedValueParser for SinkParser {
    type Value = SinkChoice;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<SinkChoice, clap::Error> {
        let unknown =
            || clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("{}\n", unknown_sink())).with_cmd(cmd);
        value.to_str().and_then(SinkChoice::parse).ok_or_else(unknown)
    }
}

/// The message for a `--sink` no sink takes: what each takes.
pub fn unknown_sink() -> String {
    let usages: Vec<&str> = SINKS.iter().map(|kind| kind.usage()).collect();
    format!(
        "--sink (SAVER_SINK) is none of: {}; fix it (its value is not shown: it may hold a password)",
        usages.join(", ")
    )
}

impl SinkArgs {
    /// A PostgreSQL sink at `url` with no separate password (tests and tools).
    pub fn postgres(url: impl Into<String>) -> Self {
        let sink = SinkChoice::parse(&url.into()).filter(|s| s.kind() == "postgres").expect("a postgres:// URL");
        SinkArgs { sink, ..Default::default() }
    }

    /// The whole sink configuration, with the file sink's directory, the saver's pool size and
    /// name: the one place the choice becomes a sink and its secret is read.
    pub fn config(
        &self,
        out: &std::path::Path,
        pool_size: usize,
        saver: &str,
    ) -> Result<Box<dyn SinkConfig>, SinkError> {
        let context = SinkContext { args: self, out, pool_size, saver };
        self.sink.kind.configure(&self.sink.text, &context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::postgres::PgArgs;
    use clap::Parser;
    use common::config::Secret;

    #[test]
    fn a_postgres_url_never_shows_in_debug_output_or_parse_errors() {
        let cli = Cli::try_parse_from(["saver", "--sink", "postgres://u:hunter2@db/x"]).expect("parses");
        let debug = format!("{cli:?}");
        assert!(debug.contains("postgres://u@db:5432/x") && !debug.contains("hunter2"), "{debug}");
        let error = Cli::try_parse_from(["saver", "--sink", "mysql://u:hunter2@db/x"]).unwrap_err().to_string();
        assert!(error.contains("--sink") && !error.contains("hunter2"), "{error}");
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStrExt;
            let bytes = std::ffi::OsStr::from_bytes(b"postgres://u:hunter2@db/\xff");
            assert!(Cli::try_parse_from([std::ffi::OsStr::new("saver"), "--sink".as_ref(), bytes]).is_err());
        }
        let cli = Cli::try_parse_from(["saver"]).expect("parses");
        assert_eq!(cli.run.sink.sink.kind(), "file", "the file sink is the default");
        assert!(
            error.contains("`file` (the default") && error.contains("postgres://USER@HOST:PORT/DATABASE"),
            "{error}"
        );
    }

    #[test]
    fn every_sink_value_is_taken_by_exactly_one_registered_sink_and_the_refusal_lists_them_all() {
        for (value, kind) in [
            ("", "file"),
            ("file", "file"),
            (" file ", "file"),
            ("postgres://u@h/d", "postgres"),
            ("postgresql://u@h/d", "postgres"),
            ("s3://bucket/prefix/", "object store"),
            ("gs://bucket/prefix/", "object store"),
            ("az://container/prefix/", "object store"),
            ("file:///abs/dir/", "object store"),
        ] {
            let takers: Vec<&str> = SINKS.iter().filter(|k| k.accepts(value.trim())).map(|k| k.name()).collect();
            assert_eq!(takers, [kind], "{value:?}");
            assert_eq!(SinkChoice::parse(value).map(|c| c.kind()), Some(kind), "{value:?}");
        }
        for value in ["files", "ftp://host/dir/", "mysql://h/d"] {
            assert!(SinkChoice::parse(value).is_none(), "{value:?}");
        }
        for kind in SINKS {
            assert!(unknown_sink().contains(kind.usage()), "{}", kind.name());
        }
    }

    #[test]
    fn the_password_file_wins_without_its_trailing_newline() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("password");
        std::fs::write(&file, "from-file\n").expect("write");
        let args = PgArgs { pg_password_file: Some(file), pg_password: Some(Secret::new("env")) };
        assert_eq!(args.password().expect("reads").as_ref().map(Secret::expose), Some("from-file"));
        let missing = PgArgs { pg_password_file: Some(dir.path().join("nope")), ..Default::default() };
        assert!(missing.password().unwrap_err().to_string().contains("nope"));
    }
}
