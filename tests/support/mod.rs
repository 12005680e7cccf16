//! A pipeline of real processes for end-to-end tests: nats-server, fetcher, mappers and saver,
//! each killable and restartable, with the data set and the sink in a temporary directory.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::harness::{bin, free_port, NatsServer, Service};

/// A test's pipeline.
pub struct Pipeline {
    pub dir: tempfile::TempDir,
    pub nats: NatsServer,
    pub input: PathBuf,
    pub out: PathBuf,
    pub rounds: u32,
}

impl Pipeline {
    /// Generates `objects` users (seed 1) and starts nats-server.
    pub fn new(objects: u64, rounds: u32) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let input = dir.path().join("users.jsonl");
        let status = Command::new(bin("fetcher"))
            .args(["generate", "--objects", &objects.to_string(), "--output"])
            .arg(&input)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run fetcher generate");
        assert!(status.success(), "fetcher generate failed");
        let out = dir.path().join("out");
        Pipeline { nats: NatsServer::start(), input, out, rounds, dir }
    }

    pub fn logs(&self) -> &Path {
        self.dir.path()
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![("NATS_URL", self.nats.url())]
    }

    fn spawn(&self, name: &str, binary: &str, args: &[String]) -> Service {
        self.spawn_with_metrics(name, binary, args).0
    }

    /// Starts a service with its metrics endpoint on a free port; returns it and the port.
    pub fn spawn_with_metrics(&self, name: &str, binary: &str, args: &[String]) -> (Service, u16) {
        let port = free_port();
        let mut env = self.env();
        env.push(("METRICS_ADDR", format!("127.0.0.1:{port}")));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        (Service::spawn(name, binary, &args, &env, self.logs()), port)
    }

    /// A fetcher over the input with `--exit-when-done` and extra flags.
    pub fn fetcher(&self, extra: &[&str]) -> Service {
        let mut args = vec!["--input".to_string(), self.input.display().to_string(), "--exit-when-done".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn("fetcher", "fetcher", &args)
    }

    /// A mapper named `name` at the pipeline's rounds, with extra flags.
    pub fn mapper(&self, name: &str, extra: &[&str]) -> Service {
        let mut args = vec!["--rounds".to_string(), self.rounds.to_string(), "--instance".into(), name.into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn(name, "mapper", &args)
    }

    /// A saver writing to the pipeline's sink.
    pub fn saver(&self, name: &str) -> Service {
        let args = vec!["--out".to_string(), self.out.display().to_string(), "--instance".into(), name.into()];
        self.spawn(name, "saver", &args)
    }

    /// Runs `saver verify`; returns (success, its report line).
    pub fn verify(&self) -> (bool, String) {
        let output = Command::new(bin("saver"))
            .args(["verify", "--rounds", &self.rounds.to_string(), "--input"])
            .arg(&self.input)
            .arg("--out")
            .arg(&self.out)
            .output()
            .expect("run saver verify");
        let text = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
        (output.status.success(), text)
    }

    /// Chunk files in the sink so far.
    pub fn saved_chunks(&self) -> usize {
        let Ok(runs) = std::fs::read_dir(&self.out) else { return 0 };
        runs.flatten()
            .filter_map(|run| std::fs::read_dir(run.path()).ok())
            .flat_map(|files| files.flatten())
            .filter(|f| {
                let name = f.file_name().to_string_lossy().into_owned();
                name.starts_with("chunk-") && !name.ends_with(".dead.jsonl")
            })
            .count()
    }

    /// Waits until at least `n` chunks are in the sink.
    pub fn wait_saved(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.saved_chunks() < n {
            assert!(
                Instant::now() < deadline,
                "fewer than {n} chunks saved within {timeout:?} (have {})",
                self.saved_chunks()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Waits for the fetcher to finish the run; panics with its log if it does not exit 0.
pub fn finish(fetcher: &mut Service, timeout: Duration) {
    let code = fetcher.wait_exit(timeout);
    assert_eq!(code, Some(0), "the fetcher did not finish the run:\n{}", fetcher.log());
}

/// A number from the fetcher's summary line, e.g. `summary_number(log, "re-leases")`.
pub fn summary_number(log: &str, label: &str) -> u64 {
    let line = log.lines().rev().find(|l| l.contains("chunks done")).expect("a summary line in the fetcher log");
    let before = line.split(&format!(" {label}")).next().expect("label in summary");
    before
        .rsplit(' ')
        .next()
        .and_then(|n| n.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
        .unwrap_or_else(|| panic!("no number before `{label}` in: {line}"))
}
