#!/usr/bin/env bash
# DNS over TLS and over HTTPS: beacon (its own DoT and DoH listeners)
# beside unbound's TLS and HTTPS listeners (Debian's unbound is
# built with libnghttp2; knot 3.2 has no DoT server), both serving the same
# generated zone from memory with one certificate the bench makes.
#
# DoT: dnsperf -m dot at saturation (DNS_TLS_CLIENTS connections, 800
# queries in flight) for DNS_SECS seconds over the hit names. DoH: h2load
# (nghttp2), DNS_TLS_CLIENTS HTTP/2 connections with 16 streams each:
# GET over 1,000 hit names (`?dns=` base64url), POST of one hit name.
# dnsperf's own DoH mode cannot measure an HTTP/2 server that sends the
# HEADERS of several streams before their DATA, as hyper's h2 does (its
# client keeps one response's state per connection, not per stream, and
# counts the rest as lost); h2load handles streams properly.
# Per run: qps, average latency, lost/failed queries, server CPU per
# answered query. Rounds alternate beacon, unbound, beacon, ...
# (DNS_TLS_ROUNDS, default 3) and report.py prints the medians.
#
#   benches/load/dns_tls.sh              # about 1.5 minutes
#   DNS_TLS_ROUNDS=5 DNS_SECS=10 benches/load/dns_tls.sh
#   BEACON_ALT=/path/to/other/beacon DNS_TLS_SERVERS="beacon beacon-alt unbound" \
#       benches/load/dns_tls.sh          # a second beacon build in the same rounds
. "$(dirname "$0")/common.sh"

need dnsperf:dnsperf h2load:nghttp2-client unbound:unbound openssl:openssl kdig:knot-dnsutils python3:python3

N="${DNS_SERVICES:-10000}"
K="${DNS_ENDPOINTS:-3}"
SECS="${DNS_SECS:-5}"
ROUNDS="${DNS_TLS_ROUNDS:-3}"
SERVERS="${DNS_TLS_SERVERS:-beacon unbound}"
CLIENTS="${DNS_TLS_CLIENTS:-8}"
DATA="$WORK/dns"
LAST_NAME="svc-$((N - 1)).default.svc.cluster.local"

have_beacon || { log "dns_tls: no beacon binary at $BEACON (cargo build --release)"; exit 1; }

log "dns_tls: generating $N services x $K endpoints"
python3 "$LOAD_DIR/gen_zone.py" --services "$N" --endpoints "$K" --out "$DATA"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
    -keyout "$DATA/key.pem" -out "$DATA/cert.pem" >/dev/null 2>&1

# The DoH request URIs and POST body, from the hit names.
python3 - "$DATA" <<'PY'
import base64, struct, sys
data = sys.argv[1]
def query(name):
    qname = b"".join(bytes([len(l)]) + l.encode() for l in name.rstrip(".").split(".")) + b"\0"
    return struct.pack(">HHHHHH", 0, 0x0100, 1, 0, 0, 0) + qname + struct.pack(">HH", 1, 1)
names = [line.split()[0] for line in open(f"{data}/q-hit.txt")][:1000]
with open(f"{data}/doh-get.txt", "w") as f:
    for n in names:
        f.write("/dns-query?dns=" + base64.urlsafe_b64encode(query(n)).decode().rstrip("=") + "\n")
open(f"{data}/doh-post.bin", "wb").write(query(names[0]))
PY

start_server() { # NAME DOT_PORT DOH_PORT -> SERVER_PID
    local name="$1" dot="$2" doh="$3"
    case "$name" in
    beacon | beacon-alt)
        local bin="$BEACON"
        if [ "$name" = beacon-alt ]; then
            bin="${BEACON_ALT:?set BEACON_ALT to the other beacon binary}"
        fi
        beacon_config "$DATA/beacon.toml" "$(free_port)" "$(free_port)" "$DATA/services"
        # The [dns] table is the first; the TLS keys go into it.
        python3 - "$DATA/beacon.toml" "$dot" "$doh" "$DATA" <<'PY'
import sys
path, dot, doh, data = sys.argv[1:]
s = open(path).read()
s = s.replace("[dns]\n", f'[dns]\ntls_listen = "127.0.0.1:{dot}"\nhttps_listen = "127.0.0.1:{doh}"\n'
              f'cert = "{data}/cert.pem"\nkey = "{data}/key.pem"\n', 1)
open(path, "w").write(s)
PY
        start "$name" env RUST_LOG=warn "$bin" run --config "$DATA/beacon.toml"
        ;;
    unbound)
        cat >"$DATA/unbound-tls.conf" <<CONF
server:
    interface: 127.0.0.1@$dot
    interface: 127.0.0.1@$doh
    tls-port: $dot
    https-port: $doh
    tls-service-key: "$DATA/key.pem"
    tls-service-pem: "$DATA/cert.pem"
    http-notls-downstream: no
    num-threads: 2
    so-reuseport: yes
    do-daemonize: no
    username: ""
    chroot: ""
    pidfile: ""
    directory: "$DATA"
    use-syslog: no
    logfile: ""
    verbosity: 0
    do-ip6: no
    access-control: 127.0.0.0/8 allow
    module-config: "iterator"
    num-queries-per-thread: 4096
    incoming-num-tcp: 1024
    msg-cache-size: 64m
    rrset-cache-size: 128m
include: "$DATA/unbound-local.conf"
remote-control:
    control-enable: no
CONF
        start unbound unbound -d -c "$DATA/unbound-tls.conf"
        ;;
    esac
    SERVER_PID=$LAST_PID
}

wait_tls() { # PORT NAME: until kdig gets an answer over DoT
    local port="$1" name="$2" i
    for i in $(seq 1 240); do
        if kdig @127.0.0.1 -p "$port" +tls +short +timeout=1 +retry=0 "$name" A 2>/dev/null | grep -q .; then
            return 0
        fi
        sleep 0.5
    done
    log "dns_tls: no DoT answer for $name on port $port"
    return 1
}

# run_tls SERVER TEST PORT MODE [dnsperf args]: one saturated run.
run_tls() {
    local server="$1" test="$2" port="$3" mode="$4"; shift 4
    local out="$WORK/dnsperf-$server-$test.txt" c0 c1
    c0=$(cpu_ticks "$SERVER_PID")
    dnsperf -m "$mode" -s 127.0.0.1 -p "$port" -d "$DATA/q-hit.txt" -l "$SECS" \
        -c "$CLIENTS" -T 1 -q 800 -t 2 "$@" >"$out" 2>&1 || true
    c1=$(cpu_ticks "$SERVER_PID")
    if ! grep -q 'Queries per second' "$out"; then
        log "dns_tls: dnsperf $mode against $server printed no result:"
        cat "$out" >&2
        exit 1
    fi
    record_dnsperf "$server" "$test" $((c1 - c0)) "$out"
}

# run_h2load SERVER TEST PORT [h2load args]: one saturated DoH run.
run_h2load() {
    local server="$1" test="$2" port="$3"; shift 3
    local out="$WORK/h2load-$server-$test.txt" c0 c1
    c0=$(cpu_ticks "$SERVER_PID")
    timeout $((SECS + 30)) h2load -D "$SECS" -c "$CLIENTS" -m 16 "$@" >"$out" 2>&1 || true
    c1=$(cpu_ticks "$SERVER_PID")
    if ! grep -q 'req/s' "$out"; then
        log "dns_tls: h2load $test against $server printed no result:"
        cat "$out" >&2
        exit 1
    fi
    awk -v server="$server" -v test="$test" -v ticks=$((c1 - c0)) -v hz="$CLK_TCK" '
        function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; return v * 1000 }
        /^finished in/ { qps = $4 }
        /^requests:/ { done = $8; total = $2 }
        /^status codes:/ { ok = $3 }
        /^time for request:/ { lat = ms($6) }
        END {
            cpu = ok > 0 ? ticks / hz / ok * 1e6 : 0
            lost = total > 0 ? (total - ok) / total * 100 : 0
            printf "dns\t%s\t%s\tqps\t%.0f\n", test, server, qps
            printf "dns\t%s\t%s\tavg_ms\t%.3f\n", test, server, lat
            printf "dns\t%s\t%s\tlost_pct\t%.2f\n", test, server, lost
            printf "dns\t%s\t%s\tcpu_us_per_q\t%.2f\n", test, server, cpu
        }' "$out" >>"$RESULTS_TSV"
}

for round in $(seq 1 "$ROUNDS"); do
    for server in $SERVERS; do
        dot=$(free_port)
        doh=$(free_port)
        start_server "$server" "$dot" "$doh"
        wait_tls "$dot" "$LAST_NAME"
        log "dns_tls: round $round, $server (DoT $dot, DoH $doh, pid $SERVER_PID)"
        # Both answer a zone name over DoH before the runs count.
        if ! kdig @127.0.0.1 -p "$doh" +https +short +timeout=2 "$LAST_NAME" A | grep -q .; then
            log "dns_tls: $server gave no DoH answer"
            exit 1
        fi
        run_tls "$server" dot "$dot" dot
        run_h2load "$server" doh-get "$doh" -i "$DATA/doh-get.txt" -B "https://127.0.0.1:$doh"
        run_h2load "$server" doh-post "$doh" -d "$DATA/doh-post.bin" \
            -H "content-type: application/dns-message" "https://127.0.0.1:$doh/dns-query"
        stop "$SERVER_PID"
    done
done
log "dns_tls: done"
[ -n "${ALL_RUN:-}" ] || python3 "$LOAD_DIR/report.py" "$RESULTS_TSV"
