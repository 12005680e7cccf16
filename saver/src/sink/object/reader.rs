//! One committed run of the object-store sink read back for `saver verify`: the manifest, each
//! part checked against it (size, SHA-256, values) the first time it is read, its values split by
//! chunk as the manifest lists them, and the dead-letter entries. A run without `_SUCCESS` is not
//! committed: verify says so rather than judging what is staged. Verify is blocking: the reader
//! has a one-thread runtime of its own for the store's client.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::Mutex;

use bytes::Bytes;
use common::protocol::{ChunkId, DeadObject};
use sha2::{Digest, Sha256};

use super::commit::hex;
use super::config::ObjectConfig;
use super::layout::{is_index_name, Compression, DeadLine, Format, Manifest, MANIFEST_OBJECT, STAGING, SUCCESS_OBJECT};
use super::store::Bucket;
use crate::sink::{as_written, Normalise, ReadError, SinkReader, StoredChunk, StoredChunks, StoredValues, Unaccounted};

/// Where a chunk's values are: its part, and its first value's place in it.
#[derive(Debug, Clone, Copy)]
struct Place {
    part: usize,
    first: u64,
    values: u64,
}

/// A committed run, opened for reading.
pub(crate) struct ObjectReader {
    bucket: Bucket,
    runtime: tokio::runtime::Runtime,
    run: String,
    manifest: Manifest,
    places: HashMap<ChunkId, Place>,
    dead: BTreeMap<ChunkId, Vec<DeadObject>>,
    /// The last part read, its values in order (verify reads chunks in order, and parts hold
    /// runs of chunks).
    cached: Mutex<Option<(usize, PartValues)>>,
}

/// A part's values, in order.
type PartValues = std::sync::Arc<Vec<Vec<u8>>>;

fn store_error(e: impl std::fmt::Display) -> ReadError {
    ReadError::Database(e.to_string())
}

impl ObjectReader {
    /// Opens run `run` of the sink `config` points at: [`ReadError::NotCommitted`] without
    /// `_SUCCESS`.
    pub(crate) fn open(config: &ObjectConfig, run: &str) -> Result<Self, ReadError> {
        let bucket = config.bucket().map_err(store_error)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ReadError::Database(format!("cannot start an async runtime: {e}")))?;
        let location = format!("{}{run}/", bucket.url());
        let committed = runtime.block_on(bucket.exists(&format!("{run}/{SUCCESS_OBJECT}"))).map_err(store_error)?;
        if !committed {
            let staged = runtime.block_on(bucket.list(&format!("{run}/{STAGING}"))).map_err(store_error)?;
            let batches =
                staged.iter().filter(|(name, _)| is_index_name(name.trim_start_matches(&format!("{run}/")))).count();
            let why = format!("no {SUCCESS_OBJECT}; {batches} staged batches wait for the commit the fetcher asks for when the run is complete");
            return Err(ReadError::NotCommitted { run: run.to_string(), location, why });
        }
        let name = format!("{run}/{MANIFEST_OBJECT}");
        let bytes = runtime.block_on(bucket.get(&name)).map_err(store_error)?.ok_or_else(|| ReadError::Corrupt {
            path: format!("{location}{MANIFEST_OBJECT}").into(),
            line: 0,
            error: "missing, though the run has _SUCCESS".into(),
        })?;
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| ReadError::Corrupt {
            path: format!("{location}{MANIFEST_OBJECT}").into(),
            line: e.line(),
            error: format!("not a manifest chunkmill wrote: {e}"),
        })?;
        let mut places = HashMap::new();
        for (part, entry) in manifest.parts.iter().enumerate() {
            let mut first = 0;
            for chunk in &entry.chunks {
                places.insert(chunk.chunk, Place { part, first, values: chunk.values });
                first += chunk.values;
            }
        }
        let mut reader = ObjectReader {
            bucket,
            runtime,
            run: run.to_string(),
            manifest,
            places,
            dead: BTreeMap::new(),
            cached: Mutex::new(None),
        };
        reader.dead = reader.read_dead()?;
        Ok(reader)
    }

    fn location(&self, name: &str) -> std::path::PathBuf {
        format!("{}{}/{name}", self.bucket.url(), self.run).into()
    }

    /// An object named in the manifest, checked against its size and SHA-256 there.
    fn checked(&self, name: &str, bytes: u64, sha256: &str) -> Result<Bytes, ReadError> {
        let object = format!("{}/{name}", self.run);
        let found = self.runtime.block_on(self.bucket.get(&object)).map_err(store_error)?;
        let corrupt = |error: String| ReadError::Corrupt { path: self.location(name), line: 0, error };
        let found = found.ok_or_else(|| corrupt("missing, though the manifest lists it".into()))?;
        if found.len() as u64 != bytes {
            return Err(corrupt(format!("{} bytes, the manifest says {bytes}", found.len())));
        }
        let digest = hex(&Sha256::digest(&found));
        if digest != sha256 {
            return Err(corrupt(format!("its SHA-256 is {digest}, the manifest says {sha256}")));
        }
        Ok(found)
    }

    fn read_dead(&self) -> Result<BTreeMap<ChunkId, Vec<DeadObject>>, ReadError> {
        let entry = &self.manifest.dead;
        let bytes = self.checked(&entry.name, entry.bytes, &entry.sha256)?;
        let mut dead: BTreeMap<ChunkId, Vec<DeadObject>> = BTreeMap::new();
        for (i, line) in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()).enumerate() {
            let line: DeadLine = serde_json::from_slice(line).map_err(|e| ReadError::Corrupt {
                path: self.location(&entry.name),
                line: i + 1,
                error: e.to_string(),
            })?;
            dead.entry(line.chunk).or_default().push(line.entry);
        }
        Ok(dead)
    }

    /// Part `part`'s values, in order.
    fn part(&self, part: usize) -> Result<PartValues, ReadError> {
        let mut cached = common::sync::lock(&self.cached, "object reader cache");
        if let Some((at, values)) = cached.as_ref() {
            if *at == part {
                return Ok(values.clone());
            }
        }
        let entry = &self.manifest.parts[part];
        let bytes = self.checked(&entry.name, entry.bytes, &entry.sha256)?;
        let values = match self.manifest.format {
            Format::Jsonl => lines(&bytes, self.manifest.compression).map_err(|e| ReadError::Corrupt {
                path: self.location(&entry.name),
                line: 0,
                error: e.to_string(),
            })?,
            Format::Parquet => super::parquet::rows(bytes).map_err(|error| ReadError::Corrupt {
                path: self.location(&entry.name),
                line: 0,
                error,
            })?,
        };
        let listed = entry.chunks.iter().map(|c| c.values).sum::<u64>();
        if values.len() as u64 != entry.values || entry.values != listed {
            return Err(ReadError::Corrupt {
                path: self.location(&entry.name),
                line: 0,
                error: format!("{} values, the manifest says {} ({listed} by its chunks)", values.len(), entry.values),
            });
        }
        let values = std::sync::Arc::new(values);
        *cached = Some((part, values.clone()));
        Ok(values)
    }
}

/// The lines of a JSON Lines part (decompressed), without their `\n`.
fn lines(bytes: &[u8], compression: Compression) -> std::io::Result<Vec<Vec<u8>>> {
    let mut text = Vec::new();
    match compression {
        Compression::None => text.extend_from_slice(bytes),
        Compression::Gzip => {
            flate2::read::MultiGzDecoder::new(bytes).read_to_end(&mut text)?;
        }
        Compression::Zstd => {
            zstd::stream::read::Decoder::new(bytes)?.read_to_end(&mut text)?;
        }
        Compression::Snappy => {
            return Err(std::io::Error::other("snappy is a codec of Parquet parts, not of JSON Lines"));
        }
    }
    Ok(text.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect())
}

impl SinkReader for ObjectReader {
    fn location(&self) -> String {
        format!("{}{}/", self.bucket.url(), self.run)
    }

    /// JSON Lines keep values as written; Parquet cells as [`super::parquet::normalise_as`] says
    /// with the run's schema.
    fn normalise(&self) -> Normalise {
        match self.manifest.format {
            Format::Jsonl => as_written(),
            Format::Parquet => super::parquet::normalise_as(self.manifest.schema.clone()),
        }
    }

    fn read(&self, range: std::ops::Range<usize>) -> Result<StoredChunks, ReadError> {
        let mut chunks = HashMap::new();
        for index in range {
            let Ok(id) = u32::try_from(index) else { continue };
            let chunk = ChunkId(id);
            let Some(place) = self.places.get(&chunk).copied() else { continue };
            let values = self.part(place.part)?;
            let slice = &values[place.first as usize..(place.first + place.values) as usize];
            let dead = self.dead.get(&chunk).cloned().unwrap_or_default();
            let stored = StoredChunk { values: StoredValues::InOrder(slice.to_vec()), dead, duplicates: 0 };
            chunks.insert(index as u64, stored);
        }
        Ok(StoredChunks { chunks, unaccounted: Unaccounted::default() })
    }

    /// Chunks past the run's, in the manifest or the dead letters.
    fn rest(&self, chunks: usize) -> Result<Unaccounted, ReadError> {
        let mut rest = Unaccounted::default();
        for (chunk, place) in &self.places {
            if chunk.index() >= chunks {
                rest.values += place.values;
            }
        }
        for (chunk, entries) in &self.dead {
            if chunk.index() >= chunks {
                rest.dead += entries.len() as u64;
            }
        }
        if self.manifest.chunks as usize != chunks {
            rest.mismatched_chunks += 1;
        }
        Ok(rest)
    }
}
