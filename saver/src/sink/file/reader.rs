//! A run directory read back for `saver verify`: each chunk's first saved copy (its lines in
//! order, its dead-letter entries), what later copies repeat, and the lines no index entry
//! covers ([`RunReader`](super::layout::RunReader) does the reading; this says it in the terms of
//! [`SinkReader`]). The file sink keeps values as they were sent: [`as_written`].

use std::path::{Path, PathBuf};

use common::protocol::ChunkId;
use rayon::prelude::*;

use super::layout::RunReader;
use crate::sink::{as_written, Normalise, ReadError, SinkReader, StoredChunk, StoredChunks, StoredValues, Unaccounted};

/// One run directory, opened for reading.
pub(crate) struct FileReader {
    dir: PathBuf,
    reader: RunReader,
}

impl FileReader {
    /// Opens the run directory `dir` (a missing one holds nothing).
    pub(crate) fn open(dir: &Path) -> Result<Self, ReadError> {
        Ok(FileReader { dir: dir.to_path_buf(), reader: RunReader::open(dir)? })
    }

    /// Chunk `chunk`'s first copy; every value and entry of later copies counts as duplicated.
    fn chunk(&self, chunk: u64) -> Result<Option<StoredChunk>, ReadError> {
        // The index numbers chunks with u32 (ChunkId), and verify asks only for the run's.
        let Ok(index) = u32::try_from(chunk) else { return Ok(None) };
        let mut copies = self.reader.chunk(ChunkId(index))?.into_iter();
        let Some(first) = copies.next() else { return Ok(None) };
        let duplicates = copies.map(|c| (c.values.len() + c.dead.len()) as u64).sum();
        Ok(Some(StoredChunk { values: StoredValues::InOrder(first.values), dead: first.dead, duplicates }))
    }
}

impl SinkReader for FileReader {
    fn location(&self) -> String {
        self.dir.display().to_string()
    }

    fn normalise(&self) -> Normalise {
        as_written()
    }

    /// Read in parallel: a chunk is a few ranged reads of a part file.
    fn read(&self, range: std::ops::Range<usize>) -> Result<StoredChunks, ReadError> {
        let chunks: Vec<(u64, Option<StoredChunk>)> =
            range.into_par_iter().map(|c| Ok((c as u64, self.chunk(c as u64)?))).collect::<Result<_, ReadError>>()?;
        let chunks = chunks.into_iter().filter_map(|(c, stored)| stored.map(|s| (c, s))).collect();
        Ok(StoredChunks { chunks, unaccounted: Unaccounted::default() })
    }

    /// Chunks past the run's belong to no input object, nor do lines outside every chunk.
    fn rest(&self, chunks: usize) -> Result<Unaccounted, ReadError> {
        let mut rest = Unaccounted::default();
        for chunk in self.reader.chunks().into_iter().filter(|c| c.index() >= chunks) {
            for copy in self.reader.chunk(chunk)? {
                rest.values += copy.values.len() as u64;
                rest.dead += copy.dead.len() as u64;
            }
        }
        let stray = self.reader.stray()?;
        rest.values += stray.values;
        rest.dead += stray.dead;
        Ok(rest)
    }
}
