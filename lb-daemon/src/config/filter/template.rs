//! Header value templates: literal text with `${variable}` parts filled in per request.
use super::super::check::Checker;
use super::super::raw::S;

/// A value to fill in per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Var {
    /// The client's IP address (from the socket, or from trusted forwarding hops).
    ClientIp,
    /// The client's source port.
    ClientPort,
    /// The request id (`request_id` filter, or the client's `x-request-id`).
    RequestId,
    /// The matched route's name.
    Route,
    /// The request's host, without the port.
    Host,
    /// The request method.
    Method,
    /// The request path as received (no query).
    Path,
    /// `http` or `https`: how the client connected.
    Scheme,
    /// A capture group of the route's `path_regex`, by number.
    CaptureIndex(usize),
    /// A capture group of the route's `path_regex`, by name.
    CaptureName(String),
}

/// One part of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Copied as is.
    Literal(String),
    /// Filled in per request.
    Var(Var),
}

/// A parsed template; `parts` is never empty for a non-empty source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// Literals and variables in order.
    pub parts: Vec<Part>,
}

impl Template {
    /// The template's value when it has no variables.
    pub fn literal(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [] => Some(""),
            [Part::Literal(s)] => Some(s),
            _ => None,
        }
    }

    /// Whether any part needs the route's path captures.
    pub fn uses_captures(&self) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::Var(Var::CaptureIndex(_) | Var::CaptureName(_))))
    }
}

/// Names accepted in `${…}`, listed in error messages.
pub const VARIABLES: &str = "client_ip, client_port, request_id, route, host, method, path, \
                             scheme, capture.N, capture.NAME";

/// Parses `v`: `${name}` is a variable, `$$` a literal `$`; every literal byte must be valid
/// in a header value (visible ASCII, space, tab, obs-text).
pub(crate) fn parse(c: &mut Checker<'_>, v: &S<String>, key: &str) -> Option<Template> {
    let s = v.get_ref();
    let mut parts = Vec::new();
    let mut lit = String::new();
    let mut rest = s.as_str();
    while let Some(i) = rest.find('$') {
        lit.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            lit.push('$');
            rest = r;
            continue;
        }
        let Some(body) = after.strip_prefix('{') else {
            c.err(
                v.span(),
                key,
                format!("'$' must start a variable ${{name}} or be doubled ($$): {s:?}"),
            );
            return None;
        };
        let Some(end) = body.find('}') else {
            c.err(v.span(), key, format!("unclosed '${{' in {s:?}"));
            return None;
        };
        let name = &body[..end];
        let var = match name {
            "client_ip" => Var::ClientIp,
            "client_port" => Var::ClientPort,
            "request_id" => Var::RequestId,
            "route" => Var::Route,
            "host" => Var::Host,
            "method" => Var::Method,
            "path" => Var::Path,
            "scheme" => Var::Scheme,
            _ => match name.strip_prefix("capture.") {
                Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                    Var::CaptureIndex(n.parse().unwrap_or(usize::MAX))
                }
                Some(n)
                    if !n.is_empty()
                        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
                {
                    Var::CaptureName(n.to_owned())
                }
                _ => {
                    c.err(
                        v.span(),
                        key,
                        format!("unknown variable ${{{name}}}; known: {VARIABLES}"),
                    );
                    return None;
                }
            },
        };
        if !lit.is_empty() {
            parts.push(Part::Literal(std::mem::take(&mut lit)));
        }
        parts.push(Part::Var(var));
        rest = &body[end + 1..];
    }
    lit.push_str(rest);
    if !lit.is_empty() {
        parts.push(Part::Literal(lit));
    }
    let bad = parts.iter().any(|p| match p {
        Part::Literal(l) => http::HeaderValue::from_str(l).is_err(),
        Part::Var(_) => false,
    });
    if bad {
        c.err(
            v.span(),
            key,
            format!("{s:?} has characters not allowed in a header value"),
        );
        return None;
    }
    Some(Template { parts })
}
