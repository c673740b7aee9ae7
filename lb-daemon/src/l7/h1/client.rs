//! HTTP/1.1 client codec on one pooled upstream connection ([`crate::l7::h1::pool`]), run by the task
//! that serves the downstream request: no per-request task hand-off.
//!
//! [`send`] writes the request head (and streams the body, watching for an early answer),
//! then reads and parses the response head. The response body is an [`H1Body`], read from the
//! socket when the downstream side polls it; read to its end, it returns the connection to the
//! pool, dropped early it closes it.
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::l7::body::{BodyError, RequestBody};
use crate::l7::h1::pool::{H1Conn, H1Pool, READ_BUF};

/// Largest response head accepted (nginx's `proxy_buffer_size` is 4-8 KiB; be generous).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one response head.
const MAX_HEADERS: usize = 128;
/// Largest trailer section of a chunked response (chunk-size lines are bounded as for
/// request bodies, by the shared decoder).
const MAX_TRAILER_BYTES: usize = 64 * 1024;
use crate::l7::h1::codec::{ChunkState, Decoded, Decoder, RawFields};
use crate::l7::headers::Forwarding;
/// Largest read of a response body. Each read is one downstream write, so this sets the
/// syscalls per MiB streamed (at least 4 reads + 4 writes at 256 KiB; 512 KiB would save
/// about two of each), and, with the frame still being written to a slow client, what one
/// response may hold: 2 × 256 KiB, about what hyper's client held (~400 KiB). Not larger, so
/// 10,000 slow downloads cannot pin 10 GiB.
const MAX_BODY_READ: usize = 256 * 1024;
/// Largest first read of a body of known length (before a full read shows more is pending).
const FIRST_BODY_READ: usize = 64 * 1024;
/// Request body chunks up to this size are copied next to their framing into one write.
const COPY_CHUNK: usize = 4096;

/// How an exchange with the upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    /// The socket failed.
    #[error("upstream i/o error")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection before a complete response head.
    #[error("upstream closed the connection before a complete response head")]
    Closed,
    /// The peer closed the connection in the middle of the response body.
    #[error("upstream closed the connection in the middle of the response body")]
    Truncated,
    /// The response head exceeded [`MAX_HEAD`].
    #[error("upstream response head exceeds {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// The response head did not parse.
    #[error("invalid upstream response head")]
    Parse(#[from] httparse::Error),
    /// The response was malformed in another way.
    #[error("invalid upstream response: {0}")]
    Invalid(&'static str),
    /// 101 Switching Protocols: lbd does not tunnel upgrades.
    #[error("upstream switched protocols (101), which lbd does not support")]
    Upgrade,
    /// The client's request body failed.
    #[error("request body failed")]
    Body(#[source] BodyError),
    /// The client's request body ended before its declared length.
    #[error("request body ended before its content-length")]
    BodyLength,
}

/// A failed [`send`], with whether any response byte had arrived.
#[derive(Debug)]
pub struct SendFailure {
    /// What failed.
    pub error: H1Error,
    /// Nothing came back from the upstream: on a reused connection the peer may have closed
    /// it just before the request went out, so an empty-bodied request may go out again.
    pub before_response: bool,
}

/// How the request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReqFraming {
    /// No body and no framing header.
    None,
    /// `content-length`.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
}

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the peer closes the connection.
    Close,
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    /// Status and version; the header map stays empty (the fields are in `raw`).
    parts: http::response::Parts,
    /// The header fields as received, less the hop-by-hop ones.
    raw: RawFields,
    framing: Framing,
    keep_alive: bool,
    /// The rest of the request body, when the answer came before it was all sent (boxed:
    /// rare, and it would double the size of every response body).
    upload: Option<Box<Upload>>,
}

/// Sends the request (`parts` as prepared by the proxy, `body`) on `conn` and reads the
/// response head. On success the caller turns the head into a response with [`Head::into_response`].
/// `fwd`: the forwarding headers, when they are not in `parts` already.
pub async fn send(
    conn: &mut H1Conn,
    parts: &http::request::Parts,
    fwd: Option<&Forwarding>,
    body: RequestBody,
) -> Result<Head, SendFailure> {
    conn.received = false;
    let head_req = parts.method == Method::HEAD;
    match exchange(conn, parts, fwd, body, head_req).await {
        Ok(h) => Ok(h),
        Err(error) => Err(SendFailure {
            error,
            before_response: !conn.received,
        }),
    }
}

async fn exchange(
    conn: &mut H1Conn,
    parts: &http::request::Parts,
    fwd: Option<&Forwarding>,
    body: RequestBody,
    head_req: bool,
) -> Result<Head, H1Error> {
    let framing = request_framing(&parts.method, &body);
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let authority = parts.uri.authority().map(http::uri::Authority::as_str);
    write_head(
        &mut conn.wbuf,
        &parts.method,
        pq,
        authority,
        &parts.headers,
        fwd,
        framing,
    );
    if framing == ReqFraming::None {
        conn.io.write_all(&conn.wbuf).await?;
        // A TLS session may keep what the socket did not take; cleartext flushes at once.
        conn.io.flush().await?;
        return read_head(conn, head_req).await;
    }
    let mut upload = Upload {
        body,
        framing,
        sent: 0,
        line: [0; 18],
        line_at: 0,
        line_end: 0,
        data: Bytes::new(),
        tail: b"",
        ended: false,
        broken: None,
    };
    // A body that is already here (the common small POST) goes out with the head in one write.
    if let Poll::Ready(first) =
        poll_fn(|cx| Poll::Ready(Pin::new(&mut upload.body).poll_frame(cx))).await
    {
        match first {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    upload.sent += data.len() as u64;
                    if data.len() <= COPY_CHUNK {
                        encode_data(&mut conn.wbuf, &data, framing);
                    } else {
                        upload.stage(data);
                    }
                }
                if upload.data.is_empty() && upload.body.is_end_stream() {
                    upload.end()?;
                    conn.wbuf.extend_from_slice(upload.tail);
                    upload.tail = b"";
                }
            }
            Some(Err(e)) => return Err(H1Error::Body(e)),
            None => {
                upload.end()?;
                conn.wbuf.extend_from_slice(upload.tail);
                upload.tail = b"";
            }
        }
    }
    conn.io.write_all(&conn.wbuf).await?;
    conn.io.flush().await?;
    if upload.finished() {
        return read_head(conn, head_req).await;
    }
    // Send the rest while watching for the answer: a backend may answer before it has read
    // the whole body (an early 413 or 401, or an echo that streams its answer back).
    let mut head = poll_fn(|cx| poll_head_uploading(conn, &mut upload, head_req, cx)).await?;
    if !upload.finished() {
        head.upload = Some(Box::new(upload));
    }
    Ok(head)
}

/// Pushes the upload as far as it goes, then reads towards the response head.
fn poll_head_uploading(
    conn: &mut H1Conn,
    upload: &mut Upload,
    head_req: bool,
    cx: &mut Context<'_>,
) -> Poll<Result<Head, H1Error>> {
    if let Poll::Ready(Err(e)) = upload.poll(&mut conn.io, cx) {
        return Poll::Ready(Err(e));
    }
    loop {
        if !conn.rbuf.is_empty() {
            if let Some(head) = parse_head(&mut conn.rbuf, &mut conn.spans, head_req)? {
                return Poll::Ready(Ok(head));
            }
            if conn.rbuf.len() >= MAX_HEAD {
                return Poll::Ready(Err(H1Error::HeadTooLarge));
            }
        }
        if conn.rbuf.capacity() - conn.rbuf.len() < 1024 {
            conn.rbuf.reserve(READ_BUF);
        }
        let read = std::pin::pin!(conn.io.read_buf(&mut conn.rbuf));
        match ready!(read.poll(cx)) {
            Ok(0) => {
                // A write that failed first says more (the peer reset the connection).
                let e = upload.broken.take().map_or(H1Error::Closed, H1Error::Io);
                return Poll::Ready(Err(e));
            }
            Ok(_) => conn.received = true,
            Err(e) => return Poll::Ready(Err(H1Error::Io(e))),
        }
    }
}

/// The part of a request body still to be sent, resumable from any point.
#[derive(Debug)]
struct Upload {
    body: RequestBody,
    framing: ReqFraming,
    /// Body bytes taken from `body`.
    sent: u64,
    /// Chunk-size line of the staged chunk, `line[line_at..line_end]` still to write.
    line: [u8; 18],
    line_at: u8,
    line_end: u8,
    /// Staged data still to write.
    data: Bytes,
    /// CRLF after a chunk, or the last chunk, still to write.
    tail: &'static [u8],
    /// `body` is exhausted (what remains is staged).
    ended: bool,
    /// Writing failed: nothing more is sent; the response may still be read.
    broken: Option<std::io::Error>,
}

impl Upload {
    fn finished(&self) -> bool {
        self.ended && !self.pending()
    }

    fn pending(&self) -> bool {
        self.line_at < self.line_end || !self.data.is_empty() || !self.tail.is_empty()
    }

    /// Stages one data frame with its framing.
    fn stage(&mut self, data: Bytes) {
        if self.framing == ReqFraming::Chunked {
            let mut n = data.len() as u64;
            let mut i = 16;
            self.line[16] = b'\r';
            self.line[17] = b'\n';
            loop {
                i -= 1;
                self.line[i] = b"0123456789abcdef"[(n & 0xf) as usize];
                n >>= 4;
                if n == 0 {
                    break;
                }
            }
            self.line_at = i as u8;
            self.line_end = 18;
            self.tail = b"\r\n";
        }
        self.data = data;
    }

    /// The body ended: stages the last chunk and checks a declared length was met.
    fn end(&mut self) -> Result<(), H1Error> {
        self.ended = true;
        match self.framing {
            ReqFraming::Chunked => self.tail = b"0\r\n\r\n",
            ReqFraming::Length(n) if n != self.sent => return Err(H1Error::BodyLength),
            _ => {}
        }
        Ok(())
    }

    /// Writes staged bytes and pulls further frames until the body is sent (`Ready(Ok)`), the
    /// socket or the client's body is not ready (`Pending`), or the client's body fails.
    /// A write error stops the upload quietly (it is kept in `broken`): the peer may have
    /// answered and closed, and that answer is still worth reading.
    fn poll(
        &mut self,
        io: &mut crate::l7::tls::upstream::UpstreamIo,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), H1Error>> {
        use tokio::io::AsyncWrite as _;
        if self.broken.is_some() {
            return Poll::Pending;
        }
        loop {
            while self.pending() {
                let line = &self.line[self.line_at as usize..self.line_end as usize];
                let slices = [
                    std::io::IoSlice::new(line),
                    std::io::IoSlice::new(&self.data),
                    std::io::IoSlice::new(self.tail),
                ];
                let mut n = match ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices)) {
                    Ok(0) => {
                        self.broken = Some(std::io::ErrorKind::WriteZero.into());
                        return Poll::Pending;
                    }
                    Ok(n) => n,
                    Err(e) => {
                        self.broken = Some(e);
                        return Poll::Pending;
                    }
                };
                let from_line = n.min(line.len());
                self.line_at += from_line as u8;
                n -= from_line;
                let from_data = n.min(self.data.len());
                self.data.advance(from_data);
                n -= from_data;
                self.tail = &self.tail[n.min(self.tail.len())..];
            }
            if self.ended {
                return match ready!(Pin::new(&mut *io).poll_flush(cx)) {
                    Ok(()) => Poll::Ready(Ok(())),
                    Err(e) => {
                        self.broken = Some(e);
                        Poll::Pending
                    }
                };
            }
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(f) => f,
                Poll::Pending => {
                    // What a TLS session still holds goes out while the client's body waits.
                    if let Poll::Ready(Err(e)) = Pin::new(&mut *io).poll_flush(cx) {
                        self.broken = Some(e);
                    }
                    return Poll::Pending;
                }
            };
            match frame {
                Some(Ok(frame)) => {
                    // Trailers are not forwarded over HTTP/1.1.
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        self.sent += data.len() as u64;
                        self.stage(data);
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(H1Error::Body(e))),
                None => self.end()?,
            }
        }
    }
}

/// Reads until a complete final response head is in the buffer.
async fn read_head(conn: &mut H1Conn, head_req: bool) -> Result<Head, H1Error> {
    loop {
        if !conn.rbuf.is_empty() {
            if let Some(head) = parse_head(&mut conn.rbuf, &mut conn.spans, head_req)? {
                return Ok(head);
            }
            if conn.rbuf.len() >= MAX_HEAD {
                return Err(H1Error::HeadTooLarge);
            }
        }
        if conn.rbuf.capacity() - conn.rbuf.len() < 1024 {
            conn.rbuf.reserve(READ_BUF);
        }
        if conn.io.read_buf(&mut conn.rbuf).await? == 0 {
            return Err(H1Error::Closed);
        }
        conn.received = true;
    }
}

/// The request's framing from its body: its exact size when known, chunked otherwise.
fn request_framing(method: &Method, body: &RequestBody) -> ReqFraming {
    if body.is_end_stream() {
        // Like hyper's client: methods that normally carry a body say it is empty, since some
        // servers refuse a POST without a length (411).
        return if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
            ReqFraming::Length(0)
        } else {
            ReqFraming::None
        };
    }
    match body.size_hint().exact() {
        Some(n) => ReqFraming::Length(n),
        None => ReqFraming::Chunked,
    }
}

/// Writes the request head into `buf` (cleared first): the headers as given, except the
/// framing ones, which follow from `framing`, and exactly one `Host` (RFC 9112 §3.2): the
/// first given, else `authority` (the endpoint's address, as nginx's default `$proxy_host`),
/// which covers HTTP/1.0 clients that sent none. With `fwd`, the forwarding headers are
/// written from it, in place of the request's own.
fn write_head(
    buf: &mut Vec<u8>,
    method: &Method,
    pq: &str,
    authority: Option<&str>,
    headers: &HeaderMap,
    fwd: Option<&Forwarding>,
    framing: ReqFraming,
) {
    buf.clear();
    buf.extend_from_slice(method.as_str().as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(pq.as_bytes());
    buf.extend_from_slice(b" HTTP/1.1\r\n");
    let mut host = false;
    let mut forwarded = false;
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        if fwd.is_some() && Forwarding::replaces(name) {
            forwarded = true;
            continue;
        }
        if name == header::HOST {
            if host {
                continue;
            }
            host = true;
        }
        buf.extend_from_slice(name.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    if let Some(f) = fwd {
        f.write(buf, headers, forwarded);
    }
    if !host && let Some(a) = authority {
        buf.extend_from_slice(b"host: ");
        buf.extend_from_slice(a.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    match framing {
        ReqFraming::None => {}
        ReqFraming::Length(n) => {
            buf.extend_from_slice(b"content-length: ");
            push_decimal(buf, n);
            buf.extend_from_slice(b"\r\n");
        }
        ReqFraming::Chunked => buf.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    buf.extend_from_slice(b"\r\n");
}

/// Appends one body chunk with its framing.
fn encode_data(buf: &mut Vec<u8>, data: &[u8], framing: ReqFraming) {
    if framing == ReqFraming::Chunked {
        crate::l7::h1::codec::push_hex(buf, data.len() as u64);
        buf.extend_from_slice(b"\r\n");
        buf.extend_from_slice(data);
        buf.extend_from_slice(b"\r\n");
    } else {
        buf.extend_from_slice(data);
    }
}

fn push_decimal(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

/// Parses a final response head off the front of `rbuf`, skipping interim (1xx) responses.
/// `None` while the head is incomplete.
/// `spans` is scratch space kept by the connection (header positions, found while the parser
/// borrows `rbuf`).
fn parse_head(
    rbuf: &mut BytesMut,
    spans: &mut Vec<[usize; 4]>,
    head_req: bool,
) -> Result<Option<Head>, H1Error> {
    loop {
        spans.clear();
        let (len, code, minor) =
            {
                // Uninitialised: an initialised array of MAX_HEADERS headers costs a 4 KiB memset
                // per response.
                let mut headers =
                    [std::mem::MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
                let mut res = httparse::Response::new(&mut []);
                let len = match httparse::ParserConfig::default()
                    .parse_response_with_uninit_headers(&mut res, rbuf, &mut headers)?
                {
                    httparse::Status::Complete(len) => len,
                    httparse::Status::Partial => return Ok(None),
                };
                let code = res.code.unwrap_or(0);
                let minor = res.version.unwrap_or(1);
                let base = rbuf.as_ptr() as usize;
                for h in res.headers.iter() {
                    let name = h.name.as_ptr() as usize - base;
                    let value = h.value.as_ptr() as usize - base;
                    spans.push([name, name + h.name.len(), value, value + h.value.len()]);
                }
                (len, code, minor)
            };
        if (100..200).contains(&code) {
            if code == 101 {
                return Err(H1Error::Upgrade);
            }
            // 100 Continue, 103 Early Hints: the final answer follows.
            rbuf.advance(len);
            continue;
        }
        let status = StatusCode::from_u16(code).map_err(|_| H1Error::Invalid("status code"))?;
        let raw = rbuf.split_to(len).freeze();
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut transfer_encoding = false;
        let mut close = false;
        let mut keep_alive = false;
        // Hop-by-hop fields (RFC 9110 §7.6.1) are left out here, as the fields are read,
        // instead of being removed from a map later; those `Connection` names are known only
        // at its end, and need a second pass when there are any.
        let mut connection_names = false;
        let mut te_trailers = false;
        let mut kept = Vec::with_capacity(spans.len());
        for &[ns, ne, vs, ve] in spans.iter() {
            let (name, value_bytes) = (&raw[ns..ne], &raw[vs..ve]);
            // httparse checked the bytes of both (token characters; no control characters
            // in values), as `HeaderName` and `HeaderValue` would.
            if name.is_empty() {
                return Err(H1Error::Invalid("header name"));
            }
            match hop_field(name) {
                Hop::No => {}
                Hop::ContentLength => {
                    let n = parse_length(value_bytes)?;
                    if length.is_some_and(|l| l != n) {
                        return Err(H1Error::Invalid("conflicting content-length"));
                    }
                    length = Some(n);
                }
                Hop::TransferEncoding => {
                    transfer_encoding = true;
                    // Chunked must be the final coding (RFC 9112 §6.3 item 4).
                    chunked = last_token(value_bytes).eq_ignore_ascii_case(b"chunked");
                    continue;
                }
                Hop::Connection => {
                    for token in value_bytes.split(|&b| b == b',') {
                        let token = token.trim_ascii();
                        let c = token.eq_ignore_ascii_case(b"close");
                        let k = token.eq_ignore_ascii_case(b"keep-alive");
                        close |= c;
                        keep_alive |= k;
                        connection_names |= !c && !k && !token.is_empty();
                    }
                    continue;
                }
                // `TE: trailers` goes on (gRPC needs it end to end), once.
                Hop::Te if !te_trailers && value_bytes.eq_ignore_ascii_case(b"trailers") => {
                    te_trailers = true;
                }
                Hop::Te | Hop::Other => continue,
            }
            kept.push([ns as u32, ne as u32, vs as u32, ve as u32]);
        }
        if connection_names {
            kept.retain(|&[ns, ne, _, _]| {
                !named_by_connection(&raw, spans, &raw[ns as usize..ne as usize])
            });
        }
        let framing =
            if head_req || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
                Framing::Empty
            } else if transfer_encoding {
                if chunked {
                    Framing::Chunked
                } else {
                    Framing::Close
                }
            } else {
                match length {
                    Some(0) => Framing::Empty,
                    Some(n) => Framing::Length(n),
                    None => Framing::Close,
                }
            };
        let keep_alive = framing != Framing::Close
            // Both framings at once smells of request smuggling: use it once only.
            && !(transfer_encoding && length.is_some())
            && if minor == 0 { keep_alive && !close } else { !close };
        let mut resp = http::Response::new(());
        *resp.status_mut() = status;
        *resp.version_mut() = if minor == 0 {
            http::Version::HTTP_10
        } else {
            http::Version::HTTP_11
        };
        let (parts, ()) = resp.into_parts();
        return Ok(Some(Head {
            parts,
            raw: RawFields::new(raw, kept),
            framing,
            keep_alive,
            upload: None,
        }));
    }
}

/// Which hop-by-hop (or framing) field a name is, compared without regard to case.
enum Hop {
    /// An end-to-end field.
    No,
    /// `Content-Length`: end to end, but it frames the body.
    ContentLength,
    TransferEncoding,
    Connection,
    Te,
    /// `Keep-Alive`, `Proxy-Connection`, `Proxy-Authenticate`, `Proxy-Authorization`,
    /// `Trailer`, `Upgrade` (lbd does not tunnel upgrades).
    Other,
}

fn hop_field(name: &[u8]) -> Hop {
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    // The length first: most names are ruled out without comparing a byte.
    match name.len() {
        2 if is(b"te") => Hop::Te,
        7 if is(b"trailer") || is(b"upgrade") => Hop::Other,
        10 if is(b"connection") => Hop::Connection,
        10 if is(b"keep-alive") => Hop::Other,
        14 if is(b"content-length") => Hop::ContentLength,
        16 if is(b"proxy-connection") => Hop::Other,
        17 if is(b"transfer-encoding") => Hop::TransferEncoding,
        18 if is(b"proxy-authenticate") => Hop::Other,
        19 if is(b"proxy-authorization") => Hop::Other,
        _ => Hop::No,
    }
}

/// Whether a `Connection` field of the head (`raw` at `spans`) names `name` as hop-by-hop.
/// `Host` and `Content-Length` cannot be made hop-by-hop this way, and `TE: trailers` stays.
fn named_by_connection(raw: &[u8], spans: &[[usize; 4]], name: &[u8]) -> bool {
    if name.eq_ignore_ascii_case(b"content-length")
        || name.eq_ignore_ascii_case(b"host")
        || name.eq_ignore_ascii_case(b"te")
    {
        return false;
    }
    spans.iter().any(|&[ns, ne, vs, ve]| {
        let value = &raw[vs..ve];
        raw[ns..ne].eq_ignore_ascii_case(b"connection")
            // A value that is not visible ASCII names nothing (as `HeaderValue::to_str`).
            && value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
            && value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(name))
    })
}

fn parse_length(v: &[u8]) -> Result<u64, H1Error> {
    // A list of equal values ("5, 5") is allowed by RFC 9110 §8.6; anything else is not.
    let mut value = None;
    for part in v.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err(H1Error::Invalid("content-length"));
        }
        let n = part
            .iter()
            .fold(0u64, |acc, &d| acc * 10 + u64::from(d - b'0'));
        if value.is_some_and(|v| v != n) {
            return Err(H1Error::Invalid("conflicting content-length"));
        }
        value = Some(n);
    }
    value.ok_or(H1Error::Invalid("content-length"))
}

fn last_token(v: &[u8]) -> &[u8] {
    v.rsplit(|&b| b == b',').next().unwrap_or(v).trim_ascii()
}

impl Head {
    /// The response status.
    pub fn status(&self) -> StatusCode {
        self.parts.status
    }

    /// The response with its body read from `conn`; a body that is already complete (empty,
    /// or all in the buffer) returns the connection to `pool` right away.
    pub fn into_response(self, conn: Box<H1Conn>, pool: &Arc<H1Pool>) -> http::Response<H1Body> {
        let state = match self.framing {
            Framing::Empty | Framing::Length(0) => State::Framed(Decoder::Done),
            Framing::Length(n) => State::Framed(Decoder::Length(n)),
            Framing::Chunked => State::Framed(Decoder::Chunked(ChunkState::Size)),
            Framing::Close => State::Close,
        };
        // A body of known length starts with a read of its size up to [`FIRST_BODY_READ`]; a
        // read that fills its buffer grows the next one eightfold. Doubling from 8 KiB cost a
        // read and a downstream write per step (5 of each for a 1 MiB body) while the data was
        // all there; starting at the largest size would hold half a MiB for an upstream that
        // trickles.
        let read_size = match state {
            State::Framed(Decoder::Length(n)) => {
                let left = n.saturating_sub(conn.rbuf.len() as u64);
                usize::try_from(left)
                    .map_or(FIRST_BODY_READ, |l| l.clamp(READ_BUF, FIRST_BODY_READ))
            }
            _ => READ_BUF,
        };
        let mut body = H1Body {
            conn: Some(conn),
            pool: Arc::clone(pool),
            raw: Some(self.raw),
            state,
            keep_alive: self.keep_alive,
            ready: None,
            read_size,
            upload: self.upload,
            trailers: None,
        };
        body.prefetch();
        http::Response::from_parts(self.parts, body)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A `content-length` or chunked body, decoded by the decoder request bodies use too.
    Framed(Decoder),
    /// Until EOF.
    Close,
    Done,
}

/// An upstream HTTP/1.1 response body, read from the connection as it is polled.
#[derive(Debug)]
pub struct H1Body {
    /// Until the body ends: then returned to the pool, or dropped.
    conn: Option<Box<H1Conn>>,
    pool: Arc<H1Pool>,
    /// The response's header fields, until the response head is written or a header map is
    /// made of them ([`H1Body::take_fields`]).
    raw: Option<RawFields>,
    state: State,
    keep_alive: bool,
    /// Data already taken out of the buffer (the whole body, when it came with the head).
    ready: Option<Bytes>,
    /// Bytes to make room for before each read of the body (grows while reads fill it).
    read_size: usize,
    /// The rest of the request body, sent as the response is read (full duplex).
    upload: Option<Box<Upload>>,
    /// A chunked body's trailer fields, read with the last of the body and not yet polled
    /// (boxed: rare, and the body is moved with every response).
    trailers: Option<Box<HeaderMap>>,
}

/// What the buffered bytes allow without reading.
enum Step {
    Data(Bytes),
    /// The trailer section of a chunked body (its end).
    Trailers(HeaderMap),
    Done,
    NeedMore,
}

impl H1Body {
    /// The response's header fields (hop-by-hop ones left out), once.
    pub fn take_fields(&mut self) -> Option<RawFields> {
        self.raw.take()
    }

    /// The response's header fields while still held as bytes.
    pub fn fields_mut(&mut self) -> Option<&mut RawFields> {
        self.raw.as_mut()
    }

    /// If the whole body is already buffered, takes it out and releases the connection.
    fn prefetch(&mut self) {
        match self.step(true) {
            Ok(Step::Data(d)) => {
                self.ready = Some(d);
                self.settle();
            }
            Ok(Step::Trailers(t)) => self.keep_trailers(t),
            Ok(Step::Done) => self.release(),
            Ok(Step::NeedMore) | Err(_) => {}
        }
    }

    /// Advances over framing in the buffer: the next data, the end, or a need for more bytes.
    /// With `take_data` false it stops before any data (reporting `NeedMore`).
    fn step(&mut self, take_data: bool) -> Result<Step, H1Error> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Step::Done);
        };
        let buf = &mut conn.rbuf;
        match &mut self.state {
            State::Done => Ok(Step::Done),
            State::Close => {
                if buf.is_empty() || !take_data {
                    return Ok(Step::NeedMore);
                }
                Ok(Step::Data(buf.split().freeze()))
            }
            State::Framed(dec) => {
                // The same decoder and strict grammar as for request bodies: a backend's
                // lenient chunk lines are refused (502), not reinterpreted.
                let decoded = if take_data {
                    dec.decode(buf, MAX_TRAILER_BYTES)
                } else {
                    dec.skip_framing(buf, MAX_TRAILER_BYTES)
                };
                match decoded.map_err(H1Error::Invalid)? {
                    Decoded::Data(d) => Ok(Step::Data(d)),
                    Decoded::Trailers(t) => {
                        self.state = State::Done;
                        Ok(Step::Trailers(t))
                    }
                    Decoded::End => {
                        self.state = State::Done;
                        Ok(Step::Done)
                    }
                    Decoded::NeedMore => Ok(Step::NeedMore),
                }
            }
        }
    }

    /// After data was handed out: if only framing remains and it is buffered, the body is
    /// complete, so the connection goes back to the pool before the last frame is even sent.
    fn settle(&mut self) {
        match self.step(false) {
            Ok(Step::Done) => self.release(),
            Ok(Step::Trailers(t)) => self.keep_trailers(t),
            Ok(Step::Data(_) | Step::NeedMore) => {}
            Err(_) => {
                // Framing error after the data: the next poll reports it.
            }
        }
    }

    /// The body ended with trailers found without a poll asking for them: kept for the next
    /// poll, and the connection released now.
    fn keep_trailers(&mut self, t: HeaderMap) {
        self.trailers = Some(Box::new(t));
        self.release();
    }

    /// The body is complete: the connection goes back to the pool if it can carry another
    /// request, else it is closed.
    fn release(&mut self) {
        self.state = State::Done;
        // An upload still under way (the answer came early) leaves the connection mid-request.
        let upload = self.upload.take();
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && upload.is_none_or(|u| u.finished())
        {
            self.pool.checkin(conn);
        }
    }

    fn fail(&mut self, e: H1Error) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        self.state = State::Done;
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = self.get_mut();
        if let Some(data) = this.ready.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(t) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(*t))));
        }
        if let (Some(upload), Some(conn)) = (this.upload.as_mut(), this.conn.as_mut()) {
            match upload.poll(&mut conn.io, cx) {
                Poll::Ready(Ok(())) => this.upload = None,
                Poll::Ready(Err(e)) => return this.fail(e),
                Poll::Pending => {}
            }
        }
        loop {
            match this.step(true) {
                Ok(Step::Data(data)) => {
                    this.settle();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Step::Trailers(t)) => {
                    this.release();
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                Ok(Step::Done) => {
                    this.release();
                    return Poll::Ready(None);
                }
                Ok(Step::NeedMore) => {}
                Err(e) => return this.fail(e),
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if conn.rbuf.capacity() - conn.rbuf.len() < this.read_size {
                conn.rbuf.reserve(this.read_size);
            }
            let spare = conn.rbuf.capacity() - conn.rbuf.len();
            // The read future holds no state of its own: polled once here and dropped.
            let read = std::pin::pin!(conn.io.read_buf(&mut conn.rbuf));
            match ready!(read.poll(cx)) {
                Ok(0) if this.state == State::Close => {
                    // Close-delimited: EOF is the end; the connection is spent.
                    this.state = State::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(H1Error::Truncated),
                Ok(n) => {
                    // A read that filled the buffer: a big body is streaming, read more at a
                    // time (fewer reads and frames), like hyper's adaptive read buffer.
                    if n >= spare && this.read_size < MAX_BODY_READ {
                        this.read_size = (this.read_size * 8).min(MAX_BODY_READ);
                    }
                }
                Err(e) => return this.fail(H1Error::Io(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_none() && self.trailers.is_none() && self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        let ready = self.ready.as_ref().map_or(0, |d| d.len() as u64);
        match self.state {
            State::Done => SizeHint::with_exact(ready),
            State::Framed(Decoder::Done) => SizeHint::with_exact(ready),
            State::Framed(Decoder::Length(n)) => SizeHint::with_exact(ready + n),
            _ => {
                let mut h = SizeHint::new();
                h.set_lower(ready);
                h
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderValue;

    fn head(raw: &[u8], head_req: bool) -> Result<Option<Head>, H1Error> {
        let mut buf = BytesMut::from(raw);
        parse_head(&mut buf, &mut Vec::new(), head_req)
    }

    #[test]
    fn request_head_is_written_with_framing() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("example.com"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        headers.append(header::HOST, HeaderValue::from_static("second.example"));
        let mut buf = Vec::new();
        write_head(
            &mut buf,
            &Method::POST,
            "/p?q=1",
            Some("10.0.0.1:80"),
            &headers,
            None,
            ReqFraming::Length(12345),
        );
        assert_eq!(
            std::str::from_utf8(&buf).expect("utf8"),
            "POST /p?q=1 HTTP/1.1\r\nhost: example.com\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 12345\r\n\r\n"
        );
        write_head(
            &mut buf,
            &Method::GET,
            "/",
            None,
            &HeaderMap::new(),
            None,
            ReqFraming::Chunked,
        );
        assert_eq!(
            &buf[..],
            b"GET / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        // No Host from the client (HTTP/1.0): the endpoint's authority stands in.
        write_head(
            &mut buf,
            &Method::GET,
            "/",
            Some("10.0.0.1:80"),
            &HeaderMap::new(),
            None,
            ReqFraming::None,
        );
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\nhost: 10.0.0.1:80\r\n\r\n");
        let mut v = Vec::new();
        crate::l7::h1::codec::push_hex(&mut v, 0x1f40);
        push_decimal(&mut v, 0);
        assert_eq!(&v[..], b"1f400");
    }

    #[test]
    fn partial_head_waits_and_1xx_is_skipped() {
        assert!(
            head(b"HTTP/1.1 200 OK\r\nContent-Le", false)
                .expect("ok")
                .is_none()
        );
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nhi"[..],
        );
        let h = parse_head(&mut buf, &mut Vec::new(), false)
            .expect("ok")
            .expect("complete");
        assert_eq!(h.status(), StatusCode::CREATED);
        assert_eq!(h.framing, Framing::Length(2));
        assert!(h.keep_alive);
        assert_eq!(&buf[..], b"hi");
        let fields: Vec<_> = h.raw.iter().collect();
        assert_eq!(fields, [(&b"Content-Length"[..], &b"2"[..])]);
    }

    #[test]
    fn kept_fields_are_written_in_lower_case_without_hop_by_hop_ones() {
        let h = head(
            b"HTTP/1.1 200 OK\r\nContent-Type: a\r\nConnection: X-Hop\r\nX-Sp:   v  \r\n\
              X-E:\r\nX-Hop: 1\r\nx-l: z\nTE: trailers\r\nTE: gzip\r\nContent-Length: 5\r\n\
              Date: d\r\n\r\n",
            false,
        )
        .expect("ok")
        .expect("complete");
        let mut out = Vec::new();
        assert!(h.raw.write(&mut out, true));
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            "content-type: a\r\nx-sp: v\r\nx-e: \r\nx-l: z\r\nte: trailers\r\n\
             content-length: 5\r\ndate: d\r\n"
        );
        let mut out = Vec::new();
        h.raw.write(&mut out, false);
        assert!(
            !String::from_utf8(out)
                .expect("utf8")
                .contains("content-length")
        );
        let map = h.raw.into_header_map(HeaderMap::new());
        assert_eq!(map.len(), 7);
        assert_eq!(map["x-sp"], "v");
        assert!(map.get("x-hop").is_none());
    }

    #[test]
    fn framing_follows_rfc9112() {
        let f = |raw: &[u8], head_req| head(raw, head_req).expect("ok").expect("complete");
        let h = f(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
        );
        assert_eq!(h.framing, Framing::Chunked);
        let h = f(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false);
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
        let h = f(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", true);
        assert_eq!(h.framing, Framing::Empty);
        let h = f(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
            false,
        );
        assert_eq!(h.framing, Framing::Empty);
        let h = f(b"HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
        let h = f(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n",
            false,
        );
        assert!(!h.keep_alive);
        let h = f(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false);
        assert!(!h.keep_alive);
        assert_eq!(h.parts.version, http::Version::HTTP_10);
        let h = f(
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: Keep-Alive\r\n\r\n",
            false,
        );
        assert!(h.keep_alive);
        let h = f(b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n", false);
        assert_eq!(h.framing, Framing::Length(3));
    }

    #[test]
    fn bad_heads_are_errors() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTP/1.1 200 OK\r\n\r\n",
        ] {
            assert!(
                head(raw, false).is_err(),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }
}
