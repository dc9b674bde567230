//! `weft-cni`: run by the container runtime as a CNI plugin (no arguments; `CNI_COMMAND` in
//! the environment, the configuration on stdin), or by the ztunnel DaemonSet to install or
//! uninstall itself on a node (see the `cni` crate).

#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "weft-cni",
    version,
    about = "Weft's chained CNI plugin: hands each new pod to the node's ztunnel before it starts",
    long_about = "Weft's chained CNI plugin: hands each new pod to the node's ztunnel before it starts.\n\n\
                  Without a subcommand it is a CNI plugin, as the container runtime runs it: CNI_COMMAND and \
                  the other CNI_* variables in the environment, the network configuration on stdin."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Copy this binary into the CNI bin directory and add weft-cni at the end of the plugins of
    /// the runtime's network configuration (idempotent).
    Install(cni::install::Settings),
    /// Remove weft-cni from every network configuration in the CNI conf directory, then its
    /// binary.
    Uninstall(cni::install::Dirs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        None => {
            let reply = cni::plugin::run(&cni::plugin::Environment::from_process(), &mut std::io::stdin().lock());
            let printed = std::io::stdout().write_all(reply.stdout.as_bytes()).and_then(|()| std::io::stdout().flush());
            if reply.success && printed.is_ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Some(Command::Install(settings)) => report("install", cni::install::install(&settings)),
        Some(Command::Uninstall(dirs)) => report("uninstall", cni::install::uninstall(&dirs)),
    }
}

fn report<T: std::fmt::Display>(what: &str, outcome: Result<T, cni::install::InstallError>) -> ExitCode {
    match outcome {
        Ok(done) => {
            println!("{done}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weft-cni {what}: error: {e}");
            ExitCode::FAILURE
        }
    }
}
