#!/usr/bin/env bash
# Convergence at scale (10k services x 10 endpoints): time from a
# one-endpoint change to DNS answering it and the proxy routing by it,
# p50/p99 over CONV_CHANGES changes, (i) from the registry receiving the
# update (in process) and (ii) end to end from renaming one services file
# into the watched directory. Also the first full sync and the RSS.
# Driver: benches/load/convergence.rs (`--example convergence`).
#
#   benches/load/convergence.sh    # about 30 seconds
. "$(dirname "$0")/common.sh"

need python3:python3
SERVICES="${CONV_SERVICES:-10000}"
ENDPOINTS="${CONV_ENDPOINTS:-10}"
CHANGES="${CONV_CHANGES:-100}"

if [ ! -x "$CONVERGENCE" ] || ! have_beacon; then
    log "convergence: needs $CONVERGENCE and $BEACON (cargo build --release --bin beacon --example convergence)"
    exit 1
fi
for mode in inproc e2e; do
    log "convergence: $mode, $SERVICES services x $ENDPOINTS endpoints, $CHANGES changes"
    "$CONVERGENCE" "$mode" --beacon "$BEACON" --services "$SERVICES" --endpoints "$ENDPOINTS" \
        --changes "$CHANGES" 2>"$WORK/convergence-$mode.log" >>"$RESULTS_TSV" ||
        { cat "$WORK/convergence-$mode.log" >&2; exit 1; }
    cat "$WORK/convergence-$mode.log" >&2
done
log "convergence: done"
[ -n "${ALL_RUN:-}" ] || python3 "$LOAD_DIR/report.py" "$RESULTS_TSV"
