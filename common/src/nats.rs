//! The NATS connection every service opens: named, reconnecting forever, and reporting its state
//! (connected, reconnects, slow-consumer events) to logs and to [`ConnectionState`], which the
//! readiness probe and metrics read.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event};

use crate::config::NatsArgs;

/// Live facts about the connection, updated by the client's event callback.
#[derive(Debug, Default)]
pub struct ConnectionState {
    connected: AtomicBool,
    connects: AtomicU64,
    slow_consumers: AtomicU64,
}

impl ConnectionState {
    /// Connected right now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
    /// Successful (re)connections since start.
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }
    /// Slow-consumer events (messages dropped by the client) since start.
    pub fn slow_consumers(&self) -> u64 {
        self.slow_consumers.load(Ordering::Relaxed)
    }
}

/// Why the connection could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to NATS at {url}: {source}; check NATS_URL and that nats-server is running")]
pub struct ConnectError {
    url: String,
    #[source]
    source: async_nats::ConnectError,
}

/// Connects to NATS. The connection is made in the background and retried forever, so a service
/// may start before nats-server and survives its restarts; requests made meanwhile time out and
/// are retried by their callers.
pub async fn connect(args: &NatsArgs, name: &str) -> Result<(Client, Arc<ConnectionState>), ConnectError> {
    let state = Arc::new(ConnectionState::default());
    let events = state.clone();
    let url = args.url.clone();
    let options = ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((100u64 << attempts.min(4) as u32).min(2000))
        })
        .event_callback(move |event| {
            let state = events.clone();
            let url = url.clone();
            async move {
                match event {
                    Event::Connected => {
                        state.connected.store(true, Ordering::Relaxed);
                        state.connects.fetch_add(1, Ordering::Relaxed);
                        tracing::info!("connected to NATS at {url}");
                    }
                    Event::Disconnected => {
                        state.connected.store(false, Ordering::Relaxed);
                        tracing::warn!("disconnected from NATS at {url}; reconnecting, work is kept meanwhile");
                    }
                    Event::SlowConsumer(sid) => {
                        state.slow_consumers.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(
                            "NATS slow consumer on subscription {sid}: messages were dropped; in-flight limits are too high"
                        );
                    }
                    Event::Closed => {
                        state.connected.store(false, Ordering::Relaxed);
                    }
                    other => tracing::warn!("NATS: {other}"),
                }
            }
        });
    let client =
        options.connect(args.url.as_str()).await.map_err(|source| ConnectError { url: args.url.clone(), source })?;
    Ok((client, state))
}

/// The server's max_payload, or NATS's default (1 MiB) while not yet connected.
pub fn max_payload(client: &Client) -> usize {
    match client.server_info().max_payload {
        0 => 1 << 20,
        n => n,
    }
}
