//! The command line of the controller, shared by the `weft-controller` binary and
//! `weft controller`.

use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

use crate::config::Config;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run the controller.
    Run(Box<Config>),
    /// Print the credential of a node (a bearer token its ztunnel presents with
    /// `--node-token-file`), made with the key in the state directory.
    Token {
        /// The node's name, as its ztunnel is started with (`--node`).
        #[arg(long)]
        node: String,
        /// The controller's state directory (`run --state-dir`).
        #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft/controller")]
        state_dir: std::path::PathBuf,
    },
}

/// Runs a command: the controller until SIGTERM or SIGINT, or a tool.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Token { node, state_dir } => {
            std::fs::create_dir_all(&state_dir)?;
            let tokens = crate::auth::NodeTokens::open(&state_dir)?;
            println!("{}", tokens.issue(&crate::auth::NodeName::new(&node)?));
            Ok(())
        }
        Command::Run(config) => {
            let filter: Targets = std::env::var("WEFT_LOG")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
            tracing_subscriber::registry().with(filter).with(tracing_subscriber::fmt::layer().with_ansi(false)).init();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("controller-worker")
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let bound = crate::app::build(*config).await?;
                tracing::info!(api = %bound.api_addr, admin = %bound.admin_addr, metrics = %bound.metrics_addr, "controller serving");
                hbone::drain::terminated().await?;
                bound.shutdown().await;
                tracing::info!("controller stopped");
                anyhow::Ok(())
            })
        }
    }
}
