//! Per-route filters in the config: `[[routes.filters]]`, one table per filter, each with
//! exactly one key naming the filter. Each filter's schema (raw shape, checks, validated
//! spec) is one file here; `l7/filter/<name>.rs` builds the running filter from its spec.
pub mod access;
pub mod api_key;
pub mod cors;
pub mod direct_response;
pub mod headers;
pub mod jwt;
pub mod mirror;
pub mod path_rewrite;
pub mod rate_limit;
pub mod rate_limit_redis;
pub mod redirect;
pub mod request_id;
pub mod template;
pub mod xml_json;

use std::path::Path;

use super::check::Checker;
use super::model::{PathMatch, RouteMatch};
use super::raw::S;

/// One `[[routes.filters]]` element: exactly one field is set.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFilter {
    pub request_headers: Option<S<headers::Raw>>,
    pub response_headers: Option<S<headers::Raw>>,
    pub request_id: Option<S<request_id::Raw>>,
    pub path_rewrite: Option<S<path_rewrite::Raw>>,
    pub redirect: Option<S<redirect::Raw>>,
    pub direct_response: Option<S<direct_response::Raw>>,
    pub access: Option<S<access::Raw>>,
    pub rate_limit: Option<S<rate_limit::Raw>>,
    pub cors: Option<S<cors::Raw>>,
    pub jwt: Option<S<jwt::Raw>>,
    pub api_key: Option<S<api_key::Raw>>,
    pub mirror: Option<S<mirror::Raw>>,
    pub xml_json: Option<S<xml_json::Raw>>,
}

/// A validated filter, in config order within its route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterSpec {
    /// Edit request header fields.
    RequestHeaders(headers::Spec),
    /// Edit response header fields.
    ResponseHeaders(headers::Spec),
    /// Ensure, pass on, log and echo a request id.
    RequestId(request_id::Spec),
    /// Rewrite the path by regex.
    PathRewrite(path_rewrite::Spec),
    /// Answer with a redirect.
    Redirect(redirect::Spec),
    /// Answer from the config.
    DirectResponse(direct_response::Spec),
    /// Allow/deny by client address.
    Access(access::Spec),
    /// Rate limits (local or shared through Redis).
    RateLimit(rate_limit::Spec),
    /// Answer CORS preflights and mark cross-origin responses.
    Cors(cors::Spec),
    /// Verify a JSON Web Token.
    Jwt(jwt::Spec),
    /// Admit known API keys.
    ApiKey(api_key::Spec),
    /// Copy requests to a shadow cluster.
    Mirror(mirror::Spec),
    /// Convert bodies between XML and JSON.
    XmlJson(xml_json::Spec),
}

impl FilterSpec {
    /// The key that names this filter in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            FilterSpec::RequestHeaders(_) => "request_headers",
            FilterSpec::ResponseHeaders(_) => "response_headers",
            FilterSpec::RequestId(_) => "request_id",
            FilterSpec::PathRewrite(_) => "path_rewrite",
            FilterSpec::Redirect(_) => "redirect",
            FilterSpec::DirectResponse(_) => "direct_response",
            FilterSpec::Access(_) => "access",
            FilterSpec::RateLimit(_) => "rate_limit",
            FilterSpec::Cors(_) => "cors",
            FilterSpec::Jwt(_) => "jwt",
            FilterSpec::ApiKey(_) => "api_key",
            FilterSpec::Mirror(_) => "mirror",
            FilterSpec::XmlJson(_) => "xml_json",
        }
    }
}

/// A regex compared by its source (so that a spec can be compared across reloads).
#[derive(Debug, Clone)]
pub struct Pattern(pub regex::Regex);

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Eq for Pattern {}

impl Pattern {
    /// Compiles `v`, recording a syntax error at its span.
    pub(crate) fn check(c: &mut Checker<'_>, v: &S<String>, key: &str) -> Option<Pattern> {
        match regex::Regex::new(v.get_ref()) {
            Ok(r) => Some(Pattern(r)),
            Err(e) => {
                c.err(
                    v.span(),
                    key,
                    format!("invalid regex: {}", super::validate::regex_error(&e)),
                );
                None
            }
        }
    }
}

/// What a route's filters may refer to outside the route.
pub(crate) struct Refs<'a> {
    /// The config's folder (relative file paths).
    pub dir: &'a Path,
    /// Resolves a cluster name to its index; `Err(())` when the name is unknown but some
    /// cluster could not be read (then it may be that one, and the error is reported there).
    pub cluster: &'a dyn Fn(&str) -> Result<Option<usize>, ()>,
}

/// Checks a route's filter list. `route_key` is `routes[i]`.
pub(crate) fn check_all(
    c: &mut Checker<'_>,
    raw: &[S<RawFilter>],
    route_key: &str,
    matcher: &RouteMatch,
    refs: &Refs<'_>,
) -> Vec<FilterSpec> {
    let mut out = Vec::with_capacity(raw.len());
    let mut mirror_at = None;
    for (i, f) in raw.iter().enumerate() {
        let key = format!("{route_key}.filters[{i}]");
        if let Some(spec) = check_one(c, f, &key, refs) {
            if matches!(spec, FilterSpec::Mirror(_)) {
                // One shadow per request: the request phase hands one copy to the core.
                if let Some(first) = mirror_at {
                    c.err(
                        f.span(),
                        &key,
                        format!("one mirror per route ({route_key}.filters[{first}] is one)"),
                    );
                    continue;
                }
                mirror_at = Some(i);
            }
            if uses_captures(&spec) && !matches!(matcher.path, Some(PathMatch::Regex(_))) {
                c.err(
                    f.span(),
                    &key,
                    "${capture.…} needs the route to match with match.path_regex",
                );
                continue;
            }
            out.push(spec);
        }
    }
    out
}

fn uses_captures(spec: &FilterSpec) -> bool {
    match spec {
        FilterSpec::RequestHeaders(h) | FilterSpec::ResponseHeaders(h) => h.uses_captures(),
        _ => false,
    }
}

fn check_one(
    c: &mut Checker<'_>,
    f: &S<RawFilter>,
    key: &str,
    refs: &Refs<'_>,
) -> Option<FilterSpec> {
    let r = f.get_ref();
    let set: Vec<&str> = [
        ("request_headers", r.request_headers.is_some()),
        ("response_headers", r.response_headers.is_some()),
        ("request_id", r.request_id.is_some()),
        ("path_rewrite", r.path_rewrite.is_some()),
        ("redirect", r.redirect.is_some()),
        ("direct_response", r.direct_response.is_some()),
        ("access", r.access.is_some()),
        ("rate_limit", r.rate_limit.is_some()),
        ("cors", r.cors.is_some()),
        ("jwt", r.jwt.is_some()),
        ("api_key", r.api_key.is_some()),
        ("mirror", r.mirror.is_some()),
        ("xml_json", r.xml_json.is_some()),
    ]
    .into_iter()
    .filter_map(|(n, s)| s.then_some(n))
    .collect();
    if set.len() != 1 {
        let msg = if set.is_empty() {
            "a filter needs exactly one of request_headers, response_headers, request_id, \
             path_rewrite, redirect, direct_response, access, rate_limit, cors, jwt, api_key, mirror, \
             xml_json"
                .to_owned()
        } else {
            format!(
                "one filter per [[routes.filters]] table; this one sets {}",
                set.join(", ")
            )
        };
        c.err(f.span(), key, msg);
        return None;
    }
    if let Some(h) = &r.request_headers {
        return headers::check(c, h, &format!("{key}.request_headers"))
            .map(FilterSpec::RequestHeaders);
    }
    if let Some(h) = &r.response_headers {
        return headers::check(c, h, &format!("{key}.response_headers"))
            .map(FilterSpec::ResponseHeaders);
    }
    if let Some(x) = &r.request_id {
        return request_id::check(c, x, &format!("{key}.request_id")).map(FilterSpec::RequestId);
    }
    if let Some(x) = &r.path_rewrite {
        return path_rewrite::check(c, x, &format!("{key}.path_rewrite"))
            .map(FilterSpec::PathRewrite);
    }
    if let Some(x) = &r.redirect {
        return redirect::check(c, x, &format!("{key}.redirect")).map(FilterSpec::Redirect);
    }
    if let Some(x) = &r.direct_response {
        return direct_response::check(c, x, &format!("{key}.direct_response"), refs.dir)
            .map(FilterSpec::DirectResponse);
    }
    if let Some(x) = &r.access {
        return access::check(c, x, &format!("{key}.access")).map(FilterSpec::Access);
    }
    if let Some(x) = &r.rate_limit {
        return rate_limit::check(c, x, &format!("{key}.rate_limit"), refs.dir)
            .map(FilterSpec::RateLimit);
    }
    if let Some(x) = &r.cors {
        return cors::check(c, x, &format!("{key}.cors")).map(FilterSpec::Cors);
    }
    if let Some(x) = &r.jwt {
        return jwt::check(c, x, &format!("{key}.jwt"), refs.dir).map(FilterSpec::Jwt);
    }
    if let Some(x) = &r.api_key {
        return api_key::check(c, x, &format!("{key}.api_key")).map(FilterSpec::ApiKey);
    }
    if let Some(x) = &r.mirror {
        return mirror::check(c, x, &format!("{key}.mirror"), refs.cluster).map(FilterSpec::Mirror);
    }
    if let Some(x) = &r.xml_json {
        return xml_json::check(c, x, &format!("{key}.xml_json")).map(FilterSpec::XmlJson);
    }
    None
}
