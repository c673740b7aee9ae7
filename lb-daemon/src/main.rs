//! `lbd` command line.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
        Cmd::Run { config: _ } | Cmd::Check { config: _ } => {
            eprintln!("lbd: not implemented yet");
            ExitCode::FAILURE
        }
    }
}
