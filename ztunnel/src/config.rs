//! ztunnel's configuration: one typed struct, built from flags or environment variables
//! (names below), with defaults that say why.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Captured outbound TCP, inside each enrolled pod's network namespace (ARCHITECTURE §3).
pub const OUTBOUND_PORT: u16 = 15001;
/// Captured inbound plaintext TCP, inside each enrolled pod's network namespace.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// HBONE, inside each enrolled pod's network namespace.
pub const HBONE_PORT: u16 = 15008;

/// The packet mark on ztunnel's own sockets inside pod namespaces; the capture rules let
/// marked packets through untouched. "WF" in ASCII, chosen not to collide with Istio's 0x539
/// or Calico's and Cilium's high-bit marks.
pub const BYPASS_MARK: u32 = 0x5746;

/// The nftables table ztunnel owns inside each enrolled pod's namespace.
pub const NFT_TABLE: &str = "weft";

/// Where the cluster view comes from, as the settings chose it.
#[derive(Debug, Clone)]
pub enum Mode {
    Controller { address: String, ca: PathBuf, name: Option<String>, token_file: PathBuf },
    Local { file: PathBuf, ca_cert: PathBuf, ca_key: PathBuf, trust_bundle: Option<PathBuf> },
}

#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Name of the node this ztunnel serves: it captures workloads whose `node` is this.
    #[arg(long, env = "WEFT_NODE_NAME")]
    pub node: String,

    /// The controller to be programmed by, `<host>:<port>` (a DNS name or an IP address,
    /// IPv6 in brackets; its API port is 15012), resolved again at each reconnection. Either
    /// this or `--local-config`.
    #[arg(long, env = "WEFT_CONTROLLER", conflicts_with = "local_config")]
    pub controller: Option<String>,

    /// Root certificate(s) (PEM) the controller's TLS certificate must chain to; until the
    /// controller sends its trust bundle, also the bundle workload peers are verified with.
    #[arg(long, env = "WEFT_CONTROLLER_CA")]
    pub controller_ca: Option<PathBuf>,

    /// The name the controller's certificate must carry; defaults to the host of
    /// `--controller`.
    #[arg(long, env = "WEFT_CONTROLLER_NAME")]
    pub controller_name: Option<String>,

    /// A file holding this node's credential for the controller (a bearer token; on VMs and
    /// in the lab made with `weft-controller token --node <name>`; on Kubernetes a projected
    /// service-account token). Read again for each request, so a rotated token is used.
    #[arg(long, env = "WEFT_NODE_TOKEN_FILE")]
    pub node_token_file: Option<PathBuf>,

    /// Where ztunnel keeps what it must survive a restart with while the controller is
    /// unreachable: the last applied configuration and its workloads' certificates (keys
    /// mode 0600). Nothing is kept if unset.
    #[arg(long, env = "WEFT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// The cluster view as a YAML file (workloads, services, policies), reloaded on change.
    /// This is how ztunnel runs without a controller (development, VMs without a controller).
    #[arg(long, env = "WEFT_LOCAL_CONFIG")]
    pub local_config: Option<PathBuf>,

    /// With `--local-config`: the CA certificate (PEM) that signs this node's workload
    /// certificates; also the trust bundle unless `--trust-bundle` is given.
    #[arg(long, env = "WEFT_CA_CERT")]
    pub ca_cert: Option<PathBuf>,

    /// With `--local-config`: the CA private key (PEM, PKCS#8).
    #[arg(long, env = "WEFT_CA_KEY")]
    pub ca_key: Option<PathBuf>,

    /// With `--local-config`: the trust bundle (PEM, one or more roots); defaults to the CA
    /// certificate.
    #[arg(long, env = "WEFT_TRUST_BUNDLE")]
    pub trust_bundle: Option<PathBuf>,

    /// Lifetime of workload certificates (asked of the controller, which may cap it); they
    /// are renewed at half-life. 24 h, as Istio: a leaked key is useful for a day at most,
    /// and renewal traffic stays negligible.
    #[arg(long, env = "WEFT_CERT_TTL", value_parser = parse_duration, default_value = "24h")]
    pub cert_ttl: Duration,

    /// Admin server (config dump, log level), localhost only.
    #[arg(long, env = "WEFT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Prometheus metrics (`/metrics`).
    #[arg(long, env = "WEFT_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,

    /// Readiness (`/healthz/ready`).
    #[arg(long, env = "WEFT_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,

    /// How long in-flight connections may take to finish after SIGTERM. 10 s: within
    /// Kubernetes' default 30 s grace period, long enough for request/response traffic.
    #[arg(long, env = "WEFT_DRAIN_DEADLINE", value_parser = parse_duration, default_value = "10s")]
    pub drain_deadline: Duration,

    /// How often the local config file is checked for changes. 1 s: edits apply quickly,
    /// and a stat per second costs nothing.
    #[arg(long, env = "WEFT_RELOAD_INTERVAL", value_parser = parse_duration, default_value = "1s")]
    pub reload_interval: Duration,

    /// The node socket, where the container runtime (the CNI plugin) hands new pods over
    /// before they start (`docs/PROTOCOL.md`). Mode 0600.
    #[arg(long, env = "WEFT_NODE_SOCKET", default_value = meshapi::node::DEFAULT_SOCKET)]
    pub node_socket: PathBuf,

    /// How long a pod handed over by the runtime may wait for the controller to report it
    /// before its start is refused. 10 s: the controller pushes a new pod within a second
    /// or two; a pod it does not know after that is better retried by the runtime than
    /// started uncaptured.
    #[arg(long, env = "WEFT_POD_WAIT", value_parser = parse_duration, default_value = "10s")]
    pub pod_wait: Duration,

    /// Where the host's /proc is mounted (scanned to find pods' network namespaces).
    #[arg(long, env = "WEFT_PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,

    /// Worker threads of the proxy's runtime. 2 by default, as Istio's ztunnel: a node proxy
    /// must not take every core from the workloads it serves; raise it on busy nodes.
    #[arg(long, env = "WEFT_WORKER_THREADS", default_value_t = 2)]
    pub worker_threads: usize,

    /// The `nft` program that installs capture rules.
    #[arg(long, env = "WEFT_NFT", default_value = "nft")]
    pub nft: PathBuf,
}

impl Config {
    /// The mode the settings select, or an error naming the missing setting.
    pub fn mode(&self) -> Result<Mode, String> {
        match (&self.controller, &self.local_config) {
            (Some(address), None) => Ok(Mode::Controller {
                address: address.clone(),
                ca: self.controller_ca.clone().ok_or(
                    "--controller needs --controller-ca (WEFT_CONTROLLER_CA): the root its certificate chains to",
                )?,
                name: self.controller_name.clone(),
                token_file: self
                    .node_token_file
                    .clone()
                    .ok_or("--controller needs --node-token-file (WEFT_NODE_TOKEN_FILE): this node's credential")?,
            }),
            (None, Some(file)) => Ok(Mode::Local {
                file: file.clone(),
                ca_cert: self.ca_cert.clone().ok_or("--local-config needs --ca-cert (WEFT_CA_CERT)")?,
                ca_key: self.ca_key.clone().ok_or("--local-config needs --ca-key (WEFT_CA_KEY)")?,
                trust_bundle: self.trust_bundle.clone(),
            }),
            (None, None) => Err(
                "give --controller <host>:15012 (programmed by the controller) or --local-config <file> (no controller)"
                    .into(),
            ),
            (Some(_), Some(_)) => Err("--controller and --local-config exclude each other".into()),
        }
    }
}

pub use hbone::config::parse_duration;
