//! An h2 stream's received half as an `http_body::Body`: data handed on gives its bytes back
//! to the stream's and connection's receive windows, then the trailers follow.
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use ::h2::RecvStream;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// The body of an HTTP/2 request (or response) as it arrives.
#[derive(Debug)]
pub struct RecvBody {
    recv: RecvStream,
    /// All data frames have been read; trailers (if any) are next.
    data_done: bool,
    /// What the `content-length` field says is left (h2 checks that the data matches it).
    remaining: Option<u64>,
}

impl RecvBody {
    /// Wraps `recv`; `content_length` is the message's `content-length`, if it had one.
    pub fn new(recv: RecvStream, content_length: Option<u64>) -> Self {
        RecvBody {
            recv,
            data_done: false,
            remaining: content_length,
        }
    }
}

/// The value of a message's `content-length` field, when it has exactly one valid value
/// (h2 refuses a message whose fields disagree with each other or with its data).
pub fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = ::h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ::h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Given back as it is handed on: how much lbd holds of a body is bounded
                    // by whoever reads it next, not by the window.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(r) = &mut this.remaining {
                        *r = r.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                // RST_STREAM(NO_ERROR) ends the body early without failing it: the peer has
                // what it needs (RFC 9113 §8.1).
                Some(Err(e)) if e.reason() == Some(::h2::Reason::NO_ERROR) => {
                    return Poll::Ready(None);
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(t) => Poll::Ready(t.map(|t| Ok(Frame::trailers(t)))),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
