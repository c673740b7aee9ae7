//! HTTP/1.1 wire format for downstream connections (RFC 9112): the request head (parsed with
//! `httparse`, header values sliced out of the read buffer without copying), request body
//! framing (`Content-Length`, chunked with extensions and trailers) and the response head.
//!
//! Everything here is synchronous and works on buffers; the connection loop is `h1/server.rs`.
use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};

/// Most header fields accepted in one request (hyper's default; more → 431).
pub const MAX_HEADERS: usize = 100;

/// Longest chunk-size line (size plus extensions) accepted in a chunked body, either way.
pub const MAX_CHUNK_LINE: usize = 4096;

/// Why a request head was refused; each maps to the status the client gets before the
/// connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// Malformed syntax or contradictory framing (400).
    Bad(&'static str),
    /// Head larger than `max_header_bytes`, or too many fields (431).
    TooLarge,
}

impl HeadError {
    /// The status answered for this error.
    pub fn status(self) -> StatusCode {
        match self {
            HeadError::Bad(_) => StatusCode::BAD_REQUEST,
            HeadError::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }

    /// The `x-lbd-error` reason.
    pub fn reason(self) -> &'static str {
        match self {
            HeadError::Bad(r) => r,
            HeadError::TooLarge => "header_too_large",
        }
    }
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// `Content-Length: n` (n > 0).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A parsed request head.
#[derive(Debug)]
pub struct Head {
    /// Request method.
    pub method: Method,
    /// Request target.
    pub uri: Uri,
    /// HTTP/1.0 or HTTP/1.1.
    pub version: Version,
    /// Header fields, in order.
    pub headers: HeaderMap,
    /// Body framing.
    pub framing: Framing,
    /// Whether the client allows the connection to be reused after this exchange.
    pub keep_alive: bool,
    /// `Expect: 100-continue` (HTTP/1.1 only).
    pub expect_continue: bool,
    /// `TE: trailers`: the client accepts trailers in a chunked response.
    pub te_trailers: bool,
}

/// Parses a request head at the start of `buf`. `Ok(None)`: incomplete, read more (unless
/// `buf` already holds `max_bytes`, which is answered with [`HeadError::TooLarge`]). On
/// success the head's bytes are removed from `buf`; what follows (body, pipelined requests)
/// stays.
pub fn parse_head(buf: &mut BytesMut, max_bytes: usize) -> Result<Option<Head>, HeadError> {
    SPANS.with(|spans| {
        let spans = &mut spans.borrow_mut();
        match parse_head_with(buf, max_bytes, spans) {
            Ok(h) => Ok(h),
            Err(Failure::Head(e)) => Err(e),
            Err(Failure::NewerMinor(at)) => {
                buf[at] = b'1';
                match parse_head_with(buf, max_bytes, spans) {
                    Ok(h) => Ok(h),
                    Err(Failure::Head(e)) => Err(e),
                    Err(Failure::NewerMinor(_)) => Err(HeadError::Bad("bad_version")),
                }
            }
        }
    })
}

/// Why one parse of a head did not produce it.
enum Failure {
    /// The head is refused.
    Head(HeadError),
    /// The request line says HTTP/1.x with x above 1, its digit at this offset.
    NewerMinor(usize),
}

impl From<HeadError> for Failure {
    fn from(e: HeadError) -> Self {
        Failure::Head(e)
    }
}

thread_local! {
    /// Header positions found while the parser borrows the read buffer, kept per thread: a
    /// `MAX_HEADERS` array on the stack costs a 3 KiB memset per request.
    static SPANS: RefCell<Vec<Span>> = const { RefCell::new(Vec::new()) };
}

/// A header value httparse accepted, sharing the head's bytes: ~80 instructions a field less
/// than checking every byte again.
#[allow(
    unsafe_code,
    reason = "HeaderValue's unchecked constructor; httparse has checked the bytes"
)]
fn parsed_value(bytes: Bytes) -> HeaderValue {
    // SAFETY: httparse lets into a value exactly the bytes a HeaderValue may hold (HTAB, SP to
    // 0x7E, 0x80 to 0xFF: its HEADER_VALUE_MAP, http's `is_valid`). Debug builds check again
    // (the constructor validates there and panics), which every test runs.
    unsafe { HeaderValue::from_maybe_shared_unchecked(bytes) }
}

/// Name and value byte ranges of one header field in the head.
type Span = ((usize, usize), (usize, usize));

fn parse_head_with(
    buf: &mut BytesMut,
    max_bytes: usize,
    spans: &mut Vec<Span>,
) -> Result<Option<Head>, Failure> {
    // Offsets into `buf` first, so the head can be frozen once and sliced without copies.
    // Uninitialised: an initialised array of MAX_HEADERS fields costs a 2.4 KiB memset per
    // request.
    let mut fields = [std::mem::MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        buf,
        &mut fields,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= max_bytes {
                Err(HeadError::TooLarge.into())
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge.into()),
        Err(httparse::Error::Version) => {
            // httparse knows HTTP/1.0 and 1.1 only; a higher 1.x minor version is processed
            // as HTTP/1.1 (RFC 9110 §2.5): the caller rewrites its digit and parses again.
            return match newer_minor_version(buf)? {
                Some(at) => Err(Failure::NewerMinor(at)),
                None if buf.len() < max_bytes => Ok(None),
                None => Err(HeadError::TooLarge.into()),
            };
        }
        Err(_) => return Err(HeadError::Bad("bad_request").into()),
    };
    if len > max_bytes {
        return Err(HeadError::TooLarge.into());
    }
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        (start, start + s.len())
    };
    let method = req.method.map(|m| span(m.as_bytes()));
    let path = req.path.map(|p| span(p.as_bytes()));
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        Some(1) => Version::HTTP_11,
        _ => return Err(HeadError::Bad("bad_version").into()),
    };
    spans.clear();
    spans.extend(
        req.headers
            .iter()
            .map(|h| (span(h.name.as_bytes()), span(h.value))),
    );
    let n = spans.len();
    let (Some(method), Some(path)) = (method, path) else {
        return Err(HeadError::Bad("bad_request").into());
    };
    let head = buf.split_to(len).freeze();
    let method =
        Method::from_bytes(&head[method.0..method.1]).map_err(|_| HeadError::Bad("bad_method"))?;
    let target = &head[path.0..path.1];
    // httparse lets bytes above 0x7f through; a request-target is ASCII (RFC 3986), and a
    // backend decoding them otherwise would see another path than the one routed.
    if !target.is_ascii() {
        return Err(HeadError::Bad("bad_uri").into());
    }
    let uri = Uri::from_maybe_shared(head.slice(path.0..path.1))
        .map_err(|_| HeadError::Bad("bad_uri"))?;
    let absolute = target_form(&method, target, &uri)?;
    // Room for the forwarding headers the proxy adds, so that does not regrow the map.
    let mut headers = HeaderMap::with_capacity(n + 4);
    // The fields that decide framing and connection handling are noted as they go into the
    // map: six hashed lookups afterwards cost more than comparing each name here.
    let mut scan = Scan::default();
    for &((ns, ne), (vs, ve)) in spans.iter() {
        let name =
            HeaderName::from_bytes(&head[ns..ne]).map_err(|_| HeadError::Bad("bad_header"))?;
        let value = parsed_value(head.slice(vs..ve));
        scan.field(&name, value.as_bytes());
        headers.append(name, value);
    }
    scan.host(version)?;
    if absolute {
        // RFC 9112 §3.2.2: the target's authority is the one that counts; the received Host
        // is replaced, so routing and the upstream see the same host.
        let authority = uri.authority().map_or("", |a| a.as_str());
        let value = HeaderValue::from_str(authority).map_err(|_| HeadError::Bad("bad_target"))?;
        headers.insert(header::HOST, value);
    }
    let framing = scan.framing(version, &method)?;
    let keep_alive = match version {
        // Whatever follows a CONNECT head is tunnel data (or a body with no framing lbd
        // reads), never a request: after answering it the connection cannot be reused.
        _ if method == Method::CONNECT => false,
        Version::HTTP_11 => !scan.close,
        _ => scan.keep && !scan.close,
    };
    let expect_continue = version == Version::HTTP_11 && scan.expect_continue;
    let te_trailers = scan.te_trailers;
    Ok(Some(Head {
        method,
        uri,
        version,
        headers,
        framing,
        keep_alive,
        expect_continue,
        te_trailers,
    }))
}

/// Where the digit of a request line's `HTTP/1.x` version with x in 2..=9 is, so it can be
/// read as HTTP/1.1; `Ok(None)` while the request line is incomplete.
fn newer_minor_version(buf: &[u8]) -> Result<Option<usize>, HeadError> {
    // httparse skips empty lines before the request line; so does this.
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let Some(eol) = buf[start..].iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    let line = &buf[start..start + eol];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match line.len().checked_sub(9).map(|i| (i, &line[i..])) {
        Some((i, [b' ', b'H', b'T', b'T', b'P', b'/', b'1', b'.', b'2'..=b'9'])) => {
            Ok(Some(start + i + 8))
        }
        _ => Err(HeadError::Bad("bad_version")),
    }
}

/// Checks the request-target's form against the method (RFC 9112 §3.2): origin-form for
/// most, authority-form only for CONNECT, asterisk-form only for OPTIONS, absolute-form
/// (http or https, a valid host, no userinfo) for any method but CONNECT. Returns whether
/// the target is in absolute-form.
fn target_form(method: &Method, target: &[u8], uri: &Uri) -> Result<bool, HeadError> {
    const BAD: HeadError = HeadError::Bad("bad_target");
    let connect = *method == Method::CONNECT;
    if target.starts_with(b"/") {
        return if connect { Err(BAD) } else { Ok(false) };
    }
    if target == b"*" {
        return if *method == Method::OPTIONS {
            Ok(false)
        } else {
            Err(BAD)
        };
    }
    let Some(authority) = uri.authority() else {
        return Err(BAD);
    };
    let authority = authority.as_str().as_bytes();
    match uri.scheme_str() {
        // Absolute-form. No userinfo (RFC 9110 §4.2.4), and an http URI has a host (§4.2.1).
        Some(s)
            if !connect
                && (s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https"))
                && !authority.starts_with(b":")
                && valid_host(authority)
                && !authority.is_empty() =>
        {
            Ok(true)
        }
        Some(_) => Err(BAD),
        // Authority-form: `uri-host ":" port`, nothing else.
        None if connect
            && target == authority
            && authority.contains(&b':')
            && !authority.ends_with(b":")
            && !authority.starts_with(b":")
            && valid_host(authority) =>
        {
            Ok(false)
        }
        None => Err(BAD),
    }
}

/// Whether `v` is a valid `Host` value (RFC 9110 §7.2): `uri-host [ ":" port ]`, where
/// uri-host is an IP-literal in brackets, an IPv4 address or a reg-name (unreserved,
/// percent-encoded and sub-delim characters), and port is decimal, at most 65535. An empty
/// value is valid (a target without authority); a host without name before a port is not.
fn valid_host(v: &[u8]) -> bool {
    let (host_ok, port) = if let Some(rest) = v.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let port = match &rest[end + 1..] {
            [] => None,
            [b':', p @ ..] => Some(p),
            _ => return false,
        };
        (valid_ip_literal(&rest[..end]), port)
    } else {
        let (host, port) = match v.iter().position(|&b| b == b':') {
            Some(i) => (&v[..i], Some(&v[i + 1..])),
            None => (v, None),
        };
        (
            valid_reg_name(host) && !(host.is_empty() && port.is_some()),
            port,
        )
    };
    host_ok
        && port.is_none_or(|p| {
            // An empty port is allowed by the grammar (RFC 3986 §3.2.3).
            p.iter().all(u8::is_ascii_digit)
                && (p.is_empty() || parse_decimal(p).is_some_and(|n| n <= u64::from(u16::MAX)))
        })
}

/// `unreserved / sub-delims` (RFC 3986 §2.2, §2.3).
fn is_unreserved_or_sub_delim(b: u8) -> bool {
    UNRESERVED_OR_SUB_DELIM[usize::from(b)]
}

/// [`is_unreserved_or_sub_delim`] as a table: searching the list of delimiters for every
/// byte of every `Host` value cost more than the rest of the request head's checks.
const UNRESERVED_OR_SUB_DELIM: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        i += 1;
    }
    table
};

/// `reg-name = *( unreserved / pct-encoded / sub-delims )` (RFC 3986 §3.2.2).
fn valid_reg_name(h: &[u8]) -> bool {
    let mut i = 0;
    while i < h.len() {
        match h[i] {
            b'%' => {
                if !(h.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                    && h.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
                {
                    return false;
                }
                i += 3;
            }
            b if is_unreserved_or_sub_delim(b) => i += 1,
            _ => return false,
        }
    }
    true
}

/// The inside of `[...]`: an IPv6 address or `IPvFuture` (RFC 3986 §3.2.2).
fn valid_ip_literal(lit: &[u8]) -> bool {
    if let [b'v' | b'V', rest @ ..] = lit {
        let Some(dot) = rest.iter().position(|&b| b == b'.') else {
            return false;
        };
        let (ver, tail) = (&rest[..dot], &rest[dot + 1..]);
        return !ver.is_empty()
            && ver.iter().all(u8::is_ascii_hexdigit)
            && !tail.is_empty()
            && tail
                .iter()
                .all(|&b| b == b':' || is_unreserved_or_sub_delim(b));
    }
    std::str::from_utf8(lit).is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok())
}

/// Comma-separated tokens of a header value, trimmed.
fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// What the framing and connection fields of a request head say, gathered field by field.
#[derive(Debug)]
struct Scan {
    /// A `Transfer-Encoding` field is present.
    te: bool,
    /// Transfer-coding tokens over all `Transfer-Encoding` fields.
    te_tokens: usize,
    /// The first of them is `chunked`.
    te_first_chunked: bool,
    /// A `Content-Length` field is present.
    cl: bool,
    /// The length all `Content-Length` values agree on so far.
    len: Option<u64>,
    /// A `Content-Length` value is malformed or differs from another.
    cl_bad: bool,
    /// `Connection: close`.
    close: bool,
    /// `Connection: keep-alive`.
    keep: bool,
    /// The first `Expect` field has been seen.
    expect_seen: bool,
    /// It is `100-continue`.
    expect_continue: bool,
    /// `TE: trailers`.
    te_trailers: bool,
    /// `Host` fields seen.
    hosts: u32,
    /// Every `Host` value seen is valid.
    host_ok: bool,
}

impl Default for Scan {
    fn default() -> Self {
        Scan {
            te: false,
            te_tokens: 0,
            te_first_chunked: false,
            cl: false,
            len: None,
            cl_bad: false,
            close: false,
            keep: false,
            expect_seen: false,
            expect_continue: false,
            te_trailers: false,
            hosts: 0,
            host_ok: true,
        }
    }
}

impl Scan {
    /// Notes one header field.
    fn field(&mut self, name: &HeaderName, value: &[u8]) {
        if *name == header::HOST {
            self.hosts += 1;
            self.host_ok &= valid_host(value);
        } else if *name == header::TRANSFER_ENCODING {
            self.te = true;
            for t in tokens(value) {
                if self.te_tokens == 0 {
                    self.te_first_chunked = t.eq_ignore_ascii_case(b"chunked");
                }
                self.te_tokens += 1;
            }
        } else if *name == header::CONTENT_LENGTH {
            self.cl = true;
            for t in tokens(value) {
                if self.cl_bad {
                    break;
                }
                match parse_decimal(t) {
                    Some(n) if self.len.is_none_or(|l| l == n) => self.len = Some(n),
                    _ => self.cl_bad = true,
                }
            }
        } else if *name == header::CONNECTION {
            for t in tokens(value) {
                self.close |= t.eq_ignore_ascii_case(b"close");
                self.keep |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if *name == header::EXPECT {
            if !self.expect_seen {
                self.expect_seen = true;
                self.expect_continue = value.eq_ignore_ascii_case(b"100-continue");
            }
        } else if *name == header::TE {
            self.te_trailers |= tokens(value).any(|t| t.eq_ignore_ascii_case(b"trailers"));
        }
    }

    /// The `Host` rules of RFC 9112 §3.2: exactly one in HTTP/1.1 (at most one in HTTP/1.0),
    /// with a valid value. Two hosts would let routing and a backend pick different ones.
    fn host(&self, version: Version) -> Result<(), HeadError> {
        match self.hosts {
            0 if version == Version::HTTP_11 => Err(HeadError::Bad("missing_host")),
            0 | 1 if self.host_ok => Ok(()),
            0 | 1 => Err(HeadError::Bad("bad_host")),
            _ => Err(HeadError::Bad("duplicate_host")),
        }
    }

    /// The request body's framing (RFC 9112 §6.3), refusing what could be read two ways
    /// (request smuggling): both `Transfer-Encoding` and `Content-Length`, a transfer coding
    /// other than a final `chunked`, or differing lengths.
    fn framing(&self, version: Version, method: &Method) -> Result<Framing, HeadError> {
        if self.te {
            if version == Version::HTTP_10 || self.cl {
                return Err(HeadError::Bad("bad_framing"));
            }
            // Only a single, final `chunked` can be decoded here; lbd passes no other coding
            // on (Transfer-Encoding is hop-by-hop), so anything else is refused.
            if self.te_tokens != 1 || !self.te_first_chunked {
                return Err(HeadError::Bad("bad_framing"));
            }
            return Ok(Framing::Chunked);
        }
        if self.cl_bad {
            return Err(HeadError::Bad("bad_content_length"));
        }
        Ok(match self.len {
            // CONNECT has no body in lbd (it is refused before any would be read).
            _ if method == Method::CONNECT => Framing::Empty,
            None | Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
        })
    }
}

fn parse_decimal(t: &[u8]) -> Option<u64> {
    if t.is_empty() || t.len() > 19 {
        return None;
    }
    t.iter().try_fold(0u64, |acc, &b| {
        b.is_ascii_digit()
            .then(|| acc.checked_mul(10)?.checked_add(u64::from(b - b'0')))?
    })
}

/// One step of body decoding.
#[derive(Debug)]
pub enum Decoded {
    /// Body bytes (a slice of the read buffer, no copy).
    Data(Bytes),
    /// Chunked trailers.
    Trailers(HeaderMap),
    /// The body is complete.
    End,
    /// More input is needed.
    NeedMore,
}

/// Incremental request body decoder over the connection's read buffer. It consumes exactly
/// the body, so bytes of a pipelined next request stay in the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    /// `Content-Length` body with this many bytes left.
    Length(u64),
    /// Chunked body.
    Chunked(ChunkState),
    /// Finished.
    Done,
}

/// Where a chunked decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// Inside chunk data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
}

impl Decoder {
    /// The decoder for a request with this framing.
    pub fn new(framing: Framing) -> Self {
        match framing {
            Framing::Empty => Decoder::Done,
            Framing::Length(n) => Decoder::Length(n),
            Framing::Chunked => Decoder::Chunked(ChunkState::Size),
        }
    }

    /// Whether the body has been read completely.
    pub fn is_done(&self) -> bool {
        matches!(self, Decoder::Done)
    }

    /// Decodes what `buf` holds; `max_trailers` bounds the trailer section.
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        max_trailers: usize,
    ) -> Result<Decoded, &'static str> {
        self.step(buf, max_trailers, true)
    }

    /// As [`Decoder::decode`], but stops before body data (reporting `NeedMore`): consumes
    /// only framing, to learn whether a body already read whole has ended (a pooled
    /// connection can then go back before the last data is even sent on).
    pub fn skip_framing(
        &mut self,
        buf: &mut BytesMut,
        max_trailers: usize,
    ) -> Result<Decoded, &'static str> {
        self.step(buf, max_trailers, false)
    }

    fn step(
        &mut self,
        buf: &mut BytesMut,
        max_trailers: usize,
        take_data: bool,
    ) -> Result<Decoded, &'static str> {
        loop {
            match self {
                Decoder::Done => return Ok(Decoded::End),
                Decoder::Length(left) => {
                    if buf.is_empty() || !take_data {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                    *left -= n as u64;
                    if *left == 0 {
                        *self = Decoder::Done;
                    }
                    return Ok(Decoded::Data(buf.split_to(n).freeze()));
                }
                Decoder::Chunked(state) => match *state {
                    ChunkState::Size => {
                        let Some((used, size)) = chunk_line(buf)? else {
                            return Ok(Decoded::NeedMore);
                        };
                        buf.advance(used);
                        *state = if size == 0 {
                            ChunkState::Trailers
                        } else {
                            ChunkState::Data(size)
                        };
                    }
                    ChunkState::Data(left) => {
                        if buf.is_empty() || !take_data {
                            return Ok(Decoded::NeedMore);
                        }
                        let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                        let rest = left - n as u64;
                        *state = if rest == 0 {
                            ChunkState::DataEnd
                        } else {
                            ChunkState::Data(rest)
                        };
                        return Ok(Decoded::Data(buf.split_to(n).freeze()));
                    }
                    ChunkState::DataEnd => {
                        // Exactly CRLF (RFC 9112 §7.1): a bare LF is read differently by
                        // different parsers, which is how bodies are smuggled.
                        if buf.starts_with(b"\r\n") {
                            buf.advance(2);
                        } else if buf.is_empty() || buf[..] == b"\r"[..] {
                            return Ok(Decoded::NeedMore);
                        } else {
                            return Err("bad_chunk");
                        }
                        *state = ChunkState::Size;
                    }
                    ChunkState::Trailers => {
                        let Some(end) = trailer_end(buf) else {
                            if buf.len() > max_trailers {
                                return Err("trailers_too_large");
                            }
                            return Ok(Decoded::NeedMore);
                        };
                        if end > max_trailers {
                            return Err("trailers_too_large");
                        }
                        let section = buf.split_to(end);
                        *self = Decoder::Done;
                        if section.len() <= 2 {
                            return Ok(Decoded::End);
                        }
                        return parse_trailers(&section).map(Decoded::Trailers);
                    }
                },
            }
        }
    }
}

/// Parses the chunk-size line at the start of `buf` (RFC 9112 §7.1), for request and
/// response bodies alike: `Ok(Some((bytes used, size)))`, `Ok(None)` while incomplete.
///
/// The grammar is applied strictly, since proxies that disagree on where a chunk ends can be
/// made to see different requests: the line ends in CRLF (no bare LF or CR), the size is
/// hex digits only, whitespace is allowed only around the `;` and `=` of an extension, and
/// every extension has a name (`token`) and, after `=`, a token or a quoted string.
/// Extensions are then ignored. Lines longer than [`MAX_CHUNK_LINE`] are refused.
pub fn chunk_line(buf: &[u8]) -> Result<Option<(usize, u64)>, &'static str> {
    let window = &buf[..buf.len().min(MAX_CHUNK_LINE + 2)];
    let Some(eol) = window.iter().position(|&b| b == b'\n') else {
        // A CR must be the line's end: one followed by anything else is refused now rather
        // than when the line bound is reached.
        if window
            .iter()
            .position(|&b| b == b'\r')
            .is_some_and(|i| i + 1 < window.len())
        {
            return Err("bad_chunk_line");
        }
        if buf.len() > MAX_CHUNK_LINE {
            return Err("chunk_line_too_long");
        }
        return Ok(None);
    };
    let Some(line) = window[..eol].strip_suffix(b"\r") else {
        return Err("bad_chunk_line");
    };
    if line.len() > MAX_CHUNK_LINE {
        return Err("chunk_line_too_long");
    }
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err("bad_chunk_size");
    }
    let size = line[..digits].iter().try_fold(0u64, |n, &b| {
        let d = (b as char).to_digit(16)?;
        n.checked_mul(16)?.checked_add(u64::from(d))
    });
    let Some(size) = size else {
        return Err("bad_chunk_size");
    };
    chunk_extensions(&line[digits..])?;
    Ok(Some((eol + 1, size)))
}

/// Checks `*( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )`.
fn chunk_extensions(mut rest: &[u8]) -> Result<(), &'static str> {
    const BAD: &str = "bad_chunk_extension";
    fn ows(s: &[u8]) -> &[u8] {
        let n = s.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
        &s[n..]
    }
    fn token(s: &[u8]) -> Option<&[u8]> {
        let n = s.iter().take_while(|&&b| is_tchar(b)).count();
        (n > 0).then(|| &s[n..])
    }
    while !rest.is_empty() {
        rest = ows(rest);
        // Whitespace that does not lead to an extension (after the size or at the end).
        let Some(after) = rest.strip_prefix(b";") else {
            return Err(BAD);
        };
        rest = token(ows(after)).ok_or(BAD)?;
        let eq = ows(rest);
        if let Some(val) = eq.strip_prefix(b"=") {
            let val = ows(val);
            rest = match val.first() {
                Some(b'"') => quoted_string(val).ok_or(BAD)?,
                _ => token(val).ok_or(BAD)?,
            };
        }
    }
    Ok(())
}

/// `tchar` of RFC 9110 §5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Skips a `quoted-string` (RFC 9110 §5.6.4) at the start of `s`; the rest after it.
fn quoted_string(s: &[u8]) -> Option<&[u8]> {
    let mut i = 1;
    loop {
        match *s.get(i)? {
            b'"' => return Some(&s[i + 1..]),
            b'\\' => {
                let b = *s.get(i + 1)?;
                if !(b == b'\t' || b == b' ' || b.is_ascii_graphic() || b >= 0x80) {
                    return None;
                }
                i += 2;
            }
            b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff => i += 1,
            _ => return None,
        }
    }
}

/// Length of the trailer section including its terminating empty line, once complete.
fn trailer_end(buf: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    for (i, &b) in buf.iter().enumerate() {
        if b == b'\n' {
            let line = &buf[line_start..i];
            if line.is_empty() || line == b"\r" {
                return Some(i + 1);
            }
            line_start = i + 1;
        }
    }
    None
}

fn parse_trailers(section: &[u8]) -> Result<HeaderMap, &'static str> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(section, &mut fields) {
        Ok(httparse::Status::Complete((_, parsed))) => {
            let mut map = HeaderMap::with_capacity(parsed.len());
            for h in parsed {
                let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| "bad_trailer")?;
                let value = HeaderValue::from_bytes(h.value).map_err(|_| "bad_trailer")?;
                map.append(name, value);
            }
            Ok(map)
        }
        _ => Err("bad_trailer"),
    }
}

/// Header fields kept as the bytes they arrived in (an upstream's response head), hop-by-hop
/// fields already left out: written to the client as they are, and turned into a `HeaderMap`
/// only where something needs one (filters, an HTTP/2 client, gRPC). Building a map for every
/// response and encoding it again cost more than the rest of the response path.
#[derive(Debug, Default)]
pub struct RawFields {
    /// The head as received.
    bytes: Bytes,
    /// Name and value ranges in `bytes` of the fields kept, in order.
    spans: Vec<[u32; 4]>,
}

impl RawFields {
    /// Fields of `bytes` at `spans` (name start, name end, value start, value end), which
    /// the caller has checked are valid field names and values.
    pub fn new(bytes: Bytes, spans: Vec<[u32; 4]>) -> Self {
        RawFields { bytes, spans }
    }

    /// Drops the fields named `name` (lower case; matched in any case).
    pub fn remove(&mut self, name: &str) {
        let raw = &self.bytes;
        self.spans.retain(|&[ns, ne, _, _]| {
            !raw[ns as usize..ne as usize].eq_ignore_ascii_case(name.as_bytes())
        });
    }

    /// Names (as received, any case) and values, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.spans.iter().map(|&[ns, ne, vs, ve]| {
            (
                &self.bytes[ns as usize..ne as usize],
                &self.bytes[vs as usize..ve as usize],
            )
        })
    }

    /// Appends the fields as `name: value\r\n` lines, names in lower case as a `HeaderMap`
    /// would write them (a field that arrived in that shape is copied in one piece), leaving
    /// out `Content-Length` unless `length`; returns whether a `Date` field was among them.
    pub fn write(&self, out: &mut Vec<u8>, length: bool) -> bool {
        let raw = &self.bytes[..];
        let mut date = false;
        for &[ns, ne, vs, ve] in &self.spans {
            let (ns, ne, vs, ve) = (ns as usize, ne as usize, vs as usize, ve as usize);
            let name = &raw[ns..ne];
            date |= name.eq_ignore_ascii_case(b"date");
            if !length && name.eq_ignore_ascii_case(b"content-length") {
                continue;
            }
            let at = out.len();
            if vs == ne + 2 && &raw[ne..vs] == b": " && raw.get(ve..ve + 2) == Some(&b"\r\n"[..]) {
                out.extend_from_slice(&raw[ns..ve + 2]);
            } else {
                out.extend_from_slice(name);
                out.extend_from_slice(b": ");
                out.extend_from_slice(&raw[vs..ve]);
                out.extend_from_slice(b"\r\n");
            }
            out[at..at + name.len()].make_ascii_lowercase();
        }
        date
    }

    /// A map of these fields followed by those of `extra` (values share the head's bytes).
    pub fn into_header_map(self, extra: HeaderMap) -> HeaderMap {
        // Room for the fields response filters add (RateLimit-*, CORS), so that adding them
        // does not regrow (rehash) the map: two regrowths were ~1.5k instructions a response.
        let mut map = HeaderMap::with_capacity(self.spans.len() + extra.len() + 4);
        for &[ns, ne, vs, ve] in &self.spans {
            let name = HeaderName::from_bytes(&self.bytes[ns as usize..ne as usize]);
            let value = HeaderValue::from_maybe_shared(self.bytes.slice(vs as usize..ve as usize));
            if let (Ok(name), Ok(value)) = (name, value) {
                map.append(name, value);
            }
        }
        // Appended, not `extend`ed: that would replace the fields of the same name.
        let mut last = None;
        for (name, value) in extra {
            if let Some(n) = name {
                last = Some(n);
            }
            if let Some(n) = &last {
                map.append(n.clone(), value);
            }
        }
        map
    }
}

/// How the response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body is written (HEAD, 1xx, 204, 304).
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Delimited by closing the connection (HTTP/1.0 client, unknown length).
    Close,
}

/// Writes the status line and header fields of a response into `out`, adding `Date`,
/// `Connection` and the framing header; returns how the body must be written.
/// `exact_len` is the body's exact size when known up front.
/// `raw`: fields copied as they came from an upstream (written first), `headers` the rest.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site per kind of answer; a struct would only rename the arguments"
)]
pub fn encode_response_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    raw: Option<&RawFields>,
    headers: &HeaderMap,
    req_method: &Method,
    req_version: Version,
    exact_len: Option<u64>,
    keep_alive: &mut bool,
) -> ResponseFraming {
    let no_body = *req_method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // The first Content-Length field decides, as `HeaderMap::get` would pick it.
    let raw_length = raw.and_then(|r| {
        r.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(b"content-length"))
    });
    let declared = match raw_length {
        Some((_, v)) => parse_decimal(v),
        None if headers.is_empty() => None,
        None => headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| parse_decimal(v.as_bytes())),
    };
    let framing = if no_body {
        ResponseFraming::None
    } else if let Some(n) = declared.or(exact_len) {
        ResponseFraming::Length(n)
    } else if req_version == Version::HTTP_11 {
        ResponseFraming::Chunked
    } else {
        ResponseFraming::Close
    };
    if framing == ResponseFraming::Close {
        *keep_alive = false;
    }
    if req_version == Version::HTTP_10 {
        out.extend_from_slice(b"HTTP/1.0 ");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
    }
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // Noted while writing the fields: a lookup afterwards hashes the name again.
    let mut has_date = false;
    if let Some(raw) = raw {
        // Hop-by-hop fields were left out when the head was read.
        has_date = raw.write(out, declared.is_some());
    }
    for (name, value) in headers {
        has_date |= name == header::DATE;
        if name == header::CONNECTION || name == header::TRANSFER_ENCODING {
            continue;
        }
        if name == header::CONTENT_LENGTH && (declared.is_none() || raw_length.is_some()) {
            // An unparsable length is not passed on; the body's framing decides.
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        with_date(|d| out.extend_from_slice(d));
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        ResponseFraming::Length(n) if declared.is_none() => {
            out.extend_from_slice(b"content-length: ");
            let mut digits = itoa_buf(n);
            out.extend_from_slice(digits.as_bytes_mut());
            out.extend_from_slice(b"\r\n");
        }
        ResponseFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if !*keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if req_version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    framing
}

/// Decimal digits of `n` without an allocation.
struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    fn as_bytes_mut(&mut self) -> &[u8] {
        &self.buf[self.start..]
    }
}

fn itoa_buf(mut n: u64) -> Digits {
    let mut d = Digits {
        buf: [0; 20],
        start: 20,
    };
    loop {
        d.start -= 1;
        d.buf[d.start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return d;
        }
    }
}

/// Calls `f` with the current IMF-fixdate, formatted at most once per second per thread (one
/// cache for both writers: the HTTP/1.1 head takes its bytes, HTTP/2 heads a clone).
fn with_date_value<R>(f: impl FnOnce(&HeaderValue) -> R) -> R {
    thread_local! {
        static CACHE: RefCell<(u64, HeaderValue)> =
            const { RefCell::new((u64::MAX, HeaderValue::from_static(""))) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs
            && let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(now))
        {
            *c = (secs, v);
        }
        f(&c.1)
    })
}

/// Calls `f` with the current IMF-fixdate's bytes.
fn with_date<R>(f: impl FnOnce(&[u8]) -> R) -> R {
    with_date_value(|v| f(v.as_bytes()))
}

/// The current IMF-fixdate as a field value (for HTTP/2 heads); clones share one buffer.
pub fn date_value() -> HeaderValue {
    with_date_value(HeaderValue::clone)
}

/// Appends `n` in lower-case hex (a chunk size) without formatting machinery.
pub fn push_hex(out: &mut Vec<u8>, mut n: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 16];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = DIGITS[(n & 0xf) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<Head>, HeadError> {
        let mut b = BytesMut::from(s.as_bytes());
        parse_head(&mut b, 65536)
    }

    #[test]
    fn parses_a_head_and_leaves_the_rest() {
        let mut b = BytesMut::from(
            &b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nX-A: 1\r\nX-A: 2\r\n\r\nabcGET"[..],
        );
        let h = parse_head(&mut b, 65536).expect("ok").expect("complete");
        assert_eq!(h.method, Method::POST);
        assert_eq!(h.uri, "/a?b=1");
        assert_eq!(h.version, Version::HTTP_11);
        assert_eq!(h.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(h.framing, Framing::Length(3));
        assert!(h.keep_alive);
        assert_eq!(&b[..], b"abcGET");
    }

    #[test]
    fn incomplete_then_too_large() {
        assert!(
            parse("GET / HTTP/1.1\r\nHost: x\r\n")
                .expect("ok")
                .is_none()
        );
        let mut b = BytesMut::from(&b"GET / HTTP/1.1\r\nX: aaaaaaaaaaaaaaaaaaaaaa"[..]);
        assert_eq!(parse_head(&mut b, 16).err(), Some(HeadError::TooLarge));
        let mut b = BytesMut::from(&b"GET / HTTP/1.1\r\nX: aaaaaaaaaaaaaaaaaaaaaa\r\n\r\n"[..]);
        assert_eq!(parse_head(&mut b, 16).err(), Some(HeadError::TooLarge));
    }

    #[test]
    fn keep_alive_rules() {
        let h = |s: &str| parse(s).expect("ok").expect("complete").keep_alive;
        assert!(!h("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
        assert!(!h("GET / HTTP/1.0\r\n\r\n"));
        assert!(h("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        assert!(h(
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: foo, keep-alive\r\n\r\n"
        ));
    }

    #[test]
    fn refuses_ambiguous_framing() {
        for bad in [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GARBAGE \x01\x02 NONSENSE\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nBad Name: x\r\n\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(HeadError::Bad(_))),
                "{bad:?}: {:?}",
                parse(bad)
            );
        }
        let h = parse("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert_eq!(h.framing, Framing::Length(3));
    }

    fn decode_all(
        dec: &mut Decoder,
        input: &[u8],
    ) -> Result<(Vec<u8>, Option<HeaderMap>), &'static str> {
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let mut trailers = None;
        // Byte by byte: every state must survive a split anywhere.
        for &b in input {
            buf.extend_from_slice(&[b]);
            loop {
                match dec.decode(&mut buf, 1024)? {
                    Decoded::Data(d) => data.extend_from_slice(&d),
                    Decoded::Trailers(t) => trailers = Some(t),
                    Decoded::End => return Ok((data, trailers)),
                    Decoded::NeedMore => break,
                }
            }
        }
        Err("incomplete")
    }

    #[test]
    fn chunked_with_extensions_and_trailers() {
        let mut dec = Decoder::new(Framing::Chunked);
        let (data, trailers) = decode_all(
            &mut dec,
            b"5;name=value\r\nhello\r\n1A ; x\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Sum: 9\r\n\r\n",
        )
        .expect("decodes");
        assert_eq!(data, b"helloabcdefghijklmnopqrstuvwxyz");
        assert_eq!(trailers.expect("trailers")["x-sum"], "9");
        let mut dec = Decoder::new(Framing::Chunked);
        let (data, trailers) = decode_all(&mut dec, b"3\r\nabc\r\n0\r\n\r\n").expect("decodes");
        assert_eq!(data, b"abc");
        assert!(trailers.is_none());
    }

    #[test]
    fn chunked_errors() {
        for bad in [
            &b"zz\r\n"[..],
            b"3\r\nabcX\r\n",
            b"ffffffffffffffffff\r\n",
            // Bare LF or CR in the size line, or after the data.
            b"3\nabc\r\n0\r\n\r\n",
            b"3\rabc\r\n0\r\n\r\n",
            b"3\r\nabc\n0\r\n\r\n",
            b"3;a=b\nabc\r\n0\r\n\r\n",
            // Whitespace without an extension, an extension without a name or value.
            b"3 \r\nabc\r\n0\r\n\r\n",
            b"3\t\r\nabc\r\n0\r\n\r\n",
            b"3;\r\nabc\r\n0\r\n\r\n",
            b"3;=x\r\nabc\r\n0\r\n\r\n",
            b"3;a=\r\nabc\r\n0\r\n\r\n",
            b"3;a \r\nabc\r\n0\r\n\r\n",
            b"3;a=\"x\r\nabc\r\n0\r\n\r\n",
            b"3;a b\r\nabc\r\n0\r\n\r\n",
            b"0x3\r\nabc\r\n0\r\n\r\n",
            b"+3\r\nabc\r\n0\r\n\r\n",
            b"\r\n",
        ] {
            let mut dec = Decoder::new(Framing::Chunked);
            assert!(
                decode_all(&mut dec, bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn chunk_lines_in_the_grammar() {
        for (line, size) in [
            (&b"0\r\n"[..], 0),
            (b"00000000000000000000a\r\n", 10),
            (b"1F\r\n", 31),
            (b"3;a\r\n", 3),
            (b"3 ; a = b ;c\r\n", 3),
            (b"3;a=\"q \\\" ;\"\r\n", 3),
        ] {
            assert_eq!(
                chunk_line(line),
                Ok(Some((line.len(), size))),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        assert_eq!(chunk_line(b"3;a"), Ok(None));
        assert_eq!(chunk_line(b"3\r"), Ok(None));
        assert_eq!(chunk_line(b"3\rx"), Err("bad_chunk_line"));
        let long = vec![b'1'; MAX_CHUNK_LINE + 3];
        assert_eq!(chunk_line(&long), Err("chunk_line_too_long"));
    }

    #[test]
    fn host_rules() {
        let reason = |s: &str| parse(s).err().map(HeadError::reason);
        for ok in [
            "GET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.example:8080\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: 192.0.2.1:80\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: [v1.x:y]\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a%2Db.example\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: \r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
        ] {
            assert_eq!(reason(ok), None, "{ok:?}");
        }
        for (bad, why) in [
            ("GET / HTTP/1.1\r\n\r\n", "missing_host"),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
                "duplicate_host",
            ),
            (
                "GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
                "duplicate_host",
            ),
            ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "bad_host"),
            ("GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", "bad_host"),
            ("GET / HTTP/1.1\r\nHost: a/p\r\n\r\n", "bad_host"),
            ("GET / HTTP/1.1\r\nHost: a:x\r\n\r\n", "bad_host"),
            ("GET / HTTP/1.1\r\nHost: a:65536\r\n\r\n", "bad_host"),
            ("GET / HTTP/1.1\r\nHost: a:1:2\r\n\r\n", "bad_host"),
            ("GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", "bad_host"),
            ("GET / HTTP/1.1\r\nHost: ::1]\r\n\r\n", "bad_host"),
            ("GET / HTTP/1.1\r\nHost: [zz]\r\n\r\n", "bad_host"),
            ("GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n", "bad_host"),
            ("GET / HTTP/1.1\r\nHost: a%zz\r\n\r\n", "bad_host"),
            ("GET / HTTP/1.1\r\nHost: :80\r\n\r\n", "bad_host"),
        ] {
            assert_eq!(reason(bad), Some(why), "{bad:?}");
        }
    }

    #[test]
    fn target_forms() {
        let reason = |s: &str| parse(s).err().map(HeadError::reason);
        // Absolute-form: its authority replaces Host, and is inserted for HTTP/1.0.
        let h = parse("GET http://b.example:81/p?q HTTP/1.1\r\nHost: a.example\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert_eq!(h.headers.get_all(header::HOST).iter().count(), 1);
        assert_eq!(h.headers[header::HOST], "b.example:81");
        assert_eq!(h.uri.path(), "/p");
        let h = parse("GET https://b.example/ HTTP/1.0\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert_eq!(h.headers[header::HOST], "b.example");
        for ok in [
            "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
            "CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
        ] {
            assert_eq!(reason(ok), None, "{ok:?}");
        }
        for bad in [
            "GET http://u:p@b.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n",
            "GET ftp://b.example/ HTTP/1.1\r\nHost: b\r\n\r\n",
            "GET b.example:80 HTTP/1.1\r\nHost: b\r\n\r\n",
            "GET * HTTP/1.1\r\nHost: b\r\n\r\n",
            "CONNECT / HTTP/1.1\r\nHost: b\r\n\r\n",
            "CONNECT b.example HTTP/1.1\r\nHost: b\r\n\r\n",
            "CONNECT http://b.example/ HTTP/1.1\r\nHost: b\r\n\r\n",
        ] {
            assert_eq!(reason(bad), Some("bad_target"), "{bad:?}");
        }
        let raw = b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        let mut b = BytesMut::from(&raw[..]);
        assert_eq!(
            parse_head(&mut b, 65536).err(),
            Some(HeadError::Bad("bad_uri"))
        );
        // A CONNECT connection is never reused (what follows its head is not a request).
        let h = parse("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nContent-Length: 5\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert!(!h.keep_alive);
    }

    #[test]
    fn higher_minor_versions_are_http11() {
        for v in ["1.2", "1.9"] {
            let mut b =
                BytesMut::from(format!("\r\nGET / HTTP/{v}\r\nHost: a\r\n\r\nnext").as_bytes());
            let h = parse_head(&mut b, 65536).expect("ok").expect("complete");
            assert_eq!(h.version, Version::HTTP_11);
            assert!(h.keep_alive);
            assert_eq!(&b[..], b"next");
        }
        // Incomplete: wait for the line; then HTTP/1.x with x ≥ 10, 2.0, junk → 400.
        assert!(parse("GET / HTTP/1.2").expect("ok").is_none());
        for bad in ["1.10", "2.0", "1.x", "1.2 "] {
            let s = format!("GET / HTTP/{bad}\r\nHost: a\r\n\r\n");
            assert!(matches!(parse(&s), Err(HeadError::Bad(_))), "{s:?}");
        }
    }

    #[test]
    fn length_body_leaves_pipelined_bytes() {
        let mut dec = Decoder::new(Framing::Length(3));
        let mut buf = BytesMut::from(&b"abcGET / HTTP/1.1"[..]);
        assert!(matches!(dec.decode(&mut buf, 0), Ok(Decoded::Data(d)) if &d[..] == b"abc"));
        assert!(matches!(dec.decode(&mut buf, 0), Ok(Decoded::End)));
        assert_eq!(&buf[..], b"GET / HTTP/1.1");
    }

    #[test]
    fn host_characters_are_unreserved_or_sub_delims() {
        for b in 0..=255u8 {
            let listed = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b);
            assert_eq!(is_unreserved_or_sub_delim(b), listed, "{b:#04x}");
        }
    }

    #[test]
    fn response_heads() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        let mut out = Vec::new();
        let mut keep = true;
        let f = encode_response_head(
            &mut out,
            StatusCode::OK,
            None,
            &h,
            &Method::GET,
            Version::HTTP_11,
            Some(12),
            &mut keep,
        );
        let s = String::from_utf8(out).expect("utf8");
        assert_eq!(f, ResponseFraming::Length(12));
        assert!(s.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\ndate: "), "{s}");
        assert!(s.ends_with("content-length: 12\r\n\r\n"), "{s}");
        assert!(!s.contains("connection"), "{s}");

        let mut out = Vec::new();
        let f = encode_response_head(
            &mut out,
            StatusCode::OK,
            None,
            &HeaderMap::new(),
            &Method::GET,
            Version::HTTP_10,
            None,
            &mut keep,
        );
        assert_eq!(f, ResponseFraming::Close);
        assert!(!keep);
        let s = String::from_utf8(out).expect("utf8");
        assert!(s.starts_with("HTTP/1.0 200 OK\r\n"), "{s}");
        assert!(s.ends_with("connection: close\r\n\r\n"), "{s}");
    }

    #[test]
    fn chunk_sizes_in_hex() {
        for (n, hex) in [(0, "0"), (10, "a"), (255, "ff"), (65536, "10000")] {
            let mut out = Vec::new();
            push_hex(&mut out, n);
            assert_eq!(out, hex.as_bytes());
        }
    }
}
