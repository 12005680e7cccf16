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

fn faulty_command(extra: &str) -> String {
    format!("faulty=python3 {} {extra}", repo("examples/commands/faulty.py"))
}

/// Issue 36, item 1: a child that writes two lines for one object, or none, is out of step; no
/// answer that is not provably its object's own is saved, and only the guilty objects are
/// dead-lettered.
#[test]
fn a_command_child_out_of_step_never_has_another_objects_answer_saved() {
    let p = Pipeline::orders(300, &["--transform", "command", "--command", "faulty"]);
    let mut objects = lines(&p);
    objects[13]["fault"] = "extra".into();
    objects[140]["fault"] = "silent".into();
    write_lines(&p, &objects);
    let _saver = p.saver("saver-1");
    // Long enough for a fresh python child to start on a loaded machine: only the silent
    // object may time out.
    let _mapper = p.mapper("mapper-1", &["--command", &faulty_command(""), "--command-timeout", "3s"]);
    let mut fetcher = p.fetcher(&[]);
    assert_eq!(fetcher.wait_exit(LONG), Some(3), "complete with dead letters:\n{}", fetcher.log());
    let dead: BTreeMap<u64, String> = dead_entries(&p)
        .iter()
        .map(|d| (d["line"].as_u64().expect("line"), d["cause"].as_str().expect("cause").to_string()))
        .collect();
    let expected: BTreeMap<u64, String> = [(14, "transform".to_string()), (141, "timeout".to_string())].into();
    assert_eq!(dead, expected, "exactly the two objects that broke the contract");
    // faulty.py echoes each object: every saved value is its own object, in order.
    let echoed: Vec<&serde_json::Value> =
        objects.iter().enumerate().filter(|(i, _)| ![13, 140].contains(i)).map(|(_, o)| o).collect();
    let saved = saved_values(&p);
    assert_eq!(saved.len(), echoed.len());
    for (i, (saved, own)) in saved.iter().zip(&echoed).enumerate() {
        assert_eq!(saved, *own, "saved value {i} is another object's answer");
    }
    let (ok, report) = p.verify();
    assert!(ok && report.contains("298 found") && report.contains("2 dead-lettered"), "{report}");
}

/// Issue 36, item 9: a child that floods stderr costs the mapper's log a few lines, and the
/// child is not slowed into a timeout by a log that cannot keep up.
#[test]
fn a_command_child_flooding_stderr_is_logged_a_hundred_lines_at_a_time_and_loses_no_object() {
    let p = Pipeline::orders(200, &["--transform", "command", "--command", "faulty"]);
    let mut objects = lines(&p);
    for i in [3, 60, 61, 62, 150] {
        objects[i]["fault"] = "flood".into();
    }
    write_lines(&p, &objects);
    let _saver = p.saver("saver-1");
    let mapper = p.mapper("mapper-1", &["--command", &faulty_command(""), "--threads", "1"]);
    let mut fetcher = p.fetcher(&[]);
    finish(&mut fetcher, LONG);
    let log = mapper.log();
    let flood_lines = log.lines().filter(|l| l.contains("a flood of stderr")).count();
    assert!(flood_lines <= 1_000, "{flood_lines} stderr lines of one child logged (100 000 were written)");
    assert!(log.contains("more than 100 stderr lines in 10 s: the rest are counted, not logged"), "{log}");
    let (ok, report) = p.verify();
    assert!(ok && report.contains("200 found") && report.contains("0 dead-lettered"), "{report}");
}

/// Issue 36, item 6: a wrapper script's children and grandchildren go when its child is
/// restarted and when the mapper stops.
#[test]
fn a_command_childs_whole_process_group_is_stopped_on_restart_and_when_the_mapper_stops() {
    let p = Pipeline::orders(50, &["--transform", "command", "--command", "wrapped"]);
    let mut objects = lines(&p);
    objects[20]["fault"] = "crash".into();
    write_lines(&p, &objects);
    let pids = p.logs().join("command-pids");
    let wrapper = format!(
        "wrapped=sh -c 'sleep 3600 & echo $! >> {pids}; python3 {faulty} --pid-file {pids}; true'",
        pids = pids.display(),
        faulty = repo("examples/commands/faulty.py")
    );
    let _saver = p.saver("saver-1");
    let mut mapper = p.mapper("mapper-1", &["--command", &wrapper, "--threads", "1"]);
    let mut fetcher = p.fetcher(&[]);
    assert_eq!(fetcher.wait_exit(LONG), Some(3), "{}", fetcher.log());
    mapper.signal("TERM");
    assert_eq!(mapper.wait_exit(Duration::from_secs(30)), Some(0), "{}", mapper.log());
    let started: Vec<u32> = std::fs::read_to_string(&pids)
        .expect("the wrapper wrote its pids")
        .lines()
        .map(|pid| pid.trim().parse().expect("a pid"))
        .collect();
    assert!(started.len() >= 4, "a first child and a restarted one, each with its helper: {started:?}");
    for pid in started {
        wait_until(&format!("process {pid}, started by a wrapper script, to be gone"), Duration::from_secs(10), || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
        });
    }
}

/// Issue 36, item 17: a command whose every fresh child fails at once (here: exits 0 right
/// after the start probe) is broken on its mapper; its chunks go back as `cannot_run` and no
/// object becomes a dead letter; a mapper with a working program then completes the run.
#[test]
fn a_broken_command_hands_its_chunks_back_instead_of_dead_lettering_the_data_set() {
    let p = Pipeline::orders(300, &["--transform", "command", "--command", "faulty"]);
    let _saver = p.saver("saver-1");
    let quits = "faulty=sh -c 'sleep 0.15; exit 0'";
    let broken = p.mapper("broken", &["--command", quits, "--command-breaker", "4"]);
    let (mut fetcher, port) = p.fetcher_named("fetcher", &["--exit-when-done"]);
    broken.wait_for_log("command faulty is broken on this mapper: 4 fresh children in a row", LONG);
    wait_until("the fetcher to see the broken mapper as unable", LONG, || {
        metric(port, "chunkmill_fetcher_mappers_asking{able=\"false\"}") == Some(1.0)
    });
    assert_eq!(
        metric(port, "chunkmill_fetcher_chunks{state=\"done\"}"),
        Some(0.0),
        "nothing saved, not even dead letters"
    );
    let _fixed = p.mapper("fixed", &["--command", &faulty_command("")]);
    assert_eq!(fetcher.wait_exit(LONG), Some(0), "complete, nothing dead-lettered:\n{}", fetcher.log());
    assert!(dead_entries(&p).is_empty());
    let (ok, report) = p.verify();
    assert!(ok && report.contains("300 found") && report.contains("0 dead-lettered"), "{report}");
}

/// A nats-server whose max_payload is 64 KiB, with its config file (kept while it runs).
fn small_payload_server() -> (common::harness::NatsServer, tempfile::NamedTempFile) {
    let conf = tempfile::NamedTempFile::new().expect("conf file");
    std::fs::write(conf.path(), "max_payload: 65536\n").expect("write conf");
    (common::harness::NatsServer::start_with(&["-c", conf.path().to_str().expect("path")]), conf)
}

/// `objects` records `{"id":"o-I","n":N}`, `n(i)` each, for the jq job `range(.n)` with ids.
fn range_job(n: impl Fn(usize) -> u64, objects: usize) -> (Pipeline, tempfile::NamedTempFile) {
    let mut p = Pipeline::orders(1, &["--transform", "jq", "--filter", "range(.n)", "--id-field", ".id"]);
    let records: Vec<serde_json::Value> =
        (0..objects).map(|i| serde_json::json!({"id": format!("o-{i}"), "n": n(i)})).collect();
    write_lines(&p, &records);
    let (nats, conf) = small_payload_server();
    p.nats = nats;
    (p, conf)
}

/// Issue 36, item 10: one object with 20 000 outputs (110 KB) in a chunk of ten, over a 64 KiB
/// max_payload. Its nine neighbours used to be dead-lettered with it, unnamed.
#[test]
fn an_object_whose_outputs_cannot_fit_one_message_is_dead_lettered_alone_by_name_and_its_chunk_saved() {
    let (p, _conf) = range_job(|i| if i == 13 { 20_000 } else { 3 }, 30);
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&["--chunk-size", "10"]);
    assert_eq!(fetcher.wait_exit(LONG), Some(3), "complete, one object dead-lettered:\n{}", fetcher.log());
    assert_eq!(p.summary_number("fetcher", "/dead"), 0, "no chunk is dead-lettered");
    let reader = saver::sink::file::layout::RunReader::open(&p.out.join(p.run_id_at(10))).expect("run directory");
    let copies: Vec<_> = reader.chunks().into_iter().flat_map(|c| reader.chunk(c).expect("readable")).collect();
    assert_eq!(copies.iter().map(|c| c.values.len()).sum::<usize>(), 29 * 3);
    let dead: Vec<_> = copies.iter().flat_map(|c| c.dead.clone()).collect();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!((dead[0].index, dead[0].id.as_deref()), (3, Some("o-13")));
    assert_eq!(dead[0].cause, common::protocol::Cause::TooLarge);
    assert!(dead[0].error.contains("its 20000 outputs are") && dead[0].error.contains("65536 bytes"), "{dead:?}");
    let (ok, report) = p.verify_with_flags(&["--chunk-size", "10"]);
    assert!(
        ok && report.contains("30 expected, 29 found, 0 missing") && report.contains("1 dead-lettered"),
        "{report}"
    );
    assert!(report.contains("too_large"), "{report}");
}

/// Issue 36, item 10, the other half: ten objects of 14 KB each fit one message alone but not
/// together. The chunk is released with advice that names its largest objects and a chunk size
/// that fits, not a bare "lower --chunk-size".
#[test]
fn a_chunk_too_large_though_each_object_fits_is_released_naming_its_largest_objects_and_a_chunk_size() {
    let (p, _conf) = range_job(|i| 3_000 + i as u64, 20);
    let _saver = p.saver("saver-1");
    let _mapper = p.mapper("mapper-1", &[]);
    let mut fetcher = p.fetcher(&["--chunk-size", "10", "--max-attempts", "2"]);
    assert_eq!(fetcher.wait_exit(LONG), Some(3), "complete, chunks dead-lettered:\n{}", fetcher.log());
    let dead_letters = std::fs::read_to_string(p.state_dir().join(format!("{}.dead-letter.jsonl", p.run_id_at(10))))
        .expect("the fetcher's dead letters");
    assert_eq!(dead_letters.lines().count(), 2, "{dead_letters}");
    for (chunk, largest) in [(0, "object 9 (line 10, id o-9): "), (1, "object 9 (line 20, id o-19): ")] {
        let line = dead_letters.lines().find(|l| l.contains(&format!("\"chunk\":{chunk},"))).expect("its line");
        assert!(line.contains("the largest: ") && line.contains(largest), "{line}");
        assert!(line.contains("--chunk-size of at most 4 "), "{line}");
    }
    let (ok, report) = p.verify_with_flags(&["--chunk-size", "10"]);
    assert!(ok && report.contains("20 dead-lettered"), "{report}");
}
