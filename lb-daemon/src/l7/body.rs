//! Body wrappers: the request body is counted and capped on its way upstream; the response body
//! is counted on its way downstream and, when it ends, closes the request's books (access log,
//! metrics, in-flight count).
use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::l7::cluster::upstream::UpstreamBody;
use crate::l7::downstream::{DownstreamBody, DownstreamError};
use crate::l7::h2::pool::BoxError;
use crate::l7::log::RequestLog;
use crate::l7::reason::Reason;

/// Why a body stream failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The client sent more than the listener's `max_body_bytes`.
    #[error("request body exceeds {limit} bytes")]
    TooLarge {
        /// The configured limit.
        limit: u64,
    },
    /// The client's stream failed.
    #[error(transparent)]
    Stream(#[from] DownstreamError),
    /// A retried attempt took over the client body.
    #[error("request body taken over by a retry")]
    Superseded,
}

/// Copies a data or trailers frame (`Bytes` clones share the buffer).
fn clone_frame(f: &Frame<Bytes>) -> Frame<Bytes> {
    match (f.data_ref(), f.trailers_ref()) {
        (Some(d), _) => Frame::data(d.clone()),
        (None, Some(t)) => Frame::trailers(t.clone()),
        (None, None) => Frame::data(Bytes::new()),
    }
}

/// The downstream request body, counted and capped, streamed upstream without buffering.
#[derive(Debug)]
pub enum RequestBody {
    /// The client's body.
    Stream {
        /// Body from the client.
        inner: DownstreamBody,
        /// `max_body_bytes`; 0 = unlimited.
        limit: u64,
        /// Bytes seen so far (shared with the access log).
        seen: Arc<AtomicU64>,
    },
    /// No body (also what a retry sends, since retries only happen for empty bodies).
    Empty,
    /// A body lbd holds whole (a mirrored request's copy); `None` once sent.
    Full(Option<Bytes>),
    /// One attempt's view of a client body kept for retries (gRPC retries): what earlier
    /// attempts already read is replayed from memory, the rest is read from the client.
    Replayable {
        /// The body and the copy of what was read so far.
        shared: Arc<Mutex<Replay>>,
        /// Which attempt this is; only the newest attempt may read on.
        attempt: usize,
        /// Next chunk of `shared.chunks` to send.
        pos: usize,
    },
}

/// A client body read once and kept (up to a limit) so a failed attempt can be repeated.
#[derive(Debug)]
pub struct Replay {
    inner: DownstreamBody,
    limit: u64,
    seen: Arc<AtomicU64>,
    /// Copy of the data read so far; dropped once it would exceed `keep`.
    chunks: Vec<Frame<Bytes>>,
    kept: usize,
    keep: usize,
    /// The copy was dropped: no further attempt can start.
    overflowed: bool,
    done: bool,
    /// The attempt allowed to read from the client.
    current: usize,
    /// The client body's declared length, so that every attempt frames it the same way
    /// (an HTTP/1.1 upstream gets Content-Length, not chunked).
    exact: Option<u64>,
}

impl Replay {
    /// Wraps the client body `inner` (`limit`/`seen` as in [`RequestBody::Stream`]) keeping
    /// up to `keep` bytes for replays.
    pub fn new(
        inner: DownstreamBody,
        limit: u64,
        seen: Arc<AtomicU64>,
        keep: usize,
    ) -> Arc<Mutex<Self>> {
        let exact = inner.size_hint().exact();
        Arc::new(Mutex::new(Replay {
            exact,
            inner,
            limit,
            seen,
            chunks: Vec::new(),
            kept: 0,
            keep,
            overflowed: false,
            done: false,
            current: 0,
        }))
    }

    /// Whether another attempt can still get the whole body.
    pub fn can_replay(shared: &Arc<Mutex<Self>>) -> bool {
        shared.lock().is_ok_and(|s| !s.overflowed)
    }

    /// Whether the client's body was read to its end and kept whole, `None` if it is still
    /// being read, `Some(false)` if it was too large to keep.
    pub fn complete(shared: &Arc<Mutex<Self>>) -> Option<bool> {
        let s = shared.lock().ok()?;
        if s.overflowed {
            Some(false)
        } else {
            s.whole().then_some(true)
        }
    }

    /// The client's body has ended and every frame of it is kept.
    fn whole(&self) -> bool {
        !self.overflowed && (self.done || self.inner.is_end_stream())
    }

    /// A copy of the whole body for a try that runs beside the current one (a hedge),
    /// once [`Replay::complete`]: it only reads the kept frames, so both may send at once.
    pub fn copy(shared: &Arc<Mutex<Self>>) -> Option<RequestBody> {
        let s = shared.lock().ok()?;
        s.whole().then(|| RequestBody::Replayable {
            shared: Arc::clone(shared),
            attempt: s.current,
            pos: 0,
        })
    }

    /// The body for attempt `attempt` (0-based), if it can still be sent in full. Older
    /// attempts stop reading from then on.
    pub fn attempt(shared: &Arc<Mutex<Self>>, attempt: usize) -> Option<RequestBody> {
        let mut s = shared.lock().ok()?;
        if s.overflowed {
            return None;
        }
        s.current = attempt;
        Some(RequestBody::Replayable {
            shared: Arc::clone(shared),
            attempt,
            pos: 0,
        })
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RequestBody::Replayable {
                shared,
                attempt,
                pos,
            } => {
                let Ok(mut s) = shared.lock() else {
                    return Poll::Ready(None);
                };
                if let Some(f) = s.chunks.get(*pos) {
                    *pos += 1;
                    return Poll::Ready(Some(Ok(clone_frame(f))));
                }
                if s.whole() {
                    // Every frame was kept and sent: the end, for any attempt (a hedge and
                    // the try it races share a complete body).
                    s.done = true;
                    return Poll::Ready(None);
                }
                if s.current != *attempt || (s.overflowed && *pos != usize::MAX) {
                    // A superseded attempt (hyper may still be pumping its body while the next
                    // one runs): it must not read on, nor take the reader's wakeup.
                    return Poll::Ready(Some(Err(BodyError::Superseded)));
                }
                if s.done {
                    return Poll::Ready(None);
                }
                let s = &mut *s;
                match std::task::ready!(Pin::new(&mut s.inner).poll_frame(cx)) {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            let n = data.len();
                            let total = s.seen.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                            if s.limit > 0 && total > s.limit {
                                return Poll::Ready(Some(Err(BodyError::TooLarge {
                                    limit: s.limit,
                                })));
                            }
                            s.kept += n;
                        }
                        if s.kept > s.keep {
                            // Too big to keep: this attempt streams on, no other can follow.
                            s.overflowed = true;
                            s.chunks = Vec::new();
                            *pos = usize::MAX;
                        } else if !s.overflowed {
                            s.chunks.push(clone_frame(&frame));
                            *pos = s.chunks.len();
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Some(Err(e)) => Poll::Ready(Some(Err(BodyError::Stream(e)))),
                    None => {
                        s.done = true;
                        Poll::Ready(None)
                    }
                }
            }
            RequestBody::Stream { inner, limit, seen } => {
                match std::task::ready!(Pin::new(inner).poll_frame(cx)) {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            let total = seen.fetch_add(data.len() as u64, Ordering::Relaxed)
                                + data.len() as u64;
                            if *limit > 0 && total > *limit {
                                return Poll::Ready(Some(Err(BodyError::TooLarge {
                                    limit: *limit,
                                })));
                            }
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Some(Err(e)) => Poll::Ready(Some(Err(BodyError::Stream(e)))),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Full(b) => b.is_none(),
            // The client's stream may know it has ended before it is polled again (an HTTP/2
            // DATA frame with END_STREAM): saying so lets the upstream request end with its
            // last data instead of waiting for one more poll that may never come once the
            // answer is complete.
            RequestBody::Replayable { shared, pos, .. } => shared
                .lock()
                .map(|s| *pos >= s.chunks.len() && (s.done || s.inner.is_end_stream()))
                .unwrap_or(true),
            RequestBody::Stream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RequestBody::Replayable { shared, pos, .. } => shared
                .lock()
                .ok()
                .and_then(|s| s.exact.filter(|_| *pos == 0))
                .map_or_else(SizeHint::default, SizeHint::with_exact),
            RequestBody::Stream { inner, .. } => inner.size_hint(),
        }
    }
}

pin_project_lite::pin_project! {
    /// A gRPC call's deadline on its response: the timer, and the trailers that end the call.
    #[derive(Debug)]
    struct CallDeadline {
        #[pin]
        sleep: tokio::time::Sleep,
        trailers: Option<http::HeaderMap>,
    }
}

/// The response body sent downstream: the upstream's stream or a short local answer.
#[derive(Debug)]
pub struct ResponseBody {
    kind: Kind,
    /// gRPC call deadline: when it fires mid-stream, the upstream body is dropped and its
    /// trailers end the response instead. Boxed whole (the timer was boxed anyway): inline,
    /// the trailers' map made every response, and each move of it, 96 bytes larger.
    deadline: Option<Pin<Box<CallDeadline>>>,
    /// Finished (logged) when the body ends or is dropped, whichever comes first.
    log: Option<Box<RequestLog>>,
}

#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "an upstream body is the common variant; boxing it would cost an allocation \
              per request"
)]
enum Kind {
    Upstream(UpstreamBody),
    /// An upstream body whose digest someone waits for (a mirror comparing answers); boxed
    /// whole so that the common variants stay as small as they were.
    Tapped(Box<(UpstreamBody, DigestTap)>),
    Full(Option<Bytes>),
}

/// A response's status and, when its body ended within the bound, a hash of the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    /// Status code.
    pub status: u16,
    /// Hash of the whole body (`None`: longer than the bound, or not hashed).
    pub hash: Option<u64>,
}

/// Hashes a body as it streams past, without holding it, and hands the [`Digest`] over
/// when the body ends. Dropped before the end (client gone, upstream broke): nothing is sent.
#[derive(Debug)]
pub struct DigestTap {
    status: u16,
    hasher: Option<BodyHasher>,
    seen: u64,
    limit: u64,
    tx: Option<tokio::sync::oneshot::Sender<Digest>>,
}

/// The body hash both sides of a comparison use: fast, not cryptographic, the same for any
/// split of the body into chunks, fixed for the life of the process.
#[derive(Debug, Default)]
pub struct BodyHasher(std::hash::DefaultHasher);

impl BodyHasher {
    /// Feeds the next chunk.
    pub fn update(&mut self, bytes: &[u8]) {
        std::hash::Hasher::write(&mut self.0, bytes);
    }

    /// The hash of everything fed.
    pub fn finish(&self) -> u64 {
        std::hash::Hasher::finish(&self.0)
    }
}

impl DigestTap {
    /// A tap for a response with `status` whose body is hashed up to `limit` bytes.
    pub fn new(status: u16, limit: u64, tx: tokio::sync::oneshot::Sender<Digest>) -> Self {
        DigestTap {
            status,
            hasher: Some(BodyHasher::default()),
            seen: 0,
            limit,
            tx: Some(tx),
        }
    }

    fn data(&mut self, d: &[u8]) {
        self.seen += d.len() as u64;
        if self.seen > self.limit {
            // Too long to compare by hash: the status is all there is, and it is known now.
            self.hasher = None;
            self.send();
        } else if let Some(h) = &mut self.hasher {
            h.update(d);
        }
    }

    fn send(&mut self) {
        if let Some(tx) = self.tx.take() {
            let hash = self.hasher.as_ref().map(BodyHasher::finish);
            let _ = tx.send(Digest {
                status: self.status,
                hash,
            });
        }
    }
}

impl ResponseBody {
    /// Streams an upstream body.
    pub fn upstream(body: UpstreamBody, log: Box<RequestLog>) -> Self {
        ResponseBody {
            kind: Kind::Upstream(body),
            deadline: None,
            log: Some(log),
        }
    }

    /// Hands this body's digest to `tap` as it streams (a body that is not an upstream's
    /// keeps its status only: lbd's own answers are sent at once).
    pub fn tapped(
        mut self,
        status: u16,
        limit: u64,
        tx: tokio::sync::oneshot::Sender<Digest>,
    ) -> Self {
        let mut tap = DigestTap::new(status, limit, tx);
        self.kind = match std::mem::replace(&mut self.kind, Kind::Full(None)) {
            Kind::Upstream(b) if !b.is_end_stream() => Kind::Tapped(Box::new((b, tap))),
            other => {
                if let Kind::Full(Some(b)) = &other {
                    tap.data(b);
                }
                tap.send();
                other
            }
        };
        self
    }

    /// A complete body generated by lbd.
    pub fn full(bytes: Bytes, log: Option<Box<RequestLog>>) -> Self {
        ResponseBody {
            kind: Kind::Full(Some(bytes)),
            deadline: None,
            log,
        }
    }

    /// No body at all: the response ends with its headers (gRPC trailers-only answers).
    pub fn empty(log: Option<Box<RequestLog>>) -> Self {
        ResponseBody {
            kind: Kind::Full(None),
            deadline: None,
            log,
        }
    }

    /// Ends the response with `trailers` if it is still streaming at `at`.
    pub fn with_deadline(mut self, at: std::time::Instant, trailers: http::HeaderMap) -> Self {
        self.deadline = Some(Box::pin(CallDeadline {
            sleep: tokio::time::sleep_until(at.into()),
            trailers: Some(trailers),
        }));
        self
    }

    /// The header fields of an HTTP/1.1 upstream's response not yet in its header map
    /// (written to the client as they are), once.
    pub fn take_fields(&mut self) -> Option<crate::l7::h1::codec::RawFields> {
        match &mut self.kind {
            Kind::Upstream(b) => b.take_fields(),
            Kind::Tapped(t) => t.0.take_fields(),
            Kind::Full(_) => None,
        }
    }

    /// The header fields an HTTP/1.1 upstream's response still holds as bytes, to edit in
    /// place.
    pub fn fields_mut(&mut self) -> Option<&mut crate::l7::h1::codec::RawFields> {
        match &mut self.kind {
            Kind::Upstream(b) => b.fields_mut(),
            Kind::Tapped(t) => t.0.fields_mut(),
            Kind::Full(_) => None,
        }
    }

    /// The request's log record, while the body still holds it.
    pub fn log(&self) -> Option<&RequestLog> {
        self.log.as_deref()
    }

    fn count(&mut self, n: usize) {
        if let Some(log) = self.log.as_mut() {
            log.bytes_out += n as u64;
        }
    }

    fn finish(&mut self, error: Option<Reason>) {
        if let Some(mut log) = self.log.take() {
            if log.error.is_none() {
                log.error = error;
            }
            log.finish();
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Dropped before its end: the client went away or the connection was cut. hyper may
        // drop a body without a last poll once `is_end_stream` says it is done.
        let error = if self.is_end_stream() {
            None
        } else {
            Some(Reason::DownstreamClosed)
        };
        self.finish(error);
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(deadline) = &mut this.deadline
            && matches!(this.kind, Kind::Upstream(_) | Kind::Tapped(_))
            && deadline.as_mut().project().sleep.poll(cx).is_ready()
        {
            // Dropping the upstream body resets its stream (RST_STREAM CANCEL).
            this.kind = Kind::Full(None);
            let trailers = deadline
                .as_mut()
                .project()
                .trailers
                .take()
                .unwrap_or_default();
            if let Some(log) = this.log.as_mut() {
                log.grpc_status = Some(4);
            }
            this.finish(Some(Reason::DeadlineExceeded));
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let polled = match &mut this.kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(inner) => Pin::new(inner).poll_frame(cx),
            Kind::Tapped(t) => {
                let (inner, tap) = &mut **t;
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(f))) => {
                        if let Some(d) = f.data_ref() {
                            tap.data(d);
                        }
                        // hyper may not poll again once the body says it has ended.
                        if inner.is_end_stream() {
                            tap.send();
                        }
                    }
                    Poll::Ready(None) => tap.send(),
                    _ => {}
                }
                polled
            }
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    let n = d.len();
                    this.count(n);
                } else if let Some(t) = frame.trailers_ref()
                    && let Some(log) = this.log.as_mut()
                    && log.grpc
                {
                    log.grpc_status = crate::l7::grpc::status_of(t);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(log) = this.log.as_mut()
                    && log.grpc
                {
                    // A gRPC client gets a status, not a bare stream reset (gRPC over
                    // HTTP/2, "Errors"): end the call with trailers saying what happened.
                    let (code, trailers) = crate::l7::grpc::reset_trailers(&**e);
                    log.grpc_status = Some(code);
                    this.kind = Kind::Full(None);
                    this.finish(Some(Reason::UpstreamReset));
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                this.finish(Some(Reason::UpstreamReset))
            }
            Poll::Ready(None) => this.finish(None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream(inner) => inner.is_end_stream(),
            Kind::Tapped(t) => t.0.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream(inner) => inner.size_hint(),
            Kind::Tapped(t) => t.0.size_hint(),
        }
    }
}
