#!/usr/bin/env bash
# The main job on the embedded corpus (Python's own docs; no download, no data files):
# trains the reference early-exit model, then sweeps confidence thresholds.
#   bash scripts/demo.sh [workdir]    (default: a new runs/demo-<time>; nothing is overwritten)
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
WORKDIR="${1:-runs/demo-$(date +%Y%m%d-%H%M%S)}"
deepexit-train --config=experiments/configs/demo.py --workdir="$WORKDIR" --alsologtostderr
deepexit-sweep --checkpoint="$WORKDIR" --thresholds=0:1:0.1 --out="$WORKDIR/sweep"
echo; echo "Self-speculative decoding (layers 1-2 draft, 3-4 verify; lossless):"
deepexit-generate --checkpoint="$WORKDIR" --prompt="The return value of " \
    --max_new_tokens=96 --speculative --draft_layer=2 --draft_len=4
cat <<'LEGEND'

How to read this: each row is a confidence threshold. A token stops at layer 2
when its top next-character probability there is >= the threshold, else it runs
all 4 layers. PPL is validation perplexity (lower is better); Shallow Exit % is
the share of tokens that stopped at layer 2; Compute % is mean layers run / 4;
FLOPs % also counts the exit check. "oracle" lets later tokens see full-depth
states of exited tokens (optimistic); "copy" is what a real decoder can do.
The plot is sweep.png beside the tables. The speculative lines: the generated
text is exactly full-depth greedy decoding's; acceptance is the share of drafted
tokens the full model agreed with, and the speedup is wall time against
full-depth decoding of the same prompt. Real experiments: README.md.
LEGEND
