//! The cluster as this ztunnel sees it: the model indexed for the lookups a connection needs
//! (workload by IP, service by VIP and port, a service's endpoints, the policies of a
//! workload), swapped atomically when a new snapshot is accepted.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock, OnceLock};

use arc_swap::ArcSwap;
use hbone::SpiffeId;
use hbone::identity::IdentityError;
use meshapi::{Authorization, Service, ServicePort, Snapshot, Workload};

/// A connection's peer as metrics and access logs name it. Built once per workload and
/// snapshot, and shared by that workload's connections: a connection holds an `Arc`, not
/// three strings of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub workload: String,
    pub namespace: String,
    pub principal: String,
}

impl Peer {
    /// A peer the mesh knows nothing about.
    pub fn unknown() -> Arc<Peer> {
        static UNKNOWN: LazyLock<Arc<Peer>> = LazyLock::new(|| {
            Arc::new(Peer { workload: "unknown".into(), namespace: "unknown".into(), principal: "unknown".into() })
        });
        UNKNOWN.clone()
    }

    fn of(workload: &Workload, identity: &Result<SpiffeId, IdentityError>) -> Peer {
        let principal = identity.as_ref().map_or_else(|_| "unknown".into(), |id| id.to_string());
        Peer { workload: workload.name.clone(), namespace: workload.namespace.clone(), principal }
    }

    /// `self` with a principal of `principal`, shared if it already is.
    pub fn with_principal(self: &Arc<Peer>, principal: &str) -> Arc<Peer> {
        if self.principal == principal {
            return self.clone();
        }
        Arc::new(Peer { principal: principal.to_owned(), ..Peer::clone(self) })
    }
}

/// What connections need of one workload beyond the model: its identity, parsed once, and
/// what metrics and logs call it, shared by its connections.
#[derive(Debug)]
struct WorkloadLabels {
    identity: Result<SpiffeId, IdentityError>,
    /// With its configured identity as principal.
    peer: Arc<Peer>,
    /// With principal "unknown": nothing was proved (plaintext, passthrough).
    unproved: Arc<Peer>,
    /// The first service selecting it (metrics' `destination_service`), or "unknown".
    service: Arc<str>,
}

/// "unknown", shared.
fn unknown() -> Arc<str> {
    static UNKNOWN: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("unknown"));
    UNKNOWN.clone()
}

/// An immutable, indexed snapshot.
#[derive(Debug, Default)]
pub struct State {
    snapshot: Snapshot,
    by_ip: HashMap<IpAddr, usize>,
    /// Per workload index, built on first use (a snapshot may hold many workloads this node
    /// never talks to): the workload's labels, as metrics and logs name it.
    labels: Vec<OnceLock<WorkloadLabels>>,
    by_vip: HashMap<(IpAddr, u16), usize>,
    /// Every service VIP, whatever the port.
    vips: HashSet<IpAddr>,
    /// Service index -> workload indexes it selects.
    endpoints: Vec<Vec<usize>>,
}

/// Where an outbound connection goes, once resolved.
#[derive(Debug, Clone, Copy)]
pub enum Resolved<'a> {
    /// To a service VIP: load balanced over `endpoints` (never empty).
    Service { service: &'a Service, port: &'a ServicePort, endpoints: &'a [usize] },
    /// To a workload's own address (`index` in the snapshot).
    Workload { index: usize, workload: &'a Workload },
    /// To something the mesh does not know: passed through as is.
    Unknown,
}

impl State {
    pub fn new(snapshot: Snapshot) -> State {
        let mut by_ip = HashMap::new();
        for (i, w) in snapshot.workloads.iter().enumerate() {
            for ip in &w.addresses {
                by_ip.insert(*ip, i);
            }
        }
        let mut by_vip = HashMap::new();
        let mut endpoints = Vec::with_capacity(snapshot.services.len());
        for (i, s) in snapshot.services.iter().enumerate() {
            for vip in &s.vips {
                for p in &s.ports {
                    by_vip.insert((*vip, p.port), i);
                }
            }
            endpoints
                .push(snapshot.workloads.iter().enumerate().filter(|(_, w)| s.selects(w)).map(|(j, _)| j).collect());
        }
        let vips = snapshot.services.iter().flat_map(|s| s.vips.iter().copied()).collect();
        let labels = snapshot.workloads.iter().map(|_| OnceLock::new()).collect();
        State { snapshot, by_ip, labels, by_vip, vips, endpoints }
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    pub fn trust_domain(&self) -> &str {
        &self.snapshot.trust_domain
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip.get(&ip).map(|i| &self.snapshot.workloads[*i])
    }

    pub fn workload(&self, index: usize) -> &Workload {
        &self.snapshot.workloads[index]
    }

    fn labels(&self, index: usize) -> &WorkloadLabels {
        self.labels[index].get_or_init(|| {
            let workload = &self.snapshot.workloads[index];
            let identity = workload.identity(&self.snapshot.trust_domain);
            let peer = Peer::of(workload, &identity);
            let unproved = Arc::new(Peer { principal: "unknown".into(), ..peer.clone() });
            let service = self.services_of(workload).next().map_or_else(unknown, |s| Arc::from(&*s.hostname));
            WorkloadLabels { identity, peer: Arc::new(peer), unproved, service }
        })
    }

    /// The identity of the workload at `index` (cheap to clone).
    pub fn identity(&self, index: usize) -> Result<SpiffeId, IdentityError> {
        self.labels(index).identity.clone()
    }

    /// The identity of the workload at `ip`, if one is there.
    pub fn identity_by_ip(&self, ip: IpAddr) -> Option<Result<SpiffeId, IdentityError>> {
        self.by_ip.get(&ip).map(|i| self.identity(*i))
    }

    /// The peer at `ip` with its configured identity as principal, or unknown.
    pub fn peer_by_ip(&self, ip: IpAddr) -> Arc<Peer> {
        self.by_ip.get(&ip).map_or_else(Peer::unknown, |i| self.labels(*i).peer.clone())
    }

    /// The peer at `ip` with principal "unknown" (nothing was proved), or unknown.
    pub fn unproved_peer_by_ip(&self, ip: IpAddr) -> Arc<Peer> {
        self.by_ip.get(&ip).map_or_else(Peer::unknown, |i| self.labels(*i).unproved.clone())
    }

    /// The peer at `ip` whose identity `identity` was proved: the workload there, or, when no
    /// known workload is, what the identity says (its namespace).
    pub fn proved_peer(&self, ip: Option<IpAddr>, identity: &SpiffeId) -> Arc<Peer> {
        match ip.and_then(|ip| self.by_ip.get(&ip)) {
            Some(i) => self.labels(*i).peer.with_principal(identity.as_str()),
            None => Arc::new(Peer {
                workload: "unknown".into(),
                namespace: identity.namespace().to_owned(),
                principal: identity.to_string(),
            }),
        }
    }

    /// The service name for metrics of the workload at `ip`: the first service selecting
    /// it, or "unknown".
    pub fn service_name_by_ip(&self, ip: IpAddr) -> Arc<str> {
        self.by_ip.get(&ip).map_or_else(unknown, |i| self.labels(*i).service.clone())
    }

    /// Workloads scheduled on `node`.
    pub fn local_workloads<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.snapshot.workloads.iter().filter(move |w| w.node == node)
    }

    /// Resolves an original destination: a service VIP with endpoints, a workload, or unknown.
    /// A VIP whose service has no endpoint resolves to `Unknown` (the caller refuses it).
    pub fn resolve(&self, dst: SocketAddr) -> Resolved<'_> {
        if let Some(i) = self.by_vip.get(&(dst.ip(), dst.port())) {
            let service = &self.snapshot.services[*i];
            if let (Some(port), false) = (service.port(dst.port()), self.endpoints[*i].is_empty()) {
                return Resolved::Service { service, port, endpoints: &self.endpoints[*i] };
            }
            return Resolved::Unknown;
        }
        match self.by_ip.get(&dst.ip()) {
            Some(&index) => Resolved::Workload { index, workload: &self.snapshot.workloads[index] },
            None => Resolved::Unknown,
        }
    }

    /// The workloads (indexes) that the service at `service` (its index in the snapshot) selects.
    pub fn endpoints(&self, service: usize) -> &[usize] {
        &self.endpoints[service]
    }

    /// Whether `ip` is a service VIP (on any port).
    pub fn is_vip(&self, ip: IpAddr) -> bool {
        self.vips.contains(&ip)
    }

    /// The services that select `workload` (for metrics' `destination_service`).
    pub fn services_of<'a>(&'a self, workload: &'a Workload) -> impl Iterator<Item = &'a Service> + 'a {
        self.snapshot.services.iter().filter(move |s| s.selects(workload))
    }

    /// The authorization policies that govern `workload`.
    pub fn policies_for<'a>(&'a self, workload: &'a Workload) -> impl Iterator<Item = &'a Authorization> + 'a {
        self.snapshot.authorizations.iter().filter(move |a| a.applies_to(workload))
    }
}

/// The current state, shared by every connection; replaced whole on each accepted snapshot.
#[derive(Clone, Default)]
pub struct StateStore {
    current: Arc<ArcSwap<State>>,
}

impl StateStore {
    pub fn load(&self) -> Arc<State> {
        self.current.load_full()
    }

    pub fn replace(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(State::new(snapshot)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"
workloads:
  - {name: a, namespace: ns, node: n1, addresses: [10.244.1.2], labels: {app: api}, enrolled: true}
  - {name: b, namespace: ns, node: n2, addresses: [10.244.2.2], labels: {app: api}, enrolled: true}
  - {name: c, namespace: other, node: n1, addresses: [10.244.1.3], labels: {app: api}}
services:
  - {name: api, namespace: ns, vips: [10.96.0.10], ports: [{port: 80, targetPort: 8080}], selector: {app: api}}
  - {name: empty, namespace: ns, vips: [10.96.0.11], ports: [{port: 80}], selector: {app: none}}
"#;

    #[test]
    fn resolves_vips_workloads_and_unknowns() {
        let state = State::new(Snapshot::from_yaml(DOC).unwrap());
        match state.resolve("10.96.0.10:80".parse().unwrap()) {
            Resolved::Service { service, port, endpoints } => {
                assert_eq!(service.name, "api");
                assert_eq!(port.target_port, 8080);
                let names: Vec<_> = endpoints.iter().map(|i| state.workload(*i).name.as_str()).collect();
                assert_eq!(names, ["a", "b"], "same-namespace workloads only");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(state.resolve("10.96.0.10:81".parse().unwrap()), Resolved::Unknown), "unknown port");
        assert!(matches!(state.resolve("10.96.0.11:80".parse().unwrap()), Resolved::Unknown), "no endpoints");
        assert!(
            matches!(state.resolve("10.244.2.2:9".parse().unwrap()), Resolved::Workload { workload, .. } if workload.name == "b")
        );
        assert!(matches!(state.resolve("192.0.2.1:80".parse().unwrap()), Resolved::Unknown));
        assert_eq!(state.local_workloads("n1").count(), 2);
        assert!(state.is_vip("10.96.0.11".parse().unwrap()));
        assert!(!state.is_vip("10.244.1.2".parse().unwrap()));
    }

    #[test]
    fn labels_are_built_once_and_shared() {
        let state = State::new(Snapshot::from_yaml(DOC).unwrap());
        let a: IpAddr = "10.244.1.2".parse().unwrap();
        let peer = state.peer_by_ip(a);
        assert_eq!((peer.workload.as_str(), peer.namespace.as_str()), ("a", "ns"));
        assert_eq!(peer.principal, "spiffe://cluster.local/ns/ns/sa/default");
        assert!(Arc::ptr_eq(&peer, &state.peer_by_ip(a)), "one Peer per workload, shared");
        assert_eq!(state.unproved_peer_by_ip(a).principal, "unknown");
        assert_eq!(&*state.service_name_by_ip(a), state.snapshot().services[0].hostname.as_str());
        let c: IpAddr = "10.244.1.3".parse().unwrap();
        assert_eq!(&*state.service_name_by_ip(c), "unknown", "selected by no service of its namespace");
        let nowhere: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(state.peer_by_ip(nowhere).workload, "unknown");
        let proved = state.proved_peer(Some(a), &"spiffe://cluster.local/ns/ns/sa/other".parse().unwrap());
        assert_eq!(
            (proved.workload.as_str(), proved.principal.as_str()),
            ("a", "spiffe://cluster.local/ns/ns/sa/other")
        );
    }
}
