//! A pipeline of real processes for end-to-end tests: nats-server, fetcher, mappers and saver,
//! each killable and restartable, with the data set and the sink in a temporary directory.

#![allow(dead_code)]

pub mod http;
pub mod jwt;
pub mod netns;
pub mod postgres;
pub mod s3;

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
    /// The job's flags, given to the fetcher and to `saver verify` (default: `--rounds N`).
    pub job: Vec<String>,
    /// Whether the services log in as their role's NATS user ([`Pipeline::with_role_users`]).
    pub role_users: bool,
    /// Where each service's `<binary>.creds` is when they log in with NATS JWTs
    /// ([`Pipeline::with_role_creds`]).
    pub creds_dir: Option<PathBuf>,
    /// Extra environment of the fetcher and `saver verify` (an input store's settings).
    pub input_env: Vec<(&'static str, String)>,
}

/// The test password of a role's NATS user.
pub fn role_password(role: &str) -> String {
    format!("test-{role}-pw")
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
        Pipeline {
            nats: NatsServer::start(),
            input,
            out,
            job: vec!["--rounds".into(), rounds.to_string()],
            dir,
            role_users: false,
            creds_dir: None,
            input_env: Vec::new(),
        }
    }

    /// Generates `objects` shop orders (seed 1) for a job given by `job` flags, and starts
    /// nats-server.
    pub fn orders(objects: u64, job: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let input = dir.path().join("orders.jsonl");
        let status = Command::new(bin("fetcher"))
            .args(["generate", "--kind", "orders", "--objects", &objects.to_string(), "--output"])
            .arg(&input)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run fetcher generate");
        assert!(status.success(), "fetcher generate failed");
        let out = dir.path().join("out");
        Pipeline {
            nats: NatsServer::start(),
            input,
            out,
            job: job.iter().map(|s| s.to_string()).collect(),
            dir,
            role_users: false,
            creds_dir: None,
            input_env: Vec::new(),
        }
    }

    /// The job these flags make.
    pub fn job(&self) -> transform::Job {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            job: transform::JobArgs,
        }
        let args = std::iter::once("job".to_string()).chain(self.job.iter().cloned());
        Flags::try_parse_from(args).expect("job flags").job.job().expect("a job")
    }

    /// The fetcher's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn logs(&self) -> &Path {
        self.dir.path()
    }

    /// Swaps the nats-server for one run with deploy/nats/chunkmill-auth.conf (the per-role
    /// users and permissions of the Helm values); every service then logs in as its role.
    pub fn with_role_users(mut self) -> Self {
        let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nats/chunkmill-auth.conf");
        let passwords: Vec<(String, String)> = ["fetcher", "mapper", "saver", "broadcaster", "box"]
            .iter()
            .map(|role| (format!("CHUNKMILL_{}_PASSWORD", role.to_uppercase()), role_password(role)))
            .collect();
        let env: Vec<(&str, &str)> = passwords.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.nats = NatsServer::start_with_env(&["--config", conf.to_str().expect("path")], &env);
        self.role_users = true;
        self
    }

    /// Swaps the nats-server for one in operator mode (decentralised JWT auth, an operator and
    /// accounts made by the test, tests/support/jwt.rs); every service then logs in with only
    /// `NATS_CREDS_FILE`: a user JWT of its role with the permissions of
    /// deploy/nats/chunkmill-auth.conf.
    pub fn with_role_creds(mut self) -> Self {
        let operator = jwt::Operator::new();
        let conf = self.dir.path().join("nats-operator.conf");
        std::fs::write(&conf, operator.server_config()).expect("nats-server config");
        let creds_dir = self.dir.path().join("creds");
        std::fs::create_dir_all(&creds_dir).expect("creds dir");
        for (role, permissions) in jwt::role_permissions() {
            let creds = operator.user_creds(&role, Some(permissions));
            std::fs::write(creds_dir.join(format!("{role}.creds")), creds).expect("creds file");
        }
        self.nats = NatsServer::start_with(&["--config", conf.to_str().expect("path")]);
        self.creds_dir = Some(creds_dir);
        self
    }

    fn env(&self, binary: &str) -> Vec<(&'static str, String)> {
        let mut env = vec![("NATS_URL", self.nats.url())];
        if binary == "fetcher" {
            env.extend(self.input_env.iter().cloned());
        }
        if self.role_users {
            // As Kubernetes mounts the role's Secret (NATS_USER_DIR).
            let dir = self.dir.path().join(format!("nats-user-{binary}"));
            std::fs::create_dir_all(&dir).expect("user dir");
            std::fs::write(dir.join("user"), format!("{binary}\n")).expect("user file");
            std::fs::write(dir.join("password"), role_password(binary)).expect("password file");
            env.push(("NATS_USER_DIR", dir.display().to_string()));
        }
        if let Some(dir) = &self.creds_dir {
            env.push(("NATS_CREDS_FILE", dir.join(format!("{binary}.creds")).display().to_string()));
        }
        env
    }

    fn spawn(&self, name: &str, binary: &str, args: &[String]) -> Service {
        self.spawn_with_metrics(name, binary, args).0
    }

    /// Starts a service with its metrics endpoint on a free port; returns it and the port.
    pub fn spawn_with_metrics(&self, name: &str, binary: &str, args: &[String]) -> (Service, u16) {
        self.spawn_with_env(name, binary, args, &[])
    }

    /// Starts a service as a user would, without METRICS_ADDR: on its default metrics port.
    pub fn spawn_on_default_metrics(&self, name: &str, binary: &str, args: &[&str]) -> Service {
        let env = self.env(binary);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Service::spawn(name, binary, args, &env, self.logs())
    }

    /// Starts a service with extra environment variables and its metrics on a free port.
    pub fn spawn_with_env(
        &self,
        name: &str,
        binary: &str,
        args: &[String],
        extra: &[(&'static str, &str)],
    ) -> (Service, u16) {
        let port = free_port();
        let mut env = self.env(binary);
        env.push(("METRICS_ADDR", format!("127.0.0.1:{port}")));
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        (Service::spawn(name, binary, &args, &env, self.logs()), port)
    }

    /// A fetcher over the input with `--exit-when-done` and extra flags.
    pub fn fetcher(&self, extra: &[&str]) -> Service {
        let mut args = vec!["--exit-when-done"];
        args.extend_from_slice(extra);
        self.fetcher_named("fetcher", &args).0
    }

    /// A fetcher (Deployment mode unless `extra` says `--exit-when-done`) with its metrics port.
    pub fn fetcher_named(&self, name: &str, extra: &[&str]) -> (Service, u16) {
        let mut args = vec![
            "--input".to_string(),
            self.input.display().to_string(),
            "--state-dir".into(),
            self.state_dir().display().to_string(),
            "--summary-json".into(),
            self.summary_path(name).display().to_string(),
        ];
        args.extend(self.job.iter().cloned());
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn_with_metrics(name, "fetcher", &args)
    }

    /// A mapper named `name` (it learns the job from the fetcher).
    pub fn mapper(&self, name: &str, extra: &[&str]) -> Service {
        let mut args = vec!["--instance".to_string(), name.into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn(name, "mapper", &args)
    }

    /// A saver writing to the pipeline's sink.
    pub fn saver(&self, name: &str) -> Service {
        self.saver_with_metrics(name).0
    }

    /// A saver with its metrics port.
    pub fn saver_with_metrics(&self, name: &str) -> (Service, u16) {
        let args = vec!["--out".to_string(), self.out.display().to_string(), "--instance".into(), name.into()];
        self.spawn_with_metrics(name, "saver", &args)
    }

    /// The run id of the pipeline's input and job at chunk size 100.
    pub fn run_id(&self) -> String {
        self.run_id_at(100)
    }

    /// The run id of the pipeline's input and job at `chunk_size`.
    /// Scanned as the fetcher scans it (the job's check and the duplicate-id check decide which
    /// records are skipped, which is part of the run id).
    pub fn run_id_at(&self, chunk_size: u32) -> String {
        let job = self.job();
        let fingerprint = job.fingerprint();
        // Only the digest checks records (a jq transform would start sandboxes, which this test
        // binary cannot be).
        let transform = matches!(job.transform, transform::TransformSpec::Digest { .. })
            .then(|| transform::Registry::builtin().build(&job.transform).ok())
            .flatten();
        let check = |record: &[u8]| transform.as_ref().map_or(Ok(()), |t| t.check(record));
        let id = |record: &[u8]| job.id_field.as_ref().and_then(|f| f.key(record));
        let options = common::input::ScanOptions {
            check: Some(&check),
            id: Some(&id).filter(|_| job.id_field.is_some()).map(|f| f as _),
            job: &fingerprint,
            ..Default::default()
        };
        common::input::scan(&self.input, chunk_size, &options).expect("scan input").run_id
    }

    /// Runs `saver verify` on the file sink; returns (success, its report line).
    pub fn verify(&self) -> (bool, String) {
        self.verify_with(&["--out".to_string(), self.out.display().to_string()], &[])
    }

    /// Runs `saver verify` on the file sink with extra flags (e.g. `--chunk-size 10`).
    pub fn verify_with_flags(&self, flags: &[&str]) -> (bool, String) {
        let mut args = vec!["--out".to_string(), self.out.display().to_string()];
        args.extend(flags.iter().map(|f| f.to_string()));
        self.verify_with(&args, &[])
    }

    /// Runs `saver verify` on the file sink at `out` (another than the pipeline's).
    pub fn verify_out(&self, out: &Path) -> (bool, String) {
        self.verify_with(&["--out".to_string(), out.display().to_string()], &[])
    }

    /// Runs `saver verify` on database `db`; returns (success, its report line).
    pub fn verify_postgres(&self, db: &postgres::PgServer) -> (bool, String) {
        let password = db.password_file().display().to_string();
        self.verify_with(&["--sink".to_string(), db.url()], &[("SAVER_PG_PASSWORD_FILE", &password)])
    }

    /// Runs `saver verify` on database `db` through the connection string `url`.
    pub fn verify_postgres_url(&self, db: &postgres::PgServer, url: &str) -> (bool, String) {
        let password = db.password_file().display().to_string();
        self.verify_with(&["--sink".to_string(), url.to_string()], &[("SAVER_PG_PASSWORD_FILE", &password)])
    }

    /// Runs `saver verify` on database `db` with extra flags (e.g. `--chunk-size 10`).
    pub fn verify_postgres_with_flags(&self, db: &postgres::PgServer, flags: &[&str]) -> (bool, String) {
        let password = db.password_file().display().to_string();
        let mut args = vec!["--sink".to_string(), db.url()];
        args.extend(flags.iter().map(|f| f.to_string()));
        self.verify_with(&args, &[("SAVER_PG_PASSWORD_FILE", &password)])
    }

    /// Runs `saver verify` with `sink` flags and extra environment; returns (success, its report).
    pub fn verify_with(&self, sink: &[String], env: &[(&str, &str)]) -> (bool, String) {
        let output = Command::new(bin("saver"))
            .args(["verify", "--input"])
            .arg(&self.input)
            .args(&self.job)
            .args(sink)
            .envs(self.input_env.iter().map(|(k, v)| (*k, v.as_str())))
            .envs(env.iter().copied())
            .output()
            .expect("run saver verify");
        let text = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
        (output.status.success(), text)
    }

    /// Runs `fetcher status --json` as the fetcher's NATS user (as `kubectl exec deploy/fetcher
    /// -- fetcher status` does); returns the running fetcher's answer.
    pub fn status(&self) -> fetcher::status::Status {
        let stdout = self.fetcher_status(&["--json"]);
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("fetcher status --json: {e}: {stdout}"))
    }

    /// `fetcher status` for a person (its table), as the fetcher's NATS user.
    pub fn status_text(&self) -> String {
        self.fetcher_status(&[])
    }

    fn fetcher_status(&self, flags: &[&str]) -> String {
        let output = Command::new(bin("fetcher"))
            .arg("status")
            .args(flags)
            .envs(self.env("fetcher").iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .expect("run fetcher status");
        assert!(output.status.success(), "fetcher status failed: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).to_string()
    }

    /// A saver writing to PostgreSQL `db`, its password from a file (as from a Secret); with its
    /// metrics port.
    pub fn saver_postgres(&self, name: &str, db: &postgres::PgServer) -> (Service, u16) {
        self.saver_postgres_url(name, db, &db.url())
    }

    /// A saver writing to `db` through the connection string `url` (TLS parameters), with the
    /// database's password file.
    pub fn saver_postgres_url(&self, name: &str, db: &postgres::PgServer, url: &str) -> (Service, u16) {
        let args = vec!["--sink".to_string(), url.to_string(), "--instance".into(), name.into()];
        let password = db.password_file().display().to_string();
        self.spawn_with_env(name, "saver", &args, &[("SAVER_PG_PASSWORD_FILE", &password)])
    }

    /// Chunks in the sink so far (committed in any run's index).
    pub fn saved_chunks(&self) -> usize {
        let Ok(runs) = std::fs::read_dir(&self.out) else { return 0 };
        runs.flatten()
            .filter(|run| run.path().is_dir())
            .filter_map(|run| saver::sink::file::layout::RunReader::open(&run.path()).ok())
            .map(|reader| reader.chunks().len())
            .sum()
    }

    /// Every saved copy of `chunk` of this pipeline's run, read through the sink's index.
    pub fn saved_chunk(&self, chunk: u32) -> Vec<saver::sink::file::layout::SavedChunk> {
        let reader = saver::sink::file::layout::RunReader::open(&self.out.join(self.run_id())).expect("run directory");
        reader.chunk(common::protocol::ChunkId(chunk)).expect("readable")
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

/// Reads `series` from the service's /metrics on `port` (None while it does not answer).
pub fn metric(port: u16, series: &str) -> Option<f64> {
    match common::harness::http_get(port, "/metrics") {
        Ok((200, text)) => common::harness::metric_value(&text, series),
        _ => None,
    }
}

/// Waits until `condition` holds, polling every 20 ms, up to `timeout`; panics with `what`.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the service on `port` answers /readyz with 200 (subscribed and able to work).
pub fn wait_ready(port: u16) {
    wait_until("the service to be ready", Duration::from_secs(60), || {
        matches!(common::harness::http_get(port, "/readyz"), Ok((200, _)))
    });
}

/// Waits for the fetcher to finish the run; panics with its log if it does not exit 0.
pub fn finish(fetcher: &mut Service, timeout: Duration) {
    let code = fetcher.wait_exit(timeout);
    assert_eq!(code, Some(0), "the fetcher did not finish the run:\n{}", fetcher.log());
}

impl Pipeline {
    /// Where the fetcher named `name` writes its `--summary-json`.
    pub fn summary_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("summary-{name}.json"))
    }

    /// A number from the `--summary-json` of the fetcher named `name` (stopped), by JSON pointer,
    /// e.g. `p.summary_number("fetcher", "/stats/re_leases")`.
    pub fn summary_number(&self, name: &str, pointer: &str) -> u64 {
        let path = self.summary_path(name);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("no run summary at {} (has fetcher {name} stopped?): {e}", path.display()));
        let summary: serde_json::Value = serde_json::from_str(&text).expect("the summary is JSON");
        summary.pointer(pointer).and_then(serde_json::Value::as_u64).unwrap_or_else(|| panic!("no {pointer} in {text}"))
    }
}

/// A tmpfs of `size_kib` mounted at a new directory, unmounted on drop: a disk that really fills
/// up (ENOSPC), for the disk-full tests. Needs root (CAP_SYS_ADMIN), as CI has.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: PathBuf, size_kib: u32) -> Self {
        std::fs::create_dir_all(&path).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_kib}k,mode=0755"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "cannot mount a tmpfs at {}: this test fills a real disk and needs root (CAP_SYS_ADMIN)",
            path.display()
        );
        Tmpfs { path }
    }

    /// Writes a file until the disk is full; returns its path (remove it to free the space).
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).expect("filler file");
        let block = vec![0u8; 4096];
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc_enospc()) => break,
                Err(e) => panic!("filling {}: {e}", self.path.display()),
            }
        }
        filler
    }
}

fn libc_enospc() -> i32 {
    28 // ENOSPC on Linux
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A work request as a mapper named `mapper` that runs the built-in transforms sends it, for
/// tests that play a mapper.
pub fn work_request(mapper: &str, max: u32) -> bytes::Bytes {
    common::protocol::encode(&common::protocol::WorkRequest {
        v: common::protocol::VERSION,
        mapper: mapper.to_string(),
        wait_ms: 5000,
        max,
        can: vec!["digest".into(), "jq".into()],
    })
}
