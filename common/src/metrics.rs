//! The metrics and health endpoint every service serves on one port (`--metrics-addr`):
//! `/metrics` (Prometheus text format), `/healthz` (the process is alive) and `/readyz` (connected
//! to NATS and able to work), and any pages a service adds ([`Pages`]: the fetcher's status page).
//! Also the metrics all services share: build info, malformed messages by subject, the NATS
//! connection's state, and the endpoint's own connections.
//!
//! The endpoint faces the network (it binds 0.0.0.0 by default), so it bounds what a client can
//! make it hold: at most [`MAX_CONNECTIONS`] connections at once (more are closed at once), a
//! request's headers within [`HEADER_READ_TIMEOUT`], and a failed accept (EMFILE, ENFILE) waits
//! and is logged rate-limited rather than spinning.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

use crate::nats::ConnectionState;

/// The version and commit this binary was built from.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Short git commit, or `unknown`.
pub const COMMIT: &str = env!("CHUNKMILL_GIT_COMMIT");
/// What every binary's `--version` prints after its name: `0.2.0 (commit 1a2b3c4d5e6f, protocol 2)`.
pub const LONG_VERSION: &str =
    concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("CHUNKMILL_GIT_COMMIT"), ", protocol 2)");

/// Metrics every service has, in the service's registry.
#[derive(Clone)]
pub struct CommonMetrics {
    /// The service's registry: add service metrics here.
    pub registry: Registry,
    malformed: IntCounterVec,
    connected: IntGauge,
    reconnects: IntCounter,
    slow_consumers: IntCounter,
    seen_reconnects: Arc<AtomicU64>,
    seen_slow: Arc<AtomicU64>,
    http: HttpMetrics,
}

/// The endpoint's own connections: how many are open, refused over [`MAX_CONNECTIONS`], and
/// accepts that failed (no file descriptor left).
#[derive(Clone)]
struct HttpMetrics {
    open: IntGauge,
    refused: IntCounter,
    accept_errors: IntCounter,
}

impl HttpMetrics {
    fn new(m: Maker<'_>) -> Self {
        HttpMetrics {
            open: m.int_gauge("chunkmill_http_connections", "Connections the metrics endpoint serves now"),
            refused: m.counter(
                "chunkmill_http_connections_refused_total",
                "Connections to the metrics endpoint closed at once because it already served its most",
            ),
            accept_errors: m.counter(
                "chunkmill_http_accept_errors_total",
                "Failed accepts on the metrics endpoint (out of file descriptors), each followed by a wait",
            ),
        }
    }
}

/// Registers a metric, panicking only on a programming error (a duplicate or invalid name),
/// which the unit tests catch.
pub fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    #[allow(clippy::expect_used)]
    registry.register(Box::new(metric.clone())).expect("metric names are unique and valid");
    metric
}

/// Makes a service's metrics and registers them in its registry. Names, help texts and buckets
/// are literals in the services' code, so an invalid one is a programming error that panics in
/// every service's metrics unit test, never at run time on what arrives.
#[derive(Clone, Copy)]
pub struct Maker<'a>(&'a Registry);

#[allow(clippy::expect_used)]
impl Maker<'_> {
    /// An integer counter.
    pub fn counter(&self, name: &str, help: &str) -> IntCounter {
        register(self.0, IntCounter::new(name, help).expect("valid metric"))
    }

    /// An integer counter with one label.
    pub fn counter_vec(&self, name: &str, help: &str, label: &str) -> IntCounterVec {
        register(self.0, IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric"))
    }

    /// A counter of seconds (or other fractions).
    pub fn float_counter(&self, name: &str, help: &str) -> prometheus::Counter {
        register(self.0, prometheus::Counter::new(name, help).expect("valid metric"))
    }

    /// An integer gauge.
    pub fn int_gauge(&self, name: &str, help: &str) -> IntGauge {
        register(self.0, IntGauge::new(name, help).expect("valid metric"))
    }

    /// An integer gauge with one label.
    pub fn int_gauge_vec(&self, name: &str, help: &str, label: &str) -> prometheus::IntGaugeVec {
        register(self.0, prometheus::IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric"))
    }

    /// A gauge of seconds or timestamps.
    pub fn gauge(&self, name: &str, help: &str) -> prometheus::Gauge {
        register(self.0, prometheus::Gauge::new(name, help).expect("valid metric"))
    }

    /// A histogram with `buckets`.
    pub fn histogram(&self, name: &str, help: &str, buckets: Vec<f64>) -> prometheus::Histogram {
        let opts = prometheus::HistogramOpts::new(name, help).buckets(buckets);
        register(self.0, prometheus::Histogram::with_opts(opts).expect("valid metric"))
    }

    /// A histogram with one label and `buckets`.
    pub fn histogram_vec(&self, name: &str, help: &str, label: &str, buckets: Vec<f64>) -> prometheus::HistogramVec {
        let opts = prometheus::HistogramOpts::new(name, help).buckets(buckets);
        register(self.0, prometheus::HistogramVec::new(opts, &[label]).expect("valid metric"))
    }
}

/// `count` buckets from `start`, each `factor` times the previous (constants in the services).
#[allow(clippy::expect_used)]
pub fn exponential_buckets(start: f64, factor: f64, count: usize) -> Vec<f64> {
    prometheus::exponential_buckets(start, factor, count).expect("valid buckets")
}

impl CommonMetrics {
    /// Makes and registers the service's own metrics in its registry.
    pub fn maker(&self) -> Maker<'_> {
        Maker(&self.registry)
    }

    /// A registry for `service` with the shared metrics and the process metrics.
    #[allow(clippy::expect_used)]
    pub fn new(service: &str) -> Self {
        let registry = Registry::new();
        let info = IntGauge::with_opts(
            Opts::new("chunkmill_build_info", "Build information; always 1")
                .const_label("service", service)
                .const_label("version", VERSION)
                .const_label("commit", COMMIT),
        )
        .expect("valid metric");
        register(&registry, info).set(1);
        let malformed = register(
            &registry,
            IntCounterVec::new(
                Opts::new("chunkmill_malformed_messages_total", "Messages ignored as malformed or unknown, by subject"),
                &["subject"],
            )
            .expect("valid metric"),
        );
        let connected = register(
            &registry,
            IntGauge::new("chunkmill_nats_connected", "1 while connected to NATS").expect("valid metric"),
        );
        let reconnects = register(
            &registry,
            IntCounter::new("chunkmill_nats_reconnects_total", "Reconnections to NATS after the first connection")
                .expect("valid metric"),
        );
        let slow_consumers = register(
            &registry,
            IntCounter::new(
                "chunkmill_nats_slow_consumer_events_total",
                "NATS slow-consumer events: messages dropped by the client",
            )
            .expect("valid metric"),
        );
        #[cfg(target_os = "linux")]
        {
            let _ = registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()));
        }
        let http = HttpMetrics::new(Maker(&registry));
        CommonMetrics {
            http,
            registry,
            malformed,
            connected,
            reconnects,
            slow_consumers,
            seen_reconnects: Arc::default(),
            seen_slow: Arc::default(),
        }
    }

    /// Makes the malformed-message series for `subjects` exist at 0, so dashboards show 0
    /// rather than "no data" until something malformed arrives.
    pub fn watch_subjects(&self, subjects: &[&str]) {
        for subject in subjects {
            self.malformed.with_label_values(&[subject]);
        }
    }

    /// Counts a malformed or unknown message on `subject`.
    pub fn malformed(&self, subject: &str) {
        self.malformed.with_label_values(&[subject]).inc();
    }

    /// Copies the connection's state into the metrics (called before each scrape).
    pub fn refresh(&self, connection: &ConnectionState) {
        self.connected.set(i64::from(connection.is_connected()));
        let reconnects = connection.reconnects();
        let before = self.seen_reconnects.swap(reconnects, Ordering::Relaxed);
        self.reconnects.inc_by(reconnects.saturating_sub(before));
        let slow = connection.slow_consumers();
        let before = self.seen_slow.swap(slow, Ordering::Relaxed);
        self.slow_consumers.inc_by(slow.saturating_sub(before));
    }
}

/// What the endpoint needs from its service.
#[derive(Clone)]
pub struct Endpoint {
    /// Metrics to serve.
    pub metrics: CommonMetrics,
    /// The NATS connection's state (readiness requires a connection).
    pub connection: Arc<ConnectionState>,
    /// The service's own readiness (e.g. "input scanned and subscribed").
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// The service's own pages, once it has set them ([`crate::service::Service::set_pages`]).
    pub pages: Arc<OnceLock<Arc<dyn Pages>>>,
}

/// A page a service serves next to /metrics.
pub struct Page {
    /// The HTTP status code.
    pub status: u16,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its body.
    pub body: std::borrow::Cow<'static, [u8]>,
}

/// The answer to a request for a page: `None` when the service has no page at that path.
pub type PageFuture = Pin<Box<dyn Future<Output = Page> + Send>>;

/// Pages a service adds to its endpoint (paths other than /metrics, /healthz and /readyz).
pub trait Pages: Send + Sync + 'static {
    /// The page at `path`, or `None` for "not found".
    fn page(&self, path: &str) -> Option<PageFuture>;
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {source}; choose another --metrics-addr (METRICS_ADDR), or 127.0.0.1:0 for any free port")]
pub struct ServeError {
    addr: String,
    source: std::io::Error,
}

/// Where a service serves its endpoint.
#[derive(Debug, Clone, Copy)]
pub enum MetricsAddr<'a> {
    /// Set by the user (`--metrics-addr`, `METRICS_ADDR`): an address in use is an error.
    Given(&'a str),
    /// The service's default port: when it is taken (a second replica on one host), any free port
    /// on the same interface, with a warning naming it.
    Default(&'a str),
}

impl<'a> MetricsAddr<'a> {
    /// `given` when the user set one, else the service's `default`.
    pub fn new(given: Option<&'a str>, default: &'a str) -> Self {
        given.map_or(MetricsAddr::Default(default), MetricsAddr::Given)
    }
}

/// Starts the endpoint for a service before it connects (so liveness holds while NATS is away):
/// returns the connection state to hand to [`crate::nats::connect`] and the readiness flag the
/// service raises once it can work.
pub async fn start(
    addr: MetricsAddr<'_>,
    metrics: &CommonMetrics,
    shutdown: &CancellationToken,
) -> Result<Endpoint, ServeError> {
    let endpoint = Endpoint {
        metrics: metrics.clone(),
        connection: Arc::new(ConnectionState::default()),
        ready: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        pages: Arc::new(OnceLock::new()),
    };
    serve_at(addr, endpoint.clone(), shutdown.child_token()).await?;
    Ok(endpoint)
}

/// [`serve`] at `addr`, falling back to a free port when the default one is taken.
pub async fn serve_at(
    addr: MetricsAddr<'_>,
    endpoint: Endpoint,
    shutdown: CancellationToken,
) -> Result<SocketAddr, ServeError> {
    let default = match addr {
        MetricsAddr::Given(addr) => return serve(addr, endpoint, shutdown).await,
        MetricsAddr::Default(default) => default,
    };
    match serve(default, endpoint.clone(), shutdown.clone()).await {
        Err(e) if e.source.kind() == std::io::ErrorKind::AddrInUse => {
            let any = default.parse::<SocketAddr>().map_or("0.0.0.0:0".to_string(), |mut a| {
                a.set_port(0);
                a.to_string()
            });
            let bound = serve(&any, endpoint, shutdown).await?;
            tracing::warn!(
                "the default metrics address {default} is taken (another replica on this host?): serving on \
                 {bound} instead; set METRICS_ADDR to choose one"
            );
            Ok(bound)
        }
        other => other,
    }
}

/// Most connections the endpoint serves at once. Far above what scrapers and a few status-page
/// tabs use; more are accepted and closed at once (and counted), so that a flood of connections
/// never holds more than this many file descriptors of the service (1 100 half-open connections
/// once took every descriptor of a fetcher, which then failed its chunk reads).
pub const MAX_CONNECTIONS: usize = 64;
/// How long a connection may take to send a request's headers (also between requests of a
/// kept-alive connection): a connection that sends nothing, or half a request, is closed then.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Accept errors (out of file descriptors: EMFILE, ENFILE) are logged once per this interval,
/// with a count of the others.
const ACCEPT_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Binds `addr` and serves the endpoint until `shutdown`; returns the bound address.
pub async fn serve(addr: &str, endpoint: Endpoint, shutdown: CancellationToken) -> Result<SocketAddr, ServeError> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError { addr: addr.to_string(), source })?;
    let local = listener.local_addr().map_err(|source| ServeError { addr: addr.to_string(), source })?;
    tracing::info!("serving /metrics, /healthz and /readyz on http://{local}");
    tokio::spawn(accept_loop(listener, Arc::new(endpoint), shutdown));
    Ok(local)
}

/// Accepts connections until `shutdown`: at most [`MAX_CONNECTIONS`] served at once (the rest
/// closed at once), each with [`HEADER_READ_TIMEOUT`]; a failed accept (no file descriptor
/// left) waits, doubling from 100 ms to 1 s, instead of spinning, and is logged rate-limited.
async fn accept_loop(listener: tokio::net::TcpListener, endpoint: Arc<Endpoint>, shutdown: CancellationToken) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    let mut warnings = crate::text::RateLimit::new(ACCEPT_WARN_INTERVAL);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff.reset();
                stream
            }
            Err(e) => {
                endpoint.metrics.http.accept_errors.inc();
                if let Some(held) = warnings.allow("accept", std::time::Instant::now()) {
                    let held = crate::text::held_back(held, ACCEPT_WARN_INTERVAL);
                    tracing::warn!("metrics endpoint: accept failed: {e}; waiting before the next accept{held}");
                }
                if !backoff.wait(&shutdown).await {
                    break;
                }
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            // Closed at once: a flood holds no more descriptors than the permits.
            endpoint.metrics.http.refused.inc();
            drop(stream);
            continue;
        };
        tokio::spawn(serve_connection(stream, Arc::clone(&endpoint), permit));
    }
}

/// Serves one connection (HTTP/1.1, keep-alive) while it holds its `permit`.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    endpoint: Arc<Endpoint>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    endpoint.metrics.http.open.inc();
    let service = hyper::service::service_fn(|request| {
        let endpoint = Arc::clone(&endpoint);
        async move { Ok::<_, Infallible>(respond(&endpoint, &request).await) }
    });
    let io = hyper_util::rt::TokioIo::new(stream);
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(io, service)
        .await;
    endpoint.metrics.http.open.dec();
    drop(permit);
}

async fn respond<B>(endpoint: &Endpoint, request: &Request<B>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    };
    match request.uri().path() {
        "/metrics" => {
            endpoint.metrics.refresh(&endpoint.connection);
            let mut body = Vec::new();
            let encoder = TextEncoder::new();
            match encoder.encode(&endpoint.metrics.registry.gather(), &mut body) {
                Ok(()) => {
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    if let Ok(value) = encoder.format_type().parse() {
                        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
                    }
                    response
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode metrics: {e}\n")),
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let connected = endpoint.connection.is_connected();
            let ready = endpoint.ready.load(Ordering::Relaxed);
            match (connected, ready) {
                (true, true) => text(StatusCode::OK, "ready\n".into()),
                (false, _) => text(StatusCode::SERVICE_UNAVAILABLE, "not connected to NATS\n".into()),
                (true, false) => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n".into()),
            }
        }
        path => match endpoint.pages.get().and_then(|pages| pages.page(path)) {
            Some(page) => {
                let page = page.await;
                let body = match page.body {
                    std::borrow::Cow::Borrowed(b) => Bytes::from_static(b),
                    std::borrow::Cow::Owned(b) => Bytes::from(b),
                };
                let mut response = Response::new(Full::new(body));
                *response.status_mut() = StatusCode::from_u16(page.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                response
                    .headers_mut()
                    .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(page.content_type));
                response
            }
            None => text(StatusCode::NOT_FOUND, "not found: try /metrics, /healthz or /readyz\n".into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_metrics_render_as_prometheus_text() {
        let metrics = CommonMetrics::new("test");
        metrics.malformed("chunkmill.work");
        let mut body = Vec::new();
        TextEncoder::new().encode(&metrics.registry.gather(), &mut body).expect("encodes");
        let text = String::from_utf8(body).expect("utf-8");
        assert!(text.contains("chunkmill_malformed_messages_total{subject=\"chunkmill.work\"} 1"), "{text}");
        assert!(text.contains("chunkmill_build_info{"), "{text}");
        assert!(text.contains("chunkmill_nats_connected 0"), "{text}");
    }

    fn endpoint() -> Endpoint {
        Endpoint {
            metrics: CommonMetrics::new("test"),
            connection: Arc::default(),
            ready: Arc::default(),
            pages: Arc::default(),
        }
    }

    #[tokio::test]
    async fn a_flood_of_connections_is_bounded_and_a_silent_one_is_closed_after_the_header_timeout() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let shutdown = CancellationToken::new();
        let served = endpoint();
        let metrics = served.metrics.clone();
        let bound = serve("127.0.0.1:0", served, shutdown.clone()).await.expect("serves");
        let mut silent = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            silent.push(tokio::net::TcpStream::connect(bound).await.expect("connects"));
        }
        while metrics.http.open.get() < MAX_CONNECTIONS as i64 {
            tokio::task::yield_now().await;
        }
        // One more: accepted and closed at once (not by the header timeout), and counted.
        let started = std::time::Instant::now();
        let mut extra = tokio::net::TcpStream::connect(bound).await.expect("connects");
        let mut answer = Vec::new();
        let _ = extra.read_to_end(&mut answer).await;
        assert!(answer.is_empty() && started.elapsed() < HEADER_READ_TIMEOUT, "{answer:?}");
        assert_eq!(metrics.http.refused.get(), 1);
        // The silent ones are closed once the header timeout passed, and their places are free.
        let mut first = silent.swap_remove(0);
        let _ = first.read_to_end(&mut answer).await;
        assert!(started.elapsed() >= HEADER_READ_TIMEOUT - Duration::from_millis(100), "{:?}", started.elapsed());
        while metrics.http.open.get() > 0 {
            tokio::task::yield_now().await;
        }
        let mut stream = tokio::net::TcpStream::connect(bound).await.expect("connects");
        stream.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await.expect("sends");
        let mut health = String::new();
        stream.read_to_string(&mut health).await.expect("answers");
        assert_eq!(health.split(' ').nth(1), Some("200"), "{health}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_taken_default_port_falls_back_to_a_free_one_and_a_taken_given_port_fails() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        let taken = held.local_addr().expect("bound").to_string();
        let shutdown = CancellationToken::new();

        let bound = serve_at(MetricsAddr::Default(&taken), endpoint(), shutdown.clone()).await.expect("falls back");
        assert_ne!(bound.to_string(), taken);
        assert_eq!(bound.ip(), held.local_addr().expect("bound").ip(), "same interface as the default");
        let mut stream = tokio::net::TcpStream::connect(bound).await.expect("the fallback port accepts");
        tokio::io::AsyncWriteExt::write_all(&mut stream, b"GET /healthz HTTP/1.0\r\n\r\n").await.expect("sends");
        let mut answer = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut answer).await.expect("answers");
        assert_eq!(answer.split(' ').nth(1), Some("200"), "the fallback port serves /healthz: {answer}");

        let error = serve_at(MetricsAddr::Given(&taken), endpoint(), shutdown.clone()).await.expect_err("given: fails");
        assert!(error.to_string().contains(&taken), "{error}");
        shutdown.cancel();
    }
}
