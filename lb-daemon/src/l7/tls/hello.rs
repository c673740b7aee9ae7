//! Reads a TLS ClientHello without terminating TLS, for passthrough routing by SNI.
//!
//! The hello may arrive in several TCP segments and in several TLS records (RFC 8446 §5.1
//! lets a handshake message span records; post-quantum key shares make ~2 KB hellos that some
//! clients fragment): records are reassembled until the whole handshake message is in, within
//! a byte bound and a deadline. Every byte read is kept, to be replayed to the backend as is.
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Why no ClientHello could be read (the `reason` label of the passthrough failure metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::l7) enum HelloError {
    /// Not complete within `hello_timeout`.
    Timeout,
    /// The client closed the connection before the hello was complete.
    Closed,
    /// The bytes are not a TLS ClientHello.
    NotTls,
    /// The hello is larger than `max_hello_bytes`.
    TooLarge,
}

impl HelloError {
    /// The metric label.
    pub(in crate::l7) fn as_str(self) -> &'static str {
        match self {
            HelloError::Timeout => "timeout",
            HelloError::Closed => "closed",
            HelloError::NotTls => "not_tls",
            HelloError::TooLarge => "too_large",
        }
    }
}

/// A ClientHello read from the client.
#[derive(Debug)]
pub(in crate::l7) struct Hello {
    /// Everything read from the client so far (the hello and anything sent right after it).
    pub bytes: Vec<u8>,
    /// The `server_name` extension's host name, lowercased, without a trailing dot.
    pub sni: Option<String>,
}

/// Record header: content type, legacy version, length.
const RECORD_HEADER: usize = 5;
/// Largest plaintext record payload (RFC 8446 §5.1).
const MAX_RECORD: usize = 1 << 14;
const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;

/// Reads from `s` until a whole ClientHello is in, reading at most `max` bytes and for at most
/// `timeout`.
pub(in crate::l7) async fn read<S: AsyncRead + Unpin>(
    s: &mut S,
    max: usize,
    timeout: Duration,
) -> Result<Hello, HelloError> {
    let mut bytes = Vec::with_capacity(max.min(4096));
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match parse(&bytes, max) {
            Progress::Done(sni) => return Ok(Hello { bytes, sni }),
            Progress::Failed(e) => return Err(e),
            Progress::NeedMore => {}
        }
        if bytes.len() >= max {
            return Err(HelloError::TooLarge);
        }
        let room = max - bytes.len();
        let mut chunk = (&mut *s).take(room as u64);
        match tokio::time::timeout_at(deadline, chunk.read_buf(&mut bytes)).await {
            Err(_) => return Err(HelloError::Timeout),
            Ok(Ok(0)) | Ok(Err(_)) => return Err(HelloError::Closed),
            Ok(Ok(_)) => {}
        }
    }
}

#[derive(Debug, PartialEq)]
enum Progress {
    NeedMore,
    Done(Option<String>),
    Failed(HelloError),
}

/// Looks at what has been read: records are reassembled into the first handshake message,
/// which must be a ClientHello.
fn parse(buf: &[u8], max: usize) -> Progress {
    let mut message: Vec<u8> = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = buf.get(at..at + RECORD_HEADER) else {
            return need_more(at + RECORD_HEADER, max);
        };
        // SSLv2-style hellos and anything that is not a handshake record are not TLS we route.
        if header[0] != HANDSHAKE || header[1] != 3 {
            return Progress::Failed(HelloError::NotTls);
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return Progress::Failed(HelloError::NotTls);
        }
        let end = at + RECORD_HEADER + len;
        let Some(payload) = buf.get(at + RECORD_HEADER..end) else {
            return need_more(end, max);
        };
        message.extend_from_slice(payload);
        at = end;
        if message.len() < 4 {
            continue;
        }
        if message[0] != CLIENT_HELLO {
            return Progress::Failed(HelloError::NotTls);
        }
        let body_len =
            usize::from(message[1]) << 16 | usize::from(message[2]) << 8 | usize::from(message[3]);
        let whole = 4 + body_len;
        if message.len() >= whole {
            return match server_name(&message[4..whole]) {
                Ok(sni) => Progress::Done(sni),
                Err(()) => Progress::Failed(HelloError::NotTls),
            };
        }
        // The rest of the message needs at least this many more bytes (plus record headers).
        if at + (whole - message.len()) + RECORD_HEADER > max {
            return Progress::Failed(HelloError::TooLarge);
        }
    }
}

fn need_more(needed: usize, max: usize) -> Progress {
    if needed > max {
        Progress::Failed(HelloError::TooLarge)
    } else {
        Progress::NeedMore
    }
}

/// A bounds-checked reader over a ClientHello body.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ()> {
        if self.0.len() < n {
            return Err(());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<usize, ()> {
        Ok(usize::from(self.take(1)?[0]))
    }

    fn u16(&mut self) -> Result<usize, ()> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn vec8(&mut self) -> Result<&'a [u8], ()> {
        let n = self.u8()?;
        self.take(n)
    }

    fn vec16(&mut self) -> Result<&'a [u8], ()> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// The host name of the `server_name` extension (RFC 6066 §3) of a ClientHello body, if any.
fn server_name(body: &[u8]) -> Result<Option<String>, ()> {
    let mut c = Cursor(body);
    c.take(2 + 32)?; // legacy_version, random
    if c.vec8()?.len() > 32 {
        return Err(());
    }
    let suites = c.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(());
    }
    if c.vec8()?.is_empty() {
        return Err(());
    }
    if c.0.is_empty() {
        return Ok(None); // No extensions at all (a TLS 1.2-only client may send none).
    }
    let mut exts = Cursor(c.vec16()?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        if kind != 0 {
            continue;
        }
        let mut list = Cursor(Cursor(data).vec16()?);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec16()?;
            if name_type == 0 {
                return host_name(name).map(Some);
            }
        }
        return Ok(None);
    }
    Ok(None)
}

/// A DNS host name as sent in SNI, normalised for lookup; anything else is malformed.
fn host_name(raw: &[u8]) -> Result<String, ()> {
    let name = raw.strip_suffix(b".").unwrap_or(raw);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(());
    }
    Ok(String::from_utf8_lossy(name).to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello from rustls, as one record.
    fn rustls_hello(sni: &str) -> Vec<u8> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(sni.to_string()).expect("name");
        let mut conn =
            rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("client");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("hello");
        out
    }

    /// The same handshake bytes cut into records of at most `size` payload bytes.
    fn fragment(record: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in record[5..].chunks(size) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&u16::try_from(piece.len()).expect("len").to_be_bytes());
            out.extend_from_slice(piece);
        }
        out
    }

    #[test]
    fn sni_from_one_record_and_from_fragments() {
        let hello = rustls_hello("API.example.com");
        assert_eq!(
            parse(&hello, 16384),
            Progress::Done(Some("api.example.com".into()))
        );
        for size in [1, 7, 100, 500] {
            let f = fragment(&hello, size);
            assert_eq!(
                parse(&f, 1 << 20),
                Progress::Done(Some("api.example.com".into())),
                "{size}"
            );
            // Every strict prefix only asks for more.
            for cut in [0, 3, 5, f.len() / 2, f.len() - 1] {
                assert_eq!(
                    parse(&f[..cut], 1 << 20),
                    Progress::NeedMore,
                    "{size} cut {cut}"
                );
            }
        }
    }

    #[test]
    fn bad_input_is_classified() {
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n", 16384),
            Progress::Failed(HelloError::NotTls)
        );
        assert_eq!(
            parse(&[22, 3, 1, 0, 0], 16384),
            Progress::Failed(HelloError::NotTls)
        );
        // A handshake record holding a ServerHello.
        assert_eq!(
            parse(&[22, 3, 3, 0, 4, 2, 0, 0, 0], 16384),
            Progress::Failed(HelloError::NotTls)
        );
        // A ClientHello announcing 100 KB does not fit 16 KiB.
        assert_eq!(
            parse(&[22, 3, 1, 0, 4, 1, 1, 0x86, 0xa0], 16384),
            Progress::Failed(HelloError::TooLarge)
        );
        // A hello whose lengths do not add up.
        let mut hello = rustls_hello("a.example");
        hello[5 + 4 + 34] = 200; // session id length
        assert_eq!(parse(&hello, 16384), Progress::Failed(HelloError::NotTls));
    }

    #[tokio::test]
    async fn reader_bounds_and_deadline() {
        let hello = rustls_hello("x.test");
        let mut trailing = hello.clone();
        trailing.extend_from_slice(b"early");
        let got = read(&mut &trailing[..], 16384, Duration::from_secs(1))
            .await
            .expect("hello");
        assert_eq!(got.bytes, trailing);
        assert_eq!(got.sni.as_deref(), Some("x.test"));
        let cut = read(&mut &hello[..40], 16384, Duration::from_secs(1)).await;
        assert_eq!(cut.err(), Some(HelloError::Closed));
        // One byte per record: six times the bytes, over the bound.
        let tiny = fragment(&hello, 1);
        assert!(tiny.len() > 1024);
        let small = read(&mut &tiny[..], 1024, Duration::from_secs(1)).await;
        assert_eq!(small.err(), Some(HelloError::TooLarge));
        let (_keep, mut idle) = tokio::io::duplex(64);
        let slow = read(&mut idle, 16384, Duration::from_millis(50)).await;
        assert_eq!(slow.err(), Some(HelloError::Timeout));
    }
}
