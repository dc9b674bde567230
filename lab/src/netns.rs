//! Network namespaces: creating and deleting them the way `ip netns` does (a bind mount of the
//! namespace onto `/run/netns/<name>`), entering them from a fresh thread, finding the processes
//! inside one, and cleaning up what a crashed run left behind.
//!
//! Entering a namespace is always done on a *new* thread that exits afterwards: `setns` changes
//! only the calling thread, so the caller's threads (and the async runtime's) stay where they
//! were, and a socket created on that thread belongs to the namespace for life.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::LabError;
use crate::process::{self, LabProcess, LabShared, log_root};

/// Where namespaces are named, as with `ip netns`: `ip netns exec <name> ...` works on a running lab.
pub const NETNS_DIR: &str = "/run/netns";

/// Every lab namespace's name starts with this, followed by the creating process's pid and a
/// dash: `weft-<pid>-...`. [`clean_leftovers`] relies on it.
pub const NAME_PREFIX: &str = "weft-";

/// How long the logs of a dead lab (failed test, crashed run) are kept.
const KEEP_LOGS: Duration = Duration::from_secs(24 * 3600);

/// How long teardown waits for killed processes to leave a namespace.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// A network namespace created by a [`Lab`](crate::Lab): the fabric, a node or a pod.
///
/// The handle is cheap to clone. It stays valid while its lab lives; after the lab is torn down,
/// every operation fails with an error naming the namespace.
#[derive(Clone)]
pub struct Netns {
    name: String,
    path: PathBuf,
    /// The owning lab's process registry and log directory: processes spawned here are killed
    /// when the lab is torn down.
    lab: Arc<LabShared>,
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netns").field("name", &self.name).field("path", &self.path).finish()
    }
}

impl Netns {
    /// The namespace's name, e.g. `weft-4242-0-echo-node1`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`: open it and `setns` to enter, or use `ip netns exec <name>` by hand.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a fresh thread that has entered this namespace, and returns its result.
    ///
    /// Sockets created by `f` belong to this namespace for life and may be handed back to any
    /// thread (e.g. a `TcpListener` bound here, then served by a thread of the caller). If `f`
    /// panics, the panic is resumed on the caller's thread.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
        self.run_named("run", f)
    }

    /// Starts `cmd` inside this namespace and returns a handle that kills it when dropped.
    ///
    /// The child is spawned from a thread that has entered the namespace, so it inherits it (no
    /// `pre_exec` needed). Its standard input is `/dev/null`; its standard output and error go,
    /// interleaved, to one log file that [`LabProcess::logs`] reads. The lab also kills it on
    /// teardown.
    pub fn spawn(&self, cmd: Command) -> Result<LabProcess, LabError> {
        process::spawn(self, cmd)
    }

    /// Runs `cmd` inside this namespace to completion and returns its output, like
    /// [`Command::output`], but bounded: after `timeout` the process is killed and the result is
    /// [`LabError::Timeout`] carrying what it printed so far.
    pub fn output(&self, cmd: Command, timeout: Duration) -> Result<Output, LabError> {
        process::output(self, cmd, timeout)
    }

    pub(crate) fn new(name: String, lab: Arc<LabShared>) -> Netns {
        let path = Path::new(NETNS_DIR).join(&name);
        Netns { name, path, lab }
    }

    pub(crate) fn lab(&self) -> &Arc<LabShared> {
        &self.lab
    }

    /// [`Netns::run`] with a word for thread names and error messages.
    pub(crate) fn run_named<T: Send>(&self, what: &str, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
        let file = File::open(&self.path)
            .map_err(|e| LabError::namespace(&self.name, format!("open {}", self.path.display()), e))?;
        let name = self.name.as_str();
        thread::scope(|scope| {
            let handle = thread::Builder::new()
                .name(format!("lab-{what}"))
                .spawn_scoped(scope, move || -> Result<T, LabError> {
                    setns(&file, CloneFlags::CLONE_NEWNET)
                        .map_err(|e| LabError::namespace(name, format!("enter the namespace (setns) to {what}"), e))?;
                    Ok(f())
                })
                .map_err(|e| LabError::Thread {
                    netns: name.to_owned(),
                    what: what.to_owned(),
                    problem: format!("could not be started: {e}"),
                })?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Creates the namespace and its `/run/netns` entry, as `ip netns add` does.
    ///
    /// A leftover entry of the same name can only come from an earlier process that had our pid
    /// (names carry a per-process sequence number), so it is removed and creation retried once.
    pub(crate) fn create(&self) -> Result<(), LabError> {
        ensure_netns_dir()?;
        let created = File::options().write(true).create_new(true).open(&self.path);
        match created {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let problems = delete_namespace(&self.name);
                if !problems.is_empty() {
                    return Err(LabError::Teardown { problems });
                }
                File::options().write(true).create_new(true).open(&self.path).map_err(|e| {
                    LabError::namespace(
                        &self.name,
                        format!("create {} after removing a stale one", self.path.display()),
                        e,
                    )
                })?;
            }
            Err(e) => {
                return Err(LabError::namespace(&self.name, format!("create {}", self.path.display()), e));
            }
        }
        let name = self.name.as_str();
        let path = self.path.as_path();
        thread::scope(|scope| {
            let handle = thread::Builder::new()
                .name("lab-create".to_owned())
                .spawn_scoped(scope, move || -> Result<(), LabError> {
                    unshare(CloneFlags::CLONE_NEWNET)
                        .map_err(|e| LabError::namespace(name, "create the namespace (unshare CLONE_NEWNET)", e))?;
                    mount(Some("/proc/thread-self/ns/net"), path, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(
                        |e| {
                            LabError::namespace(
                                name,
                                format!("bind-mount the new namespace onto {}", path.display()),
                                e,
                            )
                        },
                    )
                })
                .map_err(|e| LabError::Thread {
                    netns: name.to_owned(),
                    what: "create".to_owned(),
                    problem: format!("could not be started: {e}"),
                })?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

/// Removes the namespaces that crashed runs left behind: every `/run/netns/weft-<pid>-...` whose
/// process `<pid>` is no longer alive. Processes still inside such a namespace (e.g. a pod's
/// pause process, orphaned by the crash) are killed first.
///
/// Namespaces of live processes are never touched, so labs of tests running in parallel (in this
/// or another process) are safe. Returns the names removed. [`Lab::new`](crate::Lab::new) calls
/// this first; `weft` tools may call it too.
pub fn clean_leftovers() -> Result<Vec<String>, LabError> {
    let entries = match fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LabError::io("list the namespaces in", NETNS_DIR, e)),
    };
    let mut removed = Vec::new();
    let mut problems = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| LabError::io("list the namespaces in", NETNS_DIR, e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
        let Some(pid) = owner_pid(&name) else { continue };
        if pid_alive(pid) {
            continue;
        }
        let mut step_problems = delete_namespace(&name);
        if step_problems.is_empty() {
            removed.push(name);
        } else {
            problems.append(&mut step_problems);
        }
    }
    problems.extend(clean_old_logs());
    if problems.is_empty() { Ok(removed) } else { Err(LabError::Teardown { problems }) }
}

/// Removes log directories of labs whose process is dead, once they are [`KEEP_LOGS`] old:
/// teardown keeps the logs of failed tests, and crashed runs leave theirs.
fn clean_old_logs() -> Vec<String> {
    let root = log_root();
    let Ok(entries) = fs::read_dir(&root) else { return Vec::new() };
    let mut problems = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let Some(pid) = entry.file_name().to_str().and_then(owner_pid) else { continue };
        let age = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        if pid_alive(pid) || age.is_none_or(|age| age < KEEP_LOGS) {
            continue;
        }
        if let Err(e) = fs::remove_dir_all(entry.path()) {
            problems.push(format!("remove old lab logs {}: {e}", entry.path().display()));
        }
    }
    problems
}

/// The pid in a lab namespace name `weft-<pid>-...`, or `None` for any other name.
pub(crate) fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let (pid, _) = rest.split_once('-')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// True when process `pid` exists and is not a zombie. When in doubt (e.g. /proc unreadable),
/// answers true: a live process's namespaces must never be removed.
pub(crate) fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // "pid (comm) S ...": comm may hold spaces and parentheses, the state follows the last ')'.
            let state = stat.rfind(')').and_then(|i| stat[i + 1..].trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X'))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(_) => true,
    }
}

/// Deletes a lab namespace by name: kills the processes inside it, unmounts and removes its
/// `/run/netns` entry. Each step runs even when an earlier one failed (teardown after a half
/// finished build); returns what failed, empty when all went well. Missing pieces are fine.
pub(crate) fn delete_namespace(name: &str) -> Vec<String> {
    let path = Path::new(NETNS_DIR).join(name);
    let mut problems = Vec::new();
    if let Some(id) = namespace_id(&path) {
        problems.extend(kill_processes_in(name, id));
    }
    match umount2(&path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (creation failed before the bind mount); ENOENT: already gone.
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => problems.push(format!("unmount {} (namespace {name}): {e}", path.display())),
    }
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => problems.push(format!("remove {} (namespace {name}): {e}", path.display())),
    }
    problems
}

/// Identifies a namespace: device and inode of its nsfs file (the same through `/run/netns/x`
/// and `/proc/<pid>/ns/net`). `None` when the path is missing or not a mounted namespace.
pub(crate) fn namespace_id(path: &Path) -> Option<(u64, u64)> {
    let meta = fs::metadata(path).ok()?;
    // An unmounted /run/netns entry is an empty regular file on the host filesystem; it must not
    // be mistaken for a namespace. A mounted one is on nsfs, whose files are empty too, so tell
    // them apart by comparing with the directory's device.
    let dir_dev = fs::metadata(path.parent()?).ok()?.dev();
    if meta.dev() == dir_dev {
        return None;
    }
    Some((meta.dev(), meta.ino()))
}

/// The pids of the processes inside the namespace at `path` (e.g. [`Netns::path`]), found as a
/// node proxy finds pods: by comparing `/proc/<pid>/ns/net` with it. This process is left out
/// (its threads may visit lab namespaces, its main thread never does); processes that vanish
/// while scanning are skipped. Empty when `path` is not a mounted namespace.
pub fn processes_in_namespace(path: &Path) -> Vec<u32> {
    match namespace_id(path) {
        Some(id) => processes_in(id),
        None => Vec::new(),
    }
}

/// See [`processes_in_namespace`]; `id` is from [`namespace_id`].
pub(crate) fn processes_in(id: (u64, u64)) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|&pid| pid != me)
        .filter(|pid| {
            let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
            fs::metadata(ns).map(|m| (m.dev(), m.ino()) == id).unwrap_or(false)
        })
        .collect()
}

/// SIGKILLs every process inside namespace `id`, then waits (bounded) until none is left.
fn kill_processes_in(name: &str, id: (u64, u64)) -> Vec<String> {
    let mut problems = Vec::new();
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let pids = processes_in(id);
        if pids.is_empty() {
            return problems;
        }
        if Instant::now() >= deadline {
            problems.push(format!("processes {pids:?} still in namespace {name} {KILL_WAIT:?} after SIGKILL"));
            return problems;
        }
        for pid in pids {
            let Ok(raw) = i32::try_from(pid) else { continue };
            match kill(Pid::from_raw(raw), Signal::SIGKILL) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => problems.push(format!("SIGKILL pid {pid} in namespace {name}: {e}")),
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Makes sure `/run/netns` exists and is a shared mount point, as `ip netns add` does, so that
/// namespaces bind-mounted there are visible from other mount namespaces. Done once per process.
fn ensure_netns_dir() -> Result<(), LabError> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let result = DONE.get_or_init(|| {
        let dir = Path::new(NETNS_DIR);
        fs::create_dir_all(dir).map_err(|e| format!("create {NETNS_DIR}: {e}"))?;
        let shared = || mount(None::<&str>, dir, None::<&str>, MsFlags::MS_SHARED | MsFlags::MS_REC, None::<&str>);
        match shared() {
            Ok(()) => Ok(()),
            // Not a mount point yet: bind it onto itself first, then make it shared.
            Err(Errno::EINVAL) => {
                mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
                    .map_err(|e| format!("bind-mount {NETNS_DIR} onto itself: {e}"))?;
                shared().map_err(|e| format!("make {NETNS_DIR} a shared mount: {e}"))
            }
            Err(e) => Err(format!("make {NETNS_DIR} a shared mount: {e}")),
        }
    });
    result.clone().map_err(|problem| LabError::io("prepare", NETNS_DIR, io::Error::other(problem)))
}

/// `name` reduced to lowercase ASCII letters, digits and single dashes, at most `max_len` long:
/// a safe fragment of a namespace or file name.
pub(crate) fn sanitize(name: &str, max_len: usize) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
        if out.len() >= max_len {
            break;
        }
    }
    let out = out.trim_matches('-').to_owned();
    if out.is_empty() { "x".to_owned() } else { out }
}

/// The file name of `program` for log names, e.g. `sleep` for `/usr/bin/sleep`.
pub(crate) fn program_base(program: &OsStr) -> String {
    let base = Path::new(program).file_name().unwrap_or(program);
    sanitize(&base.to_string_lossy(), 24)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pids() {
        assert_eq!(owner_pid("weft-123-0-test-fabric"), Some(123));
        assert_eq!(owner_pid("weft-x-0"), None);
        assert_eq!(owner_pid("weft-123"), None);
        assert_eq!(owner_pid("other-123-0"), None);
        assert_eq!(owner_pid("weft--1-"), None);
    }

    #[test]
    fn sanitized_names() {
        assert_eq!(sanitize("tests::pod_to_pod", 24), "tests-pod-to-pod");
        assert_eq!(sanitize("__", 24), "x");
        assert_eq!(sanitize("ABCDEFGHIJ", 4), "abcd");
        assert_eq!(program_base(OsStr::new("/usr/bin/sleep")), "sleep");
    }

    #[test]
    fn this_process_is_alive() {
        assert!(pid_alive(std::process::id()));
    }
}
