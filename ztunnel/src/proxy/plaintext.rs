//! Inbound plaintext: TCP that reached an enrolled pod without HBONE (from a pod outside the
//! mesh, or another node's non-mesh traffic), redirected to :15006. Allowed only when the
//! pod's mode is PERMISSIVE and policy admits a peer without identity; in STRICT mode it is
//! closed, counted and logged.

use std::sync::Arc;
use std::time::Instant;

use tracing::info;

use super::{Accepted, PodInfo, Proxy, labels};
use crate::authz::{self, Verdict};
use crate::config::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use crate::inpod::socket;
use crate::metrics::{RefusedLabels, Reporter, SecurityPolicy};
use meshapi::MtlsMode;

/// Serves one plaintext inbound connection (see the module docs).
pub async fn handle(accepted: Accepted, pod: Arc<PodInfo>, proxy: Arc<Proxy>) {
    let Accepted { mut tcp, peer, orig } = accepted;
    let (pod, proxy) = (&*pod, &*proxy);
    let started = Instant::now();
    let state = proxy.state.load();
    let workload = state.workload_by_ip(orig.ip());
    let refuse = |reason: &'static str, detail: String| {
        proxy
            .metrics
            .refused
            .get_or_create(&RefusedLabels {
                reason,
                destination_workload: workload.map(|w| w.name.clone()).unwrap_or_else(|| "unknown".into()),
            })
            .inc();
        info!(src.addr = %peer, dst.addr = %orig, protocol = "TCP", outcome = "refused", reason = %detail, "access");
    };
    let Some(w) = workload.filter(|_| pod.ips.contains(&orig.ip())) else {
        return refuse("not_served", format!("{orig} is not an address of pod {}", pod.uid));
    };
    if [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT].contains(&orig.port()) {
        return refuse("not_served", format!("port {} is reserved for ztunnel", orig.port()));
    }
    if w.mtls == MtlsMode::Strict {
        return refuse("strict_mtls", format!("workload {} is STRICT: plaintext from {peer} refused", w.uid));
    }
    let conn = authz::Connection { identity: None, source_ip: peer.ip(), dest_port: orig.port() };
    if let Verdict::Deny(reason) = authz::check(state.policies_for(w), &conn) {
        return refuse("policy", reason);
    }
    // Plaintext proves nothing about the source: its principal is unknown.
    let src = state.unproved_peer_by_ip(peer.ip());
    let dst = state.peer_by_ip(orig.ip());
    let labels = labels(Reporter::destination, &src, &dst, &state.service_name_by_ip(orig.ip()), SecurityPolicy::none);
    drop(state);
    let mut upstream = match socket::connect(&pod.netns, orig).await {
        Ok(u) => u,
        Err(e) => {
            proxy
                .metrics
                .refused
                .get_or_create(&RefusedLabels { reason: "unreachable", destination_workload: dst.workload.clone() })
                .inc();
            info!(src.addr = %peer, dst.addr = %orig, outcome = "refused", reason = %e, "access");
            return;
        }
    };
    let counters = proxy.metrics.open(&labels);
    drop(labels);
    let (received, sent, outcome) = match tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await {
        Ok((a, b)) => (a, b, "ok".to_owned()),
        Err(e) => (0, 0, format!("error: {e}")),
    };
    counters.close(received, sent);
    info!(
        src.addr = %peer,
        src.workload = %src.workload,
        dst.addr = %orig,
        dst.workload = %dst.workload,
        protocol = "TCP",
        bytes_sent = sent,
        bytes_received = received,
        duration_ms = started.elapsed().as_millis() as u64,
        outcome = %outcome,
        "access"
    );
}
