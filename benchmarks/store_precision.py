#!/usr/bin/env python3
"""How much float16 storage of the per-image vectors moves each score (docs/maths.md, "Storage
precision").

usage: python benchmarks/store_precision.py [--model negalign-toy] [--groups 100] [--out DIR]

Runs `cam` on the toy benchmark's ID and spurious-OOD sets twice (``--store-dtype float32`` and
``float16``), scores both with NegRefine's ImageNet negatives (4,998 nouns + 1,372 adjective
phrases, split at the toy model card's tau) with M2 on, and prints the largest change of every score
column, and of AUROC. The numbers are the storage error alone: the model, the CAMs and the texts are
the same.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from negalign_cli.cache.workspace import Workspace
from negalign_cli.compute.metrics import ood_metrics
from negalign_cli.compute.scores import ScoreConfig
from negalign_cli.inputs.listing import list_images
from negalign_cli.inputs.words import load_classes, load_negatives
from negalign_cli.models import load_model
from negalign_cli.stages.images import cam_images, digest_images
from negalign_cli.stages.scoring import open_image_set, score_images
from negalign_cli.stages.vocab import VocabEntry, negatives_from_split, split_scores, split_vocab
from negalign_cli.toy.demo import TOY_CAM, TOY_TAU
from negalign_cli.toy.generate import ToySpec, generate_toy

COLUMNS = ("s_mcm", "s_neglabel_plain", "s_neglabel_star", "s_multimatch", "s_negrefine", "p_align")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="negalign-toy")
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="negalign-precision-"))
    model = load_model(args.model)
    workspace = Workspace.open(root / "cache")
    data = root / "toy"
    if not (data / "classes.txt").is_file():
        generate_toy(data, ToySpec())
    classes = load_classes(str(data / "classes.txt"))
    entries = [
        VocabEntry(load_negatives("negrefine-imagenet-noun"), "noun"),
        VocabEntry(load_negatives("negrefine-imagenet-adj"), "adj"),
    ]
    split = split_vocab(split_scores(model, entries, workspace).artifact, workspace, tau=TOY_TAU)
    split.artifact.export(root / "split")
    negatives = negatives_from_split(root / "split")
    config = ScoreConfig(groups=args.groups, role_aware=True, include_ambiguous=True)
    scores: dict[str, dict[str, pd.DataFrame]] = {}
    for dtype in ("float32", "float16"):
        for name in ("id", "ood_spurious"):
            listing = digest_images(list_images(data / name / "manifest.csv"))
            cam = cam_images(model, listing, classes, workspace, TOY_CAM, store_dtype=dtype, workers=0)
            folder = root / dtype / name
            cam.artifact.export(folder)
            scored = score_images(model, open_image_set(folder), classes, negatives, workspace, config)
            scores.setdefault(dtype, {})[name] = pd.read_parquet(scored.artifact.file("scores.parquet"))
    print(f"model {model.describe()}; {len(negatives.words)} negatives, G = {args.groups}, M2 on")
    print(f"{'column':<18} {'max |Δ| ID':>12} {'max |Δ| OOD':>12} {'AUROC f32':>10} {'AUROC f16':>10}")
    for column in COLUMNS:
        deltas = [
            np.nanmax(
                np.abs(scores["float32"][s][column].to_numpy() - scores["float16"][s][column].to_numpy())
            )
            for s in ("id", "ood_spurious")
        ]
        aurocs = [
            ood_metrics(
                scores[d]["id"][column].to_numpy(), scores[d]["ood_spurious"][column].to_numpy()
            ).auroc
            for d in ("float32", "float16")
        ]
        print(
            f"{column:<18} {deltas[0]:>12.2e} {deltas[1]:>12.2e} "
            f"{100 * aurocs[0]:>10.4f} {100 * aurocs[1]:>10.4f}"
        )
    print(f"work folder: {root}")


if __name__ == "__main__":
    main()
