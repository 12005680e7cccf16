//! The broadcaster's metrics, next to the shared ones ([`common::metrics::CommonMetrics`]).
//! Labels are low-cardinality (event kinds, failure reasons); no event id or URL ever becomes a
//! label.

use common::metrics::CommonMetrics;
use prometheus::{Histogram, IntCounter, IntCounterVec};

use crate::send::FailReason;

/// The broadcaster's metrics.
#[derive(Clone)]
pub struct BroadcasterMetrics {
    /// Shared metrics and the registry.
    pub common: CommonMetrics,
    /// Event deliveries taken from the stream (redeliveries count again).
    pub received: IntCounter,
    /// Messages delivered to the chat, by event kind.
    pub sent: IntCounterVec,
    /// Events not sent because another delivery or replica had claimed them.
    pub duplicates: IntCounter,
    /// Messages given up, by reason.
    pub failed: IntCounterVec,
    /// Claims that failed for a reason other than "already claimed" (redelivered later).
    pub claim_errors: IntCounter,
    /// HTTP retries.
    pub retries: IntCounter,
    /// HTTP 429 answers.
    pub rate_limited: IntCounter,
    /// Time to deliver or give up one message, retries and waits included.
    pub send_seconds: Histogram,
}

impl BroadcasterMetrics {
    /// Registers the metrics.
    pub fn new() -> Self {
        let common = CommonMetrics::new("broadcaster");
        let m = common.maker();
        let metrics = BroadcasterMetrics {
            received: m.counter(
                "chunkmill_broadcaster_events_received_total",
                "Event deliveries taken from the stream (redeliveries included)",
            ),
            sent: m.counter_vec(
                "chunkmill_broadcaster_events_sent_total",
                "Messages delivered to the chat, by event kind",
                "kind",
            ),
            duplicates: m.counter(
                "chunkmill_broadcaster_events_skipped_duplicate_total",
                "Events not sent because they were already claimed (a redelivery or a repeat)",
            ),
            failed: m.counter_vec(
                "chunkmill_broadcaster_events_failed_total",
                "Messages given up, by reason",
                "reason",
            ),
            claim_errors: m.counter(
                "chunkmill_broadcaster_claim_errors_total",
                "Claims that failed for another reason than 'already claimed'; the event is redelivered",
            ),
            retries: m
                .counter("chunkmill_broadcaster_http_retries_total", "HTTP requests retried (429, 5xx, no connection)"),
            rate_limited: m.counter("chunkmill_broadcaster_http_429_total", "HTTP 429 Too Many Requests answers"),
            send_seconds: m.histogram(
                "chunkmill_broadcaster_send_seconds",
                "Time to deliver or give up one message, retries and waits included",
                vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
            ),
            common,
        };
        for kind in common::events::KINDS {
            metrics.sent.with_label_values(&[kind]);
        }
        for reason in FailReason::ALL {
            metrics.failed.with_label_values(&[reason.label()]);
        }
        metrics
    }
}

impl Default for BroadcasterMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_register_and_every_series_exists_at_zero() {
        let metrics = BroadcasterMetrics::new();
        let mut body = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &metrics.common.registry.gather(), &mut body)
            .unwrap();
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains("chunkmill_broadcaster_events_sent_total{kind=\"completed\"} 0"), "{text}");
        assert!(text.contains("chunkmill_broadcaster_events_failed_total{reason=\"rejected_4xx\"} 0"), "{text}");
    }
}
