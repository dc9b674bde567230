//! The local config file: the cluster view of a ztunnel running without a controller. It is
//! read at startup (an invalid file stops startup with the reason) and watched for changes;
//! a changed file that is invalid is rejected with a message naming the field, and ztunnel
//! keeps running on the last good one.
//!
//! Watching runs on a thread of its own, not on the runtime's workers: they carry the
//! traffic, and a periodic wake-up among them moves that work between worker threads
//! (ARCHITECTURE §4, "No timer on a quiet node"). The thread wakes when inotify reports a
//! complete new version in the file's directory (a file written and closed, or renamed in:
//! editors, `kubectl cp`, and the symlink swap of a Kubernetes ConfigMap volume) and every
//! reload interval regardless, since some file systems (network mounts, some bind mounts)
//! report nothing. It reads the file and hands its contents to the runtime only when they
//! differ from the last version handed over.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshapi::{ModelError, Snapshot};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::sync::watch;
use tracing::{debug, error, info};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read config file {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("config file {path} rejected: {error}")]
    Invalid { path: PathBuf, error: ModelError },
}

/// Reads and validates the file.
pub fn load(path: &Path) -> Result<(Snapshot, Vec<u8>), LoadError> {
    let bytes = std::fs::read(path).map_err(|error| LoadError::Read { path: path.to_owned(), error })?;
    let snapshot = parse(path, &bytes)?;
    Ok((snapshot, bytes))
}

/// Parses file contents.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Snapshot, LoadError> {
    let text = std::str::from_utf8(bytes).map_err(|e| LoadError::Invalid {
        path: path.to_owned(),
        error: ModelError::Yaml(format!("not UTF-8: {e}")),
    })?;
    Snapshot::from_yaml(text).map_err(|error| LoadError::Invalid { path: path.to_owned(), error })
}

/// Starts watching `path`, whose contents `applied` are in use. The receiver sees each new
/// version of the contents (the latest only, if several land before it looks); the thread
/// ends at its next look once the receiver is dropped.
pub fn watch(path: PathBuf, applied: Vec<u8>, interval: Duration) -> std::io::Result<watch::Receiver<Vec<u8>>> {
    let (tx, rx) = watch::channel(applied);
    let events = Events::new(&path);
    std::thread::Builder::new().name("weft-config-watch".into()).spawn(move || {
        let mut last_error: Option<String> = None;
        while !tx.is_closed() {
            match std::fs::read(&path) {
                Ok(bytes) => {
                    if last_error.take().is_some() {
                        info!(file = %path.display(), "config file readable again");
                    }
                    tx.send_if_modified(|current| {
                        let changed = *current != bytes;
                        if changed {
                            *current = bytes;
                        }
                        changed
                    });
                }
                Err(e) => {
                    // Once per distinct error: the file stays missing for a while when it does.
                    let e = e.to_string();
                    if last_error.as_ref() != Some(&e) {
                        error!(file = %path.display(), error = %e, "cannot read config file; keeping the last good config");
                        last_error = Some(e);
                    }
                }
            }
            events.wait(interval);
        }
    })?;
    Ok(rx)
}

/// The inotify watch on the file's directory (and on its target's, when the path is a
/// symbolic link into another directory), or nothing where inotify is not available.
struct Events {
    inotify: Option<Inotify>,
}

impl Events {
    fn new(path: &Path) -> Events {
        let inotify = match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
            Ok(inotify) => inotify,
            Err(e) => {
                info!(error = %e, "no inotify: the config file is only read every reload interval");
                return Events { inotify: None };
            }
        };
        // Only events that mark a complete version: a file created (or truncated) and still
        // being written would be read half-written, and rejected for it.
        let mask = AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_MOVED_TO;
        let mut dirs = vec![dir_of(path)];
        if let Ok(target) = std::fs::canonicalize(path) {
            dirs.push(dir_of(&target));
        }
        dirs.dedup();
        let mut watched = 0;
        for dir in &dirs {
            match inotify.add_watch(dir.as_path(), mask) {
                Ok(_) => watched += 1,
                Err(e) => {
                    info!(dir = %dir.display(), error = %e, "cannot watch the config file's directory; the file is read every reload interval")
                }
            }
        }
        Events { inotify: (watched > 0).then_some(inotify) }
    }

    /// Returns after an event or `timeout`, whichever comes first; any other change in the
    /// directory (another file) wakes it too, and costs one read of the file.
    fn wait(&self, timeout: Duration) {
        let Some(inotify) = &self.inotify else {
            std::thread::sleep(timeout);
            return;
        };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)) {
                // Timed out: the deadline has passed, unless the poll's cap (24 days) came first.
                Ok(0) => {}
                Ok(_) => {
                    // One read covers every event queued.
                    while matches!(inotify.read_events(), Ok(events) if !events.is_empty()) {}
                    return;
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    debug!(error = %e, "polling inotify failed; reading the config file on the interval");
                    std::thread::sleep(left);
                    return;
                }
            }
        }
    }
}

/// The directory a path's entry lives in (`.` for a bare file name).
fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory holding `cluster.yaml` ("one", as applied), watched on `interval`:
    /// the directory, the file, and the watcher's receiver.
    fn watched(test: &str, interval: Duration) -> (PathBuf, PathBuf, watch::Receiver<Vec<u8>>) {
        let dir = std::env::temp_dir().join(format!("weft-local-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.yaml");
        std::fs::write(&path, "one").unwrap();
        let rx = watch(path.clone(), b"one".to_vec(), interval).unwrap();
        (dir, path, rx)
    }

    /// Waits (bounded) for the watcher to hand over a version.
    fn next(rx: &mut watch::Receiver<Vec<u8>>, within: Duration) -> Option<Vec<u8>> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        runtime.block_on(async {
            tokio::time::timeout(within, rx.changed()).await.ok()?.ok()?;
            Some(rx.borrow_and_update().clone())
        })
    }

    /// With an hour between reads, only inotify can have reported these: a file renamed over
    /// the config (as a ConfigMap volume and most tools replace it) and one written in place.
    /// Rewriting the same contents hands nothing over.
    #[test]
    fn a_replaced_or_rewritten_file_is_read_at_once() {
        let (dir, path, mut rx) = watched("events", Duration::from_secs(3600));
        // The thread's first look finds what is applied: nothing to hand over.
        assert_eq!(next(&mut rx, Duration::from_millis(300)), None);

        std::fs::write(dir.join("cluster.yaml.tmp"), "two").unwrap();
        std::fs::rename(dir.join("cluster.yaml.tmp"), &path).unwrap();
        let started = Instant::now();
        assert_eq!(next(&mut rx, Duration::from_secs(5)).as_deref(), Some(&b"two"[..]));
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());

        std::fs::write(&path, "three").unwrap();
        assert_eq!(next(&mut rx, Duration::from_secs(5)).as_deref(), Some(&b"three"[..]));

        std::fs::write(&path, "three").unwrap();
        assert_eq!(next(&mut rx, Duration::from_millis(300)), None, "the same contents again");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A change no event reports (a write into a file kept open) is found by the read on the
    /// interval.
    #[test]
    fn a_change_without_an_event_is_found_on_the_interval() {
        use std::io::Write;
        let (dir, path, mut rx) = watched("interval", Duration::from_millis(100));
        let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b" more").unwrap();
        assert_eq!(next(&mut rx, Duration::from_secs(5)).as_deref(), Some(&b"one more"[..]));
        drop(file);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
