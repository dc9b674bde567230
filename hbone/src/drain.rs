//! Graceful shutdown, the one primitive every listener uses.
//!
//! [`channel`] returns a [`Trigger`] (held by whoever decides to shut down) and a [`Watch`]
//! (cloned into every accept loop, connection and stream). [`Trigger::drain`] goes through two
//! phases:
//! 1. *draining*: watchers stop accepting new work (listeners stop accepting, HTTP/2
//!    connections send GOAWAY) and let in-flight work finish;
//! 2. *closing*, if the deadline passes first: watchers abandon what is left.
//!
//! It returns once every `Watch` is dropped, so "drained" means no task still runs.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Where a drain is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Running,
    Draining,
    Closing,
}

/// Starts a drain. Dropping it without calling [`Trigger::drain`] never signals.
pub struct Trigger {
    phase: watch::Sender<Phase>,
    /// Every `Watch` holds a sender; `recv()` returns `None` once all are dropped.
    done: mpsc::Receiver<()>,
}

/// Held by every task that must finish before shutdown completes.
#[derive(Clone)]
pub struct Watch {
    phase: watch::Receiver<Phase>,
    _alive: mpsc::Sender<()>,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every task finished within the deadline.
    Graceful,
    /// The deadline passed; remaining tasks were told to close.
    DeadlineExceeded,
}

pub fn channel() -> (Trigger, Watch) {
    let (phase_tx, phase_rx) = watch::channel(Phase::Running);
    let (alive_tx, alive_rx) = mpsc::channel(1);
    (Trigger { phase: phase_tx, done: alive_rx }, Watch { phase: phase_rx, _alive: alive_tx })
}

impl Trigger {
    /// Signals draining, waits up to `deadline` for every watcher to finish, then signals
    /// closing and waits for the rest.
    pub async fn drain(mut self, deadline: Duration) -> Outcome {
        let _ = self.phase.send(Phase::Draining);
        let outcome = match tokio::time::timeout(deadline, self.done.recv()).await {
            Ok(_) => Outcome::Graceful,
            Err(_) => Outcome::DeadlineExceeded,
        };
        if outcome == Outcome::DeadlineExceeded {
            let _ = self.phase.send(Phase::Closing);
            self.done.recv().await;
        }
        outcome
    }
}

impl Watch {
    /// Resolves once a drain starts: stop taking new work.
    pub async fn draining(&self) {
        self.reached(Phase::Draining).await
    }

    /// Resolves once the drain deadline has passed: abandon what is left.
    pub async fn closing(&self) {
        self.reached(Phase::Closing).await
    }

    pub fn is_draining(&self) -> bool {
        *self.phase.borrow() >= Phase::Draining
    }

    async fn reached(&self, phase: Phase) {
        let mut rx = self.phase.clone();
        // An error means the trigger was dropped without draining: never resolve.
        if rx.wait_for(|p| *p >= phase).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn graceful_when_watchers_finish() {
        let (trigger, watch) = channel();
        let task = tokio::spawn(async move {
            watch.draining().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        assert_eq!(trigger.drain(Duration::from_secs(5)).await, Outcome::Graceful);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn closing_after_deadline() {
        let (trigger, watch) = channel();
        let task = tokio::spawn(async move {
            watch.draining().await;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(3600)) => false,
                _ = watch.closing() => true,
            }
        });
        assert_eq!(trigger.drain(Duration::from_secs(5)).await, Outcome::DeadlineExceeded);
        assert!(task.await.unwrap(), "watcher saw the closing phase");
    }
}
