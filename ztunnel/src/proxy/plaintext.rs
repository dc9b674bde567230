//! Inbound plaintext: TCP that reached an enrolled pod without HBONE (from a pod outside the
//! mesh, or another node's non-mesh traffic), redirected to :15006. Allowed only when the
//! pod's mode is PERMISSIVE and policy admits a peer without identity; in STRICT mode it is
//! closed and recorded as denied. The app sees the client's address as its peer.

use std::net::SocketAddr;
use std::sync::Arc;

use meshapi::MtlsMode;

use super::record::{ConnectionRecord, Direction, Outcome, Protocol};
use super::{Accepted, PodInfo, Proxy, copy_tcp};
use crate::authz::{self, Verdict};
use crate::config::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use crate::metrics::Refusal;
use crate::state::State;

/// Serves one plaintext inbound connection (see the module docs).
pub async fn handle(accepted: Accepted, pod: Arc<PodInfo>, proxy: Arc<Proxy>) {
    let Accepted { mut tcp, peer, orig } = accepted;
    let (pod, proxy) = (&*pod, &*proxy);
    let mut record = ConnectionRecord::new(&proxy.metrics, Direction::Inbound, Protocol::Tcp, peer, orig);
    {
        let state = proxy.state.load();
        // Plaintext proves nothing about the source: its principal is unknown.
        record.source(state.unproved_peer_by_ip(peer.ip()));
        record.destination(state.peer_by_ip(orig.ip()), state.service_name_by_ip(orig.ip()));
        if let Err((refusal, detail)) = admit(&state, pod, peer, orig) {
            return record.refuse(refusal, detail);
        }
    }
    // The app sees its client's address, as without the mesh.
    let mut upstream = match proxy.pods.connect_to_app(pod, [peer.ip()], orig).await {
        Ok(u) => u,
        Err(e) => return record.refuse(Refusal::Unreachable, format_args!("connect to {orig}: {e}")),
    };
    record.open();
    record.finish(Outcome::of_copy(copy_tcp(&mut tcp, &mut upstream).await));
}

/// Whether plaintext from `peer` may reach `orig` in `pod`, or why not.
fn admit(state: &State, pod: &PodInfo, peer: SocketAddr, orig: SocketAddr) -> Result<(), (Refusal, String)> {
    let Some(w) = state.workload_by_ip(orig.ip()).filter(|_| pod.ips.contains(&orig.ip())) else {
        return Err((Refusal::NotServed, format!("{orig} is not an address of pod {}", pod.uid)));
    };
    if [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT].contains(&orig.port()) {
        return Err((Refusal::NotServed, format!("port {} is reserved for ztunnel", orig.port())));
    }
    if w.mtls == MtlsMode::Strict {
        return Err((Refusal::StrictMtls, format!("workload {} is STRICT: plaintext from {peer} refused", w.uid)));
    }
    if let Some(waypoint) = state.waypoint_of(w) {
        let detail = format!(
            "workload {} is reached only through its waypoint {waypoint}: plaintext from {peer} refused",
            w.uid
        );
        return Err((Refusal::Policy, detail));
    }
    let conn = authz::Connection { identity: None, source_ip: peer.ip(), dest_port: orig.port(), request: None };
    match authz::check(state.policies_for(w), &conn) {
        Verdict::Deny(reason) => Err((Refusal::Policy, reason)),
        _ => Ok(()),
    }
}
