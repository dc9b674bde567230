//! Waking the directory source when its files change (inotify), instead of only polling.
//!
//! A scan of a large directory costs tens of milliseconds (10,000 files: about 30 ms, most of
//! it `statx` and `getdents64`), so a change found only by the next poll waits up to a whole
//! poll interval plus a scan. With inotify the source scans as soon as a file is written,
//! moved in or removed. Polling stays as the fallback: some file systems (network mounts,
//! some bind mounts) never report changes, and directories created after the watches were
//! set are only seen by the next scan.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tracing::debug;

/// Inotify watches on a directory and its subdirectories.
#[derive(Debug)]
pub struct Notify {
    inotify: Inotify,
}

impl Notify {
    /// Watches `root` and every directory below it; `None` if inotify is unavailable (the
    /// caller then only polls).
    pub fn new(root: &Path) -> Option<Notify> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| debug!(error = %e, "no inotify: the source directory is only polled"))
            .ok()?;
        let notify = Notify { inotify };
        notify.watch_tree(root, 0);
        Some(notify)
    }

    fn watch_tree(&self, dir: &Path, depth: usize) {
        // Bounded, as a scan is: a link loop must not recurse forever.
        if depth > 16 {
            return;
        }
        let events = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MODIFY;
        if let Err(e) = self.inotify.add_watch(dir, events) {
            debug!(dir = %dir.display(), error = %e, "cannot watch a directory; it is polled");
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                self.watch_tree(&entry.path(), depth + 1);
            }
        }
    }

    /// Waits until something in the watched directories changed, or `timeout` passed;
    /// whether something changed. Drains the events: one scan covers them all.
    pub fn wait(&self, timeout: Duration) -> bool {
        let millis = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
        let ready = matches!(poll(&mut fds, PollTimeout::from(millis)), Ok(n) if n > 0);
        if ready {
            // Several writes in a burst (a tool rewriting many files) make one scan: give
            // the burst a moment, then take every event queued.
            std::thread::sleep(Duration::from_millis(2));
            while matches!(self.inotify.read_events(), Ok(events) if !events.is_empty()) {}
        }
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_wakes_the_wait_and_silence_lets_it_time_out() {
        let dir = std::env::temp_dir().join(format!("weft-notify-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let notify = Notify::new(&dir).expect("inotify works here");
        assert!(!notify.wait(Duration::from_millis(50)), "nothing changed");
        let path = dir.join("sub").join("pod.yaml");
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            std::fs::write(path, "kind: Pod\n").unwrap();
        });
        let started = std::time::Instant::now();
        assert!(notify.wait(Duration::from_secs(5)), "the write in a subdirectory woke the wait");
        assert!(started.elapsed() < Duration::from_secs(2));
        writer.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
