//! Moving bytes between a TCP socket and a [`Tunnel`], in both directions at once.
//!
//! - **Half-close**: EOF on the socket becomes END_STREAM on the tunnel and END_STREAM on the
//!   tunnel becomes a FIN (`shutdown(SHUT_WR)`) on the socket; the other direction keeps
//!   flowing until it ends too.
//! - **Resets**: a socket error resets the stream (RST_STREAM CANCEL); a reset stream resets
//!   the socket (SO_LINGER 0, so closing it sends RST).
//! - **Buffers**: socket reads (up to `buffer` bytes each) go straight into a `BytesMut` that is
//!   frozen and handed to HTTP/2 without another copy, as one DATA frame (HTTP/2 cuts it only
//!   where the peer's largest frame is smaller; Weft's peers accept 1 MiB). A stream queues up
//!   to its HTTP/2 send buffer (4 MiB by default) before it waits for room, so the copy loop and
//!   the connection task do not hand each frame to each other. The buffer goes back to a small
//!   process-wide pool after every read, so a tunnel waiting for data holds none, and the next
//!   read (of any tunnel) takes back an allocation whose frames have all been sent: a busy
//!   stream cycles through a few warm buffers instead of asking the allocator for fresh pages
//!   per read (which cost a page fault per 4 KiB touched).
//! - **Syscalls**: a read that does not fill the buffer ends the burst (no second read just to
//!   learn EAGAIN), and the frames received by the time the socket is writable go out in one
//!   `writev`, so neither direction costs a syscall, nor wakes the local peer, per frame.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io::{self, IoSlice};
use std::pin::{Pin, pin};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
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
pub fn bidirectional(
    tcp: &mut TcpStream,
    tunnel: Tunnel,
    buffer: usize,
) -> impl Future<Output = Result<Transferred, CopyError>> + Send + '_ {
    // Split before the future is made, so that it stores the parts once and not the tunnel
    // too (every open tunnel holds this future).
    let Parts { send, recv, pending, guard } = tunnel.into_parts();
    copy_parts(tcp, send, recv, pending, guard, buffer)
}

async fn copy_parts(
    tcp: &mut TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    pending: Bytes,
    guard: Option<Box<dyn std::any::Any + Send + Sync>>,
    buffer: usize,
) -> Result<Transferred, CopyError> {
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
    loop {
        // Wait for data holding no buffer. Free of syscalls while the socket is known to be
        // readable (after a read that filled the buffer).
        if let Err(e) = poll_fn(|cx| r.as_ref().poll_read_ready(cx)).await {
            send.send_reset(h2::Reason::CANCEL);
            return Err(CopyCause::LocalRead(e));
        }
        let mut buf = BUFFERS.take(buffer);
        let room = buf.capacity();
        // On Linux, tokio's `AsyncRead` (unlike `try_read`) forgets the socket's readiness
        // after a read that does not fill the buffer, so a small message costs one `recv`, not
        // a second one that only returns EAGAIN. Polled once: it never waits holding the buffer.
        let read = poll_fn(|cx| match pin!(r.read_buf(&mut buf)).poll(cx) {
            Poll::Ready(result) => Poll::Ready(Some(result)),
            Poll::Pending => Poll::Ready(None),
        })
        .await;
        let mut chunk = buf.split().freeze();
        // Back to the pool at once: the handle keeps the allocation, which a later `take`
        // reclaims once the frames cut from `chunk` are sent and dropped.
        BUFFERS.give(buf);
        let n = match read {
            Some(Ok(n)) => n,
            // Readiness was stale (tokio has now cleared it): wait again, without a buffer.
            None => continue,
            Some(Err(e)) => {
                send.send_reset(h2::Reason::CANCEL);
                return Err(CopyCause::LocalRead(e));
            }
        };
        debug_assert_eq!(chunk.len(), n);
        debug_assert!(n <= room);
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(|e| CopyCause::Tunnel(h2_to_io(e)))?;
            return Ok(());
        }
        while !chunk.is_empty() {
            let cap = poll_fn(|cx| poll_send_capacity(send, chunk.len(), cx)).await.map_err(CopyCause::Tunnel)?;
            send.send_data(chunk.split_to(cap), false).map_err(|e| CopyCause::Tunnel(h2_to_io(e)))?;
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
    loop {
        // Frames are `Bytes` handles into HTTP/2's receive buffer: gathering them copies
        // nothing, and the list is dropped with the batch, so an idle tunnel holds nothing.
        let mut batch = Vec::new();
        let end = poll_fn(|cx| poll_frames(recv, &mut batch, cx)).await;
        let n: usize = batch.iter().map(Bytes::len).sum();
        write_all_vectored(w, &mut batch).await.map_err(CopyCause::LocalWrite)?;
        // Released only once written: a slow local reader holds back its own stream's
        // window, never the connection's beyond that (see config).
        let _ = recv.flow_control().release_capacity(n);
        count.fetch_add(n as u64, Ordering::Relaxed);
        match end {
            BatchEnd::More => {}
            BatchEnd::EndStream => break,
            // Only now, so that the data received before a reset is delivered first.
            BatchEnd::Failed(e) => return Err(CopyCause::Tunnel(e)),
        }
    }
    w.shutdown().await.map_err(CopyCause::LocalWrite)?;
    Ok(())
}

/// Read buffers kept for reuse, across tunnels: 8, 2 MiB with the default 256 KiB buffer.
///
/// A stream moving bulk data has a few reads in HTTP/2's send queue while it reads into the
/// next (up to 16 when its connection is slower than its app: the 4 MiB stream send buffer),
/// so 8 keeps one or two busy streams off the allocator, and the rest take buffers from
/// jemalloc, which keeps freed ones mapped. A pool of 24 changed page faults and CPU per GB
/// little in the lab (docs/BENCHMARKS.md).
/// Pages are committed only as reads touch them, so a node that never moves bulk data keeps
/// little of this resident; one that did keeps up to 2 MiB after the burst. Without reuse,
/// each read allocated a fresh 256 KiB that glibc returned to the kernel once its frames were
/// sent, and the next read paid a page fault per 4 KiB: 14,000-34,000 per GB on the sending
/// ztunnel, against under 100 with the pool.
const POOLED_BUFFERS: usize = 8;

static BUFFERS: BufferPool = BufferPool { free: Mutex::new(VecDeque::new()) };

/// Handles on read buffers whose allocations may still be shared with DATA frames in flight.
struct BufferPool {
    free: Mutex<VecDeque<BytesMut>>,
}

impl BufferPool {
    /// An empty buffer with room for `size` bytes: a pooled allocation none of whose frames is
    /// still in flight, or a new one.
    fn take(&self, size: usize) -> BytesMut {
        {
            // A poisoned lock only means a panic elsewhere while pushing a handle: the list is
            // still a list of handles.
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = free.iter_mut().position(|b| b.is_empty() && b.try_reclaim(size))
                && let Some(buf) = free.remove(i)
            {
                return buf;
            }
        }
        BytesMut::with_capacity(size)
    }

    /// Keeps `buf`'s allocation for a later [`take`](Self::take); the oldest handle is dropped
    /// when the pool is full (its allocation is freed once its frames are).
    fn give(&self, buf: BytesMut) {
        let oldest = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            free.push_back(buf);
            if free.len() > POOLED_BUFFERS { free.pop_front() } else { None }
        };
        // Freed, if it is, outside the lock.
        drop(oldest);
    }
}

/// Most DATA frames gathered into one `writev` to the local socket. Bounded by the stream
/// window anyway (4 MiB by default: 16 frames of a full 256 KiB read, 64 of 64 KiB).
const MAX_BATCH_FRAMES: usize = 64;

/// What follows a batch of received frames.
enum BatchEnd {
    /// The stream goes on.
    More,
    /// END_STREAM: the peer half-closed.
    EndStream,
    /// The stream was reset or its connection failed.
    Failed(io::Error),
}

/// Waits until the stream has something to say, then takes every DATA frame already
/// received, up to [`MAX_BATCH_FRAMES`], and says what follows them.
fn poll_frames(recv: &mut RecvStream, batch: &mut Vec<Bytes>, cx: &mut Context<'_>) -> Poll<BatchEnd> {
    while batch.len() < MAX_BATCH_FRAMES {
        match recv.poll_data(cx) {
            Poll::Ready(Some(Ok(data))) => {
                if !data.is_empty() {
                    batch.push(data);
                }
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(BatchEnd::Failed(h2_to_io(e))),
            Poll::Ready(None) => return Poll::Ready(BatchEnd::EndStream),
            Poll::Pending if batch.is_empty() => return Poll::Pending,
            Poll::Pending => break,
        }
    }
    Poll::Ready(BatchEnd::More)
}

/// Writes every byte of `batch` to the socket with as few `writev` calls as it takes.
async fn write_all_vectored(w: &mut WriteHalf<'_>, batch: &mut [Bytes]) -> io::Result<()> {
    let mut first = 0;
    poll_fn(|cx| {
        while first < batch.len() {
            // Built on each poll so that the slices are not part of the future's state.
            let mut slices = [IoSlice::new(&[]); MAX_BATCH_FRAMES];
            let used = slices.len().min(batch.len() - first);
            for (slice, data) in slices.iter_mut().zip(&batch[first..]) {
                *slice = IoSlice::new(data);
            }
            let mut written = ready!(Pin::new(&mut *w).poll_write_vectored(cx, &slices[..used]))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            while first < batch.len() && written >= batch[first].len() {
                written -= batch[first].len();
                first += 1;
            }
            if written > 0 {
                batch[first].advance(written);
            }
        }
        Poll::Ready(Ok(()))
    })
    .await
}

#[cfg(test)]
mod tests {
    /// Every proxied connection holds this future for its lifetime.
    #[test]
    fn copy_future_stays_small() {
        fn future_size<Fut>(_f: impl FnOnce(&'static mut TcpStream, crate::Tunnel, usize) -> Fut) -> usize {
            std::mem::size_of::<Fut>()
        }
        let size = future_size(super::bidirectional);
        assert!(size <= 700, "copy future grew to {size} bytes");
    }

    /// A read's allocation comes back once every frame cut from it is dropped, and not before:
    /// a busy stream reads into warm memory, and never into bytes still being sent.
    #[test]
    fn read_buffers_are_reused_once_their_frames_are_sent() {
        use bytes::BufMut;

        let pool = super::BufferPool { free: std::sync::Mutex::new(std::collections::VecDeque::new()) };
        let size = 64 * 1024;
        let mut buf = pool.take(size);
        let first = buf.as_ptr();
        buf.put_bytes(7, 1000);
        let chunk = buf.split().freeze();
        pool.give(buf);
        let frames = [chunk.slice(..500), chunk.slice(500..)];
        drop(chunk);

        // The frames are still queued: the next read must not get their memory.
        let second = pool.take(size);
        assert_ne!(second.as_ptr(), first, "a buffer was reused while its frames were in flight");
        assert!(second.capacity() >= size);
        assert!(frames.iter().all(|f| f.iter().all(|&b| b == 7)));
        pool.give(second);

        drop(frames);
        let again = pool.take(size);
        assert_eq!(again.as_ptr(), first, "the sent buffer's allocation was not reused");
        assert!(again.capacity() >= size && again.is_empty());
    }

    /// The pool keeps at most `POOLED_BUFFERS` allocations, dropping the oldest.
    #[test]
    fn pool_is_bounded() {
        let pool = super::BufferPool { free: std::sync::Mutex::new(std::collections::VecDeque::new()) };
        let buffers: Vec<_> = (0..super::POOLED_BUFFERS + 3).map(|_| pool.take(4096)).collect();
        let newest: Vec<_> = buffers.iter().skip(3).map(|b| b.as_ptr()).collect();
        for b in buffers {
            pool.give(b);
        }
        let kept = pool.free.lock().unwrap();
        assert_eq!(kept.len(), super::POOLED_BUFFERS);
        assert_eq!(kept.iter().map(|b| b.as_ptr()).collect::<Vec<_>>(), newest);
    }

    /// A socket read goes into the tunnel as one DATA frame, not cut into small ones: the
    /// sending side queues, writes and wakes once for what one read took from the socket.
    #[tokio::test]
    async fn a_read_travels_as_one_frame() {
        use tokio::io::AsyncWriteExt;

        const SENT: usize = 200 * 1024;
        let config = crate::Config::default();
        let (client_io, server_io) = tokio::io::duplex(1024 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::Builder::new()
                .initial_window_size(config.stream_window)
                .initial_connection_window_size(config.connection_window)
                .max_frame_size(config.max_frame_size)
                .handshake::<_, Bytes>(server_io)
                .await
                .unwrap();
            let (request, mut respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            // Answered before any data: the client has the server's settings and windows
            // (sent first on the connection) by the time it reads the answer.
            let mut reply = respond.send_response(http::Response::new(()), false).unwrap();
            let mut body = request.into_body();
            let mut frames = Vec::new();
            while let Some(data) = body.data().await {
                let data = data.unwrap();
                let _ = body.flow_control().release_capacity(data.len());
                // The end of the stream comes as an empty frame of its own.
                if !data.is_empty() {
                    frames.push(data.len());
                }
            }
            reply.send_data(Bytes::new(), true).unwrap();
            frames
        });
        let (mut sender, conn) = h2::client::Builder::new()
            .max_send_buffer_size(crate::Config::default().stream_send_buffer)
            .handshake::<_, Bytes>(client_io)
            .await
            .unwrap();
        tokio::spawn(conn);
        let (response, send) = sender.send_request(http::Request::new(()), false).unwrap();
        let recv = response.await.unwrap().into_body();
        let tunnel = crate::Tunnel::new(send, recv, crate::testing::id("ns", "sa"), None);

        // The bytes wait in the local socket before the copy starts, so its first read takes
        // them all.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        socket2::SockRef::from(&listener).set_recv_buffer_size(4 * SENT).unwrap();
        let mut app = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut local, _) = listener.accept().await.unwrap();
        app.write_all(&vec![7u8; SENT]).await.unwrap();
        app.shutdown().await.unwrap();
        let mut peek = vec![0u8; 2 * SENT];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while local.peek(&mut peek).await.unwrap() < SENT {
            assert!(std::time::Instant::now() < deadline, "the bytes never reached the socket");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }

        let moved = super::bidirectional(&mut local, tunnel, crate::config::DEFAULT_COPY_BUFFER).await.unwrap();
        assert_eq!(moved.to_tunnel, SENT as u64);
        assert_eq!(server.await.unwrap(), vec![SENT], "one read, one DATA frame");
    }

    use bytes::Bytes;
    use tokio::net::TcpStream;
}
