//! The broadcaster: takes the fetcher's pipeline events ([`common::events`]) from a JetStream
//! stream and posts each as a chat message ([`message`]) to one target ([`target`]): a generic
//! webhook, Slack, Discord or Telegram. Any number of replicas share one durable pull consumer,
//! and each event is sent **at most once** across all of them:
//!
//! 1. a replica pulls one event at a time (a replica that dies holds at most one);
//! 2. before sending it *claims* the event: an atomic create of the event's key in a JetStream
//!    key-value bucket, which succeeds for exactly one caller, ever;
//! 3. only the replica whose create succeeded sends; everyone else (a redelivery, a repeat of the
//!    same fact, a create whose outcome is unknown) acknowledges or leaves it without sending.
//!
//! A replica that dies between claiming and sending loses that event: a missed message, never a
//! duplicate. ARCHITECTURE.md ("The broadcaster") has the whole argument and the list of misses.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod config;
pub mod message;
pub mod metrics;
pub mod send;
pub mod target;

use std::future::Future;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::kv::CreateErrorKind;
use async_nats::jetstream::stream::StorageType;
use async_nats::jetstream::{self, AckKind};
use common::service::Service;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

pub use config::Config;
use metrics::BroadcasterMetrics;
use send::{Policy, Sender};
use target::Target;

/// How long one pull waits for an event before asking again.
const FETCH_WAIT: Duration = Duration::from_secs(5);
/// How long a claim may take before it counts as failed (and the event is left to redelivery).
const CLAIM_TIMEOUT: Duration = Duration::from_secs(5);
/// After SIGTERM, how long a message being sent may still take.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// Deliveries of one event before JetStream gives up on it.
const MAX_DELIVER: i64 = 5;
/// The stream's duplicate window: a publish repeated within it (same `Nats-Msg-Id`) is dropped.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long set-up (stream, consumer, bucket) is retried before giving up.
const SETUP_DEADLINE: Duration = Duration::from_secs(60);

/// Why the broadcaster stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum BroadcasterError {
    /// A setting is missing or wrong.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The metrics endpoint or the NATS connection could not start.
    #[error(transparent)]
    Start(#[from] common::service::StartError),
    /// The HTTP client could not be built.
    #[error(transparent)]
    Client(#[from] send::ClientError),
    /// JetStream cannot keep as many copies as `--jetstream-replicas` asks for.
    #[error("JetStream {what} {name}: cannot keep {replicas} copies: {why}. Set --jetstream-replicas (BROADCASTER_JETSTREAM_REPLICAS) to at most the number of JetStream servers in the NATS cluster (1 for a single server)")]
    Replicas {
        /// stream or key-value bucket.
        what: &'static str,
        /// Its name.
        name: String,
        /// The copies asked for.
        replicas: usize,
        /// Why the server refused them.
        why: String,
        /// Retrying cannot help (the server is not clustered).
        permanent: bool,
    },
    /// The stream, consumer or bucket could not be set up.
    #[error("cannot set up the JetStream {what} {name}: {error}; the broadcaster needs JetStream (nats-server -js; deploy/nats/values.yaml enables it)")]
    Setup {
        /// stream, consumer or key-value bucket.
        what: &'static str,
        /// Its name.
        name: String,
        /// Why.
        error: String,
    },
}

/// The key of an event's claim in the bucket: the id itself when it is a valid key (readable in
/// `nats kv ls`), else `sha256.<hex>` of it. Two different ids never share a key (an id that
/// itself starts with `sha256.` is hashed too).
pub fn dedup_key(id: &str) -> String {
    let valid = !id.is_empty()
        && id.len() <= 256
        && !id.starts_with('.')
        && !id.ends_with('.')
        && !id.contains("..")
        && !id.starts_with("sha256.")
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'=' | b'.'));
    if valid {
        return id.to_string();
    }
    let digest = Sha256::digest(id.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256.{hex}")
}

/// Runs the broadcaster until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), BroadcasterError> {
    // Settings first: a missing secret fails before anything connects.
    let target = config.target()?;
    let sender =
        Sender::new(Policy { max_retries: config.max_retries, budget: config.send_timeout }, config.request_timeout)?;
    let metrics = BroadcasterMetrics::new();
    let service = Service::start(
        "broadcaster",
        &config.nats,
        common::metrics::MetricsAddr::new(config.metrics_addr.as_deref(), config::DEFAULT_METRICS_ADDR),
        &metrics.common,
        &shutdown,
    )
    .await?;
    let client = service.connect(&config.nats, &shutdown).await?;
    // Kept to the end of the run: dropping it would leave the NATS service API.
    let _micro = service.register(&client, &config.nats.subject_prefix, &shutdown).await;
    let instance = service.name.clone();
    let js = jetstream::new(client);
    let Some((consumer, kv)) = set_up_until(&js, &config, &shutdown).await? else {
        return Ok(());
    };
    let wildcard = common::events::events_wildcard(&config.nats.subject_prefix);
    metrics.common.watch_subjects(&[&wildcard]);
    tracing::info!(
        "broadcasting events from stream {} (consumer {}, claims in bucket {}) to {}",
        config.stream,
        config.consumer,
        config.dedup_bucket,
        target.describe()
    );
    service.set_ready();
    let worker = Worker {
        kv,
        sender,
        target,
        metrics,
        instance,
        progress_every: (config.ack_wait / 3).max(Duration::from_millis(100)),
    };
    worker.serve(&consumer, &shutdown).await;
    tracing::info!("broadcaster stopped");
    Ok(())
}

/// Sets up the stream, the consumer and the bucket, retrying while JetStream is not there yet
/// (a server just started, a cluster electing a leader); None if shutdown came first.
async fn set_up_until(
    js: &jetstream::Context,
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<Option<(PullConsumer, jetstream::kv::Store)>, BroadcasterError> {
    let deadline = Instant::now() + SETUP_DEADLINE;
    let mut backoff = common::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let delay = backoff.next_delay();
        match set_up(js, config).await {
            Ok(done) => return Ok(Some(done)),
            Err(e @ BroadcasterError::Replicas { permanent: true, .. }) => return Err(e),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(e) => tracing::warn!("{e}; retrying in {delay:?}"),
        }
        if !common::backoff::sleep_unless(delay, shutdown).await {
            return Ok(None);
        }
    }
}

/// The events stream with the replicas' durable consumer, and the bucket of claims, created or
/// brought to the configured settings.
async fn set_up(
    js: &jetstream::Context,
    config: &Config,
) -> Result<(PullConsumer, jetstream::kv::Store), BroadcasterError> {
    let replicas = config.jetstream_replicas;
    let stream_error = setup_error("stream", &config.stream, replicas);
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: config.stream.clone(),
            subjects: vec![common::events::events_wildcard(&config.nats.subject_prefix)],
            max_age: config.retention,
            storage: StorageType::File,
            duplicate_window: DUPLICATE_WINDOW,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| stream_error(&e))?;
    set_replicas(js, stream.cached_info().config.clone(), replicas).await.map_err(|e| stream_error(&e))?;
    // Create-or-update: every replica asks for the same settings, and a changed setting (a new
    // ack wait) applies on the next rollout.
    let consumer = stream
        .create_consumer(PullConfig {
            durable_name: Some(config.consumer.clone()),
            description: Some("chunkmill broadcaster replicas; events go out at most once".into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            max_deliver: MAX_DELIVER,
            max_ack_pending: config.max_in_flight,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| setup_error("consumer", &config.consumer, replicas)(&e))?;
    Ok((consumer, claims_bucket(js, config).await?))
}

/// The key-value bucket of claims (one key per event ever claimed), created or brought to the
/// configured replicas.
async fn claims_bucket(js: &jetstream::Context, config: &Config) -> Result<jetstream::kv::Store, BroadcasterError> {
    let replicas = config.jetstream_replicas;
    let error = setup_error("key-value bucket", &config.dedup_bucket, replicas);
    match js.get_key_value(&config.dedup_bucket).await {
        Ok(kv) => {
            let status = kv.status().await.map_err(|e| error(&e))?;
            set_replicas(js, status.info.config, replicas).await.map_err(|e| error(&e))?;
            Ok(kv)
        }
        Err(_) => js
            .create_key_value(jetstream::kv::Config {
                bucket: config.dedup_bucket.clone(),
                description: "chunkmill broadcaster: one key per event ever claimed".into(),
                history: 1,
                // At least as long as the stream keeps events: every event still in the stream
                // still has its claim, so no redelivery can outlive the record that stops it.
                max_age: config.retention,
                storage: StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| error(&e)),
    }
}

/// The error for a failed set-up of `what` called `name`: a refused replica count says why and
/// whether waiting can help.
fn setup_error(
    what: &'static str,
    name: &str,
    replicas: usize,
) -> impl Fn(&(dyn std::error::Error + 'static)) -> BroadcasterError {
    let name = name.to_string();
    move |error| match common::jetstream::ReplicasRefused::of(error) {
        Some(refused) => BroadcasterError::Replicas {
            what,
            name: name.clone(),
            replicas,
            why: refused.describe(replicas),
            permanent: refused.is_permanent(),
        },
        None => BroadcasterError::Setup { what, name: name.clone(), error: error.to_string() },
    }
}

/// Changes an existing stream (or a bucket's stream) to `replicas` copies, nothing else, if it
/// has another count: `--jetstream-replicas` applies to what an earlier broadcaster created.
async fn set_replicas(
    js: &jetstream::Context,
    mut existing: jetstream::stream::Config,
    replicas: usize,
) -> Result<(), jetstream::context::UpdateStreamError> {
    if existing.num_replicas == replicas {
        return Ok(());
    }
    tracing::info!("JetStream stream {}: {} copies -> {replicas}", existing.name, existing.num_replicas);
    existing.num_replicas = replicas;
    js.update_stream(existing).await.map(|_| ())
}

struct Worker {
    kv: jetstream::kv::Store,
    sender: Sender,
    target: Target,
    metrics: BroadcasterMetrics,
    instance: String,
    progress_every: Duration,
}

impl Worker {
    /// Pulls one event at a time and handles it, until shutdown.
    async fn serve(&self, consumer: &PullConsumer, shutdown: &CancellationToken) {
        let mut backoff = common::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        while !shutdown.is_cancelled() {
            let batch = tokio::select! {
                _ = shutdown.cancelled() => break,
                batch = consumer.fetch().max_messages(1).expires(FETCH_WAIT).messages() => batch,
            };
            let mut batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    if backoff.first_failure() {
                        tracing::warn!("cannot pull events: {e}; retrying");
                    }
                    if !backoff.wait(shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            if backoff.reset() {
                tracing::info!("pulling events again");
            }
            loop {
                // An event delivered but not read when we stop is redelivered after the ack wait.
                let next = tokio::select! {
                    _ = shutdown.cancelled() => None,
                    next = batch.next() => next,
                };
                match next {
                    None => break,
                    Some(Ok(message)) => self.handle_until_grace(message, shutdown).await,
                    Some(Err(e)) => {
                        tracing::debug!("pull ended: {e}");
                        break;
                    }
                }
            }
        }
    }

    /// Handles a message; after SIGTERM it gets [`SHUTDOWN_GRACE`] to finish.
    async fn handle_until_grace(&self, message: jetstream::Message, shutdown: &CancellationToken) {
        let work = self.handle(message);
        tokio::pin!(work);
        let grace = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            _ = &mut work => {}
            _ = grace => tracing::warn!(
                "stopping {SHUTDOWN_GRACE:?} after shutdown with a message still being sent; it may be missed"
            ),
        }
    }

    async fn handle(&self, message: jetstream::Message) {
        self.metrics.received.inc();
        let subject = message.subject.to_string();
        let event = match common::events::decode(&message.payload) {
            Ok(event) => event,
            Err(e) => {
                self.metrics.common.malformed(&subject);
                tracing::warn!(subject = %subject, "ignoring event on {subject}: {e}");
                // Terminated: redelivering garbage cannot make it better.
                ack(&message, AckKind::Term).await;
                return;
            }
        };
        let id = &event.id;
        let key = dedup_key(id);
        if !self.claim(&message, id, &key).await {
            return;
        }
        let record = self.send(&message, &event).await;
        // Informative only (the claim alone prevents a second send), so a failure is harmless.
        if let Err(e) = self.kv.put(&key, record.into()).await {
            tracing::debug!(event = %id, "cannot record the outcome of event {id}: {e}");
        }
        ack(&message, AckKind::Ack).await;
    }
}

impl Worker {
    /// Claims event `id` under `key`, so no other delivery or replica sends it. False when it
    /// must not be sent now (already claimed, or the claim's fate is unknown); the message is
    /// then answered.
    async fn claim(&self, message: &jetstream::Message, id: &str, key: &str) -> bool {
        let claim = format!("claimed by {} at {}", self.instance, common::events::unix_ms());
        match tokio::time::timeout(CLAIM_TIMEOUT, self.kv.create(key, claim.into())).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) if e.kind() == CreateErrorKind::AlreadyExists => {
                // A redelivery, the same fact emitted twice, or our own claim whose answer was
                // lost: in every case someone (maybe nobody, if it died) has it. Never send.
                tracing::info!(event = %id, "event {id} was already claimed; not sending it again");
                self.metrics.duplicates.inc();
                ack(message, AckKind::Ack).await;
                false
            }
            outcome => {
                let why = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {CLAIM_TIMEOUT:?}"),
                };
                // The claim may have gone through without us hearing: sending now could make a
                // duplicate. Leave it to a redelivery, which sends it unless the claim exists.
                tracing::warn!(event = %id, "cannot claim event {id} ({why}); not sending it now, it will be redelivered");
                self.metrics.claim_errors.inc();
                ack(message, AckKind::Nak(Some(Duration::from_secs(2)))).await;
                false
            }
        }
    }

    /// Sends a claimed event to the chat: the outcome, as its claim's record.
    async fn send(&self, message: &jetstream::Message, event: &common::events::Event) -> String {
        let id = &event.id;
        let text = message::render(event);
        let started = Instant::now();
        let report = with_progress(message, self.progress_every, self.sender.send(&self.target, &text)).await;
        self.metrics.send_seconds.observe(started.elapsed().as_secs_f64());
        self.metrics.retries.inc_by(u64::from(report.attempts.saturating_sub(1)));
        self.metrics.rate_limited.inc_by(u64::from(report.rate_limited));
        match &report.outcome {
            Ok(()) => {
                self.metrics.sent.with_label_values(&[event.kind()]).inc();
                tracing::info!(event = %id, "sent event {id} ({}) to {}", event.kind(), self.target.describe());
                format!("sent by {} at {}", self.instance, common::events::unix_ms())
            }
            Err((reason, detail)) => {
                self.metrics.failed.with_label_values(&[reason.label()]).inc();
                tracing::error!(
                    event = %id,
                    "giving up event {id} ({}) after {} attempt(s) to {}: {detail} [{}]",
                    event.kind(),
                    report.attempts,
                    self.target.describe(),
                    reason.label()
                );
                format!("failed by {} at {}: {}", self.instance, common::events::unix_ms(), reason.label())
            }
        }
    }
}

/// Runs `work`, telling JetStream every `every` that the message is in progress, so a long send
/// (a Retry-After wait) is not redelivered meanwhile. A redelivery would be skipped anyway (the
/// claim exists), but it would cost a delivery attempt.
async fn with_progress<F: Future>(message: &jetstream::Message, every: Duration, work: F) -> F::Output {
    tokio::pin!(work);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            output = &mut work => return output,
            _ = tick.tick() => ack(message, AckKind::Progress).await,
        }
    }
}

async fn ack(message: &jetstream::Message, kind: AckKind) {
    if let Err(e) = message.ack_with(kind).await {
        // A lost ack means a redelivery, which the claim turns into a skip.
        tracing::debug!("cannot acknowledge on {}: {e}", message.subject);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_their_own_keys_and_anything_else_is_hashed() {
        assert_eq!(dedup_key("cc83f67deffa775b.progress.30"), "cc83f67deffa775b.progress.30");
        let hashed = dedup_key("run with spaces/ünïcode");
        assert!(hashed.starts_with("sha256.") && hashed.len() == 7 + 64, "{hashed}");
        assert_ne!(dedup_key(&hashed), hashed, "an id that looks like a hash is hashed too");
        for odd in [".x", "x.", "a..b", "a*b", "a>b", ""] {
            assert!(dedup_key(odd).starts_with("sha256."), "{odd}");
        }
        assert!(dedup_key(&"a".repeat(300)).starts_with("sha256."));
    }
}
