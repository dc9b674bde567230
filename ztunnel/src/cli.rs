//! The command line of ztunnel, shared by the `ztunnel` binary and `weft ztunnel` (the lab
//! and the demo run the latter, so one binary carries everything).

use std::sync::Arc;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: Config,
}

/// Sets up logging (`WEFT_LOG`, default `info`; changeable at run time through the admin
/// server), builds ztunnel (taking the node over from a running one if it can), runs until
/// SIGTERM or SIGINT or until a newer ztunnel takes the node over, drains, and returns.
///
/// A log filter is a level (`debug`) or per-target levels (`info,hbone=debug,h2=warn`):
/// `tracing`'s `Targets` syntax, which needs no regular-expression engine in the binary.
pub fn run(args: Args) -> anyhow::Result<()> {
    let (initial, invalid) = match std::env::var("WEFT_LOG") {
        Ok(v) => match parse_filter(&v) {
            Ok(f) => (f, None),
            Err(e) => (parse_filter("info").expect("valid default filter"), Some(e)),
        },
        Err(_) => (parse_filter("info").expect("valid default filter"), None),
    };
    let (filter, handle) = tracing_subscriber::reload::Layer::new(initial);
    // Lines go to stdout in batches, through a writer thread (`logwriter`): a slow log pipe
    // delays the workers only once 256 KiB are waiting (then they wait: access-log lines are
    // never dropped). The guard writes what is left when `run` returns.
    let (writer, _log_guard) = crate::logwriter::spawn(std::io::stdout(), "ztunnel-log")?;
    let format = tracing_subscriber::fmt::layer().with_ansi(false).with_writer(writer);
    tracing_subscriber::registry().with(filter).with(format).init();
    if let Some(e) = invalid {
        tracing::warn!(error = %e, "WEFT_LOG ignored; logging at info");
    }
    let log_control: crate::app::LogControl = Arc::new(move |level: &str| {
        let new = parse_filter(level)?;
        handle.reload(new).map_err(|e| e.to_string())
    });
    raise_fd_limit();
    if args.config.worker_threads == 0 || args.config.worker_threads > 256 {
        anyhow::bail!("--worker-threads must be between 1 and 256, got {}", args.config.worker_threads);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.config.worker_threads)
        .thread_name("ztunnel-worker")
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let bound = crate::build(args.config, Some(log_control)).await?;
        tracing::info!(admin = %bound.admin_addr, metrics = %bound.metrics_addr, readiness = %bound.readiness_addr, "ztunnel ready");
        // Until SIGTERM, or until a newer ztunnel has taken the node over (`handoff`); a
        // SIGTERM during a handoff waits for it to commit or fail (`Bound::shutdown`).
        tokio::select! {
            signal = hbone::drain::terminated() => signal?,
            () = bound.handed_over() => {}
        }
        let outcome = bound.shutdown().await;
        tracing::info!(?outcome, "ztunnel stopped");
        anyhow::Ok(())
    })
}

/// Parses a log filter. A bare word must be a level: `Targets` would read a misspelt level
/// (`inof`) as a target name and silently turn every other log line off, access logs included.
fn parse_filter(text: &str) -> Result<Targets, String> {
    if text.trim().is_empty() {
        return Err("empty log filter: give a level such as info".into());
    }
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if !part.contains('=') && part.parse::<tracing_subscriber::filter::LevelFilter>().is_err() {
            return Err(format!(
                "invalid log filter {text:?}: {part:?} is not a level (trace, debug, info, warn, error, off); \
                 per-target levels are written target=level"
            ));
        }
    }
    text.trim().parse::<Targets>().map_err(|e| format!("invalid log filter {text:?}: {e}"))
}

/// Every proxied connection holds two sockets (plus pooled tunnels): raise the soft limit on
/// open files to the hard limit, as the default 1024 would cap a node at a few hundred
/// connections.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_filter;

    #[test]
    fn log_filters_are_levels_or_target_levels() {
        for good in ["info", "debug,h2=warn", "ztunnel=trace,hbone=debug", " warn "] {
            assert!(parse_filter(good).is_ok(), "{good:?} refused");
        }
        for bad in ["inof", "info,debgu", "h2=loud", ""] {
            let e = parse_filter(bad).err();
            assert!(e.is_some(), "{bad:?} accepted");
        }
    }
}
