#!/usr/bin/env bash
# Propagation through etcd (issue 12): an endpoint change on node a to the
# DNS answer on node c, p50/p99 over ETCD_CHANGES changes (default 200), a
# 3-member etcd cluster on loopback with fsync on (etcd's default), both
# nodes release binaries. Driver: benches/load/etcd.py.
#
#   benches/load/etcd.sh                                   # about 30 seconds
#   BEACON=target/x86_64-unknown-linux-gnu/release/beacon benches/load/etcd.sh
. "$(dirname "$0")/common.sh"

need python3:python3 etcd:etcd-server etcdctl:etcd-client
CHANGES="${ETCD_CHANGES:-200}"

if ! have_beacon; then
    log "etcd: needs $BEACON (cargo build --release --bin beacon)"
    exit 1
fi
log "etcd: $CHANGES changes, node a -> node c, 3 members (fsync on); load $(cut -d' ' -f1-3 /proc/loadavg)"
python3 "$LOAD_DIR/etcd.py" --beacon "$BEACON" --changes "$CHANGES" \
    2>"$WORK/etcd.log" >>"$RESULTS_TSV" ||
    { cat "$WORK/etcd.log" >&2; exit 1; }
cat "$WORK/etcd.log" >&2
log "etcd: done; load $(cut -d' ' -f1-3 /proc/loadavg)"
[ -n "${ALL_RUN:-}" ] || python3 "$LOAD_DIR/report.py" "$RESULTS_TSV"
