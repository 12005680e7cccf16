//! `broadcaster`: parse the command line, then post pipeline events to the configured chat.

use std::process::ExitCode;

use broadcaster::Config;
use clap::Parser;
use common::service::Runtime;

fn main() -> ExitCode {
    let config = Config::parse();
    // One thread: the work is waiting on NATS and HTTP, one event at a time.
    common::service::main("broadcaster", Runtime::CurrentThread, |shutdown| async move {
        broadcaster::run(config, shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}
