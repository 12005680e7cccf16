//! The live status page: `/` on the fetcher's metrics port, for a person who opens it with
//! `kubectl port-forward deploy/fetcher 9100` or during `scripts/run-local.sh`. One HTML file
//! with its script inline (no framework, no external assets, so it works on a cluster without
//! internet); it polls `/status.json` every second and shows the run's progress, rate, ETA, the
//! mappers and the latest dead letters. `/status.json` is the same [`Status`] that `fetcher
//! status` gets over NATS, asked of the task that owns the ledger, so both read the same numbers.

use std::sync::Arc;
use std::time::Duration;

use common::metrics::{Page, PageFuture, Pages};
use tokio::sync::{mpsc, oneshot};

use crate::status::Status;

/// The page itself.
const HTML: &str = include_str!("page/status.html");

/// Requests for a status, answered by the fetcher's server loop.
pub(crate) type StatusRequests = mpsc::Receiver<oneshot::Sender<Status>>;

/// How long a page request waits for the server loop (busy with a long store write, or still
/// scanning the input) before it answers 503.
const WAIT: Duration = Duration::from_secs(2);

/// Page requests queued for the server loop at most; more are answered 503 at once, so a page
/// left open in many tabs cannot pile up work for the fetcher.
const QUEUE: usize = 16;

/// The fetcher's pages, and the requests the server loop answers.
pub(crate) fn pages() -> (Arc<StatusPages>, StatusRequests) {
    let (requests, receiver) = mpsc::channel(QUEUE);
    (Arc::new(StatusPages { requests }), receiver)
}

/// `/` and `/status.json`.
pub(crate) struct StatusPages {
    requests: mpsc::Sender<oneshot::Sender<Status>>,
}

impl Pages for StatusPages {
    fn page(&self, path: &str) -> Option<PageFuture> {
        match path {
            "/" | "/index.html" => Some(Box::pin(std::future::ready(Page {
                status: 200,
                content_type: "text/html; charset=utf-8",
                body: HTML.as_bytes().into(),
            }))),
            "/status.json" => {
                let requests = self.requests.clone();
                Some(Box::pin(async move { status_json(requests).await }))
            }
            _ => None,
        }
    }
}

async fn status_json(requests: mpsc::Sender<oneshot::Sender<Status>>) -> Page {
    let (reply, answer) = oneshot::channel();
    let status = match requests.try_send(reply) {
        Ok(()) => tokio::time::timeout(WAIT, answer).await.ok().and_then(Result::ok),
        Err(_) => None,
    };
    let json = |status, body: Vec<u8>| Page { status, content_type: "application/json", body: body.into() };
    match status.map(|s| serde_json::to_vec(&s)) {
        Some(Ok(body)) => json(200, body),
        Some(Err(e)) => json(500, error_body(&format!("cannot encode the status: {e}"))),
        None => json(503, error_body("the fetcher is starting (scanning its input) or busy; the page retries")),
    }
}

fn error_body(message: &str) -> Vec<u8> {
    common::json::to_vec_own(&serde_json::json!({ "error": message }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn status_json_is_answered_by_the_server_loop_and_503_without_one() {
        let (pages, mut requests) = pages();
        let page = pages.page("/status.json").expect("a status page");
        let answer = tokio::spawn(page);
        let reply = requests.recv().await.expect("a request reaches the loop");
        let status: Status = serde_json::from_str(
            r#"{"run":"r","input":"i","transform":"digest","chunks":2,"done":1,"pending":1,"leased":0,"dead":0,
               "objects":200,"objects_done":100,"objects_per_second":50.0,"eta_seconds":2.0,
               "elapsed_seconds":2.0,"complete":false,"mappers":[]}"#,
        )
        .expect("a status");
        reply.send(status.clone()).expect("the page waits");
        let page = answer.await.expect("page task");
        assert_eq!(page.status, 200);
        let back: Status = serde_json::from_slice(&page.body).expect("status JSON");
        assert_eq!(back, status);

        drop(requests);
        let page = pages.page("/status.json").expect("a status page").await;
        assert_eq!(page.status, 503);
        assert!(String::from_utf8_lossy(&page.body).contains("starting"));
        assert!(pages.page("/nothing").is_none());
        let html = pages.page("/").expect("the page").await;
        assert!(html.content_type.starts_with("text/html"));
        assert!(String::from_utf8_lossy(&html.body).contains("status.json"));
    }
}
