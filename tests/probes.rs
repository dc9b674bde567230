//! Kubelet's probes in the network-namespace lab (tier 3): a client in the node's network
//! namespace plays kubelet, sending its HTTP GET in plaintext to a STRICT pod's app port. The
//! probe SNAT (ARCHITECTURE §8.2) must let it through to the app, with the source
//! 169.254.7.127, while plaintext from a pod is still refused. They need root; under `CI=true`
//! a test that cannot get it fails instead of skipping.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lab::Signal;
use weft::meshlab::{MeshLab, PodSpec};

const APP_PORT: u16 = 8080;
/// The source the node's probes are given (ztunnel's `PROBE_SOURCE_V4`).
const PROBE_SOURCE: &str = "169.254.7.127";
/// How long a log line may take to reach the file.
const LOG_WAIT: Duration = Duration::from_secs(5);

fn weft() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_weft"))
}

/// A mesh of `nodes` nodes programmed by a controller, or `None` (after a loud skip) when the
/// lab cannot run here.
fn mesh(test: &str, nodes: usize) -> Option<MeshLab> {
    MeshLab::ready_here().then(|| MeshLab::new(test, nodes, weft()).expect("building the lab"))
}

/// An HTTP probe as kubelet sends it: a plain TCP connection from the node's network namespace
/// to the pod's address and the app's port, one GET with kubelet's headers, `Connection:
/// close`. The whole response (empty when the connection is closed without an answer).
fn probe(mesh: &MeshLab, node: usize, to: SocketAddr) -> String {
    let answer = mesh.lab.nodes()[node].netns().run(move || -> std::io::Result<String> {
        let mut tcp = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let request = format!(
            "GET /healthz HTTP/1.1\r\nHost: {to}\r\nUser-Agent: kube-probe/1.31\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        tcp.write_all(request.as_bytes())?;
        let mut response = Vec::new();
        // A refused probe is closed (or reset) by ztunnel: what arrived until then is the answer.
        let _ = tcp.read_to_end(&mut response);
        Ok(String::from_utf8_lossy(&response).into_owned())
    });
    match answer {
        Ok(Ok(text)) => text,
        Ok(Err(e)) => format!("connection failed: {e}"),
        Err(e) => panic!("cannot run the probe in node {node}'s namespace: {e}"),
    }
}

/// Whether a plaintext connection from pod `from` to `to` is refused: no echo of what it sent.
fn refused(mesh: &MeshLab, from: &str, to: SocketAddr) -> bool {
    let Ok(mut conn) = mesh.connect(from, to) else { return true };
    if conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_err() {
        return true;
    }
    let mut buf = [0u8; 12];
    !matches!(conn.read_exact(&mut buf), Ok(()) if buf.starts_with(b"HTTP/1.1 200"))
}

/// `nft list <what...>` in node `node`'s namespace: the listing, or `None` if nft refused
/// (no such table or set).
fn nft_list(mesh: &MeshLab, node: usize, what: &[&str]) -> Option<String> {
    let mut cmd = Command::new("nft");
    cmd.arg("list").args(what);
    let out = mesh.lab.nodes()[node].netns().output(cmd, Duration::from_secs(5)).expect("running nft");
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The pod rules' table of `pod`.
fn pod_table(mesh: &MeshLab, pod: &str) -> String {
    let mut cmd = Command::new("nft");
    cmd.args(["list", "table", "inet", "weft"]);
    let out = mesh.pod(pod).netns().output(cmd, Duration::from_secs(5)).expect("running nft");
    assert!(out.status.success(), "no capture rules in pod {pod}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refusals(mesh: &MeshLab, node: usize) -> f64 {
    mesh.metric(node, "weft_connections_refused_total", &[("reason", "strict_mtls")]).unwrap()
}

#[test]
fn kubelet_probes_reach_a_strict_pod_from_its_node_while_plaintext_from_pods_is_refused() {
    let Some(mut mesh) = mesh("probes", 2) else { return };
    mesh.add_pod(PodSpec::new(0, "legacy", "old", "old").not_enrolled()).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "api", "api").strict()).unwrap();
    mesh.start_ztunnels().unwrap();
    let app = mesh.start_web("api", APP_PORT, "api", 0).unwrap();
    mesh.wait_enrolled(1, 1).unwrap();
    let api_ip = mesh.pod("api").ip();
    let target = SocketAddr::from((api_ip, APP_PORT));

    // The table is in node 1's namespace, holding the captured pod; node 0 captures no pod
    // and has none; nor has the machine's own namespace.
    let table = nft_list(&mesh, 1, &["table", "inet", "weft-node"]).expect("node 1 has the probe table");
    assert!(table.contains(&api_ip.to_string()) && table.contains(PROBE_SOURCE), "{table}");
    assert!(nft_list(&mesh, 0, &["table", "inet", "weft-node"]).is_none(), "node 0 captures no pod");
    let root = Command::new("nft").args(["list", "table", "inet", "weft-node"]).output().expect("running nft");
    assert!(!root.status.success(), "the machine's own namespace has no probe table");
    assert!(pod_table(&mesh, "api").contains(&format!("ip saddr {PROBE_SOURCE} return")));

    // kubelet's probe reaches the app, which sees the probe source.
    let answer = probe(&mesh, 1, target);
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("api\n"), "the probe is answered: {answer:?}");
    let seen = app.wait_for_log("request GET /healthz from ", LOG_WAIT).unwrap();
    assert!(seen.contains(&format!("request GET /healthz from {PROBE_SOURCE}:")), "{seen}");

    // A pod's plaintext, forwarded through the same node, is still refused: STRICT holds.
    assert!(refused(&mesh, "old", target), "STRICT refuses plaintext from a pod");
    assert_eq!(refusals(&mesh, 1), 1.0, "one refusal (the pod's); the probe never met ztunnel");
    assert!(!app.logs().unwrap().contains("request GET / from"), "the pod's request never reached the app");

    // ztunnel stops: the table stays, so probes keep working while it is away.
    let zt = mesh.take_ztunnel(1).unwrap();
    zt.signal(Signal::SIGTERM).unwrap();
    let status = zt.wait_timeout(Duration::from_secs(15)).unwrap().expect("ztunnel exits");
    assert!(status.success(), "{status}");
    assert!(nft_list(&mesh, 1, &["table", "inet", "weft-node"]).is_some_and(|t| t.contains(&api_ip.to_string())));
    let answer = probe(&mesh, 1, target);
    assert!(answer.starts_with("HTTP/1.1 200"), "a probe while ztunnel is away: {answer:?}");

    // Back, then the pod un-enrolled: it leaves the set, and the node's connections keep
    // their own source again.
    mesh.start_ztunnel(1, &[]).unwrap();
    mesh.wait_enrolled(1, 1).unwrap();
    mesh.set_enrolled("api", false);
    mesh.write_config().unwrap();
    mesh.wait_enrolled(1, 0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let set = || nft_list(&mesh, 1, &["set", "inet", "weft-node", "enrolled_v4"]).expect("the set is kept");
    while set().contains(&api_ip.to_string()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!set().contains(&api_ip.to_string()), "the released pod left the set: {}", set());
    let answer = probe(&mesh, 1, target);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    let gateway = IpAddr::V4(mesh.lab.nodes()[1].pod_gateway());
    let seen = app.wait_for_log(&format!("from {gateway}:"), LOG_WAIT).unwrap();
    assert!(seen.contains(&format!("request GET /healthz from {gateway}:")), "{seen}");
}

#[test]
fn with_probe_snat_off_probes_of_a_strict_pod_are_refused() {
    let Some(mut mesh) = mesh("probes-off", 1) else { return };
    mesh.add_pod(PodSpec::new(0, "back", "api", "api").strict()).unwrap();
    mesh.write_config().unwrap();
    mesh.start_ztunnel(0, &["--probe-snat=false"]).unwrap();
    let app = mesh.start_web("api", APP_PORT, "api", 0).unwrap();
    mesh.wait_enrolled(0, 1).unwrap();
    let target = SocketAddr::from((mesh.pod("api").ip(), APP_PORT));

    assert!(nft_list(&mesh, 0, &["table", "inet", "weft-node"]).is_none(), "no probe table");
    assert!(!pod_table(&mesh, "api").contains(PROBE_SOURCE), "no exemption in the pod's rules");
    let answer = probe(&mesh, 0, target);
    assert!(!answer.starts_with("HTTP/1.1"), "the probe is refused as plaintext: {answer:?}");
    let deadline = Instant::now() + LOG_WAIT;
    while refusals(&mesh, 0) < 1.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(refusals(&mesh, 0), 1.0, "counted as STRICT's refusal");
    assert!(!app.logs().unwrap().contains("request GET"), "the app never saw it");
}
