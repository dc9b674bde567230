//! Translation: cluster objects in, model changes out, one event at a time.
//!
//! [`Translator`] keeps what it needs of every object it has seen (a few facts per pod, not
//! the pod) and the model resources it has emitted, so each event re-translates only what
//! depends on it, and an event that changes nothing in the model emits nothing:
//!
//! | event | re-translated |
//! | --- | --- |
//! | a Pod | its Workload; the Waypoint it serves (label `gateway.networking.k8s.io/gateway-name`); Services of its namespace whose named `targetPort` it could answer |
//! | a Namespace | the Workloads and Services of that namespace (its labels decide enrollment, mTLS mode, waypoint) |
//! | a Gateway | its Waypoint; when it becomes or stops being a waypoint, the Workloads of the pods labelled with its name |
//! | a Service, AuthorizationPolicy, HTTPRoute | its own Service, Authorization, HttpRoute |
//!
//! The rules:
//!
//! - **Enrollment**: a pod is captured when its namespace has `weft.dev/mesh=enabled`, it
//!   does not have `weft.dev/mesh=disabled`, it is not `hostNetwork`, and it does not serve
//!   a waypoint (label `gateway.networking.k8s.io/gateway-name` naming a Gateway of class
//!   `weft-waypoint` in its namespace: a waypoint terminates HBONE itself, and capturing it
//!   would wrap its tunnels in ztunnel's a second time). A pod with no IP or no node yet, or
//!   that has finished (`Succeeded`, `Failed`), has no workload.
//! - **Workload**: uid `<namespace>/<name>`, its pod IPs, service account (`default` when
//!   unset), labels; mTLS mode from `weft.dev/mtls` on the pod, else its namespace, else
//!   PERMISSIVE; waypoint from `weft.dev/use-waypoint` on the pod, else its namespace. An
//!   unreadable mTLS label is taken as STRICT and reported: whoever set it meant to change
//!   the default, and only STRICT fails closed (plaintext refused rather than let in).
//! - **Service**: only services with cluster IPs (not headless, not ExternalName), and only
//!   their TCP ports (the mesh carries TCP; DNS's UDP port 53 beside TCP 53 is no duplicate).
//!   A named `targetPort` is the container port of that name on every selected pod, which
//!   must agree. A bad port, VIP or unresolvable name rejects the service.
//! - **Waypoint**: a `Gateway` of class `weft-waypoint`, at the IPs of the pods of its
//!   namespace labelled with its name, with the Gateway's name as service account. Without
//!   such a pod it has no address, and no resource.
//! - **Authorization**: `AuthorizationPolicy` through the model's own parser: a value it
//!   cannot read (a principal, an IP block, port 0) keeps the policy but marks it broken,
//!   so it fails closed, and is reported.
//! - **HttpRoute**: an `HTTPRoute` with `parentRefs` of kind Service; its `spec` as written.
//!   Its rules are read as the waypoint reads them (`meshapi::httproute`, regular expressions
//!   compiled): a rule the waypoint would skip is reported, and the route is still emitted
//!   (the waypoint skips that rule alone).
//!
//! Every resource is checked by the model's own decoder ([`Resource::from_wire`]) before it
//! is emitted: what a proxy would refuse is a [`Rejection`] here instead. Rejections are kept
//! per object until the object is fixed or deleted ([`Translator::rejected`]).

// Rejections are built on the error path only (see `source`).
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use meshapi::httproute::{self, ParsedRoute};
use meshapi::resource::Wire;
use meshapi::watch::Change;
use meshapi::{HttpRoute, Key, Kind, ModelError, MtlsMode, Resource, Service, ServicePort, Waypoint, Workload};
use regex::RegexBuilder;
use serde_json::json;

use crate::source::{AuthorizationPolicy, Event, Gateway, Object, ObjectKind, ObjectRef, PolicyAction, Rejection};
use crate::status::{CONTROLLER_NAME, Condition, Desired};

/// Namespace label: `enabled` enrolls the namespace's pods; pod label: `disabled` opts out.
pub const MESH_LABEL: &str = "weft.dev/mesh";
/// Pod or namespace label: `STRICT` or `PERMISSIVE`.
pub const MTLS_LABEL: &str = "weft.dev/mtls";
/// Pod, service or namespace label: the name of the waypoint (a Gateway in the same
/// namespace) traffic to them goes through.
pub const WAYPOINT_LABEL: &str = "weft.dev/use-waypoint";
/// How waypoint pods name their Gateway (set by the Gateway API on the pods it deploys).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The `gatewayClassName` of waypoints.
pub const WAYPOINT_CLASS: &str = "weft-waypoint";

/// Turns object events into model changes, incrementally.
#[derive(Debug, Default)]
pub struct Translator {
    namespaces: HashMap<String, NamespaceFacts>,
    /// By (namespace, name), so a namespace's pods are one range.
    pods: BTreeMap<(String, String), PodFacts>,
    services: BTreeMap<(String, String), ServiceFacts>,
    /// Gateways of the waypoint class.
    waypoints: BTreeSet<(String, String)>,
    /// What was emitted, to emit only real changes and to know what a deletion removes.
    emitted: HashMap<Key, Resource>,
    rejected: BTreeMap<ObjectRef, Rejection>,
    /// HTTPRoutes with Service parents: what their status reports on.
    routes: BTreeMap<ObjectRef, RouteFacts>,
    /// Every AuthorizationPolicy read.
    policies: BTreeSet<ObjectRef>,
}

/// What a route's status says, read when it is applied.
#[derive(Debug, Clone)]
struct RouteFacts {
    /// Its Service parents, as written.
    parents: Vec<crate::source::ParentReference>,
    /// The Services its usable rules send to (namespace, name).
    backends: BTreeSet<(String, String)>,
    /// Whether a rule is left once the unreadable ones are skipped.
    usable: bool,
}

/// What translation reads of a namespace.
#[derive(Debug, Default, Clone, PartialEq)]
struct NamespaceFacts {
    enrolled: bool,
    mtls: Option<MtlsMode>,
    waypoint: Option<String>,
}

/// What translation reads of a pod.
#[derive(Debug, Clone, PartialEq)]
struct PodFacts {
    labels: BTreeMap<String, String>,
    /// Where it runs, if it has a workload (an IP and a node, not finished); an unreadable
    /// IP is a rejection.
    placement: Result<Option<Placement>, Rejection>,
    host_network: bool,
    service_account: String,
    /// From its own label: set, or STRICT in place of an unreadable value (`warning` says).
    mtls: Option<MtlsMode>,
    waypoint: Option<String>,
    /// Named TCP container ports.
    ports: BTreeMap<String, u16>,
    /// Reported while the pod still translates.
    warning: Option<Rejection>,
}

#[derive(Debug, Clone, PartialEq)]
struct Placement {
    node: String,
    addresses: Vec<IpAddr>,
}

/// What translation reads of a service: `Ok(None)` when it has no VIP or no TCP port.
#[derive(Debug, Clone, PartialEq)]
struct ServiceFacts {
    spec: Result<Option<ServiceSpec>, Rejection>,
}

#[derive(Debug, Clone, PartialEq)]
struct ServiceSpec {
    vips: Vec<IpAddr>,
    ports: Vec<PortSpec>,
    selector: BTreeMap<String, String>,
    waypoint: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
struct PortSpec {
    /// The index in `spec.ports`, for field paths.
    index: usize,
    port: u16,
    target: Target,
    app_protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Target {
    Number(u16),
    /// A container port name, resolved on the selected pods.
    Named(String),
}

/// One object's translation: the resource it yields (if any), and a problem to report. A
/// problem without a resource is a rejection; with one, a warning (the resource is used).
struct Translated {
    resource: Option<Resource>,
    problem: Option<Rejection>,
}

impl Translator {
    pub fn new() -> Translator {
        Translator::default()
    }

    /// Translates one event into the model changes it makes (often none).
    pub fn apply(&mut self, event: Event) -> Vec<Change> {
        let mut changes = Vec::new();
        match event {
            Event::Applied(object) => self.applied(object, &mut changes),
            Event::Deleted(object) => self.deleted(object, &mut changes),
        }
        changes
    }

    /// Translates events in order; a resource changed by several of them appears once, as
    /// its last change.
    pub fn apply_all(&mut self, events: impl IntoIterator<Item = Event>) -> Vec<Change> {
        let mut changes: Vec<Change> = Vec::new();
        let mut at: HashMap<Key, usize> = HashMap::new();
        for event in events {
            for change in self.apply(event) {
                let key = match &change {
                    Change::Upsert(r) => r.key(),
                    Change::Delete(k) => k.clone(),
                };
                match at.get(&key) {
                    Some(&i) => changes[i] = change,
                    None => {
                        at.insert(key, changes.len());
                        changes.push(change);
                    }
                }
            }
        }
        changes
    }

    /// Every object translation currently refuses, or translates with a warning.
    pub fn rejected(&self) -> Vec<Rejection> {
        self.rejected.values().cloned().collect()
    }

    /// The model as translated so far.
    pub fn resources(&self) -> impl Iterator<Item = &Resource> {
        self.emitted.values()
    }

    fn applied(&mut self, object: Object, changes: &mut Vec<Change>) {
        let r = object.object_ref();
        if r.name.is_empty() {
            let rejection = Rejection::new(format!("a {} needs a name", r.kind)).at("metadata.name");
            tracing::warn!("rejected: {rejection}");
            return;
        }
        let Some(namespace) = r.namespace.clone().or_else(|| (!r.kind.is_namespaced()).then(String::new)) else {
            self.note(&r, Some(Rejection::new(format!("a {} needs a namespace", r.kind)).at("metadata.namespace")));
            return;
        };
        let name = r.name.clone();
        match object {
            Object::Namespace(ns) => {
                let (facts, warning) = namespace_facts(&ns, &r);
                self.note(&r, warning);
                // Only the labels translation reads matter; an annotation re-translates nothing.
                if self.namespaces.get(&name) != Some(&facts) {
                    self.namespaces.insert(name.clone(), facts);
                    self.namespace_changed(&name, changes);
                }
            }
            Object::Pod(pod) => {
                let facts = pod_facts(&pod, &r);
                let old = self.pods.insert((namespace.clone(), name.clone()), facts);
                self.pod_changed(&namespace, &name, old, changes);
            }
            Object::Service(service) => {
                let facts = ServiceFacts { spec: service_spec(&service, &r) };
                self.services.insert((namespace.clone(), name.clone()), facts);
                self.translate_service(&namespace, &name, changes);
            }
            Object::Gateway(gateway) => {
                self.gateway_applied(&gateway, &namespace, &name, changes);
            }
            Object::AuthorizationPolicy(policy) => {
                self.policies.insert(r.clone());
                let t = authorization(&policy, &r);
                self.put(&r, t, changes);
            }
            Object::HttpRoute(route) => {
                let parents: Vec<String> = route
                    .parent_refs
                    .iter()
                    .filter(|p| p.is_service())
                    .map(|p| format!("{}/{}", p.namespace.as_deref().unwrap_or(&namespace), p.name))
                    .collect();
                let t = if parents.is_empty() {
                    // Not the mesh's: nothing in the model. Its status keeps no entry of Weft's
                    // (an empty list removes them), until the route is deleted.
                    if let Some(facts) = self.routes.get_mut(&r) {
                        *facts = RouteFacts { parents: Vec::new(), backends: BTreeSet::new(), usable: true };
                    }
                    Translated { resource: None, problem: None }
                } else {
                    // Read once, for the model's problems and for the status.
                    let parsed = parse_route(&namespace, &route.spec);
                    let backends = parsed
                        .valid()
                        .flat_map(|rule| rule.backends.iter())
                        .map(|b| (b.target.namespace.clone(), b.target.name.clone()))
                        .collect();
                    let parent_refs = route.parent_refs.iter().filter(|p| p.is_service()).cloned().collect();
                    let usable = parsed.rules.is_empty() || parsed.valid().next().is_some();
                    self.routes.insert(r.clone(), RouteFacts { parents: parent_refs, backends, usable });
                    let annotations = route.metadata.annotations.clone().unwrap_or_default();
                    http_route(&r, name, namespace, parents, &route.spec, &parsed, &annotations)
                };
                self.put(&r, t, changes);
            }
        }
    }

    fn deleted(&mut self, r: ObjectRef, changes: &mut Vec<Change>) {
        let namespace = r.namespace.clone().unwrap_or_default();
        let name = r.name.clone();
        match r.kind {
            ObjectKind::Namespace => {
                self.rejected.remove(&r);
                if self.namespaces.remove(&name).is_some() {
                    self.namespace_changed(&name, changes);
                }
            }
            ObjectKind::Pod => {
                let old = self.pods.remove(&(namespace.clone(), name.clone()));
                self.pod_changed(&namespace, &name, old, changes);
            }
            ObjectKind::Service => {
                self.services.remove(&(namespace, name));
                self.put(&r, Translated { resource: None, problem: None }, changes);
            }
            ObjectKind::Gateway => {
                let was_waypoint = self.waypoints.remove(&(namespace.clone(), name.clone()));
                self.put(&r, Translated { resource: None, problem: None }, changes);
                if was_waypoint {
                    self.waypoint_pods_changed(&namespace, &name, changes);
                }
            }
            ObjectKind::AuthorizationPolicy | ObjectKind::HttpRoute => {
                self.policies.remove(&r);
                self.routes.remove(&r);
                self.put(&r, Translated { resource: None, problem: None }, changes);
            }
        }
    }

    /// The status conditions of the objects that carry them (`crate::status`): waypoint
    /// Gateways (`Programmed` comes from the deployer), HTTPRoutes with Service parents, and
    /// AuthorizationPolicies.
    /// `source_rejected` are the objects the source could not read: an AuthorizationPolicy
    /// among them is reported not accepted.
    pub fn statuses(&self, source_rejected: &[Rejection]) -> BTreeMap<ObjectRef, Desired> {
        let mut all = BTreeMap::new();
        for (namespace, name) in &self.waypoints {
            let accepted = Condition::new(
                "Accepted",
                true,
                "Accepted",
                format!("a waypoint: {CONTROLLER_NAME} deploys it and programs it"),
            );
            all.insert(ObjectRef::new(ObjectKind::Gateway, Some(namespace), name), Desired::Gateway(vec![accepted]));
        }
        for (r, facts) in &self.routes {
            all.insert(r.clone(), Desired::Route(self.route_status(r, facts)));
        }
        for r in &self.policies {
            let emitted = model_key(r).is_some_and(|k| self.emitted.contains_key(&k));
            let accepted = match (emitted, self.rejected.get(r)) {
                (true, None) => Condition::new("Accepted", true, "Accepted", "enforced by the mesh's proxies"),
                (_, Some(problem)) => Condition::new("Accepted", false, "Invalid", condition_message(problem)),
                (false, None) => continue,
            };
            all.insert(r.clone(), Desired::Policy(vec![accepted]));
        }
        // Last: a policy whose latest version the source could not read is not accepted, even
        // while the version before it stays in force.
        for rejection in source_rejected {
            if let Some(r) = rejection.object.as_ref().filter(|r| r.kind == ObjectKind::AuthorizationPolicy) {
                let refused = Condition::new("Accepted", false, "Invalid", condition_message(rejection));
                all.insert(r.clone(), Desired::Policy(vec![refused]));
            }
        }
        all
    }

    fn route_status(&self, r: &ObjectRef, facts: &RouteFacts) -> Vec<(crate::source::ParentReference, Vec<Condition>)> {
        let namespace = r.namespace.clone().unwrap_or_default();
        let emitted = model_key(r).is_some_and(|k| self.emitted.contains_key(&k));
        let problem = self.rejected.get(r).map(condition_message);
        let missing: Vec<String> = facts
            .backends
            .iter()
            .filter(|b| !self.services.contains_key(*b))
            .map(|(ns, name)| format!("{ns}/{name}"))
            .collect();
        let resolved = if missing.is_empty() {
            Condition::new("ResolvedRefs", true, "ResolvedRefs", "every backend Service exists")
        } else {
            Condition::new(
                "ResolvedRefs",
                false,
                "BackendNotFound",
                format!("no Service {}: requests routed there are answered 500", missing.join(", ")),
            )
        };
        let partially = match (&problem, emitted && facts.usable) {
            (Some(problem), true) => Condition::new("PartiallyInvalid", true, "UnsupportedValue", problem.clone()),
            _ => Condition::new("PartiallyInvalid", false, "Accepted", "every rule is applied"),
        };
        facts
            .parents
            .iter()
            .map(|parent| {
                let service_namespace = parent.namespace.clone().unwrap_or_else(|| namespace.clone());
                let key = (service_namespace.clone(), parent.name.clone());
                let service = format!("{service_namespace}/{}", parent.name);
                let waypoint = model_key(&ObjectRef::new(ObjectKind::Service, Some(&service_namespace), &parent.name))
                    .and_then(|k| match self.emitted.get(&k) {
                        Some(Resource::Service(s)) => s.waypoint.clone(),
                        _ => None,
                    });
                let is_waypoint = |w: &str| {
                    w.split_once('/').is_some_and(|(ns, n)| self.waypoints.contains(&(ns.to_owned(), n.to_owned())))
                };
                let accepted = if !emitted || !facts.usable {
                    let why = problem.clone().unwrap_or_else(|| "the route cannot be used".to_owned());
                    Condition::new("Accepted", false, "UnsupportedValue", why)
                } else if !self.services.contains_key(&key) {
                    Condition::new("Accepted", false, "NoMatchingParent", format!("no Service {service}"))
                } else {
                    match waypoint {
                        None => Condition::new(
                            "Accepted",
                            false,
                            "NoMatchingParent",
                            format!(
                                "Service {service} has no waypoint (label {WAYPOINT_LABEL} on the Service or its \
                                 namespace): no proxy applies HTTP routes to its traffic"
                            ),
                        ),
                        Some(w) if !is_waypoint(&w) => Condition::new(
                            "Accepted",
                            false,
                            "NoMatchingParent",
                            format!("Service {service} uses the waypoint {w}, which is not a Gateway of class {WAYPOINT_CLASS}"),
                        ),
                        Some(w) => Condition::new("Accepted", true, "Accepted", format!("applied by the waypoint {w}")),
                    }
                };
                (parent.clone(), vec![accepted, resolved.clone(), partially.clone()])
            })
            .collect()
    }

    /// A namespace's labels changed (or it came or went): its pods and services.
    fn namespace_changed(&mut self, namespace: &str, changes: &mut Vec<Change>) {
        let pods: Vec<String> = self.names_in(&self.pods, namespace);
        for pod in pods {
            self.translate_pod(namespace, &pod, changes);
        }
        let services: Vec<String> = self.names_in(&self.services, namespace);
        for service in services {
            self.translate_service(namespace, &service, changes);
        }
    }

    /// A pod changed from `old` to what `self.pods` holds now: its workload, the waypoint it
    /// serves, the services whose named ports it may answer.
    fn pod_changed(&mut self, namespace: &str, name: &str, old: Option<PodFacts>, changes: &mut Vec<Change>) {
        self.translate_pod(namespace, name, changes);
        let new = self.pods.get(&(namespace.to_owned(), name.to_owned()));
        let mut gateways: Vec<String> = [old.as_ref(), new]
            .into_iter()
            .flatten()
            .filter_map(|p| p.labels.get(GATEWAY_NAME_LABEL).cloned())
            .collect();
        gateways.dedup();
        let services: Vec<String> = self
            .in_namespace(&self.services, namespace)
            .filter(|(_, s)| {
                s.spec.as_ref().is_ok_and(|spec| {
                    spec.as_ref().is_some_and(|spec| {
                        spec.has_named_port()
                            && [old.as_ref(), new].into_iter().flatten().any(|p| selects(&spec.selector, &p.labels))
                    })
                })
            })
            .map(|(name, _)| name.to_owned())
            .collect();
        for gateway in gateways {
            self.translate_waypoint(namespace, &gateway, changes);
        }
        for service in services {
            self.translate_service(namespace, &service, changes);
        }
    }

    fn gateway_applied(&mut self, gateway: &Gateway, namespace: &str, name: &str, changes: &mut Vec<Change>) {
        let key = (namespace.to_owned(), name.to_owned());
        let changed = if gateway.spec.gateway_class_name == WAYPOINT_CLASS {
            self.waypoints.insert(key)
        } else {
            self.waypoints.remove(&key)
        };
        self.translate_waypoint(namespace, name, changes);
        if changed {
            self.waypoint_pods_changed(namespace, name, changes);
        }
    }

    /// The Gateway `name` became or stopped being a waypoint: the pods labelled with its name
    /// are enrolled or not accordingly.
    fn waypoint_pods_changed(&mut self, namespace: &str, name: &str, changes: &mut Vec<Change>) {
        let pods: Vec<String> = self
            .in_namespace(&self.pods, namespace)
            .filter(|(_, p)| p.labels.get(GATEWAY_NAME_LABEL).map(String::as_str) == Some(name))
            .map(|(pod, _)| pod.to_owned())
            .collect();
        for pod in pods {
            self.translate_pod(namespace, &pod, changes);
        }
    }

    /// Whether `pod` serves a waypoint: its Gateway label names a Gateway of the waypoint
    /// class in its namespace.
    fn serves_waypoint(&self, namespace: &str, pod: &PodFacts) -> bool {
        pod.labels.get(GATEWAY_NAME_LABEL).is_some_and(|g| self.waypoints.contains(&(namespace.to_owned(), g.clone())))
    }

    fn translate_pod(&mut self, namespace: &str, name: &str, changes: &mut Vec<Change>) {
        let r = ObjectRef::new(ObjectKind::Pod, Some(namespace), name);
        let t = match self.pods.get(&(namespace.to_owned(), name.to_owned())) {
            None => Translated { resource: None, problem: None },
            Some(pod) => match &pod.placement {
                Err(rejection) => Translated { resource: None, problem: Some(rejection.clone()) },
                Ok(None) => Translated { resource: None, problem: pod.warning.clone() },
                Ok(Some(placement)) => {
                    let ns = self.namespaces.get(namespace).cloned().unwrap_or_default();
                    let workload = Workload {
                        uid: format!("{namespace}/{name}"),
                        name: name.to_owned(),
                        namespace: namespace.to_owned(),
                        node: placement.node.clone(),
                        addresses: placement.addresses.clone(),
                        service_account: pod.service_account.clone(),
                        labels: pod.labels.clone(),
                        enrolled: ns.enrolled
                            && pod.labels.get(MESH_LABEL).map(String::as_str) != Some("disabled")
                            && !pod.host_network
                            && !self.serves_waypoint(namespace, pod),
                        mtls: pod.mtls.or(ns.mtls).unwrap_or(MtlsMode::Permissive),
                        waypoint: pod.waypoint.clone().or(ns.waypoint).map(|w| format!("{namespace}/{w}")),
                    };
                    Translated { resource: Some(Resource::Workload(workload)), problem: pod.warning.clone() }
                }
            },
        };
        self.put(&r, t, changes);
    }

    fn translate_service(&mut self, namespace: &str, name: &str, changes: &mut Vec<Change>) {
        let r = ObjectRef::new(ObjectKind::Service, Some(namespace), name);
        let t = match self.services.get(&(namespace.to_owned(), name.to_owned())).map(|s| &s.spec) {
            None | Some(Ok(None)) => Translated { resource: None, problem: None },
            Some(Err(rejection)) => Translated { resource: None, problem: Some(rejection.clone()) },
            Some(Ok(Some(spec))) => match self.service(namespace, name, spec, &r) {
                Ok(service) => Translated { resource: Some(Resource::Service(service)), problem: None },
                Err(rejection) => Translated { resource: None, problem: Some(rejection) },
            },
        };
        self.put(&r, t, changes);
    }

    fn service(&self, namespace: &str, name: &str, spec: &ServiceSpec, r: &ObjectRef) -> Result<Service, Rejection> {
        let mut ports = Vec::with_capacity(spec.ports.len());
        for p in &spec.ports {
            let target_port = match &p.target {
                Target::Number(n) => *n,
                Target::Named(port_name) => self.named_port(namespace, &spec.selector, port_name).map_err(|why| {
                    Rejection::new(why).about(r.clone()).at(format!("spec.ports[{}].targetPort", p.index))
                })?,
            };
            ports.push(ServicePort { port: p.port, target_port, app_protocol: p.app_protocol.clone() });
        }
        let ns_waypoint = self.namespaces.get(namespace).and_then(|n| n.waypoint.clone());
        Ok(Service {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            hostname: format!("{name}.{namespace}.svc.cluster.local"),
            vips: spec.vips.clone(),
            ports,
            selector: spec.selector.clone(),
            waypoint: spec.waypoint.clone().or(ns_waypoint).map(|w| format!("{namespace}/{w}")),
        })
    }

    /// The number every selected pod with a workload gives the container port `port_name`.
    fn named_port(&self, namespace: &str, selector: &BTreeMap<String, String>, port_name: &str) -> Result<u16, String> {
        if selector.is_empty() {
            return Err(format!(
                "{port_name:?} names a container port, but the service selects no pods to read it from"
            ));
        }
        let mut numbers: BTreeMap<u16, Vec<&str>> = BTreeMap::new();
        let mut missing = Vec::new();
        for (pod_name, pod) in self.in_namespace(&self.pods, namespace) {
            if !matches!(pod.placement, Ok(Some(_))) || !selects(selector, &pod.labels) {
                continue;
            }
            match pod.ports.get(port_name) {
                Some(n) => numbers.entry(*n).or_default().push(pod_name),
                None => missing.push(pod_name),
            }
        }
        let mut distinct = numbers.keys();
        match (distinct.next(), distinct.next(), missing.is_empty()) {
            (Some(number), None, true) => Ok(*number),
            (None, _, true) => {
                Err(format!("{port_name:?} names a container port, but no running pod is selected to read it from"))
            }
            (_, _, false) => {
                let (pods, have) = if missing.len() == 1 { ("pod", "has") } else { ("pods", "have") };
                Err(format!("{pods} {} {have} no container port named {port_name:?}", few(&missing)))
            }
            (Some(_), Some(_), true) => {
                let each: Vec<String> = numbers.iter().map(|(n, pods)| format!("{n} on {}", few(pods))).collect();
                Err(format!("the selected pods disagree on container port {port_name:?}: {}", each.join(", ")))
            }
        }
    }

    fn translate_waypoint(&mut self, namespace: &str, name: &str, changes: &mut Vec<Change>) {
        let r = ObjectRef::new(ObjectKind::Gateway, Some(namespace), name);
        let resource = self.waypoints.contains(&(namespace.to_owned(), name.to_owned())).then(|| {
            let addresses: Vec<IpAddr> = self
                .in_namespace(&self.pods, namespace)
                .filter(|(_, p)| p.labels.get(GATEWAY_NAME_LABEL).map(String::as_str) == Some(name))
                .filter_map(|(_, p)| p.placement.as_ref().ok().and_then(Option::as_ref))
                .flat_map(|p| p.addresses.iter().copied())
                .collect();
            (!addresses.is_empty()).then(|| {
                Resource::Waypoint(Waypoint {
                    name: name.to_owned(),
                    namespace: namespace.to_owned(),
                    addresses,
                    service_account: name.to_owned(),
                })
            })
        });
        self.put(&r, Translated { resource: resource.flatten(), problem: None }, changes);
    }

    /// Emits what `object` now translates to, if that differs from what was emitted, and
    /// keeps its problem (or clears it).
    fn put(&mut self, object: &ObjectRef, t: Translated, changes: &mut Vec<Change>) {
        let Some(key) = model_key(object) else { return };
        let (resource, problem) = match t.resource {
            // Checked when it was emitted: nothing to do.
            Some(r) if self.emitted.get(&key) == Some(&r) => return self.note(object, t.problem),
            Some(r) => match checked(r, object) {
                Ok(resource) => (Some(resource), t.problem),
                Err(rejection) => (None, Some(rejection)),
            },
            None => (None, t.problem),
        };
        self.note(object, problem);
        match resource {
            Some(resource) => {
                if self.emitted.get(&key) != Some(&resource) {
                    self.emitted.insert(key, resource.clone());
                    changes.push(Change::Upsert(resource));
                }
            }
            None => {
                if self.emitted.remove(&key).is_some() {
                    changes.push(Change::Delete(key));
                }
            }
        }
    }

    /// Keeps (and logs, when new) or clears the problem of `object`.
    fn note(&mut self, object: &ObjectRef, problem: Option<Rejection>) {
        match problem {
            Some(problem) => {
                if self.rejected.get(object) != Some(&problem) {
                    tracing::warn!("rejected: {problem}");
                    self.rejected.insert(object.clone(), problem);
                }
            }
            None => {
                if self.rejected.remove(object).is_some() {
                    tracing::info!("{object} translates again");
                }
            }
        }
    }

    fn names_in<T>(&self, map: &BTreeMap<(String, String), T>, namespace: &str) -> Vec<String> {
        self.in_namespace(map, namespace).map(|(name, _)| name.to_owned()).collect()
    }

    fn in_namespace<'a, T>(
        &self,
        map: &'a BTreeMap<(String, String), T>,
        namespace: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a T)> + 'a {
        map.range((namespace.to_owned(), String::new())..)
            .take_while(move |((ns, _), _)| ns == namespace)
            .map(|((_, name), v)| (name.as_str(), v))
    }
}

impl ServiceSpec {
    fn has_named_port(&self) -> bool {
        self.ports.iter().any(|p| matches!(p.target, Target::Named(_)))
    }
}

/// The model key of what `object` translates to; none for namespaces.
fn model_key(object: &ObjectRef) -> Option<Key> {
    let kind = match object.kind {
        ObjectKind::Namespace => return None,
        ObjectKind::Pod => Kind::Workload,
        ObjectKind::Service => Kind::Service,
        ObjectKind::Gateway => Kind::Waypoint,
        ObjectKind::AuthorizationPolicy => Kind::Authorization,
        ObjectKind::HttpRoute => Kind::HttpRoute,
    };
    Some(Key::new(kind, object.qualified_name()))
}

/// `resource` as a proxy would decode it, or why a proxy would refuse it.
fn checked(resource: Resource, object: &ObjectRef) -> Result<Resource, Rejection> {
    let key = resource.key();
    Resource::from_wire(resource.to_wire()).map_err(|e| model_rejection(&e, &key, object))
}

/// A model error about the resource `key` as a rejection of the object it came from.
fn model_rejection(e: &ModelError, key: &Key, object: &ObjectRef) -> Rejection {
    let (path, reason) = match e {
        ModelError::Field { path, message } => (Some(path.as_str()), message.clone()),
        ModelError::Yaml(message) => (None, message.clone()),
    };
    let rejection = Rejection::new(reason).about(object.clone());
    match path.and_then(|p| p.strip_prefix(&format!("{key}."))) {
        Some(model_field) => rejection.at(object_field(object.kind, model_field)),
        None => rejection,
    }
}

/// The field of the cluster object that the model's field `model_field` came from.
fn object_field(kind: ObjectKind, model_field: &str) -> String {
    let split = model_field.find(['.', '[']).unwrap_or(model_field.len());
    let (head, rest) = model_field.split_at(split);
    let mapped = match (kind, head) {
        (_, "name") => "metadata.name",
        (_, "namespace") => "metadata.namespace",
        (ObjectKind::Pod, "node") => "spec.nodeName",
        (ObjectKind::Pod, "serviceAccount") => "spec.serviceAccountName",
        (ObjectKind::Pod, "addresses") => "status.podIPs",
        (ObjectKind::Gateway, "serviceAccount") => "metadata.name",
        (ObjectKind::Service, "vips") => "spec.clusterIPs",
        (ObjectKind::Service, "ports") => return "spec.ports".to_owned(),
        (ObjectKind::HttpRoute, "parents") => return "spec.parentRefs".to_owned(),
        (ObjectKind::AuthorizationPolicy, "rules") => "spec.rules",
        (ObjectKind::AuthorizationPolicy, "targetServices") => "spec.targetRefs",
        _ => return model_field.to_owned(),
    };
    format!("{mapped}{rest}")
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// `a, b, c and 4 more`
fn few(names: &[&str]) -> String {
    const SHOWN: usize = 3;
    let mut text = names.iter().take(SHOWN).copied().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    text
}

/// An mTLS label's mode; an unreadable value is STRICT (fails closed), with the reason.
fn mtls_label(value: &str) -> (MtlsMode, Option<String>) {
    match value {
        "STRICT" => (MtlsMode::Strict, None),
        "PERMISSIVE" => (MtlsMode::Permissive, None),
        other => (
            MtlsMode::Strict,
            Some(format!(
                "{other:?} is not a mode (STRICT or PERMISSIVE); taken as STRICT, so that no plaintext is let in by mistake"
            )),
        ),
    }
}

fn namespace_facts(ns: &core::Namespace, r: &ObjectRef) -> (NamespaceFacts, Option<Rejection>) {
    let labels = ns.metadata.labels.clone().unwrap_or_default();
    let (mtls, warning) = match labels.get(MTLS_LABEL) {
        None => (None, None),
        Some(value) => {
            let (mode, why) = mtls_label(value);
            let warning = why.map(|why| Rejection::new(why).about(r.clone()).at(label_field(MTLS_LABEL)));
            (Some(mode), warning)
        }
    };
    let facts = NamespaceFacts {
        enrolled: labels.get(MESH_LABEL).map(String::as_str) == Some("enabled"),
        mtls,
        waypoint: labels.get(WAYPOINT_LABEL).cloned(),
    };
    (facts, warning)
}

fn label_field(label: &str) -> String {
    format!("metadata.labels[{label:?}]")
}

fn pod_facts(pod: &core::Pod, r: &ObjectRef) -> PodFacts {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let (mtls, warning) = match labels.get(MTLS_LABEL) {
        None => (None, None),
        Some(value) => {
            let (mode, why) = mtls_label(value);
            (Some(mode), why.map(|why| Rejection::new(why).about(r.clone()).at(label_field(MTLS_LABEL))))
        }
    };

    let finished = matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"));
    let node = spec.and_then(|s| s.node_name.clone()).filter(|n| !n.is_empty());
    let placement = match (addresses(status, r), node) {
        (Err(rejection), _) => Err(rejection),
        (Ok(addresses), Some(node)) if !addresses.is_empty() && !finished => Ok(Some(Placement { node, addresses })),
        (Ok(_), _) => Ok(None),
    };

    let mut ports = BTreeMap::new();
    for container in spec.map(|s| s.containers.as_slice()).unwrap_or_default() {
        for port in container.ports.as_deref().unwrap_or_default() {
            let tcp = matches!(port.protocol.as_deref(), None | Some("TCP"));
            if let (Some(name), Ok(number), true) = (&port.name, u16::try_from(port.container_port), tcp)
                && number != 0
            {
                ports.entry(name.clone()).or_insert(number);
            }
        }
    }

    PodFacts {
        placement,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        service_account: spec
            .and_then(|s| s.service_account_name.clone().or_else(|| s.service_account.clone()))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
        mtls,
        waypoint: labels.get(WAYPOINT_LABEL).cloned(),
        ports,
        warning,
        labels,
    }
}

/// A pod's IPs: `status.podIPs`, else `status.podIP`.
fn addresses(status: Option<&core::PodStatus>, r: &ObjectRef) -> Result<Vec<IpAddr>, Rejection> {
    let Some(status) = status else { return Ok(Vec::new()) };
    let parse = |text: &str, field: String| {
        text.parse::<IpAddr>()
            .map_err(|_| Rejection::new(format!("{text:?} is not an IP address")).about(r.clone()).at(field))
    };
    match status.pod_ips.as_deref() {
        Some(ips) if !ips.is_empty() => {
            ips.iter().enumerate().map(|(i, ip)| parse(&ip.ip, format!("status.podIPs[{i}].ip"))).collect()
        }
        _ => match status.pod_ip.as_deref() {
            Some(ip) if !ip.is_empty() => parse(ip, "status.podIP".to_owned()).map(|ip| vec![ip]),
            _ => Ok(Vec::new()),
        },
    }
}

/// A service's VIPs and TCP ports, checked; `Ok(None)` for a service without a VIP
/// (headless, ExternalName) or without a TCP port.
fn service_spec(service: &core::Service, r: &ObjectRef) -> Result<Option<ServiceSpec>, Rejection> {
    let refuse = |field: String, why: String| Rejection::new(why).about(r.clone()).at(field);
    let Some(spec) = service.spec.as_ref() else {
        return Err(refuse("spec".to_owned(), "a Service needs a spec".to_owned()));
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let (field, vips): (&str, Vec<String>) = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ("spec.clusterIPs", ips.clone()),
        (_, Some(ip)) if !ip.is_empty() => ("spec.clusterIP", vec![ip.clone()]),
        _ => {
            return Err(refuse(
                "spec.clusterIP".to_owned(),
                "has no cluster IP, so nothing to route: an API server assigns one, a directory must write it"
                    .to_owned(),
            ));
        }
    };
    if vips.iter().any(|ip| ip == "None") {
        // Headless: clients reach the pods' own addresses.
        return Ok(None);
    }
    let vips = vips
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            let at = if field == "spec.clusterIPs" { format!("{field}[{i}]") } else { field.to_owned() };
            ip.parse::<IpAddr>().map_err(|_| refuse(at, format!("{ip:?} is not an IP address")))
        })
        .collect::<Result<Vec<_>, _>>()?;

    let mut ports: Vec<PortSpec> = Vec::new();
    for (i, p) in spec.ports.as_deref().unwrap_or_default().iter().enumerate() {
        if !matches!(p.protocol.as_deref(), None | Some("TCP")) {
            continue;
        }
        let port = port_number(p.port)
            .ok_or_else(|| refuse(format!("spec.ports[{i}].port"), format!("{} is not a port (1-65535)", p.port)))?;
        if let Some(first) = ports.iter().find(|q| q.port == port) {
            return Err(refuse(
                format!("spec.ports[{i}].port"),
                format!("port {port} is listed twice (also spec.ports[{}])", first.index),
            ));
        }
        let target = match &p.target_port {
            None => Target::Number(port),
            Some(IntOrString::Int(n)) => Target::Number(port_number(*n).ok_or_else(|| {
                refuse(format!("spec.ports[{i}].targetPort"), format!("{n} is not a port (1-65535)"))
            })?),
            Some(IntOrString::String(name)) => Target::Named(name.clone()),
        };
        ports.push(PortSpec { index: i, port, target, app_protocol: p.app_protocol.clone() });
    }
    if ports.is_empty() {
        return Ok(None);
    }
    let labels = service.metadata.labels.as_ref();
    Ok(Some(ServiceSpec {
        vips,
        ports,
        selector: spec.selector.clone().unwrap_or_default(),
        waypoint: labels.and_then(|l| l.get(WAYPOINT_LABEL)).cloned(),
    }))
}

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|n| *n != 0)
}

/// The policy through the model's own decoder, so that principals and IP blocks are read,
/// and unreadable ones mark it broken, exactly as everywhere else.
fn authorization(policy: &AuthorizationPolicy, r: &ObjectRef) -> Translated {
    let spec = &policy.spec;
    let rules: Vec<serde_json::Value> = spec
        .rules
        .iter()
        .map(|rule| {
            let from: Vec<serde_json::Value> = rule
                .from
                .iter()
                .map(|s| json!({"principals": s.principals, "namespaces": s.namespaces, "ipBlocks": s.ip_blocks}))
                .collect();
            let to: Vec<serde_json::Value> =
                rule.to.iter().map(|t| json!({"methods": t.operation.methods, "paths": t.operation.paths})).collect();
            json!({"from": from, "ports": rule.ports, "to": to})
        })
        .collect();
    // Only Services can be targets: another kind is refused (the CRD's schema refuses it at
    // apply time on Kubernetes).
    let targets = match &spec.target_refs {
        None => None,
        Some(refs) => {
            let mut names = Vec::new();
            for (i, t) in refs.iter().enumerate() {
                if t.kind != "Service" || !(t.group.is_empty() || t.group == "core") {
                    let problem = Rejection::new(format!(
                        "{}/{} is not a Service: only Services (group \"\") can be targets",
                        t.group, t.kind
                    ))
                    .about(r.clone())
                    .at(format!("spec.targetRefs[{i}]"));
                    return Translated { resource: None, problem: Some(problem) };
                }
                names.push(t.name.clone());
            }
            Some(names)
        }
    };
    let wire = Wire {
        kind: Kind::Authorization,
        name: r.qualified_name(),
        spec: json!({
            "name": r.name,
            "namespace": r.namespace,
            "selector": spec.selector.as_ref().map(|s| &s.match_labels),
            "targetServices": targets,
            "action": match spec.action { PolicyAction::Allow => "ALLOW", PolicyAction::Deny => "DENY" },
            "rules": rules,
        }),
    };
    match Resource::from_wire(wire) {
        Ok(resource) => {
            let problem = match &resource {
                Resource::Authorization(a) => a.broken.as_ref().map(|why| {
                    Rejection::new(format!(
                        "{why}; the policy is kept but fails closed: as an ALLOW it allows nothing, as a DENY it denies all it selects"
                    ))
                    .about(r.clone())
                }),
                _ => None,
            };
            Translated { resource: Some(resource), problem }
        }
        Err(e) => {
            let key = Key::new(Kind::Authorization, r.qualified_name());
            Translated { resource: None, problem: Some(model_rejection(&e, &key, r)) }
        }
    }
}

/// A route attached to Services (`parents`, at least one), with its `spec` as written, and
/// the problems the waypoint would find in it (`parsed`: [`parse_route`] of the spec).
fn http_route(
    r: &ObjectRef,
    name: String,
    namespace: String,
    parents: Vec<String>,
    spec: &serde_json::Value,
    parsed: &ParsedRoute,
    annotations: &BTreeMap<String, String>,
) -> Translated {
    let (fault, fault_problem) = match fault(annotations) {
        Ok(f) => (f, None),
        Err((annotation, why)) => (
            None,
            Some(
                Rejection::new(format!("{why}; no fault is injected"))
                    .about(r.clone())
                    .at(format!("metadata.annotations[\"{annotation}\"]")),
            ),
        ),
    };
    let problem = route_problem(r, parsed).or(fault_problem);
    let route = HttpRoute { name, namespace, parents, spec: spec.clone(), fault };
    Translated { resource: Some(Resource::HttpRoute(route)), problem }
}

/// A problem as a condition's message: the field at fault and why (the object is the one the
/// condition is on).
fn condition_message(problem: &Rejection) -> String {
    match &problem.field {
        Some(field) => format!("{field}: {}", problem.reason),
        None => problem.reason.clone(),
    }
}

/// A route's `spec` read as the waypoint reads it, each regular expression compiled as it
/// compiles them.
fn parse_route(namespace: &str, spec: &serde_json::Value) -> ParsedRoute {
    let mut parsed = httproute::parse(namespace, spec);
    parsed.check_regexes(|pattern| {
        RegexBuilder::new(pattern)
            .size_limit(httproute::REGEX_SIZE_LIMIT)
            .build()
            .map(|_| ())
            .map_err(|e| format!("not a regular expression: {e}"))
    });
    parsed
}

/// Annotation prefix of the fault-injection extension (ARCHITECTURE §4.4).
pub const FAULT_ANNOTATION: &str = "fault.weft.dev/";

/// The faults a route's annotations ask for: `fault.weft.dev/delay` (a Gateway API duration)
/// with `delay-percent`, `fault.weft.dev/abort` (an HTTP status) with `abort-percent`; a
/// percent is 0 to 100 and defaults to 100. An unknown or unreadable annotation of the prefix
/// is an error naming it.
fn fault(annotations: &BTreeMap<String, String>) -> Result<Option<meshapi::Fault>, (String, String)> {
    let mut fault = meshapi::Fault::default();
    let (mut delay_percent, mut abort_percent) = (100u8, 100u8);
    let mut any = false;
    for (key, value) in annotations.range(FAULT_ANNOTATION.to_owned()..) {
        let Some(what) = key.strip_prefix(FAULT_ANNOTATION) else { break };
        any = true;
        let bad = |why: String| (key.clone(), why);
        let percent = || match value.trim().parse::<u8>() {
            Ok(p) if p <= 100 => Ok(p),
            _ => Err(bad(format!("{value:?} is not a percent (0 to 100)"))),
        };
        match what {
            "delay" => {
                let d = httproute::parse_duration(value.trim())
                    .ok_or_else(|| bad(format!("{value:?} is not a duration (1s, 250ms, 1m30s)")))?;
                fault.delay = Some((d, 100));
            }
            "abort" => match value.trim().parse::<u16>() {
                Ok(s @ 200..=599) => fault.abort = Some((s, 100)),
                _ => return Err(bad(format!("{value:?} is not an HTTP status (200 to 599)"))),
            },
            "delay-percent" => delay_percent = percent()?,
            "abort-percent" => abort_percent = percent()?,
            other => {
                return Err(bad(format!(
                    "{other:?} is not a fault annotation: use delay, delay-percent, abort, abort-percent"
                )));
            }
        }
    }
    fault.delay = fault.delay.map(|(d, _)| (d, delay_percent));
    fault.abort = fault.abort.map(|(s, _)| (s, abort_percent));
    Ok((any && (fault.delay.is_some() || fault.abort.is_some())).then_some(fault))
}

/// A route's problems as one report (one per object): the first names the field, the others
/// follow in the reason; each says what the waypoint does about it.
fn route_problem(r: &ObjectRef, parsed: &ParsedRoute) -> Option<Rejection> {
    let (first, rest) = parsed.problems.split_first()?;
    let consequence = |p: &httproute::Problem| match p.rule {
        Some(i) => format!(" (the waypoint skips rule {i} and applies the others)"),
        None => " (ignored)".to_owned(),
    };
    let mut reason = format!("{}{}", first.reason, consequence(first));
    for p in rest {
        reason.push_str(&format!("; also {p}{}", consequence(p)));
    }
    if !parsed.rules.is_empty() && parsed.valid().next().is_none() {
        reason.push_str("; no rule is left, so the route does not apply: the service is served as if it had no route");
    }
    Some(Rejection::new(reason).about(r.clone()).at(first.field.clone()))
}

#[cfg(test)]
mod tests {
    use meshapi::{Action, PolicyScope, Principal};

    use super::*;
    use crate::source::dir::DirSource;
    use crate::source::dir::testing::TestDir;

    /// A cluster as `kubectl get -o yaml` would show it, over several files.
    const NAMESPACES: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled, weft.dev/mtls: STRICT}}
---
apiVersion: v1
kind: Namespace
metadata: {name: front}
---
apiVersion: v1
kind: Namespace
metadata: {name: weft-system}
";

    const SHOP_PODS: &str = "
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web}}
spec: {nodeName: node-1, serviceAccountName: web, containers: [{name: web, image: web}]}
status: {phase: Running, podIP: 10.244.1.10, podIPs: [{ip: 10.244.1.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-0, namespace: shop, labels: {app: api, weft.dev/mtls: PERMISSIVE}}
spec:
  nodeName: node-2
  containers: [{name: api, image: api, ports: [{name: http, containerPort: 8080}, {name: metrics, containerPort: 9090}]}]
status: {phase: Running, podIPs: [{ip: 10.244.2.10}, {ip: 'fd00::10'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: batch-0, namespace: shop, labels: {app: batch, weft.dev/mesh: disabled}}
spec: {nodeName: node-1, containers: [{name: batch, image: batch}]}
status: {phase: Running, podIPs: [{ip: 10.244.1.11}]}
---
apiVersion: v1
kind: Pod
metadata: {name: agent-0, namespace: shop, labels: {app: agent}}
spec: {nodeName: node-2, hostNetwork: true, containers: [{name: agent, image: agent}]}
status: {phase: Running, podIPs: [{ip: 10.255.0.3}]}
---
apiVersion: v1
kind: Pod
metadata: {name: pending-0, namespace: shop, labels: {app: api}}
spec: {containers: [{name: api, image: api}]}
status: {phase: Pending}
---
apiVersion: v1
kind: Pod
metadata: {name: done-0, namespace: shop, labels: {app: job}}
spec: {nodeName: node-1, containers: [{name: job, image: job}]}
status: {phase: Succeeded, podIPs: [{ip: 10.244.1.12}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: wp-0
  namespace: shop
  labels: {gateway.networking.k8s.io/gateway-name: wp, weft.dev/mesh: disabled}
spec: {nodeName: node-2, serviceAccountName: wp, containers: [{name: waypoint, image: weft}]}
status: {phase: Running, podIPs: [{ip: 10.244.2.20}]}
";

    const FRONT_PODS: &str = "
apiVersion: v1
kind: Pod
metadata: {name: client-0, namespace: front, labels: {app: client}}
spec: {nodeName: node-1, containers: [{name: client, image: client}]}
status: {phase: Running, podIPs: [{ip: 10.244.1.20}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client-1, namespace: front, labels: {app: client}}
spec: {nodeName: node-2, containers: [{name: client, image: client}]}
status: {phase: Running, podIPs: [{ip: 10.244.2.21}]}
";

    const SERVICES: &str = "
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop, labels: {weft.dev/use-waypoint: wp}}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  selector: {app: api}
  ports: [{name: http, port: 80, targetPort: http, appProtocol: http}, {name: metrics, port: 9090}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: None, selector: {app: db}, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.2
  selector: {k8s-app: kube-dns}
  ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}, {name: metrics, port: 9153}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: api, namespace: shop}
spec: {replicas: 1}
";

    const POLICY: &str = "
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: only-web, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
    - from: [{principals: ['spiffe://cluster.local/ns/shop/sa/web'], namespaces: [shop], ipBlocks: [10.0.0.0/8]}]
      ports: [8080]
";

    const WAYPOINT: &str = "
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec:
  gatewayClassName: weft-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: shop}
spec: {gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: api, port: 80}]
  rules: [{backendRefs: [{name: api-v1, port: 80, weight: 90}, {name: api-v2, port: 80, weight: 10}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: public, namespace: shop}
spec:
  parentRefs: [{name: ingress}]
  rules: [{backendRefs: [{name: api, port: 80}]}]
";

    /// The cluster above in a directory, with its source and a translator that has read it.
    struct Cluster {
        dir: TestDir,
        source: DirSource,
        translator: Translator,
    }

    impl Cluster {
        fn new(test: &str) -> (Cluster, Vec<Change>) {
            let dir = TestDir::new(test);
            dir.write("namespaces.yaml", NAMESPACES);
            dir.write("shop/pods.yaml", SHOP_PODS);
            dir.write("front/pods.yaml", FRONT_PODS);
            dir.write("services.yml", SERVICES);
            dir.write("shop/policy.yaml", POLICY);
            dir.write("shop/waypoint.yaml", WAYPOINT);
            let mut cluster = Cluster { source: DirSource::new(dir.path()), dir, translator: Translator::new() };
            let changes = cluster.scan();
            (cluster, changes)
        }

        /// Scans and translates event by event (no merging: each change counts).
        fn scan(&mut self) -> Vec<Change> {
            let scan = self.source.scan();
            scan.events.into_iter().flat_map(|e| self.translator.apply(e)).collect()
        }
    }

    fn upserts(changes: &[Change]) -> BTreeMap<String, Resource> {
        changes
            .iter()
            .filter_map(|c| match c {
                Change::Upsert(r) => Some((r.key().to_string(), r.clone())),
                Change::Delete(_) => None,
            })
            .collect()
    }

    fn summary(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                Change::Upsert(r) => format!("upsert {}", r.key()),
                Change::Delete(k) => format!("delete {k}"),
            })
            .collect()
    }

    fn workload<'a>(changes: &'a BTreeMap<String, Resource>, name: &str) -> &'a Workload {
        match changes.get(&format!("Workload {name}")) {
            Some(Resource::Workload(w)) => w,
            other => panic!("no workload {name}: {other:?}"),
        }
    }

    /// Objects from YAML documents.
    fn objects(yaml: &str) -> Vec<Object> {
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml).unwrap();
        docs.into_iter().map(|d| Object::from_value(d).unwrap().unwrap()).collect()
    }

    /// Applies the objects one event at a time; every change counts.
    fn apply(t: &mut Translator, yaml: &str) -> Vec<Change> {
        objects(yaml).into_iter().flat_map(|o| t.apply(Event::Applied(o))).collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_cluster_directory_translates_to_the_model() {
        let (cluster, changes) = Cluster::new("model");
        let model = upserts(&changes);
        let keys: Vec<&str> = model.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "Authorization shop/only-web",
                "HttpRoute shop/canary",
                "Service kube-system/kube-dns",
                "Service shop/api",
                "Waypoint shop/wp",
                "Workload front/client-0",
                "Workload front/client-1",
                "Workload shop/agent-0",
                "Workload shop/api-0",
                "Workload shop/batch-0",
                "Workload shop/web-0",
                "Workload shop/wp-0",
            ],
            "no workload for the pending and the finished pod, no service for the headless one, \
             no waypoint for the other class, no route without a Service parent"
        );
        assert_eq!(changes.len(), model.len(), "each resource emitted once: {:?}", summary(&changes));

        assert_eq!(
            *workload(&model, "shop/web-0"),
            Workload {
                uid: "shop/web-0".into(),
                name: "web-0".into(),
                namespace: "shop".into(),
                node: "node-1".into(),
                addresses: vec![ip("10.244.1.10")],
                service_account: "web".into(),
                labels: [("app".to_owned(), "web".to_owned())].into(),
                enrolled: true,
                mtls: MtlsMode::Strict,
                waypoint: None,
            }
        );
        let api = workload(&model, "shop/api-0");
        assert_eq!(api.addresses, [ip("10.244.2.10"), ip("fd00::10")]);
        assert_eq!((api.service_account.as_str(), api.mtls), ("default", MtlsMode::Permissive), "the pod's label wins");
        assert!(!workload(&model, "shop/batch-0").enrolled, "opted out");
        assert!(!workload(&model, "shop/agent-0").enrolled, "hostNetwork");
        assert!(!workload(&model, "front/client-0").enrolled, "namespace not labelled");
        assert_eq!(workload(&model, "front/client-0").mtls, MtlsMode::Permissive);

        let Some(Resource::Service(svc)) = model.get("Service shop/api") else { panic!() };
        assert_eq!(svc.vips, [ip("10.96.0.10")]);
        assert_eq!(
            svc.ports,
            [
                ServicePort { port: 80, target_port: 8080, app_protocol: Some("http".into()) },
                ServicePort { port: 9090, target_port: 9090, app_protocol: None },
            ],
            "the named targetPort read from the selected pod"
        );
        assert_eq!(svc.waypoint.as_deref(), Some("shop/wp"));
        assert_eq!(svc.hostname, "api.shop.svc.cluster.local");
        let Some(Resource::Service(dns)) = model.get("Service kube-system/kube-dns") else { panic!() };
        let ports: Vec<u16> = dns.ports.iter().map(|p| p.port).collect();
        assert_eq!(ports, [53, 9153], "TCP ports only; UDP 53 beside TCP 53 is no duplicate");

        let Some(Resource::Waypoint(wp)) = model.get("Waypoint shop/wp") else { panic!() };
        assert_eq!((wp.addresses.as_slice(), wp.service_account.as_str()), ([ip("10.244.2.20")].as_slice(), "wp"));

        let Some(Resource::Authorization(policy)) = model.get("Authorization shop/only-web") else { panic!() };
        assert_eq!(policy.scope, PolicyScope::Selector([("app".to_owned(), "api".to_owned())].into()));
        assert_eq!(policy.action, Action::Allow);
        assert_eq!(policy.rules[0].ports, [8080]);
        let source = &policy.rules[0].from[0];
        assert!(
            matches!(&source.principals[0], Principal::Exact(id) if id.as_str() == "spiffe://cluster.local/ns/shop/sa/web"),
            "{source:?}"
        );
        assert_eq!(source.ip_blocks[0].to_string(), "10.0.0.0/8");
        assert!(policy.broken.is_none());

        let Some(Resource::HttpRoute(route)) = model.get("HttpRoute shop/canary") else { panic!() };
        assert_eq!(route.parents, ["shop/api"]);
        assert_eq!(route.spec["rules"][0]["backendRefs"][1]["weight"], 10);

        assert!(cluster.translator.rejected().is_empty(), "{:#?}", cluster.translator.rejected());
        assert!(cluster.source.rejected().is_empty(), "{:#?}", cluster.source.rejected());
        assert_eq!(cluster.translator.resources().count(), 12);
    }

    #[test]
    fn every_emitted_resource_survives_the_wire() {
        let (mut cluster, mut changes) = Cluster::new("wire");
        cluster.dir.write(
            "front/namespace.yaml",
            &NAMESPACES
                .replace("{name: front}", "{name: front, labels: {weft.dev/mesh: enabled, weft.dev/use-waypoint: wp}}"),
        );
        cluster.dir.remove("namespaces.yaml");
        changes.extend(cluster.scan());
        let mut n = 0;
        for change in changes {
            let Change::Upsert(resource) = change else { continue };
            let line = resource.encode();
            let wire: Wire = serde_json::from_str(&line).unwrap();
            let back = Resource::from_wire(wire).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(back, resource, "{line}");
            n += 1;
        }
        assert_eq!(n, 14, "the 12 resources, then both front workloads enrolled");
    }

    #[test]
    fn labelling_a_namespace_enrolls_exactly_its_pods() {
        let (mut cluster, _) = Cluster::new("label-namespace");
        cluster.dir.write(
            "namespaces.yaml",
            &NAMESPACES.replace("{name: front}", "{name: front, labels: {weft.dev/mesh: enabled}}"),
        );
        let changes = cluster.scan();
        assert_eq!(summary(&changes), ["upsert Workload front/client-0", "upsert Workload front/client-1"]);
        for change in &changes {
            let Change::Upsert(Resource::Workload(w)) = change else { panic!("{change:?}") };
            assert!(w.enrolled, "{w:?}");
        }

        // Un-labelling takes them out again; deleting the namespace object too.
        cluster.dir.write("namespaces.yaml", NAMESPACES);
        assert_eq!(cluster.scan().len(), 2);
        cluster.dir.write(
            "namespaces.yaml",
            &NAMESPACES.replace("{name: front}", "{name: front, labels: {weft.dev/mesh: enabled}}"),
        );
        assert_eq!(cluster.scan().len(), 2);
        cluster.dir.write(
            "namespaces.yaml",
            &NAMESPACES.replace("{name: front}", "{name: front, labels: {weft.dev/mesh: enabled}}").replace(
                "{name: shop, labels: {weft.dev/mesh: enabled, weft.dev/mtls: STRICT}}",
                "{name: shop, labels: {weft.dev/mesh: enabled, weft.dev/mtls: STRICT, team: a}}",
            ),
        );
        assert!(cluster.scan().is_empty(), "a label translation does not read changes nothing");
    }

    #[test]
    fn editing_one_pod_yields_one_change() {
        let (mut cluster, _) = Cluster::new("edit-pod");
        cluster.dir.write(
            "front/pods.yaml",
            &FRONT_PODS.replacen("labels: {app: client}", "labels: {app: client, version: v2}", 1),
        );
        let changes = cluster.scan();
        assert_eq!(summary(&changes), ["upsert Workload front/client-0"]);
        let Change::Upsert(Resource::Workload(w)) = &changes[0] else { panic!() };
        assert_eq!(w.labels.get("version").map(String::as_str), Some("v2"));

        // A change translation does not read (an annotation) changes nothing.
        cluster.dir.write(
            "front/pods.yaml",
            &FRONT_PODS.replacen("labels: {app: client}", "labels: {app: client, version: v2}", 1).replacen(
                "namespace: front,",
                "namespace: front, annotations: {a: b},",
                1,
            ),
        );
        assert!(cluster.scan().is_empty());
    }

    #[test]
    fn deleting_a_file_deletes_its_objects() {
        let (mut cluster, _) = Cluster::new("delete-file");
        cluster.dir.remove("shop/waypoint.yaml");
        assert_eq!(summary(&cluster.scan()), ["delete HttpRoute shop/canary", "delete Waypoint shop/wp"]);
        cluster.dir.remove("front/pods.yaml");
        assert_eq!(summary(&cluster.scan()), ["delete Workload front/client-1", "delete Workload front/client-0"]);
        assert_eq!(cluster.translator.resources().count(), 8);
    }

    #[test]
    fn bad_objects_are_rejected_and_everything_else_translates() {
        let dir = TestDir::new("rejections");
        dir.write("namespaces.yaml", NAMESPACES);
        dir.write("shop/pods.yaml", SHOP_PODS);
        dir.write("front/pods.yaml", FRONT_PODS);
        dir.write("services.yml", SERVICES);
        dir.write("shop/policy.yaml", POLICY);
        dir.write("shop/waypoint.yaml", WAYPOINT);
        dir.write("broken.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: shop\n");
        dir.write(
            "bad-ports.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: zero, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.20, ports: [{port: 80}, {port: 0}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: twice, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.21, ports: [{port: 80, name: a}, {port: 80, name: b, targetPort: 8080}]}\n",
        );
        dir.write("policy-typo.yaml", &POLICY.replace("only-web", "typo").replace("ipBlocks:", "ipBlock:"));
        let mut source = DirSource::new(dir.path());
        let mut translator = Translator::new();
        let scan = source.scan();
        let changes: Vec<Change> = scan.events.into_iter().flat_map(|e| translator.apply(e)).collect();
        assert_eq!(upserts(&changes).len(), 12, "everything else translated: {:?}", summary(&changes));

        let file = |name: &str| dir.path().join(name);
        let read = source.rejected();
        assert_eq!(read.len(), 2, "{read:#?}");
        assert_eq!(read[0].origin.as_ref().map(|o| &o.file), Some(&file("broken.yaml")));
        assert!(read[0].reason.starts_with("invalid YAML"), "{}", read[0]);
        let typo = &read[1];
        assert_eq!(typo.origin.as_ref().map(|o| (&o.file, o.document)), Some((&file("policy-typo.yaml"), Some(1))));
        assert_eq!(typo.object, Some(ObjectRef::new(ObjectKind::AuthorizationPolicy, Some("shop"), "typo")));
        assert_eq!(typo.field.as_deref(), Some("spec.rules[0].from[0].ipBlock"));
        assert!(typo.reason.starts_with("unknown field `ipBlock`"), "{typo}");

        // Translation's rejections, located by the source.
        let located: Vec<String> = translator
            .rejected()
            .into_iter()
            .map(|r| match r.object.as_ref().and_then(|o| source.origin(o)) {
                Some(origin) => r.clone().with_origin(origin.clone()).to_string(),
                None => r.to_string(),
            })
            .collect();
        let at = file("bad-ports.yaml");
        assert_eq!(
            located,
            [
                format!(
                    "Service shop/twice in {}:6 (document 2): spec.ports[1].port: port 80 is listed twice (also spec.ports[0])",
                    at.display()
                ),
                format!(
                    "Service shop/zero in {}:1 (document 1): spec.ports[1].port: 0 is not a port (1-65535)",
                    at.display()
                ),
            ]
        );

        // Fixed, the service appears and its rejection goes.
        dir.write("bad-ports.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: zero, namespace: shop}\nspec: {clusterIP: 10.96.0.20, ports: [{port: 80}, {port: 81}]}\n");
        let changes: Vec<Change> = source.scan().events.into_iter().flat_map(|e| translator.apply(e)).collect();
        assert_eq!(summary(&changes), ["upsert Service shop/zero"]);
        assert!(translator.rejected().is_empty(), "{:#?}", translator.rejected());
    }

    #[test]
    fn policy_values_that_do_not_read_fail_closed() {
        let mut t = Translator::new();
        let yaml =
            POLICY.replace("'spiffe://cluster.local/ns/shop/sa/web'", "'a*b*'").replace("10.0.0.0/8", "10.0.0.0/99");
        let changes = apply(&mut t, &yaml);
        let [Change::Upsert(Resource::Authorization(policy))] = changes.as_slice() else { panic!("{changes:?}") };
        let broken = policy.broken.as_deref().unwrap();
        assert!(broken.contains("rules[0].from[0].principals[0]"), "{broken}");
        let [rejection] = t.rejected().try_into().unwrap();
        assert_eq!(rejection.object, Some(ObjectRef::new(ObjectKind::AuthorizationPolicy, Some("shop"), "only-web")));
        assert!(rejection.reason.contains("fails closed"), "{rejection}");

        // Without a selector, in weft-system: the whole mesh.
        let mesh = "apiVersion: security.weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
                    metadata: {name: deny-all, namespace: weft-system}\nspec: {action: DENY}\n";
        let changes = apply(&mut t, mesh);
        let [Change::Upsert(Resource::Authorization(policy))] = changes.as_slice() else { panic!("{changes:?}") };
        assert_eq!((&policy.scope, policy.action), (&PolicyScope::Mesh, Action::Deny));
    }

    #[test]
    fn a_policy_targeting_services_carries_request_rules_to_their_waypoint() {
        let mut t = Translator::new();
        let policy = "apiVersion: security.weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
                      metadata: {name: no-admin, namespace: shop}\n\
                      spec: {targetRefs: [{kind: Service, group: '', name: reviews}], action: DENY,\
                             rules: [{to: [{operation: {methods: [DELETE], paths: ['/admin/*']}}]}]}\n";
        let changes = apply(&mut t, policy);
        let [Change::Upsert(Resource::Authorization(p))] = changes.as_slice() else { panic!("{changes:?}") };
        assert_eq!(p.scope, PolicyScope::Services(vec!["reviews".into()]));
        assert_eq!(p.rules[0].to[0].methods, ["DELETE"]);
        assert_eq!(p.rules[0].to[0].paths, [meshapi::PathPattern::Prefix("/admin/".into())]);
        assert!(p.broken.is_none());

        // Another kind of target is refused, naming the field.
        let changes = apply(&mut t, &policy.replace("kind: Service", "kind: Deployment"));
        assert_eq!(summary(&changes), ["delete Authorization shop/no-admin"]);
        let [rejection] = t.rejected().try_into().unwrap();
        assert_eq!(rejection.field.as_deref(), Some("spec.targetRefs[0]"));
        // Both a selector and targets: refused too.
        let both = policy.replace("targetRefs:", "selector: {matchLabels: {app: x}}, targetRefs:");
        assert!(apply(&mut t, &both).is_empty());
        assert_eq!(t.rejected()[0].field.as_deref(), Some("spec.targetRefs"), "{:?}", t.rejected());
    }

    #[test]
    fn mtls_labels_and_what_an_unreadable_one_means() {
        let mut t = Translator::new();
        let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {weft.dev/mtls: permissive}}\n";
        let pod = |name: &str, labels: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{{labels}}}}}\n\
                 spec: {{nodeName: n1, containers: []}}\nstatus: {{podIP: 10.244.1.{}}}\n",
                name.len()
            )
        };
        assert!(apply(&mut t, ns).is_empty());
        let ns_rejection = &t.rejected()[0];
        assert_eq!(ns_rejection.object, Some(ObjectRef::new(ObjectKind::Namespace, None, "shop")));
        assert_eq!(ns_rejection.field.as_deref(), Some("metadata.labels[\"weft.dev/mtls\"]"));
        assert!(ns_rejection.reason.contains("taken as STRICT"), "{ns_rejection}");

        let changes = apply(&mut t, &pod("a", ""));
        let [Change::Upsert(Resource::Workload(a))] = changes.as_slice() else { panic!() };
        assert_eq!(a.mtls, MtlsMode::Strict, "fails closed: the namespace's unreadable label");

        let changes = apply(&mut t, &pod("bb", "weft.dev/mtls: PERMISSIVE"));
        let [Change::Upsert(Resource::Workload(b))] = changes.as_slice() else { panic!() };
        assert_eq!(b.mtls, MtlsMode::Permissive, "the pod's own label wins");

        let changes = apply(&mut t, &pod("ccc", "weft.dev/mtls: Strict"));
        let [Change::Upsert(Resource::Workload(c))] = changes.as_slice() else { panic!() };
        assert_eq!(c.mtls, MtlsMode::Strict);
        assert_eq!(t.rejected().len(), 2, "the pod's unreadable label is reported too, and it still runs");

        // The namespace fixed: its pods follow, and its rejection goes.
        let changes = apply(&mut t, &ns.replace("permissive", "PERMISSIVE"));
        assert_eq!(summary(&changes), ["upsert Workload shop/a"]);
        assert_eq!(t.rejected().len(), 1);
    }

    #[test]
    fn a_named_target_port_needs_selected_pods_that_agree() {
        let mut t = Translator::new();
        let service = "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\n\
                       spec: {clusterIP: 10.96.0.10, selector: {app: api}, ports: [{port: 80, targetPort: http}]}\n";
        let pod = |name: &str, ip: &str, port: u16| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: api}}}}\n\
                 spec: {{nodeName: n1, containers: [{{name: api, image: api, ports: [{{name: http, containerPort: {port}}}]}}]}}\n\
                 status: {{podIP: {ip}}}\n"
            )
        };
        assert!(apply(&mut t, service).is_empty(), "no pod to read the port from yet");
        assert!(t.rejected()[0].reason.contains("no running pod is selected"), "{}", t.rejected()[0]);

        // A pod arrives: its workload and the service it completes.
        let changes = apply(&mut t, &pod("api-0", "10.244.1.2", 8080));
        assert_eq!(summary(&changes), ["upsert Workload shop/api-0", "upsert Service shop/api"]);
        assert!(t.rejected().is_empty());

        // A second pod disagrees: the service is withdrawn, with the reason.
        let changes = apply(&mut t, &pod("api-1", "10.244.1.3", 8081));
        assert_eq!(summary(&changes), ["upsert Workload shop/api-1", "delete Service shop/api"]);
        let [rejection] = t.rejected().try_into().unwrap();
        assert_eq!(rejection.field.as_deref(), Some("spec.ports[0].targetPort"));
        assert_eq!(
            rejection.reason,
            "the selected pods disagree on container port \"http\": 8080 on api-0, 8081 on api-1"
        );

        let changes = apply(&mut t, &pod("api-1", "10.244.1.3", 8080));
        assert_eq!(summary(&changes), ["upsert Service shop/api"], "the port agrees; the workload did not change");
    }

    #[test]
    fn a_waypoint_follows_its_pods_and_pods_follow_their_lifecycle() {
        let mut t = Translator::new();
        let gateway = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp, namespace: shop}\n\
                       spec: {gatewayClassName: weft-waypoint}\n";
        let pod = |status: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\n\
                 metadata: {{name: wp-0, namespace: shop, labels: {{gateway.networking.k8s.io/gateway-name: wp}}}}\n\
                 spec: {{nodeName: n1, containers: []}}\nstatus: {status}\n"
            )
        };
        assert!(apply(&mut t, gateway).is_empty(), "no address yet: no waypoint");
        assert!(apply(&mut t, &pod("{phase: Pending}")).is_empty(), "no IP yet: no workload");
        let changes = apply(&mut t, &pod("{phase: Running, podIP: 10.244.1.9}"));
        assert_eq!(summary(&changes), ["upsert Workload shop/wp-0", "upsert Waypoint shop/wp"]);
        let changes = apply(&mut t, &pod("{phase: Failed, podIP: 10.244.1.9}"));
        assert_eq!(summary(&changes), ["delete Workload shop/wp-0", "delete Waypoint shop/wp"]);
        apply(&mut t, &pod("{phase: Running, podIP: 10.244.1.9}"));

        let changes = t.apply(Event::Deleted(ObjectRef::new(ObjectKind::Pod, Some("shop"), "wp-0")));
        assert_eq!(summary(&changes), ["delete Workload shop/wp-0", "delete Waypoint shop/wp"]);
        apply(&mut t, &pod("{phase: Running, podIP: 10.244.1.9}"));
        let changes = apply(&mut t, &gateway.replace("weft-waypoint", "istio"));
        assert_eq!(summary(&changes), ["delete Waypoint shop/wp"], "another class is not a waypoint");
    }

    #[test]
    fn a_waypoints_pods_are_not_captured() {
        let mut t = Translator::new();
        let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {weft.dev/mesh: enabled}}\n";
        let gateway = |class: &str| {
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: wp, namespace: shop}}\n\
                 spec: {{gatewayClassName: {class}}}\n"
            )
        };
        let pod = |name: &str, ip: &str, gateway: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\n\
                 metadata: {{name: {name}, namespace: shop, labels: {{gateway.networking.k8s.io/gateway-name: {gateway}}}}}\n\
                 spec: {{nodeName: n1, serviceAccountName: {gateway}, containers: []}}\n\
                 status: {{phase: Running, podIP: {ip}}}\n"
            )
        };
        let enrolled = |changes: &[Change]| -> Vec<(String, bool)> {
            changes
                .iter()
                .filter_map(|c| match c {
                    Change::Upsert(Resource::Workload(w)) => Some((w.name.clone(), w.enrolled)),
                    _ => None,
                })
                .collect()
        };
        assert!(apply(&mut t, ns).is_empty());
        // Before its Gateway is known, the label alone changes nothing: a pod of an enrolled
        // namespace.
        let changes = apply(&mut t, &pod("wp-0", "10.244.1.9", "wp"));
        assert_eq!(enrolled(&changes), [("wp-0".to_owned(), true)]);

        // The Gateway arrives: its waypoint, and its pod no longer captured, with its identity
        // and addresses still in the model (peers reach it, and it obtains its certificate).
        let changes = apply(&mut t, &gateway("weft-waypoint"));
        assert_eq!(summary(&changes), ["upsert Waypoint shop/wp", "upsert Workload shop/wp-0"]);
        let [_, Change::Upsert(Resource::Workload(w))] = changes.as_slice() else { panic!("{changes:?}") };
        assert_eq!(
            (w.enrolled, w.service_account.as_str(), w.addresses.as_slice()),
            (false, "wp", [ip("10.244.1.9")].as_slice())
        );

        // A pod arriving later is not captured from the start; one labelled for a Gateway
        // that is not a waypoint is.
        let changes = apply(&mut t, &pod("wp-1", "10.244.1.10", "wp"));
        assert_eq!(summary(&changes), ["upsert Workload shop/wp-1", "upsert Waypoint shop/wp"]);
        assert_eq!(enrolled(&changes), [("wp-1".to_owned(), false)]);
        let changes = apply(&mut t, &pod("ingress-0", "10.244.1.11", "ingress"));
        assert_eq!(enrolled(&changes), [("ingress-0".to_owned(), true)]);

        // The Gateway changes class: no waypoint, its pods captured again; and back.
        let changes = apply(&mut t, &gateway("istio"));
        assert_eq!(
            summary(&changes),
            ["delete Waypoint shop/wp", "upsert Workload shop/wp-0", "upsert Workload shop/wp-1"]
        );
        assert_eq!(enrolled(&changes), [("wp-0".to_owned(), true), ("wp-1".to_owned(), true)]);
        assert!(apply(&mut t, &gateway("istio")).is_empty(), "no change of class, nothing re-translated");
        let changes = apply(&mut t, &gateway("weft-waypoint"));
        assert_eq!(enrolled(&changes), [("wp-0".to_owned(), false), ("wp-1".to_owned(), false)]);

        // Deleted: the same.
        let changes = t.apply(Event::Deleted(ObjectRef::new(ObjectKind::Gateway, Some("shop"), "wp")));
        assert_eq!(
            summary(&changes),
            ["delete Waypoint shop/wp", "upsert Workload shop/wp-0", "upsert Workload shop/wp-1"]
        );
        assert_eq!(enrolled(&changes), [("wp-0".to_owned(), true), ("wp-1".to_owned(), true)]);
    }

    #[test]
    fn what_the_model_would_refuse_is_rejected_here() {
        let mut t = Translator::new();
        let long = "a".repeat(70);
        let pod = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {long}, namespace: shop}}\n\
             spec: {{nodeName: n1, containers: []}}\nstatus: {{podIP: 10.244.1.2}}\n"
        );
        assert!(apply(&mut t, &pod).is_empty());
        let [rejection] = t.rejected().try_into().unwrap();
        assert_eq!(rejection.field.as_deref(), Some("metadata.name"));
        assert!(rejection.reason.contains("is not a valid name"), "{rejection}");

        let bad_ip = pod.replace(&long, "web-0").replace("10.244.1.2", "10.244.1.x");
        assert!(apply(&mut t, &bad_ip).is_empty());
        let rejection =
            t.rejected().into_iter().find(|r| r.object.as_ref().is_some_and(|o| o.name == "web-0")).unwrap();
        assert_eq!(rejection.field.as_deref(), Some("status.podIP"));

        let ids: BTreeSet<String> =
            t.rejected().iter().filter_map(|r| r.object.as_ref()).map(ToString::to_string).collect();
        assert_eq!(ids.len(), 2);
    }

    #[test]
    fn route_rules_the_waypoint_would_skip_are_reported_and_the_route_is_still_emitted() {
        let mut t = Translator::new();
        let route = |second_rule: &str| {
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: canary, namespace: shop}}\n\
                 spec: {{parentRefs: [{{group: '', kind: Service, name: api}}], \
                 rules: [{{backendRefs: [{{name: api-v1, port: 80}}]}}, {second_rule}]}}\n"
            )
        };
        let changes = apply(&mut t, &route("{filters: [{type: Rewrite}], backendRefs: [{name: api-v2, port: 80}]}"));
        let [Change::Upsert(Resource::HttpRoute(emitted))] = changes.as_slice() else { panic!("{changes:?}") };
        let rules = emitted.spec["rules"].as_array().unwrap();
        assert_eq!(rules.len(), 2, "both rules travel, as written: the waypoint skips the bad one");
        assert_eq!(rules[0]["backendRefs"][0]["name"], "api-v1");
        assert_eq!(rules[1]["filters"][0]["type"], "Rewrite");
        let [problem] = t.rejected().try_into().unwrap();
        assert_eq!(problem.object, Some(ObjectRef::new(ObjectKind::HttpRoute, Some("shop"), "canary")));
        assert_eq!(problem.field.as_deref(), Some("spec.rules[1].filters[0].type"));
        assert!(problem.reason.starts_with("unknown filter type \"Rewrite\""), "{problem}");
        assert!(problem.reason.contains("the waypoint skips rule 1 and applies the others"), "{problem}");

        // A regular expression the waypoint could not compile is reported the same way.
        let bad_regex = "{matches: [{headers: [{type: RegularExpression, name: x-user, value: '(admin'}]}], \
                         backendRefs: [{name: api-v2, port: 80}]}";
        assert_eq!(summary(&apply(&mut t, &route(bad_regex))), ["upsert HttpRoute shop/canary"]);
        let [problem] = t.rejected().try_into().unwrap();
        assert_eq!(problem.field.as_deref(), Some("spec.rules[1].matches[0].headers[0].value"));
        assert!(problem.reason.starts_with("not a regular expression"), "{problem}");

        // Fixed: the report goes.
        apply(&mut t, &route("{backendRefs: [{name: api-v2, port: 80}]}"));
        assert!(t.rejected().is_empty(), "{:?}", t.rejected());
    }

    #[test]
    fn fault_annotations_become_the_routes_fault_and_a_bad_one_injects_nothing() {
        let mut t = Translator::new();
        let route = |annotations: &str| {
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                 metadata: {{name: chaos, namespace: shop, annotations: {{{annotations}}}}}\n\
                 spec: {{parentRefs: [{{group: '', kind: Service, name: api}}], rules: [{{backendRefs: [{{name: api, port: 80}}]}}]}}\n"
            )
        };
        let changes = apply(
            &mut t,
            &route(
                "fault.weft.dev/delay: 250ms, fault.weft.dev/delay-percent: '10', fault.weft.dev/abort: '503', other/x: 'y'",
            ),
        );
        let [Change::Upsert(Resource::HttpRoute(r))] = changes.as_slice() else { panic!("{changes:?}") };
        let fault = r.fault.expect("a fault");
        assert_eq!(fault.delay, Some((std::time::Duration::from_millis(250), 10)));
        assert_eq!(fault.abort, Some((503, 100)), "a percent defaults to 100");
        assert!(t.rejected().is_empty());

        for bad in [
            "fault.weft.dev/abort: '99'",
            "fault.weft.dev/delay: soon",
            "fault.weft.dev/abort-percent: '101'",
            "fault.weft.dev/dely: 1s",
        ] {
            apply(&mut t, &route("fault.weft.dev/abort: '503'"));
            let changes = apply(&mut t, &format!("{}\n", route(bad).trim_end()));
            let [Change::Upsert(Resource::HttpRoute(r))] = changes.as_slice() else { panic!("{bad}: {changes:?}") };
            assert_eq!(r.fault, None, "{bad}: injects nothing");
            let [problem] = t.rejected().try_into().unwrap();
            let key = bad.split(':').next().unwrap();
            assert_eq!(problem.field.as_deref(), Some(format!("metadata.annotations[\"{key}\"]").as_str()), "{bad}");
            assert!(problem.reason.ends_with("no fault is injected"), "{problem}");
        }
        // Without fault annotations: no fault, no report.
        apply(&mut t, &route("fault.weft.dev/abort: '503'"));
        let changes = apply(&mut t, &route("other/x: 'y'"));
        let [Change::Upsert(Resource::HttpRoute(r))] = changes.as_slice() else { panic!("{changes:?}") };
        assert_eq!(r.fault, None);
        assert!(t.rejected().is_empty());
    }

    #[test]
    fn apply_all_keeps_the_last_change_of_each_resource() {
        let mut t = Translator::new();
        let ns = objects(NAMESPACES);
        let pods = objects(FRONT_PODS);
        // Pods before their namespace is labelled, then the label: each workload once.
        let labelled = objects(&NAMESPACES.replace("{name: front}", "{name: front, labels: {weft.dev/mesh: enabled}}"));
        let events = ns.into_iter().chain(pods).chain(labelled).map(Event::Applied);
        let changes = t.apply_all(events);
        assert_eq!(summary(&changes), ["upsert Workload front/client-0", "upsert Workload front/client-1"]);
        assert!(changes.iter().all(|c| matches!(c, Change::Upsert(Resource::Workload(w)) if w.enrolled)));
    }
}
