//! The mapper's metrics.

use common::metrics::{register, CommonMetrics};
use prometheus::{Counter, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};

/// The mapper's metrics.
#[derive(Clone)]
pub struct MapperMetrics {
    /// Shared metrics and the registry.
    pub common: CommonMetrics,
    /// Chunks whose result a saver confirmed.
    pub chunks: IntCounter,
    /// Objects in them.
    pub objects: IntCounter,
    /// Transform time per chunk.
    pub transform: Histogram,
    /// Seconds spent transforming (summed over chunks in hand).
    pub busy: Counter,
    /// Seconds workers spent waiting for work.
    pub idle: Counter,
    /// Failures by kind: a whole chunk, or one object (dead-lettered).
    pub failures: IntCounterVec,
    /// Chunks in hand.
    pub in_flight: IntGauge,
}

impl MapperMetrics {
    /// Registers the mapper's metrics.
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        let common = CommonMetrics::new("mapper");
        let r = &common.registry;
        let metrics = MapperMetrics {
            chunks: register(
                r,
                IntCounter::new("chunkmill_mapper_chunks_processed_total", "Chunks transformed and confirmed saved")
                    .expect("valid metric"),
            ),
            objects: register(
                r,
                IntCounter::new("chunkmill_mapper_objects_processed_total", "Objects transformed and confirmed saved")
                    .expect("valid metric"),
            ),
            transform: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("chunkmill_mapper_transform_duration_seconds", "Transform time per chunk")
                        .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16).expect("valid buckets")),
                )
                .expect("valid metric"),
            ),
            busy: register(
                r,
                Counter::new("chunkmill_mapper_busy_seconds_total", "Seconds spent transforming chunks")
                    .expect("valid metric"),
            ),
            idle: register(
                r,
                Counter::new("chunkmill_mapper_idle_seconds_total", "Seconds workers waited for work")
                    .expect("valid metric"),
            ),
            failures: register(
                r,
                IntCounterVec::new(
                    Opts::new("chunkmill_mapper_failures_total", "Failures: whole chunks, or single objects"),
                    &["kind"],
                )
                .expect("valid metric"),
            ),
            in_flight: register(
                r,
                IntGauge::new("chunkmill_mapper_in_flight_chunks", "Chunks in hand").expect("valid metric"),
            ),
            common,
        };
        for kind in ["chunk", "object"] {
            metrics.failures.with_label_values(&[kind]);
        }
        metrics
    }
}

impl Default for MapperMetrics {
    fn default() -> Self {
        Self::new()
    }
}
