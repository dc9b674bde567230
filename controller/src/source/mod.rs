//! Sources: where the controller learns what the cluster holds. A source produces
//! Kubernetes objects ([`Object`]) as they are applied and deleted ([`Event`]); `translate`
//! turns those events into model changes. Every source feeds the same translation, so the
//! lab's directory of YAML files and a real API server mean the same thing.
//!
//! ```text
//!  YAML directory (dir::DirSource)   ─┐
//!                                     ├─► Event::{Applied(Object), Deleted(ObjectRef)} ─► translate
//!  Kubernetes API (kube::KubeSource) ─┘
//! ```
//!
//! Both implement [`ObjectSource`], the seam the controller's source loop holds: wait until
//! something may have changed, [`scan`](ObjectSource::scan) what did, list what is rejected.
//! A directory is polled; the API server pushes (a watch per kind), so the Kubernetes source
//! wakes the loop as soon as an event arrives.
//!
//! Core objects are the `k8s-openapi` types, as the API server serves them. Weft's own CRD
//! ([`AuthorizationPolicy`]) is typed here and refuses unknown fields in its `spec`, as the
//! structural schema of a CRD does: a typo must not silently widen a policy. The Gateway API
//! objects ([`Gateway`], [`HttpRoute`]) are read only as far as translation needs and accept
//! unknown fields, as their API server would.
//!
//! An object that cannot be read, or that translation cannot use, is a [`Rejection`]: where
//! it came from, which object, which field, and why, in one log line.

// Rejections are built on the error path only, once per bad object: their size (a path,
// an object's name, two strings) does not matter there, and boxing would only make them
// harder to read and build.
#![allow(clippy::result_large_err)]

pub mod dir;
pub mod kube;
pub mod notify;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use dir::Scan;

/// Where the controller's source loop reads the cluster from: a [`dir::DirSource`] or a
/// [`kube::KubeSource`]. The loop runs on a thread of its own and calls, over and over,
/// [`wait`](ObjectSource::wait) then [`scan`](ObjectSource::scan); translation never knows
/// which source it reads.
pub trait ObjectSource: Send {
    /// Blocks the calling thread (never a runtime's) until something may have changed, for
    /// `timeout` at most: the loop also renews certificates between scans.
    fn wait(&mut self, timeout: Duration);

    /// What changed since the last scan (the first one: everything), in the order to
    /// translate it, and the rejections found meanwhile.
    fn scan(&mut self) -> Scan;

    /// Every rejection that holds now, for the status page.
    fn rejected(&self) -> Vec<Rejection>;

    /// Where the current version of `object` is written, when the source knows (a file and
    /// a line): to locate a rejection that translation found in it.
    fn origin(&self, object: &ObjectRef) -> Option<&Origin> {
        let _ = object;
        None
    }
}

/// A directory is read again as soon as inotify reports a change in it, and every `timeout`
/// regardless (see `notify`).
impl ObjectSource for dir::DirSource {
    fn wait(&mut self, timeout: Duration) {
        if !self.wait_for_change(timeout) {
            // Without inotify: poll.
            std::thread::sleep(timeout);
        }
    }

    fn scan(&mut self) -> Scan {
        dir::DirSource::scan(self)
    }

    fn rejected(&self) -> Vec<Rejection> {
        dir::DirSource::rejected(self)
    }

    fn origin(&self, object: &ObjectRef) -> Option<&Origin> {
        dir::DirSource::origin(self, object)
    }
}

/// A cluster object of a kind the controller reads. Boxed: a `Pod` is 2 KiB before any of
/// its strings, and events are moved around in vectors.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Namespace(Box<core::Namespace>),
    Pod(Box<core::Pod>),
    Service(Box<core::Service>),
    AuthorizationPolicy(Box<AuthorizationPolicy>),
    Gateway(Box<Gateway>),
    HttpRoute(Box<HttpRoute>),
}

/// What happened to an object.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The object was created or changed; this is all of it now.
    Applied(Object),
    /// The object is gone.
    Deleted(ObjectRef),
}

/// The kinds of object the controller reads, in the order a source hands them over
/// (namespaces first: their labels decide how the objects in them translate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Namespace,
    Pod,
    Service,
    Gateway,
    AuthorizationPolicy,
    HttpRoute,
}

/// Names an object: its kind, namespace (none for cluster-wide kinds) and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: ObjectKind,
    pub namespace: Option<String>,
    pub name: String,
}

/// One object that could not be read or translated, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Where the object was written, when a source knows (a file and the document in it).
    pub origin: Option<Origin>,
    /// The object, when it could be identified.
    pub object: Option<ObjectRef>,
    /// The field at fault (`spec.ports[1].port`), when there is one.
    pub field: Option<String>,
    /// Why, written for the operator.
    pub reason: String,
}

/// Where in a directory source an object was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// The document's number in the file, counting from 1 (empty documents are not counted);
    /// none when the whole file is meant.
    pub document: Option<usize>,
    /// The line the document (or the error) starts on, counting from 1.
    pub line: Option<usize>,
}

/// `AuthorizationPolicy.security.weft.dev/v1alpha1`: L4 authorization.
///
/// ```yaml
/// apiVersion: security.weft.dev/v1alpha1
/// kind: AuthorizationPolicy
/// metadata: {name: only-web, namespace: shop}
/// spec:
///   selector: {matchLabels: {app: api}}   # optional: without it, the whole namespace
///   action: ALLOW                          # or DENY
///   rules:
///     - from: [{principals: ["spiffe://cluster.local/ns/shop/sa/web"], namespaces: [shop], ipBlocks: [10.0.0.0/8]}]
///       ports: [8080]
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AuthorizationPolicy {
    pub metadata: ObjectMeta,
    pub spec: AuthorizationPolicySpec,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The workloads the policy governs; none: every workload of its namespace (of the mesh,
    /// in `weft-system`).
    #[serde(default)]
    pub selector: Option<LabelSelector>,
    /// The Services whose waypoint enforces the policy, per request (exclusive with
    /// `selector`): kind `Service`, group `""`, in the policy's namespace.
    #[serde(default)]
    pub target_refs: Option<Vec<PolicyTargetRef>>,
    pub action: PolicyAction,
    #[serde(default)]
    pub rules: Vec<PolicyRule>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyTargetRef {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
}

/// Only `matchLabels`: a `matchExpressions` the policy could not honour is refused instead
/// of being read as "everything".
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum PolicyAction {
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
}

/// Matches when one of `from` matches (or `from` is empty) and the destination port is one
/// of `ports` (or `ports` is empty).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyRule {
    #[serde(default)]
    pub from: Vec<PolicySource>,
    #[serde(default)]
    pub ports: Vec<u16>,
    /// What a request does; only a waypoint sees requests (ARCHITECTURE §9.3).
    #[serde(default)]
    pub to: Vec<PolicyTo>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyTo {
    pub operation: PolicyOperation,
}

/// Matches when every field that is set matches; values kept as written (see
/// [`PolicySource`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyOperation {
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
}

/// Matches when every field that is set matches. Values are kept as written: translation
/// parses them, and a value it cannot read makes the policy fail closed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicySource {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
}

/// A Gateway API `Gateway`, as far as the controller reads it: its class. Unknown fields
/// are accepted.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Gateway {
    pub metadata: ObjectMeta,
    pub spec: GatewaySpec,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    pub gateway_class_name: String,
}

/// A Gateway API `HTTPRoute`: what it attaches to, read; the rest of its `spec` carried as
/// written for the waypoint to interpret.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRoute {
    pub metadata: ObjectMeta,
    /// `spec.parentRefs`.
    pub parent_refs: Vec<ParentReference>,
    /// The whole `spec`, as written.
    pub spec: Value,
}

/// One of `spec.parentRefs`. `group` and `kind` default to the Gateway API's defaults
/// (`gateway.networking.k8s.io`, `Gateway`) when absent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentReference {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    pub name: String,
    /// Echoed in the route's status, which names each parent as written.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub section_name: Option<String>,
}

impl ParentReference {
    /// Whether this parent is a core `Service` (a waypoint route), not a Gateway.
    pub fn is_service(&self) -> bool {
        self.kind.as_deref() == Some("Service") && matches!(self.group.as_deref(), Some("") | Some("core"))
    }
}

impl ObjectKind {
    pub const ALL: [ObjectKind; 6] = [
        ObjectKind::Namespace,
        ObjectKind::Pod,
        ObjectKind::Service,
        ObjectKind::Gateway,
        ObjectKind::AuthorizationPolicy,
        ObjectKind::HttpRoute,
    ];

    /// The Kubernetes `kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Namespace => "Namespace",
            ObjectKind::Pod => "Pod",
            ObjectKind::Service => "Service",
            ObjectKind::Gateway => "Gateway",
            ObjectKind::AuthorizationPolicy => "AuthorizationPolicy",
            ObjectKind::HttpRoute => "HTTPRoute",
        }
    }

    /// The API group (`""` for the core group).
    pub fn group(self) -> &'static str {
        match self {
            ObjectKind::Namespace | ObjectKind::Pod | ObjectKind::Service => "",
            ObjectKind::AuthorizationPolicy => "security.weft.dev",
            ObjectKind::Gateway | ObjectKind::HttpRoute => "gateway.networking.k8s.io",
        }
    }

    /// The versions read. The Gateway API serves `v1beta1` with the same schema as `v1`.
    pub fn versions(self) -> &'static [&'static str] {
        match self {
            ObjectKind::Namespace | ObjectKind::Pod | ObjectKind::Service => &["v1"],
            ObjectKind::AuthorizationPolicy => &["v1alpha1"],
            ObjectKind::Gateway | ObjectKind::HttpRoute => &["v1", "v1beta1"],
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn is_namespaced(self) -> bool {
        self != ObjectKind::Namespace
    }

    /// The kind an object's `apiVersion` and `kind` name. `Ok(None)`: a kind the controller
    /// does not read (a Deployment, or Istio's `AuthorizationPolicy` of another group). An
    /// error: a kind it reads at a version it does not, which would otherwise be dropped
    /// without a word.
    pub fn of(api_version: &str, kind: &str) -> Result<Option<ObjectKind>, UnreadVersion> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let Some(known) = ObjectKind::ALL.into_iter().find(|k| k.as_str() == kind && k.group() == group) else {
            return Ok(None);
        };
        if known.versions().contains(&version) {
            Ok(Some(known))
        } else {
            Err(UnreadVersion { kind: known, api_version: api_version.to_owned() })
        }
    }

    fn api_version(self, version: &str) -> String {
        match self.group() {
            "" => version.to_owned(),
            group => format!("{group}/{version}"),
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A kind the controller reads, written with an `apiVersion` it does not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} of apiVersion {api_version:?} is not read; use {}", self.readable())]
pub struct UnreadVersion {
    pub kind: ObjectKind,
    pub api_version: String,
}

impl UnreadVersion {
    fn readable(&self) -> String {
        let read: Vec<String> = self.kind.versions().iter().map(|v| self.kind.api_version(v)).collect();
        read.join(" or ")
    }
}

impl ObjectRef {
    pub fn new(kind: ObjectKind, namespace: Option<&str>, name: &str) -> ObjectRef {
        ObjectRef { kind, namespace: namespace.map(str::to_owned), name: name.to_owned() }
    }

    /// `<namespace>/<name>`, or the name of a cluster-wide object: the model's key for it.
    pub fn qualified_name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.qualified_name())
    }
}

impl Object {
    pub fn kind(&self) -> ObjectKind {
        match self {
            Object::Namespace(_) => ObjectKind::Namespace,
            Object::Pod(_) => ObjectKind::Pod,
            Object::Service(_) => ObjectKind::Service,
            Object::AuthorizationPolicy(_) => ObjectKind::AuthorizationPolicy,
            Object::Gateway(_) => ObjectKind::Gateway,
            Object::HttpRoute(_) => ObjectKind::HttpRoute,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::AuthorizationPolicy(o) => &o.metadata,
            Object::Gateway(o) => &o.metadata,
            Object::HttpRoute(o) => &o.metadata,
        }
    }

    /// The object's name. Sources hand over only objects with a name (the API server
    /// requires one; [`Object::from_value`] refuses objects without); an empty name stands
    /// for a missing one, and translation refuses it.
    pub fn object_ref(&self) -> ObjectRef {
        let meta = self.metadata();
        let kind = self.kind();
        ObjectRef {
            kind,
            namespace: if kind.is_namespaced() { meta.namespace.clone() } else { None },
            name: meta.name.clone().unwrap_or_default(),
        }
    }

    /// Reads one object from its JSON form (`apiVersion`, `kind`, `metadata`, ...).
    /// `Ok(None)`: a kind the controller does not read. A namespaced object written without
    /// `metadata.namespace` is put in `default`, as `kubectl apply` does.
    ///
    /// A refusal names the object when its `kind` and `metadata.name` could be read, and the
    /// field at fault when there is one; its origin is left for the source to fill in.
    pub fn from_value(mut value: Value) -> Result<Option<Object>, Rejection> {
        let Some(fields) = value.as_object_mut() else {
            return Err(Rejection::new("not an object: a Kubernetes object is a mapping with apiVersion and kind"));
        };
        let text = |key: &str| fields.get(key).and_then(Value::as_str).map(str::to_owned);
        let (Some(api_version), Some(kind_name)) = (text("apiVersion"), text("kind")) else {
            let missing = if fields.get("kind").and_then(Value::as_str).is_none() { "kind" } else { "apiVersion" };
            return Err(Rejection::new(format!("{missing} is missing or not a string")).at(missing));
        };
        let (kind, unread) = match ObjectKind::of(&api_version, &kind_name) {
            Ok(Some(kind)) => (kind, None),
            Ok(None) => return Ok(None),
            Err(unread) => (unread.kind, Some(unread)),
        };

        let meta = fields.get_mut("metadata").and_then(Value::as_object_mut);
        let name = meta.as_ref().and_then(|m| m.get("name")).and_then(Value::as_str).map(str::to_owned);
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            let why = unread.map_or_else(|| format!("a {kind} needs a name"), |u| u.to_string());
            return Err(Rejection::new(why).at("metadata.name"));
        };
        let namespace = match meta {
            Some(meta) if kind.is_namespaced() => {
                let ns = meta.entry("namespace").or_insert_with(|| Value::String("default".to_owned()));
                Some(ns.as_str().unwrap_or_default().to_owned())
            }
            _ => None,
        };
        let object = ObjectRef { kind, namespace, name };
        if let Some(unread) = unread {
            return Err(Rejection::new(unread.to_string()).about(object).at("apiVersion"));
        }
        let refuse =
            |e: Unreadable| Rejection { origin: None, object: Some(object.clone()), field: e.field, reason: e.reason };

        let decoded = match kind {
            ObjectKind::Namespace => decode(value).map(Object::Namespace),
            ObjectKind::Pod => decode(value).map(Object::Pod),
            ObjectKind::Service => decode(value).map(Object::Service),
            ObjectKind::AuthorizationPolicy => decode(value).map(Object::AuthorizationPolicy),
            ObjectKind::Gateway => decode(value).map(Object::Gateway),
            ObjectKind::HttpRoute => HttpRoute::from_value(value).map(Box::new).map(Object::HttpRoute),
        };
        decoded.map(Some).map_err(refuse)
    }
}

impl HttpRoute {
    fn from_value(value: Value) -> Result<HttpRoute, Unreadable> {
        #[derive(Deserialize)]
        struct Route {
            metadata: ObjectMeta,
            #[serde(default)]
            spec: Value,
        }
        let route: Route = decode(value)?;
        let parent_refs = match route.spec.get("parentRefs") {
            None | Some(Value::Null) => Vec::new(),
            Some(refs) => decode(refs.clone()).map_err(|e| Unreadable {
                field: Some(e.field.map_or_else(|| "spec.parentRefs".to_owned(), |f| format!("spec.parentRefs{f}"))),
                reason: e.reason,
            })?,
        };
        Ok(HttpRoute { metadata: route.metadata, parent_refs, spec: route.spec })
    }
}

/// Why a value did not decode as its type.
struct Unreadable {
    /// The field path (`spec.ports[1].port`), or none when the object itself is at fault.
    field: Option<String>,
    reason: String,
}

/// Decodes `value` as a `T`. Paths of sequences read `[1]`, not `.1`.
fn decode<T: DeserializeOwned>(value: Value) -> Result<T, Unreadable> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut path = String::new();
        for segment in e.path().iter() {
            match segment {
                serde_path_to_error::Segment::Seq { index } => path.push_str(&format!("[{index}]")),
                serde_path_to_error::Segment::Map { key } => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                }
                serde_path_to_error::Segment::Enum { variant } => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(variant);
                }
                serde_path_to_error::Segment::Unknown => {}
            }
        }
        Unreadable { field: (!path.is_empty()).then_some(path), reason: e.into_inner().to_string() }
    })
}

impl Rejection {
    /// A rejection that says only why; see [`Rejection::about`], [`Rejection::at`] and
    /// [`Rejection::with_origin`] for the rest.
    pub fn new(reason: impl Into<String>) -> Rejection {
        Rejection { origin: None, object: None, field: None, reason: reason.into() }
    }

    /// The object this rejection is about.
    pub fn about(mut self, object: ObjectRef) -> Rejection {
        self.object = Some(object);
        self
    }

    /// The field at fault.
    pub fn at(mut self, field: impl Into<String>) -> Rejection {
        self.field = Some(field.into());
        self
    }

    /// Where the object was written.
    pub fn with_origin(mut self, origin: Origin) -> Rejection {
        self.origin = Some(origin);
        self
    }
}

/// `Service shop/api in cluster/shop.yaml:14 (document 3): spec.ports[1].port: port 0 is not a port`
impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.object, &self.origin) {
            (Some(object), Some(origin)) => write!(f, "{object} in {origin}: ")?,
            (Some(object), None) => write!(f, "{object}: ")?,
            (None, Some(origin)) => write!(f, "{origin}: ")?,
            (None, None) => {}
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.reason)
    }
}

impl std::error::Error for Rejection {}

/// `path:line (document n)`, the form editors and terminals jump to.
impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(document) = self.document {
            write!(f, " (document {document})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rejected(value: Value) -> Rejection {
        match Object::from_value(value) {
            Err(r) => r,
            Ok(o) => panic!("expected a rejection, read {o:?}"),
        }
    }

    #[test]
    fn kinds_are_known_by_group_and_version() {
        assert_eq!(ObjectKind::of("v1", "Pod"), Ok(Some(ObjectKind::Pod)));
        assert_eq!(ObjectKind::of("gateway.networking.k8s.io/v1beta1", "HTTPRoute"), Ok(Some(ObjectKind::HttpRoute)));
        assert_eq!(ObjectKind::of("apps/v1", "Deployment"), Ok(None));
        // Istio's policy of the same kind name belongs to another group: not ours to read.
        assert_eq!(ObjectKind::of("security.istio.io/v1", "AuthorizationPolicy"), Ok(None));
        let err = ObjectKind::of("security.weft.dev/v1", "AuthorizationPolicy").unwrap_err();
        assert_eq!(
            err.to_string(),
            "AuthorizationPolicy of apiVersion \"security.weft.dev/v1\" is not read; use security.weft.dev/v1alpha1"
        );
        assert!(ObjectKind::of("v2", "Service").is_err());
    }

    #[test]
    fn objects_decode_into_their_types_with_the_default_namespace() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-0"},
                         "spec": {"containers": [{"name": "app", "image": "x"}], "nodeName": "node-1"}});
        let Some(Object::Pod(pod)) = Object::from_value(pod).unwrap() else { panic!("not a pod") };
        assert_eq!(pod.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(pod.spec.and_then(|s| s.node_name).as_deref(), Some("node-1"));

        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}});
        let ns = Object::from_value(ns).unwrap().unwrap();
        assert_eq!(ns.object_ref(), ObjectRef::new(ObjectKind::Namespace, None, "shop"));
        assert_eq!(ns.object_ref().to_string(), "Namespace shop");
    }

    #[test]
    fn refusals_name_the_object_and_the_field() {
        let r =
            rejected(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", "namespace": "shop"},
                                "spec": {"ports": [{"port": 80}, {"port": "eighty"}]}}));
        assert_eq!(r.object, Some(ObjectRef::new(ObjectKind::Service, Some("shop"), "api")));
        assert_eq!(r.field.as_deref(), Some("spec.ports[1].port"));
        assert!(r.to_string().starts_with("Service shop/api: spec.ports[1].port: invalid type"), "{r}");

        let r = rejected(json!({"apiVersion": "security.weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
                                "metadata": {"name": "p", "namespace": "shop"},
                                "spec": {"action": "ALLOW", "rules": [{"form": []}]}}));
        assert_eq!(r.field.as_deref(), Some("spec.rules[0].form"), "{r}");
        assert!(r.reason.contains("unknown field `form`"), "{r}");

        let r = rejected(json!({"apiVersion": "security.weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
                                "metadata": {"name": "p", "namespace": "shop"},
                                "spec": {"action": "ALLOW", "selector": {"matchExpressions": []}}}));
        assert!(r.reason.contains("unknown field `matchExpressions`"), "{r}");

        let r = rejected(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "shop"}}));
        assert_eq!((r.object, r.field.as_deref()), (None, Some("metadata.name")));

        let r = rejected(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                                "metadata": {"name": "r", "namespace": "shop"}, "spec": {"parentRefs": [{"kind": "Service"}]}}));
        assert_eq!(r.field.as_deref(), Some("spec.parentRefs[0]"), "{r}");
        assert!(r.reason.contains("missing field `name`"), "{r}");
    }

    #[test]
    fn gateway_api_objects_accept_unknown_fields() {
        let gw = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                        "metadata": {"name": "wp", "namespace": "shop"},
                        "spec": {"gatewayClassName": "weft-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
                        "status": {"addresses": []}});
        let Some(Object::Gateway(gw)) = Object::from_value(gw).unwrap() else { panic!("not a gateway") };
        assert_eq!(gw.spec.gateway_class_name, "weft-waypoint");

        let route = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                           "metadata": {"name": "r", "namespace": "shop"},
                           "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "api", "port": 80}],
                                    "rules": [{"backendRefs": [{"name": "api-v1", "weight": 90}]}]}});
        let Some(Object::HttpRoute(route)) = Object::from_value(route).unwrap() else { panic!("not a route") };
        assert!(route.parent_refs[0].is_service());
        assert_eq!(route.spec["rules"][0]["backendRefs"][0]["weight"], 90);
    }

    #[test]
    fn a_rejection_reads_as_one_log_line() {
        let r = Rejection::new("port 0 is not a port")
            .about(ObjectRef::new(ObjectKind::Service, Some("shop"), "api"))
            .at("spec.ports[1].port")
            .with_origin(Origin { file: "cluster/shop.yaml".into(), document: Some(3), line: Some(14) });
        assert_eq!(
            r.to_string(),
            "Service shop/api in cluster/shop.yaml:14 (document 3): spec.ports[1].port: port 0 is not a port"
        );
        let r =
            Rejection::new("invalid YAML").with_origin(Origin { file: "a.yaml".into(), document: None, line: None });
        assert_eq!(r.to_string(), "a.yaml: invalid YAML");
    }
}
