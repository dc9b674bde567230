//! Request and response bodies on their way through the waypoint: a request body kept for
//! retries (up to a bound), a body that counts its bytes and reports its end.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::upstream::{self, BoxError};

/// A request body as the waypoint holds it before the first attempt.
pub enum Prepared {
    /// Read whole (it fit the retry buffer): every attempt sends a copy.
    Buffered { data: Bytes, trailers: Option<HeaderMap> },
    /// Too large (or no retry can happen): streamed once; the frames already read go first.
    Streaming { read: Vec<Frame<Bytes>>, rest: Option<Incoming> },
}

impl Prepared {
    /// Reads `body` until it ends or exceeds `limit` bytes.
    pub async fn read(mut body: Incoming, limit: usize) -> Result<Prepared, hyper::Error> {
        if body.is_end_stream() {
            return Ok(Prepared::Buffered { data: Bytes::new(), trailers: None });
        }
        if body.size_hint().lower() as usize > limit {
            return Ok(Prepared::Streaming { read: Vec::new(), rest: Some(body) });
        }
        let mut data = BytesMut::new();
        let mut read = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            match frame.into_data() {
                Ok(chunk) => {
                    data.extend_from_slice(&chunk);
                    read.push(Frame::data(chunk));
                    if data.len() > limit {
                        return Ok(Prepared::Streaming { read, rest: Some(body) });
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        return Ok(Prepared::Buffered { data: data.freeze(), trailers: Some(trailers) });
                    }
                }
            }
        }
        Ok(Prepared::Buffered { data: data.freeze(), trailers: None })
    }

    /// Whether another attempt can send this body again.
    pub fn replayable(&self) -> bool {
        matches!(self, Prepared::Buffered { .. })
    }

    /// The body of one attempt. A streamed body can be taken once; later calls get `None`.
    pub fn attempt(&mut self, count: &Arc<AtomicU64>) -> Option<upstream::Body> {
        let body = match self {
            Prepared::Buffered { data, trailers } => {
                Replay { data: (!data.is_empty()).then(|| data.clone()), trailers: trailers.clone() }
                    .map_err(|e| match e {})
                    .boxed()
            }
            Prepared::Streaming { read, rest } => {
                // Taken by the first attempt: a streamed body cannot be sent twice.
                let rest = rest.take()?;
                let read = std::mem::take(read);
                Prefixed { read: read.into_iter().rev().collect(), rest }.map_err(|e| Box::new(e) as BoxError).boxed()
            }
        };
        Some(Counted::new(body, count.clone()).boxed())
    }
}

/// A buffered body, sent again.
struct Replay {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for Replay {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// Frames already read, then the rest of the client's body.
struct Prefixed {
    /// In reverse order (popped from the end).
    read: Vec<Frame<Bytes>>,
    rest: Incoming,
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(frame) = self.read.pop() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.rest.is_end_stream()
    }
}

/// Counts the data bytes that pass.
pub struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Counted { inner, count }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that calls `done` once, when it ends, fails or is dropped, with the bytes
/// it carried and the trailers it saw (a gRPC status lives there).
pub struct Observed<B: Body, F: FnOnce(u64, Option<&HeaderMap>, bool)> {
    inner: B,
    bytes: u64,
    done: Option<F>,
}

impl<B: Body, F: FnOnce(u64, Option<&HeaderMap>, bool)> Observed<B, F> {
    pub fn new(inner: B, done: F) -> Self {
        Observed { inner, bytes: 0, done: Some(done) }
    }

    fn finish(&mut self, trailers: Option<&HeaderMap>, complete: bool) {
        if let Some(done) = self.done.take() {
            done(self.bytes, trailers, complete);
        }
    }
}

impl<B, F> Body for Observed<B, F>
where
    B: Body<Data = Bytes> + Unpin,
    F: FnOnce(u64, Option<&HeaderMap>, bool) + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
                if let Some(trailers) = frame.trailers_ref() {
                    let trailers = trailers.clone();
                    self.finish(Some(&trailers), true);
                } else if self.inner.is_end_stream() {
                    self.finish(None, true);
                }
            }
            Poll::Ready(None) => self.finish(None, true),
            Poll::Ready(Some(Err(_))) => self.finish(None, false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Body, F: FnOnce(u64, Option<&HeaderMap>, bool)> Drop for Observed<B, F> {
    fn drop(&mut self) {
        // An empty body is never polled: at its end, it is complete.
        let complete = self.inner.is_end_stream();
        self.finish(None, complete);
    }
}
