//! HBONE on loopback: what carrying a TCP connection through the mesh costs, measured against
//! the same connection made directly.
//!
//! Two paths to the same servers, on 127.0.0.1 only:
//!
//! ```text
//!  plain:   app ──TCP──► sink / echo
//!  meshed:  app ──TCP──► client proxy ══ HBONE (mTLS 1.3 + HTTP/2 CONNECT) ══► HBONE server ──TCP──► sink / echo
//!                        (hbone::testing::client_proxy,                        (hbone::Server,
//!                         hbone::Client, as ztunnel's outbound)                 AllowAll, as ztunnel's inbound)
//! ```
//!
//! The app client and the sink/echo servers are the same code on both paths: blocking
//! `std::net` sockets on their own OS threads, so the application side does not share the
//! proxies' tokio runtime. The two proxies run in one tokio multi-thread runtime (one worker
//! per core) with `Config::default()`, and share one pooled HBONE connection, as ztunnel does
//! for one source/destination pair.
//!
//! Measured, in one run:
//! 1. **Throughput**, 1 stream and `WEFT_BENCH_STREAMS` parallel streams: each app thread
//!    writes 128 KiB chunks for `WEFT_BENCH_SECS` seconds, then half-closes; the sink counts
//!    what arrived and answers the count. Rate = bytes the sink received / time from the first
//!    write to the last answer (so data still buffered in the proxies at the deadline is
//!    counted and so is the time to drain it). Every byte written must arrive, or the run fails.
//! 2. **Latency**: one connection, sequential 1-byte request / 1-byte echo round trips
//!    (`WEFT_BENCH_WARMUP` unmeasured, then `WEFT_BENCH_ROUND_TRIPS` measured), p50 / p99 / mean.
//!
//! Each measurement is repeated `WEFT_BENCH_REPEATS` times, plain and meshed alternating, and
//! the median of the repeats is reported (the machine is small and noisy). Every loop is
//! bounded by a count and a deadline; sockets carry timeouts so a stuck path fails the run
//! with a message instead of hanging it. See `benches/README.md` for how to read the output.

use std::env;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hbone::testing::{AllowAll, Pki, RunningServer, client_proxy, request};
use hbone::{Client, Config};

/// Size of one application write on the throughput test (iperf3's default is 128 KiB).
const APP_WRITE: usize = 128 * 1024;
/// Size of the sink's reads.
const SINK_READ: usize = 256 * 1024;
/// No socket operation of the benchmark may block longer than this; a path that stalls this
/// long is broken, and the run fails naming the operation.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound on any one latency run, whatever `WEFT_BENCH_ROUND_TRIPS` says.
const LATENCY_DEADLINE: Duration = Duration::from_secs(60);
/// Most connections one test server accepts over the whole run (bounds its accept loop).
const MAX_ACCEPTS: usize = 10_000;

/// The knobs, from the environment.
struct Settings {
    /// Seconds of writing per throughput measurement.
    secs: f64,
    /// Repeats of every measurement; the median is reported.
    repeats: usize,
    /// Streams of the parallel throughput test.
    streams: usize,
    /// Measured round trips per latency run.
    round_trips: usize,
    /// Unmeasured round trips before them.
    warmup: usize,
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            secs: env_or("WEFT_BENCH_SECS", 3.0),
            repeats: env_or("WEFT_BENCH_REPEATS", 3usize).max(1),
            streams: env_or("WEFT_BENCH_STREAMS", 8usize).max(1),
            round_trips: env_or("WEFT_BENCH_ROUND_TRIPS", 20_000usize).max(1),
            warmup: env_or("WEFT_BENCH_WARMUP", 1_000usize),
        }
    }
}

/// One path's addresses: where the app connects to reach the sink and the echo server.
#[derive(Clone, Copy)]
struct Path {
    name: &'static str,
    sink: SocketAddr,
    echo: SocketAddr,
}

/// Latency figures of one run, in microseconds.
#[derive(Clone, Copy)]
struct Latency {
    p50: f64,
    p99: f64,
    mean: f64,
}

fn main() {
    let settings = Settings::from_env();
    let stop = Arc::new(AtomicBool::new(false));
    let (sink, sink_thread) = serve("sink", stop.clone(), sink_connection);
    let (echo, echo_thread) = serve("echo", stop.clone(), echo_connection);
    let plain = Path { name: "plain TCP", sink, echo };

    // The two proxies: one runtime, one worker thread per core (tokio's default).
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("building the tokio runtime");
    let (meshed, client, mut server) = runtime.block_on(start_mesh(sink, echo));

    print_header(&settings);
    // One unmeasured round trip per path: the first meshed connection pays the TLS handshake.
    for path in [&plain, &meshed] {
        latency(path, 0, 1);
    }

    let mut single = [Vec::new(), Vec::new()];
    let mut parallel = [Vec::new(), Vec::new()];
    let mut lat = [Vec::new(), Vec::new()];
    for repeat in 1..=settings.repeats {
        eprintln!("repeat {repeat}/{}", settings.repeats);
        for (i, path) in [&plain, &meshed].into_iter().enumerate() {
            single[i].push(throughput(path, 1, settings.secs));
        }
        for (i, path) in [&plain, &meshed].into_iter().enumerate() {
            parallel[i].push(throughput(path, settings.streams, settings.secs));
        }
        for (i, path) in [&plain, &meshed].into_iter().enumerate() {
            lat[i].push(latency(path, settings.warmup, settings.round_trips));
        }
    }

    let stats = client.stats();
    let connections = stats.connections_opened.load(Ordering::Relaxed);
    let streams = stats.streams_opened.load(Ordering::Relaxed);
    let single = single.map(|v| median(&v));
    let parallel = parallel.map(|v| median(&v));
    let lat = lat.map(|runs| Latency {
        p50: median(&runs.iter().map(|l| l.p50).collect::<Vec<_>>()),
        p99: median(&runs.iter().map(|l| l.p99).collect::<Vec<_>>()),
        mean: median(&runs.iter().map(|l| l.mean).collect::<Vec<_>>()),
    });
    print_results(&settings, single, parallel, lat);
    println!("(meshed path used {connections} HBONE connection(s) for {streams} tunnels)");

    // Stop everything: the HBONE server drains (its tunnels have all ended), and each test
    // server's accept loop checks the flag after its next accept.
    runtime.block_on(server.drain(Duration::from_secs(1)));
    stop.store(true, Ordering::Release);
    for (addr, thread) in [(sink, sink_thread), (echo, echo_thread)] {
        let _ = TcpStream::connect(addr);
        thread.join().expect("test server thread panicked");
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
}

/// Starts the HBONE server and one client proxy per target; returns the meshed path, the
/// proxies' HBONE client and the server.
async fn start_mesh(sink: SocketAddr, echo: SocketAddr) -> (Path, Client, RunningServer<AllowAll>) {
    let pki = Pki::new();
    let server_cert = pki.workload("bench", "server");
    let client_cert = pki.workload("bench", "client");
    let config = Config::default();
    let server = RunningServer::start(config.clone(), server_cert.clone(), &pki.trust, AllowAll).await;
    let server_id = server_cert.identity().clone();
    let client = Client::new(config.clone(), pki.trust.clone());
    let (to_sink, _) =
        client_proxy(client.clone(), request(&client_cert, server.addr, &server_id, sink), config.copy_buffer).await;
    let (to_echo, _) =
        client_proxy(client.clone(), request(&client_cert, server.addr, &server_id, echo), config.copy_buffer).await;
    (Path { name: "HBONE", sink: to_sink, echo: to_echo }, client, server)
}

/// Gbit/s moved by `streams` app threads writing to `path`'s sink for `secs` seconds.
fn throughput(path: &Path, streams: usize, secs: f64) -> f64 {
    let start = Arc::new(Barrier::new(streams + 1));
    let writers: Vec<_> = (0..streams)
        .map(|_| {
            let start = start.clone();
            let addr = path.sink;
            thread::spawn(move || write_for(addr, &start, Duration::from_secs_f64(secs)))
        })
        .collect();
    start.wait();
    let began = Instant::now();
    let mut received = 0u64;
    for writer in writers {
        let (sent, got) = writer.join().expect("throughput writer panicked");
        assert_eq!(sent, got, "{}: the sink received {got} bytes of the {sent} written", path.name);
        received += got;
    }
    let elapsed = began.elapsed().as_secs_f64();
    let gbits = received as f64 * 8.0 / elapsed / 1e9;
    eprintln!("  {:<9} {streams} stream(s): {gbits:6.2} Gbit/s ({received} bytes in {elapsed:.2} s)", path.name);
    gbits
}

/// One app connection of the throughput test: connects, waits for the start, writes until
/// `duration` has passed, half-closes, and returns (bytes written, bytes the sink counted).
fn write_for(addr: SocketAddr, start: &Barrier, duration: Duration) -> (u64, u64) {
    let mut tcp = connect(addr);
    let chunk = vec![0x5a_u8; APP_WRITE];
    start.wait();
    let deadline = Instant::now() + duration;
    let mut sent = 0u64;
    while Instant::now() < deadline {
        tcp.write_all(&chunk).expect("writing to the sink (stalled or reset?)");
        sent += chunk.len() as u64;
    }
    tcp.shutdown(Shutdown::Write).expect("half-closing towards the sink");
    let mut count = [0u8; 8];
    tcp.read_exact(&mut count).expect("reading the sink's byte count (did the half-close reach it?)");
    (sent, u64::from_be_bytes(count))
}

/// Sequential 1-byte round trips to `path`'s echo server: `warmup` unmeasured, then up to
/// `count` measured (fewer if [`LATENCY_DEADLINE`] passes first).
fn latency(path: &Path, warmup: usize, count: usize) -> Latency {
    let mut tcp = connect(path.echo);
    let mut samples = Vec::with_capacity(count);
    let deadline = Instant::now() + LATENCY_DEADLINE;
    for i in 0..warmup + count {
        if Instant::now() >= deadline {
            eprintln!("  {}: latency run cut short by its deadline after {} round trips", path.name, samples.len());
            break;
        }
        let byte = [(i % 251) as u8];
        let mut back = [0u8; 1];
        let sent = Instant::now();
        tcp.write_all(&byte).expect("writing a round-trip byte");
        tcp.read_exact(&mut back).expect("reading the echoed byte");
        let rtt = sent.elapsed();
        assert_eq!(back, byte, "{}: the echo server answered a different byte", path.name);
        if i >= warmup {
            samples.push(rtt.as_nanos() as f64 / 1e3);
        }
    }
    assert!(!samples.is_empty(), "{}: no round trip completed", path.name);
    samples.sort_by(f64::total_cmp);
    let l = Latency {
        p50: percentile(&samples, 0.50),
        p99: percentile(&samples, 0.99),
        mean: samples.iter().sum::<f64>() / samples.len() as f64,
    };
    if count > 1 {
        eprintln!("  {:<9} latency: p50 {:.1} µs, p99 {:.1} µs, mean {:.1} µs", path.name, l.p50, l.p99, l.mean);
    }
    l
}

fn connect(addr: SocketAddr) -> TcpStream {
    let tcp = TcpStream::connect(addr).expect("connecting to the test path");
    configure(&tcp).expect("setting socket options");
    tcp
}

/// Options every benchmark socket gets, on both ends and both paths.
fn configure(tcp: &TcpStream) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))?;
    tcp.set_write_timeout(Some(IO_TIMEOUT))
}

/// Runs a test server on loopback: an accept loop on its own thread, one thread per
/// connection running `handle`. The loop ends when `stop` is set (checked after each accept)
/// or after [`MAX_ACCEPTS`] connections.
fn serve(name: &'static str, stop: Arc<AtomicBool>, handle: fn(TcpStream)) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a test server on loopback");
    let addr = listener.local_addr().expect("test server address");
    let thread = thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            for accepted in listener.incoming().take(MAX_ACCEPTS) {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let Ok(tcp) = accepted else { continue };
                if configure(&tcp).is_ok() {
                    thread::spawn(move || handle(tcp));
                }
            }
        })
        .expect("spawning a test server thread");
    (addr, thread)
}

/// Reads until EOF, then answers the byte count (8 bytes, big-endian) and closes.
fn sink_connection(mut tcp: TcpStream) {
    let mut buf = vec![0u8; SINK_READ];
    let mut total = 0u64;
    loop {
        match tcp.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(_) => return,
        }
    }
    let _ = tcp.write_all(&total.to_be_bytes());
}

/// Writes back whatever it reads, until EOF.
fn echo_connection(mut tcp: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tcp.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tcp.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn print_header(s: &Settings) {
    let cores = thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!(
        "HBONE loopback benchmark: {cores} cores, {} s per throughput run, {} stream(s) in parallel, \
         {} round trips (+{} warm-up) per latency run, median of {} repeat(s)",
        s.secs, s.streams, s.round_trips, s.warmup, s.repeats
    );
}

fn print_results(s: &Settings, single: [f64; 2], parallel: [f64; 2], lat: [Latency; 2]) {
    let [plain, meshed] = lat;
    let parallel_label = format!("throughput, {} streams (Gbit/s)", s.streams);
    println!();
    println!("{:<36} {:>12} {:>12} {:>14}", "", "plain TCP", "HBONE", "HBONE/plain");
    let row = |label: &str, p: f64, m: f64| println!("{label:<36} {p:>12.2} {m:>12.2} {:>13.2}x", m / p);
    row("throughput, 1 stream (Gbit/s)", single[0], single[1]);
    row(&parallel_label, parallel[0], parallel[1]);
    row("1-byte round trip p50 (µs)", plain.p50, meshed.p50);
    row("1-byte round trip p99 (µs)", plain.p99, meshed.p99);
    row("1-byte round trip mean (µs)", plain.mean, meshed.mean);
    println!();
    println!(
        "ratios: 1 stream {:.0}% of plain, {} streams {:.0}% of plain, round trip p50 +{:.1} µs ({:.2}x)",
        100.0 * single[1] / single[0],
        s.streams,
        100.0 * parallel[1] / parallel[0],
        meshed.p50 - plain.p50,
        meshed.p50 / plain.p50,
    );
}

/// The value at quantile `q` of sorted, non-empty `samples` (nearest rank).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The median of non-empty `values` (the mean of the middle two for an even count).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 0 { (v[mid - 1] + v[mid]) / 2.0 } else { v[mid] }
}

/// Reads a setting from the environment; an unparsable value fails the run naming it.
fn env_or<T: FromStr>(name: &str, default: T) -> T {
    match env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}
