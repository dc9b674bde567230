//! Outbound: a connection captured at :15001 inside the source pod.
//!
//! 1. read the original destination (SO_ORIGINAL_DST);
//! 2. resolve it: a service VIP → an endpoint (load balanced), a workload address → that
//!    workload, anything else → passthrough;
//! 3. an enrolled destination → HBONE to `<endpoint>:15008` with the source's certificate,
//!    expecting the destination's identity; a non-enrolled one → plain TCP from the pod;
//! 4. copy until both sides are done; count and log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;
use tracing::{info, warn};

use super::{Accepted, PodInfo, Proxy, SERVICE_ATTEMPTS, labels, service_name};
use crate::config::HBONE_PORT;
use crate::inpod::socket;
use crate::metrics::{RefusedLabels, Reporter, SecurityPolicy};
use crate::proxy::Peer;
use crate::state::{Resolved, State};

/// One way to reach the destination.
enum Route {
    Hbone { endpoint: SocketAddr, target: SocketAddr, identity: hbone::SpiffeId },
    Direct { target: SocketAddr },
}

/// A connected upstream.
enum Upstream {
    Hbone(hbone::Tunnel),
    Direct(TcpStream),
}

/// Serves one captured outbound connection (see the module docs).
pub async fn handle(accepted: Accepted, pod: Arc<PodInfo>, proxy: Arc<Proxy>) {
    let Accepted { mut tcp, peer, orig } = accepted;
    let (pod, proxy) = (&*pod, &*proxy);
    let started = Instant::now();
    let state = proxy.state.load();
    let Some(source) = state.workload_by_ip(pod.primary_ip()) else {
        warn!(pod = %pod.uid, dst = %orig, "source pod is no longer in the config; closing");
        return;
    };
    let source_id = match source.identity(state.trust_domain()) {
        Ok(id) => id,
        Err(e) => {
            warn!(pod = %pod.uid, error = %e, "source workload has no valid identity; closing");
            return;
        }
    };
    let src_peer = Peer::of(Some(source), Some(&source_id), &state);

    // Candidates in the order to try, with what metrics call the destination.
    let (routes, service) = match plan(&state, proxy, orig) {
        Ok(plan) => plan,
        Err(why) => {
            proxy
                .metrics
                .refused
                .get_or_create(&RefusedLabels { reason: "no_route", destination_workload: "unknown".into() })
                .inc();
            info!(src = %peer, src.workload = %source.name, dst = %orig, outcome = "refused", reason = why, "access");
            return;
        }
    };
    drop(state);

    let mut last_error = String::new();
    for (route, dst_workload) in routes.into_iter().take(SERVICE_ATTEMPTS) {
        let state = proxy.state.load();
        let dst = state.workload_by_ip(dst_workload.ip());
        let (target, security) = match &route {
            Route::Hbone { target, .. } => (*target, SecurityPolicy::mutual_tls),
            Route::Direct { target } => (*target, SecurityPolicy::none),
        };
        let mut dst_peer = Peer::of(dst, None, &state);
        if security == SecurityPolicy::none {
            // Nothing was proved about a passthrough destination.
            dst_peer.principal = "unknown".into();
        }
        let service_label = service.clone().unwrap_or_else(|| service_name(&state, dst));
        drop(state);
        let upstream = match connect(route, pod, &source_id, peer, proxy).await {
            Ok(u) => u,
            Err(ConnectFailure { error, retry }) => {
                warn!(src = %peer, dst = %target, error = %error, "outbound connect failed");
                last_error = error;
                if retry {
                    proxy.balancer.eject(target.ip());
                    continue;
                }
                break;
            }
        };
        let counters = proxy.metrics.open(&labels(Reporter::source, &src_peer, &dst_peer, &service_label, security));
        let (to_dst, from_dst, outcome) = match upstream {
            Upstream::Hbone(tunnel) => {
                let peer_id = tunnel.peer_identity().clone();
                match hbone::copy::bidirectional(&mut tcp, tunnel, proxy.hbone.copy_buffer).await {
                    Ok(t) => (t.to_tunnel, t.from_tunnel, format!("ok (mTLS, peer {peer_id})")),
                    Err(e) => (e.transferred.to_tunnel, e.transferred.from_tunnel, format!("error: {}", e.cause)),
                }
            }
            Upstream::Direct(mut up) => match tokio::io::copy_bidirectional(&mut tcp, &mut up).await {
                Ok((a, b)) => (a, b, "ok (passthrough)".to_owned()),
                Err(e) => (0, 0, format!("error: {e}")),
            },
        };
        counters.close(to_dst, from_dst);
        info!(
            src.addr = %peer,
            src.workload = %src_peer.workload,
            src.identity = %src_peer.principal,
            dst.addr = %target,
            dst.orig = %orig,
            dst.workload = %dst_peer.workload,
            dst.identity = %dst_peer.principal,
            dst.service = %service_label,
            protocol = if security == SecurityPolicy::mutual_tls { "HBONE" } else { "TCP" },
            bytes_sent = to_dst,
            bytes_received = from_dst,
            duration_ms = started.elapsed().as_millis() as u64,
            outcome = %outcome,
            "access"
        );
        return;
    }
    proxy
        .metrics
        .refused
        .get_or_create(&RefusedLabels { reason: "unreachable", destination_workload: "unknown".into() })
        .inc();
    info!(src = %peer, dst = %orig, outcome = "refused", reason = %last_error, "access");
}

/// The routes to try for `orig`, each with the destination's address (for labels), and the
/// service name if a VIP was dialed.
#[allow(clippy::type_complexity)]
fn plan(state: &State, proxy: &Proxy, orig: SocketAddr) -> Result<(Vec<(Route, SocketAddr)>, Option<String>), String> {
    let route_to = |w: &meshapi::Workload, port: u16| -> Option<(Route, SocketAddr)> {
        let ip = *w.addresses.first()?;
        let target = SocketAddr::new(ip, port);
        if w.enrolled {
            let identity = w.identity(state.trust_domain()).ok()?;
            Some((Route::Hbone { endpoint: SocketAddr::new(ip, HBONE_PORT), target, identity }, target))
        } else {
            Some((Route::Direct { target }, target))
        }
    };
    match state.resolve(orig) {
        Resolved::Service { service, port, endpoints } => {
            let key = format!("{}/{}", service.namespace, service.name);
            let order = proxy.balancer.order(&key, endpoints.len(), |i| {
                state.workload(endpoints[i]).addresses.first().copied().unwrap_or(orig.ip())
            });
            let routes: Vec<_> =
                order.into_iter().filter_map(|i| route_to(state.workload(endpoints[i]), port.target_port)).collect();
            if routes.is_empty() {
                return Err(format!("service {key} has no usable endpoint"));
            }
            Ok((routes, Some(service.hostname.clone())))
        }
        Resolved::Workload { workload } => {
            let route =
                route_to(workload, orig.port()).ok_or_else(|| format!("workload {} has no identity", workload.uid))?;
            Ok((vec![route], None))
        }
        Resolved::Unknown if state.is_vip(orig.ip()) => {
            Err(format!("{orig} is a service address, but no service port with endpoints matches"))
        }
        Resolved::Unknown => Ok((vec![(Route::Direct { target: orig }, orig)], None)),
    }
}

struct ConnectFailure {
    error: String,
    /// Whether another endpoint may be tried (the failure says nothing about the others).
    retry: bool,
}

async fn connect(
    route: Route,
    pod: &PodInfo,
    source_id: &hbone::SpiffeId,
    app: SocketAddr,
    proxy: &Proxy,
) -> Result<Upstream, ConnectFailure> {
    match route {
        Route::Hbone { endpoint, target, identity } => {
            let source = proxy
                .certs
                .get(source_id)
                .map_err(|e| ConnectFailure { error: format!("no certificate for {source_id}: {e}"), retry: false })?;
            let request = hbone::ConnectRequest {
                source,
                source_ip: Some(pod.primary_ip()),
                destination: endpoint,
                expected: Arc::from(vec![identity]),
                target,
                forwarded_for: Some(app.ip()),
                baggage: None,
                traceparent: None,
            };
            // Boxed: the handshake path is large and needed only until the tunnel opens; the
            // connection's task keeps only the small copy state while it lives.
            Box::pin(proxy.client.connect(request)).await.map(Upstream::Hbone).map_err(|e| ConnectFailure {
                retry: !e.is_policy_denied() && e.verify_error().is_none(),
                error: e.to_string(),
            })
        }
        Route::Direct { target } => Box::pin(socket::connect(&pod.netns, target))
            .await
            .map(Upstream::Direct)
            .map_err(|e| ConnectFailure { error: format!("connect to {target}: {e}"), retry: true }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<Fut>(_f: impl FnOnce(Accepted, Arc<PodInfo>, Arc<Proxy>) -> Fut) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// Every live connection holds this future: the handshake path is boxed so that an idle
    /// tunnel keeps only the copy state (STYLE: keep the per-connection future small).
    #[test]
    fn per_connection_future_stays_small() {
        let size = future_size(handle);
        assert!(size < 3 * 1024, "outbound connection future grew to {size} bytes");
    }
}
