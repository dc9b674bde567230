//! Upgrades that reset no connection: a new ztunnel on the same node takes the running one's
//! listening sockets over a local Unix socket (`SCM_RIGHTS`), so every pod's ports stay open
//! throughout (the listening socket is one kernel object held by both processes: its accept
//! queue is never dropped), and the old ztunnel keeps serving the connections it has until they
//! end, for at most `--upgrade-drain` (ARCHITECTURE §4.9; `docs/PROTOCOL.md`, "The handoff
//! socket", is the wire reference).
//!
//! ```text
//!  new ztunnel                                   old ztunnel (serving)
//!   connect to --handoff-socket ───────────────► accepts one session at a time
//!   hello {versions, pid} ─────────────────────►
//!                                                 freezes enrollment (no pod added or removed)
//!   ◄──────────────────────────── offer {version, pid, sockets: n}
//!   ◄──────────────────────────── n socket messages, each with its descriptors
//!   loads its config and certificates, enrolls the pods on the received listeners, then
//!   starts accepting everywhere (both accept for a moment: each connection goes to one)
//!   ready ─────────────────────────────────────►
//!                                                 stops accepting everywhere (keeps the sockets)
//!   ◄──────────────────────────── stopped
//!   done ──────────────────────────────────────►  commit: closes its copies of the sockets and
//!                                                 drains what it has, for --upgrade-drain
//!   ◄──────────────────────────── draining {connections}, every second until it exits
//!
//!  The connection breaks (or times out) before `done`: the old ztunnel resumes accepting (if
//!  it had stopped) and the new one exits with an error. Until `done` the old one holds every
//!  socket; at every moment at least one process accepts on it.
//! ```
//!
//! Messages are datagrams of a `SOCK_SEQPACKET` socket (boundaries kept, so each message
//! arrives whole with its descriptors), each one JSON object. tokio's Unix stream types hold
//! the sockets only to wait for readiness; every message is read and written with
//! `recvmsg`/`sendmsg`, which keep a sequenced-packet socket's boundaries. [`Message`] is the IO-free part
//! (encode, decode, how many descriptors each kind carries); [`Channel`] sends and receives
//! them; [`Held`] is a listening socket kept open while its accept loop stops and starts.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hbone::drain;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::manager::{Manager, Retired};
use crate::metrics::{HandoffOutcome, Metrics};

/// The protocol versions this ztunnel speaks. A new version is made only for a change an older
/// peer would misread; fields an older peer does not know are ignored.
pub const VERSIONS: &[u32] = &[1];

/// The largest message: a pod's message holds its uid, addresses and ports, well under 1 KiB.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// The most descriptors one message carries: a pod's network namespace and its listeners,
/// three per address family.
pub const MAX_FDS: usize = 7;

/// How long the old ztunnel waits for `ready` after its offer: 60 s, longer than a new
/// ztunnel's wait for its first configuration (30 s) plus its certificates, short enough that a
/// new ztunnel that hangs does not hold enrollment on the node for long (node-socket requests
/// wait meanwhile).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long either side waits for any other message: 10 s (each is answered at once).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long both ztunnels accept before the new one asks the old one to stop: 200 ms. A new
/// process is busiest in its first moments (its first handshakes, its connection to the
/// controller), and on a loaded node it can go unscheduled for tens of milliseconds then;
/// while the old one still accepts, connections go to whichever process calls accept first,
/// so such a stall delays none.
pub const OVERLAP: Duration = Duration::from_millis(200);

/// How often the old ztunnel reports the connections it still serves: 1 s.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);

/// One message of the handoff protocol (`"type"` names the kind).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// new → old, first: the versions the new ztunnel speaks.
    Hello { versions: Vec<u32>, pid: u32 },
    /// old → new: the version chosen (the highest both speak) and how many socket messages
    /// follow.
    Offer { version: u32, pid: u32, sockets: usize },
    /// old → new, instead of an offer: why not (no common version, or shutting down).
    Refused { reason: String, versions: Vec<u32>, pid: u32 },
    /// old → new: the node socket (a listening `SOCK_STREAM` Unix socket). One descriptor.
    NodeSocket,
    /// old → new: the handoff socket itself (a listening `SOCK_SEQPACKET` Unix socket). One
    /// descriptor.
    HandoffSocket,
    /// old → new: one of the HTTP servers' listening TCP sockets. One descriptor.
    Server { role: ServerRole, addr: SocketAddr },
    /// old → new: a captured pod. Descriptors: its network namespace, then one listening TCP
    /// socket per entry of `listeners`, in order.
    Pod { uid: String, ips: Vec<IpAddr>, listeners: Vec<PodPort> },
    /// new → old: every pod is enrolled on the received sockets and the new ztunnel accepts
    /// on all of them; stop accepting.
    Ready,
    /// old → new: no accept loop of the old ztunnel runs any more.
    Stopped,
    /// new → old: the handoff is committed.
    Done,
    /// old → new, after `done`: the connections the old ztunnel still carries.
    Draining { connections: u64 },
}

/// Which HTTP server a [`Message::Server`] socket belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerRole {
    Admin,
    Metrics,
    Readiness,
}

/// One of a pod's listening sockets: its port (15001, 15006 or 15008) and address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PodPort {
    pub port: u16,
    pub family: Family,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(ipv6: bool) -> Family {
        if ipv6 { Family::Ipv6 } else { Family::Ipv4 }
    }

    pub fn is_ipv6(self) -> bool {
        self == Family::Ipv6
    }
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        // A message of plain strings, numbers and addresses always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Message, HandoffError> {
        serde_json::from_slice(bytes).map_err(|e| HandoffError::Malformed(e.to_string()))
    }

    /// How many descriptors a message of this kind carries.
    pub fn descriptors(&self) -> usize {
        match self {
            Message::NodeSocket | Message::HandoffSocket | Message::Server { .. } => 1,
            Message::Pod { listeners, .. } => 1 + listeners.len(),
            _ => 0,
        }
    }

    /// What a message is, for errors ("expected ready, got stopped").
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Offer { .. } => "offer",
            Message::Refused { .. } => "refused",
            Message::NodeSocket => "node_socket",
            Message::HandoffSocket => "handoff_socket",
            Message::Server { .. } => "server",
            Message::Pod { .. } => "pod",
            Message::Ready => "ready",
            Message::Stopped => "stopped",
            Message::Done => "done",
            Message::Draining { .. } => "draining",
        }
    }
}

/// The highest version both sides speak.
pub fn choose_version(theirs: &[u32]) -> Option<u32> {
    VERSIONS.iter().copied().filter(|v| theirs.contains(v)).max()
}

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("the handoff socket {path}: {error}")]
    Socket { path: PathBuf, error: io::Error },
    #[error("the other ztunnel closed the handoff connection{}", waiting_for(.during))]
    Closed { during: &'static str },
    #[error("no {expected} from the other ztunnel within {after:?}")]
    Timeout { expected: &'static str, after: Duration },
    #[error("expected {expected} from the other ztunnel, got {got}")]
    Unexpected { expected: &'static str, got: &'static str },
    #[error("a handoff message that is not valid: {0}")]
    Malformed(String),
    #[error("a {kind} message came with {got} descriptors, not {expected}")]
    Descriptors { kind: &'static str, expected: usize, got: usize },
    #[error(
        "the running ztunnel (pid {pid}) refused the handoff: {reason} (it speaks versions {theirs:?}, this one {ours:?})"
    )]
    Refused { pid: u32, reason: String, theirs: Vec<u32>, ours: Vec<u32> },
    #[error("a newer ztunnel (pid {pid}) speaks handoff versions {theirs:?}, this one {ours:?}: refused")]
    NoCommonVersion { pid: u32, theirs: Vec<u32>, ours: Vec<u32> },
    #[error(
        "could not enroll the handed-over pods {pods:?} within {after:?} (see the warnings above); the running ztunnel (pid {pid}) keeps serving the node"
    )]
    NotEnrolled { pods: Vec<String>, after: Duration, pid: u32 },
    #[error("handoff connection: {0}")]
    Io(#[from] io::Error),
}

fn waiting_for(what: &&'static str) -> String {
    if what.is_empty() { String::new() } else { format!(" while waiting for {what}") }
}

impl HandoffError {
    /// The two ztunnels will not hand over (no common version, or the old one is shutting
    /// down): the new one starts normally once the old one has exited.
    pub fn is_refused(&self) -> bool {
        matches!(self, HandoffError::Refused { .. } | HandoffError::NoCommonVersion { .. })
    }
}

/// One end of a handoff connection (a `SOCK_SEQPACKET` Unix socket).
pub struct Channel {
    socket: UnixStream,
}

impl Channel {
    fn new(fd: OwnedFd) -> io::Result<Channel> {
        let socket = std::os::unix::net::UnixStream::from(fd);
        socket.set_nonblocking(true)?;
        Ok(Channel { socket: UnixStream::from_std(socket)? })
    }

    /// Connects to the handoff socket at `path`; `None` if no ztunnel listens there (no such
    /// file, or a stale one: connection refused).
    pub async fn connect(path: &Path) -> Result<Option<Channel>, HandoffError> {
        let owned = path.to_owned();
        let err = |error: io::Error| HandoffError::Socket { path: owned.clone(), error };
        let addr = SocketAddrUnix::new(path).map_err(|e| err(e.into()))?;
        let fd = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
            .map_err(|e| err(e.into()))?;
        // A blocking connect: a Unix socket's completes at once, or waits while the old
        // ztunnel's backlog is full (it serves one session at a time), bounded here.
        let connected = tokio::time::timeout(
            STEP_TIMEOUT,
            tokio::task::spawn_blocking(move || rustix::net::connect(&fd, &addr).map(|()| fd)),
        )
        .await
        .map_err(|_| HandoffError::Timeout { expected: "the connection to be accepted", after: STEP_TIMEOUT })?
        .map_err(|e| err(io::Error::other(e)))?;
        match connected {
            Ok(fd) => Ok(Some(Channel::new(fd).map_err(err)?)),
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::CONNREFUSED) => Ok(None),
            Err(e) => Err(err(e.into())),
        }
    }

    /// Sends `message` with `fds` (as many as the kind carries).
    pub async fn send(&self, message: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), HandoffError> {
        let bytes = message.encode();
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        loop {
            self.socket.writable().await?;
            let sent = self.socket.try_io(Interest::WRITABLE, || {
                let mut control = SendAncillaryBuffer::new(&mut space);
                if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                    return Err(io::Error::other(format!("{} descriptors do not fit one message", fds.len())));
                }
                rustix::net::sendmsg(&self.socket, &[IoSlice::new(&bytes)], &mut control, SendFlags::NOSIGNAL)
                    .map_err(io::Error::from)
            });
            match sent {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(HandoffError::Closed { during: "" }),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Receives one message and its descriptors, checked against what its kind carries.
    pub async fn recv(&self) -> Result<(Message, Vec<OwnedFd>), HandoffError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        loop {
            self.socket.readable().await?;
            let received = self.socket.try_io(Interest::READABLE, || {
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let msg = rustix::net::recvmsg(
                    &self.socket,
                    &mut [IoSliceMut::new(&mut buf)],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut fds = Vec::new();
                for m in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(received) = m {
                        fds.extend(received);
                    }
                }
                Ok((msg.bytes, msg.flags, fds))
            });
            let (len, flags, fds) = match received {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(HandoffError::Closed { during: "" });
                }
                Err(e) => return Err(e.into()),
            };
            if len == 0 {
                return Err(HandoffError::Closed { during: "" });
            }
            if flags.contains(ReturnFlags::TRUNC) || flags.contains(ReturnFlags::CTRUNC) {
                return Err(HandoffError::Malformed(format!(
                    "a message longer than {MAX_MESSAGE} bytes or with more than {MAX_FDS} descriptors"
                )));
            }
            let message = Message::decode(&buf[..len])?;
            if fds.len() != message.descriptors() {
                return Err(HandoffError::Descriptors {
                    kind: message.kind(),
                    expected: message.descriptors(),
                    got: fds.len(),
                });
            }
            return Ok((message, fds));
        }
    }

    /// Receives a message within `after`, naming what was expected if none comes.
    pub async fn recv_within(
        &self,
        expected: &'static str,
        after: Duration,
    ) -> Result<(Message, Vec<OwnedFd>), HandoffError> {
        match tokio::time::timeout(after, self.recv()).await {
            Err(_) => Err(HandoffError::Timeout { expected, after }),
            Ok(Err(HandoffError::Closed { .. })) => Err(HandoffError::Closed { during: expected }),
            Ok(r) => r,
        }
    }
}

/// The handoff socket's listener.
pub struct HandoffListener {
    listener: UnixListener,
}

impl HandoffListener {
    /// Binds the handoff socket at `path`, mode 0600 (replacing a stale file left by a ztunnel
    /// that no longer runs: the caller found nobody listening there).
    pub fn bind(path: &Path) -> Result<HandoffListener, HandoffError> {
        use std::os::unix::fs::PermissionsExt;
        let err = |error: io::Error| HandoffError::Socket { path: path.to_owned(), error };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => debug!(path = %path.display(), "removed a stale handoff socket"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let addr = SocketAddrUnix::new(path).map_err(|e| err(e.into()))?;
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .map_err(|e| err(e.into()))?;
        rustix::net::bind(&fd, &addr).map_err(|e| err(e.into()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        // One session at a time; a few more new ztunnels may queue.
        rustix::net::listen(&fd, 4).map_err(|e| err(e.into()))?;
        HandoffListener::from_fd(fd).map_err(err)
    }

    /// A listener received from the ztunnel handing over.
    pub fn from_fd(fd: OwnedFd) -> io::Result<HandoffListener> {
        let listener = std::os::unix::net::UnixListener::from(fd);
        listener.set_nonblocking(true)?;
        Ok(HandoffListener { listener: UnixListener::from_std(listener)? })
    }

    /// The next connection (accepted as a sequenced-packet socket, like the listener).
    pub async fn accept(&self) -> io::Result<Channel> {
        let (stream, _) = self.listener.accept().await?;
        Ok(Channel { socket: stream })
    }
}

impl AsFd for HandoffListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

/// Starts an accept loop on a listening socket (a duplicate of the one kept).
pub type StartAccepting = Box<dyn Fn(OwnedFd) -> io::Result<JoinHandle<()>> + Send + Sync>;

/// A listening socket kept open for as long as it is served here, whose accept loop can stop
/// and start again, and which can be given to another ztunnel.
///
/// Pausing ends the accept loop's task (connections it accepted run as tasks of their own and
/// go on); resuming starts a new loop on a duplicate of the kept descriptor. The accept loop
/// holds what its connections need (a drain watch among them): drop the `Held` before draining.
pub struct Held {
    socket: OwnedFd,
    start: StartAccepting,
    task: Option<JoinHandle<()>>,
}

impl Held {
    /// Keeps `socket`, not accepting yet.
    pub fn new(socket: OwnedFd, start: StartAccepting) -> Held {
        Held { socket, start, task: None }
    }

    pub fn socket(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Starts accepting, if not already.
    pub fn resume(&mut self) -> io::Result<()> {
        if self.task.is_none() {
            self.task = Some((self.start)(self.socket.try_clone()?)?);
        }
        Ok(())
    }

    /// Stops accepting: returns once the accept loop has ended, so nothing more is accepted.
    pub async fn pause(&mut self) {
        if let Some(task) = self.stop() {
            let _ = task.await;
        }
    }

    /// Tells the accept loop to stop; it has ended once the returned task has (to stop many
    /// at once, then wait for them all).
    pub fn stop(&mut self) -> Option<JoinHandle<()>> {
        let task = self.task.take()?;
        task.abort();
        Some(task)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The sockets a new ztunnel received, by what they serve.
#[derive(Default)]
pub struct Received {
    pub node_socket: Option<OwnedFd>,
    pub handoff_socket: Option<OwnedFd>,
    pub servers: HashMap<ServerRole, (SocketAddr, OwnedFd)>,
    pub pods: Vec<ReceivedPod>,
}

/// A captured pod as the old ztunnel handed it over.
pub struct ReceivedPod {
    pub uid: String,
    pub ips: Vec<IpAddr>,
    pub netns: OwnedFd,
    pub listeners: Vec<(PodPort, OwnedFd)>,
}

/// The new ztunnel's side: connected, offered, and holding the old one's sockets.
pub struct Takeover {
    channel: Channel,
    /// The old ztunnel's pid, for the logs.
    pub pid: u32,
    pub version: u32,
}

impl Takeover {
    /// Connects to a running ztunnel at `path` and receives its sockets; `None` if none runs.
    pub async fn start(path: &Path) -> Result<Option<(Takeover, Received)>, HandoffError> {
        let Some(channel) = Channel::connect(path).await? else { return Ok(None) };
        channel.send(&Message::Hello { versions: VERSIONS.to_vec(), pid: std::process::id() }, &[]).await?;
        // The old ztunnel freezes enrollment first, which waits for an enrollment in progress.
        let (offer, _) = channel.recv_within("its offer", Duration::from_secs(30)).await?;
        let (version, pid, count) = match offer {
            Message::Offer { version, pid, sockets } => (version, pid, sockets),
            Message::Refused { reason, versions, pid } => {
                return Err(HandoffError::Refused { pid, reason, theirs: versions, ours: VERSIONS.to_vec() });
            }
            other => return Err(HandoffError::Unexpected { expected: "offer", got: other.kind() }),
        };
        if !VERSIONS.contains(&version) {
            return Err(HandoffError::Refused {
                pid,
                reason: format!("it chose version {version}"),
                theirs: vec![version],
                ours: VERSIONS.to_vec(),
            });
        }
        let mut received = Received::default();
        for _ in 0..count {
            let (message, mut fds) = channel.recv_within("a socket", STEP_TIMEOUT).await?;
            // `recv` checked the count of descriptors against the kind.
            match message {
                Message::NodeSocket => received.node_socket = fds.pop(),
                Message::HandoffSocket => received.handoff_socket = fds.pop(),
                Message::Server { role, addr } => {
                    if let Some(fd) = fds.pop() {
                        received.servers.insert(role, (addr, fd));
                    }
                }
                Message::Pod { uid, ips, listeners } => {
                    let mut fds = fds.into_iter();
                    let Some(netns) = fds.next() else { continue };
                    let listeners = listeners.into_iter().zip(fds).collect();
                    received.pods.push(ReceivedPod { uid, ips, netns, listeners });
                }
                other => return Err(HandoffError::Unexpected { expected: "a socket", got: other.kind() }),
            }
        }
        Ok(Some((Takeover { channel, pid, version }, received)))
    }

    /// Tells the old ztunnel this one accepts everywhere and waits until it has stopped.
    pub async fn ready(&self) -> Result<(), HandoffError> {
        self.channel.send(&Message::Ready, &[]).await?;
        match self.channel.recv_within("stopped", STEP_TIMEOUT).await?.0 {
            Message::Stopped => Ok(()),
            other => Err(HandoffError::Unexpected { expected: "stopped", got: other.kind() }),
        }
    }

    /// Commits the handoff (this ztunnel accepts everywhere); the channel then carries the old
    /// ztunnel's drain reports.
    pub async fn done(self) -> Result<Channel, HandoffError> {
        self.channel.send(&Message::Done, &[]).await?;
        Ok(self.channel)
    }
}

/// How long a ztunnel taking over may take to enroll every handed-over pod on the received
/// sockets before it gives up (and exits, leaving the old one serving): 50 s, within the old
/// ztunnel's 60 s wait for `ready` ([`READY_TIMEOUT`]).
pub const TAKEOVER_WITHIN: Duration = Duration::from_secs(50);

impl Takeover {
    /// The new ztunnel's side of a handoff, once the pods it was given are being enrolled:
    /// waits until every one is (retrying on the reload beat), starts accepting everywhere,
    /// tells the old ztunnel, and commits once it has stopped. The old ztunnel's drain reports
    /// then set `weft_upgrade_draining_connections`.
    pub async fn complete(
        self,
        manager: &Arc<Manager>,
        node: &tokio::sync::Mutex<NodeListeners>,
        metrics: &Arc<Metrics>,
        retry: Duration,
    ) -> Result<(), HandoffError> {
        let started = tokio::time::Instant::now();
        loop {
            let left = manager.adopting();
            if left.is_empty() {
                break;
            }
            if started.elapsed() >= TAKEOVER_WITHIN {
                return Err(HandoffError::NotEnrolled { pods: left, after: TAKEOVER_WITHIN, pid: self.pid });
            }
            tokio::time::sleep(retry).await;
            manager.reconcile().await;
        }
        let old = self.pid;
        // Accept before the old ztunnel stops: for a moment both accept on the same sockets
        // (each connection is taken by one of them), so there is no moment when no process
        // accepts, however late either is scheduled.
        manager.start_accepting().await;
        node.lock().await.resume();
        tokio::time::sleep(OVERLAP).await;
        let asked = std::time::Instant::now();
        self.ready().await?;
        debug!(ready_to_stopped = ?asked.elapsed(), "handoff: the old ztunnel has stopped accepting");
        let channel = self.done().await?;
        metrics.handoff(HandoffOutcome::took_over);
        info!(pid = old, "took the node over: serving every pod; the previous ztunnel drains its connections");
        let metrics = metrics.clone();
        tokio::spawn(async move {
            while let Ok((Message::Draining { connections }, _)) = channel.recv().await {
                metrics.upgrade_draining.set(connections as i64);
            }
            metrics.upgrade_draining.set(0);
            info!(pid = old, "the previous ztunnel has exited");
        });
        Ok(())
    }
}

/// What the node's own namespace holds besides the handoff socket: the node socket and the HTTP
/// servers' listeners, handed over with the pods' and paused with them.
#[derive(Default)]
pub struct NodeListeners {
    held: Vec<(NodeRole, Held)>,
}

/// What one of [`NodeListeners`] serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRole {
    NodeSocket,
    Server(ServerRole, SocketAddr),
}

impl NodeListeners {
    pub fn push(&mut self, role: NodeRole, held: Held) {
        self.held.push((role, held));
    }

    /// Starts every accept loop not running.
    pub fn resume(&mut self) {
        for (role, held) in &mut self.held {
            if let Err(error) = held.resume() {
                warn!(?role, %error, "cannot accept on a node listener");
            }
        }
    }

    async fn pause(&mut self) {
        let stopping: Vec<JoinHandle<()>> = self.held.iter_mut().filter_map(|(_, held)| held.stop()).collect();
        for task in stopping {
            let _ = task.await;
        }
    }

    /// Closes this process's copies (the accept loops stop; they hold the servers' drain
    /// watch, which must be gone for that drain to end).
    pub fn close(&mut self) {
        self.held.clear();
    }
}

/// Where a serving ztunnel is, as far as handoffs go. A session holds the lock throughout, so
/// a shutdown waits for a handoff in progress to commit or fail.
pub enum Phase {
    Serving,
    /// Shutting down (SIGTERM): handoffs are refused.
    Closing,
    /// A handoff committed: what is left to drain, and the connection to report on.
    HandedOver(Handover),
}

/// What a ztunnel that handed the node over still has: its pods' connections, and the
/// connection to the new ztunnel, which its drain is reported on.
pub struct Handover {
    pub channel: Channel,
    pub pods: Retired,
}

impl Handover {
    /// Lets the connections finish within `deadline`, telling the new ztunnel every
    /// [`REPORT_EVERY`] how many are left (until it stops listening).
    pub async fn drain(self, deadline: Duration, metrics: &Metrics) -> drain::Outcome {
        let Handover { channel, pods } = self;
        let drain = pods.drain(deadline);
        tokio::pin!(drain);
        let mut tick = tokio::time::interval(REPORT_EVERY);
        let mut reporting = true;
        let outcome = loop {
            tokio::select! {
                outcome = &mut drain => break outcome,
                _ = tick.tick(), if reporting => {
                    let report = Message::Draining { connections: metrics.open_connections() };
                    reporting = channel.send(&report, &[]).await.is_ok();
                }
            }
        };
        let _ = channel.send(&Message::Draining { connections: metrics.open_connections() }, &[]).await;
        outcome
    }
}

/// What a serving ztunnel gives away in a handoff.
#[derive(Clone)]
pub struct Giver {
    pub manager: Arc<Manager>,
    pub node: Arc<tokio::sync::Mutex<NodeListeners>>,
    pub metrics: Arc<Metrics>,
    pub phase: Arc<tokio::sync::Mutex<Phase>>,
    /// Told when a handoff commits.
    pub handed_over: Arc<tokio::sync::Notify>,
}

/// Serves the handoff socket, one session at a time, until a handoff commits.
pub async fn serve(listener: HandoffListener, giver: Giver) {
    loop {
        let channel = match listener.accept().await {
            Ok(c) => c,
            Err(error) => {
                warn!(%error, "handoff socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut phase = giver.phase.lock().await;
        if !matches!(*phase, Phase::Serving) {
            let _ = refuse(&channel, &giver, "this ztunnel is shutting down; start once it has exited").await;
            continue;
        }
        match session(&channel, &giver, listener.as_fd()).await {
            Ok(pods) => {
                info!("handoff committed: the new ztunnel serves the node; draining the connections held here");
                *phase = Phase::HandedOver(Handover { channel, pods });
                giver.handed_over.notify_one();
                return;
            }
            Err(error) => {
                // A refusal was counted when it was sent.
                if !error.is_refused() {
                    giver.metrics.handoff(HandoffOutcome::aborted);
                }
                warn!(%error, "handoff not completed; this ztunnel keeps serving the node");
            }
        }
    }
}

/// Tells a new ztunnel why it cannot take the node over. Counted before it is said, so that
/// whoever reads the answer finds it counted.
async fn refuse(channel: &Channel, giver: &Giver, reason: &str) -> Result<(), HandoffError> {
    giver.metrics.handoff(HandoffOutcome::refused);
    let refusal = Message::Refused { reason: reason.to_owned(), versions: VERSIONS.to_vec(), pid: std::process::id() };
    channel.send(&refusal, &[]).await
}

/// One handoff, the old ztunnel's side; on any failure before `done`, everything it paused
/// accepts again.
async fn session(channel: &Channel, giver: &Giver, handoff: BorrowedFd<'_>) -> Result<Retired, HandoffError> {
    let (pid, versions) = match channel.recv_within("hello", STEP_TIMEOUT).await?.0 {
        Message::Hello { versions, pid } => (pid, versions),
        other => return Err(HandoffError::Unexpected { expected: "hello", got: other.kind() }),
    };
    let Some(version) = choose_version(&versions) else {
        refuse(channel, giver, "no protocol version in common").await?;
        return Err(HandoffError::NoCommonVersion { pid, theirs: versions, ours: VERSIONS.to_vec() });
    };
    info!(pid, version, "a newer ztunnel asks to take the node over; handing the sockets over");
    let mut frozen = giver.manager.freeze().await;
    let mut node = giver.node.lock().await;
    {
        let pods = frozen.offer();
        let sockets = pods.len() + node.held.len() + 1;
        channel.send(&Message::Offer { version, pid: std::process::id(), sockets }, &[]).await?;
        channel.send(&Message::HandoffSocket, &[handoff]).await?;
        for (role, held) in &node.held {
            let message = match *role {
                NodeRole::NodeSocket => Message::NodeSocket,
                NodeRole::Server(role, addr) => Message::Server { role, addr },
            };
            channel.send(&message, &[held.socket()]).await?;
        }
        for pod in &pods {
            let fds: Vec<BorrowedFd<'_>> =
                std::iter::once(pod.netns).chain(pod.listeners.iter().map(|(_, fd)| *fd)).collect();
            let listeners = pod.listeners.iter().map(|(port, _)| *port).collect();
            channel.send(&Message::Pod { uid: pod.uid.to_owned(), ips: pod.ips.to_vec(), listeners }, &fds).await?;
        }
    }
    match channel.recv_within("ready", READY_TIMEOUT).await?.0 {
        Message::Ready => {}
        other => return Err(HandoffError::Unexpected { expected: "ready", got: other.kind() }),
    }
    let stopping = std::time::Instant::now();
    frozen.pause().await;
    node.pause().await;
    debug!(took = ?stopping.elapsed(), "handoff: every accept loop stopped");
    let committed = async {
        channel.send(&Message::Stopped, &[]).await?;
        match channel.recv_within("done", STEP_TIMEOUT).await?.0 {
            Message::Done => Ok(()),
            other => Err(HandoffError::Unexpected { expected: "done", got: other.kind() }),
        }
    };
    if let Err(e) = committed.await {
        frozen.resume();
        node.resume();
        return Err(e);
    }
    node.close();
    Ok(frozen.retire())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn messages_read_as_documented() {
        let pod = Message::decode(
            br#"{"type":"pod","uid":"back/api-0","ips":["10.244.1.2"],"listeners":[{"port":15001,"family":"ipv4"},{"port":15008,"family":"ipv4"}]}"#,
        )
        .unwrap();
        assert_eq!(pod.descriptors(), 3, "the namespace and two listeners");
        assert_eq!(Message::decode(&pod.encode()).unwrap(), pod);
        let server = Message::Server { role: ServerRole::Readiness, addr: "0.0.0.0:15021".parse().unwrap() };
        assert_eq!(
            String::from_utf8(server.encode()).unwrap(),
            r#"{"type":"server","role":"readiness","addr":"0.0.0.0:15021"}"#
        );
        assert_eq!(String::from_utf8(Message::Done.encode()).unwrap(), r#"{"type":"done"}"#);
        // Fields a peer does not know are ignored; a kind it does not know is an error.
        assert_eq!(Message::decode(br#"{"type":"ready","later":1}"#).unwrap(), Message::Ready);
        assert!(matches!(Message::decode(br#"{"type":"reboot"}"#), Err(HandoffError::Malformed(_))));
        assert!(matches!(Message::decode(b"ready\n"), Err(HandoffError::Malformed(_))));
    }

    #[test]
    fn the_highest_common_version_is_chosen() {
        assert_eq!(choose_version(&[1, 2, 3]), Some(1));
        assert_eq!(choose_version(&[2]), None);
    }

    /// A socket and a message cross a handoff connection; the descriptor received is the same
    /// kernel object (a listener bound by the sender accepts through it).
    #[tokio::test]
    async fn descriptors_cross_the_socket_and_stay_the_same_object() {
        let dir = std::env::temp_dir().join(format!("ztunnel-handoff-unit-{}", std::process::id()));
        let path = dir.join("h.sock");
        let listener = HandoffListener::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();

        let client = tokio::spawn(async move { Channel::connect(&path).await.unwrap().expect("someone listens") });
        let old = listener.accept().await.unwrap();
        let new = client.await.unwrap();
        old.send(&Message::Server { role: ServerRole::Admin, addr }, &[tcp.as_fd()]).await.unwrap();
        let (message, mut fds) = new.recv().await.unwrap();
        assert_eq!(message, Message::Server { role: ServerRole::Admin, addr });
        let fd = fds.pop().unwrap();
        assert_ne!(fd.as_raw_fd(), tcp.as_raw_fd(), "a new descriptor");
        drop(tcp);
        let received = std::net::TcpListener::from(fd);
        assert_eq!(received.local_addr().unwrap(), addr);
        let _c = std::net::TcpStream::connect(addr).unwrap();
        received.set_nonblocking(false).unwrap();
        assert!(received.accept().is_ok(), "the same listening socket accepts");

        // A message that claims a descriptor it does not carry is refused.
        old.send(&Message::NodeSocket, &[]).await.unwrap();
        assert!(matches!(new.recv().await, Err(HandoffError::Descriptors { expected: 1, got: 0, .. })));
        drop(old);
        assert!(matches!(new.recv().await, Err(HandoffError::Closed { .. })));
        let gone = dir.join("nobody.sock");
        assert!(Channel::connect(&gone).await.unwrap().is_none(), "no file: nobody to take over from");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
