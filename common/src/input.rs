//! Reading the input data set: JSON Lines (one object per line) or a single JSON array, detected
//! from the first byte of each object. [`scan_source`] streams every object of an
//! [`ObjectSource`] once, in order, validates every record (naming object and line when one is
//! bad), and returns an index of chunks as byte ranges within their object (a chunk never spans
//! two objects), so nobody ever holds the whole data set in memory. [`ChunkReader`] re-reads one
//! chunk's records from its range (one ranged read).
//!
//! Where the bytes come from is the [`ObjectSource`]'s business: the `input` crate's `Source`
//! (object stores, HTTP, globs, compressed files) for the fetcher and `saver verify`, or
//! [`LocalFile`] (one plain file, what [`scan`] reads). So this module needs no store client,
//! and the mappers, which share `common`, never link one.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::IgnoredAny;
use sha2::{Digest, Sha256};

/// A job's own check of a record: `Err` says what is wrong with it.
pub type RecordCheck<'a> = dyn Fn(&[u8]) -> Result<(), String> + Sync + 'a;
/// A record's id, if it has one, as text that is equal for two records exactly when their ids
/// are duplicates (`transform::IdField::key`: typed, numbers canonical); it is also what the
/// duplicate's error shows.
pub type RecordId<'a> = dyn Fn(&[u8]) -> Option<String> + Sync + 'a;

/// What the scan checks beyond strict JSON, and what names the run. The job's own rules come in
/// as functions so that this module needs to know nothing about transforms.
#[derive(Clone, Copy, Default)]
pub struct ScanOptions<'a> {
    /// The transform's own check of a record (the digest's users schema), if it has one.
    pub check: Option<&'a RecordCheck<'a>>,
    /// A record's id (the job's `--id-field`), for the duplicate check; `None` skips the check.
    pub id: Option<&'a RecordId<'a>>,
    /// The job's fingerprint, part of the run id.
    pub job: &'a str,
    /// Bytes of memory the duplicate-id check may hold before it spills to `spill_dir`
    /// (0: [`DEFAULT_DUP_MEMORY`]).
    pub dup_memory: usize,
    /// Where the duplicate-id check spills past its memory (None: the system's temporary
    /// directory). The fetcher uses its state directory.
    pub spill_dir: Option<&'a Path>,
}

/// Checks one input record: strict JSON first (every byte, also of fields the transform ignores,
/// see [`crate::json`]), then the job's own rules.
fn check_record(bytes: &[u8], options: &ScanOptions<'_>) -> Result<(), String> {
    crate::json::check_object(bytes).map_err(|e| e.to_string())?;
    match options.check {
        Some(check) => check(bytes),
        None => Ok(()),
    }
}

/// Why an [`ObjectSource`] could not read a range, as far as the fetcher acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadErrorKind {
    /// The object is no longer the version that was scanned: none of its chunks may be handed
    /// out any more (a run never mixes two versions of its input).
    Changed,
    /// The store stayed unreachable after its retries, or the process is out of file
    /// descriptors ([`is_fd_shortage`]): a condition of the reader, not of the chunk; try
    /// again later.
    Unavailable,
    /// Anything else (the chunk cannot be read).
    Other,
}

impl ReadErrorKind {
    /// The kind of a failed read of a local file: [`ReadErrorKind::Unavailable`] when the process
    /// (or the system) is out of file descriptors, which passes, else [`ReadErrorKind::Other`].
    pub fn of_io(error: &io::Error) -> Self {
        if is_fd_shortage(error) {
            ReadErrorKind::Unavailable
        } else {
            ReadErrorKind::Other
        }
    }
}

/// Whether `error` is a shortage of file descriptors (EMFILE: this process has its most open;
/// ENFILE: the system has): a transient condition of the reader (a flood of connections on the
/// metrics port once caused it), never a reason to give up on the data being read.
pub fn is_fd_shortage(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// A failed read of an object, its message naming the object and what to do.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ReadError {
    /// What kind of failure.
    pub kind: ReadErrorKind,
    /// The whole message.
    pub message: String,
}

/// What identifies one object of the input in the run id, besides its bytes (see
/// [`ObjectSource::identity`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectIdentity {
    /// Its name within the input: the key of a stored object (`BUCKET/KEY`), the path of a local
    /// file relative to its glob's directory.
    pub key: String,
    /// Its stored size in bytes.
    pub size: u64,
    /// Its version as the store gives it (ETag, version id), if any.
    pub version: Option<String>,
}

/// The input's objects, in run order: what the scan streams and chunks are read back from.
pub trait ObjectSource: Send + Sync + std::fmt::Debug {
    /// How many objects.
    fn count(&self) -> usize;
    /// Object `object`'s name in messages (a path, `s3://BUCKET/KEY`, a URL).
    fn name(&self, object: usize) -> String;
    /// What identifies it in the run id besides its bytes.
    fn identity(&self, object: usize) -> ObjectIdentity;
    /// Whether the input is one plain (uncompressed) local file: its run id is then made from its
    /// bytes alone, as before inputs could be many objects (§8.2 of docs/PROTOCOL.md).
    fn is_single_file(&self) -> bool;
    /// Streams the object's (decompressed) bytes from the start, for the scan.
    fn open(&self, object: usize) -> Result<Box<dyn Read + Send + '_>, ReadError>;
    /// Reads `range` of the object's (decompressed) bytes: one ranged read, checked against the
    /// version that was scanned.
    fn read_range(&self, object: usize, range: Range<u64>) -> Result<Vec<u8>, ReadError>;
    /// Whether [`ObjectSource::read_range`] of the object may wait on the network or on more
    /// than one local read (a remote object, with its retries; a compressed one, spooled first
    /// if its spool file is gone). [`ChunkReader::read_with_lines_async`] then runs it on the
    /// blocking pool. The default, false, is right for a `pread` of a local file.
    fn read_may_wait(&self, _object: usize) -> bool {
        false
    }
}

/// One plain local file as an [`ObjectSource`] (what [`scan`] reads; tests and tools).
#[derive(Debug)]
pub struct LocalFile {
    path: PathBuf,
    file: File,
    size: u64,
}

impl LocalFile {
    /// Opens `path`.
    pub fn open(path: &Path) -> Result<Self, InputError> {
        let io_err = |source| InputError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io_err)?;
        let size = file.metadata().map_err(io_err)?.len();
        Ok(LocalFile { path: path.to_path_buf(), file, size })
    }
}

impl ObjectSource for LocalFile {
    fn count(&self) -> usize {
        1
    }

    fn name(&self, _: usize) -> String {
        self.path.display().to_string()
    }

    fn identity(&self, _: usize) -> ObjectIdentity {
        let key = self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        ObjectIdentity { key, size: self.size, version: None }
    }

    fn is_single_file(&self) -> bool {
        true
    }

    fn open(&self, _: usize) -> Result<Box<dyn Read + Send + '_>, ReadError> {
        let file = self.file.try_clone().map_err(|e| ReadError {
            kind: ReadErrorKind::Other,
            message: format!("cannot read input file {}: {e}; check the path and its permissions", self.path.display()),
        })?;
        // A clone shares the file offset: start from the beginning whatever read it before.
        let mut file = file;
        io::Seek::rewind(&mut file).map_err(|e| ReadError {
            kind: ReadErrorKind::Other,
            message: format!("cannot read input file {}: {e}", self.path.display()),
        })?;
        Ok(Box::new(file))
    }

    fn read_range(&self, _: usize, range: Range<u64>) -> Result<Vec<u8>, ReadError> {
        let mut raw = vec![0u8; (range.end - range.start) as usize];
        self.file.read_exact_at(&mut raw, range.start).map_err(|e| ReadError {
            kind: ReadErrorKind::of_io(&e),
            message: format!("cannot read input file {}: {e}; check the path and its permissions", self.path.display()),
        })?;
        Ok(raw)
    }
}

/// How the input file is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    /// One JSON object per line.
    JsonLines,
    /// One JSON array of objects (may span many lines).
    JsonArray,
}

/// The longest record the scan holds in memory and checks: 64 MiB, the largest `max_payload`
/// a NATS server takes, so a longer record can never reach a mapper. The scan streams past such
/// a record without holding it (its bytes still count in the run id), and puts it in its chunk
/// unchecked; that chunk is dead-lettered by its recorded size ([`ChunkSpan::bytes`]) without
/// being read, and [`ChunkReader`] refuses to read a chunk whose records are larger.
pub const MAX_RECORD: u64 = 64 << 20;

/// One chunk: a byte range of one input object holding `objects` valid records (and maybe some
/// bad records, which are skipped when the chunk is read). What the fetcher keeps of a chunk
/// (48 bytes), all of it from the scan; the chunk's index, if persisted, would be these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSpan {
    /// The input object it is in (its index in the source's order).
    pub object: u32,
    /// Byte offset of the chunk's first record within its object (decompressed).
    pub offset: u64,
    /// Bytes up to the end of its last record.
    pub len: u64,
    /// Valid records in the chunk.
    pub objects: u32,
    /// 1-based line of the first record.
    pub first_line: u64,
    /// Bytes of its valid records, separators and skipped records not counted: the least a
    /// message carrying the chunk takes, known without reading it.
    pub bytes: u64,
    /// CRC-32 over each valid record's line, length and own CRC-32, in order, as scanned: every
    /// read of the chunk checks it ([`ChunkReader`]), so a chunk whose bytes were edited in
    /// place since the scan (same size, same modification time) is never handed out.
    pub checksum: u32,
}

/// A record that cannot be processed, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// The input object it is in.
    pub object: u32,
    /// 1-based line where the record starts, within its object.
    pub line: u64,
    /// Byte offset where the record starts, within its object.
    pub offset: u64,
    /// What is wrong with it.
    pub error: String,
}

/// What the scan found in one input object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedObject {
    /// Its name (a path, `s3://BUCKET/KEY`).
    pub name: String,
    /// Its layout.
    pub format: InputFormat,
    /// Whether it starts with a UTF-8 byte-order mark (skipped).
    pub bom: bool,
    /// Its (decompressed) length in bytes.
    pub len: u64,
}

/// The result of scanning an input.
#[derive(Debug, Clone)]
pub struct InputIndex {
    /// The input as given (`--input`).
    pub input: String,
    /// Its objects, in run order, as scanned.
    pub parts: Vec<ScannedObject>,
    /// The first object's layout.
    pub format: InputFormat,
    /// The chunk size used.
    pub chunk_size: u32,
    /// Chunks in input order; the last may be shorter.
    pub chunks: Vec<ChunkSpan>,
    /// Valid records.
    pub objects: u64,
    /// Invalid records, in input order.
    pub bad: Vec<BadRecord>,
    /// Whether an object starts with a UTF-8 byte-order mark (tolerated and skipped).
    pub bom: bool,
    /// Identifies this content chunked this way by this job (see [`run_id`]).
    pub run_id: String,
    /// The input's identity apart from the job, hex: SHA-256 of a single file's bytes, or of
    /// every object's identity and bytes, in order (§8.2 of docs/PROTOCOL.md).
    pub content: String,
    /// Where the bytes come from, to read chunks back.
    pub source: Arc<dyn ObjectSource>,
}

impl InputIndex {
    /// Where a bad record is, for people: `line N` for a single object, `OBJECT line N` else.
    pub fn locate(&self, bad: &BadRecord) -> String {
        if self.parts.len() <= 1 {
            format!("line {}", bad.line)
        } else {
            let name = self.parts.get(bad.object as usize).map_or("?", |p| p.name.as_str());
            format!("{name} line {}", bad.line)
        }
    }
}

/// Why an input file cannot be read at all.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The file cannot be opened or read.
    #[error("cannot read input file {path}: {source}; check the path and its permissions")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file holds no data.
    #[error("input file {0} is empty: generate data with `fetcher generate --objects N --output FILE`")]
    Empty(PathBuf),
    /// An input object cannot be read (the message names it and what to do).
    #[error("{0}")]
    Read(ReadError),
    /// The file's structure is broken past recovery (for an array: a syntax error).
    #[error("input file {path}, line {line}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// What is wrong.
        message: String,
    },
    /// The chunk size is zero.
    #[error("chunk size must be at least 1")]
    ChunkSize,
    /// A chunk whose records are larger than any message can be: it is never read.
    #[error("the chunk of {object} from line {line} holds {bytes} bytes of records, more than the {max} bytes a message can carry (no NATS server takes more): it is not read")]
    TooLarge {
        /// Its object.
        object: String,
        /// Its first line.
        line: u64,
        /// Bytes of its records.
        bytes: u64,
        /// [`MAX_RECORD`].
        max: u64,
    },
    /// The duplicate-id check could not spill to disk.
    #[error(transparent)]
    Spill(#[from] crate::dups::SpillError),
}

/// The run id for content with hash `content_hash` cut into chunks of `chunk_size` by the job
/// with fingerprint `job`: 16 hex digits. The same data chunked the same way by the same job
/// always gets the same id, so a restarted fetcher, a re-run and `saver verify` all agree on it,
/// and the sink keeps each run in its own place; another transform is another run.
///
/// `skipped` are the byte offsets of the records the scan left out: other records left out (the
/// duplicate check on or off) cut other chunks, so that is another run too. None skipped adds
/// nothing to the hash.
pub fn run_id(content_hash: &[u8; 32], chunk_size: u32, job: &str, skipped: &[u64]) -> String {
    let mut skipped = skipped.to_vec();
    skipped.sort_unstable();
    hashed_run_id(content_hash, chunk_size, job, |hasher| {
        for offset in skipped {
            hasher.update(offset.to_le_bytes());
        }
    })
}

/// The run id's hash: content, chunk size, job, then what `skipped` adds; 16 hex digits.
fn hashed_run_id(content_hash: &[u8; 32], chunk_size: u32, job: &str, skipped: impl FnOnce(&mut Sha256)) -> String {
    let mut hasher = Sha256::new();
    hasher.update(content_hash);
    hasher.update(chunk_size.to_le_bytes());
    hasher.update(job.as_bytes());
    skipped(&mut hasher);
    let digest = hasher.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// [`run_id`] for an input of several objects (or a compressed or remote one), whose skipped
/// records are named by (object index, offset within it): each enters as a u32 and a u64,
/// little-endian, in increasing order.
pub fn run_id_of_objects(content_hash: &[u8; 32], chunk_size: u32, job: &str, skipped: &[(u32, u64)]) -> String {
    let mut skipped = skipped.to_vec();
    skipped.sort_unstable();
    hashed_run_id(content_hash, chunk_size, job, |hasher| {
        for (object, offset) in skipped {
            hasher.update(object.to_le_bytes());
            hasher.update(offset.to_le_bytes());
        }
    })
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

struct ChunkBuilder<'a> {
    chunk_size: u32,
    /// The object being scanned.
    object: u32,
    /// Where it starts in the whole input (the objects one after the other): the duplicate
    /// check names records by this global offset, unique across objects.
    base: u64,
    chunks: Vec<ChunkSpan>,
    current: Option<ChunkSpan>,
    /// The checksum of the current chunk's records so far.
    checksum: crc32fast::Hasher,
    objects: u64,
    /// Lines of the objects before this one: the duplicate check names a record's line by
    /// `lines_before + line`, unique across objects, and [`ChunkBuilder::first_at`] maps it back.
    lines_before: u64,
    /// The highest line of a record in this object so far.
    last_line: u64,
    /// Each object begun so far: its `lines_before` and its name.
    begun: Vec<(u64, String)>,
    /// Whether the input has more than one object (a duplicate's first occurrence is then named
    /// by object too).
    many: bool,
    /// The duplicate-id check (in bounded memory, see [`crate::dups`]).
    dups: crate::dups::DupCheck,
    /// On a second pass: the duplicates the first found (offset -> line of the first
    /// occurrence); the check itself is then off.
    known: Option<&'a crate::dups::Known>,
    options: ScanOptions<'a>,
}

fn id_hash(id: &str) -> u128 {
    let digest = Sha256::digest(id.as_bytes());
    u128::from_le_bytes(digest[..16].try_into().unwrap_or_default())
}

/// What the parallel pass learns of a valid record.
struct Checked {
    /// Its id's hash, if the duplicate check is on and it has an id.
    id: Option<u128>,
    /// The CRC-32 of its bytes, for its chunk's checksum.
    crc: u32,
}

/// What the parallel pass learns of one record: `Err` if it is bad.
type Verdict = Result<Checked, String>;

/// Checks one record (strict JSON, the job's rules), hashes its id and takes its CRC-32: the
/// part of accepting a record that needs no other record, so it runs on all cores.
fn verdict(record: &[u8], options: &ScanOptions<'_>, dup_check: bool) -> Verdict {
    check_record(record, options)?;
    let id = if dup_check { options.id.and_then(|id| id(record)).map(|id| id_hash(&id)) } else { None };
    Ok(Checked { id, crc: crc32fast::hash(record) })
}

/// Adds one record to a chunk's checksum ([`ChunkSpan::checksum`]): its line, its length and
/// its own CRC-32, so that the scan (which takes the records' CRCs on all cores) and a read
/// (which has the chunk's bytes) make the same value.
fn add_record(checksum: &mut crc32fast::Hasher, line: u64, len: u64, crc: u32) {
    checksum.update(&line.to_le_bytes());
    checksum.update(&len.to_le_bytes());
    checksum.update(&crc.to_le_bytes());
}

impl<'a> ChunkBuilder<'a> {
    fn new(
        chunk_size: u32,
        objects: usize,
        dups: crate::dups::DupCheck,
        known: Option<&'a crate::dups::Known>,
        options: ScanOptions<'a>,
    ) -> Self {
        ChunkBuilder {
            chunk_size,
            object: 0,
            base: 0,
            chunks: Vec::new(),
            current: None,
            checksum: crc32fast::Hasher::new(),
            objects: 0,
            lines_before: 0,
            last_line: 0,
            begun: Vec::with_capacity(objects),
            many: objects > 1,
            dups,
            known,
            options,
        }
    }

    /// Whether ids are checked for duplicates in this pass.
    fn dup_check(&self) -> bool {
        self.options.id.is_some() && self.known.is_none()
    }

    /// Accepts a record that passed its [`verdict`], unless its id was seen before.
    fn admit(
        &mut self,
        record: &[u8],
        verdict: Verdict,
        offset: u64,
        line: u64,
    ) -> Result<Result<(), String>, InputError> {
        let checked = match verdict {
            Ok(checked) => checked,
            Err(error) => return Ok(Err(error)),
        };
        self.last_line = self.last_line.max(line);
        let first = match (self.known, checked.id) {
            (Some(known), _) => known.get(&(self.base + offset)).copied(),
            (None, Some(hash)) => self.dups.insert(hash, self.base + offset, self.lines_before + line)?,
            (None, None) => None,
        };
        if let Some(first) = first {
            let id = self.options.id.and_then(|id| id(record)).unwrap_or_default();
            return Ok(Err(format!("duplicate id {} (first {})", crate::text::escaped(&id), self.first_at(first))));
        }
        self.push(offset, record.len() as u64, line, checked.crc);
        Ok(Ok(()))
    }

    /// Accepts a record longer than [`MAX_RECORD`] that the scan streamed past without holding
    /// or checking it: it counts in its chunk, which is too large to be handed out or read (its
    /// checksum entry holds no CRC of its bytes, which were never in memory at once).
    fn admit_unchecked(&mut self, offset: u64, len: u64, line: u64) {
        self.last_line = self.last_line.max(line);
        self.push(offset, len, line, 0);
    }

    fn push(&mut self, offset: u64, len: u64, line: u64, crc: u32) {
        self.objects += 1;
        let object = self.object;
        if self.current.is_none() {
            self.checksum = crc32fast::Hasher::new();
        }
        let span = self.current.get_or_insert(ChunkSpan {
            object,
            offset,
            len: 0,
            objects: 0,
            first_line: line,
            bytes: 0,
            checksum: 0,
        });
        span.len = offset + len - span.offset;
        span.objects += 1;
        span.bytes += len;
        add_record(&mut self.checksum, line, len, crc);
        if span.objects == self.chunk_size {
            self.close_chunk();
        }
    }

    /// Ends the current chunk (full, or at the end of its object) with its checksum.
    fn close_chunk(&mut self) {
        if let Some(mut span) = self.current.take() {
            span.checksum = self.checksum.clone().finalize();
            self.chunks.push(span);
        }
    }

    /// Begins the next object, named `name`.
    fn begin_object(&mut self, name: &str) {
        self.begun.push((self.lines_before, name.to_string()));
    }

    /// Ends the current object, `len` bytes long: its last chunk is cut there (a chunk never
    /// spans objects).
    fn end_object(&mut self, len: u64) {
        self.close_chunk();
        self.object += 1;
        self.base += len;
        self.lines_before += self.last_line;
        self.last_line = 0;
    }

    /// Where the record on input-wide line `line` (`lines_before + line` of its object) is:
    /// "on line N", and for an input of many objects "at NAME line N" (as
    /// [`InputIndex::locate`] names a bad record).
    fn first_at(&self, line: u64) -> String {
        // The last object begun before that line (an empty object shares its start with the next).
        let at = self.begun.partition_point(|(before, _)| *before < line).saturating_sub(1);
        match self.begun.get(at) {
            Some((before, name)) if self.many => format!("at {name} line {}", line - before),
            Some((before, _)) => format!("on line {}", line - before),
            None => format!("on line {line}"),
        }
    }

    fn finish(mut self) -> Result<(Vec<ChunkSpan>, u64, Option<crate::dups::Known>), InputError> {
        self.close_chunk();
        let (known, late) = self.dups.finish()?;
        Ok((self.chunks, self.objects, late.then_some(known)))
    }
}

/// The duplicate check's memory budget when the caller sets none.
pub const DEFAULT_DUP_MEMORY: usize = 64 << 20;

/// Scans the one file `path` once with `options` (see [`scan_source`]).
pub fn scan(path: &Path, chunk_size: u32, options: &ScanOptions<'_>) -> Result<InputIndex, InputError> {
    let source = Arc::new(LocalFile::open(path)?);
    scan_source(source, &path.display().to_string(), chunk_size, options)
}

/// An I/O error while an object is streamed: the [`ReadError`] an [`ObjectSource`]'s reader
/// carries (a changed object, a store that stayed down), or a plain read error of `path`.
fn io_failure(path: &Path, source: io::Error) -> InputError {
    match source.get_ref().and_then(|inner| inner.downcast_ref::<ReadError>()) {
        Some(read) => InputError::Read(read.clone()),
        None => InputError::Io { path: path.to_path_buf(), source },
    }
}

/// Writes `bytes` to `hasher` prefixed by their length (so that fields cannot run together).
fn put_field(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

/// Scans every object of `source` once, in order, with `options`: detects each object's
/// format, validates every record (strict JSON, the job's check, duplicate ids across the whole
/// input), and cuts chunks of `chunk_size` valid records, never across two objects. `input` is
/// the input as given, for messages and the run record.
///
/// When the duplicate check spilled to disk and found duplicates only at the end, the input is
/// scanned a second time with them known, so that the chunks are cut exactly as a scan that
/// knew them at once would cut them (the same run, whatever the memory budget).
pub fn scan_source(
    source: Arc<dyn ObjectSource>,
    input: &str,
    chunk_size: u32,
    options: &ScanOptions<'_>,
) -> Result<InputIndex, InputError> {
    match scan_pass(&source, input, chunk_size, options, None)? {
        (index, None) => Ok(index),
        (_, Some(known)) => {
            tracing::info!(
                "input {input}: {} duplicate ids found after the scan (the check spilled to disk); scanning again to cut chunks around them",
                known.len()
            );
            Ok(scan_pass(&source, input, chunk_size, options, Some(&known))?.0)
        }
    }
}

fn scan_pass(
    source: &Arc<dyn ObjectSource>,
    input: &str,
    chunk_size: u32,
    options: &ScanOptions<'_>,
    known: Option<&crate::dups::Known>,
) -> Result<(InputIndex, Option<crate::dups::Known>), InputError> {
    if chunk_size == 0 {
        return Err(InputError::ChunkSize);
    }
    let budget = if options.dup_memory == 0 { DEFAULT_DUP_MEMORY } else { options.dup_memory };
    let spill_dir = options.spill_dir.map(Path::to_path_buf).unwrap_or_else(std::env::temp_dir);
    let dups = crate::dups::DupCheck::new(budget, &spill_dir);
    let mut builder = ChunkBuilder::new(chunk_size, source.count(), dups, known, *options);
    let mut bad = Vec::new();
    let mut parts = Vec::with_capacity(source.count());
    let mut content = ContentHash::new(source.as_ref());
    for object in 0..source.count() {
        let (part, digest) = scan_object(source.as_ref(), object, &mut builder, &mut bad)?;
        content.add(source.as_ref(), object, part.len, digest);
        parts.push(part);
    }
    let (chunks, objects, late) = builder.finish()?;
    if objects == 0 && bad.is_empty() {
        return Err(InputError::Empty(PathBuf::from(input)));
    }
    let single = content.single;
    let content_hash = content.finish();
    let run = if single {
        run_id(&content_hash, chunk_size, options.job, &bad.iter().map(|b| b.offset).collect::<Vec<_>>())
    } else {
        let skipped: Vec<(u32, u64)> = bad.iter().map(|b| (b.object, b.offset)).collect();
        run_id_of_objects(&content_hash, chunk_size, options.job, &skipped)
    };
    let index = InputIndex {
        input: input.to_string(),
        format: parts.first().map_or(InputFormat::JsonLines, |p| p.format),
        bom: parts.iter().any(|p| p.bom),
        parts,
        chunk_size,
        chunks,
        objects,
        bad,
        run_id: run,
        content: content_hash.iter().map(|b| format!("{b:02x}")).collect(),
        source: Arc::clone(source),
    };
    Ok((index, late))
}

/// Scans object `object` of `source` (its format detected from its first byte) into `builder`
/// and `bad`: what the index keeps of it, and its bytes' SHA-256.
fn scan_object(
    source: &dyn ObjectSource,
    object: usize,
    builder: &mut ChunkBuilder<'_>,
    bad: &mut Vec<BadRecord>,
) -> Result<(ScannedObject, [u8; 32]), InputError> {
    let name = source.name(object);
    let path = PathBuf::from(&name);
    builder.begin_object(&name);
    let reader = source.open(object).map_err(InputError::Read)?;
    let mut reader = BufReader::with_capacity(1 << 20, reader);
    let head = reader.fill_buf().map_err(|e| io_failure(&path, e))?;
    let bom = head.starts_with(BOM);
    let first = head.iter().skip(if bom { BOM.len() } else { 0 }).find(|b| !is_ws(**b)).copied();
    let format = match first {
        Some(b'[') => InputFormat::JsonArray,
        _ => InputFormat::JsonLines,
    };
    let mut hasher = Sha256::new();
    let len = match format {
        InputFormat::JsonLines => scan_lines(&path, reader, bom, builder, bad, &mut hasher)?,
        InputFormat::JsonArray => scan_array(&path, reader, bom, builder, bad, &mut hasher)?,
    };
    builder.end_object(len);
    Ok((ScannedObject { name, format, bom, len }, hasher.finalize().into()))
}

/// The input's content identity, built object by object. A single file: its bytes' SHA-256,
/// as before inputs could be many objects (so its runs resume). Several objects: a hash of each
/// one's key, size, version, length and content.
struct ContentHash {
    single: bool,
    single_content: Option<[u8; 32]>,
    hasher: Sha256,
}

impl ContentHash {
    fn new(source: &dyn ObjectSource) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"chunkmill input v2\n");
        hasher.update((source.count() as u64).to_le_bytes());
        ContentHash { single: source.is_single_file() && source.count() == 1, single_content: None, hasher }
    }

    fn add(&mut self, source: &dyn ObjectSource, object: usize, len: u64, digest: [u8; 32]) {
        if self.single {
            self.single_content = Some(digest);
            return;
        }
        let identity = source.identity(object);
        put_field(&mut self.hasher, identity.key.as_bytes());
        self.hasher.update(identity.size.to_le_bytes());
        put_field(&mut self.hasher, identity.version.as_deref().unwrap_or("").as_bytes());
        self.hasher.update(len.to_le_bytes());
        self.hasher.update(digest);
    }

    fn finish(self) -> [u8; 32] {
        self.single_content.unwrap_or_else(|| self.hasher.finalize().into())
    }
}

/// Bytes of JSON Lines read, hashed and validated as one block: large enough that the block's
/// records keep every core busy, small enough to stay a fixed cost in memory.
const BLOCK: usize = 8 << 20;

/// One line of a block: where it is, and where its record is within it (trimmed; empty for a
/// blank line).
struct Line {
    start: usize,
    end: usize,
    record: std::ops::Range<usize>,
}

/// Splits a block into lines; the block's first line skips `skip` bytes (a byte-order mark).
fn lines_of(block: &[u8], skip: usize) -> Vec<Line> {
    let mut lines = Vec::with_capacity(block.len() / 256 + 1);
    let mut start = 0;
    while start < block.len() {
        let end = memchr_newline(&block[start..]).map_or(block.len(), |i| start + i + 1);
        let from = if start == 0 { skip.min(end) } else { start };
        let (lead, record) = trim_record(&block[from..end]);
        lines.push(Line { start, end, record: from + lead..from + lead + record.len() });
        start = end;
    }
    lines
}

fn memchr_newline(bytes: &[u8]) -> Option<usize> {
    memchr::memchr(b'\n', bytes)
}

/// Scans JSON Lines in blocks: each block is hashed on one core while its records are checked
/// on the others ([`verdict`], rayon), then its records are admitted in order (line numbers,
/// duplicate ids, chunk cuts), which is cheap. The result is the same as a record-by-record
/// scan, at the speed of all cores.
fn scan_lines(
    path: &Path,
    mut reader: impl Read,
    bom: bool,
    builder: &mut ChunkBuilder<'_>,
    bad: &mut Vec<BadRecord>,
    hasher: &mut Sha256,
) -> Result<u64, InputError> {
    let mut buf: Vec<u8> = Vec::with_capacity(BLOCK);
    let mut base = 0u64;
    let mut number = 0u64;
    let mut want = BLOCK;
    let mut eof = false;
    let dup_check = builder.dup_check();
    loop {
        eof = fill(&mut reader, &mut buf, want, eof).map_err(|source| io_failure(path, source))?;
        if buf.is_empty() {
            return Ok(base);
        }
        // The block ends after its last newline; the rest waits for the next read. A line
        // longer than the block makes the block grow until the line fits, up to MAX_RECORD:
        // a longer line is streamed past, never held.
        let skip = if base == 0 && bom { BOM.len() } else { 0 };
        let cut = match memchr::memrchr(b'\n', &buf) {
            _ if eof => buf.len(),
            Some(i) => i + 1,
            None if buf.len() as u64 >= MAX_RECORD => {
                let long = skip_long_line(&mut reader, &mut buf, skip, hasher).map_err(|e| io_failure(path, e))?;
                number += 1;
                if let Some(record) = &long.record {
                    builder.admit_unchecked(base + record.start, record.end - record.start, number);
                }
                (base, eof) = (base + long.len, long.eof);
                continue;
            }
            None => {
                want = (buf.len() * 2).min(MAX_RECORD as usize);
                continue;
            }
        };
        want = BLOCK;
        let block = &buf[..cut];
        let options = builder.options;
        let ((), (lines, verdicts)) =
            rayon::join(|| hasher.update(block), || block_verdicts(block, skip, &options, dup_check));
        for (line, verdict) in lines.iter().zip(verdicts) {
            number += 1;
            let Some(verdict) = verdict else { continue };
            let record = &block[line.record.clone()];
            let offset = base + line.record.start as u64;
            if let Err(error) = builder.admit(record, verdict, offset, number)? {
                let error = if block[line.start..line.end].last() != Some(&b'\n') && error.contains("EOF") {
                    format!("truncated record at end of file ({error})")
                } else {
                    error
                };
                bad.push(BadRecord { object: builder.object, line: number, offset, error });
            }
        }
        buf.drain(..cut);
        base += cut as u64;
    }
}

/// A line longer than [`MAX_RECORD`], streamed past by [`skip_long_line`].
struct LongLine {
    /// Its bytes, its newline included.
    len: u64,
    /// Where its record is within it (trimmed), unless it is all whitespace.
    record: Option<Range<u64>>,
    /// Whether the input ended with it.
    eof: bool,
}

/// Streams past the line that starts `buf` (which holds no newline), hashing its bytes into
/// `hasher` and finding its record's ends, without ever holding more than a block of it; `skip`
/// leading bytes are not part of the record (a byte-order mark). `buf` keeps what follows the
/// line's newline.
fn skip_long_line(reader: &mut impl Read, buf: &mut Vec<u8>, skip: usize, hasher: &mut Sha256) -> io::Result<LongLine> {
    let (mut len, mut first, mut end, mut from) = (0u64, None::<u64>, 0u64, skip);
    loop {
        let newline = memchr::memchr(b'\n', &buf[from..]).map(|i| from + i);
        let text = &buf[from..newline.unwrap_or(buf.len())];
        if first.is_none() {
            first = text.iter().position(|b| !is_ws(*b)).map(|i| len + (from + i) as u64);
        }
        if let Some(i) = text.iter().rposition(|b| !is_ws(*b)) {
            end = len + (from + i + 1) as u64;
        }
        let consumed = newline.map_or(buf.len(), |i| i + 1);
        hasher.update(&buf[..consumed]);
        buf.drain(..consumed);
        len += consumed as u64;
        from = 0;
        let eof = newline.is_none() && fill(reader, buf, BLOCK, false)? && buf.is_empty();
        if newline.is_some() || eof {
            return Ok(LongLine { len, record: first.map(|start| start..end), eof });
        }
    }
}

/// Reads from `reader` until `buf` holds `want` bytes or the end is reached: whether it was
/// (`eof` already true reads nothing).
fn fill(reader: &mut impl Read, buf: &mut Vec<u8>, want: usize, mut eof: bool) -> io::Result<bool> {
    while buf.len() < want && !eof {
        let old = buf.len();
        buf.resize(want, 0);
        match reader.read(&mut buf[old..]) {
            Ok(n) => {
                buf.truncate(old + n);
                eof = n == 0;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => buf.truncate(old),
            Err(e) => {
                buf.truncate(old);
                return Err(e);
            }
        }
    }
    Ok(eof)
}

/// A block's lines, and the verdict on each one's record (none for a blank line), checked on
/// all cores.
fn block_verdicts(
    block: &[u8],
    skip: usize,
    options: &ScanOptions<'_>,
    dup_check: bool,
) -> (Vec<Line>, Vec<Option<Verdict>>) {
    use rayon::prelude::*;
    let lines = lines_of(block, skip);
    let verdicts = lines
        .par_iter()
        .with_min_len(256)
        .map(|line| {
            let record = &block[line.record.clone()];
            (!record.is_empty()).then(|| verdict(record, options, dup_check))
        })
        .collect();
    (lines, verdicts)
}

/// Trims whitespace around a line; returns the start of the record within it and the record.
fn trim_record(line: &[u8]) -> (usize, &[u8]) {
    let start = line.iter().position(|b| !is_ws(*b)).unwrap_or(line.len());
    let end = line.iter().rposition(|b| !is_ws(*b)).map_or(start, |e| e + 1);
    (start, &line[start..end])
}

/// A streaming walk over a JSON array's elements that keeps only a window of the file.
struct ArrayWalker<'p, R> {
    path: &'p Path,
    reader: R,
    buf: Vec<u8>,
    pos: usize,
    base: u64,
    line: u64,
    eof: bool,
}

impl<R: Read> ArrayWalker<'_, R> {
    fn syntax(&self, line: u64, message: impl Into<String>) -> InputError {
        InputError::Syntax { path: self.path.to_path_buf(), line, message: message.into() }
    }

    /// Reads more of the file; false at end of file.
    fn fill(&mut self, hasher: &mut Sha256) -> Result<bool, InputError> {
        self.fill_by(hasher, FILL)
    }

    /// Reads `want` more bytes of the file (fewer at its end); false at end of file.
    fn fill_by(&mut self, hasher: &mut Sha256, want: usize) -> Result<bool, InputError> {
        if self.eof {
            return Ok(false);
        }
        if self.pos > (1 << 20) {
            self.buf.drain(..self.pos);
            self.base += self.pos as u64;
            self.pos = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + want, 0);
        let mut n = 0;
        while n < want && !self.eof {
            match self.reader.read(&mut self.buf[old + n..]) {
                Ok(0) => self.eof = true,
                Ok(read) => n += read,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(io_failure(self.path, source)),
            }
        }
        self.buf.truncate(old + n);
        hasher.update(&self.buf[old..]);
        Ok(n > 0)
    }

    fn advance(&mut self, n: usize) {
        self.line += self.buf[self.pos..self.pos + n].iter().filter(|b| **b == b'\n').count() as u64;
        self.pos += n;
    }

    /// Skips whitespace; returns the next byte without consuming it, or None at end of file.
    fn peek(&mut self, hasher: &mut Sha256) -> Result<Option<u8>, InputError> {
        loop {
            while self.pos < self.buf.len() {
                let b = self.buf[self.pos];
                if !is_ws(b) {
                    return Ok(Some(b));
                }
                self.advance(1);
            }
            if !self.fill(hasher)? {
                return Ok(None);
            }
        }
    }

    /// Parses the element at the cursor: its (offset, line, bytes range in buf), or, past
    /// [`MAX_RECORD`], streams past it ([`Element::Long`]).
    fn element(&mut self, hasher: &mut Sha256) -> Result<Element, InputError> {
        loop {
            let slice = &self.buf[self.pos..];
            let mut stream = serde_json::Deserializer::from_slice(slice).into_iter::<IgnoredAny>();
            let parsed = stream.next();
            let end = stream.byte_offset();
            match parsed {
                // A value that ends exactly at the window's edge may continue (a number).
                Some(Ok(_)) if end < slice.len() || self.eof => {
                    let range = self.pos..self.pos + end;
                    return Ok(Element::Held(self.base + self.pos as u64, self.line, range));
                }
                Some(Err(e)) if !e.is_eof() => {
                    return Err(self.syntax(self.line + e.line() as u64 - 1, format!("invalid JSON in the array: {e}")));
                }
                _ if self.eof => {
                    return Err(self.syntax(self.line, "the array is truncated: the file ends inside an element"));
                }
                _ if slice.len() as u64 >= MAX_RECORD => return self.skip_element(hasher),
                _ => {
                    // Read as much again as the element holds so far (each try parses it from
                    // its start: doubling keeps that linear), without passing MAX_RECORD.
                    let held = slice.len();
                    self.fill_by(hasher, held.min(MAX_RECORD as usize - held).max(FILL))?;
                }
            }
        }
    }

    /// Streams past the element at the cursor, which is longer than [`MAX_RECORD`], by its
    /// structure alone (strings, brackets), holding no more of it than a window.
    fn skip_element(&mut self, hasher: &mut Sha256) -> Result<Element, InputError> {
        let (offset, line) = (self.base + self.pos as u64, self.line);
        let mut skipper = Skipper::default();
        let mut len = 0u64;
        loop {
            let end = skipper.feed(&self.buf[self.pos..]);
            let n = end.unwrap_or(self.buf.len() - self.pos);
            self.advance(n);
            len += n as u64;
            if end.is_some() {
                return Ok(Element::Long { offset, line, len });
            }
            if !self.fill(hasher)? {
                return Err(self.syntax(self.line, "the array is truncated: the file ends inside an element"));
            }
        }
    }
}

/// How much the array walker reads at a time.
const FILL: usize = 256 << 10;

/// An element of a JSON array, from [`ArrayWalker::element`].
enum Element {
    /// Held in the walker's window: (offset, line, its range in the window).
    Held(u64, u64, std::ops::Range<usize>),
    /// Longer than [`MAX_RECORD`]: streamed past (the walker is after it), unchecked.
    Long { offset: u64, line: u64, len: u64 },
}

/// Finds where a JSON value ends by its structure alone (strings and brackets), fed a piece at
/// a time: for an array element too long to be held and parsed.
#[derive(Default)]
struct Skipper {
    depth: u64,
    in_string: bool,
    escaped: bool,
}

impl Skipper {
    /// Feeds the next piece of the value: where in it the value ends (exclusive), if it does.
    fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        for (i, &b) in bytes.iter().enumerate() {
            if self.in_string {
                match b {
                    _ if self.escaped => self.escaped = false,
                    b'\\' => self.escaped = true,
                    b'"' => {
                        self.in_string = false;
                        if self.depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' if self.depth == 0 => return Some(i),
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        return Some(i + 1);
                    }
                }
                b',' if self.depth == 0 => return Some(i),
                _ if self.depth == 0 && is_ws(b) => return Some(i),
                _ => {}
            }
        }
        None
    }
}

fn scan_array(
    path: &Path,
    reader: impl Read,
    bom: bool,
    builder: &mut ChunkBuilder<'_>,
    bad: &mut Vec<BadRecord>,
    hasher: &mut Sha256,
) -> Result<u64, InputError> {
    let mut walker = ArrayWalker { path, reader, buf: Vec::new(), pos: 0, base: 0, line: 1, eof: false };
    walker.fill(hasher)?;
    if bom {
        walker.pos = BOM.len();
    }
    if walker.peek(hasher)? != Some(b'[') {
        return Err(walker.syntax(walker.line, "expected `[` to open the array"));
    }
    walker.advance(1);
    if walker.peek(hasher)? == Some(b']') {
        walker.advance(1);
    } else {
        loop {
            walker.peek(hasher)?;
            match walker.element(hasher)? {
                Element::Held(offset, line, range) => {
                    let len = range.len();
                    let record = &walker.buf[range];
                    let verdict = verdict(record, &builder.options, builder.dup_check());
                    if let Err(error) = builder.admit(record, verdict, offset, line)? {
                        bad.push(BadRecord { object: builder.object, line, offset, error });
                    }
                    walker.advance(len);
                }
                Element::Long { offset, line, len } => builder.admit_unchecked(offset, len, line),
            }
            match walker.peek(hasher)? {
                Some(b',') => walker.advance(1),
                Some(b']') => {
                    walker.advance(1);
                    break;
                }
                Some(other) => {
                    return Err(walker.syntax(
                        walker.line,
                        format!("expected `,` or `]` after an element, found `{}`", other as char),
                    ));
                }
                None => return Err(walker.syntax(walker.line, "the array is truncated: no closing `]`")),
            }
        }
    }
    match walker.peek(hasher)? {
        None => Ok(walker.base + walker.buf.len() as u64),
        Some(_) => Err(walker.syntax(walker.line, "unexpected data after the closing `]`")),
    }
}

/// Splits an in-memory run of array elements (`a , b , c`) into element ranges.
fn split_array_elements(bytes: &[u8]) -> Result<Vec<std::ops::Range<usize>>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        while pos < bytes.len() && is_ws(bytes[pos]) {
            pos += 1;
        }
        if pos >= bytes.len() {
            return Ok(out);
        }
        let mut stream = serde_json::Deserializer::from_slice(&bytes[pos..]).into_iter::<IgnoredAny>();
        match stream.next() {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.to_string()),
            None => return Ok(out),
        }
        let end = pos + stream.byte_offset();
        out.push(pos..end);
        pos = end;
        while pos < bytes.len() && is_ws(bytes[pos]) {
            pos += 1;
        }
        if pos < bytes.len() {
            if bytes[pos] != b',' {
                return Err(format!("expected `,` between elements at byte {pos}"));
            }
            pos += 1;
        }
    }
}

/// Re-reads chunks from the input file by their byte ranges.
#[derive(Debug)]
pub struct ChunkReader {
    source: Arc<dyn ObjectSource>,
    /// Each object's name (for messages) and layout.
    parts: Vec<(PathBuf, InputFormat)>,
    /// Each object's length in bytes (as scanned).
    lens: Vec<u64>,
    /// (object, offset) of bad records, sorted: skipped when a chunk is read.
    bad_offsets: Vec<(u32, u64)>,
    /// The last window read ahead from a source whose reads wait on the network.
    ahead: std::sync::Mutex<ReadAhead>,
}

/// Bytes read ahead of the chunk asked for, when chunks are read in order from a store where
/// each read is a round trip (a ranged GET): without it the fetcher's one loop pays one round
/// trip per chunk (about 15 ms to a local S3 server, 60 chunks/s, measured in BENCHMARKS.md).
/// With it, one read of [`READ_AHEAD`] bytes serves the next hundred chunks. The bytes come
/// from the version the read checked (its ETag), so a run still never mixes two versions; a
/// change is noticed at the next read from the store.
#[derive(Debug, Default)]
struct ReadAhead {
    object: usize,
    start: u64,
    bytes: Vec<u8>,
    /// Where the last chunk read ended: a read starting just after it is sequential.
    next: Option<(usize, u64)>,
}

/// How much a sequential read from a remote store fetches at once (bounded memory: one window).
pub const READ_AHEAD: u64 = 4 << 20;

impl ReadAhead {
    fn get(&self, object: usize, range: &std::ops::Range<u64>) -> Option<Vec<u8>> {
        let end = self.start + self.bytes.len() as u64;
        (self.object == object && range.start >= self.start && range.end <= end)
            .then(|| self.bytes[(range.start - self.start) as usize..(range.end - self.start) as usize].to_vec())
    }
}

impl ChunkReader {
    /// A reader of the chunks of the input an index was made from (from its source).
    pub fn open(index: &InputIndex) -> Result<Self, InputError> {
        let mut bad_offsets: Vec<(u32, u64)> = index.bad.iter().map(|b| (b.object, b.offset)).collect();
        bad_offsets.sort_unstable();
        let parts = index.parts.iter().map(|p| (PathBuf::from(&p.name), p.format)).collect();
        let lens = index.parts.iter().map(|p| p.len).collect();
        Ok(ChunkReader {
            source: Arc::clone(&index.source),
            parts,
            lens,
            bad_offsets,
            ahead: std::sync::Mutex::new(ReadAhead::default()),
        })
    }

    /// The chunk's valid records, joined with commas (the body of a JSON array, as the fetcher
    /// forwards it).
    pub fn read(&self, span: &ChunkSpan) -> Result<Vec<u8>, InputError> {
        Ok(self.read_with_lines(span)?.0)
    }

    /// [`ChunkReader::read`], and each record's input line when they are not consecutive from
    /// the chunk's first line (blank lines, skipped records, a pretty-printed array).
    pub fn read_with_lines(&self, span: &ChunkSpan) -> Result<(Vec<u8>, Option<Vec<u64>>), InputError> {
        let raw = self.raw(span)?;
        self.with_lines(span, &raw)
    }

    /// [`ChunkReader::read_with_lines`] for async code (the fetcher's server task): a read that
    /// may wait on the network ([`ObjectSource::read_may_wait`]) runs on the blocking pool, so
    /// that it never holds the caller's runtime thread; a local `pread` runs in place.
    pub async fn read_with_lines_async(&self, span: &ChunkSpan) -> Result<(Vec<u8>, Option<Vec<u64>>), InputError> {
        self.readable(span)?;
        let raw = if self.source.read_may_wait(span.object as usize) {
            self.read_ahead(span).await?
        } else {
            self.raw(span)?
        };
        self.with_lines(span, &raw)
    }

    /// The chunk's bytes from the read-ahead window, or read from the source on the blocking
    /// pool: a whole window when the read follows the last one (chunks handed out in order),
    /// else just the chunk (a re-lease, out of order).
    async fn read_ahead(&self, span: &ChunkSpan) -> Result<Vec<u8>, InputError> {
        let (object, range) = (span.object as usize, span.offset..span.offset + span.len);
        let (cached, sequential) = {
            let ahead = crate::sync::lock(&self.ahead, "read-ahead window");
            // Chunks follow each other with a newline (or blank lines, skipped records) between,
            // and the first chunk of an object follows the last of the one before.
            (
                ahead.get(object, &range),
                ahead.next.is_none_or(|(o, end)| {
                    (o == object && range.start >= end && range.start - end < READ_AHEAD)
                        || (o + 1 == object && range.start < READ_AHEAD)
                }),
            )
        };
        let len = self.lens.get(object).copied().unwrap_or(range.end);
        let want =
            if sequential { range.start..len.min(range.start + READ_AHEAD).max(range.end) } else { range.clone() };
        let raw = match cached {
            Some(raw) => raw,
            None => {
                let source = Arc::clone(&self.source);
                let fetch = want.clone();
                let bytes = tokio::task::spawn_blocking(move || source.read_range(object, fetch))
                    .await
                    .map_err(|e| ReadError {
                        kind: ReadErrorKind::Other,
                        message: format!("the read of a chunk of {} stopped: {e}", self.source.name(object)),
                    })
                    .and_then(|read| read)
                    .map_err(InputError::Read)?;
                // Both start at the chunk: its bytes are the window's first (all of them when a
                // short read means the object changed, which the caller then reports).
                let raw = bytes[..bytes.len().min(span.len as usize)].to_vec();
                if want != range {
                    *crate::sync::lock(&self.ahead, "read-ahead window") =
                        ReadAhead { object, start: want.start, bytes, next: None };
                }
                raw
            }
        };
        crate::sync::lock(&self.ahead, "read-ahead window").next = Some((object, range.end));
        Ok(raw)
    }

    fn with_lines(&self, span: &ChunkSpan, raw: &[u8]) -> Result<(Vec<u8>, Option<Vec<u64>>), InputError> {
        let mut out = Vec::with_capacity(span.len as usize + 2);
        let lines = self.records_into(span, raw, &mut out)?;
        let consecutive = lines.iter().enumerate().all(|(i, line)| *line == span.first_line + i as u64);
        Ok((out, (!consecutive).then_some(lines)))
    }

    /// The chunk's valid records as one JSON array, for code that parses them.
    pub fn read_array(&self, span: &ChunkSpan) -> Result<Vec<u8>, InputError> {
        let raw = self.raw(span)?;
        let mut out = Vec::with_capacity(span.len as usize + 2);
        out.push(b'[');
        self.records_into(span, &raw, &mut out)?;
        out.push(b']');
        Ok(out)
    }

    /// The name and layout of the chunk's object.
    fn part(&self, span: &ChunkSpan) -> Result<&(PathBuf, InputFormat), InputError> {
        self.parts.get(span.object as usize).ok_or_else(|| {
            InputError::Read(ReadError {
                kind: ReadErrorKind::Other,
                message: format!("chunk of object #{} asked of an input of {} objects", span.object, self.parts.len()),
            })
        })
    }

    /// The name and layout of the chunk's object, if the chunk may be read at all: one whose
    /// records are over [`MAX_RECORD`] is refused before a byte of it is read.
    fn readable(&self, span: &ChunkSpan) -> Result<&(PathBuf, InputFormat), InputError> {
        let part = self.part(span)?;
        if span.bytes > MAX_RECORD {
            return Err(InputError::TooLarge {
                object: part.0.display().to_string(),
                line: span.first_line,
                bytes: span.bytes,
                max: MAX_RECORD,
            });
        }
        Ok(part)
    }

    /// The chunk's bytes: one ranged read of its object.
    fn raw(&self, span: &ChunkSpan) -> Result<Vec<u8>, InputError> {
        self.readable(span)?;
        self.source.read_range(span.object as usize, span.offset..span.offset + span.len).map_err(InputError::Read)
    }

    /// Appends the records of the chunk's bytes `raw`, comma-separated, to `out`; returns each
    /// record's line. Bytes other than those scanned (a record count, UTF-8, or the checksum
    /// that differs) mean the object changed: [`ReadErrorKind::Changed`], naming it.
    fn records_into(&self, span: &ChunkSpan, raw: &[u8], out: &mut Vec<u8>) -> Result<Vec<u64>, InputError> {
        let (path, format) = self.part(span)?;
        let changed = |detail: String| changed_since_scan(path, span, &detail);
        if raw.len() as u64 != span.len {
            return Err(changed(format!("{} bytes read of {}", raw.len(), span.len)));
        }
        let ranges = record_ranges(*format, raw, span.objects as usize).map_err(changed)?;
        let mut checksum = crc32fast::Hasher::new();
        let mut lines = Vec::with_capacity(span.objects as usize);
        let (mut line, mut counted) = (span.first_line, 0usize);
        for range in ranges {
            let offset = span.offset + range.start as u64;
            line += raw[counted..range.start].iter().filter(|b| **b == b'\n').count() as u64;
            counted = range.start;
            if self.bad_offsets.binary_search(&(span.object, offset)).is_ok() {
                continue;
            }
            lines.push(line);
            // The scan checked every byte; a record that is no longer UTF-8 was rewritten since,
            // and must not reach a mapper (it could not decode the chunk at all).
            let record = &raw[range];
            if let Err(e) = std::str::from_utf8(record) {
                return Err(changed(format!("invalid UTF-8 at byte {}", offset + e.valid_up_to() as u64)));
            }
            add_record(&mut checksum, line, record.len() as u64, crc32fast::hash(record));
            if lines.len() > 1 {
                out.push(b',');
            }
            out.extend_from_slice(record);
        }
        if lines.len() != span.objects as usize {
            return Err(changed(format!("expected {} records in this chunk, found {}", span.objects, lines.len())));
        }
        if checksum.finalize() != span.checksum {
            return Err(changed("its records differ from their checksum at the scan: edited in place".into()));
        }
        Ok(lines)
    }
}

/// The error for a chunk whose bytes are not those scanned: its object changed (even if it
/// kept its size and modification time, as `rsync --inplace` and `cp -p` leave it).
fn changed_since_scan(path: &Path, span: &ChunkSpan, detail: &str) -> InputError {
    InputError::Read(ReadError {
        kind: ReadErrorKind::Changed,
        message: format!(
            "input object {} changed since it was scanned ({detail}; the chunk from line {}): a run never mixes two versions of its input; restore the object, or start a new run on the new version",
            path.display(),
            span.first_line
        ),
    })
}

/// Where the records of a chunk's bytes `raw` are: its non-blank lines (trimmed), or the
/// elements of a piece of a JSON array.
fn record_ranges(format: InputFormat, raw: &[u8], expected: usize) -> Result<Vec<std::ops::Range<usize>>, String> {
    match format {
        InputFormat::JsonLines => {
            let mut ranges = Vec::with_capacity(expected);
            let mut start = 0;
            for line in raw.split(|b| *b == b'\n') {
                let (lead, record) = trim_record(line);
                if !record.is_empty() {
                    ranges.push(start + lead..start + lead + record.len());
                }
                start += line.len() + 1;
            }
            Ok(ranges)
        }
        InputFormat::JsonArray => split_array_elements(raw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// The users schema, as the digest job checks it (the real one lives in the transform crate).
    fn users_check(record: &[u8]) -> Result<(), String> {
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct User {
            uuid: String,
            #[serde(rename = "fn")]
            first: String,
            #[serde(rename = "ln")]
            last: String,
            friends: Vec<String>,
        }
        let user: User = serde_json::from_slice(record).map_err(|e| e.to_string())?;
        uuid::Uuid::try_parse(&user.uuid).map(|_| ()).map_err(|e| format!("field `uuid` is not a UUID: {e}"))
    }

    fn uuid_of(record: &[u8]) -> Option<String> {
        #[derive(serde::Deserialize)]
        struct Id {
            uuid: String,
        }
        serde_json::from_slice::<Id>(record).ok().map(|i| i.uuid)
    }

    const USERS: ScanOptions<'static> =
        ScanOptions { check: Some(&users_check), id: Some(&uuid_of), job: "users", dup_memory: 0, spill_dir: None };

    fn scan(path: &Path, chunk_size: u32) -> Result<InputIndex, InputError> {
        super::scan(path, chunk_size, &USERS)
    }

    fn user(i: u32) -> String {
        format!(r#"{{"uuid":"00000000-0000-4000-8000-{i:012}","fn":"F{i}","ln":"L{i}","friends":[]}}"#)
    }

    fn write(content: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(content).expect("write");
        file
    }

    fn records(index: &InputIndex) -> Vec<String> {
        let reader = ChunkReader::open(index).expect("open");
        index
            .chunks
            .iter()
            .flat_map(|span| {
                let wrapped = reader.read_array(span).expect("read");
                let array: Vec<&serde_json::value::RawValue> = serde_json::from_slice(&wrapped).expect("valid array");
                array.into_iter().map(|r| r.get().to_string()).collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn json_lines_are_cut_into_chunks_with_a_short_last_one() {
        let text: String = (0..25).map(|i| user(i) + "\n").collect();
        let file = write(text.as_bytes());
        let index = scan(file.path(), 10).expect("scan");
        assert_eq!(index.format, InputFormat::JsonLines);
        assert_eq!(index.objects, 25);
        assert_eq!(index.chunks.iter().map(|c| c.objects).collect::<Vec<_>>(), vec![10, 10, 5]);
        assert_eq!(index.chunks[1].first_line, 11);
        assert_eq!(records(&index), (0..25).map(user).collect::<Vec<_>>());
    }

    #[test]
    fn a_json_array_gives_the_same_records_and_lines() {
        let text = format!("[\n  {},\n  {} ,\n{}\n]\n", user(0), user(1), user(2));
        let file = write(text.as_bytes());
        let index = scan(file.path(), 2).expect("scan");
        assert_eq!(index.format, InputFormat::JsonArray);
        assert_eq!(index.objects, 3);
        assert_eq!(index.chunks[1].first_line, 4);
        assert_eq!(records(&index), (0..3).map(user).collect::<Vec<_>>());
    }

    #[test]
    fn bad_lines_are_reported_by_line_and_skipped_when_reading() {
        let text = format!("{}\nnot json\n{}\n{{\"uuid\":1}}\n\n{}\n{{\"uuid\":", user(0), user(1), user(2));
        let file = write(text.as_bytes());
        let index = scan(file.path(), 2).expect("scan");
        assert_eq!(index.objects, 3);
        let lines: Vec<u64> = index.bad.iter().map(|b| b.line).collect();
        assert_eq!(lines, vec![2, 4, 7]);
        assert!(index.bad[2].error.contains("truncated"), "{}", index.bad[2].error);
        assert_eq!(records(&index), (0..3).map(user).collect::<Vec<_>>());
    }

    /// Chunks, bad records and run id: what a scan decides.
    fn decided(index: &InputIndex) -> (Vec<ChunkSpan>, Vec<BadRecord>, u64, String) {
        (index.chunks.clone(), index.bad.clone(), index.objects, index.run_id.clone())
    }

    #[test]
    fn a_duplicate_check_that_spills_to_disk_cuts_the_same_chunks_as_one_in_memory() {
        // Duplicates before and after the point where a 3-id budget spills, the array layout too.
        let order = [0u32, 1, 0, 2, 3, 4, 1, 5, 6, 4, 7, 8, 9, 0, 10];
        let lines: Vec<String> = order.iter().map(|i| user(*i)).collect();
        let jsonl = write(format!("{}\n", lines.join("\n")).as_bytes());
        let array = write(format!("[\n{}\n]\n", lines.join(",\n")).as_bytes());
        let spill = tempfile::tempdir().expect("spill dir");
        for file in [&jsonl, &array] {
            let in_memory = scan(file.path(), 4).expect("scan");
            let small = ScanOptions { dup_memory: 400, spill_dir: Some(spill.path()), ..USERS };
            let spilled = super::scan(file.path(), 4, &small).expect("scan with a spill");
            assert_eq!(decided(&spilled), decided(&in_memory));
            let duplicates: Vec<u64> = in_memory.bad.iter().map(|b| b.line).collect();
            let first = if file.path() == jsonl.path() { 1 } else { 2 };
            assert_eq!(duplicates, [3, 7, 10, 14].map(|l| l + first - 1), "{:?}", in_memory.bad);
            assert!(spilled.bad.iter().all(|b| b.error.contains("duplicate id")), "{:?}", spilled.bad);
            assert_eq!(records(&spilled).len(), 11);
        }
        assert_eq!(std::fs::read_dir(spill.path()).expect("list").count(), 0, "the spill files are removed");
    }

    #[test]
    fn records_across_scan_blocks_and_a_line_longer_than_a_block_are_read_whole() {
        // More than two blocks, with a record longer than one block in the middle.
        let long = format!(
            r#"{{"uuid":"00000000-0000-4000-8000-999999999999","fn":"{}","ln":"L","friends":[]}}"#,
            "x".repeat(BLOCK + 1000)
        );
        let mut text = String::new();
        let mut n = 0u32;
        while text.len() < BLOCK / 2 {
            text.push_str(&user(n));
            text.push('\n');
            n += 1;
        }
        text.push_str(&long);
        text.push_str("\r\n\n");
        while text.len() < 2 * BLOCK + BLOCK / 2 {
            text.push_str(&user(n));
            text.push('\n');
            n += 1;
        }
        text.push_str(&user(n)); // no final newline
        let file = write(text.as_bytes());
        let index = scan(file.path(), 1000).expect("scan");
        assert!(index.bad.is_empty(), "{:?}", index.bad.first());
        assert_eq!(index.objects, u64::from(n) + 2);
        let all = records(&index);
        assert_eq!(all.len() as u64, index.objects);
        assert_eq!(all.iter().find(|r| r.len() > BLOCK).map(String::len), Some(long.len()));
        assert_eq!(all.last(), Some(&user(n)));
        // Line numbers count the blank line after the long record.
        let last = index.chunks.last().expect("a chunk");
        let lines_before: u64 = text[..last.offset as usize].matches('\n').count() as u64;
        assert_eq!(last.first_line, lines_before + 1);
        let sha = Sha256::digest(text.as_bytes());
        assert_eq!(index.content, sha.iter().map(|b| format!("{b:02x}")).collect::<String>());
    }

    #[test]
    fn duplicate_uuids_invalid_utf8_deep_nesting_and_huge_numbers_are_bad_records_by_line() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let mut text = Vec::new();
        text.extend_from_slice(format!("{}\n", user(0)).as_bytes());
        text.extend_from_slice(format!("{}\n", user(0)).as_bytes()); // line 2: duplicate
        text.extend_from_slice(
            b"{\"uuid\":\"00000000-0000-4000-8000-000000000009\",\"fn\":\"\xff\xfe\",\"ln\":\"B\",\"friends\":[]}\n",
        );
        text.extend_from_slice(format!("{{\"uuid\":\"00000000-0000-4000-8000-000000000008\",\"fn\":\"A\",\"ln\":\"B\",\"friends\":[],\"x\":{deep}}}\n").as_bytes());
        text.extend_from_slice(b"{\"uuid\":\"00000000-0000-4000-8000-000000000007\",\"fn\":\"A\",\"ln\":\"B\",\"friends\":[],\"n\":123456789012345678901234567890}\n");
        text.extend_from_slice(
            b"{\"uuid\":\"00000000-0000-4000-8000-000000000006\",\"fn\":\"A\",\"ln\":7,\"friends\":[]}\n",
        );
        text.extend_from_slice(format!("{}\n", user(1)).as_bytes());
        let file = write(&text);
        let index = scan(file.path(), 100).expect("scan");
        let lines: Vec<u64> = index.bad.iter().map(|b| b.line).collect();
        assert_eq!(lines, vec![2, 3, 6], "{:?}", index.bad);
        assert!(
            index.bad[0].error.contains("duplicate id") && index.bad[0].error.contains("line 1"),
            "{:?}",
            index.bad[0]
        );
        assert!(index.bad[1].error.contains("invalid UTF-8"), "{:?}", index.bad[1]);
        // Nesting 100 000 deep and a number past 64 bits, both in a field the transform ignores:
        // valid JSON, skipped without recursion (no stack overflow), so the records are kept.
        assert_eq!(index.objects, 4, "{:?}", index.bad);
        assert_eq!(records(&index).len(), 4);
    }

    /// Objects in memory, as a store's would be: many objects, each named.
    #[derive(Debug)]
    struct Objects(Vec<(String, Vec<u8>)>);

    impl ObjectSource for Objects {
        fn count(&self) -> usize {
            self.0.len()
        }

        fn name(&self, object: usize) -> String {
            self.0[object].0.clone()
        }

        fn identity(&self, object: usize) -> ObjectIdentity {
            ObjectIdentity { key: self.0[object].0.clone(), size: self.0[object].1.len() as u64, version: None }
        }

        fn is_single_file(&self) -> bool {
            false
        }

        fn open(&self, object: usize) -> Result<Box<dyn Read + Send + '_>, ReadError> {
            Ok(Box::new(&self.0[object].1[..]))
        }

        fn read_range(&self, object: usize, range: Range<u64>) -> Result<Vec<u8>, ReadError> {
            Ok(self.0[object].1[range.start as usize..range.end as usize].to_vec())
        }
    }

    #[test]
    fn a_duplicate_id_in_an_input_of_many_objects_names_the_object_of_its_first_occurrence() {
        let lines = |ids: &[u32]| ids.iter().map(|i| user(*i) + "\n").collect::<String>().into_bytes();
        let source = Arc::new(Objects(vec![
            ("s3://b/part-0.jsonl".into(), lines(&(0..10).collect::<Vec<_>>())),
            ("s3://b/part-1.jsonl".into(), Vec::new()),
            ("s3://b/part-2.jsonl".into(), lines(&[10, 3, 10])),
        ]));
        let spill = tempfile::tempdir().expect("temp dir");
        // In memory, and past a budget of 7 ids (found after the scan, then scanned again).
        for options in [USERS, ScanOptions { dup_memory: 400, spill_dir: Some(spill.path()), ..USERS }] {
            let index = scan_source(source.clone(), "s3://b/", 100, &options).expect("scan");
            let bad: Vec<(u32, u64, &str)> = index.bad.iter().map(|b| (b.object, b.line, b.error.as_str())).collect();
            let id = |i: u32| format!("00000000-0000-4000-8000-{i:012}");
            assert_eq!(
                bad,
                [
                    (2, 2, format!("duplicate id {} (first at s3://b/part-0.jsonl line 4)", id(3)).as_str()),
                    (2, 3, format!("duplicate id {} (first at s3://b/part-2.jsonl line 1)", id(10)).as_str()),
                ],
                "dup_memory {}",
                options.dup_memory
            );
            assert_eq!(index.locate(&index.bad[0]), "s3://b/part-2.jsonl line 2");
            assert_eq!(index.objects, 11);
        }
    }

    #[test]
    fn a_raw_invalid_byte_in_a_field_no_transform_reads_is_a_bad_record() {
        let mut text: Vec<u8> = (0..299).flat_map(|i| (user(i) + "\n").into_bytes()).collect();
        text.extend_from_slice(b"{\"uuid\":\"0badc0de-0000-4000-8000-000000000001\",\"fn\":\"P\",\"ln\":\"Q\",\"friends\":[],\"note\":\"\xff\"}\n");
        for format in ["jsonl", "array"] {
            let content = if format == "array" {
                let lines: Vec<&[u8]> = text.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
                [b"[".to_vec(), lines.join(&b",\n"[..]), b"]".to_vec()].concat()
            } else {
                text.clone()
            };
            let file = write(&content);
            let index = scan(file.path(), 100).expect("scan");
            assert_eq!(index.objects, 299, "{format}");
            assert_eq!(index.bad.len(), 1, "{format}: {:?}", index.bad);
            assert_eq!(index.bad[0].line, 300, "{format}");
            assert!(index.bad[0].error.contains("invalid UTF-8"), "{format}: {}", index.bad[0].error);
            assert_eq!(records(&index).len(), 299, "{format}");
        }
    }

    #[test]
    fn a_chunk_rewritten_with_invalid_bytes_after_the_scan_is_refused_when_read() {
        let text: String = (0..3).map(|i| user(i) + "\n").collect();
        let file = write(text.as_bytes());
        let index = scan(file.path(), 100).expect("scan");
        let mut bytes = text.into_bytes();
        let at = bytes.iter().position(|b| *b == b'F').expect("a first name");
        bytes[at] = 0xFF;
        std::fs::write(file.path(), &bytes).expect("rewrite");
        let err = ChunkReader::open(&index).expect("open").read(&index.chunks[0]).unwrap_err().to_string();
        assert!(err.contains("changed since it was scanned") && err.contains("UTF-8"), "{err}");
    }

    #[test]
    fn a_chunk_edited_in_place_with_its_size_kept_is_refused_as_changed_by_its_checksum() {
        let text: String = (0..30).map(|i| user(i) + "\n").collect();
        let file = write(text.as_bytes());
        let index = scan(file.path(), 10).expect("scan");
        // The same bytes but one letter of a first name in chunk 1: valid JSON, valid UTF-8, the
        // same records at the same offsets, as `rsync --inplace` leaves a small fix.
        let mut bytes = text.into_bytes();
        let at = index.chunks[1].offset as usize + 40;
        let at = at + bytes[at..].iter().position(|b| b.is_ascii_lowercase()).expect("a letter");
        bytes[at] = if bytes[at] == b'q' { b'r' } else { b'q' };
        std::fs::write(file.path(), &bytes).expect("edit");
        let reader = ChunkReader::open(&index).expect("open");
        assert!(reader.read(&index.chunks[0]).is_ok() && reader.read(&index.chunks[2]).is_ok());
        match reader.read(&index.chunks[1]) {
            Err(InputError::Read(e)) => {
                assert_eq!(e.kind, ReadErrorKind::Changed);
                let name = file.path().display().to_string();
                assert!(e.message.contains(&format!("input object {name} changed since it was scanned")), "{e}");
                assert!(e.message.contains("checksum") && e.message.contains("line 11"), "{e}");
            }
            other => panic!("expected a changed object, got {other:?}"),
        }
    }

    #[test]
    fn a_record_longer_than_max_record_is_streamed_past_and_its_chunk_is_never_read() {
        let huge = format!("{{\"a\":\"{}\"}}", "x".repeat(MAX_RECORD as usize + 10));
        let small = |i: u32| format!("{{\"n\":{i}}}");
        let lines = [small(0), small(1), format!("  {huge}  "), small(2), small(3), small(4)];
        let jsonl = format!("{}\n", lines.join("\n"));
        let array = format!("[{}]", lines.join(",\n"));
        for text in [jsonl, array] {
            let file = write(text.as_bytes());
            let index = super::scan(file.path(), 2, &ScanOptions::default()).expect("scan");
            assert_eq!(index.objects, 6, "the long record counts");
            assert!(index.bad.is_empty(), "{:?}", index.bad);
            let sha = Sha256::digest(text.as_bytes());
            assert_eq!(index.content, sha.iter().map(|b| format!("{b:02x}")).collect::<String>(), "every byte hashed");
            let long = index.chunks[1];
            assert_eq!((long.first_line, long.objects, long.bytes), (3, 2, huge.len() as u64 + small(2).len() as u64));
            let reader = ChunkReader::open(&index).expect("open");
            match reader.read(&long) {
                Err(e @ InputError::TooLarge { .. }) => assert!(e.to_string().contains("line 3"), "{e}"),
                other => panic!("the long chunk was read: {:?}", other.map(|b| b.len())),
            }
            let after = reader.read_with_lines(&index.chunks[2]).expect("the next chunk reads");
            assert_eq!(after.0, format!("{},{}", small(3), small(4)).into_bytes());
            assert_eq!(after.1.as_deref().map_or(5, |lines| lines[0]), 5, "lines counted past the long one");
        }
    }

    #[test]
    fn the_skipper_finds_a_values_end_by_its_strings_and_brackets_alone() {
        let feed = |pieces: &[&str]| {
            let mut skipper = Skipper::default();
            let mut seen = 0;
            for piece in pieces {
                if let Some(end) = skipper.feed(piece.as_bytes()) {
                    return Some(seen + end);
                }
                seen += piece.len();
            }
            None
        };
        assert_eq!(feed(&[r#"{"a":"}]\"{","#, r#""b":[1,{"c":2}]},{"#]), Some(29));
        assert_eq!(feed(&[r#""str\"ing", 1"#]), Some(10));
        assert_eq!(feed(&["12345 ,"]), Some(5));
        assert_eq!(feed(&["[[1,2]", ",3"]), None, "not closed yet");
    }

    #[test]
    fn running_out_of_file_descriptors_is_transient() {
        let shortage = io::Error::from_raw_os_error(libc::EMFILE);
        assert!(is_fd_shortage(&shortage) && is_fd_shortage(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert_eq!(ReadErrorKind::of_io(&shortage), ReadErrorKind::Unavailable);
        assert_eq!(ReadErrorKind::of_io(&io::ErrorKind::UnexpectedEof.into()), ReadErrorKind::Other);
    }

    #[test]
    fn records_come_with_their_lines_when_they_are_not_consecutive() {
        let text = format!("{}\n\n{}\nnot json\n{}\n", user(0), user(1), user(2));
        let file = write(text.as_bytes());
        let index = scan(file.path(), 10).expect("scan");
        let reader = ChunkReader::open(&index).expect("open");
        let (_, lines) = reader.read_with_lines(&index.chunks[0]).expect("read");
        assert_eq!(lines, Some(vec![1, 3, 5]));
        let dense = write(format!("{}\n{}\n", user(0), user(1)).as_bytes());
        let index = scan(dense.path(), 10).expect("scan");
        assert_eq!(ChunkReader::open(&index).expect("open").read_with_lines(&index.chunks[0]).expect("read").1, None);
        let array = write(format!("[\n  {},\n\n  {}\n]", user(0), user(1)).as_bytes());
        let index = scan(array.path(), 10).expect("scan");
        let lines = ChunkReader::open(&index).expect("open").read_with_lines(&index.chunks[0]).expect("read").1;
        assert_eq!(lines, Some(vec![2, 4]));
    }

    #[test]
    fn a_bom_is_skipped() {
        let text = format!("\u{feff}{}\n{}\n", user(0), user(1));
        let file = write(text.as_bytes());
        let index = scan(file.path(), 100).expect("scan");
        assert!(index.bom);
        assert!(index.bad.is_empty(), "{:?}", index.bad);
        assert_eq!(records(&index), vec![user(0), user(1)]);
    }

    #[test]
    fn empty_files_are_refused_by_name() {
        let file = write(b"\n  \n");
        let err = scan(file.path(), 100).unwrap_err();
        assert!(matches!(err, InputError::Empty(_)));
        assert!(err.to_string().contains(&file.path().display().to_string()));
    }

    #[test]
    fn a_broken_array_names_the_line() {
        let text = format!("[\n{},\n{{\"uuid\": nope}}\n]", user(0));
        let file = write(text.as_bytes());
        match scan(file.path(), 100).unwrap_err() {
            InputError::Syntax { line, .. } => assert_eq!(line, 3),
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn run_id_depends_on_content_chunk_size_and_job() {
        let a = write(format!("{}\n", user(0)).as_bytes());
        let b = write(format!("{}\n", user(1)).as_bytes());
        let id = |f: &tempfile::NamedTempFile, size| scan(f.path(), size).expect("scan").run_id;
        assert_eq!(id(&a, 100), id(&a, 100));
        assert_ne!(id(&a, 100), id(&b, 100));
        assert_ne!(id(&a, 100), id(&a, 50));
        let other_job = ScanOptions { job: "another job", ..USERS };
        assert_ne!(super::scan(a.path(), 100, &other_job).expect("scan").run_id, id(&a, 100));
        assert!(crate::protocol::is_valid_run_id(&id(&a, 100)));
    }

    #[test]
    fn any_json_object_is_a_record_without_a_job_check() {
        let file = write(b"{\"a\":1}\n{\"b\":[true,null]}\n[1]\n\"text\"\n{\"a\":1}\n");
        let index = super::scan(file.path(), 10, &ScanOptions::default()).expect("scan");
        assert_eq!(index.objects, 3, "{:?}", index.bad);
        let lines: Vec<u64> = index.bad.iter().map(|b| b.line).collect();
        assert_eq!(lines, vec![3, 4]);
        assert!(index.bad[0].error.contains("expected a JSON object"), "{:?}", index.bad);
    }

    /// [`Objects`] as a remote store sees them: every read waits on the network, and is counted.
    #[derive(Debug)]
    struct Remote(Objects, std::sync::atomic::AtomicUsize);

    impl ObjectSource for Remote {
        fn count(&self) -> usize {
            self.0.count()
        }

        fn name(&self, object: usize) -> String {
            self.0.name(object)
        }

        fn identity(&self, object: usize) -> ObjectIdentity {
            self.0.identity(object)
        }

        fn is_single_file(&self) -> bool {
            false
        }

        fn open(&self, object: usize) -> Result<Box<dyn Read + Send + '_>, ReadError> {
            self.0.open(object)
        }

        fn read_range(&self, object: usize, range: Range<u64>) -> Result<Vec<u8>, ReadError> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.0.read_range(object, range)
        }

        fn read_may_wait(&self, _object: usize) -> bool {
            true
        }
    }

    #[tokio::test]
    async fn chunks_read_in_order_from_a_remote_store_take_one_read_per_window_and_a_re_read_takes_one() {
        let lines = |ids: std::ops::Range<u32>| ids.map(|i| user(i) + "\n\n").collect::<String>().into_bytes();
        let source = Arc::new(Remote(
            Objects(vec![
                ("s3://b/part-0.jsonl".into(), lines(0..450)),
                ("s3://b/part-1.jsonl".into(), lines(450..700)),
            ]),
            Default::default(),
        ));
        let index = scan_source(source.clone(), "s3://b/", 100, &USERS).expect("scan");
        assert_eq!(index.chunks.len(), 8);
        let reads = || source.1.load(std::sync::atomic::Ordering::Relaxed);
        let reader = ChunkReader::open(&index).expect("open");
        let before = reads();
        let mut seen = Vec::new();
        for span in &index.chunks {
            let (bytes, lines) = reader.read_with_lines_async(span).await.expect("read");
            assert_eq!((bytes.clone(), lines.clone()), reader.read_with_lines(span).expect("read in place"));
            seen.push((bytes, lines));
        }
        // Both objects are smaller than a window: one read each, although blank lines lie
        // between the chunks.
        assert_eq!(reads() - before, 2 + index.chunks.len(), "the in-place reads count one each");
        // A chunk handed out again (its mapper went silent) is read on its own, not a window.
        let again = reads();
        let (bytes, lines) = reader.read_with_lines_async(&index.chunks[1]).await.expect("re-read");
        assert_eq!((bytes, lines), seen[1]);
        assert_eq!(reads() - again, 1);
    }
}
