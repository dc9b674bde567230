//! HBONE on loopback: what carrying a TCP connection through the mesh costs, measured against
//! the same connection made directly.
//!
//! Three paths to the same servers, on 127.0.0.1 only:
//!
//! ```text
//!  plain:    app ──TCP──► sink / echo
//!  proxy:    app ──TCP──► client proxy ══ HBONE ══► HBONE server ──TCP──► sink / echo
//!                         (testing::client_proxy:   (hbone::Server, AllowAll,
//!                          hbone::Client, like       like ztunnel's inbound)
//!                          ztunnel's outbound)
//!  library:  app on hbone::Client ══ HBONE ══► HBONE server ──TCP──► sink / echo
//! ```
//!
//! HBONE here is mutual TLS 1.3 + HTTP/2 CONNECT, with `Config::default()` everywhere. On
//! the plain and proxy paths the app client and the sink/echo servers are the same code:
//! blocking `std::net` sockets on their own OS threads, so the application side does not share
//! the proxies' runtime. The library path is the HBONE client→server pair itself: the app is a
//! task that opens tunnels with `hbone::Client` and reads and writes them (`hbone::Tunnel`),
//! compared with the same async app over a tokio `TcpStream`. The proxies run in one tokio
//! multi-thread runtime (one worker per core unless `WEFT_BENCH_PROXY_THREADS` says otherwise)
//! and share one pooled HBONE connection, as ztunnel does for one source/destination pair. On
//! one machine the proxies compete with the app for the same cores, so the meshed figures
//! include the proxies' CPU cost.
//!
//! Measured, in one run, for the proxy path and for the library path:
//! 1. **Throughput**, 1 stream and `WEFT_BENCH_STREAMS` parallel streams: each app writes
//!    128 KiB chunks for `WEFT_BENCH_SECS` seconds, then half-closes; the sink counts what
//!    arrived and answers the count. Rate = bytes the sink received / time from the first
//!    write to the last answer, so data still buffered in the proxies at the deadline counts,
//!    and so does the time to drain it. Every byte written must arrive, or the run fails.
//!    Alongside: the CPU time the whole process spent per GB moved (`/proc/self/stat`), a
//!    measure of work per byte that the scheduler's placement of threads affects less.
//! 2. **Latency**: sequential 1-byte request / 1-byte echo round trips on one connection per
//!    path, `WEFT_BENCH_WARMUP` unmeasured, then `WEFT_BENCH_ROUND_TRIPS` measured per path,
//!    the two paths alternating in blocks so both see the same machine; p50 / p99 / mean, and
//!    the process's CPU time per round trip (the work, without the wake-up delays). Then the
//!    same with every party a task of one current-thread runtime: the path's own cost, without
//!    the scheduler's wake-ups.
//!
//! Each measurement is repeated `WEFT_BENCH_REPEATS` times, plain and meshed alternating; the
//! table shows the median of the repeats and their range. Every loop is bounded by a count
//! and a deadline, and every socket has timeouts, so a stuck path fails the run with a message
//! instead of hanging it. `benches/README.md` says how to run it and read the output.

use std::env;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hbone::testing::{AllowAll, Pki, RunningServer, client_proxy, request};
use hbone::{Client, Config, ConnectRequest};

/// Size of one application write in the throughput test (iperf3's default).
const APP_WRITE: usize = 128 * 1024;
/// Size of the sink's reads.
const SINK_READ: usize = 256 * 1024;
/// No socket operation of the benchmark may block longer than this; a path that stalls this
/// long is broken, and the run fails naming the operation.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound on one latency run, whatever `WEFT_BENCH_ROUND_TRIPS` says.
const LATENCY_DEADLINE: Duration = Duration::from_secs(60);
/// Round trips on one path before the latency test switches to the other.
const LATENCY_BLOCK: usize = 1_000;
/// Most connections a test server accepts over the whole run (bounds its accept loop).
const MAX_ACCEPTS: usize = 10_000;

/// The knobs, from the environment (see `benches/README.md`).
struct Settings {
    /// Seconds of writing per throughput run.
    secs: f64,
    /// Runs of every measurement; the median is reported.
    repeats: usize,
    /// Streams of the parallel throughput test.
    streams: usize,
    /// Measured round trips per path per latency run.
    round_trips: usize,
    /// Unmeasured round trips per path before them.
    warmup: usize,
    /// Worker threads of the proxies' runtime; tokio's default (one per core) if unset.
    proxy_threads: Option<usize>,
    /// Which tests to run (to profile one of them).
    only: Only,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Only {
    All,
    Throughput,
    Latency,
    /// Only the one-thread round trips on the library path, to profile the path's own cost.
    LibraryOneThread,
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            secs: env_or("WEFT_BENCH_SECS", 3.0_f64).max(0.1),
            repeats: env_or("WEFT_BENCH_REPEATS", 3_usize).max(1),
            streams: env_or("WEFT_BENCH_STREAMS", 8_usize).max(1),
            round_trips: env_or("WEFT_BENCH_ROUND_TRIPS", 20_000_usize).max(1),
            warmup: env_or("WEFT_BENCH_WARMUP", 1_000_usize),
            proxy_threads: env_opt::<usize>("WEFT_BENCH_PROXY_THREADS").map(|n| n.max(1)),
            only: match env::var("WEFT_BENCH_ONLY").as_deref() {
                Err(_) | Ok("") => Only::All,
                Ok("throughput") => Only::Throughput,
                Ok("latency") => Only::Latency,
                Ok("library-one-thread") => Only::LibraryOneThread,
                Ok(other) => {
                    panic!("WEFT_BENCH_ONLY={other:?}: expected `throughput`, `latency` or `library-one-thread`")
                }
            },
        }
    }
}

/// One path's addresses: where the app connects to reach the sink and the echo server.
struct Path {
    name: &'static str,
    sink: SocketAddr,
    echo: SocketAddr,
}

/// Every figure of one path, one entry per repeat.
#[derive(Default)]
struct Figures {
    single_gbits: Vec<f64>,
    single_cpu: Vec<f64>,
    parallel_gbits: Vec<f64>,
    parallel_cpu: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    mean: Vec<f64>,
    rtt_cpu: Vec<f64>,
    /// The same round trips with every party a task of one current-thread runtime.
    one_thread_p50: Vec<f64>,
    one_thread_cpu: Vec<f64>,
}

impl Latency {
    /// The figures of round-trip `samples` (µs, sorted here) that cost `cpu` seconds in all.
    fn of(samples: &mut [f64], cpu: f64, what: &str) -> Latency {
        assert!(!samples.is_empty(), "no {what} completed");
        samples.sort_by(f64::total_cmp);
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        let cpu_us = cpu * 1e6 / samples.len() as f64;
        Latency { p50: percentile(samples, 0.50), p99: percentile(samples, 0.99), mean, cpu_us }
    }
}

impl Rate {
    /// `received` bytes since `began`, with the process's CPU time since `cpu_before`.
    fn since(received: u64, began: Instant, cpu_before: f64) -> Rate {
        let elapsed = began.elapsed().as_secs_f64();
        let cpu = process_cpu_secs() - cpu_before;
        Rate { gbits: received as f64 * 8.0 / elapsed / 1e9, cpu_per_gb: cpu / (received as f64 / 1e9) }
    }
}

impl Figures {
    fn push_single(&mut self, r: Rate) {
        self.single_gbits.push(r.gbits);
        self.single_cpu.push(r.cpu_per_gb);
    }

    fn push_parallel(&mut self, r: Rate) {
        self.parallel_gbits.push(r.gbits);
        self.parallel_cpu.push(r.cpu_per_gb);
    }

    fn push_latency(&mut self, l: Latency) {
        self.p50.push(l.p50);
        self.p99.push(l.p99);
        self.mean.push(l.mean);
        self.rtt_cpu.push(l.cpu_us);
    }

    fn push_one_thread(&mut self, l: Latency) {
        self.one_thread_p50.push(l.p50);
        self.one_thread_cpu.push(l.cpu_us);
    }
}

/// Adds one run's (plain, meshed) results to their paths' figures.
fn record<T>(runs: [T; 2], figures: &mut [Figures; 2], push: fn(&mut Figures, T)) {
    for (run, f) in runs.into_iter().zip(figures) {
        push(f, run);
    }
}

/// What one throughput run achieved.
struct Rate {
    /// Bytes the sink received, in Gbit/s.
    gbits: f64,
    /// CPU time of the whole process (app, sink and, when meshed, both proxies) per GB moved,
    /// in core-seconds.
    cpu_per_gb: f64,
}

/// Round-trip figures of one latency run, in microseconds.
struct Latency {
    p50: f64,
    p99: f64,
    mean: f64,
    /// CPU time of the whole process per round trip: the work on the path, without the time
    /// threads spend waiting to be woken.
    cpu_us: f64,
}

fn main() {
    let settings = Settings::from_env();
    let stop = Arc::new(AtomicBool::new(false));
    let (sink, sink_thread) = serve("sink", stop.clone(), sink_connection);
    let (echo, echo_thread) = serve("echo", stop.clone(), echo_connection);
    let plain = Path { name: "plain TCP", sink, echo };

    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = settings.proxy_threads {
        runtime.worker_threads(threads);
    }
    let runtime = runtime.enable_all().build().expect("building the proxies' tokio runtime");
    let (meshed, client, mut server, library) = runtime.block_on(start_mesh(sink, echo));
    let paths = [&plain, &meshed];

    print_header(&settings);
    // One unmeasured round trip per path: the first meshed connection pays the TLS handshake.
    for path in paths {
        round_trip(path, &mut connect(path.echo));
    }

    let mut figures = [Figures::default(), Figures::default()];
    let mut lib_figures = [Figures::default(), Figures::default()];
    for repeat in 1..=settings.repeats {
        eprintln!("repeat {repeat}/{}", settings.repeats);
        let (secs, streams) = (settings.secs, settings.streams);
        let (warmup, round_trips) = (settings.warmup, settings.round_trips);
        if settings.only == Only::LibraryOneThread {
            record(latency_one_thread(warmup, round_trips, true), &mut lib_figures, Figures::push_one_thread);
            continue;
        }
        if settings.only == Only::All || settings.only == Only::Throughput {
            record(paths.map(|p| throughput(p, 1, secs)), &mut figures, Figures::push_single);
            record(paths.map(|p| throughput(p, streams, secs)), &mut figures, Figures::push_parallel);
            let lib =
                |streams| [false, true].map(|meshed| library_throughput(&runtime, &library, meshed, streams, secs));
            record(lib(1), &mut lib_figures, Figures::push_single);
            record(lib(streams), &mut lib_figures, Figures::push_parallel);
        }
        if settings.only == Only::All || settings.only == Only::Latency {
            record(latency(paths, warmup, round_trips), &mut figures, Figures::push_latency);
            record(latency_one_thread(warmup, round_trips, false), &mut figures, Figures::push_one_thread);
            record(library_latency(&runtime, &library, warmup, round_trips), &mut lib_figures, Figures::push_latency);
            record(latency_one_thread(warmup, round_trips, true), &mut lib_figures, Figures::push_one_thread);
        }
    }

    println!("\nThe proxy path: app ─TCP─► client proxy ═HBONE═► server ─TCP─► sink/echo (ztunnel's shape)");
    print_results(&settings, &figures, "plain TCP");
    println!("\nThe library path: async app on hbone::Client ═HBONE═► hbone::Server ─TCP─► sink/echo");
    print_results(&settings, &lib_figures, "plain (async app)");
    // The async plain app is a weaker baseline than the blocking one (its round trips cross
    // threads); the ratios against the blocking plain app are the conservative ones.
    let (plain, lib) = (&figures[0], &lib_figures[1]);
    let mut against_blocking = Vec::new();
    if !plain.single_gbits.is_empty() && !lib.single_gbits.is_empty() {
        let pct = 100.0 * median(&lib.single_gbits) / median(&plain.single_gbits);
        against_blocking.push(format!("1 stream {pct:.0}% of plain"));
    }
    if !plain.p50.is_empty() && !lib.p50.is_empty() {
        against_blocking.push(format!("round trip p50 {:+.1} µs", median(&lib.p50) - median(&plain.p50)));
    }
    if !against_blocking.is_empty() {
        println!("library against the blocking plain app: {}", against_blocking.join(", "));
    }
    let stats = client.stats();
    println!(
        "(the meshed path used {} HBONE connection(s) for {} tunnels)",
        stats.connections_opened.load(Ordering::Relaxed),
        stats.streams_opened.load(Ordering::Relaxed)
    );

    // Stop everything: the HBONE server drains (every tunnel has ended), and each test
    // server's accept loop sees the flag on the connection that wakes it.
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
async fn start_mesh(sink: SocketAddr, echo: SocketAddr) -> (Path, Client, RunningServer<AllowAll>, Library) {
    let pki = Pki::new();
    let server_cert = pki.workload("bench", "server");
    let client_cert = pki.workload("bench", "client");
    let config = Config::default();
    let server = RunningServer::start(config.clone(), server_cert.clone(), &pki.trust, AllowAll).await;
    let server_id = server_cert.identity().clone();
    let client = Client::new(config.clone(), pki.trust.clone());
    let to = |target| request(&client_cert, server.addr, &server_id, target);
    let (to_sink, _) = client_proxy(client.clone(), to(sink), config.copy_buffer).await;
    let (to_echo, _) = client_proxy(client.clone(), to(echo), config.copy_buffer).await;
    let library =
        Library { client: client.clone(), sink: to(sink), echo: to(echo), plain_sink: sink, plain_echo: echo };
    (Path { name: "HBONE", sink: to_sink, echo: to_echo }, client, server, library)
}

/// What `streams` app threads writing to `path`'s sink for `secs` seconds achieve.
fn throughput(path: &Path, streams: usize, secs: f64) -> Rate {
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
    let cpu_before = process_cpu_secs();
    let mut received = 0u64;
    for writer in writers {
        let (sent, got) = writer.join().expect("throughput writer panicked");
        assert_eq!(sent, got, "{}: the sink received {got} bytes of the {sent} written", path.name);
        received += got;
    }
    let rate = Rate::since(received, began, cpu_before);
    eprintln!(
        "  {:<9} {streams} stream(s): {:6.2} Gbit/s, {:.2} core-s/GB ({received} bytes)",
        path.name, rate.gbits, rate.cpu_per_gb
    );
    rate
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

/// Sequential 1-byte round trips on one connection per path, from one thread: `warmup`
/// unmeasured on each, then up to `count` measured on each, the paths alternating in blocks
/// of [`LATENCY_BLOCK`] (fewer if [`LATENCY_DEADLINE`] passes first).
fn latency(paths: [&Path; 2], warmup: usize, count: usize) -> [Latency; 2] {
    let mut conns = paths.map(|p| connect(p.echo));
    let mut samples = [Vec::with_capacity(count), Vec::with_capacity(count)];
    for (path, tcp) in paths.iter().zip(&mut conns) {
        for _ in 0..warmup {
            round_trip(path, tcp);
        }
    }
    let mut cpu = [0.0; 2];
    let deadline = Instant::now() + LATENCY_DEADLINE;
    'blocks: while samples[1].len() < count {
        for (i, (path, tcp)) in paths.iter().zip(&mut conns).enumerate() {
            if Instant::now() >= deadline {
                eprintln!("  latency run cut short by its deadline after {} round trips", samples[1].len());
                break 'blocks;
            }
            let cpu_before = process_cpu_secs();
            for _ in 0..LATENCY_BLOCK.min(count - samples[i].len()) {
                samples[i].push(round_trip(path, tcp));
            }
            cpu[i] += process_cpu_secs() - cpu_before;
        }
    }
    let runs = [0, 1].map(|i| Latency::of(&mut samples[i], cpu[i], "round trip"));
    for (path, l) in paths.iter().zip(&runs) {
        eprintln!(
            "  {:<9} latency: p50 {:.1} µs, p99 {:.1} µs, mean {:.1} µs, CPU {:.1} µs per round trip",
            path.name, l.p50, l.p99, l.mean, l.cpu_us
        );
    }
    runs
}

/// The latency test with the app client, the echo server and the proxies as tasks of one
/// current-thread runtime, on a fresh HBONE connection: no party ever waits to be woken on
/// another CPU, so this is what the path itself costs: syscalls, the kernel's loopback TCP,
/// TLS and HTTP/2, without the scheduler's wake-ups (which this VM makes expensive, see
/// docs/BENCHMARKS.md). `library`: the app opens the tunnel with `hbone::Client` itself
/// instead of going through the client proxy.
fn latency_one_thread(warmup: usize, count: usize, library: bool) -> [Latency; 2] {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("building a one-thread runtime");
    runtime.block_on(async {
        let echo = hbone::testing::echo_server().await;
        let (meshed, _client, _server, lib) = start_mesh(echo, echo).await;
        let conns: [Box<dyn AppIo>; 2] = [
            lib.open(false, true).await,
            if library { lib.open(true, true).await } else { Box::new(async_connect(meshed.echo).await) },
        ];
        round_trips(conns, warmup, count, if library { "one-thread library" } else { "one-thread" }).await
    })
}

/// Sequential 1-byte round trips on `conns` (plain, meshed), alternating in blocks of
/// [`LATENCY_BLOCK`]: `warmup` unmeasured, then up to `count` measured on each.
async fn round_trips(mut conns: [Box<dyn AppIo>; 2], warmup: usize, count: usize, label: &str) -> [Latency; 2] {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut samples = [Vec::with_capacity(count), Vec::with_capacity(count)];
    let mut cpu = [0.0; 2];
    let deadline = Instant::now() + LATENCY_DEADLINE;
    for round in 0..(warmup / LATENCY_BLOCK + 1 + count.div_ceil(LATENCY_BLOCK)) {
        for (i, tcp) in conns.iter_mut().enumerate() {
            let cpu_before = process_cpu_secs();
            for _ in 0..LATENCY_BLOCK {
                let sent = Instant::now();
                let fut = async {
                    tcp.write_all(&[0xa5]).await?;
                    let mut back = [0u8; 1];
                    tcp.read_exact(&mut back).await.map(|_| back)
                };
                let back = tokio::time::timeout(IO_TIMEOUT, fut)
                    .await
                    .expect("async round trip timed out")
                    .expect("async round trip");
                assert_eq!(back, [0xa5]);
                if round * LATENCY_BLOCK >= warmup && samples[i].len() < count {
                    samples[i].push(sent.elapsed().as_nanos() as f64 / 1e3);
                }
            }
            if round * LATENCY_BLOCK >= warmup {
                cpu[i] += process_cpu_secs() - cpu_before;
            }
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    let names = ["plain TCP", "HBONE"];
    [0, 1].map(|i| {
        let l = Latency::of(&mut samples[i], cpu[i], label);
        eprintln!("  {:<9} {label} latency: p50 {:.1} µs, CPU {:.1} µs per round trip", names[i], l.p50, l.cpu_us);
        l
    })
}

/// The library path: the app opens tunnels with `hbone::Client` and reads and writes them as
/// `hbone::Tunnel`s (AsyncRead + AsyncWrite): client → server, with no client proxy and no
/// local TCP hop before the tunnel. Its plain counterpart is the same async app over a tokio
/// `TcpStream`. Both apps are tasks of the proxies' runtime; the servers are the same as for
/// the proxy path.
#[derive(Clone)]
struct Library {
    client: Client,
    sink: ConnectRequest,
    echo: ConnectRequest,
    plain_sink: SocketAddr,
    plain_echo: SocketAddr,
}

/// A connection of an async app: a tokio `TcpStream` or an `hbone::Tunnel`.
trait AppIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AppIo for T {}

impl Library {
    /// A connection to the echo server (`echo`) or the sink, through HBONE (`meshed`) or not.
    async fn open(&self, meshed: bool, echo: bool) -> Box<dyn AppIo> {
        if !meshed {
            return Box::new(async_connect(if echo { self.plain_echo } else { self.plain_sink }).await);
        }
        let req = if echo { self.echo.clone() } else { self.sink.clone() };
        Box::new(self.client.connect(req).await.expect("opening an HBONE tunnel"))
    }
}

async fn async_connect(addr: SocketAddr) -> tokio::net::TcpStream {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connecting to the test path");
    tcp.set_nodelay(true).expect("setting TCP_NODELAY");
    tcp
}

/// The throughput test with async app tasks on the library path (`meshed`) or plain TCP.
fn library_throughput(
    runtime: &tokio::runtime::Runtime,
    lib: &Library,
    meshed: bool,
    streams: usize,
    secs: f64,
) -> Rate {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let name = if meshed { "HBONE lib" } else { "plain TCP" };
    runtime.block_on(async {
        let mut conns = Vec::with_capacity(streams);
        for _ in 0..streams {
            conns.push(lib.open(meshed, false).await);
        }
        let began = Instant::now();
        let cpu_before = process_cpu_secs();
        let deadline = began + Duration::from_secs_f64(secs);
        let writers: Vec<_> = conns
            .into_iter()
            .map(|mut conn| {
                tokio::spawn(async move {
                    let chunk = vec![0x5a_u8; APP_WRITE];
                    let mut sent = 0u64;
                    while Instant::now() < deadline {
                        let write = tokio::time::timeout(IO_TIMEOUT, conn.write_all(&chunk)).await;
                        write.expect("writing to the sink stalled").expect("writing to the sink");
                        sent += chunk.len() as u64;
                    }
                    conn.shutdown().await.expect("half-closing towards the sink");
                    let mut count = [0u8; 8];
                    let read = tokio::time::timeout(IO_TIMEOUT, conn.read_exact(&mut count)).await;
                    read.expect("the sink's count did not come").expect("reading the sink's count");
                    (sent, u64::from_be_bytes(count))
                })
            })
            .collect();
        let mut received = 0u64;
        for writer in writers {
            let (sent, got) = writer.await.expect("throughput writer task panicked");
            assert_eq!(sent, got, "{name}: the sink received {got} bytes of the {sent} written");
            received += got;
        }
        let rate = Rate::since(received, began, cpu_before);
        eprintln!(
            "  {name:<9} async app, {streams} stream(s): {:6.2} Gbit/s, {:.2} core-s/GB",
            rate.gbits, rate.cpu_per_gb
        );
        rate
    })
}

/// The latency test with an async app task on the library path and on plain TCP.
fn library_latency(runtime: &tokio::runtime::Runtime, lib: &Library, warmup: usize, count: usize) -> [Latency; 2] {
    let lib = lib.clone();
    // A task, not `block_on`'s own future: the app runs on the runtime's workers like the
    // proxies, as an app task would.
    let task = runtime.spawn(async move {
        let conns = [lib.open(false, true).await, lib.open(true, true).await];
        round_trips(conns, warmup, count, "library").await
    });
    runtime.block_on(task).expect("latency task panicked")
}

/// One 1-byte request and its echo; returns the round-trip time in microseconds.
fn round_trip(path: &Path, tcp: &mut TcpStream) -> f64 {
    let byte = [0xa5];
    let mut back = [0u8; 1];
    let sent = Instant::now();
    tcp.write_all(&byte).expect("writing a round-trip byte");
    tcp.read_exact(&mut back).expect("reading the echoed byte");
    let rtt = sent.elapsed();
    assert_eq!(back, byte, "{}: the echo server answered a different byte", path.name);
    rtt.as_nanos() as f64 / 1e3
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

/// CPU time (user + system) this process has used, all threads included, dead ones too, from
/// `/proc/self/stat`. Its unit is the kernel's USER_HZ, 100 on every Linux architecture Weft
/// runs on; the 10 ms granularity is small against a run of seconds.
fn process_cpu_secs() -> f64 {
    const USER_HZ: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/self/stat").expect("reading /proc/self/stat (Linux only)");
    // The fields after the command name (which may contain spaces) start at field 3, `state`;
    // utime and stime are fields 14 and 15.
    let after_comm = stat.rsplit_once(')').map(|(_, rest)| rest).expect("/proc/self/stat has a command name");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).expect("/proc/self/stat utime, stime");
    (ticks(11) + ticks(12)) / USER_HZ
}

fn print_header(s: &Settings) {
    let cores = thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let workers = s.proxy_threads.map_or_else(|| format!("{cores} (one per core)"), |n| n.to_string());
    println!(
        "HBONE on loopback: {cores} cores, proxy worker threads {workers}; throughput runs of {} s, \
         {} parallel streams; latency runs of {} round trips (+{} warm-up); {} repeat(s), median [min-max]",
        s.secs, s.streams, s.round_trips, s.warmup, s.repeats
    );
}

fn print_results(s: &Settings, figures: &[Figures; 2], plain_name: &str) {
    let [plain, meshed] = figures;
    println!();
    println!("{:<36} {:>22} {:>22} {:>12}", "", plain_name, "HBONE", "HBONE/plain");
    // A test that did not run (WEFT_BENCH_ONLY) has no figures and no row.
    let row = |label: &str, p: &[f64], m: &[f64]| {
        if !p.is_empty() {
            println!("{label:<36} {:>22} {:>22} {:>11.2}x", spread(p), spread(m), median(m) / median(p));
        }
    };
    row("throughput, 1 stream (Gbit/s)", &plain.single_gbits, &meshed.single_gbits);
    row(&format!("throughput, {} streams (Gbit/s)", s.streams), &plain.parallel_gbits, &meshed.parallel_gbits);
    row("CPU per GB, 1 stream (core-s)", &plain.single_cpu, &meshed.single_cpu);
    row(&format!("CPU per GB, {} streams (core-s)", s.streams), &plain.parallel_cpu, &meshed.parallel_cpu);
    row("1-byte round trip p50 (µs)", &plain.p50, &meshed.p50);
    row("1-byte round trip p99 (µs)", &plain.p99, &meshed.p99);
    row("1-byte round trip mean (µs)", &plain.mean, &meshed.mean);
    row("CPU per round trip (µs)", &plain.rtt_cpu, &meshed.rtt_cpu);
    row("1-byte RTT p50, one thread (µs)", &plain.one_thread_p50, &meshed.one_thread_p50);
    row("CPU per round trip, one thread (µs)", &plain.one_thread_cpu, &meshed.one_thread_cpu);
    println!();
    let mut ratios = Vec::new();
    if !plain.single_gbits.is_empty() {
        let pct = |m: &[f64], p: &[f64]| 100.0 * median(m) / median(p);
        ratios.push(format!("1 stream {:.0}% of plain", pct(&meshed.single_gbits, &plain.single_gbits)));
        ratios.push(format!(
            "{} streams {:.0}% of plain",
            s.streams,
            pct(&meshed.parallel_gbits, &plain.parallel_gbits)
        ));
    }
    if !plain.p50.is_empty() {
        let (p, m) = (median(&plain.p50), median(&meshed.p50));
        ratios.push(format!("round trip p50 {:+.1} µs ({:.2}x)", m - p, m / p));
    }
    if !plain.one_thread_p50.is_empty() {
        let (p, m) = (median(&plain.one_thread_p50), median(&meshed.one_thread_p50));
        ratios.push(format!("one-thread round trip p50 {:+.1} µs ({:.2}x)", m - p, m / p));
    }
    println!("ratios: {}", ratios.join(", "));
}

/// `median [min-max]` of `values`, to two decimals.
fn spread(values: &[f64]) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.2} [{min:.2}-{max:.2}]", median(values))
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
    let n = v.len();
    // The same element twice for an odd count.
    (v[(n - 1) / 2] + v[n / 2]) / 2.0
}

/// A setting from the environment, or `default` if unset; an unparsable value fails the run
/// naming it.
fn env_or<T: FromStr>(name: &str, default: T) -> T {
    env_opt(name).unwrap_or(default)
}

fn env_opt<T: FromStr>(name: &str) -> Option<T> {
    let value = env::var(name).ok().filter(|v| !v.is_empty())?;
    Some(value.parse().unwrap_or_else(|_| panic!("{name}={value:?} is not a valid value")))
}
