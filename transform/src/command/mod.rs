//! Programs the mapper's operator registered (`mapper --command NAME=PROGRAM [ARGS...]`), run as
//! a pool of long-lived child processes spoken to in JSON Lines. The fetcher only names one
//! (`--transform command --command NAME`): what runs on a mapper's machine is its operator's
//! choice, never the fetcher's.
//!
//! # The contract with the child
//!
//! - The mapper starts PROGRAM with ARGS directly (no shell), with stdin, stdout and stderr
//!   connected to the mapper, in its own process group (a Ctrl-C on the mapper's terminal does
//!   not reach it; the mapper stops it). When the mapper stops a child it kills its whole
//!   process group (SIGKILL), so a wrapper script's children go with it, and reaps them.
//! - A mapper runs several children of one command at once (`mapper --command-workers`, one per
//!   transform thread by default), started when a job using the command begins; each child sees
//!   runs of consecutive objects of a chunk, never all of them, so a child keeps no state that
//!   the outputs depend on.
//! - The child's environment is the mapper's, minus every variable whose name starts with
//!   `NATS_` or contains `PASSWORD`, `TOKEN` or `SECRET` (in any case): the child must not see
//!   the mapper's credentials.
//! - The mapper writes one input object per line on the child's stdin: compact JSON (no line
//!   breaks inside), terminated by `\n`. It may write further lines before the child has
//!   answered the previous ones, so the child must read its input as a stream.
//! - For each input line, in order, the child writes exactly one line on stdout: one JSON value
//!   (any type, whitespace around it allowed), terminated by `\n`, and flushes stdout after
//!   each line. That value is the object's one output. A line that is not one valid JSON value
//!   (strict RFC 8259 in UTF-8), or a line longer than 64 MiB, is the child breaking the
//!   contract.
//! - Anything the child writes on stderr goes to the mapper's log, a line at a time, as
//!   `command NAME[PID]: LINE` (control characters escaped, long lines cut, at most 100 lines
//!   per 10 s per child: the rest are counted in one line). It is also how a child says why it
//!   failed: the last stderr line is quoted in a crash's dead-letter message.
//! - The child is long-lived: it handles many objects, one after another, until its stdin
//!   closes (then it should exit) or the mapper kills it, which it does when the job ends, when
//!   the child fails, and when the mapper stops.
//!
//! # Which answers are kept
//!
//! Lines carry no object id, so a child that writes two lines for one object, or none, shifts
//! every answer after it. The mapper therefore keeps a run's answers only once the run is
//! *confirmed*: every object of the run answered with one valid line, and no further line
//! within a short settling time after the last (twice the longest gap between the run's
//! answers, at least 200 µs, at most 250 ms). When a run fails (the child exits or closes its
//! stdout, answers with a line that is not JSON, takes longer than `mapper --command-timeout`
//! (30 s by default, counted from its previous answer, or from its start for its first object),
//! or writes a line too many), the child is killed and every answer of that run is discarded;
//! the run's objects go again to a fresh child (see [`plan`]): the object it broke down on
//! alone first, then the others, searching by halves when the shift came earlier. An object
//! is only convicted alone: after two failed tries on its own (`retries`, 1) it is
//! dead-lettered (cause `crash`, `transform` or `timeout`) with the reason. A line too many
//! noticed only later, when the child's next run starts, is logged as an error: the answers of
//! the run before may have been shifted (a child that is that slow to write its extra line is
//! not caught by the settling time).
//!
//! # When the command itself is broken
//!
//! A program that cannot be started (not found, not executable) or that exits within 100 ms
//! of starting is refused when the job starts, so the mapper does not take its chunks. One that
//! starts and then fails on its first object every time (it exits at once, a missing model
//! file) would turn a data set into dead letters; so after `mapper --command-breaker` (10) fresh
//! children in a row failed before answering anything, the command is *broken* on this mapper:
//! the chunk in hand is handed back as `cannot_run` (none of its objects is dead-lettered), and
//! so is every later one, with one error line saying why. Restart the mapper once it is fixed.
//!
//! An example child is `examples/commands/enrich.py`; `examples/commands/faulty.py` fails on
//! demand, for tests.

mod child;
pub(crate) mod plan;
#[cfg(test)]
mod tests;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::{Cause, ObjectError, Outputs, Transform};
use child::{describe_status, Line, NoLine, Worker};
use plan::{Failure, Plan, RunOutcome};

/// The longest answer line a child may write, in bytes: a child that writes without line
/// breaks is broken, and must not make the mapper buffer without end.
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// How long a child must survive its start for the job to start.
const START_PROBE: Duration = Duration::from_millis(100);

/// How long a child whose stdout closed gets to exit by itself, so its own exit status can be
/// reported, before it is killed.
const EXIT_GRACE: Duration = Duration::from_millis(500);

/// The settling time after a run's last answer, in which a further line means the child is out
/// of step: twice the longest gap between the run's answers, within these bounds.
const SETTLE_MIN: Duration = Duration::from_micros(200);
const SETTLE_MAX: Duration = Duration::from_millis(250);

/// `NAME=PROGRAM ARGS...`: a program a mapper may run under a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    /// The name the fetcher uses (`--command NAME`).
    pub name: String,
    /// The program.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
}

impl std::str::FromStr for CommandSpec {
    type Err = String;

    /// `NAME=PROGRAM [ARGS...]`, split into words like a shell does: `'single quotes'` keep
    /// everything, `"double quotes"` keep everything but `\"` and `\\`, and outside quotes a
    /// backslash keeps the next character. Nothing is expanded (no `$VAR`, no `~`, no globs).
    fn from_str(text: &str) -> Result<Self, String> {
        let usage = "write NAME=PROGRAM [ARGS...], e.g. resize=python3 \"my script.py\" --quality 3";
        let (name, rest) = text
            .split_once('=')
            .ok_or_else(|| format!("`{}` is not a command: {usage}", common::text::escaped(text)))?;
        let name = name.trim();
        if name.is_empty() {
            return Err(format!("`{}` has no command name before `=`: {usage}", common::text::escaped(text)));
        }
        if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "the command name `{}` has white space in it; a name is one word (the fetcher's --command NAME)",
                common::text::escaped(name)
            ));
        }
        let mut words = split_words(rest)
            .map_err(|why| format!("cannot read the program of command {}: {why}", common::text::escaped(name)))?
            .into_iter();
        let program = words
            .next()
            .filter(|program| !program.is_empty())
            .ok_or_else(|| format!("command {} has no program after `=`: {usage}", common::text::escaped(name)))?;
        Ok(CommandSpec { name: name.to_string(), program, args: words.collect() })
    }
}

/// Splits `text` into words with shell-like quoting (see [`CommandSpec`]'s `from_str`).
fn split_words(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if let Some(done) = word.take() {
                    words.push(done);
                }
            }
            '\'' => {
                let current = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => current.push(c),
                        None => return Err("a single quote (') is not closed".into()),
                    }
                }
            }
            '"' => {
                let current = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => current.push(c),
                            Some(c) => {
                                current.push('\\');
                                current.push(c);
                            }
                            None => return Err("a double quote (\") is not closed".into()),
                        },
                        Some(c) => current.push(c),
                        None => return Err("a double quote (\") is not closed".into()),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => return Err("it ends with a backslash that escapes nothing".into()),
            },
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

/// How command children run.
#[derive(Debug, Clone)]
pub struct CommandOptions {
    /// Children per command.
    pub workers: usize,
    /// Longest a child may take for one object.
    pub timeout: Duration,
    /// Times an object is retried alone after its child failed on it.
    pub retries: u32,
    /// Fresh children in a row that may fail before answering anything before the command is
    /// taken as broken on this mapper (`mapper --command-breaker`).
    pub breaker: u32,
}

impl Default for CommandOptions {
    fn default() -> Self {
        CommandOptions { workers: 1, timeout: Duration::from_secs(30), retries: 1, breaker: 10 }
    }
}

/// Whether the child must not see the variable `name`: the mapper's NATS settings and anything
/// that looks like a credential.
pub fn is_withheld_variable(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    upper.starts_with("NATS_") || ["PASSWORD", "TOKEN", "SECRET"].iter().any(|word| upper.contains(word))
}

/// A pool of children running one registered program.
pub struct CommandTransform {
    spec: CommandSpec,
    options: CommandOptions,
    /// One slot per worker; a slot is empty when its child could not be (re)started, and the
    /// next run through it tries again.
    slots: Mutex<Vec<Option<Worker>>>,
    returned: Condvar,
    breaker: Breaker,
}

impl std::fmt::Debug for CommandTransform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandTransform").field("spec", &self.spec).field("options", &self.options).finish()
    }
}

/// Counts fresh children that fail before answering anything, in a row across the pool; past
/// the limit the command is broken on this mapper for good.
#[derive(Debug, Default)]
struct Breaker {
    fresh_failures: AtomicU32,
    broken: OnceLock<String>,
}

impl CommandTransform {
    /// Starts `options.workers` children (at least one), or says why the program cannot run:
    /// not found, not executable, or exits as soon as it starts. A mapper then releases the
    /// chunk as one it cannot run, rather than dead-lettering every object.
    pub fn start(spec: &CommandSpec, options: &CommandOptions) -> Result<Self, String> {
        let workers = options.workers.max(1);
        let mut slots = Vec::with_capacity(workers);
        for _ in 0..workers {
            slots.push(Some(Worker::spawn(spec)?));
        }
        // A program that cannot do its job (a missing script, a bad argument) usually says so
        // and exits at once: catch that now, not as a crash on every object.
        let deadline = Instant::now() + START_PROBE;
        while Instant::now() < deadline {
            for worker in slots.iter_mut().flatten() {
                if let Some(status) = worker.exited() {
                    return Err(format!(
                        "command {} ({}) exited as soon as it started ({}){}; check the program and its arguments in mapper --command",
                        escaped(&spec.name),
                        escaped(&spec.program),
                        describe_status(Some(status)),
                        worker.last_stderr_note()
                    ));
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let pids: Vec<String> = slots.iter().flatten().map(|w| w.pid.to_string()).collect();
        tracing::info!(
            "command {}: started {} {} (pids {})",
            escaped(&spec.name),
            pids.len(),
            if pids.len() == 1 { "child" } else { "children" },
            pids.join(", ")
        );
        Ok(CommandTransform {
            spec: spec.clone(),
            options: options.clone(),
            slots: Mutex::new(slots),
            returned: Condvar::new(),
            breaker: Breaker::default(),
        })
    }

    /// The process ids of the children not in use right now (all of them between chunks).
    pub fn pids(&self) -> Vec<u32> {
        self.lock_slots().iter().flatten().map(|w| w.pid).collect()
    }

    fn lock_slots(&self) -> MutexGuard<'_, Vec<Option<Worker>>> {
        common::sync::lock(&self.slots, "command workers")
    }

    /// Takes a slot, waiting for one if every child is busy.
    fn lease(&self) -> Lease<'_> {
        let mut slots = self.lock_slots();
        loop {
            if let Some(slot) = slots.pop() {
                return Lease { transform: self, slot: Some(slot) };
            }
            slots = self.returned.wait(slots).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Runs `inputs` through one child, in order, one outcome per input.
    fn run_slice(&self, inputs: &[&[u8]]) -> Vec<Result<Outputs, ObjectError>> {
        let mut lease = self.lease();
        let mut plan = Plan::new(inputs.len(), self.options.retries);
        let outcome = catch_unwind(AssertUnwindSafe(|| self.follow(lease.slot_mut(), inputs, &mut plan)));
        if outcome.is_err() {
            // Not expected (nothing a child does panics here), but the chunk must still get
            // an outcome per object, and the child's state is unknown.
            lease.discard();
            let message = format!("the command {} transform panicked", escaped(&self.spec.name));
            plan.abandon(&ObjectError { cause: Cause::Crash, message });
        }
        plan.finish()
    }

    /// Gives the plan's runs to the child in `slot` until every object has its outcome.
    fn follow(&self, slot: &mut Option<Worker>, inputs: &[&[u8]], plan: &mut Plan) {
        self.check_idle(slot);
        while let Some(range) = plan.next() {
            if let Some(why) = self.breaker.broken.get() {
                plan.abandon(&ObjectError { cause: Cause::Crash, message: why.clone() });
                return;
            }
            if let Err(message) = self.ensure_child(slot) {
                plan.abandon(&ObjectError { cause: Cause::Crash, message });
                return;
            }
            let worker = slot.as_mut().expect("ensure_child leaves a child in the slot or returns an error");
            let outcome = self.run(worker, &inputs[range]);
            match &outcome {
                RunOutcome::Confirmed(_) => self.breaker.fresh_failures.store(0, Ordering::Relaxed),
                RunOutcome::Failed { failure, .. } => {
                    let fresh = worker.answered == 0;
                    if let Some(old) = slot.take() {
                        self.replace(slot, old, &failure.message);
                    }
                    if fresh {
                        self.fresh_failure(&failure.message);
                    }
                }
            }
            plan.record(outcome);
        }
    }

    /// One run of objects through `worker`: fed at once, answered in order, then confirmed by a
    /// settling time in which no further line may come.
    fn run(&self, worker: &mut Worker, inputs: &[&[u8]]) -> RunOutcome {
        worker.feed(inputs);
        let mut outputs = Vec::with_capacity(inputs.len());
        let mut longest_gap = Duration::ZERO;
        let mut last = Instant::now();
        for _ in inputs {
            match self.answer(worker) {
                Ok(out) => {
                    worker.answered += 1;
                    outputs.push(out);
                    let now = Instant::now();
                    if outputs.len() > 1 || inputs.len() == 1 {
                        longest_gap = longest_gap.max(now - last);
                    }
                    last = now;
                }
                Err(failure) => return RunOutcome::Failed { answered: outputs.len(), failure },
            }
        }
        let settle = (longest_gap * 2).clamp(SETTLE_MIN, SETTLE_MAX);
        if worker.writes_more_within(settle) {
            let name = escaped(&self.spec.name);
            let message = format!(
                "command {name} wrote more than one line for this object (the contract is exactly one line per object)"
            );
            return RunOutcome::Failed {
                answered: outputs.len(),
                failure: Failure { cause: Cause::Transform, message },
            };
        }
        RunOutcome::Confirmed(outputs)
    }

    /// Between runs a child should be silent; if it died or wrote, it is out of step and is
    /// replaced. A line written after its last run was confirmed means that run's answers may
    /// have been shifted: said loudly, since they are kept.
    fn check_idle(&self, slot: &mut Option<Worker>) {
        let Some(worker) = slot.as_mut() else { return };
        let why = match worker.unasked_line() {
            Some(true) => {
                tracing::error!(
                    "command {}[{}] wrote a line no object asked for, after its last run was confirmed: that run's outputs may be shifted; fix the program so that it writes exactly one line per input line",
                    escaped(&self.spec.name),
                    worker.pid
                );
                "it wrote a line no object asked for"
            }
            Some(false) => "it had exited while idle",
            None => return,
        };
        if let Some(old) = slot.take() {
            self.replace(slot, old, why);
        }
    }

    /// A child in `slot`, started again if the last one could not be: the error message for the
    /// chunk's remaining objects if it cannot.
    fn ensure_child(&self, slot: &mut Option<Worker>) -> Result<(), String> {
        if slot.is_some() {
            return Ok(());
        }
        let worker = Worker::spawn(&self.spec).map_err(|why| format!("{why} (while restarting it)"))?;
        tracing::warn!(
            "command {}: started a child again ([{}]) after it could not be",
            escaped(&self.spec.name),
            worker.pid
        );
        *slot = Some(worker);
        Ok(())
    }

    /// The child's answer for the next object: its output, or why not.
    fn answer(&self, worker: &mut Worker) -> Result<Outputs, Failure> {
        let name = escaped(&self.spec.name);
        let line = match worker.next_line(self.options.timeout) {
            Ok(Line::Value(line)) => line,
            Ok(Line::TooLong) => {
                let message =
                    format!("command {name} answered this object with a line longer than {} MiB", MAX_LINE_BYTES >> 20);
                return Err(Failure { cause: Cause::Transform, message });
            }
            Err(NoLine::Timeout) => {
                let limit = humantime::format_duration(self.options.timeout);
                let message = format!("command {name} took longer than {limit} on this object");
                return Err(Failure { cause: Cause::Timeout, message });
            }
            Err(NoLine::Closed) => return Err(self.closed(worker)),
        };
        match common::json::check_value(&line) {
            Ok(()) => {
                let mut out = Outputs::default();
                out.push_json(&line);
                Ok(out)
            }
            Err(e) => {
                let text = String::from_utf8_lossy(&line);
                let shown = escaped(text.trim_end_matches('\r'));
                let message =
                    format!("command {name} answered this object with a line that is not JSON ({e}): `{shown}`");
                Err(Failure { cause: Cause::Transform, message })
            }
        }
    }

    /// The failure of a child whose stdout ended before it answered.
    fn closed(&self, worker: &mut Worker) -> Failure {
        let name = escaped(&self.spec.name);
        let message = match worker.exit_after_close(EXIT_GRACE) {
            Ok(status) => {
                let note = worker.last_stderr_note();
                format!("command {name} died on this object ({}){note}", describe_status(status))
            }
            Err(()) => format!(
                "command {name} closed its stdout without answering this object (it was still running, and was stopped)"
            ),
        };
        Failure { cause: Cause::Crash, message }
    }

    /// A fresh child failed before answering anything: past the limit, the command is broken.
    fn fresh_failure(&self, message: &str) {
        let failures = self.breaker.fresh_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.options.breaker.max(1) {
            return;
        }
        let name = escaped(&self.spec.name);
        let why = format!(
            "command {name} is broken on this mapper: {failures} fresh children in a row failed before answering any object (the last: {message}); this mapper takes no more of the job's chunks: fix the program or mapper --command {name}=..., then restart the mapper"
        );
        if self.breaker.broken.set(why.clone()).is_ok() {
            tracing::error!("{why}");
        }
    }

    /// Kills `old` and puts a fresh child in `slot` (or leaves it empty if none can start),
    /// with one log line saying why.
    fn replace(&self, slot: &mut Option<Worker>, old: Worker, why: &str) {
        let name = escaped(&self.spec.name);
        let old_pid = old.pid;
        drop(old);
        match Worker::spawn(&self.spec) {
            Ok(worker) => {
                tracing::warn!("command {name}[{old_pid}] was killed and restarted as [{}]: {why}", worker.pid);
                *slot = Some(worker);
            }
            Err(e) => tracing::warn!("command {name}[{old_pid}] was killed: {why}; it cannot be restarted: {e}"),
        }
    }
}

impl Drop for CommandTransform {
    fn drop(&mut self) {
        // Each worker kills and reaps its child's process group as it is dropped.
        let workers = std::mem::take(&mut *self.lock_slots());
        let count = workers.iter().flatten().count();
        drop(workers);
        tracing::debug!("command {}: stopped {count} children", escaped(&self.spec.name));
    }
}

fn escaped(text: &str) -> common::text::Escaped<'_> {
    common::text::escaped(text)
}

/// A slot taken from the pool, given back when dropped (even on a panic).
struct Lease<'a> {
    transform: &'a CommandTransform,
    slot: Option<Option<Worker>>,
}

impl Lease<'_> {
    fn slot_mut(&mut self) -> &mut Option<Worker> {
        self.slot.get_or_insert(None)
    }

    /// Kills the child, whose state is unknown; the slot goes back empty.
    fn discard(&mut self) {
        self.slot = Some(None);
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let slot = self.slot.take().unwrap_or(None);
        self.transform.lock_slots().push(slot);
        self.transform.returned.notify_one();
    }
}

impl Transform for CommandTransform {
    fn apply(&self, input: &[u8], out: &mut Outputs) -> Result<(), ObjectError> {
        let outcome = self.apply_chunk(&[input]).pop().expect("apply_chunk gives one outcome per input");
        let values = outcome?;
        for value in values.iter() {
            out.push_json(value);
        }
        Ok(())
    }

    /// Splits the chunk into at most `workers` runs of consecutive objects, each streamed
    /// through one child, the runs in parallel on the current rayon pool.
    fn apply_chunk(&self, inputs: &[&[u8]]) -> Vec<Result<Outputs, ObjectError>> {
        if inputs.is_empty() {
            return Vec::new();
        }
        let runs = self.options.workers.max(1).min(inputs.len());
        let per_run = inputs.len().div_ceil(runs);
        let slices: Vec<&[&[u8]]> = inputs.chunks(per_run).collect();
        let outcomes: Vec<Vec<Result<Outputs, ObjectError>>> =
            slices.into_par_iter().with_max_len(1).map(|slice| self.run_slice(slice)).collect();
        outcomes.into_iter().flatten().collect()
    }

    fn broken(&self) -> Option<String> {
        self.breaker.broken.get().cloned()
    }
}
