//! End-to-end: what the fetcher does with hostile or broken surroundings (issue 36). Extends
//! and releases of a lease by a mapper that does not hold it: refused and counted.

mod support;

use common::protocol::{self, LeaseRef, ReleaseReason, Subjects};
use support::{metric, wait_ready, Pipeline};

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
