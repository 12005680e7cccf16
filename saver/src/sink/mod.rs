//! Where saved chunks go. A sink is one folder under `sink/` (`file/`, `postgres/`: its
//! configuration, its writer, its reader, its tests) and one line in [`SINKS`]; nothing else in
//! the saver or in `saver verify` knows which sinks exist. Its parts implement four traits:
//!
//! - [`SinkKind`]: which `--sink` values name it, and how they become a [`SinkConfig`];
//! - [`SinkConfig`]: the configuration resolved at start-up (its secrets read), which opens the
//!   sink for writing ([`SinkWriter`]) and, for `saver verify`, one run for reading
//!   ([`SinkReader`]);
//! - [`SinkWriter`]: saves batches of chunks atomically and idempotently (a chunk is either fully
//!   present or absent, and saving it again changes nothing), durably before it answers `Saved`,
//!   under one identity every saver writing into it reports; and commits a run once it is
//!   complete, for a sink that needs that step ([`SinkWriter::commit_run`]);
//! - [`SinkReader`]: gives back what the sink holds of a run, chunk by chunk, with what the sink
//!   does to a value it keeps ([`Normalise`]), and says when a run is not committed yet.
//!
//! ARCHITECTURE.md ("How to add a sink") walks through adding one.

pub mod file;
pub mod object;
pub mod postgres;

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::protocol::{CommitRequest, CommitStatus, DeadObject};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::config::SinkArgs;
use crate::decoded::Decoded;

/// Every sink this saver knows, the default (`--sink file`) first. Registering a sink is one
/// line here (and one `#[command(flatten)]` in [`SinkArgs`] if it has flags of its own).
pub(crate) const SINKS: &[&dyn SinkKind] = &[&file::FILE, &postgres::POSTGRES, &object::OBJECT];

/// A kind of sink: the `--sink` values that name it, and the configuration they make.
pub trait SinkKind: Send + Sync {
    /// Its name, for people: `file`, `postgres`.
    fn name(&self) -> &'static str;
    /// How `--sink` names it, for the message about a value no sink takes: "`file` (the
    /// default)", "a postgres://USER@HOST:PORT/DATABASE URL".
    fn usage(&self) -> &'static str;
    /// Whether `--sink` value `sink` (trimmed) names this kind. Kinds must not overlap.
    fn accepts(&self, sink: &str) -> bool;
    /// `sink` without any secret it holds, for logs and `Debug`.
    fn redacted(&self, sink: &str) -> String;
    /// The sink `sink` names, with the saver's other settings (`args`, `out`), its pool size and
    /// instance name; its secrets are read here, once.
    fn configure(&self, sink: &str, context: &SinkContext<'_>) -> Result<Box<dyn SinkConfig>, SinkError>;
}

/// What a sink's configuration is made from besides its `--sink` value.
pub struct SinkContext<'a> {
    /// The sink flags (each sink's own flags are flattened into them).
    pub args: &'a SinkArgs,
    /// `--out`: the file sink's directory.
    pub out: &'a Path,
    /// Connections a database sink may open (`--pg-pool`; 1 for verify).
    pub pool_size: usize,
    /// The saver's instance name (`verify` for `saver verify`).
    pub saver: &'a str,
}

/// A sink's whole configuration, resolved from the command line once (its secret read): what
/// the saver opens and `saver verify` reads.
pub trait SinkConfig: std::fmt::Debug + Send + Sync {
    /// Opens the sink for writing, waiting (with backoff) for a store that is not up yet; `None`
    /// if `shutdown` came first.
    fn open<'a>(&'a self, shutdown: &'a CancellationToken) -> BoxFuture<'a, Result<Option<Sink>, SinkError>>;
    /// Opens run `run` for reading (blocking: verify runs on its own threads).
    /// [`ReadError::NotCommitted`] if the sink commits runs and this one is not committed yet.
    fn reader(&self, run: &str) -> Result<Box<dyn SinkReader>, ReadError>;
}

/// An open sink, saving chunks.
pub trait SinkWriter: std::fmt::Debug + Send + Sync {
    /// Saves several chunks together (one round of syncs, or one transaction); one outcome per
    /// result, in order. `Saved` means durable.
    fn save_batch(&self, results: Vec<Arc<Decoded>>) -> BoxFuture<'_, Vec<Result<SaveOutcome, SinkError>>>;
    /// The sink's identity: which sink a run saves into (docs/PROTOCOL.md §6.5).
    fn id(&self) -> &str;
    /// Batches worth saving at once (a database: one per pooled connection).
    fn parallel_batches(&self) -> usize {
        1
    }
    /// Where it writes, for logs (never a secret).
    fn describe(&self) -> String;
    /// Whether a run saved here must be committed once complete ([`SinkWriter::commit_run`]):
    /// the saver says so in its acks, and the fetcher then asks for the commit.
    fn needs_commit(&self) -> bool {
        false
    }
    /// The run is complete: each of its `request.chunks` chunks is saved here (its outputs, or
    /// its dead-letter record). A sink whose saved chunks are not yet the run's result (parts
    /// staged, a manifest and a `_SUCCESS` marker to write) makes them so, idempotently (it may
    /// be asked again: by the fetcher until it hears `Committed`, by another saver, after a
    /// crash half way), and may answer `Committing` while it works in the background. The file
    /// and PostgreSQL sinks need no such step: a saved chunk is already part of the result.
    fn commit_run<'a>(&'a self, request: &'a CommitRequest) -> BoxFuture<'a, Result<CommitStatus, SinkError>> {
        let _ = request;
        Box::pin(std::future::ready(Ok(CommitStatus::Committed)))
    }
}

/// The open sink. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Sink(Arc<dyn SinkWriter>);

impl Sink {
    /// The sink `writer` is.
    pub fn new(writer: impl SinkWriter + 'static) -> Self {
        Sink(Arc::new(writer))
    }

    /// See [`SinkWriter::save_batch`].
    pub async fn save_batch(&self, results: Vec<Arc<Decoded>>) -> Vec<Result<SaveOutcome, SinkError>> {
        self.0.save_batch(results).await
    }

    /// See [`SinkWriter::id`].
    pub fn id(&self) -> &str {
        self.0.id()
    }

    /// See [`SinkWriter::parallel_batches`].
    pub fn parallel_batches(&self) -> usize {
        self.0.parallel_batches()
    }

    /// See [`SinkWriter::describe`].
    pub fn describe(&self) -> String {
        self.0.describe()
    }

    /// See [`SinkWriter::needs_commit`].
    pub fn needs_commit(&self) -> bool {
        self.0.needs_commit()
    }

    /// See [`SinkWriter::commit_run`]. A request for a run of another sink is `WrongSink`, from
    /// every kind of sink: a file saver in the same queue group must never answer `Committed` for
    /// an object-store run.
    pub async fn commit_run(&self, request: &CommitRequest) -> Result<CommitStatus, SinkError> {
        if request.sink != self.id() {
            return Ok(CommitStatus::WrongSink);
        }
        self.0.commit_run(request).await
    }
}

/// What saving a chunk did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveOutcome {
    /// Written now.
    Saved,
    /// Written now, except for this many objects the sink can never store (PostgreSQL refused
    /// their values): those are dead-lettered in the sink with the database's reason instead, so
    /// one bad value cannot stall its chunk, or its neighbours, forever.
    SavedRefusing(u64),
    /// Already there (a duplicate or late result): nothing written.
    Duplicate,
}

/// Why a chunk could not be saved, or a sink not configured or opened. Nothing is acknowledged
/// for it.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A file-system operation failed.
    #[error("cannot {action} {path}: {source}; check that the directory is writable and the disk has space")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A database operation failed.
    #[error("PostgreSQL {target}: cannot {action}: {detail}; {hint}")]
    Postgres {
        /// The database, without password.
        target: String,
        /// What was being done.
        action: &'static str,
        /// The server's or the client's message.
        detail: String,
        /// What the user can do.
        hint: &'static str,
    },
    /// An object store operation failed; the message names the object and the settings to check.
    #[error("cannot {action} in the object store: {source}")]
    Store {
        /// What was being done.
        action: &'static str,
        /// The store's failure, explained.
        source: input::SourceError,
    },
    /// The sink's configuration is unusable.
    #[error("{0}")]
    Config(String),
    /// The batch this chunk was saved with failed, for the reason given (one failure, told to
    /// each of the batch's chunks).
    #[error("{0}")]
    Batch(String),
    /// A secret of the sink's configuration cannot be read.
    #[error(transparent)]
    Secret(#[from] common::config::SecretFileError),
    /// The result can never be saved by this sink (the saver rejects it rather than retrying).
    #[error("{0}")]
    Invalid(String),
    /// The task saving the batch died (a panic): nothing of it is known to be saved.
    #[error("the task saving a batch stopped: {0}; the mappers resend")]
    Task(String),
}

/// One run as a sink holds it, read back for `saver verify`.
pub trait SinkReader: Send + Sync {
    /// What is checked, for the report: the run directory, or the database and run.
    fn location(&self) -> String;
    /// What the sink does to a value it keeps.
    fn normalise(&self) -> Normalise;
    /// Chunks read at once: verify holds this many chunks' values at a time.
    fn chunks_per_read(&self) -> usize {
        200
    }
    /// What the sink holds of chunks `range` (a chunk it does not hold is absent), and what it
    /// holds for them that no chunk record accounts for.
    fn read(&self, range: Range<usize>) -> Result<StoredChunks, ReadError>;
    /// What the sink holds for the run beyond its `chunks` chunks, or outside every chunk.
    fn rest(&self, chunks: usize) -> Result<Unaccounted, ReadError>;
}

/// What a sink does to an output value it keeps, applied by `saver verify` to the value it
/// expects before comparing it with the saved one (each sink documents it: the file sink keeps
/// values as written, [`as_written`]; PostgreSQL's `jsonb` has its own rules). `None`: the sink
/// cannot keep this value at all.
pub type Normalise =
    std::sync::Arc<dyn for<'a> Fn(common::exact::Value<'a>) -> Option<common::exact::Value<'a>> + Send + Sync>;

/// A sink that keeps every value as it was sent (whitespace aside, which parsing ignores).
pub fn as_written() -> Normalise {
    fn kept(value: common::exact::Value<'_>) -> Option<common::exact::Value<'_>> {
        Some(value)
    }
    std::sync::Arc::new(kept)
}

/// Chunks as a sink holds them, by chunk index.
#[derive(Debug, Default)]
pub struct StoredChunks {
    /// Each chunk the sink holds.
    pub chunks: HashMap<u64, StoredChunk>,
    /// What the sink holds for these chunks that no chunk record accounts for.
    pub unaccounted: Unaccounted,
}

/// One chunk as the sink holds it.
#[derive(Debug, Default)]
pub struct StoredChunk {
    /// Its output values.
    pub values: StoredValues,
    /// Its dead-letter entries.
    pub dead: Vec<DeadObject>,
    /// Values and entries of further copies of the chunk (saved more than once).
    pub duplicates: u64,
}

/// A chunk's output values.
#[derive(Debug)]
pub enum StoredValues {
    /// In order, without saying which object each belongs to (the file sink's lines): verify
    /// places them by recomputing the transform.
    InOrder(Vec<Vec<u8>>),
    /// By object index, each object's in order (the database's rows).
    ByObject(BTreeMap<u32, Vec<Vec<u8>>>),
}

impl Default for StoredValues {
    fn default() -> Self {
        StoredValues::InOrder(Vec::new())
    }
}

/// What a sink holds that belongs to no chunk of the run, or that its chunk records do not
/// account for.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Unaccounted {
    /// Output values: of chunks past the run's, outside every chunk's range.
    pub values: u64,
    /// Dead-letter entries likewise.
    pub dead: u64,
    /// Chunk records that do not match what is saved under them (rows without a chunk record,
    /// chunk records whose counts differ from their rows).
    pub mismatched_chunks: u64,
}

impl std::ops::AddAssign for Unaccounted {
    fn add_assign(&mut self, other: Self) {
        self.values += other.values;
        self.dead += other.dead;
        self.mismatched_chunks += other.mismatched_chunks;
    }
}

/// Why a sink cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds something that is not what the sink writes.
    #[error("{path}, line {line}: {error}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// Why.
        error: String,
    },
    /// A database cannot be read; the message names it (never its password) and what failed.
    #[error("{0}")]
    Database(String),
    /// The sink commits runs, and this run is not committed yet: nothing of it is a result yet.
    #[error("run {run} in {location} is not committed yet ({why}); verify it once its run is complete")]
    NotCommitted {
        /// The run.
        run: String,
        /// Where, without secrets.
        location: String,
        /// What is missing.
        why: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_commit_request_for_another_sinks_run_is_wrong_sink_even_from_a_sink_without_commits() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = file::FileConfig { out: dir.path().to_path_buf() };
        let sink = config.open(&CancellationToken::new()).await.expect("opens").expect("a sink");
        let mut request = CommitRequest {
            v: common::protocol::VERSION,
            run: "0123456789abcdef".into(),
            sink: "obj-0123".into(),
            job: "j".into(),
            spec: serde_json::json!({}),
            input: "in.jsonl".into(),
            chunk_size: 100,
            chunks: 1,
            objects: 1,
        };
        assert_eq!(sink.commit_run(&request).await.expect("answers"), CommitStatus::WrongSink);
        request.sink = sink.id().to_string();
        assert_eq!(sink.commit_run(&request).await.expect("answers"), CommitStatus::Committed);
    }
}
