#!/usr/bin/env bash
# `make demo`: runs every stage that exists so far on the bundled tiny model, then shows the cache.
# Usage: scripts/demo.sh [NEGALIGN_BIN] [OUT_DIR]
set -euo pipefail
NEGALIGN=${1:-negalign}
OUT=${2:-demo-output}
export NEGALIGN_CACHE="$OUT/cache"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
MODEL=negalign-tiny-test
mkdir -p "$OUT"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "models the project ships (no weights needed)"
"$NEGALIGN" models --filter negalign

step "text embeddings: Waterbirds classes + NegRefine's 4,998 ImageNet negative nouns"
"$NEGALIGN" embed texts --model "$MODEL" --classes waterbird \
  --negatives negrefine-imagenet-noun --out "$OUT/texts"

step "the same again: served from the cache"
"$NEGALIGN" embed texts --model "$MODEL" --classes waterbird \
  --negatives negrefine-imagenet-noun --out "$OUT/texts"

step "adjective phrases with the adjective templates (class vectors come from the per-word cache)"
"$NEGALIGN" embed texts --model "$MODEL" --classes waterbird \
  --negatives negrefine-imagenet-adj --negative-templates adjective --out "$OUT/texts-adj"

step "what the cache holds"
"$NEGALIGN" cache ls

cat <<EOT

Demo finished. It ran: models -> embed texts (nouns, then a cache hit) -> embed texts (adjectives)
-> cache ls, on $MODEL (random weights: the numbers are not meaningful yet).
Files: $OUT/texts/ and $OUT/texts-adj/ (class_embeddings.npy, negative_embeddings.npy,
classes.txt, negatives.txt, manifest.json); cache: $OUT/cache.
Vocabulary splitting, image embedding, Grad-CAM, scoring and evaluation join this demo as
their stages land.
EOT
