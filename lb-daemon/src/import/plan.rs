//! The translated configuration, independent of the source format, and its rendering as an
//! `lb.toml` that keeps a `# from file:line` comment on every table.
use std::fmt::Write as _;

/// Where a piece of the source configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Source file as given on the command line.
    pub file: String,
    /// 1-based line.
    pub line: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// A directive that was not carried over, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Where it was.
    pub origin: Origin,
    /// The directive as written (name and arguments).
    pub directive: String,
    /// Why it was left out.
    pub why: String,
}

/// `[[listeners]]`.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Unique name.
    pub name: String,
    /// `ip:port`.
    pub bind: String,
    /// Where it was declared.
    pub origin: Origin,
}

/// How a route matches the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// `path_prefix`.
    Prefix(String),
    /// `path_exact`.
    Exact(String),
    /// `path_regex`.
    Regex(String),
}

/// What a route does besides forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `direct_response` with a status and a body.
    Direct { status: u16, body: String },
    /// `redirect` to the same host and path with another scheme.
    ToScheme { status: u16, scheme: String },
}

/// `[[routes]]`.
#[derive(Debug, Clone)]
pub struct Route {
    /// Unique name.
    pub name: String,
    /// Target cluster.
    pub cluster: String,
    /// Listener names (empty: every listener).
    pub listeners: Vec<String>,
    /// `match.hosts`.
    pub hosts: Vec<String>,
    /// `match.path_*`.
    pub path: Option<PathMatch>,
    /// `match.headers`: name and optional exact value.
    pub headers: Vec<(String, Option<String>)>,
    /// `match.methods`.
    pub methods: Vec<String>,
    /// `rewrite.replace_prefix`.
    pub replace_prefix: Option<String>,
    /// Route `timeout`.
    pub timeout: Option<String>,
    /// A local answer instead of forwarding.
    pub answer: Option<Answer>,
    /// `access` filter: allowed and denied CIDRs.
    pub access: Option<(Vec<String>, Vec<String>)>,
    /// Where it was declared.
    pub origin: Origin,
}

impl Route {
    /// A route with only a name, a cluster and an origin.
    pub fn new(name: String, cluster: String, origin: Origin) -> Self {
        Route {
            name,
            cluster,
            listeners: Vec::new(),
            hosts: Vec::new(),
            path: None,
            headers: Vec::new(),
            methods: Vec::new(),
            replace_prefix: None,
            timeout: None,
            answer: None,
            access: None,
            origin,
        }
    }
}

/// `[[clusters.endpoints]]`.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `ip:port`.
    pub address: String,
    /// Relative weight.
    pub weight: u32,
    /// Used only when no primary endpoint is available.
    pub backup: bool,
}

/// `[clusters.health_check]` (HTTP).
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// Request path.
    pub path: Option<String>,
    /// Accepted status or range.
    pub expected_status: Option<String>,
    /// Interval between checks.
    pub interval: Option<String>,
    /// Time allowed per check.
    pub timeout: Option<String>,
    /// Successes to go up.
    pub rise: Option<u32>,
    /// Failures to go down.
    pub fall: Option<u32>,
    /// TCP connect check instead of HTTP.
    pub tcp: bool,
}

/// `[[clusters]]`.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Unique name.
    pub name: String,
    /// `policy`.
    pub policy: &'static str,
    /// `hash_header` (header_hash) or `hash_cookie` (cookie_hash) or `hash_key` (maglev).
    pub hash: Option<(&'static str, String)>,
    /// Endpoints in order.
    pub endpoints: Vec<Endpoint>,
    /// Active health check.
    pub health: Option<Health>,
    /// `passive.max_fails` and `passive.fail_timeout`.
    pub passive: Option<(u32, String)>,
    /// `timeouts.connect`.
    pub connect_timeout: Option<String>,
    /// `timeouts.response`.
    pub response_timeout: Option<String>,
    /// `retry.attempts`.
    pub retries: Option<u32>,
    /// Where it was declared.
    pub origin: Origin,
}

impl Cluster {
    /// A round-robin cluster without endpoints.
    pub fn new(name: String, origin: Origin) -> Self {
        Cluster {
            name,
            policy: "round_robin",
            hash: None,
            endpoints: Vec::new(),
            health: None,
            passive: None,
            connect_timeout: None,
            response_timeout: None,
            retries: None,
            origin,
        }
    }
}

/// A whole translated configuration and what could not be translated.
#[derive(Debug, Default)]
pub struct Plan {
    /// Listeners.
    pub listeners: Vec<Listener>,
    /// Routes in match order (the renderer keeps this order; priorities are not needed).
    pub routes: Vec<Route>,
    /// Clusters.
    pub clusters: Vec<Cluster>,
    /// Directives left out.
    pub skipped: Vec<Skipped>,
}

impl Plan {
    /// Records a directive that was not translated.
    pub fn skip(&mut self, origin: Origin, directive: impl Into<String>, why: impl Into<String>) {
        self.skipped.push(Skipped {
            origin,
            directive: directive.into(),
            why: why.into(),
        });
    }

    /// A name not yet used by any listener, route or cluster, made from `base`.
    pub fn unique_name(&self, base: &str) -> String {
        let base: String = base
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let base = base.trim_matches('-');
        let base = if base.is_empty() {
            "unnamed".to_string()
        } else {
            base.to_string()
        };
        let taken = |n: &str| {
            self.listeners.iter().any(|l| l.name == n)
                || self.routes.iter().any(|r| r.name == n)
                || self.clusters.iter().any(|c| c.name == n)
        };
        if !taken(&base) {
            return base;
        }
        (2..)
            .map(|i| format!("{base}-{i}"))
            .find(|n| !taken(n))
            .unwrap_or(base)
    }

    /// The plan as `lb.toml` text.
    pub fn render(&self, source: &str) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "# Generated by `lbd import {source}`.");
        let _ = writeln!(
            o,
            "# Check it with `lbd check --config <this file>`; directives that were not carried over"
        );
        let _ = writeln!(o, "# are listed at the end of this file.\n");
        for l in &self.listeners {
            let _ = writeln!(o, "# from {}", l.origin);
            let _ = writeln!(o, "[[listeners]]");
            kv(&mut o, "name", &l.name);
            kv(&mut o, "bind", &l.bind);
            let _ = writeln!(o, "protocol = \"http\"\n");
        }
        for r in &self.routes {
            render_route(&mut o, r);
        }
        for c in &self.clusters {
            render_cluster(&mut o, c);
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(o, "# Not translated:");
            for s in &self.skipped {
                let _ = writeln!(o, "#   {}: {} ({})", s.origin, s.directive, s.why);
            }
        }
        o
    }
}

fn render_route(o: &mut String, r: &Route) {
    let _ = writeln!(o, "# from {}", r.origin);
    let _ = writeln!(o, "[[routes]]");
    kv(o, "name", &r.name);
    kv(o, "cluster", &r.cluster);
    if !r.listeners.is_empty() {
        let _ = writeln!(o, "listeners = {}", list(&r.listeners));
    }
    if let Some(t) = &r.timeout {
        kv(o, "timeout", t);
    }
    let has_match =
        !r.hosts.is_empty() || r.path.is_some() || !r.headers.is_empty() || !r.methods.is_empty();
    if has_match {
        let _ = writeln!(o, "[routes.match]");
        if !r.hosts.is_empty() {
            let _ = writeln!(o, "hosts = {}", list(&r.hosts));
        }
        match &r.path {
            Some(PathMatch::Prefix(p)) => kv(o, "path_prefix", p),
            Some(PathMatch::Exact(p)) => kv(o, "path_exact", p),
            Some(PathMatch::Regex(p)) => kv(o, "path_regex", p),
            None => {}
        }
        if !r.methods.is_empty() {
            let _ = writeln!(o, "methods = {}", list(&r.methods));
        }
        if !r.headers.is_empty() {
            let items: Vec<String> = r
                .headers
                .iter()
                .map(|(n, v)| match v {
                    Some(v) => format!("{{ name = {}, value = {} }}", quote(n), quote(v)),
                    None => format!("{{ name = {} }}", quote(n)),
                })
                .collect();
            let _ = writeln!(o, "headers = [{}]", items.join(", "));
        }
    }
    if let Some(p) = &r.replace_prefix {
        let _ = writeln!(o, "[routes.rewrite]");
        kv(o, "replace_prefix", p);
    }
    if let Some((allow, deny)) = &r.access {
        let _ = writeln!(o, "[[routes.filters]]");
        let _ = writeln!(
            o,
            "access = {{ allow = {}, deny = {} }}",
            list(allow),
            list(deny)
        );
    }
    match &r.answer {
        Some(Answer::Direct { status, body }) => {
            let _ = writeln!(o, "[[routes.filters]]");
            let _ = writeln!(
                o,
                "direct_response = {{ status = {status}, body = {} }}",
                quote(body)
            );
        }
        Some(Answer::ToScheme { status, scheme }) => {
            let _ = writeln!(o, "[[routes.filters]]");
            let _ = writeln!(
                o,
                "redirect = {{ status = {status}, scheme = {} }}",
                quote(scheme)
            );
        }
        None => {}
    }
    o.push('\n');
}

fn render_cluster(o: &mut String, c: &Cluster) {
    let _ = writeln!(o, "# from {}", c.origin);
    let _ = writeln!(o, "[[clusters]]");
    kv(o, "name", &c.name);
    kv(o, "policy", c.policy);
    if let Some((key, value)) = &c.hash {
        kv(o, key, value);
    }
    for e in &c.endpoints {
        let _ = writeln!(o, "[[clusters.endpoints]]");
        kv(o, "address", &e.address);
        if e.weight != 1 {
            let _ = writeln!(o, "weight = {}", e.weight);
        }
        if e.backup {
            let _ = writeln!(o, "backup = true");
        }
    }
    if let Some(h) = &c.health {
        let _ = writeln!(o, "[clusters.health_check]");
        if h.tcp {
            kv(o, "kind", "tcp");
        } else {
            kv(o, "kind", "http");
            if let Some(p) = &h.path {
                kv(o, "path", p);
            }
            if let Some(s) = &h.expected_status {
                kv(o, "expected_status", s);
            }
        }
        if let Some(i) = &h.interval {
            kv(o, "interval", i);
        }
        if let Some(t) = &h.timeout {
            kv(o, "timeout", t);
        }
        if let Some(n) = h.rise {
            let _ = writeln!(o, "healthy_threshold = {n}");
        }
        if let Some(n) = h.fall {
            let _ = writeln!(o, "unhealthy_threshold = {n}");
        }
    }
    if let Some((fails, timeout)) = &c.passive {
        let _ = writeln!(o, "[clusters.passive]");
        let _ = writeln!(o, "max_fails = {fails}");
        kv(o, "fail_timeout", timeout);
    }
    if c.connect_timeout.is_some() || c.response_timeout.is_some() {
        let _ = writeln!(o, "[clusters.timeouts]");
        if let Some(t) = &c.connect_timeout {
            kv(o, "connect", t);
        }
        if let Some(t) = &c.response_timeout {
            kv(o, "response", t);
        }
    }
    if let Some(n) = c.retries {
        let _ = writeln!(o, "[clusters.retry]");
        let _ = writeln!(o, "attempts = {n}");
    }
    o.push('\n');
}

fn kv(o: &mut String, key: &str, value: &str) {
    let _ = writeln!(o, "{key} = {}", quote(value));
}

fn list(items: &[String]) -> String {
    let q: Vec<String> = items.iter().map(|s| quote(s)).collect();
    format!("[{}]", q.join(", "))
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            '\t' => q.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(q, "\\u{:04X}", c as u32);
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn quoting_escapes_what_toml_needs() {
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(quote("x\ny"), r#""x\ny""#);
    }
}
