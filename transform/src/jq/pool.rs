//! The jq sandboxes, parent side: a pool of long-lived sandbox processes of one program, one
//! per thread that needs one, each fed runs of consecutive objects and answering each in order.
//!
//! When a sandbox fails (it answers that an object timed out, dies, or goes silent past the
//! timeout), it is killed and reaped, and a fresh one gets the rest of the run. Which object it
//! failed on is known when it answered "timed out", or when it was in a careful run (every answer
//! written at once); otherwise the rest of the run goes to a fresh sandbox in a careful run, which
//! pins the failure on its object if it happens again. An object a sandbox failed on is retried
//! ([`JqOptions::retries`], once), then dead-lettered with the cause and the limit that stopped
//! it; the objects around it keep their answers.

use std::io::{self, BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::frame::{self, Answer, Hello, Ready};
use super::sandbox::SANDBOX_ARG;
use super::{JqOptions, Restart};
use crate::{BuildError, Cause, ObjectError, Outputs};

/// How long a sandbox may take to start and compile its program.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How much a sandbox may print before its greeting (a test harness's first line).
const PREAMBLE: usize = 64 << 10;

/// How long past the timeout a silent sandbox is waited for: its own watchdog answers "timed
/// out" at the timeout, so this only catches a sandbox that cannot (stopped, starved).
const SILENCE_GRACE: Duration = Duration::from_secs(5);

/// How long a sandbox whose connection closed gets to exit by itself (so its own exit status
/// is known) before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// How much of a sandbox's stderr is kept to explain its death.
const STDERR_TAIL: usize = 4096;

/// Failures in a row that no object could be blamed for, after which the rest of a run is
/// dead-lettered rather than tried again.
const MAX_UNPINNED: u32 = 3;

/// The sandboxes of one program.
pub(crate) struct Pool {
    program: String,
    options: JqOptions,
    idle: Mutex<Vec<Sandbox>>,
}

impl Pool {
    /// Starts the first sandbox: it compiles the program (or says why not), and proves that
    /// this binary can be one.
    pub(crate) fn start(program: &str, options: &JqOptions) -> Result<Pool, BuildError> {
        let first = Sandbox::spawn(program, options)?;
        Ok(Pool { program: program.to_string(), options: options.clone(), idle: Mutex::new(vec![first]) })
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Sandbox>> {
        common::sync::lock(&self.idle, "idle jq sandboxes")
    }

    pub(crate) fn pids(&self) -> Vec<u32> {
        self.idle().iter().map(|s| s.pid).collect()
    }

    /// Runs `inputs` through one sandbox, in order: one outcome per input.
    pub(crate) fn run(&self, inputs: &[&[u8]]) -> Vec<Result<Outputs, ObjectError>> {
        let mut slot = self.idle().pop();
        let mut results = Vec::with_capacity(inputs.len());
        let outcome = catch_unwind(AssertUnwindSafe(|| self.stream(&mut slot, inputs, &mut results)));
        if outcome.is_err() {
            // Not expected (nothing here panics on a sandbox's answers), but every object still
            // gets an outcome, and the sandbox's state is unknown.
            slot = None;
            let message = "the jq transform panicked while running its sandbox".to_string();
            results.resize_with(inputs.len(), || Err(ObjectError { cause: Cause::Crash, message: message.clone() }));
        }
        if let Some(sandbox) = slot {
            self.idle().push(sandbox);
        }
        results
    }

    fn stream(&self, slot: &mut Option<Sandbox>, inputs: &[&[u8]], results: &mut Vec<Result<Outputs, ObjectError>>) {
        let mut careful = false;
        let (mut pinned_on, mut tries, mut unpinned) = (None, 0u32, 0u32);
        while results.len() < inputs.len() {
            let sandbox = match self.ready_sandbox(slot) {
                Ok(sandbox) => sandbox,
                Err(why) => return fill(results, inputs.len(), Cause::Crash, &why),
            };
            let stop = match feed(sandbox, &inputs[results.len()..], careful, self.silence(), results) {
                Ok(()) => return,
                Err(stop) => stop,
            };
            let Some(sandbox) = slot.take() else { continue };
            let fault = self.fault(sandbox, stop, careful);
            careful = true;
            if !fault.pinned {
                unpinned += 1;
                if unpinned >= MAX_UNPINNED {
                    let why = format!("{}, {unpinned} times in a row on this run of objects", fault.message);
                    return fill(results, inputs.len(), fault.cause, &why);
                }
                continue;
            }
            unpinned = 0;
            let k = results.len();
            tries = if pinned_on == Some(k) { tries + 1 } else { 1 };
            pinned_on = Some(k);
            if tries > self.options.retries {
                results.push(Err(ObjectError {
                    cause: fault.cause,
                    message: format!("{}{}", fault.message, times(tries)),
                }));
                pinned_on = None;
            }
        }
    }

    /// The sandbox in `slot`, replaced if it died while idle, started if there is none.
    fn ready_sandbox<'a>(&self, slot: &'a mut Option<Sandbox>) -> Result<&'a mut Sandbox, String> {
        if let Some(mut old) = slot.take() {
            match old.child.try_wait() {
                Ok(None) => return Ok(slot.insert(old)),
                _ => tracing::warn!("jq sandbox [{}] had exited while idle; starting another", old.pid),
            }
        }
        let sandbox = Sandbox::spawn(&self.program, &self.options)
            .map_err(|e| format!("the jq sandbox cannot be started again: {e}"))?;
        Ok(slot.insert(sandbox))
    }

    /// How long a sandbox may stay silent while it holds objects.
    fn silence(&self) -> Duration {
        self.options.timeout + frame::FLUSH_EVERY + SILENCE_GRACE
    }

    /// What `stop` says about the object the sandbox was on; the sandbox is killed and reaped.
    fn fault(&self, mut sandbox: Sandbox, stop: Stop, careful: bool) -> Fault {
        let pid = sandbox.pid;
        let fault = match stop {
            Stop::TimedOut => self.timed_out(),
            Stop::Silent if careful => self.timed_out(),
            Stop::Silent => Fault::unpinned(Restart::Died, "the jq sandbox went silent"),
            Stop::NotSent(e) => {
                Fault::unpinned(Restart::Died, &format!("the jq sandbox did not take the objects ({e})"))
            }
            Stop::Broken(e) => {
                let (status, stderr) = sandbox.death();
                let mut fault = self.died(status, &stderr, careful);
                if e.kind() != io::ErrorKind::UnexpectedEof {
                    fault.message.push_str(&format!(" (its answer could not be read: {e})"));
                }
                fault
            }
        };
        drop(sandbox);
        tracing::warn!("jq sandbox [{pid}] killed and to be restarted: {}", fault.message);
        if let Some(on_restart) = &self.options.on_restart {
            on_restart(fault.restart);
        }
        fault
    }

    fn timed_out(&self) -> Fault {
        let limit = humantime::format_duration(self.options.timeout);
        let message =
            format!("jq took longer than {limit} on this object (time limit, `{} --jq-timeout`)", self.options.setting);
        Fault { cause: Cause::Timeout, message, restart: Restart::Timeout, pinned: true }
    }

    /// Why a sandbox died, from its exit status and its last words on stderr.
    fn died(&self, status: Option<ExitStatus>, stderr: &str, careful: bool) -> Fault {
        let (restart, message) = if stderr.contains("memory allocation of") {
            let (memory, setting) = (self.options.memory, self.options.setting);
            (
                Restart::Memory,
                format!("jq used more than {memory} on this object (memory limit, `{setting} --jq-memory`)"),
            )
        } else if stderr.contains("has overflowed its stack") {
            let why = "jq recursion too deep (stack overflow): a recursive definition without end, or a value nested too deep to take apart";
            (Restart::Stack, why.to_string())
        } else if status.and_then(|s| s.signal()) == Some(9) {
            let setting = self.options.setting;
            let why = format!("the jq sandbox was killed (signal 9) on this object: out of memory? (the container's memory limit may be lower than the sandboxes' `{setting} --jq-memory`)");
            (Restart::Died, why)
        } else {
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
            let note =
                if last.is_empty() { String::new() } else { format!(": {}", common::text::escaped(last.trim())) };
            (Restart::Died, format!("the jq sandbox died on this object ({}){note}", describe(status)))
        };
        let cause = Cause::Crash;
        Fault { cause, message, restart, pinned: careful }
    }
}

/// Every object from `results.len()` on gets `why`.
fn fill(results: &mut Vec<Result<Outputs, ObjectError>>, len: usize, cause: Cause, why: &str) {
    results.resize_with(len, || Err(ObjectError { cause, message: why.to_string() }));
}

/// `, twice` or `, N times` after a failure that was tried more than once.
fn times(tries: u32) -> String {
    match tries {
        0 | 1 => String::new(),
        2 => ", twice".into(),
        n => format!(", {n} times"),
    }
}

fn describe(status: Option<ExitStatus>) -> String {
    match status {
        None => "it did not exit".into(),
        Some(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(6)) => "aborted (signal 6)".into(),
            (None, Some(11)) => "segmentation fault (signal 11)".into(),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            (None, None) => status.to_string(),
        },
    }
}

/// Sends `inputs` as one run and reads an answer for each into `results`; stops at the first
/// answer that is not one.
fn feed(
    sandbox: &mut Sandbox,
    inputs: &[&[u8]],
    careful: bool,
    silence: Duration,
    results: &mut Vec<Result<Outputs, ObjectError>>,
) -> Result<(), Stop> {
    sandbox.send(inputs, careful, silence).map_err(Stop::NotSent)?;
    for _ in inputs {
        let answer = frame::read_answer(&mut sandbox.connection).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Stop::Silent,
            _ => Stop::Broken(e),
        })?;
        results.push(match answer {
            Answer::Values(values) => Ok(Outputs::from_compact(values.bytes, values.ends)),
            Answer::Refused(message) => Err(ObjectError::refused(message)),
            Answer::Panicked(message) => Err(ObjectError { cause: Cause::Crash, message }),
            Answer::TimedOut => return Err(Stop::TimedOut),
        });
    }
    Ok(())
}

/// Why a sandbox stopped answering.
#[derive(Debug)]
enum Stop {
    /// Its watchdog said the object took too long.
    TimedOut,
    /// It said nothing for longer than the timeout and then some.
    Silent,
    /// Its connection failed before it had the objects.
    NotSent(io::Error),
    /// Its connection closed or broke while it had them: it died.
    Broken(io::Error),
}

/// What a failed sandbox means for the object it was on.
struct Fault {
    cause: Cause,
    message: String,
    restart: Restart,
    /// Whether it is known to have failed on the first object without an answer.
    pinned: bool,
}

impl Fault {
    fn unpinned(restart: Restart, message: &str) -> Fault {
        Fault { cause: Cause::Crash, message: message.to_string(), restart, pinned: false }
    }
}

/// One sandbox process and the connection to it (its stdin and stdout, one Unix socket).
struct Sandbox {
    child: Child,
    pid: u32,
    connection: BufReader<UnixStream>,
    /// The thread draining its stderr (none if it could not start: a death is then unexplained).
    stderr: Option<JoinHandle<String>>,
}

impl Sandbox {
    /// Starts a sandbox of `program` and waits for its greeting.
    fn spawn(program: &str, options: &JqOptions) -> Result<Sandbox, BuildError> {
        let command = &options.sandbox;
        let shown = format!("{} {}", command.program.display(), SANDBOX_ARG);
        let start = |e: &dyn std::fmt::Display| BuildError::Start(format!("cannot start a jq sandbox ({shown}): {e}"));
        let (ours, theirs) = UnixStream::pair().map_err(|e| start(&e))?;
        let theirs_too = theirs.try_clone().map_err(|e| start(&e))?;
        let mut spawn = Command::new(&command.program);
        spawn
            .args(&command.args)
            .env_clear()
            .envs(command.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::from(OwnedFd::from(theirs_too)))
            .stderr(Stdio::piped())
            // Not in the mapper's process group: a Ctrl-C on its terminal is the mapper's to
            // handle (it finishes what it holds, which needs its sandboxes).
            .process_group(0);
        let spawned = spawn.spawn();
        // The command holds the child's end of the socket: closed here, so that the child's
        // death closes the connection.
        drop(spawn);
        let mut child = spawned.map_err(|e| start(&e))?;
        let pid = child.id();
        let stderr = child.stderr.take().and_then(|pipe| drain_stderr(pipe, pid));
        let mut sandbox = Sandbox { child, pid, connection: BufReader::new(ours), stderr };
        match sandbox.greet(program, options) {
            Ok(Ready::Compiled) => Ok(sandbox),
            Ok(Ready::Invalid(why)) => Err(BuildError::Invalid(why)),
            Ok(Ready::Failed(why)) => Err(start(&why)),
            Err(e) => {
                let (status, stderr) = sandbox.death();
                let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
                Err(start(&format!(
                    "{e} ({}{}); a binary that runs jq must call transform::jq::sandbox::enter_if_child() first in main",
                    describe(status),
                    if last.is_empty() { String::new() } else { format!(": {}", common::text::escaped(last.trim())) }
                )))
            }
        }
    }

    fn greet(&mut self, program: &str, options: &JqOptions) -> io::Result<Ready> {
        let socket = self.connection.get_ref();
        socket.set_read_timeout(Some(START_TIMEOUT))?;
        socket.set_write_timeout(Some(START_TIMEOUT))?;
        let hello = Hello { timeout: options.timeout, memory: options.memory.0, program: program.to_string() };
        frame::write_hello(&mut self.connection.get_ref(), &hello)?;
        frame::read_ready(&mut self.connection, PREAMBLE)
    }

    /// Sends a run; every read and write then waits at most `silence`.
    fn send(&mut self, inputs: &[&[u8]], careful: bool, silence: Duration) -> io::Result<()> {
        let socket = self.connection.get_ref();
        socket.set_read_timeout(Some(silence))?;
        socket.set_write_timeout(Some(silence))?;
        if !self.connection.buffer().is_empty() {
            return Err(io::Error::other("it wrote what no object asked for"));
        }
        frame::write_run(&mut self.connection.get_ref(), careful, inputs)
    }

    /// How it ended, after its connection broke: its exit status (killed if it does not exit
    /// within [`EXIT_GRACE`]) and the end of its stderr.
    fn death(&mut self) -> (Option<ExitStatus>, String) {
        let deadline = Instant::now() + EXIT_GRACE;
        let mut status = None;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(exited)) => {
                    status = Some(exited);
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => break,
            }
        }
        if status.is_none() {
            let _ = self.child.kill();
            status = self.child.wait().ok();
        }
        let stderr = self.stderr.take().and_then(|drain| drain.join().ok()).unwrap_or_default();
        (status, stderr)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(drain) = self.stderr.take() {
            let _ = drain.join();
        }
    }
}

/// Logs what a sandbox writes on stderr (only a dying sandbox does: the runtime's last words)
/// and keeps the end of it, returned when the pipe closes.
fn drain_stderr(pipe: std::process::ChildStderr, pid: u32) -> Option<JoinHandle<String>> {
    let drain = move || {
        let mut tail = String::new();
        let mut lines = BufReader::new(pipe);
        let mut line = Vec::new();
        while lines.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            tracing::warn!("jq sandbox [{pid}]: {}", common::text::escaped(&text));
            tail.push_str(&text);
            tail.push('\n');
            if tail.len() > STDERR_TAIL {
                let cut = tail.len() - STDERR_TAIL;
                let cut = (cut..tail.len()).find(|&i| tail.is_char_boundary(i)).unwrap_or(tail.len());
                tail.drain(..cut);
            }
            line.clear();
        }
        tail
    };
    std::thread::Builder::new().name(format!("jq-sandbox-{pid}-stderr")).spawn(drain).ok()
}
