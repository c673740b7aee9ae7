//! A hasher for maps whose keys are already seeded hashes (`u64`): hashing them again with
//! SipHash cost ~100 instructions a lookup on the rate limiter's and the JWT cache's paths.
use std::hash::{BuildHasherDefault, Hasher};

/// Passes a `u64` key through as its own hash.
#[derive(Default)]
pub struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; this keeps any other use correct.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The `BuildHasher` of maps keyed by seeded hashes.
pub type BuildPrehashed = BuildHasherDefault<Prehashed>;
