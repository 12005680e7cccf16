//! The services' /metrics, /healthz and /readyz, scraped while and after a real pipeline runs.

mod support;

use std::time::{Duration, Instant};

use common::harness::{http_get, metric_value};
use support::Pipeline;

fn scrape(port: u16) -> String {
    let (status, body) = http_get(port, "/metrics").expect("scrape /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// Checks the exposition is well-formed Prometheus text: every sample line is
/// `name{labels} value`, every sampled metric has a TYPE line, and the values are numbers.
fn assert_prometheus_text(text: &str) {
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().expect("name");
            let kind = parts.next().expect("kind");
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{line}");
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        assert!(value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value), "bad value: {line}");
        let name = series.split('{').next().expect("name");
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "bad name: {line}");
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        assert!(typed.contains(name) || typed.contains(family), "no TYPE for {name}");
        if let Some(labels) = series.strip_prefix(name) {
            assert!(labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')), "bad labels: {line}");
        }
    }
}

#[test]
fn metrics_parse_and_count_a_whole_run() {
    let p = Pipeline::new(5_000, 0);
    let (_saver, saver_port) = p.spawn_with_metrics(
        "saver",
        "saver",
        &["--out".into(), p.out.display().to_string(), "--instance".into(), "saver-1".into()],
    );
    let (_mapper, mapper_port) = p.spawn_with_metrics("mapper", "mapper", &["--instance".into(), "mapper-1".into()]);
    // Deployment mode: the fetcher stays up after the run, so its final metrics can be read.
    let (_fetcher, fetcher_port) = p.spawn_with_metrics(
        "fetcher",
        "fetcher",
        &[
            "--input".into(),
            p.input.display().to_string(),
            "--state-dir".into(),
            p.state_dir().display().to_string(),
            "--rounds".into(),
            "0".into(),
        ],
    );

    let deadline = Instant::now() + Duration::from_secs(120);
    let fetcher = loop {
        if let Ok((200, text)) = http_get(fetcher_port, "/metrics") {
            if metric_value(&text, "chunkmill_fetcher_chunks{state=\"done\"}") == Some(50.0) {
                break text;
            }
        }
        assert!(Instant::now() < deadline, "the run did not complete within 120 s");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_prometheus_text(&fetcher);
    assert_eq!(metric_value(&fetcher, "chunkmill_fetcher_run_objects"), Some(5000.0));
    assert_eq!(metric_value(&fetcher, "chunkmill_fetcher_run_objects_done"), Some(5000.0));
    assert_eq!(metric_value(&fetcher, "chunkmill_fetcher_chunks{state=\"pending\"}"), Some(0.0));
    assert_eq!(metric_value(&fetcher, "chunkmill_fetcher_leases_granted_total"), Some(50.0));
    assert_eq!(metric_value(&fetcher, "chunkmill_fetcher_acks_total{verdict=\"done\"}"), Some(50.0));
    assert!(metric_value(&fetcher, "chunkmill_fetcher_run_complete_timestamp_seconds").unwrap_or(0.0) > 0.0);
    assert_eq!(metric_value(&fetcher, "chunkmill_nats_connected"), Some(1.0));

    let saver = scrape(saver_port);
    assert_prometheus_text(&saver);
    assert_eq!(metric_value(&saver, "chunkmill_saver_chunks_saved_total"), Some(50.0));
    assert_eq!(metric_value(&saver, "chunkmill_saver_objects_saved_total"), Some(5000.0));
    assert_eq!(metric_value(&saver, "chunkmill_saver_write_duration_seconds_count"), Some(50.0));

    let mapper = scrape(mapper_port);
    assert_prometheus_text(&mapper);
    assert_eq!(metric_value(&mapper, "chunkmill_mapper_chunks_processed_total"), Some(50.0));
    assert_eq!(metric_value(&mapper, "chunkmill_mapper_objects_processed_total"), Some(5000.0));
    assert_eq!(metric_value(&mapper, "chunkmill_mapper_transform_duration_seconds_count"), Some(50.0));
    assert!(mapper.contains("chunkmill_build_info{commit="), "{mapper}");

    for port in [fetcher_port, saver_port, mapper_port] {
        assert_eq!(http_get(port, "/healthz").expect("healthz").0, 200);
        assert_eq!(http_get(port, "/readyz").expect("readyz").0, 200);
    }
}

/// The port a service fell back to, from its warning that the default one was taken.
fn fallback_port(log: &str) -> Option<u16> {
    let (_, rest) = log.split_once("is taken (another replica on this host?): serving on ")?;
    let addr = rest.split_whitespace().next()?;
    addr.rsplit_once(':')?.1.parse().ok()
}

#[test]
fn mappers_on_one_host_without_metrics_addr_take_free_ports_and_finish_the_run() {
    // The mapper's default port, taken as a second replica on the host finds it (by us, or by
    // whatever already listens there: taken either way).
    let _taken = std::net::TcpListener::bind(mapper::config::DEFAULT_METRICS_ADDR);
    let p = Pipeline::new(2_000, 0);
    let _saver = p.saver("saver-1");
    let mappers: Vec<_> = ["mapper-1", "mapper-2"]
        .into_iter()
        .map(|name| p.spawn_on_default_metrics(name, "mapper", &["--instance", name]))
        .collect();
    let ports: Vec<u16> = mappers
        .iter()
        .map(|m| {
            m.wait_for_log("is taken (another replica on this host?)", Duration::from_secs(30));
            fallback_port(&m.log()).unwrap_or_else(|| panic!("no fallback port in the log:\n{}", m.log()))
        })
        .collect();
    assert_ne!(ports[0], ports[1]);
    let mut fetcher = p.fetcher(&[]);
    support::finish(&mut fetcher, Duration::from_secs(120));
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
    let processed: f64 = ports
        .iter()
        .map(|&port| metric_value(&scrape(port), "chunkmill_mapper_chunks_processed_total").unwrap_or(0.0))
        .sum();
    assert!(processed >= 20.0, "both mappers serve their metrics on the ports they logged: {processed} chunks");
}

#[test]
fn readiness_follows_the_nats_connection() {
    let mut p = Pipeline::new(100, 0);
    let (_mapper, port) = p.spawn_with_metrics("mapper", "mapper", &[]);
    let wait_status = |want: u16| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((status, _)) = http_get(port, "/readyz") {
                if status == want {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "/readyz never answered {want}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_status(200);
    p.nats.stop();
    wait_status(503);
    assert_eq!(http_get(port, "/healthz").expect("healthz").0, 200, "alive while NATS is down");
    p.nats.restart();
    wait_status(200);
    let text = scrape(port);
    assert!(metric_value(&text, "chunkmill_nats_reconnects_total").unwrap_or(0.0) >= 1.0, "{text}");
}

/// Issue 17: every service joins the NATS service API (`nats micro ls`, `$SRV.PING`) with its
/// version and instance and serves its metrics on a `stats` endpoint, and `fetcher status`
/// answers how far the run is, per mapper, from the running fetcher.
#[test]
fn every_service_answers_the_nats_service_api_and_fetcher_status_follows_the_run() {
    use futures::StreamExt;
    let p = Pipeline::new(2_000, 0);
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    // Deployment mode: the fetcher stays up after the run and still answers.
    let (_fetcher, fetcher_port) = p.fetcher_named("fetcher", &[]);
    support::wait_ready(fetcher_port);
    let mut status = p.status();
    support::wait_until("fetcher status to say complete", Duration::from_secs(120), || {
        status = p.status();
        status.complete
    });
    assert_eq!(status.run, p.run_id());
    assert_eq!((status.chunks, status.done, status.pending, status.leased, status.dead), (20, 20, 0, 0, 0));
    assert_eq!((status.objects, status.objects_done), (2000, 2000));
    let mappers: Vec<_> = status.mappers.iter().map(|m| (m.name.as_str(), m.done, m.held, m.able)).collect();
    assert_eq!(mappers, [("mapper-1", 20, 0, true)]);
    let text = p.status_text();
    assert!(text.contains("chunks: 20/20 done (100.0%)") && text.contains("complete"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("mapper-1 ")), "{text}");

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let client = async_nats::connect(p.nats.url()).await.expect("connect");
        let request = |subject: String| {
            let client = client.clone();
            async move {
                let asked =
                    async_nats::Request::new().payload(bytes::Bytes::new()).timeout(Some(Duration::from_secs(10)));
                let answer = client.send_request(subject.clone(), asked).await;
                answer.unwrap_or_else(|e| panic!("no answer on {subject}: {e}")).payload
            }
        };
        // $SRV.PING: each service answers once, with its name, version and instance.
        let inbox = client.new_inbox();
        let mut replies = client.subscribe(inbox.clone()).await.expect("subscribe");
        client.publish_with_reply("$SRV.PING", inbox, bytes::Bytes::new()).await.expect("ping");
        let mut found = std::collections::BTreeMap::new();
        while found.len() < 3 {
            let reply = tokio::time::timeout(Duration::from_secs(10), replies.next()).await;
            let reply = reply.unwrap_or_else(|_| panic!("only {found:?} answered $SRV.PING")).expect("open");
            let ping: serde_json::Value = serde_json::from_slice(&reply.payload).expect("a JSON ping reply");
            assert_eq!(ping["version"], env!("CARGO_PKG_VERSION"), "{ping}");
            let name = ping["name"].as_str().expect("a name").to_string();
            found.insert(name, ping["metadata"]["instance"].as_str().unwrap_or_default().to_string());
        }
        assert_eq!(found["mapper"], "mapper-1");
        assert_eq!(found["saver"], "saver-1");
        assert!(found.contains_key("fetcher"), "{found:?}");
        // The fetcher's `status` endpoint counted the `fetcher status` requests above.
        let stats: serde_json::Value =
            serde_json::from_slice(&request("$SRV.STATS.fetcher".into()).await).expect("JSON");
        let endpoints = stats["endpoints"].as_array().expect("endpoints");
        let served = endpoints.iter().find(|e| e["name"] == "status").expect("a status endpoint");
        assert!(served["num_requests"].as_u64() >= Some(2), "{stats}");
        assert_eq!(served["subject"], "chunkmill.status");
        // A mapper's metrics over NATS, as on its /metrics (its count follows the savers'
        // replies, which may come after the fetcher's acks: polled).
        let subject = common::service::stats_subject("chunkmill", "mapper", "mapper-1");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = String::from_utf8(request(subject.clone()).await.to_vec()).expect("UTF-8 metrics");
            assert_prometheus_text(&text);
            let processed = metric_value(&text, "chunkmill_mapper_chunks_processed_total");
            if processed == Some(20.0) {
                break;
            }
            assert!(Instant::now() < deadline && processed < Some(20.0), "{text}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}
