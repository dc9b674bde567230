//! `weft get` against a real ztunnel and the real controller in the lab (tier 3), run inside
//! their network namespaces as an operator would (`ip netns exec ... weft get ...`). Needs
//! root; under `CI=true` it fails instead of skipping.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use weft::meshlab::{MeshLab, PodSpec};

fn weft() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_weft"))
}

fn get(netns: &lab::Netns, args: &[&str]) -> String {
    let mut cmd = Command::new(weft());
    cmd.arg("get").args(args);
    let out = netns.output(cmd, Duration::from_secs(20)).expect("running weft get");
    assert!(out.status.success(), "weft get {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn weft_get_shows_what_ztunnel_and_the_controller_hold() {
    if !MeshLab::ready_here() {
        return;
    }
    let mut mesh = MeshLab::new("get", 2, weft()).expect("building the lab");
    mesh.add_pod(PodSpec::new(0, "front", "web", "web")).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "api", "api")).unwrap();
    mesh.start_ztunnels().unwrap();
    mesh.wait_enrolled(0, 1).unwrap();
    let node0 = mesh.lab.nodes()[0].netns().clone();

    // The table: one row per workload, with its identity.
    let table = get(&node0, &["workloads"]);
    let header = table.lines().next().unwrap_or("");
    assert!(header.starts_with("NAMESPACE") && header.contains("IDENTITY"), "{table}");
    let web = table.lines().find(|l| l.contains(" web ")).unwrap_or_else(|| panic!("no row for web:\n{table}"));
    assert!(web.contains(&mesh.pod("web").ip().to_string()), "{web}");
    assert!(web.contains("spiffe://cluster.local/ns/front/sa/web"), "{web}");
    assert!(table.lines().any(|l| l.contains(" api ")), "{table}");

    // JSON is the ztunnel's own items; certificates are the ones this node obtained.
    let json: serde_json::Value = serde_json::from_str(&get(&node0, &["certificates", "-o", "json"])).unwrap();
    let ids: Vec<&str> = json.as_array().unwrap().iter().filter_map(|c| c["identity"].as_str()).collect();
    assert_eq!(ids, ["spiffe://cluster.local/ns/front/sa/web"], "node 0 holds web's certificate only");

    // The controller: each node's acknowledged version.
    let controller = mesh.controller_pod().netns().clone();
    // Each node acknowledges once it applied the snapshot; wait (bounded) for both reports.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = get(&controller, &["status", "--controller", "127.0.0.1:15000"]);
        let acked = status.lines().filter(|l| l.starts_with("node-") && !l.contains(" - ")).count();
        if acked == 2 || std::time::Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let version = status.lines().nth(1).and_then(|l| l.split_whitespace().nth(1)).unwrap_or("?").to_owned();
    for node in ["node-0", "node-1"] {
        let row =
            status.lines().find(|l| l.starts_with(node)).unwrap_or_else(|| panic!("no row for {node}:\n{status}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells.get(1), Some(&"1"), "{node} holds one watch stream: {row}");
        assert_eq!(cells.get(2), Some(&version.as_str()), "{node} acknowledged the current version: {row}");
    }
    let yaml = get(&controller, &["services", "--controller", "127.0.0.1:15000", "-o", "yaml"]);
    assert!(yaml.trim().is_empty() || yaml.trim() == "[]", "no services in this lab: {yaml}");
}
