//! `lbd` command line.
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
    match runtime.block_on(lbd::supervisor::run(path, model)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "lbd cannot start");
            eprintln!("lbd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `lbd check`: every problem on its own line on stderr, or a one-line summary on stdout.
fn check(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(m) => {
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
