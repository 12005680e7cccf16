//! What an adversarial user found (issue 15), each as the reproduction that showed it: input
//! bytes that break a mapper, and peers that send what a well-behaved one never would. Every test
//! here failed before its fix.

mod support;

use std::time::Duration;

use bytes::Bytes;
use common::protocol::{self, ChunkHead, ChunksHead, ReleaseReason, ReleaseRequest, Subjects, WorkRequest};
use futures::StreamExt;
use support::Pipeline;

const LONG: Duration = Duration::from_secs(120);

/// The record from the report: valid users fields, and a raw 0xFF byte in a field nobody reads.
const RAW_FF_RECORD: &[u8] =
    b"{\"uuid\":\"0badc0de-0000-4000-8000-000000000001\",\"fn\":\"P\",\"ln\":\"Q\",\"friends\":[],\"note\":\"\xff\"}\n";

#[test]
fn a_record_with_a_byte_that_is_not_utf8_is_a_bad_record_named_by_line() {
    let p = Pipeline::new(299, 0);
    let mut input = std::fs::read(&p.input).expect("input");
    input.extend_from_slice(RAW_FF_RECORD);
    std::fs::write(&p.input, input).expect("write input");

    let (mut refused, _) = p.fetcher_named("fetcher-refused", &["--exit-when-done"]);
    assert_eq!(refused.wait_exit(Duration::from_secs(30)), Some(1), "{}", refused.log());
    let log = refused.log();
    assert!(log.contains("line 300") && log.contains("invalid UTF-8") && log.contains("0xFF"), "{log}");

    // Skipped on request, the run completes at once: no chunk goes round and round.
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    let (mut fetcher, _) = p.fetcher_named(
        "fetcher",
        &["--exit-when-done", "--bad-records", "skip", "--lease-timeout", "1s", "--max-attempts", "3"],
    );
    assert_eq!(fetcher.wait_exit(LONG), Some(3), "{}", fetcher.log());
    assert_eq!(p.summary_number("fetcher", "/stats/re_leases"), 0, "{}", fetcher.log());
    let (ok, report) = p.verify();
    assert!(ok && report.contains("299 expected, 299 found, 0 missing"), "{report}");
}

/// Plays the fetcher: answers the mapper's first work request with a chunk whose objects are
/// not UTF-8 (what a fetcher reading a file rewritten under it, or a buggy one, could send).
#[test]
fn a_chunk_the_mapper_cannot_decode_is_handed_back_as_failed() {
    let p = Pipeline::new(1, 0);
    let subjects = Subjects::new("chunkmill");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let url = p.nats.url();
    let lease = ChunkHead {
        chunk: protocol::ChunkId(7),
        lease: uuid::Uuid::new_v4(),
        attempt: 1,
        first_line: 701,
        lines: None,
        skip: vec![],
        probe: false,
    };
    let (client, mut work, mut releases) = runtime.block_on(async {
        let client = async_nats::connect(url).await.expect("connect");
        let work = client.subscribe(subjects.work.clone()).await.expect("subscribe work");
        let releases = client.subscribe(subjects.release.clone()).await.expect("subscribe release");
        client.flush().await.expect("flush");
        (client, work, releases)
    });
    let mapper = p.mapper("mapper-1", &["--concurrency", "1"]);
    let release: ReleaseRequest = runtime.block_on(async {
        let request = tokio::time::timeout(LONG, work.next()).await.expect("a work request").expect("message");
        let asked: WorkRequest = protocol::decode(&request.payload).expect("a work request decodes");
        assert_eq!(asked.mapper, "mapper-1");
        let objects = RAW_FF_RECORD.strip_suffix(b"\n").expect("record").to_vec();
        let head = ChunksHead { run: "0123456789abcdef", job: "00000000000000aa", lease_ms: 5000 };
        let body = protocol::encode_chunks_reply(&head, &[(lease.clone(), objects)]);
        client.publish(request.reply.expect("reply subject"), Bytes::from(body)).await.expect("reply");
        let message = tokio::time::timeout(LONG, releases.next()).await.expect("a release").expect("message");
        protocol::decode(&message.payload).expect("a release decodes")
    });
    assert_eq!((release.lease.chunk, release.lease.lease), (protocol::ChunkId(7), lease.lease), "{release:?}");
    assert_eq!(release.reason, ReleaseReason::Failed, "{release:?}");
    let error = release.error.unwrap_or_default();
    assert!(error.contains("cannot decode chunk 7"), "{error}");
    assert!(mapper.log().contains("handing it back as failed"), "{}", mapper.log());
}

/// Plays a mapper that forges results: every object of every chunk "dead", without its id. The
/// saver and the fetcher take them (they cannot know the input); verify must not.
#[test]
fn verify_does_not_count_dead_entries_that_name_no_object_of_their_chunk() {
    let p = Pipeline::new(500, 0);
    let _saver = p.saver("saver-1");
    // Deployment mode: the fetcher stays up and answers `done` once the run is complete.
    let (fetcher, port) = p.fetcher_named("fetcher", &[]);
    support::wait_ready(port);
    let subjects = Subjects::new("chunkmill");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let client = async_nats::connect(p.nats.url()).await.expect("connect");
        let ask = support::work_request("forger", 1);
        loop {
            let reply = client.request(subjects.work.clone(), ask.clone()).await.expect("work reply");
            let work: protocol::WorkReply = protocol::decode(&reply.payload).expect("decodes");
            if work.kind == protocol::WorkReplyKind::Done {
                break;
            }
            let Some(chunk) = work.chunks.first() else { continue };
            let head = protocol::ResultHead {
                run: work.run.clone().expect("run"),
                job: work.job.clone().expect("job"),
                chunk: chunk.head.chunk,
                lease: chunk.head.lease,
                attempt: chunk.head.attempt,
                mapper: "forger".into(),
            };
            let n = chunk.objects.len() as u32;
            let dead: Vec<protocol::DeadObject> = (0..n)
                .map(|index| protocol::DeadObject {
                    index,
                    id: None,
                    cause: protocol::Cause::Transform,
                    error: "forged".into(),
                    line: None,
                })
                .collect();
            let forged = protocol::encode_result(&head, (0..n).map(|_| std::iter::empty::<&[u8]>()), None, &dead);
            let saved = client.request(subjects.result.clone(), forged.into()).await.expect("saved");
            let saved: protocol::ResultReply = protocol::decode(&saved.payload).expect("decodes");
            assert_eq!(saved.status, protocol::ResultStatus::Saved, "{saved:?}");
        }
    });
    assert!(fetcher.log().contains("complete: 5/5 chunks done"), "{}", fetcher.log());
    let (ok, report) = p.verify();
    assert!(!ok, "{report}");
    assert!(report.contains("500 expected, 0 found, 500 missing"), "{report}");
    assert!(report.contains("0 dead-lettered") && report.contains("500 unmatched dead-letter entries"), "{report}");
}

/// The report: a full --state-dir made `Ledger::ack` mark chunks done in memory while their
/// record failed; the saver's resend then got `already_done`, the run "completed" with a 0-byte
/// ledger, and a restart handed every chunk out again. The state directory here is a small tmpfs
/// filled mid-run.
#[test]
fn a_full_state_disk_answers_no_ack_until_space_is_back_and_loses_nothing() {
    let p = Pipeline::new(30_000, 1000);
    let state = support::Tmpfs::mount(p.state_dir(), 256);
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &["--threads", "1", "--concurrency", "2"]);
    let (mut fetcher, port) = p.fetcher_named("fetcher", &["--chunk-size", "10"]);
    let done = || support::metric(port, "chunkmill_fetcher_chunks{state=\"done\"}").unwrap_or(-1.0);
    let errors = || support::metric(port, "chunkmill_fetcher_store_write_errors_total").unwrap_or(0.0);
    support::wait_until("30 chunks done", LONG, || done() >= 30.0);
    let filler = state.fill();
    // The ledger's last page still has room for a few hundred entries; then writes fail.
    support::wait_until("a failed ledger write", LONG, || errors() >= 1.0);
    let run = p.run_id_at(10);
    let ledger_path = p.state_dir().join(format!("{run}.ledger"));
    let recorded =
        || std::fs::read_to_string(&ledger_path).expect("ledger").lines().filter(|l| l.starts_with("d ")).count();
    let log = fetcher.log();
    assert!(log.contains("No space left on device") && log.contains("not answering acks"), "{log}");
    assert_eq!(support::metric(port, "chunkmill_fetcher_store_ok"), Some(0.0));
    assert!(matches!(common::harness::http_get(port, "/readyz"), Ok((503, _))), "not ready while the disk is full");
    // Savers resend; writes keep failing (small batches may still fit the last page), and no
    // chunk is done in memory that is not on disk: read the count first, then the file.
    support::wait_until("more failed ledger writes", LONG, || errors() >= 3.0);
    let (in_memory, on_disk) = (done(), recorded());
    assert!(in_memory as usize <= on_disk, "{in_memory} chunks done, {on_disk} recorded");
    assert!(in_memory < 3000.0, "the run went on as if the disk had room");
    assert_eq!(log.matches("No space left on device").count(), 1, "one clear line, not one per ack:\n{log}");

    std::fs::remove_file(filler).expect("free the space");
    support::wait_until("the run to complete", LONG, || done() == 3000.0);
    assert_eq!(support::metric(port, "chunkmill_fetcher_store_ok"), Some(1.0));
    support::wait_ready(port);
    assert!(fetcher.log().contains("the ledger store works again"), "{}", fetcher.log());
    fetcher.kill();

    // Every chunk is on disk: a restarted fetcher finds the run complete and leases nothing.
    let ledger = std::fs::read_to_string(&ledger_path).expect("ledger");
    let distinct: std::collections::BTreeSet<&str> = ledger.lines().filter(|l| l.starts_with("d ")).collect();
    assert_eq!(distinct.len(), 3000, "the ledger holds every chunk");
    let (mut again, _) = p.fetcher_named("fetcher-again", &["--chunk-size", "10", "--exit-when-done"]);
    assert_eq!(again.wait_exit(LONG), Some(0), "{}", again.log());
    assert!(again.log().contains("3000 chunks already done"), "{}", again.log());
    assert_eq!(p.summary_number("fetcher-again", "/stats/leases_granted"), 0);
    let (ok, report) = p.verify_with_flags(&["--chunk-size", "10"]);
    assert!(ok && report.contains("30000 found, 0 missing, 0 duplicated"), "{report}");
}

/// Issue 15, item 6: 1 000 held work requests with 500 kB mapper names took the fetcher to
/// 502 MiB (its Kubernetes limit is 256 Mi). Names are bounded, and so are held requests.
#[test]
fn oversized_names_and_a_flood_of_held_requests_are_refused_and_memory_stays_bounded() {
    let p = Pipeline::new(1_000, 0);
    let (fetcher, port) = p.fetcher_named("fetcher", &[]);
    support::wait_ready(port);
    let subjects = Subjects::new("chunkmill");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let idle_replies = runtime.block_on(async {
        let client = async_nats::connect(p.nats.url()).await.expect("connect");
        let inbox = client.new_inbox();
        let mut replies = client.subscribe(format!("{inbox}.>")).await.expect("subscribe");
        let huge = support::work_request(&"m".repeat(500_000), 1);
        for i in 0..1000 {
            client
                .publish_with_reply(subjects.work.clone(), format!("{inbox}.huge.{i}"), huge.clone())
                .await
                .expect("publish");
        }
        let valid = support::work_request("many", 1);
        for i in 0..3000 {
            client
                .publish_with_reply(subjects.work.clone(), format!("{inbox}.ok.{i}"), valid.clone())
                .await
                .expect("publish");
        }
        client.flush().await.expect("flush");
        // 10 requests get the run's 10 chunks, 1 024 are held: the rest are answered idle at once.
        let mut idle = 0;
        while idle < 3000 - 10 - 1024 {
            let reply =
                tokio::time::timeout(Duration::from_secs(30), replies.next()).await.expect("replies").expect("message");
            assert!(reply.subject.contains(".ok."), "an oversized request was answered: {}", reply.subject);
            let reply: protocol::WorkReply = protocol::decode(&reply.payload).expect("decodes");
            if reply.kind == protocol::WorkReplyKind::Idle {
                idle += 1;
            }
        }
        idle
    });
    assert_eq!(idle_replies, 3000 - 10 - 1024);
    support::wait_until("the oversized requests counted", LONG, || {
        support::metric(port, "chunkmill_malformed_messages_total{subject=\"chunkmill.work\"}") == Some(1000.0)
    });
    let refused = support::metric(port, "chunkmill_fetcher_refused_requests_total{reason=\"held_requests_full\"}");
    assert_eq!(refused, Some((3000 - 10 - 1024) as f64));
    let rss = support::metric(port, "process_resident_memory_bytes").expect("rss");
    assert!(rss < 64.0 * 1024.0 * 1024.0, "the fetcher holds {} MiB", rss / 1048576.0);
    let log = fetcher.log();
    assert!(log.contains("over the 65536 bytes"), "{log}");
    assert!(log.len() < 16 << 10, "a flood makes a few lines, not {} bytes of log", log.len());
}

/// Issue 15, item 7: a newline in a mapper's name or reason forged whole fetcher log lines, a
/// malformed-message warning quoted up to 200 kB, and a 20 s garbage flood wrote 221 MB of log.
#[test]
fn network_text_cannot_forge_log_lines_and_a_garbage_flood_logs_a_few_lines() {
    let p = Pipeline::new(1_000, 0);
    let (fetcher, port) = p.fetcher_named("fetcher", &[]);
    support::wait_ready(port);
    let subjects = Subjects::new("chunkmill");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let client = async_nats::connect(p.nats.url()).await.expect("connect");
        let name = "m1\nFORGED INFO fetcher: run complete".to_string();
        let ask = protocol::encode(&WorkRequest {
            v: 2,
            mapper: name.clone(),
            wait_ms: 0,
            max: 1,
            can: vec!["digest".into()],
        });
        let reply = client.request(subjects.work.clone(), ask).await.expect("work");
        let work = protocol::decode::<protocol::WorkReply>(&reply.payload).expect("decodes");
        let lease = work.chunks.first().expect("a chunk").head.clone();
        let release = ReleaseRequest {
            v: protocol::VERSION,
            mapper: name,
            lease: protocol::LeaseRef { chunk: lease.chunk, lease: lease.lease },
            reason: ReleaseReason::Failed,
            error: Some("boom\nFORGED ERROR fetcher: disk on fire".into()),
        };
        client.request(subjects.release.clone(), protocol::encode(&release)).await.expect("release");
        // A malformed message whose error quotes a 200 kB string, then a flood of garbage.
        let quoted = format!("{{\"v\":2,\"mapper\":\"m\",\"wait_ms\":\"{}\"}}", "x".repeat(3000));
        for subject in [&subjects.work, &subjects.extend, &subjects.release, &subjects.ack] {
            client.publish(subject.clone(), Bytes::from(quoted.clone())).await.expect("publish");
            for _ in 0..20_000 {
                client
                    .publish(subject.clone(), Bytes::from_static(b"{\"v\":2,\"nonsense\":\n1}"))
                    .await
                    .expect("publish");
            }
        }
        client.flush().await.expect("flush");
    });
    support::wait_until("the flood counted", LONG, || {
        let series = "chunkmill_malformed_messages_total{subject=\"chunkmill.ack\"}";
        support::metric(port, series).unwrap_or(0.0) >= 20_001.0
    });
    let log = fetcher.log();
    assert!(!log.lines().any(|l| l.starts_with("FORGED")), "a peer forged a log line:\n{log}");
    assert!(log.contains("m1\\nFORGED INFO") && log.contains("boom\\nFORGED ERROR"), "{log}");
    assert!(!log.contains(&"x".repeat(300)), "a warning quoted the payload at length:\n{log}");
    assert!(log.len() < 16 << 10, "{} bytes of log for a flood of 80 000 messages", log.len());
    // The fetcher still works: the run completes.
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    support::wait_until("the run to complete", LONG, || {
        support::metric(port, "chunkmill_fetcher_chunks{state=\"done\"}") == Some(10.0)
    });
}

/// Issue 15: an object that kills every mapper that touches it (abort, OOM) never comes back
/// as a failure, so its chunk used to be re-leased without end. The fetcher splits the chunk by
/// probes until the object is alone, dead-letters only it ("its mapper died N times"), and the
/// rest of the chunk is saved. The mappers here abort on that object (a test hook) and are
/// restarted, as Kubernetes restarts a crashed pod.
/// Found by the killer test below failing under load: a mapper killed while its request for more
/// work was held left that request with the fetcher. Once the dead mapper's lease expired it held
/// nothing, so its stale request looked like the best place for the next lease (or probe) of the
/// chunk; the chunk went to a dead inbox, expired again, and the death was blamed on the chunk.
/// Here a client plays the mapper that died: it holds chunk 0, asks for more, and goes silent.
#[test]
fn a_silent_mappers_held_request_gets_no_chunk_once_its_lease_expired() {
    let p = Pipeline::new(100, 0);
    let (_fetcher, port) = p.fetcher_named("fetcher", &["--lease-timeout", "1s"]);
    support::wait_ready(port);
    let subjects = Subjects::new("chunkmill");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let client = async_nats::connect(p.nats.url()).await.expect("connect");
        let first = client.request(subjects.work.clone(), support::work_request("dead", 1)).await.expect("work");
        let first: protocol::WorkReply = protocol::decode(&first.payload).expect("decodes");
        assert_eq!(first.chunks.iter().map(|c| (c.head.chunk.0, c.head.attempt)).collect::<Vec<_>>(), [(0, 1)]);
        // The dead mapper's last request, held (nothing is pending), then a live mapper's.
        let inbox = client.new_inbox();
        let mut dead_inbox = client.subscribe(inbox.clone()).await.expect("subscribe");
        client
            .publish_with_reply(subjects.work.clone(), inbox, support::work_request("dead", 1))
            .await
            .expect("publish");
        client.flush().await.expect("flush");
        let live = client.request(subjects.work.clone(), support::work_request("alive", 1)).await.expect("work");
        let live: protocol::WorkReply = protocol::decode(&live.payload).expect("decodes");
        let stale = tokio::time::timeout(LONG, dead_inbox.next()).await.expect("an answer").expect("message");
        let stale: protocol::WorkReply = protocol::decode(&stale.payload).expect("decodes");
        assert!(stale.chunks.is_empty(), "the silent mapper's request was handed a chunk: {stale:?}");
        assert_eq!(stale.kind, protocol::WorkReplyKind::Idle, "{stale:?}");
        assert_eq!(
            live.chunks.iter().map(|c| (c.head.chunk.0, c.head.attempt)).collect::<Vec<_>>(),
            [(0, 2)],
            "the expired chunk goes to the live mapper at once: {live:?}"
        );
    });
}

#[test]
fn an_object_that_kills_every_mapper_is_found_alone_and_only_it_is_dead_lettered() {
    let p = Pipeline::new(300, 0);
    let text = std::fs::read_to_string(&p.input).expect("input");
    let killer: serde_json::Value = serde_json::from_str(text.lines().nth(150).expect("line 151")).expect("json");
    let killer_id = killer["uuid"].as_str().expect("uuid").to_string();
    let _saver = p.saver("saver-1");
    let mut fetcher = p.fetcher(&["--lease-timeout", "1s", "--max-attempts", "2"]);
    let env = [("CHUNKMILL_TEST_ABORT_ID", killer_id.as_str())];
    let start =
        |n: usize| p.spawn_with_env(&format!("mapper-{n}"), "mapper", &["--instance".into(), format!("m-{n}")], &env).0;
    let mut mappers = [start(0), start(1)];
    let mut started = 2;
    // Restart any mapper that died, until the run is over.
    let code = loop {
        if let Some(code) = fetcher.wait_exit(Duration::from_millis(50)) {
            break Some(code);
        }
        for slot in mappers.iter_mut() {
            if slot.wait_exit(Duration::ZERO).is_some() || !slot.log().is_empty() && slot.pid() == 0 {
                *slot = start(started);
                started += 1;
            }
        }
        assert!(started < 60, "mappers keep dying: the search does not end\n{}", fetcher.log());
    };
    assert_eq!(code, Some(3), "complete, with one object dead-lettered:\n{}", fetcher.log());
    assert!(started > 2, "the hook killed no mapper: the test proves nothing");
    let log = fetcher.log();
    assert!(log.contains("probing its objects") && log.contains("kills every mapper"), "{log}");
    assert_eq!(p.summary_number("fetcher", "/dead"), 0, "{log}");
    let dead = p.saved_chunk(1).remove(0).dead;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let entry = serde_json::to_value(&dead[0]).expect("json");
    assert_eq!((entry["index"].as_u64(), entry["id"].as_str()), (Some(50), Some(killer_id.as_str())));
    assert_eq!(entry["cause"], "killed");
    assert!(entry["error"].as_str().unwrap_or_default().contains("its mapper died 2 times"), "{entry}");
    let (ok, report) = p.verify();
    assert!(
        ok && report.contains("300 expected, 299 found, 0 missing") && report.contains("1 dead-lettered"),
        "{report}"
    );
}
