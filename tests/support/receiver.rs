//! A stand-in for a chat API in tests: an HTTP server (hyper) on 127.0.0.1 that records every
//! request and answers as a script says (200, 429 with Retry-After, 500, ...), so a test can see
//! exactly what a broadcaster posted and make the "chat" misbehave on purpose.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};

/// How the receiver answers one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// 200, like the real APIs when a message was posted.
    Ok,
    /// 429 with `Retry-After: <seconds>` (and Telegram's JSON body with the same value).
    TooMany(u64),
    /// A status without posting (e.g. 500, or 400 for a rejected message).
    Status(u16),
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    /// When it arrived.
    pub at: std::time::Instant,
    /// Request path (with the query, if any).
    pub path: String,
    /// Content-Type header.
    pub content_type: String,
    /// The body as JSON (Null if it was not JSON).
    pub body: serde_json::Value,
    /// What the receiver answered.
    pub reply: Reply,
}

impl Received {
    /// The message text, whichever API's field holds it.
    pub fn text(&self) -> String {
        ["message", "text", "content"]
            .iter()
            .find_map(|k| self.body.get(k).and_then(|v| v.as_str()))
            .unwrap_or_default()
            .to_string()
    }
}

type Script = Box<dyn FnMut(usize, &str) -> Reply + Send>;

struct State {
    requests: Vec<Received>,
    script: Script,
}

/// The receiver; it serves until the test process ends.
pub struct Receiver {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl Receiver {
    /// A receiver that posts everything (answers 200).
    pub fn start() -> Self {
        Self::scripted(|_, _| Reply::Ok)
    }

    /// A receiver answering request number n (from 0) with text t as `script(n, t)` says.
    pub fn scripted(script: impl FnMut(usize, &str) -> Reply + Send + 'static) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the receiver");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let addr = listener.local_addr().expect("receiver address");
        let state = Arc::new(Mutex::new(State { requests: Vec::new(), script: Box::new(script) }));
        let shared = state.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(serve(listener, shared));
        });
        Receiver { addr, state }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Received> {
        self.state.lock().expect("receiver state").requests.clone()
    }

    /// The requests answered 200: the messages the chat shows.
    pub fn delivered(&self) -> Vec<Received> {
        self.requests().into_iter().filter(|r| r.reply == Reply::Ok).collect()
    }

    /// The texts of the delivered messages, in arrival order.
    pub fn texts(&self) -> Vec<String> {
        self.delivered().iter().map(Received::text).collect()
    }
}

async fn serve(listener: std::net::TcpListener, state: Arc<Mutex<State>>) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(request, &state).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
        });
    }
}

async fn answer(request: Request<hyper::body::Incoming>, state: &Mutex<State>) -> Response<Full<Bytes>> {
    let path = request.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let content_type = request
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let bytes = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    let mut state = state.lock().expect("receiver state");
    let n = state.requests.len();
    let mut received = Received { at: std::time::Instant::now(), path, content_type, body, reply: Reply::Ok };
    let reply = (state.script)(n, &received.text());
    received.reply = reply;
    state.requests.push(received);
    let (status, text, retry_after) = match reply {
        Reply::Ok => (200, r#"{"ok":true}"#.to_string(), None),
        Reply::TooMany(s) => (
            429,
            format!(
                r#"{{"ok":false,"error_code":429,"description":"Too Many Requests: retry after {s}","parameters":{{"retry_after":{s}}}}}"#
            ),
            Some(s),
        ),
        // Echoes the path, as some APIs do: a webhook's secret path must not reach the logs.
        Reply::Status(code) => {
            let path = &state.requests[n].path;
            (code, format!(r#"{{"ok":false,"error_code":{code},"description":"scripted failure at {path}"}}"#), None)
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Some(s) = retry_after {
        response.headers_mut().insert(hyper::header::RETRY_AFTER, s.into());
    }
    response
}
