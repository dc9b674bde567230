//! ztunnel programmed by the controller.
//!
//! ```text
//!  controller ──watch stream──► Watcher: decode ─► cursor check ─► state.apply(changes)
//!      ▲                                              │             trust bundle → TLS trust store
//!      │ ack (version, rejected resources)            ├─► manager.reconcile() (local pods)
//!      └──────────────────────────────────────────────┘─► persist (last applied config)
//! ```
//!
//! The watcher subscribes for its node, applies each message as it comes (a snapshot is
//! turned into the changes against what is held, so it too touches only what differs),
//! reports the version it applied with the resources it rejected, and writes what it applied
//! to the node's state directory. When the controller is unreachable it keeps serving with
//! what it last applied and resubscribes with backoff, resuming from its cursor (the
//! controller then sends only what was missed, or a snapshot if it no longer can). A ztunnel
//! that starts while the controller is down starts from the persisted configuration.

pub mod client;
pub mod persist;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use meshapi::watch::{Ack, Change, Cursor, Message, Rejected};
use meshapi::{Key, Resource};
use tracing::{debug, info, warn};

use crate::manager::Manager;
use crate::proxy::Proxy;
use client::Client;

/// Three missed heartbeats (the controller sends one every 15 s on an idle stream) mean the
/// stream is dead even if TCP has not noticed.
const STREAM_IDLE: Duration = Duration::from_secs(45);

/// Backoff between subscription attempts: from 200 ms (a restarting controller is back
/// quickly) doubling to 5 s (a controller that is down is not hammered by every node).
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Applies the controller's stream to the proxy.
pub struct Watcher {
    client: Arc<Client>,
    proxy: Arc<Proxy>,
    manager: Arc<Manager>,
    persist: Option<persist::ConfigFile>,
    /// What is applied, each resource in its wire form (what is persisted).
    held: BTreeMap<Key, String>,
    cursor: Cursor,
    /// Set once a snapshot (or a resumption) was applied.
    synced: tokio::sync::watch::Sender<bool>,
}

/// What one message changed.
struct Outcome {
    changes: usize,
    rejected: Vec<Rejected>,
}

impl Watcher {
    /// A watcher starting from `held` at `cursor` (from the persisted configuration, or
    /// empty).
    pub fn new(
        client: Arc<Client>,
        proxy: Arc<Proxy>,
        manager: Arc<Manager>,
        persist: Option<persist::ConfigFile>,
        start: persist::Applied,
        synced: tokio::sync::watch::Sender<bool>,
    ) -> Watcher {
        Watcher { client, proxy, manager, persist, held: start.resources, cursor: start.cursor, synced }
    }

    /// Subscribes and applies, forever (the task is aborted at shutdown).
    pub async fn run(mut self) {
        let client = self.client.clone();
        follow(&client, &mut self).await
    }

    /// Decodes, checks and applies one message; acknowledges and persists it.
    async fn apply_line(&mut self, line: &str) -> Result<(), meshapi::watch::WatchError> {
        let message = Message::decode(line)?;
        let mut next = self.cursor.clone();
        next.advance(&message)?;
        let is_heartbeat = matches!(message, Message::Heartbeat { .. } | Message::Resumed { .. });
        let is_start = matches!(message, Message::Snapshot { .. } | Message::Resumed { .. });
        let outcome = self.apply(message);
        self.cursor = next;
        if is_heartbeat {
            if is_start {
                self.synced.send_replace(true);
            }
            return Ok(());
        }
        self.proxy.metrics.config_applied.inc();
        if !outcome.rejected.is_empty() {
            self.proxy.metrics.config_rejected.inc();
            warn!(version = self.cursor.version, rejected = ?outcome.rejected, "resources rejected; the rest applied");
        }
        debug!(version = self.cursor.version, changes = outcome.changes, "configuration applied");
        if outcome.changes > 0 {
            let pending = self.manager.reconcile().await;
            if pending > 0 {
                debug!(pending, "pods not enrolled yet; retried on the next change or tick");
            }
        }
        let ack = Ack {
            subscriber: self.client.subscriber().clone(),
            epoch: self.cursor.epoch.clone(),
            version: self.cursor.version,
            rejected: outcome.rejected,
        };
        if let Err(e) = self.client.ack(&ack).await {
            warn!(error = %e, "cannot report the applied version to the controller");
        }
        if let Some(p) = &self.persist {
            p.save(&self.cursor, &self.held);
        }
        if is_start {
            self.synced.send_replace(true);
        }
        Ok(())
    }

    /// Applies a decoded message to the proxy's state.
    fn apply(&mut self, message: Message) -> Outcome {
        let (changes, rejected) = changes_of(&mut self.held, message);
        for c in &changes {
            if let Change::Upsert(Resource::TrustBundle(bundle)) = c {
                install_bundle(&self.proxy, bundle);
                self.client.trust_also(self.proxy.trust.bundle().roots());
            }
        }
        let n = changes.len();
        if n > 0 {
            self.proxy.state.apply(changes);
        }
        Outcome { changes: n, rejected }
    }
}

/// A proxy that applies the controller's watch stream (ztunnel's [`Watcher`], a waypoint's).
pub trait Follower: Send {
    /// Where the stream should resume (unset: a snapshot).
    fn cursor(&self) -> &Cursor;
    /// Forgets the cursor: the next subscription starts with a snapshot.
    fn reset(&mut self);
    /// Decodes, checks and applies one line of the stream.
    fn apply_line(&mut self, line: &str) -> impl Future<Output = Result<(), meshapi::watch::WatchError>> + Send;
}

/// Subscribes for `follower` and hands it every line, forever: resubscribes (resuming from
/// its cursor) when the stream ends, fails or goes silent past three heartbeats, with a
/// backoff from 200 ms to 5 s while the controller cannot be reached, and with a snapshot
/// when a line is out of order.
pub async fn follow(client: &Client, follower: &mut impl Follower) {
    let mut backoff = BACKOFF_MIN;
    loop {
        match client.watch(Some(follower.cursor())).await {
            Ok(mut lines) => {
                info!(since = ?follower.cursor(), "subscribed to the controller");
                backoff = BACKOFF_MIN;
                loop {
                    let line = match tokio::time::timeout(STREAM_IDLE, lines.next()).await {
                        Ok(Ok(Some(line))) => line,
                        Ok(Ok(None)) => {
                            warn!("the controller closed the watch stream; resubscribing");
                            break;
                        }
                        Ok(Err(e)) => {
                            warn!(error = %e, "watch stream failed; resubscribing");
                            break;
                        }
                        Err(_) => {
                            warn!(idle = ?STREAM_IDLE, "watch stream silent; resubscribing");
                            break;
                        }
                    };
                    if let Err(e) = follower.apply_line(&line).await {
                        // The stream cannot be trusted past this point: start over with a
                        // snapshot, keeping what is applied meanwhile.
                        warn!(error = %e, "watch stream out of order; resubscribing for a snapshot");
                        follower.reset();
                        break;
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, retry_in = ?backoff, "cannot subscribe to the controller; serving the last applied configuration")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

impl Follower for Watcher {
    fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    fn reset(&mut self) {
        self.cursor = Cursor::default();
    }

    fn apply_line(&mut self, line: &str) -> impl Future<Output = Result<(), meshapi::watch::WatchError>> + Send {
        Watcher::apply_line(self, line)
    }
}

/// The changes a decoded message makes to what is `held` (each resource in its wire form),
/// and the resources it carried that could not be used. A snapshot becomes the changes
/// against what is held; only what differs is returned; `held` is updated to match.
pub fn changes_of(held: &mut BTreeMap<Key, String>, message: Message) -> (Vec<Change>, Vec<Rejected>) {
    let mut rejected = Vec::new();
    let mut changes = Vec::new();
    match message {
        Message::Snapshot { resources, .. } => {
            let mut seen = std::collections::HashSet::new();
            for r in resources {
                match r {
                    Ok(resource) => {
                        seen.insert(resource.key());
                        changes.push(Change::Upsert(resource));
                    }
                    Err(rej) => rejected.push(rej),
                }
            }
            changes.extend(held.keys().filter(|k| !seen.contains(*k)).cloned().map(Change::Delete));
        }
        Message::Delta { upserts, deletes, .. } => {
            for r in upserts {
                match r {
                    Ok(resource) => changes.push(Change::Upsert(resource)),
                    Err(rej) => rejected.push(rej),
                }
            }
            changes.extend(deletes.into_iter().map(Change::Delete));
        }
        Message::Resumed { .. } | Message::Heartbeat { .. } => {}
    }
    // Only what differs from what is held reaches the state.
    changes.retain(|c| match c {
        Change::Upsert(r) => held.get(&r.key()).is_none_or(|h| *h != r.encode()),
        Change::Delete(k) => held.contains_key(k),
    });
    for c in &changes {
        match c {
            Change::Upsert(r) => {
                held.insert(r.key(), r.encode());
            }
            Change::Delete(k) => {
                held.remove(k);
            }
        }
    }
    (changes, rejected)
}

/// Makes `bundle` the roots peers must chain to. New handshakes use it at once; established
/// connections stay up.
pub fn install_bundle(proxy: &Proxy, bundle: &meshapi::TrustBundle) {
    install_trust(&proxy.trust, bundle)
}

/// Makes `bundle` the roots `trust` holds (any proxy's trust store).
pub fn install_trust(trust: &hbone::TrustStore, bundle: &meshapi::TrustBundle) {
    match hbone::TrustBundle::from_pem(&bundle.roots.concat()).and_then(|b| b.with_trust_domain(&bundle.trust_domain)) {
        Ok(b) => {
            trust.replace(b);
            info!(trust_domain = %bundle.trust_domain, roots = bundle.roots.len(), "trust bundle installed");
        }
        Err(e) => warn!(error = %e, "trust bundle from the controller is unusable; keeping the current one"),
    }
}
