//! The jq transform through its sandboxes (this test binary serves as the sandbox): what a
//! runaway program does to its object, and to nothing else.

use std::time::{Duration, Instant};

use super::*;

crate::jq_sandbox_entry!();

/// Objects with `f` set to a fault: a program that never ends, recurses without end, allocates
/// without bound, or builds a value too deep to serialise or drop; the others give `{id, z}`.
const RUNAWAY: &str = r#"
    if .f == "spin" then last(range(1e15))
    elif .f == "recurse" then (def f: [f]; f)
    elif .f == "alloc" then [range(1e9)] | length
    elif .f == "deep" then reduce range(1000000) as $i (0; [.]) | tojson
    else {id, z} end"#;

/// A short timeout for the test of timeouts; a long one for the others, which must fail on
/// their own limit first however busy the machine is.
fn options(timeout: Duration) -> JqOptions {
    JqOptions { timeout, memory: Memory(256 << 20), ..jq_test_options() }
}

const LONG: Duration = Duration::from_secs(60);

/// Ten objects, the one at `at` with fault `fault`, through `filter` on two threads.
fn run_with_fault(timeout: Duration, fault: &str, at: usize) -> Vec<Result<Vec<String>, ObjectError>> {
    let inputs: Vec<String> = (0..10)
        .map(|i| if i == at { format!(r#"{{"id":{i},"f":"{fault}"}}"#) } else { format!(r#"{{"id":{i},"z":-0}}"#) })
        .collect();
    let inputs: Vec<&[u8]> = inputs.iter().map(|s| s.as_bytes()).collect();
    let jq = JqTransform::start(RUNAWAY, &options(timeout)).unwrap();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let outcomes = pool.install(|| jq.apply_chunk(&inputs));
    assert_eq!(outcomes.len(), 10);
    outcomes
        .into_iter()
        .map(|o| o.map(|out| out.iter().map(|v| String::from_utf8(v.to_vec()).unwrap()).collect()))
        .collect()
}

/// Every object but the one at `at` kept its output (`-0` as read); that one's error.
fn only_the_faulty_one_failed(outcomes: Vec<Result<Vec<String>, ObjectError>>, at: usize) -> ObjectError {
    let mut failed = None;
    for (i, outcome) in outcomes.into_iter().enumerate() {
        match outcome {
            Err(e) if i == at => failed = Some(e),
            Ok(values) if i != at => assert_eq!(values, vec![format!(r#"{{"id":{i},"z":-0}}"#)], "object {i}"),
            other => panic!("object {i}: {other:?}"),
        }
    }
    failed.expect("the faulty object failed")
}

#[test]
fn a_program_that_never_ends_dead_letters_its_object_as_a_timeout_naming_the_limit() {
    let started = Instant::now();
    let err = only_the_faulty_one_failed(run_with_fault(Duration::from_secs(1), "spin", 3), 3);
    assert_eq!(err.cause, Cause::Timeout, "{err}");
    assert_eq!(err.message, "jq took longer than 1s on this object (time limit, `mapper --jq-timeout`), twice");
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
}

#[test]
fn a_recursion_without_end_dead_letters_its_object_as_a_stack_overflow() {
    let err = only_the_faulty_one_failed(run_with_fault(LONG, "recurse", 0), 0);
    assert_eq!(err.cause, Cause::Crash, "{err}");
    assert!(err.message.starts_with("jq recursion too deep (stack overflow)"), "{err}");
    assert!(err.message.ends_with(", twice"), "{err}");
}

#[test]
fn a_value_too_deep_to_serialise_dead_letters_its_object_as_a_stack_overflow() {
    let err = only_the_faulty_one_failed(run_with_fault(LONG, "deep", 9), 9);
    assert_eq!(err.cause, Cause::Crash, "{err}");
    assert!(err.message.starts_with("jq recursion too deep (stack overflow)"), "{err}");
}

#[test]
fn an_allocation_without_bound_dead_letters_its_object_naming_the_memory_limit() {
    let err = only_the_faulty_one_failed(run_with_fault(LONG, "alloc", 6), 6);
    assert_eq!(err.cause, Cause::Crash, "{err}");
    assert_eq!(err.message, "jq used more than 256 MiB on this object (memory limit, `mapper --jq-memory`), twice");
}

#[test]
fn a_chunk_gives_its_results_in_order_with_runtime_errors_in_place() {
    let jq = JqTransform::start(".id | if . == 3 then error(\"three\") else {id: ., sq: (. * .)} end", &options(LONG))
        .unwrap();
    let inputs: Vec<String> = (0..6).map(|i| format!(r#"{{"id":{i}}}"#)).collect();
    let inputs: Vec<&[u8]> = inputs.iter().map(|s| s.as_bytes()).collect();
    let outcomes = jq.apply_chunk(&inputs);
    assert_eq!(outcomes.len(), 6);
    for (i, outcome) in outcomes.iter().enumerate() {
        if i == 3 {
            assert_eq!(outcome.as_ref().unwrap_err(), &ObjectError::refused("three"));
        } else {
            let values: Vec<&[u8]> = outcome.as_ref().unwrap().iter().collect();
            assert_eq!(values, vec![format!(r#"{{"id":{i},"sq":{}}}"#, i * i).as_bytes()]);
        }
    }
    let mut out = Outputs::default();
    jq.apply(br#"{"id":-0}"#, &mut out).unwrap();
    assert_eq!(out.iter().collect::<Vec<_>>(), vec![&br#"{"id":-0,"sq":0.0}"#[..]]);
}

#[test]
fn a_sandbox_killed_from_outside_while_idle_is_replaced_and_no_object_is_blamed() {
    let jq = JqTransform::start(".a", &options(LONG)).unwrap();
    let pids = jq.pids();
    assert_eq!(pids.len(), 1, "the first sandbox waits idle");
    let killed = std::process::Command::new("kill").args(["-9", &pids[0].to_string()]).status().unwrap();
    assert!(killed.success());
    let outcomes = jq.apply_chunk(&[br#"{"a":1}"#, br#"{"a":2}"#]);
    let values: Vec<Vec<&[u8]>> = outcomes.iter().map(|o| o.as_ref().unwrap().iter().collect()).collect();
    assert_eq!(values, vec![vec![&b"1"[..]], vec![&b"2"[..]]]);
    assert!(!jq.pids().contains(&pids[0]));
}

#[test]
fn a_program_that_does_not_compile_is_invalid_and_a_binary_without_the_entry_point_cannot_start() {
    let err = JqTransform::start(".a | ", &options(LONG)).unwrap_err();
    assert!(matches!(&err, BuildError::Invalid(why) if why.contains("line 1, column 6")), "{err}");
    assert!(matches!(check(".a | "), Err(BuildError::Invalid(_))));
    assert!(check(".a | .b").is_ok());
    // The test harness refuses the sandbox's argument: this binary cannot be a sandbox that way.
    let plain = JqOptions { sandbox: SandboxCommand::default(), ..options(LONG) };
    let err = JqTransform::start(".a", &plain).unwrap_err();
    assert!(matches!(&err, BuildError::Start(why) if why.contains("enter_if_child")), "{err}");
}

#[test]
fn memory_sizes_read_as_people_write_them() {
    assert_eq!(parse_memory("1GiB"), Ok(Memory(1 << 30)));
    assert_eq!(parse_memory("512MiB"), Ok(Memory(512 << 20)));
    assert_eq!(parse_memory(" 2g "), Ok(Memory(2 << 30)));
    assert_eq!(parse_memory("768"), Ok(Memory(768 << 20)));
    assert_eq!(parse_memory("65536KiB"), Ok(Memory(64 << 20)));
    for bad in ["", "GiB", "1 TiB", "1.5GiB", "1KiB", "-1"] {
        let err = parse_memory(bad).unwrap_err().to_string();
        assert!(err.contains("is not a memory size"), "{bad}: {err}");
    }
    assert_eq!(Memory(1 << 30).to_string(), "1 GiB");
    assert_eq!(Memory(1536 << 20).to_string(), "1536 MiB");
    assert_eq!(Memory(1000).to_string(), "1000 bytes");
}
