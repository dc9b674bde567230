//! Status conditions, on Kubernetes: what the controller made of each object a user wrote,
//! where `kubectl get` and `kubectl wait` look, written by the elected leader only.
//!
//! | object | field | conditions |
//! | --- | --- | --- |
//! | Gateway of class `weft-waypoint` | `status.conditions` | `Accepted`; `Programmed` once its waypoint's objects are applied |
//! | HTTPRoute with Service parents | `status.parents[]`, one per Service parent, `controllerName: weft.dev/waypoint-controller` | `Accepted`, `ResolvedRefs`, and `PartiallyInvalid` when rules were skipped |
//! | AuthorizationPolicy | `status.conditions` | `Accepted` |
//! | GatewayClass `weft-waypoint`, when its `controllerName` is Weft's | `status.conditions` | `Accepted` |
//!
//! The reasons and messages are in [`crate::translate::Translator::statuses`] and
//! [`programmed`]. Writing one object: read it, merge the controller's conditions into its
//! status (another controller's entries and conditions of other types are kept; a condition
//! whose status did not change keeps its `lastTransitionTime`; `observedGeneration` is the
//! generation read), and write only if that changed anything, as a merge patch of the status
//! subresource carrying the `resourceVersion` read (a concurrent write makes it `409`, and it
//! is done again). Failures are retried with backoff (1 s doubling to 30 s); everything is
//! written again every 5 minutes and whenever this replica becomes leader.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::deploy::{BACKOFF_MAX, BACKOFF_MIN, Outcome, backoff};
use crate::leader::Leading;
use crate::source::kube::api_resource;
use crate::source::{ObjectRef, ParentReference};
use crate::translate::WAYPOINT_CLASS;

/// The GatewayClass's `controllerName`: whose entry of an HTTPRoute's `status.parents` is
/// Weft's.
pub const CONTROLLER_NAME: &str = "weft.dev/waypoint-controller";

/// How long one read or write may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How often everything is written again (only what differs is written).
const RESYNC: Duration = Duration::from_secs(300);

/// One condition as the controller means it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub kind: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Condition {
    pub fn new(kind: &'static str, status: bool, reason: &'static str, message: impl Into<String>) -> Condition {
        Condition { kind, status, reason, message: message.into() }
    }
}

/// What the controller writes on one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Desired {
    /// A waypoint Gateway's conditions; `Programmed` is added from the deployer's outcome.
    Gateway(Vec<Condition>),
    /// An HTTPRoute's entries of `status.parents`: each Service parent as written, and its
    /// conditions.
    Route(Vec<(ParentReference, Vec<Condition>)>),
    /// An AuthorizationPolicy's conditions.
    Policy(Vec<Condition>),
}

/// A Gateway's `Programmed` condition from what the deployer did.
pub fn programmed(outcome: Option<&Outcome>) -> Condition {
    match outcome {
        Some(Outcome::Deployed) => Condition::new(
            "Programmed",
            true,
            "Programmed",
            "the waypoint's ServiceAccount, ConfigMap weft-ca-root and Deployment are applied",
        ),
        Some(Outcome::Invalid(why)) => Condition::new("Programmed", false, "Invalid", format!("not deployed: {why}")),
        Some(Outcome::Failing(why)) => {
            Condition::new("Programmed", false, "Pending", format!("not deployed yet: {why}"))
        }
        None => Condition::new("Programmed", false, "Pending", "the waypoint is being deployed"),
    }
}

/// Writes status conditions while this replica leads; stops when dropped.
pub struct StatusWriter {
    desired: watch::Sender<BTreeMap<ObjectRef, Desired>>,
    task: JoinHandle<()>,
}

impl StatusWriter {
    /// Starts the writer on the current runtime; `outcomes` are the deployer's.
    pub fn start(
        client: Client,
        leading: Leading,
        outcomes: watch::Receiver<BTreeMap<ObjectRef, Outcome>>,
    ) -> StatusWriter {
        let (desired, wanted) = watch::channel(BTreeMap::new());
        let task = Task { client, written: BTreeMap::new(), retries: BTreeMap::new(), class_checked: false };
        StatusWriter { desired, task: tokio::spawn(task.run(wanted, outcomes, leading)) }
    }

    /// What the objects' status should say now (from translation). Never blocks.
    pub fn publish(&self, desired: BTreeMap<ObjectRef, Desired>) {
        self.desired.send_if_modified(|current| {
            let changed = *current != desired;
            if changed {
                *current = desired;
            }
            changed
        });
    }
}

impl Drop for StatusWriter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Task {
    client: Client,
    /// What was last written (or found already there), per object.
    written: BTreeMap<ObjectRef, Desired>,
    /// Objects whose last write failed: when to try again, and how many failures in a row.
    retries: BTreeMap<ObjectRef, (Instant, u32)>,
    /// Whether the GatewayClass was written (or found absent, or another's) since this
    /// replica became leader or the last resync.
    class_checked: bool,
}

impl Task {
    async fn run(
        mut self,
        mut wanted: watch::Receiver<BTreeMap<ObjectRef, Desired>>,
        mut outcomes: watch::Receiver<BTreeMap<ObjectRef, Outcome>>,
        mut leading: Leading,
    ) {
        let mut leader = leading.now();
        let mut resync = Instant::now() + RESYNC;
        loop {
            if leader {
                if !self.class_checked {
                    self.class_checked = true;
                    match write_class(&self.client).await {
                        Ok(_) => {}
                        Err(e) if e.gone => {
                            debug!(class = WAYPOINT_CLASS, "no such GatewayClass: nothing to report on")
                        }
                        Err(e) => warn!(class = WAYPOINT_CLASS, error = %e.message,
                                        "cannot write the GatewayClass's status; again in 5 minutes"),
                    }
                }
                let all = complete(&wanted.borrow_and_update(), &outcomes.borrow_and_update());
                self.write_due(all).await;
            }
            let retry = self.retries.values().map(|(at, _)| *at).min();
            let wake = retry.map_or(resync, |r| r.min(resync));
            tokio::select! {
                changed = wanted.changed() => if changed.is_err() { return },
                changed = outcomes.changed() => if changed.is_err() { return },
                now = leading.changed() => {
                    leader = now;
                    // A new leader checks everything: the last one may have left it stale.
                    self.written.clear();
                    self.retries.clear();
                    self.class_checked = false;
                }
                () = tokio::time::sleep_until(wake) => {
                    if Instant::now() >= resync {
                        self.written.clear();
                        self.class_checked = false;
                        resync = Instant::now() + RESYNC;
                    }
                }
            }
        }
    }

    /// Writes every object whose status is not known to be as wanted, and not waiting for a
    /// retry.
    async fn write_due(&mut self, all: BTreeMap<ObjectRef, Desired>) {
        self.written.retain(|r, _| all.contains_key(r));
        self.retries.retain(|r, _| all.contains_key(r));
        let now = Instant::now();
        for (object, desired) in all {
            if self.written.get(&object) == Some(&desired) || self.retries.get(&object).is_some_and(|(at, _)| *at > now)
            {
                continue;
            }
            match write(&self.client, &object, &desired).await {
                Ok(wrote) => {
                    if wrote {
                        debug!(object = %object.qualified_name(), kind = %object.kind, "status written");
                    }
                    self.retries.remove(&object);
                    self.written.insert(object, desired);
                }
                Err(e) if e.gone => {
                    // Deleted meanwhile: its deletion reaches translation soon.
                    self.retries.remove(&object);
                }
                Err(e) => {
                    let failures = self.retries.get(&object).map_or(1, |(_, f)| f.saturating_add(1));
                    let delay = backoff(failures, BACKOFF_MIN, BACKOFF_MAX);
                    if e.conflict {
                        debug!(object = %object.qualified_name(), kind = %object.kind, "status changed while written; again");
                    } else {
                        warn!(object = %object.qualified_name(), kind = %object.kind, error = %e.message,
                              retry_in = ?delay, "cannot write status; retrying");
                    }
                    let delay = if e.conflict { Duration::ZERO } else { delay };
                    self.retries.insert(object, (Instant::now() + delay, failures));
                }
            }
        }
    }
}

/// The translation's wishes with each Gateway's `Programmed` added.
fn complete(
    wanted: &BTreeMap<ObjectRef, Desired>,
    outcomes: &BTreeMap<ObjectRef, Outcome>,
) -> BTreeMap<ObjectRef, Desired> {
    wanted
        .iter()
        .map(|(object, desired)| {
            let desired = match desired {
                Desired::Gateway(conditions) => {
                    let mut conditions = conditions.clone();
                    conditions.push(programmed(outcomes.get(object)));
                    Desired::Gateway(conditions)
                }
                other => other.clone(),
            };
            (object.clone(), desired)
        })
        .collect()
}

/// Why a write did not happen.
#[derive(Debug)]
struct WriteError {
    message: String,
    /// `409`: the object changed between the read and the write.
    conflict: bool,
    /// `404`: the object is gone.
    gone: bool,
}

impl WriteError {
    fn of(error: kube::Error) -> WriteError {
        let code = match &error {
            kube::Error::Api(status) => Some(status.code),
            _ => None,
        };
        WriteError { message: error.to_string(), conflict: code == Some(409), gone: code == Some(404) }
    }

    fn timeout() -> WriteError {
        WriteError { message: format!("no answer within {REQUEST_TIMEOUT:?}"), conflict: false, gone: false }
    }
}

/// Reads `object`, merges `desired` into its status, and writes it if that changed anything;
/// true when it wrote.
async fn write(client: &Client, object: &ObjectRef, desired: &Desired) -> Result<bool, WriteError> {
    let Some(namespace) = object.namespace.as_deref() else { return Ok(false) };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &api_resource(object.kind));
    let current = get(&api, &object.name).await?;
    let what = format!("{} {}", object.kind, object.qualified_name());
    write_to(&api, current, desired, &what).await
}

/// The GatewayClass `weft-waypoint`'s `Accepted`, if the class exists and names this
/// controller; true when it wrote.
async fn write_class(client: &Client) -> Result<bool, WriteError> {
    let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "GatewayClass");
    let api: Api<DynamicObject> =
        Api::all_with(client.clone(), &ApiResource::from_gvk_with_plural(&gvk, "gatewayclasses"));
    let current = get(&api, WAYPOINT_CLASS).await?;
    if current.data["spec"]["controllerName"].as_str() != Some(CONTROLLER_NAME) {
        debug!(class = WAYPOINT_CLASS, "the GatewayClass names another controller: not Weft's to report on");
        return Ok(false);
    }
    let accepted = Condition::new(
        "Accepted",
        true,
        "Accepted",
        "Weft's waypoints: the controller deploys and programs one for each Gateway of this class",
    );
    write_to(&api, current, &Desired::Gateway(vec![accepted]), &format!("GatewayClass {WAYPOINT_CLASS}")).await
}

async fn get(api: &Api<DynamicObject>, name: &str) -> Result<DynamicObject, WriteError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, api.get(name)).await {
        Ok(Ok(current)) => Ok(current),
        Ok(Err(e)) => Err(WriteError::of(e)),
        Err(_) => Err(WriteError::timeout()),
    }
}

/// Merges `desired` into `current`'s status and writes it if that changed anything.
async fn write_to(
    api: &Api<DynamicObject>,
    current: DynamicObject,
    desired: &Desired,
    what: &str,
) -> Result<bool, WriteError> {
    let name = current.metadata.name.clone().unwrap_or_default();
    let generation = current.metadata.generation.unwrap_or(0);
    let status = current.data.get("status").cloned().unwrap_or(Value::Null);
    let now = Timestamp::now();
    let merged = merge(&status, desired, generation, now);
    if merged == status {
        return Ok(false);
    }
    let patch = json!({
        "metadata": {"resourceVersion": current.metadata.resource_version},
        "status": merged,
    });
    match tokio::time::timeout(REQUEST_TIMEOUT, api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)))
        .await
    {
        Ok(Ok(_)) => {
            info!(object = what, summary = %summary(desired), "status written");
            Ok(true)
        }
        Ok(Err(e)) => Err(WriteError::of(e)),
        Err(_) => Err(WriteError::timeout()),
    }
}

/// `status` with the controller's conditions merged in: the whole new status.
fn merge(status: &Value, desired: &Desired, generation: i64, now: Timestamp) -> Value {
    let mut merged = match status {
        Value::Object(_) => status.clone(),
        _ => json!({}),
    };
    match desired {
        Desired::Gateway(conditions) | Desired::Policy(conditions) => {
            merged["conditions"] = merge_conditions(&status["conditions"], conditions, generation, now);
        }
        Desired::Route(parents) => {
            let old = status["parents"].as_array().cloned().unwrap_or_default();
            let mut all: Vec<Value> =
                old.iter().filter(|p| p["controllerName"].as_str() != Some(CONTROLLER_NAME)).cloned().collect();
            for (parent, conditions) in parents {
                let parent_ref = parent_ref(parent);
                let before = old
                    .iter()
                    .find(|p| p["controllerName"].as_str() == Some(CONTROLLER_NAME) && p["parentRef"] == parent_ref)
                    .map_or(Value::Null, |p| p["conditions"].clone());
                all.push(json!({
                    "parentRef": parent_ref,
                    "controllerName": CONTROLLER_NAME,
                    "conditions": merge_conditions(&before, conditions, generation, now),
                }));
            }
            merged["parents"] = Value::Array(all);
        }
    }
    merged
}

/// A parent as the route's `parentRefs` wrote it (the fields the controller reads).
fn parent_ref(parent: &ParentReference) -> Value {
    let mut value = json!({"name": parent.name});
    if let Some(group) = &parent.group {
        value["group"] = json!(group);
    }
    if let Some(kind) = &parent.kind {
        value["kind"] = json!(kind);
    }
    if let Some(namespace) = &parent.namespace {
        value["namespace"] = json!(namespace);
    }
    if let Some(port) = parent.port {
        value["port"] = json!(port);
    }
    if let Some(section) = &parent.section_name {
        value["sectionName"] = json!(section);
    }
    value
}

/// `old` conditions with `wanted` set: other types kept in place; a condition whose status
/// did not change keeps its `lastTransitionTime`.
fn merge_conditions(old: &Value, wanted: &[Condition], generation: i64, now: Timestamp) -> Value {
    let old = old.as_array().cloned().unwrap_or_default();
    let mut all: Vec<Value> =
        old.iter().filter(|c| !wanted.iter().any(|w| c["type"].as_str() == Some(w.kind))).cloned().collect();
    for condition in wanted {
        let status = if condition.status { "True" } else { "False" };
        let since = old
            .iter()
            .find(|c| c["type"].as_str() == Some(condition.kind) && c["status"].as_str() == Some(status))
            .and_then(|c| c["lastTransitionTime"].as_str().map(str::to_owned))
            .unwrap_or_else(|| now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
        all.push(json!({
            "type": condition.kind,
            "status": status,
            "reason": condition.reason,
            "message": condition.message,
            "observedGeneration": generation,
            "lastTransitionTime": since,
        }));
    }
    Value::Array(all)
}

/// `Accepted=True, Programmed=False (Pending)`, for the log.
fn summary(desired: &Desired) -> String {
    let one = |c: &Condition| format!("{}={} ({})", c.kind, if c.status { "True" } else { "False" }, c.reason);
    match desired {
        Desired::Gateway(c) | Desired::Policy(c) => c.iter().map(one).collect::<Vec<_>>().join(", "),
        Desired::Route(parents) => parents
            .iter()
            .map(|(p, c)| format!("{}: {}", p.name, c.iter().map(one).collect::<Vec<_>>().join(", ")))
            .collect::<Vec<_>>()
            .join("; "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn a_condition_keeps_its_transition_time_until_its_status_changes() {
        let accepted = [Condition::new("Accepted", true, "Accepted", "ok")];
        let first = merge(&Value::Null, &Desired::Policy(accepted.to_vec()), 1, at("2026-01-01T00:00:00Z"));
        assert_eq!(first["conditions"][0]["lastTransitionTime"], "2026-01-01T00:00:00Z");
        assert_eq!(first["conditions"][0]["observedGeneration"], 1);
        let again = merge(&first, &Desired::Policy(accepted.to_vec()), 1, at("2026-01-02T00:00:00Z"));
        assert_eq!(again, first, "nothing changed: nothing to write");
        let refused = [Condition::new("Accepted", false, "Invalid", "bad")];
        let changed = merge(&first, &Desired::Policy(refused.to_vec()), 2, at("2026-01-03T00:00:00Z"));
        assert_eq!(changed["conditions"][0]["status"], "False");
        assert_eq!(changed["conditions"][0]["lastTransitionTime"], "2026-01-03T00:00:00Z");
        assert_eq!(changed["conditions"][0]["observedGeneration"], 2);
    }

    #[test]
    fn other_controllers_parents_and_other_condition_types_are_kept() {
        let status = json!({
            "parents": [{"parentRef": {"name": "gw"}, "controllerName": "istio.io/gateway-controller",
                         "conditions": [{"type": "Accepted", "status": "True"}]}],
            "conditions": [{"type": "Ready", "status": "True"}],
        });
        let parent = ParentReference {
            group: Some(String::new()),
            kind: Some("Service".into()),
            namespace: None,
            name: "reviews".into(),
            port: None,
            section_name: None,
        };
        let desired = Desired::Route(vec![(parent, vec![Condition::new("Accepted", true, "Accepted", "ok")])]);
        let merged = merge(&status, &desired, 3, at("2026-01-01T00:00:00Z"));
        let parents = merged["parents"].as_array().unwrap();
        assert_eq!(parents.len(), 2);
        assert_eq!(parents[0]["controllerName"], "istio.io/gateway-controller");
        assert_eq!(parents[1]["controllerName"], CONTROLLER_NAME);
        assert_eq!(parents[1]["parentRef"], json!({"name": "reviews", "group": "", "kind": "Service"}));
        assert_eq!(merged["conditions"], status["conditions"], "not the route's field: untouched");

        let policy = merge(
            &status,
            &Desired::Policy(vec![Condition::new("Accepted", true, "Accepted", "ok")]),
            1,
            at("2026-01-01T00:00:00Z"),
        );
        let types: Vec<&str> =
            policy["conditions"].as_array().unwrap().iter().map(|c| c["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["Ready", "Accepted"]);
    }

    #[test]
    fn a_gateway_is_programmed_only_once_deployed() {
        assert!(programmed(Some(&Outcome::Deployed)).status);
        assert_eq!(programmed(None).reason, "Pending");
        assert_eq!(programmed(Some(&Outcome::Invalid("too long".into()))).reason, "Invalid");
        let failing = programmed(Some(&Outcome::Failing("403 forbidden".into())));
        assert_eq!((failing.status, failing.reason), (false, "Pending"));
        assert!(failing.message.contains("403 forbidden"));
    }
}
