//! `access`: allow or deny clients by address (CIDR lists).
use std::net::IpAddr;

use super::super::check::Checker;
use super::super::raw::S;

/// `{ allow = ["10.0.0.0/8"], deny = ["10.1.0.0/16"], trusted_hops = 0 }`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub allow: Option<Vec<S<String>>>,
    pub deny: Option<Vec<S<String>>>,
    pub trusted_hops: Option<S<i64>>,
}

/// An address block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Network address (host bits zero).
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl Cidr {
    /// Whether `ip` is inside the block (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(a) & mask == u32::from(n)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(a) & mask == u128::from(n)
            }
            _ => false,
        }
    }

    /// Parses `ip/len` or a bare address (a host block).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("invalid address {a:?} in {s:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("invalid prefix length in {s:?} (0..={max})"))?,
            None => max,
        };
        let block = Cidr { addr, len };
        let host_bits = match addr {
            IpAddr::V4(v) => {
                u32::from(v) & !u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0) != 0
            }
            IpAddr::V6(v) => {
                u128::from(v) & !u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0) != 0
            }
        };
        if host_bits {
            return Err(format!(
                "{s:?} has host bits set; did you mean the network address?"
            ));
        }
        Ok(block)
    }
}

/// A validated `access` filter: a client in `deny` is refused; with an `allow` list, a
/// client outside it is refused too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// Allowed blocks; empty = everyone not denied.
    pub allow: Vec<Cidr>,
    /// Denied blocks (checked first).
    pub deny: Vec<Cidr>,
    /// Proxies in front of lbd whose `X-Forwarded-For` entries are trusted: the client is
    /// the entry this many hops from the right (0 = the socket's peer).
    pub trusted_hops: u32,
}

/// Checks one `access` table.
pub(crate) fn check(c: &mut Checker<'_>, raw: &S<Raw>, key: &str) -> Option<Spec> {
    let r = raw.get_ref();
    let mut ok = true;
    let mut list = |field: &str, v: &Option<Vec<S<String>>>, c: &mut Checker<'_>| {
        let mut out = Vec::new();
        for (i, s) in v.iter().flatten().enumerate() {
            match Cidr::parse(s.get_ref()) {
                Ok(b) => out.push(b),
                Err(e) => {
                    c.err(s.span(), &format!("{key}.{field}[{i}]"), e);
                    ok = false;
                }
            }
        }
        out
    };
    let allow = list("allow", &r.allow, c);
    let deny = list("deny", &r.deny, c);
    let trusted_hops = c.u32(
        r.trusted_hops.as_ref(),
        &format!("{key}.trusted_hops"),
        0,
        0,
        16,
    );
    if r.allow.is_none() && r.deny.is_none() {
        c.err(raw.span(), key, "set allow, deny or both");
        return None;
    }
    ok.then_some(Spec {
        allow,
        deny,
        trusted_hops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_blocks() {
        let b = Cidr::parse("10.1.0.0/16").expect("block");
        assert!(b.contains("10.1.200.3".parse().expect("ip")));
        assert!(!b.contains("10.2.0.1".parse().expect("ip")));
        assert!(b.contains("::ffff:10.1.0.9".parse().expect("ip")));
        let all = Cidr::parse("0.0.0.0/0").expect("block");
        assert!(all.contains("192.0.2.1".parse().expect("ip")));
        let v6 = Cidr::parse("2001:db8::/32").expect("block");
        assert!(v6.contains("2001:db8::1".parse().expect("ip")));
        assert!(!v6.contains("2001:db9::1".parse().expect("ip")));
        assert!(Cidr::parse("10.1.0.1/16").is_err(), "host bits");
        assert!(Cidr::parse("10.1.0.0/33").is_err());
        assert!(Cidr::parse("nope/8").is_err());
        assert_eq!(Cidr::parse("127.0.0.1").expect("host").len, 32);
    }
}
