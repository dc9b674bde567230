//! Graceful shutdown, the one primitive every listener uses.
//!
//! [`channel`] returns a [`Trigger`] (held by whoever decides to shut down) and a [`Watch`]
//! (cloned into every accept loop, connection and stream). [`Trigger::drain`] goes through two
//! phases:
//! 1. *draining*: watchers stop accepting new work (listeners stop accepting, HTTP/2
//!    connections send GOAWAY) and let in-flight work finish;
//! 2. *closing*, if the deadline passes first: watchers abandon what is left.
//!
//! It returns once every `Watch` is dropped, so "drained" means no task still runs; or, past
//! the deadline, after a one-second grace for the tasks to close, whether or not they did.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// How long [`Trigger::drain`] waits, after the deadline, for tasks to close.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

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
    /// Cancelled with the closing phase: what per-connection waiters wait on (smaller than a
    /// `watch` wait).
    closing: CancellationToken,
    /// Every `Watch` holds a sender; `recv()` returns `None` once all are dropped.
    done: mpsc::Receiver<()>,
}

/// Held by every task that must finish before shutdown completes.
#[derive(Clone)]
pub struct Watch {
    phase: watch::Receiver<Phase>,
    closing: CancellationToken,
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
    let closing = CancellationToken::new();
    (
        Trigger { phase: phase_tx, closing: closing.clone(), done: alive_rx },
        Watch { phase: phase_rx, closing, _alive: alive_tx },
    )
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
            self.closing.cancel();
            // Tasks that watch `closing` end at once. One that cannot see it (a tunnel whose
            // app neither reads nor writes, blocked on its socket) must not hold shutdown
            // forever: after a short grace it is abandoned to the runtime's shutdown.
            if tokio::time::timeout(CLOSE_GRACE, self.done.recv()).await.is_err() {
                tracing::warn!(grace = ?CLOSE_GRACE, "tasks still running after the drain deadline; abandoning them");
            }
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
        self.closing.cancelled().await
    }

    /// Runs `work` holding this watch (so the drain waits for it) until it ends or the drain
    /// deadline passes, whichever is first. For per-connection tasks: it adds about a hundred
    /// bytes to the task, where an `async` block selecting on [`Watch::closing`] would also
    /// store `work` twice (captured, then being polled).
    pub fn until_closing<F: Future<Output = ()>>(self, work: F) -> UntilClosing<F> {
        UntilClosing { work, closing: self.closing.clone().cancelled_owned(), _watch: self }
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

pin_project_lite::pin_project! {
    /// See [`Watch::until_closing`].
    pub struct UntilClosing<F> {
        #[pin]
        work: F,
        #[pin]
        closing: WaitForCancellationFutureOwned,
        _watch: Watch,
    }
}

impl<F: Future<Output = ()>> Future for UntilClosing<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.work.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if this.closing.poll(cx).is_ready() {
            tracing::debug!("task cut by the drain deadline");
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// Waits for SIGTERM or SIGINT, the signals that start a program's drain, and logs which.
pub async fn terminated() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
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
    async fn a_task_deaf_to_closing_is_abandoned_after_the_grace() {
        let (trigger, watch) = channel();
        let deaf = tokio::spawn(async move {
            let _held = watch;
            std::future::pending::<()>().await;
        });
        let started = tokio::time::Instant::now();
        assert_eq!(trigger.drain(Duration::from_secs(5)).await, Outcome::DeadlineExceeded);
        assert_eq!(started.elapsed(), Duration::from_secs(5) + CLOSE_GRACE, "returned after deadline and grace");
        assert!(!deaf.is_finished(), "the deaf task is abandoned, not waited for");
        deaf.abort();
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

    #[tokio::test(start_paused = true)]
    async fn until_closing_cuts_work_at_the_deadline_and_holds_the_drain() {
        // Bounded: a cut that never comes fails the test instead of hanging it.
        tokio::time::timeout(Duration::from_secs(60), until_closing_cuts()).await.expect("the endless task was cut");
    }

    async fn until_closing_cuts() {
        let (trigger, watch) = channel();
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        let finishing = watch.clone().until_closing(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = done_tx.send(()).await;
        });
        let endless = watch.until_closing(std::future::pending());
        let (a, b) = (tokio::spawn(finishing), tokio::spawn(endless));
        // The endless task keeps the drain waiting until the deadline, then is cut.
        assert_eq!(trigger.drain(Duration::from_secs(5)).await, Outcome::DeadlineExceeded);
        assert!(done_rx.recv().await.is_some(), "work that ends in time runs to its end");
        a.await.unwrap();
        b.await.unwrap();
    }
}
