//! Hash functions that both sides compute identically.

/// 64-bit FNV-1a over `bytes`, started from `seed`, then finished with the murmur3 mixer so
/// that close inputs (addresses differing in one byte) spread over the whole output range.
#[inline]
pub fn hash64(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ seed;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    fmix64(h)
}

/// The murmur3 64-bit finaliser: a bijection with full avalanche.
#[inline]
pub const fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_changes_output() {
        assert_ne!(hash64(b"10.0.0.1:80", 0), hash64(b"10.0.0.1:80", 1));
    }

    #[test]
    fn golden_values_are_stable() {
        // Rings built by different lbd versions and nodes must agree, so these may never change.
        assert_eq!(hash64(b"10.0.0.1:80", 0), 0x5ed8_f827_5e47_a14a);
        assert_eq!(
            hash64(b"10.0.0.1:80", 0x6c62_645f_6f66_6673),
            0xf2cb_1d23_3d97_db9b
        );
    }
}
