"""Checks shared by the Makefile pipeline tests (tests/test_pipelines.py and the one real
`make imagenet` run in tests/test_pipeline_incremental.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score


def auroc(id_scores, ood_scores) -> float:
    labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return float(roc_auc_score(labels, np.r_[id_scores, ood_scores]))


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
