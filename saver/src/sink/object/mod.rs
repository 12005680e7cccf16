//! The object-store sink: `saver --sink s3://BUCKET/PREFIX/` (`gs://`, `az://`, `file:///DIR/`).
//!
//! An object store has no append, no rename and no lock, and readers (DuckDB, Spark, Athena) list
//! a prefix and read everything in it. So a saver never writes a name a reader lists while the
//! run goes on: each batch of chunks it saves becomes two objects under the run's staging area,
//! the batch's values (JSON Lines, each chunk one gzip member or zstd frame when compressed) and
//! then its index ([`layout::BatchIndex`]), both create-only; a chunk is saved (and acknowledged)
//! once its batch's index exists. When the fetcher finds the run complete it asks a saver to
//! commit it ([`commit`]): one copy of each chunk is chosen by a fixed rule and written into a
//! few large parts (`part-00000.jsonl`, or Parquet), then `_dead_letters.jsonl`, the manifest
//! and `_SUCCESS` last. Readers read the parts after `_SUCCESS`.
//!
//! A Parquet run has one schema, recorded as `_schema.json` (create-only) by the first saver that
//! stages a batch of it (`--schema`, or inferred from that batch; [`schema`]); every saver checks
//! each value against it as it stages, and dead-letters an object with a value that does not fit
//! (cause `sink`, the field and both types in the reason) in the same batch, never coerced.
//! Batches are staged as JSON Lines still; the commit encodes the parts ([`parquet`]).
//!
//! A saver killed mid-batch leaves a data object without an index (never read) or an index
//! whose chunks another saver may stage again (the commit takes one copy); a commit killed half
//! way is finished by the next commit request, following the plan it wrote first.

mod commit;
pub(crate) mod config;
mod hooks;
pub(crate) mod layout;
mod parquet;
pub(crate) mod plan;
mod reader;
pub(crate) mod schema;
mod store;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::backoff::Backoff;
use common::protocol::{Cause, CommitRequest, CommitStatus, DeadObject};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::decoded::Decoded;
use crate::sink::{SaveOutcome, SinkError, SinkWriter};
use config::ObjectConfig;
pub(crate) use config::{ObjectArgs, OBJECT};
use layout::{BatchIndex, Compression, Format, StagedChunk, LAYOUT_VERSION, SCHEMA_OBJECT, SINK_ID_OBJECT};
use schema::Schema;
use store::{Bucket, Created};

/// A saver's object-store sink.
#[derive(Debug)]
pub(crate) struct ObjectSink {
    bucket: Bucket,
    config: ObjectConfig,
    id: String,
    /// This saver session's name in the staging area: `<instance>-<random>`.
    writer: String,
    /// The next batch's number in this session.
    seq: AtomicU64,
    /// Commits this saver runs or ran, by run.
    commits: Mutex<HashMap<String, commit::Task>>,
    /// The schemas of Parquet runs, as recorded in their `_schema.json`, by run.
    schemas: Mutex<HashMap<String, Arc<Schema>>>,
}

impl ObjectSink {
    /// Opens the sink: reads (or makes) its identity, which also proves the bucket is there and
    /// the credentials may read and write. A store that does not answer is waited for; a missing
    /// bucket or refused credentials stop the saver at start with the setting to fix.
    pub(crate) async fn open(config: &ObjectConfig, shutdown: &CancellationToken) -> Result<Option<Self>, SinkError> {
        let bucket = config.bucket()?;
        let mut backoff = Backoff::new(std::time::Duration::from_millis(200), std::time::Duration::from_secs(5));
        let id = loop {
            match sink_id(&bucket).await {
                Ok(id) => break id,
                Err(SinkError::Store { source, .. }) if source.kind() == input::ErrorKind::Unavailable => {
                    if backoff.first_failure() {
                        tracing::warn!("waiting for the object store: {source}");
                    }
                    if !backoff.wait(shutdown).await {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e),
            }
        };
        if backoff.reset() {
            tracing::info!("the object store at {} answers", bucket.url());
        }
        let instance: String = config
            .saver
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .take(64)
            .collect();
        let writer = format!("{instance}-{:08x}", uuid::Uuid::new_v4().as_u128() as u32);
        Ok(Some(ObjectSink {
            bucket,
            config: config.clone(),
            id,
            writer,
            seq: AtomicU64::new(0),
            commits: Mutex::new(HashMap::new()),
            schemas: Mutex::new(HashMap::new()),
        }))
    }

    /// Stages one run's chunks as one batch: its data object, then its index. For each chunk,
    /// the objects the run's schema refused (dead-lettered in the batch).
    async fn stage(&self, run: &str, chunks: Vec<Arc<Decoded>>) -> Result<Vec<u64>, SinkError> {
        let schema = match self.config.format {
            Format::Parquet => self.run_schema(run, &chunks).await?,
            Format::Jsonl => None,
        };
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let writer = self.writer.clone();
        // A Parquet run's batches are plain JSON Lines: the commit encodes them.
        let compression =
            if self.config.format == Format::Parquet { Compression::None } else { self.config.compression };
        let run_owned = run.to_string();
        let (data, index, refused) = tokio::task::spawn_blocking(move || {
            encode_batch(&run_owned, &writer, seq, compression, &chunks, schema.as_deref())
        })
        .await
        .map_err(|e| SinkError::Task(e.to_string()))??;
        let data_name = format!("{run}/{}", index.data);
        let index_name = format!("{run}/{}", layout::staged_index_name(&self.writer, seq));
        let index_bytes = serde_json::to_vec(&index).expect("a batch index serialises: plain fields");
        // Data first: an index names only durable bytes.
        self.expect_new(&data_name, self.bucket.put_new(&data_name, data).await?)?;
        hooks::reached(hooks::Point::StagedData);
        self.expect_new(&index_name, self.bucket.put_new(&index_name, Bytes::from(index_bytes)).await?)?;
        hooks::reached(hooks::Point::StagedIndex);
        Ok(refused)
    }

    /// The schema of Parquet run `run`: the one recorded in its `_schema.json`, else this saver's
    /// (`--schema`, or inferred from `chunks`) recorded there create-only, the first saver's
    /// winning. `None` while the run has no object value to infer one from. A `--schema` that is
    /// not the recorded one refuses the batch (nothing acknowledged), naming both.
    async fn run_schema(&self, run: &str, chunks: &[Arc<Decoded>]) -> Result<Option<Arc<Schema>>, SinkError> {
        if let Some(known) = common::sync::lock(&self.schemas, "run schemas").get(run) {
            return Ok(Some(Arc::clone(known)));
        }
        let name = format!("{run}/{SCHEMA_OBJECT}");
        let recorded = match self.read_schema(&name).await? {
            Some(recorded) => recorded,
            None => {
                let proposed = match &self.config.schema {
                    Some(given) => given.clone(),
                    None => match Schema::infer(chunks.iter().flat_map(|c| c.values().map(|(_, _, v)| v))) {
                        Some(inferred) => inferred,
                        None => return Ok(None),
                    },
                };
                match self.bucket.put_new(&name, Bytes::from(proposed.to_json())).await? {
                    Created::New => proposed,
                    Created::Existed => self.read_schema(&name).await?.ok_or_else(|| {
                        SinkError::Invalid(format!("{}{name} was written and then removed", self.bucket.url()))
                    })?,
                }
            }
        };
        if let Some(given) = self.config.schema.as_ref().filter(|given| **given != recorded) {
            return Err(SinkError::Config(format!(
                "run {run} has the schema {} ({}{name}), but this saver's --schema is {}: give every saver of the run the same --schema (or none)",
                String::from_utf8_lossy(&serde_json::to_vec(&recorded).expect("a schema serialises")),
                self.bucket.url(),
                String::from_utf8_lossy(&serde_json::to_vec(given).expect("a schema serialises")),
            )));
        }
        let recorded = Arc::new(recorded);
        common::sync::lock(&self.schemas, "run schemas").insert(run.to_string(), Arc::clone(&recorded));
        Ok(Some(recorded))
    }

    async fn read_schema(&self, name: &str) -> Result<Option<Schema>, SinkError> {
        let Some(bytes) = self.bucket.get(name).await? else { return Ok(None) };
        Schema::parse(&bytes).map(Some).map_err(|why| {
            SinkError::Config(format!("{}{name} is not a schema chunkmill wrote: {why}", self.bucket.url()))
        })
    }

    /// A staged name is this session's alone: finding it written is a broken invariant, said
    /// loudly rather than overwritten.
    fn expect_new(&self, name: &str, created: Created) -> Result<(), SinkError> {
        match created {
            Created::New => Ok(()),
            Created::Existed => Err(SinkError::Invalid(format!(
                "{}{name} exists already, though only this saver session ({}) writes that name: is another saver running with the same --instance and session?",
                self.bucket.url(),
                self.writer
            ))),
        }
    }
}

/// The sink's identity: `PREFIX/.chunkmill-sink-id`, made once (create-only; the first of two
/// savers starting together wins, both read it).
async fn sink_id(bucket: &Bucket) -> Result<String, SinkError> {
    if let Some(id) = bucket.get(SINK_ID_OBJECT).await? {
        let id = String::from_utf8_lossy(&id).trim().to_string();
        if !id.is_empty() {
            return Ok(id);
        }
    }
    let id = format!("obj-{}", uuid::Uuid::new_v4().simple());
    bucket.put_new(SINK_ID_OBJECT, Bytes::from(id.clone())).await?;
    let found = bucket.get(SINK_ID_OBJECT).await?.unwrap_or_default();
    Ok(String::from_utf8_lossy(&found).trim().to_string())
}

/// One run's chunks as a staged batch: the data object's bytes, the index that describes them,
/// and per chunk how many objects `schema` refused (dead-lettered in the index instead).
fn encode_batch(
    run: &str,
    writer: &str,
    seq: u64,
    compression: Compression,
    chunks: &[Arc<Decoded>],
    schema: Option<&Schema>,
) -> Result<(Bytes, BatchIndex, Vec<u64>), SinkError> {
    let mut data = Vec::new();
    let mut staged = Vec::with_capacity(chunks.len());
    let mut refused_per_chunk = Vec::with_capacity(chunks.len());
    for result in chunks {
        let offset = data.len() as u64;
        let refused = schema.map(|schema| refused_objects(result, schema)).unwrap_or_default();
        let mut lines = Vec::with_capacity(result.value_count() * 64);
        let mut values = 0;
        for (_, _, value) in result.values().filter(|(i, _, _)| !refused.iter().any(|d| d.index as usize == *i)) {
            lines.extend_from_slice(value);
            lines.push(b'\n');
            values += 1;
        }
        compress(&lines, compression, &mut data)?;
        refused_per_chunk.push(refused.len() as u64);
        staged.push(StagedChunk {
            chunk: result.head.chunk,
            objects: result.objects() as u32,
            offset,
            bytes: data.len() as u64 - offset,
            values,
            dead: result.dead.iter().cloned().chain(refused).collect(),
        });
    }
    let index = BatchIndex {
        v: LAYOUT_VERSION,
        run: run.to_string(),
        writer: writer.to_string(),
        seq,
        data: layout::staged_data_name(writer, seq, &layout::staged_extension(compression)),
        bytes: data.len() as u64,
        compression,
        chunks: staged,
    };
    Ok((Bytes::from(data), index, refused_per_chunk))
}

/// The objects of `result` with a value that does not fit `schema`: dead-lettered (cause
/// `sink`) with the first misfit's reason, all their values left out.
fn refused_objects(result: &Decoded, schema: &Schema) -> Vec<DeadObject> {
    let mut refused = Vec::new();
    for index in 0..result.objects() {
        let misfit = result.values_of(index).enumerate().find_map(|(j, v)| schema.fit(v).err().map(|m| (j, m)));
        if let Some((j, misfit)) = misfit {
            tracing::warn!(
                chunk = result.head.chunk.0,
                "chunk {} of run {}: object {index} does not fit the run's Parquet schema ({misfit}); dead-lettering it",
                result.head.chunk,
                result.head.run
            );
            refused.push(DeadObject {
                index: index as u32,
                id: result.id_of(index).map(str::to_string),
                cause: Cause::Sink,
                error: format!("its output value {j} does not fit the run's Parquet schema: {misfit}"),
                line: None,
            });
        }
    }
    refused
}

/// Appends `lines` to `out`, as one gzip member or zstd frame when compressed (empty stays empty).
pub(crate) fn compress(lines: &[u8], compression: Compression, out: &mut Vec<u8>) -> Result<(), SinkError> {
    let failed = |source| SinkError::Io { action: "compress", path: "a batch in memory".into(), source };
    if lines.is_empty() {
        return Ok(());
    }
    match compression {
        Compression::None => out.extend_from_slice(lines),
        Compression::Gzip => {
            let mut encoder = flate2::write::GzEncoder::new(out, flate2::Compression::default());
            encoder.write_all(lines).map_err(failed)?;
            encoder.finish().map_err(failed)?;
        }
        Compression::Zstd => zstd::stream::copy_encode(lines, out, 3).map_err(failed)?,
        Compression::Snappy => {
            return Err(SinkError::Invalid(
                "snappy is a codec of Parquet parts; JSON Lines are never snappy-compressed".into(),
            ))
        }
    }
    Ok(())
}

impl SinkWriter for Arc<ObjectSink> {
    /// Each run's chunks of the batch become one staged batch; a chunk twice in one batch is
    /// staged once (the second copy is a duplicate).
    fn save_batch(&self, results: Vec<Arc<Decoded>>) -> BoxFuture<'_, Vec<Result<SaveOutcome, SinkError>>> {
        Box::pin(async move {
            let mut runs: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            let mut seen = HashSet::new();
            let mut outcomes: Vec<Option<Result<SaveOutcome, SinkError>>> = (0..results.len()).map(|_| None).collect();
            for (i, result) in results.iter().enumerate() {
                if seen.insert((result.head.run.clone(), result.head.chunk)) {
                    runs.entry(result.head.run.clone()).or_default().push(i);
                } else {
                    outcomes[i] = Some(Ok(SaveOutcome::Duplicate));
                }
            }
            for (run, members) in runs {
                let chunks = members.iter().map(|&i| Arc::clone(&results[i])).collect();
                let staged = self.stage(&run, chunks).await;
                for (at, &i) in members.iter().enumerate() {
                    outcomes[i] = Some(match &staged {
                        Ok(refused) if refused[at] > 0 => Ok(SaveOutcome::SavedRefusing(refused[at])),
                        Ok(_) => Ok(SaveOutcome::Saved),
                        Err(e) => Err(SinkError::Batch(e.to_string())),
                    });
                }
            }
            outcomes.into_iter().map(|o| o.expect("every result has an outcome: staged or a duplicate")).collect()
        })
    }

    fn id(&self) -> &str {
        &self.id
    }

    /// Batches staged at once: each is two round trips to the store.
    fn parallel_batches(&self) -> usize {
        4
    }

    fn describe(&self) -> String {
        format!("object store {} ({})", self.bucket.url(), commit::describe(&self.config))
    }

    fn needs_commit(&self) -> bool {
        true
    }

    fn commit_run<'a>(&'a self, request: &'a CommitRequest) -> BoxFuture<'a, Result<CommitStatus, SinkError>> {
        Box::pin(commit::request(Arc::clone(self), request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use config::Target;

    async fn sink(dir: &std::path::Path, schema: Option<&str>) -> ObjectSink {
        let config = ObjectConfig {
            target: Target::Local(dir.to_path_buf()),
            format: Format::Parquet,
            compression: Compression::Zstd,
            schema: schema.map(|text| Schema::parse(text.as_bytes()).expect("a schema")),
            part_size: 1 << 20,
            saver: "s".into(),
        };
        ObjectSink::open(&config, &CancellationToken::new()).await.expect("opens").expect("not shut down")
    }

    #[tokio::test]
    async fn a_runs_schema_is_recorded_once_the_first_wins_and_a_different_schema_flag_is_refused_naming_both() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (x, y) = (r#"{"fields":[{"name":"x","type":"int64"}]}"#, r#"{"fields":[{"name":"y","type":"string"}]}"#);
        let first = sink(dir.path(), Some(x)).await;
        let recorded = first.run_schema("run1", &[]).await.expect("records").expect("a schema");
        assert_eq!(recorded.fields[0].name, "x");
        let on_disk = std::fs::read(dir.path().join("run1").join(SCHEMA_OBJECT)).expect("_schema.json");
        assert_eq!(Schema::parse(&on_disk).expect("a schema"), *recorded);
        // A saver without --schema, that would infer nothing from no values, uses the recorded one.
        let inferring = sink(dir.path(), None).await;
        assert_eq!(inferring.run_schema("run1", &[]).await.expect("reads"), Some(recorded));
        assert_eq!(inferring.run_schema("run2", &[]).await.expect("nothing to infer from"), None);
        assert!(!dir.path().join("run2").join(SCHEMA_OBJECT).exists(), "nothing recorded without a value");
        let other = sink(dir.path(), Some(y)).await;
        let err = other.run_schema("run1", &[]).await.expect_err("a different --schema is refused").to_string();
        assert!(err.contains(r#""name":"x""#) && err.contains(r#""name":"y""#) && err.contains("--schema"), "{err}");
    }
}
