//! One command child and the threads around it: a writer feeding its stdin (so the mapper never
//! blocks on a full pipe while the child blocks on its own full stdout), a reader turning its
//! stdout into lines (so the mapper can wait for one with a timeout), and a drain for its stderr
//! into the log, rate-limited. The child runs in a process group of its own, and the whole group
//! is killed and reaped with it: a wrapper shell's children and grandchildren do not outlive it.

use std::io::{self, BufRead, BufReader, Write};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, WaitOptions};

use super::{is_withheld_variable, CommandSpec, MAX_LINE_BYTES};

/// How much of one stderr line is kept, in bytes (the log shows less, see
/// [`common::text::escaped`]).
const MAX_STDERR_LINE: usize = 4096;

/// How long the stderr drain of a child that exited gets to log its last lines.
const STDERR_SETTLE: Duration = Duration::from_millis(200);

/// How often a wait for a child's line checks whether the child has exited.
const EXIT_POLL: Duration = Duration::from_millis(100);

/// How long past its settling time a check for an extra line waits for the reader thread to
/// catch up with what the child already wrote (a loaded machine may not run it for a while).
const CATCH_UP: Duration = Duration::from_secs(2);

/// Answers a child may write ahead of the mapper's reading before its stdout blocks.
const LINES_AHEAD: usize = 1024;

/// Stderr lines of one child logged per [`STDERR_WINDOW`]; the rest are counted, not logged, so
/// a child that floods stderr neither fills the mapper's log nor slows itself down on a pipe
/// the mapper drains slowly.
pub(crate) const STDERR_LINES: u32 = 100;

/// See [`STDERR_LINES`].
pub(crate) const STDERR_WINDOW: Duration = Duration::from_secs(10);

/// What the stdout reader thread hands over.
pub(crate) enum Line {
    /// One line, without its `\n`.
    Value(Vec<u8>),
    /// A line longer than [`MAX_LINE_BYTES`]; the reader stopped.
    TooLong,
}

/// What a child said about itself on stderr.
#[derive(Default)]
struct Stderr {
    /// Its last non-blank line.
    last: String,
}

/// A running child.
pub(crate) struct Worker {
    child: Child,
    pub(crate) pid: u32,
    input: Option<Sender<Vec<u8>>>,
    lines: Receiver<Line>,
    stderr: Arc<Mutex<Stderr>>,
    stderr_drain: JoinHandle<()>,
    /// Lines it answered since it started: a child that fails before its first is "fresh".
    pub(crate) answered: u64,
    /// Lines taken from `lines` so far.
    received: u64,
    /// How many lines the reader thread had sent when it last found nothing more written: once
    /// `received` reaches it, every line the child wrote up to then has been seen.
    drained: Arc<AtomicU64>,
}

/// Why the child gave no line.
pub(crate) enum NoLine {
    /// Nothing within the time given.
    Timeout,
    /// Its stdout ended (it exited or closed it).
    Closed,
}

impl Worker {
    /// Starts the program in a process group of its own, its environment stripped of
    /// credentials, with the three threads around it.
    pub(crate) fn spawn(spec: &CommandSpec) -> Result<Worker, String> {
        let mut command = Command::new(&spec.program);
        command
            .args(&spec.args)
            .env_clear()
            .envs(std::env::vars_os().filter(|(name, _)| !is_withheld_variable(&name.to_string_lossy())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        {
            use std::os::unix::process::CommandExt as _;
            command.process_group(0);
        }
        let mut child = command.spawn().map_err(|e| describe_spawn_error(spec, &e))?;
        let pid = child.id();
        let pipes = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let (Some(stdin), Some(stdout), Some(stderr)) = pipes else {
            stop_group(&mut child);
            return Err(format!("cannot start command {}: its pipes were not set up", escaped(&spec.name)));
        };
        let kept = Arc::new(Mutex::new(Stderr::default()));
        let (input, to_write) = mpsc::channel();
        let (answers, lines) = mpsc::sync_channel(LINES_AHEAD);
        let name = spec.name.clone();
        let drained = Arc::new(AtomicU64::new(0));
        let reader_drained = Arc::clone(&drained);
        let threads = spawn_thread(&spec.name, "in", move || write_input(stdin, &to_write))
            .and_then(|_| spawn_thread(&spec.name, "out", move || read_output(stdout, &answers, &reader_drained)))
            .and_then(|_| {
                let kept = Arc::clone(&kept);
                spawn_thread(&spec.name, "err", move || drain_stderr(stderr, &name, pid, &kept))
            });
        match threads {
            Ok(stderr_drain) => {
                let (input, answered, received) = (Some(input), 0, 0);
                Ok(Worker { child, pid, input, lines, stderr: kept, stderr_drain, answered, received, drained })
            }
            Err(e) => {
                stop_group(&mut child);
                Err(format!("cannot start command {}: no thread for its pipes: {e}", escaped(&spec.name)))
            }
        }
    }

    /// Hands `inputs` to the writer thread as one block of lines.
    pub(crate) fn feed(&mut self, inputs: &[&[u8]]) {
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

    /// The child's next line, waiting up to `timeout` for it. A child that exited while a
    /// process it started still holds its stdout open (a wrapper script's background job) has
    /// closed it as far as the mapper is concerned: checked every [`EXIT_POLL`].
    pub(crate) fn next_line(&mut self, timeout: Duration) -> Result<Line, NoLine> {
        let deadline = Instant::now() + timeout;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now()).min(EXIT_POLL);
            match self.lines.recv_timeout(wait) {
                Ok(line) => {
                    self.received += 1;
                    return Ok(line);
                }
                Err(RecvTimeoutError::Disconnected) => return Err(NoLine::Closed),
                Err(RecvTimeoutError::Timeout) if Instant::now() >= deadline => return Err(NoLine::Timeout),
                Err(RecvTimeoutError::Timeout) => {
                    if self.exited().is_some() {
                        // What it wrote before exiting is in the pipe or on its way.
                        let line = self.lines.recv_timeout(EXIT_POLL).map_err(|_| NoLine::Closed)?;
                        self.received += 1;
                        return Ok(line);
                    }
                }
            }
        }
    }

    /// A line the child wrote that nobody asked for, if one is there now: `Some(true)`; its
    /// stdout ended: `Some(false)`; nothing: `None`.
    pub(crate) fn unasked_line(&mut self) -> Option<bool> {
        match self.lines.try_recv() {
            Ok(_) => {
                self.received += 1;
                Some(true)
            }
            Err(TryRecvError::Disconnected) => Some(false),
            Err(TryRecvError::Empty) => None,
        }
    }

    /// Whether the child writes a line within `window` though it was asked for none. A line
    /// it wrote before the window ended counts even if the reader thread, on a loaded machine,
    /// passes it on later: past the window this waits (up to [`CATCH_UP`]) until the reader has
    /// found nothing more to read.
    pub(crate) fn writes_more_within(&mut self, window: Duration) -> bool {
        let start = Instant::now();
        let mut wait = window;
        loop {
            match self.lines.recv_timeout(wait) {
                Ok(_) => {
                    self.received += 1;
                    return true;
                }
                Err(RecvTimeoutError::Disconnected) => return false,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if self.drained.load(Ordering::Acquire) >= self.received || start.elapsed() > window + CATCH_UP {
                return false;
            }
            wait = Duration::from_millis(1);
        }
    }

    /// How the child ended once its stdout closed: `Ok(status)` if it exited by itself within
    /// `grace`; `Err(())` if it was still running and was stopped here.
    pub(crate) fn exit_after_close(&mut self, grace: Duration) -> Result<Option<ExitStatus>, ()> {
        let deadline = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(Some(status)),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Ok(None) => {
                    stop_group(&mut self.child);
                    return Err(());
                }
                Err(_) => return Ok(None),
            }
        }
    }

    /// The exit status if the child has already exited.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// `; its last stderr line: "..."`, or nothing if it wrote none. Called once the child
    /// has exited: its stderr then ends, and the drain gets a moment to log its last lines
    /// (not forever: a grandchild may hold the pipe open).
    pub(crate) fn last_stderr_note(&self) -> String {
        let deadline = Instant::now() + STDERR_SETTLE;
        while !self.stderr_drain.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        let kept = common::sync::lock(&self.stderr, "command stderr");
        if kept.last.is_empty() {
            String::new()
        } else {
            format!("; its last stderr line: `{}`", escaped(&kept.last))
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing stdin stops the writer thread; killing the group stops the child and
        // everything it started; the waits reap them (no zombie).
        self.input.take();
        stop_group(&mut self.child);
    }
}

/// Kills the child's process group (the child leads it: `process_group(0)`), waits for the
/// child, and reaps in the background the group's other members that became this process's
/// children (as they do when the mapper is a container's PID 1 or a subreaper); elsewhere the
/// system's init reaps them.
fn stop_group(child: &mut Child) {
    let group = Pid::from_child(child);
    // ESRCH: the group is gone already.
    let _ = rustix::process::kill_process_group(group, Signal::KILL);
    let _ = child.kill();
    let _ = child.wait();
    let reaper = std::thread::Builder::new()
        .name("cmd-reap".into())
        .spawn(move || while let Ok(Some(_)) = rustix::process::waitpgid(group, WaitOptions::empty()) {});
    if let Err(e) = reaper {
        tracing::warn!("cannot reap the process group {group:?} of a stopped command: {e}");
    }
}

fn escaped(text: &str) -> common::text::Escaped<'_> {
    common::text::escaped(text)
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

fn read_output(stdout: ChildStdout, answers: &SyncSender<Line>, drained: &AtomicU64) {
    let mut reader = BufReader::with_capacity(64 << 10, stdout);
    let mut sent = 0;
    loop {
        let mut line = Vec::new();
        match read_line(&mut reader, &mut line, MAX_LINE_BYTES, false) {
            Ok(Read::Line) => {
                if answers.send(Line::Value(line)).is_err() {
                    return;
                }
                sent += 1;
                if reader.buffer().is_empty() && !readable_now(reader.get_ref()) {
                    drained.store(sent, Ordering::Release);
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

/// Whether `pipe` has bytes (or its end) to read at once.
fn readable_now(pipe: &ChildStdout) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(pipe, PollFlags::IN)];
    // An error of poll itself: say readable, so that a check waits for the reader to read.
    poll(&mut fds, Some(&Timespec { tv_sec: 0, tv_nsec: 0 })).map_or(true, |ready| ready > 0)
}

fn drain_stderr(stderr: ChildStderr, name: &str, pid: u32, kept: &Mutex<Stderr>) {
    let mut reader = BufReader::new(stderr);
    let name = escaped(name);
    let mut budget = LineBudget::new(STDERR_LINES, STDERR_WINDOW, Instant::now());
    let mut line = Vec::new();
    loop {
        line.clear();
        match read_line(&mut reader, &mut line, MAX_STDERR_LINE, true) {
            Ok(Read::Line | Read::TooLong) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches('\r');
                match budget.take(Instant::now()) {
                    Budget::Log { dropped } => {
                        if dropped > 0 {
                            tracing::warn!("command {name}[{pid}]: {}", dropped_note(dropped));
                        }
                        tracing::info!("command {name}[{pid}]: {}", escaped(text));
                    }
                    Budget::FirstDropped => tracing::warn!(
                        "command {name}[{pid}]: more than {STDERR_LINES} stderr lines in {} s: the rest are counted, not logged",
                        STDERR_WINDOW.as_secs()
                    ),
                    Budget::Dropped => {}
                }
                if !text.trim().is_empty() {
                    let mut kept = common::sync::lock(kept, "command stderr");
                    kept.last.clear();
                    kept.last.push_str(text);
                }
            }
            Ok(Read::End) | Err(_) => break,
        }
    }
    if budget.dropped > 0 {
        tracing::warn!("command {name}[{pid}]: {}", dropped_note(budget.dropped));
    }
}

fn dropped_note(dropped: u64) -> String {
    format!(
        "{dropped} more stderr lines were not logged (at most {STDERR_LINES} per {} s per child)",
        STDERR_WINDOW.as_secs()
    )
}

/// At most `lines` log lines per `window`; the rest are counted and reported once the window
/// has passed.
#[derive(Debug)]
pub(crate) struct LineBudget {
    lines: u32,
    window: Duration,
    started: Instant,
    used: u32,
    dropped: u64,
}

/// What to do with one line under a [`LineBudget`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Budget {
    /// Log it, after saying how many lines the window that just ended dropped (if any).
    Log { dropped: u64 },
    /// The first line over the budget in this window: say that the rest are counted.
    FirstDropped,
    /// Count it.
    Dropped,
}

impl LineBudget {
    pub(crate) fn new(lines: u32, window: Duration, now: Instant) -> Self {
        LineBudget { lines, window, started: now, used: 0, dropped: 0 }
    }

    /// For a line arriving `now`.
    pub(crate) fn take(&mut self, now: Instant) -> Budget {
        let mut dropped = 0;
        if now.duration_since(self.started) >= self.window {
            dropped = std::mem::take(&mut self.dropped);
            self.started = now;
            self.used = 0;
        }
        if self.used < self.lines {
            self.used += 1;
            return Budget::Log { dropped };
        }
        self.dropped += 1;
        if self.dropped == 1 {
            Budget::FirstDropped
        } else {
            Budget::Dropped
        }
    }
}

/// What [`read_line`] found.
pub(crate) enum Read {
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
pub(crate) fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>, max: usize, cut: bool) -> io::Result<Read> {
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

pub(crate) fn describe_spawn_error(spec: &CommandSpec, e: &io::Error) -> String {
    let name = escaped(&spec.name);
    let program = escaped(&spec.program);
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

pub(crate) fn describe_status(status: Option<ExitStatus>) -> String {
    let Some(status) = status else { return "exit status unknown".into() };
    if let Some(code) = status.code() {
        return format!("exit status {code}");
    }
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
    status.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_line_budget_logs_so_many_per_window_and_reports_the_rest_once_it_has_passed() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut budget = LineBudget::new(2, Duration::from_secs(10), t0);
        assert_eq!(budget.take(t0), Budget::Log { dropped: 0 });
        assert_eq!(budget.take(at(1)), Budget::Log { dropped: 0 });
        assert_eq!(budget.take(at(2)), Budget::FirstDropped);
        assert_eq!(budget.take(at(3)), Budget::Dropped);
        assert_eq!(budget.take(at(10)), Budget::Log { dropped: 2 }, "the next window reports the dropped");
        assert_eq!(budget.take(at(11)), Budget::Log { dropped: 0 });
    }
}
