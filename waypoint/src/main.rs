//! `weft-waypoint`: parse the command line and run (see `waypoint::cli`).

#![forbid(unsafe_code)]

use clap::Parser;

#[derive(Parser)]
#[command(name = "weft-waypoint", version, about = "Weft waypoint: the L7 proxy of the services that opt into it")]
struct Cli {
    #[command(flatten)]
    args: waypoint::cli::Args,
}

fn main() -> std::process::ExitCode {
    match waypoint::cli::run(Cli::parse().args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-waypoint: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
