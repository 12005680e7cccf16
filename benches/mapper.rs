//! Mapper throughput in objects/s for each built-in transform: one leased chunk through
//! `mapper::work::map_chunk` (transform every object, encode the result), on one thread and on a
//! rayon pool of all cores. digest at rounds 0 (pure overhead) and at the default rounds, on the
//! users data; jq and a command (the shipped Python example) on orders.

use std::hint::black_box;

use chunkmill::fetcher::generate::{write_orders, write_users, OutputFormat};
use chunkmill::mapper::jobs::Built;
use chunkmill::mapper::work::map_chunk;
use common::protocol::{ChunkHead, ResultHead};
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use transform::command::CommandOptions;
use transform::{JobArgs, Registry};

/// `chunks` chunks of 100 objects, each object its JSON bytes.
fn chunks(data: &[u8]) -> Vec<Vec<Vec<u8>>> {
    let lines: Vec<Vec<u8>> = data.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect();
    lines.chunks(100).map(<[Vec<u8>]>::to_vec).collect()
}

fn built(args: JobArgs, registry: &Registry) -> Built {
    let job = args.job().expect("job");
    Built { transform: registry.build(&job.transform).expect("builds"), job }
}

fn mapper(c: &mut Criterion) {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let single = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("pool");
    let all = rayon::ThreadPoolBuilder::new().num_threads(cores).build().expect("pool");
    let (mut users, mut orders) = (Vec::new(), Vec::new());
    write_users(2000, 1, OutputFormat::Jsonl, &mut users).expect("in memory");
    write_orders(2000, 1, OutputFormat::Jsonl, &mut orders).expect("in memory");
    let command = format!("enrich=python3 {}/examples/commands/enrich.py", env!("CARGO_MANIFEST_DIR"));
    // As a mapper does (`--command-workers` defaults to its transform threads): one child per
    // thread, so the 2-thread case runs two programs side by side.
    let registry = |workers: usize| {
        Registry::builtin()
            .with_command_options(CommandOptions { workers, ..CommandOptions::default() })
            .with_command(command.parse().expect("command"))
    };
    let jq = ".items | map(.qty * .price) | add | {total: ., big: (. > 20000)}";
    let command_job =
        JobArgs { transform: "command".into(), command_name: Some("enrich".into()), ..Default::default() };
    let cases: Vec<(String, JobArgs, &[u8], usize)> = vec![
        ("digest rounds 0".into(), JobArgs::digest(0), &users, 20),
        ("digest rounds 3000".into(), JobArgs::digest(3000), &users, 2),
        ("jq".into(), JobArgs::jq(jq), &orders, 20),
        ("command (enrich.py)".into(), command_job, &orders, 5),
    ];
    let head = |chunk: usize| ChunkHead {
        chunk: common::protocol::ChunkId(chunk as u32),
        lease: uuid::Uuid::from_u128(chunk as u128),
        attempt: 1,
        first_line: 1 + 100 * chunk as u64,
        lines: None,
        skip: vec![],
        probe: false,
    };
    let result = ResultHead {
        run: "0123456789abcdef".into(),
        job: "00000000000000aa".into(),
        chunk: common::protocol::ChunkId(0),
        lease: uuid::Uuid::nil(),
        attempt: 1,
        mapper: "bench".into(),
    };
    let mut group = c.benchmark_group("mapper");
    for (name, args, data, count) in cases {
        let data = chunks(data);
        let data = &data[..count.min(data.len())];
        group.throughput(Throughput::Elements(data.iter().map(|c| c.len() as u64).sum()));
        group.sample_size(10);
        for (label, pool, threads) in [("1 thread", &single, 1), (&*format!("{cores} threads"), &all, cores)] {
            let built = built(args.clone(), &registry(threads));
            group.bench_with_input(BenchmarkId::new(&name, label), &data, |b, data| {
                b.iter(|| {
                    pool.install(|| {
                        for (i, chunk) in data.iter().enumerate() {
                            let inputs: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
                            black_box(map_chunk(&inputs, &head(i), &result, &built, usize::MAX).expect("fits"));
                        }
                    })
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, mapper);

// criterion_main!, with this binary serving as the jq sandbox first when started as one.
fn main() {
    transform::jq::sandbox::enter_if_child();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
