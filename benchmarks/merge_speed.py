#!/usr/bin/env python3
"""How long `negalign merge` takes on K shards of N images each, beside `python -c "import torch"`.

usage: python benchmarks/merge_speed.py [--shards 2] [--images-per-shard 100000] [--dim 512]
       [--dtype float32] [--dir DIR] [--repeats 3] [--profile FILE] [--json FILE]

Builds (once per ``--dir``) the folder of a finished sharded ``embed images`` run with the layout
the real shards write: ``stages/shards.run_shard`` freezes ``plan.json`` and ``images.json.gz``,
runs each shard through the artifact store and exports it with its ``done.json``. Only the
encoder is left out: each shard's embeddings are random unit vectors (``--dim`` values, stored as
``--dtype``), written with the ``images.parquet`` ``embed images`` writes (``image_rows.image_table``);
1 image in 1,000 is skipped and 1 in 500 is a byte-identical copy of an earlier one (duplicates
also across the shard boundary), so the merge does all its work. The image files themselves are
not made: `merge` reads the plan's list, never the images.

Then times ``python -m negalign_cli merge DIR --cache-dir C --quiet`` as a whole process (the
fastest of ``--repeats``), on a fresh cache each time (the merge is computed: every shard file
verified, the rows assembled and stored) and again on that cache (a hit), beside
``python -c "import torch"`` timed in the same run; wall and CPU (user + sys) time.

``--profile FILE`` writes a cProfile of one fresh merge run in this process. ``--compare TREE``
then times fresh merges of another checkout's code (``PYTHONPATH=TREE``, e.g. the code before a
change) and of this one, alternately ``--repeats`` times, with user and system time apart (the
system time of writing the merged rows swings with the machine; the user time is the code's).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build(root: Path, shards: int, per_shard: int, dim: int, dtype: str) -> Path:
    """The shards folder of a finished sharded `embed images` run (kept between calls)."""
    from negalign_cli.cache.store import StageSpec
    from negalign_cli.cache.workspace import Workspace
    from negalign_cli.hashing import sha256_text
    from negalign_cli.inputs.listing import ImageList
    from negalign_cli.stages import files
    from negalign_cli.stages.image_rows import (
        EMBED_IMAGES_STAGE,
        EMBED_IMAGES_VERSION,
        Listing,
        image_table,
        row_order,
    )
    from negalign_cli.stages.shards import Shard, run_shard

    folder = root / f"shards-{shards}x{per_shard}-{dim}-{dtype}"
    if (folder / ".complete").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    n = shards * per_shard
    paths = [f"/data/images/c{i % 100:03d}/{i:08d}.png" for i in range(n)]
    labels = [f"c{i % 100:03d}" for i in range(n)]
    images = ImageList("/data/images", paths, labels, {})
    content = np.arange(n)
    content[500::500] = content[:-500:500]  # byte-identical copies of earlier images
    digests: list[str | None] = [sha256_text(f"image {c}") for c in content]
    reasons = [""] * n
    for i in range(999, n, 1000):  # unreadable files
        digests[i], reasons[i] = None, "cannot identify image file"
    params = {"store_dtype": dtype, "precision": "fp32", "items_version": 1, "max_pixels": 89_478_485}
    spec = StageSpec(EMBED_IMAGES_STAGE, EMBED_IMAGES_VERSION, params, {"model": "bench-model"})
    rng = np.random.default_rng(0)
    for index in range(shards):
        shard = Shard(index, shards)
        start, stop = shard.bounds(n)
        workspace = Workspace.open(folder / shard.name / "cache")

        def run(part: ImageList, start: int = start, stop: int = stop, ws: Workspace = workspace):
            listing = Listing(part, digests[start:stop], reasons[start:stop])
            found = row_order(listing, {d for d in listing.digests if d is not None})

            def compute(out: Path) -> dict[str, object]:
                vectors = rng.standard_normal((len(found), dim), dtype=np.float32)
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                np.save(out / files.IMAGE_EMBEDDINGS, vectors.astype(dtype))
                image_table(listing, found, {}).to_parquet(out / files.IMAGE_TABLE, index=False)
                skipped = sum(d is None for d in listing.digests)
                return {
                    "counts": {
                        "images": len(part),
                        "embedded": len(found),
                        "duplicates": len(part) - skipped - len(found),
                        "skipped": skipped,
                        "encoded": len(found),
                        "cached": 0,
                    },
                    "images_source": part.source,
                }

            whole = StageSpec(spec.stage, spec.version, params, {**spec.inputs, "images": listing.key})
            return ws.store.run(whole, compute)

        run_shard(folder, shard, spec, images, run)
    (folder / ".complete").touch()
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--images-per-shard", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512, help="embedding width (ViT-B-16: 512)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--compare", type=Path, default=None, help="another checkout to time beside")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="negalign-merge-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    shards_dir = build(root, args.shards, args.images_per_shard, args.dim, args.dtype)
    print(
        f"shards: {args.shards} × {args.images_per_shard} images, D = {args.dim} {args.dtype}, in "
        f"{shards_dir} ({time.perf_counter() - started:.1f} s to make)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def timed(argv: list[str], before_each=None) -> tuple[float, float]:
        best = (float("inf"), float("inf"))
        for _ in range(max(1, args.repeats)):
            if before_each is not None:
                before_each()
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            done = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:] + done.stdout[-3000:])
            cpu = after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime
            best = min(best, (seconds, cpu))
        return best

    torch_wall, torch_cpu = timed(["-c", "import torch"])
    print(f'python -c "import torch": {torch_wall:.2f} s wall, {torch_cpu:.2f} s CPU')
    cache = root / "merge-cache"
    merge = ["-m", "negalign_cli", "merge", str(shards_dir), "--cache-dir", str(cache), "--quiet"]
    fresh = timed(merge, lambda: shutil.rmtree(cache, ignore_errors=True))
    hit = timed(merge)
    figures: dict[str, object] = {
        "shards": args.shards,
        "images_per_shard": args.images_per_shard,
        "dim": args.dim,
        "dtype": args.dtype,
        "import_torch_s": round(torch_wall, 2),
        "import_torch_cpu_s": round(torch_cpu, 2),
    }
    for name, (wall, cpu) in (("merge", fresh), ("merge_hit", hit)):
        what = "merge (computed, fresh cache)" if name == "merge" else "merge again (cache hit)"
        print(
            f"{what}: {wall:.2f} s wall = {wall / torch_wall:.2f}× import torch, "
            f"{cpu:.2f} s CPU = {cpu / torch_cpu:.2f}×"
        )
        figures.update(
            {
                f"{name}_s": round(wall, 2),
                f"{name}_cpu_s": round(cpu, 2),
                f"{name}_over_import_torch": round(wall / torch_wall, 2),
                f"{name}_cpu_over_import_torch_cpu": round(cpu / torch_cpu, 2),
            }
        )
    if args.profile:
        from typer.testing import CliRunner

        from negalign_cli.cli.app import app

        shutil.rmtree(cache, ignore_errors=True)
        profiler = cProfile.Profile()
        profiler.enable()
        result = CliRunner().invoke(app, merge[2:])
        profiler.disable()
        if result.exit_code != 0:
            raise SystemExit(result.output)
        profiler.dump_stats(str(args.profile))
    if args.compare:
        here = Path(__file__).resolve().parent.parent
        split: dict[str, list[list[float]]] = {"compare": [], "this": []}
        for _ in range(max(1, args.repeats)):
            for name, tree in (("compare", args.compare.resolve()), ("this", here)):
                shutil.rmtree(cache, ignore_errors=True)
                usage = resource.getrusage(resource.RUSAGE_CHILDREN)
                started = time.perf_counter()
                subprocess.run(
                    [sys.executable, *merge],
                    env={**env, "PYTHONPATH": str(tree)},
                    cwd=tree,
                    check=True,
                    capture_output=True,
                )
                wall = time.perf_counter() - started
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                user, system = after.ru_utime - usage.ru_utime, after.ru_stime - usage.ru_stime
                split[name].append([round(wall, 2), round(user, 2), round(system, 2)])
                print(f"{name} ({tree}): {wall:.2f} s wall, {user:.2f} s user, {system:.2f} s system")
        figures["compare"] = {"tree": str(args.compare), **split}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
