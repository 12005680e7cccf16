//! Where chunkmill's input lives, and how its bytes are read: the layer under the scan
//! (`common::input`) for the fetcher and `saver verify`, never for mappers (so its object-store,
//! TLS and compression dependencies stay out of `common`).
//!
//! `--input` is parsed into a [`Location`]: a local file, a local glob (`'data/part-*.jsonl'`, path
//! order), `s3://BUCKET/KEY`, `s3://BUCKET/PREFIX/` (every object under it, key order), a key
//! pattern (`s3://BUCKET/data/part-*.jsonl`), `gs://`, `az://`/`azure://`, or `https://HOST/PATH`
//! (`http://` too). [`Source::open`] lists the objects once into [`ObjectInfo`]s (name, size,
//! version) and one [`Source::identity`] digest for the run id. Then:
//!
//! - the scan streams each object from the start with [`Source::reader`] (a blocking
//!   `std::io::Read`, decompressing `.gz` and `.zst`);
//! - a chunk is read back with [`Source::read_range`] (one ranged GET, conditional on the listed
//!   ETag; `pread` for a local file; the spool for a compressed object). An object that changed
//!   since it was listed fails with [`ErrorKind::Changed`] naming it, so a run never mixes two
//!   versions of its input.
//!
//! Credentials come from each store's standard environment, plus `*_FILE` variants of the
//! secrets ([`Env`], [`SECRET_VARIABLES`]); no secret is ever logged or put in an error.
//! Transient failures are retried with bounded backoff ([`RetryPolicy`]) and counted
//! ([`Stats`]); missing objects and refused credentials fail at once with the setting to fix.
//! Progress is an atomic to poll ([`Progress`]).
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::io::Read;
//! use input::{Location, Source, SourceOptions};
//!
//! let location = Location::parse("s3://bucket/data/")?;
//! let options = SourceOptions { spool_dir: Some("state/spool".into()), ..SourceOptions::default() };
//! let source = Source::open_blocking(location, options)?; // lists; fails fast on bad credentials
//! for index in 0..source.objects().len() {
//!     let mut reader = source.reader(index)?; // the scan: stream, decompress, spool
//!     let mut bytes = Vec::new();
//!     reader.read_to_end(&mut bytes)?;
//! }
//! let chunk = source.read_range(0, 0..100)?; // later, a chunk: one ranged GET
//! # Ok(()) }
//! ```
//!
//! # Cost per object
//!
//! | object                | memory while streamed                    | disk                      | a chunk read           |
//! |-----------------------|------------------------------------------|---------------------------|------------------------|
//! | local file            | the caller's buffer                      | none                      | one `pread`            |
//! | remote, uncompressed  | channel of 8 body buffers (≤ ~3 MiB, typically < 1 MiB) | none       | one ranged GET         |
//! | `.gz`                 | as above + ~40 KiB inflate state + 256 KiB spool write buffer | decompressed size, once | one `pread` of the spool |
//! | `.zst`                | as above + ~128 KiB input buffer + the frame's window (≤ 8 MiB at the usual levels, 128 MiB cap) + 256 KiB | decompressed size, once | one `pread` of the spool |
//!
//! Only one object is streamed at a time by the scan; a chunk read allocates its range once. The
//! spool (see [`spool`](crate::spool)) holds each compressed object's decompressed bytes in one
//! file named by the object's identity: written once during the scan (fsynced and renamed when
//! complete), reused by a restarted fetcher while the object is unchanged, pruned with
//! [`Source::prune_spool`]. Uncompressed objects are never copied. A spooled object is never
//! fetched again, so its chunks cannot see a later rewrite (the run keeps the version it scanned).

mod env;
mod error;
mod location;
mod metrics;
mod scan;
mod source;
mod spool;
mod store;

pub use env::{Env, SECRET_VARIABLES};
pub use error::{ErrorKind, SourceError};
pub use location::{Compression, Location, StoreKind};
pub use metrics::{FailureCallback, FailureKind, Progress, Stats};
pub use source::{ObjectInfo, ObjectReader, Source, SourceOptions, Version};
pub use spool::{parse_size, SizeError, SpoolArgs, SpoolLimits, RATIO_FLOOR};
pub use store::{RetryPolicy, StoreClient};
