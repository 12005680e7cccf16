//! The NATS connection every service opens: named, reconnecting forever, and reporting its state
//! (connected, reconnects, slow-consumer events) to logs and to [`ConnectionState`], which the
//! readiness probe and metrics read. Connecting waits for an unreachable server but fails at once
//! on bad credentials or TLS.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, ConnectErrorKind, ConnectOptions, Event};
use tokio_util::sync::CancellationToken;

use crate::config::NatsArgs;

/// Live facts about the connection, updated by the client's event callback.
#[derive(Debug, Default)]
pub struct ConnectionState {
    connected: AtomicBool,
    lost: AtomicBool,
    reconnects: AtomicU64,
    slow_consumers: AtomicU64,
}

impl ConnectionState {
    /// Connected right now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
    /// Reconnections after a lost connection, since start.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
    /// Slow-consumer events (messages dropped by the client) since start.
    pub fn slow_consumers(&self) -> u64 {
        self.slow_consumers.load(Ordering::Relaxed)
    }
}

/// Why the connection could not be set up. Authentication and TLS problems are reported at
/// once; an unreachable server is waited for instead.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server refused us or TLS failed: retrying cannot help.
    #[error("NATS at {url} refused the connection: {source}; check the credentials (NATS_USER, NATS_PASSWORD_FILE, NATS_TOKEN_FILE, NATS_NKEY_FILE, NATS_CREDS_FILE) and TLS settings (NATS_TLS_*)")]
    Refused {
        /// The server URL.
        url: String,
        /// The client's error.
        source: async_nats::ConnectError,
    },
    /// A credential or certificate file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    File {
        /// What the file is for.
        what: &'static str,
        /// The path.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Shutdown was requested while waiting for NATS.
    #[error("stopped while waiting for NATS at {0}")]
    Cancelled(String),
}

fn read_secret(what: &'static str, path: &std::path::Path) -> Result<String, ConnectError> {
    crate::config::read_secret_file(path).map_err(|source| ConnectError::File {
        what,
        path: path.to_path_buf(),
        source,
    })
}

async fn options(args: &NatsArgs, name: &str, state: &Arc<ConnectionState>) -> Result<ConnectOptions, ConnectError> {
    let events = state.clone();
    let url = args.url.clone();
    let mut options = match &args.nats_creds_file {
        Some(path) => ConnectOptions::new().credentials_file(path).await.map_err(|source| ConnectError::File {
            what: "NATS credentials file",
            path: path.clone(),
            source,
        })?,
        None => ConnectOptions::new(),
    };
    if let Some(user) = &args.nats_user {
        let password = match (&args.nats_password_file, &args.nats_password) {
            (Some(path), _) => read_secret("NATS password file", path)?,
            (None, Some(password)) => password.clone(),
            (None, None) => String::new(),
        };
        options = options.user_and_password(user.clone(), password);
    }
    if let Some(path) = &args.nats_token_file {
        options = options.token(read_secret("NATS token file", path)?);
    }
    if let Some(path) = &args.nats_nkey_file {
        options = options.nkey(read_secret("NATS NKey seed file", path)?);
    }
    if let Some(ca) = &args.nats_tls_ca_file {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&args.nats_tls_cert_file, &args.nats_tls_key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone()).require_tls(true);
    }
    Ok(options
        .name(name)
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        // async-nats counts the very first attempt as 1: no delay for it (it cost every start
        // 200 ms), then 100 ms doubling to 2 s.
        .reconnect_delay_callback(|attempts| match attempts {
            0 | 1 => Duration::ZERO,
            n => Duration::from_millis((100u64 << (n - 2).min(5)).min(2000)),
        })
        .event_callback(move |event| {
            let state = events.clone();
            let url = url.clone();
            async move {
                match event {
                    Event::Connected => {
                        state.connected.store(true, Ordering::Relaxed);
                        if state.lost.swap(false, Ordering::Relaxed) {
                            state.reconnects.fetch_add(1, Ordering::Relaxed);
                            tracing::info!("reconnected to NATS at {url}");
                        }
                    }
                    Event::Disconnected => {
                        state.connected.store(false, Ordering::Relaxed);
                        state.lost.store(true, Ordering::Relaxed);
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
        }))
}

fn is_tls_alert(error: &async_nats::ConnectError) -> bool {
    let text = error.to_string().to_ascii_lowercase();
    text.contains("fatal alert") || text.contains("invalid peer certificate") || text.contains("certificate")
}

/// Connects to NATS, reporting into `state`. An unreachable server is waited for (logged, retried
/// with backoff) so a service may start before nats-server; once connected, the client reconnects
/// by itself forever. Bad credentials or TLS fail at once with a clear error instead of a hang.
pub async fn connect(
    args: &NatsArgs,
    name: &str,
    state: &Arc<ConnectionState>,
    shutdown: &CancellationToken,
) -> Result<Client, ConnectError> {
    let mut delay = Duration::from_millis(100);
    let mut warned = false;
    loop {
        let attempt = options(args, name, state).await?.connect(args.url.as_str()).await;
        let error = match attempt {
            Ok(client) => {
                state.connected.store(true, Ordering::Relaxed);
                tracing::info!("connected to NATS at {}", args.url);
                return Ok(client);
            }
            Err(error) => error,
        };
        match error.kind() {
            ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Tls => {
                return Err(ConnectError::Refused { url: args.url.clone(), source: error });
            }
            // A TLS alert from the server (e.g. "certificate required") reaches us as an I/O
            // error; retrying cannot fix it, so it is refused like any other TLS failure.
            ConnectErrorKind::Io if is_tls_alert(&error) => {
                return Err(ConnectError::Refused { url: args.url.clone(), source: error });
            }
            _ => {
                if !warned {
                    tracing::warn!("waiting for NATS at {}: {error}", args.url);
                    warned = true;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Err(ConnectError::Cancelled(args.url.clone())),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// The server's max_payload, or NATS's default (1 MiB) while not yet connected.
pub fn max_payload(client: &Client) -> usize {
    match client.server_info().max_payload {
        0 => 1 << 20,
        n => n,
    }
}
