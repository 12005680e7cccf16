//! The commit of a run, decided from what is staged: pure, tested without a store.
//!
//! Two savers can both stage a chunk (a re-lease after a slow saver; a saver killed after its
//! index and before its ack): both copies are correct outputs of the chunk (any single one, even
//! for a command that is not deterministic), and exactly one may be committed. The rule needs no
//! record of who won: of a chunk's copies, the one in the batch that sorts first by
//! `(writer, seq)` is taken. Parts are filled with the taken chunks in that same order, batch
//! after batch, so that a committer reads each staged object once, front to back; a part is cut
//! at a chunk's end once it holds `part_bytes`. The plan is written once (create-only) before any
//! part, so whoever finishes the commit follows the same plan.

use std::collections::BTreeMap;

use common::protocol::ChunkId;

use super::layout::{
    part_extension, part_name, BatchIndex, CommitPlan, Compression, DeadLine, Format, PartChunk, PartPlan, Source,
    LAYOUT_VERSION,
};

/// Why a run cannot be committed from what is staged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum PlanError {
    /// Chunks the fetcher counted done have no staged copy (staged objects deleted by hand?).
    #[error("{count} of the run's {chunks} chunks have no staged copy (the first: {first}); the run's staging area under _staging/ was changed outside chunkmill")]
    Missing {
        /// How many.
        count: usize,
        /// Of how many.
        chunks: u32,
        /// The first missing chunk.
        first: ChunkId,
    },
    /// A staged batch names a chunk the run does not have.
    #[error("staged batch {writer}/{seq} holds chunk {chunk}, but the run has {chunks} chunks")]
    Outside {
        /// The batch's writer.
        writer: String,
        /// Its number.
        seq: u64,
        /// The chunk.
        chunk: ChunkId,
        /// The run's chunks.
        chunks: u32,
    },
}

/// What to commit for the run `run` of `chunks` chunks, from its staged batches' indexes.
pub(crate) fn plan(
    run: &str,
    format: Format,
    compression: Compression,
    chunks: u32,
    mut batches: Vec<BatchIndex>,
    part_bytes: u64,
) -> Result<CommitPlan, PlanError> {
    batches.retain(|b| b.run == run);
    batches.sort_by(|a, b| (&a.writer, a.seq).cmp(&(&b.writer, b.seq)));
    let taken = take_one_copy_each(&batches, chunks)?;
    let extension = part_extension(format, compression);
    let mut builder = Parts::new(part_bytes, extension);
    let mut dead = Vec::new();
    for (at, batch) in batches.iter().enumerate() {
        for staged in batch.chunks.iter().filter(|c| taken.get(&c.chunk) == Some(&at)) {
            builder.add(&batch.data, staged);
            dead.extend(staged.dead.iter().map(|entry| DeadLine { chunk: staged.chunk, entry: entry.clone() }));
        }
    }
    dead.sort_by_key(|line| (line.chunk, line.entry.index));
    let mut staged: Vec<String> =
        batches.iter().flat_map(|b| [b.data.clone(), super::layout::staged_index_name(&b.writer, b.seq)]).collect();
    staged.sort();
    staged.dedup();
    Ok(CommitPlan {
        v: LAYOUT_VERSION,
        run: run.to_string(),
        format,
        compression,
        chunks,
        parts: builder.finish(),
        dead,
        staged,
        schema: None,
    })
}

/// For each chunk, the position (in `batches`, sorted) of the batch whose copy is taken.
fn take_one_copy_each(batches: &[BatchIndex], chunks: u32) -> Result<BTreeMap<ChunkId, usize>, PlanError> {
    let mut taken = BTreeMap::new();
    for (at, batch) in batches.iter().enumerate() {
        for staged in &batch.chunks {
            if staged.chunk.0 >= chunks {
                return Err(PlanError::Outside {
                    writer: batch.writer.clone(),
                    seq: batch.seq,
                    chunk: staged.chunk,
                    chunks,
                });
            }
            taken.entry(staged.chunk).or_insert(at);
        }
    }
    let missing: Vec<ChunkId> = (0..chunks).map(ChunkId).filter(|c| !taken.contains_key(c)).collect();
    match missing.first() {
        Some(first) => Err(PlanError::Missing { count: missing.len(), chunks, first: *first }),
        None => Ok(taken),
    }
}

/// Parts being filled.
struct Parts {
    part_bytes: u64,
    extension: String,
    done: Vec<PartPlan>,
    current: Option<(PartPlan, u64)>,
}

impl Parts {
    fn new(part_bytes: u64, extension: String) -> Self {
        Parts { part_bytes: part_bytes.max(1), extension, done: Vec::new(), current: None }
    }

    fn add(&mut self, object: &str, staged: &super::layout::StagedChunk) {
        let n = self.done.len();
        let extension = &self.extension;
        let (part, bytes) = self.current.get_or_insert_with(|| {
            (PartPlan { name: part_name(n, extension), sources: Vec::new(), chunks: Vec::new() }, 0)
        });
        part.chunks.push(PartChunk { chunk: staged.chunk, objects: staged.objects, values: staged.values });
        if staged.bytes > 0 {
            match part.sources.last_mut() {
                // The next range of the same object: one read.
                Some(last) if last.object == object && last.offset + last.bytes == staged.offset => {
                    last.bytes += staged.bytes;
                }
                _ => {
                    part.sources.push(Source { object: object.to_string(), offset: staged.offset, bytes: staged.bytes })
                }
            }
        }
        *bytes += staged.bytes;
        if *bytes >= self.part_bytes {
            let (full, _) = self.current.take().expect("a part is being filled");
            self.done.push(full);
        }
    }

    /// The parts; at least one, so that every chunk of the run is in some part's list.
    fn finish(mut self) -> Vec<PartPlan> {
        if let Some((part, _)) = self.current.take() {
            self.done.push(part);
        }
        if self.done.is_empty() {
            self.done.push(PartPlan { name: part_name(0, &self.extension), sources: Vec::new(), chunks: Vec::new() });
        }
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::super::layout::StagedChunk;
    use super::*;
    use common::protocol::{Cause, DeadObject};

    /// A batch of `writer` holding `chunks`, each `bytes` long with `bytes` values.
    fn batch(writer: &str, seq: u64, chunks: &[(u32, u64)]) -> BatchIndex {
        let mut offset = 0;
        let staged = chunks
            .iter()
            .map(|&(chunk, bytes)| {
                let c = StagedChunk { chunk: ChunkId(chunk), objects: 10, offset, bytes, values: bytes, dead: vec![] };
                offset += bytes;
                c
            })
            .collect();
        BatchIndex {
            v: 1,
            run: "r".into(),
            writer: writer.into(),
            seq,
            data: format!("_staging/{writer}/{seq:08}.jsonl"),
            bytes: offset,
            compression: Compression::None,
            chunks: staged,
        }
    }

    fn chunk_order(plan: &CommitPlan) -> Vec<u32> {
        plan.parts.iter().flat_map(|p| p.chunks.iter().map(|c| c.chunk.0)).collect()
    }

    #[test]
    fn every_chunk_is_committed_once_and_the_first_copy_by_writer_and_seq_is_taken() {
        // Chunk 2 staged twice: by b (seq 1) and by a (seq 9): a's copy sorts first.
        let batches = vec![batch("b", 1, &[(1, 5), (2, 5)]), batch("a", 9, &[(2, 5), (0, 5)])];
        let plan = plan("r", Format::Jsonl, Compression::None, 3, batches, 1000).unwrap();
        let mut order = chunk_order(&plan);
        assert_eq!(order, vec![2, 0, 1], "a's batch first, then b's without its copy of 2");
        order.sort();
        assert_eq!(order, vec![0, 1, 2], "each chunk once");
        assert_eq!(
            plan.parts[0].sources,
            vec![
                Source { object: "_staging/a/00000009.jsonl".into(), offset: 0, bytes: 10 },
                Source { object: "_staging/b/00000001.jsonl".into(), offset: 0, bytes: 5 },
            ],
            "a's two chunks in one range; b's chunk 1 alone, its copy of 2 left out"
        );
        assert_eq!(plan.staged.len(), 4, "both batches' data and index are staged objects to remove");
    }

    #[test]
    fn the_plan_does_not_depend_on_the_order_the_store_lists_batches_in() {
        let batches =
            vec![batch("b", 1, &[(1, 5), (2, 5)]), batch("a", 9, &[(2, 5), (0, 5)]), batch("a", 3, &[(3, 1)])];
        let mut reversed = batches.clone();
        reversed.reverse();
        let one = plan("r", Format::Jsonl, Compression::Zstd, 4, batches, 8).unwrap();
        let two = plan("r", Format::Jsonl, Compression::Zstd, 4, reversed, 8).unwrap();
        assert_eq!(one, two);
    }

    #[test]
    fn parts_are_cut_at_chunk_ends_once_they_hold_the_part_size() {
        let batches = vec![batch("a", 1, &[(0, 6), (1, 6), (2, 6), (3, 6), (4, 1)])];
        let plan = plan("r", Format::Jsonl, Compression::Gzip, 5, batches, 10).unwrap();
        let parts: Vec<(String, Vec<u32>)> =
            plan.parts.iter().map(|p| (p.name.clone(), p.chunks.iter().map(|c| c.chunk.0).collect())).collect();
        assert_eq!(
            parts,
            vec![
                ("part-00000.jsonl.gz".to_string(), vec![0, 1]),
                ("part-00001.jsonl.gz".to_string(), vec![2, 3]),
                ("part-00002.jsonl.gz".to_string(), vec![4]),
            ]
        );
        assert_eq!(
            plan.parts[1].sources,
            vec![Source { object: "_staging/a/00000001.jsonl".into(), offset: 12, bytes: 12 }]
        );
    }

    #[test]
    fn a_chunk_without_a_staged_copy_stops_the_commit_and_is_named() {
        let batches = vec![batch("a", 1, &[(0, 6), (2, 6)])];
        let err = plan("r", Format::Jsonl, Compression::None, 4, batches, 10).unwrap_err();
        assert_eq!(err, PlanError::Missing { count: 2, chunks: 4, first: ChunkId(1) });
        let outside = vec![batch("a", 1, &[(0, 6), (7, 6)])];
        assert!(matches!(plan("r", Format::Jsonl, Compression::None, 4, outside, 10), Err(PlanError::Outside { .. })));
    }

    #[test]
    fn dead_letters_come_from_the_taken_copies_only_in_chunk_order() {
        let dead = |index| DeadObject { index, id: None, cause: Cause::Transform, error: "no".into(), line: None };
        let mut a = batch("a", 1, &[(1, 0), (0, 3)]);
        a.chunks[0].dead = vec![dead(4)];
        let mut b = batch("b", 1, &[(1, 2)]);
        b.chunks[0].dead = vec![dead(9)];
        let plan = plan("r", Format::Parquet, Compression::None, 2, vec![b, a], 100).unwrap();
        assert_eq!(plan.dead.len(), 1, "b's copy of chunk 1 is not taken");
        assert_eq!((plan.dead[0].chunk, plan.dead[0].entry.index), (ChunkId(1), 4));
        assert_eq!(plan.parts[0].name, "part-00000.parquet");
        assert!(
            plan.parts[0].chunks.iter().any(|c| c.chunk == ChunkId(1) && c.values == 0),
            "an all-dead chunk is listed"
        );
    }

    #[test]
    fn a_run_without_values_still_has_one_part_listing_its_chunks() {
        let plan = plan("r", Format::Jsonl, Compression::None, 0, vec![], 10).unwrap();
        assert_eq!(plan.parts.len(), 1);
        assert!(plan.parts[0].sources.is_empty());
    }
}
