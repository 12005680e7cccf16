//! The in-process ideal the end-to-end benchmark compares the pipeline with: the same scan and
//! the same job over the same input, on a rayon pool of `--threads` threads in one process, with
//! no NATS and no files between steps (scan, read, transform, discard). Prints the wall time.
//!
//!   cargo run --release --example ideal -- --input data/users.jsonl --rounds 3000 [--threads 2]
//!   cargo run --release --example ideal -- --input data/orders.jsonl --transform jq --filter '.items | length'

use std::time::Instant;

use chunkmill::common::input::{scan, ChunkReader, ScanOptions};
use clap::Parser;
use rayon::prelude::*;

/// The in-process ideal of a job.
#[derive(Parser)]
struct Args {
    /// The input.
    #[arg(long)]
    input: std::path::PathBuf,
    /// The job, as the fetcher takes it.
    #[command(flatten)]
    job: transform::JobArgs,
    /// Objects per chunk.
    #[arg(long, default_value_t = 100)]
    chunk_size: u32,
    /// Transform threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

fn main() {
    // A jq job runs in sandboxes of this binary, as in a mapper.
    transform::jq::sandbox::enter_if_child();
    let args = Args::parse();
    let threads = if args.threads == 0 {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    } else {
        args.threads
    };
    let job = args.job.job().expect("job flags");
    let transform = transform::Registry::builtin().build(&job.transform).expect("a transform this binary can run");
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
    let started = Instant::now();
    let fingerprint = job.fingerprint();
    let check = |record: &[u8]| transform.check(record);
    let id_field = job.id_field.clone();
    let id = |record: &[u8]| id_field.as_ref().and_then(|f| f.key(record));
    let options = ScanOptions { check: Some(&check), id: Some(&id), job: &fingerprint, ..ScanOptions::default() };
    let index = scan(&args.input, args.chunk_size, &options).expect("scan input");
    let reader = ChunkReader::open(&index).expect("open input");
    let bytes: usize = pool.install(|| {
        index
            .chunks
            .par_iter()
            .map(|span| {
                let wrapped = reader.read_array(span).expect("read chunk");
                let raws: Vec<&serde_json::value::RawValue> = serde_json::from_slice(&wrapped).expect("array");
                let inputs: Vec<&[u8]> = raws.iter().map(|r| r.get().as_bytes()).collect();
                transform
                    .apply_chunk(&inputs)
                    .iter()
                    .map(|outcome| outcome.as_ref().map_or(0, |o| o.iter().map(<[u8]>::len).sum::<usize>()))
                    .sum::<usize>()
            })
            .sum()
    });
    let secs = started.elapsed().as_secs_f64();
    println!(
        "ideal: {} objects, {}, {threads} threads: {secs:.3} s ({:.0} objects/s, {bytes} bytes out)",
        index.objects,
        job.describe(),
        index.objects as f64 / secs
    );
}
