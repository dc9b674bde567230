//! ztunnel in the lab: the same client and server code, across two nodes, once
//! between two pods outside the mesh (direct) and once between two enrolled pods (meshed:
//! app → ztunnel node-0 → HBONE → ztunnel node-1 → app), in the same run, alternating.
//!
//! - throughput, 1 and 8 streams: bulk writes into `weft app sink` for `WEFT_BENCH_SECS`;
//! - latency: 1-byte and 64-byte request/response ping-pong on one connection (p50/p99);
//! - HTTP request/response at a fixed rate (open loop: latency counted from each request's
//!   scheduled time, so a stall is not hidden), p50/p99;
//! - connection setup rate: connect, 1-byte exchange, close, from 4 client threads;
//! - memory: ztunnel RSS at rest and per 1,000 idle tunneled connections, and each ztunnel's
//!   context switches per second while those stay open and silent (its wake-ups at rest);
//! - what each throughput run cost, counted over the same run: CPU seconds, page faults and
//!   context switches per GB of each ztunnel and of the endpoints (the client's writer threads
//!   and the sink), and each ztunnel's syscalls per MB (`perf stat`, when installed); the same
//!   per round trip over the latency runs.
//!
//! Run: `cargo bench --bench ztunnel` as root, with `nft` installed. Env: `WEFT_BENCH_SECS`
//! (default 5), `WEFT_BENCH_REPS` (default 3, medians reported), `WEFT_BENCH_PERF` (`0`: no
//! syscall counts).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use weft::meshlab::{MeshLab, PodSpec};

const SINK: u16 = 5001;
const ECHO: u16 = 5002;
const HTTP: u16 = 5003;

struct Pair {
    name: &'static str,
    client: &'static str,
    server: &'static str,
}

const DIRECT: Pair = Pair { name: "direct", client: "dclient", server: "dserver" };
const MESHED: Pair = Pair { name: "meshed", client: "mclient", server: "mserver" };

/// The processes whose costs a run counts.
struct Watched {
    /// ztunnel on node 0 (the client side) and node 1 (the server side).
    ztunnels: [u32; 2],
    /// The sink of each pair, by the pair's name.
    sinks: Vec<(&'static str, u32)>,
    /// Count syscalls with `perf stat` (installed, and not turned off).
    perf: bool,
}

impl Watched {
    fn sink(&self, pair: &Pair) -> u32 {
        self.sinks.iter().find(|(name, _)| *name == pair.name).map_or(0, |(_, pid)| *pid)
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    if let Err(e) = lab::Lab::require_root() {
        eprintln!("the ztunnel benchmark needs root: {e}");
        std::process::exit(1);
    }
    let secs = env_u64("WEFT_BENCH_SECS", 5).clamp(1, 60);
    let reps = env_u64("WEFT_BENCH_REPS", 3).clamp(1, 9) as usize;
    let weft = Path::new(env!("CARGO_BIN_EXE_weft"));
    let mut mesh = MeshLab::new("bench", 2, weft).expect("building the lab");
    mesh.add_pod(PodSpec::new(0, "bench", "dclient", "dclient").not_enrolled()).unwrap();
    mesh.add_pod(PodSpec::new(1, "bench", "dserver", "dserver").not_enrolled()).unwrap();
    mesh.add_pod(PodSpec::new(0, "bench", "mclient", "mclient")).unwrap();
    mesh.add_pod(PodSpec::new(1, "bench", "mserver", "mserver")).unwrap();
    // Connection-setup runs open tens of thousands of short connections: let the pods reuse
    // TIME_WAIT ports, or later repetitions would measure port exhaustion.
    for pod in ["dclient", "dserver", "mclient", "mserver"] {
        mesh.pod(pod)
            .netns()
            .run(|| {
                std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")?;
                std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "10000 65000")
            })
            .expect("entering the pod")
            .expect("setting the pod's TCP sysctls");
    }
    mesh.write_config().expect("writing the lab's config");
    let extra = std::env::var("WEFT_BENCH_ZTUNNEL_ARGS").unwrap_or_default();
    let extra: Vec<&str> = extra.split_whitespace().collect();
    for node in 0..2 {
        mesh.start_ztunnel(node, &extra).expect("starting ztunnels");
    }
    let mut sinks = Vec::new();
    for (pair, server) in [(&DIRECT, "dserver"), (&MESHED, "mserver")] {
        for (kind, port) in [("sink", SINK), ("http", HTTP)] {
            let p = mesh.start_app(server, kind, port).unwrap();
            if kind == "sink" {
                sinks.push((pair.name, p.pid()));
            }
            mesh.keep(p);
        }
        let p = mesh.start_echo(server, ECHO, None).unwrap();
        mesh.keep(p);
    }
    mesh.wait_enrolled(0, 1).unwrap();
    mesh.wait_enrolled(1, 1).unwrap();
    let perf = std::env::var("WEFT_BENCH_PERF").map_or(true, |v| v != "0") && perf_works();
    let watched = Watched { ztunnels: [mesh.ztunnel(0).pid(), mesh.ztunnel(1).pid()], sinks, perf };
    let only = std::env::var("WEFT_BENCH_ONLY").unwrap_or_default();
    let run = |part: &str| only.is_empty() || only.split(',').any(|p| p == part);
    println!(
        "ztunnel lab benchmark: 2 nodes, {secs} s per throughput run, median of {reps}; {} cores; ztunnel args {extra:?}",
        cores()
    );
    let (program, subcommand) = mesh.ztunnel_program();
    println!("ztunnel: {} {}", program.display(), subcommand.unwrap_or(""));
    if subcommand.is_some() {
        println!(
            "  (not the dedicated binary: build it after the benchmark, `cargo build --release -p ztunnel`, \
             for the memory a node would see)"
        );
    }

    // Memory first, before traffic grows any pool or cache.
    std::thread::sleep(Duration::from_secs(1));
    let rss_idle: Vec<u64> = (0..2).map(|n| lab::rss_kib(mesh.ztunnel(n).pid())).collect();
    let rss_split: Vec<String> = (0..2).map(|n| rss_split(mesh.ztunnel(n).pid())).collect();
    let idle = run("memory").then(|| idle_connections(&mesh, 1000));

    let mut rows: Vec<(String, f64, f64, &str)> = Vec::new();
    let mut flows = Vec::new();
    if run("throughput") {
        for streams in [1usize, 8] {
            let (d, m) = runs(
                reps,
                || throughput(&mesh, &watched, &DIRECT, streams, secs),
                || throughput(&mesh, &watched, &MESHED, streams, secs),
            );
            let gbps = |v: &[Flow]| median(&mut v.iter().map(|f| f.gbps).collect::<Vec<_>>());
            rows.push((format!("throughput, {streams} stream(s)"), gbps(&d), gbps(&m), "Gbit/s"));
            flows.push((streams, d, m));
        }
    }
    let mut latency_rows = Vec::new();
    let mut per_round_trip = Vec::new();
    if run("latency") {
        for size in [1usize, 64] {
            let mut costs = Vec::new();
            let (d, m) = alternate_pair(
                reps,
                || ping_pong(&mesh, &DIRECT, size, 20_000).0,
                || {
                    let before = watched.ztunnels.map(Usage::of_process);
                    let (times, trips) = ping_pong(&mesh, &MESHED, size, 20_000);
                    let spent = watched.ztunnels.map(Usage::of_process);
                    costs.push(spent[0].since(before[0]).plus(spent[1].since(before[1])).per(trips as f64));
                    times
                },
            );
            latency_rows.push((format!("{size}-byte round trip"), d, m));
            per_round_trip.push((size, costs));
        }
        let d = http_fixed_rate(&mesh, &DIRECT, 1000, secs);
        let m = http_fixed_rate(&mesh, &MESHED, 1000, secs);
        latency_rows.push(("HTTP req/resp at 1000/s".to_owned(), d, m));
    }
    if run("setup") {
        let (d, m) = alternate(reps, || conn_rate(&mesh, &DIRECT, 4, secs), || conn_rate(&mesh, &MESHED, 4, secs));
        rows.push(("connection setup (4 clients)".to_owned(), d, m, "conn/s"));
    }

    println!("\n{:<32} {:>12} {:>12} {:>8}", "measure", "direct", "meshed", "ratio");
    for (name, d, m, unit) in &rows {
        println!("{:<32} {:>9.2} {unit:<2} {:>9.2} {unit:<2} {:>7.1}%", name, d, m, m / d * 100.0);
    }
    println!("\n{:<32} {:>18} {:>18} {:>14}", "latency (µs)", "direct p50/p99", "meshed p50/p99", "added p50");
    for (name, d, m) in &latency_rows {
        println!("{:<32} {:>8.1} / {:<7.1} {:>8.1} / {:<7.1} {:>+12.1}", name, d.0, d.1, m.0, m.1, m.0 - d.0);
    }
    for (streams, d, m) in &flows {
        print_flow_costs(*streams, d, m, watched.perf);
    }
    if !per_round_trip.is_empty() {
        println!("\nper meshed round trip, both ztunnels: {}", USAGE_COLUMNS);
        for (size, costs) in &per_round_trip {
            println!("  {:<30} {}", format!("{size}-byte (CPU in µs)"), usage_cells(costs, 1e6));
        }
    }
    println!("\nmemory: ztunnel RSS at rest: node-0 {} KiB, node-1 {} KiB", rss_idle[0], rss_idle[1]);
    println!("memory: at rest, node-0 {}; node-1 {}", rss_split[0], rss_split[1]);
    if let Some(idle) = &idle {
        println!(
            "memory: per idle tunneled connection: node-0 (outbound) {:.2} KiB, node-1 (inbound) {:.2} KiB",
            idle.kib.0, idle.kib.1
        );
        println!(
            "at rest with 1000 idle tunneled connections open, {} s: context switches per second: node-0 {:.2}, node-1 {:.2}",
            AT_REST.as_secs(),
            idle.wakeups.0,
            idle.wakeups.1
        );
    }
    let ratio = |name: &str| rows.iter().find(|r| r.0.starts_with(name)).map_or(f64::NAN, |r| r.2 / r.1 * 100.0);
    let added = latency_rows.get(1).map_or(f64::NAN, |r| r.2.0 - r.1.0);
    let one_stream = flows.iter().find(|f| f.0 == 1);
    let cpu_per_gb = |runs: &[Flow], of: fn(&Flow) -> Usage| {
        median(&mut runs.iter().map(|f| of(f).per(f.bytes as f64 / 1e9).cpu).collect::<Vec<_>>())
    };
    let (ztunnels_cpu, direct_cpu) = one_stream.map_or((f64::NAN, f64::NAN), |(_, d, m)| {
        (cpu_per_gb(m, |f| f.ztunnels[0].plus(f.ztunnels[1])), cpu_per_gb(d, |f| f.endpoints))
    });
    println!(
        "\nsummary: 1-stream throughput {:.1}% of direct; both ztunnels {ztunnels_cpu:.2} CPU s/GB (direct endpoints {direct_cpu:.2}); \
         added p50 64-byte RTT {added:.1} µs; idle RSS {} KiB; {:.2} KiB/conn",
        ratio("throughput, 1 "),
        rss_idle.iter().max().copied().unwrap_or(0),
        idle.as_ref().map_or(f64::NAN, |i| i.kib.0.max(i.kib.1))
    );

    // A graceful stop, so that a heap-profiled ztunnel (feature dhat-heap) writes its profile.
    for node in 0..2 {
        if let Some(z) = mesh.take_ztunnel(node) {
            let _ = z.signal(lab::Signal::SIGTERM);
            let _ = z.wait_timeout(Duration::from_secs(30));
        }
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Runs `direct` and `meshed` alternately `reps` times; each one's results.
fn runs<T>(reps: usize, mut direct: impl FnMut() -> T, mut meshed: impl FnMut() -> T) -> (Vec<T>, Vec<T>) {
    let (mut d, mut m) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        d.push(direct());
        m.push(meshed());
    }
    (d, m)
}

/// Runs `direct` and `meshed` alternately `reps` times; medians of each component.
fn alternate_pair(
    reps: usize,
    direct: impl FnMut() -> (f64, f64),
    meshed: impl FnMut() -> (f64, f64),
) -> ((f64, f64), (f64, f64)) {
    let (d, m) = runs(reps, direct, meshed);
    let med = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| median(&mut v.iter().map(f).collect::<Vec<_>>());
    ((med(&d, |x| x.0), med(&d, |x| x.1)), (med(&m, |x| x.0), med(&m, |x| x.1)))
}

/// Runs `direct` and `meshed` alternately `reps` times; medians.
fn alternate(reps: usize, direct: impl FnMut() -> f64, meshed: impl FnMut() -> f64) -> (f64, f64) {
    let (mut d, mut m) = runs(reps, direct, meshed);
    (median(&mut d), median(&mut m))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn target(mesh: &MeshLab, pair: &Pair, port: u16) -> SocketAddr {
    SocketAddr::from((mesh.pod(pair.server).ip(), port))
}

/// One throughput run: what it moved and what it cost.
struct Flow {
    gbps: f64,
    /// Bytes the sink received.
    bytes: u64,
    /// The client's writer threads and the sink process.
    endpoints: Usage,
    /// Each ztunnel, over the run.
    ztunnels: [Usage; 2],
    /// Each ztunnel's syscalls per MB received by the sink (`perf stat`), when counted.
    syscalls_per_mb: [Option<f64>; 2],
}

/// Bytes received by the sink over `streams` connections writing for `secs`, and what the
/// endpoints and both ztunnels spent meanwhile.
fn throughput(mesh: &MeshLab, watched: &Watched, pair: &Pair, streams: usize, secs: u64) -> Flow {
    let to = target(mesh, pair, SINK);
    let conns: Vec<TcpStream> = (0..streams).map(|_| mesh.connect(pair.client, to).expect("connect")).collect();
    let sink = watched.sink(pair);
    let (sink_before, ztunnels_before) = (Usage::of_process(sink), watched.ztunnels.map(Usage::of_process));
    // Counts over the writing time (`secs`); the run lasts a little longer while the last
    // bytes drain, so the count is divided by the bytes of the same share of the run.
    let perf = watched.ztunnels.map(|pid| if watched.perf { count_syscalls(pid, secs) } else { None });
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let handles: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let before = Usage::of_this_thread();
                let buf = vec![0x5au8; 256 * 1024];
                while Instant::now() < deadline {
                    if c.write_all(&buf).is_err() {
                        break;
                    }
                }
                let _ = c.shutdown(Shutdown::Write);
                let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                let mut count = [0u8; 8];
                let received = match c.read_exact(&mut count) {
                    Ok(()) => u64::from_be_bytes(count),
                    Err(_) => 0,
                };
                (received, Usage::of_this_thread().since(before))
            })
        })
        .collect();
    let (mut bytes, mut endpoints) = (0, Usage::default());
    for h in handles {
        let (received, spent) = h.join().unwrap_or_default();
        bytes += received;
        endpoints = endpoints.plus(spent);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let endpoints = endpoints.plus(Usage::of_process(sink).since(sink_before));
    let ztunnels = [0, 1].map(|i| Usage::of_process(watched.ztunnels[i]).since(ztunnels_before[i]));
    let mb_counted = bytes as f64 / 1e6 * (secs as f64 / elapsed).min(1.0);
    let syscalls_per_mb = perf.map(|p| p.and_then(finish_syscall_count).map(|n| n as f64 / mb_counted));
    let gbps = bytes as f64 * 8.0 / elapsed / 1e9;
    let gb = bytes as f64 / 1e9;
    eprintln!(
        "  {} throughput {streams} stream(s): {gbps:.2} Gbit/s; CPU s/GB endpoints {:.2}, ztunnels {:.2} + {:.2}",
        pair.name,
        endpoints.per(gb).cpu,
        ztunnels[0].per(gb).cpu,
        ztunnels[1].per(gb).cpu
    );
    Flow { gbps, bytes, endpoints, ztunnels, syscalls_per_mb }
}

const USAGE_COLUMNS: &str = "CPU s, minor faults, major faults, voluntary / involuntary context switches";

/// Per GB moved, for each party of the runs of one stream count: median [min-max].
fn print_flow_costs(streams: usize, direct: &[Flow], meshed: &[Flow], perf: bool) {
    println!("\nper GB moved, {streams} stream(s): {USAGE_COLUMNS}; median [min-max] of the runs");
    let per_gb = |runs: &[Flow], of: &dyn Fn(&Flow) -> Usage| -> Vec<Usage> {
        runs.iter().map(|f| of(f).per(f.bytes as f64 / 1e9)).collect()
    };
    let parties: [(&str, Vec<Usage>); 5] = [
        ("direct: endpoints", per_gb(direct, &|f| f.endpoints)),
        ("meshed: endpoints", per_gb(meshed, &|f| f.endpoints)),
        ("meshed: ztunnel node-0", per_gb(meshed, &|f| f.ztunnels[0])),
        ("meshed: ztunnel node-1", per_gb(meshed, &|f| f.ztunnels[1])),
        ("meshed: both ztunnels", per_gb(meshed, &|f| f.ztunnels[0].plus(f.ztunnels[1]))),
    ];
    for (name, costs) in &parties {
        println!("  {name:<30} {}", usage_cells(costs, 1.0));
    }
    if !perf {
        println!("  syscalls per MB: not counted (perf not installed, or WEFT_BENCH_PERF=0)");
        return;
    }
    let calls = |i: usize| meshed.iter().filter_map(|f| f.syscalls_per_mb[i]).collect::<Vec<_>>();
    println!("  syscalls per MB, ztunnel node-0 {}, node-1 {}", spread(&calls(0), 1), spread(&calls(1), 1));
}

/// Each column of [`USAGE_COLUMNS`] over `costs`, CPU scaled by `cpu_scale`: median [min-max].
fn usage_cells(costs: &[Usage], cpu_scale: f64) -> String {
    let column = |f: fn(&Usage) -> f64| costs.iter().map(f).collect::<Vec<_>>();
    let cpu: Vec<f64> = costs.iter().map(|u| u.cpu * cpu_scale).collect();
    format!(
        "{} | {} | {} | {} / {}",
        spread(&cpu, 2),
        spread(&column(|u| u.minflt), 1),
        spread(&column(|u| u.majflt), 1),
        spread(&column(|u| u.voluntary), 1),
        spread(&column(|u| u.involuntary), 1)
    )
}

/// `median [min-max]` of `v`, with `decimals`.
fn spread(v: &[f64], decimals: usize) -> String {
    if v.is_empty() {
        return "-".to_owned();
    }
    let mut sorted = v.to_vec();
    let m = median(&mut sorted);
    format!("{m:.decimals$} [{:.decimals$}-{:.decimals$}]", sorted[0], sorted[sorted.len() - 1])
}

/// What a process (all its threads) or one thread has spent: CPU time and page faults from
/// `stat`, context switches from `status`. Counts kept as `f64` so they can be divided.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    /// utime + stime, seconds.
    cpu: f64,
    minflt: f64,
    majflt: f64,
    voluntary: f64,
    involuntary: f64,
}

impl Usage {
    /// The whole process: `stat` sums its threads; `status` counts context switches of one
    /// thread only, so those are summed over `task/*`.
    fn of_process(pid: u32) -> Usage {
        let mut usage = Usage::from_stat(Path::new(&format!("/proc/{pid}/stat")));
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
            let (voluntary, involuntary) = context_switches(&task.path().join("status"));
            usage.voluntary += voluntary;
            usage.involuntary += involuntary;
        }
        usage
    }

    /// The calling thread alone.
    fn of_this_thread() -> Usage {
        let mut usage = Usage::from_stat(Path::new("/proc/thread-self/stat"));
        (usage.voluntary, usage.involuntary) = context_switches(Path::new("/proc/thread-self/status"));
        usage
    }

    /// CPU time and page faults from a `stat` file.
    fn from_stat(stat: &Path) -> Usage {
        let text = std::fs::read_to_string(stat).unwrap_or_default();
        // The command name may hold spaces: fields are counted after its closing parenthesis.
        let after = text.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        // After ")": state is field 3, so minflt (10), majflt (12), utime (14) and stime (15)
        // are at 7, 9, 11 and 12.
        let at = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        Usage { cpu: (at(11) + at(12)) / clock_ticks(), minflt: at(7), majflt: at(9), ..Usage::default() }
    }

    fn since(self, before: Usage) -> Usage {
        Usage {
            cpu: self.cpu - before.cpu,
            minflt: self.minflt - before.minflt,
            majflt: self.majflt - before.majflt,
            voluntary: self.voluntary - before.voluntary,
            involuntary: self.involuntary - before.involuntary,
        }
    }

    fn plus(self, other: Usage) -> Usage {
        Usage {
            cpu: self.cpu + other.cpu,
            minflt: self.minflt + other.minflt,
            majflt: self.majflt + other.majflt,
            voluntary: self.voluntary + other.voluntary,
            involuntary: self.involuntary + other.involuntary,
        }
    }

    /// Each figure divided by `units` (GB moved, round trips).
    fn per(self, units: f64) -> Usage {
        Usage {
            cpu: self.cpu / units,
            minflt: self.minflt / units,
            majflt: self.majflt / units,
            voluntary: self.voluntary / units,
            involuntary: self.involuntary / units,
        }
    }
}

/// (voluntary, involuntary) context switches of one thread, from its `status` file.
/// Voluntary + involuntary context switches of each of a process's threads, by thread id.
fn switches_by_thread(pid: u32) -> std::collections::HashMap<u32, f64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
    tasks
        .filter_map(|task| {
            let tid = task.file_name().to_str()?.parse().ok()?;
            let (voluntary, involuntary) = context_switches(&task.path().join("status"));
            Some((tid, voluntary + involuntary))
        })
        .collect()
}

fn context_switches(status: &Path) -> (f64, f64) {
    let text = std::fs::read_to_string(status).unwrap_or_default();
    let field = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<f64>().ok()).unwrap_or(0.0)
    };
    (field("voluntary_ctxt_switches:"), field("nonvoluntary_ctxt_switches:"))
}

/// Clock ticks per second, the unit of `/proc/<pid>/stat`'s CPU times (`getconf CLK_TCK`).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Whether `perf stat` can count syscalls here (installed, tracepoints readable).
fn perf_works() -> bool {
    std::process::Command::new("perf")
        .args(["stat", "-x,", "-e", "raw_syscalls:sys_enter", "--", "true"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts counting `pid`'s syscalls (all its threads) for `secs` seconds.
fn count_syscalls(pid: u32, secs: u64) -> Option<std::process::Child> {
    std::process::Command::new("perf")
        .args(["stat", "-x,", "-e", "raw_syscalls:sys_enter", "-p", &pid.to_string(), "--", "sleep", &secs.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()
}

/// The count `perf stat -x,` printed (its first CSV field), once it has ended.
fn finish_syscall_count(child: std::process::Child) -> Option<u64> {
    let out = child.wait_with_output().ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    text.lines().find(|l| l.contains("raw_syscalls:sys_enter"))?.split(',').next()?.trim().parse().ok()
}

/// (p50, p99) in µs of `n` sequential `size`-byte round trips on one connection, and how
/// many round trips were made in all (warm-up included).
fn ping_pong(mesh: &MeshLab, pair: &Pair, size: usize, n: usize) -> ((f64, f64), usize) {
    let mut c = mesh.connect(pair.client, target(mesh, pair, ECHO)).expect("connect");
    c.set_nodelay(true).unwrap();
    let msg = vec![7u8; size];
    let mut back = vec![0u8; size];
    let mut samples = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut trips = 0;
    for i in 0..(n + 1000) {
        let t = Instant::now();
        c.write_all(&msg).unwrap();
        c.read_exact(&mut back).unwrap();
        trips += 1;
        if i >= 1000 {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        if Instant::now() > deadline {
            break;
        }
    }
    let r = percentiles(&mut samples);
    eprintln!("  {} {size}-byte RTT p50 {:.1} µs p99 {:.1} µs", pair.name, r.0, r.1);
    (r, trips)
}

/// (p50, p99) in µs of HTTP requests sent at `rate`/s on one keep-alive connection for
/// `secs`, measured from each request's scheduled send time.
fn http_fixed_rate(mesh: &MeshLab, pair: &Pair, rate: u64, secs: u64) -> (f64, f64) {
    let mut c = mesh.connect(pair.client, target(mesh, pair, HTTP)).expect("connect");
    c.set_nodelay(true).unwrap();
    let request = b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n";
    const RESPONSE_LEN: usize = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".len();
    let mut back = [0u8; RESPONSE_LEN];
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let total = (rate * secs) as usize;
    let mut samples = Vec::with_capacity(total);
    let start = Instant::now();
    for i in 0..total {
        let scheduled = start + interval * i as u32;
        if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        c.write_all(request).unwrap();
        c.read_exact(&mut back).unwrap();
        samples.push(scheduled.elapsed().as_secs_f64() * 1e6);
    }
    let r = percentiles(&mut samples);
    eprintln!("  {} HTTP at {rate}/s p50 {:.1} µs p99 {:.1} µs", pair.name, r.0, r.1);
    r
}

/// New connections per second (connect, 1-byte exchange, close) from `threads` clients.
fn conn_rate(mesh: &MeshLab, pair: &Pair, threads: usize, secs: u64) -> f64 {
    let to = target(mesh, pair, ECHO);
    let netns = mesh.pod(pair.client).netns().clone();
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (netns, count) = (netns.clone(), count.clone());
            std::thread::spawn(move || {
                netns
                    .run(|| {
                        while Instant::now() < deadline {
                            let Ok(mut c) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else { continue };
                            let mut b = [0u8; 1];
                            if c.write_all(b"x").is_ok() && c.read_exact(&mut b).is_ok() {
                                count.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    })
                    .expect("client thread in the pod")
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    let rate = count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    eprintln!("  {} connection setup: {rate:.0} conn/s", pair.name);
    rate
}

/// How long the idle tunnels are watched for wake-ups: longer than any per-connection timer
/// a ztunnel might run (HTTP/2 idle checks of 10-15 s).
const AT_REST: Duration = Duration::from_secs(20);

/// What `n` idle tunneled connections cost each ztunnel (node-0 outbound, node-1 inbound):
/// KiB each, and the context switches per second of the ztunnel's threads while they stay
/// open and silent for `AT_REST` (its wake-ups: none are needed).
struct IdleCost {
    kib: (f64, f64),
    wakeups: (f64, f64),
}

fn idle_connections(mesh: &MeshLab, n: usize) -> IdleCost {
    let to = target(mesh, &MESHED, ECHO);
    // One connection first, closed: one-time costs (the first HBONE handshake, lazily built
    // state) are not per connection.
    let tunneled = || {
        let mut c = mesh.connect(MESHED.client, to).expect("connect");
        let mut b = [0u8; 1];
        c.write_all(b"x").unwrap();
        c.read_exact(&mut b).unwrap();
        c
    };
    drop(tunneled());
    std::thread::sleep(Duration::from_millis(500));
    let before: Vec<u64> = (0..2).map(|i| lab::rss_kib(mesh.ztunnel(i).pid())).collect();
    let conns: Vec<TcpStream> = (0..n).map(|_| tunneled()).collect();
    std::thread::sleep(Duration::from_secs(2));
    let after: Vec<u64> = (0..2).map(|i| lab::rss_kib(mesh.ztunnel(i).pid())).collect();
    let switches = || (0..2).map(|i| switches_by_thread(mesh.ztunnel(i).pid())).collect::<Vec<_>>();
    let quiet_from = switches();
    std::thread::sleep(AT_REST);
    let quiet_to = switches();
    // Per thread, so that a thread ending in the window (an idle blocking-pool thread) does not
    // take its earlier switches out of the sum; its switches in the window are not counted.
    let wakeups = |i: usize| {
        let n: f64 = quiet_to[i].iter().map(|(tid, to)| to - quiet_from[i].get(tid).copied().unwrap_or(0.0)).sum();
        n / AT_REST.as_secs_f64()
    };
    drop(conns);
    std::thread::sleep(Duration::from_secs(1));
    let per = |i: usize| after[i].saturating_sub(before[i]) as f64 / n as f64;
    eprintln!(
        "  idle connections: RSS node-0 {} -> {} KiB, node-1 {} -> {} KiB",
        before[0], after[0], before[1], after[1]
    );
    IdleCost { kib: (per(0), per(1)), wakeups: (wakeups(0), wakeups(1)) }
}

/// What the resident memory is made of: anonymous (heap, stacks), file-backed (the binary and
/// libraries), and the binary's own share of the latter.
fn rss_split(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field =
        |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned()).unwrap_or_default();
    // Resident KiB of the executable's own mappings.
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut in_exe, mut exe_kib) = (false, 0u64);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            // A mapping's header: "start-end perms offset dev inode [path]".
            in_exe = line.split_whitespace().nth(5).is_some_and(|p| Path::new(p) == exe);
        } else if let Some(rss) = line.strip_prefix("Rss:").filter(|_| in_exe) {
            exe_kib += rss.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0);
        }
    }
    format!("anon {}, file {} (the ztunnel binary's {exe_kib} kB)", field("RssAnon:"), field("RssFile:"))
}

fn percentiles(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(|a, b| a.total_cmp(b));
    if samples.is_empty() {
        return (0.0, 0.0);
    }
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    (at(0.5), at(0.99))
}
