#!/usr/bin/env python3
"""The λ sweep of `evaluate` (three sets of ``--rows`` rows, three λ) in a fresh process, with and
without ``negalign_cli.heap.reused_heap``: wall and CPU seconds and minor page faults of the first
sweep, the one a new-λ-grid `evaluate` runs. Each mode runs ``--repeats`` times, alternating.

usage: python benchmarks/sweep_faults.py [--rows 400000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys

CHILD = """
import json, resource, sys, time
import numpy as np
from negalign_cli.compute.evaluation import lambda_sweeps
from negalign_cli.heap import reused_heap
import contextlib
rows = int(sys.argv[2])
rng = np.random.default_rng(0)
ids = (rng.normal(1, 1, rows), rng.normal(0, 0.1, rows))
oods = {n: (rng.normal(s, 1, rows), rng.normal(0, 0.1, rows)) for n, s in (("a", 0.0), ("b", 0.5))}
with reused_heap() if sys.argv[1] == "reused" else contextlib.nullcontext():
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wall, cpu = time.perf_counter(), time.process_time()
    lambda_sweeps(*ids, oods, [0.0, 0.5, 1.0])
    print(json.dumps({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                      "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"plain": [], "reused": []}
    for _ in range(args.repeats):
        for mode in runs:
            done = subprocess.run(
                [sys.executable, "-c", CHILD, mode, str(args.rows)],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[mode].append(json.loads(done.stdout))
    for mode, results in runs.items():
        median = {k: statistics.median(r[k] for r in results) for k in results[0]}
        print(
            f"{mode:>7} heap: first sweep {median['wall_s']:.2f} s wall, {median['cpu_s']:.2f} s CPU, "
            f"{median['faults']:,.0f} minor page faults (median of {args.repeats})"
        )
    with contextlib.suppress(ZeroDivisionError):
        plain, reused = (statistics.median(r["cpu_s"] for r in runs[m]) for m in ("plain", "reused"))
        print(f"CPU reused / plain: {reused / plain:.2f}")


if __name__ == "__main__":
    main()
