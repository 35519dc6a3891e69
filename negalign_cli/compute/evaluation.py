"""NegAlign's final score, M3 calibration, lambda sweeps and score statistics. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from negalign_cli.compute.metrics import both_conventions, sorted_metrics
from negalign_cli.compute.score_columns import SCORE_COLUMNS
from negalign_cli.lazy import lazy_module

if TYPE_CHECKING:
    import numpy as np
else:  # imported when something is computed: an `evaluate` cache hit imports no numpy
    np = lazy_module("numpy")

STAR, ALIGN = "s_neglabel_star", "p_align"
# Names results.json, metrics.csv and the tables give rows that are not an OOD set: the ID set and
# the mean over the sets. No OOD set or --ood-group may take one (in any case).
ID_SET, MEAN = "ID", "mean"
RESERVED_SET_NAMES = {ID_SET: "the ID set", MEAN: "the mean over the OOD sets"}


def mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and population standard deviation, NaN left out. Finite scores too large for a sum
    or a square (near ±1e308) are divided by their largest magnitude first and the results scaled
    back, so their statistics stay finite; ordinary scores are summed as they are."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.abs(values[np.isfinite(values)])
    peak = float(finite.max()) if finite.size else 0.0
    scale = peak if peak > 1e150 else 1.0
    scaled = values / scale if scale != 1.0 else values
    with np.errstate(invalid="ignore"):  # ±inf among the scores: the std is NaN (inf - inf), said quietly
        return float(np.nanmean(scaled)) * scale, float(np.nanstd(scaled)) * scale


def fit_calibration(star: np.ndarray, align: np.ndarray) -> dict[str, dict[str, float]]:
    """M3: mean and standard deviation (population) of S* and P_align on the ID set."""
    (star_mean, star_std), (align_mean, align_std) = mean_std(star), mean_std(align)
    return {
        STAR: {"mean": star_mean, "std": star_std},
        ALIGN: {"mean": align_mean, "std": align_std},
    }


def calibration_problem(calibration: Mapping[str, Mapping[str, float]]) -> str | None:
    """Why M3 statistics cannot standardise, or None: a mean or standard deviation that is not
    finite (an infinite std would make every z-score 0) or a negative std."""
    values = [(f"{c} {stat}", float(calibration[c][stat])) for c in (STAR, ALIGN) for stat in ("mean", "std")]
    bad = [f"{name}={value}" for name, value in values if not np.isfinite(value)]
    if bad:
        return f"values that are not finite ({', '.join(bad)})"
    negative = [f"{name}={value}" for name, value in values if name.endswith("std") and value < 0]
    return f"a negative standard deviation ({', '.join(negative)})" if negative else None


def final_score(
    star: np.ndarray,
    align: np.ndarray,
    lam: float | np.ndarray,
    calibration: Mapping[str, Mapping[str, float]] | None = None,
) -> np.ndarray:
    """S_final = S* + λ·P_align, both z-scored with the ID statistics when ``calibration`` is given."""
    if calibration is not None:
        star = zscore(star, calibration[STAR]["mean"], calibration[STAR]["std"])
        align = zscore(align, calibration[ALIGN]["mean"], calibration[ALIGN]["std"])
    return star + lam * align


def nonfinite_final(
    star: np.ndarray,
    align: np.ndarray,
    lambdas: Sequence[float],
    calibration: Mapping[str, Mapping[str, float]] | None = None,
) -> np.ndarray:
    """Rows whose S_final is not finite at one of ``lambdas``: with finite components, finite
    scores too large to combine (1e308 + 1e308 overflows to inf). A boolean mask, no warning."""
    bad = np.zeros(len(star), dtype=bool)
    with np.errstate(over="ignore", invalid="ignore"):
        for lam in lambdas:  # a handful of λ, each vectorised over every row
            bad |= ~np.isfinite(final_score(star, align, lam, calibration))
    return bad


def all_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, dict[str, float]]:
    """Both conventions, as fractions."""
    return {c: m.as_dict() for c, m in both_conventions(id_scores, ood_scores).items()}


def lambda_sweep(
    id_star: np.ndarray,
    id_align: np.ndarray,
    ood_star: np.ndarray,
    ood_align: np.ndarray,
    lambdas: Sequence[float],
    calibration: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[float, dict[str, dict[str, float]]]:
    """Metrics (both conventions) of S_final for each λ, from the stored components only."""
    return lambda_sweeps(id_star, id_align, {"ood": (ood_star, ood_align)}, lambdas, calibration)["ood"]


# S_final of a batch of λ is one (λ, rows) matrix; batches stay below this many values (64 MB)
SWEEP_BATCH_VALUES = 1 << 23


def lambda_sweeps(
    id_star: np.ndarray,
    id_align: np.ndarray,
    oods: Mapping[str, tuple[np.ndarray, np.ndarray]],
    lambdas: Sequence[float],
    calibration: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, dict[float, dict[str, dict[str, float]]]]:
    """``lambda_sweep`` of every OOD set (name → (S*, P_align)) against one ID set. S_final of a
    batch of λ is computed as one matrix and sorted row by row in one call; the ID rows are sorted
    once per λ for all sets, and each metric comes from those sorts (``sorted_metrics``), with the
    values ``final_score`` and scikit-learn give one λ at a time."""
    values = [float(lam) for lam in lambdas]
    rows = max([len(id_star), *(len(star) for star, _ in oods.values())])
    batch = max(1, SWEEP_BATCH_VALUES // max(1, rows))
    out: dict[str, dict[float, dict[str, dict[str, float]]]] = {name: {} for name in oods}
    for start in range(0, len(values), batch):  # batches of λ, each vectorised over every row
        chunk = values[start : start + batch]
        column = np.asarray(chunk, dtype=np.float64)[:, None]
        id_sorted = _sorted_final(id_star, id_align, column, calibration)
        for name, (star, align) in oods.items():
            ood_sorted = _sorted_final(star, align, column, calibration)
            for row, lam in enumerate(chunk):
                metrics = sorted_metrics(id_sorted[row], ood_sorted[row])
                out[name][lam] = {c: m.as_dict() for c, m in metrics.items()}
    return out


def _sorted_final(
    star: np.ndarray,
    align: np.ndarray,
    lambdas: np.ndarray,
    calibration: Mapping[str, Mapping[str, float]] | None,
) -> np.ndarray:
    """S_final at each λ of the column ``lambdas`` (one row per λ), each row sorted ascending.
    Element by element the same operations as ``final_score`` at one λ (no value differs)."""
    star = np.asarray(star, dtype=np.float64)
    align = np.asarray(align, dtype=np.float64)
    if star.size == 0:
        raise ValueError("metrics need at least one ID and one OOD score")
    final = final_score(star[None, :], align[None, :], lambdas, calibration)
    if not np.isfinite(final).all():
        raise ValueError("metrics need finite scores (NaN or inf found)")
    final.sort(axis=1)
    return final


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
            out[f"{name}_mean"], out[f"{name}_std"] = mean_std(values)
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


def check_set_names(sets: Sequence[str]) -> None:
    """Check the OOD set names: none empty, none reserved (:data:`RESERVED_SET_NAMES`, in any case:
    an OOD set called ``ID`` would replace the ID set, one called ``mean`` would be a second mean
    row) and no two equal up to case (one row to a reader, two to the code). Raises ValueError."""
    seen: dict[str, str] = {}
    for name in sets:
        if not name.strip():
            raise ValueError("an OOD set name is empty")
        _check_reserved(name, "OOD set")
        other = seen.get(name.casefold())
        if other is not None:
            problem = (
                f"name {name!r} is given twice"
                if other == name
                else f"names {other!r} and {name!r} differ only in case"
            )
            raise ValueError(f"OOD set {problem}: give each set its own name")
        seen[name.casefold()] = name


def _check_reserved(name: str, what: str) -> None:
    reserved = {r.casefold(): r for r in RESERVED_SET_NAMES}
    if name.casefold() in reserved:
        meaning = RESERVED_SET_NAMES[reserved[name.casefold()]]
        raise ValueError(
            f"{what} name {name!r} is reserved: results.json and the tables call {meaning} "
            f"{reserved[name.casefold()]!r} ({', '.join(RESERVED_SET_NAMES)} are reserved, in any case); "
            "name it otherwise"
        )


def group_sets(groups: Sequence[tuple[str, Sequence[str]]], sets: Sequence[str]) -> dict[str, list[str]]:
    """Check ``--ood-group`` definitions against the OOD set names: every member must be a set, a
    group must have at least one member and no duplicates, and a group's name must be neither a
    set's nor another group's nor reserved (:data:`RESERVED_SET_NAMES`), in any case. Returns
    name → members in the given order. Raises ValueError with the reason."""
    known = set(sets)
    taken = {s.casefold(): s for s in sets}
    out: dict[str, list[str]] = {}
    for name, members in groups:
        _check_reserved(name, "group")
        if name.casefold() in taken:
            other = taken[name.casefold()]
            if other in out:
                raise ValueError(f"group {name!r} is defined twice (or differs from {other!r} only in case)")
            raise ValueError(f"group name {name!r} is already an OOD set name ({other!r})")
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
        taken[name.casefold()] = name
    return out


# ----------------------------------------------------------------------------- M3
def zscore(values: np.ndarray, mean: float, std: float) -> np.ndarray:
    """NegLabel* M3: standardise with statistics fitted on the ID set (std 0 -> divide by 1)."""
    return (values - mean) / (std if std > 0 else 1.0)
