//! Shared `rate_limit` state in Redis (docs/rate-limits.md has the design).
//!
//! One Lua script is the only step that decides: it reads Redis's own clock (`TIME`), runs
//! GCRA over every limit of the filter at once and reserves up to `batch` tokens for the
//! asking instance. The instance then spends those tokens locally, so most requests cost no
//! round trip. Tokens are reserved before they are spent, so the instances together never
//! admit more than the limit; what a batch costs is under-admission: tokens an instance holds
//! and does not spend (at most `instances × (batch − 1)` per key).
//!
//! A request that must ask Redis waits at most `timeout`; an error, a late answer or a
//! connection that is down gives the configured failure mode, a metric and a log line (at
//! most one per 10 s per connection). The connection manager reconnects on its own.
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::rate_limit::RateState;
use crate::config::filter::rate_limit::Spec;
use crate::config::filter::rate_limit_redis::{FailureMode, Spec as RedisSpec};
use crate::telemetry::metrics::{RATE_LIMIT_REDIS_CALLS, RATE_LIMIT_REDIS_ERRORS};

/// GCRA over `#KEYS` limits with one clock reading; reserves up to `ARGV[1]` tokens.
/// `ARGV[2i]`, `ARGV[2i+1]`: limit i's emission interval and burst tolerance (µs).
/// Returns `{granted, remaining, reset_us}` or `{0, wait_us, reset_us}`.
pub const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local want = tonumber(ARGV[1])
local grant = want
local tats = {}
local wait = 0
for i = 1, #KEYS do
  local T = tonumber(ARGV[2 * i])
  local tau = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  if tat < now then tat = now end
  tats[i] = tat
  local k = math.floor((tau + T - (tat - now)) / T)
  if k < grant then grant = k end
  if k < 1 and tat - now - tau > wait then wait = tat - now - tau end
end
if grant < 1 then
  return {0, wait, 0}
end
local remaining = -1
local reset = 0
for i = 1, #KEYS do
  local T = tonumber(ARGV[2 * i])
  local tau = tonumber(ARGV[2 * i + 1])
  local tat = tats[i] + grant * T
  local ahead = tat - now
  redis.call('SET', KEYS[i], string.format('%d', tat), 'PX', math.ceil(ahead / 1000))
  local left = math.floor((tau + T - ahead) / T)
  if remaining < 0 or left < remaining then
    remaining = left
    reset = ahead
  end
end
return {grant, remaining, reset}
"#;

/// After a connection-level failure, Redis is not asked again for this long (requests get
/// the failure mode at once rather than each waiting `timeout`); then one request probes.
const BACKOFF: Duration = Duration::from_millis(100);

/// One Redis endpoint, shared by every filter configured with the same settings.
pub struct Conn {
    /// `host:port` for metrics and logs (never the password).
    label: String,
    client: redis::Client,
    connect_timeout: Duration,
    manager: OnceLock<Option<ConnectionManager>>,
    /// ns (of `base`) before which Redis is not asked (after a connection failure).
    backoff_until: AtomicU64,
    last_log: AtomicU64,
    suppressed: AtomicU64,
    base: tokio::time::Instant,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn").field("redis", &self.label).finish()
    }
}

type Registry = Mutex<HashMap<RedisKey, Weak<Conn>>>;

#[derive(PartialEq, Eq, Hash)]
struct RedisKey(String, Option<String>, Option<Vec<u8>>, Duration);

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

impl Conn {
    /// The connection for `spec`, shared with other filters using the same endpoint.
    pub fn shared(spec: &RedisSpec) -> Result<Arc<Conn>, redis::RedisError> {
        let key = RedisKey(
            spec.url.0.clone(),
            spec.password.as_ref().map(|p| p.0.clone()),
            spec.ca_pem.clone(),
            spec.connect_timeout,
        );
        let mut reg = registry()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        reg.retain(|_, w| w.strong_count() > 0);
        if let Some(c) = reg.get(&key).and_then(Weak::upgrade) {
            return Ok(c);
        }
        let c = Arc::new(Conn::new(spec)?);
        reg.insert(key, Arc::downgrade(&c));
        Ok(c)
    }

    fn new(spec: &RedisSpec) -> Result<Conn, redis::RedisError> {
        use redis::IntoConnectionInfo as _;
        let mut info = spec.url.0.as_str().into_connection_info()?;
        if let Some(p) = &spec.password {
            let settings = info.redis_settings().clone().set_password(&p.0);
            info = info.set_redis_settings(settings);
        }
        let label = info.addr().to_string();
        let client = match &spec.ca_pem {
            Some(pem) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            )?,
            None => redis::Client::open(info)?,
        };
        Ok(Conn {
            label,
            client,
            connect_timeout: spec.connect_timeout,
            manager: OnceLock::new(),
            backoff_until: AtomicU64::new(0),
            last_log: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            base: tokio::time::Instant::now(),
        })
    }

    /// The manager, made on first use (it needs the runtime; it connects lazily and
    /// reconnects by itself after a failure).
    fn manager(&self) -> Option<ConnectionManager> {
        self.manager
            .get_or_init(|| {
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.connect_timeout))
                    // No retry loop inside one attempt: the next request after a failure
                    // starts the next attempt, and BACKOFF paces them.
                    .set_number_of_retries(0);
                ConnectionManager::new_lazy_with_config(self.client.clone(), cfg).ok()
            })
            .clone()
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64 + 1
    }

    /// Records a failure: metric, backoff for connection failures, a log line at most every
    /// 10 s.
    fn failed(&self, kind: &'static str, detail: &dyn fmt::Display, connection: bool) {
        metrics::counter!(RATE_LIMIT_REDIS_ERRORS, "redis" => self.label.clone(), "kind" => kind)
            .increment(1);
        let now = self.now();
        if connection {
            self.backoff_until
                .store(now + BACKOFF.as_nanos() as u64, Ordering::Relaxed);
        }
        let last = self.last_log.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 10_000_000_000)
            && self
                .last_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            tracing::warn!(
                redis = %self.label,
                kind,
                error = %detail,
                suppressed,
                "rate_limit: Redis did not decide; applying the failure mode"
            );
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The local part of one key: tokens reserved in Redis and not yet spent, or a refusal
/// Redis gave that holds until `refused_until`.
#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    tokens: u64,
    /// `RateLimit-Remaining` as of the last answer, minus what was spent since.
    remaining: u64,
    /// ns (of `base`) when the binding bucket is full again.
    reset_at: u64,
    refused_until: u64,
}

/// Shards of the local table.
const SHARDS: usize = 16;

/// A `rate_limit` filter's shared state.
#[derive(Debug)]
pub struct Shared {
    conn: Option<Arc<Conn>>,
    failure: FailureMode,
    timeout: Duration,
    batch: u64,
    /// `prefix:route:key-label:limits:` (the key's digest follows).
    prefix: String,
    /// Per limit: emission interval and tolerance in µs.
    args: Vec<(u64, u64)>,
    /// The tightest burst (`RateLimit-Limit` when Redis reports nothing better).
    burst: u64,
    table: Box<[Mutex<HashMap<u64, Entry>>]>,
    per_shard: usize,
    base: tokio::time::Instant,
    script: redis::Script,
}

/// What a shared decision came to.
pub enum Decision {
    /// Admitted or refused by the limit.
    Limit(RateState),
    /// Redis did not decide; the failure mode admitted.
    FailedOpen,
}

impl Shared {
    /// Builds the shared state for `spec` (its `redis` table is `r`) on route `route`.
    pub fn new(spec: &Spec, r: &RedisSpec, route: &str) -> Shared {
        let conn = match Conn::shared(r) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "rate_limit: cannot set up the Redis client");
                None
            }
        };
        let args: Vec<(u64, u64)> = spec
            .limits
            .iter()
            .map(|l| {
                let t = (l.period.as_micros() / u128::from(l.count)).max(1) as u64;
                (t, t.saturating_mul(l.burst.saturating_sub(1)))
            })
            .collect();
        let burst = spec.limits.iter().map(|l| l.burst).min().unwrap_or(1);
        let batch = match r.batch {
            0 => (burst / 100).clamp(1, 20),
            b => u64::from(b),
        };
        let limits: Vec<String> = spec
            .limits
            .iter()
            .map(|l| format!("{}/{}ms/{}", l.count, l.period.as_millis(), l.burst))
            .collect();
        Shared {
            conn,
            failure: r.failure_mode,
            timeout: r.timeout,
            batch,
            prefix: format!(
                "{}:{}:{}:{}:",
                r.prefix,
                route,
                spec.key.label(),
                limits.join(",")
            ),
            args,
            burst,
            table: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: (spec.max_keys / SHARDS).max(4),
            base: tokio::time::Instant::now(),
            script: redis::Script::new(SCRIPT),
        }
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64 + 1
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.table[(key as usize) % SHARDS]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Spends a local token or applies a local refusal, if the key (its local hash) has
    /// either; `None`: Redis must be asked.
    pub fn local(&self, key: u64) -> Option<RateState> {
        let now = self.now();
        let mut map = self.shard(key);
        let e = map.get_mut(&key)?;
        if e.refused_until > now {
            let wait = e.refused_until - now;
            return Some(RateState {
                limit: self.burst,
                remaining: 0,
                reset: ceil_secs(e.reset_at.saturating_sub(now).max(wait)),
                retry_after: Some(ceil_secs(wait).max(1)),
            });
        }
        if e.tokens == 0 {
            return None;
        }
        e.tokens -= 1;
        e.remaining = e.remaining.saturating_sub(1);
        Some(RateState {
            limit: self.burst,
            remaining: e.remaining,
            reset: ceil_secs(e.reset_at.saturating_sub(now)),
            retry_after: None,
        })
    }

    /// Asks Redis for the key whose local hash is `key` and whose bytes are `material`.
    pub async fn remote(&self, key: u64, material: &[u8]) -> Decision {
        let Some(conn) = &self.conn else {
            return self.fail();
        };
        if conn.backoff_until.load(Ordering::Relaxed) > conn.now() {
            metrics::counter!(RATE_LIMIT_REDIS_ERRORS, "redis" => conn.label.clone(), "kind" => "backoff")
                .increment(1);
            return self.fail();
        }
        let Some(mut mgr) = conn.manager() else {
            return self.fail();
        };
        let mut inv = self.script.prepare_invoke();
        let digest = digest(material);
        for i in 0..self.args.len() {
            inv.key(format!("{}{i}:{digest}", self.prefix));
        }
        inv.arg(self.batch);
        for (t, tau) in &self.args {
            inv.arg(*t).arg(*tau);
        }
        metrics::counter!(RATE_LIMIT_REDIS_CALLS).increment(1);
        let call =
            tokio::time::timeout(self.timeout, inv.invoke_async::<(u64, u64, u64)>(&mut mgr));
        let (granted, a, reset_us) = match call.await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                let connection = e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout();
                conn.failed(
                    if connection { "connection" } else { "error" },
                    &e,
                    connection,
                );
                return self.fail();
            }
            Err(_) => {
                conn.failed(
                    "timeout",
                    &"no answer within rate_limit.redis.timeout",
                    true,
                );
                return self.fail();
            }
        };
        let now = self.now();
        let mut map = self.shard(key);
        if map.len() >= self.per_shard && !map.contains_key(&key) {
            map.retain(|_, e| e.tokens > 0 || e.refused_until > now);
            if map.len() >= self.per_shard {
                metrics::counter!(crate::telemetry::metrics::RATE_LIMIT_EVICTIONS).increment(1);
                map.clear();
            }
        }
        let e = map.entry(key).or_default();
        if granted == 0 {
            e.refused_until = now + a.saturating_mul(1000);
            e.reset_at = e.refused_until;
            return Decision::Limit(RateState {
                limit: self.burst,
                remaining: 0,
                reset: ceil_secs(a * 1000),
                retry_after: Some(ceil_secs(a * 1000).max(1)),
            });
        }
        e.refused_until = 0;
        e.tokens += granted - 1;
        e.remaining = a + e.tokens;
        e.reset_at = now + reset_us.saturating_mul(1000);
        Decision::Limit(RateState {
            limit: self.burst,
            remaining: e.remaining,
            reset: ceil_secs(reset_us * 1000),
            retry_after: None,
        })
    }

    fn fail(&self) -> Decision {
        match self.failure {
            FailureMode::Open => Decision::FailedOpen,
            FailureMode::Closed => Decision::Limit(RateState {
                limit: self.burst,
                remaining: 0,
                reset: 1,
                retry_after: Some(1),
            }),
        }
    }
}

/// The Redis key part for a key's bytes: 128 bits of SHA-256, hex (the same on every
/// instance, unlike the local table's seeded hash).
fn digest(material: &[u8]) -> String {
    use sha2::Digest as _;
    use std::fmt::Write as _;
    let d = sha2::Sha256::digest(material);
    let mut s = String::with_capacity(32);
    for b in &d[..16] {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn ceil_secs(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}
