//! chunkmill as a whole: this package holds the end-to-end tests (`tests/`, real processes
//! around a real nats-server) and the criterion benchmarks (`benches/`). The services live in
//! their own crates, re-exported here for the benchmarks.

pub use common;
pub use fetcher;
pub use mapper;
pub use saver;
