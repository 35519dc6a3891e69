#!/usr/bin/env python3
"""How fast the CLI starts: `negalign --help` and every `negalign CMD --help`, against
`python -c "import torch"` measured in the same run (the goal: under 0.3× of it, torch not imported).

usage: python benchmarks/cli_startup.py [--repeat 5]

Each command runs in a fresh interpreter; the median of --repeat runs is shown.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = [
    [],
    ["embed", "texts"],
    ["embed", "images"],
    ["mine-negatives"],
    ["split-vocab"],
    ["cam"],
    ["score"],
    ["evaluate"],
    ["cache", "ls"],
    ["demo"],
    ["toy", "report"],
]


def timed(argv: list[str], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch_seconds = timed([sys.executable, "-c", "import torch"], args.repeat)
    bare = timed([sys.executable, "-c", "pass"], args.repeat)
    probe = (
        "import sys\n"
        "from negalign_cli.cli.app import main\n"
        "sys.argv = ['negalign', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.split()[
        -1
    ]
    print(f"python -c pass: {bare:.3f} s; python -c 'import torch': {torch_seconds:.3f} s")
    print(f"{'command':<32} {'seconds':>8} {'× torch':>8}")
    worst = 0.0
    for command in COMMANDS:
        seconds = timed([sys.executable, "-m", "negalign_cli", *command, "--help"], args.repeat)
        worst = max(worst, seconds / torch_seconds)
        label = "negalign " + " ".join([*command, "--help"])
        print(f"{label:<32} {seconds:>8.3f} {seconds / torch_seconds:>8.2f}")
    print(f"worst ratio {worst:.2f} (goal < 0.30); torch imported by `negalign --help`: {imported}")


if __name__ == "__main__":
    main()
