//! The container runtime's hand-over in the lab (tier 3): a new pod's network namespace is
//! handed to its node's ztunnel by the real `weft-cni` plugin, run as a container runtime runs
//! it, before the pod's apps start, so the pod's first connection is captured; and when
//! ztunnel cannot be reached, the pod does not start (fail closed). They need root and the
//! plugin built beside `weft` (`cargo test --workspace` builds both); under `CI=true` a test
//! that cannot run fails instead of skipping.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use weft::meshlab::{MeshLab, PodSpec};

const APP_PORT: u16 = 8080;

fn weft() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_weft"))
}

fn mesh(test: &str) -> Option<MeshLab> {
    if !MeshLab::ready_here() {
        return None;
    }
    let mesh = MeshLab::new(test, 2, weft()).expect("building the lab");
    if mesh.cni_plugin().is_none() {
        lab::skip_or_fail("weft-cni is not built beside weft: run `cargo build --workspace` first");
        return None;
    }
    Some(mesh)
}

#[test]
fn a_pod_handed_over_by_the_runtime_has_its_first_connection_captured() {
    let Some(mut mesh) = mesh("runtime-first") else { return };
    mesh.add_pod(PodSpec::new(1, "back", "api", "api")).unwrap();
    mesh.start_ztunnels().unwrap();
    let _app = mesh.start_echo("api", APP_PORT, None).unwrap();
    mesh.wait_enrolled(1, 1).unwrap();

    // The runtime creates the pod: its namespace exists, the controller learns of it, and
    // ztunnel captures it before `create_pod` returns — no waiting for a /proc scan.
    let capture = mesh.lab.capture().unwrap();
    mesh.create_pod(PodSpec::new(0, "front", "new", "new")).unwrap();
    let target = SocketAddr::from((mesh.pod("api").ip(), APP_PORT));
    // Its very first connection, made at once.
    let mut conn = mesh.connect("new", target).unwrap();
    conn.write_all(b"first").unwrap();
    let mut back = [0u8; 5];
    conn.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"first");
    drop(conn);
    std::thread::sleep(Duration::from_millis(200));
    let packets = capture.stop().unwrap();
    let (new, api) = (mesh.pod("new").ip(), mesh.pod("api").ip());
    let flows: Vec<_> = packets
        .iter()
        .filter(|p| (*p.src.ip() == new && *p.dst.ip() == api) || (*p.src.ip() == api && *p.dst.ip() == new))
        .collect();
    assert!(!flows.is_empty(), "the connection crossed the fabric");
    assert!(
        flows.iter().all(|p| p.src.port() == 15008 || p.dst.port() == 15008),
        "the first connection was HBONE from its first packet: {flows:?}"
    );
    let logs = mesh.ztunnel(0).logs().unwrap();
    assert!(logs.contains("pod handed over by the runtime: traffic captured pod=front/new"), "{logs}");

    // A pod that opted out is answered at once and starts uncaptured.
    mesh.create_pod(PodSpec::new(0, "front", "plain", "plain").not_enrolled()).unwrap();
    mesh.ztunnel(0).wait_for_log("answer=not enrolled", Duration::from_secs(5)).unwrap();
}

#[test]
fn a_pod_does_not_start_when_ztunnel_is_unreachable() {
    let Some(mut mesh) = mesh("runtime-closed") else { return };
    mesh.add_pod(PodSpec::new(1, "back", "api", "api")).unwrap();
    mesh.start_ztunnels().unwrap();
    let zt = mesh.take_ztunnel(0).unwrap();
    zt.signal(lab::Signal::SIGTERM).unwrap();
    zt.wait_timeout(Duration::from_secs(15)).unwrap().expect("ztunnel exits");

    let err = mesh.create_pod(PodSpec::new(0, "front", "orphan", "orphan")).unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("must not start"), "{text}");
    assert!(text.contains("\"code\":11"), "the plugin's CNI error says: try again later: {text}");
    assert!(text.contains("node-0.sock"), "and names the socket: {text}");

    // Back up, the same hand-over succeeds for another pod.
    mesh.start_ztunnel(0, &[]).unwrap();
    mesh.create_pod(PodSpec::new(0, "front", "late", "late")).unwrap();
}
