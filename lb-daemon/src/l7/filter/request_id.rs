//! `request_id`: every request carries an id — the client's own when it sent a sane one,
//! otherwise a new random one (UUID v4 form) — passed upstream, logged, and echoed back.
use http::{HeaderName, HeaderValue};

use super::{Exchange, ResponseView};
use crate::config::filter::request_id::Spec;

/// Longest client-supplied id kept; a longer one is replaced (it would bloat every log line).
const MAX_LEN: usize = 200;

/// The running `request_id` filter.
#[derive(Debug)]
pub struct RequestId {
    header: HeaderName,
    echo: bool,
}

impl RequestId {
    /// Builds the filter for `spec`.
    pub fn new(spec: &Spec) -> Self {
        RequestId {
            header: spec.header.clone(),
            echo: spec.echo,
        }
    }

    /// Keeps or makes the id; the upstream gets exactly one.
    pub fn request(&self, ex: &mut Exchange<'_>) {
        let mut values = ex.head.headers.get_all(&self.header).iter();
        let kept = match (values.next(), values.next()) {
            (Some(v), None) if sane(v) => Some(v.clone()),
            _ => None,
        };
        let id = kept.unwrap_or_else(generate);
        ex.head.headers.insert(self.header.clone(), id.clone());
        ex.log.request_id = Some(id.clone());
        ex.notes.request_id = Some(id);
    }

    /// Echoes the id in the response.
    pub fn response(&self, head: &mut http::response::Parts, rx: &ResponseView<'_>) {
        if self.echo
            && let Some(id) = &rx.notes.request_id
        {
            head.headers.insert(self.header.clone(), id.clone());
        }
    }
}

fn sane(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= MAX_LEN && b.iter().all(|c| c.is_ascii_graphic())
}

/// A random id in UUID v4 form.
fn generate() -> HeaderValue {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 36];
    let mut o = 0;
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out[o] = b'-';
            o += 1;
        }
        out[o] = HEX[usize::from(byte >> 4)];
        out[o + 1] = HEX[usize::from(byte & 0xf)];
        o += 2;
    }
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_uuid_v4_and_differ() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        let s = a.to_str().expect("ascii");
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4", "{s}");
        assert!(sane(&a));
        assert!(!sane(&HeaderValue::from_static("has space")));
        assert!(!sane(
            &HeaderValue::from_bytes(&[b'a'; 201]).expect("value")
        ));
    }
}
