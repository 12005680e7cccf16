//! jq programs (`--transform jq --filter '...'`), run with jaq in sandbox child processes: the
//! fetcher checks that the program compiles ([`check`]) before anything runs; a mapper (or `saver
//! verify`) builds a [`JqTransform`] once per job, which starts sandboxes of its own binary and
//! streams runs of objects through them, one sandbox per transform thread.
//!
//! Why child processes: a jq program can recurse without end (`def f: [f]; f`), allocate
//! without bound (`[range(1e9)]`) or never end (`last(range(1e15))`). The first two abort a Rust
//! process (stack overflow and allocation failure do not unwind), and jaq has no step hook to stop
//! the third. In a sandbox each only ends that sandbox: the parent names the cause, dead-letters
//! the object (after one retry in a fresh sandbox), and gives the rest of the run to a fresh
//! sandbox. The limits, per object:
//!
//! - time: [`JqOptions::timeout`] (`--jq-timeout`, 30 s): cause `timeout`, "jq took longer than
//!   30s on this object (time limit, `mapper --jq-timeout`)";
//! - memory: [`JqOptions::memory`] (`--jq-memory`, 1 GiB) of data per sandbox: cause `crash`, "jq
//!   used more than 1 GiB on this object (memory limit, `mapper --jq-memory`)";
//! - recursion: the evaluation thread's stack (a quarter of the memory limit, at most 256 MiB):
//!   cause `crash`, "jq recursion too deep (stack overflow)".
//!
//! What the program may do, and how its values are written, is `program`'s; the wire between
//! the two processes is `frame`'s; the child is [`sandbox`]; the parent is `pool`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rayon::prelude::*;

use crate::{BuildError, Cause, ObjectError, Outputs, Transform};

mod frame;
mod pool;
mod program;
pub mod sandbox;

pub use program::{MAX_DEPTH, MAX_ERROR_BYTES, MAX_OUTPUTS, MAX_OUTPUT_BYTES};

/// Checks that `filter` compiles, in this process, without starting a sandbox: what the fetcher
/// does before it connects anywhere, so a program that does not compile is refused at once.
pub fn check(filter: &str) -> Result<(), BuildError> {
    program::Program::compile(filter).map(drop).map_err(BuildError::Invalid)
}

/// Why a sandbox had to be restarted: the label of the mapper's restart counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// An object took longer than the timeout.
    Timeout,
    /// An object needed more memory than the limit.
    Memory,
    /// An object's evaluation overflowed the stack.
    Stack,
    /// The sandbox died otherwise (killed from outside, or did not answer).
    Died,
}

impl Restart {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Restart::Timeout => "timeout",
            Restart::Memory => "memory",
            Restart::Stack => "stack",
            Restart::Died => "died",
        }
    }
}

/// How a sandbox is started: the program (this binary, `/proc/self/exe`, so an upgrade of the
/// file on disk cannot start another version), its arguments and environment (nothing else of
/// the parent's: the sandbox needs none, and the parent's holds credentials).
#[derive(Debug, Clone)]
pub struct SandboxCommand {
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Its whole environment.
    pub env: Vec<(OsString, OsString)>,
}

impl Default for SandboxCommand {
    fn default() -> Self {
        SandboxCommand { program: "/proc/self/exe".into(), args: vec![sandbox::SANDBOX_ARG.into()], env: Vec::new() }
    }
}

impl SandboxCommand {
    /// This test binary, running only its test `test` (the full path within the crate, e.g.
    /// `verify::tests::jq_sandbox_entry`), which calls [`sandbox::enter_if_test_child`]: see
    /// [`crate::jq_sandbox_entry`].
    pub fn test_binary(test: &str) -> Self {
        let args = [test, "--exact", "--ignored", "--nocapture", "--test-threads=1", "--quiet"];
        SandboxCommand {
            program: "/proc/self/exe".into(),
            args: args.iter().map(OsString::from).collect(),
            env: vec![(sandbox::TEST_CHILD_ENV.into(), "1".into())],
        }
    }
}

/// How jq objects are run.
#[derive(Clone)]
pub struct JqOptions {
    /// The longest one object may take.
    pub timeout: Duration,
    /// The most memory one sandbox may use for jq's values.
    pub memory: Memory,
    /// Times an object is retried in a fresh sandbox after its sandbox failed on it.
    pub retries: u32,
    /// Who sets the limits, as named in dead-letter messages: `mapper`, or `saver verify`.
    pub setting: &'static str,
    /// How a sandbox is started.
    pub sandbox: SandboxCommand,
    /// Told each time a sandbox is restarted, and why (the mapper counts them).
    pub on_restart: Option<Arc<dyn Fn(Restart) + Send + Sync>>,
}

impl std::fmt::Debug for JqOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JqOptions")
            .field("timeout", &self.timeout)
            .field("memory", &self.memory)
            .field("retries", &self.retries)
            .field("setting", &self.setting)
            .field("sandbox", &self.sandbox)
            .finish_non_exhaustive()
    }
}

impl Default for JqOptions {
    fn default() -> Self {
        JqOptions {
            timeout: Duration::from_secs(30),
            memory: Memory::DEFAULT,
            retries: 1,
            setting: "mapper",
            sandbox: SandboxCommand::default(),
            on_restart: None,
        }
    }
}

/// A number of bytes, written as people write them (`1GiB`, `512MiB`; a bare number is MiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory(pub u64);

impl Memory {
    /// 1 GiB.
    pub const DEFAULT: Memory = Memory(1 << 30);
    /// The least a sandbox may be given.
    pub const MIN: Memory = Memory(16 << 20);
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes = self.0;
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if bytes >= size && bytes.is_multiple_of(size) {
                return write!(f, "{} {unit}", bytes / size);
            }
        }
        write!(f, "{bytes} bytes")
    }
}

/// A memory size that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a memory size {why}; write e.g. 512MiB or 2GiB (a bare number is MiB), at least 16MiB")]
pub struct MemoryError {
    text: String,
    why: &'static str,
}

/// Reads `1GiB`, `512MiB`, `512M`, `2G`, `65536KiB` or `768` (MiB).
pub fn parse_memory(text: &str) -> Result<Memory, MemoryError> {
    let error = |why| MemoryError { text: text.to_string(), why };
    let trimmed = text.trim();
    let digits = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits);
    let number: u64 = number.parse().map_err(|_| error("(no number)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "k" | "kib" | "kb" => 10,
        _ => return Err(error("(unknown unit)")),
    };
    let bytes = number.checked_mul(1 << shift).ok_or_else(|| error("(too large)"))?;
    if bytes < Memory::MIN.0 {
        return Err(error("(too small)"));
    }
    Ok(Memory(bytes))
}

/// The jq limits on the command line, the same for the mappers and `saver verify` (which must
/// recompute with the mappers' limits to agree with their dead letters).
#[derive(Debug, Clone, clap::Args)]
pub struct JqLimitArgs {
    /// jq: the longest one object may take; past it the object's sandbox is killed and the
    /// object retried once in a fresh one, then dead-lettered (cause timeout).
    #[arg(long, env = "MAPPER_JQ_TIMEOUT", default_value = "30s", value_parser = common::config::parse_duration)]
    pub jq_timeout: Duration,

    /// jq: the most memory one sandbox (one per transform thread) may use for an object's values,
    /// e.g. 512MiB or 2GiB; past it the object is retried once, then dead-lettered (cause crash).
    /// The sandbox's stack (a quarter of this, at most 256 MiB) and 64 MiB for itself come on top.
    #[arg(long, env = "MAPPER_JQ_MEMORY", default_value = "1GiB", value_parser = parse_memory)]
    pub jq_memory: Memory,
}

impl Default for JqLimitArgs {
    fn default() -> Self {
        JqLimitArgs { jq_timeout: Duration::from_secs(30), jq_memory: Memory::DEFAULT }
    }
}

impl JqLimitArgs {
    /// Options with these limits, named in dead letters as `setting`'s (`mapper`, `saver verify`).
    pub fn options(&self, setting: &'static str) -> JqOptions {
        JqOptions { timeout: self.jq_timeout, memory: self.jq_memory, setting, ..JqOptions::default() }
    }
}

/// A jq program and its sandboxes.
pub struct JqTransform {
    pool: pool::Pool,
}

impl std::fmt::Debug for JqTransform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JqTransform").finish_non_exhaustive()
    }
}

impl JqTransform {
    /// Starts a first sandbox for `filter`, which compiles it: a program that does not compile
    /// is [`BuildError::Invalid`]; a sandbox that cannot start (a binary that does not call
    /// [`sandbox::enter_if_child`] first) is [`BuildError::Start`]. More sandboxes start as
    /// threads need them.
    pub fn start(filter: &str, options: &JqOptions) -> Result<Self, BuildError> {
        Ok(JqTransform { pool: pool::Pool::start(filter, options)? })
    }

    /// The process ids of the sandboxes not in use right now (all of them between chunks).
    pub fn pids(&self) -> Vec<u32> {
        self.pool.pids()
    }
}

impl Transform for JqTransform {
    fn apply(&self, input: &[u8], out: &mut Outputs) -> Result<(), ObjectError> {
        let outcome = self.pool.run(&[input]).pop();
        let outputs = outcome.unwrap_or_else(|| {
            Err(ObjectError { cause: Cause::Crash, message: "the jq sandbox gave no answer".into() })
        })?;
        for value in outputs.iter() {
            out.push_json(value);
        }
        Ok(())
    }

    /// Splits the chunk into one run of consecutive objects per thread of the current rayon
    /// pool, each streamed through one sandbox, the runs in parallel.
    fn apply_chunk(&self, inputs: &[&[u8]]) -> Vec<Result<Outputs, ObjectError>> {
        if inputs.is_empty() {
            return Vec::new();
        }
        let runs = rayon::current_num_threads().max(1).min(inputs.len());
        let per_run = inputs.len().div_ceil(runs);
        let slices: Vec<&[&[u8]]> = inputs.chunks(per_run).collect();
        let outcomes: Vec<Vec<Result<Outputs, ObjectError>>> =
            slices.into_par_iter().with_max_len(1).map(|slice| self.pool.run(slice)).collect();
        outcomes.into_iter().flatten().collect()
    }
}

/// Makes this test binary the jq sandbox of its own tests: defines the ignored test
/// `jq_sandbox_entry` (which becomes a sandbox when started as one) and `fn jq_test_options() ->
/// JqOptions` (options that start it). A test binary's `main` is the test harness, which cannot
/// call [`sandbox::enter_if_child`]; use this in the test module of any crate whose unit tests
/// build a jq transform.
#[macro_export]
macro_rules! jq_sandbox_entry {
    () => {
        #[test]
        #[ignore = "the jq sandbox of this test binary's jq tests, which start it with the environment it needs"]
        fn jq_sandbox_entry() {
            $crate::jq::sandbox::enter_if_test_child();
        }

        fn jq_test_options() -> $crate::jq::JqOptions {
            let path = module_path!().split_once("::").map_or("", |(_, rest)| rest);
            let test =
                if path.is_empty() { "jq_sandbox_entry".to_string() } else { format!("{path}::jq_sandbox_entry") };
            $crate::jq::JqOptions { sandbox: $crate::jq::SandboxCommand::test_binary(&test), ..Default::default() }
        }
    };
}

#[cfg(test)]
mod tests;
