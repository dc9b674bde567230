//! `ztunnel`: parse the command line and run (see `ztunnel::cli`).

#![forbid(unsafe_code)]

use clap::Parser;

#[derive(Parser)]
#[command(name = "ztunnel", version, about = "Weft node proxy")]
struct Cli {
    #[command(flatten)]
    args: ztunnel::cli::Args,
}

#[cfg(feature = "dhat-heap")]
#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() -> std::process::ExitCode {
    // Written when this guard drops, at exit (see benches/README.md, heap profile).
    #[cfg(feature = "dhat-heap")]
    let _profiler = dhat::Profiler::builder().file_name(format!("dhat-heap-{}.json", std::process::id())).build();
    // Errors are printed for the operator (with their causes), not as a backtrace.
    match ztunnel::cli::run(Cli::parse().args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztunnel: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
