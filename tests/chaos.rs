//! The chaos tests: full runs of the real binaries while a seeded random schedule SIGKILLs and
//! restarts mappers, the saver and the fetcher, SIGSTOPs a mapper past its lease, restarts
//! nats-server, and fills the fetcher's state disk and the file sink's disk (real size-limited
//! tmpfs mounts: ENOSPC); with the PostgreSQL sink, it also stops and restarts the database. A
//! third test runs a command job over an input in an S3 store into the object-store sink (another
//! bucket of the same store): the store goes away (its connections cut: the input's, the
//! output's or both) mid-run, a mapper living in a network namespace of its own is partitioned
//! from NATS (its veth down: packets dropped) for longer than a lease, and command children are
//! crashed (SIGKILL), hung (SIGSTOP, past `--command-timeout`) and made to flood their stderr.
//! Every run injects at least [`MIN_FAULTS`] faults (the work is heavy enough to leave room for
//! them). At the end `saver verify` must report 0 missing, 0 duplicated, 0 wrong (the command
//! job's outputs recomputed).
//!
//! `CHAOS_SEED=N` replays one schedule (in each test); `CHAOS_RUNS=K` runs K seeds of the
//! file-sink test (default 2), `CHAOS_PG_RUNS=K` K seeds of the PostgreSQL one (default 1),
//! `CHAOS_MIXED_RUNS=K` K seeds of the command-job one (default 1). Each run prints its seed, the
//! faults injected by kind and the longest recovery seen after each kind: the time from the fault
//! until the sink grows again (after a full disk, until the space is back and the sink grows
//! again). docs/RELIABILITY.md records a many-seed session.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chunkmill::fetcher::generate::SplitMix64;
use common::harness::{Service, TcpProxy};
use support::netns::Netns;
use support::postgres::PgServer;
use support::s3::S3Server;
use support::{metric, Pipeline, Tmpfs};

const LEASE: Duration = Duration::from_secs(1);
/// Every run injects at least this many faults; the work is heavy enough to leave room for them.
const MIN_FAULTS: u32 = 10;
/// The digest's rounds in the file and PostgreSQL runs: about 20 s of work on 2 cores.
const ROUNDS: u32 = 25_000;
/// The command job's rounds of SHA-256 per object (in python): about as heavy.
const COMMAND_ROUNDS: u32 = 1_000;
const COMMAND_TIMEOUT: &str = "2s";
/// The command job's input: this many objects of 100 users each under an S3 prefix, so that the
/// fetcher reads the store all through the run (a chunk never spans two objects).
const STORE_OBJECTS: u64 = OBJECTS / 100;
const OBJECTS: u64 = 20_000;
/// Small chunks, so that the fetcher's ledger (`d 1234` per chunk) spans several 4 KiB pages: a
/// full disk fails an append only when it needs a new page (200 chunks fit in one).
const CHUNK_SIZE: u32 = 10;
const CHUNKS: u64 = OBJECTS / CHUNK_SIZE as u64;
/// The allocation unit of tmpfs (and of the file systems a state directory lives on).
const PAGE: u64 = 4096;
/// How close to the end of its last page the ledger must be when the state disk is filled: the
/// next 20 to 30 chunks recorded need a new page.
const NEAR_PAGE_END: u64 = 128;
const ROOM: Duration = Duration::from_secs(120);

const FILE_KINDS: [&str; 7] =
    ["kill-mapper", "kill-saver", "kill-fetcher", "stop-mapper", "restart-nats", "fill-state", "fill-sink"];
const PG_KINDS: [&str; 7] =
    ["kill-mapper", "kill-saver", "kill-fetcher", "stop-mapper", "restart-nats", "fill-state", "restart-postgres"];
const MIXED_KINDS: [&str; 10] = [
    "kill-mapper",
    "kill-saver",
    "kill-fetcher",
    "stop-mapper",
    "restart-nats",
    "partition-mapper",
    "store-outage",
    "child-crash",
    "child-hang",
    "child-flood",
];

/// Which chaos test.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The digest job into the file sink.
    File,
    /// The digest job into PostgreSQL.
    Postgres,
    /// A command job over an S3 input into the object-store sink, one mapper in a namespace of
    /// its own.
    Mixed,
}

impl Mode {
    fn kinds(self) -> &'static [&'static str] {
        match self {
            Mode::File => &FILE_KINDS,
            Mode::Postgres => &PG_KINDS,
            Mode::Mixed => &MIXED_KINDS,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::File => "file",
            Mode::Postgres => "PostgreSQL",
            Mode::Mixed => "command job, S3 input and sink",
        }
    }
}

/// The command job's surroundings: the input store behind a proxy that can be cut, and the
/// namespace of mapper 0 with its way to NATS.
struct Mixed {
    store_proxy: TcpProxy,
    nats_proxy: TcpProxy,
    netns: Netns,
    s3: S3Server,
}

fn chaos_command() -> String {
    let script = format!("{}/tests/support/chaos_command.py", env!("CARGO_MANIFEST_DIR"));
    format!("chaos=python3 {script} {COMMAND_ROUNDS}")
}

#[derive(Default)]
struct Report {
    faults: BTreeMap<&'static str, u32>,
    longest_recovery: BTreeMap<&'static str, Duration>,
}

impl Report {
    fn add(&mut self, other: Report) {
        for (kind, n) in other.faults {
            *self.faults.entry(kind).or_default() += n;
        }
        for (kind, d) in other.longest_recovery {
            let longest = self.longest_recovery.entry(kind).or_default();
            *longest = (*longest).max(d);
        }
    }

    fn line(&self) -> String {
        let faults: Vec<String> = self.faults.iter().map(|(k, n)| format!("{k}={n}")).collect();
        let recovery: Vec<String> =
            self.longest_recovery.iter().map(|(k, d)| format!("{k}={:.2}s", d.as_secs_f64())).collect();
        format!("faults {} | longest recovery {}", faults.join(" "), recovery.join(" "))
    }
}

enum Sink {
    /// `--out` on its own tmpfs.
    File(Tmpfs),
    Postgres(PgServer),
    /// `--sink s3://chaos-out/results/` in the command job's store, reached through a proxy the
    /// test cuts.
    Object(ObjectSink),
}

struct ObjectSink {
    url: String,
    /// The store's settings, its endpoint the proxy.
    env: Vec<(&'static str, String)>,
    proxy: TcpProxy,
}

impl ObjectSink {
    /// The output bucket in `s3`, reached through a proxy of its own.
    fn new(s3: &S3Server) -> Self {
        s3.create_bucket("chaos-out");
        let proxy = TcpProxy::start(s3.port());
        let env = s3.env_at(&format!("http://127.0.0.1:{}", proxy.port()));
        ObjectSink { url: "s3://chaos-out/results/".into(), env, proxy }
    }

    fn env(&self) -> Vec<(&'static str, &str)> {
        self.env.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }
}

/// What a fault left to wait for.
struct Injected {
    /// When the fault began.
    at: Instant,
    /// The sink's size the recovery must exceed.
    before: u64,
    /// Whether the recovery also needs the fetcher's ledger store working again.
    store: bool,
    /// The name the report gives it, when more precise than its kind (which connections a
    /// store outage cut).
    label: Option<&'static str>,
}

/// One run under chaos. Fields drop in order: services first, then the tmpfs mounts and the
/// database, then the pipeline's directory and nats-server.
struct Chaos {
    seed: u64,
    rng: SplitMix64,
    generation: u32,
    lease: String,
    fetcher: Service,
    fetcher_port: u16,
    saver: Service,
    saver_port: u16,
    /// PostgreSQL: chunks the current saver has reported saved (its counter's highest reading).
    saver_seen: std::cell::Cell<u64>,
    /// PostgreSQL: chunks saved by the savers killed so far (as far as their counters said).
    saved_by_killed: u64,
    mappers: Vec<Service>,
    mode: Mode,
    mixed: Option<Mixed>,
    state: Tmpfs,
    sink: Sink,
    ledger: PathBuf,
    p: Pipeline,
}

fn spawn_saver(p: &Pipeline, sink: &Sink, name: &str) -> (Service, u16) {
    match sink {
        Sink::File(_) => p.saver_with_metrics(name),
        Sink::Postgres(db) => p.saver_postgres(name, db),
        Sink::Object(object) => {
            // Small parts, so that the commit writes several.
            let args: Vec<String> =
                ["--sink", &object.url, "--instance", name, "--part-size", "256KiB"].map(String::from).to_vec();
            p.spawn_with_env(name, "saver", &args, &object.env())
        }
    }
}

fn spawn_fetcher(p: &Pipeline, lease: &str, name: &str) -> (Service, u16) {
    let chunk_size = CHUNK_SIZE.to_string();
    p.fetcher_named(name, &["--exit-when-done", "--lease-timeout", lease, "--chunk-size", &chunk_size])
}

/// Mapper `i` of generation `generation`: in the command job, with the command registered and
/// one child (one thread) each, and mapper 0 inside the test's network namespace, reaching NATS
/// through the proxy on the host's end of its veth pair.
fn spawn_mapper(p: &Pipeline, mixed: Option<&Mixed>, i: usize, generation: u32) -> Service {
    let name = format!("mapper-{i}-{generation}");
    let Some(mixed) = mixed else { return p.mapper(&name, &[]) };
    let command = chaos_command();
    let args = ["--command", command.as_str(), "--command-timeout", COMMAND_TIMEOUT, "--threads", "1"];
    if i != 0 {
        return p.mapper(&name, &args);
    }
    let prefix = mixed.netns.prefix();
    let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
    let mut all = vec!["--instance", name.as_str()];
    all.extend_from_slice(&args);
    let url = mixed.nats_proxy.url();
    let env = [("NATS_URL", url.as_str()), ("METRICS_ADDR", "127.0.0.1:0")];
    Service::spawn_prefixed(&name, &prefix, "mapper", &all, &env, p.logs())
}

/// The command children of the mapper with `pid` (its child processes).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|children| children.split_whitespace().filter_map(|c| c.parse().ok()).collect::<Vec<u32>>())
        .collect()
}

fn signal_pid(pid: u32, signal: &str) -> bool {
    std::process::Command::new("kill").args(["-s", signal, &pid.to_string()]).status().is_ok_and(|s| s.success())
}

fn pause(d: Duration) {
    std::thread::sleep(d);
}

/// Puts the pipeline's users into a new S3 server as [`STORE_OBJECTS`] objects under a prefix,
/// and points the pipeline's input (the fetcher's and verify's) at it through a proxy.
fn store_input(p: &mut Pipeline) -> (S3Server, TcpProxy) {
    let s3 = S3Server::start();
    s3.create_bucket("chaos");
    let text = std::fs::read_to_string(&p.input).expect("the generated users");
    let lines: Vec<&str> = text.lines().collect();
    let per_object = lines.len().div_ceil(STORE_OBJECTS as usize);
    for (i, part) in lines.chunks(per_object).enumerate() {
        s3.put("chaos", &format!("users/part-{i:04}.jsonl"), (part.join("\n") + "\n").as_bytes());
    }
    let proxy = TcpProxy::start(s3.port());
    p.input = PathBuf::from("s3://chaos/users/");
    p.input_env = s3.env_at(&format!("http://127.0.0.1:{}", proxy.port()));
    (s3, proxy)
}

impl Chaos {
    fn start(seed: u64, mode: Mode) -> Self {
        let rounds = if mode == Mode::Mixed { 0 } else { ROUNDS };
        let mut p = Pipeline::new(OBJECTS, rounds);
        // The ledger of 2 000 chunks is about 13 kB: 256 KiB leaves room for the lock and the
        // run's record, and fills at once.
        let state = Tmpfs::mount(p.state_dir(), 256);
        let mixed = (mode == Mode::Mixed).then(|| {
            let (s3, store_proxy) = store_input(&mut p);
            p.job = vec!["--transform".into(), "command".into(), "--command".into(), "chaos".into()];
            let netns = Netns::create();
            let nats_proxy = TcpProxy::start_on(netns.host_addr(), p.nats.port());
            Mixed { store_proxy, nats_proxy, netns, s3 }
        });
        let sink = match &mixed {
            Some(mixed) => Sink::Object(ObjectSink::new(&mixed.s3)),
            None if mode == Mode::Postgres => Sink::Postgres(PgServer::start()),
            // 2 000 chunk files of one page each (8 MiB), with room to spare.
            None => Sink::File(Tmpfs::mount(p.out.clone(), 32 << 10)),
        };
        // The ledger (for fill-state, not a fault of the command job's run, whose run id comes
        // from the store's listing).
        let ledger = if mode == Mode::Mixed {
            PathBuf::new()
        } else {
            p.state_dir().join(format!("{}.ledger", p.run_id_at(CHUNK_SIZE)))
        };
        let lease = format!("{}ms", LEASE.as_millis());
        let (saver, saver_port) = spawn_saver(&p, &sink, "saver-0");
        let mappers: Vec<Service> = (0..3).map(|i| spawn_mapper(&p, mixed.as_ref(), i, 0)).collect();
        let (fetcher, fetcher_port) = spawn_fetcher(&p, &lease, "fetcher-0");
        Chaos {
            seed,
            rng: SplitMix64(seed),
            generation: 0,
            fetcher,
            fetcher_port,
            lease,
            saver,
            saver_port,
            saver_seen: Default::default(),
            saved_by_killed: 0,
            mappers,
            mode,
            mixed,
            state,
            sink,
            ledger,
            p,
        }
    }

    /// The sink's size in chunks: the chunk files, or (PostgreSQL, object store) what the savers'
    /// counters say.
    fn saved(&self) -> u64 {
        match &self.sink {
            Sink::File(_) => self.p.saved_chunks() as u64,
            Sink::Postgres(_) | Sink::Object(_) => {
                let now = metric(self.saver_port, "chunkmill_saver_chunks_saved_total").unwrap_or(0.0) as u64;
                self.saver_seen.set(self.saver_seen.get().max(now));
                self.saved_by_killed + self.saver_seen.get()
            }
        }
    }

    /// Whether the fetcher has exited (the run is over, or it failed: the end of the test says).
    fn finished(&mut self) -> bool {
        self.fetcher.wait_exit(Duration::ZERO).is_some()
    }

    fn fetcher_metric(&self, series: &str) -> Option<f64> {
        metric(self.fetcher_port, series)
    }

    fn ledger_len(&self) -> u64 {
        std::fs::metadata(&self.ledger).map(|m| m.len()).unwrap_or(0)
    }

    /// Room left in the last page of the ledger.
    fn ledger_slack(&self) -> u64 {
        let len = self.ledger_len();
        len.div_ceil(PAGE) * PAGE - len
    }

    fn below(&mut self, n: u64) -> u64 {
        self.rng.below(n)
    }

    /// Injects a fault of `kind`; None if the run turned out to be over.
    fn inject(&mut self, kind: &str) -> Option<Injected> {
        let seed = self.seed;
        let at = Instant::now();
        let mut before = self.saved();
        match kind {
            "kill-mapper" => {
                let i = self.below(self.mappers.len() as u64) as usize;
                self.mappers[i].kill();
                self.mappers[i] = spawn_mapper(&self.p, self.mixed.as_ref(), i, self.generation);
            }
            "kill-saver" => {
                self.saved();
                self.saver.kill();
                self.saved_by_killed += self.saver_seen.replace(0);
                (self.saver, self.saver_port) = spawn_saver(&self.p, &self.sink, &format!("saver-{}", self.generation));
                // PostgreSQL, object store: the new saver's counter starts from 0.
                before = before.min(self.saved());
            }
            "kill-fetcher" => {
                self.fetcher.kill();
                if self.finished() {
                    return None; // it had finished the run just before
                }
                (self.fetcher, self.fetcher_port) =
                    spawn_fetcher(&self.p, &self.lease, &format!("fetcher-{}", self.generation));
            }
            "stop-mapper" => {
                let i = self.below(self.mappers.len() as u64) as usize;
                self.mappers[i].signal("STOP");
                pause(LEASE * 5 / 2); // past its lease: the fault itself
                self.mappers[i].signal("CONT");
            }
            "restart-nats" => {
                self.p.nats.stop();
                pause(Duration::from_millis(self.below(1000))); // the outage itself
                self.p.nats.restart();
            }
            "fill-state" => {
                // A full disk fails an append only when the ledger needs a new page: fill it when
                // the next few chunks recorded need one, so the fault fails ledger writes at once.
                let errors = "chunkmill_fetcher_store_write_errors_total";
                let filler = loop {
                    if self.finished() {
                        return None;
                    }
                    assert!(at.elapsed() < ROOM, "seed {seed}: the ledger stopped at {} bytes", self.ledger_len());
                    if self.ledger_len() > 0 && self.ledger_slack() <= NEAR_PAGE_END {
                        let done = self.fetcher_metric("chunkmill_fetcher_chunks{state=\"done\"}");
                        if CHUNKS as f64 - done.unwrap_or(CHUNKS as f64) >= 40.0 {
                            let filler = self.state.fill();
                            if self.ledger_slack() <= NEAR_PAGE_END {
                                break filler;
                            }
                            // The ledger took a new page just before the disk filled: next page.
                            std::fs::remove_file(filler).expect("free the state disk");
                        }
                    }
                    pause(Duration::from_millis(2));
                };
                let errors_before = self.fetcher_metric(errors).unwrap_or(0.0);
                let at = Instant::now();
                // Injected: a ledger write fails (ENOSPC), the fetcher answers no ack. At least
                // 40 chunks are not done, whose entries cannot fit: the run cannot complete first.
                while self.fetcher_metric(errors).unwrap_or(0.0) <= errors_before {
                    assert!(
                        !self.finished(),
                        "seed {seed}: the run completed on a full state disk; its ledger is {} bytes:\n{}",
                        self.ledger_len(),
                        self.fetcher.log()
                    );
                    assert!(at.elapsed() < ROOM, "seed {seed}: no ledger write failed on a full state disk");
                    pause(Duration::from_millis(5));
                }
                pause(Duration::from_millis(100 + self.below(800))); // the disk stays full
                std::fs::remove_file(filler).expect("free the state disk");
                return Some(Injected { at, before: self.saved(), store: true, label: None });
            }
            "fill-sink" => {
                let Sink::File(out) = &self.sink else { unreachable!("fill-sink is a file sink fault") };
                let failures = "chunkmill_saver_write_failures_total";
                let failures_before = metric(self.saver_port, failures).unwrap_or(0.0);
                let filler = out.fill();
                let at = Instant::now();
                // Injected: a save fails (ENOSPC), so the saver acknowledges nothing.
                while metric(self.saver_port, failures).unwrap_or(0.0) <= failures_before {
                    if self.saved() >= CHUNKS {
                        // Every chunk was saved before the disk filled.
                        std::fs::remove_file(filler).expect("free the sink disk");
                        return None;
                    }
                    assert!(at.elapsed() < ROOM, "seed {seed}: no save failed on a full sink disk");
                    pause(Duration::from_millis(5));
                }
                pause(Duration::from_millis(100 + self.below(800))); // the disk stays full
                std::fs::remove_file(filler).expect("free the sink disk");
                return Some(Injected { at, before: self.saved(), store: false, label: None });
            }
            "restart-postgres" => {
                let crash = self.below(2) == 0;
                let outage = Duration::from_millis(self.below(1000));
                let Sink::Postgres(db) = &mut self.sink else { unreachable!("restart-postgres needs PostgreSQL") };
                if crash {
                    db.crash(); // immediate shutdown: recovery from the WAL at the next start
                } else {
                    db.stop(); // fast shutdown
                }
                assert!(!db.accepts_connections(), "seed {seed}: PostgreSQL still accepts connections");
                pause(outage); // the outage itself
                db.start_again();
            }
            "partition-mapper" => {
                let mixed = self.mixed.as_ref().expect("a fault of the command job's run");
                mixed.netns.cut();
                pause(LEASE * 5 / 2); // past its leases: the fault itself
                mixed.netns.restore();
            }
            "store-outage" => {
                // The input's connections, the sink's, or both (the whole store gone).
                let which = self.below(3);
                let outage = Duration::from_millis(1000 + self.below(2000));
                let mixed = self.mixed.as_ref().expect("a fault of the command job's run");
                let Sink::Object(sink) = &self.sink else { unreachable!("the command job saves to the store") };
                let (proxies, label): (Vec<&TcpProxy>, _) = match which {
                    0 => (vec![&mixed.store_proxy], "store-outage(input)"),
                    1 => (vec![&sink.proxy], "store-outage(sink)"),
                    _ => (vec![&mixed.store_proxy, &sink.proxy], "store-outage(both)"),
                };
                proxies.iter().for_each(|proxy| proxy.cut());
                pause(outage); // the outage itself
                proxies.iter().for_each(|proxy| proxy.restore());
                return Some(Injected { at, before, store: false, label: Some(label) });
            }
            "child-crash" | "child-hang" | "child-flood" => {
                let mut children = Vec::new();
                while children.is_empty() {
                    // A mapper that was just restarted has none until it builds the job.
                    assert!(at.elapsed() < ROOM, "seed {seed}: no command child to hit");
                    if self.finished() {
                        return None;
                    }
                    children = self.mappers.iter().flat_map(|m| children_of(m.pid())).collect();
                    pause(Duration::from_millis(10));
                }
                let child = children[self.below(children.len() as u64) as usize];
                let signal = match kind {
                    "child-crash" => "KILL",
                    "child-hang" => "STOP", // the mapper's --command-timeout kills it
                    _ => "USR1",            // chaos_command.py floods its stderr
                };
                signal_pid(child, signal);
            }
            other => unreachable!("unknown fault {other}"),
        }
        Some(Injected { at, before, store: false, label: None })
    }

    /// Waits until the sink grows past `before` (and the ledger store works, if asked), or the
    /// run is over.
    fn recovered(&mut self, kind: &str, injected: &Injected) -> bool {
        let deadline = Instant::now() + ROOM;
        loop {
            if self.finished() {
                return false;
            }
            let store_ok = !injected.store || self.fetcher_metric("chunkmill_fetcher_store_ok") == Some(1.0);
            if store_ok && self.saved() > injected.before {
                return true;
            }
            assert!(Instant::now() < deadline, "seed {}: no progress within {ROOM:?} after {kind}", self.seed);
            pause(Duration::from_millis(10));
        }
    }

    fn verify(&self) -> (bool, String) {
        let chunk_size = CHUNK_SIZE.to_string();
        let command = chaos_command();
        let mut flags = vec!["--chunk-size", chunk_size.as_str()];
        if self.mode == Mode::Mixed {
            // The command's outputs recomputed: a shifted answer would be a wrong value.
            flags.extend(["--recompute-with", command.as_str()]);
        }
        match &self.sink {
            Sink::File(_) => self.p.verify_with_flags(&flags),
            Sink::Postgres(db) => self.p.verify_postgres_with_flags(db, &flags),
            Sink::Object(object) => {
                let mut args = vec!["--sink".to_string(), object.url.clone()];
                args.extend(flags.iter().map(|f| f.to_string()));
                self.p.verify_with(&args, &object.env())
            }
        }
    }
}

fn run_once(seed: u64, mode: Mode) -> Report {
    let sink = mode.name();
    println!("chaos ({sink}): seed {seed} (replay with CHAOS_SEED={seed})");
    let started = Instant::now();
    let mut chaos = Chaos::start(seed, mode);
    let kinds = mode.kinds();
    let mut report = Report::default();
    support::wait_until("5 chunks saved", ROOM, || chaos.saved() >= 5);
    let mut injected_faults = 0;
    // Kinds are dealt from a shuffled deck, so a run of MIN_FAULTS faults meets each kind.
    let mut deck: Vec<&'static str> = Vec::new();
    while injected_faults < MIN_FAULTS {
        let wait = Duration::from_millis(200 + chaos.below(600));
        if chaos.fetcher.wait_exit(wait).is_some() {
            break; // the run finished
        }
        chaos.generation += 1;
        if deck.is_empty() {
            deck = kinds.to_vec();
            for i in (1..deck.len()).rev() {
                let j = chaos.below(i as u64 + 1) as usize;
                deck.swap(i, j);
            }
        }
        let kind = deck.pop().expect("dealt a full deck");
        let Some(injected) = chaos.inject(kind) else { break };
        injected_faults += 1;
        let label = injected.label.unwrap_or(kind);
        *report.faults.entry(label).or_default() += 1;
        let over = !chaos.recovered(label, &injected);
        let longest = report.longest_recovery.entry(label).or_default();
        *longest = (*longest).max(injected.at.elapsed());
        if over {
            break;
        }
    }
    let code = chaos.fetcher.wait_exit(Duration::from_secs(300));
    assert_eq!(code, Some(0), "seed {seed}: the run did not finish:\n{}", chaos.fetcher.log());
    assert!(
        injected_faults >= MIN_FAULTS,
        "seed {seed}: the run ended after {injected_faults} faults, fewer than {MIN_FAULTS}: make its work heavier"
    );
    let (ok, verify) = chaos.verify();
    println!("chaos ({sink}): seed {seed}: {verify}");
    assert!(ok, "seed {seed}: {verify}");
    assert!(verify.contains("20000 found, 0 missing, 0 duplicated, 0 wrong"), "seed {seed}: {verify}");
    if let Sink::Postgres(db) = &chaos.sink {
        let run = chaos.p.run_id_at(CHUNK_SIZE);
        let rows = db.count(&format!("SELECT count(*) FROM chunkmill_outputs WHERE run = '{run}'"));
        let ids = db.count(&format!("SELECT count(DISTINCT id) FROM chunkmill_outputs WHERE run = '{run}'"));
        let chunks = db.count(&format!("SELECT count(*) FROM chunkmill_chunks WHERE run = '{run}'"));
        assert_eq!((rows, ids, chunks), (OBJECTS, OBJECTS, CHUNKS), "seed {seed}: rows, distinct ids, chunks");
    }
    println!("chaos ({sink}): seed {seed}: {} | run took {:.1} s", report.line(), started.elapsed().as_secs_f64());
    report
}

/// The seeds to run: `CHAOS_SEED`, or `runs_var` (default `default_runs`) seeds from the clock.
fn seeds(runs_var: &str, default_runs: u64) -> Vec<u64> {
    match std::env::var("CHAOS_SEED") {
        Ok(seed) => vec![seed.parse().expect("CHAOS_SEED is a number")],
        Err(_) => {
            let runs: u64 = std::env::var(runs_var).ok().and_then(|r| r.parse().ok()).unwrap_or(default_runs);
            let base =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(1);
            (0..runs).map(|i| base.wrapping_mul(31).wrapping_add(i)).collect()
        }
    }
}

fn chaos(mode: Mode, runs_var: &str, default_runs: u64) {
    let mut total = Report::default();
    let seeds = seeds(runs_var, default_runs);
    let runs = seeds.len();
    for seed in seeds {
        total.add(run_once(seed, mode));
    }
    println!("chaos total ({}, {runs} runs): {} | lost 0, duplicated 0", mode.name(), total.line());
}

#[test]
fn a_run_under_random_crashes_restarts_and_full_disks_saves_everything_exactly_once() {
    chaos(Mode::File, "CHAOS_RUNS", 2);
}

#[test]
fn a_run_into_postgres_under_random_crashes_and_database_restarts_saves_everything_exactly_once() {
    chaos(Mode::Postgres, "CHAOS_PG_RUNS", 1);
}

#[test]
fn a_command_job_from_a_store_under_partitions_outages_and_child_faults_saves_everything_exactly_once() {
    chaos(Mode::Mixed, "CHAOS_MIXED_RUNS", 1);
}
