//! `cargo xtask <command>`: build steps and benchmarks that plain cargo cannot express.
use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;

#[derive(Parser)]
#[command(about = "lbd project automation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the XDP object (lb-ebpf) with Debian's rustc and bpf-linker.
    BuildEbpf,
    /// Benchmark lbd side by side with nginx, HAProxy and Envoy (see bench/README.md).
    Bench(bench::BenchArgs),
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::BuildEbpf => anyhow::bail!("not implemented yet"),
        Cmd::Bench(args) => bench::run(args),
    }
}
