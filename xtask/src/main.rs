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
        Cmd::BuildEbpf => build_ebpf(),
        Cmd::Bench(args) => bench::run(args),
    }
}

/// Builds `lb-ebpf` exactly as `lb-daemon/build.rs` does and prints the objects' paths.
///
/// Target dir: `$CARGO_TARGET_DIR/bpf` when set (shared with the build script), else
/// `lb-ebpf/target`; a separate dir because another compiler builds it for another target.
fn build_ebpf() -> Result<()> {
    use anyhow::Context as _;
    use std::path::PathBuf;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives inside the workspace")?
        .to_path_buf();
    let ebpf = root.join("lb-ebpf");
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => PathBuf::from(t).join("bpf"),
        None => ebpf.join("target"),
    };
    let status = std::process::Command::new("/usr/bin/cargo")
        .current_dir(&ebpf)
        .args(["build", "--release", "--locked", "--ignore-rust-version"])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTC_BOOTSTRAP", "1")
        // `cargo xtask` runs under the rustup cargo, which exports RUSTC; it would override
        // lb-ebpf's `build.rustc = /usr/bin/rustc`.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTUP_TOOLCHAIN")
        .status()
        .context("running /usr/bin/cargo (Debian cargo-web; run scripts/setup.sh)")?;
    anyhow::ensure!(status.success(), "building lb-ebpf failed: {status}");
    for name in ["lb-xdp", "lb-decap"] {
        let obj = target_dir.join("bpfel-unknown-none/release").join(name);
        anyhow::ensure!(obj.exists(), "{} missing after the build", obj.display());
        println!("{}", obj.display());
    }
    Ok(())
}
