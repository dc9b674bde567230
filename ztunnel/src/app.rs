//! Wiring: `build(config)` takes the node over from a running ztunnel if one offers its
//! sockets (`handoff`), else binds the node's listeners; loads the CA, trust bundle and local
//! config, enrolls the local pods, starts the admin/metrics/readiness servers and the reload
//! and renewal loops, and returns a [`Bound`] with the addresses it bound and a shutdown handle.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use hbone::ca::Ca;
use hbone::limits::Budget;
use hbone::{TrustBundle, TrustStore, drain};
use http::{Method, StatusCode};
use meshapi::watch::Change;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::admin::{self, Call, Reply, Routes};
use crate::certs::{CertManager, Issuer};
use crate::config::{Config, Mode};
use crate::handoff::{self, Giver, Held, NodeListeners, NodeRole, Phase, Received, ServerRole, Takeover};
use crate::inpod::Netns;
use crate::manager::Manager;
use crate::metrics::Metrics;
use crate::proxy::{Balancer, PodDialer, PodRegistry, Proxy};
use crate::state::StateStore;
use crate::{control, local};

/// Changes the log filter at run time (`/logging?level=...`); set by `main`.
pub type LogControl = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// A running ztunnel.
pub struct Bound {
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub proxy: Arc<Proxy>,
    manager: Arc<Manager>,
    ready: Arc<AtomicBool>,
    servers: drain::Trigger,
    /// Config reload and certificate renewal.
    loops: Vec<JoinHandle<()>>,
    /// The node socket and the HTTP servers' listeners (given away in a handoff).
    node: Arc<tokio::sync::Mutex<NodeListeners>>,
    /// Whether a handoff is in progress or committed.
    phase: Arc<tokio::sync::Mutex<Phase>>,
    handed_over: Arc<tokio::sync::Notify>,
    upgrade_drain: Duration,
}

pub async fn build(config: Config, log_control: Option<LogControl>) -> anyhow::Result<Bound> {
    // Record ztunnel's own namespace before any thread enters a pod's.
    Netns::host().context("cannot open ztunnel's own network namespace")?;

    let mode = config.mode().map_err(anyhow::Error::msg)?;
    let state = StateStore::default();
    let metrics = Arc::new(Metrics::new().with_log_limit(config.log_limit));

    // Where the cluster view and certificates come from.
    let (issuer, bundle, plane) = match &mode {
        Mode::Local { file, ca_cert, ca_key, trust_bundle } => {
            let ca = Ca::from_pem(&read(ca_cert, "CA certificate (--ca-cert)")?, &read(ca_key, "CA key (--ca-key)")?)
                .with_context(|| format!("loading the CA from {} and {}", ca_cert.display(), ca_key.display()))?;
            let (snapshot, applied_bytes) = local::load(file)?;
            let bundle_path = trust_bundle.clone().unwrap_or_else(|| ca_cert.clone());
            let bundle = TrustBundle::from_pem(&read(&bundle_path, "trust bundle")?)
                .and_then(|b| b.with_trust_domain(&snapshot.trust_domain))
                .with_context(|| format!("loading the trust bundle from {}", bundle_path.display()))?;
            state.replace(snapshot);
            metrics.config_applied.inc();
            (Issuer::Local(Box::new(ca)), bundle, Plane::Local { file: file.clone(), applied_bytes })
        }
        Mode::Controller { address, ca, name, token_file } => {
            let roots = read(ca, "controller CA (--controller-ca)")?;
            let client = Arc::new(control::client::Client::new(controller_endpoint(
                address,
                &roots,
                name.as_deref(),
                token_file,
                meshapi::watch::Subscriber::Node(config.node.clone()),
            )?)?);
            // Static stability: start from what was applied last, if it was kept.
            let config_file = config.state_dir.as_ref().map(|d| d.join("config.json"));
            let applied = match config_file.as_deref().map(control::persist::load).transpose() {
                Ok(applied) => applied.flatten().unwrap_or_default(),
                Err(e) => {
                    warn!(error = %e, "starting without the saved configuration");
                    Default::default()
                }
            };
            let saved = applied.decoded();
            if !saved.is_empty() {
                info!(
                    resources = saved.len(),
                    version = applied.cursor.version,
                    "starting from the saved configuration"
                );
                state.apply(saved.into_iter().map(Change::Upsert));
            }
            // The saved bundle if there is one, else the controller's roots.
            let bundle = match state.load().trust_bundle() {
                Some(b) => TrustBundle::from_pem(&b.roots.concat()).and_then(|t| t.with_trust_domain(&b.trust_domain)),
                None => TrustBundle::from_pem(&roots),
            }
            .with_context(|| format!("loading the trust bundle from {}", ca.display()))?;
            client.trust_also(bundle.roots());
            (Issuer::Controller(client.clone()), bundle, Plane::Controller { client, applied, config_file })
        }
    };
    let trust = TrustStore::new(bundle);

    // A ztunnel already serving this node hands its sockets over, if it can; if it cannot, this
    // one binds them once it has exited.
    let handoff_path = config.handoff_socket();
    let (takeover, mut received) = match Takeover::start(&handoff_path).await {
        Ok(Some((takeover, received))) => {
            info!(
                pid = takeover.pid,
                version = takeover.version,
                pods = received.pods.len(),
                "the running ztunnel handed its sockets over; taking the node over"
            );
            (Some(takeover), received)
        }
        Ok(None) => (None, Received::default()),
        Err(e) => {
            warn!(error = %e, socket = %handoff_path.display(),
                "cannot take the node over from the running ztunnel; starting normally once it has exited");
            (None, Received::default())
        }
    };
    // The node's listeners: the HTTP servers first (which waits for a ztunnel that would not
    // hand over to exit), then the sockets whose files a fresh start replaces.
    let admin_l = server_listener(&mut received, ServerRole::Admin, config.admin_addr).await?;
    let metrics_l = server_listener(&mut received, ServerRole::Metrics, config.metrics_addr).await?;
    let ready_l = server_listener(&mut received, ServerRole::Readiness, config.readiness_addr).await?;
    let node_socket = match received.node_socket.take() {
        Some(fd) => fd,
        None => OwnedFd::from(crate::runtime::bind(&config.node_socket)?.into_std()?),
    };
    let handoff_l = match received.handoff_socket.take() {
        Some(fd) => handoff::HandoffListener::from_fd(fd)?,
        None => handoff::HandoffListener::bind(&handoff_path)?,
    };

    let pods = Arc::new(PodRegistry::default());
    let hbone_config = hbone_config(&config, &state, &metrics);
    let client = hbone::Client::with_dialer(hbone_config.clone(), trust.clone(), Arc::new(PodDialer(pods.clone())));
    let certs = CertManager::new(issuer, config.cert_ttl, config.state_dir.as_ref().map(|d| d.join("certs")));
    let kept = certs.load_kept();
    if kept > 0 {
        info!(certificates = kept, "certificates loaded from the node");
    }
    let proxy = Arc::new(Proxy {
        node: config.node.clone(),
        state: state.clone(),
        certs,
        trust,
        client,
        pods,
        metrics: metrics.clone(),
        balancer: Balancer::default(),
        hbone: hbone_config,
    });
    let manager = Arc::new(Manager::new(
        proxy.clone(),
        config.proc_root.clone(),
        config.nft.clone(),
        config.drain_deadline,
        config.probe_snat,
    ));
    if takeover.is_some() {
        manager.adopt(std::mem::take(&mut received.pods)).context("taking the handed-over pods")?;
    }

    let mut loops = Vec::new();
    match plane {
        Plane::Local { file, applied_bytes } => {
            manager.reconcile().await;
            let versions = local::watch(file.clone(), applied_bytes, config.reload_interval)
                .context("starting the config file's watcher")?;
            loops.push(tokio::spawn(reload_local(file, versions, state.clone(), manager.clone(), metrics.clone())));
        }
        Plane::Controller { client, applied, config_file } => {
            let had_config = applied.cursor.is_set();
            if had_config {
                // Serve the saved configuration at once; the watcher catches up.
                manager.reconcile().await;
            }
            let (synced_tx, mut synced) = tokio::sync::watch::channel(false);
            let persist = config_file.map(control::persist::ConfigFile::new);
            let watcher = control::Watcher::new(client, proxy.clone(), manager.clone(), persist, applied, synced_tx);
            loops.push(tokio::spawn(watcher.run()));
            if !had_config {
                // Nothing to serve yet: wait (bounded) for the controller's first snapshot.
                let wait = tokio::time::timeout(INITIAL_SYNC, synced.wait_for(|s| *s)).await;
                if wait.is_err() {
                    warn!(waited = ?INITIAL_SYNC, "no configuration from the controller yet; serving nothing until it arrives");
                }
            }
        }
    }
    // Pods whose enrollment failed (not started yet) are retried on this beat, from the first
    // reconcile that leaves some pending until none is. No timer runs while every pod is
    // enrolled: a periodic wake-up on the workers that carry the traffic moves that work from
    // one worker thread to the other, and on a small node each move costs messages a wake-up
    // across CPUs (docs/BENCHMARKS.md).
    let (retry_manager, interval) = (manager.clone(), config.reload_interval);
    loops.push(tokio::spawn(async move {
        loop {
            retry_manager.retry_wanted().await;
            while retry_manager.pending() > 0 {
                tokio::time::sleep(interval).await;
                retry_manager.reconcile().await;
            }
        }
    }));
    let pending = manager.pending();
    info!(node = %config.node, pending, "initial enrollment done");

    let ready = Arc::new(AtomicBool::new(true));
    let (servers, watch) = drain::channel();
    let (admin_addr, metrics_addr, readiness_addr) = (admin_l.0, metrics_l.0, ready_l.0);
    let mut node = NodeListeners::default();
    let (wait, runtime_manager) = (config.pod_wait, manager.clone());
    node.push(
        NodeRole::NodeSocket,
        Held::new(
            node_socket,
            Box::new(move |fd| {
                let listener = std::os::unix::net::UnixListener::from(fd);
                listener.set_nonblocking(true)?;
                let listener = tokio::net::UnixListener::from_std(listener)?;
                Ok(tokio::spawn(crate::runtime::serve(listener, runtime_manager.clone(), wait)))
            }),
        ),
    );
    // The servers stop on `servers`' drain; the loops below are aborted at shutdown.
    let routes = [
        (ServerRole::Admin, admin_l, admin_routes(proxy.clone(), manager.clone(), log_control)),
        (ServerRole::Metrics, metrics_l, metrics_routes(metrics.clone())),
        (ServerRole::Readiness, ready_l, admin::readiness_routes(ready.clone())),
    ];
    for (role, (addr, socket), routes) in routes {
        let watch = watch.clone();
        let start: handoff::StartAccepting = Box::new(move |fd| {
            let listener = std::net::TcpListener::from(fd);
            listener.set_nonblocking(true)?;
            Ok(tokio::spawn(admin::serve(TcpListener::from_std(listener)?, routes.clone(), watch.clone())))
        });
        node.push(NodeRole::Server(role, addr), Held::new(socket, start));
    }
    drop(watch);
    let node = Arc::new(tokio::sync::Mutex::new(node));

    if let Some(takeover) = takeover {
        let old = takeover.pid;
        takeover
            .complete(&manager, &node, &metrics, config.reload_interval)
            .await
            .with_context(|| format!("taking the node over from the ztunnel of pid {old}"))?;
    } else {
        node.lock().await.resume();
    }
    let (phase, handed_over) =
        (Arc::new(tokio::sync::Mutex::new(Phase::Serving)), Arc::new(tokio::sync::Notify::new()));
    let giver = Giver {
        manager: manager.clone(),
        node: node.clone(),
        metrics: metrics.clone(),
        phase: phase.clone(),
        handed_over: handed_over.clone(),
    };
    loops.push(tokio::spawn(handoff::serve(handoff_l, giver)));

    // Renew certificates at half-life.
    let renew_proxy = proxy.clone();
    let every = (config.cert_ttl / 8).clamp(Duration::from_secs(1), Duration::from_secs(300));
    loops.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            renew_proxy.certs.renew_due().await;
        }
    }));

    // Summaries of the log lines the limit left out, one interval after the first of them
    // (not on a timer: see the retry loop above).
    let (budget, access) = (proxy.hbone.budget.clone(), metrics.clone());
    let every = config.log_limit.per;
    loops.push(tokio::spawn(async move {
        loop {
            hbone::limits::lines_suppressed().await;
            tokio::time::sleep(every).await;
            budget.flush_logs();
            access.flush_access_log();
        }
    }));

    Ok(Bound {
        admin_addr,
        metrics_addr,
        readiness_addr,
        proxy,
        manager,
        ready,
        servers,
        loops,
        node,
        phase,
        handed_over,
        upgrade_drain: config.upgrade_drain,
    })
}

/// One HTTP server's listening socket: the one handed over for it, else one bound at `addr`,
/// waiting while another process holds the address (a ztunnel that could not hand over, or
/// one of an older version, still running: it exits once Kubernetes replaces it).
async fn server_listener(
    received: &mut Received,
    role: ServerRole,
    addr: SocketAddr,
) -> anyhow::Result<(SocketAddr, OwnedFd)> {
    if let Some((was, fd)) = received.servers.remove(&role) {
        // Port 0 asks for any port: the one the running ztunnel was given will do.
        if was == addr || (addr.port() == 0 && was.ip() == addr.ip()) {
            return Ok((was, fd));
        }
        warn!(?role, was = %was, now = %addr, "the handed-over server listened elsewhere; binding the configured address");
    }
    let started = tokio::time::Instant::now();
    let mut told: Option<tokio::time::Instant> = None;
    loop {
        match std::net::TcpListener::bind(addr) {
            Ok(listener) => {
                let addr = listener.local_addr()?;
                return Ok((addr, OwnedFd::from(listener)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                // Said at once, then every 10 s.
                if told.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    warn!(%addr, ?role, waited = ?started.elapsed(),
                        "the address is in use (by a ztunnel that did not hand over?); waiting for it to be free");
                    told = Some(tokio::time::Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("binding the {role:?} server on {addr}")),
        }
    }
}

/// The HBONE settings: the library's, with the limits of `config`, and a budget shared by
/// every pod's server (each is built from a clone) that counts the server's own refusals in
/// `weft_connections_refused_total`, under the workload of the pod whose port was reached.
fn hbone_config(config: &Config, state: &StateStore, metrics: &Arc<Metrics>) -> hbone::Config {
    let (state, metrics) = (state.clone(), metrics.clone());
    let budget = Budget::with_observer(move |refusal: &hbone::limits::Refusal| {
        let pod = state.load().peer_by_ip(refusal.local.ip());
        metrics.refuse(refusal.cause.into(), &pod.workload);
    });
    hbone::Config { limits: config.hbone_limits(), budget, ..hbone::Config::default() }
}

impl Bound {
    /// Resolves once a newer ztunnel has taken the node over: then [`Bound::shutdown`].
    pub async fn handed_over(&self) {
        self.handed_over.notified().await
    }

    /// Graceful shutdown: readiness turns 503, pods' listeners stop accepting, connections
    /// finish within the drain deadline (or are cut), then the servers stop.
    ///
    /// After a handoff (or a SIGTERM during one that then commits), the new ztunnel accepts
    /// everywhere already: the connections held here finish within `--upgrade-drain`, and
    /// their count is reported to the new ztunnel meanwhile.
    pub async fn shutdown(self) -> drain::Outcome {
        // Waits for a handoff in progress to commit or fail; none starts after this.
        let phase = std::mem::replace(&mut *self.phase.lock().await, Phase::Closing);
        self.ready.store(false, Ordering::Release);
        for l in &self.loops {
            l.abort();
        }
        let outcome = match phase {
            Phase::HandedOver(handover) => {
                info!(deadline = ?self.upgrade_drain, connections = self.proxy.metrics.open_connections(),
                    "handed over: draining the connections held here");
                handover.drain(self.upgrade_drain, &self.proxy.metrics).await
            }
            Phase::Serving | Phase::Closing => {
                info!("draining");
                self.manager.shutdown().await
            }
        };
        // The accept loops hold the servers' drain watch.
        self.node.lock().await.close();
        self.servers.drain(Duration::from_secs(1)).await;
        self.proxy.hbone.budget.flush_logs();
        self.proxy.metrics.flush_access_log();
        info!(?outcome, "drained");
        outcome
    }
}

/// Where the cluster view comes from, with what that source needs to keep going.
enum Plane {
    Local {
        file: PathBuf,
        applied_bytes: Vec<u8>,
    },
    Controller {
        client: Arc<control::client::Client>,
        applied: control::persist::Applied,
        config_file: Option<PathBuf>,
    },
}

/// How long a ztunnel with no saved configuration waits for the controller's first snapshot
/// before it reports ready: 30 s, longer than a controller restart, short enough that a
/// controller that is down does not hold the node's startup forever (it then serves nothing
/// until the snapshot arrives, and says so).
const INITIAL_SYNC: Duration = Duration::from_secs(30);

/// Applies each new version of the local config file as the watcher (`local::watch`) hands
/// it over; an invalid one is rejected, counted and logged, and the last good one stays.
async fn reload_local(
    path: PathBuf,
    mut versions: tokio::sync::watch::Receiver<Vec<u8>>,
    state: StateStore,
    manager: Arc<Manager>,
    metrics: Arc<Metrics>,
) {
    while versions.changed().await.is_ok() {
        let bytes = versions.borrow_and_update().clone();
        match local::parse(&path, &bytes) {
            Ok(snapshot) => {
                state.replace(snapshot);
                metrics.config_applied.inc();
                info!(file = %path.display(), "config reloaded");
                manager.reconcile().await;
            }
            Err(e) => {
                metrics.config_rejected.inc();
                error!(error = %e, "config rejected; keeping the last good config");
            }
        }
    }
}

/// The controller client's settings: TLS that verifies the controller's certificate to
/// `roots` by `name` (its IP address by default), HTTP/2.
/// The controller at `address` (`<host>:<port>`), verified with `roots` (PEM) under `name`
/// (default: the host), called with the token in `token_file` for `subscriber`.
pub fn controller_endpoint(
    address: &str,
    roots: &str,
    name: Option<&str>,
    token_file: &std::path::Path,
    subscriber: meshapi::watch::Subscriber,
) -> anyhow::Result<control::client::Endpoint> {
    use rustls::pki_types::pem::PemObject;
    let roots = rustls::pki_types::CertificateDer::pem_slice_iter(roots.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("reading --controller-ca")?;
    if roots.is_empty() {
        anyhow::bail!("--controller-ca holds no certificate");
    }
    let (host, port) = control::client::split_host_port(address)
        .with_context(|| format!("--controller {address:?} is not <host>:<port>"))?;
    let name = name.unwrap_or(&host);
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned())
        .with_context(|| format!("{name:?} is not a DNS name or IP address to verify the controller by"))?;
    Ok(control::client::Endpoint { host, port, server_name, roots, token_file: token_file.to_owned(), subscriber })
}

fn read(path: &std::path::Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading the {what} at {}", path.display()))
}

fn metrics_routes(metrics: Arc<Metrics>) -> Routes {
    admin::openmetrics_routes(move || metrics.encode())
}

fn admin_routes(proxy: Arc<Proxy>, manager: Arc<Manager>, log: Option<LogControl>) -> Routes {
    Arc::new(move |call: Call<'_>| {
        let (proxy, manager, log) = (proxy.clone(), manager.clone(), log.clone());
        let (method, path, query) = (call.method.clone(), call.path.to_owned(), call.query.to_owned());
        Box::pin(async move {
            match (method, path.as_str()) {
                (Method::GET, "/config_dump") => Reply::json(admin::config_dump(&proxy, &manager).await),
                (Method::POST | Method::GET, "/logging") => {
                    let level = query.strip_prefix("level=").unwrap_or("");
                    match (&log, level.is_empty()) {
                        (_, true) => Reply::text(StatusCode::BAD_REQUEST, "usage: /logging?level=<filter>\n"),
                        (None, _) => Reply::text(StatusCode::NOT_IMPLEMENTED, "log control unavailable\n"),
                        (Some(set), false) => match set(level) {
                            Ok(()) => Reply::text(StatusCode::OK, format!("log level set to {level}\n")),
                            Err(e) => Reply::text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                        },
                    }
                }
                _ => Reply::text(StatusCode::NOT_FOUND, "routes: GET /config_dump, POST /logging?level=<filter>\n"),
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use hbone::testing::{AllowAll, Pki, RunningServer};
    use meshapi::Snapshot;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    /// The HBONE server's own refusals land in `weft_connections_refused_total` under the pod
    /// whose port was reached, and the limits are the configured ones.
    #[tokio::test]
    async fn the_hbone_servers_refusals_are_counted_for_the_pod() {
        let cli = Cli::try_parse_from(["ztunnel", "--node", "n1", "--max-pending-handshakes-per-pod", "1"]).unwrap();
        let state = StateStore::default();
        let doc =
            "workloads:\n  - {name: api-0, namespace: back, node: n1, addresses: [127.0.0.1], serviceAccount: api}\n";
        state.replace(Snapshot::from_yaml(doc).unwrap());
        let metrics = Arc::new(Metrics::new());
        let config = hbone_config(&cli.config, &state, &metrics);
        assert_eq!(config.limits.pending_handshakes_per_listener, 1);

        let pki = Pki::new();
        let server = RunningServer::start(config.clone(), pki.workload("back", "api"), &pki.trust, AllowAll).await;
        // One silent connection holds the pod's only handshake slot; the next is refused.
        let _silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let pending = async {
            while config.budget.pending_handshakes() == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), pending).await.expect("the first handshake is pending");
        let mut refused = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(5), refused.read(&mut buf)).await.unwrap();
        assert!(matches!(read, Ok(0) | Err(_)), "closed unread: {read:?}");
        // The silent client leaves (a failed handshake), and its slot comes back.
        drop(_silent);
        let released = async {
            while config.budget.pending_handshakes() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), released).await.expect("the slot is given back");
        // A client that is no TLS client: another failed handshake.
        let mut garbage = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        garbage.write_all(b"hello?\r\n\r\n").await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(5), garbage.read(&mut buf)).await;

        let counted = |reason: &str, n: u32| {
            let line =
                format!("weft_connections_refused_total{{reason=\"{reason}\",destination_workload=\"api-0\"}} {n}");
            metrics.encode().contains(&line)
        };
        let both = async {
            while !(counted("handshake_limit", 1) && counted("handshake_failed", 2)) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let seen = tokio::time::timeout(Duration::from_secs(5), both).await;
        assert!(seen.is_ok(), "refusals not counted:\n{}", metrics.encode());
    }
}
