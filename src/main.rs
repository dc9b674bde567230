//! `weft`: the command-line entry point of the Weft mesh.
//!
//! Today it runs `weft demo`, an in-process demonstration of HBONE tunnels on loopback. With the
//! ztunnel issue it grows into the network-namespace lab demo.

#![forbid(unsafe_code)]

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Demo(args) => runtime.block_on(demo::run(args)),
    }
}
