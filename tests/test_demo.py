from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_script_runs_end_to_end(tmp_path):
    """What `make demo` runs, in a fresh output folder: every step succeeds, the rerun is a hit."""
    negalign = Path(sys.executable).with_name("negalign")
    env = {**os.environ, "COLUMNS": "160"}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh"), str(negalign), str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cache hit: embed-texts" in result.stderr
    assert "Demo finished" in result.stdout
    for name in ("class_embeddings.npy", "negative_embeddings.npy", "negatives.txt", "manifest.json"):
        assert (tmp_path / "demo" / "texts" / name).is_file()
    assert (tmp_path / "demo" / "texts" / "negatives.txt").read_text().count("\n") == 4998
