//! `rate_limit`: limits per key (GCRA: a rate with a burst), several per filter, kept in
//! this process or shared with other lbd instances through Redis.
use std::path::Path;
use std::time::Duration;

use http::HeaderName;

use super::super::check::Checker;
use super::super::duration::parse_duration;
use super::super::raw::S;

/// `{ key = "client_ip", limits = [{ rate = "100/s", burst = 20 }], max_keys = 1000000,
/// trusted_hops = 0, redis = { … } }`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub key: Option<S<String>>,
    pub limits: S<Vec<S<RawLimit>>>,
    pub max_keys: Option<S<i64>>,
    pub trusted_hops: Option<S<i64>>,
    pub redis: Option<S<super::rate_limit_redis::Raw>>,
}

/// One `{ rate = "N/period", burst = B }`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimit {
    pub rate: S<String>,
    pub burst: Option<S<i64>>,
}

/// What requests are counted together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// The client address (through `trusted_hops` proxies).
    ClientIp,
    /// A request header's value; requests without it share one bucket.
    Header(HeaderName),
    /// The whole route: one bucket.
    Route,
    /// The consumer named by an earlier `api_key` or `jwt` filter; requests without one
    /// share one bucket.
    Consumer,
    /// A claim of the token verified by an earlier `jwt` filter (strings and numbers);
    /// requests without it share one bucket.
    Claim(String),
}

impl Key {
    /// A short stable name (part of the Redis key, so that two filters keyed differently
    /// never share state).
    pub fn label(&self) -> String {
        match self {
            Key::ClientIp => "ip".to_owned(),
            Key::Header(h) => format!("h:{h}"),
            Key::Route => "route".to_owned(),
            Key::Consumer => "consumer".to_owned(),
            Key::Claim(c) => format!("claim:{c}"),
        }
    }
}

/// One limit: `count` requests per `period`, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Requests per period.
    pub count: u64,
    /// The period.
    pub period: Duration,
    /// Requests admitted at once from a full bucket (default: `count`, at least 1).
    pub burst: u64,
}

/// Most limits in one filter (each key's state is a fixed array of this size).
pub const MAX_LIMITS: usize = 4;

/// A validated `rate_limit` filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// What is counted together.
    pub key: Key,
    /// Every limit must admit a request.
    pub limits: Vec<Limit>,
    /// Keys remembered at most (memory bound).
    pub max_keys: usize,
    /// Trusted proxies in front of lbd for `client_ip` (as in `access`).
    pub trusted_hops: u32,
    /// Shared state in Redis instead of this process.
    pub redis: Option<super::rate_limit_redis::Spec>,
}

/// Parses `N/period`: `100/s`, `10/m`, `1000/h`, `50000/d`, `300/10s`.
fn rate(v: &str) -> Result<(u64, Duration), String> {
    let (n, p) = v
        .split_once('/')
        .ok_or_else(|| format!("invalid rate {v:?}: write N/period, e.g. \"100/s\", \"1000/h\""))?;
    let count: u64 = n
        .trim()
        .parse()
        .ok()
        .filter(|c| *c > 0)
        .ok_or_else(|| format!("invalid rate {v:?}: the count must be a whole number > 0"))?;
    let p = p.trim();
    let period = match p {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        "d" => Duration::from_secs(86_400),
        other => parse_duration(other).map_err(|e| format!("invalid rate {v:?}: {e}"))?,
    };
    if period.is_zero() || period > Duration::from_secs(86_400 * 7) {
        return Err(format!(
            "invalid rate {v:?}: the period must be > 0 and at most 7 days"
        ));
    }
    Ok((count, period))
}

/// Checks one `rate_limit` table.
pub(crate) fn check(c: &mut Checker<'_>, raw: &S<Raw>, key: &str, dir: &Path) -> Option<Spec> {
    let r = raw.get_ref();
    let mut ok = true;
    let k = match &r.key {
        None => Key::ClientIp,
        Some(v) => match v.get_ref().as_str() {
            "client_ip" => Key::ClientIp,
            "route" => Key::Route,
            "consumer" => Key::Consumer,
            other if other.starts_with("claim:") => {
                let name = &other["claim:".len()..];
                if name.is_empty() || name.len() > 128 {
                    c.err(
                        v.span(),
                        &format!("{key}.key"),
                        "claim:<name> needs a claim name (1 to 128 bytes)",
                    );
                    ok = false;
                }
                Key::Claim(name.to_owned())
            }
            other => match other.strip_prefix("header:") {
                Some(h) => match http::HeaderName::from_bytes(h.as_bytes()) {
                    Ok(n) => Key::Header(n),
                    Err(_) => {
                        c.err(
                            v.span(),
                            &format!("{key}.key"),
                            format!("invalid header name {h:?}"),
                        );
                        ok = false;
                        Key::Route
                    }
                },
                None => {
                    c.err(
                        v.span(),
                        &format!("{key}.key"),
                        format!(
                            "unknown key {other:?}; expected \"client_ip\", \"route\", \
                             \"consumer\", \"claim:<name>\" or \"header:<name>\""
                        ),
                    );
                    ok = false;
                    Key::Route
                }
            },
        },
    };
    let mut limits = Vec::new();
    let list = r.limits.get_ref();
    if list.is_empty() || list.len() > MAX_LIMITS {
        c.err(
            r.limits.span(),
            &format!("{key}.limits"),
            format!("give 1 to {MAX_LIMITS} limits"),
        );
        ok = false;
    }
    for (i, l) in list.iter().enumerate() {
        let lk = format!("{key}.limits[{i}]");
        let l = l.get_ref();
        match rate(l.rate.get_ref()) {
            Ok((count, period)) => {
                let burst = c.int(
                    l.burst.as_ref(),
                    &format!("{lk}.burst"),
                    count as i64,
                    1,
                    1 << 30,
                ) as u64;
                limits.push(Limit {
                    count,
                    period,
                    burst,
                });
            }
            Err(e) => {
                c.err(l.rate.span(), &format!("{lk}.rate"), e);
                ok = false;
            }
        }
    }
    let max_keys = c.usize(
        r.max_keys.as_ref(),
        &format!("{key}.max_keys"),
        1_000_000,
        64,
    );
    let trusted_hops = c.u32(
        r.trusted_hops.as_ref(),
        &format!("{key}.trusted_hops"),
        0,
        0,
        16,
    );
    let redis = match &r.redis {
        Some(x) => {
            let s = super::rate_limit_redis::check(c, x, &format!("{key}.redis"), dir);
            ok &= s.is_some();
            s
        }
        None => None,
    };
    ok.then_some(Spec {
        key: k,
        limits,
        max_keys,
        trusted_hops,
        redis,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(rate("100/s"), Ok((100, Duration::from_secs(1))));
        assert_eq!(rate("1000/h"), Ok((1000, Duration::from_secs(3600))));
        assert_eq!(rate("300/10s"), Ok((300, Duration::from_secs(10))));
        assert!(rate("0/s").is_err());
        assert!(rate("10").is_err());
        assert!(rate("10/fortnight").is_err());
        assert!(rate("10/0s").is_err());
    }
}
