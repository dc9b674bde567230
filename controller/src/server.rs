//! The controller's HTTP servers.
//!
//! - **API** (`:15012`, TLS, HTTP/1.1 and HTTP/2): the watch stream, acknowledgements and
//!   certificate signing (`docs/PROTOCOL.md`). Every call carries a credential
//!   (`authorization: Bearer <token>`), which [`Authenticator`] maps to a [`Caller`]: a node
//!   or a service account. A call acts for its caller only: a watch or acknowledgement names
//!   the caller itself; a node obtains the identities of the workloads scheduled on it, a
//!   service account its own identity while the model holds a waypoint run as it.
//! - **admin** (`127.0.0.1:15000`): `GET /status` and `GET /resources[?kind=<Kind>]`, read by
//!   `weft get`.
//! - **metrics** (`:15020/metrics`) and **readiness** (`:15021/healthz/ready`).
//!
//! Errors are answered once, at the edge: each handler returns an [`ApiError`] whose variant
//! decides the status code and the stable `reason` of the JSON error body.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Channel, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshapi::Kind;
use meshapi::certificate::{CERTIFICATES_PATH, CertificateRequest, CertificateResponse, ErrorBody};
use meshapi::watch::{ACK_PATH, Ack, Cursor, Message, Subscriber, WATCH_PATH};
use tokio::net::TcpListener;
use tokio::sync::broadcast::error::RecvError;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use hbone::drain;

use crate::auth::{Authenticator, Caller};
use crate::ca::Authority;
use crate::metrics::{CertificateLabels, Metrics, RequestLabels};
use crate::source::Rejection;
use crate::store::{First, Store};

/// Largest request body accepted (a CSR or an acknowledgement with rejections): 1 MiB.
const MAX_BODY: usize = 1 << 20;

/// Everything the handlers need.
pub struct Api {
    pub store: Arc<Store>,
    pub authority: Arc<Authority>,
    pub authenticator: Arc<dyn Authenticator>,
    pub metrics: Arc<Metrics>,
    /// Heartbeat interval on idle watch streams.
    pub heartbeat: Duration,
    /// Lifetime of certificates when the request does not ask for one.
    pub cert_ttl: Duration,
    /// Source objects currently rejected, for `/status`.
    pub rejections: Arc<std::sync::Mutex<Vec<Rejection>>>,
    /// Set once the first scan of the source is committed.
    pub ready: Arc<AtomicBool>,
}

type Body = BoxBody<Bytes, Infallible>;

/// Why an API call failed; decides the status code and the error body's `reason`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no credential: send `authorization: Bearer <token>`")]
    NoCredential,
    #[error("credential refused: {0}")]
    BadCredential(String),
    /// A node named another subscriber.
    #[error("{caller} may not act for {asked}")]
    OtherNode { caller: Caller, asked: Subscriber },
    /// A service account named another subscriber.
    #[error("{caller} may act only for itself, not for {asked}")]
    OtherCaller { caller: Caller, asked: Subscriber },
    #[error("{0}")]
    BadRequest(String),
    #[error("invalid CSR: {0}")]
    InvalidCsr(String),
    #[error(
        "node {node} runs no workload with identity {identity}; certificates are issued only for workloads scheduled on the calling node and captured by the mesh"
    )]
    ForbiddenIdentity { node: String, identity: String },
    #[error(
        "service account {account} may obtain only its own identity {own}, not {identity}; a node's \
         proxy obtains the identities of the workloads on its node"
    )]
    NotOwnIdentity { account: String, own: String, identity: String },
    #[error(
        "service account {account} serves no waypoint: its identity {identity} is issued only while \
         a Gateway of class weft-waypoint named {name} in namespace {namespace} has a pod with an address"
    )]
    NoWaypoint { account: String, namespace: String, name: String, identity: String },
    #[error("certificate refused: {0}")]
    Refused(String),
    #[error("the controller failed: {0}")]
    Internal(String),
    #[error("the controller cannot check credentials right now: {0}; retry later")]
    Unavailable(String),
    #[error("no such path; the API serves {WATCH_PATH}, {ACK_PATH} and {CERTIFICATES_PATH}")]
    NotFound,
    #[error("method not allowed here")]
    Method,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::NoCredential | ApiError::BadCredential(_) => StatusCode::UNAUTHORIZED,
            ApiError::OtherNode { .. }
            | ApiError::OtherCaller { .. }
            | ApiError::ForbiddenIdentity { .. }
            | ApiError::NotOwnIdentity { .. }
            | ApiError::NoWaypoint { .. }
            | ApiError::Refused(_) => StatusCode::FORBIDDEN,
            ApiError::BadRequest(_) | ApiError::InvalidCsr(_) => StatusCode::BAD_REQUEST,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Method => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// The stable cause in the error body (documented in `docs/PROTOCOL.md`).
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::NoCredential => "unauthenticated",
            ApiError::BadCredential(_) => "bad_credential",
            ApiError::OtherNode { .. } => "other_node",
            ApiError::OtherCaller { .. } => "other_caller",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::InvalidCsr(_) => "invalid_csr",
            ApiError::ForbiddenIdentity { .. } | ApiError::NotOwnIdentity { .. } | ApiError::NoWaypoint { .. } => {
                "forbidden_identity"
            }
            ApiError::Refused(_) => "refused",
            ApiError::Internal(_) => "internal",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::NotFound => "not_found",
            ApiError::Method => "method_not_allowed",
        }
    }

    fn response(&self) -> Response<Body> {
        let body = ErrorBody { reason: self.reason().to_owned(), error: self.to_string() };
        json(self.status(), &body)
    }
}

/// Serves the API on `listener` with TLS until the drain starts.
pub async fn serve_api(listener: TcpListener, tls: TlsAcceptor, api: Arc<Api>, drain: drain::Watch) {
    serve(listener, drain, "api", move |tcp| {
        let (tls, api) = (tls.clone(), api.clone());
        async move {
            let stream = match tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return debug!(error = %e, "API TLS handshake failed"),
                Err(_) => return debug!("API TLS handshake timed out"),
            };
            let service = service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(api.handle(req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).await {
                debug!(error = %e, "API connection ended with an error");
            }
        }
    })
    .await
}

/// What a plain HTTP server answers: a function of method, path and query.
pub type Routes = Arc<dyn Fn(&Method, &str, &str) -> Response<Body> + Send + Sync>;

/// Serves plain HTTP/1.1 `routes` (admin, metrics, readiness) until the drain starts.
pub async fn serve_plain(listener: TcpListener, routes: Routes, drain: drain::Watch) {
    serve(listener, drain, "admin", move |tcp| {
        let routes = routes.clone();
        async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let routes = routes.clone();
                async move {
                    Ok::<_, Infallible>(routes(req.method(), req.uri().path(), req.uri().query().unwrap_or("")))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = conn.await {
                debug!(error = %e, "connection ended with an error");
            }
        }
    })
    .await
}

/// The accept loop every server shares: one task per connection, cut when the drain closes.
async fn serve<F, Fut>(listener: TcpListener, drain: drain::Watch, what: &'static str, connection: F)
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let draining = drain.draining();
    tokio::pin!(draining);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(drain.clone().until_closing(connection(tcp)));
                }
                Err(e) => {
                    warn!(server = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut draining => break,
        }
    }
}

impl Api {
    async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let api = match path.as_str() {
            WATCH_PATH => "watch",
            ACK_PATH => "ack",
            CERTIFICATES_PATH => "certificates",
            _ => "other",
        };
        let response = match self.route(req).await {
            Ok(r) => r,
            Err(e) => {
                // Refusals are the operator's business: one line each, with the reason.
                info!(path = %path, status = e.status().as_u16(), reason = e.reason(), error = %e, "API request refused");
                e.response()
            }
        };
        self.metrics.requests.get_or_create(&RequestLabels { api, code: response.status().as_u16() }).inc();
        response
    }

    async fn route(self: &Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
        let caller = self.authenticate(&req).await?;
        match (req.method().clone(), req.uri().path()) {
            (Method::GET, WATCH_PATH) => self.watch(&caller, req.uri().query().unwrap_or("")),
            (Method::POST, ACK_PATH) => {
                let ack: Ack = read_json(req).await?;
                acting_for(&caller, ack.subscriber.clone())?;
                if !ack.rejected.is_empty() {
                    warn!(caller = %ack.subscriber, version = ack.version, rejected = ?ack.rejected, "a proxy rejected resources");
                }
                self.store.ack(ack);
                Ok(Response::builder().status(StatusCode::NO_CONTENT).body(empty()).unwrap_or_default())
            }
            (Method::POST, CERTIFICATES_PATH) => {
                let request: CertificateRequest = read_json(req).await?;
                let result = self.certificate(&caller, request);
                let label = match &result {
                    Ok(_) => "issued",
                    Err(e) => e.reason(),
                };
                self.metrics.certificates.get_or_create(&CertificateLabels { result: label }).inc();
                result
            }
            (_, WATCH_PATH | ACK_PATH | CERTIFICATES_PATH) => Err(ApiError::Method),
            _ => Err(ApiError::NotFound),
        }
    }

    async fn authenticate(&self, req: &Request<Incoming>) -> Result<Caller, ApiError> {
        let value = req.headers().get(header::AUTHORIZATION).ok_or(ApiError::NoCredential)?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .ok_or(ApiError::NoCredential)?;
        self.authenticator.authenticate(token.trim()).await.map_err(|e| {
            if e.is_unauthenticated() {
                ApiError::BadCredential(e.to_string())
            } else {
                // The controller could not check it (the API server is unreachable): the
                // caller should retry, not conclude its credential is bad.
                warn!(error = %e, "cannot check a credential");
                ApiError::Unavailable(e.to_string())
            }
        })
    }

    /// `GET /v1/watch?node=<node>[&epoch=<epoch>&since=<version>]`, or
    /// `?serviceAccount=<namespace>/<name>[...]`.
    fn watch(self: &Arc<Self>, caller: &Caller, query: &str) -> Result<Response<Body>, ApiError> {
        let params = parse_query(query);
        let asked = Subscriber::from_parts(
            params.get("node").map(String::as_str),
            params.get("serviceAccount").map(String::as_str),
        )
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let subscriber = acting_for(caller, asked)?;
        let since = match (params.get("epoch"), params.get("since")) {
            (Some(epoch), Some(v)) => Some(Cursor {
                epoch: epoch.clone(),
                version: v.parse().map_err(|_| ApiError::BadRequest(format!("since={v:?} is not a version")))?,
            }),
            (None, None) => None,
            _ => return Err(ApiError::BadRequest("epoch and since go together".into())),
        };
        let sub = self.store.subscribe(&subscriber, since.as_ref());
        let (first_kind, first) = match sub.first {
            First::Snapshot(line) => ("snapshot", vec![shared(line)]),
            First::Resume(lines) => ("resume", lines.into_iter().map(shared).collect()),
        };
        let start_bytes: usize = first.iter().map(Bytes::len).sum();
        self.metrics.start_bytes.inc_by(start_bytes as u64);
        info!(caller = %subscriber, since = ?since, start = first_kind, bytes = start_bytes, "proxy subscribed");
        let (mut tx, body) = Channel::<Bytes, Infallible>::new(16);
        let (api, mut live, epoch) = (self.clone(), sub.live, sub.epoch);
        let mut version = sub.version;
        tokio::spawn(async move {
            for line in first {
                if tx.send_data(line).await.is_err() {
                    api.store.unsubscribe(&subscriber);
                    return;
                }
            }
            // A heartbeat after `heartbeat` without a message, carrying the version this
            // subscriber was last sent (never one whose delta it has not received yet).
            let heartbeat = tokio::time::sleep(api.heartbeat);
            tokio::pin!(heartbeat);
            loop {
                let line = tokio::select! {
                    delta = live.recv() => match delta {
                        Ok((v, line)) => {
                            version = v;
                            shared(line)
                        }
                        Err(RecvError::Lagged(n)) => {
                            warn!(caller = %subscriber, missed = n, "subscriber too slow; closing its stream (it will resume)");
                            break;
                        }
                        Err(RecvError::Closed) => break,
                    },
                    _ = &mut heartbeat => Bytes::from(Message::heartbeat_line(&epoch, version)),
                };
                if tx.send_data(line).await.is_err() {
                    break;
                }
                heartbeat.as_mut().reset(tokio::time::Instant::now() + api.heartbeat);
            }
            api.store.unsubscribe(&subscriber);
            debug!(caller = %subscriber, "watch stream closed");
        });
        Ok(Response::builder()
            .header(header::CONTENT_TYPE, "application/x-ndjson")
            .header(header::CACHE_CONTROL, "no-store")
            .body(body.boxed())
            .unwrap_or_default())
    }

    /// `POST /v1/certificates`: signs a CSR for an identity the caller is entitled to (see
    /// [`Api::authorize`]).
    fn certificate(&self, caller: &Caller, request: CertificateRequest) -> Result<Response<Body>, ApiError> {
        let csr = hbone::ca::Csr::parse(request.csr.as_bytes()).map_err(|e| ApiError::InvalidCsr(e.to_string()))?;
        let identity = csr.identity().clone();
        self.authorize(caller, &identity)?;
        let ttl = request.ttl_seconds.map_or(self.cert_ttl, Duration::from_secs);
        let issued = self.authority.sign(&csr, ttl).map_err(|e| {
            if e.is_refused() { ApiError::Refused(e.to_string()) } else { ApiError::Internal(e.to_string()) }
        })?;
        let not_after = issued.not_after.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        info!(caller = %caller.subscriber(), identity = %identity, not_after, "certificate issued");
        Ok(json(
            StatusCode::OK,
            &CertificateResponse {
                certificate_chain: issued.chain_pem,
                trust_bundle: self.authority.bundle_pem(),
                not_after,
            },
        ))
    }

    /// Whether `caller` may obtain `identity`:
    ///
    /// - a node: a workload with that identity is scheduled on it (enrolled or not);
    /// - a service account: the identity is exactly its own, and the model holds a waypoint
    ///   in its namespace run as it. A waypoint is in the model only while one of its pods has
    ///   an address (translation), so its pods obtain their identity once they run, and not
    ///   after the Gateway is deleted or changes class. Which of the pods asks is not checked:
    ///   the identity is the service account's, as in Kubernetes.
    fn authorize(&self, caller: &Caller, identity: &spiffe::SpiffeId) -> Result<(), ApiError> {
        match caller {
            Caller::Node(node) => {
                if !self.store.node_runs(node.as_str(), identity) {
                    return Err(ApiError::ForbiddenIdentity { node: node.to_string(), identity: identity.to_string() });
                }
            }
            Caller::ServiceAccount(account) => {
                let own = account.identity(self.authority.trust_domain()).map_err(|e| ApiError::NotOwnIdentity {
                    account: account.to_string(),
                    own: format!("(none: {e})"),
                    identity: identity.to_string(),
                })?;
                if own != *identity {
                    return Err(ApiError::NotOwnIdentity {
                        account: account.to_string(),
                        own: own.to_string(),
                        identity: identity.to_string(),
                    });
                }
                if !self.store.serves_waypoint(account.namespace(), account.name()) {
                    return Err(ApiError::NoWaypoint {
                        account: account.to_string(),
                        namespace: account.namespace().to_owned(),
                        name: account.name().to_owned(),
                        identity: identity.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The admin routes: `/status` and `/resources`.
    pub fn admin_routes(self: &Arc<Self>) -> Routes {
        let api = self.clone();
        Arc::new(move |method, path, query| {
            if method != Method::GET {
                return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
            }
            match path {
                "/status" => {
                    let rejections = api.rejections.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    let status = serde_json::json!({
                        "epoch": api.store.epoch(),
                        "version": api.store.version(),
                        "ready": api.ready.load(Ordering::Acquire),
                        "trustDomain": api.authority.trust_domain(),
                        "nodes": api.store.nodes(),
                        "serviceAccounts": api.store.service_accounts(),
                        "rejected": rejections.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
                    });
                    json(StatusCode::OK, &status)
                }
                "/resources" => {
                    let params = parse_query(query);
                    let kind = match params.get("kind").map(|k| parse_kind(k)) {
                        None => None,
                        Some(Some(k)) => Some(k),
                        Some(None) => {
                            return text(StatusCode::BAD_REQUEST, "unknown kind; use one of the resource kinds\n");
                        }
                    };
                    let items = api.store.resources(kind);
                    let mut body = String::from("[");
                    body.push_str(&items.join(","));
                    body.push(']');
                    Response::builder()
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(Full::new(Bytes::from(body)).boxed())
                        .unwrap_or_default()
                }
                _ => text(StatusCode::NOT_FOUND, "routes: GET /status, GET /resources[?kind=<Kind>]\n"),
            }
        })
    }
}

/// The metrics route.
pub fn metrics_routes(metrics: Arc<Metrics>) -> Routes {
    Arc::new(move |_, path, _| match path {
        "/metrics" => Response::builder()
            .header(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")
            .body(Full::new(Bytes::from(metrics.encode())).boxed())
            .unwrap_or_default(),
        _ => text(StatusCode::NOT_FOUND, "try /metrics\n"),
    })
}

/// The readiness route: ready once the source's first scan is committed.
pub fn readiness_routes(ready: Arc<AtomicBool>) -> Routes {
    Arc::new(move |_, path, _| match (path, ready.load(Ordering::Acquire)) {
        ("/healthz/ready", true) => text(StatusCode::OK, "ready\n"),
        ("/healthz/ready", false) => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: source not read yet\n"),
        _ => text(StatusCode::NOT_FOUND, "try /healthz/ready\n"),
    })
}

/// A line shared by every subscriber, sent without a copy.
fn shared(line: Arc<str>) -> Bytes {
    struct Line(Arc<str>);
    impl AsRef<[u8]> for Line {
        fn as_ref(&self) -> &[u8] {
            self.0.as_bytes()
        }
    }
    Bytes::from_owner(Line(line))
}

fn parse_kind(text: &str) -> Option<Kind> {
    Kind::ALL.into_iter().find(|k| k.as_str().eq_ignore_ascii_case(text))
}

/// The subscriber a request of `caller` names, if the caller may act for it: itself only.
fn acting_for(caller: &Caller, asked: Subscriber) -> Result<Subscriber, ApiError> {
    if caller.subscriber() == asked {
        return Ok(asked);
    }
    Err(match caller {
        Caller::Node(_) => ApiError::OtherNode { caller: caller.clone(), asked },
        Caller::ServiceAccount(_) => ApiError::OtherCaller { caller: caller.clone(), asked },
    })
}

/// `a=1&b=2` → map, names and values percent-decoded (`serviceAccount=shop%2Fwp` is what
/// most URL encoders write for `shop/wp`). Names, epochs and versions need no encoding; an
/// escape that does not decode is kept as written (and then names nobody).
fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decoded(k), percent_decoded(v)),
            None => (percent_decoded(p), String::new()),
        })
        .collect()
}

/// `%2F` → `/`; `+` is left alone (it is a space only in HTML forms, and no name has one).
fn percent_decoded(text: &str) -> String {
    if !text.contains('%') {
        return text.to_owned();
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| text.to_owned())
}

async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::BadRequest(format!("reading the body: {e} (at most {MAX_BODY} bytes)")))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("body is not the expected JSON: {e}")))
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap_or_default()
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())).boxed())
        .unwrap_or_default()
}

fn empty() -> Body {
    Full::new(Bytes::new()).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::auth::{NodeName, ServiceAccount};

    #[test]
    fn queries_and_kinds() {
        let q = parse_query("node=node-1&epoch=ab&since=4&flag");
        assert_eq!(q["node"], "node-1");
        assert_eq!(q["since"], "4");
        assert_eq!(q["flag"], "");
        assert_eq!(parse_query("serviceAccount=shop%2Fwp")["serviceAccount"], "shop/wp", "percent-decoded");
        assert_eq!(parse_query("serviceAccount=shop%2fwp")["serviceAccount"], "shop/wp");
        assert_eq!(parse_query("a=100%&b=%zz&c=%E2%9C%93")["a"], "100%", "a bad escape is kept");
        assert_eq!(parse_query("a=100%&b=%zz&c=%E2%9C%93")["b"], "%zz");
        assert_eq!(parse_query("a=100%&b=%zz&c=%E2%9C%93")["c"], "\u{2713}");
        assert_eq!(parse_query("a=%FF")["a"], "%FF", "not UTF-8 once decoded: kept as written");
        assert_eq!(parse_kind("workload"), Some(Kind::Workload));
        assert_eq!(parse_kind("Pod"), None);
    }

    #[test]
    fn a_caller_acts_for_itself_only() {
        let node = Caller::Node(NodeName::new("node-1").unwrap());
        let waypoint = Caller::ServiceAccount(ServiceAccount::new("shop", "wp").unwrap());
        let named = |text: &str| match text.split_once('=') {
            Some(("node", n)) => Subscriber::Node(n.into()),
            _ => Subscriber::service_account(text.trim_start_matches("serviceAccount=")).unwrap(),
        };
        assert_eq!(acting_for(&node, named("node=node-1")).unwrap(), named("node=node-1"));
        assert_eq!(acting_for(&waypoint, named("serviceAccount=shop/wp")).unwrap(), named("serviceAccount=shop/wp"));
        let cases = [
            (&node, "node=node-2", "other_node", "node node-1 may not act for node node-2"),
            (&node, "serviceAccount=shop/wp", "other_node", "node node-1 may not act for service account shop/wp"),
            (
                &waypoint,
                "serviceAccount=shop/api",
                "other_caller",
                "service account shop/wp may act only for itself, not for service account shop/api",
            ),
            (
                &waypoint,
                "node=node-1",
                "other_caller",
                "service account shop/wp may act only for itself, not for node node-1",
            ),
        ];
        for (caller, asked, reason, message) in cases {
            let err = acting_for(caller, named(asked)).unwrap_err();
            assert_eq!((err.status().as_u16(), err.reason(), err.to_string().as_str()), (403, reason, message));
        }
    }

    #[test]
    fn every_error_has_a_status_and_a_reason() {
        let node = Caller::Node(NodeName::new("a").unwrap());
        let cases = [
            (ApiError::NoCredential, 401, "unauthenticated"),
            (ApiError::OtherNode { caller: node.clone(), asked: Subscriber::Node("b".into()) }, 403, "other_node"),
            (ApiError::OtherCaller { caller: node, asked: Subscriber::Node("b".into()) }, 403, "other_caller"),
            (ApiError::InvalidCsr("x".into()), 400, "invalid_csr"),
            (ApiError::ForbiddenIdentity { node: "n".into(), identity: "i".into() }, 403, "forbidden_identity"),
            (
                ApiError::NotOwnIdentity { account: "a/b".into(), own: "o".into(), identity: "i".into() },
                403,
                "forbidden_identity",
            ),
            (
                ApiError::NoWaypoint {
                    account: "a/b".into(),
                    namespace: "a".into(),
                    name: "b".into(),
                    identity: "i".into(),
                },
                403,
                "forbidden_identity",
            ),
        ];
        for (e, status, reason) in cases {
            assert_eq!((e.status().as_u16(), e.reason()), (status, reason), "{e}");
        }
    }
}
