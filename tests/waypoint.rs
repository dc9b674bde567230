//! End-to-end tests of the waypoint in the network-namespace lab (tier 3): the real
//! controller, ztunnels on two nodes, and `weft waypoint` in a pod of its own, programmed by a
//! Gateway of class `weft-waypoint` and HTTPRoutes. They need root; under `CI=true` a test
//! that cannot get it fails instead of skipping.
//!
//! What they prove: a client's requests to a service with a waypoint pass through it and are
//! split by the route's weights per request (not per connection); a header match sends a
//! request to v2 only; a weight change moves traffic within seconds with no failed request;
//! retries heal a backend failing half of its requests, and without a retry stanza the client
//! sees the failures; a client dialing a pod behind the waypoint directly still goes through
//! the waypoint, and a client outside the mesh cannot reach that pod at all; a policy
//! targeting the service refuses a path with 403 before any app sees it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weft::meshlab::{HttpClient, MeshLab, PodSpec, sum_metric};

const APP_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 9080;
/// How long a change in the cluster may take to reach the proxies.
const PROPAGATION: Duration = Duration::from_secs(5);

fn weft() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_weft"))
}

fn vip(n: u16) -> IpAddr {
    IpAddr::V4(lab::addresses::service_vip(40 + n))
}

/// A Service with a selector of its own, optionally using the waypoint `wp`.
fn service(name: &str, n: u16, selector: Value, waypoint: bool) -> Value {
    let labels = if waypoint { json!({"weft.dev/use-waypoint": "wp"}) } else { json!({}) };
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop", "labels": labels},
        "spec": {"clusterIP": vip(n).to_string(), "clusterIPs": [vip(n).to_string()],
                 "ports": [{"port": SERVICE_PORT, "targetPort": APP_PORT}], "selector": selector},
    })
}

fn route(name: &str, parent: &str, rules: Value) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": SERVICE_PORT}], "rules": rules},
    })
}

fn backend(name: &str, weight: u32) -> Value {
    json!({"name": name, "port": SERVICE_PORT, "weight": weight})
}

/// The reviews route: `x-canary: true` to v2, everything else split `v1`/`v2`.
fn canary(v1: u32, v2: u32) -> Value {
    route(
        "reviews",
        "reviews",
        json!([
            {"matches": [{"headers": [{"name": "x-canary", "value": "true"}]}], "backendRefs": [backend("reviews-v2", 1)]},
            {"backendRefs": [backend("reviews-v1", v1), backend("reviews-v2", v2)]},
        ]),
    )
}

/// The ratings route, with or without a retry stanza.
fn ratings(retry: bool) -> Value {
    let mut rule = json!({"backendRefs": [backend("ratings", 1)]});
    if retry {
        rule["retry"] = json!({"attempts": 3, "codes": [503], "backoff": "1ms"});
    }
    route("ratings", "ratings", json!([rule]))
}

fn pod(node: usize, name: &str, app: &str, labels: &[(&str, &str)]) -> PodSpec {
    let mut p = PodSpec::new(node, "shop", name, app);
    p.labels.extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    p
}

struct Setup {
    mesh: MeshLab,
    /// The apps, by pod.
    apps: BTreeMap<&'static str, lab::LabProcess>,
}

impl Setup {
    fn new(test: &str) -> Option<Setup> {
        if !MeshLab::ready_here() {
            return None;
        }
        let mut mesh = MeshLab::new(test, 2, weft()).expect("building the lab");
        mesh.add_pod(pod(0, "client", "client", &[])).expect("client pod");
        mesh.add_pod(pod(0, "outsider", "outsider", &[]).not_enrolled()).expect("outsider pod");
        mesh.add_pod(pod(1, "reviews-v1", "reviews", &[("version", "v1")])).expect("v1 pod");
        mesh.add_pod(pod(1, "reviews-v2", "reviews", &[("version", "v2")])).expect("v2 pod");
        mesh.add_pod(pod(1, "ratings", "ratings", &[("version", "v1")])).expect("ratings pod");
        mesh.add_pod(pod(0, "wp", "wp", &[("gateway.networking.k8s.io/gateway-name", "wp")])).expect("waypoint pod");
        mesh.put_objects(
            "shop-services",
            &[
                service("reviews", 0, json!({"app": "reviews"}), true),
                service("reviews-v1", 1, json!({"app": "reviews", "version": "v1"}), false),
                service("reviews-v2", 2, json!({"app": "reviews", "version": "v2"}), false),
                service("ratings", 3, json!({"app": "ratings"}), true),
                json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                       "metadata": {"name": "wp", "namespace": "shop"},
                       "spec": {"gatewayClassName": "weft-waypoint",
                                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}),
            ],
        )
        .expect("services");
        mesh.put_objects("shop-routes", &[canary(90, 10), ratings(true)]).expect("routes");
        mesh.start_ztunnels().expect("starting the controller and ztunnels");
        let mut apps = BTreeMap::new();
        for (p, name, fail) in [("reviews-v1", "v1", 0), ("reviews-v2", "v2", 0), ("ratings", "ratings", 50)] {
            apps.insert(p, mesh.start_web(p, APP_PORT, name, fail).expect("starting an app"));
        }
        let waypoint = mesh.start_waypoint("wp", "wp").expect("starting the waypoint");
        mesh.keep(waypoint);
        Some(Setup { mesh, apps })
    }

    /// What the app in `pod` printed: a line per request it saw.
    fn app_logs(&self, pod: &str) -> String {
        self.apps[pod].logs().expect("the app's log")
    }

    fn client(&self, from: &str, to: SocketAddr) -> HttpClient {
        let stream = self.mesh.connect(from, to).expect("connecting");
        HttpClient::new(stream, "reviews.shop")
    }

    /// Requests from the client pod on one connection: the bodies, by count.
    fn tally(&self, to: SocketAddr, n: usize, headers: &[(&str, &str)]) -> BTreeMap<String, usize> {
        self.mesh.http_tally("client", to, "reviews.shop", n, headers).expect("requests from the client pod")
    }

    fn waypoint_metrics(&self) -> String {
        let pod = self.mesh.pod("wp").netns().clone();
        let ip = self.mesh.pod("wp").ip();
        pod.run(move || weft::meshlab::http_get(SocketAddr::new(ip.into(), 15020), "/metrics"))
            .expect("in the waypoint pod")
            .expect("the waypoint's metrics")
    }
}

/// Waits until `f` holds, up to `limit`.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn canary_split_header_match_weight_change_and_bypass() {
    let Some(mut s) = Setup::new("wp-canary") else { return };
    let reviews = SocketAddr::new(vip(0), SERVICE_PORT);
    // The route reaches every proxy: the first requests may race it.
    assert!(
        eventually(PROPAGATION * 2, || s.tally(reviews, 20, &[]).get("v1").copied().unwrap_or(0) > 0),
        "requests to the service never reached v1 through the waypoint"
    );

    // 90/10, per request on one connection.
    let counts = s.tally(reviews, 2000, &[]);
    let (v1, v2) = (counts.get("v1").copied().unwrap_or(0), counts.get("v2").copied().unwrap_or(0));
    assert_eq!(v1 + v2, 2000, "some requests failed: {counts:?}");
    let share = v1 as f64 / 2000.0;
    assert!((0.87..=0.93).contains(&share), "v1 got {:.1}% of 2000 requests: {counts:?}", share * 100.0);
    let metrics = s.waypoint_metrics();
    let via = sum_metric(
        &metrics,
        "istio_requests_total",
        &[("destination_service_name", "reviews"), ("response_code", "200")],
    );
    assert!(via >= 2000.0, "the waypoint counted {via} requests to reviews");
    let v2_counted =
        sum_metric(&metrics, "istio_requests_total", &[("destination_version", "v2"), ("source_workload", "client")]);
    assert!(
        v2_counted >= v2 as f64,
        "metrics name {v2_counted} requests to v2 from the client, {v2} were answered by it"
    );

    // The header match: v2 only.
    let canary_counts = s.tally(reviews, 100, &[("x-canary", "true")]);
    assert_eq!(canary_counts.get("v2"), Some(&100), "x-canary: true went elsewhere: {canary_counts:?}");

    // L7 authorization on the service: a denied path gets 403 and no app sees it; the rest flows.
    s.mesh
        .put_objects(
            "shop-policies",
            &[json!({
                "apiVersion": "security.weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "no-admin", "namespace": "shop"},
                "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": "reviews"}], "action": "DENY",
                         "rules": [{"to": [{"operation": {"paths": ["/admin/*"]}}]}]},
            })],
        )
        .expect("policy");
    s.mesh.write_config().expect("writing the policy");
    let mut client = s.client("client", reviews);
    assert!(
        eventually(PROPAGATION, || client.get("/admin/probe", &[]).is_ok_and(|(status, _)| status == 403)),
        "GET /admin/probe was never refused"
    );
    // In force: from now on no app may see an /admin/ request.
    assert_eq!(client.get("/admin/secret", &[]).expect("an answer").0, 403);
    assert_eq!(client.get("/", &[]).expect("an answer").0, 200, "the policy refuses only /admin/*");
    for app in ["reviews-v1", "reviews-v2"] {
        let seen = s.app_logs(app);
        assert!(!seen.contains("request GET /admin/secret"), "{app} saw a denied request:\n{seen}");
        assert!(seen.contains("request GET /"), "{app}'s log shows no request at all");
    }
    s.mesh.put_objects("shop-policies", &[]).expect("policy removed");

    // A weight change moves traffic within seconds, with no failed request meanwhile.
    s.mesh.put_objects("shop-routes", &[canary(0, 100), ratings(true)]).expect("routes");
    s.mesh.write_config().expect("writing the new route");
    let start = Instant::now();
    let mut moved = None;
    while start.elapsed() < PROPAGATION * 2 {
        let c = s.tally(reviews, 50, &[]);
        assert!(c.keys().all(|k| k == "v1" || k == "v2"), "a request failed during the weight change: {c:?}");
        if c.get("v2") == Some(&50) {
            moved = Some(start.elapsed());
            break;
        }
    }
    let moved = moved.expect("traffic did not move to v2 after the weight change");
    eprintln!("weights 90/10 -> 0/100: all traffic on v2 after {moved:?}");

    // A client dialing a pod behind the waypoint directly still passes through it.
    let before = sum_metric(&s.waypoint_metrics(), "istio_requests_total", &[("destination_workload", "reviews-v1")]);
    let direct = SocketAddr::new(s.mesh.pod("reviews-v1").ip().into(), APP_PORT);
    let c = s.tally(direct, 10, &[]);
    assert_eq!(c.get("v1"), Some(&10), "direct requests to reviews-v1: {c:?}");
    let after = sum_metric(&s.waypoint_metrics(), "istio_requests_total", &[("destination_workload", "reviews-v1")]);
    assert!(after >= before + 10.0, "direct requests to the pod skipped the waypoint ({before} -> {after})");

    // A client outside the mesh cannot reach it at all (its plaintext would skip the waypoint).
    let mut outsider = s.client("outsider", direct);
    let refused = outsider.get("/", &[]);
    assert!(
        refused.is_err() || refused.as_ref().is_ok_and(|(st, _)| *st != 200),
        "plaintext reached a pod behind the waypoint: {refused:?}"
    );
}

#[test]
fn retries_heal_a_backend_failing_half_of_its_requests() {
    let Some(mut s) = Setup::new("wp-retry") else { return };
    let ratings = SocketAddr::new(vip(3), SERVICE_PORT);
    assert!(
        eventually(PROPAGATION * 2, || s.tally(ratings, 4, &[]).contains_key("ratings")),
        "requests to ratings never answered through the waypoint"
    );
    // attempts: 3 on a backend failing every other request.
    let healed = s.tally(ratings, 400, &[]);
    let ok = healed.get("ratings").copied().unwrap_or(0);
    assert!(ok >= 396, "with retries, {ok} of 400 succeeded: {healed:?}");
    let retries = sum_metric(&s.waypoint_metrics(), "weft_waypoint_retries_total", &[]);
    assert!(retries >= 100.0, "the waypoint counted {retries} retries");

    // Without the retry stanza the failures reach the client.
    s.mesh.put_objects("shop-routes", &[canary(90, 10), ratings_route_without_retry()]).expect("routes");
    s.mesh.write_config().expect("writing the new route");
    assert!(
        eventually(PROPAGATION * 2, || s.tally(ratings, 20, &[]).get("status 503").copied().unwrap_or(0) >= 5),
        "without retries the client never saw a 503"
    );
    let raw = s.tally(ratings, 400, &[]);
    let failed = raw.get("status 503").copied().unwrap_or(0);
    assert!((150..=250).contains(&failed), "without retries {failed} of 400 failed: {raw:?}");
}

fn ratings_route_without_retry() -> Value {
    ratings(false)
}

/// The objects of `manifests/examples/`, in the order its kustomization lists the files.
fn examples() -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/examples");
    let read = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    let kustomization: Value = serde_saphyr::from_str(&read("kustomization.yaml")).expect("the kustomization");
    let files = kustomization["resources"].as_array().expect("its resources");
    files
        .iter()
        .flat_map(|file| {
            let file = file.as_str().expect("a file name");
            serde_saphyr::from_multiple::<Value>(&read(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
        })
        .filter(|object| !object.is_null())
        .collect()
}

fn string(value: &Value) -> String {
    value.as_str().unwrap_or_else(|| panic!("{value} is not a string")).to_owned()
}

/// The example users copy (`manifests/examples/`: namespace `bookinfo`, reviews v1 and v2, a
/// waypoint, the 90/10 route with retries, the policies) read as written and put into the lab:
/// the Deployments become the pods their controller would make (labels, service account,
/// named ports), the Services get the cluster IPs the API server would assign, and the
/// waypoint's pod is what the controller deploys for the Gateway (its name as service
/// account and label). Requests from a pod in the namespace split 90/10, and, with v1 failing
/// every other request with 503, the route's retries hide every failure.
#[test]
fn the_examples_users_copy_split_90_10_and_retry() {
    if !MeshLab::ready_here() {
        return;
    }
    let objects = examples();
    let of_kind = |kind: &'static str| objects.iter().filter(move |o| o["kind"] == kind);
    let mut mesh = MeshLab::new("wp-examples", 2, weft()).expect("building the lab");

    // The lab writes each pod's namespace itself, labelled for the mesh: the example's says so.
    let namespace = of_kind("Namespace").next().expect("the example's namespace");
    let ns = string(&namespace["metadata"]["name"]);
    assert_eq!(namespace["metadata"]["labels"], json!({"weft.dev/mesh": "enabled"}), "{namespace}");

    let mut versions = Vec::new();
    for deployment in of_kind("Deployment") {
        assert_eq!(deployment["spec"]["replicas"], 1, "{deployment}");
        let template = &deployment["spec"]["template"];
        let labels = template["metadata"]["labels"].as_object().expect("the pods' labels");
        let name = format!("{}-0", string(&deployment["metadata"]["name"]));
        let mut pod = PodSpec::new(1, &ns, &name, &string(&labels["app"]));
        pod.labels.extend(labels.iter().map(|(k, v)| (k.clone(), string(v))));
        pod.service_account = string(&template["spec"]["serviceAccountName"]);
        let container = &template["spec"]["containers"][0];
        pod.container_ports = container["ports"]
            .as_array()
            .expect("named ports")
            .iter()
            .map(|p| (string(&p["name"]), p["containerPort"].as_u64().expect("a port") as u16))
            .collect();
        let port = pod.container_ports[0].1;
        mesh.add_pod(pod).expect("a reviews pod");
        versions.push((name, string(&labels["version"]), port));
    }
    assert_eq!(versions.iter().map(|(_, v, _)| v.as_str()).collect::<Vec<_>>(), ["v1", "v2"]);

    let gateway = of_kind("Gateway").next().expect("the example's waypoint");
    assert_eq!(gateway["spec"]["gatewayClassName"], "weft-waypoint");
    let waypoint = string(&gateway["metadata"]["name"]);
    let mut waypoint_pod = PodSpec::new(0, &ns, &waypoint, &waypoint);
    waypoint_pod.labels = BTreeMap::from([("gateway.networking.k8s.io/gateway-name".to_owned(), waypoint.clone())]);
    mesh.add_pod(waypoint_pod).expect("the waypoint's pod");
    mesh.add_pod(PodSpec::new(0, &ns, "productpage", "productpage")).expect("a client pod");

    // The rest as written; the controller reads neither RBAC objects, ServiceAccounts nor
    // Deployments.
    let mut cluster = Vec::new();
    let mut vips = BTreeMap::new();
    for object in &objects {
        match object["kind"].as_str() {
            Some("Service") => {
                let vip = vip(10 + vips.len() as u16).to_string();
                let mut service = object.clone();
                service["spec"]["clusterIP"] = json!(vip);
                service["spec"]["clusterIPs"] = json!([vip]);
                vips.insert(string(&object["metadata"]["name"]), vip);
                cluster.push(service);
            }
            Some("Gateway" | "HTTPRoute" | "AuthorizationPolicy") => cluster.push(object.clone()),
            _ => {}
        }
    }
    mesh.put_objects("examples", &cluster).expect("the example's objects");
    mesh.start_ztunnels().expect("starting the controller and ztunnels");
    let mut apps = BTreeMap::new();
    for (pod, version, port) in &versions {
        apps.insert(version.clone(), mesh.start_web(pod, *port, version, 0).expect("an app"));
    }
    let process = mesh.start_waypoint(&waypoint, &waypoint).expect("starting the waypoint");
    mesh.keep(process);

    let route = of_kind("HTTPRoute").next().expect("the example's route");
    let parent = &route["spec"]["parentRefs"][0];
    let reviews =
        SocketAddr::new(vips[&string(&parent["name"])].parse().unwrap(), parent["port"].as_u64().unwrap() as u16);
    let host = format!("{}.{ns}", string(&parent["name"]));
    let tally = |n| mesh.http_tally("productpage", reviews, &host, n, &[]).expect("requests from productpage");
    assert!(
        eventually(PROPAGATION * 2, || tally(20).get("v1").copied().unwrap_or(0) > 0),
        "requests to {reviews} never reached v1 through the waypoint"
    );

    // 90/10, per request.
    let counts = tally(1000);
    let (v1, v2) = (counts.get("v1").copied().unwrap_or(0), counts.get("v2").copied().unwrap_or(0));
    assert_eq!(v1 + v2, 1000, "some requests failed: {counts:?}");
    assert!((860..=940).contains(&v1), "v1 got {v1} of 1000 requests: {counts:?}");

    // v1 fails every other request with 503: the route's retries (503 among its codes) hide it.
    drop(apps.remove("v1"));
    let (v1_pod, _, v1_port) = &versions[0];
    let failing = mesh.start_web(v1_pod, *v1_port, "v1", 50).expect("a failing v1");
    let counts = tally(400);
    assert_eq!(
        counts.get("v1").copied().unwrap_or(0) + counts.get("v2").copied().unwrap_or(0),
        400,
        "a failure reached the client despite the retries: {counts:?}"
    );
    let answered_by_v1 = counts.get("v1").copied().unwrap_or(0);
    let seen_by_v1 = failing.logs().expect("v1's log").matches("request GET /").count();
    assert!(
        seen_by_v1 >= answered_by_v1 * 2 - 2,
        "v1 saw {seen_by_v1} requests and answered {answered_by_v1}: its failures were not retried"
    );
}
