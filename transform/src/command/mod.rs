//! Programs the mapper's operator registered (`mapper --command NAME=PROGRAM [ARGS...]`), run as
//! a pool of long-lived child processes spoken to in JSON Lines. The fetcher only names one
//! (`--transform command --command NAME`): what runs on a mapper's machine is its operator's
//! choice, never the fetcher's.
//!
//! # The contract with the child
//!
//! - The mapper starts PROGRAM with ARGS directly (no shell), with stdin, stdout and stderr
//!   connected to the mapper, in its own process group (a Ctrl-C on the mapper's terminal does
//!   not reach it; the mapper stops it). A wrapper script should `exec` the real program, so
//!   that stopping the child stops the program. Its working directory is the mapper's.
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
//!   `command NAME[PID]: LINE` (control characters escaped, long lines cut). It is also how a
//!   child says why it failed: the last stderr line is quoted in a crash's dead-letter message.
//! - The child is long-lived: it handles many objects, one after another, until its stdin
//!   closes (then it should exit) or the mapper kills it (SIGKILL), which it does when the job
//!   ends, when the child fails on an object, and when the mapper stops.
//! - The child fails on an object when it exits (or closes stdout) before answering it, answers
//!   with a line that is not JSON, or does not answer within the mapper's per-object timeout
//!   (`mapper --command-timeout`, 30 s by default, counted from its previous answer, or from
//!   its start for its first object). The mapper then kills it, starts a fresh child and gives
//!   it that object again, up to `retries` more times (1 by default: two tries in all); if it
//!   fails every time, that object is dead-lettered (cause `crash`, `transform` or `timeout`)
//!   and the fresh child goes on with the next object. Objects it answered keep their outputs.
//! - A program that cannot be started (not found, not executable) or that exits within 100 ms
//!   of starting is refused when the job starts, so the mapper does not take its chunks.
//!
//! An example child is `examples/commands/enrich.py`; `examples/commands/faulty.py` fails on
//! demand, for tests.

use std::io::{self, BufRead, BufReader, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::{Cause, ObjectError, Outputs, Transform};

/// The longest answer line a child may write, in bytes: a child that writes without line
/// breaks is broken, and must not make the mapper buffer without end.
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// How much of one stderr line is kept, in bytes (the log shows less, see
/// [`common::text::escaped`]).
const MAX_STDERR_LINE: usize = 4096;

/// How long a child must survive its start for the job to start.
const START_PROBE: Duration = Duration::from_millis(100);

/// How long a child whose stdout closed gets to exit by itself, so its own exit status can be
/// reported, before it is killed.
const EXIT_GRACE: Duration = Duration::from_millis(500);

/// How long the stderr drain of a child that exited gets to log its last lines.
const STDERR_SETTLE: Duration = Duration::from_millis(200);

/// Answers a child may write ahead of the mapper's reading before its stdout blocks.
const LINES_AHEAD: usize = 1024;

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
    /// Times an object is retried after its child failed on it.
    pub retries: u32,
}

impl Default for CommandOptions {
    fn default() -> Self {
        CommandOptions { workers: 1, timeout: Duration::from_secs(30), retries: 1 }
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
}

impl std::fmt::Debug for CommandTransform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandTransform").field("spec", &self.spec).field("options", &self.options).finish()
    }
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
                if let Ok(Some(status)) = worker.child.try_wait() {
                    return Err(format!(
                        "command {} ({}) exited as soon as it started ({}){}; check the program and its arguments in mapper --command",
                        common::text::escaped(&spec.name),
                        common::text::escaped(&spec.program),
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
            common::text::escaped(&spec.name),
            pids.len(),
            if pids.len() == 1 { "child" } else { "children" },
            pids.join(", ")
        );
        Ok(CommandTransform {
            spec: spec.clone(),
            options: options.clone(),
            slots: Mutex::new(slots),
            returned: Condvar::new(),
        })
    }

    /// The process ids of the children not in use right now (all of them between chunks).
    pub fn pids(&self) -> Vec<u32> {
        self.lock_slots().iter().flatten().map(|w| w.pid).collect()
    }

    fn lock_slots(&self) -> MutexGuard<'_, Vec<Option<Worker>>> {
        // A panic while holding the lock cannot leave the list half-changed (push and pop).
        self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
        let mut results = Vec::with_capacity(inputs.len());
        let outcome = catch_unwind(AssertUnwindSafe(|| self.stream(lease.slot_mut(), inputs, &mut results)));
        if outcome.is_err() {
            // Not expected (nothing a child does panics here), but the chunk must still get
            // an outcome per object, and the child's state is unknown.
            lease.discard();
            let message = format!("the command {} transform panicked", common::text::escaped(&self.spec.name));
            results.resize_with(inputs.len(), || Err(ObjectError { cause: Cause::Crash, message: message.clone() }));
        }
        results
    }

    fn stream(&self, slot: &mut Option<Worker>, inputs: &[&[u8]], results: &mut Vec<Result<Outputs, ObjectError>>) {
        // Whether the child in the slot has been given inputs[results.len()..].
        let mut fed = false;
        // Failed tries of the object at results.len().
        let mut failures: u32 = 0;
        self.check_idle(slot);
        while results.len() < inputs.len() {
            let k = results.len();
            if let Err(message) = self.ensure_child(slot) {
                results
                    .resize_with(inputs.len(), || Err(ObjectError { cause: Cause::Crash, message: message.clone() }));
                return;
            }
            let Some(worker) = slot.as_mut() else { continue };
            if !fed {
                worker.feed(&inputs[k..]);
                fed = true;
            }
            let (cause, message, why) = match self.answer(worker) {
                Ok(out) => {
                    results.push(Ok(out));
                    failures = 0;
                    continue;
                }
                Err(failed) => failed,
            };
            failures += 1;
            if failures > self.options.retries {
                results.push(Err(ObjectError { cause, message: format!("{message}{}", times(failures)) }));
                failures = 0;
            }
            if let Some(old) = slot.take() {
                self.replace(slot, old, &why);
            }
            fed = false;
        }
    }

    /// Between runs a child should be silent; if it died or wrote, it is out of step and is
    /// replaced.
    fn check_idle(&self, slot: &mut Option<Worker>) {
        let Some(worker) = slot.as_mut() else { return };
        let stale = match worker.lines.try_recv() {
            Ok(_) => Some("it wrote a line no object asked for"),
            Err(TryRecvError::Disconnected) => Some("it had exited while idle"),
            Err(TryRecvError::Empty) => None,
        };
        if let Some(why) = stale {
            if let Some(old) = slot.take() {
                self.replace(slot, old, why);
            }
        }
    }

    /// A child in `slot`, started again if the last one could not be: the error message for the
    /// chunk's remaining objects if it cannot.
    fn ensure_child(&self, slot: &mut Option<Worker>) -> Result<(), String> {
        if slot.is_some() {
            return Ok(());
        }
        let worker = Worker::spawn(&self.spec).map_err(|why| format!("{why} (while restarting it)"))?;
        let name = common::text::escaped(&self.spec.name);
        tracing::warn!("command {name}: started a child again ([{}]) after it could not be", worker.pid);
        *slot = Some(worker);
        Ok(())
    }

    /// The child's answer for the next object: its output, or why not (the object's cause and
    /// message, and the reason the child is replaced).
    fn answer(&self, worker: &mut Worker) -> Result<Outputs, (Cause, String, String)> {
        let name = common::text::escaped(&self.spec.name);
        match worker.lines.recv_timeout(self.options.timeout) {
            Ok(Line::Value(line)) => match common::json::check_value(&line) {
                Ok(()) => {
                    let mut out = Outputs::default();
                    out.push_json(&line);
                    Ok(out)
                }
                Err(e) => {
                    let text = String::from_utf8_lossy(&line);
                    let shown = common::text::escaped(text.trim_end_matches('\r'));
                    Err((
                        Cause::Transform,
                        format!("command {name} answered this object with a line that is not JSON ({e}): `{shown}`"),
                        "it answered with a line that is not JSON".to_string(),
                    ))
                }
            },
            Ok(Line::TooLong) => Err((
                Cause::Transform,
                format!("command {name} answered this object with a line longer than {} MiB", MAX_LINE_BYTES >> 20),
                "it wrote a line too long to read".to_string(),
            )),
            Err(RecvTimeoutError::Timeout) => {
                let limit = humantime::format_duration(self.options.timeout);
                Err((
                    Cause::Timeout,
                    format!("command {name} took longer than {limit} on this object"),
                    format!("it took longer than {limit} on an object"),
                ))
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = describe_status(worker.exit_status(EXIT_GRACE));
                let note = worker.last_stderr_note();
                Err((
                    Cause::Crash,
                    format!("command {name} died on this object ({status}){note}"),
                    format!("it died on an object ({status})"),
                ))
            }
        }
    }

    /// Kills `old` and puts a fresh child in `slot` (or leaves it empty if none can start),
    /// with one log line saying why.
    fn replace(&self, slot: &mut Option<Worker>, old: Worker, why: &str) {
        let name = common::text::escaped(&self.spec.name);
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
        // Each worker kills and reaps its child as it is dropped.
        let workers = std::mem::take(&mut *self.lock_slots());
        let count = workers.iter().flatten().count();
        drop(workers);
        tracing::debug!("command {}: stopped {count} children", common::text::escaped(&self.spec.name));
    }
}

/// `, twice` or `, N times` after a failure that was tried more than once.
fn times(tries: u32) -> String {
    match tries {
        0 | 1 => String::new(),
        2 => ", twice".into(),
        n => format!(", {n} times"),
    }
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
        match self.apply_chunk(&[input]).pop() {
            Some(Ok(values)) => {
                for value in values.iter() {
                    out.push_json(value);
                }
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => Err(ObjectError { cause: Cause::Crash, message: "the command gave no outcome".into() }),
        }
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
}

/// What the stdout reader thread hands over.
enum Line {
    /// One line, without its `\n`.
    Value(Vec<u8>),
    /// A line longer than [`MAX_LINE_BYTES`]; the reader stopped.
    TooLong,
}

/// One child and the threads around it: a writer feeding its stdin (so that the mapper never
/// blocks on a full pipe while the child blocks on its own full stdout), a reader turning its
/// stdout into lines (so the mapper can wait for one with a timeout), and a drain for its
/// stderr into the log.
struct Worker {
    child: Child,
    pid: u32,
    input: Option<Sender<Vec<u8>>>,
    lines: Receiver<Line>,
    last_stderr: Arc<Mutex<String>>,
    stderr_drain: JoinHandle<()>,
}

impl Worker {
    fn spawn(spec: &CommandSpec) -> Result<Worker, String> {
        let mut command = Command::new(&spec.program);
        command
            .args(&spec.args)
            .env_clear()
            .envs(std::env::vars_os().filter(|(name, _)| !is_withheld_variable(&name.to_string_lossy())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt as _;
            command.process_group(0);
        }
        let mut child = command.spawn().map_err(|e| describe_spawn_error(spec, &e))?;
        let pid = child.id();
        let pipes = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let (Some(stdin), Some(stdout), Some(stderr)) = pipes else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "cannot start command {}: its pipes were not set up",
                common::text::escaped(&spec.name)
            ));
        };
        let last_stderr = Arc::new(Mutex::new(String::new()));
        let (input, to_write) = mpsc::channel();
        let (answers, lines) = mpsc::sync_channel(LINES_AHEAD);
        let name = spec.name.clone();
        let threads = spawn_thread(&spec.name, "in", move || write_input(stdin, &to_write))
            .and_then(|_| spawn_thread(&spec.name, "out", move || read_output(stdout, &answers)))
            .and_then(|_| {
                let last = Arc::clone(&last_stderr);
                spawn_thread(&spec.name, "err", move || drain_stderr(stderr, &name, pid, &last))
            });
        let stderr_drain = match threads {
            Ok(handle) => handle,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "cannot start command {}: no thread for its pipes: {e}",
                    common::text::escaped(&spec.name)
                ));
            }
        };
        Ok(Worker { child, pid, input: Some(input), lines, last_stderr, stderr_drain })
    }

    /// Hands `inputs` to the writer thread as one block of lines.
    fn feed(&mut self, inputs: &[&[u8]]) {
        let mut block = Vec::with_capacity(inputs.iter().map(|i| i.len() + 1).sum());
        for input in inputs {
            block.extend_from_slice(&common::json::compact(input));
            block.push(b'\n');
        }
        if let Some(input) = &self.input {
            // If the writer is gone the child is too, which the next read finds out.
            let _ = input.send(block);
        }
    }

    /// The child's exit status once it has exited, waiting up to `grace` for it to do so by
    /// itself (its stdout closed: it is on its way out) before killing it.
    fn exit_status(&mut self, grace: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Ok(None) => {
                    let _ = self.child.kill();
                    return self.child.wait().ok();
                }
                Err(_) => return None,
            }
        }
    }

    /// `; its last stderr line: "..."`, or nothing if it wrote none. Called once the child
    /// has exited: its stderr then ends, and the drain gets a moment to log its last lines
    /// (not forever: a grandchild may hold the pipe open).
    fn last_stderr_note(&self) -> String {
        let deadline = Instant::now() + STDERR_SETTLE;
        while !self.stderr_drain.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        let last = self.last_stderr.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if last.is_empty() {
            String::new()
        } else {
            format!("; its last stderr line: `{}`", common::text::escaped(&last))
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing stdin stops the writer thread; the kill is what stops the child, and the
        // wait reaps it (no zombie).
        self.input.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_thread(name: &str, what: &str, body: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    // Linux shows 15 bytes of a thread's name; the command's name is the operator's text.
    let short: String = name.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').take(10).collect();
    std::thread::Builder::new().name(format!("{short}-{what}")).spawn(body)
}

fn write_input(mut stdin: ChildStdin, blocks: &Receiver<Vec<u8>>) {
    while let Ok(block) = blocks.recv() {
        // A child that died or closed its stdin: the reader sees it end, nothing to do here.
        if stdin.write_all(&block).and_then(|()| stdin.flush()).is_err() {
            return;
        }
    }
}

fn read_output(stdout: ChildStdout, answers: &SyncSender<Line>) {
    let mut reader = BufReader::with_capacity(64 << 10, stdout);
    loop {
        let mut line = Vec::new();
        match read_line(&mut reader, &mut line, MAX_LINE_BYTES, false) {
            Ok(Read::Line) => {
                if answers.send(Line::Value(line)).is_err() {
                    return;
                }
            }
            Ok(Read::TooLong) => {
                let _ = answers.send(Line::TooLong);
                return;
            }
            Ok(Read::End) | Err(_) => return,
        }
    }
}

fn drain_stderr(stderr: ChildStderr, name: &str, pid: u32, last: &Mutex<String>) {
    let mut reader = BufReader::new(stderr);
    let name = common::text::escaped(name);
    let mut line = Vec::new();
    loop {
        line.clear();
        match read_line(&mut reader, &mut line, MAX_STDERR_LINE, true) {
            Ok(Read::Line | Read::TooLong) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches('\r');
                tracing::info!("command {name}[{pid}]: {}", common::text::escaped(text));
                if !text.trim().is_empty() {
                    let mut kept = last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    kept.clear();
                    kept.push_str(text);
                }
            }
            Ok(Read::End) | Err(_) => return,
        }
    }
}

/// What [`read_line`] found.
enum Read {
    /// A line (or the last bytes before the end, without a `\n`).
    Line,
    /// A line longer than the limit: stopped at the limit (or kept its start, when cutting).
    TooLong,
    /// The end of the stream.
    End,
}

/// Reads one line into `line` (without its `\n`), at most `max` bytes of it. A longer line is
/// [`Read::TooLong`]: with `cut`, its first `max` bytes are kept and the rest skipped up to the
/// `\n`; without, reading stops there.
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>, max: usize, cut: bool) -> io::Result<Read> {
    let mut too_long = false;
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(match (too_long, line.is_empty()) {
                (true, _) => Read::TooLong,
                (false, true) => Read::End,
                (false, false) => Read::Line,
            });
        }
        let (part, used, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(at) => (&buf[..at], at + 1, true),
            None => (buf, buf.len(), false),
        };
        if !too_long {
            let room = max - line.len();
            if part.len() > room {
                too_long = true;
                line.extend_from_slice(&part[..room]);
                if !cut {
                    return Ok(Read::TooLong);
                }
            } else {
                line.extend_from_slice(part);
            }
        }
        reader.consume(used);
        if done {
            return Ok(if too_long { Read::TooLong } else { Read::Line });
        }
    }
}

fn describe_spawn_error(spec: &CommandSpec, e: &io::Error) -> String {
    let name = common::text::escaped(&spec.name);
    let program = common::text::escaped(&spec.program);
    match e.kind() {
        io::ErrorKind::NotFound => format!(
            "cannot start command {name}: program `{program}` not found (is it installed, and on the mapper's PATH or given as a path?)"
        ),
        io::ErrorKind::PermissionDenied => {
            format!("cannot start command {name}: program `{program}` is not executable (permission denied)")
        }
        _ => format!("cannot start command {name}: program `{program}`: {e}"),
    }
}

fn describe_status(status: Option<ExitStatus>) -> String {
    let Some(status) = status else { return "exit status unknown".into() };
    if let Some(code) = status.code() {
        return format!("exit status {code}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt as _;
        if let Some(signal) = status.signal() {
            let what = match signal {
                6 => " (SIGABRT)",
                9 => " (SIGKILL)",
                11 => " (SIGSEGV)",
                15 => " (SIGTERM)",
                _ => "",
            };
            return format!("killed by signal {signal}{what}");
        }
    }
    status.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn script(name: &str) -> String {
        let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "examples", "commands", name].iter().collect();
        path.to_string_lossy().into_owned()
    }

    fn faulty(args: &[&str]) -> CommandSpec {
        let mut all = vec![script("faulty.py")];
        all.extend(args.iter().map(|a| a.to_string()));
        CommandSpec { name: "faulty".into(), program: "python3".into(), args: all }
    }

    fn options(workers: usize, timeout: Duration) -> CommandOptions {
        CommandOptions { workers, timeout, retries: 1 }
    }

    fn texts(outcome: &Result<Outputs, ObjectError>) -> Vec<String> {
        outcome.as_ref().unwrap().iter().map(|v| String::from_utf8(v.to_vec()).unwrap()).collect()
    }

    fn objects(n: usize, special: &[(usize, &str)]) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| match special.iter().find(|(at, _)| *at == i) {
                Some((_, fault)) => format!(r#"{{"i":{i},"fault":"{fault}"}}"#).into_bytes(),
                None => format!(r#"{{"i":{i}, "pad": "{}"}}"#, "x".repeat(i % 50)).into_bytes(),
            })
            .collect()
    }

    fn alive(pid: u32) -> bool {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn specs_split_like_a_shell() {
        let spec: CommandSpec = r#"resize=python3 "my script.py" --quality 3"#.parse().unwrap();
        assert_eq!(spec.name, "resize");
        assert_eq!(spec.program, "python3");
        assert_eq!(spec.args, vec!["my script.py", "--quality", "3"]);
        let spec: CommandSpec = r#" x =  'a b'"c\"d" e\ f "" '' "\n""#.parse().unwrap();
        assert_eq!(spec.name, "x");
        assert_eq!(spec.program, "a bc\"d");
        assert_eq!(spec.args, vec!["e f", "", "", "\\n"]);
        let spec: CommandSpec = "k=prog a=b".parse().unwrap();
        assert_eq!((spec.program.as_str(), spec.args), ("prog", vec!["a=b".to_string()]));
        for (bad, says) in [
            ("python3 x.py", "NAME=PROGRAM"),
            ("=python3", "no command name"),
            ("my cmd=python3", "white space"),
            ("x=", "no program"),
            ("x=   ", "no program"),
            ("x=''", "no program"),
            ("x=python3 'open", "single quote"),
            ("x=python3 \"open", "double quote"),
            ("x=python3 \\", "backslash"),
        ] {
            let err = bad.parse::<CommandSpec>().unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn credentials_are_withheld_from_children() {
        for name in ["NATS_URL", "nats_creds", "DB_PASSWORD", "api_token", "MySecret", "GITHUB_TOKEN"] {
            assert!(is_withheld_variable(name), "{name}");
        }
        for name in ["PATH", "HOME", "LANG", "PYTHONPATH", "NATSURL"] {
            assert!(!is_withheld_variable(name), "{name}");
        }
        // Edition 2021: set_var is safe; std serialises it with its own environment reads.
        std::env::set_var("NATS_PASSWORD", "hunter2");
        std::env::set_var("CHUNKMILL_TEST_TOKEN", "t0k3n");
        std::env::set_var("CHUNKMILL_TEST_VISIBLE", "yes");
        let program =
            "import json, os, sys\nfor line in sys.stdin:\n    print(json.dumps(sorted(os.environ)), flush=True)";
        let spec =
            CommandSpec { name: "env".into(), program: "python3".into(), args: vec!["-c".into(), program.into()] };
        let command = CommandTransform::start(&spec, &CommandOptions::default()).unwrap();
        let mut out = Outputs::default();
        command.apply(b"{}", &mut out).unwrap();
        let names: Vec<String> = serde_json::from_slice(out.iter().next().unwrap()).unwrap();
        assert!(
            names.contains(&"CHUNKMILL_TEST_VISIBLE".to_string()) && names.contains(&"PATH".to_string()),
            "{names:?}"
        );
        assert!(!names.iter().any(|n| n == "NATS_PASSWORD" || n == "CHUNKMILL_TEST_TOKEN"), "{names:?}");
    }

    #[test]
    fn five_hundred_objects_through_two_children_come_back_in_order() {
        let command = CommandTransform::start(&faulty(&[]), &options(2, Duration::from_secs(10))).unwrap();
        assert_eq!(command.pids().len(), 2);
        let inputs = objects(500, &[]);
        let refs: Vec<&[u8]> = inputs.iter().map(|i| i.as_slice()).collect();
        for _ in 0..2 {
            let outcomes = command.apply_chunk(&refs);
            assert_eq!(outcomes.len(), 500);
            for (i, outcome) in outcomes.iter().enumerate() {
                let expected = String::from_utf8(common::json::compact(&inputs[i]).into_owned()).unwrap();
                assert_eq!(texts(outcome), vec![expected]);
            }
        }
        // The same children served both chunks.
        assert_eq!(command.pids().len(), 2);
    }

    #[test]
    fn the_example_enriches_orders_and_passes_the_rest() {
        let spec: CommandSpec = format!("enrich=python3 {}", script("enrich.py")).parse().unwrap();
        let command = CommandTransform::start(&spec, &CommandOptions::default()).unwrap();
        let order = br#"{"order_id":"o-1","items":[{"sku":"a","qty":2,"price":1.5},{"sku":"b","qty":1,"price":7}]}"#;
        let outcomes = command.apply_chunk(&[order, br#"{"x": 1}"#]);
        assert_eq!(texts(&outcomes[0]), vec![r#"{"order_id":"o-1","items":2,"total":10.0}"#]);
        assert_eq!(texts(&outcomes[1]), vec![r#"{"x":1,"seen_by":"enrich.py"}"#]);
    }

    #[test]
    fn a_crash_dead_letters_only_its_object_and_the_pool_goes_on() {
        let command = CommandTransform::start(&faulty(&[]), &options(2, Duration::from_secs(10))).unwrap();
        let before = command.pids();
        let inputs = objects(40, &[(7, "crash"), (30, "crash")]);
        let refs: Vec<&[u8]> = inputs.iter().map(|i| i.as_slice()).collect();
        let outcomes = command.apply_chunk(&refs);
        for (i, outcome) in outcomes.iter().enumerate() {
            if i == 7 || i == 30 {
                let err = outcome.as_ref().unwrap_err();
                assert_eq!(err.cause, Cause::Crash);
                assert_eq!(err.message, "command faulty died on this object (exit status 3), twice");
            } else {
                assert_eq!(texts(outcome).len(), 1, "{i}");
            }
        }
        // The crashed children were replaced and reaped (which of the two ran which run is
        // up to rayon: one child may have run both).
        let after = command.pids();
        assert_eq!(after.len(), 2);
        assert_ne!(before, after);
        for pid in before.iter().filter(|pid| !after.contains(pid)) {
            assert!(!alive(*pid), "{pid}");
        }
        let outcomes = command.apply_chunk(&refs[..5]);
        assert!(outcomes.iter().all(Result::is_ok));
    }

    #[test]
    fn a_retry_that_succeeds_keeps_the_object() {
        let state = tempfile::tempdir().unwrap();
        let state_dir = state.path().to_string_lossy().into_owned();
        let command =
            CommandTransform::start(&faulty(&["--state", &state_dir]), &options(1, Duration::from_secs(10))).unwrap();
        let inputs = objects(5, &[(2, "crash-once")]);
        let refs: Vec<&[u8]> = inputs.iter().map(|i| i.as_slice()).collect();
        let outcomes = command.apply_chunk(&refs);
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
        assert_eq!(texts(&outcomes[2]), vec![r#"{"i":2,"fault":"crash-once"}"#]);
    }

    #[test]
    fn without_retries_one_failure_dead_letters_and_says_why() {
        let program = "import sys\nfor line in sys.stdin:\n    if 'boom' in line:\n        print('Traceback: it went boom', file=sys.stderr, flush=True)\n        sys.exit(1)\n    print(line.strip(), flush=True)";
        let spec =
            CommandSpec { name: "boom".into(), program: "python3".into(), args: vec!["-c".into(), program.into()] };
        let options = CommandOptions { workers: 1, timeout: Duration::from_secs(10), retries: 0 };
        let command = CommandTransform::start(&spec, &options).unwrap();
        let outcomes = command.apply_chunk(&[b"{}", br#"{"boom":1}"#, b"{}"]);
        let err = outcomes[1].as_ref().unwrap_err();
        assert_eq!(
            err.message,
            "command boom died on this object (exit status 1); its last stderr line: `Traceback: it went boom`"
        );
        assert!(outcomes[0].is_ok() && outcomes[2].is_ok());
    }

    #[test]
    fn a_hang_is_a_timeout_for_that_object_only() {
        let started = Instant::now();
        let command = CommandTransform::start(&faulty(&[]), &options(2, Duration::from_secs(1))).unwrap();
        let inputs = objects(20, &[(3, "hang")]);
        let refs: Vec<&[u8]> = inputs.iter().map(|i| i.as_slice()).collect();
        let outcomes = command.apply_chunk(&refs);
        let err = outcomes[3].as_ref().unwrap_err();
        assert_eq!(err.cause, Cause::Timeout);
        assert_eq!(err.message, "command faulty took longer than 1s on this object, twice");
        assert!(outcomes.iter().enumerate().all(|(i, o)| i == 3 || o.is_ok()));
        assert!(started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());
    }

    #[test]
    fn garbage_is_the_objects_transform_error() {
        let command = CommandTransform::start(&faulty(&[]), &options(1, Duration::from_secs(10))).unwrap();
        let inputs = objects(6, &[(4, "garbage")]);
        let refs: Vec<&[u8]> = inputs.iter().map(|i| i.as_slice()).collect();
        let outcomes = command.apply_chunk(&refs);
        let err = outcomes[4].as_ref().unwrap_err();
        assert_eq!(err.cause, Cause::Transform);
        assert!(
            err.message.contains("not JSON") && err.message.contains("`not json`") && err.message.ends_with(", twice"),
            "{err}"
        );
        assert!(outcomes.iter().enumerate().all(|(i, o)| i == 4 || o.is_ok()));
        let mut out = Outputs::default();
        assert!(command.apply(br#"{"fault":"stderr"}"#, &mut out).is_ok());
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn a_program_that_cannot_run_is_refused_at_start() {
        let spec: CommandSpec = "resize=chunkmill-no-such-program --x".parse().unwrap();
        let err = CommandTransform::start(&spec, &CommandOptions::default()).unwrap_err();
        assert!(err.contains("resize") && err.contains("`chunkmill-no-such-program` not found"), "{err}");
        let spec: CommandSpec = r#"resize=sh -c 'echo "resize.py: No such file" >&2; exit 2'"#.parse().unwrap();
        let err = CommandTransform::start(&spec, &CommandOptions::default()).unwrap_err();
        assert!(err.contains("exited as soon as it started (exit status 2)"), "{err}");
        assert!(err.contains("its last stderr line: `resize.py: No such file`"), "{err}");
        let not_executable = tempfile::NamedTempFile::new().unwrap();
        let program = not_executable.path().to_string_lossy().into_owned();
        let spec = CommandSpec { name: "x".into(), program, args: vec![] };
        let err = CommandTransform::start(&spec, &CommandOptions::default()).unwrap_err();
        assert!(err.contains("is not executable"), "{err}");
    }

    #[test]
    fn dropping_the_transform_leaves_no_child_running() {
        let command = CommandTransform::start(&faulty(&[]), &options(3, Duration::from_secs(10))).unwrap();
        let pids = command.pids();
        assert_eq!(pids.len(), 3);
        assert!(pids.iter().all(|pid| alive(*pid)));
        drop(command);
        for pid in pids {
            assert!(!alive(pid), "{pid} is still there");
        }
    }

    #[test]
    fn long_lines_are_refused_or_cut() {
        let mut reader = io::Cursor::new(b"abcdef\nxy\nlast".to_vec());
        let mut line = Vec::new();
        assert!(matches!(read_line(&mut reader, &mut line, 3, true), Ok(Read::TooLong)));
        assert_eq!(line, b"abc");
        line.clear();
        assert!(matches!(read_line(&mut reader, &mut line, 3, true), Ok(Read::Line)));
        assert_eq!(line, b"xy");
        line.clear();
        assert!(matches!(read_line(&mut reader, &mut line, 3, false), Ok(Read::TooLong)));
        let mut reader = io::Cursor::new(b"ab\n".to_vec());
        line.clear();
        assert!(matches!(read_line(&mut reader, &mut line, 3, false), Ok(Read::Line)));
        line.clear();
        assert!(matches!(read_line(&mut reader, &mut line, 3, false), Ok(Read::End)));
    }
}
