"""OOD metrics in the two conventions papers mix (docs/maths.md, "Metrics"). Higher score = more ID.

``neglabel`` — the code MCM, NegLabel, CSP and NegRefine publish with (Hendrycks' ``get_measures``):
ID is the positive class; FPR@95 is the false-positive rate at the ROC point whose ID recall is
closest to 0.95 (the share of OOD accepted when 95% of ID is kept); AUPR-In/Out are average
precision with ID resp. OOD (negated scores) as positives.

``openood`` — OpenOOD v1.5's ``auc_and_fpr_recall``: OOD is the positive class (scores negated);
FPR@95 = fpr at the first ROC point with tpr ≥ 0.95 (the share of ID rejected when 95% of OOD is
caught); AUPR-In/Out are the trapezoid area under the precision–recall curve.

AUROC is the same in both. Every value is a fraction in [0, 1]; tables show percent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from negalign_cli.defaults import METRIC_CONVENTIONS
from negalign_cli.lazy import lazy_module

if TYPE_CHECKING:
    import numpy as np
else:  # imported when a metric is computed: an `evaluate` cache hit imports no numpy
    np = lazy_module("numpy")

CONVENTIONS = METRIC_CONVENTIONS
RECALL_LEVEL = 0.95

DEFINITIONS = {
    "neglabel": {
        "positive_class": "ID",
        "auroc": "area under the ROC curve (scikit-learn roc_auc_score)",
        "fpr95": "FPR (share of OOD accepted) at the ROC point whose ID recall is closest to 0.95",
        "aupr_in": "average precision, ID positive",
        "aupr_out": "average precision, OOD positive, scores negated",
        "source": "MCM / NegLabel / NegRefine evaluation code (Hendrycks et al. get_measures)",
    },
    "openood": {
        "positive_class": "OOD (scores negated)",
        "auroc": "area under the ROC curve",
        "fpr95": "FPR (share of ID rejected) at the first ROC point with OOD TPR >= 0.95",
        "aupr_in": "trapezoid area under the precision-recall curve, ID positive",
        "aupr_out": "trapezoid area under the precision-recall curve, OOD positive, scores negated",
        "source": "OpenOOD v1.5 evaluation (auc_and_fpr_recall)",
    },
}


@dataclass(frozen=True)
class OodMetrics:
    auroc: float
    fpr95: float
    aupr_in: float
    aupr_out: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def percent(self) -> dict[str, float]:
        return {k: 100.0 * v for k, v in asdict(self).items()}


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray, convention: str = "neglabel") -> OodMetrics:
    """AUROC, FPR@95, AUPR-In, AUPR-Out (fractions) of ID scores against OOD scores."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown metric convention {convention!r}")
    return both_conventions(id_scores, ood_scores)[convention]


def both_conventions(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, OodMetrics]:
    """The metrics of both conventions from one sort of each set (``sorted_metrics``)."""
    id_scores = _checked(id_scores)
    ood_scores = _checked(ood_scores)
    return sorted_metrics(np.sort(id_scores), np.sort(ood_scores))


def _checked(scores: np.ndarray) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("metrics need at least one ID and one OOD score")
    if not np.isfinite(values).all():
        raise ValueError("metrics need finite scores (NaN or inf found)")
    return values


def sorted_metrics(id_sorted: np.ndarray, ood_sorted: np.ndarray) -> dict[str, OodMetrics]:
    """Every metric of both conventions from the ID and OOD scores, each sorted ascending (finite,
    float64, not empty: callers check). The numbers are scikit-learn's to the last bit: its
    ``roc_curve``/``precision_recall_curve`` sort the scores and take, at each distinct score, the
    counts of positives and negatives at or above it; those integer counts are computed here once
    (``_counts``) and every curve is built from them with the floating-point operations
    scikit-learn uses, element by element and summed in the same order (``tests/test_evaluate_fast.py``
    checks equality, ties included). Few full-length arrays are made: the hot loop of a λ sweep."""
    n_id, n_ood = id_sorted.size, ood_sorted.size
    id_le, ood_le = _counts(id_sorted, ood_sorted)  # at or below each distinct score, ascending
    m = id_le.size
    # ID positive: counts at or above each distinct score (ascending scores = scikit-learn's
    # flipped precision-recall order; reversed, its ROC order)
    id_ge, ood_ge = np.empty(m), np.empty(m)
    id_ge[0], ood_ge[0] = n_id, n_ood
    np.subtract(n_id, id_le[:-1], out=id_ge[1:])
    np.subtract(n_ood, ood_le[:-1], out=ood_ge[1:])
    # roc_curve's drop_intermediate keeps an inner point where the step to the next differs from
    # the step before: where the ID or OOD count of one distinct score differs from the next's
    group_id, group_ood = np.diff(id_le, prepend=0), np.diff(ood_le, prepend=0)
    change = group_id[1:] != group_id[:-1]
    change |= group_ood[1:] != group_ood[:-1]
    keep_in = np.ones(m, dtype=bool)  # thresholds decreasing (ID positive)
    keep_in[1:-1] = change[: m - 2][::-1]
    keep_out = np.ones(m, dtype=bool)  # thresholds increasing (OOD positive, negated scores)
    keep_out[1:-1] = change[1 : m - 1]
    auroc = _trapezoid(
        _curve(id_ge[::-1], keep_in, n_id), _curve(ood_ge[::-1], keep_in, n_ood)
    )  # tpr against fpr
    id_le_f, ood_le_f = id_le.astype(np.float64), ood_le.astype(np.float64)
    fpr_out, tpr_out = _curve(id_le_f, keep_out, n_id), _curve(ood_le_f, keep_out, n_ood)
    # precision-recall, lowest threshold first, ending at (recall 0, precision 1)
    recall_in, precision_in = _pr_arrays(id_ge, ood_ge, n_id)
    recall_out, precision_out = _pr_arrays(ood_le_f[::-1], id_le_f[::-1], n_ood)
    step_in, step_out = np.diff(recall_in), np.diff(recall_out)
    return {
        "neglabel": OodMetrics(
            auroc=auroc,
            fpr95=_fpr_neglabel(id_ge, ood_ge),
            aupr_in=_step_sum(step_in, precision_in),
            aupr_out=_step_sum(step_out, precision_out),
        ),
        "openood": OodMetrics(
            auroc=auroc,
            fpr95=float(fpr_out[np.argmax(tpr_out >= RECALL_LEVEL)]),
            aupr_in=min(1.0, -_trapezoid_steps(precision_in, step_in)),
            aupr_out=min(1.0, -_trapezoid_steps(precision_out, step_out)),
        ),
    }


def _curve(counts: np.ndarray, keep: np.ndarray, total: int) -> np.ndarray:
    """One axis of roc_curve: the kept counts after a leading 0, divided by the last (``total``)."""
    out = np.empty(int(np.count_nonzero(keep)) + 1)
    out[0] = 0.0
    np.compress(keep, counts, out=out[1:])
    out /= total
    return out


def _pr_arrays(true_pos: np.ndarray, false_pos: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    """precision_recall_curve's recall and precision, in its (flipped) order, (0, 1) appended."""
    recall, precision = np.empty(true_pos.size + 1), np.empty(true_pos.size + 1)
    np.divide(true_pos, total, out=recall[:-1])
    recall[-1] = 0.0
    np.add(true_pos, false_pos, out=precision[:-1])
    np.divide(true_pos, precision[:-1], out=precision[:-1])
    precision[-1] = 1.0
    return recall, precision


def _step_sum(step: np.ndarray, precision: np.ndarray) -> float:
    """average_precision_score: -Σ Δrecall · precision, -0.0 clipped to 0 (``step`` = Δrecall)."""
    step = step * precision[:-1]
    return float(max(0.0, -np.sum(step)))


def _trapezoid_steps(y: np.ndarray, step: np.ndarray) -> float:
    """scipy's trapezoid(y, x) given ``step`` = x[1:] - x[:-1]: Σ step · (y[1:] + y[:-1]) / 2.0."""
    total = np.add(y[1:], y[:-1])
    total *= step
    total /= 2.0
    return float(np.sum(total, dtype=np.float64))


def _counts(id_sorted: np.ndarray, ood_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At each distinct score of either set, ascending: how many ID and how many OOD scores are at
    or below it (int64). A stable argsort of the two sorted runs merges them in linear time; the
    order of equal scores never matters, as only the counts at distinct scores are used."""
    merged = np.concatenate([id_sorted, ood_sorted])
    order = np.argsort(merged, kind="stable")
    merged = merged[order]
    last = np.flatnonzero(np.r_[merged[1:] != merged[:-1], True])  # each distinct score's last row
    id_le = np.cumsum(order < id_sorted.size)[last]
    return id_le, last + 1 - id_le


def _roc(tps: np.ndarray, fps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``roc_curve`` (``drop_intermediate=True``) from the counts at each distinct
    score, thresholds decreasing: points inside a straight run dropped, (0, 0) prepended."""
    if fps.size > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps = fps[keep], tps[keep]
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    return fps / fps[-1], tps / tps[-1]


def _precision_recall(tps: np.ndarray, fps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``precision_recall_curve`` (every distinct score, lowest threshold first,
    ending at recall 0, precision 1). No count is 0 here: each distinct score has a row."""
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return np.concatenate((precision[::-1], [1.0])), np.concatenate((recall[::-1], [0.0]))


def _average_precision(precision: np.ndarray, recall: np.ndarray) -> float:
    """scikit-learn's ``average_precision_score``: the step integral, -0.0 clipped to 0."""
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """``trapezoid(y, x)`` as scipy computes it for scikit-learn's ``auc``."""
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0, dtype=np.float64))


def _auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under a ROC curve (fpr increasing), as scikit-learn's ``auc``."""
    return _trapezoid(tpr, fpr)


def _fpr_neglabel(id_above: np.ndarray, ood_above: np.ndarray, recall: float = RECALL_LEVEL) -> float:
    """The ``neglabel`` FPR@95 from the counts of ID and OOD scores at or above each distinct score
    (scores ascending). Follows ``fpr_and_fdr_at_recall``: one point per distinct score from the
    highest threshold that keeps every ID score upwards; the first point with the smallest
    |recall − 0.95| wins, so within a run of equal recall the lowest threshold (most false
    positives) is taken, and of two equally close recalls the higher one. A final (recall 1, FP 0)
    point closes the scan, as that code appends it."""
    total, negatives = id_above[0], ood_above[0]
    below = id_above < total
    start = (int(np.argmax(below)) if below.any() else id_above.size) - 1  # keeps every ID score
    distance = id_above[start:] / total
    distance -= recall
    np.abs(distance, out=distance)
    best = int(np.argmin(distance))
    if distance[best] > abs(1.0 - recall):  # the closing point is strictly closer
        return 0.0
    return float(ood_above[start + best] / negatives)


def _fpr_openood(tps: np.ndarray, fps: np.ndarray, recall: float = RECALL_LEVEL) -> float:
    """The ``openood`` FPR@95: fpr at the first point of scikit-learn's ROC curve (OOD positive,
    ``tps``/``fps`` counted on negated scores) whose tpr reaches ``recall``."""
    fpr, tpr = _roc(tps, fps)
    return float(fpr[np.argmax(tpr >= recall)])


def roc_points(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the ROC curve, ID positive: scikit-learn's ``roc_curve`` points (the figure's)."""
    id_le, ood_le = _counts(np.sort(_checked(id_scores)), np.sort(_checked(ood_scores)))
    tps = (id_le[-1] - np.r_[0, id_le[:-1]][::-1]).astype(np.float64)
    fps = (ood_le[-1] - np.r_[0, ood_le[:-1]][::-1]).astype(np.float64)
    return _roc(tps, fps)


def fpr_at_recall_neglabel(
    id_scores: np.ndarray, ood_scores: np.ndarray, recall: float = RECALL_LEVEL
) -> float:
    """FPR at the ROC point whose ID recall is closest to ``recall`` (ID positive; ``_fpr_neglabel``)."""
    id_le, ood_le = _counts(np.sort(_checked(id_scores)), np.sort(_checked(ood_scores)))
    id_ge = id_le[-1] - np.r_[0, id_le[:-1]]
    ood_ge = ood_le[-1] - np.r_[0, ood_le[:-1]]
    return _fpr_neglabel(id_ge, ood_ge, recall)


def fpr_at_recall_openood(
    id_scores: np.ndarray, ood_scores: np.ndarray, recall: float = RECALL_LEVEL
) -> float:
    """Fpr at the first ROC point with OOD TPR >= ``recall`` (OOD positive; ``_fpr_openood``)."""
    id_le, ood_le = _counts(np.sort(_checked(id_scores)), np.sort(_checked(ood_scores)))
    return _fpr_openood(ood_le.astype(np.float64), id_le.astype(np.float64), recall)


def keep_threshold(id_scores: np.ndarray, keep: float = RECALL_LEVEL) -> float:
    """The highest threshold t that keeps at least ``keep`` of the ID scores (score ≥ t is kept):
    the ``ceil(keep · n)``-th highest ID score."""
    scores = np.asarray(id_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("a threshold needs at least one ID score")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    rank = max(1, int(np.ceil(keep * scores.size - 1e-9)))
    return float(np.sort(scores)[::-1][rank - 1])


def group_rejection(id_scores: np.ndarray, in_group: np.ndarray, keep: float = RECALL_LEVEL) -> float:
    """Share of the ID images in ``in_group`` (a boolean mask over ``id_scores``) that fall below
    the threshold keeping ``keep`` of all ID images: the false alarms a score raises on an ID
    subgroup (Waterbirds' minority groups) when it is tuned to keep 95% of ID."""
    scores = np.asarray(id_scores, dtype=np.float64)
    group = np.asarray(in_group, dtype=bool)
    if group.shape != scores.shape:
        raise ValueError(f"in_group has shape {group.shape}, the ID scores {scores.shape}")
    if not group.any():
        raise ValueError("the group holds no ID image")
    return float(np.mean(scores[group] < keep_threshold(scores, keep)))
