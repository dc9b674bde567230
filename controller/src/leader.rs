//! Leader election between the controller's replicas, on a `coordination.k8s.io/v1` Lease, as
//! Kubernetes' own controllers elect theirs (client-go's `leaderelection`).
//!
//! Every replica reads the cluster and serves the watch API; only the leader **writes**: the
//! waypoints' objects ([`crate::deploy`]) and status conditions ([`crate::status`]). One writer
//! at a time keeps two replicas from fighting over a condition's `lastTransitionTime` and
//! halves the writes the API server sees.
//!
//! ```text
//!  Lease weft-system/weft-controller
//!    holderIdentity:       <pod name>_<epoch>        who leads
//!    renewTime:            when the leader last renewed
//!    leaseDurationSeconds: 15                         how long a silent leader stays leader
//! ```
//!
//! - A replica that finds no Lease creates it, holding it (a `409` means another was first).
//! - Every [`LeaseSettings::retry`] (2 s) the leader renews: a `PUT` carrying the
//!   `resourceVersion` it read, so that of two writers exactly one succeeds. A leader that has
//!   not renewed for [`LeaseSettings::renew_deadline`] (10 s) stops writing at once: it steps
//!   down before its lease can have expired for the others.
//! - A standby takes the Lease over when the holder has not renewed for the lease duration,
//!   measured **on its own clock** from when it last saw the record change (so the replicas'
//!   clocks need not agree), or at once when the holder released it (an empty holder).
//! - A replica that shuts down releases its lease: the other takes over within one retry
//!   period instead of a lease duration. A replica that dies is replaced within the lease
//!   duration plus one retry period (17 s by default).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// The Lease's name, in the controller's namespace.
pub const LEASE_NAME: &str = "weft-controller";

/// How the election runs.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// The Lease's namespace (the controller's own: `POD_NAMESPACE`, else `weft-system`).
    pub namespace: String,
    /// This replica's name in `holderIdentity`: unique per process.
    pub identity: String,
    /// How long a leader that stopped renewing stays leader for the others.
    pub duration: Duration,
    /// How long the leader keeps acting without a successful renewal. Below `duration`.
    pub renew_deadline: Duration,
    /// How often the leader renews and a standby tries.
    pub retry: Duration,
}

impl LeaseSettings {
    /// Client-go's defaults (15 s, 10 s, 2 s) for `identity`, in `namespace`.
    pub fn new(namespace: impl Into<String>, identity: impl Into<String>) -> LeaseSettings {
        LeaseSettings {
            namespace: namespace.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// Whether this replica leads, as it changes.
#[derive(Debug, Clone)]
pub struct Leading(State);

#[derive(Debug, Clone)]
enum State {
    /// Election turned off: this replica writes.
    Always,
    Elected(watch::Receiver<bool>),
    /// The election ended (its task gone): never leading again.
    Stopped,
}

impl Leading {
    /// Always leading: a controller alone (election turned off).
    pub fn always() -> Leading {
        Leading(State::Always)
    }

    pub fn now(&self) -> bool {
        match &self.0 {
            State::Always => true,
            State::Elected(receiver) => *receiver.borrow() && receiver.has_changed().is_ok(),
            State::Stopped => false,
        }
    }

    /// Waits until leadership changes; returns the new value. Pending forever when it cannot
    /// change any more.
    pub async fn changed(&mut self) -> bool {
        match &mut self.0 {
            State::Elected(receiver) => match receiver.changed().await {
                Ok(()) => *receiver.borrow_and_update(),
                Err(_) => {
                    self.0 = State::Stopped;
                    false
                }
            },
            State::Always | State::Stopped => std::future::pending().await,
        }
    }
}

/// A running election; stop it with [`release`](Self::release) (or drop it: as a crash,
/// nothing released).
pub struct Election {
    leading: watch::Receiver<bool>,
    /// Taken by `release`.
    task: Option<JoinHandle<Elector>>,
    stop: watch::Sender<bool>,
}

impl Election {
    /// Starts campaigning on the current runtime.
    pub fn start(client: Client, settings: LeaseSettings) -> Election {
        let (leading_tx, leading) = watch::channel(false);
        let (stop, stopped) = watch::channel(false);
        let elector = Elector {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            observed: None,
            leading: leading_tx,
            last_renewal: None,
        };
        Election { leading, task: Some(tokio::spawn(elector.run(stopped))), stop }
    }

    pub fn leading(&self) -> Leading {
        Leading(State::Elected(self.leading.clone()))
    }

    /// Stops campaigning; a leader steps down and releases the Lease so that another replica
    /// takes over at once.
    pub async fn release(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take()
            && let Ok(mut elector) = task.await
        {
            // Bounded: an unreachable API server must not hold up shutdown; the lease then
            // expires instead.
            let limit = elector.settings.renew_deadline;
            if tokio::time::timeout(limit, elector.release()).await.is_err() {
                warn!(lease = %elector.lease_name(), "could not release the lease in time; it expires instead");
            }
        }
    }
}

impl Drop for Election {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The campaign's state.
struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// The record last read and when (on this clock) it last changed.
    observed: Option<(Record, Instant)>,
    leading: watch::Sender<bool>,
    /// When this replica last wrote the Lease as its holder.
    last_renewal: Option<Instant>,
}

/// How an attempt to hold the Lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// This replica holds it, renewed now.
    Holding,
    /// Another replica holds it and renews it.
    HeldByAnother,
    /// No answer, or a write that lost a race: try again.
    Failed,
}

/// What of a Lease decides who leads.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<Timestamp>,
    duration_seconds: Option<i32>,
    transitions: i32,
    acquire_time: Option<Timestamp>,
}

impl Record {
    fn of(lease: &Lease) -> Record {
        let spec = lease.spec.clone().unwrap_or_default();
        Record {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            renew_time: spec.renew_time.map(|t| t.0),
            duration_seconds: spec.lease_duration_seconds,
            transitions: spec.lease_transitions.unwrap_or(0),
            acquire_time: spec.acquire_time.map(|t| t.0),
        }
    }
}

impl Elector {
    async fn run(mut self, mut stop: watch::Receiver<bool>) -> Elector {
        loop {
            // A leader's attempt may last until its renewal deadline, not beyond: a request
            // the client keeps retrying (an API server answering 503) must not keep it leading.
            let limit = match (*self.leading.borrow(), self.last_renewal) {
                (true, Some(at)) => (at + self.settings.renew_deadline).saturating_duration_since(Instant::now()),
                _ => self.settings.duration,
            };
            let attempt = tokio::time::timeout(limit.max(Duration::from_millis(1)), self.try_acquire_or_renew())
                .await
                .unwrap_or(Attempt::Failed);
            let acquired = attempt == Attempt::Holding;
            let now = Instant::now();
            if acquired {
                self.last_renewal = Some(now);
            }
            // Another holder means the lease was taken over: stop at once. An error leaves
            // the leader acting until its renewal deadline.
            let lapsed = attempt == Attempt::HeldByAnother
                || self.last_renewal.is_none_or(|at| now.duration_since(at) >= self.settings.renew_deadline);
            let leading = *self.leading.borrow();
            if acquired && !leading {
                info!(lease = %self.lease_name(), identity = %self.settings.identity, "elected leader: this replica writes");
                self.leading.send_replace(true);
            } else if !acquired && leading && lapsed {
                warn!(
                    lease = %self.lease_name(), deadline = ?self.settings.renew_deadline,
                    "could not renew the lease in time: no longer leader, stopped writing"
                );
                self.leading.send_replace(false);
            }
            // Client-go's jitter on the standby's retries keeps replicas that started
            // together from asking in lockstep.
            let wait = if *self.leading.borrow() { self.settings.retry } else { jittered(self.settings.retry) };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return self,
            }
        }
    }

    fn lease_name(&self) -> String {
        format!("{}/{LEASE_NAME}", self.settings.namespace)
    }

    /// One attempt: read the Lease, and write it as holder if this replica holds it, nobody
    /// does, or its holder has been silent for the lease duration.
    async fn try_acquire_or_renew(&mut self) -> Attempt {
        let now = Timestamp::now();
        let lease = match self.api.get_opt(LEASE_NAME).await {
            Ok(lease) => lease,
            Err(e) => {
                debug!(lease = %self.lease_name(), error = %e, "cannot read the lease");
                return Attempt::Failed;
            }
        };
        let Some(lease) = lease else {
            let fresh = self.lease(None, now, &Record::of(&Lease::default()));
            let created = self.api.create(&PostParams::default(), &fresh).await;
            return self.wrote(created, "cannot create the lease (another replica first?)");
        };
        let record = self.observe(&lease);
        let mine = record.holder.as_deref() == Some(self.settings.identity.as_str());
        if !mine && record.holder.is_some() {
            let duration = record
                .duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.settings.duration, Duration::from_secs);
            let changed_at = self.observed.as_ref().map(|(_, at)| *at).unwrap_or_else(Instant::now);
            if changed_at.elapsed() < duration {
                return Attempt::HeldByAnother;
            }
            info!(lease = %self.lease_name(), holder = ?record.holder, "the leader stopped renewing: taking over");
        }
        let updated = self.lease(lease.metadata.resource_version.clone(), now, &record);
        let replaced = self.api.replace(LEASE_NAME, &PostParams::default(), &updated).await;
        self.wrote(replaced, "cannot write the lease (another replica wrote it?)")
    }

    /// The end of an attempt that wrote the Lease as its holder: held if the write succeeded.
    fn wrote(&mut self, result: kube::Result<Lease>, failure: &str) -> Attempt {
        match result {
            Ok(written) => {
                self.observe(&written);
                Attempt::Holding
            }
            Err(e) => {
                debug!(lease = %self.lease_name(), error = %e, "{failure}");
                Attempt::Failed
            }
        }
    }

    /// Records `lease` as read; returns its record.
    fn observe(&mut self, lease: &Lease) -> Record {
        let record = Record::of(lease);
        if self.observed.as_ref().is_none_or(|(seen, _)| *seen != record) {
            self.observed = Some((record.clone(), Instant::now()));
        }
        record
    }

    /// The Lease with this replica as holder, renewed `now`, after `previous`.
    fn lease(&self, resource_version: Option<String>, now: Timestamp, previous: &Record) -> Lease {
        let identity = &self.settings.identity;
        let mine = previous.holder.as_deref() == Some(identity.as_str());
        let transitions = if mine || previous.holder.is_none() && previous.acquire_time.is_none() {
            previous.transitions
        } else {
            previous.transitions.saturating_add(1)
        };
        let acquired = if mine { previous.acquire_time.unwrap_or(now) } else { now };
        Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.to_owned()),
                namespace: Some(self.settings.namespace.clone()),
                resource_version,
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(identity.clone()),
                lease_duration_seconds: Some(i32::try_from(self.settings.duration.as_secs()).unwrap_or(i32::MAX)),
                acquire_time: Some(MicroTime(acquired)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(transitions),
                ..LeaseSpec::default()
            }),
        }
    }

    /// Gives the Lease up if this replica holds it: an empty holder, which another replica
    /// takes at its next try.
    async fn release(&mut self) {
        let was_leading = self.leading.send_replace(false);
        if !was_leading {
            return;
        }
        let Ok(Some(lease)) = self.api.get_opt(LEASE_NAME).await else { return };
        let record = Record::of(&lease);
        if record.holder.as_deref() != Some(self.settings.identity.as_str()) {
            return;
        }
        let mut released = lease.clone();
        if let Some(spec) = released.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
        }
        match self.api.replace(LEASE_NAME, &PostParams::default(), &released).await {
            Ok(_) => info!(lease = %self.lease_name(), "released the lease"),
            Err(e) => {
                warn!(lease = %self.lease_name(), error = %e, "cannot release the lease; another replica takes over once it expires")
            }
        }
    }
}

/// `base` plus up to 20 % (client-go's jitter factor 1.2).
fn jittered(base: Duration) -> Duration {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    base + base.mul_f64(0.2 * f64::from(nanos % 1000) / 1000.0)
}
