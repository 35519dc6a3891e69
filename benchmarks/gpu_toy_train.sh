#!/usr/bin/env bash
# Train candidate negalign-toy checkpoints side by side on one GPU (the recipe of
# negalign_cli/toy/training.py; each run renders its batches with --workers processes).
#
# usage: bash benchmarks/gpu_toy_train.sh RUNS_DIR
#   STEPS_SCALE=0.001 DEVICE=cpu bash benchmarks/gpu_toy_train.sh /tmp/runs   (a dry run on a CPU)
#
# Each run writes RUNS_DIR/<name>/{negalign-toy.pt,training_log.jsonl,training.json} and
# RUNS_DIR/<name>.log. Pick one with `negalign toy report` and install it by copying its .pt over
# negalign_cli/assets/models/negalign-toy.pt (or rerun it alone with --install).
set -uo pipefail
runs=${1:?usage: gpu_toy_train.sh RUNS_DIR}
py=${PYTHON:-python3}
scale=${STEPS_SCALE:-1}
device=${DEVICE:-cuda}
limit=${TRAIN_LIMIT_S:-330}
bundled=negalign_cli/assets/models/negalign-toy.pt
mkdir -p "$runs"
cp "$bundled" "$runs/bundled-init.pt"  # stage 2 of C continues from the checkpoint installed before

steps() { "$py" -c "print(max(2, round($1 * $scale)))"; }

# name  steps  workers  extra options
plan=(
  "A $(steps 4000) 4 --lr 1e-3"
  "B $(steps 8000) 6 --lr 1e-3"
  "C $(steps 4000) 3 --lr 5e-4 --warmup 0.05 --init $runs/bundled-init.pt"
)
for entry in "${plan[@]}"; do
  read -r name n workers extra <<<"$entry"
  every=$(( n >= 1000 ? 250 : n ))
  # shellcheck disable=SC2086
  timeout "$limit" "$py" -m negalign_cli toy train --out "$runs/$name" --steps "$n" --device "$device" \
    --workers "$workers" --eval-every "$every" $extra >"$runs/$name.log" 2>&1 &
done
wait
for entry in "${plan[@]}"; do
  read -r name _ <<<"$entry"
  echo "== $name: $(tail -n 1 "$runs/$name/training_log.jsonl" 2>/dev/null || echo 'no log')"
done
