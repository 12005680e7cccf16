//! The chaos test: a full run of the real binaries while a seeded random schedule SIGKILLs and
//! restarts mappers, the saver and the fetcher, SIGSTOPs a mapper past its lease, and restarts
//! nats-server. At the end `saver verify` must report 0 missing, 0 duplicated, 0 wrong.
//!
//! `CHAOS_SEED=N` replays one schedule; `CHAOS_RUNS=K` runs K seeds (default 2); each run prints
//! its seed, the faults injected by kind and the longest recovery seen after each kind (time
//! from the fault until the sink grows again). docs/RELIABILITY.md records a many-seed session.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chunkmill::fetcher::generate::SplitMix64;
use common::harness::Service;
use support::Pipeline;

const KINDS: [&str; 5] = ["kill-mapper", "kill-saver", "kill-fetcher", "stop-mapper", "restart-nats"];
const LEASE: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Report {
    faults: BTreeMap<&'static str, u32>,
    longest_recovery: BTreeMap<&'static str, Duration>,
}

fn run_once(seed: u64) -> Report {
    println!("chaos: seed {seed} (replay with CHAOS_SEED={seed})");
    let mut rng = SplitMix64(seed);
    let mut p = Pipeline::new(20_000, 2000);
    let lease = format!("{}ms", LEASE.as_millis());
    let mut saver = p.saver("saver-0");
    let mut mappers: Vec<Service> = (0..3).map(|i| p.mapper(&format!("mapper-{i}-0"), &[])).collect();
    let mut fetcher = p.fetcher_named("fetcher-0", &["--exit-when-done", "--lease-timeout", &lease]).0;
    let mut report = Report::default();
    let mut generation = 0;
    p.wait_saved(5, Duration::from_secs(120));
    for _ in 0..8 {
        if fetcher.wait_exit(Duration::from_millis(200 + rng.below(600))).is_some() {
            break; // the run finished
        }
        generation += 1;
        let kind = KINDS[rng.below(KINDS.len() as u64) as usize];
        let before = p.saved_chunks();
        let at = Instant::now();
        match kind {
            "kill-mapper" => {
                let i = rng.below(mappers.len() as u64) as usize;
                mappers[i].kill();
                mappers[i] = p.mapper(&format!("mapper-{i}-{generation}"), &[]);
            }
            "kill-saver" => {
                saver.kill();
                saver = p.saver(&format!("saver-{generation}"));
            }
            "kill-fetcher" => {
                fetcher.kill();
                if fetcher.wait_exit(Duration::ZERO).is_some() {
                    break; // it had finished the run just before
                }
                fetcher = p
                    .fetcher_named(&format!("fetcher-{generation}"), &["--exit-when-done", "--lease-timeout", &lease])
                    .0;
            }
            "stop-mapper" => {
                let i = rng.below(mappers.len() as u64) as usize;
                mappers[i].signal("STOP");
                std::thread::sleep(LEASE * 5 / 2); // past its lease: the fault itself
                mappers[i].signal("CONT");
            }
            _ => {
                p.nats.stop();
                std::thread::sleep(Duration::from_millis(rng.below(1000))); // the outage itself
                p.nats.restart();
            }
        }
        *report.faults.entry(kind).or_default() += 1;
        // Recovery: the sink grows again (or the run is over).
        let deadline = Instant::now() + Duration::from_secs(120);
        while p.saved_chunks() <= before && p.saved_chunks() < 200 {
            assert!(Instant::now() < deadline, "seed {seed}: no progress within 120 s after {kind}");
            std::thread::sleep(Duration::from_millis(10));
        }
        let took = at.elapsed();
        let longest = report.longest_recovery.entry(kind).or_default();
        *longest = (*longest).max(took);
    }
    let code = fetcher.wait_exit(Duration::from_secs(300));
    assert_eq!(code, Some(0), "seed {seed}: the run did not finish:\n{}", fetcher.log());
    let (ok, verify) = p.verify();
    println!("chaos: seed {seed}: {verify}");
    assert!(ok, "seed {seed}: {verify}");
    assert!(verify.contains("20000 found, 0 missing, 0 duplicated, 0 wrong"), "seed {seed}: {verify}");
    let faults: Vec<String> = report.faults.iter().map(|(k, n)| format!("{k}={n}")).collect();
    let recovery: Vec<String> =
        report.longest_recovery.iter().map(|(k, d)| format!("{k}={:.2}s", d.as_secs_f64())).collect();
    println!("chaos: seed {seed}: faults {} | longest recovery {}", faults.join(" "), recovery.join(" "));
    report
}

#[test]
fn a_run_under_random_crashes_and_restarts_saves_everything_exactly_once() {
    let seeds: Vec<u64> = match std::env::var("CHAOS_SEED") {
        Ok(seed) => vec![seed.parse().expect("CHAOS_SEED is a number")],
        Err(_) => {
            let runs: u64 = std::env::var("CHAOS_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(2);
            let base =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(1);
            (0..runs).map(|i| base.wrapping_mul(31).wrapping_add(i)).collect()
        }
    };
    let mut total = Report::default();
    for seed in seeds {
        let report = run_once(seed);
        for (kind, n) in report.faults {
            *total.faults.entry(kind).or_default() += n;
        }
        for (kind, d) in report.longest_recovery {
            let longest = total.longest_recovery.entry(kind).or_default();
            *longest = (*longest).max(d);
        }
    }
    let faults: Vec<String> = total.faults.iter().map(|(k, n)| format!("{k}={n}")).collect();
    let recovery: Vec<String> =
        total.longest_recovery.iter().map(|(k, d)| format!("{k}={:.2}s", d.as_secs_f64())).collect();
    println!(
        "chaos total: faults {} | longest recovery {} | lost 0, duplicated 0",
        faults.join(" "),
        recovery.join(" ")
    );
}
