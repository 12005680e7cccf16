//! Per-chunk codec cost, for the payloads actually on the wire: building a 100-object work reply
//! (fetcher), decoding it and its objects (mapper), encoding a result (mapper), decoding and
//! validating it (saver).

use std::hint::black_box;

use chunkmill::fetcher::generate::{write_users, OutputFormat};
use chunkmill::saver::decoded::Decoded;
use common::protocol::{self, ChunkHead, ChunksHead, ResultHead, WorkReply};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use transform::{Outputs, Transform};

fn codec(c: &mut Criterion) {
    let mut data = Vec::new();
    write_users(100, 1, OutputFormat::Jsonl, &mut data).expect("in memory");
    let objects: Vec<&[u8]> = data.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
    let joined = objects.join(&b","[..]);
    let chunk = ChunkHead {
        chunk: common::protocol::ChunkId(0),
        lease: uuid::Uuid::nil(),
        attempt: 1,
        first_line: 1,
        lines: None,
        skip: vec![],
        probe: false,
    };
    let head = ChunksHead { run: "0123456789abcdef", job: "00000000000000aa", lease_ms: 5000 };
    let reply = protocol::encode_chunks_reply(&head, &[(chunk.clone(), joined.clone())]);
    let digest = transform::digest::DigestTransform { rounds: 0 };
    let outputs: Vec<Outputs> = objects
        .iter()
        .map(|o| {
            let mut out = Outputs::default();
            digest.apply(o, &mut out).expect("maps");
            out
        })
        .collect();
    let result_head = ResultHead {
        run: "0123456789abcdef".into(),
        job: "00000000000000aa".into(),
        chunk: common::protocol::ChunkId(0),
        lease: uuid::Uuid::nil(),
        attempt: 1,
        mapper: "bench".into(),
    };
    let result = protocol::encode_result(&result_head, outputs.iter().map(Outputs::iter), None, &[]);

    let mut group = c.benchmark_group("codec (one 100-object chunk)");
    group.throughput(Throughput::Bytes(reply.len() as u64));
    group.bench_function("fetcher: build work reply", |b| {
        b.iter(|| black_box(protocol::encode_chunks_reply(&head, &[(chunk.clone(), joined.clone())])))
    });
    group.bench_function("mapper: decode work reply + objects", |b| {
        b.iter(|| {
            let reply: WorkReply = protocol::decode(&reply).expect("decodes");
            for raw in &reply.chunks[0].objects {
                black_box(transform::digest::parse_input(raw.get().as_bytes()).expect("valid"));
            }
        })
    });
    group.throughput(Throughput::Bytes(result.len() as u64));
    group.bench_function("mapper: encode result", |b| {
        b.iter(|| black_box(protocol::encode_result(&result_head, outputs.iter().map(Outputs::iter), None, &[])))
    });
    let payload = bytes::Bytes::from(result.clone());
    group.bench_function("saver: decode + validate result", |b| {
        b.iter(|| black_box(Decoded::decode(payload.clone()).expect("valid")))
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
