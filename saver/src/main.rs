//! `saver`: parse the command line, then save results until SIGTERM/Ctrl-C, or run `verify`
//! (or serve as a jq sandbox of a `verify`).

use std::process::ExitCode;

use anyhow::Context;
use common::service::Runtime;
use saver::config::Command;

fn main() -> ExitCode {
    // `saver verify` recomputes jq jobs in sandboxes of this binary: one must become a sandbox
    // before anything else.
    transform::jq::sandbox::enter_if_child();
    let cli = saver::config::parse_cli();
    if let Some(Command::Verify(args)) = cli.command {
        return common::service::command("saver", || {
            let report = saver::verify::run(&args, transform::Registry::builtin())
                .with_context(|| format!("cannot verify the sink against {}", args.input.display()))?;
            println!("{report}");
            Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        });
    }
    // Two threads: one for messaging, one to spare; file writes run on tokio's blocking pool.
    common::service::main("saver", Runtime::Workers(2), |shutdown| async move {
        saver::run(cli.run, shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}
