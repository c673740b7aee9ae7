//! The request body as it arrives from a downstream client: lbd's own HTTP/1.1 body
//! (`h1server.rs`) or hyper's HTTP/2 stream body. `proxy::handle` takes either.
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::h1server::{H1Body, H1BodyError};

/// A downstream request body.
#[derive(Debug)]
pub enum DownstreamBody {
    /// From an HTTP/1.x connection served by `h1server`.
    H1(H1Body),
    /// From an HTTP/2 connection served by hyper.
    H2(Incoming),
}

/// Why reading a downstream request body failed.
#[derive(Debug, thiserror::Error)]
pub enum DownstreamError {
    /// HTTP/1.x: the client closed mid-body or sent a malformed body.
    #[error(transparent)]
    H1(#[from] H1BodyError),
    /// HTTP/2 stream error.
    #[error(transparent)]
    H2(#[from] hyper::Error),
}

impl From<Incoming> for DownstreamBody {
    fn from(b: Incoming) -> Self {
        DownstreamBody::H2(b)
    }
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
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            DownstreamBody::H1(b) => b.is_end_stream(),
            DownstreamBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            DownstreamBody::H1(b) => b.size_hint(),
            DownstreamBody::H2(b) => b.size_hint(),
        }
    }
}
