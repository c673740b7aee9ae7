//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted as in Katran's v2 builder.
//!
//! Each endpoint is identified by a stable key (its address, or an operator-chosen id), never by
//! its position, so that every lbd node given the same endpoints builds the same table and a
//! flow lands on the same endpoint whichever node receives it. The table maps a slot to an
//! index into the `endpoints` slice passed to [`build`].

use alloc::vec;
use alloc::vec::Vec;

use crate::hash::hash64;

/// Default table size: a prime, large enough that 1,000 endpoints differ by < 1% in share.
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;

/// Seeds for the two permutation hashes; part of the on-wire contract between nodes.
const OFFSET_SEED: u64 = 0x6c62_645f_6f66_6673; // "lbd_offs"
const SKIP_SEED: u64 = 0x6c62_645f_736b_6970; // "lbd_skip"

/// One endpoint as the builder sees it.
#[derive(Debug, Clone, Copy)]
pub struct MaglevEndpoint<'a> {
    /// Stable identity, e.g. `"10.0.0.1:80"`; equal keys on two nodes give equal permutations.
    pub key: &'a [u8],
    /// Relative weight; 0 excludes the endpoint.
    pub weight: u32,
}

/// Why a table could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaglevError {
    /// The table size must be a prime so every skip visits every slot.
    SizeNotPrime(u32),
    /// More endpoints with weight than slots.
    TooManyEndpoints {
        /// Endpoints with non-zero weight.
        endpoints: usize,
        /// Table size.
        size: u32,
    },
}

impl core::fmt::Display for MaglevError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MaglevError::SizeNotPrime(m) => write!(f, "maglev table size {m} is not a prime"),
            MaglevError::TooManyEndpoints { endpoints, size } => write!(
                f,
                "{endpoints} endpoints do not fit a maglev table of {size} slots"
            ),
        }
    }
}

impl core::error::Error for MaglevError {}

/// Builds a table of `size` slots; each slot holds an index into `endpoints`.
///
/// Returns an empty table when no endpoint has a weight: callers treat that as "no endpoint".
pub fn build(endpoints: &[MaglevEndpoint<'_>], size: u32) -> Result<Vec<u32>, MaglevError> {
    if !is_prime(size) {
        return Err(MaglevError::SizeNotPrime(size));
    }
    let mut live: Vec<usize> = (0..endpoints.len())
        .filter(|&i| endpoints[i].weight > 0)
        .collect();
    // Fill order decides contested slots; ordering by key makes the table independent of the
    // order endpoints were configured in.
    live.sort_by(|&a, &b| endpoints[a].key.cmp(endpoints[b].key));
    if live.is_empty() {
        return Ok(Vec::new());
    }
    if live.len() > size as usize {
        return Err(MaglevError::TooManyEndpoints {
            endpoints: live.len(),
            size,
        });
    }
    let m = u64::from(size);
    let max_weight = live.iter().map(|&i| endpoints[i].weight).max().unwrap_or(1);

    // Per endpoint: (offset, skip, next permutation index, weight credit).
    let mut state: Vec<(u64, u64, u64, u64)> = live
        .iter()
        .map(|&i| {
            let key = endpoints[i].key;
            let offset = hash64(key, OFFSET_SEED) % m;
            let skip = hash64(key, SKIP_SEED) % (m - 1) + 1;
            (offset, skip, 0, 0)
        })
        .collect();

    const EMPTY: u32 = u32::MAX;
    let mut table = vec![EMPTY; size as usize];
    let mut filled = 0usize;
    // Weighted population: each round every endpoint earns its weight in credit and claims
    // one preferred slot per `max_weight` of credit, so shares follow weights while the
    // heaviest endpoint claims on every round, as in the unweighted algorithm.
    'fill: loop {
        for (pos, &ep) in live.iter().enumerate() {
            let st = &mut state[pos];
            st.3 += u64::from(endpoints[ep].weight);
            while st.3 >= u64::from(max_weight) {
                st.3 -= u64::from(max_weight);
                loop {
                    let slot = ((st.0 + st.2 * st.1) % m) as usize;
                    st.2 += 1;
                    if table[slot] == EMPTY {
                        table[slot] = ep as u32;
                        filled += 1;
                        break;
                    }
                }
                if filled == size as usize {
                    break 'fill;
                }
            }
        }
    }
    Ok(table)
}

/// Trial division; table sizes are small enough (≤ a few million) for this to be instant.
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while (d as u64) * (d as u64) <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use alloc::format;
    use alloc::string::String;

    fn keys(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.0.{}.{}:80", i / 250, i % 250 + 1))
            .collect()
    }

    fn eps(keys: &[String], weight: u32) -> Vec<MaglevEndpoint<'_>> {
        keys.iter()
            .map(|k| MaglevEndpoint {
                key: k.as_bytes(),
                weight,
            })
            .collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0usize; n];
        for &e in table {
            c[e as usize] += 1;
        }
        c
    }

    #[test]
    fn rejects_non_prime_size() {
        let k = keys(2);
        assert_eq!(
            build(&eps(&k, 1), 65_536),
            Err(MaglevError::SizeNotPrime(65_536))
        );
    }

    #[test]
    fn empty_when_no_weight() {
        let k = keys(3);
        assert!(build(&eps(&k, 0), 7).unwrap().is_empty());
    }

    #[test]
    fn tiny_table_is_fully_populated_and_fair() {
        let k = keys(3);
        let t = build(&eps(&k, 1), 7).unwrap();
        assert_eq!(t.len(), 7);
        let c = counts(&t, 3);
        assert!(c.iter().all(|&x| x == 2 || x == 3), "{c:?}");
    }

    #[test]
    fn balanced_for_100_endpoints() {
        let k = keys(100);
        let t = build(&eps(&k, 1), DEFAULT_TABLE_SIZE).unwrap();
        let c = counts(&t, 100);
        let max = *c.iter().max().unwrap() as f64;
        let avg = f64::from(DEFAULT_TABLE_SIZE) / 100.0;
        assert!(max / avg <= 1.01, "max/avg = {}", max / avg);
    }

    #[test]
    fn removing_one_endpoint_moves_under_one_percent_of_the_others() {
        let k = keys(100);
        let before = build(&eps(&k, 1), DEFAULT_TABLE_SIZE).unwrap();
        let mut without = eps(&k, 1);
        without[37].weight = 0;
        let after = build(&without, DEFAULT_TABLE_SIZE).unwrap();
        let (mut others, mut moved) = (0usize, 0usize);
        for (b, a) in before.iter().zip(after.iter()) {
            assert_ne!(*a, 37);
            if *b != 37 {
                others += 1;
                if a != b {
                    moved += 1;
                }
            }
        }
        let frac = moved as f64 / others as f64;
        assert!(
            frac < 0.01,
            "moved {moved} of {others} ({:.3}%)",
            frac * 100.0
        );
    }

    #[test]
    fn weights_are_honoured() {
        let k = keys(3);
        let e = [
            MaglevEndpoint {
                key: k[0].as_bytes(),
                weight: 5,
            },
            MaglevEndpoint {
                key: k[1].as_bytes(),
                weight: 3,
            },
            MaglevEndpoint {
                key: k[2].as_bytes(),
                weight: 2,
            },
        ];
        let t = build(&e, DEFAULT_TABLE_SIZE).unwrap();
        let c = counts(&t, 3);
        let m = f64::from(DEFAULT_TABLE_SIZE);
        for (i, want) in [0.5, 0.3, 0.2].into_iter().enumerate() {
            let got = c[i] as f64 / m;
            assert!((got - want).abs() < 0.01, "endpoint {i}: {got} vs {want}");
        }
    }

    #[test]
    fn identity_not_position_decides() {
        let k = keys(5);
        let a = build(&eps(&k, 1), 251).unwrap();
        let mut rev = k.clone();
        rev.reverse();
        let b = build(&eps(&rev, 1), 251).unwrap();
        for (x, y) in a.iter().zip(b.iter()) {
            assert_eq!(k[*x as usize], rev[*y as usize]);
        }
    }
}
