//! The model as the controller serves it: the current resources and recent deltas
//! ([`meshapi::watch::History`]), the subscribers they are pushed to, what each subscriber (a
//! node, or a service account) last acknowledged, and the indexes certificate authorization
//! needs: which identities run on which node, and which service accounts serve a waypoint.
//!
//! One writer commits changes (the source loop); each commit is encoded once and the same
//! bytes are handed to every subscriber through a broadcast channel, so a one-pod change
//! costs each subscriber a few hundred bytes and no encoding. A subscriber is registered
//! under the same lock as commits, so it never misses or repeats a delta between its first
//! message and the live stream.
//!
//! A snapshot is encoded once per version and shared by every subscriber that starts from
//! it: after a restart every node subscribes at once, and 100 copies of a 2.4 MiB snapshot
//! (10,000 pods) were 240 MiB at the peak, most of which the allocator kept afterwards.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use meshapi::watch::{Ack, Change, Committed, Cursor, History, Rejected, Start, Subscriber};
use meshapi::{Key, Kind, Resource};
use spiffe::SpiffeId;
use tokio::sync::broadcast;

use crate::metrics::Metrics;

/// Deltas a subscriber may fall behind by before it is cut off (it then resubscribes and
/// resumes from the history). 1,024 deltas: minutes of churn for a busy cluster, and each
/// slot is a shared pointer.
const SUBSCRIBER_BACKLOG: usize = 1024;

/// The store shared by the source loop, the API server and the admin pages.
pub struct Store {
    inner: Mutex<Inner>,
    live: broadcast::Sender<Delta>,
    metrics: Arc<Metrics>,
}

struct Inner {
    history: History,
    /// Workload uid → (node, identity) of the captured workloads, for node authorization.
    workloads: HashMap<String, (String, SpiffeId)>,
    /// Waypoint key name (`<namespace>/<name>`) → (namespace, service account), for
    /// service-account authorization.
    waypoints: HashMap<String, (String, String)>,
    trust_domain: String,
    subscribers: BTreeMap<Subscriber, SubscriberStatus>,
    /// The snapshot line of the current version, once a subscriber asked for it; dropped at
    /// the next commit.
    snapshot: Option<Arc<str>>,
}

/// What the controller knows of one subscriber's proxy (a node's ztunnel, a waypoint).
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriberStatus {
    /// Open watch streams of this subscriber (normally one per proxy).
    pub subscribers: usize,
    /// The last version it reported applied, with its epoch.
    pub acked: Option<Cursor>,
    /// Resources it rejected in its last report.
    pub rejected: Vec<Rejected>,
    /// When it last reported (seconds since the Unix epoch).
    pub last_ack_unix: Option<u64>,
}

/// A committed delta as subscribers receive it: its version and its line.
pub type Delta = (u64, Arc<str>);

/// A subscription: the lines to send first, then the live deltas.
pub struct Subscription {
    pub first: First,
    pub live: broadcast::Receiver<Delta>,
    /// The version the first lines bring the subscriber to.
    pub version: u64,
    pub epoch: String,
}

/// What a subscriber is sent first.
pub enum First {
    /// The whole model: one line, shared with the other subscribers starting at its version.
    Snapshot(Arc<str>),
    /// A `resumed` line, then every delta after the subscriber's version.
    Resume(Vec<Arc<str>>),
}

impl Store {
    /// An empty store whose history is named `epoch` and keeps up to `history_bytes` of
    /// deltas for resuming subscribers.
    pub fn new(epoch: String, history_bytes: usize, trust_domain: String, metrics: Arc<Metrics>) -> Store {
        let (live, _) = broadcast::channel(SUBSCRIBER_BACKLOG);
        Store {
            inner: Mutex::new(Inner {
                history: History::new(epoch, history_bytes),
                workloads: HashMap::new(),
                waypoints: HashMap::new(),
                trust_domain,
                subscribers: BTreeMap::new(),
                snapshot: None,
            }),
            live,
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the history consistent (each commit is
        // applied by `History::commit` before anything else is touched): keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits `changes` as one version and pushes the delta to every subscriber. Returns
    /// what was committed, or `None` if nothing changed.
    pub fn commit(&self, changes: Vec<Change>) -> Option<Committed> {
        let mut inner = self.lock();
        for change in &changes {
            match change {
                // A node's ztunnel needs the identities of the pods it captures only: a pod
                // it does not capture (a waypoint's, one opted out) keeps its identity from
                // the node.
                Change::Upsert(Resource::Workload(w)) => {
                    match w.identity(&inner.trust_domain).ok().filter(|_| w.enrolled) {
                        Some(id) => {
                            inner.workloads.insert(w.uid.clone(), (w.node.clone(), id));
                        }
                        None => {
                            inner.workloads.remove(&w.uid);
                        }
                    }
                }
                Change::Delete(Key { kind: Kind::Workload, name }) => {
                    inner.workloads.remove(name);
                }
                Change::Upsert(Resource::Waypoint(w)) => {
                    let name = format!("{}/{}", w.namespace, w.name);
                    inner.waypoints.insert(name, (w.namespace.clone(), w.service_account.clone()));
                }
                Change::Delete(Key { kind: Kind::Waypoint, name }) => {
                    inner.waypoints.remove(name);
                }
                _ => {}
            }
        }
        let committed = inner.history.commit(changes)?;
        inner.snapshot = None;
        self.metrics.version.set(committed.version as i64);
        self.metrics.resources.set(inner.history.len() as i64);
        // Sent under the lock, so that a subscriber registered by `subscribe` sees exactly
        // the deltas after its start. No receiver is not an error.
        let receivers = self.live.send((committed.version, committed.line.clone())).unwrap_or(0);
        self.metrics.pushes.inc_by(receivers as u64);
        self.metrics.pushed_bytes.inc_by((receivers * committed.line.len()) as u64);
        Some(committed)
    }

    /// Registers a watch stream of `subscriber`, which last applied `since`.
    pub fn subscribe(&self, subscriber: &Subscriber, since: Option<&Cursor>) -> Subscription {
        let mut inner = self.lock();
        // Only a cursor of this epoch may resume; any other gets the shared snapshot without
        // the history encoding one of its own.
        let start = since.filter(|c| c.epoch == inner.history.epoch()).map(|c| inner.history.start(Some(c)));
        let first = match start {
            Some(Start::Resume(lines)) => First::Resume(lines),
            Some(Start::Snapshot(line)) => First::Snapshot(inner.shared_snapshot(Some(line))),
            None => First::Snapshot(inner.shared_snapshot(None)),
        };
        let live = self.live.subscribe();
        inner.subscribers.entry(subscriber.clone()).or_default().subscribers += 1;
        self.metrics.subscribers.inc();
        match &first {
            First::Snapshot(_) => self.metrics.snapshots.inc(),
            First::Resume(_) => self.metrics.resumes.inc(),
        };
        Subscription { first, live, version: inner.history.version(), epoch: inner.history.epoch().to_owned() }
    }

    /// A watch stream of `subscriber` went away.
    pub fn unsubscribe(&self, subscriber: &Subscriber) {
        let mut inner = self.lock();
        if let Some(s) = inner.subscribers.get_mut(subscriber) {
            s.subscribers = s.subscribers.saturating_sub(1);
        }
        self.metrics.subscribers.dec();
    }

    /// Records a subscriber's report of what it applied.
    pub fn ack(&self, ack: Ack) {
        let mut inner = self.lock();
        if ack.rejected.is_empty() {
            self.metrics.acks_applied.inc();
        } else {
            self.metrics.acks_rejected.inc();
            self.metrics.rejected_resources.inc_by(ack.rejected.len() as u64);
        }
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).ok();
        let status = inner.subscribers.entry(ack.subscriber).or_default();
        status.acked = Some(Cursor { epoch: ack.epoch, version: ack.version });
        status.rejected = ack.rejected;
        status.last_ack_unix = now;
    }

    /// Whether a workload with identity `id` is scheduled on `node` and captured there: node
    /// authorization for certificates.
    pub fn node_runs(&self, node: &str, id: &SpiffeId) -> bool {
        self.lock().workloads.values().any(|(n, i)| n == node && i == id)
    }

    /// Whether the model holds a waypoint in `namespace` run as `service_account`: the
    /// service account's right to its own identity.
    pub fn serves_waypoint(&self, namespace: &str, service_account: &str) -> bool {
        self.lock().waypoints.values().any(|(ns, sa)| ns == namespace && sa == service_account)
    }

    /// The identities of the workloads on `node`.
    pub fn identities_on(&self, node: &str) -> HashSet<SpiffeId> {
        self.lock().workloads.values().filter(|(n, _)| n == node).map(|(_, i)| i.clone()).collect()
    }

    pub fn epoch(&self) -> String {
        self.lock().history.epoch().to_owned()
    }

    pub fn version(&self) -> u64 {
        self.lock().history.version()
    }

    /// Every node that subscribed or reported, with its status.
    pub fn nodes(&self) -> BTreeMap<String, SubscriberStatus> {
        let inner = self.lock();
        let nodes = inner.subscribers.iter().filter_map(|(subscriber, status)| match subscriber {
            Subscriber::Node(node) => Some((node.clone(), status.clone())),
            Subscriber::ServiceAccount { .. } => None,
        });
        nodes.collect()
    }

    /// Every service account (`<namespace>/<name>`) that subscribed or reported, with its
    /// status.
    pub fn service_accounts(&self) -> BTreeMap<String, SubscriberStatus> {
        let inner = self.lock();
        let accounts = inner.subscribers.iter().filter_map(|(subscriber, status)| match subscriber {
            Subscriber::ServiceAccount { namespace, name } => Some((format!("{namespace}/{name}"), status.clone())),
            Subscriber::Node(_) => None,
        });
        accounts.collect()
    }

    /// The current resources of `kind` (all kinds if `None`), encoded, in key order.
    pub fn resources(&self, kind: Option<Kind>) -> Vec<String> {
        let inner = self.lock();
        inner
            .history
            .keys()
            .filter(|k| kind.is_none_or(|want| k.kind == want))
            .filter_map(|k| inner.history.get(k).map(str::to_owned))
            .collect()
    }
}

impl Inner {
    /// The snapshot line of the current version: the one made for an earlier subscriber,
    /// else `built` or a new one, kept for the next.
    fn shared_snapshot(&mut self, built: Option<String>) -> Arc<str> {
        let history = &self.history;
        self.snapshot.get_or_insert_with(|| Arc::from(built.unwrap_or_else(|| history.snapshot_line()))).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> Subscriber {
        Subscriber::Node(name.to_owned())
    }

    fn store() -> Store {
        Store::new("e".into(), 1 << 20, "cluster.local".into(), Arc::new(Metrics::new()))
    }

    fn workload(name: &str, node: &str) -> Resource {
        let doc = format!(
            "workloads: [{{name: {name}, namespace: ns, node: {node}, addresses: [10.244.0.{}], serviceAccount: {name}, enrolled: true}}]",
            name.len()
        );
        Resource::Workload(meshapi::Snapshot::from_yaml(&doc).unwrap().workloads.remove(0))
    }

    #[tokio::test]
    async fn subscribers_get_a_snapshot_then_each_delta_once() {
        let s = store();
        s.commit(vec![Change::Upsert(workload("a", "n1"))]).unwrap();
        let mut sub = s.subscribe(&node("n1"), None);
        assert!(matches!(sub.first, First::Snapshot(ref l) if l.contains("\"name\":\"ns/a\"")));
        let c = s.commit(vec![Change::Upsert(workload("bb", "n2"))]).unwrap();
        assert_eq!(sub.live.recv().await.unwrap(), (c.version, c.line));
        assert!(s.commit(vec![Change::Upsert(workload("bb", "n2"))]).is_none(), "no change, no push");
        assert!(sub.live.try_recv().is_err());
        assert_eq!(s.nodes()["n1"].subscribers, 1);
        s.unsubscribe(&node("n1"));
        assert_eq!(s.nodes()["n1"].subscribers, 0);
    }

    #[test]
    fn subscribers_at_one_version_share_its_snapshot() {
        let s = store();
        s.commit(vec![Change::Upsert(workload("a", "n1"))]).unwrap();
        let line = |sub: Subscription| match sub.first {
            First::Snapshot(line) => line,
            First::Resume(_) => panic!("no cursor: a snapshot"),
        };
        let first = line(s.subscribe(&node("n1"), None));
        let other_epoch = Cursor { epoch: "old".into(), version: 1 };
        assert!(Arc::ptr_eq(&first, &line(s.subscribe(&node("n2"), Some(&other_epoch)))), "encoded once");
        s.commit(vec![Change::Upsert(workload("bb", "n2"))]).unwrap();
        let next = line(s.subscribe(&node("n1"), None));
        assert!(!Arc::ptr_eq(&first, &next) && next.contains("\"name\":\"ns/bb\""), "a new version, a new snapshot");
        let behind = Cursor { epoch: "e".into(), version: 1 };
        assert!(matches!(s.subscribe(&node("n1"), Some(&behind)).first, First::Resume(ref l) if l.len() == 2));
    }

    #[test]
    fn node_authorization_follows_scheduling() {
        let s = store();
        s.commit(vec![Change::Upsert(workload("a", "n1")), Change::Upsert(workload("bb", "n2"))]).unwrap();
        let a: SpiffeId = "spiffe://cluster.local/ns/ns/sa/a".parse().unwrap();
        assert!(s.node_runs("n1", &a));
        assert!(!s.node_runs("n2", &a), "a runs on n1 only");
        s.commit(vec![Change::Delete(Key::new(Kind::Workload, "ns/a"))]).unwrap();
        assert!(!s.node_runs("n1", &a), "deleted");
        assert_eq!(s.identities_on("n2").len(), 1);
        // A pod its node does not capture (a waypoint's) gives the node no right to its identity.
        let Resource::Workload(mut uncaptured) = workload("a", "n1") else { unreachable!() };
        uncaptured.enrolled = false;
        s.commit(vec![Change::Upsert(Resource::Workload(uncaptured))]).unwrap();
        assert!(!s.node_runs("n1", &a), "not captured: not the node's to obtain");
    }

    #[test]
    fn acks_are_recorded_per_subscriber() {
        let s = store();
        let waypoint = Subscriber::ServiceAccount { namespace: "ns".into(), name: "n1".into() };
        s.ack(Ack { subscriber: node("n1"), epoch: "e".into(), version: 3, rejected: vec![] });
        s.ack(Ack {
            subscriber: node("n2"),
            epoch: "e".into(),
            version: 3,
            rejected: vec![Rejected { kind: "Service".into(), name: "ns/s".into(), reason: "port 0".into() }],
        });
        s.ack(Ack { subscriber: waypoint.clone(), epoch: "e".into(), version: 2, rejected: vec![] });
        let _stream = s.subscribe(&waypoint, None);
        let nodes = s.nodes();
        assert_eq!(
            nodes.keys().collect::<Vec<_>>(),
            ["n1", "n2"],
            "a service account is no node, even of the same name"
        );
        assert_eq!(nodes["n1"].acked, Some(Cursor { epoch: "e".into(), version: 3 }));
        assert_eq!(nodes["n2"].rejected.len(), 1);
        let accounts = s.service_accounts();
        assert_eq!(accounts.keys().collect::<Vec<_>>(), ["ns/n1"]);
        assert_eq!((accounts["ns/n1"].acked.as_ref().map(|c| c.version), accounts["ns/n1"].subscribers), (Some(2), 1));
    }

    #[test]
    fn service_account_authorization_follows_waypoints() {
        let s = store();
        let waypoint = |name: &str, account: &str| {
            let doc = format!(
                "waypoints: [{{name: {name}, namespace: ns, addresses: [10.244.0.9], serviceAccount: {account}}}]"
            );
            Resource::Waypoint(meshapi::Snapshot::from_yaml(&doc).unwrap().waypoints.remove(0))
        };
        assert!(!s.serves_waypoint("ns", "wp"));
        s.commit(vec![Change::Upsert(waypoint("wp", "wp")), Change::Upsert(workload("a", "n1"))]).unwrap();
        assert!(s.serves_waypoint("ns", "wp"));
        assert!(!s.serves_waypoint("other", "wp"), "another namespace");
        assert!(!s.serves_waypoint("ns", "a"), "a workload's service account serves no waypoint");
        s.commit(vec![Change::Upsert(waypoint("wp", "wp-renamed"))]).unwrap();
        assert!(!s.serves_waypoint("ns", "wp") && s.serves_waypoint("ns", "wp-renamed"), "the upsert replaces");
        s.commit(vec![Change::Delete(Key::new(Kind::Waypoint, "ns/wp"))]).unwrap();
        assert!(!s.serves_waypoint("ns", "wp-renamed"), "deleted");
    }
}
