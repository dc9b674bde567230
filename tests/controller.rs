//! End-to-end tests of the mesh programmed by the controller (tier 3, network-namespace lab):
//! the real `weft controller` in its pod on node 0 reading the Kubernetes objects the lab
//! writes, and real ztunnels subscribed to it. They need root; under `CI=true` a test that
//! cannot get it fails instead of skipping.
//!
//! What they prove: enrollment follows the namespace label (and a pod's opt-out) without
//! restarting anything; the data plane keeps working while the controller is down, a ztunnel
//! restarted meanwhile serves from what it kept on its node, and a change made meanwhile
//! reaches every node once the controller is back; a ztunnel that reconnects within one
//! controller run is sent only what it missed.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lab::{Packet, Signal};
use weft::meshlab::{CONTROLLER_ADMIN_PORT, CONTROLLER_METRICS_PORT, MeshLab, PodSpec, sum_metric};

const APP_PORT: u16 = 8080;

/// How fast a change in the cluster must reach the proxies: the controller reads its
/// directory every 100 ms in the lab and pushes at once, so a few seconds is generous.
const PROPAGATION: Duration = Duration::from_secs(5);

/// How long the controller stays down in `controller_down_then_back`.
const CONTROLLER_DOWN: Duration = Duration::from_secs(30);

/// How long a ztunnel may take to get a change once the controller is back: its resubscription
/// backoff has grown to its cap (5 s) while the controller was down, plus the propagation.
const CATCH_UP: Duration = Duration::from_secs(5 + 5);

fn weft() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_weft"))
}

/// A mesh of `nodes` nodes programmed by a controller, or `None` (after a loud skip) when the
/// lab cannot run here.
fn mesh(test: &str, nodes: usize) -> Option<MeshLab> {
    if !MeshLab::ready_here() {
        return None;
    }
    Some(MeshLab::new(test, nodes, weft()).expect("building the lab"))
}

fn marker(what: &str) -> String {
    format!("WEFT-MARKER-{what}-{}", std::process::id())
}

/// Sends `msg` and reads the same number of bytes back.
fn echo(stream: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    stream.write_all(msg).expect("write");
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back).expect("read the echo");
    back
}

/// One short exchange on a new connection from `from` to `to`; whether it echoed.
fn exchange(mesh: &MeshLab, from: &str, to: SocketAddr, msg: &[u8]) -> bool {
    let Ok(mut conn) = mesh.connect(from, to) else { return false };
    if conn.write_all(msg).is_err() {
        return false;
    }
    let mut back = vec![0u8; msg.len()];
    matches!(conn.read_exact(&mut back), Ok(()) if back == msg)
}

fn addr(mesh: &MeshLab, pod: &str) -> SocketAddr {
    SocketAddr::from((mesh.pod(pod).ip(), APP_PORT))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The packets between two pods, except those of the connection whose client end is `skip`
/// (a long-lived connection that predates what is being looked at).
fn between<'a>(packets: &'a [Packet], mesh: &MeshLab, a: &str, b: &str, skip: Option<SocketAddr>) -> Vec<&'a Packet> {
    let (a, b) = (mesh.pod(a).ip(), mesh.pod(b).ip());
    packets
        .iter()
        .filter(|p| (*p.src.ip() == a && *p.dst.ip() == b) || (*p.src.ip() == b && *p.dst.ip() == a))
        .filter(|p| skip.is_none_or(|s| SocketAddr::V4(p.src) != s && SocketAddr::V4(p.dst) != s))
        .collect()
}

/// Records the fabric while `traffic` runs, then stops (after letting the last packets land).
fn captured(mesh: &MeshLab, traffic: impl FnOnce()) -> Vec<Packet> {
    let capture = mesh.lab.capture().unwrap();
    traffic();
    std::thread::sleep(Duration::from_millis(200));
    capture.stop().unwrap()
}

/// Asserts that the pods talked only HBONE (port 15008) on the fabric, with a TLS handshake
/// and never the plaintext `marker`.
fn assert_hbone_only(flows: &[&Packet], marker: &str) {
    assert!(flows.iter().any(|p| p.flags.syn()), "a new connection crossed the fabric: {flows:?}");
    for p in flows {
        assert!(p.src.port() == 15008 || p.dst.port() == 15008, "only HBONE between the pods, saw {p:?}");
        assert!(!contains(&p.payload, marker.as_bytes()), "plaintext marker on the wire in {p:?}");
    }
    assert!(
        flows.iter().any(|p| p.dst.port() == 15008 && p.payload.first() == Some(&0x16)),
        "a TLS handshake record was sent to 15008"
    );
}

/// Asserts that `marker` crossed the fabric in plaintext to or from the app port.
fn assert_plaintext(flows: &[&Packet], marker: &str, what: &str) {
    assert!(
        flows
            .iter()
            .any(|p| (p.dst.port() == APP_PORT || p.src.port() == APP_PORT) && contains(&p.payload, marker.as_bytes())),
        "{what}: the payload should be on the wire in plaintext to the app port; saw {flows:?}"
    );
    assert!(flows.iter().all(|p| p.dst.port() != 15008 && p.src.port() != 15008), "{what}: no HBONE: {flows:?}");
}

fn nft_table_exists(mesh: &MeshLab, pod: &str) -> bool {
    let mut cmd = Command::new("nft");
    cmd.args(["list", "table", "inet", "weft"]);
    mesh.pod(pod).netns().output(cmd, Duration::from_secs(5)).unwrap().status.success()
}

/// The processes in a pod's network namespace: its pause process and its app. The same set
/// before and after means nothing in the pod was restarted.
fn pod_processes(mesh: &MeshLab, pod: &str) -> BTreeSet<u32> {
    lab::processes_in_namespace(mesh.pod(pod).netns().path()).into_iter().collect()
}

/// Node `node`'s ztunnel config dump.
fn dump(mesh: &MeshLab, node: usize) -> serde_json::Value {
    serde_json::from_str(&mesh.node_http(node, 15000, "/config_dump").unwrap()).unwrap()
}

/// The uids of the pods node `node`'s ztunnel captures.
fn enrolled_pods(mesh: &MeshLab, node: usize) -> Vec<String> {
    let d = dump(mesh, node);
    d["enrolledPods"].as_array().unwrap().iter().map(|p| p["uid"].as_str().unwrap().to_owned()).collect()
}

/// Whether node `node`'s ztunnel holds an authorization policy named `name`.
fn holds_policy(mesh: &MeshLab, node: usize, name: &str) -> bool {
    dump(mesh, node)["policies"].as_array().unwrap().iter().any(|p| p["name"] == name)
}

/// The controller's `/status`.
fn status(mesh: &MeshLab) -> serde_json::Value {
    serde_json::from_str(&mesh.controller_http(CONTROLLER_ADMIN_PORT, "/status").unwrap()).unwrap()
}

/// A counter of the controller's metrics.
fn controller_metric(mesh: &MeshLab, name: &str) -> f64 {
    sum_metric(&mesh.controller_http(CONTROLLER_METRICS_PORT, "/metrics").unwrap(), name, &[])
}

/// Polls `done` every 100 ms until it holds or `timeout` passes; how long it took, or `None`.
fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if done() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn namespace_label_enrolls_running_pods_without_restarts() {
    let Some(mut mesh) = mesh("ns-label", 2) else { return };
    // Both namespaces start without the mesh label; `legacy` opts out with its own label.
    mesh.set_namespace_enrolled("front", false);
    mesh.set_namespace_enrolled("back", false);
    mesh.add_pod(PodSpec::new(0, "front", "web", "web")).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "api", "api")).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "legacy", "legacy").not_enrolled()).unwrap();
    mesh.start_ztunnels().unwrap();
    let apps = ["web", "api", "legacy"].map(|pod| mesh.start_echo(pod, APP_PORT, None).unwrap());
    assert!(enrolled_pods(&mesh, 0).is_empty() && enrolled_pods(&mesh, 1).is_empty(), "nothing enrolled yet");
    let processes = ["web", "api", "legacy"].map(|pod| pod_processes(&mesh, pod));
    for (set, (pod, app)) in processes.iter().zip(["web", "api", "legacy"].iter().zip(&apps)) {
        let expected = BTreeSet::from([mesh.pod(pod).pause_pid(), app.pid()]);
        assert_eq!(*set, expected, "pod {pod} runs its pause process and its app");
    }

    // A long-lived connection, opened before enrollment: plaintext on the wire.
    let before = marker("before");
    let mut old = None;
    let packets = captured(&mesh, || {
        let mut conn = mesh.connect("web", addr(&mesh, "api")).unwrap();
        assert_eq!(echo(&mut conn, before.as_bytes()), before.as_bytes());
        old = Some(conn);
    });
    let mut old = old.unwrap();
    let old_end = old.local_addr().unwrap();
    assert_plaintext(&between(&packets, &mesh, "web", "api", None), &before, "before enrollment");

    // Label both namespaces: their pods are captured within seconds.
    mesh.set_namespace_enrolled("front", true);
    mesh.set_namespace_enrolled("back", true);
    mesh.write_config().unwrap();
    let took =
        wait_until(PROPAGATION, || enrolled_pods(&mesh, 0) == ["front/web"] && enrolled_pods(&mesh, 1) == ["back/api"]);
    let took = took.unwrap_or_else(|| {
        panic!("not enrolled within {PROPAGATION:?}: {:?} {:?}", enrolled_pods(&mesh, 0), enrolled_pods(&mesh, 1))
    });
    eprintln!("namespace label to both pods captured: {took:?}");
    assert!(nft_table_exists(&mesh, "web") && nft_table_exists(&mesh, "api"));
    assert!(!nft_table_exists(&mesh, "legacy"), "the opted-out pod is not captured");
    let legacy = dump(&mesh, 1)["workloads"].as_array().unwrap().iter().find(|w| w["name"] == "legacy").cloned();
    assert_eq!(legacy.expect("legacy is a known workload")["enrolled"], false);

    // New connections between the enrolled pods are HBONE; the opted-out pod's are not, either
    // way: web → legacy is passed through, legacy → web reaches web's plaintext port.
    let (hbone, to_legacy, from_legacy) = (marker("hbone"), marker("to-legacy"), marker("from-legacy"));
    let packets = captured(&mesh, || {
        assert!(exchange(&mesh, "web", addr(&mesh, "api"), hbone.as_bytes()), "web → api after enrollment");
        assert!(exchange(&mesh, "web", addr(&mesh, "legacy"), to_legacy.as_bytes()), "web → legacy");
        assert!(exchange(&mesh, "legacy", addr(&mesh, "web"), from_legacy.as_bytes()), "legacy → web");
    });
    assert_hbone_only(&between(&packets, &mesh, "web", "api", Some(old_end)), &hbone);
    let legacy_flows = between(&packets, &mesh, "web", "legacy", None);
    assert_plaintext(&legacy_flows, &to_legacy, "web → the opted-out pod");
    assert_plaintext(&legacy_flows, &from_legacy, "the opted-out pod → web");
    let plaintext_in =
        [("reporter", "destination"), ("source_workload", "legacy"), ("connection_security_policy", "none")];
    let counted =
        wait_until(PROPAGATION, || mesh.metric(0, "istio_tcp_connections_opened_total", &plaintext_in).unwrap() == 1.0);
    assert!(counted.is_some(), "web's ztunnel served the opted-out pod's connection as plaintext");

    // The connection from before enrollment is unbroken, and nothing was restarted.
    assert_eq!(echo(&mut old, b"during"), b"during");
    for (pod, before) in ["web", "api", "legacy"].iter().zip(&processes) {
        assert_eq!(pod_processes(&mesh, pod), *before, "the processes of pod {pod} are the same ones");
    }
    assert!(apps.iter().all(|a| a.try_status().unwrap().is_none()), "every app still runs");

    // Removing the label un-enrolls: rules gone, traffic direct again.
    mesh.set_namespace_enrolled("front", false);
    mesh.set_namespace_enrolled("back", false);
    mesh.write_config().unwrap();
    let took = wait_until(PROPAGATION, || enrolled_pods(&mesh, 0).is_empty() && enrolled_pods(&mesh, 1).is_empty());
    let took = took.unwrap_or_else(|| panic!("not un-enrolled within {PROPAGATION:?}"));
    eprintln!("label removed to both pods released: {took:?}");
    assert!(!nft_table_exists(&mesh, "web") && !nft_table_exists(&mesh, "api"));
    let direct = marker("direct");
    let packets = captured(&mesh, || {
        assert!(exchange(&mesh, "web", addr(&mesh, "api"), direct.as_bytes()), "web → api after un-enrollment");
    });
    assert_plaintext(&between(&packets, &mesh, "web", "api", Some(old_end)), &direct, "after un-enrollment");
    assert_eq!(echo(&mut old, b"after"), b"after", "the first connection survived it all");
    for (pod, before) in ["web", "api", "legacy"].iter().zip(&processes) {
        assert_eq!(pod_processes(&mesh, pod), *before, "the processes of pod {pod} are the same ones");
    }
}

#[test]
fn controller_down_then_back() {
    let Some(mut mesh) = mesh("ctl-down", 3) else { return };
    mesh.add_pod(PodSpec::new(0, "front", "web", "web")).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "api", "api")).unwrap();
    mesh.add_pod(PodSpec::new(2, "back", "db", "db")).unwrap();
    mesh.start_ztunnels().unwrap();
    for pod in ["web", "api", "db"] {
        let app = mesh.start_echo(pod, APP_PORT, None).unwrap();
        mesh.keep(app);
    }
    for node in 0..3 {
        mesh.wait_enrolled(node, 1).unwrap();
    }
    let (api, db) = (addr(&mesh, "api"), addr(&mesh, "db"));
    assert!(exchange(&mesh, "web", api, b"up") && exchange(&mesh, "db", api, b"up"), "the mesh works");
    let mut old = mesh.connect("web", api).unwrap();
    assert_eq!(echo(&mut old, b"before"), b"before");
    // Another one, which the policy written below does not concern.
    let mut old_back = mesh.connect("api", addr(&mesh, "web")).unwrap();
    assert_eq!(echo(&mut old_back, b"before"), b"before");
    let old_epoch = status(&mesh)["epoch"].as_str().unwrap().to_owned();

    // The controller dies. Its handle stays in the lab (exited), so that restarting a ztunnel
    // below does not start a new controller with it.
    let started = Instant::now();
    mesh.controller().kill().unwrap();
    let (mut restarted, mut changed, mut rounds) = (false, false, 0u32);
    while started.elapsed() < CONTROLLER_DOWN {
        rounds += 1;
        let msg = format!("round {rounds}");
        assert_eq!(echo(&mut old, msg.as_bytes()), msg.as_bytes(), "the old connection, {:?} down", started.elapsed());
        assert_eq!(echo(&mut old_back, msg.as_bytes()), msg.as_bytes(), "the other old connection");
        assert!(exchange(&mesh, "web", api, msg.as_bytes()), "a new web → api, {:?} down", started.elapsed());
        if restarted {
            assert!(exchange(&mesh, "db", api, msg.as_bytes()), "db → api via the restarted ztunnel");
            assert!(exchange(&mesh, "web", db, msg.as_bytes()), "web → db via the restarted ztunnel");
        }
        if !restarted && started.elapsed() >= Duration::from_secs(3) {
            // Node 2's ztunnel restarts with the controller still down: it must serve from
            // the configuration and certificates it kept in its state directory.
            let zt = mesh.take_ztunnel(2).unwrap();
            zt.signal(Signal::SIGTERM).unwrap();
            let exit = zt.wait_timeout(Duration::from_secs(15)).unwrap().expect("ztunnel exits after its drain");
            assert!(exit.success(), "{exit}");
            mesh.start_ztunnel(2, &[]).unwrap();
            mesh.wait_enrolled(2, 1).unwrap();
            // Log lines reach the file a few milliseconds after the state `wait_enrolled` reads.
            let logs =
                mesh.ztunnel(2).wait_for_log("certificate loaded from the node", Duration::from_secs(2)).unwrap();
            assert!(logs.contains("starting from the saved configuration"), "{logs}");
            assert!(logs.contains("certificate loaded from the node"), "{logs}");
            assert!(!logs.contains("certificate obtained from the controller"), "{logs}");
            restarted = true;
        }
        if !changed && started.elapsed() >= CONTROLLER_DOWN - Duration::from_secs(6) {
            // A change while nobody can deliver it: web may no longer reach anyone.
            mesh.add_policy(
                "{name: deny-web, namespace: weft-system, action: DENY, rules: [{from: [{principals: [\"spiffe://cluster.local/ns/front/sa/web\"]}]}]}",
            );
            mesh.write_config().unwrap();
            changed = true;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(restarted && changed);
    assert!((0..3).all(|n| !holds_policy(&mesh, n, "deny-web")), "nothing delivered the change yet");
    // The new connections went through the mesh (mutual TLS), not around it.
    let mtls = [("reporter", "destination"), ("source_workload", "web"), ("connection_security_policy", "mutual_tls")];
    assert!(mesh.metric(1, "istio_tcp_connections_opened_total", &mtls).unwrap() >= f64::from(rounds));
    assert!(mesh.metric(2, "istio_tcp_connections_opened_total", &mtls).unwrap() >= 1.0);

    // The controller is back: a new epoch, so every ztunnel gets a snapshot, with the change.
    mesh.start_controller(&[]).unwrap();
    let back = Instant::now();
    let every_node = wait_until(CATCH_UP, || (0..3).all(|n| holds_policy(&mesh, n, "deny-web")));
    let every_node = every_node.unwrap_or_else(|| panic!("the policy did not reach every ztunnel in {CATCH_UP:?}"));
    let refusing = wait_until(CATCH_UP.saturating_sub(back.elapsed()), || {
        !exchange(&mesh, "web", api, b"denied") && !exchange(&mesh, "web", db, b"denied")
    });
    assert!(refusing.is_some(), "both destinations refuse web");
    eprintln!("controller back to the change held by every ztunnel: {every_node:?}; enforced: {:?}", back.elapsed());
    assert!(exchange(&mesh, "db", api, b"still"), "the policy is about web only");
    // The new epoch's snapshot changed only what differed: no pod was captured again, and a
    // connection the policy does not concern is still up.
    assert_eq!(echo(&mut old_back, b"after"), b"after");
    for node in 0..2 {
        let logs = mesh.ztunnel(node).logs().unwrap();
        assert_eq!(logs.matches("pod enrolled: traffic captured").count(), 1, "node {node} captured its pod once");
    }
    let denied_old = old.write_all(b"after").is_ok() && {
        let mut back = [0u8; 5];
        old.read_exact(&mut back).is_ok()
    };
    eprintln!("the connection web opened before the DENY still echoes after it: {denied_old}");

    let s = status(&mesh);
    let epoch = s["epoch"].as_str().unwrap();
    assert_ne!(epoch, old_epoch, "a restarted controller has a new epoch");
    let acked = wait_until(PROPAGATION, || {
        let s = status(&mesh);
        (0..3).all(|n| {
            let node = &s["nodes"][MeshLab::node_name(n)];
            node["acked"]["epoch"] == s["epoch"] && node["acked"]["version"] == s["version"]
        })
    });
    assert!(acked.is_some(), "every node acknowledged the current version: {}", status(&mesh));
    assert_eq!(controller_metric(&mesh, "weft_controller_snapshots_total"), 3.0, "one snapshot per node");
    assert_eq!(controller_metric(&mesh, "weft_controller_resumes_total"), 0.0, "another epoch: nothing to resume");
}

#[test]
fn reconnecting_ztunnel_gets_only_what_it_missed() {
    let Some(mut mesh) = mesh("resume", 2) else { return };
    mesh.add_pod(PodSpec::new(0, "front", "web", "web")).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "api", "api")).unwrap();
    mesh.start_ztunnels().unwrap();
    let app = mesh.start_echo("api", APP_PORT, None).unwrap();
    mesh.keep(app);
    mesh.wait_enrolled(0, 1).unwrap();
    mesh.wait_enrolled(1, 1).unwrap();
    let s = status(&mesh);
    let (epoch, version) = (s["epoch"].as_str().unwrap().to_owned(), s["version"].as_u64().unwrap());
    let node1 = MeshLab::node_name(1);
    let acked = wait_until(PROPAGATION, || status(&mesh)["nodes"][&node1]["acked"]["version"] == version);
    assert!(acked.is_some(), "node 1 acknowledged version {version}: {}", status(&mesh));
    let snapshots = controller_metric(&mesh, "weft_controller_snapshots_total");
    let resumes = controller_metric(&mesh, "weft_controller_resumes_total");
    assert_eq!((snapshots, resumes), (2.0, 0.0), "each ztunnel started with one snapshot");

    // Node 1's ztunnel goes away; one pod is added meanwhile (one version).
    let zt = mesh.take_ztunnel(1).unwrap();
    zt.signal(Signal::SIGTERM).unwrap();
    assert!(zt.wait_timeout(Duration::from_secs(15)).unwrap().expect("ztunnel exits").success());
    drop(zt);
    mesh.add_pod(PodSpec::new(0, "front", "batch", "batch")).unwrap();
    mesh.write_config().unwrap();
    let node0 = MeshLab::node_name(0);
    let committed = wait_until(PROPAGATION, || {
        let s = status(&mesh);
        s["version"] == version + 1 && s["nodes"][&node0]["acked"]["version"] == version + 1
    });
    assert!(committed.is_some(), "one version for one pod: {}", status(&mesh));

    // Back: it resumes from its saved cursor and is sent that one delta, no snapshot.
    mesh.start_ztunnel(1, &[]).unwrap();
    let caught_up = wait_until(PROPAGATION, || status(&mesh)["nodes"][&node1]["acked"]["version"] == version + 1);
    assert!(caught_up.is_some(), "node 1 acknowledged version {}: {}", version + 1, status(&mesh));
    assert_eq!(controller_metric(&mesh, "weft_controller_resumes_total"), resumes + 1.0, "one resumption");
    assert_eq!(controller_metric(&mesh, "weft_controller_snapshots_total"), snapshots, "no snapshot");
    let logs = mesh.ztunnel(1).logs().unwrap();
    let cursor = format!("epoch: \"{epoch}\", version: {version} }}");
    let subscribed = logs.lines().find(|l| l.contains("subscribed to the controller")).unwrap_or_default();
    assert!(subscribed.contains(&cursor), "subscribed from its saved cursor ({cursor}): {subscribed:?}");
    let applied = mesh.metric(1, "weft_config_applied_total", &[]).unwrap();
    assert_eq!(applied, 1.0, "one message applied since the restart: the missed delta");
    let workloads = dump(&mesh, 1)["workloads"].as_array().unwrap().clone();
    assert!(workloads.iter().any(|w| w["name"] == "batch"), "the missed pod arrived: {workloads:?}");
    let controller_logs = mesh.controller().logs().unwrap();
    let line = controller_logs.lines().rev().find(|l| l.contains("proxy subscribed") && l.contains(&node1));
    assert!(line.is_some_and(|l| l.contains("start=\"resume\"")), "{line:?}");
    assert_eq!(status(&mesh)["nodes"][&node1]["subscribers"], 1, "one stream, no reconnect loop");
    // And it serves: the mesh still works through it.
    assert!(exchange(&mesh, "web", addr(&mesh, "api"), b"resumed"));
}

#[test]
fn a_pod_whose_namespace_appears_later_is_enrolled_by_the_retry() {
    let Some(mut mesh) = mesh("ctl-retry", 1) else { return };
    mesh.add_pod(PodSpec::new(0, "front", "web", "web")).unwrap();
    let late = mesh.add_pod(PodSpec::new(0, "front", "late", "late")).unwrap();
    // The controller announces `late`, but node 0 cannot find its network namespace yet
    // (it is not in the node's view of /proc): its first enrollment fails.
    let entry = mesh.proc_root(0).join(late.pause_pid().to_string());
    let hidden = entry.with_extension("hidden");
    std::fs::rename(&entry, &hidden).unwrap();
    mesh.start_ztunnels().unwrap();
    mesh.wait_enrolled(0, 1).unwrap();
    // The first attempt failed (its line may reach the file just after web's enrollment).
    mesh.ztunnel(0).wait_for_log("pod not enrolled yet; will retry", Duration::from_secs(2)).unwrap();
    assert_eq!(enrolled_pods(&mesh, 0), ["front/web"], "only web is captured");

    // The namespace appears. Nothing changes at the controller, so only ztunnel's own retry
    // (every --reload-interval while a pod is pending) can capture it.
    std::fs::rename(&hidden, &entry).unwrap();
    let took = wait_until(PROPAGATION, || enrolled_pods(&mesh, 0).len() == 2);
    assert!(took.is_some(), "late was enrolled by the retry: {:?}", enrolled_pods(&mesh, 0));
    println!("enrolled {took:?} after its namespace appeared");
    assert!(nft_table_exists(&mesh, "late"), "late's capture rules are installed");
}
