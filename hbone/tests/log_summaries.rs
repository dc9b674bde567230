//! `limits::lines_suppressed`: the signal a flushing loop waits on instead of a timer. In a
//! binary of its own, since the signal is process-wide.

use std::time::Duration;

use hbone::limits::{Admit, LogGate, Rate, lines_suppressed};

/// Whether `lines_suppressed` returns within a short wait.
async fn signalled() -> bool {
    tokio::time::timeout(Duration::from_millis(200), lines_suppressed()).await.is_ok()
}

#[tokio::test]
async fn a_flushing_loop_is_woken_by_the_first_suppressed_line_only() {
    let rate = Rate { count: 1, per: Duration::from_secs(3600) };
    let gate = LogGate::default();
    assert!(!signalled().await, "nothing suppressed yet");

    assert_eq!(gate.admit(rate), Admit::Write { suppressed_before: 0 }, "the window's first line");
    assert!(!signalled().await, "a written line owes no summary");

    assert_eq!(gate.admit(rate), Admit::Suppress);
    assert!(signalled().await, "the first suppressed line wakes the loop");
    assert!(!signalled().await, "once");

    assert_eq!(gate.admit(rate), Admit::Suppress);
    assert!(!signalled().await, "more lines owed by the same summary do not wake it again");

    assert_eq!(gate.take_suppressed(), 2, "the summary takes both");
    assert_eq!(gate.admit(rate), Admit::Suppress);
    assert!(signalled().await, "after a summary, the next suppressed line wakes it again");
}
