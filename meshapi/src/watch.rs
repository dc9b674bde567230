//! The watch protocol, both ends, without I/O (`docs/PROTOCOL.md` is its reference).
//!
//! A proxy subscribes with one long-lived HTTP request; the answer is a stream of
//! newline-delimited JSON messages:
//!
//! ```text
//! {"type":"snapshot","epoch":"6f1c..","version":41,"resources":[{"kind":..,"name":..,"spec":..},..]}
//! {"type":"delta","epoch":"6f1c..","version":42,"upserts":[..],"deletes":[{"kind":"Workload","name":"shop/web-0"}]}
//! {"type":"heartbeat","epoch":"6f1c..","version":42}
//! ```
//!
//! or, when the subscriber says where it stopped (`since`) and the controller still holds
//! every delta after that point, a `resumed` message and only those deltas. Versions count
//! the controller's changes; every subscriber sees every version, so each delta's version is
//! the previous one plus one, and a gap means the stream is broken ([`Cursor`] checks it).
//! The epoch names one run of the controller's history: a version from another epoch means
//! nothing, and a subscriber that presents one gets a snapshot.
//!
//! The controller side is [`History`]: the current resources, each kept already encoded, and
//! a bounded log of recent deltas, each encoded once and shared by every subscriber.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::resource::{Key, Resource, Wire};

/// Subscribing: `GET /v1/watch?node=<node>[&epoch=<epoch>&since=<version>]`, or
/// `?serviceAccount=<namespace>/<name>` for a proxy with its own identity ([`Subscriber`]).
pub const WATCH_PATH: &str = "/v1/watch";
/// Reporting what was applied: `POST /v1/ack` with an [`Ack`].
pub const ACK_PATH: &str = "/v1/ack";

/// A message of the watch stream, decoded. Resources that do not decode are kept as
/// [`Rejected`] so the proxy can apply the others and report them.
#[derive(Debug)]
pub enum Message {
    /// The whole state at `version`: everything not listed is gone.
    Snapshot { epoch: String, version: u64, resources: Vec<Result<Resource, Rejected>> },
    /// The stream resumes after `version`: deltas follow.
    Resumed { epoch: String, version: u64 },
    /// The changes that make `version`.
    Delta { epoch: String, version: u64, upserts: Vec<Result<Resource, Rejected>>, deletes: Vec<Key> },
    /// Nothing changed; the stream is alive.
    Heartbeat { epoch: String, version: u64 },
}

/// A resource the proxy could not apply, and why; reported in its [`Ack`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub kind: String,
    pub name: String,
    pub reason: String,
}

/// Who a proxy acts for, as its watch request and acknowledgements name it: a node (ztunnel,
/// which obtains the identities of every workload scheduled there), or a service account (a
/// proxy that terminates HBONE with an identity of its own: a waypoint). The controller
/// checks the name against the caller's credential.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subscriber {
    /// The node's name.
    Node(String),
    /// `<namespace>/<name>`.
    ServiceAccount { namespace: String, name: String },
}

/// What a proxy reports after applying a message: who it is, the version it now serves, and
/// the resources of that message it rejected. On the wire the subscriber is exactly one of
/// `node` and `serviceAccount`:
///
/// ```text
/// {"node":"node-1","epoch":"6f1c..","version":42,"rejected":[]}
/// {"serviceAccount":"shop/wp","epoch":"6f1c..","version":42,"rejected":[]}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "WireAck", into = "WireAck")]
pub struct Ack {
    pub subscriber: Subscriber,
    pub epoch: String,
    pub version: u64,
    pub rejected: Vec<Rejected>,
}

/// An [`Ack`] as written: the subscriber as two optional fields, of which exactly one is set.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireAck {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    service_account: Option<String>,
    epoch: String,
    version: u64,
    #[serde(default)]
    rejected: Vec<Rejected>,
}

/// Why a name does not read as a [`Subscriber`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscriberError {
    #[error("name the subscriber: `node` (a node's proxy) or `serviceAccount` (a proxy with its own identity)")]
    Missing,
    #[error("`node` and `serviceAccount` exclude each other: name the subscriber once")]
    Both,
    #[error("serviceAccount {0:?} is not <namespace>/<name>")]
    NotServiceAccount(String),
}

impl Subscriber {
    /// `<namespace>/<name>` as a service account; only the shape is checked (the controller
    /// compares it with the caller's credential, which it validated).
    pub fn service_account(text: &str) -> Result<Subscriber, SubscriberError> {
        match text.split_once('/') {
            Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Subscriber::ServiceAccount { namespace: namespace.to_owned(), name: name.to_owned() })
            }
            _ => Err(SubscriberError::NotServiceAccount(text.chars().take(300).collect())),
        }
    }

    /// From the two ways of naming a subscriber (query parameters, acknowledgement fields),
    /// exactly one of which must be given.
    pub fn from_parts(node: Option<&str>, service_account: Option<&str>) -> Result<Subscriber, SubscriberError> {
        match (node, service_account) {
            (Some(node), None) => Ok(Subscriber::Node(node.to_owned())),
            (None, Some(account)) => Subscriber::service_account(account),
            (Some(_), Some(_)) => Err(SubscriberError::Both),
            (None, None) => Err(SubscriberError::Missing),
        }
    }

    /// The watch request's query naming this subscriber: `node=<node>` or
    /// `serviceAccount=<namespace>/<name>` (names never need percent-encoding).
    pub fn query(&self) -> String {
        match self {
            Subscriber::Node(node) => format!("node={node}"),
            Subscriber::ServiceAccount { namespace, name } => format!("serviceAccount={namespace}/{name}"),
        }
    }
}

/// `node node-1`, `service account shop/wp`.
impl std::fmt::Display for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subscriber::Node(node) => write!(f, "node {node}"),
            Subscriber::ServiceAccount { namespace, name } => write!(f, "service account {namespace}/{name}"),
        }
    }
}

impl TryFrom<WireAck> for Ack {
    type Error = SubscriberError;

    fn try_from(wire: WireAck) -> Result<Ack, SubscriberError> {
        let subscriber = Subscriber::from_parts(wire.node.as_deref(), wire.service_account.as_deref())?;
        Ok(Ack { subscriber, epoch: wire.epoch, version: wire.version, rejected: wire.rejected })
    }
}

impl From<Ack> for WireAck {
    fn from(ack: Ack) -> WireAck {
        let (node, service_account) = match ack.subscriber {
            Subscriber::Node(node) => (Some(node), None),
            Subscriber::ServiceAccount { namespace, name } => (None, Some(format!("{namespace}/{name}"))),
        };
        WireAck { node, service_account, epoch: ack.epoch, version: ack.version, rejected: ack.rejected }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("watch message is not valid JSON of a known type: {0}")]
    Malformed(String),
    #[error("watch stream skipped from version {have} to {got}; resubscribing for a snapshot")]
    Gap { have: u64, got: u64 },
    #[error("watch stream changed epoch from {have:?} to {got:?} without a snapshot; resubscribing")]
    Epoch { have: String, got: String },
    #[error("watch stream sent a {0} before any snapshot")]
    NoSnapshot(&'static str),
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum WireMessage {
    Snapshot {
        epoch: String,
        version: u64,
        resources: Vec<serde_json::Value>,
    },
    Resumed {
        epoch: String,
        version: u64,
    },
    Delta {
        epoch: String,
        version: u64,
        #[serde(default)]
        upserts: Vec<serde_json::Value>,
        #[serde(default)]
        deletes: Vec<Key>,
    },
    Heartbeat {
        epoch: String,
        version: u64,
    },
}

impl Message {
    /// Decodes one line of the stream (without its newline).
    pub fn decode(line: &str) -> Result<Message, WatchError> {
        let wire: WireMessage = serde_json::from_str(line).map_err(|e| WatchError::Malformed(e.to_string()))?;
        Ok(match wire {
            WireMessage::Snapshot { epoch, version, resources } => {
                Message::Snapshot { epoch, version, resources: resources.into_iter().map(decode_resource).collect() }
            }
            WireMessage::Resumed { epoch, version } => Message::Resumed { epoch, version },
            WireMessage::Delta { epoch, version, upserts, deletes } => {
                Message::Delta { epoch, version, upserts: upserts.into_iter().map(decode_resource).collect(), deletes }
            }
            WireMessage::Heartbeat { epoch, version } => Message::Heartbeat { epoch, version },
        })
    }

    pub fn epoch(&self) -> &str {
        match self {
            Message::Snapshot { epoch, .. }
            | Message::Resumed { epoch, .. }
            | Message::Delta { epoch, .. }
            | Message::Heartbeat { epoch, .. } => epoch,
        }
    }

    pub fn version(&self) -> u64 {
        match self {
            Message::Snapshot { version, .. }
            | Message::Resumed { version, .. }
            | Message::Delta { version, .. }
            | Message::Heartbeat { version, .. } => *version,
        }
    }

    /// The heartbeat line (with its newline) for a stream at `version`.
    pub fn heartbeat_line(epoch: &str, version: u64) -> String {
        line(&WireMessage::Heartbeat { epoch: epoch.to_owned(), version })
    }
}

/// One resource of a message: valid, or rejected with the reason (its kind and name as
/// well as they can be read).
fn decode_resource(value: serde_json::Value) -> Result<Resource, Rejected> {
    let (kind, name) = (
        value.get("kind").and_then(|v| v.as_str()).unwrap_or("?").to_owned(),
        value.get("name").and_then(|v| v.as_str()).unwrap_or("?").to_owned(),
    );
    let rejected = |reason: String| Rejected { kind: kind.clone(), name: name.clone(), reason };
    let wire: Wire = serde_json::from_value(value).map_err(|e| rejected(e.to_string()))?;
    Resource::from_wire(wire).map_err(|e| rejected(e.to_string()))
}

/// One message as a line of JSON, newline included. The message types are plain structs;
/// serializing them cannot fail.
fn line(message: &WireMessage) -> String {
    let mut s = serde_json::to_string(message).unwrap_or_default();
    s.push('\n');
    s
}

/// Where a subscriber stands: the epoch and version it last applied. It checks that each
/// message follows the last one, and is what a subscriber presents to resume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: String,
    pub version: u64,
}

impl Cursor {
    /// Whether a snapshot was ever applied.
    pub fn is_set(&self) -> bool {
        !self.epoch.is_empty()
    }

    /// Checks that `message` may be applied next, and advances past it.
    pub fn advance(&mut self, message: &Message) -> Result<(), WatchError> {
        match message {
            Message::Snapshot { epoch, version, .. } => {
                *self = Cursor { epoch: epoch.clone(), version: *version };
                return Ok(());
            }
            Message::Resumed { .. } | Message::Heartbeat { .. } if !self.is_set() => {
                return Err(WatchError::NoSnapshot(if matches!(message, Message::Resumed { .. }) {
                    "resumed message"
                } else {
                    "heartbeat"
                }));
            }
            Message::Delta { .. } if !self.is_set() => return Err(WatchError::NoSnapshot("delta")),
            _ => {}
        }
        if message.epoch() != self.epoch {
            return Err(WatchError::Epoch { have: self.epoch.clone(), got: message.epoch().to_owned() });
        }
        let expected = match message {
            // No delta follows the largest version: a stream that sends one is broken (it
            // must not wrap around to 0, nor overflow).
            Message::Delta { .. } => self.version.checked_add(1),
            _ => Some(self.version),
        };
        match expected {
            Some(version) if version == message.version() => {
                self.version = version;
                Ok(())
            }
            _ => Err(WatchError::Gap { have: self.version, got: message.version() }),
        }
    }
}

/// A change to the model, as a source or the translation produces it.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Upsert(Resource),
    Delete(Key),
}

/// What a new subscriber is sent first.
#[derive(Debug)]
pub enum Start {
    /// The whole state, as one line.
    Snapshot(String),
    /// A `resumed` line followed by every delta after the subscriber's version.
    Resume(Vec<Arc<str>>),
}

/// A delta kept for subscribers that resume.
#[derive(Debug)]
struct Logged {
    version: u64,
    line: Arc<str>,
}

/// The controller's end: the current resources and the recent deltas, each encoded once.
#[derive(Debug)]
pub struct History {
    epoch: String,
    version: u64,
    /// Every current resource, encoded (its `Wire` JSON).
    current: BTreeMap<Key, Arc<str>>,
    log: VecDeque<Logged>,
    log_bytes: usize,
    max_log_bytes: usize,
}

/// What one [`History::commit`] changed.
#[derive(Debug)]
pub struct Committed {
    pub version: u64,
    /// The delta line (newline included), shared with the log.
    pub line: Arc<str>,
    pub upserts: usize,
    pub deletes: usize,
}

impl History {
    /// An empty history at version 0. `max_log_bytes` bounds the deltas kept for resuming
    /// subscribers; older deltas are forgotten, and their subscribers get a snapshot.
    pub fn new(epoch: impl Into<String>, max_log_bytes: usize) -> History {
        History {
            epoch: epoch.into(),
            version: 0,
            current: BTreeMap::new(),
            log: VecDeque::new(),
            log_bytes: 0,
            max_log_bytes,
        }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// The number of current resources.
    pub fn len(&self) -> usize {
        self.current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }

    /// The current resource encoded under `key`.
    pub fn get(&self, key: &Key) -> Option<&str> {
        self.current.get(key).map(|s| &**s)
    }

    /// The keys of every current resource.
    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.current.keys()
    }

    /// Applies `changes` as one new version. Upserts equal to what is current and deletes of
    /// absent resources are no change; if nothing changes, no version is made and `None` is
    /// returned. Later changes to the same key win.
    pub fn commit(&mut self, changes: impl IntoIterator<Item = Change>) -> Option<Committed> {
        let mut effective: BTreeMap<Key, Option<String>> = BTreeMap::new();
        for change in changes {
            match change {
                Change::Upsert(r) => {
                    effective.insert(r.key(), Some(r.encode()));
                }
                Change::Delete(k) => {
                    effective.insert(k, None);
                }
            }
        }
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        for (key, encoded) in effective {
            match encoded {
                Some(text) if self.current.get(&key).map(|c| &**c) != Some(text.as_str()) => {
                    let text: Arc<str> = Arc::from(text);
                    self.current.insert(key, text.clone());
                    upserts.push(text);
                }
                None if self.current.remove(&key).is_some() => deletes.push(key),
                _ => {}
            }
        }
        if upserts.is_empty() && deletes.is_empty() {
            return None;
        }
        self.version += 1;
        let line = delta_line(&self.epoch, self.version, &upserts, &deletes);
        self.log_bytes += line.len();
        self.log.push_back(Logged { version: self.version, line: line.clone() });
        while self.log_bytes > self.max_log_bytes
            && let Some(old) = self.log.pop_front()
        {
            self.log_bytes -= old.line.len();
        }
        Some(Committed { version: self.version, line, upserts: upserts.len(), deletes: deletes.len() })
    }

    /// What a subscriber that last applied `since` (if any) is sent first: the deltas it
    /// missed when they are all still in the log, otherwise a snapshot.
    pub fn start(&self, since: Option<&Cursor>) -> Start {
        if let Some(c) = since
            && c.epoch == self.epoch
            && c.version <= self.version
        {
            let oldest_kept = self.log.front().map_or(self.version + 1, |l| l.version);
            // Resumable if every version after `c.version` is still logged.
            if c.version + 1 >= oldest_kept {
                let mut lines: Vec<Arc<str>> =
                    vec![Arc::from(line(&WireMessage::Resumed { epoch: self.epoch.clone(), version: c.version }))];
                lines.extend(self.log.iter().filter(|l| l.version > c.version).map(|l| l.line.clone()));
                return Start::Resume(lines);
            }
        }
        Start::Snapshot(self.snapshot_line())
    }

    /// The whole state as one `snapshot` line, newline included.
    pub fn snapshot_line(&self) -> String {
        let mut out = String::with_capacity(64 + self.current.values().map(|r| r.len() + 1).sum::<usize>());
        out.push_str(r#"{"type":"snapshot","epoch":"#);
        out.push_str(&json_string(&self.epoch));
        out.push_str(r#","version":"#);
        out.push_str(&self.version.to_string());
        out.push_str(r#","resources":["#);
        join(&mut out, self.current.values().map(|r| &**r));
        out.push_str("]}\n");
        out
    }
}

/// A `delta` line from already-encoded upserts.
fn delta_line(epoch: &str, version: u64, upserts: &[Arc<str>], deletes: &[Key]) -> Arc<str> {
    let mut out = String::with_capacity(64 + upserts.iter().map(|r| r.len() + 1).sum::<usize>() + deletes.len() * 64);
    out.push_str(r#"{"type":"delta","epoch":"#);
    out.push_str(&json_string(epoch));
    out.push_str(r#","version":"#);
    out.push_str(&version.to_string());
    out.push_str(r#","upserts":["#);
    join(&mut out, upserts.iter().map(|r| &**r));
    out.push_str(r#"],"deletes":"#);
    out.push_str(&serde_json::to_string(deletes).unwrap_or_else(|_| "[]".into()));
    out.push_str("}\n");
    Arc::from(out)
}

fn join<'a>(out: &mut String, items: impl Iterator<Item = &'a str>) {
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(item);
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Snapshot;
    use crate::resource::Kind;

    fn snapshot() -> Snapshot {
        Snapshot::from_yaml(
            r#"
workloads:
  - {name: a, namespace: ns, node: n1, addresses: [10.244.1.2], labels: {app: api}, enrolled: true}
  - {name: b, namespace: ns, node: n2, addresses: [10.244.2.2], labels: {app: api}, enrolled: true}
services:
  - {name: api, namespace: ns, vips: [10.96.0.10], ports: [{port: 80, targetPort: 8080}], selector: {app: api}}
"#,
        )
        .unwrap()
    }

    fn upserts(s: &Snapshot) -> Vec<Change> {
        s.resources().map(Change::Upsert).collect()
    }

    #[test]
    fn a_snapshot_then_deltas_decode_and_follow_each_other() {
        let s = snapshot();
        let mut h = History::new("e1", 1 << 20);
        assert_eq!(h.commit(upserts(&s)).unwrap().version, 1);
        let Start::Snapshot(first) = h.start(None) else { panic!("no cursor: snapshot") };
        let mut cursor = Cursor::default();
        let msg = Message::decode(first.trim_end()).unwrap();
        cursor.advance(&msg).unwrap();
        let Message::Snapshot { resources, version: 1, .. } = msg else { panic!("{msg:?}") };
        assert_eq!(resources.len(), 3);
        assert!(resources.iter().all(Result::is_ok));

        let mut b = s.workloads[1].clone();
        b.labels.insert("version".into(), "v2".into());
        let c = h.commit([Change::Upsert(Resource::Workload(b.clone()))]).unwrap();
        assert_eq!((c.version, c.upserts, c.deletes), (2, 1, 0));
        let msg = Message::decode(c.line.trim_end()).unwrap();
        cursor.advance(&msg).unwrap();
        let Message::Delta { upserts, deletes, .. } = msg else { panic!() };
        assert_eq!(upserts.into_iter().map(Result::unwrap).collect::<Vec<_>>(), [Resource::Workload(b)]);
        assert!(deletes.is_empty());

        let c = h.commit([Change::Delete(Key::new(Kind::Workload, "ns/a"))]).unwrap();
        let msg = Message::decode(c.line.trim_end()).unwrap();
        cursor.advance(&msg).unwrap();
        let Message::Delta { deletes, .. } = msg else { panic!() };
        assert_eq!(deletes, [Key::new(Kind::Workload, "ns/a")]);
        assert_eq!(cursor, Cursor { epoch: "e1".into(), version: 3 });
    }

    #[test]
    fn unchanged_resources_make_no_version() {
        let s = snapshot();
        let mut h = History::new("e1", 1 << 20);
        h.commit(upserts(&s)).unwrap();
        assert!(h.commit(upserts(&s)).is_none(), "same resources again");
        assert!(h.commit([Change::Delete(Key::new(Kind::Workload, "ns/zz"))]).is_none(), "absent");
        assert_eq!(h.version(), 1);
    }

    #[test]
    fn resume_sends_only_what_was_missed_and_falls_back_to_a_snapshot() {
        let s = snapshot();
        let mut h = History::new("e1", 1 << 20);
        h.commit(upserts(&s)).unwrap();
        let at1 = Cursor { epoch: "e1".into(), version: 1 };
        for v in ["v2", "v3", "v4"] {
            let mut a = s.workloads[0].clone();
            a.labels.insert("version".into(), v.into());
            h.commit([Change::Upsert(Resource::Workload(a))]).unwrap();
        }
        let Start::Resume(lines) = h.start(Some(&at1)) else { panic!("resumable") };
        assert_eq!(lines.len(), 4, "resumed + three deltas");
        let mut cursor = at1.clone();
        for l in &lines {
            cursor.advance(&Message::decode(l.trim_end()).unwrap()).unwrap();
        }
        assert_eq!(cursor.version, 4);
        let Start::Resume(lines) = h.start(Some(&Cursor { epoch: "e1".into(), version: 4 })) else { panic!() };
        assert_eq!(lines.len(), 1, "up to date: only the resumed line");
        assert!(matches!(h.start(Some(&Cursor { epoch: "e0".into(), version: 1 })), Start::Snapshot(_)), "other epoch");
        assert!(matches!(h.start(Some(&Cursor { epoch: "e1".into(), version: 9 })), Start::Snapshot(_)), "future");

        // A log too small for all three deltas: the subscriber at 1 needs a snapshot.
        let mut small = History::new("e1", 1);
        small.commit(upserts(&s)).unwrap();
        let mut a = s.workloads[0].clone();
        a.labels.insert("x".into(), "y".into());
        small.commit([Change::Upsert(Resource::Workload(a))]).unwrap();
        assert!(matches!(small.start(Some(&at1)), Start::Snapshot(_)));
    }

    #[test]
    fn cursor_refuses_gaps_and_foreign_epochs() {
        let mut c = Cursor::default();
        let delta =
            |epoch: &str, version| Message::Delta { epoch: epoch.into(), version, upserts: vec![], deletes: vec![] };
        assert!(matches!(c.advance(&delta("e", 1)), Err(WatchError::NoSnapshot(_))));
        c.advance(&Message::Snapshot { epoch: "e".into(), version: 5, resources: vec![] }).unwrap();
        assert!(matches!(c.advance(&delta("e", 7)), Err(WatchError::Gap { have: 5, got: 7 })));
        assert!(matches!(c.advance(&delta("f", 6)), Err(WatchError::Epoch { .. })));
        c.advance(&delta("e", 6)).unwrap();
        c.advance(&Message::Heartbeat { epoch: "e".into(), version: 6 }).unwrap();
        assert_eq!(c.version, 6);
    }

    /// A crash input of the `watch_stream` fuzz target: a snapshot at the largest version, then a
    /// delta, overflowed the cursor (a panic; in a release build, a wrap to version 0 that
    /// accepted the delta).
    #[test]
    fn cursor_refuses_a_delta_past_the_largest_version() {
        let stream = "{\"type\":\"snapshot\",\"epoch\":\"e\",\"version\":18446744073709551615,\"resources\":[]}\n\
                      {\"type\":\"delta\",\"epoch\":\"e\",\"version\":0}";
        let mut lines = stream.lines().map(|l| Message::decode(l).unwrap());
        let mut c = Cursor::default();
        c.advance(&lines.next().unwrap()).unwrap();
        let wrapped = lines.next().unwrap();
        assert!(matches!(c.advance(&wrapped), Err(WatchError::Gap { have: u64::MAX, got: 0 })));
        let again = Message::Delta { epoch: "e".into(), version: u64::MAX, upserts: vec![], deletes: vec![] };
        assert!(matches!(c.advance(&again), Err(WatchError::Gap { have: u64::MAX, got: u64::MAX })));
        assert_eq!(c, Cursor { epoch: "e".into(), version: u64::MAX });
    }

    #[test]
    fn bad_resources_are_rejected_alone() {
        let line = r#"{"type":"snapshot","epoch":"e","version":1,"resources":[
            {"kind":"Service","name":"ns/s","spec":{"name":"s","namespace":"ns","vips":["10.96.0.1"],"ports":[{"port":80}]}},
            {"kind":"Service","name":"ns/t","spec":{"name":"t","namespace":"ns","vips":["10.96.0.2"],"ports":[{"port":0}]}},
            {"kind":"Gadget","name":"x","spec":{}}]}"#
            .replace('\n', "");
        let Message::Snapshot { resources, .. } = Message::decode(&line).unwrap() else { panic!() };
        assert!(resources[0].is_ok());
        let r = resources[1].as_ref().unwrap_err();
        assert_eq!((r.kind.as_str(), r.name.as_str()), ("Service", "ns/t"));
        assert!(r.reason.contains("port 0"), "{}", r.reason);
        assert_eq!(resources[2].as_ref().unwrap_err().kind, "Gadget");
        assert!(matches!(Message::decode("{\"type\":\"gossip\"}"), Err(WatchError::Malformed(_))));
        assert!(matches!(Message::decode("not json"), Err(WatchError::Malformed(_))));
    }

    #[test]
    fn heartbeat_lines_decode() {
        let l = Message::heartbeat_line("e", 3);
        assert!(l.ends_with('\n'));
        assert!(matches!(Message::decode(l.trim_end()).unwrap(), Message::Heartbeat { version: 3, .. }));
    }

    #[test]
    fn an_ack_names_exactly_one_subscriber() {
        let node =
            Ack { subscriber: Subscriber::Node("node-1".into()), epoch: "e".into(), version: 4, rejected: vec![] };
        // ztunnel's form, byte for byte as before service accounts existed.
        let text = serde_json::to_string(&node).unwrap();
        assert_eq!(text, r#"{"node":"node-1","epoch":"e","version":4,"rejected":[]}"#);
        assert_eq!(serde_json::from_str::<Ack>(&text).unwrap(), node);

        let waypoint = Ack {
            subscriber: Subscriber::ServiceAccount { namespace: "shop".into(), name: "wp".into() },
            ..node.clone()
        };
        let text = serde_json::to_string(&waypoint).unwrap();
        assert_eq!(text, r#"{"serviceAccount":"shop/wp","epoch":"e","version":4,"rejected":[]}"#);
        assert_eq!(serde_json::from_str::<Ack>(&text).unwrap(), waypoint);
        assert_eq!(
            serde_json::from_str::<Ack>(r#"{"serviceAccount":"shop/wp","epoch":"e","version":4}"#).unwrap(),
            waypoint,
            "rejected may be absent"
        );

        for (body, why) in [
            (r#"{"epoch":"e","version":4}"#, "name the subscriber"),
            (r#"{"node":"n1","serviceAccount":"shop/wp","epoch":"e","version":4}"#, "exclude each other"),
            (r#"{"serviceAccount":"wp","epoch":"e","version":4}"#, "not <namespace>/<name>"),
            (r#"{"serviceAccount":"shop/wp/x","epoch":"e","version":4}"#, "not <namespace>/<name>"),
            (r#"{"serviceAccount":"/wp","epoch":"e","version":4}"#, "not <namespace>/<name>"),
            (r#"{"node":"n1","pod":"x","epoch":"e","version":4}"#, "unknown field"),
        ] {
            let err = serde_json::from_str::<Ack>(body).unwrap_err().to_string();
            assert!(err.contains(why), "{body}: {err}");
        }
    }

    #[test]
    fn subscribers_name_themselves_in_the_watch_query() {
        assert_eq!(Subscriber::Node("node-1".into()).query(), "node=node-1");
        let wp = Subscriber::service_account("shop/wp").unwrap();
        assert_eq!(wp, Subscriber::ServiceAccount { namespace: "shop".into(), name: "wp".into() });
        assert_eq!(wp.query(), "serviceAccount=shop/wp");
        assert_eq!(wp.to_string(), "service account shop/wp");
        assert_eq!(Subscriber::from_parts(Some("n1"), None).unwrap().to_string(), "node n1");
        assert_eq!(Subscriber::from_parts(None, None), Err(SubscriberError::Missing));
        assert_eq!(Subscriber::from_parts(Some("n1"), Some("shop/wp")), Err(SubscriberError::Both));
    }
}
