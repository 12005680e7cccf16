//! The saver's metrics.

use common::metrics::{register, CommonMetrics};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge};

/// The saver's metrics.
#[derive(Clone)]
pub struct SaverMetrics {
    /// Shared metrics and the registry.
    pub common: CommonMetrics,
    /// Chunks written.
    pub chunks: IntCounter,
    /// Objects written.
    pub objects: IntCounter,
    /// Saves that found the chunk already saved.
    pub duplicates: IntCounter,
    /// Time to save one chunk durably.
    pub write: Histogram,
    /// Saves that failed (nothing acknowledged).
    pub failures: IntCounter,
    /// Results being saved or acknowledged.
    pub in_flight: IntGauge,
}

impl SaverMetrics {
    /// Registers the saver's metrics.
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        let common = CommonMetrics::new("saver");
        let r = &common.registry;
        let counter = |name: &str, help: &str| register(r, IntCounter::new(name, help).expect("valid metric"));
        SaverMetrics {
            chunks: counter("chunkmill_saver_chunks_saved_total", "Chunks saved durably"),
            objects: counter("chunkmill_saver_objects_saved_total", "Objects saved durably"),
            duplicates: counter("chunkmill_saver_duplicate_saves_total", "Results for chunks already saved (absorbed)"),
            write: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("chunkmill_saver_write_duration_seconds", "Time to save one chunk durably")
                        .buckets(prometheus::exponential_buckets(0.0001, 2.0, 16).expect("valid buckets")),
                )
                .expect("valid metric"),
            ),
            failures: counter("chunkmill_saver_write_failures_total", "Saves that failed; nothing was acknowledged"),
            in_flight: register(
                r,
                IntGauge::new("chunkmill_saver_in_flight", "Results being saved or acknowledged")
                    .expect("valid metric"),
            ),
            common,
        }
    }
}

impl Default for SaverMetrics {
    fn default() -> Self {
        Self::new()
    }
}
