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

import numpy as np

from negalign_cli.defaults import METRIC_CONVENTIONS

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


def _labels(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.concatenate([id_scores, ood_scores]).astype(np.float64)
    is_id = np.concatenate([np.ones(len(id_scores), dtype=bool), np.zeros(len(ood_scores), dtype=bool)])
    return scores, is_id


def fpr_at_recall_neglabel(
    id_scores: np.ndarray, ood_scores: np.ndarray, recall: float = RECALL_LEVEL
) -> float:
    """FPR at the ROC point whose ID recall is closest to ``recall`` (ID positive).

    Follows ``fpr_and_fdr_at_recall``: one point per distinct score from the highest down to the
    first that reaches full recall, scanned from low to high threshold; the first point with the
    smallest |recall − 0.95| wins, so within a run of equal recall the lowest threshold (most false
    positives) is taken, and of two equally close recalls the higher one. A final (recall 1, FP 0)
    point is appended, as that code does.
    """
    scores, is_id = _labels(id_scores, ood_scores)
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, is_id = scores[order], is_id[order]
    distinct = np.where(np.diff(scores))[0]
    thresholds = np.r_[distinct, scores.size - 1]
    true_pos = np.cumsum(is_id)[thresholds]
    false_pos = 1 + thresholds - true_pos
    recalls = true_pos / true_pos[-1]
    last = int(np.searchsorted(true_pos, true_pos[-1]))
    recalls = np.r_[recalls[last::-1], 1.0]
    false_pos = np.r_[false_pos[last::-1], 0]
    cutoff = int(np.argmin(np.abs(recalls - recall)))
    return float(false_pos[cutoff] / np.sum(~is_id))


def fpr_at_recall_openood(
    id_scores: np.ndarray, ood_scores: np.ndarray, recall: float = RECALL_LEVEL
) -> float:
    from sklearn import metrics as skm  # here: an `evaluate` cache hit needs no sklearn

    scores, is_id = _labels(id_scores, ood_scores)
    fpr, tpr, _ = skm.roc_curve(~is_id, -scores)
    return float(fpr[np.argmax(tpr >= recall)])


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray, convention: str = "neglabel") -> OodMetrics:
    """AUROC, FPR@95, AUPR-In, AUPR-Out (fractions) of ID scores against OOD scores."""
    from sklearn import metrics as skm  # here: an `evaluate` cache hit needs no sklearn

    if convention not in CONVENTIONS:
        raise ValueError(f"unknown metric convention {convention!r}")
    id_scores = np.asarray(id_scores, dtype=np.float64)
    ood_scores = np.asarray(ood_scores, dtype=np.float64)
    if id_scores.size == 0 or ood_scores.size == 0:
        raise ValueError("metrics need at least one ID and one OOD score")
    scores, is_id = _labels(id_scores, ood_scores)
    auroc = float(skm.roc_auc_score(is_id, scores))
    if convention == "neglabel":
        return OodMetrics(
            auroc=auroc,
            fpr95=fpr_at_recall_neglabel(id_scores, ood_scores),
            aupr_in=float(skm.average_precision_score(is_id, scores)),
            aupr_out=float(skm.average_precision_score(~is_id, -scores)),
        )
    precision_in, recall_in, _ = skm.precision_recall_curve(is_id, scores)
    precision_out, recall_out, _ = skm.precision_recall_curve(~is_id, -scores)
    return OodMetrics(
        auroc=auroc,
        fpr95=fpr_at_recall_openood(id_scores, ood_scores),
        aupr_in=_area(recall_in, precision_in),
        aupr_out=_area(recall_out, precision_out),
    )


def _area(recall: np.ndarray, precision: np.ndarray) -> float:
    """Trapezoid area under a precision-recall curve (OpenOOD's AUPR). The trapezoids' sum can
    exceed 1 by a rounding (1.0000000000000002 for a perfect curve); an area is at most 1."""
    from sklearn import metrics as skm  # here: an `evaluate` cache hit needs no sklearn

    return min(1.0, float(skm.auc(recall, precision)))


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
