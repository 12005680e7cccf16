//! The spool: the decompressed bytes of each compressed object, written once to a file so that
//! chunks, whose byte ranges are offsets into the decompressed stream, can be read back by range
//! (a gzip or zstd stream cannot be entered in the middle).
//!
//! A spool file is written while the scan streams the object (a tee behind the decoder, so the
//! object is downloaded and decompressed once), as `NAME.part-PID-N`; at the end of the stream it
//! is flushed, fsynced, renamed to its final name and the directory fsynced, so a spool file that
//! exists is complete. Its name is a digest of the object's identity (name, size, version,
//! compression; see [`spool_name`]): a restarted process reuses it while the object is unchanged,
//! and a changed object gets a new file, never a stale one. A broken-off write leaves a `.part`
//! file, removed on drop (or by [`crate::Source::prune_spool`] after a crash).

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::source::ObjectInfo;

/// The spool file's suffix.
pub(crate) const SUFFIX: &str = ".spool";
/// The marker in the name of a spool file being written.
pub(crate) const PART: &str = ".part-";

/// The spool file name of an object: 32 hex digits of SHA-256 over the object's identity record
/// (the bytes [`crate::Source::identity`] hashes for it), then `.spool`.
pub(crate) fn spool_name(object: &ObjectInfo) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"chunkmill spool v1\n");
    object.hash_into(&mut hasher);
    let digest = hasher.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}{SUFFIX}")
}

/// Writes one spool file; dropping it before [`SpoolWriter::finish`] removes the partial file.
pub(crate) struct SpoolWriter {
    part: PathBuf,
    dest: PathBuf,
    file: Option<BufWriter<File>>,
}

impl SpoolWriter {
    /// Starts writing `dest` (through a `.part` file beside it).
    pub(crate) fn create(dest: &Path) -> io::Result<SpoolWriter> {
        static SEQUENCE: AtomicU64 = AtomicU64::new(0);
        let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let part = PathBuf::from(format!("{}{PART}{}-{n}", dest.display(), std::process::id()));
        let file = OpenOptions::new().write(true).create_new(true).open(&part)?;
        Ok(SpoolWriter { part, dest: dest.to_path_buf(), file: Some(BufWriter::with_capacity(256 * 1024, file)) })
    }

    pub(crate) fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.file {
            Some(file) => file.write_all(bytes),
            None => Err(io::Error::other("spool file already finished")),
        }
    }

    /// Makes the spool file durable and gives it its final name.
    pub(crate) fn finish(mut self) -> io::Result<()> {
        let Some(file) = self.file.take() else { return Ok(()) };
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&self.part, &self.dest)?;
        if let Some(dir) = self.dest.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// The file being written.
    pub(crate) fn part(&self) -> &Path {
        &self.part
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.part);
        }
    }
}

/// Turns a spool write failure into the caller's error (naming object and file).
pub(crate) type OnSpoolError = Box<dyn Fn(&Path, io::Error) -> io::Error + Send>;

/// A reader that copies everything it reads into a spool file, finished at end of stream.
pub(crate) struct Tee<R> {
    inner: R,
    writer: Option<SpoolWriter>,
    on_error: OnSpoolError,
}

impl<R: Read> Tee<R> {
    pub(crate) fn new(inner: R, writer: SpoolWriter, on_error: OnSpoolError) -> Self {
        Tee { inner, writer: Some(writer), on_error }
    }
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(writer) = &mut self.writer {
            if n == 0 && !buf.is_empty() {
                if let Some(writer) = self.writer.take() {
                    let part = writer.part().to_path_buf();
                    writer.finish().map_err(|e| (self.on_error)(&part, e))?;
                }
            } else if let Err(e) = writer.write_all(&buf[..n]) {
                let part = writer.part().to_path_buf();
                self.writer = None;
                return Err((self.on_error)(&part, e));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tee<'a>(inner: &'a [u8], dest: &Path) -> Tee<&'a [u8]> {
        let writer = SpoolWriter::create(dest).expect("create spool");
        Tee::new(inner, writer, Box::new(|_, e| e))
    }

    #[test]
    fn a_spool_file_appears_only_when_the_stream_is_complete() {
        let dir = tempfile::tempdir().expect("temp dir");
        let dest = dir.path().join(format!("x{SUFFIX}"));
        let mut reader = tee(b"hello world", &dest);
        let mut first = [0u8; 5];
        reader.read_exact(&mut first).expect("read");
        assert!(!dest.exists());
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).expect("read to end");
        assert_eq!(std::fs::read(&dest).expect("spool"), b"hello world");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).expect("list").collect();
        assert_eq!(leftovers.len(), 1);
    }

    #[test]
    fn a_stream_dropped_midway_leaves_no_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let dest = dir.path().join(format!("x{SUFFIX}"));
        let mut reader = tee(b"hello world", &dest);
        let mut first = [0u8; 5];
        reader.read_exact(&mut first).expect("read");
        drop(reader);
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0);
    }
}
