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
    (Service::spawn(name, "mapper", &["--rounds", "0"], &all, dir), port)
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

#[test]
fn help_never_shows_a_password_from_the_environment() {
    let output =
        Command::new(bin("mapper")).arg("--help").env("NATS_PASSWORD", "hunter2-secret").output().expect("help");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("NATS_PASSWORD"), "{text}");
    assert!(!text.contains("hunter2-secret"), "{text}");
}
