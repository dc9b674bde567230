//! The waypoint programmed by the controller: it subscribes with its service account's
//! credential and applies the stream to its state, as ztunnel does (`docs/PROTOCOL.md`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hbone::TrustStore;
use meshapi::watch::{Ack, Change, Cursor, Message};
use meshapi::{Key, Resource};
use tracing::{debug, info, warn};
use ztunnel::control::client::Client;
use ztunnel::state::StateStore;

/// Three missed heartbeats mean the stream is dead even if TCP has not noticed.
const STREAM_IDLE: Duration = Duration::from_secs(45);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub struct Watcher {
    pub client: Arc<Client>,
    pub state: StateStore,
    pub trust: TrustStore,
    /// Set once the first snapshot (with the trust bundle) is applied.
    pub synced: tokio::sync::watch::Sender<bool>,
    held: BTreeMap<Key, String>,
    cursor: Cursor,
}

impl Watcher {
    pub fn new(
        client: Arc<Client>,
        state: StateStore,
        trust: TrustStore,
        synced: tokio::sync::watch::Sender<bool>,
    ) -> Self {
        Watcher { client, state, trust, synced, held: BTreeMap::new(), cursor: Cursor::default() }
    }

    /// Subscribes and applies, forever (aborted at shutdown).
    pub async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.client.watch(Some(&self.cursor)).await {
                Ok(mut lines) => {
                    info!(since = ?self.cursor, "subscribed to the controller");
                    backoff = BACKOFF_MIN;
                    loop {
                        let line = match tokio::time::timeout(STREAM_IDLE, lines.next()).await {
                            Ok(Ok(Some(line))) => line,
                            Ok(Ok(None)) => break warn!("the controller closed the watch stream; resubscribing"),
                            Ok(Err(e)) => break warn!(error = %e, "watch stream failed; resubscribing"),
                            Err(_) => break warn!(idle = ?STREAM_IDLE, "watch stream silent; resubscribing"),
                        };
                        if let Err(e) = self.apply_line(&line).await {
                            warn!(error = %e, "watch stream out of order; resubscribing for a snapshot");
                            self.cursor = Cursor::default();
                            break;
                        }
                    }
                }
                Err(e) => warn!(error = %e, retry_in = ?backoff, "cannot subscribe to the controller"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn apply_line(&mut self, line: &str) -> Result<(), meshapi::watch::WatchError> {
        let message = Message::decode(line)?;
        let mut next = self.cursor.clone();
        next.advance(&message)?;
        let control_only = matches!(message, Message::Heartbeat { .. } | Message::Resumed { .. });
        let start = matches!(message, Message::Snapshot { .. } | Message::Resumed { .. });
        let (changes, rejected) = ztunnel::control::changes_of(&mut self.held, message);
        for c in &changes {
            if let Change::Upsert(Resource::TrustBundle(bundle)) = c {
                ztunnel::control::install_trust(&self.trust, bundle);
                self.client.trust_also(self.trust.bundle().roots());
            }
        }
        let n = changes.len();
        if n > 0 {
            self.state.apply(changes);
        }
        self.cursor = next;
        if !control_only {
            debug!(version = self.cursor.version, changes = n, "configuration applied");
            let ack = Ack {
                subscriber: self.client.subscriber().clone(),
                epoch: self.cursor.epoch.clone(),
                version: self.cursor.version,
                rejected,
            };
            if let Err(e) = self.client.ack(&ack).await {
                warn!(error = %e, "cannot report the applied version to the controller");
            }
        }
        if start {
            self.synced.send_replace(true);
        }
        Ok(())
    }
}
