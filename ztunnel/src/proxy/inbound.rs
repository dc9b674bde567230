//! Inbound HBONE: the destination pod's :15008 listener terminates mTLS with the pod's
//! certificate; each CONNECT is checked (the target must be this pod, the source it claims
//! must be one its peer may claim, policy must allow the peer) and then dialed from inside
//! the pod's namespace.
//!
//! **The source of a tunnel.** Two addresses describe where a tunnel comes from: the peer
//! address of the HBONE connection, which the network vouches for (ztunnel opens outbound
//! HBONE sockets inside the source pod's namespace, so it is the source pod's IP), and the
//! `forwarded: for=` address of the CONNECT, which the client merely claims. A claim is
//! believed only when it says nothing the peer could not say for itself: it is the peer
//! address, or an address of a workload whose identity is the one the peer proved in TLS.
//! Any other claim (another workload's address, an address outside the mesh) refuses the
//! stream with 403 and is counted as `weft_connections_refused_total{reason=
//! "forwarded_mismatch"}`: a client with a mesh identity must not borrow someone else's
//! address to pass an `ipBlocks` rule. Policy then has to admit the tunnel from the peer
//! address and, when it differs, from the claimed one too, so a claim can only add
//! restrictions. Metrics and access logs name the workload of the proven identity at the
//! peer address (else at the claimed one), and "unknown" when neither holds it. Later: a
//! waypoint's identity may speak for its clients (a claim from a waypoint believed for the
//! workloads it serves).

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;

use hbone::SpiffeId;
use hbone::copy::{CopyError, Transferred};
use hbone::server::{Handler, InboundRequest, Rejection};
use meshapi::Workload;
use tokio::net::TcpStream;
use tracing::info;

use super::{PodInfo, Proxy, labels};
use crate::authz::{self, Verdict};
use crate::config::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use crate::inpod::socket;
use crate::metrics::{ConnCounters, RefusedLabels, Reporter, SecurityPolicy};
use crate::state::{Peer, State};

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

/// Why the source address a CONNECT claims (`forwarded: for=`) is not believed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimRefused {
    #[error(
        "forwarded for={claimed} refused: no workload of the mesh has that address, and the peer {peer} proved \
         {proven}; a client may claim only its own address or one of a workload with its identity"
    )]
    NotAWorkload { claimed: IpAddr, peer: IpAddr, proven: SpiffeId },
    #[error(
        "forwarded for={claimed} refused: it is an address of workload {workload}, whose identity is {owner}, \
         but the peer {peer} proved {proven}"
    )]
    OtherIdentity {
        claimed: IpAddr,
        /// `<namespace>/<name>`.
        workload: String,
        owner: String,
        peer: IpAddr,
        proven: SpiffeId,
    },
}

/// Checks the source address a CONNECT claims against the identity its peer proved (see the
/// module docs): no claim, or a claim of the peer address itself, is fine; otherwise the
/// claimed address must belong to a workload whose identity is `proven`.
pub fn check_claim(
    state: &State,
    peer: IpAddr,
    claimed: Option<IpAddr>,
    proven: &SpiffeId,
) -> Result<(), ClaimRefused> {
    let Some(claimed) = claimed.filter(|c| *c != peer) else {
        return Ok(());
    };
    let (Some(workload), Some(identity)) = (state.workload_by_ip(claimed), state.identity_by_ip(claimed)) else {
        return Err(ClaimRefused::NotAWorkload { claimed, peer, proven: proven.clone() });
    };
    match identity {
        Ok(owner) if owner == *proven => Ok(()),
        owner => Err(ClaimRefused::OtherIdentity {
            claimed,
            workload: format!("{}/{}", workload.namespace, workload.name),
            owner: owner.map_or_else(|e| format!("invalid ({e})"), |id| id.to_string()),
            peer,
            proven: proven.clone(),
        }),
    }
}

/// The source addresses policy must admit: the peer address, and the claimed one when the
/// claim (already checked) names another.
pub fn policy_sources(peer: IpAddr, claimed: Option<IpAddr>) -> impl Iterator<Item = IpAddr> {
    std::iter::once(peer).chain(claimed.filter(|c| *c != peer))
}

/// The tunnel's client as metrics and logs name it: the workload at the peer address if its
/// identity is the proven one, else the workload at the claimed address if its is, else an
/// unknown workload of the proven identity's namespace.
pub fn proved_source(state: &State, peer: IpAddr, claimed: Option<IpAddr>, proven: &SpiffeId) -> Arc<Peer> {
    let holds_proven = |ip: &IpAddr| matches!(state.identity_by_ip(*ip), Some(Ok(id)) if id == *proven);
    let at = std::iter::once(peer).chain(claimed).find(holds_proven);
    state.proved_peer(at, proven)
}

impl Inbound {
    /// Counts and logs a refused CONNECT (one `access` line) and returns its rejection.
    fn refuse(
        &self,
        state: &State,
        req: &InboundRequest,
        workload: &Workload,
        reason: &'static str,
        detail: String,
    ) -> Rejection {
        self.proxy
            .metrics
            .refused
            .get_or_create(&RefusedLabels { reason, destination_workload: workload.name.clone() })
            .inc();
        let peer = req.peer_addr.ip();
        let src = proved_source(state, peer, req.forwarded_for, &req.peer_identity);
        info!(
            src.addr = %peer,
            src.forwarded = %Claimed(req.forwarded_for),
            src.workload = %src.workload,
            src.identity = %req.peer_identity,
            dst.addr = %req.target,
            dst.workload = %workload.name,
            protocol = "HBONE",
            outcome = "denied",
            reason = %detail,
            "access"
        );
        Rejection::Denied(detail)
    }
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
        let peer = req.peer_addr.ip();
        // A forged claim is refused as a policy matter (403): the request is well-formed, the
        // mesh's rule forbids it.
        if let Err(refused) = check_claim(&state, peer, req.forwarded_for, &req.peer_identity) {
            return Err(self.refuse(&state, req, workload, "forwarded_mismatch", refused.to_string()));
        }
        for source_ip in policy_sources(peer, req.forwarded_for) {
            let conn = authz::Connection { identity: Some(&req.peer_identity), source_ip, dest_port: target.port() };
            if let Verdict::Deny(reason) = authz::check(state.policies_for(workload), &conn) {
                return Err(self.refuse(&state, req, workload, "policy", reason));
            }
        }
        Ok(())
    }

    async fn dial(&self, req: &InboundRequest) -> io::Result<(TcpStream, Session)> {
        let stream = socket::connect(&self.pod.netns, req.target).await?;
        let state = self.proxy.state.load();
        let src = proved_source(&state, req.peer_addr.ip(), req.forwarded_for, &req.peer_identity);
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
            src.addr = %req.peer_addr.ip(),
            src.forwarded = %Claimed(req.forwarded_for),
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

/// A claimed address for the access log: the address, or `-` when none was claimed.
struct Claimed(Option<IpAddr>);

impl fmt::Display for Claimed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(ip) => ip.fmt(f),
            None => f.write_str("-"),
        }
    }
}

#[cfg(test)]
mod tests {
    use meshapi::Snapshot;

    use super::*;

    /// Held by every inbound tunnel's task, whose size `hbone`'s `stream_task_stays_small`
    /// budgets with a session of at most 60 bytes.
    #[test]
    fn session_stays_small() {
        let size = std::mem::size_of::<super::Session>();
        assert!(size <= 60, "inbound session grew to {size} bytes");
    }

    /// web-0 and web-1 share service account `web`; batch is another identity.
    const DOC: &str = r#"
workloads:
  - {name: web-0, namespace: front, node: n1, addresses: [10.244.1.2], serviceAccount: web}
  - {name: web-1, namespace: front, node: n2, addresses: [10.244.2.2], serviceAccount: web}
  - {name: batch, namespace: front, node: n1, addresses: [10.244.1.3], serviceAccount: batch}
"#;

    fn state() -> State {
        State::new(Snapshot::from_yaml(DOC).unwrap())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn web() -> SpiffeId {
        "spiffe://cluster.local/ns/front/sa/web".parse().unwrap()
    }

    #[test]
    fn claims_of_the_peer_or_of_its_own_identity_are_believed() {
        let state = state();
        let web0 = ip("10.244.1.2");
        assert_eq!(check_claim(&state, web0, None, &web()), Ok(()), "no claim");
        assert_eq!(check_claim(&state, web0, Some(web0), &web()), Ok(()), "its own address");
        assert_eq!(check_claim(&state, web0, Some(ip("10.244.2.2")), &web()), Ok(()), "a replica of its identity");
        // A peer outside the mesh's addresses (a node, say) may claim a workload it proves.
        assert_eq!(check_claim(&state, ip("10.255.0.1"), Some(web0), &web()), Ok(()));
    }

    #[test]
    fn claims_of_other_identities_or_outside_addresses_are_refused() {
        let state = state();
        let web0 = ip("10.244.1.2");
        let err = check_claim(&state, web0, Some(ip("10.244.1.3")), &web()).unwrap_err();
        assert!(matches!(&err, ClaimRefused::OtherIdentity { workload, .. } if workload == "front/batch"), "{err:?}");
        assert_eq!(
            err.to_string(),
            "forwarded for=10.244.1.3 refused: it is an address of workload front/batch, whose identity is \
             spiffe://cluster.local/ns/front/sa/batch, but the peer 10.244.1.2 proved spiffe://cluster.local/ns/front/sa/web"
        );
        let err = check_claim(&state, web0, Some(ip("192.0.2.1")), &web()).unwrap_err();
        assert_eq!(err, ClaimRefused::NotAWorkload { claimed: ip("192.0.2.1"), peer: web0, proven: web() });
        assert!(err.to_string().contains("no workload of the mesh has that address"), "{err}");
        // Proving another identity than the claimed workload's is refused even from afar.
        let other: SpiffeId = "spiffe://cluster.local/ns/back/sa/web".parse().unwrap();
        assert!(check_claim(&state, ip("10.255.0.1"), Some(web0), &other).is_err());
    }

    #[test]
    fn policy_sees_the_peer_address_and_a_different_claim() {
        let (peer, other) = (ip("10.244.1.2"), ip("10.244.2.2"));
        assert_eq!(policy_sources(peer, None).collect::<Vec<_>>(), [peer]);
        assert_eq!(policy_sources(peer, Some(peer)).collect::<Vec<_>>(), [peer]);
        assert_eq!(policy_sources(peer, Some(other)).collect::<Vec<_>>(), [peer, other]);
    }

    #[test]
    fn a_deny_on_the_peer_address_holds_whatever_is_claimed() {
        let doc = format!(
            "{DOC}authorizations:\n  - {{name: no-web-0, namespace: front, action: DENY, rules: [{{from: [{{ipBlocks: [10.244.1.2/32]}}]}}]}}\n"
        );
        let state = State::new(Snapshot::from_yaml(&doc).unwrap());
        let target = state.workload_by_ip(ip("10.244.1.3")).unwrap();
        let id = web();
        let denied = |peer: IpAddr, claimed: Option<IpAddr>| {
            check_claim(&state, peer, claimed, &id).is_err()
                || policy_sources(peer, claimed).any(|source_ip| {
                    let conn = authz::Connection { identity: Some(&id), source_ip, dest_port: 80 };
                    matches!(authz::check(state.policies_for(target), &conn), Verdict::Deny(_))
                })
        };
        let (web0, web1) = (ip("10.244.1.2"), ip("10.244.2.2"));
        assert!(denied(web0, None));
        assert!(denied(web0, Some(web1)), "claiming a replica's address does not escape the DENY");
        assert!(denied(web0, Some(ip("192.0.2.1"))));
        assert!(!denied(web1, None), "the replica itself is not denied");
        assert!(denied(web1, Some(web0)), "nor can anyone claim the denied address to pass");
    }

    #[test]
    fn labels_name_the_workload_of_the_proven_identity() {
        let state = state();
        let (web0, web1, batch) = (ip("10.244.1.2"), ip("10.244.2.2"), ip("10.244.1.3"));
        let name = |peer, claimed, id: &SpiffeId| proved_source(&state, peer, claimed, id).workload.clone();
        assert_eq!(name(web0, None, &web()), "web-0");
        assert_eq!(name(web0, Some(web1), &web()), "web-0", "the peer address wins over a replica's claim");
        assert_eq!(
            name(ip("10.255.0.1"), Some(web1), &web()),
            "web-1",
            "a claim names the client when the peer is no workload"
        );
        // A peer holding another identity than its address's workload is not named after it.
        let src = proved_source(&state, batch, None, &web());
        assert_eq!((src.workload.as_str(), src.namespace.as_str()), ("unknown", "front"));
        assert_eq!(src.principal, web().to_string());
    }
}
