#!/usr/bin/env bash
# Runs every load bench (DNS, L4, memory, convergence, kubernetes) in one go and prints
# the side-by-side tables; writes the charts to benches/results/ and the raw
# results to benches/results/results.tsv. About 8 minutes on 2 cores after
# the release build.
#
#   benches/load/all.sh
#   NO_BUILD=1 benches/load/all.sh          # use the binaries already built
#   AREAS="dns l4" benches/load/all.sh      # a subset
. "$(dirname "$0")/common.sh"

AREAS="${AREAS:-dns l4 memory convergence kubernetes}"
mkdir -p "$RESULTS_DIR"
export RESULTS_TSV="$RESULTS_DIR/results.tsv" ALL_RUN=1
: >"$RESULTS_TSV"
build_beacon
have_beacon || log "all: no beacon binary at $BEACON; peers only"

t0=$(date +%s)
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$RESULTS_DIR/run.txt"
for area in $AREAS; do
    a0=$(date +%s)
    "$LOAD_DIR/$area.sh" || log "all: $area failed (exit $?)"
    echo "$area: $(($(date +%s) - a0)) s" >>"$RESULTS_DIR/run.txt"
done
{
    echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "total: $(($(date +%s) - t0)) s"
    versions
} >>"$RESULTS_DIR/run.txt"
python3 "$LOAD_DIR/report.py" "$RESULTS_TSV" --charts "$RESULTS_DIR" | tee "$RESULTS_DIR/tables.md"
cat "$RESULTS_DIR/run.txt"
