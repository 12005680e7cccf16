//! The fetcher's metrics, synced from the ledger on every tick (the ledger lives in one task;
//! the scrape handler never touches it).

use std::time::{SystemTime, UNIX_EPOCH};

use common::metrics::CommonMetrics;
use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

use crate::ledger::{Ledger, LedgerStats};

/// The fetcher's metrics.
pub(crate) struct FetcherMetrics {
    /// Shared metrics and the registry.
    pub(crate) common: CommonMetrics,
    chunks: IntGaugeVec,
    run_objects: IntGauge,
    run_objects_done: IntGauge,
    objects_done: IntCounter,
    eta: Gauge,
    leases: IntCounter,
    expiries: IntCounter,
    re_leases: IntCounter,
    releases: IntCounterVec,
    acks: IntCounterVec,
    started: Gauge,
    completed: Gauge,
    store_errors: IntCounter,
    store_ok: IntGauge,
    refused: IntCounterVec,
    mappers: IntGaugeVec,
    seen: LedgerStats,
    seen_objects: u64,
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl FetcherMetrics {
    /// Registers the fetcher's metrics.
    pub(crate) fn new() -> Self {
        let common = CommonMetrics::new("fetcher");
        let m = common.maker();
        let metrics = FetcherMetrics {
            chunks: m.int_gauge_vec("chunkmill_fetcher_chunks", "Chunks of the run by state", "state"),
            run_objects: m.int_gauge("chunkmill_fetcher_run_objects", "Valid objects in the run"),
            run_objects_done: m.int_gauge("chunkmill_fetcher_run_objects_done", "Objects of the run durably saved"),
            objects_done: m.counter("chunkmill_fetcher_objects_done_total", "Objects acknowledged as saved"),
            eta: m.gauge("chunkmill_fetcher_eta_seconds", "Estimated seconds to completion at the current rate"),
            leases: m.counter("chunkmill_fetcher_leases_granted_total", "Leases granted"),
            expiries: m.counter("chunkmill_fetcher_lease_expiries_total", "Leases that expired"),
            re_leases: m.counter("chunkmill_fetcher_re_leases_total", "Leases granted for chunks leased before"),
            releases: m.counter_vec("chunkmill_fetcher_releases_total", "Leases handed back by mappers", "reason"),
            acks: m.counter_vec("chunkmill_fetcher_acks_total", "Saver acknowledgements by verdict", "verdict"),
            started: m.gauge("chunkmill_fetcher_run_start_timestamp_seconds", "When the run started (Unix time)"),
            completed: m.gauge(
                "chunkmill_fetcher_run_complete_timestamp_seconds",
                "When the run completed (Unix time), 0 until then",
            ),
            store_errors: m.counter(
                "chunkmill_fetcher_store_write_errors_total",
                "Writes to the durable ledger that failed (a full disk, JetStream unavailable)",
            ),
            store_ok: m
                .int_gauge("chunkmill_fetcher_store_ok", "1 while the durable ledger can be written, 0 while it fails"),
            refused: m.counter_vec(
                "chunkmill_fetcher_refused_requests_total",
                "Well-formed requests refused to protect the fetcher, by reason",
                "reason",
            ),
            mappers: m.int_gauge_vec(
                "chunkmill_fetcher_mappers_asking",
                "Mappers that asked for work in the last 10 s, by whether they can run the run's job",
                "able",
            ),
            common,
            seen: LedgerStats::default(),
            seen_objects: 0,
        };
        // Make every labelled series exist from the start, so dashboards show 0, not "no data".
        metrics.store_ok.set(1);
        for reason in ["held_requests_full", "protocol_v1", "wrong_sink", "not_lease_holder"] {
            metrics.refused.with_label_values(&[reason]);
        }
        for able in ["true", "false"] {
            metrics.mappers.with_label_values(&[able]);
        }
        for state in ["pending", "leased", "done", "dead_lettered"] {
            metrics.chunks.with_label_values(&[state]);
        }
        for reason in ["shutdown", "failed"] {
            metrics.releases.with_label_values(&[reason]);
        }
        for verdict in ["done", "late", "duplicate", "unknown"] {
            metrics.acks.with_label_values(&[verdict]);
        }
        metrics
    }

    /// Marks the run started with `objects` objects.
    pub(crate) fn start(&self, objects: u64) {
        self.started.set(unix_now());
        self.run_objects.set(objects as i64);
    }

    /// Mappers asking for work: able to run the job, and not.
    pub(crate) fn mappers(&self, able: usize, unable: usize) {
        self.mappers.with_label_values(&["true"]).set(able as i64);
        self.mappers.with_label_values(&["false"]).set(unable as i64);
    }

    /// Counts a request refused for `reason`.
    pub(crate) fn refused(&self, reason: &str) {
        self.refused.with_label_values(&[reason]).inc();
    }

    /// Counts a failed write to the durable ledger.
    pub(crate) fn store_failed(&self) {
        self.store_errors.inc();
        self.store_ok.set(0);
    }

    /// The durable ledger can be written again.
    pub(crate) fn store_recovered(&self) {
        self.store_ok.set(1);
    }

    /// Marks the run complete.
    pub(crate) fn complete(&self) {
        if self.completed.get() == 0.0 {
            self.completed.set(unix_now());
        }
        self.eta.set(0.0);
    }

    /// Copies the ledger's state; `eta` in seconds if known (over recent progress: see
    /// [`crate::progress::Rate`]).
    pub(crate) fn sync(&mut self, ledger: &Ledger, eta: Option<f64>) {
        self.chunks.with_label_values(&["pending"]).set(ledger.pending() as i64);
        self.chunks.with_label_values(&["leased"]).set(ledger.leased() as i64);
        self.chunks.with_label_values(&["done"]).set(ledger.done() as i64);
        self.chunks.with_label_values(&["dead_lettered"]).set(ledger.dead() as i64);
        self.run_objects_done.set(ledger.objects_done() as i64);
        self.objects_done.inc_by(ledger.objects_done().saturating_sub(self.seen_objects));
        self.seen_objects = ledger.objects_done();
        // Unknown (no progress in the last minute, or none yet) is NaN, never 0: 0 reads as done.
        self.eta.set(eta.unwrap_or(f64::NAN));
        let now = ledger.stats();
        let was = &self.seen;
        self.leases.inc_by(now.leases_granted - was.leases_granted);
        self.expiries.inc_by(now.expiries - was.expiries);
        self.re_leases.inc_by(now.re_leases - was.re_leases);
        self.releases.with_label_values(&["shutdown"]).inc_by(now.releases_shutdown - was.releases_shutdown);
        self.releases.with_label_values(&["failed"]).inc_by(now.releases_failed - was.releases_failed);
        self.acks
            .with_label_values(&["done"])
            .inc_by((now.acks_done - now.acks_late).saturating_sub(was.acks_done - was.acks_late));
        self.acks.with_label_values(&["late"]).inc_by(now.acks_late - was.acks_late);
        self.acks.with_label_values(&["duplicate"]).inc_by(now.acks_duplicate - was.acks_duplicate);
        self.acks.with_label_values(&["unknown"]).inc_by(now.acks_unknown - was.acks_unknown);
        self.seen = now.clone();
    }
}

impl Default for FetcherMetrics {
    fn default() -> Self {
        Self::new()
    }
}
