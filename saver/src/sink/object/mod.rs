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
//! A saver killed mid-batch leaves a data object without an index (never read) or an index
//! whose chunks another saver may stage again (the commit takes one copy); a commit killed half
//! way is finished by the next commit request, following the plan it wrote first.

mod commit;
pub(crate) mod config;
mod hooks;
pub(crate) mod layout;
pub(crate) mod plan;
mod reader;
mod store;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::backoff::Backoff;
use common::protocol::{CommitRequest, CommitStatus};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::decoded::Decoded;
use crate::sink::{SaveOutcome, SinkError, SinkWriter};
use config::ObjectConfig;
pub(crate) use config::{ObjectArgs, OBJECT};
use layout::{BatchIndex, Compression, StagedChunk, LAYOUT_VERSION, SINK_ID_OBJECT};
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
        }))
    }

    /// Stages one run's chunks as one batch: its data object, then its index.
    async fn stage(&self, run: &str, chunks: Vec<Arc<Decoded>>) -> Result<(), SinkError> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (writer, compression) = (self.writer.clone(), self.config.compression);
        let run_owned = run.to_string();
        let (data, index) =
            tokio::task::spawn_blocking(move || encode_batch(&run_owned, &writer, seq, compression, &chunks))
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
        Ok(())
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

/// One run's chunks as a staged batch: the data object's bytes and the index that describes them.
fn encode_batch(
    run: &str,
    writer: &str,
    seq: u64,
    compression: Compression,
    chunks: &[Arc<Decoded>],
) -> Result<(Bytes, BatchIndex), SinkError> {
    let mut data = Vec::new();
    let mut staged = Vec::with_capacity(chunks.len());
    for result in chunks {
        let offset = data.len() as u64;
        let mut lines = Vec::with_capacity(result.value_count() * 64);
        for (_, _, value) in result.values() {
            lines.extend_from_slice(value);
            lines.push(b'\n');
        }
        compress(&lines, compression, &mut data)?;
        staged.push(StagedChunk {
            chunk: result.head.chunk,
            objects: result.objects() as u32,
            offset,
            bytes: data.len() as u64 - offset,
            values: result.value_count() as u64,
            dead: result.dead.clone(),
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
    Ok((Bytes::from(data), index))
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
                for &i in &members {
                    outcomes[i] = Some(match &staged {
                        Ok(()) => Ok(SaveOutcome::Saved),
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
