//! The waypoint in process, on loopback, without root: the production data path
//! (`hbone::Server` with [`waypoint::proxy::Tunnels`], routes, retries, the upstream pool and
//! balancer) between a test's HBONE client and three pods.
//!
//! ```text
//!  test client ─HBONE (mTLS, id shop/productpage) CONNECT <VIP>:9080─► waypoint P.100:<port>
//!      HTTP/1.1 or HTTP/2 on the tunnel ─► routes ─► HBONE (id shop/wp) to P.<i>:15008,
//!      CONNECT P.<i>:8080 ─► pod i's HBONE server (AllowAll) ─► pod i's app on P.<i>:8080
//! ```
//!
//! `P` is a `127.a.b` prefix of the test's own (tests run in parallel, and other test
//! processes may hold loopback addresses too: a prefix where a bind fails is dropped whole).
//! The pods are `reviews-v1`, `-v2`, `-v3` (labels `app: reviews`, `version: vN`); the
//! services `reviews` (all three, the waypoint's, VIP `P.200`), and `reviews-v1` / `-v2` /
//! `-v3` (one pod each), every one port 9080 → 8080. Each app answers with its version (body
//! and `x-version`), counts requests and body bytes, and can be told to answer a fixed status,
//! fail every n-th request with 503, or be slow; a gRPC request gets `grpc-status: 0` in
//! trailers.

#![allow(dead_code)] // each test binary uses a different part

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hbone::testing::{AllowAll, Pki, id};
use hbone::{ConnectRequest, Tunnel, WorkloadCert, drain};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshapi::{HttpRoute, MtlsMode, Service, ServicePort, Snapshot, Workload};
use serde_json::Value;
use tokio::net::TcpListener;
use waypoint::metrics::{Metrics, ServiceLabels};
use waypoint::proxy::{Settings, Tunnels, Waypoint};
use waypoint::upstream::Upstreams;
use ztunnel::state::StateStore;

/// The apps' port (every service's `targetPort`).
pub const APP_PORT: u16 = 8080;
/// Every service's port.
pub const SERVICE_PORT: u16 = 9080;
/// The pods' versions, in address order (`P.1`, `P.2`, `P.3`).
pub const VERSIONS: [&str; 3] = ["v1", "v2", "v3"];
/// The host the clients name.
pub const HOST: &str = "reviews.shop.svc.cluster.local:9080";
/// How long any one request may take before a test fails (every wait is bounded).
pub const REQUEST_LIMIT: Duration = Duration::from_secs(10);

/// A test's mesh: three pods, their services, the waypoint, and a client identity.
pub struct Mesh {
    pub prefix: [u8; 3],
    pub pki: Pki,
    pub state: StateStore,
    /// One per pod, in [`VERSIONS`] order.
    pub apps: Vec<Arc<App>>,
    /// The pods' HBONE servers (their stats count tunnels and resets).
    pub pods: Vec<hbone::Server<AllowAll>>,
    pub waypoint: Arc<Waypoint>,
    /// The waypoint's HBONE server.
    pub server: hbone::Server<Tunnels>,
    pub waypoint_addr: SocketAddr,
    client: hbone::Client,
    client_cert: WorkloadCert,
    /// What the state holds besides the fixed pods and services.
    config: Mutex<Config>,
    /// The waypoint's drain (listener and tunnels), as the binary's.
    drain: Option<drain::Trigger>,
    _pods_drain: drain::Trigger,
}

impl Mesh {
    /// The mesh with `routes` attached to `reviews`.
    pub async fn start(settings: Settings, routes: Vec<HttpRoute>) -> Mesh {
        init_logs();
        let mut last_error = None;
        for _ in 0..20 {
            match Mesh::bind(settings.clone(), routes.clone()).await {
                Ok(mesh) => return mesh,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last_error = Some(e),
                Err(e) => panic!("starting the loopback mesh: {e}"),
            }
        }
        panic!("no free loopback prefix: {last_error:?}");
    }

    async fn bind(settings: Settings, routes: Vec<HttpRoute>) -> std::io::Result<Mesh> {
        let prefix = prefix();
        let ip = |last: u8| IpAddr::V4(Ipv4Addr::new(prefix[0], prefix[1], prefix[2], last));
        // Everything is bound before anything runs: a prefix another process holds is dropped
        // whole.
        let mut listeners = Vec::new();
        for i in 1..=VERSIONS.len() as u8 {
            let app = TcpListener::bind((ip(i), APP_PORT)).await?;
            let hbone = TcpListener::bind((ip(i), waypoint::proxy::HBONE_PORT)).await?;
            listeners.push((app, hbone));
        }
        let waypoint_l = TcpListener::bind((ip(100), 0)).await?;
        let waypoint_addr = waypoint_l.local_addr()?;

        let pki = Pki::new();
        let state = StateStore::default();
        check_routes(&routes);
        let config = Config { routes, unreachable: false };
        state.replace(snapshot(prefix, &config));

        let (pods_drain, pods_watch) = drain::channel();
        let mut apps = Vec::new();
        let mut pods = Vec::new();
        for ((app_l, hbone_l), version) in listeners.into_iter().zip(VERSIONS) {
            let app = Arc::new(App::new(version));
            tokio::spawn(serve_app(app_l, app.clone()));
            apps.push(app);
            let cert = pki.workload("shop", "reviews");
            let server = hbone::Server::new(hbone::Config::default(), Arc::new(cert), &pki.trust, AllowAll);
            let (s, w) = (server.clone(), pods_watch.clone());
            tokio::spawn(async move { s.serve(hbone_l, w).await });
            pods.push(server);
        }
        drop(pods_watch);

        let wp_cert = pki.workload("shop", "wp");
        let (trigger, watch) = drain::channel();
        let upstreams =
            Upstreams::new(hbone::Client::new(hbone::Config::default(), pki.trust.clone()), wp_cert.clone());
        let waypoint = Arc::new(Waypoint::new(
            "shop/wp".into(),
            state.clone(),
            pki.trust.clone(),
            upstreams,
            Arc::new(Metrics::default()),
            settings,
            watch.clone(),
        ));
        let server =
            hbone::Server::new(hbone::Config::default(), Arc::new(wp_cert), &pki.trust, Tunnels(waypoint.clone()));
        let s = server.clone();
        tokio::spawn(async move { s.serve(waypoint_l, watch).await });

        let client = hbone::Client::new(hbone::Config::default(), pki.trust.clone());
        let client_cert = pki.workload("shop", "productpage");
        Ok(Mesh {
            prefix,
            pki,
            state,
            apps,
            pods,
            waypoint,
            server,
            waypoint_addr,
            client,
            client_cert,
            config: Mutex::new(config),
            drain: Some(trigger),
            _pods_drain: pods_drain,
        })
    }

    /// The address of pod `i` (1-based) or another host of the prefix.
    pub fn ip(&self, last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], last))
    }

    /// The app of `version`.
    pub fn app(&self, version: &str) -> &App {
        self.apps.iter().find(|a| a.version == version).unwrap_or_else(|| panic!("no app {version}"))
    }

    /// Requests each app received, in [`VERSIONS`] order.
    pub fn counts(&self) -> Vec<u64> {
        self.apps.iter().map(|a| a.requests.load(Ordering::Relaxed)).collect()
    }

    /// Requests all apps received.
    pub fn total(&self) -> u64 {
        self.counts().iter().sum()
    }

    /// Makes `reviews` have exactly `routes` (the state replaced, as a controller update).
    pub fn set_routes(&self, routes: Vec<HttpRoute>) {
        check_routes(&routes);
        self.update(|c| c.routes = routes);
    }

    /// Adds a fourth endpoint to `reviews`, `reviews-v4` at `P.4`, where nothing listens: a
    /// tunnel to it is refused.
    pub fn add_unreachable_endpoint(&self) {
        self.update(|c| c.unreachable = true);
    }

    fn update(&self, change: impl FnOnce(&mut Config)) {
        let mut config = self.config.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut config);
        self.state.replace(snapshot(self.prefix, &config));
    }

    /// The waypoint's count of retries to `reviews` (and its subsets).
    pub fn retries(&self) -> u64 {
        self.waypoint.metrics.retries.get_or_create(&service_labels()).get()
    }

    /// The waypoint's count of retries refused by the budget.
    pub fn retries_refused(&self) -> u64 {
        self.waypoint.metrics.retries_budget_exhausted.get_or_create(&service_labels()).get()
    }

    /// A new HBONE tunnel to the `reviews` service through the waypoint.
    pub async fn tunnel(&self) -> Tunnel {
        self.tunnel_to(SocketAddr::new(self.ip(200), SERVICE_PORT)).await
    }

    /// A new HBONE tunnel through the waypoint to `target` (`reviews-tcp`: `ip(210)`).
    pub async fn tunnel_to(&self, target: SocketAddr) -> Tunnel {
        let request = ConnectRequest {
            source: self.client_cert.clone(),
            source_ip: None,
            destination: self.waypoint_addr,
            expected: Arc::from([id("shop", "wp")]),
            target,
            forwarded_for: None,
            baggage: None,
            traceparent: None,
        };
        tokio::time::timeout(REQUEST_LIMIT, self.client.connect(request))
            .await
            .expect("tunnel to the waypoint in time")
            .expect("tunnel to the waypoint")
    }

    /// An HTTP/1.1 connection to `reviews` over a new tunnel.
    pub async fn http1(&self) -> http1::SendRequest<ClientBody> {
        let (sender, conn) = http1::handshake(TokioIo::new(self.tunnel().await)).await.expect("HTTP/1.1 handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        sender
    }

    /// An HTTP/2 connection to `reviews` over a new tunnel.
    pub async fn http2(&self) -> http2::SendRequest<ClientBody> {
        let (sender, conn) =
            http2::handshake(TokioExecutor::new(), TokioIo::new(self.tunnel().await)).await.expect("HTTP/2 handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        sender
    }

    /// Starts the waypoint's drain, as SIGTERM does; resolves when it is over.
    pub fn drain(&mut self, deadline: Duration) -> impl Future<Output = drain::Outcome> + use<> {
        let trigger = self.drain.take().expect("drained once");
        trigger.drain(deadline)
    }
}

/// One pod's application.
pub struct App {
    pub version: &'static str,
    /// Requests received (counted when their headers arrive).
    pub requests: AtomicU64,
    /// Request body bytes received.
    pub body_bytes: AtomicU64,
    /// Requests whose body could not be read whole.
    pub body_errors: AtomicU64,
    /// Answer with this status (0: 200).
    pub status: AtomicU16,
    /// Answer every n-th request (by count) with 503 (0: never).
    pub fail_every: AtomicU64,
    /// Wait this long before answering.
    pub delay_ms: AtomicU64,
}

impl App {
    fn new(version: &'static str) -> App {
        App {
            version,
            requests: AtomicU64::new(0),
            body_bytes: AtomicU64::new(0),
            body_errors: AtomicU64::new(0),
            status: AtomicU16::new(0),
            fail_every: AtomicU64::new(0),
            delay_ms: AtomicU64::new(0),
        }
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn answer(&self, status: u16) {
        self.status.store(status, Ordering::Relaxed);
    }

    pub fn fail_every(&self, n: u64) {
        self.fail_every.store(n, Ordering::Relaxed);
    }

    pub fn delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::Relaxed);
    }
}

async fn serve_app(listener: TcpListener, app: Arc<App>) {
    while let Ok((tcp, _)) = listener.accept().await {
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(app.clone(), req));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service).await;
        });
    }
}

async fn answer(app: Arc<App>, mut req: Request<Incoming>) -> Result<Response<ClientBody>, Infallible> {
    let n = app.requests.fetch_add(1, Ordering::Relaxed) + 1;
    // `upgrade: echo`: switch protocols, then echo what comes, prefixed with the version.
    if req.headers().get(http::header::UPGRADE).is_some_and(|v| v == "echo") {
        let upgrade = hyper::upgrade::on(&mut req);
        let version = app.version;
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Ok(upgraded) = upgrade.await else { return };
            let mut io = TokioIo::new(upgraded);
            let _ = io.write_all(version.as_bytes()).await;
            let mut buf = [0u8; 1024];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()).boxed());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut().insert(http::header::UPGRADE, HeaderValue::from_static("echo"));
        r.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("upgrade"));
        return Ok(r);
    }
    let grpc = is_grpc(req.headers());
    match req.into_body().collect().await {
        Ok(body) => {
            app.body_bytes.fetch_add(body.to_bytes().len() as u64, Ordering::Relaxed);
        }
        Err(_) => {
            app.body_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    let delay = app.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let fixed = app.status.load(Ordering::Relaxed);
    let status = match (fixed, app.fail_every.load(Ordering::Relaxed)) {
        (0, every) if every > 0 && n.is_multiple_of(every) => StatusCode::SERVICE_UNAVAILABLE,
        (0, _) => StatusCode::OK,
        (s, _) => StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
    };
    let body = Full::new(Bytes::from_static(app.version.as_bytes()));
    let mut response = if grpc {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.insert("grpc-message", HeaderValue::from_static("ok"));
        let mut r = Response::new(body.with_trailers(async move { Some(Ok(trailers)) }).boxed());
        r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        r
    } else {
        Response::new(body.boxed())
    };
    *response.status_mut() = status;
    response.headers_mut().insert("x-version", HeaderValue::from_static(app.version));
    Ok(response)
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The body of every request the tests send and of every app answer.
pub type ClientBody = BoxBody<Bytes, Infallible>;

/// A GET for `path`, HTTP/1.1 style (origin form, `Host`).
pub fn get(path: &str) -> Request<ClientBody> {
    request(http::Method::GET, path, empty())
}

/// A request, HTTP/1.1 style (origin form, `Host`).
pub fn request(method: http::Method, path: &str, body: ClientBody) -> Request<ClientBody> {
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = path.parse().expect("a test path");
    req.headers_mut().insert(http::header::HOST, HeaderValue::from_static(HOST));
    req
}

/// A GET for `path`, HTTP/2 style (absolute form).
pub fn get2(path: &str) -> Request<ClientBody> {
    let mut req = Request::new(empty());
    *req.uri_mut() = format!("http://{HOST}{path}").parse().expect("a test URI");
    *req.version_mut() = http::Version::HTTP_2;
    req
}

pub fn empty() -> ClientBody {
    Full::new(Bytes::new()).boxed()
}

/// A body of `chunks` chunks of `size` bytes with no length announced (HTTP/1.1 chunked).
pub fn chunked(chunks: usize, size: usize) -> ClientBody {
    Chunks { left: chunks, chunk: Bytes::from(vec![b'x'; size]) }.boxed()
}

struct Chunks {
    left: usize,
    chunk: Bytes,
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        self.left -= 1;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.clone()))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// What the client got.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    /// The answering app's `x-version`.
    pub version: Option<String>,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

/// Sends `req` on an HTTP/1.1 connection and reads the whole answer, within [`REQUEST_LIMIT`].
pub async fn send1(sender: &mut http1::SendRequest<ClientBody>, req: Request<ClientBody>) -> Reply {
    tokio::time::timeout(REQUEST_LIMIT, async {
        sender.ready().await.expect("HTTP/1.1 connection ready");
        read(sender.send_request(req).await.expect("an HTTP/1.1 response")).await
    })
    .await
    .expect("a response in time")
}

/// Sends `req` on an HTTP/2 connection and reads the whole answer, within [`REQUEST_LIMIT`].
pub async fn send2(sender: &http2::SendRequest<ClientBody>, req: Request<ClientBody>) -> Reply {
    let mut sender = sender.clone();
    tokio::time::timeout(REQUEST_LIMIT, async {
        sender.ready().await.expect("HTTP/2 connection ready");
        read(sender.send_request(req).await.expect("an HTTP/2 response")).await
    })
    .await
    .expect("a response in time")
}

async fn read(response: Response<Incoming>) -> Reply {
    let status = response.status();
    let version = response.headers().get("x-version").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let collected = response.into_body().collect().await.expect("the whole response body");
    let trailers = collected.trailers().cloned();
    Reply { status, version, body: collected.to_bytes(), trailers }
}

/// An `HTTPRoute` named `name` in `shop`, attached to `reviews`, with `spec`.
pub fn route(name: &str, spec: Value) -> HttpRoute {
    HttpRoute { name: name.into(), namespace: "shop".into(), parents: vec!["shop/reviews".into()], spec, fault: None }
}

/// A route sending everything to `reviews` with the rule's `extra` fields (timeouts, retry).
pub fn all_to_reviews(extra: Value) -> HttpRoute {
    let mut rule = serde_json::json!({"backendRefs": [{"name": "reviews", "port": SERVICE_PORT}]});
    if let (Some(rule), Value::Object(extra)) = (rule.as_object_mut(), extra) {
        rule.extend(extra);
    }
    route("all", serde_json::json!({"rules": [rule]}))
}

/// A test's route must mean what it says: a rule the waypoint would skip fails the test.
fn check_routes(routes: &[HttpRoute]) {
    for r in routes {
        let parsed = meshapi::httproute::parse(&r.namespace, &r.spec);
        assert!(parsed.problems.is_empty(), "route {}: {:?}", r.name, parsed.problems);
    }
}

/// What a test changes in the state.
struct Config {
    routes: Vec<HttpRoute>,
    /// Whether `reviews-v4` (nothing listening) is an endpoint.
    unreachable: bool,
}

fn service_labels() -> ServiceLabels {
    ServiceLabels { destination_service: "reviews.shop.svc.cluster.local".into() }
}

fn snapshot(prefix: [u8; 3], config: &Config) -> Snapshot {
    let ip = |last: u8| IpAddr::V4(Ipv4Addr::new(prefix[0], prefix[1], prefix[2], last));
    let unreachable = config.unreachable.then_some("v4");
    let workloads = VERSIONS
        .iter()
        .copied()
        .chain(unreachable)
        .zip(1u8..)
        .map(|(version, i)| Workload {
            uid: format!("shop/reviews-{version}"),
            name: format!("reviews-{version}"),
            namespace: "shop".into(),
            node: "node-a".into(),
            addresses: vec![ip(i)],
            service_account: "reviews".into(),
            labels: [("app".to_owned(), "reviews".to_owned()), ("version".to_owned(), version.to_owned())].into(),
            enrolled: true,
            mtls: MtlsMode::Strict,
            waypoint: None,
        })
        .collect();
    let service = |name: String, vip: u8, selector: &[(&str, &str)], waypoint: Option<&str>| Service {
        hostname: format!("{name}.shop.svc.cluster.local"),
        name,
        namespace: "shop".into(),
        vips: vec![ip(vip)],
        ports: vec![ServicePort { port: SERVICE_PORT, target_port: APP_PORT, app_protocol: None }],
        selector: selector.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        waypoint: waypoint.map(str::to_owned),
    };
    let mut services = vec![service("reviews".into(), 200, &[("app", "reviews")], Some("shop/wp"))];
    // The same pods behind a port the waypoint forwards at L4.
    let mut tcp = service("reviews-tcp".into(), 210, &[("app", "reviews")], Some("shop/wp"));
    tcp.ports[0].app_protocol = Some("tcp".into());
    services.push(tcp);
    for (version, vip) in VERSIONS.iter().zip(201u8..) {
        services.push(service(format!("reviews-{version}"), vip, &[("app", "reviews"), ("version", version)], None));
    }
    Snapshot {
        trust_domain: "cluster.local".into(),
        workloads,
        services,
        authorizations: Vec::new(),
        waypoints: vec![meshapi::Waypoint {
            name: "wp".into(),
            namespace: "shop".into(),
            addresses: vec![ip(100)],
            service_account: "wp".into(),
        }],
        http_routes: config.routes.clone(),
    }
}

/// A `127.a.b` prefix no other test of this process uses.
fn prefix() -> [u8; 3] {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let n = (std::process::id() as u16).wrapping_mul(167).wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed));
    // Not 127.0.0.0/16, where everyone's 127.0.0.1 lives.
    [127, 1 + (n >> 8) as u8 % 254, n as u8]
}

/// Logs to the test's output with `WEFT_TEST_LOG=debug` (or `info`, `trace`).
fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(level) = std::env::var("WEFT_TEST_LOG") else { return };
        let level = level.parse().unwrap_or(tracing::Level::DEBUG);
        let _ = tracing_subscriber::fmt().with_max_level(level).with_test_writer().try_init();
    });
}
