//! JetStream replicas end to end (issue 18, item 3): the fetcher's `--kv-replicas` and the
//! broadcaster's `--jetstream-replicas` reach the server, on a real 3-node nats-server cluster,
//! and a single server that cannot keep that many copies gives a clear error at once.

mod support;

use std::time::{Duration, Instant};

use common::harness::{free_port, NatsServer};
use support::{finish, wait_ready, Pipeline};

const LONG: Duration = Duration::from_secs(120);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// Two more servers joining `p.nats` (restarted as the first of them) into a 3-node JetStream
/// cluster; returned to be kept alive. Waits until the cluster places a 3-copy stream.
fn make_cluster(p: &mut Pipeline) -> Vec<NatsServer> {
    let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let all = routes.iter().map(|port| format!("nats://127.0.0.1:{port}")).collect::<Vec<_>>().join(",");
    let member = |i: usize| {
        let name = format!("n{i}");
        let listen = format!("nats://127.0.0.1:{}", routes[i]);
        let args = ["--server_name", &name, "--cluster_name", "chunkmill-test", "--cluster", &listen, "--routes", &all];
        NatsServer::start_with(&args)
    };
    p.nats = member(0);
    let others = vec![member(1), member(2)];
    runtime().block_on(async {
        let client = async_nats::connect(p.nats.url()).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let probe =
                async_nats::jetstream::stream::Config { name: "probe".into(), num_replicas: 3, ..Default::default() };
            match js.create_stream(probe).await {
                Ok(_) => break,
                Err(e) => assert!(Instant::now() < deadline, "the cluster never placed 3 copies: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        js.delete_stream("probe").await.expect("delete the probe stream");
    });
    others
}

/// The copies the server keeps of `stream`, and how many servers hold one (leader + followers).
/// A stream just changed to more copies lists its new followers a moment later: this waits (up
/// to 30 s) until as many servers hold a copy as its configuration asks for, then answers.
fn copies(url: &str, stream: &str) -> (usize, usize) {
    runtime().block_on(async {
        let client = async_nats::connect(url).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let info = js.get_stream(stream).await.expect(stream).info().await.expect("stream info").clone();
            let holders = info.cluster.map(|c| 1 + c.replicas.len()).unwrap_or(1);
            if holders == info.config.num_replicas || Instant::now() >= deadline {
                return (info.config.num_replicas, holders);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

fn broadcaster(p: &Pipeline, name: &str, extra: &[&str]) -> (common::harness::Service, u16) {
    let mut args = vec!["--instance".to_string(), name.to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let env = [("BROADCASTER_TARGET", "generic"), ("BROADCASTER_WEBHOOK_URL", "http://127.0.0.1:9/hook")];
    p.spawn_with_env(name, "broadcaster", &args, &env)
}

#[test]
fn on_a_three_node_cluster_the_ledger_the_events_and_the_claims_keep_three_copies() {
    let mut p = Pipeline::new(2_000, 0);
    let _cluster = make_cluster(&mut p);
    // The fetcher creates its buckets with three copies.
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&["--ledger", "kv", "--kv-replicas", "3"]);
    finish(&mut fetcher, LONG);
    for bucket in ["KV_chunkmill-ledger", "KV_chunkmill-ledger-lock"] {
        assert_eq!(copies(&p.nats.url(), bucket), (3, 3), "{bucket}");
    }
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
    // A broadcaster with the default creates one copy; one with 3 changes what exists to 3.
    let (mut first, port) = broadcaster(&p, "bcast-1", &[]);
    wait_ready(port);
    first.kill();
    assert_eq!(copies(&p.nats.url(), "CHUNKMILL_EVENTS").0, 1);
    let (_second, port) = broadcaster(&p, "bcast-2", &["--jetstream-replicas", "3"]);
    wait_ready(port);
    for stream in ["CHUNKMILL_EVENTS", "KV_chunkmill-broadcast"] {
        assert_eq!(copies(&p.nats.url(), stream), (3, 3), "{stream}");
    }
}

#[test]
fn a_fetcher_asking_a_single_server_for_three_ledger_copies_fails_at_once_naming_the_setting() {
    let p = Pipeline::new(1_000, 0);
    let mut fetcher = p.fetcher(&["--ledger", "kv", "--kv-replicas", "3"]);
    assert_eq!(fetcher.wait_exit(Duration::from_secs(30)), Some(1), "{}", fetcher.log());
    let log = fetcher.log();
    assert!(log.contains("cannot keep 3 copies") && log.contains("not clustered"), "{log}");
    assert!(log.contains("FETCHER_KV_REPLICAS"), "{log}");
}

#[test]
fn a_broadcaster_asking_a_single_server_for_three_copies_fails_at_once_naming_the_setting() {
    let p = Pipeline::new(10, 0);
    let (mut bcast, _) = broadcaster(&p, "bcast-1", &["--jetstream-replicas", "3"]);
    // At once: not after the 60 s that set-up retries a JetStream that is not there yet.
    assert_eq!(bcast.wait_exit(Duration::from_secs(20)), Some(1), "{}", bcast.log());
    let log = bcast.log();
    assert!(log.contains("cannot keep 3 copies") && log.contains("not clustered"), "{log}");
    assert!(log.contains("BROADCASTER_JETSTREAM_REPLICAS"), "{log}");
}
