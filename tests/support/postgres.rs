//! A real PostgreSQL server per test: `initdb` into a temporary directory, listening on a free
//! port of 127.0.0.1 with password (SCRAM) authentication, stoppable, crashable and restartable on
//! the same port. Needs PostgreSQL's server binaries (Debian: `postgresql-15`; found under
//! /usr/lib/postgresql/*/bin, or set PG_BIN_DIR). Under root the server runs as user `postgres`,
//! since PostgreSQL refuses to run as root. [`PgServer::start_tls`] turns TLS on, with a test CA
//! and server certificate made by the `openssl` command.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::harness::free_port;

/// The role and database every test server has.
pub const PG_USER: &str = "chunkmill";
/// The role's password (a test secret: tests check it never reaches a log).
pub const PG_PASSWORD: &str = "pg-test-secret-7f3a";

/// A PostgreSQL server process; stopped on drop.
pub struct PgServer {
    port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    child: Option<Child>,
    /// `-c` settings beyond the defaults (TLS).
    settings: Vec<String>,
}

/// The TLS files of a test server, made with the `openssl` command: a CA, the server's
/// certificate it signed (for `localhost` and 127.0.0.1), and a second CA that signed nothing.
pub struct TestCerts {
    /// The CA that signed the server's certificate (PEM).
    pub ca: PathBuf,
    /// A CA the server's certificate does not lead to (PEM).
    pub other_ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl (install it: apt-get install openssl; scripts/test.sh does)");
    assert!(output.status.success(), "openssl {args:?} failed:\n{}", String::from_utf8_lossy(&output.stderr));
}

impl TestCerts {
    /// Makes the files in `dir`.
    fn make(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("TLS directory");
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        for (name, subject) in [("ca", "/CN=chunkmill test CA"), ("other-ca", "/CN=chunkmill other test CA")] {
            let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &pem, "-days", "2", "-subj", subject]);
            args.extend([
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
            openssl(dir, &args);
        }
        let mut args = vec!["req"];
        args.extend(ec);
        args.extend(["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]);
        openssl(dir, &args);
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("extensions file");
        openssl(
            dir,
            &["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", "2"]
                .into_iter()
                .chain(["-days", "2", "-extfile", "server.ext", "-out", "server.pem"])
                .collect::<Vec<_>>(),
        );
        TestCerts {
            ca: dir.join("ca.pem"),
            other_ca: dir.join("other-ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        }
    }
}

fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
                .filter(|(_, bin): &(u32, PathBuf)| bin.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: install them \
             (apt-get install postgresql; scripts/test.sh does) or set PG_BIN_DIR"
        )
    })
}

/// The uid and gid of `postgres` when this process is root.
fn owner() -> Option<(u32, u32)> {
    let me = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1);
    if me != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("tests run as root need a `postgres` user to run PostgreSQL as (the Debian package makes it)");
    let fields: Vec<&str> = line.split(':').collect();
    Some((fields[2].parse().expect("uid"), fields[3].parse().expect("gid")))
}

impl PgServer {
    /// Creates a cluster with role and database `chunkmill`, starts it, and waits until it
    /// accepts connections.
    pub fn start() -> Self {
        let server = Self::init();
        server.started()
    }

    /// As [`Self::start`], with `ssl = on` and a server certificate for `localhost` and
    /// 127.0.0.1 signed by a test CA (password authentication over TLS or not).
    pub fn start_tls() -> (Self, TestCerts) {
        let mut server = Self::init();
        let certs = TestCerts::make(&server.dir.path().join("tls"));
        // PostgreSQL refuses a key file others may read, and must own it.
        std::fs::set_permissions(&certs.key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod key");
        if let Some((uid, gid)) = server.owner {
            for file in [&certs.key, &certs.cert] {
                std::os::unix::fs::chown(file, Some(uid), Some(gid)).expect("chown a TLS file");
            }
        }
        server.settings = vec![
            "ssl=on".into(),
            format!("ssl_cert_file={}", certs.cert.display()),
            format!("ssl_key_file={}", certs.key.display()),
        ];
        (server.started(), certs)
    }

    fn started(mut self) -> Self {
        self.spawn();
        self.query_db("postgres", &format!("CREATE DATABASE {PG_USER}"));
        self
    }

    /// A new cluster, not started.
    fn init() -> Self {
        let dir = tempfile::tempdir().expect("temp dir for PostgreSQL");
        let owner = owner();
        let password_file = dir.path().join("password");
        std::fs::write(&password_file, format!("{PG_PASSWORD}\n")).expect("password file");
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown the test directory");
            std::os::unix::fs::chown(&password_file, Some(uid), Some(gid)).expect("chown the password file");
        }
        let server = PgServer { port: free_port(), dir, bin: bin_dir(), owner, child: None, settings: Vec::new() };
        let output = server
            .command("initdb")
            .args(["-D", "data", "-U", PG_USER, "--auth=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C"])
            .arg(format!("--pwfile={}", password_file.display()))
            .output()
            .expect("run initdb");
        assert!(output.status.success(), "initdb failed:\n{}", String::from_utf8_lossy(&output.stderr));
        server
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        command.current_dir(self.dir.path()).stdin(Stdio::null());
        if let Some((uid, gid)) = self.owner {
            command.uid(uid).gid(gid);
        }
        command
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn spawn(&mut self) {
        let log = File::options().create(true).append(true).open(self.log_path()).expect("postgres log file");
        let child = self
            .command("postgres")
            .args(["-D", "data", "-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.accepts_connections() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("postgres exited with {status}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "postgres did not accept connections within 60 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `postgres://chunkmill@127.0.0.1:PORT/chunkmill` (no password: see [`Self::password_file`]).
    pub fn url(&self) -> String {
        format!("postgres://{PG_USER}@127.0.0.1:{}/{PG_USER}", self.port)
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A file holding the password, as a mounted Secret would.
    pub fn password_file(&self) -> PathBuf {
        self.dir.path().join("password")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn shutdown(&mut self, signal: &str) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-s", signal, &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }

    /// Fast shutdown (SIGINT): sessions are ended, transactions in flight roll back, a checkpoint
    /// is written; the next start needs no recovery.
    pub fn stop(&mut self) {
        self.shutdown("INT");
    }

    /// Whether the server accepts connections now (`pg_isready`).
    pub fn accepts_connections(&self) -> bool {
        self.command("pg_isready")
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Immediate shutdown (SIGQUIT): connections cut, no checkpoint; the next start recovers from
    /// the write-ahead log, as after a crash.
    pub fn crash(&mut self) {
        self.shutdown("QUIT");
    }

    /// Starts a crashed server again on the same port and data, and waits until it accepts
    /// connections.
    pub fn start_again(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    /// Runs SQL in database `chunkmill` with psql; returns its unaligned output.
    pub fn query(&self, sql: &str) -> String {
        self.query_db(PG_USER, sql)
    }

    fn query_db(&self, database: &str, sql: &str) -> String {
        let psql = if self.bin.join("psql").exists() { self.bin.join("psql") } else { PathBuf::from("psql") };
        let output = Command::new(psql)
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", PG_USER, "-d", database, "-c", sql])
            .env("PGPASSWORD", PG_PASSWORD)
            .output()
            .expect("run psql");
        assert!(output.status.success(), "psql `{sql}` failed:\n{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// A number from a one-value query.
    pub fn count(&self, sql: &str) -> u64 {
        let text = self.query(sql);
        text.parse().unwrap_or_else(|_| panic!("`{sql}` returned `{text}`, not a number"))
    }

    /// The directory the server's files live in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.crash();
    }
}
