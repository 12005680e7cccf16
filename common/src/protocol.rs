//! The wire protocol (version 2) between fetcher, mappers and savers: subjects, message types
//! and their JSON encoding. docs/PROTOCOL.md is the prose version of this file; keep the two in
//! step.
//!
//! Every message body is one JSON object with `"v": 2`. Decoding never panics: anything that
//! does not parse, has another version or breaks a rule becomes a [`ProtocolError`] that the
//! service logs, counts and answers (when there is someone to answer) without crashing.
//!
//! Input objects and output values travel as raw JSON bytes: the fetcher forwards the input's
//! bytes, the mapper writes its transform's output, the saver stores them as they arrived. No
//! stage parses what it does not need to.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

/// The protocol version every message carries in `"v"`.
pub const VERSION: u32 = 2;

/// The queue group savers subscribe in, so each result reaches exactly one saver replica.
pub const SAVER_QUEUE_GROUP: &str = "chunkmill-savers";

/// The subjects of one pipeline, all under one prefix (default `chunkmill`).
#[derive(Debug, Clone)]
pub struct Subjects {
    /// mapper → fetcher, request/reply: "I am ready, give me up to `max` chunks".
    pub work: String,
    /// mapper or saver → fetcher, request/reply: "what is the job of this run?".
    pub job: String,
    /// mapper → fetcher, request/reply: "I still hold these leases".
    pub extend: String,
    /// mapper → fetcher, request/reply: "I give this lease back".
    pub release: String,
    /// mapper → saver (queue group), request/reply: "save this processed chunk".
    pub result: String,
    /// saver → fetcher, request/reply: "these chunks are durably saved".
    pub ack: String,
    /// fetcher → JetStream → broadcaster: pipeline events are published on `<events>.<kind>`
    /// (see [`crate::events`]).
    pub events: String,
    /// anyone → fetcher, request/reply: "how far is the run?" (`fetcher status`).
    pub status: String,
    /// fetcher → saver (queue group), request/reply: "the run is complete: commit it" (a sink
    /// whose saved chunks become the run's result only then, such as the object store's).
    pub commit: String,
}

impl Subjects {
    /// Subjects under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Subjects {
            work: format!("{prefix}.work"),
            job: format!("{prefix}.job"),
            extend: format!("{prefix}.extend"),
            release: format!("{prefix}.release"),
            result: format!("{prefix}.result"),
            ack: format!("{prefix}.ack"),
            events: format!("{prefix}.events"),
            status: format!("{prefix}.status"),
            commit: format!("{prefix}.commit"),
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
/// The longest object id in a message, in bytes.
pub const MAX_ID: usize = 1024;
/// The most items one message may list: leases of an extend, acks of an ack request,
/// capabilities of a work request.
pub const MAX_ITEMS: usize = 1024;
/// The most chunks one work request may ask for.
pub const MAX_CHUNKS_PER_REPLY: u32 = 64;

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

/// A chunk's index in its run, from 0: the one name every service uses for a chunk.
///
/// On the wire it is a plain JSON number. The fetcher's ledger is indexed by it, so it is 32
/// bits: a run has at most 2^32 chunks, and a message naming a larger index is malformed rather
/// than silently unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct ChunkId(pub u32);

impl ChunkId {
    /// The index as a position in a slice.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl From<u32> for ChunkId {
    fn from(index: u32) -> Self {
        ChunkId(index)
    }
}

impl std::fmt::Display for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for ChunkId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(ChunkId)
    }
}

#[derive(Deserialize)]
struct VersionOnly {
    v: u32,
}

/// Decodes a message of type `T`, parsing it once. When that fails, the version is read on its
/// own, so a message of another version is reported as such rather than as a confusing field
/// error.
pub fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, ProtocolError> {
    match serde_json::from_slice::<T>(payload) {
        Ok(message) => match version_of(payload) {
            Some(VERSION) => Ok(message),
            Some(other) => Err(ProtocolError::Version(other)),
            None => Ok(message),
        },
        Err(e) => match serde_json::from_slice::<VersionOnly>(payload) {
            Ok(VersionOnly { v }) if v != VERSION => Err(ProtocolError::Version(v)),
            _ => Err(ProtocolError::Malformed(e)),
        },
    }
}

/// The `v` of a message that decoded: cheap, its first field in every message we write, but
/// found wherever it is.
fn version_of(payload: &[u8]) -> Option<u32> {
    let head = payload.get(..payload.len().min(16))?;
    if let Some(rest) = head.strip_prefix(b"{\"v\":") {
        let digits: Vec<u8> = rest.iter().copied().take_while(u8::is_ascii_digit).collect();
        if !digits.is_empty() && rest.get(digits.len()).is_some_and(|b| matches!(b, b',' | b'}')) {
            return std::str::from_utf8(&digits).ok()?.parse().ok();
        }
    }
    serde_json::from_slice::<VersionOnly>(payload).ok().map(|v| v.v)
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

/// Encodes a message. Serialising these plain structs cannot fail: a failure panics, naming the
/// invariant, rather than sending empty bytes.
pub fn encode<T: Serialize>(message: &T) -> bytes::Bytes {
    bytes::Bytes::from(crate::json::to_vec_own(message))
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

/// A run id is 16 lowercase hex digits (it names a directory in the file sink).
pub fn is_valid_run_id(run: &str) -> bool {
    run.len() == 16 && run.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

// ---------------------------------------------------------------------------------------------
// Work

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
    /// How many chunks the mapper can take now (1 to [`MAX_CHUNKS_PER_REPLY`]).
    #[serde(default = "one")]
    pub max: u32,
    /// The transforms it can run: `digest`, `jq`, `command:<name>`, `<rust transform name>`.
    #[serde(default)]
    pub can: Vec<String>,
}

fn one() -> u32 {
    1
}

impl Bounded for WorkRequest {
    const KIND: &'static str = "work request";
    const MAX_BYTES: usize = 64 << 10;
    fn check_bounds(&self) -> Result<(), ProtocolError> {
        bounded("the mapper name", &self.mapper, MAX_NAME)?;
        bounded_items("capabilities", self.can.len())?;
        self.can.iter().try_for_each(|c| bounded("a capability", c, MAX_NAME))
    }
}

/// What kind of answer a [`WorkReply`] is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WorkReplyKind {
    /// Leased chunks (one or more).
    Chunks,
    /// Nothing to hand out to this mapper right now; ask again after `retry_ms`.
    Idle,
    /// The run is complete.
    Done,
}

/// An object of a leased chunk that the mapper must not run: dead-letter it with `error` (the
/// fetcher found that every mapper holding it died).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Skip {
    /// Its position in the chunk, from 0.
    pub index: u32,
    /// The reason to record.
    pub error: String,
}

/// The metadata of one leased chunk; on the wire it is followed by `"objects": [...]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChunkHead {
    /// Chunk index, from 0.
    pub chunk: ChunkId,
    /// Lease id: names this hand-out of the chunk.
    pub lease: Uuid,
    /// 1 for the first hand-out of the chunk, 2 for the second...
    pub attempt: u32,
    /// 1-based input line of the chunk's first object (for error messages).
    pub first_line: u64,
    /// Input line of each object, when they are not `first_line`, `first_line + 1`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<Vec<u64>>,
    /// Objects not to run (see [`Skip`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skip: Vec<Skip>,
    /// A probe: transform the objects, deliver nothing, release the lease with reason
    /// `probed`. The fetcher uses probes to find which object of a chunk kills its mappers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub probe: bool,
}

impl ChunkHead {
    /// The input line of object `index` of this chunk.
    pub fn line_of(&self, index: usize) -> u64 {
        match &self.lines {
            Some(lines) => lines.get(index).copied().unwrap_or(self.first_line),
            None => self.first_line + index as u64,
        }
    }
}

/// One leased chunk as a mapper decodes it: the head and the objects as raw JSON.
#[derive(Debug, Deserialize)]
pub struct LeasedChunk<'a> {
    /// Its lease.
    #[serde(flatten)]
    pub head: ChunkHead,
    /// The chunk's input objects, exactly as they appear in the input.
    #[serde(borrow)]
    pub objects: Vec<&'a RawValue>,
}

/// fetcher → mapper: the reply to a [`WorkRequest`], as decoded by a mapper.
#[derive(Debug, Deserialize)]
pub struct WorkReply<'a> {
    /// Protocol version.
    pub v: u32,
    /// Chunks, idle or done.
    #[serde(rename = "type")]
    pub kind: WorkReplyKind,
    /// For `chunks`: the run id.
    #[serde(default)]
    pub run: Option<String>,
    /// For `chunks`: the job's fingerprint (ask [`Subjects::job`] for the job if it is new).
    #[serde(default)]
    pub job: Option<String>,
    /// For `chunks`: the leases last this long unless extended, in ms.
    #[serde(default)]
    pub lease_ms: Option<u64>,
    /// For `chunks`: the leased chunks.
    #[serde(borrow, default)]
    pub chunks: Vec<LeasedChunk<'a>>,
    /// For `idle` and `done`: when to ask again, in ms.
    #[serde(default)]
    pub retry_ms: Option<u64>,
    /// For `idle`: why there is nothing for this mapper, when it is not just an empty queue
    /// (e.g. the run needs a transform the mapper does not offer).
    #[serde(default)]
    pub reason: Option<String>,
}

/// The part of a `chunks` reply that is not the chunks.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChunksHead<'a> {
    /// Run id.
    pub run: &'a str,
    /// The job's fingerprint.
    pub job: &'a str,
    /// Lease duration, in ms.
    pub lease_ms: u64,
}

/// Builds a `chunks` reply around each chunk's objects, the input records already joined with
/// commas. The fetcher forwards input bytes without parsing them into a DOM; they were
/// validated when scanned, and their UTF-8 again when read.
pub fn encode_chunks_reply(head: &ChunksHead<'_>, chunks: &[(ChunkHead, Vec<u8>)]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Head<'h> {
        v: u32,
        #[serde(rename = "type")]
        kind: WorkReplyKind,
        #[serde(flatten)]
        head: &'h ChunksHead<'h>,
    }
    let mut out = crate::json::to_vec_own(&Head { v: VERSION, kind: WorkReplyKind::Chunks, head });
    out.pop(); // the closing brace: the chunks follow
    out.reserve(chunks.iter().map(|(_, objects)| objects.len() + 256).sum());
    out.extend_from_slice(b",\"chunks\":[");
    for (i, (chunk, objects)) in chunks.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let mut item = crate::json::to_vec_own(chunk);
        item.pop();
        out.extend_from_slice(&item);
        out.extend_from_slice(b",\"objects\":[");
        out.extend_from_slice(objects);
        out.extend_from_slice(b"]}");
    }
    out.extend_from_slice(b"]}");
    out
}

/// The size of a `chunks` reply holding `chunks` before any is added, for budgeting a reply
/// under the server's max_payload.
pub fn chunks_reply_overhead(head: &ChunksHead<'_>) -> usize {
    encode_chunks_reply(head, &[]).len()
}

/// At most the size one chunk adds to a `chunks` reply (a comma more than the first takes).
pub fn chunk_entry_size(chunk: &ChunkHead, objects: &[u8]) -> usize {
    serde_json::to_vec(chunk).map(|v| v.len()).unwrap_or(0) + objects.len() + 14
}

/// Builds an `idle` or `done` reply; `reason` says why a mapper gets nothing.
pub fn encode_status_reply(kind: WorkReplyKind, retry_ms: u64, reason: Option<&str>) -> bytes::Bytes {
    #[derive(Serialize)]
    struct Status<'r> {
        v: u32,
        #[serde(rename = "type")]
        kind: WorkReplyKind,
        retry_ms: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'r str>,
    }
    encode(&Status { v: VERSION, kind, retry_ms, reason })
}

/// What a mapper speaking protocol 1 gets from this fetcher: a v1 `idle` reply with a long
/// retry and the reason, so an old mapper waits instead of producing results nobody can use.
pub fn encode_v1_refusal() -> bytes::Bytes {
    encode(&serde_json::json!({
        "v": 1, "type": "idle", "retry_ms": 5000,
        "error": "this fetcher speaks chunkmill protocol version 2; upgrade the mapper",
    }))
}

/// The leases of a `chunks` reply whose objects cannot be decoded (bytes that are not UTF-8,
/// say): the mapper still learns which leases to give back as failed, so `--max-attempts` can
/// dead-letter the chunks instead of re-leasing them forever.
pub fn decode_leases_only(payload: &[u8]) -> Option<Vec<LeaseRef>> {
    // No `flatten` here: serde buffers the fields a flattened struct does not know, `objects`
    // included, as strings, which is exactly what fails on bytes that are not UTF-8.
    #[derive(Deserialize)]
    struct Item {
        chunk: ChunkId,
        lease: Uuid,
    }
    #[derive(Deserialize)]
    struct Head {
        v: u32,
        #[serde(rename = "type")]
        kind: WorkReplyKind,
        chunks: Vec<Item>,
    }
    let head: Head = serde_json::from_slice(payload).ok()?;
    (head.v == VERSION && head.kind == WorkReplyKind::Chunks)
        .then(|| head.chunks.into_iter().map(|i| LeaseRef { chunk: i.chunk, lease: i.lease }).collect())
}

// ---------------------------------------------------------------------------------------------
// Job

/// mapper → fetcher on [`Subjects::job`]: the job of the current run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobRequest {
    /// Protocol version.
    pub v: u32,
    /// The asker's instance name.
    pub mapper: String,
}

impl Bounded for JobRequest {
    const KIND: &'static str = "job request";
    const MAX_BYTES: usize = 4 << 10;
    fn check_bounds(&self) -> Result<(), ProtocolError> {
        bounded("the name", &self.mapper, MAX_NAME)
    }
}

/// fetcher → asker: the job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobReply {
    /// Protocol version.
    pub v: u32,
    /// Run id.
    pub run: String,
    /// The job's fingerprint, as in work replies.
    pub job: String,
    /// The job: `{"transform": {"kind": ..., ...}, "id_field": ".path" or null}` (the transform
    /// crate's `Job`, docs/PROTOCOL.md §7).
    pub spec: serde_json::Value,
    /// For people: the job in a few words.
    #[serde(default)]
    pub describe: String,
}

// ---------------------------------------------------------------------------------------------
// Leases

/// One lease a mapper holds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct LeaseRef {
    /// Chunk index.
    pub chunk: ChunkId,
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

impl Bounded for ExtendRequest {
    const KIND: &'static str = "extend request";
    const MAX_BYTES: usize = 256 << 10;
    fn check_bounds(&self) -> Result<(), ProtocolError> {
        bounded("the mapper name", &self.mapper, MAX_NAME)?;
        bounded_items("leases", self.leases.len())
    }
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
    /// A probe lease ran to its end without the mapper dying.
    Probed,
    /// The mapper cannot run this run's job (a command it cannot start): not the chunk's
    /// fault; the fetcher leases this run's chunks to that mapper no more.
    CannotRun,
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
    /// What went wrong.
    #[serde(default)]
    pub error: Option<String>,
}

impl Bounded for ReleaseRequest {
    const KIND: &'static str = "release request";
    const MAX_BYTES: usize = 16 << 10;
    fn check_bounds(&self) -> Result<(), ProtocolError> {
        bounded("the mapper name", &self.mapper, MAX_NAME)?;
        bounded("the error", self.error.as_deref().unwrap_or_default(), MAX_REASON)
    }
}

/// fetcher → mapper: whether the release was taken (false: the lease was no longer current).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReleaseReply {
    /// Protocol version.
    pub v: u32,
    /// The lease was current and is now released.
    pub accepted: bool,
}

// ---------------------------------------------------------------------------------------------
// Results

/// Why an object has no outputs, as its dead-letter entry says.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The transform refused the object (a jq runtime error, a record the digest cannot read, a
    /// line from a command that is not JSON). `saver verify` checks that a deterministic
    /// transform refuses it too.
    Transform,
    /// The transform crashed on it (a panic; a command that died on it, twice).
    Crash,
    /// The transform took longer than its limit (a command's per-object timeout).
    Timeout,
    /// Every mapper that held it died: the fetcher found it by splitting its chunk.
    Killed,
    /// The sink cannot store its outputs (PostgreSQL refused a value).
    Sink,
    /// Its whole chunk was dead-lettered by the fetcher (`--max-attempts`, over max_payload).
    Chunk,
    /// Its own outputs are more bytes than one result message may carry (the NATS server's
    /// max_payload): the mapper dead-letters it alone rather than its whole chunk.
    TooLarge,
}

impl Cause {
    /// The protocol's name of the cause (`transform`, `too_large`...): what its serde form is,
    /// for a sink's column or a report line.
    pub fn name(self) -> &'static str {
        match self {
            Cause::Transform => "transform",
            Cause::Crash => "crash",
            Cause::Timeout => "timeout",
            Cause::Killed => "killed",
            Cause::Sink => "sink",
            Cause::Chunk => "chunk",
            Cause::TooLarge => "too_large",
        }
    }
}

/// An input object that has no outputs, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeadObject {
    /// Position of the object in the chunk, from 0.
    pub index: u32,
    /// Its id (the job's id field), when it has one.
    #[serde(default)]
    pub id: Option<String>,
    /// What kind of failure.
    pub cause: Cause,
    /// Why, for people.
    pub error: String,
    /// Its input line, when known.
    #[serde(default)]
    pub line: Option<u64>,
}

/// The head of a [`ChunkResult`]: what names the result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResultHead {
    /// Run id from the lease.
    pub run: String,
    /// Job fingerprint from the lease.
    pub job: String,
    /// Chunk index from the lease.
    pub chunk: ChunkId,
    /// Lease id.
    pub lease: Uuid,
    /// Attempt from the lease.
    pub attempt: u32,
    /// The mapper's instance name.
    pub mapper: String,
}

/// mapper → saver on [`Subjects::result`] (queue group [`SAVER_QUEUE_GROUP`]), as a saver
/// decodes it: output values borrowed as raw JSON from the message.
#[derive(Debug, Deserialize)]
pub struct ChunkResult<'a> {
    /// Protocol version.
    pub v: u32,
    /// What names it.
    #[serde(flatten)]
    pub head: ResultHead,
    /// Per input object, in input order: its output values (none for a dead object).
    #[serde(borrow)]
    pub outputs: Vec<Vec<&'a RawValue>>,
    /// Per input object: its id (the job's id field), when the job has one.
    #[serde(default)]
    pub ids: Option<Vec<Option<String>>>,
    /// The input objects that have no outputs, and why.
    #[serde(default)]
    pub dead: Vec<DeadObject>,
    /// Set by the fetcher only, for a chunk it dead-lettered as a whole: every object is dead
    /// with cause `chunk` and this reason (`outputs` all empty, `dead` empty). It keeps the
    /// sink's record of such a chunk small enough for any max_payload.
    #[serde(default)]
    pub chunk_dead: Option<String>,
}

impl Bounded for ChunkResult<'_> {
    const KIND: &'static str = "chunk result";
    // Bounded by the server's max_payload; nothing a result holds is kept past its save.
    const MAX_BYTES: usize = usize::MAX;
    fn check_bounds(&self) -> Result<(), ProtocolError> {
        bounded("the mapper name", &self.head.mapper, MAX_NAME)?;
        for dead in &self.dead {
            bounded("a dead object's error", &dead.error, MAX_REASON)?;
            bounded("a dead object's id", dead.id.as_deref().unwrap_or_default(), MAX_ID)?;
        }
        for id in self.ids.iter().flatten().flatten() {
            bounded("an id", id, MAX_ID)?;
        }
        bounded("a chunk's dead-letter reason", self.chunk_dead.as_deref().unwrap_or_default(), MAX_REASON)
    }
}

impl ChunkResult<'_> {
    /// Checks what a saver must not take on trust before writing anything.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let invalid = |message: String| Err(ProtocolError::Invalid(message));
        if !is_valid_run_id(&self.head.run) {
            return invalid(format!("run id {:?} is not 16 lowercase hex digits", self.head.run));
        }
        let chunk = self.head.chunk;
        let objects = self.outputs.len();
        let mut seen = std::collections::HashSet::with_capacity(self.dead.len());
        for dead in &self.dead {
            if dead.index as usize >= objects {
                return invalid(format!("chunk {chunk}: dead object index {} is outside the chunk", dead.index));
            }
            if !seen.insert(dead.index) {
                return invalid(format!("chunk {chunk}: object {} is dead-lettered twice", dead.index));
            }
            if !self.outputs[dead.index as usize].is_empty() {
                return invalid(format!("chunk {chunk}: object {} is dead-lettered and has outputs", dead.index));
            }
        }
        if let Some(ids) = &self.ids {
            if ids.len() != objects {
                return invalid(format!("chunk {chunk}: {} ids for {objects} objects", ids.len()));
            }
        }
        if self.chunk_dead.is_some() && (!self.dead.is_empty() || self.outputs.iter().any(|o| !o.is_empty())) {
            return invalid(format!("chunk {chunk}: a dead chunk's record with outputs or dead objects of its own"));
        }
        Ok(())
    }

    /// The dead objects, those of a whole dead chunk included (see [`ChunkResult::chunk_dead`]).
    pub fn all_dead(&self) -> Vec<DeadObject> {
        match &self.chunk_dead {
            None => self.dead.clone(),
            Some(reason) => (0..self.outputs.len())
                .map(|i| DeadObject {
                    index: i as u32,
                    id: self.ids.as_ref().and_then(|ids| ids[i].clone()),
                    cause: Cause::Chunk,
                    error: reason.clone(),
                    line: None,
                })
                .collect(),
        }
    }

    /// Input objects accounted for: with outputs or dead-lettered.
    pub fn objects(&self) -> u64 {
        self.outputs.len() as u64
    }

    /// Output values in all.
    pub fn values(&self) -> u64 {
        self.outputs.iter().map(|o| o.len() as u64).sum()
    }
}

/// Builds a result message from output values given as JSON bytes, without a DOM: what a
/// mapper sends. `objects` yields, per input object, its values (none for a dead object).
pub fn encode_result<'v, O, V>(
    head: &ResultHead,
    objects: O,
    ids: Option<&[Option<String>]>,
    dead: &[DeadObject],
) -> Vec<u8>
where
    O: IntoIterator<Item = V>,
    V: IntoIterator<Item = &'v [u8]>,
{
    #[derive(Serialize)]
    struct Head<'h> {
        v: u32,
        #[serde(flatten)]
        head: &'h ResultHead,
        #[serde(skip_serializing_if = "Option::is_none")]
        ids: Option<&'h [Option<String>]>,
        dead: &'h [DeadObject],
    }
    let mut out = crate::json::to_vec_own(&Head { v: VERSION, head, ids, dead });
    out.pop();
    out.extend_from_slice(b",\"outputs\":[");
    for (i, values) in objects.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'[');
        for (j, value) in values.into_iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            out.extend_from_slice(value);
        }
        out.push(b']');
    }
    out.extend_from_slice(b"]}");
    out
}

/// Builds the record of a chunk of `objects` objects that the fetcher dead-lettered as a whole:
/// what it sends to the savers so that the sink holds every object's fate.
pub fn encode_chunk_dead(head: &ResultHead, objects: u32, ids: Option<&[Option<String>]>, reason: &str) -> Vec<u8> {
    #[derive(Serialize)]
    struct Dead<'h> {
        v: u32,
        #[serde(flatten)]
        head: &'h ResultHead,
        #[serde(skip_serializing_if = "Option::is_none")]
        ids: Option<&'h [Option<String>]>,
        chunk_dead: &'h str,
    }
    let mut out = crate::json::to_vec_own(&Dead { v: VERSION, head, ids, chunk_dead: reason });
    out.pop();
    out.extend_from_slice(b",\"outputs\":[");
    for i in 0..objects {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"[]");
    }
    out.extend_from_slice(b"]}");
    out
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

// ---------------------------------------------------------------------------------------------
// Acks

/// One durably saved chunk, as a saver reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Ack {
    /// Run id.
    pub run: String,
    /// Chunk index.
    pub chunk: ChunkId,
    /// The lease the saved result came with.
    pub lease: Uuid,
    /// Its attempt.
    pub attempt: u32,
    /// Input objects accounted for (with outputs or dead); must equal the chunk's object count.
    pub objects: u64,
    /// Of those, dead-lettered.
    #[serde(default)]
    pub dead: u64,
    /// Output values saved.
    #[serde(default)]
    pub outputs: u64,
}

/// saver → fetcher on [`Subjects::ack`]: chunks durably saved (batched).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AckRequest {
    /// Protocol version.
    pub v: u32,
    /// The saver's instance name.
    pub saver: String,
    /// The identity of the sink the chunks are in (stored in the sink itself): a run has one.
    #[serde(default)]
    pub sink: String,
    /// Whether the sink needs the run committed once it is complete (a [`CommitRequest`]); an
    /// older saver leaves it out (false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub commit: bool,
    /// The chunks.
    pub acks: Vec<Ack>,
}

impl Bounded for AckRequest {
    const KIND: &'static str = "ack request";
    const MAX_BYTES: usize = 512 << 10;
    fn check_bounds(&self) -> Result<(), ProtocolError> {
        bounded("the saver name", &self.saver, MAX_NAME)?;
        bounded("the sink id", &self.sink, MAX_NAME)?;
        // The fetcher writes the sink id into its ledger as a line of its own: only characters
        // that cannot start another entry.
        if !self.sink.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
            return Err(ProtocolError::Invalid("the sink id may hold only letters, digits, '.', '_' and '-'".into()));
        }
        bounded_items("acks", self.acks.len())?;
        self.acks.iter().try_for_each(|ack| bounded("a run id", &ack.run, 64))
    }
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
    /// The chunk was saved into another sink than the one this run saves to: ignored.
    WrongSink,
}

/// fetcher → saver: one verdict per ack, same order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AckReply {
    /// Protocol version.
    pub v: u32,
    /// Verdicts.
    pub verdicts: Vec<AckVerdict>,
}

// ---------------------------------------------------------------------------------------------
// Commit

/// fetcher → saver on [`Subjects::commit`] (queue group [`SAVER_QUEUE_GROUP`]): the run is
/// complete (every chunk saved, or its dead-letter record saved), so its sink may make the saved
/// chunks the run's result. Sent only when the savers' acks said `commit`; repeated until a saver
/// answers [`CommitStatus::Committed`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommitRequest {
    /// Protocol version.
    pub v: u32,
    /// The run.
    pub run: String,
    /// The sink the run saves into (as the acks named it): a saver with another sink refuses.
    pub sink: String,
    /// The job's fingerprint.
    pub job: String,
    /// The job (as in [`JobReply`]).
    pub spec: serde_json::Value,
    /// The input, as the fetcher was given it.
    pub input: String,
    /// Objects per chunk.
    pub chunk_size: u32,
    /// Chunks in the run: each of `0..chunks` is in the sink.
    pub chunks: u32,
    /// Input objects in the run.
    pub objects: u64,
}

impl Bounded for CommitRequest {
    const KIND: &'static str = "commit request";
    const MAX_BYTES: usize = 1 << 20;
    fn check_bounds(&self) -> Result<(), ProtocolError> {
        bounded("a run id", &self.run, 64)?;
        bounded("the sink id", &self.sink, MAX_NAME)?;
        bounded("a job fingerprint", &self.job, 64)?;
        bounded("the input", &self.input, 4096)
    }
}

/// How far a commit is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CommitStatus {
    /// The run is committed (or its sink has no commit step): done.
    Committed,
    /// A saver is committing it: ask again later.
    Committing,
    /// It failed (see `error`): ask again later, it is retried.
    Failed,
    /// This saver's sink is not the run's: ask again (another saver may take it).
    WrongSink,
}

/// saver → fetcher: the commit's state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommitReply {
    /// Protocol version.
    pub v: u32,
    /// How far it is.
    pub status: CommitStatus,
    /// Why it failed, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cause_is_named_as_it_is_spelt_on_the_wire() {
        use super::Cause::*;
        for cause in [Transform, Crash, Timeout, Killed, Sink, Chunk, TooLarge] {
            assert_eq!(serde_json::to_value(cause).unwrap(), serde_json::json!(cause.name()), "{cause:?}");
        }
    }

    use super::*;

    fn head() -> ChunkHead {
        ChunkHead {
            chunk: ChunkId(7),
            lease: Uuid::from_u128(42),
            attempt: 2,
            first_line: 701,
            lines: None,
            skip: vec![],
            probe: false,
        }
    }

    const RUN: &str = "0123456789abcdef";

    fn chunks_head() -> ChunksHead<'static> {
        ChunksHead { run: RUN, job: "00000000000000aa", lease_ms: 5000 }
    }

    #[test]
    fn a_chunks_reply_round_trips_with_raw_objects() {
        let first = br#"{"uuid":"a","fn":"A","ln":"B","friends":[]},{"x":1}"#.to_vec();
        let mut second = head();
        second.chunk = ChunkId(8);
        second.skip = vec![Skip { index: 0, error: "killed".into() }];
        let bytes = encode_chunks_reply(&chunks_head(), &[(head(), first), (second.clone(), b"{\"y\":2}".to_vec())]);
        let reply: WorkReply = decode(&bytes).expect("decodes");
        assert_eq!(reply.kind, WorkReplyKind::Chunks);
        assert_eq!((reply.run.as_deref(), reply.lease_ms), (Some(RUN), Some(5000)));
        assert_eq!(reply.chunks.len(), 2);
        assert_eq!(reply.chunks[0].head, head());
        assert_eq!(reply.chunks[0].objects[1].get(), r#"{"x":1}"#);
        assert_eq!(reply.chunks[1].head, second);
        let two = [(head(), b"{}".to_vec()), (head(), b"{}".to_vec())];
        let size = chunks_reply_overhead(&chunks_head()) + 2 * chunk_entry_size(&head(), b"{}");
        assert_eq!(size, encode_chunks_reply(&chunks_head(), &two).len() + 1, "an upper bound, by the first comma");
    }

    #[test]
    fn the_leases_of_a_reply_with_undecodable_objects_can_still_be_read() {
        let bytes = encode_chunks_reply(&chunks_head(), &[(head(), b"{\"note\":\"\xff\"}".to_vec())]);
        assert!(decode::<WorkReply>(&bytes).is_err(), "the objects are not UTF-8");
        assert_eq!(decode_leases_only(&bytes), Some(vec![LeaseRef { chunk: ChunkId(7), lease: Uuid::from_u128(42) }]));
        assert_eq!(decode_leases_only(&encode_status_reply(WorkReplyKind::Idle, 0, None)), None);
    }

    #[test]
    fn a_status_reply_has_no_chunks_and_may_say_why() {
        let bytes = encode_status_reply(WorkReplyKind::Idle, 250, Some("this run needs command:resize"));
        let reply: WorkReply = decode(&bytes).expect("decodes");
        assert_eq!((reply.kind, reply.retry_ms), (WorkReplyKind::Idle, Some(250)));
        assert!(reply.chunks.is_empty());
        assert_eq!(reply.reason.as_deref(), Some("this run needs command:resize"));
    }

    #[test]
    fn other_versions_are_reported_as_such_and_a_v1_mapper_gets_a_v1_refusal() {
        let err = decode::<AckRequest>(br#"{"v":1,"saver":"s","acks":[]}"#).unwrap_err();
        assert!(matches!(err, ProtocolError::Version(1)), "{err}");
        let err = decode::<WorkRequest>(br#"{"mapper":"m","v":9}"#).unwrap_err();
        assert!(matches!(err, ProtocolError::Version(9)), "{err}");
        let refusal: serde_json::Value = serde_json::from_slice(&encode_v1_refusal()).unwrap();
        assert_eq!((refusal["v"].as_u64(), refusal["type"].as_str()), (Some(1), Some("idle")));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for garbage in [&b"\xff\xfe"[..], b"", b"[]", b"{\"v\":2}", b"{\"v\":\"2\"}"] {
            assert!(decode::<AckRequest>(garbage).is_err());
        }
    }

    #[test]
    fn a_result_round_trips_and_is_validated() {
        let result_head = ResultHead {
            run: RUN.into(),
            job: "00000000000000aa".into(),
            chunk: ChunkId(3),
            lease: Uuid::nil(),
            attempt: 1,
            mapper: "m".into(),
        };
        let dead = vec![DeadObject { index: 1, id: None, cause: Cause::Transform, error: "no".into(), line: Some(9) }];
        let values: Vec<Vec<&[u8]>> = vec![vec![b"{\"a\":1}", b"2"], vec![], vec![b"null"]];
        let bytes = encode_result(&result_head, values.iter().map(|v| v.iter().copied()), None, &dead);
        let result: ChunkResult = decode_bounded(&bytes).expect("decodes");
        assert_eq!(result.head, result_head);
        assert_eq!((result.objects(), result.values()), (3, 3));
        assert_eq!(result.outputs[0][1].get(), "2");
        assert!(result.validate().is_ok());
        let bad = encode_result(
            &result_head,
            values.iter().map(|v| v.iter().copied()),
            None,
            &[DeadObject { index: 0, ..dead[0].clone() }],
        );
        let result: ChunkResult = decode(&bad).expect("decodes");
        assert!(result.validate().unwrap_err().to_string().contains("has outputs"));
        let mut bad_run = result_head.clone();
        bad_run.run = "../../etc".into();
        let bytes = encode_result(&bad_run, Vec::<Vec<&[u8]>>::new(), None, &[]);
        assert!(decode::<ChunkResult>(&bytes).expect("decodes").validate().is_err());
    }

    #[test]
    fn a_dead_chunks_record_expands_to_every_object_dead_with_its_reason() {
        let head = ResultHead {
            run: RUN.into(),
            job: "00000000000000aa".into(),
            chunk: ChunkId(4),
            lease: Uuid::nil(),
            attempt: 0,
            mapper: "fetcher:f".into(),
        };
        let ids = vec![Some("a".to_string()), None, Some("c".into())];
        let bytes = encode_chunk_dead(&head, 3, Some(&ids), "over max_payload");
        let result: ChunkResult = decode_bounded(&bytes).expect("decodes");
        assert!(result.validate().is_ok());
        let dead = result.all_dead();
        assert_eq!(dead.len(), 3);
        assert_eq!((dead[2].index, dead[2].id.as_deref(), dead[2].cause), (2, Some("c"), Cause::Chunk));
        assert_eq!(dead[1].error, "over max_payload");
    }

    #[test]
    fn oversized_messages_and_fields_are_refused() {
        let request = |mapper: String| encode(&WorkRequest { v: VERSION, mapper, wait_ms: 0, max: 1, can: vec![] });
        assert!(matches!(
            decode_bounded::<WorkRequest>(&request("m".repeat(MAX_NAME + 1))),
            Err(ProtocolError::Invalid(_))
        ));
        let err = decode_bounded::<WorkRequest>(&request("m".repeat(500_000))).unwrap_err();
        assert!(matches!(err, ProtocolError::TooLarge { .. }), "{err}");
        let leases = vec![LeaseRef { chunk: ChunkId(1), lease: Uuid::nil() }; MAX_ITEMS + 1];
        let body = encode(&ExtendRequest { v: VERSION, mapper: "m".into(), leases });
        assert!(decode_bounded::<ExtendRequest>(&body).is_err());
        let ok: WorkRequest = decode_bounded(&request("m".into())).expect("decodes");
        assert_eq!((ok.max, ok.can.len()), (1, 0), "defaults");
        assert_eq!(truncate_to("ab€cd".into(), 5), "ab…");
        assert_eq!(truncate_to("abc".into(), 5), "abc");
    }

    #[test]
    fn a_sink_id_that_could_forge_a_ledger_line_is_refused() {
        let ack = |sink: &str| {
            encode(&AckRequest { v: VERSION, saver: "s".into(), sink: sink.into(), commit: false, acks: vec![] })
        };
        assert!(decode_bounded::<AckRequest>(&ack("dir-0123abcdef.x_y")).is_ok());
        for forged in ["a\nd 7", "a b", "ü", "a/b"] {
            assert!(matches!(decode_bounded::<AckRequest>(&ack(forged)), Err(ProtocolError::Invalid(_))), "{forged:?}");
        }
    }
}
