"""Checks shared by the Makefile pipeline tests (tests/test_pipelines.py and the one real
`make imagenet` run in tests/test_pipeline_incremental.py), and the real runs of the example
scripts, which follow the make runs on the same data and cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score


def auroc(id_scores, ood_scores) -> float:
    labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return float(roc_auc_score(labels, np.r_[id_scores, ood_scores]))


def unnamed(blocks: dict[str, dict]) -> dict[str, dict]:
    """results.json's per-set blocks without the score file each names (runs of the same data in
    other folders name their own files)."""
    return {name: {k: v for k, v in block.items() if k != "file"} for name, block in blocks.items()}


def check_methods(results: dict, runs: Path, sets: dict[str, str]) -> None:
    """Every method's AUROC in results.json against scikit-learn on the score files."""
    id_frame = pd.read_parquet(runs / "scores" / "id" / "scores.parquet")
    for name, folder in sets.items():
        ood_frame = pd.read_parquet(runs / "scores" / folder / "scores.parquet")
        methods = results["ood"][name]["methods"]
        assert {"MCM", "NegLabel", "NegRefine", "NegLabel*", "NegAlign"} <= set(methods)
        for method in ("MCM", "NegLabel", "NegRefine", "NegLabel*"):
            column = methods[method]["column"]
            expected = auroc(id_frame[column], ood_frame[column])
            assert methods[method]["metrics"]["neglabel"]["auroc"] == pytest.approx(expected, abs=1e-9), (
                method
            )
        lam = methods["NegAlign"]["lambda"]

        def final(frame, lam=lam):
            return frame["s_neglabel_star"] + lam * frame["p_align"]

        expected = auroc(final(id_frame), final(ood_frame))
        assert methods["NegAlign"]["metrics"]["neglabel"]["auroc"] == pytest.approx(expected, abs=1e-9)
        assert set(results["ood"][name]["lambda_sweep"]) == {"0.0", "0.5", "1.0", "2.0", "5.0", "10.0"}


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# `negalign ARGS` as `python -m negalign_cli` runs it; says on stderr whether torch was imported
WITNESS = """import runpy, sys
sys.argv = ["negalign", *sys.argv[1:]]
try:
    runpy.run_module("negalign_cli", run_name="__main__", alter_sys=True)
finally:
    sys.stderr.write("[witness] %s torch-imported=%s\\n" % (sys.argv[1], "torch" in sys.modules))
"""


def witness(folder: Path) -> str:
    """The NEGALIGN command that runs negalign through WITNESS (written into ``folder``)."""
    (folder / "negalign_witness.py").write_text(WITNESS)
    return f"{sys.executable} {folder / 'negalign_witness.py'}"


def torch_steps(output: str) -> list[str]:
    """The negalign commands that WITNESS saw import torch."""
    return [line.split()[1] for line in output.splitlines() if line.endswith("torch-imported=True")]


def example_env(data: Path, cache: Path, negalign: str, **knobs: str) -> dict[str, str]:
    """The environment of an example script on the toy world: the toy model card's settings for the
    knobs of examples/common.sh, the ones the Makefile pipeline tests give make."""
    from negalign_cli.toy.demo import TOY_TAU

    return {
        **os.environ,
        "NEGALIGN": negalign,
        "PYTHON": sys.executable,
        "MODEL": "negalign-toy",
        "DEVICE": "cpu",
        "WORKERS": "0",
        "TAU": str(TOY_TAU),
        "NEG_GROUPS": "1",
        "CAM_METHOD": "gradxact",
        "NOUNS": str(data / "vocab.txt"),
        "ADJS": "",
        "CLASSES": str(data / "classes.txt"),
        "CACHE": str(cache),
        "NEGALIGN_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "COLUMNS": "200",
        **knobs,
    }


def run_example(cwd: Path, env: dict[str, str], *command: str) -> str:
    """A script (or any command) in ``cwd``: exit 0, its stdout and stderr."""
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr
