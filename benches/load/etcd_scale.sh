#!/usr/bin/env bash
# etcd scale bench (issue 12): a 3-member etcd on loopback (fsync on, data in
# /tmp), N publishing beacon nodes x E endpoints, then a new watch-only node:
# its first sync, every node's VmRSS, and one change's propagation p50/p99.
#
#   BEACON=target/release/beacon benches/load/etcd_scale.sh [--nodes 10] \
#       [--endpoints 10000] [--per-service 10] [--changes 100] [--keep]
#
# Debug size first: --nodes 3 --endpoints 1000. Prints one JSON line of
# results on stdout; progress (with load averages) on stderr.
. "$(dirname "$0")/common.sh"
need etcd:etcd-server etcdctl:etcd-client
[ -x "$BEACON" ] || { log "no beacon binary at $BEACON (set BEACON=... or build release)"; exit 1; }
log "$(versions | tr '\n' ';')"
log "etcd: $(etcd --version 2>/dev/null | head -1)"
python3 "$LOAD_DIR/etcd_scale.py" --beacon "$BEACON" "$@"
