//! Jobs end to end (issue 12): any JSON records and any transform, defined once at the fetcher,
//! run by a generic fleet of mappers, verified against a recomputation. Real binaries around a
//! real nats-server.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::harness::bin;
use support::{finish, metric, wait_ready, wait_until, Pipeline};

const LONG: Duration = Duration::from_secs(180);

/// jq: every item bought three or more at a time, as its own record: 0, 1 or more per order.
const BULK_ITEMS: &str = ".order_id as $id | .items[] | select(.qty >= 3) | {order: $id, sku, qty}";

fn repo(path: &str) -> String {
    format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))
}

fn enrich() -> String {
    format!("enrich=python3 {}", repo("examples/commands/enrich.py"))
}

fn lines(p: &Pipeline) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(&p.input).expect("input");
    text.lines().map(|l| serde_json::from_str(l).expect("generated JSON")).collect()
}

fn write_lines(p: &Pipeline, objects: &[serde_json::Value]) {
    let text: String = objects.iter().map(|o| format!("{o}\n")).collect();
    std::fs::write(&p.input, text).expect("write input");
}

/// Every chunk saved for the run, in chunk order (each copy, were one saved twice).
fn saved_chunks(p: &Pipeline) -> Vec<saver::sink::file::layout::SavedChunk> {
    let reader = saver::sink::file::layout::RunReader::open(&p.out.join(p.run_id())).expect("run directory");
    reader.chunks().into_iter().flat_map(|chunk| reader.chunk(chunk).expect("readable")).collect()
}

/// Every output value saved for the run, chunk after chunk, in order.
fn saved_values(p: &Pipeline) -> Vec<serde_json::Value> {
    let values = saved_chunks(p).into_iter().flat_map(|copy| copy.values);
    values.map(|v| serde_json::from_slice(&v).expect("a saved value is JSON")).collect()
}

/// Every dead-letter entry saved for the run.
fn dead_entries(p: &Pipeline) -> Vec<serde_json::Value> {
    let entries = saved_chunks(p).into_iter().flat_map(|copy| copy.dead);
    entries.map(|d| serde_json::to_value(d).expect("a dead entry is JSON")).collect()
}

#[test]
fn a_jq_job_over_orders_gives_zero_one_or_more_values_per_object_and_a_runtime_error_dead_letters_that_object() {
    let p = Pipeline::orders(2_000, &["--transform", "jq", "--filter", BULK_ITEMS, "--id-field", ".order_id"]);
    let mut objects = lines(&p);
    objects[1234]["items"] = "broken".into(); // `.items[]` on a string: a runtime error
    write_lines(&p, &objects);
    let broken_id = objects[1234]["order_id"].as_str().expect("id").to_string();
    let per_order: Vec<usize> = objects
        .iter()
        .map(|o| o["items"].as_array().map_or(0, |items| items.iter().filter(|i| i["qty"].as_u64() >= Some(3)).count()))
        .collect();
    assert!(per_order.contains(&0) && per_order.iter().any(|n| *n >= 2), "the data has 0 and 2+ values per order");

    let _saver = p.saver("saver-1");
    let _m1 = p.mapper("mapper-1", &[]);
    let _m2 = p.mapper("mapper-2", &[]);
    let mut fetcher = p.fetcher(&[]);
    assert_eq!(fetcher.wait_exit(LONG), Some(3), "complete, one object dead-lettered:\n{}", fetcher.log());
    assert!(fetcher.log().contains("job: jq"), "{}", fetcher.log());

    let values = saved_values(&p);
    assert_eq!(values.len(), per_order.iter().sum::<usize>());
    assert!(values.iter().all(|v| v["qty"].as_u64() >= Some(3) && v["order"].is_string()), "{:?}", values.first());
    let dead = dead_entries(&p);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["id"], broken_id.as_str());
    assert_eq!(dead[0]["cause"], "transform");
    assert_eq!(dead[0]["line"], 1235, "the input line of the object");
    assert!(dead[0]["error"].as_str().unwrap_or_default().contains("as iterable"), "{dead:?}");
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
    assert!(report.contains("2000 expected, 1999 found, 0 missing") && report.contains("1 dead-lettered"), "{report}");
    assert!(report.contains("outputs compared"), "{report}");
}

#[test]
fn a_jq_program_that_does_not_compile_is_refused_by_the_fetcher_before_any_chunk_is_leased() {
    let p = Pipeline::orders(10, &["--transform", "jq", "--filter", "{a: .b"]);
    let (mut fetcher, _) = p.fetcher_named("fetcher", &["--exit-when-done"]);
    assert_eq!(fetcher.wait_exit(Duration::from_secs(30)), Some(1), "{}", fetcher.log());
    let log = fetcher.log();
    assert!(log.contains("does not compile") && log.contains("line 1, column"), "{log}");
    let env = Pipeline::orders(10, &["--transform", "jq", "--filter", "$ENV.HOME"]);
    let (mut fetcher, _) = env.fetcher_named("fetcher", &["--exit-when-done"]);
    assert_eq!(fetcher.wait_exit(Duration::from_secs(30)), Some(1), "{}", fetcher.log());
    assert!(fetcher.log().contains("not available in chunkmill"), "{}", fetcher.log());
}

#[test]
fn a_jq_program_that_does_not_compile_stops_the_fetcher_at_once_without_any_nats_server() {
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("orders.jsonl");
    std::fs::write(&input, "{\"order_id\":\"o-1\"}\n").expect("input");
    // Nothing listens there: a fetcher that connected first would wait for it.
    let nowhere = format!("nats://127.0.0.1:{}", common::harness::free_port());
    let state = dir.path().join("state");
    let (input, state) = (input.display().to_string(), state.display().to_string());
    let args =
        ["--input", &input, "--state-dir", &state, "--transform", "jq", "--filter", "{a: .b", "--exit-when-done"];
    let env = [("NATS_URL", nowhere.as_str()), ("METRICS_ADDR", "127.0.0.1:0")];
    let mut fetcher = common::harness::Service::spawn("fetcher", "fetcher", &args, &env, dir.path());
    assert_eq!(fetcher.wait_exit(Duration::from_secs(15)), Some(1), "{}", fetcher.log());
    let log = fetcher.log();
    assert!(log.contains("does not compile") && log.contains("line 1, column"), "{log}");
    assert!(!log.contains("waiting for NATS"), "{log}");
}

/// jq: objects marked `f` run away (never end, recurse without end, allocate without bound: a
/// string doubled 64 times, which reaches the memory limit in a fraction of the time limit);
/// the others give their order's id and item count.
const RUNAWAY: &str = r#"if .f == "spin" then last(range(1e15))
    elif .f == "recurse" then (def f: [f]; f)
    elif .f == "alloc" then reduce range(64) as $i ("x"; . + .) | length
    else {order: .order_id, items: (.items | length)} end"#;

#[test]
fn runaway_jq_programs_dead_letter_only_their_objects_with_the_limit_and_verify_agrees() {
    let p = Pipeline::orders(300, &["--transform", "jq", "--filter", RUNAWAY, "--id-field", ".order_id"]);
    let mut objects = lines(&p);
    for (i, fault) in [(10, "spin"), (150, "recurse"), (250, "alloc")] {
        objects[i]["f"] = fault.into();
    }
    write_lines(&p, &objects);
    let limits = ["--jq-timeout", "3s", "--jq-memory", "256MiB"];
    let _saver = p.saver("saver-1");
    let mut args = vec!["--instance".to_string(), "mapper-1".into()];
    args.extend(limits.iter().map(|s| s.to_string()));
    let (mapper, port) = p.spawn_with_metrics("mapper-1", "mapper", &args);
    let mut fetcher = p.fetcher(&[]);
    assert_eq!(fetcher.wait_exit(LONG), Some(3), "complete with dead letters:\n{}", fetcher.log());

    let dead: BTreeMap<u64, (String, String)> = dead_entries(&p)
        .iter()
        .map(|d| {
            let (cause, error) = (d["cause"].as_str().expect("cause"), d["error"].as_str().expect("error"));
            (d["line"].as_u64().expect("line"), (cause.to_string(), error.to_string()))
        })
        .collect();
    assert_eq!(dead.keys().copied().collect::<Vec<_>>(), vec![11, 151, 251], "exactly those objects: {dead:?}");
    assert_eq!(dead[&11].0, "timeout");
    assert_eq!(dead[&11].1, "jq took longer than 3s on this object (time limit, `mapper --jq-timeout`), twice");
    assert_eq!(dead[&151].0, "crash");
    assert!(dead[&151].1.starts_with("jq recursion too deep (stack overflow)"), "{dead:?}");
    assert_eq!(dead[&251].0, "crash");
    assert_eq!(dead[&251].1, "jq used more than 256 MiB on this object (memory limit, `mapper --jq-memory`), twice");
    assert_eq!(saved_values(&p).len(), 297);

    // One mapper did it all: its sandboxes died, it did not.
    assert!(mapper.log().contains("jq sandbox"), "{}", mapper.log());
    assert!(!mapper.log().contains("panicked"), "{}", mapper.log());
    for reason in ["timeout", "stack", "memory"] {
        let series = format!("chunkmill_mapper_jq_sandbox_restarts_total{{reason=\"{reason}\"}}");
        assert!(metric(port, &series).is_some_and(|n| n >= 2.0), "{series}: {:?}", metric(port, &series));
    }
    let (ok, report) = p.verify_with_flags(&limits);
    assert!(ok, "{report}");
    assert!(report.contains("297 found") && report.contains("3 dead-lettered"), "{report}");
    assert_eq!(report.matches("verify: the same cause").count(), 3, "{report}");
}

#[test]
fn a_command_job_runs_the_shipped_python_example_and_verify_checks_it() {
    let p = Pipeline::orders(3_000, &["--transform", "command", "--command", "enrich"]);
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &["--command", &enrich()]);
    let mut fetcher = p.fetcher(&[]);
    finish(&mut fetcher, LONG);
    let values = saved_values(&p);
    assert_eq!(values.len(), 3_000);
    let objects = lines(&p);
    let total = |o: &serde_json::Value| -> u64 {
        o["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| i["qty"].as_u64().unwrap_or(0) * i["price"].as_u64().unwrap_or(0))
            .sum()
    };
    assert_eq!(values[7]["total"].as_u64(), Some(total(&objects[7])));
    let (ok, report) = p.verify();
    assert!(ok && report.contains("3000 found") && report.contains("completeness only"), "{report}");
    let (ok, report) = p.verify_with_flags(&["--recompute-with", &enrich()]);
    assert!(ok && report.contains("3000 found") && report.contains("outputs compared"), "{report}");
}

#[test]
fn a_command_that_crashes_hangs_or_prints_garbage_on_an_object_dead_letters_just_that_object() {
    let p = Pipeline::orders(300, &["--transform", "command", "--command", "faulty"]);
    let mut objects = lines(&p);
    for (i, fault) in [(10, "crash"), (150, "hang"), (250, "garbage")] {
        objects[i]["fault"] = fault.into();
    }
    write_lines(&p, &objects);
    let faulty = format!("faulty=python3 {}", repo("examples/commands/faulty.py"));
    let _saver = p.saver("saver-1");
    let mapper = p.mapper("mapper-1", &["--command", &faulty, "--command-timeout", "1s"]);
    let mut fetcher = p.fetcher(&[]);
    assert_eq!(fetcher.wait_exit(LONG), Some(3), "complete with dead letters:\n{}", fetcher.log());
    let dead: BTreeMap<u64, String> = dead_entries(&p)
        .iter()
        .map(|d| (d["line"].as_u64().expect("line"), d["cause"].as_str().expect("cause").to_string()))
        .collect();
    let expected: BTreeMap<u64, String> =
        [(11, "crash"), (151, "timeout"), (251, "transform")].iter().map(|(l, c)| (*l, c.to_string())).collect();
    assert_eq!(dead, expected, "exactly those objects, by line and cause");
    assert!(mapper.log().contains("restarted"), "{}", mapper.log());
    let (ok, report) = p.verify();
    assert!(ok && report.contains("297 found") && report.contains("3 dead-lettered"), "{report}");
}

#[test]
fn a_mapper_that_lacks_the_command_gets_no_chunk_and_a_mixed_fleet_completes() {
    let p = Pipeline::orders(2_000, &["--transform", "command", "--command", "enrich"]);
    let _saver = p.saver("saver-1");
    let (lacking, lacking_port) = p.spawn_with_metrics("lacking", "mapper", &["--instance".into(), "lacking".into()]);
    let (fetcher, port) = p.fetcher_named("fetcher", &[]);
    wait_until("the fetcher to see a mapper that cannot run the job", LONG, || {
        metric(port, "chunkmill_fetcher_mappers_asking{able=\"false\"}") == Some(1.0)
    });
    fetcher.wait_for_log("1 mapper asking, none offers command enrich", LONG);
    assert_eq!(metric(port, "chunkmill_fetcher_leases_granted_total"), Some(0.0));
    lacking.wait_for_log("this run needs command:enrich", LONG);
    let (_able, able_port) =
        p.spawn_with_metrics("able", "mapper", &["--instance".into(), "able".into(), "--command".into(), enrich()]);
    wait_until("the run to complete", LONG, || metric(port, "chunkmill_fetcher_chunks{state=\"done\"}") == Some(20.0));
    assert_eq!(metric(able_port, "chunkmill_mapper_chunks_processed_total"), Some(20.0));
    assert_eq!(metric(lacking_port, "chunkmill_mapper_chunks_processed_total"), Some(0.0));
    let (ok, report) = p.verify();
    assert!(ok, "{report}");
}

#[test]
fn another_transform_is_another_run_and_a_restart_with_another_job_refuses_to_resume() {
    let mut p = Pipeline::new(1_000, 0);
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    let mut first = p.fetcher(&[]);
    finish(&mut first, LONG);
    let first_run = p.run_id();
    // The same input and state at one round more: a new run, in its own directory.
    p.job = vec!["--rounds".into(), "1".into()];
    let mut second = p.fetcher(&[]);
    finish(&mut second, LONG);
    let second_run = p.run_id();
    assert_ne!(first_run, second_run);
    assert!(p.out.join(&first_run).is_dir() && p.out.join(&second_run).is_dir());
    let (ok, report) = p.verify();
    assert!(ok && report.contains("1000 found"), "{report}");
    p.job = vec!["--rounds".into(), "0".into()];
    let (ok, report) = p.verify();
    assert!(ok && report.contains("1000 found"), "the first run verifies under its own job: {report}");

    // A run of another job left unfinished: a fetcher with yet another job refuses to start.
    let input = p.input.display().to_string();
    let state = p.state_dir().display().to_string();
    let start = |rounds: &str, extra: &[&str]| {
        let mut args = vec!["--input", &input, "--state-dir", &state, "--rounds", rounds, "--exit-when-done"];
        args.extend_from_slice(extra);
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        p.spawn_with_metrics(&format!("fetcher-{rounds}"), "fetcher", &args)
    };
    drop(_mapper);
    let (mut unfinished, port) = start("5", &[]);
    wait_ready(port);
    unfinished.kill();
    let (mut refused, _) = start("7", &[]);
    assert_eq!(refused.wait_exit(Duration::from_secs(30)), Some(1), "{}", refused.log());
    let log = refused.log();
    assert!(
        log.contains("holds run") && log.contains("another job (digest (5 rounds)") && log.contains("--new-run"),
        "{log}"
    );
    let (mut allowed, port) = start("7", &["--new-run"]);
    wait_ready(port);
    assert!(allowed.log().contains("starting run"), "{}", allowed.log());
    allowed.kill();
}

#[test]
fn a_users_own_rust_transform_runs_end_to_end_and_its_own_binary_verifies_it() {
    let p = Pipeline::orders(1_500, &["--transform", "shout", "--transform-params", r#"{"mark":"!!"}"#]);
    let _saver = p.saver("saver-1");
    let custom = p.spawn_with_metrics("custom", "custom-mapper", &["--instance".into(), "custom".into()]).0;
    // A stock mapper next to it cannot run `shout` and gets none of it.
    let _stock = p.mapper("stock", &[]);
    let mut fetcher = p.fetcher(&[]);
    finish(&mut fetcher, LONG);
    let values = saved_values(&p);
    assert_eq!(values.len(), 1_500);
    assert_eq!(values[0]["mark"], "!!");
    assert!(values[0]["order_id"].as_str().is_some_and(|id| id == id.to_uppercase() && id.starts_with("O-")));
    assert!(custom.log().contains("shout"), "{}", custom.log());
    // The stock saver cannot recompute `shout` and says where to run verify instead.
    let (ok, report) = p.verify();
    assert!(!ok && report.contains("cannot recompute custom shout"), "{report}");
    let output = Command::new(bin("custom-mapper"))
        .arg("verify")
        .arg("--input")
        .arg(&p.input)
        .arg("--out")
        .arg(&p.out)
        .args(&p.job)
        .output()
        .expect("custom-mapper verify");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && report.contains("1500 found") && report.contains("outputs compared"),
        "{report}"
    );
}

#[test]
fn killing_mappers_mid_run_in_a_jq_job_and_in_a_command_job_loses_and_doubles_nothing() {
    for job in
        [vec!["--transform", "jq", "--filter", BULK_ITEMS], vec!["--transform", "command", "--command", "enrich"]]
    {
        let p = Pipeline::orders(10_000, &job);
        let _saver = p.saver("saver-1");
        let args = ["--command", &enrich(), "--threads", "1"];
        let mut m1 = p.mapper("mapper-1", &args);
        let _m2 = p.mapper("mapper-2", &args);
        let mut fetcher = p.fetcher(&["--lease-timeout", "1s", "--chunk-size", "10"]);
        p.wait_saved(50, LONG);
        m1.kill();
        let killed_at = p.saved_chunks();
        let _m3 = p.mapper("mapper-3", &args);
        finish(&mut fetcher, LONG);
        assert!(killed_at < 1_000, "the kill came after the run ({killed_at} chunks saved)");
        assert_eq!(p.summary_number("fetcher", "/dead"), 0);
        let run = p.run_id_at(10);
        let (ok, report) = p.verify_with_flags(&["--chunk-size", "10"]);
        assert!(
            ok && report.contains("10000 expected, 10000 found, 0 missing, 0 duplicated, 0 wrong"),
            "{run}: {report}"
        );
    }
}
