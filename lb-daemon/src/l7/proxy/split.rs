//! A route's weighted split across clusters (canary releases), and what keeps one client on
//! one side: a cookie lbd sets, or a hash of a request header or of the client address.
//!
//! Sides are consecutive ranges of `0..total` weight; a draw (a key's hash scaled to the total,
//! or for requests without a key the next point of a golden-ratio Weyl sequence) falls into
//! one. The Weyl sequence is evenly spread at every length, so 90/10 is 90/10 within a few
//! requests over any stretch of traffic rather than only on average, as random draws would be. Weight-0 sides have empty ranges and are never drawn, so a
//! canary is stopped by setting its weight to 0, which also releases clients stuck to it.
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderMap, HeaderValue};
use lb_common::hash::hash64;

use crate::balance::cookie;
use crate::config::model::{Model, Split, SplitSticky};
use crate::l7::cluster::sticky::{parse_token, token};

/// 2^64 / φ, odd: the step of the Weyl sequence.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// One side: a cluster and its range of the total weight.
#[derive(Debug)]
struct Side {
    cluster: usize,
    /// End (exclusive) of this side's range; its start is the previous side's end.
    end: u64,
    weight: u32,
    /// Names this side in the split cookie.
    token: u64,
    /// `Set-Cookie` naming this side (cookie stickiness only).
    set_cookie: Option<HeaderValue>,
}

/// A route's split, built once per config generation.
#[derive(Debug)]
pub struct SplitRuntime {
    sides: Box<[Side]>,
    total: u64,
    sticky: SplitSticky,
    /// `lbd_split_<route>`.
    cookie: Box<[u8]>,
    /// Per route, so one client's hash does not land it on the canary of every route at once.
    key_seed: u64,
    /// Position in the Weyl sequence (one relaxed `fetch_add` per draw).
    weyl: AtomicU64,
}

/// The side chosen for one request.
#[derive(Debug, Clone, Copy)]
pub struct Pick<'a> {
    /// Index of the side (into the split's sides).
    pub side: usize,
    /// Cluster index of the side.
    pub cluster: usize,
    /// `Set-Cookie` for the answer, when the client is to be told its side.
    pub set_cookie: Option<&'a HeaderValue>,
}

/// The split cookie's name for `route`: route-name bytes that are not cookie-name characters
/// become `_`.
pub fn cookie_name(route: &str) -> String {
    let safe: String = route
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b) {
                char::from(b)
            } else {
                '_'
            }
        })
        .collect();
    format!("lbd_split_{safe}")
}

impl SplitRuntime {
    /// Builds the ranges and cookies of `route`'s `split`; `None` when no side has weight
    /// (which validation rejects).
    pub fn new(route: &str, split: &Split, model: &Model) -> Option<Self> {
        let name = cookie_name(route);
        let mut end = 0;
        let sides = split
            .sides
            .iter()
            .map(|s| {
                end += u64::from(s.weight);
                let cluster = model
                    .clusters
                    .get(s.cluster)
                    .map_or("", |c| c.name.as_str());
                let token = token(&[route, cluster]);
                let set_cookie = (split.sticky == SplitSticky::Cookie)
                    .then(|| {
                        HeaderValue::try_from(format!(
                            "{name}={token:016x}; Path=/; HttpOnly; SameSite=Lax"
                        ))
                        .ok()
                    })
                    .flatten();
                Side {
                    cluster: s.cluster,
                    end,
                    weight: s.weight,
                    token,
                    set_cookie,
                }
            })
            .collect();
        if end == 0 {
            return None;
        }
        Some(SplitRuntime {
            sides,
            total: end,
            sticky: split.sticky.clone(),
            cookie: name.into_bytes().into(),
            key_seed: hash64(route.as_bytes(), 0),
            weyl: AtomicU64::new(rand::random()),
        })
    }

    /// Chooses the side for one request. Does not allocate.
    pub fn pick(&self, headers: &HeaderMap, client: IpAddr) -> Pick<'_> {
        match &self.sticky {
            SplitSticky::None => self.at(self.draw(), false),
            SplitSticky::Cookie => {
                let kept = cookie(headers, &self.cookie)
                    .and_then(parse_token)
                    .and_then(|t| self.sides.iter().position(|s| s.token == t && s.weight > 0));
                match kept {
                    Some(side) => self.pick_side(side, false),
                    None => self.at(self.draw(), true),
                }
            }
            SplitSticky::Header(name) => match headers.get(name).map(HeaderValue::as_bytes) {
                Some(v) if !v.is_empty() => self.at(self.scale(hash64(v, self.key_seed)), false),
                _ => self.at(self.draw(), false),
            },
            SplitSticky::ClientIp => {
                let h = match client {
                    IpAddr::V4(a) => hash64(&a.octets(), self.key_seed),
                    IpAddr::V6(a) => match a.to_ipv4_mapped() {
                        Some(v4) => hash64(&v4.octets(), self.key_seed),
                        None => hash64(&a.octets(), self.key_seed),
                    },
                };
                self.at(self.scale(h), false)
            }
        }
    }

    /// The next unkeyed draw in `0..total`.
    fn draw(&self) -> u64 {
        self.scale(self.weyl.fetch_add(GOLDEN, Ordering::Relaxed))
    }

    /// A hash scaled into `0..total` (multiply-high: no modulo bias worth speaking of).
    fn scale(&self, h: u64) -> u64 {
        ((u128::from(h) * u128::from(self.total)) >> 64) as u64
    }

    /// The side whose range holds `point`.
    fn at(&self, point: u64, tell: bool) -> Pick<'_> {
        let side = self.sides.iter().position(|s| point < s.end).unwrap_or(0);
        self.pick_side(side, tell)
    }

    fn pick_side(&self, side: usize, tell: bool) -> Pick<'_> {
        let s = &self.sides[side];
        Pick {
            side,
            cluster: s.cluster,
            set_cookie: if tell { s.set_cookie.as_ref() } else { None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::SplitSide;

    fn split(weights: &[u32], sticky: SplitSticky) -> SplitRuntime {
        let split = Split {
            sides: weights
                .iter()
                .enumerate()
                .map(|(cluster, &weight)| SplitSide { cluster, weight })
                .collect(),
            sticky,
        };
        let model = crate::config::parse(
            "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\n[[clusters]]\nname = \"c\"\n\
             [[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n",
            std::path::Path::new("t.toml"),
        )
        .expect("model");
        SplitRuntime::new("r", &split, &model).expect("split")
    }

    #[test]
    fn unkeyed_draws_follow_the_weights_closely_at_every_length() {
        let s = split(&[90, 10], SplitSticky::None);
        let h = HeaderMap::new();
        let ip = IpAddr::from([127, 0, 0, 1]);
        let mut n = [0u32; 2];
        for i in 1..=10_000u32 {
            n[s.pick(&h, ip).side] += 1;
            if i % 100 == 0 {
                // Within 3 requests of the exact share after any 100.
                assert!(n[1].abs_diff(i / 10) <= 3, "{i}: {n:?}");
            }
        }
    }

    #[test]
    fn zero_weight_sides_are_never_drawn() {
        let s = split(&[0, 5, 0], SplitSticky::ClientIp);
        let h = HeaderMap::new();
        for i in 0..1000u32 {
            assert_eq!(s.pick(&h, IpAddr::from(i.to_be_bytes())).side, 1);
        }
    }

    #[test]
    fn cookie_keeps_its_side_and_only_a_new_client_is_told() {
        let s = split(&[50, 50], SplitSticky::Cookie);
        let ip = IpAddr::from([127, 0, 0, 1]);
        let first = s.pick(&HeaderMap::new(), ip);
        let set = first.set_cookie.expect("told").to_str().expect("ascii");
        assert!(set.starts_with("lbd_split_r="), "{set}");
        assert!(set.ends_with("; Path=/; HttpOnly; SameSite=Lax"), "{set}");
        let pair = set.split(';').next().expect("pair");
        let mut h = HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            HeaderValue::from_str(pair).expect("value"),
        );
        for _ in 0..100 {
            let p = s.pick(&h, ip);
            assert_eq!(p.side, first.side);
            assert!(p.set_cookie.is_none());
        }
        h.insert(
            http::header::COOKIE,
            HeaderValue::from_static("lbd_split_r=zz"),
        );
        assert!(s.pick(&h, ip).set_cookie.is_some());
    }

    #[test]
    fn cookie_names_are_tokens() {
        assert_eq!(cookie_name("api v2/x"), "lbd_split_api_v2_x");
    }
}
