//! ztunnel in the lab: the same client and server code, across two nodes, once
//! between two pods outside the mesh (direct) and once between two enrolled pods (meshed:
//! app → ztunnel node-0 → HBONE → ztunnel node-1 → app), in the same run, alternating.
//!
//! - throughput, 1 and 8 streams: bulk writes into `weft app sink` for `WEFT_BENCH_SECS`;
//! - latency: 1-byte and 64-byte request/response ping-pong on one connection (p50/p99);
//! - HTTP request/response at a fixed rate (open loop: latency counted from each request's
//!   scheduled time, so a stall is not hidden), p50/p99;
//! - connection setup rate: connect, 1-byte exchange, close, from 4 client threads;
//! - memory: ztunnel RSS at rest and per 1,000 idle tunneled connections.
//!
//! Run: `cargo bench --bench ztunnel` as root, with `nft` installed. Env: `WEFT_BENCH_SECS`
//! (default 5), `WEFT_BENCH_REPS` (default 3, medians reported).

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
    for server in ["dserver", "mserver"] {
        for (kind, port) in [("sink", SINK), ("http", HTTP)] {
            let p = mesh.start_app(server, kind, port).unwrap();
            mesh.keep(p);
        }
        let p = mesh.start_echo(server, ECHO, None).unwrap();
        mesh.keep(p);
    }
    mesh.wait_enrolled(0, 1).unwrap();
    mesh.wait_enrolled(1, 1).unwrap();
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
    let rss_idle: Vec<u64> = (0..2).map(|n| rss_kib(mesh.ztunnel(n).pid())).collect();
    let rss_split: Vec<String> = (0..2).map(|n| rss_split(mesh.ztunnel(n).pid())).collect();
    let per_conn = if run("memory") { idle_connections(&mesh, 1000) } else { (f64::NAN, f64::NAN) };

    let mut rows: Vec<(String, f64, f64, &str)> = Vec::new();
    if run("throughput") {
        for streams in [1usize, 8] {
            let (d, m) = alternate(
                reps,
                || throughput(&mesh, &DIRECT, streams, secs),
                || throughput(&mesh, &MESHED, streams, secs),
            );
            rows.push((format!("throughput, {streams} stream(s)"), d, m, "Gbit/s"));
        }
    }
    let mut latency_rows = Vec::new();
    if run("latency") {
        for size in [1usize, 64] {
            let (d, m) = alternate_pair(
                reps,
                || ping_pong(&mesh, &DIRECT, size, 20_000),
                || ping_pong(&mesh, &MESHED, size, 20_000),
            );
            latency_rows.push((format!("{size}-byte round trip"), d, m));
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
    println!("\nmemory: ztunnel RSS at rest: node-0 {} KiB, node-1 {} KiB", rss_idle[0], rss_idle[1]);
    println!("memory: at rest, node-0 {}; node-1 {}", rss_split[0], rss_split[1]);
    println!(
        "memory: per idle tunneled connection: node-0 (outbound) {:.2} KiB, node-1 (inbound) {:.2} KiB",
        per_conn.0, per_conn.1
    );
    let ratio = |name: &str| rows.iter().find(|r| r.0.starts_with(name)).map_or(f64::NAN, |r| r.2 / r.1 * 100.0);
    let added = latency_rows.get(1).map_or(f64::NAN, |r| r.2.0 - r.1.0);
    println!(
        "\nsummary: 1-stream throughput {:.1}% of direct; added p50 64-byte RTT {added:.1} µs; idle RSS {} KiB; {:.2} KiB/conn",
        ratio("throughput, 1 "),
        rss_idle.iter().max().copied().unwrap_or(0),
        per_conn.0.max(per_conn.1)
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

/// Gbit/s received by the sink over `streams` connections writing for `secs`.
fn throughput(mesh: &MeshLab, pair: &Pair, streams: usize, secs: u64) -> f64 {
    let to = target(mesh, pair, SINK);
    let conns: Vec<TcpStream> = (0..streams).map(|_| mesh.connect(pair.client, to).expect("connect")).collect();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let handles: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let buf = vec![0x5au8; 256 * 1024];
                while Instant::now() < deadline {
                    if c.write_all(&buf).is_err() {
                        break;
                    }
                }
                let _ = c.shutdown(Shutdown::Write);
                let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                let mut count = [0u8; 8];
                match c.read_exact(&mut count) {
                    Ok(()) => u64::from_be_bytes(count),
                    Err(_) => 0,
                }
            })
        })
        .collect();
    let bytes: u64 = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    let elapsed = started.elapsed().as_secs_f64();
    let gbps = bytes as f64 * 8.0 / elapsed / 1e9;
    eprintln!("  {} throughput {streams} stream(s): {gbps:.2} Gbit/s", pair.name);
    gbps
}

/// (p50, p99) in µs of `n` sequential `size`-byte round trips on one connection.
fn ping_pong(mesh: &MeshLab, pair: &Pair, size: usize, n: usize) -> (f64, f64) {
    let mut c = mesh.connect(pair.client, target(mesh, pair, ECHO)).expect("connect");
    c.set_nodelay(true).unwrap();
    let msg = vec![7u8; size];
    let mut back = vec![0u8; size];
    let mut samples = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..(n + 1000) {
        let t = Instant::now();
        c.write_all(&msg).unwrap();
        c.read_exact(&mut back).unwrap();
        if i >= 1000 {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        if Instant::now() > deadline {
            break;
        }
    }
    let r = percentiles(&mut samples);
    eprintln!("  {} {size}-byte RTT p50 {:.1} µs p99 {:.1} µs", pair.name, r.0, r.1);
    r
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

/// KiB per idle tunneled connection on each ztunnel (node-0 outbound, node-1 inbound).
fn idle_connections(mesh: &MeshLab, n: usize) -> (f64, f64) {
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
    let before: Vec<u64> = (0..2).map(|i| rss_kib(mesh.ztunnel(i).pid())).collect();
    let conns: Vec<TcpStream> = (0..n).map(|_| tunneled()).collect();
    std::thread::sleep(Duration::from_secs(2));
    let after: Vec<u64> = (0..2).map(|i| rss_kib(mesh.ztunnel(i).pid())).collect();
    drop(conns);
    std::thread::sleep(Duration::from_secs(1));
    let per = |i: usize| after[i].saturating_sub(before[i]) as f64 / n as f64;
    eprintln!(
        "  idle connections: RSS node-0 {} -> {} KiB, node-1 {} -> {} KiB",
        before[0], after[0], before[1], after[1]
    );
    (per(0), per(1))
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

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn percentiles(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(|a, b| a.total_cmp(b));
    if samples.is_empty() {
        return (0.0, 0.0);
    }
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    (at(0.5), at(0.99))
}
