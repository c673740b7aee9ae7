//! `cargo xtask <command>`: build steps and benchmarks that plain cargo cannot express.
use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod deb;

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
    /// The bench's TLS connection-per-request load generator (run by `bench`).
    #[command(hide = true)]
    BenchTlsClient(bench::tlsload::TlsClientArgs),
    /// Build a Debian package (dpkg-deb): binary, systemd unit, /etc/lbd/lb.toml, man pages,
    /// completions, maintainer scripts that create the lbd user.
    Deb {
        /// Package this lbd binary instead of building `--release` first.
        #[arg(long)]
        lbd: Option<std::path::PathBuf>,
        /// Where the .deb goes.
        #[arg(long, default_value = "target/debian")]
        out_dir: std::path::PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::BuildEbpf => build_ebpf(),
        Cmd::Bench(args) => bench::run(args),
        Cmd::BenchTlsClient(args) => bench::tlsload::run(args),
        Cmd::Deb { lbd, out_dir } => build_deb(lbd, out_dir),
    }
}

/// `cargo xtask deb`: builds lbd in release mode unless given a binary, then the package.
fn build_deb(lbd: Option<std::path::PathBuf>, out_dir: std::path::PathBuf) -> Result<()> {
    use anyhow::Context as _;
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives inside the workspace")?
        .to_path_buf();
    let lbd = match lbd {
        Some(p) => p,
        None => {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = std::process::Command::new(cargo)
                .current_dir(&root)
                .args([
                    "build",
                    "--release",
                    "--locked",
                    "-p",
                    "lb-daemon",
                    "--bin",
                    "lbd",
                ])
                .status()
                .context("running cargo build")?;
            anyhow::ensure!(status.success(), "cargo build --release failed: {status}");
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| root.join("target"), std::path::PathBuf::from);
            target.join("release/lbd")
        }
    };
    let out_dir = if out_dir.is_absolute() {
        out_dir
    } else {
        root.join(out_dir)
    };
    std::fs::create_dir_all(&out_dir)?;
    let deb = deb::build(&deb::DebOptions {
        root,
        lbd,
        out_dir,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        fast: false,
    })?;
    println!("{}", deb.display());
    Ok(())
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
