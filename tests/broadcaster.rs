//! The broadcaster end to end: real `broadcaster` processes, a real nats-server with JetStream,
//! and a local HTTP receiver standing in for each chat API. Each event must reach the chat at
//! most once, whatever happens to the replicas or the chat; and while a replica is healthy, it
//! must reach it.

#[path = "support/receiver.rs"]
mod receiver;
mod support;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use common::events::{Event, EventBody};
use common::harness::{free_port, NatsServer, Service};
use receiver::{Receiver, Reply};
use support::{finish, metric, wait_ready, wait_until, Pipeline};

const RUN: &str = "0123456789abcdef";

/// A broadcaster process with its metrics on a free port.
fn broadcaster(nats_url: &str, logs: &Path, name: &str, env: &[(&str, &str)], extra: &[&str]) -> (Service, u16) {
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let mut all_env = vec![("NATS_URL", nats_url), ("METRICS_ADDR", metrics.as_str())];
    all_env.extend_from_slice(env);
    let mut args = vec!["--instance", name];
    args.extend_from_slice(extra);
    (Service::spawn(name, "broadcaster", &args, &all_env, logs), port)
}

/// A distinct event per `n`: its chunk number makes its message text unique.
/// `n` broadcasters `bcast-0`.. on the pipeline's NATS, ready: they have created the event
/// stream, which a fetcher started before them would not find.
fn ready_broadcasters(p: &Pipeline, n: usize, env: &[(&'static str, &str)]) -> Vec<(Service, u16)> {
    let replicas: Vec<(Service, u16)> = (0..n)
        .map(|i| {
            let name = format!("bcast-{i}");
            p.spawn_with_env(&name, "broadcaster", &["--instance".to_string(), name.clone()], env)
        })
        .collect();
    for (_, port) in &replicas {
        wait_ready(*port);
    }
    replicas
}

fn dead_event(n: u64) -> Event {
    Event::new(
        RUN,
        EventBody::ChunkDead {
            chunk: common::protocol::ChunkId(n as u32),
            reason: format!("test failure {n}"),
            first_line: n * 100 + 1,
            objects: 100,
        },
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime")
}

/// Publishes `event` on its subject under `prefix` and waits for the stream's PubAck.
async fn publish(js: &jetstream::Context, prefix: &str, event: &Event, msg_id: &str) {
    let message = PublishMessage::build().message_id(msg_id).payload(common::protocol::encode(event));
    js.send_publish(event.subject(prefix), message)
        .await
        .expect("publish")
        .await
        .unwrap_or_else(|e| panic!("no PubAck for {}: {e}", event.id));
}

fn counts(texts: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for text in texts {
        *counts.entry(text.clone()).or_insert(0) += 1;
    }
    counts
}

fn assert_no_duplicates(texts: &[String]) {
    let doubled: Vec<_> = counts(texts).into_iter().filter(|(_, n)| *n > 1).collect();
    assert!(doubled.is_empty(), "messages delivered more than once: {doubled:?}");
}

fn sum_metric(ports: &[u16], series: &str) -> f64 {
    ports.iter().filter_map(|p| metric(*p, series)).sum()
}

#[test]
fn each_target_posts_the_body_its_api_documents_and_never_shows_its_secret() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let chat = Receiver::start();
    let url_file = dir.path().join("webhook-url");
    std::fs::write(&url_file, chat.url("/services/T0001/B0001/SLACKSECRET") + "\n").expect("write secret file");
    let url_file = url_file.to_str().expect("path").to_string();
    let generic_url = chat.url("/hook/GENERICSECRET");
    let discord_url = chat.url("/api/webhooks/1/DISCORDSECRET");
    let telegram_api = chat.url("");
    let targets: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("generic", vec![("BROADCASTER_WEBHOOK_URL", generic_url.as_str())]),
        ("slack", vec![("BROADCASTER_WEBHOOK_URL_FILE", url_file.as_str())]),
        ("discord", vec![("BROADCASTER_WEBHOOK_URL", discord_url.as_str())]),
        (
            "telegram",
            vec![
                ("BROADCASTER_TELEGRAM_TOKEN", "123456:TELEGRAMSECRET"),
                ("BROADCASTER_TELEGRAM_CHAT_ID", "-1001234"),
                ("BROADCASTER_TELEGRAM_API", telegram_api.as_str()),
            ],
        ),
    ];
    // One pipeline (subject prefix) per target, each with its own stream, consumer and bucket.
    let mut services = Vec::new();
    for (kind, secrets) in &targets {
        let mut env = vec![("BROADCASTER_TARGET", *kind), ("CHUNKMILL_SUBJECT_PREFIX", *kind)];
        env.extend(secrets.iter().copied());
        let stream = format!("EVENTS_{kind}");
        let bucket = format!("claims-{kind}");
        let (service, port) = broadcaster(
            &nats.url(),
            dir.path(),
            &format!("bcast-{kind}"),
            &env,
            &["--stream", &stream, "--dedup-bucket", &bucket],
        );
        services.push((service, port));
    }
    for (_, port) in &services {
        wait_ready(*port);
    }
    let event = Event::new(
        RUN,
        EventBody::Started { objects: 100_000, chunks: 1_000, chunk_size: 100, transform: String::new() },
    );
    let text = broadcaster::message::render(&event);
    assert_eq!(text, "Run 0123… started: 100 000 objects in 1 000 chunks of up to 100");
    runtime().block_on(async {
        let js = jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
        for (kind, _) in &targets {
            publish(&js, kind, &event, &event.id).await;
        }
    });
    wait_until("one message per target", Duration::from_secs(30), || chat.delivered().len() == 4);
    let by_path: BTreeMap<String, serde_json::Value> =
        chat.delivered().into_iter().map(|r| (r.path.clone(), r.body.clone())).collect();
    assert_eq!(by_path["/hook/GENERICSECRET"], serde_json::json!({"user": "bot", "message": text}));
    assert_eq!(by_path["/services/T0001/B0001/SLACKSECRET"], serde_json::json!({"text": text}));
    assert_eq!(
        by_path["/api/webhooks/1/DISCORDSECRET"],
        serde_json::json!({"content": text, "allowed_mentions": {"parse": []}})
    );
    assert_eq!(
        by_path["/bot123456:TELEGRAMSECRET/sendMessage"],
        serde_json::json!({"chat_id": -1001234, "text": text})
    );
    assert!(chat.requests().iter().all(|r| r.content_type == "application/json"));
    for (service, port) in &services {
        let log = service.log();
        assert!(log.contains("sent event 0123456789abcdef.started"), "{log}");
        let scraped = common::harness::http_get(*port, "/metrics").expect("metrics").1;
        for secret in ["SECRET", "/services/", "/hook/", "/api/webhooks"] {
            assert!(!log.contains(secret), "{} logs a secret part ({secret}):\n{log}", service.name);
            assert!(!scraped.contains(secret), "{} metrics show a secret part ({secret})", service.name);
        }
    }
    assert!(services[3].0.log().contains("/bot<token>/sendMessage"), "{}", services[3].0.log());
}

#[test]
fn a_4xx_is_logged_with_the_chats_answer_and_never_retried_and_a_429_waits_for_retry_after() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let refused = broadcaster::message::render(&dead_event(1));
    let limited = broadcaster::message::render(&dead_event(2));
    let first_try = AtomicBool::new(true);
    let chat = Receiver::scripted(move |_, text| match text {
        t if t == refused => Reply::Status(400),
        // The first request for event 2 is rate-limited for 2 s; the next one posts.
        t if t == limited && first_try.swap(false, Ordering::SeqCst) => Reply::TooMany(2),
        _ => Reply::Ok,
    });
    let url = chat.url("/hook/SECRETPATH");
    let env = [("BROADCASTER_TARGET", "generic"), ("BROADCASTER_WEBHOOK_URL", url.as_str())];
    let (service, port) = broadcaster(&nats.url(), dir.path(), "bcast-0", &env, &[]);
    wait_ready(port);
    runtime().block_on(async {
        let js = jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
        for n in [1, 2, 3] {
            publish(&js, "chunkmill", &dead_event(n), &dead_event(n).id).await;
        }
    });
    wait_until("events 2 and 3 posted", Duration::from_secs(30), || chat.delivered().len() == 2);
    let requests = chat.requests();
    let tries = |n: u64| {
        let text = broadcaster::message::render(&dead_event(n));
        requests.iter().filter(|r| r.text() == text).cloned().collect::<Vec<_>>()
    };
    assert_eq!(tries(1).len(), 1, "a 400 must not be retried");
    let limited_tries = tries(2);
    assert_eq!(limited_tries.iter().map(|r| r.reply).collect::<Vec<_>>(), [Reply::TooMany(2), Reply::Ok]);
    let waited = limited_tries[1].at.duration_since(limited_tries[0].at);
    assert!(waited >= Duration::from_secs(2), "retried {waited:?} after a 429 with Retry-After: 2");
    let log = service.log();
    let logged = r#"HTTP 400: {"ok":false,"error_code":400,"description":"scripted failure at /<redacted>"}"#;
    assert!(
        log.contains("giving up event 0123456789abcdef.dead.1")
            && log.contains(logged)
            && log.contains("[rejected_4xx]"),
        "{log}"
    );
    assert!(!log.contains("SECRETPATH"), "{log}");
    assert_eq!(metric(port, "chunkmill_broadcaster_events_failed_total{reason=\"rejected_4xx\"}"), Some(1.0));
    assert_eq!(metric(port, "chunkmill_broadcaster_http_429_total"), Some(1.0));
    assert_eq!(metric(port, "chunkmill_broadcaster_http_retries_total"), Some(1.0));
    assert_eq!(metric(port, "chunkmill_broadcaster_events_sent_total{kind=\"chunk_dead\"}"), Some(2.0));
}

#[test]
fn six_broadcasters_send_every_event_exactly_once_even_when_it_is_published_twice() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let chat = Receiver::start();
    let url = chat.url("/hook");
    let env = [("BROADCASTER_TARGET", "generic"), ("BROADCASTER_WEBHOOK_URL", url.as_str())];
    // Six in flight at once: replicas work in parallel and race for the same events' claims.
    let replicas: Vec<(Service, u16)> = (0..6)
        .map(|i| broadcaster(&nats.url(), dir.path(), &format!("bcast-{i}"), &env, &["--max-in-flight", "6"]))
        .collect();
    for (_, port) in &replicas {
        wait_ready(*port);
    }
    let events: Vec<Event> = (0..60).map(dead_event).collect();
    runtime().block_on(async {
        let js = jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
        for event in &events {
            publish(&js, "chunkmill", event, &event.id).await;
            // The same publish retried (same Nats-Msg-Id): the stream's duplicate window drops it.
            publish(&js, "chunkmill", event, &event.id).await;
        }
        // The same facts emitted again later (a restarted fetcher, past the duplicate window): the
        // stream stores them, and only the claims stop them.
        for event in events.iter().step_by(3) {
            publish(&js, "chunkmill", event, &format!("{}-again", event.id)).await;
        }
    });
    let ports: Vec<u16> = replicas.iter().map(|(_, p)| *p).collect();
    wait_until("every event sent and every repeat skipped", Duration::from_secs(40), || {
        sum_metric(&ports, "chunkmill_broadcaster_events_sent_total{kind=\"chunk_dead\"}") >= 60.0
            && sum_metric(&ports, "chunkmill_broadcaster_events_skipped_duplicate_total") >= 20.0
    });
    let texts = chat.texts();
    assert_no_duplicates(&texts);
    let expected: HashSet<String> = events.iter().map(broadcaster::message::render).collect();
    assert_eq!(texts.iter().cloned().collect::<HashSet<_>>(), expected);
    assert_eq!(texts.len(), 60);
    assert_eq!(sum_metric(&ports, "chunkmill_broadcaster_events_received_total"), 80.0);
    let busy = ports.iter().filter(|p| metric(**p, "chunkmill_broadcaster_events_received_total") > Some(0.0)).count();
    println!("{busy} of 6 replicas took events");
}

#[test]
fn killing_broadcasters_while_the_chat_answers_429_and_500_never_duplicates_an_event() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    // The chat refuses often: every 5th request with a 500, every 7th with 429 (Retry-After 1 s).
    let chat = Receiver::scripted(|n, _| match n {
        n if n % 7 == 3 => Reply::TooMany(1),
        n if n % 5 == 4 => Reply::Status(500),
        _ => Reply::Ok,
    });
    let url = chat.url("/hook");
    let env = [("BROADCASTER_TARGET", "generic"), ("BROADCASTER_WEBHOOK_URL", url.as_str())];
    // A short ack wait, so events held by a killed replica come back quickly.
    let extra = ["--max-in-flight", "6", "--ack-wait", "2s"];
    let spawn = |name: &str| broadcaster(&nats.url(), dir.path(), name, &env, &extra);
    let mut replicas: Vec<(Service, u16)> = (0..6).map(|i| spawn(&format!("bcast-{i}-0"))).collect();
    for (_, port) in &replicas {
        wait_ready(*port);
    }
    let events: Vec<Event> = (0..80).map(dead_event).collect();
    let publishing = Arc::new(AtomicBool::new(true));
    let publisher = {
        let (url, events, publishing) = (nats.url(), events.clone(), publishing.clone());
        std::thread::spawn(move || {
            runtime().block_on(async {
                let js = jetstream::new(async_nats::connect(url).await.expect("connect"));
                for event in &events {
                    publish(&js, "chunkmill", event, &event.id).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
            publishing.store(false, Ordering::SeqCst);
        })
    };
    // While events flow: SIGKILL a random replica every 0.3 to 0.9 s and start a new one in its
    // place, so one to six replicas are healthy at any moment.
    let mut killed = HashSet::new();
    let mut generation = 0;
    while publishing.load(Ordering::SeqCst) {
        let random = uuid::Uuid::new_v4().as_u128();
        std::thread::sleep(Duration::from_millis(300 + (random % 600) as u64));
        let victim = (random >> 64) as usize % replicas.len();
        replicas[victim].0.kill();
        killed.insert(replicas[victim].0.name.clone());
        generation += 1;
        replicas[victim] = spawn(&format!("bcast-{victim}-{generation}"));
    }
    publisher.join().expect("publisher thread");
    // Every event is either in the chat, or claimed by a replica that was killed before it could
    // send (the price of at most once). Nothing else may happen to it.
    let claims = |events: &[Event]| -> Vec<Option<String>> {
        runtime().block_on(async {
            let js = jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
            let kv = js.get_key_value("chunkmill-broadcast").await.expect("claims bucket");
            let mut out = Vec::new();
            for event in events {
                let value = kv.get(broadcaster::dedup_key(&event.id)).await.expect("read claim");
                out.push(value.map(|v| String::from_utf8_lossy(&v).to_string()));
            }
            out
        })
    };
    let expected: Vec<String> = events.iter().map(broadcaster::message::render).collect();
    let lost_to_a_kill = |claim: &Option<String>| {
        claim.as_deref().is_some_and(|c| {
            c.starts_with("claimed by ") && killed.iter().any(|k| c.starts_with(&format!("claimed by {k} ")))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    let (texts, missing) = loop {
        let texts = chat.texts();
        let delivered: HashSet<&String> = texts.iter().collect();
        let claims = claims(&events);
        let unexplained: Vec<usize> =
            (0..events.len()).filter(|i| !delivered.contains(&expected[*i]) && !lost_to_a_kill(&claims[*i])).collect();
        if unexplained.is_empty() {
            let missing: Vec<(usize, Option<String>)> = (0..events.len())
                .filter(|i| !delivered.contains(&expected[*i]))
                .map(|i| (i, claims[i].clone()))
                .collect();
            break (texts, missing);
        }
        assert!(
            Instant::now() < deadline,
            "events neither delivered nor claimed by a killed replica: {:?}",
            unexplained.iter().map(|i| (i, claims[*i].clone())).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_no_duplicates(&texts);
    let refused = chat.requests().iter().filter(|r| r.reply != Reply::Ok).count();
    println!(
        "{} kills, {} of {} events delivered once, {} lost with a killed replica {:?}, {} requests refused with 429/500",
        killed.len(),
        texts.len(),
        events.len(),
        missing.len(),
        missing,
        refused
    );
    assert!(refused >= 10, "the chat should have refused some requests ({refused})");
    assert!(missing.len() <= killed.len(), "each kill can lose at most the one event its replica held");
}

#[test]
fn a_full_run_with_six_broadcasters_tells_the_runs_story_once_and_in_order() {
    let p = Pipeline::new(3_000, 0);
    let chat = Receiver::start();
    let url = chat.url("/services/T1/B1/X");
    let env = [("BROADCASTER_TARGET", "slack"), ("BROADCASTER_WEBHOOK_URL", url.as_str())];
    let _replicas = ready_broadcasters(&p, 6, &env);
    let _saver = p.saver("saver-1");
    // One chunk at a time, so the run passes its milestones one by one (a mapper with many
    // results in flight can finish a run this small in one ack batch, with no milestone).
    let _mapper = p.mapper("mapper-1", &["--concurrency", "1", "--results-in-flight", "1"]);
    let mut fetcher = p.fetcher(&[]);
    finish(&mut fetcher, Duration::from_secs(60));
    wait_until("the run's completion in the chat", Duration::from_secs(30), || {
        chat.texts().iter().any(|t| t.contains(" finished: "))
    });
    let texts = chat.texts();
    println!("the chat shows:\n  {}", texts.join("\n  "));
    assert_no_duplicates(&texts);
    let run = &p.run_id()[..4];
    assert_eq!(
        texts[0],
        format!("Run {run}… started: 3 000 objects in 30 chunks of up to 100, through digest (0 rounds)")
    );
    let last = texts.last().expect("messages");
    assert!(last.starts_with(&format!("Run {run}… finished: 3 000 objects in ")), "{last}");
    assert!(last.ends_with(", 0 dead-lettered"), "{last}");
    // Milestones in between, in order (one event in flight at a time keeps the chat in order).
    let percents: Vec<u32> = texts[1..texts.len() - 1]
        .iter()
        .map(|t| {
            t.split(" is ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or_else(|| {
                panic!("not a milestone: {t}");
            })
        })
        .collect();
    assert!(!percents.is_empty(), "no milestone in {texts:?}");
    assert!(percents.windows(2).all(|w| w[0] < w[1]), "{percents:?}");
    assert!(percents.iter().all(|p| p % 10 == 0 && (10..=90).contains(p)), "{percents:?}");
    assert!(chat.delivered().iter().all(|r| r.path == "/services/T1/B1/X" && r.body.get("text").is_some()));
}

#[test]
fn a_fetcher_restarted_mid_run_is_announced_as_resumed_and_repeats_no_milestone() {
    let p = Pipeline::new(20_000, 300);
    let chat = Receiver::start();
    let url = chat.url("/hook");
    let env = [("BROADCASTER_TARGET", "generic"), ("BROADCASTER_WEBHOOK_URL", url.as_str())];
    let _replicas = ready_broadcasters(&p, 3, &env);
    let _saver = p.saver("saver-1");
    let _m1 = p.mapper("mapper-1", &[]);
    let _m2 = p.mapper("mapper-2", &[]);
    let (mut first, _) = p.fetcher_named("fetcher-1", &["--exit-when-done"]);
    p.wait_saved(50, Duration::from_secs(120));
    first.kill();
    let (mut second, _) = p.fetcher_named("fetcher-2", &["--exit-when-done"]);
    finish(&mut second, Duration::from_secs(120));
    wait_until("the run's completion in the chat", Duration::from_secs(30), || {
        chat.texts().iter().any(|t| t.contains(" finished: "))
    });
    let texts = chat.texts();
    println!("the chat shows:\n  {}", texts.join("\n  "));
    assert_no_duplicates(&texts);
    let run = &p.run_id()[..4];
    assert!(texts[0].starts_with(&format!("Run {run}… started: ")), "{texts:?}");
    let resumed: Vec<&String> = texts.iter().filter(|t| t.contains(" resumed by ")).collect();
    assert_eq!(resumed.len(), 1, "{texts:?}");
    assert!(resumed[0].contains(" after a restart: ") && resumed[0].contains(" of 200 chunks already done, "));
    assert!(texts.last().is_some_and(|t| t.contains(" finished: ")), "{texts:?}");
    // Milestones before and after the restart: each at most once, still rising.
    let percents: Vec<u32> = texts
        .iter()
        .filter_map(|t| t.split(" is ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()))
        .collect();
    assert!(!percents.is_empty() && percents.windows(2).all(|w| w[0] < w[1]), "{percents:?}");
}

/// Publishes until JetStream acknowledges (the same Nats-Msg-Id each time: no double store).
async fn publish_until_acked(js: &jetstream::Context, prefix: &str, event: &Event) {
    loop {
        let message = PublishMessage::build().message_id(&event.id).payload(common::protocol::encode(event));
        if let Ok(ack) = js.send_publish(event.subject(prefix), message).await {
            if ack.await.is_ok() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_nats_restart_while_events_flow_doubles_nothing() {
    let mut nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let chat = Receiver::start();
    let url = chat.url("/hook");
    let env = [("BROADCASTER_TARGET", "generic"), ("BROADCASTER_WEBHOOK_URL", url.as_str())];
    let replicas: Vec<(Service, u16)> = (0..6)
        .map(|i| {
            broadcaster(
                &nats.url(),
                dir.path(),
                &format!("bcast-{i}"),
                &env,
                &["--max-in-flight", "6", "--ack-wait", "2s"],
            )
        })
        .collect();
    for (_, port) in &replicas {
        wait_ready(*port);
    }
    let events: Vec<Event> = (0..60).map(dead_event).collect();
    let publisher = {
        let (url, events) = (nats.url(), events.clone());
        std::thread::spawn(move || {
            runtime().block_on(async {
                let js = jetstream::new(async_nats::connect(url).await.expect("connect"));
                for event in &events {
                    publish_until_acked(&js, "chunkmill", event).await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        })
    };
    wait_until("some events in the chat", Duration::from_secs(30), || chat.delivered().len() >= 10);
    nats.restart();
    for (service, _) in &replicas {
        service.wait_for_log("reconnected to NATS", Duration::from_secs(30));
    }
    publisher.join().expect("publisher thread");
    // Every event is in the chat, or its claim is in doubt (written, but its writer did not hear
    // so and left it): a miss, which at most once allows. Never twice.
    let expected: Vec<String> = events.iter().map(broadcaster::message::render).collect();
    let deadline = Instant::now() + Duration::from_secs(40);
    let (texts, missing) = loop {
        let texts = chat.texts();
        let delivered: HashSet<&String> = texts.iter().collect();
        let claims: Vec<Option<String>> = runtime().block_on(async {
            let js = jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
            let kv = js.get_key_value("chunkmill-broadcast").await.expect("claims bucket");
            let mut out = Vec::new();
            for event in &events {
                let value = kv.get(broadcaster::dedup_key(&event.id)).await.ok().flatten();
                out.push(value.map(|v| String::from_utf8_lossy(&v).to_string()));
            }
            out
        });
        let missing: Vec<(usize, Option<String>)> =
            (0..events.len()).filter(|i| !delivered.contains(&expected[*i])).map(|i| (i, claims[i].clone())).collect();
        if missing.iter().all(|(_, claim)| claim.as_deref().is_some_and(|c| c.starts_with("claimed by "))) {
            break (texts, missing);
        }
        assert!(Instant::now() < deadline, "events neither delivered nor claimed: {missing:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_no_duplicates(&texts);
    println!(
        "{} of {} events delivered once; in doubt after the restart, not sent: {missing:?}",
        texts.len(),
        events.len()
    );
    assert!(missing.len() <= replicas.len(), "at most one event in doubt per replica: {missing:?}");
}

/// The per-role NATS users (deploy/nats/values.yaml) allow each role all it needs: the fetcher
/// with its JetStream ledger and events, mappers, the saver and the broadcaster with its stream,
/// consumer and claims run a whole run without one permissions violation.
#[test]
fn every_role_runs_within_its_nats_permissions_with_the_kv_ledger_and_the_broadcaster() {
    let p = Pipeline::new(3_000, 0).with_role_users();
    let chat = Receiver::start();
    let url = chat.url("/services/T1/B1/X");
    let env = [("BROADCASTER_TARGET", "slack"), ("BROADCASTER_WEBHOOK_URL", url.as_str())];
    let _replicas = ready_broadcasters(&p, 1, &env);
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&["--ledger", "kv"]);
    finish(&mut fetcher, Duration::from_secs(60));
    wait_until("the run's completion in the chat", Duration::from_secs(30), || {
        chat.texts().iter().any(|t| t.contains(" finished: "))
    });
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
    let log = p.nats.log();
    assert!(!log.contains("Violation"), "a role lacks a permission:\n{log}");
}
