#!/usr/bin/env python3
"""Scoring throughput from cached embeddings (target: ≥ 20,000 images/s on 2 CPU cores
with 1000 classes and 10,000 negatives) and peak memory.

usage: python benchmarks/score_speed.py [--images 20000] [--classes 1000] [--negatives 10000] [--dim 512]
                                        [--multimatch] [--memmap]

Embeddings are random unit vectors (speed does not depend on their values). With --multimatch the
"p and n" pair features are computed from the class and negative vectors (a stand-in for the warm
item cache, whose lookups run at ~100,000 texts/s on this machine); the cold case is dominated by
text encoding. --memmap stores the
image embeddings as a float16 .npy file and reads it memory-mapped, as `score` does.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from negalign_cli.compute.scores import ScoreConfig, ScoreInputs, compute_scores


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--negatives", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--multimatch", action="store_true")
    parser.add_argument("--memmap", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)

    def unit(n):
        return torch.nn.functional.normalize(torch.randn(n, args.dim, generator=generator), dim=1)

    images = unit(args.images).numpy().astype(np.float16)
    if args.memmap:
        folder = Path(tempfile.mkdtemp())
        np.save(folder / "image_embeddings.npy", images)
        del images
        images = np.load(folder / "image_embeddings.npy", mmap_mode="r")
    inputs = ScoreInputs(
        images=images,
        classes=unit(args.classes),
        negatives=unit(args.negatives),
        class_names=[f"c{i}" for i in range(args.classes)],
        negative_names=[f"n{i}" for i in range(args.negatives)],
    )

    def encode_pairs(texts):  # a stand-in for cached text features: normalise(P[p] + N[n]), no table kept
        pairs = np.array([[int(part[1:]) for part in text.split(" and ")] for text in texts])
        return torch.nn.functional.normalize(
            inputs.classes[pairs[:, 0]] + inputs.negatives[pairs[:, 1]], dim=1
        )

    config = ScoreConfig(groups=100)
    started = time.perf_counter()
    out = compute_scores(inputs, config, encode_pairs if args.multimatch else None)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert np.isfinite(out["s_neglabel_plain"]).all()
    print(
        f"images={args.images} classes={args.classes} negatives={args.negatives} dim={args.dim} "
        f"multimatch={args.multimatch} memmap={args.memmap} threads={torch.get_num_threads()}: "
        f"{args.images / seconds:,.0f} images/s ({seconds:.2f} s), peak RSS {peak_mb:,.0f} MB"
    )


if __name__ == "__main__":
    main()
