//! Inbound HBONE: the destination pod's :15008 listener terminates mTLS with the pod's
//! certificate; each CONNECT is checked (the target must be this pod, the source it claims
//! must be one its peer may claim, policy must allow the peer) and then dialed from inside
//! the pod's namespace, with the client's address as source: the app sees who its client is
//! (the claimed address, else the peer's, of the target's family; a waypoint claims nothing,
//! so its clients' apps see the waypoint).
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

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hbone::SpiffeId;
use hbone::copy::{CopyError, Transferred};
use hbone::server::{Handler, InboundRequest, Rejection};
use tokio::net::TcpStream;

use super::record::{ConnectionRecord, Direction, Outcome, Protocol, Traffic};
use super::{PodInfo, Proxy};
use crate::authz::{self, Verdict};
use crate::config::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use crate::metrics::Refusal;
use crate::state::{Peer, State};

pub struct Inbound {
    pub proxy: Arc<Proxy>,
    pub pod: Arc<PodInfo>,
}

/// What an open inbound tunnel keeps for its metrics and access-log line: its record.
pub struct Session(Box<ConnectionRecord>);

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
    /// The record of a CONNECT: the proved source, the target and who is there.
    fn record(&self, state: &State, req: &InboundRequest) -> Box<ConnectionRecord> {
        let peer = req.peer_addr.ip();
        // The peer's port is the pooled HBONE connection's, not the client's: unknown (0).
        let src_addr = SocketAddr::new(peer, 0);
        let mut record =
            ConnectionRecord::new(&self.proxy.metrics, Direction::Inbound, Protocol::Hbone, src_addr, req.target);
        record.started_at(req.received_at);
        record.claimed(req.forwarded_for);
        record.source(proved_source(state, peer, req.forwarded_for, &req.peer_identity));
        record.destination(state.peer_by_ip(req.target.ip()), state.service_name_by_ip(req.target.ip()));
        record
    }

    /// Records a refused CONNECT and returns its rejection.
    fn refuse(&self, state: &State, req: &InboundRequest, refusal: Refusal, detail: String) -> Rejection {
        self.record(state, req).refuse(refusal, &detail);
        match refusal {
            Refusal::NotServed => Rejection::NotServed(detail),
            _ => Rejection::Denied(detail),
        }
    }
}

impl Handler for Inbound {
    type Session = Session;
    type Upstream = TcpStream;

    fn authorize(&self, req: &InboundRequest) -> Result<(), Rejection> {
        let target = req.target;
        let state = self.proxy.state.load();
        if !self.pod.ips.contains(&target.ip()) {
            let detail = format!("{target} is not an address of pod {}", self.pod.uid);
            return Err(self.refuse(&state, req, Refusal::NotServed, detail));
        }
        if [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT].contains(&target.port()) {
            let detail = format!("port {} is reserved for ztunnel", target.port());
            return Err(self.refuse(&state, req, Refusal::NotServed, detail));
        }
        let Some(workload) = state.workload_by_ip(target.ip()) else {
            let detail = format!("{target} is no longer a known workload");
            return Err(self.refuse(&state, req, Refusal::NotServed, detail));
        };
        // A workload behind a waypoint accepts tunnels only from it: a client that dials the
        // pod directly (or a peer that is not captured) must not skip the waypoint's policy.
        if let Some(waypoint) = state.waypoint_of(workload) {
            let through = state.waypoint(waypoint).and_then(|w| w.identity(state.trust_domain()).ok());
            if through.as_ref() != Some(&req.peer_identity) {
                let detail = format!(
                    "workload {} is reached only through its waypoint {waypoint}; {} is not it",
                    workload.uid, req.peer_identity
                );
                return Err(self.refuse(&state, req, Refusal::Policy, detail));
            }
        }
        let peer = req.peer_addr.ip();
        // A forged claim is refused as a policy matter (403): the request is well-formed, the
        // mesh's rule forbids it.
        if let Err(refused) = check_claim(&state, peer, req.forwarded_for, &req.peer_identity) {
            return Err(self.refuse(&state, req, Refusal::ForwardedMismatch, refused.to_string()));
        }
        for source_ip in policy_sources(peer, req.forwarded_for) {
            let conn = authz::Connection {
                identity: Some(&req.peer_identity),
                source_ip,
                dest_port: target.port(),
                request: None,
            };
            if let Verdict::Deny(reason) = authz::check(state.policies_for(workload), &conn) {
                return Err(self.refuse(&state, req, Refusal::Policy, reason));
            }
        }
        Ok(())
    }

    async fn dial(&self, req: &InboundRequest) -> io::Result<(TcpStream, Session)> {
        let mut record = self.record(&self.proxy.state.load(), req);
        // The app sees the client's address: the claimed one (checked in `authorize`), else the
        // peer's, whichever is of the target's family.
        let candidates = req.forwarded_for.into_iter().chain([req.peer_addr.ip()]);
        match self.proxy.pods.connect_to_app(&self.pod, candidates, req.target).await {
            Ok(stream) => {
                record.open();
                Ok((stream, Session(record)))
            }
            Err(e) => {
                record.refuse(Refusal::Unreachable, format_args!("connect to {}: {e}", req.target));
                Err(e)
            }
        }
    }

    fn finished(&self, _req: &InboundRequest, session: Session, result: &Result<Transferred, CopyError>) {
        // The tunnel carries the client's bytes in (from_tunnel, the request direction) and
        // the app's answer out (to_tunnel).
        let outcome = match result {
            Ok(t) => Outcome::Ok(Traffic { sent: t.from_tunnel, received: t.to_tunnel }),
            Err(e) => {
                let t = e.transferred;
                Outcome::Error(Traffic { sent: t.from_tunnel, received: t.to_tunnel }, e.cause.to_string())
            }
        };
        session.0.finish(outcome);
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
                    let conn = authz::Connection { identity: Some(&id), source_ip, dest_port: 80, request: None };
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
