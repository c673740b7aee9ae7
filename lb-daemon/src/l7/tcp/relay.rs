//! `mode = "tcp"` listeners: each connection's bytes are relayed to an endpoint of the
//! listener's cluster, chosen by its balancer (health, drain, passive ejection and
//! `max_connections` as for HTTP), with another endpoint tried when a connect fails. A relay
//! with no byte in either direction for the listener's `idle_timeout` is closed. Passthrough
//! listeners relay through here too, once they have picked the cluster.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::balance::PickContext;
use crate::config::model::ProxyProtocol;
use crate::l7::cluster::{ClusterRuntime, Picked};
use crate::l7::server::{ActivityIo, CloseReason, now_ms};

/// What a relay needs besides its sockets.
#[derive(Debug)]
pub(in crate::l7) struct Relay<'a> {
    /// The client (as a front load balancer's PROXY header named it, if one did).
    pub client: SocketAddr,
    /// The address the client connected to, from an accepted PROXY header.
    pub dst: Option<SocketAddr>,
    /// PROXY header sent to the endpoint first.
    pub proxy: Option<ProxyProtocol>,
    /// Bytes already read from the client (a ClientHello), sent before anything else.
    pub replay: &'a [u8],
    /// Close after this long without a byte either way.
    pub idle: Duration,
}

/// Relays `down` to an endpoint of `cluster` until either side closes, the relay idles out,
/// or the listener drains.
pub(in crate::l7) async fn serve(
    down: TcpStream,
    cluster: Arc<ClusterRuntime>,
    relay: Relay<'_>,
    shutdown: &mut watch::Receiver<bool>,
) -> CloseReason {
    let client = relay.client;
    let headers = http::HeaderMap::new();
    let ctx = PickContext {
        client_ip: client.ip(),
        headers: &headers,
    };
    let attempts = 1 + cluster.config.retry.attempts as usize;
    let mut tried = Vec::with_capacity(attempts);
    for _ in 0..attempts {
        let (idx, _in_flight) = match cluster.pick_within_limit(&ctx, &tried) {
            Picked::Endpoint(i, guard) => (i, guard),
            Picked::None | Picked::AllAtLimit => break,
        };
        tried.push(idx);
        let Some(ep) = cluster.config.endpoints.get(idx) else {
            break;
        };
        let connect = tokio::time::timeout(
            cluster.config.timeouts.connect,
            TcpStream::connect(ep.address),
        )
        .await;
        let mut up = match connect {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(cluster = %cluster.name, endpoint = %ep.address, error = %e, "tcp upstream connect failed");
                cluster.passive_failure(idx);
                continue;
            }
            Err(_) => {
                tracing::warn!(cluster = %cluster.name, endpoint = %ep.address, "tcp upstream connect timed out");
                cluster.passive_failure(idx);
                continue;
            }
        };
        let _ = up.set_nodelay(true);
        let mut first = match relay.proxy {
            Some(v) => {
                let dst = relay
                    .dst
                    .or_else(|| down.local_addr().ok())
                    .unwrap_or(client);
                proxy_header(v, client, dst)
            }
            None => Vec::new(),
        };
        first.extend_from_slice(relay.replay);
        if !first.is_empty()
            && let Err(e) = up.write_all(&first).await
        {
            tracing::debug!(cluster = %cluster.name, endpoint = %ep.address, error = %e, "first bytes not sent to the endpoint");
            return CloseReason::Error;
        }
        return copy(down, up, relay.idle, shutdown, &cluster.name).await;
    }
    tracing::warn!(cluster = %cluster.name, client = %client, "no endpoint took the tcp connection");
    CloseReason::Error
}

/// Copies both ways until one side closes, nothing moves for `idle`, or the listener drains.
async fn copy(
    down: TcpStream,
    up: TcpStream,
    idle: Duration,
    shutdown: &mut watch::Receiver<bool>,
    cluster: &str,
) -> CloseReason {
    let activity = Arc::new(AtomicU64::new(now_ms()));
    let mut down = ActivityIo::new(down, Arc::clone(&activity));
    let mut up = ActivityIo::new(up, Arc::clone(&activity));
    let relay = tokio::io::copy_bidirectional(&mut down, &mut up);
    tokio::pin!(relay);
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    let mut ticker = tokio::time::interval(idle.max(Duration::from_millis(100)) / 4);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = relay.as_mut() => return match r {
                Ok(_) => CloseReason::Client,
                Err(e) => {
                    tracing::debug!(cluster, error = %e, "tcp relay ended with an error");
                    CloseReason::Error
                }
            },
            _ = shutdown.wait_for(|s| *s) => return CloseReason::Drain,
            _ = ticker.tick() => {
                if now_ms().saturating_sub(activity.load(Ordering::Relaxed)) >= idle_ms {
                    tracing::debug!(cluster, "tcp relay idle; closed");
                    return CloseReason::Idle;
                }
            }
        }
    }
}

/// The PROXY protocol header for a TCP connection from `src` to `dst` (lbd's listener).
/// Mixed families (an IPv4 client on an IPv6 socket) are sent as IPv6.
pub fn proxy_header(v: ProxyProtocol, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    use std::net::IpAddr;
    let pair = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ok((s, d)),
        (s, d) => Err((to_v6(s), to_v6(d))),
    };
    match v {
        ProxyProtocol::V1 => {
            let (fam, s, d) = match pair {
                Ok((s, d)) => ("TCP4", s.to_string(), d.to_string()),
                Err((s, d)) => ("TCP6", s.to_string(), d.to_string()),
            };
            format!("PROXY {fam} {s} {d} {} {}\r\n", src.port(), dst.port()).into_bytes()
        }
        ProxyProtocol::V2 => {
            let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
            // Version 2, command PROXY.
            h.push(0x21);
            match pair {
                Ok((s, d)) => {
                    h.push(0x11);
                    h.extend_from_slice(&12u16.to_be_bytes());
                    h.extend_from_slice(&s.octets());
                    h.extend_from_slice(&d.octets());
                }
                Err((s, d)) => {
                    h.push(0x21);
                    h.extend_from_slice(&36u16.to_be_bytes());
                    h.extend_from_slice(&s.octets());
                    h.extend_from_slice(&d.octets());
                }
            }
            h.extend_from_slice(&src.port().to_be_bytes());
            h.extend_from_slice(&dst.port().to_be_bytes());
            h
        }
    }
}

fn to_v6(ip: std::net::IpAddr) -> std::net::Ipv6Addr {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        std::net::IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_match_the_spec_examples() {
        let src: SocketAddr = "192.0.2.1:56324".parse().expect("src");
        let dst: SocketAddr = "198.51.100.2:443".parse().expect("dst");
        assert_eq!(
            proxy_header(ProxyProtocol::V1, src, dst),
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
        );
        let v2 = proxy_header(ProxyProtocol::V2, src, dst);
        assert_eq!(&v2[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(&v2[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&v2[16..24], &[192, 0, 2, 1, 198, 51, 100, 2]);
        assert_eq!(&v2[24..], &[0xdc, 0x04, 0x01, 0xbb]);
        let v6 = proxy_header(ProxyProtocol::V2, "[::1]:1".parse().expect("a"), dst);
        assert_eq!(v6.len(), 16 + 36);
        assert_eq!(v6[13], 0x21);
    }
}
