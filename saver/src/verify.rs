//! `saver verify`: checks a sink against its input and job, chunk by chunk and object by object.
//! Every input object must be saved or dead-lettered, once. For a deterministic job (digest, jq, a
//! Rust transform) it recomputes the transform through the same registry as the mappers and
//! compares every output value, in order, per input object, exactly ([`common::exact`]: numbers
//! by their text, repeated keys kept) after only what the sink is documented to do to a value;
//! for a command job, which may not be deterministic, it checks completeness (one output per
//! object), or recomputes with `--recompute`. It costs as much CPU as the run's transform.
//!
//! It reads every sink the same way, through the sink's [`crate::sink::SinkReader`] (what it holds of each
//! chunk, how it keeps a value, what it holds outside every chunk): nothing here knows which
//! sinks exist. The sink is the whole record: a dead-lettered chunk has its record there too
//! (every object dead with cause `chunk`), so verify reads nothing of the fetcher's state.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::exact;
use common::input::{scan_source, ChunkReader, ChunkSpan, InputError, ScanOptions};
use common::protocol::{Cause, DeadObject};
use rayon::prelude::*;
use transform::{Job, ObjectError, Outputs, Registry, Transform};

use crate::sink::{Normalise, ReadError, SinkConfig, SinkError, StoredChunk, StoredValues};

/// The outcome of a verification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// What was checked: the run directory, or the database and run.
    pub location: String,
    /// Valid objects in the input.
    pub expected: u64,
    /// Objects whose outputs are in the sink.
    pub found: u64,
    /// Input objects neither saved nor dead-lettered.
    pub missing: u64,
    /// Objects saved more than once (as outputs and as dead, or under one id in two places).
    pub duplicated: u64,
    /// Saved objects whose outputs differ from the transform's, and objects dead-lettered as
    /// refused that the (deterministic) transform maps.
    pub wrong: u64,
    /// Output values that belong to no input object (more lines than objects, a chunk past the
    /// run).
    pub unexpected: u64,
    /// Objects dead-lettered, with a reason the sink records.
    pub dead_lettered: u64,
    /// Invalid input records (never sent).
    pub bad_input: u64,
    /// Chunk records whose counts differ from the rows saved under them (database only).
    pub mismatched_chunks: u64,
    /// Dead-letter entries that name no object of their chunk (by index and id), or one already
    /// saved or dead-lettered: they account for nothing.
    pub unmatched_dead: u64,
    /// Whether outputs were compared (a deterministic job, or `--recompute`), or only counted.
    pub compared: bool,
    /// The first dead-lettered objects, for people: `chunk N object I (line L): cause: reason`.
    pub dead_examples: Vec<String>,
    /// The first wrong objects, for people.
    pub wrong_examples: Vec<String>,
}

impl VerifyReport {
    /// Nothing missing, duplicated, wrong or unexpected.
    pub fn ok(&self) -> bool {
        self.missing == 0
            && self.duplicated == 0
            && self.wrong == 0
            && self.unexpected == 0
            && self.mismatched_chunks == 0
            && self.unmatched_dead == 0
    }

    fn add(&mut self, other: VerifyReport, examples: usize) {
        self.found += other.found;
        self.missing += other.missing;
        self.duplicated += other.duplicated;
        self.wrong += other.wrong;
        self.unexpected += other.unexpected;
        self.dead_lettered += other.dead_lettered;
        self.unmatched_dead += other.unmatched_dead;
        self.mismatched_chunks += other.mismatched_chunks;
        for (mine, theirs) in
            [(&mut self.dead_examples, other.dead_examples), (&mut self.wrong_examples, other.wrong_examples)]
        {
            mine.extend(theirs.into_iter().take(examples.saturating_sub(mine.len())));
        }
    }
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "verify {}: {} expected, {} found, {} missing, {} duplicated, {} wrong, {} unexpected, {} dead-lettered, {} invalid input records, {} mismatched chunk records, {} unmatched dead-letter entries ({}): {}",
            self.location,
            self.expected,
            self.found,
            self.missing,
            self.duplicated,
            self.wrong,
            self.unexpected,
            self.dead_lettered,
            self.bad_input,
            self.mismatched_chunks,
            self.unmatched_dead,
            if self.compared { "outputs compared" } else { "completeness only" },
            if self.ok() { "OK" } else { "FAILED" }
        )?;
        for line in &self.wrong_examples {
            write!(f, "\n  wrong: {line}")?;
        }
        for line in &self.dead_examples {
            write!(f, "\n  dead-lettered: {line}")?;
        }
        Ok(())
    }
}

/// Why verification could not run.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The input cannot be read.
    #[error(transparent)]
    Input(#[from] InputError),
    /// The input cannot be found, listed or opened.
    #[error(transparent)]
    Source(#[from] input::SourceError),
    /// The job flags do not make a job.
    #[error(transparent)]
    Job(#[from] transform::spec::JobError),
    /// The transform cannot be built here.
    #[error("{0}")]
    Transform(String),
    /// The sink cannot be configured (a secret file that cannot be read).
    #[error(transparent)]
    Config(#[from] SinkError),
    /// The sink cannot be read, or its run is not committed yet.
    #[error(transparent)]
    Read(#[from] ReadError),
}

/// What to verify against.
pub struct Expectation {
    /// The job.
    pub job: Job,
    /// Its transform when verify can compute it (deterministic, or `--recompute`).
    pub transform: Option<Arc<dyn Transform>>,
    /// How many dead-lettered objects to list.
    pub examples: usize,
    /// Whether the scan drops records whose id repeats an earlier one's, as the fetcher's scan
    /// does unless --no-duplicate-check.
    pub duplicate_check: bool,
    /// How much verify's spool may hold, as the fetcher's `--spool-max-*`.
    pub spool: input::SpoolLimits,
}

impl Expectation {
    /// The job of `args`, its transform built by `registry` when it is deterministic or
    /// `recompute` asks for it.
    pub fn new(
        args: &transform::JobArgs,
        registry: &Registry,
        recompute: bool,
        examples: usize,
    ) -> Result<Self, VerifyError> {
        let job = args.job()?;
        let transform = if job.transform.deterministic() || recompute {
            Some(registry.build(&job.transform).map_err(|e| {
                VerifyError::Transform(format!(
                    "cannot recompute {}: {e}; run verify from the binary that registers it, or (for a command job) drop --recompute to check completeness only",
                    job.transform.describe()
                ))
            })?)
        } else {
            None
        };
        Ok(Expectation { job, transform, examples, duplicate_check: true, spool: input::SpoolLimits::default() })
    }
}

/// Whether the saved value `saved` is the `expected` one once `normalise`d as its sink keeps it:
/// the same bytes, or the same value exactly ([`exact::Value::same`]: numbers by their text,
/// repeated keys kept; another mapper may still write keys in another order).
fn same_value(expected: &[u8], saved: &[u8], normalise: &Normalise) -> bool {
    if expected == saved {
        return true;
    }
    let (Ok(expected), Ok(saved)) = (exact::parse(expected), exact::parse(saved)) else { return false };
    normalise(expected).is_some_and(|expected| expected.same(&saved))
}

/// Why object values differ, for people: the first value that differs, both sides cut short.
fn difference(expected: &[&[u8]], saved: &[Vec<u8>], normalise: &Normalise) -> String {
    if expected.len() != saved.len() {
        return format!("{} value(s) saved, the transform gives {}", saved.len(), expected.len());
    }
    let shown = |bytes: &[u8]| common::text::escaped_max(&String::from_utf8_lossy(bytes), 120).to_string();
    match expected.iter().zip(saved).position(|(a, b)| !same_value(a, b, normalise)) {
        Some(k) => format!("value {k} is {}, the transform gives {}", shown(&saved[k]), shown(expected[k])),
        None => "its values differ".into(),
    }
}

/// Checks one chunk: `inputs` (None when verify cannot read them), what the sink holds for it
/// (None: not saved), against the job.
fn check_chunk(
    chunk: u64,
    span: &ChunkSpan,
    inputs: Option<&[&[u8]]>,
    lines: Option<&[u64]>,
    saved: Option<StoredChunk>,
    expectation: &Expectation,
    normalise: &Normalise,
) -> VerifyReport {
    let n = span.objects as usize;
    let mut report = VerifyReport { duplicated: saved.as_ref().map_or(0, |s| s.duplicates), ..Default::default() };
    if let (Some(saved), None, true) = (&saved, inputs, span.bytes > common::input::MAX_RECORD) {
        check_unread_chunk(chunk, span, saved, expectation, normalise, &mut report);
        return report;
    }
    // Not saved, or its input cannot be read any more (the file changed since the scan): every
    // object stays expected, so all of them are missing, never nothing.
    let (Some(saved), Some(inputs)) = (saved, inputs) else {
        report.missing = n as u64;
        return report;
    };
    // As the mapper sends them: an id too long for the protocol is sent as null.
    let ids: Vec<Option<String>> = match &expectation.job.id_field {
        Some(field) => {
            inputs.iter().map(|i| field.extract(i).filter(|id| id.len() <= common::protocol::MAX_ID)).collect()
        }
        None => vec![None; n],
    };
    let expected = expectation.transform.as_ref().map(|transform| transform.apply_chunk(inputs));
    let dead = match_dead(saved.dead, &ids, expectation, &mut report);
    let flat = matches!(saved.values, StoredValues::InOrder(_));
    let values = match saved.values {
        StoredValues::ByObject(map) => map,
        StoredValues::InOrder(lines) => place_flat(lines, n, &dead, expected.as_deref(), &mut report),
    };
    // Each object's line in the input: consecutive from the chunk's first unless the reader
    // said otherwise (blank lines, skipped records, a pretty-printed array).
    let line = |i: usize| lines.and_then(|lines| lines.get(i).copied()).unwrap_or(span.first_line + i as u64);
    let check =
        ChunkCheck { chunk, ids: &ids, expected: expected.as_deref(), flat, expectation, line: &line, normalise };
    check.objects(n, &dead, values, &mut report);
    report
}

/// A chunk whose records are over `MAX_RECORD`: no one reads it, the fetcher dead-letters it
/// whole by its size, so each of its objects must be dead in the sink (matched by index: its ids
/// were never read); any value saved for it is unexpected.
fn check_unread_chunk(
    chunk: u64,
    span: &ChunkSpan,
    saved: &StoredChunk,
    expectation: &Expectation,
    normalise: &Normalise,
    report: &mut VerifyReport,
) {
    let n = span.objects as usize;
    let ids = vec![None; n];
    let dead = match_dead(saved.dead.clone(), &ids, expectation, report);
    report.unexpected += match &saved.values {
        StoredValues::InOrder(values) => values.len() as u64,
        StoredValues::ByObject(map) => map.values().map(|v| v.len() as u64).sum(),
    };
    let line = |i: usize| span.first_line + i as u64;
    let check = ChunkCheck { chunk, ids: &ids, expected: None, flat: true, expectation, line: &line, normalise };
    for i in 0..n {
        match dead.get(&(i as u32)) {
            Some(entry) => check.dead_object(i, entry, None, report),
            None => report.missing += 1,
        }
    }
}

/// The chunk's dead entries that name one of its objects (by index, and by id when the job has
/// ids), once each; the others count as unmatched.
fn match_dead(
    entries: Vec<DeadObject>,
    ids: &[Option<String>],
    expectation: &Expectation,
    report: &mut VerifyReport,
) -> BTreeMap<u32, DeadObject> {
    let mut dead: BTreeMap<u32, DeadObject> = BTreeMap::new();
    for entry in entries {
        let i = entry.index as usize;
        // A whole dead chunk's record may carry no ids (the fetcher could not read them): its
        // entries are matched by index alone.
        let names_it = i < ids.len()
            && (expectation.job.id_field.is_none()
                || entry.id == ids[i]
                || (entry.cause == Cause::Chunk && entry.id.is_none()));
        if names_it && !dead.contains_key(&entry.index) {
            dead.insert(entry.index, entry);
        } else {
            report.unmatched_dead += 1;
        }
    }
    dead
}

/// The file sink keeps a chunk's values in order: each object not dead-lettered takes as many
/// as the transform gives it (one, for a command); values left over are unexpected. An object
/// verify could not recompute (a limit stopped it) has no known count: if it is the chunk's only
/// one, it takes what the others leave.
fn place_flat(
    lines: Vec<Vec<u8>>,
    n: usize,
    dead: &BTreeMap<u32, DeadObject>,
    expected: Option<&[Result<Outputs, ObjectError>]>,
    report: &mut VerifyReport,
) -> BTreeMap<u32, Vec<Vec<u8>>> {
    let live = || (0..n).filter(|i| !dead.contains_key(&(*i as u32)));
    let want = |i: usize| match expected {
        Some(expected) => match &expected[i] {
            Ok(outputs) => Some(outputs.len()),
            Err(e) if e.cause == Cause::Transform => Some(0),
            Err(_) => None,
        },
        None => Some(1),
    };
    let unknown: Vec<usize> = live().filter(|&i| want(i).is_none()).collect();
    let known: usize = live().filter_map(want).sum();
    let rest = if unknown.len() == 1 { lines.len().saturating_sub(known) } else { 0 };
    let mut lines = lines.into_iter();
    let mut map = BTreeMap::new();
    for i in live() {
        map.insert(i as u32, lines.by_ref().take(want(i).unwrap_or(rest)).collect());
    }
    report.unexpected += lines.count() as u64;
    map
}

/// One chunk's objects being checked once the sink's values are placed by object.
struct ChunkCheck<'a> {
    chunk: u64,
    ids: &'a [Option<String>],
    expected: Option<&'a [Result<Outputs, ObjectError>]>,
    /// Whether the values came as a flat list (the file sink), where too few values for an
    /// object mean missing ones rather than wrong ones.
    flat: bool,
    expectation: &'a Expectation,
    line: &'a dyn Fn(usize) -> u64,
    /// What the sink does to a value it keeps.
    normalise: &'a Normalise,
}

impl ChunkCheck<'_> {
    fn objects(
        &self,
        n: usize,
        dead: &BTreeMap<u32, DeadObject>,
        mut values: BTreeMap<u32, Vec<Vec<u8>>>,
        report: &mut VerifyReport,
    ) {
        for i in 0..n {
            let saved = values.remove(&(i as u32));
            match dead.get(&(i as u32)) {
                Some(entry) => self.dead_object(i, entry, saved, report),
                None => self.saved_object(i, saved.unwrap_or_default(), report),
            }
        }
        // Values for objects past the chunk, from the database.
        report.unexpected += values.values().map(|v| v.len() as u64).sum::<u64>();
    }

    /// Object `i`, dead-lettered as `entry`, with the values `saved` under it too if any.
    fn dead_object(&self, i: usize, entry: &DeadObject, saved: Option<Vec<Vec<u8>>>, report: &mut VerifyReport) {
        let (chunk, examples) = (self.chunk, self.expectation.examples);
        let line = entry.line.unwrap_or_else(|| (self.line)(i));
        if saved.as_ref().is_some_and(|v| !v.is_empty()) {
            report.duplicated += 1;
        }
        let maps_it = matches!(self.expected.map(|e| &e[i]), Some(Ok(_)));
        if entry.cause == Cause::Transform && maps_it && self.expectation.job.transform.deterministic() {
            report.wrong += 1;
            if report.wrong_examples.len() < examples {
                report.wrong_examples.push(format!(
                    "chunk {chunk} object {i} (line {line}): dead-lettered as refused by the transform ({}), but the transform maps it",
                    common::text::escaped(&entry.error)
                ));
            }
            return;
        }
        report.dead_lettered += 1;
        if report.dead_examples.len() < examples {
            let id = self.ids[i].as_deref().map(|id| format!(", id {}", common::text::escaped(id))).unwrap_or_default();
            // What the recomputation says of it: a limit (time, memory) is the machine's, so
            // verify reports how it compares rather than counting it wrong.
            let recomputed = match self.expected.map(|e| &e[i]) {
                None => String::new(),
                Some(Ok(_)) => "; verify maps it".into(),
                Some(Err(e)) if e.cause == entry.cause => "; verify: the same cause".into(),
                Some(Err(e)) => format!("; verify: {}: {}", e.cause.name(), common::text::escaped(&e.message)),
            };
            report.dead_examples.push(format!(
                "chunk {chunk} object {i} (line {line}{id}): {}: {}{recomputed}",
                entry.cause.name(),
                common::text::escaped(&entry.error)
            ));
        }
    }

    /// Object `i`, not dead-lettered, with the values `saved` under it.
    fn saved_object(&self, i: usize, saved: Vec<Vec<u8>>, report: &mut VerifyReport) {
        let (chunk, examples, line) = (self.chunk, self.expectation.examples, (self.line)(i));
        let wrong = |report: &mut VerifyReport, why: String| {
            report.wrong += 1;
            if report.wrong_examples.len() < examples {
                report.wrong_examples.push(format!("chunk {chunk} object {i} (line {line}): {why}"));
            }
        };
        match self.expected.map(|e| &e[i]) {
            Some(Ok(outputs)) => {
                let want: Vec<&[u8]> = outputs.iter().collect();
                let normalise = self.normalise;
                if want.len() == saved.len() && want.iter().zip(&saved).all(|(a, b)| same_value(a, b, normalise)) {
                    report.found += 1;
                } else if self.flat && saved.len() < want.len() {
                    report.missing += 1;
                } else {
                    report.found += 1;
                    wrong(report, difference(&want, &saved, normalise));
                }
            }
            Some(Err(error)) if error.cause == Cause::Transform => {
                // The transform refuses it, yet it is not dead-lettered.
                report.found += u64::from(!saved.is_empty());
                let why = format!(
                    "not dead-lettered, but the transform refuses it: {}",
                    common::text::escaped(&error.message)
                );
                wrong(report, why);
            }
            Some(Err(error)) => {
                // Saved, but the recomputation stopped on a limit (or crashed): its values
                // cannot be confirmed, which is not OK either.
                report.found += u64::from(!saved.is_empty());
                let why = format!(
                    "saved, but verify could not recompute it ({}: {}); give verify the mappers' limits",
                    error.cause.name(),
                    common::text::escaped(&error.message)
                );
                wrong(report, why);
            }
            // A command job without --recompute: one output, whatever it is.
            None if saved.len() == 1 => report.found += 1,
            None if saved.is_empty() => report.missing += 1,
            None => {
                report.found += 1;
                report.duplicated += (saved.len() - 1) as u64;
            }
        }
    }
}

/// The input, scanned as the fetcher scanned it, with its run id.
struct Input {
    index: common::input::InputIndex,
    reader: ChunkReader,
    /// Where compressed objects are decompressed for the chunk reads; removed when done.
    _spool: SpoolDir,
}

/// A spool directory of verify's own (compressed inputs are decompressed once, as the
/// fetcher does into its state directory), removed when verify is done.
struct SpoolDir(PathBuf);

impl Drop for SpoolDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn scan_input(input: &Path, chunk_size: u32, expectation: &Expectation) -> Result<Input, VerifyError> {
    let spool = SpoolDir(std::env::temp_dir().join(format!("chunkmill-verify-spool-{}", std::process::id())));
    let location = input::Location::parse(&input.display().to_string())?;
    let options = input::SourceOptions {
        spool_dir: Some(spool.0.clone()),
        spool_limits: expectation.spool,
        ..input::SourceOptions::default()
    };
    let source = Arc::new(input::Source::open_blocking(location, options)?);
    let job = &expectation.job;
    let check = |record: &[u8]| expectation.transform.as_ref().map_or(Ok(()), |t| t.check(record));
    let fingerprint = job.fingerprint();
    // The same duplicate-id check as the fetcher's scan: it decides which records are expected
    // and so where the chunks are cut.
    let id_field = job.id_field.as_ref().filter(|_| expectation.duplicate_check);
    let id = |record: &[u8]| id_field.and_then(|f| f.key(record));
    let options = ScanOptions {
        check: Some(&check),
        id: Some(&id).filter(|_| id_field.is_some()).map(|f| f as _),
        job: &fingerprint,
        ..ScanOptions::default()
    };
    let index = scan_source(source, &input.display().to_string(), chunk_size, &options)?;
    let reader = ChunkReader::open(&index)?;
    Ok(Input { index, reader, _spool: spool })
}

/// Reads chunk `span`'s input objects: (the array's bytes, where each object is in them), or
/// `None` when they cannot be read (then the chunk's objects are still expected).
/// Also each object's line, when they are not consecutive from the chunk's first.
#[allow(clippy::type_complexity)]
fn read_inputs(
    reader: &ChunkReader,
    span: &ChunkSpan,
) -> Option<(Vec<u8>, Vec<std::ops::Range<usize>>, Option<Vec<u64>>)> {
    let (body, lines) = reader.read_with_lines(span).ok()?;
    let mut array = Vec::with_capacity(body.len() + 2);
    array.push(b'[');
    array.extend_from_slice(&body);
    array.push(b']');
    let raws: Vec<&serde_json::value::RawValue> = serde_json::from_slice(&array).ok()?;
    let base = array.as_ptr() as usize;
    let ranges = raws
        .iter()
        .map(|raw| {
            let start = raw.get().as_ptr() as usize - base;
            start..start + raw.get().len()
        })
        .collect::<Vec<_>>();
    (ranges.len() == span.objects as usize).then_some((array, ranges, lines))
}

/// Checks chunks `range` against what the sink holds of them (`stored`, by chunk), in parallel.
fn check_all(
    input: &Input,
    expectation: &Expectation,
    mut stored: HashMap<u64, StoredChunk>,
    range: std::ops::Range<usize>,
    normalise: &Normalise,
) -> VerifyReport {
    let chunks: Vec<(usize, Option<StoredChunk>)> = range.map(|c| (c, stored.remove(&(c as u64)))).collect();
    let reports: Vec<VerifyReport> = chunks
        .into_par_iter()
        .map(|(c, saved)| {
            let span = input.index.chunks[c];
            let inputs = read_inputs(&input.reader, &span);
            let slices: Option<Vec<&[u8]>> =
                inputs.as_ref().map(|(array, ranges, _)| ranges.iter().map(|r| &array[r.clone()]).collect());
            let lines = inputs.as_ref().and_then(|(_, _, lines)| lines.as_deref());
            check_chunk(c as u64, &span, slices.as_deref(), lines, saved, expectation, normalise)
        })
        .collect();
    let mut total = VerifyReport::default();
    for report in reports {
        total.add(report, expectation.examples);
    }
    total
}

fn base_report(input: &Input, expectation: &Expectation, location: String) -> VerifyReport {
    VerifyReport {
        location,
        expected: input.index.objects,
        bad_input: input.index.bad.len() as u64,
        compared: expectation.transform.is_some(),
        ..Default::default()
    }
}

/// Compares what the sink `config` holds of `input`'s run with what `expectation` says it should
/// hold, reading it through the sink's [`crate::sink::SinkReader`] a few chunks at a time.
pub fn verify_sink(
    config: &dyn SinkConfig,
    input: &Path,
    chunk_size: u32,
    expectation: &Expectation,
) -> Result<VerifyReport, VerifyError> {
    let input = scan_input(input, chunk_size, expectation)?;
    let reader = config.reader(&input.index.run_id)?;
    let mut report = base_report(&input, expectation, reader.location());
    let chunks = input.index.chunks.len();
    let step = reader.chunks_per_read().max(1);
    let normalise = reader.normalise();
    for first in (0..chunks).step_by(step) {
        let last = (first + step).min(chunks);
        let stored = reader.read(first..last)?;
        count_unaccounted(&mut report, stored.unaccounted);
        let part = check_all(&input, expectation, stored.chunks, first..last, &normalise);
        report.add(part, expectation.examples);
    }
    count_unaccounted(&mut report, reader.rest(chunks)?);
    Ok(report)
}

/// What the sink holds that no chunk of the run accounts for: values are unexpected, dead-letter
/// entries unmatched, chunk records that promise other rows mismatched.
fn count_unaccounted(report: &mut VerifyReport, unaccounted: crate::sink::Unaccounted) {
    report.unexpected += unaccounted.values;
    report.unmatched_dead += unaccounted.dead;
    report.mismatched_chunks += unaccounted.mismatched_chunks;
}

/// The `verify` subcommand with `registry` (the stock saver's built-ins, or a user's binary with
/// its Rust transforms): prints the report; true if it is OK.
pub fn run(args: &crate::config::VerifyArgs, registry: Registry) -> Result<VerifyReport, VerifyError> {
    let mut registry = registry.with_jq_options(args.jq.options("saver verify"));
    for command in &args.recompute_with {
        registry = registry.with_command(command.clone());
    }
    let recompute = args.recompute || !args.recompute_with.is_empty();
    let mut expectation = Expectation::new(&args.job, &registry, recompute, args.show_dead)?;
    expectation.duplicate_check = !args.no_duplicate_check;
    expectation.spool = args.spool.limits();
    let sink = args.sink.config(&args.out, 1, "verify")?;
    verify_sink(sink.as_ref(), &args.input, args.chunk_size, &expectation)
}

/// A whole `verify` command with `registry` (a user's binary with its own Rust transforms:
/// `my-mapper verify --input ... --transform mine`): parses the arguments after `verify`, prints
/// the report, exits 0 if it is OK, 1 if not, 2 if it could not verify.
pub fn main_with(registry: Registry) -> std::process::ExitCode {
    use clap::Parser;
    // jq is recomputed in sandboxes of this binary: one must become a sandbox before anything else.
    transform::jq::sandbox::enter_if_child();
    #[derive(clap::Parser)]
    #[command(name = "verify", version = common::metrics::LONG_VERSION)]
    struct Args {
        #[command(flatten)]
        verify: crate::config::VerifyArgs,
    }
    let args = Args::parse_from(std::env::args().skip(1));
    match run(&args.verify, registry) {
        Ok(report) => {
            println!("{report}");
            if report.ok() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("verify: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::protocol::ChunkId;
    use std::io::Write;

    transform::jq_sandbox_entry!();

    fn jq(filter: &str, options: transform::jq::JqOptions) -> Expectation {
        let registry =
            Registry::builtin().with_jq_options(transform::jq::JqOptions { setting: "saver verify", ..options });
        Expectation::new(&transform::JobArgs::jq(filter), &registry, false, 10).expect("jq")
    }

    fn user(i: u32) -> String {
        format!(r#"{{"uuid":"00000000-0000-4000-8000-{i:012}","fn":"F{i}","ln":"L{i}","friends":[]}}"#)
    }

    fn input(n: u32) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        for i in 0..n {
            writeln!(file, "{}", user(i)).expect("write");
        }
        file
    }

    /// Verifies the file sink under `out`.
    fn verify(
        input: &Path,
        out: &Path,
        chunk_size: u32,
        expectation: &Expectation,
    ) -> Result<VerifyReport, VerifyError> {
        let sink = crate::sink::file::FileConfig { out: out.to_path_buf() };
        verify_sink(&sink, input, chunk_size, expectation)
    }

    fn digest() -> Expectation {
        Expectation::new(&transform::JobArgs::digest(0), &Registry::builtin(), false, 10).expect("digest")
    }

    fn record(i: u32) -> String {
        let text = user(i);
        let mut out = Outputs::default();
        transform::digest::DigestTransform { rounds: 0 }.apply(text.as_bytes(), &mut out).expect("maps");
        let value = out.iter().next().expect("one").to_vec();
        String::from_utf8(value).expect("utf-8")
    }

    /// Writes chunk `chunk` into run directory `dir` as the file sink lays it out, whatever
    /// `values` (one per line) and `dead` (entries without their chunk) hold.
    fn save_raw(dir: &Path, chunk: u32, values: &str, dead: &[String]) {
        use crate::sink::file::layout::{part_file_name, IndexEntry, DEAD_FILE, INDEX_FILE};
        let append = |name: &str, text: &str| -> u64 {
            let mut file =
                fs::OpenOptions::new().create(true).append(true).open(dir.join(name)).expect("open a sink file");
            let at = file.metadata().expect("size").len();
            file.write_all(text.as_bytes()).expect("append");
            at
        };
        let offset = append(&part_file_name(0), values);
        let dead_text: String = dead.iter().map(|d| format!("{{\"chunk\":{chunk},{}\n", &d[1..])).collect();
        let dead_offset = append(DEAD_FILE, &dead_text);
        let entry = IndexEntry {
            chunk: ChunkId(chunk),
            part: 0,
            offset,
            bytes: values.len() as u64,
            values: values.lines().count() as u64,
            dead: dead.len() as u64,
            dead_offset,
            dead_bytes: dead_text.len() as u64,
        };
        append(INDEX_FILE, &entry.line());
    }

    fn run_dir(out: &Path, file: &tempfile::NamedTempFile, expectation: &Expectation) -> PathBuf {
        let run = scan_input(file.path(), 10, expectation).expect("scan").index.run_id;
        let dir = out.join(run);
        fs::create_dir_all(&dir).expect("run dir");
        dir
    }

    #[test]
    fn a_chunk_verify_cannot_read_is_still_expected_and_so_missing() {
        let file = input(30);
        let expectation = digest();
        let out = tempfile::tempdir().expect("out");
        let dir = run_dir(out.path(), &file, &expectation);
        for c in 0..3u32 {
            let records: String = (c * 10..c * 10 + 10).map(|i| record(i) + "\n").collect();
            save_raw(&dir, c, &records, &[]);
        }
        let index = scan_input(file.path(), 10, &expectation).expect("scan");
        // Rewrite one record of chunk 1 in place, after the scan: that chunk can no longer be read.
        let mut bytes = fs::read(file.path()).expect("read");
        let at = bytes.windows(3).position(|w| w == b"F15").expect("record 15");
        bytes[at] = 0xFF;
        fs::write(file.path(), &bytes).expect("rewrite");
        let span = index.index.chunks[1];
        let inputs = read_inputs(&index.reader, &span);
        assert!(inputs.is_none(), "the chunk is unreadable now");
        let saved =
            StoredChunk { values: StoredValues::InOrder(vec![b"{}".to_vec(); 10]), dead: vec![], duplicates: 0 };
        let report = check_chunk(1, &span, None, None, Some(saved), &expectation, &crate::sink::as_written());
        assert_eq!((report.found, report.missing), (0, 10), "{report}");
    }

    #[test]
    fn dead_entries_count_only_in_a_saved_chunk_by_index_and_id_and_forged_ones_fail() {
        let file = input(30);
        let expectation = digest();
        let out = tempfile::tempdir().expect("out");
        let dir = run_dir(out.path(), &file, &expectation);
        let id = |i: u32| format!("00000000-0000-4000-8000-{i:012}");
        let dead = |index: u32, id: Option<String>, cause: &str| {
            format!(
                r#"{{"index":{index},"id":{},"cause":"{cause}","error":"x"}}"#,
                id.map_or("null".into(), |i| format!("\"{i}\""))
            )
        };
        // Chunk 0: a forged result listing every object as dead without its id (saved empty).
        let forged: Vec<String> = (0..10).map(|i| dead(i, None, "crash")).collect();
        save_raw(&dir, 0, "", &forged);
        // Chunk 1: object 3 honestly dead-lettered (a crash); a repeat, an index past the chunk and
        // another chunk's id do not count.
        let records: String = (10..20).filter(|i| *i != 13).map(|i| record(i) + "\n").collect();
        let entries = [
            dead(3, Some(id(13)), "crash"),
            dead(3, Some(id(13)), "crash"),
            dead(10, Some(id(13)), "crash"),
            dead(4, Some(id(2)), "crash"),
        ];
        save_raw(&dir, 1, &records, &entries);
        // Chunk 2: a dead-letter entry no index line names (the tail of a batch whose saver died
        // before committing it): the chunk is not saved, and the entry matches nothing.
        let mut stray = fs::OpenOptions::new().append(true).open(dir.join("dead.jsonl")).expect("dead file");
        writeln!(stray, r#"{{"chunk":2,{}"#, &dead(0, Some(id(20)), "crash")[1..]).expect("append");
        let report = verify(file.path(), out.path(), 10, &expectation).expect("verify");
        assert_eq!(report.expected, 30, "{report}");
        assert_eq!((report.found, report.dead_lettered), (9, 1), "{report}");
        assert_eq!(report.missing, 20, "{report}");
        assert_eq!(report.unmatched_dead, 14, "{report}");
        assert!(!report.ok(), "{report}");
    }

    #[test]
    fn an_object_dead_lettered_as_refused_that_the_transform_maps_is_wrong() {
        // A mapper that guessed the `urn:uuid:` prefix is case-sensitive and refused the object.
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(file, r#"{{"uuid":"URN:UUID:00000000-0000-4000-8000-000000000001","fn":"A","ln":"B","friends":[]}}"#)
            .expect("write");
        let expectation = digest();
        let out = tempfile::tempdir().expect("out");
        let dir = run_dir(out.path(), &file, &expectation);
        let entry = r#"{"index":0,"id":"URN:UUID:00000000-0000-4000-8000-000000000001","cause":"transform","error":"not a UUID"}"#;
        save_raw(&dir, 0, "", &[entry.to_string()]);
        let report = verify(file.path(), out.path(), 10, &expectation).expect("verify");
        assert_eq!((report.wrong, report.dead_lettered), (1, 0), "{report}");
        assert!(report.to_string().contains("but the transform maps it"), "{report}");
    }

    #[test]
    fn records_with_a_repeated_id_are_not_expected_as_the_fetcher_skipped_them() {
        // Record 5 repeats record 2's id: the fetcher's scan skips it, so chunk 0 is records
        // 0-4 and 6-10 and chunk 1 is record 11.
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        for i in 0..12 {
            writeln!(file, "{}", user(if i == 5 { 2 } else { i })).expect("write");
        }
        let expectation = digest();
        let out = tempfile::tempdir().expect("out");
        let dir = run_dir(out.path(), &file, &expectation);
        // Written one file per chunk, as savers did before the segment files: still read.
        use crate::sink::file::layout::legacy_chunk_file_name;
        let chunk0: String = (0..11).filter(|i| *i != 5).map(|i| record(i) + "\n").collect();
        fs::write(dir.join(legacy_chunk_file_name(ChunkId(0))), chunk0).expect("chunk 0");
        fs::write(dir.join(legacy_chunk_file_name(ChunkId(1))), record(11) + "\n").expect("chunk 1");
        let report = verify(file.path(), out.path(), 10, &expectation).expect("verify");
        assert!(report.ok(), "{report}");
        assert_eq!((report.expected, report.found, report.bad_input), (11, 11, 1), "{report}");
        // Scanned without the check, the input is another run (other chunks, so another run
        // id): nothing of it is in the sink.
        let unchecked = Expectation { duplicate_check: false, ..digest() };
        let report = verify(file.path(), out.path(), 10, &unchecked).expect("verify");
        assert_eq!((report.expected, report.missing), (12, 12), "{report}");
        assert_ne!(report.location, verify(file.path(), out.path(), 10, &expectation).expect("verify").location);
    }

    #[test]
    fn an_object_over_the_jq_limits_is_reported_against_its_dead_letter_instead_of_stopping_verify() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        for f in ["ok", "spin", "recurse", "ok"] {
            writeln!(file, "{{\"f\":\"{f}\"}}").expect("write");
        }
        let filter = r#"if .f == "spin" then last(range(1e15)) elif .f == "recurse" then (def f: [f]; f) else .f end"#;
        let limits = transform::jq::JqOptions { timeout: std::time::Duration::from_millis(500), ..jq_test_options() };
        let expectation = jq(filter, limits);
        let out = tempfile::tempdir().expect("out");
        let dir = run_dir(out.path(), &file, &expectation);
        let dead =
            |index: u32, cause: &str| format!(r#"{{"index":{index},"cause":"{cause}","error":"as the mapper said"}}"#);
        save_raw(&dir, 0, "\"ok\"\n\"ok\"\n", &[dead(1, "timeout"), dead(2, "crash")]);
        let report = verify(file.path(), out.path(), 10, &expectation).expect("a verdict, not a crash");
        assert!(report.ok(), "{report}");
        assert_eq!((report.found, report.dead_lettered), (2, 2), "{report}");
        let text = report.to_string();
        assert!(text.contains("object 1 (line 2): timeout: as the mapper said; verify: the same cause"), "{text}");
        assert!(text.contains("object 2 (line 3): crash: as the mapper said; verify: the same cause"), "{text}");
        // Saved with a value where verify runs out of time: not confirmed, so not OK.
        fs::remove_dir_all(&dir).expect("empty the run");
        fs::create_dir_all(&dir).expect("run dir");
        save_raw(&dir, 0, "\"ok\"\n1\n\"ok\"\n", &[dead(2, "crash")]);
        let report = verify(file.path(), out.path(), 10, &expectation).expect("a verdict");
        assert_eq!(report.wrong, 1, "{report}");
        assert!(report.to_string().contains("verify could not recompute it (timeout: jq took longer than 500ms on this object (time limit, `saver verify --jq-timeout`)"), "{report}");
    }

    #[test]
    fn every_value_is_compared_in_order_per_object() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        for n in [0, 2, 1] {
            writeln!(file, "{{\"n\":{n}}}").expect("write");
        }
        let expectation = jq("range(.n) | {i: .}", jq_test_options());
        let out = tempfile::tempdir().expect("out");
        let dir = run_dir(out.path(), &file, &expectation);
        let saved_as = |values: &str| {
            fs::remove_dir_all(&dir).expect("empty the run");
            fs::create_dir_all(&dir).expect("run dir");
            save_raw(&dir, 0, values, &[]);
            verify(file.path(), out.path(), 10, &expectation).expect("verify")
        };
        // The 0, 2 and 1 values of the three objects, in order; then with two values swapped.
        let report = saved_as("{\"i\":0}\n{\"i\": 1}\n{\"i\":0}\n");
        assert!(report.ok() && report.found == 3 && report.compared, "{report}");
        assert_eq!(saved_as("{\"i\":1}\n{\"i\":0}\n{\"i\":0}\n").wrong, 1);
        assert_eq!(saved_as("{\"i\":0}\n{\"i\":1}\n{\"i\":0}\n{\"i\":9}\n").unexpected, 1);
    }

    #[test]
    fn a_decimal_cut_short_an_integer_past_2_64_off_by_one_and_false_data_before_a_repeated_key_are_wrong() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        for record in [r#"{"x":0.1000000000000000000001}"#, r#"{"x":18446744073709551617}"#, r#"{"k":"real","n":1.50}"#]
        {
            writeln!(file, "{record}").expect("write");
        }
        let expectation = Expectation::new(
            &transform::JobArgs::jq("."),
            &Registry::builtin().with_jq_options(jq_test_options()),
            false,
            10,
        )
        .expect("jq");
        let out = tempfile::tempdir().expect("out");
        let dir = run_dir(out.path(), &file, &expectation);
        let saved_as = |values: &str| {
            fs::remove_dir_all(&dir).expect("empty the run");
            fs::create_dir_all(&dir).expect("run dir");
            save_raw(&dir, 0, values, &[]);
            verify(file.path(), out.path(), 10, &expectation).expect("verify")
        };
        // The values exactly, written another way (whitespace, key order): OK.
        let report = saved_as(
            "{ \"x\": 0.1000000000000000000001 }\n{\"x\":18446744073709551617}\n{\"n\":1.50,\"k\":\"real\"}\n",
        );
        assert!(report.ok() && report.found == 3, "{report}");
        // Each tampering alone: a double would call every one of them equal.
        for (tampered, object) in [
            ("{\"x\":0.1}\n{\"x\":18446744073709551617}\n{\"k\":\"real\",\"n\":1.50}\n", 0),
            ("{\"x\":0.1000000000000000000001}\n{\"x\":18446744073709551616}\n{\"k\":\"real\",\"n\":1.50}\n", 1),
            ("{\"x\":0.1000000000000000000001}\n{\"x\":18446744073709551617}\n{\"k\":\"forged\",\"k\":\"real\",\"n\":1.50}\n", 2),
            ("{\"x\":0.1000000000000000000001}\n{\"x\":18446744073709551617}\n{\"k\":\"real\",\"n\":1.5}\n", 2),
        ] {
            let report = saved_as(tampered);
            assert_eq!((report.wrong, report.found), (1, 3), "{tampered}: {report}");
            assert!(report.wrong_examples[0].contains(&format!("object {object} ")), "{report}");
            assert!(report.wrong_examples[0].contains("value 0 is"), "names the value: {report}");
        }
    }

    #[test]
    fn a_chunk_committed_twice_is_duplicated_and_lines_outside_every_chunk_are_unexpected() {
        let file = input(20);
        let expectation = digest();
        let out = tempfile::tempdir().expect("out");
        let dir = run_dir(out.path(), &file, &expectation);
        let chunk = |c: u32| -> String { (c * 10..c * 10 + 10).map(|i| record(i) + "\n").collect() };
        save_raw(&dir, 0, &chunk(0), &[]);
        save_raw(&dir, 1, &chunk(1), &[]);
        let report = verify(file.path(), out.path(), 10, &expectation).expect("verify");
        assert!(report.ok() && report.found == 20, "{report}");
        save_raw(&dir, 1, &chunk(1), &[]);
        let report = verify(file.path(), out.path(), 10, &expectation).expect("verify");
        assert_eq!((report.found, report.duplicated), (20, 10), "{report}");
        // Lines no index entry names: what a saver wrote before dying uncommitted.
        let mut part = fs::OpenOptions::new().append(true).open(dir.join("part-00000.jsonl")).expect("part");
        write!(part, "{}\n{}\n", record(3), record(4)).expect("append");
        let report = verify(file.path(), out.path(), 10, &expectation).expect("verify");
        assert_eq!(report.unexpected, 2, "{report}");
        assert!(!report.ok(), "{report}");
    }
}
