//! End-to-end tests of the controller's APIs and certificate authority in the
//! network-namespace lab (tier 3): the real `weft controller` in its pod on node 0, real
//! ztunnels, and clients that run inside lab namespaces (a node's, as a ztunnel would, or a
//! pod's). They need root; under `CI=true` a test that cannot get it fails instead of
//! skipping.
//!
//! What they prove: a node's credential gets certificates only for identities of workloads
//! scheduled on that node; bad cluster objects and bad API calls are each refused with a
//! reason while everything else keeps working; workload certificates renew under a live
//! tunnel; a root rotation (add the new root, sign with it, remove the old one) drops no
//! connection; and `docs/PROTOCOL.md`'s Python client works as written.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use hbone::ca::{Ca, new_csr};
use hbone::testing::{AllowAll, Pki, RunningServer, echo_server};
use hbone::tls::VerifyError;
use hbone::{ConnectError, ConnectRequest, Credentials, SpiffeId, TrustBundle, TrustStore, WorkloadCert};
use meshapi::certificate::CertificateRequest;
use meshapi::watch::Subscriber;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft::meshlab::{CONTROLLER_ADMIN_PORT, CONTROLLER_METRICS_PORT, MeshLab, PodSpec, ServiceSpec, sum_metric};
use ztunnel::control::client::{Client, ControlError, Endpoint};

const APP_PORT: u16 = 8080;

/// Certificate lifetime in the renewal and rotation tests: ztunnel renews at half of it, so
/// a certificate is replaced every ~10 s (its renewal check runs every 20 s / 8).
const SHORT_TTL: &str = "20s";

/// How long a change of the controller's files or directory may take to reach every ztunnel:
/// the controller polls every 100 ms in the lab and pushes at once.
const PROPAGATION: Duration = Duration::from_secs(10);

fn weft() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_weft"))
}

/// A two-node mesh programmed by a controller, or `None` (after a loud skip) when the lab
/// cannot run here.
fn mesh(test: &str) -> Option<MeshLab> {
    if !MeshLab::ready_here() {
        return None;
    }
    Some(MeshLab::new(test, 2, weft()).expect("building the lab"))
}

/// Whether `python3` (with the `cryptography` package when asked) runs here; a loud skip (a
/// failure under `CI=true`) if not.
fn python_ready(cryptography: bool) -> bool {
    let check = if cryptography { "import cryptography" } else { "import ssl" };
    match Command::new("python3").args(["-c", check]).output() {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            lab::skip_or_fail(format!(
                "python3 cannot `{check}` (Debian package python3-cryptography): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            false
        }
        Err(e) => {
            lab::skip_or_fail(format!("python3 is not installed: {e}"));
            false
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Replaces a file whole (a reader sees the old content or the new, never half of it).
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn id(mesh: &MeshLab, pod: &str) -> SpiffeId {
    mesh.spec(pod).identity().parse().unwrap()
}

fn pod_addr(mesh: &MeshLab, pod: &str, port: u16) -> SocketAddr {
    SocketAddr::from((mesh.pod(pod).ip(), port))
}

/// The lab's CA, which the controller signs with unless a test plugs in another.
fn lab_ca(mesh: &MeshLab) -> (Ca, String) {
    let (cert, key) = mesh.ca_files();
    let pem = read(&cert);
    (Ca::from_pem(&pem, &read(&key)).unwrap(), pem)
}

/// How node `node` reaches the controller's API with its own credential: the client ztunnel
/// uses, verifying the controller's certificate by its address under the lab's root, as
/// ztunnel does with `--controller-ca`.
fn endpoint(mesh: &MeshLab, node: usize) -> Endpoint {
    let (_, root) = lab_ca(mesh);
    let addr = mesh.controller_addr();
    Endpoint {
        host: addr.ip().to_string(),
        port: addr.port(),
        server_name: addr.ip().into(),
        roots: vec![der(&root).into()],
        token_file: mesh.node_token_file(node).unwrap(),
        subscriber: Subscriber::Node(MeshLab::node_name(node)),
    }
}

fn api_client(endpoint: Endpoint) -> Client {
    Client::new(endpoint).expect("the token file reads")
}

/// Runs `work` on a runtime whose one thread entered network namespace `netns` (a node's,
/// where its ztunnel runs, or a pod's): every socket it opens belongs there.
fn inside<T: Send>(netns: &lab::Netns, work: impl Future<Output = T> + Send) -> T {
    netns
        .run(move || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(work))
        .unwrap()
}

/// A certificate request for `identity` (the key is dropped: for refusals).
fn request_for(identity: &SpiffeId) -> CertificateRequest {
    CertificateRequest { csr: new_csr(identity).unwrap().0, ttl_seconds: None }
}

/// Asserts that the controller refused with `status` and `reason`.
fn assert_refused<T: std::fmt::Debug>(result: Result<T, ControlError>, status: u16, reason: &str) {
    match result {
        Err(ControlError::Refused { status: got, reason: why, error, .. }) => {
            assert_eq!((got.as_u16(), why.as_str()), (status, reason), "{error}");
        }
        other => panic!("expected a {status} {reason} refusal, got {other:?}"),
    }
}

/// The DER bytes of one PEM certificate.
fn der(pem: &str) -> Vec<u8> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("a PEM certificate");
    parsed.contents
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
}

/// Opens a tunnel through a loopback HBONE server that presents `creds`, with a client that
/// trusts only `roots` (PEM) and expects `identity`: the mesh's own check of a peer (the chain
/// to a root of the bundle, the server usage, the identity, the validity).
async fn presented_as(creds: Credentials, roots: &str, identity: &SpiffeId) -> Result<(), ConnectError> {
    let clients = Pki::new();
    let server =
        RunningServer::start(hbone::Config::default(), WorkloadCert::new(creds), &clients.trust, AllowAll).await;
    let target = echo_server().await;
    let client = hbone::Client::new(hbone::Config::default(), TrustStore::new(TrustBundle::from_pem(roots).unwrap()));
    let request = hbone::testing::request(&clients.workload("probe", "probe"), server.addr, identity, target);
    let mut tunnel = client.connect(request).await?;
    tunnel.write_all(b"verified").await.unwrap();
    let mut back = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(10), tunnel.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(&back, b"verified");
    Ok(())
}

/// A fresh HBONE handshake with the ztunnel serving pod `to` (its port 15008), made from
/// inside `from` (a namespace without capture: a node's), trusting only `roots` and
/// presenting `source`; then one echo through the tunnel to the pod's app. A new client each
/// time, so nothing is pooled: the handshake shows what the ztunnel presents now.
fn probe(from: &lab::Netns, mesh: &MeshLab, to: &str, roots: &str, source: &WorkloadCert) -> Result<(), ConnectError> {
    let request = ConnectRequest {
        source: source.clone(),
        source_ip: None,
        destination: pod_addr(mesh, to, 15008),
        expected: Arc::from(vec![id(mesh, to)]),
        target: pod_addr(mesh, to, APP_PORT),
        forwarded_for: None,
        baggage: None,
        traceparent: None,
    };
    let trust = TrustStore::new(TrustBundle::from_pem(roots).unwrap());
    inside(from, async move {
        let client = hbone::Client::new(hbone::Config::default(), trust);
        let mut tunnel = client.connect(request).await?;
        tunnel.write_all(b"probe").await.unwrap();
        let mut back = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), tunnel.read_exact(&mut back)).await.unwrap().unwrap();
        assert_eq!(&back, b"probe", "the app echoed through the probe's tunnel");
        Ok(())
    })
}

fn dump(mesh: &MeshLab, node: usize) -> serde_json::Value {
    serde_json::from_str(&mesh.node_http(node, 15000, "/config_dump").unwrap()).unwrap()
}

fn status(mesh: &MeshLab) -> serde_json::Value {
    serde_json::from_str(&mesh.controller_http(CONTROLLER_ADMIN_PORT, "/status").unwrap()).unwrap()
}

fn controller_metric(mesh: &MeshLab, name: &str, labels: &[(&str, &str)]) -> f64 {
    sum_metric(&mesh.controller_http(CONTROLLER_METRICS_PORT, "/metrics").unwrap(), name, labels)
}

/// Polls `done` every 100 ms until it holds or `timeout` passes; whether it held.
fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One short exchange on a new connection from pod `from` to `to`; whether it echoed.
fn exchange(mesh: &MeshLab, from: &str, to: SocketAddr) -> bool {
    let Ok(mut conn) = mesh.connect(from, to) else { return false };
    if conn.write_all(b"hello").is_err() {
        return false;
    }
    let mut back = [0u8; 5];
    matches!(conn.read_exact(&mut back), Ok(()) if &back == b"hello")
}

#[test]
fn node_authorization_refuses_certificates_for_other_nodes_workloads() {
    let Some(mut mesh) = mesh("ctl-nodeauthz") else { return };
    mesh.add_pod(PodSpec::new(0, "front", "web", "web")).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "api", "api")).unwrap();
    mesh.write_config().unwrap();
    mesh.start_controller(&[]).unwrap();
    let (web, api) = (id(&mesh, "web"), id(&mesh, "api"));
    let (_, lab_root) = lab_ca(&mesh);
    let elsewhere = Pki::new().root.to_pem().0;
    let client = api_client(endpoint(&mesh, 1));

    // From node 1's namespace, with node 1's credential, as its ztunnel would ask.
    inside(mesh.lab.nodes()[1].netns(), async {
        // web is scheduled on node 0: node 1 may not hold its identity.
        assert_refused(client.certificate(&request_for(&web)).await, 403, "forbidden_identity");

        // api is scheduled on node 1: signed, by the lab's root, for the key of the request.
        let (csr, key) = new_csr(&api).unwrap();
        let answer = client.certificate(&CertificateRequest { csr, ttl_seconds: None }).await.unwrap();
        assert_eq!(answer.trust_bundle.iter().map(|p| der(p)).collect::<Vec<_>>(), [der(&lab_root)]);
        let chain = answer.certificate_chain.iter().map(|p| der(p).into()).collect();
        let creds = Credentials::new(chain, key).expect("the chain holds the CSR's key");
        assert_eq!(creds.identity(), &api);
        assert_eq!(unix(creds.not_after()), answer.not_after, "notAfter is the leaf's expiry");
        let day_from_now = unix(SystemTime::now()) + 24 * 3600;
        assert!(answer.not_after.abs_diff(day_from_now) < 120, "the default lifetime, 24 h: {}", answer.not_after);
        presented_as(creds.clone(), &lab_root, &api).await.expect("the chain verifies to the lab's root");
        let err = presented_as(creds, &elsewhere, &api).await.expect_err("another root does not accept it");
        assert!(matches!(err.verify_error(), Some(VerifyError::UntrustedRoot)), "{err}");
    });

    let certificates = |result| controller_metric(&mesh, "weft_controller_certificates_total", &[("result", result)]);
    assert_eq!(certificates("forbidden_identity"), 1.0, "the refusal is counted");
    assert_eq!(certificates("issued"), 1.0);
    let line = mesh.controller().wait_for_log("reason=\"forbidden_identity\"", Duration::from_secs(5));
    let logs = line.expect("the refusal is logged");
    let line = logs.lines().find(|l| l.contains("forbidden_identity")).unwrap();
    assert!(
        line.contains("node node-1 runs no workload with identity spiffe://cluster.local/ns/front/sa/web"),
        "{line}"
    );
}

#[test]
fn bad_input_is_refused_with_a_reason_and_nothing_else_is_lost() {
    let Some(mut mesh) = mesh("ctl-badinput") else { return };
    mesh.add_pod(PodSpec::new(0, "front", "web", "web")).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "api", "api")).unwrap();
    let service = |name: &str, vip: u16| ServiceSpec {
        namespace: "back".into(),
        name: name.into(),
        vip: lab::addresses::service_vip(vip),
        port: 80,
        target_port: APP_PORT,
        app: "api".into(),
    };
    mesh.add_service(service("api", 10));
    mesh.start_ztunnels().unwrap();
    let app = mesh.start_echo("api", APP_PORT, None).unwrap();
    mesh.keep(app);
    mesh.wait_enrolled(0, 1).unwrap();
    mesh.wait_enrolled(1, 1).unwrap();
    let (vip, vip2) = (
        SocketAddr::from((lab::addresses::service_vip(10), 80)),
        SocketAddr::from((lab::addresses::service_vip(11), 80)),
    );
    assert!(exchange(&mesh, "web", vip), "the service works before");

    // A good change (a second service) and three bad files, together.
    mesh.add_service(service("api-v2", 11));
    mesh.write_config().unwrap();
    let dir = mesh.cluster_dir();
    // The flow mapping of `metadata` is never closed.
    write_atomically(
        &dir.join("broken.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: back\nspec: {}\n",
    );
    write_atomically(
        &dir.join("zero-port.yaml"),
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: zero, namespace: back}}\nspec:\n  clusterIP: {}\n  ports: [{{port: 0, targetPort: {APP_PORT}}}]\n  selector: {{app: api}}\n",
            lab::addresses::service_vip(12)
        ),
    );
    // Read without its unknown field, this would be an ALLOW policy without rules for api:
    // every connection to api denied.
    write_atomically(
        &dir.join("typo-policy.yaml"),
        "apiVersion: security.weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: typo, namespace: back}\nspec:\n  selector: {matchLabels: {app: api}}\n  action: ALLOW\n  rulez: [{from: [{principals: [\"spiffe://cluster.local/ns/front/sa/nobody\"]}]}]\n",
    );

    // The controller's status lists each, with where and what.
    let mut rejected = Vec::new();
    let listed = wait_until(PROPAGATION, || {
        rejected =
            status(&mesh)["rejected"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_owned()).collect();
        rejected.len() >= 3
    });
    assert!(listed, "three rejections listed: {rejected:#?}");
    assert_eq!(rejected.len(), 3, "{rejected:#?}");
    let find = |needle: &str| {
        rejected
            .iter()
            .find(|r| r.contains(needle))
            .unwrap_or_else(|| panic!("no rejection of {needle}: {rejected:#?}"))
    };
    let broken = find("broken.yaml");
    assert!(
        broken.contains(&format!("{}:", dir.join("broken.yaml").display())) && broken.contains("invalid YAML"),
        "{broken}"
    );
    let zero = find("Service back/zero");
    assert!(zero.contains(&dir.join("zero-port.yaml").display().to_string()), "the file is named: {zero}");
    assert!(zero.contains("spec.ports[0].port") && zero.contains("0 is not a port"), "{zero}");
    let typo = find("AuthorizationPolicy back/typo");
    assert!(typo.contains(&dir.join("typo-policy.yaml").display().to_string()), "the file is named: {typo}");
    assert!(typo.contains("spec.rulez") && typo.contains("unknown field `rulez`"), "{typo}");
    assert_eq!(controller_metric(&mesh, "weft_controller_source_rejections", &[]), 3.0);

    // The good change reached the proxies, the bad objects did not, traffic works.
    let holds = |node: usize, what: &str, name: &str| {
        dump(&mesh, node)[what].as_array().unwrap().iter().any(|s| s["name"] == name)
    };
    assert!(wait_until(PROPAGATION, || holds(0, "services", "api-v2")), "the new service reached node 0");
    assert!(exchange(&mesh, "web", vip2), "the new service works");
    assert!(exchange(&mesh, "web", vip), "the first service still works");
    assert!(exchange(&mesh, "web", pod_addr(&mesh, "api", APP_PORT)), "no half-read policy denies api");
    for node in 0..2 {
        assert!(
            !holds(node, "services", "zero") && !holds(node, "policies", "typo"),
            "node {node}: {}",
            dump(&mesh, node)
        );
        assert_eq!(
            mesh.metric(node, "weft_config_rejected_total", &[]).unwrap(),
            0.0,
            "nothing bad reached node {node}"
        );
    }
    assert_eq!(mesh.controller().try_status().unwrap(), None, "the controller keeps running");

    // The API: each bad call refused with its reason, from node 1 with node 1's credential.
    let good = endpoint(&mesh, 1);
    let other_node = Endpoint { subscriber: Subscriber::Node(MeshLab::node_name(0)), ..good.clone() };
    // Node 1's token with the last character of its MAC changed.
    let mut token = read(&good.token_file).trim().to_owned();
    let flipped = if token.ends_with('A') { 'B' } else { 'A' };
    token.pop();
    token.push(flipped);
    let tampered = Endpoint { token_file: mesh.lab.log_dir().join("tampered.token"), ..good.clone() };
    std::fs::write(&tampered.token_file, token).unwrap();
    let (web, api) = (id(&mesh, "web"), id(&mesh, "api"));
    let not_a_csr = "-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgcmVxdWVzdA==\n-----END CERTIFICATE REQUEST-----\n";
    let snapshot = inside(mesh.lab.nodes()[1].netns(), async {
        let client = api_client(good.clone());
        assert_refused(client.certificate(&request_for(&web)).await, 403, "forbidden_identity");
        let garbage = CertificateRequest { csr: not_a_csr.into(), ttl_seconds: None };
        assert_refused(client.certificate(&garbage).await, 400, "invalid_csr");
        assert_refused(api_client(other_node).watch(None).await.map(|_| ()), 403, "other_node");
        assert_refused(api_client(tampered.clone()).watch(None).await.map(|_| ()), 401, "bad_credential");
        assert_refused(api_client(tampered).certificate(&request_for(&api)).await, 401, "bad_credential");

        // A legitimate watch still works: a snapshot with the good objects only.
        let mut lines = client.watch(None).await.expect("node 1 may watch for node 1");
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next()).await.unwrap().unwrap().unwrap();
        serde_json::from_str::<serde_json::Value>(&line).unwrap()
    });
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    let names: Vec<String> = snapshot["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{} {}", r["kind"].as_str().unwrap(), r["name"].as_str().unwrap()))
        .collect();
    for present in ["Service back/api", "Service back/api-v2", "Workload back/api", "Workload front/web"] {
        assert!(names.iter().any(|n| n == present), "{present} in {names:?}");
    }
    assert!(!names.iter().any(|n| n.ends_with("/zero") || n.ends_with("/typo") || n.ends_with("/broken")), "{names:?}");

    // No credential at all: the mesh's client always sends one, so Python's standard library
    // makes this call.
    if python_ready(false) {
        let script = "import json, ssl, sys, urllib.error, urllib.request\n\
                      ctx = ssl.create_default_context(cafile=sys.argv[1])\n\
                      try:\n    urllib.request.urlopen(sys.argv[2] + '/v1/watch?node=node-1', context=ctx, timeout=10)\n    print('200')\n\
                      except urllib.error.HTTPError as e:\n    print(e.code, json.load(e)['reason'])\n";
        let mut cmd = Command::new("python3");
        cmd.args(["-c", script]).arg(mesh.ca_files().0).arg(format!("https://{}", mesh.controller_addr()));
        let out = mesh.lab.nodes()[1].netns().output(cmd, Duration::from_secs(30)).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "401 unauthenticated");
    }

    let certificates = |result| controller_metric(&mesh, "weft_controller_certificates_total", &[("result", result)]);
    assert_eq!(certificates("forbidden_identity"), 1.0);
    assert_eq!(certificates("invalid_csr"), 1.0);
    let requests =
        |api, code| controller_metric(&mesh, "weft_controller_requests_total", &[("api", api), ("code", code)]);
    assert_eq!(requests("watch", "403"), 1.0);
    assert!(requests("watch", "401") >= 1.0 && requests("certificates", "401") == 1.0);
    assert!(exchange(&mesh, "web", vip), "traffic still works at the end");
    assert_eq!(mesh.controller().try_status().unwrap(), None, "the controller keeps running");
}

/// Each identity's certificate expiry as node `node`'s ztunnel reports it.
fn expiry(mesh: &MeshLab, node: usize, identity: &SpiffeId) -> Option<u64> {
    let dump = dump(mesh, node);
    let certs = dump["certificates"].as_array()?;
    certs.iter().find(|c| c["identity"] == identity.as_str()).and_then(|c| c["notAfterUnix"].as_u64())
}

#[test]
fn certificates_rotate_without_dropping_tunnels() {
    let Some(mut mesh) = mesh("ctl-renew") else { return };
    mesh.add_pod(PodSpec::new(0, "front", "web", "web")).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "api", "api")).unwrap();
    mesh.write_config().unwrap();
    mesh.start_controller(&["--cert-ttl", SHORT_TTL, "--min-cert-ttl", "10s"]).unwrap();
    mesh.start_ztunnel(0, &["--cert-ttl", SHORT_TTL]).unwrap();
    mesh.start_ztunnel(1, &["--cert-ttl", SHORT_TTL]).unwrap();
    for pod in ["web", "api"] {
        let app = mesh.start_echo(pod, APP_PORT, None).unwrap();
        mesh.keep(app);
    }
    mesh.wait_enrolled(0, 1).unwrap();
    mesh.wait_enrolled(1, 1).unwrap();
    let (ca, root) = lab_ca(&mesh);
    let (web, api) = (id(&mesh, "web"), id(&mesh, "api"));
    let started = SystemTime::now();
    let first = (expiry(&mesh, 0, &web).unwrap(), expiry(&mesh, 1, &api).unwrap());
    assert!(first.0 <= unix(started) + 21 && first.1 <= unix(started) + 21, "20 s certificates: {first:?}");

    // One long-lived connection through both ztunnels, exchanging every second for 45 s.
    let mut tunnel = mesh.connect("web", pod_addr(&mesh, "api", APP_PORT)).unwrap();
    tunnel.write_all(b"hello\n").unwrap();
    let mut hello = [0u8; 6];
    tunnel.read_exact(&mut hello).unwrap();
    let mutual_tls =
        [("reporter", "source"), ("connection_security_policy", "mutual_tls"), ("destination_workload", "api")];
    let tunneled = mesh.metric(0, "istio_tcp_connections_opened_total", &mutual_tls).unwrap();
    assert_eq!(tunneled, 1.0, "the connection goes through both ztunnels over HBONE");
    let deadline = Instant::now() + Duration::from_secs(70);
    let (mut web_expiries, mut api_expiries) = (vec![first.0], vec![first.1]);
    for n in 0..45 {
        assert!(Instant::now() < deadline, "45 exchanges took over 70 s");
        let msg = format!("exchange {n:02}\n");
        tunnel.write_all(msg.as_bytes()).unwrap_or_else(|e| panic!("exchange {n}: writing: {e}"));
        let mut back = vec![0u8; msg.len()];
        tunnel.read_exact(&mut back).unwrap_or_else(|e| panic!("exchange {n}: reading the echo: {e}"));
        assert_eq!(back, msg.as_bytes(), "exchange {n}");
        for (list, node, identity) in [(&mut web_expiries, 0, &web), (&mut api_expiries, 1, &api)] {
            let now = expiry(&mesh, node, identity).expect("a certificate is held");
            assert!(now >= *list.last().unwrap(), "node {node}'s certificate expiry went back: {list:?} then {now}");
            if now != *list.last().unwrap() {
                list.push(now);
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    tunnel.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    tunnel.read_to_end(&mut rest).expect("the tunnel ends with a clean close, not a reset");
    assert!(rest.is_empty());

    // Renewed at half-life, again and again: 45 s of 20 s certificates.
    assert!(web_expiries.len() >= 3, "web's certificate renewed at least twice: {web_expiries:?}");
    assert!(api_expiries.len() >= 3, "api's certificate renewed at least twice: {api_expiries:?}");
    for node in 0..2 {
        let renewals = mesh.ztunnel(node).logs().unwrap().matches("renewed workload certificate").count();
        assert!(renewals >= 2, "node {node} logged {renewals} renewals");
    }
    // New handshakes present the renewed certificates: the first ones expired 25 s ago, and
    // the probe refuses an expired certificate.
    assert!(SystemTime::now() > SystemTime::UNIX_EPOCH + Duration::from_secs(first.0.max(first.1) + 5));
    let source = WorkloadCert::new(ca.issue(&web, Duration::from_secs(3600)).unwrap());
    probe(mesh.lab.nodes()[0].netns(), &mesh, "api", &root, &source)
        .expect("api's ztunnel presents a valid certificate");
    let source = WorkloadCert::new(ca.issue(&api, Duration::from_secs(3600)).unwrap());
    probe(mesh.lab.nodes()[1].netns(), &mesh, "web", &root, &source)
        .expect("web's ztunnel presents a valid certificate");
    let issued = controller_metric(&mesh, "weft_controller_certificates_total", &[("result", "issued")]);
    let held = (web_expiries.len() + api_expiries.len()) as f64;
    assert!(issued >= held, "the controller signed each of the {held} certificates seen: {issued}");
}

/// A client in pod `from` that opens a new connection to `to` every 200 ms and exchanges a
/// few bytes on it, until stopped (at most five minutes): it counts the exchanges that
/// worked and describes those that failed.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(usize, Vec<String>)>,
}

impl Traffic {
    fn start(mesh: &MeshLab, from: &str, to: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let netns = mesh.pod(from).netns().clone();
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            netns
                .run(move || {
                    let (started, mut ok, mut failed) = (Instant::now(), 0, Vec::new());
                    let mut n = 0u64;
                    while !stopped.load(Ordering::Acquire) && started.elapsed() < Duration::from_secs(300) {
                        n += 1;
                        match Traffic::exchange(to, n) {
                            Ok(()) => ok += 1,
                            Err(e) => failed.push(format!("connection {n} at {:?}: {e}", started.elapsed())),
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    (ok, failed)
                })
                .expect("entering the pod's namespace")
        });
        Traffic { stop, thread }
    }

    fn exchange(to: SocketAddr, n: u64) -> std::io::Result<()> {
        let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let msg = format!("connection {n:06}");
        conn.write_all(msg.as_bytes())?;
        let mut back = vec![0u8; msg.len()];
        conn.read_exact(&mut back)?;
        if back != msg.as_bytes() {
            return Err(std::io::Error::other("the echo differs"));
        }
        Ok(())
    }

    /// Stops the client; (exchanges that worked, failures).
    fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap()
    }
}

/// How many roots node `node`'s ztunnel trusts.
fn roots(mesh: &MeshLab, node: usize) -> u64 {
    dump(mesh, node)["trustBundle"]["roots"].as_u64().unwrap_or(0)
}

#[test]
fn root_rotation_adds_then_removes_a_root_without_failed_connections() {
    let Some(mut mesh) = mesh("ctl-rootrot") else { return };
    mesh.add_pod(PodSpec::new(0, "front", "web", "web")).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "api", "api")).unwrap();
    // The controller signs with copies of the lab's CA (root A), which the test rewrites.
    let (a, a_root) = lab_ca(&mesh);
    let b = Ca::new_root("weft lab root B").unwrap();
    let (b_root, b_key) = b.to_pem();
    let files = mesh.lab.log_dir().join("rotation");
    std::fs::create_dir_all(&files).unwrap();
    let (signing_cert, signing_key, extra) =
        (files.join("ca.crt"), files.join("ca.key"), files.join("extra-roots.pem"));
    write_atomically(&signing_cert, &a_root);
    write_atomically(&signing_key, &a.to_pem().1);
    write_atomically(&extra, "");
    mesh.set_controller_ca(&signing_cert, &signing_key);
    mesh.write_config().unwrap();
    let extra_arg = extra.display().to_string();
    let controller_args = ["--extra-roots", &extra_arg, "--cert-ttl", SHORT_TTL, "--min-cert-ttl", "10s"];
    mesh.start_controller(&controller_args).unwrap();
    mesh.start_ztunnel(0, &["--cert-ttl", SHORT_TTL]).unwrap();
    mesh.start_ztunnel(1, &["--cert-ttl", SHORT_TTL]).unwrap();
    for pod in ["web", "api"] {
        let app = mesh.start_echo(pod, APP_PORT, None).unwrap();
        mesh.keep(app);
    }
    mesh.wait_enrolled(0, 1).unwrap();
    mesh.wait_enrolled(1, 1).unwrap();
    assert_eq!((roots(&mesh, 0), roots(&mesh, 1)), (1, 1));
    let (traffic, since) = (Traffic::start(&mesh, "web", pod_addr(&mesh, "api", APP_PORT)), Instant::now());
    let mutual_tls =
        [("reporter", "source"), ("connection_security_policy", "mutual_tls"), ("destination_workload", "api")];

    // Probes: fresh handshakes from node 0's namespace to api's ztunnel and from node 1's to
    // web's, presenting a certificate of `by` and trusting only `roots`.
    let (web, api) = (id(&mesh, "web"), id(&mesh, "api"));
    let nodes: Vec<lab::Netns> = mesh.lab.nodes().iter().map(|n| n.netns().clone()).collect();
    let probe_both = |mesh: &MeshLab, by: &Ca, roots: &str| -> Vec<Result<(), ConnectError>> {
        let as_web = WorkloadCert::new(by.issue(&web, Duration::from_secs(3600)).unwrap());
        let as_api = WorkloadCert::new(by.issue(&api, Duration::from_secs(3600)).unwrap());
        vec![probe(&nodes[0], mesh, "api", roots, &as_web), probe(&nodes[1], mesh, "web", roots, &as_api)]
    };
    let untrusted = |r: &Result<(), ConnectError>| {
        matches!(r.as_ref().map_err(|e| e.verify_error()), Err(Some(VerifyError::UntrustedRoot)))
    };
    let refused_us = |r: &Result<(), ConnectError>| matches!(r, Err(e) if e.peer_alert().is_some());

    // Before: certificates chain to A; B is unknown to the ztunnels.
    assert!(probe_both(&mesh, &a, &a_root).iter().all(Result::is_ok), "A-signed certificates");
    assert!(probe_both(&mesh, &a, &b_root).iter().all(untrusted), "not B-signed yet");
    assert!(probe_both(&mesh, &b, &a_root).iter().all(refused_us), "a B-signed client is refused before B is trusted");

    // (a) B joins the extra roots: every ztunnel trusts both.
    write_atomically(&extra, &b_root);
    assert!(wait_until(PROPAGATION, || roots(&mesh, 0) == 2 && roots(&mesh, 1) == 2), "both nodes trust two roots");
    for node in 0..2 {
        // Log lines reach the file a few milliseconds after the state the admin API shows.
        let logged = || {
            let logs = mesh.ztunnel(node).logs().unwrap();
            logs.lines().any(|l| l.contains("trust bundle installed") && l.contains("roots=2"))
        };
        assert!(wait_until(Duration::from_secs(2), logged), "node {node}");
    }
    assert!(probe_both(&mesh, &b, &a_root).iter().all(Result::is_ok), "a B-signed client is now accepted");

    // (b) The controller signs with B; A stays trusted (now an extra root) while certificates
    // signed by it are alive. The extra roots first, so that no bundle ever lacks A.
    write_atomically(&extra, &format!("{a_root}{b_root}"));
    std::thread::sleep(Duration::from_millis(500));
    write_atomically(&signing_key, &b_key);
    write_atomically(&signing_cert, &b_root);
    mesh.controller()
        .wait_for_log("CA files changed: new trust bundle", PROPAGATION)
        .expect("the controller took up B");
    // Within one lifetime (20 s) every certificate is renewed, now by B.
    let mut last = Vec::new();
    let renewed = wait_until(Duration::from_secs(40), || {
        last = probe_both(&mesh, &b, &b_root);
        last.iter().all(Result::is_ok)
    });
    assert!(renewed, "every ztunnel presents a B-signed certificate: {last:?}");
    assert_eq!((roots(&mesh, 0), roots(&mesh, 1)), (2, 2));

    // (c) A leaves: one root; an A-signed peer is now refused both ways.
    write_atomically(&extra, "");
    assert!(wait_until(PROPAGATION, || roots(&mesh, 0) == 1 && roots(&mesh, 1) == 1), "both nodes trust one root");
    assert!(probe_both(&mesh, &b, &b_root).iter().all(Result::is_ok), "B-signed certificates, B trusted");
    assert!(probe_both(&mesh, &a, &b_root).iter().all(refused_us), "an A-signed client is refused");
    assert!(probe_both(&mesh, &b, &a_root).iter().all(untrusted), "nothing A-signed is presented any more");

    // A controller restarted after the rotation serves its API with a B-signed certificate:
    // every ztunnel reaches it again (it trusts the mesh's bundle, not only its
    // `--controller-ca`, which holds A alone) and keeps renewing.
    let expiries = (expiry(&mesh, 0, &web).unwrap(), expiry(&mesh, 1, &api).unwrap());
    let subscriptions =
        |mesh: &MeshLab, node| mesh.ztunnel(node).logs().unwrap().matches("subscribed to the controller").count();
    let before = (subscriptions(&mesh, 0), subscriptions(&mesh, 1));
    drop(mesh.take_controller());
    mesh.start_controller(&controller_args).unwrap();
    let back = wait_until(Duration::from_secs(20), || {
        subscriptions(&mesh, 0) > before.0 && subscriptions(&mesh, 1) > before.1
    });
    assert!(back, "both ztunnels subscribed to the restarted controller");
    let renewing = wait_until(Duration::from_secs(30), || {
        expiry(&mesh, 0, &web).unwrap() > expiries.0 && expiry(&mesh, 1, &api).unwrap() > expiries.1
    });
    assert!(renewing, "certificates renewed through the restarted controller");
    assert!(probe_both(&mesh, &b, &b_root).iter().all(Result::is_ok), "B-signed certificates, B trusted");
    // Traffic keeps going over handshakes made with the final bundle.
    std::thread::sleep(Duration::from_secs(3));
    let (ok, failed) = traffic.stop();
    assert!(failed.is_empty(), "{} failed connections of {}: {failed:#?}", failed.len(), ok + failed.len());
    let expected = since.elapsed().as_millis() / 400;
    assert!(ok as u128 >= expected, "the client kept connecting every 200 ms: {ok} in {:?}", since.elapsed());
    let tunneled = mesh.metric(0, "istio_tcp_connections_opened_total", &mutual_tls).unwrap();
    assert!(tunneled >= ok as f64, "each connection went through both ztunnels over HBONE: {tunneled} of {ok}");
}

/// The Python block under "A client in a few lines of Python" in `docs/PROTOCOL.md`.
fn protocol_doc_python() -> String {
    let doc = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/PROTOCOL.md"));
    let section = doc.split_once("## A client in a few lines of Python").expect("the section is in docs/PROTOCOL.md").1;
    let block = section.split_once("```python\n").expect("a python block in the section").1;
    block.split_once("```").expect("the block ends").0.to_owned()
}

#[test]
fn protocol_doc_python_client_works() {
    if !python_ready(true) {
        return;
    }
    let Some(mut mesh) = mesh("ctl-pydoc") else { return };
    // The workload the snippet asks a certificate for: shop/web, service account web, node 1.
    mesh.add_pod(PodSpec::new(1, "shop", "web", "web")).unwrap();
    mesh.write_config().unwrap();
    mesh.start_controller(&[]).unwrap();

    // Its files, where it looks for them (the working directory); its address, the lab's.
    let work: PathBuf = mesh.lab.log_dir().join("python-client");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::copy(mesh.ca_files().0, work.join("root-cert.pem")).unwrap();
    std::fs::copy(mesh.node_token_file(1).unwrap(), work.join("node-1.token")).unwrap();
    let doc_base = "https://10.255.0.2:15012";
    let snippet = protocol_doc_python();
    assert!(snippet.contains(doc_base), "the snippet's address changed; update this test:\n{snippet}");
    let script = snippet.replace(doc_base, &format!("https://{}", mesh.controller_addr()));
    std::fs::write(work.join("client.py"), &script).unwrap();

    let mut cmd = Command::new("python3");
    cmd.arg("client.py").current_dir(&work);
    let out: Output = mesh.lab.nodes()[1].netns().output(cmd, Duration::from_secs(60)).unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the snippet failed:\n{stderr}\n{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let (kind, version) = lines[0].split_once(' ').expect("`<type> <version>`");
    assert_eq!(kind, "snapshot", "the first message of a watch: {stdout}");
    assert_eq!(version.parse::<u64>().unwrap(), status(&mesh)["version"].as_u64().unwrap());
    let not_after: u64 = lines[1].parse().expect("notAfter, in seconds since the epoch");
    let day_from_now = unix(SystemTime::now()) + 24 * 3600;
    assert!(not_after.abs_diff(day_from_now) < 300, "a 24 h certificate: {not_after}");
    assert_eq!(controller_metric(&mesh, "weft_controller_certificates_total", &[("result", "issued")]), 1.0);
}
