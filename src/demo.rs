//! `weft demo`: HBONE end to end on loopback, told as a story.
//!
//! Two "nodes" live in this process: node 1 runs an outbound proxy that accepts plain TCP from
//! an app and carries it through HBONE as `ns-frontend/sa/web`; node 2 runs an HBONE server as
//! `ns-backend/sa/api` in front of an echo app, with a policy that admits only the frontend
//! namespace. Everything binds to 127.0.0.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hbone::server::Rejection;
use hbone::testing::{Pki, PolicyHandler, RunningServer, client_proxy, echo_server, id, request};
use hbone::{Client, Config, InboundRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(clap::Args)]
pub struct Args {
    /// Megabytes to send through one tunnel in the bulk transfer step.
    #[arg(long, default_value_t = 64)]
    bulk_mib: usize,
    /// Concurrent connections in the pooling step.
    #[arg(long, default_value_t = 300)]
    connections: usize,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.bulk_mib == 0 || args.bulk_mib > 4096 {
        bail!("--bulk-mib must be between 1 and 4096, got {}", args.bulk_mib);
    }
    if args.connections == 0 || args.connections > 2000 {
        bail!("--connections must be between 1 and 2000, got {}", args.connections);
    }
    println!("Weft demo: HBONE (HTTP/2 CONNECT inside mutual TLS 1.3) on 127.0.0.1\n");

    let pki = Pki::new();
    let web = pki.workload("ns-frontend", "web");
    let api = pki.workload("ns-backend", "api");
    println!("1. A CA minted a root and two workload certificates (ECDSA P-256, 1 h):");
    for w in [&web, &api] {
        let left = w.current().not_after().duration_since(std::time::SystemTime::now()).unwrap_or_default();
        println!("     {}  (expires in {} min)", w.identity(), left.as_secs() / 60);
    }

    let log = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log2 = log.clone();
    let policy = PolicyHandler(move |r: &InboundRequest| {
        let verdict = if r.peer_identity.namespace() == "ns-frontend" {
            Ok(())
        } else {
            Err(Rejection::Denied(format!("namespace {} may not reach {}", r.peer_identity.namespace(), r.target)))
        };
        log2.lock().map_err(|_| Rejection::Denied("log poisoned".into()))?.push(format!(
            "     node 2 saw {} -> {} : {}",
            r.peer_identity,
            r.target,
            if verdict.is_ok() { "ALLOW" } else { "DENY (403)" }
        ));
        verdict
    });
    let app = echo_server().await;
    let node2 = RunningServer::start(Config::default(), api.clone(), &pki.trust, policy).await;
    let client = Client::new(Config::default(), pki.trust.clone());
    let template = request(&web, node2.addr, api.identity(), app);
    let (node1, _proxy) = client_proxy(client.clone(), template.clone(), Config::default().copy_buffer).await;
    println!("\n2. Node 2 serves HBONE on {} in front of an echo app on {app};", node2.addr);
    println!("   node 1 accepts plain TCP on {node1} and tunnels it as {}.", web.identity());

    // One connection through the proxy path.
    println!("\n3. The app on node 1 connects in plain TCP; the bytes cross as TLS:");
    let started = Instant::now();
    let reply = echo_once(node1, b"hello from the frontend").await?;
    println!(
        "     sent \"hello from the frontend\", got back \"{}\" in {:?}",
        String::from_utf8_lossy(&reply),
        started.elapsed()
    );
    println!("     path: app -> node 1 {node1} -> mTLS {} -> node 2 {} -> app {app}", web.identity(), node2.addr);
    print_log(&log);

    // Policy refusal.
    println!("\n4. A workload from another namespace is refused by policy:");
    let stranger = pki.workload("ns-other", "intruder");
    match client.connect(request(&stranger, node2.addr, api.identity(), app)).await {
        Ok(_) => bail!("the policy should have refused {}", stranger.identity()),
        Err(e) => println!("     {} -> refused: {e}", stranger.identity()),
    }
    print_log(&log);

    // Identity check by the client.
    println!("\n5. The client checks who answers: expecting another identity fails the handshake:");
    let mut wrong = template.clone();
    wrong.expected = Arc::from(vec![id("ns-backend", "payments")]);
    match client.connect(wrong).await {
        Ok(_) => bail!("the handshake should have failed"),
        Err(e) => println!("     {e}"),
    }

    // Pooling.
    println!("\n6. {} concurrent connections share a few TLS sessions:", args.connections);
    let before = node2.server.stats().connections_accepted.load(Ordering::Relaxed);
    let mut tasks = Vec::new();
    for i in 0..args.connections {
        tasks.push(tokio::spawn(async move { echo_once(node1, format!("conn {i}").as_bytes()).await }));
    }
    for t in tasks {
        t.await.context("connection task")??;
    }
    let after = node2.server.stats().connections_accepted.load(Ordering::Relaxed);
    println!(
        "     {} tunnels, {} new TLS connections (at most {} streams each)",
        args.connections,
        after - before,
        Config::default().max_streams_per_connection
    );

    // Bulk.
    println!("\n7. Bulk transfer through one tunnel ({} MiB each way, echoed):", args.bulk_mib);
    let (bytes, elapsed) = bulk(node1, args.bulk_mib * 1024 * 1024).await?;
    println!(
        "     {} MiB echoed intact in {:.2?} ({:.2} Gbit/s each way)",
        bytes / (1024 * 1024),
        elapsed,
        bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9
    );

    let stats = node2.server.stats();
    println!("\n8. Node 2 counters:");
    println!("     TLS connections accepted  {}", stats.connections_accepted.load(Ordering::Relaxed));
    println!("     tunnels accepted          {}", stats.streams_accepted.load(Ordering::Relaxed));
    println!("     tunnels refused           {}", stats.streams_rejected.load(Ordering::Relaxed));
    println!("     handshakes refused        {}", stats.handshake_failures.load(Ordering::Relaxed));
    println!("\nDone. Next: `weft demo` grows into a network-namespace cluster with ztunnels (issue 3).");
    Ok(())
}

async fn echo_once(proxy: SocketAddr, msg: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut tcp = TcpStream::connect(proxy).await.context("connect to node 1")?;
    tcp.write_all(msg).await?;
    tcp.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut back)).await.context("echo timed out")??;
    if back != msg {
        bail!("echo mismatch: sent {} bytes, got {}", msg.len(), back.len());
    }
    Ok(back)
}

async fn bulk(proxy: SocketAddr, total: usize) -> anyhow::Result<(usize, Duration)> {
    let tcp = TcpStream::connect(proxy).await.context("connect to node 1")?;
    let (mut r, mut w) = tcp.into_split();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len());
            w.write_all(&chunk[..n]).await?;
            left -= n;
        }
        w.shutdown().await
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), r.read(&mut buf)).await.context("bulk stalled")??;
        if n == 0 {
            break;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            if *b != ((got + i) % (64 * 1024) % 251) as u8 {
                bail!("corrupted byte at offset {}", got + i);
            }
        }
        got += n;
    }
    writer.await.context("writer task")??;
    if got != total {
        bail!("sent {total} bytes, got {got} back");
    }
    Ok((got, started.elapsed()))
}

fn print_log(log: &std::sync::Mutex<Vec<String>>) {
    if let Ok(mut lines) = log.lock() {
        for line in lines.drain(..) {
            println!("{line}");
        }
    }
}
