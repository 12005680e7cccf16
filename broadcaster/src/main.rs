//! `broadcaster`: parse the command line, then post pipeline events to the configured chat.

use std::process::ExitCode;

use broadcaster::Config;
use clap::Parser;

fn main() -> ExitCode {
    let config = Config::parse();
    common::telemetry::init_logging();
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("broadcaster: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    // One thread: the work is waiting on NATS and HTTP, one event at a time.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let shutdown = common::shutdown::on_signals();
        broadcaster::run(config, shutdown).await
    })?;
    Ok(())
}
