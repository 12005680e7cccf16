//! `fetcher`: parse the command line, then run the pipeline's fetcher or a helper command.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use fetcher::config::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    common::telemetry::init_logging();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("fetcher: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(Command::Generate(args)) = cli.command {
        fetcher::generate::generate(args.kind, args.objects, args.seed, args.format, &args.output)
            .with_context(|| format!("cannot write {}", args.output.display()))?;
        println!("wrote {} objects to {}", args.objects, args.output.display());
        return Ok(ExitCode::SUCCESS);
    }
    // One thread: the fetcher is one task around the ledger, and the cores belong to mappers.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let summary = runtime.block_on(async {
        let shutdown = common::shutdown::on_signals();
        fetcher::run(cli.run, shutdown).await
    })?;
    // A completed run with dead-lettered chunks or objects (or skipped input records) is not a
    // clean success: say so in the exit status.
    let lost = summary.dead + summary.stats.objects_dead + summary.bad_records;
    Ok(if summary.complete && lost > 0 { ExitCode::from(3) } else { ExitCode::SUCCESS })
}
