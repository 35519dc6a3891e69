#!/usr/bin/env bash
# `make demo`: the whole pipeline on the toy benchmark with the bundled toy CLIP.
# Usage: scripts/demo.sh [NEGALIGN_BIN] [OUT_DIR] [more `negalign demo` options]
# The "Next:" lines name NEGALIGN_BIN as given (make passes .venv/bin/negalign: negalign is not on
# PATH after `make demo`), so each command runs as printed from the folder make ran in.
set -euo pipefail
NEGALIGN=${1:-negalign}
OUT=${2:-demo-output}
CACHE=${NEGALIGN_CACHE:-$OUT/cache}  # where the demo keeps its cache (negalign demo --help)
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
"$NEGALIGN" demo --out "$OUT" "${@:3}"
AGAIN="make demo"
if [ "$OUT" != demo-output ]; then AGAIN="make demo DEMO_OUT=$OUT"; fi
echo
echo "Next:"
echo "  the report: $OUT/report/report.html (open it in a browser: method table, λ curve, ROC, histograms, CAM grid, provenance)"
echo "  CAM overlays of ID and OOD images: $OUT/viz/<set>/; the raw figures: $OUT/results/"
echo "  \$ $AGAIN    # again: every stage served from the cache"
echo "  \$ $NEGALIGN sanity --cache-dir $CACHE    # one image through the whole model, with the demo's cache"
echo "  \$ $NEGALIGN --help    # every command (or 'source .venv/bin/activate' to call it as negalign)"
