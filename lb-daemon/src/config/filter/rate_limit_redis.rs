//! `rate_limit.redis`: where a shared limit keeps its state, and what happens when that place
//! does not answer in time.
use std::fmt;
use std::path::Path;
use std::time::Duration;

use super::super::check::Checker;
use super::super::raw::S;

/// `redis = { url = "redis://127.0.0.1:6379", password_file = "…", ca_file = "…",
/// timeout = "5ms", connect_timeout = "1s", failure_mode = "fail_open", batch = 0,
/// prefix = "lbd:rl" }`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub url: S<String>,
    pub password_file: Option<S<String>>,
    pub ca_file: Option<S<String>>,
    pub timeout: Option<S<String>>,
    pub connect_timeout: Option<S<String>>,
    pub failure_mode: Option<S<String>>,
    pub batch: Option<S<i64>>,
    pub prefix: Option<S<String>>,
}

/// What a request gets when Redis cannot decide in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// Admit (availability over the limit).
    Open,
    /// Refuse with 429 (the limit over availability).
    Closed,
}

/// A secret compared by value but never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// A validated `redis` table of a `rate_limit` filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// `redis://host:port[/db]` or `rediss://…` (TLS); user and password may be in it.
    pub url: Secret,
    /// The password from `password_file` (overrides one in the URL).
    pub password: Option<Secret>,
    /// PEM roots for `rediss://` (default: the system's roots).
    pub ca_pem: Option<Vec<u8>>,
    /// The most a request waits for a Redis answer.
    pub timeout: Duration,
    /// The most a (re)connection attempt takes.
    pub connect_timeout: Duration,
    /// What requests get when Redis errs or is late.
    pub failure_mode: FailureMode,
    /// Tokens reserved per round trip and key (0: chosen from the burst).
    pub batch: u32,
    /// Redis key prefix (the route's name and the limit follow it).
    pub prefix: String,
}

/// Largest file read for `password_file` / `ca_file`.
const MAX_FILE: u64 = 1 << 20;

fn read(c: &mut Checker<'_>, v: &S<String>, key: &str, dir: &Path) -> Option<Vec<u8>> {
    let path = dir.join(v.get_ref());
    let r = std::fs::metadata(&path).and_then(|m| {
        if m.len() > MAX_FILE {
            Err(std::io::Error::other("larger than 1 MiB"))
        } else {
            std::fs::read(&path)
        }
    });
    match r {
        Ok(b) => Some(b),
        Err(e) => {
            c.err(
                v.span(),
                key,
                format!("cannot read {}: {e}", path.display()),
            );
            None
        }
    }
}

/// Checks a `rate_limit.redis` table (`key` names it).
pub(crate) fn check(c: &mut Checker<'_>, raw: &S<Raw>, key: &str, dir: &Path) -> Option<Spec> {
    let r = raw.get_ref();
    let mut ok = true;
    let url = r.url.get_ref();
    let tls = url.starts_with("rediss://");
    if !(url.starts_with("redis://") || tls) {
        c.err(
            r.url.span(),
            &format!("{key}.url"),
            "expected a redis:// or rediss:// URL",
        );
        ok = false;
    } else if let Err(e) = redis::Client::open(url.as_str()) {
        c.err(
            r.url.span(),
            &format!("{key}.url"),
            format!(
                "invalid Redis URL: {}",
                e.detail().unwrap_or("cannot parse it")
            ),
        );
        ok = false;
    }
    let password = match &r.password_file {
        Some(f) => match read(c, f, &format!("{key}.password_file"), dir) {
            Some(mut b) => {
                // A password written with `echo` ends with a newline that is not part of it.
                while b.last().is_some_and(|x| *x == b'\n' || *x == b'\r') {
                    b.pop();
                }
                match String::from_utf8(b) {
                    Ok(s) if !s.is_empty() => Some(Secret(s)),
                    _ => {
                        c.err(
                            f.span(),
                            &format!("{key}.password_file"),
                            "the password must be non-empty UTF-8",
                        );
                        ok = false;
                        None
                    }
                }
            }
            None => {
                ok = false;
                None
            }
        },
        None => None,
    };
    let ca_pem = match &r.ca_file {
        Some(f) => {
            let k = format!("{key}.ca_file");
            if !tls {
                c.err(f.span(), &k, "ca_file needs a rediss:// URL");
                return None;
            }
            match read(c, f, &k, dir) {
                Some(b) => {
                    let certs = rustls_pki_types::pem::PemObject::pem_slice_iter(&b)
                        .collect::<Result<Vec<rustls_pki_types::CertificateDer<'_>>, _>>();
                    if !matches!(&certs, Ok(v) if !v.is_empty()) {
                        c.err(f.span(), &k, "no PEM certificate in the file");
                        ok = false;
                    }
                    Some(b)
                }
                None => {
                    ok = false;
                    None
                }
            }
        }
        None => None,
    };
    let timeout = c.positive_duration(
        r.timeout.as_ref(),
        &format!("{key}.timeout"),
        Duration::from_millis(5),
    );
    if let Some(v) = r
        .timeout
        .as_ref()
        .filter(|_| timeout > Duration::from_secs(1))
    {
        c.err(
            v.span(),
            &format!("{key}.timeout"),
            "at most 1s: requests wait this long for Redis",
        );
        ok = false;
    }
    let connect_timeout = c.positive_duration(
        r.connect_timeout.as_ref(),
        &format!("{key}.connect_timeout"),
        Duration::from_secs(1),
    );
    let failure_mode = c.choice(
        r.failure_mode.as_ref(),
        &format!("{key}.failure_mode"),
        FailureMode::Open,
        &[
            ("fail_open", FailureMode::Open),
            ("fail_closed", FailureMode::Closed),
        ],
    );
    let batch = c.u32(r.batch.as_ref(), &format!("{key}.batch"), 0, 0, 10_000);
    let prefix = match &r.prefix {
        Some(p) => {
            let s = p.get_ref();
            if s.is_empty() || s.len() > 200 || s.chars().any(|ch| ch.is_control() || ch == ' ') {
                c.err(
                    p.span(),
                    &format!("{key}.prefix"),
                    "1 to 200 characters, no spaces or control characters",
                );
                ok = false;
            }
            s.clone()
        }
        None => "lbd:rl".to_owned(),
    };
    ok.then(|| Spec {
        url: Secret(url.clone()),
        password,
        ca_pem,
        timeout,
        connect_timeout,
        failure_mode,
        batch,
        prefix,
    })
}
