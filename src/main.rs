//! `weft`: the command-line entry point of the Weft mesh.
//!
//! `weft demo` shows the mesh at work on a cluster of network namespaces; `weft ztunnel`,
//! `weft controller` and `weft waypoint` run the components (the same as their own binaries),
//! so the lab and the demo need one binary.

#![forbid(unsafe_code)]

mod apps;
mod ca;
mod demo;
mod get;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "weft", version, about = "Weft: a sidecar-less service mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the mesh at work on this machine: a two-node cluster of network namespaces with a
    /// controller and a ztunnel per node, pods enrolled by a namespace label without restarts,
    /// mutual-TLS tunnels, load balancing, passthrough, policy refusals and metrics, then a
    /// waypoint: a 90/10 canary split and retries healing a failing backend.
    Demo(demo::Args),
    /// Certificate authority tools.
    #[command(subcommand)]
    Ca(ca::Ca),
    /// Show what a ztunnel or the controller holds: workloads, services, policies,
    /// certificates or status, as a table, JSON or YAML.
    Get(get::Args),
    /// Run the node proxy (the same as the `ztunnel` binary).
    Ztunnel(Box<ztunnel::cli::Args>),
    /// Run a waypoint, the L7 proxy of the services that use it (the same as the
    /// `weft-waypoint` binary).
    Waypoint(Box<waypoint::cli::Args>),
    /// Run the controller, or its tools (the same as the `weft-controller` binary).
    #[command(subcommand)]
    Controller(controller::cli::Command),
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
        Command::Controller(cmd) => return controller::cli::run(cmd),
        Command::Waypoint(args) => return waypoint::cli::run(*args),
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
        Command::Get(args) => get::run(args),
        Command::Ztunnel(_) | Command::Controller(_) | Command::Waypoint(_) => unreachable!("handled above"),
    }
}
