//! `redirect`: answer with a redirect built from the request and the configured parts.
use super::super::check::Checker;
use super::super::raw::S;

/// `{ status = 301, scheme = "https", host = "…", port = 443, path = "/…", strip_query = false }`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub status: Option<S<i64>>,
    pub scheme: Option<S<String>>,
    pub host: Option<S<String>>,
    pub port: Option<S<i64>>,
    pub path: Option<S<String>>,
    pub strip_query: Option<S<bool>>,
}

/// A validated `redirect` filter; every part left out is the request's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// 301, 302, 303, 307 or 308 (default 302).
    pub status: u16,
    /// `http` or `https`.
    pub scheme: Option<String>,
    /// Host name or address (no port).
    pub host: Option<String>,
    /// Port; the scheme's default port is left out of the Location.
    pub port: Option<u16>,
    /// Replacement path.
    pub path: Option<String>,
    /// Drop the request's query.
    pub strip_query: bool,
}

/// Checks one `redirect` table.
pub(crate) fn check(c: &mut Checker<'_>, raw: &S<Raw>, key: &str) -> Option<Spec> {
    let r = raw.get_ref();
    let mut ok = true;
    let status = match &r.status {
        Some(s) if [301, 302, 303, 307, 308].contains(s.get_ref()) => *s.get_ref() as u16,
        Some(s) => {
            c.err(
                s.span(),
                &format!("{key}.status"),
                format!(
                    "must be one of 301, 302, 303, 307, 308, got {}",
                    s.get_ref()
                ),
            );
            ok = false;
            302
        }
        None => 302,
    };
    let scheme = r.scheme.as_ref().map(|s| {
        c.choice(
            Some(s),
            &format!("{key}.scheme"),
            "http",
            &[("http", "http"), ("https", "https")],
        )
        .to_owned()
    });
    let host = match &r.host {
        Some(h) => {
            let v = h.get_ref();
            let valid = !v.is_empty()
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b));
            if !valid {
                c.err(
                    h.span(),
                    &format!("{key}.host"),
                    format!("invalid host {v:?}: a name or address without port"),
                );
                ok = false;
            }
            Some(v.to_ascii_lowercase())
        }
        None => None,
    };
    let port = r
        .port
        .as_ref()
        .map(|p| c.int(Some(p), &format!("{key}.port"), 443, 1, 65535) as u16);
    let path = r.path.as_ref().map(|p| c.path(p, &format!("{key}.path")));
    if r.scheme.is_none() && r.host.is_none() && r.port.is_none() && r.path.is_none() {
        c.err(
            raw.span(),
            key,
            "set at least one of scheme, host, port, path (a redirect to itself loops)",
        );
        ok = false;
    }
    ok.then_some(Spec {
        status,
        scheme,
        host,
        port,
        path,
        strip_query: r.strip_query.as_ref().is_some_and(|s| *s.get_ref()),
    })
}
