//! A mesh on a lab: the `lab` crate's nodes and pods, plus what a mesh needs on them — the
//! controller (the real binary, `weft controller run`, in a pod of its own on node 0) reading
//! a directory of Kubernetes objects that the lab writes as the cluster's state, one ztunnel
//! per node (`weft ztunnel`, in the node's namespace) programmed by it, and apps in pods
//! (`weft app ...`). [`Plane::LocalFile`] instead runs ztunnels from one model file, without
//! a controller (the development mode).
//!
//! Tests, benchmarks and `weft demo` build their scenarios with it. Every client it opens runs
//! inside a lab namespace; nothing is ever sent from the root namespace to a lab address.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lab::addresses::IpStack;
use lab::{Lab, LabProcess, Pod};

/// How long ztunnel may take to start and enroll its pods in the lab.
const STARTUP: Duration = Duration::from_secs(20);

/// How often ztunnels re-read the config file, and the controller its directory, in the lab:
/// fast, so tests that edit it wait little.
const RELOAD: &str = "200ms";
const POLL: &str = "100ms";

/// The controller's ports inside its pod.
pub const CONTROLLER_API_PORT: u16 = 15012;
pub const CONTROLLER_ADMIN_PORT: u16 = 15000;
pub const CONTROLLER_METRICS_PORT: u16 = 15020;

/// Where the cluster view comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    /// The controller, reading Kubernetes objects the lab writes.
    Controller,
    /// One model file every ztunnel reads; ztunnels hold the CA.
    LocalFile,
}

/// A workload in the mesh config.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub node: usize,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub enrolled: bool,
    pub strict: bool,
    /// Named container ports (`spec.containers[0].ports`), which Services' named
    /// `targetPort`s resolve to.
    pub container_ports: Vec<(String, u16)>,
}

impl PodSpec {
    /// A pod in `namespace` whose service account is its name and label `app=<app>`.
    pub fn new(node: usize, namespace: &str, name: &str, app: &str) -> PodSpec {
        PodSpec {
            node,
            namespace: namespace.into(),
            name: name.into(),
            service_account: name.into(),
            labels: BTreeMap::from([("app".to_owned(), app.to_owned())]),
            enrolled: true,
            strict: false,
            container_ports: Vec::new(),
        }
    }

    pub fn not_enrolled(mut self) -> Self {
        self.enrolled = false;
        self
    }

    pub fn strict(mut self) -> Self {
        self.strict = true;
        self
    }

    pub fn identity(&self) -> String {
        format!("spiffe://cluster.local/ns/{}/sa/{}", self.namespace, self.service_account)
    }
}

/// A service in the mesh config.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    /// Its VIP in the IPv4 plan (`lab::addresses::service_vip`). In a lab with IPv6 the
    /// service gets the VIP of the same index in the IPv6 range too (dual-stack) or instead
    /// (IPv6-only): [`MeshLab::service_vips`].
    pub vip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    pub app: String,
}

pub struct MeshLab {
    pub lab: Lab,
    weft: PathBuf,
    dir: PathBuf,
    plane: Plane,
    pods: Vec<(PodSpec, Pod)>,
    services: Vec<ServiceSpec>,
    policies: Vec<String>,
    /// Namespaces whose `weft.dev/mesh` label is not `enabled` (every other namespace of a
    /// pod is enrolled).
    unlabelled: std::collections::BTreeSet<String>,
    ztunnels: Vec<Option<LabProcess>>,
    /// The controller's pod (node 0) and process, with [`Plane::Controller`].
    controller_pod: Option<Pod>,
    controller: Option<LabProcess>,
    /// Whether the controller was ever started: ztunnels start it the first time only, so a
    /// test that stops it keeps it down.
    controller_started: bool,
    /// The CA files the controller signs with, when not the lab's (see
    /// [`MeshLab::set_controller_ca`]).
    controller_ca: Option<(PathBuf, PathBuf)>,
    /// Processes kept running for the lab's lifetime (see [`MeshLab::keep`]).
    kept: Vec<LabProcess>,
    /// Further Kubernetes objects, by file name (see [`MeshLab::put_objects`]).
    objects: BTreeMap<String, String>,
}

impl MeshLab {
    /// Whether a mesh lab can run on this machine (root, the `nft` program). When it cannot,
    /// says why: a loud failure under `CI=true`, `SKIPPED` otherwise (`lab::skip_or_fail`).
    pub fn ready_here() -> bool {
        if let Err(e) = Lab::require_root() {
            lab::skip_or_fail(e);
            return false;
        }
        if Command::new("nft").arg("--version").output().is_err() {
            lab::skip_or_fail("the `nft` program (Debian package nftables) is not installed");
            return false;
        }
        true
    }

    /// A lab of `nodes` nodes programmed by a controller, with a fresh CA; `weft` is the path
    /// of the `weft` binary.
    pub fn new(test_name: &str, nodes: usize, weft: &Path) -> anyhow::Result<MeshLab> {
        MeshLab::with_plane(test_name, nodes, weft, Plane::Controller)
    }

    /// A lab whose ztunnels run from a local model file, without a controller.
    pub fn with_local_file(test_name: &str, nodes: usize, weft: &Path) -> anyhow::Result<MeshLab> {
        MeshLab::with_plane(test_name, nodes, weft, Plane::LocalFile)
    }

    /// A lab programmed by a controller whose nodes and pods have the address families of
    /// `stack`: pods' objects list each address (`status.podIPs`), services one VIP per family
    /// (`spec.clusterIPs`, [`MeshLab::service_vips`]).
    pub fn with_stack(test_name: &str, nodes: usize, weft: &Path, stack: IpStack) -> anyhow::Result<MeshLab> {
        MeshLab::build(Lab::with_stack(test_name, nodes, stack)?, weft, Plane::Controller)
    }

    fn with_plane(test_name: &str, nodes: usize, weft: &Path, plane: Plane) -> anyhow::Result<MeshLab> {
        MeshLab::build(Lab::new(test_name, nodes)?, weft, plane)
    }

    fn build(lab: Lab, weft: &Path, plane: Plane) -> anyhow::Result<MeshLab> {
        let nodes = lab.nodes().len();
        let dir = lab.log_dir().join("mesh");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca = hbone::ca::Ca::new_root("weft lab root")?;
        let (cert, key) = ca.to_pem();
        std::fs::write(dir.join("ca.crt"), cert)?;
        std::fs::write(dir.join("ca.key"), key)?;
        for i in 0..nodes {
            std::fs::create_dir_all(dir.join(format!("proc-node{i}")))?;
        }
        std::fs::create_dir_all(dir.join("cluster"))?;
        let controller_pod = match plane {
            Plane::Controller => Some(lab.add_pod(0, "weft-controller")?),
            Plane::LocalFile => None,
        };
        let mesh = MeshLab {
            lab,
            weft: weft.to_owned(),
            dir,
            plane,
            pods: Vec::new(),
            services: Vec::new(),
            policies: Vec::new(),
            unlabelled: Default::default(),
            ztunnels: (0..nodes).map(|_| None).collect(),
            controller_pod,
            controller: None,
            controller_started: false,
            controller_ca: None,
            kept: Vec::new(),
            objects: BTreeMap::new(),
        };
        mesh.write_config()?;
        Ok(mesh)
    }

    /// The name ztunnel of node `i` is started with.
    pub fn node_name(i: usize) -> String {
        format!("node-{i}")
    }

    /// Creates the pod's namespace and adds its workload to the config (not yet written).
    /// Its node's ztunnel finds it by scanning its view of /proc, as it finds pods that were
    /// running before it started.
    pub fn add_pod(&mut self, spec: PodSpec) -> anyhow::Result<Pod> {
        let pod = self.lab.add_pod(spec.node, &spec.name)?;
        self.link_proc(spec.node, &pod)?;
        self.pods.push((spec, pod.clone()));
        Ok(pod)
    }

    /// Adds `pod` to node `node`'s view of /proc.
    fn link_proc(&self, node: usize, pod: &Pod) -> anyhow::Result<()> {
        // The node's view of /proc: on a real node, /proc shows that node's processes only.
        // All lab nodes (and parallel labs) share this machine's /proc, so each ztunnel gets a
        // directory holding just its node's pods, `<pid>/ns/net` → the pod's pause process.
        let entry = self.proc_root(node).join(pod.pause_pid().to_string()).join("ns");
        std::fs::create_dir_all(&entry).with_context(|| format!("creating {}", entry.display()))?;
        std::os::unix::fs::symlink(format!("/proc/{}/ns/net", pod.pause_pid()), entry.join("net"))
            .with_context(|| format!("linking {}", entry.display()))?;
        Ok(())
    }

    /// Creates a pod as a container runtime with Weft's CNI plugin does: its namespace (with
    /// the pause process), its object written for the controller, then its network namespace
    /// handed to its node's ztunnel, waiting for the answer: through the real `weft-cni` when
    /// it was built beside `weft` ([`MeshLab::cni_plugin`]), else over the node socket
    /// directly. `Ok` means
    /// the pod may start its apps (captured, or not part of the mesh); an error means it must
    /// not (fail closed): ztunnel is unreachable or could not capture it.
    ///
    /// The pod is not added to the node's view of /proc: only the hand-over can capture it.
    pub fn create_pod(&mut self, spec: PodSpec) -> anyhow::Result<Pod> {
        let node = spec.node;
        let (namespace, name) = (spec.namespace.clone(), spec.name.clone());
        let pod = self.lab.add_pod(spec.node, &spec.name)?;
        self.pods.push((spec, pod.clone()));
        self.write_config()?;
        match self.cni_plugin() {
            Some(plugin) => self.cni_add(&plugin, node, &namespace, &name, &pod)?,
            None => {
                let request = meshapi::node::NodeRequest::Add(meshapi::node::PodRef {
                    namespace,
                    name: name.clone(),
                    netns: format!("/proc/{}/ns/net", pod.pause_pid()),
                    ips: pod.ips(),
                });
                let answer = node_socket_call(&self.node_socket(node), &request).with_context(|| {
                    format!("pod {name} must not start: handing it to node-{node}'s ztunnel failed")
                })?;
                if !answer.ok {
                    bail!("pod {name} must not start: node-{node}'s ztunnel refused it: {}", answer.message);
                }
            }
        }
        Ok(pod)
    }

    /// The `weft-cni` plugin built next to the `weft` binary, if there is one (a workspace
    /// build makes both): [`MeshLab::create_pod`] then runs it as a container runtime does.
    pub fn cni_plugin(&self) -> Option<PathBuf> {
        let plugin = self.weft.with_file_name("weft-cni");
        plugin.is_file().then_some(plugin)
    }

    /// Runs `plugin` ADD for a pod as a container runtime does: the CNI environment, the
    /// configuration on stdin with the interface plugin's result as `prevResult`.
    fn cni_add(&self, plugin: &Path, node: usize, namespace: &str, name: &str, pod: &Pod) -> anyhow::Result<()> {
        use std::process::Stdio;
        let config = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "weft-lab",
            "type": "weft-cni",
            "nodeSocket": self.node_socket(node),
            "excludeNamespaces": [],
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": format!("/proc/{}/ns/net", pod.pause_pid())}],
                "ips": pod.networks().iter().map(|(ip, prefix_len, gateway)| serde_json::json!(
                    {"address": format!("{ip}/{prefix_len}"), "gateway": gateway.to_string(), "interface": 0}
                )).collect::<Vec<_>>(),
            },
        });
        let mut child = Command::new(plugin)
            .env_clear()
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", format!("lab-{}", pod.pause_pid()))
            .env("CNI_NETNS", format!("/proc/{}/ns/net", pod.pause_pid()))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"))
            .env("CNI_PATH", plugin.parent().unwrap_or(Path::new("/")))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", plugin.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(config.to_string().as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "pod {name} must not start: weft-cni ADD failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Node `i`'s node socket, where the runtime hands pods to its ztunnel.
    pub fn node_socket(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{}.sock", Self::node_name(i)))
    }

    /// The /proc view of node `node` (see [`MeshLab::add_pod`]).
    pub fn proc_root(&self, node: usize) -> PathBuf {
        self.dir.join(format!("proc-node{node}"))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        &self.spec_and_pod(name).1
    }

    pub fn spec(&self, name: &str) -> &PodSpec {
        &self.spec_and_pod(name).0
    }

    fn spec_and_pod(&self, name: &str) -> &(PodSpec, Pod) {
        self.pods.iter().find(|(s, _)| s.name == name).unwrap_or_else(|| panic!("no pod named {name}"))
    }

    /// Labels namespace `ns` `weft.dev/mesh=enabled` (or removes the label) in the config (not
    /// yet written). Every namespace is labelled unless told otherwise.
    pub fn set_namespace_enrolled(&mut self, ns: &str, enrolled: bool) {
        if enrolled {
            self.unlabelled.remove(ns);
        } else {
            self.unlabelled.insert(ns.to_owned());
        }
    }

    /// Changes a pod's enrollment in the config (not yet written): with a controller, the
    /// pod's opt-out label `weft.dev/mesh=disabled`.
    pub fn set_enrolled(&mut self, name: &str, enrolled: bool) {
        if let Some((s, _)) = self.pods.iter_mut().find(|(s, _)| s.name == name) {
            s.enrolled = enrolled;
        }
    }

    pub fn add_service(&mut self, service: ServiceSpec) {
        self.services.push(service);
    }

    /// The VIPs of service `<namespace>/<name>` in this lab, one per family (IPv4 first):
    /// its [`ServiceSpec::vip`], that VIP's IPv6 counterpart, or both
    /// (`lab::addresses::service_vips`). Empty for a service the lab does not have.
    pub fn service_vips(&self, namespace: &str, name: &str) -> Vec<IpAddr> {
        self.services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
            .map(|s| self.vips_of(s))
            .unwrap_or_default()
    }

    fn vips_of(&self, service: &ServiceSpec) -> Vec<IpAddr> {
        lab::addresses::service_vips(self.lab.stack(), service.vip)
    }

    /// Puts further Kubernetes objects (Services with their own selectors and labels,
    /// Gateways, HTTPRoutes) in the controller's directory as file `name`, replacing what that
    /// file held; written with the next [`MeshLab::write_config`]. An empty list removes the
    /// file.
    pub fn put_objects(&mut self, name: &str, objects: &[serde_json::Value]) -> anyhow::Result<()> {
        let name = format!("{name}.yaml");
        if objects.is_empty() {
            self.objects.remove(&name);
        } else {
            self.objects.insert(name, join_documents(objects)?);
        }
        Ok(())
    }

    /// The credential of service account `<namespace>/<name>` (a waypoint's), made with the
    /// controller's tooling on first use.
    pub fn service_account_token_file(&self, namespace: &str, name: &str) -> anyhow::Result<PathBuf> {
        self.token_file(&format!("sa-{namespace}-{name}.token"), &["--service-account", &format!("{namespace}/{name}")])
    }

    /// Starts `weft waypoint` in `pod` for the Gateway `<namespace of the pod>/<gateway>`
    /// (service account: the Gateway's name), and waits until it serves.
    pub fn start_waypoint(&self, pod: &str, gateway: &str) -> anyhow::Result<LabProcess> {
        let namespace = self.spec(pod).namespace.clone();
        let mut cmd = Command::new(&self.weft);
        cmd.arg("waypoint")
            .arg("--controller")
            .arg(self.controller_addr().to_string())
            .arg("--controller-ca")
            .arg(self.dir.join("ca.crt"))
            .arg("--token-file")
            .arg(self.service_account_token_file(&namespace, gateway)?)
            .args(["--namespace", &namespace, "--name", gateway])
            .env("WEFT_LOG", std::env::var("WEFT_LAB_WAYPOINT_LOG").unwrap_or_else(|_| "info".into()));
        if self.lab.stack().has_ipv6() {
            // The waypoint listens on IPv4 by default; `[::]` takes both families.
            for (flag, port) in [("--hbone-addr", 15008), ("--metrics-addr", 15020), ("--readiness-addr", 15021)] {
                cmd.arg(flag).arg(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).to_string());
            }
        }
        let process = self.pod(pod).netns().spawn(cmd)?;
        process.wait_for_log("waypoint ready", STARTUP)?;
        Ok(process)
    }

    /// `n` GETs of `/` from `pod` to `to` on one keep-alive connection, with `host` and
    /// `headers`: the bodies of `200` answers and `status <code>` for the others, by count.
    pub fn http_tally(
        &self,
        pod: &str,
        to: SocketAddr,
        host: &str,
        n: usize,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<BTreeMap<String, usize>> {
        let stream = self.connect(pod, to)?;
        let mut client = HttpClient::new(stream, host);
        let mut counts = BTreeMap::new();
        for _ in 0..n {
            let (status, body) = client.get("/", headers)?;
            let key = if status == 200 { body } else { format!("status {status}") };
            *counts.entry(key).or_insert(0) += 1;
        }
        Ok(counts)
    }

    /// Starts `weft app web` in `pod`: HTTP/1.1 and HTTP/2 answering `name` (and failing
    /// `fail_percent` of requests with 503), printing each request it sees.
    pub fn start_web(&self, pod: &str, port: u16, name: &str, fail_percent: u32) -> anyhow::Result<LabProcess> {
        let mut cmd = Command::new(&self.weft);
        cmd.args(["app", "web", "--port", &port.to_string(), "--name", name, "--log-requests", "--fail-percent"])
            .arg(fail_percent.to_string());
        let process = self.pod(pod).netns().spawn(cmd)?;
        process.wait_for_log("listening on", STARTUP)?;
        Ok(process)
    }

    /// Adds an authorization policy, as one YAML flow mapping (a line of the file).
    pub fn add_policy(&mut self, yaml: &str) {
        self.policies.push(yaml.to_owned());
    }

    pub fn clear_policies(&mut self) {
        self.policies.clear();
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("cluster.yaml")
    }

    /// The model file every ztunnel reads without a controller.
    pub fn config_yaml(&self) -> String {
        let mut y = String::from("workloads:\n");
        for (s, pod) in &self.pods {
            let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            let _ = writeln!(
                y,
                "  - {{name: {}, namespace: {}, node: {}, addresses: [{}], serviceAccount: {}, labels: {{{}}}, enrolled: {}, mtls: {}}}",
                s.name,
                s.namespace,
                Self::node_name(s.node),
                pod.ips().iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                s.service_account,
                labels.join(", "),
                s.enrolled && !self.unlabelled.contains(&s.namespace),
                if s.strict { "STRICT" } else { "PERMISSIVE" }
            );
        }
        y.push_str("services:\n");
        for s in &self.services {
            let _ = writeln!(
                y,
                "  - {{name: {}, namespace: {}, vips: [{}], ports: [{{port: {}, targetPort: {}}}], selector: {{app: {}}}}}",
                s.name,
                s.namespace,
                self.vips_of(s).iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                s.port,
                s.target_port,
                s.app
            );
        }
        y.push_str("authorizations:\n");
        for p in &self.policies {
            let _ = writeln!(y, "  - {p}");
        }
        y
    }

    /// The directory of Kubernetes objects the controller reads.
    pub fn cluster_dir(&self) -> PathBuf {
        self.dir.join("cluster")
    }

    /// The cluster as Kubernetes objects, by file name: what a cluster's API server would
    /// hold for this lab (namespaces with their mesh labels, pods with their node and IP,
    /// services, authorization policies).
    pub fn cluster_objects(&self) -> anyhow::Result<BTreeMap<String, String>> {
        use serde_json::json;
        let mut files = BTreeMap::new();
        let mut namespaces = std::collections::BTreeSet::new();
        for (s, pod) in &self.pods {
            namespaces.insert(s.namespace.clone());
            let mut labels: serde_json::Map<String, serde_json::Value> =
                s.labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            if !s.enrolled {
                labels.insert("weft.dev/mesh".into(), json!("disabled"));
            }
            if s.strict {
                labels.insert("weft.dev/mtls".into(), json!("STRICT"));
            }
            let mut container = json!({"name": "app", "image": "weft-lab-app"});
            if !s.container_ports.is_empty() {
                container["ports"] = s
                    .container_ports
                    .iter()
                    .map(|(name, port)| json!({"name": name, "containerPort": port, "protocol": "TCP"}))
                    .collect();
            }
            let object = json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": s.name, "namespace": s.namespace, "labels": labels},
                "spec": {"nodeName": Self::node_name(s.node), "serviceAccountName": s.service_account,
                         "containers": [container]},
                "status": {"phase": "Running", "podIP": pod.primary_ip().to_string(),
                           "podIPs": pod.ips().iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>()},
            });
            files.insert(format!("pod-{}-{}.yaml", s.namespace, s.name), serde_json::to_string_pretty(&object)?);
        }
        // Each namespace once: a namespace defined twice is a rejection for the controller.
        namespaces.extend(self.services.iter().map(|s| s.namespace.clone()));
        let mut docs = Vec::new();
        for ns in &namespaces {
            let labels = if self.unlabelled.contains(ns) { json!({}) } else { json!({"weft.dev/mesh": "enabled"}) };
            docs.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}));
        }
        files.insert("namespaces.yaml".into(), join_documents(&docs)?);
        let services: Vec<_> = self
            .services
            .iter()
            .map(|s| {
                let vips = self.vips_of(s);
                json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": s.name, "namespace": s.namespace},
                    "spec": {"clusterIP": vips.first().map(ToString::to_string),
                             "clusterIPs": vips.iter().map(ToString::to_string).collect::<Vec<_>>(),
                             "ports": [{"port": s.port, "targetPort": s.target_port}],
                             "selector": {"app": s.app}},
                })
            })
            .collect();
        files.insert("services.yaml".into(), join_documents(&services)?);
        let policies =
            self.policies.iter().map(|p| policy_object(p)).collect::<anyhow::Result<Vec<serde_json::Value>>>()?;
        files.insert("policies.yaml".into(), join_documents(&policies)?);
        for (name, text) in &self.objects {
            files.insert(name.clone(), text.clone());
        }
        Ok(files)
    }

    /// Writes the config atomically (proxies and the controller never see half a file): the
    /// model file, or the controller's directory (files no longer part of the cluster are
    /// removed).
    pub fn write_config(&self) -> anyhow::Result<()> {
        match self.plane {
            Plane::LocalFile => self.write_raw_config(&self.config_yaml()),
            Plane::Controller => {
                let dir = self.cluster_dir();
                let files = self.cluster_objects()?;
                for (name, text) in &files {
                    let path = dir.join(name);
                    if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
                        continue;
                    }
                    let tmp = dir.join(format!(".{name}.tmp"));
                    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
                    std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
                }
                for entry in std::fs::read_dir(&dir)? {
                    let entry = entry?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.ends_with(".yaml") && !files.contains_key(&name) {
                        std::fs::remove_file(entry.path())?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Writes arbitrary text as the config file (for bad-input tests).
    pub fn write_raw_config(&self, text: &str) -> anyhow::Result<()> {
        let tmp = self.dir.join("cluster.yaml.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, self.config_path()).context("replacing the config file")?;
        Ok(())
    }

    /// Starts the controller (if this lab has one and it was never started) and one ztunnel
    /// per node, and waits until each is ready.
    pub fn start_ztunnels(&mut self) -> anyhow::Result<()> {
        self.write_config()?;
        if self.plane == Plane::Controller && !self.controller_started {
            self.start_controller(&[])?;
        }
        for i in 0..self.ztunnels.len() {
            self.start_ztunnel(i, &[])?;
        }
        Ok(())
    }

    /// The controller's state directory (its node-token key; the root is the lab's CA,
    /// plugged in).
    pub fn controller_state_dir(&self) -> PathBuf {
        self.dir.join("controller")
    }

    /// The controller's pod (node 0), with [`Plane::Controller`].
    pub fn controller_pod(&self) -> &Pod {
        self.controller_pod.as_ref().expect("this lab has a controller")
    }

    /// The controller's API address.
    pub fn controller_addr(&self) -> SocketAddr {
        SocketAddr::new(self.controller_pod().primary_ip(), CONTROLLER_API_PORT)
    }

    /// The lab's CA: its certificate and private key (PEM). The controller signs with it
    /// (plugged in), and ztunnels verify the controller's API certificate with it.
    pub fn ca_files(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("ca.crt"), self.dir.join("ca.key"))
    }

    /// Makes the controller sign with the CA in `cert` and `key` (PEM) instead of the lab's,
    /// from its next start: files a test may rewrite while the controller runs (a rotation),
    /// leaving the lab's own CA files as they are.
    pub fn set_controller_ca(&mut self, cert: &Path, key: &Path) {
        self.controller_ca = Some((cert.to_owned(), key.to_owned()));
    }

    /// Starts the controller in its pod with extra arguments and waits until it serves.
    pub fn start_controller(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        let pod_ip = self.controller_pod().primary_ip().to_string();
        let (ca_cert, ca_key) = self.controller_ca.clone().unwrap_or_else(|| self.ca_files());
        let mut cmd = Command::new(&self.weft);
        cmd.args(["controller", "run", "--source-dir"])
            .arg(self.cluster_dir())
            .arg("--state-dir")
            .arg(self.controller_state_dir())
            .arg("--ca-cert")
            .arg(ca_cert)
            .arg("--ca-key")
            .arg(ca_key)
            .args(["--server-name", &pod_ip, "--poll-interval", POLL]);
        if self.controller_pod().primary_ip().is_ipv6() {
            // The API listens on IPv4 by default; an IPv6-only pod has no IPv4 address.
            cmd.arg("--api-addr")
                .arg(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, CONTROLLER_API_PORT)).to_string());
        }
        cmd.args(extra).env("WEFT_LOG", std::env::var("WEFT_LAB_CONTROLLER_LOG").unwrap_or_else(|_| "info".into()));
        let process = self.controller_pod().netns().spawn(cmd)?;
        process.wait_for_log("controller ready", STARTUP)?;
        self.controller = Some(process);
        self.controller_started = true;
        Ok(())
    }

    pub fn controller(&self) -> &LabProcess {
        self.controller.as_ref().expect("controller started")
    }

    pub fn take_controller(&mut self) -> Option<LabProcess> {
        self.controller.take()
    }

    /// The credential of node `i` (made with the controller's tooling on first use).
    pub fn node_token_file(&self, i: usize) -> anyhow::Result<PathBuf> {
        self.token_file(&format!("{}.token", Self::node_name(i)), &["--node", &Self::node_name(i)])
    }

    /// A token the controller's tooling makes (`weft controller token <holder>`), kept in
    /// `file` of the lab's directory once made.
    fn token_file(&self, file: &str, holder: &[&str]) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(file);
        if !path.exists() {
            let out = Command::new(&self.weft)
                .args(["controller", "token"])
                .args(holder)
                .arg("--state-dir")
                .arg(self.controller_state_dir())
                .output()
                .context("running weft controller token")?;
            if !out.status.success() {
                bail!("weft controller token: {}", String::from_utf8_lossy(&out.stderr));
            }
            std::fs::write(&path, &out.stdout)?;
        }
        Ok(path)
    }

    /// An HTTP GET to the controller's admin (`/status`, `/resources`) or metrics server, from
    /// inside its pod; the response body.
    pub fn controller_http(&self, port: u16, path: &str) -> anyhow::Result<String> {
        let path = path.to_owned();
        self.controller_pod().netns().run(move || http_get(SocketAddr::from(([127, 0, 0, 1], port)), &path))?
    }

    /// Node `i`'s ztunnel state directory.
    pub fn ztunnel_state_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("ztunnel-{}", Self::node_name(i)))
    }

    /// Starts node `i`'s ztunnel with extra arguments (and the controller first, if this lab
    /// has one and it was never started) and waits until it is ready.
    pub fn start_ztunnel(&mut self, i: usize, extra: &[&str]) -> anyhow::Result<()> {
        let process = self.spawn_ztunnel(i, extra)?;
        process.wait_for_log("ztunnel ready", STARTUP)?;
        self.ztunnels[i] = Some(process);
        Ok(())
    }

    /// Upgrades node `i`'s ztunnel as a rollout would (ARCHITECTURE §4.9): starts a second
    /// ztunnel for the node, with extra arguments, which takes the node over from the running
    /// one through the handoff socket, and waits until it serves. It becomes node `i`'s
    /// ztunnel; the previous one, now draining its connections, is returned.
    pub fn upgrade_ztunnel(&mut self, i: usize, extra: &[&str]) -> anyhow::Result<LabProcess> {
        let process = self.spawn_ztunnel(i, extra)?;
        process.wait_for_log("took the node over", STARTUP)?;
        process.wait_for_log("ztunnel ready", STARTUP)?;
        let old = self.ztunnels[i].replace(process).context("node's ztunnel not started")?;
        Ok(old)
    }

    /// Spawns a ztunnel for node `i` with extra arguments (and the controller first, if this
    /// lab has one and it was never started), without waiting for it: while another runs for
    /// the node, it takes the node over from that one.
    pub fn spawn_ztunnel(&mut self, i: usize, extra: &[&str]) -> anyhow::Result<LabProcess> {
        if self.plane == Plane::Controller && !self.controller_started {
            self.write_config()?;
            self.start_controller(&[])?;
        }
        let mut cmd = self.ztunnel_command();
        cmd.args(["--node", &Self::node_name(i)]);
        match self.plane {
            Plane::LocalFile => {
                cmd.arg("--local-config")
                    .arg(self.config_path())
                    .arg("--ca-cert")
                    .arg(self.dir.join("ca.crt"))
                    .arg("--ca-key")
                    .arg(self.dir.join("ca.key"));
            }
            Plane::Controller => {
                cmd.arg("--controller")
                    .arg(self.controller_addr().to_string())
                    .arg("--controller-ca")
                    .arg(self.dir.join("ca.crt"))
                    .arg("--node-token-file")
                    .arg(self.node_token_file(i)?)
                    .arg("--state-dir")
                    .arg(self.ztunnel_state_dir(i));
            }
        }
        cmd.arg("--node-socket")
            .arg(self.node_socket(i))
            .args(["--reload-interval", RELOAD])
            .arg("--proc-root")
            .arg(self.proc_root(i))
            .args(extra)
            .env("WEFT_LOG", std::env::var("WEFT_LAB_ZTUNNEL_LOG").unwrap_or_else(|_| "info".into()));
        Ok(self.lab.nodes()[i].netns().spawn(cmd)?)
    }

    /// Keeps a process (an app) running until the lab is dropped.
    pub fn keep(&mut self, process: LabProcess) {
        self.kept.push(process);
    }

    /// The ztunnel command the lab runs: `WEFT_LAB_ZTUNNEL` when set (a ztunnel binary to run
    /// instead, e.g. a heap-profiling build); else the dedicated `ztunnel` binary when it was
    /// built next to `weft` and is at least as new (smaller, so its memory figures are the
    /// ones a node would see); else `weft ztunnel`.
    pub fn ztunnel_program(&self) -> (PathBuf, Option<&'static str>) {
        if let Some(path) = std::env::var_os("WEFT_LAB_ZTUNNEL") {
            return (PathBuf::from(path), None);
        }
        let dedicated = self.weft.with_file_name("ztunnel");
        let fresh = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        if dedicated.is_file() && fresh(&dedicated) >= fresh(&self.weft) {
            return (dedicated, None);
        }
        (self.weft.clone(), Some("ztunnel"))
    }

    fn ztunnel_command(&self) -> Command {
        let (program, subcommand) = self.ztunnel_program();
        let mut cmd = Command::new(program);
        cmd.args(subcommand);
        cmd
    }

    pub fn ztunnel(&self, node: usize) -> &LabProcess {
        self.ztunnels[node].as_ref().expect("ztunnel started")
    }

    pub fn take_ztunnel(&mut self, node: usize) -> Option<LabProcess> {
        self.ztunnels[node].take()
    }

    /// Starts `weft app echo` in a pod and waits until it listens.
    pub fn start_echo(&self, pod: &str, port: u16, banner: Option<&str>) -> anyhow::Result<LabProcess> {
        let mut cmd = Command::new(&self.weft);
        cmd.args(["app", "echo", "--port", &port.to_string()]);
        if let Some(b) = banner {
            cmd.args(["--banner", b]);
        }
        let process = self.pod(pod).netns().spawn(cmd)?;
        process.wait_for_log("listening on", STARTUP)?;
        Ok(process)
    }

    /// Starts `weft app <kind> --port <port>` (sink, http) in a pod and waits until it listens.
    pub fn start_app(&self, pod: &str, kind: &str, port: u16) -> anyhow::Result<LabProcess> {
        let mut cmd = Command::new(&self.weft);
        cmd.args(["app", kind, "--port", &port.to_string()]);
        let process = self.pod(pod).netns().spawn(cmd)?;
        process.wait_for_log("listening on", STARTUP)?;
        Ok(process)
    }

    /// A TCP connection opened from inside `pod`'s namespace (a client in that pod).
    pub fn connect(&self, pod: &str, addr: SocketAddr) -> anyhow::Result<TcpStream> {
        let stream = self
            .pod(pod)
            .netns()
            .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?
            .with_context(|| format!("connecting from pod {pod} to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(stream)
    }

    /// An HTTP GET to `127.0.0.1:<port><path>` inside node `node`'s namespace (ztunnel's
    /// admin, metrics and readiness servers); the response body.
    pub fn node_http(&self, node: usize, port: u16, path: &str) -> anyhow::Result<String> {
        let path = path.to_owned();
        self.lab.nodes()[node].netns().run(move || http_get(SocketAddr::from(([127, 0, 0, 1], port)), &path))?
    }

    /// Waits until node `node`'s ztunnel reports `count` enrolled pods.
    pub fn wait_enrolled(&self, node: usize, count: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP;
        let mut last = String::new();
        while Instant::now() < deadline {
            last = self.node_http(node, 15000, "/config_dump")?;
            let dump: serde_json::Value = serde_json::from_str(&last)?;
            if dump["enrolledPods"].as_array().map(|a| a.len()) == Some(count) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("node {node} did not reach {count} enrolled pods; last dump:\n{last}")
    }

    /// A metric's value on node `node`, summed over series whose labels contain every
    /// `key="value"` in `labels`.
    pub fn metric(&self, node: usize, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        let text = self.node_http(node, 15020, "/metrics")?;
        Ok(sum_metric(&text, name, labels))
    }
}

/// HTTP/1.1 requests on one keep-alive connection (a client in a pod, for the waypoint's
/// tests and the demo): each answer's status and body.
pub struct HttpClient {
    reader: BufReader<TcpStream>,
    host: String,
}

impl HttpClient {
    pub fn new(stream: TcpStream, host: &str) -> HttpClient {
        HttpClient { reader: BufReader::new(stream), host: host.to_owned() }
    }

    /// A GET of `path` with `headers`; the status and the body (trimmed).
    pub fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> std::io::Result<(u16, String)> {
        let mut req = format!("GET {path} HTTP/1.1\r\nhost: {}\r\n", self.host);
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        self.reader.get_mut().write_all(req.as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut length = 0usize;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        self.reader.read_exact(&mut body)?;
        Ok((status, String::from_utf8_lossy(&body).trim().to_owned()))
    }
}

/// A minimal HTTP/1.1 GET (no client library: the lab runs it on a namespace thread).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut tcp =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| format!("connecting to {addr}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(tcp, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    tcp.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path} on {addr}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_owned())
}

/// One request on a node socket, as the CNI plugin makes it: bounded by 20 s (ztunnel waits up
/// to its `--pod-wait` for the controller to report the pod).
pub fn node_socket_call(
    path: &Path,
    request: &meshapi::node::NodeRequest,
) -> anyhow::Result<meshapi::node::NodeResponse> {
    use std::io::BufRead;
    let mut stream = std::os::unix::net::UnixStream::connect(path)
        .with_context(|| format!("connecting to ztunnel's node socket {}: is ztunnel running?", path.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    std::io::BufReader::new(stream).read_line(&mut answer).context("reading ztunnel's answer")?;
    serde_json::from_str(answer.trim_end()).with_context(|| format!("ztunnel's answer {answer:?} is not valid"))
}

/// Documents as one YAML stream (JSON is YAML).
fn join_documents(docs: &[serde_json::Value]) -> anyhow::Result<String> {
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_json::to_string_pretty(d)?);
        out.push('\n');
    }
    Ok(out)
}

/// An `AuthorizationPolicy.security.weft.dev` object from a policy in the model's form (one
/// YAML flow mapping: `{name, namespace, selector, action, rules}`).
fn policy_object(model: &str) -> anyhow::Result<serde_json::Value> {
    let mut v: serde_json::Value =
        serde_saphyr::from_str(model).with_context(|| format!("policy {model:?} is not a YAML mapping"))?;
    let field = |v: &mut serde_json::Value, k: &str| v.as_object_mut().and_then(|m| m.remove(k));
    let name = field(&mut v, "name").context("policy without a name")?;
    let namespace = field(&mut v, "namespace").context("policy without a namespace")?;
    let mut spec = serde_json::Map::new();
    if let Some(sel) = field(&mut v, "selector") {
        spec.insert("selector".into(), serde_json::json!({"matchLabels": sel}));
    }
    if let Some(m) = v.as_object() {
        for (k, val) in m {
            spec.insert(k.clone(), val.clone());
        }
    }
    Ok(serde_json::json!({
        "apiVersion": "security.weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace}, "spec": spec,
    }))
}

/// Sums the samples of `name` whose label set contains every given pair.
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            if metric != name {
                return None;
            }
            labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// The first IP of a pod (`status.podIP`): IPv4, unless the lab is IPv6-only.
pub fn ip(pod: &Pod) -> IpAddr {
    pod.primary_ip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_matching_series() {
        let text = "# HELP x\nistio_tcp_connections_opened_total{reporter=\"source\",a=\"1\"} 2\nistio_tcp_connections_opened_total{reporter=\"destination\",a=\"1\"} 3\nother_total 9\n";
        assert_eq!(sum_metric(text, "istio_tcp_connections_opened_total", &[]), 5.0);
        assert_eq!(sum_metric(text, "istio_tcp_connections_opened_total", &[("reporter", "source")]), 2.0);
        assert_eq!(sum_metric(text, "other_total", &[]), 9.0);
    }
}
