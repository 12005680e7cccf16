//! Fault tolerance end to end: each test breaks one thing the way production does (SIGKILL,
//! SIGSTOP, SIGTERM, a NATS restart, an unwritable sink, poison input) and checks that the run
//! still ends with every object saved exactly once.

mod support;

use std::time::Duration;

use support::{finish, metric, wait_ready, wait_until, Pipeline};

const LONG: Duration = Duration::from_secs(180);

fn done_chunks(port: u16) -> f64 {
    metric(port, "chunkmill_fetcher_chunks{state=\"done\"}").unwrap_or(-1.0)
}

#[test]
fn a_fetcher_killed_mid_run_resumes_without_handing_out_saved_chunks() {
    let p = Pipeline::new(20_000, 300);
    let _saver = p.saver("saver-1");
    let _m1 = p.mapper("mapper-1", &[]);
    let _m2 = p.mapper("mapper-2", &[]);
    let (mut first, _) = p.fetcher_named("fetcher-1", &["--exit-when-done"]);
    p.wait_saved(40, LONG);
    first.kill();
    let ledger = std::fs::read_to_string(p.state_dir().join(format!("{}.ledger", p.run_id()))).expect("ledger file");
    let recorded = ledger.lines().filter(|l| l.starts_with("d ")).count() as u64;
    assert!((1..200).contains(&recorded), "killed at a useless moment: {recorded} chunks recorded");
    let (mut second, _) = p.fetcher_named("fetcher-2", &["--exit-when-done"]);
    finish(&mut second, LONG);
    let log = second.log();
    assert!(log.contains(&format!("{recorded} chunks already done")), "{log}");
    // Chunks recorded as done are never handed out again; only the rest are leased.
    let granted = p.summary_number("fetcher-2", "/stats/leases_granted");
    assert!(granted <= 200 - recorded + 4, "{granted} leases for {} remaining chunks", 200 - recorded);
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
}

#[test]
fn a_second_fetcher_on_the_same_state_refuses_to_start() {
    let p = Pipeline::new(1_000, 0);
    let (_first, port) = p.fetcher_named("fetcher-1", &[]);
    wait_ready(port);
    let (mut second, _) = p.fetcher_named("fetcher-2", &[]);
    let code = second.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(1), "the second fetcher should fail fast:\n{}", second.log());
    assert!(second.log().contains("another fetcher is running"), "{}", second.log());
}

#[test]
fn a_nats_restart_mid_run_is_survived_by_every_service() {
    let mut p = Pipeline::new(20_000, 300);
    let saver = p.saver("saver-1");
    let m1 = p.mapper("mapper-1", &[]);
    let _m2 = p.mapper("mapper-2", &[]);
    let mut fetcher = p.fetcher(&["--lease-timeout", "2s"]);
    p.wait_saved(30, LONG);
    p.nats.stop();
    for service in [&fetcher, &saver, &m1] {
        service.wait_for_log("disconnected from NATS", Duration::from_secs(30));
    }
    assert_eq!(fetcher.wait_exit(Duration::from_millis(200)), None, "the fetcher must wait for NATS, not exit");
    p.nats.restart();
    finish(&mut fetcher, LONG);
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
    assert!(report.contains("20000 expected, 20000 found, 0 missing, 0 duplicated, 0 wrong"), "{report}");
}

#[test]
fn a_mapper_paused_past_its_lease_sends_a_harmless_stale_result() {
    let p = Pipeline::new(1_000, 20_000);
    let (saver, saver_port) = p.saver_with_metrics("saver-1");
    let (_fetcher, port) = p.fetcher_named("fetcher", &["--lease-timeout", "500ms"]);
    // A mapper slow enough to be caught holding a lease: one thread, many rounds.
    let paused = p.mapper("paused", &["--threads", "1", "--concurrency", "1", "--results-in-flight", "1"]);
    wait_until("the paused mapper to hold a lease", LONG, || {
        metric(port, "chunkmill_fetcher_chunks{state=\"leased\"}") == Some(1.0)
    });
    paused.signal("STOP");
    // The rest of the run, including the paused mapper's chunk, is done by another mapper. Both
    // run the fetcher's job, so a stale result is byte-identical, as in production.
    let _healthy = p.mapper("healthy", &[]);
    wait_until("every chunk done", LONG, || done_chunks(port) == 10.0);
    assert!(metric(port, "chunkmill_fetcher_lease_expiries_total").unwrap_or(0.0) >= 1.0);
    paused.signal("CONT");
    // The paused mapper either learns its lease is gone and drops the result, or sends it and
    // the saver absorbs it as a duplicate: both are fine; an error or a second copy is not.
    wait_until("the stale result to be dropped or absorbed", LONG, || {
        paused.log().contains("no longer ours")
            || metric(saver_port, "chunkmill_saver_duplicate_saves_total") >= Some(1.0)
    });
    assert!(!saver.log().contains("ERROR"), "{}", saver.log());
    let (ok, report) = p.verify();
    assert!(ok && report.contains("0 duplicated"), "{report}");
}

#[test]
fn sigterm_makes_a_mapper_hand_its_chunk_back_at_once() {
    let p = Pipeline::new(1_000, 2_000_000);
    // A lease far longer than the test: the chunk can only come back by a release.
    let (_fetcher, port) = p.fetcher_named("fetcher", &["--lease-timeout", "10m"]);
    let mut mapper = p.mapper("mapper", &["--threads", "1", "--concurrency", "1", "--shutdown-grace", "500ms"]);
    wait_until("the mapper to hold a lease", LONG, || {
        metric(port, "chunkmill_fetcher_chunks{state=\"leased\"}") == Some(1.0)
    });
    mapper.signal("TERM");
    assert_eq!(mapper.wait_exit(Duration::from_secs(10)), Some(0), "{}", mapper.log());
    wait_until("the chunk to be pending again", Duration::from_secs(5), || {
        metric(port, "chunkmill_fetcher_chunks{state=\"leased\"}") == Some(0.0)
    });
    assert_eq!(metric(port, "chunkmill_fetcher_releases_total{reason=\"shutdown\"}"), Some(1.0));
    assert_eq!(metric(port, "chunkmill_fetcher_lease_expiries_total"), Some(0.0));
}

#[test]
fn a_saver_that_cannot_write_acknowledges_nothing_and_recovers() {
    let p = Pipeline::new(1_000, 0);
    // A file where the run's directory must go: every write fails until it is removed.
    std::fs::create_dir_all(&p.out).expect("out dir");
    let blocker = p.out.join(p.run_id());
    std::fs::write(&blocker, b"not a directory").expect("blocker");
    let saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    let (mut fetcher, port) = p.fetcher_named("fetcher", &["--exit-when-done"]);
    saver.wait_for_log("cannot save a result", LONG);
    assert!(saver.log().contains(&blocker.display().to_string()), "the error names the path:\n{}", saver.log());
    assert_eq!(done_chunks(port), 0.0, "nothing may be done while nothing is saved");
    std::fs::remove_file(&blocker).expect("unblock");
    finish(&mut fetcher, LONG);
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
}

/// Issue 15, "one run, one sink": two savers with different --out (separate volumes) once each
/// got part of a run, the fetcher said complete, and each directory failed verify. Now the
/// run's first saved chunk records its sink; the other saver's acks are refused loudly, it takes
/// no more of the run, and every chunk ends in the first sink.
#[test]
fn a_saver_with_another_sink_is_refused_loudly_and_the_run_completes_in_one_sink() {
    let p = Pipeline::new(3_000, 0);
    let other = p.dir.path().join("other-out");
    let args = |out: &std::path::Path, name: &str| {
        vec!["--out".to_string(), out.display().to_string(), "--instance".into(), name.into()]
    };
    let (saver_a, _) = p.spawn_with_metrics("saver-a", "saver", &args(&p.out, "saver-a"));
    let (saver_b, _) = p.spawn_with_metrics("saver-b", "saver", &args(&other, "saver-b"));
    let _mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&[]);
    finish(&mut fetcher, LONG);
    let log = fetcher.log();
    let (first, refused) =
        if log.contains("saver saver-b saves into sink") { (&p.out, &saver_b) } else { (&other, &saver_a) };
    assert!(log.contains("but this run saves into sink"), "the fetcher says which sink it refuses:\n{log}");
    assert!(
        refused.log().contains("saves into another sink, not this saver's"),
        "the refused saver says why:\n{}",
        refused.log()
    );
    let (ok, report) = p.verify_out(first);
    assert!(ok && report.contains("3000 found, 0 missing"), "the run is whole in its sink: {report}");
    let (ok, _) = p.verify_out(if first == &p.out { &other } else { &p.out });
    assert!(!ok, "the other sink holds at most a stray part of the run");
}

#[test]
fn bad_input_is_refused_by_default_and_skipped_on_request() {
    let p = Pipeline::new(500, 0);
    let mut text = std::fs::read_to_string(&p.input).expect("input");
    text.push_str("{\"uuid\": \"not-a-uuid\", \"fn\": \"A\", \"ln\": \"B\", \"friends\": []}\n");
    text.push_str("{\"truncated\": \n");
    std::fs::write(&p.input, text).expect("write input");

    let (mut refused, _) = p.fetcher_named("fetcher-refused", &["--exit-when-done"]);
    assert_eq!(refused.wait_exit(Duration::from_secs(30)), Some(1));
    let log = refused.log();
    assert!(log.contains("line 501") && log.contains("line 502") && log.contains("--bad-records skip"), "{log}");

    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    let (mut skipping, _) = p.fetcher_named("fetcher", &["--exit-when-done", "--bad-records", "skip"]);
    // Exit status 3: complete, but some input was left out.
    assert_eq!(skipping.wait_exit(LONG), Some(3), "{}", skipping.log());
    let dead = std::fs::read_to_string(p.state_dir().join(format!("{}.dead-letter.jsonl", p.run_id())))
        .expect("dead-letter file");
    assert_eq!(dead.lines().count(), 2, "{dead}");
    assert!(dead.contains("\"line\":501") && dead.contains("\"line\":502"), "{dead}");
    let (ok, report) = p.verify();
    assert!(ok && report.contains("500 found") && report.contains("2 invalid input records"), "{report}");
}

#[test]
fn a_poison_object_is_dead_lettered_by_name_and_the_run_completes() {
    let p = Pipeline::new(300, 0);
    let first_line = std::fs::read_to_string(&p.input).expect("input").lines().nth(150).expect("line").to_string();
    let poison: serde_json::Value = serde_json::from_str(&first_line).expect("json");
    let poison_id = poison["uuid"].as_str().expect("uuid").to_string();
    let _saver = p.saver("saver-1");
    let (mapper, _) = p.spawn_with_env("mapper-1", "mapper", &[], &[("CHUNKMILL_TEST_PANIC_ID", poison_id.as_str())]);
    let mut fetcher = p.fetcher(&[]);
    assert_eq!(fetcher.wait_exit(LONG), Some(3), "complete with a dead letter:\n{}", fetcher.log());
    assert_eq!(p.summary_number("fetcher", "/stats/objects_dead"), 1);
    let dead = p.saved_chunk(1).remove(0).dead;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].id.as_deref() == Some(poison_id.as_str()) && dead[0].error.contains("panicked"), "{dead:?}");
    assert!(mapper.log().contains("could not be transformed"), "{}", mapper.log());
    let (ok, report) = p.verify();
    assert!(ok && report.contains("299 found") && report.contains("1 dead-lettered"), "{report}");
}

#[test]
fn a_chunk_over_max_payload_is_dead_lettered_by_name_not_a_timeout() {
    // A server whose max_payload (8 KiB) is below a 100-object chunk (about 32 KB).
    let conf = tempfile::NamedTempFile::new().expect("conf file");
    std::fs::write(conf.path(), "max_payload: 8192\n").expect("write conf");
    let mut p = Pipeline::new(300, 0);
    p.nats = common::harness::NatsServer::start_with(&["-c", conf.path().to_str().expect("path")]);
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    let (mut fetcher, _) = p.fetcher_named("fetcher", &["--exit-when-done"]);
    assert_eq!(fetcher.wait_exit(LONG), Some(3), "complete, with dead letters:\n{}", fetcher.log());
    let log = fetcher.log();
    assert!(log.contains("chunk 0") && log.contains("max_payload of 8192 bytes"), "{log}");
    assert_eq!(p.summary_number("fetcher", "/dead"), 3, "{log}");
    let dead =
        std::fs::read_to_string(p.state_dir().join(format!("{}.dead-letter.jsonl", p.run_id()))).expect("dead letters");
    assert_eq!(dead.lines().count(), 3, "{dead}");
    assert!(dead.contains("\"chunk\":2") && dead.contains("max_payload"), "{dead}");
}

#[test]
fn the_jetstream_ledger_resumes_a_killed_fetcher_and_locks_out_a_second_one() {
    let p = Pipeline::new(20_000, 300);
    let _saver = p.saver("saver-1");
    let _m1 = p.mapper("mapper-1", &[]);
    let _m2 = p.mapper("mapper-2", &[]);
    let kv = ["--exit-when-done", "--ledger", "kv", "--instance"];
    let (mut first, _) = p.fetcher_named("fetcher-1", &[&kv[..], &["fetcher-main"]].concat());
    p.wait_saved(40, LONG);
    // A second fetcher of another name waits for the lock (not ready, serving nothing) instead
    // of exiting: under Kubernetes an exit is a crash loop.
    let (mut intruder, intruder_port) = p.fetcher_named("intruder", &[&kv[..], &["another-fetcher"]].concat());
    intruder.wait_for_log("waiting for the fetcher lock", Duration::from_secs(30));
    assert!(intruder.log().contains("held by fetcher-main"), "{}", intruder.log());
    assert!(!matches!(common::harness::http_get(intruder_port, "/readyz"), Ok((200, _))), "the waiting one is ready");
    intruder.kill();
    first.kill();
    // The same instance (a restarted pod with a stable name) takes the lock over at once.
    let (mut second, _) = p.fetcher_named("fetcher-2", &[&kv[..], &["fetcher-main"]].concat());
    finish(&mut second, LONG);
    let log = second.log();
    let resumed: u64 = log
        .split(" chunks already done")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the second fetcher did not resume:\n{log}"));
    assert!(resumed >= 1, "{log}");
    let granted = p.summary_number("fetcher-2", "/stats/leases_granted");
    assert!(granted <= 200 - resumed + 4, "{granted} leases for {} remaining chunks", 200 - resumed);
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
}

/// Issue 18, item 2, as reproduced: fetcher A with `--ledger kv`; nats-server stopped for 20 s
/// (past the lock's 15 s TTL) and restarted. A used to log "wrong last sequence: 0" every 5 s,
/// stay ready and serve, and a second fetcher took the lock and served too.
#[test]
fn after_a_nats_outage_longer_than_the_kv_lock_ttl_only_one_fetcher_serves() {
    let mut p = Pipeline::new(20_000, 300);
    let kv = ["--ledger", "kv", "--instance"];
    let (a, port_a) = p.fetcher_named("fetcher-a", &[&kv[..], &["fetcher-a"]].concat());
    wait_ready(port_a);
    p.nats.stop();
    a.wait_for_log("disconnected from NATS", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(20)); // the outage itself
    p.nats.restart();
    a.wait_for_log("took it again and serves on", Duration::from_secs(30));
    wait_ready(port_a);
    let (mut b, port_b) = p.fetcher_named("fetcher-b", &[&kv[..], &["fetcher-b"]].concat());
    b.wait_for_log("waiting for the fetcher lock", Duration::from_secs(30));
    assert!(b.log().contains("held by fetcher-a"), "a second fetcher does not wait for A:\n{}", b.log());
    assert!(!matches!(common::harness::http_get(port_b, "/readyz"), Ok((200, _))), "B is ready beside A");
    assert!(!a.log().contains("wrong last sequence"), "{}", a.log());
    // A still serves the run, alone.
    let _saver = p.saver("saver-1");
    let _m1 = p.mapper("mapper-1", &[]);
    wait_until("the run to complete", LONG, || done_chunks(port_a) == 200.0);
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
    assert!(!b.log().contains("took the fetcher lock"), "B took the lock while A held it:\n{}", b.log());
    b.kill();
}

/// Issue 34: a fetcher with `--ledger kv` that is stopped (SIGTERM, as Kubernetes stops a pod)
/// deletes its lock, and a successor that was waiting for it (not exiting, which under
/// Kubernetes is a crash loop) takes it at once, long before the lock's TTL, and finishes the
/// run.
#[test]
fn a_stopped_kv_fetcher_releases_its_lock_and_a_waiting_successor_takes_over_at_once() {
    let p = Pipeline::new(20_000, 300);
    let kv = ["--ledger", "kv", "--lock-ttl", "120s", "--exit-when-done", "--instance"];
    let (mut a, port_a) = p.fetcher_named("fetcher-a", &[&kv[..], &["fetcher-a"]].concat());
    wait_ready(port_a);
    let (mut b, port_b) = p.fetcher_named("fetcher-b", &[&kv[..], &["fetcher-b"]].concat());
    b.wait_for_log("waiting for the fetcher lock", Duration::from_secs(30));
    assert!(b.log().contains("held by fetcher-a"), "{}", b.log());
    assert!(!matches!(common::harness::http_get(port_b, "/readyz"), Ok((200, _))), "B is ready beside A");
    let stopped = std::time::Instant::now();
    a.signal("TERM");
    assert_eq!(a.wait_exit(Duration::from_secs(30)), Some(0), "{}", a.log());
    assert!(a.log().contains("released the fetcher lock"), "{}", a.log());
    b.wait_for_log("took the fetcher lock", Duration::from_secs(30));
    wait_ready(port_b);
    assert!(stopped.elapsed() < Duration::from_secs(60), "B waited for the TTL, not the release");
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    finish(&mut b, LONG);
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
}

/// The other way a lock lapses: fetcher A is cut off from NATS (a partition) while the server
/// and everyone else are fine. Once A's lock expires a second fetcher B takes it; when A comes
/// back it must see B's lock and exit, never serve beside it.
#[test]
fn a_fetcher_cut_off_past_its_kv_lock_ttl_stops_when_another_holds_the_lock() {
    let p = Pipeline::new(20_000, 300);
    let proxy = common::harness::TcpProxy::start(p.nats.port());
    let args = |name: &str| {
        let mut args = vec![
            "--input".to_string(),
            p.input.display().to_string(),
            "--ledger".into(),
            "kv".into(),
            "--lock-ttl".into(),
            "2s".into(),
            "--instance".into(),
            name.into(),
        ];
        args.extend(p.job.iter().cloned());
        args
    };
    let (a, port_a) = p.spawn_with_env("fetcher-a", "fetcher", &args("fetcher-a"), &[("NATS_URL", &proxy.url())]);
    wait_ready(port_a);
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    wait_until("some chunks done", LONG, || done_chunks(port_a) >= 10.0);
    proxy.cut();
    a.wait_for_log("disconnected from NATS", Duration::from_secs(30));
    // Wait for the lock to expire on the server, then start B, which takes it.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let client = async_nats::connect(p.nats.url()).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        let lock = js.get_key_value("chunkmill-ledger-lock").await.expect("lock bucket");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while lock.get("fetcher").await.expect("read the lock").is_some() {
            assert!(std::time::Instant::now() < deadline, "the lock did not expire");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let (mut b, port_b) = p.spawn_with_metrics("fetcher-b", "fetcher", &args("fetcher-b"));
    wait_ready(port_b);
    proxy.restore();
    let mut a = a;
    assert_eq!(a.wait_exit(Duration::from_secs(30)), Some(1), "A serves beside B:\n{}", a.log());
    assert!(a.log().contains("now held by fetcher-b"), "{}", a.log());
    // B finishes the run.
    wait_until("the run to complete", LONG, || done_chunks(port_b) == 200.0);
    assert_eq!(b.wait_exit(Duration::from_millis(100)), None, "B keeps serving");
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
}
