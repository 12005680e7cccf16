//! The durable side of the ledger: what must survive a fetcher crash. Only terminal states are
//! recorded (a chunk done or dead-lettered); leases are not, so after a restart the chunks that
//! were in flight are handed out again and everything already saved is not.
//!
//! The file store keeps, in `--state-dir`, one append-only log per run (`<run>.ledger`: lines
//! `d <chunk>` and `x <chunk>`), fsynced before the fetcher answers the acknowledgement that
//! caused it, and a lock file that a second fetcher on the same directory cannot take.
//! Dead-lettered chunks and skipped input records are also listed, for people, in
//! `<run>.dead-letter.jsonl`.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// A terminal state change to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// The chunk is saved.
    Done(u32),
    /// The chunk is dead-lettered.
    Dead(u32),
}

/// What a previous incarnation recorded.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Chunks done.
    pub done: Vec<u32>,
    /// Chunks dead-lettered.
    pub dead: Vec<u32>,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("ledger store: cannot {action} {path}: {source}; check --state-dir (FETCHER_STATE_DIR) is writable")]
    Io {
        /// What was being done.
        action: &'static str,
        /// Where.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another fetcher holds the lock.
    #[error("another fetcher is running on state directory {dir} ({holder}); only one fetcher may run per pipeline. Stop it, or use another --state-dir")]
    Locked {
        /// The state directory.
        dir: PathBuf,
        /// What the lock file says about its holder.
        holder: String,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { action, path: path.to_path_buf(), source }
}

/// The file store of one run.
#[derive(Debug)]
pub struct FileStore {
    log: File,
    log_path: PathBuf,
    dead_letter: PathBuf,
    /// Held for the process's lifetime: the OS releases it when the process dies, even by SIGKILL.
    _lock: File,
}

impl FileStore {
    /// Takes the directory's lock and opens (or creates) the run's log, returning what it holds.
    pub fn open(dir: &Path, run: &str) -> Result<(Self, Recovered), StoreError> {
        fs::create_dir_all(dir).map_err(io("create directory", dir))?;
        let lock_path = dir.join("fetcher.lock");
        let mut lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(io("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&lock_path).unwrap_or_default().trim().to_string();
                return Err(StoreError::Locked { dir: dir.to_path_buf(), holder });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io("lock", &lock_path)(e)),
        }
        let _ = lock.set_len(0);
        let _ = writeln!(lock, "pid {} on {}", std::process::id(), hostname());
        let log_path = dir.join(format!("{run}.ledger"));
        let recovered = read_log(&log_path)?;
        let log = OpenOptions::new().create(true).append(true).open(&log_path).map_err(io("open", &log_path))?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync directory", dir))?;
        let dead_letter = dir.join(format!("{run}.dead-letter.jsonl"));
        Ok((FileStore { log, log_path, dead_letter, _lock: lock }, recovered))
    }

    /// Appends `entries` and makes them durable before returning.
    pub fn record(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut text = String::with_capacity(entries.len() * 8);
        for entry in entries {
            match entry {
                Entry::Done(chunk) => text.push_str(&format!("d {chunk}\n")),
                Entry::Dead(chunk) => text.push_str(&format!("x {chunk}\n")),
            }
        }
        self.log.write_all(text.as_bytes()).map_err(io("append to", &self.log_path))?;
        self.log.sync_data().map_err(io("fsync", &self.log_path))
    }

    /// Appends one JSON record to the run's dead-letter file (for people; made durable).
    pub fn dead_letter(&self, record: &serde_json::Value) -> Result<(), StoreError> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.dead_letter)
            .map_err(io("open", &self.dead_letter))?;
        writeln!(file, "{record}").map_err(io("append to", &self.dead_letter))?;
        file.sync_data().map_err(io("fsync", &self.dead_letter))
    }

    /// The dead-letter file's path.
    pub fn dead_letter_path(&self) -> &Path {
        &self.dead_letter
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .unwrap_or_else(|_| fs::read_to_string("/etc/hostname").unwrap_or_default().trim().to_string())
}

/// Reads a log; a torn last line (a crash mid-append) is ignored, as it was never acknowledged.
fn read_log(path: &Path) -> Result<Recovered, StoreError> {
    let mut recovered = Recovered::default();
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(recovered),
        Err(e) => return Err(io("open", path)(e)),
    };
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).map_err(io("read", path))?;
        if n == 0 || !line.ends_with('\n') {
            break;
        }
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next().and_then(|c| c.parse::<u32>().ok())) {
            (Some("d"), Some(chunk)) => recovered.done.push(chunk),
            (Some("x"), Some(chunk)) => recovered.dead.push(chunk),
            _ => tracing::warn!("ledger {}: ignoring unreadable line {:?}", path.display(), line.trim_end()),
        }
    }
    Ok(recovered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_entries_survive_a_reopen_and_a_torn_line_is_ignored() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let (mut store, recovered) = FileStore::open(dir.path(), "0123456789abcdef").expect("open");
            assert_eq!(recovered, Recovered::default());
            store.record(&[Entry::Done(3), Entry::Done(5), Entry::Dead(7)]).expect("record");
        }
        let mut log = OpenOptions::new().append(true).open(dir.path().join("0123456789abcdef.ledger")).expect("log");
        log.write_all(b"d 9").expect("torn write");
        let (_store, recovered) = FileStore::open(dir.path(), "0123456789abcdef").expect("reopen");
        assert_eq!(recovered, Recovered { done: vec![3, 5], dead: vec![7] });
    }

    #[test]
    fn a_second_fetcher_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_first, _) = FileStore::open(dir.path(), "0123456789abcdef").expect("first");
        let err = FileStore::open(dir.path(), "0123456789abcdef").unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert!(err.to_string().contains(&format!("pid {}", std::process::id())), "{err}");
    }
}
