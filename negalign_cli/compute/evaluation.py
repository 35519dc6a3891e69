"""NegAlign's final score, M3 calibration, lambda sweeps and score statistics. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from negalign_cli.compute.metrics import CONVENTIONS, ood_metrics
from negalign_cli.compute.scores import SCORE_COLUMNS, zscore

STAR, ALIGN = "s_neglabel_star", "p_align"


def fit_calibration(star: np.ndarray, align: np.ndarray) -> dict[str, dict[str, float]]:
    """M3: mean and standard deviation (population) of S* and P_align on the ID set."""
    return {
        STAR: {"mean": float(np.mean(star)), "std": float(np.std(star))},
        ALIGN: {"mean": float(np.mean(align)), "std": float(np.std(align))},
    }


def final_score(
    star: np.ndarray,
    align: np.ndarray,
    lam: float,
    calibration: Mapping[str, Mapping[str, float]] | None = None,
) -> np.ndarray:
    """S_final = S* + λ·P_align, both z-scored with the ID statistics when ``calibration`` is given."""
    if calibration is not None:
        star = zscore(star, calibration[STAR]["mean"], calibration[STAR]["std"])
        align = zscore(align, calibration[ALIGN]["mean"], calibration[ALIGN]["std"])
    return star + lam * align


def all_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, dict[str, float]]:
    """Both conventions, as fractions."""
    return {c: ood_metrics(id_scores, ood_scores, c).as_dict() for c in CONVENTIONS}


def lambda_sweep(
    id_star: np.ndarray,
    id_align: np.ndarray,
    ood_star: np.ndarray,
    ood_align: np.ndarray,
    lambdas: Sequence[float],
    calibration: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[float, dict[str, dict[str, float]]]:
    """Metrics (both conventions) of S_final for each λ, from the stored components only."""
    return {
        float(lam): all_metrics(
            final_score(id_star, id_align, lam, calibration),
            final_score(ood_star, ood_align, lam, calibration),
        )
        for lam in lambdas
    }


def best_lambda(
    sweep: Mapping[float, Mapping[str, Mapping[str, float]]], convention: str = "neglabel"
) -> float:
    """The λ with the highest AUROC (the smallest λ among equals)."""
    return max(sorted(sweep), key=lambda lam: sweep[lam][convention]["auroc"])


def statistics(frame_columns: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Means (and spread) of the components, and the CAM-valid rate, as NegAlign's reference code reports."""
    out: dict[str, float] = {}
    for name in SCORE_COLUMNS:
        values = frame_columns.get(name)
        if values is None:
            continue
        values = np.asarray(values, dtype=np.float64)
        if values.size and np.isfinite(values).any():
            out[f"{name}_mean"] = float(np.nanmean(values))
            out[f"{name}_std"] = float(np.nanstd(values))
    valid = frame_columns.get("cam_valid")
    if valid is not None and len(valid) and not all(v is None for v in valid):
        out["cam_valid_rate"] = float(np.mean(np.asarray(valid, dtype=bool)))
    return out
