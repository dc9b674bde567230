//! Wiring: `build(config)` opens the CA and the token key, starts the source loop (read the
//! cluster, a directory or the Kubernetes API; translate; commit), on Kubernetes the waypoint
//! deployer, and the API, admin, metrics and readiness servers; it returns a [`Bound`] with
//! the addresses it bound and a shutdown handle.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use hbone::drain;
use meshapi::watch::Change;
use meshapi::{Resource, TrustBundle};
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::auth::{Authenticator, Tokens};
use crate::ca::{Authority, RootSource};
use crate::ca_secret::{self, CaFiles, Refresher, RootPublisher};
use crate::config::{Config, SourceSetting};
use crate::deploy::Deployer;
use crate::leader::{Election, Leading, LeaseSettings};
use crate::metrics::Metrics;
use crate::server::{self, Api};
use crate::source::dir::DirSource;
use crate::source::kube::{KubeSource, client as kube_client};
use crate::source::{ObjectSource, Rejection};
use crate::status::StatusWriter;
use crate::store::Store;
use crate::tokenreview::{KubernetesAuth, TokenReviewer};
use crate::translate::Translator;

/// A running controller.
pub struct Bound {
    pub api_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub store: Arc<Store>,
    /// On Kubernetes with leader election: this replica's campaign.
    election: Option<Election>,
    leading: Leading,
    servers: drain::Trigger,
    stop: Arc<AtomicBool>,
    source: Option<std::thread::JoinHandle<()>>,
}

pub async fn build(config: Config) -> anyhow::Result<Bound> {
    let cluster = match config.source() {
        SourceSetting::Dir(dir) => Cluster::Dir(dir),
        SourceSetting::Kubernetes => Cluster::Kubernetes(kube_client().await?),
    };
    build_with(config, cluster).await
}

/// As [`build`], watching the Kubernetes API through `client` rather than the client the
/// configuration finds (tests: an API server faked on loopback). `--source-dir` must be unset.
pub async fn build_with_client(config: Config, client: kube::Client) -> anyhow::Result<Bound> {
    anyhow::ensure!(config.source_dir.is_none(), "a Kubernetes client was given: --source-dir must be unset");
    build_with(config, Cluster::Kubernetes(client)).await
}

/// Where the cluster is read from.
enum Cluster {
    Dir(std::path::PathBuf),
    Kubernetes(kube::Client),
}

async fn build_with(config: Config, cluster: Cluster) -> anyhow::Result<Bound> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating the state directory {}", config.state_dir.display()))?;
    let mut authority_config = config.authority();
    let mut ca_refresher = None;
    if let (Some(secret), Cluster::Kubernetes(client)) = (&config.ca_secret, &cluster) {
        let files = CaFiles::in_dir(&config.state_dir);
        ca_secret::materialize(client, &config.namespace, secret, &config.trust_domain, &files).await?;
        authority_config.root =
            RootSource::Files { cert: files.cert.clone(), key: files.key.clone(), chain: files.chain() };
        // The Secret's extra roots, unless the flag names a file of them.
        authority_config.extra_roots.get_or_insert_with(|| files.extra_roots.clone());
        ca_refresher = Some(Refresher::start(
            client.clone(),
            config.namespace.clone(),
            secret.clone(),
            files,
            config.ca_secret_refresh,
        ));
    }
    let authority = Arc::new(Authority::open(authority_config).context("opening the certificate authority")?);
    let tokens = Tokens::open(&config.state_dir).context("opening the token key")?;
    let metrics = Arc::new(Metrics::new());
    let store =
        Arc::new(Store::new(epoch(), config.history_bytes, authority.trust_domain().to_owned(), metrics.clone()));
    let ready = Arc::new(AtomicBool::new(false));
    let rejections = Arc::new(Mutex::new(Vec::new()));

    // The cluster: a directory, or the Kubernetes API, which then also reviews proxies'
    // service-account tokens and is where waypoints are deployed. The Kubernetes source
    // returns once every kind is listed.
    let (mut election, mut leading) = (None, Leading::always());
    type Read = (Box<dyn ObjectSource>, Arc<dyn Authenticator>, Option<Writers>);
    let (cluster, authenticator, writers): Read = match cluster {
        Cluster::Dir(dir) => (Box::new(DirSource::new(dir)), Arc::new(tokens), None),
        Cluster::Kubernetes(client) => {
            let host = config.waypoints.controller_host();
            if !config.server_names.iter().any(|n| n == host) {
                warn!(
                    waypoint_controller_address = %config.waypoints.controller_address,
                    server_names = %config.server_names.join(","),
                    "waypoints will reach the controller as {host}, which its certificate does not carry: \
                     they will refuse it; add {host} to --server-name or change --waypoint-controller-address"
                );
            }
            let cluster = KubeSource::start(client.clone()).await;
            election = config.election.enabled.then(|| Election::start(client.clone(), lease_settings(&config)));
            if let Some(e) = &election {
                leading = e.leading();
            }
            let deployer = Deployer::start(client.clone(), config.waypoints.clone(), leading.clone());
            let status = StatusWriter::start(client.clone(), leading.clone(), deployer.outcomes());
            let roots = RootPublisher::start(client.clone(), config.namespace.clone(), leading.clone());
            let auth = KubernetesAuth { tokens, reviewer: TokenReviewer::new(client) };
            let writers = Writers { deployer, status, roots, _ca_refresher: ca_refresher.take() };
            (Box::new(cluster), Arc::new(auth), Some(writers))
        }
    };
    // The first scan runs before the servers answer, so the first subscriber already gets
    // the cluster rather than an empty snapshot.
    let mut source = Source {
        server_cert: None,
        server_names: config.server_names.clone(),
        cluster,
        writers,
        translator: Translator::new(),
        store: store.clone(),
        authority: authority.clone(),
        source_rejections: Vec::new(),
        rejections: rejections.clone(),
        metrics: metrics.clone(),
    };
    source.publish_bundle();
    source.tick();
    ready.store(true, Ordering::Release);

    let credentials = authority.server_credentials(&config.server_names).context("minting the API's certificate")?;
    let server_cert = hbone::WorkloadCert::new(credentials);
    let tls = tls_acceptor(server_cert.clone());
    let api = Arc::new(Api {
        store: store.clone(),
        authority: authority.clone(),
        authenticator,
        metrics: metrics.clone(),
        heartbeat: config.heartbeat,
        cert_ttl: config.cert_ttl,
        rejections,
        ready: ready.clone(),
    });

    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr).await.with_context(|| format!("binding the {what} server on {addr}"))
    };
    let api_l = bind(config.api_addr, "API").await?;
    let admin_l = bind(config.admin_addr, "admin").await?;
    let metrics_l = bind(config.metrics_addr, "metrics").await?;
    let ready_l = bind(config.readiness_addr, "readiness").await?;
    let (api_addr, admin_addr, metrics_addr, readiness_addr) =
        (api_l.local_addr()?, admin_l.local_addr()?, metrics_l.local_addr()?, ready_l.local_addr()?);
    let (servers, watch) = drain::channel();
    tokio::spawn(server::serve_api(api_l, tls, api.clone(), watch.clone()));
    tokio::spawn(server::serve_plain(admin_l, api.admin_routes(), watch.clone()));
    tokio::spawn(server::serve_plain(metrics_l, server::metrics_routes(metrics.clone()), watch.clone()));
    tokio::spawn(server::serve_plain(ready_l, server::readiness_routes(ready), watch.clone()));

    source.server_cert = Some(server_cert);
    // The source loop runs on a thread of its own: reading files blocks, and so does waiting
    // for the Kubernetes source's next batch.
    let stop = Arc::new(AtomicBool::new(false));
    let (stop_source, interval) = (stop.clone(), config.poll_interval);
    let thread = std::thread::Builder::new()
        .name("controller-source".into())
        .spawn(move || {
            while !stop_source.load(Ordering::Acquire) {
                source.cluster.wait(interval);
                source.tick();
            }
        })
        .context("starting the source thread")?;
    info!(source = %config.source(), version = store.version(), "controller ready");
    Ok(Bound {
        api_addr,
        admin_addr,
        metrics_addr,
        readiness_addr,
        store,
        election,
        leading,
        servers,
        stop,
        source: Some(thread),
    })
}

/// On Kubernetes, what writes to the cluster (while this replica leads) and follows the CA
/// Secret.
struct Writers {
    /// Deploys the waypoints of the Gateways the scans bring.
    deployer: Deployer,
    /// Writes the objects' status conditions.
    status: StatusWriter,
    /// The nodes' copy of the trust bundle.
    roots: RootPublisher,
    /// With `--ca-secret`: follows the Secret (held for its task).
    _ca_refresher: Option<Refresher>,
}

/// The Lease this replica campaigns for, named after its pod (or host) and this start.
fn lease_settings(config: &Config) -> LeaseSettings {
    let election = &config.election;
    let name = election.identity.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "controller".to_owned())
    });
    LeaseSettings {
        namespace: config.namespace.clone(),
        identity: format!("{name}_{}", epoch()),
        duration: election.lease_duration,
        renew_deadline: election.renew_deadline.min(election.lease_duration),
        retry: election.retry_period,
    }
}

impl Bound {
    /// Whether this replica writes (it leads, or is alone).
    pub fn leading(&self) -> bool {
        self.leading.now()
    }

    /// Gives up leadership (another replica takes over at its next try), stops reading the
    /// source and closes the servers; watch streams end, and proxies keep serving what they
    /// applied until a controller is back.
    pub async fn shutdown(mut self) {
        if let Some(election) = self.election.take() {
            election.release().await;
        }
        self.stop_serving().await;
    }

    /// Stops as a crash would for the others: the Lease is not released, so another replica
    /// takes over only once it expires. For tests of the election.
    pub async fn abort(mut self) {
        drop(self.election.take());
        self.stop_serving().await;
    }

    async fn stop_serving(mut self) {
        self.stop.store(true, Ordering::Release);
        self.servers.drain(Duration::from_secs(1)).await;
        if let Some(t) = self.source.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// The source loop's state: read, translate, commit; and keep the API's certificate fresh.
struct Source {
    /// The API's certificate, renewed at half-life under the running listener.
    server_cert: Option<hbone::WorkloadCert>,
    server_names: Vec<String>,
    cluster: Box<dyn ObjectSource>,
    /// On Kubernetes: the waypoints' deployer, the status writer, the nodes' trust bundle.
    writers: Option<Writers>,
    translator: Translator,
    store: Arc<Store>,
    authority: Arc<Authority>,
    /// What the source and translation rejected, as of the last scan that changed anything.
    source_rejections: Vec<Rejection>,
    /// What `/status` lists: the source's rejections, then the waypoints not deployed.
    rejections: Arc<Mutex<Vec<Rejection>>>,
    metrics: Arc<Metrics>,
}

impl Source {
    fn tick(&mut self) {
        match self.authority.reload() {
            Ok(true) => {
                info!("CA files changed: new trust bundle");
                self.publish_bundle();
                self.renew_server_cert(true);
            }
            Ok(false) => {}
            Err(e) => error!(error = %e, "CA files changed but cannot be used; keeping the current CA"),
        }
        self.renew_server_cert(false);
        let scan = self.cluster.scan();
        if !scan.events.is_empty() || !scan.rejected.is_empty() {
            self.translate(scan);
        }
        self.publish_rejections();
    }

    fn translate(&mut self, scan: crate::source::Scan) {
        for r in &scan.rejected {
            warn!(rejected = %r, "source object rejected; everything else keeps working");
        }
        if let Some(writers) = &self.writers {
            writers.deployer.observe(&scan.events);
        }
        let changes = self.translator.apply_all(scan.events);
        let mut all = self.cluster.rejected();
        if let Some(writers) = &self.writers {
            writers.status.publish(self.translator.statuses(&all));
        }
        // Translation knows the object, the source where it is written.
        all.extend(self.translator.rejected().into_iter().map(|r| {
            match r.object.as_ref().filter(|_| r.origin.is_none()).and_then(|o| self.cluster.origin(o)) {
                Some(origin) => r.with_origin(origin.clone()),
                None => r,
            }
        }));
        self.metrics.source_rejections.set(all.len() as i64);
        self.source_rejections = all;
        if let Some(c) = self.store.commit(changes) {
            info!(version = c.version, upserts = c.upserts, deletes = c.deletes, "model changed");
        }
    }

    /// Lists for `/status` what the source rejected and, on Kubernetes, the waypoints that
    /// could not be deployed (their deployer works on its own: refreshed at every pass of the
    /// loop, at least every `--poll-interval`).
    fn publish_rejections(&self) {
        let mut all = self.source_rejections.clone();
        if let Some(writers) = &self.writers {
            all.extend(writers.deployer.problems());
        }
        let mut shown = self.rejections.lock().unwrap_or_else(|p| p.into_inner());
        if *shown != all {
            *shown = all;
        }
    }

    /// Renews the API's certificate past half of its lifetime (or now, after the signer
    /// changed).
    fn renew_server_cert(&self, now: bool) {
        let Some(cert) = &self.server_cert else { return };
        let current = cert.current();
        if !now && std::time::SystemTime::now() < current.renew_at() {
            return;
        }
        match self.authority.server_credentials(&self.server_names).map_err(|e| e.to_string()) {
            Ok(fresh) => match cert.rotate(fresh) {
                Ok(()) => info!("renewed the API's certificate"),
                Err(e) => error!(error = %e, "cannot use the renewed API certificate"),
            },
            Err(e) => error!(error = %e, "cannot renew the API's certificate; will retry"),
        }
    }

    fn publish_bundle(&self) {
        let bundle =
            TrustBundle { trust_domain: self.authority.trust_domain().to_owned(), roots: self.authority.bundle_pem() };
        if let Some(writers) = &self.writers {
            writers.deployer.trust_bundle(&bundle.roots);
            writers.roots.publish(bundle.roots.concat());
        }
        self.store.commit(vec![Change::Upsert(Resource::TrustBundle(bundle))]);
    }
}

/// The API's TLS (1.3 only, as everything in the mesh): its certificate, no client certificate
/// (proxies authenticate with a token), HTTP/2 preferred.
fn tls_acceptor(cert: hbone::WorkloadCert) -> tokio_rustls::TlsAcceptor {
    let mut config = rustls::ServerConfig::builder_with_provider(hbone::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        // The provider is built with TLS 1.3 suites; this cannot fail.
        .expect("TLS 1.3 is supported by the aws-lc-rs provider")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(cert));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A new epoch name: 16 hex digits from the clock and the process id, unique per start.
fn epoch() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:016x}", (nanos as u64) ^ (u64::from(std::process::id()) << 48))
}
