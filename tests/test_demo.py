from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_end_to_end_and_then_from_the_cache(tmp_path):
    """What `make demo` runs (smaller): the whole pipeline on the bundled toy CLIP, then a rerun."""
    negalign = Path(sys.executable).with_name("negalign")
    command = [str(negalign), "demo", "--out", str(tmp_path / "demo"), "--n-id", "80", "--n-ood", "40"]
    env = {**os.environ, "COLUMNS": "160"}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    for method in ("MCM", "NegLabel", "NegRefine", "NegLabel*", "NegAlign"):
        assert method in first.stdout
    results = json.loads((tmp_path / "demo" / "results" / "results.json").read_text())
    assert set(results["ood"]) == {"spurious", "spurious_object", "nonspurious"}
    assert results["id"]["n"] == 80 + 40  # id and id_minority
    assert "what the demo found" in first.stdout and "minority ID images" in first.stdout
    auroc = {
        name: {m: v["metrics"]["neglabel"]["auroc"] for m, v in block["methods"].items()}
        for name, block in results["ood"].items()
    }
    assert auroc["spurious"]["NegLabel"] >= 0.95  # model card: 100.00 (400/200 images)
    assert auroc["nonspurious"]["NegLabel"] >= 0.65  # model card: 83.76
    assert auroc["nonspurious"]["NegLabel"] > auroc["nonspurious"]["MCM"] - 0.05  # card: 83.76 against 79.44
    assert len(list((tmp_path / "demo" / "viz").glob("*.png"))) == 6
    for name in ("roc.png", "score_hist.png", "metrics.csv"):
        assert (tmp_path / "demo" / "results" / name).is_file()
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0 and "everything served from the cache" in second.stdout


@pytest.mark.slow
def test_sanity_prints_the_method_document_fields(tmp_path):
    negalign = Path(sys.executable).with_name("negalign")
    result = subprocess.run(
        [str(negalign), "sanity", "--cache-dir", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for field in ("predicted class", "S_NegLabel plain", "S_NegLabel*", "P_align", "S_final", "CAM valid"):
        assert field in result.stdout
