#!/usr/bin/env bash
# The kubernetes source at scale (10k headless services x 10 endpoints, one
# EndpointSlice each) against a replayed API server (kubernetes.py: the list
# and chunked watch endpoints, as tests/it/kube_api.rs speaks them; no
# kube-apiserver): first sync to /readyz, convergence from a MODIFIED slice
# event written to the open watch to DNS answering the new address (p50/p99
# over K8S_CHANGES events), RSS.
#
#   benches/load/kubernetes.sh    # about 30 seconds after the release build
. "$(dirname "$0")/common.sh"

need python3:python3
SERVICES="${K8S_SERVICES:-10000}"
ENDPOINTS="${K8S_ENDPOINTS:-10}"
CHANGES="${K8S_CHANGES:-200}"

if ! have_beacon; then
    log "kubernetes: needs $BEACON (cargo build --release --bin beacon)"
    exit 1
fi
log "kubernetes: $SERVICES services x $ENDPOINTS endpoints, $CHANGES changes"
python3 "$LOAD_DIR/kubernetes.py" --beacon "$BEACON" --services "$SERVICES" \
    --endpoints "$ENDPOINTS" --changes "$CHANGES" 2>"$WORK/kubernetes.log" >>"$RESULTS_TSV" ||
    { cat "$WORK/kubernetes.log" >&2; exit 1; }
cat "$WORK/kubernetes.log" >&2
log "kubernetes: done"
[ -n "${ALL_RUN:-}" ] || python3 "$LOAD_DIR/report.py" "$RESULTS_TSV"
