"""`evaluate` with a new λ grid (issue 21): the miss's full-length temporaries reuse freed heap
memory instead of faulting in fresh pages (``negalign_cli/heap.py``), with results unchanged.

Page faults are counted for real (``getrusage``'s minor faults) on this glibc machine."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from negalign_cli.compute import evaluation as compute_evaluation
from negalign_cli.heap import _libc, reused_heap
from tests.faults.helpers import cli

ROWS = 40_000  # arrays of 320 KB and more: above glibc's first mmap threshold (128 KiB)
glibc = pytest.mark.skipif(_libc() is None, reason="mallopt is glibc's")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _score_files(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(7)
    paths = {}
    for name, shift in (("id", 1.0), ("a", 0.0), ("b", 0.3)):
        frame = pd.DataFrame(
            {
                "s_neglabel_star": rng.normal(shift, 0.5, ROWS).round(3),  # ties
                "p_align": rng.normal(0.2 * shift, 0.1, ROWS),
                "s_mcm": rng.uniform(0, 1, ROWS),
            }
        )
        paths[name] = folder / f"{name}.parquet"
        frame.to_parquet(paths[name], index=False)
    return paths


def _argv(paths: dict[str, Path], tmp_path: Path, grid: str, out: str) -> list[str]:
    return [
        "evaluate",
        "--id",
        str(paths["id"]),
        "--ood",
        f"a={paths['a']}",
        "--ood",
        f"b={paths['b']}",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / out),
        "--lambda",
        grid,
    ]


@glibc
def test_a_new_grid_sweeps_without_faulting_in_fresh_pages(tmp_path, monkeypatch):
    """Inside `evaluate`'s miss, a second sweep of the same data faults almost no page (the first
    one's freed arrays serve it). Before the change each full-length temporary was a fresh
    mapping: the second sweep faulted thousands of pages, as the first did."""
    paths = _score_files(tmp_path)
    real = compute_evaluation.lambda_sweeps
    counted: list[int] = []

    def sweep_twice(*args, **kwargs):
        first = real(*args, **kwargs)
        before = _faults()
        second = real(*args, **kwargs)
        counted.append(_faults() - before)
        assert second == first
        return first

    monkeypatch.setattr("negalign_cli.stages.evaluation.lambda_sweeps", sweep_twice)
    assert cli(*_argv(paths, tmp_path, "0,0.5,1", "out")).exit_code == 0
    # one full-length array of S_final for an ID and an OOD set is 2 * ROWS * 8 bytes: 157 pages;
    # the sweep makes dozens of them per set and λ (thousands of faults when each is fresh)
    one_array = 2 * ROWS * 8 // 4096
    assert counted and counted[0] < one_array, f"a second sweep in evaluate faulted {counted[0]} pages"


@glibc
def test_reused_heap_keeps_freed_arrays_then_lets_go():
    """In the block a freed 8 MB array's pages serve the next one (no fresh faults); after it the
    thresholds are back in force: a 64 MB array is a fresh mapping again, faulted in page by page."""
    with reused_heap() as active:
        assert active
        np.ones(1 << 20).sum()  # 8 MB, freed at once
        before = _faults()
        for _ in range(5):
            np.ones(1 << 20).sum()
        inside = _faults() - before
    before = _faults()
    np.ones(8 << 20).sum()  # 64 MB: above the threshold left after the block
    after = _faults() - before
    assert inside < 100, inside
    assert after >= 32, after  # 16,384 pages of 4 KiB, or 32 huge pages of 2 MiB: never ~0


def test_results_are_unchanged_by_the_heap_setting(tmp_path, monkeypatch):
    """results.json and metrics.csv are the same bytes whether or not the heap is reused."""
    paths = _score_files(tmp_path)
    assert cli(*_argv(paths, tmp_path, "0,0.25,1", "with")).exit_code == 0

    from contextlib import nullcontext

    import negalign_cli.heap

    monkeypatch.setattr(negalign_cli.heap, "reused_heap", lambda: nullcontext(False))
    argv = _argv(paths, tmp_path, "0,0.25,1", "without")
    assert cli(*argv, "--cache-dir", str(tmp_path / "cache2")).exit_code == 0
    with_, without = tmp_path / "with", tmp_path / "without"
    assert (with_ / "metrics.csv").read_bytes() == (without / "metrics.csv").read_bytes()
    assert json.loads((with_ / "results.json").read_text()) == json.loads(
        (without / "results.json").read_text()
    )
