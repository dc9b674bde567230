//! `weft-controller`: parse the command line and run (see `controller::cli`).

#![forbid(unsafe_code)]

use clap::Parser;

#[derive(Parser)]
#[command(name = "weft-controller", version, about = "Weft controller: cluster source, CA, watch API")]
struct Cli {
    #[command(subcommand)]
    command: controller::cli::Command,
}

fn main() -> std::process::ExitCode {
    // Errors are printed for the operator (with their causes), not as a backtrace.
    match controller::cli::run(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-controller: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
