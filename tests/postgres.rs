//! The PostgreSQL sink against a real PostgreSQL server per test (see support/postgres.rs): a
//! full run, savers and mappers killed, the database crashing mid-run, concurrent savers on the
//! same chunks, and a wrong password; TLS (a server with `ssl = on` and a test CA made by the
//! `openssl` command: verify-full, a wrong CA, a wrong host name, require without TLS). Each run
//! ends with `saver verify` reading the database.

mod support;

use std::sync::Arc;
use std::time::Duration;

use common::protocol::ResultHead;
use saver::decoded::Decoded;
use saver::sink::postgres::{PgOptions, PgSink};
use saver::sink::SaveOutcome;
use support::postgres::{PgServer, PG_PASSWORD};
use support::{finish, metric, wait_ready, wait_until, Pipeline};

#[test]
fn a_run_into_postgres_has_one_row_per_object_and_verify_reads_it_back() {
    let db = PgServer::start();
    let p = Pipeline::new(20_000, 0);
    let (saver, _) = p.saver_postgres("saver-1", &db);
    let _m1 = p.mapper("mapper-1", &[]);
    let _m2 = p.mapper("mapper-2", &[]);
    let mut fetcher = p.fetcher(&[]);
    finish(&mut fetcher, Duration::from_secs(240));
    let (ok, report) = p.verify_postgres(&db);
    assert!(ok, "{report}");
    assert!(report.contains("20000 expected, 20000 found, 0 missing, 0 duplicated, 0 wrong"), "{report}");
    assert!(report.contains("0 mismatched chunk records"), "{report}");
    let run = p.run_id();
    assert_eq!(db.count(&format!("SELECT count(*) FROM chunkmill_outputs WHERE run = '{run}'")), 20_000);
    assert_eq!(db.count(&format!("SELECT count(DISTINCT id) FROM chunkmill_outputs WHERE run = '{run}'")), 20_000);
    let digest = db.query(&format!("SELECT doc->>'digest' FROM chunkmill_outputs WHERE run = '{run}' LIMIT 1"));
    assert_eq!(digest, "", "rounds 0: the documents are the digest job's records");
    assert_eq!(db.count(&format!("SELECT count(*) FROM chunkmill_chunks WHERE run = '{run}'")), 200);
    assert_eq!(db.count(&format!("SELECT sum(objects) FROM chunkmill_chunks WHERE run = '{run}'")), 20_000);
    let log = saver.log();
    assert!(log.contains("saving to PostgreSQL postgres://chunkmill@127.0.0.1"), "{log}");
    assert!(!log.contains(PG_PASSWORD), "the password reached the saver's log:\n{log}");
    assert!(!report.contains(PG_PASSWORD), "the password reached verify's output:\n{report}");
}

#[test]
fn two_savers_with_a_mapper_and_a_saver_killed_mid_run_save_each_object_once() {
    let db = PgServer::start();
    let p = Pipeline::new(20_000, 300);
    let (mut saver1, port1) = p.saver_postgres("saver-1", &db);
    let (_saver2, port2) = p.saver_postgres("saver-2", &db);
    // Ready means the schema is in place and the saver is subscribed.
    wait_ready(port1);
    let mut m1 = p.mapper("mapper-1", &[]);
    let _m2 = p.mapper("mapper-2", &[]);
    let mut fetcher = p.fetcher(&["--lease-timeout", "1s"]);
    let chunks = "SELECT count(*) FROM chunkmill_chunks";
    wait_until("30 chunks saved", Duration::from_secs(120), || db.count(chunks) >= 30);
    m1.kill();
    saver1.kill();
    let before_restart = db.count(chunks);
    let _saver3 = p.saver_postgres("saver-3", &db);
    let _m3 = p.mapper("mapper-3", &[]);
    finish(&mut fetcher, Duration::from_secs(240));
    assert!(before_restart < 200, "the kills happened after the run was over ({before_restart} chunks saved)");
    let (ok, report) = p.verify_postgres(&db);
    assert!(ok, "{report}");
    assert!(report.contains("20000 expected, 20000 found, 0 missing, 0 duplicated, 0 wrong"), "{report}");
    // Both first savers took chunks: the queue group spread the work, so they wrote concurrently.
    assert!(db.count("SELECT count(*) FROM chunkmill_chunks WHERE saver = 'saver-1'") > 0);
    assert!(db.count("SELECT count(*) FROM chunkmill_chunks WHERE saver = 'saver-2'") > 0);
    assert!(metric(port2, "chunkmill_saver_chunks_saved_total").unwrap_or(0.0) > 0.0);
}

#[test]
fn postgres_crashing_mid_run_acknowledges_nothing_unsaved_and_the_run_completes() {
    let mut db = PgServer::start();
    let p = Pipeline::new(20_000, 300);
    let (saver, port) = p.saver_postgres("saver-1", &db);
    wait_ready(port);
    let _m1 = p.mapper("mapper-1", &[]);
    let _m2 = p.mapper("mapper-2", &[]);
    let mut fetcher = p.fetcher(&[]);
    let chunks = "SELECT count(*) FROM chunkmill_chunks";
    wait_until("30 chunks saved", Duration::from_secs(120), || db.count(chunks) >= 30);
    db.crash();
    // Down long enough that the saver must fail saves (and answer the mappers so), not just
    // find its pooled connections closed.
    saver.wait_for_log("cannot save a result: PostgreSQL", Duration::from_secs(60));
    db.start_again();
    let before_restart = db.count(chunks);
    finish(&mut fetcher, Duration::from_secs(240));
    assert!(before_restart < 200, "the crash happened after the run was over ({before_restart} chunks saved)");
    let (ok, report) = p.verify_postgres(&db);
    assert!(ok, "{report}");
    assert!(report.contains("20000 expected, 20000 found, 0 missing, 0 duplicated, 0 wrong"), "{report}");
}

#[test]
fn a_wrong_password_stops_the_saver_with_a_hint_and_without_the_secret() {
    let db = PgServer::start();
    let p = Pipeline::new(10, 0);
    let args = vec!["--sink".to_string(), db.url()];
    let secret = "wrong-secret-5b1e";
    let (mut saver, _) = p.spawn_with_env("saver-bad", "saver", &args, &[("SAVER_PG_PASSWORD", secret)]);
    let code = saver.wait_exit(Duration::from_secs(60));
    let log = saver.log();
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("28P01") && log.contains("SAVER_PG_PASSWORD_FILE"), "{log}");
    assert!(!log.contains(secret), "the password reached the log:\n{log}");
}

#[test]
fn no_password_stops_the_saver_at_once_with_the_same_hint_as_a_wrong_one() {
    let db = PgServer::start();
    let p = Pipeline::new(10, 0);
    let (mut saver, _) = p.spawn_with_metrics("saver-nopw", "saver", &["--sink".to_string(), db.url()]);
    let code = saver.wait_exit(Duration::from_secs(60));
    let log = saver.log();
    assert_eq!(code, Some(1), "a missing password must not be retried like an outage:\n{log}");
    assert!(log.contains("password missing") && log.contains("SAVER_PG_PASSWORD_FILE"), "{log}");
    assert!(!log.contains("waiting for PostgreSQL"), "{log}");
}

#[test]
fn a_missing_database_is_created_and_a_role_that_cannot_create_it_is_told_the_command() {
    let db = PgServer::start();
    let p = Pipeline::new(10, 0);
    let (base, _) = db.url().rsplit_once('/').map(|(b, d)| (b.to_string(), d.to_string())).expect("a database url");
    let password = db.password_file().display().to_string();
    let fresh = vec!["--sink".to_string(), format!("{base}/fresh_db")];
    let env = [("SAVER_PG_PASSWORD_FILE", password.as_str())];
    for attempt in ["first", "again"] {
        let (mut saver, port) = p.spawn_with_env(&format!("saver-{attempt}"), "saver", &fresh, &env);
        wait_ready(port);
        saver.signal("TERM");
        assert_eq!(saver.wait_exit(Duration::from_secs(30)), Some(0), "{}", saver.log());
        let log = saver.log();
        assert_eq!(log.contains("created the database fresh_db"), attempt == "first", "{log}");
        assert!(!log.contains("already exists, skipping"), "a restart logs PostgreSQL's notices:\n{log}");
    }
    assert_eq!(db.count("SELECT count(*) FROM pg_database WHERE datname = 'fresh_db'"), 1);

    db.query("CREATE ROLE plain LOGIN PASSWORD 'plain-pw-71c'");
    let args = vec!["--sink".to_string(), format!("{}/other_db", base.replace("chunkmill@", "plain@"))];
    let (mut saver, _) = p.spawn_with_env("saver-plain", "saver", &args, &[("SAVER_PG_PASSWORD", "plain-pw-71c")]);
    let code = saver.wait_exit(Duration::from_secs(60));
    let log = saver.log();
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains(r#"CREATE DATABASE "other_db" OWNER "plain";"#), "{log}");
    assert!(!log.contains("plain-pw-71c"), "{log}");
}

/// A result of 10 objects with one value each, ids `<chunk>-<i>` (or `ids` given).
fn result_with_ids(chunk: u64, ids: &[String], name: &str) -> Arc<Decoded> {
    let head = ResultHead {
        run: "00000000000000aa".into(),
        job: "00000000000000bb".into(),
        chunk: common::protocol::ChunkId(chunk as u32),
        lease: uuid::Uuid::new_v4(),
        attempt: 1,
        mapper: "m".into(),
    };
    let values: Vec<String> = ids.iter().map(|id| format!("{{\"id\":\"{id}\",\"name\":\"{name}\"}}")).collect();
    let ids: Vec<Option<String>> = ids.iter().cloned().map(Some).collect();
    let body =
        common::protocol::encode_result(&head, values.iter().map(|v| std::iter::once(v.as_bytes())), Some(&ids), &[]);
    Arc::new(Decoded::decode(body.into()).expect("a valid result"))
}

fn result(chunk: u64) -> Arc<Decoded> {
    let ids: Vec<String> = (0..10).map(|i| format!("{chunk}-{i}")).collect();
    result_with_ids(chunk, &ids, "A B")
}

#[test]
fn concurrent_savers_in_opposite_orders_never_deadlock_and_save_each_chunk_once() {
    let db = PgServer::start();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let outcomes: Vec<Vec<SaveOutcome>> = runtime.block_on(async {
        let mut tasks = Vec::new();
        let barrier = Arc::new(tokio::sync::Barrier::new(6));
        for saver in 0..6u64 {
            let options = PgOptions {
                url: db.url(),
                password: Some(PG_PASSWORD.into()),
                pool_size: 2,
                saver: format!("saver-{saver}"),
            };
            let sink = PgSink::connect(options, &Default::default()).await.expect("connect").expect("not stopped");
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                // Every saver writes all 1000 chunks, in the same batches of 100 at the same time;
                // half list each batch upwards, half downwards: without one lock order inside
                // the sink, opposite batches would deadlock.
                let chunks: Vec<u64> = (0..1000).collect();
                let mut outcomes = Vec::new();
                for batch in chunks.chunks(100) {
                    barrier.wait().await;
                    let mut results: Vec<Arc<Decoded>> = batch.iter().map(|&c| result(c)).collect();
                    if saver % 2 == 1 {
                        results.reverse();
                    }
                    for outcome in sink.save_batch(&results).await {
                        outcomes.push(outcome.expect("saved without error"));
                    }
                }
                outcomes
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.push(task.await.expect("task"));
        }
        all
    });
    let saved = outcomes.iter().flatten().filter(|o| **o == SaveOutcome::Saved).count();
    let duplicates = outcomes.iter().flatten().filter(|o| **o == SaveOutcome::Duplicate).count();
    assert_eq!(saved, 1000, "each chunk saved exactly once");
    assert_eq!(duplicates, 5 * 1000, "every other save is a duplicate");
    assert_eq!(db.count("SELECT count(*) FROM chunkmill_outputs"), 10_000);
    assert_eq!(db.count("SELECT count(*) FROM chunkmill_chunks"), 1000);
    assert!(!db.log().contains("deadlock detected"), "PostgreSQL saw a deadlock:\n{}", db.log());
}

#[test]
fn an_object_id_already_saved_by_another_chunk_is_stored_without_its_id_and_no_value_is_dropped() {
    // Possible when the fetcher skipped its duplicate-id check, or for ids that differ only in
    // their JSON type (`1` and `"1"`: both sent as the text 1). The fast COPY path meets a unique
    // violation, and the batch is saved again with the clashing row's id NULL.
    let db = PgServer::start();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let outcomes = runtime.block_on(async {
        let options = PgOptions { url: db.url(), password: Some(PG_PASSWORD.into()), pool_size: 1, saver: "s".into() };
        let sink = PgSink::connect(options, &Default::default()).await.expect("connect").expect("not stopped");
        let first = result(1);
        let mut ids: Vec<String> = (0..10).map(|i| format!("2-{i}")).collect();
        ids[0] = "1-0".into();
        ids[5] = "2-4".into();
        let second = result_with_ids(2, &ids, "Second Copy");
        let mut outcomes = sink.save_batch(&[first]).await;
        outcomes.extend(sink.save_batch(&[second]).await);
        outcomes.into_iter().map(|o| o.expect("saved")).collect::<Vec<_>>()
    });
    assert_eq!(outcomes, vec![SaveOutcome::Saved, SaveOutcome::Saved]);
    assert_eq!(db.count("SELECT count(*) FROM chunkmill_outputs"), 20, "every value is kept");
    assert_eq!(
        db.query("SELECT doc->>'name' FROM chunkmill_outputs WHERE id = '1-0'"),
        "A B",
        "the first holder keeps it"
    );
    let nulled = "SELECT string_agg(chunk || '/' || idx, ',' ORDER BY idx) FROM chunkmill_outputs WHERE id IS NULL";
    assert_eq!(db.query(nulled), "2/0,2/5", "a clash within the batch, too");
    assert_eq!(db.count("SELECT sum(outputs) FROM chunkmill_chunks"), 20);
}

/// The report's reproduction (`"fn":"a\u0000b"`: valid JSON, but PostgreSQL text cannot hold a
/// NUL) and a value a CHECK constraint refuses: each such object is dead-lettered with the
/// database's reason, the rest of its chunk and every neighbour in its batch are saved, and the
/// run completes instead of answering `failed` forever.
#[test]
fn a_value_the_database_refuses_dead_letters_that_object_and_saves_the_rest() {
    let db = PgServer::start();
    let p = Pipeline::new(300, 0);
    let text = std::fs::read_to_string(&p.input).expect("input");
    let mut lines: Vec<serde_json::Value> =
        text.lines().map(|l| serde_json::from_str(l).expect("generated records are JSON")).collect();
    lines[150]["fn"] = "a\u{0}b".into();
    lines[20]["fn"] = "Refused-By-Check".into();
    let nul_id = lines[150]["uuid"].as_str().expect("uuid").to_string();
    let checked_id = lines[20]["uuid"].as_str().expect("uuid").to_string();
    let rewritten: String = lines.iter().map(|l| format!("{l}\n")).collect();
    assert!(rewritten.contains("a\\u0000b"), "the record carries the escape, as in the report");
    std::fs::write(&p.input, rewritten).expect("write input");

    let (_saver, port) = p.saver_postgres("saver-1", &db);
    wait_ready(port);
    db.query(
        "ALTER TABLE chunkmill_outputs ADD CONSTRAINT no_refused CHECK (doc->>'name' NOT LIKE 'Refused-By-Check%')",
    );
    let _mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&[]);
    assert_eq!(fetcher.wait_exit(Duration::from_secs(120)), Some(3), "{}", fetcher.log());
    let (ok, report) = p.verify_postgres(&db);
    assert!(ok, "{report}");
    assert!(report.contains("300 expected, 298 found, 0 missing") && report.contains("2 dead-lettered"), "{report}");
    let reason = |id: &str| db.query(&format!("SELECT error FROM chunkmill_dead_objects WHERE id = '{id}'"));
    assert!(reason(&nul_id).contains("SQLSTATE 22"), "{}", reason(&nul_id));
    assert!(reason(&checked_id).contains("no_refused"), "{}", reason(&checked_id));
    assert_eq!(db.count("SELECT count(*) FROM chunkmill_chunks"), 3);
    assert_eq!(db.count("SELECT sum(outputs) FROM chunkmill_chunks"), 298);
    assert_eq!(db.count("SELECT sum(dead) FROM chunkmill_chunks"), 2);
}

/// A database made by version 1 keeps working (migrated by adding to it, its rows untouched);
/// one made by a newer chunkmill is refused with a clear message, and left as it is.
#[test]
fn a_version_1_database_is_migrated_and_a_newer_one_is_refused_untouched() {
    let db = PgServer::start();
    db.query(include_str!("support/schema-v1.sql"));
    db.query("INSERT INTO chunkmill_objects VALUES ('00000000000000aa', 'old-id', 0, 'Old Name', 1, '')");
    let p = Pipeline::new(1_000, 0);
    let (_saver, port) = p.saver_postgres("saver-1", &db);
    wait_ready(port);
    let _mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&[]);
    finish(&mut fetcher, Duration::from_secs(120));
    let (ok, report) = p.verify_postgres(&db);
    assert!(ok && report.contains("1000 found"), "{report}");
    assert_eq!(db.query("SELECT name FROM chunkmill_objects WHERE id = 'old-id'"), "Old Name", "v1 rows stay");
    assert_eq!(db.count("SELECT max(version) FROM chunkmill_schema"), 2);

    let newer = PgServer::start();
    newer.query("CREATE TABLE chunkmill_schema (version integer NOT NULL, applied timestamptz NOT NULL DEFAULT now()); INSERT INTO chunkmill_schema (version) VALUES (3)");
    let (mut refused, _) = p.saver_postgres("saver-2", &newer);
    assert_eq!(refused.wait_exit(Duration::from_secs(60)), Some(1), "{}", refused.log());
    assert!(
        refused.log().contains("schema is version 3") && refused.log().contains("newer chunkmill"),
        "{}",
        refused.log()
    );
    assert_eq!(newer.count("SELECT count(*) FROM information_schema.tables WHERE table_name = 'chunkmill_outputs'"), 0);
}

/// `postgres://chunkmill@HOST:PORT/chunkmill?sslmode=MODE&sslrootcert=CA` (and `extra`).
fn tls_url(db: &PgServer, host: &str, mode: &str, ca: &std::path::Path, extra: &str) -> String {
    format!("postgres://chunkmill@{host}:{}/chunkmill?sslmode={mode}&sslrootcert={}{extra}", db.port(), ca.display())
}

/// Connections of the saver (application_name `chunkmill-saver`) the server sees with or
/// without TLS.
fn saver_connections(db: &PgServer, ssl: bool) -> u64 {
    db.count(&format!(
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
         WHERE application_name = 'chunkmill-saver' AND ssl = {ssl}"
    ))
}

#[test]
fn verify_full_with_the_right_ca_saves_a_run_over_tls() {
    let (db, certs) = PgServer::start_tls();
    let url = tls_url(&db, "127.0.0.1", "verify-full", &certs.ca, "");
    let p = Pipeline::new(2_000, 0);
    let (saver, port) = p.saver_postgres_url("saver-tls", &db, &url);
    wait_ready(port);
    let _mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&[]);
    finish(&mut fetcher, Duration::from_secs(120));
    // The saver's pooled connections are still open: all of them over TLS.
    assert!(saver_connections(&db, true) >= 1, "no TLS connection from the saver");
    assert_eq!(saver_connections(&db, false), 0, "a saver connection without TLS");
    let (ok, report) = p.verify_postgres_url(&db, &url);
    assert!(ok, "{report}");
    assert!(report.contains("2000 expected, 2000 found, 0 missing, 0 duplicated, 0 wrong"), "{report}");
    let log = saver.log();
    assert!(log.contains("sslmode=verify-full (certificate chain checked against the CA file"), "{log}");
    assert!(!log.contains(PG_PASSWORD), "the password reached the saver's log:\n{log}");
}

#[test]
fn a_wrong_ca_stops_the_saver_at_once_naming_the_verification_and_sslrootcert() {
    let (db, certs) = PgServer::start_tls();
    let p = Pipeline::new(10, 0);
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = tls_url(&db, "127.0.0.1", mode, &certs.other_ca, "");
        let (mut saver, _) = p.saver_postgres_url(&format!("saver-{mode}"), &db, &url);
        let code = saver.wait_exit(Duration::from_secs(30));
        let log = saver.log();
        assert_eq!(code, Some(1), "sslmode={mode}: an untrusted certificate must not be retried:\n{log}");
        assert!(log.contains("certificate verification failed"), "{log}");
        assert!(
            log.contains(&format!("{} (sslrootcert)", certs.other_ca.display())) && log.contains("check sslrootcert")
        );
        assert!(!log.contains("waiting for PostgreSQL"), "retried like an outage:\n{log}");
        assert!(!log.contains(PG_PASSWORD), "{log}");
    }
    let url = tls_url(&db, "127.0.0.1", "verify-full", &certs.other_ca, "");
    let (ok, report) = p.verify_postgres_url(&db, &url);
    assert!(!ok && report.contains("certificate verification failed"), "{report}");
}

#[test]
fn verify_full_refuses_a_host_name_the_certificate_lacks_and_verify_ca_accepts_it() {
    let (db, certs) = PgServer::start_tls();
    let p = Pipeline::new(10, 0);
    // Reach the server at 127.0.0.1 while naming a host the certificate does not list.
    let url = tls_url(&db, "db.invalid", "verify-full", &certs.ca, "&hostaddr=127.0.0.1");
    let (mut saver, _) = p.saver_postgres_url("saver-full", &db, &url);
    let code = saver.wait_exit(Duration::from_secs(30));
    let log = saver.log();
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("not valid for the host db.invalid") && log.contains("sslmode=verify-ca"), "{log}");
    assert!(!log.contains("waiting for PostgreSQL"), "{log}");

    let url = tls_url(&db, "db.invalid", "verify-ca", &certs.ca, "&hostaddr=127.0.0.1");
    let (mut saver, port) = p.saver_postgres_url("saver-ca", &db, &url);
    wait_ready(port);
    assert!(saver_connections(&db, true) >= 1, "no TLS connection from the saver");
    saver.signal("TERM");
    assert_eq!(saver.wait_exit(Duration::from_secs(30)), Some(0), "{}", saver.log());
}

#[test]
fn require_against_a_server_without_tls_stops_the_saver_with_a_clear_error() {
    let db = PgServer::start();
    let p = Pipeline::new(10, 0);
    let url = format!("{}?sslmode=require", db.url());
    let (mut saver, _) = p.saver_postgres_url("saver-require", &db, &url);
    let code = saver.wait_exit(Duration::from_secs(30));
    let log = saver.log();
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("server does not support TLS") && log.contains("ssl = off"), "{log}");
    assert!(!log.contains("waiting for PostgreSQL"), "{log}");
}

/// Issue 36, item 8: `saver verify` follows `jsonb`'s documented normalisation exactly, as this
/// server applies it: numbers as `numeric` prints them (exponents applied, trailing zeros of the
/// fraction kept, `-0` as `0`), the last of repeated keys, keys in any order.
#[test]
fn the_jsonb_normalisation_verify_applies_is_the_servers_own() {
    use saver::sink::postgres::jsonb;
    let db = PgServer::start();
    let numbers = [
        "1E2",
        "1e400",
        "1.5e+10",
        "-0",
        "-0.0",
        "1.50",
        "0.000",
        "1.230e-5",
        "1.50e1",
        "100e-2",
        "0.0e5",
        "-12.5E-1",
        "18446744073709551617",
        "0.1000000000000000000001",
        "1e-300",
        "123456789.123456789e-3",
        "5E-0",
        "-1",
        "1.0E+0",
    ];
    let objects = [
        r#"{"k":"forged","k":"real","n":1E2}"#,
        r#"{"b":[1.0,{"x":1,"x":-0}],"a":"\u00e9\n","aa":null,"c":true}"#,
        r#"{"a":{"c":1},"a":{"d":2e1}}"#,
    ];
    let values: Vec<&str> = numbers.iter().chain(&objects).copied().collect();
    let array = values.iter().map(|v| format!("$j${v}$j$")).collect::<Vec<_>>().join(",");
    let stored =
        db.query(&format!("SELECT j::jsonb::text FROM unnest(ARRAY[{array}]) WITH ORDINALITY AS t(j, n) ORDER BY n"));
    let stored: Vec<&str> = stored.lines().collect();
    assert_eq!(stored.len(), values.len(), "{stored:?}");
    for (number, text) in numbers.iter().zip(&stored) {
        assert_eq!(jsonb::numeric_text(number).as_deref(), Some(*text), "{number}");
    }
    for (value, text) in values.iter().zip(&stored) {
        let expected = jsonb::normalise(common::exact::parse(value.as_bytes()).expect("JSON")).expect("storable");
        let kept = common::exact::parse(text.as_bytes()).expect("the server's text is JSON");
        assert!(expected.same(&kept), "{value}: the server keeps {text}, verify expects {expected:?}");
    }
}

/// Issue 36, items 5 and 8 end to end: a command job that passes records through unchanged
/// (`cat`), numbers with exponents and a repeated key saved into PostgreSQL, where `jsonb`
/// normalises them; `saver verify --recompute-with` calls the save correct, and a tampered row
/// wrong.
#[test]
fn numbers_with_exponents_and_repeated_keys_saved_into_postgres_are_verified_as_correct() {
    let db = PgServer::start();
    let p = Pipeline::orders(1, &["--transform", "command", "--command", "echo"]);
    let records = [
        r#"{"n":1E2}"#,
        r#"{"n":1e400}"#,
        r#"{"n":1.5e+10,"m":-0}"#,
        r#"{"n":1.230e-5,"m":1.50}"#,
        r#"{"k":"forged","k":"real"}"#,
        r#"{"n":18446744073709551617}"#,
        r#"{"n":0.1000000000000000000001}"#,
    ];
    std::fs::write(&p.input, records.map(|r| format!("{r}\n")).concat()).expect("write input");
    let (_saver, port) = p.saver_postgres("saver-1", &db);
    wait_ready(port);
    let _mapper = p.mapper("mapper-1", &["--command", "echo=cat"]);
    let mut fetcher = p.fetcher(&[]);
    finish(&mut fetcher, Duration::from_secs(120));
    assert_eq!(db.query("SELECT doc::text FROM chunkmill_outputs WHERE idx = 0"), r#"{"n": 100}"#);
    let (ok, report) = p.verify_postgres_with_flags(&db, &["--recompute-with", "echo=cat"]);
    assert!(ok && report.contains("7 expected, 7 found, 0 missing, 0 duplicated, 0 wrong"), "{report}");
    assert!(report.contains("outputs compared"), "{report}");
    // A long decimal cut short in the database: wrong, though a double cannot tell.
    db.query("UPDATE chunkmill_outputs SET doc = '{\"n\": 0.1}' WHERE idx = 6");
    let (ok, report) = p.verify_postgres_with_flags(&db, &["--recompute-with", "echo=cat"]);
    assert!(!ok && report.contains("1 wrong") && report.contains("object 6 "), "{report}");
}

/// Issue 36, item 12 end to end: ids `1` and `"1"` are two records (jq tells them apart), `1.0`
/// repeats `1` (`1 == 1.0` in jq) and is skipped; both records are saved into PostgreSQL, where
/// their ids have one text: the second holder's rows keep their values with id NULL.
#[test]
fn ids_that_differ_only_in_their_json_type_are_both_saved_and_one_that_repeats_a_number_is_skipped() {
    let db = PgServer::start();
    let p = Pipeline::orders(1, &["--transform", "jq", "--filter", ".", "--id-field", ".id"]);
    let records = [r#"{"id":1,"v":"number"}"#, r#"{"id":"1","v":"string"}"#, r#"{"id":1.0,"v":"repeat"}"#];
    std::fs::write(&p.input, records.map(|r| format!("{r}\n")).concat()).expect("write input");
    let (_saver, port) = p.saver_postgres("saver-1", &db);
    wait_ready(port);
    let _mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&["--bad-records", "skip"]);
    assert_eq!(fetcher.wait_exit(Duration::from_secs(120)), Some(3), "{}", fetcher.log());
    assert!(fetcher.log().contains("duplicate id 1 (first on line 1)"), "{}", fetcher.log());
    let (ok, report) = p.verify_postgres(&db);
    assert!(ok && report.contains("2 expected, 2 found") && report.contains("1 invalid input records"), "{report}");
    let saved = db.query("SELECT coalesce(id, 'NULL') || ':' || (doc->>'v') FROM chunkmill_outputs ORDER BY idx");
    assert_eq!(saved, "1:number\nNULL:string", "{saved}");
}
