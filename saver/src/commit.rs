//! The commit exchange, on the saver's side: the fetcher asks (`P.commit`, the savers' queue
//! group) once its run is complete and the savers' acks said their sink commits runs; any saver
//! answers how far the commit is, starting it if nobody here has (docs/PROTOCOL.md §3.13).

use async_nats::{Client, Message};
use common::protocol::{self, CommitReply, CommitRequest, CommitStatus, VERSION};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::sink::Sink;

/// Answers commit requests from `requests` until `shutdown`.
pub(crate) async fn serve(
    client: Client,
    sink: Sink,
    mut requests: async_nats::Subscriber,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            message = requests.next() => message,
        };
        let Some(message) = message else { break };
        let (client, sink) = (client.clone(), sink.clone());
        tracker.spawn(async move { answer(&client, &sink, message).await });
    }
    let _ = requests.unsubscribe().await;
    tracker.close();
    tracker.wait().await;
}

async fn answer(client: &Client, sink: &Sink, message: Message) {
    let Some(reply_to) = message.reply.clone() else { return };
    let reply = match protocol::decode_bounded::<CommitRequest>(&message.payload) {
        Err(e) => {
            tracing::warn!("a commit request on {} is malformed: {e}", message.subject);
            CommitReply {
                v: VERSION,
                status: CommitStatus::Failed,
                error: Some(format!("malformed commit request: {e}")),
            }
        }
        Ok(request) => match sink.commit_run(&request).await {
            Ok(status) => CommitReply { v: VERSION, status, error: None },
            Err(e) => CommitReply { v: VERSION, status: CommitStatus::Failed, error: Some(e.to_string()) },
        },
    };
    if let Err(e) = client.publish(reply_to, protocol::encode(&reply)).await {
        tracing::debug!("cannot answer a commit request: {e}");
    }
}
