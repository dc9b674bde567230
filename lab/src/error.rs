//! The lab's one error type: every variant names the namespace, interface, address or file
//! involved and the step that failed, so that a failed test says what to look at.

use std::error::Error as StdError;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while building, using or tearing down a lab.
///
/// Decide what to do from the variant and its fields (or the predicates below), never from the
/// message text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// The process lacks the capabilities that network namespaces need.
    #[error(
        "the lab needs root privileges (CAP_NET_ADMIN and CAP_SYS_ADMIN) to build network namespaces, \
         but this process {detail}; run the tests as root (e.g. `sudo -E cargo test`)"
    )]
    NotRoot {
        /// What was found missing, e.g. "runs as uid 1000 without CAP_SYS_ADMIN".
        detail: String,
    },

    /// A system call or file operation on a namespace (create, enter, mount, unmount, delete)
    /// failed.
    #[error("{step} (network namespace {netns}): {source}")]
    Namespace {
        /// The namespace's name (its file under `/run/netns`).
        netns: String,
        /// What the lab was doing, e.g. "bind-mount the new namespace onto /run/netns/x".
        step: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// A netlink request inside a namespace failed (link, address or route).
    #[error("netlink in namespace {netns}: {step}: {source}")]
    Netlink {
        /// The namespace the request was made in.
        netns: String,
        /// The request, naming the interface and address, e.g. "add 10.244.1.1/24 to cni0".
        step: String,
        /// The netlink error (kernel error code or a decoding error).
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },

    /// Writing or reading a sysctl inside a namespace failed.
    #[error("sysctl {path} in namespace {netns}: {source}")]
    Sysctl {
        /// The namespace the sysctl belongs to.
        netns: String,
        /// The file under /proc/sys.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// A process could not be started inside a namespace.
    #[error("start {program} in namespace {netns}: {source}")]
    Spawn {
        /// The namespace the process was to run in.
        netns: String,
        /// The program, as given to `Command::new`.
        program: String,
        /// The operating system's error (e.g. the program was not found).
        #[source]
        source: io::Error,
    },

    /// Signalling, waiting for or reaping a lab process failed.
    #[error("{step} process {name} (pid {pid}): {source}")]
    Process {
        /// The process's lab name (program and sequence number).
        name: String,
        /// Its pid.
        pid: u32,
        /// What the lab was doing, e.g. "send SIGTERM to".
        step: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// A signal was sent to a lab process that had already exited.
    #[error("process {name} (pid {pid}) already exited ({status}); cannot send {signal}")]
    ProcessExited {
        /// The process's lab name.
        name: String,
        /// Its pid.
        pid: u32,
        /// How it ended.
        status: String,
        /// The signal that was not sent.
        signal: String,
    },

    /// A thread that had entered a namespace panicked or could not be started.
    #[error("thread for {what} in namespace {netns} {problem}")]
    Thread {
        /// The namespace the thread entered.
        netns: String,
        /// What the thread was for.
        what: String,
        /// "panicked" or "could not be started: ...".
        problem: String,
    },

    /// A bounded wait ran out.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited, with context (e.g. the end of a process's log).
        what: String,
        /// The bound.
        after: Duration,
    },

    /// The packet capture failed (socket, receive).
    #[error("packet capture in namespace {netns}: {step}: {source}")]
    Capture {
        /// The namespace captured.
        netns: String,
        /// What failed, e.g. "open AF_PACKET socket".
        step: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// The capture reached one of its bounds and stopped recording, so its result is incomplete.
    #[error(
        "packet capture in namespace {netns} stopped recording at {bound}; \
         the result would be incomplete: capture a shorter exchange"
    )]
    CaptureTruncated {
        /// The namespace captured.
        netns: String,
        /// The bound reached, e.g. "its memory bound of 67108864 bytes".
        bound: String,
    },

    /// A file operation outside a namespace (log files, /proc) failed.
    #[error("{step} {}: {source}", path.display())]
    Io {
        /// What the lab was doing, e.g. "read the log file".
        step: String,
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// The caller asked for something the lab cannot build (no such node, too many pods, ...).
    #[error("invalid lab request: {0}")]
    Invalid(String),

    /// Teardown finished but some steps failed; each entry names the step and the object.
    #[error("lab teardown left problems: {}", problems.join("; "))]
    Teardown {
        /// One message per failed step.
        problems: Vec<String>,
    },
}

impl LabError {
    /// True when the process lacks root privileges: the test should be skipped (or fail in CI).
    pub fn is_not_root(&self) -> bool {
        matches!(self, LabError::NotRoot { .. })
    }

    /// True when a bounded wait ran out.
    pub fn is_timeout(&self) -> bool {
        matches!(self, LabError::Timeout { .. })
    }

    pub(crate) fn namespace(netns: &str, step: impl Into<String>, source: impl Into<io::Error>) -> LabError {
        LabError::Namespace { netns: netns.to_owned(), step: step.into(), source: source.into() }
    }

    pub(crate) fn netlink(
        netns: &str,
        step: impl Into<String>,
        source: impl StdError + Send + Sync + 'static,
    ) -> LabError {
        LabError::Netlink { netns: netns.to_owned(), step: step.into(), source: Box::new(source) }
    }

    pub(crate) fn io(step: impl Into<String>, path: impl Into<PathBuf>, source: io::Error) -> LabError {
        LabError::Io { step: step.into(), path: path.into(), source }
    }
}
