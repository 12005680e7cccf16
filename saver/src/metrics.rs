//! The saver's metrics.

use common::metrics::{exponential_buckets, CommonMetrics};
use prometheus::{Histogram, IntCounter, IntGauge};

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
    /// Chunks per commit (group commit: how many share one round of fsyncs or one transaction).
    pub batch: Histogram,
    /// Saves that failed (nothing acknowledged).
    pub failures: IntCounter,
    /// Results being saved or acknowledged.
    pub in_flight: IntGauge,
}

impl SaverMetrics {
    /// Registers the saver's metrics.
    pub fn new() -> Self {
        let common = CommonMetrics::new("saver");
        let m = common.maker();
        SaverMetrics {
            chunks: m.counter("chunkmill_saver_chunks_saved_total", "Chunks saved durably"),
            objects: m.counter("chunkmill_saver_objects_saved_total", "Objects saved durably"),
            duplicates: m
                .counter("chunkmill_saver_duplicate_saves_total", "Results for chunks already saved (absorbed)"),
            write: m.histogram(
                "chunkmill_saver_write_duration_seconds",
                "Time to save one chunk durably",
                exponential_buckets(0.0001, 2.0, 16),
            ),
            batch: m.histogram(
                "chunkmill_saver_batch_chunks",
                "Chunks per commit (one round of fsyncs, or one transaction); see --commit-window",
                exponential_buckets(1.0, 2.0, 8),
            ),
            failures: m.counter("chunkmill_saver_write_failures_total", "Saves that failed; nothing was acknowledged"),
            in_flight: m.int_gauge("chunkmill_saver_in_flight", "Results being saved or acknowledged"),
            common,
        }
    }
}

impl Default for SaverMetrics {
    fn default() -> Self {
        Self::new()
    }
}
