//! Garbage on the pipeline's subjects: random bytes, unknown versions, forged acknowledgements
//! and results for chunks already done. Each is ignored, logged with its subject and counted,
//! and the run still completes correctly.

mod support;

use std::time::Duration;

use bytes::Bytes;
use common::protocol::{self, Ack, AckReply, AckRequest, AckVerdict, Subjects, VERSION};
use support::{metric, wait_ready, wait_until, Pipeline};

#[test]
fn garbage_on_every_subject_is_ignored_counted_and_the_run_completes() {
    let p = Pipeline::new(2_000, 0);
    let (saver, saver_port) = p.saver_with_metrics("saver-1");
    let (fetcher, fetcher_port) = p.fetcher_named("fetcher", &[]);
    wait_ready(fetcher_port);
    let subjects = Subjects::new("chunkmill");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let url = p.nats.url();
    let run = p.run_id();
    let forged_verdicts = runtime.block_on(async {
        let client = async_nats::connect(url).await.expect("connect");
        let garbage: [&[u8]; 4] = [b"\xff\x00\x13garbage", b"{\"v\":99}", b"[1,2,3]", b"{\"v\":2,\"nonsense\":true}"];
        for subject in [&subjects.work, &subjects.extend, &subjects.release, &subjects.ack, &subjects.result] {
            for payload in garbage {
                // Requests where the protocol expects them, so a saver has someone to refuse.
                let request = async_nats::Request::new()
                    .payload(Bytes::from_static(payload))
                    .timeout(Some(Duration::from_millis(300)));
                let _ = client.send_request(subject.clone(), request).await;
            }
        }
        // Forged acknowledgements: an unknown chunk, a wrong object count, another run.
        let forged = AckRequest {
            v: VERSION,
            saver: "forger".into(),
            sink: "dir-forged".into(),
            commit: false,
            acks: vec![
                Ack {
                    run: run.clone(),
                    chunk: protocol::ChunkId(999_999),
                    lease: uuid::Uuid::new_v4(),
                    attempt: 1,
                    objects: 100,
                    dead: 0,
                    outputs: 100,
                },
                Ack {
                    run: run.clone(),
                    chunk: protocol::ChunkId(3),
                    lease: uuid::Uuid::new_v4(),
                    attempt: 1,
                    objects: 7,
                    dead: 0,
                    outputs: 7,
                },
                Ack {
                    run: "0000000000000000".into(),
                    chunk: protocol::ChunkId(4),
                    lease: uuid::Uuid::new_v4(),
                    attempt: 1,
                    objects: 100,
                    dead: 0,
                    outputs: 100,
                },
            ],
        };
        let reply = client.request(subjects.ack.clone(), protocol::encode(&forged)).await.expect("ack reply");
        let reply: AckReply = protocol::decode(&reply.payload).expect("ack reply decodes");
        client.flush().await.expect("flush");
        reply.verdicts
    });
    assert_eq!(forged_verdicts, vec![AckVerdict::Unknown; 3]);

    let _mapper = p.mapper("mapper-1", &[]);
    wait_until("the run to complete", Duration::from_secs(120), || {
        metric(fetcher_port, "chunkmill_fetcher_chunks{state=\"done\"}") == Some(20.0)
    });
    for subject in [&subjects.work, &subjects.extend, &subjects.release, &subjects.ack] {
        let series = format!("chunkmill_malformed_messages_total{{subject=\"{subject}\"}}");
        assert_eq!(metric(fetcher_port, &series), Some(4.0), "{series}");
    }
    let series = format!("chunkmill_malformed_messages_total{{subject=\"{}\"}}", subjects.result);
    assert_eq!(metric(saver_port, &series), Some(4.0), "{series}");
    assert_eq!(metric(fetcher_port, "chunkmill_fetcher_acks_total{verdict=\"unknown\"}"), Some(3.0));
    assert!(fetcher.log().contains("WARN") && fetcher.log().contains("chunkmill.ack"), "{}", fetcher.log());
    assert!(saver.log().contains("rejecting a result"), "{}", saver.log());
    let (ok, report) = p.verify();
    assert!(ok && report.contains("2000 found"), "{report}");
}

#[test]
fn a_flood_past_a_subscription_buffer_is_counted_and_logged_and_no_work_is_lost() {
    let p = Pipeline::new(5_000, 0);
    let (fetcher, fetcher_port) = p.fetcher_named("fetcher", &[]);
    wait_ready(fetcher_port);
    let subjects = Subjects::new("chunkmill");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let url = p.nats.url();
    // 300 000 garbage messages, far past the client's 65 536-message subscription buffer, faster
    // than the fetcher can log and count them.
    runtime.block_on(async {
        let client = async_nats::connect(url).await.expect("connect");
        for _ in 0..300_000 {
            client.publish(subjects.extend.clone(), Bytes::from_static(b"x")).await.expect("publish");
        }
        client.flush().await.expect("flush");
    });
    wait_until("the slow-consumer event to be counted", Duration::from_secs(60), || {
        metric(fetcher_port, "chunkmill_nats_slow_consumer_events_total").unwrap_or(0.0) >= 1.0
    });
    assert!(fetcher.log().contains("NATS slow consumer"), "the event is logged too:\n{}", fetcher.log().len());
    // Real work still gets through: mappers' requests that were dropped are retried.
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    wait_until("the run to complete", Duration::from_secs(120), || {
        metric(fetcher_port, "chunkmill_fetcher_chunks{state=\"done\"}") == Some(50.0)
    });
    let (ok, report) = p.verify();
    assert!(ok && report.contains("5000 found"), "{report}");
}
