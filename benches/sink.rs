//! Sink throughput, side by side in one run: objects per second saved by the file sink (fsync per
//! batch) and by the PostgreSQL sink (one transaction per batch) into a real PostgreSQL server
//! started for the benchmark (tests/support/postgres.rs; skipped with a message when PostgreSQL's
//! binaries are missing). A batch is what the saver's writer hands a sink under load: 128 chunks
//! of 100 mapped objects, each with a 64-hex digest. Every iteration saves new chunks, so rows are
//! inserted, never found as duplicates.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chunkmill::saver::decoded::Decoded;
use chunkmill::saver::sink::file::FileSink;
use chunkmill::saver::sink::postgres::{PgOptions, PgSink};
use chunkmill::saver::sink::{SaveOutcome, Sink};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

#[path = "../tests/support/postgres.rs"]
#[allow(dead_code)]
mod postgres;

const CHUNKS: u64 = 128;
const OBJECTS: u64 = 100;

fn batch(next: &AtomicU64) -> Vec<Arc<Decoded>> {
    (0..CHUNKS)
        .map(|_| {
            let chunk = next.fetch_add(1, Ordering::Relaxed);
            let head = common::protocol::ResultHead {
                run: "00000000000000be".into(),
                job: "00000000000000bb".into(),
                chunk: common::protocol::ChunkId(chunk as u32),
                lease: uuid::Uuid::new_v4(),
                attempt: 1,
                mapper: "bench".into(),
            };
            let ids: Vec<Option<String>> = (0..OBJECTS).map(|_| Some(uuid::Uuid::new_v4().to_string())).collect();
            let values: Vec<String> = (0..OBJECTS)
                .map(|i| {
                    format!(
                        r#"{{"id":"{}","name":"First{i} Last{chunk}","friends":{},"digest":"{:064x}"}}"#,
                        ids[i as usize].as_deref().unwrap_or_default(),
                        i % 50,
                        u128::from(chunk) << 64 | u128::from(i)
                    )
                })
                .collect();
            let body = common::protocol::encode_result(
                &head,
                values.iter().map(|v| std::iter::once(v.as_bytes())),
                Some(&ids),
                &[],
            );
            Arc::new(Decoded::decode(body.into()).expect("valid"))
        })
        .collect()
}

/// `parallel` new batches, made outside the timed part.
fn batches(next: &AtomicU64, parallel: usize) -> Vec<Vec<Arc<Decoded>>> {
    (0..parallel).map(|_| batch(next)).collect()
}

/// Saves the batches at once (the saver runs one batch per pooled connection).
fn save(runtime: &tokio::runtime::Runtime, sink: &Sink, batches: Vec<Vec<Arc<Decoded>>>) {
    runtime.block_on(async {
        let saves: Vec<_> = batches
            .into_iter()
            .map(|b| {
                let sink = sink.clone();
                tokio::spawn(async move { sink.save_batch(b).await })
            })
            .collect();
        for save in saves {
            let outcomes = save.await.expect("save task");
            assert!(outcomes.iter().all(|o| matches!(o, Ok(SaveOutcome::Saved))), "every chunk saved");
        }
    });
}

fn sinks(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let next = AtomicU64::new(0);
    let mut group = c.benchmark_group("sink (batches of 128 chunks x 100 objects)");
    group.sample_size(10);
    group.measurement_time(std::time::Duration::from_secs(8));

    let dir = tempfile::tempdir().expect("temp dir");
    let file = Sink::new(Arc::new(FileSink::open(dir.path().join("out")).expect("file sink")));
    group.throughput(Throughput::Elements(CHUNKS * OBJECTS));
    group.bench_function("file: 1 batch", |b| {
        b.iter_batched(|| batches(&next, 1), |b| save(&runtime, &file, b), BatchSize::PerIteration)
    });

    let has_postgres = std::env::var("PG_BIN_DIR").is_ok()
        || std::fs::read_dir("/usr/lib/postgresql").map(|mut d| d.next().is_some()).unwrap_or(false);
    if !has_postgres {
        eprintln!(
            "PostgreSQL binaries not found (apt-get install postgresql, or PG_BIN_DIR): skipping the postgres sink"
        );
        group.finish();
        return;
    }
    let server = postgres::PgServer::start();
    let options = PgOptions {
        url: server.url(),
        password: Some(postgres::PG_PASSWORD.into()),
        pool_size: 4,
        saver: "bench".into(),
    };
    let pg = runtime
        .block_on(PgSink::connect(options, &Default::default()))
        .expect("connect")
        .map(Sink::new)
        .expect("not stopped");
    group.bench_function("postgres: 1 batch", |b| {
        b.iter_batched(|| batches(&next, 1), |b| save(&runtime, &pg, b), BatchSize::PerIteration)
    });
    group.throughput(Throughput::Elements(4 * CHUNKS * OBJECTS));
    group.bench_function("postgres: 4 batches at once (pool 4)", |b| {
        b.iter_batched(|| batches(&next, 4), |b| save(&runtime, &pg, b), BatchSize::PerIteration)
    });
    group.bench_function("file: 4 batches at once", |b| {
        b.iter_batched(|| batches(&next, 4), |b| save(&runtime, &file, b), BatchSize::PerIteration)
    });
    group.finish();
}

criterion_group!(benches, sinks);
criterion_main!(benches);
