//! `weft`: the command-line entry point of the Weft mesh.
//!
//! Today it runs `weft demo`, an in-process demonstration of HBONE tunnels on loopback. With the
//! ztunnel issue it grows into the network-namespace lab demo.

#![forbid(unsafe_code)]

mod apps;
mod ca;
mod demo;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "weft", version, about = "Weft: a sidecar-less service mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show HBONE at work on this machine: mutual-TLS tunnels between two identities on
    /// loopback, policy refusals, identity checks, pooling, and a bulk transfer.
    Demo(demo::Args),
    /// Certificate authority tools.
    #[command(subcommand)]
    Ca(ca::Ca),
    /// Run the node proxy (the same as the `ztunnel` binary).
    Ztunnel(Box<ztunnel::cli::Args>),
    /// Small programs the lab runs inside pods.
    #[command(subcommand, hide = true)]
    App(apps::App),
}

fn main() -> std::process::ExitCode {
    // Errors are printed for the operator (with their causes), not as a backtrace.
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // ztunnel sets up its own logging and runtime.
    let command = match cli.command {
        Command::Ztunnel(args) => return ztunnel::cli::run(*args),
        other => other,
    };
    // `RUST_LOG` as a level or per-target levels (`warn,weft=debug`); errors only by default.
    let filter: tracing_subscriber::filter::Targets =
        std::env::var("RUST_LOG").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| "error".parse().expect("valid"));
    use tracing_subscriber::prelude::*;
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match command {
        Command::Demo(args) => demo::run(args),
        Command::App(app) => runtime.block_on(apps::run(app)),
        Command::Ca(cmd) => ca::run(cmd),
        Command::Ztunnel(_) => unreachable!("handled above"),
    }
}
