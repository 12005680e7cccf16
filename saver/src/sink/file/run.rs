//! One run directory as a saver writes it: a batch of chunks goes into the current part with one
//! write and one fsync, then one index line per chunk with one write and one fsync. The index
//! line is the commit: a chunk is saved, for this saver and every other one sharing the
//! directory, once its line is durable, and its lines were durable before it.
//!
//! Savers sharing the directory (a shared volume) take turns: a batch is committed under an
//! exclusive lock of `.lock` (flock), and the committer first reads what the others appended to
//! the index since its last turn, so a chunk saved by any of them is a duplicate for all. Under
//! the lock it also repairs what a saver that died mid-batch left: lines after the last
//! committed chunk of the part and the dead-letter file, and a torn last index line, are cut
//! off (that batch was never acknowledged, so its chunks come again).

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::protocol::ChunkId;

use super::layout::{
    dead_line, legacy_chunk_number, parse_index, part_file_name, IndexEntry, DEAD_FILE, INDEX_FILE, LOCK_FILE,
};
use super::{io, sync_dir};
use crate::decoded::Decoded;
use crate::sink::{ReadError, SaveOutcome, SinkError};

/// A run directory open for writing.
#[derive(Debug)]
pub(super) struct RunFiles {
    /// Held (flock) while a batch is committed.
    lock: File,
    state: RunState,
}

/// What a writer knows of a run directory: as much of the index as it has read.
#[derive(Debug)]
struct RunState {
    dir: PathBuf,
    index: File,
    /// Bytes of the index read and applied (whole lines, all durable).
    index_len: u64,
    /// Index lines read: for error messages.
    index_lines: usize,
    /// Chunks saved in this run by any saver, as far as the index read so far says.
    claimed: HashSet<ChunkId>,
    /// The part written to, and where its last committed chunk ends.
    part: u32,
    part_end: u64,
    part_file: Option<File>,
    /// Where the dead-letter file's last committed entry ends.
    dead_end: u64,
    dead_file: Option<File>,
    /// A part this full is closed.
    part_limit: u64,
}

/// Opens `path` for reading and writing, creating it if missing; whether it was created.
fn open_or_create(path: &Path) -> Result<(File, bool), SinkError> {
    match OpenOptions::new().read(true).write(true).create_new(true).open(path) {
        Ok(file) => Ok((file, true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            OpenOptions::new().read(true).write(true).open(path).map(|f| (f, false)).map_err(io("open", path))
        }
        Err(e) => Err(io("create", path)(e)),
    }
}

/// The exclusive lock of a run directory, released when dropped.
struct Locked<'a>(&'a File);

impl<'a> Locked<'a> {
    fn take(file: &'a File, dir: &Path) -> Result<Self, SinkError> {
        file.lock().map_err(io("lock", &dir.join(LOCK_FILE)))?;
        Ok(Locked(file))
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

impl RunFiles {
    /// Opens (creating) run directory `run` under `root`. Chunk files of a run begun before the
    /// segment files count as saved.
    pub(super) fn open(root: &Path, run: &str, part_limit: u64) -> Result<Self, SinkError> {
        let dir = root.join(run);
        match fs::create_dir(&dir) {
            // The directory's name must be durable before anything in it is acknowledged.
            Ok(()) => sync_dir(root)?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => return Err(io("create directory", &dir)(e)),
        }
        let (lock, new_lock) = open_or_create(&dir.join(LOCK_FILE))?;
        let (index, new_index) = open_or_create(&dir.join(INDEX_FILE))?;
        if new_lock || new_index {
            sync_dir(&dir)?;
        }
        let mut claimed = HashSet::new();
        for entry in fs::read_dir(&dir).map_err(io("list", &dir))?.flatten() {
            claimed.extend(legacy_chunk_number(&entry.file_name().to_string_lossy()));
        }
        let state = RunState {
            dir,
            index,
            index_len: 0,
            index_lines: 0,
            claimed,
            part: 0,
            part_end: 0,
            part_file: None,
            dead_end: 0,
            dead_file: None,
            part_limit,
        };
        Ok(RunFiles { lock, state })
    }

    /// Whether the directory still holds the files this writer has open. Someone who removes a
    /// run's directory (to run it again) while the saver runs must get the run saved anew, not
    /// "duplicate" from what this writer remembers of the old one.
    pub(super) fn is_current(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let same = |file: &File, name: &str| match (file.metadata(), fs::metadata(self.state.dir.join(name))) {
            (Ok(open), Ok(named)) => (open.dev(), open.ino()) == (named.dev(), named.ino()),
            _ => false,
        };
        same(&self.lock, LOCK_FILE) && same(&self.state.index, INDEX_FILE)
    }

    /// Saves `results` (all of this run): the chunks no saver has saved yet are committed
    /// together, the others are duplicates. One outcome per result, in order; a chunk that
    /// comes twice in the batch (a re-leased chunk's two results) is a duplicate only if its
    /// first copy was saved, else it fails with it: never acknowledged unsaved.
    pub(super) fn save(&mut self, results: &[&Decoded]) -> Vec<Result<SaveOutcome, SinkError>> {
        let _locked = match Locked::take(&self.lock, &self.state.dir) {
            Ok(locked) => locked,
            Err(e) => return replicate(e, results.len()),
        };
        if let Err(e) = self.state.catch_up() {
            return replicate(e, results.len());
        }
        // For each result: None if saved before, else the position of its chunk's first copy in
        // the batch.
        let mut first_of: Vec<Option<usize>> = Vec::with_capacity(results.len());
        let mut to_save: Vec<&Decoded> = Vec::new();
        let mut positions = std::collections::HashMap::new();
        for result in results {
            let chunk = result.head.chunk;
            first_of.push((!self.state.claimed.contains(&chunk)).then(|| {
                *positions.entry(chunk).or_insert_with(|| {
                    to_save.push(*result);
                    to_save.len() - 1
                })
            }));
        }
        let committed = self.state.commit(&to_save);
        let mut seen = vec![false; to_save.len()];
        first_of
            .into_iter()
            .map(|first| match (first, &committed) {
                (None, _) => Ok(SaveOutcome::Duplicate),
                (Some(at), Ok(())) => {
                    Ok(if std::mem::replace(&mut seen[at], true) { SaveOutcome::Duplicate } else { SaveOutcome::Saved })
                }
                (Some(_), Err(e)) => Err(copy_error(e)),
            })
            .collect()
    }
}

/// `error` as the outcome of `n` results.
fn replicate(error: SinkError, n: usize) -> Vec<Result<SaveOutcome, SinkError>> {
    (0..n).map(|_| Err(copy_error(&error))).collect()
}

/// Another error saying what `error` says, for another result of the batch.
fn copy_error(error: &SinkError) -> SinkError {
    match error {
        SinkError::Io { action, path, source } => {
            SinkError::Io { action, path: path.clone(), source: std::io::Error::new(source.kind(), source.to_string()) }
        }
        other => SinkError::Config(other.to_string()),
    }
}

impl RunState {
    /// Reads what other savers committed since our last turn; cuts off a torn last line.
    fn catch_up(&mut self) -> Result<(), SinkError> {
        let path = self.dir.join(INDEX_FILE);
        let len = self.index.metadata().map_err(io("read", &path))?.len();
        if len < self.index_len {
            // Committed lines are only ever appended: something else cut the file.
            let shrunk = std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("it has {len} bytes, fewer than the {} already read: saved chunks' lines are gone; restore it or start the run anew (fetcher --new-run)", self.index_len),
            );
            return Err(io("read", &path)(shrunk));
        }
        if len == self.index_len {
            return Ok(());
        }
        // Another saver appended these lines; if it died before its fsync returned they may not
        // be durable yet, and a duplicate reported on their word is acknowledged: sync first.
        self.index.sync_data().map_err(io("fsync", &path))?;
        let mut text = vec![0; (len - self.index_len) as usize];
        self.index.read_exact_at(&mut text, self.index_len).map_err(io("read", &path))?;
        let entries = parse_index(&path, &text, self.index_lines + 1).map_err(corrupt)?;
        let complete = text.iter().rposition(|b| *b == b'\n').map_or(0, |end| end + 1) as u64;
        for entry in &entries {
            self.apply(entry);
        }
        self.index_lines += entries.len();
        self.index_len += complete;
        if self.index_len < len {
            // A saver died writing its index lines: that batch was never acknowledged.
            self.index.set_len(self.index_len).map_err(io("cut the torn end of", &path))?;
        }
        Ok(())
    }

    fn apply(&mut self, entry: &IndexEntry) {
        self.claimed.insert(entry.chunk);
        let end = entry.offset + entry.bytes;
        if (entry.part, end) > (self.part, self.part_end) {
            if entry.part != self.part {
                self.part_file = None;
            }
            self.part = entry.part;
            self.part_end = end;
        }
        self.dead_end = self.dead_end.max(entry.dead_offset + entry.dead_bytes);
    }

    /// Writes `results` into the current part (and their dead-letter entries), makes them
    /// durable, then commits them with their index lines.
    fn commit(&mut self, results: &[&Decoded]) -> Result<(), SinkError> {
        if results.is_empty() {
            return Ok(());
        }
        if self.part_end >= self.part_limit {
            self.part += 1;
            self.part_end = 0;
            self.part_file = None;
        }
        let batch = Batch::encode(results, self.part, self.part_end, self.dead_end);
        let mut new_names = false;
        let part_path = self.dir.join(part_file_name(self.part));
        let part = open_cached(&mut self.part_file, &part_path, &mut new_names)?;
        write_at_end(part, &part_path, self.part_end, &batch.values)?;
        part.sync_data().map_err(io("fsync", &part_path))?;
        let dead_path = self.dir.join(DEAD_FILE);
        if !batch.dead.is_empty() {
            let dead = open_cached(&mut self.dead_file, &dead_path, &mut new_names)?;
            write_at_end(dead, &dead_path, self.dead_end, &batch.dead)?;
            dead.sync_data().map_err(io("fsync", &dead_path))?;
        } else if fs::metadata(&dead_path).is_ok_and(|m| m.len() > self.dead_end) {
            // Entries of a batch whose saver died before committing it, and no entries of ours
            // to cut them off with.
            let dead = open_cached(&mut self.dead_file, &dead_path, &mut new_names)?;
            dead.set_len(self.dead_end).map_err(io("cut the uncommitted end of", &dead_path))?;
        }
        if new_names {
            sync_dir(&self.dir)?;
        }
        self.append_index(&batch.entries)?;
        self.part_end += batch.values.len() as u64;
        self.dead_end += batch.dead.len() as u64;
        self.claimed.extend(batch.entries.iter().map(|e| e.chunk));
        Ok(())
    }

    /// Appends `entries` to the index and makes them durable: the commit.
    fn append_index(&mut self, entries: &[IndexEntry]) -> Result<(), SinkError> {
        let path = self.dir.join(INDEX_FILE);
        let text: String = entries.iter().map(IndexEntry::line).collect();
        let written = self
            .index
            .write_all_at(text.as_bytes(), self.index_len)
            .and_then(|()| self.index.sync_data())
            .map_err(io("append to", &path));
        if let Err(e) = written {
            // Not committed: whatever reached the file must not count (after a failed fsync the
            // page cache is not to be trusted either).
            let _ = self.index.set_len(self.index_len);
            return Err(e);
        }
        self.index_len += text.len() as u64;
        self.index_lines += entries.len();
        Ok(())
    }
}

fn corrupt(e: ReadError) -> SinkError {
    match e {
        ReadError::Io { path, source } => SinkError::Io { action: "read", path, source },
        ReadError::Corrupt { path, line, error } => SinkError::Io {
            action: "read",
            path,
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "line {line}: {error}; the index is damaged: restore it or start the run anew (fetcher --new-run)"
                ),
            ),
        },
        // A run directory's reader gives only the two above; the sink-wide type has more.
        other @ (ReadError::Database(_) | ReadError::NotCommitted { .. }) => SinkError::Batch(other.to_string()),
    }
}

/// The open file in `slot`, opening (creating) `path` first if needed.
fn open_cached<'a>(slot: &'a mut Option<File>, path: &Path, created: &mut bool) -> Result<&'a File, SinkError> {
    if slot.is_none() {
        let (file, new) = open_or_create(path)?;
        *created |= new;
        *slot = Some(file);
    }
    slot.as_ref().ok_or_else(|| io("open", path)(std::io::Error::other("not open")))
}

/// Writes `data` at `end`, the end of the last committed bytes, cutting off anything after it
/// first (a batch whose saver died before committing it).
fn write_at_end(file: &File, path: &Path, end: u64, data: &[u8]) -> Result<(), SinkError> {
    let len = file.metadata().map_err(io("read", path))?.len();
    if len < end {
        let lost = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("it has {len} bytes where the index says {end} are saved: saved lines are missing; restore the file or start the run anew (fetcher --new-run)"),
        );
        return Err(io("write", path)(lost));
    }
    if len > end {
        file.set_len(end).map_err(io("cut the uncommitted end of", path))?;
    }
    file.write_all_at(data, end).map_err(io("write", path))
}

/// A batch laid out as it goes to disk.
struct Batch {
    /// The parts' lines, every chunk's together.
    values: Vec<u8>,
    /// The dead-letter lines.
    dead: Vec<u8>,
    /// Where each chunk's are.
    entries: Vec<IndexEntry>,
}

impl Batch {
    /// Lays out `results` for part `part` from byte `part_end`, and the dead-letter file from
    /// `dead_end`. Values are written as they came, compacted onto one line if they were not.
    fn encode(results: &[&Decoded], part: u32, part_end: u64, dead_end: u64) -> Batch {
        let mut batch = Batch { values: Vec::new(), dead: Vec::new(), entries: Vec::with_capacity(results.len()) };
        for result in results {
            let (offset, dead_offset) = (batch.values.len() as u64, batch.dead.len() as u64);
            let mut values = 0;
            for (_, _, value) in result.values() {
                batch.values.extend_from_slice(&common::json::compact(value));
                batch.values.push(b'\n');
                values += 1;
            }
            for entry in &result.dead {
                batch.dead.extend_from_slice(&dead_line(result.head.chunk, entry));
            }
            let dead_bytes = batch.dead.len() as u64 - dead_offset;
            batch.entries.push(IndexEntry {
                chunk: result.head.chunk,
                part,
                offset: part_end + offset,
                bytes: batch.values.len() as u64 - offset,
                values,
                dead: result.dead.len() as u64,
                dead_offset: if dead_bytes == 0 { 0 } else { dead_end + dead_offset },
                dead_bytes,
            });
        }
        batch
    }
}
