#!/usr/bin/env bash
# DNS load bench: the same generated zone (DNS_SERVICES services x
# DNS_ENDPOINTS endpoints) served by beacon, knot, unbound and dnsmasq, one
# server at a time, queried by dnsperf over UDP on 127.0.0.1.
#
# Per server: saturated runs of DNS_SECS seconds for service A (hit),
# NXDOMAIN and SRV queries (qps, average latency, lost, server CPU per
# answered query from /proc), and a run at a fixed DNS_LAT_QPS rate for the
# latency distribution (p50/p99). Forwarding: beacon and unbound forward a
# cache-hot name set to the same local upstream (knot).
#
# Servers run in DNS_ROUNDS rounds (default 1), alternating (beacon, knot,
# unbound, dnsmasq, beacon, ...); report.py prints each cell's median.
#
#   benches/load/dns.sh            # about 2.5 minutes a round
#   DNS_SECS=10 DNS_ROUNDS=3 benches/load/dns.sh
#   DNS_SERVERS="beacon-b1 beacon-b4 beacon beacon-b64 knot" benches/load/dns.sh
#                                  # beacon-b<N>: beacon with [dns] udp_batch = N
#   DNS_TCP=1 BEACON_ALT=/other/beacon DNS_SERVERS="beacon beacon-alt knot" benches/load/dns.sh
#                                  # adds pipelined TCP (tcp-hit); beacon-alt: a second build
. "$(dirname "$0")/common.sh"

need dnsperf:dnsperf knotd:knot unbound:unbound dnsmasq:dnsmasq dig:bind9-dnsutils python3:python3

N="${DNS_SERVICES:-10000}"
K="${DNS_ENDPOINTS:-3}"
SECS="${DNS_SECS:-5}"
LAT_QPS="${DNS_LAT_QPS:-10000}"
SERVERS="${DNS_SERVERS:-beacon knot unbound dnsmasq}"
ROUNDS="${DNS_ROUNDS:-1}"
DATA="$WORK/dns"
LAST_NAME="svc-$((N - 1)).default.svc.cluster.local"

log "dns: generating $N services x $K endpoints"
python3 "$LOAD_DIR/gen_zone.py" --services "$N" --endpoints "$K" --out "$DATA"

# --- the upstream for forwarding runs: knot serving upstream.test ---
UP_PORT=$(free_port)
mkdir -p "$DATA/knot-up"
cat >"$DATA/knot-up.conf" <<CONF
server:
    listen: 127.0.0.1@$UP_PORT
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
    rundir: $DATA/knot-up
database:
    storage: $DATA/knot-up
log:
  - target: stderr
    any: warning
zone:
  - domain: upstream.test
    file: $DATA/upstream.zone
    journal-content: none
    zonefile-sync: -1
CONF
start knot-upstream knotd -c "$DATA/knot-up.conf"
UP_PID=$LAST_PID
wait_dns "$UP_PORT" host-1.upstream.test

# --- one server at a time ---
start_server() { # NAME PORT -> sets SERVER_PID; knows how to start each one
    local name="$1" port="$2"
    case "$name" in
    beacon | beacon-b* | beacon-alt)
        local bin="$BEACON"
        if [ "$name" = beacon-alt ]; then
            bin="${BEACON_ALT:?set BEACON_ALT to the other beacon binary}"
        fi
        beacon_config "$DATA/beacon.toml" "$port" "$(free_port)" "$DATA/services" "127.0.0.1:$UP_PORT"
        if [[ "$name" == beacon-b* ]]; then
            # beacon-b<N>: [dns] udp_batch = N (the batch-size tuning rows).
            sed -i "s/^\[dns\]\$/[dns]\nudp_batch = ${name#beacon-b}/" "$DATA/beacon.toml"
        fi
        start "$name" env RUST_LOG=warn "$bin" run --config "$DATA/beacon.toml"
        ;;
    knot)
        mkdir -p "$DATA/knot"
        cat >"$DATA/knot.conf" <<CONF
server:
    listen: 127.0.0.1@$port
    udp-workers: 2
    tcp-workers: 1
    background-workers: 1
    rundir: $DATA/knot
database:
    storage: $DATA/knot
log:
  - target: stderr
    any: warning
zone:
  - domain: cluster.local
    file: $DATA/knot.zone
    journal-content: none
    zonefile-sync: -1
CONF
        start knot knotd -c "$DATA/knot.conf"
        ;;
    unbound)
        cat >"$DATA/unbound.conf" <<CONF
server:
    interface: 127.0.0.1
    port: $port
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
    do-not-query-localhost: no
    num-queries-per-thread: 4096
    outgoing-range: 8192
    msg-cache-size: 64m
    rrset-cache-size: 128m
    # test. is an RFC 6761 local zone unbound answers itself (NXDOMAIN)
    # unless told not to: without this the forward row never forwarded.
    local-zone: "test." nodefault
include: "$DATA/unbound-local.conf"
forward-zone:
    name: "."
    forward-addr: 127.0.0.1@$UP_PORT
remote-control:
    control-enable: no
CONF
        start unbound unbound -d -c "$DATA/unbound.conf"
        ;;
    dnsmasq)
        cat "$DATA/dnsmasq.conf" >"$DATA/dnsmasq-run.conf"
        cat >>"$DATA/dnsmasq-run.conf" <<CONF
port=$port
listen-address=127.0.0.1
bind-interfaces
no-resolv
no-hosts
addn-hosts=$DATA/dnsmasq.hosts
local=/cluster.local/
local-ttl=5
cache-size=10000
dns-forward-max=1000
user=root
group=root
pid-file=
CONF
        start dnsmasq dnsmasq -k --conf-file="$DATA/dnsmasq-run.conf"
        ;;
    esac
    SERVER_PID=$LAST_PID
}

# run_dnsperf SERVER TEST PORT QUERYFILE [dnsperf args...]: one saturated run.
run_dnsperf() {
    local server="$1" test="$2" port="$3" qf="$4"; shift 4
    local out="$WORK/dnsperf-$server-$test.txt" c0 c1
    c0=$(cpu_ticks "$SERVER_PID")
    dnsperf -s 127.0.0.1 -p "$port" -d "$qf" -l "$SECS" -c 4 -T 1 -q 500 -t 2 "$@" >"$out" 2>&1 || true
    c1=$(cpu_ticks "$SERVER_PID")
    record_dnsperf "$server" "$test" $((c1 - c0)) "$out"
}

# run_latency SERVER PORT: fixed rate, every query's latency -> p50/p99.
run_latency() {
    local server="$1" port="$2" out="$WORK/dnsperf-$server-lat.txt"
    dnsperf -s 127.0.0.1 -p "$port" -d "$DATA/q-hit.txt" -l 3 -Q "$LAT_QPS" -c 4 -T 1 -t 2 -v >"$out" 2>&1 || true
    grep '^> ' "$out" | awk '{print $NF * 1e6}' | sort -n | awk -v server="$server" '
        { v[NR] = $1 }
        END {
            if (NR == 0) exit
            printf "dns\tlatency@'"$LAT_QPS"'qps\t%s\tp50_us\t%.0f\n", server, v[int(NR * 0.50) + 1]
            printf "dns\tlatency@'"$LAT_QPS"'qps\t%s\tp99_us\t%.0f\n", server, v[int(NR * 0.99) + 1]
        }' >>"$RESULTS_TSV"
}

for round in $(seq "$ROUNDS"); do
log "dns: round $round of $ROUNDS"
for server in $SERVERS; do
    if [[ "$server" == beacon* ]] && ! have_beacon; then
        log "dns: no beacon binary at $BEACON; skipping beacon"
        continue
    fi
    port=$(free_port)
    t0=$(date +%s.%N)
    start_server "$server" "$port"
    wait_dns "$port" "$LAST_NAME" A 120
    t1=$(date +%s.%N)
    record dns startup "$server" load_s "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')"
    record dns startup "$server" rss_mb "$(($(rss_kb "$SERVER_PID") / 1024))"
    log "dns: $server on 127.0.0.1:$port (pid $SERVER_PID)"
    # Warm-up: one pass over the hit names.
    dnsperf -s 127.0.0.1 -p "$port" -d "$DATA/q-hit.txt" -n 1 -q 200 >/dev/null 2>&1 || true
    run_dnsperf "$server" hit "$port" "$DATA/q-hit.txt"
    run_dnsperf "$server" nxdomain "$port" "$DATA/q-nx.txt"
    run_dnsperf "$server" srv "$port" "$DATA/q-srv.txt"
    run_latency "$server" "$port"
    if [ -n "${DNS_TCP:-}" ]; then
        # Pipelined TCP: 4 connections, 500 queries in flight over them.
        run_dnsperf "$server" tcp-hit "$port" "$DATA/q-hit.txt" -m tcp
    fi
    if [ "$server" = beacon ] || [ "$server" = unbound ]; then
        # (the beacon-b<N> tuning rows skip forwarding: not a UDP-loop path)
        # Only the upstream knows upstream.test: an address proves a real forward.
        fwd=$(dig +short +time=2 +tries=1 @127.0.0.1 -p "$port" host-1.upstream.test A)
        if [ -z "$fwd" ]; then
            log "dns: $server does not forward host-1.upstream.test to the upstream"
            exit 1
        fi
        dnsperf -s 127.0.0.1 -p "$port" -d "$DATA/q-fwd.txt" -n 2 -q 100 >/dev/null 2>&1 || true
        run_dnsperf "$server" forward "$port" "$DATA/q-fwd.txt"
    fi
    stop "$SERVER_PID"
done
done
stop "$UP_PID"
log "dns: done"
[ -n "${ALL_RUN:-}" ] || python3 "$LOAD_DIR/report.py" "$RESULTS_TSV"
