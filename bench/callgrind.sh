#!/usr/bin/env bash
# Instructions (and heap allocations) per proxied request, counted by callgrind: a figure that
# does not move with the machine's load, unlike requests/s.
#
# lbd (release build, which carries line tables: `debug = 1` in the workspace profile) runs
# under `valgrind --tool=callgrind` with one runtime worker and the config of a bench scenario
# (one listener, one route, round robin over three bench-backend ports, access log off):
#   h1   (default) `http1-keepalive`: one keep-alive client (`h2load --h1 -c 1 -m 1`) sends
#        small GETs to an HTTP/1.1 listener, HTTP/1.1 upstream.
#   h2   `http2-multiplexed`: one h2c client connection with M concurrent streams (`h2load
#        -c 1 -m M`, M = 16 by default) sends GETs to an h2c listener, HTTP/1.1 upstream.
#   grpc `grpc-unary`: the same with a gRPC-framed POST (16-byte message, `te: trailers`),
#        HTTP/2 (`protocol = "grpc"`) upstream.
# --https terminates TLS on the listener (the bench's certificate type, ECDSA P-256, made here
# by openssl; ALPN `http/1.1` for h1, `h2` for h2/grpc; h2load's default TLS 1.3 suites, so
# AES-128-GCM): the difference from the same scenario without it is what TLS adds per request
# on a kept-alive connection (the one handshake is part of the fixed cost that cancels out).
# The client sends exactly N requests, then lbd is stopped. This is done for N1 and N2
# requests; startup, the first connections and shutdown cost the same in both runs, so
#
#     instructions per request = (total(N2) - total(N1)) / (N2 - N1)
#
# and likewise for calls of malloc/realloc/free (counted from callgrind's call records). Each
# total leaves out quanta's clock calibration, a startup cost that varies between runs.
#
# The route carries no filter unless asked (as the bench's `--feature` rows):
#   --feature rate-limit  a `rate_limit` keyed by client address, far above the load (the
#                         `http1-rate-limit` bench row: every request passes the limiter and
#                         gets the RateLimit-* fields);
#   --feature jwt         a `jwt` filter (ES256, key from a JWKS file made here with openssl);
#                         every request carries the same valid token (the `http1-jwt-es256`
#                         row);
#   --route-filter TOML   any filter table body, e.g. 'cors = { allow_origins = ["*"] }'
#                         (repeatable; added after the feature's filter).
#
# --https puts the listener behind TLS (an ECDSA P-256 certificate made here with openssl; ALPN
# http/1.1 for h1, h2 otherwise), to price what TLS adds.
#
# Usage: bench/callgrind.sh [--no-build] [--keep] [--https] [--scenario h1|h2|grpc]
#                           [--feature F] [--route-filter TOML]...
#   N1, N2          request counts (default 2000 and 12000)
#   M               concurrent streams of the h2 and grpc scenarios (default 16)
#   C               client connections of the h2 and grpc scenarios (default 1)
#   CARGO_TARGET_DIR where the release binaries are (default: target/)
#   LBD, BACKEND    the binaries to run instead (e.g. a copy of an earlier build, to compare)
#   RUN_DIR         where the callgrind files go (default: <target>/callgrind)
#   EXTRA_TOML      appended to the config (e.g. a [tracing] table, to price a feature)
#   --no-build      use the binaries already built
#   --keep          keep the callgrind output files (default: kept anyway under the run dir)
# Output: the figures on stdout; the run dir `<target>/callgrind/` holds the callgrind files
# (`callgrind_annotate --inclusive=yes <target>/callgrind/callgrind.N2.out` shows where the
# instructions go) and the top of that annotation in `annotate.txt`.
set -euo pipefail

N1=${N1:-2000}
N2=${N2:-12000}
M=${M:-16}
C=${C:-1}
build=1
scenario=h1
https=0
feature=plain
route_filters=()
while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) build=0 ;;
        --keep) ;;
        --https) https=1 ;;
        --scenario) shift; scenario=${1:-} ;;
        --feature) shift; feature=${1:-} ;;
        --route-filter) shift; route_filters+=("${1:-}") ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
case "$scenario" in
    h1) listener_proto=http; upstream_proto=http1; load=(--h1 -c 1 -m 1) ;;
    h2) listener_proto=h2c; upstream_proto=http1; load=(-c "$C" -m "$M") ;;
    grpc) listener_proto=h2c; upstream_proto=grpc; load=(-c "$C" -m "$M") ;;
    *) echo "unknown scenario: $scenario (h1, h2 or grpc)" >&2; exit 2 ;;
esac

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
lbd=${LBD:-$target/release/lbd}
backend=${BACKEND:-$target/release/bench-backend}
scheme=http
suffix=
if [ "$https" = 1 ]; then scheme=https; suffix=-https; fi
run=${RUN_DIR:-$target/callgrind/$scenario-$feature$suffix}
mkdir -p "$run"
if [ "$scenario" = grpc ]; then
    # One gRPC message: uncompressed flag, 4-byte length, 16 payload bytes (as the bench).
    printf '\000\000\000\000\020pppppppppppppppp' >"$run/grpc-request.bin"
    load+=(-H "content-type: application/grpc" -H "te: trailers" -d "$run/grpc-request.bin")
fi

# Base64url without padding (RFC 7515 §2), of stdin.
b64url() { base64 -w0 | tr '+/' '-_' | tr -d '='; }

# A P-256 key, its JWKS in $run/jwks.json, and an ES256 token valid for a day, as the bench
# makes them (issuer and audience as `xtask bench`).
make_jwt() {
    openssl ecparam -name prime256v1 -genkey -noout -out "$run/jwt-key.pem" 2>/dev/null
    # The SubjectPublicKeyInfo of a P-256 key ends with the point's x and y (32 bytes each).
    openssl ec -in "$run/jwt-key.pem" -pubout -outform DER 2>/dev/null | tail -c 64 >"$run/jwt-pub.raw"
    local x y now header payload sig r s
    x=$(head -c 32 "$run/jwt-pub.raw" | b64url)
    y=$(tail -c 32 "$run/jwt-pub.raw" | b64url)
    printf '{"keys":[{"kty":"EC","crv":"P-256","alg":"ES256","use":"sig","kid":"bench","x":"%s","y":"%s"}]}' \
        "$x" "$y" >"$run/jwks.json"
    now=$(date +%s)
    header=$(printf '{"alg":"ES256","typ":"JWT","kid":"bench"}' | b64url)
    payload=$(printf '{"iss":"https://bench.test","aud":"bench","sub":"bench-user","iat":%s,"exp":%s}' \
        "$now" $((now + 86400)) | b64url)
    printf '%s' "$header.$payload" | openssl dgst -sha256 -sign "$run/jwt-key.pem" >"$run/jwt-sig.der"
    # DER ECDSA-Sig-Value -> JWS's fixed r || s (32 bytes each).
    read -r r s < <(openssl asn1parse -inform DER -in "$run/jwt-sig.der" |
        awk -F: '/INTEGER/ { printf "%s ", $NF } END { print "" }')
    pad() { printf '%064s' "$(printf '%s' "$1" | sed 's/^0*//')" | tr ' ' 0; }
    sig=$( (pad "$r"; pad "$s") | tr -d '\n' | xxd -r -p | b64url)
    jwt_token="$header.$payload.$sig"
}

tools=(valgrind h2load callgrind_annotate)
if [ "$https" = 1 ]; then tools+=(openssl); fi
for tool in "${tools[@]}"; do
    if ! command -v "$tool" >/dev/null; then
        echo "SKIP: $tool not installed (scripts/setup.sh --bench installs h2load; apt-get install valgrind)" >&2
        exit 0
    fi
done

if [ "$build" = 1 ]; then
    (cd "$root" && cargo build --release -p lb-daemon -p lb-bench-backend)
fi

# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"

filters=""
case "$feature" in
    plain) ;;
    rate-limit)
        filters+=$'[[routes.filters]]\nrate_limit = { key = "client_ip", limits = [{ rate = "10000000/s" }] }\n'
        ;;
    jwt)
        for tool in openssl xxd; do
            command -v "$tool" >/dev/null || { echo "SKIP: $tool not installed" >&2; exit 0; }
        done
        make_jwt
        filters+="[[routes.filters]]
jwt = { providers = [{ name = \"bench\", issuer = \"https://bench.test\", audiences = [\"bench\"], algorithms = [\"ES256\"], jwks_file = \"$run/jwks.json\" }] }
"
        load+=(-H "authorization: Bearer $jwt_token")
        ;;
    *) echo "unknown feature: $feature (plain, rate-limit or jwt)" >&2; exit 2 ;;
esac
for f in "${route_filters[@]}"; do
    filters+=$'[[routes.filters]]\n'"$f"$'\n'
done

b1=$(free_port); b2=$(free_port); b3=$(free_port); lp=$(free_port)
"$backend" --listen "127.0.0.1:$b1" --listen "127.0.0.1:$b2" --listen "127.0.0.1:$b3" \
    --body-bytes 64 2>"$run/backend.log" &
pids+=($!)
wait_port "$b1"

tls_toml=
if [ "$https" = 1 ]; then
    alpn='"http/1.1"'
    if [ "$scenario" != h1 ]; then alpn='"h2"'; fi
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
        -subj /CN=bench.lbd.test -addext subjectAltName=DNS:bench.lbd.test \
        -keyout "$run/bench.key" -out "$run/bench.crt" 2>/dev/null
    # h2c is what the h2/grpc listeners speak in cleartext; over TLS, ALPN decides.
    listener_proto=http
    tls_toml="[listeners.tls]
alpn = [$alpn]
[[listeners.tls.certificates]]
cert = \"$run/bench.crt\"
key = \"$run/bench.key\""
fi

cat >"$run/lb.toml" <<EOF
[global]
access_log = false
log_level = "warn"
workers = 1

[[listeners]]
name = "bench"
bind = "127.0.0.1:$lp"
protocol = "$listener_proto"
$tls_toml

[[routes]]
name = "all"
cluster = "bench"
[routes.match]
path_prefix = "/"
$filters
$(bench_cluster_toml "$upstream_proto" "$b1" "$b2" "$b3")

${EXTRA_TOML:-}
EOF
"$lbd" check --config "$run/lb.toml" >/dev/null

# Sums the `calls=` records of calls to the named functions in a callgrind file (names are
# compressed: `cfn=(7) malloc` the first time, `cfn=(7)` after).
calls_of() {
    awk -v want="$2" '
        BEGIN { n = split(want, w, ","); for (i = 1; i <= n; i++) wanted[w[i]] = 1 }
        /^c?fn=\(/ {
            match($0, /\([0-9]+\)/); id = substr($0, RSTART, RLENGTH)
            rest = substr($0, RSTART + RLENGTH + 1)
            if (rest != "") name[id] = rest
            if ($0 ~ /^cfn=/) cur = (id in name && name[id] in wanted) ? 1 : 0
            next
        }
        /^calls=/ { if (cur) { split(substr($0, 7), c, " "); total += c[1] }; cur = 0; next }
        END { print total + 0 }
    ' "$1"
}

measure() {
    local n=$1 out=$run/callgrind.$1.out
    rm -f "$out"
    RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out" \
        "$lbd" run --config "$run/lb.toml" 2>"$run/lbd.$n.log" &
    local vg=$!
    pids+=("$vg")
    wait_port "$lp"
    h2load "${load[@]}" -n "$n" "$scheme://127.0.0.1:$lp/" >"$run/h2load.$n.txt"
    if ! grep -q "status codes: $n 2xx" "$run/h2load.$n.txt"; then
        echo "h2load did not get $n 2xx answers:" >&2
        cat "$run/h2load.$n.txt" >&2
        exit 1
    fi
    kill -TERM "$vg"
    wait "$vg" || true
    local total
    total=$(awk '/^(summary|totals):/ { print $2; exit }' "$out")
    # quanta (the metrics crates' clock) calibrates once at startup for as long as its
    # samples take to settle: 1-4 million instructions that differ from run to run and,
    # left in, move the per-request figure by several hundred.
    local calibration
    calibration=$(callgrind_annotate --inclusive=yes --threshold=100 "$out" 2>/dev/null |
        awk '/quanta::Calibration::calibrate/ { gsub(",", "", $1); if ($1 + 0 > max) max = $1 + 0 }
             END { print max + 0 }')
    total=$((total - calibration))
    # Heap allocations are counted where Rust makes them (lbd's allocator serves most from a
    # per-thread cache, so malloc's own calls would miss them); malloc calls are what reached
    # the system allocator.
    echo "$total $(calls_of "$out" __rustc::__rust_alloc,__rustc::__rust_alloc_zeroed,__rustc::__rust_realloc)" \
        "$(calls_of "$out" __rustc::__rust_dealloc) $(calls_of "$out" malloc,realloc,calloc)" >"$run/result.$n"
}

measure "$N1"
measure "$N2"
read -r t1 m1 f1 s1 <"$run/result.$N1"
read -r t2 m2 f2 s2 <"$run/result.$N2"
d=$((N2 - N1))
echo "scenario: $scenario over $scheme, feature: $feature (h2load ${load[*]:0:6})"
echo "requests: $N1 -> $N2"
echo "instructions: $t1 -> $t2"
awk -v a="$t1" -v b="$t2" -v d="$d" 'BEGIN { printf "instructions per request: %.0f\n", (b - a) / d }'
awk -v a="$m1" -v b="$m2" -v d="$d" 'BEGIN { printf "allocations per request: %.2f\n", (b - a) / d }'
awk -v a="$f1" -v b="$f2" -v d="$d" 'BEGIN { printf "frees per request: %.2f\n", (b - a) / d }'
awk -v a="$s1" -v b="$s2" -v d="$d" 'BEGIN { printf "malloc calls per request: %.2f\n", (b - a) / d }'
callgrind_annotate --inclusive=yes "$run/callgrind.$N2.out" 2>/dev/null | head -80 >"$run/annotate.txt" || true
echo "profile of the $N2-request run: $run/callgrind.$N2.out (top: $run/annotate.txt)"
