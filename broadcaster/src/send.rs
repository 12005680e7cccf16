//! Posting one message over HTTP(S), with the retry policy of a client that must never post
//! twice: retry what the target *told* us it did not take (429 after its `Retry-After`, 5xx with
//! exponential backoff) and connections that were never made; never retry a 4xx (logged with the
//! target's own error text) nor a request that may have reached the target (a timeout or a
//! connection lost after sending). [`decide`] is that policy as a pure function.
//!
//! HTTP is hyper 1's client over hyper-rustls (rustls with ring and the system's CA roots, the
//! TLS stack async-nats already uses); plain `http://` works too, for tests.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::target::Target;

/// The first backoff after a 5xx or a failed connection; it doubles per retry.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// The longest backoff.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The longest Retry-After we believe (a broken header must not park a message for a day).
const RETRY_AFTER_MAX: Duration = Duration::from_secs(3600);
/// How much of a target's error answer is read and logged.
const ERROR_TEXT_MAX: usize = 300;

/// The retry limits.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Longest time for the whole send, waits included.
    pub budget: Duration,
}

/// What one HTTP attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    /// The target answered.
    Status {
        /// HTTP status code.
        code: u16,
        /// For a 429: how long the target asked us to wait (header or JSON body).
        retry_after: Option<Duration>,
    },
    /// No connection was made: the request certainly did not reach the target.
    NotConnected,
    /// The request may have reached the target (timeout, connection lost after sending).
    Ambiguous,
}

/// Why a message was given up. Also the `reason` label of the failure metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// A 4xx other than 429 (or another non-2xx the target will not change its mind about).
    Rejected,
    /// 5xx until the retries or the time budget ran out.
    ServerError,
    /// 429 until the retries or the time budget ran out.
    RateLimited,
    /// No connection until the retries or the time budget ran out.
    Unreachable,
    /// The request may have been delivered; retrying could post it twice.
    Ambiguous,
}

impl FailReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            FailReason::Rejected => "rejected_4xx",
            FailReason::ServerError => "server_error_exhausted",
            FailReason::RateLimited => "rate_limited_exhausted",
            FailReason::Unreachable => "unreachable",
            FailReason::Ambiguous => "ambiguous",
        }
    }

    /// Every label, so the series exist from the start.
    pub const ALL: [FailReason; 5] = [
        FailReason::Rejected,
        FailReason::ServerError,
        FailReason::RateLimited,
        FailReason::Unreachable,
        FailReason::Ambiguous,
    ];
}

/// What to do after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Delivered.
    Done,
    /// Wait this long, then try again.
    Retry(Duration),
    /// Stop: the message is not delivered.
    GiveUp(FailReason),
}

/// The backoff before retry number `retry` (0-based): 500 ms doubling, at most 30 s.
pub fn backoff(retry: u32) -> Duration {
    BACKOFF_BASE.saturating_mul(1u32 << retry.min(16)).min(BACKOFF_MAX)
}

/// The policy: after `attempt`, with `retries` retries already made and `elapsed` spent, what next.
pub fn decide(attempt: &Attempt, retries: u32, elapsed: Duration, policy: &Policy) -> Decision {
    let (wait, reason) = match attempt {
        Attempt::Status { code: 200..=299, .. } => return Decision::Done,
        Attempt::Status { code: 429, retry_after } => {
            (retry_after.unwrap_or_else(|| backoff(retries)).min(RETRY_AFTER_MAX), FailReason::RateLimited)
        }
        Attempt::Status { code: 500..=599, .. } => (backoff(retries), FailReason::ServerError),
        Attempt::Status { .. } => return Decision::GiveUp(FailReason::Rejected),
        Attempt::NotConnected => (backoff(retries), FailReason::Unreachable),
        Attempt::Ambiguous => return Decision::GiveUp(FailReason::Ambiguous),
    };
    if retries >= policy.max_retries || elapsed + wait > policy.budget {
        return Decision::GiveUp(reason);
    }
    Decision::Retry(wait)
}

/// How long a 429 asks us to wait: the `Retry-After` header in seconds, else the JSON body's
/// `retry_after` (Discord, seconds, may be fractional) or `parameters.retry_after` (Telegram).
pub fn retry_after(header: Option<&str>, body: &[u8]) -> Option<Duration> {
    let seconds = |s: f64| (s.is_finite() && s >= 0.0).then(|| Duration::from_secs_f64(s.min(1e6)));
    if let Some(secs) = header.and_then(|h| h.trim().parse::<f64>().ok()).and_then(seconds) {
        return Some(secs);
    }
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    json.get("parameters")
        .and_then(|p| p.get("retry_after"))
        .or_else(|| json.get("retry_after"))
        .and_then(serde_json::Value::as_f64)
        .and_then(seconds)
}

/// How a send ended, with what it took (for metrics).
#[derive(Debug)]
pub struct Report {
    /// Delivered, or why not and what the target said.
    pub outcome: Result<(), (FailReason, String)>,
    /// HTTP attempts made.
    pub attempts: u32,
    /// 429 answers received.
    pub rate_limited: u32,
}

/// Why the HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up TLS for the chat target: {0}")]
pub struct ClientError(String);

/// The HTTP client and the policy.
pub struct Sender {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    policy: Policy,
    request_timeout: Duration,
}

fn tls_config() -> Result<rustls::ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        tracing::debug!("skipping a CA certificate source: {error}");
    }
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        tracing::warn!("no CA certificates found on this system: https targets will fail (plain http works)");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl Sender {
    /// A client with the system's CA roots.
    pub fn new(policy: Policy, request_timeout: Duration) -> Result<Self, ClientError> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config()?)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(https);
        Ok(Sender { client, policy, request_timeout })
    }

    /// Posts `text` to `target`, retrying as [`decide`] says.
    pub async fn send(&self, target: &Target, text: &str) -> Report {
        let body = Bytes::from(target.body(text));
        let started = Instant::now();
        let mut report = Report { outcome: Ok(()), attempts: 0, rate_limited: 0 };
        let mut retries = 0;
        loop {
            report.attempts += 1;
            let (attempt, detail) = self.attempt(target, body.clone()).await;
            if matches!(attempt, Attempt::Status { code: 429, .. }) {
                report.rate_limited += 1;
            }
            match decide(&attempt, retries, started.elapsed(), &self.policy) {
                Decision::Done => return report,
                Decision::GiveUp(reason) => {
                    report.outcome = Err((reason, detail));
                    return report;
                }
                Decision::Retry(wait) => {
                    tracing::info!("{}: {detail}; retrying in {wait:?}", target.describe());
                    retries += 1;
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// One POST: what came of it, and a redacted, truncated description for logs.
    async fn attempt(&self, target: &Target, body: Bytes) -> (Attempt, String) {
        let request = match hyper::Request::post(target.endpoint())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, concat!("chunkmill-broadcaster/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(body))
        {
            Ok(request) => request,
            // The URL was checked at start-up; this cannot happen, and must not show the URL.
            Err(_) => return (Attempt::Ambiguous, "cannot build the request".to_string()),
        };
        let response = match tokio::time::timeout(self.request_timeout, self.client.request(request)).await {
            Err(_) => {
                return (
                    Attempt::Ambiguous,
                    format!("no answer within {:?} (not retried: it may have arrived)", self.request_timeout),
                )
            }
            Ok(Err(e)) if e.is_connect() => {
                return (Attempt::NotConnected, target.redact(&format!("cannot connect: {}", error_chain(&e))))
            }
            Ok(Err(e)) => {
                return (
                    Attempt::Ambiguous,
                    target.redact(&format!(
                        "request failed after it may have been sent (not retried): {}",
                        error_chain(&e)
                    )),
                )
            }
            Ok(Ok(response)) => response,
        };
        let code = response.status().as_u16();
        let header =
            response.headers().get(hyper::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_string);
        // Only what we log is read: a misbehaving target cannot make us buffer megabytes.
        let body = match tokio::time::timeout(self.request_timeout, Limited::new(response.into_body(), 4096).collect())
            .await
        {
            Ok(Ok(collected)) => collected.to_bytes(),
            _ => Bytes::new(),
        };
        let retry_after = if code == 429 { retry_after(header.as_deref(), &body) } else { None };
        let text = String::from_utf8_lossy(&body);
        let text = crate::target::truncate(text.trim(), ERROR_TEXT_MAX);
        let detail = target.redact(&format!("HTTP {code}: {text}"));
        (Attempt::Status { code, retry_after }, detail)
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text += &format!(": {cause}");
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy { max_retries: 3, budget: Duration::from_secs(60) };

    fn status(code: u16) -> Attempt {
        Attempt::Status { code, retry_after: None }
    }

    #[test]
    fn success_is_done_and_a_4xx_is_never_retried() {
        assert_eq!(decide(&status(200), 0, Duration::ZERO, &POLICY), Decision::Done);
        assert_eq!(decide(&status(204), 0, Duration::ZERO, &POLICY), Decision::Done);
        for code in [400, 401, 403, 404, 413] {
            assert_eq!(decide(&status(code), 0, Duration::ZERO, &POLICY), Decision::GiveUp(FailReason::Rejected));
        }
        assert_eq!(decide(&status(301), 0, Duration::ZERO, &POLICY), Decision::GiveUp(FailReason::Rejected));
    }

    #[test]
    fn a_429_waits_as_long_as_the_target_asks() {
        let limited = Attempt::Status { code: 429, retry_after: Some(Duration::from_secs(7)) };
        assert_eq!(decide(&limited, 0, Duration::ZERO, &POLICY), Decision::Retry(Duration::from_secs(7)));
        // Without Retry-After: the backoff.
        assert_eq!(decide(&status(429), 1, Duration::ZERO, &POLICY), Decision::Retry(Duration::from_secs(1)));
        // A wait past the budget gives up now instead of holding the message.
        assert_eq!(decide(&limited, 0, Duration::from_secs(55), &POLICY), Decision::GiveUp(FailReason::RateLimited));
        assert_eq!(decide(&limited, 3, Duration::ZERO, &POLICY), Decision::GiveUp(FailReason::RateLimited));
    }

    #[test]
    fn a_5xx_and_a_refused_connection_back_off_exponentially_up_to_the_limit() {
        assert_eq!(decide(&status(500), 0, Duration::ZERO, &POLICY), Decision::Retry(Duration::from_millis(500)));
        assert_eq!(decide(&status(503), 2, Duration::ZERO, &POLICY), Decision::Retry(Duration::from_secs(2)));
        assert_eq!(decide(&status(502), 3, Duration::ZERO, &POLICY), Decision::GiveUp(FailReason::ServerError));
        assert_eq!(decide(&Attempt::NotConnected, 1, Duration::ZERO, &POLICY), Decision::Retry(Duration::from_secs(1)));
        assert_eq!(
            decide(&Attempt::NotConnected, 3, Duration::ZERO, &POLICY),
            Decision::GiveUp(FailReason::Unreachable)
        );
        assert_eq!(backoff(10), Duration::from_secs(30));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn a_request_that_may_have_arrived_is_never_retried() {
        assert_eq!(decide(&Attempt::Ambiguous, 0, Duration::ZERO, &POLICY), Decision::GiveUp(FailReason::Ambiguous));
    }

    #[test]
    fn retry_after_comes_from_the_header_or_the_apis_json() {
        assert_eq!(retry_after(Some("3"), b""), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(Some(" 0 "), b""), Some(Duration::ZERO));
        let telegram = br#"{"ok":false,"error_code":429,"description":"Too Many Requests: retry after 5","parameters":{"retry_after":5}}"#;
        assert_eq!(retry_after(None, telegram), Some(Duration::from_secs(5)));
        let discord = br#"{"message":"You are being rate limited.","retry_after":1.5,"global":false}"#;
        assert_eq!(retry_after(None, discord), Some(Duration::from_millis(1500)));
        assert_eq!(retry_after(Some("Wed, 21 Oct 2026 07:28:00 GMT"), b"nope"), None);
        assert_eq!(retry_after(Some("-1"), b"{}"), None);
    }
}
