//! What an adversarial user found (issue 15), each as the reproduction that showed it: input
//! bytes that break a mapper, and peers that send what a well-behaved one never would. Every test
//! here failed before its fix.

mod support;

use std::time::Duration;

use bytes::Bytes;
use common::protocol::{self, ChunkLease, ReleaseReason, ReleaseRequest, Subjects, WorkRequest};
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
    assert_eq!(support::summary_number(&fetcher.log(), "re-leases"), 0, "{}", fetcher.log());
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
    let lease = ChunkLease {
        run: "0123456789abcdef".into(),
        chunk: 7,
        lease: uuid::Uuid::new_v4(),
        attempt: 1,
        lease_ms: 5000,
        first_line: 701,
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
        let objects = RAW_FF_RECORD.strip_suffix(b"\n").expect("record");
        let body = protocol::encode_chunk_reply(&lease, objects);
        client.publish(request.reply.expect("reply subject"), Bytes::from(body)).await.expect("reply");
        let message = tokio::time::timeout(LONG, releases.next()).await.expect("a release").expect("message");
        protocol::decode(&message.payload).expect("a release decodes")
    });
    assert_eq!((release.lease.chunk, release.lease.lease), (7, lease.lease), "{release:?}");
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
        let ask = protocol::encode(&WorkRequest { v: 1, mapper: "forger".into(), wait_ms: 1000 });
        loop {
            let reply = client.request(subjects.work.clone(), ask.clone()).await.expect("work reply");
            let work: protocol::WorkReply = protocol::decode(&reply.payload).expect("decodes");
            let (Some(lease), Some(objects)) = (work.lease, work.objects) else {
                if work.kind == protocol::WorkReplyKind::Done {
                    break;
                }
                continue;
            };
            let forged = protocol::ChunkResult {
                v: 1,
                run: lease.run,
                chunk: lease.chunk,
                lease: lease.lease,
                attempt: lease.attempt,
                mapper: "forger".into(),
                records: vec![],
                dead: (0..objects.len() as u32)
                    .map(|index| protocol::DeadObject { index, id: None, error: "forged".into() })
                    .collect(),
            };
            let saved = client.request(subjects.result.clone(), protocol::encode(&forged)).await.expect("saved");
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
