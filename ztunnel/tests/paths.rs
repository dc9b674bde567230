//! ztunnel's data paths in process, without root. Pods are addresses of 127.0.0.0/8 and
//! ztunnel's sockets are made by `proxy::net::Loopback` instead of inside pods' network
//! namespaces; the rest is the production code: the captured ports' accept loop, outbound
//! resolution, the HBONE client and server with certificates from a test CA, inbound
//! authorization, the plaintext port, and each connection's record. Every test reads what an
//! operator reads, the `access` line (captured from `tracing`) and the metrics text, and
//! checks both against what happened and against each other: the same workloads, principals
//! and byte counts.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use hbone::ca::Ca;
use hbone::{ConnectRequest, SpiffeId, TrustBundle, TrustStore, WorkloadCert, drain};
use meshapi::Snapshot;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztunnel::certs::{CertManager, Issuer};
use ztunnel::config::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use ztunnel::inpod::Netns;
use ztunnel::metrics::{Metrics, Refusal};
use ztunnel::proxy::inbound::Inbound;
use ztunnel::proxy::net::Loopback;
use ztunnel::proxy::record::{ConnectionRecord, Direction, Protocol};
use ztunnel::proxy::{self, Balancer, PodDialer, PodInfo, PodRegistry, Proxy, outbound, plaintext};
use ztunnel::state::{Peer, StateStore};

/// The apps' port.
const APP: u16 = 8080;
/// A port where no app listens.
const CLOSED: u16 = 8081;
/// The port of the app of `old`, the workload outside the mesh.
const OLD_APP: u16 = 9090;

/// Two nodes: node-a holds `web` and `batch`; node-b holds `api` (PERMISSIVE, behind the
/// service `api`), `db` (STRICT), `gone` (enrolled, but never started: nothing listens
/// for it) and `shielded` (behind the waypoint `wp`, whose pod is not captured). `old` is outside the mesh. A service without endpoints, and a policy that denies
/// `batch` on `api`.
const MESH: &str = r#"
workloads:
  - {name: web, namespace: front, node: node-a, addresses: [P.2], serviceAccount: web, enrolled: true}
  - {name: batch, namespace: front, node: node-a, addresses: [P.3], serviceAccount: batch, enrolled: true}
  - {name: api, namespace: back, node: node-b, addresses: [P.10], serviceAccount: api, labels: {app: api}, enrolled: true}
  - {name: db, namespace: back, node: node-b, addresses: [P.11], serviceAccount: db, enrolled: true, mtls: STRICT}
  - {name: gone, namespace: back, node: node-b, addresses: [P.12], serviceAccount: gone, enrolled: true}
  - {name: old, namespace: legacy, node: node-a, addresses: [P.20], serviceAccount: old}
  - {name: shielded, namespace: back, node: node-b, addresses: [P.13], serviceAccount: shielded, enrolled: true, waypoint: back/wp}
  - {name: wp, namespace: back, node: node-b, addresses: [P.14], serviceAccount: wp}
waypoints:
  - {name: wp, namespace: back, addresses: [P.14], serviceAccount: wp}
services:
  - {name: api, namespace: back, vips: [P.100], ports: [{port: 80, targetPort: 8080}], selector: {app: api}}
  - {name: empty, namespace: back, vips: [P.101], ports: [{port: 80, targetPort: 8080}], selector: {app: nobody}}
authorizations:
  - {name: no-batch, namespace: back, selector: {app: api}, action: DENY, rules: [{from: [{principals: ["spiffe://cluster.local/ns/front/sa/batch"]}]}]}
"#;

/// The last octet of each name's address.
const HOSTS: [(&str, u8); 10] = [
    ("web", 2),
    ("batch", 3),
    ("api", 10),
    ("db", 11),
    ("gone", 12),
    ("shielded", 13),
    ("wp", 14),
    ("old", 20),
    ("api-vip", 100),
    ("empty-vip", 101),
];

/// A mesh of two ztunnels on loopback, under an address prefix of its own (tests run in
/// parallel, and so may other test processes).
struct Mesh {
    prefix: [u8; 3],
    net: Arc<Loopback>,
    ca: Ca,
    trust: TrustStore,
    a: Arc<Proxy>,
    b: Arc<Proxy>,
    _drain: drain::Trigger,
}

impl Mesh {
    async fn start() -> Mesh {
        capture_logs();
        let ca = Ca::new_root("weft ztunnel paths test").unwrap();
        let trust = TrustStore::new(TrustBundle::new(vec![ca.cert().clone()]).unwrap());
        let mut last_error = None;
        for _ in 0..20 {
            match Mesh::bind(&ca, &trust).await {
                Ok(mesh) => return mesh,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last_error = Some(e),
                Err(e) => panic!("starting the loopback mesh: {e}"),
            }
        }
        panic!("no free loopback prefix: {last_error:?}");
    }

    async fn bind(ca: &Ca, trust: &TrustStore) -> std::io::Result<Mesh> {
        let prefix = prefix();
        let doc = MESH.replace("P.", &format!("{}.{}.{}.", prefix[0], prefix[1], prefix[2]));
        let net = Arc::new(Loopback::new());
        let a = node("node-a", &doc, ca, trust, &net);
        let b = node("node-b", &doc, ca, trust, &net);
        let ip = |name| IpAddr::V4(host(prefix, name));
        // Everything is bound before anything runs: a prefix another process holds is
        // dropped whole.
        let mut pods = Vec::new();
        for (proxy, name) in [(&a, "web"), (&a, "batch"), (&b, "api"), (&b, "db"), (&b, "shielded")] {
            let listeners = (
                TcpListener::bind((ip(name), OUTBOUND_PORT)).await?,
                TcpListener::bind((ip(name), INBOUND_PLAINTEXT_PORT)).await?,
                TcpListener::bind((ip(name), HBONE_PORT)).await?,
            );
            pods.push((proxy.clone(), name, listeners));
        }
        let (trigger, watch) = drain::channel();
        for (proxy, name, (outbound_l, plaintext_l, hbone_l)) in pods {
            // What `Manager::enroll` does, minus the namespace and the capture rules.
            let info = Arc::new(PodInfo { uid: name.to_owned(), ips: vec![ip(name)], netns: Netns::host().unwrap() });
            proxy.pods.insert(&info.ips, &info.netns);
            let identity = proxy.state.load().identity_by_ip(ip(name)).unwrap().unwrap();
            let cert = proxy.certs.obtain(&identity).await.unwrap();
            let server = hbone::Server::new(
                proxy.hbone.clone(),
                Arc::new(cert),
                &proxy.trust,
                Inbound { proxy: proxy.clone(), pod: info.clone() },
            );
            let w = watch.clone();
            tokio::spawn(async move { server.serve(hbone_l, w).await });
            let (p, i, w) = (proxy.clone(), info.clone(), watch.clone());
            tokio::spawn(proxy::serve("outbound", outbound_l, i, p, w, outbound::handle));
            tokio::spawn(proxy::serve("plaintext", plaintext_l, info, proxy, watch.clone(), plaintext::handle));
        }
        Ok(Mesh { prefix, net, ca: copy(ca), trust: trust.clone(), a, b, _drain: trigger })
    }

    fn ip(&self, name: &str) -> IpAddr {
        IpAddr::V4(host(self.prefix, name))
    }

    fn addr(&self, name: &str, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(name), port)
    }

    /// A connection from the app in `pod` to `to`, captured by `pod`'s ztunnel.
    async fn connect(&self, pod: &str, to: SocketAddr) -> TcpStream {
        self.net.connect_captured(self.ip(pod), self.addr(pod, OUTBOUND_PORT), to).await.unwrap()
    }

    /// A plaintext connection from `from` (outside the mesh) to `to` in enrolled `pod`, as
    /// `pod`'s capture rules redirect it to its plaintext port.
    async fn connect_plaintext(&self, from: &str, pod: &str, to: SocketAddr) -> TcpStream {
        self.net.connect_captured(self.ip(from), self.addr(pod, INBOUND_PLAINTEXT_PORT), to).await.unwrap()
    }

    /// The app of `name` on `port`: a sink that answers the byte count (8 bytes) at EOF.
    async fn sink(&self, name: &str, port: u16) {
        let listener = TcpListener::bind(self.addr(name, port)).await.unwrap();
        tokio::spawn(hbone::testing::serve_sink(listener));
    }

    /// An HBONE client that is not ztunnel: it speaks for `pod` (its certificate, its address)
    /// and claims what the test likes.
    fn client(&self, pod: &str, ns: &str) -> (hbone::Client, WorkloadCert) {
        let cert = WorkloadCert::new(self.ca.issue(&id(ns, pod), Duration::from_secs(3600)).unwrap());
        (hbone::Client::new(hbone::Config::default(), self.trust.clone()), cert)
    }

    /// Lines of this mesh only (its prefix is in every address).
    fn lines(&self) -> Vec<Access> {
        let prefix = format!("{}.{}.{}.", self.prefix[0], self.prefix[1], self.prefix[2]);
        access_lines().into_iter().filter(|l| l.get("dst.addr").starts_with(&prefix)).collect()
    }

    /// The one access line of this mesh that `matches`, waiting (bounded) for it.
    async fn line(&self, what: &str, matches: impl Fn(&Access) -> bool) -> Access {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found: Vec<Access> = self.lines().into_iter().filter(&matches).collect();
            match found.len() {
                1 => return found.into_iter().next().unwrap(),
                0 if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
                _ => panic!(
                    "{} access lines for {what}, one expected; this mesh's lines:\n{:#?}",
                    found.len(),
                    self.lines()
                ),
            }
        }
    }
}

/// One ztunnel (not yet serving any pod), programmed with `doc`.
fn node(name: &str, doc: &str, ca: &Ca, trust: &TrustStore, net: &Arc<Loopback>) -> Arc<Proxy> {
    let state = StateStore::default();
    state.replace(Snapshot::from_yaml(doc).unwrap());
    let pods = Arc::new(PodRegistry::with_net(net.clone()));
    let config = hbone::Config::default();
    Arc::new(Proxy {
        node: name.to_owned(),
        state,
        certs: CertManager::new(Issuer::Local(Box::new(copy(ca))), Duration::from_secs(3600), None),
        trust: trust.clone(),
        client: hbone::Client::with_dialer(config.clone(), trust.clone(), Arc::new(PodDialer(pods.clone()))),
        pods,
        metrics: Arc::new(Metrics::new()),
        balancer: Balancer::default(),
        hbone: config,
    })
}

/// Another handle on the same CA (each ztunnel owns its issuer).
fn copy(ca: &Ca) -> Ca {
    let (cert, key) = ca.to_pem();
    Ca::from_pem(&cert, &key).unwrap()
}

/// An unused-looking 127.x.y.0/24: from the process id and a counter, so that parallel tests
/// and processes rarely meet (and a prefix in use is skipped, see [`Mesh::start`]).
fn prefix() -> [u8; 3] {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let n = (std::process::id() as u16).wrapping_mul(251).wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed));
    // Not 127.0.0.0/16, where everyone's 127.0.0.1 lives.
    [127, 1 + (n >> 8) as u8 % 254, n as u8]
}

fn host(prefix: [u8; 3], name: &str) -> Ipv4Addr {
    let last = HOSTS.iter().find(|(n, _)| *n == name).map(|(_, o)| *o).unwrap_or_else(|| panic!("no host {name}"));
    Ipv4Addr::new(prefix[0], prefix[1], prefix[2], last)
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).unwrap()
}

/// Sends `n` bytes, half-closes, and returns what came back until EOF.
async fn send_and_drain(conn: &mut TcpStream, n: usize) -> Vec<u8> {
    conn.write_all(&vec![b'x'; n]).await.unwrap();
    conn.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut back)).await.unwrap().unwrap();
    back
}

/// Whether the connection is closed by the other side (EOF or reset) without a byte.
async fn closed_at_once(conn: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

// ---- the log ----

/// Everything `tracing` wrote in this process, as text.
static LOG: Mutex<String> = Mutex::new(String::new());

/// Sends this process's log lines to [`LOG`], formatted as ztunnel writes them.
fn capture_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        struct Capture;
        impl Write for Capture {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                LOG.lock().unwrap_or_else(|p| p.into_inner()).push_str(&String::from_utf8_lossy(buf));
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        tracing_subscriber::fmt().with_ansi(false).with_max_level(tracing::Level::INFO).with_writer(|| Capture).init();
    });
}

/// One access line's fields, read from its text.
#[derive(Debug, Clone)]
struct Access(BTreeMap<String, String>);

impl Access {
    /// A field the line must have.
    fn get(&self, key: &str) -> &str {
        self.0.get(key).map(String::as_str).unwrap_or_else(|| panic!("no {key} in {self:?}"))
    }

    fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    fn is(&self, key: &str, value: &str) -> bool {
        self.0.get(key).is_some_and(|v| v == value)
    }

    fn bytes(&self, key: &str) -> u64 {
        self.get(key).parse().unwrap_or_else(|e| panic!("{key}: {e} in {self:?}"))
    }

    /// The line's fields must include each of `expected`.
    fn assert_fields(&self, expected: &[(&str, &str)]) {
        for (key, value) in expected {
            assert_eq!(self.0.get(*key).map(String::as_str), Some(*value), "{key} in {self:#?}");
        }
    }
}

/// Every `access` line logged so far.
fn access_lines() -> Vec<Access> {
    let log = LOG.lock().unwrap_or_else(|p| p.into_inner()).clone();
    log.lines().filter_map(|l| l.split_once(" access: ").map(|(_, fields)| Access(parse_fields(fields)))).collect()
}

/// `key=value` pairs as `tracing`'s formatter writes them: a value is a bare word or a quoted
/// string with escapes. A bare word without `=` (the message) is skipped.
fn parse_fields(text: &str) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ' ')).collect();
        if key.is_empty() {
            return fields;
        }
        if chars.next_if_eq(&'=').is_none() {
            continue;
        }
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value.extend(std::iter::from_fn(|| chars.next_if(|c| *c != ' ')));
        }
        fields.insert(key, value);
    }
}

// ---- the metrics ----

/// One sample of the metrics text.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn samples(metrics: &Metrics) -> Vec<Sample> {
    let text = metrics.encode();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap();
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            Sample { name: name.to_owned(), labels, value: value.parse().unwrap() }
        })
        .collect()
}

/// The value of the sample of `name` with exactly `labels`, or 0 if there is none.
fn value(metrics: &Metrics, name: &str, labels: &BTreeMap<String, String>) -> f64 {
    samples(metrics).into_iter().find(|s| s.name == name && s.labels == *labels).map_or(0.0, |s| s.value)
}

/// The Istio label set the metrics must hold for the connection `line` describes.
fn tcp_labels(line: &Access) -> BTreeMap<String, String> {
    let reporter = match line.get("direction") {
        "outbound" => "source",
        "inbound" => "destination",
        other => panic!("direction {other}"),
    };
    let security = match line.get("protocol") {
        "HBONE" => "mutual_tls",
        "TCP" => "none",
        other => panic!("protocol {other}"),
    };
    [
        ("reporter", reporter),
        ("source_workload", line.get("src.workload")),
        ("source_workload_namespace", line.get("src.namespace")),
        ("source_principal", line.get("src.identity")),
        ("destination_workload", line.get("dst.workload")),
        ("destination_workload_namespace", line.get("dst.namespace")),
        ("destination_principal", line.get("dst.identity")),
        ("destination_service", line.get("dst.service")),
        ("request_protocol", "tcp"),
        ("connection_security_policy", security),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// The metrics of the ztunnel that wrote `line` count its connection under the line's
/// workloads and principals, opened and closed once, with the line's byte counts.
fn assert_metrics_agree(line: &Access, metrics: &Metrics) {
    let labels = tcp_labels(line);
    let count = |name| value(metrics, name, &labels);
    let all = || format!("{line:#?}\n{}", metrics.encode());
    assert_eq!(count("istio_tcp_connections_opened_total"), 1.0, "opened, under the line's labels: {}", all());
    assert_eq!(count("istio_tcp_connections_closed_total"), 1.0, "closed: {}", all());
    // The metrics count from the server's side: what it received from the client is what the
    // source sent.
    assert_eq!(count("istio_tcp_received_bytes_total"), line.bytes("bytes_sent") as f64, "{}", all());
    assert_eq!(count("istio_tcp_sent_bytes_total"), line.bytes("bytes_received") as f64, "{}", all());
}

/// `line` is a refusal for `reason`, and the metrics of the ztunnel that wrote it count it
/// once, for the line's destination workload.
fn assert_refusal_counted(line: &Access, reason: Refusal, metrics: &Metrics) {
    let outcome = if reason.is_denial() { "denied" } else { "refused" };
    assert!(line.is("outcome", outcome), "{reason} is {outcome}: {line:#?}");
    assert!(line.get("reason").starts_with(&format!("{reason}: ")), "{line:#?}");
    assert_eq!((line.bytes("bytes_sent"), line.bytes("bytes_received")), (0, 0), "{line:#?}");
    let labels = [("reason", reason.as_str()), ("destination_workload", line.get("dst.workload"))]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let all = || format!("{line:#?}\n{}", metrics.encode());
    assert_eq!(value(metrics, "weft_connections_refused_total", &labels), 1.0, "{}", all());
}

// ---- the tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_from_outbound_through_inbound_to_the_app_is_recorded_at_both_ends() {
    let mesh = Mesh::start().await;
    let api = mesh.addr("api", APP);
    mesh.sink("api", APP).await;

    let mut conn = mesh.connect("web", api).await;
    let app = conn.local_addr().unwrap();
    let back = send_and_drain(&mut conn, 100_000).await;
    assert_eq!(back, 100_000u64.to_be_bytes(), "the app got every byte and answered");

    let out = mesh.line("outbound", |l| l.is("direction", "outbound")).await;
    out.assert_fields(&[
        ("src.addr", &app.to_string()),
        ("src.workload", "web"),
        ("src.namespace", "front"),
        ("src.identity", id("front", "web").as_str()),
        ("dst.addr", &api.to_string()),
        ("dst.orig", &api.to_string()),
        ("dst.workload", "api"),
        ("dst.namespace", "back"),
        ("dst.identity", id("back", "api").as_str()),
        ("dst.service", "api.back.svc.cluster.local"),
        ("protocol", "HBONE"),
        ("bytes_sent", "100000"),
        ("bytes_received", "8"),
        ("outcome", "ok"),
    ]);
    assert!(!out.has("reason") && out.has("duration_ms"), "{out:#?}");
    assert_metrics_agree(&out, &mesh.a.metrics);

    // The destination's line describes the same connection from its side: the source it
    // proved, no original destination, the same bytes in the same directions.
    let inb = mesh.line("inbound", |l| l.is("direction", "inbound")).await;
    inb.assert_fields(&[
        ("src.addr", &mesh.ip("web").to_string()),
        ("src.forwarded", &mesh.ip("web").to_string()),
        ("src.workload", "web"),
        ("src.namespace", "front"),
        ("src.identity", id("front", "web").as_str()),
        ("dst.addr", &api.to_string()),
        ("dst.workload", "api"),
        ("dst.identity", id("back", "api").as_str()),
        ("dst.service", "api.back.svc.cluster.local"),
        ("protocol", "HBONE"),
        ("bytes_sent", "100000"),
        ("bytes_received", "8"),
        ("outcome", "ok"),
    ]);
    assert!(!inb.has("dst.orig") && !inb.has("reason"), "{inb:#?}");
    assert_metrics_agree(&inb, &mesh.b.metrics);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_address_is_logged_as_the_original_destination() {
    let mesh = Mesh::start().await;
    mesh.sink("api", APP).await;
    let vip = mesh.addr("api-vip", 80);
    let mut conn = mesh.connect("web", vip).await;
    assert_eq!(send_and_drain(&mut conn, 10).await, 10u64.to_be_bytes());

    let out = mesh.line("outbound", |l| l.is("direction", "outbound")).await;
    out.assert_fields(&[
        ("dst.orig", &vip.to_string()),
        ("dst.addr", &mesh.addr("api", APP).to_string()),
        ("dst.workload", "api"),
        ("dst.service", "api.back.svc.cluster.local"),
        ("outcome", "ok"),
    ]);
    assert_metrics_agree(&out, &mesh.a.metrics);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_to_a_workload_outside_the_mesh_is_plain_tcp_with_nothing_proved() {
    let mesh = Mesh::start().await;
    let old = mesh.addr("old", OLD_APP);
    mesh.sink("old", OLD_APP).await;
    let mut conn = mesh.connect("web", old).await;
    assert_eq!(send_and_drain(&mut conn, 5_000).await, 5_000u64.to_be_bytes());

    let out = mesh.line("passthrough", |l| l.is("direction", "outbound")).await;
    out.assert_fields(&[
        ("src.workload", "web"),
        ("src.identity", id("front", "web").as_str()),
        ("dst.addr", &old.to_string()),
        ("dst.orig", &old.to_string()),
        ("dst.workload", "old"),
        ("dst.namespace", "legacy"),
        ("dst.identity", "unknown"),
        ("protocol", "TCP"),
        ("bytes_sent", "5000"),
        ("bytes_received", "8"),
        ("outcome", "ok"),
    ]);
    assert_metrics_agree(&out, &mesh.a.metrics);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_served_when_permissive_and_denied_when_strict() {
    let mesh = Mesh::start().await;
    mesh.sink("api", APP).await;
    mesh.sink("db", APP).await;

    // PERMISSIVE: served, with an unproved source.
    let api = mesh.addr("api", APP);
    let mut conn = mesh.connect_plaintext("old", "api", api).await;
    let client = conn.local_addr().unwrap();
    assert_eq!(send_and_drain(&mut conn, 3_000).await, 3_000u64.to_be_bytes());
    let line = mesh.line("plaintext to api", |l| l.is("dst.addr", &api.to_string())).await;
    line.assert_fields(&[
        ("src.addr", &client.to_string()),
        ("src.workload", "old"),
        ("src.namespace", "legacy"),
        ("src.identity", "unknown"),
        ("dst.workload", "api"),
        ("dst.identity", id("back", "api").as_str()),
        ("protocol", "TCP"),
        ("direction", "inbound"),
        ("bytes_sent", "3000"),
        ("bytes_received", "8"),
        ("outcome", "ok"),
    ]);
    assert_metrics_agree(&line, &mesh.b.metrics);

    // STRICT: closed at once, denied, counted.
    let db = mesh.addr("db", APP);
    let mut conn = mesh.connect_plaintext("old", "db", db).await;
    assert!(closed_at_once(&mut conn).await, "STRICT closes plaintext");
    let line = mesh.line("plaintext to db", |l| l.is("dst.addr", &db.to_string())).await;
    line.assert_fields(&[("src.workload", "old"), ("dst.workload", "db"), ("protocol", "TCP")]);
    assert!(line.get("reason").contains("is STRICT: plaintext from"), "{line:#?}");
    assert_refusal_counted(&line, Refusal::StrictMtls, &mesh.b.metrics);
    let opened = value(&mesh.b.metrics, "istio_tcp_connections_opened_total", &tcp_labels(&line));
    assert_eq!(opened, 0.0, "a refusal is not an opened connection");

    // A port of ztunnel's own is not served.
    let reserved = mesh.addr("api", OUTBOUND_PORT);
    let mut conn = mesh.connect_plaintext("old", "api", reserved).await;
    assert!(closed_at_once(&mut conn).await);
    let line = mesh.line("plaintext to a reserved port", |l| l.is("dst.addr", &reserved.to_string())).await;
    assert_refusal_counted(&line, Refusal::NotServed, &mesh.b.metrics);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_refusals_are_recorded_once_with_their_reason() {
    let mesh = Mesh::start().await;
    mesh.sink("api", APP).await;
    let api = mesh.addr("api", APP);

    // Policy, through batch's own ztunnel: the destination denies, and the source's ztunnel
    // records the same denial from its side.
    let mut conn = mesh.connect("batch", api).await;
    assert!(closed_at_once(&mut conn).await, "batch is denied");
    let inb = mesh.line("policy, inbound", |l| l.is("direction", "inbound") && l.is("src.workload", "batch")).await;
    inb.assert_fields(&[
        ("src.addr", &mesh.ip("batch").to_string()),
        ("src.identity", id("front", "batch").as_str()),
        ("dst.workload", "api"),
        ("protocol", "HBONE"),
    ]);
    assert!(inb.get("reason").contains("denied by policy back/no-batch"), "{inb:#?}");
    assert_refusal_counted(&inb, Refusal::Policy, &mesh.b.metrics);
    let out = mesh.line("policy, outbound", |l| l.is("direction", "outbound") && l.is("src.workload", "batch")).await;
    out.assert_fields(&[("dst.addr", &api.to_string()), ("dst.workload", "api"), ("protocol", "HBONE")]);
    assert_refusal_counted(&out, Refusal::Policy, &mesh.a.metrics);

    // A client that claims another identity's address, one that asks for a target that is not
    // the pod's, and one whose target has no app: each answered, recorded, counted.
    let (client, web) = mesh.client("web", "front");
    let request = |target: SocketAddr, claim: Option<IpAddr>| ConnectRequest {
        source: web.clone(),
        source_ip: Some(mesh.ip("web")),
        destination: mesh.addr("api", HBONE_PORT),
        expected: Arc::from(vec![id("back", "api")]),
        target,
        forwarded_for: claim,
        baggage: None,
        traceparent: None,
    };
    let batch = mesh.ip("batch");
    let err = client.connect(request(api, Some(batch))).await.unwrap_err();
    assert!(err.is_policy_denied(), "{err}");
    let line = mesh
        .line("forwarded mismatch", |l| l.is("src.forwarded", &batch.to_string()) && l.is("src.workload", "web"))
        .await;
    line.assert_fields(&[("src.addr", &mesh.ip("web").to_string()), ("src.workload", "web"), ("dst.workload", "api")]);
    assert!(line.get("reason").contains(&format!("forwarded for={batch} refused")), "{line:#?}");
    assert_refusal_counted(&line, Refusal::ForwardedMismatch, &mesh.b.metrics);

    let db = mesh.addr("db", APP);
    client.connect(request(db, None)).await.unwrap_err();
    let line = mesh.line("not served", |l| l.is("dst.addr", &db.to_string())).await;
    line.assert_fields(&[("src.workload", "web"), ("dst.workload", "db"), ("direction", "inbound")]);
    assert_refusal_counted(&line, Refusal::NotServed, &mesh.b.metrics);

    let closed = mesh.addr("api", CLOSED);
    client.connect(request(closed, None)).await.unwrap_err();
    let line = mesh.line("unreachable app", |l| l.is("dst.addr", &closed.to_string())).await;
    line.assert_fields(&[("src.workload", "web"), ("dst.workload", "api"), ("direction", "inbound")]);
    assert_refusal_counted(&line, Refusal::Unreachable, &mesh.b.metrics);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_behind_a_waypoint_is_reached_only_through_it() {
    let mesh = Mesh::start().await;
    mesh.sink("shielded", APP).await;
    let shielded = mesh.addr("shielded", APP);

    // Captured traffic to the pod's own address goes to the waypoint's HBONE port, with the
    // pod's address as the CONNECT target. No waypoint listens in this test: unreachable.
    // (Sent to the pod directly, it would have been refused as `policy`, below.)
    let mut conn = mesh.connect("web", shielded).await;
    assert!(closed_at_once(&mut conn).await);
    let line = mesh.line("to the waypoint", |l| l.is("dst.orig", &shielded.to_string())).await;
    line.assert_fields(&[("src.workload", "web"), ("dst.addr", &shielded.to_string()), ("protocol", "HBONE")]);
    assert!(line.get("reason").contains(&mesh.addr("wp", HBONE_PORT).to_string()), "{line:#?}");
    assert_refusal_counted(&line, Refusal::Unreachable, &mesh.a.metrics);

    // A mesh client that tunnels to the pod directly is refused: only the waypoint may.
    let request = |cert: &WorkloadCert| ConnectRequest {
        source: cert.clone(),
        source_ip: None,
        destination: mesh.addr("shielded", HBONE_PORT),
        expected: Arc::from(vec![id("back", "shielded")]),
        target: shielded,
        forwarded_for: None,
        baggage: None,
        traceparent: None,
    };
    let (client, web) = mesh.client("web", "front");
    let err = client.connect(request(&web)).await.unwrap_err();
    assert!(err.is_policy_denied(), "{err}");
    let line =
        mesh.line("bypass refused", |l| l.is("dst.addr", &shielded.to_string()) && l.is("direction", "inbound")).await;
    assert!(line.get("reason").contains("reached only through its waypoint back/wp"), "{line:#?}");
    assert_refusal_counted(&line, Refusal::Policy, &mesh.b.metrics);

    // The waypoint's identity is let through.
    let (client, wp) = mesh.client("wp", "back");
    let mut tunnel = client.connect(request(&wp)).await.expect("the waypoint reaches the pod");
    tunnel.write_all(b"hello").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut count = [0u8; 8];
    tunnel.read_exact(&mut count).await.unwrap();
    assert_eq!(u64::from_be_bytes(count), 5);

    // Plaintext from outside the mesh is refused, PERMISSIVE as the pod is.
    let mut conn = mesh.connect_plaintext("old", "shielded", shielded).await;
    assert!(closed_at_once(&mut conn).await);
    let old = format!("{}:", mesh.ip("old"));
    let line = mesh
        .line("plaintext refused", |l| l.get("src.addr").starts_with(&old) && l.is("dst.addr", &shielded.to_string()))
        .await;
    assert!(line.get("reason").contains("reached only through its waypoint"), "{line:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_refusals_no_route_and_unreachable_are_recorded() {
    let mesh = Mesh::start().await;

    // A service address whose service has no endpoint.
    let vip = mesh.addr("empty-vip", 80);
    let mut conn = mesh.connect("web", vip).await;
    assert!(closed_at_once(&mut conn).await);
    let line = mesh.line("no route", |l| l.is("dst.orig", &vip.to_string())).await;
    line.assert_fields(&[("src.workload", "web"), ("dst.addr", &vip.to_string()), ("direction", "outbound")]);
    assert_refusal_counted(&line, Refusal::NoRoute, &mesh.a.metrics);

    // An enrolled workload whose ztunnel does not answer.
    let gone = mesh.addr("gone", APP);
    let mut conn = mesh.connect("web", gone).await;
    assert!(closed_at_once(&mut conn).await);
    let line = mesh.line("unreachable", |l| l.is("dst.orig", &gone.to_string())).await;
    line.assert_fields(&[("dst.addr", &gone.to_string()), ("dst.workload", "gone"), ("protocol", "HBONE")]);
    assert_refusal_counted(&line, Refusal::Unreachable, &mesh.a.metrics);
}

/// An app that reads `expect` bytes, answers `answer` bytes, and once `reset` fires resets
/// the connection (what the client gets is then exactly known).
async fn resetting_app(listener: TcpListener, expect: usize, answer: usize, reset: tokio::sync::oneshot::Receiver<()>) {
    let (mut conn, _) = listener.accept().await.unwrap();
    conn.read_exact(&mut vec![0; expect]).await.unwrap();
    conn.write_all(&vec![b'y'; answer]).await.unwrap();
    let _ = reset.await;
    // Closing with SO_LINGER 0 sends a reset.
    socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_connection_is_recorded_with_the_bytes_it_moved() {
    let mesh = Mesh::start().await;
    for (to, port) in [("old", OLD_APP), ("api", APP)] {
        let target = mesh.addr(to, port);
        let (reset, when) = tokio::sync::oneshot::channel();
        tokio::spawn(resetting_app(TcpListener::bind(target).await.unwrap(), 1_000, 300, when));
        let mut conn = mesh.connect("web", target).await;
        conn.write_all(&[b'x'; 1_000]).await.unwrap();
        conn.read_exact(&mut [0; 300]).await.unwrap();
        reset.send(()).unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest)).await.unwrap();

        let lines = [("outbound", &mesh.a), ("inbound", &mesh.b)];
        for (direction, node) in lines.into_iter().take(if to == "api" { 2 } else { 1 }) {
            let line = mesh
                .line(&format!("{direction} to {to}"), |l| {
                    l.is("direction", direction) && l.is("dst.addr", &target.to_string())
                })
                .await;
            line.assert_fields(&[("outcome", "error"), ("bytes_sent", "1000"), ("bytes_received", "300")]);
            assert!(!line.get("reason").is_empty(), "{line:#?}");
            assert_metrics_agree(&line, &node.metrics);
        }
    }
}

#[tokio::test]
async fn a_record_dropped_unfinished_is_closed_and_logged_without_byte_counts() {
    capture_logs();
    let metrics = Arc::new(Metrics::new());
    let (src, dst): (SocketAddr, SocketAddr) = ("127.0.0.1:40000".parse().unwrap(), "127.0.0.9:8080".parse().unwrap());
    let mut record = ConnectionRecord::new(&metrics, Direction::Inbound, Protocol::Tcp, src, dst);
    let peer = |workload: &str| {
        Arc::new(Peer { workload: workload.into(), namespace: "ns".into(), principal: "unknown".into() })
    };
    record.source(peer("client"));
    record.destination(peer("server"), Arc::from("server.ns.svc.cluster.local"));
    record.open();
    // The task holding it is cut (drain deadline): the record is dropped, not finished.
    drop(record);

    let line =
        access_lines().into_iter().find(|l| l.is("dst.addr", &dst.to_string())).expect("the dropped record's line");
    line.assert_fields(&[("src.workload", "client"), ("dst.workload", "server"), ("outcome", "error")]);
    assert!(!line.has("bytes_sent") && !line.has("bytes_received"), "byte counts unknown: {line:#?}");
    let labels = tcp_labels(&line);
    assert_eq!(value(&metrics, "istio_tcp_connections_opened_total", &labels), 1.0);
    assert_eq!(value(&metrics, "istio_tcp_connections_closed_total", &labels), 1.0, "{}", metrics.encode());
}

#[test]
fn the_field_parser_reads_quoted_values_and_skips_the_message() {
    let fields = parse_fields(r#"message a=1 b.c="two words" d="q\"uote""#);
    let expected: HashMap<&str, &str> = [("a", "1"), ("b.c", "two words"), ("d", "q\"uote")].into();
    assert_eq!(fields.len(), 3);
    for (k, v) in expected {
        assert_eq!(fields[k], v);
    }
}
