//! The broadcaster's command line. Every flag is also an environment variable. The secrets (a
//! webhook URL, a Telegram bot token) come from a variable or, better, from a file a Kubernetes
//! Secret is mounted as (`..._FILE`), read as a `common::config::Secret`: their values are never
//! shown in `--help`, in `Debug` output, in logs or in metrics.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use common::config::{parse_duration, NatsArgs, Secret, SecretFileError};

use crate::target::{Target, TargetError, TargetKind};

/// Where the metrics endpoint listens when `--metrics-addr` is not given.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9104";

/// chunkmill broadcaster: sends the fetcher's pipeline events (run started, every 10 %, dead
/// letters, completed, resumed) to a chat, each event at most once however many replicas run.
#[derive(Debug, Clone, Parser)]
#[command(name = "broadcaster", version = common::metrics::LONG_VERSION)]
pub struct Config {
    /// Where messages go: `generic` (POST {"user","message"}), `slack`, `discord` or `telegram`.
    #[arg(long, env = "BROADCASTER_TARGET", value_enum)]
    pub target: TargetKind,

    /// Webhook URL for generic, slack and discord (prefer --webhook-url-file: environment
    /// variables are easy to leak).
    #[arg(long, env = "BROADCASTER_WEBHOOK_URL", hide_env_values = true)]
    pub webhook_url: Option<Secret>,

    /// File holding the webhook URL (a mounted Secret).
    #[arg(long, env = "BROADCASTER_WEBHOOK_URL_FILE")]
    pub webhook_url_file: Option<PathBuf>,

    /// Telegram bot token (prefer --telegram-token-file).
    #[arg(long, env = "BROADCASTER_TELEGRAM_TOKEN", hide_env_values = true)]
    pub telegram_token: Option<Secret>,

    /// File holding the Telegram bot token (a mounted Secret).
    #[arg(long, env = "BROADCASTER_TELEGRAM_TOKEN_FILE")]
    pub telegram_token_file: Option<PathBuf>,

    /// Telegram chat id: a number, or @channelname.
    #[arg(long, env = "BROADCASTER_TELEGRAM_CHAT_ID")]
    pub telegram_chat_id: Option<String>,

    /// Base URL of the Telegram Bot API (tests point it at a local receiver).
    #[arg(long, env = "BROADCASTER_TELEGRAM_API", default_value = "https://api.telegram.org")]
    pub telegram_api: String,

    /// Retries of one message after a 429, a 5xx or a failed connection (never after a 4xx, or
    /// when the request may have been delivered).
    #[arg(long, env = "BROADCASTER_MAX_RETRIES", default_value_t = 5)]
    pub max_retries: u32,

    /// Longest one message may take, retries and Retry-After waits included; then it is given up.
    #[arg(long, env = "BROADCASTER_SEND_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub send_timeout: Duration,

    /// Longest one HTTP request may take. A request that times out is not retried: the target may
    /// have received it.
    #[arg(long, env = "BROADCASTER_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// The JetStream stream of events (created if missing, subjects `<prefix>.events.>`).
    #[arg(long, env = "BROADCASTER_STREAM", default_value = common::events::DEFAULT_STREAM)]
    pub stream: String,

    /// The durable pull consumer all replicas share.
    #[arg(long, env = "BROADCASTER_CONSUMER", default_value = "chunkmill-broadcaster")]
    pub consumer: String,

    /// The JetStream key-value bucket of claimed events (the at-most-once record).
    #[arg(long, env = "BROADCASTER_DEDUP_BUCKET", default_value = "chunkmill-broadcast")]
    pub dedup_bucket: String,

    /// How many NATS servers keep a copy of the events stream and the claims bucket (JetStream
    /// replicas, 1 to 5). 1 for a single server; 3 on a 3-node cluster, so events and claims
    /// survive losing a node. An existing stream or bucket is changed to this count.
    #[arg(long, env = "BROADCASTER_JETSTREAM_REPLICAS", default_value = "1", value_parser = common::jetstream::parse_replicas)]
    pub jetstream_replicas: usize,

    /// How long events and their claims are kept (the stream's and the bucket's max age).
    #[arg(long, env = "BROADCASTER_RETENTION", default_value = "7days", value_parser = parse_duration)]
    pub retention: Duration,

    /// Redelivery delay of an unacknowledged event (the consumer's ack wait). A replica that dies
    /// holding an event delays it (and, at --max-in-flight 1, every later one) by this much; a
    /// live replica's slow send is safe with a short one, as it reports progress every third.
    #[arg(long, env = "BROADCASTER_ACK_WAIT", default_value = "5s", value_parser = parse_duration)]
    pub ack_wait: Duration,

    /// Events in flight across all replicas (the consumer's max_ack_pending). 1 keeps messages in
    /// order and is kind to the chat's rate limits; replicas are then for availability.
    #[arg(long, env = "BROADCASTER_MAX_IN_FLIGHT", default_value_t = 1, value_parser = clap::value_parser!(i64).range(1..=1000))]
    pub max_in_flight: i64,

    /// Address of the /metrics, /healthz and /readyz endpoint; when the default port is taken
    /// (a second replica on one host), any free one, logged [default: 0.0.0.0:9104]
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<String>,

    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
}

/// A setting is missing or unreadable. Messages name the variables, never a secret's value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required setting is missing.
    #[error("--target {target} needs {what}: set {vars}")]
    Missing {
        /// The target.
        target: &'static str,
        /// What is missing.
        what: &'static str,
        /// The variables that provide it.
        vars: &'static str,
    },
    /// A secret file cannot be read.
    #[error(transparent)]
    File(#[from] SecretFileError),
    /// The settings do not make a usable target.
    #[error(transparent)]
    Target(#[from] TargetError),
}

fn secret(
    value: &Option<Secret>,
    file: &Option<PathBuf>,
    file_var: &'static str,
) -> Result<Option<Secret>, ConfigError> {
    Ok(Secret::resolve(value.as_ref(), file.as_deref(), file_var)?)
}

impl Config {
    /// Builds the target from the settings, reading secret files; fails naming what is missing.
    pub fn target(&self) -> Result<Target, ConfigError> {
        let name = self.target.name();
        match self.target {
            TargetKind::Telegram => {
                let token = secret(&self.telegram_token, &self.telegram_token_file, "BROADCASTER_TELEGRAM_TOKEN_FILE")?
                    .ok_or(ConfigError::Missing {
                        target: name,
                        what: "a bot token",
                        vars: "BROADCASTER_TELEGRAM_TOKEN_FILE (or BROADCASTER_TELEGRAM_TOKEN)",
                    })?;
                let chat = self.telegram_chat_id.as_deref().map(str::trim).filter(|c| !c.is_empty()).ok_or(
                    ConfigError::Missing { target: name, what: "a chat id", vars: "BROADCASTER_TELEGRAM_CHAT_ID" },
                )?;
                Ok(Target::telegram(&self.telegram_api, &token, chat)?)
            }
            kind => {
                let url = secret(&self.webhook_url, &self.webhook_url_file, "BROADCASTER_WEBHOOK_URL_FILE")?.ok_or(
                    ConfigError::Missing {
                        target: name,
                        what: "a webhook URL",
                        vars: "BROADCASTER_WEBHOOK_URL_FILE (or BROADCASTER_WEBHOOK_URL)",
                    },
                )?;
                Ok(Target::webhook(kind, &url)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from([&["broadcaster"], args].concat()).unwrap()
    }

    #[test]
    fn a_missing_secret_is_named_by_its_variable() {
        let error = parse(&["--target", "slack"]).target().unwrap_err().to_string();
        assert!(error.contains("BROADCASTER_WEBHOOK_URL_FILE"), "{error}");
        let error = parse(&["--target", "telegram", "--telegram-token", "123:abc"]).target().unwrap_err().to_string();
        assert!(error.contains("BROADCASTER_TELEGRAM_CHAT_ID"), "{error}");
    }

    #[test]
    fn secrets_come_from_files_and_never_show_in_debug_or_errors() {
        let dir = std::env::temp_dir().join(format!("bcast-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("url");
        std::fs::write(&file, "https://hooks.slack.com/services/T000/B000/XXXXSECRET\n").unwrap();
        let config = parse(&["--target", "slack", "--webhook-url-file", file.to_str().unwrap()]);
        let target = config.target().unwrap();
        assert_eq!(target.endpoint(), "https://hooks.slack.com/services/T000/B000/XXXXSECRET");
        assert_eq!(target.describe(), "slack at https://hooks.slack.com/…");
        let config = parse(&["--target", "slack", "--webhook-url", "https://hooks.slack.com/services/SECRET"]);
        assert!(!format!("{config:?}").contains("SECRET"));
        let missing = parse(&["--target", "discord", "--webhook-url-file", "/nonexistent/SECRETPATH"]).target();
        assert!(missing.unwrap_err().to_string().contains("BROADCASTER_WEBHOOK_URL_FILE"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
