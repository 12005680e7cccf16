//! The pump: asks the fetcher for as many chunks as there is room for in `--concurrency`, in
//! one work request (docs/PROTOCOL.md §3.1–3.2), and queues them for the transformers. A failed
//! ask backs off; chunks this mapper cannot read are handed back as failed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::RequestErrorKind;
use bytes::Bytes;
use common::backoff::{sleep_unless as pause, Backoff};
use common::protocol::{self, LeaseRef, ReleaseReason, WorkReply, WorkReplyKind, WorkRequest, VERSION};
use common::text::escaped;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::lease::release;
use crate::work;
use crate::{InHand, Shared};

/// How long a work request may be held by the fetcher when nothing is pending.
const WORK_WAIT: Duration = Duration::from_secs(2);

/// Longest pause between work requests while no fetcher is listening.
const NO_FETCHER_RETRY: Duration = Duration::from_millis(200);

/// Asks for as many chunks as there is room for, and queues them for the transformers. Ends on
/// shutdown (or, with `exit_when_done`, when the run is complete); the queue then closes.
pub(crate) async fn pump(
    shared: Arc<Shared>,
    room: Arc<Semaphore>,
    queue: mpsc::Sender<InHand>,
    shutdown: CancellationToken,
    exit_when_done: bool,
) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    let mut told_why = String::new();
    while !shutdown.is_cancelled() && !shared.hard_stop.is_cancelled() {
        let Some(mut permits) = take_room(&shared, &room, &shutdown).await else { break };
        let message = match ask(&shared, permits.len() as u32, &shutdown).await {
            Asked::Reply(message) => {
                if backoff.reset() {
                    tracing::info!("the fetcher answers again");
                }
                message
            }
            Asked::Stop => break,
            Asked::Failed(e) => {
                drop(permits);
                wait_after_failed_ask(&shared, &e, &mut backoff, &shutdown).await;
                continue;
            }
        };
        let reply: WorkReply = match protocol::decode(&message.payload) {
            Ok(reply) => reply,
            Err(e) => {
                drop(permits);
                on_undecodable(&shared, &message, &e, &shutdown).await;
                continue;
            }
        };
        match reply.kind {
            WorkReplyKind::Chunks => {
                if !take_chunks(&shared, &message.payload, reply, &mut permits, &queue).await {
                    break;
                }
            }
            WorkReplyKind::Done if exit_when_done => {
                // Not a hard stop: results still being delivered finish normally.
                tracing::info!("the fetcher reports the run complete");
                break;
            }
            kind => {
                drop(permits);
                no_work(reply, kind, &mut told_why, &shutdown).await;
            }
        }
    }
}

/// After a failed request for work: logs the first failure of a streak, then waits.
async fn wait_after_failed_ask(
    shared: &Shared,
    e: &async_nats::RequestError,
    backoff: &mut Backoff,
    shutdown: &CancellationToken,
) {
    if backoff.first_failure() {
        match e.kind() {
            RequestErrorKind::NoResponders => {
                tracing::warn!("no fetcher is listening on {}; waiting for one", shared.subjects.work)
            }
            _ => tracing::warn!("asking for work failed ({e}); retrying"),
        }
    }
    backoff.wait_up_to(retry_cap(e.kind()), shutdown).await;
}

/// The longest pause before asking again after an ask failed with `kind`. "No responders" is the
/// NATS server's own instant answer and costs the fetcher nothing, so keep asking often: a
/// fetcher that has just finished its scan gets its mappers within [`NO_FETCHER_RETRY`], not
/// after a long backoff. Anything else (a timeout: the fetcher may be overloaded) backs off to 2 s.
fn retry_cap(kind: RequestErrorKind) -> Duration {
    if kind == RequestErrorKind::NoResponders {
        NO_FETCHER_RETRY
    } else {
        Duration::from_secs(2)
    }
}

/// The pause after a reply without chunks: as long as the fetcher asks (`retry_ms`), 500 ms if
/// it says nothing, and never more than 5 s whatever it says.
fn no_work_pause(retry_ms: Option<u64>) -> Duration {
    Duration::from_millis(retry_ms.unwrap_or(500).min(5000))
}

/// A work reply this mapper cannot decode. Chunks we cannot read are leased to us all the same:
/// they are given back as failed, so the fetcher counts them towards --max-attempts instead of
/// re-leasing them forever. A reply without readable leases is ignored, after a pause.
async fn on_undecodable(
    shared: &Arc<Shared>,
    message: &async_nats::Message,
    e: &protocol::ProtocolError,
    shutdown: &CancellationToken,
) {
    shared.metrics.common.malformed(&message.subject);
    if let Some(leases) = protocol::decode_leases_only(&message.payload) {
        for lease in leases {
            give_back_failed(shared, lease, format!("the mapper cannot decode chunk {}: {e}", lease.chunk)).await;
        }
        return;
    }
    tracing::warn!(subject = %message.subject, "ignoring a work reply: {}", escaped(&e.to_string()));
    pause(Duration::from_secs(1), shutdown).await;
}

/// A reply without chunks (idle, done, or this mapper cannot run the job): says why once per
/// reason, then waits as long as the fetcher asks before the next request.
async fn no_work(reply: WorkReply<'_>, kind: WorkReplyKind, told_why: &mut String, shutdown: &CancellationToken) {
    if let Some(why) = reply.reason.filter(|why| why != &*told_why) {
        tracing::warn!("the fetcher has no work for this mapper: {}", escaped(&why));
        *told_why = why;
    }
    let retry = no_work_pause(reply.retry_ms);
    if kind == WorkReplyKind::Idle || kind == WorkReplyKind::Done {
        pause(retry, shutdown).await;
    }
}

/// Waits for room for one chunk, then takes whatever else is free (up to what one reply may
/// carry): one request for all of it. `None` when stopping.
async fn take_room(
    shared: &Shared,
    room: &Arc<Semaphore>,
    shutdown: &CancellationToken,
) -> Option<Vec<OwnedSemaphorePermit>> {
    let first = tokio::select! {
        _ = shutdown.cancelled() => return None,
        _ = shared.hard_stop.cancelled() => return None,
        permit = room.clone().acquire_owned() => permit.ok()?,
    };
    let mut permits = vec![first];
    while permits.len() < protocol::MAX_CHUNKS_PER_REPLY as usize {
        match room.clone().try_acquire_owned() {
            Ok(permit) => permits.push(permit),
            Err(_) => break,
        }
    }
    Some(permits)
}

/// What asking for work came to.
enum Asked {
    Reply(async_nats::Message),
    Failed(async_nats::RequestError),
    /// Shutting down (anything leased into the reply meanwhile was handed back).
    Stop,
}

/// Asks the fetcher for up to `max` chunks, waiting up to [`WORK_WAIT`] for them.
async fn ask(shared: &Arc<Shared>, max: u32, shutdown: &CancellationToken) -> Asked {
    let body = protocol::encode(&WorkRequest {
        v: VERSION,
        mapper: shared.name.clone(),
        wait_ms: WORK_WAIT.as_millis() as u64,
        max,
        can: shared.jobs.capabilities(),
    });
    let asked = async_nats::Request::new().payload(body).timeout(Some(WORK_WAIT + Duration::from_secs(3)));
    let waiting = Instant::now();
    let request = shared.client.send_request(shared.subjects.work.clone(), asked);
    tokio::pin!(request);
    let reply = tokio::select! {
        _ = shared.hard_stop.cancelled() => return Asked::Stop,
        reply = &mut request => reply,
        _ = shutdown.cancelled() => {
            // The fetcher may already have leased chunks into this reply: wait for it (at most
            // the wait asked for) and hand them straight back, rather than leave them to expire
            // while nobody works on them.
            tokio::select! {
                _ = shared.hard_stop.cancelled() => {}
                reply = &mut request => if let Some(leases) = reply.ok().and_then(|m| protocol::decode_leases_only(&m.payload)) {
                    for lease in leases {
                        shared.given_back.fetch_add(1, Ordering::Relaxed);
                        release(shared, lease, ReleaseReason::Shutdown, "shutting down".into()).await;
                    }
                },
            }
            return Asked::Stop;
        }
    };
    shared.metrics.idle.inc_by(waiting.elapsed().as_secs_f64());
    match reply {
        Ok(message) => Asked::Reply(message),
        Err(e) => Asked::Failed(e),
    }
}

/// Holds the chunks of a `chunks` reply and queues them for the transform, each with one of
/// `permits`; false once the queue is closed (stopping).
async fn take_chunks(
    shared: &Arc<Shared>,
    payload: &Bytes,
    reply: WorkReply<'_>,
    permits: &mut Vec<OwnedSemaphorePermit>,
    queue: &mpsc::Sender<InHand>,
) -> bool {
    let lease_ms = reply.lease_ms.unwrap_or(5000).max(100);
    shared.lease_ms.store(lease_ms, Ordering::Relaxed);
    let (run, job) = (reply.run.unwrap_or_default(), reply.job.unwrap_or_default());
    let mut leased = Vec::with_capacity(reply.chunks.len());
    for chunk in reply.chunks {
        match work::object_ranges(payload, &chunk.objects) {
            Some(objects) => leased.push((chunk.head, objects)),
            None => {
                // Leased to us all the same: hand it back as failed so that it counts towards
                // --max-attempts rather than waiting for its lease to expire.
                let lease = LeaseRef { chunk: chunk.head.chunk, lease: chunk.head.lease };
                give_back_failed(shared, lease, format!("chunk {}'s objects are not in the work reply", lease.chunk))
                    .await;
            }
        }
    }
    for (head, objects) in leased {
        shared.hold(LeaseRef { chunk: head.chunk, lease: head.lease });
        // A fetcher sends at most what was asked for; more would be kept all the same.
        let permit = permits.pop();
        let in_hand = InHand { payload: payload.clone(), objects, head, run: run.clone(), job: job.clone(), permit };
        if queue.send(in_hand).await.is_err() {
            return false;
        }
    }
    true
}

/// Hands a chunk this mapper cannot use back as failed, so that it counts towards the
/// fetcher's --max-attempts instead of waiting for its lease to expire.
async fn give_back_failed(shared: &Arc<Shared>, lease: LeaseRef, error: String) {
    tracing::error!(chunk = lease.chunk.0, "{error}; handing it back as failed");
    shared.metrics.failures.with_label_values(&["chunk"]).inc();
    shared.given_back.fetch_add(1, Ordering::Relaxed);
    release(shared, lease, ReleaseReason::Failed, error).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_no_fetcher_listening_the_mapper_asks_again_soon_and_after_other_failures_backs_off() {
        assert_eq!(retry_cap(RequestErrorKind::NoResponders), NO_FETCHER_RETRY);
        assert_eq!(retry_cap(RequestErrorKind::TimedOut), Duration::from_secs(2));
        assert_eq!(retry_cap(RequestErrorKind::Other), Duration::from_secs(2));
    }

    #[test]
    fn after_a_reply_without_chunks_the_mapper_waits_what_the_fetcher_asks_at_most_five_seconds() {
        assert_eq!(no_work_pause(Some(200)), Duration::from_millis(200));
        assert_eq!(no_work_pause(Some(0)), Duration::ZERO);
        assert_eq!(no_work_pause(None), Duration::from_millis(500));
        assert_eq!(no_work_pause(Some(600_000)), Duration::from_secs(5));
    }
}
