//! ztunnel's metrics, with the names and labels Istio dashboards and Kiali already read
//! (ARCHITECTURE §9). Prometheus text on `:15020/metrics`.
//!
//! As in Istio, `istio_tcp_received_bytes_total` counts bytes from the client to the server
//! (the request direction) and `istio_tcp_sent_bytes_total` bytes from the server back.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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

/// Why a connection was refused, for `weft_connections_refused_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub reason: &'static str,
    pub destination_workload: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    pub received_bytes: Family<TcpLabels, Counter>,
    pub sent_bytes: Family<TcpLabels, Counter>,
    pub refused: Family<RefusedLabels, Counter>,
    pub config_rejected: Counter,
    pub config_applied: Counter,
    pub enrolled_pods: Gauge,
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
            registry: Registry::default(),
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
            "Connections refused by policy, STRICT mode or an unreachable target",
            m.refused.clone(),
        );
        registry.register("weft_config_rejected", "Config snapshots rejected as invalid", m.config_rejected.clone());
        registry.register("weft_config_applied", "Config snapshots applied", m.config_applied.clone());
        registry.register("weft_enrolled_pods", "Pods currently captured on this node", m.enrolled_pods.clone());
        Metrics { registry, ..m }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The counters of one open connection, taken when it opens: a long-lived connection holds
/// three counter handles instead of its label set.
pub struct ConnCounters {
    closed: Counter,
    received: Counter,
    sent: Counter,
}

impl ConnCounters {
    /// Counts the close and the bytes moved each way.
    pub fn close(self, received: u64, sent: u64) {
        self.received.inc_by(received);
        self.sent.inc_by(sent);
        self.closed.inc();
    }
}

impl Metrics {
    /// Counts a connection as opened and returns its counters for when it closes.
    pub fn open(&self, labels: &TcpLabels) -> ConnCounters {
        self.opened.get_or_create(labels).inc();
        ConnCounters {
            closed: self.closed.get_or_create(labels).clone(),
            received: self.received_bytes.get_or_create(labels).clone(),
            sent: self.sent_bytes.get_or_create(labels).clone(),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
