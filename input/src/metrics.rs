//! What a caller can poll or export while an input is read: [`Progress`] (bytes read so far out
//! of the total, for the progress line, a progress bar and a gauge) and [`Stats`] (transient
//! store failures by kind and how many were retried, for a Prometheus counter). Both are plain
//! atomics behind an `Arc`, updated once per buffer or per HTTP response, never per record.
//!
//! Transient failures (5xx, 429, 408, connection refused, timeouts, a dropped body) are retried by
//! `object_store`'s bounded backoff ([`crate::RetryPolicy`]); they are counted where they happen,
//! in the HTTP layer underneath it ([`crate::store`]), so every retry is seen.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes of the input read so far, out of the listed total. For a compressed object the bytes
/// are its stored (compressed) bytes, so the two numbers always compare; reading an object back
/// from the spool counts in proportion.
#[derive(Debug, Default)]
pub struct Progress {
    read: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    pub(crate) fn new(total: u64) -> Self {
        Progress { read: AtomicU64::new(0), total: AtomicU64::new(total) }
    }

    /// Bytes read so far (grows with every read; a re-read adds again).
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// The input's stored size: the sum of the listed objects' sizes.
    pub fn total_bytes(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub(crate) fn add(&self, bytes: u64) {
        self.read.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The kind of a transient store failure (a low-cardinality metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The connection could not be made (refused, reset before the request was sent, DNS).
    Connect,
    /// The request or a read timed out.
    Timeout,
    /// The request was cut off midway.
    Interrupted,
    /// The store answered 5xx.
    Server,
    /// The store answered 429 (slow down) or 408.
    Throttled,
    /// The response body broke off while it was read.
    Body,
}

impl FailureKind {
    /// Every kind, in label order.
    pub const ALL: [FailureKind; 6] = [
        FailureKind::Connect,
        FailureKind::Timeout,
        FailureKind::Interrupted,
        FailureKind::Server,
        FailureKind::Throttled,
        FailureKind::Body,
    ];

    /// Its metric label.
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Timeout => "timeout",
            FailureKind::Interrupted => "interrupted",
            FailureKind::Server => "server",
            FailureKind::Throttled => "throttled",
            FailureKind::Body => "body",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Called on every transient failure, e.g. to increment a `prometheus::IntCounterVec` labelled
/// with [`FailureKind::label`]. Runs on the I/O thread: keep it short.
pub type FailureCallback = Arc<dyn Fn(FailureKind) + Send + Sync>;

/// Counts of transient store failures.
#[derive(Default)]
pub struct Stats {
    failures: [AtomicU64; 6],
    gave_up: AtomicU64,
    on_failure: Option<FailureCallback>,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats").field("failures", &self.failures_by_kind()).field("retries", &self.retries()).finish()
    }
}

impl Stats {
    pub(crate) fn new(on_failure: Option<FailureCallback>) -> Self {
        Stats { on_failure, ..Stats::default() }
    }

    /// Transient failures that were retried: every failure seen, less the operations that
    /// still failed after their last retry.
    pub fn retries(&self) -> u64 {
        let seen: u64 = self.failures.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        seen.saturating_sub(self.gave_up.load(Ordering::Relaxed))
    }

    /// Transient failures seen, by kind (every kind listed, zeros included, in
    /// [`FailureKind::ALL`] order).
    pub fn failures_by_kind(&self) -> Vec<(FailureKind, u64)> {
        FailureKind::ALL.iter().map(|k| (*k, self.failures[k.index()].load(Ordering::Relaxed))).collect()
    }

    /// Operations that failed for good on a transient error (the retries ran out).
    pub fn gave_up(&self) -> u64 {
        self.gave_up.load(Ordering::Relaxed)
    }

    pub(crate) fn failure(&self, kind: FailureKind) {
        self.failures[kind.index()].fetch_add(1, Ordering::Relaxed);
        if let Some(callback) = &self.on_failure {
            callback(kind);
        }
    }

    pub(crate) fn give_up(&self) {
        self.gave_up.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_failures_less_the_ones_given_up() {
        let seen = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&seen);
        let stats = Stats::new(Some(Arc::new(move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        })));
        stats.failure(FailureKind::Connect);
        stats.failure(FailureKind::Connect);
        stats.failure(FailureKind::Server);
        stats.give_up();
        assert_eq!(stats.retries(), 2);
        assert_eq!(seen.load(Ordering::Relaxed), 3);
        let by_kind = stats.failures_by_kind();
        assert_eq!(by_kind[0], (FailureKind::Connect, 2));
        assert_eq!(by_kind[3], (FailureKind::Server, 1));
        assert_eq!(by_kind.len(), FailureKind::ALL.len());
    }
}
