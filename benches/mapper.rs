//! Mapper throughput in objects/s: one chunk reply in, one encoded result out (parse, transform,
//! serialise), single-threaded and on a rayon pool of all cores, at `--rounds 0` (pure overhead)
//! and at the default rounds.

use std::hint::black_box;

use chunkmill::common::protocol::{encode_chunk_reply, ChunkLease};
use chunkmill::common::transform::DEFAULT_ROUNDS;
use chunkmill::fetcher::generate::{write_users, OutputFormat};
use chunkmill::mapper::work::map_chunk;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// `chunks` work replies of 100 generated users each, as the fetcher sends them.
pub fn chunk_replies(chunks: usize) -> Vec<Vec<u8>> {
    let mut data = Vec::new();
    write_users(chunks as u64 * 100, 1, OutputFormat::Jsonl, &mut data).expect("in memory");
    let lines: Vec<&[u8]> = data.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
    lines
        .chunks(100)
        .enumerate()
        .map(|(i, chunk)| {
            let lease = ChunkLease {
                run: "0123456789abcdef".into(),
                chunk: i as u64,
                lease: uuid::Uuid::from_u128(i as u128),
                attempt: 1,
                lease_ms: 5000,
                first_line: 1 + 100 * i as u64,
            };
            encode_chunk_reply(&lease, &chunk.join(&b","[..]))
        })
        .collect()
}

fn mapper(c: &mut Criterion) {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let single = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("pool");
    let all = rayon::ThreadPoolBuilder::new().num_threads(cores).build().expect("pool");
    let mut group = c.benchmark_group("mapper");
    for (rounds, chunks) in [(0u32, 20usize), (DEFAULT_ROUNDS, 2)] {
        let replies = chunk_replies(chunks);
        group.throughput(Throughput::Elements(chunks as u64 * 100));
        if rounds > 0 {
            group.sample_size(10);
        }
        for (label, pool) in [("1 thread", &single), (&*format!("{cores} threads"), &all)] {
            group.bench_with_input(BenchmarkId::new(format!("rounds {rounds}"), label), &replies, |b, replies| {
                b.iter(|| {
                    pool.install(|| {
                        for reply in replies {
                            black_box(map_chunk(reply, rounds, "bench").expect("maps"));
                        }
                    })
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, mapper);
criterion_main!(benches);
