//! `jwt`: verify a bearer token (RFC 7519/7515) and check what it allows.
//!
//! Order of checks, each failure a 401 `invalid_token` unless noted:
//! 1. the token is found (else 401 with a bare `Bearer realm=…` challenge, RFC 6750 §3.1)
//!    and no longer than `max_token_bytes` (else refused unparsed);
//! 2. three base64url parts; a JSON header whose `alg` is a signature algorithm (`none` is
//!    not one) and that has no `crit` or `b64` (no JWS extension is understood, RFC 7515
//!    §4.1.11); `jku`, `x5u`, `jwk` and `x5c` are ignored: keys come from the config only;
//! 3. the provider is the one whose `issuer` equals the (as yet unverified) `iss`, and the
//!    `alg` is on its allow-list; HMAC tokens are checked with its secret only, the others
//!    with its key-set keys of the right type (and `kid`) only: a `kid` of another
//!    provider, or an HS256 token "signed" with an RSA public key, finds no key;
//! 4. the signature; then `exp` (required) and `nbf` with `leeway`, and `aud`;
//! 5. required claims and scopes (403 `insufficient_scope`).
//!
//! Steps 2–4 are skipped for a token verified before and still current (`jwt_cache.rs`);
//! step 5 runs on every request.
//!
//! A `kid` missing from a `jwks_url` set makes one refetch, shared by every request that
//! waits on it and at most one per `refetch_interval`; a failed fetch keeps the last good
//! set. The periodic refresh runs on a task the filter owns (aborted when a reload drops it).
use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderName, HeaderValue};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};

use super::jwks::{Fetcher, KeySet};
use super::jwt_cache::{TokenCache, Verified};
use super::{Exchange, Flow};
use crate::config::filter::jwt::{ClaimRule, Provider, Spec, TokenSource};
use crate::l7::reason::Reason;

type Claims = Map<String, Value>;

/// The running `jwt` filter.
#[derive(Debug)]
pub struct Jwt {
    providers: Vec<ProviderRt>,
    source: TokenSource,
    claims: Vec<ClaimRule>,
    scopes: Vec<String>,
    claims_to_headers: Vec<(String, HeaderName)>,
    consumer_claim: String,
    max_token_bytes: usize,
    missing: HeaderValue,
    invalid: HeaderValue,
    insufficient: HeaderValue,
    cache: Option<TokenCache>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Debug)]
struct ProviderRt {
    spec: Provider,
    secret: Option<DecodingKey>,
    remote: Option<Arc<Remote>>,
}

/// A `jwks_url` key set and its fetch state.
#[derive(Debug)]
struct Remote {
    provider: String,
    fetcher: Fetcher,
    keys: ArcSwap<KeySet>,
    /// Moves on after each set stored (cached tokens name the generation they were
    /// verified under).
    generation: AtomicU64,
    /// When the last fetch started; held across a fetch so that concurrent refetches for
    /// unknown `kid`s wait for the one in flight instead of starting their own.
    last: tokio::sync::Mutex<Option<Instant>>,
}

impl Remote {
    /// Fetches unless a fetch started less than `min_gap` ago; true when the set is current
    /// (fetched now, or recently enough).
    async fn refresh(&self, min_gap: Duration, timeout: Duration) -> bool {
        let mut last = self.last.lock().await;
        if last.is_some_and(|t| t.elapsed() < min_gap) {
            return true;
        }
        *last = Some(Instant::now());
        match self.fetcher.fetch(timeout).await {
            Ok(set) => {
                // Stored first, then counted: a verification reads the generation before
                // the keys, so it never tags a check under the old set with the new number.
                self.keys.store(set);
                self.generation.fetch_add(1, Ordering::Release);
                true
            }
            Err(e) => {
                // At most one line per fetch, and fetches are rate-limited.
                tracing::warn!(
                    provider = %self.provider,
                    url = %self.fetcher.uri(),
                    error = %e,
                    "jwt: key set fetch failed; keeping the last good set"
                );
                false
            }
        }
    }
}

impl Drop for Jwt {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Why a token was refused (debug logs only: the client gets the challenge, not this).
type Why = &'static str;

enum Outcome {
    Missing,
    Invalid(Why),
    Insufficient,
    Ok(Verified),
}

fn challenge(v: String) -> HeaderValue {
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
}

impl Jwt {
    /// Builds the filter for `spec`, and starts the key-set refresh tasks when inside a
    /// runtime.
    pub fn new(spec: &Spec) -> Self {
        let rt = tokio::runtime::Handle::try_current().ok();
        let mut tasks = Vec::new();
        let providers = spec
            .providers
            .iter()
            .map(|p| {
                let secret = p
                    .secret
                    .as_ref()
                    .and_then(|s| DecodingKey::from_secret(&s.0).ok());
                let remote = p.jwks_url.as_ref().map(|u| {
                    Arc::new(Remote {
                        provider: p.name.clone(),
                        fetcher: Fetcher::new(u.clone(), p.jwks_ca.as_deref()),
                        keys: ArcSwap::from_pointee(KeySet::default()),
                        generation: AtomicU64::new(0),
                        last: tokio::sync::Mutex::new(None),
                    })
                });
                if let (Some(r), Some(rt)) = (&remote, &rt) {
                    let r = Arc::clone(r);
                    let (every, retry, timeout) = (
                        p.refresh,
                        p.refetch_interval.min(p.refresh),
                        p.fetch_timeout,
                    );
                    tasks.push(rt.spawn(async move {
                        loop {
                            let ok = r.refresh(Duration::ZERO, timeout).await;
                            tokio::time::sleep(if ok { every } else { retry }).await;
                        }
                    }));
                }
                ProviderRt {
                    spec: p.clone(),
                    secret,
                    remote,
                }
            })
            .collect();
        let realm = &spec.realm;
        let mut insufficient = format!("Bearer realm=\"{realm}\", error=\"insufficient_scope\"");
        if !spec.scopes.is_empty() && spec.scopes.iter().all(|s| !s.contains('"')) {
            insufficient.push_str(&format!(", scope=\"{}\"", spec.scopes.join(" ")));
        }
        Jwt {
            providers,
            source: spec.source.clone(),
            claims: spec.claims.clone(),
            scopes: spec.scopes.clone(),
            claims_to_headers: spec.claims_to_headers.clone(),
            consumer_claim: spec.consumer_claim.clone(),
            max_token_bytes: spec.max_token_bytes,
            missing: challenge(format!("Bearer realm=\"{realm}\"")),
            invalid: challenge(format!("Bearer realm=\"{realm}\", error=\"invalid_token\"")),
            insufficient: challenge(insufficient),
            cache: TokenCache::new(spec.cache_size),
            tasks,
        }
    }

    /// Verifies the request's token; on success forwards the configured claims as headers
    /// (after removing whatever the client sent under those names) and notes the consumer.
    pub async fn request(&self, ex: &mut Exchange<'_>) -> Flow {
        let outcome = match self.token(ex.head) {
            Err(why) => Outcome::Invalid(why),
            Ok(None) => Outcome::Missing,
            Ok(Some(t)) => self.check(t).await,
        };
        let verified = match outcome {
            Outcome::Ok(v) => v,
            Outcome::Missing => {
                return Flow::Challenge(Reason::Unauthorized, self.missing.clone());
            }
            Outcome::Invalid(why) => {
                tracing::debug!(route = ex.route_name, why, "jwt: token refused");
                return Flow::Challenge(Reason::Unauthorized, self.invalid.clone());
            }
            Outcome::Insufficient => {
                return Flow::Challenge(Reason::Forbidden, self.insufficient.clone());
            }
        };
        for (_, h) in &self.claims_to_headers {
            ex.head.headers.remove(h);
        }
        for (claim, h) in &self.claims_to_headers {
            if let Some(v) = verified.claims.get(claim).and_then(header_value) {
                ex.head.headers.append(h.clone(), v);
            }
        }
        if let Some(c) = verified.consumer {
            ex.log.consumer = Some(Arc::clone(&c));
            ex.notes.consumer = Some(c);
        }
        ex.notes.claims = Some(verified.claims);
        Flow::Next
    }

    /// The token, `None` when the request carries none (for this filter's source).
    fn token<'h>(&self, head: &'h http::request::Parts) -> Result<Option<&'h str>, Why> {
        let one = |name: &HeaderName| -> Result<Option<&'h str>, Why> {
            let mut all = head.headers.get_all(name).iter();
            match (all.next(), all.next()) {
                (None, _) => Ok(None),
                // UTF-8 rather than `to_str`'s visible-ASCII check, which went byte by byte
                // over the whole token (~500 instructions a request): anything a token may
                // not hold is refused by its base64url parts anyway.
                (Some(v), None) => std::str::from_utf8(v.as_bytes())
                    .map(Some)
                    .map_err(|_| "header not UTF-8"),
                (Some(_), Some(_)) => Err("more than one credentials header"),
            }
        };
        let bearer = |v: &'h str| -> Option<&'h str> {
            let (scheme, rest) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim_matches(' '))
        };
        Ok(match &self.source {
            // Another scheme (Basic, …) is no bearer token: the bare challenge follows.
            TokenSource::Bearer => one(&http::header::AUTHORIZATION)?.and_then(bearer),
            TokenSource::Header(h) => one(h)?.map(|v| bearer(v).unwrap_or(v)),
            TokenSource::Cookie(name) => head
                .headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|kv| kv.trim().split_once('='))
                .find(|(k, _)| k == name)
                .map(|(_, v)| v),
            TokenSource::Query(name) => head.uri.query().and_then(|q| {
                q.split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v)
            }),
        }
        .filter(|t| !t.is_empty()))
    }

    async fn check(&self, token: &str) -> Outcome {
        if token.len() > self.max_token_bytes {
            return Outcome::Invalid("token longer than max_token_bytes");
        }
        let now = unix_now();
        let cached = self.cache.as_ref().and_then(|c| {
            c.get(token.as_bytes(), now, |p| {
                self.providers
                    .get(p)
                    .map_or(u64::MAX, ProviderRt::generation)
            })
        });
        let verified = match cached {
            Some(v) => v,
            None => match self.verify(token, now).await {
                Ok(v) => {
                    if let Some(c) = &self.cache {
                        c.put(token.as_bytes(), &v, now);
                    }
                    v
                }
                Err(why) => return Outcome::Invalid(why),
            },
        };
        if !self
            .claims
            .iter()
            .all(|r| claim_matches(&verified.claims, r))
            || !has_scopes(&verified.claims, &self.scopes)
        {
            return Outcome::Insufficient;
        }
        Outcome::Ok(verified)
    }

    /// Signature, issuer, audience and times; the claims when all hold.
    async fn verify(&self, token: &str, now: f64) -> Result<Verified, Why> {
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not three dot-separated parts");
        };
        // Headers are small: decoded on the stack, read into borrowed strings.
        let mut head_buf = [0u8; HEADER_ON_STACK];
        let head_vec;
        let head_json: &[u8] = if h64.len() <= HEADER_ON_STACK / 3 * 4 {
            let n = URL_SAFE_NO_PAD
                .decode_slice(h64, &mut head_buf)
                .map_err(|_| "header not base64url")?;
            &head_buf[..n]
        } else {
            head_vec = URL_SAFE_NO_PAD
                .decode(h64)
                .map_err(|_| "header not base64url")?;
            &head_vec
        };
        let header: JoseHeader<'_> =
            serde_json::from_slice(head_json).map_err(|_| "header not a JOSE header")?;
        if header.crit.is_some() || header.b64.is_some() {
            return Err("crit/b64 header: JWS extensions are not understood");
        }
        let alg: Algorithm = header.alg.parse().map_err(|_| "alg not accepted")?;
        let body = URL_SAFE_NO_PAD
            .decode(p64)
            .map_err(|_| "payload not base64url")?;
        let claims: Claims =
            serde_json::from_slice(&body).map_err(|_| "payload not a JSON object")?;
        let iss = claims.get("iss").and_then(Value::as_str).ok_or("no iss")?;
        let (provider, p) = self
            .providers
            .iter()
            .enumerate()
            .find(|(_, p)| p.spec.issuer == iss)
            .ok_or("no provider for this iss")?;
        // Read before any key is: see `Remote::refresh`.
        let generation = p.generation();
        if !p.spec.algorithms.contains(&alg) {
            return Err("alg not allowed for this provider");
        }
        let message = &token.as_bytes()[..h64.len() + 1 + p64.len()];
        let verified = if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            let key = p.secret.as_ref().ok_or("no secret")?;
            sig_ok(s64, message, key, alg)
        } else {
            let kid = header.kid.as_deref();
            let found = p
                .spec
                .file_keys
                .as_ref()
                .and_then(|f| try_keys(&f.set, alg, kid, s64, message));
            match (found, &p.remote) {
                (Some(ok), _) => ok,
                (None, None) => return Err("no key for this kid/alg"),
                (None, Some(r)) => {
                    let first = try_keys(&r.keys.load(), alg, kid, s64, message);
                    match first {
                        Some(ok) => ok,
                        None => {
                            // Unknown kid: the set may have rotated. Bounded wait.
                            let _ = tokio::time::timeout(
                                p.spec.fetch_timeout,
                                r.refresh(p.spec.refetch_interval, p.spec.fetch_timeout),
                            )
                            .await;
                            try_keys(&r.keys.load(), alg, kid, s64, message)
                                .ok_or("no key for this kid/alg")?
                        }
                    }
                }
            }
        };
        if !verified {
            return Err("bad signature");
        }
        let leeway = p.spec.leeway.as_secs_f64();
        let exp = claims.get("exp").and_then(Value::as_f64).ok_or("no exp")?;
        if now - leeway >= exp {
            return Err("expired");
        }
        let mut valid_from = f64::NEG_INFINITY;
        if let Some(nbf) = claims.get("nbf") {
            let nbf = nbf.as_f64().ok_or("nbf not a number")?;
            if now + leeway < nbf {
                return Err("not yet valid");
            }
            valid_from = nbf - leeway;
        }
        if !p.spec.audiences.is_empty() {
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => p.spec.audiences.contains(a),
                Some(Value::Array(list)) => list
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|a| p.spec.audiences.iter().any(|x| x == a)),
                _ => false,
            };
            if !ok {
                return Err("aud not accepted");
            }
        }
        let consumer = claims
            .get(&self.consumer_claim)
            .and_then(Value::as_str)
            .map(Arc::from);
        Ok(Verified {
            claims: Arc::new(claims),
            consumer,
            expires_at: exp + leeway,
            valid_from,
            provider,
            generation,
        })
    }
}

impl ProviderRt {
    /// The generation of the provider's fetched key set (0 without one: file keys and
    /// secrets only change with the filter).
    fn generation(&self) -> u64 {
        self.remote
            .as_ref()
            .map_or(0, |r| r.generation.load(Ordering::Acquire))
    }
}

/// Now as Unix seconds.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Largest JOSE header decoded on the stack (longer ones, say with an `x5c` chain, are
/// decoded on the heap).
const HEADER_ON_STACK: usize = 512;

/// The JOSE header fields lbd reads. Unknown fields (`jku`, `x5u`, `jwk`, …) are ignored.
#[derive(serde::Deserialize)]
struct JoseHeader<'a> {
    /// Borrowed from the decoded header unless it has escapes.
    #[serde(borrow)]
    alg: Cow<'a, str>,
    #[serde(borrow)]
    kid: Option<Cow<'a, str>>,
    crit: Option<serde::de::IgnoredAny>,
    b64: Option<serde::de::IgnoredAny>,
}

/// `None` when no key of `set` fits (`alg` type, `kid`); else whether one verified.
fn try_keys(
    set: &KeySet,
    alg: Algorithm,
    kid: Option<&str>,
    sig: &str,
    message: &[u8],
) -> Option<bool> {
    let mut any = false;
    for k in set.keys.iter().filter(|k| k.serves(alg)) {
        if kid.is_some() && k.kid.as_deref() != kid {
            continue;
        }
        any = true;
        if sig_ok(sig, message, &k.key, alg) {
            return Some(true);
        }
    }
    any.then_some(false)
}

fn sig_ok(sig: &str, message: &[u8], key: &DecodingKey, alg: Algorithm) -> bool {
    super::jwt_sig::verify(sig, message, key, alg)
}

fn value_matches(v: &Value, want: &str) -> bool {
    match v {
        Value::String(s) => s == want,
        Value::Bool(b) => (if *b { "true" } else { "false" }) == want,
        Value::Number(n) => n.to_string() == want,
        _ => false,
    }
}

fn claim_matches(claims: &Claims, rule: &ClaimRule) -> bool {
    let Some(v) = claims.get(&rule.claim) else {
        return false;
    };
    let one = |x: &Value| rule.values.iter().any(|w| value_matches(x, w));
    match v {
        Value::Array(items) => items.iter().any(one),
        x => one(x),
    }
}

/// Scopes from `scope` (space-separated, RFC 8693) or `scp` (an array, or a string).
fn has_scopes(claims: &Claims, required: &[String]) -> bool {
    if required.is_empty() {
        return true;
    }
    let granted = |want: &str| {
        let in_str = |v: Option<&Value>| {
            v.and_then(Value::as_str)
                .is_some_and(|s| s.split_ascii_whitespace().any(|g| g == want))
        };
        in_str(claims.get("scope"))
            || in_str(claims.get("scp"))
            || claims
                .get("scp")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|g| g.as_str() == Some(want)))
    };
    required.iter().all(|s| granted(s))
}

/// A claim as a header value: strings as they are, numbers and booleans printed, arrays of
/// strings joined with commas, anything else as compact JSON. `None` when not a valid value.
fn header_value(v: &Value) -> Option<HeaderValue> {
    let text = match v {
        Value::String(s) => return HeaderValue::from_str(s).ok(),
        Value::Bool(_) | Value::Number(_) => v.to_string(),
        Value::Array(a) if a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(","),
        Value::Null => return None,
        other => other.to_string(),
    };
    HeaderValue::from_str(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(v: serde_json::Value) -> Claims {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn scopes_from_scope_or_scp() {
        let req = vec!["a".to_owned(), "b".to_owned()];
        assert!(has_scopes(
            &claims(serde_json::json!({"scope": "b x a"})),
            &req
        ));
        assert!(has_scopes(
            &claims(serde_json::json!({"scp": ["a", "b"]})),
            &req
        ));
        assert!(!has_scopes(
            &claims(serde_json::json!({"scope": "a"})),
            &req
        ));
        assert!(!has_scopes(
            &claims(serde_json::json!({"scope": "ab"})),
            &req
        ));
        assert!(has_scopes(&claims(serde_json::json!({})), &[]));
    }

    #[test]
    fn claim_rules_match_strings_arrays_and_scalars() {
        let c = claims(serde_json::json!({"role": ["dev", "admin"], "tier": 2, "ok": true}));
        let rule = |claim: &str, v: &str| ClaimRule {
            claim: claim.into(),
            values: vec![v.into()],
        };
        assert!(claim_matches(&c, &rule("role", "admin")));
        assert!(!claim_matches(&c, &rule("role", "root")));
        assert!(claim_matches(&c, &rule("tier", "2")));
        assert!(claim_matches(&c, &rule("ok", "true")));
        assert!(!claim_matches(&c, &rule("missing", "x")));
    }

    #[test]
    fn claims_as_header_values() {
        let hv = |v| header_value(&v).map(|h| h.to_str().unwrap_or("?").to_owned());
        assert_eq!(hv(serde_json::json!("alice")).as_deref(), Some("alice"));
        assert_eq!(hv(serde_json::json!(42)).as_deref(), Some("42"));
        assert_eq!(hv(serde_json::json!(["a", "b"])).as_deref(), Some("a,b"));
        assert_eq!(hv(serde_json::json!("a\nb")), None, "no header injection");
    }
}
