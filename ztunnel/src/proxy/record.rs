//! One record per connection. Every path (outbound HBONE or passthrough, inbound HBONE,
//! inbound plaintext), refusals included, makes a [`ConnectionRecord`] when it takes a
//! connection, fills in what it learns (the route, who is at either end, the identity the
//! peer proved), counts it as opened once the upstream is connected ([`ConnectionRecord::open`]),
//! and ends it with [`ConnectionRecord::finish`]: the one place that writes the connection's
//! `access` line and updates its metrics, both from the same fields. A refusal is counted
//! there too, in `weft_connections_refused_total{reason}`. A record dropped unfinished (its
//! task cut by the drain deadline or abandoned at shutdown) finishes itself as an error, so
//! every opened connection is also closed.
//!
//! The access line is a contract (`docs/ARCHITECTURE.md`, "Access log"): the same field
//! names on every path, under the `access` log target:
//!
//! ```text
//! INFO access: src.addr=10.244.1.2:40112 src.workload=web-0 src.namespace=front
//!   src.identity=spiffe://cluster.local/ns/front/sa/web dst.addr=10.244.2.2:8080
//!   dst.orig=10.96.0.10:80 dst.workload=api-0 dst.namespace=back
//!   dst.identity=spiffe://cluster.local/ns/back/sa/api dst.service=api.back.svc.cluster.local
//!   protocol="HBONE" direction="outbound" bytes_sent=512 bytes_received=2048 duration_ms=31
//!   outcome="ok"
//! ```
//!
//! `bytes_sent` is what the source sent the destination and `bytes_received` what came back,
//! on both ztunnels' lines of a connection; the metrics call them `istio_tcp_received_bytes`
//! and `istio_tcp_sent_bytes` (the server's view, as Istio counts).
//!
//! **Lines of connections that carried nothing** (refused, or ended in error before a byte
//! moved) are rate-limited, per refusal reason and for such errors apart
//! (`metrics::AccessLogLimit`, `--log-limit`): a client refused in a loop, or opening and
//! aborting tunnels, would otherwise write megabytes a second. Past the limit they are counted
//! and one line per interval says how many were left out:
//!
//! ```text
//! INFO access: access lines suppressed by the rate limit lines=denied: policy suppressed=4210
//! ```
//!
//! Their metrics are always counted.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use tracing::{Level, event};

use crate::metrics::{AccessKind, ConnCounters, Metrics, Refusal, Reporter, SecurityPolicy, TcpLabels};
use crate::state::Peer;

/// What one connection's access line and metrics are made of.
pub struct ConnectionRecord {
    metrics: Arc<Metrics>,
    started: Instant,
    direction: Direction,
    protocol: Protocol,
    /// Port 0 when the source's port is unknown (inbound HBONE: the tunnel's TCP port belongs
    /// to the pooled HBONE connection, not to the client).
    src_addr: SocketAddr,
    /// The source address an inbound tunnel claimed (`forwarded: for=`).
    forwarded: Option<IpAddr>,
    dst_addr: SocketAddr,
    /// Where an outbound connection was headed before capture (a service VIP, say).
    orig: Option<SocketAddr>,
    src: Arc<Peer>,
    dst: Arc<Peer>,
    service: Arc<str>,
    /// Taken when the connection opens.
    counters: Option<ConnCounters>,
    /// Whether the line was written (a dropped record writes it otherwise).
    finished: bool,
}

/// Which way the connection goes through this ztunnel, which is also which reporter counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Captured leaving a local pod.
    Outbound,
    /// Arriving for a local pod.
    Inbound,
}

/// How the connection travels between the ztunnels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Inside an HBONE tunnel (mutual TLS).
    Hbone,
    /// Plain TCP: passthrough, or plaintext inbound.
    Tcp,
}

/// Bytes a connection moved: `sent` from the source to the destination, `received` back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub sent: u64,
    pub received: u64,
}

/// How a connection ended.
#[derive(Debug)]
pub enum Outcome {
    /// Both directions ended.
    Ok(Traffic),
    /// The copy failed, after moving what it moved.
    Error(Traffic, String),
    /// Refused before any byte was carried: `denied` in the log when the mesh's rules forbade
    /// it, `refused` otherwise (see [`Refusal::is_denial`]).
    Refused(Refusal, String),
}

impl Outcome {
    /// The outcome of a copy that moved `Traffic` and maybe failed.
    pub fn of_copy<E: fmt::Display>(result: Result<Traffic, (Traffic, E)>) -> Outcome {
        match result {
            Ok(t) => Outcome::Ok(t),
            Err((t, e)) => Outcome::Error(t, e.to_string()),
        }
    }
}

impl ConnectionRecord {
    /// A connection from `src_addr` to `dst_addr`, taken now; who is at either end is unknown
    /// until [`source`](Self::source) and [`destination`](Self::destination) say.
    pub fn new(
        metrics: &Arc<Metrics>,
        direction: Direction,
        protocol: Protocol,
        src_addr: SocketAddr,
        dst_addr: SocketAddr,
    ) -> Box<ConnectionRecord> {
        let unknown = Peer::unknown();
        Box::new(ConnectionRecord {
            metrics: metrics.clone(),
            started: Instant::now(),
            direction,
            protocol,
            src_addr,
            forwarded: None,
            dst_addr,
            orig: None,
            src: unknown.clone(),
            dst: unknown,
            service: unknown_service(),
            counters: None,
            finished: false,
        })
    }

    /// Counts the duration from `started` (when the request arrived) instead of from now.
    pub fn started_at(&mut self, started: Instant) {
        self.started = started;
    }

    pub fn source(&mut self, peer: Arc<Peer>) {
        self.src = peer;
    }

    /// The source address an inbound tunnel claimed, if it claimed one.
    pub fn claimed(&mut self, forwarded: Option<IpAddr>) {
        self.forwarded = forwarded;
    }

    /// Where an outbound connection was headed when it was captured.
    pub fn original_destination(&mut self, orig: SocketAddr) {
        self.orig = Some(orig);
    }

    /// The route an outbound connection takes (each endpoint tried in turn).
    pub fn route(&mut self, protocol: Protocol, dst_addr: SocketAddr) {
        self.protocol = protocol;
        self.dst_addr = dst_addr;
    }

    /// Who is at the destination, and the service metrics name it by.
    pub fn destination(&mut self, peer: Arc<Peer>, service: Arc<str>) {
        self.dst = peer;
        self.service = service;
    }

    /// The identity the destination proved in the TLS handshake.
    pub fn destination_proved(&mut self, identity: &str) {
        self.dst = self.dst.with_principal(identity);
    }

    /// Counts the connection as opened (its upstream is connected), with the labels the
    /// record holds now.
    pub fn open(&mut self) {
        debug_assert!(self.counters.is_none(), "a connection is opened once");
        self.counters = Some(self.metrics.open(&self.labels()));
    }

    /// Ends the connection: counts it (closed with its bytes, or refused) and writes its
    /// access line.
    pub fn finish(mut self, outcome: Outcome) {
        match &outcome {
            Outcome::Ok(t) => self.write(Some(*t), "ok", None),
            Outcome::Error(t, e) => self.write(Some(*t), "error", Some(e)),
            Outcome::Refused(refusal, detail) => {
                self.metrics.refuse(*refusal, &self.dst.workload);
                if !self.metrics.admit_access_line(AccessKind::Refused(*refusal)) {
                    self.finished = true;
                    return;
                }
                let reason = format!("{refusal}: {detail}");
                self.write(
                    Some(Traffic::default()),
                    if refusal.is_denial() { "denied" } else { "refused" },
                    Some(&reason),
                )
            }
        }
    }

    /// Ends the connection as refused, before it carried anything.
    pub fn refuse(self, refusal: Refusal, detail: impl fmt::Display) {
        self.finish(Outcome::Refused(refusal, detail.to_string()))
    }

    /// The Istio label set of this connection.
    fn labels(&self) -> TcpLabels {
        TcpLabels {
            reporter: match self.direction {
                Direction::Outbound => Reporter::source,
                Direction::Inbound => Reporter::destination,
            },
            source_workload: self.src.workload.clone(),
            source_workload_namespace: self.src.namespace.clone(),
            source_principal: self.src.principal.clone(),
            destination_workload: self.dst.workload.clone(),
            destination_workload_namespace: self.dst.namespace.clone(),
            destination_principal: self.dst.principal.clone(),
            destination_service: self.service.to_string(),
            request_protocol: "tcp",
            connection_security_policy: match self.protocol {
                Protocol::Hbone => SecurityPolicy::mutual_tls,
                Protocol::Tcp => SecurityPolicy::none,
            },
        }
    }

    /// Closes the counters (if the connection opened) and writes the access line; `traffic`
    /// is `None` when the byte counts are unknown (a cut connection), and the line then has
    /// no byte fields.
    ///
    /// An error that carried nothing (no byte either way, or never opened) goes through the
    /// access log's limit; its counters are closed either way.
    fn write(&mut self, traffic: Option<Traffic>, outcome: &'static str, reason: Option<&str>) {
        self.finished = true;
        let opened = self.counters.is_some();
        if let Some(counters) = self.counters.take() {
            let t = traffic.unwrap_or_default();
            // The metrics count from the server's side: received from the client, sent back.
            counters.close(t.sent, t.received);
        }
        let carried_nothing = traffic.map_or(!opened, |t| t == Traffic::default());
        if outcome == "error" && carried_nothing && !self.metrics.admit_access_line(AccessKind::EmptyError) {
            return;
        }
        event!(
            target: "access",
            Level::INFO,
            src.addr = %SourceAddr(self.src_addr),
            src.forwarded = self.forwarded.map(display),
            src.workload = %self.src.workload,
            src.namespace = %self.src.namespace,
            src.identity = %self.src.principal,
            dst.addr = %self.dst_addr,
            dst.orig = self.orig.map(display),
            dst.workload = %self.dst.workload,
            dst.namespace = %self.dst.namespace,
            dst.identity = %self.dst.principal,
            dst.service = %self.service,
            protocol = match self.protocol {
                Protocol::Hbone => "HBONE",
                Protocol::Tcp => "TCP",
            },
            direction = match self.direction {
                Direction::Outbound => "outbound",
                Direction::Inbound => "inbound",
            },
            bytes_sent = traffic.map(|t| t.sent),
            bytes_received = traffic.map(|t| t.received),
            duration_ms = self.started.elapsed().as_millis() as u64,
            outcome,
            reason,
        );
    }
}

impl Drop for ConnectionRecord {
    fn drop(&mut self) {
        if !self.finished {
            let reason = if self.counters.is_some() {
                "cut before it ended (drain deadline or shutdown); byte counts unknown"
            } else {
                "abandoned before it was served (the connect timed out, the client reset the stream, or a drain cut it)"
            };
            self.write(None, "error", Some(reason));
        }
    }
}

/// "unknown", shared: a record is made for every connection, refused ones included.
fn unknown_service() -> Arc<str> {
    static UNKNOWN: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("unknown"));
    UNKNOWN.clone()
}

/// A source address for the log: `ip:port`, or the IP alone when the port is unknown (0).
struct SourceAddr(SocketAddr);

impl fmt::Display for SourceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.port() {
            0 => self.0.ip().fmt(f),
            _ => self.0.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use hbone::limits::Rate;

    use super::*;

    /// A flood of refusals and of tunnels aborted before a byte writes `count` access lines of
    /// each kind, then one summary per kind at the flush; the metrics count every connection,
    /// and the lines of connections that carried bytes are never limited.
    #[test]
    fn lines_of_connections_that_carried_nothing_are_limited_per_kind() {
        let log = Captured::default();
        let subscriber = tracing_subscriber::fmt().with_writer(log.clone()).with_ansi(false).finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        // One window for the whole test: what is written is exactly the first three of a kind.
        let metrics = Arc::new(Metrics::new().with_log_limit(Rate::new(3, Duration::from_secs(3600)).unwrap()));
        let (src, dst) = ("10.0.0.1:0".parse().unwrap(), "10.0.0.2:8080".parse().unwrap());
        let record = || ConnectionRecord::new(&metrics, Direction::Inbound, Protocol::Hbone, src, dst);
        for _ in 0..50 {
            record().refuse(Refusal::Policy, "denied by policy back/no-web");
        }
        for _ in 0..20 {
            record().refuse(Refusal::NotServed, "10.0.0.2:15008 is reserved");
        }
        for _ in 0..10 {
            let mut aborted = record();
            aborted.open();
            aborted.finish(Outcome::Error(Traffic::default(), "the client reset the stream".into()));
        }
        for _ in 0..4 {
            // Dropped before it was served, as a dial a reset abandons.
            drop(record());
        }
        for _ in 0..10 {
            let mut ok = record();
            ok.open();
            ok.finish(Outcome::Ok(Traffic { sent: 5, received: 7 }));
        }
        assert_eq!(log.count("outcome=\"denied\""), 3, "{}", log.text());
        assert_eq!(log.count("outcome=\"refused\""), 3);
        assert_eq!(log.count("outcome=\"error\""), 3, "one gate for every error that carried nothing");
        assert_eq!(log.count("outcome=\"ok\""), 10, "lines of connections that carried bytes are all written");
        assert_eq!(log.count("suppressed"), 0);
        let text = metrics.encode();
        for counted in [
            "weft_connections_refused_total{reason=\"policy\",destination_workload=\"unknown\"} 50",
            "weft_connections_refused_total{reason=\"not_served\",destination_workload=\"unknown\"} 20",
            "istio_tcp_connections_closed_total{",
        ] {
            assert!(text.contains(counted), "{counted} missing from\n{text}");
        }
        assert!(text.contains("connection_security_policy=\"mutual_tls\"} 20"), "20 opened and closed:\n{text}");

        metrics.flush_access_log();
        let text = log.text();
        let summaries: Vec<&str> = text.lines().filter(|l| l.contains("access lines suppressed")).collect();
        assert_eq!(summaries.len(), 3, "{text}");
        for (kind, n) in [("denied: policy", 47), ("refused: not_served", 17), ("error before any byte", 11)] {
            let found = summaries
                .iter()
                .any(|l| l.contains(&format!("lines={kind}")) && l.contains(&format!("suppressed={n}")));
            assert!(found, "no summary of {n} {kind:?} lines in\n{text}");
        }
        assert!(summaries.iter().all(|l| l.contains(" access:")), "summaries are under the access target");
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }

        fn count(&self, needle: &str) -> usize {
            self.text().lines().filter(|l| l.contains(needle)).count()
        }
    }

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;

        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }
}
