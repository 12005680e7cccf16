//! The CPU side of the mapper: one leased chunk through the job's transform into the saver's
//! message. Runs on the rayon pool, never on tokio's threads; one object's failure (a refusal, a
//! panic, a command that dies on it) becomes that object's dead-letter entry, never a lost
//! chunk or a crashed mapper.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use common::protocol::{self, Cause, ChunkHead, DeadObject, ReleaseReason, ResultHead};
use tokio::sync::OwnedSemaphorePermit;
use transform::{ObjectError, Outputs, Transform};

use crate::jobs::{Built, Unusable};
use crate::transformer::on_rayon;
use crate::{InHand, Shared};

/// What to do with a chunk once it went through the transform.
pub(crate) enum Transformed {
    /// Send this result to a saver.
    Deliver {
        /// The encoded result.
        body: Bytes,
        /// Input objects in it.
        objects: u64,
        /// Its room in `--concurrency`, held until the result may start its delivery.
        permit: Option<OwnedSemaphorePermit>,
    },
    /// A probe lease ran to its end: release it as `probed`.
    Probed(Option<OwnedSemaphorePermit>),
    /// Hand the lease back.
    GiveBack(ReleaseReason, String, Option<OwnedSemaphorePermit>),
}

/// A transformed chunk, encoded for the saver.
#[derive(Debug)]
pub struct MappedChunk {
    /// The encoded result.
    pub body: Vec<u8>,
    /// Input objects.
    pub objects: u64,
    /// Of those, dead-lettered.
    pub dead: u64,
}

/// Runs `in_hand` through its job on the rayon pool.
pub(crate) async fn transform_chunk(shared: &Arc<Shared>, in_hand: InHand) -> Transformed {
    let InHand { payload, objects, head, run, job, permit } = in_hand;
    let built = match shared.jobs.get(&shared.client, &shared.subjects.job, &shared.name, &job).await {
        Ok(built) => built,
        // Not the chunk's fault, nor ours for good: hand it back to be leased again.
        Err(Unusable::Unknown(e)) => return Transformed::GiveBack(ReleaseReason::Shutdown, e, permit),
        Err(Unusable::CannotRun(e)) => return Transformed::GiveBack(ReleaseReason::CannotRun, e, permit),
    };
    let (probe, chunk) = (head.probe, head.chunk);
    let result_head = ResultHead {
        run,
        job,
        chunk: head.chunk,
        lease: head.lease,
        attempt: head.attempt,
        mapper: shared.name.clone(),
    };
    if let Some(why) = built.transform.broken() {
        return Transformed::GiveBack(ReleaseReason::CannotRun, why, permit);
    }
    let started = Instant::now();
    let transform = Arc::clone(&built.transform);
    let limit = common::nats::max_payload(&shared.client);
    let mapped = tokio::select! {
        mapped = on_rayon(&shared.pool, move || {
            let inputs: Vec<&[u8]> = objects.iter().map(|r| &payload[r.clone()]).collect();
            map_chunk(&inputs, &head, &result_head, &built, limit).map_err(|e| e.to_string())
        }) => Some(mapped),
        _ = shared.hard_stop.cancelled() => None,
    };
    // A transform that broke down on this chunk (a command whose fresh children all fail): its
    // objects' failures say nothing about them, so none is dead-lettered.
    if let Some(why) = transform.broken() {
        return Transformed::GiveBack(ReleaseReason::CannotRun, why, permit);
    }
    let took = started.elapsed().as_secs_f64();
    shared.metrics.busy.inc_by(took);
    match mapped {
        // The grace period ended mid-transform: not the chunk's fault, hand it back as such.
        None => Transformed::GiveBack(ReleaseReason::Shutdown, "shutting down mid-transform".into(), permit),
        Some(Err(error)) => Transformed::GiveBack(ReleaseReason::Failed, error, permit),
        Some(Ok(_)) if probe => Transformed::Probed(permit),
        Some(Ok(mapped)) => {
            shared.metrics.transform.observe(took);
            if mapped.dead > 0 {
                shared.metrics.failures.with_label_values(&["object"]).inc_by(mapped.dead);
                tracing::warn!(
                    chunk = chunk.0,
                    "chunk {chunk}: {} objects could not be transformed; they go to the dead-letter record",
                    mapped.dead
                );
            }
            Transformed::Deliver { body: Bytes::from(mapped.body), objects: mapped.objects, permit }
        }
    }
}

/// Where each object of a decoded work reply's chunk lies in the reply's bytes: a transformer
/// slices them from the reply instead of decoding it again.
pub(crate) fn object_ranges(payload: &[u8], objects: &[&serde_json::value::RawValue]) -> Option<Vec<Range<usize>>> {
    let base = payload.as_ptr() as usize;
    objects
        .iter()
        .map(|raw| {
            let start = (raw.get().as_ptr() as usize).checked_sub(base)?;
            let end = start + raw.get().len();
            (end <= payload.len()).then_some(start..end)
        })
        .collect()
}

/// Fault injection for tests, never set in production: the object whose bytes hold this id
/// (`CHUNKMILL_TEST_PANIC_ID`) makes the transform panic, standing in for a poison object; the
/// one with `CHUNKMILL_TEST_ABORT_ID` aborts the whole mapper, standing in for an object that
/// kills every process that touches it (a segfault, an OOM).
fn hook(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.is_empty()).map(|id| format!("\"{id}\""))
}

fn hooks() -> &'static (Option<String>, Option<String>) {
    static HOOKS: std::sync::OnceLock<(Option<String>, Option<String>)> = std::sync::OnceLock::new();
    HOOKS.get_or_init(|| (hook("CHUNKMILL_TEST_PANIC_ID"), hook("CHUNKMILL_TEST_ABORT_ID")))
}

/// The transform with the test hooks in front: they fire on the object whose id (the job's id
/// field) is the hook's, or, for a job without ids, that holds it anywhere.
struct Hooked<'a> {
    inner: &'a dyn Transform,
    id_field: Option<&'a transform::IdField>,
    panic_on: Option<&'a str>,
    abort_on: Option<&'a str>,
}

impl Hooked<'_> {
    fn holds(&self, input: &[u8], marker: &str) -> bool {
        match self.id_field {
            Some(field) => field.extract(input).is_some_and(|id| format!("\"{id}\"") == marker),
            None => input.windows(marker.len()).any(|w| w == marker.as_bytes()),
        }
    }
}

impl Transform for Hooked<'_> {
    fn apply(&self, input: &[u8], out: &mut Outputs) -> Result<(), ObjectError> {
        if self.abort_on.is_some_and(|m| self.holds(input, m)) {
            eprintln!("aborting on a poison object (CHUNKMILL_TEST_ABORT_ID)");
            std::process::abort();
        }
        if let Some(marker) = self.panic_on.filter(|m| self.holds(input, m)) {
            panic!("poison object {} (CHUNKMILL_TEST_PANIC_ID)", marker.trim_matches('"'));
        }
        self.inner.apply(input, out)
    }
}

/// A chunk whose result is over the NATS server's max_payload although each object's outputs
/// fit one message alone: the lease is released with this, and a smaller chunk size would help.
#[derive(Debug, thiserror::Error)]
#[error(
    "chunk {chunk}: its result is {bytes} bytes, over the NATS server's max_payload ({limit} bytes), though each object's outputs fit alone; the largest: {largest}; a fetcher --chunk-size of at most {fits} would fit them (that is another run), or raise max_payload"
)]
pub struct ResultTooLarge {
    chunk: protocol::ChunkId,
    bytes: usize,
    limit: usize,
    /// The largest objects, for people: `object 3 (line 4, id X): 600000 bytes, ...`.
    largest: String,
    /// How many of this chunk's largest objects fit one result.
    fits: usize,
}

/// What became of each object of a chunk: its outputs, its error, or `None` when the fetcher
/// said to skip it.
type PerObject = Vec<Option<Result<Outputs, ObjectError>>>;

/// Transforms one chunk's objects under `built` and encodes the result, in at most `limit` bytes
/// (the NATS server's max_payload). Objects the fetcher said to skip are dead-lettered as
/// `killed` without being run; an object whose own outputs cannot fit one message is
/// dead-lettered alone as `too_large`. If the rest still does not fit, nothing is sent: the
/// error names the largest objects and a chunk size that would fit.
pub fn map_chunk(
    inputs: &[&[u8]],
    head: &ChunkHead,
    result: &ResultHead,
    built: &Built,
    limit: usize,
) -> Result<MappedChunk, ResultTooLarge> {
    let mut per_object = transform_objects(inputs, head, built);
    // An id longer than the protocol allows is sent as null: the saver would refuse the whole
    // result otherwise, and an object without a usable id is still saved by index.
    let ids: Option<Vec<Option<String>>> = built.job.id_field.as_ref().map(|field| {
        inputs.iter().map(|input| field.extract(input).filter(|id| id.len() <= protocol::MAX_ID)).collect()
    });
    let chunk = Encoding { head, result, ids: ids.as_deref() };
    let mut dead = chunk.dead(&per_object);
    let mut body = chunk.encode(&per_object, &dead);
    if body.len() > limit {
        chunk.set_aside_too_large(&mut per_object, limit);
        dead = chunk.dead(&per_object);
        body = chunk.encode(&per_object, &dead);
        if body.len() > limit {
            return Err(chunk.too_large(&per_object, &dead, body.len(), limit));
        }
    }
    Ok(MappedChunk { body, objects: inputs.len() as u64, dead: dead.len() as u64 })
}

/// Runs the transform (with the test hooks, when set) on the objects the fetcher did not say to
/// skip.
fn transform_objects(inputs: &[&[u8]], head: &ChunkHead, built: &Built) -> PerObject {
    let skip: std::collections::HashSet<u32> = head.skip.iter().map(|s| s.index).collect();
    let run: Vec<usize> = (0..inputs.len()).filter(|i| !skip.contains(&(*i as u32))).collect();
    let run_inputs: Vec<&[u8]> = run.iter().map(|&i| inputs[i]).collect();
    let (panic_on, abort_on) = hooks();
    let outcomes = if panic_on.is_some() || abort_on.is_some() {
        let hooked = Hooked {
            inner: built.transform.as_ref(),
            id_field: built.job.id_field.as_ref(),
            panic_on: panic_on.as_deref(),
            abort_on: abort_on.as_deref(),
        };
        hooked.apply_chunk(&run_inputs)
    } else {
        built.transform.apply_chunk(&run_inputs)
    };
    let mut per_object: PerObject = (0..inputs.len()).map(|_| None).collect();
    for (i, outcome) in run.into_iter().zip(outcomes) {
        per_object[i] = Some(outcome);
    }
    per_object
}

/// The bytes an object's outputs take in a result: `[v1,v2]`.
fn encoded_size(outputs: &Outputs) -> usize {
    2 + outputs.iter().map(<[u8]>::len).sum::<usize>() + outputs.len().saturating_sub(1)
}

/// How one chunk's result is written.
struct Encoding<'a> {
    head: &'a ChunkHead,
    result: &'a ResultHead,
    ids: Option<&'a [Option<String>]>,
}

impl Encoding<'_> {
    /// The dead objects of `per_object`, by ascending index.
    fn dead(&self, per_object: &PerObject) -> Vec<DeadObject> {
        let skip: HashMap<u32, &str> = self.head.skip.iter().map(|s| (s.index, s.error.as_str())).collect();
        let mut dead = Vec::new();
        for (i, outcome) in per_object.iter().enumerate() {
            let (cause, error) = match outcome {
                Some(Ok(_)) => continue,
                Some(Err(e)) => (e.cause, e.message.clone()),
                None => (Cause::Killed, skip.get(&(i as u32)).map(|s| s.to_string()).unwrap_or_default()),
            };
            dead.push(DeadObject {
                index: i as u32,
                id: self.ids.and_then(|ids| ids[i].clone()),
                cause,
                error: protocol::truncate_to(error, protocol::MAX_REASON),
                line: Some(self.head.line_of(i)),
            });
        }
        dead
    }

    fn encode(&self, per_object: &PerObject, dead: &[DeadObject]) -> Vec<u8> {
        let empty = Outputs::default();
        let values = per_object.iter().map(|o| match o {
            Some(Ok(outputs)) => outputs.iter(),
            _ => empty.iter(),
        });
        protocol::encode_result(self.result, values, self.ids, dead)
    }

    /// The result's bytes besides the objects' outputs: the head, the ids, the dead objects, a
    /// `[]` per object.
    fn overhead(&self, per_object: &PerObject) -> usize {
        let nothing: PerObject = per_object.iter().map(|_| None).collect();
        self.encode(&nothing, &self.dead(per_object)).len()
    }

    /// Dead-letters as `too_large` each object whose outputs cannot fit one result beside the
    /// rest of it; again as long as setting one aside (its entry takes room) makes another so.
    fn set_aside_too_large(&self, per_object: &mut PerObject, limit: usize) {
        loop {
            let overhead = self.overhead(per_object);
            let mut more = false;
            for outcome in per_object.iter_mut() {
                let Some(Ok(outputs)) = outcome else { continue };
                let size = encoded_size(outputs);
                if overhead.saturating_sub(2) + size > limit {
                    let message = format!(
                        "its {} outputs are {size} bytes in a result, and one result message holds at most {limit} bytes (the NATS server's max_payload), so they cannot be sent; raise max_payload or make the transform give less for it",
                        outputs.len()
                    );
                    *outcome = Some(Err(ObjectError { cause: Cause::TooLarge, message }));
                    more = true;
                }
            }
            if !more {
                return;
            }
        }
    }

    /// Why a result of `bytes` bytes with every object fitting alone is still over `limit`.
    fn too_large(&self, per_object: &PerObject, dead: &[DeadObject], bytes: usize, limit: usize) -> ResultTooLarge {
        let mut sizes: Vec<(usize, usize)> = per_object
            .iter()
            .enumerate()
            .filter_map(|(i, o)| match o {
                Some(Ok(outputs)) => Some((i, encoded_size(outputs))),
                _ => None,
            })
            .collect();
        sizes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let nothing: PerObject = per_object.iter().map(|_| None).collect();
        let mut room = limit.saturating_sub(self.encode(&nothing, dead).len());
        let mut fits = 0;
        for &(_, size) in &sizes {
            if size > room {
                break;
            }
            room -= size;
            fits += 1;
        }
        let largest = sizes
            .iter()
            .take(3)
            .map(|&(i, size)| {
                let id = self.ids.and_then(|ids| ids[i].as_deref());
                let id = id.map(|id| format!(", id {}", common::text::escaped_max(id, 64))).unwrap_or_default();
                format!("object {i} (line {}{id}): {size} bytes", self.head.line_of(i))
            })
            .collect::<Vec<_>>()
            .join(", ");
        ResultTooLarge { chunk: self.result.chunk, bytes, limit, largest, fits: fits.max(1) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::protocol::{ChunkResult, Skip};
    use transform::{JobArgs, Registry};
    use uuid::Uuid;

    transform::jq_sandbox_entry!();

    fn head() -> ChunkHead {
        ChunkHead {
            chunk: common::protocol::ChunkId(3),
            lease: Uuid::from_u128(9),
            attempt: 1,
            first_line: 301,
            lines: None,
            skip: vec![],
            probe: false,
        }
    }

    fn result_head() -> ResultHead {
        ResultHead {
            run: "0123456789abcdef".into(),
            job: "00000000000000aa".into(),
            chunk: common::protocol::ChunkId(3),
            lease: Uuid::from_u128(9),
            attempt: 1,
            mapper: "m1".into(),
        }
    }

    fn built(args: JobArgs) -> Built {
        let job = args.job().unwrap();
        let registry = Registry::builtin().with_jq_options(jq_test_options());
        Built { transform: registry.build(&job.transform).unwrap(), job }
    }

    #[test]
    fn a_chunk_maps_to_one_result_with_outputs_per_object_and_ids() {
        let inputs: Vec<&[u8]> = vec![
            br#"{"uuid":"6f1c2f64-3b7e-4b8e-9a51-0c7d2b0c9d11","fn":"Ada","ln":"Lovelace","friends":["a"]}"#,
            br#"{"uuid":"7f1c2f64-3b7e-4b8e-9a51-0c7d2b0c9d11","fn":"Alan","ln":"Turing","friends":[]}"#,
        ];
        let mapped = map_chunk(&inputs, &head(), &result_head(), &built(JobArgs::digest(1)), usize::MAX).unwrap();
        assert_eq!((mapped.objects, mapped.dead), (2, 0));
        let result: ChunkResult = protocol::decode(&mapped.body).unwrap();
        assert_eq!(result.head, result_head());
        assert_eq!(result.outputs.len(), 2);
        let second: serde_json::Value = serde_json::from_str(result.outputs[1][0].get()).unwrap();
        assert_eq!(second["name"], "Alan Turing");
        assert!(result.validate().is_ok());
        assert_eq!(result.ids.unwrap()[0].as_deref(), Some("6f1c2f64-3b7e-4b8e-9a51-0c7d2b0c9d11"));
    }

    #[test]
    fn refused_and_skipped_objects_are_dead_lettered_by_index_cause_and_line() {
        let inputs: Vec<&[u8]> = vec![
            br#"{"uuid":"6f1c2f64-3b7e-4b8e-9a51-0c7d2b0c9d11","fn":"Ada","ln":"Lovelace","friends":[]}"#,
            br#"{"uuid":"not-a-uuid","fn":"X","ln":"Y","friends":[]}"#,
            br#"{"uuid":"8f1c2f64-3b7e-4b8e-9a51-0c7d2b0c9d11","fn":"K","ln":"L","friends":[]}"#,
        ];
        let mut head = head();
        head.skip = vec![Skip { index: 2, error: "its mapper died 3 times".into() }];
        let mapped = map_chunk(&inputs, &head, &result_head(), &built(JobArgs::digest(0)), usize::MAX).unwrap();
        let result: ChunkResult = protocol::decode(&mapped.body).unwrap();
        assert_eq!(result.outputs.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 0, 0]);
        assert_eq!(result.dead.len(), 2);
        assert_eq!((result.dead[0].index, result.dead[0].cause, result.dead[0].line), (1, Cause::Transform, Some(302)));
        assert_eq!(result.dead[0].id.as_deref(), Some("not-a-uuid"));
        assert_eq!((result.dead[1].index, result.dead[1].cause), (2, Cause::Killed));
        assert_eq!(result.dead[1].error, "its mapper died 3 times");
        assert!(result.validate().is_ok());
    }

    fn jq_with_ids(filter: &str) -> Built {
        let mut args = JobArgs::jq(filter);
        args.id_field = Some(".id".into());
        built(args)
    }

    #[test]
    fn an_object_whose_outputs_cannot_fit_one_message_is_dead_lettered_alone_with_its_size_and_the_limit() {
        let records: Vec<String> =
            (0..10).map(|i| format!(r#"{{"id":"o-{i}","n":{}}}"#, if i == 3 { 2000 } else { 3 })).collect();
        let inputs: Vec<&[u8]> = records.iter().map(|r| r.as_bytes()).collect();
        let mapped =
            map_chunk(&inputs, &head(), &result_head(), &jq_with_ids("range(.n)"), 4096).expect("the rest fits");
        assert!(mapped.body.len() <= 4096, "{} bytes", mapped.body.len());
        assert_eq!((mapped.objects, mapped.dead), (10, 1));
        let result: ChunkResult = protocol::decode(&mapped.body).unwrap();
        assert!(result.validate().is_ok());
        let dead = &result.dead[0];
        assert_eq!(
            (dead.index, dead.id.as_deref(), dead.cause, dead.line),
            (3, Some("o-3"), Cause::TooLarge, Some(304))
        );
        assert!(
            dead.error.contains("its 2000 outputs are") && dead.error.contains("at most 4096 bytes"),
            "{}",
            dead.error
        );
        assert_eq!(result.outputs.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 3, 0, 3, 3, 3, 3, 3, 3]);
    }

    #[test]
    fn a_result_over_the_limit_whose_objects_each_fit_names_the_largest_and_a_chunk_size_that_fits() {
        let records: Vec<String> = (0..10).map(|i| format!(r#"{{"id":"o-{i}","n":{}}}"#, 300 + i)).collect();
        let inputs: Vec<&[u8]> = records.iter().map(|r| r.as_bytes()).collect();
        let error = map_chunk(&inputs, &head(), &result_head(), &jq_with_ids("[range(.n)]"), 4096)
            .expect_err("over the limit")
            .to_string();
        assert!(error.contains("chunk 3: its result is") && error.contains("max_payload (4096 bytes)"), "{error}");
        assert!(error.contains("the largest: object 9 (line 310, id o-9): 1"), "{error}");
        assert!(error.contains("--chunk-size of at most 3 "), "{error}");
        // Under the limit, the same chunk is one result as before.
        assert!(map_chunk(&inputs, &head(), &result_head(), &jq_with_ids("[range(.n)]"), 1 << 20).is_ok());
    }

    #[test]
    fn object_ranges_point_into_the_reply() {
        let payload = br#"{"objects":[{"a":1}, {"b":[2]}]}"#;
        #[derive(serde::Deserialize)]
        struct R<'a> {
            #[serde(borrow)]
            objects: Vec<&'a serde_json::value::RawValue>,
        }
        let r: R = serde_json::from_slice(payload).unwrap();
        let ranges = object_ranges(payload, &r.objects).unwrap();
        assert_eq!(&payload[ranges[1].clone()], br#"{"b":[2]}"#);
    }
}
