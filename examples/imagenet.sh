#!/usr/bin/env bash
# ImageNet-1K against OOD sets: MCM, NegLabel, NegRefine, NegLabel* and NegAlign side by side
# (the same steps as `make imagenet`).
#
#   examples/imagenet.sh /data/imagenet/val inaturalist=/data/iNaturalist sun=/data/SUN \
#       places=/data/Places textures=/data/dtd/images ninco=/data/NINCO openimage_o=/data/openimage_o
#
# Every set is a folder (recursive; ImageFolder trees keep their labels) or a manifest
# (path[,label] CSV or OpenOOD's "relative/path label" lines). OUT (default runs/imagenet) and
# the knobs of common.sh come from the environment.
set -euo pipefail
IMAGENET=${1:?usage: imagenet.sh IMAGENET_VAL NAME=DIR [NAME=DIR ...]}
shift
[ $# -ge 1 ] || { echo "usage: imagenet.sh IMAGENET_VAL NAME=DIR [NAME=DIR ...]" >&2; exit 2; }
OUT=${OUT:-runs/imagenet}
CLASSES=${CLASSES:-imagenet}
source "$(dirname "$0")/common.sh"

"${NL[@]}" split-vocab "${NEGATIVES[@]}" "${RUNTIME[@]}" --out "$OUT/split"

# One `cam` + `score` per set. Re-running with a new model or a new split re-reads no image the
# cache already holds for that model.
score_set() {  # score_set NAME IMAGES
  "${NL[@]}" cam --images "$2" --classes "$CLASSES" --cam-method "$CAM_METHOD" --block="$BLOCK" \
      "${IMAGE_ARGS[@]}" "${RUNTIME[@]}" --out "$OUT/cam/$1"
  "${NL[@]}" score --images-dir "$OUT/cam/$1" --classes "$CLASSES" --negatives-split "$OUT/split" \
      --role-aware --groups "$NEG_GROUPS" "${RUNTIME[@]}" --out "$OUT/scores/$1"
}
score_set id "$IMAGENET"
OODS=()
for pair in "$@"; do
  name=${pair%%=*}
  score_set "ood-$name" "${pair#*=}"
  OODS+=(--ood "$name=$OUT/scores/ood-$name/scores.parquet")
done

# One table: each OOD set and their mean, both metric conventions in results.json.
"${NL[@]}" evaluate --id "$OUT/scores/id/scores.parquet" "${OODS[@]}" --compare --lambda "$LAMBDAS" \
    "${EVAL_CACHE[@]}" --out "$OUT/results"
