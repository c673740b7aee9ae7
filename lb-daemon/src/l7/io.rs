//! What the downstream codecs run over: a cleartext `TcpStream` or a TLS session on one.
//!
//! The HTTP/1.1 codec is generic over [`Transport`], so the cleartext path is the same code it
//! was before TLS (tokio's borrowed halves, the socket's own readiness), and the TLS path is a
//! second monomorphic copy rather than a branch or a box on every read.
use std::io;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio_rustls::server::TlsStream;

/// A downstream connection the HTTP/1.1 codec can serve.
pub(super) trait Transport: AsyncRead + AsyncWrite + Unpin + Send {
    /// The read side while an exchange also writes.
    type Read<'a>: AsyncRead + ReadReady + Unpin + Send
    where
        Self: 'a;
    /// The write side while an exchange also reads.
    type Write<'a>: AsyncWrite + Unpin + Send
    where
        Self: 'a;

    /// Ready when a read would not wait (data, end of stream or an error).
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Borrowed halves, polled by one task at a time.
    fn split(&mut self) -> (Self::Read<'_>, Self::Write<'_>);
}

/// Readiness of a read half, without reading.
pub(super) trait ReadReady {
    /// See [`Transport::poll_read_ready`].
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Transport for TcpStream {
    type Read<'a> = ReadHalf<'a>;
    type Write<'a> = WriteHalf<'a>;

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }

    fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        TcpStream::split(self)
    }
}

impl ReadReady for ReadHalf<'_> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.as_ref().poll_read_ready(cx)
    }
}

/// A server-side TLS session. The session is behind a mutex only so that the codec's read
/// and write halves (polled by the same task, never at once) can both reach it without an
/// allocation per exchange; whole-stream I/O goes through `get_mut` and takes no lock.
pub(super) struct TlsIo(Mutex<TlsStream<TcpStream>>);

impl TlsIo {
    /// Wraps an accepted session.
    pub(super) fn new(s: TlsStream<TcpStream>) -> Self {
        TlsIo(Mutex::new(s))
    }

    /// The session, for a hand-over to the HTTP/2 server.
    pub(super) fn into_inner(self) -> TlsStream<TcpStream> {
        self.0.into_inner().unwrap_or_else(PoisonError::into_inner)
    }

    fn inner(&mut self) -> Pin<&mut TlsStream<TcpStream>> {
        Pin::new(self.0.get_mut().unwrap_or_else(PoisonError::into_inner))
    }
}

fn lock(m: &Mutex<TlsStream<TcpStream>>) -> MutexGuard<'_, TlsStream<TcpStream>> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Plaintext already decrypted (or a close_notify) is readable even when the socket is not:
/// rustls reports that as not wanting to read more.
fn tls_read_ready(s: &TlsStream<TcpStream>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    let (tcp, session) = s.get_ref();
    if !session.wants_read() {
        return Poll::Ready(Ok(()));
    }
    tcp.poll_read_ready(cx)
}

/// Copies what rustls has decrypted into `buf`, reading the socket only when it holds none.
///
/// tokio-rustls' own `poll_read` goes back to the socket to fill the rest of `buf` once what
/// was decrypted is copied; on a keep-alive connection that attempt finds nothing (the client
/// waits for the answer), a wasted trip through rustls and the reactor on every request.
/// Here the copying goes on only while rustls still holds plaintext.
fn read_once(
    mut s: Pin<&mut TlsStream<TcpStream>>,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    if buf.remaining() == 0 {
        return Poll::Ready(Ok(()));
    }
    let data = std::task::ready!(s.as_mut().poll_fill_buf(cx))?;
    let mut n = data.len().min(buf.remaining());
    buf.put_slice(&data[..n]);
    s.as_mut().consume(n);
    // `wants_read` is false while decrypted bytes (or a close_notify) wait: no socket read.
    while n > 0 && buf.remaining() > 0 && !s.get_ref().1.wants_read() {
        let Poll::Ready(Ok(data)) = s.as_mut().poll_fill_buf(cx) else {
            break;
        };
        n = data.len().min(buf.remaining());
        buf.put_slice(&data[..n]);
        s.as_mut().consume(n);
    }
    Poll::Ready(Ok(()))
}

impl Transport for TlsIo {
    type Read<'a> = TlsHalf<'a>;
    type Write<'a> = TlsHalf<'a>;

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tls_read_ready(&lock(&self.0), cx)
    }

    fn split(&mut self) -> (TlsHalf<'_>, TlsHalf<'_>) {
        (TlsHalf(&self.0), TlsHalf(&self.0))
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        read_once(self.get_mut().inner(), cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().inner().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().inner().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().inner().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().inner().poll_shutdown(cx)
    }
}

/// One side of a split [`TlsIo`].
pub(super) struct TlsHalf<'a>(&'a Mutex<TlsStream<TcpStream>>);

impl ReadReady for TlsHalf<'_> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tls_read_ready(&lock(self.0), cx)
    }
}

impl AsyncRead for TlsHalf<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        read_once(Pin::new(&mut *lock(self.0)), cx, buf)
    }
}

impl AsyncWrite for TlsHalf<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *lock(self.0)).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *lock(self.0)).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *lock(self.0)).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *lock(self.0)).poll_shutdown(cx)
    }
}
