//! The controller's configuration: one typed struct, built from flags or environment
//! variables, with defaults that say why.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The watch and certificate APIs (ARCHITECTURE §3).
pub const API_PORT: u16 = 15012;

#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// A directory of Kubernetes YAML objects (Namespaces, Pods, Services,
    /// AuthorizationPolicies, Gateways, HTTPRoutes), read recursively and watched for changes:
    /// the cluster, on machines without Kubernetes. Without it, the controller watches the
    /// Kubernetes API (in a pod: its service account; elsewhere: KUBECONFIG or
    /// ~/.kube/config) and also accepts ztunnels' service-account tokens.
    #[arg(long, env = "WEFT_SOURCE_DIR")]
    pub source_dir: Option<PathBuf>,

    /// Where the controller keeps its CA root (if it generated one) and the key of node
    /// tokens. Back it up: a lost root means re-issuing every certificate.
    #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft/controller")]
    pub state_dir: PathBuf,

    /// A CA certificate (PEM) to sign with instead of a generated root: the operator's root
    /// or intermediate. Needs `--ca-key`.
    #[arg(long, env = "WEFT_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,

    /// The private key (PEM, PKCS#8) of `--ca-cert`.
    #[arg(long, env = "WEFT_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,

    /// For an intermediate `--ca-cert`: the certificates above it (PEM), up to the root.
    #[arg(long, env = "WEFT_CA_CHAIN")]
    pub ca_chain: Option<PathBuf>,

    /// On Kubernetes: keep the CA in this Secret of the controller's namespace, shared by the
    /// replicas. An existing Secret (keys `ca.crt`, `ca.key`, and `ca-chain.crt` for an
    /// intermediate; `extra-roots.pem` for more roots in the trust bundle) is used as it is: a
    /// plug-in CA; without one, the first replica generates a root and creates the Secret.
    /// Read again every `--ca-secret-refresh` for a rotation.
    #[arg(long, env = "WEFT_CA_SECRET", conflicts_with_all = ["ca_cert", "source_dir"])]
    pub ca_secret: Option<String>,

    /// How often the CA Secret is read again, for a rotation by the operator.
    #[arg(long, env = "WEFT_CA_SECRET_REFRESH", value_parser = parse_duration, default_value = "30s")]
    pub ca_secret_refresh: Duration,

    /// The controller's own namespace, where its Lease, its CA Secret and the nodes'
    /// ConfigMap `weft-ca-root` are (the downward API's `POD_NAMESPACE`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "weft-system")]
    pub namespace: String,

    /// More roots (PEM) proxies must trust besides the signing one: during a root rotation,
    /// the incoming or the outgoing root. Re-read when it changes.
    #[arg(long, env = "WEFT_EXTRA_ROOTS")]
    pub extra_roots: Option<PathBuf>,

    /// The SPIFFE trust domain of every identity this controller signs.
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = spiffe::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Lifetime of workload certificates when a proxy does not ask for one. 24 h, as Istio:
    /// a leaked key is useful for a day at most, and renewals stay negligible.
    #[arg(long, env = "WEFT_CERT_TTL", value_parser = parse_duration, default_value = "24h")]
    pub cert_ttl: Duration,

    /// The shortest lifetime granted, whatever a proxy asks: 10 min, so a misconfigured proxy
    /// cannot make the CA sign on every connection. Lower it only to test rotation.
    #[arg(long, env = "WEFT_MIN_CERT_TTL", value_parser = parse_duration, default_value = "10m")]
    pub min_cert_ttl: Duration,

    /// The longest lifetime granted: 7 days, so a leaked key cannot outlive a week even if a
    /// proxy asks for more.
    #[arg(long, env = "WEFT_MAX_CERT_TTL", value_parser = parse_duration, default_value = "7d")]
    pub max_cert_ttl: Duration,

    /// Names (DNS names or IP addresses) the API's certificate carries, so that clients
    /// verifying it by name (ztunnel, curl) accept it. Repeat or separate with commas.
    #[arg(
        long = "server-name",
        env = "WEFT_SERVER_NAMES",
        value_delimiter = ',',
        default_value = "localhost,127.0.0.1"
    )]
    pub server_names: Vec<String>,

    /// The watch and certificate APIs (TLS).
    #[arg(long, env = "WEFT_API_ADDR", default_value = "0.0.0.0:15012")]
    pub api_addr: SocketAddr,

    /// Admin pages (`/status`, `/resources`), localhost only by default.
    #[arg(long, env = "WEFT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Prometheus metrics (`/metrics`).
    #[arg(long, env = "WEFT_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,

    /// Readiness (`/healthz/ready`).
    #[arg(long, env = "WEFT_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,

    /// How often the source directory is checked for changes. 1 s: edits reach proxies
    /// quickly, and a stat per file per second costs nothing. (The Kubernetes API pushes its
    /// changes: they are translated as they arrive.)
    #[arg(long, env = "WEFT_POLL_INTERVAL", value_parser = parse_duration, default_value = "1s")]
    pub poll_interval: Duration,

    /// Heartbeat on idle watch streams: 15 s, so a proxy notices a silently dead stream
    /// within three (45 s) and resubscribes.
    #[arg(long, env = "WEFT_HEARTBEAT", value_parser = parse_duration, default_value = "15s")]
    pub heartbeat: Duration,

    /// Bytes of recent deltas kept so that a proxy that reconnects gets only what it missed.
    /// 64 MiB holds hundreds of thousands of one-pod changes; older subscribers get a
    /// snapshot.
    #[arg(long, env = "WEFT_HISTORY_BYTES", default_value_t = 64 << 20)]
    pub history_bytes: usize,

    /// The waypoints the controller deploys when it watches the Kubernetes API.
    #[command(flatten)]
    pub waypoints: WaypointSettings,

    /// Leader election between replicas, when the controller watches the Kubernetes API.
    #[command(flatten)]
    pub election: ElectionSettings,
}

/// Leader election (ARCHITECTURE §9.7): every replica reads and serves; the one holding the
/// Lease `weft-controller` writes (waypoints' objects, status conditions).
#[derive(Debug, Clone, clap::Args)]
pub struct ElectionSettings {
    /// Elect a leader among the replicas. Off: this replica writes as if it led (run one
    /// replica only). Not used with `--source-dir`, which writes nothing.
    #[arg(long = "leader-elect", env = "WEFT_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub enabled: bool,

    /// This replica's name in the Lease (the downward API's `POD_NAME`; else the host name).
    /// A suffix unique to each start is added.
    #[arg(long = "leader-elect-identity", env = "POD_NAME")]
    pub identity: Option<String>,

    /// How long a leader that stopped renewing stays leader for the others: 15 s, as
    /// Kubernetes' own controllers. A crashed leader is replaced within this plus the retry
    /// period.
    #[arg(long = "leader-elect-lease-duration", env = "WEFT_LEADER_ELECT_LEASE_DURATION",
          value_parser = parse_duration, default_value = "15s")]
    pub lease_duration: Duration,

    /// How long a leader keeps writing without a successful renewal: 10 s, below the lease
    /// duration so that it stops before another can take over.
    #[arg(long = "leader-elect-renew-deadline", env = "WEFT_LEADER_ELECT_RENEW_DEADLINE",
          value_parser = parse_duration, default_value = "10s")]
    pub renew_deadline: Duration,

    /// How often the leader renews and the others try: 2 s.
    #[arg(long = "leader-elect-retry-period", env = "WEFT_LEADER_ELECT_RETRY_PERIOD",
          value_parser = parse_duration, default_value = "2s")]
    pub retry_period: Duration,
}

impl Default for ElectionSettings {
    fn default() -> ElectionSettings {
        ElectionSettings {
            enabled: true,
            identity: None,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// The image of the waypoints the controller deploys: the tag `docker/waypoint.Dockerfile`
/// is built with and `manifests/` names, so an install built as `manifests/README.md` says
/// works without the flag.
pub const DEFAULT_WAYPOINT_IMAGE: &str = "weft-waypoint:dev";

/// The controller's API as a waypoint pod reaches it: the Service of `manifests/controller.yaml`,
/// by the name the controller's certificate carries there (its `--server-name`).
pub const DEFAULT_WAYPOINT_CONTROLLER_ADDRESS: &str = "weft-controller.weft-system.svc:15012";

/// What the controller puts in the Deployment of each waypoint (a Gateway of class
/// `weft-waypoint`) it deploys on Kubernetes (`controller::deploy`, ARCHITECTURE §9.6). The
/// directory source deploys nothing and ignores these.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct WaypointSettings {
    /// The waypoint's container image (`docker/waypoint.Dockerfile`). Kustomize's `images`
    /// does not reach a flag: point this at your registry too.
    #[arg(
        long = "waypoint-image",
        env = "WEFT_WAYPOINT_IMAGE",
        default_value = DEFAULT_WAYPOINT_IMAGE,
        value_parser = parse_image
    )]
    pub image: String,

    /// The controller's API as waypoints reach it, `<host>:<port>` (their `--controller`).
    /// They verify the controller's certificate for the host, so it must be one of the
    /// `--server-name`s.
    #[arg(
        long = "waypoint-controller-address",
        env = "WEFT_WAYPOINT_CONTROLLER_ADDRESS",
        default_value = DEFAULT_WAYPOINT_CONTROLLER_ADDRESS,
        value_parser = parse_host_port
    )]
    pub controller_address: String,
}

impl Default for WaypointSettings {
    fn default() -> WaypointSettings {
        WaypointSettings {
            image: DEFAULT_WAYPOINT_IMAGE.to_owned(),
            controller_address: DEFAULT_WAYPOINT_CONTROLLER_ADDRESS.to_owned(),
        }
    }
}

impl WaypointSettings {
    /// The host of [`controller_address`](Self::controller_address): the name waypoints
    /// verify the controller's certificate for.
    pub fn controller_host(&self) -> &str {
        host_of(&self.controller_address)
    }
}

/// Where the cluster's objects come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSetting {
    /// A directory of YAML files (`--source-dir`).
    Dir(PathBuf),
    /// The Kubernetes API.
    Kubernetes,
}

impl std::fmt::Display for SourceSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceSetting::Dir(dir) => write!(f, "directory {}", dir.display()),
            SourceSetting::Kubernetes => f.write_str("Kubernetes API"),
        }
    }
}

impl Config {
    /// Where the cluster's objects come from: the directory if one is given, else the
    /// Kubernetes API.
    pub fn source(&self) -> SourceSetting {
        match &self.source_dir {
            Some(dir) => SourceSetting::Dir(dir.clone()),
            None => SourceSetting::Kubernetes,
        }
    }

    /// The CA's settings.
    pub fn authority(&self) -> crate::ca::AuthorityConfig {
        let root = match (&self.ca_cert, &self.ca_key) {
            (Some(cert), Some(key)) => {
                crate::ca::RootSource::Files { cert: cert.clone(), key: key.clone(), chain: self.ca_chain.clone() }
            }
            _ => crate::ca::RootSource::Generated { state_dir: self.state_dir.clone() },
        };
        let mut config = crate::ca::AuthorityConfig::new(self.trust_domain.clone(), root);
        config.extra_roots = self.extra_roots.clone();
        config.cert_ttl = self.cert_ttl;
        config.min_cert_ttl = self.min_cert_ttl;
        config.max_cert_ttl = self.max_cert_ttl;
        config
    }
}

pub use hbone::config::parse_duration;

/// An image reference as a container's `image` takes it: not empty, no white space.
pub fn parse_image(value: &str) -> Result<String, String> {
    if value.is_empty() || value.chars().any(char::is_whitespace) {
        return Err(format!("{value:?} is not an image reference (registry/name:tag, without spaces)"));
    }
    Ok(value.to_owned())
}

/// `<host>:<port>`: a DNS name or an address (an IPv6 one in brackets) and a port from 1 to
/// 65535.
pub fn parse_host_port(value: &str) -> Result<String, String> {
    let usage = "expected <host>:<port>, such as weft-controller.weft-system.svc:15012";
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err(format!("{value:?}: no port; {usage}"));
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(format!("{value:?}: {port:?} is not a port (1 to 65535); {usage}")),
    }
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    let valid = match bare {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host.len() <= 253
                && host.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                })
        }
    };
    if !valid {
        return Err(format!("{value:?}: {host:?} is not a DNS name or an IP address; {usage}"));
    }
    Ok(value.to_owned())
}

/// The host of a `<host>:<port>` that [`parse_host_port`] accepted, without IPv6 brackets.
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
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

    #[test]
    fn waypoint_settings_default_to_the_manifests_and_are_checked() {
        let cli = Cli::try_parse_from(["weft-controller"]).unwrap();
        assert_eq!(cli.config.waypoints, WaypointSettings::default());
        assert_eq!(cli.config.waypoints.image, "weft-waypoint:dev");
        assert_eq!(cli.config.waypoints.controller_address, "weft-controller.weft-system.svc:15012");
        assert_eq!(cli.config.waypoints.controller_host(), "weft-controller.weft-system.svc");

        let cli = Cli::try_parse_from([
            "weft-controller",
            "--waypoint-image=registry.example.com/weft/waypoint:v0.1.0",
            "--waypoint-controller-address=[fd00::1]:15012",
        ])
        .unwrap();
        assert_eq!(cli.config.waypoints.image, "registry.example.com/weft/waypoint:v0.1.0");
        assert_eq!(cli.config.waypoints.controller_host(), "fd00::1");

        for (flag, fault) in [
            ("--waypoint-image=", "not an image reference"),
            ("--waypoint-image=weft waypoint", "not an image reference"),
            ("--waypoint-controller-address=weft-controller", "no port"),
            ("--waypoint-controller-address=weft-controller:0", "is not a port"),
            ("--waypoint-controller-address=weft-controller:http", "is not a port"),
            ("--waypoint-controller-address=:15012", "is not a DNS name"),
            ("--waypoint-controller-address=weft_controller:15012", "is not a DNS name"),
            ("--waypoint-controller-address=[weft]:15012", "is not a DNS name"),
        ] {
            let err = Cli::try_parse_from(["weft-controller", flag]).err().unwrap_or_else(|| panic!("{flag} accepted"));
            assert!(err.to_string().contains(fault), "{flag}: {err}");
        }
    }
}
