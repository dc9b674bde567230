//! [`Tunnel`]: one HBONE stream (an HTTP/2 CONNECT stream whose `200` has been exchanged) as a
//! bidirectional byte stream.
//!
//! It implements `AsyncRead`/`AsyncWrite` for callers that want to speak a protocol over it
//! (tests, the waypoint's HTTP). Proxies move bytes with [`crate::copy::bidirectional`], which
//! works on the HTTP/2 halves directly and avoids one copy per chunk.
//!
//! Shutting down the write side sends END_STREAM (a TCP FIN, carried); dropping the tunnel
//! before both sides finished resets the stream (RST_STREAM CANCEL, a TCP RST, carried).

use std::any::Any;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::identity::SpiffeId;

/// The most one `poll_write` copies and hands to HTTP/2: 64 KiB. Each write is copied into
/// its own allocation (the caller keeps its buffer), so one write's copy stays modest; bulk
/// copies between a socket and a tunnel go through `copy`, which copies nothing.
const MAX_WRITE: usize = 64 * 1024;

pub struct Tunnel {
    pub(crate) send: SendStream<Bytes>,
    pub(crate) recv: RecvStream,
    /// Received bytes not yet read by the caller.
    pending: Bytes,
    read_eof: bool,
    write_closed: bool,
    peer: SpiffeId,
    /// Held for the tunnel's lifetime: the client pool counts a connection's open streams by
    /// these guards.
    _guard: Option<Box<dyn Any + Send + Sync>>,
}

/// The parts of a tunnel, for the copy loop.
pub struct Parts {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    /// Bytes already received but not yet consumed.
    pub pending: Bytes,
    pub guard: Option<Box<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("peer", &self.peer)
            .field("stream", &self.send.stream_id())
            .field("read_eof", &self.read_eof)
            .field("write_closed", &self.write_closed)
            .finish()
    }
}

impl Tunnel {
    pub(crate) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        peer: SpiffeId,
        guard: Option<Box<dyn Any + Send + Sync>>,
    ) -> Self {
        Tunnel { send, recv, pending: Bytes::new(), read_eof: false, write_closed: false, peer, _guard: guard }
    }

    /// The identity the peer proved in the TLS handshake.
    pub fn peer_identity(&self) -> &SpiffeId {
        &self.peer
    }

    pub fn into_parts(self) -> Parts {
        Parts { send: self.send, recv: self.recv, pending: self.pending, guard: self._guard }
    }

    /// Resets the stream (RST_STREAM CANCEL): the peer sees a connection reset.
    pub fn abort(mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.read_eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Released as soon as it is ours: what we buffer is bounded by one frame.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => self.read_eof = true,
            }
        }
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.write_closed {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel write side already shut down")));
        }
        let want = buf.len().min(MAX_WRITE);
        let n = ready!(poll_send_capacity(&mut self.send, want, cx))?;
        self.send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes queued frames out as soon as it can.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed {
            self.write_closed = true;
            self.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Waits until the stream may send at least one byte; returns how many (at most `want`).
///
/// h2's `poll_capacity` only wakes on an *increase* of assigned capacity, so capacity that is
/// already assigned is checked first.
pub(crate) fn poll_send_capacity(
    send: &mut SendStream<Bytes>,
    want: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    send.reserve_capacity(want);
    let available = send.capacity();
    if available > 0 {
        return Poll::Ready(Ok(available.min(want)));
    }
    match ready!(send.poll_capacity(cx)) {
        Some(Ok(n)) => Poll::Ready(Ok(n.min(want))),
        Some(Err(e)) => Poll::Ready(Err(h2_to_io(e))),
        None => Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel stream closed by peer"))),
    }
}

/// Maps an HTTP/2 stream error to the I/O error a TCP socket would have given.
pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    if e.is_reset() || e.is_go_away() {
        return io::Error::new(io::ErrorKind::ConnectionReset, e);
    }
    io::Error::other(e)
}
