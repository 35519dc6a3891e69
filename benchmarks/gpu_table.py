"""Issue 23's targets table from `negalign bench --json` records: every figure beside its target,
with the figure the issue started from ("now"). `benchmarks/gpu_check.sh` prints it at its end;
it reads CPU records too (a dry run: the GPU rows then show CPU figures against GPU targets).

usage: python benchmarks/gpu_table.py BENCH.json [FILES.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# flow of the table → (the bench flow that measures it, now, target, stretch), images/s
ROWS = (
    ("forward (decoded)", "image tower forward (ceiling)", 8726, 14000, 16500),
    ("embed + CAM", "embed + CAM + background", 7459, 12500, 15000),
    ("full NegAlign (decoded, real-like pairs)", "full NegAlign pipeline", 7154, 12000, 14500),
    ("full NegAlign from JPEG files (16 CPU cores)", "full NegAlign from image files", None, 8000, 11000),
    ("  embed alone from JPEG files (bounds the above)", "embed from image files", 1492, None, None),
    ("  decode alone, reader pool (no model)", "decode: reader pool, batched decoding", None, None, None),
    ("score + multi-matching, warm", "score + multi-matching", 9040, 200000, None),
    (
        "MOS-sized benchmark, files → table, warm / cold",
        "MOS-sized benchmark (e2e)",
        None,
        "≤ 20 s / ≤ 90 s",
        "15 s",
    ),
)
# ratio → (now on the 2-core CPU, target): targets the issue sets for one CPU run
RATIOS = (
    ("multi-matching / all columns", "0.3–0.5", 0.8),
    ("score / bare GEMM", "0.72–0.80", 0.85),
    ("JPEG path / bare PIL loop", "—", 0.9),
)
E2E_FLOW = "MOS-sized benchmark (e2e)"
E2E_TARGETS = (20.0, 90.0)  # seconds, warm / cold


def _number(value: float | str | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return f"{value:,.0f}" if value >= 10 else f"{value:.3g}"


def table(records: list[dict]) -> str:
    rates: dict[str, float] = {}
    pairs: dict[str, int] = {}
    ratios: dict[str, float] = {}
    e2e: dict[str, dict] = {}
    devices = []
    for record in records:
        env = record["environment"]
        devices.append(f"{env['device_name']} ({env['precision']}, quick_gelu={env.get('quick_gelu')})")
        for row in record["results"]:
            rates.setdefault(row["flow"], row["images_per_s"])
            if row.get("distinct_pairs") is not None:
                pairs.setdefault(row["flow"], row["distinct_pairs"])
        for name, value in record["ratios"].items():
            ratios.setdefault(name, value)
        if record.get("e2e") and E2E_FLOW not in e2e:
            e2e[E2E_FLOW] = record["e2e"]
    lines = [f"targets of issue 23 on {'; '.join(dict.fromkeys(devices))}", ""]
    lines.append(f"{'flow':48s} {'now':>9s} {'measured':>10s} {'target':>15s} {'stretch':>9s}  met")
    for label, flow, now, target, stretch in ROWS:
        if flow == E2E_FLOW:
            lines.append(_e2e_line(label, e2e.get(flow), now, target, stretch))
            continue
        measured = rates.get(flow)
        reached = isinstance(target, (int, float)) and measured is not None and measured >= target
        met = (
            "—" if measured is None or not isinstance(target, (int, float)) else ("yes" if reached else "NO")
        )
        note = f"  ({pairs[flow]:,} distinct pairs)" if flow in pairs else ""
        if measured is None:
            note = f"  (not measured: no '{flow}' flow)"
        lines.append(
            f"{label:48s} {_number(now):>9s} {_number(measured):>10s} {_number(target):>15s} "
            f"{_number(stretch):>9s}  {met}{note}"
        )
    lines.append("")
    for name, now, target in RATIOS:
        value = ratios.get(name)
        met = "—" if value is None else ("yes" if value >= target else "NO")
        shown = "—" if value is None else f"{value:.3f}"
        lines.append(f"{name:48s} {now:>9s} {shown:>10s} {'≥ ' + str(target):>15s} {'':>9s}  {met}")
    return "\n".join(lines)


def _e2e_line(label: str, run: dict | None, now, target, stretch) -> str:
    """Warm / cold seconds from files to the method table (`negalign bench --e2e`), met when both
    are within their targets; a run below the full MOS size says its scale."""
    if run is None:
        head = f"{label:48s} {_number(now):>9s} {'—':>10s} {_number(target):>15s} {_number(stretch):>9s}"
        return f"{head}  —  (not measured: no --e2e record)"
    warm, cold = run["warm"]["seconds"], run["cold"]["seconds"]
    met = "yes" if warm <= E2E_TARGETS[0] and cold <= E2E_TARGETS[1] else "NO"
    note = f"  ({run['total_images']:,} images"
    if run.get("scale", 1.0) < 1.0:
        note += f", scale {run['scale']:g} of the MOS size: not the full benchmark"
    cold_stages = ", ".join(f"{k} {v:.1f}" for k, v in run["cold"]["stages"].items())
    note += f"; cold s: {cold_stages})"
    return (
        f"{label:48s} {_number(now):>9s} {f'{warm:.1f} / {cold:.1f} s':>10s} {_number(target):>15s} "
        f"{_number(stretch):>9s}  {met}{note}"
    )


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    records = []
    for path in sys.argv[1:]:
        if Path(path).is_file():
            record = json.loads(Path(path).read_text())
            # one record, or several under names (benchmarks/results-gpu-h200.json: fp16, bf16, files)
            records += (
                [record] if "environment" in record else [r for r in record.values() if isinstance(r, dict)]
            )
    if not records:
        print("no bench records to tabulate", file=sys.stderr)
        return 1
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
