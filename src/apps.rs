//! `weft app ...`: the small programs the lab runs inside pods (tests, benchmarks, demo).
//!
//! - `echo`: a TCP server that optionally greets each connection with a banner line (so a
//!   client can tell which endpoint answered), then echoes everything back, half-closing after
//!   the client does. Each accepted peer is printed, so tests can see who connected.
//! - `sink`: reads and discards; on EOF answers the byte count (8 bytes, big-endian).
//! - `http`: a minimal HTTP/1.1 keep-alive server answering every request `200 ok`.
//! - `web`: HTTP/1.1 and HTTP/2 (hyper) answering its name, for the waypoint's tests and the
//!   demo; fails a given share of requests with 503, spread evenly (at 50%, every other
//!   request), and echoes the request's method, path and `x-*` headers in
//!   response headers (`x-seen-*`).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::Context;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

#[derive(clap::Subcommand)]
pub enum App {
    /// TCP echo server.
    Echo {
        /// Port to listen on (all addresses of the namespace).
        #[arg(long)]
        port: u16,
        /// A line sent to every client first (for example the pod name).
        #[arg(long)]
        banner: Option<String>,
    },
    /// Discards input, answers the byte count on EOF.
    Sink {
        #[arg(long)]
        port: u16,
    },
    /// Answers every HTTP/1.1 request with `200 ok` (keep-alive).
    Http {
        #[arg(long)]
        port: u16,
    },
    /// HTTP/1.1 and HTTP/2, answering its name.
    Web {
        #[arg(long)]
        port: u16,
        /// The response body (for example the version: v1).
        #[arg(long)]
        name: String,
        /// Percent of requests answered 503 (0 to 100).
        #[arg(long, default_value_t = 0)]
        fail_percent: u32,
        /// Print `request <method> <path> from <client address>` for each request (tests look
        /// for what the app saw, and from where).
        #[arg(long)]
        log_requests: bool,
    },
}

pub async fn run(app: App) -> anyhow::Result<()> {
    match app {
        App::Echo { port, banner } => echo(port, banner).await,
        App::Sink { port } => sink(port).await,
        App::Http { port } => http(port).await,
        App::Web { port, name, fail_percent, log_requests } => web(port, name, fail_percent, log_requests).await,
    }
}

async fn web(port: u16, name: String, fail_percent: u32, log_requests: bool) -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use http_body_util::Full;
    use hyper::body::Bytes;
    let listener = listen(port).await?;
    let name: Arc<str> = Arc::from(format!("{name}\n"));
    let count = Arc::new(AtomicU32::new(0));
    loop {
        let (tcp, peer) = listener.accept().await?;
        let peer = client(peer);
        let _ = tcp.set_nodelay(true);
        let (name, count) = (name.clone(), count.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let n = count.fetch_add(1, Ordering::Relaxed);
                if log_requests {
                    println!("request {} {} from {peer}", req.method(), req.uri().path());
                }
                // Spread evenly: at 50, every other request fails.
                let failing =
                    (u64::from(n) + 1) * u64::from(fail_percent) / 100 > u64::from(n) * u64::from(fail_percent) / 100;
                let mut resp = hyper::Response::new(Full::new(Bytes::from(name.to_string())));
                if failing {
                    *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                }
                let h = resp.headers_mut();
                h.insert("x-seen-method", req.method().as_str().parse().expect("a method is a header value"));
                if let Ok(v) = req.uri().path().parse() {
                    h.insert("x-seen-path", v);
                }
                for (k, v) in req.headers() {
                    if let Some(rest) = k.as_str().strip_prefix("x-")
                        && let Ok(key) = hyper::header::HeaderName::from_bytes(format!("x-seen-{rest}").as_bytes())
                    {
                        h.insert(key, v.clone());
                    }
                }
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let _ = builder.serve_connection(io, service).await;
        });
    }
}

/// Listens on `port` of every address of the namespace, both families: `[::]`, which also
/// accepts IPv4 (unless `net.ipv6.bindv6only` says otherwise), else `0.0.0.0` where IPv6 is
/// off. Peers are printed as [`client`] gives them.
async fn listen(port: u16) -> anyhow::Result<TcpListener> {
    let listener = match TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))).await {
        Ok(listener) => listener,
        Err(_) => TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
            .await
            .with_context(|| format!("binding port {port}"))?,
    };
    println!("listening on {}", listener.local_addr()?);
    Ok(listener)
}

async fn sink(port: u16) -> anyhow::Result<()> {
    hbone::testing::serve_sink(listen(port).await?).await;
    anyhow::bail!("the sink stopped accepting connections")
}

async fn http(port: u16) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    let listener = listen(port).await?;
    loop {
        let (mut tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(4096);
            loop {
                // Requests carry no body: one request ends at the blank line.
                while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    buf.drain(..end + 4);
                    if tcp.write_all(RESPONSE).await.is_err() {
                        return;
                    }
                }
                if buf.len() > 64 * 1024 {
                    return; // not HTTP as this server knows it
                }
                match tcp.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
    }
}

async fn echo(port: u16, banner: Option<String>) -> anyhow::Result<()> {
    let listener = listen(port).await?;
    loop {
        let (mut tcp, peer) = listener.accept().await?;
        println!("accepted {}", client(peer));
        let banner = banner.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            if let Some(b) = banner
                && tcp.write_all(format!("{b}\n").as_bytes()).await.is_err()
            {
                return;
            }
            let (mut r, mut w) = tcp.split();
            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                let _ = w.shutdown().await;
            }
        });
    }
}

/// A client's address as it connected: an IPv4 client of a `[::]` listener is reported as
/// `10.244.1.2:40000`, not as the mapped `[::ffff:10.244.1.2]:40000`.
fn client(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}
