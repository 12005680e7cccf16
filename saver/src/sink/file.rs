//! The file sink: `OUT/<run>/chunk-<8 digits>.jsonl`, one output value per line, in input order,
//! exactly as the mapper sent it (compacted onto one line if it was not already). A chunk is
//! written to a temporary file, fsynced, then hard-linked to its final name (which fails if the
//! name exists, so two savers racing on one chunk cannot both count it) and the directory is
//! fsynced. A crash leaves either the whole chunk or no chunk, plus at most a stray temporary
//! file that is removed at the next start. Dead-lettered objects of a chunk go to
//! `chunk-<8 digits>.dead.jsonl`, made durable before the chunk itself. The sink's identity
//! (`OUT/.chunkmill-sink-id`, made once) tells the fetcher which sink a run saves into.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{SaveOutcome, SinkError};
use crate::decoded::Decoded;
use common::protocol::ChunkId;

/// The file holding a sink directory's identity.
pub const SINK_ID_FILE: &str = ".chunkmill-sink-id";

/// A directory of chunk files.
#[derive(Debug)]
pub struct FileSink {
    root: PathBuf,
    id: String,
    /// Run directories known to exist (and fsynced into their parent).
    runs: Mutex<HashSet<String>>,
}

/// The final name of a chunk's file.
pub fn chunk_file_name(chunk: ChunkId) -> String {
    format!("chunk-{chunk:08}.jsonl")
}

/// The final name of a chunk's dead-letter file.
pub fn dead_file_name(chunk: ChunkId) -> String {
    format!("chunk-{chunk:08}.dead.jsonl")
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SinkError + 'a {
    move |source| SinkError::Io { action, path: path.to_path_buf(), source }
}

fn sync_dir(dir: &Path) -> Result<(), SinkError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync directory", dir))
}

impl FileSink {
    /// [`Self::open`] on tokio's blocking pool (it lists and deletes files).
    pub async fn open_blocking_pool(root: PathBuf) -> Result<Self, SinkError> {
        tokio::task::spawn_blocking(move || Self::open(root))
            .await
            .unwrap_or_else(|e| Err(SinkError::Task(e.to_string())))
    }

    /// [`Self::save_batch`] on tokio's blocking pool: fsync blocks, and the saver's runtime
    /// threads must keep answering NATS meanwhile.
    pub async fn save_on_blocking_pool(
        sink: &Arc<Self>,
        results: Vec<Arc<Decoded>>,
    ) -> Vec<Result<SaveOutcome, SinkError>> {
        let sink = sink.clone();
        let count = results.len();
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&Decoded> = results.iter().map(|r| r.as_ref()).collect();
            sink.save_batch(&refs)
        })
        .await
        .unwrap_or_else(|e| (0..count).map(|_| Err(SinkError::Task(e.to_string()))).collect())
    }

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
        let id = sink_id(&root)?;
        Ok(FileSink { root, id, runs: Mutex::new(HashSet::new()) })
    }

    /// The sink's identity (made once, stored in the directory).
    pub fn id(&self) -> &str {
        &self.id
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

    /// Saves several chunks with one round of syncs (group commit): every file is written, then
    /// all are fsynced together (the kernel folds concurrent fsyncs into few journal commits),
    /// then linked into place, then each directory is fsynced once. A chunk's name still appears
    /// only after its data is durable. One outcome per result, in order.
    pub fn save_batch(&self, results: &[&Decoded]) -> Vec<Result<SaveOutcome, SinkError>> {
        let mut outcomes: Vec<Option<Result<SaveOutcome, SinkError>>> = (0..results.len()).map(|_| None).collect();
        let mut pending = Vec::new();
        for (index, result) in results.iter().enumerate() {
            match self.prepare(index, result) {
                Ok(Some(p)) => pending.push(p),
                Ok(None) => outcomes[index] = Some(Ok(SaveOutcome::Duplicate)),
                Err(e) => outcomes[index] = Some(Err(e)),
            }
        }
        let synced = sync_concurrently(&pending);
        let mut dirs: Vec<PathBuf> = Vec::new();
        for (p, synced) in pending.into_iter().zip(synced) {
            let outcome = synced.and_then(|()| p.link_into_place());
            p.remove_temporaries();
            if outcome.is_ok() && !dirs.contains(&p.dir) {
                dirs.push(p.dir.clone());
            }
            outcomes[p.index] = Some(outcome);
        }
        // The names are durable once their directories are.
        for dir in &dirs {
            if let Err(e) = sync_dir(dir) {
                let message = e.to_string();
                for (outcome, result) in outcomes.iter_mut().zip(results) {
                    if matches!(outcome, Some(Ok(SaveOutcome::Saved))) && self.root.join(&result.head.run) == *dir {
                        *outcome = Some(Err(SinkError::Io {
                            action: "fsync directory",
                            path: dir.clone(),
                            source: std::io::Error::other(message.clone()),
                        }));
                    }
                }
            }
        }
        outcomes.into_iter().map(|o| o.unwrap_or(Ok(SaveOutcome::Duplicate))).collect()
    }

    /// Writes result `index`'s files (its dead-letter file first, if any) as temporary files,
    /// not yet synced; `None` when the chunk is already saved.
    fn prepare(&self, index: usize, result: &Decoded) -> Result<Option<Pending>, SinkError> {
        let dir = self.run_dir(&result.head.run)?;
        let target = dir.join(chunk_file_name(result.head.chunk));
        if target.exists() {
            return Ok(None);
        }
        let mut files = Vec::with_capacity(2);
        if !result.dead.is_empty() {
            let dead = dir.join(dead_file_name(result.head.chunk));
            if !dead.exists() {
                let lines: Vec<Vec<u8>> =
                    result.dead.iter().map(|d| serde_json::to_vec(d).unwrap_or_default()).collect();
                let (tmp, file) = write_tmp(&dir, &dead, lines.iter().map(Vec::as_slice))?;
                files.push((tmp, dead, file));
            }
        }
        let (tmp, file) = write_tmp(&dir, &target, result.values().map(|(_, _, v)| v))?;
        files.push((tmp, target, file));
        Ok(Some(Pending { index, dir, files }))
    }

    /// Saves one chunk (the result must have passed `validate`, which vets the run id).
    pub fn save(&self, result: &Decoded) -> Result<SaveOutcome, SinkError> {
        self.save_batch(&[result]).pop().unwrap_or(Ok(SaveOutcome::Duplicate))
    }
}

/// One chunk's files written as temporary files, waiting for their fsync and link.
struct Pending {
    /// The result's position in the batch.
    index: usize,
    dir: PathBuf,
    /// (temporary file, final name, open file), the chunk file last.
    files: Vec<(PathBuf, PathBuf, File)>,
}

impl Pending {
    /// Links each synced file to its final name, the chunk file last (so its name means the
    /// dead-letter file is there too): the chunk file's outcome.
    fn link_into_place(&self) -> Result<SaveOutcome, SinkError> {
        self.files.iter().try_fold(SaveOutcome::Saved, |_, (tmp, target, _)| link_into_place(tmp, target))
    }

    /// Removes the temporary names, linked or not.
    fn remove_temporaries(&self) {
        for (tmp, _, _) in &self.files {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// Fsyncs every pending file, one thread per chunk so that the kernel can fold the syncs into
/// few journal commits. One result per pending chunk, in order.
fn sync_concurrently(pending: &[Pending]) -> Vec<Result<(), SinkError>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = pending
            .iter()
            .map(|p| {
                scope.spawn(move || {
                    p.files.iter().try_for_each(|(tmp, _, file)| file.sync_all().map_err(io("fsync", tmp)))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(SinkError::Io { action: "fsync", path: PathBuf::new(), source: std::io::Error::other("panic") })
                })
            })
            .collect()
    })
}

/// The sink directory's identity: read from [`SINK_ID_FILE`], or made and stored (fsynced)
/// the first time.
fn sink_id(root: &Path) -> Result<String, SinkError> {
    let path = root.join(SINK_ID_FILE);
    match fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("read", &path)(e)),
    }
    let id = format!("dir-{}", uuid::Uuid::new_v4().simple());
    let (tmp, file) = write_tmp(root, &path, std::iter::once(id.as_bytes()))?;
    file.sync_all().map_err(io("fsync", &tmp))?;
    // Two savers starting together on a shared volume: the first link wins, both read it.
    let _ = link_into_place(&tmp, &path);
    let _ = fs::remove_file(&tmp);
    sync_dir(root)?;
    fs::read_to_string(&path).map(|id| id.trim().to_string()).map_err(io("read", &path))
}

/// Writes `lines` (each one JSON value) to a temporary file beside `target`, one per line, not
/// yet synced. A value that spans lines is compacted onto one.
fn write_tmp<'a>(
    dir: &Path,
    target: &Path,
    lines: impl Iterator<Item = &'a [u8]>,
) -> Result<(PathBuf, File), SinkError> {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let written = (|| {
        let file = File::create(&tmp).map_err(io("create", &tmp))?;
        let mut out = BufWriter::with_capacity(64 << 10, file);
        for line in lines {
            out.write_all(&common::json::compact(line)).map_err(io("write", &tmp))?;
            out.write_all(b"\n").map_err(io("write", &tmp))?;
        }
        out.into_inner().map_err(|e| SinkError::Io { action: "write", path: tmp.clone(), source: e.into_error() })
    })();
    match written {
        Ok(file) => Ok((tmp, file)),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Links a durable temporary file to its final name; `Duplicate` if the name exists already.
fn link_into_place(tmp: &Path, target: &Path) -> Result<SaveOutcome, SinkError> {
    match fs::hard_link(tmp, target) {
        Ok(()) => Ok(SaveOutcome::Saved),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(SaveOutcome::Duplicate),
        Err(e) => Err(SinkError::Io { action: "link into place", path: target.to_path_buf(), source: e }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use common::protocol::{self, Cause, DeadObject, ResultHead};

    fn result(chunk: u64, n: usize, dead: &[u32]) -> Decoded {
        let head = ResultHead {
            run: "0123456789abcdef".into(),
            job: "00000000000000aa".into(),
            chunk: ChunkId(chunk as u32),
            lease: uuid::Uuid::nil(),
            attempt: 1,
            mapper: "m".into(),
        };
        let values: Vec<String> = (0..n).map(|i| format!("{{\"id\":\"id-{i}\",\n \"n\":{i}}}")).collect();
        let objects: Vec<Vec<&[u8]>> =
            (0..n).map(|i| if dead.contains(&(i as u32)) { vec![] } else { vec![values[i].as_bytes()] }).collect();
        let dead: Vec<DeadObject> = dead
            .iter()
            .map(|&index| DeadObject { index, id: None, cause: Cause::Transform, error: "bad".into(), line: Some(9) })
            .collect();
        let body = protocol::encode_result(&head, objects.iter().map(|o| o.iter().copied()), None, &dead);
        Decoded::decode(Bytes::from(body)).expect("valid")
    }

    #[test]
    fn a_chunk_is_saved_once_and_again_is_a_duplicate() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sink = FileSink::open(dir.path()).expect("open");
        assert_eq!(sink.save(&result(4, 3, &[])).expect("save"), SaveOutcome::Saved);
        assert_eq!(sink.save(&result(4, 3, &[])).expect("save again"), SaveOutcome::Duplicate);
        let text = fs::read_to_string(dir.path().join("0123456789abcdef").join("chunk-00000004.jsonl")).expect("file");
        assert_eq!(text, "{\"id\":\"id-0\",\"n\":0}\n{\"id\":\"id-1\",\"n\":1}\n{\"id\":\"id-2\",\"n\":2}\n");
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("0123456789abcdef")).expect("list").flatten().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file stays behind");
    }

    #[test]
    fn a_batch_saves_each_chunk_once_and_reports_duplicates_in_order() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sink = FileSink::open(dir.path()).expect("open");
        sink.save(&result(2, 1, &[])).expect("save");
        let (a, b, c) = (result(1, 3, &[]), result(2, 1, &[]), result(3, 2, &[]));
        let outcomes: Vec<SaveOutcome> =
            sink.save_batch(&[&a, &b, &c, &a]).into_iter().map(|o| o.expect("saved")).collect();
        assert_eq!(
            outcomes,
            vec![SaveOutcome::Saved, SaveOutcome::Duplicate, SaveOutcome::Saved, SaveOutcome::Duplicate]
        );
        let run = dir.path().join("0123456789abcdef");
        assert_eq!(fs::read_to_string(run.join(chunk_file_name(ChunkId(3)))).expect("chunk 3").lines().count(), 2);
        assert_eq!(fs::read_dir(&run).expect("list").count(), 3, "three chunk files, no temporary file");
    }

    #[test]
    fn dead_objects_go_to_their_own_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sink = FileSink::open(dir.path()).expect("open");
        sink.save(&result(1, 2, &[1])).expect("save");
        let dead = fs::read_to_string(dir.path().join("0123456789abcdef").join(dead_file_name(ChunkId(1))))
            .expect("dead file");
        let entry: DeadObject = serde_json::from_str(dead.trim()).expect("a dead object");
        assert_eq!((entry.index, entry.cause, entry.line), (1, Cause::Transform, Some(9)));
    }

    #[test]
    fn the_sink_keeps_one_identity() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = FileSink::open(dir.path()).expect("open").id().to_string();
        assert!(first.starts_with("dir-"), "{first}");
        assert_eq!(FileSink::open(dir.path()).expect("reopen").id(), first);
        let other = tempfile::tempdir().expect("temp dir");
        assert_ne!(FileSink::open(other.path()).expect("open").id(), first);
    }

    #[test]
    fn an_unwritable_directory_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sink = FileSink::open(dir.path()).expect("open");
        // A file where the run directory should be.
        fs::write(dir.path().join("0123456789abcdef"), b"").expect("block");
        let err = sink.save(&result(1, 1, &[])).unwrap_err().to_string();
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
