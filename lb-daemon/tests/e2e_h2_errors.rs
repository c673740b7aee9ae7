//! HTTP/2 error codes on the client side, over raw frames: each RFC 9113 error gets the code
//! the RFC names (HAProxy's behaviour), not a blanket PROTOCOL_ERROR; a small header block cut
//! into many CONTINUATION fragments is served, while an endless stream of them is refused.
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use lb_tests::{Backend, Lbd, free_addr, one_backend_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const PRIORITY: u8 = 2;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

const PROTOCOL_ERROR: u32 = 1;
const FLOW_CONTROL_ERROR: u32 = 3;
const STREAM_CLOSED: u32 = 5;
const FRAME_SIZE_ERROR: u32 = 6;
const COMPRESSION_ERROR: u32 = 9;
const ENHANCE_YOUR_CALM: u32 = 11;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK literal field without indexing and without Huffman coding (RFC 7541 §6.2.2).
fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
    assert!(name.len() < 127 && value.len() < 127);
    out.push(0x00);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

/// The field block of `method path` on `authority`, plus `extra` literal fields.
fn request_block(method: &str, path: &str, authority: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    literal(&mut b, ":method", method);
    b.push(0x86); // :scheme http (static index 6)
    literal(&mut b, ":path", path);
    literal(&mut b, ":authority", authority);
    for (n, v) in extra {
        literal(&mut b, n, v);
    }
    b
}

/// What the server said that ends the exchange under test.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// GOAWAY with this code.
    GoAway(u32),
    /// RST_STREAM of this stream with this code.
    Reset(u32, u32),
    /// HEADERS on this stream with this `:status` (indexed static entries only).
    Headers(u32),
    /// PING ACK (the connection is still usable).
    PingAck,
    /// The connection closed without either.
    Closed,
}

struct Conn {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(PREFACE).await.expect("preface");
        tcp.write_all(&frame(SETTINGS, 0, 0, &[]))
            .await
            .expect("settings");
        Conn {
            tcp,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        // The server may already have closed after an error: that is for `next` to report.
        let _ = self.tcp.write_all(bytes).await;
    }

    /// The next frame that is not SETTINGS / WINDOW_UPDATE / PING from the server.
    async fn next(&mut self) -> Outcome {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            while self.buf.len() >= 9 {
                let len = (usize::from(self.buf[0]) << 16)
                    | (usize::from(self.buf[1]) << 8)
                    | usize::from(self.buf[2]);
                if self.buf.len() < 9 + len {
                    break;
                }
                let kind = self.buf[3];
                let flags = self.buf[4];
                let stream =
                    u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]])
                        & 0x7fff_ffff;
                let payload: Vec<u8> = self.buf[9..9 + len].to_vec();
                self.buf.drain(..9 + len);
                let code = |at: usize| {
                    payload
                        .get(at..at + 4)
                        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                };
                match kind {
                    GOAWAY => return Outcome::GoAway(code(4)),
                    RST_STREAM => return Outcome::Reset(stream, code(0)),
                    PING if flags & ACK != 0 => return Outcome::PingAck,
                    SETTINGS if flags & ACK == 0 => {
                        self.send(&frame(SETTINGS, ACK, 0, &[])).await;
                    }
                    HEADERS => {
                        // lbd's answers start with an indexed :status (static 8..=14) or a
                        // literal with the :status name index 8.
                        let status = match payload.first() {
                            Some(0x88) => 200,
                            Some(0x8d) => 404,
                            Some(0x8e) => 500,
                            Some(b) if b & 0xf0 == 0 || b & 0xc0 == 0x40 => payload
                                .get(2..5)
                                .and_then(|s| std::str::from_utf8(s).ok())
                                .and_then(|s| s.parse().ok())
                                .unwrap_or(0),
                            _ => 0,
                        };
                        return Outcome::Headers(status);
                    }
                    _ => {}
                }
            }
            let mut chunk = [0u8; 16384];
            let n = match tokio::time::timeout_at(deadline, self.tcp.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Outcome::Closed,
                Ok(Ok(n)) => n,
                Err(_) => panic!("no answer from lbd within 5 s"),
            };
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

async fn lbd_with_backend() -> (Lbd, SocketAddr, Backend) {
    let backend = Backend::start("a").await;
    let listen = free_addr();
    let cfg = one_backend_config(listen, backend.addr, "", "")
        .replace("name = \"main\"", "name = \"main\"\nprotocol = \"h2c\"");
    (Lbd::start(bin(), &cfg), listen, backend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_errors_get_the_codes_rfc_9113_names() {
    let (_lbd, addr, backend) = lbd_with_backend().await;
    let cases: Vec<(&str, Vec<u8>, Outcome)> = vec![
        (
            "HPACK index 0 (RFC 7541 §6.1) → COMPRESSION_ERROR",
            frame(HEADERS, END_STREAM | END_HEADERS, 1, &[0x80]),
            Outcome::GoAway(COMPRESSION_ERROR),
        ),
        (
            "HPACK index beyond both tables → COMPRESSION_ERROR",
            frame(HEADERS, END_STREAM | END_HEADERS, 1, &[0xff, 0xff, 0x7f]),
            Outcome::GoAway(COMPRESSION_ERROR),
        ),
        (
            "PING of 7 octets (§6.7) → FRAME_SIZE_ERROR",
            frame(PING, 0, 0, &[0; 7]),
            Outcome::GoAway(FRAME_SIZE_ERROR),
        ),
        (
            "WINDOW_UPDATE of 3 octets (§6.9) → FRAME_SIZE_ERROR",
            frame(WINDOW_UPDATE, 0, 0, &[0, 0, 1]),
            Outcome::GoAway(FRAME_SIZE_ERROR),
        ),
        (
            "SETTINGS of 5 octets (§6.5) → FRAME_SIZE_ERROR",
            frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 1]),
            Outcome::GoAway(FRAME_SIZE_ERROR),
        ),
        (
            "SETTINGS ACK with a payload (§6.5) → FRAME_SIZE_ERROR",
            frame(SETTINGS, ACK, 0, &[0, 4, 0, 0, 0, 1]),
            Outcome::GoAway(FRAME_SIZE_ERROR),
        ),
        (
            "RST_STREAM of 3 octets (§6.4) → FRAME_SIZE_ERROR",
            frame(RST_STREAM, 0, 1, &[0, 0, 8]),
            Outcome::GoAway(FRAME_SIZE_ERROR),
        ),
        (
            "INITIAL_WINDOW_SIZE 2^31 (§6.5.2) → FLOW_CONTROL_ERROR",
            frame(SETTINGS, 0, 0, &[0, 4, 0x80, 0, 0, 0]),
            Outcome::GoAway(FLOW_CONTROL_ERROR),
        ),
    ];
    for (what, bytes, expected) in cases {
        let mut c = Conn::open(addr).await;
        c.send(&bytes).await;
        assert_eq!(c.next().await, expected, "{what}");
    }
    assert_eq!(backend.hits(), 0, "a broken frame reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_frame_of_a_wrong_length_resets_only_its_stream() {
    let (_lbd, addr, _backend) = lbd_with_backend().await;
    let mut c = Conn::open(addr).await;
    // §6.3: a stream error FRAME_SIZE_ERROR; the connection stays usable.
    c.send(&frame(PRIORITY, 0, 3, &[0, 0, 0, 0])).await;
    assert_eq!(c.next().await, Outcome::Reset(3, FRAME_SIZE_ERROR));
    c.send(&frame(PING, 0, 0, &[7; 8])).await;
    assert_eq!(c.next().await, Outcome::PingAck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_after_the_clients_end_stream_are_stream_closed() {
    let (_lbd, addr, _backend) = lbd_with_backend().await;
    // The backend holds its answer, so the stream stays half-closed (remote) at lbd.
    let block = request_block("GET", "/sleep/1500", "a.test", &[]);
    let mut c = Conn::open(addr).await;
    c.send(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &block))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.send(&frame(DATA, 0, 1, b"late")).await;
    assert_eq!(c.next().await, Outcome::Reset(1, STREAM_CLOSED), "DATA");

    let block = request_block("GET", "/sleep/1500", "a.test", &[]);
    let mut c = Conn::open(addr).await;
    c.send(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &block))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut trailer = Vec::new();
    literal(&mut trailer, "x-late", "1");
    c.send(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &trailer))
        .await;
    assert_eq!(c.next().await, Outcome::Reset(1, STREAM_CLOSED), "HEADERS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pseudo_header_fields_in_trailers_are_malformed() {
    let (_lbd, addr, _backend) = lbd_with_backend().await;
    let block = request_block("POST", "/echo", "a.test", &[]);
    let mut c = Conn::open(addr).await;
    c.send(&frame(HEADERS, END_HEADERS, 1, &block)).await;
    c.send(&frame(DATA, 0, 1, b"body")).await;
    let mut trailer = Vec::new();
    literal(&mut trailer, ":path", "/other");
    c.send(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &trailer))
        .await;
    // The answer to the request may start before the trailers are read; what must come is
    // the stream's reset with PROTOCOL_ERROR (§8.1), never a clean end.
    let mut seen = Vec::new();
    loop {
        let o = c.next().await;
        match o {
            Outcome::Headers(_) => seen.push(o),
            other => {
                assert_eq!(other, Outcome::Reset(1, PROTOCOL_ERROR), "after {seen:?}");
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_header_block_in_many_continuation_frames_is_served() {
    let (_lbd, addr, backend) = lbd_with_backend().await;
    let extra: Vec<(String, String)> = (0..12)
        .map(|i| (format!("x-field-{i}"), format!("value-{i}")))
        .collect();
    let extra_ref: Vec<(&str, &str)> = extra
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let block = request_block("GET", "/", "a.test", &extra_ref);
    assert!(block.len() > 200, "block of {} bytes", block.len());
    let mut c = Conn::open(addr).await;
    // HEADERS with the first octet, then one CONTINUATION per octet (§6.10 sets no minimum).
    let mut bytes = frame(HEADERS, END_STREAM, 1, &block[..1]);
    for (i, b) in block[1..].iter().enumerate() {
        let flags = if i + 2 == block.len() { END_HEADERS } else { 0 };
        bytes.extend(frame(CONTINUATION, flags, 1, &[*b]));
    }
    c.send(&bytes).await;
    assert_eq!(
        c.next().await,
        Outcome::Headers(200),
        "{} fragments",
        block.len()
    );
    assert_eq!(backend.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_run_of_empty_continuation_frames_is_refused() {
    let (_lbd, addr, backend) = lbd_with_backend().await;
    let block = request_block("GET", "/", "a.test", &[]);
    let mut c = Conn::open(addr).await;
    c.send(&frame(HEADERS, END_STREAM, 1, &block)).await;
    let empty = frame(CONTINUATION, 0, 1, &[]);
    let mut burst = Vec::with_capacity(empty.len() * 1000);
    for _ in 0..1000 {
        burst.extend_from_slice(&empty);
    }
    // At most 100,000 frames: the bound must cut it long before.
    for _ in 0..100 {
        c.send(&burst).await;
    }
    assert_eq!(c.next().await, Outcome::GoAway(ENHANCE_YOUR_CALM));
    assert_eq!(backend.hits(), 0);
}
