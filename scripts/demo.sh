#!/usr/bin/env bash
# `make demo`: the whole pipeline on the toy benchmark with the bundled toy CLIP.
# Usage: scripts/demo.sh [NEGALIGN_BIN] [OUT_DIR]
set -euo pipefail
NEGALIGN=${1:-negalign}
OUT=${2:-demo-output}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
"$NEGALIGN" demo --out "$OUT"
echo
echo "Next: open $OUT/report/report.html (method table, λ curve, ROC, histograms, CAM grid, provenance);"
echo "CAM overlays of ID and OOD images are in $OUT/viz/<set>/, the raw figures in $OUT/results/;"
echo "run it again to see every stage served from the cache; 'negalign sanity' checks one image."
