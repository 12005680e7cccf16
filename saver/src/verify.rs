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

use common::input::{scan, ChunkReader, InputError};
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
}

impl VerifyReport {
    /// Nothing missing, duplicated, wrong or unexpected.
    pub fn ok(&self) -> bool {
        self.missing == 0
            && self.duplicated == 0
            && self.wrong == 0
            && self.unexpected == 0
            && self.mismatched_chunks == 0
    }
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "verify {}: {} expected, {} found, {} missing, {} duplicated, {} wrong, {} unexpected, {} dead-lettered, {} invalid input records, {} mismatched chunk records: {}",
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

#[derive(Default)]
struct Expected {
    hash: u64,
    count: u32,
    seen: u32,
}

fn hash_of(record: &MappedUser) -> u64 {
    let mut hasher = DefaultHasher::new();
    record.hash(&mut hasher);
    hasher.finish()
}

/// Tallies a sink's records against the transform of the input.
struct Checker {
    expected: HashMap<String, Expected>,
    dead_ids: Vec<String>,
    report: VerifyReport,
}

impl Checker {
    /// Scans the input and recomputes every object's transform; returns the run id too.
    fn new(input: &Path, rounds: u32, chunk_size: u32) -> Result<(Self, String), VerifyError> {
        let index = scan(input, chunk_size)?;
        let reader = ChunkReader::open(&index)?;
        let mapped: Vec<Vec<(String, u64)>> = index
            .chunks
            .par_iter()
            .map(|span| -> Result<Vec<(String, u64)>, InputError> {
                let wrapped = reader.read_array(span)?;
                let raws: Vec<&serde_json::value::RawValue> = serde_json::from_slice(&wrapped).unwrap_or_default();
                Ok(raws
                    .iter()
                    .filter_map(|raw| parse_input(raw.get().as_bytes()).ok())
                    .map(|user| {
                        let record = transform(&user, rounds);
                        let hash = hash_of(&record);
                        (record.id, hash)
                    })
                    .collect())
            })
            .collect::<Result<_, _>>()?;
        let mut expected: HashMap<String, Expected> = HashMap::with_capacity(index.objects as usize);
        for (id, hash) in mapped.into_iter().flatten() {
            let entry = expected.entry(id).or_default();
            entry.hash = hash;
            entry.count += 1;
        }
        let report = VerifyReport { expected: index.objects, bad_input: index.bad.len() as u64, ..Default::default() };
        Ok((Checker { expected, dead_ids: Vec::new(), report }, index.run_id))
    }

    fn record(&mut self, record: &MappedUser) {
        self.report.found += 1;
        match self.expected.get_mut(&record.id) {
            None => self.report.unexpected += 1,
            Some(entry) => {
                entry.seen += 1;
                if entry.seen > entry.count {
                    self.report.duplicated += 1;
                }
                if entry.hash != hash_of(record) {
                    self.report.wrong += 1;
                }
            }
        }
    }

    fn dead(&mut self, id: Option<String>) {
        self.report.dead_lettered += 1;
        self.dead_ids.extend(id);
    }

    fn finish(mut self, location: String) -> VerifyReport {
        for id in &self.dead_ids {
            if let Some(entry) = self.expected.get_mut(id) {
                entry.seen += 1;
            }
        }
        // Dead-lettered objects without a readable id cannot be matched; they still are not missing.
        let unmatched_dead = self.report.dead_lettered - self.dead_ids.len() as u64;
        let missing: u64 = self.expected.values().map(|e| u64::from(e.count.saturating_sub(e.seen))).sum();
        self.report.missing = missing.saturating_sub(unmatched_dead);
        self.report.location = location;
        self.report
    }
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
        for (i, line) in text.lines().enumerate() {
            let corrupt = |error: serde_json::Error| VerifyError::Corrupt {
                path: path.clone(),
                line: i + 1,
                error: error.to_string(),
            };
            if dead {
                let object: DeadObject = serde_json::from_str(line).map_err(corrupt)?;
                checker.dead(object.id);
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
            .query("SELECT id FROM chunkmill_dead_objects WHERE run = $1", &[&run_id])
            .await
            .map_err(|e| db("read chunkmill_dead_objects", e))?
        {
            checker.dead(row.try_get(0).map_err(|e| db("read chunkmill_dead_objects", e))?);
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
