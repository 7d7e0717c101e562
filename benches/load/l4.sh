#!/usr/bin/env bash
# L4 proxy load bench: bulk throughput (iperf3), new-connection rate (wrk
# with `Connection: close`) and keep-alive request rate (wrk), direct to the
# backends (the limit) and through beacon, HAProxy (tcp mode, splice) and
# nginx stream, then beacon with each balancing policy; UDP datagrams/s and
# round trips (udp_load: 32 flows, one datagram in flight each) through
# beacon's and nginx stream's UDP proxies to echo backends.
#
# Backends: nginx (1 worker, `return 200`) on 127.0.0.11-13, an iperf3
# server on 127.0.0.11, udp_load echo on 127.0.0.11-13. Proxies get two
# threads/processes each. Targets run in L4_ROUNDS rounds, alternating
# (direct, beacon, haproxy, nginx, direct, beacon, ...): the report gives
# each cell's median over the rounds. `beacon-splice` is beacon with
# `[proxy] splice = "always"` (splice from the first byte, the old path).
#
#   benches/load/l4.sh             # about 5 minutes (3 rounds)
#   L4_SECS=10 L4_ROUNDS=5 benches/load/l4.sh
. "$(dirname "$0")/common.sh"

need haproxy:haproxy nginx:nginx iperf3:iperf3 wrk:wrk python3:python3
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need __nginx_stream__:libnginx-mod-stream

SECS="${L4_SECS:-5}"
CONNS="${L4_CONNS:-32}"
TARGETS="${L4_TARGETS:-direct beacon beacon-splice haproxy nginx}"
ROUNDS="${L4_ROUNDS:-3}"
UDP_LOAD="${UDP_LOAD:-$TARGET_DIR/release/examples/udp_load}"
if [ ! -x "$UDP_LOAD" ]; then
    log "cargo build --release --example udp_load"
    (cd "$ROOT" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release --quiet --example udp_load) >&2
fi
POLICIES="${L4_POLICIES:-least_conn p2c maglev random}"
D="$WORK/l4"
mkdir -p "$D/nginx-backend" "$D/nginx-stream"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

HTTP_PORT=$(free_port)   # backends' http port on 127.0.0.11-13
BULK_PORT=$(free_port)   # iperf3 on 127.0.0.11
UDP_PORT=$(free_port)    # udp_load echo on 127.0.0.11-13

# --- backends ---
cat >"$D/nginx-backend.conf" <<CONF
worker_processes 1;
daemon off;
pid $D/nginx-backend/nginx.pid;
error_log $D/nginx-backend/error.log warn;
events { worker_connections 20000; }
http {
    access_log off;
    client_body_temp_path $D/nginx-backend;
    proxy_temp_path $D/nginx-backend;
    fastcgi_temp_path $D/nginx-backend;
    uwsgi_temp_path $D/nginx-backend;
    scgi_temp_path $D/nginx-backend;
    keepalive_requests 10000000;
    server {
        listen 127.0.0.11:$HTTP_PORT;
        listen 127.0.0.12:$HTTP_PORT;
        listen 127.0.0.13:$HTTP_PORT;
        location / { return 200 "ok\n"; }
    }
}
CONF
start nginx-backend nginx -e "$D/nginx-backend/error.log" -c "$D/nginx-backend.conf"
BACKEND_PID=$LAST_PID
start iperf3-server iperf3 -s -B 127.0.0.11 -p "$BULK_PORT"
IPERF_PID=$LAST_PID
start udp-echo "$UDP_LOAD" echo "127.0.0.11:$UDP_PORT" "127.0.0.12:$UDP_PORT" "127.0.0.13:$UDP_PORT"
UDP_ECHO_PID=$LAST_PID
wait_tcp 127.0.0.13 "$HTTP_PORT"
wait_tcp 127.0.0.11 "$BULK_PORT"

# --- measurement ---
# run_target NAME HTTP_ADDR BULK_ADDR|- PID [UDP_ADDR]: the CPU of PID and
# its children is charged per request (for `direct`, the backend's).
run_target() {
    local name="$1" http="$2" bulk="$3" pid="$4" udp="${5:-}" out c0 c1
    out="$WORK/iperf-$name.json"
    if [ "$bulk" != - ]; then
        iperf3 -c "${bulk%:*}" -p "${bulk##*:}" -t "$SECS" -J >"$out" 2>&1 || true
        python3 - "$out" "$name" >>"$RESULTS_TSV" <<'PY' || log "iperf3 $name failed: $(head -c 300 "$out")"
import json, sys
d = json.load(open(sys.argv[1]))
print(f"l4\tbulk\t{sys.argv[2]}\tgbps\t{d['end']['sum_received']['bits_per_second'] / 1e9:.2f}")
PY
    fi
    for mode in close keepalive; do
        out="$WORK/wrk-$name-$mode.txt"
        local args=(-t 1 -c "$CONNS" -d "${SECS}s" --latency)
        [ "$mode" = close ] && args+=(-H "Connection: close")
        c0=$(cpu_ticks "$pid")
        wrk "${args[@]}" "http://$http/" >"$out" 2>&1 || true
        c1=$(cpu_ticks "$pid")
        awk -v name="$name" -v mode="$mode" -v ticks=$((c1 - c0)) -v hz="$CLK_TCK" '
            function us(s) {
                if (s ~ /us$/) return s + 0
                if (s ~ /ms$/) return s * 1000
                if (s ~ /s$/) return s * 1e6
                return s
            }
            /requests in/ { reqs = $1 }
            /Requests\/sec:/ { rps = $2 }
            /^ +99%/ { p99 = us($2) }
            /Socket errors:/ { errs = $4 + $6 + $8 + $10 }
            /Non-2xx/ { errs += $NF }
            END {
                printf "l4\t%s\t%s\trps\t%.0f\n", mode, name, rps
                printf "l4\t%s\t%s\tp99_us\t%.0f\n", mode, name, p99
                printf "l4\t%s\t%s\terrors\t%d\n", mode, name, errs
                if (reqs > 0) printf "l4\t%s\t%s\tcpu_us_per_req\t%.2f\n", mode, name, ticks / hz / reqs * 1e6
            }' "$out" >>"$RESULTS_TSV"
    done
    if [ -n "$udp" ]; then
        c0=$(cpu_ticks "$pid")
        "$UDP_LOAD" run "$name" "$udp" --flows "$CONNS" --seconds "$SECS" >"$WORK/udp-$name.tsv" 2>&1 || true
        c1=$(cpu_ticks "$pid")
        cat "$WORK/udp-$name.tsv" >>"$RESULTS_TSV"
        # (direct: the echo backends' CPU is not the proxy's; no CPU row)
        [ "$name" = direct ] || awk -v name="$name" -v ticks=$((c1 - c0)) -v hz="$CLK_TCK" -v secs="$SECS" '
            $4 == "dps" && $5 > 0 { printf "l4\tudp\t%s\tcpu_us_per_dgram\t%.2f\n", name, ticks / hz / ($5 * secs) * 1e6 }
        ' "$WORK/udp-$name.tsv" >>"$RESULTS_TSV"
    fi
}

beacon_services() { # FILE: one service per policy plus the bulk service
    local file="$1" policy port
    : >"$file"
    for policy in round_robin $POLICIES; do
        port=$(free_port)
        echo "$policy $port" >>"$D/beacon-ports"
        cat >>"$file" <<TOML
[[service]]
name = "web-${policy//_/-}"
balance = "$policy"
  [[service.port]]
  name = "http"
  port = 80
  target_port = $HTTP_PORT
  listen = "127.0.0.1:$port"
  [[service.endpoint]]
  ip = "127.0.0.11"
  [[service.endpoint]]
  ip = "127.0.0.12"
  [[service.endpoint]]
  ip = "127.0.0.13"
  [service.health]
  kind = "none"

TOML
    done
    port=$(free_port)
    echo "udp $port" >>"$D/beacon-ports"
    cat >>"$file" <<TOML
[[service]]
name = "echo"
  [[service.port]]
  name = "echo"
  port = 7
  protocol = "udp"
  target_port = $UDP_PORT
  listen = "127.0.0.1:$port"
  [[service.endpoint]]
  ip = "127.0.0.11"
  [[service.endpoint]]
  ip = "127.0.0.12"
  [[service.endpoint]]
  ip = "127.0.0.13"
  [service.health]
  kind = "none"

TOML
    port=$(free_port)
    echo "bulk $port" >>"$D/beacon-ports"
    cat >>"$file" <<TOML
[[service]]
name = "bulk"
  [[service.port]]
  name = "iperf"
  port = 5201
  target_port = $BULK_PORT
  listen = "127.0.0.1:$port"
  [[service.endpoint]]
  ip = "127.0.0.11"
  [service.health]
  kind = "none"
TOML
}

for round in $(seq "$ROUNDS"); do
for target in $TARGETS; do
    log "l4: round $round of $ROUNDS"
    case "$target" in
    direct)
        log "l4: direct"
        run_target direct "127.0.0.11:$HTTP_PORT" "127.0.0.11:$BULK_PORT" "$BACKEND_PID" "127.0.0.11:$UDP_PORT"
        ;;
    beacon | beacon-splice)
        if ! have_beacon; then log "l4: no beacon binary at $BEACON; skipping"; continue; fi
        splice=auto
        [ "$target" = beacon-splice ] && splice=always
        : >"$D/beacon-ports"
        beacon_services "$D/services.toml"
        cat >"$D/beacon.toml" <<TOML
startup_timeout = "5s"
shutdown_grace = "1s"
[dns]
enabled = false
[admin]
listen = "127.0.0.1:$(free_port)"
[health]
kind = "none"
[proxy]
max_connections = 100000
splice = "$splice"
[[source]]
type = "file"
path = "services.toml"
TOML
        start beacon env RUST_LOG=warn "$BEACON" run --config "$D/beacon.toml"
        pid=$LAST_PID
        rr=$(awk '$1 == "round_robin" {print $2}' "$D/beacon-ports")
        bulk=$(awk '$1 == "bulk" {print $2}' "$D/beacon-ports")
        udp=$(awk '$1 == "udp" {print $2}' "$D/beacon-ports")
        wait_tcp 127.0.0.1 "$rr"
        wait_tcp 127.0.0.1 "$bulk"
        log "l4: $target (pid $pid)"
        run_target "$target" "127.0.0.1:$rr" "127.0.0.1:$bulk" "$pid" "127.0.0.1:$udp"
        # The policies once, in the first round (their own pick costs are
        # in the micro benches).
        if [ "$target" = beacon ] && [ "$round" = 1 ]; then
            for policy in $POLICIES; do
                port=$(awk -v p="$policy" '$1 == p {print $2}' "$D/beacon-ports")
                log "l4: beacon balance=$policy"
                run_target "beacon-$policy" "127.0.0.1:$port" - "$pid"
            done
        fi
        stop "$pid"
        ;;
    haproxy)
        hp=$(free_port); hb=$(free_port)
        cat >"$D/haproxy.cfg" <<CONF
global
    maxconn 7000
    nbthread 2
defaults
    mode tcp
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    option splice-auto
frontend web
    bind 127.0.0.1:$hp
    default_backend web
backend web
    balance roundrobin
    server s1 127.0.0.11:$HTTP_PORT
    server s2 127.0.0.12:$HTTP_PORT
    server s3 127.0.0.13:$HTTP_PORT
frontend bulk
    bind 127.0.0.1:$hb
    default_backend bulk
backend bulk
    server s1 127.0.0.11:$BULK_PORT
CONF
        start haproxy haproxy -db -f "$D/haproxy.cfg"
        pid=$LAST_PID
        wait_tcp 127.0.0.1 "$hp"
        log "l4: haproxy (pid $pid)"
        run_target haproxy "127.0.0.1:$hp" "127.0.0.1:$hb" "$pid"
        stop "$pid"
        ;;
    nginx)
        np=$(free_port); nb=$(free_port); nu=$(free_port)
        cat >"$D/nginx-stream.conf" <<CONF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 2;
daemon off;
pid $D/nginx-stream/nginx.pid;
error_log $D/nginx-stream/error.log warn;
events { worker_connections 20000; }
stream {
    upstream web { server 127.0.0.11:$HTTP_PORT; server 127.0.0.12:$HTTP_PORT; server 127.0.0.13:$HTTP_PORT; }
    upstream bulk { server 127.0.0.11:$BULK_PORT; }
    upstream echo { server 127.0.0.11:$UDP_PORT; server 127.0.0.12:$UDP_PORT; server 127.0.0.13:$UDP_PORT; }
    server { listen 127.0.0.1:$np reuseport; proxy_pass web; }
    server { listen 127.0.0.1:$nu udp reuseport; proxy_pass echo; }
    server { listen 127.0.0.1:$nb; proxy_pass bulk; }
}
CONF
        start nginx-stream nginx -e "$D/nginx-stream/error.log" -c "$D/nginx-stream.conf"
        pid=$LAST_PID
        wait_tcp 127.0.0.1 "$np"
        log "l4: nginx stream (pid $pid)"
        run_target nginx "127.0.0.1:$np" "127.0.0.1:$nb" "$pid" "127.0.0.1:$nu"
        stop "$pid"
        ;;
    esac
done
done
log "l4: done"
[ -n "${ALL_RUN:-}" ] || python3 "$LOAD_DIR/report.py" "$RESULTS_TSV"
