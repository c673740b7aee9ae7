//! `nginx.conf` → [`Plan`]: the `http` context's `upstream` and `server` blocks.
//!
//! Location precedence is kept by emitting routes in the order nginx would choose them:
//! exact (`=`) locations, then `^~` prefixes longest first, then regular expressions in file
//! order, then plain prefixes longest first. (nginx checks regular expressions only after the
//! longest prefix is found, so a `^~` prefix shorter than a plain one that also matches is
//! preferred here where nginx would try the regexes: rare, and listed in the README.)
use std::collections::HashMap;

use super::ImportError;
use super::plan::{Answer, Cluster, Endpoint, Health, Listener, Origin, PathMatch, Plan, Route};

/// One directive: `name args;` or `name args { block }`.
#[derive(Debug, Clone)]
struct Directive {
    name: String,
    args: Vec<String>,
    line: usize,
    block: Option<Vec<Directive>>,
}

impl Directive {
    fn text(&self) -> String {
        if self.args.is_empty() {
            self.name.clone()
        } else {
            format!("{} {}", self.name, self.args.join(" "))
        }
    }
}

/// Translates the text of an nginx configuration read from `file`.
pub fn translate(text: &str, file: &str) -> Result<Plan, ImportError> {
    let tree = parse(text, file)?;
    let mut t = Translator {
        file: file.to_string(),
        plan: Plan::default(),
        upstreams: HashMap::new(),
        servers: Vec::new(),
    };
    // A file holding only the inside of `http { }` (as sites-enabled files do) is read as that.
    let http: Vec<Directive> = match tree.iter().find(|d| d.name == "http") {
        Some(h) => {
            for d in &tree {
                if d.name != "http" {
                    t.skip(d, "outside the http context");
                }
            }
            h.block.clone().unwrap_or_default()
        }
        None => tree,
    };
    t.http(&http);
    Ok(t.plan)
}

struct Server {
    /// Listener names.
    listeners: Vec<String>,
    /// Listener names for which this server is the default one.
    default_for: Vec<String>,
    exact_names: Vec<String>,
    wildcard_names: Vec<String>,
    /// Routes without host and listener conditions, in nginx's precedence order.
    routes: Vec<Route>,
}

struct Inherited {
    connect_timeout: Option<String>,
    read_timeout: Option<String>,
}

struct Translator {
    file: String,
    plan: Plan,
    /// Upstream name → cluster index.
    upstreams: HashMap<String, usize>,
    servers: Vec<Server>,
}

impl Translator {
    fn origin(&self, d: &Directive) -> Origin {
        Origin {
            file: self.file.clone(),
            line: d.line,
        }
    }

    fn skip(&mut self, d: &Directive, why: &str) {
        let o = self.origin(d);
        self.plan.skip(o, d.text(), why);
    }

    fn http(&mut self, http: &[Directive]) {
        // Upstreams first: servers refer to them by name wherever they are declared.
        for d in http.iter().filter(|d| d.name == "upstream") {
            self.upstream(d);
        }
        let inherited = Inherited {
            connect_timeout: setting(http, "proxy_connect_timeout").and_then(duration),
            read_timeout: setting(http, "proxy_read_timeout").and_then(duration),
        };
        for d in http {
            match d.name.as_str() {
                "upstream" => {}
                "server" => self.server(d, &inherited),
                "proxy_connect_timeout" | "proxy_read_timeout" if duration_arg(d).is_some() => {}
                // Equivalent to what lbd does anyway.
                "proxy_http_version" | "sendfile" | "tcp_nopush" | "tcp_nodelay" => {}
                _ => self.skip(d, not_translated(&d.name)),
            }
        }
        self.emit_routes();
    }

    fn upstream(&mut self, d: &Directive) {
        let Some(name) = d.args.first().cloned() else {
            return self.skip(d, "upstream without a name");
        };
        let origin = self.origin(d);
        let mut c = Cluster::new(self.plan.unique_name(&name), origin);
        let mut passive: Option<(u32, String)> = None;
        let mut weighted = false;
        for s in d.block.as_deref().unwrap_or_default() {
            match s.name.as_str() {
                "server" => {
                    if let Some((e, fails)) = self.upstream_server(s) {
                        weighted |= e.weight != 1;
                        if let Some(f) = fails {
                            match &passive {
                                None => passive = Some(f),
                                Some(p) if *p != f => self.skip(
                                    s,
                                    "max_fails/fail_timeout differ between servers; lbd sets them \
                                     per cluster, the first server's values are used",
                                ),
                                Some(_) => {}
                            }
                        }
                        c.endpoints.push(e);
                    }
                }
                "least_conn" => c.policy = "least_request",
                "ip_hash" => c.policy = "ip_hash",
                "random" => c.policy = "random",
                "hash" => match s.args.first().map(String::as_str) {
                    Some("$remote_addr" | "$binary_remote_addr") => {
                        c.policy = "maglev";
                        c.hash = Some(("hash_key", "client_ip".into()));
                    }
                    Some(v) if v.starts_with("$http_") => {
                        c.policy = "header_hash";
                        c.hash = Some(("hash_header", v["$http_".len()..].replace('_', "-")));
                    }
                    Some(v) if v.starts_with("$cookie_") => {
                        c.policy = "cookie_hash";
                        c.hash = Some(("hash_cookie", v["$cookie_".len()..].to_string()));
                    }
                    _ => self.skip(
                        s,
                        "lbd hashes the client address, a header or a cookie; round robin used",
                    ),
                },
                // lbd keeps idle upstream connections by default (clusters.pool.max_idle), and
                // shares state between workers without a zone.
                "keepalive" | "zone" | "keepalive_timeout" | "keepalive_requests" => {}
                "health_check" => c.health = Some(self.health(s)),
                _ => self.skip(s, not_translated(&s.name)),
            }
        }
        if weighted && c.policy == "round_robin" {
            c.policy = "weighted_round_robin";
        }
        // nginx's round robin is its smooth weighted one, which lbd's weighted_round_robin is.
        if c.policy == "round_robin" {
            c.policy = "weighted_round_robin";
        }
        c.passive = passive;
        let idx = self.plan.clusters.len();
        self.plan.clusters.push(c);
        self.upstreams.insert(name, idx);
    }

    /// `server addr [weight=N] [max_fails=N] [fail_timeout=T] [backup] [down]`.
    fn upstream_server(&mut self, s: &Directive) -> Option<(Endpoint, Option<(u32, String)>)> {
        let Some(addr) = s.args.first() else {
            self.skip(s, "server without an address");
            return None;
        };
        let Some(address) = endpoint_address(addr, 80) else {
            self.skip(
                s,
                "only ip:port endpoints are translated (host names and unix sockets are not)",
            );
            return None;
        };
        let mut e = Endpoint {
            address,
            weight: 1,
            backup: false,
        };
        let (mut max_fails, mut fail_timeout) = (None, None);
        for p in &s.args[1..] {
            let (k, v) = p.split_once('=').unwrap_or((p.as_str(), ""));
            match k {
                "weight" => match v.parse::<u32>() {
                    Ok(w) if w > 0 => e.weight = w,
                    _ => self.skip(s, "weight is not a positive number"),
                },
                "max_fails" => max_fails = v.parse::<u32>().ok(),
                "fail_timeout" => fail_timeout = duration(v),
                "backup" => e.backup = true,
                "down" => {
                    self.skip(s, "marked down: left out");
                    return None;
                }
                _ => self.skip(s, &format!("parameter {k:?} is not translated")),
            }
        }
        let fails = match (max_fails, fail_timeout) {
            (None, None) => None,
            (f, t) => Some((f.unwrap_or(1), t.unwrap_or_else(|| "10s".into()))),
        };
        Some((e, fails))
    }

    /// nginx Plus `health_check [interval=T] [fails=N] [passes=N] [uri=U]`.
    fn health(&mut self, s: &Directive) -> Health {
        let mut h = Health {
            path: Some("/".into()),
            interval: Some("5s".into()),
            rise: Some(1),
            fall: Some(1),
            ..Health::default()
        };
        for p in &s.args {
            let (k, v) = p.split_once('=').unwrap_or((p.as_str(), ""));
            match k {
                "interval" => h.interval = duration(v),
                "fails" => h.fall = v.parse().ok(),
                "passes" => h.rise = v.parse().ok(),
                "uri" => h.path = Some(v.to_string()),
                _ => self.skip(
                    s,
                    &format!("health_check parameter {k:?} is not translated"),
                ),
            }
        }
        h
    }

    fn server(&mut self, d: &Directive, outer: &Inherited) {
        let body = d.block.as_deref().unwrap_or_default();
        let inherited = Inherited {
            connect_timeout: setting(body, "proxy_connect_timeout")
                .and_then(duration)
                .or(outer.connect_timeout.clone()),
            read_timeout: setting(body, "proxy_read_timeout")
                .and_then(duration)
                .or(outer.read_timeout.clone()),
        };
        let mut listeners = Vec::new();
        let mut default_for = Vec::new();
        let (mut exact_names, mut wildcard_names) = (Vec::new(), Vec::new());
        let mut locations = Vec::new();
        let mut server_return = None;
        for s in body {
            match s.name.as_str() {
                "listen" => {
                    if let Some((name, default)) = self.listen(s) {
                        if default {
                            default_for.push(name.clone());
                        }
                        listeners.push(name);
                    }
                }
                "server_name" => {
                    for n in &s.args {
                        self.server_name(s, n, &mut exact_names, &mut wildcard_names);
                    }
                }
                "location" => locations.push(s.clone()),
                "return" => server_return = Some(s.clone()),
                "proxy_connect_timeout" | "proxy_read_timeout" if duration_arg(s).is_some() => {}
                _ => self.skip(s, not_translated(&s.name)),
            }
        }
        if listeners.is_empty() {
            // nginx listens on *:80 when a server has no listen directive.
            let fake = Directive {
                name: "listen".into(),
                args: vec!["80".into()],
                line: d.line,
                block: None,
            };
            if let Some((name, _)) = self.listen(&fake) {
                listeners.push(name);
            }
        }
        let base = exact_names
            .first()
            .or(wildcard_names.first())
            .cloned()
            .unwrap_or_else(|| "default".into());
        let mut routes = Vec::new();
        if let Some(r) = server_return {
            // `return` at server level answers every request before any location.
            if let Some(route) = self.return_route(&r, &base, None) {
                routes.push(route);
            }
        } else {
            routes = self.locations(&locations, &base, &inherited);
        }
        if routes.is_empty() {
            self.skip(
                d,
                "server has no location that proxies or returns; nothing to route",
            );
        }
        self.servers.push(Server {
            listeners,
            default_for,
            exact_names,
            wildcard_names,
            routes,
        });
    }

    /// `listen [addr:]port [default_server] ...` → listener name, default flag.
    fn listen(&mut self, s: &Directive) -> Option<(String, bool)> {
        let Some(spec) = s.args.first() else {
            self.skip(s, "listen without an address");
            return None;
        };
        let mut default = false;
        for p in &s.args[1..] {
            match p.as_str() {
                "default_server" | "default" => default = true,
                "ssl" | "quic" => {
                    self.skip(
                        s,
                        "TLS listener: add a [listeners.tls] table with its certificates by hand",
                    );
                    return None;
                }
                "http2" | "reuseport" | "deferred" => {}
                _ if p.starts_with("backlog=") => {}
                _ => self.skip(s, &format!("listen parameter {p:?} is not translated")),
            }
        }
        let Some(bind) = listen_address(spec) else {
            self.skip(s, "only [ip:]port listen addresses are translated");
            return None;
        };
        if let Some(l) = self.plan.listeners.iter().find(|l| l.bind == bind) {
            return Some((l.name.clone(), default));
        }
        let port = bind.rsplit(':').next().unwrap_or("80");
        let name = self.plan.unique_name(&format!("http-{port}"));
        let origin = self.origin(s);
        self.plan.listeners.push(Listener {
            name: name.clone(),
            bind,
            origin,
        });
        Some((name, default))
    }

    fn server_name(
        &mut self,
        s: &Directive,
        n: &str,
        exact: &mut Vec<String>,
        wildcard: &mut Vec<String>,
    ) {
        if n.is_empty() || n == "_" {
            return;
        }
        if n.starts_with('~') || n.ends_with(".*") || n.contains('$') {
            return self.skip(
                s,
                &format!("server name {n:?}: regular expressions and trailing wildcards are not translated"),
            );
        }
        if let Some(rest) = n.strip_prefix('.') {
            // `.example.com` is example.com and every name under it.
            exact.push(rest.to_ascii_lowercase());
            wildcard.push(format!("*.{}", rest.to_ascii_lowercase()));
        } else if n.starts_with("*.") {
            wildcard.push(n.to_ascii_lowercase());
        } else {
            exact.push(n.to_ascii_lowercase());
        }
    }

    fn locations(&mut self, locs: &[Directive], base: &str, inh: &Inherited) -> Vec<Route> {
        let mut exact = Vec::new();
        let mut stop_prefix = Vec::new();
        let mut regex = Vec::new();
        let mut prefix = Vec::new();
        for l in locs {
            let (modifier, path) = match l.args.as_slice() {
                [p] => ("", p.as_str()),
                [m, p] => (m.as_str(), p.as_str()),
                _ => {
                    self.skip(l, "location needs a path");
                    continue;
                }
            };
            let (matcher, bucket) = match modifier {
                "=" => (PathMatch::Exact(path.into()), &mut exact),
                "^~" => (PathMatch::Prefix(path.into()), &mut stop_prefix),
                "~" => (PathMatch::Regex(path.into()), &mut regex),
                "~*" => (PathMatch::Regex(format!("(?i){path}")), &mut regex),
                "" if path.starts_with('@') => {
                    self.skip(l, "named locations are not translated");
                    continue;
                }
                "" => (PathMatch::Prefix(path.into()), &mut prefix),
                _ => {
                    self.skip(l, "unknown location modifier");
                    continue;
                }
            };
            bucket.push((matcher, l.clone()));
        }
        let by_len_desc = |v: &mut Vec<(PathMatch, Directive)>| {
            v.sort_by_key(|(m, _)| match m {
                PathMatch::Prefix(p) => std::cmp::Reverse(p.len()),
                _ => std::cmp::Reverse(0),
            })
        };
        by_len_desc(&mut stop_prefix);
        by_len_desc(&mut prefix);
        let mut out = Vec::new();
        for (m, l) in exact
            .into_iter()
            .chain(stop_prefix)
            .chain(regex)
            .chain(prefix)
        {
            if let Some(r) = self.location(&l, m, base, inh) {
                out.push(r);
            }
        }
        out
    }

    fn location(
        &mut self,
        l: &Directive,
        path: PathMatch,
        base: &str,
        inh: &Inherited,
    ) -> Option<Route> {
        let body = l.block.as_deref().unwrap_or_default();
        let mut route: Option<Route> = None;
        let mut connect = inh.connect_timeout.clone();
        let mut read = inh.read_timeout.clone();
        let rules: Vec<&Directive> = body
            .iter()
            .filter(|d| d.name == "allow" || d.name == "deny")
            .collect();
        let access = if rules.is_empty() {
            None
        } else {
            match access_lists(&rules) {
                Some(a) => Some(a),
                None => {
                    self.skip(l, "allow/deny order not translated: only allows then `deny all`, or denies then `allow all`");
                    return None;
                }
            }
        };
        let denies_all = access
            .as_ref()
            .is_some_and(|(allow, deny)| allow.is_empty() && deny.iter().any(|d| d == "0.0.0.0/0"));
        for s in body {
            match s.name.as_str() {
                "allow" | "deny" => {}
                "proxy_pass" => route = self.proxy_pass(s, &path, base),
                "return" => route = self.return_route(s, base, Some(path.clone())),
                "proxy_connect_timeout" => connect = duration_arg(s).or(connect),
                "proxy_read_timeout" => read = duration_arg(s).or(read),
                "proxy_set_header" if equivalent_header(&s.args) => {}
                "proxy_http_version" | "proxy_buffering" => {}
                "limit_except" => {
                    let methods: Vec<String> = s.args.clone();
                    self.skip(
                        s,
                        &format!(
                            "limit_except: lbd routes by method instead; add methods = {methods:?} \
                             to the route's match if the other methods should not reach it"
                        ),
                    );
                }
                "location" => self.skip(s, "nested locations are not translated"),
                _ => self.skip(s, not_translated(&s.name)),
            }
        }
        if route.is_none() && denies_all {
            // `deny all` on a location that serves files: every request gets 403.
            let d = Directive {
                name: "return".into(),
                args: vec!["403".into()],
                line: l.line,
                block: None,
            };
            route = self.return_route(&d, base, None);
        }
        let Some(mut r) = route else {
            self.skip(l, "location neither proxies nor returns");
            return None;
        };
        r.path = Some(path);
        r.origin = self.origin(l);
        if r.answer.is_none() {
            r.access = access;
        }
        if r.answer.is_none() {
            r.timeout = read;
            if let (Some(t), Some(c)) = (connect, self.cluster_mut(&r.cluster))
                && c.connect_timeout.is_none()
            {
                c.connect_timeout = Some(t);
            }
        }
        Some(r)
    }

    fn cluster_mut(&mut self, name: &str) -> Option<&mut Cluster> {
        self.plan.clusters.iter_mut().find(|c| c.name == name)
    }

    fn proxy_pass(&mut self, s: &Directive, path: &PathMatch, base: &str) -> Option<Route> {
        let Some(url) = s.args.first() else {
            self.skip(s, "proxy_pass without a URL");
            return None;
        };
        if url.contains('$') {
            self.skip(s, "proxy_pass with variables is not translated");
            return None;
        }
        let Some(rest) = url.strip_prefix("http://") else {
            self.skip(
                s,
                "only http:// upstreams are translated (TLS to upstreams is configured per cluster)",
            );
            return None;
        };
        let (authority, uri) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i..])),
            None => (rest, None),
        };
        let cluster = match self.upstreams.get(authority) {
            Some(&i) => self.plan.clusters.get(i).map(|c| c.name.clone())?,
            None => {
                let Some(address) = endpoint_address(authority, 80) else {
                    self.skip(s, "proxy_pass to an unknown upstream or a host name");
                    return None;
                };
                self.address_cluster(&address, s)
            }
        };
        let origin = self.origin(s);
        let name = self.plan.unique_name(base);
        let mut r = Route::new(name, cluster, origin);
        if let Some(uri) = uri {
            // nginx replaces the part of the path that matched the location with the URI.
            match path {
                PathMatch::Prefix(p) if p != uri => r.replace_prefix = Some(uri.to_string()),
                PathMatch::Prefix(_) => {}
                _ => self.skip(
                    s,
                    "a URI in proxy_pass of a regex/exact location is not translated",
                ),
            }
        }
        // Reserve the name now so that the next route of this server gets another.
        self.plan.routes.push(r.clone());
        Some(r)
    }

    /// The cluster for a literal `proxy_pass http://ip:port`, made once per address.
    fn address_cluster(&mut self, address: &str, s: &Directive) -> String {
        if let Some(c) = self.plan.clusters.iter().find(|c| {
            c.endpoints.len() == 1
                && c.endpoints[0].address == address
                && c.name.starts_with("addr-")
        }) {
            return c.name.clone();
        }
        let origin = self.origin(s);
        let mut c = Cluster::new(self.plan.unique_name(&format!("addr-{address}")), origin);
        c.endpoints.push(Endpoint {
            address: address.to_string(),
            weight: 1,
            backup: false,
        });
        let name = c.name.clone();
        self.plan.clusters.push(c);
        name
    }

    /// `return code [text|URL]`.
    fn return_route(
        &mut self,
        s: &Directive,
        base: &str,
        path: Option<PathMatch>,
    ) -> Option<Route> {
        let code = s.args.first().and_then(|c| c.parse::<u16>().ok());
        let answer = match (code, s.args.get(1).map(String::as_str)) {
            (Some(c @ (301 | 302 | 303 | 307 | 308)), Some(url))
                if url == "https://$host$request_uri"
                    || url == "https://$server_name$request_uri" =>
            {
                Answer::ToScheme {
                    status: c,
                    scheme: "https".into(),
                }
            }
            (Some(c), text)
                if (200..600).contains(&c) && !matches!(c, 301 | 302 | 303 | 307 | 308) =>
            {
                match text {
                    Some(t) if t.contains('$') => {
                        self.skip(s, "return text with variables is not translated");
                        return None;
                    }
                    t => Answer::Direct {
                        status: c,
                        body: t.unwrap_or("").to_string(),
                    },
                }
            }
            _ => {
                self.skip(s, "only `return CODE [text]` and redirects to https://$host$request_uri are translated");
                return None;
            }
        };
        // A route needs a cluster even when it answers itself; any will do, none is called.
        let Some(cluster) = self.plan.clusters.first().map(|c| c.name.clone()) else {
            self.skip(s, "a local answer needs at least one upstream in the file");
            return None;
        };
        let origin = self.origin(s);
        let mut r = Route::new(self.plan.unique_name(base), cluster, origin);
        r.path = path;
        r.answer = Some(answer);
        self.plan.routes.push(r.clone());
        Some(r)
    }

    /// Replaces the placeholder routes pushed while translating with the final order:
    /// servers' exact names, then wildcard names, then each listener's default server.
    fn emit_routes(&mut self) {
        self.plan.routes.clear();
        let servers = std::mem::take(&mut self.servers);
        for pass in 0..2 {
            for s in &servers {
                let names = if pass == 0 {
                    &s.exact_names
                } else {
                    &s.wildcard_names
                };
                if names.is_empty() {
                    continue;
                }
                for r in &s.routes {
                    let mut r = r.clone();
                    r.hosts = names.clone();
                    r.listeners = s.listeners.clone();
                    self.push_route(r, "");
                }
            }
        }
        // The server that answers requests whose Host names no server: the one marked
        // default_server on a listener, else the first server on it.
        let listeners: Vec<String> = self.plan.listeners.iter().map(|l| l.name.clone()).collect();
        for l in listeners {
            let chosen = servers
                .iter()
                .find(|s| s.default_for.contains(&l))
                .or_else(|| servers.iter().find(|s| s.listeners.contains(&l)));
            if let Some(s) = chosen {
                for r in &s.routes {
                    let mut r = r.clone();
                    r.listeners = vec![l.clone()];
                    self.push_route(r, &format!("-{l}-default"));
                }
            }
        }
    }

    /// Appends a final route under a name not yet taken (its own name plus `suffix`).
    fn push_route(&mut self, mut r: Route, suffix: &str) {
        r.name = self.plan.unique_name(&format!("{}{suffix}", r.name));
        self.plan.routes.push(r);
    }
}

/// nginx `allow`/`deny` (first match wins) → lbd's allow and deny lists, for the two orders
/// that mean the same in both: allows then `deny all`, or denies then (optionally) `allow all`.
fn access_lists(rules: &[&Directive]) -> Option<(Vec<String>, Vec<String>)> {
    let everyone = || vec!["0.0.0.0/0".to_string(), "::/0".to_string()];
    let arg = |d: &Directive| d.args.first().cloned().unwrap_or_default();
    let (last, head) = rules.split_last()?;
    if last.name == "deny" && arg(last) == "all" {
        if head.is_empty() {
            return Some((Vec::new(), everyone()));
        }
        if head.iter().all(|d| d.name == "allow" && arg(d) != "all") {
            return Some((head.iter().map(|d| arg(d)).collect(), Vec::new()));
        }
        return None;
    }
    let denies: Vec<&&Directive> = if last.name == "allow" && arg(last) == "all" {
        head.iter().collect()
    } else {
        rules.iter().collect()
    };
    if denies.iter().all(|d| d.name == "deny" && arg(d) != "all") {
        return Some((Vec::new(), denies.iter().map(|d| arg(d)).collect()));
    }
    None
}

/// A skip reason for directives with no lbd equivalent.
fn not_translated(name: &str) -> &'static str {
    match name {
        "include" => "includes are not followed: import the included file or inline it",
        "ssl_certificate" | "ssl_certificate_key" | "ssl_protocols" | "ssl_ciphers" => {
            "TLS settings: set them in the listener's [listeners.tls] table"
        }
        "access_log" | "error_log" | "log_format" => {
            "logging is configured in [global] (access_log, log_format)"
        }
        _ => "no lbd equivalent translated",
    }
}

/// `proxy_set_header` lines that say what lbd does by default.
fn equivalent_header(args: &[String]) -> bool {
    let [name, value] = args else { return false };
    let name = name.to_ascii_lowercase();
    matches!(
        (name.as_str(), value.as_str()),
        ("host", "$host" | "$http_host")
            | ("x-forwarded-for", "$proxy_add_x_forwarded_for")
            | ("x-forwarded-proto", "$scheme")
            | ("connection", "")
    )
}

/// First argument of the first directive called `name`.
fn setting<'a>(ds: &'a [Directive], name: &str) -> Option<&'a str> {
    ds.iter()
        .find(|d| d.name == name)
        .and_then(|d| d.args.first())
        .map(String::as_str)
}

fn duration_arg(d: &Directive) -> Option<String> {
    d.args.first().and_then(|a| duration(a))
}

/// nginx time (`30`, `30s`, `500ms`, `1m`, `1h`) → lbd duration text.
fn duration(v: &str) -> Option<String> {
    if v.is_empty() {
        return None;
    }
    if v.bytes().all(|b| b.is_ascii_digit()) {
        return Some(format!("{v}s"));
    }
    let digits = v.bytes().take_while(u8::is_ascii_digit).count();
    let (n, unit) = v.split_at(digits);
    if n.is_empty() {
        return None;
    }
    match unit {
        "ms" | "s" | "m" | "h" => Some(v.to_string()),
        "d" => n.parse::<u64>().ok().map(|d| format!("{}h", d * 24)),
        _ => None,
    }
}

/// `ip`, `ip:port`, `[v6]:port`, `localhost:port` → `ip:port`.
pub(super) fn endpoint_address(s: &str, default_port: u16) -> Option<String> {
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Some(sa.to_string());
    }
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Some(std::net::SocketAddr::new(ip, default_port).to_string());
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().ok()?),
        None => (s, default_port),
    };
    (host == "localhost").then(|| format!("127.0.0.1:{port}"))
}

/// nginx `listen` address → lbd `bind`.
fn listen_address(spec: &str) -> Option<String> {
    if let Ok(port) = spec.parse::<u16>() {
        return Some(format!("0.0.0.0:{port}"));
    }
    if let Some(port) = spec.strip_prefix("*:") {
        return port.parse::<u16>().ok().map(|p| format!("0.0.0.0:{p}"));
    }
    endpoint_address(spec, 80)
}

/// Splits nginx's syntax into directives, keeping each one's line.
fn parse(text: &str, file: &str) -> Result<Vec<Directive>, ImportError> {
    let tokens = tokenize(text, file)?;
    let mut pos = 0;
    let out = block(&tokens, &mut pos, file, None)?;
    Ok(out)
}

#[derive(Debug, PartialEq)]
enum Tok {
    Word(String),
    Semi,
    Open,
    Close,
}

fn tokenize(text: &str, file: &str) -> Result<Vec<(Tok, usize)>, ImportError> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while let Some(c) = chars.next() {
        match c {
            '\n' => line += 1,
            c if c.is_whitespace() => {}
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        line += 1;
                        break;
                    }
                }
            }
            ';' => out.push((Tok::Semi, line)),
            '{' => out.push((Tok::Open, line)),
            '}' => out.push((Tok::Close, line)),
            '"' | '\'' => {
                let start = line;
                let mut w = String::new();
                loop {
                    match chars.next() {
                        None => {
                            return Err(ImportError::syntax(file, start, "unterminated quote"));
                        }
                        Some(q) if q == c => break,
                        Some('\\') => match chars.next() {
                            Some('n') => w.push('\n'),
                            Some(e) => w.push(e),
                            None => {}
                        },
                        Some(x) => {
                            if x == '\n' {
                                line += 1;
                            }
                            w.push(x);
                        }
                    }
                }
                out.push((Tok::Word(w), start));
            }
            c => {
                let mut w = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n.is_whitespace() || matches!(n, ';' | '{' | '}') {
                        break;
                    }
                    // `${var}` keeps its braces inside a word.
                    if n == '$' {
                        w.push(n);
                        chars.next();
                        if chars.peek() == Some(&'{') {
                            for x in chars.by_ref() {
                                w.push(x);
                                if x == '}' {
                                    break;
                                }
                            }
                        }
                        continue;
                    }
                    w.push(n);
                    chars.next();
                }
                out.push((Tok::Word(w), line));
            }
        }
    }
    Ok(out)
}

fn block(
    toks: &[(Tok, usize)],
    pos: &mut usize,
    file: &str,
    opened_at: Option<usize>,
) -> Result<Vec<Directive>, ImportError> {
    let mut out = Vec::new();
    loop {
        let Some((tok, line)) = toks.get(*pos) else {
            return match opened_at {
                Some(l) => Err(ImportError::syntax(
                    file,
                    l,
                    "block opened here is never closed",
                )),
                None => Ok(out),
            };
        };
        *pos += 1;
        match tok {
            Tok::Close => {
                return match opened_at {
                    Some(_) => Ok(out),
                    None => Err(ImportError::syntax(file, *line, "unexpected \"}\"")),
                };
            }
            Tok::Semi => {}
            Tok::Open => return Err(ImportError::syntax(file, *line, "unexpected \"{\"")),
            Tok::Word(name) => {
                let mut args = Vec::new();
                loop {
                    match toks.get(*pos) {
                        Some((Tok::Word(w), _)) => {
                            args.push(w.clone());
                            *pos += 1;
                        }
                        Some((Tok::Semi, _)) => {
                            *pos += 1;
                            out.push(Directive {
                                name: name.clone(),
                                args,
                                line: *line,
                                block: None,
                            });
                            break;
                        }
                        Some((Tok::Open, _)) => {
                            *pos += 1;
                            let inner = block(toks, pos, file, Some(*line))?;
                            out.push(Directive {
                                name: name.clone(),
                                args,
                                line: *line,
                                block: Some(inner),
                            });
                            break;
                        }
                        _ => {
                            return Err(ImportError::syntax(
                                file,
                                *line,
                                &format!("directive {name:?} is not terminated by \";\""),
                            ));
                        }
                    }
                }
            }
        }
    }
}
