//! `lbd` command line.
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lbd::config;

#[derive(Parser)]
#[command(name = "lbd", about = "L4/L7 load balancer and API gateway", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the load balancer with the given configuration until SIGTERM/SIGINT.
    Run {
        /// Path to the configuration file (TOML).
        #[arg(short, long, default_value = "/etc/lbd/lb.toml")]
        config: PathBuf,
    },
    /// Validate a configuration: print every problem with file:line:column and key, exit 1
    /// if there is any, else print a summary and exit 0.
    Check {
        /// Path to the configuration file (TOML).
        #[arg(short, long, default_value = "/etc/lbd/lb.toml")]
        config: PathBuf,
    },
    /// Show which VIP a flow addresses and which backend the XDP program gives a new flow of
    /// it (assuming every endpoint healthy except those named with --down), and why.
    Explain {
        /// Path to the configuration file (TOML).
        #[arg(short, long, default_value = "/etc/lbd/lb.toml")]
        config: PathBuf,
        /// "tcp" or "udp".
        protocol: String,
        /// Client address, ip:port ("[::1]:80" for IPv6).
        src: SocketAddr,
        /// Destination address, ip:port.
        dst: SocketAddr,
        /// Treat this backend address as down (repeatable).
        #[arg(long)]
        down: Vec<IpAddr>,
    },
    /// Backend side of `ipip` VIPs without the kernel's tunnel modules: attach the `lb_decap`
    /// XDP program (strips the outer IPv4/IPv6 header) until SIGTERM/SIGINT.
    Decap {
        /// Interface that receives the encapsulated packets (repeatable).
        #[arg(short, long, required = true)]
        interface: Vec<String>,
        /// Use generic (skb) mode instead of trying driver mode first.
        #[arg(long)]
        generic: bool,
    },
    /// Translate an nginx or HAProxy configuration into an lb.toml (printed, or written to
    /// --output); every directive that was not carried over is listed on stderr with its
    /// file:line and at the end of the output.
    Import {
        /// The nginx.conf or haproxy.cfg to translate.
        source: PathBuf,
        /// "nginx" or "haproxy" (default: guessed from the file name and contents).
        #[arg(long)]
        from: Option<String>,
        /// Write the lb.toml here instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Print the version and build details.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Version => {
            println!("lbd {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Cmd::Run { config } => run(&config),
        Cmd::Check { config } => check(&config),
        Cmd::Import {
            source,
            from,
            output,
        } => import(&source, from.as_deref(), output.as_deref()),
        Cmd::Explain {
            config,
            protocol,
            src,
            dst,
            down,
        } => explain(&config, &protocol, src, dst, down),
        Cmd::Decap { interface, generic } => {
            match lbd::l4::decap::run_until_signal(&interface, generic) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("lbd decap: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run(path: &Path) -> ExitCode {
    let model = match config::load(path) {
        Ok(m) => m,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!(
                "lbd: {} problem(s) in {}; not starting",
                errors.0.len(),
                path.display()
            );
            return ExitCode::FAILURE;
        }
    };
    lbd::telemetry::logging::init(model.global.log_format, &model.global.log_level);
    // TOKIO_WORKER_THREADS sets the worker count (default: one per core).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lbd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let serve = async {
        lbd::memory::spawn_trimmer();
        lbd::supervisor::run(path, model).await
    };
    match runtime.block_on(serve) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "lbd cannot start");
            eprintln!("lbd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `lbd check`: every problem on its own line on stderr, or a one-line summary on stdout.
fn import(source: &Path, from: Option<&str>, output: Option<&Path>) -> ExitCode {
    use lbd::import::{Format, import_file};
    let format = match from {
        None => None,
        Some("nginx") => Some(Format::Nginx),
        Some("haproxy") => Some(Format::Haproxy),
        Some(other) => {
            eprintln!("--from {other:?}: expected \"nginx\" or \"haproxy\"");
            return ExitCode::from(2);
        }
    };
    let imported = match import_file(source, format) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    for s in &imported.skipped {
        eprintln!("{}: not translated: {} ({})", s.origin, s.directive, s.why);
    }
    eprintln!(
        "{}: {} directive{} not translated",
        source.display(),
        imported.skipped.len(),
        if imported.skipped.len() == 1 { "" } else { "s" }
    );
    match output {
        Some(path) => {
            if let Err(e) = std::fs::write(path, &imported.toml) {
                eprintln!("{}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
        None => print!("{}", imported.toml),
    }
    ExitCode::SUCCESS
}

fn check(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(m) => {
            for l in &m.listeners {
                if let Some(t) = &l.tls {
                    for w in config::tls::warnings(t, &l.name) {
                        eprintln!("{}: warning: {w}", path.display());
                    }
                }
            }
            let endpoints: usize = m.clusters.iter().map(|c| c.endpoints.len()).sum();
            println!(
                "{}: ok ({} listeners, {} routes, {} clusters, {} endpoints, {} vips)",
                path.display(),
                m.listeners.len(),
                m.routes.len(),
                m.clusters.len(),
                endpoints,
                m.vips.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            let n = errors.0.len();
            eprintln!(
                "{}: {n} problem{}",
                path.display(),
                if n == 1 { "" } else { "s" }
            );
            ExitCode::FAILURE
        }
    }
}

/// `lbd explain`: the answer on stdout; config or argument problems on stderr, exit 1.
fn explain(
    path: &Path,
    protocol: &str,
    src: SocketAddr,
    dst: SocketAddr,
    down: Vec<IpAddr>,
) -> ExitCode {
    use lbd::l4::explain::{Query, explain, parse_protocol};
    let protocol = match parse_protocol(protocol) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("lbd explain: {e}");
            return ExitCode::FAILURE;
        }
    };
    let model = match config::load(path) {
        Ok(m) => m,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let q = Query {
        protocol,
        src,
        dst,
        down,
    };
    match explain(&model, &q) {
        Ok(e) => {
            print!("{e}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lbd explain: {e}");
            ExitCode::FAILURE
        }
    }
}
