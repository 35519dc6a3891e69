"""NegAlign's final score, M3 calibration, lambda sweeps and score statistics. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from negalign_cli.compute.metrics import CONVENTIONS, ood_metrics
from negalign_cli.compute.score_columns import SCORE_COLUMNS

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


def average_metrics(metric_dicts: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """The unweighted mean over OOD sets of each metric in each convention (OpenOOD's and the
    papers' "average" row: every set counts once, whatever its size)."""
    if not metric_dicts:
        raise ValueError("average_metrics needs at least one set")
    first = metric_dicts[0]
    return {
        convention: {
            name: float(np.mean([m[convention][name] for m in metric_dicts])) for name in first[convention]
        }
        for convention in first
    }


def group_sets(groups: Sequence[tuple[str, Sequence[str]]], sets: Sequence[str]) -> dict[str, list[str]]:
    """Check ``--ood-group`` definitions against the OOD set names: every member must be a set, a
    group must have at least one member and no duplicates, and a group's name must not be a set's
    (or ``mean``). Returns name → members in the given order. Raises ValueError with the reason."""
    known = set(sets)
    out: dict[str, list[str]] = {}
    for name, members in groups:
        if name in out:
            raise ValueError(f"group {name!r} is defined twice")
        if name in known or name == "mean":
            raise ValueError(f"group name {name!r} is already an OOD set name (or 'mean')")
        unknown = [m for m in members if m not in known]
        if unknown:
            raise ValueError(
                f"group {name!r} names {', '.join(map(repr, unknown))}, not among the OOD sets "
                f"({', '.join(sets)})"
            )
        if not members:
            raise ValueError(f"group {name!r} has no sets")
        if len(set(members)) != len(members):
            raise ValueError(f"group {name!r} names a set twice")
        out[name] = list(members)
    return out


# ----------------------------------------------------------------------------- M3
def zscore(values: np.ndarray, mean: float, std: float) -> np.ndarray:
    """NegLabel* M3: standardise with statistics fitted on the ID set (std 0 -> divide by 1)."""
    return (values - mean) / (std if std > 0 else 1.0)
