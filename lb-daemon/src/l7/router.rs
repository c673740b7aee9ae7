//! Route selection: the first route (in priority, then declared order) whose conditions all
//! hold for a request on a given listener.
//!
//! Paths are matched **as received**: percent-encoded bytes are not decoded and dot segments
//! are not resolved, so `/api%2Fx` does not match the prefix `/api`, and `/api/../admin` does
//! match it. Decoding here would let two spellings of one path reach different routes, and
//! what the upstream sees would differ from what was routed; normalising the path is left to an
//! explicit filter. Query parameters, by contrast, are compared after percent-decoding (`+` as
//! space), since their encoding is not significant to any server.
use std::borrow::Cow;

use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderMap, Uri, header};

use crate::config::model::{
    HeaderMatch, HostMatch, Model, PathMatch, PathRewrite, QueryMatch, Route, RouteMatch,
};

/// The routes that apply to one listener, in match order.
#[derive(Debug, Clone)]
pub struct Router {
    /// Indices into `Model::routes`.
    routes: Vec<usize>,
    /// Whether any of those routes has query conditions (the query is parsed only then).
    needs_query: bool,
}

impl Router {
    /// Collects the routes of `model` that apply to listener index `listener`.
    pub fn new(model: &Model, listener: usize) -> Self {
        let routes: Vec<usize> = model
            .routes
            .iter()
            .enumerate()
            .filter(|(_, r)| r.listeners.is_empty() || r.listeners.contains(&listener))
            .map(|(i, _)| i)
            .collect();
        let needs_query = routes
            .iter()
            .filter_map(|&i| model.routes.get(i))
            .any(|r| !r.matcher.query.is_empty());
        Router {
            routes,
            needs_query,
        }
    }

    /// Index into `Model::routes` of the route for this request, or `None` (→ 404).
    ///
    /// `model` must be the model this router was built from; indices it lacks are skipped.
    pub fn route(&self, model: &Model, req: &Parts) -> Option<usize> {
        let path = req.uri.path();
        // Decoded once per request, and only when some route looks at the query.
        let query = if self.needs_query {
            parse_query(req.uri.query().unwrap_or(""))
        } else {
            Vec::new()
        };
        let ctx = Request {
            req,
            host: std::cell::OnceCell::new(),
            path,
            method: &req.method,
            headers: &req.headers,
            query: &query,
        };
        self.routes
            .iter()
            .copied()
            .find(|&i| model.routes.get(i).is_some_and(|r| ctx.matches(&r.matcher)))
    }
}

/// What the matchers look at, extracted once per request.
struct Request<'a> {
    req: &'a Parts,
    /// The host, found only when a route has host conditions (a header lookup and UTF-8
    /// check most requests do not need).
    host: std::cell::OnceCell<Option<&'a str>>,
    path: &'a str,
    method: &'a http::Method,
    headers: &'a HeaderMap,
    query: &'a [(String, String)],
}

impl Request<'_> {
    fn host(&self) -> Option<&str> {
        *self.host.get_or_init(|| request_host(self.req))
    }

    fn matches(&self, m: &RouteMatch) -> bool {
        // Cheapest conditions first; the regex last.
        (m.methods.is_empty() || m.methods.contains(self.method))
            && (m.hosts.is_empty()
                || self
                    .host()
                    .is_some_and(|h| m.hosts.iter().any(|p| host_matches(p, h))))
            && m.headers.iter().all(|c| header_matches(c, self.headers))
            && m.query.iter().all(|c| query_matches(c, self.query))
            && m.path.as_ref().is_none_or(|p| path_matches(p, self.path))
    }
}

/// The request's host: the URI authority (HTTP/2 `:authority`, HTTP/1.1 absolute-form) if
/// present, else the `Host` header; port and a trailing dot removed, IPv6 brackets kept.
/// Not lowercased here: comparisons ignore ASCII case, which avoids an allocation.
fn request_host(req: &Parts) -> Option<&str> {
    let raw = match req.uri.authority() {
        Some(a) => a.as_str(),
        None => req.headers.get(header::HOST)?.to_str().ok()?,
    };
    let host = strip_port(strip_userinfo(raw.trim()));
    let host = host.strip_suffix('.').unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

/// `user@host` → `host` (only possible in an absolute-form URI authority).
fn strip_userinfo(authority: &str) -> &str {
    authority.rsplit_once('@').map_or(authority, |(_, h)| h)
}

/// `host:port` → `host`, `[v6]:port` → `[v6]`.
fn strip_port(hostport: &str) -> &str {
    if hostport.starts_with('[') {
        // The port can only follow the closing bracket; a missing bracket is left as is
        // (and then matches no pattern).
        return hostport.find(']').map_or(hostport, |end| &hostport[..=end]);
    }
    hostport.split_once(':').map_or(hostport, |(h, _)| h)
}

/// Compares a host pattern with a request host, ignoring ASCII case.
///
/// An `Exact` IPv6 pattern matches with or without brackets (`[::1]` and `::1`).
fn host_matches(pattern: &HostMatch, host: &str) -> bool {
    match pattern {
        HostMatch::Exact(p) => {
            let unbracketed = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            p.eq_ignore_ascii_case(host) || p.eq_ignore_ascii_case(unbracketed)
        }
        HostMatch::Suffix(s) => {
            // Stored as `.example.com`; tolerate `*.example.com` and `example.com` too so that a
            // pattern never matches across a label boundary (`badexample.com`).
            let s = s.strip_prefix('*').unwrap_or(s);
            let s = s.strip_prefix('.').unwrap_or(s);
            let (h, sb) = (host.as_bytes(), s.as_bytes());
            // At least one character and the dot must precede the suffix.
            h.len() >= sb.len() + 2
                && h[h.len() - sb.len()..].eq_ignore_ascii_case(sb)
                && h[h.len() - sb.len() - 1] == b'.'
        }
    }
}

/// Path condition against the path as received (see the module docs).
fn path_matches(pattern: &PathMatch, path: &str) -> bool {
    match pattern {
        PathMatch::Prefix(p) => prefix_rest(p, path).is_some(),
        PathMatch::Exact(p) => p == path,
        PathMatch::Regex(re) => re.is_match(path),
    }
}

/// Segment-aware prefix match. On a match returns the rest of the path after the prefix,
/// either empty or starting with `/`.
///
/// `/api` matches `/api` (rest ``), `/api/` (rest `/`) and `/api/x` (rest `/x`), not `/apix`.
/// A prefix ending in `/` (including `/` itself) matches any path that starts with it, and the
/// slash stays in the rest: `/api/` on `/api/x` leaves `/x`.
fn prefix_rest<'p>(prefix: &str, path: &'p str) -> Option<&'p str> {
    if prefix.is_empty() {
        return Some(path);
    }
    if let Some(dir) = prefix.strip_suffix('/') {
        return path.starts_with(prefix).then(|| &path[dir.len()..]);
    }
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

fn header_matches(cond: &HeaderMatch, headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(&cond.name).iter();
    match &cond.value {
        None => values.next().is_some(),
        Some(v) => values.any(|hv| hv.as_bytes() == v.as_bytes()),
    }
}

fn query_matches(cond: &QueryMatch, query: &[(String, String)]) -> bool {
    let mut same_name = query.iter().filter(|(n, _)| *n == cond.name);
    match &cond.value {
        None => same_name.next().is_some(),
        Some(v) => same_name.any(|(_, pv)| pv == v),
    }
}

/// Splits `a=1&b=2` into decoded pairs; a parameter without `=` has an empty value.
fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (form_decode(k).into_owned(), form_decode(v).into_owned())
        })
        .collect()
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte; malformed
/// escapes are kept literally and invalid UTF-8 is replaced, so any input decodes.
fn form_decode(s: &str) -> Cow<'_, str> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(b) = hex {
                    out.push(b);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// The URI to send upstream after applying `route`'s rewrite (query preserved).
///
/// `StripPrefix` and `ReplacePrefix` use the route's `Prefix` path condition (a route without
/// a path condition counts as prefix `/`; an `Exact` one as a prefix equal to the whole path).
/// When the rewrite does not apply — a regex route, a URI that does not match the prefix, or a
/// result that is not a valid URI — the URI is forwarded unchanged rather than failing the
/// request; config validation rejects the combinations that could lead there.
pub fn rewrite_uri(route: &Route, uri: &Uri) -> Uri {
    let Some(rewrite) = &route.rewrite else {
        return uri.clone();
    };
    let path = uri.path();
    let new_path: String = match rewrite {
        PathRewrite::ReplacePath(p) => with_leading_slash(p.clone()),
        PathRewrite::StripPrefix | PathRewrite::ReplacePrefix(_) => {
            let rest = match &route.matcher.path {
                Some(PathMatch::Prefix(p)) => prefix_rest(p, path),
                Some(PathMatch::Exact(p)) => (p == path).then_some(""),
                Some(PathMatch::Regex(_)) => None,
                None => prefix_rest("/", path),
            };
            let Some(rest) = rest else {
                return uri.clone();
            };
            match rewrite {
                PathRewrite::ReplacePrefix(with) => join_prefix(with, rest),
                _ if rest.is_empty() => "/".to_owned(),
                _ => rest.to_owned(),
            }
        }
    };
    with_path(uri, &new_path).unwrap_or_else(|| uri.clone())
}

/// `with` followed by `rest` (empty or starting with `/`) without doubling the slash.
fn join_prefix(with: &str, rest: &str) -> String {
    let joined = match (with.strip_suffix('/'), rest.is_empty()) {
        (Some(base), false) => format!("{base}{rest}"),
        _ => format!("{with}{rest}"),
    };
    with_leading_slash(joined)
}

fn with_leading_slash(p: String) -> String {
    if p.starts_with('/') {
        p
    } else {
        format!("/{p}")
    }
}

/// `uri` with its path replaced, scheme, authority and query kept; `None` if invalid.
fn with_path(uri: &Uri, path: &str) -> Option<Uri> {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(pq).ok()?);
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use http::{HeaderName, Method, Request};

    use super::*;
    use crate::config::model::{
        Cluster, Global, LogFormat, Passive, Policy, PoolLimits, Retry, Source, UpstreamProtocol,
        UpstreamTimeouts,
    };

    fn route(name: &str, matcher: RouteMatch) -> Route {
        Route {
            name: name.to_owned(),
            listeners: Vec::new(),
            priority: 0,
            matcher,
            cluster: 0,
            split: None,
            rewrite: None,
            timeout: None,
            retry: None,
            filters: Vec::new(),
        }
    }

    fn model(routes: Vec<Route>) -> Model {
        Model {
            source: Source {
                path: PathBuf::from("test.toml"),
                hash: String::new(),
            },
            global: Global {
                log_format: LogFormat::Text,
                log_level: "info".to_owned(),
                access_log: false,
                drain_timeout: Duration::from_secs(1),
                admin: None,
                tracing: None,
                workers: None,
            },
            listeners: Vec::new(),
            routes,
            clusters: vec![Cluster {
                name: "c".to_owned(),
                endpoints: Vec::new(),
                policy: Policy::RoundRobin,
                protocol: UpstreamProtocol::Http1,
                health_check: None,
                passive: Passive {
                    max_fails: 0,
                    ..Passive::default()
                },
                timeouts: UpstreamTimeouts::default(),
                pool: PoolLimits::default(),
                retry: Retry {
                    attempts: 0,
                    ..Retry::default()
                },
                retry_budget: Default::default(),
                circuit_breakers: Default::default(),
                sticky: None,
                outlier: None,
                sources: Vec::new(),
                discovery: Default::default(),
                tls: None,
            }],
            vips: Vec::new(),
        }
    }

    fn prefix(p: &str) -> Option<PathMatch> {
        Some(PathMatch::Prefix(p.to_owned()))
    }

    fn hdr(name: &'static str, value: Option<&str>) -> HeaderMatch {
        HeaderMatch {
            name: HeaderName::from_static(name),
            value: value.map(str::to_owned),
        }
    }

    fn q(name: &str, value: Option<&str>) -> QueryMatch {
        QueryMatch {
            name: name.to_owned(),
            value: value.map(str::to_owned),
        }
    }

    /// Routes in match order, as the config would sort them.
    fn table_model() -> Model {
        let exact_host = |h: &str| HostMatch::Exact(h.to_owned());
        model(vec![
            route(
                "exact-health",
                RouteMatch {
                    path: Some(PathMatch::Exact("/healthz".to_owned())),
                    ..RouteMatch::default()
                },
            ),
            route(
                "api-admin-post",
                RouteMatch {
                    hosts: vec![exact_host("api.example.com")],
                    path: prefix("/api/admin"),
                    methods: vec![Method::POST, Method::PUT],
                    ..RouteMatch::default()
                },
            ),
            route(
                "api",
                RouteMatch {
                    hosts: vec![exact_host("api.example.com"), exact_host("::1")],
                    path: prefix("/api"),
                    ..RouteMatch::default()
                },
            ),
            route(
                "wildcard",
                RouteMatch {
                    hosts: vec![HostMatch::Suffix(".example.com".to_owned())],
                    path: prefix("/static/"),
                    ..RouteMatch::default()
                },
            ),
            route(
                "canary-header",
                RouteMatch {
                    headers: vec![hdr("x-canary", Some("1")), hdr("x-user", None)],
                    ..RouteMatch::default()
                },
            ),
            route(
                "query",
                RouteMatch {
                    query: vec![q("debug", None), q("user name", Some("a b&c"))],
                    ..RouteMatch::default()
                },
            ),
            route(
                "regex",
                RouteMatch {
                    path: Some(PathMatch::Regex(
                        regex::Regex::new(r"^/v[0-9]+/items$").expect("regex"),
                    )),
                    ..RouteMatch::default()
                },
            ),
            route(
                "fallback-example",
                RouteMatch {
                    hosts: vec![exact_host("example.com")],
                    path: prefix("/"),
                    ..RouteMatch::default()
                },
            ),
        ])
    }

    struct Case {
        method: &'static str,
        uri: &'static str,
        headers: &'static [(&'static str, &'static str)],
        want: Option<&'static str>,
    }

    const fn get(
        uri: &'static str,
        headers: &'static [(&'static str, &'static str)],
        want: Option<&'static str>,
    ) -> Case {
        Case {
            method: "GET",
            uri,
            headers,
            want,
        }
    }

    const API: &[(&str, &str)] = &[("host", "api.example.com")];

    #[test]
    fn route_table() {
        let cases = [
            get("/healthz", &[], Some("exact-health")),
            get("/healthz/", &[], None),
            get("/healthz?x=1", &[], Some("exact-health")),
            // Prefix is segment-aware.
            get("/api", API, Some("api")),
            get("/api/", API, Some("api")),
            get("/api/users?x=1", API, Some("api")),
            get("/apix", API, None),
            get("/API", API, None),
            // Host: case, port, trailing dot, absolute-form / :authority wins over Host.
            get("/api", &[("host", "API.Example.COM:8080")], Some("api")),
            get("/api", &[("host", "api.example.com.")], Some("api")),
            get("http://api.example.com/api", &[("host", "x")], Some("api")),
            get("http://other.org/api", API, None),
            get("http://u@api.example.com:81/api", &[], Some("api")),
            get("/api", &[("host", "[::1]:8080")], Some("api")),
            get("http://[::1]:8080/api", &[], Some("api")),
            get("/api", &[("host", "[::1")], None),
            get("/api", &[], None),
            get("/api", &[("host", "")], None),
            // Methods.
            Case {
                method: "POST",
                uri: "/api/admin/x",
                headers: API,
                want: Some("api-admin-post"),
            },
            get("/api/admin/x", API, Some("api")),
            // Suffix host: a subdomain (any depth), never the bare domain or a lookalike.
            get(
                "/static/a.css",
                &[("host", "www.example.com")],
                Some("wildcard"),
            ),
            get(
                "/static/a.css",
                &[("host", "a.b.EXAMPLE.com")],
                Some("wildcard"),
            ),
            get("/static/", &[("host", "www.example.com")], Some("wildcard")),
            get(
                "/static/a.css",
                &[("host", "example.com")],
                Some("fallback-example"),
            ),
            get("/static/a.css", &[("host", "badexample.com")], None),
            get("/static/a.css", &[("host", ".example.com")], None),
            get("/static", &[("host", "www.example.com")], None),
            // Headers: all of; `None` = present; any value may equal.
            get(
                "/",
                &[("x-canary", "1"), ("x-user", "")],
                Some("canary-header"),
            ),
            get(
                "/",
                &[("x-canary", "0"), ("x-canary", "1"), ("x-user", "u")],
                Some("canary-header"),
            ),
            get("/", &[("x-canary", "1")], None),
            get("/", &[("x-canary", "10"), ("x-user", "u")], None),
            // Query: decoded names and values, `+` as space, all of.
            get("/any?debug&user+name=a%20b%26c", &[], Some("query")),
            get("/any?user%20name=a+b%26c&debug=0", &[], Some("query")),
            get("/any?debug&user+name=a+b&c", &[], None),
            get("/any?user+name=a%20b%26c", &[], None),
            get(
                "/any?debug&user+name=x&user+name=a+b%26c",
                &[],
                Some("query"),
            ),
            get("/any?debug=%zz&user+name=a+b%26c%", &[], None),
            // Regex over the path only, not the query.
            get("/v2/items", &[], Some("regex")),
            get("/v2/items?x=1", &[], Some("regex")),
            get("/v2/items/1", &[], None),
            // Percent-encoded paths are matched as received.
            get("/api%2Fusers", API, None),
            get("/%61pi", API, None),
            // Prefix `/` matches every path of its host.
            get(
                "/anything/at/all",
                &[("host", "example.com")],
                Some("fallback-example"),
            ),
            get("*", &[("host", "example.com")], None),
        ];
        let m = table_model();
        let router = Router::new(&m, 0);
        for c in cases {
            let mut b = Request::builder().method(c.method).uri(c.uri);
            for (k, v) in c.headers {
                b = b.header(*k, *v);
            }
            let (parts, ()) = b.body(()).expect("request").into_parts();
            let got = router.route(&m, &parts).map(|i| m.routes[i].name.as_str());
            assert_eq!(got, c.want, "{} {} {:?}", c.method, c.uri, c.headers);
        }
    }

    #[test]
    fn listeners_filter_and_order() {
        let mut only_1 = route("only-1", RouteMatch::default());
        only_1.listeners = vec![1];
        let m = model(vec![only_1, route("all", RouteMatch::default())]);
        let (parts, ()) = Request::new(()).into_parts();
        let r0 = Router::new(&m, 0);
        let r1 = Router::new(&m, 1);
        assert_eq!(r0.route(&m, &parts), Some(1));
        assert_eq!(r1.route(&m, &parts), Some(0));
        // A model without those routes yields no match instead of panicking.
        assert_eq!(r1.route(&model(Vec::new()), &parts), None);
    }

    #[test]
    fn rewrite_table() {
        let pr = |p: &str, rw: PathRewrite| {
            let mut r = route(
                "r",
                RouteMatch {
                    path: prefix(p),
                    ..RouteMatch::default()
                },
            );
            r.rewrite = Some(rw);
            r
        };
        let strip = PathRewrite::StripPrefix;
        let repl = |s: &str| PathRewrite::ReplacePrefix(s.to_owned());
        let path = |s: &str| PathRewrite::ReplacePath(s.to_owned());
        let mut exact = route(
            "e",
            RouteMatch {
                path: Some(PathMatch::Exact("/old".to_owned())),
                ..RouteMatch::default()
            },
        );
        exact.rewrite = Some(repl("/new"));
        let mut regex = route(
            "re",
            RouteMatch {
                path: Some(PathMatch::Regex(regex::Regex::new("^/x").expect("regex"))),
                ..RouteMatch::default()
            },
        );
        regex.rewrite = Some(strip.clone());
        let mut any = route("any", RouteMatch::default());
        any.rewrite = Some(repl("/base"));
        let cases: Vec<(Route, &str, &str)> = vec![
            (
                pr("/api", strip.clone()),
                "/api/users?x=1&y",
                "/users?x=1&y",
            ),
            (pr("/api", strip.clone()), "/api", "/"),
            (pr("/api", strip.clone()), "/api/", "/"),
            (pr("/api", strip.clone()), "/api?q=1", "/?q=1"),
            (pr("/api/", strip.clone()), "/api/x", "/x"),
            (pr("/", strip.clone()), "/x/y", "/x/y"),
            // Not matching the prefix: unchanged.
            (pr("/api", strip.clone()), "/apix", "/apix"),
            (pr("/api", repl("/v2")), "/api/users", "/v2/users"),
            (pr("/api", repl("/v2")), "/api", "/v2"),
            (pr("/api", repl("/v2/")), "/api/users", "/v2/users"),
            (pr("/api", repl("/")), "/api/users?a=b", "/users?a=b"),
            (pr("/api", repl("/")), "/api", "/"),
            (pr("/api", repl("v2")), "/api/x", "/v2/x"),
            (pr("/api/", repl("/v2")), "/api/x", "/v2/x"),
            (pr("/api", path("/fixed")), "/api/x?k=v", "/fixed?k=v"),
            (pr("/api", path("fixed")), "/api/x", "/fixed"),
            // Invalid replacement: forwarded unchanged rather than failing.
            (pr("/api", path("/a b")), "/api/x", "/api/x"),
            (exact.clone(), "/old?z", "/new?z"),
            (regex, "/x/y", "/x/y"),
            (any, "/y", "/base/y"),
            // Absolute-form keeps scheme and authority.
            (
                pr("/api", strip.clone()),
                "http://h.example:8080/api/z?q",
                "http://h.example:8080/z?q",
            ),
            // Percent-encoded bytes are carried through as received.
            (pr("/api", strip), "/api/a%2Fb", "/a%2Fb"),
        ];
        for (r, from, want) in cases {
            let uri: Uri = from.parse().expect("uri");
            assert_eq!(
                rewrite_uri(&r, &uri).to_string(),
                want,
                "{:?} {from}",
                r.rewrite
            );
        }
        let plain = route("plain", RouteMatch::default());
        let uri: Uri = "/keep?me".parse().expect("uri");
        assert_eq!(rewrite_uri(&plain, &uri), uri);
    }

    #[test]
    fn rewrite_of_authority_form_does_not_panic() {
        let mut r = route("r", RouteMatch::default());
        r.rewrite = Some(PathRewrite::ReplacePath("/x".to_owned()));
        let uri: Uri = "example.com:443".parse().expect("uri");
        let _ = rewrite_uri(&r, &uri);
        r.rewrite = Some(PathRewrite::StripPrefix);
        assert_eq!(rewrite_uri(&r, &uri), uri);
    }

    #[test]
    fn form_decode_edge_cases() {
        assert_eq!(form_decode("a+b%41"), "a bA");
        assert_eq!(form_decode("%"), "%");
        assert_eq!(form_decode("%4"), "%4");
        assert_eq!(form_decode("%zz"), "%zz");
        assert_eq!(form_decode("%C3%A9"), "é");
        assert_eq!(form_decode("%FF"), "\u{FFFD}");
        assert_eq!(form_decode("é%"), "é%");
        assert_eq!(form_decode("%é"), "%é");
    }
}
