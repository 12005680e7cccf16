//! Where the scan's bytes come from: `--input` opened as an [`input::Source`] (a local file or
//! glob, an object, prefix or key pattern in S3/GCS/Azure, an HTTP file; gzip and zstd spooled
//! to `STATE_DIR/spool`), and what a person or a dashboard sees while it is streamed: a progress
//! line every few seconds (a bar on terminals) and the `chunkmill_fetcher_input_*` metrics
//! (bytes scanned and total, transient store failures retried).

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use input::{FailureCallback, FailureKind, Location, Source, SourceError, SourceOptions, SpoolLimits};
use prometheus::{IntCounterVec, IntGauge};
use tokio_util::sync::CancellationToken;

/// The input's metrics.
#[derive(Clone)]
pub(crate) struct InputMetrics {
    scanned: IntGauge,
    total: IntGauge,
    objects: IntGauge,
    failures: IntCounterVec,
}

impl InputMetrics {
    /// Registers them with `m`.
    pub(crate) fn new(m: common::metrics::Maker<'_>) -> Self {
        let failures = m.counter_vec(
            "chunkmill_fetcher_input_store_failures_total",
            "Transient input store failures (retried with backoff), by kind",
            "kind",
        );
        for kind in FailureKind::ALL {
            failures.with_label_values(&[kind.label()]);
        }
        InputMetrics {
            scanned: m.int_gauge("chunkmill_fetcher_input_bytes_scanned", "Bytes of the input read by the scan so far"),
            total: m
                .int_gauge("chunkmill_fetcher_input_bytes", "Stored bytes of the input (compressed size for .gz/.zst)"),
            objects: m.int_gauge("chunkmill_fetcher_input_objects", "Objects (files) in the input"),
            failures,
        }
    }

    fn on_failure(&self) -> FailureCallback {
        let failures = self.failures.clone();
        Arc::new(move |kind: FailureKind| failures.with_label_values(&[kind.label()]).inc())
    }
}

/// Opens `input` (blocking: call it off the runtime): lists its objects, failing at once on a
/// missing object or bucket and on refused credentials, with the setting to fix. Compressed
/// objects are spooled to `state_dir/spool`, within `spool`; spool files of other inputs are
/// removed.
pub(crate) fn open(
    input: &str,
    state_dir: &Path,
    spool: SpoolLimits,
    metrics: &InputMetrics,
) -> Result<Source, SourceError> {
    let location = Location::parse(input)?;
    let options = SourceOptions {
        spool_dir: Some(state_dir.join("spool")),
        spool_limits: spool,
        on_failure: Some(metrics.on_failure()),
        ..SourceOptions::default()
    };
    let source = Source::open_blocking(location, options)?;
    match source.prune_spool() {
        Ok(0) => {}
        Ok(n) => tracing::info!("removed {n} spool files of other inputs from {}", state_dir.join("spool").display()),
        Err(e) => tracing::warn!("{e}"),
    }
    metrics.total.set(i64::try_from(source.total_size()).unwrap_or(i64::MAX));
    metrics.objects.set(source.objects().len() as i64);
    Ok(source)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Reports the scan's progress until `done` is cancelled: the metric every half second, a line
/// every 5 s (a bar on a terminal), so that a scan of several GB does not look like a hang.
pub(crate) async fn report(source: Source, metrics: InputMetrics, done: CancellationToken) {
    let progress = source.progress();
    let total = progress.total_bytes();
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let bar = (std::io::stderr().is_terminal() && !json).then(|| {
        let bar = ProgressBar::new(total);
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} scanning [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} ({percent}%)",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    });
    let started = std::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last_line = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = done.cancelled() => break,
            _ = tick.tick() => {}
        }
        let read = progress.bytes_read().min(total);
        metrics.scanned.set(i64::try_from(read).unwrap_or(i64::MAX));
        if let Some(bar) = &bar {
            bar.set_position(read);
        } else if last_line.elapsed() >= Duration::from_secs(5) {
            last_line = std::time::Instant::now();
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            tracing::info!(
                "scanning input {}: {:.1} of {:.1} MB ({:.0}%), {:.1} MB/s",
                source.location(),
                mb(read),
                mb(total),
                if total == 0 { 100.0 } else { read as f64 * 100.0 / total as f64 },
                mb(read) / secs
            );
        }
    }
    let read = progress.bytes_read().min(total);
    metrics.scanned.set(i64::try_from(read).unwrap_or(i64::MAX));
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let retries = source.stats().retries();
    if retries > 0 {
        tracing::warn!("the input store failed {retries} times during the scan; each was retried");
    }
}
