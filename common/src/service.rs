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
}

impl Service {
    /// Names the service (`kind` is `fetcher`, `mapper`, ...) and starts its metrics and health
    /// endpoint on `metrics_addr`; not ready yet.
    pub async fn start(
        kind: &'static str,
        nats: &NatsArgs,
        metrics_addr: &str,
        metrics: &CommonMetrics,
        shutdown: &CancellationToken,
    ) -> Result<Self, StartError> {
        let name = nats.instance_name(kind);
        let (connection, ready) = crate::metrics::start(metrics_addr, metrics, shutdown).await?;
        Ok(Service { name, kind, connection, ready })
    }

    /// Connects to NATS as `chunkmill-<kind> <name>`, waiting for a server that is not up yet;
    /// the health endpoint reports the connection's state from then on.
    pub async fn connect(&self, nats: &NatsArgs, shutdown: &CancellationToken) -> Result<Client, StartError> {
        let client_name = format!("chunkmill-{} {}", self.kind, self.name);
        Ok(crate::nats::connect(nats, &client_name, &self.connection, shutdown).await?)
    }

    /// Raises readiness: /readyz answers 200 while NATS is connected.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// The readiness flag, for a service that lowers it again (the fetcher on a full disk).
    pub fn readiness(&self) -> Arc<AtomicBool> {
        self.ready.clone()
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
    let built = match runtime {
        Runtime::CurrentThread => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        Runtime::Workers(n) => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
    };
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

/// Reports a fatal error as every binary does: one log line, one line on stderr, exit status 1.
pub fn fail(kind: &str, error: &anyhow::Error) -> ExitCode {
    tracing::error!("{error:#}");
    eprintln!("{kind}: {error:#}");
    ExitCode::FAILURE
}
