//! The fetcher's input path on 100 000 generated users (a local JSON Lines file, about 32 MB):
//! the scan (strict JSON on all cores, the run id's SHA-256, the duplicate-id check, chunk cuts)
//! and reading every chunk back as it is handed out (`ChunkReader::read_with_lines`: a `pread`,
//! the records split and joined, and since issue 36 the chunk's checksum compared). Throughput
//! is in input bytes.

use std::hint::black_box;

use chunkmill::fetcher::generate::{write_users, OutputFormat};
use common::input::{scan, ChunkReader, ScanOptions};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn input(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("users.jsonl");
    let mut data = Vec::new();
    write_users(100_000, 1, OutputFormat::Jsonl, &mut data).expect("in memory");
    std::fs::write(&path, &data).expect("write the data set");
    let digest = transform::digest::DigestTransform { rounds: 0 };
    let check = |record: &[u8]| transform::Transform::check(&digest, record);
    let field: transform::IdField = ".uuid".parse().expect("id field");
    let id = |record: &[u8]| field.extract(record);
    let options = ScanOptions { check: Some(&check), id: Some(&id), job: "bench", ..ScanOptions::default() };

    let mut group = c.benchmark_group("input (100 000 users, JSON Lines)");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("fetcher: scan", |b| b.iter(|| black_box(scan(&path, 100, &options).expect("scans"))));
    let index = scan(&path, 100, &options).expect("scans");
    let reader = ChunkReader::open(&index).expect("reader");
    group.bench_function("fetcher: read every chunk of 100 as handed out", |b| {
        b.iter(|| {
            for span in &index.chunks {
                black_box(reader.read_with_lines(span).expect("reads"));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, input);
criterion_main!(benches);
