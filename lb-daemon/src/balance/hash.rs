//! Consistent hashing on a request key: `ip_hash`, `header_hash`, `cookie_hash` and `maglev`.
//!
//! All of them look the key's hash up in an `lb_common` Maglev table, with endpoints identified
//! by address, so every lbd node maps a key to the same endpoint and weights are honoured. The
//! table covers the whole tier (primaries or backups) while at least half of it is available;
//! a key whose endpoint is unavailable or already tried is rehashed, so an endpoint going down
//! or coming back moves exactly its own keys (see `build_picker` for why not a table rebuilt
//! without it). Unlike
//! nginx's `ip_hash`, which hashes only the first three octets of an IPv4 address, the whole
//! address is hashed (as Envoy does), so clients behind one /24 still spread.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use lb_common::hash::{fmix64, hash64};
use lb_common::maglev::{self, MaglevEndpoint};

use super::round_robin::RoundRobin;
use super::{Candidates, PickContext, Picker};
use crate::config::model::HashKey;

/// Seed of the request-key hash ("lbd_l7hk"); changing it remaps every key.
const KEY_SEED: u64 = 0x6c62_645f_6c37_686b;

/// Rehashes tried when the key's endpoint cannot take the request, before a linear scan. Each
/// rehash lands on an endpoint with probability equal to its share, so a key whose endpoint
/// just failed spreads like new traffic instead of piling onto a table neighbour.
const PROBES: u32 = 8;

/// Smallest table: enough slots that weights like 1:1000 still get their share.
const MIN_TABLE_SIZE: u32 = 4_099;

/// What the hash is computed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// The client address (IPv4-mapped IPv6 addresses hash as their IPv4 address).
    ClientIp,
    /// The first value of a request header.
    Header(http::HeaderName),
    /// The value of a cookie.
    Cookie(String),
}

impl From<&HashKey> for Key {
    fn from(k: &HashKey) -> Self {
        match k {
            HashKey::ClientIp => Key::ClientIp,
            HashKey::Header(h) => Key::Header(h.clone()),
            HashKey::Cookie(c) => Key::Cookie(c.clone()),
        }
    }
}

/// Maglev table size for a cluster of `endpoints`: a prime ≥ 100 per endpoint (the Maglev
/// paper's bound for even shares). It depends on the configured endpoints only, never on how
/// many are available, so a health change never resizes the table and remaps every key.
pub fn table_size(endpoints: usize) -> u32 {
    let want = u32::try_from(endpoints.saturating_mul(100))
        .unwrap_or(u32::MAX / 2)
        .max(MIN_TABLE_SIZE);
    (want..=u32::MAX)
        .find(|&n| maglev::is_prime(n))
        .unwrap_or(maglev::DEFAULT_TABLE_SIZE)
}

/// The Maglev table over `cands` (slot → position in `cands`); empty if it cannot be built.
pub fn build_table<'s>(
    cands: &Candidates,
    size: u32,
    identity: impl Fn(usize) -> &'s [u8],
) -> Arc<[u32]> {
    let eps: Vec<MaglevEndpoint<'_>> = cands
        .members()
        .iter()
        .map(|m| MaglevEndpoint {
            key: identity(m.index),
            weight: m.weight,
        })
        .collect();
    match maglev::build(&eps, size) {
        Ok(t) => t.into(),
        Err(e) => {
            // Not reachable with `table_size`; degrade to round robin rather than fail.
            tracing::warn!(error = %e, "maglev table not built; hashing falls back to round robin");
            Arc::from([])
        }
    }
}

/// Consistent hashing over the snapshot; round robin for requests without the key.
#[derive(Debug)]
pub struct HashPicker {
    cands: Candidates,
    key: Key,
    /// Slot → position in `cands`. Empty when the table could not be built.
    table: Arc<[u32]>,
    fallback: RoundRobin,
}

impl HashPicker {
    /// Builds the Maglev table over `cands` (`identity(i)` = stable key of endpoint `i`) with
    /// `size` slots (see [`table_size`]); requests without the key go round robin over
    /// `fallback`.
    pub fn new<'s>(
        cands: Candidates,
        fallback: Candidates,
        key: Key,
        size: u32,
        identity: impl Fn(usize) -> &'s [u8],
    ) -> Self {
        let table = build_table(&cands, size, identity);
        Self::with_table(cands, fallback, key, table)
    }

    /// As [`HashPicker::new`] with a table [`build_table`] made for `cands` (rebuilds reuse it
    /// while the set it covers is unchanged).
    pub fn with_table(
        cands: Candidates,
        fallback: Candidates,
        key: Key,
        table: Arc<[u32]>,
    ) -> Self {
        HashPicker {
            fallback: RoundRobin::new(fallback),
            cands,
            key,
            table,
        }
    }

    /// Hashes the request's key, or `None` when the request has none.
    fn key_hash(&self, ctx: &PickContext<'_>) -> Option<u64> {
        let bytes: &[u8] = match &self.key {
            Key::ClientIp => {
                return Some(match ctx.client_ip {
                    IpAddr::V4(a) => hash64(&a.octets(), KEY_SEED),
                    IpAddr::V6(a) => match a.to_ipv4_mapped() {
                        Some(v4) => hash64(&v4.octets(), KEY_SEED),
                        None => hash64(&a.octets(), KEY_SEED),
                    },
                });
            }
            Key::Header(name) => ctx.headers.get(name)?.as_bytes(),
            Key::Cookie(name) => cookie(ctx.headers, name.as_bytes())?,
        };
        (!bytes.is_empty()).then(|| hash64(bytes, KEY_SEED))
    }
}

/// The value of cookie `name` across all `Cookie` headers (HTTP/2 may split them), without
/// allocating. An empty value counts as absent.
pub fn cookie<'h>(headers: &'h http::HeaderMap, name: &[u8]) -> Option<&'h [u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (pair[..eq].trim_ascii() == name).then(|| pair[eq + 1..].trim_ascii())
        })
        .filter(|v| !v.is_empty())
}

impl Picker for HashPicker {
    fn pick(&self, ctx: &PickContext<'_>, tried: &[usize]) -> Option<usize> {
        if self.table.is_empty() {
            return self.fallback.pick_any(tried);
        }
        let Some(mut h) = self.key_hash(ctx) else {
            return self.fallback.pick_any(tried);
        };
        let now = Instant::now();
        let size = self.table.len() as u64;
        let mut pos = 0usize;
        for attempt in 0..PROBES {
            pos = self.table[(h % size) as usize] as usize;
            if self.cands.qualifies(pos, tried, now) {
                return Some(self.cands.members()[pos].index);
            }
            h = fmix64(h ^ u64::from(attempt + 1));
        }
        self.cands.scan_from(pos, tried, now)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    use crate::health::ClusterHealth;

    fn addr_keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{}:80", i + 1)).collect()
    }

    fn picker(key: Key, weights: &[u32], keys: &[String], h: &Arc<ClusterHealth>) -> HashPicker {
        let c = cands(weights, h);
        HashPicker::new(c.clone(), c, key, table_size(keys.len()), |i| {
            keys[i].as_bytes()
        })
    }

    fn ip_ctx(headers: &http::HeaderMap, i: u32) -> PickContext<'_> {
        PickContext {
            client_ip: IpAddr::from((0x0a00_0000u32 + i).to_be_bytes()),
            headers,
        }
    }

    #[test]
    fn table_size_is_prime_and_follows_configured_endpoints() {
        assert_eq!(table_size(3), 4_099);
        let s = table_size(1_000);
        assert!(
            maglev::is_prime(s) && (100_000..100_100).contains(&s),
            "{s}"
        );
    }

    #[test]
    fn ip_hash_is_stable_and_spreads() {
        let keys = addr_keys(3);
        let h = health(3);
        let p = picker(Key::ClientIp, &[1, 1, 1], &keys, &h);
        let hm = http::HeaderMap::new();
        for i in [1u32, 77, 40_000] {
            let first = p.pick(&ip_ctx(&hm, i), &[]);
            for _ in 0..1000 {
                assert_eq!(p.pick(&ip_ctx(&hm, i), &[]), first);
            }
        }
        let mut c = [0usize; 3];
        for i in 0..3000 {
            c[p.pick(&ip_ctx(&hm, i), &[]).expect("some")] += 1;
        }
        for (e, &n) in c.iter().enumerate() {
            assert!((850..=1150).contains(&n), "endpoint {e}: {n} of 3000");
        }
    }

    #[test]
    fn ipv4_mapped_ipv6_hashes_as_ipv4() {
        let keys = addr_keys(5);
        let h = health(5);
        let p = picker(Key::ClientIp, &[1; 5], &keys, &h);
        let hm = http::HeaderMap::new();
        for i in 0..200u32 {
            let v4 = std::net::Ipv4Addr::from(0xc000_0200 + i);
            let a = PickContext {
                client_ip: IpAddr::V4(v4),
                headers: &hm,
            };
            let b = PickContext {
                client_ip: IpAddr::V6(v4.to_ipv6_mapped()),
                headers: &hm,
            };
            assert_eq!(p.pick(&a, &[]), p.pick(&b, &[]));
        }
    }

    fn cookie_headers(value: &str) -> http::HeaderMap {
        let mut hm = http::HeaderMap::new();
        hm.append(
            http::header::COOKIE,
            "theme=dark; lang=en".parse().expect("ok"),
        );
        hm.append(http::header::COOKIE, value.parse().expect("ok"));
        hm
    }

    #[test]
    fn cookie_hash_is_stable_and_spreads() {
        let keys = addr_keys(3);
        let h = health(3);
        let p = picker(Key::Cookie("sid".into()), &[1, 1, 1], &keys, &h);
        let mut c = [0usize; 3];
        for i in 0..3000 {
            let hm = cookie_headers(&format!("a=1;  sid={i:x}; z=2"));
            let first = p.pick(&ctx(&hm), &[]).expect("some");
            c[first] += 1;
            if i < 3 {
                for _ in 0..1000 {
                    assert_eq!(p.pick(&ctx(&hm), &[]), Some(first));
                }
            }
        }
        for (e, &n) in c.iter().enumerate() {
            assert!((850..=1150).contains(&n), "endpoint {e}: {n} of 3000");
        }
    }

    #[test]
    fn cookie_parsing_matches_names_exactly() {
        let hm = cookie_headers("xsid=no; sid=yes;sidx=no");
        assert_eq!(cookie(&hm, b"sid"), Some(&b"yes"[..]));
        assert_eq!(cookie(&hm, b"lang"), Some(&b"en"[..]));
        assert_eq!(cookie(&hm, b"id"), None);
        assert_eq!(cookie(&cookie_headers("sid="), b"sid"), None);
        assert_eq!(cookie(&http::HeaderMap::new(), b"sid"), None);
        assert_eq!(
            cookie(&cookie_headers(" sid = v ; "), b"sid"),
            Some(&b"v"[..])
        );
    }

    #[test]
    fn missing_header_or_cookie_falls_back_to_round_robin() {
        let keys = addr_keys(3);
        let h = health(3);
        for key in [
            Key::Header(http::HeaderName::from_static("x-user")),
            Key::Cookie("sid".into()),
        ] {
            let p = picker(key, &[1, 1, 1], &keys, &h);
            let c = counts(&p, 3, 3000);
            assert_eq!(c, vec![1000, 1000, 1000]);
        }
    }

    #[test]
    fn header_hash_follows_the_header_value() {
        let keys = addr_keys(4);
        let h = health(4);
        let p = picker(
            Key::Header(http::HeaderName::from_static("x-user")),
            &[1; 4],
            &keys,
            &h,
        );
        let mut seen = [false; 4];
        for i in 0..200 {
            let mut hm = http::HeaderMap::new();
            hm.insert("x-user", format!("user-{i}").parse().expect("ok"));
            let first = p.pick(&ctx(&hm), &[]).expect("some");
            seen[first] = true;
            for _ in 0..20 {
                assert_eq!(p.pick(&ctx(&hm), &[]), Some(first));
            }
        }
        assert!(seen.iter().all(|s| *s), "{seen:?}");
    }

    /// The endpoint of each of `n` client IPs.
    fn assignment(p: &HashPicker, n: u32) -> Vec<usize> {
        let hm = http::HeaderMap::new();
        (0..n)
            .map(|i| p.pick(&ip_ctx(&hm, i), &[]).expect("some"))
            .collect()
    }

    /// The endpoint of each of `n` client IPs, through the balancer.
    fn balanced(b: &super::super::Balancer, n: u32) -> Vec<usize> {
        let hm = http::HeaderMap::new();
        (0..n)
            .map(|i| b.pick(&ip_ctx(&hm, i), &[]).expect("some"))
            .collect()
    }

    #[test]
    fn removing_one_endpoint_moves_only_its_keys() {
        use crate::config::model::Policy;
        for policy in [Policy::IpHash, Policy::Maglev(HashKey::ClientIp)] {
            let c = cluster(
                policy,
                &[(1, false), (2, false), (1, false), (1, false), (1, true)],
            );
            let h = health(5);
            let b = super::super::Balancer::new(&c, Arc::clone(&h));
            let before = balanced(&b, 10_000);
            h.endpoints[2].set_active_healthy(false);
            b.rebuild();
            assert_eq!(b.snapshot(), vec![0, 1, 3]);
            let after = balanced(&b, 10_000);
            let mut spread = [0usize; 5];
            for (x, y) in before.iter().zip(&after) {
                if *x == 2 {
                    spread[*y] += 1;
                } else {
                    assert_eq!(x, y, "a key of another endpoint moved");
                }
            }
            assert_eq!(spread[2], 0);
            assert_eq!(spread[4], 0, "backup used while primaries are up");
            // Endpoint 2's keys spread over the rest by weight (1:2:1).
            let moved: usize = spread.iter().sum();
            assert!(moved > 1_300, "endpoint 2 had {moved} keys");
            assert!(spread[1] > spread[0] && spread[1] > spread[3], "{spread:?}");
            // Back again: exactly its old keys return.
            h.endpoints[2].set_active_healthy(true);
            b.rebuild();
            assert_eq!(balanced(&b, 10_000), before);
        }
    }

    #[test]
    fn with_most_of_the_tier_down_the_table_covers_the_survivors() {
        use crate::config::model::Policy;
        let c = cluster(Policy::IpHash, &[(1, false); 6]);
        let h = health(6);
        let b = super::super::Balancer::new(&c, Arc::clone(&h));
        for e in &h.endpoints[..4] {
            e.set_active_healthy(false);
        }
        b.rebuild();
        let a = balanced(&b, 6_000);
        let on4 = a.iter().filter(|&&x| x == 4).count();
        assert!(a.iter().all(|&x| x == 4 || x == 5));
        assert!(
            (2_700..=3_300).contains(&on4),
            "{on4} of 6000 on endpoint 4"
        );
    }

    #[test]
    fn unavailable_endpoint_keys_rehash_and_others_stay() {
        let keys = addr_keys(4);
        let h = health(4);
        let p = picker(Key::ClientIp, &[1; 4], &keys, &h);
        let before = assignment(&p, 4_000);
        // Stale snapshot: endpoint 1 went down, no rebuild yet.
        h.endpoints[1].set_active_healthy(false);
        let after = assignment(&p, 4_000);
        let mut spread = [0usize; 4];
        for (b, a) in before.iter().zip(&after) {
            if *b == 1 {
                spread[*a] += 1;
            } else {
                assert_eq!(a, b);
            }
        }
        assert_eq!(spread[1], 0);
        assert!(
            spread[0] > 100 && spread[2] > 100 && spread[3] > 100,
            "{spread:?}"
        );
    }

    #[test]
    fn tried_endpoint_is_skipped_consistently() {
        let keys = addr_keys(3);
        let h = health(3);
        let p = picker(Key::ClientIp, &[1, 1, 1], &keys, &h);
        let hm = http::HeaderMap::new();
        for i in 0..300 {
            let first = p.pick(&ip_ctx(&hm, i), &[]).expect("some");
            let retry = p.pick(&ip_ctx(&hm, i), &[first]).expect("some");
            assert_ne!(retry, first);
            assert_eq!(p.pick(&ip_ctx(&hm, i), &[first]), Some(retry));
            let all: Vec<usize> = vec![0, 1, 2];
            assert_eq!(p.pick(&ip_ctx(&hm, i), &all), None);
        }
    }

    #[test]
    fn weights_are_honoured() {
        let keys = addr_keys(3);
        let h = health(3);
        let p = picker(Key::ClientIp, &[5, 3, 2], &keys, &h);
        let a = assignment(&p, 30_000);
        for (e, want) in [0.5, 0.3, 0.2].into_iter().enumerate() {
            let got = a.iter().filter(|&&x| x == e).count() as f64 / 30_000.0;
            assert!((got - want).abs() <= 0.03, "endpoint {e}: {got} vs {want}");
        }
    }
}
