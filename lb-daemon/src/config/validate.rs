//! Raw structs → [`Model`]: defaults, ranges, references, regexes. Every problem is recorded
//! and checking goes on, so one run reports them all; the model is only used when there were
//! none.
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use http::{HeaderValue, Method};
use toml::Spanned;

use super::check::Checker;
use super::error::Diagnostics;
use super::model::*;
use super::raw::*;

/// Methods accepted in `routes.match.methods`; extension methods are almost always typos.
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// More data-plane workers than this is a typo, not a machine.
const MAX_WORKERS: usize = 1024;

/// Checks `raw` and builds the model. Problems go to `d`; the returned model is meaningful only
/// if none were recorded.
pub(crate) fn validate(raw: RawConfig, text: &str, path: &Path, d: &mut Diagnostics) -> Model {
    let mut v = Checker { d };
    let mut global = v.global(raw.global.as_ref());
    global.admin = raw.admin.as_ref().map(|a| v.admin(a));
    global.tracing = raw.tracing.as_ref().map(|t| v.tracing(t));
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let listeners = v.listeners(&raw.listeners, dir);
    if let (Some(admin), Some(raw_admin)) = (&global.admin, &raw.admin)
        && admin.bind.port() != 0
        && let Some(l) = listeners.iter().position(|l| l.bind == admin.bind)
    {
        let at = raw_admin
            .get_ref()
            .bind
            .as_ref()
            .map_or(raw_admin.span(), |b| b.span());
        v.err(
            at,
            "admin.bind",
            format!(
                "{} is also the bind of listener {:?}",
                admin.bind, listeners[l].name
            ),
        );
    }
    let clusters = v.clusters(&raw.clusters, dir);

    let listener_names = Names::new(
        raw.listeners
            .iter()
            .map(|(_, l)| l.get_ref().name.get_ref()),
    );
    let cluster_names = Names::new(raw.clusters.iter().map(|(_, c)| c.get_ref().name.get_ref()));
    let refs = Refs {
        listeners: &listener_names,
        listeners_complete: !raw.listeners_incomplete,
        clusters: &cluster_names,
        clusters_complete: !raw.clusters_incomplete,
    };
    // A TCP or passthrough listener's clusters must exist, and speak cleartext (bytes are
    // relayed as they are).
    for ((i, l), model) in raw.listeners.iter().zip(&listeners) {
        let raw_l = l.get_ref();
        let mut wanted: Vec<(String, std::ops::Range<usize>, String)> = Vec::new();
        if let (Some(name), Some(at)) = (&model.tcp_cluster, &raw_l.cluster) {
            wanted.push((name.clone(), at.span(), format!("listeners[{i}].cluster")));
        }
        if let Some(p) = &model.passthrough {
            if let (Some(name), Some(at)) = (&p.default, &raw_l.cluster) {
                wanted.push((name.clone(), at.span(), format!("listeners[{i}].cluster")));
            }
            for (pattern, cluster) in raw_l.sni.iter().flat_map(|t| t.get_ref()) {
                wanted.push((
                    cluster.get_ref().clone(),
                    cluster.span(),
                    format!("listeners[{i}].sni.{pattern:?}"),
                ));
            }
        }
        for (name, at, key) in wanted {
            match cluster_names.get(&name) {
                None if !raw.clusters_incomplete => {
                    v.err(at, &key, format!("unknown cluster {name:?}"));
                }
                Some(c) if clusters.get(c).is_some_and(|c| c.tls.is_some()) => {
                    v.err(
                        at,
                        &key,
                        "a TCP or passthrough listener relays bytes as they are; its cluster \
                         cannot have [clusters.tls]",
                    );
                }
                _ => {}
            }
        }
    }
    let routes = v.routes(&raw.routes, &refs, dir);
    let vips = v.vips(&raw.vips, &refs, &clusters);

    let something_unreadable =
        raw.listeners_incomplete || raw.vips_incomplete || raw.clusters_incomplete;
    if listeners.is_empty() && vips.is_empty() && !something_unreadable {
        v.d.push(
            0..0,
            "",
            "nothing to serve: define at least one [[listeners]] or [[l4.vips]]".into(),
        );
    }

    Model {
        source: Source {
            path: path.to_path_buf(),
            hash: fnv1a_hex(text.as_bytes()),
        },
        global,
        listeners,
        routes,
        clusters,
        vips,
    }
}

/// FNV-1a 64 of `bytes` as 16 lowercase hex digits: stable across builds and platforms, so two
/// nodes (or a reload) can tell whether they run the same file.
pub(crate) fn fnv1a_hex(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Name → index, for resolving references.
struct Names(HashMap<String, usize>);

impl Names {
    fn new<'a>(names: impl Iterator<Item = &'a String>) -> Self {
        let mut map = HashMap::new();
        for (i, n) in names.enumerate() {
            // The first definition wins; duplicates are reported where they are declared.
            map.entry(n.clone()).or_insert(i);
        }
        Names(map)
    }

    fn get(&self, name: &str) -> Option<usize> {
        self.0.get(name).copied()
    }
}

/// What routes and VIPs may refer to.
struct Refs<'a> {
    listeners: &'a Names,
    /// False when some listener could not be read: an unknown name may be in it.
    listeners_complete: bool,
    clusters: &'a Names,
    /// False when some cluster could not be read.
    clusters_complete: bool,
}

impl Checker<'_> {
    fn global(&mut self, g: Option<&S<RawGlobal>>) -> Global {
        let g = g.map(|g| g.get_ref());
        let log_format = self.choice(
            g.and_then(|g| g.log_format.as_ref()),
            "global.log_format",
            LogFormat::Text,
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
        );
        let log_level = match g.and_then(|g| g.log_level.as_ref()) {
            None => "info".to_string(),
            Some(l) => {
                if let Err(e) = tracing_subscriber::EnvFilter::try_new(l.get_ref()) {
                    self.err(
                        l.span(),
                        "global.log_level",
                        format!("invalid log filter {:?}: {e}", l.get_ref()),
                    );
                } else if l.get_ref().trim().is_empty() {
                    self.err(l.span(), "global.log_level", "must not be empty");
                }
                l.get_ref().clone()
            }
        };
        Global {
            log_format,
            log_level,
            access_log: g
                .and_then(|g| g.access_log.as_ref())
                .is_none_or(|b| *b.get_ref()),
            drain_timeout: self.duration(
                g.and_then(|g| g.drain_timeout.as_ref()),
                "global.drain_timeout",
                Duration::from_secs(30),
            ),
            admin: None,
            tracing: None,
            workers: g.and_then(|g| g.workers.as_ref()).map(|w| {
                let n = self.int(Some(w), "global.workers", 1, 1, MAX_WORKERS as i64);
                usize::try_from(n).unwrap_or(1)
            }),
        }
    }

    fn admin(&mut self, a: &S<RawAdmin>) -> Admin {
        let a = a.get_ref();
        let default = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9901);
        let bind = match &a.bind {
            Some(b) => self.addr(b, "admin.bind", true).unwrap_or(default),
            None => default,
        };
        let token = a.token.as_ref().map(|t| {
            if t.get_ref().is_empty() {
                self.err(
                    t.span(),
                    "admin.token",
                    "empty token; remove the key to run the admin API without one",
                );
            } else if HeaderValue::from_str(t.get_ref()).is_err() {
                self.err(
                    t.span(),
                    "admin.token",
                    "must be visible ASCII (it is sent in an HTTP header)",
                );
            }
            t.get_ref().clone()
        });
        let allow_insecure_non_loopback = a
            .allow_insecure_non_loopback
            .as_ref()
            .is_some_and(|b| *b.get_ref());
        // Refused here rather than at bind time so `lbd check` reports it too, with a line.
        if !bind.ip().is_loopback() && token.is_none() && !allow_insecure_non_loopback {
            let at = a.bind.as_ref().map(|b| b.span());
            if let Some(at) = at {
                self.err(
                    at,
                    "admin.bind",
                    format!(
                        "{bind} is not a loopback address and admin.token is not set: anyone who \
                         can reach it could drain endpoints and reload config; set admin.token, \
                         bind to 127.0.0.1, or set admin.allow_insecure_non_loopback = true"
                    ),
                );
            }
        }
        Admin {
            bind,
            token,
            allow_insecure_non_loopback,
        }
    }

    fn listeners(&mut self, raw: &[(usize, S<RawListener>)], dir: &Path) -> Vec<Listener> {
        let mut names = HashMap::new();
        let mut binds: HashMap<SocketAddr, usize> = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, l) in raw {
            let l = l.get_ref();
            let key = format!("listeners[{i}]");
            self.name(&l.name, &format!("{key}.name"));
            self.unique(&mut names, &l.name, &format!("{key}.name"), "listener");
            let bind = self.addr(&l.bind, &format!("{key}.bind"), true);
            if let Some(b) = bind.filter(|b| b.port() != 0) {
                if let Some(first) = binds.get(&b) {
                    let (line, _) = self.d.line_col(*first);
                    self.err(
                        l.bind.span(),
                        &format!("{key}.bind"),
                        format!("duplicate listener bind {b} (first used on line {line})"),
                    );
                } else {
                    binds.insert(b, l.bind.span().start);
                }
            }
            let protocol = self.choice(
                l.protocol.as_ref(),
                &format!("{key}.protocol"),
                ListenerProtocol::Http,
                &[
                    ("http", ListenerProtocol::Http),
                    ("h2c", ListenerProtocol::H2c),
                ],
            );
            let limits = self.limits(l.limits.as_ref().map(|x| x.get_ref()), &key);
            let tls = l.tls.as_ref().and_then(|t| {
                if let (ListenerProtocol::H2c, Some(p)) = (protocol, &l.protocol) {
                    self.err(
                        p.span(),
                        &format!("{key}.protocol"),
                        "h2c is cleartext HTTP/2; on a TLS listener HTTP/2 is chosen by ALPN \
                         (listeners.tls.alpn)",
                    );
                }
                super::tls::check(self, t, &format!("{key}.tls"), dir)
            });
            let cert_headers = l.client_cert_headers.as_ref().and_then(|h| {
                super::tls::check_cert_headers(self, h, &format!("{key}.client_cert_headers"))
            });
            let redirect_https = match &l.redirect_https {
                Some(b) if *b.get_ref() && l.tls.is_some() => {
                    self.err(
                        b.span(),
                        &format!("{key}.redirect_https"),
                        "a TLS listener is already HTTPS; redirect_https is for cleartext listeners",
                    );
                    false
                }
                Some(b) => *b.get_ref(),
                None => false,
            };
            let (tcp_cluster, passthrough) = self.tcp_mode(l, &key);
            let proxy_accept = super::passthrough::check_accept(self, l, &key);
            let proxy_protocol = l.proxy_protocol.as_ref().and_then(|p| {
                let v = self.choice(
                    Some(p),
                    &format!("{key}.proxy_protocol"),
                    None,
                    &[
                        ("v1", Some(super::model::ProxyProtocol::V1)),
                        ("v2", Some(super::model::ProxyProtocol::V2)),
                    ],
                );
                if tcp_cluster.is_none() && passthrough.is_none() {
                    self.err(
                        p.span(),
                        &format!("{key}.proxy_protocol"),
                        "only sent by TCP listeners and passthrough listeners (mode = \"tcp\" or \
                         \"tls_passthrough\")",
                    );
                }
                v
            });
            out.push(Listener {
                cert_headers,
                redirect_https,
                tcp_cluster,
                proxy_protocol,
                passthrough,
                proxy_accept,
                name: l.name.get_ref().clone(),
                bind: bind.unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)),
                protocol,
                limits,
                tls,
            });
        }
        out
    }

    /// `mode` and its `cluster` (and, for passthrough, its SNI table); HTTP-only keys are
    /// errors on a TCP or passthrough listener.
    fn tcp_mode(
        &mut self,
        l: &RawListener,
        key: &str,
    ) -> (Option<String>, Option<super::passthrough::Passthrough>) {
        #[derive(Clone, Copy, PartialEq)]
        enum Mode {
            Http,
            Tcp,
            Passthrough,
        }
        let mode = self.choice(
            l.mode.as_ref(),
            &format!("{key}.mode"),
            Mode::Http,
            &[
                ("http", Mode::Http),
                ("tcp", Mode::Tcp),
                ("tls_passthrough", Mode::Passthrough),
            ],
        );
        if mode != Mode::Passthrough {
            super::passthrough::refuse_elsewhere(self, l, key);
        }
        if mode == Mode::Http {
            if let Some(c) = &l.cluster {
                self.err(
                    c.span(),
                    &format!("{key}.cluster"),
                    "only used with mode = \"tcp\" or \"tls_passthrough\" (HTTP listeners reach \
                     clusters through routes)",
                );
            }
            return (None, None);
        }
        let name = if mode == Mode::Tcp {
            "a TCP listener (mode = \"tcp\")"
        } else {
            "a passthrough listener (mode = \"tls_passthrough\")"
        };
        let only_http = [
            ("tls", l.tls.as_ref().map(|t| t.span())),
            ("protocol", l.protocol.as_ref().map(|t| t.span())),
            (
                "redirect_https",
                l.redirect_https.as_ref().map(|t| t.span()),
            ),
            (
                "client_cert_headers",
                l.client_cert_headers.as_ref().map(|t| t.span()),
            ),
        ];
        for (field, span) in only_http {
            if let Some(s) = span {
                self.err(s, &format!("{key}.{field}"), format!("not used by {name}"));
            }
        }
        if mode == Mode::Passthrough {
            return (None, Some(super::passthrough::check(self, l, key)));
        }
        match &l.cluster {
            Some(c) => (Some(c.get_ref().clone()), None),
            None => {
                let at = l.mode.as_ref().map_or(0..0, |m| m.span());
                self.err(
                    at,
                    &format!("{key}.cluster"),
                    "a TCP listener needs the cluster its connections go to",
                );
                (None, None)
            }
        }
    }

    fn limits(&mut self, l: Option<&RawLimits>, listener: &str) -> Limits {
        let k = |f: &str| format!("{listener}.limits.{f}");
        let d = Limits::default();
        Limits {
            max_connections: self.usize(
                l.and_then(|l| l.max_connections.as_ref()),
                &k("max_connections"),
                d.max_connections,
                1,
            ),
            max_header_bytes: self.usize(
                l.and_then(|l| l.max_header_bytes.as_ref()),
                &k("max_header_bytes"),
                d.max_header_bytes,
                1,
            ),
            max_body_bytes: self.int(
                l.and_then(|l| l.max_body_bytes.as_ref()),
                &k("max_body_bytes"),
                i64::try_from(d.max_body_bytes).unwrap_or(i64::MAX),
                0,
                i64::MAX,
            ) as u64,
            request_timeout: self.positive_duration(
                l.and_then(|l| l.request_timeout.as_ref()),
                &k("request_timeout"),
                d.request_timeout,
            ),
            idle_timeout: self.positive_duration(
                l.and_then(|l| l.idle_timeout.as_ref()),
                &k("idle_timeout"),
                d.idle_timeout,
            ),
            header_read_timeout: self.positive_duration(
                l.and_then(|l| l.header_read_timeout.as_ref()),
                &k("header_read_timeout"),
                d.header_read_timeout,
            ),
        }
    }

    fn clusters(&mut self, raw: &[(usize, S<RawCluster>)], dir: &Path) -> Vec<Cluster> {
        let mut names = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, c) in raw {
            let span = c.span();
            let c = c.get_ref();
            let key = format!("clusters[{i}]");
            self.name(&c.name, &format!("{key}.name"));
            self.unique(&mut names, &c.name, &format!("{key}.name"), "cluster");
            let policy = self.policy(c, &key);
            let protocol = self.choice(
                c.protocol.as_ref(),
                &format!("{key}.protocol"),
                UpstreamProtocol::Http1,
                &[
                    ("http1", UpstreamProtocol::Http1),
                    ("http2", UpstreamProtocol::Http2),
                    ("grpc", UpstreamProtocol::Grpc),
                ],
            );
            let (endpoints, mut sources) =
                self.endpoints(c.endpoints.as_deref().unwrap_or(&[]), &key, dir);
            let discovery =
                super::discovery::settings(self, c.discovery.as_ref(), &key, !sources.is_empty());
            // A cluster fed by DNS or a file may start with no endpoint at all (Envoy's
            // STRICT_DNS does too): its requests get 503 until a resolution succeeds.
            let all_read =
                endpoints.len() + sources.len() == c.endpoints.as_ref().map_or(0, Vec::len);
            if all_read && sources.is_empty() && !endpoints.iter().any(|e| !e.backup) {
                let at = c
                    .endpoints
                    .as_ref()
                    .and_then(|e| e.first())
                    .map_or(span, |e| e.span());
                self.err(
                    at,
                    &format!("{key}.endpoints"),
                    format!(
                        "cluster {:?} has no primary endpoint: add an [[clusters.endpoints]] \
                         without backup = true",
                        c.name.get_ref()
                    ),
                );
            }
            let health_check = c.health_check.as_ref().map(|h| self.health_check(h, &key));
            let passive = self.passive(c.passive.as_ref().map(|p| p.get_ref()), &key);
            let t = c.timeouts.as_ref().map(|t| t.get_ref());
            let tk = |f: &str| format!("{key}.timeouts.{f}");
            let td = UpstreamTimeouts::default();
            let timeouts = UpstreamTimeouts {
                connect: self.positive_duration(
                    t.and_then(|t| t.connect.as_ref()),
                    &tk("connect"),
                    td.connect,
                ),
                response: self.positive_duration(
                    t.and_then(|t| t.response.as_ref()),
                    &tk("response"),
                    td.response,
                ),
                idle: self.positive_duration(t.and_then(|t| t.idle.as_ref()), &tk("idle"), td.idle),
            };
            let p = c.pool.as_ref().map(|p| p.get_ref());
            let pd = PoolLimits::default();
            let pool = PoolLimits {
                max_connections: self.usize(
                    p.and_then(|p| p.max_connections.as_ref()),
                    &format!("{key}.pool.max_connections"),
                    pd.max_connections,
                    0,
                ),
                max_idle: self.usize(
                    p.and_then(|p| p.max_idle.as_ref()),
                    &format!("{key}.pool.max_idle"),
                    pd.max_idle,
                    0,
                ),
            };
            let retry = self.retry(
                c.retry.as_ref().map(|r| r.get_ref()),
                &format!("{key}.retry"),
                Some(protocol == UpstreamProtocol::Grpc),
            );
            let retry_budget =
                self.retry_budget(c.retry_budget.as_ref().map(|b| b.get_ref()), &key);
            let circuit_breakers =
                self.circuit_breakers(c.circuit_breakers.as_ref().map(|b| b.get_ref()), &key);
            let sticky = c.sticky.as_ref().map(|st| self.sticky(st.get_ref(), &key));
            let outlier = c
                .outlier
                .as_ref()
                .map(|o| super::outlier::check(self, o, &key));
            let tls = c
                .tls
                .as_ref()
                .and_then(|t| super::upstream_tls::check(self, t, &format!("{key}.tls"), dir));
            if let Some(t) = &tls
                && t.server_name.is_none()
            {
                // No name for the whole cluster: a name-derived endpoint proves the name it
                // was resolved from, as a client resolving it itself would ask for.
                for s in &mut sources {
                    if s.tls_name == super::discovery::TlsName::Cluster
                        && !matches!(s.kind, super::discovery::SourceKind::File { .. })
                    {
                        s.tls_name = super::discovery::TlsName::Resolved;
                    }
                }
            }
            if c.tls.is_none() {
                for (j, e) in c.endpoints.iter().flatten().enumerate() {
                    if let Some(n) = &e.get_ref().server_name {
                        self.err(
                            n.span(),
                            &format!("{key}.endpoints[{j}].server_name"),
                            "only used with TLS to the cluster ([clusters.tls])",
                        );
                    }
                }
            }
            out.push(Cluster {
                name: c.name.get_ref().clone(),
                endpoints,
                policy,
                protocol,
                health_check,
                passive,
                timeouts,
                pool,
                retry,
                retry_budget,
                circuit_breakers,
                sticky,
                outlier,
                sources,
                discovery,
                tls,
            });
        }
        out
    }

    fn policy(&mut self, c: &RawCluster, key: &str) -> Policy {
        #[derive(Clone, Copy, PartialEq)]
        enum P {
            Rr,
            Wrr,
            Lr,
            Rand,
            Ip,
            Header,
            Cookie,
            Maglev,
        }
        // gRPC multiplexes many calls of very different cost over few connections: least
        // outstanding requests spreads them better than a blind rotation.
        let default = if c.protocol.as_ref().is_some_and(|p| p.get_ref() == "grpc") {
            P::Lr
        } else {
            P::Rr
        };
        let p = self.choice(
            c.policy.as_ref(),
            &format!("{key}.policy"),
            default,
            &[
                ("round_robin", P::Rr),
                ("weighted_round_robin", P::Wrr),
                ("least_request", P::Lr),
                ("random", P::Rand),
                ("ip_hash", P::Ip),
                ("header_hash", P::Header),
                ("cookie_hash", P::Cookie),
                ("maglev", P::Maglev),
            ],
        );
        // A hash setting next to a policy that ignores it is a misconfiguration, not a no-op.
        let unused = |this: &mut Self, v: &Option<S<String>>, field: &str, needs: &str| {
            if let Some(v) = v {
                this.err(
                    v.span(),
                    &format!("{key}.{field}"),
                    format!("only used with policy = {needs:?}"),
                );
            }
        };
        if p != P::Header {
            unused(self, &c.hash_header, "hash_header", "header_hash");
        }
        if p != P::Cookie {
            unused(self, &c.hash_cookie, "hash_cookie", "cookie_hash");
        }
        if p != P::Maglev {
            unused(self, &c.hash_key, "hash_key", "maglev");
        }
        let policy_span = c.policy.as_ref().map_or(c.name.span(), |p| p.span());
        match p {
            P::Rr => Policy::RoundRobin,
            P::Wrr => Policy::WeightedRoundRobin,
            P::Lr => Policy::LeastRequest,
            P::Rand => Policy::Random,
            P::Ip => Policy::IpHash,
            P::Header => match &c.hash_header {
                Some(h) => self
                    .header_name(h, &format!("{key}.hash_header"))
                    .map_or(Policy::RoundRobin, Policy::HeaderHash),
                None => {
                    self.err(
                        policy_span,
                        &format!("{key}.hash_header"),
                        "policy \"header_hash\" needs hash_header = \"<header name>\"",
                    );
                    Policy::RoundRobin
                }
            },
            P::Cookie => match &c.hash_cookie {
                Some(h) => {
                    self.cookie_name(h, &format!("{key}.hash_cookie"));
                    Policy::CookieHash(h.get_ref().clone())
                }
                None => {
                    self.err(
                        policy_span,
                        &format!("{key}.hash_cookie"),
                        "policy \"cookie_hash\" needs hash_cookie = \"<cookie name>\"",
                    );
                    Policy::RoundRobin
                }
            },
            P::Maglev => {
                let Some(k) = &c.hash_key else {
                    return Policy::Maglev(HashKey::ClientIp);
                };
                let kk = format!("{key}.hash_key");
                let s = k.get_ref();
                if s == "client_ip" {
                    Policy::Maglev(HashKey::ClientIp)
                } else if let Some(h) = s.strip_prefix("header:") {
                    let h = Spanned::new(k.span(), h.to_string());
                    self.header_name(&h, &kk)
                        .map_or(Policy::RoundRobin, |h| Policy::Maglev(HashKey::Header(h)))
                } else if let Some(c) = s.strip_prefix("cookie:") {
                    self.cookie_name(&Spanned::new(k.span(), c.to_string()), &kk);
                    Policy::Maglev(HashKey::Cookie(c.to_string()))
                } else {
                    self.err(
                        k.span(),
                        &kk,
                        format!(
                            "unknown hash key {s:?}; expected \"client_ip\", \"header:<name>\" \
                             or \"cookie:<name>\""
                        ),
                    );
                    Policy::RoundRobin
                }
            }
        }
    }

    fn sticky(&mut self, st: &RawSticky, cluster: &str) -> StickyCookie {
        let k = |f: &str| format!("{cluster}.sticky.{f}");
        let name = match &st.cookie {
            Some(c) => {
                self.cookie_name(c, &k("cookie"));
                c.get_ref().clone()
            }
            None => "lbd_srv".to_owned(),
        };
        StickyCookie {
            name,
            max_age: st
                .max_age
                .as_ref()
                .map(|m| self.positive_duration(Some(m), &k("max_age"), Duration::from_secs(3600))),
            http_only: st.http_only.as_ref().is_none_or(|b| *b.get_ref()),
            secure: st.secure.as_ref().is_some_and(|b| *b.get_ref()),
        }
    }

    /// Cookie names are RFC 6265 tokens.
    fn cookie_name(&mut self, v: &S<String>, key: &str) {
        let ok = !v.get_ref().is_empty()
            && v.get_ref()
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !ok {
            self.err(
                v.span(),
                key,
                format!("invalid cookie name {:?}", v.get_ref()),
            );
        }
    }

    /// Static endpoints, and the dynamic sources to resolve at run time.
    fn endpoints(
        &mut self,
        raw: &[S<RawEndpoint>],
        cluster: &str,
        dir: &Path,
    ) -> (Vec<Endpoint>, Vec<super::discovery::EndpointSource>) {
        use super::discovery::{self as disc, Entry};
        let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
        let mut seen_sources = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        let mut sources = Vec::new();
        for (i, e) in raw.iter().enumerate() {
            let key = format!("{cluster}.endpoints[{i}]");
            let r = e.get_ref();
            let weight = self.u32(r.weight.as_ref(), &format!("{key}.weight"), 1, 1, 1000);
            let backup = r.backup.as_ref().is_some_and(|b| *b.get_ref());
            let address = match disc::entry(self, e, &key, dir, weight, backup) {
                Entry::Static(a) => a,
                Entry::Source(mut s) => {
                    if let Some(n) = r.server_name.as_ref().and_then(|n| {
                        super::upstream_tls::server_name(self, n, &format!("{key}.server_name"))
                    }) {
                        s.tls_name = disc::TlsName::Given(n);
                    }
                    let at = [&r.dns, &r.srv, &r.file]
                        .into_iter()
                        .flatten()
                        .next()
                        .map_or(e.span(), |v| v.span());
                    if disc::unique(self, &mut seen_sources, &s, at, &key) {
                        sources.push(s);
                    }
                    continue;
                }
                Entry::Invalid => continue,
            };
            let span = r.address.as_ref().map_or(e.span(), |a| a.span());
            if let Some(first) = seen.get(&address) {
                let (line, _) = self.d.line_col(*first);
                self.err(
                    span,
                    &format!("{key}.address"),
                    format!("duplicate endpoint {address} in cluster (first on line {line})"),
                );
                continue;
            }
            seen.insert(address, span.start);
            let server_name = r.server_name.as_ref().and_then(|n| {
                super::upstream_tls::server_name(self, n, &format!("{key}.server_name"))
            });
            out.push(Endpoint {
                address,
                weight,
                backup,
                origin: disc::Origin::Static,
                server_name,
            });
        }
        (out, sources)
    }

    fn health_check(&mut self, h: &S<RawHealthCheck>, cluster: &str) -> HealthCheck {
        let h = h.get_ref();
        let k = |f: &str| format!("{cluster}.health_check.{f}");
        #[derive(Clone, Copy, PartialEq)]
        enum K {
            Tcp,
            Http,
            Grpc,
        }
        let kind = self.choice(
            h.kind.as_ref(),
            &k("kind"),
            K::Http,
            &[("tcp", K::Tcp), ("http", K::Http), ("grpc", K::Grpc)],
        );
        if kind != K::Http {
            for (v, f) in [(&h.path, "path"), (&h.host, "host")] {
                if let Some(v) = v {
                    self.err(v.span(), &k(f), "only used with kind = \"http\"");
                }
            }
            if let Some(v) = &h.expected_status {
                self.err(
                    v.span(),
                    &k("expected_status"),
                    "only used with kind = \"http\"",
                );
            }
        }
        if kind != K::Grpc
            && let Some(v) = &h.service
        {
            self.err(v.span(), &k("service"), "only used with kind = \"grpc\"");
        }
        let kind = if kind == K::Tcp {
            HealthCheckKind::Tcp
        } else if kind == K::Grpc {
            let service = h.service.as_ref().map_or_else(String::new, |s| {
                // Sent as a protobuf string: any UTF-8 is valid, but a service name never has
                // whitespace or control characters; such a value is a typo.
                let v = s.get_ref();
                if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    self.err(
                        s.span(),
                        &k("service"),
                        format!("invalid gRPC service name {v:?}"),
                    );
                }
                v.clone()
            });
            HealthCheckKind::Grpc { service }
        } else {
            let path = h
                .path
                .as_ref()
                .map_or_else(|| "/".to_string(), |p| self.path(p, &k("path")));
            let host = h.host.as_ref().map(|v| {
                if v.get_ref().is_empty() || HeaderValue::from_str(v.get_ref()).is_err() {
                    self.err(
                        v.span(),
                        &k("host"),
                        format!("invalid host {:?}", v.get_ref()),
                    );
                }
                v.get_ref().clone()
            });
            let expected = match &h.expected_status {
                None => (200, 399),
                Some(s) => match status_range(s.get_ref()) {
                    Ok(r) => r,
                    Err(e) => {
                        self.err(s.span(), &k("expected_status"), e);
                        (200, 399)
                    }
                },
            };
            HealthCheckKind::Http {
                path,
                host,
                expected,
            }
        };
        let interval =
            self.positive_duration(h.interval.as_ref(), &k("interval"), Duration::from_secs(5));
        let timeout =
            self.positive_duration(h.timeout.as_ref(), &k("timeout"), Duration::from_secs(2));
        if timeout >= interval {
            // Point at whichever of the two was written; the timeout if both.
            let at = h.timeout.as_ref().or(h.interval.as_ref());
            if let Some(at) = at {
                let key = if h.timeout.is_some() {
                    k("timeout")
                } else {
                    k("interval")
                };
                self.err(
                    at.span(),
                    &key,
                    format!(
                        "health check timeout ({timeout:?}) must be less than interval \
                         ({interval:?})"
                    ),
                );
            }
        }
        HealthCheck {
            kind,
            interval,
            timeout,
            healthy_threshold: self.u32(
                h.healthy_threshold.as_ref(),
                &k("healthy_threshold"),
                2,
                1,
                u32::MAX,
            ),
            unhealthy_threshold: self.u32(
                h.unhealthy_threshold.as_ref(),
                &k("unhealthy_threshold"),
                3,
                1,
                u32::MAX,
            ),
            jitter: self.duration(h.jitter.as_ref(), &k("jitter"), Duration::ZERO),
        }
    }

    fn passive(&mut self, p: Option<&RawPassive>, cluster: &str) -> Passive {
        let d = Passive::default();
        let max_fails = self.u32(
            p.and_then(|p| p.max_fails.as_ref()),
            &format!("{cluster}.passive.max_fails"),
            d.max_fails,
            0,
            u32::MAX,
        );
        let ft = p.and_then(|p| p.fail_timeout.as_ref());
        let key = format!("{cluster}.passive.fail_timeout");
        let fail_timeout = if max_fails == 0 {
            // Disabled: the window is unused, so zero is as good as any.
            self.duration(ft, &key, d.fail_timeout)
        } else {
            self.positive_duration(ft, &key, d.fail_timeout)
        };
        Passive {
            max_fails,
            fail_timeout,
        }
    }

    fn routes(&mut self, raw: &[(usize, S<RawRoute>)], refs: &Refs<'_>, dir: &Path) -> Vec<Route> {
        let mut names = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, r) in raw {
            let span = r.span();
            let r = r.get_ref();
            let key = format!("routes[{i}]");
            self.name(&r.name, &format!("{key}.name"));
            self.unique(&mut names, &r.name, &format!("{key}.name"), "route");
            let (cluster, split) = self.route_target(r, span, refs, &key);
            let mut listeners = Vec::new();
            if let Some(ls) = &r.listeners {
                if ls.get_ref().is_empty() {
                    self.err(
                        ls.span(),
                        &format!("{key}.listeners"),
                        "empty list; omit the key to apply the route to every listener",
                    );
                }
                for (j, l) in ls.get_ref().iter().enumerate() {
                    match refs.listeners.get(l.get_ref()) {
                        Some(idx) if !listeners.contains(&idx) => listeners.push(idx),
                        Some(_) => {}
                        None if refs.listeners_complete => self.err(
                            l.span(),
                            &format!("{key}.listeners[{j}]"),
                            format!("unknown listener {:?}", l.get_ref()),
                        ),
                        None => {}
                    }
                }
            }
            let priority = self.int(
                r.priority.as_ref(),
                &format!("{key}.priority"),
                0,
                i32::MIN.into(),
                i32::MAX.into(),
            ) as i32;
            let timeout = r.timeout.as_ref().map(|t| {
                self.positive_duration(Some(t), &format!("{key}.timeout"), Duration::from_secs(60))
            });
            let retry = r
                .retry
                .as_ref()
                .map(|rt| self.retry(Some(rt.get_ref()), &format!("{key}.retry"), None));
            let matcher = match &r.matcher {
                Some(m) => self.matcher(m.get_ref(), &key),
                None => RouteMatch::default(),
            };
            let rewrite = r
                .rewrite
                .as_ref()
                .and_then(|rw| self.rewrite(rw, &matcher, &key));
            let cluster_of = |name: &str| match refs.clusters.get(name) {
                Some(i) => Ok(Some(i)),
                None if refs.clusters_complete => Ok(None),
                None => Err(()),
            };
            let filter_refs = super::filter::Refs {
                dir,
                cluster: &cluster_of,
            };
            let filters = super::filter::check_all(
                self,
                r.filters.as_deref().unwrap_or_default(),
                &key,
                &matcher,
                &filter_refs,
            );
            out.push(Route {
                name: r.name.get_ref().clone(),
                listeners,
                priority,
                matcher,
                cluster,
                split,
                rewrite,
                timeout,
                retry,
                filters,
            });
        }
        // Stable: equal priorities keep the order they were declared in.
        out.sort_by_key(|r| std::cmp::Reverse(r.priority));
        out
    }

    /// `cluster`, or `split` with its `split_sticky`: the route's cluster index (a split's
    /// first side) and the split.
    fn route_target(
        &mut self,
        r: &RawRoute,
        span: Range<usize>,
        refs: &Refs<'_>,
        key: &str,
    ) -> (usize, Option<Split>) {
        let resolve =
            |this: &mut Self, name: &S<String>, k: &str| match refs.clusters.get(name.get_ref()) {
                Some(c) => Some(c),
                None => {
                    if refs.clusters_complete {
                        this.err(
                            name.span(),
                            k,
                            format!("unknown cluster {:?}", name.get_ref()),
                        );
                    }
                    None
                }
            };
        let sticky_key = format!("{key}.split_sticky");
        let Some(split) = &r.split else {
            if let Some(s) = &r.split_sticky {
                self.err(s.span(), &sticky_key, "only used with `split`");
            }
            return match &r.cluster {
                Some(c) => (
                    resolve(self, c, &format!("{key}.cluster")).unwrap_or(0),
                    None,
                ),
                None => {
                    self.err(
                        span,
                        &format!("{key}.cluster"),
                        "missing: set `cluster`, or `split` to divide the route's requests \
                         between clusters",
                    );
                    (0, None)
                }
            };
        };
        let split_key = format!("{key}.split");
        if r.cluster.is_some() {
            self.err(
                split.span(),
                &split_key,
                "`cluster` and `split` exclude each other: name the clusters in `split` only",
            );
        }
        if split.get_ref().is_empty() {
            self.err(split.span(), &split_key, "empty: name at least one cluster");
        }
        let mut sides: Vec<SplitSide> = Vec::with_capacity(split.get_ref().len());
        for (j, side) in split.get_ref().iter().enumerate() {
            let side = side.get_ref();
            let k = format!("{split_key}[{j}]");
            let weight = self.u32(Some(&side.weight), &format!("{k}.weight"), 1, 0, 10_000);
            let Some(cluster) = resolve(self, &side.cluster, &format!("{k}.cluster")) else {
                continue;
            };
            if sides.iter().any(|s| s.cluster == cluster) {
                self.err(
                    side.cluster.span(),
                    &format!("{k}.cluster"),
                    format!(
                        "cluster {:?} is already a side of this split",
                        side.cluster.get_ref()
                    ),
                );
                continue;
            }
            sides.push(SplitSide { cluster, weight });
        }
        let all_zero = split
            .get_ref()
            .iter()
            .all(|s| *s.get_ref().weight.get_ref() == 0);
        if !split.get_ref().is_empty() && all_zero {
            self.err(
                split.span(),
                &split_key,
                "every weight is 0: at least one side must take traffic",
            );
        }
        let sticky = match &r.split_sticky {
            None => SplitSticky::None,
            Some(s) => match s.get_ref().as_str() {
                "cookie" => SplitSticky::Cookie,
                "client_ip" => SplitSticky::ClientIp,
                v => match v.strip_prefix("header:") {
                    Some(name) => {
                        let name = Spanned::new(s.span(), name.to_owned());
                        self.header_name(&name, &sticky_key)
                            .map_or(SplitSticky::None, SplitSticky::Header)
                    }
                    None => {
                        self.err(
                            s.span(),
                            &sticky_key,
                            format!(
                                "unknown value {v:?}; expected \"cookie\", \"client_ip\" or \
                                 \"header:<name>\""
                            ),
                        );
                        SplitSticky::None
                    }
                },
            },
        };
        let cluster = sides.first().map_or(0, |s| s.cluster);
        (cluster, Some(Split { sides, sticky }))
    }

    fn matcher(&mut self, m: &RawMatch, route: &str) -> RouteMatch {
        let k = |f: &str| format!("{route}.match.{f}");
        let mut out = RouteMatch::default();
        for (j, h) in m.hosts.iter().flatten().enumerate() {
            if let Some(hm) = self.host(h, &format!("{}[{j}]", k("hosts"))) {
                out.hosts.push(hm);
            }
        }
        let mut path_keys = Vec::new();
        if let Some(p) = &m.path_prefix {
            path_keys.push((p.span(), "path_prefix"));
            out.path = Some(PathMatch::Prefix(self.path(p, &k("path_prefix"))));
        }
        if let Some(p) = &m.path_exact {
            path_keys.push((p.span(), "path_exact"));
            out.path = Some(PathMatch::Exact(self.path(p, &k("path_exact"))));
        }
        if let Some(p) = &m.path_regex {
            path_keys.push((p.span(), "path_regex"));
            match regex::Regex::new(p.get_ref()) {
                Ok(re) => out.path = Some(PathMatch::Regex(re)),
                Err(e) => self.err(p.span(), &k("path_regex"), regex_error(&e)),
            }
        }
        if path_keys.len() > 1 {
            // Report at the later ones, so the line points at what to delete.
            path_keys.sort_by_key(|(s, _)| s.start);
            let first = path_keys[0].1;
            for (span, name) in path_keys.into_iter().skip(1) {
                self.err(
                    span,
                    &k(name),
                    format!(
                        "only one of path_prefix, path_exact, path_regex may be set \
                         ({first} is already set)"
                    ),
                );
            }
        }
        for (j, m) in m.methods.iter().flatten().enumerate() {
            let s = m.get_ref();
            if METHODS.contains(&s.as_str()) {
                if let Ok(method) = Method::from_bytes(s.as_bytes()) {
                    out.methods.push(method);
                }
            } else {
                let hint = if METHODS.contains(&s.to_ascii_uppercase().as_str()) {
                    format!(
                        " (methods are case-sensitive: {:?})",
                        s.to_ascii_uppercase()
                    )
                } else {
                    String::new()
                };
                self.err(
                    m.span(),
                    &format!("{}[{j}]", k("methods")),
                    format!("invalid method {s:?}{hint}"),
                );
            }
        }
        for (j, h) in m.headers.iter().flatten().enumerate() {
            let h = h.get_ref();
            let hk = format!("{}[{j}]", k("headers"));
            let name = self.header_name(&h.name, &format!("{hk}.name"));
            let value = h.value.as_ref().map(|v| {
                if HeaderValue::from_str(v.get_ref()).is_err() {
                    self.err(
                        v.span(),
                        &format!("{hk}.value"),
                        format!("invalid header value {:?}", v.get_ref()),
                    );
                }
                v.get_ref().clone()
            });
            if let Some(name) = name {
                out.headers.push(HeaderMatch { name, value });
            }
        }
        for (j, q) in m.query.iter().flatten().enumerate() {
            let q = q.get_ref();
            if q.name.get_ref().is_empty() {
                self.err(
                    q.name.span(),
                    &format!("{}[{j}].name", k("query")),
                    "must not be empty",
                );
            }
            out.query.push(QueryMatch {
                name: q.name.get_ref().clone(),
                value: q.value.as_ref().map(|v| v.get_ref().clone()),
            });
        }
        out
    }

    /// `example.com` or `*.example.com`; stored lowercased.
    fn host(&mut self, h: &S<String>, key: &str) -> Option<HostMatch> {
        let s = h.get_ref().to_ascii_lowercase();
        let (wild, rest) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s.as_str()),
        };
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if rest.is_empty() || !rest.split('.').all(label_ok) {
            let hint = if s.contains(':') {
                " (ports are not part of a host pattern)"
            } else if s.contains('*') {
                " (a wildcard is only allowed as a leading \"*.\")"
            } else {
                ""
            };
            self.err(
                h.span(),
                key,
                format!("invalid host pattern {:?}{hint}", h.get_ref()),
            );
            return None;
        }
        Some(if wild {
            HostMatch::Suffix(format!(".{rest}"))
        } else {
            HostMatch::Exact(rest.to_string())
        })
    }

    fn rewrite(&mut self, rw: &S<RawRewrite>, m: &RouteMatch, route: &str) -> Option<PathRewrite> {
        let span = rw.span();
        let rw = rw.get_ref();
        let k = |f: &str| format!("{route}.rewrite.{f}");
        let mut set: Vec<(Range<usize>, &str, PathRewrite)> = Vec::new();
        if let Some(s) = rw.strip_prefix.as_ref().filter(|s| *s.get_ref()) {
            set.push((s.span(), "strip_prefix", PathRewrite::StripPrefix));
        }
        if let Some(p) = &rw.replace_prefix {
            let v = self.path(p, &k("replace_prefix"));
            set.push((p.span(), "replace_prefix", PathRewrite::ReplacePrefix(v)));
        }
        if let Some(p) = &rw.replace_path {
            let v = self.path(p, &k("replace_path"));
            set.push((p.span(), "replace_path", PathRewrite::ReplacePath(v)));
        }
        set.sort_by_key(|(s, _, _)| s.start);
        let mut set = set.into_iter();
        let Some((at, name, first)) = set.next() else {
            self.err(
                span,
                &format!("{route}.rewrite"),
                "set exactly one of strip_prefix = true, replace_prefix, replace_path",
            );
            return None;
        };
        for (span, other, _) in set {
            self.err(
                span,
                &k(other),
                format!(
                    "only one of strip_prefix, replace_prefix, replace_path may be set \
                     ({name} is already set)"
                ),
            );
        }
        let needs_prefix = matches!(
            first,
            PathRewrite::StripPrefix | PathRewrite::ReplacePrefix(_)
        );
        if needs_prefix && !matches!(m.path, Some(PathMatch::Prefix(_))) {
            self.err(
                at,
                &k(name),
                format!("{name} needs the route to match with path_prefix"),
            );
        }
        Some(first)
    }

    fn vips(
        &mut self,
        raw: &[(usize, S<RawVip>)],
        refs: &Refs<'_>,
        clusters: &[Cluster],
    ) -> Vec<Vip> {
        let mut names = HashMap::new();
        let mut addrs: HashMap<(SocketAddr, bool), usize> = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, v) in raw {
            let v = v.get_ref();
            let key = format!("l4.vips[{i}]");
            self.name(&v.name, &format!("{key}.name"));
            self.unique(&mut names, &v.name, &format!("{key}.name"), "vip");
            if v.interfaces.get_ref().is_empty() {
                self.err(
                    v.interfaces.span(),
                    &format!("{key}.interfaces"),
                    "must list at least one interface",
                );
            }
            for (j, ifname) in v.interfaces.get_ref().iter().enumerate() {
                let n = ifname.get_ref();
                // Linux interface names: 1..=15 bytes, no '/', whitespace or ':'.
                if n.is_empty()
                    || n.len() > 15
                    || n.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
                {
                    self.err(
                        ifname.span(),
                        &format!("{key}.interfaces[{j}]"),
                        format!("invalid interface name {n:?}"),
                    );
                }
            }
            let address = self.addr(&v.address, &format!("{key}.address"), false);
            let protocol = self.choice(
                v.protocol.as_ref(),
                &format!("{key}.protocol"),
                L4Protocol::Tcp,
                &[("tcp", L4Protocol::Tcp), ("udp", L4Protocol::Udp)],
            );
            if let Some(a) = address {
                if let Some(first) = addrs.get(&(a, protocol == L4Protocol::Udp)) {
                    let (line, _) = self.d.line_col(*first);
                    self.err(
                        v.address.span(),
                        &format!("{key}.address"),
                        format!("duplicate vip address {a} (first used on line {line})"),
                    );
                } else {
                    addrs.insert((a, protocol == L4Protocol::Udp), v.address.span().start);
                }
            }
            let mode = self.choice(
                v.mode.as_ref(),
                &format!("{key}.mode"),
                ForwardMode::DsrL2,
                &[("dsr-l2", ForwardMode::DsrL2), ("ipip", ForwardMode::Ipip)],
            );
            let source_hash_only = self.choice(
                v.hash.as_ref(),
                &format!("{key}.hash"),
                false,
                &[("5tuple", false), ("source", true)],
            );
            let cluster = match refs.clusters.get(v.cluster.get_ref()) {
                Some(c) => {
                    // XDP forwards without translating families: an IPv4 VIP needs IPv4
                    // backends.
                    if let (Some(a), Some(cl)) = (address, clusters.get(c))
                        && cl
                            .endpoints
                            .iter()
                            .any(|e| e.address.is_ipv4() != a.is_ipv4())
                    {
                        self.err(
                            v.cluster.span(),
                            &format!("{key}.cluster"),
                            format!(
                                "cluster {:?} has endpoints of another address family than \
                                 the vip {a}",
                                v.cluster.get_ref()
                            ),
                        );
                    }
                    c
                }
                None => {
                    if refs.clusters_complete {
                        self.err(
                            v.cluster.span(),
                            &format!("{key}.cluster"),
                            format!("unknown cluster {:?}", v.cluster.get_ref()),
                        );
                    }
                    0
                }
            };
            out.push(Vip {
                name: v.name.get_ref().clone(),
                interfaces: v
                    .interfaces
                    .get_ref()
                    .iter()
                    .map(|s| s.get_ref().clone())
                    .collect(),
                address: address.unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)),
                protocol,
                mode,
                source_hash_only,
                cluster,
            });
        }
        out
    }
}

/// `200`, `"200"` or `"200-399"` → inclusive range within 100..=599.
fn status_range(s: &RawStatus) -> Result<(u16, u16), String> {
    let code = |n: i64| -> Result<u16, String> {
        u16::try_from(n)
            .ok()
            .filter(|c| (100..=599).contains(c))
            .ok_or_else(|| format!("status {n} is not between 100 and 599"))
    };
    let parse = |t: &str| -> Result<u16, String> {
        t.trim()
            .parse::<i64>()
            .map_err(|_| format!("invalid status {t:?}; expected e.g. \"200\" or \"200-399\""))
            .and_then(code)
    };
    match s {
        RawStatus::Code(n) => code(*n).map(|c| (c, c)),
        RawStatus::Text(t) => {
            let (lo, hi) = match t.split_once('-') {
                Some((a, b)) => (parse(a)?, parse(b)?),
                None => {
                    let c = parse(t)?;
                    (c, c)
                }
            };
            if lo > hi {
                return Err(format!("empty status range {t:?}: {lo} is above {hi}"));
            }
            Ok((lo, hi))
        }
    }
}

/// One line for a regex error: the crate's message draws the pattern with a caret over
/// several lines, which would break the one-error-per-line output of `lbd check`.
pub(crate) fn regex_error(e: &regex::Error) -> String {
    let text = e.to_string();
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    let last = last.strip_prefix("error: ").unwrap_or(last);
    format!("invalid regex: {last}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_reference_vectors() {
        // From the FNV reference test suite (64-bit FNV-1a).
        assert_eq!(fnv1a_hex(b""), "cbf29ce484222325");
        assert_eq!(fnv1a_hex(b"a"), "af63dc4c8601ec8c");
        assert_eq!(fnv1a_hex(b"foobar"), "85944171f73967e8");
    }

    #[test]
    fn status_ranges() {
        let t = |s: &str| status_range(&RawStatus::Text(s.into()));
        assert_eq!(t("200-399"), Ok((200, 399)));
        assert_eq!(t("204"), Ok((204, 204)));
        assert_eq!(t(" 200 - 299 "), Ok((200, 299)));
        assert_eq!(status_range(&RawStatus::Code(200)), Ok((200, 200)));
        for bad in ["", "abc", "200-", "-200", "600", "300-200", "200-399-400"] {
            assert!(t(bad).is_err(), "{bad:?}");
        }
        assert!(status_range(&RawStatus::Code(-1)).is_err());
        assert!(status_range(&RawStatus::Code(70_000)).is_err());
    }
}
