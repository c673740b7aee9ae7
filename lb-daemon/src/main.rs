//! `lbd` command line.
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};
use lbd::config;

#[derive(Parser)]
#[command(
    name = "lbd",
    about = "L4/L7 load balancer and API gateway",
    long_about = "lbd is one daemon with two data paths that follow one view of backend health: \
an L7 reverse proxy for HTTP/1.1, HTTP/2 and gRPC (routing, balancing, health checks, \
per-route filters, TLS) and an L4 XDP program balancing TCP/UDP virtual IPs with Maglev and \
direct server return. Its configuration is one TOML file (default /etc/lbd/lb.toml); \
SIGHUP reloads it, keeping the running config when the new one is invalid, and SIGTERM \
drains. The admin address serves a status page, a JSON API and Prometheus metrics.",
    version
)]
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
    /// Try lbd with nothing else running: start small demo backends on 127.0.0.1 (the
    /// endpoints of configs/demo.toml) inside lbd, then run the demo config like `run`.
    Demo {
        /// Path to the demo configuration (its endpoints must be the demo backends).
        #[arg(short, long, default_value = "configs/demo.toml")]
        config: PathBuf,
    },
    /// Print a shell completion script for lbd (bash, zsh, fish, elvish or powershell).
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Print lbd's man page (roff) to stdout, or with --out-dir write lbd.1 and one page per
    /// subcommand (lbd-run.1, …) there.
    Man {
        /// Folder for the pages (created if missing).
        #[arg(long)]
        out_dir: Option<PathBuf>,
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
        Cmd::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "lbd", &mut script);
            print_bytes(&script)
        }
        Cmd::Man { out_dir } => man(out_dir.as_deref()),
        Cmd::Run { config } => run(&config, false),
        Cmd::Demo { config } => run(&config, true),
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

/// Writes `bytes` to stdout; a reader that went away (`| head`) is not an error.
fn print_bytes(bytes: &[u8]) -> ExitCode {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("lbd: writing to stdout: {e}");
            ExitCode::FAILURE
        }
        _ => ExitCode::SUCCESS,
    }
}

/// `lbd man`: the page on stdout, or every page into `out_dir`.
fn man(out_dir: Option<&Path>) -> ExitCode {
    let result = match out_dir {
        None => {
            let mut page = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut page) {
                Ok(()) => return print_bytes(&page),
                Err(e) => Err(e),
            }
        }
        Some(dir) => std::fs::create_dir_all(dir)
            .and_then(|()| clap_mangen::generate_to(Cli::command(), dir)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbd man: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `lbd run`, or with `demo` the demo backends started first (`lbd demo`).
fn run(path: &Path, demo: bool) -> ExitCode {
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
    // The control plane (reloads, health checks, discovery, admin API) runs on this thread;
    // the data plane on its own workers (`lbd::l7::workers`, `[global] workers`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lbd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if demo {
        if let Err(e) = runtime.block_on(lbd::demo::start()) {
            eprintln!("lbd demo: {e}");
            return ExitCode::FAILURE;
        }
        let listen = model.listeners.first().map(|l| l.bind.to_string());
        let admin = model.global.admin.as_ref().map(|a| a.bind.to_string());
        eprintln!(
            "{}",
            lbd::demo::banner(
                listen.as_deref().unwrap_or("127.0.0.1:8080"),
                admin.as_deref()
            )
        );
    }
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

/// The system allocator with a cache of freed blocks on each worker thread.
#[global_allocator]
static ALLOC: lbd::thread_cache::ThreadCache = lbd::thread_cache::ThreadCache;
