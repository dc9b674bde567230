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

/// jemalloc, with the options in `.cargo/config.toml` (one arena, no thread caches, free
/// pages returned over a minute).
///
/// The receiving side of a tunnel allocates a buffer per HTTP/2 DATA frame (h2's read buffer),
/// freed once the frame is written to the app. glibc returns the top of its heap to the
/// kernel whenever more than 128 KiB is free there, so the next frames were read into fresh
/// pages: about 165,000 page faults per GB received. jemalloc keeps freed pages mapped for
/// reuse, which removes most of those faults and a third of the receiving side's CPU per byte
/// (docs/BENCHMARKS.md). Its default per-CPU arenas and per-thread caches cost about 1 MiB
/// more resident memory at rest; one arena and no caches cost about 0.2 MiB. It returns pages
/// unused for a while to the kernel gradually; with its default 10 s, a steady stream of
/// quarter-MiB frames still cost 1,000-3,500 page faults per GB, with 60 s a third of that, and
/// a burst's memory goes back within about a minute of its end.
#[cfg(not(feature = "dhat-heap"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
