//! Wiring: subscribe to the controller, wait for the trust bundle, obtain the waypoint's
//! certificate, then serve HBONE, metrics, readiness and admin.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use hbone::{SpiffeId, TrustBundle, TrustStore, drain};
use http::StatusCode;
use meshapi::watch::Subscriber;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{info, warn};
use ztunnel::admin::{self, Call, Reply, Routes};
use ztunnel::certs::{CertManager, Issuer};
use ztunnel::control::client::Client;
use ztunnel::state::StateStore;

use crate::cli::Args;
use crate::metrics::Metrics;
use crate::proxy::{Settings, Waypoint};
use crate::upstream::Upstreams;

pub struct Bound {
    pub hbone_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub waypoint: Arc<Waypoint>,
    ready: Arc<AtomicBool>,
    tunnels: drain::Trigger,
    servers: drain::Trigger,
    drain_deadline: Duration,
    loops: Vec<JoinHandle<()>>,
}

pub async fn build(args: Args) -> anyhow::Result<Bound> {
    let service_account = args.service_account.clone().unwrap_or_else(|| args.name.clone());
    let roots = std::fs::read_to_string(&args.controller_ca)
        .with_context(|| format!("reading the controller CA at {}", args.controller_ca.display()))?;
    let subscriber = Subscriber::ServiceAccount { namespace: args.namespace.clone(), name: service_account.clone() };
    let endpoint = ztunnel::app::controller_endpoint(
        &args.controller,
        &roots,
        args.controller_name.as_deref(),
        &args.token_file,
        subscriber,
    )?;
    let client = Arc::new(Client::new(endpoint)?);
    let state = StateStore::default();
    let trust = TrustStore::new(TrustBundle::from_pem(&roots).context("reading --controller-ca as a trust bundle")?);
    client.trust_also(trust.bundle().roots());
    let mut loops = Vec::new();
    let (synced_tx, mut synced) = tokio::sync::watch::channel(false);
    let watcher = crate::control::Watcher::new(client.clone(), state.clone(), trust.clone(), synced_tx);
    loops.push(tokio::spawn(watcher.run()));
    info!(controller = %args.controller, "waiting for the controller's configuration");
    let _ = synced.wait_for(|s| *s).await;
    let trust_domain = state.load().trust_domain().to_owned();
    let identity = SpiffeId::new(&trust_domain, &args.namespace, &service_account)
        .with_context(|| format!("{}/{service_account} is not a valid identity", args.namespace))?;

    // The controller signs only once it knows this waypoint: retry until it does.
    let certs = Arc::new(CertManager::new(Issuer::Controller(client.clone()), args.cert_ttl, None));
    let cert = loop {
        match certs.obtain(&identity).await {
            Ok(c) => break c,
            Err(e) => {
                warn!(error = %e, %identity, "no certificate yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    info!(%identity, "certificate obtained");
    let renew = certs.clone();
    let every = (args.cert_ttl / 8).clamp(Duration::from_secs(1), Duration::from_secs(300));
    loops.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            renew.renew_due().await;
        }
    }));

    let hbone_config = hbone::Config::default();
    // The waypoint is not captured: its tunnels to endpoints leave from its own address.
    let hbone_client = hbone::Client::new(hbone_config.clone(), trust.clone());
    let metrics = Arc::new(Metrics::default());
    let (tunnels, tunnel_watch) = drain::channel();
    let settings = Settings { retry_buffer: args.retry_buffer, ..Settings::default() };
    let waypoint = Arc::new(Waypoint::new(
        format!("{}/{}", args.namespace, args.name),
        state,
        trust.clone(),
        Upstreams::new(hbone_client, cert.clone()),
        metrics.clone(),
        settings,
        tunnel_watch.clone(),
    ));
    let server = hbone::Server::new(hbone_config, Arc::new(cert), &trust, crate::proxy::Tunnels(waypoint.clone()));

    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr).await.with_context(|| format!("binding the {what} server on {addr}"))
    };
    let hbone_l = bind(args.hbone_addr, "HBONE").await?;
    let admin_l = bind(args.admin_addr, "admin").await?;
    let metrics_l = bind(args.metrics_addr, "metrics").await?;
    let ready_l = bind(args.readiness_addr, "readiness").await?;
    let addrs = (hbone_l.local_addr()?, admin_l.local_addr()?, metrics_l.local_addr()?, ready_l.local_addr()?);
    tokio::spawn(async move { server.serve(hbone_l, tunnel_watch).await });

    let ready = Arc::new(AtomicBool::new(true));
    let (servers, watch) = drain::channel();
    tokio::spawn(admin::serve(admin_l, admin_routes(waypoint.clone()), watch.clone()));
    tokio::spawn(admin::serve(metrics_l, admin::openmetrics_routes(move || metrics.encode()), watch.clone()));
    tokio::spawn(admin::serve(ready_l, admin::readiness_routes(ready.clone()), watch));
    Ok(Bound {
        hbone_addr: addrs.0,
        admin_addr: addrs.1,
        metrics_addr: addrs.2,
        readiness_addr: addrs.3,
        waypoint,
        ready,
        tunnels,
        servers,
        drain_deadline: args.drain_deadline,
        loops,
    })
}

impl Bound {
    /// Readiness turns 503, the HBONE listener stops, HTTP/2 clients get GOAWAY, requests in
    /// flight finish within the drain deadline.
    pub async fn shutdown(self) -> drain::Outcome {
        self.ready.store(false, Ordering::Release);
        for l in &self.loops {
            l.abort();
        }
        let outcome = self.tunnels.drain(self.drain_deadline).await;
        self.servers.drain(Duration::from_secs(1)).await;
        outcome
    }
}

fn admin_routes(waypoint: Arc<Waypoint>) -> Routes {
    Arc::new(move |call: Call<'_>| {
        let reply = match call.path {
            "/config_dump" => Reply::json(waypoint.config_dump()),
            _ => Reply::text(StatusCode::NOT_FOUND, "try /config_dump\n"),
        };
        Box::pin(async move { reply })
    })
}
