//! The wire protocol between fetcher, mappers and savers: subjects, message types and their
//! JSON encoding. docs/PROTOCOL.md is the prose version of this file; keep the two in step.
//!
//! Every message body is one JSON object with `"v": 1`. Decoding never panics: anything that
//! does not parse, has another version or breaks a rule becomes a [`ProtocolError`] that the
//! service logs, counts and answers (when there is someone to answer) without crashing.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::transform::MappedUser;

/// The protocol version every message carries in `"v"`.
pub const VERSION: u32 = 1;

/// The queue group savers subscribe in, so each result reaches exactly one saver replica.
pub const SAVER_QUEUE_GROUP: &str = "chunkmill-savers";

/// The subjects of one pipeline, all under one prefix (default `chunkmill`).
#[derive(Debug, Clone)]
pub struct Subjects {
    /// mapper → fetcher, request/reply: "I am ready, give me a chunk".
    pub work: String,
    /// mapper → fetcher, request/reply: "I still hold these leases".
    pub extend: String,
    /// mapper → fetcher, request/reply: "I give this lease back" (shutdown or failure).
    pub release: String,
    /// mapper → saver (queue group), request/reply: "save this processed chunk".
    pub result: String,
    /// saver → fetcher, request/reply: "these chunks are durably saved".
    pub ack: String,
    /// fetcher → JetStream → broadcaster: pipeline events are published on `<events>.<kind>`
    /// (see [`crate::events`]).
    pub events: String,
}

impl Subjects {
    /// Subjects under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Subjects {
            work: format!("{prefix}.work"),
            extend: format!("{prefix}.extend"),
            release: format!("{prefix}.release"),
            result: format!("{prefix}.result"),
            ack: format!("{prefix}.ack"),
            events: format!("{prefix}.events"),
        }
    }
}

/// Why a message was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Not JSON, or JSON of the wrong shape.
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// A version this build does not speak.
    #[error("unsupported protocol version {0} (this build speaks version {VERSION})")]
    Version(u32),
    /// Well-formed but breaks a rule of the protocol.
    #[error("invalid message: {0}")]
    Invalid(String),
    /// Larger than any message of its kind can be: refused before it is parsed.
    #[error("a {kind} of {bytes} bytes is over the {max} bytes such a message can be")]
    TooLarge {
        /// Which message.
        kind: &'static str,
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
}

/// The longest instance name (of a mapper or saver) a message may carry, in bytes.
pub const MAX_NAME: usize = 256;
/// The longest free-text reason (a release's error, a dead object's error), in bytes.
pub const MAX_REASON: usize = 4096;
/// The longest object id in a dead-letter entry, in bytes.
pub const MAX_ID: usize = 1024;
/// The most leases one extend request may list, and acks one ack request may carry.
pub const MAX_ITEMS: usize = 1024;

/// Limits on what a message of this type may carry, checked by [`decode_bounded`] so that no
/// peer can make a service hold unbounded strings (1 000 held work requests with 500 kB names
/// once took the fetcher to 502 MiB).
pub trait Bounded {
    /// What the message is called in errors.
    const KIND: &'static str;
    /// Its largest possible encoding, checked before parsing.
    const MAX_BYTES: usize;
    /// The field limits.
    fn check_bounds(&self) -> Result<(), ProtocolError>;
}

fn bounded(what: &str, value: &str, max: usize) -> Result<(), ProtocolError> {
    if value.len() > max {
        return Err(ProtocolError::Invalid(format!("{what} is {} bytes, over the limit of {max}", value.len())));
    }
    Ok(())
}

fn bounded_items(what: &str, count: usize) -> Result<(), ProtocolError> {
    if count > MAX_ITEMS {
        return Err(ProtocolError::Invalid(format!("{count} {what}, over the limit of {MAX_ITEMS} per message")));
    }
    Ok(())
}

/// [`decode`], refusing a message larger than its type allows before parsing it, and one whose
/// fields are over their limits after.
pub fn decode_bounded<'a, T: Deserialize<'a> + Bounded>(payload: &'a [u8]) -> Result<T, ProtocolError> {
    if payload.len() > T::MAX_BYTES {
        return Err(ProtocolError::TooLarge { kind: T::KIND, bytes: payload.len(), max: T::MAX_BYTES });
    }
    let message: T = decode(payload)?;
    message.check_bounds()?;
    Ok(message)
}

/// Cuts `text` to at most `max` bytes at a character boundary: what a sender does with its own
/// free text so that a receiver's limit never refuses an honest message.
pub fn truncate_to(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max.saturating_sub(3);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

#[derive(Deserialize)]
struct VersionOnly {
    v: u32,
}

/// Decodes a message of type `T`, checking the version first so an unknown version is reported
/// as such rather than as a confusing field error.
pub fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, ProtocolError> {
    let version: VersionOnly = serde_json::from_slice(payload)?;
    if version.v != VERSION {
        return Err(ProtocolError::Version(version.v));
    }
    Ok(serde_json::from_slice(payload)?)
}

/// Encodes a message. Serialising these plain structs cannot fail.
pub fn encode<T: Serialize>(message: &T) -> bytes::Bytes {
    serde_json::to_vec(message).map(bytes::Bytes::from).unwrap_or_default()
}

/// mapper → fetcher on [`Subjects::work`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkRequest {
    /// Protocol version.
    pub v: u32,
    /// The mapper's instance name (for the ledger and logs).
    pub mapper: String,
    /// How long the fetcher may hold the request when no chunk is pending (long poll), in ms.
    #[serde(default)]
    pub wait_ms: u64,
}

/// What kind of answer a [`WorkReply`] is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WorkReplyKind {
    /// A leased chunk.
    Chunk,
    /// Nothing to hand out right now; ask again.
    Idle,
    /// The run is complete.
    Done,
}

/// The metadata of a leased chunk; on the wire it is followed by `"objects": [...]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChunkLease {
    /// Run id (see [`crate::input::run_id`]).
    pub run: String,
    /// Chunk index, from 0.
    pub chunk: u64,
    /// Lease id: names this hand-out of the chunk.
    pub lease: Uuid,
    /// 1 for the first hand-out of the chunk, 2 for the second...
    pub attempt: u32,
    /// The lease lasts this long unless extended, in ms.
    pub lease_ms: u64,
    /// 1-based line of the chunk's first object in the input file (for error messages).
    pub first_line: u64,
}

/// fetcher → mapper: the reply to a [`WorkRequest`], as decoded by a mapper.
#[derive(Debug, Deserialize)]
pub struct WorkReply<'a> {
    /// Protocol version.
    pub v: u32,
    /// Chunk, idle or done.
    #[serde(rename = "type")]
    pub kind: WorkReplyKind,
    /// Present for `chunk`.
    #[serde(flatten)]
    pub lease: Option<ChunkLease>,
    /// For `idle` and `done`: when to ask again, in ms.
    #[serde(default)]
    pub retry_ms: Option<u64>,
    /// For `chunk`: the input objects, exactly as they appear in the input file.
    #[serde(borrow, default)]
    pub objects: Option<Vec<&'a RawValue>>,
}

/// Only the lease of a `chunk` reply, read without its objects: a mapper that cannot decode a
/// chunk (bytes that are not UTF-8, say) still learns which lease to give back as failed, so the
/// fetcher's `--max-attempts` can dead-letter the chunk instead of re-leasing it forever.
pub fn decode_lease_only(payload: &[u8]) -> Option<ChunkLease> {
    // No `flatten` here: serde buffers the fields a flattened struct does not know, `objects`
    // included, as strings, which is exactly what fails on bytes that are not UTF-8.
    #[derive(Deserialize)]
    struct Head {
        v: u32,
        #[serde(rename = "type")]
        kind: WorkReplyKind,
        run: String,
        chunk: u64,
        lease: Uuid,
        attempt: u32,
        lease_ms: u64,
        first_line: u64,
    }
    let h: Head = serde_json::from_slice(payload).ok()?;
    (h.v == VERSION && h.kind == WorkReplyKind::Chunk).then_some(ChunkLease {
        run: h.run,
        chunk: h.chunk,
        lease: h.lease,
        attempt: h.attempt,
        lease_ms: h.lease_ms,
        first_line: h.first_line,
    })
}

#[derive(Serialize)]
struct WorkReplyHead<'a> {
    v: u32,
    #[serde(rename = "type")]
    kind: WorkReplyKind,
    #[serde(flatten)]
    lease: &'a ChunkLease,
}

/// Builds a `chunk` reply around `objects`, the input records already joined with commas. The
/// fetcher forwards input bytes without parsing them into a DOM; they were validated when read.
pub fn encode_chunk_reply(lease: &ChunkLease, objects: &[u8]) -> Vec<u8> {
    let head = WorkReplyHead { v: VERSION, kind: WorkReplyKind::Chunk, lease };
    let mut out = serde_json::to_vec(&head).unwrap_or_default();
    out.pop(); // the closing brace: the objects follow
    out.reserve(objects.len() + 16);
    out.extend_from_slice(b",\"objects\":[");
    out.extend_from_slice(objects);
    out.extend_from_slice(b"]}");
    out
}

/// Builds an `idle` or `done` reply.
pub fn encode_status_reply(kind: WorkReplyKind, retry_ms: u64) -> bytes::Bytes {
    encode(&serde_json::json!({"v": VERSION, "type": kind, "retry_ms": retry_ms}))
}

/// One lease a mapper holds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct LeaseRef {
    /// Chunk index.
    pub chunk: u64,
    /// Lease id.
    pub lease: Uuid,
}

/// mapper → fetcher on [`Subjects::extend`]: heartbeat for the leases it still works on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExtendRequest {
    /// Protocol version.
    pub v: u32,
    /// The mapper's instance name.
    pub mapper: String,
    /// Leases to extend.
    pub leases: Vec<LeaseRef>,
}

/// fetcher → mapper: which leases were extended (same order as the request).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExtendReply {
    /// Protocol version.
    pub v: u32,
    /// New lease duration from now, in ms.
    pub lease_ms: u64,
    /// `false`: that lease is no longer valid (expired and re-leased, or the chunk is done).
    pub valid: Vec<bool>,
}

/// Why a mapper gives a lease back.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseReason {
    /// The mapper is shutting down: re-lease at once, this is not the chunk's fault.
    Shutdown,
    /// Processing failed; counts towards the chunk's attempts.
    Failed,
}

/// mapper → fetcher on [`Subjects::release`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReleaseRequest {
    /// Protocol version.
    pub v: u32,
    /// The mapper's instance name.
    pub mapper: String,
    /// The lease given back.
    #[serde(flatten)]
    pub lease: LeaseRef,
    /// Why.
    pub reason: ReleaseReason,
    /// For `failed`: what went wrong.
    #[serde(default)]
    pub error: Option<String>,
}

/// fetcher → mapper: whether the release was taken (false: the lease was no longer current).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReleaseReply {
    /// Protocol version.
    pub v: u32,
    /// The lease was current and is now released.
    pub accepted: bool,
}

/// An input object the mapper could not transform.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeadObject {
    /// Position of the object in the chunk, from 0.
    pub index: u32,
    /// Its `uuid`, when it had a readable one.
    #[serde(default)]
    pub id: Option<String>,
    /// Why it could not be transformed.
    pub error: String,
}

/// mapper → saver on [`Subjects::result`] (queue group [`SAVER_QUEUE_GROUP`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChunkResult {
    /// Protocol version.
    pub v: u32,
    /// Run id from the lease.
    pub run: String,
    /// Chunk index from the lease.
    pub chunk: u64,
    /// Lease id.
    pub lease: Uuid,
    /// Attempt from the lease.
    pub attempt: u32,
    /// The mapper's instance name.
    pub mapper: String,
    /// One mapped object per transformable input object, in input order.
    pub records: Vec<MappedUser>,
    /// Input objects that could not be transformed.
    #[serde(default)]
    pub dead: Vec<DeadObject>,
}

impl ChunkResult {
    /// Checks what a saver must not take on trust before writing anything.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        if !is_valid_run_id(&self.run) {
            return Err(ProtocolError::Invalid(format!("run id {:?} is not 16 lowercase hex digits", self.run)));
        }
        if let Some(bad) = self.dead.iter().find(|d| d.index as usize >= self.records.len() + self.dead.len()) {
            return Err(ProtocolError::Invalid(format!(
                "chunk {}: dead object index {} is outside the chunk",
                self.chunk, bad.index
            )));
        }
        Ok(())
    }

    /// Objects accounted for: saved plus dead-lettered.
    pub fn objects(&self) -> u64 {
        (self.records.len() + self.dead.len()) as u64
    }
}

/// What a saver answers a mapper.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ResultStatus {
    /// Saved durably (now or before) and the fetcher recorded the chunk as done.
    Saved,
    /// Saved durably, but the fetcher did not confirm yet: send the result again later.
    NotAcked,
    /// Could not be saved (sink error): send again later.
    Failed,
    /// The message is invalid and will never be saved: do not resend.
    Rejected,
}

/// saver → mapper: the reply to a [`ChunkResult`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResultReply {
    /// Protocol version.
    pub v: u32,
    /// Outcome.
    pub status: ResultStatus,
    /// For anything but `saved`: why.
    #[serde(default)]
    pub error: Option<String>,
}

/// One durably saved chunk, as a saver reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Ack {
    /// Run id.
    pub run: String,
    /// Chunk index.
    pub chunk: u64,
    /// The lease the saved result came with.
    pub lease: Uuid,
    /// Its attempt.
    pub attempt: u32,
    /// Objects saved plus objects dead-lettered; must equal the chunk's object count.
    pub objects: u64,
    /// Of those, dead-lettered.
    #[serde(default)]
    pub dead: u64,
}

/// saver → fetcher on [`Subjects::ack`]: chunks durably saved (batched).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AckRequest {
    /// Protocol version.
    pub v: u32,
    /// The saver's instance name.
    pub saver: String,
    /// The chunks.
    pub acks: Vec<Ack>,
}

/// How the fetcher took one [`Ack`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AckVerdict {
    /// The chunk is now done.
    Done,
    /// The chunk was already done (a duplicate or late acknowledgement): harmless.
    AlreadyDone,
    /// Unknown run or chunk, or a wrong object count: ignored.
    Unknown,
}

/// fetcher → saver: one verdict per ack, same order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AckReply {
    /// Protocol version.
    pub v: u32,
    /// Verdicts.
    pub verdicts: Vec<AckVerdict>,
}

impl Bounded for WorkRequest {
    const KIND: &'static str = "work request";
    const MAX_BYTES: usize = 4 << 10;
    fn check_bounds(&self) -> Result<(), ProtocolError> {
        bounded("the mapper name", &self.mapper, MAX_NAME)
    }
}

impl Bounded for ExtendRequest {
    const KIND: &'static str = "extend request";
    const MAX_BYTES: usize = 256 << 10;
    fn check_bounds(&self) -> Result<(), ProtocolError> {
        bounded("the mapper name", &self.mapper, MAX_NAME)?;
        bounded_items("leases", self.leases.len())
    }
}

impl Bounded for ReleaseRequest {
    const KIND: &'static str = "release request";
    const MAX_BYTES: usize = 16 << 10;
    fn check_bounds(&self) -> Result<(), ProtocolError> {
        bounded("the mapper name", &self.mapper, MAX_NAME)?;
        bounded("the error", self.error.as_deref().unwrap_or_default(), MAX_REASON)
    }
}

impl Bounded for AckRequest {
    const KIND: &'static str = "ack request";
    const MAX_BYTES: usize = 512 << 10;
    fn check_bounds(&self) -> Result<(), ProtocolError> {
        bounded("the saver name", &self.saver, MAX_NAME)?;
        bounded_items("acks", self.acks.len())?;
        self.acks.iter().try_for_each(|ack| bounded("a run id", &ack.run, 64))
    }
}

impl Bounded for ChunkResult {
    const KIND: &'static str = "chunk result";
    // Bounded by the server's max_payload; nothing a result holds is kept past its save.
    const MAX_BYTES: usize = usize::MAX;
    fn check_bounds(&self) -> Result<(), ProtocolError> {
        bounded("the mapper name", &self.mapper, MAX_NAME)?;
        for dead in &self.dead {
            bounded("a dead object's error", &dead.error, MAX_REASON)?;
            bounded("a dead object's id", dead.id.as_deref().unwrap_or_default(), MAX_ID)?;
        }
        Ok(())
    }
}

/// A run id is 16 lowercase hex digits (it names a directory in the file sink).
pub fn is_valid_run_id(run: &str) -> bool {
    run.len() == 16 && run.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease() -> ChunkLease {
        ChunkLease {
            run: "0123456789abcdef".into(),
            chunk: 7,
            lease: Uuid::from_u128(42),
            attempt: 2,
            lease_ms: 5000,
            first_line: 701,
        }
    }

    #[test]
    fn chunk_reply_round_trips_with_raw_objects() {
        let raw = br#"{"uuid":"a","fn":"A","ln":"B","friends":[]},{"x":1}"#;
        let bytes = encode_chunk_reply(&lease(), raw);
        let reply: WorkReply = decode(&bytes).expect("decodes");
        assert_eq!(reply.kind, WorkReplyKind::Chunk);
        assert_eq!(reply.lease, Some(lease()));
        let objects = reply.objects.expect("objects");
        assert_eq!(objects.len(), 2);
        assert_eq!(objects[1].get(), r#"{"x":1}"#);
    }

    #[test]
    fn the_lease_of_a_chunk_with_undecodable_objects_can_still_be_read() {
        let bytes = encode_chunk_reply(&lease(), b"{\"note\":\"\xff\"}");
        assert!(decode::<WorkReply>(&bytes).is_err(), "the objects are not UTF-8");
        assert_eq!(decode_lease_only(&bytes), Some(lease()));
        assert_eq!(decode_lease_only(&encode_status_reply(WorkReplyKind::Idle, 0)), None);
    }

    #[test]
    fn status_reply_has_no_lease() {
        let bytes = encode_status_reply(WorkReplyKind::Idle, 250);
        let reply: WorkReply = decode(&bytes).expect("decodes");
        assert_eq!(reply.kind, WorkReplyKind::Idle);
        assert_eq!(reply.lease, None);
        assert_eq!(reply.retry_ms, Some(250));
    }

    #[test]
    fn unknown_version_is_reported_as_such() {
        let err = decode::<AckRequest>(br#"{"v":9,"saver":"s","acks":[]}"#).unwrap_err();
        assert!(matches!(err, ProtocolError::Version(9)), "{err}");
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for garbage in [&b"\xff\xfe"[..], b"", b"[]", b"{\"v\":1}", b"{\"v\":\"1\"}"] {
            assert!(decode::<AckRequest>(garbage).is_err());
        }
    }

    #[test]
    fn oversized_messages_and_fields_are_refused() {
        let name = "m".repeat(MAX_NAME + 1);
        let body = encode(&WorkRequest { v: VERSION, mapper: name, wait_ms: 0 });
        assert!(matches!(decode_bounded::<WorkRequest>(&body), Err(ProtocolError::Invalid(_))));
        let huge = encode(&WorkRequest { v: VERSION, mapper: "m".repeat(500_000), wait_ms: 0 });
        let err = decode_bounded::<WorkRequest>(&huge).unwrap_err();
        assert!(matches!(err, ProtocolError::TooLarge { .. }), "{err}");
        let leases = vec![LeaseRef { chunk: 1, lease: Uuid::nil() }; MAX_ITEMS + 1];
        let body = encode(&ExtendRequest { v: VERSION, mapper: "m".into(), leases });
        assert!(decode_bounded::<ExtendRequest>(&body).is_err());
        assert!(
            decode_bounded::<WorkRequest>(&encode(&WorkRequest { v: VERSION, mapper: "m".into(), wait_ms: 5 })).is_ok()
        );
        assert_eq!(truncate_to("ab€cd".into(), 5), "ab…");
        assert_eq!(truncate_to("abc".into(), 5), "abc");
    }

    #[test]
    fn result_with_a_bad_run_id_is_invalid() {
        let mut result = ChunkResult {
            v: VERSION,
            run: "../../etc".into(),
            chunk: 1,
            lease: Uuid::nil(),
            attempt: 1,
            mapper: "m".into(),
            records: vec![],
            dead: vec![],
        };
        assert!(result.validate().is_err());
        result.run = "0123456789abcdef".into();
        assert!(result.validate().is_ok());
    }
}
