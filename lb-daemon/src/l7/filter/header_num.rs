//! Decimal header values without a heap allocation per value: `HeaderValue::from(u64)`
//! allocates a buffer for every number, and the `rate_limit` filter writes three on every
//! response.
//!
//! Numbers below [`TABLE`] come from a table built once per process (its values are
//! `'static`: cloning one copies a pointer). Larger ones are written into a per-thread chunk
//! and handed out as shared slices of it, so that one allocation serves a few hundred
//! values.
use std::cell::RefCell;
use std::sync::LazyLock;

use bytes::BytesMut;
use http::HeaderValue;

/// Numbers below this come from the static table.
const TABLE: u64 = 1024;
/// Bytes of one per-thread chunk for larger numbers (a `u64` has at most 20 digits).
const CHUNK: usize = 4096;

static SMALL: LazyLock<Box<[HeaderValue]>> = LazyLock::new(|| {
    let mut text = String::new();
    let mut ends = Vec::with_capacity(TABLE as usize);
    let mut buf = [0u8; 20];
    for n in 0..TABLE {
        text.push_str(std::str::from_utf8(decimal(n, &mut buf)).unwrap_or("0"));
        ends.push(text.len());
    }
    // Built once per process and never freed, so its values can be `'static` and their
    // clones cost no reference count.
    let text: &'static str = Box::leak(text.into_boxed_str());
    let mut start = 0;
    ends.into_iter()
        .map(|end| {
            let v = HeaderValue::from_static(&text[start..end]);
            start = end;
            v
        })
        .collect()
});

thread_local! {
    static CHUNK_BUF: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// `n` in decimal as a header value.
pub fn value(n: u64) -> HeaderValue {
    // `TABLE` itself is past the table's end.
    if let Some(v) = SMALL.get(n.min(TABLE) as usize) {
        return v.clone();
    }
    let mut buf = [0u8; 20];
    let digits = decimal(n, &mut buf);
    CHUNK_BUF.with(|c| {
        let mut c = c.borrow_mut();
        if c.capacity() - c.len() < digits.len() {
            *c = BytesMut::with_capacity(CHUNK);
        }
        c.extend_from_slice(digits);
        let bytes = c.split().freeze();
        // Digits are always a valid header value.
        HeaderValue::from_maybe_shared(bytes).unwrap_or_else(|_| HeaderValue::from(n))
    })
}

/// `n`'s decimal digits, written at the end of `buf` (20 digits hold any `u64`).
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_print_their_number() {
        for n in [0, 1, 9, 10, 1023, 1024, 99_999, 10_000_000, u64::MAX] {
            assert_eq!(value(n).to_str().ok(), Some(n.to_string().as_str()), "{n}");
        }
        // Many large values across chunk boundaries stay intact.
        let vs: Vec<_> = (0..2000u64).map(|i| value(1_000_000 + i)).collect();
        for (i, v) in vs.iter().enumerate() {
            assert_eq!(v.to_str().ok(), Some((1_000_000 + i).to_string().as_str()));
        }
    }
}
