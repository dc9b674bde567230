//! Wiring: `build(config)` loads the CA, trust bundle and local config, enrolls the local
//! pods, starts the admin/metrics/readiness servers and the reload and renewal loops, and
//! returns a [`Bound`] with the addresses it bound and a shutdown handle.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use hbone::ca::Ca;
use hbone::{TrustBundle, TrustStore, drain};
use http::{Method, StatusCode};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{error, info};

use crate::admin::{self, Call, Reply, Routes};
use crate::certs::{CertManager, Issuer};
use crate::config::{Config, Mode};
use crate::inpod::Netns;
use crate::local;
use crate::manager::Manager;
use crate::metrics::Metrics;
use crate::proxy::{Balancer, PodDialer, PodRegistry, Proxy};
use crate::state::StateStore;

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
}

pub async fn build(config: Config, log_control: Option<LogControl>) -> anyhow::Result<Bound> {
    // Record ztunnel's own namespace before any thread enters a pod's.
    Netns::host().context("cannot open ztunnel's own network namespace")?;

    let (local_file, ca_cert, ca_key, trust_bundle) = match config.mode().map_err(anyhow::Error::msg)? {
        Mode::Local { file, ca_cert, ca_key, trust_bundle } => (file, ca_cert, ca_key, trust_bundle),
        Mode::Controller { .. } => anyhow::bail!("--controller is not wired yet"),
    };
    let ca = Ca::from_pem(&read(&ca_cert, "CA certificate (--ca-cert)")?, &read(&ca_key, "CA key (--ca-key)")?)
        .with_context(|| format!("loading the CA from {} and {}", ca_cert.display(), ca_key.display()))?;
    let bundle_path = trust_bundle.unwrap_or_else(|| ca_cert.clone());
    let bundle = TrustBundle::from_pem(&read(&bundle_path, "trust bundle")?)
        .with_context(|| format!("loading the trust bundle from {}", bundle_path.display()))?;
    let trust = TrustStore::new(bundle);

    let (snapshot, mut applied_bytes) = local::load(&local_file)?;
    let state = StateStore::default();
    state.replace(snapshot);

    let metrics = Arc::new(Metrics::new());
    metrics.config_applied.inc();
    let pods = Arc::new(PodRegistry::default());
    let hbone_config = hbone::Config::default();
    let client = hbone::Client::with_dialer(hbone_config.clone(), trust.clone(), Arc::new(PodDialer(pods.clone())));
    let proxy = Arc::new(Proxy {
        node: config.node.clone(),
        state: state.clone(),
        certs: CertManager::new(Issuer::Local(ca), config.cert_ttl, None),
        trust,
        client,
        pods,
        metrics: metrics.clone(),
        balancer: Balancer::default(),
        hbone: hbone_config,
    });
    let manager =
        Arc::new(Manager::new(proxy.clone(), config.proc_root.clone(), config.nft.clone(), config.drain_deadline));
    let pending = manager.reconcile().await;
    info!(node = %config.node, pending, "initial enrollment done");

    let ready = Arc::new(AtomicBool::new(true));
    let (servers, watch) = drain::channel();
    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr).await.with_context(|| format!("binding the {what} server on {addr}"))
    };
    let admin_l = bind(config.admin_addr, "admin").await?;
    let metrics_l = bind(config.metrics_addr, "metrics").await?;
    let ready_l = bind(config.readiness_addr, "readiness").await?;
    let (admin_addr, metrics_addr, readiness_addr) =
        (admin_l.local_addr()?, metrics_l.local_addr()?, ready_l.local_addr()?);

    // The servers stop on `servers`' drain; the loops below are aborted at shutdown.
    tokio::spawn(admin::serve(admin_l, admin_routes(proxy.clone(), manager.clone(), log_control), watch.clone()));
    tokio::spawn(admin::serve(metrics_l, metrics_routes(metrics.clone()), watch.clone()));
    tokio::spawn(admin::serve(ready_l, readiness_routes(ready.clone()), watch.clone()));
    let mut loops = Vec::new();

    // Reload the local file when it changes; retry pending enrollments on the same beat.
    let (reload_state, reload_manager, reload_metrics) = (state.clone(), manager.clone(), metrics.clone());
    let (path, interval) = (local_file, config.reload_interval);
    loops.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending = pending;
        loop {
            tick.tick().await;
            let bytes = match tokio::fs::read(&path).await {
                Ok(b) => b,
                Err(e) => {
                    error!(file = %path.display(), error = %e, "cannot read config file; keeping the last good config");
                    continue;
                }
            };
            if bytes != applied_bytes {
                applied_bytes = bytes;
                match local::parse(&path, &applied_bytes) {
                    Ok(snapshot) => {
                        reload_state.replace(snapshot);
                        reload_metrics.config_applied.inc();
                        info!(file = %path.display(), "config reloaded");
                        pending = reload_manager.reconcile().await;
                    }
                    Err(e) => {
                        reload_metrics.config_rejected.inc();
                        error!(error = %e, "config rejected; keeping the last good config");
                    }
                }
            } else if pending > 0 {
                pending = reload_manager.reconcile().await;
            }
        }
    }));

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

    Ok(Bound { admin_addr, metrics_addr, readiness_addr, proxy, manager, ready, servers, loops })
}

impl Bound {
    /// Graceful shutdown: readiness turns 503, pods' listeners stop accepting, connections
    /// finish within the drain deadline (or are cut), then the servers stop.
    pub async fn shutdown(self) -> drain::Outcome {
        self.ready.store(false, Ordering::Release);
        for l in &self.loops {
            l.abort();
        }
        info!("draining");
        let outcome = self.manager.shutdown().await;
        self.servers.drain(Duration::from_secs(1)).await;
        info!(?outcome, "drained");
        outcome
    }
}

fn read(path: &std::path::Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading the {what} at {}", path.display()))
}

fn metrics_routes(metrics: Arc<Metrics>) -> Routes {
    Arc::new(move |call: Call<'_>| {
        let body = (call.path == "/metrics").then(|| metrics.encode());
        Box::pin(async move {
            match body {
                Some(b) => Reply { status: StatusCode::OK, content_type: "text/plain; version=0.0.4", body: b },
                None => Reply::text(StatusCode::NOT_FOUND, "try /metrics\n"),
            }
        })
    })
}

fn readiness_routes(ready: Arc<AtomicBool>) -> Routes {
    Arc::new(move |call: Call<'_>| {
        let reply = match (call.path, ready.load(Ordering::Acquire)) {
            ("/healthz/ready", true) => Reply::text(StatusCode::OK, "ready\n"),
            ("/healthz/ready", false) => Reply::text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
            _ => Reply::text(StatusCode::NOT_FOUND, "try /healthz/ready\n"),
        };
        Box::pin(async move { reply })
    })
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
