//! Publishing pipeline events ([`common::events`]) without ever slowing the ledger: the ledger
//! task hands each event to a bounded queue ([`Publisher::emit`] never waits), and one background
//! task publishes them to JetStream, waiting for each PubAck.
//!
//! Each publish carries `Nats-Msg-Id: <event id>`, so a publish retried after a lost PubAck is
//! dropped by the stream's duplicate window instead of stored twice. The stream itself belongs to
//! the broadcaster: without one (no broadcaster yet, or JetStream off) the fetcher says so once
//! and drops events; the run is never affected.

use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use common::events::Event;
use tokio::sync::mpsc;

/// Events waiting to be published; past this, new events are dropped (and counted in the log).
const QUEUE: usize = 1024;
/// Attempts per event when JetStream does not acknowledge.
const ATTEMPTS: u32 = 3;
/// How long one publish waits for its PubAck.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// The handle the fetcher keeps: a queue into the publishing task.
pub(crate) struct Publisher {
    tx: Option<mpsc::Sender<Event>>,
    task: Option<tokio::task::JoinHandle<()>>,
    dropped: u64,
}

impl Publisher {
    /// A publisher that drops every event (`--events off`).
    pub(crate) fn off() -> Self {
        Publisher { tx: None, task: None, dropped: 0 }
    }

    /// Starts the publishing task for subjects under `prefix`.
    pub(crate) fn start(client: async_nats::Client, prefix: String) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let js = async_nats::jetstream::ContextBuilder::new().timeout(ACK_TIMEOUT).build(client);
        let task = tokio::spawn(publish_all(js, prefix, rx));
        Publisher { tx: Some(tx), task: Some(task), dropped: 0 }
    }

    /// Queues `event`; never waits. A full queue (JetStream far behind) drops it with a warning.
    pub(crate) fn emit(&mut self, event: Event) {
        let Some(tx) = &self.tx else { return };
        if let Err(e) = tx.try_send(event) {
            self.dropped += 1;
            if self.dropped == 1 || self.dropped.is_power_of_two() {
                let id = match &e {
                    mpsc::error::TrySendError::Full(event) | mpsc::error::TrySendError::Closed(event) => &event.id,
                };
                tracing::warn!("event queue full: dropping event {id} ({} dropped so far)", self.dropped);
            }
        }
    }

    /// Publishes what is queued, for up to `grace`, then stops the task.
    pub(crate) async fn close(mut self, grace: Duration) {
        drop(self.tx.take());
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(grace, &mut task).await.is_err() {
                task.abort();
                tracing::warn!("stopped with pipeline events still unpublished after {grace:?}");
            }
        }
    }
}

async fn publish_all(js: async_nats::jetstream::Context, prefix: String, mut rx: mpsc::Receiver<Event>) {
    let mut no_stream_logged = false;
    while let Some(event) = rx.recv().await {
        let subject = event.subject(&prefix);
        let body = common::protocol::encode(&event);
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=ATTEMPTS {
            let message = PublishMessage::build().message_id(&event.id).payload(body.clone());
            let outcome = match js.send_publish(subject.clone(), message).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(_) => {
                    tracing::debug!("published event {} on {subject}", event.id);
                    break;
                }
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                    // Nobody keeps events: not an error, the broadcaster is optional.
                    if !no_stream_logged {
                        no_stream_logged = true;
                        tracing::info!(
                            "no event stream for {subject}; events are not recorded (start a broadcaster to create it)"
                        );
                    }
                    break;
                }
                Err(e) if attempt < ATTEMPTS => {
                    tracing::debug!("publishing event {} failed ({e}); retrying in {delay:?}", event.id);
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => {
                    tracing::warn!(
                        "cannot publish event {} on {subject} after {ATTEMPTS} attempts: {e}; dropped",
                        event.id
                    )
                }
            }
        }
    }
}
