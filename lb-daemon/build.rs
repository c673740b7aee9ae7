//! Builds the XDP objects (`lb-ebpf`) and hands them to the crate as `OUT_DIR/lb-xdp` and
//! `OUT_DIR/lb-decap`.
//!
//! The object needs Debian's rustc (the only compiler here with a `core` for
//! `bpfel-unknown-none`) and `bpf-linker`, so we run a separate cargo on the standalone
//! `lb-ebpf` workspace, the same command as `cargo xtask build-ebpf`. We chose build.rs over
//! "xtask only" so `cargo build` / `cargo test` can never embed a stale object.
//!
//! When that toolchain is missing (or `LBD_SKIP_EBPF` is set, e.g. for doc or lint-only runs)
//! the host build still succeeds: we print a cargo warning, do not set `cfg(lbd_ebpf)`, and
//! put the reason in `LBD_EBPF_STATUS`; L4 tests then print `SKIP: <reason>`. A toolchain that
//! is present but fails to compile the program does fail the build.
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
/// The objects `lb-ebpf` builds: the load balancer and the backend-side decapsulator.
const OBJECTS: [&str; 2] = ["lb-xdp", "lb-decap"];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(lbd_ebpf)");
    println!("cargo::rerun-if-env-changed=LBD_SKIP_EBPF");
    println!("cargo::rerun-if-env-changed=PATH");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest
        .parent()
        .expect("lb-daemon is inside the workspace");
    let ebpf = root.join("lb-ebpf");
    for p in [
        "lb-ebpf/src",
        "lb-ebpf/Cargo.toml",
        "lb-ebpf/Cargo.lock",
        "lb-ebpf/.cargo/config.toml",
        "lb-common/src",
        "lb-common/Cargo.toml",
    ] {
        println!("cargo::rerun-if-changed={}", root.join(p).display());
    }

    match build(&ebpf) {
        Ok(dir) => {
            let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
            for name in OBJECTS {
                let (obj, out) = (dir.join(name), out_dir.join(name));
                std::fs::copy(&obj, &out)
                    .unwrap_or_else(|e| panic!("copy {} to {}: {e}", obj.display(), out.display()));
            }
            println!("cargo::rustc-cfg=lbd_ebpf");
            println!("cargo::rustc-env=LBD_EBPF_STATUS=built");
        }
        Err(reason) => {
            println!("cargo::warning=XDP object not built: {reason}; L4 tests will SKIP");
            println!("cargo::rustc-env=LBD_EBPF_STATUS={reason}");
        }
    }
}

/// Builds the objects and returns their directory, or the reason they cannot be built here.
fn build(ebpf: &Path) -> Result<PathBuf, String> {
    if env::var_os("LBD_SKIP_EBPF").is_some() {
        return Err("LBD_SKIP_EBPF is set".into());
    }
    // Watched either way: when they appear (scripts/setup.sh ran after a first build), the
    // next build must try again instead of keeping this verdict.
    println!("cargo::rerun-if-changed={DEBIAN_RUSTC}");
    println!("cargo::rerun-if-changed={DEBIAN_CARGO}");
    if !Path::new(DEBIAN_RUSTC).exists() || !Path::new(DEBIAN_CARGO).exists() {
        return Err(format!(
            "{DEBIAN_RUSTC} or {DEBIAN_CARGO} missing (run scripts/setup.sh)"
        ));
    }
    let linker = find_bpf_linker().ok_or("bpf-linker not found (run scripts/setup.sh)")?;
    println!("cargo::rerun-if-changed={}", linker.display());

    // Keep the object in its own target dir: it is built by another compiler for another target.
    let target_dir = match env::var_os("CARGO_TARGET_DIR") {
        Some(t) => PathBuf::from(t).join("bpf"),
        None => ebpf.join("target"),
    };
    let mut cmd = Command::new(DEBIAN_CARGO);
    // The outer cargo's compiler settings must not leak in: RUSTC would override the
    // `build.rustc = /usr/bin/rustc` of lb-ebpf/.cargo/config.toml.
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy();
        let keep = k == "CARGO_HOME"
            || k == "CARGO_MAKEFLAGS"
            || k.starts_with("CARGO_NET_")
            || k.starts_with("CARGO_HTTP_")
            || k.starts_with("CARGO_REGISTRIES_")
            || k.starts_with("CARGO_TERM_");
        if (k.starts_with("CARGO_") && !keep)
            || k.starts_with("RUSTC")
            || k == "RUSTFLAGS"
            || k == "RUSTDOCFLAGS"
            || k == "RUSTUP_TOOLCHAIN"
        {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd.current_dir(ebpf)
        .args(["build", "--release", "--locked", "--ignore-rust-version"])
        .env("CARGO_TARGET_DIR", &target_dir)
        // aya-ebpf enables #![feature(asm_experimental_arch)] on the bpf target.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("PATH", path_with_linker(&linker));
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running {DEBIAN_CARGO}: {e}"));
    if !status.success() {
        panic!("building lb-ebpf failed ({status}); see the output above");
    }
    let dir = target_dir.join("bpfel-unknown-none/release");
    for name in OBJECTS {
        if !dir.join(name).exists() {
            panic!("lb-ebpf built but {} is missing", dir.join(name).display());
        }
    }
    Ok(dir)
}

/// `bpf-linker` on PATH, or where `cargo install` puts it.
fn find_bpf_linker() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())
}

fn path_with_linker(linker: &Path) -> std::ffi::OsString {
    let mut dirs = vec![linker.parent().unwrap_or(Path::new("/")).to_path_buf()];
    if let Some(p) = env::var_os("PATH") {
        dirs.extend(env::split_paths(&p));
    }
    env::join_paths(dirs).unwrap_or_default()
}
