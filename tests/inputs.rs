//! End-to-end: inputs where the data lives. Runs from an S3 prefix of several plain and gzip
//! objects (a real S3-compatible server, moto, on 127.0.0.1), 100 000 records in one object and
//! in seven of uneven sizes, a zstd object, an S3 server restarted mid-run, a fetcher killed
//! mid-run, an object rewritten mid-run, a restarted fetcher on changed input, a file behind
//! plain HTTP (a small Range-capable server), a local glob and a local zstd file; each completes
//! and `saver verify` (reading the same input) says OK, or the fetcher stops naming what changed.
//! A wrong key, a missing bucket and a missing object stop the fetcher at once, naming the
//! setting to fix and never the secret.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::harness::TcpProxy;
use support::http::FileServer;
use support::s3::S3Server;
use support::{finish, metric, wait_ready, wait_until, Pipeline};

/// The generated users, one record per line.
fn lines(p: &Pipeline) -> Vec<String> {
    std::fs::read_to_string(&p.input).expect("input").lines().map(|l| format!("{l}\n")).collect()
}

fn gzip(text: &str) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(text.as_bytes()).expect("gzip");
    encoder.finish().expect("gzip")
}

/// Puts the users into `bucket` as `parts` objects under `data/`, every other one gzip: part-0
/// plain, part-1.gz, ...; and one object outside the prefix that must not be read.
fn upload(s3: &S3Server, bucket: &str, users: &[String], parts: usize) -> Vec<String> {
    s3.create_bucket(bucket);
    let per = users.len().div_ceil(parts);
    let mut keys = Vec::new();
    for (i, part) in users.chunks(per).enumerate() {
        let text: String = part.concat();
        let key = if i % 2 == 1 { format!("data/part-{i}.jsonl.gz") } else { format!("data/part-{i}.jsonl") };
        let body = if i % 2 == 1 { gzip(&text) } else { text.into_bytes() };
        s3.put(bucket, &key, &body);
        keys.push(key);
    }
    s3.put(bucket, "data-old/ignored.jsonl", b"not json at all\n");
    keys
}

#[test]
fn a_run_from_an_s3_prefix_of_plain_and_gzip_objects_completes_and_verifies() {
    let s3 = S3Server::start();
    let mut p = Pipeline::new(2000, 0);
    let users = lines(&p);
    upload(&s3, "inputs", &users, 5);
    p.input = "s3://inputs/data/".into();
    p.input_env = s3.env();
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&["--chunk-size", "150"]);
    finish(&mut fetcher, Duration::from_secs(120));
    let log = fetcher.log();
    assert!(log.contains("input s3://inputs/data/: 5 objects"), "{log}");
    // 400 records per object at 150 a chunk: 3 chunks each (150, 150, 100), never across objects.
    assert!(log.contains("2000 objects in 15 chunks"), "{log}");
    assert!(!log.contains("test-secret-key"), "the secret key is never logged: {log}");
    let (ok, report) = p.verify_with_flags(&["--chunk-size", "150"]);
    assert!(ok, "{report}");
    assert!(report.contains("2000 expected, 2000 found, 0 missing, 0 duplicated, 0 wrong"), "{report}");
}

#[test]
fn an_s3_object_rewritten_mid_run_stops_its_chunks_and_the_fetcher_names_it() {
    let s3 = S3Server::start();
    let mut p = Pipeline::new(210, 100_000);
    let users = lines(&p);
    // part-0.jsonl, part-1.jsonl.gz, part-2.jsonl: 70 records, 7 chunks each. The last one is
    // plain (a compressed object is read from its spool, so a rewrite of it cannot reach the run).
    let keys = upload(&s3, "inputs", &users, 3);
    p.input = "s3://inputs/data/".into();
    p.input_env = s3.env();
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("slow-mapper", &["--threads", "1", "--concurrency", "1"]);
    let mut fetcher = p.fetcher(&["--chunk-size", "10"]);
    // Once the first chunks are saved, rewrite the last object (chunks 14..20), not yet leased.
    p.wait_saved(2, Duration::from_secs(60));
    let last = keys.last().expect("a key");
    s3.put("inputs", last, b"{\"uuid\":\"rewritten\"}\n");
    let code = fetcher.wait_exit(Duration::from_secs(120));
    let log = fetcher.log();
    assert_ne!(code, Some(0), "the run must not complete on a changed input: {log}");
    assert!(log.contains(&format!("input object s3://inputs/{last} changed")), "{log}");
    assert!(log.contains("7 chunks were not handed out"), "{log}");
    assert_eq!(p.saved_chunks(), 14, "every chunk of the other objects, none of the rewritten one");
}

#[test]
fn a_restarted_fetcher_refuses_to_resume_on_changed_input() {
    let p = Pipeline::new(300, 0);
    let (mut first, port) = p.fetcher_named("fetcher", &[]);
    wait_ready(port);
    first.kill();
    let mut text = std::fs::read_to_string(&p.input).expect("input");
    text.truncate(text.len() / 2);
    let cut = text.rfind('\n').expect("a line") + 1;
    std::fs::write(&p.input, &text[..cut]).expect("rewrite input");
    let mut again = p.fetcher(&[]);
    assert_ne!(again.wait_exit(Duration::from_secs(60)), Some(0), "{}", again.log());
    let log = again.log();
    assert!(log.contains("changed since run") && log.contains("--new-run"), "{log}");
}

#[test]
fn a_local_glob_is_one_run_over_its_files_in_path_order() {
    let mut p = Pipeline::new(1000, 0);
    let users = lines(&p);
    let dir = p.dir.path().join("parts");
    std::fs::create_dir_all(&dir).expect("dir");
    for (i, part) in users.chunks(300).enumerate() {
        std::fs::write(dir.join(format!("part-{i}.jsonl")), part.concat()).expect("write part");
    }
    p.input = dir.join("part-*.jsonl");
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&[]);
    finish(&mut fetcher, Duration::from_secs(120));
    // 300, 300, 300 and 100 records: 3 + 3 + 3 + 1 chunks of up to 100.
    assert!(fetcher.log().contains("1000 objects in 10 chunks"), "{}", fetcher.log());
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
    assert!(report.contains("1000 expected, 1000 found, 0 missing"), "{report}");
}

#[test]
fn a_local_zstd_file_is_decompressed_once_and_verifies() {
    let mut p = Pipeline::new(1000, 0);
    let plain = std::fs::read(&p.input).expect("input");
    let zst = p.dir.path().join("users.jsonl.zst");
    std::fs::write(&zst, zstd::encode_all(&plain[..], 3).expect("zstd")).expect("write");
    p.input = zst;
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&[]);
    finish(&mut fetcher, Duration::from_secs(120));
    let spool: Vec<_> = std::fs::read_dir(p.state_dir().join("spool")).expect("spool dir").flatten().collect();
    assert_eq!(spool.len(), 1, "one spool file, the decompressed object");
    assert_eq!(spool[0].metadata().expect("metadata").len(), plain.len() as u64);
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
    assert!(report.contains("1000 expected, 1000 found, 0 missing"), "{report}");
}

/// Transient input store failures the fetcher on metrics `port` counted (every kind), or None
/// while it does not answer.
fn store_failures(port: u16) -> Option<f64> {
    let kinds = ["connect", "timeout", "interrupted", "server", "throttled", "body"];
    kinds
        .iter()
        .map(|kind| metric(port, &format!("chunkmill_fetcher_input_store_failures_total{{kind=\"{kind}\"}}")))
        .sum()
}

/// Puts `users` into `bucket` as plain objects `data/part-N.jsonl` of `sizes` records each (in
/// key order: the names sort as the parts go); returns each key with its bytes.
fn upload_sized(s3: &S3Server, bucket: &str, users: &[String], sizes: &[usize]) -> Vec<(String, Vec<u8>)> {
    assert_eq!(sizes.iter().sum::<usize>(), users.len(), "the sizes cover the users");
    s3.create_bucket(bucket);
    let mut at = 0;
    let mut objects = Vec::new();
    for (i, n) in sizes.iter().enumerate() {
        let body = users[at..at + n].concat().into_bytes();
        at += n;
        let key = format!("data/part-{i}.jsonl");
        s3.put(bucket, &key, &body);
        objects.push((key, body));
    }
    objects
}

/// Chunks of `chunk_size` records over objects of `sizes` records (never across objects).
fn chunks_of(sizes: &[usize], chunk_size: usize) -> usize {
    sizes.iter().map(|n| n.div_ceil(chunk_size)).sum()
}

/// The ledger file of the one run in the fetcher's state directory.
fn ledger_file(state_dir: &Path) -> PathBuf {
    let ledgers: Vec<PathBuf> = std::fs::read_dir(state_dir)
        .expect("state dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "ledger"))
        .collect();
    assert_eq!(ledgers.len(), 1, "one run in {}: {ledgers:?}", state_dir.display());
    ledgers[0].clone()
}

#[test]
fn a_hundred_thousand_records_in_one_s3_object_complete_and_verify() {
    let s3 = S3Server::start();
    let mut p = Pipeline::new(100_000, 0);
    s3.create_bucket("inputs");
    s3.put("inputs", "users.jsonl", &std::fs::read(&p.input).expect("input"));
    p.input = "s3://inputs/users.jsonl".into();
    p.input_env = s3.env();
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&[]);
    finish(&mut fetcher, Duration::from_secs(180));
    let log = fetcher.log();
    assert!(log.contains("100000 objects in 1000 chunks"), "{log}");
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
    assert!(report.contains("100000 expected, 100000 found, 0 missing, 0 duplicated, 0 wrong"), "{report}");
}

#[test]
fn a_hundred_thousand_records_in_seven_s3_objects_of_uneven_sizes_complete_and_verify() {
    let s3 = S3Server::start();
    let mut p = Pipeline::new(100_000, 0);
    let users = lines(&p);
    // One record, an empty object, a few, and large ones: chunks are cut per object.
    let sizes = [1, 23_456, 0, 50_000, 7, 26_535, 1];
    upload_sized(&s3, "inputs", &users, &sizes);
    p.input = "s3://inputs/data/".into();
    p.input_env = s3.env();
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&[]);
    finish(&mut fetcher, Duration::from_secs(180));
    let log = fetcher.log();
    assert!(log.contains("input s3://inputs/data/: 7 objects"), "{log}");
    assert!(log.contains(&format!("100000 objects in {} chunks", chunks_of(&sizes, 100))), "{log}");
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
    assert!(report.contains("100000 expected, 100000 found, 0 missing, 0 duplicated, 0 wrong"), "{report}");
}

#[test]
fn a_zstd_object_in_s3_is_decompressed_once_and_verifies() {
    let s3 = S3Server::start();
    let mut p = Pipeline::new(2000, 0);
    let plain = std::fs::read(&p.input).expect("input");
    s3.create_bucket("inputs");
    s3.put("inputs", "users.jsonl.zst", &zstd::encode_all(&plain[..], 3).expect("zstd"));
    p.input = "s3://inputs/users.jsonl.zst".into();
    p.input_env = s3.env();
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&[]);
    finish(&mut fetcher, Duration::from_secs(120));
    assert!(fetcher.log().contains("2000 objects in 20 chunks"), "{}", fetcher.log());
    let spool: Vec<_> = std::fs::read_dir(p.state_dir().join("spool")).expect("spool dir").flatten().collect();
    assert_eq!(spool.len(), 1, "one spool file, the decompressed object");
    assert_eq!(spool[0].metadata().expect("metadata").len(), plain.len() as u64);
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
    assert!(report.contains("2000 expected, 2000 found, 0 missing, 0 duplicated, 0 wrong"), "{report}");
}

#[test]
fn an_s3_server_restarted_mid_run_is_ridden_out_and_the_run_verifies() {
    let mut s3 = S3Server::start();
    // The fetcher reaches the store through a proxy, cut while moto restarts: moto keeps its
    // objects in memory, so the new one must have them again (same bytes, same ETags) before the
    // fetcher sees it, as a restarted store with durable data would.
    let proxy = TcpProxy::start(s3.port());
    let mut p = Pipeline::new(300, 20_000);
    let users = lines(&p);
    let objects = upload_sized(&s3, "inputs", &users, &[100, 100, 100]);
    p.input = "s3://inputs/data/".into();
    p.input_env = s3.env_at(&format!("http://127.0.0.1:{}", proxy.port()));
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("slow-mapper", &["--threads", "1", "--concurrency", "1"]);
    let (mut fetcher, port) = p.fetcher_named("fetcher", &["--exit-when-done", "--chunk-size", "10"]);
    p.wait_saved(2, Duration::from_secs(60));
    proxy.cut();
    s3.restart();
    // The fetcher's next chunk read fails and is retried; its metrics still answer meanwhile
    // (the read does not hold the fetcher's runtime).
    wait_until("the fetcher to count a failed store request", Duration::from_secs(30), || {
        store_failures(port).is_some_and(|n| n >= 1.0)
    });
    s3.create_bucket("inputs");
    for (key, body) in &objects {
        s3.put("inputs", key, body);
    }
    proxy.restore();
    finish(&mut fetcher, Duration::from_secs(120));
    let log = fetcher.log();
    assert!(
        !log.contains("changed after it was listed"),
        "a restarted store with the same data is the same input: {log}"
    );
    assert_eq!(p.summary_number("fetcher", "/dead"), 0, "{log}");
    let (ok, report) = p.verify_with_flags(&["--chunk-size", "10"]);
    assert!(ok, "{report}");
    assert!(report.contains("300 expected, 300 found, 0 missing, 0 duplicated, 0 wrong"), "{report}");
}

#[test]
fn a_store_down_longer_than_ten_quick_retries_at_start_is_waited_for_and_the_run_verifies() {
    // The retries are bounded in time, not in count: ten jittered retries can all fall within
    // about two seconds, and a fetcher that gave up then would fail its run on a store restart.
    let s3 = S3Server::start();
    let proxy = TcpProxy::start(s3.port());
    let mut p = Pipeline::new(300, 0);
    let users = lines(&p);
    upload_sized(&s3, "inputs", &users, &[100, 100, 100]);
    p.input = "s3://inputs/data/".into();
    p.input_env = s3.env_at(&format!("http://127.0.0.1:{}", proxy.port()));
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    proxy.cut();
    let (mut fetcher, port) = p.fetcher_named("fetcher", &["--exit-when-done", "--chunk-size", "10"]);
    // Ten retries of one request make eleven failures; the fetcher must still be waiting after more.
    wait_until("the fetcher to count 14 failed store requests and still be waiting", Duration::from_secs(60), || {
        assert!(fetcher.wait_exit(Duration::ZERO).is_none(), "the fetcher gave up on the store:\n{}", fetcher.log());
        store_failures(port).is_some_and(|n| n >= 14.0)
    });
    proxy.restore();
    finish(&mut fetcher, Duration::from_secs(120));
    let (ok, report) = p.verify_with_flags(&["--chunk-size", "10"]);
    assert!(ok, "{report}");
    assert!(report.contains("300 expected, 300 found, 0 missing, 0 duplicated, 0 wrong"), "{report}");
}

/// Runs a fetcher that must fail at once on `p`'s input; returns its log, checked for the secret.
fn fails_fast(p: &Pipeline, secret: &str) -> String {
    let started = Instant::now();
    let mut fetcher = p.fetcher(&[]);
    let code = fetcher.wait_exit(Duration::from_secs(30));
    let log = fetcher.log();
    assert_eq!(code, Some(1), "the fetcher must fail: {log}");
    assert!(started.elapsed() < Duration::from_secs(15), "it took {:?} to fail: {log}", started.elapsed());
    assert!(!log.contains(secret), "the secret key is never logged: {log}");
    log
}

const SECRET: &str = "wrong-secret-5f1c9a0b7e";

#[test]
fn a_wrong_s3_key_stops_the_fetcher_at_once_naming_the_key_settings_never_the_secret() {
    let s3 = S3Server::start();
    let mut p = Pipeline::new(100, 0);
    s3.create_bucket("inputs");
    s3.put("inputs", "users.jsonl", &std::fs::read(&p.input).expect("input"));
    s3.enforce_auth();
    p.input = "s3://inputs/users.jsonl".into();
    p.input_env = s3.env();
    for (name, value) in &mut p.input_env {
        match *name {
            "AWS_ACCESS_KEY_ID" => *value = "AKIAWRONGKEY0000".into(),
            "AWS_SECRET_ACCESS_KEY" => *value = SECRET.into(),
            _ => {}
        }
    }
    let log = fails_fast(&p, SECRET);
    assert!(log.contains("access to s3://inputs/users.jsonl was refused"), "{log}");
    assert!(log.contains("AWS_ACCESS_KEY_ID") && log.contains("AWS_SECRET_ACCESS_KEY"), "{log}");
}

#[test]
fn a_missing_bucket_stops_the_fetcher_at_once_naming_the_input() {
    let s3 = S3Server::start();
    let mut p = Pipeline::new(100, 0);
    s3.create_bucket("inputs");
    p.input = "s3://no-such-bucket/data/".into();
    p.input_env = s3.env();
    let log = fails_fast(&p, "test-secret-key");
    assert!(log.contains("s3://no-such-bucket does not exist"), "{log}");
    assert!(log.contains("bucket name in --input") && log.contains("AWS_ENDPOINT_URL"), "{log}");
}

#[test]
fn a_missing_s3_object_stops_the_fetcher_at_once_naming_the_input() {
    let s3 = S3Server::start();
    let mut p = Pipeline::new(100, 0);
    s3.create_bucket("inputs");
    s3.put("inputs", "users.jsonl", &std::fs::read(&p.input).expect("input"));
    p.input = "s3://inputs/user.jsonl".into();
    p.input_env = s3.env();
    let log = fails_fast(&p, "test-secret-key");
    assert!(log.contains("s3://inputs/user.jsonl does not exist"), "{log}");
    assert!(log.contains("bucket and key in --input"), "{log}");
}

#[test]
fn a_fetcher_killed_mid_run_on_an_s3_input_resumes_without_re_leasing_saved_chunks() {
    let s3 = S3Server::start();
    let mut p = Pipeline::new(20_000, 300);
    let users = lines(&p);
    upload(&s3, "inputs", &users, 4);
    p.input = "s3://inputs/data/".into();
    p.input_env = s3.env();
    let _saver = p.saver("saver-1");
    let _m1 = p.mapper("mapper-1", &[]);
    let _m2 = p.mapper("mapper-2", &[]);
    let (mut first, _) = p.fetcher_named("fetcher-1", &["--exit-when-done"]);
    p.wait_saved(40, Duration::from_secs(120));
    first.kill();
    let ledger = std::fs::read_to_string(ledger_file(&p.state_dir())).expect("ledger file");
    let recorded = ledger.lines().filter(|l| l.starts_with("d ")).count() as u64;
    assert!((1..200).contains(&recorded), "killed at a useless moment: {recorded} chunks recorded");
    assert!(p.saved_chunks() as u64 >= recorded, "every chunk recorded done is in the sink");
    let (mut second, _) = p.fetcher_named("fetcher-2", &["--exit-when-done"]);
    finish(&mut second, Duration::from_secs(180));
    let log = second.log();
    assert!(log.contains(&format!("{recorded} chunks already done")), "{log}");
    // Chunks recorded as done are never handed out again; only the rest are leased.
    let granted = p.summary_number("fetcher-2", "/stats/leases_granted");
    assert!(granted <= 200 - recorded + 4, "{granted} leases for {} remaining chunks", 200 - recorded);
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
    assert!(report.contains("20000 expected, 20000 found, 0 missing, 0 duplicated, 0 wrong"), "{report}");
}

#[test]
fn a_file_behind_plain_http_is_read_by_range_a_window_at_a_time_and_verifies() {
    let mut p = Pipeline::new(2000, 0);
    let server = FileServer::start(p.input.clone(), "/data/users.jsonl");
    p.input = format!("{}/data/users.jsonl", server.base()).into();
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&[]);
    finish(&mut fetcher, Duration::from_secs(120));
    assert!(fetcher.log().contains("2000 objects in 20 chunks"), "{}", fetcher.log());
    // The 20 chunks (about 300 KB) are handed out in order: one ranged GET of a read-ahead
    // window serves them all, where a GET per chunk would be 20 round trips in the fetcher's loop.
    let ranged = server.ranged_requests();
    assert!((1..=3).contains(&ranged), "20 chunks read with {ranged} ranged GETs");
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
    assert!(report.contains("2000 expected, 2000 found, 0 missing, 0 duplicated, 0 wrong"), "{report}");
}
