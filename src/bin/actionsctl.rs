//! actionsctl: look at and steer actionsd from a terminal (see `actionsctl
//! --help`). Thin: parse the command line, run it, exit with its code.

use std::process::ExitCode;

use actionsd::ctl::{self, cli::Cli};
use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    ExitCode::from(ctl::main(cli).await)
}
