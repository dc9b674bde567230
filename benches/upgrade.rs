//! ztunnel upgrades in the lab (ARCHITECTURE §4.9): what a handoff costs the traffic and the node.
//!
//! Node 1's ztunnel carries `WEFT_BENCH_CONNS` idle long-lived connections (inbound HBONE from
//! a pod on node 0 to an echo app on node 1) and two clients that open connections back to back
//! (connect, 5-byte echo, close): one inbound to node 1 over HBONE, one outbound from a pod of
//! node 1. A second ztunnel for node 1 then takes it over, `WEFT_BENCH_REPS` times:
//!
//! - how long a new connection takes (connect to echo) when it starts during a handoff (from the
//!   new ztunnel's start to its commit), against the same clients' connections outside it:
//!   p50/p99/max, and failed connections (goal: p99 under 10 ms, none failed);
//! - how long the handoff takes (the new process's start to its commit);
//! - the resident memory (VmRSS) of the old and the new process while the old drains the idle
//!   connections, and of the one ztunnel before.
//!
//! Run: `cargo bench --bench upgrade` as root, with `nft` installed. Env: `WEFT_BENCH_CONNS`
//! (default 1000), `WEFT_BENCH_REPS` (default 5).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use weft::meshlab::{MeshLab, PodSpec};

const ECHO: u16 = 5002;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One new connection: when it started, how long it took, whether it worked.
struct Sample {
    at: Instant,
    took: Duration,
    ok: bool,
}

fn main() {
    if let Err(e) = lab::Lab::require_root() {
        eprintln!("the upgrade benchmark needs root: {e}");
        std::process::exit(1);
    }
    let conns = env_u64("WEFT_BENCH_CONNS", 1000).clamp(1, 20_000) as usize;
    let reps = env_u64("WEFT_BENCH_REPS", 5).clamp(1, 20) as usize;
    let weft = Path::new(env!("CARGO_BIN_EXE_weft"));
    let mut mesh = MeshLab::new("bench-upgrade", 2, weft).expect("building the lab");
    mesh.add_pod(PodSpec::new(0, "bench", "client", "client")).unwrap();
    mesh.add_pod(PodSpec::new(0, "bench", "peer", "peer")).unwrap();
    mesh.add_pod(PodSpec::new(1, "bench", "server", "server")).unwrap();
    mesh.add_pod(PodSpec::new(1, "bench", "worker", "worker")).unwrap();
    // The clients open thousands of short connections: let them reuse TIME_WAIT ports.
    for pod in ["client", "worker"] {
        mesh.pod(pod)
            .netns()
            .run(|| std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1"))
            .expect("entering the pod")
            .expect("setting tcp_tw_reuse");
    }
    mesh.start_ztunnels().expect("starting the mesh");
    let _apps = [mesh.start_echo("server", ECHO, None).unwrap(), mesh.start_echo("peer", ECHO, None).unwrap()];
    mesh.wait_enrolled(0, 2).unwrap();
    mesh.wait_enrolled(1, 2).unwrap();
    let server = SocketAddr::from((mesh.pod("server").ip(), ECHO));
    let peer = SocketAddr::from((mesh.pod("peer").ip(), ECHO));
    println!("upgrade benchmark: {conns} idle connections through node 1's ztunnel, {reps} upgrades");
    let (program, subcommand) = mesh.ztunnel_program();
    println!("ztunnel: {}{}", program.display(), subcommand.map(|s| format!(" {s}")).unwrap_or_default());

    let (mut during, mut outside) = (Vec::new(), Vec::new());
    let (mut failed_during, mut failed_outside) = (0usize, 0usize);
    let (mut handoffs, mut rss) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        let idle = open_idle(&mesh, "client", server, conns);
        std::thread::sleep(Duration::from_millis(500));
        let before = lab::rss_kib(mesh.ztunnel(1).pid());
        let stop = Arc::new(AtomicBool::new(false));
        let clients = [client(&mesh, "client", server, &stop), client(&mesh, "worker", peer, &stop)];
        std::thread::sleep(Duration::from_millis(500));
        let start = Instant::now();
        let old = mesh.upgrade_ztunnel(1, &[]).expect("the upgrade");
        let committed = Instant::now();
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            for s in c.join().expect("a client thread") {
                let in_window = s.at >= start && s.at <= committed;
                match (in_window, s.ok) {
                    (true, true) => during.push(s.took.as_secs_f64() * 1e3),
                    (false, true) => outside.push(s.took.as_secs_f64() * 1e3),
                    (true, false) => failed_during += 1,
                    (false, false) => failed_outside += 1,
                }
            }
        }
        // Both processes while the old one drains the idle connections.
        std::thread::sleep(Duration::from_secs(1));
        let (old_rss, new_rss) = (lab::rss_kib(old.pid()), lab::rss_kib(mesh.ztunnel(1).pid()));
        drop(idle);
        let closed = Instant::now();
        let exited = old.wait_timeout(Duration::from_secs(30)).expect("waiting for the old ztunnel");
        let drained = closed.elapsed();
        let handoff = committed - start;
        println!(
            "  upgrade {}: handoff {:.0} ms (process start to commit); RSS before {before} KiB, during the drain old {old_rss} KiB + new {new_rss} KiB; old exited {} ms after its connections closed",
            rep + 1,
            handoff.as_secs_f64() * 1e3,
            if exited.is_some() { drained.as_millis().to_string() } else { "not within 30 s:".into() }
        );
        handoffs.push(handoff.as_secs_f64() * 1e3);
        rss.push((before, old_rss, new_rss));
    }
    let (d50, d99, dmax) = percentiles(&mut during);
    let (o50, o99, omax) = percentiles(&mut outside);
    println!(
        "new connections started during a handoff: {} ({} failed): p50 {d50:.2} ms, p99 {d99:.2} ms, max {dmax:.2} ms (goal: p99 < 10 ms, none failed)",
        during.len() + failed_during,
        failed_during
    );
    println!(
        "new connections outside the handoffs:     {} ({} failed): p50 {o50:.2} ms, p99 {o99:.2} ms, max {omax:.2} ms",
        outside.len() + failed_outside,
        failed_outside
    );
    let (h50, _, hmax) = percentiles(&mut handoffs);
    println!("handoff, new process start to commit: median {h50:.0} ms, max {hmax:.0} ms");
    let median = |f: fn(&(u64, u64, u64)) -> u64| {
        let mut v: Vec<f64> = rss.iter().map(|r| f(r) as f64).collect();
        percentiles(&mut v).0
    };
    println!(
        "RSS (median): one ztunnel before {:.0} KiB; during the drain of {conns} connections old {:.0} KiB + new {:.0} KiB",
        median(|r| r.0),
        median(|r| r.1),
        median(|r| r.2)
    );
}

/// `n` connections from `pod` to `to`, each with one round trip done, left idle.
fn open_idle(mesh: &MeshLab, pod: &str, to: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut c = mesh.connect(pod, to).expect("an idle connection");
            let mut b = [0u8; 1];
            c.write_all(b"x").and_then(|()| c.read_exact(&mut b)).expect("its first round trip");
            c
        })
        .collect()
}

/// A client in `pod` opening connections to `to` back to back (1 ms apart) until `stop`, at
/// most 60 s.
fn client(mesh: &MeshLab, pod: &str, to: SocketAddr, stop: &Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Sample>> {
    let (netns, stop) = (mesh.pod(pod).netns().clone(), stop.clone());
    std::thread::spawn(move || {
        netns
            .run(move || {
                let mut samples = Vec::new();
                let bound = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < bound {
                    let at = Instant::now();
                    let ok = (|| -> std::io::Result<()> {
                        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
                        s.set_read_timeout(Some(Duration::from_secs(5)))?;
                        s.write_all(b"ping\n")?;
                        let mut back = [0u8; 5];
                        s.read_exact(&mut back)
                    })()
                    .is_ok();
                    samples.push(Sample { at, took: at.elapsed(), ok });
                    std::thread::sleep(Duration::from_millis(1));
                }
                samples
            })
            .expect("entering the pod")
    })
}

/// p50, p99 and the maximum.
fn percentiles(samples: &mut [f64]) -> (f64, f64, f64) {
    samples.sort_by(|a, b| a.total_cmp(b));
    if samples.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    (at(0.5), at(0.99), samples[samples.len() - 1])
}
