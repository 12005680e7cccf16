//! The bridge to the scan (`common::input`): a [`Source`] is an [`ObjectSource`], so the scan
//! streams its objects and [`common::input::ChunkReader`] reads chunks back from it, while
//! `common` (shared with the mappers) links no store client.
//!
//! Chunk reads may come from async code (the fetcher's server task), which should call
//! [`common::input::ChunkReader::read_with_lines_async`]: a read that may wait (a remote object,
//! a compressed one) then runs on the blocking pool. Called in place from a runtime, a remote
//! read runs inside `block_in_place` on a multi-threaded runtime, or on a scoped thread
//! otherwise (which holds a current-thread runtime until it returns); its I/O always runs on the
//! source's own runtime.

use std::io::{self, Read};
use std::ops::Range;

use common::input::{ObjectIdentity, ObjectSource, ReadError, ReadErrorKind};
use tokio::runtime::{Handle, RuntimeFlavor};

use crate::error::{ErrorKind, SourceError};
use crate::location::{Compression, Location};
use crate::source::{Source, Version};

impl From<&SourceError> for ReadError {
    fn from(error: &SourceError) -> Self {
        let kind = match error.kind() {
            ErrorKind::Changed => ReadErrorKind::Changed,
            ErrorKind::Unavailable => ReadErrorKind::Unavailable,
            _ => ReadErrorKind::Other,
        };
        ReadError { kind, message: error.to_string() }
    }
}

/// Turns the [`SourceError`]s inside an object reader's I/O errors into [`ReadError`]s, which
/// the scan recognises.
struct Bridged<R>(R);

impl<R: Read> Read for Bridged<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|e| match SourceError::from_io(&e) {
            Some(source) => io::Error::other(ReadError::from(source)),
            None => e,
        })
    }
}

/// Runs blocking `work` from wherever it is called: directly off a runtime, in
/// `block_in_place` on a multi-threaded one, on a scoped thread on a current-thread one.
fn off_runtime<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    match Handle::try_current() {
        Err(_) => work(),
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(work),
        Ok(_) => std::thread::scope(|scope| match scope.spawn(work).join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }),
    }
}

impl ObjectSource for Source {
    fn count(&self) -> usize {
        self.objects().len()
    }

    fn name(&self, object: usize) -> String {
        self.objects().get(object).map(|o| o.name.clone()).unwrap_or_default()
    }

    fn identity(&self, object: usize) -> ObjectIdentity {
        let Some(info) = self.objects().get(object) else {
            return ObjectIdentity { key: String::new(), size: 0, version: None };
        };
        let version = match &info.version {
            Version::Local { .. } => None,
            Version::Remote { e_tag, version, modified_sec, modified_nsec } => Some(match (e_tag, version) {
                (None, None) => format!("modified={modified_sec}.{modified_nsec:09}"),
                (e_tag, version) => {
                    format!("etag={};version={}", e_tag.as_deref().unwrap_or(""), version.as_deref().unwrap_or(""))
                }
            }),
        };
        ObjectIdentity { key: info.key.clone(), size: info.size, version }
    }

    fn is_single_file(&self) -> bool {
        matches!(self.location(), Location::File(_))
            && self.objects().len() == 1
            && self.objects()[0].compression == Compression::None
    }

    fn open(&self, object: usize) -> Result<Box<dyn Read + Send + '_>, ReadError> {
        let reader = off_runtime(|| self.reader(object)).map_err(|e| ReadError::from(&e))?;
        Ok(Box::new(Bridged(reader)))
    }

    fn read_range(&self, object: usize, range: Range<u64>) -> Result<Vec<u8>, ReadError> {
        let result = if !self.read_may_wait(object) {
            // A pread: no need to leave the runtime.
            Source::read_range(self, object, range)
        } else {
            off_runtime(|| Source::read_range(self, object, range))
        };
        result.map_err(|e| ReadError::from(&e))
    }

    fn read_may_wait(&self, object: usize) -> bool {
        let local = self.objects().get(object).is_some_and(|o| matches!(o.version, Version::Local { .. }));
        !local || self.spool_path(object).is_some()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use common::input::{scan, scan_source, ChunkReader, ScanOptions};

    use super::*;
    use crate::{Env, SourceOptions};

    fn source(input: &str, spool: &std::path::Path) -> Arc<Source> {
        let options =
            SourceOptions { spool_dir: Some(spool.to_path_buf()), env: Env::empty(), ..SourceOptions::default() };
        Arc::new(Source::open_blocking(Location::parse(input).expect("location"), options).expect("open"))
    }

    fn records(n: std::ops::Range<u32>) -> String {
        n.map(|i| format!("{{\"id\":{i}}}\n")).collect()
    }

    #[test]
    fn a_single_file_keeps_the_run_id_it_had_before_sources() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("a.jsonl");
        std::fs::write(&path, records(0..25)).expect("write");
        let options = ScanOptions { job: "job", ..ScanOptions::default() };
        let before = scan(&path, 10, &options).expect("scan");
        let after =
            scan_source(source(&path.display().to_string(), dir.path()), "a.jsonl", 10, &options).expect("scan");
        assert_eq!(before.run_id, after.run_id);
        assert_eq!(before.content, after.content);
    }

    #[test]
    fn chunks_never_span_objects_and_are_read_back_from_their_object() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("part-1.jsonl"), records(0..15)).expect("write");
        let zst = zstd::encode_all(records(15..22).as_bytes(), 3).expect("zstd");
        std::fs::write(dir.path().join("part-2.jsonl.zst"), zst).expect("write");
        let input = format!("{}/part-*", dir.path().display());
        let options = ScanOptions { job: "job", ..ScanOptions::default() };
        let index = scan_source(source(&input, &dir.path().join("spool")), &input, 10, &options).expect("scan");
        let cut: Vec<(u32, u32)> = index.chunks.iter().map(|c| (c.object, c.objects)).collect();
        assert_eq!(cut, [(0, 10), (0, 5), (1, 7)]);
        assert_eq!(index.objects, 22);
        let reader = ChunkReader::open(&index).expect("reader");
        let last = reader.read_array(&index.chunks[2]).expect("read");
        let values: Vec<serde_json::Value> = serde_json::from_slice(&last).expect("json");
        assert_eq!(values.first(), Some(&serde_json::json!({"id": 15})));
        // Moved elsewhere, the same files are the same run; another order or content is not.
        let moved = tempfile::tempdir().expect("temp dir");
        for name in ["part-1.jsonl", "part-2.jsonl.zst"] {
            std::fs::copy(dir.path().join(name), moved.path().join(name)).expect("copy");
        }
        let again = format!("{}/part-*", moved.path().display());
        let copy = scan_source(source(&again, &moved.path().join("spool")), &again, 10, &options).expect("scan");
        assert_eq!(copy.run_id, index.run_id);
        std::fs::write(moved.path().join("part-1.jsonl"), records(0..14)).expect("rewrite");
        let changed = scan_source(source(&again, &moved.path().join("spool")), &again, 10, &options).expect("scan");
        assert_ne!(changed.run_id, index.run_id);
    }

    #[test]
    fn a_chunk_of_a_rewritten_object_is_refused_as_changed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("a.jsonl");
        std::fs::write(&path, records(0..5)).expect("write");
        let input = path.display().to_string();
        let index = scan_source(source(&input, dir.path()), &input, 10, &ScanOptions::default()).expect("scan");
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, records(5..10)).expect("rewrite");
        match ChunkReader::open(&index).expect("reader").read(&index.chunks[0]) {
            Err(common::input::InputError::Read(e)) => {
                assert_eq!(e.kind, ReadErrorKind::Changed);
                assert!(e.message.contains("a.jsonl"), "{e}");
            }
            other => panic!("expected a changed object, got {other:?}"),
        }
    }
}
