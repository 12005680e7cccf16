//! A small HTTP/1.1 file server for the input tests (`python3 -m http.server` answers a Range
//! request with the whole file, which a ranged chunk read must refuse): HEAD and GET of one
//! file, `Range: bytes=A-B` answered 206 with `Content-Range`, an ETag made from the content
//! and `If-Match` honoured (412), one connection per request. The file is read again for every
//! request, so a rewrite is seen as a store would show it. Stopped on drop.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A running server of one file.
pub struct FileServer {
    port: u16,
    stop: Arc<AtomicBool>,
    /// Requests answered 206 (ranged reads).
    ranged: Arc<AtomicU64>,
}

/// The ETag of `bytes`: FNV-1a over them, quoted.
fn etag(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3));
    format!("\"{hash:016x}\"")
}

impl FileServer {
    /// Serves `file` at `url_path` (e.g. `/data/users.jsonl`) on a free port of 127.0.0.1.
    pub fn start(file: PathBuf, url_path: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let port = listener.local_addr().expect("address").port();
        let stop = Arc::new(AtomicBool::new(false));
        let ranged = Arc::new(AtomicU64::new(0));
        let (flag, count, path) = (Arc::clone(&stop), Arc::clone(&ranged), url_path.to_string());
        std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (file, path, count) = (file.clone(), path.clone(), Arc::clone(&count));
                        std::thread::spawn(move || {
                            let _ = answer(stream, &file, &path, &count);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FileServer { port, stop, ranged }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Ranged GETs answered so far.
    pub fn ranged_requests(&self) -> u64 {
        self.ranged.load(Ordering::SeqCst)
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn answer(stream: TcpStream, file: &PathBuf, path: &str, ranged: &AtomicU64) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut out = stream;
    let reply = |out: &mut TcpStream, status: &str, extra: &[(&str, String)], body: &[u8]| {
        let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for (name, value) in extra {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        out.write_all(head.as_bytes())?;
        if method != "HEAD" {
            out.write_all(body)?;
        }
        out.flush()
    };
    if target != path || !(method == "GET" || method == "HEAD") {
        return reply(&mut out, "404 Not Found", &[("Content-Length", "0".into())], b"");
    }
    let bytes = std::fs::read(file)?;
    let tag = etag(&bytes);
    let common = [("ETag", tag.clone()), ("Last-Modified", "Tue, 01 Dec 2026 00:00:00 GMT".to_string())];
    if header("if-match").is_some_and(|wanted| wanted != "*" && wanted != tag) {
        return reply(&mut out, "412 Precondition Failed", &[("Content-Length", "0".into())], b"");
    }
    let range = header("range").and_then(|r| r.strip_prefix("bytes=")).and_then(|r| {
        let (a, b) = r.split_once('-')?;
        let start: u64 = a.parse().ok()?;
        let end: u64 = if b.is_empty() { bytes.len() as u64 - 1 } else { b.parse().ok()? };
        Some(start..end.min(bytes.len() as u64 - 1) + 1)
    });
    match range {
        Some(range) if range.start < range.end => {
            ranged.fetch_add(1, Ordering::SeqCst);
            let body = &bytes[range.start as usize..range.end as usize];
            let mut extra = common.to_vec();
            extra.push(("Content-Length", body.len().to_string()));
            extra.push(("Content-Range", format!("bytes {}-{}/{}", range.start, range.end - 1, bytes.len())));
            reply(&mut out, "206 Partial Content", &extra, body)
        }
        Some(_) => reply(&mut out, "416 Range Not Satisfiable", &[("Content-Length", "0".into())], b""),
        None => {
            let mut extra = common.to_vec();
            extra.push(("Content-Length", bytes.len().to_string()));
            reply(&mut out, "200 OK", &extra, &bytes)
        }
    }
}
