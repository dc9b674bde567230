//! Waypoint deployment, on Kubernetes: for each Gateway of class `weft-waypoint` the
//! controller runs its waypoint, as Istio's istiod does for its own waypoints.
//!
//! ```text
//!  source loop (its thread)                       deployer task (tokio)                 API server
//!  scan ─► Gateway events ─► Deployer::observe ──► per namespace: what to deploy, when ──PATCH, apply──►
//!  CA reloaded ─► Deployer::trust_bundle ────────►  (a change: now; a failure: backoff;   ServiceAccount <gw>
//!  /status ◄── Deployer::problems ◄───────────────   success: again in 5 min)             ConfigMap weft-ca-root
//!                                                                                         Deployment <gw>
//! ```
//!
//! In the Gateway's namespace, three objects, each **server-side applied** with the field
//! manager `weft-controller` and `force` (the controller's fields win over another manager's)
//! and owned by the Gateway (an `ownerReference`):
//!
//! - the ServiceAccount `<gateway>`, whose identity the waypoint proves
//!   (`spiffe://<trust domain>/ns/<namespace>/sa/<gateway>`);
//! - the ConfigMap `weft-ca-root`, `root-cert.pem`: the mesh's trust bundle, which the
//!   controller's certificate chains to (the waypoint's `--controller-ca`). A pod mounts
//!   ConfigMaps of its own namespace only, so each namespace with a waypoint gets one, as Istio
//!   writes `istio-ca-root-cert` into every namespace. It is shared by the namespace's
//!   waypoints and owned by all of them, so it goes when the last of them goes. Rewritten
//!   whenever the bundle changes (a root rotation; the waypoint also trusts the bundle the
//!   model carries once connected);
//! - the Deployment `<gateway>` ([`deployment`]): pods labelled
//!   `gateway.networking.k8s.io/gateway-name: <gateway>`, running as that ServiceAccount,
//!   with a projected token for the audience `weft-controller` as their credential.
//!
//! **Applying is idempotent**: the same objects applied again by the same manager change
//! nothing (not even a `resourceVersion`). Only the elected leader applies
//! ([`crate::leader`]); a new leader applies every namespace at once. Each namespace is applied
//! again every 5 minutes ([`RESYNC`]), which puts back an object deleted or edited by hand
//! (the controller does not watch the objects it writes: that would need cluster-wide `list`
//! on Deployments, which its RBAC grants only per namespace).
//!
//! **Nothing is deleted by the controller.** A deleted Gateway's objects are deleted by the
//! API server's garbage collector, through their owner reference. A Gateway whose class
//! changes away from `weft-waypoint` keeps its objects until it is deleted: another
//! implementation (Istio's waypoint class) deploys a Deployment of the same name, and
//! deleting it would take that one down; the controller stops publishing the waypoint and
//! forgets the objects.
//!
//! A Gateway in `weft-system`, one without a uid, or one whose name is longer than a label
//! value (63 characters) is not deployed, and listed in `/status` with the reason.
//!
//! **Failures** (the namespace lacks the RoleBinding that lets the controller deploy there:
//! `403`; the API server unreachable; an object it refuses) are logged with what to do,
//! listed in `/status` as problems of the Gateway, and retried with backoff (1 s, doubling to
//! 30 s). They never stop the controller or the other namespaces.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, HTTPGetAction, KeyToPath,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile,
    SecurityContext, ServiceAccount, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::WaypointSettings;
use crate::leader::Leading;
use crate::source::{Event, Gateway, Object, ObjectKind, ObjectRef, Rejection};
use crate::tokenreview::{AUDIENCE, ZTUNNEL_NAMESPACE};
use crate::translate::{GATEWAY_NAME_LABEL, MESH_LABEL, WAYPOINT_CLASS};

/// The field manager of every object the controller applies.
pub const FIELD_MANAGER: &str = "weft-controller";

/// The ConfigMap holding the mesh's trust bundle, in each namespace with a waypoint (and, made
/// by the operator, in `weft-system` for ztunnel).
pub const CA_ROOT_CONFIG_MAP: &str = "weft-ca-root";

/// The key of the trust bundle in [`CA_ROOT_CONFIG_MAP`].
pub const CA_ROOT_KEY: &str = "root-cert.pem";

/// The API version owner references name Gateways with: the one the controller watches.
const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";

/// `app.kubernetes.io/managed-by` on every object applied: `kubectl get -l` finds them.
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "weft-controller");

/// Where the waypoint's container finds its credential and the controller's CA.
const TOKEN_DIR: &str = "/var/run/secrets/weft";
const CA_DIR: &str = "/etc/weft/ca";

/// The projected token's lifetime: 12 h, as ztunnel's. The kubelet renews it at 80 %, and the
/// waypoint reads the file again for each request to the controller.
const TOKEN_EXPIRATION_SECONDS: i64 = 12 * 3600;

/// Longer than the waypoint's `--drain-deadline` (20 s), so requests in flight finish before
/// SIGKILL.
const TERMINATION_GRACE_SECONDS: i64 = 30;

/// The unprivileged user of the distroless image (`docker/waypoint.Dockerfile`).
const WAYPOINT_USER: i64 = 65532;

/// How long one apply may take, the client's retries of `429`/`503` included: a slow API
/// server delays this namespace's next attempt, not the controller.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a deployed namespace is applied again: an object deleted or edited by hand is
/// back within 5 minutes, for three small requests per waypoint (a no-op apply does not even
/// write).
pub const RESYNC: Duration = Duration::from_secs(300);

/// The first retry after a failure: a conflict or a restarting API server is usually gone.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);

/// The longest wait between retries, as the source's watchers: a missing RoleBinding is
/// noticed within 30 s of being added, for two requests a minute meanwhile.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The longest Gateway name that can be deployed: it is the value of the pods' label
/// `gateway.networking.k8s.io/gateway-name`, and label values are at most 63 characters.
const MAX_NAME: usize = 63;

/// A waypoint to deploy: what its Gateway says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waypoint {
    pub namespace: String,
    /// The Gateway's name: also its ServiceAccount's and Deployment's.
    pub name: String,
    /// The Gateway's uid, which the objects' owner references name.
    pub uid: String,
}

impl Waypoint {
    /// The waypoint a Gateway of class `weft-waypoint` asks for, or why it cannot be deployed.
    pub fn from_gateway(gateway: &Gateway) -> Result<Waypoint, String> {
        let meta = &gateway.metadata;
        let (Some(namespace), Some(name)) = (meta.namespace.clone(), meta.name.clone()) else {
            return Err("it has no namespace or no name".to_owned());
        };
        if namespace == ZTUNNEL_NAMESPACE {
            // Its weft-ca-root is ztunnel's, made by the operator: owned by a Gateway, it would
            // be garbage-collected with it.
            return Err(format!(
                "waypoints are not deployed in {ZTUNNEL_NAMESPACE}, whose ConfigMap {CA_ROOT_CONFIG_MAP} is ztunnel's; \
                 put the Gateway in the namespace of the services it serves"
            ));
        }
        if name.len() > MAX_NAME {
            return Err(format!(
                "its name is {} characters long; a waypoint's Gateway name is at most {MAX_NAME}: it is the value \
                 of the label {GATEWAY_NAME_LABEL} on the waypoint's pods",
                name.len()
            ));
        }
        let Some(uid) = meta.uid.clone().filter(|u| !u.is_empty()) else {
            return Err("it has no metadata.uid for the waypoint's objects to be owned by".to_owned());
        };
        Ok(Waypoint { namespace, name, uid })
    }

    fn gateway(&self) -> ObjectRef {
        ObjectRef::new(ObjectKind::Gateway, Some(&self.namespace), &self.name)
    }
}

/// The ServiceAccount `<gateway>`, owned by the Gateway.
pub fn service_account(waypoint: &Waypoint) -> ServiceAccount {
    ServiceAccount {
        metadata: metadata(&waypoint.namespace, &waypoint.name, Some(&waypoint.name), &[waypoint]),
        ..ServiceAccount::default()
    }
}

/// The ConfigMap `weft-ca-root` of a namespace: the trust bundle's roots (PEM), owned by every
/// waypoint Gateway of the namespace (`owners`).
pub fn ca_root(namespace: &str, owners: &[&Waypoint], roots_pem: &str) -> ConfigMap {
    ConfigMap {
        metadata: metadata(namespace, CA_ROOT_CONFIG_MAP, None, owners),
        data: Some(BTreeMap::from([(CA_ROOT_KEY.to_owned(), roots_pem.to_owned())])),
        ..ConfigMap::default()
    }
}

/// The Deployment `<gateway>`: one waypoint pod (scale it with `kubectl scale` or an HPA: the
/// controller does not set `replicas`, so it never takes them back), non-root, read-only,
/// without capabilities.
pub fn deployment(waypoint: &Waypoint, settings: &WaypointSettings) -> Deployment {
    let (namespace, name) = (&waypoint.namespace, &waypoint.name);
    let selector = BTreeMap::from([(GATEWAY_NAME_LABEL.to_owned(), name.clone())]);
    let pod_labels = BTreeMap::from([
        (GATEWAY_NAME_LABEL.to_owned(), name.clone()),
        // Never captured, whatever its namespace says: it terminates HBONE itself, and
        // translation leaves it out only while its Gateway is of the waypoint class.
        (MESH_LABEL.to_owned(), "disabled".to_owned()),
    ]);
    let annotations = BTreeMap::from([
        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
        ("prometheus.io/port".to_owned(), "15020".to_owned()),
        ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
    ]);
    let port = |name: &str, number: i32| ContainerPort {
        name: Some(name.to_owned()),
        container_port: number,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    };
    let quantities = |pairs: &[(&str, &str)]| {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned()))).collect::<BTreeMap<_, _>>()
    };
    let container = Container {
        name: "waypoint".to_owned(),
        image: Some(settings.image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        args: Some(vec![
            format!("--controller={}", settings.controller_address),
            format!("--controller-ca={CA_DIR}/{CA_ROOT_KEY}"),
            format!("--token-file={TOKEN_DIR}/token"),
            format!("--namespace={namespace}"),
            format!("--name={name}"),
        ]),
        ports: Some(vec![port("hbone", 15008), port("http-monitoring", 15020), port("http-health", 15021)]),
        // Ready from its first certificate until it drains (SIGTERM).
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz/ready".to_owned()),
                port: IntOrString::Int(15021),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(5),
            failure_threshold: Some(3),
            ..Probe::default()
        }),
        // Requests: a waypoint holds the mesh's model, as a ztunnel does (under 8 MiB idle),
        // plus up to 64 KiB of retry buffer per request in flight. Memory limit: generous; a
        // waypoint killed for memory fails every request through it. No CPU limit:
        // throttling adds latency to every request.
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&[("cpu", "100m"), ("memory", "64Mi")])),
            limits: Some(quantities(&[("memory", "512Mi")])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_owned()]), ..Capabilities::default() }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "weft-token".to_owned(),
                mount_path: TOKEN_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "weft-ca".to_owned(),
                mount_path: CA_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    let volumes = vec![
        // Its credential: a token of its ServiceAccount for the controller's audience only,
        // bound to the pod and rotated by the kubelet. The controller checks it with a
        // TokenReview.
        Volume {
            name: "weft-token".to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(AUDIENCE.to_owned()),
                        expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
                        path: "token".to_owned(),
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "weft-ca".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: CA_ROOT_CONFIG_MAP.to_owned(),
                items: Some(vec![KeyToPath {
                    key: CA_ROOT_KEY.to_owned(),
                    path: CA_ROOT_KEY.to_owned(),
                    ..KeyToPath::default()
                }]),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    Deployment {
        metadata: metadata(namespace, name, Some(name), &[waypoint]),
        spec: Some(DeploymentSpec {
            selector: LabelSelector { match_labels: Some(selector), ..LabelSelector::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(name.clone()),
                    // It never calls the API server: its only token is the projected one.
                    automount_service_account_token: Some(false),
                    // Services' environment variables could collide with its WEFT_ settings.
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        // At pod level, so the kubelet gives this user the projected token.
                        run_as_user: Some(WAYPOINT_USER),
                        run_as_group: Some(WAYPOINT_USER),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_owned(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// The metadata of an applied object: its name, labels (the waypoint's name when it belongs
/// to one), and one owner reference per Gateway.
fn metadata(namespace: &str, name: &str, gateway: Option<&str>, owners: &[&Waypoint]) -> ObjectMeta {
    let mut labels = BTreeMap::from([(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned())]);
    if let Some(gateway) = gateway {
        labels.insert(GATEWAY_NAME_LABEL.to_owned(), gateway.to_owned());
    }
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels),
        // Neither `controller` nor `blockOwnerDeletion` (which would need the right to update
        // the Gateway's finalizers): as Istio's, enough for the garbage collector.
        owner_references: Some(
            owners
                .iter()
                .map(|w| OwnerReference {
                    api_version: GATEWAY_API_VERSION.to_owned(),
                    kind: "Gateway".to_owned(),
                    name: w.name.clone(),
                    uid: w.uid.clone(),
                    ..OwnerReference::default()
                })
                .collect(),
        ),
        ..ObjectMeta::default()
    }
}

/// Why an object could not be applied.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeployError {
    #[error("the API server refused to apply {object} ({code} {reason}): {message}")]
    Refused { object: String, code: u16, reason: String, message: String },
    #[error("applying {object} got no answer from the API server within {timeout:?}")]
    Timeout { object: String, timeout: Duration },
    /// No answer: the connection failed, or the answer could not be read. The client's
    /// error, as text (it is not `Clone`, and a namespace's failure is reported for each of
    /// its waypoints).
    #[error("applying {object} failed: {error}")]
    Failed { object: String, error: String },
}

impl DeployError {
    /// The API server's status code, when it answered.
    pub fn code(&self) -> Option<u16> {
        match self {
            DeployError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The controller may not write there: its RBAC, not the object, is at fault.
    pub fn is_forbidden(&self) -> bool {
        self.code() == Some(403)
    }

    /// What the operator can do about it.
    pub fn hint(&self, namespace: &str) -> String {
        match self.code() {
            Some(403) => format!(
                "let the controller deploy waypoints in {namespace}: bind the ClusterRole weft-waypoint-deployer to \
                 the ServiceAccount weft-system/weft-controller with a RoleBinding in {namespace} (as \
                 manifests/examples/rbac.yaml does)"
            ),
            Some(401) => "the API server refused the controller's credentials".to_owned(),
            Some(404) => format!("is the namespace {namespace} being deleted?"),
            Some(409) => "another writer conflicts; applied again with force at the next attempt".to_owned(),
            Some(400 | 422) => "the API server refuses the object as written (its message names the field); \
                                an object of that name made by someone else with another selector cannot be \
                                taken over: delete it"
                .to_owned(),
            Some(_) => "the API server failed; retrying".to_owned(),
            None => "is the API server reachable?".to_owned(),
        }
    }
}

/// The waypoints to deploy, handed to the deployer task.
#[derive(Debug)]
enum Update {
    /// A Gateway of the waypoint class, and the waypoint it asks for (or why it cannot be
    /// deployed).
    Want(ObjectRef, Result<Waypoint, String>),
    /// A Gateway deleted, or no longer of the waypoint class.
    Forget(ObjectRef),
    /// The trust bundle's roots, PEM.
    Roots(String),
}

/// What became of a Gateway's waypoint, for its status conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Its objects were all applied at the last attempt.
    Deployed,
    /// It cannot be deployed as written: why.
    Invalid(String),
    /// The last attempt failed and is retried: what happened and what to do.
    Failing(String),
}

/// Deploys the waypoints of the Gateways it is told about, on a task of its own, while this
/// replica leads; stops when dropped.
pub struct Deployer {
    updates: mpsc::UnboundedSender<Update>,
    outcomes: watch::Receiver<BTreeMap<ObjectRef, Outcome>>,
    task: JoinHandle<()>,
}

impl Deployer {
    /// Starts the deployer on the current tokio runtime. It applies nothing until it has the
    /// trust bundle ([`trust_bundle`](Self::trust_bundle)), and nothing while `leading` says
    /// another replica leads.
    pub fn start(client: Client, settings: WaypointSettings, leading: Leading) -> Deployer {
        Deployer::with_backoff(client, settings, leading, BACKOFF_MIN, BACKOFF_MAX)
    }

    /// As [`start`](Self::start), retrying failures after `min`, doubling up to `max`.
    pub fn with_backoff(
        client: Client,
        settings: WaypointSettings,
        leading: Leading,
        min: Duration,
        max: Duration,
    ) -> Deployer {
        let (updates, receiver) = mpsc::unbounded_channel();
        let (outcomes_tx, outcomes) = watch::channel(BTreeMap::new());
        let task = Task {
            client,
            settings,
            roots: None,
            namespaces: BTreeMap::new(),
            outcomes: outcomes_tx,
            backoff: (min, max.max(min)),
        };
        Deployer { updates, outcomes, task: tokio::spawn(task.run(receiver, leading)) }
    }

    /// What became of each waypoint Gateway this replica deployed or could not deploy, as it
    /// changes (empty while another replica leads).
    pub fn outcomes(&self) -> watch::Receiver<BTreeMap<ObjectRef, Outcome>> {
        self.outcomes.clone()
    }

    /// Takes the Gateways among a scan's events. Never blocks: called from the source loop.
    pub fn observe(&self, events: &[Event]) {
        for event in events {
            let update = match event {
                Event::Applied(Object::Gateway(gateway)) => {
                    let meta = &gateway.metadata;
                    let gateway_ref = ObjectRef::new(
                        ObjectKind::Gateway,
                        meta.namespace.as_deref(),
                        meta.name.as_deref().unwrap_or_default(),
                    );
                    if gateway.spec.gateway_class_name == WAYPOINT_CLASS {
                        Update::Want(gateway_ref, Waypoint::from_gateway(gateway))
                    } else {
                        Update::Forget(gateway_ref)
                    }
                }
                Event::Deleted(object) if object.kind == ObjectKind::Gateway => Update::Forget(object.clone()),
                _ => continue,
            };
            // The task ends only when the deployer is dropped.
            let _ = self.updates.send(update);
        }
    }

    /// The mesh's trust bundle changed (or is first known): every namespace's ConfigMap is
    /// applied again.
    pub fn trust_bundle(&self, roots: &[String]) {
        let _ = self.updates.send(Update::Roots(roots.concat()));
    }

    /// Gateways whose waypoint is not deployed, and why: for `/status`.
    pub fn problems(&self) -> Vec<Rejection> {
        let outcomes = self.outcomes.borrow();
        let problem = |(gateway, outcome): (&ObjectRef, &Outcome)| match outcome {
            Outcome::Invalid(why) | Outcome::Failing(why) => {
                Some(Rejection::new(format!("its waypoint is not deployed: {why}")).about(gateway.clone()))
            }
            Outcome::Deployed => None,
        };
        outcomes.iter().filter_map(problem).collect()
    }
}

impl Drop for Deployer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl fmt::Debug for Deployer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deployer").finish_non_exhaustive()
    }
}

/// The deployer task's state.
struct Task {
    client: Client,
    settings: WaypointSettings,
    /// The trust bundle, once known.
    roots: Option<String>,
    namespaces: BTreeMap<String, Namespace>,
    outcomes: watch::Sender<BTreeMap<ObjectRef, Outcome>>,
    backoff: (Duration, Duration),
}

/// A namespace's waypoints and when to apply them next.
#[derive(Default)]
struct Namespace {
    /// By Gateway name: the waypoint, or why it cannot be deployed.
    gateways: BTreeMap<String, Result<Waypoint, String>>,
    /// Gateways whose objects were all applied at the last attempt (for the log: deployed
    /// once, not at every resync).
    deployed: BTreeSet<String>,
    /// When to apply next: now after a change, after a backoff after a failure, [`RESYNC`]
    /// after a success.
    due: Option<Instant>,
    /// Failed attempts in a row.
    failures: u32,
}

impl Task {
    async fn run(mut self, mut updates: mpsc::UnboundedReceiver<Update>, mut leading: Leading) {
        let mut leader = leading.now();
        loop {
            let next = self
                .roots
                .as_ref()
                .filter(|_| leader)
                .and_then(|_| self.namespaces.values().filter_map(|n| n.due).min());
            tokio::select! {
                update = updates.recv() => {
                    let Some(update) = update else { return };
                    self.take(update);
                    while let Ok(more) = updates.try_recv() {
                        self.take(more);
                    }
                }
                now_leader = leading.changed() => {
                    leader = now_leader;
                    if leader {
                        // Applied at once: the previous leader may have left work undone.
                        let now = Instant::now();
                        for entry in self.namespaces.values_mut() {
                            entry.due = Some(now);
                            entry.failures = 0;
                        }
                    } else {
                        // What the leader reports, not this replica.
                        self.outcomes.send_replace(BTreeMap::new());
                        for entry in self.namespaces.values_mut() {
                            entry.deployed.clear();
                        }
                    }
                }
                () = sleep_until(next) => {}
            }
            if self.roots.is_some() && leader {
                self.apply_due().await;
            }
        }
    }

    fn take(&mut self, update: Update) {
        let now = Instant::now();
        match update {
            Update::Want(gateway, want) => {
                let Some(namespace) = gateway.namespace.clone() else { return };
                let entry = self.namespaces.entry(namespace).or_default();
                if entry.gateways.get(&gateway.name) != Some(&want) {
                    entry.gateways.insert(gateway.name.clone(), want);
                    entry.due = Some(now);
                    entry.failures = 0;
                }
            }
            Update::Forget(gateway) => {
                self.set_outcome(&gateway, None);
                let Some(namespace) = gateway.namespace.as_deref() else { return };
                let Some(entry) = self.namespaces.get_mut(namespace) else { return };
                if entry.gateways.remove(&gateway.name).is_some() {
                    info!(gateway = %gateway.qualified_name(),
                          "no longer a waypoint: its objects are left to the garbage collector (deleted with the Gateway)");
                }
                entry.deployed.remove(&gateway.name);
                if entry.gateways.is_empty() {
                    self.namespaces.remove(namespace);
                } else {
                    // The ConfigMap's owners change.
                    entry.due = Some(now);
                }
            }
            Update::Roots(roots) => {
                if self.roots.as_ref() != Some(&roots) {
                    self.roots = Some(roots);
                    for entry in self.namespaces.values_mut() {
                        entry.due = Some(now);
                    }
                }
            }
        }
    }

    async fn apply_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> =
            self.namespaces.iter().filter(|(_, n)| n.due.is_some_and(|d| d <= now)).map(|(k, _)| k.clone()).collect();
        for namespace in due {
            self.apply_namespace(&namespace).await;
        }
    }

    /// Applies a namespace's ConfigMap, then each waypoint's ServiceAccount and Deployment
    /// (a pod can start only once both exist), and schedules the next attempt.
    async fn apply_namespace(&mut self, namespace: &str) {
        let Some(entry) = self.namespaces.get(namespace) else { return };
        let Some(roots) = self.roots.clone() else { return };
        let mut waypoints = Vec::new();
        for (name, want) in &entry.gateways {
            match want {
                Ok(waypoint) => waypoints.push(waypoint.clone()),
                Err(why) => {
                    let gateway = ObjectRef::new(ObjectKind::Gateway, Some(namespace), name);
                    let problem = format!("its waypoint is not deployed: {why}");
                    if self.set_outcome(&gateway, Some(Outcome::Invalid(why.clone()))) {
                        warn!(gateway = %gateway.qualified_name(), problem, "waypoint not deployed");
                    }
                }
            }
        }

        let mut failed: Vec<(Waypoint, DeployError)> = Vec::new();
        let owners: Vec<&Waypoint> = waypoints.iter().collect();
        let config_map = if owners.is_empty() {
            Ok(())
        } else {
            self.apply(namespace, CA_ROOT_CONFIG_MAP, &ca_root(namespace, &owners, &roots)).await
        };
        match config_map {
            Err(error) => {
                // Without it no waypoint pod of the namespace starts: each is reported.
                for waypoint in &waypoints {
                    failed.push((waypoint.clone(), error.clone()));
                }
            }
            Ok(()) => {
                for waypoint in &waypoints {
                    let mut result = self.apply(namespace, &waypoint.name, &service_account(waypoint)).await;
                    if result.is_ok() {
                        result = self.apply(namespace, &waypoint.name, &deployment(waypoint, &self.settings)).await;
                    }
                    if let Err(error) = result {
                        failed.push((waypoint.clone(), error));
                    }
                }
            }
        }

        let now = Instant::now();
        let (min, max) = self.backoff;
        let Some(entry) = self.namespaces.get_mut(namespace) else { return };
        let delay = if failed.is_empty() {
            entry.failures = 0;
            RESYNC
        } else {
            entry.failures = entry.failures.saturating_add(1);
            backoff(entry.failures, min, max)
        };
        entry.due = Some(now + delay);
        let attempt = entry.failures;
        let failed_names: BTreeSet<&str> = failed.iter().map(|(w, _)| w.name.as_str()).collect();
        let mut deployed = Vec::new();
        for waypoint in &waypoints {
            if failed_names.contains(waypoint.name.as_str()) {
                entry.deployed.remove(&waypoint.name);
            } else {
                // Logged once, not at every resync.
                if entry.deployed.insert(waypoint.name.clone()) {
                    info!(gateway = %waypoint.gateway().qualified_name(),
                          "waypoint deployed (ServiceAccount, ConfigMap weft-ca-root, Deployment)");
                }
                deployed.push(waypoint.gateway());
            }
        }
        for gateway in deployed {
            self.set_outcome(&gateway, Some(Outcome::Deployed));
        }
        for (waypoint, error) in failed {
            let hint = error.hint(namespace);
            warn!(
                gateway = %waypoint.gateway().qualified_name(), %error, hint, retry_in = ?delay, attempt,
                "cannot deploy the waypoint; retrying"
            );
            let problem = format!("{error}; {hint}; retrying in {delay:?} (attempt {attempt})");
            self.set_outcome(&waypoint.gateway(), Some(Outcome::Failing(problem)));
        }
        debug!(namespace, next_in = ?delay, "waypoints applied");
    }

    /// Server-side applies one object, within [`APPLY_TIMEOUT`].
    async fn apply<K>(&self, namespace: &str, name: &str, object: &K) -> Result<(), DeployError>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Serialize
            + fmt::Debug,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        let what = format!("{} {namespace}/{name}", K::kind(&()));
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match tokio::time::timeout(APPLY_TIMEOUT, api.patch(name, &params, &Patch::Apply(object))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(kube::Error::Api(status))) => Err(DeployError::Refused {
                object: what,
                code: status.code,
                reason: status.reason.clone(),
                message: status.message.clone(),
            }),
            Ok(Err(error)) => Err(DeployError::Failed { object: what, error: error.to_string() }),
            Err(_) => Err(DeployError::Timeout { object: what, timeout: APPLY_TIMEOUT }),
        }
    }

    /// Sets or clears (`None`: forgotten) a Gateway's outcome, which its conditions and its
    /// problem in `/status` are made from; true when it changed.
    fn set_outcome(&self, gateway: &ObjectRef, outcome: Option<Outcome>) -> bool {
        self.outcomes.send_if_modified(|all| {
            let before = match &outcome {
                Some(o) => all.insert(gateway.clone(), o.clone()),
                None => all.remove(gateway),
            };
            before != outcome
        })
    }
}

/// The wait before attempt `failures + 1`: `min`, doubled per failure, at most `max`.
pub(crate) fn backoff(failures: u32, min: Duration, max: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    min.saturating_mul(1 << doublings).min(max)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn waypoint(name: &str, uid: &str) -> Waypoint {
        Waypoint { namespace: "shop".into(), name: name.into(), uid: uid.into() }
    }

    fn gateway(name: &str, uid: Option<&str>) -> Gateway {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "uid": uid},
            "spec": {"gatewayClassName": "weft-waypoint"}
        }))
        .unwrap()
    }

    fn settings() -> WaypointSettings {
        WaypointSettings {
            image: "registry.example.com/weft/waypoint:v1".into(),
            controller_address: "weft-controller.weft-system.svc:15012".into(),
        }
    }

    fn owner(name: &str, uid: &str) -> Value {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "name": name, "uid": uid})
    }

    #[test]
    fn the_deployment_runs_the_waypoint_as_its_gateway_with_a_projected_token() {
        let d = serde_json::to_value(deployment(&waypoint("waypoint", "uid-1"), &settings())).unwrap();
        assert_eq!((d["apiVersion"].as_str(), d["kind"].as_str()), (Some("apps/v1"), Some("Deployment")));
        assert_eq!(d["metadata"]["name"], "waypoint");
        assert_eq!(d["metadata"]["namespace"], "shop");
        assert_eq!(d["metadata"]["ownerReferences"], json!([owner("waypoint", "uid-1")]));
        assert_eq!(d["metadata"]["labels"][GATEWAY_NAME_LABEL], "waypoint");
        assert!(d["spec"].get("replicas").is_none(), "replicas are left to whoever scales it");

        let selector = &d["spec"]["selector"]["matchLabels"];
        assert_eq!(selector, &json!({GATEWAY_NAME_LABEL: "waypoint"}));
        let template = &d["spec"]["template"];
        assert_eq!(
            template["metadata"]["labels"],
            json!({GATEWAY_NAME_LABEL: "waypoint", "weft.dev/mesh": "disabled"})
        );

        let pod = &template["spec"];
        assert_eq!(pod["serviceAccountName"], "waypoint");
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["securityContext"]["runAsUser"], 65532);
        assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
        assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap() > 20, "longer than the drain deadline");

        let [c] = pod["containers"].as_array().unwrap().as_slice() else { panic!("one container") };
        assert_eq!(c["image"], "registry.example.com/weft/waypoint:v1");
        assert_eq!(
            c["args"],
            json!([
                "--controller=weft-controller.weft-system.svc:15012",
                "--controller-ca=/etc/weft/ca/root-cert.pem",
                "--token-file=/var/run/secrets/weft/token",
                "--namespace=shop",
                "--name=waypoint",
            ])
        );
        let ports: Vec<(i64, &str)> = c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["containerPort"].as_i64().unwrap(), p["name"].as_str().unwrap()))
            .collect();
        assert_eq!(ports, [(15008, "hbone"), (15020, "http-monitoring"), (15021, "http-health")]);
        assert!(ports.iter().all(|(_, name)| name.len() <= 15), "port names are at most 15 characters");
        assert_eq!(c["readinessProbe"]["httpGet"], json!({"path": "/healthz/ready", "port": 15021}));
        assert_eq!(
            c["securityContext"],
            json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "runAsNonRoot": true,
                   "capabilities": {"drop": ["ALL"]}})
        );
        assert_eq!(c["resources"]["requests"], json!({"cpu": "100m", "memory": "64Mi"}));

        // The files its arguments name are on its volumes.
        let mounts: BTreeMap<&str, &str> = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["name"].as_str().unwrap(), m["mountPath"].as_str().unwrap()))
            .collect();
        assert_eq!(mounts, BTreeMap::from([("weft-token", "/var/run/secrets/weft"), ("weft-ca", "/etc/weft/ca")]));
        let volumes = pod["volumes"].as_array().unwrap();
        let token = volumes.iter().find(|v| v["name"] == "weft-token").unwrap();
        assert_eq!(
            token["projected"]["sources"],
            json!([{"serviceAccountToken": {"audience": "weft-controller", "expirationSeconds": 43200, "path": "token"}}])
        );
        let ca = volumes.iter().find(|v| v["name"] == "weft-ca").unwrap();
        assert_eq!(
            ca["configMap"],
            json!({"name": "weft-ca-root", "items": [{"key": "root-cert.pem", "path": "root-cert.pem"}]})
        );
    }

    #[test]
    fn the_service_account_and_the_ca_root_are_owned_by_their_gateways() {
        let a = waypoint("a", "uid-a");
        let b = waypoint("b", "uid-b");
        let sa = serde_json::to_value(service_account(&a)).unwrap();
        assert_eq!((sa["apiVersion"].as_str(), sa["kind"].as_str()), (Some("v1"), Some("ServiceAccount")));
        assert_eq!((sa["metadata"]["name"].as_str(), sa["metadata"]["namespace"].as_str()), (Some("a"), Some("shop")));
        assert_eq!(sa["metadata"]["ownerReferences"], json!([owner("a", "uid-a")]));
        assert_eq!(sa["metadata"]["labels"][GATEWAY_NAME_LABEL], "a");

        let pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let cm = serde_json::to_value(ca_root("shop", &[&a, &b], pem)).unwrap();
        assert_eq!((cm["apiVersion"].as_str(), cm["kind"].as_str()), (Some("v1"), Some("ConfigMap")));
        assert_eq!(cm["metadata"]["name"], "weft-ca-root");
        assert_eq!(cm["data"], json!({"root-cert.pem": pem}));
        // Shared by the namespace's waypoints: gone with the last of them.
        assert_eq!(cm["metadata"]["ownerReferences"], json!([owner("a", "uid-a"), owner("b", "uid-b")]));
        assert!(cm["metadata"]["labels"].get(GATEWAY_NAME_LABEL).is_none(), "no one waypoint's");
        assert_eq!(cm["metadata"]["labels"]["app.kubernetes.io/managed-by"], "weft-controller");
    }

    #[test]
    fn a_gateway_without_a_uid_with_a_long_name_or_in_weft_system_is_not_deployed() {
        assert_eq!(Waypoint::from_gateway(&gateway("waypoint", Some("u-1"))), Ok(waypoint("waypoint", "u-1")));
        let err = Waypoint::from_gateway(&gateway("waypoint", None)).unwrap_err();
        assert!(err.contains("no metadata.uid"), "{err}");
        let long = "w".repeat(64);
        let err = Waypoint::from_gateway(&gateway(&long, Some("u-1"))).unwrap_err();
        assert!(err.contains("64 characters") && err.contains(GATEWAY_NAME_LABEL), "{err}");
        assert!(Waypoint::from_gateway(&gateway(&"w".repeat(63), Some("u-1"))).is_ok());
        let mut system = gateway("waypoint", Some("u-1"));
        system.metadata.namespace = Some("weft-system".into());
        let err = Waypoint::from_gateway(&system).unwrap_err();
        assert!(err.contains("not deployed in weft-system"), "{err}");
    }

    #[test]
    fn retries_back_off_from_one_second_to_thirty() {
        let waits: Vec<u64> = (1..=8).map(|n| backoff(n, BACKOFF_MIN, BACKOFF_MAX).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(u32::MAX, BACKOFF_MIN, BACKOFF_MAX), BACKOFF_MAX, "no overflow");
    }

    #[test]
    fn a_refusal_says_what_to_do() {
        let refused = |code| DeployError::Refused {
            object: "Deployment shop/waypoint".into(),
            code,
            reason: "Forbidden".into(),
            message: "cannot patch".into(),
        };
        let forbidden = refused(403);
        assert!(forbidden.is_forbidden());
        let hint = forbidden.hint("shop");
        assert!(hint.contains("weft-waypoint-deployer") && hint.contains("RoleBinding in shop"), "{hint}");
        assert_eq!(
            forbidden.to_string(),
            "the API server refused to apply Deployment shop/waypoint (403 Forbidden): cannot patch"
        );
        assert!(!refused(422).is_forbidden());
        assert!(refused(422).hint("shop").contains("names the field"));
        let timeout = DeployError::Timeout { object: "ConfigMap shop/weft-ca-root".into(), timeout: APPLY_TIMEOUT };
        assert_eq!(timeout.code(), None);
        assert!(timeout.hint("shop").contains("reachable"));
    }
}
