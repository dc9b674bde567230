//! The waypoint's command line, shared by `weft-waypoint` and `weft waypoint`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tracing_subscriber::prelude::*;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The controller's API, `<host>:<port>`.
    #[arg(long, env = "WEFT_CONTROLLER")]
    pub controller: String,
    /// The root the controller's certificate chains to (PEM).
    #[arg(long, env = "WEFT_CONTROLLER_CA")]
    pub controller_ca: PathBuf,
    /// The name the controller's certificate must carry (default: the host of --controller).
    #[arg(long)]
    pub controller_name: Option<String>,
    /// The bearer token of the waypoint's service account, read again for each request (a
    /// projected token rotates).
    #[arg(long, env = "WEFT_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// The namespace of the waypoint's Gateway.
    #[arg(long, env = "WEFT_NAMESPACE")]
    pub namespace: String,
    /// The name of the waypoint's Gateway (of class `weft-waypoint`).
    #[arg(long, env = "WEFT_GATEWAY")]
    pub name: String,
    /// The waypoint's service account, whose identity it proves (default: the Gateway's name).
    #[arg(long)]
    pub service_account: Option<String>,
    /// HBONE listener.
    #[arg(long, default_value = "0.0.0.0:15008")]
    pub hbone_addr: SocketAddr,
    /// Admin server (configuration dump, log level); keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// Lifetime asked for the waypoint's certificate (renewed at half-life).
    #[arg(long, default_value = "24h", value_parser = hbone::config::parse_duration)]
    pub cert_ttl: Duration,
    /// Request bodies up to this many bytes are kept so that retries can resend them.
    #[arg(long, default_value_t = 64 * 1024)]
    pub retry_buffer: usize,
    /// How long in-flight requests may take to finish at shutdown.
    #[arg(long, default_value = "20s", value_parser = hbone::config::parse_duration)]
    pub drain_deadline: Duration,
    #[arg(long, default_value_t = 2)]
    pub worker_threads: usize,
}

/// Sets up logging (`WEFT_LOG`, default `info`), runs until SIGTERM or SIGINT, drains.
pub fn run(args: Args) -> anyhow::Result<()> {
    let filter = std::env::var("WEFT_LOG").unwrap_or_else(|_| "info".into());
    let filter: tracing_subscriber::filter::Targets =
        filter.parse().map_err(|e| anyhow::anyhow!("invalid WEFT_LOG {filter:?}: {e}"))?;
    tracing_subscriber::registry().with(filter).with(tracing_subscriber::fmt::layer().with_ansi(false)).init();
    if args.worker_threads == 0 || args.worker_threads > 256 {
        anyhow::bail!("--worker-threads must be between 1 and 256, got {}", args.worker_threads);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads)
        .thread_name("waypoint-worker")
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let bound = crate::app::build(args).await?;
        tracing::info!(hbone = %bound.hbone_addr, metrics = %bound.metrics_addr, "waypoint ready");
        hbone::drain::terminated().await?;
        let outcome = bound.shutdown().await;
        tracing::info!(?outcome, "waypoint stopped");
        anyhow::Ok(())
    })
}
