//! Command-line and environment settings shared by every service. Each binary flattens
//! [`NatsArgs`] into its own clap struct, so `--nats-url` and `NATS_URL` mean the same everywhere.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

/// How to reach NATS and which subjects to use.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated; `nats://USER:PASSWORD@HOST:PORT` and
    /// `nats://TOKEN@HOST:PORT` authenticate as in other NATS clients (prefer the *_FILE settings:
    /// a URL is easy to leak). Never printed with its credentials.
    #[arg(long = "nats-url", env = "NATS_URL", default_value = "nats://127.0.0.1:4222", hide_env_values = true)]
    pub url: String,

    /// Prefix of every subject the pipeline uses, so several pipelines can share one NATS.
    #[arg(long, env = "CHUNKMILL_SUBJECT_PREFIX", default_value = "chunkmill")]
    pub subject_prefix: String,

    /// A name for this process in logs and in the fetcher's ledger (default: host name and pid);
    /// at most 256 bytes, no control characters.
    #[arg(long, env = "CHUNKMILL_INSTANCE", value_parser = parse_instance)]
    pub instance: Option<String>,

    /// NATS credentials file (.creds: JWT and NKey seed).
    #[arg(long, env = "NATS_CREDS_FILE")]
    pub nats_creds_file: Option<PathBuf>,

    /// NATS user name (with --nats-password-file or NATS_PASSWORD).
    #[arg(long, env = "NATS_USER")]
    pub nats_user: Option<String>,

    /// File holding the NATS password (a mounted Secret).
    #[arg(long, env = "NATS_PASSWORD_FILE")]
    pub nats_password_file: Option<PathBuf>,

    /// NATS password (prefer --nats-password-file: environment variables are easy to leak).
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<Secret>,

    /// Directory holding this service's NATS user as two files, `user` and `password` (a
    /// mounted Secret with those keys, as deploy/secrets/nats-users.example.yaml). Used when both
    /// are there; an absent or empty directory means no user (an optional Secret not created).
    /// --nats-user overrides it.
    #[arg(long, env = "NATS_USER_DIR")]
    pub nats_user_dir: Option<PathBuf>,

    /// File holding the NATS authentication token.
    #[arg(long, env = "NATS_TOKEN_FILE")]
    pub nats_token_file: Option<PathBuf>,

    /// File holding an NKey seed to authenticate with.
    #[arg(long, env = "NATS_NKEY_FILE")]
    pub nats_nkey_file: Option<PathBuf>,

    /// CA certificate (PEM) to verify the NATS server with; implies TLS.
    #[arg(long, env = "NATS_TLS_CA_FILE")]
    pub nats_tls_ca_file: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS, with --nats-tls-key-file.
    #[arg(long, env = "NATS_TLS_CERT_FILE", requires = "nats_tls_key_file")]
    pub nats_tls_cert_file: Option<PathBuf>,

    /// Client private key (PEM) for mutual TLS.
    #[arg(long, env = "NATS_TLS_KEY_FILE", requires = "nats_tls_cert_file")]
    pub nats_tls_key_file: Option<PathBuf>,
}

impl NatsArgs {
    /// Settings for a test or a tool talking to `url` with the default prefix.
    pub fn for_url(url: impl Into<String>) -> Self {
        NatsArgs {
            url: url.into(),
            subject_prefix: "chunkmill".into(),
            instance: None,
            nats_creds_file: None,
            nats_user: None,
            nats_password_file: None,
            nats_password: None,
            nats_user_dir: None,
            nats_token_file: None,
            nats_nkey_file: None,
            nats_tls_ca_file: None,
            nats_tls_cert_file: None,
            nats_tls_key_file: None,
        }
    }

    /// The name this process gives itself: `--instance`, else `<hostname>-<pid>`.
    pub fn instance_name(&self, service: &str) -> String {
        if let Some(name) = &self.instance {
            return name.clone();
        }
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
            .unwrap_or_else(|| service.to_string());
        format!("{host}-{}", std::process::id())
    }
}

/// A secret value (a password, a token, a webhook URL): its `Debug` and `Display` never show it,
/// so a config struct that derives `Debug`, a log line or an error message cannot leak it. The
/// value comes out only through [`Secret::expose`], at the one place that sends it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Reads a secret from a file (typically a mounted Kubernetes Secret): its content without
    /// the surrounding whitespace, such as the newline that `echo` and editors add. `setting` names
    /// the flag or variable that gave the path, for the error.
    pub fn from_file(path: &Path, setting: &'static str) -> Result<Secret, SecretFileError> {
        std::fs::read_to_string(path).map(|s| Secret(s.trim().to_string())).map_err(|source| SecretFileError {
            setting,
            path: path.to_path_buf(),
            source,
        })
    }

    /// The one rule for "a value or a file" settings: the file wins when given, else the value;
    /// an empty value counts as not given.
    pub fn resolve(
        value: Option<&Secret>,
        file: Option<&Path>,
        setting: &'static str,
    ) -> Result<Option<Secret>, SecretFileError> {
        match file {
            Some(path) => Secret::from_file(path, setting).map(Some),
            None => Ok(value.filter(|s| !s.0.is_empty()).cloned()),
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.trim().to_string()))
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_string())
    }
}

/// A secret file that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {setting} {path}: {source}; mount the Secret there or unset {setting}")]
pub struct SecretFileError {
    /// The flag or variable that named the file.
    pub setting: &'static str,
    /// The file.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

/// An instance name as peers accept it (see `protocol::MAX_NAME`).
fn parse_instance(text: &str) -> Result<String, String> {
    if text.is_empty() || text.len() > crate::protocol::MAX_NAME {
        return Err(format!("an instance name has 1 to {} bytes", crate::protocol::MAX_NAME));
    }
    if text.chars().any(char::is_control) {
        return Err("an instance name cannot hold control characters".into());
    }
    Ok(text.to_string())
}

/// Parses durations such as `500ms`, `5s`, `2m` or `1h 30m` for clap.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}` is not a duration ({e}); write e.g. 500ms, 5s or 2m"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_the_documented_forms() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("five").unwrap_err().contains("`five`"));
    }

    #[test]
    fn a_secret_never_shows_and_its_file_wins_without_the_trailing_newline() {
        let secret: Secret = " hunter2 ".parse().unwrap();
        assert_eq!(secret.expose(), "hunter2");
        assert_eq!(format!("{secret:?} {secret}"), "Secret(<redacted>) <redacted>");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "from-file\n").unwrap();
        let resolved = Secret::resolve(Some(&secret), Some(&file), "X_FILE").unwrap();
        assert_eq!(resolved.map(|s| s.expose().to_string()).as_deref(), Some("from-file"));
        assert_eq!(Secret::resolve(Some(&Secret::new("")), None, "X_FILE").unwrap(), None);
        let error = Secret::resolve(None, Some(&dir.path().join("nope")), "X_FILE").unwrap_err().to_string();
        assert!(error.contains("X_FILE") && error.contains("nope"), "{error}");
    }
}
