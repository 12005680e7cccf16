//! What every service does before its own work, written once: name itself, serve /metrics,
//! /healthz and /readyz (first, so a liveness probe sees a live process while NATS or a database
//! is still away), connect to NATS, and raise readiness when it can work. Also the shared shape
//! of the binaries' `main`: log set-up, a tokio runtime, one cancellation token for SIGTERM and
//! Ctrl-C, and the error printed once at the edge.

use std::future::Future;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_nats::Client;
use tokio_util::sync::CancellationToken;

use crate::config::NatsArgs;
use crate::metrics::{CommonMetrics, ServeError};
use crate::nats::{ConnectError, ConnectionState};

/// Why a service could not start its common parts.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] ServeError),
    /// NATS connection set-up failed.
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

/// A started service: its name, its health endpoint, and (after [`Service::connect`]) NATS.
pub struct Service {
    /// `--instance`, else `<hostname>-<pid>`.
    pub name: String,
    kind: &'static str,
    connection: Arc<ConnectionState>,
    ready: Arc<AtomicBool>,
    pages: Arc<std::sync::OnceLock<Arc<dyn crate::metrics::Pages>>>,
    registry: prometheus::Registry,
}

/// The NATS micro-service name of a chunkmill service of `kind` (`nats micro info fetcher`).
pub fn micro_name(kind: &str) -> String {
    kind.to_string()
}

/// The subject of the `stats` endpoint of the service `kind` called `instance`: its Prometheus
/// metrics over NATS. An instance name may hold characters a subject token cannot (dots,
/// spaces, wildcards): those become `_`.
pub fn stats_subject(prefix: &str, kind: &str, instance: &str) -> String {
    let token: String = instance
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .take(crate::protocol::MAX_NAME)
        .collect();
    format!("{prefix}.stats.{kind}.{token}")
}

impl Service {
    /// Names the service (`kind` is `fetcher`, `mapper`, ...) and starts its metrics and health
    /// endpoint on `metrics_addr`; not ready yet.
    pub async fn start(
        kind: &'static str,
        nats: &NatsArgs,
        metrics_addr: crate::metrics::MetricsAddr<'_>,
        metrics: &CommonMetrics,
        shutdown: &CancellationToken,
    ) -> Result<Self, StartError> {
        let name = nats.instance_name(kind);
        let endpoint = crate::metrics::start(metrics_addr, metrics, shutdown).await?;
        Ok(Service {
            name,
            kind,
            connection: endpoint.connection,
            ready: endpoint.ready,
            pages: endpoint.pages,
            registry: metrics.registry.clone(),
        })
    }

    /// Connects to NATS as `chunkmill-<kind> <name>`, waiting for a server that is not up yet;
    /// the health endpoint reports the connection's state from then on.
    pub async fn connect(&self, nats: &NatsArgs, shutdown: &CancellationToken) -> Result<Client, StartError> {
        let client_name = format!("chunkmill-{} {}", self.kind, self.name);
        Ok(crate::nats::connect(nats, self.kind, &client_name, &self.connection, shutdown).await?)
    }

    /// Registers with the NATS micro-service protocol, so that `nats micro ls|info|stats` and
    /// `$SRV.PING` find this instance with its version and instance name, and serves its
    /// `stats` endpoint (its Prometheus metrics as text, at [`stats_subject`]) until
    /// `shutdown`. The returned service adds a service's own endpoints; keep it while running.
    /// Being found is an aid, not the work: a registration the server refuses is a warning
    /// (naming the permissions to grant), and the service runs on without it.
    pub async fn register(
        &self,
        client: &Client,
        prefix: &str,
        shutdown: &CancellationToken,
    ) -> Option<async_nats::service::Service> {
        use async_nats::service::ServiceExt;
        let warn = |e: &dyn std::fmt::Display| {
            tracing::warn!(
                "cannot register {} with the NATS service API ($SRV.*): {e}; `nats micro ls` will not list it \
                 (grant this NATS user subscribe on $SRV.> and {prefix}.stats.>, and allow_responses)",
                self.kind
            );
        };
        let metadata = std::collections::HashMap::from([
            ("instance".to_string(), self.name.clone()),
            ("subject_prefix".to_string(), prefix.to_string()),
            ("version".to_string(), crate::metrics::LONG_VERSION.to_string()),
        ]);
        let service = client
            .service_builder()
            .description(format!("chunkmill {}", self.kind))
            .metadata(metadata)
            .start(micro_name(self.kind), env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|e| warn(&e))
            .ok()?;
        match service.endpoint_builder().name("stats").add(stats_subject(prefix, self.kind, &self.name)).await {
            Ok(endpoint) => drop(tokio::spawn(serve_stats(endpoint, self.registry.clone(), shutdown.clone()))),
            Err(e) => warn(&e),
        }
        Some(service)
    }

    /// Raises readiness: /readyz answers 200 while NATS is connected.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// Adds the service's own pages to its metrics endpoint (the first call wins).
    pub fn set_pages(&self, pages: Arc<dyn crate::metrics::Pages>) {
        let _ = self.pages.set(pages);
    }

    /// The readiness flag, for a service that lowers it again (the fetcher on a full disk).
    pub fn readiness(&self) -> Arc<AtomicBool> {
        self.ready.clone()
    }
}

/// Answers the `stats` endpoint with the registry's metrics in Prometheus text format.
async fn serve_stats(
    mut endpoint: async_nats::service::endpoint::Endpoint,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
) {
    use futures::StreamExt;
    use prometheus::Encoder;
    loop {
        let request = tokio::select! {
            _ = shutdown.cancelled() => break,
            request = endpoint.next() => request,
        };
        let Some(request) = request else { break };
        let mut body = Vec::new();
        let encoded = prometheus::TextEncoder::new().encode(&registry.gather(), &mut body);
        let answer = encoded
            .map(|()| body.into())
            .map_err(|e| async_nats::service::error::Error { status: e.to_string(), code: 500 });
        if let Err(e) = request.respond(answer).await {
            tracing::debug!("cannot answer a stats request: {e}");
        }
    }
}

/// How many tokio worker threads a binary runs.
#[derive(Debug, Clone, Copy)]
pub enum Runtime {
    /// One thread: the service waits on the network, one task at a time matters.
    CurrentThread,
    /// A multi-threaded runtime with this many workers.
    Workers(usize),
}

/// The body of every binary's `main`: set up logging, run `body` on a tokio runtime with one
/// cancellation token that SIGTERM and Ctrl-C cancel, and turn an error into one log line, one
/// line on stderr (`kind: error`) and a failure exit status.
pub fn main<F, Fut>(kind: &str, runtime: Runtime, body: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<ExitCode>>,
{
    crate::telemetry::init_logging();
    let mut builder = match runtime {
        Runtime::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        Runtime::Workers(n) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    // Named after the service (workers and blocking pool alike): `top -H` and a profile of the
    // whole pipeline tell whose threads they are.
    let built = builder.thread_name(format!("{kind}-rt")).enable_all().build();
    let result = match built {
        Ok(rt) => rt.block_on(async { body(crate::shutdown::on_signals()).await }),
        Err(e) => Err(anyhow::Error::new(e).context("cannot start the tokio runtime")),
    };
    result.unwrap_or_else(|e| fail(kind, &e))
}

/// The body of a binary's one-shot helper command (`fetcher generate`, `saver verify`): set up
/// logging, run `body` on this thread, and report an error as [`main`] does.
pub fn command(kind: &str, body: impl FnOnce() -> anyhow::Result<ExitCode>) -> ExitCode {
    crate::telemetry::init_logging();
    body().unwrap_or_else(|e| fail(kind, &e))
}

/// Reports a fatal error as every binary does, once, and exits with status 1: as a JSON log
/// line (level ERROR, the whole error chain in `error`) under `LOG_FORMAT=json`, so a log
/// collector sees it like any other line; else as one plain line `kind: error` on stderr.
pub fn fail(kind: &str, error: &anyhow::Error) -> ExitCode {
    if crate::telemetry::json_logs() {
        tracing::error!(error = %format!("{error:#}"), "{kind}: {error:#}");
    } else {
        eprintln!("{kind}: {error:#}");
    }
    ExitCode::FAILURE
}
