#!/usr/bin/env python3
"""How long a no-op rerun of `negalign embed images` takes (everything already cached).

usage: python benchmarks/noop_rerun.py [--files 100000] [--dir DIR] [--commands embed-images,cam,score]
       [--device auto] [--repeats N] [--profile FILE] [--json FILE]

Generates ``--files`` tiny PNG images (8×8, distinct contents, 100 class folders) once under
``DIR/images`` (kept between calls when ``--dir`` is given), runs ``embed images`` once with the
tiny test model to fill the cache, then times the rerun, which must encode nothing:

* as a subprocess (``python -m negalign_cli embed images …``): what a user waits for, start-up
  included, beside ``python -c "import torch"`` timed in the same run (the ratio is issue 21's
  target: ≤ 0.6), wall and CPU time (the fastest of ``--repeats``), and whether that process
  imported torch (a hit should not);
* ``--commands embed-images,cam,score``: the same subprocess figures for a no-op ``cam`` and
  ``score`` (on the cam folder, with a few noun negatives) too;
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
import resource
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


# `negalign ARGS` as `python -m negalign_cli` runs it; says on stderr whether torch was imported
_WITNESS = """
import runpy, sys
sys.argv = ["negalign", *sys.argv[1:]]
try:
    runpy.run_module("negalign_cli", run_name="__main__", alter_sys=True)
finally:
    sys.stderr.write("torch-imported=%s" % ("torch" in sys.modules))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--commands", default="embed-images", help="comma-separated: embed-images,cam,score")
    parser.add_argument("--device", default="auto", help="--device of every command")
    parser.add_argument(
        "--repeats", type=int, default=1, help="time each rerun and `import torch` N times, keep the fastest"
    )
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
        "--device",
        args.device,
        "--quiet",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def subprocess_run(argv: list[str]) -> tuple[float, float, bool]:
        """Wall and CPU (user + sys) seconds of ``python ARGV`` in a fresh process (the fastest of
        --repeats), and whether a `negalign` run imported torch."""
        best = (float("inf"), float("inf"), False)
        for _ in range(max(1, args.repeats)):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            done = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-2000:])
            cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
            best = min(best, (seconds, cpu, "torch-imported=True" in done.stderr))
        return best

    import_torch, import_torch_cpu, _ = subprocess_run(["-c", "import torch"])
    print(f'python -c "import torch": {import_torch:.2f} s wall, {import_torch_cpu:.2f} s CPU')
    figures: dict[str, object] = {
        "files": args.files,
        "import_torch_s": round(import_torch, 2),
        "import_torch_cpu_s": round(import_torch_cpu, 2),
    }
    classes, nouns = root / "classes.txt", root / "nouns.txt"
    classes.write_text("".join(f"c{i:03d}\n" for i in range(100)))
    nouns.write_text("ocean\nforest\nsand\nteapot\nlamp\ncup\nkettle\nsky\n")
    common = ["--model", "negalign-tiny-test", "--cache-dir", str(cache), "--device", args.device, "--quiet"]
    runs = {
        "embed-images": command,
        "cam": [
            "cam", "--images", str(images), "--classes", str(classes), "--out", str(root / "cam"), *common,
        ],
        "score": [
            "score", "--images-dir", str(root / "cam"), "--classes", str(classes), "--nouns", str(nouns),
            "--groups", "2", *common,
        ],
    }  # fmt: skip
    wanted = args.commands.split(",")
    for name in ("embed-images", "cam", "score"):  # in the order their inputs need
        if name not in wanted and not (name == "cam" and "score" in wanted):
            continue
        started = time.perf_counter()
        subprocess_run(["-c", _WITNESS, *runs[name]])
        print(f"{name}: first run (fills the cache): {time.perf_counter() - started:.1f} s")
        if name not in wanted:
            continue
        rerun, cpu, imported = subprocess_run(["-c", _WITNESS, *runs[name]])
        print(
            f"{name}: no-op rerun, subprocess: {rerun:.2f} s wall = {rerun / import_torch:.2f}× import "
            f"torch, {cpu:.2f} s CPU = {cpu / import_torch_cpu:.2f}×; torch "
            f"{'imported' if imported else 'not imported'}"
        )
        key = "" if name == "embed-images" else f"{name}_"
        figures[f"{key}rerun_subprocess_s"] = round(rerun, 2)
        figures[f"{key}rerun_subprocess_cpu_s"] = round(cpu, 2)
        figures[f"{key}rerun_over_import_torch"] = round(rerun / import_torch, 2)
        figures[f"{key}rerun_cpu_over_import_torch_cpu"] = round(cpu / import_torch_cpu, 2)
        figures[f"{key}rerun_imported_torch"] = imported
    if "embed-images" not in wanted:
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        return

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
