//! The controller at scale, on loopback only (no lab, no root): a synthetic cluster of
//! 10,000 pods on 100 nodes and 1,000 services, written as Kubernetes YAML into the
//! controller's directory source; the real controller as a child process; 100 subscribers in
//! this process, one per node, each its own watch stream over TLS 1.3 and HTTP/2 through
//! ztunnel's controller client.
//!
//! ```text
//!  this process                                           child process
//!  ─────────────                                          ─────────────
//!  cluster/  pod-*.yaml (one file per pod) ─── polled ──► weft-controller run
//!            services.yaml, namespaces.yaml                 --source-dir cluster/
//!                                                           --poll-interval 50ms
//!  100 × ztunnel::control::client::Client ◄── watch ────── :API (TLS, HTTP/2)
//!        decode (meshapi::watch::Message), ack ─────────►
//!  /proc/<pid>/status, /proc/<pid>/stat, GET /metrics ◄─── its RSS, CPU and counters
//! ```
//!
//! Measured: the snapshot a new subscriber gets (time from request to decoded message, and
//! its size); one pod changed (its file rewritten with a new label) until all 100
//! subscribers decoded the delta (p50/p99/max); bytes per subscriber per change (the delta
//! line, and the controller's pushed-bytes counter over its pushes); ztunnel's state applying
//! such a delta with 10,000 workloads held (p50/p99); the controller's RSS at rest with 100
//! subscribers, and its CPU time while idle and over the changes. Each figure is printed
//! with its goal.
//!
//! Run: `cargo bench --bench controller` (then, for the dedicated binary,
//! `cargo build --release -p controller` and run it again). Settings in
//! `benches/README.md`. Every wait has a deadline; the controller is killed and the
//! temporary directory removed at the end, on a panic too.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use meshapi::watch::{Ack, Change, Cursor, Message};
use meshapi::{Resource, Workload};
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use ztunnel::control::client::{Client, Endpoint};
use ztunnel::state::StateStore;

/// Nodes, one subscriber each.
const NODES: usize = 100;
/// Namespaces, all labelled `weft.dev/mesh=enabled`; pods and services spread evenly.
const NAMESPACES: usize = 10;
/// Pods per service: every service selects one `app` label worn by this many pods.
const PODS_PER_APP: usize = 10;

/// Starting the controller includes its first read of the whole cluster.
const STARTUP: Duration = Duration::from_secs(300);
/// All subscribers connecting at once, each decoding a snapshot.
const ALL_SUBSCRIBED: Duration = Duration::from_secs(300);
/// One change reaching every subscriber.
const ROUND: Duration = Duration::from_secs(10);
/// Idle time over which the controller's background CPU is measured.
const IDLE: Duration = Duration::from_secs(5);

/// The goals this benchmark reports against.
const GOAL_PUSH_P99: Duration = Duration::from_millis(100);
const GOAL_BYTES_PER_CHANGE: f64 = 2048.0;
const GOAL_APPLY_P99: Duration = Duration::from_millis(1);
const GOAL_RSS_KIB: u64 = 300 * 1024;
const GOAL_SNAPSHOT: Duration = Duration::from_secs(1);

impl Settings {
    /// `--poll-interval` as a duration (`<n>ms`, `<n>s` or `<n>m`; 1 s if unreadable).
    fn poll_period(&self) -> Duration {
        let p = self.poll.trim();
        let number = |suffix: &str| p.strip_suffix(suffix).and_then(|n| n.parse::<u64>().ok());
        if let Some(ms) = number("ms") {
            Duration::from_millis(ms)
        } else if let Some(s) = number("s") {
            Duration::from_secs(s)
        } else if let Some(m) = number("m") {
            Duration::from_secs(m * 60)
        } else {
            Duration::from_secs(1)
        }
    }
}

/// A small deterministic generator (xorshift64): pauses that are the same from run to run.
struct Random(u64);

impl Random {
    /// A duration drawn evenly from `[0, below)`.
    fn next(&mut self, below: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        below.mul_f64((self.0 >> 11) as f64 / (1u64 << 53) as f64)
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Settings {
    pods: usize,
    services: usize,
    subscribers: usize,
    rounds: usize,
    snapshots: usize,
    apply_rounds: usize,
    poll: String,
}

fn main() -> anyhow::Result<()> {
    let pods = env_usize("WEFT_BENCH_PODS", 10_000).clamp(NODES, 100_000) / NODES * NODES;
    let settings = Settings {
        pods,
        services: pods / PODS_PER_APP,
        subscribers: env_usize("WEFT_BENCH_SUBSCRIBERS", NODES).clamp(1, NODES),
        rounds: env_usize("WEFT_BENCH_ROUNDS", 100).clamp(1, 1000),
        snapshots: env_usize("WEFT_BENCH_SNAPSHOTS", 5).clamp(1, 50),
        apply_rounds: env_usize("WEFT_BENCH_APPLY_ROUNDS", 2000).clamp(1, 100_000),
        poll: std::env::var("WEFT_BENCH_POLL").unwrap_or_else(|_| "50ms".into()),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(run(&settings));
    // Subscriber tasks still hold their streams; the controller is gone by now.
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

async fn run(s: &Settings) -> anyhow::Result<()> {
    let work = WorkDir::new()?;
    let cluster = work.path.join("cluster");
    let state_dir = work.path.join("state");
    std::fs::create_dir_all(&cluster)?;
    let (program, subcommand) = controller_program();
    println!(
        "controller benchmark: {} pods on {NODES} nodes, {} services, {NAMESPACES} namespaces; {} subscribers; \
         poll {}; {} cores",
        s.pods,
        s.services,
        s.subscribers,
        s.poll,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!("controller: {} {}", program.display(), subcommand.unwrap_or(""));
    if subcommand.is_some() {
        println!(
            "  (not the dedicated binary, which is missing or older than the controller's sources: \
             `cargo build --release -p controller` for the RSS a deployment would see)"
        );
    }

    let started = Instant::now();
    let cluster_files = write_cluster(&cluster, s)?;
    println!("cluster: {} files written in {:.2?}", cluster_files, started.elapsed());

    // Each node's credential in a file, as ztunnel's `--node-token-file`.
    let tokens = work.path.join("tokens");
    std::fs::create_dir_all(&tokens)?;
    let token_file = |node: usize| tokens.join(format!("{}.token", node_name(node)));
    for node in 0..NODES {
        std::fs::write(token_file(node), node_token(&program, subcommand, &state_dir, &node_name(node))?)?;
    }

    // The controller, with every server on a free loopback port.
    let mut cmd = Command::new(&program);
    cmd.args(subcommand)
        .arg("run")
        .arg("--source-dir")
        .arg(&cluster)
        .arg("--state-dir")
        .arg(&state_dir)
        .args(["--api-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .args(["--metrics-addr", "127.0.0.1:0", "--readiness-addr", "127.0.0.1:0"])
        .args(["--poll-interval", &s.poll])
        .env("WEFT_LOG", std::env::var("WEFT_BENCH_CONTROLLER_LOG").unwrap_or_else(|_| "info".into()));
    let started = Instant::now();
    let controller = Controller::start(cmd, &work)?;
    let load = started.elapsed();
    let pid = controller.pid;
    println!(
        "controller: serving after {load:.2?} (reading and translating the whole cluster first); API {}, metrics {}",
        controller.api, controller.metrics
    );
    let loaded = Memory::of(pid)?;
    let metrics = Metrics::read(controller.metrics)?;
    println!(
        "controller: model version {}, {} resources; RSS {} (before any subscriber)",
        metrics.get("weft_controller_model_version"),
        metrics.get("weft_controller_model_resources"),
        loaded
    );

    let roots = std::fs::read_to_string(state_dir.join("root-cert.pem")).context("reading the controller's root")?;
    let roots = hbone::TrustBundle::from_pem(&roots)?.roots().to_vec();
    // As ztunnel builds it from `--controller`, `--controller-ca` and `--node-token-file`.
    let endpoint = |node: usize| -> anyhow::Result<Client> {
        let host = controller.api.ip().to_string();
        Ok(Client::new(Endpoint {
            server_name: host.clone().try_into()?,
            host,
            port: controller.api.port(),
            roots: roots.clone(),
            token_file: token_file(node),
            subscriber: meshapi::watch::Subscriber::Node(node_name(node)),
        })?)
    };

    // (1a) Every node subscribing at once, as after a controller restart.
    let (reports, rx) = mpsc::unbounded_channel();
    let mut deliveries = Deliveries { rx, pending: BTreeMap::new(), version: 0, skipped: 0 };
    let cpu0 = cpu_seconds(pid)?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for node in 0..s.subscribers {
        let client = endpoint(node)?;
        tasks.push(tokio::spawn(subscribe(node, client, node == 0, reports.clone())));
    }
    let subscribers = AbortOnDrop(tasks);
    let mut first = Vec::new();
    let deadline = started + ALL_SUBSCRIBED;
    while first.len() < s.subscribers {
        match deliveries.recv(deadline).await? {
            Report::Snapshot { took, bytes, attempts } => first.push((took, bytes, attempts)),
            other => bail!("while subscribing: unexpected {other:?}"),
        }
    }
    let all = started.elapsed();
    let cpu = cpu_seconds(pid)? - cpu0;
    let mut took: Vec<Duration> = first.iter().map(|f| f.0).collect();
    took.sort();
    let retried = first.iter().filter(|f| f.2 > 1).count();
    println!(
        "\n{} subscribers at once: every snapshot decoded after {all:.2?} (per subscriber: p50 {:.2?}, max {:.2?}; \
         {retried} retried after a timeout); {} bytes each; controller CPU meanwhile {cpu:.2} s, its directory \
         polling included (the decoding, here, shares the same cores)",
        s.subscribers,
        pct(&took, 0.50),
        pct(&took, 1.0),
        first[0].1,
    );

    // (1b) A new subscriber while the others are connected: request to decoded snapshot.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut fresh = Vec::new();
    let mut snapshot_line = String::new();
    for i in 0..s.snapshots {
        let client = endpoint(i % NODES)?;
        let (timing, line) = tokio::time::timeout(ROUND, one_snapshot(&client))
            .await
            .context("a new subscriber's snapshot did not arrive in time")??;
        fresh.push(timing);
        snapshot_line = line;
    }
    let column = |f: fn(&SnapshotTiming) -> Duration| {
        let mut v: Vec<Duration> = fresh.iter().map(f).collect();
        v.sort();
        v
    };
    let snapshot_times = column(|t| t.decoded);
    let snapshot_bytes = snapshot_line.len() + 1;
    println!(
        "snapshot to a new subscriber: p50 {:.2?}, max {:.2?} over {} (connect, TLS, request, headers p50 {:.2?}; \
         whole line received p50 {:.2?}; decoding it p50 {:.2?}); {} bytes ({:.2} MiB)",
        pct(&snapshot_times, 0.50),
        pct(&snapshot_times, 1.0),
        snapshot_times.len(),
        pct(&column(|t| t.headers), 0.50),
        pct(&column(|t| t.received), 0.50),
        pct(&column(|t| t.decoded - t.received), 0.50),
        snapshot_bytes,
        snapshot_bytes as f64 / (1 << 20) as f64
    );

    // One unmeasured change: the watch streams of the one-off subscribers above end when the
    // controller next writes to them.
    let mut round = 0;
    change_pod(&cluster, s, &mut deliveries, round).await.context("the first change")?;
    round += 1;

    // (5a) At rest: cluster loaded, subscribers connected, nothing changing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rest = Memory::of(pid)?;
    let subscribed = Metrics::read(controller.metrics)?.get("weft_controller_subscribers");
    println!("\ncontroller at rest with {subscribed} open watch streams: RSS {rest}");
    let cpu0 = cpu_seconds(pid)?;
    tokio::time::sleep(IDLE).await;
    let idle_rate = (cpu_seconds(pid)? - cpu0) / IDLE.as_secs_f64();
    println!("controller CPU at rest: {:.1}% of one core (polling {} files)", idle_rate * 100.0, cluster_files);

    // (2, 3, 5b) One pod at a time.
    let before = Metrics::read(controller.metrics)?;
    let cpu0 = cpu_seconds(pid)?;
    let phase = Instant::now();
    let mut all_latency = Vec::new();
    let mut first_latency = Vec::new();
    let mut spread = Vec::new();
    let mut detected = Vec::new();
    let mut pushed_all = Vec::new();
    let mut line_bytes = Vec::new();
    let mut delta_lines = Vec::new();
    let mut pause = Random(0x9E37_79B9_7F4A_7C15);
    for _ in 0..s.rounds {
        let ((written, written_wall), delivered) = change_pod(&cluster, s, &mut deliveries, round).await?;
        round += 1;
        // Split at the commit, as the controller logged it: finding the change, then pushing it.
        let last_wall = delivered.iter().map(|d| d.wall).max().unwrap_or(written_wall);
        let last = delivered.iter().map(|d| d.at).max().unwrap_or(written);
        let committed = controller.committed(delivered[0].version).await;
        if let Some(committed) = committed {
            detected.push(committed.duration_since(written_wall).unwrap_or_default());
            pushed_all.push(last_wall.duration_since(committed).unwrap_or_default());
        }
        eprintln!(
            "round {round}: version {}, written → committed {:?}, → all decoded {:?}",
            delivered[0].version,
            committed.and_then(|c| c.duration_since(written_wall).ok()),
            last.saturating_duration_since(written)
        );
        let earliest = delivered.iter().map(|d| d.at).min().unwrap_or(written);
        all_latency.push(last.saturating_duration_since(written));
        first_latency.push(earliest.saturating_duration_since(written));
        spread.push(last.saturating_duration_since(earliest));
        line_bytes.push(delivered[0].bytes);
        // One subscriber's copy of each line (bounded by the rounds), for the apply costs.
        delta_lines.extend(delivered.into_iter().find_map(|d| d.line));
        // The next write lands at a random point of the poll cycle: a round ends just after
        // a scan, so a fixed pause would always write at the same phase of the next one.
        tokio::time::sleep(Duration::from_millis(50) + pause.next(2 * s.poll_period() + Duration::from_millis(100)))
            .await;
    }
    let wall = phase.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid)? - cpu0;
    let after = Metrics::read(controller.metrics)?;
    let end = Memory::of(pid)?;
    for v in [&mut all_latency, &mut first_latency, &mut spread, &mut detected, &mut pushed_all] {
        v.sort();
    }
    line_bytes.sort();
    let pushes = after.get("weft_controller_pushes_total") - before.get("weft_controller_pushes_total");
    let pushed = after.get("weft_controller_pushed_bytes_total") - before.get("weft_controller_pushed_bytes_total");
    let per_push = pushed / pushes.max(1.0);
    println!(
        "\none pod changed (its file rewritten with a new label), {} rounds, {} subscribers:",
        s.rounds, s.subscribers
    );
    let row = |what: &str, v: &[Duration]| {
        println!("  {what:<42} p50 {:>9.2?}  p99 {:>9.2?}  max {:>9.2?}", pct(v, 0.50), pct(v, 0.99), pct(v, 1.0))
    };
    row("file written → all subscribers decoded", &all_latency);
    row("file written → first subscriber decoded", &first_latency);
    row("first → last subscriber (fan-out)", &spread);
    if detected.len() == all_latency.len() {
        row("file written → committed (poll, scan, translate)", &detected);
        row("committed → all subscribers decoded (push)", &pushed_all);
    } else {
        println!("  (the controller's log did not show every commit: no split at the commit)");
    }
    println!(
        "  delta line per subscriber: {}-{} bytes; controller counters: {pushed:.0} bytes in {pushes:.0} pushes = \
         {per_push:.0} bytes per push{}",
        line_bytes[0],
        line_bytes[line_bytes.len() - 1],
        match deliveries.skipped {
            0 => String::new(),
            n => format!("; {n} other versions committed meanwhile"),
        }
    );
    println!(
        "  controller CPU over the phase: {cpu:.2} s in {wall:.1} s ({:.1}% of a core); above the idle rate: \
         {:.2} ms per change",
        cpu / wall * 100.0,
        ((cpu - idle_rate * wall) / s.rounds as f64 * 1000.0).max(0.0)
    );
    println!("  controller RSS after the changes: {end}");

    // (4) ztunnel's state applying these deltas, holding the whole cluster; measured with the
    // controller and the subscribers stopped, as a node would run it (beside other work, but
    // not beside a controller polling 10,000 files).
    drop(subscribers);
    drop(controller);
    let apply = apply_costs(&snapshot_line, &delta_lines, s.apply_rounds)?;
    println!("\nztunnel state holding {} workloads (loading the snapshot: {:.2?}):", apply.workloads, apply.build);
    row(&format!("the {} deltas above, decode", apply.decode.len()), &apply.decode);
    row(&format!("the {} deltas above, apply", apply.real.len()), &apply.real);
    row(&format!("{} single-workload relabels, apply", apply.synthetic.len()), &apply.synthetic);

    let lost = ACK_FAILURES.load(Ordering::Relaxed);
    if lost > 0 {
        println!("\n{lost} acknowledgements were not answered within 10 s");
    }

    let push_p99 = pct(&all_latency, 0.99);
    let apply_p99 = pct(&apply.synthetic, 0.99).max(pct(&apply.real, 0.99));
    let snapshot_max = pct(&snapshot_times, 1.0);
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    println!("\ngoals:");
    println!(
        "  one pod changed → all {} subscribers decoded, p99 < {GOAL_PUSH_P99:?}: {push_p99:.2?} from the file \
         written — {}",
        s.subscribers,
        met(push_p99 < GOAL_PUSH_P99)
    );
    if !pushed_all.is_empty() {
        let p99 = pct(&pushed_all, 0.99);
        println!("    from the commit (the push alone): {p99:.2?} — {}", met(p99 < GOAL_PUSH_P99));
    }
    println!("  bytes per subscriber per change < 2 KiB: {per_push:.0} — {}", met(per_push < GOAL_BYTES_PER_CHANGE));
    println!("  ztunnel apply p99 < {GOAL_APPLY_P99:?}: {apply_p99:.2?} — {}", met(apply_p99 < GOAL_APPLY_P99));
    println!(
        "  controller RSS at rest < 300 MiB: {:.1} MiB — {}",
        rest.rss as f64 / 1024.0,
        met(rest.rss < GOAL_RSS_KIB)
    );
    println!(
        "  snapshot to a new subscriber < {GOAL_SNAPSHOT:?}: max {snapshot_max:.2?} — {}",
        met(snapshot_max < GOAL_SNAPSHOT)
    );
    println!(
        "  anchor: istiod needs about 1 vCPU and 1.5 GB per 1,000 services; here {} services: {:.1} MiB at rest \
         (peak {:.1} MiB), {:.1}% of a core at rest (directory polling)",
        s.services,
        rest.rss as f64 / 1024.0,
        end.peak as f64 / 1024.0,
        idle_rate * 100.0
    );
    Ok(())
}

/// Rewrites pod `round`'s file with a new label and waits until every subscriber decoded
/// the delta carrying it. Returns when the file was replaced, and the deliveries.
async fn change_pod(
    cluster: &Path,
    s: &Settings,
    deliveries: &mut Deliveries,
    round: usize,
) -> anyhow::Result<((Instant, SystemTime), Vec<Delivered>)> {
    let pod = (round * 7919 + 13) % s.pods;
    let key = format!("Workload {}", pod_uid(pod, s));
    let written = rewrite_pod(cluster, pod, s, round)?;
    let delivered =
        deliveries.wait(&key, s.subscribers, written.0 + ROUND).await.with_context(|| format!("round {round}"))?;
    Ok((written, delivered))
}

// ---------------------------------------------------------------------------------------
// The cluster.

fn node_name(node: usize) -> String {
    format!("node-{node}")
}

/// Pod `i`: namespace `ns-<i / per-namespace>`, app `app-<a>` with [`PODS_PER_APP`] replicas,
/// on node `i % 100` (an app's replicas on consecutive nodes), address 10.0.0.2 + i.
struct PodSpec {
    namespace: String,
    name: String,
    app: String,
    node: String,
    ip: IpAddr,
}

fn pod_spec(i: usize, s: &Settings) -> PodSpec {
    let per_namespace = s.pods / NAMESPACES;
    let (ns, k) = (i / per_namespace, i % per_namespace);
    let (app, replica) = (k / PODS_PER_APP, k % PODS_PER_APP);
    PodSpec {
        namespace: format!("ns-{ns}"),
        name: format!("app-{app}-{replica}"),
        app: format!("app-{app}"),
        node: node_name(i % NODES),
        ip: IpAddr::V4(Ipv4Addr::from(0x0A00_0002 + i as u32)),
    }
}

fn pod_uid(i: usize, s: &Settings) -> String {
    let p = pod_spec(i, s);
    format!("{}/{}", p.namespace, p.name)
}

fn pod_object(i: usize, s: &Settings, extra_label: Option<(&str, String)>) -> serde_json::Value {
    let p = pod_spec(i, s);
    let mut labels = serde_json::Map::new();
    labels.insert("app".into(), json!(p.app));
    if let Some((k, v)) = extra_label {
        labels.insert(k.into(), json!(v));
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": p.name, "namespace": p.namespace, "labels": labels},
        "spec": {"nodeName": p.node, "serviceAccountName": p.app,
                 "containers": [{"name": "app", "image": "bench", "ports": [{"containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": p.ip.to_string(), "podIPs": [{"ip": p.ip.to_string()}]},
    })
}

fn pod_file(cluster: &Path, i: usize, s: &Settings) -> PathBuf {
    let p = pod_spec(i, s);
    cluster.join(format!("pod-{}-{}.yaml", p.namespace, p.name))
}

/// Writes the namespaces, the services (one file each kind, as the lab does) and one file
/// per pod. Returns the number of files.
fn write_cluster(cluster: &Path, s: &Settings) -> anyhow::Result<usize> {
    let mut namespaces = String::new();
    for ns in 0..NAMESPACES {
        let doc = json!({"apiVersion": "v1", "kind": "Namespace",
                         "metadata": {"name": format!("ns-{ns}"), "labels": {"weft.dev/mesh": "enabled"}}});
        namespaces.push_str(&format!("---\n{}\n", serde_json::to_string_pretty(&doc)?));
    }
    std::fs::write(cluster.join("namespaces.yaml"), namespaces)?;
    let per_namespace = s.services / NAMESPACES;
    let mut services = String::new();
    for j in 0..s.services {
        let (ns, app) = (j / per_namespace, j % per_namespace);
        let vip = Ipv4Addr::from(0x0A60_000A + j as u32).to_string();
        let doc = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{app}"), "namespace": format!("ns-{ns}")},
            "spec": {"clusterIP": vip, "clusterIPs": [vip],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
                     "selector": {"app": format!("app-{app}")}},
        });
        services.push_str(&format!("---\n{}\n", serde_json::to_string_pretty(&doc)?));
    }
    std::fs::write(cluster.join("services.yaml"), services)?;
    for i in 0..s.pods {
        std::fs::write(pod_file(cluster, i, s), serde_json::to_string_pretty(&pod_object(i, s, None))?)?;
    }
    Ok(s.pods + 2)
}

/// Rewrites pod `i`'s file with the label `bench-round: <round>`, atomically (a temporary
/// file renamed over it, as editors and the lab do). Returns when it was replaced.
fn rewrite_pod(cluster: &Path, i: usize, s: &Settings, round: usize) -> anyhow::Result<(Instant, SystemTime)> {
    let text = serde_json::to_string_pretty(&pod_object(i, s, Some(("bench-round", round.to_string()))))?;
    let path = pod_file(cluster, i, s);
    let tmp = cluster.join(format!(".bench-{round}.tmp"));
    std::fs::write(&tmp, text)?;
    let at = (Instant::now(), SystemTime::now());
    std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(at)
}

// ---------------------------------------------------------------------------------------
// The subscribers.

/// ztunnel's backoff between subscription attempts (from 200 ms, doubling up to 5 s), and a
/// bound on the attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const ATTEMPTS: usize = 10;

/// Acknowledgements the controller did not answer in time.
static ACK_FAILURES: AtomicUsize = AtomicUsize::new(0);

/// Snapshots being decoded at once: one per core.
static DECODING: LazyLock<Semaphore> =
    LazyLock::new(|| Semaphore::new(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)));

/// What a subscriber tells the benchmark.
#[derive(Debug)]
enum Report {
    /// Its first message: a snapshot of `bytes`, decoded `took` after it first asked, at
    /// its `attempts`-th subscription.
    Snapshot {
        took: Duration,
        bytes: usize,
        attempts: usize,
    },
    Delta(Delivered),
    Failed {
        node: usize,
        error: String,
    },
}

/// One delta, decoded by one subscriber.
#[derive(Debug, Clone)]
struct Delivered {
    version: u64,
    /// When it was decoded.
    at: Instant,
    /// The same, on the clock of the controller's log.
    wall: SystemTime,
    /// The line's length, newline included: what this subscriber was sent.
    bytes: usize,
    /// `<Kind> <name>` of every upsert and delete.
    keys: Vec<String>,
    /// The line itself, from one subscriber only (for the apply measurement).
    line: Option<String>,
}

/// One node's watch stream, as ztunnel's watcher runs it: subscribe (again, with backoff,
/// if the controller does not answer), decode, check the order, report, acknowledge. Runs
/// until the stream fails or the task is aborted.
async fn subscribe(node: usize, client: Client, keep_lines: bool, reports: mpsc::UnboundedSender<Report>) {
    let started = Instant::now();
    let mut backoff = BACKOFF_MIN;
    let mut attempts = 1;
    let mut lines = loop {
        match client.watch(None).await {
            Ok(lines) => break lines,
            Err(e) if attempts < ATTEMPTS && !e.is_refusal() => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                attempts += 1;
            }
            Err(e) => {
                let _ = reports.send(Report::Failed { node, error: format!("subscribing, {attempts} attempts: {e}") });
                return;
            }
        }
    };
    let result: anyhow::Result<()> = async {
        let mut cursor = Cursor::default();
        loop {
            let Some(line) = lines.next().await? else { bail!("the controller closed the stream") };
            // Snapshots take tens of milliseconds to decode: off the runtime's workers, which
            // here serve a hundred nodes' connections instead of one, and one per core at a
            // time (each decoded snapshot is tens of MiB while it is built).
            let message = if line.len() > 1 << 16 {
                let _permit = DECODING.acquire().await?;
                tokio::task::block_in_place(|| Message::decode(&line))?
            } else {
                Message::decode(&line)?
            };
            let (at, wall) = (Instant::now(), SystemTime::now());
            cursor.advance(&message)?;
            match message {
                Message::Snapshot { .. } => {
                    let _ = reports.send(Report::Snapshot { took: started.elapsed(), bytes: line.len() + 1, attempts });
                }
                Message::Delta { version, upserts, deletes, .. } => {
                    let mut keys = Vec::with_capacity(upserts.len() + deletes.len());
                    for u in upserts {
                        keys.push(u.map(|r| r.key().to_string()).map_err(|r| anyhow::anyhow!("rejected {r:?}"))?);
                    }
                    keys.extend(deletes.iter().map(|k| k.to_string()));
                    let bytes = line.len() + 1;
                    let line = keep_lines.then_some(line);
                    let _ = reports.send(Report::Delta(Delivered { version, at, wall, bytes, keys, line }));
                }
                Message::Resumed { .. } | Message::Heartbeat { .. } => continue,
            }
            let ack = Ack {
                subscriber: client.subscriber().clone(),
                epoch: cursor.epoch.clone(),
                version: cursor.version,
                rejected: vec![],
            };
            // As ztunnel: a lost acknowledgement is logged, the stream goes on.
            if client.ack(&ack).await.is_err() {
                ACK_FAILURES.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    .await;
    if let Err(e) = result {
        let _ = reports.send(Report::Failed { node, error: format!("{e:#}") });
    }
}

/// A new subscriber's first message, each step timed from the request (a new connection:
/// TCP, TLS, HTTP/2, then the request).
struct SnapshotTiming {
    /// The answer's headers.
    headers: Duration,
    /// The whole snapshot line.
    received: Duration,
    /// The line decoded.
    decoded: Duration,
}

async fn one_snapshot(client: &Client) -> anyhow::Result<(SnapshotTiming, String)> {
    let started = Instant::now();
    let mut lines = client.watch(None).await?;
    let headers = started.elapsed();
    let line = lines.next().await?.context("the stream ended before its snapshot")?;
    let received = started.elapsed();
    let message = Message::decode(&line)?;
    let decoded = started.elapsed();
    if !matches!(message, Message::Snapshot { .. }) {
        bail!("a new subscriber's first message is not a snapshot");
    }
    Ok((SnapshotTiming { headers, received, decoded }, line))
}

/// The subscribers' reports, and the deltas not yet claimed by a round.
struct Deliveries {
    rx: mpsc::UnboundedReceiver<Report>,
    pending: BTreeMap<u64, Vec<Delivered>>,
    /// The version of the last change waited for.
    version: u64,
    /// Versions committed between two changes of the benchmark (none expected).
    skipped: u64,
}

impl Deliveries {
    async fn recv(&mut self, deadline: Instant) -> anyhow::Result<Report> {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.rx.recv()).await {
            Ok(Some(Report::Failed { node, error })) => bail!("subscriber {} failed: {error}", node_name(node)),
            Ok(Some(report)) => Ok(report),
            Ok(None) => bail!("every subscriber is gone"),
            Err(_) => bail!("timed out"),
        }
    }

    /// Waits until `subscribers` subscribers decoded one delta, newer than the last, that
    /// carries `key`.
    async fn wait(&mut self, key: &str, subscribers: usize, deadline: Instant) -> anyhow::Result<Vec<Delivered>> {
        let version = loop {
            let found = self
                .pending
                .iter()
                .find(|(v, d)| **v > self.version && d.iter().any(|x| x.keys.iter().any(|k| k == key)));
            if let Some((&v, d)) = found
                && d.len() == subscribers
            {
                break v;
            }
            match self.recv(deadline).await.with_context(|| format!("waiting for {key}"))? {
                Report::Delta(d) => self.pending.entry(d.version).or_default().push(d),
                other => bail!("unexpected {other:?}"),
            }
        };
        if self.version != 0 {
            self.skipped += version - self.version - 1;
        }
        self.version = version;
        let delivered = self.pending.remove(&version).unwrap_or_default();
        self.pending.retain(|v, _| *v > version);
        Ok(delivered)
    }
}

/// Aborts the subscriber tasks when the benchmark ends, however it ends.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------
// ztunnel's state.

struct ApplyCosts {
    workloads: usize,
    build: Duration,
    decode: Vec<Duration>,
    /// The deltas the subscribers received, in order.
    real: Vec<Duration>,
    /// Single-workload relabels, as the deltas carry.
    synthetic: Vec<Duration>,
}

/// Loads the snapshot into a `StateStore`, then applies each delta line (timed: decoding
/// and applying apart), then `rounds` more single-workload label changes.
fn apply_costs(snapshot: &str, deltas: &[String], rounds: usize) -> anyhow::Result<ApplyCosts> {
    let Message::Snapshot { resources, .. } = Message::decode(snapshot)? else { bail!("not a snapshot") };
    let resources: Vec<Resource> =
        resources.into_iter().collect::<Result<_, _>>().map_err(|r| anyhow::anyhow!("{r:?}"))?;
    let workloads: Vec<Workload> = resources
        .iter()
        .filter_map(|r| match r {
            Resource::Workload(w) => Some(w.clone()),
            _ => None,
        })
        .collect();
    let store = StateStore::default();
    let started = Instant::now();
    store.apply(resources.into_iter().map(Change::Upsert));
    let build = started.elapsed();
    let held = store.load().workloads().count();

    let (mut decode, mut real) = (Vec::new(), Vec::new());
    for line in deltas {
        let started = Instant::now();
        let Message::Delta { upserts, deletes, .. } = Message::decode(line)? else { bail!("not a delta") };
        let mut changes: Vec<Change> = Vec::new();
        for u in upserts {
            changes.push(Change::Upsert(u.map_err(|r| anyhow::anyhow!("{r:?}"))?));
        }
        changes.extend(deletes.into_iter().map(Change::Delete));
        decode.push(started.elapsed());
        let started = Instant::now();
        let applied = store.apply(changes);
        real.push(started.elapsed());
        if applied.upserted == 0 {
            bail!("a delta changed nothing in the state");
        }
    }
    let mut synthetic = Vec::with_capacity(rounds);
    if !workloads.is_empty() {
        for i in 0..rounds {
            let mut w = workloads[(i * 7919) % workloads.len()].clone();
            w.labels.insert("bench-apply".into(), i.to_string());
            let change = Change::Upsert(Resource::Workload(w));
            let started = Instant::now();
            store.apply([change]);
            synthetic.push(started.elapsed());
        }
    }
    for v in [&mut decode, &mut real, &mut synthetic] {
        v.sort();
    }
    Ok(ApplyCosts { workloads: held, build, decode, real, synthetic })
}

// ---------------------------------------------------------------------------------------
// The controller process.

/// `WEFT_BENCH_CONTROLLER`, else the dedicated `weft-controller` next to `weft` when it is
/// newer than every source file it is built from (`cargo build --release -p controller`),
/// else `weft controller`, which the benchmark's build always refreshes.
fn controller_program() -> (PathBuf, Option<&'static str>) {
    if let Some(path) = std::env::var_os("WEFT_BENCH_CONTROLLER") {
        return (PathBuf::from(path), None);
    }
    let weft = PathBuf::from(env!("CARGO_BIN_EXE_weft"));
    let dedicated = weft.with_file_name("weft-controller");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = ["controller", "meshapi", "hbone", "spiffe"].map(|c| root.join(c));
    let built = std::fs::metadata(&dedicated).and_then(|m| m.modified()).ok();
    if built.is_some_and(|built| sources.iter().all(|dir| newest(dir).is_none_or(|t| t <= built))) {
        return (dedicated, None);
    }
    (weft, Some("controller"))
}

/// The latest modification time of the files under `dir` (`target` directories aside).
fn newest(dir: &Path) -> Option<std::time::SystemTime> {
    let mut latest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        let time = if meta.is_dir() {
            if entry.file_name() == "target" {
                continue;
            }
            newest(&entry.path())
        } else {
            meta.modified().ok()
        };
        latest = latest.max(time);
    }
    latest
}

fn node_token(program: &Path, subcommand: Option<&str>, state_dir: &Path, node: &str) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(subcommand)
        .args(["token", "--node", node, "--state-dir"])
        .arg(state_dir)
        .output()
        .context("running the controller's token command")?;
    if !out.status.success() {
        bail!("token --node {node}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// The running controller; killed when dropped.
struct Controller {
    child: Child,
    pid: u32,
    api: SocketAddr,
    metrics: SocketAddr,
    /// When each version was committed, from the "model changed" lines of its log.
    commits: Arc<Mutex<HashMap<u64, SystemTime>>>,
}

impl Controller {
    /// Starts `cmd` and waits for its "controller serving" line, which names the bound
    /// addresses. Its output goes on to `controller.log` in the work directory.
    fn start(mut cmd: Command, work: &WorkDir) -> anyhow::Result<Controller> {
        let log = work.path.join("controller.log");
        let mut file = std::fs::File::create(&log)?;
        cmd.stdout(Stdio::piped()).stderr(file.try_clone()?);
        let mut child = cmd.spawn().context("starting the controller")?;
        let pid = child.id();
        std::fs::write(work.path.join("controller.pid"), pid.to_string())?;
        let stdout = child.stdout.take().context("the controller's stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let commits = Arc::new(Mutex::new(HashMap::new()));
        let committed = commits.clone();
        // Reads the log until the controller exits, so it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("controller serving") {
                    let _ = tx.send(line.clone());
                }
                if let Some((version, at)) = commit_line(&line) {
                    committed.lock().unwrap_or_else(|p| p.into_inner()).insert(version, at);
                }
                let _ = writeln!(file, "{line}");
            }
        });
        let mut controller =
            Controller { child, pid, api: ([0, 0, 0, 0], 0).into(), metrics: ([0, 0, 0, 0], 0).into(), commits };
        let line = match rx.recv_timeout(STARTUP) {
            Ok(line) => line,
            Err(_) => {
                let status = controller.child.try_wait().ok().flatten();
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(10).collect();
                bail!("the controller did not start ({status:?}); its last lines:\n{}", tail.join("\n"));
            }
        };
        let addr = |field: &str| -> anyhow::Result<SocketAddr> {
            let at = line.find(&format!("{field}=")).with_context(|| format!("no {field}= in {line:?}"))?;
            let value = line[at + field.len() + 1..].split_whitespace().next().unwrap_or_default();
            value.parse().with_context(|| format!("{field}={value:?}"))
        };
        controller.api = addr("api")?;
        controller.metrics = addr("metrics")?;
        Ok(controller)
    }
}

impl Controller {
    /// When `version` was committed; its log line may come a moment after the subscribers
    /// decoded it (waits up to a second).
    async fn committed(&self, version: u64) -> Option<SystemTime> {
        if self.commits.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
            // Its log level hides them.
            return None;
        }
        for _ in 0..100 {
            if let Some(at) = self.commits.lock().unwrap_or_else(|p| p.into_inner()).get(&version) {
                return Some(*at);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }
}

/// `2026-11-22T04:40:00.123456Z  INFO controller::app: model changed version=42 ...`: the
/// version and the time.
fn commit_line(line: &str) -> Option<(u64, SystemTime)> {
    if !line.contains("model changed") {
        return None;
    }
    let at = line.find("version=")? + "version=".len();
    let version = line[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    Some((version, rfc3339(line.split_whitespace().next()?)?))
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z` as a time.
fn rfc3339(text: &str) -> Option<SystemTime> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut ymd = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let mut hms = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (hms.next()??, hms.next()??, hms.next()??);
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()?;
    let nanos: u32 = format!("{fraction:0<9}").get(..9)?.parse().ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory for the cluster, the controller's state and its log, removed when
/// dropped. Directories of earlier runs that were killed are removed first (and their
/// controller, if it outlived them).
struct WorkDir {
    path: PathBuf,
}

const WORK_PREFIX: &str = "weft-bench-controller-";

impl WorkDir {
    fn new() -> anyhow::Result<WorkDir> {
        let tmp = std::env::temp_dir();
        for entry in std::fs::read_dir(&tmp)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix(WORK_PREFIX) else { continue };
            if Path::new("/proc").join(pid).exists() {
                continue;
            }
            kill_stale_controller(&entry.path());
            let _ = std::fs::remove_dir_all(entry.path());
        }
        let path = tmp.join(format!("{WORK_PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(WorkDir { path })
    }
}

/// Kills the controller a killed run left behind: the process recorded in its directory,
/// only if its command line still names that directory.
fn kill_stale_controller(dir: &Path) {
    let Ok(pid) = std::fs::read_to_string(dir.join("controller.pid")) else { return };
    let pid = pid.trim();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy()) {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::env::var_os("WEFT_BENCH_KEEP").is_some() {
            eprintln!("kept (until the next run): {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Measuring.

/// A process's memory from `/proc/<pid>/status`, in KiB.
struct Memory {
    rss: u64,
    anon: u64,
    file: u64,
    /// The largest RSS so far (VmHWM).
    peak: u64,
}

impl Memory {
    fn of(pid: u32) -> anyhow::Result<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        Ok(Memory { rss: field("VmRSS:"), anon: field("RssAnon:"), file: field("RssFile:"), peak: field("VmHWM:") })
    }
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |k: u64| k as f64 / 1024.0;
        write!(
            f,
            "{:.1} MiB (anonymous {:.1}, file-backed {:.1}; peak so far {:.1})",
            mib(self.rss),
            mib(self.anon),
            mib(self.file),
            mib(self.peak)
        )
    }
}

/// User + system CPU time of `pid` so far, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses; utime and stime
    // are the 14th and 15th fields of the line.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("unreadable stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields.get(11).context("no utime")?.parse::<u64>()? + fields.get(12).context("no stime")?.parse::<u64>()?;
    Ok(ticks as f64 / clock_ticks() as f64)
}

/// `getconf CLK_TCK`: the unit of `/proc/<pid>/stat` times (100 on Linux in practice).
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// The controller's metrics (counters and gauges without labels).
struct Metrics(HashMap<String, f64>);

impl Metrics {
    fn read(addr: SocketAddr) -> anyhow::Result<Metrics> {
        let text = weft::meshlab::http_get(addr, "/metrics")?;
        let values = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once(' '))
            .filter_map(|(k, v)| Some((k.to_owned(), v.trim().parse().ok()?)))
            .collect();
        Ok(Metrics(values))
    }

    fn get(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(f64::NAN)
    }
}

/// The `q` quantile of sorted `v` (nearest rank: p99 of 100 samples is the 99th).
fn pct(v: &[Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}
