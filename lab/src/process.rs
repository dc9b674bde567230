//! Processes started inside lab namespaces: their log files, signals, bounded waits, and the
//! lab-wide registry that kills whatever is still running at teardown.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::LabError;
use crate::netns::{Netns, program_base};

/// How often bounded waits look again.
const POLL: Duration = Duration::from_millis(5);

/// A process running inside a lab namespace. Dropping it kills it (SIGKILL) and reaps it.
///
/// Its standard output and error are written, interleaved, to a log file in the lab's log
/// directory; tests assert on them with [`LabProcess::logs`] and [`LabProcess::wait_for_log`].
pub struct LabProcess {
    slot: Arc<ProcSlot>,
}

impl std::fmt::Debug for LabProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LabProcess")
            .field("name", &self.slot.name)
            .field("pid", &self.slot.pid)
            .field("netns", &self.slot.netns)
            .finish()
    }
}

impl LabProcess {
    /// The process id (in the root pid namespace: the lab does not create pid namespaces).
    pub fn pid(&self) -> u32 {
        self.slot.pid
    }

    /// The lab's name for the process: the program's file name and a sequence number, e.g.
    /// `ztunnel-3`. Its log file is named after it.
    pub fn name(&self) -> &str {
        &self.slot.name
    }

    /// The namespace the process was started in.
    pub fn netns(&self) -> &str {
        &self.slot.netns
    }

    /// Sends `signal` (e.g. [`Signal::SIGTERM`] for a graceful shutdown). Fails with
    /// [`LabError::ProcessExited`] when the process has already exited and been reaped.
    pub fn signal(&self, signal: Signal) -> Result<(), LabError> {
        let mut state = self.slot.lock();
        self.slot.refresh(&mut state)?;
        match &*state {
            State::Running(_) => kill(self.slot.raw_pid()?, signal).map_err(|e| LabError::Process {
                name: self.slot.name.clone(),
                pid: self.slot.pid,
                step: format!("send {signal} to"),
                source: e.into(),
            }),
            State::Exited(status) => Err(LabError::ProcessExited {
                name: self.slot.name.clone(),
                pid: self.slot.pid,
                status: status.to_string(),
                signal: signal.to_string(),
            }),
        }
    }

    /// The exit status if the process has exited (reaping it), `None` while it runs.
    pub fn try_status(&self) -> Result<Option<ExitStatus>, LabError> {
        let mut state = self.slot.lock();
        self.slot.refresh(&mut state)?;
        Ok(match &*state {
            State::Running(_) => None,
            State::Exited(status) => Some(*status),
        })
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running then.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>, LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(POLL);
        }
    }

    /// Kills the process (SIGKILL), reaps it and returns its exit status (also when it had
    /// already exited by itself).
    pub fn kill(&self) -> Result<ExitStatus, LabError> {
        self.slot.kill_and_reap()
    }

    /// Everything the process has written to standard output and error so far (invalid UTF-8
    /// replaced).
    pub fn logs(&self) -> Result<String, LabError> {
        read_lossy(&self.slot.log_path)
    }

    /// The log file (standard output and error, interleaved).
    pub fn log_path(&self) -> &Path {
        &self.slot.log_path
    }

    /// Waits up to `timeout` until the logs contain `needle`, and returns the logs. Fails early
    /// if the process exits first; the error carries the end of the logs.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<String, LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            let logs = self.logs()?;
            if logs.contains(needle) {
                return Ok(logs);
            }
            let exited = self.try_status()?;
            if exited.is_some() || Instant::now() >= deadline {
                let how = match exited {
                    Some(status) => format!(" (the process exited first: {status})"),
                    None => String::new(),
                };
                return Err(LabError::Timeout {
                    what: format!(
                        "a log line containing {needle:?} from {} in namespace {}{how}; last output:\n{}",
                        self.slot.name,
                        self.slot.netns,
                        tail(&logs, 2000)
                    ),
                    after: timeout,
                });
            }
            thread::sleep(POLL * 4);
        }
    }
}

impl Drop for LabProcess {
    fn drop(&mut self) {
        if let Err(e) = self.slot.kill_and_reap() {
            eprintln!("lab: {e}");
        }
    }
}

/// Where labs keep process logs, one directory per lab: `<tmp>/weft-lab/`.
pub(crate) fn log_root() -> PathBuf {
    std::env::temp_dir().join("weft-lab")
}

/// What a lab shares with its namespaces and processes.
pub(crate) struct LabShared {
    /// Where process logs go: `<tmp>/weft-lab/<lab prefix>/`.
    pub(crate) log_dir: PathBuf,
    /// Numbers processes, so log file names never collide.
    next_process: AtomicUsize,
    /// Every process started in the lab, to be killed at teardown if its handle still lives.
    /// Weak: a dropped handle has already killed and reaped its process.
    processes: Mutex<Vec<Weak<ProcSlot>>>,
}

impl LabShared {
    pub(crate) fn new(log_dir: PathBuf) -> LabShared {
        LabShared { log_dir, next_process: AtomicUsize::new(0), processes: Mutex::new(Vec::new()) }
    }

    /// Kills and reaps every process of the lab that still runs; returns what failed.
    pub(crate) fn kill_all(&self) -> Vec<String> {
        let slots: Vec<_> = lock(&self.processes).drain(..).filter_map(|w| w.upgrade()).collect();
        slots.iter().filter_map(|slot| slot.kill_and_reap().err()).map(|e| e.to_string()).collect()
    }

    fn register(&self, slot: &Arc<ProcSlot>) {
        let mut processes = lock(&self.processes);
        processes.retain(|w| w.strong_count() > 0);
        processes.push(Arc::downgrade(slot));
    }

    fn next_name(&self, cmd: &Command) -> String {
        let seq = self.next_process.fetch_add(1, Ordering::Relaxed);
        format!("{}-{seq}", program_base(cmd.get_program()))
    }
}

/// One process, shared by its [`LabProcess`] handle and the lab's registry. The state mutex is
/// held while signalling and reaping, so a pid is never signalled after it was reaped (and
/// possibly reused).
struct ProcSlot {
    name: String,
    netns: String,
    pid: u32,
    log_path: PathBuf,
    state: Mutex<State>,
}

enum State {
    Running(Child),
    Exited(ExitStatus),
}

impl ProcSlot {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn raw_pid(&self) -> Result<Pid, LabError> {
        i32::try_from(self.pid)
            .map(Pid::from_raw)
            .map_err(|_| LabError::Invalid(format!("pid {} out of range", self.pid)))
    }

    /// Reaps the child if it has exited.
    fn refresh(&self, state: &mut State) -> Result<(), LabError> {
        if let State::Running(child) = state {
            let status = child.try_wait().map_err(|e| self.error("wait for", e))?;
            if let Some(status) = status {
                *state = State::Exited(status);
            }
        }
        Ok(())
    }

    fn kill_and_reap(&self) -> Result<ExitStatus, LabError> {
        let mut state = self.lock();
        match &mut *state {
            State::Running(child) => {
                // Fails only if the child was already reaped, which this slot alone does.
                if let Err(e) = child.kill() {
                    return Err(self.error("SIGKILL", e));
                }
                let status = child.wait().map_err(|e| self.error("reap", e))?;
                *state = State::Exited(status);
                Ok(status)
            }
            State::Exited(status) => Ok(*status),
        }
    }

    fn error(&self, step: &str, source: io::Error) -> LabError {
        LabError::Process { name: self.name.clone(), pid: self.pid, step: step.to_owned(), source }
    }
}

/// Starts `cmd` in `netns` with its output going to a log file; see [`Netns::spawn`].
pub(crate) fn spawn(netns: &Netns, mut cmd: Command) -> Result<LabProcess, LabError> {
    let lab = netns.lab();
    let name = lab.next_name(&cmd);
    let log_path = lab.log_dir.join(format!("{name}.log"));
    let log = File::create(&log_path).map_err(|e| LabError::io("create the log file", &log_path, e))?;
    let log2 = log.try_clone().map_err(|e| LabError::io("duplicate the log file", &log_path, e))?;
    cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
    start(netns, cmd, name, log_path)
}

/// Runs `cmd` in `netns` to completion, bounded by `timeout`; see [`Netns::output`].
pub(crate) fn output(netns: &Netns, mut cmd: Command, timeout: Duration) -> Result<Output, LabError> {
    let lab = netns.lab();
    let name = lab.next_name(&cmd);
    let out_path = lab.log_dir.join(format!("{name}.stdout"));
    let err_path = lab.log_dir.join(format!("{name}.stderr"));
    let out = File::create(&out_path).map_err(|e| LabError::io("create the output file", &out_path, e))?;
    let err = File::create(&err_path).map_err(|e| LabError::io("create the output file", &err_path, e))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let process = start(netns, cmd, name, err_path.clone())?;
    let status = process.wait_timeout(timeout)?;
    let read = |path: &Path| fs::read(path).map_err(|e| LabError::io("read the output file", path, e));
    match status {
        Some(status) => Ok(Output { status, stdout: read(&out_path)?, stderr: read(&err_path)? }),
        None => {
            process.kill()?;
            let stdout = String::from_utf8_lossy(&read(&out_path)?).into_owned();
            let stderr = String::from_utf8_lossy(&read(&err_path)?).into_owned();
            Err(LabError::Timeout {
                what: format!(
                    "{} in namespace {} to exit; stdout so far:\n{}\nstderr so far:\n{}",
                    process.name(),
                    netns.name(),
                    tail(&stdout, 2000),
                    tail(&stderr, 2000)
                ),
                after: timeout,
            })
        }
    }
}

fn start(netns: &Netns, mut cmd: Command, name: String, log_path: PathBuf) -> Result<LabProcess, LabError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let child = netns.run_named("spawn", move || cmd.spawn())?.map_err(|source| LabError::Spawn {
        netns: netns.name().to_owned(),
        program,
        source,
    })?;
    let slot = Arc::new(ProcSlot {
        name,
        netns: netns.name().to_owned(),
        pid: child.id(),
        log_path,
        state: Mutex::new(State::Running(child)),
    });
    netns.lab().register(&slot);
    Ok(LabProcess { slot })
}

fn read_lossy(path: &Path) -> Result<String, LabError> {
    let bytes = fs::read(path).map_err(|e| LabError::io("read the log file", path, e))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The last `max` bytes of `text` (at a character boundary).
fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Locks a mutex, ignoring poisoning: the data (process handles) stays consistent even if a
/// holder panicked, and teardown must run regardless.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The resident set size of process `pid` in KiB (`VmRSS` of `/proc/<pid>/status`), 0 when the
/// process is gone or the field cannot be read: for benchmarks, which sample it while it runs.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails() {
        assert_eq!(tail("abc", 5), "abc");
        assert_eq!(tail("abcdef", 2), "ef");
        assert_eq!(tail("aé", 1), "");
    }
}
