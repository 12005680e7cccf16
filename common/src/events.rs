//! Pipeline events: what the fetcher tells people about a run (started, every 10 %, a chunk
//! dead-lettered, completed, resumed after a restart), published to JetStream on
//! `<prefix>.events.<kind>` and turned into chat messages by the broadcaster.
//! docs/PROTOCOL.md §11 is the prose version of this file; keep the two in step.
//!
//! Every event has an `id` that names the *fact*, not the message: a fetcher that emits the same
//! fact again after a crash produces the same id (`<run>.started`, `<run>.progress.30`,
//! `<run>.dead.<chunk>`, `<run>.completed`), so the stream's duplicate window and the
//! broadcaster's claim record both drop the repeat. A resume is a new fact each time, so its id
//! carries a fresh UUID.

use serde::{Deserialize, Serialize};

use crate::protocol::ProtocolError;

/// The version of the event format (docs/PROTOCOL.md §11). Events are off the data path and
/// versioned apart from it: protocol 2 of the data path left them unchanged.
pub const VERSION: u32 = 1;

/// The JetStream stream the broadcaster creates for events (subjects `<prefix>.events.>`).
pub const DEFAULT_STREAM: &str = "CHUNKMILL_EVENTS";

/// One pipeline event: the envelope every kind shares plus the kind's own fields.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// Protocol version.
    pub v: u32,
    /// Unique and deterministic per fact (see the module docs).
    pub id: String,
    /// The run id (16 lowercase hex digits).
    pub run: String,
    /// When the fetcher emitted it, Unix time in milliseconds.
    pub at: u64,
    /// What happened; on the wire `"kind"` plus the kind's fields at the top level.
    #[serde(flatten)]
    pub body: EventBody,
}

/// What happened, by kind.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventBody {
    /// A fresh run began: the input is scanned and the fetcher serves work.
    Started {
        /// Valid input objects.
        objects: u64,
        /// Chunks.
        chunks: u64,
        /// Objects per chunk.
        chunk_size: u32,
        /// The job in a few words (`digest (3000 rounds)`, `jq '.a'`); empty from an older
        /// fetcher.
        #[serde(default)]
        transform: String,
    },
    /// The run passed a milestone (10, 20, ... 90 % of its chunks done or dead-lettered).
    Progress {
        /// The milestone: a multiple of 10 from 10 to 90.
        percent: u32,
        /// Chunks done or dead-lettered.
        chunks_done: u64,
        /// Chunks in the run.
        chunks: u64,
        /// Objects durably saved.
        objects_done: u64,
        /// Valid input objects.
        objects: u64,
        /// Milliseconds since this fetcher started serving.
        elapsed_ms: u64,
    },
    /// A chunk was dead-lettered: it will not be processed.
    ChunkDead {
        /// Chunk index.
        chunk: crate::protocol::ChunkId,
        /// Why (the last error).
        reason: String,
        /// 1-based input line of its first object.
        first_line: u64,
        /// Objects in it.
        objects: u64,
    },
    /// Every chunk is done or dead-lettered.
    Completed {
        /// Chunks in the run.
        chunks: u64,
        /// Valid input objects.
        objects: u64,
        /// Milliseconds since this fetcher started serving (a resumed run counts from the resume).
        duration_ms: u64,
        /// Chunks dead-lettered.
        dead_chunks: u64,
        /// Objects a mapper could not transform.
        dead_objects: u64,
        /// Invalid input records skipped.
        bad_records: u64,
    },
    /// A fetcher restarted and picked up an unfinished run from its durable ledger.
    Resumed {
        /// Chunks in the run.
        chunks: u64,
        /// Chunks already done.
        chunks_done: u64,
        /// Chunks already dead-lettered.
        chunks_dead: u64,
        /// The fetcher instance that resumed.
        instance: String,
    },
}

impl EventBody {
    /// The kind as it appears in `"kind"` and in the subject.
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::Started { .. } => "started",
            EventBody::Progress { .. } => "progress",
            EventBody::ChunkDead { .. } => "chunk_dead",
            EventBody::Completed { .. } => "completed",
            EventBody::Resumed { .. } => "resumed",
        }
    }
}

/// Every kind, for metrics labels.
pub const KINDS: [&str; 5] = ["started", "progress", "chunk_dead", "completed", "resumed"];

impl Event {
    /// An event of `run` with its deterministic id, stamped now.
    pub fn new(run: &str, body: EventBody) -> Self {
        let id = match &body {
            EventBody::Started { .. } => format!("{run}.started"),
            EventBody::Progress { percent, .. } => format!("{run}.progress.{percent}"),
            EventBody::ChunkDead { chunk, .. } => format!("{run}.dead.{chunk}"),
            EventBody::Completed { .. } => format!("{run}.completed"),
            EventBody::Resumed { .. } => format!("{run}.resumed.{}", uuid::Uuid::new_v4().simple()),
        };
        Event { v: VERSION, id, run: run.to_string(), at: unix_ms(), body }
    }

    /// The kind (`started`, `progress`, ...).
    pub fn kind(&self) -> &'static str {
        self.body.kind()
    }

    /// The subject it is published on under `prefix`.
    pub fn subject(&self, prefix: &str) -> String {
        format!("{prefix}.events.{}", self.kind())
    }
}

/// The subjects of all events under `prefix` (the stream's filter).
pub fn events_wildcard(prefix: &str) -> String {
    format!("{prefix}.events.>")
}

/// Decodes an event, checking its version; never panics.
pub fn decode(payload: &[u8]) -> Result<Event, ProtocolError> {
    #[derive(serde::Deserialize)]
    struct VersionOnly {
        v: u32,
    }
    let version: VersionOnly = serde_json::from_slice(payload)?;
    if version.v != VERSION {
        return Err(ProtocolError::Version(version.v));
    }
    let event: Event = serde_json::from_slice(payload)?;
    if event.id.is_empty() || event.id.len() > 512 {
        return Err(ProtocolError::Invalid(format!("event id of {} bytes (1 to 512 allowed)", event.id.len())));
    }
    Ok(event)
}

/// Now as Unix milliseconds (0 if the clock is before 1970).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_the_fact_so_a_repeat_has_the_same_id() {
        let run = "0123456789abcdef";
        let progress = |percent| EventBody::Progress {
            percent,
            chunks_done: 3,
            chunks: 10,
            objects_done: 300,
            objects: 1000,
            elapsed_ms: 5,
        };
        assert_eq!(Event::new(run, progress(30)).id, "0123456789abcdef.progress.30");
        assert_eq!(Event::new(run, progress(30)).id, Event::new(run, progress(30)).id);
        let dead = EventBody::ChunkDead {
            chunk: crate::protocol::ChunkId(7),
            reason: "x".into(),
            first_line: 701,
            objects: 100,
        };
        assert_eq!(Event::new(run, dead).id, "0123456789abcdef.dead.7");
        let resumed =
            || EventBody::Resumed { chunks: 10, chunks_done: 3, chunks_dead: 0, instance: "fetcher-0".into() };
        let (a, b) = (Event::new(run, resumed()), Event::new(run, resumed()));
        assert_ne!(a.id, b.id, "each resume is a new fact");
        assert!(a.id.starts_with("0123456789abcdef.resumed."));
    }

    #[test]
    fn events_round_trip_with_kind_at_the_top_level() {
        let event = Event {
            v: 1,
            id: "0123456789abcdef.completed".into(),
            run: "0123456789abcdef".into(),
            at: 1_700_000_000_000,
            body: EventBody::Completed {
                chunks: 1000,
                objects: 100_000,
                duration_ms: 41_000,
                dead_chunks: 0,
                dead_objects: 0,
                bad_records: 0,
            },
        };
        let json = String::from_utf8(crate::protocol::encode(&event).to_vec()).unwrap();
        assert!(json.contains(r#""kind":"completed""#), "{json}");
        assert_eq!(decode(json.as_bytes()).unwrap(), event);
        assert_eq!(event.subject("chunkmill"), "chunkmill.events.completed");
    }

    #[test]
    fn unknown_kinds_versions_and_garbage_are_errors_not_panics() {
        assert!(decode(br#"{"v":1,"id":"a","run":"r","at":0,"kind":"exploded"}"#).is_err());
        assert!(matches!(
            decode(br#"{"v":2,"id":"a","run":"r","at":0,"kind":"started"}"#),
            Err(ProtocolError::Version(2))
        ));
        assert!(decode(br#"{"v":1,"id":"","run":"r","at":0,"kind":"started","objects":1,"chunks":1,"chunk_size":1}"#)
            .is_err());
        assert!(decode(b"\xff\x00").is_err());
    }
}
