//! Per-chunk codec cost, for the payloads actually on the wire: decoding a 100-object work reply
//! and its objects (mapper), encoding a mapped chunk result (mapper), decoding it (saver).

use std::hint::black_box;

use chunkmill::common::protocol::{self, encode_chunk_reply, ChunkLease, ChunkResult, WorkReply};
use chunkmill::common::transform::parse_input;
use chunkmill::fetcher::generate::{write_users, OutputFormat};
use chunkmill::mapper::work::map_chunk;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn codec(c: &mut Criterion) {
    let mut data = Vec::new();
    write_users(100, 1, OutputFormat::Jsonl, &mut data).expect("in memory");
    let objects: Vec<&[u8]> = data.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
    let joined = objects.join(&b","[..]);
    let lease = ChunkLease {
        run: "0123456789abcdef".into(),
        chunk: 0,
        lease: uuid::Uuid::nil(),
        attempt: 1,
        lease_ms: 5000,
        first_line: 1,
    };
    let reply = encode_chunk_reply(&lease, &joined);
    let result_bytes = map_chunk(&reply, 0, "bench").expect("maps").body;
    let result: ChunkResult = protocol::decode(&result_bytes).expect("decodes");

    let mut group = c.benchmark_group("codec (one 100-object chunk)");
    group.throughput(Throughput::Bytes(reply.len() as u64));
    group.bench_function("fetcher: build work reply", |b| b.iter(|| black_box(encode_chunk_reply(&lease, &joined))));
    group.bench_function("mapper: decode work reply + objects", |b| {
        b.iter(|| {
            let reply: WorkReply = protocol::decode(&reply).expect("decodes");
            let objects = reply.objects.expect("objects");
            for raw in objects {
                black_box(parse_input(raw.get().as_bytes()).expect("valid"));
            }
        })
    });
    group.throughput(Throughput::Bytes(result_bytes.len() as u64));
    group.bench_function("mapper: encode result", |b| {
        b.iter(|| black_box(serde_json::to_vec(&result).expect("encodes")))
    });
    group.bench_function("saver: decode + validate result", |b| {
        b.iter(|| {
            let decoded: ChunkResult = protocol::decode(&result_bytes).expect("decodes");
            decoded.validate().expect("valid");
            black_box(decoded)
        })
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
