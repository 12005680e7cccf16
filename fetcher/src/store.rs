//! The durable side of the ledger: what must survive a fetcher crash. Only terminal states are
//! recorded (a chunk done or dead-lettered); leases are not, so after a restart the chunks that
//! were in flight are handed out again and everything already saved is not.
//!
//! The file store keeps, in `--state-dir`, one append-only log per run (`<run>.ledger`: lines
//! `d <chunk>` and `x <chunk>`), fsynced before the fetcher answers the acknowledgement that
//! caused it, and a lock file that a second fetcher on the same directory cannot take.
//! Dead-lettered chunks and skipped input records are also listed, for people, in
//! `<run>.dead-letter.jsonl`.

use common::protocol::ChunkId;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// A terminal state change to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    /// The chunk is saved.
    Done(ChunkId),
    /// The chunk is dead-lettered.
    Dead(ChunkId),
    /// The run saves into the sink with this identity (recorded with its first ack).
    Sink(String),
    /// The run's sink needs the run committed once complete (its savers' acks said so).
    CommitNeeded,
    /// A saver committed the run (its sink's result is durable, e.g. `_SUCCESS` written).
    Committed,
}

impl Entry {
    /// The log's text of the entry (`d 17`, `x 3`, `s <id>`), without the line end.
    fn text(&self, separator: &str) -> String {
        match self {
            Entry::Done(chunk) => format!("d{separator}{chunk}"),
            Entry::Dead(chunk) => format!("x{separator}{chunk}"),
            Entry::Sink(id) => format!("s{separator}{id}"),
            Entry::CommitNeeded => "c".to_string(),
            Entry::Committed => "C".to_string(),
        }
    }
}

/// What a run is, written once when the run starts (`<run>.job.json`, or the key `<run>.job`):
/// so that a fetcher started on the same input with another job can see the unfinished run it
/// would leave behind, and people can see what a ledger belongs to.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct RunRecord {
    /// Run id.
    pub(crate) run: String,
    /// The input, as given.
    pub(crate) input: String,
    /// SHA-256 of the input's content (hex).
    pub(crate) content: String,
    /// Objects per chunk.
    pub(crate) chunk_size: u32,
    /// Chunks in the run.
    pub(crate) chunks: u64,
    /// Valid objects.
    pub(crate) objects: u64,
    /// The job (transform and id field).
    pub(crate) job: serde_json::Value,
    /// The job in a few words.
    pub(crate) describe: String,
}

impl RunRecord {
    /// Whether `other` is another run of the same data at the same chunk size (another job),
    /// or a run of the same input (as given), job and chunk size whose content has changed since.
    pub(crate) fn is_related(&self, other: &RunRecord) -> bool {
        self.chunk_size == other.chunk_size
            && (self.content == other.content || (self.input == other.input && self.job == other.job))
    }
}

/// One entry of a run's dead-letter record, for people (`<run>.dead-letter.jsonl`, or the
/// `<run>.dl.*` keys of `--ledger kv`): an invalid input record left out, or a chunk given up on.
/// docs/PROTOCOL.md describes the format.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum DeadLetter {
    /// An input record that is not valid, skipped (`--bad-records skip`).
    BadRecord {
        /// The run.
        run: String,
        /// The input, as given.
        input: String,
        /// The input object (file or key) it is in, when the input has several.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        object: Option<String>,
        /// 1-based line where it starts, within its object.
        line: u64,
        /// What is wrong with it.
        error: String,
    },
    /// A chunk given up on after its attempts.
    Chunk {
        /// The run.
        run: String,
        /// The chunk.
        chunk: ChunkId,
        /// The line of its first object.
        first_line: u64,
        /// Objects in it.
        objects: u32,
        /// Its objects' ids (the job's id field), where they could be read.
        ids: Vec<String>,
        /// Why it was given up on.
        error: String,
    },
}

impl std::fmt::Display for DeadLetter {
    /// One line of JSON, as the record stores it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let line = serde_json::to_string(self).map_err(|_| std::fmt::Error)?;
        f.write_str(&line)
    }
}

/// Another run of the same input in the store, and how far it got.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct OtherRun {
    /// Its record.
    pub(crate) record: RunRecord,
    /// Its chunks done or dead-lettered.
    pub(crate) finished: u64,
}

/// Parses one ledger entry (`d17` / `d 17` forms), or `None`.
fn parse_entry(text: &str) -> Option<Entry> {
    let (kind, rest) = text.split_at_checked(1)?;
    let rest = rest.trim();
    match kind {
        "d" => rest.parse().ok().map(Entry::Done),
        "x" => rest.parse().ok().map(Entry::Dead),
        "s" if !rest.is_empty() => Some(Entry::Sink(rest.to_string())),
        "c" if rest.is_empty() => Some(Entry::CommitNeeded),
        "C" if rest.is_empty() => Some(Entry::Committed),
        _ => None,
    }
}

impl Recovered {
    fn add(&mut self, entry: Entry) {
        match entry {
            Entry::Done(chunk) => self.done.push(chunk),
            Entry::Dead(chunk) => self.dead.push(chunk),
            Entry::Sink(id) => {
                self.sink.get_or_insert(id);
            }
            Entry::CommitNeeded => self.commit_needed = true,
            Entry::Committed => self.committed = true,
        }
    }

    /// Distinct chunks done or dead-lettered.
    pub(crate) fn finished(&self) -> u64 {
        let all: std::collections::HashSet<ChunkId> = self.done.iter().chain(&self.dead).copied().collect();
        all.len() as u64
    }
}

/// What a previous incarnation recorded.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Recovered {
    /// Chunks done.
    pub(crate) done: Vec<ChunkId>,
    /// Chunks dead-lettered.
    pub(crate) dead: Vec<ChunkId>,
    /// The run's sink, once its first ack was recorded.
    pub(crate) sink: Option<String>,
    /// The run's sink needs it committed once complete.
    pub(crate) commit_needed: bool,
    /// The run was committed.
    pub(crate) committed: bool,
}

impl Recovered {
    /// Nothing of the run was finished before: a fresh run, not a resumed one.
    pub(crate) fn is_fresh(&self) -> bool {
        self.done.is_empty() && self.dead.is_empty()
    }
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
    /// JetStream cannot keep as many copies of a bucket as `--kv-replicas` asks for.
    #[error("JetStream bucket {bucket}: cannot keep {replicas} copies: {why}. Set --kv-replicas (FETCHER_KV_REPLICAS) to at most the number of JetStream servers in the NATS cluster (1 for a single server)")]
    Replicas {
        /// The bucket.
        bucket: String,
        /// The copies asked for.
        replicas: usize,
        /// Why the server refused them.
        why: String,
    },
    /// Another fetcher holds the lock.
    #[error("another fetcher is running on state directory {dir} ({holder}); only one fetcher may run per pipeline. Stop it, or use another --state-dir")]
    Locked {
        /// The state directory.
        dir: PathBuf,
        /// What the lock file says about its holder.
        holder: String,
    },
    /// Stopped while waiting for another fetcher's lock (`--ledger kv`).
    #[error("stopped while waiting for the fetcher lock in JetStream bucket {bucket}, held by {holder}")]
    StoppedWaiting {
        /// The lock bucket.
        bucket: String,
        /// Its holder.
        holder: String,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { action, path: path.to_path_buf(), source }
}

/// The file store of one run.
#[derive(Debug)]
pub(crate) struct FileStore {
    log: File,
    log_path: PathBuf,
    /// Bytes of the log known to be durable: a failed append is cut back to this, so a torn
    /// entry written before a full disk said no cannot glue itself to the next one.
    durable_len: u64,
    dead_letter: PathBuf,
    dir: PathBuf,
    /// Held for the process's lifetime: the OS releases it when the process dies, even by SIGKILL.
    _lock: File,
}

impl FileStore {
    /// Takes the directory's lock and opens (or creates) the run's log; returns what the log
    /// holds, and the other runs of the same input. The run is recorded (`<run>.job.json`) only
    /// by [`LedgerStore::record_run`], once the caller has accepted it: a run refused for an
    /// unfinished other one must not in turn block that one.
    pub(crate) fn open(dir: &Path, record: &RunRecord) -> Result<(Self, Recovered, Vec<OtherRun>), StoreError> {
        let run = record.run.as_str();
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
        let (recovered, durable_len) = read_log(&log_path)?;
        let log = OpenOptions::new().create(true).append(true).open(&log_path).map_err(io("open", &log_path))?;
        let len = log.metadata().map_err(io("read the size of", &log_path))?.len();
        if len > durable_len {
            // A torn last entry (the process died mid-write, before its fsync answered): it was
            // never acknowledged. Cut it off, or the next entry would be glued onto it and lost.
            tracing::warn!(
                "ledger {}: cutting off a torn last entry ({} bytes)",
                log_path.display(),
                len - durable_len
            );
            log.set_len(durable_len).map_err(io("truncate", &log_path))?;
        }
        File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync directory", dir))?;
        let dead_letter = dir.join(format!("{run}.dead-letter.jsonl"));
        let others = other_runs(dir, record)?;
        Ok((
            FileStore { log, log_path, durable_len, dead_letter, dir: dir.to_path_buf(), _lock: lock },
            recovered,
            others,
        ))
    }

    /// Records the run in `<run>.job.json` unless it is recorded already.
    pub(crate) fn record_run(&self, record: &RunRecord) -> Result<(), StoreError> {
        write_record(&self.dir, record)
    }

    /// Appends `entries` and makes them durable before returning.
    pub(crate) fn record(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut text = String::with_capacity(entries.len() * 8);
        for entry in entries {
            text.push_str(&entry.text(" "));
            text.push('\n');
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
    pub(crate) fn dead_letter(&self, record: &DeadLetter) -> Result<(), StoreError> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.dead_letter)
            .map_err(io("open", &self.dead_letter))?;
        writeln!(file, "{record}").map_err(io("append to", &self.dead_letter))?;
        file.sync_data().map_err(io("fsync", &self.dead_letter))
    }

    /// The dead-letter file's path.
    pub(crate) fn dead_letter_path(&self) -> &Path {
        &self.dead_letter
    }
}

/// Writes `<run>.job.json` unless it exists: a temporary file, fsynced, renamed, directory
/// fsynced.
fn write_record(dir: &Path, record: &RunRecord) -> Result<(), StoreError> {
    let path = dir.join(format!("{}.job.json", record.run));
    if path.exists() {
        return Ok(());
    }
    let tmp = dir.join(format!(".{}.job.json.tmp", record.run));
    let text = common::json::to_string_pretty_own(record) + "\n";
    (|| -> std::io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    })()
    .map_err(io("write", &path))
}

/// The runs recorded in `dir` related to `ours` ([`RunRecord::is_related`]).
fn other_runs(dir: &Path, ours: &RunRecord) -> Result<Vec<OtherRun>, StoreError> {
    let mut others = Vec::new();
    for entry in fs::read_dir(dir).map_err(io("list", dir))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(run) = name.strip_suffix(".job.json") else { continue };
        if run == ours.run || run.starts_with('.') {
            continue;
        }
        let Ok(text) = fs::read_to_string(entry.path()) else { continue };
        let Ok(record) = serde_json::from_str::<RunRecord>(&text) else {
            tracing::warn!("ignoring {}: not a run record", entry.path().display());
            continue;
        };
        if record.is_related(ours) {
            let finished = read_log(&dir.join(format!("{run}.ledger")))?.0.finished();
            others.push(OtherRun { record, finished });
        }
    }
    Ok(others)
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .unwrap_or_else(|_| fs::read_to_string("/etc/hostname").unwrap_or_default().trim().to_string())
}

/// Reads a log; a torn last line (a crash mid-append) is ignored, as it was never acknowledged.
/// Reads a ledger log: its entries, and the length of its complete lines (a torn last line,
/// without its newline, is not an entry).
fn read_log(path: &Path) -> Result<(Recovered, u64), StoreError> {
    let mut recovered = Recovered::default();
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((recovered, 0)),
        Err(e) => return Err(io("open", path)(e)),
    };
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    let mut complete = 0u64;
    loop {
        line.clear();
        let n = reader.read_line(&mut line).map_err(io("read", path))?;
        if n == 0 || !line.ends_with('\n') {
            break;
        }
        complete += n as u64;
        match parse_entry(line.trim_end()) {
            Some(entry) => recovered.add(entry),
            None => tracing::warn!("ledger {}: ignoring unreadable line {:?}", path.display(), line.trim_end()),
        }
    }
    Ok((recovered, complete))
}

/// The JetStream key-value store: the ledger in NATS, for Kubernetes without volumes. Each
/// durable change is one put of a batch key (`<run>.b.<id>` = `d17,d18,x3`), acknowledged by
/// JetStream before the fetcher answers the saver; dead-letter records are `<run>.dl.<id>`. The
/// single-fetcher lock is [`crate::kv_lock`]. Note: JetStream acknowledges before it fsyncs
/// unless the server sets `sync_interval: always` (deploy/nats/values.yaml explains).
pub(crate) struct KvStore {
    kv: async_nats::jetstream::kv::Store,
    run: String,
    lock: crate::kv_lock::LockKeeper,
}

/// How long the KV lock outlives its last refresh, by default (`--lock-ttl`).
pub(crate) const KV_LOCK_TTL: std::time::Duration = std::time::Duration::from_secs(15);

fn kv_error(action: &'static str, bucket: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io {
        action,
        path: PathBuf::from(format!("JetStream bucket {bucket}")),
        source: std::io::Error::other(format!("{e} (is JetStream enabled on the server? nats-server -js)")),
    }
}

/// Opens bucket `name`, creating it with `replicas` copies (JetStream replicas) if missing.
async fn bucket(
    js: &async_nats::jetstream::Context,
    name: &str,
    max_age: std::time::Duration,
    replicas: usize,
) -> Result<async_nats::jetstream::kv::Store, StoreError> {
    if let Ok(kv) = js.get_key_value(name).await {
        let as_asked = |s: &async_nats::jetstream::kv::bucket::Status| {
            (max_age.is_zero() || s.max_age() == max_age) && s.info.config.num_replicas == replicas
        };
        if kv.status().await.is_ok_and(|s| as_asked(&s)) {
            return Ok(kv);
        }
    }
    // Also when it exists with another max_age (the lock's TTL was changed) or another number
    // of copies (--kv-replicas was changed, e.g. after moving to a NATS cluster): set them.
    js.create_or_update_key_value(async_nats::jetstream::kv::Config {
        bucket: name.to_string(),
        history: 1,
        max_age,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| match common::jetstream::ReplicasRefused::of(&e) {
        Some(refused) => StoreError::Replicas { bucket: name.to_string(), replicas, why: refused.describe(replicas) },
        None => kv_error("create", name, e),
    })
}

/// The entries of `run` in the batch keys among `keys`.
async fn read_batches(
    kv: &async_nats::jetstream::kv::Store,
    name: &str,
    keys: &[String],
    run: &str,
) -> Result<Recovered, StoreError> {
    let mut recovered = Recovered::default();
    let prefix = format!("{run}.b.");
    for key in keys.iter().filter(|k| k.starts_with(&prefix)) {
        let Some(value) = kv.get(key).await.map_err(|e| kv_error("read", name, e))? else { continue };
        for item in String::from_utf8_lossy(&value).split(',') {
            match parse_entry(item) {
                Some(entry) => recovered.add(entry),
                None => tracing::warn!("ledger bucket {name}: ignoring {item:?} in {key}"),
            }
        }
    }
    Ok(recovered)
}

impl KvStore {
    /// Takes the lock (entries expiring after `lock_ttl`; waiting while another fetcher holds
    /// it, until `shutdown`) and reads the run's entries from bucket `name`; both buckets keep
    /// `replicas` copies.
    pub(crate) async fn open(
        client: &async_nats::Client,
        name: &str,
        record: &RunRecord,
        owner: &str,
        lock_ttl: std::time::Duration,
        replicas: usize,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<(Self, Recovered, Vec<OtherRun>), StoreError> {
        let run = record.run.as_str();
        use futures::StreamExt;
        let js = async_nats::jetstream::new(client.clone());
        let kv = bucket(&js, name, std::time::Duration::ZERO, replicas).await?;
        let lock_name = format!("{name}-lock");
        let lock_bucket = bucket(&js, &lock_name, lock_ttl, replicas).await?;
        let lock = match crate::kv_lock::take(lock_bucket, lock_name.clone(), owner, lock_ttl, shutdown).await {
            Ok(lock) => lock,
            Err(crate::kv_lock::TakeError::Stopped { holder }) => {
                return Err(StoreError::StoppedWaiting { bucket: lock_name, holder })
            }
            Err(crate::kv_lock::TakeError::JetStream(e)) => return Err(kv_error("lock", &lock_name, e)),
        };
        let mut keys = kv.keys().await.map_err(|e| kv_error("list", name, e))?;
        let mut all = Vec::new();
        while let Some(key) = keys.next().await {
            all.push(key.map_err(|e| kv_error("list", name, e))?);
        }
        let recovered = read_batches(&kv, name, &all, run).await?;
        let mut others = Vec::new();
        for key in all.iter().filter(|k| k.ends_with(".job")) {
            let other = key.trim_end_matches(".job");
            if other == run {
                continue;
            }
            let Some(value) = kv.get(key).await.map_err(|e| kv_error("read", name, e))? else { continue };
            let Ok(other_record) = serde_json::from_slice::<RunRecord>(&value) else { continue };
            if other_record.is_related(record) {
                let finished = read_batches(&kv, name, &all, other).await?.finished();
                others.push(OtherRun { record: other_record, finished });
            }
        }
        Ok((KvStore { kv, run: run.to_string(), lock }, recovered, others))
    }

    /// Writes `<run>.job` unless it exists.
    async fn record_run(&self, record: &RunRecord) -> Result<(), StoreError> {
        let key = format!("{}.job", self.run);
        let name = self.kv.name.as_str();
        if self.kv.get(&key).await.map_err(|e| kv_error("read", name, e))?.is_some() {
            return Ok(());
        }
        let value = common::json::to_vec_own(record);
        self.kv.put(key, value.into()).await.map(|_| ()).map_err(|e| kv_error("write", name, e))
    }

    async fn record_entries(&self, entries: &[Entry]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let value: Vec<String> = entries.iter().map(|e| e.text("")).collect();
        let key = format!("{}.b.{}", self.run, uuid::Uuid::new_v4().simple());
        self.kv
            .put(key, value.join(",").into())
            .await
            .map(|_| ())
            .map_err(|e| kv_error("write", self.kv.name.as_str(), e))
    }

    async fn dead_letter(&self, record: &DeadLetter) -> Result<(), StoreError> {
        let key = format!("{}.dl.{}", self.run, uuid::Uuid::new_v4().simple());
        self.kv
            .put(key, record.to_string().into())
            .await
            .map(|_| ())
            .map_err(|e| kv_error("write", self.kv.name.as_str(), e))
    }
}

/// The ledger store chosen by `--ledger`.
pub(crate) enum LedgerStore {
    /// A file in `--state-dir`.
    File(FileStore),
    /// A JetStream key-value bucket.
    Kv(Box<KvStore>),
}

impl LedgerStore {
    /// Records the run (its job, for `fetcher status`, verify and the other-run check) unless
    /// it is recorded already.
    pub(crate) async fn record_run(&self, record: &RunRecord) -> Result<(), StoreError> {
        match self {
            LedgerStore::File(store) => store.record_run(record),
            LedgerStore::Kv(store) => store.record_run(record).await,
        }
    }

    /// Makes `entries` durable before returning.
    pub(crate) async fn record(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        match self {
            LedgerStore::File(store) => store.record(entries),
            LedgerStore::Kv(store) => store.record_entries(entries).await,
        }
    }

    /// Adds a record for people to the dead-letter list.
    pub(crate) async fn dead_letter(&self, record: &DeadLetter) -> Result<(), StoreError> {
        match self {
            LedgerStore::File(store) => store.dead_letter(record),
            LedgerStore::Kv(store) => store.dead_letter(record).await,
        }
    }

    /// The single-fetcher lock's status when it can be lost (`--ledger kv`); a file lock is
    /// held as long as the process lives.
    pub(crate) fn lock(&self) -> Option<std::sync::Arc<crate::kv_lock::LockStatus>> {
        match self {
            LedgerStore::File(_) => None,
            LedgerStore::Kv(store) => Some(store.lock.status()),
        }
    }

    /// Where dead-letter records go, for logs.
    pub(crate) fn dead_letters(&self) -> String {
        match self {
            LedgerStore::File(store) => store.dead_letter_path().display().to_string(),
            LedgerStore::Kv(store) => format!("JetStream bucket {}, keys {}.dl.*", store.kv.name, store.run),
        }
    }
}

/// Tracks failures of the durable store. While it fails, the fetcher answers no ack (the savers
/// resend), reports not-ready, and says so once, then every 30 s with a count; it resumes by
/// itself when a write succeeds again (space freed, say).
pub(crate) struct StoreHealth {
    /// The service's readiness flag (`/readyz`).
    pub(crate) ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
    failing_since: Option<std::time::Instant>,
    failures: u64,
    last_reminder: std::time::Instant,
}

impl StoreHealth {
    /// Healthy, reporting through `ready`.
    pub(crate) fn new(ready: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Self {
        StoreHealth { ready, failing_since: None, failures: 0, last_reminder: std::time::Instant::now() }
    }

    /// The last write succeeded.
    pub(crate) fn ok(&self) -> bool {
        self.failing_since.is_none()
    }

    /// A write failed with `error`; `what` says what waits for it.
    pub(crate) fn failed(&mut self, error: &StoreError, metrics: &crate::metrics::FetcherMetrics, what: &str) {
        metrics.store_failed();
        self.failures += 1;
        self.ready.store(false, std::sync::atomic::Ordering::Relaxed);
        let now = std::time::Instant::now();
        match self.failing_since {
            None => {
                self.failing_since = Some(now);
                self.last_reminder = now;
                tracing::error!(
                    "{error}; {what}. The fetcher reports not-ready and resumes by itself once the store can be written (free space in --state-dir, or bring JetStream back)"
                );
            }
            Some(since) if now.duration_since(self.last_reminder) >= std::time::Duration::from_secs(30) => {
                self.last_reminder = now;
                tracing::error!(
                    "the ledger store still fails ({} failed writes in {:.0} s): {error}",
                    self.failures,
                    now.duration_since(since).as_secs_f64()
                );
            }
            Some(_) => {}
        }
    }

    /// A write succeeded.
    pub(crate) fn succeeded(&mut self, metrics: &crate::metrics::FetcherMetrics) {
        if let Some(since) = self.failing_since.take() {
            tracing::info!(
                "the ledger store works again after {} failed writes in {:.1} s; serving acks again",
                self.failures,
                since.elapsed().as_secs_f64()
            );
            self.failures = 0;
            metrics.store_recovered();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(run: &str, content: &str) -> RunRecord {
        RunRecord {
            run: run.into(),
            input: "in.jsonl".into(),
            content: content.into(),
            chunk_size: 100,
            chunks: 3,
            objects: 300,
            job: serde_json::json!({"transform": {"kind": "digest", "rounds": 1}}),
            describe: "digest (1 rounds)".into(),
        }
    }

    #[test]
    fn the_sink_is_recorded_and_other_runs_of_the_same_input_are_found_with_their_progress() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let (mut store, _, _) = FileStore::open(dir.path(), &record("1111111111111111", "same")).expect("open");
            store.record_run(&record("1111111111111111", "same")).expect("record run");
            store
                .record(&[Entry::Sink("sink-a".into()), Entry::Done(ChunkId(0)), Entry::Done(ChunkId(1))])
                .expect("record");
        }
        let (store, recovered, others) =
            FileStore::open(dir.path(), &record("2222222222222222", "same")).expect("open");
        assert_eq!(recovered, Recovered::default());
        assert_eq!(others.len(), 1);
        assert_eq!((others[0].record.run.as_str(), others[0].finished), ("1111111111111111", 2));
        drop(store);
        // Run 2 was opened but never recorded (the caller refused it): run 1 does not see it.
        let (store, again, others) = FileStore::open(dir.path(), &record("1111111111111111", "same")).expect("open");
        assert_eq!(again.sink.as_deref(), Some("sink-a"));
        assert!(others.is_empty(), "an unaccepted run blocks nobody: {others:?}");
        drop(store);
        let (store, _, _) = FileStore::open(dir.path(), &record("2222222222222222", "same")).expect("open");
        store.record_run(&record("2222222222222222", "same")).expect("record run");
        drop(store);
        let (_, _, others) = FileStore::open(dir.path(), &record("1111111111111111", "same")).expect("open");
        assert_eq!(others[0].record.run, "2222222222222222");
        // The same input (as given) and job with other content: the input changed under them.
        let (_, _, changed) = FileStore::open(dir.path(), &record("3333333333333333", "other content"))
            .map(|(s, r, o)| (drop(s), r, o))
            .expect("open");
        assert_eq!(changed.len(), 2, "{changed:?}");
        let other_input = RunRecord { input: "other.jsonl".into(), ..record("4444444444444444", "other content") };
        let (_, _, none) = FileStore::open(dir.path(), &other_input).map(|(s, r, o)| (drop(s), r, o)).expect("open");
        assert!(none.is_empty());
    }

    #[test]
    fn a_needed_commit_and_the_commit_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let run = record("0123456789abcdef", "c");
        {
            let (mut store, _, _) = FileStore::open(dir.path(), &run).expect("open");
            store.record(&[Entry::Sink("obj-1".into()), Entry::CommitNeeded, Entry::Done(ChunkId(0))]).expect("record");
        }
        {
            let (mut store, recovered, _) = FileStore::open(dir.path(), &run).expect("reopen");
            assert!(recovered.commit_needed && !recovered.committed, "{recovered:?}");
            store.record(&[Entry::Committed]).expect("record");
        }
        let (_store, recovered, _) = FileStore::open(dir.path(), &run).expect("reopen");
        assert!(recovered.commit_needed && recovered.committed, "{recovered:?}");
        assert_eq!(parse_entry(&Entry::Committed.text("")), Some(Entry::Committed), "the KV form reads back too");
        assert_eq!(parse_entry(&Entry::CommitNeeded.text("")), Some(Entry::CommitNeeded));
    }

    #[test]
    fn recorded_entries_survive_a_reopen_and_a_torn_line_is_cut_off() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let (mut store, recovered, others) =
                FileStore::open(dir.path(), &record("0123456789abcdef", "c")).expect("open");
            assert_eq!((recovered, others), (Recovered::default(), vec![]));
            store.record(&[Entry::Done(ChunkId(3)), Entry::Done(ChunkId(5)), Entry::Dead(ChunkId(7))]).expect("record");
        }
        let mut log = OpenOptions::new().append(true).open(dir.path().join("0123456789abcdef.ledger")).expect("log");
        log.write_all(b"d 9").expect("torn write");
        {
            let (mut store, recovered, _) =
                FileStore::open(dir.path(), &record("0123456789abcdef", "c")).expect("reopen");
            assert_eq!(
                recovered,
                Recovered { done: vec![ChunkId(3), ChunkId(5)], dead: vec![ChunkId(7)], ..Recovered::default() }
            );
            // Appended after the torn entry, not glued onto it.
            store.record(&[Entry::Done(ChunkId(11))]).expect("record");
        }
        let (_store, recovered, _) = FileStore::open(dir.path(), &record("0123456789abcdef", "c")).expect("reopen");
        assert_eq!(
            recovered,
            Recovered {
                done: vec![ChunkId(3), ChunkId(5), ChunkId(11)],
                dead: vec![ChunkId(7)],
                ..Recovered::default()
            }
        );
    }

    #[test]
    fn a_second_fetcher_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_first, _, _) = FileStore::open(dir.path(), &record("0123456789abcdef", "c")).expect("first");
        let err = FileStore::open(dir.path(), &record("0123456789abcdef", "c")).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert!(err.to_string().contains(&format!("pid {}", std::process::id())), "{err}");
    }
}
