//! The request body as it arrives from a downstream client: lbd's own HTTP/1.1 body
//! (`h1/server.rs`) or an HTTP/2 stream's (`h2/server.rs`). `proxy::handle` takes either, and
//! may tee it for a mirror.
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

use crate::l7::h1::server::{H1Body, H1BodyError};
use crate::l7::h2::recv::RecvBody;

/// A downstream request body.
#[derive(Debug)]
pub enum DownstreamBody {
    /// From an HTTP/1.x connection served by `h1::server`.
    H1(H1Body),
    /// From an HTTP/2 connection served by `h2::server`.
    H2(RecvBody),
    /// Either of the above, copied as it streams (a mirrored request).
    Tee(Box<Tee>),
    /// A body the body phase read whole and the filters rewrote; `None` once sent.
    Full(Option<Bytes>),
}

/// Why a teed body's copy is not handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TeeLost {
    /// The body grew beyond the copy's bound.
    TooLarge,
    /// The body failed, or was not read to its end.
    Incomplete,
}

/// A body passed on unchanged while a copy of its data (up to a bound) is kept; the copy is
/// handed over when the body ends. The reader never waits for the copy's taker.
#[derive(Debug)]
pub struct Tee {
    inner: DownstreamBody,
    chunks: Vec<Bytes>,
    kept: u64,
    limit: u64,
    tx: Option<oneshot::Sender<Result<Bytes, TeeLost>>>,
}

impl Tee {
    /// Tees `inner`, copying at most `limit` bytes; the copy (or why there is none) goes to
    /// the receiver returned.
    pub fn wrap(
        inner: DownstreamBody,
        limit: u64,
    ) -> (DownstreamBody, oneshot::Receiver<Result<Bytes, TeeLost>>) {
        let (tx, rx) = oneshot::channel();
        let tee = Tee {
            inner,
            chunks: Vec::new(),
            kept: 0,
            limit,
            tx: Some(tx),
        };
        (DownstreamBody::Tee(Box::new(tee)), rx)
    }

    fn lose(&mut self, why: TeeLost) {
        self.chunks = Vec::new();
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Err(why));
        }
    }

    fn complete(&mut self) {
        let Some(tx) = self.tx.take() else { return };
        let body = match self.chunks.len() {
            0 => Bytes::new(),
            1 => self.chunks.pop().unwrap_or_default(),
            _ => {
                let mut all = bytes::BytesMut::with_capacity(self.kept as usize);
                for c in self.chunks.drain(..) {
                    all.extend_from_slice(&c);
                }
                all.freeze()
            }
        };
        let _ = tx.send(Ok(body));
    }

    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, DownstreamError>>> {
        let polled = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref()
                    && self.tx.is_some()
                {
                    self.kept += d.len() as u64;
                    if self.kept > self.limit {
                        self.lose(TeeLost::TooLarge);
                    } else if !d.is_empty() {
                        self.chunks.push(d.clone());
                    }
                }
                // The reader may not poll again once the body says it has ended.
                if self.inner.is_end_stream() {
                    self.complete();
                }
            }
            Some(Err(_)) => self.lose(TeeLost::Incomplete),
            None => self.complete(),
        }
        Poll::Ready(polled)
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        if self.tx.is_some() {
            self.lose(TeeLost::Incomplete);
        }
    }
}

/// Why reading a downstream request body failed.
#[derive(Debug, thiserror::Error)]
pub enum DownstreamError {
    /// HTTP/1.x: the client closed mid-body or sent a malformed body.
    #[error(transparent)]
    H1(#[from] H1BodyError),
    /// HTTP/2 stream error.
    #[error(transparent)]
    H2(#[from] ::h2::Error),
}

impl Body for DownstreamBody {
    type Data = Bytes;
    type Error = DownstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, DownstreamError>>> {
        match self.get_mut() {
            DownstreamBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            DownstreamBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            DownstreamBody::Tee(t) => t.poll_frame(cx),
            DownstreamBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            DownstreamBody::H1(b) => b.is_end_stream(),
            DownstreamBody::H2(b) => b.is_end_stream(),
            DownstreamBody::Tee(t) => t.inner.is_end_stream(),
            DownstreamBody::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            DownstreamBody::H1(b) => b.size_hint(),
            DownstreamBody::H2(b) => b.size_hint(),
            DownstreamBody::Tee(t) => t.inner.size_hint(),
            DownstreamBody::Full(b) => {
                SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}
