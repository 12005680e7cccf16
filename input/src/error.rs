//! What can go wrong with an input, as one error type whose every message says what failed, on
//! which input or object, and what the user can do. Callers branch on [`SourceError::kind`] (a
//! small `Copy` enum), never on message text: the fetcher stops handing out an object's chunks on
//! [`ErrorKind::Changed`], retries nothing itself (transient store errors were already retried
//! underneath), and reports the rest.
//!
//! No message carries a secret: credentials are only ever named by the variable that holds them.

use std::io;
use std::ops::Range;
use std::path::PathBuf;

/// The kind of a [`SourceError`], for callers that act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The `--input` text cannot be understood.
    Location,
    /// A glob or a prefix matched nothing.
    NoObjects,
    /// A file, object or bucket does not exist.
    NotFound,
    /// The store refused the credentials or the access.
    Denied,
    /// An object is no longer the version that was listed (rewritten, replaced or deleted).
    Changed,
    /// The store stayed unreachable or failing after the bounded retries, or the process is
    /// out of file descriptors (`EMFILE`, `ENFILE`): a condition of the reader that passes, never
    /// a reason to give up on the data.
    Unavailable,
    /// Any other store error.
    Store,
    /// A local file cannot be read.
    Io,
    /// A compressed object is corrupt or truncated.
    Decompress,
    /// The spool directory cannot be written or read.
    Spool,
    /// A compressed object decompresses to more than the spool may hold (a decompression bomb,
    /// or limits set too low).
    SpoolLimit,
    /// A setting (environment variable, `*_FILE`, option) is wrong or missing.
    Config,
    /// A byte range outside an object.
    Range,
}

/// Why an input cannot be listed or read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The `--input` text cannot be understood.
    #[error("input '{input}': {problem}; write {fix}")]
    Location {
        /// The input as written.
        input: String,
        /// What is wrong with it.
        problem: String,
        /// What to write instead.
        fix: String,
    },
    /// A glob or a prefix matched nothing.
    #[error("input '{input}' matches no {what}: {fix}")]
    NoObjects {
        /// The input as written.
        input: String,
        /// "file" or "object".
        what: &'static str,
        /// What to check.
        fix: String,
    },
    /// A file, object or bucket does not exist.
    #[error("{object} does not exist: {fix} (store said: {source})")]
    NotFound {
        /// The file, object or bucket.
        object: String,
        /// What to check.
        fix: String,
        /// The store's or the OS's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The store refused the credentials or the access.
    #[error("access to {object} was refused: {fix} (store said: {source})")]
    Denied {
        /// The object or bucket.
        object: String,
        /// The settings to fix.
        fix: String,
        /// The store's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An object is no longer the version that was listed.
    #[error(
        "input object {object} changed after it was listed ({detail}): a run never mixes two versions of its input; \
         stop the run, or restore the object and start again (a new run id is made from the new version)"
    )]
    Changed {
        /// The object.
        object: String,
        /// What differs (ETag, size, modification time, or gone).
        detail: String,
    },
    /// The store stayed unreachable or failing after the bounded retries.
    #[error("{object}: the store is unreachable or failing after retries: {fix} (last error: {source})")]
    Unavailable {
        /// The object or bucket.
        object: String,
        /// What to check.
        fix: String,
        /// The last error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Any other store error.
    #[error("{object}: {source}")]
    Store {
        /// The object or bucket.
        object: String,
        /// The store's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A local file cannot be read.
    #[error("cannot read input file {path}: {source}; check the path and its permissions")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A compressed object is corrupt or truncated.
    #[error("cannot decompress {object} ({format}): {source}; check that the file is complete and really {format}")]
    Decompress {
        /// The object.
        object: String,
        /// "gzip" or "zstd".
        format: &'static str,
        /// The decoder's error.
        source: io::Error,
    },
    /// The spool directory cannot be written or read.
    #[error("spool file {path} for {object}: {source}; the spool holds the decompressed input: check the directory's free space and permissions")]
    Spool {
        /// The object being spooled.
        object: String,
        /// The spool file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A compressed object decompresses to more than the spool may hold.
    #[error("input object {object} {problem}: refused before it fills the disk (the spool holds each compressed object decompressed); {fix}")]
    SpoolLimit {
        /// The object.
        object: String,
        /// Which limit it passes.
        problem: String,
        /// The setting to change.
        fix: String,
    },
    /// A setting is wrong or missing.
    #[error("{setting}: {problem}")]
    Config {
        /// The variable or option.
        setting: String,
        /// What is wrong and what to do.
        problem: String,
    },
    /// A byte range outside an object.
    #[error("range {range:?} is outside {object} ({len} bytes); the chunk index does not belong to this input")]
    Range {
        /// The object.
        object: String,
        /// The range asked for.
        range: Range<u64>,
        /// The object's (decompressed) length.
        len: u64,
    },
}

impl SourceError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SourceError::Io { source, .. } | SourceError::Spool { source, .. }
                if common::input::is_fd_shortage(source) =>
            {
                ErrorKind::Unavailable
            }
            SourceError::Location { .. } => ErrorKind::Location,
            SourceError::NoObjects { .. } => ErrorKind::NoObjects,
            SourceError::NotFound { .. } => ErrorKind::NotFound,
            SourceError::Denied { .. } => ErrorKind::Denied,
            SourceError::Changed { .. } => ErrorKind::Changed,
            SourceError::Unavailable { .. } => ErrorKind::Unavailable,
            SourceError::Store { .. } => ErrorKind::Store,
            SourceError::Io { .. } => ErrorKind::Io,
            SourceError::Decompress { .. } => ErrorKind::Decompress,
            SourceError::Spool { .. } => ErrorKind::Spool,
            SourceError::SpoolLimit { .. } => ErrorKind::SpoolLimit,
            SourceError::Config { .. } => ErrorKind::Config,
            SourceError::Range { .. } => ErrorKind::Range,
        }
    }

    /// The [`SourceError`] inside an I/O error returned by an [`crate::ObjectReader`], if any
    /// (the scan sees `std::io::Error`s; this recovers, e.g., [`ErrorKind::Changed`]).
    pub fn from_io(error: &io::Error) -> Option<&SourceError> {
        error.get_ref().and_then(|inner| inner.downcast_ref::<SourceError>())
    }

    /// Wraps this error in an `io::Error`, for [`std::io::Read`] implementations.
    pub(crate) fn into_io(self) -> io::Error {
        io::Error::other(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_file_descriptors_is_unavailable_not_a_fault_of_the_input() {
        for errno in [libc_emfile(), libc_enfile()] {
            let io = io::Error::from_raw_os_error(errno);
            let error = SourceError::Io { path: "data/users.jsonl".into(), source: io };
            assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
        }
        let denied =
            SourceError::Io { path: "data/users.jsonl".into(), source: io::ErrorKind::PermissionDenied.into() };
        assert_eq!(denied.kind(), ErrorKind::Io);
    }

    /// EMFILE and ENFILE on Linux (asm-generic/errno-base.h).
    fn libc_emfile() -> i32 {
        24
    }

    fn libc_enfile() -> i32 {
        23
    }

    #[test]
    fn an_io_error_made_from_a_source_error_gives_it_back() {
        let error = SourceError::Changed { object: "s3://b/k".into(), detail: "gone".into() }.into_io();
        assert_eq!(SourceError::from_io(&error).map(SourceError::kind), Some(ErrorKind::Changed));
        assert!(SourceError::from_io(&io::Error::other("plain")).is_none());
    }
}
