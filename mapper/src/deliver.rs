//! Delivery: each result goes to a saver on its own task (docs/PROTOCOL.md §3.6), resent until a
//! saver answers `saved` while the lease is still ours, bounded by `--results-in-flight`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::RequestErrorKind;
use bytes::Bytes;
use common::backoff::Backoff;
use common::protocol::{self, LeaseRef, ReleaseReason, ResultReply, ResultStatus};
use common::text::escaped;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::lease::{give_back, lost};
use crate::Shared;

/// How long to wait for a saver's answer before resending a result.
const RESULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The delivery tasks, and their bound (`--results-in-flight`).
#[derive(Clone)]
pub(crate) struct Deliveries {
    pub(crate) tasks: TaskTracker,
    pub(crate) room: Arc<Semaphore>,
}

/// What became of a delivered result.
pub(crate) enum Delivery {
    Saved,
    LeaseLost,
    GiveBack(ReleaseReason, String),
}

pub(crate) async fn finish(shared: &Arc<Shared>, lease: LeaseRef, objects: u64, outcome: Delivery) {
    match outcome {
        Delivery::Saved => {
            shared.drop_lease(&lease);
            shared.chunks.fetch_add(1, Ordering::Relaxed);
            shared.objects.fetch_add(objects, Ordering::Relaxed);
            shared.metrics.chunks.inc();
            shared.metrics.objects.inc_by(objects);
        }
        Delivery::LeaseLost => lost(shared, lease),
        Delivery::GiveBack(reason, error) => {
            if reason == ReleaseReason::Failed {
                shared.metrics.failures.with_label_values(&["chunk"]).inc();
                tracing::error!(chunk = lease.chunk.0, "chunk {} failed: {}", lease.chunk, escaped(&error));
            }
            give_back(shared, lease, reason, error).await;
        }
    }
}

/// Sends a result to a saver until one answers `saved`: resent after `failed`, `not_acked`, a
/// timeout or no responders, with backoff, while the lease is still ours.
pub(crate) async fn deliver(shared: &Arc<Shared>, lease: LeaseRef, body: Bytes) -> Delivery {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        // `valid: false` from the heartbeat may come before the saver's `saved` for the same
        // chunk (the saver acks the fetcher first): the chunk is done or lost, stop resending.
        if !shared.still_ours(&lease) {
            return Delivery::LeaseLost;
        }
        if shared.hard_stop.is_cancelled() {
            return Delivery::GiveBack(ReleaseReason::Shutdown, "shutting down".into());
        }
        let request = async_nats::Request::new().payload(body.clone()).timeout(Some(RESULT_TIMEOUT));
        let reply = tokio::select! {
            reply = shared.client.send_request(shared.subjects.result.clone(), request) => reply,
            _ = shared.hard_stop.cancelled() => return Delivery::GiveBack(ReleaseReason::Shutdown, "shutting down".into()),
        };
        let problem = match reply {
            Ok(message) => match protocol::decode::<ResultReply>(&message.payload) {
                Ok(ResultReply { status: ResultStatus::Saved, .. }) => return Delivery::Saved,
                Ok(ResultReply { status: ResultStatus::Rejected, error, .. }) => {
                    return Delivery::GiveBack(
                        ReleaseReason::Failed,
                        format!("the saver rejected the result: {}", escaped(&error.unwrap_or_default())),
                    );
                }
                Ok(ResultReply { status, error, .. }) => {
                    format!("saver answered {status:?}: {}", escaped(&error.unwrap_or_default()))
                }
                Err(e) => format!("unreadable saver reply: {e}"),
            },
            Err(e) if e.kind() == RequestErrorKind::MaxPayloadExceeded => {
                return Delivery::GiveBack(
                    ReleaseReason::Failed,
                    format!(
                        "result of chunk {} is {} bytes, over the NATS server's max_payload ({} bytes); lower the fetcher's --chunk-size",
                        lease.chunk,
                        body.len(),
                        common::nats::max_payload(&shared.client)
                    ),
                );
            }
            Err(e) if e.kind() == RequestErrorKind::NoResponders => {
                format!("no saver is listening on {}", shared.subjects.result)
            }
            Err(e) => format!("sending the result failed: {e}"),
        };
        if backoff.first_failure() {
            tracing::warn!(chunk = lease.chunk.0, "chunk {}: {problem}; retrying", lease.chunk);
        }
        if !backoff.wait(&shared.hard_stop).await {
            return Delivery::GiveBack(ReleaseReason::Shutdown, "shutting down".into());
        }
    }
}
