//! lbd's own HTTP/1.1 server connection (downstream side), in the style of nginx and Pingora:
//! an idle keep-alive connection holds only its socket and a few words of state. The read
//! buffer exists only while a request is read (it is released when the connection goes idle),
//! the response head is built in a buffer that lives for one response, and the per-request
//! future (`proxy::handle` plus body pumping) is boxed so the connection task itself stays
//! small.
//!
//! Requests on one connection are handled strictly one after another (pipelined requests
//! wait in the read buffer). The request body is streamed to `proxy::handle` through a
//! one-frame hand-over slot ([`H1Body`]); `Expect: 100-continue` is answered when that body
//! is first polled. An HTTP/2 prior-knowledge preface on a fresh connection is handed back
//! to the caller with the bytes already read.
use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt as _;
use http::{Method, Request, Response, Version, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::model::Limits;
use crate::l7::answer;
use crate::l7::body::ResponseBody;
use crate::l7::conn::ConnInfo;
use crate::l7::downstream::DownstreamBody;
use crate::l7::h1::codec::{self, Decoded, Decoder, Framing, Head, ResponseFraming};
use crate::l7::io::{ReadReady, Transport};
use crate::l7::proxy;
use crate::l7::reason::Reason;
use crate::l7::runtime::Runtime;
use crate::l7::server::CloseReason;

/// First allocation of the read buffer for a request head (grown up to `max_header_bytes`).
const HEAD_BUF: usize = 4096;
/// Room reserved for each socket read of a request body.
const BODY_READ: usize = 16 * 1024;
/// Response bytes gathered before a write (head plus small body frames go out together).
const WRITE_AT: usize = 16 * 1024;
/// Body frames larger than this are written from their own buffer instead of being copied.
const COPY_MAX: usize = 8 * 1024;
/// A request body nobody reads any more (answered early) is read and thrown away up to this
/// many bytes so the connection can be reused; a longer one closes the connection.
const DISCARD_MAX: u64 = 256 * 1024;
/// How long that discarding may take after the response was sent.
const DISCARD_TIME: Duration = Duration::from_secs(2);
/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How a connection served by [`serve`] ended.
pub(in crate::l7) enum End<S> {
    /// Closed, for this reason.
    Closed(CloseReason),
    /// The client spoke HTTP/2 with prior knowledge: serve it with these bytes replayed first.
    H2(S, Bytes),
}

/// What a connection needs besides its socket.
pub(in crate::l7) struct ConnCtx<'a> {
    /// The client and listener.
    pub info: ConnInfo,
    /// The listener's limits as the connection started.
    pub limits: &'a Limits,
    /// Active runtime.
    pub state: &'a Arc<ArcSwap<Runtime>>,
    /// Turns true on drain.
    pub shutdown: &'a mut watch::Receiver<bool>,
    /// Whether an HTTP/2 preface is looked for on the first bytes.
    pub sniff_h2: bool,
}

/// Serves HTTP/1.x requests on `stream` until it closes.
///
/// This future lives as long as the connection, so only the idle wait is inline; each request
/// (head, exchange, error answers) runs in a boxed future that exists while it does.
pub(in crate::l7) async fn serve<S: Transport>(mut stream: S, mut cx: ConnCtx<'_>) -> End<S> {
    let mut rbuf = BytesMut::new();
    let mut first = true;
    // One timer for every idle wait of the connection, moved later each time: moving a
    // registered timer later is a store (the wheel re-files it only when the old deadline
    // comes), where a timer per wait was a wheel insertion and removal per request.
    let mut idle = pin!(tokio::time::sleep_until(Instant::now()));
    loop {
        if rbuf.is_empty() {
            // Idle: no buffer at all until the client sends something (an empty buffer was
            // released at the end of the previous request).
            let wait = if first {
                cx.limits.header_read_timeout.min(cx.limits.idle_timeout)
            } else {
                cx.limits.idle_timeout
            };
            idle.as_mut().reset(Instant::now() + wait);
            match wait_readable(&stream, idle.as_mut(), cx.shutdown).await {
                Ok(()) => {}
                // Nothing sent at all within the header timeout: hyper counted this as an
                // error (its header timeout), and the metric keeps that meaning.
                Err(CloseReason::Idle) if first => return End::Closed(CloseReason::Error),
                Err(reason) => return End::Closed(reason),
            }
            // Allocated at its size (growing an empty buffer goes the long way round).
            rbuf = BytesMut::with_capacity(HEAD_BUF);
            // A polled read (not `try_read`): a short read clears the socket's readiness, so
            // the next wait for input does not start with a read that finds nothing.
            match stream.read_buf(&mut rbuf).now_or_never() {
                Some(Ok(0)) => return End::Closed(CloseReason::Client),
                Some(Ok(_)) => {}
                None => {
                    // Spurious readiness: give the buffer back and wait again.
                    rbuf = BytesMut::new();
                    continue;
                }
                Some(Err(_)) => return End::Closed(CloseReason::Error),
            }
        }
        let exchange = crate::l7::box_in_place!(request(&mut stream, &mut rbuf, &mut cx, first));
        match exchange.await {
            Next::KeepAlive => {}
            // (`request` lingers itself.)
            Next::Close(reason) | Next::Linger(reason) => return End::Closed(reason),
            Next::H2 => return End::H2(stream, rbuf.freeze()),
        }
        first = false;
        if *cx.shutdown.borrow() {
            return End::Closed(CloseReason::Drain);
        }
        if rbuf.is_empty() {
            // Going idle: release the read buffer (its head bytes may still be shared with
            // header values of the finished request; they go when those do).
            rbuf = BytesMut::new();
        }
    }
}

/// Waits until `stream` is readable, `idle` fires (idle timeout) or the listener drains.
/// A hand-written poll keeps this (the state of every idle connection) small: the socket's
/// own readiness slot instead of a `readable()` future, one timer, one drain watch.
async fn wait_readable<S: Transport>(
    stream: &S,
    mut sleep: Pin<&mut tokio::time::Sleep>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), CloseReason> {
    let mut drain = pin!(shutdown.wait_for(|s| *s));
    poll_fn(|c| {
        if let Poll::Ready(r) = stream.poll_read_ready(c) {
            return Poll::Ready(r.map_err(|_| CloseReason::Error));
        }
        if drain.as_mut().poll(c).is_ready() {
            return Poll::Ready(Err(CloseReason::Drain));
        }
        if sleep.as_mut().poll(c).is_ready() {
            return Poll::Ready(Err(CloseReason::Idle));
        }
        Poll::Pending
    })
    .await
}

/// Reads one request head (header timeout from its first byte) and serves the exchange.
async fn request<S: Transport>(
    stream: &mut S,
    rbuf: &mut BytesMut,
    cx: &mut ConnCtx<'_>,
    first: bool,
) -> Next {
    let deadline = Instant::now() + cx.limits.header_read_timeout;
    let mut sniff = first && cx.sniff_h2;
    let head = loop {
        if sniff {
            let n = rbuf.len().min(H2_PREFACE.len());
            if rbuf[..n] != H2_PREFACE[..n] {
                sniff = false;
            } else if n == H2_PREFACE.len() {
                return Next::H2;
            }
        }
        if !sniff {
            match codec::parse_head(rbuf, cx.limits.max_header_bytes) {
                Ok(Some(h)) => break h,
                Ok(None) => {}
                Err(e) => {
                    let resp = answer::http(Reason::from(e), true, None);
                    let wr =
                        write_response(stream, resp, &Method::GET, Version::HTTP_11, false, false);
                    if let Ok(Ok(_)) = tokio::time::timeout(DISCARD_TIME, wr).await {
                        linger(stream).await;
                    }
                    return Next::Close(CloseReason::Error);
                }
            }
        }
        if rbuf.capacity() == rbuf.len() {
            rbuf.reserve(rbuf.len().clamp(HEAD_BUF, 64 * 1024));
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(rbuf)).await {
            // Slow headers (slowloris): closed without an answer, as hyper did.
            Err(_elapsed) => return Next::Close(CloseReason::Error),
            // A head cut off by the client (hyper: an incomplete message, an error).
            Ok(Ok(0)) => return Next::Close(CloseReason::Error),
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Next::Close(CloseReason::Error),
        }
    };
    match exchange(stream, rbuf, head, cx).await {
        Next::Linger(reason) => {
            linger(stream).await;
            Next::Close(reason)
        }
        next => next,
    }
}

/// Progress of reading the request body, as seen by the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum BodyState {
    Reading = 0,
    Done = 1,
    Failed = 2,
}

/// A [`BodyState`] shared by the futures of one exchange (a cell the compiler accepts as
/// `Sync`; all its users run on the connection's task).
struct StateCell(AtomicU8);

impl StateCell {
    fn new(s: BodyState) -> Self {
        StateCell(AtomicU8::new(s as u8))
    }

    fn get(&self) -> BodyState {
        match self.0.load(Ordering::Relaxed) {
            0 => BodyState::Reading,
            1 => BodyState::Done,
            _ => BodyState::Failed,
        }
    }

    fn set(&self, s: BodyState) {
        self.0.store(s as u8, Ordering::Relaxed);
    }
}

/// What a connection does after an exchange.
enum Next {
    /// Serve the next request.
    KeepAlive,
    /// Close now.
    Close(CloseReason),
    /// Close, but give the client time to read the answer first: it may still be sending a
    /// request we did not read (closing with unread input resets the connection, which can
    /// destroy the answer in flight).
    Linger(CloseReason),
    /// The client spoke HTTP/2: hand the connection over.
    H2,
}

/// Closes the write side and reads (and drops) what the client still sends, briefly.
async fn linger<S: Transport>(stream: &mut S) {
    if stream.shutdown().await.is_err() {
        return;
    }
    // On the heap: inline, 4 KiB would size the future of every request (this shares it).
    let mut buf = vec![0u8; 4096];
    let _ = tokio::time::timeout(DISCARD_TIME, async {
        for _ in 0..64 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// The request handed to `proxy::handle`, built in a plain function: built in `exchange`, it
/// would be a local borrowed while built, and such a local keeps its room in the future even
/// after it was moved away.
fn downstream_request(
    method: Method,
    uri: http::Uri,
    version: Version,
    headers: http::HeaderMap,
    body: DownstreamBody,
) -> Request<DownstreamBody> {
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;
    req
}

/// One request/response exchange.
async fn exchange<S: Transport>(
    stream: &mut S,
    rbuf: &mut BytesMut,
    head: Head,
    cx: &mut ConnCtx<'_>,
) -> Next {
    let Head {
        method,
        uri,
        version,
        headers,
        framing,
        mut keep_alive,
        expect_continue,
        te_trailers,
    } = head;
    let shared = (framing != Framing::Empty).then(|| Arc::new(Shared::default()));
    let body = DownstreamBody::H1(H1Body::new(shared.clone(), framing));
    let (mut rd, mut wr) = stream.split();
    let state = StateCell::new(if framing == Framing::Empty {
        BodyState::Done
    } else {
        BodyState::Reading
    });
    let max_head = cx.limits.max_header_bytes;
    let mut reader = pin!(read_side(
        &mut rd,
        rbuf,
        shared.as_deref(),
        Decoder::new(framing),
        &state,
        max_head
    ));

    // Until the response head is ready: pump the body, answer 100-continue, notice the
    // client going away (which cancels the request, as hyper does).
    let mut continue_pending = expect_continue && shared.is_some();
    // In a block: the request's future (kilobytes) is dropped once it has answered (its room
    // in this future is then free for the response writer's). One `await` while it lives: a
    // future live across two suspension points keeps its room for the whole exchange, and
    // this future (copied whole when the connection boxes each request) would grow by it.
    let resp = {
        let req = downstream_request(method.clone(), uri, version, headers, body);
        let mut respond = pin!(proxy::handle(cx.state.load_full(), cx.info.clone(), req));
        // Bytes of `100 Continue` written, once the upstream asked for the body.
        let mut continue_sent: Option<usize> = None;
        let answered = poll_fn(|c| {
            // The reader first: body bytes that came with the head are decoded before the
            // upstream request goes out, so a malformed body is refused (400) before a
            // backend could start answering it. As with hyper, a client gone mid-exchange
            // counts as an error, not a normal close.
            if reader.as_mut().poll(c).is_ready() {
                return Poll::Ready(None);
            }
            loop {
                if let Some(sent) = &mut continue_sent {
                    // Finished before the answer goes out, which must not follow half of it.
                    match poll_write_continue(&mut wr, sent, c) {
                        Poll::Ready(Ok(())) => {
                            continue_sent = None;
                            continue_pending = false;
                        }
                        Poll::Ready(Err(_)) => return Poll::Ready(None),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                if let Poll::Ready(r) = respond.as_mut().poll(c) {
                    return Poll::Ready(Some(r));
                }
                if !continue_pending {
                    return Poll::Pending;
                }
                match poll_first_poll(shared.as_deref(), c) {
                    Poll::Ready(true) => continue_sent = Some(0),
                    Poll::Ready(false) => {
                        // Body refused unread: the client may or may not send it.
                        continue_pending = false;
                        keep_alive = false;
                        return Poll::Pending;
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await;
        match answered {
            Some(r) => r,
            None => return Next::Close(CloseReason::Error),
        }
    };
    if continue_pending {
        if shared.as_deref().is_some_and(Shared::polled) {
            // The upstream asked for the body, but its answer's head came in the same turn
            // (an echo answers at once): the client still waits for 100 Continue before it
            // sends the body the answer is made of.
            if write_continue(&mut wr).await.is_err() {
                return Next::Close(CloseReason::Error);
            }
        } else {
            // Answered without asking for the body: whether the client sends it anyway is
            // unknowable, so the connection cannot be reused.
            keep_alive = false;
        }
    }
    let draining = *cx.shutdown.borrow();
    if draining {
        keep_alive = false;
    }
    let written = {
        let mut write = pin!(write_response(
            &mut wr,
            resp,
            &method,
            version,
            te_trailers,
            keep_alive
        ));
        tokio::select! {
            biased;
            w = &mut write => w,
            () = &mut reader => return Next::Close(CloseReason::Error),
        }
    };
    let keep_alive = match written {
        Ok(k) => k,
        Err(WriteFail::BeforeHead) => {
            // The answer failed before any byte of it went out (its body needed the request
            // body, which turned out malformed, or the upstream broke off at once): the
            // client gets a proper error instead of a cut-off response.
            let reason = if state.get() == BodyState::Failed {
                Reason::ClientBody
            } else {
                Reason::UpstreamReset
            };
            let resp = answer::http(reason, true, None);
            let _ = write_response(&mut wr, resp, &method, version, false, false).await;
            return Next::Linger(CloseReason::Error);
        }
        Err(WriteFail::Io) => return Next::Close(CloseReason::Error),
    };
    let closing = if draining {
        CloseReason::Drain
    } else {
        CloseReason::Client
    };
    // Bytes after a CONNECT head are no request and were never read (the codec refuses to
    // reuse the connection): like an unread body they must not turn the close into a reset.
    let unread = if state.get() == BodyState::Done && method != Method::CONNECT {
        Next::Close(closing)
    } else {
        Next::Linger(closing)
    };
    if !keep_alive {
        return unread;
    }
    if state.get() == BodyState::Reading {
        // Answered before the body was read to its end: read the rest and throw it away
        // (bounded), so the next request starts where it should.
        if let Some(s) = &shared {
            s.detach();
        }
        let drained = tokio::time::timeout(
            DISCARD_TIME,
            poll_fn(|c| {
                if reader.as_mut().poll(c).is_ready() {
                    return Poll::Ready(false);
                }
                match state.get() {
                    BodyState::Reading => Poll::Pending,
                    BodyState::Done => Poll::Ready(true),
                    BodyState::Failed => Poll::Ready(false),
                }
            }),
        )
        .await;
        if drained != Ok(true) {
            return Next::Linger(closing);
        }
    }
    if state.get() != BodyState::Done {
        return Next::Linger(closing);
    }
    Next::KeepAlive
}

/// Ready once the request body is first polled (`true`) or dropped unpolled (`false`).
fn poll_first_poll(shared: Option<&Shared>, c: &mut Context<'_>) -> Poll<bool> {
    let Some(shared) = shared else {
        return Poll::Ready(false);
    };
    let mut s = shared.lock();
    if s.polled {
        Poll::Ready(true)
    } else if s.dropped {
        Poll::Ready(false)
    } else {
        s.conn_waker = Some(c.waker().clone());
        Poll::Pending
    }
}

/// The connection's read side during an exchange: feeds the request body to [`H1Body`], then
/// watches for the client closing. Resolves only when the client went away (EOF or error).
async fn read_side<R: AsyncRead + ReadReady + Unpin>(
    rd: &mut R,
    rbuf: &mut BytesMut,
    shared: Option<&Shared>,
    mut dec: Decoder,
    state: &StateCell,
    max_head: usize,
) {
    if let Some(shared) = shared {
        let mut discarded = 0u64;
        loop {
            let frame = match dec.decode(rbuf, max_head) {
                Err(e) => {
                    shared.fail(H1BodyError(e));
                    state.set(BodyState::Failed);
                    return std::future::pending().await;
                }
                Ok(Decoded::NeedMore) => {
                    rbuf.reserve(BODY_READ);
                    match rd.read_buf(rbuf).await {
                        Ok(0) | Err(_) => {
                            shared.fail(H1BodyError("client_closed_mid_body"));
                            state.set(BodyState::Failed);
                            return;
                        }
                        Ok(_) => continue,
                    }
                }
                Ok(Decoded::End) => {
                    shared.finish();
                    state.set(BodyState::Done);
                    break;
                }
                Ok(Decoded::Data(d)) => Frame::data(d),
                Ok(Decoded::Trailers(t)) => Frame::trailers(t),
            };
            let n = frame.data_ref().map_or(0, Bytes::len) as u64;
            if !shared.offer(frame).await {
                // Nobody reads the body any more: discard, within bounds.
                discarded += n;
                if discarded > DISCARD_MAX {
                    state.set(BodyState::Failed);
                    return std::future::pending().await;
                }
            }
        }
    }
    // The body is complete: anything more is a pipelined request (kept, up to the head
    // limit) or the client closing.
    loop {
        if rbuf.len() >= max_head {
            return std::future::pending().await;
        }
        // The socket's own readiness slot (no waiter node to link and unlink per request).
        if poll_fn(|c| rd.poll_read_ready(c)).await.is_err() {
            return;
        }
        if rbuf.capacity() == rbuf.len() {
            rbuf.reserve(HEAD_BUF);
        }
        if let Some(Ok(0) | Err(_)) = rd.read_buf(rbuf).now_or_never() {
            return;
        }
    }
}

/// Why [`write_response`] did not complete.
#[derive(Debug)]
enum WriteFail {
    /// The response body failed before anything was written: another answer can be sent.
    BeforeHead,
    /// The socket failed, or the body failed after part of the response went out.
    Io,
}

impl From<io::Error> for WriteFail {
    fn from(_: io::Error) -> Self {
        WriteFail::Io
    }
}

/// Writes `resp` (head and body) for a request with `method`/`version`; returns whether the
/// connection can be kept alive afterwards.
async fn write_response<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    resp: Response<ResponseBody>,
    method: &Method,
    version: Version,
    te_trailers: bool,
    mut keep_alive: bool,
) -> Result<bool, WriteFail> {
    let (parts, mut body) = resp.into_parts();
    let raw = body.take_fields();
    if parts.headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    }) {
        keep_alive = false;
    }
    let mut out = Vec::with_capacity(512);
    let framing = codec::encode_response_head(
        &mut out,
        parts.status,
        raw.as_ref(),
        &parts.headers,
        method,
        version,
        body.size_hint().exact(),
        &mut keep_alive,
    );
    drop((parts, raw));
    if framing == ResponseFraming::None {
        drop(body);
        wr.write_all(&out).await?;
        wr.flush().await?;
        return Ok(keep_alive);
    }
    let mut left = match framing {
        ResponseFraming::Length(n) => n,
        _ => u64::MAX,
    };
    let mut trailers = None;
    // Whether any byte of the response went out (until then another answer can replace it).
    let mut wrote = false;
    // Written but maybe still in the TLS session's buffer (a no-op for TCP): flushed before
    // waiting for the body, so a streamed response never stalls in lbd.
    let mut unflushed = false;
    loop {
        let frame = if out.is_empty() {
            if unflushed {
                wr.flush().await?;
                unflushed = false;
            }
            body.frame().await
        } else {
            match body.frame().now_or_never() {
                Some(f) => f,
                None => {
                    // Nothing more right now: send what is gathered, then wait.
                    wr.write_all(&out).await?;
                    wr.flush().await?;
                    wrote = true;
                    out.clear();
                    continue;
                }
            }
        };
        let data = match frame {
            None => break,
            Some(Err(_)) if !wrote => return Err(WriteFail::BeforeHead),
            Some(Err(_)) => {
                // The upstream body failed mid-way: the client must see a truncated
                // response, never a complete-looking one.
                wr.write_all(&out).await?;
                return Err(WriteFail::Io);
            }
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                Err(f) => {
                    trailers = f.into_trailers().ok();
                    continue;
                }
            },
        };
        if data.is_empty() {
            continue;
        }
        let mut data = data;
        if framing == ResponseFraming::Length(0) || left == 0 {
            keep_alive = false;
            break;
        }
        if (data.len() as u64) > left {
            // More than the declared length: send what was declared, then close.
            data.truncate(left as usize);
            keep_alive = false;
        }
        left -= data.len() as u64;
        if framing == ResponseFraming::Chunked {
            codec::push_hex(&mut out, data.len() as u64);
            out.extend_from_slice(b"\r\n");
        }
        if data.len() <= COPY_MAX {
            out.extend_from_slice(&data);
        } else {
            // Not copied: what is gathered (the head, framing, small frames) and the frame go
            // out in one writev.
            write_both(wr, &out, &data).await?;
            wrote = true;
            unflushed = true;
            out.clear();
        }
        if framing == ResponseFraming::Chunked {
            out.extend_from_slice(b"\r\n");
        }
        if out.len() >= WRITE_AT {
            wr.write_all(&out).await?;
            wrote = true;
            unflushed = true;
            out.clear();
        }
        if !keep_alive && left == 0 {
            break;
        }
    }
    match framing {
        ResponseFraming::Chunked => {
            out.extend_from_slice(b"0\r\n");
            if let Some(t) = trailers.filter(|_| te_trailers) {
                for (name, value) in &t {
                    out.extend_from_slice(name.as_str().as_bytes());
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(value.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
            }
            out.extend_from_slice(b"\r\n");
        }
        ResponseFraming::Length(_) if left != 0 && left != u64::MAX => {
            // Shorter than declared: the client will notice the close.
            wr.write_all(&out).await?;
            return Err(WriteFail::Io);
        }
        _ => {}
    }
    if !out.is_empty() {
        wr.write_all(&out).await?;
    }
    wr.flush().await?;
    Ok(keep_alive)
}

/// `100 Continue`, flushed (the client waits for it).
async fn write_continue<W: tokio::io::AsyncWrite + Unpin>(wr: &mut W) -> io::Result<()> {
    let mut sent = 0;
    poll_fn(|c| poll_write_continue(wr, &mut sent, c)).await
}

/// Writes `100 Continue` from byte `sent` on and flushes it.
fn poll_write_continue<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    sent: &mut usize,
    c: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
    while let Some(rest) = CONTINUE.get(*sent..).filter(|r| !r.is_empty()) {
        match std::task::ready!(Pin::new(&mut *wr).poll_write(c, rest)) {
            Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Ok(n) => *sent += n,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
    Pin::new(wr).poll_flush(c)
}

/// Writes `a` then `b` with as few (vectored) writes as the socket allows.
async fn write_both<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    mut a: &[u8],
    mut b: &[u8],
) -> io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        let n = wr
            .write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[(n - from_a).min(b.len())..];
    }
    Ok(())
}

/// Why an HTTP/1.x request body could not be read.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("downstream request body: {0}")]
pub struct H1BodyError(&'static str);

/// The hand-over slot between the connection (which reads the socket) and the body's
/// consumer (the upstream request, possibly on another task). One frame at a time.
#[derive(Debug, Default)]
struct Shared(Mutex<Slot>);

#[derive(Debug, Default)]
struct Slot {
    frame: Option<Frame<Bytes>>,
    error: Option<H1BodyError>,
    /// No frames after the current one.
    end: bool,
    /// The body has been polled (answers `Expect: 100-continue`).
    polled: bool,
    /// The body was dropped, or the connection stopped feeding it.
    dropped: bool,
    body_waker: Option<Waker>,
    conn_waker: Option<Waker>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands `frame` to the body once the slot is free; `false` if nobody reads any more.
    async fn offer(&self, frame: Frame<Bytes>) -> bool {
        let mut frame = Some(frame);
        poll_fn(|c| {
            let mut s = self.lock();
            if s.dropped {
                return Poll::Ready(false);
            }
            if s.frame.is_some() {
                s.conn_waker = Some(c.waker().clone());
                return Poll::Pending;
            }
            s.frame = frame.take();
            if let Some(w) = s.body_waker.take() {
                w.wake();
            }
            Poll::Ready(true)
        })
        .await
    }

    /// Whether the body's consumer has asked for it yet.
    fn polled(&self) -> bool {
        self.lock().polled
    }

    fn finish(&self) {
        let mut s = self.lock();
        s.end = true;
        if let Some(w) = s.body_waker.take() {
            w.wake();
        }
    }

    fn fail(&self, e: H1BodyError) {
        let mut s = self.lock();
        // A frame not yet taken is dropped: nothing more of a body known to be malformed goes
        // upstream (when the error came with the head, the upstream gets nothing at all).
        s.frame = None;
        s.error = Some(e);
        if let Some(w) = s.body_waker.take() {
            w.wake();
        }
    }

    /// The connection moves on: the body, if still polled, fails from now on.
    fn detach(&self) {
        let mut s = self.lock();
        s.dropped = true;
        s.frame = None;
        if !s.end {
            s.error = Some(H1BodyError("request_finished"));
        }
        if let Some(w) = s.body_waker.take() {
            w.wake();
        }
    }
}

/// An HTTP/1.x request body, fed by the connection that read its head.
#[derive(Debug)]
pub struct H1Body {
    shared: Option<Arc<Shared>>,
    /// Bytes left of a `Content-Length` body; `None` for chunked.
    left: Option<u64>,
    done: bool,
}

impl H1Body {
    fn new(shared: Option<Arc<Shared>>, framing: Framing) -> Self {
        let left = match framing {
            Framing::Empty => Some(0),
            Framing::Length(n) => Some(n),
            Framing::Chunked => None,
        };
        H1Body {
            shared,
            left,
            done: framing == Framing::Empty,
        }
    }
}

impl Drop for H1Body {
    fn drop(&mut self) {
        if let Some(shared) = &self.shared {
            let mut s = shared.lock();
            s.dropped = true;
            if let Some(w) = s.conn_waker.take() {
                w.wake();
            }
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = H1BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1BodyError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let Some(shared) = &this.shared else {
            this.done = true;
            return Poll::Ready(None);
        };
        let mut s = shared.lock();
        let first = !s.polled;
        s.polled = true;
        if let Some(f) = s.frame.take() {
            if let (Some(left), Some(d)) = (this.left.as_mut(), f.data_ref()) {
                *left = left.saturating_sub(d.len() as u64);
            }
            if let Some(w) = s.conn_waker.take() {
                w.wake();
            }
            return Poll::Ready(Some(Ok(f)));
        }
        if let Some(e) = s.error.take() {
            this.done = true;
            return Poll::Ready(Some(Err(e)));
        }
        if s.end {
            this.done = true;
            return Poll::Ready(None);
        }
        s.body_waker = Some(cx.waker().clone());
        if first && let Some(w) = s.conn_waker.take() {
            // The connection waits for this first poll to send 100 Continue.
            w.wake();
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.left == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
