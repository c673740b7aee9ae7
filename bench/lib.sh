# Shared by the bench scripts (callgrind.sh, h2tail.sh): loopback ports, child processes and
# the bench cluster's config.
# Sourced, not run.

# A free loopback port (bound and released by the kernel's choice).
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits until 127.0.0.1:PORT accepts: TRIES attempts (default 600) STEP seconds apart
# (default 0.1).
wait_port() {
    for _ in $(seq 1 "${2:-600}"); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep "${3:-0.1}"
    done
    echo "port $1 not accepting" >&2
    return 1
}

# The bench's one cluster as lbd TOML: round robin over 127.0.0.1 ports $2, $3, $4 (the
# bench backend's three listeners), speaking protocol $1 to them.
bench_cluster_toml() {
    cat <<EOF
[[clusters]]
name = "bench"
policy = "round_robin"
protocol = "$1"

[[clusters.endpoints]]
address = "127.0.0.1:$2"

[[clusters.endpoints]]
address = "127.0.0.1:$3"

[[clusters.endpoints]]
address = "127.0.0.1:$4"
EOF
}

# Children started with `cmd & pids+=($!)` are stopped (TERM, by PID) when the script exits.
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
