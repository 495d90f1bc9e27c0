//! The public listener's connection limits. Each open HTTP/1.1 connection costs about 23 KiB
//! of buffers and state whether or not a request is on it, and freed connection memory stays
//! with the process, so the number open at once, not the request rate, sets the peak memory.
//! At most `MAX_CONNECTIONS` are served at once; further clients wait in the kernel's accept
//! backlog until one closes. A connection that moves no byte for `CONNECTION_IDLE_SECONDS` is
//! closed, so idle keep-alive connections cannot hold every place. The server keeps reading
//! while a request is handled, so that limit also applies to a request in progress; it is
//! never set below the longest a request can wait ([`crate::Settings::connection_idle`]).
//! A client that sends a byte just before every limit still holds its place: behind a load
//! balancer that buffers requests (the usual deployment) such clients never reach ingress.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use prometheus_client::metrics::gauge::Gauge;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};

/// A TCP listener that accepts a connection only while fewer than its limit are open.
pub struct LimitedListener {
    inner: TcpListener,
    places: Arc<Semaphore>,
    idle_after: Duration,
    open: Gauge,
}

impl LimitedListener {
    /// `open` counts the connections open now (a metric).
    pub fn new(inner: TcpListener, max: usize, idle_after: Duration, open: Gauge) -> Self {
        Self {
            inner,
            places: Arc::new(Semaphore::new(max.max(1))),
            idle_after,
            open,
        }
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // The semaphore is never closed, so this waits for a place and never fails; the
        // fallback only keeps the types honest.
        let place = self.places.clone().acquire_owned().await.ok();
        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        self.open.inc();
        let stream = LimitedStream {
            stream,
            _place: place,
            idle: Box::pin(tokio::time::sleep(self.idle_after)),
            idle_after: self.idle_after,
            last_moved: Instant::now(),
            open: self.open.clone(),
        };
        (stream, addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted connection: gives its place back when dropped, and fails a read that has
/// waited longer than the idle limit since the last byte moved.
pub struct LimitedStream {
    stream: TcpStream,
    _place: Option<OwnedSemaphorePermit>,
    /// Fires at the earliest moment the connection could have been idle too long; moved
    /// forward lazily (when it fires) rather than on every byte.
    idle: Pin<Box<Sleep>>,
    idle_after: Duration,
    last_moved: Instant,
    open: Gauge,
}

impl LimitedStream {
    fn touched(&mut self) {
        self.last_moved = Instant::now();
    }

    /// Whether the connection has been idle too long; otherwise the timer is set to wake
    /// this task when it could be.
    fn idle_too_long(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.idle.as_mut().poll(cx).is_pending() {
                return false;
            }
            let deadline = self.last_moved + self.idle_after;
            if deadline <= Instant::now() {
                return true;
            }
            self.idle.as_mut().reset(deadline);
        }
    }
}

impl Drop for LimitedStream {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.touched();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending if self.idle_too_long(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection idle for too long",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, data);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.touched();
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.touched();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
