#!/usr/bin/env python3
"""How long a no-op rerun of `negalign embed images` takes (everything already cached).

usage: python benchmarks/noop_rerun.py [--files 100000] [--dir DIR] [--profile FILE] [--json FILE]

Generates ``--files`` tiny PNG images (8×8, distinct contents, 100 class folders) once under
``DIR/images`` (kept between calls when ``--dir`` is given), runs ``embed images`` once with the
tiny test model to fill the cache, then times the rerun, which must encode nothing:

* as a subprocess (``python -m negalign_cli embed images …``): what a user waits for, start-up
  included;
* in this process, imports already done (a second in-process call): the command's own work;
* the files that rerun opened to hash, and their bytes (every sha256 of a file is taken through
  ``hashing.open_regular``): the images, the artifact's outputs (checked against its manifest on
  every hit) and nothing else. With the stat cache none should be read once their stat is known.

``--profile FILE`` writes a cProfile of the in-process rerun (``python -m pstats FILE``).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, count: int) -> None:
    marker = folder / f".complete-{count}"
    if marker.exists():
        return
    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / f"c{i % 100:03d}"
        if i < 100:
            sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        pixels[0, 0] = (i % 256, (i // 256) % 256, i // 65536)  # distinct contents
        Image.fromarray(pixels).save(sub / f"{i:07d}.png")
    marker.touch()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="negalign-noop-"))
    images = root / f"images-{args.files}"
    started = time.perf_counter()
    make_images(images, args.files)
    print(f"images: {args.files} under {images} ({time.perf_counter() - started:.1f} s to make)")
    cache = root / f"cache-{args.files}"
    command = [
        "embed",
        "images",
        "--images",
        str(images),
        "--model",
        "negalign-tiny-test",
        "--cache-dir",
        str(cache),
        "--quiet",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def subprocess_run() -> float:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "negalign_cli", *command], env=env, capture_output=True, text=True
        )
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
        return seconds

    first = subprocess_run()
    print(f"first run (fills the cache): {first:.1f} s")
    rerun = subprocess_run()
    print(f"no-op rerun, subprocess: {rerun:.2f} s")

    from typer.testing import CliRunner

    from negalign_cli.cli.app import app

    runner = CliRunner()
    result = runner.invoke(app, command)  # imports everything the command needs
    if result.exit_code != 0:
        raise SystemExit(result.output)
    if "cache hit" not in " ".join(result.output.split()):
        raise SystemExit(f"the rerun was not a cache hit:\n{result.output}")
    profiler = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    result = runner.invoke(app, command)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(str(args.profile))
    inprocess = time.perf_counter() - started
    print(f"no-op rerun, in-process (imports done): {inprocess:.2f} s")
    figures = {"files": args.files, "first_s": round(first, 2), "rerun_subprocess_s": round(rerun, 2)}
    figures["rerun_inprocess_s"] = round(inprocess, 2)
    from negalign_cli import hashing

    opened: list[str] = []
    original = hashing.open_regular

    def counted(path):
        opened.append(str(path))
        return original(path)

    hashing.open_regular = counted
    try:
        result = runner.invoke(app, command)
    finally:
        hashing.open_regular = original
    if result.exit_code != 0:
        raise SystemExit(result.output)
    artifact = [p for p in opened if str(cache) in p]
    read = sum(os.path.getsize(p) for p in opened)
    print(
        f"no-op rerun, files hashed: {len(opened)} ({read:,} bytes), of which {len(artifact)} "
        "artifact output(s)"
    )
    figures.update(
        rerun_files_hashed=len(opened), rerun_bytes_hashed=read, rerun_outputs_hashed=len(artifact)
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
