//! The waypoint in the lab: HTTP from a client pod on node 0 to `weft app web` in a pod on
//! node 1, on three paths measured in the same run, alternating:
//!
//! ```text
//! direct:   dclient ───────────────────────────────────────────────────────────► dserver:8080
//! ztunnel:  mclient ─► ztunnel node-0 ══HBONE══► ztunnel node-1 ──────────────► mserver:8080
//!           (service `plain`, no waypoint: VIP 10.96.0.60:80)
//! waypoint: mclient ─► ztunnel node-0 ══HBONE══► waypoint (node 1) ══HBONE══► ztunnel node-1 ─► wserver:8080
//!           (service `routed`, weft.dev/use-waypoint: wp, an HTTPRoute with one backend: VIP 10.96.0.61:80)
//! ```
//!
//! The waypoint's pod is on node 1, beside the server: the cross-node leg (node-0's ztunnel to
//! node 1) is then the same on the ztunnel and waypoint paths, and what the waypoint path adds
//! is the waypoint itself and its HBONE hop to the server's ztunnel on the same node.
//!
//! - fixed rate (open loop, `h2load --rps`, HTTP/1.1 with `--h1` and HTTP/2): p50/p99 of each
//!   request's time from its send to its response's end, at 1,000 and 5,000 req/s; the
//!   waypoint's CPU (utime + stime from `/proc/<pid>/stat`) and RSS (VmRSS, sampled every 100 ms)
//!   over each run, and the ztunnels' CPU;
//! - maximum throughput (closed loop): `wrk` (HTTP/1.1) and `h2load` without a rate (HTTP/2),
//!   with the waypoint restarted with `--worker-threads 1`: req/s, and req/s per waypoint core
//!   (requests over the waypoint's CPU seconds).
//!
//! Every load tool runs inside the client pod's network namespace, bounded by a request count
//! or a duration and killed after a deadline. Every measured request must answer `200`, and
//! the waypoint's `istio_requests_total` must count the waypoint path's requests and only
//! them: a run that went around the waypoint fails the benchmark.
//!
//! Run: `cargo bench --bench waypoint` as root, with `nft`, `h2load` (Debian package
//! `nghttp2-client`) and `wrk` installed. Settings: benches/README.md.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lab::LabProcess;
use serde_json::{Value, json};
use weft::meshlab::{MeshLab, PodSpec, sum_metric};

const NAMESPACE: &str = "bench";
const APP_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 80;
/// The waypoint's Gateway, and its pod's name and service account.
const GATEWAY: &str = "wp";
/// How long a path may take to answer its first request once everything is started.
const READY: Duration = Duration::from_secs(30);

/// The goals the waypoint is held to (at 1,000 req/s).
const GOAL_ADDED_P99_US: f64 = 1000.0;
const GOAL_VCPU_PER_1K: f64 = 0.05;
const GOAL_MIB_PER_1K: f64 = 20.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Direct,
    Ztunnel,
    Waypoint,
}

impl Route {
    const ALL: [Route; 3] = [Route::Direct, Route::Ztunnel, Route::Waypoint];

    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Ztunnel => "ztunnel",
            Route::Waypoint => "waypoint",
        }
    }

    fn client(self) -> &'static str {
        match self {
            Route::Direct => "dclient",
            Route::Ztunnel | Route::Waypoint => "mclient",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http1,
    Http2,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Http1 => "HTTP/1.1",
            Proto::Http2 => "HTTP/2",
        }
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn vip(n: u16) -> IpAddr {
    IpAddr::V4(lab::addresses::service_vip(40 + n))
}

fn main() {
    if let Err(e) = lab::Lab::require_root() {
        eprintln!("the waypoint benchmark needs root: {e}");
        std::process::exit(1);
    }
    for tool in ["h2load", "wrk"] {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!("the waypoint benchmark needs `{tool}`: apt-get install -y wrk nghttp2-client");
            std::process::exit(1);
        }
    }
    let settings = Settings::from_env();
    let bench = Bench::new(&settings);
    bench.run(&settings);
}

/// What the environment asks for (benches/README.md).
struct Settings {
    secs: u64,
    reps: usize,
    rates: Vec<u64>,
    /// Client connections per 1,000 req/s of a fixed rate (at least this many).
    connections: u64,
    wrk_connections: u64,
    only: String,
    waypoint_args: Vec<String>,
    waypoint_log: String,
}

impl Settings {
    fn from_env() -> Settings {
        let rates = std::env::var("WEFT_BENCH_RATES").unwrap_or_else(|_| "1000,5000".into());
        let mut rates: Vec<u64> =
            rates.split(',').filter_map(|r| r.trim().parse().ok()).filter(|r| (1..=50_000).contains(r)).collect();
        if rates.is_empty() {
            rates.push(1000);
        }
        Settings {
            secs: env_u64("WEFT_BENCH_SECS", 10).clamp(2, 60),
            reps: env_u64("WEFT_BENCH_REPS", 3).clamp(1, 9) as usize,
            rates,
            connections: env_u64("WEFT_BENCH_CONNECTIONS", 8).clamp(1, 64),
            wrk_connections: env_u64("WEFT_BENCH_WRK_CONNECTIONS", 16).clamp(1, 256),
            only: std::env::var("WEFT_BENCH_ONLY").unwrap_or_default(),
            waypoint_args: std::env::var("WEFT_BENCH_WAYPOINT_ARGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            waypoint_log: std::env::var("WEFT_BENCH_WAYPOINT_LOG").unwrap_or_else(|_| "info".into()),
        }
    }

    /// Connections for a fixed rate: each carries the same share of requests at every rate, so
    /// a higher rate loads the proxies, not one connection's queue.
    fn connections_for(&self, rate: u64) -> u64 {
        (self.connections * rate / 1000).max(self.connections)
    }

    fn part(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.split(',').any(|p| p == name)
    }
}

struct Bench {
    mesh: MeshLab,
    /// The program the waypoint runs as (the dedicated `weft-waypoint` when it is fresh).
    waypoint_program: (PathBuf, Option<&'static str>),
    waypoint: Option<LabProcess>,
    waypoint_args: Vec<String>,
    clock_ticks: f64,
}

/// One fixed-rate run.
struct FixedRun {
    p50: f64,
    p99: f64,
    /// Requests per second h2load achieved.
    achieved: f64,
    /// CPU seconds over wall seconds: the waypoint, ztunnel node-0, ztunnel node-1.
    vcpu: [f64; 3],
    /// The waypoint's highest VmRSS during the run (KiB).
    rss_peak: u64,
    /// Tunnels the waypoint opened to the server's ztunnel during the run (its connections to
    /// the endpoint: one per HTTP/2 endpoint, one per HTTP/1.1 request in flight at most).
    upstream_tunnels: f64,
}

/// One closed-loop run.
struct MaxRun {
    rps: f64,
    /// Waypoint CPU seconds over wall seconds.
    waypoint_vcpu: f64,
}

impl Bench {
    fn new(settings: &Settings) -> Bench {
        let weft = Path::new(env!("CARGO_BIN_EXE_weft"));
        let mut mesh = MeshLab::new("wpbench", 2, weft).expect("building the lab");
        let pod = |node: usize, name: &str, labels: &[(&str, &str)]| {
            let mut p = PodSpec::new(node, NAMESPACE, name, name);
            p.labels.extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            p
        };
        mesh.add_pod(pod(0, "dclient", &[]).not_enrolled()).expect("dclient pod");
        mesh.add_pod(pod(1, "dserver", &[]).not_enrolled()).expect("dserver pod");
        mesh.add_pod(pod(0, "mclient", &[])).expect("mclient pod");
        mesh.add_pod(pod(1, "mserver", &[])).expect("mserver pod");
        mesh.add_pod(pod(1, "wserver", &[])).expect("wserver pod");
        mesh.add_pod(pod(1, GATEWAY, &[("gateway.networking.k8s.io/gateway-name", GATEWAY)]))
            .expect("the waypoint's pod");
        for p in ["dclient", "mclient"] {
            mesh.pod(p)
                .netns()
                .run(|| {
                    std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")?;
                    std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "10000 65000")
                })
                .expect("entering the pod")
                .expect("setting the pod's TCP sysctls");
        }
        mesh.put_objects("bench", &objects()).expect("services, Gateway, HTTPRoute");
        mesh.start_ztunnels().expect("starting the controller and ztunnels");
        for (p, name) in [("dserver", "direct"), ("mserver", "ztunnel"), ("wserver", "waypoint")] {
            let app = mesh.start_web(p, APP_PORT, name, 0).expect("starting weft app web");
            mesh.keep(app);
        }
        let waypoint_program = waypoint_program(weft);
        let clock_ticks = clock_ticks();
        let mut bench = Bench {
            mesh,
            waypoint_program,
            waypoint: None,
            waypoint_args: settings.waypoint_args.clone(),
            clock_ticks,
        };
        bench.restart_waypoint(&settings.waypoint_args, &settings.waypoint_log);
        bench.mesh.wait_enrolled(0, 1).expect("node-0 enrolls mclient");
        for route in Route::ALL {
            bench.wait_answers(route);
        }
        bench
    }

    fn run(mut self, settings: &Settings) {
        let (program, subcommand) = &self.waypoint_program;
        println!(
            "waypoint lab benchmark: 2 nodes, {} cores, {} s per run, median of {}; fixed rates {:?} req/s, {} connections per 1,000 req/s",
            cores(),
            settings.secs,
            settings.reps,
            settings.rates,
            settings.connections
        );
        println!(
            "waypoint: {} {} (pod on node 1, WEFT_LOG={}, args {:?})",
            program.display(),
            subcommand.unwrap_or(""),
            settings.waypoint_log,
            self.waypoint_args
        );
        if subcommand.is_some() {
            println!(
                "  (not the dedicated binary: build it after the benchmark, `cargo build --release -p waypoint`, \
                 for the memory a waypoint pod would see)"
            );
        }
        let (zprogram, zsub) = self.mesh.ztunnel_program();
        println!("ztunnel: {} {}", zprogram.display(), zsub.unwrap_or(""));
        println!("{}", tool_versions());

        let rss_fresh = lab::rss_kib(self.waypoint_pid());
        // Warm-up, unmeasured: every path's connections and the waypoint's pools exist.
        for proto in [Proto::Http1, Proto::Http2] {
            for route in Route::ALL {
                self.fixed_rate(route, proto, 1000, 1, settings.connections);
            }
        }
        std::thread::sleep(Duration::from_secs(2));
        let rss_rest = lab::rss_kib(self.waypoint_pid());
        let rss_rest_split = rss_split(self.waypoint_pid());

        // Fixed rate: (rate, protocol) → per route, the runs.
        let mut fixed: Vec<(u64, Proto, [Vec<FixedRun>; 3])> = Vec::new();
        if settings.part("latency") {
            for &rate in &settings.rates {
                for proto in [Proto::Http1, Proto::Http2] {
                    let mut runs: [Vec<FixedRun>; 3] = Default::default();
                    for rep in 0..settings.reps {
                        // Each repetition starts on another path: no path always runs first.
                        for k in 0..3 {
                            let i = (rep + k) % 3;
                            runs[i].push(self.fixed_rate(
                                Route::ALL[i],
                                proto,
                                rate,
                                settings.secs,
                                settings.connections_for(rate),
                            ));
                        }
                    }
                    fixed.push((rate, proto, runs));
                }
            }
        }
        let rss_after_load = lab::rss_kib(self.waypoint_pid());

        // Maximum throughput with one waypoint worker thread.
        let mut max_rows: Vec<(String, [Vec<MaxRun>; 3])> = Vec::new();
        if settings.part("throughput") {
            let mut one = settings.waypoint_args.clone();
            one.extend(["--worker-threads".to_owned(), "1".to_owned()]);
            self.restart_waypoint(&one, &settings.waypoint_log);
            self.wait_answers(Route::Waypoint);
            for (label, proto) in [
                (format!("HTTP/1.1, wrk, {} connections", settings.wrk_connections), Proto::Http1),
                ("HTTP/2, h2load, 4 connections x 16 streams".to_owned(), Proto::Http2),
            ] {
                // Unmeasured: the restarted waypoint's pools.
                self.max_rate(Route::Waypoint, proto, 2, settings.wrk_connections);
                let mut runs: [Vec<MaxRun>; 3] = Default::default();
                for rep in 0..settings.reps {
                    for k in 0..3 {
                        let i = (rep + k) % 3;
                        runs[i].push(self.max_rate(Route::ALL[i], proto, settings.secs, settings.wrk_connections));
                    }
                }
                max_rows.push((label, runs));
            }
        }

        report(&fixed, &max_rows, rss_fresh, rss_rest, &rss_rest_split, rss_after_load);

        if let Some(w) = self.waypoint.take() {
            let _ = w.signal(lab::Signal::SIGTERM);
            let _ = w.wait_timeout(Duration::from_secs(30));
        }
    }

    fn waypoint_pid(&self) -> u32 {
        self.waypoint.as_ref().expect("the waypoint runs").pid()
    }

    /// Stops the waypoint (if one runs) and starts it again with `args`, as
    /// [`MeshLab::start_waypoint`] does, with the chosen program and log level.
    fn restart_waypoint(&mut self, args: &[String], log: &str) {
        if let Some(old) = self.waypoint.take() {
            let _ = old.signal(lab::Signal::SIGTERM);
            if old.wait_timeout(Duration::from_secs(30)).ok().flatten().is_none() {
                let _ = old.kill();
            }
        }
        let token = self.mesh.service_account_token_file(NAMESPACE, GATEWAY).expect("the waypoint's token");
        let (program, subcommand) = &self.waypoint_program;
        let mut cmd = Command::new(program);
        cmd.args(subcommand)
            .arg("--controller")
            .arg(self.mesh.controller_addr().to_string())
            .arg("--controller-ca")
            .arg(self.mesh.ca_files().0)
            .arg("--token-file")
            .arg(token)
            .args(["--namespace", NAMESPACE, "--name", GATEWAY])
            .args(args)
            .env("WEFT_LOG", log);
        let process = self.mesh.pod(GATEWAY).netns().spawn(cmd).expect("starting the waypoint");
        process.wait_for_log("waypoint ready", Duration::from_secs(30)).expect("the waypoint starts");
        self.waypoint = Some(process);
        self.waypoint_args = args.to_vec();
    }

    fn target(&self, route: Route) -> SocketAddr {
        match route {
            Route::Direct => SocketAddr::new(IpAddr::V4(self.mesh.pod("dserver").ip()), APP_PORT),
            Route::Ztunnel => SocketAddr::new(vip(10), SERVICE_PORT),
            Route::Waypoint => SocketAddr::new(vip(11), SERVICE_PORT),
        }
    }

    fn url(&self, route: Route) -> String {
        format!("http://{}/", self.target(route))
    }

    /// Waits until `route` answers with its server's name (the route reached the proxies).
    fn wait_answers(&self, route: Route) {
        let deadline = Instant::now() + READY;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.mesh.http_tally(route.client(), self.target(route), "bench", 5, &[]) {
                Ok(counts) if counts.get(route.name()) == Some(&5) => return,
                Ok(counts) => last = format!("{counts:?}"),
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("the {} path never answered: {last}", route.name());
    }

    /// The waypoint's `istio_requests_total` for the routed service, from inside its pod.
    fn waypoint_requests(&self) -> f64 {
        let pod = self.mesh.pod(GATEWAY);
        let addr = SocketAddr::new(IpAddr::V4(pod.ip()), 15020);
        let text = pod
            .netns()
            .run(move || weft::meshlab::http_get(addr, "/metrics"))
            .expect("entering the waypoint's pod")
            .expect("the waypoint's metrics");
        sum_metric(&text, "istio_requests_total", &[("destination_service_name", "routed")])
    }

    /// Tunnels node-1's ztunnel has accepted from the waypoint so far.
    fn upstream_tunnels(&self) -> f64 {
        self.mesh
            .metric(
                1,
                "istio_tcp_connections_opened_total",
                &[("reporter", "destination"), ("source_workload", GATEWAY)],
            )
            .expect("node-1's ztunnel metrics")
    }

    /// CPU seconds so far of the waypoint, ztunnel node-0 and ztunnel node-1.
    fn cpu(&self) -> [f64; 3] {
        let pids = [self.waypoint_pid(), self.mesh.ztunnel(0).pid(), self.mesh.ztunnel(1).pid()];
        pids.map(|p| cpu_ticks(p) as f64 / self.clock_ticks)
    }

    /// `rate` requests per second over `connections` for `secs` (open loop: h2load sends on
    /// schedule, HTTP/2 with up to 8 streams in flight per connection).
    fn fixed_rate(&self, route: Route, proto: Proto, rate: u64, secs: u64, connections: u64) -> FixedRun {
        let total = rate * secs;
        let log = self.mesh.lab.log_dir().join(format!("h2load-{}-{}.tsv", route.name(), fastish_id()));
        let mut cmd = Command::new("h2load");
        cmd.args(["-t", "1", "-c", &connections.to_string()])
            .arg(format!("--rps={}", rate as f64 / connections as f64))
            .args(["-n", &total.to_string(), "-N", "10s", "-T", &format!("{}s", secs * 3 + 10)])
            .arg("--log-file")
            .arg(&log);
        match proto {
            Proto::Http1 => cmd.arg("--h1"),
            Proto::Http2 => cmd.args(["-m", "8"]),
        };
        cmd.arg(self.url(route));
        let counted_before = self.waypoint_requests();
        let tunnels_before = self.upstream_tunnels();
        let cpu_before = self.cpu();
        let pid = self.waypoint_pid();
        let done = AtomicBool::new(false);
        let started = Instant::now();
        let (out, rss_peak) = std::thread::scope(|s| {
            let sampler = s.spawn(|| {
                let mut peak = 0;
                while !done.load(Ordering::Relaxed) {
                    peak = peak.max(lab::rss_kib(pid));
                    std::thread::sleep(Duration::from_millis(100));
                }
                peak
            });
            let out = self
                .mesh
                .pod(route.client())
                .netns()
                .output(cmd, Duration::from_secs(secs * 3 + 30))
                .expect("h2load in the client pod");
            done.store(true, Ordering::Relaxed);
            (out, sampler.join().unwrap_or(0))
        });
        let wall = started.elapsed().as_secs_f64();
        let cpu_after = self.cpu();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let samples = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        let mut latencies = Vec::with_capacity(total as usize);
        let mut failed = 0usize;
        for line in samples.lines() {
            let mut cols = line.split('\t');
            let (_, status, micros) = (cols.next(), cols.next(), cols.next());
            match (status.and_then(|s| s.parse::<i32>().ok()), micros.and_then(|m| m.parse::<f64>().ok())) {
                (Some(200), Some(us)) => latencies.push(us),
                _ => failed += 1,
            }
        }
        assert!(
            failed == 0 && latencies.len() as u64 == total,
            "{} {} at {rate}/s: {} of {total} requests answered 200, {failed} failed\n{stdout}\n{}",
            route.name(),
            proto.name(),
            latencies.len(),
            String::from_utf8_lossy(&out.stderr)
        );
        self.check_counted(route, counted_before, total as f64);
        let elapsed = h2load_seconds(&stdout).unwrap_or(wall);
        let (p50, p99) = percentiles(&mut latencies);
        let vcpu = [0, 1, 2].map(|i| (cpu_after[i] - cpu_before[i]) / wall);
        let upstream_tunnels = self.upstream_tunnels() - tunnels_before;
        let run = FixedRun { p50, p99, achieved: total as f64 / elapsed, vcpu, rss_peak, upstream_tunnels };
        eprintln!(
            "  {:<8} {:<8} at {rate}/s: p50 {:.0} µs p99 {:.0} µs, {:.0} req/s; vCPU waypoint {:.3} ztunnels {:.3}/{:.3}; waypoint RSS peak {} KiB, {} upstream tunnels",
            route.name(),
            proto.name(),
            run.p50,
            run.p99,
            run.achieved,
            run.vcpu[0],
            run.vcpu[1],
            run.vcpu[2],
            run.rss_peak,
            run.upstream_tunnels
        );
        run
    }

    /// Requests per second with as many requests in flight as the client keeps (closed loop).
    fn max_rate(&self, route: Route, proto: Proto, secs: u64, wrk_connections: u64) -> MaxRun {
        let mut cmd;
        match proto {
            Proto::Http1 => {
                cmd = Command::new("wrk");
                cmd.args(["-t", "1", "-c", &wrk_connections.to_string(), "-d", &format!("{secs}s"), "--timeout", "5s"]);
            }
            Proto::Http2 => {
                cmd = Command::new("h2load");
                cmd.args(["-t", "1", "-c", "4", "-m", "16", "-D", &secs.to_string(), "-N", "10s"]);
            }
        }
        cmd.arg(self.url(route));
        let counted_before = self.waypoint_requests();
        let cpu_before = self.cpu();
        let started = Instant::now();
        let out = self
            .mesh
            .pod(route.client())
            .netns()
            .output(cmd, Duration::from_secs(secs + 60))
            .expect("the load tool in the client pod");
        let wall = started.elapsed().as_secs_f64();
        let cpu_after = self.cpu();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let (requests, failed, rps) = match proto {
            Proto::Http1 => parse_wrk(&stdout),
            Proto::Http2 => parse_h2load_closed(&stdout),
        }
        .unwrap_or_else(|| panic!("unreadable load tool output:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
        assert!(
            requests > 0 && failed * 1000 <= requests,
            "{} {}: {failed} of {requests} requests failed\n{stdout}",
            route.name(),
            proto.name()
        );
        // h2load counts requests in flight at the deadline as not done; the waypoint
        // finishes them: at least the completed ones were counted.
        self.check_counted(route, counted_before, (requests - failed) as f64);
        let run = MaxRun { rps, waypoint_vcpu: (cpu_after[0] - cpu_before[0]) / wall };
        eprintln!(
            "  {:<8} {:<8} closed loop: {:.0} req/s, waypoint {:.2} cores",
            route.name(),
            proto.name(),
            run.rps,
            run.waypoint_vcpu
        );
        run
    }

    /// The waypoint path's requests were all counted by the waypoint; the others not at all.
    fn check_counted(&self, route: Route, before: f64, requests: f64) {
        // Its record is written when the response body ends: let the last ones land.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let delta = self.waypoint_requests() - before;
            let ok = match route {
                Route::Waypoint => delta >= requests,
                Route::Direct | Route::Ztunnel => delta == 0.0,
            };
            if ok {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "the {} path's {requests} requests: the waypoint counted {delta}; the path did not go where it should",
                    route.name()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Two Services on the same port (one plain, one using the waypoint, each selecting its own
/// server), the waypoint's Gateway, and a trivial HTTPRoute for the routed one.
fn objects() -> Vec<Value> {
    let service = |name: &str, n: u16, app: &str, waypoint: bool| {
        let labels = if waypoint { json!({"weft.dev/use-waypoint": GATEWAY}) } else { json!({}) };
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
            "spec": {"clusterIP": vip(n).to_string(), "clusterIPs": [vip(n).to_string()],
                     "ports": [{"port": SERVICE_PORT, "targetPort": APP_PORT}], "selector": {"app": app}},
        })
    };
    vec![
        service("plain", 10, "mserver", false),
        service("routed", 11, "wserver", true),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
               "metadata": {"name": GATEWAY, "namespace": NAMESPACE},
               "spec": {"gatewayClassName": "weft-waypoint",
                        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
               "metadata": {"name": "routed", "namespace": NAMESPACE},
               "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "routed", "port": SERVICE_PORT}],
                        "rules": [{"backendRefs": [{"name": "routed", "port": SERVICE_PORT}]}]}}),
    ]
}

/// The dedicated waypoint binary beside `weft` when it is at least as new (its memory is what a waypoint
/// pod would see), else `weft waypoint`; `WEFT_BENCH_WAYPOINT` names another binary.
fn waypoint_program(weft: &Path) -> (PathBuf, Option<&'static str>) {
    if let Some(path) = std::env::var_os("WEFT_BENCH_WAYPOINT") {
        return (PathBuf::from(path), None);
    }
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    // The `waypoint` package's binary (`cargo build --release -p waypoint`), under either name.
    for name in ["weft-waypoint", "waypoint"] {
        let dedicated = weft.with_file_name(name);
        if dedicated.is_file() && modified(&dedicated) >= modified(weft) {
            return (dedicated, None);
        }
    }
    (weft.to_owned(), Some("waypoint"))
}

fn report(
    fixed: &[(u64, Proto, [Vec<FixedRun>; 3])],
    max_rows: &[(String, [Vec<MaxRun>; 3])],
    rss_fresh: u64,
    rss_rest: u64,
    rss_rest_split: &str,
    rss_after_load: u64,
) {
    let med = |runs: &[FixedRun], f: fn(&FixedRun) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
    if !fixed.is_empty() {
        println!("\nlatency at a fixed rate (µs, each request from its send to its response's end; median of runs)");
        println!(
            "{:<22} {:>15} {:>15} {:>15} {:>20} {:>20}",
            "", "direct p50/p99", "ztunnel p50/p99", "waypoint p50/p99", "waypoint-ztunnel", "waypoint-direct"
        );
        for (rate, proto, runs) in fixed {
            let p = |i: usize| (med(&runs[i], |r| r.p50), med(&runs[i], |r| r.p99));
            let (d, z, w) = (p(0), p(1), p(2));
            println!(
                "{:<22} {:>7.0}/{:<7.0} {:>7.0}/{:<7.0} {:>7.0}/{:<7.0} {:>+9.0}/{:<+10.0} {:>+9.0}/{:<+10.0}",
                format!("{} at {rate}/s", proto.name()),
                d.0,
                d.1,
                z.0,
                z.1,
                w.0,
                w.1,
                w.0 - z.0,
                w.1 - z.1,
                w.0 - d.0,
                w.1 - d.1
            );
        }
        println!(
            "\nresources at a fixed rate (vCPU per 1,000 req/s = CPU seconds / wall seconds / (achieved rate / 1,000); median of runs)"
        );
        println!(
            "{:<22} {:>14} {:>22} {:>22} {:>18} {:>17}",
            "", "waypoint", "both ztunnels, wp path", "both ztunnels, zt path", "waypoint RSS peak", "upstream tunnels"
        );
        for (rate, proto, runs) in fixed {
            let per_k = |i: usize, f: fn(&FixedRun) -> f64| {
                median(&mut runs[i].iter().map(|r| f(r) / (r.achieved / 1000.0)).collect::<Vec<_>>())
            };
            let peak = median(&mut runs[2].iter().map(|r| r.rss_peak as f64).collect::<Vec<_>>());
            let tunnels = median(&mut runs[2].iter().map(|r| r.upstream_tunnels).collect::<Vec<_>>());
            println!(
                "{:<22} {:>14.4} {:>22.4} {:>22.4} {:>14.1} MiB {:>17.0}",
                format!("{} at {rate}/s", proto.name()),
                per_k(2, |r| r.vcpu[0]),
                per_k(2, |r| r.vcpu[1] + r.vcpu[2]),
                per_k(1, |r| r.vcpu[1] + r.vcpu[2]),
                peak / 1024.0,
                tunnels
            );
        }
        let achieved: Vec<String> = fixed
            .iter()
            .map(|(rate, proto, runs)| {
                let lowest = runs.iter().flatten().map(|r| r.achieved).fold(f64::INFINITY, f64::min);
                format!("{} {rate}/s: lowest {lowest:.0}", proto.name())
            })
            .collect();
        println!("achieved rates: {}", achieved.join("; "));
    }
    println!(
        "\nmemory: waypoint RSS just started {:.1} MiB, at rest after warm-up {:.1} MiB ({rss_rest_split}), after the fixed-rate runs {:.1} MiB",
        rss_fresh as f64 / 1024.0,
        rss_rest as f64 / 1024.0,
        rss_after_load as f64 / 1024.0
    );

    if !max_rows.is_empty() {
        println!("\nmaximum throughput, closed loop (req/s, median of runs; waypoint with --worker-threads 1)");
        println!(
            "{:<40} {:>10} {:>10} {:>10} {:>9} {:>14} {:>20}",
            "", "direct", "ztunnel", "waypoint", "wp/zt", "waypoint cores", "req/s per wp core"
        );
        for (label, runs) in max_rows {
            let m = |i: usize| median(&mut runs[i].iter().map(|r| r.rps).collect::<Vec<_>>());
            let cores = median(&mut runs[2].iter().map(|r| r.waypoint_vcpu).collect::<Vec<_>>());
            let per_core = median(&mut runs[2].iter().map(|r| r.rps / r.waypoint_vcpu.max(1e-3)).collect::<Vec<_>>());
            println!(
                "{:<40} {:>10.0} {:>10.0} {:>10.0} {:>8.0}% {:>14.2} {:>20.0}",
                label,
                m(0),
                m(1),
                m(2),
                m(2) / m(1) * 100.0,
                cores,
                per_core
            );
        }
    }

    // Goals, at 1,000 req/s: the worse of the two protocols.
    let at_1k: Vec<&(u64, Proto, [Vec<FixedRun>; 3])> = fixed.iter().filter(|(r, _, _)| *r == 1000).collect();
    if at_1k.is_empty() {
        return;
    }
    let worst =
        |f: &dyn Fn(&[Vec<FixedRun>; 3]) -> f64| at_1k.iter().map(|(_, _, runs)| f(runs)).fold(f64::MIN, f64::max);
    let added_p99 = worst(&|runs| med(&runs[2], |r| r.p99) - med(&runs[1], |r| r.p99));
    let added_p99_direct = worst(&|runs| med(&runs[2], |r| r.p99) - med(&runs[0], |r| r.p99));
    let vcpu = worst(&|runs| med(&runs[2], |r| r.vcpu[0] / (r.achieved / 1000.0)));
    let mib = worst(&|runs| med(&runs[2], |r| r.rss_peak as f64 / 1024.0 / (r.achieved / 1000.0)));
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    println!("\ngoals at 1,000 req/s (the worse of HTTP/1.1 and HTTP/2):");
    println!(
        "  added p99 through the waypoint <= {GOAL_ADDED_P99_US:.0} µs: {added_p99:+.0} µs over the ztunnel path ({added_p99_direct:+.0} µs over direct): {}",
        met(added_p99 <= GOAL_ADDED_P99_US)
    );
    println!("  waypoint CPU <= {GOAL_VCPU_PER_1K} vCPU per 1,000 req/s: {vcpu:.4}: {}", met(vcpu <= GOAL_VCPU_PER_1K));
    println!(
        "  waypoint memory <= {GOAL_MIB_PER_1K} MiB per 1,000 req/s (peak RSS under load): {mib:.1} MiB: {}",
        met(mib <= GOAL_MIB_PER_1K)
    );
}

/// A number to keep log file names apart within this process.
fn fastish_id() -> u64 {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// `finished in 10.00s, ...` from h2load's output.
fn h2load_seconds(out: &str) -> Option<f64> {
    let rest = out.lines().find_map(|l| l.strip_prefix("finished in "))?;
    let t = rest.split(',').next()?.trim();
    if let Some(ms) = t.strip_suffix("ms") {
        ms.parse::<f64>().ok().map(|v| v / 1000.0)
    } else {
        t.strip_suffix('s')?.parse().ok()
    }
}

/// (requests completed, failed, req/s) from h2load's output without a rate.
fn parse_h2load_closed(out: &str) -> Option<(u64, u64, f64)> {
    // "requests: 120 total, 130 started, 120 done, 118 succeeded, 2 failed, 0 errored, 0 timeout"
    let line = out.lines().find_map(|l| l.strip_prefix("requests: "))?;
    let field = |name: &str| {
        line.split(',').find_map(|part| part.trim().strip_suffix(name).and_then(|n| n.trim().parse::<u64>().ok()))
    };
    let succeeded = field("succeeded")?;
    let failed = field("failed")? + field("errored").unwrap_or(0);
    let status = out.lines().find_map(|l| l.strip_prefix("status codes: "))?;
    let ok = status.split(',').find_map(|p| p.trim().strip_suffix("2xx").and_then(|n| n.trim().parse::<u64>().ok()))?;
    let not_ok = succeeded.saturating_sub(ok);
    Some((succeeded, failed + not_ok, ok as f64 / h2load_seconds(out)?))
}

/// (requests, failed, req/s) from wrk's output.
fn parse_wrk(out: &str) -> Option<(u64, u64, f64)> {
    let requests = out.lines().find_map(|l| {
        let (n, rest) = l.trim().split_once(' ')?;
        rest.starts_with("requests in").then(|| n.parse::<u64>().ok())?
    })?;
    let rps = out.lines().find_map(|l| l.strip_prefix("Requests/sec:")).and_then(|v| v.trim().parse().ok())?;
    let non_2xx = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    // "Socket errors: connect 0, read 0, write 0, timeout 0"
    let socket_errors: u64 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map(|v| v.split(',').filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    Some((requests, non_2xx + socket_errors, rps))
}

fn tool_versions() -> String {
    let first_line = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .output()
            .map(|o| {
                let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
                text.lines().next().unwrap_or("").trim().to_owned()
            })
            .unwrap_or_default()
    };
    format!("load: {}; {}", first_line("h2load", "--version"), first_line("wrk", "--version"))
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Clock ticks per second, the unit of `/proc/<pid>/stat`'s CPU times.
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After ")": state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let at = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    at(11) + at(12)
}

/// Anonymous and file-backed parts of the resident memory.
fn rss_split(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field =
        |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned()).unwrap_or_default();
    format!("anon {}, file {}", field("RssAnon:"), field("RssFile:"))
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentiles(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(|a, b| a.total_cmp(b));
    if samples.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    (at(0.5), at(0.99))
}
