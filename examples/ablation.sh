#!/usr/bin/env bash
# Ablation: NegLabel*'s switches (M1 top-k, M2 role-aware, M3 scale stabilisation) × the CAM
# method × the hooked block, on one ID and one OOD set. Prints one line per combination (AUROC
# and FPR@95 of NegLabel* and of NegAlign at its chosen λ) and writes OUT/ablation.tsv.
#
#   examples/ablation.sh /data/waterbirds/metadata.csv /data/placesbg runs/ablation
#   CAM_METHODS="gradcam gradxact" BLOCKS="-1 -2 -3" MODS="plain m1 m2 m1m2" examples/ablation.sh ...
#
# Only what a combination changes is recomputed: `cam` once per (method, block) and set,
# `score` once per switch set, `evaluate` twice (M3 off and on) from the same score files; every
# embedding and every word comes from the cache after the first run.
set -euo pipefail
ID_IMAGES=${1:?usage: ablation.sh ID_IMAGES OOD_IMAGES [OUT]}
OOD_IMAGES=${2:?usage: ablation.sh ID_IMAGES OOD_IMAGES [OUT]}
OUT=${3:-runs/ablation}
CLASSES=${CLASSES:-waterbird}
ID_SPLIT=${ID_SPLIT:-test}          # used when ID_IMAGES is a Waterbirds metadata.csv
CAM_METHODS=${CAM_METHODS:-gradcam gradxact}
BLOCKS=${BLOCKS:--1 -2}
MODS=${MODS:-plain m1 m2 m1m2}      # plain: NegLabel; m1: --neg-topk; m2: --role-aware; m1m2: both
NEG_TOPK=${NEG_TOPK:-10}            # M1's K
PYTHON=${PYTHON:-python3}           # only to read the results.json files at the end
source "$(dirname "$0")/common.sh"

SPLIT_ARG=()
[[ "$ID_IMAGES" == *metadata.csv ]] && SPLIT_ARG=(--split "$ID_SPLIT")
"${NL[@]}" split-vocab "${NEGATIVES[@]}" "${RUNTIME[@]}" --out "$OUT/split" -q

switches() {  # the `score` flags of one switch set
  case "$1" in
    plain) ;;
    m1) echo "--neg-topk $NEG_TOPK" ;;
    m2) echo "--role-aware" ;;
    m1m2) echo "--neg-topk $NEG_TOPK --role-aware" ;;
    *) echo "unknown switch set $1 (use plain, m1, m2, m1m2)" >&2; exit 2 ;;
  esac
}

for method in $CAM_METHODS; do
  for block in $BLOCKS; do
    cam="$OUT/cam/$method$block"
    "${NL[@]}" cam --images "$ID_IMAGES" "${SPLIT_ARG[@]}" --classes "$CLASSES" --cam-method "$method" \
        --block="$block" "${IMAGE_ARGS[@]}" "${RUNTIME[@]}" --out "$cam/id" -q
    "${NL[@]}" cam --images "$OOD_IMAGES" --classes "$CLASSES" --cam-method "$method" \
        --block="$block" "${IMAGE_ARGS[@]}" "${RUNTIME[@]}" --out "$cam/ood" -q
    for mods in $MODS; do
      flags=$(switches "$mods")
      run="$OUT/runs/$method$block-$mods"
      for set in id ood; do
        # shellcheck disable=SC2086  # $flags is a list of flags
        "${NL[@]}" score --images-dir "$cam/$set" --classes "$CLASSES" --negatives-split "$OUT/split" \
            --groups "$NEG_GROUPS" $flags "${RUNTIME[@]}" --out "$run/scores/$set" -q
      done
      for m3 in off on; do
        extra=()
        [ "$m3" = on ] && extra=(--scale-stabilize)
        "${NL[@]}" evaluate --id "$run/scores/id/scores.parquet" --ood "ood=$run/scores/ood/scores.parquet" \
            --compare --lambda "$LAMBDAS" "${extra[@]}" "${EVAL_CACHE[@]}" --out "$run/m3-$m3" -q > /dev/null
      done
    done
  done
done

# One row per combination, from the results.json files.
"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = ["cam_method\tblock\tswitches\tm3\tneglabel_star_auroc\tneglabel_star_fpr95\tnegalign_lambda\tnegalign_auroc\tnegalign_fpr95"]
for results in sorted(out.glob("runs/*/m3-*/results.json")):
    combo, m3 = results.parent.parent.name, results.parent.name.removeprefix("m3-")
    cam, switches = combo.rsplit("-", 1)
    method = cam.rstrip("-0123456789")
    block = cam[len(method):]
    methods = json.loads(results.read_text())["ood"]["ood"]["methods"]
    star, align = methods["NegLabel*"]["metrics"]["neglabel"], methods["NegAlign"]["metrics"]["neglabel"]
    rows.append(
        f"{method}\t{block}\t{switches}\t{m3}\t{star['auroc']:.4f}\t{star['fpr95']:.4f}\t"
        f"{methods['NegAlign']['lambda']:g}\t{align['auroc']:.4f}\t{align['fpr95']:.4f}"
    )
(out / "ablation.tsv").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
