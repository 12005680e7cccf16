//! Work requests that come while the fetcher scans its input. With no fetcher subscribed a
//! mapper's request gets "no responders" and the mapper asks again only after a pause (up to
//! 200 ms), so the first chunks used to leave that long after the scan. Subscribed before the
//! scan, the fetcher holds those requests as it holds any (a long poll, for the wait the mapper
//! asked for), answers `idle` with no pause to those whose wait ends while it scans, and hands
//! the others to the server, which leases to them as soon as it serves.

use std::time::{Duration, Instant};

use async_nats::{Client, Message, Subscriber};
use common::protocol::{self, Subjects, WorkReplyKind, WorkRequest};
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::FetcherError;

/// Longest a request is held, whatever it asks (as the server holds them).
const MAX_WAIT: Duration = Duration::from_secs(5);
/// Most requests held; past that they are answered `idle` at once.
const MAX_HELD: usize = 1024;
/// Longest the fetcher waits for the server to confirm the work subscription.
const SYNC_TIMEOUT: Duration = Duration::from_secs(2);

/// The work subscription and the requests held on it, handed to the server.
pub(crate) struct Held {
    /// The subscription to the work subject.
    pub(crate) subscriber: Subscriber,
    /// Requests not answered yet, each with when it came.
    pub(crate) requests: Vec<(Message, Instant)>,
}

/// The task holding work requests while the input is scanned.
pub(crate) struct EarlyWork {
    stop: CancellationToken,
    task: Option<JoinHandle<Held>>,
}

impl EarlyWork {
    /// Subscribes to the work subject and starts holding requests.
    pub(crate) async fn start(client: &Client, subjects: &Subjects) -> Result<Self, FetcherError> {
        let subject = subjects.work.clone();
        let subscriber =
            client.subscribe(subject.clone()).await.map_err(|source| FetcherError::Subscribe { subject, source })?;
        // The subscription counts once the server has it, and a flush only writes it out. A
        // request answers only after the server read everything before it on this connection:
        // one to the status subject, which the fetcher may publish to (an answer, or "no
        // responders" while no fetcher serves, both do). Mappers asking from then on, on their
        // own connections, are held. If it fails the scan runs all the same; mappers retry.
        let sync = client.request(subjects.status.clone(), bytes::Bytes::new());
        if let Ok(Err(e)) = tokio::time::timeout(SYNC_TIMEOUT, sync).await {
            if e.kind() != async_nats::RequestErrorKind::NoResponders {
                tracing::debug!("the work subscription may not be in place before the scan: {e}");
            }
        }
        let stop = CancellationToken::new();
        let task = tokio::spawn(hold(client.clone(), subscriber, stop.clone()));
        Ok(EarlyWork { stop, task: Some(task) })
    }

    /// Stops holding: the subscription and the requests still waiting (`None` if the task died).
    pub(crate) async fn finish(mut self) -> Option<Held> {
        self.stop.cancel();
        self.task.take()?.await.ok()
    }
}

impl Drop for EarlyWork {
    fn drop(&mut self) {
        // The fetcher stops before serving (a scan error): let the held requests time out.
        self.stop.cancel();
    }
}

/// How long `message` may be held: the wait its request asks for, capped; `None` for a request
/// the server must see to report (it does not decode, or has nowhere to answer).
fn wait_of(message: &Message) -> Option<Duration> {
    message.reply.as_ref()?;
    let request: WorkRequest = protocol::decode_bounded(&message.payload).ok()?;
    Some(Duration::from_millis(request.wait_ms).min(MAX_WAIT))
}

async fn hold(client: Client, mut subscriber: Subscriber, stop: CancellationToken) -> Held {
    // (request, when it came, when its wait ends: None for the server to report)
    let mut held: Vec<(Message, Instant, Option<Instant>)> = Vec::new();
    loop {
        let next = held.iter().filter_map(|h| h.2).min();
        let expiry = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            message = subscriber.next() => {
                let Some(message) = message else { break };
                let now = Instant::now();
                let deadline = wait_of(&message).map(|wait| now + wait);
                if held.len() >= MAX_HELD && deadline.is_some() {
                    answer_idle(&client, &message).await;
                } else {
                    held.push((message, now, deadline));
                }
            }
            _ = expiry => {
                let now = Instant::now();
                let (expired, kept): (Vec<_>, Vec<_>) =
                    held.into_iter().partition(|h| h.2.is_some_and(|deadline| deadline <= now));
                held = kept;
                for (message, _, _) in expired {
                    answer_idle(&client, &message).await;
                }
            }
        }
    }
    Held { subscriber, requests: held.into_iter().map(|(message, at, _)| (message, at)).collect() }
}

/// Tells a mapper there is no work yet and to ask again at once.
async fn answer_idle(client: &Client, message: &Message) {
    if let Some(reply) = &message.reply {
        let body = protocol::encode_status_reply(WorkReplyKind::Idle, 0, None);
        if let Err(e) = client.publish(reply.clone(), body).await {
            tracing::debug!("cannot answer a work request held during the scan: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::harness::NatsServer;
    use common::protocol::{WorkReply, VERSION};

    fn ask(wait_ms: u64) -> bytes::Bytes {
        protocol::encode(&WorkRequest { v: VERSION, mapper: "m".into(), wait_ms, max: 1, can: vec!["digest".into()] })
    }

    #[tokio::test]
    async fn requests_are_held_for_their_wait_then_told_to_ask_again_and_the_rest_handed_over() {
        let nats = NatsServer::start();
        let fetcher = async_nats::connect(nats.url()).await.unwrap();
        let mapper = async_nats::connect(nats.url()).await.unwrap();
        let subjects = Subjects::new("t");
        let early = EarlyWork::start(&fetcher, &subjects).await.unwrap();
        // Held for its wait (no "no responders", no answer before), then idle, ask again at once.
        let asked = Instant::now();
        let reply = mapper.request(subjects.work.clone(), ask(300)).await.unwrap();
        assert!(asked.elapsed() >= Duration::from_millis(300), "answered before its wait ended");
        let reply: WorkReply = protocol::decode(&reply.payload).unwrap();
        assert_eq!((reply.kind, reply.retry_ms), (WorkReplyKind::Idle, Some(0)));
        // A request still waiting when the scan ends goes to the server, with its subscription.
        let mut waiting = mapper.subscribe("t.inbox").await.unwrap();
        mapper.publish_with_reply(subjects.work.clone(), "t.inbox", ask(5000)).await.unwrap();
        // One connection's messages arrive in order: once a later request is answered, the
        // holder has this one.
        let probe = mapper.request(subjects.work.clone(), ask(0)).await.unwrap();
        assert_eq!(protocol::decode::<WorkReply>(&probe.payload).unwrap().kind, WorkReplyKind::Idle);
        let held = early.finish().await.unwrap();
        assert_eq!(held.requests.len(), 1, "the 5 s request is handed over, the answered ones are not");
        assert_eq!(held.requests[0].0.reply.as_deref(), Some("t.inbox"));
        assert!(tokio::time::timeout(Duration::from_millis(100), waiting.next()).await.is_err(), "not answered");
        let mut subscriber = held.subscriber;
        mapper.publish(subjects.work.clone(), ask(1)).await.unwrap();
        assert!(subscriber.next().await.is_some(), "the subscription is the server's now");
    }
}
