#!/usr/bin/env bash
# NegAlign's WaterBirds experiment, step by step (the same steps as `make waterbirds`).
#
#   examples/waterbirds.sh /data/waterbird_complete95_forest2water2 /data/placesbg runs/waterbirds
#   MODEL=ViT-B-16 PRETRAINED=~/weights/ViT-B-16.pt DEVICE=cuda PRECISION=fp16 examples/waterbirds.sh ...
#
# ID = the test split of WaterBirds (metadata.csv, split 2); OOD = placesbg, background-only
# scenes of the same places: the spurious OOD set where a background term should help.
set -euo pipefail
WATERBIRDS=${1:?usage: waterbirds.sh WATERBIRDS_DIR PLACESBG_DIR [OUT]}
PLACESBG=${2:?usage: waterbirds.sh WATERBIRDS_DIR PLACESBG_DIR [OUT]}
OUT=${3:-runs/waterbirds}
CLASSES=${CLASSES:-waterbird}       # the ID classes: a preset or a file, one class a line
source "$(dirname "$0")/common.sh"

# 1. Split the negative labels into object-, background-leaning and ambiguous words (cached:
#    a new --tau only re-thresholds the stored r-scores).
"${NL[@]}" split-vocab "${NEGATIVES[@]}" "${RUNTIME[@]}" --out "$OUT/split"

# 2. Grad-CAM on both sets: one forward (+ a backward through one block) per batch gives the
#    image embedding, the CAM, the foreground mask and the background embedding.
"${NL[@]}" cam --images "$WATERBIRDS/metadata.csv" --split test --classes "$CLASSES" \
    --cam-method "$CAM_METHOD" --block="$BLOCK" "${IMAGE_ARGS[@]}" "${RUNTIME[@]}" --out "$OUT/cam/id"
"${NL[@]}" cam --images "$PLACESBG" --classes "$CLASSES" \
    --cam-method "$CAM_METHOD" --block="$BLOCK" "${IMAGE_ARGS[@]}" "${RUNTIME[@]}" --out "$OUT/cam/placesbg"

# 3. Every score of every image: MCM, Energy, MaxLogit, NegLabel, NegRefine, NegLabel* (M2:
#    object-leaning negatives) and the background terms (s_bg_pos, s_bg_neg, P_align).
for set in id placesbg; do
  "${NL[@]}" score --images-dir "$OUT/cam/$set" --classes "$CLASSES" --negatives-split "$OUT/split" \
      --role-aware --groups "$NEG_GROUPS" "${RUNTIME[@]}" --out "$OUT/scores/$set"
done

# 4. The method table and NegAlign's λ sweep (S* + λ·P_align from the stored components).
"${NL[@]}" evaluate --id "$OUT/scores/id/scores.parquet" --ood "placesbg=$OUT/scores/placesbg/scores.parquet" \
    --compare --lambda "$LAMBDAS" "${EVAL_CACHE[@]}" --out "$OUT/results"
echo "results: $OUT/results/results.json (plots: roc.png, score_hist.png)"
