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
    /// Bytes of the log known to be durable: a failed append is cut back to this, so a torn
    /// entry written before a full disk said no cannot glue itself to the next one.
    durable_len: u64,
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
        let durable_len = log.metadata().map_err(io("read the size of", &log_path))?.len();
        File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync directory", dir))?;
        let dead_letter = dir.join(format!("{run}.dead-letter.jsonl"));
        Ok((FileStore { log, log_path, durable_len, dead_letter, _lock: lock }, recovered))
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
        let written = self
            .log
            .write_all(text.as_bytes())
            .map_err(io("append to", &self.log_path))
            .and_then(|()| self.log.sync_data().map_err(io("fsync", &self.log_path)));
        match written {
            Ok(()) => {
                self.durable_len += text.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Whatever part of the entries reached the file is not acknowledged: cut it off
                // (after a failed fsync the page cache is not to be trusted either).
                let _ = self.log.set_len(self.durable_len);
                Err(e)
            }
        }
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

/// The JetStream key-value store: the ledger in NATS, for Kubernetes without volumes. Each
/// durable change is one put of a batch key (`<run>.b.<id>` = `d17,d18,x3`), acknowledged by
/// JetStream before the fetcher answers the saver; dead-letter records are `<run>.dl.<id>`. The
/// single-fetcher lock is [`crate::kv_lock`]. Note: JetStream acknowledges before it fsyncs
/// unless the server sets `sync_interval: always` (deploy/nats/values.yaml explains).
pub struct KvStore {
    kv: async_nats::jetstream::kv::Store,
    run: String,
    lock: crate::kv_lock::LockKeeper,
}

/// How long the KV lock outlives its last refresh, by default (`--lock-ttl`).
pub const KV_LOCK_TTL: std::time::Duration = std::time::Duration::from_secs(15);

fn kv_error(action: &'static str, bucket: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io {
        action,
        path: PathBuf::from(format!("JetStream bucket {bucket}")),
        source: std::io::Error::other(format!("{e} (is JetStream enabled on the server? nats-server -js)")),
    }
}

async fn bucket(
    js: &async_nats::jetstream::Context,
    name: &str,
    max_age: std::time::Duration,
) -> Result<async_nats::jetstream::kv::Store, StoreError> {
    if let Ok(kv) = js.get_key_value(name).await {
        if max_age.is_zero() || kv.status().await.is_ok_and(|s| s.max_age() == max_age) {
            return Ok(kv);
        }
    }
    // Also when it exists with another max_age (the lock's TTL was changed): set it.
    js.create_or_update_key_value(async_nats::jetstream::kv::Config {
        bucket: name.to_string(),
        history: 1,
        max_age,
        ..Default::default()
    })
    .await
    .map_err(|e| kv_error("create", name, e))
}

impl KvStore {
    /// Takes the lock (entries expiring after `lock_ttl`) and reads the run's entries from
    /// bucket `name`.
    pub async fn open(
        client: &async_nats::Client,
        name: &str,
        run: &str,
        owner: &str,
        lock_ttl: std::time::Duration,
    ) -> Result<(Self, Recovered), StoreError> {
        use futures::StreamExt;
        let js = async_nats::jetstream::new(client.clone());
        let kv = bucket(&js, name, std::time::Duration::ZERO).await?;
        let lock_name = format!("{name}-lock");
        let lock_bucket = bucket(&js, &lock_name, lock_ttl).await?;
        let lock = match crate::kv_lock::take(lock_bucket, lock_name.clone(), owner, lock_ttl).await {
            Ok(lock) => lock,
            Err(crate::kv_lock::TakeError::Held { holder }) => {
                return Err(StoreError::Locked {
                    dir: PathBuf::from(format!("JetStream bucket {lock_name}")),
                    holder: format!(
                        "held by {holder}; if that fetcher died, its lock expires within {} s",
                        lock_ttl.as_secs_f64()
                    ),
                })
            }
            Err(crate::kv_lock::TakeError::JetStream(e)) => return Err(kv_error("lock", &lock_name, e)),
        };
        let mut recovered = Recovered::default();
        let batch_prefix = format!("{run}.b.");
        let mut keys = kv.keys().await.map_err(|e| kv_error("list", name, e))?;
        let mut batch_keys = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| kv_error("list", name, e))?;
            if key.starts_with(&batch_prefix) {
                batch_keys.push(key);
            }
        }
        for key in batch_keys {
            let Some(value) = kv.get(&key).await.map_err(|e| kv_error("read", name, e))? else { continue };
            for item in String::from_utf8_lossy(&value).split(',') {
                match (item.get(..1), item.get(1..).and_then(|c| c.parse::<u32>().ok())) {
                    (Some("d"), Some(chunk)) => recovered.done.push(chunk),
                    (Some("x"), Some(chunk)) => recovered.dead.push(chunk),
                    _ => tracing::warn!("ledger bucket {name}: ignoring {item:?} in {key}"),
                }
            }
        }
        Ok((KvStore { kv, run: run.to_string(), lock }, recovered))
    }

    async fn record(&self, entries: &[Entry]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let value: Vec<String> = entries
            .iter()
            .map(|e| match e {
                Entry::Done(chunk) => format!("d{chunk}"),
                Entry::Dead(chunk) => format!("x{chunk}"),
            })
            .collect();
        let key = format!("{}.b.{}", self.run, uuid::Uuid::new_v4().simple());
        self.kv
            .put(key, value.join(",").into())
            .await
            .map(|_| ())
            .map_err(|e| kv_error("write", self.kv.name.as_str(), e))
    }

    async fn dead_letter(&self, record: &serde_json::Value) -> Result<(), StoreError> {
        let key = format!("{}.dl.{}", self.run, uuid::Uuid::new_v4().simple());
        self.kv
            .put(key, record.to_string().into())
            .await
            .map(|_| ())
            .map_err(|e| kv_error("write", self.kv.name.as_str(), e))
    }
}

/// The ledger store chosen by `--ledger`.
pub enum LedgerStore {
    /// A file in `--state-dir`.
    File(FileStore),
    /// A JetStream key-value bucket.
    Kv(Box<KvStore>),
}

impl LedgerStore {
    /// Makes `entries` durable before returning.
    pub async fn record(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        match self {
            LedgerStore::File(store) => store.record(entries),
            LedgerStore::Kv(store) => store.record(entries).await,
        }
    }

    /// Adds a record for people to the dead-letter list.
    pub async fn dead_letter(&self, record: &serde_json::Value) -> Result<(), StoreError> {
        match self {
            LedgerStore::File(store) => store.dead_letter(record),
            LedgerStore::Kv(store) => store.dead_letter(record).await,
        }
    }

    /// The single-fetcher lock's status when it can be lost (`--ledger kv`); a file lock is
    /// held as long as the process lives.
    pub fn lock(&self) -> Option<std::sync::Arc<crate::kv_lock::LockStatus>> {
        match self {
            LedgerStore::File(_) => None,
            LedgerStore::Kv(store) => Some(store.lock.status()),
        }
    }

    /// Where dead-letter records go, for logs.
    pub fn dead_letters(&self) -> String {
        match self {
            LedgerStore::File(store) => store.dead_letter_path().display().to_string(),
            LedgerStore::Kv(store) => format!("JetStream bucket {}, keys {}.dl.*", store.kv.name, store.run),
        }
    }
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
