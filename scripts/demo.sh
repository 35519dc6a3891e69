#!/usr/bin/env bash
# `make demo`: the whole pipeline on the toy benchmark with the bundled toy CLIP.
# Usage: scripts/demo.sh [NEGALIGN_BIN] [OUT_DIR]
set -euo pipefail
NEGALIGN=${1:-negalign}
OUT=${2:-demo-output}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
"$NEGALIGN" demo --out "$OUT"
echo
echo "Next: look at $OUT/viz/*.png (CAM overlays), $OUT/results/roc.png, $OUT/results/score_hist.png;"
echo "run it again to see every stage served from the cache; 'negalign sanity' checks one image."
