//! Command-line and environment settings shared by every service. Each binary flattens
//! [`NatsArgs`] into its own clap struct, so `--nats-url` and `NATS_URL` mean the same everywhere.

use std::time::Duration;

use clap::Args;

/// How to reach NATS and which subjects to use.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long = "nats-url", env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub url: String,

    /// Prefix of every subject the pipeline uses, so several pipelines can share one NATS.
    #[arg(long, env = "CHUNKMILL_SUBJECT_PREFIX", default_value = "chunkmill")]
    pub subject_prefix: String,

    /// A name for this process in logs and in the fetcher's ledger (default: host name and pid).
    #[arg(long, env = "CHUNKMILL_INSTANCE")]
    pub instance: Option<String>,
}

impl NatsArgs {
    /// Settings for a test or a tool talking to `url` with the default prefix.
    pub fn for_url(url: impl Into<String>) -> Self {
        NatsArgs { url: url.into(), subject_prefix: "chunkmill".into(), instance: None }
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
}
