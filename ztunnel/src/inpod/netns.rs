//! Network namespaces: a handle to one, and running a closure inside it.
//!
//! A socket belongs for life to the namespace it was created in (ARCHITECTURE §8). ztunnel
//! creates pods' listeners and outbound sockets with [`Netns::run`]: the calling thread enters
//! the pod's namespace, runs a short synchronous closure (create, bind, set options), and
//! returns to ztunnel's own namespace before anything else runs on that thread. Closures
//! never await.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use nix::sched::{CloneFlags, setns};

/// An open handle to a network namespace (keeps it alive while held).
#[derive(Clone, Debug)]
pub struct Netns {
    file: Arc<File>,
    inode: u64,
}

impl PartialEq for Netns {
    fn eq(&self, other: &Self) -> bool {
        self.inode == other.inode
    }
}

impl Netns {
    pub fn open(path: &Path) -> io::Result<Netns> {
        let file = File::open(path)?;
        let inode = file.metadata()?.ino();
        Ok(Netns { file: Arc::new(file), inode })
    }

    /// A namespace from an open descriptor of it (one received from another ztunnel, which
    /// handed its pods over: `crate::handoff`).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Netns> {
        let file = File::from(fd);
        let inode = file.metadata()?.ino();
        Ok(Netns { file: Arc::new(file), inode })
    }

    /// ztunnel's own namespace, recorded the first time this is called (at startup, from
    /// the main thread, before any namespace switch).
    pub fn host() -> io::Result<Netns> {
        static HOST: OnceLock<Netns> = OnceLock::new();
        if let Some(h) = HOST.get() {
            return Ok(h.clone());
        }
        let h = Netns::open(Path::new("/proc/thread-self/ns/net"))?;
        Ok(HOST.get_or_init(|| h).clone())
    }

    /// Identifies the namespace (the nsfs inode).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// The open descriptor, to be handed to another ztunnel.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Runs `f` with the calling thread inside this namespace, then moves the thread back to
    /// ztunnel's own namespace.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let host = Netns::host()?;
        setns(&*self.file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let out = f();
        if let Err(e) = setns(&*host.file, CloneFlags::CLONE_NEWNET) {
            // A thread stuck in a pod's namespace would open later sockets there: there is no
            // safe way to continue.
            panic!("cannot return to ztunnel's own network namespace: {e}");
        }
        Ok(out)
    }
}
