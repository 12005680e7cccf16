//! Where saved chunks go. Each sink is one module; [`Sink`] picks one by configuration, and adding
//! a sink is one module and one match arm. Every sink saves a chunk atomically and idempotently:
//! a chunk is either fully present or absent, and saving it again changes nothing.

pub mod file;

use std::path::PathBuf;

use common::protocol::ChunkResult;

/// What saving a chunk did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveOutcome {
    /// Written now.
    Saved,
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
}

/// The configured sink.
#[derive(Debug)]
pub enum Sink {
    /// One JSON Lines file per chunk under a directory.
    File(file::FileSink),
}

impl Sink {
    /// Saves one chunk durably; blocking (call from a blocking thread).
    pub fn save(&self, result: &ChunkResult) -> Result<SaveOutcome, SinkError> {
        match self {
            Sink::File(sink) => sink.save(result),
        }
    }

    /// Saves several chunks with one round of syncs; one outcome per result, in order.
    pub fn save_batch(&self, results: &[&ChunkResult]) -> Vec<Result<SaveOutcome, SinkError>> {
        match self {
            Sink::File(sink) => sink.save_batch(results),
        }
    }

    /// Where it writes, for logs.
    pub fn describe(&self) -> String {
        match self {
            Sink::File(sink) => format!("directory {}", sink.root().display()),
        }
    }
}
