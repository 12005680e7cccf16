//! Logging set-up: human-readable lines by default, JSON with `LOG_FORMAT=json`, level from
//! `RUST_LOG` (default `info`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Without `RUST_LOG`: INFO, but the clients' own INFO lines are noise to a user (async-nats's
/// connection chatter; tokio-postgres's server notices, e.g. the WARNING of a database restart,
/// which the saver reports itself as a lost connection).
const DEFAULT_FILTER: &str = "info,async_nats=warn,tokio_postgres=warn";

/// Whether logs are JSON (`LOG_FORMAT=json`): one object per line, for log collectors.
pub fn json_logs() -> bool {
    std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"))
}

/// Installs the global tracing subscriber. Call once, first thing in `main`.
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let json = json_logs();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        // Colours only on a terminal: `kubectl logs` and files get plain text.
        builder.with_target(false).with_ansi(std::io::stderr().is_terminal()).init();
    }
}
