//! End-to-end: inputs where the data lives. Runs from an S3 prefix of several plain and gzip
//! objects (a real S3-compatible server, moto, on 127.0.0.1), an object rewritten mid-run, a
//! restarted fetcher on changed input, a local glob and a local zstd file; each completes and
//! `saver verify` (reading the same input) says OK, or the fetcher stops naming what changed.

mod support;

use std::io::Write;
use std::time::Duration;

use support::s3::S3Server;
use support::{finish, wait_ready, Pipeline};

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
