//! End-to-end tests of ztunnel in the network-namespace lab (tier 3): real capture rules,
//! real mTLS on the fabric, real processes. They need root; under `CI=true` a test that
//! cannot get it fails instead of skipping.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lab::{Packet, Signal};
use weft::meshlab::{MeshLab, PodSpec, ServiceSpec};

const APP_PORT: u16 = 8080;

fn weft() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_weft"))
}

/// A two-node mesh programmed by a controller, or `None` (after a loud skip) when the lab
/// cannot run here.
fn mesh(test: &str) -> Option<MeshLab> {
    lab_ready().then(|| MeshLab::new(test, 2, weft()).expect("building the lab"))
}

/// A two-node mesh whose ztunnels run from a local file, without a controller.
fn local_mesh(test: &str) -> Option<MeshLab> {
    lab_ready().then(|| MeshLab::with_local_file(test, 2, weft()).expect("building the lab"))
}

/// Whether the lab can run here (root, `nft`); a loud skip (a failure under `CI=true`) if not.
fn lab_ready() -> bool {
    if !MeshLab::ready_here() {
        return false;
    }
    true
}

fn marker(test: &str) -> String {
    format!("WEFT-MARKER-{test}-{}-{}", std::process::id(), Instant::now().elapsed().as_nanos())
}

/// Sends `msg` and reads the same number of bytes back.
fn echo(stream: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    stream.write_all(msg).expect("write");
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back).expect("read the echo");
    back
}

fn addr(pod: &lab::Pod, port: u16) -> SocketAddr {
    SocketAddr::from((pod.ip(), port))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn between<'a>(packets: &'a [Packet], a: &lab::Pod, b: &lab::Pod) -> impl Iterator<Item = &'a Packet> {
    let (a, b) = (a.ip(), b.ip());
    packets.iter().filter(move |p| (*p.src.ip() == a && *p.dst.ip() == b) || (*p.src.ip() == b && *p.dst.ip() == a))
}

#[test]
fn pod_to_pod_across_nodes_is_mutual_tls_on_the_wire() {
    let Some(mut mesh) = mesh("pod-to-pod") else { return };
    mesh.add_pod(PodSpec::new(0, "front", "web", "web")).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "api", "api")).unwrap();
    mesh.start_ztunnels().unwrap();
    let app = mesh.start_echo("api", APP_PORT, None).unwrap();
    mesh.wait_enrolled(0, 1).unwrap();
    mesh.wait_enrolled(1, 1).unwrap();

    let capture = mesh.lab.capture().unwrap();
    let marker = marker("p2p");
    let mut conn = mesh.connect("web", addr(mesh.pod("api"), APP_PORT)).unwrap();
    assert_eq!(echo(&mut conn, marker.as_bytes()), marker.as_bytes(), "the app got the data and answered");
    drop(conn);
    std::thread::sleep(Duration::from_millis(200));
    let packets = capture.stop().unwrap();

    let (web, api) = (mesh.pod("web"), mesh.pod("api"));
    let flows: Vec<&Packet> = between(&packets, web, api).collect();
    assert!(!flows.is_empty(), "the connection crossed the fabric");
    for p in &flows {
        assert!(p.src.port() == 15008 || p.dst.port() == 15008, "only HBONE between the pods, saw {p:?}");
        assert!(!contains(&p.payload, marker.as_bytes()), "plaintext marker on the wire in {p:?}");
    }
    assert!(
        flows.iter().any(|p| p.dst.port() == 15008 && p.payload.first() == Some(&0x16)),
        "a TLS handshake record was sent to 15008"
    );
    assert!(packets.iter().all(|p| p.dst.port() != APP_PORT && p.src.port() != APP_PORT), "no packet to the app port");
    // The app saw a connection; ztunnel logged the identities.
    assert!(app.logs().unwrap().contains("accepted"));
    let log = mesh.ztunnel(0).wait_for_log("protocol=\"HBONE\"", Duration::from_secs(5)).unwrap();
    let line = log.lines().find(|l| l.contains(" access: ") && l.contains("direction=\"outbound\"")).unwrap();
    assert!(line.contains("src.identity=spiffe://cluster.local/ns/front/sa/web"), "{line}");
    assert!(line.contains("dst.identity=spiffe://cluster.local/ns/back/sa/api"), "{line}");
}

#[test]
fn service_vip_spreads_over_endpoints_on_both_nodes() {
    let Some(mut mesh) = mesh("vip") else { return };
    mesh.add_pod(PodSpec::new(0, "front", "web", "web")).unwrap();
    mesh.add_pod(PodSpec::new(0, "back", "api-0", "api")).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "api-1", "api")).unwrap();
    let vip = lab::addresses::service_vip(10);
    mesh.add_service(ServiceSpec {
        namespace: "back".into(),
        name: "api".into(),
        vip,
        port: 80,
        target_port: APP_PORT,
        app: "api".into(),
    });
    mesh.start_ztunnels().unwrap();
    let _a0 = mesh.start_echo("api-0", APP_PORT, Some("api-0")).unwrap();
    let _a1 = mesh.start_echo("api-1", APP_PORT, Some("api-1")).unwrap();
    mesh.wait_enrolled(0, 2).unwrap();
    mesh.wait_enrolled(1, 1).unwrap();

    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..8 {
        let conn = mesh.connect("web", SocketAddr::from((vip, 80))).unwrap();
        let mut banner = String::new();
        BufReader::new(conn).read_line(&mut banner).unwrap();
        *seen.entry(banner.trim().to_owned()).or_default() += 1;
    }
    assert_eq!(seen.len(), 2, "both endpoints answered: {seen:?}");
    assert!(seen.values().all(|n| *n >= 2), "spread over both nodes: {seen:?}");
}

#[test]
fn enrolled_to_not_enrolled_is_passthrough() {
    let Some(mut mesh) = mesh("passthrough") else { return };
    mesh.add_pod(PodSpec::new(0, "front", "web", "web")).unwrap();
    mesh.add_pod(PodSpec::new(1, "legacy", "old", "old").not_enrolled()).unwrap();
    mesh.start_ztunnels().unwrap();
    let _app = mesh.start_echo("old", APP_PORT, None).unwrap();
    mesh.wait_enrolled(0, 1).unwrap();

    let capture = mesh.lab.capture().unwrap();
    let marker = marker("pt");
    let mut conn = mesh.connect("web", addr(mesh.pod("old"), APP_PORT)).unwrap();
    assert_eq!(echo(&mut conn, marker.as_bytes()), marker.as_bytes());
    drop(conn);
    std::thread::sleep(Duration::from_millis(200));
    let packets = capture.stop().unwrap();
    assert!(
        between(&packets, mesh.pod("web"), mesh.pod("old"))
            .any(|p| p.dst.port() == APP_PORT && contains(&p.payload, marker.as_bytes())),
        "passthrough goes straight to the app port, in plaintext"
    );
    // Nothing was proved about the destination: its principal is unknown.
    let passthrough = mesh
        .metric(
            0,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "source"),
                ("connection_security_policy", "none"),
                ("destination_workload", "old"),
                ("destination_principal", "unknown"),
            ],
        )
        .unwrap();
    assert_eq!(passthrough, 1.0);

    // The other way, a client outside the mesh reaches the enrolled (PERMISSIVE) pod in
    // plaintext through its ztunnel's :15006; it proved nothing, so its principal is unknown.
    let _web_app = mesh.start_echo("web", APP_PORT, None).unwrap();
    let mut conn = mesh.connect("old", addr(mesh.pod("web"), APP_PORT)).unwrap();
    assert_eq!(echo(&mut conn, marker.as_bytes()), marker.as_bytes());
    drop(conn);
    let labels = [
        ("reporter", "destination"),
        ("connection_security_policy", "none"),
        ("source_workload", "old"),
        ("source_principal", "unknown"),
        ("destination_workload", "web"),
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    while mesh.metric(0, "istio_tcp_connections_closed_total", &labels).unwrap() < 1.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(mesh.metric(0, "istio_tcp_connections_opened_total", &labels).unwrap(), 1.0);
    assert_eq!(mesh.metric(0, "istio_tcp_connections_closed_total", &labels).unwrap(), 1.0);
}

fn nft_table_exists(mesh: &MeshLab, pod: &str) -> bool {
    let mut cmd = Command::new("nft");
    cmd.args(["list", "table", "inet", "weft"]);
    mesh.pod(pod).netns().output(cmd, Duration::from_secs(5)).unwrap().status.success()
}

#[test]
fn enrolling_without_restart_keeps_existing_connections_and_captures_new_ones() {
    let Some(mut mesh) = mesh("enroll") else { return };
    mesh.add_pod(PodSpec::new(0, "front", "web", "web").not_enrolled()).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "api", "api").not_enrolled()).unwrap();
    mesh.start_ztunnels().unwrap();
    let app = mesh.start_echo("api", APP_PORT, None).unwrap();
    let (app_pid, pause_pid) = (app.pid(), mesh.pod("api").pause_pid());
    let target = addr(mesh.pod("api"), APP_PORT);

    // A long-lived connection, made before enrollment.
    let mut old = mesh.connect("web", target).unwrap();
    assert_eq!(echo(&mut old, b"before"), b"before");

    mesh.set_enrolled("web", true);
    mesh.set_enrolled("api", true);
    mesh.write_config().unwrap();
    mesh.wait_enrolled(0, 1).unwrap();
    mesh.wait_enrolled(1, 1).unwrap();
    assert!(nft_table_exists(&mesh, "web") && nft_table_exists(&mesh, "api"));

    // The old connection keeps working, untouched by the new rules.
    assert_eq!(echo(&mut old, b"during"), b"during");
    // New connections go through HBONE.
    let capture = mesh.lab.capture().unwrap();
    let mut new = mesh.connect("web", target).unwrap();
    assert_eq!(echo(&mut new, b"new"), b"new");
    drop(new);
    std::thread::sleep(Duration::from_millis(200));
    let packets = capture.stop().unwrap();
    let fresh: Vec<&Packet> = between(&packets, mesh.pod("web"), mesh.pod("api")).filter(|p| p.flags.syn()).collect();
    assert!(!fresh.is_empty() && fresh.iter().all(|p| p.dst.port() == 15008 || p.src.port() == 15008), "{fresh:?}");
    // Nobody restarted.
    assert_eq!(app.try_status().unwrap(), None, "the app is still running");
    assert_eq!(app.pid(), app_pid);
    assert!(Path::new(&format!("/proc/{pause_pid}")).exists(), "the pod's pause process is still running");
    assert!(Path::new(&format!("/proc/{app_pid}")).exists());

    // Un-enroll: rules and listeners gone, traffic direct again.
    mesh.set_enrolled("web", false);
    mesh.set_enrolled("api", false);
    mesh.write_config().unwrap();
    mesh.wait_enrolled(0, 0).unwrap();
    mesh.wait_enrolled(1, 0).unwrap();
    assert!(!nft_table_exists(&mesh, "web") && !nft_table_exists(&mesh, "api"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while mesh.connect("web", addr(mesh.pod("api"), 15008)).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(mesh.connect("web", addr(mesh.pod("api"), 15008)).is_err(), "the HBONE listener is closed");
    let capture = mesh.lab.capture().unwrap();
    let mut direct = mesh.connect("web", target).unwrap();
    assert_eq!(echo(&mut direct, b"direct"), b"direct");
    drop(direct);
    std::thread::sleep(Duration::from_millis(200));
    let packets = capture.stop().unwrap();
    assert!(between(&packets, mesh.pod("web"), mesh.pod("api")).any(|p| p.dst.port() == APP_PORT), "direct again");
    assert_eq!(echo(&mut old, b"after"), b"after", "the first connection survived it all");
}

/// Whether a connection from `from` to `to` is refused: the source ztunnel accepts locally,
/// then closes when the tunnel is refused, so the client reads EOF or a reset, not an echo.
fn refused(mesh: &MeshLab, from: &str, to: SocketAddr) -> bool {
    let Ok(mut conn) = mesh.connect(from, to) else { return true };
    if conn.write_all(b"hello").is_err() {
        return true;
    }
    let mut buf = [0u8; 5];
    !matches!(conn.read_exact(&mut buf), Ok(()) if &buf == b"hello")
}

#[test]
fn l4_policy_allow_deny_and_strict() {
    let Some(mut mesh) = mesh("policy") else { return };
    mesh.add_pod(PodSpec::new(0, "front", "web", "web")).unwrap();
    mesh.add_pod(PodSpec::new(0, "front", "batch", "batch")).unwrap();
    mesh.add_pod(PodSpec::new(0, "legacy", "old", "old").not_enrolled()).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "api", "api").strict()).unwrap();
    mesh.add_policy(
        "{name: only-web, namespace: back, selector: {app: api}, action: ALLOW, rules: [{from: [{principals: [\"spiffe://cluster.local/ns/front/sa/web\"]}]}]}",
    );
    mesh.start_ztunnels().unwrap();
    let _app = mesh.start_echo("api", APP_PORT, None).unwrap();
    mesh.wait_enrolled(0, 2).unwrap();
    mesh.wait_enrolled(1, 1).unwrap();
    let target = addr(mesh.pod("api"), APP_PORT);

    assert!(!refused(&mesh, "web", target), "ALLOW by principal admits web");
    assert!(refused(&mesh, "batch", target), "ALLOW by principal refuses batch");
    let denied = mesh.metric(1, "weft_connections_refused_total", &[("reason", "policy")]).unwrap();
    assert_eq!(denied, 1.0);

    // DENY beats ALLOW.
    mesh.add_policy(
        "{name: no-web, namespace: back, action: DENY, rules: [{from: [{namespaces: [front]}], ports: [8080]}]}",
    );
    mesh.write_config().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !refused(&mesh, "web", target) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(refused(&mesh, "web", target), "DENY beats ALLOW");

    // STRICT refuses a plaintext client.
    mesh.clear_policies();
    mesh.write_config().unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert!(!refused(&mesh, "web", target), "policies cleared");
    assert!(refused(&mesh, "old", target), "STRICT refuses plaintext");
    let strict = mesh.metric(1, "weft_connections_refused_total", &[("reason", "strict_mtls")]).unwrap();
    assert_eq!(strict, 1.0);
    // Log lines reach the file through ztunnel's writer thread: wait for it, bounded.
    let logged = mesh.ztunnel(1).wait_for_log("is STRICT: plaintext from", Duration::from_secs(5));
    assert!(logged.is_ok(), "the refusal is logged");
}

#[test]
fn metrics_count_connections_and_bytes_with_istio_labels() {
    let Some(mut mesh) = mesh("metrics") else { return };
    mesh.add_pod(PodSpec::new(0, "front", "web", "web")).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "api", "api")).unwrap();
    mesh.start_ztunnels().unwrap();
    let _app = mesh.start_echo("api", APP_PORT, None).unwrap();
    mesh.wait_enrolled(0, 1).unwrap();
    mesh.wait_enrolled(1, 1).unwrap();

    let payload = vec![b'x'; 100_000];
    for _ in 0..3 {
        let mut conn = mesh.connect("web", addr(mesh.pod("api"), APP_PORT)).unwrap();
        assert_eq!(echo(&mut conn, &payload).len(), payload.len());
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).unwrap();
    }
    let labels = [
        ("source_workload", "web"),
        ("source_workload_namespace", "front"),
        ("source_principal", "spiffe://cluster.local/ns/front/sa/web"),
        ("destination_workload", "api"),
        ("destination_workload_namespace", "back"),
        ("destination_principal", "spiffe://cluster.local/ns/back/sa/api"),
        ("connection_security_policy", "mutual_tls"),
    ];
    for (node, reporter) in [(0, "source"), (1, "destination")] {
        let mut l = labels.to_vec();
        l.push(("reporter", reporter));
        let deadline = Instant::now() + Duration::from_secs(5);
        while mesh.metric(node, "istio_tcp_connections_closed_total", &l).unwrap() < 3.0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(mesh.metric(node, "istio_tcp_connections_opened_total", &l).unwrap(), 3.0, "{reporter}");
        assert_eq!(mesh.metric(node, "istio_tcp_connections_closed_total", &l).unwrap(), 3.0, "{reporter}");
        assert_eq!(mesh.metric(node, "istio_tcp_received_bytes_total", &l).unwrap(), 300_000.0, "{reporter}");
        assert_eq!(mesh.metric(node, "istio_tcp_sent_bytes_total", &l).unwrap(), 300_000.0, "{reporter}");
    }
}

#[test]
fn sigterm_drains_active_connections_and_refuses_new_ones() {
    let Some(mut mesh) = mesh("drain") else { return };
    mesh.add_pod(PodSpec::new(0, "front", "web", "web")).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "api", "api")).unwrap();
    mesh.write_config().unwrap();
    mesh.start_ztunnel(0, &["--drain-deadline", "10s"]).unwrap();
    mesh.start_ztunnel(1, &[]).unwrap();
    let _app = mesh.start_echo("api", APP_PORT, None).unwrap();
    mesh.wait_enrolled(0, 1).unwrap();
    mesh.wait_enrolled(1, 1).unwrap();
    let target = addr(mesh.pod("api"), APP_PORT);

    let mut active = mesh.connect("web", target).unwrap();
    assert_eq!(echo(&mut active, b"one"), b"one");
    let zt = mesh.take_ztunnel(0).unwrap();
    zt.signal(Signal::SIGTERM).unwrap();
    zt.wait_for_log("draining", Duration::from_secs(5)).unwrap();

    // The active transfer goes on and completes.
    let chunk = vec![b'y'; 1 << 20];
    assert_eq!(echo(&mut active, &chunk).len(), chunk.len());
    // New connections are refused.
    assert!(refused(&mesh, "web", target), "new connections are refused while draining");
    active.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    active.read_to_end(&mut rest).unwrap();
    drop(active);
    let status = zt.wait_timeout(Duration::from_secs(10)).unwrap().expect("ztunnel exits within the deadline");
    assert!(status.success(), "ztunnel exits 0 after draining: {status}");
    assert!(zt.logs().unwrap().contains("outcome=Graceful"), "{}", zt.logs().unwrap());
}

#[test]
fn local_file_mode_rejects_a_malformed_config_and_keeps_the_last_good_one() {
    let Some(mut mesh) = local_mesh("badconfig") else { return };
    mesh.add_pod(PodSpec::new(0, "front", "web", "web")).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "api", "api")).unwrap();
    mesh.start_ztunnels().unwrap();
    let _app = mesh.start_echo("api", APP_PORT, None).unwrap();
    mesh.wait_enrolled(0, 1).unwrap();
    let target = addr(mesh.pod("api"), APP_PORT);

    let bad = mesh.config_yaml().replacen("addresses: [10.", "addresses: [10.x.", 1);
    mesh.write_raw_config(&bad).unwrap();
    let log = mesh.ztunnel(0).wait_for_log("config rejected", Duration::from_secs(5)).unwrap();
    let line = log.lines().find(|l| l.contains("config rejected")).unwrap();
    assert!(line.contains("workloads[0].addresses[0]") && line.contains("is not an IP address"), "{line}");
    assert_eq!(mesh.metric(0, "weft_config_rejected_total", &[]).unwrap(), 1.0);
    // Still serving with the last good config.
    let mut conn = mesh.connect("web", target).unwrap();
    assert_eq!(echo(&mut conn, b"still"), b"still");
    assert_eq!(mesh.ztunnel(0).try_status().unwrap(), None, "ztunnel is still running");
}

/// The app sees its client's own address as its peer, as it would without the mesh: over HBONE
/// from a pod on another node and from one on the same node, and in plaintext from a pod
/// outside the mesh (PERMISSIVE); and an `ipBlocks` ALLOW rule matches that address.
#[test]
fn the_app_sees_its_clients_address_and_ip_blocks_match_it() {
    let Some(mut mesh) = mesh("client-address") else { return };
    mesh.add_pod(PodSpec::new(0, "front", "web", "web")).unwrap();
    mesh.add_pod(PodSpec::new(1, "front", "near", "near")).unwrap();
    mesh.add_pod(PodSpec::new(0, "legacy", "old", "old").not_enrolled()).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "api", "api")).unwrap();
    mesh.start_ztunnels().unwrap();
    let app = mesh.start_echo("api", APP_PORT, None).unwrap();
    mesh.wait_enrolled(0, 1).unwrap();
    mesh.wait_enrolled(1, 2).unwrap();
    let target = addr(mesh.pod("api"), APP_PORT);

    for (client, path) in [("web", "HBONE from another node"), ("near", "HBONE on the same node"), ("old", "plaintext")]
    {
        let mut conn = mesh.connect(client, target).unwrap();
        let msg = marker(client);
        assert_eq!(echo(&mut conn, msg.as_bytes()), msg.as_bytes(), "{client}: echo");
        let ip = mesh.pod(client).ip();
        let seen = app.wait_for_log(&format!("accepted {ip}:"), Duration::from_secs(5));
        assert!(seen.is_ok(), "{path}: the app must see {client}'s address {ip} as its peer: {seen:?}");
    }
    let api_ip = mesh.pod("api").ip();
    let logs = app.logs().unwrap();
    assert!(!logs.contains(&format!("accepted {api_ip}:")), "no connection from the pod's own address: {logs}");

    // ALLOW web's address only: web is served, near (same node, same namespace) is refused.
    let web_ip = mesh.pod("web").ip();
    mesh.add_policy(&format!(
        "{{name: web-only, namespace: back, selector: {{app: api}}, action: ALLOW, rules: [{{from: [{{ipBlocks: [\"{web_ip}/32\"]}}]}}]}}"
    ));
    mesh.write_config().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !refused(&mesh, "near", target) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(refused(&mesh, "near", target), "ALLOW for web's address refuses near");
    assert!(!refused(&mesh, "web", target), "ALLOW for web's address admits web");
    assert!(refused(&mesh, "old", target), "ALLOW for web's address refuses old's plaintext");

    // Released, the pod is left as it was: no capture table, no client-address rule or route.
    let routing = |mesh: &MeshLab| {
        let show = |args: &[&str]| {
            let mut cmd = Command::new("ip");
            cmd.args(args);
            let out = mesh.pod("api").netns().output(cmd, Duration::from_secs(5)).unwrap();
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        show(&["-4", "rule", "show"]) + &show(&["-4", "route", "show", "table", "all"])
    };
    let captured = routing(&mesh);
    assert!(captured.contains("32763:\tfrom all fwmark 0x5747 lookup 22342"), "{captured}");
    assert!(captured.contains("local default dev lo table 22342"), "{captured}");
    mesh.set_enrolled("api", false);
    mesh.write_config().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while nft_table_exists(&mesh, "api") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!nft_table_exists(&mesh, "api"), "api released");
    let released = routing(&mesh);
    assert!(!released.contains("0x5747") && !released.contains("22342"), "{released}");
}

/// The inbound ztunnel connects to the app with the client's address as its source, and it
/// closes first (it passes the client's FIN on), so each connection leaves that socket's port in
/// TIME_WAIT for a minute inside the server's pod. Ports must be taken per destination, as the
/// client itself takes them, not from the client address's whole range: with the pod's range
/// cut to 8 ports, 18 short connections to three apps of the pod all get through.
#[test]
fn closed_connections_waiting_on_the_server_side_do_not_use_up_the_clients_ports() {
    let Some(mut mesh) = mesh("client-ports") else { return };
    mesh.add_pod(PodSpec::new(0, "front", "busy", "busy")).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "api", "api")).unwrap();
    mesh.start_ztunnels().unwrap();
    let ports = [APP_PORT, APP_PORT + 1, APP_PORT + 2];
    let _apps: Vec<_> = ports.iter().map(|p| mesh.start_echo("api", *p, None).unwrap()).collect();
    mesh.wait_enrolled(0, 1).unwrap();
    mesh.wait_enrolled(1, 1).unwrap();
    mesh.pod("api")
        .netns()
        .run(|| std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "40000 40007"))
        .unwrap()
        .expect("narrowing the server pod's port range");

    for round in 0..6 {
        for port in ports {
            let mut conn = mesh.connect("busy", addr(mesh.pod("api"), port)).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let msg = marker("client-ports");
            conn.write_all(msg.as_bytes()).unwrap();
            let mut back = vec![0u8; msg.len()];
            let answered = conn.read_exact(&mut back);
            assert!(
                answered.is_ok() && back == msg.as_bytes(),
                "connection {} (round {round}, port {port}) must be served: {answered:?}\n{}",
                round * ports.len() + usize::from(port - APP_PORT) + 1,
                mesh.ztunnel(1).logs().unwrap_or_default()
            );
        }
    }
}
