#!/usr/bin/env python3
"""How long `negalign evaluate` takes on a cache hit and with a new λ grid, beside
`python -c "import torch"` timed in the same run (the ratio is what counts on a shared machine).

usage: python benchmarks/evaluate_hit.py [--rows 1000 400000] [--repeats 3] [--dir DIR] [--json FILE]

For each row count, writes an ID and two OOD score files (every score column of `scores.parquet`,
random but separable), runs `evaluate` once to fill the cache, then times as whole processes:

* the same `evaluate` again (a cache hit: a stat per input, a JSON read, the export to --out);
* `evaluate` with a λ grid it has not seen (the metrics are computed again; figures that do not
  depend on λ come from the figure cache);
* `python -c "import torch"`.

Each figure is the median of ``--repeats`` runs, taken in turn (hit, new grid, torch, hit, …); the
CPU time (user + sys) of each process is printed beside the wall time (steadier on a shared machine).
The package's bytecode is compiled first (``compileall``), as an installed package has it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def write_scores(path: Path, n: int, seed: int, shift: float) -> None:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "s_mcm": rng.uniform(0, 1, n) + shift * 0.1,
            "s_energy": rng.normal(30 + 5 * shift, 2, n),
            "s_maxlogit": rng.normal(28 + 5 * shift, 2, n),
            "s_neglabel_plain": rng.normal(0.5 + shift, 0.2, n),
            "s_neglabel_star": rng.normal(0.5 + shift, 0.2, n),
            "s_multimatch": rng.uniform(0, 1, n),
            "p_align": rng.normal(shift, 0.1, n),
            "cam_valid": rng.uniform(size=n) > 0.1,
        }
    )
    frame["s_negrefine"] = frame["s_neglabel_plain"] + 2 * frame["s_multimatch"]
    frame.to_parquet(path, index=False)


CPU: list[float] = []  # each timed command's CPU seconds (user + sys), in order


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], env: dict[str, str]) -> float:
    """The command's wall seconds (its CPU seconds are appended to ``CPU``)."""
    cpu = _children_cpu()
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    CPU.append(_children_cpu() - cpu)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 400_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="negalign-evaluate-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    negalign = [sys.executable, "-m", "negalign_cli"]
    torch = [sys.executable, "-c", "import torch"]
    # bytecode for the package, as an installed one has (with PYTHONDONTWRITEBYTECODE set, every
    # process would otherwise compile its ~40 modules from source: ~0.3 s that torch, installed
    # with its bytecode, does not pay)
    package = importlib.util.find_spec("negalign_cli")
    if package is not None and package.submodule_search_locations:
        folder = package.submodule_search_locations[0]
        subprocess.run([sys.executable, "-m", "compileall", "-q", folder], check=True, env=env)
    figures: dict[str, dict[str, float]] = {}
    for rows in args.rows:
        folder = root / f"rows-{rows}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, seed, shift in (("id", 0, 1.0), ("ood-a", 1, 0.0), ("ood-b", 2, 0.3)):
            if not (folder / f"{name}.parquet").exists():
                write_scores(folder / f"{name}.parquet", rows, seed, shift)
        base = [
            *negalign,
            "evaluate",
            "--id",
            str(folder / "id.parquet"),
            "--ood",
            f"a={folder / 'ood-a.parquet'}",
            "--ood",
            f"b={folder / 'ood-b.parquet'}",
            "--cache-dir",
            str(folder / "cache"),
            "--out",
            str(folder / "out"),
            "--quiet",
        ]
        timed([*base, "--lambda", "0,0.5,1"], env)  # fills the cache
        hit, grid, imports = [], [], []
        cpu: dict[str, list[float]] = {"hit": [], "grid": [], "torch": []}
        for repeat in range(args.repeats):
            hit.append(timed([*base, "--lambda", "0,0.5,1"], env))
            cpu["hit"].append(CPU[-1])
            # never seen before, even by an earlier run on the same --dir (else it is a hit)
            new_grid = f"0,{0.1 + 0.01 * repeat + time.time_ns() % 10**9 * 1e-12:.12f},2"
            grid.append(timed([*base, "--lambda", new_grid], env))
            cpu["grid"].append(CPU[-1])
            imports.append(timed(torch, env))
            cpu["torch"].append(CPU[-1])
        row = {
            "evaluate_hit_s": statistics.median(hit),
            "evaluate_new_lambda_grid_s": statistics.median(grid),
            "import_torch_s": statistics.median(imports),
            "evaluate_hit_cpu_s": statistics.median(cpu["hit"]),
            "evaluate_new_lambda_grid_cpu_s": statistics.median(cpu["grid"]),
            "import_torch_cpu_s": statistics.median(cpu["torch"]),
        }
        row["hit_ratio"] = row["evaluate_hit_s"] / row["import_torch_s"]
        row["new_grid_ratio"] = row["evaluate_new_lambda_grid_s"] / row["import_torch_s"]
        row["new_grid_cpu_ratio"] = row["evaluate_new_lambda_grid_cpu_s"] / row["import_torch_cpu_s"]
        figures[str(rows)] = {k: round(v, 3) for k, v in row.items()}
        print(
            f"{rows:>8,} rows: evaluate hit {row['evaluate_hit_s']:.2f} s "
            f"({row['hit_ratio']:.2f}× import torch), new λ grid {row['evaluate_new_lambda_grid_s']:.2f} s "
            f"({row['new_grid_ratio']:.2f}×), import torch {row['import_torch_s']:.2f} s; CPU (user + sys): "
            f"new λ grid {row['evaluate_new_lambda_grid_cpu_s']:.2f} s, import torch "
            f"{row['import_torch_cpu_s']:.2f} s ({row['new_grid_cpu_ratio']:.2f}×)"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
