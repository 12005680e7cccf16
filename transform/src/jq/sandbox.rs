//! The jq sandbox, child side: a process of the same binary that compiles one jq program and
//! runs it on the objects its parent sends (see [`super::frame`] for the wire), so that a program
//! that recurses or allocates without end, or never ends, takes down only this process.
//!
//! A stack overflow and a failed allocation abort a Rust process (there is no unwinding from
//! either, and jaq has no recursion limit or step hook), so they cannot be caught inside the
//! mapper; here they end the sandbox, which the parent sees and names. Inside the sandbox:
//!
//! - the memory the process may map for its data (`RLIMIT_DATA`) is `--jq-memory`, plus the
//!   evaluation thread's stack and [`BASELINE`]: an allocation past it fails and aborts the
//!   sandbox with "memory allocation of N bytes failed";
//! - the program runs on one thread with a large stack ([`stack_size`]: a quarter of the memory
//!   limit, at most 256 MiB), so deep but finite recursion works, and a recursion without end
//!   overflows it and aborts the sandbox ("has overflowed its stack");
//! - a watchdog (the main thread) ends the sandbox when one object takes longer than the
//!   timeout, after writing the answers it has and a "timed out" answer for that object; it
//!   also ends it when the parent is gone (the sandbox is then an orphan nobody waits for);
//! - a panic in jaq is caught and becomes the object's answer; the panic hook prints nothing.
//!
//! Every binary that builds jq transforms calls [`enter_if_child`] first in `main`: the parent
//! starts `/proc/self/exe` with [`SANDBOX_ARG`], and the child must become a sandbox before it
//! parses any flag or connects anywhere. A binary that does not (a test harness) fails at once on
//! the unknown argument, and the parent reports that its jq sandbox cannot start.

use std::fs::File;
use std::io::{self, BufReader, Write};
use std::os::fd::AsFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::frame::{self, Answer, Hello, Ready};
use super::program::Program;

/// The argument that makes a process a jq sandbox (its first).
pub const SANDBOX_ARG: &str = "--chunkmill-jq-sandbox";

/// The environment variable that makes a test binary's entry test a jq sandbox (see
/// [`enter_if_test_child`]).
pub const TEST_CHILD_ENV: &str = "CHUNKMILL_JQ_SANDBOX_TEST_CHILD";

/// Data the sandbox maps besides jq's values and the evaluation stack: the binary's own data,
/// buffers, the reading of a run.
pub const BASELINE: u64 = 64 << 20;

/// The largest evaluation stack.
const MAX_STACK: u64 = 256 << 20;

/// How often the watchdog checks that the parent is still there.
const PARENT_CHECK: Duration = Duration::from_secs(1);

/// Becomes a jq sandbox and exits if this process was started as one; returns at once
/// otherwise. Call it first in `main` of every binary that builds jq transforms (the stock
/// mapper and saver do, and `mapper::main_with` and `saver::verify::main_with` for binaries of
/// your own).
pub fn enter_if_child() {
    if std::env::args_os().nth(1).is_some_and(|arg| arg == SANDBOX_ARG) {
        std::process::exit(serve());
    }
}

/// For a test binary (whose `main` is the test harness): becomes a jq sandbox and exits if the
/// environment says so. The test that calls it is what [`super::JqOptions::test_binary`] starts.
pub fn enter_if_test_child() {
    if std::env::var_os(TEST_CHILD_ENV).is_some() {
        std::process::exit(serve());
    }
}

/// The evaluation thread's stack for a memory limit of `memory` bytes.
pub(crate) fn stack_size(memory: u64) -> u64 {
    (memory / 4).clamp(8 << 20, MAX_STACK)
}

fn serve() -> i32 {
    // A panic in jaq is caught and answered; its message must not reach stderr, which the
    // parent reads only to learn why the sandbox died.
    std::panic::set_hook(Box::new(|_| {}));
    match serve_stdio() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("jq sandbox: {e}");
            1
        }
    }
}

fn serve_stdio() -> io::Result<()> {
    // Owned copies of fds 0 and 1: raw files, without std's line buffering of stdout.
    let mut input = BufReader::new(File::from(io::stdin().as_fd().try_clone_to_owned()?));
    let output = File::from(io::stdout().as_fd().try_clone_to_owned()?);
    let hello = frame::read_hello(&mut input)?;
    let shared = Arc::new(Shared::new(output));
    let stack = stack_size(hello.memory);
    if let Err(e) = limit_memory(hello.memory.saturating_add(stack).saturating_add(BASELINE)) {
        return shared.lock().ready(&Ready::Failed(format!("cannot limit its memory (setrlimit): {e}")));
    }
    let evaluation = Arc::clone(&shared);
    let timeout = hello.timeout;
    let thread = std::thread::Builder::new()
        .name("jq-sandbox".into())
        .stack_size(usize::try_from(stack).unwrap_or(usize::MAX))
        .spawn(move || evaluate(input, hello, &evaluation));
    match thread {
        Ok(thread) => {
            watch(&shared, timeout);
            thread.join().unwrap_or_else(|_| Err(io::Error::other("the evaluation thread panicked")))
        }
        Err(e) => shared.lock().ready(&Ready::Failed(format!("cannot start its evaluation thread: {e}"))),
    }
}

fn limit_memory(bytes: u64) -> io::Result<()> {
    use rustix::process::{setrlimit, Resource, Rlimit};
    setrlimit(Resource::Data, Rlimit { current: Some(bytes), maximum: Some(bytes) }).map_err(io::Error::from)
}

/// What the evaluation thread and the watchdog share.
struct Shared {
    state: Mutex<State>,
    finished: Condvar,
}

struct State {
    output: File,
    /// Answers not written yet.
    buffer: Vec<u8>,
    /// When the object being evaluated started, if one is.
    started: Option<Instant>,
    last_write: Instant,
    done: bool,
}

impl Shared {
    fn new(output: File) -> Self {
        let state = State { output, buffer: Vec::new(), started: None, last_write: Instant::now(), done: false };
        Shared { state: Mutex::new(state), finished: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        common::sync::lock(&self.state, "sandbox state")
    }

    fn finish(&self) {
        self.lock().done = true;
        self.finished.notify_all();
    }
}

impl State {
    fn ready(&mut self, ready: &Ready) -> io::Result<()> {
        frame::write_ready(&mut self.output, ready)
    }

    fn write(&mut self) -> io::Result<()> {
        self.output.write_all(&self.buffer)?;
        self.buffer.clear();
        self.last_write = Instant::now();
        Ok(())
    }

    /// Keeps `answer`, and writes what is kept when the run wants every answer at once, or
    /// enough time or bytes went by.
    fn answered(&mut self, answer: &Answer, careful: bool) -> io::Result<()> {
        self.started = None;
        frame::put_answer(&mut self.buffer, answer)?;
        if careful || self.last_write.elapsed() >= frame::FLUSH_EVERY || self.buffer.len() >= frame::FLUSH_BYTES {
            self.write()?;
        }
        Ok(())
    }
}

/// The evaluation thread: compiles the program, answers that it is ready, then answers every
/// object of every run until the parent closes the connection.
fn evaluate(mut input: BufReader<File>, hello: Hello, shared: &Shared) -> io::Result<()> {
    let outcome = (|| {
        let program = match Program::compile(&hello.program) {
            Ok(program) => program,
            Err(why) => return shared.lock().ready(&Ready::Invalid(why)),
        };
        shared.lock().ready(&Ready::Compiled)?;
        while let Some(run) = frame::read_run(&mut input)? {
            for object in run.objects() {
                shared.lock().started = Some(Instant::now());
                let answer = answer(&program, object);
                shared.lock().answered(&answer, run.careful)?;
            }
            shared.lock().write()?;
        }
        Ok(())
    })();
    shared.finish();
    outcome
}

/// One object's answer; every value jaq made for it is dropped before this returns.
fn answer(program: &Program, object: &[u8]) -> Answer {
    match catch_unwind(AssertUnwindSafe(|| program.run(object))) {
        Ok(Ok(values)) => Answer::Values(values),
        Ok(Err(error)) => Answer::Refused(error.message),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Answer::Panicked(format!("jq panicked on this object (a jaq bug): {what}"))
        }
    }
}

/// The watchdog: returns when the evaluation thread is done; ends the process when an object
/// takes longer than `timeout` (after answering that it did) or when the parent is gone.
fn watch(shared: &Shared, timeout: Duration) {
    let parent = std::os::unix::process::parent_id();
    let mut state = shared.lock();
    loop {
        if state.done {
            return;
        }
        if std::os::unix::process::parent_id() != parent {
            std::process::exit(0);
        }
        let now = Instant::now();
        let wait = match state.started {
            Some(started) if now >= started + timeout => {
                // The answers before it, then its own; the parent kills what is left.
                let written = frame::put_answer(&mut state.buffer, &Answer::TimedOut).and_then(|()| state.write());
                std::process::exit(i32::from(written.is_err()));
            }
            Some(started) => (started + timeout - now).min(PARENT_CHECK),
            None => PARENT_CHECK,
        };
        state = common::sync::wait_timeout(&shared.finished, state, wait, "sandbox state").0;
    }
}
