#!/usr/bin/env bash
# Runs lbd's whole test suite on a fresh Debian 12 machine: installs prerequisites (idempotent),
# builds everything including the XDP object, runs every test, then the lint gates.
#
# Tests that need root, BPF or network namespaces run when those are available (as in CI) and
# print a "SKIP: <reason>" line otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
export CARGO_TERM_COLOR=never

./scripts/setup.sh

echo "== eBPF object (lb-ebpf, Debian rustc + bpf-linker)"
cargo xtask build-ebpf

echo "== build (host workspace; lb-daemon/build.rs embeds the eBPF object)"
cargo build --workspace --all-targets --locked

echo "== tests"
cargo test --workspace --locked --no-fail-fast

echo "== lint"
cargo fmt --all --check
# lb-ebpf is its own workspace (another compiler and target), so it is checked on its own:
# clippy for the host target with the rustup toolchain (Debian's rustc has no clippy), with
# panic=abort as for the BPF build.
(cd lb-ebpf && cargo fmt --check)
(cd lb-ebpf && RUSTC="$(rustup which rustc)" cargo clippy --locked \
    --target "$(rustc -vV | sed -n 's/^host: //p')" \
    --target-dir "${CARGO_TARGET_DIR:-target}/bpf-clippy" -- -C panic=abort -D warnings)
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "test.sh: all checks passed"
