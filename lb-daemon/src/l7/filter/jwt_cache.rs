//! The `jwt` filter's cache of verified tokens (Envoy's `jwt_cache_config`): a token seen
//! before skips base64, JSON and the signature check, which are nearly all of the filter's
//! cost (an ES256 verification alone is ~50 µs).
//!
//! What makes reuse safe:
//! - the key is the whole token, compared byte for byte (a hash only picks the bucket);
//!   the hash (seeded SipHash) covers the length and the last [`HASHED_TAIL`] bytes, i.e.
//!   the signature's end: only verified tokens are stored, their signatures are the
//!   issuer's, and each shard holds a bounded number of entries, so an attacker can neither
//!   choose colliding entries nor make a collision cost more than one verification;
//! - only tokens that passed every provider check are stored, never a failure;
//! - times are checked again on every hit: an entry is used only while `exp` and `nbf`
//!   (with the provider's leeway, folded into the entry when stored) still pass;
//! - an entry names the key-set generation of its provider; a `jwks_url` set fetched again
//!   (rotation, refresh, refetch for an unknown `kid`) moves the generation on, and every
//!   token checked under the older set is verified again;
//! - the route's own requirements (claims, scopes) are not cached: they run on each request.
//!
//! Memory is bounded: at most `cache_size` entries, tokens longer than
//! [`MAX_CACHED_TOKEN_BYTES`] are never stored, and a full shard first drops its expired
//! entries, then one live entry.
use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::{Map, Value};

use super::prehashed::BuildPrehashed;

/// Longest token stored (Envoy's limit too); longer ones are verified on every request.
pub const MAX_CACHED_TOKEN_BYTES: usize = 4096;
/// Entries per shard at least, before a cache gets a second shard.
const MIN_PER_SHARD: usize = 64;
/// Most shards (contention between worker threads).
const MAX_SHARDS: usize = 16;
/// Bytes of the token's end that are hashed (hashing a whole ~250-byte token was ~1.5k
/// instructions, most of a cache hit).
pub const HASHED_TAIL: usize = 32;

/// One stored token: its bytes (compared whole on lookup) and what its check found.
#[derive(Debug)]
struct Entry {
    token: Box<[u8]>,
    verified: Verified,
}

type Shard = HashMap<u64, Entry, BuildPrehashed>;

/// A token that passed the provider checks, as the filter uses it.
#[derive(Debug, Clone)]
pub struct Verified {
    /// Its claims, shared with the request notes.
    pub claims: Arc<Map<String, Value>>,
    /// The consumer claim's value, if a string.
    pub consumer: Option<Arc<str>>,
    /// Unix time (s) from which it is expired: `exp` + leeway.
    pub expires_at: f64,
    /// Unix time (s) before which it is not yet valid: `nbf` − leeway (or −∞).
    pub valid_from: f64,
    /// The provider that verified it (index in the filter's list).
    pub provider: usize,
    /// That provider's key-set generation when it was verified.
    pub generation: u64,
}

impl Verified {
    /// Whether its times pass at `now` (Unix seconds).
    pub fn current(&self, now: f64) -> bool {
        now < self.expires_at && now >= self.valid_from
    }
}

/// A bounded map from whole tokens to their verification.
#[derive(Debug)]
pub struct TokenCache {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    seed: RandomState,
}

impl TokenCache {
    /// A cache of at most `size` entries; `None` for 0 (no cache).
    pub fn new(size: usize) -> Option<Self> {
        if size == 0 {
            return None;
        }
        let n = (size / MIN_PER_SHARD).clamp(1, MAX_SHARDS);
        Some(TokenCache {
            shards: (0..n).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard: size / n,
            seed: RandomState::new(),
        })
    }

    /// The token's hash and its shard.
    fn shard(&self, token: &[u8]) -> (u64, &Mutex<Shard>) {
        let tail = &token[token.len().saturating_sub(HASHED_TAIL)..];
        let h = self.seed.hash_one((token.len(), tail));
        (h, &self.shards[(h >> 32) as usize % self.shards.len()])
    }

    /// The entry for `token` if it is still current at `now` and was verified under the
    /// key-set generation `generation(provider)` returns. A stale entry is dropped.
    pub fn get(
        &self,
        token: &[u8],
        now: f64,
        generation: impl FnOnce(usize) -> u64,
    ) -> Option<Verified> {
        let (h, shard) = self.shard(token);
        let mut map = shard.lock().unwrap_or_else(PoisonError::into_inner);
        let e = map.get(&h)?;
        if *e.token != *token {
            // Another token with the same hash: a miss (and it is verified on its own).
            return None;
        }
        let v = &e.verified;
        if v.current(now) && v.generation == generation(v.provider) {
            return Some(v.clone());
        }
        map.remove(&h);
        None
    }

    /// Stores a verification (tokens above [`MAX_CACHED_TOKEN_BYTES`] are not stored).
    pub fn put(&self, token: &[u8], v: &Verified, now: f64) {
        if token.len() > MAX_CACHED_TOKEN_BYTES || !v.current(now) {
            return;
        }
        let (h, shard) = self.shard(token);
        let mut map = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= self.per_shard && !map.contains_key(&h) {
            map.retain(|_, e| e.verified.current(now));
            if map.len() >= self.per_shard {
                // Full of live tokens: one makes room (which one matters little; the
                // bound is what counts, and a dropped token is only verified again).
                let mut dropped = false;
                map.retain(|_, _| std::mem::replace(&mut dropped, true));
            }
        }
        map.insert(
            h,
            Entry {
                token: token.into(),
                verified: v.clone(),
            },
        );
    }

    /// Entries held (tests and the bound).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(expires_at: f64, generation: u64) -> Verified {
        Verified {
            claims: Arc::new(Map::new()),
            consumer: None,
            expires_at,
            valid_from: f64::NEG_INFINITY,
            provider: 0,
            generation,
        }
    }

    #[test]
    fn hits_only_while_current_and_same_generation() {
        let c = TokenCache::new(8).expect("cache");
        c.put(b"a.b.c", &entry(100.0, 1), 10.0);
        assert!(c.get(b"a.b.c", 20.0, |_| 1).is_some());
        assert!(c.get(b"a.b.x", 20.0, |_| 1).is_none(), "other bytes");
        // Same length and same hashed tail, other bytes before it.
        let long = |first: u8| {
            let mut t = vec![b'x'; 100];
            t[0] = first;
            t
        };
        c.put(&long(b'a'), &entry(100.0, 1), 10.0);
        assert!(c.get(&long(b'a'), 20.0, |_| 1).is_some());
        assert!(c.get(&long(b'b'), 20.0, |_| 1).is_none(), "compared whole");
        assert!(c.get(b"a.b.c", 100.0, |_| 1).is_none(), "expired");
        assert_eq!(c.len(), 1, "the expired entry was dropped");
        c.put(b"a.b.c", &entry(100.0, 1), 10.0);
        assert!(c.get(b"a.b.c", 20.0, |_| 2).is_none(), "key set changed");
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn the_bound_holds() {
        for size in [1, 5, 64, 100, 1024] {
            let c = TokenCache::new(size).expect("cache");
            for i in 0..10 * size {
                c.put(format!("t{i}").as_bytes(), &entry(1e12, 0), 1.0);
                assert!(c.len() <= size, "{} > {size}", c.len());
            }
            let recent = format!("t{}", 10 * size - 1);
            assert!(c.get(recent.as_bytes(), 1.0, |_| 0).is_some());
        }
        assert!(TokenCache::new(0).is_none());
    }

    #[test]
    fn long_tokens_are_not_stored() {
        let c = TokenCache::new(8).expect("cache");
        c.put(&[b'a'; MAX_CACHED_TOKEN_BYTES + 1], &entry(1e12, 0), 1.0);
        assert!(c.is_empty());
    }
}
