//! `ztunnel`: parse the command line and run (see `ztunnel::cli`).

#![forbid(unsafe_code)]

use clap::Parser;

#[derive(Parser)]
#[command(name = "ztunnel", version, about = "Weft node proxy")]
struct Cli {
    #[command(flatten)]
    args: ztunnel::cli::Args,
}

fn main() -> std::process::ExitCode {
    // Errors are printed for the operator (with their causes), not as a backtrace.
    match ztunnel::cli::run(Cli::parse().args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztunnel: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
