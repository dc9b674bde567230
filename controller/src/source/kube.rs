//! The Kubernetes API source: the cluster as its API server serves it, watched, feeding the
//! same translation as the directory source.
//!
//! ```text
//!  API server ──list+watch per kind──► watcher task (tokio) ──Batch──► KubeSource ──Scan──► source loop
//!               kube::runtime::watcher   Tracker: known objects,      (std channel:      (its thread:
//!               (relist, 410, bookmarks,  relist diff, decoding        wakes the loop)    translate,
//!                reconnect, backoff)      into `Object`s                                  commit)
//! ```
//!
//! One [`kube::runtime::watcher`] per kind (Namespaces, Pods, Services, Gateways, HTTPRoutes
//! and `authorizationpolicies.security.weft.dev`), cluster-wide. The watcher lists, then
//! watches from the list's `resourceVersion`, follows bookmarks, resumes a closed watch from
//! the last version it saw, and lists again when the API server no longer holds that version
//! (`410 Gone`). Each watcher runs on the tokio runtime beside a [`Tracker`] that turns its
//! events into [`Event`]s:
//!
//! | watcher event | what the source hands over |
//! | --- | --- |
//! | `Apply` (added, modified) | `Applied`, unless the object's `resourceVersion` is the one already handed over |
//! | `Delete` | `Deleted`, if the object was handed over |
//! | `Init`, `InitApply`..., `InitDone` (a list, first or again) | at `InitDone`, in one batch: `Applied` for every object new or changed since it was last seen, then `Deleted` for every object handed over that the list no longer holds (deleted while the watch was down) |
//!
//! So a relist neither repeats what did not change nor loses what vanished meanwhile, and an
//! interrupted relist (an error between `Init` and `InitDone`) changes nothing: the next one
//! starts over from what was handed over.
//!
//! Objects are watched as `DynamicObject`s and read by [`Object::from_value`], the reader of
//! the directory source: one bad object (an `AuthorizationPolicy` with a field Weft does not
//! know) is a [`Rejection`] and skipped, where a typed watch would fail the whole list. Like
//! in a directory, a rejected object keeps the version read before it, if any, until it reads
//! again or is deleted.
//!
//! **Start-up** ([`KubeSource::start`]) returns once every kind has been listed, so the first
//! snapshot the proxies get is the whole cluster: a snapshot without its `DENY` policies
//! would open what they close. A kind the API server does not serve (`404`: the Gateway API's
//! or Weft's CRD is not installed) counts as listed and empty, and its watcher keeps trying,
//! so the objects appear once the CRD is installed. Any other error (`403`: the controller's
//! role lacks `list`/`watch` on the kind) is logged with what to fix and retried with the
//! watcher's backoff (0.8 s doubling to 30 s), and the controller waits.
//!
//! **EndpointSlices are not watched.** Translation computes a service's endpoints from its
//! selector and the pods it sees (a Workload carries its addresses; a Service its selector),
//! so EndpointSlices would only repeat what the Pods already say, at the cost of one more
//! watch of the busiest kind in a cluster. They will be worth watching for what selectors
//! cannot express: services without selectors (hand-written slices, multi-cluster), and
//! readiness, which translation does not read yet.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Config};
use serde_json::Value;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::{Event, Object, ObjectKind, ObjectRef, ObjectSource, Rejection, Scan};

/// How often start-up says which kinds it still waits for.
const WAITING_REPORT: Duration = Duration::from_secs(10);

/// How often an asynchronous wait looks for a batch (start-up, [`KubeSource::changed`]): the
/// channel is the source loop's, which blocks on it; 10 ms is nothing next to a list.
const ASYNC_POLL: Duration = Duration::from_millis(10);

/// The pause before a watcher is started over after the API server refused to resume it
/// (`410` on the watch request itself): the watcher's own backoff is lost with it.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// The cluster's objects, from the Kubernetes API.
pub struct KubeSource {
    /// Where the batches of the watcher tasks arrive. A std channel: the source loop blocks
    /// on it from its own thread. Unbounded: a relist arrives as one batch, so between two
    /// scans only live watch events queue (the loop scans as soon as one arrives).
    batches: mpsc::Receiver<Batch>,
    /// Batches received while waiting, not scanned yet.
    pending: Vec<Batch>,
    /// The kinds listed at least once (or not served).
    listed: BTreeSet<ObjectKind>,
    rejected: BTreeMap<ObjectRef, Rejection>,
    tasks: Vec<JoinHandle<()>>,
}

/// Why the Kubernetes source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "no Kubernetes API configuration: {0} (in a pod, is the service account token mounted? \
         Elsewhere, set KUBECONFIG, or read a directory with --source-dir)"
    )]
    Config(#[from] kube::config::InferConfigError),
    #[error("cannot build a client for the Kubernetes API server at {server}: {error}")]
    Client { server: String, error: kube::Error },
}

/// What a watcher task hands to the source: one kind's events, in order.
#[derive(Debug, Default)]
struct Batch {
    kind: Option<ObjectKind>,
    events: Vec<Event>,
    /// Objects rejected by this batch (newly, or for a new reason).
    rejected: Vec<Rejection>,
    /// Objects no longer rejected: they read again, or are gone.
    cleared: Vec<ObjectRef>,
    /// The batch ends a complete list of the kind, or says the kind is not served.
    listed: bool,
}

/// One kind's objects as the source has handed them over, and the list in progress.
struct Tracker {
    kind: ObjectKind,
    api_version: String,
    /// Every object of the kind the API server holds, as last seen.
    known: HashMap<ObjectRef, Seen>,
    /// Between `Init` and `InitDone`: what the list has shown so far.
    relist: Option<Relist>,
}

#[derive(Debug, Clone, PartialEq)]
struct Seen {
    /// Its `resourceVersion` when last seen; an object seen again at the same version has
    /// not changed.
    version: String,
    /// Whether a version of it was handed over (and not deleted since): what a deletion
    /// must take back.
    applied: bool,
    /// Whether its last version was rejected.
    rejected: bool,
}

#[derive(Default)]
struct Relist {
    seen: HashMap<ObjectRef, Seen>,
    events: Vec<Event>,
    rejected: Vec<Rejection>,
    cleared: Vec<ObjectRef>,
}

impl KubeSource {
    /// Starts a watcher per kind on the current tokio runtime and returns once every kind
    /// has been listed: the first [`scan`](ObjectSource::scan) returns the whole cluster.
    /// Waits as long as that takes, saying every 10 s what it waits for (the watchers log
    /// why).
    pub async fn start(client: Client) -> KubeSource {
        let (sender, batches) = mpsc::channel();
        let tasks = ObjectKind::ALL
            .into_iter()
            .map(|kind| {
                let api = Api::<DynamicObject>::all_with(client.clone(), &api_resource(kind));
                tokio::spawn(watch(kind, api, sender.clone()))
            })
            .collect();
        let mut source =
            KubeSource { batches, pending: Vec::new(), listed: BTreeSet::new(), rejected: BTreeMap::new(), tasks };
        let started = Instant::now();
        let mut reported = started;
        while source.listed.len() < ObjectKind::ALL.len() {
            source.changed(WAITING_REPORT).await;
            if reported.elapsed() >= WAITING_REPORT {
                let waiting: Vec<&str> =
                    ObjectKind::ALL.iter().filter(|k| !source.listed.contains(k)).map(|k| k.as_str()).collect();
                info!(waiting = %waiting.join(", "), "waiting for the first list of these kinds from the Kubernetes API");
                reported = Instant::now();
            }
        }
        info!(elapsed_ms = started.elapsed().as_millis() as u64, "Kubernetes API listed");
        source
    }

    /// Waits, without blocking the runtime, until a watcher hands over something (returns
    /// true) or `timeout` passes (false). For start-up and tests; the source loop uses
    /// [`ObjectSource::wait`].
    pub async fn changed(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.batches.try_recv() {
                Ok(batch) => {
                    self.receive(batch);
                    return true;
                }
                // The watchers end only when the source is dropped; never spin.
                Err(mpsc::TryRecvError::Disconnected) => {
                    tokio::time::sleep_until(deadline).await;
                    return false;
                }
                Err(mpsc::TryRecvError::Empty) => {}
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return false;
            }
            tokio::time::sleep(ASYNC_POLL.min(deadline - now)).await;
        }
    }

    fn receive(&mut self, batch: Batch) {
        if batch.listed
            && let Some(kind) = batch.kind
        {
            self.listed.insert(kind);
        }
        self.pending.push(batch);
    }
}

impl ObjectSource for KubeSource {
    /// Returns as soon as a watcher hands over a batch.
    fn wait(&mut self, timeout: Duration) {
        match self.batches.recv_timeout(timeout) {
            Ok(batch) => self.receive(batch),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // The watchers end only when the source is dropped; never spin.
            Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(timeout),
        }
    }

    /// Every object's events in the order its watcher saw them; kinds in translation order
    /// (namespaces first).
    fn scan(&mut self) -> Scan {
        while let Ok(batch) = self.batches.try_recv() {
            self.receive(batch);
        }
        let mut by_kind: BTreeMap<ObjectKind, Vec<Event>> = BTreeMap::new();
        let mut rejected = Vec::new();
        for batch in std::mem::take(&mut self.pending) {
            for object in batch.cleared {
                self.rejected.remove(&object);
            }
            for rejection in batch.rejected {
                if let Some(object) = rejection.object.clone() {
                    self.rejected.insert(object, rejection.clone());
                }
                rejected.push(rejection);
            }
            if let Some(kind) = batch.kind {
                by_kind.entry(kind).or_default().extend(batch.events);
            }
        }
        Scan { events: by_kind.into_values().flatten().collect(), rejected }
    }

    fn rejected(&self) -> Vec<Rejection> {
        self.rejected.values().cloned().collect()
    }
}

impl fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeSource")
            .field("listed", &self.listed)
            .field("rejected", &self.rejected.len())
            .finish_non_exhaustive()
    }
}

/// The watchers stop with the source.
impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A client of the Kubernetes API with the configuration found: a kubeconfig from
/// `KUBECONFIG` or `~/.kube/config`, else the pod's service account (`kube::Config::infer`).
pub async fn client() -> Result<Client, KubeError> {
    let config = Config::infer().await?;
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(|error| KubeError::Client { server: server.clone(), error })?;
    info!(%server, "using the Kubernetes API");
    Ok(client)
}

/// The resource a kind is watched as: its first version read (`v1`; `v1alpha1` for Weft's
/// policy).
pub(crate) fn api_resource(kind: ObjectKind) -> ApiResource {
    let version = kind.versions()[0];
    let plural = match kind {
        ObjectKind::Namespace => "namespaces",
        ObjectKind::Pod => "pods",
        ObjectKind::Service => "services",
        ObjectKind::Gateway => "gateways",
        ObjectKind::AuthorizationPolicy => "authorizationpolicies",
        ObjectKind::HttpRoute => "httproutes",
    };
    ApiResource {
        group: kind.group().to_owned(),
        version: version.to_owned(),
        api_version: kind.api_version(version),
        kind: kind.as_str().to_owned(),
        plural: plural.to_owned(),
    }
}

/// Watches one kind until the source is dropped: the watcher's events through a [`Tracker`],
/// each batch to the source.
async fn watch(kind: ObjectKind, api: Api<DynamicObject>, batches: mpsc::Sender<Batch>) {
    let resource = api_resource(kind);
    let mut tracker = Tracker::new(kind);
    loop {
        let mut stream = std::pin::pin!(watcher(api.clone(), watcher::Config::default()).default_backoff());
        while let Some(item) = stream.next().await {
            let batch = match item {
                Ok(event) => tracker.update(event),
                Err(error) => {
                    let code = status_code(&error);
                    report(&resource, &error, code);
                    match (&error, code) {
                        (watcher::Error::InitialListFailed(_), Some(404)) => {
                            Some(Batch { kind: Some(kind), listed: true, ..Batch::default() })
                        }
                        // The watcher would ask again for the same version forever; a new
                        // one lists.
                        (watcher::Error::WatchStartFailed(_), Some(410)) => break,
                        _ => None,
                    }
                }
            };
            if let Some(batch) = batch
                && batches.send(batch).is_err()
            {
                return;
            }
        }
        tokio::time::sleep(RESTART_DELAY).await;
    }
}

/// The API server's status code in a watcher error, if it answered.
fn status_code(error: &watcher::Error) -> Option<u16> {
    match error {
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
            match e {
                kube::Error::Api(status) => Some(status.code),
                _ => None,
            }
        }
        watcher::Error::WatchError(status) => Some(status.code),
        watcher::Error::NoResourceVersion => None,
    }
}

/// Logs a watcher error with what to do about it.
fn report(resource: &ApiResource, error: &watcher::Error, code: Option<u16>) {
    let what = match resource.group.as_str() {
        "" => resource.plural.clone(),
        group => format!("{}.{group}", resource.plural),
    };
    match code {
        Some(410) => {
            info!(resource = %what, "the API server no longer holds the version watched from (410 Gone); listing again")
        }
        Some(404) => warn!(
            resource = %what,
            "the API server does not serve {what} ({}): none are read until it does; is its CRD installed?",
            resource.api_version
        ),
        Some(403) => warn!(
            resource = %what, %error,
            "the controller may not list and watch {what}: grant its service account get, list and watch on it (ClusterRole)"
        ),
        Some(401) => warn!(resource = %what, %error, "the API server refused the controller's credentials; retrying"),
        _ => warn!(resource = %what, %error, "watching failed; retrying with backoff"),
    }
}

impl Tracker {
    fn new(kind: ObjectKind) -> Tracker {
        Tracker { kind, api_version: api_resource(kind).api_version, known: HashMap::new(), relist: None }
    }

    /// Takes one watcher event; returns what to hand over, if anything.
    fn update(&mut self, event: watcher::Event<DynamicObject>) -> Option<Batch> {
        match event {
            watcher::Event::Init => {
                if self.relist.is_some() {
                    debug!(kind = %self.kind, "a list was interrupted; starting over");
                }
                self.relist = Some(Relist::default());
                None
            }
            watcher::Event::InitApply(object) => {
                let Some(mut relist) = self.relist.take() else {
                    // Not between Init and InitDone: cannot happen; read it as an update.
                    return self.update(watcher::Event::Apply(object));
                };
                let (object_ref, version, read) = self.read(object);
                let last = self.known.get(&object_ref);
                match last.filter(|s| !version.is_empty() && s.version == version) {
                    Some(unchanged) => {
                        relist.seen.insert(object_ref, unchanged.clone());
                    }
                    None => {
                        let applied = last.is_some_and(|s| s.applied);
                        let was_rejected = last.is_some_and(|s| s.rejected);
                        let seen = match read {
                            Ok(object) => {
                                relist.events.push(Event::Applied(object));
                                if was_rejected {
                                    relist.cleared.push(object_ref.clone());
                                }
                                Seen { version, applied: true, rejected: false }
                            }
                            Err(rejection) => {
                                relist.rejected.push(kept(rejection, applied));
                                Seen { version, applied, rejected: true }
                            }
                        };
                        relist.seen.insert(object_ref, seen);
                    }
                }
                self.relist = Some(relist);
                None
            }
            watcher::Event::InitDone => {
                let Some(mut relist) = self.relist.take() else {
                    debug!(kind = %self.kind, "a list ended that did not start; ignored");
                    return None;
                };
                let mut gone: Vec<(ObjectRef, Seen)> =
                    self.known.drain().filter(|(r, _)| !relist.seen.contains_key(r)).collect();
                gone.sort_by(|a, b| a.0.cmp(&b.0));
                for (object_ref, seen) in gone {
                    if seen.rejected {
                        relist.cleared.push(object_ref.clone());
                    }
                    if seen.applied {
                        relist.events.push(Event::Deleted(object_ref));
                    }
                }
                self.known = relist.seen;
                Some(Batch {
                    kind: Some(self.kind),
                    events: relist.events,
                    rejected: relist.rejected,
                    cleared: relist.cleared,
                    listed: true,
                })
            }
            watcher::Event::Apply(object) => {
                let (object_ref, version, read) = self.read(object);
                let last = self.known.get(&object_ref);
                if last.is_some_and(|s| !version.is_empty() && s.version == version) {
                    return None;
                }
                let applied = last.is_some_and(|s| s.applied);
                let was_rejected = last.is_some_and(|s| s.rejected);
                let mut batch = Batch { kind: Some(self.kind), ..Batch::default() };
                let seen = match read {
                    Ok(object) => {
                        batch.events.push(Event::Applied(object));
                        if was_rejected {
                            batch.cleared.push(object_ref.clone());
                        }
                        Seen { version, applied: true, rejected: false }
                    }
                    Err(rejection) => {
                        batch.rejected.push(kept(rejection, applied));
                        Seen { version, applied, rejected: true }
                    }
                };
                self.known.insert(object_ref, seen);
                Some(batch)
            }
            watcher::Event::Delete(object) => {
                let object_ref = self.object_ref(&object);
                let seen = self.known.remove(&object_ref)?;
                let mut batch = Batch { kind: Some(self.kind), ..Batch::default() };
                if seen.rejected {
                    batch.cleared.push(object_ref.clone());
                }
                if seen.applied {
                    batch.events.push(Event::Deleted(object_ref));
                }
                Some(batch)
            }
        }
    }

    fn object_ref(&self, object: &DynamicObject) -> ObjectRef {
        let meta = &object.metadata;
        let namespace = if self.kind.is_namespaced() { meta.namespace.as_deref() } else { None };
        ObjectRef::new(self.kind, namespace, meta.name.as_deref().unwrap_or_default())
    }

    /// Reads an object as the directory source does: its name, its `resourceVersion`, and
    /// the object or why it cannot be read.
    fn read(&self, mut object: DynamicObject) -> (ObjectRef, String, Result<Object, Rejection>) {
        let object_ref = self.object_ref(&object);
        let version = object.metadata.resource_version.clone().unwrap_or_default();
        // Who wrote which field: never read, often the largest part of an object.
        object.metadata.managed_fields = None;
        let mut fields = match object.data {
            Value::Object(fields) => fields,
            _ => serde_json::Map::new(),
        };
        // Lists leave out their items' kind; the watch asked for this version.
        fields.insert("apiVersion".to_owned(), Value::String(self.api_version.clone()));
        fields.insert("kind".to_owned(), Value::String(self.kind.as_str().to_owned()));
        let read = match serde_json::to_value(&object.metadata) {
            Ok(metadata) => {
                fields.insert("metadata".to_owned(), metadata);
                match Object::from_value(Value::Object(fields)) {
                    Ok(Some(object)) => Ok(object),
                    Ok(None) => Err(Rejection::new(format!("not a {} the controller reads", self.kind))),
                    Err(rejection) => Err(rejection),
                }
            }
            Err(e) => Err(Rejection::new(format!("its metadata cannot be read: {e}")).at("metadata")),
        };
        let read = read.map_err(|r| Rejection { object: Some(object_ref.clone()), ..r });
        (object_ref, version, read)
    }
}

/// Says that the version read before is kept, as the directory source does.
fn kept(mut rejection: Rejection, applied: bool) -> Rejection {
    if applied {
        rejection.reason.push_str("; the version read before is kept");
    }
    rejection
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(name: &str, version: &str, app: &str) -> DynamicObject {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "resourceVersion": version, "labels": {"app": app}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "app"}]},
            "status": {"podIP": "10.244.1.2"}
        }))
        .unwrap()
    }

    fn policy(name: &str, version: &str, spec: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "resourceVersion": version},
            "spec": spec
        }))
        .unwrap()
    }

    fn list(tracker: &mut Tracker, objects: Vec<DynamicObject>) -> Batch {
        assert!(tracker.update(watcher::Event::Init).is_none());
        for object in objects {
            assert!(tracker.update(watcher::Event::InitApply(object)).is_none(), "handed over before InitDone");
        }
        tracker.update(watcher::Event::InitDone).expect("a list ends in a batch")
    }

    fn refs(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                Event::Applied(o) => format!("applied {}", o.object_ref()),
                Event::Deleted(r) => format!("deleted {r}"),
            })
            .collect()
    }

    #[test]
    fn a_relist_hands_over_what_changed_and_deletes_what_vanished() {
        let mut t = Tracker::new(ObjectKind::Pod);
        let first = list(&mut t, vec![pod("a", "1", "a"), pod("b", "2", "b"), pod("c", "3", "c")]);
        assert!(first.listed);
        assert_eq!(refs(&first.events), ["applied Pod shop/a", "applied Pod shop/b", "applied Pod shop/c"]);
        let Event::Applied(Object::Pod(a)) = &first.events[0] else { panic!() };
        assert_eq!(a.metadata.labels.as_ref().unwrap()["app"], "a", "read as the directory source reads it");

        // While the watch was down: b deleted, c changed, d created.
        let again = list(&mut t, vec![pod("a", "1", "a"), pod("c", "7", "c2"), pod("d", "8", "d")]);
        assert_eq!(refs(&again.events), ["applied Pod shop/c", "applied Pod shop/d", "deleted Pod shop/b"]);

        // The same list again: nothing.
        assert!(list(&mut t, vec![pod("a", "1", "a"), pod("c", "7", "c2"), pod("d", "8", "d")]).events.is_empty());
    }

    #[test]
    fn an_interrupted_relist_changes_nothing() {
        let mut t = Tracker::new(ObjectKind::Pod);
        list(&mut t, vec![pod("a", "1", "a"), pod("b", "2", "b")]);
        // A list that fails halfway (the watcher starts over with Init).
        assert!(t.update(watcher::Event::Init).is_none());
        assert!(t.update(watcher::Event::InitApply(pod("a", "5", "a2"))).is_none());
        let again = list(&mut t, vec![pod("a", "5", "a2")]);
        assert_eq!(refs(&again.events), ["applied Pod shop/a", "deleted Pod shop/b"], "a is handed over once");
    }

    #[test]
    fn watch_events_hand_over_one_change_each() {
        let mut t = Tracker::new(ObjectKind::Pod);
        list(&mut t, vec![pod("a", "1", "a")]);
        let b = t.update(watcher::Event::Apply(pod("b", "2", "b"))).unwrap();
        assert_eq!(refs(&b.events), ["applied Pod shop/b"]);
        assert!(!b.listed);
        assert!(t.update(watcher::Event::Apply(pod("b", "2", "b"))).is_none(), "the same version again");
        let gone = t.update(watcher::Event::Delete(pod("a", "3", "a"))).unwrap();
        assert_eq!(refs(&gone.events), ["deleted Pod shop/a"]);
        assert!(t.update(watcher::Event::Delete(pod("a", "3", "a"))).is_none(), "not known any more");
    }

    #[test]
    fn a_rejected_object_keeps_its_last_good_version_until_fixed_or_deleted() {
        let mut t = Tracker::new(ObjectKind::AuthorizationPolicy);
        let good = json!({"action": "ALLOW", "rules": [{"ports": [8080]}]});
        let bad = json!({"action": "ALLOW", "rulez": [{"ports": [8080]}]});
        list(&mut t, vec![policy("p", "1", good.clone())]);

        let b = t.update(watcher::Event::Apply(policy("p", "2", bad.clone()))).unwrap();
        assert!(b.events.is_empty(), "the bad version is skipped");
        let [r] = b.rejected.as_slice() else { panic!("{:?}", b.rejected) };
        assert_eq!(r.object, Some(ObjectRef::new(ObjectKind::AuthorizationPolicy, Some("shop"), "p")));
        assert_eq!(r.field.as_deref(), Some("spec.rulez"));
        assert!(r.reason.ends_with("; the version read before is kept"), "{r}");

        // A relist that still shows the bad version: no news.
        let again = list(&mut t, vec![policy("p", "2", bad.clone())]);
        assert!(again.events.is_empty() && again.rejected.is_empty() && again.cleared.is_empty());

        let fixed = t.update(watcher::Event::Apply(policy("p", "3", good))).unwrap();
        assert_eq!(refs(&fixed.events), ["applied AuthorizationPolicy shop/p"]);
        assert_eq!(fixed.cleared, [r.object.clone().unwrap()]);

        // A new object that never read well: rejected, and its deletion takes nothing back.
        let n = t.update(watcher::Event::Apply(policy("n", "4", bad.clone()))).unwrap();
        assert!(!n.rejected[0].reason.contains("kept"), "{:?}", n.rejected);
        let gone = t.update(watcher::Event::Delete(policy("n", "5", bad))).unwrap();
        assert!(gone.events.is_empty());
        assert_eq!(gone.cleared, [ObjectRef::new(ObjectKind::AuthorizationPolicy, Some("shop"), "n")]);
    }

    #[test]
    fn cluster_wide_kinds_have_no_namespace() {
        let mut t = Tracker::new(ObjectKind::Namespace);
        let ns: DynamicObject =
            serde_json::from_value(json!({"metadata": {"name": "shop", "resourceVersion": "1"}})).unwrap();
        let batch = list(&mut t, vec![ns]);
        assert_eq!(refs(&batch.events), ["applied Namespace shop"]);
        assert_eq!(api_resource(ObjectKind::AuthorizationPolicy).api_version, "security.weft.dev/v1alpha1");
        assert_eq!(api_resource(ObjectKind::HttpRoute).api_version, "gateway.networking.k8s.io/v1");
    }
}
