//! The peer issue 14 measures chunkmill against: "a straightforward JetStream work-queue pipeline
//! in Rust". It is a yardstick for `scripts/bench-peer.sh`, not a product. One binary, three roles,
//! each its own process:
//!
//!   jetstream_peer fetcher --input data/users.jsonl --rounds 300 [--chunk-size 100]
//!   jetstream_peer mapper [--threads N]
//!   jetstream_peer saver --out DIR
//!
//! The fetcher publishes chunks of the JSON Lines input (a JSON array of the raw objects; the
//! chunk's index and the rounds in headers) to the WorkQueue stream `PEER_CHUNKS` (`peer.chunks`),
//! up to 256 publishes awaiting their ack at once, then waits until the saver reports every chunk
//! saved on core NATS `peer.progress`. Mappers share the durable pull consumer `peer-mappers`:
//! they pull 10 at a time, hold 4 chunks, run chunkmill's digest transform on a rayon pool,
//! publish `{"chunk": N, "values": [...]}` to the WorkQueue stream `PEER_RESULTS` (`peer.results`),
//! await the publish ack, then ack the chunk. The saver (durable consumer `peer-saver`) writes each
//! result to `DIR/chunk-NNNNNNNN.jsonl` (tmp, fsync, rename, as the issue describes the peer: no
//! fsync of the directory), then acks.
//!
//! Guarantees: at least once end to end (a chunk is acked only after its successor is stored;
//! a mapper or saver that dies leaves its messages to be redelivered after the ack wait, 30 s), and
//! no doubled output file (an existing chunk file makes a redelivered result a counted duplicate).
//! Lacks: JetStream's store is not fsynced per message (its default), nor is the directory after
//! a rename, so a machine crash can lose acknowledged chunks; no dead letters (an object the transform refuses terminates its chunk and
//! the fetcher then waits forever); no ledger (the fetcher purges both streams at start, so a
//! restarted fetcher starts over); progress goes over core NATS (at most once).

use std::collections::HashMap;
use std::future::IntoFuture as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context as _};
use async_nats::jetstream::{self, consumer::pull, stream, AckKind, Context};
use clap::{Parser, Subcommand};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use serde_json::value::RawValue;
use tokio::signal::unix::{signal, SignalKind};
use transform::{digest::DigestTransform, Transform};

/// A JetStream work-queue pipeline to measure chunkmill against.
#[derive(Parser)]
struct Args {
    /// The NATS server.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222", global = true)]
    nats_url: String,
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Publishes the input's chunks and waits until all are saved.
    Fetcher {
        /// JSON Lines input, one object per line.
        #[arg(long)]
        input: PathBuf,
        /// SHA-256 rounds of the digest transform.
        #[arg(long, default_value_t = transform::digest::DEFAULT_ROUNDS)]
        rounds: u32,
        /// Objects per chunk.
        #[arg(long, default_value_t = 100)]
        chunk_size: usize,
    },
    /// Transforms chunks.
    Mapper {
        /// Transform threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Saves results as files.
    Saver {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
}

const CHUNKS: &str = "peer.chunks";
const RESULTS: &str = "peer.results";
const PROGRESS: &str = "peer.progress";
/// Un-acked chunk publishes the fetcher keeps in flight.
const PUBLISHES_IN_FLIGHT: usize = 256;
/// Chunks a mapper pulls per request, and chunks it works on at once.
const MAPPER_PULL: usize = 10;
const MAPPER_HOLD: usize = 4;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = async_nats::connect(&args.nats_url).await.with_context(|| format!("connect to {}", args.nats_url))?;
    let js = jetstream::new(client.clone());
    match args.role {
        Role::Fetcher { input, rounds, chunk_size } => fetcher(client, js, &input, rounds, chunk_size).await,
        Role::Mapper { threads } => mapper(js, threads).await,
        Role::Saver { out } => saver(client, js, out).await,
    }
}

/// Both streams, created if missing (every role does this, so the order they start in does not
/// matter): WorkQueue retention, file storage, JetStream's defaults otherwise.
async fn streams(js: &Context) -> anyhow::Result<(stream::Stream, stream::Stream)> {
    let config = |name: &str, subject: &str| stream::Config {
        name: name.into(),
        subjects: vec![subject.into()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    let chunks = js.get_or_create_stream(config("PEER_CHUNKS", CHUNKS)).await?;
    let results = js.get_or_create_stream(config("PEER_RESULTS", RESULTS)).await?;
    Ok((chunks, results))
}

async fn fetcher(
    client: async_nats::Client,
    js: Context,
    input: &Path,
    rounds: u32,
    size: usize,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let (chunks_stream, results_stream) = streams(&js).await?;
    chunks_stream.purge().await?;
    results_stream.purge().await?;
    let mut progress = client.subscribe(PROGRESS).await?;
    client.flush().await?;

    // Scan: every line one JSON object.
    let data = tokio::fs::read(input).await.with_context(|| format!("read {}", input.display()))?;
    let mut objects = Vec::new();
    for (n, line) in data.split(|&b| b == b'\n').enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        let raw: &RawValue = serde_json::from_slice(line).with_context(|| format!("line {}", n + 1))?;
        if !raw.get().starts_with('{') {
            bail!("line {}: not a JSON object", n + 1);
        }
        objects.push(line);
    }
    let total = objects.len().div_ceil(size.max(1));
    eprintln!("{} objects in {total} chunks, scanned in {:.3} s", objects.len(), started.elapsed().as_secs_f64());

    let mut acks = FuturesUnordered::new();
    for (index, chunk) in objects.chunks(size.max(1)).enumerate() {
        let mut payload = Vec::with_capacity(chunk.iter().map(|o| o.len() + 1).sum::<usize>() + 1);
        payload.push(b'[');
        for (i, object) in chunk.iter().enumerate() {
            if i > 0 {
                payload.push(b',');
            }
            payload.extend_from_slice(object);
        }
        payload.push(b']');
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Chunk-Index", index.to_string());
        headers.insert("Rounds", rounds.to_string());
        if acks.len() >= PUBLISHES_IN_FLIGHT {
            acks.next().await.transpose()?;
        }
        acks.push(js.publish_with_headers(CHUNKS, headers, payload.into()).await?.into_future());
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    eprintln!("{total} chunks published in {:.3} s", started.elapsed().as_secs_f64());

    while let Some(message) = progress.next().await {
        let saved: usize = std::str::from_utf8(&message.payload)?.parse()?;
        if saved >= total {
            eprintln!("{saved} of {total} chunks saved in {:.3} s", started.elapsed().as_secs_f64());
            return Ok(());
        }
    }
    bail!("the connection closed before every chunk was saved")
}

async fn mapper(js: Context, threads: Option<usize>) -> anyhow::Result<()> {
    let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    let (chunks_stream, _) = streams(&js).await?;
    let config = pull::Config {
        durable_name: Some("peer-mappers".into()),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ..Default::default()
    };
    let consumer = chunks_stream.get_or_create_consumer("peer-mappers", config).await?;
    let messages = consumer.stream().max_messages_per_batch(MAPPER_PULL).messages().await?;
    eprintln!("connected to NATS: mapper with {threads} threads on consumer peer-mappers");
    let work = messages
        .filter_map(|message| async move { message.map_err(|e| eprintln!("pull: {e}")).ok() })
        .map(|message| map_chunk(&js, &pool, message))
        .buffer_unordered(MAPPER_HOLD)
        .for_each(|outcome| async move {
            if let Err(e) = outcome {
                eprintln!("chunk not done: {e:#}");
            }
        });
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        () = work => bail!("the chunk stream ended"),
        _ = term.recv() => eprintln!("mapper: terminated"),
    }
    Ok(())
}

/// One chunk: transform on the pool, publish the result and await its ack, then ack the chunk.
async fn map_chunk(js: &Context, pool: &rayon::ThreadPool, message: jetstream::Message) -> anyhow::Result<()> {
    let header = |name: &str| -> anyhow::Result<u64> {
        let value = message.headers.as_ref().and_then(|h| h.get(name)).ok_or_else(|| anyhow!("no {name} header"))?;
        Ok(value.as_str().parse()?)
    };
    let (index, rounds) = (header("Chunk-Index")?, u32::try_from(header("Rounds")?)?);
    let payload = message.payload.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    pool.spawn(move || {
        let _ = tx.send(transform_chunk(&payload, index, rounds));
    });
    let result = match rx.await? {
        Ok(result) => result,
        Err(e) => {
            message.ack_with(AckKind::Term).await.map_err(|e| anyhow!("term: {e}"))?;
            return Err(e.context(format!("chunk {index} terminated")));
        }
    };
    js.publish(RESULTS, result.into()).await?.await?;
    message.ack().await.map_err(|e| anyhow!("ack chunk {index}: {e}"))
}

/// Runs the digest transform over a chunk (on the current rayon pool): `{"chunk": N, "values": [...]}`.
fn transform_chunk(payload: &[u8], index: u64, rounds: u32) -> anyhow::Result<Vec<u8>> {
    let objects: Vec<&RawValue> = serde_json::from_slice(payload)?;
    let inputs: Vec<&[u8]> = objects.iter().map(|o| o.get().as_bytes()).collect();
    let outcomes = DigestTransform { rounds }.apply_chunk(&inputs);
    let mut result = Vec::with_capacity(payload.len());
    write!(result, "{{\"chunk\":{index},\"values\":[")?;
    let mut first = true;
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let outputs = outcome.map_err(|e| anyhow!("object {i} of chunk {index}: {e}"))?;
        for value in outputs.iter() {
            if !first {
                result.push(b',');
            }
            first = false;
            result.extend_from_slice(value);
        }
    }
    result.extend_from_slice(b"]}");
    Ok(result)
}

async fn saver(client: async_nats::Client, js: Context, out: PathBuf) -> anyhow::Result<()> {
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    // Chunks already saved (by an earlier saver) count as saved.
    let mut saved = std::fs::read_dir(&out)?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("chunk-") && n.ends_with(".jsonl")))
        .count();
    let (_, results_stream) = streams(&js).await?;
    let config = pull::Config {
        durable_name: Some("peer-saver".into()),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ..Default::default()
    };
    let consumer = results_stream.get_or_create_consumer("peer-saver", config).await?;
    let mut messages = consumer.messages().await?;
    eprintln!("connected to NATS: saver into {} ({saved} chunks there)", out.display());
    let (mut new, mut duplicates) = (0u64, 0u64);
    let mut term = signal(SignalKind::terminate())?;
    loop {
        let message = tokio::select! {
            next = messages.next() => match next {
                Some(Ok(message)) => message,
                Some(Err(e)) => { eprintln!("pull: {e}"); continue; }
                None => break,
            },
            _ = term.recv() => break,
        };
        let (dir, payload) = (out.clone(), message.payload.clone());
        match tokio::task::spawn_blocking(move || save(&dir, &payload)).await? {
            Ok(true) => {
                saved += 1;
                new += 1;
            }
            Ok(false) => duplicates += 1,
            Err(e) => {
                eprintln!("result not saved: {e:#}");
                continue;
            }
        }
        message.ack().await.map_err(|e| anyhow!("ack: {e}"))?;
        client.publish(PROGRESS, saved.to_string().into()).await?;
    }
    eprintln!("saver: {new} chunks saved, {duplicates} duplicates");
    Ok(())
}

/// Writes one result durably; `false` if its chunk was already saved (a duplicate).
fn save(dir: &Path, payload: &[u8]) -> anyhow::Result<bool> {
    let result: HashMap<&str, &RawValue> = serde_json::from_slice(payload)?;
    let field = |name: &str| result.get(name).map(|v| v.get()).ok_or_else(|| anyhow!("no {name:?} in a result"));
    let index: u64 = serde_json::from_str(field("chunk")?)?;
    let values: Vec<&RawValue> = serde_json::from_str(field("values")?)?;
    let path = dir.join(format!("chunk-{index:08}.jsonl"));
    if path.exists() {
        return Ok(false);
    }
    let mut text = Vec::with_capacity(payload.len());
    for value in values {
        text.extend_from_slice(value.get().as_bytes());
        text.push(b'\n');
    }
    let tmp = dir.join(format!(".chunk-{index:08}.{}.tmp", uuid::Uuid::new_v4()));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&text)?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(true)
}
