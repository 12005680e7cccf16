//! The CPU side of the mapper: turn one chunk (the fetcher's reply) into the saver's message.
//! Runs on the rayon pool, never on tokio's threads. Each object is transformed on its own and
//! inside `catch_unwind`, so one poison object becomes a dead-letter entry naming it, not a
//! crashed mapper or a lost chunk.

use std::panic::{catch_unwind, AssertUnwindSafe};

use common::protocol::{self, ChunkResult, DeadObject, WorkReply, VERSION};
use common::transform::{parse_input, transform, MappedUser};
use rayon::prelude::*;

/// A transformed chunk, encoded for the saver.
#[derive(Debug)]
pub struct MappedChunk {
    /// The encoded [`ChunkResult`].
    pub body: Vec<u8>,
    /// Records in it.
    pub records: u64,
    /// Objects dead-lettered in it.
    pub dead: u64,
}

/// Transforms the chunk in `payload` (a work reply of type `chunk`) into an encoded
/// [`ChunkResult`]. Errors only when the payload itself is unusable.
pub fn map_chunk(payload: &[u8], rounds: u32, mapper: &str) -> Result<MappedChunk, String> {
    let reply: WorkReply = protocol::decode(payload).map_err(|e| e.to_string())?;
    let lease = reply.lease.ok_or("work reply without a lease")?;
    let objects = reply.objects.ok_or("work reply without objects")?;
    let outcomes: Vec<Result<MappedUser, DeadObject>> = objects
        .par_iter()
        .enumerate()
        .map(|(index, raw)| map_one(index as u32, raw.get().as_bytes(), rounds))
        .collect();
    let mut records = Vec::with_capacity(outcomes.len());
    let mut dead = Vec::new();
    for outcome in outcomes {
        match outcome {
            Ok(record) => records.push(record),
            Err(d) => dead.push(d),
        }
    }
    let (saved, failed) = (records.len() as u64, dead.len() as u64);
    let result = ChunkResult {
        v: VERSION,
        run: lease.run,
        chunk: lease.chunk,
        lease: lease.lease,
        attempt: lease.attempt,
        mapper: mapper.to_string(),
        records,
        dead,
    };
    let body = serde_json::to_vec(&result).map_err(|e| e.to_string())?;
    Ok(MappedChunk { body, records: saved, dead: failed })
}

/// Fault injection for tests: the transform panics on the object with this id
/// (`CHUNKMILL_TEST_PANIC_ID`), standing in for a poison object. Unset in production.
fn poison_id() -> Option<&'static str> {
    static POISON: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    POISON.get_or_init(|| std::env::var("CHUNKMILL_TEST_PANIC_ID").ok().filter(|s| !s.is_empty())).as_deref()
}

fn map_one(index: u32, raw: &[u8], rounds: u32) -> Result<MappedUser, DeadObject> {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        parse_input(raw).map(|user| {
            if poison_id() == Some(user.uuid.as_ref()) {
                panic!("poison object {} (CHUNKMILL_TEST_PANIC_ID)", user.uuid);
            }
            transform(&user, rounds)
        })
    }));
    let error = match outcome {
        Ok(Ok(record)) => return Ok(record),
        Ok(Err(e)) => e,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            format!("the transform panicked: {what}")
        }
    };
    #[derive(serde::Deserialize)]
    struct IdOnly {
        uuid: String,
    }
    let id = serde_json::from_slice::<IdOnly>(raw).ok().map(|u| u.uuid).filter(|id| id.len() <= protocol::MAX_ID);
    Err(DeadObject { index, id, error: protocol::truncate_to(error, protocol::MAX_REASON) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::protocol::{encode_chunk_reply, ChunkLease};
    use uuid::Uuid;

    fn lease() -> ChunkLease {
        ChunkLease {
            run: "0123456789abcdef".into(),
            chunk: 3,
            lease: Uuid::from_u128(9),
            attempt: 1,
            lease_ms: 5000,
            first_line: 301,
        }
    }

    #[test]
    fn a_chunk_maps_to_a_result_with_the_lease_and_one_record_per_object() {
        let objects = br#"{"uuid":"6f1c2f64-3b7e-4b8e-9a51-0c7d2b0c9d11","fn":"Ada","ln":"Lovelace","friends":["a"]},{"uuid":"7f1c2f64-3b7e-4b8e-9a51-0c7d2b0c9d11","fn":"Alan","ln":"Turing","friends":[]}"#;
        let mapped = map_chunk(&encode_chunk_reply(&lease(), objects), 1, "m1").expect("maps");
        assert_eq!((mapped.records, mapped.dead), (2, 0));
        let bytes = mapped.body;
        let result: ChunkResult = protocol::decode(&bytes).expect("valid result");
        assert_eq!((result.chunk, result.lease, result.attempt), (3, Uuid::from_u128(9), 1));
        assert_eq!(result.records.len(), 2);
        assert_eq!(result.records[1].name, "Alan Turing");
        assert_eq!(result.records[0].digest, common::transform::digest(&result.records[0].id, "Ada Lovelace", 1));
        assert!(result.dead.is_empty());
    }

    #[test]
    fn a_bad_object_is_dead_lettered_by_index_and_id_and_the_rest_is_mapped() {
        let objects = br#"{"uuid":"6f1c2f64-3b7e-4b8e-9a51-0c7d2b0c9d11","fn":"Ada","ln":"Lovelace","friends":[]},{"uuid":"not-a-uuid","fn":"X","ln":"Y","friends":[]},{"fn":7}"#;
        let mapped = map_chunk(&encode_chunk_reply(&lease(), objects), 0, "m1").expect("maps");
        assert_eq!((mapped.records, mapped.dead), (1, 2));
        let bytes = mapped.body;
        let result: ChunkResult = protocol::decode(&bytes).expect("valid result");
        assert_eq!(result.records.len(), 1);
        assert_eq!(result.dead.len(), 2);
        assert_eq!(result.dead[0].index, 1);
        assert_eq!(result.dead[0].id.as_deref(), Some("not-a-uuid"));
        assert!(result.dead[1].error.contains("expected a string"), "{}", result.dead[1].error);
        assert_eq!(result.dead[1].id, None);
    }

    #[test]
    fn an_unusable_payload_is_an_error_not_a_panic() {
        assert!(map_chunk(b"\x00garbage", 0, "m").is_err());
        assert!(map_chunk(br#"{"v":1,"type":"idle"}"#, 0, "m").is_err());
    }
}
