//! The fetcher's ledger under load: a full run's leases and acks (one lease and one ack per
//! chunk), for 1 000 and 100 000 chunks. Throughput is in chunks (one lease plus one ack each).

use std::hint::black_box;
use std::time::{Duration, Instant};

use chunkmill::fetcher::ledger::Ledger;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn ledger(c: &mut Criterion) {
    let mut group = c.benchmark_group("ledger: lease + ack per chunk");
    group.sample_size(10);
    for chunks in [1_000u32, 100_000] {
        group.throughput(Throughput::Elements(u64::from(chunks)));
        group.bench_with_input(BenchmarkId::from_parameter(chunks), &chunks, |b, &chunks| {
            b.iter(|| {
                let mut ledger = Ledger::new(vec![100; chunks as usize]);
                let now = Instant::now();
                // Keep 16 leases in flight, as mappers do.
                let mut in_flight = std::collections::VecDeque::new();
                loop {
                    while in_flight.len() < 16 {
                        match ledger.lease("m", now, Duration::from_secs(5)) {
                            Some(grant) => in_flight.push_back(grant),
                            None => break,
                        }
                    }
                    let Some(grant) = in_flight.pop_front() else { break };
                    black_box(ledger.ack(grant.chunk, grant.lease, 100, 0));
                }
                assert!(ledger.is_complete());
            })
        });
    }
    group.finish();
}

criterion_group!(benches, ledger);
criterion_main!(benches);
