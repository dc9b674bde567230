//! Enrollment: keeping the set of captured pods equal to the local workloads the config
//! marks enrolled.
//!
//! Enrolling a pod (no restart): find its network namespace, open ztunnel's listeners inside
//! it (15001 outbound, 15006 plaintext inbound, 15008 HBONE), *then* install the redirection
//! rules, so no redirected connection ever meets a closed port. Un-enrolling does the reverse:
//! rules first, then the listeners stop accepting while their connections finish.
//!
//! A pod whose namespace cannot be found yet (not started) is retried on every reconcile.
//!
//! A pod's listening sockets stay open for as long as it is captured ([`Held`]): their accept
//! loops stop and start again around an upgrade, and the sockets themselves can be given to a
//! newer ztunnel ([`crate::handoff`]), which enrolls the pods on them ([`Manager::adopt`]).
//!
//! The probe SNAT's sets ([`crate::inpod::probes`]) follow the captured pods: a pod's
//! addresses are added before its rules go in, and every change ends with the sets equal to
//! the captured pods' addresses. A failure there is logged and never stops an enrollment.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hbone::{Server, drain};
use meshapi::node::{NodeRequest, NodeResponse};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::config::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use crate::handoff::{Family, Held, PodPort, ReceivedPod};
use crate::inpod::probes::{self, ProbeSnat};
use crate::inpod::{Netns, rules, scan, socket};
use crate::proxy::inbound::Inbound;
use crate::proxy::{self, PodInfo, Proxy, outbound, plaintext};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("network namespace of pod {uid} (addresses {ips:?}) not found under {proc_root}; is the pod running?")]
    NetnsNotFound { uid: String, ips: Vec<IpAddr>, proc_root: PathBuf },
    #[error("scanning {proc_root} for pod {uid}: {error}")]
    Scan { uid: String, proc_root: PathBuf, error: std::io::Error },
    #[error("opening port {port} inside pod {uid}: {error}")]
    Listen { uid: String, port: u16, error: std::io::Error },
    #[error("pod {uid}: {error}")]
    Rules { uid: String, error: rules::RulesError },
    #[error("pod {uid} has no valid identity: {reason}")]
    Identity { uid: String, reason: String },
}

/// A captured pod: its listeners (kept open, their accept loops running unless paused) and
/// the drain of its connections.
struct Enrolled {
    info: Arc<PodInfo>,
    trigger: drain::Trigger,
    listeners: Vec<(PodPort, Held)>,
}

impl Enrolled {
    /// Closes this process's copies of the listeners (their accept loops stop; another ztunnel
    /// may hold the sockets still), then lets the connections finish within `deadline`.
    async fn drain(self, deadline: Duration) -> drain::Outcome {
        let Enrolled { info: _, trigger, listeners } = self;
        // The accept loops hold the drain's watch: they must be gone for the drain to end.
        drop(listeners);
        trigger.drain(deadline).await
    }
}

/// What a pod looks like in the dump.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EnrolledPod {
    pub uid: String,
    pub ips: Vec<IpAddr>,
    pub netns_inode: u64,
}

pub struct Manager {
    proxy: Arc<Proxy>,
    proc_root: PathBuf,
    nft: PathBuf,
    drain_deadline: Duration,
    /// The node table that lets kubelet's probes through the pods' rules.
    probes: Arc<ProbeSnat>,
    pods: tokio::sync::Mutex<HashMap<String, Enrolled>>,
    /// Pods that should be enrolled but are not yet (their namespace not found, or their
    /// certificate not obtained), as of the last reconcile.
    pending: std::sync::atomic::AtomicUsize,
    /// Signalled by every reconcile that leaves pods pending ([`Manager::retry_wanted`]).
    retry: tokio::sync::Notify,
    /// Network namespaces handed over by the container runtime (the node socket) or by the
    /// ztunnel this one took over from, by pod uid: used instead of scanning /proc.
    handed: std::sync::Mutex<HashMap<String, Netns>>,
    /// Listening sockets received from the ztunnel this one took over from, by pod uid, until
    /// the pod is enrolled on them.
    adopted: std::sync::Mutex<HashMap<String, Vec<(PodPort, OwnedFd)>>>,
    /// Whether pods' accept loops run: false in a ztunnel taking over until the handoff
    /// commits (`start_accepting`).
    accepting: AtomicBool,
    /// Set once this ztunnel has handed its pods to a newer one: nothing is enrolled or
    /// released any more.
    retired: AtomicBool,
}

impl Manager {
    /// `probe_snat` is `--probe-snat`: whether kubelet's probes are let through (§8.2).
    pub fn new(
        proxy: Arc<Proxy>,
        proc_root: PathBuf,
        nft: PathBuf,
        drain_deadline: Duration,
        probe_snat: bool,
    ) -> Self {
        Manager {
            proxy,
            proc_root,
            probes: Arc::new(ProbeSnat::new(nft.clone(), probe_snat)),
            nft,
            drain_deadline,
            pods: tokio::sync::Mutex::new(HashMap::new()),
            pending: Default::default(),
            retry: tokio::sync::Notify::new(),
            handed: Default::default(),
            adopted: Default::default(),
            accepting: AtomicBool::new(true),
            retired: AtomicBool::new(false),
        }
    }

    /// Takes the pods a running ztunnel handed over: their namespaces and listening sockets are
    /// used when they are enrolled, and no accept loop starts until [`Manager::start_accepting`].
    pub fn adopt(&self, pods: Vec<ReceivedPod>) -> std::io::Result<()> {
        self.accepting.store(false, Ordering::Release);
        let mut handed = self.handed.lock().unwrap_or_else(|p| p.into_inner());
        let mut adopted = self.adopted.lock().unwrap_or_else(|p| p.into_inner());
        for pod in pods {
            handed.insert(pod.uid.clone(), Netns::from_fd(pod.netns)?);
            adopted.insert(pod.uid, pod.listeners);
        }
        Ok(())
    }

    /// The pods handed over by another ztunnel that are not enrolled here yet.
    pub fn adopting(&self) -> Vec<String> {
        let mut uids: Vec<String> = self.adopted.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        uids.sort();
        uids
    }

    /// Starts every pod's accept loops (those of pods enrolled from now on start at once).
    pub async fn start_accepting(&self) {
        let mut pods = self.pods.lock().await;
        self.accepting.store(true, Ordering::Release);
        for e in pods.values_mut() {
            resume(e);
        }
    }

    /// Holds enrollment still (no pod is enrolled or released) until the returned value is
    /// dropped or retired: what a handoff gives away must not change under it.
    pub async fn freeze(&self) -> Frozen<'_> {
        Frozen { manager: self, pods: self.pods.lock().await }
    }

    /// Brings the captured pods in line with the current state. Returns the number of pods
    /// that should be enrolled but could not be (retried next time).
    pub async fn reconcile(&self) -> usize {
        let state = self.proxy.state.load();
        let desired: HashMap<String, Vec<IpAddr>> = state
            .local_workloads(&self.proxy.node)
            .map(|e| e.workload())
            .filter(|w| w.enrolled)
            .map(|w| (w.uid.clone(), w.addresses.clone()))
            .collect();
        let keep_ids: Vec<hbone::SpiffeId> =
            state.local_workloads(&self.proxy.node).filter_map(|e| e.identity().ok().cloned()).collect();
        drop(state);

        let mut pods = self.pods.lock().await;
        if self.retired.load(Ordering::Acquire) {
            return 0;
        }
        let leaving: Vec<String> = pods
            .iter()
            .filter(|(uid, e)| desired.get(*uid).is_none_or(|ips| *ips != e.info.ips))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in leaving {
            if let Some(e) = pods.remove(&uid) {
                self.unenroll(e).await;
            }
        }
        let joining: Vec<IpAddr> = desired
            .iter()
            .filter(|(uid, _)| !pods.contains_key(*uid))
            .flat_map(|(_, ips)| ips.iter().copied())
            .collect();
        self.sync_probes(&pods, &joining).await;
        let mut pending = 0;
        for (uid, ips) in desired {
            if pods.contains_key(&uid) {
                continue;
            }
            match self.enroll(&uid, &ips).await {
                Ok(e) => {
                    info!(pod = %uid, ?ips, netns = e.info.netns.inode(), "pod enrolled: traffic captured");
                    pods.insert(uid, e);
                }
                Err(e) => {
                    pending += 1;
                    warn!(error = %e, "pod not enrolled yet; will retry");
                }
            }
        }
        self.sync_probes(&pods, &[]).await;
        self.proxy.metrics.enrolled_pods.set(pods.len() as i64);
        self.pending.store(pending, std::sync::atomic::Ordering::Release);
        if pending > 0 {
            // Kept as a permit if nothing waits yet: the retry loop cannot miss it.
            self.retry.notify_one();
        }
        self.proxy.certs.retain(|id| keep_ids.contains(id));
        pending
    }

    /// How many pods the last reconcile could not enroll yet.
    pub fn pending(&self) -> usize {
        self.pending.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Returns once a reconcile has left pods pending (at once if one has since the last
    /// call). The retry loop waits here instead of waking on a timer while every pod is
    /// enrolled: an idle ztunnel has no periodic wake-up of its own on the runtime that
    /// carries the traffic.
    pub async fn retry_wanted(&self) {
        self.retry.notified().await
    }

    /// The captured pods, for the config dump.
    pub async fn dump(&self) -> Vec<EnrolledPod> {
        let pods = self.pods.lock().await;
        let mut out: Vec<_> = pods
            .values()
            .map(|e| EnrolledPod {
                uid: e.info.uid.clone(),
                ips: e.info.ips.clone(),
                netns_inode: e.info.netns.inode(),
            })
            .collect();
        out.sort_by(|a, b| a.uid.cmp(&b.uid));
        out
    }

    /// Stops accepting everywhere and lets connections finish within the drain deadline.
    /// The capture rules stay: pods remain captured (fail closed) until a ztunnel serves them
    /// again, which reinstalls the rules idempotently. So does the probe SNAT: kubelet's probes
    /// keep reaching the pods while ztunnel is away.
    pub async fn shutdown(&self) -> drain::Outcome {
        let pods: Vec<Enrolled> = self.pods.lock().await.drain().map(|(_, e)| e).collect();
        let deadline = self.drain_deadline;
        let drains = pods.into_iter().map(|e| e.drain(deadline));
        let outcomes = futures_join_all(drains).await;
        if outcomes.contains(&drain::Outcome::DeadlineExceeded) {
            drain::Outcome::DeadlineExceeded
        } else {
            drain::Outcome::Graceful
        }
    }

    /// Serves a request of the node socket: a pod the runtime is about to start (capture it
    /// now if the mesh enrolls it, waiting up to `wait` for the controller to report the pod),
    /// or one it deleted.
    pub async fn runtime_request(&self, request: NodeRequest, wait: Duration) -> NodeResponse {
        let answer = |ok: bool, message: String| NodeResponse { ok, message };
        if self.retired.load(Ordering::Acquire) {
            return answer(false, RETIRED.into());
        }
        match request {
            NodeRequest::Del(pod) => {
                let uid = format!("{}/{}", pod.namespace, pod.name);
                self.handed.lock().unwrap_or_else(|p| p.into_inner()).remove(&uid);
                let mut pods = self.pods.lock().await;
                if self.retired.load(Ordering::Acquire) {
                    return answer(false, RETIRED.into());
                }
                match pods.remove(&uid) {
                    Some(e) => {
                        self.unenroll(e).await;
                        self.sync_probes(&pods, &[]).await;
                        self.proxy.metrics.enrolled_pods.set(pods.len() as i64);
                        answer(true, "released".into())
                    }
                    None => answer(true, "not captured".into()),
                }
            }
            NodeRequest::Add(pod) => {
                let uid = format!("{}/{}", pod.namespace, pod.name);
                let netns = match Netns::open(std::path::Path::new(&pod.netns)) {
                    Ok(n) => n,
                    Err(e) => {
                        return answer(
                            false,
                            format!("cannot open the network namespace {:?} of pod {uid}: {e}", pod.netns),
                        );
                    }
                };
                // The runtime may call before the controller has reported the pod: wait for it.
                let deadline = tokio::time::Instant::now() + wait;
                let ips = loop {
                    let found = {
                        let state = self.proxy.state.load();
                        state
                            .workload(&uid)
                            .map(|e| (e.workload().enrolled, e.workload().node.clone(), e.workload().addresses.clone()))
                    };
                    match found {
                        Some((_, node, _)) if node != self.proxy.node => {
                            return answer(
                                false,
                                format!("pod {uid} is scheduled on node {node}, not on {}", self.proxy.node),
                            );
                        }
                        Some((false, _, _)) => return answer(true, "not enrolled".into()),
                        Some((true, _, ips)) => break ips,
                        None if tokio::time::Instant::now() >= deadline => {
                            return answer(
                                false,
                                format!(
                                    "pod {uid} is not known to this ztunnel after {wait:?}; is the controller reachable, and does it see the pod?"
                                ),
                            );
                        }
                        None => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                };
                let inode = netns.inode();
                // The namespace is recorded only under the pods' lock: a reconcile (which holds
                // that lock throughout) then either ran before and could not find the pod, or
                // runs after and finds it captured; the capture is always this request's.
                let mut pods = self.pods.lock().await;
                if self.retired.load(Ordering::Acquire) {
                    return answer(false, RETIRED.into());
                }
                self.handed.lock().unwrap_or_else(|p| p.into_inner()).insert(uid.clone(), netns);
                match pods.get(&uid) {
                    Some(e) if e.info.netns.inode() == inode => return answer(true, "captured".into()),
                    // A new sandbox of a pod still held (its DEL did not reach this ztunnel):
                    // release the old namespace, capture the new one.
                    Some(_) => {
                        if let Some(old) = pods.remove(&uid) {
                            info!(pod = %uid, "pod handed over again with a new network namespace; releasing the old one");
                            self.unenroll(old).await;
                        }
                    }
                    None => {}
                }
                self.sync_probes(&pods, &ips).await;
                let enrolled = self.enroll(&uid, &ips).await;
                let response = match enrolled {
                    Ok(e) => {
                        info!(pod = %uid, ?ips, netns = e.info.netns.inode(), "pod handed over by the runtime: traffic captured");
                        pods.insert(uid, e);
                        answer(true, "captured".into())
                    }
                    Err(e) => answer(false, e.to_string()),
                };
                self.sync_probes(&pods, &[]).await;
                self.proxy.metrics.enrolled_pods.set(pods.len() as i64);
                response
            }
        }
    }

    async fn enroll(&self, uid: &str, ips: &[IpAddr]) -> Result<Enrolled, EnrollError> {
        let handed = self.handed.lock().unwrap_or_else(|p| p.into_inner()).get(uid).cloned();
        let found = match handed {
            Some(netns) => Some(netns),
            None => {
                let (proc_root, scan_ips) = (self.proc_root.clone(), ips.to_vec());
                tokio::task::spawn_blocking(move || scan::find_netns(&proc_root, &scan_ips))
                    .await
                    .map_err(|e| EnrollError::Scan {
                        uid: uid.into(),
                        proc_root: self.proc_root.clone(),
                        error: std::io::Error::other(e),
                    })?
                    .map_err(|error| EnrollError::Scan { uid: uid.into(), proc_root: self.proc_root.clone(), error })?
            }
        };
        let netns = found.ok_or_else(|| EnrollError::NetnsNotFound {
            uid: uid.into(),
            ips: ips.to_vec(),
            proc_root: self.proc_root.clone(),
        })?;
        let identity = {
            let state = self.proxy.state.load();
            state
                .identity_by_ip(ips[0])
                .ok_or_else(|| EnrollError::Identity { uid: uid.into(), reason: "gone from the config".into() })?
                .map_err(|e| EnrollError::Identity { uid: uid.into(), reason: e.to_string() })?
        };
        let cert = self
            .proxy
            .certs
            .obtain(&identity)
            .await
            .map_err(|e| EnrollError::Identity { uid: uid.into(), reason: e.to_string() })?;

        // One set of listeners per address family the pod has (IPv4 `0.0.0.0`, IPv6 `[::]`):
        // those a ztunnel handed over if it did, else new ones.
        let mut families: Vec<bool> = ips.iter().map(IpAddr::is_ipv6).collect();
        families.sort();
        families.dedup();
        let mut adopted = self.adopted.lock().unwrap_or_else(|p| p.into_inner()).remove(uid).unwrap_or_default();
        let mut listeners = Vec::new();
        for ipv6 in families {
            for port in [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT] {
                let wanted = PodPort { port, family: Family::of(ipv6) };
                let socket = match adopted.iter().position(|(p, _)| *p == wanted) {
                    Some(i) => Ok(adopted.swap_remove(i).1),
                    None => socket::listen(&netns, port, ipv6).and_then(TcpListener::into_std).map(OwnedFd::from),
                };
                match socket {
                    Ok(socket) => listeners.push((wanted, socket)),
                    Err(error) => {
                        self.readopt(uid, listeners);
                        return Err(EnrollError::Listen { uid: uid.into(), port, error });
                    }
                }
            }
        }

        let (nft, rules_netns, probes) = (self.nft.clone(), netns.clone(), self.probes.pod_rules());
        let installed = tokio::task::spawn_blocking(move || rules::install(&nft, &rules_netns, probes))
            .await
            .map_err(|e| EnrollError::Rules {
                uid: uid.into(),
                error: rules::RulesError::Netns(std::io::Error::other(e)),
            })
            .and_then(|r| r.map_err(|error| EnrollError::Rules { uid: uid.into(), error }));
        if let Err(e) = installed {
            self.readopt(uid, listeners);
            return Err(e);
        }

        let info = Arc::new(PodInfo { uid: uid.to_owned(), ips: ips.to_vec(), netns: netns.clone() });
        self.proxy.pods.insert(ips, &netns);
        let (trigger, watch) = drain::channel();
        let server = Server::new(
            self.proxy.hbone.clone(),
            Arc::new(cert),
            &self.proxy.trust,
            Inbound { proxy: self.proxy.clone(), pod: info.clone() },
        );
        let listeners = listeners
            .into_iter()
            .map(|(port, socket)| {
                let (info, proxy, watch, server) = (info.clone(), self.proxy.clone(), watch.clone(), server.clone());
                let start: crate::handoff::StartAccepting = Box::new(move |fd: OwnedFd| {
                    let listener = TcpListener::from_std(std::net::TcpListener::from(fd))?;
                    let (info, proxy, watch) = (info.clone(), proxy.clone(), watch.clone());
                    Ok(match port.port {
                        OUTBOUND_PORT => {
                            tokio::spawn(proxy::serve("outbound", listener, info, proxy, watch, outbound::handle))
                        }
                        INBOUND_PLAINTEXT_PORT => {
                            tokio::spawn(proxy::serve("plaintext", listener, info, proxy, watch, plaintext::handle))
                        }
                        _ => {
                            let server = server.clone();
                            tokio::spawn(async move { server.serve(listener, watch).await })
                        }
                    })
                });
                (port, Held::new(socket, start))
            })
            .collect();
        let mut enrolled = Enrolled { info, trigger, listeners };
        if self.accepting.load(Ordering::Acquire) {
            resume(&mut enrolled);
        }
        Ok(enrolled)
    }

    /// Puts back the handed-over listeners an enrollment that failed had taken (they must stay
    /// open: the ztunnel that handed them over may still be serving them).
    fn readopt(&self, uid: &str, listeners: Vec<(PodPort, OwnedFd)>) {
        if !listeners.is_empty() {
            let mut adopted = self.adopted.lock().unwrap_or_else(|p| p.into_inner());
            adopted.entry(uid.to_owned()).or_default().extend(listeners);
        }
    }

    /// Makes the probe SNAT's sets hold the addresses of the captured `pods` and `joining`
    /// (pods about to be captured: their probes are let through before their rules go in).
    async fn sync_probes(&self, pods: &HashMap<String, Enrolled>, joining: &[IpAddr]) {
        let addresses: BTreeSet<IpAddr> =
            pods.values().flat_map(|e| e.info.ips.iter().copied()).chain(joining.iter().copied()).collect();
        let (snat, count) = (self.probes.clone(), addresses.len());
        match tokio::task::spawn_blocking(move || snat.sync(&addresses)).await {
            Ok(Ok(probes::Sync::Unchanged)) => {}
            Ok(Ok(probes::Sync::Installed)) => {
                info!(addresses = count, "kubelet probe SNAT installed in ztunnel's network namespace")
            }
            Ok(Ok(probes::Sync::Updated)) => debug!(addresses = count, "kubelet probe SNAT updated"),
            Ok(Ok(probes::Sync::Removed)) => {
                info!("kubelet probe SNAT off (--probe-snat=false): node table removed; probes are captured")
            }
            Ok(Err(error)) => warn!(
                %error,
                "kubelet probe SNAT not updated: probes of the pods captured since are refused if they are STRICT \
                 (or under an ALLOW policy); check that nft runs in ztunnel's network namespace with NET_ADMIN, \
                 or run with --probe-snat=false and keep probed pods PERMISSIVE; retried at the next change"
            ),
            Err(error) => warn!(%error, "kubelet probe SNAT not updated; retried at the next change"),
        }
    }

    async fn unenroll(&self, e: Enrolled) {
        let (nft, netns, uid) = (self.nft.clone(), e.info.netns.clone(), e.info.uid.clone());
        match tokio::task::spawn_blocking(move || rules::remove(&nft, &netns)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => warn!(pod = %uid, error = %err, "removing capture rules failed"),
            Err(err) => warn!(pod = %uid, error = %err, "removing capture rules failed"),
        }
        self.proxy.pods.remove(&e.info.ips);
        info!(pod = %uid, "pod un-enrolled: rules removed, listeners closing");
        // Listeners stop now; connections in flight finish (or are cut at the deadline).
        let deadline = self.drain_deadline;
        tokio::spawn(e.drain(deadline));
    }
}

/// Starts a pod's accept loops (those not running).
fn resume(e: &mut Enrolled) {
    for (port, held) in &mut e.listeners {
        if let Err(error) = held.resume() {
            warn!(pod = %e.info.uid, port = port.port, %error, "cannot accept on the pod's port");
        }
    }
}

/// Refused to the runtime once this ztunnel has handed its pods to a newer one.
const RETIRED: &str = "this ztunnel has handed the node over to a newer one; ask again (the new one answers)";

/// Enrollment held still for a handoff ([`Manager::freeze`]).
pub struct Frozen<'a> {
    manager: &'a Manager,
    pods: tokio::sync::MutexGuard<'a, HashMap<String, Enrolled>>,
}

/// A captured pod as a handoff offers it: its namespace and listening sockets.
pub struct OfferedPod<'a> {
    pub uid: &'a str,
    pub ips: &'a [IpAddr],
    pub netns: BorrowedFd<'a>,
    pub listeners: Vec<(PodPort, BorrowedFd<'a>)>,
}

impl Frozen<'_> {
    /// The captured pods, sorted by uid.
    pub fn offer(&self) -> Vec<OfferedPod<'_>> {
        let mut pods: Vec<OfferedPod<'_>> = self
            .pods
            .values()
            .map(|e| OfferedPod {
                uid: &e.info.uid,
                ips: &e.info.ips,
                netns: e.info.netns.as_fd(),
                listeners: e.listeners.iter().map(|(port, held)| (*port, held.socket())).collect(),
            })
            .collect();
        pods.sort_by(|a, b| a.uid.cmp(b.uid));
        pods
    }

    /// Stops every pod's accept loops (returns once none runs).
    pub async fn pause(&mut self) {
        let stopping: Vec<_> =
            self.pods.values_mut().flat_map(|e| e.listeners.iter_mut().filter_map(|(_, held)| held.stop())).collect();
        for task in stopping {
            let _ = task.await;
        }
    }

    /// Starts them again (the handoff failed).
    pub fn resume(&mut self) {
        for e in self.pods.values_mut() {
            resume(e);
        }
    }

    /// The handoff committed: nothing is enrolled or released here any more, this process's
    /// copies of the listeners are closed (the new ztunnel holds the sockets), and the pods'
    /// connections are returned to be drained.
    pub fn retire(mut self) -> Retired {
        self.manager.retired.store(true, Ordering::Release);
        let pods = self
            .pods
            .drain()
            .map(|(_, mut e)| {
                e.listeners.clear();
                e
            })
            .collect();
        Retired { pods }
    }
}

/// The connections of the pods a retired ztunnel served.
pub struct Retired {
    pods: Vec<Enrolled>,
}

impl Retired {
    /// Lets them finish within `deadline` (then cuts them).
    pub async fn drain(self, deadline: Duration) -> drain::Outcome {
        let outcomes = futures_join_all(self.pods.into_iter().map(|e| e.drain(deadline))).await;
        if outcomes.contains(&drain::Outcome::DeadlineExceeded) {
            drain::Outcome::DeadlineExceeded
        } else {
            drain::Outcome::Graceful
        }
    }
}

/// Awaits every future (a tiny join_all, to avoid a dependency for one call).
async fn futures_join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}
