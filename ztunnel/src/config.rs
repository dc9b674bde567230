//! ztunnel's configuration: one typed struct, built from flags or environment variables
//! (names below), with defaults that say why.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use hbone::limits::{Limits, Rate};

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

/// The nftables table ztunnel owns in its own network namespace, the node's (the host
/// network on Kubernetes): the probe SNAT (`inpod::probes`).
pub const NODE_NFT_TABLE: &str = "weft-node";

/// The source address the node's own TCP connections to enrolled pods (kubelet's probes) are
/// given, so that the pods' capture rules can let them through to the app. Istio's: a
/// link-local address no pod or node holds, so it stands for "this pod's node" only.
pub const PROBE_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// The same for IPv6 pod addresses (Istio's too): a unique-local address no one holds.
pub const PROBE_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff);

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

    /// How often pods not yet enrolled are retried, while some are, and the local config file
    /// read regardless of inotify (which reports most changes at once). 1 s: a pod whose
    /// network namespace appears late is captured quickly, and a read per second, on a thread
    /// of its own, costs nothing.
    #[arg(long, env = "WEFT_RELOAD_INTERVAL", value_parser = parse_duration, default_value = "1s")]
    pub reload_interval: Duration,

    /// The node socket, where the container runtime (the CNI plugin) hands new pods over
    /// before they start (`docs/PROTOCOL.md`). Mode 0600.
    #[arg(long, env = "WEFT_NODE_SOCKET", default_value = meshapi::node::DEFAULT_SOCKET)]
    pub node_socket: PathBuf,

    /// The handoff socket, where a newer ztunnel on this node takes this one's sockets over
    /// (upgrades that reset no connection; `docs/PROTOCOL.md`, "The handoff socket"). Mode
    /// 0600. Default: beside the node socket, `<its name>-handoff.sock`
    /// (`/var/run/weft/ztunnel-handoff.sock`).
    #[arg(long, env = "WEFT_HANDOFF_SOCKET")]
    pub handoff_socket: Option<PathBuf>,

    /// After handing the node over to a newer ztunnel, how long this one keeps serving the
    /// connections it has before it cuts what is left and exits. 1 h: long enough for nearly
    /// every connection (requests, most streams, database sessions between pool recycles) to
    /// end by itself, short enough that a node runs two ztunnels for a bounded time (the old
    /// one's memory is its connections', a few KiB each). Set the pod's
    /// `terminationGracePeriodSeconds` above it (ARCHITECTURE §4.9). `0s` cuts at once.
    #[arg(long, env = "WEFT_UPGRADE_DRAIN", value_parser = parse_duration, default_value = "1h")]
    pub upgrade_drain: Duration,

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

    /// Let kubelet's probes through to enrolled pods (ARCHITECTURE §8.2): the node's own TCP
    /// connections to them are given the source 169.254.7.127 by a table in ztunnel's (the
    /// node's) network namespace, and the pods' capture rules pass that source to the app
    /// untouched. On by default: without it, HTTP, TCP and gRPC probes of STRICT pods (or of
    /// pods under an ALLOW policy) are refused, and those pods never become ready.
    #[arg(long, env = "WEFT_PROBE_SNAT", default_value_t = true, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub probe_snat: bool,

    /// TLS handshakes in progress on port 15008 across every pod before new HBONE connections
    /// are closed unread (refused as `handshake_limit`). 512: a slow-handshake flood holds at
    /// most this many sockets, about 15 MiB (ARCHITECTURE §5.1).
    #[arg(long, env = "WEFT_MAX_PENDING_HANDSHAKES", value_parser = at_least_one,
          default_value_t = hbone::config::DEFAULT_MAX_PENDING_HANDSHAKES)]
    pub max_pending_handshakes: usize,

    /// The same for one pod's port 15008. 128: clients handshake once per pooled connection,
    /// so even a busy pod sees a few at a time; an attacked pod leaves the rest to the others.
    #[arg(long, env = "WEFT_MAX_PENDING_HANDSHAKES_PER_POD", value_parser = at_least_one,
          default_value_t = hbone::config::DEFAULT_MAX_PENDING_HANDSHAKES_PER_LISTENER)]
    pub max_pending_handshakes_per_pod: usize,

    /// An HBONE connection with no stream for this long counts as idle. 10 s: clients send
    /// their first CONNECT right after the handshake; checked on this beat.
    #[arg(long, env = "WEFT_IDLE_AFTER", value_parser = parse_duration, default_value = "10s")]
    pub idle_after: Duration,

    /// Idle HBONE connections kept across every pod; one that becomes idle beyond this gets
    /// GOAWAY at once (refused as `idle_limit`) instead of after 5 minutes. 1024, about 40 MiB
    /// of connection buffers; a legitimate client pays one handshake when it comes back.
    #[arg(long, env = "WEFT_MAX_IDLE_CONNECTIONS", value_parser = at_least_one,
          default_value_t = hbone::config::DEFAULT_MAX_IDLE_CONNECTIONS)]
    pub max_idle_connections: usize,

    /// The same for one pod. 256: one connection each from 256 client pods that talked to
    /// it in the last minute.
    #[arg(long, env = "WEFT_MAX_IDLE_CONNECTIONS_PER_POD", value_parser = at_least_one,
          default_value_t = hbone::config::DEFAULT_MAX_IDLE_CONNECTIONS_PER_LISTENER)]
    pub max_idle_connections_per_pod: usize,

    /// Connects to the app in flight for one HBONE connection; more streams wait for one. 32:
    /// a local connect takes well under a millisecond, and a client resetting its streams
    /// cannot make ztunnel connect to the app more than this many times at once.
    #[arg(long, env = "WEFT_MAX_DIALS_PER_CONNECTION", value_parser = at_least_one,
          default_value_t = hbone::config::DEFAULT_MAX_DIALS_PER_CONNECTION)]
    pub max_dials_per_connection: usize,

    /// The same for one peer address across its HBONE connections (refused as `dial_limit`
    /// when none frees up before the CONNECT's 10 s deadline). 128, four connections' worth.
    #[arg(long, env = "WEFT_MAX_DIALS_PER_PEER", value_parser = at_least_one,
          default_value_t = hbone::config::DEFAULT_MAX_DIALS_PER_PEER)]
    pub max_dials_per_peer: usize,

    /// Premature stream resets (within 1 s of the CONNECT, or before its answer) that close an
    /// HBONE connection with GOAWAY(ENHANCE_YOUR_CALM) when they are also most of its streams
    /// in that time (refused as `reset_flood`). `<count>/<interval>`, 100/10s.
    #[arg(long, env = "WEFT_RESET_FLOOD", value_parser = parse_rate,
          default_value_t = hbone::config::DEFAULT_RESET_FLOOD)]
    pub reset_flood: Rate,

    /// Log lines of one kind written per interval (failed handshakes, refused tunnels, the
    /// access lines of connections that carried nothing, ...); the rest are counted in the
    /// metrics and summarized one interval after the first left out. `<count>/<interval>`, 10/1s.
    #[arg(long, env = "WEFT_LOG_LIMIT", value_parser = parse_rate,
          default_value_t = hbone::config::DEFAULT_LOG_LIMIT)]
    pub log_limit: Rate,
}

impl Config {
    /// The HBONE server's limits these settings choose; the rest are `hbone`'s defaults.
    pub fn hbone_limits(&self) -> Limits {
        Limits {
            pending_handshakes: self.max_pending_handshakes,
            pending_handshakes_per_listener: self.max_pending_handshakes_per_pod,
            idle_after: self.idle_after,
            idle_connections: self.max_idle_connections,
            idle_connections_per_listener: self.max_idle_connections_per_pod,
            dials_per_connection: self.max_dials_per_connection,
            dials_per_peer: self.max_dials_per_peer,
            reset_flood: self.reset_flood,
            log: self.log_limit,
            ..hbone::config::DEFAULT_LIMITS
        }
    }

    /// The handoff socket: `--handoff-socket`, else `<node socket's name>-handoff.sock` beside
    /// the node socket.
    pub fn handoff_socket(&self) -> PathBuf {
        if let Some(path) = &self.handoff_socket {
            return path.clone();
        }
        let stem = self.node_socket.file_stem().and_then(|s| s.to_str()).unwrap_or("ztunnel");
        self.node_socket.with_file_name(format!("{stem}-handoff.sock"))
    }

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

/// A count of at least one.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

/// `<count>/<interval>`, as `10/1s`.
fn parse_rate(s: &str) -> Result<Rate, String> {
    s.parse()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        let base = ["ztunnel", "--node", "n1"];
        Cli::try_parse_from(base.iter().chain(args)).map(|c| c.config)
    }

    #[test]
    fn probe_snat_is_on_unless_turned_off() {
        assert!(parse(&[]).unwrap().probe_snat);
        assert!(parse(&["--probe-snat"]).unwrap().probe_snat);
        assert!(!parse(&["--probe-snat=false"]).unwrap().probe_snat);
        assert!(!parse(&["--probe-snat", "false"]).unwrap().probe_snat);
        let err = parse(&["--probe-snat=maybe"]).expect_err("a value that is no boolean is refused").to_string();
        assert!(err.contains("--probe-snat"), "the error names the setting: {err}");
    }

    #[test]
    fn the_handoff_socket_sits_beside_the_node_socket() {
        assert_eq!(parse(&[]).unwrap().handoff_socket(), PathBuf::from("/var/run/weft/ztunnel-handoff.sock"));
        let lab = parse(&["--node-socket=/tmp/lab/node-1.sock"]).unwrap();
        assert_eq!(lab.handoff_socket(), PathBuf::from("/tmp/lab/node-1-handoff.sock"));
        let set = parse(&["--handoff-socket=/run/h.sock"]).unwrap();
        assert_eq!(set.handoff_socket(), PathBuf::from("/run/h.sock"));
        assert_eq!(parse(&[]).unwrap().upgrade_drain, Duration::from_secs(3600));
        let err = parse(&["--upgrade-drain=forever"]).err().unwrap().to_string();
        assert!(err.contains("--upgrade-drain"), "the error names the setting: {err}");
    }

    /// The flags' defaults are the library's: one number, written once.
    #[test]
    fn limit_defaults_are_hbones() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.hbone_limits(), hbone::config::DEFAULT_LIMITS);
    }

    #[test]
    fn limits_are_set_and_checked() {
        let config = parse(&[
            "--max-pending-handshakes=7",
            "--max-pending-handshakes-per-pod=3",
            "--idle-after=2s",
            "--max-idle-connections=9",
            "--max-idle-connections-per-pod=4",
            "--max-dials-per-connection=5",
            "--max-dials-per-peer=6",
            "--reset-flood=50/5s",
            "--log-limit=2/10s",
        ])
        .unwrap();
        let limits = config.hbone_limits();
        assert_eq!((limits.pending_handshakes, limits.pending_handshakes_per_listener), (7, 3));
        assert_eq!((limits.idle_connections, limits.idle_connections_per_listener), (9, 4));
        assert_eq!(limits.idle_after, Duration::from_secs(2));
        assert_eq!((limits.dials_per_connection, limits.dials_per_peer), (5, 6));
        assert_eq!(limits.reset_flood, Rate::new(50, Duration::from_secs(5)).unwrap());
        assert_eq!(limits.log, Rate::new(2, Duration::from_secs(10)).unwrap());
        for bad in ["--max-dials-per-peer=0", "--log-limit=10", "--log-limit=0/1s", "--reset-flood=many"] {
            let err = parse(&[bad]).err().unwrap_or_else(|| panic!("{bad} accepted")).to_string();
            let flag = bad.split('=').next().unwrap();
            assert!(err.contains(flag), "{bad}: the error names the setting: {err}");
        }
    }
}
