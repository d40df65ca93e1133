#!/usr/bin/env bash
# The main job on the embedded corpus (Python's own docs; no download, no data files):
# trains the reference early-exit model, then sweeps confidence thresholds.
#   bash scripts/demo.sh [workdir]    (default: a new runs/demo-<time>; nothing is overwritten)
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
WORKDIR="${1:-runs/demo-$(date +%Y%m%d-%H%M%S)}"
deepexit-train --config=experiments/configs/demo.py --workdir="$WORKDIR" --alsologtostderr
if command -v deepexit-sweep >/dev/null; then
  deepexit-sweep --checkpoint="$WORKDIR" --thresholds=0:1:0.1 --out="$WORKDIR/sweep"
  cat "$WORKDIR/sweep/sweep.md"
fi
