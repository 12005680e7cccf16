//! End-to-end: what the fetcher does with hostile or broken surroundings (issue 36). A flood of
//! half-open connections on its metrics port while a run goes, and chunk reads and accepts that run
//! out of file descriptors: no chunk is dead-lettered, the run completes, the page still answers. A
//! gzip bomb: refused at the spool's limit, naming the object and the setting, by the fetcher and
//! by `saver verify`. An in-place edit of the input that keeps its size and modification time: the
//! run stops naming the object and saves nothing from the edited bytes. A record of a gigabyte: its
//! chunk is dead-lettered by its size while the fetcher's peak memory stays far below it. Extends
//! and releases of a lease by a mapper that does not hold it: refused and counted.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::harness::{http_get, metric_value};
use common::protocol::{self, LeaseRef, ReleaseReason, Subjects};
use support::{metric, wait_ready, wait_until, Pipeline};

const LONG: Duration = Duration::from_secs(120);

/// Sets the soft limit of open files of process `pid` (`prlimit`, util-linux; the hard limit
/// stays, so that the soft one can be raised again without privileges).
fn limit_open_files(pid: u32, limit: u64) {
    let status = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={limit}:")])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success(), "prlimit --pid {pid} --nofile={limit} failed");
}

/// Raises this test process's own limit of open files to at least `needed` (it opens many
/// connections).
fn allow_open_files(needed: u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    let hard: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|h| h.parse().ok())
        .unwrap_or(u64::MAX);
    assert!(hard >= needed, "this test opens {needed} connections; raise the hard limit of open files (ulimit -Hn)");
    limit_open_files(std::process::id(), hard.min(1 << 20));
}

/// Opens up to `count` connections to `port` that send half a request and then nothing
/// (slowloris), giving up on each after a short wait and on all after 20 s.
fn half_open_flood(port: u16, count: usize) -> Vec<TcpStream> {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    (0..count)
        .take_while(|_| std::time::Instant::now() < deadline)
        .filter_map(|_| {
            let mut stream = TcpStream::connect_timeout(&address, Duration::from_millis(100)).ok()?;
            let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n");
            Some(stream)
        })
        .collect()
}

#[test]
fn half_open_connections_on_the_metrics_port_neither_exhaust_descriptors_nor_dead_letter_a_chunk() {
    let p = Pipeline::new(20_000, 300);
    let (mut fetcher, port) = p.fetcher_named("fetcher", &["--chunk-size", "50"]);
    wait_ready(port);
    // The fetcher gets 256 descriptors; 1 100 half-open connections come while the run goes.
    limit_open_files(fetcher.pid(), 256);
    allow_open_files(2_000);
    let flood = std::thread::spawn(move || half_open_flood(port, 1_100));
    let _saver = p.saver("saver-1");
    let _m1 = p.mapper("mapper-1", &[]);
    let _m2 = p.mapper("mapper-2", &[]);
    let flood = flood.join().expect("the flood");
    fetcher.wait_for_log(" complete: ", LONG);
    let log = fetcher.log();
    assert!(log.contains(" 0 chunks dead-lettered") && !log.contains("Too many open files"), "{log}");
    // The page answers again once the half-open connections it holds time out.
    wait_until("the status page to answer", LONG, || matches!(http_get(port, "/"), Ok((200, _))));
    let (_, metrics) = http_get(port, "/metrics").expect("metrics");
    let refused = metric_value(&metrics, "chunkmill_http_connections_refused_total").expect("refused series");
    assert!(flood.len() > 1_000 && refused > 900.0, "{} connections made, {refused} refused", flood.len());
    fetcher.kill();
    drop(flood);
    let (ok, report) = p.verify_with_flags(&["--chunk-size", "50"]);
    assert!(ok && report.contains("20000 found, 0 missing"), "{report}");
}

#[test]
fn a_chunk_read_or_an_accept_that_runs_out_of_file_descriptors_waits_and_dead_letters_nothing() {
    let p = Pipeline::new(1_000, 0);
    let (mut fetcher, port) = p.fetcher_named("fetcher", &[]);
    wait_ready(port);
    // Not one descriptor left: every chunk read (which opens the input file) fails with EMFILE.
    // (A limit at the lowest free number would do, but a connection closing meanwhile frees a
    // lower one; stdin, stdout and stderr are 0 to 2, so a limit of 3 leaves none.)
    let pid = fetcher.pid();
    limit_open_files(pid, 3);
    let started = std::time::Instant::now();
    // A connection to the metrics port meanwhile: every accept of it fails with EMFILE (the
    // connection stays queued), which must be retried after a wait, not in a tight loop.
    let waiting = TcpStream::connect(("127.0.0.1", port)).expect("connects (queued by the kernel)");
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    fetcher.wait_for_log("cannot read chunk 0 now", LONG);
    fetcher.wait_for_log("metrics endpoint: accept failed", LONG);
    let log = fetcher.log();
    assert!(log.contains("Too many open files"), "{log}");
    limit_open_files(pid, 1024);
    let short = started.elapsed().as_secs_f64();
    drop(waiting);
    wait_until("the run to complete", LONG, || {
        metric(port, "chunkmill_fetcher_run_complete_timestamp_seconds").is_some_and(|t| t > 0.0)
    });
    let errors = metric(port, "chunkmill_http_accept_errors_total").expect("accept errors series");
    // Waits of 100 ms doubling to 1 s: about one failed accept a second (a spin made millions).
    assert!((1.0..=short + 10.0).contains(&errors), "{errors} failed accepts in {short:.1} s");
    let log = fetcher.log();
    let warned = log.matches("accept failed").count() as f64;
    assert!(warned <= short / 10.0 + 2.0, "{warned} accept warnings in {short:.1} s");
    assert_eq!(metric(port, "chunkmill_fetcher_chunks{state=\"dead_lettered\"}"), Some(0.0), "{log}");
    fetcher.kill();
    let (ok, report) = p.verify();
    assert!(ok && report.contains("1000 found, 0 missing"), "{report}");
}

/// `text` repeated until `bytes`, gzipped (fast level: a bomb's ratio).
fn gzip_repeated(text: &str, bytes: usize, path: &Path) {
    let file = std::fs::File::create(path).expect("create");
    let mut encoder = flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::fast());
    let block = text.repeat((1 << 20) / text.len());
    let mut written = 0;
    while written < bytes {
        encoder.write_all(block.as_bytes()).expect("gzip");
        written += block.len();
    }
    encoder.finish().expect("gzip").flush().expect("flush");
}

#[test]
fn a_gzip_bomb_is_refused_at_the_spool_limit_naming_the_object_and_the_setting() {
    let mut p = Pipeline::orders(10, &["--transform", "jq", "--filter", "."]);
    // 160 MiB of records in a few hundred kB: past the 64 MiB any object may inflate to, and
    // far past 100 times its size.
    let bomb = p.dir.path().join("bomb.jsonl.gz");
    gzip_repeated("{\"a\":1}\n", 160 << 20, &bomb);
    let stored = std::fs::metadata(&bomb).expect("bomb").len();
    assert!(stored < 2 << 20, "{stored} bytes: not a bomb");
    p.input = bomb.clone();
    let mut fetcher = p.fetcher(&[]);
    assert_eq!(fetcher.wait_exit(LONG), Some(1), "{}", fetcher.log());
    let log = fetcher.log();
    let name = std::fs::canonicalize(&bomb).expect("path").display().to_string();
    assert!(log.contains(&format!("input object {name} decompresses to more than")), "{log}");
    assert!(log.contains("--spool-max-ratio"), "{log}");
    let spool: Vec<_> = std::fs::read_dir(p.state_dir().join("spool")).expect("spool").flatten().collect();
    assert!(spool.is_empty(), "the partial spool file is removed: {spool:?}");
    let (ok, report) = p.verify();
    assert!(!ok && report.contains(&name) && report.contains("--spool-max-ratio"), "{report}");

    // An honest object past the spool's whole size: refused by --spool-max-size.
    let honest = p.dir.path().join("orders.jsonl.gz");
    let orders = std::fs::read(p.dir.path().join("orders.jsonl")).expect("orders");
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(&orders).expect("gzip");
    std::fs::write(&honest, encoder.finish().expect("gzip")).expect("write");
    p.input = honest;
    let mut fetcher = p.fetcher(&["--spool-max-size", "1KiB"]);
    assert_eq!(fetcher.wait_exit(LONG), Some(1), "{}", fetcher.log());
    let log = fetcher.log();
    assert!(log.contains("orders.jsonl.gz") && log.contains("--spool-max-size, 1024 bytes"), "{log}");
}

#[test]
fn an_in_place_edit_that_keeps_size_and_mtime_stops_the_run_naming_the_object_and_saves_nothing_edited() {
    let p = Pipeline::new(210, 100_000);
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("slow-mapper", &["--threads", "1", "--concurrency", "1"]);
    let run = p.run_id_at(10);
    let mut fetcher = p.fetcher(&["--chunk-size", "10"]);
    p.wait_saved(2, LONG);
    // As `rsync --inplace` or `cp -p` would: the same file (inode), the same size, the same
    // modification time; the first names of the last 100 records become Z...Z.
    let reference = p.dir.path().join("mtime");
    assert!(Command::new("touch").arg("-r").arg(&p.input).arg(&reference).status().expect("touch").success());
    let text = std::fs::read_to_string(&p.input).expect("input");
    let edited: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, line)| {
            if i < 110 {
                return line.to_string();
            }
            let mut user: serde_json::Value = serde_json::from_str(line).expect("user");
            let first = user["fn"].as_str().expect("fn").len();
            user["fn"] = "Z".repeat(first).into();
            serde_json::to_string(&user).expect("json")
        })
        .collect();
    let edited = edited.join("\n") + "\n";
    assert_eq!(edited.len(), text.len(), "the edit keeps the size");
    // The fetcher is paused meanwhile, so that it never sees the new modification time between
    // the write and its restoration: the edit looks atomic, as a quick `rsync --inplace` does.
    fetcher.signal("STOP");
    let mut file = std::fs::OpenOptions::new().write(true).open(&p.input).expect("open in place");
    file.write_all(edited.as_bytes()).expect("edit in place");
    file.sync_all().expect("sync");
    drop(file);
    assert!(Command::new("touch").arg("-r").arg(&reference).arg(&p.input).status().expect("touch").success());
    fetcher.signal("CONT");

    let code = fetcher.wait_exit(LONG);
    let log = fetcher.log();
    assert_ne!(code, Some(0), "the run must not complete on an edited input: {log}");
    let name = std::fs::canonicalize(&p.input).expect("path").display().to_string();
    assert!(log.contains(&format!("input object {name} changed since it was scanned")), "{log}");
    assert!(log.contains("chunks were not handed out because their input changed"), "{log}");
    let saved: String = std::fs::read_dir(p.out.join(run))
        .expect("run directory")
        .flatten()
        .filter(|f| f.file_name().to_string_lossy().starts_with("part-"))
        .map(|f| std::fs::read_to_string(f.path()).expect("part file"))
        .collect();
    assert!(!saved.is_empty(), "chunks before the edit were saved");
    assert!(!saved.contains("ZZZ"), "a value was made from the edited bytes");
}

/// The fetcher's peak resident memory (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmHWM");
    kib * 1024
}

#[test]
fn a_record_of_a_gigabyte_is_dead_lettered_by_its_size_without_the_fetcher_ever_holding_it() {
    const RECORD: usize = 1 << 30;
    let p = Pipeline::new(300, 0);
    let text = std::fs::read_to_string(&p.input).expect("input");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&p.input).expect("rewrite input"));
    for (i, line) in text.lines().enumerate() {
        if i == 150 {
            // Line 151: a user whose first name is a gigabyte long.
            write!(file, "{{\"uuid\":\"00000000-0000-4000-8000-0000000000ff\",\"fn\":\"").expect("write");
            let block = vec![b'x'; 1 << 20];
            for _ in 0..RECORD >> 20 {
                file.write_all(&block).expect("write");
            }
            writeln!(file, "\",\"ln\":\"Huge\",\"friends\":[]}}").expect("write");
        }
        writeln!(file, "{line}").expect("write");
    }
    file.flush().expect("flush");
    drop(file);
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    let (mut fetcher, port) = p.fetcher_named("fetcher", &[]);
    wait_until("the run to complete", LONG, || {
        metric(port, "chunkmill_fetcher_run_complete_timestamp_seconds").is_some_and(|t| t > 0.0)
    });
    let peak = peak_rss(fetcher.pid());
    fetcher.kill();
    eprintln!("the fetcher's peak RSS: {} MiB", peak >> 20);
    assert!(peak < (RECORD / 4) as u64, "the fetcher's peak RSS was {} MiB for a 1 GiB record", peak >> 20);
    let log = fetcher.log();
    assert!(log.contains("chunk 1 (input line 101) holds") && log.contains("without reading it"), "{log}");
    let dead =
        std::fs::read_to_string(p.state_dir().join(format!("{}.dead-letter.jsonl", p.run_id()))).expect("dead letters");
    assert_eq!(dead.lines().count(), 1, "{dead}");
    assert!(dead.contains("\"chunk\":1") && dead.contains("max_payload"), "{dead}");
    let (ok, report) = p.verify();
    assert!(ok && report.contains("201 found") && report.contains("100 dead-lettered"), "{report}");
}

#[test]
fn extends_and_releases_from_a_mapper_that_does_not_hold_the_lease_are_refused_and_counted() {
    let p = Pipeline::new(100, 0);
    let (fetcher, port) = p.fetcher_named("fetcher", &["--lease-timeout", "2s"]);
    wait_ready(port);
    let subjects = Subjects::new("chunkmill");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let client = async_nats::connect(p.nats.url()).await.expect("connect");
        let reply = client.request(subjects.work.clone(), support::work_request("holder", 1)).await.expect("work");
        let reply: protocol::WorkReply = protocol::decode(&reply.payload).expect("decodes");
        let held = &reply.chunks[0].head;
        let lease = LeaseRef { chunk: held.chunk, lease: held.lease };
        let release = |mapper: &str, reason: ReleaseReason| {
            protocol::encode(&protocol::ReleaseRequest {
                v: protocol::VERSION,
                mapper: mapper.into(),
                lease,
                reason,
                error: Some("forged".into()),
            })
        };
        let extend = |mapper: &str| {
            protocol::encode(&protocol::ExtendRequest {
                v: protocol::VERSION,
                mapper: mapper.into(),
                leases: vec![lease],
            })
        };
        // Another mapper that saw the lease id: three failed releases (which would dead-letter
        // the chunk), a `cannot_run` (which would bar the holder) and an extension.
        for reason in [ReleaseReason::Failed, ReleaseReason::Failed, ReleaseReason::Failed, ReleaseReason::CannotRun] {
            let answer = client.request(subjects.release.clone(), release("intruder", reason)).await.expect("release");
            let answer: protocol::ReleaseReply = protocol::decode(&answer.payload).expect("decodes");
            assert!(!answer.accepted, "a release of another mapper's lease was accepted");
        }
        let answer = client.request(subjects.extend.clone(), extend("intruder")).await.expect("extend");
        let answer: protocol::ExtendReply = protocol::decode(&answer.payload).expect("decodes");
        assert_eq!(answer.valid, [false], "another mapper's lease was extended");
        // The holder still holds it, and may hand it back.
        let answer = client.request(subjects.extend.clone(), extend("holder")).await.expect("extend");
        let answer: protocol::ExtendReply = protocol::decode(&answer.payload).expect("decodes");
        assert_eq!(answer.valid, [true], "the holder lost its lease");
        let answer = client
            .request(subjects.release.clone(), release("holder", ReleaseReason::Shutdown))
            .await
            .expect("release");
        let answer: protocol::ReleaseReply = protocol::decode(&answer.payload).expect("decodes");
        assert!(answer.accepted, "the holder's release was refused");
        // The holder is not barred: it gets the chunk again.
        let again = client.request(subjects.work.clone(), support::work_request("holder", 1)).await.expect("work");
        let again: protocol::WorkReply = protocol::decode(&again.payload).expect("decodes");
        assert_eq!(again.chunks.first().map(|c| c.head.chunk), Some(held.chunk), "{again:?}");
    });
    let refused = metric(port, "chunkmill_fetcher_refused_requests_total{reason=\"not_lease_holder\"}");
    assert_eq!(refused, Some(5.0), "every refusal is counted");
    let log = fetcher.log();
    assert!(log.contains("refused a release of chunk 0's lease from intruder: the lease is held by holder"), "{log}");
    assert_eq!(metric(port, "chunkmill_fetcher_chunks{state=\"dead_lettered\"}"), Some(0.0), "{log}");
}
