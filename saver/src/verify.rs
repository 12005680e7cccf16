//! `saver verify`: checks a sink (a directory or a PostgreSQL database) against its input. Every
//! valid input object must be in the sink exactly once and equal to its transform; objects the
//! mappers dead-lettered are counted apart. For a database it also checks that every chunk record
//! matches the rows saved under it.
//! It recomputes the transform (on all cores), so at default rounds it costs as much CPU as the
//! run itself.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use futures::StreamExt;

use common::input::{scan, ChunkReader, InputError, InputIndex};
use common::protocol::DeadObject;
use common::transform::{parse_input, transform, MappedUser};
use rayon::prelude::*;

/// The outcome of a verification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// What was checked: the run directory, or the database and run.
    pub location: String,
    /// Valid objects in the input.
    pub expected: u64,
    /// Records found in the sink.
    pub found: u64,
    /// Input objects not in the sink (and not dead-lettered).
    pub missing: u64,
    /// Extra copies of objects.
    pub duplicated: u64,
    /// Records whose content differs from the transform of their input.
    pub wrong: u64,
    /// Records whose id is not in the input.
    pub unexpected: u64,
    /// Objects dead-lettered by mappers.
    pub dead_lettered: u64,
    /// Invalid input records (never sent).
    pub bad_input: u64,
    /// Chunk records whose object count differs from the rows saved under them (database only).
    pub mismatched_chunks: u64,
    /// Dead-letter entries that name no object of their chunk (by index and id), or one already
    /// saved or dead-lettered: they account for nothing.
    pub unmatched_dead: u64,
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
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "verify {}: {} expected, {} found, {} missing, {} duplicated, {} wrong, {} unexpected, {} dead-lettered, {} invalid input records, {} mismatched chunk records, {} unmatched dead-letter entries: {}",
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
            if self.ok() { "OK" } else { "FAILED" }
        )
    }
}

/// Why verification could not run.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The input cannot be read.
    #[error(transparent)]
    Input(#[from] InputError),
    /// The sink cannot be read.
    #[error("cannot read {path}: {source}")]
    Sink {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The database cannot be read.
    #[error("{0}")]
    Database(String),
    /// A sink file holds something that is not a record.
    #[error("{path}, line {line}: not a mapped record: {error}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// Why.
        error: String,
    },
}

/// One input object as verify expects it in the sink.
struct Expected {
    /// Its `uuid`, when readable (dead-letter entries must name it).
    id: Option<String>,
    /// The hash of its transform; `None` if it cannot be transformed (only a dead entry fits).
    hash: Option<u64>,
    /// Times found as a record.
    seen: u32,
    /// Counted as dead-lettered (at most once).
    dead: bool,
}

fn hash_of(record: &MappedUser) -> u64 {
    let mut hasher = DefaultHasher::new();
    record.hash(&mut hasher);
    hasher.finish()
}

/// Tallies a sink's records against the transform of the input, object by object: every input
/// object is expected, whatever happens to it on the way (a chunk verify cannot read or parse
/// stays expected, so it shows as missing, never as nothing), and a dead-letter entry counts only
/// if it names an object of its own chunk by index and id.
struct Checker {
    /// Per chunk, its objects in input order.
    chunks: Vec<Vec<Expected>>,
    /// id -> (chunk, index), to place a record.
    by_id: HashMap<String, (usize, usize)>,
    report: VerifyReport,
}

impl Checker {
    /// Scans the input and recomputes every object's transform; returns the run id too.
    fn new(input: &Path, rounds: u32, chunk_size: u32) -> Result<(Self, String), VerifyError> {
        let index = scan(input, chunk_size)?;
        let reader = ChunkReader::open(&index)?;
        Ok((Self::from_index(&index, &reader, rounds), index.run_id.clone()))
    }

    fn from_index(index: &InputIndex, reader: &ChunkReader, rounds: u32) -> Self {
        let chunks: Vec<Vec<Expected>> = index
            .chunks
            .par_iter()
            .map(|span| {
                let unreadable = || (0..span.objects).map(|_| Expected { id: None, hash: None, seen: 0, dead: false });
                let Ok(wrapped) = reader.read_array(span) else { return unreadable().collect() };
                let Ok(raws) = serde_json::from_slice::<Vec<&serde_json::value::RawValue>>(&wrapped) else {
                    return unreadable().collect();
                };
                let mut objects: Vec<Expected> = raws
                    .iter()
                    .map(|raw| match parse_input(raw.get().as_bytes()) {
                        Ok(user) => {
                            let record = transform(&user, rounds);
                            Expected { hash: Some(hash_of(&record)), id: Some(record.id), seen: 0, dead: false }
                        }
                        Err(_) => Expected { id: uuid_of(raw.get()), hash: None, seen: 0, dead: false },
                    })
                    .collect();
                // Never fewer than the scan counted: what cannot be read is still expected.
                objects.extend(unreadable().skip(objects.len()));
                objects
            })
            .collect();
        let mut by_id = HashMap::with_capacity(index.objects as usize);
        for (c, objects) in chunks.iter().enumerate() {
            for (i, object) in objects.iter().enumerate() {
                if let Some(id) = &object.id {
                    by_id.entry(id.clone()).or_insert((c, i));
                }
            }
        }
        let report = VerifyReport { expected: index.objects, bad_input: index.bad.len() as u64, ..Default::default() };
        Checker { chunks, by_id, report }
    }

    fn record(&mut self, record: &MappedUser) {
        self.report.found += 1;
        let Some(&(c, i)) = self.by_id.get(&record.id) else {
            self.report.unexpected += 1;
            return;
        };
        let entry = &mut self.chunks[c][i];
        entry.seen += 1;
        if entry.seen > 1 || entry.dead {
            self.report.duplicated += 1;
        }
        if entry.hash != Some(hash_of(record)) {
            self.report.wrong += 1;
        }
    }

    /// A dead-letter entry saved under `chunk`: it counts if it names one of that chunk's
    /// objects by index and by the object's id, once.
    fn dead(&mut self, chunk: u64, dead: &DeadObject) {
        let entry = usize::try_from(chunk)
            .ok()
            .and_then(|c| self.chunks.get_mut(c))
            .and_then(|objects| objects.get_mut(dead.index as usize))
            .filter(|entry| entry.id == dead.id && !entry.dead && entry.seen == 0);
        match entry {
            Some(entry) => {
                entry.dead = true;
                self.report.dead_lettered += 1;
            }
            None => self.report.unmatched_dead += 1,
        }
    }

    fn finish(mut self, location: String) -> VerifyReport {
        self.report.missing = self.chunks.iter().flatten().filter(|e| e.seen == 0 && !e.dead).count() as u64;
        self.report.location = location;
        self.report
    }
}

/// The `uuid` of an object that the transform refuses, if it has a string one.
fn uuid_of(raw: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        uuid: String,
    }
    serde_json::from_str::<IdOnly>(raw).ok().map(|u| u.uuid)
}

/// The chunk index in a sink file name `chunk-<digits>[.dead].jsonl`.
fn chunk_of(name: &str) -> Option<u64> {
    name.strip_prefix("chunk-")?.split('.').next()?.parse().ok()
}

/// Verifies the sink directory `out` against `input`.
pub fn verify(input: &Path, out: &Path, rounds: u32, chunk_size: u32) -> Result<VerifyReport, VerifyError> {
    let (mut checker, run_id) = Checker::new(input, rounds, chunk_size)?;
    let run_dir = out.join(&run_id);
    let entries = match fs::read_dir(&run_dir) {
        Ok(entries) => entries.flatten().map(|e| e.path()).collect::<Vec<_>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => return Err(VerifyError::Sink { path: run_dir, source }),
    };
    for path in entries {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if !name.starts_with("chunk-") {
            continue;
        }
        let text = fs::read_to_string(&path).map_err(|source| VerifyError::Sink { path: path.clone(), source })?;
        let dead = name.ends_with(".dead.jsonl");
        let chunk = chunk_of(&name).unwrap_or(u64::MAX);
        for (i, line) in text.lines().enumerate() {
            let corrupt = |error: serde_json::Error| VerifyError::Corrupt {
                path: path.clone(),
                line: i + 1,
                error: error.to_string(),
            };
            if dead {
                let object: DeadObject = serde_json::from_str(line).map_err(corrupt)?;
                checker.dead(chunk, &object);
            } else {
                let record: MappedUser = serde_json::from_str(line).map_err(corrupt)?;
                checker.record(&record);
            }
        }
    }
    Ok(checker.finish(run_dir.display().to_string()))
}

/// Verifies what a PostgreSQL sink saved for `input`'s run: its object rows, dead-letter rows and
/// chunk records.
pub fn verify_postgres(
    input: &Path,
    url: &str,
    password: Option<&str>,
    rounds: u32,
    chunk_size: u32,
) -> Result<VerifyReport, VerifyError> {
    let config = crate::sink::postgres::parse(url, password).map_err(|e| VerifyError::Database(e.to_string()))?;
    let target = crate::sink::postgres::describe(&config);
    let (mut checker, run_id) = Checker::new(input, rounds, chunk_size)?;
    let db = |action: &str, e: tokio_postgres::Error| {
        let detail = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
        VerifyError::Database(format!("PostgreSQL {target}: cannot {action}: {detail}"))
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| VerifyError::Database(format!("cannot start an async runtime: {e}")))?;
    runtime.block_on(async {
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(|e| db("connect", e))?;
        let connection = tokio::spawn(connection);
        let rows = client
            .query_raw("SELECT id, name, friends, digest FROM chunkmill_objects WHERE run = $1", [&run_id])
            .await
            .map_err(|e| db("read chunkmill_objects", e))?;
        futures::pin_mut!(rows);
        while let Some(row) = rows.next().await {
            let row = row.map_err(|e| db("read chunkmill_objects", e))?;
            let friends: i64 = row.try_get(2).map_err(|e| db("read chunkmill_objects", e))?;
            let record = MappedUser {
                id: row.try_get(0).map_err(|e| db("read chunkmill_objects", e))?,
                name: row.try_get(1).map_err(|e| db("read chunkmill_objects", e))?,
                friends: u64::try_from(friends).unwrap_or(u64::MAX),
                digest: row.try_get(3).map_err(|e| db("read chunkmill_objects", e))?,
            };
            checker.record(&record);
        }
        for row in client
            .query("SELECT chunk, idx, id, error FROM chunkmill_dead_objects WHERE run = $1", &[&run_id])
            .await
            .map_err(|e| db("read chunkmill_dead_objects", e))?
        {
            let read = |e| db("read chunkmill_dead_objects", e);
            let chunk: i64 = row.try_get(0).map_err(read)?;
            let index: i32 = row.try_get(1).map_err(read)?;
            let dead = DeadObject {
                index: u32::try_from(index).unwrap_or(u32::MAX),
                id: row.try_get(2).map_err(read)?,
                error: row.try_get(3).map_err(read)?,
            };
            checker.dead(u64::try_from(chunk).unwrap_or(u64::MAX), &dead);
        }
        // A chunk record promises its rows; rows without a record, or a record with a different
        // count, break the one-transaction-per-chunk invariant.
        let mismatched: i64 = client
            .query_one(
                "SELECT count(*) FROM (
                   SELECT c.chunk FROM chunkmill_chunks c
                   LEFT JOIN (SELECT chunk, count(*) AS n FROM chunkmill_objects WHERE run = $1 GROUP BY chunk) o
                     USING (chunk)
                   WHERE c.run = $1 AND c.objects <> coalesce(o.n, 0)
                   UNION ALL
                   SELECT DISTINCT o.chunk FROM chunkmill_objects o
                   WHERE o.run = $1
                     AND NOT EXISTS (SELECT 1 FROM chunkmill_chunks c WHERE c.run = o.run AND c.chunk = o.chunk)
                 ) AS bad",
                &[&run_id],
            )
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| db("compare chunk records with rows", e))?;
        checker.report.mismatched_chunks = u64::try_from(mismatched).unwrap_or(0);
        drop(client);
        let _ = connection.await;
        Ok(checker.finish(format!("{target} run {run_id}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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

    #[test]
    fn a_chunk_verify_cannot_read_is_still_expected_and_so_missing() {
        let file = input(30);
        let index = scan(file.path(), 10).expect("scan");
        // Rewrite one record of chunk 1 in place, after the scan: that chunk can no longer be read.
        let mut bytes = std::fs::read(file.path()).expect("read");
        let at = bytes.windows(3).position(|w| w == b"F15").expect("record 15");
        bytes[at] = 0xFF;
        std::fs::write(file.path(), &bytes).expect("rewrite");
        let reader = ChunkReader::open(&index).expect("open");
        let report = Checker::from_index(&index, &reader, 0).finish("test".into());
        assert_eq!((report.expected, report.found, report.missing), (30, 0, 30), "{report}");
        assert!(!report.ok());
    }

    #[test]
    fn dead_entries_count_only_when_they_name_an_object_of_their_chunk() {
        let file = input(20);
        let out = tempfile::tempdir().expect("out");
        let run = scan(file.path(), 10).expect("scan").run_id;
        let dir = out.path().join(&run);
        std::fs::create_dir_all(&dir).expect("run dir");
        // Chunk 0: a forged result listing every object as dead without its id (saved empty).
        std::fs::write(dir.join("chunk-00000000.jsonl"), "").expect("chunk 0");
        let forged: String = (0..10).map(|i| format!("{{\"index\":{i},\"id\":null,\"error\":\"forged\"}}\n")).collect();
        std::fs::write(dir.join("chunk-00000000.dead.jsonl"), forged).expect("dead 0");
        // Chunk 1: object 3 honestly dead-lettered by id; a repeat of it, an index past the chunk,
        // and another chunk's id do not count.
        let records: String = (10..20)
            .filter(|i| *i != 13)
            .map(|i| {
                let text = user(i);
                let user = parse_input(text.as_bytes()).expect("valid");
                serde_json::to_string(&transform(&user, 0)).expect("json") + "\n"
            })
            .collect();
        std::fs::write(dir.join("chunk-00000001.jsonl"), records).expect("chunk 1");
        let id = |i: u32| format!("00000000-0000-4000-8000-{i:012}");
        let dead = [(3, id(13)), (3, id(13)), (10, id(13)), (4, id(2))]
            .iter()
            .map(|(index, id)| format!("{{\"index\":{index},\"id\":\"{id}\",\"error\":\"x\"}}\n"))
            .collect::<String>();
        std::fs::write(dir.join("chunk-00000001.dead.jsonl"), dead).expect("dead 1");
        let report = verify(file.path(), out.path(), 0, 10).expect("verify");
        assert_eq!(report.expected, 20, "{report}");
        assert_eq!(report.found, 9, "{report}");
        assert_eq!(report.dead_lettered, 1, "{report}");
        assert_eq!(report.missing, 10, "{report}");
        assert_eq!(report.unmatched_dead, 13, "{report}");
        assert!(!report.ok(), "{report}");
    }
}
