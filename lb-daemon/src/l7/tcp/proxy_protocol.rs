//! Accepting the PROXY protocol (v1 text, v2 binary) from a front load balancer
//! (haproxy.org/download/2.9/doc/proxy-protocol.txt): a listed source must send a header and
//! the client address it names becomes the connection's client; anyone else sending one is
//! refused, so a client cannot forge its address.
//!
//! Exactly the header's bytes are consumed (v1 through `peek`, v2 by its length field), so
//! what follows is read by the listener's protocol as if nothing had come first.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::passthrough::ProxyAccept;

/// The v2 signature.
const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// v1 header start.
const V1_SIG: &[u8; 6] = b"PROXY ";
/// The longest v1 line (spec §2.1).
const V1_MAX: usize = 107;
/// The most address and TLV bytes a v2 header may carry here; TLVs are skipped.
const V2_MAX: usize = 4096;

/// Why a connection was refused (the `reason` label of the rejection metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::l7) enum Refused {
    /// A source not in `proxy_protocol_from` sent a PROXY header.
    Unlisted,
    /// A listed source sent no header or a malformed one.
    Invalid,
    /// A listed source did not send its header within `proxy_protocol_timeout`.
    Timeout,
    /// The connection closed before the header was complete.
    Closed,
}

impl Refused {
    /// The metric label.
    pub(in crate::l7) fn as_str(self) -> &'static str {
        match self {
            Refused::Unlisted => "unlisted",
            Refused::Invalid => "invalid",
            Refused::Timeout => "timeout",
            Refused::Closed => "closed",
        }
    }
}

/// The connection's endpoints as the front load balancer saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::l7) struct Peer {
    /// The client.
    pub client: SocketAddr,
    /// The address the client connected to, when the header names one.
    pub dst: Option<SocketAddr>,
}

/// Reads the header of a listed source, or makes sure an unlisted one sends none.
pub(in crate::l7) async fn accept(
    s: &mut TcpStream,
    client: SocketAddr,
    cfg: &ProxyAccept,
) -> Result<Peer, Refused> {
    let real = Peer { client, dst: None };
    if cfg.from.iter().any(|c| c.contains(client.ip())) {
        return match tokio::time::timeout(cfg.timeout, read_header(s, real)).await {
            Ok(r) => r,
            Err(_) => Err(Refused::Timeout),
        };
    }
    // The client speaks first on HTTP and TLS; a client that says nothing within the timeout
    // (a server-speaks-first protocol on a TCP listener) is let through.
    match tokio::time::timeout(cfg.timeout, sends_header(s)).await {
        Ok(true) => Err(Refused::Unlisted),
        Ok(false) | Err(_) => Ok(real),
    }
}

/// Whether the first bytes are a PROXY signature (looked at, not consumed).
async fn sends_header(s: &TcpStream) -> bool {
    let mut buf = [0u8; 12];
    loop {
        let n = match s.peek(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        let b = &buf[..n];
        let prefix_of = |sig: &[u8]| sig.starts_with(&b[..n.min(sig.len())]);
        if b.starts_with(V1_SIG) || b == V2_SIG {
            return true;
        }
        if !prefix_of(V1_SIG) && !prefix_of(V2_SIG) {
            return false;
        }
        // A signature cut by the segment boundary: peek returns at once until more arrives.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn read_header(s: &mut TcpStream, real: Peer) -> Result<Peer, Refused> {
    let mut head = [0u8; 16];
    s.read_exact(&mut head[..6])
        .await
        .map_err(|_| Refused::Closed)?;
    if &head[..6] == V1_SIG {
        let line = read_v1_line(s).await?;
        return parse_v1(&line, real).ok_or(Refused::Invalid);
    }
    if head[..6] != V2_SIG[..6] {
        return Err(Refused::Invalid);
    }
    s.read_exact(&mut head[6..])
        .await
        .map_err(|_| Refused::Closed)?;
    if head[..12] != V2_SIG[..] {
        return Err(Refused::Invalid);
    }
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if len > V2_MAX {
        return Err(Refused::Invalid);
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.map_err(|_| Refused::Closed)?;
    parse_v2(head[12], head[13], &body, real).ok_or(Refused::Invalid)
}

/// The rest of a v1 line after `PROXY `, through its CRLF, without reading past it.
async fn read_v1_line(s: &mut TcpStream) -> Result<Vec<u8>, Refused> {
    let mut line = Vec::with_capacity(V1_MAX);
    let mut buf = [0u8; V1_MAX];
    loop {
        let room = V1_MAX - V1_SIG.len() - line.len();
        if room == 0 {
            return Err(Refused::Invalid);
        }
        let n = match s.peek(&mut buf[..room]).await {
            Ok(0) | Err(_) => return Err(Refused::Closed),
            Ok(n) => n,
        };
        let take = buf[..n]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(n, |i| i + 1);
        s.read_exact(&mut buf[..take])
            .await
            .map_err(|_| Refused::Closed)?;
        line.extend_from_slice(&buf[..take]);
        if line.ends_with(b"\n") {
            return match line.strip_suffix(b"\r\n") {
                Some(l) => Ok(l.to_vec()),
                None => Err(Refused::Invalid),
            };
        }
    }
}

/// `TCP4 <src> <dst> <sport> <dport>` (or `TCP6 …`, or `UNKNOWN …`: the real addresses).
fn parse_v1(line: &[u8], real: Peer) -> Option<Peer> {
    let line = std::str::from_utf8(line).ok()?;
    let mut f = line.split(' ');
    let family = f.next()?;
    if family == "UNKNOWN" {
        return Some(real);
    }
    let (src, dst, sport, dport) = (f.next()?, f.next()?, f.next()?, f.next()?);
    if f.next().is_some() {
        return None;
    }
    let (src, dst): (IpAddr, IpAddr) = match family {
        "TCP4" => (
            src.parse::<Ipv4Addr>().ok()?.into(),
            dst.parse::<Ipv4Addr>().ok()?.into(),
        ),
        "TCP6" => (
            src.parse::<Ipv6Addr>().ok()?.into(),
            dst.parse::<Ipv6Addr>().ok()?.into(),
        ),
        _ => return None,
    };
    Some(Peer {
        client: SocketAddr::new(src, sport.parse().ok()?),
        dst: Some(SocketAddr::new(dst, dport.parse().ok()?)),
    })
}

/// A v2 header's command, family and body (addresses, then TLVs, which are skipped).
fn parse_v2(ver_cmd: u8, family: u8, body: &[u8], real: Peer) -> Option<Peer> {
    if ver_cmd >> 4 != 2 {
        return None;
    }
    match ver_cmd & 0x0f {
        0 => return Some(real), // LOCAL: the front balancer's own connection (health checks).
        1 => {}
        _ => return None,
    }
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    match family >> 4 {
        1 => {
            let a = body.get(..12)?;
            let ip = |o: usize| IpAddr::from([a[o], a[o + 1], a[o + 2], a[o + 3]]);
            Some(Peer {
                client: SocketAddr::new(ip(0), port(&a[8..])),
                dst: Some(SocketAddr::new(ip(4), port(&a[10..]))),
            })
        }
        2 => {
            let a = body.get(..36)?;
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&a[o..o + 16]);
                IpAddr::from(b)
            };
            Some(Peer {
                client: SocketAddr::new(ip(0), port(&a[32..])),
                dst: Some(SocketAddr::new(ip(16), port(&a[34..]))),
            })
        }
        // AF_UNSPEC and AF_UNIX name no IP address: keep the real one.
        0 | 3 => Some(real),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::ProxyProtocol;
    use crate::l7::tcp::relay::proxy_header;

    fn real() -> Peer {
        Peer {
            client: "127.0.0.1:9".parse().expect("addr"),
            dst: None,
        }
    }

    #[test]
    fn v1_lines() {
        let p = parse_v1(b"TCP4 192.0.2.1 198.51.100.2 56324 443", real()).expect("v1");
        assert_eq!(p.client, "192.0.2.1:56324".parse().expect("a"));
        assert_eq!(p.dst, Some("198.51.100.2:443".parse().expect("a")));
        let p = parse_v1(b"TCP6 2001:db8::1 ::1 1 2", real()).expect("v6");
        assert_eq!(p.client, "[2001:db8::1]:1".parse().expect("a"));
        assert_eq!(parse_v1(b"UNKNOWN", real()), Some(real()));
        for bad in [
            &b"TCP4 1.2.3.4 5.6.7.8 1"[..],
            b"TCP4 ::1 ::1 1 2",
            b"TCP5 1.2.3.4 5.6.7.8 1 2",
            b"TCP4 1.2.3.4 5.6.7.8 1 99999",
            b"TCP4 1.2.3.4 5.6.7.8 1 2 3",
        ] {
            assert_eq!(
                parse_v1(bad, real()),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn v2_headers_round_trip_lbds_own() {
        for (src, dst) in [
            ("192.0.2.1:56324", "198.51.100.2:443"),
            ("[2001:db8::7]:1000", "[2001:db8::1]:443"),
        ] {
            let (src, dst): (SocketAddr, SocketAddr) =
                (src.parse().expect("src"), dst.parse().expect("dst"));
            let h = proxy_header(ProxyProtocol::V2, src, dst);
            let p = parse_v2(h[12], h[13], &h[16..], real()).expect("parsed");
            assert_eq!((p.client, p.dst), (src, Some(dst)));
        }
        // LOCAL, and a TLV after the addresses.
        assert_eq!(parse_v2(0x20, 0x00, &[], real()), Some(real()));
        let mut body = vec![10, 0, 0, 1, 10, 0, 0, 2, 0, 80, 0, 81];
        body.extend_from_slice(&[0x04, 0x00, 0x01, 0xff]);
        let p = parse_v2(0x21, 0x11, &body, real()).expect("tlv");
        assert_eq!(p.client, "10.0.0.1:80".parse().expect("a"));
        assert_eq!(parse_v2(0x21, 0x11, &body[..8], real()), None, "short");
        assert_eq!(parse_v2(0x11, 0x11, &body, real()), None, "version 1");
        assert_eq!(parse_v2(0x22, 0x11, &body, real()), None, "command 2");
    }
}
