//! NATS `.creds` files (decentralised JWT authentication) against a real nats-server in operator
//! mode, with the operator, accounts and users made by the test (tests/support/jwt.rs): a
//! pipeline runs with `NATS_CREDS_FILE` alone, and a user JWT the server must not trust is
//! refused at start with an error that names the setting, never showing the seed.

mod support;

use std::time::Duration;

use common::harness::{free_port, NatsServer, Service};
use support::jwt;

/// A mapper logging in with the `.creds` file at `creds`; with its metrics port.
fn mapper(nats: &NatsServer, dir: &std::path::Path, name: &str, creds: &std::path::Path) -> (Service, u16) {
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let url = nats.url();
    let creds = creds.display().to_string();
    let env = [("NATS_URL", url.as_str()), ("METRICS_ADDR", metrics.as_str()), ("NATS_CREDS_FILE", creds.as_str())];
    (Service::spawn(name, "mapper", &[], &env, dir), port)
}

/// Each role's user JWT carries the permissions of deploy/nats/chunkmill-auth.conf, so this also
/// proves those permission sets suffice for a whole run under operator mode.
#[test]
fn a_pipeline_runs_with_one_creds_file_per_role_against_an_operator_mode_server() {
    let p = support::Pipeline::new(3_000, 0).with_role_creds();
    assert!(p.nats.log().contains("Trusted Operators"), "the server is not in operator mode:\n{}", p.nats.log());
    let (mut fetcher, fetcher_port) = p.fetcher_named("fetcher", &["--exit-when-done"]);
    support::wait_ready(fetcher_port);
    // `fetcher status` logs in with the fetcher's creds too.
    let status = p.status();
    assert_eq!((status.chunks, status.done), (30, 0), "{status:?}");
    let mappers = [p.mapper("mapper-1", &[]), p.mapper("mapper-2", &[])];
    let saver = p.saver("saver-1");
    support::finish(&mut fetcher, Duration::from_secs(60));
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
    assert!(report.contains("3000 found, 0 missing, 0 duplicated"), "{report}");
    let log = p.nats.log();
    let violations: Vec<&str> = log.lines().filter(|l| l.contains("Violation")).collect();
    assert!(violations.is_empty(), "the role permissions in the user JWTs refused something: {violations:?}");
    // No seed shows in any service's log.
    let logs = [fetcher.log(), mappers[0].log(), mappers[1].log(), saver.log()].join("\n");
    for role in ["fetcher", "mapper", "saver"] {
        let creds = p.creds_dir.as_ref().expect("creds dir").join(format!("{role}.creds"));
        let text = std::fs::read_to_string(creds).expect("creds file");
        let seed = text.lines().find(|l| l.starts_with("SU")).expect("a user seed in the creds file");
        assert!(!logs.contains(seed), "{role}'s seed leaked into a log");
    }
}

#[test]
fn a_user_jwt_not_signed_by_its_account_or_expired_is_refused_fast_without_showing_the_seed() {
    let operator = jwt::Operator::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, operator.server_config()).expect("config");
    let nats = NatsServer::start_with(&["--config", conf.to_str().expect("path")]);

    // The control: a user of the account gets in, so the refusals below are the JWTs' fault.
    let good = dir.path().join("good.creds");
    std::fs::write(&good, operator.user_creds("good", None)).expect("creds file");
    let (_ok, port) = mapper(&nats, dir.path(), "ok", &good);
    support::wait_ready(port);

    let user = nkeys::KeyPair::new_user();
    let stranger = nkeys::KeyPair::new_account();
    let cases = [
        ("not-its-account", jwt::user_jwt(&stranger, &user, "stray", None, None)),
        ("expired", jwt::user_jwt(&operator.account, &user, "expired", None, Some(jwt::now() - 60))),
    ];
    let seed = user.seed().expect("seed");
    for (name, user_jwt) in cases {
        let creds = dir.path().join(format!("{name}.creds"));
        std::fs::write(&creds, jwt::creds(&user_jwt, &user)).expect("creds file");
        let (mut refused, _) = mapper(&nats, dir.path(), name, &creds);
        assert_eq!(
            refused.wait_exit(Duration::from_secs(15)),
            Some(1),
            "{name}: a user JWT the server does not trust must fail fast:\n{}",
            refused.log()
        );
        let log = refused.log();
        assert!(log.contains("refused the connection") && log.contains("NATS_CREDS_FILE"), "{name}:\n{log}");
        assert!(!log.contains(&seed), "{name}: the seed leaked into the log:\n{log}");
    }
}
