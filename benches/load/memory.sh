#!/usr/bin/env bash
# Memory per idle proxied connection: MEM_CONNS (5,000) connections held
# open through beacon, HAProxy and nginx stream to an echo backend, one
# round trip each; RSS growth (VmRSS, workers included) / connections.
#
#   benches/load/memory.sh         # about 40 seconds
. "$(dirname "$0")/common.sh"

need haproxy:haproxy nginx:nginx python3:python3
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need __nginx_stream__:libnginx-mod-stream

N="${MEM_CONNS:-5000}"
TARGETS="${MEM_TARGETS:-beacon haproxy nginx}"
D="$WORK/mem"
mkdir -p "$D/nginx"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" -lt $((2 * N + 1000)) ]; then
    log "memory: open-file limit $(ulimit -n) is low for $N connections through a proxy"
fi

ECHO_PORT=$(free_port)
start echo-backend python3 "$LOAD_DIR/idle.py" serve 127.0.0.21 "$ECHO_PORT"
wait_tcp 127.0.0.21 "$ECHO_PORT"

measure() { # NAME PORT PID
    local name="$1" port="$2" pid="$3" line
    line=$(python3 "$LOAD_DIR/idle.py" hold 127.0.0.1 "$port" "$N" "$pid")
    log "memory: $name: $line"
    set -- $line
    record memory "idle$N" "$name" held "$2"
    record memory "idle$N" "$name" kb_per_conn "${8}"
    record memory "idle$N" "$name" rss_mb "$(($6 / 1024))"
}

for target in $TARGETS; do
    port=$(free_port)
    case "$target" in
    beacon | beacon-splice)
        if ! have_beacon; then log "memory: no beacon binary at $BEACON; skipping"; continue; fi
        splice=auto
        [ "$target" = beacon-splice ] && splice=always
        cat >"$D/services.toml" <<TOML
[[service]]
name = "echo"
  [[service.port]]
  name = "echo"
  port = 7
  target_port = $ECHO_PORT
  listen = "127.0.0.1:$port"
  [[service.endpoint]]
  ip = "127.0.0.21"
  [service.health]
  kind = "none"
TOML
        cat >"$D/beacon.toml" <<TOML
startup_timeout = "5s"
shutdown_grace = "1s"
[dns]
enabled = false
[admin]
enabled = false
[health]
kind = "none"
[proxy]
splice = "$splice"
[[source]]
type = "file"
path = "services.toml"
TOML
        start beacon env RUST_LOG=warn "$BEACON" run --config "$D/beacon.toml"
        ;;
    haproxy)
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
frontend echo
    bind 127.0.0.1:$port
    default_backend echo
backend echo
    server s1 127.0.0.21:$ECHO_PORT
CONF
        start haproxy haproxy -db -f "$D/haproxy.cfg"
        ;;
    nginx)
        cat >"$D/nginx.conf" <<CONF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 2;
daemon off;
pid $D/nginx/nginx.pid;
error_log $D/nginx/error.log warn;
events { worker_connections 9000; }
stream {
    server { listen 127.0.0.1:$port reuseport; proxy_pass 127.0.0.21:$ECHO_PORT; }
}
CONF
        start nginx-stream nginx -e "$D/nginx/error.log" -c "$D/nginx.conf"
        ;;
    *) continue ;;
    esac
    pid=$LAST_PID
    wait_tcp 127.0.0.1 "$port"
    measure "$target" "$port" "$pid"
    stop "$pid"
    sleep 1
done
log "memory: done"
[ -n "${ALL_RUN:-}" ] || python3 "$LOAD_DIR/report.py" "$RESULTS_TSV"
