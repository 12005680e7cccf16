//! Where saved chunks go. Each sink is one module; [`Sink`] picks one by configuration, and adding
//! a sink is one module and one match arm. Every sink saves a chunk atomically and idempotently:
//! a chunk is either fully present or absent, and saving it again changes nothing.

pub mod file;
pub(crate) mod object;
pub mod postgres;

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::decoded::Decoded;

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

/// Why a chunk could not be saved. Nothing is acknowledged for it.
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
    /// The sink's configuration is unusable.
    #[error("{0}")]
    Config(String),
    /// The result can never be saved by this sink (the saver rejects it rather than retrying).
    #[error("{0}")]
    Invalid(String),
    /// The task saving the batch died (a panic): nothing of it is known to be saved.
    #[error("the task saving a batch stopped: {0}; the mappers resend")]
    Task(String),
}

/// A sink's whole configuration, resolved from the command line once (its secret read): what
/// the saver opens and `saver verify` reads.
#[derive(Debug, Clone)]
pub enum SinkConfig {
    /// One JSON Lines file per chunk under `out`.
    File {
        /// The directory.
        out: PathBuf,
    },
    /// Rows in PostgreSQL tables.
    Postgres(postgres::PgOptions),
}

impl SinkConfig {
    /// Opens the sink, waiting (with backoff) for a database that is not up yet; `None` if
    /// `shutdown` came first.
    pub async fn open(self, shutdown: &CancellationToken) -> Result<Option<Sink>, SinkError> {
        match self {
            SinkConfig::File { out } => Ok(Some(Sink::File(Arc::new(file::FileSink::open_blocking_pool(out).await?)))),
            SinkConfig::Postgres(options) => {
                Ok(postgres::PgSink::connect(options, shutdown).await?.map(Sink::Postgres))
            }
        }
    }
}

/// The configured sink. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Sink {
    /// One JSON Lines file per chunk under a directory.
    File(Arc<file::FileSink>),
    /// Rows in PostgreSQL tables.
    Postgres(postgres::PgSink),
}

impl Sink {
    /// Saves several chunks together (one round of syncs, or one transaction); one outcome per
    /// result, in order. `Saved` means durable.
    pub async fn save_batch(&self, results: Vec<Arc<Decoded>>) -> Vec<Result<SaveOutcome, SinkError>> {
        match self {
            Sink::File(sink) => file::FileSink::save_on_blocking_pool(sink, results).await,
            Sink::Postgres(sink) => sink.save_batch(&results).await,
        }
    }

    /// The sink's identity: which sink a run saves into.
    pub fn id(&self) -> &str {
        match self {
            Sink::File(sink) => sink.id(),
            Sink::Postgres(sink) => sink.id(),
        }
    }

    /// Batches worth saving at once: the file sink folds everything into one round of syncs;
    /// the database commits one batch per pooled connection.
    pub fn parallel_batches(&self) -> usize {
        match self {
            Sink::File(_) => 1,
            Sink::Postgres(sink) => sink.connections(),
        }
    }

    /// Where it writes, for logs (never a password).
    pub fn describe(&self) -> String {
        match self {
            Sink::File(sink) => format!("directory {}", sink.root().display()),
            Sink::Postgres(sink) => format!("PostgreSQL {}", sink.target()),
        }
    }
}
