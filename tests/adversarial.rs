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
