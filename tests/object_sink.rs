//! End-to-end: the object-store sink (`saver --sink s3://BUCKET/PREFIX/`, `file:///DIR/`). Real
//! processes around a real nats-server, a real S3-compatible server (moto) per test, and the
//! committed parts read back by an independent reader, DuckDB (installed by `scripts/lib.sh`'s
//! `ensure_duckdb` into ~/.cache/chunkmill): a run with `--exit-when-done` exits only after
//! `_SUCCESS`, after which `part-*` holds every value exactly once (plain, gzip, zstd); `saver
//! verify --sink s3://...` says OK and fails on a tampered part; a saver killed half way through
//! the commit leaves it to the next saver, which finishes it with no duplicate part; a bad
//! `--sink` or a missing bucket stops the saver at start naming the setting; two savers share a
//! run; the store cut off from the saver for a while mid-run loses nothing. Parquet runs: DuckDB
//! reads every value once with nested values and numbers intact, a value that does not fit the
//! run's schema is dead-lettered with the reason, two savers record and use one schema.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::harness::Service;
use support::s3::S3Server;
use support::{finish, Pipeline};

/// The python of the venv with DuckDB (`ensure_duckdb` in scripts/lib.sh exports it).
fn duckdb_python() -> PathBuf {
    if let Ok(python) = std::env::var("CHUNKMILL_DUCKDB_PYTHON") {
        return PathBuf::from(python);
    }
    let home = std::env::var("HOME").expect("HOME");
    let cache = Path::new(&home).join(".cache/chunkmill");
    let found = std::fs::read_dir(&cache).ok().and_then(|entries| {
        entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("duckdb-")))
            .find(|p| p.join(".installed").exists())
    });
    match found {
        Some(venv) => venv.join("bin/python"),
        None => panic!(
            "no DuckDB venv under {}: run `. scripts/lib.sh; ensure_duckdb` (scripts/test.sh does)",
            cache.display()
        ),
    }
}

/// The `id` of every value DuckDB reads from the files `glob` matches (JSON Lines; gzip and zstd
/// by their extension), sorted.
fn duckdb_ids(glob: &str) -> Vec<String> {
    let script = "import duckdb, sys\n\
        rows = duckdb.sql(\"SELECT id FROM read_json(?, format='newline_delimited', columns={'id': 'VARCHAR'}) ORDER BY id\", params=[sys.argv[1]]).fetchall()\n\
        sys.stdout.write(''.join(r[0] + '\\n' for r in rows))\n";
    let output = Command::new(duckdb_python()).args(["-c", script, glob]).output().expect("run DuckDB's python");
    assert!(output.status.success(), "DuckDB could not read {glob}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("ids are text").lines().map(str::to_string).collect()
}

/// The input's `uuid`s, sorted: what the digest transform's `id`s must be, each once.
fn input_ids(p: &Pipeline) -> Vec<String> {
    let text = std::fs::read_to_string(&p.input).expect("input");
    let mut ids: Vec<String> = text
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("input JSON");
            value["uuid"].as_str().expect("a uuid").to_string()
        })
        .collect();
    ids.sort();
    ids
}

/// A saver writing to `sink`, with `env` (the store's settings) and extra flags.
fn object_saver(p: &Pipeline, name: &str, sink: &str, env: &[(&'static str, String)], extra: &[&str]) -> Service {
    let mut args: Vec<String> = vec!["--sink".into(), sink.into(), "--instance".into(), name.into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let env: Vec<(&'static str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    p.spawn_with_env(name, "saver", &args, &env).0
}

/// Copies the committed parts of `run` under `prefix` in `bucket` into `dir`, as a reader that
/// lists `PREFIX/<run>/part-*` would see them; returns their names.
fn download_parts(s3: &S3Server, bucket: &str, prefix: &str, run: &str, dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for key in s3.list(bucket, &format!("{prefix}/{run}")) {
        let name = key.rsplit('/').next().expect("a name").to_string();
        if name.starts_with("part-") && !key.contains("/_staging/") {
            std::fs::write(dir.join(&name), s3.get(bucket, &key)).expect("write a part");
            names.push(name);
        }
    }
    names
}

/// Files under `dir`, at any depth (a local store leaves empty directories behind).
fn files_under(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.flatten().map(|e| if e.path().is_dir() { files_under(&e.path()) } else { 1 }).sum()
}

fn verify_sink(p: &Pipeline, sink: &str, env: &[(&'static str, String)]) -> (bool, String) {
    verify_sink_with(p, sink, env, &[])
}

fn verify_sink_with(p: &Pipeline, sink: &str, env: &[(&'static str, String)], flags: &[&str]) -> (bool, String) {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut args = vec!["--sink".to_string(), sink.to_string()];
    args.extend(flags.iter().map(|f| f.to_string()));
    p.verify_with(&args, &env)
}

#[test]
fn a_run_into_a_directory_exits_after_success_and_duckdb_reads_every_value_once() {
    let p = Pipeline::new(1500, 0);
    let dir = p.dir.path().join("bucket");
    let sink = format!("file://{}/out/", dir.display());
    let _saver = object_saver(&p, "saver-1", &sink, &[], &["--part-size", "64KiB"]);
    let _mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&[]);
    finish(&mut fetcher, Duration::from_secs(120));
    let run = dir.join("out").join(p.run_id());
    // The fetcher exited: the commit is durable.
    assert!(run.join("_SUCCESS").exists(), "no _SUCCESS after the fetcher exited:\n{}", fetcher.log());
    assert!(fetcher.log().contains("is committed"), "{}", fetcher.log());
    let parts: Vec<String> = std::fs::read_dir(&run)
        .expect("run dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("part-"))
        .collect();
    assert!(parts.len() > 1, "--part-size 64KiB makes several parts: {parts:?}");
    assert_eq!(files_under(&run.join("_staging")), 0, "the staging area is cleaned up at commit");
    assert_eq!(duckdb_ids(&format!("{}/part-*", run.display())), input_ids(&p));
    let (ok, report) = verify_sink(&p, &sink, &[]);
    assert!(ok, "{report}");
    assert!(report.contains("1500 expected, 1500 found, 0 missing, 0 duplicated, 0 wrong"), "{report}");
}

#[test]
fn runs_into_s3_gzip_and_zstd_are_read_back_by_duckdb_once_each_and_verify_catches_a_tampered_part() {
    let s3 = S3Server::start();
    s3.create_bucket("results");
    for compression in ["none", "gzip", "zstd"] {
        let p = Pipeline::new(1200, 0);
        let sink = format!("s3://results/{compression}/");
        let _saver =
            object_saver(&p, "saver-1", &sink, &s3.env(), &["--compression", compression, "--part-size", "4KiB"]);
        let _mapper = p.mapper("mapper-1", &[]);
        let mut fetcher = p.fetcher(&[]);
        finish(&mut fetcher, Duration::from_secs(120));
        let run = p.run_id();
        let keys = s3.list("results", &format!("{compression}/{run}"));
        assert!(keys.iter().any(|k| k.ends_with("/_SUCCESS")), "{compression}: no _SUCCESS: {keys:?}");
        assert!(!keys.iter().any(|k| k.contains("/_staging/")), "{compression}: staging left: {keys:?}");
        let local = p.dir.path().join("parts");
        std::fs::create_dir_all(&local).expect("dir");
        let parts = download_parts(&s3, "results", compression, &run, &local);
        let suffix = match compression {
            "gzip" => ".jsonl.gz",
            "zstd" => ".jsonl.zst",
            _ => ".jsonl",
        };
        assert!(parts.len() > 1 && parts.iter().all(|n| n.ends_with(suffix)), "{compression}: {parts:?}");
        assert_eq!(duckdb_ids(&format!("{}/part-*", local.display())), input_ids(&p), "{compression}");
        let (ok, report) = verify_sink(&p, &sink, &s3.env());
        assert!(ok, "{compression}: {report}");
        assert!(report.contains("1200 expected, 1200 found, 0 missing, 0 duplicated, 0 wrong"), "{report}");
        if compression == "zstd" {
            // A part changed after the commit: verify names it and its checksum.
            let key = format!("{compression}/{run}/{}", parts[0]);
            let mut bytes = s3.get("results", &key);
            let last = bytes.len() - 1;
            bytes[last] ^= 0xff;
            s3.put("results", &key, &bytes);
            let (ok, report) = verify_sink(&p, &sink, &s3.env());
            assert!(!ok, "a tampered part must fail verify: {report}");
            assert!(report.contains(&parts[0]) && report.contains("SHA-256"), "{report}");
        }
    }
}

#[test]
fn a_saver_and_fetcher_killed_during_the_commit_leave_it_to_the_next_which_finish_it_without_a_duplicate_part() {
    let s3 = S3Server::start();
    s3.create_bucket("results");
    let p = Pipeline::new(1500, 0);
    let sink = "s3://results/out/";
    let mut env = s3.env();
    env.push(("CHUNKMILL_TEST_ABORT_COMMIT_AFTER_PARTS", "2".into()));
    let mut dying = object_saver(&p, "saver-1", sink, &env, &["--part-size", "32KiB"]);
    let _mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&[]);
    dying.wait_for_log("aborting mid-commit", Duration::from_secs(120));
    // Aborted by the hook (a SIGKILL too, in case it has not gone yet).
    dying.kill();
    let run = p.run_id();
    let keys = s3.list("results", &format!("out/{run}"));
    assert!(keys.iter().any(|k| k.ends_with("/_commit_plan.json")), "the plan was written first: {keys:?}");
    assert!(!keys.iter().any(|k| k.ends_with("/_SUCCESS")), "not committed yet: {keys:?}");
    assert_eq!(fetcher.wait_exit(Duration::from_secs(1)), None, "the fetcher waits for the commit");
    // The fetcher dies too: the one restarted on the complete run knows from its ledger that the
    // run still needs its commit, and asks for it.
    fetcher.kill();
    let (mut fetcher, _) = p.fetcher_named("fetcher-2", &["--exit-when-done"]);
    fetcher.wait_for_log("asking a saver to commit it", Duration::from_secs(60));
    let _saver = object_saver(&p, "saver-2", sink, &s3.env(), &["--part-size", "32KiB"]);
    finish(&mut fetcher, Duration::from_secs(120));
    let keys = s3.list("results", &format!("out/{run}"));
    let manifest: serde_json::Value =
        serde_json::from_slice(&s3.get("results", &format!("out/{run}/_manifest.json"))).expect("a manifest");
    let listed: Vec<String> = manifest["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .map(|part| format!("out/{run}/{}", part["name"].as_str().expect("a name")))
        .collect();
    let found: Vec<String> = keys.iter().filter(|k| k.contains("/part-")).cloned().collect();
    assert_eq!(found, listed, "exactly the manifest's parts, none twice, none left over");
    let local = p.dir.path().join("parts");
    std::fs::create_dir_all(&local).expect("dir");
    download_parts(&s3, "results", "out", &run, &local);
    assert_eq!(duckdb_ids(&format!("{}/part-*", local.display())), input_ids(&p));
    let (ok, report) = verify_sink(&p, sink, &s3.env());
    assert!(ok, "{report}");
}

#[test]
fn with_the_kv_ledger_a_fetcher_on_a_fresh_pod_finishes_a_killed_commit_from_what_jetstream_holds() {
    let p = Pipeline::new(1500, 0);
    let dir = p.dir.path().join("bucket");
    let sink = format!("file://{}/out/", dir.display());
    let hook = [("CHUNKMILL_TEST_ABORT_COMMIT_AFTER_PARTS", "2".to_string())];
    let mut dying = object_saver(&p, "saver-1", &sink, &hook, &["--part-size", "32KiB"]);
    let _mapper = p.mapper("mapper-1", &[]);
    let kv = ["--exit-when-done", "--ledger", "kv", "--instance", "fetcher-main"];
    let (mut fetcher, _) = p.fetcher_named("fetcher-1", &kv);
    dying.wait_for_log("aborting mid-commit", Duration::from_secs(120));
    dying.kill();
    let run = dir.join("out").join(p.run_id());
    assert!(run.join("_commit_plan.json").exists(), "the plan was written first");
    assert!(!run.join("_SUCCESS").exists(), "not committed yet");
    assert_eq!(fetcher.wait_exit(Duration::from_secs(1)), None, "the fetcher waits for the commit");
    fetcher.kill();
    // A fresh pod (the kv-ledger component's emptyDir): nothing on disk; that the run needs a
    // commit, and has none yet, is known only from the ledger in JetStream.
    if p.state_dir().exists() {
        std::fs::remove_dir_all(p.state_dir()).expect("wipe the state directory");
    }
    let (mut fetcher, _) = p.fetcher_named("fetcher-2", &kv);
    fetcher.wait_for_log("asking a saver to commit it", Duration::from_secs(60));
    assert!(fetcher.log().contains("15 chunks already done, 0 dead-lettered, 0 to go"), "{}", fetcher.log());
    let _saver = object_saver(&p, "saver-2", &sink, &[], &["--part-size", "32KiB"]);
    finish(&mut fetcher, Duration::from_secs(120));
    assert!(run.join("_SUCCESS").exists(), "the fetcher exited before the commit:\n{}", fetcher.log());
    assert_eq!(files_under(&run.join("_staging")), 0, "the staging area is cleaned up at commit");
    assert_eq!(duckdb_ids(&format!("{}/part-*", run.display())), input_ids(&p));
    let (ok, report) = verify_sink(&p, &sink, &[]);
    assert!(ok, "{report}");
}

/// A run of 1 500 objects into `s3://results/<name>/` whose first saver aborts at `point`
/// (`CHUNKMILL_TEST_ABORT_AT`, saver/src/sink/object/hooks.rs) and a second saver finishes;
/// checks what the crash left, then that the committed run holds every value exactly once.
fn a_saver_dies_at(s3: &S3Server, point: &str, name: &str) {
    let p = Pipeline::new(1500, 0);
    let sink = format!("s3://results/{name}/");
    let mut env = s3.env();
    env.push(("CHUNKMILL_TEST_ABORT_AT", point.into()));
    let mut dying = object_saver(&p, "saver-1", &sink, &env, &["--part-size", "32KiB"]);
    let _mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&[]);
    dying.wait_for_log("aborting at", Duration::from_secs(120));
    dying.kill();
    let run = p.run_id();
    let keys = s3.list("results", &format!("{name}/{run}"));
    let count = |suffix: &str| keys.iter().filter(|k| k.contains("/_staging/") && k.ends_with(suffix)).count();
    let (indexes, data) = (count(".index.json"), count(".jsonl"));
    match point {
        // The batch's data is there, its index not: a data object nobody reads (batches are
        // staged 4 at a time, so others may be anywhere).
        "staged-data:1" => assert!(data > indexes, "{point}: {keys:?}"),
        // The first batch's index is there: its chunks are saved, though never acknowledged.
        "staged-index:1" => assert!(indexes >= 1, "{point}: {keys:?}"),
        // The commit's first part was being uploaded: no part is visible under its name.
        _ => assert!(!keys.iter().any(|k| k.contains("/part-")), "{point}: a part is visible: {keys:?}"),
    }
    assert!(!keys.iter().any(|k| k.ends_with("/_SUCCESS")), "{point}: committed: {keys:?}");
    let _saver = object_saver(&p, "saver-2", &sink, &s3.env(), &["--part-size", "32KiB"]);
    finish(&mut fetcher, Duration::from_secs(120));
    let keys = s3.list("results", &format!("{name}/{run}"));
    assert!(!keys.iter().any(|k| k.contains("/_staging/")), "{point}: staging left behind: {keys:?}");
    let local = p.dir.path().join("parts");
    std::fs::create_dir_all(&local).expect("dir");
    download_parts(s3, "results", name, &run, &local);
    assert_eq!(duckdb_ids(&format!("{}/part-*", local.display())), input_ids(&p), "{point}");
    let (ok, report) = verify_sink(&p, &sink, &s3.env());
    assert!(ok, "{point}: {report}");
}

#[test]
fn a_saver_killed_after_staging_data_after_its_index_or_mid_upload_loses_and_doubles_nothing() {
    let s3 = S3Server::start();
    s3.create_bucket("results");
    // The first batch of each: a quick saver may stage the whole run in one batch.
    a_saver_dies_at(&s3, "staged-data:1", "data");
    a_saver_dies_at(&s3, "staged-index:1", "index");
    a_saver_dies_at(&s3, "mid-upload:1", "upload");
}

#[test]
fn an_unknown_scheme_and_a_missing_bucket_stop_the_saver_at_start_naming_the_setting() {
    let s3 = S3Server::start();
    let p = Pipeline::new(10, 0);
    let mut unknown = object_saver(&p, "saver-ftp", "ftp://host/dir/", &[], &[]);
    assert!(unknown.wait_exit(Duration::from_secs(30)).is_some_and(|code| code != 0), "{}", unknown.log());
    assert!(unknown.log().contains("--sink"), "{}", unknown.log());
    let mut missing = object_saver(&p, "saver-nobucket", "s3://no-such-bucket/out/", &s3.env(), &[]);
    assert!(missing.wait_exit(Duration::from_secs(60)).is_some_and(|code| code != 0), "{}", missing.log());
    assert!(missing.log().contains("--sink s3://no-such-bucket/out/: the bucket does not exist"), "{}", missing.log());
    let flags = ["--format", "parquet", "--compression", "gzip"];
    let mut parquet = object_saver(&p, "saver-parquet", "s3://b/out/", &s3.env(), &flags);
    assert!(parquet.wait_exit(Duration::from_secs(30)).is_some_and(|code| code != 0), "{}", parquet.log());
    assert!(parquet.log().contains("--compression gzip does not exist for --format parquet"), "{}", parquet.log());
}

/// The staged batch indexes of `run` under `prefix` so far.
fn staged_indexes(s3: &S3Server, bucket: &str, prefix: &str, run: &str) -> usize {
    s3.list(bucket, &format!("{prefix}/{run}/_staging")).iter().filter(|k| k.ends_with(".index.json")).count()
}

#[test]
fn two_savers_on_one_run_commit_every_value_once() {
    let s3 = S3Server::start();
    s3.create_bucket("results");
    let p = Pipeline::new(2000, 0);
    let sink = "s3://results/two/";
    let _a = object_saver(&p, "saver-a", sink, &s3.env(), &["--part-size", "16KiB"]);
    let _b = object_saver(&p, "saver-b", sink, &s3.env(), &["--part-size", "16KiB"]);
    let _m1 = p.mapper("mapper-1", &[]);
    let _m2 = p.mapper("mapper-2", &[]);
    let mut fetcher = p.fetcher(&["--chunk-size", "50"]);
    finish(&mut fetcher, Duration::from_secs(120));
    let run = p.run_id_at(50);
    let keys = s3.list("results", &format!("two/{run}"));
    assert!(keys.iter().any(|k| k.ends_with("/_SUCCESS")), "no _SUCCESS: {keys:?}");
    let local = p.dir.path().join("parts");
    std::fs::create_dir_all(&local).expect("dir");
    download_parts(&s3, "results", "two", &run, &local);
    assert_eq!(duckdb_ids(&format!("{}/part-*", local.display())), input_ids(&p));
    let (ok, report) = verify_sink_with(&p, sink, &s3.env(), &["--chunk-size", "50"]);
    assert!(ok, "{report}");
}

#[test]
fn a_store_gone_for_seconds_mid_run_loses_nothing_and_the_run_commits() {
    let s3 = S3Server::start();
    s3.create_bucket("results");
    // The saver reaches moto through a proxy, cut for a while mid-run (moto keeps its objects).
    let proxy = common::harness::TcpProxy::start(s3.port());
    let p = Pipeline::new(600, 20_000);
    let sink = "s3://results/outage/";
    let env = s3.env_at(&format!("http://127.0.0.1:{}", proxy.port()));
    let args: Vec<String> = ["--sink", sink, "--instance", "saver-1"].iter().map(|s| s.to_string()).collect();
    let env_refs: Vec<(&'static str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (saver, port) = p.spawn_with_env("saver-1", "saver", &args, &env_refs);
    let _mapper = p.mapper("slow-mapper", &["--threads", "1", "--concurrency", "1"]);
    let mut fetcher = p.fetcher(&["--chunk-size", "20"]);
    let run = p.run_id_at(20);
    support::wait_until("two staged batches", Duration::from_secs(60), || {
        staged_indexes(&s3, "results", "outage", &run) >= 2
    });
    proxy.cut();
    support::wait_until("the saver to count a failed save", Duration::from_secs(60), || {
        support::metric(port, "chunkmill_saver_write_failures_total").is_some_and(|n| n >= 1.0)
    });
    proxy.restore();
    finish(&mut fetcher, Duration::from_secs(180));
    assert_eq!(p.summary_number("fetcher", "/dead"), 0, "{}", fetcher.log());
    drop(saver);
    let keys = s3.list("results", &format!("outage/{run}"));
    assert!(keys.iter().any(|k| k.ends_with("/_SUCCESS")), "no _SUCCESS: {keys:?}");
    let local = p.dir.path().join("parts");
    std::fs::create_dir_all(&local).expect("dir");
    download_parts(&s3, "results", "outage", &run, &local);
    assert_eq!(duckdb_ids(&format!("{}/part-*", local.display())), input_ids(&p));
    let (ok, report) = verify_sink_with(&p, sink, &s3.env(), &["--chunk-size", "20"]);
    assert!(ok, "{report}");
}

/// The rows DuckDB reads from the Parquet files `glob` matches, each a JSON object (keys sorted).
fn duckdb_parquet_rows(glob: &str) -> Vec<serde_json::Value> {
    let script = "import duckdb, json, sys\n\
        rel = duckdb.sql('SELECT * FROM read_parquet(?)', params=[sys.argv[1]])\n\
        names = rel.columns\n\
        for row in rel.fetchall():\n    sys.stdout.write(json.dumps(dict(zip(names, row)), sort_keys=True) + '\\n')\n";
    let output = Command::new(duckdb_python()).args(["-c", script, glob]).output().expect("run DuckDB's python");
    assert!(output.status.success(), "DuckDB could not read {glob}: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).expect("rows are text");
    text.lines().map(|line| serde_json::from_str(line).expect("a row as JSON")).collect()
}

/// The Parquet job: nested values (a struct, a list of structs) and numbers (integers, and a
/// float that is whole for one order in four, so a batch holds both; quarters are exact in
/// binary, so the expected double is the one jq prints).
const PARQUET_FILTER: &str = "{order_id, customer, items, share: (.items[0].price / 4)}";

/// What [`PARQUET_FILTER`] makes of each input order, by order id.
fn parquet_expected(p: &Pipeline) -> std::collections::BTreeMap<String, serde_json::Value> {
    let text = std::fs::read_to_string(&p.input).expect("input");
    text.lines()
        .map(|line| {
            let order: serde_json::Value = serde_json::from_str(line).expect("input JSON");
            let price = order["items"][0]["price"].as_f64().expect("a price");
            let id = order["order_id"].as_str().expect("an order id").to_string();
            let value = serde_json::json!({
                "order_id": id, "customer": order["customer"], "items": order["items"], "share": price / 4.0
            });
            (id, value)
        })
        .collect()
}

/// Downloads the committed Parquet parts of `run` and returns what DuckDB reads from them.
fn parquet_rows(s3: &S3Server, p: &Pipeline, prefix: &str, run: &str) -> Vec<serde_json::Value> {
    let local = p.dir.path().join(format!("parts-{}", prefix.replace('/', "-")));
    std::fs::create_dir_all(&local).expect("dir");
    let parts = download_parts(s3, "results", prefix, run, &local);
    assert!(!parts.is_empty() && parts.iter().all(|n| n.ends_with(".parquet")), "{parts:?}");
    duckdb_parquet_rows(&format!("{}/part-*.parquet", local.display()))
}

#[test]
fn a_parquet_run_is_read_back_by_duckdb_with_every_value_once_nested_values_and_numbers_intact() {
    let s3 = S3Server::start();
    s3.create_bucket("results");
    let p = Pipeline::orders(1500, &["--transform", "jq", "--filter", PARQUET_FILTER, "--id-field", ".order_id"]);
    let sink = "s3://results/pq/";
    let flags = ["--format", "parquet", "--compression", "zstd", "--part-size", "64KiB"];
    let _saver = object_saver(&p, "saver-1", sink, &s3.env(), &flags);
    let _mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&[]);
    finish(&mut fetcher, Duration::from_secs(120));
    let run = p.run_id();
    let keys = s3.list("results", &format!("pq/{run}"));
    assert!(keys.iter().any(|k| k.ends_with("/_SUCCESS")), "no _SUCCESS: {keys:?}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&s3.get("results", &format!("pq/{run}/_manifest.json"))).expect("a manifest");
    assert_eq!(manifest["format"], "parquet");
    assert_eq!(manifest["schema"]["fields"][3]["name"], "share", "the schema is in the manifest: {manifest}");
    assert_eq!(manifest["schema"]["fields"][3]["type"], "float64", "{manifest}");
    let rows = parquet_rows(&s3, &p, "pq", &run);
    assert!(manifest["parts"].as_array().expect("parts").len() > 1, "--part-size 64KiB makes several parts");
    let expected = parquet_expected(&p);
    assert_eq!(rows.len(), expected.len(), "every value once");
    let mut seen = std::collections::BTreeSet::new();
    for row in &rows {
        let id = row["order_id"].as_str().expect("an order id");
        assert!(seen.insert(id.to_string()), "{id} twice");
        assert_eq!(Some(row), expected.get(id), "{id} as DuckDB reads it");
    }
    let (ok, report) = verify_sink(&p, sink, &s3.env());
    assert!(ok, "{report}");
    assert!(report.contains("1500 expected, 1500 found, 0 missing, 0 duplicated, 0 wrong"), "{report}");
}

#[test]
fn a_value_that_does_not_fit_the_runs_schema_is_dead_lettered_with_the_field_and_both_types_and_the_rest_saved() {
    let s3 = S3Server::start();
    s3.create_bucket("results");
    // `n` is a string for an order of one item, a number otherwise: whichever the first staged
    // batch makes the schema, the other kind does not fit.
    let filter = r#"{order_id, n: (if (.items | length) == 1 then "one" else (.items | length) end)}"#;
    let p = Pipeline::orders(1000, &["--transform", "jq", "--filter", filter, "--id-field", ".order_id"]);
    let sink = "s3://results/misfit/";
    // n is int64 here: a number in a string field would be kept as its text, not a misfit.
    let schema = p.dir.path().join("schema.json");
    std::fs::write(&schema, r#"{"fields":[{"name":"n","type":"int64"},{"name":"order_id","type":"string"}]}"#)
        .expect("write a schema");
    let schema = schema.to_str().expect("a UTF-8 path");
    let _saver = object_saver(&p, "saver-1", sink, &s3.env(), &["--format", "parquet", "--schema", schema]);
    let _mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&[]);
    let code = fetcher.wait_exit(Duration::from_secs(120));
    assert_eq!(code, Some(3), "the run completes with dead letters (exit status 3):\n{}", fetcher.log());
    let run = p.run_id();
    let schema: serde_json::Value =
        serde_json::from_slice(&s3.get("results", &format!("misfit/{run}/_manifest.json"))).expect("a manifest");
    let n_type = schema["schema"]["fields"][0]["type"].as_str().expect("n's type").to_string();
    assert_eq!(n_type, "int64", "the run's schema is the given one: {schema}");
    let text = std::fs::read_to_string(&p.input).expect("input");
    let (mut fits, mut misfits) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
    for line in text.lines() {
        let order: serde_json::Value = serde_json::from_str(line).expect("input JSON");
        let one = order["items"].as_array().expect("items").len() == 1;
        let id = order["order_id"].as_str().expect("an id").to_string();
        if !one {
            fits.insert(id)
        } else {
            misfits.insert(id)
        };
    }
    assert!(!fits.is_empty() && !misfits.is_empty(), "the input has orders of one item and of more");
    let dead = String::from_utf8(s3.get("results", &format!("misfit/{run}/_dead_letters.jsonl"))).expect("text");
    let reason = "field .n: a string where the schema has int64";
    let mut dead_ids = std::collections::BTreeSet::new();
    for line in dead.lines() {
        let entry: serde_json::Value = serde_json::from_str(line).expect("a dead-letter line");
        assert_eq!(entry["cause"], "sink", "{line}");
        assert!(entry["error"].as_str().is_some_and(|e| e.contains(reason)), "{line}");
        dead_ids.insert(entry["id"].as_str().expect("an id").to_string());
    }
    assert_eq!(dead_ids, misfits, "exactly the objects whose value does not fit are dead-lettered");
    let rows = parquet_rows(&s3, &p, "misfit", &run);
    let saved: std::collections::BTreeSet<String> =
        rows.iter().map(|r| r["order_id"].as_str().expect("an id").to_string()).collect();
    assert_eq!((saved.len(), saved), (rows.len(), fits), "the rest saved, each once");
    let (ok, report) = verify_sink(&p, sink, &s3.env());
    assert!(ok, "{report}");
    assert!(report.contains(&format!("{} dead-lettered", misfits.len())), "{report}");
}

#[test]
fn two_savers_on_one_parquet_run_record_one_schema_and_write_every_part_with_it() {
    let s3 = S3Server::start();
    s3.create_bucket("results");
    let p = Pipeline::orders(2000, &["--transform", "jq", "--filter", PARQUET_FILTER, "--id-field", ".order_id"]);
    let sink = "s3://results/two-pq/";
    let flags = ["--format", "parquet", "--compression", "snappy", "--part-size", "32KiB"];
    let spawn = |name: &str| {
        let mut args: Vec<String> = vec!["--sink".into(), sink.into(), "--instance".into(), name.into()];
        args.extend(flags.iter().map(|s| s.to_string()));
        let env = s3.env();
        let env: Vec<(&'static str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        p.spawn_with_env(name, "saver", &args, &env)
    };
    let ((_a, port_a), (_b, port_b)) = (spawn("saver-a"), spawn("saver-b"));
    let _m1 = p.mapper("mapper-1", &[]);
    let _m2 = p.mapper("mapper-2", &[]);
    let mut fetcher = p.fetcher(&["--chunk-size", "50"]);
    finish(&mut fetcher, Duration::from_secs(120));
    let run = p.run_id_at(50);
    let manifest: serde_json::Value =
        serde_json::from_slice(&s3.get("results", &format!("two-pq/{run}/_manifest.json"))).expect("a manifest");
    let chunks: std::collections::BTreeSet<String> = manifest["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .flat_map(|part| part["chunks"].as_array().expect("chunks").clone())
        .map(|c| c["chunk"].to_string())
        .collect();
    assert_eq!(chunks.len(), 40, "every chunk in the manifest: {manifest}");
    for port in [port_a, port_b] {
        let saved = support::metric(port, "chunkmill_saver_chunks_saved_total").unwrap_or(0.0);
        assert!(saved >= 1.0, "both savers staged chunks of the run (saver on port {port}: {saved})");
    }
    let rows = parquet_rows(&s3, &p, "two-pq", &run);
    let expected = parquet_expected(&p);
    assert_eq!(rows.len(), expected.len(), "every value once");
    for row in &rows {
        let id = row["order_id"].as_str().expect("an order id");
        assert_eq!(Some(row), expected.get(id), "{id}: every part holds the one schema's columns");
    }
    let (ok, report) = verify_sink_with(&p, sink, &s3.env(), &["--chunk-size", "50"]);
    assert!(ok, "{report}");
}

#[test]
fn a_saver_given_another_schema_than_the_runs_saves_none_of_it_names_both_and_the_run_completes_through_the_other() {
    let s3 = S3Server::start();
    s3.create_bucket("results");
    let p = Pipeline::orders(4000, &["--transform", "jq", "--filter", PARQUET_FILTER, "--id-field", ".order_id"]);
    let sink = "s3://results/other-schema/";
    let spawn = |name: &str, extra: &[&str]| {
        let mut args: Vec<String> = vec!["--sink".into(), sink.into(), "--instance".into(), name.into()];
        args.extend(["--format", "parquet"].iter().chain(extra).map(|s| s.to_string()));
        let env = s3.env();
        let env: Vec<(&'static str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        p.spawn_with_env(name, "saver", &args, &env)
    };
    // Saver a infers the run's schema from its first batch and records it.
    let (_a, port_a) = spawn("saver-a", &[]);
    let mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&["--chunk-size", "10"]);
    support::wait_until("the run's schema is recorded", Duration::from_secs(60), || {
        s3.list("results", "other-schema/").iter().any(|key| key.ends_with("/_schema.json"))
    });
    // Hold the results back while saver b, told another schema, joins the queue group.
    mapper.signal("STOP");
    let narrow = p.dir.path().join("narrow.json");
    std::fs::write(&narrow, r#"{"fields":[{"name":"order_id","type":"string"}]}"#).expect("write a schema");
    let (b, port_b) = spawn("saver-b", &["--schema", narrow.to_str().expect("a UTF-8 path")]);
    support::wait_ready(port_b);
    mapper.signal("CONT");
    support::wait_until("saver b refuses a batch of the run", Duration::from_secs(60), || {
        support::metric(port_b, "chunkmill_saver_write_failures_total").unwrap_or(0.0) >= 1.0
    });
    finish(&mut fetcher, Duration::from_secs(120));
    assert_eq!(
        support::metric(port_b, "chunkmill_saver_chunks_saved_total").unwrap_or(0.0),
        0.0,
        "saver b saved nothing"
    );
    let log = b.log();
    assert!(
        log.contains("but this saver's --schema is") && log.contains(r#""share""#),
        "saver b names the run's schema and its own:\n{log}"
    );
    assert!(
        support::metric(port_a, "chunkmill_saver_chunks_saved_total").unwrap_or(0.0) >= 400.0,
        "saver a saved every chunk"
    );
    let run = p.run_id_at(10);
    let rows = parquet_rows(&s3, &p, "other-schema", &run);
    let expected = parquet_expected(&p);
    assert_eq!(rows.len(), expected.len(), "every value once");
    for row in &rows {
        let id = row["order_id"].as_str().expect("an order id");
        assert_eq!(Some(row), expected.get(id), "{id}: written with the run's schema, not saver b's");
    }
    let (ok, report) = verify_sink_with(&p, sink, &s3.env(), &["--chunk-size", "10"]);
    assert!(ok, "{report}");
}

#[test]
fn a_number_in_a_field_the_schema_makes_a_string_is_kept_as_its_exact_text_for_duckdb_and_verify() {
    let s3 = S3Server::start();
    s3.create_bucket("results");
    // The price is a JSON number; the schema makes it a string, so it is kept as its text.
    let filter = "{order_id, price: .items[0].price}";
    let p = Pipeline::orders(500, &["--transform", "jq", "--filter", filter, "--id-field", ".order_id"]);
    let schema = p.dir.path().join("schema.json");
    std::fs::write(&schema, r#"{"fields":[{"name":"order_id","type":"string"},{"name":"price","type":"string"}]}"#)
        .expect("write a schema");
    let sink = "s3://results/text/";
    let args = ["--format", "parquet", "--schema", schema.to_str().expect("a UTF-8 path")];
    let _saver = object_saver(&p, "saver-1", sink, &s3.env(), &args);
    let _mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&[]);
    finish(&mut fetcher, Duration::from_secs(120));
    let rows = parquet_rows(&s3, &p, "text", &p.run_id());
    let text = std::fs::read_to_string(&p.input).expect("input");
    assert_eq!(rows.len(), text.lines().count(), "every value once");
    let prices: std::collections::BTreeMap<String, serde_json::Value> =
        rows.iter().map(|r| (r["order_id"].as_str().expect("an id").to_string(), r["price"].clone())).collect();
    for line in text.lines() {
        let order: serde_json::Value = serde_json::from_str(line).expect("input JSON");
        let id = order["order_id"].as_str().expect("an id");
        let price = &order["items"][0]["price"];
        assert!(price.is_number(), "{line}");
        let written = price.to_string();
        assert_eq!(prices.get(id), Some(&serde_json::Value::String(written)), "{id}: the number's text, exactly");
    }
    let (ok, report) = verify_sink(&p, sink, &s3.env());
    assert!(ok, "{report}");
}
