//! The mapper's metrics.

use common::metrics::{exponential_buckets, CommonMetrics};
use prometheus::{Counter, Histogram, IntCounter, IntCounterVec, IntGauge};

/// The mapper's metrics.
#[derive(Clone)]
pub(crate) struct MapperMetrics {
    /// Shared metrics and the registry.
    pub(crate) common: CommonMetrics,
    /// Chunks whose result a saver confirmed.
    pub(crate) chunks: IntCounter,
    /// Objects in them.
    pub(crate) objects: IntCounter,
    /// Transform time per chunk.
    pub(crate) transform: Histogram,
    /// Seconds spent transforming (summed over chunks in hand).
    pub(crate) busy: Counter,
    /// Seconds workers spent waiting for work.
    pub(crate) idle: Counter,
    /// Failures by kind: a whole chunk, or one object (dead-lettered).
    pub(crate) failures: IntCounterVec,
    /// Chunks in hand.
    pub(crate) in_flight: IntGauge,
    /// jq sandboxes killed and started again, by why (timeout, memory, stack, died).
    pub(crate) jq_restarts: IntCounterVec,
}

impl MapperMetrics {
    /// Registers the mapper's metrics.
    pub(crate) fn new() -> Self {
        let common = CommonMetrics::new("mapper");
        let m = common.maker();
        let metrics = MapperMetrics {
            chunks: m.counter("chunkmill_mapper_chunks_processed_total", "Chunks transformed and confirmed saved"),
            objects: m.counter("chunkmill_mapper_objects_processed_total", "Objects transformed and confirmed saved"),
            transform: m.histogram(
                "chunkmill_mapper_transform_duration_seconds",
                "Transform time per chunk",
                exponential_buckets(0.0005, 2.0, 16),
            ),
            busy: m.float_counter("chunkmill_mapper_busy_seconds_total", "Seconds spent transforming chunks"),
            idle: m.float_counter("chunkmill_mapper_idle_seconds_total", "Seconds workers waited for work"),
            failures: m.counter_vec(
                "chunkmill_mapper_failures_total",
                "Failures: whole chunks, or single objects",
                "kind",
            ),
            in_flight: m.int_gauge("chunkmill_mapper_in_flight_chunks", "Chunks in hand"),
            jq_restarts: m.counter_vec(
                "chunkmill_mapper_jq_sandbox_restarts_total",
                "jq sandboxes killed on an object and started again, by reason",
                "reason",
            ),
            common,
        };
        for kind in ["chunk", "object"] {
            metrics.failures.with_label_values(&[kind]);
        }
        for reason in ["timeout", "memory", "stack", "died"] {
            metrics.jq_restarts.with_label_values(&[reason]);
        }
        metrics
    }
}

impl Default for MapperMetrics {
    fn default() -> Self {
        Self::new()
    }
}
