# Shared helpers for the load benches. Source it: `. "$(dirname "$0")/common.sh"`.
#
# Every server a bench starts listens on 127.0.0.1 (or another 127.0.0.0/8
# address) on a free high port, is recorded in PIDS and stopped by the EXIT
# trap. Results are appended as tab-separated lines
#   area  test  server  metric  value
# to $RESULTS_TSV (all.sh points every area at one file).

set -euo pipefail

LOAD_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$LOAD_DIR/../.." && pwd)"
RESULTS_DIR="$ROOT/benches/results"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BEACON="${BEACON:-$TARGET_DIR/release/beacon}"
CONVERGENCE="${CONVERGENCE:-$TARGET_DIR/release/examples/convergence}"
WORK="$(mktemp -d /tmp/beacon-bench.XXXXXX)"
RESULTS_TSV="${RESULTS_TSV:-$WORK/results.tsv}"
CLK_TCK="$(getconf CLK_TCK)"
PIDS=()

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

cleanup() {
    local pid
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]:-}"; do
        [ -z "$pid" ] && continue
        for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    done
    if [ -z "${KEEP_WORK:-}" ]; then rm -rf "$WORK"; else log "kept $WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Installs the Debian packages whose commands are missing. Arguments are
# command:package pairs. Services the packages ship are not started.
need() {
    local missing=() pair cmd pkg
    for pair in "$@"; do
        cmd="${pair%%:*}"; pkg="${pair#*:}"
        if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
            missing+=("$pkg")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]}"
    local policy=/usr/sbin/policy-rc.d made_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$WORK/apt.log" 2>&1 ||
        { cat "$WORK/apt.log" >&2; return 1; }
    [ -n "$made_policy" ] && rm -f "$policy"
    return 0
}

# A port free on 127.0.0.1 for both TCP and UDP, above 20000.
free_port() {
    python3 - <<'PY'
import random, socket
for _ in range(200):
    p = random.randint(20000, 32000)
    try:
        t = socket.socket(); t.bind(("127.0.0.1", p))
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", p))
        t.close(); u.close(); print(p); break
    except OSError:
        pass
PY
}

# start NAME CMD...: runs CMD in the background with its output in
# $WORK/NAME.log, records the pid; prints it. Call as `pid=$(start ...)` is
# NOT possible (subshell): use `start NAME ...; pid=$LAST_PID`.
LAST_PID=""
start() {
    local name="$1"; shift
    "$@" >"$WORK/$name.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# stop PID: TERM, then KILL after 2 s.
stop() {
    local pid="$1"
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

# wait_dns PORT NAME [TYPE] [SECONDS]: until NAME answers NOERROR with data.
wait_dns() {
    local port="$1" name="$2" type="${3:-A}" secs="${4:-60}" i
    for i in $(seq $((secs * 10))); do
        if dig +short +time=1 +tries=1 -p "$port" @127.0.0.1 "$name" "$type" 2>/dev/null | grep -q .; then
            return 0
        fi
        sleep 0.1
    done
    log "timeout waiting for $name on port $port"
    return 1
}

# wait_tcp HOST PORT [SECONDS]
wait_tcp() {
    local host="$1" port="$2" secs="${3:-20}"
    for _ in $(seq $((secs * 20))); do
        if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    log "timeout waiting for $host:$port"
    return 1
}

# CPU time (user+sys) of a process and its children (nginx's workers), in
# clock ticks.
cpu_ticks() {
    local p t total=0
    for p in "$1" $(pgrep -P "$1" 2>/dev/null || true); do
        t=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || t=0
        total=$((total + ${t:-0}))
    done
    echo "$total"
}
# Resident set size in KiB, of a process and its children.
rss_kb() {
    local p t total=0
    for p in "$1" $(pgrep -P "$1" 2>/dev/null || true); do
        t=$(awk '/^VmRSS:/{print $2}' "/proc/$p/status" 2>/dev/null) || t=0
        total=$((total + ${t:-0}))
    done
    echo "$total"
}

record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS_TSV"; }

# record_dnsperf SERVER TEST CPU_TICKS DNSPERF_OUTPUT: qps, average latency,
# lost % and the server's CPU per completed query, from one dnsperf run.
record_dnsperf() {
    local server="$1" test="$2" ticks="$3" out="$4"
    awk -v server="$server" -v test="$test" -v ticks="$ticks" -v hz="$CLK_TCK" '
        /Queries completed:/ { done = $3 }
        /Queries lost:/ { lost = $4; gsub(/[()%]/, "", lost) }
        /Queries per second:/ { qps = $4 }
        /Average Latency/ { lat = $4 * 1000 }
        END {
            cpu = done > 0 ? ticks / hz / done * 1e6 : 0
            printf "dns\t%s\t%s\tqps\t%.0f\n", test, server, qps
            printf "dns\t%s\t%s\tavg_ms\t%.3f\n", test, server, lat
            printf "dns\t%s\t%s\tlost_pct\t%.2f\n", test, server, lost
            printf "dns\t%s\t%s\tcpu_us_per_q\t%.2f\n", test, server, cpu
        }' "$out" >>"$RESULTS_TSV"
}

have_beacon() { [ -x "$BEACON" ] && [ -z "${NO_BEACON:-}" ]; }

# Builds the release binary and the convergence driver unless told not to.
build_beacon() {
    [ -n "${NO_BUILD:-}" ] && return 0
    log "cargo build --release (beacon, convergence driver)"
    (cd "$ROOT" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release --quiet --bin beacon --example convergence) >&2 ||
        (cd "$ROOT" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release --quiet --bin beacon) >&2
}

# beacon_config FILE DNS_PORT ADMIN_PORT SERVICES_PATH [FORWARD]: a main
# config with health checks off (the bench data has no live endpoints).
beacon_config() {
    local file="$1" dns="$2" admin="$3" services="$4" forward="${5:-}"
    cat >"$file" <<TOML
startup_timeout = "120s"
shutdown_grace = "2s"

[dns]
listen = "127.0.0.1:$dns"
zone = "cluster.local"
ttl = 5
forward = [${forward:+\"$forward\"}]
forward_allow = ["127.0.0.0/8"]

[admin]
listen = "127.0.0.1:$admin"

[health]
kind = "none"

[[source]]
type = "file"
path = "$services"
TOML
}

# The software versions of a run, for BENCHMARKS.md.
versions() {
    {
        echo "kernel: $(uname -r)"
        echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)"
        have_beacon && echo "beacon: $("$BEACON" --version 2>/dev/null)"
        command -v knotd >/dev/null && echo "knot: $(knotd --version 2>&1 | head -1)"
        command -v unbound >/dev/null && echo "unbound: $(unbound -V 2>&1 | head -1)"
        command -v dnsmasq >/dev/null && echo "dnsmasq: $(dnsmasq --version 2>&1 | head -1)"
        command -v haproxy >/dev/null && echo "haproxy: $(haproxy -v 2>&1 | head -1)"
        command -v nginx >/dev/null && echo "nginx: $(nginx -v 2>&1 | head -1)"
        command -v dnsperf >/dev/null && echo "dnsperf: $(dnsperf -h 2>&1 | grep -m1 Version)"
        command -v iperf3 >/dev/null && echo "iperf3: $(iperf3 --version 2>&1 | head -1)"
        command -v wrk >/dev/null && echo "wrk: $(wrk -v 2>&1 | head -1)"
    } 2>/dev/null
}
