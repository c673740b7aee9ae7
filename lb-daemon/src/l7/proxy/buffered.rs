//! The body phase's reading side: a body read whole within a bound, for the filters that asked
//! for it (see `filter/mod.rs`), and the head fixed to the body that goes on. Only chains
//! built with a body-phase filter come here; every other body streams.
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, header};
use http_body::Body;
use http_body_util::BodyExt as _;

use crate::l7::cluster::upstream::UpstreamBody;
use crate::l7::downstream::DownstreamBody;
use crate::l7::filter::{Chain, ResponseView};
use crate::l7::proxy::forward::Failure;
use crate::l7::reason::{BodyFault, Reason};

/// Why a body could not be read whole.
#[derive(Debug, PartialEq, Eq)]
pub enum Unread {
    /// Longer than the bound (declared so, or found so while reading).
    TooLarge,
    /// The stream failed before its end.
    Failed,
}

/// Reads `body` to its end, refusing one longer than `limit` bytes (declared or read).
/// Trailers are dropped: a rewritten body has none of its own.
pub async fn collect<B>(mut body: B, limit: u64) -> Result<Bytes, Unread>
where
    B: Body<Data = Bytes> + Unpin,
{
    if body.size_hint().lower() > limit {
        return Err(Unread::TooLarge);
    }
    let mut first: Option<Bytes> = None;
    let mut all = BytesMut::new();
    let mut seen = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(Unread::Failed);
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len() as u64;
        if seen > limit {
            return Err(Unread::TooLarge);
        }
        // One chunk (most small bodies) is kept as it is, without a copy.
        match first.take() {
            None if all.is_empty() => first = Some(data),
            None => all.extend_from_slice(&data),
            Some(f) => {
                all.reserve(f.len() + data.len());
                all.extend_from_slice(&f);
                all.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| all.freeze()))
}

/// The request body phase: reads the body whole when a filter of the first `ran` asks for it,
/// hands it to them, and gives back the body that goes upstream (the same stream untouched
/// when none asked). `listener_limit` (`max_body_bytes`, 0 = none) also bounds the read.
///
/// Boxed here, not in the caller: a future built in `proxy::handle` and boxed there would
/// still take room in every request's future (a moved-from local keeps its slot).
pub fn request<'a>(
    chain: &'a Chain,
    ran: usize,
    head: &'a mut http::request::Parts,
    body: DownstreamBody,
    listener_limit: u64,
) -> Pin<Box<impl Future<Output = Result<DownstreamBody, Failure>> + Send + 'a>> {
    crate::l7::box_in_place!(read_request(chain, ran, head, body, listener_limit))
}

async fn read_request(
    chain: &Chain,
    ran: usize,
    head: &mut http::request::Parts,
    body: DownstreamBody,
    listener_limit: u64,
) -> Result<DownstreamBody, Failure> {
    let Some(limit) = chain.request_body_limit(ran, head) else {
        return Ok(body);
    };
    let (bound, over) = if listener_limit > 0 && listener_limit < limit {
        (listener_limit, Reason::BodyTooLarge)
    } else {
        (limit, Reason::RequestBody(BodyFault::TooLarge))
    };
    let bytes = match collect(body, bound).await {
        Ok(b) => b,
        // Not read to its end: the connection cannot carry another request.
        Err(Unread::TooLarge) => {
            return Err(Failure {
                reason: over,
                close: true,
            });
        }
        Err(Unread::Failed) => {
            return Err(Failure {
                reason: Reason::ClientBody,
                close: true,
            });
        }
    };
    let bytes = chain.request_body(ran, head, bytes)?;
    set_length(&mut head.headers, bytes.len());
    Ok(DownstreamBody::Full(Some(bytes)))
}

/// What the response body phase made of an upstream answer.
#[allow(
    clippy::large_enum_variant,
    reason = "returned once per buffering exchange and unpacked at once; boxing the common \
              variant would cost an allocation"
)]
pub enum Rewritten {
    /// No filter asked for this body: the answer goes on as it came.
    Untouched(http::Response<UpstreamBody>),
    /// The new head and whole body.
    Whole(http::response::Parts, Bytes),
}

/// The response body phase: reads the upstream's body whole when a filter of the first `ran`
/// asks for it, within `time`, and hands it to them, last first (boxed, as [`request`]).
pub fn response<'a>(
    chain: &'a Chain,
    ran: usize,
    resp: http::Response<UpstreamBody>,
    rx: &'a ResponseView<'a>,
    time: std::time::Duration,
) -> Pin<Box<impl Future<Output = Result<Rewritten, Reason>> + Send + 'a>> {
    crate::l7::box_in_place!(read_response(chain, ran, resp, rx, time))
}

async fn read_response(
    chain: &Chain,
    ran: usize,
    resp: http::Response<UpstreamBody>,
    rx: &ResponseView<'_>,
    time: std::time::Duration,
) -> Result<Rewritten, Reason> {
    let (mut head, body) = resp.into_parts();
    let Some(limit) = chain.response_body_limit(ran, &head, rx) else {
        return Ok(Rewritten::Untouched(http::Response::from_parts(head, body)));
    };
    let bytes = match tokio::time::timeout(time, collect(body, limit)).await {
        Ok(Ok(b)) => b,
        Ok(Err(Unread::TooLarge)) => return Err(Reason::ResponseBody(BodyFault::TooLarge)),
        Ok(Err(Unread::Failed)) => return Err(Reason::UpstreamReset),
        Err(_) => return Err(Reason::UpstreamTimeout),
    };
    let bytes = chain.response_body(ran, &mut head, rx, bytes)?;
    set_length(&mut head.headers, bytes.len());
    Ok(Rewritten::Whole(head, bytes))
}

/// The head's framing for a body now held whole: its length, never chunked.
fn set_length(headers: &mut http::HeaderMap, len: usize) {
    headers.remove(header::TRANSFER_ENCODING);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
}
