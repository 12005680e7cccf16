//! The NATS connection every service opens: named, reconnecting forever, and reporting its state
//! (connected, reconnects, slow-consumer events) to logs and to [`ConnectionState`], which the
//! readiness probe and metrics read. Connecting waits for an unreachable server but fails at once
//! on bad credentials or TLS.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, ConnectErrorKind, ConnectOptions, Event};
use tokio_util::sync::CancellationToken;

use crate::config::{NatsArgs, Secret};

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
    /// A password, token or seed file could not be read.
    #[error(transparent)]
    Secret(#[from] crate::config::SecretFileError),
    /// Shutdown was requested while waiting for NATS.
    #[error("stopped while waiting for NATS at {0}")]
    Cancelled(String),
    /// `NATS_URL` does not parse (its text is not shown: it may hold a password).
    #[error("NATS_URL (--nats-url): URL number {position} is not a NATS URL; write nats://HOST:PORT, nats://USER:PASSWORD@HOST:PORT or nats://TOKEN@HOST:PORT (its text is not shown: it may hold a password)")]
    Url {
        /// 1-based position in the comma-separated list.
        position: usize,
    },
}

/// `NATS_URL` split into what async-nats connects to and what may be printed. async-nats parses
/// `user:password@` in a URL but does not send it (0.51), so credentials in the URL are taken out
/// here and passed as options, the way other NATS clients read them: `USER:PASSWORD@` is a user
/// and password, a lone `TOKEN@` is a token.
#[derive(Clone)]
pub struct Endpoint {
    /// The server URLs without credentials.
    servers: Vec<async_nats::ServerAddr>,
    /// For logs and errors: the URLs with the user name at most.
    display: String,
    user: Option<(String, Secret)>,
    token: Option<Secret>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

/// Percent-decoding for the user-info part of a URL (`%40` is `@`).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let Some(byte) = text.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Endpoint {
    /// Parses comma-separated NATS URLs. The error never repeats a URL (it may hold a password).
    pub fn parse(urls: &str) -> Result<Self, ConnectError> {
        let mut servers = Vec::new();
        let mut shown = Vec::new();
        let (mut user, mut token) = (None, None);
        for (n, text) in urls.split(',').map(str::trim).filter(|t| !t.is_empty()).enumerate() {
            let with_scheme = if text.contains("://") { text.to_string() } else { format!("nats://{text}") };
            let addr: async_nats::ServerAddr =
                with_scheme.parse().map_err(|_| ConnectError::Url { position: n + 1 })?;
            let mut url = addr.clone().into_inner();
            match (addr.username(), addr.password()) {
                (Some(name), Some(password)) => {
                    user.get_or_insert_with(|| (percent_decode(name), Secret::new(percent_decode(password))));
                }
                (Some(secret), None) => {
                    token.get_or_insert_with(|| Secret::new(percent_decode(secret)));
                }
                _ => {}
            }
            let _ = url.set_password(None);
            let _ = url.set_username("");
            let bare: async_nats::ServerAddr =
                url.as_str().parse().map_err(|_| ConnectError::Url { position: n + 1 })?;
            let name = match (addr.username(), addr.password()) {
                (Some(name), Some(_)) => format!("{name}:<redacted>@"),
                (Some(_), None) => "<token>@".to_string(),
                _ => String::new(),
            };
            let host = if bare.host().contains(':') { format!("[{}]", bare.host()) } else { bare.host().to_string() };
            shown.push(format!("{}://{name}{host}:{}", bare.scheme(), bare.port()));
            servers.push(bare);
        }
        if servers.is_empty() {
            return Err(ConnectError::Url { position: 1 });
        }
        Ok(Endpoint { servers, display: shown.join(","), user, token })
    }
}

fn read_secret(setting: &'static str, path: &std::path::Path) -> Result<String, ConnectError> {
    Ok(Secret::from_file(path, setting)?.expose().to_string())
}

/// The user in `dir` (files `user` and `password`), if it holds one.
fn user_dir(dir: &std::path::Path) -> Result<Option<(String, String)>, ConnectError> {
    let (user, password) = (dir.join("user"), dir.join("password"));
    match (user.exists(), password.exists()) {
        (false, false) => Ok(None),
        (true, true) => Ok(Some((read_secret("NATS_USER_DIR", &user)?, read_secret("NATS_USER_DIR", &password)?))),
        (true, false) => Err(missing_in_dir(password)),
        (false, true) => Err(missing_in_dir(user)),
    }
}

fn missing_in_dir(path: std::path::PathBuf) -> ConnectError {
    ConnectError::File {
        what: "NATS_USER_DIR file (the directory needs both `user` and `password`)",
        path,
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    }
}

/// The inbox prefix of a service of `role` (`fetcher`, `mapper`, `saver`, `broadcaster`): its
/// replies arrive under `_INBOX_<role>.`, not NATS's shared `_INBOX.`, so that a server's
/// permissions can let each role read its own replies and no other role's
/// (deploy/nats/values.yaml, docs/PROTOCOL.md §2).
pub fn inbox_prefix(role: &str) -> String {
    format!("_INBOX_{role}")
}

async fn options(
    args: &NatsArgs,
    endpoint: &Endpoint,
    (role, name): (&str, &str),
    state: &Arc<ConnectionState>,
) -> Result<ConnectOptions, ConnectError> {
    let options = authenticated(args, endpoint).await?;
    let (state, url) = (state.clone(), endpoint.display.clone());
    Ok(options
        .name(name)
        .custom_inbox_prefix(inbox_prefix(role))
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        // async-nats counts the very first attempt as 1: no delay for it (it cost every start
        // 200 ms), then 100 ms doubling to 2 s.
        .reconnect_delay_callback(|attempts| match attempts {
            0 | 1 => Duration::ZERO,
            n => Duration::from_millis((100u64 << (n - 2).min(5)).min(2000)),
        })
        .event_callback(move |event| {
            let (state, url) = (state.clone(), url.clone());
            async move { on_event(&state, &url, event) }
        }))
}

/// Options with the credentials and TLS settings of `args` and `endpoint`: a credentials file,
/// then the URL's user or token, then the explicit settings, which override them.
async fn authenticated(args: &NatsArgs, endpoint: &Endpoint) -> Result<ConnectOptions, ConnectError> {
    let mut options = match &args.nats_creds_file {
        Some(path) => ConnectOptions::new().credentials_file(path).await.map_err(|source| ConnectError::File {
            what: "NATS credentials file",
            path: path.clone(),
            source,
        })?,
        None => ConnectOptions::new(),
    };
    if let Some((user, password)) = &endpoint.user {
        options = options.user_and_password(user.clone(), password.expose().to_string());
    }
    if let Some(token) = &endpoint.token {
        options = options.token(token.expose().to_string());
    }
    if let (None, Some(dir)) = (&args.nats_user, &args.nats_user_dir) {
        if let Some((user, password)) = user_dir(dir)? {
            options = options.user_and_password(user, password);
        }
    }
    if let Some(user) = &args.nats_user {
        let password =
            Secret::resolve(args.nats_password.as_ref(), args.nats_password_file.as_deref(), "NATS_PASSWORD_FILE")?;
        options = options.user_and_password(user.clone(), password.map(|p| p.expose().to_string()).unwrap_or_default());
    }
    if let Some(path) = &args.nats_token_file {
        options = options.token(read_secret("NATS_TOKEN_FILE", path)?);
    }
    if let Some(path) = &args.nats_nkey_file {
        options = options.nkey(read_secret("NATS_NKEY_FILE", path)?);
    }
    if let Some(ca) = &args.nats_tls_ca_file {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&args.nats_tls_cert_file, &args.nats_tls_key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone()).require_tls(true);
    }
    Ok(options)
}

/// Keeps `state` and the log in step with the connection to `url`.
fn on_event(state: &ConnectionState, url: &str, event: Event) {
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
        Event::Closed => state.connected.store(false, Ordering::Relaxed),
        other => tracing::warn!("NATS: {other}"),
    }
}

fn is_tls_alert(error: &async_nats::ConnectError) -> bool {
    let text = error.to_string().to_ascii_lowercase();
    text.contains("fatal alert") || text.contains("invalid peer certificate") || text.contains("certificate")
}

/// Connects to NATS, reporting into `state`. An unreachable server is waited for (logged, retried
/// with backoff) so a service may start before nats-server; once connected, the client reconnects
/// by itself forever. Bad credentials or TLS fail at once with a clear error instead of a hang.
/// `role` is the service's kind ([`inbox_prefix`]), `name` the connection's name.
pub async fn connect(
    args: &NatsArgs,
    role: &str,
    name: &str,
    state: &Arc<ConnectionState>,
    shutdown: &CancellationToken,
) -> Result<Client, ConnectError> {
    let endpoint = Endpoint::parse(&args.url)?;
    let url = endpoint.display.clone();
    let mut backoff = crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let attempt = options(args, &endpoint, (role, name), state).await?.connect(endpoint.servers.clone()).await;
        let error = match attempt {
            Ok(client) => {
                state.connected.store(true, Ordering::Relaxed);
                tracing::info!("connected to NATS at {url}");
                return Ok(client);
            }
            Err(error) => error,
        };
        match error.kind() {
            ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Tls => {
                return Err(ConnectError::Refused { url: url.clone(), source: error });
            }
            // A TLS alert from the server (e.g. "certificate required") reaches us as an I/O
            // error; retrying cannot fix it, so it is refused like any other TLS failure.
            ConnectErrorKind::Io if is_tls_alert(&error) => {
                return Err(ConnectError::Refused { url: url.clone(), source: error });
            }
            _ if backoff.first_failure() => tracing::warn!("waiting for NATS at {url}: {error}"),
            _ => {}
        }
        if !backoff.wait(shutdown).await {
            return Err(ConnectError::Cancelled(url.clone()));
        }
    }
}

/// The server's max_payload, or NATS's default (1 MiB) while not yet connected.
pub fn max_payload(client: &Client) -> usize {
    match client.server_info().max_payload {
        0 => 1 << 20,
        n => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_the_url_are_taken_out_and_never_shown() {
        let e = Endpoint::parse("nats://chunk:s3cr%40t@127.0.0.1:4223, nats://[::1]:4224").expect("parses");
        assert_eq!(e.user, Some(("chunk".to_string(), Secret::new("s3cr@t"))));
        assert_eq!(e.token, None);
        assert_eq!(e.to_string(), "nats://chunk:<redacted>@127.0.0.1:4223,nats://[::1]:4224");
        assert!(e.servers.iter().all(|s| !s.has_user_pass()), "{:?}", e.servers);
        assert!(!format!("{e:?}").contains("s3cr"));
        let t = Endpoint::parse("tls://tok-123@nats.example:4222").expect("parses");
        assert_eq!(t.token.as_ref().map(Secret::expose), Some("tok-123"));
        assert_eq!(t.to_string(), "tls://<token>@nats.example:4222");
        assert_eq!(Endpoint::parse("127.0.0.1:4222").expect("no scheme").to_string(), "nats://127.0.0.1:4222");
    }

    #[test]
    fn an_unparsable_url_is_refused_without_echoing_it() {
        let err = Endpoint::parse("nats://u:hunter2@[::1").unwrap_err().to_string();
        assert!(err.contains("URL number 1") && !err.contains("hunter2"), "{err}");
    }

    #[test]
    fn a_user_directory_gives_the_user_when_full_nothing_when_empty_and_an_error_when_half() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(user_dir(&dir.path().join("absent")).expect("absent").is_none());
        assert!(user_dir(dir.path()).expect("empty").is_none());
        std::fs::write(dir.path().join("user"), "saver\n").expect("user");
        let err = user_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("password") && err.contains("both"), "{err}");
        std::fs::write(dir.path().join("password"), "pw-123\n").expect("password");
        assert_eq!(user_dir(dir.path()).expect("full"), Some(("saver".into(), "pw-123".into())));
    }
}
