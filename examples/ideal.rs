//! The in-process ideal the end-to-end benchmark compares the pipeline with: the same transform
//! over the same input, on a rayon pool of `--threads` threads in one process, with no NATS and
//! no files between steps (parse, transform, serialise, discard). Prints the wall time.
//!
//!   cargo run --release --example ideal -- data/users.jsonl 3000 [threads]

use std::time::Instant;

use chunkmill::common::input::{scan, ChunkReader};
use chunkmill::common::transform::{parse_input, transform};
use rayon::prelude::*;

fn main() {
    let mut args = std::env::args().skip(1);
    let input = args.next().expect("usage: ideal INPUT ROUNDS [THREADS]");
    let rounds: u32 = args.next().and_then(|r| r.parse().ok()).expect("ROUNDS");
    let threads: usize = args
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
    let started = Instant::now();
    let index = scan(std::path::Path::new(&input), 100).expect("scan input");
    let reader = ChunkReader::open(&index).expect("open input");
    let bytes: usize = pool.install(|| {
        index
            .chunks
            .par_iter()
            .map(|span| {
                let wrapped = reader.read_array(span).expect("read chunk");
                let raws: Vec<&serde_json::value::RawValue> = serde_json::from_slice(&wrapped).expect("array");
                let records: Vec<_> = raws
                    .par_iter()
                    .map(|raw| transform(&parse_input(raw.get().as_bytes()).expect("valid"), rounds))
                    .collect();
                serde_json::to_vec(&records).expect("encode").len()
            })
            .sum()
    });
    let secs = started.elapsed().as_secs_f64();
    println!(
        "ideal: {} objects, rounds {rounds}, {threads} threads: {secs:.3} s ({:.0} objects/s, {bytes} bytes out)",
        index.objects,
        index.objects as f64 / secs
    );
}
