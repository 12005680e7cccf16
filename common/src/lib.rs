//! What chunkmill's services share, and nothing else: the wire protocol and the pipeline events,
//! strict JSON and JSON values compared exactly, the input reader (the fetcher chunks it, `saver verify` re-reads it), configuration shared by every binary, the NATS connection, JetStream replicas, logging,
//! shutdown, and (behind the `test-support` feature) the integration-test harness.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod backoff;
pub mod config;
pub mod dups;
pub mod events;
pub mod exact;
pub mod input;
pub mod jetstream;
pub mod json;
pub mod metrics;
pub mod nats;
pub mod protocol;
pub mod service;
pub mod shutdown;
pub mod sync;
pub mod telemetry;
pub mod text;

#[cfg(feature = "test-support")]
pub mod harness;
