//! The command line of the controller, shared by the `weft-controller` binary and
//! `weft controller`.

use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

use crate::auth::{Caller, NodeName, ServiceAccount, Tokens};
use crate::config::Config;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run the controller.
    Run(Box<Config>),
    /// Print a controller token: a node's (the bearer token its ztunnel presents with
    /// `--node-token-file`) or a service account's (a waypoint's), made with the key in the
    /// state directory.
    #[command(group(clap::ArgGroup::new("caller").required(true).args(["node", "service_account"])))]
    Token {
        /// The node's name, as its ztunnel is started with (`--node`). Whoever holds this
        /// token may obtain the certificates of every workload scheduled on the node.
        #[arg(long)]
        node: Option<String>,
        /// A service account, `<namespace>/<name>`: the token of a waypoint run as it (the
        /// Gateway's name). It obtains only that service account's identity, while a waypoint
        /// of that namespace and service account is in the model.
        #[arg(long, value_name = "NAMESPACE/NAME")]
        service_account: Option<String>,
        /// The controller's state directory (`run --state-dir`).
        #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft/controller")]
        state_dir: std::path::PathBuf,
    },
}

/// Runs a command: the controller until SIGTERM or SIGINT, or a tool.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Token { node, service_account, state_dir } => {
            // The argument group lets exactly one through.
            let caller = match (node, service_account) {
                (Some(node), _) => Caller::Node(NodeName::new(&node)?),
                (None, Some(account)) => Caller::ServiceAccount(ServiceAccount::parse(&account)?),
                (None, None) => anyhow::bail!("name the token's holder: --node or --service-account"),
            };
            std::fs::create_dir_all(&state_dir)?;
            println!("{}", Tokens::open(&state_dir)?.issue(&caller));
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
