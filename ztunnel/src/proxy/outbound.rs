//! Outbound: a connection captured at :15001 inside the source pod.
//!
//! 1. read the original destination (SO_ORIGINAL_DST);
//! 2. resolve it: a service VIP → its waypoint if it has one, else an endpoint (load
//!    balanced); a workload address → its waypoint if it has one, else that workload;
//!    anything else → passthrough;
//! 3. an enrolled destination → HBONE to `<endpoint>:15008` with the source's certificate,
//!    expecting the destination's identity; a non-enrolled one → plain TCP from the pod;
//! 4. copy until both sides are done; the connection's record writes its access line and
//!    metrics (refusals too: no route, unreachable, denied by the destination).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::warn;

use super::record::{ConnectionRecord, Direction, Outcome, Protocol, Traffic};
use super::{Accepted, PodInfo, Proxy, SERVICE_ATTEMPTS, copy_tcp};
use crate::config::HBONE_PORT;
use crate::metrics::Refusal;
use crate::state::{Resolved, State, WorkloadEntry};

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
pub fn handle(accepted: Accepted, pod: Arc<PodInfo>, proxy: Arc<Proxy>) -> impl Future<Output = ()> + Send {
    // Boxed: resolving and connecting need far more state than copying, and are over once the
    // upstream is open; the connection's task keeps only the copy state and a boxed record.
    // Made here, not inside an `async fn`, so that the task does not also keep a slot for
    // `accepted`.
    let open = Box::pin(open(accepted, pod, proxy.clone()));
    relay(open, proxy)
}

/// Copies between the app and the upstream once `open` has connected, then records.
async fn relay(open: Pin<Box<impl Future<Output = Option<Opened>>>>, proxy: Arc<Proxy>) {
    let Some((mut tcp, upstream, record)) = open.await else {
        return;
    };
    let outcome = match upstream {
        Upstream::Hbone(tunnel) => match hbone::copy::bidirectional(&mut tcp, tunnel, proxy.hbone.copy_buffer).await {
            Ok(t) => Outcome::Ok(Traffic { sent: t.to_tunnel, received: t.from_tunnel }),
            Err(e) => {
                let t = e.transferred;
                Outcome::Error(Traffic { sent: t.to_tunnel, received: t.from_tunnel }, e.cause.to_string())
            }
        },
        Upstream::Direct(mut up) => Outcome::of_copy(copy_tcp(&mut tcp, &mut up).await),
    };
    record.finish(outcome);
}

/// An open connection: the app's socket, the upstream, and its record.
type Opened = (TcpStream, Upstream, Box<ConnectionRecord>);

/// Resolves the destination and connects to it, trying up to [`SERVICE_ATTEMPTS`] endpoints
/// of a service. `None` when the connection was refused (and recorded).
async fn open(accepted: Accepted, pod: Arc<PodInfo>, proxy: Arc<Proxy>) -> Option<Opened> {
    let (pod, proxy) = (&*pod, &*proxy);
    let Accepted { tcp, peer, orig } = accepted;
    let state = proxy.state.load();
    let mut record = ConnectionRecord::new(&proxy.metrics, Direction::Outbound, Protocol::Tcp, peer, orig);
    record.original_destination(orig);
    record.source(state.peer_by_ip(pod.primary_ip()));
    // Refused before a route is chosen: the destination is whoever holds the address dialed
    // (nobody, for a VIP).
    let refuse = |mut record: Box<ConnectionRecord>, refusal, detail: String| {
        record.destination(state.unproved_peer_by_ip(orig.ip()), state.service_name_by_ip(orig.ip()));
        record.refuse(refusal, detail);
        None
    };
    let source_id = match state.identity_by_ip(pod.primary_ip()) {
        Some(Ok(id)) => id,
        None => {
            let detail = format!("source pod {} is no longer in the config", pod.uid);
            return refuse(record, Refusal::NotServed, detail);
        }
        Some(Err(e)) => {
            let detail = format!("source pod {} has no valid identity: {e}", pod.uid);
            return refuse(record, Refusal::NotServed, detail);
        }
    };

    // Candidates in the order to try, with what metrics call the destination.
    let (routes, service) = match plan(&state, proxy, orig) {
        Ok(plan) => plan,
        Err(why) => return refuse(record, Refusal::NoRoute, why),
    };
    drop(state);

    let mut last = (Refusal::Unreachable, String::new());
    for (route, dst_addr) in routes.into_iter().take(SERVICE_ATTEMPTS) {
        let state = proxy.state.load();
        let (target, protocol) = match &route {
            Route::Hbone { target, .. } => (*target, Protocol::Hbone),
            Route::Direct { target } => (*target, Protocol::Tcp),
        };
        let dst = match protocol {
            Protocol::Hbone => state.peer_by_ip(dst_addr.ip()),
            // Nothing was proved about a passthrough destination.
            Protocol::Tcp => state.unproved_peer_by_ip(dst_addr.ip()),
        };
        let service = service.clone().unwrap_or_else(|| state.service_name_by_ip(dst_addr.ip()));
        drop(state);
        record.route(protocol, target);
        record.destination(dst, service);
        let upstream = match connect(route, pod, &source_id, peer, proxy).await {
            Ok(u) => u,
            Err(ConnectFailure { error, retry, refusal }) => {
                warn!(src.addr = %peer, dst.addr = %target, error = %error, "outbound connect failed");
                last = (refusal, error);
                if retry {
                    proxy.balancer.eject(target.ip());
                    continue;
                }
                break;
            }
        };
        if let Upstream::Hbone(tunnel) = &upstream {
            record.destination_proved(tunnel.peer_identity().as_str());
        }
        record.open();
        return Some((tcp, upstream, record));
    }
    record.refuse(last.0, last.1);
    None
}

/// The routes to try for `orig`, each with the destination's address (for labels), and the
/// service name if a VIP was dialed.
#[allow(clippy::type_complexity)]
fn plan(
    state: &State,
    proxy: &Proxy,
    orig: SocketAddr,
) -> Result<(Vec<(Route, SocketAddr)>, Option<Arc<str>>), String> {
    // An endpoint is dialed at its address of the original destination's family (its first
    // otherwise): IPv6 stays IPv6 end to end.
    let route_to = |w: &WorkloadEntry, port: u16| -> Option<(Route, SocketAddr)> {
        let ip = w.address_like(orig.ip())?;
        let target = SocketAddr::new(ip, port);
        if w.workload().enrolled {
            let identity = w.identity().ok()?.clone();
            Some((Route::Hbone { endpoint: SocketAddr::new(ip, HBONE_PORT), target, identity }, target))
        } else {
            Some((Route::Direct { target }, target))
        }
    };
    match state.resolve(orig) {
        Resolved::Service { service, .. } if service.service().waypoint.is_some() => {
            let waypoint = service.service().waypoint.as_deref().unwrap_or_default();
            let routes = via_waypoint(state, proxy, waypoint, orig)
                .map_err(|why| format!("service {} uses waypoint {waypoint}, {why}", service.key()))?;
            Ok((routes, Some(service.hostname().clone())))
        }
        Resolved::Workload(w) if w.workload().enrolled && state.waypoint_of(w.workload()).is_some() => {
            let waypoint = state.waypoint_of(w.workload()).unwrap_or_default();
            let routes = via_waypoint(state, proxy, waypoint, orig)
                .map_err(|why| format!("workload {} uses waypoint {waypoint}, {why}", w.uid()))?;
            Ok((routes, None))
        }
        Resolved::Service { service, port, endpoints } => {
            let key = service.key();
            let order = proxy.balancer.order(key, endpoints.len(), |i| {
                endpoints.get(i).and_then(|w| w.address_like(orig.ip())).unwrap_or(orig.ip())
            });
            let routes: Vec<_> = order
                .into_iter()
                .filter_map(|i| endpoints.get(i))
                .filter_map(|w| route_to(w, port.target_port))
                .collect();
            if routes.is_empty() {
                return Err(format!("service {key} has no usable endpoint"));
            }
            Ok((routes, Some(service.hostname().clone())))
        }
        Resolved::Workload(w) => {
            let route = route_to(w, orig.port()).ok_or_else(|| format!("workload {} has no identity", w.uid()))?;
            Ok((vec![route], None))
        }
        Resolved::Unknown if state.is_vip(orig.ip()) => {
            Err(format!("{orig} is a service address, but no service port with endpoints matches"))
        }
        Resolved::Unknown => Ok((vec![(Route::Direct { target: orig }, orig)], None)),
    }
}

/// Routes through the waypoint `key` (each of its addresses, balanced): HBONE to its 15008,
/// CONNECT target the original destination, the waypoint's identity expected. A waypoint
/// that does not exist or has no address refuses the connection: going around it would skip
/// its policy.
fn via_waypoint(state: &State, proxy: &Proxy, key: &str, orig: SocketAddr) -> Result<Vec<(Route, SocketAddr)>, String> {
    let waypoint = state.waypoint(key).ok_or("which does not exist")?;
    let identity = waypoint.identity(state.trust_domain()).map_err(|e| format!("whose identity is invalid: {e}"))?;
    // The waypoint's addresses of the original destination's family, all of them if it has
    // none of that family.
    let same_family: Vec<IpAddr> =
        waypoint.addresses.iter().copied().filter(|a| a.is_ipv6() == orig.ip().is_ipv6()).collect();
    let addresses = if same_family.is_empty() { &waypoint.addresses } else { &same_family };
    if addresses.is_empty() {
        return Err("which has no ready address".into());
    }
    let order = proxy.balancer.order(key, addresses.len(), |i| addresses[i]);
    Ok(order
        .into_iter()
        .map(|i| {
            let endpoint = SocketAddr::new(addresses[i], HBONE_PORT);
            (Route::Hbone { endpoint, target: orig, identity: identity.clone() }, orig)
        })
        .collect())
}

struct ConnectFailure {
    error: String,
    /// Whether another endpoint may be tried (the failure says nothing about the others).
    retry: bool,
    /// How the connection is counted if this was its last try.
    refusal: Refusal,
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
            let source = proxy.certs.get(source_id).map_err(|e| ConnectFailure {
                error: format!("no certificate for {source_id}: {e}"),
                retry: false,
                refusal: Refusal::NotServed,
            })?;
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
                refusal: if e.is_policy_denied() { Refusal::Policy } else { Refusal::Unreachable },
                error: e.to_string(),
            })
        }
        // The connect future is boxed already: the task keeps no room for it while copying.
        Route::Direct { target } => proxy.pods.connect(pod, target).await.map(Upstream::Direct).map_err(|e| {
            ConnectFailure { error: format!("connect to {target}: {e}"), retry: true, refusal: Refusal::Unreachable }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task_size<Fut>(_f: impl FnOnce(Accepted, Arc<PodInfo>, Arc<Proxy>, hbone::drain::Watch) -> Fut) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// Every live connection holds its task: the resolve-and-connect path is boxed so that an
    /// idle tunnel keeps only the copy state, and the drain's cut adds little (STYLE: keep
    /// the per-connection future small). Tokio allocates a task in 128-byte steps, with about
    /// 100 bytes of its own: under 1 KiB, the task takes 1152 bytes. It took 1280 at 1.1 KiB,
    /// 4.2 KB before the drain's cut stopped storing the future twice, and 8.8 KB before the
    /// handshake was boxed.
    #[test]
    fn per_connection_task_stays_small() {
        let size = task_size(|a, pod, proxy, drain| drain.until_closing(handle(a, pod, proxy)));
        assert!(size <= 1000, "outbound connection task grew to {size} bytes");
    }
}
