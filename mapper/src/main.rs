//! `mapper`: parse the command line and run a mapper until SIGTERM/Ctrl-C.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let config = mapper::Config::parse();
    common::telemetry::init_logging();
    // One tokio thread for messaging; the cores belong to the rayon transform pool.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("mapper: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = common::shutdown::on_signals();
        mapper::run(config, shutdown).await
    });
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("mapper: {e:#}");
            ExitCode::FAILURE
        }
    }
}
