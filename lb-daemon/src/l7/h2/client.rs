//! One HTTP/2 call on an upstream connection, driven on `h2` directly: the request head goes
//! out, its body is pumped into the stream by the caller's own future while it waits for the
//! response head, and the response body is read from the stream as the client takes it.
//!
//! hyper's HTTP/2 client spawned two tasks per call (the response future and the body pipe)
//! and passed the request and the response through channels to and from its dispatch task.
//! Here a call with no body, or one whose body has been sent when the answer arrives (every
//! unary gRPC call), runs wholly inside the request's own task; only a body still flowing
//! after the response head (a client- or bidi-streaming call) gets a task of its own.
use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::Method;
use http::header::CONTENT_LENGTH;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

use crate::l7::body::{BodyError, RequestBody};
use crate::l7::h2::fields;
use crate::l7::h2::pool::BoxError;
use crate::l7::h2::recv::{RecvBody, content_length};

/// How a call failed once its connection was chosen.
#[derive(Debug)]
pub enum CallError {
    /// The stream failed (reset, GOAWAY, connection lost) or could not be opened.
    Stream(h2::Error),
    /// The client's request body failed before the response head (the stream was reset).
    Body(BodyError),
}

/// Sends `head` (and `body`) on `sender`'s connection and returns the response head once it
/// has arrived, its body to be read from the stream.
pub async fn call(
    sender: &mut SendRequest<Bytes>,
    mut head: http::request::Parts,
    body: RequestBody,
) -> Result<http::Response<H2Body>, CallError> {
    fields::strip_connection_fields(&mut head.headers, fields::Head::Request);
    if let Some(len) = body.size_hint().exact()
        && (len != 0 || has_payload_semantics(&head.method))
        && !head.headers.contains_key(CONTENT_LENGTH)
    {
        head.headers.insert(CONTENT_LENGTH, len.into());
    }
    // (CONNECT never gets here: the proxy refuses it, so no stream is a tunnel.)
    let end = body.is_end_stream();
    let (mut response, tx) = sender
        .send_request(http::Request::from_parts(head, ()), end)
        .map_err(CallError::Stream)?;
    if end {
        drop(tx);
        let resp = (&mut response).await.map_err(CallError::Stream)?;
        return Ok(with_body(resp, None));
    }
    let mut pump = Some(Pump::new(body, tx));
    let mut failed = None;
    let answer = poll_fn(|cx| {
        if let Some(p) = &mut pump
            && let Poll::Ready(r) = p.poll(cx)
        {
            if let Err(PumpError::Body(e)) = r {
                failed = Some(e);
            }
            pump = None;
        }
        Pin::new(&mut response).poll(cx)
    })
    .await;
    let resp = match (answer, failed) {
        (Ok(resp), _) => resp,
        // The stream was reset because the body failed: that is the cause to report.
        (Err(_), Some(e)) => return Err(CallError::Body(e)),
        (Err(e), None) => return Err(CallError::Stream(e)),
    };
    // The body is still flowing (a streaming call): it goes on in a task of its own, which
    // stops (resetting the stream) once nobody reads the response any more.
    let stop = pump.map(|mut pump| {
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut stopped = std::pin::pin!(stopped);
            poll_fn(|cx| {
                if stopped.as_mut().poll(cx).is_ready() {
                    pump.tx.send_reset(Reason::CANCEL);
                    return Poll::Ready(());
                }
                pump.poll(cx).map(|_| ())
            })
            .await;
        });
        stop
    });
    Ok(with_body(resp, stop))
}

fn with_body(
    resp: http::Response<RecvStream>,
    stop: Option<oneshot::Sender<()>>,
) -> http::Response<H2Body> {
    let (head, recv) = resp.into_parts();
    let body = RecvBody::new(recv, content_length(&head.headers));
    http::Response::from_parts(head, H2Body { body, _stop: stop })
}

/// Methods whose request body means something even when empty (hyper's rule for adding a
/// `content-length: 0`).
fn has_payload_semantics(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
    )
}

/// Why the request body pump stopped early.
enum PumpError {
    /// The client's body failed; the stream has been reset.
    Body(BodyError),
    /// The stream failed (the peer reset it, the connection went away).
    Stream,
}

/// Moves the request body into its stream as the peer's flow-control windows allow, then
/// ends the stream (with the body's trailers, if any). hyper's `PipeToSendStream` is the
/// model: one chunk at a time, capacity asked for only once a chunk is in hand.
struct Pump {
    body: RequestBody,
    tx: SendStream<Bytes>,
    /// A chunk taken from the body, waiting for send capacity (never the last one).
    held: Option<Bytes>,
}

impl Pump {
    fn new(body: RequestBody, tx: SendStream<Bytes>) -> Self {
        Pump {
            body,
            tx,
            held: None,
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PumpError>> {
        let polled = self.step(cx);
        // Registered while waiting for the body or for capacity, so a reset by the peer stops
        // the pump instead of leaving it waiting on the client.
        if polled.is_pending() && self.tx.poll_reset(cx).is_ready() {
            return Poll::Ready(Err(PumpError::Stream));
        }
        polled
    }

    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PumpError>> {
        loop {
            if self.held.is_some() {
                while self.tx.capacity() == 0 {
                    match ready!(self.tx.poll_capacity(cx)) {
                        Some(Ok(0)) => {}
                        Some(Ok(_)) => break,
                        Some(Err(_)) | None => return Poll::Ready(Err(PumpError::Stream)),
                    }
                }
                if let Some(chunk) = self.held.take() {
                    self.send(chunk, false)?;
                }
                continue;
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(chunk) => {
                        let last = self.body.is_end_stream();
                        if last || chunk.is_empty() {
                            // The last chunk goes to h2 at once: h2 keeps what the peer's
                            // window does not take yet, as holding it here would, and a
                            // unary call's only message needs no capacity round trip.
                            self.send(chunk, last)?;
                            if last {
                                return Poll::Ready(Ok(()));
                            }
                            continue;
                        }
                        // A claim of one byte, not the chunk's length: h2 raises it to what
                        // is buffered in `send_data`, and a large claim per waiting stream
                        // would pin connection window that other streams could use.
                        self.tx.reserve_capacity(1);
                        self.held = Some(chunk);
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.tx.reserve_capacity(0);
                            return Poll::Ready(
                                self.tx
                                    .send_trailers(trailers)
                                    .map_err(|_| PumpError::Stream),
                            );
                        }
                    }
                },
                Some(Err(e)) => {
                    self.tx.send_reset(Reason::CANCEL);
                    return Poll::Ready(Err(PumpError::Body(e)));
                }
                None => return Poll::Ready(self.send(Bytes::new(), true)),
            }
        }
    }

    fn send(&mut self, chunk: Bytes, last: bool) -> Result<(), PumpError> {
        self.tx
            .send_data(chunk, last)
            .map_err(|_| PumpError::Stream)
    }
}

/// An upstream HTTP/2 response body: the stream's received half ([`RecvBody`]), and, for a
/// call whose request body is still being pumped by a task of its own, what stops that task.
///
/// Dropped before its end, the stream is reset (CANCEL) once no handle to it is left: h2
/// does that when the last of the stream's handles goes, and a request body still being
/// pumped is told to stop, so a cancelled call reaches the backend.
#[derive(Debug)]
pub struct H2Body {
    body: RecvBody,
    /// Dropped with the body: stops the pump of a request body still flowing.
    _stop: Option<oneshot::Sender<()>>,
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
