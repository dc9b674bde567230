//! End-to-end tests of what ztunnel's inbound path believes of a CONNECT's `forwarded: for=`
//! claim (tier 3, network-namespace lab; root needed, and under `CI=true` a test that
//! cannot get it fails instead of skipping).
//!
//! ztunnel's own outbound path always claims the source pod's address, so these tests play a
//! client that says what it likes: an `hbone::Client` holding the certificate of pod `web`
//! (minted with the lab's CA), whose sockets are created inside `web`'s network namespace with
//! ztunnel's bypass mark, as ztunnel's outbound sockets are. The destination ztunnel therefore
//! sees `web`'s real address as the HBONE peer, whatever the header claims.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hbone::ca::Ca;
use hbone::client::Dialer;
use hbone::{Client, ConnectError, ConnectRequest, SpiffeId, TrustBundle, TrustStore, WorkloadCert};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft::meshlab::{MeshLab, PodSpec};
use ztunnel::inpod::{netns, socket};

const APP_PORT: u16 = 8080;

/// An address outside every lab range (TEST-NET-1).
const OUTSIDE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

fn weft() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_weft"))
}

/// A two-node mesh, or `None` (after a loud skip) when the lab cannot run here.
fn mesh(test: &str) -> Option<MeshLab> {
    if !MeshLab::ready_here() {
        return None;
    }
    Some(MeshLab::new(test, 2, weft()).expect("building the lab"))
}

/// Node 0: `web`, its replica `web-2` (same service account, so the same identity) and
/// `batch` (another identity), all enrolled; node 1: `api`. Not started yet.
fn add_pods(mesh: &mut MeshLab) {
    mesh.add_pod(PodSpec::new(0, "front", "web", "web")).unwrap();
    let mut replica = PodSpec::new(0, "front", "web-2", "web");
    replica.service_account = "web".into();
    mesh.add_pod(replica).unwrap();
    mesh.add_pod(PodSpec::new(0, "front", "batch", "batch")).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "api", "api")).unwrap();
}

/// Starts both ztunnels and an echo app in `api`, and waits until the pods are enrolled.
fn start(mesh: &mut MeshLab) {
    mesh.start_ztunnels().unwrap();
    let app = mesh.start_echo("api", APP_PORT, None).unwrap();
    mesh.keep(app);
    mesh.wait_enrolled(0, 3).unwrap();
    mesh.wait_enrolled(1, 1).unwrap();
}

fn ip(mesh: &MeshLab, pod: &str) -> IpAddr {
    IpAddr::V4(mesh.pod(pod).ip())
}

/// Opens HBONE sockets inside one pod's network namespace, carrying ztunnel's bypass mark so
/// the pod's capture rules let them out (exactly how ztunnel's outbound sockets leave).
struct InPod(netns::Netns);

impl Dialer for InPod {
    fn dial(
        &self,
        _source: Option<IpAddr>,
        dest: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + '_>> {
        Box::pin(socket::connect(&self.0, dest))
    }
}

/// An HBONE client speaking from pod `pod` with the pod's own identity.
struct PodClient {
    client: Client,
    cert: WorkloadCert,
    ip: IpAddr,
}

impl PodClient {
    fn new(mesh: &MeshLab, pod: &str) -> PodClient {
        let dir = mesh.config_path().parent().expect("the mesh directory").to_owned();
        let ca_cert = std::fs::read_to_string(dir.join("ca.crt")).unwrap();
        let ca = Ca::from_pem(&ca_cert, &std::fs::read_to_string(dir.join("ca.key")).unwrap()).unwrap();
        let identity: SpiffeId = mesh.spec(pod).identity().parse().unwrap();
        let cert = WorkloadCert::new(ca.issue(&identity, Duration::from_secs(3600)).unwrap());
        let trust = TrustStore::new(TrustBundle::from_pem(&ca_cert).unwrap());
        let netns = netns::Netns::open(mesh.pod(pod).netns().path()).unwrap();
        let client = Client::with_dialer(hbone::Config::default(), trust, Arc::new(InPod(netns)));
        PodClient { client, cert, ip: ip(mesh, pod) }
    }

    /// Opens a tunnel to `target` on pod `to` claiming `forwarded: for=<claim>`, and checks
    /// that bytes go through it both ways.
    async fn echo(&self, mesh: &MeshLab, to: &str, claim: Option<IpAddr>) -> Result<(), ConnectError> {
        let target = SocketAddr::new(ip(mesh, to), APP_PORT);
        let expected: SpiffeId = mesh.spec(to).identity().parse().unwrap();
        let request = ConnectRequest {
            source: self.cert.clone(),
            source_ip: Some(self.ip),
            destination: SocketAddr::new(target.ip(), 15008),
            expected: Arc::from(vec![expected]),
            target,
            forwarded_for: claim,
            baggage: None,
            traceparent: None,
        };
        let mut tunnel = self.client.connect(request).await?;
        tunnel.write_all(b"forwarded?").await.unwrap();
        let mut back = [0u8; 10];
        tokio::time::timeout(Duration::from_secs(10), tunnel.read_exact(&mut back)).await.unwrap().unwrap();
        assert_eq!(&back, b"forwarded?", "the app echoed through the tunnel");
        Ok(())
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Waits (bounded) until node `node`'s metric reaches `want`, and returns its value.
fn metric_reaches(mesh: &MeshLab, node: usize, name: &str, labels: &[(&str, &str)], want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let value = mesh.metric(node, name, labels).unwrap();
        if value >= want || Instant::now() >= deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The access line of node `node`'s ztunnel that contains `needle` (waits for it, bounded).
fn access_line(mesh: &MeshLab, node: usize, needle: &str) -> String {
    let logs = mesh.ztunnel(node).wait_for_log(needle, Duration::from_secs(5)).unwrap();
    logs.lines().find(|l| l.contains(needle)).unwrap().to_owned()
}

#[test]
fn claims_of_another_identity_or_an_outside_address_are_refused_and_counted() {
    let Some(mut mesh) = mesh("fwd-claim") else { return };
    add_pods(&mut mesh);
    start(&mut mesh);
    let rt = runtime();
    let web = PodClient::new(&mesh, "web");
    let (web_ip, replica_ip, batch_ip) = (ip(&mesh, "web"), ip(&mesh, "web-2"), ip(&mesh, "batch"));
    let web_id = mesh.spec("web").identity();

    // Honest: no claim, or its own address.
    rt.block_on(web.echo(&mesh, "api", None)).unwrap();
    rt.block_on(web.echo(&mesh, "api", Some(web_ip))).unwrap();

    // Another workload's address, and an address outside the mesh: 403, counted.
    for claim in [batch_ip, OUTSIDE] {
        let err = rt.block_on(web.echo(&mesh, "api", Some(claim))).unwrap_err();
        assert!(err.is_policy_denied(), "claiming {claim}: {err}");
    }
    let mismatch = [("reason", "forwarded_mismatch"), ("destination_workload", "api")];
    assert_eq!(metric_reaches(&mesh, 1, "weft_connections_refused_total", &mismatch, 2.0), 2.0);
    assert_eq!(mesh.metric(1, "weft_connections_refused_total", &[("reason", "policy")]).unwrap(), 0.0);

    // The refusals are logged with the claim, the real peer and the proven workload.
    let line = access_line(&mesh, 1, &format!("forwarded for={batch_ip} refused"));
    assert!(line.contains(&format!("src.addr={web_ip} src.forwarded={batch_ip} src.workload=web ")), "{line}");
    assert!(line.contains(&format!("src.identity={web_id}")), "{line}");
    assert!(line.contains("it is an address of workload front/batch"), "{line}");
    assert!(line.contains(&format!("but the peer {web_ip} proved {web_id}")), "{line}");
    let line = access_line(&mesh, 1, &format!("forwarded for={OUTSIDE} refused"));
    assert!(line.contains("no workload of the mesh has that address") && line.contains("src.workload=web "), "{line}");

    // A replica's address (same identity) is believed; metrics still name the workload at the
    // real peer address.
    rt.block_on(web.echo(&mesh, "api", Some(replica_ip))).unwrap();
    let opened = [
        ("reporter", "destination"),
        ("source_workload", "web"),
        ("source_principal", web_id.as_str()),
        ("destination_workload", "api"),
    ];
    assert_eq!(metric_reaches(&mesh, 1, "istio_tcp_connections_opened_total", &opened, 3.0), 3.0);
    let named_after_claim = [("reporter", "destination"), ("source_workload", "web-2")];
    assert_eq!(mesh.metric(1, "istio_tcp_connections_opened_total", &named_after_claim).unwrap(), 0.0);
    let line = access_line(&mesh, 1, &format!("src.forwarded={replica_ip}"));
    assert!(line.contains(&format!("src.addr={web_ip}")) && line.contains("src.workload=web "), "{line}");
}

/// Whether a plain connection from pod `from` to `api` (through both ztunnels, the real
/// outbound path) is refused: the source ztunnel accepts locally, then closes when the tunnel
/// is refused, so the client reads EOF or a reset instead of the echo.
fn refused_through_ztunnel(mesh: &MeshLab, from: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut conn) = mesh.connect(from, SocketAddr::new(ip(mesh, "api"), APP_PORT)) else { return true };
    if conn.write_all(b"hello").is_err() {
        return true;
    }
    let mut buf = [0u8; 5];
    !matches!(conn.read_exact(&mut buf), Ok(()) if &buf == b"hello")
}

#[test]
fn a_deny_ip_block_on_the_real_address_holds_whatever_the_header_claims() {
    let Some(mut mesh) = mesh("fwd-deny") else { return };
    add_pods(&mut mesh);
    let (web_ip, replica_ip, batch_ip) = (ip(&mesh, "web"), ip(&mesh, "web-2"), ip(&mesh, "batch"));
    mesh.add_policy(&format!(
        "{{name: no-web, namespace: back, selector: {{app: api}}, action: DENY, rules: [{{from: [{{ipBlocks: [\"{web_ip}/32\"]}}]}}]}}"
    ));
    start(&mut mesh);
    let rt = runtime();
    let web = PodClient::new(&mesh, "web");

    // From web's address, whatever it claims: its replica's address (believed: same
    // identity, but policy also sees the real peer), another identity's, an outside one.
    for claim in [None, Some(replica_ip), Some(batch_ip), Some(OUTSIDE)] {
        let err = rt.block_on(web.echo(&mesh, "api", claim)).unwrap_err();
        assert!(err.is_policy_denied(), "claiming {claim:?}: {err}");
    }
    let count = |reason| mesh.metric(1, "weft_connections_refused_total", &[("reason", reason)]).unwrap();
    assert_eq!(metric_reaches(&mesh, 1, "weft_connections_refused_total", &[("reason", "policy")], 2.0), 2.0);
    assert_eq!(count("forwarded_mismatch"), 2.0);
    let line = access_line(&mesh, 1, &format!("src.forwarded={replica_ip}"));
    assert!(line.contains("denied by policy back/no-web"), "{line}");
    assert!(line.contains(&format!("src.addr={web_ip}")) && line.contains("src.workload=web "), "{line}");

    // The rule is about web's address only: the replica is served, through its ztunnel and
    // with a direct client alike; claiming web's address cannot help it either.
    let replica = PodClient::new(&mesh, "web-2");
    rt.block_on(replica.echo(&mesh, "api", None)).unwrap();
    rt.block_on(replica.echo(&mesh, "api", Some(replica_ip))).unwrap();
    let err = rt.block_on(replica.echo(&mesh, "api", Some(web_ip))).unwrap_err();
    assert!(err.is_policy_denied(), "{err}");
    assert!(!refused_through_ztunnel(&mesh, "web-2"), "web-2 is served through its ztunnel");
    assert!(refused_through_ztunnel(&mesh, "web"), "web is refused through its ztunnel");
    assert_eq!(metric_reaches(&mesh, 1, "weft_connections_refused_total", &[("reason", "policy")], 4.0), 4.0);
}
