#!/usr/bin/env python3
"""`make imagenet` on the toy world, then the same with another τ, beside `python -c "import torch"`.

usage: python benchmarks/pipeline_rerun.py [--dir DIR] [--repeats 3] [--tau 0.1] [--json FILE]

Generates the toy world (30 ID images, 2 OOD sets of 12) under DIR, runs the ImageNet pipeline of
`pipelines.mk` on it once with τ = the toy's own (fills the cache and the run folders), then times,
as whole processes, in turn (``--repeats`` rounds, median):

* ``make imagenet … TAU=τ`` with τ = ``--tau``, ``--tau`` + 0.01, + 0.02, …: each round a τ change
  (to a τ the cache has not seen, on a fresh ``--dir``: split-vocab computes the new split from
  the cached r-scores; the toy's |r| ≥ 0.33, so none of these τ moves a word);
* ``python -c "import torch"``.

For each timed invocation it prints which negalign commands make ran (from make's output), what
each said (cache hit or computed) and whether it imported torch (each command runs through a
wrapper that reports it on stderr), and the plan `make -n` printed before it. Issue 21's target:
the invocation ≤ 3× `import torch`, and only split-vocab, score and evaluate (and what depends on
their output) run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# `negalign ARGS` as `python -m negalign_cli` runs it; says on stderr whether torch was imported
WITNESS = """import runpy, sys, time
started = time.perf_counter()
sys.argv = ["negalign", *sys.argv[1:]]
try:
    runpy.run_module("negalign_cli", run_name="__main__", alter_sys=True)
finally:
    sys.stderr.write("[witness] %s torch-imported=%s %.2f s\\n"
                     % (sys.argv[1], "torch" in sys.modules, time.perf_counter() - started))
"""


def knobs(root: Path, tau: str) -> list[str]:
    toy = root / "toy"
    return [
        f"NEGALIGN={sys.executable} {root / 'negalign_witness.py'}",
        "PIPELINE_SETUP=",
        "MODEL=negalign-toy",
        "DEVICE=cpu",
        "WORKERS=0",
        f"TAU={tau}",
        "GROUPS=1",
        "CAM_METHOD=gradxact",
        f"NOUNS={toy / 'vocab.txt'}",
        "ADJS=",
        f"OUT={root / 'runs'}",
        f"CACHE={root / 'cache'}",
        f"IMAGENET={toy / 'id' / 'manifest.csv'}",
        f"OOD=spurious={toy / 'ood_spurious' / 'images'} nonspurious={toy / 'ood_nonspurious' / 'images'}",
        f"IMAGENET_CLASSES={toy / 'classes.txt'}",
    ]


def make(root: Path, tau: str, dry: bool = False) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(HF_HUB_OFFLINE="1", COLUMNS="200", PYTHONPATH=str(ROOT))
    command = ["make", "-C", str(ROOT), "--no-print-directory", *(["-n"] if dry else []), "imagenet"]
    started = time.perf_counter()
    done = subprocess.run([*command, *knobs(root, tau)], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"make failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def steps(output: str) -> list[str]:
    """The negalign commands make ran (or, for -n, planned), in its order."""
    return re.findall(r"negalign_witness\.py ([a-z-]+)", output)


def summary(names: list[str]) -> str:
    counts = Counter(names)
    return ", ".join(f"{n}×{c}" if c > 1 else n for n, c in counts.items()) or "nothing"


def said(output: str) -> list[str]:
    """Per command: its witness line and the stages it found in the cache."""
    lines, hits = [], []
    for line in output.splitlines():
        found = re.search(r"cache hit: ([a-z-]+) [0-9a-f]+", line)
        if found:
            hits.append(found.group(1))
        if line.startswith("[witness]"):
            how = f"cache hit: {', '.join(hits)}" if hits else "no cache hit"
            lines.append(f"{line.removeprefix('[witness] ')}; {how}")
            hits = []
    return lines


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tau", default="0.1", help="the τ of the first rerun (+0.01 per round)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from negalign_cli.toy.demo import TOY_TAU
    from negalign_cli.toy.generate import ToySpec, generate_toy

    root = args.dir or Path(tempfile.mkdtemp(prefix="negalign-pipeline-"))
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "toy" / "classes.txt").exists():
        generate_toy(root / "toy", ToySpec(n_id=30, n_ood=12))
    (root / "negalign_witness.py").write_text(WITNESS)
    first_tau = repr(TOY_TAU)
    seconds, output = make(root, first_tau)
    print(f"make imagenet TAU={first_tau} (fills the cache): {seconds:.1f} s; ran: {summary(steps(output))}")

    rows, torch = [], []
    for repeat in range(args.repeats):
        tau = f"{float(args.tau) + 0.01 * repeat:.6g}"
        _, plan = make(root, tau, dry=True)
        seconds, output = make(root, tau)
        torch.append(timed([sys.executable, "-c", "import torch"]))
        ran, commands = steps(output), said(output)
        rows.append(
            {"tau": tau, "seconds": seconds, "ran": ran, "planned": steps(plan), "commands": commands}
        )
        print(f"make imagenet TAU={tau}: {seconds:.2f} s; make -n planned: {summary(steps(plan))}")
        print(f"  ran: {summary(ran)}")
        for line in commands:
            print(f"    {line}")
        print(f'  python -c "import torch": {torch[-1]:.2f} s')
    rerun, import_torch = statistics.median(r["seconds"] for r in rows), statistics.median(torch)
    ratio = rerun / import_torch
    imported = [line for r in rows for line in r["commands"] if "torch-imported=True" in line]
    print(
        f"τ rerun {rerun:.2f} s (median of {len(rows)}) = {ratio:.2f}× import torch ({import_torch:.2f} s, "
        f"median, same run); target ≤ 3×: {'met' if ratio <= 3 else 'NOT met'}; commands that imported "
        f"torch: {len(imported)}"
    )
    if args.json:
        figures = {
            "rerun_s": round(rerun, 3),
            "import_torch_s": round(import_torch, 3),
            "ratio": round(ratio, 3),
            "rounds": rows,
            "commands_importing_torch": len(imported),
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
