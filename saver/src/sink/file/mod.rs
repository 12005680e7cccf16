//! The file sink: the output values of a run in a few large files, `OUT/<run>/part-NNNNN.jsonl`,
//! one value per line exactly as the mapper sent it (compacted onto one line if it was not
//! already), and an index, `OUT/<run>/index.jsonl`, with one line per saved chunk saying where
//! its lines are ([`layout`]). A batch of chunks costs one write and one fsync of the part, then
//! one write and one fsync of the index, whatever its size: the index line is the commit, and
//! it follows the data. Saving a chunk already in the index is a duplicate that writes nothing,
//! also when another saver sharing the directory saved it ([`run`] says how they take turns).
//! Dead-lettered objects go to `OUT/<run>/dead.jsonl`, durable before the index line too. The
//! sink's identity (`OUT/.chunkmill-sink-id`, made once) tells the fetcher which sink a run
//! saves into. [`config`] is how `--sink file` opens it, [`reader`] how `saver verify` reads a run
//! back.

pub mod config;
pub mod layout;
pub(crate) mod reader;
mod run;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{SaveOutcome, SinkError};
use crate::decoded::Decoded;
pub use config::FileConfig;
pub(crate) use config::FILE;
use run::RunFiles;

/// The file holding a sink directory's identity.
pub const SINK_ID_FILE: &str = ".chunkmill-sink-id";

/// A directory of runs, each a few part files and an index.
#[derive(Debug)]
pub struct FileSink {
    root: PathBuf,
    id: String,
    /// The run directories this saver has written to.
    runs: Mutex<HashMap<String, Arc<Mutex<RunFiles>>>>,
    /// A part this full is closed (tests make it small).
    part_limit: u64,
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
        Self::with_part_limit(root, layout::PART_BYTES)
    }

    /// [`Self::open`] closing parts at `part_limit` bytes.
    pub fn with_part_limit(root: impl Into<PathBuf>, part_limit: u64) -> Result<Self, SinkError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io("create directory", &root))?;
        remove_temporaries(&root)?;
        let id = sink_id(&root)?;
        Ok(FileSink { root, id, runs: Mutex::new(HashMap::new()), part_limit })
    }

    /// The sink's identity (made once, stored in the directory).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The run directory `run`, opened once (again if it was removed or replaced since).
    fn run(&self, run: &str) -> Result<Arc<Mutex<RunFiles>>, SinkError> {
        let poisoned = || SinkError::Task("a batch of this run panicked earlier".into());
        let mut runs = self.runs.lock().map_err(|_| poisoned())?;
        if let Some(files) = runs.get(run) {
            // Poisoning here is a designed recovery, not a skip: a batch that panicked may have
            // left its RunFiles half-changed, so they are dropped and the run reopened from disk
            // (what a restart would do); the batch itself failed, so its chunks come back.
            if files.lock().map(|f| f.is_current()).unwrap_or(false) {
                return Ok(files.clone());
            }
        }
        let files = Arc::new(Mutex::new(RunFiles::open(&self.root, run, self.part_limit)?));
        runs.insert(run.to_string(), files.clone());
        Ok(files)
    }

    /// Saves several chunks, each run's with one commit (one fsync of its part, one of its
    /// index). One outcome per result, in order.
    pub fn save_batch(&self, results: &[&Decoded]) -> Vec<Result<SaveOutcome, SinkError>> {
        let mut outcomes: Vec<Option<Result<SaveOutcome, SinkError>>> = (0..results.len()).map(|_| None).collect();
        let mut by_run: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, result) in results.iter().enumerate() {
            match by_run.iter_mut().find(|(run, _)| *run == result.head.run) {
                Some((_, indexes)) => indexes.push(i),
                None => by_run.push((&result.head.run, vec![i])),
            }
        }
        for (run, indexes) in by_run {
            let batch: Vec<&Decoded> = indexes.iter().map(|&i| results[i]).collect();
            let saved = match self.run(run) {
                Ok(files) => match files.lock() {
                    Ok(mut files) => files.save(&batch),
                    Err(_) => (0..batch.len())
                        .map(|_| Err(SinkError::Task("a batch of this run panicked earlier".into())))
                        .collect(),
                },
                Err(e) => {
                    let message = e.to_string();
                    (0..batch.len()).map(|_| Err(SinkError::Config(message.clone()))).collect()
                }
            };
            for (i, outcome) in indexes.into_iter().zip(saved) {
                outcomes[i] = Some(outcome);
            }
        }
        outcomes.into_iter().map(|o| o.unwrap_or(Ok(SaveOutcome::Duplicate))).collect()
    }

    /// Saves one chunk (the result must have passed `validate`, which vets the run id).
    pub fn save(&self, result: &Decoded) -> Result<SaveOutcome, SinkError> {
        self.save_batch(&[result]).pop().unwrap_or(Ok(SaveOutcome::Duplicate))
    }
}

/// Removes the temporary files a crash left in runs written before the segment files (one file
/// per chunk, each written as a temporary file first). The sink id's temporary files stay: another
/// saver starting beside this one may be about to link its own.
fn remove_temporaries(root: &Path) -> Result<(), SinkError> {
    for run in fs::read_dir(root).map_err(io("list", root))?.flatten() {
        if run.path().is_dir() {
            for file in fs::read_dir(run.path()).map_err(io("list", &run.path()))?.flatten() {
                let name = file.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') && name.ends_with(".tmp") {
                    let _ = fs::remove_file(file.path());
                }
            }
        }
    }
    Ok(())
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
    let tmp = root.join(format!(".{SINK_ID_FILE}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let written = File::create(&tmp).and_then(|mut file| {
        file.write_all(id.as_bytes())?;
        file.sync_all()
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io("write", &tmp)(e));
    }
    // Two savers starting together on a shared volume: the first link wins, both read it.
    let linked = fs::hard_link(&tmp, &path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("link into place", &path)(e)),
    }
    sync_dir(root)?;
    fs::read_to_string(&path).map(|id| id.trim().to_string()).map_err(io("read", &path))
}

#[cfg(test)]
mod tests {
    use super::layout::{RunReader, SavedChunk, Stray, INDEX_FILE};
    use super::*;
    use bytes::Bytes;
    use common::protocol::{self, Cause, ChunkId, DeadObject, ResultHead};

    const RUN: &str = "0123456789abcdef";

    fn result(chunk: u64, n: usize, dead: &[u32]) -> Decoded {
        let head = ResultHead {
            run: RUN.into(),
            job: "00000000000000aa".into(),
            chunk: ChunkId(chunk as u32),
            lease: uuid::Uuid::nil(),
            attempt: 1,
            mapper: "m".into(),
        };
        let values: Vec<String> = (0..n).map(|i| format!("{{\"id\":\"{chunk}-{i}\",\n \"n\":{i}}}")).collect();
        let objects: Vec<Vec<&[u8]>> =
            (0..n).map(|i| if dead.contains(&(i as u32)) { vec![] } else { vec![values[i].as_bytes()] }).collect();
        let dead: Vec<DeadObject> = dead
            .iter()
            .map(|&index| DeadObject { index, id: None, cause: Cause::Transform, error: "bad".into(), line: Some(9) })
            .collect();
        let body = protocol::encode_result(&head, objects.iter().map(|o| o.iter().copied()), None, &dead);
        Decoded::decode(Bytes::from(body)).expect("valid")
    }

    fn saved(root: &Path) -> RunReader {
        RunReader::open(&root.join(RUN)).expect("readable")
    }

    fn copies(reader: &RunReader, chunk: u32) -> Vec<SavedChunk> {
        reader.chunk(ChunkId(chunk)).expect("readable")
    }

    fn index_lines(root: &Path) -> usize {
        fs::read_to_string(root.join(RUN).join(INDEX_FILE)).expect("index").lines().count()
    }

    #[test]
    fn a_chunk_is_saved_once_and_again_is_a_duplicate() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sink = FileSink::open(dir.path()).expect("open");
        assert_eq!(sink.save(&result(4, 3, &[])).expect("save"), SaveOutcome::Saved);
        assert_eq!(sink.save(&result(4, 3, &[])).expect("save again"), SaveOutcome::Duplicate);
        let text = fs::read_to_string(dir.path().join(RUN).join("part-00000.jsonl")).expect("part");
        assert_eq!(text, "{\"id\":\"4-0\",\"n\":0}\n{\"id\":\"4-1\",\"n\":1}\n{\"id\":\"4-2\",\"n\":2}\n");
        assert_eq!(index_lines(dir.path()), 1, "one commit");
        let reader = saved(dir.path());
        assert_eq!(copies(&reader, 4).len(), 1);
        assert_eq!(copies(&reader, 4)[0].values[2], b"{\"id\":\"4-2\",\"n\":2}".to_vec());
        assert_eq!(reader.stray().expect("stray"), Stray::default());
    }

    #[test]
    fn a_batch_is_one_commit_that_saves_each_chunk_once_and_reports_duplicates_in_order() {
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
        let reader = saved(dir.path());
        assert_eq!(reader.chunks(), vec![ChunkId(1), ChunkId(2), ChunkId(3)]);
        assert_eq!(copies(&reader, 3)[0].values.len(), 2);
        assert_eq!(copies(&reader, 1)[0].values.len(), 3);
        assert_eq!(index_lines(dir.path()), 3, "chunks 2, then 1 and 3");
        let names: Vec<String> = fs::read_dir(dir.path().join(RUN))
            .expect("list")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 3, "one part, the index and the lock: {names:?}");
    }

    #[test]
    fn dead_objects_go_to_the_dead_letter_file_with_their_chunk() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sink = FileSink::open(dir.path()).expect("open");
        sink.save_batch(&[&result(1, 2, &[1]), &result(2, 3, &[0, 2])]);
        let reader = saved(dir.path());
        let one = copies(&reader, 1).remove(0);
        assert_eq!(one.values.len(), 1);
        assert_eq!(
            one.dead.iter().map(|d| (d.index, d.cause, d.line)).collect::<Vec<_>>(),
            vec![(1, Cause::Transform, Some(9))]
        );
        assert_eq!(copies(&reader, 2)[0].dead.iter().map(|d| d.index).collect::<Vec<_>>(), vec![0, 2]);
        let line = fs::read_to_string(dir.path().join(RUN).join(layout::DEAD_FILE)).expect("dead file");
        let first: serde_json::Value = serde_json::from_str(line.lines().next().expect("a line")).expect("json");
        assert_eq!((first["chunk"].as_u64(), first["index"].as_u64()), (Some(1), Some(1)));
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
        fs::write(dir.path().join(RUN), b"").expect("block");
        let err = sink.save(&result(1, 1, &[])).unwrap_err().to_string();
        assert!(err.contains(RUN), "{err}");
    }

    #[test]
    fn stray_temporary_files_are_removed_at_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        let run = dir.path().join(RUN);
        fs::create_dir_all(&run).expect("run dir");
        fs::write(run.join(".chunk-00000001.jsonl.abc.tmp"), b"half").expect("stray");
        FileSink::open(dir.path()).expect("open");
        assert_eq!(fs::read_dir(&run).expect("list").count(), 0);
    }

    #[test]
    fn a_run_directory_removed_while_the_saver_runs_is_saved_anew_not_called_duplicate() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sink = FileSink::open(dir.path()).expect("open");
        sink.save(&result(1, 2, &[])).expect("save");
        // Someone removes the run's output to run it again; the saver stays up.
        fs::remove_dir_all(dir.path().join(RUN)).expect("remove the run");
        assert_eq!(sink.save(&result(1, 2, &[])).expect("save again"), SaveOutcome::Saved);
        assert_eq!(copies(&saved(dir.path()), 1).len(), 1);
    }

    #[test]
    fn savers_sharing_a_directory_save_each_chunk_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let results: Vec<Decoded> = (0..60).map(|c| result(c, 3, &[])).collect();
        // Four savers (each its own open files and lock) race over the same chunks, in batches
        // of different sizes and orders.
        let outcomes: Vec<Vec<SaveOutcome>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4usize)
                .map(|s| {
                    let (root, results) = (dir.path(), &results);
                    scope.spawn(move || {
                        let sink = FileSink::open(root).expect("open");
                        let mut order: Vec<&Decoded> = results.iter().collect();
                        if s % 2 == 1 {
                            order.reverse();
                        }
                        order
                            .chunks(s + 1)
                            .flat_map(|batch| sink.save_batch(batch))
                            .map(|o| o.expect("saved"))
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("saver thread")).collect()
        });
        let saved_count = outcomes.iter().flatten().filter(|o| **o == SaveOutcome::Saved).count();
        assert_eq!(saved_count, 60, "each chunk saved by exactly one saver");
        let reader = saved(dir.path());
        for chunk in 0..60 {
            let copies = copies(&reader, chunk);
            assert_eq!(copies.len(), 1, "chunk {chunk}");
            assert_eq!(copies[0].values[0], format!("{{\"id\":\"{chunk}-0\",\"n\":0}}").into_bytes());
        }
        assert_eq!(reader.stray().expect("stray"), Stray::default());
    }

    #[test]
    fn what_a_saver_that_died_mid_batch_left_is_cut_off_and_its_chunks_saved_again() {
        let dir = tempfile::tempdir().expect("temp dir");
        FileSink::open(dir.path()).expect("open").save(&result(1, 2, &[0])).expect("save");
        // The dead saver wrote chunk 2's lines and dead-letter entry, and half an index line.
        let run = dir.path().join(RUN);
        let append = |name: &str, text: &str| {
            let mut file = fs::OpenOptions::new().append(true).open(run.join(name)).expect("open");
            file.write_all(text.as_bytes()).expect("append");
        };
        append("part-00000.jsonl", "{\"id\":\"2-0\",\"n\":0}\n{\"id\":\"2-1\"");
        append(layout::DEAD_FILE, "{\"chunk\":2,\"index\":1,\"cause\":\"transform\",\"error\":\"x\"}\n");
        append(INDEX_FILE, "{\"chunk\":2,\"part\":0,\"off");
        assert_eq!(saved(dir.path()).stray().expect("stray"), Stray { values: 2, dead: 1 });
        let restarted = FileSink::open(dir.path()).expect("reopen");
        let outcomes: Vec<SaveOutcome> = restarted
            .save_batch(&[&result(2, 2, &[]), &result(1, 2, &[0])])
            .into_iter()
            .map(|o| o.expect("saved"))
            .collect();
        assert_eq!(outcomes, vec![SaveOutcome::Saved, SaveOutcome::Duplicate]);
        let reader = saved(dir.path());
        assert_eq!(reader.stray().expect("stray"), Stray::default(), "the dead saver's bytes are gone");
        assert_eq!(
            copies(&reader, 2),
            vec![SavedChunk {
                values: vec![b"{\"id\":\"2-0\",\"n\":0}".to_vec(), b"{\"id\":\"2-1\",\"n\":1}".to_vec()],
                dead: vec![]
            }]
        );
        assert_eq!(copies(&reader, 1)[0].dead.len(), 1);
        assert_eq!(index_lines(dir.path()), 2, "the torn line is gone");
    }

    #[test]
    fn parts_close_at_their_limit_and_every_part_is_read_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sink = FileSink::with_part_limit(dir.path(), 30).expect("open");
        for chunk in 0..4 {
            sink.save(&result(chunk, 2, &[])).expect("save");
        }
        // Another saver learns where the others stopped from the index.
        FileSink::with_part_limit(dir.path(), 30).expect("open").save(&result(4, 2, &[])).expect("save");
        let parts = fs::read_dir(dir.path().join(RUN))
            .expect("list")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("part-"))
            .count();
        assert_eq!(parts, 5, "each 2-line chunk fills a 30-byte part");
        let reader = saved(dir.path());
        for chunk in 0..5 {
            assert_eq!(copies(&reader, chunk)[0].values.len(), 2, "chunk {chunk}");
        }
        assert_eq!(reader.stray().expect("stray"), Stray::default());
    }

    #[test]
    fn chunks_saved_one_file_per_chunk_by_an_older_saver_count_as_saved() {
        let dir = tempfile::tempdir().expect("temp dir");
        let run = dir.path().join(RUN);
        fs::create_dir_all(&run).expect("run dir");
        fs::write(run.join(layout::legacy_chunk_file_name(ChunkId(1))), "{\"old\":1}\n").expect("old chunk");
        let sink = FileSink::open(dir.path()).expect("open");
        assert_eq!(sink.save(&result(1, 1, &[])).expect("save"), SaveOutcome::Duplicate);
        assert_eq!(sink.save(&result(2, 1, &[])).expect("save"), SaveOutcome::Saved);
        let reader = saved(dir.path());
        assert_eq!(reader.chunks(), vec![ChunkId(1), ChunkId(2)]);
        assert_eq!(copies(&reader, 1)[0].values, vec![b"{\"old\":1}".to_vec()]);
    }

    #[test]
    fn a_part_shorter_than_its_index_says_refuses_to_save_and_names_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        FileSink::open(dir.path()).expect("open").save(&result(1, 2, &[])).expect("save");
        let part = dir.path().join(RUN).join("part-00000.jsonl");
        fs::OpenOptions::new().write(true).open(&part).expect("open").set_len(5).expect("cut");
        let err = FileSink::open(dir.path()).expect("reopen").save(&result(2, 1, &[])).unwrap_err().to_string();
        assert!(err.contains("part-00000.jsonl") && err.contains("missing"), "{err}");
        assert_eq!(index_lines(dir.path()), 1, "nothing committed");
    }

    #[test]
    fn a_chunk_twice_in_a_failed_batch_fails_twice_and_is_never_a_duplicate_of_nothing() {
        // A re-leased chunk's two results in one batch, and the batch's write fails: the second
        // copy must not be reported a duplicate (it would be acknowledged, unsaved).
        let dir = tempfile::tempdir().expect("temp dir");
        let sink = FileSink::open(dir.path()).expect("open");
        sink.save(&result(1, 2, &[])).expect("save");
        let part = dir.path().join(RUN).join("part-00000.jsonl");
        fs::OpenOptions::new().write(true).open(&part).expect("open").set_len(5).expect("cut");
        let (a, b) = (result(2, 1, &[]), result(2, 1, &[]));
        let outcomes = sink.save_batch(&[&a, &b]);
        assert!(outcomes.iter().all(Result::is_err), "{outcomes:?}");
        // Once it can be written, the first copy is saved and the second is its duplicate.
        fs::remove_dir_all(dir.path().join(RUN)).expect("start the run over");
        let sink = FileSink::open(dir.path()).expect("reopen");
        let outcomes: Vec<SaveOutcome> = sink.save_batch(&[&a, &b]).into_iter().map(|o| o.expect("saved")).collect();
        assert_eq!(outcomes, vec![SaveOutcome::Saved, SaveOutcome::Duplicate]);
    }

    #[test]
    fn the_example_of_protocol_section_8_4_is_what_the_sink_writes() {
        // docs/PROTOCOL.md §3.8's jq result, saved: §8.4 shows the three files' lines.
        let body = r#"{"v":2,"run":"240caf8379597e2e","job":"af7b6558502d9ffb","chunk":0,"lease":"fbb1becc-354c-41f0-8ce3-ba666507ed13","attempt":1,"mapper":"worker-c","ids":["c15c0289-ec2d-4a91-a7ec-8e65a18debbe","5e5532fb-eea2-43f8-8bc9-42ee9086c171","b9b501d1-d854-4b71-8002-1590ff0b4dc3"],"dead":[{"index":2,"id":"b9b501d1-d854-4b71-8002-1590ff0b4dc3","cause":"transform","error":"too many friends","line":4}],"outputs":[[{"friend":"6d2c075a-68e2-4c65-9ce0-dc482f6f6170"},{"friend":"4514a41f-6569-4663-b51d-d84e6aa60b10"}],[{"id":"5e5532fb-eea2-43f8-8bc9-42ee9086c171","name":"Yukihiro Hamilton"}],[]]}"#;
        let dir = tempfile::tempdir().expect("temp dir");
        let sink = FileSink::open(dir.path()).expect("open");
        sink.save(&Decoded::decode(Bytes::from(body)).expect("valid")).expect("saved");
        let run = dir.path().join("240caf8379597e2e");
        let read = |name: &str| fs::read_to_string(run.join(name)).expect("a sink file");
        assert_eq!(
            read("part-00000.jsonl"),
            concat!(
                "{\"friend\":\"6d2c075a-68e2-4c65-9ce0-dc482f6f6170\"}\n",
                "{\"friend\":\"4514a41f-6569-4663-b51d-d84e6aa60b10\"}\n",
                "{\"id\":\"5e5532fb-eea2-43f8-8bc9-42ee9086c171\",\"name\":\"Yukihiro Hamilton\"}\n"
            )
        );
        assert_eq!(
            read(layout::DEAD_FILE),
            "{\"chunk\":0,\"index\":2,\"id\":\"b9b501d1-d854-4b71-8002-1590ff0b4dc3\",\"cause\":\"transform\",\"error\":\"too many friends\",\"line\":4}\n"
        );
        assert_eq!(
            read(INDEX_FILE),
            "{\"chunk\":0,\"part\":0,\"offset\":0,\"bytes\":173,\"values\":3,\"dead\":1,\"dead_offset\":0,\"dead_bytes\":122}\n"
        );
    }
}
