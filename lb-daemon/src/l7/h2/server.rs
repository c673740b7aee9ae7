//! Downstream HTTP/2 connections served on the `h2` crate directly: the connection's own task
//! accepts streams and drives each one (its request through `proxy::handle`, its response into
//! h2) to the end, with no task, channel or service layer per stream.
//!
//! Why not hyper's server: it spawns a task per stream, and with hundreds of streams in flight
//! those tasks overflow tokio's local run queue into its global queue, where some wait far
//! longer than the rest (a p99 several times the median, bench/README "HTTP/2 tail latency");
//! the spawn, the moves of each stream's future into its task and hyper's layers cost more
//! per request than the stream's own work in h2. Here a connection's streams are polled by
//! the connection's task as they are woken (`FuturesUnordered`), so they cannot starve one
//! another behind other connections' streams, and a connection cannot use more than its share.
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use ::h2::server::SendResponse;
use ::h2::{Reason, RecvStream, SendStream};
use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::model::Limits;
use crate::l7::body::ResponseBody;
use crate::l7::conn::ConnInfo;
use crate::l7::downstream::DownstreamBody;
use crate::l7::h1::codec;
use crate::l7::h2::fields;
use crate::l7::h2::recv::{self, RecvBody};
use crate::l7::h2::sendbudget::{self, Budgeted, ConnBudget};
use crate::l7::proxy;
use crate::l7::server::{CloseReason, ListenerCtx, Rewind};

/// Concurrent streams a downstream HTTP/2 client may open on one connection. What each stream
/// may hold is multiplied by this, so it stays at nginx's default (HAProxy allows 100): a
/// client gets more streams by opening more connections, each of which counts against
/// `max_connections`.
const MAX_STREAMS: u32 = 128;

/// Receive window of each downstream stream and of the connection (hyper's server default,
/// which lbd used before): a request body larger than this is read as lbd forwards it.
const WINDOW: u32 = 1024 * 1024;

/// Streams lbd may reset for a client's protocol errors before it closes the connection with
/// ENHANCE_YOUR_CALM (hyper's default; h2's own is lower).
const MAX_LOCAL_RESETS: usize = 1024;

/// Serves an HTTP/2 connection (prior knowledge, or `h2` by ALPN); `preface` holds bytes
/// already read from the socket, replayed first.
pub(crate) async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    preface: Bytes,
    info: ConnInfo,
    limits: &Limits,
    ctx: &ListenerCtx,
) -> CloseReason {
    let mut builder = ::h2::server::Builder::new();
    builder
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(MAX_STREAMS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_RESETS))
        .max_send_buffer_size(sendbudget::STREAM_AHEAD);
    let io = Rewind::new(preface, stream);
    let handshake = tokio::time::timeout(limits.idle_timeout, builder.handshake(io));
    let mut conn = match handshake.await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(listener = %ctx.name, client = %info.client, error = %e, "HTTP/2 handshake failed");
            return CloseReason::Error;
        }
        Err(_) => return CloseReason::Idle,
    };

    let budget = Arc::new(ConnBudget::default());
    let mut streams = FuturesUnordered::new();
    // Idle = no stream open for `idle_timeout` (nginx's rule for HTTP/2 keep-alive); checked a
    // few times per timeout rather than with a timer reset per stream.
    let idle = limits.idle_timeout;
    let mut ticker = tokio::time::interval(idle.max(Duration::from_millis(100)) / 4);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut idle_since = Some(Instant::now());
    let mut reason = CloseReason::Client;
    let mut closing = false;
    // One wait for the whole connection: made in the loop, it would register with (and leave)
    // the watch channel's waiters on every pass, i.e. for every stream accepted and finished.
    let mut shutdown = ctx.shutdown.clone();
    let drain = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    tokio::pin!(drain);
    loop {
        tokio::select! {
            // Streams first: finishing work in hand before taking more keeps latency flat.
            biased;
            Some(()) = streams.next(), if !streams.is_empty() => {
                if streams.is_empty() {
                    idle_since = Some(Instant::now());
                }
            }
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    idle_since = None;
                    let rt = ctx.state.load_full();
                    // Boxed where it is made: pushed by value, the stream's future (~5.7 KiB)
                    // was copied three times on its way into the set's node.
                    streams.push(crate::l7::box_in_place!(serve_stream(rt, info.clone(), req, respond, Arc::clone(&budget))));
                }
                Some(Err(e)) => {
                    tracing::debug!(listener = %ctx.name, client = %info.client, error = %e, "connection ended with error");
                    reason = CloseReason::Error;
                    break;
                }
                // GOAWAY exchanged (or the socket closed) and every stream done.
                None => break,
            },
            () = &mut drain, if !closing => {
                conn.graceful_shutdown();
                closing = true;
                reason = CloseReason::Drain;
            }
            _ = ticker.tick(), if !closing => {
                if idle_since.is_some_and(|t| t.elapsed() >= idle) {
                    conn.graceful_shutdown();
                    closing = true;
                    reason = CloseReason::Idle;
                }
            }
        }
    }
    reason
}

/// One stream: the request proxied, the response sent, unless the client resets it first
/// (then the request's future is dropped, which cancels its upstream call).
async fn serve_stream(
    rt: Arc<crate::l7::runtime::Runtime>,
    info: ConnInfo,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    budget: Arc<ConnBudget>,
) {
    if has_padded_value(req.headers()) {
        respond.send_reset(Reason::PROTOCOL_ERROR);
        return;
    }
    let length = recv::content_length(req.headers());
    let req = req.map(|recv| DownstreamBody::H2(RecvBody::new(recv, length)));
    // Inline, not boxed: the stream set allocates this whole future once anyway, and a box
    // of its own was one more allocation per stream for no fewer instructions (callgrind
    // --scenario h2: 40.0k either way, 11.1 → 10.1 allocations per request).
    let resp = {
        let mut handling = std::pin::pin!(proxy::handle(rt, info, req));
        poll_fn(|cx| {
            if let Poll::Ready(resp) = handling.as_mut().poll(cx) {
                return Poll::Ready(Some(resp));
            }
            // Reset by the client (or the connection failed) while waiting.
            respond.poll_reset(cx).map(|_| None)
        })
        .await
    };
    let Some(resp) = resp else { return };
    send(resp, respond, &budget).await;
}

/// Sends the response head, then its body with h2's flow control as backpressure.
async fn send(
    resp: Response<ResponseBody>,
    mut respond: SendResponse<Bytes>,
    budget: &Arc<ConnBudget>,
) {
    let (mut parts, body) = resp.into_parts();
    fields::strip_connection_fields(&mut parts.headers, fields::Head::Response);
    // As hyper's server did, and lbd's HTTP/1.1 side does: a response lbd makes, or forwards
    // without one, gets the date (RFC 9110 §6.6.1).
    if !parts.headers.contains_key(header::DATE) {
        parts.headers.insert(header::DATE, codec::date_value());
    }
    if body.is_end_stream() {
        let _ = respond.send_response(Response::from_parts(parts, ()), true);
        return;
    }
    if let Some(len) = body.size_hint().exact()
        && !parts.headers.contains_key(header::CONTENT_LENGTH)
    {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    let tx = match respond.send_response(Response::from_parts(parts, ()), false) {
        Ok(tx) => tx,
        Err(e) => {
            tracing::debug!(error = %e, "HTTP/2 response head not sent");
            respond.send_reset(Reason::INTERNAL_ERROR);
            return;
        }
    };
    let mut pump = Pump {
        body: Budgeted::new(body, budget),
        tx,
    };
    poll_fn(|cx| pump.poll(cx)).await;
}

/// A response body moved into its h2 stream: a chunk is pulled from the body only when h2 has
/// room for more of this stream (its send buffer is `STREAM_AHEAD`), so a client that does not
/// read makes lbd stop reading the upstream.
struct Pump<B> {
    body: B,
    tx: SendStream<Bytes>,
}

impl<B> Pump<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            // One byte asked for: h2 assigns what the window and the send buffer allow, and
            // the chunk that comes next is queued whole whatever its size.
            self.tx.reserve_capacity(1);
            if self.tx.capacity() == 0 {
                loop {
                    match ready!(self.tx.poll_capacity(cx)) {
                        Some(Ok(0)) => {}
                        Some(Ok(_)) => break,
                        // The stream was reset or the connection failed.
                        Some(Err(_)) | None => return Poll::Ready(()),
                    }
                }
            } else if self.tx.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
            let frame = match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "response body failed; stream reset");
                    self.tx.send_reset(Reason::INTERNAL_ERROR);
                    return Poll::Ready(());
                }
                None => {
                    let _ = self.tx.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    let end = self.body.is_end_stream();
                    if self.tx.send_data(data, end).is_err() || end {
                        return Poll::Ready(());
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        self.tx.reserve_capacity(0);
                        let _ = self.tx.send_trailers(trailers);
                        return Poll::Ready(());
                    }
                }
            }
        }
    }
}

/// A field value starting or ending with whitespace makes an HTTP/2 request malformed (RFC 9113
/// §8.2.1): it gets a stream error, and is never forwarded, since an HTTP/1.1 hop would
/// strip the whitespace that the next HTTP/2 hop keeps. h2 checks the other value rules.
fn has_padded_value(headers: &HeaderMap) -> bool {
    headers.values().any(|v| {
        let b = v.as_bytes();
        matches!(b.first(), Some(b' ' | b'\t')) || matches!(b.last(), Some(b' ' | b'\t'))
    })
}
