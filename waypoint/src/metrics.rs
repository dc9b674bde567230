//! The waypoint's metrics, with the names and labels Istio's dashboards and Kiali read
//! (`reporter="waypoint"`), in OpenMetrics text on `:15020/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub use ztunnel::metrics::CONTENT_TYPE;

/// Istio's standard request labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_version: String,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub grpc_response_status: String,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

/// Labels of the retry and route-problem counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub destination_service: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RequestLabels, Histogram>,
    pub request_bytes: Family<RequestLabels, Histogram>,
    pub response_bytes: Family<RequestLabels, Histogram>,
    /// Attempts after the first.
    pub retries: Family<ServiceLabels, Counter>,
    /// Retries the budget refused.
    pub retries_budget_exhausted: Family<ServiceLabels, Counter>,
    /// Endpoints ejected by outlier detection.
    pub ejections: Family<ServiceLabels, Counter>,
}

fn duration_histogram() -> Histogram {
    // Istio's default buckets for istio_request_duration_milliseconds.
    Histogram::new([0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0])
}

fn bytes_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1.0, 10.0, 8))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration =
            Family::<RequestLabels, Histogram>::new_with_constructor(duration_histogram as fn() -> Histogram);
        let request_bytes =
            Family::<RequestLabels, Histogram>::new_with_constructor(bytes_histogram as fn() -> Histogram);
        let response_bytes =
            Family::<RequestLabels, Histogram>::new_with_constructor(bytes_histogram as fn() -> Histogram);
        let retries = Family::<ServiceLabels, Counter>::default();
        let retries_budget_exhausted = Family::<ServiceLabels, Counter>::default();
        let ejections = Family::<ServiceLabels, Counter>::default();
        registry.register("istio_requests", "Requests handled by the waypoint", requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration, to the end of the response headers",
            duration.clone(),
        );
        registry.register("istio_request_bytes", "Request body sizes", request_bytes.clone());
        registry.register("istio_response_bytes", "Response body sizes", response_bytes.clone());
        registry.register("weft_waypoint_retries", "Retried attempts", retries.clone());
        registry.register(
            "weft_waypoint_retries_budget_exhausted",
            "Retries not made because the service's retry budget was spent",
            retries_budget_exhausted.clone(),
        );
        registry.register("weft_waypoint_ejections", "Endpoints ejected after consecutive failures", ejections.clone());
        Metrics {
            registry,
            requests,
            duration,
            request_bytes,
            response_bytes,
            retries,
            retries_budget_exhausted,
            ejections,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
