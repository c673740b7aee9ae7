//! `haproxy.cfg` → [`Plan`]: `frontend`/`backend`/`listen` sections in HTTP mode.
//!
//! A frontend's `http-request redirect` rules come first, then its `use_backend` rules in file
//! order (HAProxy's own order), then `default_backend`; every route is restricted to the
//! frontend's listeners, so frontends do not see each other's rules.
use std::collections::HashMap;

use super::ImportError;
use super::nginx::endpoint_address;
use super::plan::{Answer, Cluster, Endpoint, Health, Listener, Origin, PathMatch, Plan, Route};

/// One configuration line, split into words.
#[derive(Debug, Clone)]
struct Line {
    words: Vec<String>,
    line: usize,
}

impl Line {
    fn text(&self) -> String {
        self.words.join(" ")
    }
    fn kw(&self) -> &str {
        self.words.first().map_or("", String::as_str)
    }
    fn arg(&self, i: usize) -> Option<&str> {
        self.words.get(i).map(String::as_str)
    }
}

#[derive(Debug, Clone)]
struct Section {
    kind: String,
    name: String,
    line: usize,
    lines: Vec<Line>,
    /// The `defaults` section in force where this one starts.
    defaults: Option<usize>,
}

/// What one ACL tests, in lbd's terms.
#[derive(Debug, Clone, PartialEq)]
enum Cond {
    Hosts(Vec<String>),
    Paths(Vec<PathMatch>),
    Header(String, Option<String>),
    Methods(Vec<String>),
}

/// Translates the text of an HAProxy configuration read from `file`.
pub fn translate(text: &str, file: &str) -> Result<Plan, ImportError> {
    let sections = parse(text, file)?;
    let mut t = Translator {
        file: file.to_string(),
        plan: Plan::default(),
        backends: HashMap::new(),
    };
    // Backends first: frontends refer to them wherever they are declared.
    for s in &sections {
        if s.kind == "backend" || s.kind == "listen" {
            t.backend(s, &sections);
        }
    }
    for s in &sections {
        match s.kind.as_str() {
            "frontend" | "listen" => t.frontend(s, &sections),
            "backend" | "defaults" => {}
            "global" => {
                for l in &s.lines {
                    t.skip(l, "process setting: lbd has its own ([global])");
                }
            }
            _ => {
                let l = Line {
                    words: vec![s.kind.clone(), s.name.clone()],
                    line: s.line,
                };
                t.skip(&l, "section not translated");
            }
        }
    }
    Ok(t.plan)
}

struct Translator {
    file: String,
    plan: Plan,
    /// Backend name → cluster name.
    backends: HashMap<String, String>,
}

/// Directives of a proxy section, falling back to its `defaults` section.
fn lookup<'a>(
    s: &'a Section,
    all: &'a [Section],
    kw: &str,
    arg0: Option<&str>,
) -> Option<&'a Line> {
    let hit = |l: &&Line| l.kw() == kw && arg0.is_none_or(|a| l.arg(1) == Some(a));
    s.lines.iter().rev().find(hit).or_else(|| {
        s.defaults
            .and_then(|d| all.get(d))
            .and_then(|d| d.lines.iter().rev().find(hit))
    })
}

impl Translator {
    fn origin(&self, line: usize) -> Origin {
        Origin {
            file: self.file.clone(),
            line,
        }
    }

    fn skip(&mut self, l: &Line, why: &str) {
        let o = self.origin(l.line);
        self.plan.skip(o, l.text(), why);
    }

    fn mode_is_tcp(s: &Section, all: &[Section]) -> bool {
        lookup(s, all, "mode", None).and_then(|l| l.arg(1)) == Some("tcp")
    }

    fn backend(&mut self, s: &Section, all: &[Section]) {
        if s.kind == "listen" && s.lines.iter().any(|l| l.kw() == "stats") {
            let l = Line {
                words: vec![s.kind.clone(), s.name.clone()],
                line: s.line,
            };
            return self.skip(
                &l,
                "stats page: lbd's status page is served on the admin address",
            );
        }
        if Self::mode_is_tcp(s, all) {
            let l = Line {
                words: vec![s.kind.clone(), s.name.clone(), "(mode tcp)".into()],
                line: s.line,
            };
            return self.skip(
                &l,
                "TCP mode proxies are not translated (lbd's L4 side is XDP VIPs)",
            );
        }
        let origin = self.origin(s.line);
        let mut c = Cluster::new(self.plan.unique_name(&s.name), origin);
        c.policy = "weighted_round_robin";
        let consistent =
            lookup(s, all, "hash-type", None).and_then(|l| l.arg(1)) == Some("consistent");
        if let Some(b) = lookup(s, all, "balance", None) {
            match b.arg(1) {
                Some("roundrobin" | "static-rr") | None => {}
                Some("leastconn") => c.policy = "least_request",
                Some("random") => c.policy = "random",
                Some("source") if consistent => {
                    c.policy = "maglev";
                    c.hash = Some(("hash_key", "client_ip".into()));
                }
                Some("source") => c.policy = "ip_hash",
                Some(h) if h.starts_with("hdr(") && h.ends_with(')') => {
                    c.policy = "header_hash";
                    c.hash = Some(("hash_header", h[4..h.len() - 1].to_ascii_lowercase()));
                }
                Some(_) => {
                    let b = b.clone();
                    self.skip(
                        &b,
                        "balance algorithm not translated; weighted round robin used",
                    );
                }
            }
        }
        let default_server: Vec<String> = lookup(s, all, "default-server", None)
            .map(|l| l.words[1..].to_vec())
            .unwrap_or_default();
        let mut any_check = false;
        let mut health = Health {
            interval: Some("2s".into()),
            rise: Some(2),
            fall: Some(3),
            tcp: true,
            ..Health::default()
        };
        let mut check_params_taken = false;
        for l in &s.lines {
            match l.kw() {
                "server" => {
                    let Some(addr) = l.arg(2) else {
                        self.skip(l, "server without an address");
                        continue;
                    };
                    let Some(address) = endpoint_address(addr, 80) else {
                        self.skip(
                            l,
                            "only ip:port endpoints are translated (host names are not)",
                        );
                        continue;
                    };
                    let mut e = Endpoint {
                        address,
                        weight: 1,
                        backup: false,
                    };
                    let params: Vec<String> = default_server
                        .iter()
                        .chain(l.words[3..].iter())
                        .cloned()
                        .collect();
                    let mut disabled = false;
                    let mut check = false;
                    let mut i = 0;
                    while i < params.len() {
                        let p = params[i].as_str();
                        let v = params.get(i + 1).map(String::as_str);
                        match (p, v) {
                            ("check", _) => check = true,
                            ("backup", _) => e.backup = true,
                            ("disabled", _) => disabled = true,
                            ("weight", Some(w)) => {
                                match w.parse::<u32>() {
                                    Ok(w) if w > 0 => e.weight = w,
                                    _ => self.skip(l, "weight 0 or not a number: weight 1 used"),
                                }
                                i += 1;
                            }
                            (
                                "inter" | "rise" | "fall" | "maxconn" | "cookie" | "slowstart",
                                Some(v),
                            ) => {
                                if !check_params_taken {
                                    match p {
                                        "inter" => health.interval = duration(v),
                                        "rise" => health.rise = v.parse().ok(),
                                        "fall" => health.fall = v.parse().ok(),
                                        _ => {}
                                    }
                                }
                                if matches!(p, "maxconn" | "cookie" | "slowstart") {
                                    self.skip(
                                        l,
                                        &format!("server parameter {p:?} is not translated"),
                                    );
                                }
                                i += 1;
                            }
                            _ => self.skip(l, &format!("server parameter {p:?} is not translated")),
                        }
                        i += 1;
                    }
                    if check {
                        any_check = true;
                        check_params_taken = true;
                    }
                    if disabled {
                        self.skip(l, "disabled server: left out");
                        continue;
                    }
                    c.endpoints.push(e);
                }
                // Read through `lookup` above or below.
                "balance" | "hash-type" | "mode" | "default-server" | "timeout" | "retries"
                | "option" | "http-check" => {}
                _ if s.kind == "listen" => {}
                _ => self.skip(l, "no lbd equivalent translated"),
            }
        }
        if any_check {
            // HAProxy's check timeout defaults to `inter`; lbd wants it below the interval.
            let inter_ms = health.interval.as_deref().and_then(millis).unwrap_or(2000);
            health.timeout = Some(format!("{}ms", (inter_ms / 2).clamp(1, 2000)));
            if let Some(h) = lookup(s, all, "option", Some("httpchk")) {
                health.tcp = false;
                // `option httpchk [<method>] <uri> [<version>]` or `option httpchk <uri>`.
                health.path = match (h.arg(2), h.arg(3)) {
                    (Some(uri), None) if uri.starts_with('/') => Some(uri.into()),
                    (Some(_), Some(uri)) => Some(uri.into()),
                    _ => Some("/".into()),
                };
                if let Some(send) = lookup(s, all, "http-check", Some("send"))
                    && let Some(i) = send.words.iter().position(|w| w == "uri")
                {
                    health.path = send.arg(i + 1).map(str::to_string);
                }
                health.expected_status = Some("200-399".into());
                if let Some(exp) = lookup(s, all, "http-check", Some("expect")) {
                    match (exp.arg(2), exp.arg(3)) {
                        (Some("status"), Some(code)) if code.parse::<u16>().is_ok() => {
                            health.expected_status = Some(code.into());
                        }
                        _ => {
                            let exp = exp.clone();
                            self.skip(&exp, "only `http-check expect status <code>` is translated");
                        }
                    }
                }
            }
            c.health = Some(health);
        }
        if let Some(t) = lookup(s, all, "timeout", Some("connect")).and_then(|l| l.arg(2)) {
            c.connect_timeout = duration(t);
        }
        if let Some(t) = lookup(s, all, "timeout", Some("server")).and_then(|l| l.arg(2)) {
            c.response_timeout = duration(t);
        }
        if let Some(n) = lookup(s, all, "retries", None).and_then(|l| l.arg(1)) {
            c.retries = n.parse::<u32>().ok().map(|n| n.min(7));
        }
        if !c.endpoints.iter().any(|e| !e.backup) {
            let l = Line {
                words: vec![s.kind.clone(), s.name.clone()],
                line: s.line,
            };
            return self.skip(
                &l,
                "no translatable primary server: rules using it are left out",
            );
        }
        let name = c.name.clone();
        self.plan.clusters.push(c);
        self.backends.insert(s.name.clone(), name);
    }

    fn frontend(&mut self, s: &Section, all: &[Section]) {
        if s.kind == "listen" && !self.backends.contains_key(&s.name) {
            // Already reported by `backend` (stats page, TCP mode, or no server).
            return;
        }
        if Self::mode_is_tcp(s, all) {
            if s.kind == "frontend" {
                let l = Line {
                    words: vec![s.kind.clone(), s.name.clone(), "(mode tcp)".into()],
                    line: s.line,
                };
                self.skip(
                    &l,
                    "TCP mode proxies are not translated (lbd's L4 side is XDP VIPs)",
                );
            }
            return;
        }
        let mut listeners = Vec::new();
        let mut acls: HashMap<String, Option<Cond>> = HashMap::new();
        let mut redirects = Vec::new();
        let mut rules = Vec::new();
        let mut default_backend = if s.kind == "listen" {
            self.backends.get(&s.name).cloned()
        } else {
            None
        };
        for l in &s.lines {
            match l.kw() {
                "bind" => {
                    if l.words.iter().any(|w| w == "ssl") {
                        self.skip(
                            l,
                            "TLS bind: add a [listeners.tls] table with its certificates by hand",
                        );
                        continue;
                    }
                    let Some(bind) = l.arg(1).and_then(bind_address) else {
                        self.skip(l, "only [ip]:port bind addresses are translated");
                        continue;
                    };
                    let name = match self.plan.listeners.iter().find(|x| x.bind == bind) {
                        Some(x) => x.name.clone(),
                        None => {
                            let name = self.plan.unique_name(&s.name);
                            let origin = self.origin(l.line);
                            self.plan.listeners.push(Listener {
                                name: name.clone(),
                                bind,
                                origin,
                            });
                            name
                        }
                    };
                    listeners.push(name);
                }
                "acl" => {
                    let (Some(name), true) = (l.arg(1), l.words.len() > 2) else {
                        self.skip(l, "acl needs a name and a test");
                        continue;
                    };
                    let cond = acl(&l.words[2..]);
                    if cond.is_none() {
                        self.skip(l, "acl test not translated (rules using it are left out)");
                    }
                    acls.insert(name.to_string(), cond);
                }
                "use_backend" => rules.push(l.clone()),
                "default_backend" => {
                    default_backend = l.arg(1).and_then(|b| self.backends.get(b).cloned());
                    if default_backend.is_none() {
                        self.skip(l, "unknown or untranslated backend");
                    }
                }
                "http-request" if l.arg(1) == Some("redirect") => redirects.push(l.clone()),
                "mode" | "timeout" | "option" | "maxconn" => {}
                _ if s.kind == "listen" => {}
                _ => self.skip(l, "no lbd equivalent translated"),
            }
        }
        if listeners.is_empty() {
            let l = Line {
                words: vec![s.kind.clone(), s.name.clone()],
                line: s.line,
            };
            return self.skip(&l, "no translatable bind: its rules are left out");
        }
        let fallback_cluster = default_backend
            .clone()
            .or_else(|| self.plan.clusters.first().map(|c| c.name.clone()));
        for r in &redirects {
            self.redirect(r, &listeners, fallback_cluster.as_deref(), &acls);
        }
        for r in &rules {
            self.use_backend(r, &listeners, &acls);
        }
        if let Some(b) = default_backend {
            let origin = self.origin(s.line);
            let mut r = Route::new(
                self.plan.unique_name(&format!("{}-default", s.name)),
                b,
                origin,
            );
            r.listeners = listeners;
            self.plan.routes.push(r);
        }
    }

    /// `http-request redirect scheme <scheme> [code N] [if cond]`.
    fn redirect(
        &mut self,
        l: &Line,
        listeners: &[String],
        cluster: Option<&str>,
        acls: &HashMap<String, Option<Cond>>,
    ) {
        let w: Vec<&str> = l.words.iter().map(String::as_str).collect();
        let (Some("scheme"), Some(scheme)) = (w.get(2).copied(), w.get(3).copied()) else {
            return self.skip(l, "only `http-request redirect scheme ...` is translated");
        };
        let mut status = 302;
        let mut i = 4;
        let mut cond_at = w.len();
        while i < w.len() {
            match w[i] {
                "code" => {
                    status = w.get(i + 1).and_then(|c| c.parse().ok()).unwrap_or(302);
                    i += 2;
                }
                "if" | "unless" => {
                    cond_at = i;
                    break;
                }
                _ => i += 1,
            }
        }
        // On a cleartext listener `{ ssl_fc }` is false, so these conditions always hold.
        let rest = w[cond_at..].join(" ");
        if matches!(rest.as_str(), "if !{ ssl_fc }" | "unless { ssl_fc }") {
            cond_at = w.len();
        }
        let Some(cluster) = cluster else {
            return self.skip(l, "a local answer needs a backend in the file");
        };
        let origin = self.origin(l.line);
        let mut r = Route::new(String::new(), cluster.to_string(), origin);
        r.listeners = listeners.to_vec();
        r.answer = Some(Answer::ToScheme {
            status,
            scheme: scheme.to_string(),
        });
        self.routes_for(l, cond_at, r, "redirect", acls);
    }

    /// `use_backend NAME [if a b || c]` → one route per conjunction (and per path of it).
    fn use_backend(
        &mut self,
        l: &Line,
        listeners: &[String],
        acls: &HashMap<String, Option<Cond>>,
    ) {
        let Some(backend) = l.arg(1).and_then(|b| self.backends.get(b).cloned()) else {
            return self.skip(l, "unknown or untranslated backend");
        };
        let origin = self.origin(l.line);
        let mut template = Route::new(String::new(), backend.clone(), origin);
        template.listeners = listeners.to_vec();
        self.routes_for(l, 2, template, &format!("to-{backend}"), acls);
    }

    /// Adds the routes for `template` under the condition that starts at word `at` of `l`
    /// (`if ...`, or nothing for "always"); a condition that cannot be expressed skips `l`.
    fn routes_for(
        &mut self,
        l: &Line,
        at: usize,
        template: Route,
        name: &str,
        acls: &HashMap<String, Option<Cond>>,
    ) {
        let words = l.words.get(at..).unwrap_or_default();
        let cond: Vec<&str> = match words.first().map(String::as_str) {
            Some("if") => words[1..].iter().map(String::as_str).collect(),
            None => Vec::new(),
            _ => return self.skip(l, "only `if` conditions are translated"),
        };
        let terms = match self.terms(&cond, acls) {
            Ok(t) => t,
            Err(why) => return self.skip(l, &why),
        };
        for term in terms {
            let Some(routes) = conjunction(template.clone(), &term) else {
                return self.skip(
                    l,
                    "two conditions on the same field in one rule are not translated",
                );
            };
            for mut r in routes {
                r.name = self.plan.unique_name(name);
                self.plan.routes.push(r);
            }
        }
    }

    /// `a b || { test } c` → the conditions of each alternative (an OR of ANDs).
    fn terms(
        &self,
        cond: &[&str],
        acls: &HashMap<String, Option<Cond>>,
    ) -> Result<Vec<Vec<Cond>>, String> {
        let mut terms: Vec<Vec<Cond>> = vec![Vec::new()];
        let mut i = 0;
        while i < cond.len() {
            let w = cond[i];
            let c = match w {
                "||" | "or" => {
                    terms.push(Vec::new());
                    i += 1;
                    continue;
                }
                // An anonymous acl `{ test args }`.
                "{" => {
                    let end = cond[i..]
                        .iter()
                        .position(|x| *x == "}")
                        .map(|p| p + i)
                        .ok_or("unclosed anonymous acl")?;
                    let words: Vec<String> =
                        cond[i + 1..end].iter().map(|s| s.to_string()).collect();
                    i = end;
                    acl(&words).ok_or("anonymous acl test not translated")?
                }
                _ if w.starts_with('!') => return Err("negated acls are not translated".into()),
                name => match acls.get(name) {
                    Some(Some(c)) => c.clone(),
                    Some(None) => return Err("uses an acl that was not translated".into()),
                    None => return Err(format!("unknown acl {name:?}")),
                },
            };
            if let Some(t) = terms.last_mut() {
                t.push(c);
            }
            i += 1;
        }
        Ok(terms)
    }
}

/// The routes that together match an AND of conditions (several paths → several routes).
fn conjunction(base: Route, conds: &[Cond]) -> Option<Vec<Route>> {
    let mut r = base;
    let mut paths: Option<&Vec<PathMatch>> = None;
    for c in conds {
        match c {
            Cond::Hosts(h) if r.hosts.is_empty() => r.hosts = h.clone(),
            Cond::Methods(m) if r.methods.is_empty() => r.methods = m.clone(),
            Cond::Header(n, v) => r.headers.push((n.clone(), v.clone())),
            Cond::Paths(p) if paths.is_none() => paths = Some(p),
            _ => return None,
        }
    }
    Some(match paths {
        None => vec![r],
        Some(ps) => ps
            .iter()
            .map(|p| {
                let mut x = r.clone();
                x.path = Some(p.clone());
                x
            })
            .collect(),
    })
}

/// One ACL's test and values → a condition lbd can route on.
fn acl(words: &[String]) -> Option<Cond> {
    let fetch = words.first()?.as_str();
    let mut method = None;
    let mut values = Vec::new();
    let mut i = 1;
    while i < words.len() {
        match words[i].as_str() {
            "-i" => {}
            "-m" => {
                method = words.get(i + 1).map(String::as_str);
                i += 1;
            }
            "--" => {}
            v => values.push(v.to_string()),
        }
        i += 1;
    }
    let header = fetch
        .strip_prefix("req.hdr(")
        .or_else(|| fetch.strip_prefix("hdr("))
        .and_then(|h| h.strip_suffix(')'))
        .map(str::to_ascii_lowercase);
    match (fetch, header.as_deref(), method) {
        (_, Some("host"), None | Some("str")) if !values.is_empty() => Some(Cond::Hosts(
            values.iter().map(|v| v.to_ascii_lowercase()).collect(),
        )),
        ("hdr_end(host)" | "req.hdr_end(host)", _, _) | (_, Some("host"), Some("end"))
            if values.iter().all(|v| v.starts_with('.')) && !values.is_empty() =>
        {
            Some(Cond::Hosts(
                values
                    .iter()
                    .map(|v| format!("*{}", v.to_ascii_lowercase()))
                    .collect(),
            ))
        }
        (_, Some(h), Some("found")) => Some(Cond::Header(h.to_string(), None)),
        (_, Some(h), None | Some("str")) if values.len() == 1 => {
            Some(Cond::Header(h.to_string(), values.first().cloned()))
        }
        ("path_beg", _, _) | ("path", _, Some("beg")) if !values.is_empty() => Some(Cond::Paths(
            values.into_iter().map(PathMatch::Prefix).collect(),
        )),
        ("path", _, None | Some("str")) if !values.is_empty() => Some(Cond::Paths(
            values.into_iter().map(PathMatch::Exact).collect(),
        )),
        ("path_reg", _, _) | ("path", _, Some("reg")) if !values.is_empty() => Some(Cond::Paths(
            values.into_iter().map(PathMatch::Regex).collect(),
        )),
        ("path_end", _, _) if !values.is_empty() => Some(Cond::Paths(
            values
                .iter()
                .map(|v| PathMatch::Regex(format!("{}$", regex::escape(v))))
                .collect(),
        )),
        ("method", _, _) if !values.is_empty() => Some(Cond::Methods(
            values.iter().map(|v| v.to_ascii_uppercase()).collect(),
        )),
        _ => None,
    }
}

/// HAProxy time: a bare number is milliseconds; units us, ms, s, m, h, d.
fn duration(v: &str) -> Option<String> {
    let digits = v.bytes().take_while(u8::is_ascii_digit).count();
    let (n, unit) = v.split_at(digits);
    let n: u64 = n.parse().ok()?;
    match unit {
        "" | "ms" => Some(format!("{n}ms")),
        "s" | "m" | "h" => Some(format!("{n}{unit}")),
        "d" => Some(format!("{}h", n * 24)),
        "us" => Some(format!("{}ms", n.div_ceil(1000).max(1))),
        _ => None,
    }
}

/// Milliseconds of a duration this module wrote (`250ms`, `2s`, `1m`, `1h`).
fn millis(d: &str) -> Option<u64> {
    let digits = d.bytes().take_while(u8::is_ascii_digit).count();
    let (n, unit) = d.split_at(digits);
    let n: u64 = n.parse().ok()?;
    let scale = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    Some(n * scale)
}

/// `bind` address → lbd `bind`.
fn bind_address(spec: &str) -> Option<String> {
    let spec = spec.strip_prefix("ipv4@").unwrap_or(spec);
    if let Some(port) = spec.strip_prefix(':').or_else(|| spec.strip_prefix("*:")) {
        return port.parse::<u16>().ok().map(|p| format!("0.0.0.0:{p}"));
    }
    if let Some(port) = spec.strip_prefix("ipv6@:") {
        return port.parse::<u16>().ok().map(|p| format!("[::]:{p}"));
    }
    let spec = spec.strip_prefix("ipv6@").unwrap_or(spec);
    endpoint_address(spec, 80)
}

const SECTIONS: &[&str] = &[
    "global",
    "defaults",
    "frontend",
    "backend",
    "listen",
    "userlist",
    "peers",
    "resolvers",
    "cache",
    "mailers",
    "program",
    "http-errors",
    "ring",
];

fn parse(text: &str, file: &str) -> Result<Vec<Section>, ImportError> {
    let mut out: Vec<Section> = Vec::new();
    let mut last_defaults = None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let words = split_words(raw).map_err(|e| ImportError::syntax(file, n, e))?;
        let Some(first) = words.first() else { continue };
        if SECTIONS.contains(&first.as_str()) {
            if first == "defaults" {
                last_defaults = Some(out.len());
            }
            out.push(Section {
                kind: first.clone(),
                name: words.get(1).cloned().unwrap_or_default(),
                line: n,
                lines: Vec::new(),
                defaults: if first == "defaults" {
                    None
                } else {
                    last_defaults
                },
            });
            continue;
        }
        match out.last_mut() {
            Some(s) => s.lines.push(Line { words, line: n }),
            None => {
                return Err(ImportError::syntax(
                    file,
                    n,
                    &format!("{first:?} outside any section"),
                ));
            }
        }
    }
    Ok(out)
}

/// HAProxy's word splitting: whitespace, `#` comments, quotes and backslash escapes.
fn split_words(line: &str) -> Result<Vec<String>, &'static str> {
    let mut out = Vec::new();
    let mut w = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') | (None, '\\') => {
                if let Some(n) = chars.next() {
                    w.push(n);
                    in_word = true;
                }
            }
            (Some(_), c) => w.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '#') => break,
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut w));
                    in_word = false;
                }
            }
            (None, c) => {
                w.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err("unterminated quote");
    }
    if in_word {
        out.push(w);
    }
    Ok(out)
}
