//! `weft-cni install` and `uninstall` as the ztunnel DaemonSet runs them, on temporary
//! directories standing for the host's /opt/cni/bin and /etc/cni/net.d.

mod support;

use std::os::unix::fs::PermissionsExt;

use serde_json::{Value, json};
use support::{Run, TempDir, run, weft_cni};

fn calico() -> Value {
    json!({
        "name": "k8s-pod-network",
        "cniVersion": "1.0.0",
        "plugins": [
            {"type": "calico", "datastore_type": "kubernetes", "ipam": {"type": "calico-ipam"},
             "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}},
            {"type": "bandwidth", "capabilities": {"bandwidth": true}},
            {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
        ],
    })
}

struct Host {
    _dir: TempDir,
    bin: std::path::PathBuf,
    conf: std::path::PathBuf,
}

impl Host {
    fn new(test: &str) -> Host {
        let dir = TempDir::new(test);
        let (bin, conf) = (dir.path().join("bin"), dir.path().join("net.d"));
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&conf).unwrap();
        Host { _dir: dir, bin, conf }
    }

    fn write(&self, name: &str, value: &Value) {
        std::fs::write(self.conf.join(name), serde_json::to_string_pretty(value).unwrap()).unwrap();
    }

    fn read(&self, name: &str) -> Value {
        serde_json::from_slice(&std::fs::read(self.conf.join(name)).unwrap()).unwrap()
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(&self.conf).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }

    fn weft_cni(&self, command: &str, extra: &[&str]) -> Run {
        let mut args = vec![command, "--cni-bin-dir", self.bin.to_str().unwrap(), "--cni-conf-dir"];
        args.push(self.conf.to_str().unwrap());
        args.extend(extra);
        run(weft_cni(), &args, &[], "")
    }
}

fn plugin_types(conf: &Value) -> Vec<&str> {
    conf["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect()
}

#[test]
fn install_appends_to_the_runtime_configuration_and_uninstall_removes_it() {
    let host = Host::new("inst");
    host.write("10-calico.conflist", &calico());
    host.write("20-other.conflist", &json!({"cniVersion": "1.0.0", "name": "other", "plugins": [{"type": "ptp"}]}));
    host.write("99-loopback.conf", &json!({"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}));
    std::fs::set_permissions(host.conf.join("10-calico.conflist"), std::fs::Permissions::from_mode(0o600)).unwrap();

    let run = host.weft_cni("install", &["--node-socket", "/run/weft/ztunnel.sock"]);
    assert!(run.success, "{run:?}");

    // The binary: a byte-for-byte, executable copy that works as the plugin.
    let installed = host.bin.join("weft-cni");
    assert_eq!(std::fs::read(&installed).unwrap(), std::fs::read(weft_cni()).unwrap());
    assert_eq!(std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777, 0o755);
    let version = support::run(&installed, &[], &[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.1.0"}"#);
    assert!(version.success && version.json()["supportedVersions"].is_array(), "{version:?}");

    // The first configuration, and only it, ends with the entry; nothing else changed.
    let mut expected = calico();
    expected["plugins"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "weft-cni", "nodeSocket": "/run/weft/ztunnel.sock"}));
    assert_eq!(host.read("10-calico.conflist"), expected);
    let mode = std::fs::metadata(host.conf.join("10-calico.conflist")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the file keeps its mode");
    assert_eq!(plugin_types(&host.read("20-other.conflist")), ["ptp"]);
    assert_eq!(host.names(), ["10-calico.conflist", "20-other.conflist", "99-loopback.conf"], "no file left behind");

    // Again: nothing changes, not even the bytes.
    let before = std::fs::read(host.conf.join("10-calico.conflist")).unwrap();
    let again = host.weft_cni("install", &["--node-socket", "/run/weft/ztunnel.sock"]);
    assert!(again.success && again.stdout.contains("unchanged"), "{again:?}");
    assert_eq!(std::fs::read(host.conf.join("10-calico.conflist")).unwrap(), before);

    // Other settings replace the entry.
    let other =
        host.weft_cni("install", &["--timeout-seconds", "20", "--exclude-namespaces", "kube-system,mesh-system"]);
    assert!(other.success, "{other:?}");
    let conf = host.read("10-calico.conflist");
    assert_eq!(plugin_types(&conf), ["calico", "bandwidth", "portmap", "weft-cni"]);
    assert_eq!(
        conf["plugins"][3],
        json!({"type": "weft-cni", "timeoutSeconds": 20, "excludeNamespaces": ["kube-system", "mesh-system"]})
    );

    let run = host.weft_cni("uninstall", &[]);
    assert!(run.success, "{run:?}");
    assert_eq!(host.read("10-calico.conflist"), calico());
    assert!(!installed.exists());
    // Uninstalling twice is fine.
    assert!(host.weft_cni("uninstall", &[]).success);
}

#[test]
fn a_single_plugin_configuration_becomes_a_list() {
    let host = Host::new("conv");
    let bridge = json!({
        "cniVersion": "0.4.0", "name": "mynet", "type": "bridge", "bridge": "cni0", "isGateway": true,
        "ipMasq": true, "ipam": {"type": "host-local", "subnet": "10.244.1.0/24"},
    });
    host.write("10-bridge.conf", &bridge);
    let run = host.weft_cni("install", &[]);
    assert!(run.success, "{run:?}");
    assert_eq!(host.names(), ["10-bridge.conflist"], "the list replaces the .conf, which would be read first");
    assert_eq!(
        host.read("10-bridge.conflist"),
        json!({"cniVersion": "0.4.0", "name": "mynet", "plugins": [bridge, {"type": "weft-cni"}]})
    );
    assert!(host.weft_cni("install", &[]).stdout.contains("unchanged"));

    assert!(host.weft_cni("uninstall", &[]).success);
    assert_eq!(host.read("10-bridge.conflist"), json!({"cniVersion": "0.4.0", "name": "mynet", "plugins": [bridge]}));
}

#[test]
fn install_waits_for_the_network_plugin_configuration() {
    let host = Host::new("empty");
    std::fs::write(host.conf.join("README"), "not a configuration").unwrap();
    let run = host.weft_cni("install", &[]);
    assert!(!run.success, "{run:?}");
    assert!(run.stderr.contains(host.conf.to_str().unwrap()) && run.stderr.contains("not written one yet"), "{run:?}");
}

#[test]
fn install_refuses_what_would_break_every_pod() {
    let host = Host::new("refuse");
    host.write("10-calico.conflist", &calico());
    let run = host.weft_cni("install", &["--node-socket", "ztunnel.sock"]);
    assert!(!run.success && run.stderr.contains("absolute"), "{run:?}");
    assert!(!host.bin.join("weft-cni").exists(), "nothing installed");
    assert_eq!(host.read("10-calico.conflist"), calico());

    host.write("05-old.conf", &json!({"cniVersion": "0.2.0", "name": "old", "type": "bridge"}));
    let run = host.weft_cni("install", &[]);
    assert!(!run.success && run.stderr.contains("0.2.0"), "{run:?}");
    assert_eq!(host.names(), ["05-old.conf", "10-calico.conflist"], "left as they were");
    assert_eq!(host.read("10-calico.conflist"), calico());
}
