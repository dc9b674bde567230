//! The waypoint's data path: HBONE in, HTTP on the tunnel, routes, HBONE out.
//!
//! ```text
//!  client ztunnel ─HBONE CONNECT <VIP>:<port>─► Handler::authorize (a service of this waypoint?)
//!      ─► Service::run: HTTP/1.1 or HTTP/2 (detected) on the tunnel, or L4 for a `tcp` port
//!      ─► per request: route (404) ─► filters ─► weighted backend (500 / 503)
//!         ─► attempts: endpoint (balancer) ─► HBONE with the waypoint's identity ─► response
//!            (retry on connect failure, reset, listed codes; within the request timeout and
//!             the retry budget) ─► response filters ─► metrics + access line at the body's end
//! ```

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hbone::copy::{CopyCause, CopyError, Transferred};
use hbone::{InboundRequest, Rejection, SpiffeId, TrustStore, Tunnel};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::debug;
use ztunnel::state::{Peer, ServiceEntry, State, StateStore, WorkloadEntry};

use crate::body::{Observed, Prepared};
use crate::metrics::{Metrics, RequestLabels, ServiceLabels};
use crate::route::{RouteTable, Rule};
use crate::upstream::{Balancer, Body, BoxError, Endpoint, HboneIo, Protocol, UpstreamError, Upstreams};

/// The HBONE port, on waypoints and pods alike.
pub const HBONE_PORT: u16 = 15008;

/// Settings of the data path.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Request bodies up to this size are kept so that a retry can send them again; a larger
    /// body is streamed and its request is not retried.
    pub retry_buffer: usize,
    /// Retries may add at most this fraction of a service's requests (1.0: an outage at most
    /// doubles the attempts, whatever the routes' `attempts`; a backend failing half of its
    /// requests still gets the retries that heal it)...
    pub retry_budget_ratio: f64,
    /// ...plus this many per second.
    pub retry_budget_min_per_sec: f64,
    /// A client must send a whole request head within this time (HTTP/1.1; also how long an
    /// idle keep-alive connection is kept): a slow client cannot hold a connection open
    /// without sending a request.
    pub header_timeout: Duration,
    /// The largest request head (HTTP/1.1 buffer, HTTP/2 header list): what one slow client's
    /// half-sent request can hold.
    pub max_header_bytes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            retry_buffer: 64 * 1024,
            retry_budget_ratio: 1.0,
            retry_budget_min_per_sec: 10.0,
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
        }
    }
}

/// The waypoint: who it is, what it knows, where it sends.
pub struct Waypoint {
    /// `<namespace>/<name>` of its Gateway: services whose `waypoint` is this are served.
    pub key: String,
    pub state: StateStore,
    pub trust: TrustStore,
    pub upstreams: Upstreams,
    pub balancer: Balancer,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    /// Turns true when the drain starts: tunnels then send GOAWAY (HTTP/2) or close after the
    /// request in flight (HTTP/1.1). Not the drain's `Watch` itself: the waypoint lives as
    /// long as the process, and a `Watch` held that long would keep every drain waiting for
    /// its deadline.
    draining: tokio::sync::watch::Receiver<bool>,
    routes: Mutex<RouteCache>,
    budgets: Mutex<HashMap<Arc<str>, RetryBudget>>,
}

/// Compiled route tables, per service, for one version of the state.
#[derive(Default)]
struct RouteCache {
    /// The version they were compiled for. Weak, so that the version is not kept alive, but
    /// its allocation is: a later version can never be allocated at the same address and be
    /// taken for it.
    state: Weak<State>,
    tables: HashMap<Arc<str>, Arc<ServiceRoutes>>,
}

/// What a service's routes compile to: the table, and the faults of the routes that ask for
/// them, by route key.
struct ServiceRoutes {
    table: RouteTable,
    faults: HashMap<Arc<str>, meshapi::Fault>,
}

impl Waypoint {
    /// `drain` is the tunnels' drain (the HBONE server's): a task of its own holds it until
    /// the drain starts, then lets it go. Must be called within a Tokio runtime.
    pub fn new(
        key: String,
        state: StateStore,
        trust: TrustStore,
        upstreams: Upstreams,
        metrics: Arc<Metrics>,
        settings: Settings,
        drain: hbone::drain::Watch,
    ) -> Waypoint {
        let (started, draining) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            drain.draining().await;
            let _ = started.send(true);
        });
        Waypoint {
            key,
            state,
            trust,
            upstreams,
            balancer: Balancer::default(),
            metrics,
            settings,
            draining,
            routes: Mutex::new(RouteCache::default()),
            budgets: Mutex::new(HashMap::new()),
        }
    }

    /// What the waypoint serves, for the admin server's `/config_dump`.
    pub fn config_dump(&self) -> String {
        let state = self.state.load();
        let services: Vec<serde_json::Value> = state
            .services()
            .filter(|s| self.serves(s))
            .map(|s| {
                let routes: Vec<String> = state
                    .http_routes()
                    .filter(|r| r.parents.iter().any(|p| **p == **s.key()))
                    .map(|r| format!("{}/{}", r.namespace, r.name))
                    .collect();
                serde_json::json!({
                    "service": &**s.key(),
                    "hostname": &**s.hostname(),
                    "endpoints": s.endpoints().len(),
                    "routes": routes,
                })
            })
            .collect();
        let dump = serde_json::json!({ "waypoint": self.key, "services": services });
        serde_json::to_string_pretty(&dump).unwrap_or_default()
    }

    /// Whether this waypoint serves `service`.
    fn serves(&self, service: &ServiceEntry) -> bool {
        service.service().waypoint.as_deref() == Some(self.key.as_str())
    }

    /// The service's route table in `state`, compiled once per state version.
    fn routes(&self, state: &Arc<State>, service: &ServiceEntry) -> Arc<ServiceRoutes> {
        let mut cache = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if !std::ptr::eq(cache.state.as_ptr(), Arc::as_ptr(state)) {
            cache.state = Arc::downgrade(state);
            cache.tables.clear();
        }
        cache
            .tables
            .entry(service.key().clone())
            .or_insert_with(|| {
                let key = service.key();
                let routes: Vec<&meshapi::HttpRoute> =
                    state.http_routes().filter(|r| r.parents.iter().any(|p| **p == **key)).collect();
                let (table, problems) = RouteTable::compile(service.service(), &routes);
                for p in problems {
                    debug!(service = %key, problem = %p, "route rule skipped");
                }
                let faults = routes
                    .iter()
                    .filter_map(|r| Some((Arc::from(format!("{}/{}", r.namespace, r.name)), r.fault?)))
                    .collect();
                Arc::new(ServiceRoutes { table, faults })
            })
            .clone()
    }

    fn retry_allowed(&self, service: &Arc<str>, first: bool) -> bool {
        let mut budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        let budget = budgets.entry(service.clone()).or_insert_with(|| RetryBudget::new(&self.settings));
        if first {
            budget.deposit();
            true
        } else {
            budget.withdraw()
        }
    }
}

/// Retries may add a fraction of the requests plus a few per second: during an outage, when
/// every attempt fails, retries cannot multiply the load on the backends.
struct RetryBudget {
    tokens: f64,
    ratio: f64,
    min_per_sec: f64,
    refilled: Instant,
}

impl RetryBudget {
    fn new(settings: &Settings) -> Self {
        RetryBudget {
            tokens: settings.retry_budget_min_per_sec,
            ratio: settings.retry_budget_ratio,
            min_per_sec: settings.retry_budget_min_per_sec,
            refilled: Instant::now(),
        }
    }

    /// Tokens saved up at most: after a quiet spell, a burst of failures gets this many
    /// retries beyond its own share.
    const CAP: f64 = 100.0;

    fn refill(&mut self) {
        let now = Instant::now();
        let secs = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + secs * self.min_per_sec).min(Self::CAP.max(self.min_per_sec));
    }

    fn deposit(&mut self) {
        self.refill();
        self.tokens = (self.tokens + self.ratio).min(Self::CAP.max(self.min_per_sec));
    }

    fn withdraw(&mut self) -> bool {
        self.refill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the tunnel was opened for.
#[derive(Clone)]
enum Target {
    /// A service's VIP and port.
    Service { service: Arc<ServiceEntry>, port: u16 },
    /// A workload's own address (a client that dialed a pod directly): policy applies, the
    /// request goes to that workload.
    Workload { workload: Arc<WorkloadEntry>, port: u16 },
}

/// What every request of one tunnel shares.
struct Downstream {
    target: Target,
    /// The client, as metrics name it (the workload of the proven identity at the claimed
    /// address, else unknown with the proven principal).
    source: Arc<Peer>,
    source_identity: SpiffeId,
    source_addr: IpAddr,
}

/// The session of a tunnel (nothing: requests are recorded one by one).
pub struct Session;

/// The waypoint as the HBONE server's handler.
pub struct Tunnels(pub Arc<Waypoint>);

impl hbone::Handler for Tunnels {
    type Session = Session;
    type Upstream = ServiceTunnel;

    fn authorize(&self, request: &InboundRequest) -> Result<(), Rejection> {
        let state = self.0.state.load();
        resolve_target(&self.0, &state, request.target).map(|_| ())
    }

    async fn dial(&self, request: &InboundRequest) -> io::Result<(ServiceTunnel, Session)> {
        let state = self.0.state.load();
        let target =
            resolve_target(&self.0, &state, request.target).map_err(|e| io::Error::new(io::ErrorKind::NotFound, e))?;
        // A claim is believed only from the identity that owns the claimed address.
        let claimed = request
            .forwarded_for
            .filter(|ip| state.entry_by_ip(*ip).and_then(|w| w.identity().ok()) == Some(&request.peer_identity));
        let source_addr = claimed.unwrap_or(request.peer_addr.ip());
        let source = state.proved_peer(Some(source_addr), &request.peer_identity);
        let downstream =
            Arc::new(Downstream { target, source, source_identity: request.peer_identity.clone(), source_addr });
        Ok((ServiceTunnel { waypoint: self.0.clone(), downstream }, Session))
    }
}

fn resolve_target(waypoint: &Waypoint, state: &Arc<State>, target: SocketAddr) -> Result<Target, Rejection> {
    if let Some(service) = state.services().find(|s| s.service().vips.contains(&target.ip())) {
        if !waypoint.serves(service) {
            return Err(Rejection::NotServed(format!(
                "service {} does not use waypoint {}",
                service.key(),
                waypoint.key
            )));
        }
        if service.service().port(target.port()).is_none() {
            return Err(Rejection::NotServed(format!("service {} has no port {}", service.key(), target.port())));
        }
        return Ok(Target::Service { service: service.clone(), port: target.port() });
    }
    if let Some(workload) = state.entry_by_ip(target.ip()) {
        let protected = workload.workload().waypoint.as_deref() == Some(waypoint.key.as_str())
            || state.services_of(workload.workload()).any(|s| waypoint.serves(s));
        if protected {
            return Ok(Target::Workload { workload: workload.clone(), port: target.port() });
        }
        return Err(Rejection::NotServed(format!(
            "workload {} does not use waypoint {}",
            workload.uid(),
            waypoint.key
        )));
    }
    Err(Rejection::NotServed(format!("{target} is neither a service nor a workload of this mesh")))
}

/// An admitted tunnel: HTTP served on it, or its bytes forwarded at L4.
pub struct ServiceTunnel {
    waypoint: Arc<Waypoint>,
    downstream: Arc<Downstream>,
}

impl hbone::Upstream for ServiceTunnel {
    async fn run(&mut self, tunnel: Tunnel, _copy_buffer: usize) -> Result<Transferred, CopyError> {
        let (waypoint, downstream) = (self.waypoint.clone(), self.downstream.clone());
        if !speaks_http(&downstream.target) {
            return forward_l4(&waypoint, &downstream, tunnel).await;
        }
        let io = TokioIo::new(HboneIo(tunnel));
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (waypoint, downstream) = (waypoint.clone(), downstream.clone());
            async move { Ok::<_, std::convert::Infallible>(handle(&waypoint, &downstream, req).await) }
        });
        let settings = &self.waypoint.settings;
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(settings.header_timeout)
            .max_buf_size(settings.max_header_bytes.max(8192));
        builder.http2().max_header_list_size(settings.max_header_bytes as u32);
        let conn = builder.serve_connection_with_upgrades(io, service);
        tokio::pin!(conn);
        let mut started = self.waypoint.draining.clone();
        let draining = async move {
            // The sender's task ends only after sending true, or with the runtime.
            if started.wait_for(|d| *d).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(draining);
        let mut drained = false;
        let result = loop {
            tokio::select! {
                r = conn.as_mut() => break r,
                _ = &mut draining, if !drained => {
                    // HTTP/2 clients get GOAWAY; HTTP/1.1 connections close after the
                    // request in flight.
                    drained = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        };
        match result {
            Ok(()) => Ok(Transferred::default()),
            Err(e) => {
                debug!(error = %e, "HTTP connection on a tunnel ended");
                Err(CopyError { cause: CopyCause::Tunnel(io::Error::other(e)), transferred: Transferred::default() })
            }
        }
    }
}

/// Whether the target's port carries HTTP: every port but those whose `appProtocol` names
/// another protocol (`tcp`, `tls`, ...). gRPC is HTTP/2.
fn speaks_http(target: &Target) -> bool {
    let Target::Service { service, port } = target else { return true };
    match service.service().port(*port).and_then(|p| p.app_protocol.as_deref()) {
        None => true,
        Some(p) => {
            let p = p.to_ascii_lowercase();
            ["http", "http2", "h2c", "grpc", "grpc-web", "kubernetes.io/h2c", "kubernetes.io/ws"].contains(&p.as_str())
        }
    }
}

/// A non-HTTP port: one endpoint per connection, bytes copied both ways.
async fn forward_l4(waypoint: &Waypoint, downstream: &Downstream, tunnel: Tunnel) -> Result<Transferred, CopyError> {
    let state = waypoint.state.load();
    let fail = |e: String| CopyError {
        cause: CopyCause::LocalWrite(io::Error::new(io::ErrorKind::ConnectionRefused, e)),
        transferred: Transferred::default(),
    };
    let endpoints = match &downstream.target {
        Target::Service { service, port } => endpoints_of(&state, service, *port),
        Target::Workload { workload, port } => endpoint_of(&state, workload, *port).into_iter().collect(),
    };
    let targets: Vec<SocketAddr> = endpoints.iter().map(|e| e.target).collect();
    let Some(i) = waypoint.balancer.pick(&targets, &[], (fastrand::u32(..), fastrand::u32(..))) else {
        tunnel.abort();
        return Err(fail("no endpoint".into()));
    };
    let _outstanding = waypoint.balancer.start(targets[i]);
    let upstream = match waypoint.upstreams.tunnel_to(&endpoints[i]).await {
        Ok(t) => t,
        Err(e) => {
            tunnel.abort();
            return Err(fail(e.to_string()));
        }
    };
    let (mut a, mut b) = (HboneIo(tunnel), upstream);
    match tokio::io::copy_bidirectional(&mut a, &mut b).await {
        Ok((to_tunnel, from_tunnel)) => Ok(Transferred { to_tunnel, from_tunnel }),
        Err(e) => Err(CopyError { cause: CopyCause::Tunnel(e), transferred: Transferred::default() }),
    }
}

/// The endpoints of `service` for `port`, each at the port's target port.
fn endpoints_of(state: &State, service: &ServiceEntry, port: u16) -> Vec<Endpoint> {
    let Some(p) = service.service().port(port) else { return Vec::new() };
    service.endpoints().iter().filter_map(|w| endpoint_of(state, w, p.target_port)).collect()
}

fn endpoint_of(_state: &State, workload: &WorkloadEntry, port: u16) -> Option<Endpoint> {
    let ip = workload.address()?;
    let identity = workload.identity().ok()?.clone();
    Some(Endpoint { hbone: SocketAddr::new(ip, HBONE_PORT), target: SocketAddr::new(ip, port), identity })
}

/// Why the waypoint answered instead of an endpoint (Envoy's response flags, where one fits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flag {
    None,
    /// No route matched.
    NoRoute,
    /// The chosen backend has no endpoint.
    NoHealthyUpstream,
    /// Every attempt failed to connect.
    ConnectFailure,
    /// The endpoint reset the request.
    Reset,
    /// A timeout answered 504.
    Timeout,
    /// The waypoint answered directly (a redirect, or all weights zero).
    Direct,
    /// L7 authorization refused it.
    Denied,
    /// An injected fault answered it.
    FaultInjected,
    /// The client's request could not be read.
    BadRequest,
}

impl Flag {
    fn as_str(self) -> &'static str {
        match self {
            Flag::None => "-",
            Flag::NoRoute => "NR",
            Flag::NoHealthyUpstream => "UH",
            Flag::ConnectFailure => "UF",
            Flag::Reset => "UR",
            Flag::Timeout => "UT",
            Flag::Direct => "DI",
            Flag::Denied => "RBAC",
            Flag::FaultInjected => "FI",
            Flag::BadRequest => "DPE",
        }
    }
}

/// What one request's record needs at its end.
struct Record {
    start: Instant,
    method: http::Method,
    path: String,
    protocol: &'static str,
    service: Arc<str>,
    service_name: String,
    service_namespace: String,
    request_bytes: Arc<AtomicU64>,
    attempts: u32,
    endpoint: Option<Arc<WorkloadEntry>>,
    /// Services (and ports) a copy of the request goes to.
    mirrors: Vec<(Arc<str>, u16)>,
    flag: Flag,
}

async fn handle(waypoint: &Arc<Waypoint>, downstream: &Arc<Downstream>, req: Request<Incoming>) -> Response<Body> {
    let state = waypoint.state.load();
    let protocol = if is_grpc(req.headers()) { "grpc" } else { "http" };
    let (service_key, service_name, service_namespace, hostname) = match &downstream.target {
        Target::Service { service, .. } => (
            service.key().clone(),
            service.service().name.clone(),
            service.service().namespace.clone(),
            service.hostname().clone(),
        ),
        Target::Workload { workload, .. } => {
            let w = workload.workload();
            (Arc::from(w.uid.as_str()), w.name.clone(), w.namespace.clone(), Arc::from(w.uid.as_str()))
        }
    };
    let mut record = Record {
        start: Instant::now(),
        method: req.method().clone(),
        path: req.uri().path_and_query().map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        protocol,
        service: hostname,
        service_name,
        service_namespace,
        request_bytes: Arc::new(AtomicU64::new(0)),
        attempts: 0,
        endpoint: None,
        mirrors: Vec::new(),
        flag: Flag::None,
    };
    let response = route_and_forward(waypoint, downstream, &state, &service_key, req, &mut record).await;
    observe(waypoint.clone(), downstream.clone(), record, response)
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// An answer of the waypoint's own.
fn local(status: StatusCode, flag: Flag, record: &mut Record, message: &str) -> Response<Body> {
    record.flag = flag;
    let mut r = Response::new(Full::new(Bytes::from(format!("{message}\n"))).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

async fn route_and_forward(
    waypoint: &Arc<Waypoint>,
    downstream: &Arc<Downstream>,
    state: &Arc<State>,
    service_key: &Arc<str>,
    mut req: Request<Incoming>,
    record: &mut Record,
) -> Response<Body> {
    // An HTTP/1.1 `Upgrade` (WebSocket): once the endpoint answers 101, the two connections are
    // joined and bytes copied both ways.
    let mut client_upgrade = (req.version() == Version::HTTP_11 && req.headers().contains_key(http::header::UPGRADE))
        .then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // L7 authorization first: a refused request reaches no route, no backend.
    if let Err(why) = authorize(state, downstream, &parts) {
        debug!(source = %downstream.source_identity, method = %parts.method, path = %parts.uri.path(), reason = %why, "request denied");
        return local(StatusCode::FORBIDDEN, Flag::Denied, record, "RBAC: access denied");
    }
    // The rule decides where the request goes; a direct call to a workload goes to it.
    let (rule, backend, candidates) = match &downstream.target {
        Target::Service { service, port } => {
            let routes = waypoint.routes(state, service);
            let Some(rule) = routes.table.find(&parts.method, &parts.uri, &parts.headers).cloned() else {
                return local(StatusCode::NOT_FOUND, Flag::NoRoute, record, "no route matches this request");
            };
            if let Some(fault) = rule.route.as_ref().and_then(|r| routes.faults.get(r)) {
                if let Some((delay, percent)) = fault.delay
                    && fastrand::u8(0..100) < percent
                {
                    tokio::time::sleep(delay).await;
                }
                if let Some((status, percent)) = fault.abort
                    && fastrand::u8(0..100) < percent
                {
                    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                    return local(status, Flag::FaultInjected, record, "fault filter abort");
                }
            }
            match rule.redirect(&parts, *port) {
                Some(Ok(redirection)) => {
                    record.flag = Flag::Direct;
                    return redirection.into_response().map(|()| Empty::new().map_err(|e| match e {}).boxed());
                }
                Some(Err(e)) => return local(StatusCode::INTERNAL_SERVER_ERROR, Flag::Direct, record, &e.to_string()),
                None => {}
            }
            if let Err(e) = rule.apply_request_filters(&mut parts) {
                return local(StatusCode::INTERNAL_SERVER_ERROR, Flag::Direct, record, &e.to_string());
            }
            let Some(index) = rule.pick_backend(fastrand::u32(..)).map(|b| backend_index(&rule, b)) else {
                return local(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Flag::Direct,
                    record,
                    "the rule has no backend with a weight above 0",
                );
            };
            let backend = &rule.backends[index];
            if let Err(e) = backend.apply_request_filters(&mut parts) {
                return local(StatusCode::INTERNAL_SERVER_ERROR, Flag::Direct, record, &e.to_string());
            }
            let (backend_service, backend_port) = backend.destination(*port);
            let Some(entry) = state.service(backend_service) else {
                return local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Flag::NoHealthyUpstream,
                    record,
                    "the backend service does not exist",
                );
            };
            let candidates = endpoints_of(state, entry, backend_port);
            for mirror in rule.mirrors(|| fastrand::u32(..)).chain(backend.mirrors(|| fastrand::u32(..))) {
                record.mirrors.push((mirror.service.clone(), mirror.port));
            }
            (Some(rule.clone()), Some(index), candidates)
        }
        Target::Workload { workload, port } => (None, None, endpoint_of(state, workload, *port).into_iter().collect()),
    };
    if candidates.is_empty() {
        return local(StatusCode::SERVICE_UNAVAILABLE, Flag::NoHealthyUpstream, record, "no endpoint is ready");
    }
    let policy = rule.as_ref().map(|r| r.policy().clone()).unwrap_or_default();
    let protocol = if parts.version == Version::HTTP_2 { Protocol::Http2 } else { Protocol::Http1 };
    let may_retry = policy.retry.as_ref().is_some_and(|r| r.attempts > 0) || !record.mirrors.is_empty();
    // A body that has already ended (most GETs) is kept as well: it costs nothing, and a
    // connect failure can then be retried without a retry policy.
    let mut body = if may_retry || body.is_end_stream() {
        match Prepared::read(body, waypoint.settings.retry_buffer).await {
            Ok(b) => b,
            Err(e) => {
                return local(
                    StatusCode::BAD_REQUEST,
                    Flag::BadRequest,
                    record,
                    &format!("cannot read the request body: {e}"),
                );
            }
        }
    } else {
        Prepared::Streaming { read: Vec::new(), rest: Some(body) }
    };
    if !record.mirrors.is_empty() {
        mirror(waypoint, state, &parts, &body, &record.mirrors, protocol);
    }
    let deadline = policy.request_timeout.map(|t| record.start + t);
    waypoint.retry_allowed(service_key, true);
    let max_attempts = 1 + if body.replayable() { policy.retry.as_ref().map_or(0, |r| r.attempts) } else { 0 };
    let targets: Vec<SocketAddr> = candidates.iter().map(|e| e.target).collect();
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut last: Option<Response<Body>> = None;
    // One attempt more after a connect failure, when there is no retry policy (below).
    let mut connect_retry = 0;
    for attempt in 0..max_attempts + 1 {
        if attempt >= max_attempts + connect_retry {
            break;
        }
        if attempt > 0 {
            if !waypoint.retry_allowed(service_key, false) {
                waypoint
                    .metrics
                    .retries_budget_exhausted
                    .get_or_create(&ServiceLabels { destination_service: record.service.to_string() })
                    .inc();
                break;
            }
            let backoff = policy.retry.as_ref().map_or(Duration::ZERO, |r| r.backoff_for(attempt));
            if deadline.is_some_and(|d| Instant::now() + backoff >= d) {
                break;
            }
            tokio::time::sleep(backoff).await;
            waypoint
                .metrics
                .retries
                .get_or_create(&ServiceLabels { destination_service: record.service.to_string() })
                .inc();
        }
        record.attempts = attempt + 1;
        let Some(i) = waypoint.balancer.pick(&targets, &tried, (fastrand::u32(..), fastrand::u32(..))) else { break };
        let endpoint = &candidates[i];
        tried.push(endpoint.target);
        record.endpoint = state.entry_by_ip(endpoint.target.ip()).cloned();
        let Some(attempt_body) = body.attempt(&record.request_bytes) else { break };
        let upstream_req = upstream_request(&parts, attempt_body, protocol);
        let outstanding = waypoint.balancer.start(endpoint.target);
        let send = waypoint.upstreams.send(endpoint, protocol, upstream_req);
        let limit = match (policy.backend_timeout, deadline) {
            (Some(t), Some(d)) => Some((Instant::now() + t).min(d)),
            (Some(t), None) => Some(Instant::now() + t),
            (None, d) => d,
        };
        let result = match limit {
            Some(l) => tokio::time::timeout_at(l.into(), send).await.ok(),
            None => Some(send.await),
        };
        drop(outstanding);
        match result {
            None => {
                // This attempt timed out: retried like a failure if the overall deadline allows.
                last = Some(local(StatusCode::GATEWAY_TIMEOUT, Flag::Timeout, record, "upstream request timeout"));
                failed(waypoint, endpoint.target, record);
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
            }
            Some(Err(e)) => {
                let connect = e.is_connect();
                warn_once(&e);
                failed(waypoint, endpoint.target, record);
                last = Some(if connect {
                    local(StatusCode::SERVICE_UNAVAILABLE, Flag::ConnectFailure, record, "upstream connect error")
                } else {
                    local(StatusCode::BAD_GATEWAY, Flag::Reset, record, "upstream reset before the response")
                });
                // A connect failure is retried once even without a retry policy: nothing was
                // sent.
                if connect && max_attempts == 1 && body.replayable() && tried.len() < targets.len() {
                    connect_retry = 1;
                }
            }
            Some(Ok(mut response)) => {
                if response.status() == StatusCode::SWITCHING_PROTOCOLS
                    && let Some(client) = client_upgrade.take()
                {
                    join_upgrades(client, hyper::upgrade::on(&mut response));
                    record.flag = Flag::None;
                    return response.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed());
                }
                // A gRPC error answered without a body (trailers-only: its grpc-status in the
                // headers) counts as the HTTP status the gRPC spec maps it to.
                let status = grpc_equivalent(response.headers()).unwrap_or(response.status());
                waypoint.balancer.record(endpoint.target, status.is_server_error());
                let retriable = policy.retry.as_ref().is_some_and(|r| r.retries_status(status));
                record.flag = Flag::None;
                let mut response = response.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed());
                if let Some(rule) = &rule {
                    rule.apply_response_filters(response.headers_mut());
                    if let Some(b) = backend {
                        rule.backends[b].apply_response_filters(response.headers_mut());
                    }
                }
                if retriable && attempt + 1 < max_attempts {
                    last = Some(response);
                    continue;
                }
                return response;
            }
        }
    }
    last.unwrap_or_else(|| {
        local(StatusCode::SERVICE_UNAVAILABLE, Flag::ConnectFailure, record, "no attempt could be made")
    })
}

/// The policies that target the services of this tunnel (the one it was addressed to, or, for
/// a workload dialed directly, every service of this waypoint that selects it), decided for
/// this request from the proven client identity and the believed source address.
fn authorize(state: &State, downstream: &Downstream, parts: &http::request::Parts) -> Result<(), String> {
    let (services, port): (Vec<&ServiceEntry>, u16) = match &downstream.target {
        Target::Service { service, port } => (vec![&**service], *port),
        Target::Workload { workload, port } => (state.services_of(workload.workload()).map(|s| &**s).collect(), *port),
    };
    let policies = state.authorizations().filter(|a| services.iter().any(|s| a.targets_service(s.service())));
    let conn = ztunnel::authz::Connection {
        identity: Some(&downstream.source_identity),
        source_ip: downstream.source_addr,
        dest_port: port,
        request: Some((parts.method.as_str(), parts.uri.path())),
    };
    match ztunnel::authz::check(policies, &conn) {
        ztunnel::authz::Verdict::Allow => Ok(()),
        ztunnel::authz::Verdict::Deny(why) => Err(why),
    }
}

/// Copies between the client's and the endpoint's upgraded connections until both end.
fn join_upgrades(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        match tokio::try_join!(client, upstream) {
            Ok((client, upstream)) => {
                let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    debug!(error = %e, "upgraded connection ended");
                }
            }
            Err(e) => debug!(error = %e, "upgrade failed"),
        }
    });
}

/// The HTTP status a trailers-only gRPC answer stands for (its `grpc-status` in the headers),
/// as gRPC's HTTP mapping pairs them: UNAVAILABLE 503, DEADLINE_EXCEEDED 504,
/// RESOURCE_EXHAUSTED 429, UNIMPLEMENTED 501, INTERNAL and UNKNOWN 500; none for success or
/// for a status that lives in the trailers.
fn grpc_equivalent(headers: &HeaderMap) -> Option<StatusCode> {
    let code: u32 = headers.get("grpc-status")?.to_str().ok()?.trim().parse().ok()?;
    Some(match code {
        14 => StatusCode::SERVICE_UNAVAILABLE,
        4 => StatusCode::GATEWAY_TIMEOUT,
        8 => StatusCode::TOO_MANY_REQUESTS,
        12 => StatusCode::NOT_IMPLEMENTED,
        2 | 13 => StatusCode::INTERNAL_SERVER_ERROR,
        _ => return None,
    })
}

/// The index of `backend` in its rule.
fn backend_index(rule: &Rule, backend: &crate::route::Backend) -> usize {
    rule.backends.iter().position(|b| std::ptr::eq(b, backend)).unwrap_or(0)
}

/// Sends a copy of the request to each mirror, when its body was read whole; the answers are
/// dropped and never delay the request.
fn mirror(
    waypoint: &Arc<Waypoint>,
    state: &State,
    parts: &http::request::Parts,
    body: &Prepared,
    mirrors: &[(Arc<str>, u16)],
    protocol: Protocol,
) {
    let Prepared::Buffered { .. } = body else {
        debug!("request body too large to mirror");
        return;
    };
    for (service, port) in mirrors {
        let Some(entry) = state.service(service) else { continue };
        let endpoints = endpoints_of(state, entry, *port);
        let targets: Vec<SocketAddr> = endpoints.iter().map(|e| e.target).collect();
        let Some(i) = waypoint.balancer.pick(&targets, &[], (fastrand::u32(..), fastrand::u32(..))) else { continue };
        let mut copy = match body {
            Prepared::Buffered { data, trailers } => {
                Prepared::Buffered { data: data.clone(), trailers: trailers.clone() }
            }
            Prepared::Streaming { .. } => return,
        };
        let Some(b) = copy.attempt(&Arc::new(AtomicU64::new(0))) else { continue };
        let req = upstream_request(parts, b, protocol);
        let (waypoint, endpoint) = (waypoint.clone(), endpoints[i].clone());
        tokio::spawn(async move {
            let sent =
                tokio::time::timeout(Duration::from_secs(30), waypoint.upstreams.send(&endpoint, protocol, req)).await;
            if let Ok(Ok(response)) = sent {
                let _ = response.into_body().collect().await;
            }
        });
    }
}

/// Records a failed attempt on `target` with the balancer, counting an ejection it causes.
fn failed(waypoint: &Waypoint, target: SocketAddr, record: &Record) {
    if waypoint.balancer.record(target, true) {
        waypoint
            .metrics
            .ejections
            .get_or_create(&ServiceLabels { destination_service: record.service.to_string() })
            .inc();
    }
}

fn warn_once(e: &UpstreamError) {
    debug!(error = %e, "attempt failed");
}

/// The request as sent to an endpoint: HTTP/1.1 in origin form with its `Host`; HTTP/2 with
/// the client's authority.
fn upstream_request(parts: &http::request::Parts, body: Body, protocol: Protocol) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.headers_mut() = parts.headers.clone();
    let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    match protocol {
        Protocol::Http1 => {
            *req.version_mut() = Version::HTTP_11;
            *req.uri_mut() = Uri::from(path);
            if !req.headers().contains_key(http::header::HOST)
                && let Some(a) = parts.uri.authority()
                && let Ok(v) = HeaderValue::from_str(a.as_str())
            {
                req.headers_mut().insert(http::header::HOST, v);
            }
        }
        Protocol::Http2 => {
            *req.version_mut() = Version::HTTP_2;
            let authority = parts
                .uri
                .authority()
                .map(|a| a.as_str().to_owned())
                .or_else(|| parts.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned))
                .unwrap_or_else(|| "localhost".to_owned());
            let uri = Uri::builder().scheme("http").authority(authority).path_and_query(path).build();
            *req.uri_mut() = uri.unwrap_or_else(|_| parts.uri.clone());
            req.headers_mut().remove(http::header::HOST);
        }
    }
    strip_hop_by_hop(req.headers_mut());
    req
}

/// Connection-level headers are not forwarded (RFC 9110 §7.6.1), except an upgrade's.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let upgrade = headers.contains_key(http::header::UPGRADE);
    for h in ["keep-alive", "proxy-connection", "transfer-encoding"] {
        headers.remove(h);
    }
    if !upgrade {
        headers.remove(http::header::CONNECTION);
    }
}

/// Wraps the response body so that its end records the request's metrics and access line.
fn observe(
    waypoint: Arc<Waypoint>,
    downstream: Arc<Downstream>,
    record: Record,
    response: Response<Body>,
) -> Response<Body> {
    let status = response.status();
    let header_grpc = response.headers().get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let headers_at = record.start.elapsed();
    response.map(move |body| {
        Observed::new(body, move |bytes: u64, trailers: Option<&HeaderMap>, complete: bool| {
            let grpc = trailers
                .and_then(|t| t.get("grpc-status"))
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .or(header_grpc);
            finish(&waypoint, &downstream, &record, status, grpc, bytes, headers_at, complete);
        })
        .boxed()
    })
}

#[allow(clippy::too_many_arguments)]
fn finish(
    waypoint: &Waypoint,
    downstream: &Downstream,
    record: &Record,
    status: StatusCode,
    grpc: Option<String>,
    response_bytes: u64,
    headers_at: Duration,
    complete: bool,
) {
    let (dw, dns, dp, version) = match &record.endpoint {
        Some(e) => {
            let w = e.workload();
            (
                w.name.clone(),
                w.namespace.clone(),
                e.identity().map_or_else(|_| "unknown".to_owned(), |i| i.to_string()),
                w.labels
                    .get("version")
                    .or_else(|| w.labels.get("app.kubernetes.io/version"))
                    .cloned()
                    .unwrap_or_else(|| "unknown".into()),
            )
        }
        None => ("unknown".into(), "unknown".into(), "unknown".into(), "unknown".into()),
    };
    let labels = RequestLabels {
        reporter: "waypoint",
        source_workload: downstream.source.workload.clone(),
        source_workload_namespace: downstream.source.namespace.clone(),
        source_principal: downstream.source.principal.clone(),
        destination_workload: dw.clone(),
        destination_workload_namespace: dns,
        destination_principal: dp,
        destination_service: record.service.to_string(),
        destination_service_name: record.service_name.clone(),
        destination_service_namespace: record.service_namespace.clone(),
        destination_version: version.clone(),
        request_protocol: record.protocol,
        response_code: status.as_u16(),
        grpc_response_status: grpc.clone().unwrap_or_default(),
        response_flags: record.flag.as_str(),
        connection_security_policy: "mutual_tls",
    };
    let request_bytes = record.request_bytes.load(Ordering::Relaxed);
    let m = &waypoint.metrics;
    m.requests.get_or_create(&labels).inc();
    m.duration.get_or_create(&labels).observe(headers_at.as_secs_f64() * 1000.0);
    m.request_bytes.get_or_create(&labels).observe(request_bytes as f64);
    m.response_bytes.get_or_create(&labels).observe(response_bytes as f64);
    tracing::event!(
        target: "access",
        tracing::Level::INFO,
        src.addr = %downstream.source_addr,
        src.workload = %downstream.source.workload,
        src.namespace = %downstream.source.namespace,
        src.identity = %downstream.source_identity,
        dst.service = %record.service,
        dst.workload = %dw,
        dst.version = %version,
        method = %record.method,
        path = %record.path,
        protocol = record.protocol,
        status = status.as_u16(),
        grpc_status = grpc.as_deref().unwrap_or("-"),
        flags = record.flag.as_str(),
        attempts = record.attempts,
        bytes_sent = request_bytes,
        bytes_received = response_bytes,
        duration_ms = record.start.elapsed().as_millis() as u64,
        complete,
        "request"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trailers_only_grpc_error_stands_for_its_http_status() {
        let headers = |status: &str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-status", HeaderValue::from_str(status).unwrap());
            h
        };
        assert_eq!(grpc_equivalent(&headers("14")), Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(grpc_equivalent(&headers("4")), Some(StatusCode::GATEWAY_TIMEOUT));
        assert_eq!(grpc_equivalent(&headers("8")), Some(StatusCode::TOO_MANY_REQUESTS));
        assert_eq!(grpc_equivalent(&headers("13")), Some(StatusCode::INTERNAL_SERVER_ERROR));
        // Success, a client's own error, and no status in the headers: the HTTP status stands.
        assert_eq!(grpc_equivalent(&headers("0")), None);
        assert_eq!(grpc_equivalent(&headers("5")), None);
        assert_eq!(grpc_equivalent(&headers("x")), None);
        assert_eq!(grpc_equivalent(&HeaderMap::new()), None);
        // Retried like the status it stands for.
        let policy = crate::route::RetryPolicy {
            attempts: 2,
            codes: vec![StatusCode::SERVICE_UNAVAILABLE],
            backoff: Duration::from_millis(1),
        };
        assert!(policy.retries_status(grpc_equivalent(&headers("14")).unwrap_or(StatusCode::OK)));
    }
}
