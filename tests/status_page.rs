//! The fetcher's live status page (`/` on its metrics port) in a real headless browser
//! (Chromium from Debian, `chromium-headless-shell`): the page renders its script's view of
//! `/status.json`, its numbers are the ones /metrics shows during a live run, it lists the dead
//! letters with their reasons, and a screenshot of it is not an empty page.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::protocol::{self, ReleaseReason, ReleaseRequest, Subjects};
use support::Pipeline;

const LONG: Duration = Duration::from_secs(180);

/// The headless browser: `$CHROMIUM`, else the first of Debian's Chromium binaries on PATH.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium-headless-shell", "chromium", "chromium-browser"] {
        for dir in std::env::split_paths(&path) {
            if dir.join(name).is_file() {
                return dir.join(name);
            }
        }
    }
    panic!("no Chromium found: `apt-get install chromium-headless-shell` (scripts/test.sh does), or set CHROMIUM");
}

/// Chromium run headless on `url` with `args`, a profile of its own in `dir`; its stdout.
fn browse(dir: &Path, url: &str, args: &[&str]) -> String {
    let profile = dir.join("chromium-profile");
    let output = Command::new(chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars"])
        .arg(format!("--user-data-dir={}", profile.display()))
        // Virtual time: the page's script has fetched /status.json and drawn it before the DOM
        // is taken (the budget is the page's time, not the test's).
        .arg("--virtual-time-budget=3000")
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(output.status.success(), "chromium failed on {url}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The text of the element with `id` in a DOM dump.
fn text_of(dom: &str, id: &str) -> String {
    let start = format!("id=\"{id}\"");
    let at = dom.find(&start).unwrap_or_else(|| panic!("no #{id} in the page:\n{dom}"));
    let rest = &dom[at..];
    let open = rest.find('>').expect("a tag end") + 1;
    let close = rest[open..].find('<').expect("an element end");
    rest[open..open + close].to_string()
}

/// The page's numbers, by element id.
fn page_numbers(dom: &str) -> [u64; 6] {
    ["done", "pending", "leased", "dead", "objects-done", "objects"].map(|id| {
        let text = text_of(dom, id);
        text.parse().unwrap_or_else(|_| panic!("#{id} is not a number: {text:?}\n{dom}"))
    })
}

/// The same numbers from the fetcher's /metrics.
fn metric_numbers(port: u16) -> Option<[u64; 6]> {
    let series = [
        "chunkmill_fetcher_chunks{state=\"done\"}",
        "chunkmill_fetcher_chunks{state=\"pending\"}",
        "chunkmill_fetcher_chunks{state=\"leased\"}",
        "chunkmill_fetcher_chunks{state=\"dead_lettered\"}",
        "chunkmill_fetcher_run_objects_done",
        "chunkmill_fetcher_run_objects",
    ];
    let (status, text) = common::harness::http_get(port, "/metrics").ok()?;
    if status != 200 {
        return None;
    }
    let mut numbers = [0; 6];
    for (n, series) in numbers.iter_mut().zip(series) {
        *n = common::harness::metric_value(&text, series)? as u64;
    }
    Some(numbers)
}

/// Plays a mapper that takes one chunk and hands it back as failed with `reason`.
fn fail_one_chunk(p: &Pipeline, reason: &str) -> common::protocol::ChunkId {
    let subjects = Subjects::new("chunkmill");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let client = async_nats::connect(p.nats.url()).await.expect("connect");
        let reply = client.request(subjects.work.clone(), support::work_request("failing", 1)).await.expect("work");
        let work = protocol::decode::<protocol::WorkReply>(&reply.payload).expect("a work reply");
        let head = work.chunks.first().expect("a chunk").head.clone();
        let release = ReleaseRequest {
            v: protocol::VERSION,
            mapper: "failing".into(),
            lease: protocol::LeaseRef { chunk: head.chunk, lease: head.lease },
            reason: ReleaseReason::Failed,
            error: Some(reason.into()),
        };
        client.request(subjects.release.clone(), protocol::encode(&release)).await.expect("release");
        head.chunk
    })
}

#[test]
fn the_status_page_renders_in_a_browser_and_matches_the_metrics_during_a_live_run() {
    // 50 chunks at 30 000 rounds: seconds of work for one mapper, so the run is live while the
    // browser looks. Leases outlast the pause below (no expiry mid-test); one failure
    // dead-letters a chunk.
    let p = Pipeline::new(5_000, 30_000);
    // Deployment mode (no --exit-when-done): the page stays up after the run.
    let (_fetcher, port) = p.fetcher_named("fetcher", &["--lease-timeout", "120s", "--max-attempts", "1"]);
    support::wait_ready(port);
    let url = format!("http://127.0.0.1:{port}/");

    let reason = "test mapper: <b>cannot</b> process this chunk";
    let failed = fail_one_chunk(&p, reason);
    let _saver = p.saver("saver-1");
    let mapper = p.mapper("mapper-1", &[]);
    support::wait_until("three chunks done", LONG, || {
        support::metric(port, "chunkmill_fetcher_chunks{state=\"done\"}") >= Some(3.0)
    });
    // Freeze the only mapper: the numbers stop moving (its in-flight results may still land, so
    // the page is compared with /metrics read before and after it, when those two agree).
    mapper.signal("STOP");
    let mut compared = None;
    for _ in 0..20 {
        let before = metric_numbers(port);
        let dom = browse(p.dir.path(), &url, &["--dump-dom"]);
        if before.is_some() && before == metric_numbers(port) {
            compared = Some((before.unwrap_or_default(), dom));
            break;
        }
    }
    let (metrics, dom) = compared.expect("/metrics kept moving with the mapper stopped");
    assert_eq!(page_numbers(&dom), metrics, "page (done, pending, leased, dead, objects done, objects) vs /metrics");
    assert_eq!(metrics[3], 1, "one chunk dead-lettered");
    assert_eq!(text_of(&dom, "state"), "running");
    assert_eq!(text_of(&dom, "run"), p.run_id());
    assert!(dom.contains("data-mapper=\"mapper-1\""), "the mapper's row:\n{dom}");
    // The dead letter with its reason, as text (the page never parses network text as HTML).
    assert!(dom.contains(&format!("data-chunk=\"{failed}\"")), "the dead letter's row:\n{dom}");
    assert!(dom.contains("test mapper: &lt;b&gt;cannot&lt;/b&gt; process this chunk"), "{dom}");

    // A screenshot of the page holds more than a blank page of the same size does.
    let shot = |target: &str, file: &str| {
        let path = p.dir.path().join(file);
        browse(p.dir.path(), target, &[&format!("--screenshot={}", path.display()), "--window-size=1000,900"]);
        std::fs::read(&path).expect("a screenshot")
    };
    let page = shot(&url, "page.png");
    let blank = shot("data:text/html,<html></html>", "blank.png");
    assert!(page.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    assert!(
        page.len() > 2 * blank.len(),
        "the page's screenshot ({} bytes) is no fuller than a blank one ({} bytes)",
        page.len(),
        blank.len()
    );

    // Let the run finish: the page says complete.
    mapper.signal("CONT");
    support::wait_until("the run complete", LONG, || {
        support::metric(port, "chunkmill_fetcher_run_complete_timestamp_seconds") > Some(0.0)
    });
    let dom = browse(p.dir.path(), &url, &["--dump-dom"]);
    assert_eq!(text_of(&dom, "state"), "complete");
    assert_eq!(text_of(&dom, "percent"), "100.0");
    assert_eq!((text_of(&dom, "done"), text_of(&dom, "dead")), ("49".to_string(), "1".to_string()));
}
