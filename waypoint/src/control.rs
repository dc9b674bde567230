//! The waypoint programmed by the controller: it subscribes with its service account's
//! credential and applies the stream to its state, as ztunnel does (`docs/PROTOCOL.md`).

use std::collections::BTreeMap;
use std::sync::Arc;

use hbone::TrustStore;
use meshapi::watch::{Ack, Change, Cursor, Message};
use meshapi::{Key, Resource};
use tracing::{debug, warn};
use ztunnel::control::client::Client;
use ztunnel::state::StateStore;

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
        let client = self.client.clone();
        ztunnel::control::follow(&client, &mut self).await
    }

    /// Decodes, checks and applies one message; acknowledges it.
    async fn apply(&mut self, line: &str) -> Result<(), meshapi::watch::WatchError> {
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

impl ztunnel::control::Follower for Watcher {
    fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    fn reset(&mut self) {
        self.cursor = Cursor::default();
    }

    fn apply_line(
        &mut self,
        line: &str,
    ) -> impl std::future::Future<Output = Result<(), meshapi::watch::WatchError>> + Send {
        self.apply(line)
    }
}
