//! `path_rewrite`: the path sent upstream, rewritten by a regex with captures (the query is
//! kept). A path the regex does not match, or a result that is not a valid path, is left as
//! it was.
use http::Uri;

use super::Exchange;
use crate::config::filter::path_rewrite::Spec;

/// The running `path_rewrite` filter.
#[derive(Debug)]
pub struct PathRegex {
    regex: regex::Regex,
    replacement: String,
}

impl PathRegex {
    /// Builds the filter for `spec`.
    pub fn new(spec: &Spec) -> Self {
        PathRegex {
            regex: spec.regex.0.clone(),
            replacement: spec.replacement.clone(),
        }
    }

    /// Rewrites the head's path.
    pub fn request(&self, ex: &mut Exchange<'_>) {
        if let Some(uri) = self.rewrite(&ex.head.uri) {
            ex.head.uri = uri;
        }
    }

    fn rewrite(&self, uri: &Uri) -> Option<Uri> {
        let path = uri.path();
        let caps = self.regex.captures(path)?;
        let whole = caps.get(0)?;
        let mut new = String::with_capacity(path.len() + self.replacement.len());
        new.push_str(&path[..whole.start()]);
        caps.expand(&self.replacement, &mut new);
        new.push_str(&path[whole.end()..]);
        if !new.starts_with('/') {
            new.insert(0, '/');
        }
        if let Some(q) = uri.query() {
            new.push('?');
            new.push_str(q);
        }
        let mut parts = uri.clone().into_parts();
        parts.path_and_query = Some(new.parse().ok()?);
        Uri::from_parts(parts).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::filter::Pattern;

    fn f(re: &str, rep: &str) -> PathRegex {
        PathRegex::new(&Spec {
            regex: Pattern(regex::Regex::new(re).expect("regex")),
            replacement: rep.into(),
        })
    }

    #[test]
    fn rewrites_with_captures_and_keeps_the_query() {
        let r = f(r"^/v1/users/(\d+)$", "/api/users/$1/profile");
        let out = r.rewrite(&"/v1/users/42?x=1".parse().expect("uri"));
        assert_eq!(
            out.expect("rewritten").to_string(),
            "/api/users/42/profile?x=1"
        );
        assert!(r.rewrite(&"/v2/users/42".parse().expect("uri")).is_none());
        let named = f(r"^/(?P<svc>[a-z]+)/(?P<rest>.*)$", "/${rest}/${svc}");
        let out = named.rewrite(&"/orders/list".parse().expect("uri"));
        assert_eq!(out.expect("rewritten").to_string(), "/list/orders");
    }
}
