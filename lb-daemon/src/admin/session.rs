//! Browser sessions for the status page: `POST /login` trades the admin token for an opaque
//! session cookie, so the token is typed once and never kept by the page or put in a URL.
//!
//! The cookie is `HttpOnly` and `SameSite=Strict`; state-changing requests made with it must
//! also carry the session's CSRF token in [`CSRF_HEADER`] (a header a cross-site form cannot
//! set), so the cookie alone never authorizes a POST.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Cookie holding the session id.
pub const COOKIE: &str = "lbd_session";
/// Header carrying the session's CSRF token on POSTs made with the cookie.
pub const CSRF_HEADER: &str = "x-lbd-csrf";
/// How long a session lasts.
pub const TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; the oldest goes first (logins need the token, so this only bounds
/// memory against a token holder logging in in a loop).
const MAX: usize = 256;

struct Session {
    csrf: String,
    expires: Instant,
}

/// Live sessions by id.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// Opens a session; returns its id and CSRF token.
    pub fn create(&self) -> (String, String) {
        let (id, csrf) = (random_hex(), random_hex());
        if let Ok(mut m) = self.map.lock() {
            let now = Instant::now();
            m.retain(|_, s| s.expires > now);
            if m.len() >= MAX
                && let Some(oldest) = m
                    .iter()
                    .min_by_key(|(_, s)| s.expires)
                    .map(|(k, _)| k.clone())
            {
                m.remove(&oldest);
            }
            m.insert(
                id.clone(),
                Session {
                    csrf: csrf.clone(),
                    expires: now + TTL,
                },
            );
        }
        (id, csrf)
    }

    /// The CSRF token of a live session.
    pub fn csrf(&self, id: &str) -> Option<String> {
        let m = self.map.lock().ok()?;
        m.get(id)
            .filter(|s| s.expires > Instant::now())
            .map(|s| s.csrf.clone())
    }

    /// Ends a session.
    pub fn remove(&self, id: &str) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(id);
        }
    }
}

fn random_hex() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The session id in a `Cookie` header value.
pub fn from_cookie_header(value: &str) -> Option<&str> {
    value
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// The `Set-Cookie` value for session `id`; `secure` when the page was reached over HTTPS.
pub fn set_cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict{}",
        TTL.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that removes the cookie.
pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_opaque_and_end() {
        let s = Sessions::default();
        let (id, csrf) = s.create();
        assert_eq!(id.len(), 64);
        assert_ne!(id, csrf);
        assert_eq!(s.csrf(&id).as_deref(), Some(csrf.as_str()));
        assert_eq!(s.csrf("nope"), None);
        s.remove(&id);
        assert_eq!(s.csrf(&id), None);
    }

    #[test]
    fn cookie_header_parsing() {
        assert_eq!(
            from_cookie_header("a=b; lbd_session=abc ; c=d"),
            Some("abc")
        );
        assert_eq!(from_cookie_header("lbd_session="), None);
        assert_eq!(from_cookie_header("xlbd_session=1"), None);
        let c = set_cookie("x", true);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.ends_with("Secure"));
        assert!(!set_cookie("x", false).contains("Secure"));
    }
}
