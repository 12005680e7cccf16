//! NATS authentication: the right credentials work, wrong or missing ones fail fast with a clear
//! error (not a hang), and secrets never show in logs or `--help`.

mod support;

use std::process::Command;
use std::time::Duration;

use common::harness::{bin, free_port, NatsServer, Service};
use support::wait_ready;

fn mapper(nats: &NatsServer, dir: &std::path::Path, name: &str, env: &[(&str, &str)]) -> (Service, u16) {
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let url = nats.url();
    let mut all = vec![("NATS_URL", url.as_str()), ("METRICS_ADDR", metrics.as_str())];
    all.extend_from_slice(env);
    (Service::spawn(name, "mapper", &[], &all, dir), port)
}

#[test]
fn user_and_password_from_a_file_work_and_a_wrong_password_fails_fast() {
    let nats = NatsServer::start_with(&["--user", "chunk", "--pass", "s3cret-pw"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let good = dir.path().join("good");
    let bad = dir.path().join("bad");
    std::fs::write(&good, "s3cret-pw\n").expect("secret file");
    std::fs::write(&bad, "wrong-pw-value").expect("secret file");

    let (_ok, port) = mapper(
        &nats,
        dir.path(),
        "ok",
        &[("NATS_USER", "chunk"), ("NATS_PASSWORD_FILE", good.to_str().expect("path"))],
    );
    wait_ready(port);

    let (mut refused, _) = mapper(
        &nats,
        dir.path(),
        "refused",
        &[("NATS_USER", "chunk"), ("NATS_PASSWORD_FILE", bad.to_str().expect("path"))],
    );
    assert_eq!(
        refused.wait_exit(Duration::from_secs(15)),
        Some(1),
        "a wrong password must fail fast:\n{}",
        refused.log()
    );
    let log = refused.log();
    assert!(log.contains("refused the connection") && log.contains("NATS_PASSWORD_FILE"), "{log}");
    assert!(!log.contains("wrong-pw-value"), "the password leaked into the log:\n{log}");

    let (mut anonymous, _) = mapper(&nats, dir.path(), "anonymous", &[]);
    assert_eq!(
        anonymous.wait_exit(Duration::from_secs(15)),
        Some(1),
        "no credentials must fail fast:\n{}",
        anonymous.log()
    );
}

#[test]
fn a_token_from_a_file_works_and_a_wrong_one_fails_fast() {
    let nats = NatsServer::start_with(&["--auth", "tok-123456"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let good = dir.path().join("token");
    let bad = dir.path().join("bad-token");
    std::fs::write(&good, "tok-123456").expect("token file");
    std::fs::write(&bad, "tok-nope").expect("token file");
    let (_ok, port) = mapper(&nats, dir.path(), "ok", &[("NATS_TOKEN_FILE", good.to_str().expect("path"))]);
    wait_ready(port);
    let (mut refused, _) = mapper(&nats, dir.path(), "refused", &[("NATS_TOKEN_FILE", bad.to_str().expect("path"))]);
    assert_eq!(refused.wait_exit(Duration::from_secs(15)), Some(1), "{}", refused.log());
    assert!(!refused.log().contains("tok-nope"), "{}", refused.log());
}

/// Issue 15, item 5: `NATS_URL=nats://user:pw@host:4222` was printed verbatim by `--help` and in
/// connection errors, and its credentials were not used at all.
#[test]
fn credentials_in_nats_url_authenticate_and_are_never_printed() {
    let nats = NatsServer::start_with(&["--user", "chunk", "--pass", "s3cret-pw"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let port = nats.port();
    let start = |name: &str, url: String| {
        let metrics = free_port();
        let addr = format!("127.0.0.1:{metrics}");
        let env = [("NATS_URL", url.as_str()), ("METRICS_ADDR", addr.as_str())];
        (Service::spawn(name, "mapper", &[], &env, dir.path()), metrics)
    };
    let (ok, metrics) = start("ok", format!("nats://chunk:s3cret-pw@127.0.0.1:{port}"));
    wait_ready(metrics);
    assert!(ok.log().contains(&format!("nats://chunk:<redacted>@127.0.0.1:{port}")), "{}", ok.log());
    assert!(!ok.log().contains("s3cret-pw"), "{}", ok.log());

    let (mut refused, _) = start("refused", format!("nats://chunk:wrong-pw-in-url@127.0.0.1:{port}"));
    assert_eq!(refused.wait_exit(Duration::from_secs(15)), Some(1), "{}", refused.log());
    assert!(refused.log().contains("refused the connection"), "{}", refused.log());
    assert!(!refused.log().contains("wrong-pw-in-url"), "the password leaked into the log:\n{}", refused.log());

    for binary in ["fetcher", "mapper", "saver", "broadcaster"] {
        let output = Command::new(bin(binary))
            .arg("--help")
            .env("NATS_URL", "nats://chunk:hunter2-in-url@nats.example:4222")
            .output()
            .expect("help");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains("NATS_URL"), "{binary}: {text}");
        assert!(!text.contains("hunter2-in-url"), "{binary} --help shows the URL's password:\n{text}");
    }
}

#[test]
fn a_token_in_nats_url_authenticates() {
    let nats = NatsServer::start_with(&["--auth", "tok-in-url-1"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let metrics = free_port();
    let url = format!("nats://tok-in-url-1@127.0.0.1:{}", nats.port());
    let addr = format!("127.0.0.1:{metrics}");
    let service = Service::spawn("ok", "mapper", &[], &[("NATS_URL", &url), ("METRICS_ADDR", &addr)], dir.path());
    wait_ready(metrics);
    assert!(!service.log().contains("tok-in-url-1"), "{}", service.log());
}

#[test]
fn help_never_shows_a_password_from_the_environment() {
    let output =
        Command::new(bin("mapper")).arg("--help").env("NATS_PASSWORD", "hunter2-secret").output().expect("help");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("NATS_PASSWORD"), "{text}");
    assert!(!text.contains("hunter2-secret"), "{text}");
}

/// Runs `openssl` with `args` in `dir`, panicking with its output on failure.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let output = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl is installed");
    assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, made in `dir`.
fn make_certificates(dir: &std::path::Path) {
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").expect("ext file");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=chunkmill-test-ca",
        ],
    );
    for name in ["server", "client"] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "1",
                "-extfile",
                "san.ext",
            ],
        );
    }
}

#[test]
fn mutual_tls_with_our_ca_works_and_a_client_without_it_fails_fast() {
    let certs = tempfile::tempdir().expect("temp dir");
    make_certificates(certs.path());
    let path = |name: &str| certs.path().join(name).display().to_string();
    let nats = NatsServer::start_with(&[
        "--tls",
        "--tlscert",
        &path("server.pem"),
        "--tlskey",
        &path("server.key"),
        "--tlsverify",
        "--tlscacert",
        &path("ca.pem"),
    ]);
    let dir = tempfile::tempdir().expect("temp dir");
    let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client.key"));
    let (_ok, port) = mapper(
        &nats,
        dir.path(),
        "ok",
        &[
            ("NATS_TLS_CA_FILE", ca.as_str()),
            ("NATS_TLS_CERT_FILE", cert.as_str()),
            ("NATS_TLS_KEY_FILE", key.as_str()),
        ],
    );
    wait_ready(port);
    // Trusts the server but shows no client certificate: the server refuses it.
    let (mut no_cert, _) = mapper(&nats, dir.path(), "no-cert", &[("NATS_TLS_CA_FILE", ca.as_str())]);
    assert_eq!(no_cert.wait_exit(Duration::from_secs(15)), Some(1), "{}", no_cert.log());
    // Does not know our CA: the server's certificate is not trusted.
    let (mut no_ca, _) = mapper(&nats, dir.path(), "no-ca", &[]);
    assert_eq!(no_ca.wait_exit(Duration::from_secs(15)), Some(1), "{}", no_ca.log());
    assert!(no_ca.log().contains("refused the connection"), "{}", no_ca.log());
}

#[test]
fn an_nkey_seed_from_a_file_works_and_another_key_fails_fast() {
    let user = nkeys::KeyPair::new_user();
    let stranger = nkeys::KeyPair::new_user();
    let dir = tempfile::tempdir().expect("temp dir");
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, format!("authorization {{ users = [ {{ nkey: {} }} ] }}\n", user.public_key()))
        .expect("conf");
    let nats = NatsServer::start_with(&["-c", conf.to_str().expect("path")]);
    let good = dir.path().join("user.nk");
    let bad = dir.path().join("stranger.nk");
    std::fs::write(&good, user.seed().expect("seed")).expect("seed file");
    std::fs::write(&bad, stranger.seed().expect("seed")).expect("seed file");
    let (_ok, port) = mapper(&nats, dir.path(), "ok", &[("NATS_NKEY_FILE", good.to_str().expect("path"))]);
    wait_ready(port);
    let (mut refused, _) = mapper(&nats, dir.path(), "refused", &[("NATS_NKEY_FILE", bad.to_str().expect("path"))]);
    assert_eq!(refused.wait_exit(Duration::from_secs(15)), Some(1), "{}", refused.log());
    let seed = stranger.seed().expect("seed");
    assert!(!refused.log().contains(&seed), "the seed leaked into the log");
}

/// Issue 15, "who may ack": with the per-role users of deploy/nats/values.yaml (rendered into
/// deploy/nats/chunkmill-auth.conf) a mapper cannot acknowledge chunks nor take results: the
/// server refuses both with a permissions violation, and the run completes with every object
/// saved. Without the permissions the forged acks, sent before any saver runs, would complete
/// the run at once with nothing saved, and verify would fail.
#[test]
fn a_mappers_forged_acks_are_refused_by_nats_permissions_and_the_run_completes() {
    use common::protocol::{Ack, AckRequest, Subjects, VERSION};
    let p = support::Pipeline::new(3_000, 0).with_role_users();
    let (mut fetcher, fetcher_port) = p.fetcher_named("fetcher", &["--exit-when-done"]);
    wait_ready(fetcher_port);
    let subjects = Subjects::new("chunkmill");
    let run = p.run_id();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let errors = runtime.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let client =
            async_nats::ConnectOptions::with_user_and_password("mapper".into(), support::role_password("mapper"))
                // As a mapper connects (its role's replies only, common::nats::inbox_prefix).
                .custom_inbox_prefix(common::nats::inbox_prefix("mapper"))
                .event_callback(move |event| {
                    let tx = tx.clone();
                    async move {
                        if let async_nats::Event::ServerError(e) = event {
                            let _ = tx.send(e.to_string());
                        }
                    }
                })
                .connect(p.nats.url())
                .await
                .expect("the mapper user logs in");
        // A valid-looking ack for every chunk of the run, with the right object counts.
        let acks = (0..30)
            .map(|chunk| Ack {
                run: run.clone(),
                chunk: common::protocol::ChunkId(chunk),
                lease: uuid::Uuid::new_v4(),
                attempt: 1,
                objects: 100,
                dead: 0,
                outputs: 100,
            })
            .collect();
        let forged = AckRequest { v: VERSION, saver: "forger".into(), sink: "dir-forged".into(), commit: false, acks };
        let asked =
            async_nats::Request::new().payload(common::protocol::encode(&forged)).timeout(Some(Duration::from_secs(2)));
        let answer = client.send_request(subjects.ack.clone(), asked).await;
        assert!(answer.is_err(), "the fetcher answered a mapper's forged ack: {answer:?}");
        // Nor may a mapper take results meant for the savers.
        let _stolen = client.subscribe(subjects.result.clone()).await.expect("subscribe call");
        client.flush().await.expect("flush");
        let mut errors = Vec::new();
        while errors.len() < 2 {
            let next = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
            match next {
                Ok(Some(error)) => errors.push(error),
                _ => break,
            }
        }
        errors
    });
    let all = errors.join("\n").to_lowercase();
    assert!(
        all.contains("permissions violation for publish to \"chunkmill.ack\""),
        "no publish violation for the forged ack: {errors:?}"
    );
    assert!(
        all.contains("permissions violation for subscription to \"chunkmill.result\""),
        "no subscription violation for the stolen results: {errors:?}"
    );
    assert_eq!(
        support::metric(fetcher_port, "chunkmill_fetcher_run_objects_done").unwrap_or(0.0),
        0.0,
        "no chunk may be done before a saver saved it"
    );
    // `fetcher status` works as the fetcher's user, and the refused acks left no mark.
    let status = p.status();
    assert_eq!((status.run.as_str(), status.chunks, status.done, status.pending), (run.as_str(), 30, 0, 30));
    let _mapper = p.mapper("mapper-1", &[]);
    let _saver = p.saver("saver-1");
    support::finish(&mut fetcher, Duration::from_secs(60));
    // Every role may join the NATS service API ($SRV.*) and serve its stats endpoint.
    let log = p.nats.log();
    let refused: Vec<&str> =
        log.lines().filter(|l| l.contains("Violation") && (l.contains("$SRV") || l.contains(".stats."))).collect();
    assert!(refused.is_empty(), "the role permissions refuse the service API: {refused:?}");
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
    assert!(report.contains("3000 found, 0 missing, 0 duplicated"), "{report}");
    assert!(p.nats.log().contains("Publish Violation"), "the server logs the refusal:\n{}", p.nats.log());
}

/// Issue 34: each role is confined to its own JetStream objects and its own replies. The
/// Internet-facing broadcaster may not delete (nor read) the fetcher's ledger bucket, the fetcher
/// may not touch the broadcaster's event stream, and a mapper may read neither NATS's shared
/// inboxes nor the fetcher's (`_INBOX_<role>`, common::nats::inbox_prefix): the server refuses
/// each with a permissions violation, and what a role does need still works.
#[test]
fn each_role_reaches_only_its_own_streams_buckets_and_replies() {
    let p = support::Pipeline::new(10, 0).with_role_users();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let violations = runtime.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let login = |role: &str| {
            let tx = tx.clone();
            // nats-box's `box` user is the nats CLI, with NATS's default inbox prefix.
            let prefix = if role == "box" { "_INBOX".to_string() } else { common::nats::inbox_prefix(role) };
            async_nats::ConnectOptions::with_user_and_password(role.into(), support::role_password(role))
                .custom_inbox_prefix(prefix)
                .event_callback(move |event| {
                    let tx = tx.clone();
                    async move {
                        if let async_nats::Event::ServerError(e) = event {
                            let _ = tx.send(e.to_string().to_lowercase());
                        }
                    }
                })
                .connect(p.nats.url())
        };
        let (fetcher, broadcaster, mapper) = (
            login("fetcher").await.expect("the fetcher user logs in"),
            login("broadcaster").await.expect("the broadcaster user logs in"),
            login("mapper").await.expect("the mapper user logs in"),
        );
        // What each needs: the fetcher its ledger bucket, the broadcaster its claims bucket.
        let ledger = async_nats::jetstream::new(fetcher.clone())
            .create_key_value(async_nats::jetstream::kv::Config {
                bucket: "chunkmill-ledger".into(),
                ..Default::default()
            })
            .await
            .expect("the fetcher creates its ledger bucket");
        ledger.put("run.job", "{}".into()).await.expect("the fetcher writes its ledger");
        async_nats::jetstream::new(broadcaster.clone())
            .create_key_value(async_nats::jetstream::kv::Config {
                bucket: "chunkmill-broadcast".into(),
                ..Default::default()
            })
            .await
            .expect("the broadcaster creates its claims bucket");
        // What they may not do.
        let short = |client: &async_nats::Client| {
            async_nats::jetstream::ContextBuilder::new().timeout(Duration::from_secs(1)).build(client.clone())
        };
        let deleted = short(&broadcaster).delete_stream("KV_chunkmill-ledger").await;
        assert!(deleted.is_err(), "the broadcaster deleted the fetcher's ledger");
        let read = short(&broadcaster).get_key_value("chunkmill-ledger").await;
        assert!(read.is_err(), "the broadcaster opened the fetcher's ledger");
        let events = short(&fetcher).delete_stream("KV_chunkmill-broadcast").await;
        assert!(events.is_err(), "the fetcher deleted the broadcaster's claims");
        let _shared = mapper.subscribe("_INBOX.>").await.expect("subscribe call");
        let _fetchers = mapper.subscribe(format!("{}.>", common::nats::inbox_prefix("fetcher"))).await.expect("call");
        mapper.flush().await.expect("flush");
        // nats-box's `box` user watches and lists (with the nats CLI's own _INBOX), never acks.
        let box_user = login("box").await.expect("the box user logs in");
        let _watch = box_user.subscribe("chunkmill.>").await.expect("box watches the pipeline");
        let services = box_user.request("$SRV.PING", "".into());
        let _ = tokio::time::timeout(Duration::from_secs(1), services).await;
        box_user.publish("chunkmill.ack", "{}".into()).await.expect("publish call");
        box_user.flush().await.expect("flush");
        let mut violations = Vec::new();
        while violations.len() < 6 {
            match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                Ok(Some(error)) => violations.push(error),
                _ => break,
            }
        }
        violations
    });
    let all = violations.join("\n");
    for expected in [
        "publish to \"$js.api.stream.delete.kv_chunkmill-ledger\"",
        "publish to \"$js.api.stream.info.kv_chunkmill-ledger\"",
        "publish to \"$js.api.stream.delete.kv_chunkmill-broadcast\"",
        "subscription to \"_inbox.>\"",
        "subscription to \"_inbox_fetcher.>\"",
        "publish to \"chunkmill.ack\"",
    ] {
        assert!(all.contains(expected), "no permissions violation for {expected}: {violations:?}");
    }
    // What the box user may do (watch the pipeline, ping the services) was not refused.
    for allowed in ["subscription to \"chunkmill.>\"", "publish to \"$srv.ping\""] {
        assert!(!all.contains(allowed), "box was refused {allowed}: {violations:?}");
    }
    assert_eq!(all.matches("subscription to \"_inbox.").count(), 1, "box's own inbox refused: {violations:?}");
    assert!(!p.nats.log().contains("Violation for Publish to \"$KV.chunkmill-ledger"), "{}", p.nats.log());
}
