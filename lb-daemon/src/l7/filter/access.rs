//! `access`: allow or deny clients by address. The client is the socket's peer, or, behind
//! `trusted_hops` proxies of the operator's, the `X-Forwarded-For` entry that many hops from
//! the right (Envoy's `xff_num_trusted_hops`): entries further left were written by the
//! client and prove nothing.
use std::net::IpAddr;

use super::{Exchange, Flow};
use crate::config::filter::access::{Cidr, Spec};
use crate::l7::reason::Reason;

/// The running `access` filter.
#[derive(Debug)]
pub struct Access {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
    trusted_hops: u32,
}

impl Access {
    /// Builds the filter for `spec`.
    pub fn new(spec: &Spec) -> Self {
        Access {
            allow: spec.allow.clone(),
            deny: spec.deny.clone(),
            trusted_hops: spec.trusted_hops,
        }
    }

    /// Refuses a client that is denied, or not allowed when there is an allow list.
    pub fn request(&self, ex: &mut Exchange<'_>) -> Flow {
        let ip = client_ip(&ex.head.headers, ex.conn.client.ip(), self.trusted_hops);
        if self.deny.iter().any(|c| c.contains(ip))
            || (!self.allow.is_empty() && !self.allow.iter().any(|c| c.contains(ip)))
        {
            return Flow::Refuse(Reason::AccessDenied);
        }
        Flow::Next
    }
}

/// The client address through `hops` trusted proxies; the peer when `hops` is 0 or the
/// header has fewer entries than that (or an entry that is no address).
pub fn client_ip(headers: &http::HeaderMap, peer: IpAddr, hops: u32) -> IpAddr {
    if hops == 0 {
        return peer;
    }
    let mut entries: Vec<&str> = Vec::new();
    for v in headers.get_all("x-forwarded-for") {
        let Ok(s) = v.to_str() else { return peer };
        entries.extend(s.split(',').map(str::trim).filter(|e| !e.is_empty()));
    }
    let n = hops as usize;
    if entries.len() < n {
        return peer;
    }
    parse_entry(entries[entries.len() - n]).unwrap_or(peer)
}

/// An XFF entry: an address, possibly with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_entry(e: &str) -> Option<IpAddr> {
    if let Ok(ip) = e.parse() {
        return Some(ip);
    }
    if let Ok(sa) = e.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ip_counts_trusted_hops_from_the_right() {
        let peer: IpAddr = "10.0.0.1".parse().expect("ip");
        let mut h = http::HeaderMap::new();
        h.append("x-forwarded-for", "1.1.1.1, 2.2.2.2".parse().expect("v"));
        h.append("x-forwarded-for", "3.3.3.3".parse().expect("v"));
        assert_eq!(client_ip(&h, peer, 0), peer);
        assert_eq!(client_ip(&h, peer, 1).to_string(), "3.3.3.3");
        assert_eq!(client_ip(&h, peer, 2).to_string(), "2.2.2.2");
        assert_eq!(client_ip(&h, peer, 3).to_string(), "1.1.1.1");
        assert_eq!(client_ip(&h, peer, 4), peer, "fewer entries than hops");
        let mut bad = http::HeaderMap::new();
        bad.insert("x-forwarded-for", "nonsense".parse().expect("v"));
        assert_eq!(client_ip(&bad, peer, 1), peer);
    }
}
