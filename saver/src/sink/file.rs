//! The file sink: `OUT/<run>/chunk-<8 digits>.jsonl`, one mapped object per line. A chunk is
//! written to a temporary file, fsynced, then hard-linked to its final name (which fails if the
//! name exists, so two savers racing on one chunk cannot both count it) and the directory is
//! fsynced. A crash leaves either the whole chunk or no chunk, plus at most a stray temporary
//! file that is removed at the next start. Dead-lettered objects of a chunk go to
//! `chunk-<8 digits>.dead.jsonl`, made durable before the chunk itself.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use common::protocol::ChunkResult;
use serde::Serialize;

use super::{SaveOutcome, SinkError};

/// A directory of chunk files.
#[derive(Debug)]
pub struct FileSink {
    root: PathBuf,
    /// Run directories known to exist (and fsynced into their parent).
    runs: Mutex<HashSet<String>>,
}

/// The final name of a chunk's file.
pub fn chunk_file_name(chunk: u64) -> String {
    format!("chunk-{chunk:08}.jsonl")
}

/// The final name of a chunk's dead-letter file.
pub fn dead_file_name(chunk: u64) -> String {
    format!("chunk-{chunk:08}.dead.jsonl")
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SinkError + 'a {
    move |source| SinkError::Io { action, path: path.to_path_buf(), source }
}

fn sync_dir(dir: &Path) -> Result<(), SinkError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync directory", dir))
}

impl FileSink {
    /// A sink under `root` (created if missing). Removes temporary files left by a crash.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, SinkError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io("create directory", &root))?;
        for run in fs::read_dir(&root).map_err(io("list", &root))?.flatten() {
            if run.path().is_dir() {
                for entry in fs::read_dir(run.path()).map_err(io("list", &run.path()))?.flatten() {
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    if name.starts_with('.') && name.ends_with(".tmp") {
                        let _ = fs::remove_file(entry.path());
                    }
                }
            }
        }
        Ok(FileSink { root, runs: Mutex::new(HashSet::new()) })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn run_dir(&self, run: &str) -> Result<PathBuf, SinkError> {
        let dir = self.root.join(run);
        let known = self.runs.lock().map(|r| r.contains(run)).unwrap_or(false);
        if !known {
            fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
            sync_dir(&self.root)?;
            if let Ok(mut runs) = self.runs.lock() {
                runs.insert(run.to_string());
            }
        }
        Ok(dir)
    }

    /// Saves a chunk (the result must have passed `validate`, which vets the run id).
    pub fn save(&self, result: &ChunkResult) -> Result<SaveOutcome, SinkError> {
        let dir = self.run_dir(&result.run)?;
        let target = dir.join(chunk_file_name(result.chunk));
        if target.exists() {
            return Ok(SaveOutcome::Duplicate);
        }
        if !result.dead.is_empty() {
            let dead = dir.join(dead_file_name(result.chunk));
            if !dead.exists() {
                write_atomically(&dir, &dead, &result.dead)?;
            }
        }
        let outcome = write_atomically(&dir, &target, &result.records)?;
        sync_dir(&dir)?;
        Ok(outcome)
    }
}

/// Writes `lines` as JSON Lines to `target` through a temporary file; `Duplicate` if `target`
/// appeared meanwhile.
fn write_atomically<T: Serialize>(dir: &Path, target: &Path, lines: &[T]) -> Result<SaveOutcome, SinkError> {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let written = (|| {
        let file = File::create(&tmp).map_err(io("create", &tmp))?;
        let mut out = BufWriter::with_capacity(64 << 10, file);
        for line in lines {
            serde_json::to_writer(&mut out, line).map_err(|e| SinkError::Io {
                action: "write",
                path: tmp.clone(),
                source: e.into(),
            })?;
            out.write_all(b"\n").map_err(io("write", &tmp))?;
        }
        let file = out.into_inner().map_err(|e| SinkError::Io {
            action: "write",
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io("fsync", &tmp))
    })();
    let outcome = written.and_then(|()| match fs::hard_link(&tmp, target) {
        Ok(()) => Ok(SaveOutcome::Saved),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(SaveOutcome::Duplicate),
        Err(e) => Err(SinkError::Io { action: "link into place", path: target.to_path_buf(), source: e }),
    });
    let _ = fs::remove_file(&tmp);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::protocol::{DeadObject, VERSION};
    use common::transform::MappedUser;

    fn result(chunk: u64, n: usize) -> ChunkResult {
        ChunkResult {
            v: VERSION,
            run: "0123456789abcdef".into(),
            chunk,
            lease: uuid::Uuid::nil(),
            attempt: 1,
            mapper: "m".into(),
            records: (0..n)
                .map(|i| MappedUser {
                    id: format!("id-{i}"),
                    name: "A B".into(),
                    friends: i as u64,
                    digest: String::new(),
                })
                .collect(),
            dead: vec![],
        }
    }

    #[test]
    fn a_chunk_is_saved_once_and_again_is_a_duplicate() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sink = FileSink::open(dir.path()).expect("open");
        assert_eq!(sink.save(&result(4, 3)).expect("save"), SaveOutcome::Saved);
        assert_eq!(sink.save(&result(4, 3)).expect("save again"), SaveOutcome::Duplicate);
        let text = fs::read_to_string(dir.path().join("0123456789abcdef").join("chunk-00000004.jsonl")).expect("file");
        assert_eq!(text.lines().count(), 3);
        let first: MappedUser = serde_json::from_str(text.lines().next().expect("line")).expect("json");
        assert_eq!(first.id, "id-0");
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("0123456789abcdef")).expect("list").flatten().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file stays behind");
    }

    #[test]
    fn dead_objects_go_to_their_own_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sink = FileSink::open(dir.path()).expect("open");
        let mut r = result(1, 1);
        r.dead.push(DeadObject { index: 1, id: Some("x".into()), error: "bad".into() });
        sink.save(&r).expect("save");
        let dead = fs::read_to_string(dir.path().join("0123456789abcdef").join(dead_file_name(1))).expect("dead file");
        assert!(dead.contains("\"bad\""));
    }

    #[test]
    fn an_unwritable_directory_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sink = FileSink::open(dir.path()).expect("open");
        // A file where the run directory should be.
        fs::write(dir.path().join("0123456789abcdef"), b"").expect("block");
        let err = sink.save(&result(1, 1)).unwrap_err().to_string();
        assert!(err.contains("0123456789abcdef"), "{err}");
    }

    #[test]
    fn stray_temporary_files_are_removed_at_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        let run = dir.path().join("0123456789abcdef");
        fs::create_dir_all(&run).expect("run dir");
        fs::write(run.join(".chunk-00000001.jsonl.abc.tmp"), b"half").expect("stray");
        FileSink::open(dir.path()).expect("open");
        assert_eq!(fs::read_dir(&run).expect("list").count(), 0);
    }
}
