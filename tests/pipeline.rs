//! End-to-end: the real binaries around a real nats-server. Each test names the promise it checks.

mod support;

use std::time::Duration;

use support::{finish, Pipeline};

#[test]
fn the_full_data_set_at_zero_rounds_is_saved_exactly_once() {
    let p = Pipeline::new(100_000, 0);
    let _saver = p.saver("saver-1");
    let _m1 = p.mapper("mapper-1", &[]);
    let _m2 = p.mapper("mapper-2", &[]);
    let mut fetcher = p.fetcher(&[]);
    finish(&mut fetcher, Duration::from_secs(240));
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
    assert!(report.contains("100000 expected, 100000 found, 0 missing, 0 duplicated, 0 wrong"), "{report}");
    assert_eq!(p.summary_number("fetcher", "/dead"), 0);
}

#[test]
fn killing_a_mapper_and_the_saver_mid_run_loses_and_doubles_nothing() {
    let p = Pipeline::new(20_000, 300);
    let mut saver = p.saver("saver-1");
    let mut m1 = p.mapper("mapper-1", &[]);
    let _m2 = p.mapper("mapper-2", &[]);
    let mut fetcher = p.fetcher(&["--lease-timeout", "1s"]);
    p.wait_saved(30, Duration::from_secs(120));
    m1.kill();
    saver.kill();
    let before_restart = p.saved_chunks();
    let _saver2 = p.saver("saver-2");
    let _m3 = p.mapper("mapper-3", &[]);
    finish(&mut fetcher, Duration::from_secs(240));
    assert!(before_restart < 200, "the kills happened after the run was over ({before_restart} chunks saved)");
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
    assert!(report.contains("20000 expected, 20000 found, 0 missing, 0 duplicated, 0 wrong"), "{report}");
}

#[test]
fn a_slow_mapper_that_extends_its_lease_is_not_duplicated() {
    // One transform thread and one chunk at a time: each 100-object chunk takes longer than the
    // 1 s lease, so only the heartbeat (a third of the lease) keeps it. A shorter lease made a
    // scheduling stall of a few hundred milliseconds on a loaded 2-core machine an expiry.
    let p = Pipeline::new(400, 150_000);
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("slow-mapper", &["--threads", "1", "--concurrency", "1"]);
    let lease = Duration::from_secs(1);
    let mut fetcher = p.fetcher(&["--lease-timeout", "1s"]);
    finish(&mut fetcher, Duration::from_secs(240));
    let log = fetcher.log();
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p.summary_path("fetcher")).expect("summary")).expect("JSON");
    let elapsed = summary["elapsed_seconds"].as_f64().expect("elapsed in the summary");
    assert!(
        elapsed > 4.0 * lease.as_secs_f64(),
        "chunks were quicker than the lease ({elapsed}s for 4); the test proves nothing"
    );
    assert_eq!(p.summary_number("fetcher", "/stats/expiries"), 0, "{log}");
    assert_eq!(p.summary_number("fetcher", "/stats/re_leases"), 0, "{log}");
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
}
