//! The Pingora contender of `cargo xtask bench`: a round-robin reverse proxy over the bench
//! backends, configured like the other contenders (one worker thread, keep-alive upstreams, no
//! access log, no health checks).
//!
//! Usage: `bench-pingora --listen ADDR [--h2c] [--upstream-h2] BACKEND...`
use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::Result;
use pingora_core::apps::HttpServerOptions;
use pingora_core::server::Server;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_load_balancing::LoadBalancer;
use pingora_load_balancing::selection::RoundRobin;
use pingora_proxy::{ProxyHttp, Session};

struct Lb {
    upstreams: Arc<LoadBalancer<RoundRobin>>,
    upstream_h2: bool,
}

#[async_trait]
impl ProxyHttp for Lb {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let backend = self.upstreams.select(b"", 256).ok_or_else(|| {
            pingora_core::Error::explain(pingora_core::ErrorType::ConnectNoRoute, "no backend")
        })?;
        let mut peer = HttpPeer::new(backend, false, String::new());
        if self.upstream_h2 {
            // Plaintext h2 with prior knowledge (h2c), like the other contenders' gRPC upstreams.
            peer.options.set_http_version(2, 2);
        }
        Ok(Box::new(peer))
    }
}

struct Args {
    listen: String,
    h2c: bool,
    upstream_h2: bool,
    backends: Vec<String>,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        listen: String::new(),
        h2c: false,
        upstream_h2: false,
        backends: Vec::new(),
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--listen" => a.listen = it.next().ok_or("--listen needs an address")?,
            "--h2c" => a.h2c = true,
            "--upstream-h2" => a.upstream_h2 = true,
            b if !b.starts_with('-') => a.backends.push(b.to_owned()),
            other => return Err(format!("unknown option {other}")),
        }
    }
    if a.listen.is_empty() || a.backends.is_empty() {
        return Err("usage: bench-pingora --listen ADDR [--h2c] [--upstream-h2] BACKEND...".into());
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench-pingora: {e}");
            std::process::exit(2);
        }
    };
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        upstream_keepalive_pool_size: 128,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(Opt::default()), conf);
    server.bootstrap();
    let upstreams = match LoadBalancer::try_from_iter(args.backends.iter().map(String::as_str)) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("bench-pingora: bad backend list: {e}");
            std::process::exit(2);
        }
    };
    let mut svc = pingora_proxy::http_proxy_service(
        &server.configuration,
        Lb {
            upstreams: Arc::new(upstreams),
            upstream_h2: args.upstream_h2,
        },
    );
    if args.h2c {
        if let Some(app) = svc.app_logic_mut() {
            let mut opts = HttpServerOptions::default();
            opts.h2c = true;
            app.server_options = Some(opts);
        }
    }
    svc.add_tcp(&args.listen);
    server.add_service(svc);
    server.run_forever();
}
