//! The Kubernetes API source, the TokenReview authenticator and the waypoint deployer against
//! an API server faked at the HTTP level ([`apiserver::ApiServer`]: lists, chunked watches
//! from a `resourceVersion`, bookmarks, `410 Gone`, restarts, TokenReviews, server-side
//! apply), on loopback with plain HTTP. The source's changes go through the same
//! [`Translator`] as the directory source's; the deployer runs in the real controller
//! (`app::build_with_client`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use apiserver::Write;
use controller::app::{self, Bound};
use controller::auth::{AuthError, Authenticator, Caller, NodeName, ServiceAccount, Tokens};
use controller::ca::{Authority, AuthorityConfig, RootSource};
use controller::config::{Config, ElectionSettings, WaypointSettings};
use controller::source::kube::KubeSource;
use controller::source::{ObjectSource, Rejection, dir::DirSource};
use controller::tokenreview::{KubernetesAuth, TokenReviewer};
use controller::translate::Translator;
use meshapi::watch::Change;
use meshapi::{Key, Resource};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use apiserver::ApiServer;

/// Long enough for a watcher's first backoff (0.8 s, jittered up to double) and a relist.
const EVENTUAL: Duration = Duration::from_secs(10);
/// How long to keep listening after the expected changes, for anything duplicated or late.
const SETTLE: Duration = Duration::from_millis(2500);

// ---- the cluster the tests start from ----

fn namespace(name: &str, enrolled: bool) -> Value {
    let labels = if enrolled { json!({"weft.dev/mesh": "enabled"}) } else { json!({}) };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(namespace: &str, name: &str, node: &str, ip: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": labels["app"].as_str().unwrap_or("default"),
                 "containers": [{"name": "app", "image": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

fn cluster() -> Vec<Value> {
    vec![
        namespace("shop", true),
        namespace("plain", false),
        pod("shop", "web-0", "node-1", "10.244.1.2", json!({"app": "web"})),
        pod("shop", "api-0", "node-2", "10.244.2.2", json!({"app": "api"})),
        pod(
            "shop",
            "waypoint-0",
            "node-1",
            "10.244.1.9",
            json!({"gateway.networking.k8s.io/gateway-name": "waypoint"}),
        ),
        pod("plain", "batch-0", "node-2", "10.244.2.3", json!({"app": "batch"})),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "api", "namespace": "shop", "labels": {"weft.dev/use-waypoint": "waypoint"}},
               "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "selector": {"app": "api"},
                        "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
               "metadata": {"name": "waypoint", "namespace": "shop"},
               "spec": {"gatewayClassName": "weft-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
               "metadata": {"name": "api-canary", "namespace": "shop"},
               "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "api", "port": 80}],
                        "rules": [{"backendRefs": [{"name": "api-v1", "port": 80, "weight": 90}, {"name": "api-v2", "port": 80, "weight": 10}]}]}}),
        policy(
            "only-web",
            json!({"selector": {"matchLabels": {"app": "api"}}, "action": "ALLOW",
                                  "rules": [{"from": [{"principals": ["spiffe://cluster.local/ns/shop/sa/web"]}], "ports": [8080]}]}),
        ),
        // Unreadable (a typo): rejected by both sources, the rest unaffected.
        policy("typo", json!({"action": "DENY", "rulez": []})),
    ]
}

fn policy(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "security.weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
           "metadata": {"name": name, "namespace": "shop"}, "spec": spec})
}

// ---- what the tests look at ----

/// A Kubernetes source and its translation, as the controller's source loop holds them.
struct Mesh {
    source: KubeSource,
    translator: Translator,
}

/// What arrived over a while.
#[derive(Debug, Default)]
struct Seen {
    changes: Vec<Change>,
    rejected: Vec<Rejection>,
}

impl Mesh {
    async fn start(server: &ApiServer) -> (Mesh, Seen) {
        let source = tokio::time::timeout(EVENTUAL, KubeSource::start(server.client()))
            .await
            .expect("the source lists every kind");
        let mut mesh = Mesh { source, translator: Translator::new() };
        let mut seen = Seen::default();
        mesh.scan(&mut seen);
        (mesh, seen)
    }

    fn scan(&mut self, seen: &mut Seen) {
        let scan = self.source.scan();
        seen.changes.extend(self.translator.apply_all(scan.events));
        seen.rejected.extend(scan.rejected);
    }

    /// Everything that arrives until `done` holds for it, then for [`SETTLE`] more.
    async fn until(&mut self, done: impl Fn(&Seen) -> bool) -> Seen {
        let mut seen = Seen::default();
        let deadline = tokio::time::Instant::now() + EVENTUAL;
        while !done(&seen) {
            assert!(tokio::time::Instant::now() < deadline, "timed out; so far: {seen:#?}");
            self.source.changed(Duration::from_millis(100)).await;
            self.scan(&mut seen);
        }
        let settled = tokio::time::Instant::now() + SETTLE;
        while tokio::time::Instant::now() < settled {
            self.source.changed(Duration::from_millis(100)).await;
            self.scan(&mut seen);
        }
        seen
    }

    /// The changes that arrive, once at least `n` have.
    async fn changes(&mut self, n: usize) -> Vec<Change> {
        self.until(|s| s.changes.len() >= n).await.changes
    }
}

fn key(change: &Change) -> Key {
    match change {
        Change::Upsert(r) => r.key(),
        Change::Delete(k) => k.clone(),
    }
}

fn by_key(changes: Vec<Change>) -> BTreeMap<Key, Change> {
    let mut map = BTreeMap::new();
    for change in changes {
        assert!(map.insert(key(&change), change.clone()).is_none(), "{change:?} appears twice");
    }
    map
}

/// `upsert Workload shop/web-0`, `delete Workload shop/db-0`.
fn described(changes: &[Change]) -> Vec<String> {
    let mut out: Vec<String> = changes
        .iter()
        .map(|c| match c {
            Change::Upsert(r) => format!("upsert {:?} {}", r.key().kind, r.key().name),
            Change::Delete(k) => format!("delete {:?} {}", k.kind, k.name),
        })
        .collect();
    out.sort();
    out
}

fn workload(changes: &[Change], name: &str) -> meshapi::Workload {
    changes
        .iter()
        .find_map(|c| match c {
            Change::Upsert(Resource::Workload(w)) if format!("{}/{}", w.namespace, w.name) == name => Some(w.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no upsert of workload {name} in {changes:#?}"))
}

/// Rejections without where they were written (the directory source names a file).
fn about(rejected: &[Rejection]) -> Vec<(String, Option<String>, String)> {
    let mut out: Vec<_> = rejected
        .iter()
        .map(|r| (r.object.as_ref().map(|o| o.to_string()).unwrap_or_default(), r.field.clone(), r.reason.clone()))
        .collect();
    out.sort();
    out
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("weft-controller-kube-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- the source ----

#[tokio::test]
async fn the_initial_list_translates_exactly_as_the_yaml_directory() {
    let server = ApiServer::with_cluster().await;
    let (_mesh, from_api) = Mesh::start(&server).await;

    // The same objects as YAML files (JSON is YAML), one document each.
    let dir = TempDir::new("same-translation");
    let yaml: Vec<String> = cluster().iter().map(|o| serde_json::to_string_pretty(o).unwrap()).collect();
    std::fs::write(dir.path().join("cluster.yaml"), yaml.join("\n---\n")).unwrap();
    let mut files = DirSource::new(dir.path());
    let scan = ObjectSource::scan(&mut files);
    let from_dir = Translator::new().apply_all(scan.events);

    assert_eq!(
        described(&from_api.changes),
        [
            "upsert Authorization shop/only-web",
            "upsert HttpRoute shop/api-canary",
            "upsert Service shop/api",
            "upsert Waypoint shop/waypoint",
            "upsert Workload plain/batch-0",
            "upsert Workload shop/api-0",
            "upsert Workload shop/waypoint-0",
            "upsert Workload shop/web-0",
        ]
    );
    assert_eq!(by_key(from_api.changes.clone()), by_key(from_dir), "the same resources, field for field");
    assert!(workload(&from_api.changes, "shop/web-0").enrolled);
    assert!(!workload(&from_api.changes, "plain/batch-0").enrolled);
    assert!(!workload(&from_api.changes, "shop/waypoint-0").enrolled, "it serves the waypoint: not captured");

    assert_eq!(about(&from_api.rejected), about(&scan.rejected));
    let [typo] = from_api.rejected.as_slice() else { panic!("{:#?}", from_api.rejected) };
    assert_eq!(
        typo.to_string().split(": ").take(2).collect::<Vec<_>>(),
        ["AuthorizationPolicy shop/typo", "spec.rulez"]
    );
    assert!(typo.origin.is_none(), "an object of the API server has no file");
}

#[tokio::test]
async fn added_modified_and_deleted_each_make_their_one_change() {
    let server = ApiServer::with_cluster().await;
    let (mut mesh, _) = Mesh::start(&server).await;

    server.apply(pod("shop", "web-1", "node-2", "10.244.2.7", json!({"app": "web"})));
    let added = mesh.changes(1).await;
    assert_eq!(described(&added), ["upsert Workload shop/web-1"]);
    assert_eq!(workload(&added, "shop/web-1").node, "node-2");

    server.apply(pod("shop", "web-1", "node-2", "10.244.2.7", json!({"app": "web", "weft.dev/mtls": "STRICT"})));
    let modified = mesh.changes(1).await;
    assert_eq!(described(&modified), ["upsert Workload shop/web-1"]);
    assert_eq!(workload(&modified, "shop/web-1").mtls, meshapi::MtlsMode::Strict);

    // A change translation does not read (an annotation): no change to the model.
    let mut annotated = pod("shop", "web-1", "node-2", "10.244.2.7", json!({"app": "web", "weft.dev/mtls": "STRICT"}));
    annotated["metadata"]["annotations"] = json!({"note": "read by nobody"});
    server.apply(annotated);
    // A policy edited into something unreadable: rejected, its last good version kept.
    let mut broken = cluster().into_iter().find(|o| o["metadata"]["name"] == "only-web").unwrap();
    broken["spec"]["rules"][0]["portz"] = json!([1]);
    server.apply(broken);
    let seen = mesh.until(|s| !s.rejected.is_empty()).await;
    assert!(seen.changes.is_empty(), "{:#?}", seen.changes);
    let [r] = seen.rejected.as_slice() else { panic!("{:#?}", seen.rejected) };
    assert_eq!(r.field.as_deref(), Some("spec.rules[0].portz"));
    assert!(r.reason.ends_with("the version read before is kept"), "{r}");
    assert!(mesh.source.rejected().iter().any(|x| x == r), "listed for the status page");

    server.delete("Pod", Some("shop"), "web-1");
    assert_eq!(described(&mesh.changes(1).await), ["delete Workload shop/web-1"]);
}

#[tokio::test]
async fn an_expired_watch_relists_and_deletes_what_vanished_exactly_once() {
    let server = ApiServer::with_cluster().await;
    let (mut mesh, _) = Mesh::start(&server).await;
    let lists = server.lists("pods");

    // The watch falls behind: the server drops what it could not deliver (web-0 deleted,
    // web-1 created) and ends the watch with an ERROR event of code 410.
    server.expire_watches(|s| {
        s.delete("Pod", Some("shop"), "web-0");
        s.apply(pod("shop", "web-1", "node-2", "10.244.2.7", json!({"app": "web"})));
    });
    let changes = mesh.changes(2).await;
    assert_eq!(described(&changes), ["delete Workload shop/web-0", "upsert Workload shop/web-1"]);
    assert_eq!(server.lists("pods"), lists + 1, "listed again");
}

#[tokio::test]
async fn a_too_old_resource_version_after_a_disconnect_relists() {
    let server = ApiServer::with_cluster().await;
    let (mut mesh, _) = Mesh::start(&server).await;

    // While no watch is open: a pod deleted, a service changed, and the history compacted
    // past what the watches saw. Resuming gets 410 (an ERROR event); the relist finds out.
    server.disconnect(|s| {
        s.delete("Pod", Some("shop"), "web-0");
        let mut service = cluster().into_iter().find(|o| o["kind"] == "Service").unwrap();
        service["spec"]["ports"][0]["port"] = json!(8080);
        s.apply(service);
        s.compact();
    });
    let changes = mesh.changes(2).await;
    assert_eq!(described(&changes), ["delete Workload shop/web-0", "upsert Service shop/api"]);
}

#[tokio::test]
async fn an_http_410_on_the_watch_request_relists() {
    let server = ApiServer::with_cluster().await;
    let (mut mesh, _) = Mesh::start(&server).await;
    let lists = server.lists("pods");

    // The same, answered as an HTTP 410 to the watch request: the watcher would ask again
    // for the same version forever; the source starts it over.
    server.disconnect(|s| {
        s.delete("Pod", Some("shop"), "web-0");
        s.compact();
        s.gone_as_http_status = true;
    });
    assert_eq!(described(&mesh.changes(1).await), ["delete Workload shop/web-0"]);
    assert_eq!(server.lists("pods"), lists + 1);
}

#[tokio::test]
async fn a_bookmark_moves_where_the_watch_resumes() {
    let server = ApiServer::with_cluster().await;
    let (mut mesh, _) = Mesh::start(&server).await;
    let lists = server.lists("pods");

    // Other kinds move the cluster's version on; a bookmark tells the pod watch where it is.
    server.apply(namespace("other", false));
    server.apply(namespace("more", false));
    server.watching("pods").await;
    let bookmark = server.bookmark("pods");
    // Disconnected and compacted up to the bookmark: resuming from it needs no relist.
    server.disconnect(|s| s.compact());
    server.apply(pod("shop", "web-1", "node-2", "10.244.2.7", json!({"app": "web"})));
    assert_eq!(described(&mesh.changes(1).await), ["upsert Workload shop/web-1"]);
    assert_eq!(server.lists("pods"), lists, "no relist");
    assert_eq!(server.watched_from("pods"), Some(bookmark), "resumed from the bookmark");
}

#[tokio::test]
async fn an_api_server_restart_loses_and_repeats_nothing() {
    let server = ApiServer::with_cluster().await;
    let (mut mesh, _) = Mesh::start(&server).await;
    let lists = server.lists("pods");

    // The API server goes away (connections cut, the port refusing) and comes back; what
    // changed meanwhile is replayed to the watches resuming from where they were.
    server
        .restart(Duration::from_secs(1), |s| {
            s.apply(pod("shop", "web-1", "node-2", "10.244.2.7", json!({"app": "web"})));
            s.delete("Pod", Some("plain"), "batch-0");
        })
        .await;
    let changes = mesh.changes(2).await;
    assert_eq!(described(&changes), ["delete Workload plain/batch-0", "upsert Workload shop/web-1"]);
    assert_eq!(server.lists("pods"), lists, "resumed, not listed again");

    // And the watches work on.
    server.apply(pod("shop", "web-2", "node-1", "10.244.1.7", json!({"app": "web"})));
    assert_eq!(described(&mesh.changes(1).await), ["upsert Workload shop/web-2"]);
}

#[tokio::test]
async fn a_kind_that_is_not_served_does_not_hold_up_start() {
    let server = ApiServer::start().await;
    server.unserve("gateways");
    server.unserve("httproutes");
    for object in cluster().into_iter().filter(|o| !o["apiVersion"].as_str().unwrap().starts_with("gateway.")) {
        server.apply(object);
    }
    let (mut mesh, seen) = Mesh::start(&server).await;
    assert!(described(&seen.changes).contains(&"upsert Workload shop/web-0".to_owned()));

    // The Gateway API's CRDs installed later: their objects arrive.
    server.serve("gateways");
    server.serve("httproutes");
    for object in cluster().into_iter().filter(|o| o["apiVersion"].as_str().unwrap().starts_with("gateway.")) {
        server.apply(object);
    }
    // And the waypoint's pod, captured until then, is no longer.
    let changes = mesh.changes(3).await;
    assert_eq!(
        described(&changes),
        ["upsert HttpRoute shop/api-canary", "upsert Waypoint shop/waypoint", "upsert Workload shop/waypoint-0"]
    );
    assert!(!workload(&changes, "shop/waypoint-0").enrolled);
}

// ---- waypoint deployment (the real controller) ----

/// The real controller (`app::build_with_client`) watching the fake API server, and its
/// directories.
struct Running {
    bound: Option<Bound>,
    dir: TempDir,
}

impl Running {
    async fn start(server: &ApiServer, test: &str) -> Running {
        Running::with_extra_roots(server, test, None).await
    }

    async fn with_extra_roots(server: &ApiServer, test: &str, extra_roots: Option<PathBuf>) -> Running {
        Running::launch(server, test, "", |config| config.extra_roots = extra_roots).await
    }

    /// A controller whose requests carry `x-client: <client>`, its configuration changed by
    /// `tweak`.
    async fn launch(server: &ApiServer, test: &str, client: &str, tweak: impl FnOnce(&mut Config)) -> Running {
        let dir = TempDir::new(test);
        let loopback = "127.0.0.1:0".parse().unwrap();
        let mut config = Config {
            source_dir: None,
            state_dir: dir.path().join("state"),
            ca_cert: None,
            ca_key: None,
            ca_chain: None,
            ca_secret: None,
            ca_secret_refresh: Duration::from_secs(30),
            namespace: "weft-system".into(),
            extra_roots: None,
            trust_domain: "cluster.local".into(),
            cert_ttl: Duration::from_secs(3600),
            min_cert_ttl: Duration::from_secs(600),
            max_cert_ttl: Duration::from_secs(24 * 3600),
            server_names: vec!["weft-controller.weft-system.svc".into()],
            api_addr: loopback,
            admin_addr: loopback,
            metrics_addr: loopback,
            readiness_addr: loopback,
            poll_interval: Duration::from_millis(100),
            heartbeat: Duration::from_secs(15),
            history_bytes: 1 << 20,
            waypoints: WaypointSettings {
                image: "registry.example.com/weft/waypoint:v1".into(),
                controller_address: "weft-controller.weft-system.svc:15012".into(),
            },
            election: ElectionSettings::default(),
        };
        tweak(&mut config);
        let bound = tokio::time::timeout(EVENTUAL, app::build_with_client(config, server.client_named(client)))
            .await
            .expect("the controller lists the cluster")
            .expect("the controller starts");
        Running { bound: Some(bound), dir }
    }

    /// The mesh's root, which the controller generated.
    fn root_pem(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("state/root-cert.pem")).unwrap()
    }

    /// `GET /status` on the admin server.
    async fn status(&self) -> Value {
        let addr = self.bound.as_ref().unwrap().admin_addr;
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /status HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        serde_json::from_str(body).unwrap()
    }

    /// The controller's `/status` problems about `gateway` (`shop/waypoint`).
    async fn problems(&self, gateway: &str) -> Vec<String> {
        let status = self.status().await;
        let rejected = status["rejected"].as_array().unwrap();
        let prefix = format!("Gateway {gateway}: ");
        rejected.iter().filter_map(Value::as_str).filter(|r| r.starts_with(&prefix)).map(str::to_owned).collect()
    }

    async fn stop(mut self) {
        if let Some(bound) = self.bound.take() {
            bound.shutdown().await;
        }
    }
}

fn gateway(namespace: &str, name: &str, class: &str) -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
           "metadata": {"name": name, "namespace": namespace},
           "spec": {"gatewayClassName": class, "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}})
}

fn deployment_path(namespace: &str, name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{namespace}/deployments/{name}")
}

fn service_account_path(namespace: &str, name: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/serviceaccounts/{name}")
}

fn ca_root_path(namespace: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/configmaps/weft-ca-root")
}

fn owner(server: &ApiServer, namespace: &str, gateway: &str) -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "name": gateway,
           "uid": server.uid("Gateway", namespace, gateway)})
}

/// Waits until `f` returns something, for [`EVENTUAL`] at most.
async fn eventually<T>(what: &str, f: impl Fn() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + EVENTUAL;
    loop {
        if let Some(found) = f() {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_waypoint_gateway_gets_its_service_account_ca_root_and_deployment_by_server_side_apply() {
    let server = ApiServer::with_cluster().await;
    server.apply(gateway("shop", "waypoint-b", "weft-waypoint"));
    let controller = Running::start(&server, "deploy").await;

    let deployed = |name: &str| server.applied(&deployment_path("shop", name));
    let waypoint = eventually("the Deployments", || deployed("waypoint").zip(deployed("waypoint-b"))).await.0;
    let writes = server.writes();
    for w in &writes {
        assert_eq!(w.method, "PATCH", "{w:?}");
        assert_eq!(w.content_type, "application/apply-patch+yaml", "server-side apply: {w:?}");
        assert_eq!(w.query.get("fieldManager").map(String::as_str), Some("weft-controller"), "{w:?}");
        assert_eq!(w.query.get("force").map(String::as_str), Some("true"), "{w:?}");
        assert!(w.path.contains("/namespaces/shop/"), "only in the Gateways' namespace: {w:?}");
        assert!(w.status < 300, "{w:?}");
    }
    // The pods can start: their ServiceAccount and the ConfigMap exist before the Deployment.
    let first = |path: &str| writes.iter().position(|w| w.path == path).unwrap_or_else(|| panic!("{path} not applied"));
    assert!(first(&ca_root_path("shop")) < first(&deployment_path("shop", "waypoint")));
    assert!(first(&service_account_path("shop", "waypoint")) < first(&deployment_path("shop", "waypoint")));

    let account = server.applied(&service_account_path("shop", "waypoint")).unwrap();
    assert_eq!(account["kind"], "ServiceAccount");
    assert_eq!(account["metadata"]["ownerReferences"], json!([owner(&server, "shop", "waypoint")]));
    assert_eq!(account["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"], "waypoint");

    // One ConfigMap for the namespace: the controller's root, owned by both Gateways.
    let ca = server.applied(&ca_root_path("shop")).unwrap();
    assert_eq!(ca["data"]["root-cert.pem"], controller.root_pem(), "the mesh's trust bundle");
    assert_eq!(
        ca["metadata"]["ownerReferences"],
        json!([owner(&server, "shop", "waypoint"), owner(&server, "shop", "waypoint-b")])
    );

    assert_eq!(waypoint["kind"], "Deployment");
    assert_eq!(waypoint["metadata"]["ownerReferences"], json!([owner(&server, "shop", "waypoint")]));
    assert_eq!(
        waypoint["spec"]["selector"]["matchLabels"],
        json!({"gateway.networking.k8s.io/gateway-name": "waypoint"})
    );
    let template = &waypoint["spec"]["template"];
    assert_eq!(template["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"], "waypoint");
    let pod = &template["spec"];
    assert_eq!(pod["serviceAccountName"], "waypoint");
    let container = &pod["containers"][0];
    assert_eq!(container["image"], "registry.example.com/weft/waypoint:v1");
    assert_eq!(
        container["args"],
        json!([
            "--controller=weft-controller.weft-system.svc:15012",
            "--controller-ca=/etc/weft/ca/root-cert.pem",
            "--token-file=/var/run/secrets/weft/token",
            "--namespace=shop",
            "--name=waypoint"
        ])
    );
    let token =
        pod["volumes"].as_array().unwrap().iter().find_map(|v| v["projected"]["sources"][0].get("serviceAccountToken"));
    assert_eq!(token.unwrap()["audience"], "weft-controller");
    let b = deployed("waypoint-b").unwrap();
    assert!(
        b["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .contains(&json!("--name=waypoint-b"))
    );
    assert!(controller.problems("shop/waypoint").await.is_empty());

    // A Gateway deleted: its objects are the garbage collector's (owner references); the
    // namespace's ConfigMap is now the remaining waypoint's alone.
    let before = server.writes().len();
    server.delete("Gateway", Some("shop"), "waypoint-b");
    let remaining = json!([owner(&server, "shop", "waypoint")]);
    eventually("the ConfigMap's owners to shrink", || {
        server.applied(&ca_root_path("shop")).filter(|c| c["metadata"]["ownerReferences"] == remaining)
    })
    .await;
    tokio::time::sleep(SETTLE).await;
    let after: Vec<_> = server.writes().split_off(before);
    assert!(after.iter().all(|w| w.method == "PATCH" && !w.path.ends_with("/waypoint-b")), "{after:#?}");
    controller.stop().await;
}

#[tokio::test]
async fn a_gateway_of_another_class_gets_nothing() {
    let server = ApiServer::start().await;
    for object in cluster().into_iter().filter(|o| o["kind"] != "Gateway") {
        server.apply(object);
    }
    server.apply(gateway("shop", "ingress", "istio"));
    let controller = Running::start(&server, "other-class").await;
    tokio::time::sleep(SETTLE).await;
    assert_eq!(server.writes().len(), 0, "{:#?}", server.writes());

    // Of the waypoint class, it is deployed (so the silence above was not an accident)...
    server.apply(gateway("shop", "ingress", "weft-waypoint"));
    eventually("the Deployment", || server.applied(&deployment_path("shop", "ingress"))).await;
    // ...and of another class again, nothing is deleted (another implementation may deploy
    // a Deployment of the same name), nor applied any more.
    server.apply(gateway("shop", "ingress", "istio"));
    tokio::time::sleep(SETTLE).await;
    let before = server.writes().len();
    tokio::time::sleep(SETTLE).await;
    let writes = server.writes();
    assert_eq!(writes.len(), before, "{:#?}", &writes[before..]);
    assert!(writes.iter().all(|w| w.method == "PATCH"), "{writes:#?}");
    controller.stop().await;
}

#[tokio::test]
async fn a_forbidden_namespace_is_reported_retried_with_backoff_then_deployed() {
    let server = ApiServer::start().await;
    server.forbid_writes("shop");
    for object in cluster() {
        server.apply(object);
    }
    let controller = Running::start(&server, "forbidden").await;

    let refused = eventually("two refused attempts", || {
        let refused: Vec<_> = server.writes().into_iter().filter(|w| w.status == 403).collect();
        (refused.len() >= 2).then_some(refused)
    })
    .await;
    // Retried after a backoff (1 s, then 2 s...), not in a loop.
    let gap = refused[1].at.duration_since(refused[0].at);
    assert!(gap >= Duration::from_millis(900), "retried after {gap:?}");

    // Reported in /status, with what to do; the controller serves on.
    let problems = eventually_async(|| controller.problems("shop/waypoint")).await;
    let [problem] = problems.as_slice() else { panic!("{problems:#?}") };
    assert!(
        problem.starts_with(
            "Gateway shop/waypoint: its waypoint is not deployed: the API server refused to apply ConfigMap \
             shop/weft-ca-root (403 Forbidden)"
        ),
        "{problem}"
    );
    assert!(problem.contains("weft-waypoint-deployer") && problem.contains("RoleBinding in shop"), "{problem}");
    let status = controller.status().await;
    assert_eq!(status["ready"], true);
    assert!(status["version"].as_u64().unwrap() > 1, "the model is served: {status}");

    // The RoleBinding added: deployed at the next attempt, and the problem gone.
    server.allow_writes("shop");
    eventually("the Deployment", || server.applied(&deployment_path("shop", "waypoint"))).await;
    let deadline = tokio::time::Instant::now() + EVENTUAL;
    while !controller.problems("shop/waypoint").await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the problem stays listed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    controller.stop().await;
}

#[tokio::test]
async fn a_new_root_in_the_trust_bundle_is_written_to_the_ca_root() {
    // Two more roots, as an operator rotating the CA would add them.
    let other = TempDir::new("rotation-roots");
    let root = |name: &str| {
        let state_dir = other.path().join(name);
        let config = AuthorityConfig::new("cluster.local", RootSource::Generated { state_dir: state_dir.clone() });
        Authority::open(config).unwrap();
        std::fs::read_to_string(state_dir.join("root-cert.pem")).unwrap()
    };
    let (b, c) = (root("b"), root("c"));
    let extra = other.path().join("extra-roots.pem");
    std::fs::write(&extra, &b).unwrap();

    let server = ApiServer::with_cluster().await;
    let controller = Running::with_extra_roots(&server, "rotation", Some(extra.clone())).await;
    let a = controller.root_pem();
    let bundle = |expected: String| {
        let server = &server;
        move || server.applied(&ca_root_path("shop")).filter(|cm| cm["data"]["root-cert.pem"] == expected.as_str())
    };
    eventually("the first bundle", bundle(format!("{a}{b}"))).await;
    std::fs::write(&extra, &c).unwrap();
    eventually("the rotated bundle", bundle(format!("{a}{c}"))).await;
    controller.stop().await;
}

/// The conditions of `type` in `conditions` (a status's list): (status, reason).
fn condition(conditions: &Value, kind: &str) -> Option<(String, String)> {
    conditions.as_array()?.iter().find(|c| c["type"] == kind).map(|c| {
        (c["status"].as_str().unwrap_or_default().to_owned(), c["reason"].as_str().unwrap_or_default().to_owned())
    })
}

fn is(status: &str, reason: &str) -> Option<(String, String)> {
    Some((status.to_owned(), reason.to_owned()))
}

/// The controller's entry of a route's `status.parents` for the Service `parent`.
fn route_parent(server: &ApiServer, route: &str, parent: &str) -> Option<Value> {
    let route = server.object("HTTPRoute", "shop", route)?;
    route["status"]["parents"]
        .as_array()?
        .iter()
        .find(|p| p["controllerName"] == "weft.dev/waypoint-controller" && p["parentRef"]["name"] == parent)
        .cloned()
}

#[tokio::test]
async fn conditions_are_written_on_waypoint_gateways_routes_and_policies_once() {
    let server = ApiServer::with_cluster().await;
    server.apply(gateway("shop", "ingress", "istio"));
    server.put_class("weft-waypoint", "weft.dev/waypoint-controller");
    server.put_class("istio", "istio.io/gateway-controller");
    server.apply(json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "api-v1", "namespace": "shop"},
           "spec": {"clusterIP": "10.96.0.11", "clusterIPs": ["10.96.0.11"], "selector": {"app": "api"},
                    "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}));
    // One rule the waypoint cannot read (an unsupported filter) beside a good one; and a route
    // for a Service without a waypoint.
    server.apply(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
           "metadata": {"name": "partly", "namespace": "shop"},
           "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "api", "port": 80}],
                    "rules": [{"filters": [{"type": "ExtensionRef", "extensionRef": {"group": "x", "kind": "Y", "name": "z"}}],
                               "backendRefs": [{"name": "api-v1", "port": 80}]},
                              {"backendRefs": [{"name": "api-v1", "port": 80}]}]}}));
    server.apply(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
           "metadata": {"name": "no-waypoint", "namespace": "shop"},
           "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "api-v1"}],
                    "rules": [{"backendRefs": [{"name": "api-v1", "port": 80}]}]}}));
    let controller = Running::start(&server, "status").await;

    let gateway_conditions = || server.object("Gateway", "shop", "waypoint").map(|g| g["status"]["conditions"].clone());
    let programmed = eventually("the waypoint Gateway Programmed", || {
        gateway_conditions().filter(|c| condition(c, "Programmed") == is("True", "Programmed"))
    })
    .await;
    assert_eq!(condition(&programmed, "Accepted"), is("True", "Accepted"));
    let gateway = server.object("Gateway", "shop", "waypoint").unwrap();
    for c in programmed.as_array().unwrap() {
        assert_eq!(c["observedGeneration"], gateway["metadata"]["generation"], "{c}");
        assert!(c["lastTransitionTime"].as_str().is_some_and(|t| t.ends_with('Z')), "{c}");
        assert!(c["message"].as_str().is_some_and(|m| !m.is_empty()), "{c}");
    }

    // The canary's backends do not exist; the route is accepted by the Service's waypoint.
    let canary = eventually("the canary's status", || route_parent(&server, "api-canary", "api")).await;
    assert_eq!(canary["parentRef"], json!({"group": "", "kind": "Service", "name": "api", "port": 80}), "as written");
    assert_eq!(condition(&canary["conditions"], "Accepted"), is("True", "Accepted"));
    assert_eq!(condition(&canary["conditions"], "ResolvedRefs"), is("False", "BackendNotFound"));
    assert!(canary["conditions"].to_string().contains("shop/api-v2"), "{canary}");
    assert_eq!(condition(&canary["conditions"], "PartiallyInvalid"), is("False", "Accepted"));

    let partly = eventually("the partly readable route's status", || route_parent(&server, "partly", "api")).await;
    assert_eq!(condition(&partly["conditions"], "Accepted"), is("True", "Accepted"));
    assert_eq!(condition(&partly["conditions"], "ResolvedRefs"), is("True", "ResolvedRefs"));
    assert_eq!(condition(&partly["conditions"], "PartiallyInvalid"), is("True", "UnsupportedValue"));
    assert!(partly["conditions"].to_string().contains("spec.rules[0].filters[0]"), "names the field: {partly}");

    let orphan = eventually("the route without a waypoint", || route_parent(&server, "no-waypoint", "api-v1")).await;
    assert_eq!(condition(&orphan["conditions"], "Accepted"), is("False", "NoMatchingParent"));
    assert!(orphan["conditions"].to_string().contains("weft.dev/use-waypoint"), "{orphan}");

    let policy_conditions = |name: &str| {
        server
            .object("AuthorizationPolicy", "shop", name)
            .map(|p| p["status"]["conditions"].clone())
            .filter(|c| c.is_array())
    };
    let good = eventually("the valid policy's status", || policy_conditions("only-web")).await;
    assert_eq!(condition(&good, "Accepted"), is("True", "Accepted"));
    let typo = eventually("the unreadable policy's status", || policy_conditions("typo")).await;
    assert_eq!(condition(&typo, "Accepted"), is("False", "Invalid"));
    assert!(typo.to_string().contains("rulez"), "says what is wrong: {typo}");

    // A route that stops naming a Service loses Weft's entry in its status.
    server.apply(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
           "metadata": {"name": "no-waypoint", "namespace": "shop"},
           "spec": {"parentRefs": [{"name": "ingress"}], "rules": [{"backendRefs": [{"name": "api-v1", "port": 80}]}]}}));
    eventually("Weft's entry gone", || {
        let route = server.object("HTTPRoute", "shop", "no-waypoint")?;
        let parents = route["status"]["parents"].as_array()?;
        parents.iter().all(|p| p["controllerName"] != "weft.dev/waypoint-controller").then_some(())
    })
    .await;

    // Another class's Gateway is not Weft's to report on, nor another controller's class; the
    // class whose controllerName is Weft's is Accepted.
    assert!(server.object("Gateway", "shop", "ingress").unwrap().get("status").is_none());
    let class = eventually("the GatewayClass Accepted", || {
        server.class("weft-waypoint").filter(|c| condition(&c["status"]["conditions"], "Accepted").is_some())
    })
    .await;
    assert_eq!(condition(&class["status"]["conditions"], "Accepted"), is("True", "Accepted"));
    assert_eq!(class["status"]["conditions"][0]["observedGeneration"], 1);
    assert!(server.class("istio").unwrap().get("status").is_none());

    // Written once: the controller's own status writes come back as watch events and change
    // nothing, so nothing is written again.
    tokio::time::sleep(SETTLE).await;
    let settled = server.status_writes();
    tokio::time::sleep(SETTLE).await;
    assert_eq!(server.status_writes().len(), settled.len(), "{:#?}", &server.status_writes()[settled.len()..]);
    let per_object: BTreeMap<&str, usize> = settled.iter().fold(BTreeMap::new(), |mut m, w| {
        *m.entry(w.path.as_str()).or_default() += 1;
        m
    });
    assert!(per_object.values().all(|n| *n <= 2), "at most the first write and Programmed: {per_object:#?}");

    // Fixed: the policy's condition turns, with a new transition time.
    let since = typo[0]["lastTransitionTime"].clone();
    server.apply(policy("typo", json!({"action": "DENY", "rules": [{"ports": [9090]}]})));
    let fixed = eventually("the fixed policy accepted", || {
        policy_conditions("typo").filter(|c| condition(c, "Accepted") == is("True", "Accepted"))
    })
    .await;
    assert_eq!(fixed.as_array().unwrap().len(), 1, "{fixed}");
    let generation = server.object("AuthorizationPolicy", "shop", "typo").unwrap()["metadata"]["generation"].clone();
    assert_eq!(fixed[0]["observedGeneration"], generation);
    let (before, after) = (since.as_str().unwrap(), fixed[0]["lastTransitionTime"].as_str().unwrap());
    assert!(after >= before, "a transition: {before} then {after}");
    controller.stop().await;
}

/// Lease timings short enough for a test: a leader is replaced within about 2 s.
fn quick_election(identity: &str) -> ElectionSettings {
    ElectionSettings {
        identity: Some(identity.to_owned()),
        lease_duration: Duration::from_millis(2000),
        renew_deadline: Duration::from_millis(1500),
        retry_period: Duration::from_millis(100),
        ..ElectionSettings::default()
    }
}

async fn until_leading(what: &str, leading: impl Fn() -> bool) -> Duration {
    let start = std::time::Instant::now();
    eventually(what, || leading().then_some(())).await;
    start.elapsed()
}

#[tokio::test]
async fn one_replica_writes_and_a_dead_leader_is_replaced_within_the_lease() {
    let server = ApiServer::with_cluster().await;
    let a = Running::launch(&server, "elect-a", "a", |c| c.election = quick_election("a")).await;
    until_leading("a to lead", || a.bound.as_ref().unwrap().leading()).await;
    let b = Running::launch(&server, "elect-b", "b", |c| c.election = quick_election("b")).await;
    let lease = || server.lease("weft-system", "weft-controller").unwrap();
    assert!(lease()["spec"]["holderIdentity"].as_str().unwrap().starts_with("a_"), "{}", lease());

    // Only the leader writes: the waypoint's objects, the status, the Lease.
    eventually("the Gateway Programmed", || {
        server
            .object("Gateway", "shop", "waypoint")
            .filter(|g| condition(&g["status"]["conditions"], "Programmed") == is("True", "Programmed"))
    })
    .await;
    server.apply(policy("typo", json!({"action": "DENY", "rules": [{"ports": [9090]}]})));
    eventually("the fixed policy accepted", || {
        server
            .object("AuthorizationPolicy", "shop", "typo")
            .filter(|p| condition(&p["status"]["conditions"], "Accepted") == is("True", "Accepted"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!b.bound.as_ref().unwrap().leading(), "one leader at a time");
    let writers: BTreeSet<String> = server.all_writes().into_iter().map(|w| w.client).collect();
    assert_eq!(writers, BTreeSet::from(["a".to_owned()]), "the standby wrote nothing");

    // The leader dies without releasing: the standby waits for the lease to run out, then
    // takes over and writes.
    let died = std::time::Instant::now();
    a.bound.unwrap().abort().await;
    until_leading("b to take over", || b.bound.as_ref().unwrap().leading()).await;
    let took = died.elapsed();
    assert!(took >= Duration::from_millis(1500), "not before the lease ran out: {took:?}");
    assert!(took <= Duration::from_millis(2000 + 1500), "within the lease duration and a retry or so: {took:?}");
    let lease = lease();
    assert!(lease["spec"]["holderIdentity"].as_str().unwrap().starts_with("b_"), "{lease}");
    assert_eq!(lease["spec"]["leaseTransitions"], 1, "{lease}");
    server.apply(policy("typo", json!({"action": "DENY", "rulez": []})));
    eventually("the new leader's status write", || {
        server
            .object("AuthorizationPolicy", "shop", "typo")
            .filter(|p| condition(&p["status"]["conditions"], "Accepted") == is("False", "Invalid"))
    })
    .await;
    assert!(server.status_writes().iter().any(|w| w.client == "b"), "b writes now");

    // A leader that shuts down releases the lease: the next takes over at once.
    let c = Running::launch(&server, "elect-c", "c", |c| c.election = quick_election("c")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!c.bound.as_ref().unwrap().leading());
    let released = std::time::Instant::now();
    b.stop().await;
    let took = until_leading("c after the release", || c.bound.as_ref().unwrap().leading()).await;
    assert!(released.elapsed() < Duration::from_millis(1500), "released, not expired: {took:?}");

    // A leader cut off from the API server stops writing within its renewal deadline.
    server.partition("c", true);
    let cut = std::time::Instant::now();
    eventually("c to step down", || (!c.bound.as_ref().unwrap().leading()).then_some(())).await;
    let took = cut.elapsed();
    assert!(
        took <= Duration::from_millis(1500 + 1000),
        "within the renew deadline (and a busy machine's delay): {took:?}"
    );
    server.partition("c", false);
    until_leading("c to lead again", || c.bound.as_ref().unwrap().leading()).await;
    c.stop().await;
}

const CA_ROOT_IN_SYSTEM: &str = "/api/v1/namespaces/weft-system/configmaps/weft-ca-root";

/// The keys of the Secret `weft-system/weft-ca`, decoded.
fn ca_secret(server: &ApiServer) -> Option<BTreeMap<String, String>> {
    let secret: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(server.secret("weft-system", "weft-ca")?).unwrap();
    Some(secret.data?.into_iter().map(|(k, v)| (k, String::from_utf8(v.0).unwrap())).collect())
}

/// The roots of the trust bundle a controller serves.
fn served_roots(replica: &Running) -> Vec<String> {
    let lines = replica.bound.as_ref().unwrap().store.resources(Some(meshapi::Kind::TrustBundle));
    let line = lines.first().expect("a trust bundle");
    match Resource::from_wire(serde_json::from_str(line).unwrap()).unwrap() {
        Resource::TrustBundle(bundle) => bundle.roots,
        other => panic!("{other:?}"),
    }
}

fn base64(text: &str) -> Value {
    serde_json::to_value(k8s_openapi::ByteString(text.as_bytes().to_vec())).unwrap()
}

#[tokio::test]
async fn without_a_ca_secret_the_first_replica_creates_it_and_every_replica_signs_with_it() {
    let server = ApiServer::with_cluster().await;
    let keep_ca = |c: &mut Config| c.ca_secret = Some("weft-ca".into());
    let (a, b) = tokio::join!(
        Running::launch(&server, "ca-secret-a", "a", keep_ca),
        Running::launch(&server, "ca-secret-b", "b", keep_ca)
    );
    let secret = ca_secret(&server).expect("a replica created the Secret");
    let root = &secret["ca.crt"];
    assert!(root.starts_with("-----BEGIN CERTIFICATE-----") && secret["ca.key"].contains("PRIVATE KEY"), "{secret:?}");
    let created: Vec<Write> =
        server.system_writes().into_iter().filter(|w| w.method == "POST" && w.path.ends_with("/secrets")).collect();
    assert_eq!(created.iter().filter(|w| w.status == 201).count(), 1, "created once: {created:#?}");
    assert!(created.iter().all(|w| w.status == 201 || w.status == 409), "{created:#?}");

    // Both sign with it (and serve the bundle with its root), whichever created it.
    for (replica, name) in [(&a, "a"), (&b, "b")] {
        let ca_dir = replica.dir.path().join("state/ca");
        assert_eq!(&std::fs::read_to_string(ca_dir.join("ca.crt")).unwrap(), root, "{name}");
        assert_eq!(std::fs::read_to_string(ca_dir.join("ca.key")).unwrap(), secret["ca.key"], "{name}");
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(ca_dir.join("ca.key")).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "{name}");
        assert_eq!(served_roots(replica).first(), Some(root), "{name}");
    }
    // The nodes' copy of the root, beside the Secret (ztunnel never mounts the Secret).
    let copy = eventually("the nodes' ConfigMap weft-ca-root", || server.applied(CA_ROOT_IN_SYSTEM)).await;
    assert_eq!(&copy["data"]["root-cert.pem"], root);

    // A replica replacing one (a new pod, an empty state directory) signs with the same root.
    a.stop().await;
    let c = Running::launch(&server, "ca-secret-c", "c", keep_ca).await;
    assert_eq!(&std::fs::read_to_string(c.dir.path().join("state/ca/ca.crt")).unwrap(), root);
    assert_eq!(ca_secret(&server).unwrap(), secret, "never overwritten");
    b.stop().await;
    c.stop().await;
}

#[tokio::test]
async fn an_operators_ca_secret_is_used_as_it_is_and_its_rotation_taken_up() {
    let server = ApiServer::with_cluster().await;
    let (first_cert, first_key) = hbone::ca::Ca::new_root("operator root 1").unwrap().to_pem();
    server.put_secret("weft-system", "weft-ca", json!({"ca.crt": base64(&first_cert), "ca.key": base64(&first_key)}));
    let controller = Running::launch(&server, "ca-plug-in", "", |c| {
        c.ca_secret = Some("weft-ca".into());
        c.ca_secret_refresh = Duration::from_millis(200);
    })
    .await;
    let copy = eventually("the nodes' ConfigMap", || server.applied(CA_ROOT_IN_SYSTEM)).await;
    assert_eq!(copy["data"]["root-cert.pem"], first_cert.as_str());
    assert!(
        server.system_writes().iter().all(|w| !w.path.contains("/secrets")),
        "the operator's Secret is not written: {:#?}",
        server.system_writes()
    );

    // The operator rotates: the new CA signs, the old root stays trusted meanwhile (the
    // Secret's extra roots), and the nodes' copy follows.
    let (second_cert, second_key) = hbone::ca::Ca::new_root("operator root 2").unwrap().to_pem();
    server.put_secret(
        "weft-system",
        "weft-ca",
        json!({"ca.crt": base64(&second_cert), "ca.key": base64(&second_key), "extra-roots.pem": base64(&first_cert)}),
    );
    let both = format!("{second_cert}{first_cert}");
    eventually("the new bundle in the nodes' ConfigMap", || {
        server.applied(CA_ROOT_IN_SYSTEM).filter(|c| c["data"]["root-cert.pem"] == both.as_str())
    })
    .await;
    assert_eq!(served_roots(&controller), [second_cert.clone(), first_cert.clone()]);
    controller.stop().await;
}

#[tokio::test]
async fn the_applied_objects_pass_the_kubernetes_schemas_the_manifests_are_checked_against() {
    let server = ApiServer::with_cluster().await;
    let controller = Running::start(&server, "schemas").await;
    let deployed = eventually("the Deployment", || server.applied(&deployment_path("shop", "waypoint"))).await;
    let objects = [
        server.applied(&service_account_path("shop", "waypoint")).unwrap(),
        server.applied(&ca_root_path("shop")).unwrap(),
        deployed,
    ];
    controller.stop().await;

    // manifests/check/validate.py, as `manifests/check.sh` runs it: built-in kinds against the
    // Kubernetes schemas, strictly (an unknown field is an error), and the wiring (the pods'
    // ServiceAccount, volumes and probe port). The CRD goes along for the checks of its own.
    let modules = "import jsonschema, yaml, kubernetes_validate";
    match std::process::Command::new("python3").args(["-c", modules]).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            return skip_or_fail(&format!(
                "python3 cannot import the manifests' checkers (pip install jsonschema PyYAML kubernetes-validate): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Err(e) => return skip_or_fail(&format!("python3 cannot be run ({e})")),
    }
    let dir = TempDir::new("schemas");
    let file = dir.path().join("applied.yaml");
    let docs: Vec<String> = objects.iter().map(|o| serde_json::to_string_pretty(o).unwrap()).collect();
    std::fs::write(&file, docs.join("\n---\n")).unwrap();
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    let out = std::process::Command::new("python3")
        .arg(manifests.join("check/validate.py"))
        .arg(&file)
        .arg(manifests.join("crds/authorizationpolicies.security.weft.dev.yaml"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}\n{}", String::from_utf8_lossy(&out.stderr));
    for object in ["ServiceAccount shop/waypoint", "ConfigMap shop/weft-ca-root", "Deployment shop/waypoint"] {
        assert!(
            report.lines().any(|l| l.starts_with(&format!("ok    {object} against Kubernetes"))),
            "{object} not checked: {report}"
        );
    }
    assert!(report.lines().any(|l| l.starts_with("ok    wiring:")), "{report}");
}

/// Without a tool: a loud failure under `CI=true`, a `SKIPPED` banner elsewhere.
fn skip_or_fail(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{why}");
    }
    eprintln!("\n*** SKIPPED: {why} ***\n");
}

/// Waits until `f` returns a non-empty list, for [`EVENTUAL`] at most.
async fn eventually_async<T, F: Future<Output = Vec<T>>>(f: impl Fn() -> F) -> Vec<T> {
    let deadline = tokio::time::Instant::now() + EVENTUAL;
    loop {
        let found = f().await;
        if !found.is_empty() {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- TokenReview ----

fn reviewer(server: &ApiServer) -> TokenReviewer {
    TokenReviewer::new(server.client())
}

fn node(name: &str) -> Caller {
    Caller::Node(NodeName::new(name).unwrap())
}

fn account(namespace: &str, name: &str) -> Caller {
    Caller::ServiceAccount(ServiceAccount::new(namespace, name).unwrap())
}

fn ztunnel_user(extra: Value) -> Value {
    json!({"username": "system:serviceaccount:weft-system:ztunnel", "uid": "u-1",
           "groups": ["system:serviceaccounts", "system:serviceaccounts:weft-system"], "extra": extra})
}

#[tokio::test]
async fn a_ztunnel_token_bound_to_a_pod_names_its_node() {
    let server = ApiServer::start().await;
    server.token(
        "bound",
        &["weft-controller"],
        ztunnel_user(json!({"authentication.kubernetes.io/node-name": ["node-1"],
                            "authentication.kubernetes.io/pod-name": ["ztunnel-abcde"]})),
    );
    let reviewer = reviewer(&server);
    assert_eq!(reviewer.review("bound").await.unwrap(), node("node-1"));
    let asked = server.reviews();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0]["spec"], json!({"token": "bound", "audiences": ["weft-controller"]}));

    // Cached: the API server is not asked again.
    assert_eq!(reviewer.authenticate("bound").await.unwrap(), node("node-1"));
    assert_eq!(server.reviews().len(), 1);
    // Unless caching is off.
    let uncached = TokenReviewer::new(server.client()).with_cache_ttl(Duration::ZERO);
    uncached.review("bound").await.unwrap();
    uncached.review("bound").await.unwrap();
    assert_eq!(server.reviews().len(), 3);
}

#[tokio::test]
async fn without_the_node_name_the_bound_pod_says_where_it_runs() {
    let server = ApiServer::start().await;
    let mut ztunnel = pod("weft-system", "ztunnel-abcde", "node-7", "10.0.0.7", json!({"app": "ztunnel"}));
    ztunnel["metadata"]["uid"] = json!("pod-uid-1");
    server.apply(ztunnel);
    let pod_only = |uid: &str| {
        ztunnel_user(json!({"authentication.kubernetes.io/pod-name": ["ztunnel-abcde"],
                            "authentication.kubernetes.io/pod-uid": [uid]}))
    };
    server.token("old-api-server", &["weft-controller"], pod_only("pod-uid-1"));
    server.token("replaced-pod", &["weft-controller"], pod_only("pod-uid-0"));
    server.token(
        "gone-pod",
        &["weft-controller"],
        ztunnel_user(json!({"authentication.kubernetes.io/pod-name": ["ztunnel-zzzzz"]})),
    );
    server.token("unbound", &["weft-controller"], ztunnel_user(json!({})));
    let reviewer = reviewer(&server);

    assert_eq!(reviewer.review("old-api-server").await.unwrap(), node("node-7"));
    for token in ["replaced-pod", "gone-pod", "unbound"] {
        let err = reviewer.review(token).await.unwrap_err();
        assert!(matches!(err, AuthError::TokenRefused(_)) && err.is_unauthenticated(), "{token}: {err}");
    }
}

#[tokio::test]
async fn another_service_accounts_token_is_that_service_account_never_a_node() {
    let server = ApiServer::start().await;
    // A waypoint's token, bound to its pod on node-1: the binding does not make it node-1's.
    let on_node_1 = json!({"authentication.kubernetes.io/node-name": ["node-1"],
                           "authentication.kubernetes.io/pod-name": ["wp-0"]});
    server.token(
        "waypoint",
        &["weft-controller"],
        json!({"username": "system:serviceaccount:shop:wp", "extra": on_node_1.clone()}),
    );
    // ztunnel's service account name in another namespace is no ztunnel.
    server.token(
        "fake-ztunnel",
        &["weft-controller"],
        json!({"username": "system:serviceaccount:shop:ztunnel", "extra": on_node_1}),
    );
    server.token("unbound-waypoint", &["weft-controller"], json!({"username": "system:serviceaccount:shop:wp"}));
    let reviewer = reviewer(&server);

    let waypoint = reviewer.review("waypoint").await.unwrap();
    assert_eq!(waypoint, account("shop", "wp"));
    assert_eq!(waypoint.to_string(), "service account shop/wp");
    assert_eq!(reviewer.review("fake-ztunnel").await.unwrap(), account("shop", "ztunnel"));
    assert_eq!(reviewer.review("unbound-waypoint").await.unwrap(), account("shop", "wp"));
    assert_eq!(server.reviews().len(), 3);
    // Cached as a node's is.
    assert_eq!(reviewer.authenticate("waypoint").await.unwrap(), account("shop", "wp"));
    assert_eq!(server.reviews().len(), 3);
}

#[tokio::test]
async fn tokens_that_are_not_proxies_for_this_controller_are_refused() {
    let server = ApiServer::start().await;
    let node = json!({"authentication.kubernetes.io/node-name": ["node-1"]});
    server.token("other-audience", &["https://kubernetes.default.svc"], ztunnel_user(node.clone()));
    server.token("a-user", &["weft-controller"], json!({"username": "alice", "groups": ["system:authenticated"]}));
    server.token(
        "a-node",
        &["weft-controller"],
        json!({"username": "system:node:node-1", "groups": ["system:nodes"], "extra": node.clone()}),
    );
    server.token(
        "bad-account-name",
        &["weft-controller"],
        json!({"username": "system:serviceaccount:shop:Web_1", "extra": node.clone()}),
    );
    let reviewer = reviewer(&server);

    let err = reviewer.review("expired-or-unknown").await.unwrap_err();
    assert!(matches!(err, AuthError::TokenRefused(ref why) if why.contains("invalid bearer token")), "{err}");
    let err = reviewer.review("other-audience").await.unwrap_err();
    assert!(matches!(err, AuthError::TokenRefused(_)), "{err}");
    for (token, username) in [("a-user", "alice"), ("a-node", "system:node:node-1")] {
        let err = reviewer.review(token).await.unwrap_err();
        assert!(matches!(err, AuthError::NotServiceAccount { username: ref u } if u == username), "{token}: {err}");
        assert!(err.is_unauthenticated(), "a 401, not a failure of the controller");
    }
    let err = reviewer.review("bad-account-name").await.unwrap_err();
    assert!(matches!(err, AuthError::InvalidServiceAccount { .. }) && err.is_unauthenticated(), "{err}");
    assert_eq!(server.reviews().len(), 5, "refusals are not cached");
    assert!(reviewer.review("a-user").await.is_err());
    assert_eq!(server.reviews().len(), 6);

    // The API server failing is not the caller's fault; one that keeps answering 503 (which
    // the client retries for minutes) is given up on.
    server.fail_reviews(Some(hyper::StatusCode::INTERNAL_SERVER_ERROR));
    let err = reviewer.review("anything").await.unwrap_err();
    assert!(matches!(err, AuthError::Review(_)) && !err.is_unauthenticated(), "{err}");
    server.fail_reviews(Some(hyper::StatusCode::SERVICE_UNAVAILABLE));
    let impatient = TokenReviewer::new(server.client()).with_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let err = impatient.review("anything").await.unwrap_err();
    assert!(matches!(err, AuthError::Review(ref why) if why.contains("no answer")), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn in_a_cluster_controller_tokens_and_service_account_tokens_both_work() {
    let server = ApiServer::start().await;
    server.token(
        "bound",
        &["weft-controller"],
        ztunnel_user(json!({"authentication.kubernetes.io/node-name": ["node-1"]})),
    );
    let dir = TempDir::new("both-credentials");
    let tokens = Tokens::open(dir.path()).unwrap();
    let vm = tokens.issue(&node("vm-1"));
    let vm_waypoint = tokens.issue(&account("shop", "wp"));
    let auth = KubernetesAuth { tokens, reviewer: reviewer(&server) };

    assert_eq!(auth.authenticate(&vm).await.unwrap(), node("vm-1"));
    assert_eq!(auth.authenticate(&vm_waypoint).await.unwrap(), account("shop", "wp"));
    assert_eq!(server.reviews().len(), 0, "a controller token is never sent to the API server");
    assert_eq!(auth.authenticate("bound").await.unwrap(), node("node-1"));
    let forged = vm.replacen("vm-1", "vm-2", 1);
    assert!(matches!(auth.authenticate(&forged).await, Err(AuthError::BadSignature { .. })));
    let forged = vm_waypoint.replacen("shop", "bank", 1);
    assert!(matches!(auth.authenticate(&forged).await, Err(AuthError::BadSignature { .. })));
    assert_eq!(server.reviews().len(), 1, "nor a forged one");
}

/// A client of `controller`'s API as a ztunnel of `node` holding `token`.
fn api_client(controller: &Running, token: &str, node: &str) -> ztunnel::control::client::Client {
    use rustls::pki_types::pem::PemObject;
    let roots = rustls::pki_types::CertificateDer::pem_slice_iter(controller.root_pem().as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let token_file = controller.dir.path().join(format!("token-{node}-{}", token.len()));
    std::fs::write(&token_file, token).unwrap();
    let addr = controller.bound.as_ref().unwrap().api_addr;
    ztunnel::control::client::Client::new(ztunnel::control::client::Endpoint {
        host: addr.ip().to_string(),
        port: addr.port(),
        server_name: rustls::pki_types::ServerName::try_from("weft-controller.weft-system.svc").unwrap(),
        roots,
        token_file,
        subscriber: meshapi::watch::Subscriber::Node(node.to_owned()),
    })
    .unwrap()
}

/// The answer to a CSR for `shop/<account>`: the HTTP status and reason of a refusal, or 200.
async fn csr_answer(client: &ztunnel::control::client::Client, account: &str) -> (u16, String) {
    let identity = hbone::SpiffeId::new("cluster.local", "shop", account).unwrap();
    let (csr, _key) = hbone::ca::new_csr(&identity).unwrap();
    let request = meshapi::certificate::CertificateRequest { csr, ttl_seconds: None };
    match client.certificate(&request).await {
        Ok(_) => (200, String::new()),
        Err(ztunnel::control::client::ControlError::Refused { status, reason, .. }) => (status.as_u16(), reason),
        Err(other) => panic!("no answer: {other}"),
    }
}

#[tokio::test]
async fn a_node_token_reviewed_by_the_api_server_obtains_its_own_nodes_identities_only() {
    let server = ApiServer::with_cluster().await;
    let bound_to = |node: &str| ztunnel_user(json!({"authentication.kubernetes.io/node-name": [node]}));
    server.token("node-1-token", &["weft-controller"], bound_to("node-1"));
    server.token("other-audience", &["https://kubernetes.default.svc"], bound_to("node-1"));
    let controller = Running::start(&server, "node-authz").await;

    // web-0 runs on node-1, api-0 on node-2 (both enrolled).
    let node_1 = api_client(&controller, "node-1-token", "node-1");
    assert_eq!(csr_answer(&node_1, "web").await, (200, String::new()), "node-1's own workload");
    assert_eq!(csr_answer(&node_1, "api").await, (403, "forbidden_identity".to_owned()), "node-2's workload");
    // A token the API server does not know (expired, revoked) or one for another audience.
    for token in ["expired-or-unknown", "other-audience"] {
        let client = api_client(&controller, token, "node-1");
        assert_eq!(csr_answer(&client, "web").await, (401, "bad_credential".to_owned()), "{token}");
    }
    controller.stop().await;
}

/// An API server faked at the HTTP level: enough of list, watch, TokenReview and server-side
/// apply for the controller's client, with knobs for what real ones do (history compaction,
/// bookmarks, restarts, kinds not served, writes forbidden in a namespace).
mod apiserver {
    use std::collections::{BTreeMap, BTreeSet, HashMap};
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use http_body_util::combinators::BoxBody;
    use http_body_util::{BodyExt, Channel, Full};
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper::{Method, Request, Response, StatusCode};
    use hyper_util::rt::TokioIo;
    use serde_json::{Value, json};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;
    use tokio::task::JoinHandle;

    type Body = BoxBody<Bytes, Infallible>;

    /// The kinds served: plural, apiVersion, kind, the collection's path.
    const KINDS: [(&str, &str, &str, &str); 6] = [
        ("namespaces", "v1", "Namespace", "/api/v1/namespaces"),
        ("pods", "v1", "Pod", "/api/v1/pods"),
        ("services", "v1", "Service", "/api/v1/services"),
        ("gateways", "gateway.networking.k8s.io/v1", "Gateway", "/apis/gateway.networking.k8s.io/v1/gateways"),
        ("httproutes", "gateway.networking.k8s.io/v1", "HTTPRoute", "/apis/gateway.networking.k8s.io/v1/httproutes"),
        (
            "authorizationpolicies",
            "security.weft.dev/v1alpha1",
            "AuthorizationPolicy",
            "/apis/security.weft.dev/v1alpha1/authorizationpolicies",
        ),
    ];
    const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

    pub struct ApiServer {
        addr: SocketAddr,
        state: Arc<Mutex<State>>,
        accept: Mutex<Option<JoinHandle<()>>>,
    }

    /// What the server holds; tests change it directly inside [`ApiServer::disconnect`] and
    /// [`ApiServer::expire_watches`].
    #[derive(Default)]
    pub struct State {
        /// The cluster's resourceVersion: one more per change.
        version: u64,
        objects: BTreeMap<&'static str, BTreeMap<(String, String), Value>>,
        /// Every change, for watches resuming from a version.
        log: Vec<Logged>,
        /// Watches from a version older than this are refused with 410 (the history before
        /// it is compacted away).
        oldest: u64,
        /// Answer a too-old watch with an HTTP 410 instead of an ERROR event.
        pub gone_as_http_status: bool,
        watches: Vec<Watch>,
        unserved: BTreeSet<&'static str>,
        review_failure: Option<StatusCode>,
        lists: HashMap<&'static str, usize>,
        watched_from: HashMap<&'static str, u64>,
        tokens: HashMap<String, (Vec<String>, Value)>,
        reviews: Vec<Value>,
        connections: Vec<JoinHandle<()>>,
        /// Every write request (anything but GET and TokenReviews), in order.
        writes: Vec<Write>,
        /// Objects written by server-side apply, by their path.
        applied: BTreeMap<String, Value>,
        /// Namespaces where writes are refused with 403, as without a RoleBinding.
        forbidden: BTreeSet<String>,
        /// Leases by `<namespace>/<name>`.
        leases: BTreeMap<String, Value>,
        /// Secrets by `<namespace>/<name>`.
        pub secrets: BTreeMap<String, Value>,
        /// GatewayClasses (cluster-scoped), by name.
        classes: BTreeMap<String, Value>,
        /// Clients (their `x-client` header) whose requests are answered 503, as when a
        /// network partition separates them from the API server.
        partitioned: BTreeSet<String>,
    }

    /// One write request as it arrived, and what it was answered.
    #[derive(Debug, Clone)]
    pub struct Write {
        pub at: Instant,
        /// The client's `x-client` header (empty without one).
        pub client: String,
        pub method: String,
        pub path: String,
        pub query: HashMap<String, String>,
        pub content_type: String,
        pub status: u16,
    }

    struct Logged {
        version: u64,
        plural: &'static str,
        kind: &'static str,
        object: Value,
    }

    struct Watch {
        plural: &'static str,
        lines: mpsc::UnboundedSender<Bytes>,
    }

    impl ApiServer {
        /// A server holding the cluster the tests start from ([`super::cluster`]).
        pub async fn with_cluster() -> ApiServer {
            let server = ApiServer::start().await;
            for object in super::cluster() {
                server.apply(object);
            }
            server
        }

        pub async fn start() -> ApiServer {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let state = Arc::new(Mutex::new(State::default()));
            let accept = tokio::spawn(accept(listener, state.clone()));
            ApiServer { addr, state, accept: Mutex::new(Some(accept)) }
        }

        /// A client of this server: plain HTTP, no credentials.
        pub fn client(&self) -> kube::Client {
            self.client_named("")
        }

        /// A client whose requests carry `x-client: <name>`, so that [`Write::client`] tells
        /// controllers apart.
        pub fn client_named(&self, name: &str) -> kube::Client {
            let mut config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
            if !name.is_empty() {
                config.headers.push(("x-client".parse().unwrap(), name.parse().unwrap()));
            }
            kube::Client::try_from(config).unwrap()
        }

        /// The Lease `namespace/name`, as stored.
        pub fn lease(&self, namespace: &str, name: &str) -> Option<Value> {
            self.state().leases.get(&format!("{namespace}/{name}")).cloned()
        }

        /// Answers every request of `client` with 503 (or again normally).
        pub fn partition(&self, client: &str, cut: bool) {
            let mut state = self.state();
            if cut {
                state.partitioned.insert(client.to_owned());
            } else {
                state.partitioned.remove(client);
            }
        }

        /// An object as stored (with its status).
        pub fn object(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
            let (plural, ..) = kind_of(kind);
            self.state().objects.get(plural)?.get(&(namespace.to_owned(), name.to_owned())).cloned()
        }

        fn state(&self) -> std::sync::MutexGuard<'_, State> {
            self.state.lock().unwrap()
        }

        pub fn apply(&self, object: Value) {
            self.state().apply(object);
        }

        pub fn delete(&self, kind: &str, namespace: Option<&str>, name: &str) {
            self.state().delete(kind, namespace, name);
        }

        /// Ends every watch, changes what `change` does with no watch open, and only then
        /// takes watch requests again.
        pub fn disconnect(&self, change: impl FnOnce(&mut State)) {
            let mut state = self.state();
            state.watches.clear();
            change(&mut state);
        }

        /// Changes what `change` does without telling the open watches (they fell behind),
        /// compacts the history, and ends them with an ERROR event of code 410.
        pub fn expire_watches(&self, change: impl FnOnce(&mut State)) {
            let mut state = self.state();
            let watches = std::mem::take(&mut state.watches);
            change(&mut state);
            state.compact();
            let gone = format!("{}\n", json!({"type": "ERROR", "object": too_old()}));
            for watch in watches {
                let _ = watch.lines.send(Bytes::from(gone.clone()));
            }
        }

        /// Waits until a watch of `plural` is open (the watcher opens it after its list).
        pub async fn watching(&self, plural: &str) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !self.state().watches.iter().any(|w| w.plural == plural && !w.lines.is_closed()) {
                assert!(tokio::time::Instant::now() < deadline, "no watch of {plural}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        /// Sends a BOOKMARK at the current version to the watches of `plural`; returns it.
        pub fn bookmark(&self, plural: &str) -> u64 {
            let state = self.state();
            let (_, api_version, kind, _) = kind_of_plural(plural);
            let line = json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": kind,
                              "metadata": {"resourceVersion": state.version.to_string()}}});
            for watch in state.watches.iter().filter(|w| w.plural == plural) {
                let _ = watch.lines.send(Bytes::from(format!("{line}\n")));
            }
            state.version
        }

        /// Goes away for `down` (every connection cut, the port closed), with `change`
        /// made meanwhile, and comes back on the same port with the same history.
        pub async fn restart(&self, down: Duration, change: impl FnOnce(&mut State)) {
            let accepting = self.accept.lock().unwrap().take();
            if let Some(task) = accepting {
                task.abort();
                let _ = task.await;
            }
            {
                let mut state = self.state();
                state.watches.clear();
                for connection in state.connections.drain(..) {
                    connection.abort();
                }
                change(&mut state);
            }
            tokio::time::sleep(down).await;
            let listener = TcpListener::bind(self.addr).await.unwrap();
            *self.accept.lock().unwrap() = Some(tokio::spawn(accept(listener, self.state.clone())));
        }

        /// Answers 404 for `plural`, as for a CRD not installed.
        pub fn unserve(&self, plural: &'static str) {
            self.state().unserved.insert(plural);
        }

        pub fn serve(&self, plural: &'static str) {
            self.state().unserved.remove(plural);
        }

        /// How many times `plural` was listed.
        pub fn lists(&self, plural: &str) -> usize {
            self.state().lists.get(plural).copied().unwrap_or(0)
        }

        /// The resourceVersion the last watch of `plural` started from.
        pub fn watched_from(&self, plural: &str) -> Option<u64> {
            self.state().watched_from.get(plural).copied()
        }

        /// A service-account token the server knows: its audiences and its user.
        pub fn token(&self, token: &str, audiences: &[&str], user: Value) {
            let audiences = audiences.iter().map(|a| a.to_string()).collect();
            self.state().tokens.insert(token.to_owned(), (audiences, user));
        }

        /// Answers TokenReviews with this status (none: answers them).
        pub fn fail_reviews(&self, status: Option<StatusCode>) {
            self.state().review_failure = status;
        }

        /// Every TokenReview received.
        pub fn reviews(&self) -> Vec<Value> {
            self.state().reviews.clone()
        }

        /// Refuses writes in `namespace` with 403, as RBAC does without a RoleBinding there.
        pub fn forbid_writes(&self, namespace: &str) {
            self.state().forbidden.insert(namespace.to_owned());
        }

        pub fn allow_writes(&self, namespace: &str) {
            self.state().forbidden.remove(namespace);
        }

        /// Every write request so far of an object in another namespace than the
        /// controller's (the waypoints' objects): not of a Lease, a status, the CA.
        pub fn writes(&self) -> Vec<Write> {
            self.all_writes()
                .into_iter()
                .filter(|w| {
                    !w.path.starts_with(LEASES)
                        && !w.path.ends_with("/status")
                        && !w.path.contains("/namespaces/weft-system/")
                })
                .collect()
        }

        /// Every write request so far in the controller's namespace (its CA Secret, the
        /// nodes' ConfigMap; not its Lease).
        pub fn system_writes(&self) -> Vec<Write> {
            self.all_writes()
                .into_iter()
                .filter(|w| w.path.contains("/namespaces/weft-system/") && !w.path.starts_with(LEASES))
                .collect()
        }

        /// Stores a Secret as an operator would create it.
        pub fn put_secret(&self, namespace: &str, name: &str, data: Value) {
            let mut state = self.state();
            state.version += 1;
            let secret = json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                "metadata": {"name": name, "namespace": namespace,
                                             "resourceVersion": state.version.to_string()},
                                "data": data});
            state.secrets.insert(format!("{namespace}/{name}"), secret);
        }

        /// Stores a GatewayClass naming `controller`.
        pub fn put_class(&self, name: &str, controller: &str) {
            let mut state = self.state();
            state.version += 1;
            let class = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
                               "metadata": {"name": name, "generation": 1,
                                            "resourceVersion": state.version.to_string()},
                               "spec": {"controllerName": controller}});
            state.classes.insert(name.to_owned(), class);
        }

        pub fn class(&self, name: &str) -> Option<Value> {
            self.state().classes.get(name).cloned()
        }

        pub fn secret(&self, namespace: &str, name: &str) -> Option<Value> {
            self.state().secrets.get(&format!("{namespace}/{name}")).cloned()
        }

        /// Every write of a status subresource so far.
        pub fn status_writes(&self) -> Vec<Write> {
            self.all_writes().into_iter().filter(|w| w.path.ends_with("/status")).collect()
        }

        /// Every write request so far.
        pub fn all_writes(&self) -> Vec<Write> {
            self.state().writes.clone()
        }

        /// The object applied at `path` (`/apis/apps/v1/namespaces/shop/deployments/waypoint`).
        pub fn applied(&self, path: &str) -> Option<Value> {
            self.state().applied.get(path).cloned()
        }

        /// The uid the server gave an object.
        pub fn uid(&self, kind: &str, namespace: &str, name: &str) -> String {
            let (plural, ..) = kind_of(kind);
            let state = self.state();
            let object = &state.objects[plural][&(namespace.to_owned(), name.to_owned())];
            object["metadata"]["uid"].as_str().unwrap().to_owned()
        }
    }

    impl Drop for ApiServer {
        fn drop(&mut self) {
            if let Some(accept) = self.accept.lock().unwrap().take() {
                accept.abort();
            }
            for connection in self.state().connections.drain(..) {
                connection.abort();
            }
        }
    }

    impl State {
        pub fn apply(&mut self, mut object: Value) {
            let (plural, ..) = kind_of(object["kind"].as_str().unwrap());
            self.version += 1;
            object["metadata"]["resourceVersion"] = json!(self.version.to_string());
            let key = key(&object);
            // Kept across updates, as the API server keeps an object's uid.
            let uid = self.objects.get(plural).and_then(|o| o.get(&key)).map(|o| o["metadata"]["uid"].clone());
            if object["metadata"].get("uid").is_none() {
                object["metadata"]["uid"] = uid.unwrap_or_else(|| json!(format!("uid-{plural}-{}", self.version)));
            }
            // One more per change the test makes (a status write keeps it), as for a spec change;
            // the status written so far is kept, as the API server keeps it across spec updates.
            let old = self.objects.get(plural).and_then(|o| o.get(&key));
            let generation = old.and_then(|o| o["metadata"]["generation"].as_i64()).unwrap_or(0) + 1;
            object["metadata"]["generation"] = json!(generation);
            if object.get("status").is_none()
                && let Some(status) = old.and_then(|o| o.get("status"))
            {
                object["status"] = status.clone();
            }
            let objects = self.objects.entry(plural).or_default();
            let kind = if objects.contains_key(&key) { "MODIFIED" } else { "ADDED" };
            objects.insert(key, object.clone());
            self.record(plural, kind, object);
        }

        pub fn delete(&mut self, kind: &str, namespace: Option<&str>, name: &str) {
            let (plural, ..) = kind_of(kind);
            let key = (namespace.unwrap_or_default().to_owned(), name.to_owned());
            let Some(mut object) = self.objects.entry(plural).or_default().remove(&key) else {
                panic!("no {kind} {name} to delete");
            };
            self.version += 1;
            object["metadata"]["resourceVersion"] = json!(self.version.to_string());
            self.record(plural, "DELETED", object);
        }

        /// Forgets the history up to now: a watch from an older version gets 410.
        pub fn compact(&mut self) {
            self.oldest = self.version;
        }

        fn record(&mut self, plural: &'static str, kind: &'static str, object: Value) {
            let line = Bytes::from(format!("{}\n", json!({"type": kind, "object": object})));
            self.watches.retain(|w| w.plural != plural || w.lines.send(line.clone()).is_ok());
            self.log.push(Logged { version: self.version, plural, kind, object });
        }
    }

    fn key(object: &Value) -> (String, String) {
        let meta = &object["metadata"];
        (meta["namespace"].as_str().unwrap_or_default().to_owned(), meta["name"].as_str().unwrap().to_owned())
    }

    fn kind_of(kind: &str) -> (&'static str, &'static str, &'static str, &'static str) {
        KINDS.into_iter().find(|k| k.2 == kind).unwrap_or_else(|| panic!("the fake does not serve {kind}"))
    }

    fn kind_of_plural(plural: &str) -> (&'static str, &'static str, &'static str, &'static str) {
        KINDS.into_iter().find(|k| k.0 == plural).unwrap()
    }

    fn too_old() -> Value {
        json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
               "message": "too old resource version", "reason": "Expired", "code": 410})
    }

    async fn accept(listener: TcpListener, state: Arc<Mutex<State>>) {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let for_requests = state.clone();
            let connection = tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let state = for_requests.clone();
                    async move { Ok::<_, Infallible>(handle(req, state).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
            });
            let mut state = state.lock().unwrap();
            state.connections.retain(|c| !c.is_finished());
            state.connections.push(connection);
        }
    }

    fn full(status: StatusCode, body: Value) -> Response<Body> {
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
        *response.status_mut() = status;
        response.headers_mut().insert("content-type", "application/json".parse().unwrap());
        response
    }

    fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
        let body = json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                          "message": message, "reason": reason, "code": code.as_u16()});
        full(code, body)
    }

    async fn handle(req: Request<Incoming>, state: Arc<Mutex<State>>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let client = req.headers().get("x-client").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        if state.lock().unwrap().partitioned.contains(&client) {
            return status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", "partitioned");
        }
        let query: HashMap<String, String> = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();

        if req.method() == Method::POST && path == TOKEN_REVIEWS {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let review: Value = serde_json::from_slice(&body).unwrap();
            return token_review(&mut state.lock().unwrap(), review);
        }
        if req.method() != Method::GET {
            let method = req.method().to_string();
            let content_type =
                req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let mut state = state.lock().unwrap();
            let response = if path.starts_with(LEASES) {
                lease(&mut state, &method, &path, Some(&body))
            } else if let Some(rest) = path.strip_prefix("/api/v1/namespaces/").filter(|r| r.contains("/secrets")) {
                secret(&mut state, &method, rest, Some(&body))
            } else if let Some(rest) = path.strip_prefix(CLASSES) {
                class(&mut state, &method, rest, &content_type, Some(&body))
            } else {
                write(&mut state, &method, &path, &query, &content_type, &body)
            };
            state.writes.push(Write {
                at: Instant::now(),
                client,
                method,
                path,
                query,
                content_type,
                status: response.status().as_u16(),
            });
            return response;
        }
        let mut state = state.lock().unwrap();
        if path.starts_with(LEASES) {
            return lease(&mut state, "GET", &path, None);
        }
        if let Some(rest) = path.strip_prefix("/api/v1/namespaces/").filter(|r| r.contains("/secrets")) {
            return secret(&mut state, "GET", rest, None);
        }
        if let Some(rest) = path.strip_prefix(CLASSES) {
            return class(&mut state, "GET", rest, "", None);
        }
        if let Some((plural, namespace, name)) = object_path(&path) {
            let key = (namespace.clone(), name.clone());
            return match state.objects.get(plural).and_then(|o| o.get(&key)) {
                Some(object) => full(StatusCode::OK, object.clone()),
                None => status(StatusCode::NOT_FOUND, "NotFound", &format!("{plural} \"{name}\" not found")),
            };
        }
        if let Some(name) = path.strip_prefix("/api/v1/namespaces/weft-system/pods/") {
            let key = ("weft-system".to_owned(), name.to_owned());
            return match state.objects.get("pods").and_then(|p| p.get(&key)) {
                Some(pod) => full(StatusCode::OK, pod.clone()),
                None => status(StatusCode::NOT_FOUND, "NotFound", &format!("pods \"{name}\" not found")),
            };
        }
        let Some((plural, api_version, kind, _)) = KINDS.into_iter().find(|k| k.3 == path) else {
            return status(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource");
        };
        if state.unserved.contains(plural) {
            return status(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource");
        }
        if !matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
            *state.lists.entry(plural).or_default() += 1;
            // Items of a list of a core kind leave out apiVersion and kind, as the real one.
            let items: Vec<Value> = state
                .objects
                .get(plural)
                .map(|o| o.values().cloned().collect::<Vec<Value>>())
                .unwrap_or_default()
                .into_iter()
                .map(|mut item| {
                    if api_version == "v1"
                        && let Some(fields) = item.as_object_mut()
                    {
                        fields.remove("apiVersion");
                        fields.remove("kind");
                    }
                    item
                })
                .collect();
            let list = json!({"apiVersion": api_version, "kind": format!("{kind}List"),
                              "metadata": {"resourceVersion": state.version.to_string()}, "items": items});
            return full(StatusCode::OK, list);
        }

        let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        state.watched_from.insert(plural, from);
        if from < state.oldest {
            if state.gone_as_http_status {
                return status(StatusCode::GONE, "Expired", "too old resource version");
            }
            let line = format!("{}\n", json!({"type": "ERROR", "object": too_old()}));
            return Response::new(Full::new(Bytes::from(line)).boxed());
        }
        let (lines, mut receiver) = mpsc::unbounded_channel();
        for logged in state.log.iter().filter(|l| l.plural == plural && l.version > from) {
            let line = json!({"type": logged.kind, "object": logged.object});
            let _ = lines.send(Bytes::from(format!("{line}\n")));
        }
        state.watches.push(Watch { plural, lines });
        let (mut sender, body) = Channel::<Bytes, Infallible>::new(16);
        tokio::spawn(async move {
            while let Some(line) = receiver.recv().await {
                if sender.send_data(line).await.is_err() {
                    return;
                }
            }
        });
        Response::new(body.boxed())
    }

    /// Server-side apply (`PATCH` with `application/apply-patch+yaml`) of a namespaced object,
    /// as far as the controller uses it: the object stored as applied, with a uid and a
    /// resourceVersion; `201` when it is new. Anything else is refused.
    fn write(
        state: &mut State,
        method: &str,
        path: &str,
        query: &HashMap<String, String>,
        content_type: &str,
        body: &Value,
    ) -> Response<Body> {
        // /api/v1/namespaces/<ns>/<plural>/<name> or /apis/<group>/<version>/namespaces/...
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let at = parts.iter().position(|p| *p == "namespaces");
        let (Some(at), "PATCH") = (at, method) else {
            return status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", &format!("{method} {path}"));
        };
        if let [namespace, plural, name, "status"] = parts[at + 1..] {
            return write_status(state, path, namespace, plural, name, content_type, body);
        }
        let [namespace, plural, name] = parts[at + 1..] else {
            return status(StatusCode::NOT_FOUND, "NotFound", &format!("no such object {path}"));
        };
        if state.forbidden.contains(namespace) {
            let message = format!(
                "{plural} \"{name}\" is forbidden: User \"system:serviceaccount:weft-system:weft-controller\" cannot \
                 patch resource \"{plural}\" in the namespace \"{namespace}\""
            );
            return status(StatusCode::FORBIDDEN, "Forbidden", &message);
        }
        if content_type != "application/apply-patch+yaml" {
            return status(StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedMediaType", content_type);
        }
        if query.get("fieldManager").is_none_or(|m| m.is_empty()) {
            return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "fieldManager is required for apply requests");
        }
        if body["metadata"]["name"] != name || body["metadata"]["namespace"].as_str().is_some_and(|n| n != namespace) {
            return status(StatusCode::BAD_REQUEST, "BadRequest", "the name of the object does not match the request");
        }
        state.version += 1;
        let mut object = body.clone();
        let uid = state.applied.get(path).map(|o| o["metadata"]["uid"].clone());
        let created = uid.is_none();
        object["metadata"]["uid"] = uid.unwrap_or_else(|| json!(format!("uid-applied-{}", state.version)));
        object["metadata"]["namespace"] = json!(namespace);
        object["metadata"]["resourceVersion"] = json!(state.version.to_string());
        state.applied.insert(path.to_owned(), object.clone());
        full(if created { StatusCode::CREATED } else { StatusCode::OK }, object)
    }

    /// `/apis/<group>/<version>/namespaces/<ns>/<plural>/<name>` of a served kind: its plural,
    /// namespace and name.
    fn object_path(path: &str) -> Option<(&'static str, String, String)> {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let at = parts.iter().position(|p| *p == "namespaces")?;
        let [namespace, plural, name] = parts[at + 1..] else { return None };
        let collection = format!("/{}/{plural}", parts[..at].join("/"));
        let (plural, ..) = KINDS.into_iter().find(|k| k.3 == collection)?;
        Some((plural, namespace.to_owned(), name.to_owned()))
    }

    /// A JSON merge patch (RFC 7386) of an object's `status`, refused with 409 when it names
    /// another `resourceVersion` than the object's.
    fn write_status(
        state: &mut State,
        path: &str,
        namespace: &str,
        plural: &str,
        name: &str,
        content_type: &str,
        body: &Value,
    ) -> Response<Body> {
        let Some((plural, ..)) = KINDS.into_iter().find(|k| k.0 == plural) else {
            return status(StatusCode::NOT_FOUND, "NotFound", &format!("no such object {path}"));
        };
        if content_type != "application/merge-patch+json" {
            return status(StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedMediaType", content_type);
        }
        let key = (namespace.to_owned(), name.to_owned());
        let Some(mut object) = state.objects.get(plural).and_then(|o| o.get(&key)).cloned() else {
            return status(StatusCode::NOT_FOUND, "NotFound", &format!("{plural} \"{name}\" not found"));
        };
        if let Some(version) = body["metadata"]["resourceVersion"].as_str()
            && Some(version) != object["metadata"]["resourceVersion"].as_str()
        {
            let message = format!(
                "Operation cannot be fulfilled on {plural} \"{name}\": the object has been modified; please apply \
                 your changes to the latest version and try again"
            );
            return status(StatusCode::CONFLICT, "Conflict", &message);
        }
        merge_patch(&mut object["status"], &body["status"]);
        state.version += 1;
        object["metadata"]["resourceVersion"] = json!(state.version.to_string());
        state.objects.get_mut(plural).unwrap().insert(key, object.clone());
        state.record(plural, "MODIFIED", object.clone());
        full(StatusCode::OK, object)
    }

    fn merge_patch(target: &mut Value, patch: &Value) {
        let Value::Object(fields) = patch else {
            *target = patch.clone();
            return;
        };
        if !target.is_object() {
            *target = json!({});
        }
        for (key, value) in fields {
            if value.is_null() {
                target.as_object_mut().unwrap().remove(key);
            } else {
                merge_patch(&mut target[key], value);
            }
        }
    }

    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/";
    const CLASSES: &str = "/apis/gateway.networking.k8s.io/v1/gatewayclasses/";

    /// GatewayClasses (`<name>`, `<name>/status`): GET, and a status merge patch refused with
    /// 409 when it names another `resourceVersion`.
    fn class(state: &mut State, method: &str, rest: &str, content_type: &str, body: Option<&Value>) -> Response<Body> {
        let parts: Vec<&str> = rest.split('/').collect();
        let not_found =
            |name: &str| status(StatusCode::NOT_FOUND, "NotFound", &format!("gatewayclasses \"{name}\" not found"));
        match (method, parts.as_slice(), body) {
            ("GET", &[name], _) => match state.classes.get(name) {
                Some(class) => full(StatusCode::OK, class.clone()),
                None => not_found(name),
            },
            ("PATCH", &[name, "status"], Some(body)) => {
                if content_type != "application/merge-patch+json" {
                    return status(StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedMediaType", content_type);
                }
                state.version += 1;
                let version = state.version.to_string();
                let Some(class) = state.classes.get_mut(name) else { return not_found(name) };
                if body["metadata"]["resourceVersion"]
                    .as_str()
                    .is_some_and(|v| Some(v) != class["metadata"]["resourceVersion"].as_str())
                {
                    return status(StatusCode::CONFLICT, "Conflict", "the object has been modified");
                }
                merge_patch(&mut class["status"], &body["status"]);
                class["metadata"]["resourceVersion"] = json!(version);
                full(StatusCode::OK, class.clone())
            }
            _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", &format!("{method} {rest}")),
        }
    }

    /// Secrets (`<ns>/secrets[/<name>]`): GET, and POST refused with 409 when it exists.
    fn secret(state: &mut State, method: &str, rest: &str, body: Option<&Value>) -> Response<Body> {
        let parts: Vec<&str> = rest.split('/').collect();
        match (method, parts.as_slice(), body) {
            ("GET", &[namespace, "secrets", name], _) => match state.secrets.get(&format!("{namespace}/{name}")) {
                Some(secret) => full(StatusCode::OK, secret.clone()),
                None => status(StatusCode::NOT_FOUND, "NotFound", &format!("secrets \"{name}\" not found")),
            },
            ("POST", &[namespace, "secrets"], Some(body)) => {
                let name = body["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                let key = format!("{namespace}/{name}");
                if state.secrets.contains_key(&key) {
                    return status(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        &format!("secrets \"{name}\" already exists"),
                    );
                }
                state.version += 1;
                let mut secret = body.clone();
                secret["apiVersion"] = json!("v1");
                secret["kind"] = json!("Secret");
                secret["metadata"]["resourceVersion"] = json!(state.version.to_string());
                state.secrets.insert(key, secret.clone());
                full(StatusCode::CREATED, secret)
            }
            _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", &format!("{method} {rest}")),
        }
    }

    /// Leases: GET, POST (409 if it exists), PUT (409 unless the `resourceVersion` is the
    /// stored one).
    fn lease(state: &mut State, method: &str, path: &str, body: Option<&Value>) -> Response<Body> {
        let rest = &path[LEASES.len()..];
        let (namespace, name) = match rest.split('/').collect::<Vec<_>>()[..] {
            [namespace, "leases"] => (namespace, None),
            [namespace, "leases", name] => (namespace, Some(name)),
            _ => return status(StatusCode::NOT_FOUND, "NotFound", path),
        };
        let not_found = |name: &str| status(StatusCode::NOT_FOUND, "NotFound", &format!("leases \"{name}\" not found"));
        let conflict = |name: &str| {
            status(StatusCode::CONFLICT, "Conflict", &format!("Operation cannot be fulfilled on leases \"{name}\""))
        };
        match (method, name, body) {
            ("GET", Some(name), _) => match state.leases.get(&format!("{namespace}/{name}")) {
                Some(lease) => full(StatusCode::OK, lease.clone()),
                None => not_found(name),
            },
            ("POST", None, Some(body)) => {
                let name = body["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                let key = format!("{namespace}/{name}");
                if state.leases.contains_key(&key) {
                    return status(StatusCode::CONFLICT, "AlreadyExists", &format!("leases \"{name}\" already exists"));
                }
                store_lease(state, namespace, key, body, StatusCode::CREATED)
            }
            ("PUT", Some(name), Some(body)) => {
                let key = format!("{namespace}/{name}");
                let Some(stored) = state.leases.get(&key) else { return not_found(name) };
                if body["metadata"]["resourceVersion"] != stored["metadata"]["resourceVersion"] {
                    return conflict(name);
                }
                store_lease(state, namespace, key, body, StatusCode::OK)
            }
            _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", &format!("{method} {path}")),
        }
    }

    /// Stores `body` as the Lease `key` at a new resourceVersion; answers it with `code`.
    fn store_lease(state: &mut State, namespace: &str, key: String, body: &Value, code: StatusCode) -> Response<Body> {
        state.version += 1;
        let mut lease = body.clone();
        lease["apiVersion"] = json!("coordination.k8s.io/v1");
        lease["kind"] = json!("Lease");
        lease["metadata"]["namespace"] = json!(namespace);
        lease["metadata"]["resourceVersion"] = json!(state.version.to_string());
        state.leases.insert(key, lease.clone());
        full(code, lease)
    }

    /// Answers as the API server does: authenticated only for an audience both the token
    /// and the review name, with those audiences in the status.
    fn token_review(state: &mut State, review: Value) -> Response<Body> {
        if let Some(code) = state.review_failure {
            return status(code, "InternalError", "etcd is down");
        }
        state.reviews.push(review.clone());
        let token = review["spec"]["token"].as_str().unwrap_or_default();
        let asked: Vec<String> = serde_json::from_value(review["spec"]["audiences"].clone()).unwrap_or_default();
        let status = match state.tokens.get(token) {
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
            Some((audiences, user)) => {
                let both: Vec<&String> = asked.iter().filter(|a| audiences.contains(a)).collect();
                if both.is_empty() {
                    json!({"authenticated": false, "error": "token audiences is invalid for the target audiences"})
                } else {
                    json!({"authenticated": true, "user": user, "audiences": both})
                }
            }
        };
        let answer = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {},
                            "spec": review["spec"], "status": status});
        full(StatusCode::CREATED, answer)
    }
}
