//! The plugin run exactly as a container runtime runs it: the built binary, the `CNI_*`
//! environment and nothing else, the network configuration on stdin with the bridge plugin's
//! result as `prevResult`, against a fake ztunnel on a node socket in a temporary directory
//! that records each request line and answers as told. No root needed.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Run, TempDir, run, weft_cni};

const NETNS: &str = "/var/run/netns/cni-5f0d3c9e-7a41-2b8e-91c4-0e6f2d8a7b13";
const CONTAINER: &str = "4b7c0e1d9a3f6e2b8c5d7a1e0f9b3c6d2e8a4f7b1c5d9e3a6f0b2d8c4e7a1f5b";
const K8S_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;\
                        K8S_POD_INFRA_CONTAINER_ID=4b7c0e1d9a3f;K8S_POD_UID=0b5e6a2c-93d1-4f7e-8a20-6c1d5e9f3b47";

/// What the bridge plugin (with host-local IPAM, dual stack) returns for a pod: the result
/// the runtime hands to the next plugin in the list.
fn bridge_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cni0", "mac": "6a:1f:0e:8c:3b:21"},
            {"name": "veth5c7e2a1f", "mac": "3e:a1:7c:55:90:0d"},
            {"name": "eth0", "mac": "b6:22:4f:19:e0:7a", "sandbox": NETNS},
        ],
        "ips": [
            {"interface": 2, "address": "10.244.1.5/24", "gateway": "10.244.1.1"},
            {"interface": 2, "address": "fd00:10:244:1::5/64", "gateway": "fd00:10:244:1::1"},
        ],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "::/0", "gw": "fd00:10:244:1::1"}],
        "dns": {},
    })
}

/// The request configuration the runtime derives from the conflist entry
/// `{"type": "weft-cni", "nodeSocket": ...}` after the bridge plugin.
fn config(socket: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "weft-cni",
        "nodeSocket": socket,
        "prevResult": bridge_result(),
    })
}

/// The environment the runtime sets for `command` on a Kubernetes pod's sandbox.
fn runtime_env(command: &str) -> Vec<(&str, &str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", CONTAINER),
        ("CNI_NETNS", NETNS),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", K8S_ARGS),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
}

fn plugin(env: &[(&str, &str)], stdin: &Value) -> Run {
    run(weft_cni(), &[], env, &stdin.to_string())
}

/// A failed run: non-zero exit and the spec's error object on stdout with `code`.
fn assert_cni_error(run: &Run, code: u64, cni_version: &str) -> Value {
    assert!(!run.success, "must fail: {run:?}");
    let error = run.json();
    assert_eq!(error["code"], code, "{run:?}");
    assert_eq!(error["cniVersion"], cni_version, "{run:?}");
    assert!(error["msg"].as_str().is_some_and(|m| !m.is_empty()), "{run:?}");
    assert!(error["details"].is_string(), "{run:?}");
    assert_eq!(error.as_object().unwrap().len(), 4, "only the spec's keys: {error}");
    error
}

enum Answer {
    Reply {
        ok: bool,
        message: &'static str,
    },
    /// Accept, read the request, never answer.
    Never,
}

/// A ztunnel as the plugin sees it: a Unix listener that records every request line (an empty
/// one for a connection closed without a request) and answers each as told.
struct FakeZtunnel {
    socket: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
}

impl FakeZtunnel {
    fn start(dir: &Path, answer: Answer) -> FakeZtunnel {
        let socket = dir.join("ztunnel.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let seen = lines.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut line = String::new();
                let _ = BufReader::new(&stream).read_line(&mut line);
                seen.lock().unwrap().push(line.trim_end().to_owned());
                match answer {
                    Answer::Reply { ok, message } => {
                        let _ = writeln!(stream, "{}", json!({"ok": ok, "message": message}));
                    }
                    Answer::Never => held.push(stream),
                }
            }
        });
        FakeZtunnel { socket, lines }
    }

    /// The request lines received so far, waiting up to 5 s for at least `n`.
    fn lines(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lines = self.lines.lock().unwrap().clone();
            if lines.len() >= n || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn requests(&self, n: usize) -> Vec<Value> {
        self.lines(n).iter().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

#[test]
fn add_hands_the_pod_to_ztunnel_and_prints_the_previous_result() {
    let dir = TempDir::new("add");
    let ztunnel = FakeZtunnel::start(dir.path(), Answer::Reply { ok: true, message: "captured" });
    let run = plugin(&runtime_env("ADD"), &config(&ztunnel.socket));
    assert!(run.success, "{run:?}");
    assert_eq!(run.json(), bridge_result(), "the previous result, unchanged");
    // One request, in the node socket's wire form (docs/PROTOCOL.md), with the pod's
    // addresses from the bridge's result.
    assert_eq!(
        ztunnel.requests(1),
        [json!({
            "op": "add", "namespace": "shop", "name": "web-0", "netns": NETNS,
            "ips": ["10.244.1.5", "fd00:10:244:1::5"],
        })]
    );
    // ztunnel's own reader (unknown fields refused) takes it.
    let line = &ztunnel.lines(1)[0];
    assert!(serde_json::from_str::<meshapi::node::NodeRequest>(line).is_ok(), "{line}");
    assert!(run.stderr.contains("shop/web-0") && run.stderr.contains("captured"), "{run:?}");
}

#[test]
fn add_lets_a_pod_outside_the_mesh_start() {
    let dir = TempDir::new("add-out");
    let ztunnel = FakeZtunnel::start(dir.path(), Answer::Reply { ok: true, message: "not enrolled" });
    let run = plugin(&runtime_env("ADD"), &config(&ztunnel.socket));
    assert!(run.success, "{run:?}");
    assert_eq!(run.json(), bridge_result());
    assert_eq!(ztunnel.lines(1).len(), 1);
}

#[test]
fn add_fails_closed_when_ztunnel_is_down() {
    let dir = TempDir::new("add-down");
    let socket = dir.path().join("ztunnel.sock");
    let run = plugin(&runtime_env("ADD"), &config(&socket));
    let error = assert_cni_error(&run, 11, "1.0.0");
    assert!(error["msg"].as_str().unwrap().contains("shop/web-0"), "{error}");
    let details = error["details"].as_str().unwrap();
    assert!(details.contains(socket.to_str().unwrap()) && details.contains("is ztunnel running"), "{error}");

    // A socket file nobody listens on any more (ztunnel died): refused, the same answer.
    drop(UnixListener::bind(&socket).unwrap());
    let run = plugin(&runtime_env("ADD"), &config(&socket));
    let error = assert_cni_error(&run, 11, "1.0.0");
    assert!(error["details"].as_str().unwrap().contains("not running"), "{error}");
}

#[test]
fn add_fails_when_ztunnel_refuses_the_pod() {
    let dir = TempDir::new("add-refused");
    let reason =
        "pod shop/web-0 is not known to this ztunnel after 10s; is the controller reachable, and does it see the pod?";
    let ztunnel = FakeZtunnel::start(dir.path(), Answer::Reply { ok: false, message: reason });
    let run = plugin(&runtime_env("ADD"), &config(&ztunnel.socket));
    let error = assert_cni_error(&run, 100, "1.0.0");
    assert_eq!(error["details"], reason, "ztunnel's reason reaches the pod's events");
    assert!(error["msg"].as_str().unwrap().contains("shop/web-0"), "{error}");
}

#[test]
fn add_fails_when_ztunnel_does_not_answer_in_time() {
    let dir = TempDir::new("add-slow");
    let ztunnel = FakeZtunnel::start(dir.path(), Answer::Never);
    let mut conf = config(&ztunnel.socket);
    conf["timeoutSeconds"] = json!(1);
    let started = Instant::now();
    let run = plugin(&runtime_env("ADD"), &conf);
    let error = assert_cni_error(&run, 11, "1.0.0");
    assert!(error["details"].as_str().unwrap().contains("no answer"), "{error}");
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(10), "{took:?}");
    assert_eq!(ztunnel.lines(1).len(), 1, "the request was sent");
}

#[test]
fn add_passes_through_a_sandbox_that_is_not_a_kubernetes_pod() {
    let dir = TempDir::new("add-plain");
    let ztunnel = FakeZtunnel::start(dir.path(), Answer::Reply { ok: false, message: "must not be asked" });
    let mut env = runtime_env("ADD");
    env.retain(|(k, _)| *k != "CNI_ARGS");
    env.push(("CNI_ARGS", "IgnoreUnknown=1"));
    let run = plugin(&env, &config(&ztunnel.socket));
    assert!(run.success, "{run:?}");
    assert_eq!(run.json(), bridge_result());
    std::thread::sleep(Duration::from_millis(100));
    assert!(ztunnel.lines.lock().unwrap().is_empty(), "ztunnel was not asked");
}

#[test]
fn pods_of_excluded_namespaces_start_without_ztunnel() {
    let dir = TempDir::new("excluded");
    let socket = dir.path().join("ztunnel.sock");
    let weft_system = "K8S_POD_NAMESPACE=weft-system;K8S_POD_NAME=weft-controller-0";
    let mut env = runtime_env("ADD");
    env.retain(|(k, _)| *k != "CNI_ARGS");
    env.push(("CNI_ARGS", weft_system));
    // ztunnel is down: the controller's pod starts all the same (by default).
    let run = plugin(&env, &config(&socket));
    assert!(run.success, "{run:?}");
    assert_eq!(run.json(), bridge_result());
    assert!(run.stderr.contains("excluded"), "{run:?}");
    for command in ["DEL", "CHECK"] {
        env[0] = ("CNI_COMMAND", command);
        let run = plugin(&env, &config(&socket));
        assert!(run.success && !run.stderr.contains("ignored"), "{command}: {run:?}");
    }

    // A list given replaces the default: weft-system is then asked for like any namespace.
    let mut conf = config(&socket);
    conf["excludeNamespaces"] = json!(["kube-system"]);
    env[0] = ("CNI_COMMAND", "ADD");
    assert_cni_error(&plugin(&env, &conf), 11, "1.0.0");
}

#[test]
fn add_adds_the_version_to_a_previous_result_without_one() {
    let dir = TempDir::new("add-version");
    let ztunnel = FakeZtunnel::start(dir.path(), Answer::Reply { ok: true, message: "captured" });
    let mut conf = config(&ztunnel.socket);
    conf["prevResult"].as_object_mut().unwrap().remove("cniVersion");
    let run = plugin(&runtime_env("ADD"), &conf);
    assert!(run.success, "{run:?}");
    assert_eq!(run.json(), bridge_result(), "cniVersion as the configuration's, the rest unchanged");
}

#[test]
fn add_needs_a_previous_result() {
    let dir = TempDir::new("add-first");
    let ztunnel = FakeZtunnel::start(dir.path(), Answer::Reply { ok: true, message: "captured" });
    let mut conf = config(&ztunnel.socket);
    conf.as_object_mut().unwrap().remove("prevResult");
    let error = assert_cni_error(&plugin(&runtime_env("ADD"), &conf), 7, "1.0.0");
    assert!(error["msg"].as_str().unwrap().contains("chained"), "{error}");
}

#[test]
fn del_tells_ztunnel_the_pod_is_gone() {
    let dir = TempDir::new("del");
    let ztunnel = FakeZtunnel::start(dir.path(), Answer::Reply { ok: true, message: "released" });
    let run = plugin(&runtime_env("DEL"), &config(&ztunnel.socket));
    assert!(run.success, "{run:?}");
    assert_eq!(run.stdout, "", "DEL prints nothing");
    assert_eq!(ztunnel.requests(1), [json!({"op": "del", "namespace": "shop", "name": "web-0"})]);

    // The runtime may delete again, and without a network namespace (the spec makes
    // CNI_NETNS optional for DEL).
    let mut env = runtime_env("DEL");
    env.retain(|(k, _)| *k != "CNI_NETNS");
    assert!(plugin(&env, &config(&ztunnel.socket)).success);
    assert_eq!(ztunnel.lines(2).len(), 2);
}

#[test]
fn del_succeeds_when_ztunnel_is_down_or_refuses() {
    let dir = TempDir::new("del-down");
    let run = plugin(&runtime_env("DEL"), &config(&dir.path().join("ztunnel.sock")));
    assert!(run.success, "DEL is best-effort: {run:?}");
    assert_eq!(run.stdout, "");
    assert!(run.stderr.contains("ignored"), "and says so in the runtime's log: {run:?}");

    let ztunnel = FakeZtunnel::start(dir.path(), Answer::Reply { ok: false, message: "busy" });
    let run = plugin(&runtime_env("DEL"), &config(&ztunnel.socket));
    assert!(run.success, "{run:?}");
    assert!(run.stderr.contains("busy"), "{run:?}");
}

#[test]
fn check_fails_while_ztunnel_is_unreachable() {
    let dir = TempDir::new("check");
    let socket = dir.path().join("ztunnel.sock");
    let error = assert_cni_error(&plugin(&runtime_env("CHECK"), &config(&socket)), 11, "1.0.0");
    assert!(error["details"].as_str().unwrap().contains(socket.to_str().unwrap()), "{error}");

    let ztunnel = FakeZtunnel::start(dir.path(), Answer::Reply { ok: true, message: "captured" });
    let run = plugin(&runtime_env("CHECK"), &config(&ztunnel.socket));
    assert!(run.success, "{run:?}");
    assert_eq!(run.stdout, "", "CHECK prints nothing");
    assert_eq!(ztunnel.lines(1), [""], "a connection, no request: nothing to act on");

    // CHECK came in 0.4.0.
    let mut old = config(&ztunnel.socket);
    old["cniVersion"] = json!("0.3.1");
    assert_cni_error(&plugin(&runtime_env("CHECK"), &old), 1, "0.3.1");
}

#[test]
fn version_lists_the_supported_versions() {
    let run = run(weft_cni(), &[], &[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#);
    assert!(run.success, "{run:?}");
    assert_eq!(
        run.json(),
        json!({"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
}

#[test]
fn status_and_gc_succeed_without_ztunnel() {
    let dir = TempDir::new("status");
    let mut conf = config(&dir.path().join("ztunnel.sock"));
    conf["cniVersion"] = json!("1.1.0");
    conf.as_object_mut().unwrap().remove("prevResult");
    let env = [("CNI_COMMAND", "STATUS"), ("CNI_PATH", "/opt/cni/bin")];
    let status = plugin(&env, &conf);
    assert!(status.success && status.stdout.is_empty(), "{status:?}");
    conf["cni.dev/valid-attachments"] = json!([{"containerID": CONTAINER, "ifname": "eth0"}]);
    let gc = plugin(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")], &conf);
    assert!(gc.success && gc.stdout.is_empty(), "{gc:?}");
    // Both came in 1.1.0.
    conf["cniVersion"] = json!("1.0.0");
    assert_cni_error(&plugin(&env, &conf), 1, "1.0.0");
}

#[test]
fn malformed_configurations_are_cni_errors() {
    let dir = TempDir::new("conf");
    let socket = dir.path().join("ztunnel.sock");
    let env = runtime_env("ADD");

    // Not JSON: a decoding failure (6).
    let run = run(weft_cni(), &[], &env, r#"{"cniVersion": "1.0.0", "name": "#);
    assert_cni_error(&run, 6, "1.1.0");
    assert_cni_error(&plugin(&env, &json!(["not", "an", "object"])), 6, "1.1.0");

    // JSON, but an invalid configuration (7), named.
    let mut conf = config(&socket);
    conf["timeoutSeconds"] = json!("30s");
    let error = assert_cni_error(&plugin(&env, &conf), 7, "1.0.0");
    assert!(error["details"].as_str().unwrap().contains("timeoutSeconds"), "{error}");
    let mut conf = config(&socket);
    conf["nodeSocket"] = json!("ztunnel.sock");
    let error = assert_cni_error(&plugin(&env, &conf), 7, "1.0.0");
    assert!(error["details"].as_str().unwrap().contains("nodeSocket"), "{error}");
    let mut conf = config(&socket);
    conf["prevResult"]["ips"][0]["address"] = json!("10.244.1.5");
    let error = assert_cni_error(&plugin(&env, &conf), 7, "1.0.0");
    assert!(error["details"].as_str().unwrap().contains("prevResult.ips[0].address"), "{error}");
    let mut conf = config(&socket);
    conf.as_object_mut().unwrap().remove("name");
    assert_cni_error(&plugin(&env, &conf), 7, "1.0.0");

    // A version without chaining: incompatible (1).
    let mut conf = config(&socket);
    conf["cniVersion"] = json!("0.2.0");
    assert_cni_error(&plugin(&env, &conf), 1, "1.1.0");
}

#[test]
fn a_missing_or_unknown_command_is_an_environment_error() {
    let dir = TempDir::new("env");
    let conf = config(&dir.path().join("ztunnel.sock"));
    let mut env = runtime_env("ADD");
    env.retain(|(k, _)| *k != "CNI_COMMAND");
    let error = assert_cni_error(&plugin(&env, &conf), 4, "1.1.0");
    assert!(error["msg"].as_str().unwrap().contains("CNI_COMMAND"), "{error}");

    let error = assert_cni_error(&plugin(&runtime_env("RESTART"), &conf), 4, "1.1.0");
    assert!(error["msg"].as_str().unwrap().contains("RESTART"), "{error}");

    let mut env = runtime_env("ADD");
    env.retain(|(k, _)| !matches!(*k, "CNI_CONTAINERID" | "CNI_NETNS"));
    let error = assert_cni_error(&plugin(&env, &conf), 4, "1.1.0");
    let msg = error["msg"].as_str().unwrap();
    assert!(msg.contains("CNI_CONTAINERID") && msg.contains("CNI_NETNS"), "{error}");

    let mut env = runtime_env("ADD");
    env.retain(|(k, _)| *k != "CNI_ARGS");
    env.push(("CNI_ARGS", "K8S_POD_NAME=web-0"));
    let error = assert_cni_error(&plugin(&env, &conf), 4, "1.0.0");
    assert!(error["details"].as_str().unwrap().contains("K8S_POD_NAMESPACE"), "{error}");
}
