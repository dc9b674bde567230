//! The typed model. Every field is already validated: an IP is an `IpAddr`, an identity a
//! [`SpiffeId`], a CIDR an `IpNet`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use spiffe::SpiffeId;

/// The namespace whose authorization policies apply to every workload in the mesh.
pub const ROOT_NAMESPACE: &str = "weft-system";

/// The whole view of the cluster a proxy needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub trust_domain: String,
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub authorizations: Vec<Authorization>,
    pub waypoints: Vec<Waypoint>,
    pub http_routes: Vec<HttpRoute>,
}

/// A pod (or VM): where it runs, its addresses, who it is, and whether the mesh captures it.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// Unique key; `<namespace>/<name>` unless the source gives one.
    pub uid: String,
    pub name: String,
    pub namespace: String,
    /// The node the workload is scheduled on; that node's ztunnel captures it.
    pub node: String,
    pub addresses: Vec<IpAddr>,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// Captured by the mesh (its namespace opted in and it did not opt out).
    pub enrolled: bool,
    /// Whether plaintext (non-HBONE) inbound connections are accepted.
    pub mtls: MtlsMode,
    /// The waypoint (`<namespace>/<name>` of a [`Waypoint`]) all traffic to this workload
    /// goes through.
    pub waypoint: Option<String>,
}

impl Workload {
    /// The SPIFFE identity of this workload in `trust_domain`.
    pub fn identity(&self, trust_domain: &str) -> Result<SpiffeId, spiffe::IdentityError> {
        SpiffeId::new(trust_domain, &self.namespace, &self.service_account)
    }
}

/// Whether a workload accepts plaintext inbound connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MtlsMode {
    /// Plaintext accepted (subject to policy, which sees no identity): the migration mode.
    #[default]
    Permissive,
    /// Only HBONE (mutual TLS) accepted.
    Strict,
}

/// A Kubernetes Service: virtual IPs and ports, load balanced over the workloads its selector
/// picks in its namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `<name>.<namespace>.svc.cluster.local` unless given.
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub selector: BTreeMap<String, String>,
    /// The waypoint (`<namespace>/<name>` of a [`Waypoint`]) traffic to this service goes
    /// through.
    pub waypoint: Option<String>,
}

impl Service {
    /// Whether `workload` is one of this service's endpoints.
    pub fn selects(&self, workload: &Workload) -> bool {
        !self.selector.is_empty()
            && workload.namespace == self.namespace
            && self.selector.iter().all(|(k, v)| workload.labels.get(k) == Some(v))
    }

    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
    pub app_protocol: Option<String>,
}

/// An L4 authorization policy (`AuthorizationPolicy.security.weft.dev`).
#[derive(Debug, Clone, PartialEq)]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    pub scope: PolicyScope,
    pub action: Action,
    pub rules: Vec<Rule>,
    /// Set when part of the policy could not be understood. Such a policy fails closed: a
    /// broken DENY denies everything it selects; a broken ALLOW allows nothing.
    pub broken: Option<String>,
}

/// Which workloads a policy governs.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyScope {
    /// Every workload in the mesh (policies in [`ROOT_NAMESPACE`] without a selector).
    Mesh,
    /// Every workload in the policy's namespace.
    Namespace,
    /// Workloads whose labels match, in the policy's namespace (or anywhere, for the root
    /// namespace).
    Selector(BTreeMap<String, String>),
    /// Requests to these Services (names in the policy's namespace), enforced by their
    /// waypoint (`targetRefs`); no workload's ztunnel applies it.
    Services(Vec<String>),
}

impl Authorization {
    /// Whether this policy governs `workload`.
    pub fn applies_to(&self, workload: &Workload) -> bool {
        let in_scope_namespace = self.namespace == ROOT_NAMESPACE || self.namespace == workload.namespace;
        match &self.scope {
            PolicyScope::Mesh => true,
            PolicyScope::Namespace => self.namespace == workload.namespace,
            PolicyScope::Selector(sel) => {
                in_scope_namespace && sel.iter().all(|(k, v)| workload.labels.get(k) == Some(v))
            }
            PolicyScope::Services(_) => false,
        }
    }

    /// Whether this policy targets `service` (enforced by the service's waypoint).
    pub fn targets_service(&self, service: &Service) -> bool {
        matches!(&self.scope, PolicyScope::Services(names)
            if self.namespace == service.namespace && names.contains(&service.name))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

/// A rule matches a connection when one of `from` matches (or `from` is empty), its
/// destination port is one of `ports` (or `ports` is empty), and, for a request, one of `to`
/// matches (or `to` is empty). Only a waypoint sees requests: at L4, a rule with `to` never
/// allows, and denies whatever its other fields match (ARCHITECTURE §9.3).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rule {
    pub from: Vec<Source>,
    pub ports: Vec<u16>,
    pub to: Vec<Operation>,
}

/// What a request does: it matches when every field that is set matches.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Operation {
    /// HTTP methods (`GET`), compared exactly.
    pub methods: Vec<String>,
    pub paths: Vec<PathPattern>,
}

/// A request path pattern (the path without its query): exact, `*` (any), a prefix ending in
/// `*` (`/admin/*`), or a suffix starting with `*` (`*.js`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Exact(String),
    Any,
    Prefix(String),
    Suffix(String),
}

impl PathPattern {
    pub fn parse(text: &str) -> Result<PathPattern, String> {
        let stars = text.matches('*').count();
        match (text, stars) {
            ("*", _) => Ok(PathPattern::Any),
            (t, 0) if t.starts_with('/') => Ok(PathPattern::Exact(t.to_owned())),
            (t, 1) if t.ends_with('*') && t.starts_with('/') => Ok(PathPattern::Prefix(t[..t.len() - 1].to_owned())),
            (t, 1) if t.starts_with('*') => Ok(PathPattern::Suffix(t[1..].to_owned())),
            _ => Err(format!(
                "{text:?} is not a path pattern: an exact path starting with /, *, a prefix ending in * or a suffix starting with *"
            )),
        }
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(p) => p == path,
            PathPattern::Any => true,
            PathPattern::Prefix(p) => path.starts_with(p.as_str()),
            PathPattern::Suffix(s) => path.ends_with(s.as_str()),
        }
    }
}

impl std::fmt::Display for PathPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathPattern::Exact(p) => f.write_str(p),
            PathPattern::Any => f.write_str("*"),
            PathPattern::Prefix(p) => write!(f, "{p}*"),
            PathPattern::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

/// A source matches when every field that is set matches.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Source {
    pub principals: Vec<Principal>,
    pub namespaces: Vec<String>,
    pub ip_blocks: Vec<IpNet>,
}

/// A principal pattern: an exact identity, `*` (any authenticated peer), or a prefix/suffix
/// with one `*` (`spiffe://cluster.local/ns/prod/*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Exact(SpiffeId),
    Any,
    Prefix(String),
    Suffix(String),
}

impl Principal {
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Principal::Exact(p) => p == id,
            Principal::Any => true,
            Principal::Prefix(p) => id.as_str().starts_with(p.as_str()),
            Principal::Suffix(s) => id.as_str().ends_with(s.as_str()),
        }
    }
}

/// An L7 proxy serving the services that select it (a Gateway API `Gateway` of class
/// `weft-waypoint`).
#[derive(Debug, Clone, PartialEq)]
pub struct Waypoint {
    pub name: String,
    pub namespace: String,
    /// Where the waypoint's HBONE port (15008) listens.
    pub addresses: Vec<IpAddr>,
    /// The waypoint's identity is this service account's in its namespace.
    pub service_account: String,
}

impl Waypoint {
    /// The SPIFFE identity of this waypoint in `trust_domain`.
    pub fn identity(&self, trust_domain: &str) -> Result<SpiffeId, spiffe::IdentityError> {
        SpiffeId::new(trust_domain, &self.namespace, &self.service_account)
    }
}

/// A Gateway API `HTTPRoute` attached to services (`parentRefs` of kind Service). Carried to
/// waypoints as the source wrote it: the waypoint interprets `spec`.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRoute {
    pub name: String,
    pub namespace: String,
    /// The services it attaches to, as `<namespace>/<name>`.
    pub parents: Vec<String>,
    /// The route's `spec`, as JSON.
    pub spec: serde_json::Value,
    /// Faults the waypoint injects into the requests this route matches (annotations
    /// `fault.weft.dev/*`, a Weft extension for resilience testing).
    pub fault: Option<Fault>,
}

/// Faults injected into a share of requests: a delay before forwarding, or an answer of the
/// waypoint's own instead of forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fault {
    /// The delay and the percent (0 to 100) of requests delayed.
    pub delay: Option<(std::time::Duration, u8)>,
    /// The status answered and the percent (0 to 100) of requests aborted.
    pub abort: Option<(u16, u8)>,
}

/// The roots that workload certificates of `trust_domain` must chain to. Several roots are
/// valid at once while a root is rotated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    pub trust_domain: String,
    /// One PEM certificate per root.
    pub roots: Vec<String>,
}
