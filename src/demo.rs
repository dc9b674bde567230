//! `weft demo`: a two-node cluster built from network namespaces on this machine, the
//! controller, a ztunnel per node, a few pods, and traffic that shows the mesh at work — told
//! step by step, then torn down (also on Ctrl-C).
//!
//! ```text
//!  node-0                                     node-1
//!  ├─ weft-system/weft-controller             ├─ back/api-1    (echo :8080)
//!  ├─ front/web                               ├─ legacy/old    (opted out, echo :8080)
//!  ├─ front/batch                             ├─ shop/reviews-v1, shop/reviews-v2 (HTTP :8080)
//!  ├─ back/api-0   (echo :8080)               └─ shop/ratings  (HTTP :8080, fails every other request)
//!  └─ shop/wp      (the waypoint)
//!  service back/api: a VIP in 10.96.0.0/16, port 80 → api-0, api-1 :8080
//!  services shop/reviews (→ v1 and v2) and shop/ratings, port 9080, through the waypoint
//! ```
//!
//! The namespaces start without the mesh label: traffic is plain TCP. Labelling them
//! `weft.dev/mesh=enabled` enrolls their running pods (no restart), and the same apps' next
//! connections are mutual TLS. Then the shop's services get a waypoint: a 90/10 canary split
//! and retries that heal a failing backend. Last, node-1's ztunnel is upgraded while a
//! connection is in use and new ones keep coming: none is reset or refused.
//!
//! `--ip-family ipv6` tells the same story on an IPv6-only cluster, `dual` on a dual-stack one
//! (the tunnel between nodes and the Service VIP shown in both families).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use lab::addresses::IpStack;
use weft::meshlab::{MeshLab, PodSpec, ServiceSpec};

#[derive(clap::Args)]
pub struct Args {
    /// Keep the cluster running after the story, for exploring; Ctrl-C tears it down.
    #[arg(long)]
    keep_running: bool,
    /// The cluster's address families: ipv4, ipv6 (pods, nodes and VIPs in unique-local
    /// ranges: fd00:244:<node>::/64, fd00:96::/108), or dual (one address of each family per
    /// pod, one VIP of each family per Service; the tunnel and the VIP are shown in both).
    #[arg(long, value_name = "FAMILY", default_value = "ipv4")]
    ip_family: IpStack,
}

const APP_PORT: u16 = 8080;

pub fn run(args: Args) -> anyhow::Result<()> {
    check_prerequisites()?;
    let weft = std::env::current_exe().context("locating the weft binary")?;
    let shared: Arc<Mutex<Option<MeshLab>>> = Arc::new(Mutex::new(None));
    watch_ctrl_c(shared.clone());
    // Where api-1's app writes the peer address of each connection it accepts.
    let mut api1_log = std::path::PathBuf::new();

    println!("Weft demo: a two-node cluster made of network namespaces, a controller and one ztunnel per node.\n");
    {
        let mut mesh = MeshLab::with_stack("demo", 2, &weft, args.ip_family)?;
        println!(
            "1. Built the lab {}: nodes node-0 and node-1 on a bridge, pods on each node's cni0.",
            mesh.lab.name()
        );
        mesh.add_pod(PodSpec::new(0, "front", "web", "web"))?;
        mesh.add_pod(PodSpec::new(0, "front", "batch", "batch"))?;
        mesh.add_pod(PodSpec::new(0, "back", "api-0", "api"))?;
        mesh.add_pod(PodSpec::new(1, "back", "api-1", "api"))?;
        mesh.add_pod(PodSpec::new(1, "legacy", "old", "old").not_enrolled())?;
        for (node, name, app, labels) in [
            (1, "reviews-v1", "reviews", [("version", "v1")]),
            (1, "reviews-v2", "reviews", [("version", "v2")]),
            (1, "ratings", "ratings", [("version", "v1")]),
            (0, "wp", "wp", [("gateway.networking.k8s.io/gateway-name", "wp")]),
        ] {
            let mut spec = PodSpec::new(node, "shop", name, app);
            spec.labels.extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            mesh.add_pod(spec)?;
        }
        mesh.put_objects("shop", &shop_objects(args.ip_family, 90, 10, false))?;
        mesh.add_service(ServiceSpec {
            namespace: "back".into(),
            name: "api".into(),
            vip: lab::addresses::service_vip(10),
            port: 80,
            target_port: APP_PORT,
            app: "api".into(),
        });
        // The mesh starts off: no namespace carries the label yet.
        for ns in ["front", "back", "shop"] {
            mesh.set_namespace_enrolled(ns, false);
        }
        for name in ["web", "batch", "api-0", "api-1", "old"] {
            let s = mesh.spec(name);
            let p = mesh.pod(name);
            println!(
                "     {:<13} node-{}  {:<11} {}",
                format!("{}/{}", s.namespace, s.name),
                s.node,
                p.ips().iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                if s.enrolled { s.identity() } else { "opted out (label weft.dev/mesh=disabled)".into() }
            );
        }
        mesh.start_ztunnels()?;
        for (pod, banner) in [("api-0", "api-0"), ("api-1", "api-1"), ("old", "old")] {
            let app = mesh.start_echo(pod, APP_PORT, Some(banner))?;
            if pod == "api-1" {
                api1_log = app.log_path().to_owned();
            }
            mesh.keep(app);
        }
        println!(
            "\n2. Started the controller in pod weft-system/weft-controller ({}): it reads the cluster's",
            mesh.controller_addr()
        );
        println!("   objects (Namespaces, Pods, Services, AuthorizationPolicies) from a directory, is the CA, and");
        println!("   programs a ztunnel in each node over its watch API. No namespace is labelled yet:");
        println!("   the ztunnels capture nothing.");
        *shared.lock().map_err(|_| anyhow::anyhow!("demo state poisoned"))? = Some(mesh);
    }

    let guard = || shared.lock().map_err(|_| anyhow::anyhow!("demo state poisoned"));
    {
        let mut g = guard()?;
        let mesh = g.as_mut().context("the demo was interrupted")?;
        story(mesh, &api1_log)?;
    }
    if args.keep_running {
        let g = guard()?;
        let mesh = g.as_ref().context("the demo was interrupted")?;
        println!("\nThe cluster keeps running. Explore it from another terminal, for example:");
        println!("  ip netns exec {} curl -s localhost:15000/config_dump", mesh.lab.nodes()[0].netns().name());
        println!("  ip netns exec {} weft get workloads", mesh.lab.nodes()[0].netns().name());
        println!("  ip netns exec {} curl -s localhost:15000/status", mesh.controller_pod().netns().name());
        println!("  ip netns exec {} curl -s localhost:15020/metrics", mesh.lab.nodes()[1].netns().name());
        println!("  ip netns exec {} nft list ruleset", mesh.pod("web").netns().name());
        println!("Press Ctrl-C to tear it down.");
        drop(g);
        loop {
            std::thread::park();
        }
    }
    let mesh = guard()?.take();
    if let Some(mesh) = mesh {
        mesh.lab.teardown()?;
    }
    println!("\nDone: every namespace and process of the demo is gone.");
    Ok(())
}

fn story(mesh: &mut MeshLab, api1_log: &std::path::Path) -> anyhow::Result<()> {
    let api1 = SocketAddr::new(mesh.pod("api-1").primary_ip(), APP_PORT);
    let marker = "hello-from-web";
    println!("\n3. front/web connects to api-1's pod IP {api1} (another node), outside the mesh:");
    let (reply, wire) = exchange_on_the_wire(mesh, "web", "api-1", api1, marker)?;
    println!("     web sent {marker:?}; the app answered {:?}", reply.replace('\n', " "));
    println!("     on the wire: {wire}");
    println!("     the app saw the connection come from {}", last_peer(api1_log)?);

    let pids_before = app_pids(mesh);
    println!("\n4. Label the namespaces front and back weft.dev/mesh=enabled (the YAML the controller reads).");
    let labelled = std::time::Instant::now();
    for ns in ["front", "back"] {
        mesh.set_namespace_enrolled(ns, true);
    }
    mesh.write_config()?;
    mesh.wait_enrolled(0, 3)?;
    mesh.wait_enrolled(1, 1)?;
    println!(
        "     within {} ms the controller pushed the change and both ztunnels enrolled their pods: nft table",
        labelled.elapsed().as_millis()
    );
    println!(
        "     `inet weft` and listeners 15001/15006/15008 inside each pod, each pod's certificate obtained by CSR."
    );
    let pids_after = app_pids(mesh);
    println!(
        "     nothing restarted: the pods' processes (web, api-1) before {pids_before:?}, after {pids_after:?}, unchanged: {}",
        pids_before == pids_after
    );

    println!("\n5. The same connection again. The apps see plain TCP; ztunnel carries it as HBONE:");
    // Dual-stack: to each of api-1's addresses, and the tunnel is of the family dialed.
    for ip in mesh.pod("api-1").ips() {
        let api1 = SocketAddr::new(ip, APP_PORT);
        if mesh.lab.stack() == IpStack::Dual {
            println!("   to {api1}:");
        }
        let marks = [log_mark(mesh, 0)?, log_mark(mesh, 1)?];
        let (reply, wire) = exchange_on_the_wire(mesh, "web", "api-1", api1, marker)?;
        let (banner, echoed) = reply.split_once('\n').unwrap_or((&reply, ""));
        println!("     web sent {marker:?}; the app greeted with {banner:?} and echoed {echoed:?}");
        println!("     on the wire: {wire}");
        println!(
            "     the app still sees its client's own address: {} (ztunnel connects to it with that source)",
            last_peer(api1_log)?
        );
        let to_api1 = format!("dst.addr={api1}");
        print_access(mesh, 0, &["direction=\"outbound\"", &to_api1], marks[0])?;
        print_access(mesh, 1, &["direction=\"inbound\"", &to_api1], marks[1])?;
    }

    for (i, vip) in mesh.service_vips("back", "api").into_iter().enumerate() {
        let vip = SocketAddr::new(vip, 80);
        if i == 0 {
            println!(
                "\n6. front/web connects to the service VIP {vip} six times; ztunnel balances over the endpoints:"
            );
        } else {
            println!("   and six times to its VIP of the other family, {vip}:");
        }
        let mut answers = Vec::new();
        for _ in 0..6 {
            answers.push(exchange(mesh, "web", vip, "")?.trim().to_owned());
        }
        println!("     answered by: {}", answers.join(", "));
    }

    let old = SocketAddr::new(mesh.pod("old").primary_ip(), APP_PORT);
    println!("\n7. front/web connects to legacy/old {old}, which opted out of the mesh: plain passthrough.");
    let mark = log_mark(mesh, 0)?;
    let reply = exchange(mesh, "web", old, "hi")?;
    println!("     answered by {:?}", reply.lines().next().unwrap_or(""));
    print_access(mesh, 0, &["direction=\"outbound\"", &format!("dst.addr={old}")], mark)?;

    println!(
        "\n8. An L4 policy (an AuthorizationPolicy object): back/api accepts only spiffe://cluster.local/ns/front/sa/web."
    );
    mesh.add_policy("{name: only-web, namespace: back, selector: {app: api}, action: ALLOW, rules: [{from: [{principals: [\"spiffe://cluster.local/ns/front/sa/web\"]}]}]}");
    mesh.write_config()?;
    let mark = log_mark(mesh, 1)?;
    // Applied within a poll and a push; wait (bounded) until batch is refused.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while exchange(mesh, "batch", api1, "ping").is_ok() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    for client in ["web", "batch"] {
        let outcome = match exchange(mesh, client, api1, "ping") {
            Ok(_) => "allowed".to_owned(),
            Err(e) => format!("refused ({e})"),
        };
        println!("     front/{client} -> api-1: {outcome}");
    }
    mesh.clear_policies();
    mesh.write_config()?;
    print_access(mesh, 1, &["outcome=\"denied\""], mark)?;

    println!("\n9. Metrics (node-1's ztunnel, :15020/metrics), as Istio dashboards read them:");
    let metrics = mesh.node_http(1, 15020, "/metrics")?;
    for line in metrics.lines().filter(|l| {
        (l.starts_with("istio_tcp_connections_opened_total") || l.starts_with("istio_tcp_received_bytes_total"))
            && l.contains("reporter=\"destination\"")
    }) {
        println!("     {}", shorten(line));
    }
    for line in metrics.lines().filter(|l| l.starts_with("weft_")) {
        println!("     {line}");
    }
    canary(mesh)
}

const SHOP_PORT: u16 = 9080;

/// The VIPs of the shop's `n`th service, one per family of the cluster; clients dial the first.
fn shop_vips(stack: IpStack, n: u16) -> Vec<std::net::IpAddr> {
    lab::addresses::service_vips(stack, lab::addresses::service_vip(20 + n))
}

fn shop_vip(stack: IpStack, n: u16) -> std::net::IpAddr {
    let ipv4 = lab::addresses::service_vip(20 + n);
    shop_vips(stack, n).first().copied().unwrap_or(std::net::IpAddr::V4(ipv4))
}

/// The shop's Kubernetes objects: services `reviews` (through the waypoint), `reviews-v1`,
/// `reviews-v2`, `ratings` (through the waypoint), the Gateway `wp`, and the routes: reviews
/// split `v1`/`v2`, ratings with or without retries.
fn shop_objects(stack: IpStack, v1: u32, v2: u32, retry: bool) -> Vec<serde_json::Value> {
    use serde_json::json;
    let service = |name: &str, n: u16, selector: serde_json::Value, waypoint: bool| {
        let labels = if waypoint { json!({"weft.dev/use-waypoint": "wp"}) } else { json!({}) };
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "shop", "labels": labels},
               "spec": {"clusterIP": shop_vip(stack, n).to_string(),
                        "clusterIPs": shop_vips(stack, n).iter().map(ToString::to_string).collect::<Vec<_>>(), "ports": [{"port": SHOP_PORT, "targetPort": APP_PORT}],
                        "selector": selector}})
    };
    let route = |name: &str, rule: serde_json::Value| {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": name, "namespace": "shop"},
               "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": name, "port": SHOP_PORT}], "rules": [rule]}})
    };
    let mut ratings = json!({"backendRefs": [{"name": "ratings", "port": SHOP_PORT}]});
    if retry {
        ratings["retry"] = json!({"attempts": 3, "codes": [503], "backoff": "1ms"});
    }
    vec![
        service("reviews", 0, json!({"app": "reviews"}), true),
        service("reviews-v1", 1, json!({"app": "reviews", "version": "v1"}), false),
        service("reviews-v2", 2, json!({"app": "reviews", "version": "v2"}), false),
        service("ratings", 3, json!({"app": "ratings"}), true),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": {"name": "wp", "namespace": "shop"},
               "spec": {"gatewayClassName": "weft-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}),
        route(
            "reviews",
            json!({"backendRefs": [{"name": "reviews-v1", "port": SHOP_PORT, "weight": v1},
                                                {"name": "reviews-v2", "port": SHOP_PORT, "weight": v2}]}),
        ),
        route("ratings", ratings),
    ]
}

/// Step 10: the shop's services get a waypoint.
fn canary(mesh: &mut MeshLab) -> anyhow::Result<()> {
    println!("\n10. L7 for the shop: its services carry weft.dev/use-waypoint=wp, a Gateway of class weft-waypoint;");
    println!("    an HTTPRoute splits reviews 90% to reviews-v1 and 10% to reviews-v2. Label the namespace shop.");
    mesh.set_namespace_enrolled("shop", true);
    mesh.write_config()?;
    mesh.wait_enrolled(1, 4)?;
    for (pod, name, fail) in [("reviews-v1", "v1", 0), ("reviews-v2", "v2", 0), ("ratings", "ratings", 50)] {
        let app = mesh.start_web(pod, APP_PORT, name, fail)?;
        mesh.keep(app);
    }
    let waypoint = mesh.start_waypoint("wp", "wp")?;
    mesh.keep(waypoint);
    let stack = mesh.lab.stack();
    let reviews = SocketAddr::new(shop_vip(stack, 0), SHOP_PORT);
    // The waypoint's address reaches the ztunnels a moment after it starts.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline
        && mesh
            .http_tally("web", reviews, "reviews.shop", 1, &[])
            .map_or(true, |c| !c.contains_key("v1") && !c.contains_key("v2"))
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let counts = mesh.http_tally("web", reviews, "reviews.shop", 1000, &[])?;
    let count = |k: &str| counts.get(k).copied().unwrap_or(0);
    println!(
        "    front/web sent 1000 HTTP requests to reviews {reviews} on one connection: v1 answered {}, v2 answered {}, failed {}",
        count("v1"),
        count("v2"),
        1000 - count("v1") - count("v2")
    );
    println!("    (the waypoint picks a backend per request, not per connection)");

    let ratings = SocketAddr::new(shop_vip(stack, 3), SHOP_PORT);
    let raw = mesh.http_tally("web", ratings, "ratings.shop", 200, &[])?;
    println!(
        "\n11. ratings fails every other request with 503. Without retries, of 200 requests: {} succeeded, {} failed.",
        raw.get("ratings").copied().unwrap_or(0),
        raw.get("status 503").copied().unwrap_or(0)
    );
    mesh.put_objects("shop", &shop_objects(stack, 90, 10, true))?;
    mesh.write_config()?;
    let metrics_before = waypoint_metric(mesh, "weft_waypoint_retries_total")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut healed = raw;
    while std::time::Instant::now() < deadline {
        healed = mesh.http_tally("web", ratings, "ratings.shop", 200, &[])?;
        if healed.get("ratings") == Some(&200) {
            break;
        }
    }
    let retries = waypoint_metric(mesh, "weft_waypoint_retries_total")? - metrics_before;
    println!(
        "    With retry {{attempts: 3, codes: [503]}} on the route: {} of 200 succeeded; the waypoint retried {retries} times.",
        healed.get("ratings").copied().unwrap_or(0)
    );
    println!("\n12. The waypoint's request metrics (:15020/metrics), as Istio dashboards and Kiali read them:");
    let metrics = waypoint_metrics(mesh)?;
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains("destination_service_name=\"reviews\""))
    {
        println!("     {}", shorten(line));
    }
    upgrade(mesh)
}

/// Step 13: node-1's ztunnel is upgraded while a long-lived connection exchanges data and a
/// client keeps opening new ones.
fn upgrade(mesh: &mut MeshLab) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    println!("\n13. Upgrade node-1's ztunnel without resetting a connection: a second ztunnel process for node-1");
    println!("    takes the running one's listening sockets over its handoff socket (SCM_RIGHTS), so no port ever");
    println!("    closes; the old one stops accepting and serves the connections it has until they end.");
    let api1 = SocketAddr::new(mesh.pod("api-1").primary_ip(), APP_PORT);
    let mut conn = mesh.connect("web", api1)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut banner = String::new();
    reader.read_line(&mut banner).context("api-1 did not greet")?;
    let stop = Arc::new(AtomicBool::new(false));
    let bound = std::time::Instant::now() + Duration::from_secs(60);
    let talk = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<u64, String> {
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < bound {
                let message = format!("message {sent:06}\n");
                let mut back = vec![0u8; message.len()];
                conn.write_all(message.as_bytes())
                    .and_then(|()| reader.read_exact(&mut back))
                    .map_err(|e| format!("after {sent} messages: {e}"))?;
                if back != message.as_bytes() {
                    return Err(format!("message {sent} came back altered"));
                }
                sent += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(sent)
        })
    };
    let poll = {
        let (stop, netns) = (stop.clone(), mesh.pod("web").netns().clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < bound {
                let greeted = netns.run(move || -> std::io::Result<bool> {
                    let s = TcpStream::connect_timeout(&api1, Duration::from_secs(5))?;
                    s.set_read_timeout(Some(Duration::from_secs(5)))?;
                    let mut line = String::new();
                    BufReader::new(s).read_line(&mut line)?;
                    Ok(!line.is_empty())
                });
                match greeted {
                    Ok(Ok(true)) => ok += 1,
                    _ => failed += 1,
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (ok, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let old_pid = mesh.ztunnel(1).pid();
    let started = std::time::Instant::now();
    let old = mesh.upgrade_ztunnel(1, &[])?;
    println!(
        "     the new ztunnel (pid {}) took node-1 over from pid {old_pid} in {} ms",
        mesh.ztunnel(1).pid(),
        started.elapsed().as_millis()
    );
    std::thread::sleep(Duration::from_secs(1));
    let draining = mesh.metric(1, "weft_upgrade_draining_connections", &[])?;
    println!(
        "     one second later the old ztunnel still carries {draining} connection(s), as it reports to the new one"
    );
    stop.store(true, Ordering::Relaxed);
    let talked = talk.join().map_err(|_| anyhow::anyhow!("the conversation thread panicked"))?;
    let (ok, failed) = poll.join().map_err(|_| anyhow::anyhow!("the client thread panicked"))?;
    match talked {
        Ok(sent) => println!(
            "     the long-lived connection web -> api-1 exchanged {sent} messages across the upgrade: none lost"
        ),
        Err(e) => println!("     the long-lived connection web -> api-1 broke: {e}"),
    }
    println!(
        "     web opened {} new connections to api-1 (one every 10 ms) during the switch: failed new connections: {failed}",
        ok + failed
    );
    let ended = std::time::Instant::now();
    match old.wait_timeout(Duration::from_secs(5))? {
        Some(status) => println!(
            "     its connections closed, the old ztunnel exited ({status}) {} ms later",
            ended.elapsed().as_millis()
        ),
        None => println!(
            "     the old ztunnel still serves {} connection(s) (the waypoint keeps its connections to the shop's pods\n     \
             alive): it exits when they end, or cuts them after --upgrade-drain (1h)",
            mesh.metric(1, "weft_upgrade_draining_connections", &[])?
        ),
    }
    let took_over = mesh.metric(1, "weft_handoffs_total", &[("outcome", "took_over")])?;
    println!("     node-1's metrics: weft_handoffs_total{{outcome=\"took_over\"}} {took_over}");
    Ok(())
}

fn waypoint_metrics(mesh: &MeshLab) -> anyhow::Result<String> {
    let ip = mesh.pod("wp").primary_ip();
    mesh.pod("wp").netns().run(move || weft::meshlab::http_get(SocketAddr::from((ip, 15020)), "/metrics"))?
}

fn waypoint_metric(mesh: &MeshLab, name: &str) -> anyhow::Result<f64> {
    Ok(weft::meshlab::sum_metric(&waypoint_metrics(mesh)?, name, &[]))
}

/// Exchanges `msg` from `client` with `to` (pod `server`'s address) under a capture of the
/// fabric; the reply, and what crossed the fabric between the two pods.
fn exchange_on_the_wire(
    mesh: &MeshLab,
    client: &str,
    server: &str,
    to: SocketAddr,
    msg: &str,
) -> anyhow::Result<(String, String)> {
    let capture = mesh.lab.capture()?;
    let reply = exchange(mesh, client, to, msg)?;
    std::thread::sleep(Duration::from_millis(200));
    let packets = capture.stop_all()?;
    // The two pods' addresses of the family dialed.
    let pair = (mesh.pod(client).ip_like(to.ip()), mesh.pod(server).ip_like(to.ip()));
    let (Some(a), Some(b)) = pair else { bail!("{client} and {server} have no address of the family of {to}") };
    let flows: Vec<_> = packets
        .iter()
        .filter(|p| !p.outgoing)
        .filter(|p| (p.src.ip() == a && p.dst.ip() == b) || (p.src.ip() == b && p.dst.ip() == a))
        .collect();
    let ports: std::collections::BTreeSet<u16> = flows.iter().map(|p| p.dst.port().min(p.src.port())).collect();
    let plaintext = flows.iter().any(|p| p.payload.windows(msg.len()).any(|w| w == msg.as_bytes()));
    let tls = flows.iter().any(|p| p.dst.port() == 15008 && p.payload.first() == Some(&0x16));
    let wire = format!(
        "{} segments, server port(s) {:?}, TLS handshake seen: {}, plaintext {:?} seen: {}",
        flows.len(),
        ports,
        tls,
        msg,
        plaintext
    );
    Ok((reply, wire))
}

/// The PIDs of the processes in pods web and api-1 (their pause process and api-1's app),
/// each still running, to show that enrolling restarts nothing.
fn app_pids(mesh: &MeshLab) -> Vec<u32> {
    let mut pids: Vec<u32> = ["web", "api-1"]
        .iter()
        .flat_map(|p| lab::processes_in_namespace(mesh.pod(p).netns().path()))
        .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    pids.sort_unstable();
    pids
}

/// The client address of the last connection an echo app accepted, from its log.
fn last_peer(log: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let peer = text.lines().rev().find_map(|l| l.strip_prefix("accepted "));
    let peer = peer.with_context(|| format!("no connection in {}", log.display()))?;
    Ok(peer.to_owned())
}

/// Connects from `pod` to `to`, sends `msg`, and returns what came back (banner and echo).
fn exchange(mesh: &MeshLab, pod: &str, to: SocketAddr, msg: &str) -> anyhow::Result<String> {
    let mut conn: TcpStream = mesh.connect(pod, to)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut banner = String::new();
    reader.read_line(&mut banner).context("no answer: the connection was closed")?;
    if banner.is_empty() {
        bail!("connection closed by the mesh");
    }
    if msg.is_empty() {
        return Ok(banner);
    }
    conn.write_all(msg.as_bytes())?;
    let mut back = vec![0u8; msg.len()];
    reader.read_exact(&mut back).context("the echo did not come back")?;
    Ok(format!("{banner}{}", String::from_utf8_lossy(&back)))
}

/// Where node `node`'s ztunnel log ends now: [`print_access`] looks only past it.
fn log_mark(mesh: &MeshLab, node: usize) -> anyhow::Result<usize> {
    Ok(mesh.ztunnel(node).logs()?.len())
}

/// Prints the first access-log line of node `node`'s ztunnel after `mark` that mentions all
/// of `what`, waiting for it (ztunnel writes it when the connection has ended on its side, a
/// moment after the client saw it end), up to a few seconds.
fn print_access(mesh: &MeshLab, node: usize, what: &[&str], mark: usize) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let logs = mesh.ztunnel(node).logs()?;
        let line = logs
            .get(mark..)
            .unwrap_or("")
            .lines()
            .find(|l| l.contains(" access: ") && what.iter().all(|w| l.contains(w)));
        if let Some(line) = line {
            println!("     node-{node} ztunnel: {}", shorten(line.split_once(": ").map(|x| x.1).unwrap_or(line)));
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            println!("     node-{node} ztunnel: (no access line with {what:?} yet)");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn shorten(line: &str) -> String {
    line.replace("spiffe://cluster.local/", "spiffe://…/")
}

/// Says exactly what is missing instead of failing halfway.
fn check_prerequisites() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    if let Err(e) = lab::Lab::require_root() {
        missing.push(format!("root privileges (CAP_NET_ADMIN and CAP_SYS_ADMIN): {e}; run with sudo"));
    }
    if Command::new("nft").arg("--version").output().is_err() {
        missing.push("the `nft` program: install the nftables package (apt-get install nftables; `sudo scripts/run demo` does it)".into());
    }
    if Command::new("sleep").arg("0").output().is_err() {
        missing.push("the `sleep` program (coreutils)".into());
    }
    if !std::path::Path::new("/proc/self/ns/net").exists() {
        missing.push("network namespaces (a kernel with CONFIG_NET_NS)".into());
    }
    if missing.is_empty() {
        return Ok(());
    }
    bail!("weft demo needs:\n  - {}", missing.join("\n  - "))
}

/// On Ctrl-C, tears the cluster down (waiting for the current step) and exits.
fn watch_ctrl_c(shared: Arc<Mutex<Option<MeshLab>>>) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        if rt.block_on(tokio::signal::ctrl_c()).is_err() {
            return;
        }
        eprintln!("\ninterrupted: tearing the cluster down...");
        let mesh = shared.lock().map(|mut g| g.take()).unwrap_or_else(|p| p.into_inner().take());
        if let Some(mesh) = mesh {
            let _ = mesh.lab.teardown();
        }
        std::process::exit(130);
    });
}
