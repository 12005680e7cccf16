//! Committing a complete run: what a saver does when the fetcher asks (`P.commit`).
//!
//! 1. `_SUCCESS` there: committed already, nothing to do.
//! 2. The plan: `_commit_plan.json` if a committer wrote it before (this one resumes it), else
//!    made from the staged indexes ([`super::plan`]) and written create-only; if another
//!    committer's plan got there first, that one is followed.
//! 3. Each part of the plan, streamed from the staged ranges into one upload (nothing is visible
//!    under the part's name until the upload completes, then all of it); its SHA-256 counted on
//!    the way. A part written before by an earlier attempt is written again with the same bytes.
//!    A Parquet part is the same staged lines decoded with the run's schema (`_schema.json`, put
//!    in the plan and the manifest) and encoded row group by row group ([`super::parquet`]).
//! 4. `_dead_letters.jsonl`, then `_manifest.json`, then `_SUCCESS`: the run is committed.
//! 5. The staged objects and the plan are removed (what a late duplicate stages afterwards is
//!    never read: readers read `part-*`, the committer never plans again).
//!
//! A commit runs in the background of the saver that took the request; it answers `committing`
//! meanwhile and `committed` once `_SUCCESS` is there. Two committers at once (two savers asked)
//! follow one plan and write the same bytes; a commit killed at any step is finished by the next.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use common::protocol::{CommitRequest, CommitStatus};
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use super::config::ObjectConfig;
use super::layout::{
    is_index_name, BatchIndex, CommitPlan, DeadEntry, Format, Manifest, PartEntry, PartPlan, DEAD_OBJECT,
    LAYOUT_VERSION, MANIFEST_OBJECT, PLAN_OBJECT, SCHEMA_OBJECT, STAGING, SUCCESS_OBJECT,
};
use super::schema::Schema;
use super::store::{Bucket, Created};
use super::ObjectSink;
use crate::sink::SinkError;

/// Bytes read from a staged object at once while a part is written.
const READ_PIECE: u64 = 4 << 20;
/// Pieces read ahead while a part is written: a part is the ranges of many small staged objects,
/// and reading them one at a time made a commit the sum of its round trips (1.4 s of 100 000
/// values on the S3 stand-in). At most this many pieces (32 MiB) are held per part.
const PIECES_AHEAD: usize = 8;
/// Staged indexes read (or objects removed) at once.
const AT_ONCE: usize = 16;

/// A commit this saver runs or ran.
#[derive(Debug, Clone)]
pub(crate) struct Task {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Clone)]
enum State {
    Running,
    Done,
    Failed(String),
}

/// For logs: how parts are written.
pub(crate) fn describe(config: &ObjectConfig) -> String {
    let format = match (config.format, config.compression) {
        (Format::Parquet, compression) => format!("Parquet ({compression:?})"),
        (Format::Jsonl, compression) => format!("JSON Lines{}", compression.suffix()),
    };
    format!("{format}, parts of {} MiB", config.part_size >> 20)
}

/// Answers a commit request: starts the commit in the background if nobody here runs it and the
/// run is not committed yet.
pub(crate) async fn request(sink: Arc<ObjectSink>, request: &CommitRequest) -> Result<CommitStatus, SinkError> {
    if request.sink != sink.id {
        return Ok(CommitStatus::WrongSink);
    }
    let run = request.run.clone();
    let known = common::sync::lock(&sink.commits, "object sink commits").get(&run).cloned();
    if let Some(task) = known {
        let state = common::sync::lock(&task.state, "commit task state").clone();
        match state {
            State::Running => return Ok(CommitStatus::Committing),
            State::Done => return Ok(CommitStatus::Committed),
            State::Failed(why) => {
                // Said once; the next request tries again.
                common::sync::lock(&sink.commits, "object sink commits").remove(&run);
                return Err(SinkError::Batch(why));
            }
        }
    }
    if sink.bucket.exists(&format!("{run}/{SUCCESS_OBJECT}")).await? {
        return Ok(CommitStatus::Committed);
    }
    let task = Task { state: Arc::new(Mutex::new(State::Running)) };
    common::sync::lock(&sink.commits, "object sink commits").insert(run.clone(), task.clone());
    let request = request.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let outcome = commit(&sink, &request).await;
        let state = match outcome {
            Ok(manifest) => {
                tracing::info!(
                    run = %request.run,
                    "run {} committed into {}: {} parts, {} values, {} dead-letter entries, in {:.1} s",
                    request.run,
                    sink.bucket.url(),
                    manifest.parts.len(),
                    manifest.values,
                    manifest.dead_letters,
                    started.elapsed().as_secs_f64()
                );
                State::Done
            }
            Err(e) => {
                tracing::error!(run = %request.run, "committing run {} failed (the fetcher asks again): {e}", request.run);
                State::Failed(e.to_string())
            }
        };
        *common::sync::lock(&task.state, "commit task state") = state;
    });
    Ok(CommitStatus::Committing)
}

/// The whole commit (see the module's steps).
async fn commit(sink: &ObjectSink, request: &CommitRequest) -> Result<Manifest, SinkError> {
    let (bucket, run) = (&sink.bucket, request.run.as_str());
    let started = Instant::now();
    let plan = load_or_make_plan(sink, request).await?;
    let planned = started.elapsed();
    let mut parts = Vec::with_capacity(plan.parts.len());
    for part in &plan.parts {
        let written = match (plan.format, &plan.schema) {
            (Format::Jsonl, _) => write_part(bucket, run, part).await?,
            (Format::Parquet, schema) => {
                // No value was ever staged (no schema recorded): a part of no columns and no rows.
                let none = Schema { fields: Vec::new() };
                super::parquet::write_part(bucket, run, schema.as_ref().unwrap_or(&none), plan.compression, part)
                    .await?
            }
        };
        parts.push(written);
        abort_after_parts_for_tests(parts.len());
    }
    let written = started.elapsed();
    let dead = write_dead(bucket, run, &plan).await?;
    let manifest = Manifest {
        v: LAYOUT_VERSION,
        run: run.to_string(),
        job: request.job.clone(),
        spec: request.spec.clone(),
        input: request.input.clone(),
        chunk_size: request.chunk_size,
        chunks: request.chunks,
        objects: request.objects,
        values: parts.iter().map(|p| p.values).sum(),
        dead_letters: dead.entries,
        format: plan.format,
        compression: plan.compression,
        parts,
        dead,
        schema: plan.schema.clone(),
    };
    let text = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises: plain fields");
    bucket.put(&format!("{run}/{MANIFEST_OBJECT}"), Bytes::from(text)).await?;
    bucket.put(&format!("{run}/{SUCCESS_OBJECT}"), Bytes::new()).await?;
    let succeeded = started.elapsed();
    clean_up(bucket, run, &plan).await;
    tracing::info!(
        run = %run,
        "run {run}: commit steps: plan {:.2} s ({} staged objects), parts {:.2} s, manifest and {SUCCESS_OBJECT} {:.2} s, clean-up {:.2} s",
        planned.as_secs_f64(),
        plan.staged.len(),
        (written - planned).as_secs_f64(),
        (succeeded - written).as_secs_f64(),
        (started.elapsed() - succeeded).as_secs_f64()
    );
    Ok(manifest)
}

/// A test hook (tests/object_sink.rs): with `CHUNKMILL_TEST_ABORT_COMMIT_AFTER_PARTS=N` in its
/// environment, a saver dies (abort, as a SIGKILL would leave things) right after writing the
/// N-th part of a commit: after its plan, before its manifest and `_SUCCESS`. Never set it
/// outside tests.
fn abort_after_parts_for_tests(written: usize) {
    let Ok(limit) = std::env::var("CHUNKMILL_TEST_ABORT_COMMIT_AFTER_PARTS") else { return };
    if limit.trim().parse::<usize>().is_ok_and(|limit| limit == written) {
        tracing::error!("test hook CHUNKMILL_TEST_ABORT_COMMIT_AFTER_PARTS={written}: aborting mid-commit");
        std::process::abort();
    }
}

/// The run's plan: the one written before, or a new one from the staged indexes, written
/// create-only (another committer's, if it got there first, wins).
async fn load_or_make_plan(sink: &ObjectSink, request: &CommitRequest) -> Result<CommitPlan, SinkError> {
    let (bucket, run) = (&sink.bucket, request.run.as_str());
    let name = format!("{run}/{PLAN_OBJECT}");
    if let Some(plan) = read_plan(bucket, &name).await? {
        return Ok(plan);
    }
    let batches = read_indexes(bucket, run).await?;
    let config = &sink.config;
    let mut plan = super::plan::plan(run, config.format, config.compression, request.chunks, batches, config.part_size)
        .map_err(|e| SinkError::Invalid(format!("cannot commit run {run} in {}: {e}", bucket.url())))?;
    if config.format == Format::Parquet {
        plan.schema = read_schema(bucket, &format!("{run}/{SCHEMA_OBJECT}")).await?;
        if plan.schema.is_none() && plan.parts.iter().any(|p| p.chunks.iter().any(|c| c.values > 0)) {
            return Err(SinkError::Invalid(format!(
                "cannot commit Parquet run {run} in {}: values are staged but {SCHEMA_OBJECT} is missing (removed outside chunkmill?)",
                bucket.url()
            )));
        }
    }
    let text = serde_json::to_vec(&plan).expect("a plan serialises: plain fields");
    match bucket.put_new(&name, Bytes::from(text)).await? {
        Created::New => Ok(plan),
        Created::Existed => read_plan(bucket, &name)
            .await?
            .ok_or_else(|| SinkError::Invalid(format!("{}{name} was written and then removed", bucket.url()))),
    }
}

async fn read_schema(bucket: &Bucket, name: &str) -> Result<Option<Schema>, SinkError> {
    let Some(bytes) = bucket.get(name).await? else { return Ok(None) };
    Schema::parse(&bytes)
        .map(Some)
        .map_err(|why| SinkError::Invalid(format!("{}{name} is not a schema chunkmill wrote: {why}", bucket.url())))
}

async fn read_plan(bucket: &Bucket, name: &str) -> Result<Option<CommitPlan>, SinkError> {
    let Some(bytes) = bucket.get(name).await? else { return Ok(None) };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| SinkError::Invalid(format!("{}{name} is not a commit plan chunkmill wrote: {e}", bucket.url())))
}

/// Every staged batch index of the run.
async fn read_indexes(bucket: &Bucket, run: &str) -> Result<Vec<BatchIndex>, SinkError> {
    let staged = bucket.list(&format!("{run}/{STAGING}")).await?;
    let names: Vec<String> = staged
        .into_iter()
        .filter_map(|(name, _)| name.strip_prefix(&format!("{run}/")).map(str::to_string))
        .filter(|name| is_index_name(name))
        .collect();
    futures::stream::iter(names)
        .map(|name| async move {
            let object = format!("{run}/{name}");
            let bytes = bucket.get(&object).await?.unwrap_or_default();
            serde_json::from_slice::<BatchIndex>(&bytes).map_err(|e| {
                SinkError::Invalid(format!("{}{object} is not a batch index chunkmill wrote: {e}", bucket.url()))
            })
        })
        .buffer_unordered(AT_ONCE)
        .try_collect()
        .await
}

/// Writes one JSON Lines part of the plan: the staged ranges, in order.
async fn write_part(bucket: &Bucket, run: &str, part: &PartPlan) -> Result<PartEntry, SinkError> {
    let name = format!("{run}/{}", part.name);
    let mut upload = bucket.upload(&name).await?;
    let mut hasher = Sha256::new();
    let mut bytes = 0;
    let mut pieces = std::pin::pin!(staged_pieces(bucket, run, part));
    while let Some(piece) = pieces.try_next().await? {
        hasher.update(&piece);
        upload.write(bucket, &piece).await?;
        bytes += piece.len() as u64;
    }
    bucket.finish(upload).await?;
    Ok(PartEntry {
        name: part.name.clone(),
        values: part.chunks.iter().map(|c| c.values).sum(),
        bytes,
        sha256: hex(&hasher.finalize()),
        chunks: part.chunks.clone(),
    })
}

/// The staged bytes of `part` in the plan's order, piece by piece, [`PIECES_AHEAD`] reads in
/// flight. A piece shorter than the range its index names is an error naming the object: the
/// staging area was changed under the run.
pub(super) fn staged_pieces<'a>(
    bucket: &'a Bucket,
    run: &'a str,
    part: &'a PartPlan,
) -> impl futures::Stream<Item = Result<Bytes, SinkError>> + 'a {
    let ranges = part.sources.iter().flat_map(move |source| {
        let object = format!("{run}/{}", source.object);
        let end = source.offset + source.bytes;
        (source.offset..end).step_by(READ_PIECE as usize).map(move |at| (object.clone(), at..end.min(at + READ_PIECE)))
    });
    futures::stream::iter(ranges)
        .map(move |(object, range)| async move {
            let piece = bucket.get_range(&object, range.clone()).await?;
            if piece.len() as u64 != range.end - range.start {
                return Err(SinkError::Invalid(format!(
                    "{}{object} is shorter than its index says ({} bytes read of {}..{})",
                    bucket.url(),
                    piece.len(),
                    range.start,
                    range.end
                )));
            }
            Ok(piece)
        })
        .buffered(PIECES_AHEAD)
}

/// Writes `_dead_letters.jsonl`: the plan's entries, one per line.
async fn write_dead(bucket: &Bucket, run: &str, plan: &CommitPlan) -> Result<DeadEntry, SinkError> {
    let mut text = Vec::new();
    for line in &plan.dead {
        serde_json::to_writer(&mut text, line).expect("a dead-letter line serialises: plain fields");
        text.push(b'\n');
    }
    let entry = DeadEntry {
        name: DEAD_OBJECT.to_string(),
        entries: plan.dead.len() as u64,
        bytes: text.len() as u64,
        sha256: hex(&Sha256::digest(&text)),
    };
    bucket.put(&format!("{run}/{DEAD_OBJECT}"), Bytes::from(text)).await?;
    Ok(entry)
}

/// Removes the staging area and the plan, best effort: what is left is never read.
async fn clean_up(bucket: &Bucket, run: &str, plan: &CommitPlan) {
    let mut names: Vec<String> = plan.staged.iter().map(|name| format!("{run}/{name}")).collect();
    if let Ok(left) = bucket.list(&format!("{run}/{STAGING}")).await {
        names.extend(left.into_iter().map(|(name, _)| name));
    }
    names.sort();
    names.dedup();
    names.push(format!("{run}/{PLAN_OBJECT}"));
    // The plan last: while it exists, a commit run again follows it, whatever else is gone.
    let plan_name = names.pop().expect("the plan's name was just pushed");
    let (mut failed, mut first) = bucket.delete_all(&names).await;
    if failed == 0 {
        let (plan_failed, plan_why) = bucket.delete_all(&[plan_name]).await;
        (failed, first) = (plan_failed, plan_why);
    }
    if failed > 0 {
        tracing::warn!(
            "run {run}: {failed} staged objects could not be removed ({}); they are never read (readers read part-*)",
            first.unwrap_or_default()
        );
    }
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
