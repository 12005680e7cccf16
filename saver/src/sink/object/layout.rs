//! What a run holds in an object store, for the writer, the committer and every reader: the
//! names, and the records written as JSON.
//!
//! ```text
//! PREFIX/.chunkmill-sink-id                     the sink's identity (made once)
//! PREFIX/<run>/_staging/<writer>/<seq>.<ext>    a batch's values, as a saver wrote them
//! PREFIX/<run>/_staging/<writer>/<seq>.index.json  what that batch holds (its commit record)
//! PREFIX/<run>/_schema.json                    a Parquet run's schema, recorded once by the
//!                                               first saver that stages a batch (create-only)
//! PREFIX/<run>/_commit_plan.json                the commit, decided once: which copy of each
//!                                               chunk, in which part (create-only)
//! PREFIX/<run>/part-00000.<ext>                 the committed values, a few large parts
//! PREFIX/<run>/_dead_letters.jsonl              the run's dead-letter entries, one per line
//! PREFIX/<run>/_manifest.json                   every part: values, bytes, SHA-256, chunks
//! PREFIX/<run>/_SUCCESS                         written last: the run is committed
//! ```
//!
//! A batch is saved once its index object exists; the index is written only after its data
//! object is durable, and neither name is ever written twice (create-only). A reader of a
//! committed run lists `part-*` (or reads the manifest) after `_SUCCESS`: nothing else is ever
//! written under those names than what the plan says.

use common::protocol::{ChunkId, DeadObject};
use serde::{Deserialize, Serialize};

use super::schema::Schema;

/// The version of every record below.
pub(crate) const LAYOUT_VERSION: u32 = 1;
/// Where the sink's identity is, under the prefix.
pub(crate) const SINK_ID_OBJECT: &str = ".chunkmill-sink-id";
/// The staging area, under a run.
pub(crate) const STAGING: &str = "_staging";
/// A Parquet run's schema, under the run.
pub(crate) const SCHEMA_OBJECT: &str = "_schema.json";
/// The commit plan, under a run.
pub(crate) const PLAN_OBJECT: &str = "_commit_plan.json";
/// The manifest, under a run.
pub(crate) const MANIFEST_OBJECT: &str = "_manifest.json";
/// The marker of a committed run.
pub(crate) const SUCCESS_OBJECT: &str = "_SUCCESS";
/// The dead-letter entries of a committed run.
pub(crate) const DEAD_OBJECT: &str = "_dead_letters.jsonl";

/// How values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Format {
    /// One value per line.
    Jsonl,
    /// Apache Parquet, one row per value.
    Parquet,
}

/// How JSON Lines are compressed: each chunk's lines are one gzip member or one zstd frame, so a
/// chunk is readable on its own and any sequence of chunks is one valid file. Parquet parts take
/// `none`, `zstd` or `snappy` (their pages' codec); their staged batches are plain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Compression {
    /// Plain text.
    None,
    /// gzip.
    Gzip,
    /// Zstandard.
    Zstd,
    /// Snappy (Parquet parts only).
    Snappy,
}

impl Compression {
    /// The file name's suffix after `.jsonl`.
    pub(crate) fn suffix(self) -> &'static str {
        match self {
            Compression::None | Compression::Snappy => "",
            Compression::Gzip => ".gz",
            Compression::Zstd => ".zst",
        }
    }
}

/// The extension of staged batches: always JSON Lines (a Parquet run is encoded at commit).
pub(crate) fn staged_extension(compression: Compression) -> String {
    format!("jsonl{}", compression.suffix())
}

/// The extension of committed parts.
pub(crate) fn part_extension(format: Format, compression: Compression) -> String {
    match format {
        Format::Jsonl => staged_extension(compression),
        Format::Parquet => "parquet".into(),
    }
}

/// The name of committed part `n`, under the run.
pub(crate) fn part_name(n: usize, extension: &str) -> String {
    format!("part-{n:05}.{extension}")
}

/// A batch's data object, under the run.
pub(crate) fn staged_data_name(writer: &str, seq: u64, extension: &str) -> String {
    format!("{STAGING}/{writer}/{seq:08}.{extension}")
}

/// A batch's index object, under the run.
pub(crate) fn staged_index_name(writer: &str, seq: u64) -> String {
    format!("{STAGING}/{writer}/{seq:08}.index.json")
}

/// Whether a name under the run's staging area is an index object.
pub(crate) fn is_index_name(name: &str) -> bool {
    name.starts_with(STAGING) && name.ends_with(".index.json")
}

/// One chunk in a staged batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StagedChunk {
    /// The chunk.
    pub(crate) chunk: ChunkId,
    /// Its input objects.
    pub(crate) objects: u32,
    /// Where its lines start in the batch's data object.
    pub(crate) offset: u64,
    /// How many bytes they take (compressed: one gzip member or zstd frame).
    pub(crate) bytes: u64,
    /// How many values (lines).
    pub(crate) values: u64,
    /// Its dead-letter entries.
    pub(crate) dead: Vec<DeadObject>,
}

/// The index of a staged batch: what its data object holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct BatchIndex {
    /// [`LAYOUT_VERSION`].
    pub(crate) v: u32,
    /// The run.
    pub(crate) run: String,
    /// The saver session that wrote it (`<instance>-<random>`).
    pub(crate) writer: String,
    /// Its number in that session.
    pub(crate) seq: u64,
    /// Its data object, under the run.
    pub(crate) data: String,
    /// The data object's size.
    pub(crate) bytes: u64,
    /// How its lines are compressed.
    pub(crate) compression: Compression,
    /// Its chunks, in the order of their bytes.
    pub(crate) chunks: Vec<StagedChunk>,
}

/// A byte range of a staged data object that goes into a part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Source {
    /// The data object, under the run.
    pub(crate) object: String,
    /// Where the range starts.
    pub(crate) offset: u64,
    /// How many bytes.
    pub(crate) bytes: u64,
}

/// One chunk of a part, in the part's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PartChunk {
    /// The chunk.
    pub(crate) chunk: ChunkId,
    /// Its input objects.
    pub(crate) objects: u32,
    /// Its values (lines or rows), which follow the previous chunk's in the part.
    pub(crate) values: u64,
}

/// A part of the plan: where its bytes come from, and which chunks it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PartPlan {
    /// Its name, under the run.
    pub(crate) name: String,
    /// Its staged bytes, in order (for JSON Lines, the part is their concatenation).
    pub(crate) sources: Vec<Source>,
    /// Its chunks, in order.
    pub(crate) chunks: Vec<PartChunk>,
}

/// A dead-letter entry with its chunk, as `_dead_letters.jsonl` holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct DeadLine {
    /// The chunk.
    pub(crate) chunk: ChunkId,
    /// The entry.
    #[serde(flatten)]
    pub(crate) entry: DeadObject,
}

/// The commit of a run, decided once and written create-only before any part: a second
/// committer, or one that resumes a killed commit, follows it instead of deciding again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct CommitPlan {
    /// [`LAYOUT_VERSION`].
    pub(crate) v: u32,
    /// The run.
    pub(crate) run: String,
    /// How parts are written.
    pub(crate) format: Format,
    /// How JSON Lines are compressed.
    pub(crate) compression: Compression,
    /// Chunks in the run.
    pub(crate) chunks: u32,
    /// The parts.
    pub(crate) parts: Vec<PartPlan>,
    /// The run's dead-letter entries, in chunk order.
    pub(crate) dead: Vec<DeadLine>,
    /// A Parquet run's schema (`_schema.json`); `None` for JSON Lines, or a run without values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) schema: Option<Schema>,
    /// Every staged object (data and index), removed once the run is committed.
    pub(crate) staged: Vec<String>,
}

/// A committed part, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PartEntry {
    /// Its name, under the run.
    pub(crate) name: String,
    /// Its values (lines or rows).
    pub(crate) values: u64,
    /// Its size.
    pub(crate) bytes: u64,
    /// The SHA-256 of its bytes, in hex.
    pub(crate) sha256: String,
    /// Its chunks, in order.
    pub(crate) chunks: Vec<PartChunk>,
}

/// The dead-letter file, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DeadEntry {
    /// Its name, under the run.
    pub(crate) name: String,
    /// Its lines.
    pub(crate) entries: u64,
    /// Its size.
    pub(crate) bytes: u64,
    /// The SHA-256 of its bytes, in hex.
    pub(crate) sha256: String,
}

/// What a committed run holds: written after every part, before `_SUCCESS`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Manifest {
    /// [`LAYOUT_VERSION`].
    pub(crate) v: u32,
    /// The run.
    pub(crate) run: String,
    /// The job's fingerprint.
    pub(crate) job: String,
    /// The job, as the fetcher defined it.
    pub(crate) spec: serde_json::Value,
    /// The input, as the fetcher named it.
    pub(crate) input: String,
    /// Objects per chunk.
    pub(crate) chunk_size: u32,
    /// Chunks in the run.
    pub(crate) chunks: u32,
    /// Input objects in the run (those the fetcher skipped as bad records excluded).
    pub(crate) objects: u64,
    /// Output values in all parts.
    pub(crate) values: u64,
    /// Dead-letter entries.
    pub(crate) dead_letters: u64,
    /// How parts are written.
    pub(crate) format: Format,
    /// How JSON Lines are compressed.
    pub(crate) compression: Compression,
    /// The parts, in order.
    pub(crate) parts: Vec<PartEntry>,
    /// The dead-letter file.
    pub(crate) dead: DeadEntry,
    /// A Parquet run's schema, as `--schema` takes it; absent for JSON Lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) schema: Option<Schema>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_staging_apart_from_what_readers_list() {
        assert_eq!(part_name(3, &part_extension(Format::Jsonl, Compression::Zstd)), "part-00003.jsonl.zst");
        assert_eq!(part_name(0, &part_extension(Format::Parquet, Compression::Gzip)), "part-00000.parquet");
        let data = staged_data_name("saver-1-0a1b2c3d", 7, &staged_extension(Compression::Gzip));
        assert_eq!(data, "_staging/saver-1-0a1b2c3d/00000007.jsonl.gz");
        let index = staged_index_name("saver-1-0a1b2c3d", 7);
        assert!(is_index_name(&index) && !is_index_name(&data));
        assert!(!data.starts_with("part-") && !index.starts_with("part-"));
    }
}
