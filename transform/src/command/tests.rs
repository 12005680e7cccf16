//! The command transform against real children (python3 scripts).

use super::*;
use std::path::PathBuf;

fn script(name: &str) -> String {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "examples", "commands", name].iter().collect();
    path.to_string_lossy().into_owned()
}

fn faulty(args: &[&str]) -> CommandSpec {
    let mut all = vec![script("faulty.py")];
    all.extend(args.iter().map(|a| a.to_string()));
    CommandSpec { name: "faulty".into(), program: "python3".into(), args: all }
}

fn options(workers: usize, timeout: Duration) -> CommandOptions {
    CommandOptions { workers, timeout, ..CommandOptions::default() }
}

fn texts(outcome: &Result<Outputs, ObjectError>) -> Vec<String> {
    outcome.as_ref().unwrap().iter().map(|v| String::from_utf8(v.to_vec()).unwrap()).collect()
}

fn objects(n: usize, special: &[(usize, &str)]) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| match special.iter().find(|(at, _)| *at == i) {
            Some((_, fault)) => format!(r#"{{"i":{i},"fault":"{fault}"}}"#).into_bytes(),
            None => format!(r#"{{"i":{i}, "pad": "{}"}}"#, "x".repeat(i % 50)).into_bytes(),
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn specs_split_like_a_shell() {
    let spec: CommandSpec = r#"resize=python3 "my script.py" --quality 3"#.parse().unwrap();
    assert_eq!(spec.name, "resize");
    assert_eq!(spec.program, "python3");
    assert_eq!(spec.args, vec!["my script.py", "--quality", "3"]);
    let spec: CommandSpec = r#" x =  'a b'"c\"d" e\ f "" '' "\n""#.parse().unwrap();
    assert_eq!(spec.name, "x");
    assert_eq!(spec.program, "a bc\"d");
    assert_eq!(spec.args, vec!["e f", "", "", "\\n"]);
    let spec: CommandSpec = "k=prog a=b".parse().unwrap();
    assert_eq!((spec.program.as_str(), spec.args), ("prog", vec!["a=b".to_string()]));
    for (bad, says) in [
        ("python3 x.py", "NAME=PROGRAM"),
        ("=python3", "no command name"),
        ("my cmd=python3", "white space"),
        ("x=", "no program"),
        ("x=   ", "no program"),
        ("x=''", "no program"),
        ("x=python3 'open", "single quote"),
        ("x=python3 \"open", "double quote"),
        ("x=python3 \\", "backslash"),
    ] {
        let err = bad.parse::<CommandSpec>().unwrap_err();
        assert!(err.contains(says), "{bad}: {err}");
    }
}

#[test]
fn credentials_are_withheld_from_children() {
    for name in ["NATS_URL", "nats_creds", "DB_PASSWORD", "api_token", "MySecret", "GITHUB_TOKEN"] {
        assert!(is_withheld_variable(name), "{name}");
    }
    for name in ["PATH", "HOME", "LANG", "PYTHONPATH", "NATSURL"] {
        assert!(!is_withheld_variable(name), "{name}");
    }
    // Edition 2021: set_var is safe; std serialises it with its own environment reads.
    std::env::set_var("NATS_PASSWORD", "hunter2");
    std::env::set_var("CHUNKMILL_TEST_TOKEN", "t0k3n");
    std::env::set_var("CHUNKMILL_TEST_VISIBLE", "yes");
    let program = "import json, os, sys\nfor line in sys.stdin:\n    print(json.dumps(sorted(os.environ)), flush=True)";
    let spec = CommandSpec { name: "env".into(), program: "python3".into(), args: vec!["-c".into(), program.into()] };
    let command = CommandTransform::start(&spec, &CommandOptions::default()).unwrap();
    let mut out = Outputs::default();
    command.apply(b"{}", &mut out).unwrap();
    let names: Vec<String> = serde_json::from_slice(out.iter().next().unwrap()).unwrap();
    assert!(names.contains(&"CHUNKMILL_TEST_VISIBLE".to_string()) && names.contains(&"PATH".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n == "NATS_PASSWORD" || n == "CHUNKMILL_TEST_TOKEN"), "{names:?}");
}

#[test]
fn five_hundred_objects_through_two_children_come_back_in_order() {
    let command = CommandTransform::start(&faulty(&[]), &options(2, Duration::from_secs(10))).unwrap();
    assert_eq!(command.pids().len(), 2);
    let inputs = objects(500, &[]);
    let refs: Vec<&[u8]> = inputs.iter().map(|i| i.as_slice()).collect();
    for _ in 0..2 {
        let outcomes = command.apply_chunk(&refs);
        assert_eq!(outcomes.len(), 500);
        for (i, outcome) in outcomes.iter().enumerate() {
            let expected = String::from_utf8(common::json::compact(&inputs[i]).into_owned()).unwrap();
            assert_eq!(texts(outcome), vec![expected]);
        }
    }
    // The same children served both chunks.
    assert_eq!(command.pids().len(), 2);
}

#[test]
fn the_example_enriches_orders_and_passes_the_rest() {
    let spec: CommandSpec = format!("enrich=python3 {}", script("enrich.py")).parse().unwrap();
    let command = CommandTransform::start(&spec, &CommandOptions::default()).unwrap();
    let order = br#"{"order_id":"o-1","items":[{"sku":"a","qty":2,"price":1.5},{"sku":"b","qty":1,"price":7}]}"#;
    let outcomes = command.apply_chunk(&[order, br#"{"x": 1}"#]);
    assert_eq!(texts(&outcomes[0]), vec![r#"{"order_id":"o-1","items":2,"total":10.0}"#]);
    assert_eq!(texts(&outcomes[1]), vec![r#"{"x":1,"seen_by":"enrich.py"}"#]);
}

#[test]
fn a_crash_dead_letters_only_its_object_and_the_pool_goes_on() {
    let command = CommandTransform::start(&faulty(&[]), &options(2, Duration::from_secs(10))).unwrap();
    let before = command.pids();
    let inputs = objects(40, &[(7, "crash"), (30, "crash")]);
    let refs: Vec<&[u8]> = inputs.iter().map(|i| i.as_slice()).collect();
    let outcomes = command.apply_chunk(&refs);
    for (i, outcome) in outcomes.iter().enumerate() {
        if i == 7 || i == 30 {
            let err = outcome.as_ref().unwrap_err();
            assert_eq!(err.cause, Cause::Crash);
            assert_eq!(err.message, "command faulty died on this object (exit status 3), twice");
        } else {
            assert_eq!(texts(outcome).len(), 1, "{i}");
        }
    }
    // The crashed children were replaced and reaped (which of the two ran which run is
    // up to rayon: one child may have run both).
    let after = command.pids();
    assert_eq!(after.len(), 2);
    assert_ne!(before, after);
    for pid in before.iter().filter(|pid| !after.contains(pid)) {
        assert!(!alive(*pid), "{pid}");
    }
    let outcomes = command.apply_chunk(&refs[..5]);
    assert!(outcomes.iter().all(Result::is_ok));
}

#[test]
fn a_retry_that_succeeds_keeps_the_object() {
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_string_lossy().into_owned();
    let command =
        CommandTransform::start(&faulty(&["--state", &state_dir]), &options(1, Duration::from_secs(10))).unwrap();
    let inputs = objects(5, &[(2, "crash-once")]);
    let refs: Vec<&[u8]> = inputs.iter().map(|i| i.as_slice()).collect();
    let outcomes = command.apply_chunk(&refs);
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    assert_eq!(texts(&outcomes[2]), vec![r#"{"i":2,"fault":"crash-once"}"#]);
}

#[test]
fn without_retries_one_failure_dead_letters_and_says_why() {
    let program = "import sys\nfor line in sys.stdin:\n    if 'boom' in line:\n        print('Traceback: it went boom', file=sys.stderr, flush=True)\n        sys.exit(1)\n    print(line.strip(), flush=True)";
    let spec = CommandSpec { name: "boom".into(), program: "python3".into(), args: vec!["-c".into(), program.into()] };
    let options =
        CommandOptions { workers: 1, timeout: Duration::from_secs(10), retries: 0, ..CommandOptions::default() };
    let command = CommandTransform::start(&spec, &options).unwrap();
    let outcomes = command.apply_chunk(&[b"{}", br#"{"boom":1}"#, b"{}"]);
    let err = outcomes[1].as_ref().unwrap_err();
    assert_eq!(
        err.message,
        "command boom died on this object (exit status 1); its last stderr line: `Traceback: it went boom`"
    );
    assert!(outcomes[0].is_ok() && outcomes[2].is_ok());
}

#[test]
fn a_hang_is_a_timeout_for_that_object_only() {
    let started = Instant::now();
    let command = CommandTransform::start(&faulty(&[]), &options(2, Duration::from_secs(1))).unwrap();
    let inputs = objects(20, &[(3, "hang")]);
    let refs: Vec<&[u8]> = inputs.iter().map(|i| i.as_slice()).collect();
    let outcomes = command.apply_chunk(&refs);
    let err = outcomes[3].as_ref().unwrap_err();
    assert_eq!(err.cause, Cause::Timeout);
    assert_eq!(err.message, "command faulty took longer than 1s on this object, twice");
    assert!(outcomes.iter().enumerate().all(|(i, o)| i == 3 || o.is_ok()));
    assert!(started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());
}

#[test]
fn garbage_is_the_objects_transform_error() {
    let command = CommandTransform::start(&faulty(&[]), &options(1, Duration::from_secs(10))).unwrap();
    let inputs = objects(6, &[(4, "garbage")]);
    let refs: Vec<&[u8]> = inputs.iter().map(|i| i.as_slice()).collect();
    let outcomes = command.apply_chunk(&refs);
    let err = outcomes[4].as_ref().unwrap_err();
    assert_eq!(err.cause, Cause::Transform);
    assert!(
        err.message.contains("not JSON") && err.message.contains("`not json`") && err.message.ends_with(", twice"),
        "{err}"
    );
    assert!(outcomes.iter().enumerate().all(|(i, o)| i == 4 || o.is_ok()));
    let mut out = Outputs::default();
    assert!(command.apply(br#"{"fault":"stderr"}"#, &mut out).is_ok());
    assert_eq!(out.len(), 1);
}

#[test]
fn a_program_that_cannot_run_is_refused_at_start() {
    let spec: CommandSpec = "resize=chunkmill-no-such-program --x".parse().unwrap();
    let err = CommandTransform::start(&spec, &CommandOptions::default()).unwrap_err();
    assert!(err.contains("resize") && err.contains("`chunkmill-no-such-program` not found"), "{err}");
    let spec: CommandSpec = r#"resize=sh -c 'echo "resize.py: No such file" >&2; exit 2'"#.parse().unwrap();
    let err = CommandTransform::start(&spec, &CommandOptions::default()).unwrap_err();
    assert!(err.contains("exited as soon as it started (exit status 2)"), "{err}");
    assert!(err.contains("its last stderr line: `resize.py: No such file`"), "{err}");
    let not_executable = tempfile::NamedTempFile::new().unwrap();
    let program = not_executable.path().to_string_lossy().into_owned();
    let spec = CommandSpec { name: "x".into(), program, args: vec![] };
    let err = CommandTransform::start(&spec, &CommandOptions::default()).unwrap_err();
    assert!(err.contains("is not executable"), "{err}");
}

#[test]
fn dropping_the_transform_leaves_no_child_running() {
    let command = CommandTransform::start(&faulty(&[]), &options(3, Duration::from_secs(10))).unwrap();
    let pids = command.pids();
    assert_eq!(pids.len(), 3);
    assert!(pids.iter().all(|pid| alive(*pid)));
    drop(command);
    for pid in pids {
        assert!(!alive(pid), "{pid} is still there");
    }
}

/// Whether `pid` is gone (or a zombie, which holds nothing), waiting up to 5 s for it to go:
/// a killed grandchild is reaped by whoever adopted it, a moment later.
fn gone(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        let zombie_or_gone = match &state {
            None => true,
            Some(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
        };
        if zombie_or_gone || Instant::now() > deadline {
            return zombie_or_gone;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Each object's output is its own input (faulty.py echoes): no answer belongs to another.
fn assert_each_object_has_its_own_output(
    inputs: &[Vec<u8>],
    outcomes: &[Result<Outputs, ObjectError>],
    guilty: &[usize],
) {
    assert_eq!(outcomes.len(), inputs.len());
    for (i, outcome) in outcomes.iter().enumerate() {
        if guilty.contains(&i) {
            assert!(outcome.is_err(), "object {i} broke the contract but kept an output: {outcome:?}");
            continue;
        }
        let expected = String::from_utf8(common::json::compact(&inputs[i]).into_owned()).unwrap();
        assert_eq!(texts(outcome), vec![expected], "object {i} has another object's output");
    }
}

#[test]
fn a_child_that_writes_two_lines_for_one_object_has_no_shifted_answer_kept() {
    let command = CommandTransform::start(&faulty(&[]), &options(1, Duration::from_secs(10))).unwrap();
    let inputs = objects(30, &[(13, "extra")]);
    let refs: Vec<&[u8]> = inputs.iter().map(|i| i.as_slice()).collect();
    let outcomes = command.apply_chunk(&refs);
    assert_each_object_has_its_own_output(&inputs, &outcomes, &[13]);
    let err = outcomes[13].as_ref().unwrap_err();
    assert_eq!(err.cause, Cause::Transform);
    assert_eq!(
        err.message,
        "command faulty wrote more than one line for this object (the contract is exactly one line per object), twice"
    );
    // The pool is in step again: the next chunk is answered as it should be.
    let clean = objects(10, &[]);
    let refs: Vec<&[u8]> = clean.iter().map(|i| i.as_slice()).collect();
    assert_each_object_has_its_own_output(&clean, &command.apply_chunk(&refs), &[]);
}

#[test]
fn a_child_that_writes_no_line_for_one_object_has_no_shifted_answer_kept() {
    // Long enough for a fresh python child to start on a loaded machine: only the silent
    // object may time out.
    let command = CommandTransform::start(&faulty(&[]), &options(2, Duration::from_secs(3))).unwrap();
    let inputs = objects(24, &[(5, "silent"), (20, "extra")]);
    let refs: Vec<&[u8]> = inputs.iter().map(|i| i.as_slice()).collect();
    let outcomes = command.apply_chunk(&refs);
    assert_each_object_has_its_own_output(&inputs, &outcomes, &[5, 20]);
    assert_eq!(outcomes[5].as_ref().unwrap_err().cause, Cause::Timeout);
}

#[test]
fn a_child_that_closes_its_stdout_is_said_to_have_closed_it_not_to_have_been_killed() {
    let command = CommandTransform::start(&faulty(&[]), &options(1, Duration::from_secs(10))).unwrap();
    let inputs = objects(3, &[(1, "close")]);
    let refs: Vec<&[u8]> = inputs.iter().map(|i| i.as_slice()).collect();
    let outcomes = command.apply_chunk(&refs);
    let err = outcomes[1].as_ref().unwrap_err();
    assert_eq!(err.cause, Cause::Crash);
    assert_eq!(
        err.message,
        "command faulty closed its stdout without answering this object (it was still running, and was stopped), twice"
    );
    assert!(outcomes[0].is_ok() && outcomes[2].is_ok());
}

#[test]
fn a_wrapper_scripts_children_are_stopped_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    // A shell that starts a helper in the background and then the real program, without exec:
    // killing only the shell's pid would leave both behind.
    let wrapper = format!(
        "sleep 3600 & echo $! >> {pids}; python3 {faulty} --pid-file {pids}; true",
        pids = pids.display(),
        faulty = script("faulty.py")
    );
    let spec = CommandSpec { name: "wrapped".into(), program: "sh".into(), args: vec!["-c".into(), wrapper] };
    let command = CommandTransform::start(&spec, &options(1, Duration::from_secs(10))).unwrap();
    let inputs = objects(4, &[(2, "crash")]);
    let refs: Vec<&[u8]> = inputs.iter().map(|i| i.as_slice()).collect();
    let outcomes = command.apply_chunk(&refs);
    assert!(outcomes[2].is_err() && outcomes[3].is_ok());
    drop(command);
    let started: Vec<u32> =
        std::fs::read_to_string(&pids).unwrap().lines().map(|pid| pid.trim().parse().unwrap()).collect();
    // The first shell's helpers, those of every restarted one, and the last one's.
    assert!(started.len() >= 4, "{started:?}");
    for pid in started {
        assert!(gone(pid), "process {pid}, started by a wrapper script, outlived it");
    }
}

#[test]
fn a_command_whose_fresh_children_all_fail_is_broken_and_dead_letters_nothing_it_keeps() {
    // It survives the start probe, then exits without answering: every fresh child fails.
    let spec = CommandSpec {
        name: "quits".into(),
        program: "sh".into(),
        args: vec!["-c".into(), "sleep 0.15; exit 0".into()],
    };
    let options = CommandOptions { breaker: 4, ..options(1, Duration::from_secs(10)) };
    let command = CommandTransform::start(&spec, &options).unwrap();
    assert_eq!(command.broken(), None);
    let inputs = objects(30, &[]);
    let refs: Vec<&[u8]> = inputs.iter().map(|i| i.as_slice()).collect();
    let outcomes = command.apply_chunk(&refs);
    let why = command.broken().expect("four fresh children in a row failed");
    assert!(why.contains("command quits is broken on this mapper: 4 fresh children in a row"), "{why}");
    assert!(why.contains("exit status 0"), "{why}");
    // Every object still has an outcome, and the mapper gives the chunk back instead.
    assert_eq!(outcomes.len(), 30);
}

#[test]
fn poison_objects_among_answered_ones_do_not_trip_the_breaker() {
    let options = CommandOptions { breaker: 3, ..options(1, Duration::from_secs(10)) };
    let command = CommandTransform::start(&faulty(&[]), &options).unwrap();
    let inputs = objects(20, &[(3, "crash"), (9, "crash"), (15, "crash")]);
    let refs: Vec<&[u8]> = inputs.iter().map(|i| i.as_slice()).collect();
    let outcomes = command.apply_chunk(&refs);
    assert_eq!(command.broken(), None);
    assert_each_object_has_its_own_output(&inputs, &outcomes, &[3, 9, 15]);
}
