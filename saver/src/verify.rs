//! `saver verify`: checks a sink against its input. Every valid input object must be in the sink
//! exactly once and equal to its transform; objects the mappers dead-lettered are counted apart.
//! It recomputes the transform (on all cores), so at default rounds it costs as much CPU as the
//! run itself.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use common::input::{scan, ChunkReader, InputError};
use common::protocol::DeadObject;
use common::transform::{parse_input, transform, MappedUser};
use rayon::prelude::*;

/// The outcome of a verification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// The run directory checked.
    pub run_dir: PathBuf,
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
}

impl VerifyReport {
    /// Nothing missing, duplicated, wrong or unexpected.
    pub fn ok(&self) -> bool {
        self.missing == 0 && self.duplicated == 0 && self.wrong == 0 && self.unexpected == 0
    }
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "verify {}: {} expected, {} found, {} missing, {} duplicated, {} wrong, {} unexpected, {} dead-lettered, {} invalid input records: {}",
            self.run_dir.display(),
            self.expected,
            self.found,
            self.missing,
            self.duplicated,
            self.wrong,
            self.unexpected,
            self.dead_lettered,
            self.bad_input,
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

/// Verifies the sink directory `out` against `input`.
pub fn verify(input: &Path, out: &Path, rounds: u32, chunk_size: u32) -> Result<VerifyReport, VerifyError> {
    let index = scan(input, chunk_size)?;
    let reader = ChunkReader::open(&index)?;
    let run_dir = out.join(&index.run_id);
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
    let mut report = VerifyReport {
        run_dir: run_dir.clone(),
        expected: index.objects,
        bad_input: index.bad.len() as u64,
        ..Default::default()
    };
    let mut dead_ids: Vec<String> = Vec::new();
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
                report.dead_lettered += 1;
                dead_ids.extend(object.id);
                continue;
            }
            let record: MappedUser = serde_json::from_str(line).map_err(corrupt)?;
            report.found += 1;
            match expected.get_mut(&record.id) {
                None => report.unexpected += 1,
                Some(entry) => {
                    entry.seen += 1;
                    if entry.seen > entry.count {
                        report.duplicated += 1;
                    }
                    if entry.hash != hash_of(&record) {
                        report.wrong += 1;
                    }
                }
            }
        }
    }
    for id in &dead_ids {
        if let Some(entry) = expected.get_mut(id) {
            entry.seen += 1;
        }
    }
    // Dead-lettered objects without a readable id cannot be matched; they still are not missing.
    let unmatched_dead = report.dead_lettered - dead_ids.len() as u64;
    let missing: u64 = expected.values().map(|e| u64::from(e.count.saturating_sub(e.seen))).sum();
    report.missing = missing.saturating_sub(unmatched_dead);
    Ok(report)
}
