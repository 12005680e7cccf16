//! The file sink's place among the sinks: `--sink file` (the default, also an empty `--sink`)
//! with `--out DIR`, opened for writing as a [`FileSink`] and read back by run directory
//! ([`super::reader`]).

use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::reader::FileReader;
use super::FileSink;
use crate::decoded::Decoded;
use crate::sink::{ReadError, SaveOutcome, Sink, SinkConfig, SinkContext, SinkError, SinkKind, SinkReader, SinkWriter};

/// The file sink, as [`crate::sink::SINKS`] lists it.
pub(crate) struct FileKind;

/// The one [`FileKind`].
pub(crate) const FILE: FileKind = FileKind;

impl SinkKind for FileKind {
    fn name(&self) -> &'static str {
        "file"
    }

    fn usage(&self) -> &'static str {
        "`file` (the default: part files under --out)"
    }

    fn accepts(&self, sink: &str) -> bool {
        sink.is_empty() || sink == "file"
    }

    fn redacted(&self, _sink: &str) -> String {
        "file".into()
    }

    fn configure(&self, _sink: &str, context: &SinkContext<'_>) -> Result<Box<dyn SinkConfig>, SinkError> {
        Ok(Box::new(FileConfig { out: context.out.to_path_buf() }))
    }
}

/// Part files and an index per run under a directory.
#[derive(Debug, Clone)]
pub struct FileConfig {
    /// The directory (`--out`).
    pub out: PathBuf,
}

impl SinkConfig for FileConfig {
    fn open<'a>(&'a self, _shutdown: &'a CancellationToken) -> BoxFuture<'a, Result<Option<Sink>, SinkError>> {
        Box::pin(async move {
            let sink = FileSink::open_blocking_pool(self.out.clone()).await?;
            Ok(Some(Sink::new(Arc::new(sink))))
        })
    }

    fn reader(&self, run: &str) -> Result<Box<dyn SinkReader>, ReadError> {
        Ok(Box::new(FileReader::open(&self.out.join(run))?))
    }
}

impl SinkWriter for Arc<FileSink> {
    /// On tokio's blocking pool: fsync blocks.
    fn save_batch(&self, results: Vec<Arc<Decoded>>) -> BoxFuture<'_, Vec<Result<SaveOutcome, SinkError>>> {
        Box::pin(FileSink::save_on_blocking_pool(self, results))
    }

    fn id(&self) -> &str {
        FileSink::id(self)
    }

    /// One batch at a time: the file sink folds everything into one round of syncs.
    fn parallel_batches(&self) -> usize {
        1
    }

    fn describe(&self) -> String {
        format!("directory {}", self.root().display())
    }
}
