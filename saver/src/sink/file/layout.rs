//! What a run directory of the file sink holds, for the writer ([`super::run`]) and for every
//! reader (`saver verify`, the tests): the files' names, the index line, and a run read back.
//!
//! ```text
//! OUT/<run>/part-00000.jsonl   output values, one per line; each chunk's lines are contiguous
//! OUT/<run>/dead.jsonl         dead-letter entries, one per line, each naming its chunk
//! OUT/<run>/index.jsonl        one line per saved chunk: where its lines are (the commit record)
//! OUT/<run>/.lock              held (flock) by the saver committing a batch
//! ```
//!
//! A chunk is saved once its index line is durable, and only then; the index line is written
//! only after the lines it points to are durable. Bytes of a part not named by any index line
//! are the tail of a batch whose saver died before committing it: the next batch cuts them off.
//! Runs written by chunkmill 0.1 before the segment files (`chunk-XXXXXXXX.jsonl` per chunk)
//! are still read, and their chunk files count as saved.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::protocol::{ChunkId, DeadObject};
use serde::{Deserialize, Serialize};

use crate::sink::ReadError;

/// The index of a run directory.
pub const INDEX_FILE: &str = "index.jsonl";
/// The dead-letter entries of a run directory.
pub const DEAD_FILE: &str = "dead.jsonl";
/// The file a committing saver holds locked.
pub const LOCK_FILE: &str = ".lock";
/// A part holding this many bytes is full: the next batch starts the next part.
pub const PART_BYTES: u64 = 256 << 20;

/// The name of part `part`.
pub fn part_file_name(part: u32) -> String {
    format!("part-{part:05}.jsonl")
}

/// The part number of a part file's name.
fn part_number(name: &str) -> Option<u32> {
    name.strip_prefix("part-")?.strip_suffix(".jsonl")?.parse().ok()
}

/// A chunk's file in a run written before the segment files (one file per chunk).
pub fn legacy_chunk_file_name(chunk: ChunkId) -> String {
    format!("chunk-{chunk:08}.jsonl")
}

/// A chunk's dead-letter file in a run written before the segment files.
pub fn legacy_dead_file_name(chunk: ChunkId) -> String {
    format!("chunk-{chunk:08}.dead.jsonl")
}

/// The chunk of a legacy chunk file's name (not of its dead-letter file).
pub fn legacy_chunk_number(name: &str) -> Option<ChunkId> {
    name.strip_prefix("chunk-")?.strip_suffix(".jsonl")?.parse().ok()
}

/// One saved chunk: a line of the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// The chunk.
    pub chunk: ChunkId,
    /// The part its lines are in.
    pub part: u32,
    /// Where its first line starts in the part.
    pub offset: u64,
    /// How many bytes its lines take (every line ends in `\n`).
    pub bytes: u64,
    /// How many lines (output values) it has.
    pub values: u64,
    /// How many dead-letter entries it has in the dead-letter file.
    pub dead: u64,
    /// Where they start there.
    pub dead_offset: u64,
    /// How many bytes they take.
    pub dead_bytes: u64,
}

impl IndexEntry {
    /// The index line, `\n` included.
    pub fn line(&self) -> String {
        let mut line = common::json::to_string_own(self);
        line.push('\n');
        line
    }
}

/// A dead-letter line: the entry with its chunk.
#[derive(Debug, Deserialize)]
struct DeadLine {
    chunk: ChunkId,
    #[serde(flatten)]
    entry: DeadObject,
}

/// A dead-letter line for `chunk`, `\n` included.
pub fn dead_line(chunk: ChunkId, entry: &DeadObject) -> Vec<u8> {
    let object = common::json::to_vec_own(entry);
    let mut line = format!("{{\"chunk\":{chunk},").into_bytes();
    // `object` is `{...}`: splice its fields in after the chunk.
    line.extend_from_slice(object.get(1..).unwrap_or_default());
    line.push(b'\n');
    line
}

fn read_error(path: &Path) -> impl FnOnce(std::io::Error) -> ReadError + '_ {
    move |source| ReadError::Io { path: path.to_path_buf(), source }
}

/// The parsed lines of an index, in order; a torn last line (a saver died writing it, before
/// its fsync returned) is not a saved chunk and is left out.
pub fn parse_index(path: &Path, text: &[u8], first_line: usize) -> Result<Vec<IndexEntry>, ReadError> {
    let complete = text.iter().rposition(|b| *b == b'\n').map_or(0, |end| end + 1);
    text[..complete]
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_slice(line).map_err(|e| ReadError::Corrupt {
                path: path.to_path_buf(),
                line: first_line + i,
                error: format!("not an index line: {e}"),
            })
        })
        .collect()
}

/// One saved copy of a chunk, read back.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SavedChunk {
    /// Its output values, in order (one per line).
    pub values: Vec<Vec<u8>>,
    /// Its dead-letter entries.
    pub dead: Vec<DeadObject>,
}

/// What a run directory holds that no saved chunk accounts for.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stray {
    /// Lines of parts outside every chunk's range.
    pub values: u64,
    /// Dead-letter lines outside every chunk's range.
    pub dead: u64,
}

/// A run directory opened for reading: its index, and its parts read by range.
#[derive(Debug)]
pub struct RunReader {
    dir: PathBuf,
    entries: BTreeMap<ChunkId, Vec<IndexEntry>>,
    parts: HashMap<u32, File>,
    dead: Option<File>,
    /// Chunks saved as files of their own (a run begun before the segment files).
    legacy: BTreeMap<ChunkId, PathBuf>,
}

impl RunReader {
    /// Opens run directory `dir`; an absent directory is an empty run.
    pub fn open(dir: &Path) -> Result<Self, ReadError> {
        let mut reader = RunReader {
            dir: dir.to_path_buf(),
            entries: BTreeMap::new(),
            parts: HashMap::new(),
            dead: None,
            legacy: BTreeMap::new(),
        };
        let names = match fs::read_dir(dir) {
            Ok(entries) => entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(ReadError::Io { path: dir.to_path_buf(), source }),
        };
        for name in names {
            if let Some(part) = part_number(&name) {
                let path = dir.join(&name);
                reader.parts.insert(part, File::open(&path).map_err(read_error(&path))?);
            } else if let Some(chunk) = legacy_chunk_number(&name) {
                reader.legacy.insert(chunk, dir.join(&name));
            } else if name == DEAD_FILE {
                let path = dir.join(&name);
                reader.dead = Some(File::open(&path).map_err(read_error(&path))?);
            } else if name == INDEX_FILE {
                let path = dir.join(&name);
                let text = fs::read(&path).map_err(read_error(&path))?;
                for entry in parse_index(&path, &text, 1)? {
                    reader.entries.entry(entry.chunk).or_default().push(entry);
                }
            }
        }
        Ok(reader)
    }

    /// Every chunk with at least one saved copy, in order.
    pub fn chunks(&self) -> Vec<ChunkId> {
        let mut chunks: Vec<ChunkId> = self.entries.keys().chain(self.legacy.keys()).copied().collect();
        chunks.sort_unstable();
        chunks.dedup();
        chunks
    }

    /// Every saved copy of `chunk` (none: not saved; more than one: saved twice).
    pub fn chunk(&self, chunk: ChunkId) -> Result<Vec<SavedChunk>, ReadError> {
        let mut copies = Vec::new();
        for entry in self.entries.get(&chunk).into_iter().flatten() {
            copies.push(self.read_entry(entry)?);
        }
        if let Some(path) = self.legacy.get(&chunk) {
            copies.push(self.read_legacy(chunk, path)?);
        }
        Ok(copies)
    }

    fn read_entry(&self, entry: &IndexEntry) -> Result<SavedChunk, ReadError> {
        let part = self.dir.join(part_file_name(entry.part));
        let file = self.parts.get(&entry.part).ok_or_else(|| ReadError::Io {
            path: part.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "the index names this part, which is missing"),
        })?;
        let values = lines(&read_range(file, &part, entry.offset, entry.bytes)?);
        let dead_path = self.dir.join(DEAD_FILE);
        let dead = match (&self.dead, entry.dead_bytes) {
            (_, 0) => Vec::new(),
            (Some(file), bytes) => {
                let text = read_range(file, &dead_path, entry.dead_offset, bytes)?;
                dead_entries(&dead_path, &text, Some(entry.chunk))?
            }
            (None, _) => {
                let source = std::io::Error::new(std::io::ErrorKind::NotFound, "the index names it, and it is missing");
                return Err(ReadError::Io { path: dead_path, source });
            }
        };
        Ok(SavedChunk { values, dead })
    }

    fn read_legacy(&self, chunk: ChunkId, path: &Path) -> Result<SavedChunk, ReadError> {
        let values = lines(&fs::read(path).map_err(read_error(path))?);
        let dead_path = self.dir.join(legacy_dead_file_name(chunk));
        let dead = match fs::read(&dead_path) {
            Ok(text) => dead_entries(&dead_path, &text, None)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(ReadError::Io { path: dead_path, source }),
        };
        Ok(SavedChunk { values, dead })
    }

    /// What the parts and the dead-letter file hold outside every indexed chunk's range: the
    /// tail of a batch that was never committed (cut off by the next batch), or bytes written by
    /// something else.
    pub fn stray(&self) -> Result<Stray, ReadError> {
        let mut stray = Stray::default();
        let mut by_part: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
        let mut dead_ranges = Vec::new();
        for entry in self.entries.values().flatten() {
            by_part.entry(entry.part).or_default().push((entry.offset, entry.bytes));
            dead_ranges.push((entry.dead_offset, entry.dead_bytes));
        }
        for (part, file) in &self.parts {
            let path = self.dir.join(part_file_name(*part));
            let ranges = by_part.remove(part).unwrap_or_default();
            stray.values += uncovered(file, &path, ranges)?.iter().map(|gap| lines(gap).len() as u64).sum::<u64>();
        }
        if let Some(file) = &self.dead {
            let path = self.dir.join(DEAD_FILE);
            stray.dead += uncovered(file, &path, dead_ranges)?.iter().map(|gap| lines(gap).len() as u64).sum::<u64>();
        }
        Ok(stray)
    }
}

/// The non-empty lines of `text`.
fn lines(text: &[u8]) -> Vec<Vec<u8>> {
    text.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect()
}

fn read_range(file: &File, path: &Path, offset: u64, bytes: u64) -> Result<Vec<u8>, ReadError> {
    let mut buffer = vec![0; bytes as usize];
    file.read_exact_at(&mut buffer, offset).map_err(read_error(path))?;
    Ok(buffer)
}

/// The dead-letter entries in `text`, each checked to belong to `chunk` (when given).
fn dead_entries(path: &Path, text: &[u8], chunk: Option<ChunkId>) -> Result<Vec<DeadObject>, ReadError> {
    let corrupt = |line: usize, error: String| ReadError::Corrupt { path: path.to_path_buf(), line, error };
    lines(text)
        .iter()
        .enumerate()
        .map(|(i, line)| match chunk {
            Some(chunk) => match serde_json::from_slice::<DeadLine>(line) {
                Ok(dead) if dead.chunk == chunk => Ok(dead.entry),
                Ok(dead) => Err(corrupt(i + 1, format!("an entry of chunk {} where chunk {chunk}'s are", dead.chunk))),
                Err(e) => Err(corrupt(i + 1, format!("not a dead-letter entry: {e}"))),
            },
            None => serde_json::from_slice(line).map_err(|e| corrupt(i + 1, format!("not a dead-letter entry: {e}"))),
        })
        .collect()
}

/// The bytes of `file` outside `ranges` (offset, length).
fn uncovered(file: &File, path: &Path, mut ranges: Vec<(u64, u64)>) -> Result<Vec<Vec<u8>>, ReadError> {
    let len = file.metadata().map_err(read_error(path))?.len();
    ranges.sort_unstable();
    let mut gaps = Vec::new();
    let mut at = 0u64;
    for (offset, bytes) in ranges.into_iter().chain(std::iter::once((len, 0))) {
        let end = offset.min(len);
        if end > at {
            gaps.push(read_range(file, path, at, end - at)?);
        }
        at = at.max(offset + bytes);
    }
    Ok(gaps)
}
