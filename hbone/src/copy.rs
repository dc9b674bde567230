//! Moving bytes between a TCP socket and a [`Tunnel`], in both directions at once.
//!
//! - **Half-close**: EOF on the socket becomes END_STREAM on the tunnel and END_STREAM on the
//!   tunnel becomes a FIN (`shutdown(SHUT_WR)`) on the socket; the other direction keeps
//!   flowing until it ends too.
//! - **Resets**: a socket error resets the stream (RST_STREAM CANCEL); a reset stream resets
//!   the socket (SO_LINGER 0, so closing it sends RST).
//! - **Buffers**: socket reads go straight into a reusable `BytesMut` that is frozen and handed
//!   to HTTP/2 without another copy. The buffer is released whenever the socket has nothing to
//!   read, so an idle tunnel holds no buffer.

use std::future::poll_fn;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use crate::tunnel::{Parts, Tunnel, h2_to_io, poll_send_capacity};

/// Bytes moved by one copy, in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the socket into the tunnel.
    pub to_tunnel: u64,
    /// From the tunnel into the socket.
    pub from_tunnel: u64,
}

/// Why a copy ended abnormally, and how much it moved before.
#[derive(Debug, thiserror::Error)]
#[error("{cause} (after {} bytes to the tunnel, {} from it)", transferred.to_tunnel, transferred.from_tunnel)]
pub struct CopyError {
    pub cause: CopyCause,
    pub transferred: Transferred,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyCause {
    #[error("reading from the local socket failed: {0}")]
    LocalRead(io::Error),
    #[error("writing to the local socket failed: {0}")]
    LocalWrite(io::Error),
    #[error("the tunnel failed: {0}")]
    Tunnel(io::Error),
}

impl CopyError {
    /// The peer reset the stream (or its connection went away).
    pub fn is_peer_reset(&self) -> bool {
        matches!(&self.cause, CopyCause::Tunnel(e) if e.kind() == io::ErrorKind::ConnectionReset)
    }
}

/// Copies until both directions have ended. On a reset from the tunnel, the socket is set to
/// reset on close, so the local peer sees the same abort.
pub async fn bidirectional(tcp: &mut TcpStream, tunnel: Tunnel, buffer: usize) -> Result<Transferred, CopyError> {
    let Parts { mut send, mut recv, pending, guard } = tunnel.into_parts();
    let to_tunnel = AtomicU64::new(0);
    let from_tunnel = AtomicU64::new(0);
    let result = {
        let (mut r, mut w) = tcp.split();
        let up = socket_to_tunnel(&mut r, &mut send, buffer, &to_tunnel);
        let down = tunnel_to_socket(&mut recv, pending, &mut w, &from_tunnel);
        tokio::try_join!(up, down)
    };
    drop(guard);
    let transferred =
        Transferred { to_tunnel: to_tunnel.load(Ordering::Relaxed), from_tunnel: from_tunnel.load(Ordering::Relaxed) };
    match result {
        Ok(_) => Ok(transferred),
        Err(cause) => {
            if matches!(&cause, CopyCause::Tunnel(_)) {
                // Make the close below a RST, mirroring the reset we received.
                let _ = socket2::SockRef::from(&*tcp).set_linger(Some(Duration::ZERO));
            }
            Err(CopyError { cause, transferred })
        }
    }
}

async fn socket_to_tunnel(
    r: &mut ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    buffer: usize,
    count: &AtomicU64,
) -> Result<(), CopyCause> {
    let mut buf = BytesMut::new();
    loop {
        if buf.capacity() < buffer {
            buf.reserve(buffer);
        }
        let n = match r.as_ref().try_read_buf(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Nothing to read: give the buffer back while we wait.
                buf = BytesMut::new();
                if let Err(e) = poll_fn(|cx| r.as_ref().poll_read_ready(cx)).await {
                    send.send_reset(h2::Reason::CANCEL);
                    return Err(CopyCause::LocalRead(e));
                }
                continue;
            }
            Err(e) => {
                send.send_reset(h2::Reason::CANCEL);
                return Err(CopyCause::LocalRead(e));
            }
        };
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(|e| CopyCause::Tunnel(h2_to_io(e)))?;
            return Ok(());
        }
        let mut chunk = buf.split().freeze();
        while !chunk.is_empty() {
            let cap = poll_fn(|cx| poll_send_capacity(send, chunk.len(), cx)).await.map_err(CopyCause::Tunnel)?;
            let part = chunk.split_to(cap);
            send.send_data(part, false).map_err(|e| CopyCause::Tunnel(h2_to_io(e)))?;
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

async fn tunnel_to_socket(
    recv: &mut RecvStream,
    pending: Bytes,
    w: &mut WriteHalf<'_>,
    count: &AtomicU64,
) -> Result<(), CopyCause> {
    if !pending.is_empty() {
        w.write_all(&pending).await.map_err(CopyCause::LocalWrite)?;
        count.fetch_add(pending.len() as u64, Ordering::Relaxed);
    }
    while let Some(data) = poll_fn(|cx| recv.poll_data(cx)).await {
        let data = data.map_err(|e| CopyCause::Tunnel(h2_to_io(e)))?;
        w.write_all(&data).await.map_err(CopyCause::LocalWrite)?;
        // Released only once written: a slow local reader holds back its own stream's
        // window, never the connection's beyond that (see config).
        let _ = recv.flow_control().release_capacity(data.len());
        count.fetch_add(data.len() as u64, Ordering::Relaxed);
    }
    w.shutdown().await.map_err(CopyCause::LocalWrite)?;
    Ok(())
}
