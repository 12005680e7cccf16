//! What a person watching the fetcher's log sees (issue 34, section 2): progress lines with their
//! numbers as JSON fields, and a rate and ETA over the fetcher's own recent progress, so that a
//! fetcher resumed half-way does not report the recovered chunks as work done in its first
//! second.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::{finish, metric, wait_until, Pipeline};

const LONG: Duration = Duration::from_secs(180);

/// The fetcher's JSON progress lines so far.
fn progress_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"].as_str().is_some_and(|m| m.starts_with("progress ")))
        .collect()
}

fn number(line: &Value, field: &str) -> Option<f64> {
    line[field].as_f64()
}

#[test]
fn a_resumed_fetcher_reports_the_rate_and_eta_of_its_own_progress_not_of_the_recovered_chunks() {
    let p = Pipeline::new(20_000, 300);
    let mut saver = p.saver("saver-1");
    let mut mapper = p.mapper("mapper-1", &[]);
    let (mut first, _) = p.fetcher_named("fetcher-1", &["--exit-when-done"]);
    p.wait_saved(80, LONG);
    first.kill();
    mapper.kill();
    saver.kill();
    // Resumed with no mapper nor saver: it recovered about half of the run and cannot make any
    // progress of its own.
    let mut args: Vec<String> = ["--input", &p.input.display().to_string(), "--state-dir"]
        .iter()
        .map(|s| s.to_string())
        .chain([p.state_dir().display().to_string()])
        .chain(["--exit-when-done", "--progress-interval", "1s"].map(String::from))
        .collect();
    args.extend(p.job.iter().cloned());
    let (mut second, port) = p.spawn_with_env("fetcher-2", "fetcher", &args, &[("LOG_FORMAT", "json")]);
    second.wait_for_log("chunks already done", LONG);
    wait_until("three progress lines of the resumed fetcher", LONG, || progress_lines(&second.log()).len() >= 3);
    let idle = progress_lines(&second.log());
    for line in &idle {
        let message = line["message"].as_str().unwrap_or_default();
        // Unknown in its first second, then 0: never the recovered objects over a few seconds.
        assert!(message.contains(" objects/s, ETA ?,"), "a resumed fetcher that did nothing yet: {message}");
        let rate = number(line, "objects_per_second");
        assert!(matches!(rate, None | Some(0.0)), "a resumed fetcher that did nothing yet: {line}");
        assert!(line.get("eta_seconds").is_none(), "no ETA without progress: {line}");
        assert_eq!(line["run"].as_str(), Some(p.run_id().as_str()), "{line}");
        assert_eq!(number(line, "chunks"), Some(200.0), "{line}");
    }
    let resumed = number(&idle[0], "objects_done").expect("objects_done as a JSON field");
    assert!(resumed >= 5_000.0, "resumed too early: {}", idle[0]);
    let eta = metric(port, "chunkmill_fetcher_eta_seconds").expect("the ETA metric");
    assert!(eta.is_nan(), "the ETA metric says {eta} s with no progress (0 would read as done)");
    // A mapper again: the rate is this fetcher's, the ETA follows it.
    let since = Instant::now();
    let _saver = p.saver("saver-2");
    let _mapper = p.mapper("mapper-2", &[]);
    let mut moving = None;
    wait_until("a progress line with a rate", LONG, || {
        moving = progress_lines(&second.log())
            .into_iter()
            .rev()
            .find(|l| number(l, "objects_per_second").is_some_and(|r| r > 0.0) && number(l, "eta_seconds").is_some());
        moving.is_some()
    });
    let line = moving.expect("found");
    let (rate, done) =
        (number(&line, "objects_per_second").unwrap_or(0.0), number(&line, "objects_done").unwrap_or(0.0));
    let own = (done - resumed) / since.elapsed().as_secs_f64().max(1.0);
    assert!(rate <= 2.0 * own + 1_000.0, "rate {rate}/s, but this fetcher did {own:.0}/s: {line}");
    let eta = number(&line, "eta_seconds").unwrap_or(0.0);
    let left = 20_000.0 - done;
    assert!(left <= 0.0 || eta >= left / (2.0 * own + 1_000.0), "ETA {eta} s for {left} objects at {own:.0}/s: {line}");
    finish(&mut second, LONG);
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
}

#[test]
fn a_fatal_error_is_one_json_line_under_log_format_json() {
    let p = Pipeline::new(100, 0);
    let missing = p.logs().join("no-such-input.jsonl").display().to_string();
    let args: Vec<String> = vec!["--input".into(), missing.clone()];
    let (mut fetcher, _) = p.spawn_with_env("fetcher", "fetcher", &args, &[("LOG_FORMAT", "json")]);
    assert_eq!(fetcher.wait_exit(Duration::from_secs(30)), Some(1), "{}", fetcher.log());
    let log = fetcher.log();
    let mentions: Vec<&str> = log.lines().filter(|l| l.contains("no-such-input")).collect();
    assert_eq!(mentions.len(), 1, "the error is printed once:\n{log}");
    let line: Value = serde_json::from_str(mentions[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {}", mentions[0]));
    assert_eq!(line["level"].as_str(), Some("ERROR"), "{line}");
    assert!(line["error"].as_str().is_some_and(|e| e.contains(&missing)), "{line}");
}
