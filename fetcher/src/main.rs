//! `fetcher`: parse the command line, then run the pipeline's fetcher or a helper command.

use std::process::ExitCode;

use anyhow::Context;
use common::service::Runtime;
use fetcher::config::Command;

fn main() -> ExitCode {
    let cli = fetcher::config::parse_cli();
    if let Some(Command::Generate(args)) = cli.command {
        return common::service::command("fetcher", || {
            fetcher::generate::generate(args.kind, args.objects, args.seed, args.format, &args.output)
                .with_context(|| format!("cannot write {}", args.output.display()))?;
            println!("wrote {} objects to {}", args.objects, args.output.display());
            Ok(ExitCode::SUCCESS)
        });
    }
    if let Some(Command::Status(args)) = cli.command {
        return common::service::command("fetcher", || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let status = runtime.block_on(fetcher::status::request(&args.nats, args.timeout))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                println!("{status}");
            }
            Ok(ExitCode::SUCCESS)
        });
    }
    // One thread: the fetcher is one task around the ledger, and the cores belong to mappers.
    common::service::main("fetcher", Runtime::CurrentThread, |shutdown| async move {
        let summary = fetcher::run(cli.run, shutdown).await?;
        // A completed run with dead-lettered chunks or objects (or skipped input records) is not
        // a clean success: say so in the exit status.
        let lost = summary.dead + summary.stats.objects_dead + summary.bad_records;
        Ok(if summary.complete && lost > 0 { ExitCode::from(3) } else { ExitCode::SUCCESS })
    })
}
