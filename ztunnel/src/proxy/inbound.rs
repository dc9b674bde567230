//! Inbound HBONE: the destination pod's :15008 listener terminates mTLS with the pod's
//! certificate; each CONNECT is checked (the target must be this pod, policy must allow the
//! peer) and then dialed from inside the pod's namespace.

use std::io;
use std::sync::Arc;

use hbone::copy::{CopyError, Transferred};
use hbone::server::{Handler, InboundRequest, Rejection};
use tokio::net::TcpStream;
use tracing::info;

use super::{PodInfo, Proxy, labels};
use crate::authz::{self, Verdict};
use crate::config::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use crate::inpod::socket;
use crate::metrics::{ConnCounters, RefusedLabels, Reporter, SecurityPolicy};
use crate::state::Peer;

pub struct Inbound {
    pub proxy: Arc<Proxy>,
    pub pod: Arc<PodInfo>,
}

/// What an open inbound tunnel keeps for its metrics and access-log line.
pub struct Session {
    src: Arc<Peer>,
    dst: Arc<Peer>,
    counters: ConnCounters,
}

impl Handler for Inbound {
    type Session = Session;

    fn authorize(&self, req: &InboundRequest) -> Result<(), Rejection> {
        let target = req.target;
        if !self.pod.ips.contains(&target.ip()) {
            return Err(Rejection::NotServed(format!("{target} is not an address of pod {}", self.pod.uid)));
        }
        if [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT].contains(&target.port()) {
            return Err(Rejection::NotServed(format!("port {} is reserved for ztunnel", target.port())));
        }
        let state = self.proxy.state.load();
        let Some(workload) = state.workload_by_ip(target.ip()) else {
            return Err(Rejection::NotServed(format!("{target} is no longer a known workload")));
        };
        let conn = authz::Connection {
            identity: Some(&req.peer_identity),
            source_ip: req.forwarded_for.unwrap_or(req.peer_addr.ip()),
            dest_port: target.port(),
        };
        match authz::check(state.policies_for(workload), &conn) {
            Verdict::Allow => Ok(()),
            Verdict::Deny(reason) => {
                self.proxy
                    .metrics
                    .refused
                    .get_or_create(&RefusedLabels { reason: "policy", destination_workload: workload.name.clone() })
                    .inc();
                info!(
                    src.addr = %conn.source_ip,
                    src.identity = %req.peer_identity,
                    dst.addr = %target,
                    dst.workload = %workload.name,
                    protocol = "HBONE",
                    outcome = "denied",
                    reason = %reason,
                    "access"
                );
                Err(Rejection::Denied(reason))
            }
        }
    }

    async fn dial(&self, req: &InboundRequest) -> io::Result<(TcpStream, Session)> {
        let stream = socket::connect(&self.pod.netns, req.target).await?;
        let state = self.proxy.state.load();
        let src = state.proved_peer(req.forwarded_for, &req.peer_identity);
        let dst = state.peer_by_ip(req.target.ip());
        let service = state.service_name_by_ip(req.target.ip());
        drop(state);
        let counters =
            self.proxy.metrics.open(&labels(Reporter::destination, &src, &dst, &service, SecurityPolicy::mutual_tls));
        Ok((stream, Session { src, dst, counters }))
    }

    fn finished(&self, req: &InboundRequest, session: Session, result: &Result<Transferred, CopyError>) {
        let (t, outcome) = match result {
            Ok(t) => (*t, "ok".to_owned()),
            Err(e) => (e.transferred, format!("error: {}", e.cause)),
        };
        // The tunnel carries client bytes in (from_tunnel, the request direction) and the
        // app's answer out (to_tunnel).
        let Session { src, dst, counters } = session;
        counters.close(t.from_tunnel, t.to_tunnel);
        info!(
            src.addr = %req.forwarded_for.unwrap_or(req.peer_addr.ip()),
            src.workload = %src.workload,
            src.identity = %req.peer_identity,
            dst.addr = %req.target,
            dst.workload = %dst.workload,
            dst.identity = %dst.principal,
            protocol = "HBONE",
            bytes_sent = t.to_tunnel,
            bytes_received = t.from_tunnel,
            duration_ms = req.received_at.elapsed().as_millis() as u64,
            outcome = %outcome,
            "access"
        );
    }
}

#[cfg(test)]
mod tests {
    /// Held by every inbound tunnel's task, whose size `hbone`'s `stream_task_stays_small`
    /// budgets with a session of at most 60 bytes.
    #[test]
    fn session_stays_small() {
        let size = std::mem::size_of::<super::Session>();
        assert!(size <= 60, "inbound session grew to {size} bytes");
    }
}
