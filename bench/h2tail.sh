#!/usr/bin/env bash
# Latency distribution (p50/p90/p99/max) and CPU per request of lbd and HAProxy for a bounded
# number of HTTP/2 or gRPC requests, interleaved in one run on one machine, to see where the
# tail comes from without the whole `cargo xtask bench`.
#
# The proxy runs pinned to CPU 0 with one worker (`workers = 1`, HAProxy
# `nbthread 1`), h2load and bench-backend to CPU 1, as in the bench. Each contender is started
# afresh for each repetition and gets a warm-up of W requests first (not measured).
#
# Usage: bench/h2tail.sh [--scenario h2|grpc]
#   N        requests per measurement (default 200000)
#   W        warm-up requests (default 20000)
#   C, M     h2load connections and concurrent streams per connection (default 4 and 32,
#            the bench's http2-multiplexed and grpc-unary shape)
#   R        repetitions (default 3)
#   LBD, BACKEND  binaries (default: <target>/release/{lbd,bench-backend})
#   RUN_DIR  scratch directory (default <target>/h2tail/<scenario>)
#   LBD_BASE      a second lbd binary (e.g. a copy of an earlier build), contender `lbd-base`
#   CONTENDERS    default "lbd haproxy" (add lbd-base to compare two builds in one run)
# Output: one line per measurement and the median of each column per contender.
set -euo pipefail

scenario=h2
while [ $# -gt 0 ]; do
    case "$1" in
        --scenario) shift; scenario=${1:-} ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
N=${N:-200000}
W=${W:-20000}
C=${C:-4}
M=${M:-32}
R=${R:-3}
CONTENDERS=${CONTENDERS:-lbd haproxy}

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
lbd=${LBD:-$target/release/lbd}
backend=${BACKEND:-$target/release/bench-backend}
run=${RUN_DIR:-$target/h2tail/$scenario}
mkdir -p "$run"

for tool in h2load taskset python3; do
    if ! command -v "$tool" >/dev/null; then
        echo "SKIP: $tool not installed (scripts/setup.sh --bench)" >&2
        exit 0
    fi
done

case "$scenario" in
    h2) upstream_proto=http1; haproxy_proto=""; load=() ;;
    grpc)
        upstream_proto=grpc; haproxy_proto=" proto h2"
        printf '\000\000\000\000\020pppppppppppppppp' >"$run/grpc-request.bin"
        load=(-H "content-type: application/grpc" -H "te: trailers" -d "$run/grpc-request.bin")
        ;;
    *) echo "unknown scenario: $scenario (h2 or grpc)" >&2; exit 2 ;;
esac

# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"

b1=$(free_port); b2=$(free_port); b3=$(free_port); lp=$(free_port)
taskset -c 1 "$backend" --listen "127.0.0.1:$b1" --listen "127.0.0.1:$b2" \
    --listen "127.0.0.1:$b3" --body-bytes 64 2>"$run/backend.log" &
pids+=($!)
wait_port "$b1" 300 0.05

cat >"$run/lb.toml" <<EOF
[global]
access_log = false
log_level = "warn"
workers = 1

[[listeners]]
name = "bench"
bind = "127.0.0.1:$lp"
protocol = "h2c"

[[routes]]
name = "all"
cluster = "bench"
[routes.match]
path_prefix = "/"

$(bench_cluster_toml "$upstream_proto" "$b1" "$b2" "$b3")
EOF
"$lbd" check --config "$run/lb.toml" >/dev/null

cat >"$run/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 8192

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always

frontend bench
    bind 127.0.0.1:$lp proto h2
    default_backend bench

backend bench
    balance roundrobin
    server s0 127.0.0.1:$b1$haproxy_proto
    server s1 127.0.0.1:$b2$haproxy_proto
    server s2 127.0.0.1:$b3$haproxy_proto
EOF

# CPU time (utime + stime, clock ticks) of a process and its threads.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

measure() {
    local who=$1 rep=$2 pid
    case "$who" in
        lbd | lbd-base)
            local bin=$lbd
            if [ "$who" = lbd-base ]; then bin=${LBD_BASE:?LBD_BASE names the lbd-base binary}; fi
            RUST_LOG=warn taskset -c 0 "$bin" run \
                --config "$run/lb.toml" 2>"$run/$who.stderr" &
            ;;
        haproxy)
            if ! command -v haproxy >/dev/null; then echo "$who MISSING"; return; fi
            taskset -c 0 haproxy -db -f "$run/haproxy.cfg" 2>"$run/haproxy.log" &
            ;;
        *) echo "unknown contender: $who" >&2; return 1 ;;
    esac
    pid=$!
    pids+=("$pid")
    wait_port "$lp" 300 0.05
    taskset -c 1 h2load -t1 -c "$C" -m "$M" -n "$W" "${load[@]}" "http://127.0.0.1:$lp/" \
        >"$run/warm.txt"
    local t0 t1 log=$run/$who.$rep.log
    # h2load appends to an existing log file: a rerun would mix in the last run's requests.
    rm -f "$log"
    t0=$(cpu_ticks "$pid")
    taskset -c 1 h2load -t1 -c "$C" -m "$M" -n "$N" "${load[@]}" --log-file "$log" \
        "http://127.0.0.1:$lp/" >"$run/$who.$rep.txt"
    t1=$(cpu_ticks "$pid")
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
    local rps ok
    rps=$(awk '/^finished in/ { gsub(",", "", $4); print $4 }' "$run/$who.$rep.txt")
    ok=$(awk '/^requests:/ { print $8 }' "$run/$who.$rep.txt")
    python3 - "$log" "$who" "$rep" "$rps" "$ok" "$t0" "$t1" "$(getconf CLK_TCK)" <<'PY'
import sys
log, who, rep, rps, ok, t0, t1, hz = sys.argv[1:]
d = sorted(int(l.split()[2]) for l in open(log) if l.strip())
q = lambda p: d[min(len(d) - 1, int(len(d) * p))]
cpu = (int(t1) - int(t0)) / int(hz) * 1e6 / max(1, int(ok))
print(f"{who:8} rep {rep}  req/s {float(rps):9.0f}  ok {ok:>7}  p50 {q(.5):6} µs  p90 {q(.9):6}"
      f"  p99 {q(.99):6}  p99.9 {q(.999):6}  max {d[-1]:6}  cpu/req {cpu:5.1f} µs")
PY
}

echo "scenario $scenario: h2load -c $C -m $M -n $N (warm-up $W), proxy on CPU 0, load+backend on CPU 1"
for rep in $(seq 1 "$R"); do
    for who in $CONTENDERS; do
        measure "$who" "$rep" | tee -a "$run/summary.txt"
    done
done
