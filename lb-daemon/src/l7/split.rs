//! A route's weighted split across clusters (canary releases), and what keeps one client on
//! one side: a cookie lbd sets, or a hash of a request header or of the client address.
//!
//! Sides are consecutive ranges of `0..total` weight; a draw (random, or a key's hash scaled
//! to the total) falls into one. Weight-0 sides have empty ranges and are never drawn, so a
//! canary is stopped by setting its weight to 0, which also releases clients stuck to it.
use std::net::IpAddr;

use http::{HeaderMap, HeaderValue};
use lb_common::hash::hash64;

use super::sticky::{parse_token, token};
use crate::balance::{Rng, cookie};
use crate::config::model::{Model, Split, SplitSticky};

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
    rng: Rng,
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
            rng: Rng::new(None),
        })
    }

    /// Chooses the side for one request. Does not allocate.
    pub fn pick(&self, headers: &HeaderMap, client: IpAddr) -> Pick<'_> {
        match &self.sticky {
            SplitSticky::None => self.at(self.random(), false),
            SplitSticky::Cookie => {
                let kept = cookie(headers, &self.cookie)
                    .and_then(parse_token)
                    .and_then(|t| self.sides.iter().position(|s| s.token == t && s.weight > 0));
                match kept {
                    Some(side) => self.pick_side(side, false),
                    None => self.at(self.random(), true),
                }
            }
            SplitSticky::Header(name) => match headers.get(name).map(HeaderValue::as_bytes) {
                Some(v) if !v.is_empty() => self.at(self.scale(hash64(v, self.key_seed)), false),
                _ => self.at(self.random(), false),
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

    fn random(&self) -> u64 {
        self.rng.below(self.total)
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
