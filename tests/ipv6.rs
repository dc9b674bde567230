//! The mesh over IPv6, end to end in the lab (tier 3): the demo's scenarios — a tunnel
//! between nodes, a Service VIP balanced over endpoints on both nodes, an L4 policy refusing a
//! client — on an IPv6-only lab and on a dual-stack lab (there in both families: each pod
//! address, each VIP). The fabric is captured to check that what crosses it between the pods
//! is HBONE (TLS to 15008) over the family dialed, never the app's bytes. They need root and
//! `nft`; under `CI=true` a test that cannot get them fails instead of skipping.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use lab::IpPacket;
use lab::addresses::IpStack;
use weft::meshlab::{MeshLab, PodSpec, ServiceSpec};

const APP_PORT: u16 = 8080;
const VIP_PORT: u16 = 80;
const HBONE_PORT: u16 = 15008;
/// The IPv6 source the node's probes are given (ztunnel's `PROBE_SOURCE_V6`).
const PROBE_SOURCE_V6: &str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff";
/// The L4 policy: back/api admits front/web only.
const ONLY_WEB: &str = "{name: only-web, namespace: back, selector: {app: api}, action: ALLOW, rules: [{from: [{principals: [\"spiffe://cluster.local/ns/front/sa/web\"]}]}]}";

#[test]
fn ipv6_only_mesh_tunnels_balances_and_refuses() {
    scenarios("ipv6_only", IpStack::Ipv6);
}

#[test]
fn dual_stack_mesh_tunnels_balances_and_refuses_in_both_families() {
    scenarios("dual_stack", IpStack::Dual);
}

/// kubelet's probes over IPv6: the node's plaintext GET to a STRICT pod's IPv6 address reaches
/// the app from the probe SNAT's IPv6 source (ztunnel's `enrolled_v6` set and the pod's
/// `ip6 saddr` exemption), while plaintext from a pod outside the mesh is refused.
#[test]
fn ipv6_probes_reach_a_strict_pod_while_plaintext_from_pods_is_refused() {
    if !MeshLab::ready_here() {
        return;
    }
    let weft = Path::new(env!("CARGO_BIN_EXE_weft"));
    let mut mesh = MeshLab::with_stack("ipv6_probes", 2, weft, IpStack::Ipv6).expect("build the lab");
    mesh.add_pod(PodSpec::new(0, "legacy", "old", "old").not_enrolled()).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "api", "api").strict()).unwrap();
    mesh.start_ztunnels().unwrap();
    let app = mesh.start_web("api", APP_PORT, "api", 0).unwrap();
    mesh.wait_enrolled(1, 1).unwrap();
    let api = mesh.pod("api").primary_ip();
    assert!(api.is_ipv6());
    let target = SocketAddr::new(api, APP_PORT);

    let mut nft = std::process::Command::new("nft");
    nft.args(["list", "set", "inet", "weft-node", "enrolled_v6"]);
    let set = mesh.lab.nodes()[1].netns().output(nft, Duration::from_secs(5)).unwrap();
    assert!(String::from_utf8_lossy(&set.stdout).contains(&api.to_string()), "{set:?}");

    // kubelet's probe, from node 1's namespace.
    let answer = mesh.lab.nodes()[1]
        .netns()
        .run(move || weft::meshlab::http_get(target, "/healthz"))
        .unwrap()
        .unwrap_or_else(|e| panic!("the probe of {target} is answered: {e:#}"));
    assert_eq!(answer.trim(), "api");
    let seen = app.wait_for_log("request GET /healthz from ", Duration::from_secs(5)).unwrap();
    assert!(seen.contains(&format!("request GET /healthz from [{PROBE_SOURCE_V6}]:")), "{seen}");

    // Plaintext from a pod outside the mesh (node 0) is refused: STRICT holds over IPv6.
    let refused = match mesh.connect("old", target) {
        Err(_) => true,
        Ok(mut conn) => {
            let _ = conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            let mut buf = [0u8; 12];
            !matches!(conn.read_exact(&mut buf), Ok(()) if buf.starts_with(b"HTTP/1.1 200"))
        }
    };
    assert!(refused, "STRICT refuses plaintext from a pod over IPv6");
    let strict = mesh.metric(1, "weft_connections_refused_total", &[("reason", "strict_mtls")]).unwrap();
    assert_eq!(strict, 1.0, "one refusal (the pod's); the probe never met ztunnel");
}

/// The demo's scenarios on a two-node lab built with `stack`, in every family it has.
fn scenarios(test: &str, stack: IpStack) {
    if !MeshLab::ready_here() {
        return;
    }
    let mut mesh = MeshLab::with_stack(test, 2, Path::new(env!("CARGO_BIN_EXE_weft")), stack).expect("build the lab");
    mesh.add_pod(PodSpec::new(0, "front", "web", "web")).unwrap();
    mesh.add_pod(PodSpec::new(0, "front", "batch", "batch")).unwrap();
    mesh.add_pod(PodSpec::new(0, "back", "api-0", "api")).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "api-1", "api")).unwrap();
    mesh.add_service(ServiceSpec {
        namespace: "back".into(),
        name: "api".into(),
        vip: lab::addresses::service_vip(10),
        port: VIP_PORT,
        target_port: APP_PORT,
        app: "api".into(),
    });
    mesh.start_ztunnels().unwrap();
    let api0_app = mesh.start_echo("api-0", APP_PORT, Some("api-0")).unwrap();
    mesh.keep(api0_app);
    let api1_app = mesh.start_echo("api-1", APP_PORT, Some("api-1")).unwrap();
    mesh.wait_enrolled(0, 3).unwrap();
    mesh.wait_enrolled(1, 1).unwrap();

    let api1 = mesh.pod("api-1").ips();
    let vips = mesh.service_vips("back", "api");
    let families = |ips: &[IpAddr]| ips.iter().map(|ip| ip.is_ipv6()).collect::<Vec<_>>();
    let expected = match stack {
        IpStack::Ipv4 => vec![false],
        IpStack::Ipv6 => vec![true],
        IpStack::Dual => vec![false, true],
    };
    assert_eq!(families(&api1), expected, "api-1's addresses: {api1:?}");
    assert_eq!(families(&vips), expected, "the service's VIPs: {vips:?}");
    // Each ztunnel enrolled its pods with every address they have.
    let dump: serde_json::Value = serde_json::from_str(&mesh.node_http(1, 15000, "/config_dump").unwrap()).unwrap();
    for ip in &api1 {
        assert!(dump.to_string().contains(&format!("\"{ip}\"")), "{ip} in node-1's dump: {dump}");
    }

    // 1. A tunnel between nodes, in each family: the app's bytes cross the fabric only inside
    //    TLS to api-1's port 15008, over the family dialed.
    for &ip in &api1 {
        let target = SocketAddr::new(ip, APP_PORT);
        let marker = format!("WEFT-MARKER-{test}-{ip}");
        let capture = mesh.lab.capture().unwrap();
        let reply = exchange(&mesh, "web", target, &marker).unwrap_or_else(|e| panic!("web -> {target}: {e:#}"));
        assert_eq!(reply, format!("api-1\n{marker}"), "through the tunnel to {target}");
        std::thread::sleep(Duration::from_millis(200));
        let packets = capture.stop_all().unwrap();
        let web = mesh.pod("web").ip_like(ip).expect("web has an address of each family api-1 has");
        let flows: Vec<&IpPacket> = packets
            .iter()
            .filter(|p| !p.outgoing)
            .filter(|p| (p.src.ip() == web && p.dst.ip() == ip) || (p.src.ip() == ip && p.dst.ip() == web))
            .collect();
        assert!(!flows.is_empty(), "traffic between {web} and {ip} crossed the fabric: {packets:?}");
        assert!(flows.iter().all(|p| p.src.port() == HBONE_PORT || p.dst.port() == HBONE_PORT), "{flows:?}");
        assert!(
            flows.iter().any(|p| p.dst.port() == HBONE_PORT && p.payload.first() == Some(&0x16)),
            "a TLS handshake to {ip}:{HBONE_PORT}: {flows:?}"
        );
        assert!(!packets.iter().any(|p| contains(&p.payload, marker.as_bytes())), "the app's bytes in the clear");
        assert!(!packets.iter().any(|p| p.dst.port() == APP_PORT), "nothing to the app port on the fabric");
        // Over the family dialed: no segment between the two pods in the other family.
        let other: Vec<&IpPacket> = packets
            .iter()
            .filter(|p| p.src.is_ipv6() != ip.is_ipv6())
            .filter(|p| p.src.port() == HBONE_PORT || p.dst.port() == HBONE_PORT)
            .collect();
        assert!(other.is_empty(), "HBONE in the other family while dialing {ip}: {other:?}");
        // The app sees web's own address of that family as its peer.
        let peer = if web.is_ipv6() { format!("accepted [{web}]:") } else { format!("accepted {web}:") };
        let seen = api1_app.wait_for_log(&peer, Duration::from_secs(5));
        assert!(seen.is_ok(), "api-1's app sees web's address {web}: {seen:?}");
    }
    let access = mesh.ztunnel(1).wait_for_log("direction=\"inbound\"", Duration::from_secs(5)).unwrap();
    for ip in &api1 {
        let dst = SocketAddr::new(*ip, APP_PORT);
        let web = mesh.pod("web").ip_like(*ip).unwrap();
        assert!(
            access.lines().any(|l| l.contains(" access: ")
                && l.contains(&format!("dst.addr={dst}"))
                && l.contains(&format!("src.addr={web} "))
                && l.contains("src.identity=spiffe://cluster.local/ns/front/sa/web")),
            "node-1 logs the tunnel to {dst} from {web} with web's identity:\n{access}"
        );
    }

    // 2. Each VIP balances over the endpoints on both nodes, and the endpoint on the other
    //    node is reached over HBONE in the VIP's family.
    for &vip in &vips {
        let to = SocketAddr::new(vip, VIP_PORT);
        let mut seen = BTreeMap::<String, usize>::new();
        let capture = mesh.lab.capture().unwrap();
        for _ in 0..6 {
            let reply = exchange(&mesh, "web", to, "").unwrap_or_else(|e| panic!("web -> {to}: {e:#}"));
            *seen.entry(reply).or_default() += 1;
        }
        std::thread::sleep(Duration::from_millis(200));
        let packets = capture.stop_all().unwrap();
        assert_eq!(
            seen,
            BTreeMap::from([("api-0\n".to_owned(), 3), ("api-1\n".to_owned(), 3)]),
            "round robin over both nodes through {to}"
        );
        let hbone: Vec<&IpPacket> = packets.iter().filter(|p| !p.outgoing && p.dst.port() == HBONE_PORT).collect();
        assert!(!hbone.is_empty(), "HBONE to api-1 crossed the fabric for {to}: {packets:?}");
        assert!(
            hbone.iter().all(|p| p.dst.is_ipv6() == vip.is_ipv6() && api1.contains(&p.dst.ip())),
            "HBONE to api-1 in the family of {vip} only: {hbone:?}"
        );
    }
    let opened =
        |node: usize| mesh.metric(node, "istio_tcp_connections_opened_total", &[("reporter", "destination")]).unwrap();
    assert!(opened(1) >= (api1.len() + 3 * vips.len()) as f64, "node-1 counted its inbound tunnels");

    // 3. An L4 policy: back/api admits web only; batch is refused in every family, from
    //    node-0 to api-1 and through each VIP.
    mesh.add_policy(ONLY_WEB);
    mesh.write_config().unwrap();
    let batch_to_api1 = SocketAddr::new(api1[0], APP_PORT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while exchange(&mesh, "batch", batch_to_api1, "ping").is_ok() {
        assert!(Instant::now() < deadline, "the policy did not reach node-1 within 10 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let denied_before = mesh.metric(1, "weft_connections_refused_total", &[("reason", "policy")]).unwrap();
    for &ip in &api1 {
        let to = SocketAddr::new(ip, APP_PORT);
        assert!(exchange(&mesh, "batch", to, "ping").is_err(), "batch -> {to} is refused");
        assert_eq!(exchange(&mesh, "web", to, "ping").unwrap(), "api-1\nping", "web -> {to} is allowed");
    }
    let denied = mesh.metric(1, "weft_connections_refused_total", &[("reason", "policy")]).unwrap();
    assert!(denied >= denied_before + api1.len() as f64, "node-1 refused by policy: {denied_before} -> {denied}");
    for &vip in &vips {
        let to = SocketAddr::new(vip, VIP_PORT);
        for _ in 0..2 {
            assert!(exchange(&mesh, "batch", to, "").is_err(), "batch -> {to} is refused on both endpoints");
        }
        assert!(exchange(&mesh, "web", to, "").is_ok(), "web -> {to} is allowed");
    }
}

/// Connects from `pod` to `to`, reads the banner line, sends `msg` and reads it back: the
/// banner (with its newline) and the echo. An error when the mesh closes the connection.
fn exchange(mesh: &MeshLab, pod: &str, to: SocketAddr, msg: &str) -> anyhow::Result<String> {
    let mut conn = mesh.connect(pod, to)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut banner = String::new();
    reader.read_line(&mut banner)?;
    anyhow::ensure!(!banner.is_empty(), "the connection was closed before the app answered");
    if msg.is_empty() {
        return Ok(banner);
    }
    conn.write_all(msg.as_bytes())?;
    let mut back = vec![0u8; msg.len()];
    reader.read_exact(&mut back)?;
    Ok(format!("{banner}{}", String::from_utf8_lossy(&back)))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
