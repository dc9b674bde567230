//! The serialized form of the model, shared by every text the model travels as: the local
//! file of a ztunnel running without a controller (YAML, [`Snapshot::from_yaml`]), test
//! fixtures, and each resource's `spec` on the watch API (JSON, `crate::resource`). The
//! `Raw*` types are that form; `validate` turns one into the typed model (parse, don't
//! validate: nothing else reads the raw form), and `From<&Typed>` turns the model back.
//!
//! Structure errors come from the parser with a line and column; value errors name the field
//! path (`workloads[2].addresses[0]`) and the value.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use spiffe::DEFAULT_TRUST_DOMAIN;
use spiffe::SpiffeId;

use crate::model::{
    Action, Authorization, Fault, HttpRoute, MtlsMode, Operation, PathPattern, PolicyScope, Principal, ROOT_NAMESPACE,
    Rule, Service, ServicePort, Snapshot, Source, TrustBundle, Waypoint, Workload,
};

/// Why a snapshot was refused.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid YAML: {0}")]
    Yaml(String),
    #[error("{path}: {message}")]
    Field { path: String, message: String },
}

impl ModelError {
    pub(crate) fn field(path: impl Into<String>, message: impl Into<String>) -> Self {
        ModelError::Field { path: path.into(), message: message.into() }
    }

    /// The field path an error is about, if it is about one.
    pub fn path(&self) -> Option<&str> {
        match self {
            ModelError::Field { path, .. } => Some(path),
            ModelError::Yaml(_) => None,
        }
    }
}

impl Snapshot {
    /// Parses and validates a snapshot. Nothing of an invalid document is kept.
    pub fn from_yaml(text: &str) -> Result<Snapshot, ModelError> {
        if text.trim().is_empty() {
            return Ok(Snapshot { trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(), ..Snapshot::default() });
        }
        let raw: RawSnapshot = serde_saphyr::from_str(text).map_err(|e| ModelError::Yaml(e.to_string()))?;
        raw.validate()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSnapshot {
    #[serde(default)]
    trust_domain: Option<String>,
    #[serde(default, deserialize_with = "list")]
    workloads: Vec<RawWorkload>,
    #[serde(default, deserialize_with = "list")]
    services: Vec<RawService>,
    #[serde(default, deserialize_with = "list")]
    authorizations: Vec<RawAuthorization>,
    #[serde(default, deserialize_with = "list")]
    waypoints: Vec<RawWaypoint>,
    #[serde(default, deserialize_with = "list")]
    http_routes: Vec<RawHttpRoute>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawWorkload {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uid: Option<String>,
    name: String,
    namespace: String,
    node: String,
    addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    service_account: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    enrolled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mtls: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    waypoint: Option<String>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawService {
    name: String,
    namespace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hostname: Option<String>,
    vips: Vec<String>,
    ports: Vec<RawPort>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    waypoint: Option<String>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawPort {
    port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    app_protocol: Option<String>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawAuthorization {
    name: String,
    namespace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    selector: Option<BTreeMap<String, String>>,
    /// Services of the policy's namespace whose waypoint enforces it (exclusive with
    /// `selector`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target_services: Option<Vec<String>>,
    action: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rules: Vec<RawRule>,
    /// Set by a source that could not understand part of the policy: it then fails closed
    /// (see `Authorization::broken`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    broken: Option<String>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    from: Vec<RawSource>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    to: Vec<RawOperation>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawOperation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    paths: Vec<String>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawSource {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ip_blocks: Vec<String>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawWaypoint {
    name: String,
    namespace: String,
    addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    service_account: Option<String>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawHttpRoute {
    name: String,
    namespace: String,
    /// `<namespace>/<name>` of each service the route attaches to.
    parents: Vec<String>,
    #[serde(default)]
    spec: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fault: Option<RawFault>,
}

/// `{delayMs, delayPercent, abortStatus, abortPercent}`: a delay needs `delayMs`, an abort
/// `abortStatus`; a percent defaults to 100.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawFault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    delay_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    delay_percent: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    abort_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    abort_percent: Option<u8>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawTrustBundle {
    trust_domain: String,
    roots: Vec<String>,
}

/// A list that may also be written as nothing at all (`services:` with no items).
fn list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

impl RawSnapshot {
    fn validate(self) -> Result<Snapshot, ModelError> {
        let trust_domain = self.trust_domain.unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_owned());
        // Validates the trust domain with the identity parser.
        SpiffeId::new(&trust_domain, "ns", "sa").map_err(|e| ModelError::field("trustDomain", e.to_string()))?;

        let mut workloads = Vec::with_capacity(self.workloads.len());
        let mut uids = HashMap::new();
        let mut owners: HashMap<IpAddr, String> = HashMap::new();
        for (i, w) in self.workloads.into_iter().enumerate() {
            let path = format!("workloads[{i}]");
            let w = w.validate(&path, &trust_domain)?;
            if let Some(prev) = uids.insert(w.uid.clone(), i) {
                return Err(ModelError::field(
                    format!("{path}.uid"),
                    format!("{:?} is already used by workloads[{prev}]", w.uid),
                ));
            }
            for (j, ip) in w.addresses.iter().enumerate() {
                if let Some(other) = owners.insert(*ip, w.uid.clone()) {
                    return Err(ModelError::field(
                        format!("{path}.addresses[{j}]"),
                        format!("{ip} is already the address of workload {other}"),
                    ));
                }
            }
            workloads.push(w);
        }

        let mut services = Vec::with_capacity(self.services.len());
        let mut vip_ports: HashMap<(IpAddr, u16), String> = HashMap::new();
        for (i, s) in self.services.into_iter().enumerate() {
            let path = format!("services[{i}]");
            let s = s.validate(&path)?;
            for vip in &s.vips {
                for p in &s.ports {
                    let key = format!("{}/{}", s.namespace, s.name);
                    if let Some(other) = vip_ports.insert((*vip, p.port), key) {
                        return Err(ModelError::field(
                            format!("{path}.vips"),
                            format!("{vip}:{} is already served by service {other}", p.port),
                        ));
                    }
                }
            }
            services.push(s);
        }

        let authorizations = self
            .authorizations
            .into_iter()
            .enumerate()
            .map(|(i, a)| a.validate(&format!("authorizations[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let waypoints = self
            .waypoints
            .into_iter()
            .enumerate()
            .map(|(i, w)| w.validate(&format!("waypoints[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let http_routes = self
            .http_routes
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.validate(&format!("httpRoutes[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Snapshot { trust_domain, workloads, services, authorizations, waypoints, http_routes })
    }
}

impl RawWorkload {
    pub(crate) fn validate(self, path: &str, trust_domain: &str) -> Result<Workload, ModelError> {
        name(&self.name, &format!("{path}.name"))?;
        name(&self.namespace, &format!("{path}.namespace"))?;
        name(&self.node, &format!("{path}.node"))?;
        let service_account = self.service_account.unwrap_or_else(|| "default".to_owned());
        name(&service_account, &format!("{path}.serviceAccount"))?;
        SpiffeId::new(trust_domain, &self.namespace, &service_account)
            .map_err(|e| ModelError::field(format!("{path}.serviceAccount"), e.to_string()))?;
        let addresses = ips(&self.addresses, &format!("{path}.addresses"), "a workload needs at least one address")?;
        let mtls = match self.mtls.as_deref() {
            None | Some("PERMISSIVE") => MtlsMode::Permissive,
            Some("STRICT") => MtlsMode::Strict,
            Some(other) => {
                return Err(ModelError::field(
                    format!("{path}.mtls"),
                    format!("{other:?} is not a mode; use STRICT or PERMISSIVE"),
                ));
            }
        };
        Ok(Workload {
            uid: self.uid.unwrap_or_else(|| format!("{}/{}", self.namespace, self.name)),
            name: self.name,
            namespace: self.namespace,
            node: self.node,
            addresses,
            service_account,
            labels: self.labels,
            enrolled: self.enrolled,
            mtls,
            waypoint: self.waypoint,
        })
    }
}

impl RawService {
    pub(crate) fn validate(self, path: &str) -> Result<Service, ModelError> {
        name(&self.name, &format!("{path}.name"))?;
        name(&self.namespace, &format!("{path}.namespace"))?;
        let vips = ips(&self.vips, &format!("{path}.vips"), "a service needs at least one virtual IP")?;
        if self.ports.is_empty() {
            return Err(ModelError::field(format!("{path}.ports"), "a service needs at least one port"));
        }
        let mut ports: Vec<ServicePort> = Vec::with_capacity(self.ports.len());
        for (j, p) in self.ports.into_iter().enumerate() {
            let ppath = format!("{path}.ports[{j}]");
            if p.port == 0 {
                return Err(ModelError::field(format!("{ppath}.port"), "port 0 is not a port"));
            }
            if p.target_port == Some(0) {
                return Err(ModelError::field(format!("{ppath}.targetPort"), "port 0 is not a port"));
            }
            if ports.iter().any(|q| q.port == p.port) {
                return Err(ModelError::field(format!("{ppath}.port"), format!("port {} is listed twice", p.port)));
            }
            ports.push(ServicePort {
                port: p.port,
                target_port: p.target_port.unwrap_or(p.port),
                app_protocol: p.app_protocol,
            });
        }
        Ok(Service {
            hostname: self.hostname.unwrap_or_else(|| format!("{}.{}.svc.cluster.local", self.name, self.namespace)),
            name: self.name,
            namespace: self.namespace,
            vips,
            ports,
            selector: self.selector,
            waypoint: self.waypoint,
        })
    }
}

impl RawAuthorization {
    pub(crate) fn validate(self, path: &str) -> Result<Authorization, ModelError> {
        name(&self.name, &format!("{path}.name"))?;
        name(&self.namespace, &format!("{path}.namespace"))?;
        let action = match self.action.as_str() {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            other => {
                return Err(ModelError::field(
                    format!("{path}.action"),
                    format!("{other:?} is not an action; use ALLOW or DENY"),
                ));
            }
        };
        let scope = match (self.selector, self.target_services) {
            (Some(_), Some(_)) => {
                return Err(ModelError::field(
                    format!("{path}.targetServices"),
                    "a policy selects workloads or targets services, not both",
                ));
            }
            (None, Some(services)) => {
                if services.is_empty() {
                    return Err(ModelError::field(format!("{path}.targetServices"), "names no service"));
                }
                for (i, s) in services.iter().enumerate() {
                    name(s, &format!("{path}.targetServices[{i}]"))?;
                }
                PolicyScope::Services(services)
            }
            (Some(sel), None) if !sel.is_empty() => PolicyScope::Selector(sel),
            _ if self.namespace == ROOT_NAMESPACE => PolicyScope::Mesh,
            _ => PolicyScope::Namespace,
        };
        // Values inside rules that cannot be understood do not reject the document: the
        // policy is kept, marked broken, and fails closed (see `Authorization::broken`). A
        // reason already carried (the wire form of a policy read before) is kept as it was
        // first written, so that reading a resource back gives the same resource.
        let mut broken = self.broken;
        let mut rules = Vec::with_capacity(self.rules.len());
        for (r, raw) in self.rules.into_iter().enumerate() {
            let mut rule = Rule { from: Vec::new(), ports: raw.ports, to: Vec::new() };
            for (t, op) in raw.to.into_iter().enumerate() {
                let mut operation = Operation { methods: op.methods, paths: Vec::new() };
                for (k, m) in operation.methods.iter().enumerate() {
                    if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                        broken.get_or_insert(format!(
                            "{path}.rules[{r}].to[{t}].methods[{k}]: {m:?} is not an HTTP method (uppercase letters)"
                        ));
                    }
                }
                for (k, p) in op.paths.iter().enumerate() {
                    match PathPattern::parse(p) {
                        Ok(p) => operation.paths.push(p),
                        Err(e) => {
                            broken.get_or_insert(format!("{path}.rules[{r}].to[{t}].paths[{k}]: {e}"));
                        }
                    }
                }
                rule.to.push(operation);
            }
            if rule.ports.contains(&0) {
                broken.get_or_insert(format!("{path}.rules[{r}].ports: port 0 is not a port"));
            }
            for (f, src) in raw.from.into_iter().enumerate() {
                let spath = format!("{path}.rules[{r}].from[{f}]");
                let mut source = Source { namespaces: src.namespaces, ..Source::default() };
                for (k, p) in src.principals.iter().enumerate() {
                    match principal(p) {
                        Ok(p) => source.principals.push(p),
                        Err(e) => {
                            broken.get_or_insert(format!("{spath}.principals[{k}]: {e}"));
                        }
                    }
                }
                for (k, b) in src.ip_blocks.iter().enumerate() {
                    match ip_block(b) {
                        Ok(b) => source.ip_blocks.push(b),
                        Err(e) => {
                            broken.get_or_insert(format!("{spath}.ipBlocks[{k}]: {e}"));
                        }
                    }
                }
                rule.from.push(source);
            }
            rules.push(rule);
        }
        Ok(Authorization { name: self.name, namespace: self.namespace, scope, action, rules, broken })
    }
}

impl RawWaypoint {
    pub(crate) fn validate(self, path: &str) -> Result<Waypoint, ModelError> {
        name(&self.name, &format!("{path}.name"))?;
        name(&self.namespace, &format!("{path}.namespace"))?;
        let service_account = self.service_account.unwrap_or_else(|| self.name.clone());
        name(&service_account, &format!("{path}.serviceAccount"))?;
        let addresses = ips(&self.addresses, &format!("{path}.addresses"), "a waypoint needs at least one address")?;
        Ok(Waypoint { name: self.name, namespace: self.namespace, addresses, service_account })
    }
}

impl RawHttpRoute {
    pub(crate) fn validate(self, path: &str) -> Result<HttpRoute, ModelError> {
        name(&self.name, &format!("{path}.name"))?;
        name(&self.namespace, &format!("{path}.namespace"))?;
        for (i, parent) in self.parents.iter().enumerate() {
            let ok = parent.split_once('/').is_some_and(|(ns, n)| name(ns, "").is_ok() && name(n, "").is_ok());
            if !ok {
                return Err(ModelError::field(
                    format!("{path}.parents[{i}]"),
                    format!("{parent:?} is not <namespace>/<service name>"),
                ));
            }
        }
        let fault = self.fault.map(|f| f.validate(&format!("{path}.fault"))).transpose()?;
        Ok(HttpRoute { name: self.name, namespace: self.namespace, parents: self.parents, spec: self.spec, fault })
    }
}

impl RawFault {
    fn validate(self, path: &str) -> Result<Fault, ModelError> {
        let percent = |p: Option<u8>, field: &str| match p.unwrap_or(100) {
            p @ 0..=100 => Ok(p),
            p => Err(ModelError::field(format!("{path}.{field}"), format!("{p} is not a percent (0 to 100)"))),
        };
        let delay = match self.delay_ms {
            Some(ms) => Some((std::time::Duration::from_millis(ms), percent(self.delay_percent, "delayPercent")?)),
            None => None,
        };
        let abort = match self.abort_status {
            Some(status @ 200..=599) => Some((status, percent(self.abort_percent, "abortPercent")?)),
            Some(status) => {
                return Err(ModelError::field(
                    format!("{path}.abortStatus"),
                    format!("{status} is not an HTTP status (200 to 599)"),
                ));
            }
            None => None,
        };
        Ok(Fault { delay, abort })
    }
}

impl From<&Fault> for RawFault {
    fn from(f: &Fault) -> Self {
        RawFault {
            delay_ms: f.delay.map(|(d, _)| d.as_millis() as u64),
            delay_percent: f.delay.map(|(_, p)| p),
            abort_status: f.abort.map(|(s, _)| s),
            abort_percent: f.abort.map(|(_, p)| p),
        }
    }
}

impl RawTrustBundle {
    pub(crate) fn validate(self, path: &str) -> Result<TrustBundle, ModelError> {
        SpiffeId::new(&self.trust_domain, "ns", "sa")
            .map_err(|e| ModelError::field(format!("{path}.trustDomain"), e.to_string()))?;
        if self.roots.is_empty() {
            return Err(ModelError::field(format!("{path}.roots"), "a trust bundle needs at least one root"));
        }
        for (i, root) in self.roots.iter().enumerate() {
            if !root.contains("-----BEGIN CERTIFICATE-----") {
                return Err(ModelError::field(format!("{path}.roots[{i}]"), "not a PEM certificate"));
            }
        }
        Ok(TrustBundle { trust_domain: self.trust_domain, roots: self.roots })
    }
}

// The model back to its serialized form (for the watch API and for tools).

impl From<&Workload> for RawWorkload {
    fn from(w: &Workload) -> Self {
        RawWorkload {
            uid: (w.uid != format!("{}/{}", w.namespace, w.name)).then(|| w.uid.clone()),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            node: w.node.clone(),
            addresses: w.addresses.iter().map(ToString::to_string).collect(),
            service_account: Some(w.service_account.clone()),
            labels: w.labels.clone(),
            enrolled: w.enrolled,
            mtls: Some(match w.mtls {
                MtlsMode::Permissive => "PERMISSIVE".to_owned(),
                MtlsMode::Strict => "STRICT".to_owned(),
            }),
            waypoint: w.waypoint.clone(),
        }
    }
}

impl From<&Service> for RawService {
    fn from(s: &Service) -> Self {
        RawService {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: Some(s.hostname.clone()),
            vips: s.vips.iter().map(ToString::to_string).collect(),
            ports: s
                .ports
                .iter()
                .map(|p| RawPort {
                    port: p.port,
                    target_port: Some(p.target_port),
                    app_protocol: p.app_protocol.clone(),
                })
                .collect(),
            selector: s.selector.clone(),
            waypoint: s.waypoint.clone(),
        }
    }
}

impl From<&Authorization> for RawAuthorization {
    fn from(a: &Authorization) -> Self {
        let principal = |p: &Principal| match p {
            Principal::Exact(id) => id.to_string(),
            Principal::Any => "*".to_owned(),
            Principal::Prefix(p) => format!("{p}*"),
            Principal::Suffix(s) => format!("*{s}"),
        };
        RawAuthorization {
            name: a.name.clone(),
            namespace: a.namespace.clone(),
            selector: match &a.scope {
                PolicyScope::Selector(sel) => Some(sel.clone()),
                PolicyScope::Mesh | PolicyScope::Namespace | PolicyScope::Services(_) => None,
            },
            target_services: match &a.scope {
                PolicyScope::Services(names) => Some(names.clone()),
                _ => None,
            },
            action: match a.action {
                Action::Allow => "ALLOW".to_owned(),
                Action::Deny => "DENY".to_owned(),
            },
            rules: a
                .rules
                .iter()
                .map(|r| RawRule {
                    from: r
                        .from
                        .iter()
                        .map(|f| RawSource {
                            principals: f.principals.iter().map(principal).collect(),
                            namespaces: f.namespaces.clone(),
                            ip_blocks: f.ip_blocks.iter().map(ToString::to_string).collect(),
                        })
                        .collect(),
                    ports: r.ports.clone(),
                    to: r
                        .to
                        .iter()
                        .map(|o| RawOperation {
                            methods: o.methods.clone(),
                            paths: o.paths.iter().map(ToString::to_string).collect(),
                        })
                        .collect(),
                })
                .collect(),
            broken: a.broken.clone(),
        }
    }
}

impl From<&Waypoint> for RawWaypoint {
    fn from(w: &Waypoint) -> Self {
        RawWaypoint {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            addresses: w.addresses.iter().map(ToString::to_string).collect(),
            service_account: Some(w.service_account.clone()),
        }
    }
}

impl From<&HttpRoute> for RawHttpRoute {
    fn from(r: &HttpRoute) -> Self {
        RawHttpRoute {
            name: r.name.clone(),
            namespace: r.namespace.clone(),
            parents: r.parents.clone(),
            spec: r.spec.clone(),
            fault: r.fault.as_ref().map(RawFault::from),
        }
    }
}

impl From<&TrustBundle> for RawTrustBundle {
    fn from(b: &TrustBundle) -> Self {
        RawTrustBundle { trust_domain: b.trust_domain.clone(), roots: b.roots.clone() }
    }
}

/// Kubernetes object names: DNS labels (lowercase alphanumerics and '-', at most 63).
fn name(value: &str, path: &str) -> Result<(), ModelError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ModelError::field(
            path,
            format!("{value:?} is not a valid name (lowercase letters, digits, '-', '.', at most 63)"),
        ))
    }
}

fn ip(value: &str, path: &str) -> Result<IpAddr, ModelError> {
    value.parse().map_err(|_| ModelError::field(path, format!("{value:?} is not an IP address")))
}

/// A non-empty list of IP addresses at `path`; `if_empty` says why one is needed.
fn ips(values: &[String], path: &str, if_empty: &str) -> Result<Vec<IpAddr>, ModelError> {
    if values.is_empty() {
        return Err(ModelError::field(path, if_empty));
    }
    values.iter().enumerate().map(|(j, a)| ip(a, &format!("{path}[{j}]"))).collect()
}

fn ip_block(value: &str) -> Result<IpNet, String> {
    if let Ok(net) = value.parse::<IpNet>() {
        return Ok(net);
    }
    value.parse::<IpAddr>().map(IpNet::from).map_err(|_| format!("{value:?} is not a CIDR block or IP address"))
}

fn principal(value: &str) -> Result<Principal, String> {
    if value == "*" {
        return Ok(Principal::Any);
    }
    match value.matches('*').count() {
        0 => value.parse().map(Principal::Exact).map_err(|e| e.to_string()),
        1 if value.ends_with('*') => Ok(Principal::Prefix(value.trim_end_matches('*').to_owned())),
        1 if value.starts_with('*') => Ok(Principal::Suffix(value.trim_start_matches('*').to_owned())),
        _ => Err(format!("{value:?}: '*' may only start or end a principal")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
workloads:
  - name: web-0
    namespace: frontend
    node: node-1
    addresses: [10.244.1.2]
    serviceAccount: web
    labels: {app: web}
    enrolled: true
  - name: api-0
    namespace: backend
    node: node-2
    addresses: ["10.244.2.2"]
    labels: {app: api}
    enrolled: true
    mtls: STRICT
services:
  - name: api
    namespace: backend
    vips: [10.96.0.10]
    ports: [{port: 80, targetPort: 8080}]
    selector: {app: api}
authorizations:
  - name: only-frontend
    namespace: backend
    selector: {app: api}
    action: ALLOW
    rules:
      - from: [{namespaces: [frontend]}]
        ports: [8080]
"#;

    #[test]
    fn parses_a_complete_snapshot() {
        let s = Snapshot::from_yaml(GOOD).unwrap();
        assert_eq!(s.trust_domain, "cluster.local");
        assert_eq!(s.workloads.len(), 2);
        let api = &s.workloads[1];
        assert_eq!(api.uid, "backend/api-0");
        assert_eq!(api.service_account, "default");
        assert_eq!(api.mtls, MtlsMode::Strict);
        assert_eq!(api.identity(&s.trust_domain).unwrap().to_string(), "spiffe://cluster.local/ns/backend/sa/default");
        let svc = &s.services[0];
        assert_eq!(svc.hostname, "api.backend.svc.cluster.local");
        assert_eq!(svc.port(80).unwrap().target_port, 8080);
        assert!(svc.selects(api));
        assert!(!svc.selects(&s.workloads[0]));
        let pol = &s.authorizations[0];
        assert_eq!(pol.action, Action::Allow);
        assert!(pol.applies_to(api));
        assert!(!pol.applies_to(&s.workloads[0]));
        assert!(pol.broken.is_none());
    }

    #[test]
    fn errors_name_the_field_and_value() {
        let cases = [
            (
                GOOD.replace("[10.244.1.2]", "[10.244.1.x]"),
                "workloads[0].addresses[0]",
                "\"10.244.1.x\" is not an IP address",
            ),
            (GOOD.replace("mtls: STRICT", "mtls: strict"), "workloads[1].mtls", "use STRICT or PERMISSIVE"),
            (GOOD.replace("action: ALLOW", "action: PERMIT"), "authorizations[0].action", "\"PERMIT\""),
            (GOOD.replace("targetPort: 8080", "targetPort: 0"), "services[0].ports[0].targetPort", "port 0"),
            (
                GOOD.replace("[\"10.244.2.2\"]", "[10.244.1.2]"),
                "workloads[1].addresses[0]",
                "already the address of workload frontend/web-0",
            ),
            (GOOD.replace("namespace: frontend", "namespace: Frontend"), "workloads[0].namespace", "not a valid name"),
        ];
        for (doc, path, msg) in cases {
            let err = Snapshot::from_yaml(&doc).unwrap_err();
            assert_eq!(err.path(), Some(path), "{err}");
            assert!(err.to_string().contains(msg), "{err}");
        }
    }

    #[test]
    fn structure_errors_come_from_the_parser_with_a_location() {
        let err =
            Snapshot::from_yaml(&GOOD.replace("enrolled: true\n  - name: api-0", "enroled: true\n  - name: api-0"))
                .unwrap_err();
        assert!(matches!(err, ModelError::Yaml(_)), "{err}");
        assert!(err.to_string().contains("enroled"), "{err}");
        let err = Snapshot::from_yaml("workloads: [").unwrap_err();
        assert!(matches!(err, ModelError::Yaml(_)), "{err}");
    }

    #[test]
    fn unreadable_policy_values_fail_closed_instead_of_rejecting_the_file() {
        let doc = GOOD.replace("namespaces: [frontend]", "principals: [\"spiffe://cluster.local/ns/a\"]");
        let s = Snapshot::from_yaml(&doc).unwrap();
        let broken = s.authorizations[0].broken.as_deref().unwrap();
        assert!(broken.starts_with("authorizations[0].rules[0].from[0].principals[0]"), "{broken}");
    }

    #[test]
    fn empty_sections_are_empty_lists() {
        let s = Snapshot::from_yaml("workloads:\nservices:\nauthorizations:\n").unwrap();
        assert!(s.workloads.is_empty() && s.services.is_empty() && s.authorizations.is_empty());
    }

    #[test]
    fn principal_patterns() {
        let id: SpiffeId = "spiffe://cluster.local/ns/prod/sa/web".parse().unwrap();
        assert!(principal("*").unwrap().matches(&id));
        assert!(principal("spiffe://cluster.local/ns/prod/*").unwrap().matches(&id));
        assert!(principal("*/sa/web").unwrap().matches(&id));
        assert!(!principal("spiffe://cluster.local/ns/dev/*").unwrap().matches(&id));
        assert!(principal("spiffe://cluster.local/ns/prod/sa/web").unwrap().matches(&id));
        assert!(principal("a*b*").is_err());
    }
}
