//! The object stores underneath a remote [`crate::Source`]: building an `object_store` client for
//! S3, GCS, Azure or plain HTTP from an [`Env`], with bounded retries ([`RetryPolicy`]) and a thin
//! HTTP layer that counts every transient failure ([`Stats`]) and remembers, per operation, how
//! its last HTTP exchange ended, so that a failure can be told apart (missing, denied, store
//! unreachable) without reading error text.
//!
//! TLS is rustls with ring's crypto provider, installed once per process before the first client
//! is built (the same provider async-nats uses, so no second crypto library is compiled).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Once};
use std::time::Duration;

use http_body_util::BodyExt;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpResponseBody, HttpService,
    ReqwestConnector,
};
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use crate::env::Env;
use crate::error::SourceError;
use crate::location::StoreKind;
use crate::metrics::{FailureKind, Stats};

/// How transient store failures are retried: exponential backoff with jitter, bounded in time
/// (`object_store`'s retry loop, configured from this). The count is only a backstop: the
/// backoff is jittered between `initial_backoff` and twice the last one, so ten retries can all
/// land in about two seconds, too short to ride out a store restart.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries of one request at most: a backstop far above what `retry_timeout` allows.
    pub max_retries: usize,
    /// The first backoff.
    pub initial_backoff: Duration,
    /// The longest backoff.
    pub max_backoff: Duration,
    /// No retry starts later than this after the first attempt.
    pub retry_timeout: Duration,
    /// Giving up on a connection attempt.
    pub connect_timeout: Duration,
    /// Giving up on a response that sends nothing for this long (there is no limit on a whole
    /// response, so that a large object can stream for as long as it takes).
    pub read_timeout: Duration,
}

impl Default for RetryPolicy {
    /// Retries from 100 ms up to 5 s apart for 60 s: a store restart or a short network cut is
    /// ridden out; a store that is really down is reported in about a minute.
    fn default() -> Self {
        RetryPolicy {
            max_retries: 1000,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            retry_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    fn retry_config(&self) -> RetryConfig {
        RetryConfig {
            backoff: BackoffConfig { init_backoff: self.initial_backoff, max_backoff: self.max_backoff, base: 2.0 },
            max_retries: self.max_retries,
            retry_timeout: self.retry_timeout,
        }
    }

    fn client_options(&self) -> ClientOptions {
        ClientOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_timeout_disabled()
            .with_read_timeout(self.read_timeout)
    }
}

/// What the store is, for messages and hints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RemoteKind {
    Store(StoreKind),
    Http,
}

impl RemoteKind {
    /// The settings to fix when access is refused.
    fn credentials_fix(self) -> &'static str {
        match self {
            RemoteKind::Store(StoreKind::S3) => {
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_ACCESS_KEY_ID_FILE / AWS_SECRET_ACCESS_KEY_FILE), \
                 AWS_SESSION_TOKEN for temporary keys, or on Kubernetes a service-account role (AWS_ROLE_ARN + \
                 AWS_WEB_IDENTITY_TOKEN_FILE); check AWS_REGION and AWS_ENDPOINT_URL, and that the policy allows \
                 s3:GetObject and s3:ListBucket on the bucket"
            }
            RemoteKind::Store(StoreKind::Gcs) => {
                "set GOOGLE_SERVICE_ACCOUNT (a key file's path), GOOGLE_SERVICE_ACCOUNT_KEY (or its _FILE) or \
                 GOOGLE_APPLICATION_CREDENTIALS, or use workload identity; the account needs storage.objects.get \
                 and storage.objects.list on the bucket"
            }
            RemoteKind::Store(StoreKind::Azure) => {
                "set AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY (or its _FILE), or AZURE_STORAGE_SAS_KEY, \
                 or AZURE_CLIENT_ID + AZURE_CLIENT_SECRET + AZURE_TENANT_ID, or a workload identity \
                 (AZURE_FEDERATED_TOKEN_FILE); the identity needs read access to the container"
            }
            RemoteKind::Http => "the server refused the request: the URL must be readable without credentials",
        }
    }

    /// The settings that say where a bucket is looked for.
    fn location_settings(self) -> &'static str {
        match self {
            RemoteKind::Store(StoreKind::S3) => "the region or endpoint it is in (AWS_REGION, AWS_ENDPOINT_URL)",
            RemoteKind::Store(StoreKind::Gcs) => "the endpoint (GOOGLE_BASE_URL, for an emulator)",
            RemoteKind::Store(StoreKind::Azure) => {
                "the storage account it is in (AZURE_STORAGE_ACCOUNT_NAME, AZURE_STORAGE_ENDPOINT)"
            }
            RemoteKind::Http => "the URL",
        }
    }

    /// What to check when the store cannot be reached.
    fn unreachable_fix(self) -> &'static str {
        match self {
            RemoteKind::Store(StoreKind::S3) => {
                "check the network and AWS_ENDPOINT_URL / AWS_REGION (and AWS_ALLOW_HTTP=true for a plain-http endpoint)"
            }
            RemoteKind::Store(StoreKind::Gcs) => "check the network (and GOOGLE_BASE_URL for an emulator)",
            RemoteKind::Store(StoreKind::Azure) => {
                "check the network and AZURE_STORAGE_ACCOUNT_NAME (and AZURE_STORAGE_ENDPOINT for an emulator)"
            }
            RemoteKind::Http => "check the URL and that the server is up",
        }
    }
}

/// How the last HTTP exchange of an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Status(u16),
    Transport(FailureKind),
}

impl Outcome {
    fn is_transient(self) -> bool {
        match self {
            Outcome::Transport(_) => true,
            Outcome::Status(status) => status >= 500 || status == 429 || status == 408,
        }
    }
}

tokio::task_local! {
    static LAST_OUTCOME: Cell<Option<Outcome>>;
}

fn record(outcome: Outcome) {
    let _ = LAST_OUTCOME.try_with(|cell| cell.set(Some(outcome)));
}

/// Runs `operation` remembering how its last HTTP exchange ended.
pub(crate) async fn traced<T>(operation: impl Future<Output = T>) -> (T, Option<Outcome>) {
    LAST_OUTCOME
        .scope(Cell::new(None), async {
            let result = operation.await;
            (result, LAST_OUTCOME.with(Cell::get))
        })
        .await
}

/// Wraps the reqwest client to count transient failures and record outcomes.
#[derive(Debug)]
struct CountingConnector {
    stats: Arc<Stats>,
}

impl HttpConnector for CountingConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(CountingService { inner, stats: Arc::clone(&self.stats) }))
    }
}

#[derive(Debug)]
struct CountingService {
    inner: HttpClient,
    stats: Arc<Stats>,
}

fn transport_kind(kind: HttpErrorKind) -> FailureKind {
    match kind {
        HttpErrorKind::Connect | HttpErrorKind::Request => FailureKind::Connect,
        HttpErrorKind::Timeout => FailureKind::Timeout,
        HttpErrorKind::Interrupted => FailureKind::Interrupted,
        _ => FailureKind::Body,
    }
}

impl HttpService for CountingService {
    fn call<'life0, 'async_trait>(
        &'life0 self,
        req: HttpRequest,
    ) -> Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            match self.inner.execute(req).await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    record(Outcome::Status(status));
                    if status >= 500 {
                        self.stats.failure(FailureKind::Server);
                    } else if status == 429 || status == 408 {
                        self.stats.failure(FailureKind::Throttled);
                    }
                    let stats = Arc::clone(&self.stats);
                    let (parts, body) = response.into_parts();
                    let body = body.map_err(move |e| {
                        stats.failure(FailureKind::Body);
                        record(Outcome::Transport(FailureKind::Body));
                        e
                    });
                    Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)))
                }
                Err(e) => {
                    let kind = transport_kind(e.kind());
                    self.stats.failure(kind);
                    record(Outcome::Transport(kind));
                    Err(e)
                }
            }
        })
    }
}

fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    // Err means a provider is installed already (by us or the host program): use that one.
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A connected store and what is needed to explain its failures.
#[derive(Debug, Clone)]
pub(crate) struct Remote {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) kind: RemoteKind,
    pub(crate) stats: Arc<Stats>,
}

fn config_error(store: &str, e: impl std::fmt::Display, fix: &str) -> SourceError {
    SourceError::Config { setting: format!("{store} settings"), problem: format!("{e}; {fix}") }
}

impl Remote {
    /// A client for `bucket` in `kind`, configured from `env` (after resolving `*_FILE`s).
    pub(crate) fn store(
        kind: StoreKind,
        bucket: &str,
        env: &Env,
        policy: &RetryPolicy,
        stats: Arc<Stats>,
    ) -> Result<Remote, SourceError> {
        install_crypto_provider();
        let env = env.resolve_files()?;
        let connector = CountingConnector { stats: Arc::clone(&stats) };
        let fix = RemoteKind::Store(kind).credentials_fix();
        let store: Arc<dyn ObjectStore> = match kind {
            StoreKind::S3 => {
                let mut builder = object_store::aws::AmazonS3Builder::new()
                    .with_client_options(policy.client_options())
                    .with_retry(policy.retry_config());
                for (name, value) in env.with_prefix("AWS_") {
                    if let Ok(key) = name.to_ascii_lowercase().parse() {
                        builder = builder.with_config(key, value);
                    }
                }
                let builder = builder.with_bucket_name(bucket).with_http_connector(connector);
                Arc::new(builder.build().map_err(|e| config_error("S3", e, fix))?)
            }
            StoreKind::Gcs => {
                // GCS's builder allows http by default (for emulators); keep that.
                let mut builder = object_store::gcp::GoogleCloudStorageBuilder::new()
                    .with_client_options(policy.client_options().with_allow_http(true))
                    .with_retry(policy.retry_config());
                for (name, value) in env.with_prefix("GOOGLE_") {
                    if let Ok(key) = name.to_ascii_lowercase().parse() {
                        builder = builder.with_config(key, value);
                    }
                }
                if let Some(path) = env.get("SERVICE_ACCOUNT") {
                    builder = builder.with_service_account_path(path);
                }
                let builder = builder.with_bucket_name(bucket).with_http_connector(connector);
                Arc::new(builder.build().map_err(|e| config_error("GCS", e, fix))?)
            }
            StoreKind::Azure => {
                let mut builder = object_store::azure::MicrosoftAzureBuilder::new()
                    .with_client_options(policy.client_options())
                    .with_retry(policy.retry_config());
                for (name, value) in env.with_prefix("AZURE_") {
                    if let Ok(key) = name.to_ascii_lowercase().parse() {
                        builder = builder.with_config(key, value);
                    }
                }
                if let Some(endpoint) = env.get("IDENTITY_ENDPOINT") {
                    builder = builder.with_msi_endpoint(endpoint);
                }
                let builder = builder.with_container_name(bucket).with_http_connector(connector);
                Arc::new(builder.build().map_err(|e| config_error("Azure", e, fix))?)
            }
        };
        Ok(Remote { store, kind: RemoteKind::Store(kind), stats })
    }

    /// A client for the server at `base` (`scheme://host[:port]`).
    pub(crate) fn http(base: &str, policy: &RetryPolicy, stats: Arc<Stats>) -> Result<Remote, SourceError> {
        install_crypto_provider();
        let options = policy.client_options().with_allow_http(base.starts_with("http://"));
        let store = object_store::http::HttpBuilder::new()
            .with_url(base)
            .with_client_options(options)
            .with_retry(policy.retry_config())
            .with_http_connector(CountingConnector { stats: Arc::clone(&stats) })
            .build()
            .map_err(|e| config_error("HTTP", e, "check the URL"))?;
        Ok(Remote { store: Arc::new(store), kind: RemoteKind::Http, stats })
    }

    /// Runs a store operation on `object`, turning its failure into a [`SourceError`].
    /// `listing` says whether it lists (a 404 then means the bucket is missing).
    pub(crate) async fn run<T>(
        &self,
        object: &str,
        listing: bool,
        operation: impl Future<Output = object_store::Result<T>>,
    ) -> Result<T, SourceError> {
        let (result, outcome) = traced(operation).await;
        result.map_err(|error| self.classify(object, listing, error, outcome))
    }

    /// Explains a store error on `object`, given how its last HTTP exchange ended.
    pub(crate) fn classify(
        &self,
        object: &str,
        listing: bool,
        error: object_store::Error,
        outcome: Option<Outcome>,
    ) -> SourceError {
        use object_store::Error as E;
        let object = object.to_string();
        let status = match outcome {
            Some(Outcome::Status(status)) => Some(status),
            _ => None,
        };
        let not_found = |source| SourceError::NotFound {
            fix: if listing {
                format!(
                    "the bucket does not exist: check the bucket name in --input, and {}",
                    self.kind.location_settings()
                )
            } else {
                "check the bucket and key in --input (names are case-sensitive)".into()
            },
            object: object.clone(),
            source,
        };
        match error {
            E::NotFound { source, .. } => not_found(source),
            E::Precondition { .. } => SourceError::Changed { object, detail: "its ETag no longer matches".into() },
            E::PermissionDenied { source, .. } | E::Unauthenticated { source, .. } => {
                SourceError::Denied { object, fix: self.kind.credentials_fix().into(), source }
            }
            error => match status {
                Some(404) => not_found(Box::new(error)),
                Some(401 | 403) => {
                    SourceError::Denied { object, fix: self.kind.credentials_fix().into(), source: Box::new(error) }
                }
                _ if outcome.is_some_and(Outcome::is_transient) => {
                    self.stats.give_up();
                    SourceError::Unavailable {
                        object,
                        fix: self.kind.unreachable_fix().into(),
                        source: Box::new(error),
                    }
                }
                _ => SourceError::Store { object, source: Box::new(error) },
            },
        }
    }
}

/// A client of one bucket (container), for writing as well as reading: what the object-store
/// sink of the saver uses, with the same credential environment, `*_FILE` secrets, retries and
/// error explanations as inputs.
#[derive(Debug, Clone)]
pub struct StoreClient {
    remote: Remote,
}

impl StoreClient {
    /// A client for `bucket` in `kind`, configured from `env` (secrets from `*_FILE`s too). Makes
    /// no request: a wrong key or a missing bucket shows at the first one.
    pub fn connect(kind: StoreKind, bucket: &str, env: &Env, policy: &RetryPolicy) -> Result<Self, SourceError> {
        Ok(StoreClient { remote: Remote::store(kind, bucket, env, policy, Arc::new(Stats::default()))? })
    }

    /// The `object_store` client.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.remote.store
    }

    /// Transient failures retried so far, by kind (each also counted by [`Stats`]).
    pub fn stats(&self) -> &Arc<Stats> {
        &self.remote.stats
    }

    /// Runs an operation on `object`, turning its failure into a [`SourceError`] that says
    /// whether the object or bucket is missing (`listing`: a listing's 404 is the bucket), the
    /// credentials are refused, or the store is unreachable, with the settings to check.
    pub async fn run<T>(
        &self,
        object: &str,
        listing: bool,
        operation: impl Future<Output = object_store::Result<T>>,
    ) -> Result<T, SourceError> {
        self.remote.run(object, listing, operation).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_last_outcome_of_an_operation_is_remembered() {
        let ((), outcome) = traced(async {
            record(Outcome::Transport(FailureKind::Connect));
            record(Outcome::Status(503));
        })
        .await;
        assert_eq!(outcome, Some(Outcome::Status(503)));
        assert!(Outcome::Status(503).is_transient() && !Outcome::Status(404).is_transient());
        let ((), outcome) = traced(async {}).await;
        assert_eq!(outcome, None);
    }

    #[test]
    fn stores_build_without_network_from_their_environment() {
        let stats = Arc::new(Stats::default());
        let env = Env::empty().with("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE").with("AWS_SECRET_ACCESS_KEY", "secret-value");
        Remote::store(StoreKind::S3, "bucket", &env, &RetryPolicy::default(), Arc::clone(&stats)).expect("s3");
        let env = Env::empty().with("AZURE_STORAGE_ACCOUNT_NAME", "account").with("AZURE_STORAGE_ACCOUNT_KEY", "a2V5");
        Remote::store(StoreKind::Azure, "container", &env, &RetryPolicy::default(), Arc::clone(&stats)).expect("azure");
        Remote::http("https://example.com", &RetryPolicy::default(), stats).expect("http");
    }

    #[test]
    fn a_half_given_key_pair_names_the_settings_but_not_the_secret() {
        let env = Env::empty().with("AWS_SECRET_ACCESS_KEY", "secret-value");
        let error = Remote::store(StoreKind::S3, "bucket", &env, &RetryPolicy::default(), Arc::new(Stats::default()))
            .expect_err("a secret without a key id");
        let text = error.to_string();
        assert!(text.contains("AWS_ACCESS_KEY_ID") && !text.contains("secret-value"), "{text}");
    }
}
