//! `direct_response`: answer from the config (maintenance pages, fixed answers) without an
//! upstream.
use std::path::Path;

use bytes::Bytes;

use super::super::check::Checker;
use super::super::raw::S;

/// `{ status = 503, body = "…" | body_file = "…", content_type = "…" }`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub status: Option<S<i64>>,
    pub body: Option<S<String>>,
    pub body_file: Option<S<String>>,
    pub content_type: Option<S<String>>,
}

/// A validated `direct_response` filter (a body file is read when the config is loaded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// Status code (200..=599).
    pub status: u16,
    /// The whole body.
    pub body: Bytes,
    /// `Content-Type` of the body.
    pub content_type: http::HeaderValue,
}

/// Largest body file accepted: answers are kept in memory.
const MAX_BODY_FILE: u64 = 1 << 20;

/// Checks one `direct_response` table; `dir` is the config file's folder (relative
/// `body_file` paths are taken from there).
pub(crate) fn check(c: &mut Checker<'_>, raw: &S<Raw>, key: &str, dir: &Path) -> Option<Spec> {
    let r = raw.get_ref();
    let status = c.int(r.status.as_ref(), &format!("{key}.status"), 200, 200, 599) as u16;
    let body = match (&r.body, &r.body_file) {
        (Some(_), Some(f)) => {
            c.err(
                f.span(),
                &format!("{key}.body_file"),
                "set either body or body_file, not both",
            );
            return None;
        }
        (Some(b), None) => Bytes::from(b.get_ref().clone()),
        (None, Some(f)) => {
            let path = dir.join(f.get_ref());
            let k = format!("{key}.body_file");
            match std::fs::metadata(&path) {
                Ok(m) if m.len() > MAX_BODY_FILE => {
                    c.err(
                        f.span(),
                        &k,
                        format!("{} is larger than 1 MiB", path.display()),
                    );
                    return None;
                }
                Ok(_) => match std::fs::read(&path) {
                    Ok(b) => Bytes::from(b),
                    Err(e) => {
                        c.err(f.span(), &k, format!("cannot read {}: {e}", path.display()));
                        return None;
                    }
                },
                Err(e) => {
                    c.err(f.span(), &k, format!("cannot read {}: {e}", path.display()));
                    return None;
                }
            }
        }
        (None, None) => Bytes::new(),
    };
    let content_type = match &r.content_type {
        Some(ct) => match http::HeaderValue::from_str(ct.get_ref()) {
            Ok(v) => v,
            Err(_) => {
                c.err(
                    ct.span(),
                    &format!("{key}.content_type"),
                    format!("invalid header value {:?}", ct.get_ref()),
                );
                return None;
            }
        },
        None => http::HeaderValue::from_static("text/plain; charset=utf-8"),
    };
    Some(Spec {
        status,
        body,
        content_type,
    })
}
