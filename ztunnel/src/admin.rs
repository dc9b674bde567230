//! The small HTTP servers: admin (localhost :15000: `/config_dump`, `/logging`), metrics
//! (:15020 `/metrics`) and readiness (:15021 `/healthz/ready`). One tiny HTTP/1.1 server
//! function serves them all; each stops on drain. The admin dump ([`config_dump`]) is
//! written here too.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use hbone::drain;

use crate::manager::Manager;
use crate::proxy::Proxy;

/// What a route handler gets: method, path and query.
pub struct Call<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: &'a str,
}

pub type Routes = Arc<dyn Fn(Call<'_>) -> futures_lite::BoxedResponse + Send + Sync>;

/// Boxed future of a response, without pulling in a futures crate.
pub mod futures_lite {
    use std::future::Future;
    use std::pin::Pin;

    pub type BoxedResponse = Pin<Box<dyn Future<Output = super::Reply> + Send>>;
}

/// A response: status, content type, body.
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: StatusCode, body: impl Into<String>) -> Reply {
        Reply { status, content_type: "text/plain; charset=utf-8", body: body.into() }
    }

    pub fn json(body: String) -> Reply {
        Reply { status: StatusCode::OK, content_type: "application/json", body }
    }
}

/// Serves `routes` on `listener` until the drain starts.
pub async fn serve(listener: TcpListener, routes: Routes, drain: drain::Watch) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let routes = routes.clone();
                    let watch = drain.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req: Request<Incoming>| {
                            let routes = routes.clone();
                            async move { Ok::<_, Infallible>(respond(&routes, req).await) }
                        });
                        let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service);
                        tokio::select! {
                            r = conn => if let Err(e) = r { debug!(error = %e, "admin connection error") },
                            _ = watch.closing() => {}
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = drain.draining() => break,
        }
    }
}

async fn respond(routes: &Routes, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let reply =
        routes(Call { method: req.method(), path: req.uri().path(), query: req.uri().query().unwrap_or("") }).await;
    let mut resp = Response::new(Full::new(Bytes::from(reply.body)));
    *resp.status_mut() = reply.status;
    if let Ok(v) = http::HeaderValue::from_str(reply.content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

/// `GET /config_dump`: what this ztunnel serves (workloads, services with their endpoints,
/// policies, the trust bundle), its certificates with their expiry and the pods it captured,
/// as JSON.
pub async fn config_dump(proxy: &Proxy, manager: &Manager) -> String {
    use serde_json::json;
    let state = proxy.state.load();
    let now = SystemTime::now();
    let workloads: Vec<_> = state
        .workloads()
        .map(|e| {
            let w = e.workload();
            json!({
                "uid": w.uid, "name": w.name, "namespace": w.namespace, "node": w.node,
                "addresses": w.addresses, "serviceAccount": w.service_account,
                "identity": e.identity().map(|i| i.to_string()).unwrap_or_default(),
                "enrolled": w.enrolled, "mtls": format!("{:?}", w.mtls).to_uppercase(), "local": w.node == proxy.node,
            })
        })
        .collect();
    let services: Vec<_> = state
        .services()
        .map(|entry| {
            let s = entry.service();
            json!({
                "name": s.name, "namespace": s.namespace, "hostname": s.hostname, "vips": s.vips,
                "ports": s.ports.iter().map(|p| json!({"port": p.port, "targetPort": p.target_port})).collect::<Vec<_>>(),
                "endpoints": entry.endpoints().iter().map(|w| w.uid()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let policies: Vec<_> = state
        .authorizations()
        .map(|a| {
            json!({
                "name": a.name, "namespace": a.namespace, "action": format!("{:?}", a.action).to_uppercase(),
                "rules": a.rules.len(), "broken": a.broken,
            })
        })
        .collect();
    let trust_bundle = state.trust_bundle().map(|b| json!({"trustDomain": b.trust_domain, "roots": b.roots.len()}));
    let certificates: Vec<_> = proxy
        .certs
        .dump()
        .into_iter()
        .map(|(id, not_after)| {
            let unix = not_after.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
            let left = not_after.duration_since(now).unwrap_or_default().as_secs();
            json!({"identity": id.to_string(), "notAfterUnix": unix, "expiresInSeconds": left})
        })
        .collect();
    let dump = json!({
        "node": proxy.node,
        "trustDomain": state.trust_domain(),
        "trustBundle": trust_bundle,
        "enrolledPods": manager.dump().await,
        "workloads": workloads,
        "services": services,
        "policies": policies,
        "certificates": certificates,
    });
    serde_json::to_string_pretty(&dump).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// `GET /metrics`: what `encode` writes, as OpenMetrics text (served under its own content
/// type: under the classic Prometheus one, counters read as untyped).
pub fn openmetrics_routes(encode: impl Fn() -> String + Send + Sync + 'static) -> Routes {
    Arc::new(move |call: Call<'_>| {
        let body = (call.path == "/metrics").then(&encode);
        Box::pin(async move {
            match body {
                Some(b) => Reply { status: StatusCode::OK, content_type: crate::metrics::CONTENT_TYPE, body: b },
                None => Reply::text(StatusCode::NOT_FOUND, "try /metrics\n"),
            }
        })
    })
}

/// `GET /healthz/ready`: `200` while `ready` holds, `503` once it is cleared (draining).
pub fn readiness_routes(ready: Arc<std::sync::atomic::AtomicBool>) -> Routes {
    Arc::new(move |call: Call<'_>| {
        let reply = match (call.path, ready.load(std::sync::atomic::Ordering::Acquire)) {
            ("/healthz/ready", true) => Reply::text(StatusCode::OK, "ready\n"),
            ("/healthz/ready", false) => Reply::text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
            _ => Reply::text(StatusCode::NOT_FOUND, "try /healthz/ready\n"),
        };
        Box::pin(async move { reply })
    })
}
