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
//!
//! The spool is bounded ([`SpoolLimits`], `--spool-max-ratio` and `--spool-max-size`): an object
//! that decompresses to more than its share (a 50 MB `.gz` that inflates to 50 GB) stops its
//! scan at the limit, naming the object and the setting, and its partial file is removed.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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

/// However compressible an object is, it may decompress to this much: the ratio limit applies
/// past it, so that a small, very repetitive file is never taken for a bomb.
pub const RATIO_FLOOR: u64 = 64 << 20;

/// How much the spool may hold: the most a decompression bomb costs before it is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolLimits {
    /// The most an object may decompress to, as a multiple of its stored size (but at least
    /// [`RATIO_FLOOR`]).
    pub max_ratio: u64,
    /// The most the spool files of the input may hold together, in bytes.
    pub max_bytes: u64,
}

impl Default for SpoolLimits {
    /// 100 times an object's stored size, 64 GiB in all.
    fn default() -> Self {
        SpoolLimits { max_ratio: 100, max_bytes: 64 << 30 }
    }
}

impl SpoolLimits {
    /// The most an object of `stored` bytes may decompress to.
    pub fn per_object(&self, stored: u64) -> u64 {
        self.max_ratio.saturating_mul(stored).max(RATIO_FLOOR)
    }
}

/// The spool limits on the command line (the fetcher's, and `saver verify`'s, which spools the
/// same input).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct SpoolArgs {
    /// The most a compressed input object (.gz, .zst) may decompress to, as a multiple of its
    /// stored size (any object may reach 64 MiB): a decompression bomb is refused, naming the
    /// object, long before it fills the state volume.
    #[arg(long, env = "FETCHER_SPOOL_MAX_RATIO", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub spool_max_ratio: u64,

    /// The most the spool may hold, every compressed object of the input together (their
    /// decompressed copies in STATE_DIR/spool), e.g. 500MB, 64GiB: size the state volume for it.
    #[arg(long, env = "FETCHER_SPOOL_MAX_SIZE", default_value = "64GiB", value_parser = parse_size)]
    pub spool_max_size: u64,
}

impl SpoolArgs {
    /// The limits these flags set.
    pub fn limits(&self) -> SpoolLimits {
        SpoolLimits { max_ratio: self.spool_max_ratio, max_bytes: self.spool_max_size }
    }
}

impl Default for SpoolArgs {
    fn default() -> Self {
        let limits = SpoolLimits::default();
        SpoolArgs { spool_max_ratio: limits.max_ratio, spool_max_size: limits.max_bytes }
    }
}

/// A size that is not one.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a size: write a number of bytes with an optional unit, e.g. 500MB, 64GiB or 1T (K, M, G, T and KiB... are powers of 1024; KB, MB, GB, TB powers of 1000)")]
pub struct SizeError(String);

/// Parses a size such as `500MB`, `64GiB`, `1T` or `1048576` (bytes).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let trimmed = text.trim();
    let digits = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let number: u64 = trimmed[..digits].parse().map_err(|_| SizeError(text.to_string()))?;
    let unit: u64 = match trimmed[digits..].trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(SizeError(text.to_string())),
    };
    number.checked_mul(unit).ok_or_else(|| SizeError(text.to_string()))
}

/// What the spool holds for one input: each object's spooled bytes and their total, so that
/// [`Budget`]s check the limits as a spool file grows.
#[derive(Debug)]
pub(crate) struct Usage {
    limits: SpoolLimits,
    objects: Vec<AtomicU64>,
    total: AtomicU64,
}

impl Usage {
    pub(crate) fn new(limits: SpoolLimits, objects: usize) -> Self {
        Usage { limits, objects: (0..objects).map(|_| AtomicU64::new(0)).collect(), total: AtomicU64::new(0) }
    }

    /// Object `index`'s spool file holds `bytes` now (a complete one reused, or 0 before it is
    /// written again).
    pub(crate) fn set(&self, index: usize, bytes: u64) {
        if let Some(object) = self.objects.get(index) {
            let before = object.swap(bytes, Ordering::Relaxed);
            self.total.fetch_add(bytes, Ordering::Relaxed);
            self.total.fetch_sub(before, Ordering::Relaxed);
        }
    }
}

/// The limits as one object's spool file is written: [`Budget::take`] before each write.
pub(crate) struct Budget {
    usage: Arc<Usage>,
    index: usize,
    /// The object's name and stored size, for the error.
    object: String,
    stored: u64,
}

impl Budget {
    /// The budget of object `index` (`object`, `stored` bytes), whose spool file starts empty.
    pub(crate) fn new(usage: Arc<Usage>, index: usize, object: String, stored: u64) -> Self {
        usage.set(index, 0);
        Budget { usage, index, object, stored }
    }

    /// Counts `n` more bytes into the spool file, or says which limit they would pass.
    pub(crate) fn take(&self, n: u64) -> Result<(), crate::SourceError> {
        let Some(written) = self.usage.objects.get(self.index) else { return Ok(()) };
        let limits = self.usage.limits;
        let (now, total) = (written.load(Ordering::Relaxed) + n, self.usage.total.load(Ordering::Relaxed) + n);
        if now > limits.per_object(self.stored) {
            return Err(crate::SourceError::SpoolLimit {
                object: self.object.clone(),
                problem: format!(
                    "decompresses to more than {} bytes, {} times its {} stored bytes",
                    limits.per_object(self.stored),
                    limits.max_ratio,
                    self.stored
                ),
                fix: "if it is genuine, raise --spool-max-ratio (FETCHER_SPOOL_MAX_RATIO)".into(),
            });
        }
        if total > limits.max_bytes {
            return Err(crate::SourceError::SpoolLimit {
                object: self.object.clone(),
                problem: format!(
                    "would take the spool past --spool-max-size, {} bytes, for the input's compressed objects together",
                    limits.max_bytes
                ),
                fix: "raise --spool-max-size (FETCHER_SPOOL_MAX_SIZE) and size the state volume for it".into(),
            });
        }
        written.fetch_add(n, Ordering::Relaxed);
        self.usage.total.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

/// Turns a spool write failure into the caller's error (naming object and file).
pub(crate) type OnSpoolError = Box<dyn Fn(&Path, io::Error) -> io::Error + Send>;

/// A reader that copies everything it reads into a spool file, finished at end of stream, within
/// its [`Budget`].
pub(crate) struct Tee<R> {
    inner: R,
    writer: Option<SpoolWriter>,
    on_error: OnSpoolError,
    budget: Budget,
}

impl<R: Read> Tee<R> {
    pub(crate) fn new(inner: R, writer: SpoolWriter, on_error: OnSpoolError, budget: Budget) -> Self {
        Tee { inner, writer: Some(writer), on_error, budget }
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
            } else if let Err(e) = self.budget.take(n as u64) {
                // Dropping the writer removes the partial file: the disk is free again.
                self.writer = None;
                return Err(e.into_io());
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
        tee_within(inner, dest, SpoolLimits::default(), 10)
    }

    fn tee_within<'a>(inner: &'a [u8], dest: &Path, limits: SpoolLimits, stored: u64) -> Tee<&'a [u8]> {
        let writer = SpoolWriter::create(dest).expect("create spool");
        let budget = Budget::new(Arc::new(Usage::new(limits, 1)), 0, "s3://b/bomb.jsonl.gz".into(), stored);
        Tee::new(inner, writer, Box::new(|_, e| e), budget)
    }

    #[test]
    fn an_object_past_its_ratio_or_the_spool_past_its_size_stops_naming_the_object_and_leaves_no_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let dest = dir.path().join(format!("x{SUFFIX}"));
        let big = vec![b'x'; (RATIO_FLOOR + 1) as usize];
        // 1 000 stored bytes may become 64 MiB (the floor), not one byte more.
        let mut reader = tee_within(&big, &dest, SpoolLimits { max_ratio: 100, max_bytes: u64::MAX }, 1000);
        let error = io::copy(&mut reader, &mut io::sink()).expect_err("past the floor");
        let message = crate::SourceError::from_io(&error).expect("a source error").to_string();
        assert!(message.contains("s3://b/bomb.jsonl.gz") && message.contains("--spool-max-ratio"), "{message}");
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0, "the partial file is gone");
        // A ratio past the floor: 1 MiB stored may become 100 MiB.
        assert_eq!(SpoolLimits { max_ratio: 100, max_bytes: 0 }.per_object(1 << 20), 100 << 20);
        let mut reader = tee_within(b"hello world", &dest, SpoolLimits { max_ratio: 100, max_bytes: 10 }, 1000);
        let error = io::copy(&mut reader, &mut io::sink()).expect_err("past the size");
        let message = crate::SourceError::from_io(&error).expect("a source error").to_string();
        assert!(message.contains("--spool-max-size") && message.contains("10 bytes"), "{message}");
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0);
    }

    #[test]
    fn sizes_read_with_binary_and_decimal_units() {
        assert_eq!(parse_size("1048576").expect("bytes"), 1 << 20);
        assert_eq!(parse_size("64GiB").expect("GiB"), 64 << 30);
        assert_eq!(parse_size("64G").expect("G"), 64 << 30);
        assert_eq!(parse_size("500MB").expect("MB"), 500_000_000);
        assert_eq!(parse_size(" 2 TiB ").expect("spaces"), 2 << 40);
        let error = parse_size("lots").expect_err("not a size").to_string();
        assert!(error.contains("`lots`") && error.contains("64GiB"), "{error}");
        assert!(parse_size("99999999999T").is_err(), "an overflow is refused");
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
