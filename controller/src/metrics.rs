//! The controller's metrics (`:15020/metrics`, OpenMetrics text): what it pushed, to whom,
//! what the proxies acknowledged or rejected, and the certificates it issued or refused.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Why a certificate was refused, or `issued`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabels {
    /// `issued`, or the refusal's reason (the `reason` of the error answer).
    pub result: &'static str,
}

/// An API answer: which API (`watch`, `ack`, `certificates`, `other`) and its status code.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub api: &'static str,
    pub code: u16,
}

pub struct Metrics {
    registry: Registry,
    /// The current model version.
    pub version: Gauge,
    /// Resources in the model.
    pub resources: Gauge,
    /// Open watch streams.
    pub subscribers: Gauge,
    /// Deltas handed to subscribers (one per subscriber per delta).
    pub pushes: Counter,
    /// Bytes of those deltas.
    pub pushed_bytes: Counter,
    /// Subscriptions that started with a full snapshot.
    pub snapshots: Counter,
    /// Subscriptions that resumed from the history.
    pub resumes: Counter,
    /// Bytes of the first messages of subscriptions (snapshots, or the deltas a resumption
    /// sends).
    pub start_bytes: Counter,
    /// Reports of a version applied in full.
    pub acks_applied: Counter,
    /// Reports of a version applied with some resources rejected.
    pub acks_rejected: Counter,
    /// Resources proxies rejected.
    pub rejected_resources: Counter,
    pub certificates: Family<CertificateLabels, Counter>,
    /// Answers of the API, by path and status code.
    pub requests: Family<RequestLabels, Counter>,
    /// Source objects currently rejected (a bad file, field or value).
    pub source_rejections: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::default(),
            version: Gauge::default(),
            resources: Gauge::default(),
            subscribers: Gauge::default(),
            pushes: Counter::default(),
            pushed_bytes: Counter::default(),
            snapshots: Counter::default(),
            resumes: Counter::default(),
            start_bytes: Counter::default(),
            acks_applied: Counter::default(),
            acks_rejected: Counter::default(),
            rejected_resources: Counter::default(),
            certificates: Family::default(),
            requests: Family::default(),
            source_rejections: Gauge::default(),
        };
        let r = &mut m.registry;
        r.register("weft_controller_model_version", "Current model version", m.version.clone());
        r.register("weft_controller_model_resources", "Resources in the model", m.resources.clone());
        r.register("weft_controller_subscribers", "Open watch streams", m.subscribers.clone());
        r.register("weft_controller_pushes", "Deltas sent to subscribers", m.pushes.clone());
        r.register("weft_controller_pushed_bytes", "Bytes of deltas sent to subscribers", m.pushed_bytes.clone());
        r.register("weft_controller_snapshots", "Subscriptions started with a snapshot", m.snapshots.clone());
        r.register("weft_controller_resumes", "Subscriptions resumed from the history", m.resumes.clone());
        r.register(
            "weft_controller_start_bytes",
            "Bytes of the first messages of subscriptions (snapshots or resumed deltas)",
            m.start_bytes.clone(),
        );
        r.register("weft_controller_acks_applied", "Versions proxies applied in full", m.acks_applied.clone());
        r.register(
            "weft_controller_acks_rejected",
            "Versions proxies applied with rejected resources",
            m.acks_rejected.clone(),
        );
        r.register("weft_controller_rejected_resources", "Resources proxies rejected", m.rejected_resources.clone());
        r.register("weft_controller_certificates", "Certificate requests, by result", m.certificates.clone());
        r.register("weft_controller_requests", "API requests, by API and status code", m.requests.clone());
        r.register(
            "weft_controller_source_rejections",
            "Source objects currently rejected",
            m.source_rejections.clone(),
        );
        m
    }

    /// The metrics as OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
