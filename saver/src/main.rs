//! `saver`: parse the command line, then save results until SIGTERM/Ctrl-C, or run `verify`.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use saver::config::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    common::telemetry::init_logging();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("saver: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(Command::Verify(args)) = cli.command {
        let report = saver::verify::run(&args, transform::Registry::builtin())
            .with_context(|| format!("cannot verify the sink against {}", args.input.display()))?;
        println!("{report}");
        return Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
    // Two threads: one for messaging, one to spare; file writes run on tokio's blocking pool.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let shutdown = common::shutdown::on_signals();
        saver::run(cli.run, shutdown).await
    })?;
    Ok(ExitCode::SUCCESS)
}
