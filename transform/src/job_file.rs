//! The job file, `--job job.yaml`: a run's job and settings in one YAML file that the fetcher and
//! `saver verify` both read, so that what a run does and what verify checks cannot drift apart
//! (in Kubernetes it is one ConfigMap, mounted by the run and by its verification). Its keys are
//! the flags' names with `_` for `-`:
//!
//! ```yaml
//! input: /data/users.jsonl        # --input
//! chunk_size: 100                 # --chunk-size
//! transform: jq                   # --transform, and its settings: rounds, filter, filter_file,
//! filter: '.a'                    #   command, transform_params (any YAML, passed as JSON)
//! id_field: .order_id             # --id-field
//! max_attempts: 3                 # limits: --max-attempts, --lease-timeout, --bad-records,
//! lease_timeout: 5s               #   --no-duplicate-check, --duplicate-check-memory
//! sink: file                      # where the run is saved, for verify: --sink, --out
//! out: /out
//! ```
//!
//! Each key becomes the default of its flag in the binary that reads it ([`JobFile::apply`]), so
//! a flag or its environment variable given as well overrides the file, and every value goes
//! through the flag's own parser. A binary skips the keys it has no flag for (the fetcher `out`,
//! verify the limits). An unknown key is refused with its name (serde's deny_unknown_fields).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{ArgMatches, Command};
use serde::Deserialize;

/// The job file's keys, as `--job` files hold them.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    input: Option<String>,
    chunk_size: Option<u32>,
    transform: Option<String>,
    rounds: Option<u32>,
    filter: Option<String>,
    filter_file: Option<String>,
    command: Option<String>,
    transform_params: Option<serde_json::Value>,
    id_field: Option<String>,
    no_duplicate_check: Option<bool>,
    duplicate_check_memory: Option<u64>,
    max_attempts: Option<u32>,
    lease_timeout: Option<String>,
    bad_records: Option<String>,
    sink: Option<String>,
    out: Option<String>,
}

/// Why a job file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JobFileError {
    /// The file cannot be read.
    #[error("cannot read the job file {path} (--job): {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not YAML, a value of the wrong type, or an unknown key (named in the message).
    #[error("job file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error, with the key and its line (boxed: it is large, and the error
        /// travels through every `Result` of the job file).
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    /// A key's value is refused by its flag's parser.
    #[error("job file {path}: `{key}`: {message}")]
    Value {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// The flag's error.
        message: String,
    },
}

impl JobFile {
    /// Reads and parses the job file at `path`.
    pub fn read(path: &Path) -> Result<Self, JobFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| JobFileError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// Parses `text`, the content of the job file `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, JobFileError> {
        if text.trim().is_empty() {
            return Ok(JobFile::default());
        }
        serde_saphyr::from_str(text)
            .map_err(|source| JobFileError::Parse { path: path.into(), source: Box::new(source) })
    }

    /// The file's settings: (key, the flag it sets, its value as that flag takes it).
    fn settings(&self) -> Vec<(&'static str, &'static str, String)> {
        let text = |key, flag, value: &Option<String>| value.clone().map(|v| (key, flag, v));
        let shown = |key, flag, value: Option<String>| value.map(|v| (key, flag, v));
        [
            text("input", "input", &self.input),
            shown("chunk_size", "chunk-size", self.chunk_size.map(|v| v.to_string())),
            text("transform", "transform", &self.transform),
            shown("rounds", "rounds", self.rounds.map(|v| v.to_string())),
            text("filter", "filter", &self.filter),
            text("filter_file", "filter-file", &self.filter_file),
            text("command", "command", &self.command),
            shown("transform_params", "transform-params", self.transform_params.as_ref().map(|v| v.to_string())),
            text("id_field", "id-field", &self.id_field),
            shown("no_duplicate_check", "no-duplicate-check", self.no_duplicate_check.map(|v| v.to_string())),
            shown(
                "duplicate_check_memory",
                "duplicate-check-memory",
                self.duplicate_check_memory.map(|v| v.to_string()),
            ),
            shown("max_attempts", "max-attempts", self.max_attempts.map(|v| v.to_string())),
            text("lease_timeout", "lease-timeout", &self.lease_timeout),
            text("bad_records", "bad-records", &self.bad_records),
            text("sink", "sink", &self.sink),
            text("out", "out", &self.out),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// `cmd` with the file's settings as the defaults of its flags (a flag or its environment
    /// variable given as well wins), each checked by the flag's own parser; keys `cmd` has no
    /// flag for are skipped. `path` names the file in errors.
    pub fn apply(&self, mut cmd: Command, path: &Path) -> Result<Command, JobFileError> {
        // The flags' own parsers, on a copy that requires nothing (a switch's value is a YAML
        // boolean already).
        let check = cmd.clone().mut_args(|a| a.required(false));
        for (key, long, value) in self.settings() {
            let Some(arg) = cmd.get_arguments().find(|a| a.get_long() == Some(long)).cloned() else { continue };
            if arg.get_action().takes_values() {
                let argv = [OsString::from("job-file"), OsString::from(format!("--{long}={value}"))];
                if let Err(e) = check.clone().try_get_matches_from(argv) {
                    let message =
                        e.to_string().lines().next().unwrap_or_default().trim_start_matches("error: ").to_string();
                    return Err(JobFileError::Value { path: path.into(), key, message });
                }
            }
            // Leaked: clap takes a `&'static str` default without its `string` feature; a
            // handful of short strings, once per process (or per parse, in tests).
            let value: &'static str = String::leak(value);
            cmd = cmd.mut_arg(arg.get_id().clone(), |a| a.default_value(value).required(false));
        }
        Ok(cmd)
    }
}

/// The id of the `--job` argument in [`crate::JobArgs`].
const JOB_FILE_ID: &str = "job_file";

/// The process's command line as `C`, after the job file of `--job` (its settings are the
/// defaults of their flags, see [`parse`]): the fetcher's and `saver verify`'s. Exits as clap
/// does on an error.
pub fn parse_cli<C: clap::Parser>() -> C {
    parse(<C as clap::CommandFactory>::command(), std::env::args_os().collect())
        .and_then(|matches| <C as clap::FromArgMatches>::from_arg_matches(&matches))
        .unwrap_or_else(|e| e.exit())
}

/// Parses `args` with `cmd` as clap would, after reading the job file that `--job` (or its
/// environment variable) names, in `cmd` or in the subcommand given: the file's settings become
/// the defaults of that (sub)command's flags. A job file error is a clap error (exit status 2).
pub fn parse(cmd: Command, args: Vec<OsString>) -> Result<ArgMatches, clap::Error> {
    let pre = cmd.clone().ignore_errors(true).try_get_matches_from(&args)?;
    let (sub, matches) = match pre.subcommand() {
        Some((name, sub)) => (Some(name.to_string()), sub.clone()),
        None => (None, pre),
    };
    let file = matches.try_get_one::<PathBuf>(JOB_FILE_ID).ok().flatten().cloned();
    let Some(path) = file else { return cmd.try_get_matches_from(args) };
    let invalid = |e: JobFileError| clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("{e}\n"));
    let job = JobFile::read(&path).map_err(invalid)?;
    let cmd = match &sub {
        Some(name) => {
            let target = cmd.find_subcommand(name).cloned().expect("the subcommand the first parse found");
            let applied = job.apply(target, &path).map_err(invalid)?;
            cmd.mut_subcommand(name, |_| applied)
        }
        None => job.apply(cmd, &path).map_err(invalid)?,
    };
    cmd.try_get_matches_from(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Debug, Parser)]
    struct Cli {
        #[arg(long, env = "TEST_JOB_FILE_INPUT", required = true)]
        input: Option<PathBuf>,
        #[arg(long, env = "TEST_JOB_FILE_CHUNK_SIZE", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        chunk_size: u32,
        #[arg(long)]
        no_duplicate_check: bool,
        #[command(flatten)]
        job: crate::JobArgs,
    }

    fn run(args: &[&str], file: &str) -> Result<Cli, String> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("job.yaml");
        std::fs::write(&path, file).expect("write");
        let mut argv: Vec<OsString> = vec!["test".into(), "--job".into(), path.clone().into()];
        argv.extend(args.iter().map(OsString::from));
        let matches = parse(Cli::command(), argv).map_err(|e| e.to_string())?;
        Cli::from_arg_matches(&matches).map_err(|e| e.to_string())
    }

    #[test]
    fn the_file_sets_the_job_and_flags_override_it() {
        let file = "input: in.jsonl\nchunk_size: 50\ntransform: jq\nfilter: '.a'\nno_duplicate_check: true\n\
                    transform_params: {x: [1, 2]}\nout: /out\nmax_attempts: 2\n";
        let cli = run(&[], file).expect("parses");
        assert_eq!(cli.input.as_deref(), Some(Path::new("in.jsonl")));
        assert_eq!((cli.chunk_size, cli.no_duplicate_check), (50, true));
        assert_eq!(cli.job.job().expect("a job").transform, crate::TransformSpec::Jq { filter: ".a".into() });
        assert_eq!(cli.job.transform_params.as_deref(), Some(r#"{"x":[1,2]}"#), "any YAML, as JSON");
        let cli = run(&["--chunk-size", "7", "--filter", ".b"], file).expect("parses");
        assert_eq!(cli.chunk_size, 7, "a flag wins over the file");
        assert_eq!(cli.job.filter.as_deref(), Some(".b"));
    }

    #[test]
    fn an_unknown_key_is_refused_with_its_name() {
        let error = run(&[], "input: in.jsonl\nchunksize: 50\n").expect_err("refused");
        assert!(error.contains("chunksize") && error.contains("job.yaml"), "{error}");
    }

    #[test]
    fn a_value_the_flag_refuses_is_refused_with_the_key() {
        let error = run(&[], "input: in.jsonl\nchunk_size: 0\n").expect_err("refused");
        assert!(error.contains("`chunk_size`") && error.contains("job.yaml"), "{error}");
        let error = run(&[], "input: in.jsonl\nchunk_size: lots\n").expect_err("refused");
        assert!(error.contains("chunk_size") && error.contains("job.yaml"), "{error}");
    }

    #[test]
    fn without_the_file_the_flags_are_required_as_before() {
        let error = run(&[], "transform: digest\n").expect_err("no input");
        assert!(error.contains("--input"), "{error}");
        let matches = parse(Cli::command(), vec!["test".into(), "--input".into(), "x".into()]).expect("no --job");
        assert_eq!(Cli::from_arg_matches(&matches).expect("parses").chunk_size, 100);
        let missing = parse(Cli::command(), vec!["test".into(), "--job".into(), "/nonexistent/job.yaml".into()]);
        assert!(missing.expect_err("unreadable").to_string().contains("/nonexistent/job.yaml"));
    }
}
