//! `weft app ...`: the small programs the lab runs inside pods (tests, benchmarks, demo).
//!
//! - `echo`: a TCP server that optionally greets each connection with a banner line (so a
//!   client can tell which endpoint answered), then echoes everything back, half-closing after
//!   the client does. Each accepted peer is printed, so tests can see who connected.

use std::net::{Ipv4Addr, SocketAddr};

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
}

pub async fn run(app: App) -> anyhow::Result<()> {
    match app {
        App::Echo { port, banner } => echo(port, banner).await,
    }
}

async fn echo(port: u16, banner: Option<String>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
        .await
        .with_context(|| format!("binding port {port}"))?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (mut tcp, peer) = listener.accept().await?;
        println!("accepted {peer}");
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
