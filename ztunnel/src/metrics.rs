//! ztunnel's metrics, with the names and labels Istio dashboards and Kiali already read
//! (ARCHITECTURE §9). OpenMetrics text on `:15020/metrics` ([`CONTENT_TYPE`]).
//!
//! As in Istio, `istio_tcp_received_bytes_total` counts bytes from the client to the server
//! (the request direction) and `istio_tcp_sent_bytes_total` bytes from the server back.
//!
//! The connection counters have one writer: a connection's record
//! (`proxy::record::ConnectionRecord`) counts it as opened through [`Metrics::open`], closes
//! it through the returned [`ConnCounters`], or counts its refusal through
//! [`Metrics::refuse`], and writes its access line from the same fields. The HBONE server's
//! own refusals (pending handshakes, idle connections, dial permits, reset floods, failed
//! handshakes) reach [`Metrics::refuse`] through its budget's observer (`app`).
//!
//! The access lines of connections that carried nothing (refused, or ended in error before a
//! byte) are rate-limited per kind ([`AccessLogLimit`]); their metrics are not.

use std::fmt;

use hbone::limits::{Admit, Cause, LogGate, Rate};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// What [`Metrics::encode`] writes: the OpenMetrics text format, whose counters' samples end
/// in `_total` while their `# TYPE` line names the family without it. Served as the classic
/// Prometheus text (`text/plain; version=0.0.4`), a scraper would read every counter as
/// untyped.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Which proxy of the connection reports it.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reporter {
    /// The proxy on the client's side (outbound).
    source,
    /// The proxy on the server's side (inbound).
    destination,
}

/// `mutual_tls` for HBONE, `none` for plaintext.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SecurityPolicy {
    mutual_tls,
    none,
}

/// The Istio standard TCP label set.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub request_protocol: &'static str,
    pub connection_security_policy: SecurityPolicy,
}

/// Why a connection was refused: the `reason` of `weft_connections_refused_total`, and the
/// start of the access line's `reason`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Refusal {
    /// L4 authorization denied it. On the source's ztunnel: the destination answered 403.
    Policy,
    /// An inbound tunnel claimed (`forwarded: for=`) an address its peer may not claim.
    ForwardedMismatch,
    /// Plaintext reached a STRICT workload.
    StrictMtls,
    /// Not a connection this ztunnel serves: the target is not the pod's (or is a port
    /// reserved for ztunnel), or the pod has left the configuration or has no valid identity.
    NotServed,
    /// Nowhere to send it: a service address without a usable endpoint, a workload without
    /// an identity.
    NoRoute,
    /// No endpoint, or the app behind an inbound connection, could be connected to.
    Unreachable,
    /// An HBONE connection whose TLS or HTTP/2 handshake failed. This and the next four are
    /// the HBONE server's own refusals, of a connection (or a stream, for `DialLimit`) to a
    /// pod's port 15008; `destination_workload` is that pod's.
    HandshakeFailed,
    /// An HBONE connection closed unread: too many handshakes pending for the pod or ztunnel.
    HandshakeLimit,
    /// An HBONE connection closed when it became idle: too many idle connections.
    IdleLimit,
    /// A stream answered 503 without a dial: its peer's dials did not free up in time.
    DialLimit,
    /// An HBONE connection closed with GOAWAY(ENHANCE_YOUR_CALM): it reset streams early.
    ResetFlood,
}

impl Refusal {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Policy => "policy",
            Refusal::ForwardedMismatch => "forwarded_mismatch",
            Refusal::StrictMtls => "strict_mtls",
            Refusal::NotServed => "not_served",
            Refusal::NoRoute => "no_route",
            Refusal::Unreachable => "unreachable",
            Refusal::HandshakeFailed => "handshake_failed",
            Refusal::HandshakeLimit => "handshake_limit",
            Refusal::IdleLimit => "idle_limit",
            Refusal::DialLimit => "dial_limit",
            Refusal::ResetFlood => "reset_flood",
        }
    }

    const COUNT: usize = 11;

    /// Its slot among the access log's gates.
    fn index(self) -> usize {
        self as usize
    }

    /// Whether the mesh's rules forbade the connection (`denied` in the access log), rather
    /// than it having nowhere to go (`refused`).
    pub fn is_denial(self) -> bool {
        matches!(self, Refusal::Policy | Refusal::ForwardedMismatch | Refusal::StrictMtls)
    }
}

impl From<Cause> for Refusal {
    fn from(cause: Cause) -> Refusal {
        match cause {
            Cause::HandshakeFailed => Refusal::HandshakeFailed,
            Cause::HandshakeLimit => Refusal::HandshakeLimit,
            Cause::IdleLimit => Refusal::IdleLimit,
            Cause::DialLimit => Refusal::DialLimit,
            Cause::ResetFlood => Refusal::ResetFlood,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Refusal {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// How a handoff ended, as this ztunnel saw it (`weft_handoffs_total`).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum HandoffOutcome {
    /// This ztunnel took the node over from a running one.
    took_over,
    /// A newer ztunnel started a handoff and did not commit it: this one resumed accepting.
    aborted,
    /// A newer ztunnel asked and was refused (no common version, or this one shutting down).
    refused,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandoffLabels {
    pub outcome: HandoffOutcome,
}

/// The labels of `weft_connections_refused_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub reason: Refusal,
    pub destination_workload: String,
}

pub struct Metrics {
    registry: Registry,
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    received_bytes: Family<TcpLabels, Counter>,
    sent_bytes: Family<TcpLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    pub config_rejected: Counter,
    pub config_applied: Counter,
    pub enrolled_pods: Gauge,
    /// Connections open now (opened, not yet closed): what a ztunnel that handed the node over
    /// reports while it drains.
    open_connections: Gauge,
    handoffs: Family<HandoffLabels, Counter>,
    /// The connections the ztunnel this one took over from still carries, as it reports them;
    /// 0 once it has exited.
    pub upgrade_draining: Gauge,
    /// The access log's limit, here because the record, the one writer of both a connection's
    /// line and its metrics, reaches it through them.
    access_log: AccessLogLimit,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            opened: Family::default(),
            closed: Family::default(),
            received_bytes: Family::default(),
            sent_bytes: Family::default(),
            refused: Family::default(),
            config_rejected: Counter::default(),
            config_applied: Counter::default(),
            enrolled_pods: Gauge::default(),
            open_connections: Gauge::default(),
            handoffs: Family::default(),
            upgrade_draining: Gauge::default(),
            registry: Registry::default(),
            access_log: AccessLogLimit::new(hbone::config::DEFAULT_LOG_LIMIT),
        };
        registry.register("istio_tcp_connections_opened", "TCP connections opened", m.opened.clone());
        registry.register("istio_tcp_connections_closed", "TCP connections closed", m.closed.clone());
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client (request direction)",
            m.received_bytes.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client (response direction)",
            m.sent_bytes.clone(),
        );
        registry.register(
            "weft_connections_refused",
            "Connections refused by policy, STRICT mode, a target not served here, no route or an unreachable target; \
             HBONE connections and streams the HBONE server refused (failed handshakes, its limits)",
            m.refused.clone(),
        );
        registry.register("weft_config_rejected", "Config snapshots rejected as invalid", m.config_rejected.clone());
        registry.register("weft_config_applied", "Config snapshots applied", m.config_applied.clone());
        registry.register("weft_enrolled_pods", "Pods currently captured on this node", m.enrolled_pods.clone());
        registry.register(
            "weft_connections_open",
            "Connections this ztunnel carries now (opened and not yet closed)",
            m.open_connections.clone(),
        );
        registry.register(
            "weft_handoffs",
            "Upgrade handoffs: took_over (this ztunnel took the node over), aborted (a newer one did not commit), refused",
            m.handoffs.clone(),
        );
        registry.register(
            "weft_upgrade_draining_connections",
            "Connections the ztunnel this one took over from still carries (0 once it has exited)",
            m.upgrade_draining.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The same metrics, with the access log limited to `rate` lines of each kind.
    pub fn with_log_limit(mut self, rate: Rate) -> Metrics {
        self.access_log = AccessLogLimit::new(rate);
        self
    }

    /// Whether the access line of a connection of `kind` that carried nothing may be written
    /// (writing the summary of those suppressed before it first).
    pub(crate) fn admit_access_line(&self, kind: AccessKind) -> bool {
        self.access_log.admit(kind)
    }

    /// Writes a summary for each kind of access line suppressed since its last summary.
    pub fn flush_access_log(&self) {
        self.access_log.flush()
    }

    /// The OpenMetrics text exposition, to be served as [`CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a connection as opened and returns its counters for when it closes.
    pub fn open(&self, labels: &TcpLabels) -> ConnCounters {
        self.opened.get_or_create(labels).inc();
        self.open_connections.inc();
        ConnCounters {
            open: self.open_connections.clone(),
            closed: self.closed.get_or_create(labels).clone(),
            received: self.received_bytes.get_or_create(labels).clone(),
            sent: self.sent_bytes.get_or_create(labels).clone(),
        }
    }

    /// Counts a handoff's end.
    pub fn handoff(&self, outcome: HandoffOutcome) {
        self.handoffs.get_or_create(&HandoffLabels { outcome }).inc();
    }

    /// Connections open now.
    pub fn open_connections(&self) -> u64 {
        self.open_connections.get().max(0) as u64
    }

    /// Counts a refused connection.
    pub fn refuse(&self, reason: Refusal, destination_workload: &str) {
        self.refused
            .get_or_create(&RefusedLabels { reason, destination_workload: destination_workload.to_owned() })
            .inc();
    }
}

/// The counters of one open connection, taken when it opens: a long-lived connection holds
/// three counter handles instead of its label set.
pub struct ConnCounters {
    open: Gauge,
    closed: Counter,
    received: Counter,
    sent: Counter,
}

impl ConnCounters {
    /// Counts the close and the bytes moved each way: `received` from the client, `sent` to it.
    pub fn close(self, received: u64, sent: u64) {
        self.received.inc_by(received);
        self.sent.inc_by(sent);
        self.closed.inc();
        self.open.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Which access lines share a gate: a refusal's by its reason, an error that carried nothing
/// apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AccessKind {
    Refused(Refusal),
    EmptyError,
}

impl AccessKind {
    fn index(self) -> usize {
        match self {
            AccessKind::Refused(r) => r.index(),
            AccessKind::EmptyError => Refusal::COUNT,
        }
    }
}

impl fmt::Display for AccessKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccessKind::Refused(r) => write!(f, "{}: {r}", if r.is_denial() { "denied" } else { "refused" }),
            AccessKind::EmptyError => f.write_str("error before any byte"),
        }
    }
}

/// The access log's rate limit: `rate.count` lines of each [`AccessKind`] per `rate.per`, the
/// rest counted and summarized under the `access` target. Lines of connections that carried
/// bytes are never limited: what a flood of refusals or aborted tunnels writes is bounded,
/// what real traffic writes is not touched.
pub struct AccessLogLimit {
    rate: Rate,
    gates: [LogGate; Refusal::COUNT + 1],
}

impl AccessLogLimit {
    fn new(rate: Rate) -> AccessLogLimit {
        AccessLogLimit { rate, gates: Default::default() }
    }

    fn admit(&self, kind: AccessKind) -> bool {
        match self.gates[kind.index()].admit(self.rate) {
            Admit::Write { suppressed_before } => {
                if suppressed_before > 0 {
                    summary(kind, suppressed_before);
                }
                true
            }
            Admit::Suppress => false,
        }
    }

    fn flush(&self) {
        let kinds = ALL_REFUSALS.iter().map(|r| AccessKind::Refused(*r)).chain([AccessKind::EmptyError]);
        for kind in kinds {
            let suppressed = self.gates[kind.index()].take_suppressed();
            if suppressed > 0 {
                summary(kind, suppressed);
            }
        }
    }
}

fn summary(kind: AccessKind, suppressed: u64) {
    tracing::event!(
        target: "access",
        tracing::Level::INFO,
        lines = %kind,
        suppressed,
        "access lines suppressed by the rate limit"
    );
}

const ALL_REFUSALS: [Refusal; Refusal::COUNT] = [
    Refusal::Policy,
    Refusal::ForwardedMismatch,
    Refusal::StrictMtls,
    Refusal::NotServed,
    Refusal::NoRoute,
    Refusal::Unreachable,
    Refusal::HandshakeFailed,
    Refusal::HandshakeLimit,
    Refusal::IdleLimit,
    Refusal::DialLimit,
    Refusal::ResetFlood,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_its_own_gate() {
        for (i, r) in ALL_REFUSALS.iter().enumerate() {
            assert_eq!(r.index(), i, "{r}");
            assert_eq!(AccessKind::Refused(*r).index(), i);
        }
        assert_eq!(AccessKind::EmptyError.index(), Refusal::COUNT);
        let names: std::collections::HashSet<&str> = ALL_REFUSALS.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Refusal::COUNT, "label values are distinct");
    }
}
