//! The controller's API in process, on loopback: the real controller (`app::build`) reading a
//! YAML directory, called through the client proxies use (ztunnel's, which the waypoint
//! reuses) with controller tokens of nodes and of service accounts. What it proves: a
//! service account watches, acknowledges and obtains a certificate as itself only, and only
//! for its own identity while a waypoint runs as it; a node keeps exactly its rights; the
//! admin page lists service accounts apart from nodes, and the metrics name no caller.

use std::path::{Path, PathBuf};
use std::time::Duration;

use controller::app::{self, Bound};
use controller::auth::{Caller, NodeName, ServiceAccount, Tokens};
use controller::config::Config;
use hbone::ca::new_csr;
use hbone::{Credentials, SpiffeId};
use meshapi::certificate::CertificateRequest;
use meshapi::watch::{Ack, Subscriber};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztunnel::control::client::{Client, ControlError, Endpoint};

/// How long a change of the directory may take to reach the model: the controller is woken
/// by inotify, and polls every 100 ms here.
const EVENTUAL: Duration = Duration::from_secs(10);

const NAMESPACE: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled}}
";

/// A workload on node-1, the waypoint `wp` with its pod on node-1, and a Gateway `wp2` of the
/// waypoint class whose pod is not there yet.
const CLUSTER: &str = "
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web}}
spec: {nodeName: node-1, serviceAccountName: web, containers: [{name: web, image: web}]}
status: {phase: Running, podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp}}
spec: {nodeName: node-1, serviceAccountName: wp, containers: [{name: waypoint, image: weft}]}
status: {phase: Running, podIP: 10.244.1.20}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec: {gatewayClassName: weft-waypoint}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp2, namespace: shop}
spec: {gatewayClassName: weft-waypoint}
";

const WP2_POD: &str = "
apiVersion: v1
kind: Pod
metadata: {name: wp2-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp2}}
spec: {nodeName: node-2, serviceAccountName: wp2, containers: [{name: waypoint, image: weft}]}
status: {phase: Running, podIP: 10.244.2.20}
";

/// A controller on loopback, its directories, and its token key.
struct Controller {
    bound: Option<Bound>,
    dir: TempDir,
    tokens: Tokens,
}

impl Controller {
    async fn start(test: &str) -> Controller {
        let dir = TempDir::new(test);
        std::fs::create_dir_all(dir.path().join("cluster")).unwrap();
        std::fs::write(dir.path().join("cluster/namespace.yaml"), NAMESPACE).unwrap();
        std::fs::write(dir.path().join("cluster/shop.yaml"), CLUSTER).unwrap();
        let loopback = "127.0.0.1:0".parse().unwrap();
        let config = Config {
            source_dir: Some(dir.path().join("cluster")),
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
            server_names: vec!["127.0.0.1".into()],
            api_addr: loopback,
            admin_addr: loopback,
            metrics_addr: loopback,
            readiness_addr: loopback,
            poll_interval: Duration::from_millis(100),
            heartbeat: Duration::from_secs(15),
            history_bytes: 1 << 20,
            waypoints: Default::default(),
            election: Default::default(),
        };
        let bound = app::build(config).await.expect("the controller starts");
        let tokens = Tokens::open(&dir.path().join("state")).unwrap();
        Controller { bound: Some(bound), dir, tokens }
    }

    fn bound(&self) -> &Bound {
        self.bound.as_ref().expect("running")
    }

    /// A client holding `caller`'s token, naming `subscriber` in its watches.
    fn client_as(&self, caller: &Caller, subscriber: Subscriber) -> Client {
        let file = self.dir.path().join(format!("token-{}", self.dir.next()));
        std::fs::write(&file, self.tokens.issue(caller)).unwrap();
        self.client_with(file, subscriber)
    }

    fn client_with(&self, token_file: PathBuf, subscriber: Subscriber) -> Client {
        let root = std::fs::read(self.dir.path().join("state/root-cert.pem")).unwrap();
        let roots = CertificateDer::pem_slice_iter(&root).collect::<Result<Vec<_>, _>>().unwrap();
        let addr = self.bound().api_addr;
        Client::new(Endpoint {
            host: addr.ip().to_string(),
            port: addr.port(),
            server_name: addr.ip().into(),
            roots,
            token_file,
            subscriber,
        })
        .unwrap()
    }

    /// The client of `caller`, naming itself.
    fn client(&self, caller: &Caller) -> Client {
        self.client_as(caller, caller.subscriber())
    }

    fn write(&self, file: &str, yaml: &str) {
        std::fs::write(self.dir.path().join("cluster").join(file), yaml).unwrap();
    }

    fn remove(&self, file: &str) {
        std::fs::remove_file(self.dir.path().join("cluster").join(file)).unwrap();
    }

    async fn status(&self) -> Value {
        serde_json::from_str(&get(self.bound().admin_addr, "/status").await).unwrap()
    }

    async fn metrics(&self) -> String {
        get(self.bound().metrics_addr, "/metrics").await
    }

    async fn stop(mut self) {
        if let Some(bound) = self.bound.take() {
            bound.shutdown().await;
        }
    }
}

fn node(name: &str) -> Caller {
    Caller::Node(NodeName::new(name).unwrap())
}

fn account(namespace: &str, name: &str) -> Caller {
    Caller::ServiceAccount(ServiceAccount::new(namespace, name).unwrap())
}

fn id(namespace: &str, service_account: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", namespace, service_account).unwrap()
}

/// Asks for a certificate for `identity`; on success, checks the chain holds the CSR's key
/// and names `identity`.
async fn certificate(client: &Client, identity: &SpiffeId) -> Result<Credentials, ControlError> {
    let (csr, key) = new_csr(identity).unwrap();
    let answer = client.certificate(&CertificateRequest { csr, ttl_seconds: None }).await?;
    let chain =
        answer.certificate_chain.iter().map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()).collect();
    let creds = Credentials::new(chain, key).expect("the chain holds the CSR's key");
    assert_eq!(creds.identity(), identity);
    Ok(creds)
}

/// Asserts that the controller refused with `status` and `reason`; returns its message.
fn refused<T: std::fmt::Debug>(result: Result<T, ControlError>, status: u16, reason: &str) -> String {
    match result {
        Err(ControlError::Refused { status: got, reason: why, error, .. }) => {
            assert_eq!((got.as_u16(), why.as_str()), (status, reason), "{error}");
            error
        }
        other => panic!("expected a {status} {reason} refusal, got {other:?}"),
    }
}

/// The first message of a watch, decoded as JSON.
async fn first_message(client: &Client) -> Result<Value, ControlError> {
    let mut lines = client.watch(None).await?;
    let line = tokio::time::timeout(EVENTUAL, lines.next()).await.expect("a first message").unwrap().unwrap();
    Ok(serde_json::from_str(&line).unwrap())
}

/// The resource `kind` `name` of a snapshot.
fn resource<'a>(snapshot: &'a Value, kind: &str, name: &str) -> Option<&'a Value> {
    snapshot["resources"].as_array().unwrap().iter().find(|r| r["kind"] == kind && r["name"] == name)
}

#[tokio::test]
async fn a_waypoint_watches_acknowledges_and_obtains_its_own_identity_only() {
    let controller = Controller::start("waypoint").await;
    let wp = account("shop", "wp");
    let client = controller.client(&wp);

    // The watch: the same stream as a node's.
    let snapshot = first_message(&client).await.expect("a service account may watch as itself");
    assert_eq!(snapshot["type"], "snapshot");
    let waypoint = resource(&snapshot, "Waypoint", "shop/wp").expect("the waypoint is in the model");
    assert_eq!(waypoint["spec"]["serviceAccount"], "wp");
    let pod = resource(&snapshot, "Workload", "shop/wp-0").expect("its pod is a workload");
    assert_eq!(pod["spec"]["enrolled"], false, "a waypoint's pod is not captured");
    assert_eq!(resource(&snapshot, "Workload", "shop/web-0").unwrap()["spec"]["enrolled"], true);

    // The acknowledgement names it; the admin page lists it apart from the nodes.
    let version = snapshot["version"].as_u64().unwrap();
    let epoch = snapshot["epoch"].as_str().unwrap().to_owned();
    let ack = Ack { subscriber: wp.subscriber(), epoch: epoch.clone(), version, rejected: vec![] };
    client.ack(&ack).await.expect("acknowledged");
    let status = controller.status().await;
    let listed = &status["serviceAccounts"]["shop/wp"];
    assert_eq!(listed["acked"]["version"], version, "{status}");
    assert_eq!(listed["subscribers"], 1, "the open watch: {status}");
    assert_eq!(status["nodes"], serde_json::json!({}), "no node subscribed: {status}");

    // Its own identity: signed.
    certificate(&client, &id("shop", "wp")).await.expect("its own identity");
    // Not the identity of a workload beside it on node-1, which node-1's ztunnel may obtain.
    let error = refused(certificate(&client, &id("shop", "web")).await, 403, "forbidden_identity");
    assert!(error.contains("service account shop/wp may obtain only its own identity spiffe://cluster.local/ns/shop/sa/wp, not spiffe://cluster.local/ns/shop/sa/web"), "{error}");
    certificate(&controller.client(&node("node-1")), &id("shop", "web")).await.expect("node-1 may");
    // Nor its own name in another trust domain.
    let foreign = SpiffeId::new("other.domain", "shop", "wp").unwrap();
    refused(certificate(&client, &foreign).await, 403, "forbidden_identity");

    // As itself only: another service account's or a node's stream and acknowledgement are
    // refused, whatever the token's holder names.
    for other in [Subscriber::service_account("shop/api").unwrap(), Subscriber::Node("node-1".into())] {
        let impostor = controller.client_as(&wp, other.clone());
        let error = refused(first_message(&impostor).await, 403, "other_caller");
        assert_eq!(error, format!("service account shop/wp may act only for itself, not for {other}"));
        let ack = Ack { subscriber: other, epoch: epoch.clone(), version, rejected: vec![] };
        refused(client.ack(&ack).await, 403, "other_caller");
    }
    // A node may not watch as the service account either.
    let node_1 = controller.client_as(&node("node-1"), wp.subscriber());
    let error = refused(first_message(&node_1).await, 403, "other_node");
    assert_eq!(error, "node node-1 may not act for service account shop/wp");

    // Metrics count by API and result, never by caller.
    let metrics = controller.metrics().await;
    assert!(metrics.contains("weft_controller_certificates_total{result=\"forbidden_identity\"} 2"), "{metrics}");
    for caller in ["shop/wp", "node-1", "shop/api"] {
        assert!(!metrics.contains(caller), "a label names {caller}:\n{metrics}");
    }
    controller.stop().await;
}

#[tokio::test]
async fn a_service_account_obtains_its_identity_only_while_a_waypoint_runs_as_it() {
    let controller = Controller::start("while-waypoint").await;
    let client = controller.client(&account("shop", "wp2"));
    let wp2 = id("shop", "wp2");

    // The Gateway exists, but no pod of it has an address: no waypoint in the model.
    let error = refused(certificate(&client, &wp2).await, 403, "forbidden_identity");
    assert!(error.starts_with("service account shop/wp2 serves no waypoint"), "{error}");
    assert!(error.contains("a Gateway of class weft-waypoint named wp2 in namespace shop"), "{error}");
    first_message(&client).await.expect("it may watch meanwhile: the model is every proxy's");

    // Its pod runs: the waypoint appears, and the identity is issued.
    controller.write("wp2.yaml", WP2_POD);
    let deadline = tokio::time::Instant::now() + EVENTUAL;
    loop {
        match certificate(&client, &wp2).await {
            Ok(_) => break,
            Err(e) if e.reason() == Some("forbidden_identity") && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("not issued once its pod runs: {e}"),
        }
    }

    // The Gateway deleted: no longer.
    controller.write(
        "shop.yaml",
        &CLUSTER.replace("metadata: {name: wp2, namespace: shop}", "metadata: {name: wp3, namespace: shop}"),
    );
    let deadline = tokio::time::Instant::now() + EVENTUAL;
    loop {
        match certificate(&client, &wp2).await {
            Err(e) if e.reason() == Some("forbidden_identity") => break,
            Ok(_) if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("still issued after its Gateway went: {other:?}"),
        }
    }
    controller.remove("wp2.yaml");
    controller.stop().await;
}

#[tokio::test]
async fn service_account_tokens_are_checked_like_node_tokens() {
    let controller = Controller::start("sa-tokens").await;
    let wp = account("shop", "wp");
    let other_key = TempDir::new("sa-tokens-other-key");
    let foreign = Tokens::open(other_key.path()).unwrap().issue(&wp);
    let token = controller.tokens.issue(&wp);
    let (signed, mac) = token.rsplit_once('.').unwrap();
    let flipped = if mac.ends_with('A') { 'B' } else { 'A' };
    let tampered = format!("{signed}.{}{flipped}", &mac[..mac.len() - 1]);
    let moved = token.replacen("weftsa.v1.shop.wp", "weftsa.v1.shop.api", 1);

    for (what, bad) in [("another key's", foreign), ("tampered", tampered), ("renamed", moved)] {
        let file = controller.dir.path().join(format!("bad-{what}"));
        std::fs::write(&file, bad).unwrap();
        let client = controller.client_with(file, wp.subscriber());
        refused(first_message(&client).await, 401, "bad_credential");
        refused(certificate(&client, &id("shop", "wp")).await, 401, "bad_credential");
    }
    controller.stop().await;
}

#[test]
fn the_command_line_issues_service_account_tokens() {
    let dir = TempDir::new("cli");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_weft-controller"))
            .arg("token")
            .args(args)
            .arg("--state-dir")
            .arg(dir.path())
            .env_remove("WEFT_STATE_DIR")
            .output()
            .unwrap()
    };
    let out = run(&["--service-account", "shop/wp"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap();
    assert!(token.starts_with("weftsa.v1.shop.wp."), "{token}");
    assert_eq!(Tokens::open(dir.path()).unwrap().verify(token.trim()).unwrap(), account("shop", "wp"));
    let out = run(&["--node", "node-1"]);
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    assert_eq!(Tokens::open(dir.path()).unwrap().verify(token.trim()).unwrap(), node("node-1"), "the same key");

    for (args, says) in [
        (&["--node", "node-1", "--service-account", "shop/wp"][..], "cannot be used with"),
        (&[][..], "required"),
        (&["--service-account", "wp"][..], "write it <namespace>/<name>"),
        (&["--service-account", "shop.eu/wp"][..], "the namespace has a dot"),
    ] {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(says), "{args:?}: {stderr}");
    }
}

/// `GET path` on a plain HTTP server (the admin and metrics pages); the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(EVENTUAL, tcp.read_to_string(&mut response)).await.unwrap().unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// A directory removed when dropped.
struct TempDir(PathBuf, std::sync::atomic::AtomicUsize);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("weft-controller-api-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path, Default::default())
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// A number not handed out before, for file names.
    fn next(&self) -> usize {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
