from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from negalign_cli.compute.metrics import fpr_at_recall_neglabel, ood_metrics

# A hand-worked example with ties (see the derivation in docs/maths.md, "Metrics").
ID = np.array([5.0] * 10 + [4.0] * 9 + [2.0])
OOD = np.array([4.0] * 2 + [3.0] * 3 + [1.0] * 5)


def test_hand_worked_example_neglabel():
    m = ood_metrics(ID, OOD, "neglabel")
    assert m.auroc == pytest.approx(186 / 200)
    # recall 0.95 is reached at thresholds 4 (2 FP) and 3 (5 FP); the code takes the lower threshold
    assert m.fpr95 == pytest.approx(0.5)
    assert m.aupr_in == pytest.approx(0.5 * 1 + 0.45 * 19 / 21 + 0.05 * 20 / 25)


def test_hand_worked_example_openood():
    m = ood_metrics(ID, OOD, "openood")
    assert m.auroc == pytest.approx(186 / 200)
    # OOD positive: 95% of OOD caught first at -score >= -4, where 10 of 20 ID are rejected
    assert m.fpr95 == pytest.approx(0.5)


def test_conventions_measure_different_things():
    # ID well separated except a long OOD tail: the two FPR@95 differ
    rng = np.random.default_rng(0)
    id_scores = rng.normal(2, 1, 400)
    ood_scores = np.r_[rng.normal(0, 1, 380), rng.normal(3, 0.2, 20)]
    a, b = ood_metrics(id_scores, ood_scores, "neglabel"), ood_metrics(id_scores, ood_scores, "openood")
    assert a.auroc == pytest.approx(b.auroc)
    assert a.fpr95 != pytest.approx(b.fpr95)


# ----------------------------------------------------------------------------- brute force
def auroc_pairs(id_scores, ood_scores):
    wins = 0.0
    for a in id_scores:
        for b in ood_scores:
            wins += 1.0 if a > b else 0.5 if a == b else 0.0
    return wins / (len(id_scores) * len(ood_scores))


def average_precision_loop(pos, neg):
    total = len(pos)
    ap, previous_recall = 0.0, 0.0
    for t in sorted(set(pos) | set(neg), reverse=True):
        tp = sum(s >= t for s in pos)
        fp = sum(s >= t for s in neg)
        recall = tp / total
        ap += (recall - previous_recall) * tp / (tp + fp)
        previous_recall = recall
    return ap


def fpr_neglabel_loop(id_scores, ood_scores, level=0.95):
    """Scan thresholds from the highest that keeps every ID sample upwards; the first point with
    the smallest |recall − level| wins."""
    total = len(id_scores)
    thresholds = sorted(set(id_scores) | set(ood_scores))
    full = max(t for t in thresholds if sum(s >= t for s in id_scores) == total)
    best, best_fp = None, None
    for t in (t for t in thresholds if t >= full):
        tp = sum(s >= t for s in id_scores)
        fp = sum(s >= t for s in ood_scores)
        distance = abs(tp / total - level)
        if best is None or distance < best:
            best, best_fp = distance, fp
    return best_fp / len(ood_scores)


def fpr_openood_loop(id_scores, ood_scores, level=0.95):
    for t in sorted(set(-id_scores) | set(-ood_scores), reverse=True):
        if sum(-s >= t for s in ood_scores) / len(ood_scores) >= level:
            return sum(-s >= t for s in id_scores) / len(id_scores)
    raise AssertionError


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_against_brute_force_and_sklearn(seed, ties):
    rng = np.random.default_rng(seed)
    id_scores = rng.normal(1.0, 1.0, 60 + seed)
    ood_scores = rng.normal(0.0, 1.2, 45 + 3 * seed)
    if ties:
        id_scores, ood_scores = np.round(id_scores, 0), np.round(ood_scores, 0)
    n = ood_metrics(id_scores, ood_scores, "neglabel")
    o = ood_metrics(id_scores, ood_scores, "openood")
    assert n.auroc == pytest.approx(auroc_pairs(id_scores, ood_scores), abs=1e-12)
    assert o.auroc == pytest.approx(n.auroc, abs=1e-12)
    assert n.aupr_in == pytest.approx(average_precision_loop(id_scores, ood_scores), abs=1e-12)
    assert n.aupr_out == pytest.approx(average_precision_loop(-ood_scores, -id_scores), abs=1e-12)
    assert n.fpr95 == pytest.approx(fpr_neglabel_loop(id_scores, ood_scores), abs=1e-12)
    if not ties:  # with ties sklearn's drop_intermediate may skip a diagonal point, as in OpenOOD
        assert o.fpr95 == pytest.approx(fpr_openood_loop(id_scores, ood_scores), abs=1e-12)
    labels = np.r_[np.ones_like(id_scores), np.zeros_like(ood_scores)]
    scores = np.r_[id_scores, ood_scores]
    precision, recall, _ = skm.precision_recall_curve(labels, scores)
    assert o.aupr_in == pytest.approx(np.trapezoid(precision[::-1], recall[::-1]), abs=1e-12)


def test_fpr_with_column_vectors_is_not_nan():
    """NegRefine's evaluate_all returned NaN for column vectors; ours flattens."""
    value = fpr_at_recall_neglabel(ID.reshape(-1, 1).ravel(), OOD.reshape(-1, 1).ravel())
    assert value == pytest.approx(0.5)


def test_bad_input():
    with pytest.raises(ValueError):
        ood_metrics(np.array([]), OOD)
    with pytest.raises(ValueError):
        ood_metrics(ID, OOD, "hendrycks")


def test_openood_aupr_of_a_perfect_curve_is_one_not_more():
    from negalign_cli.compute.metrics import ood_metrics

    metrics = ood_metrics(np.array([1.0, 1.0]), np.array([-1.5, -1, -2, -2] + [0] * 16), "openood")
    assert metrics.aupr_out == 1.0 and metrics.aupr_in == 1.0  # the trapezoids summed to 1 + 2e-16


def _brute_force_rejection(id_scores, in_group, keep=0.95):
    """Try every ID score as the threshold; take the highest that keeps >= keep of ID (score >= t)."""
    candidates = [t for t in sorted(set(id_scores.tolist())) if np.mean(id_scores >= t) >= keep]
    threshold = max(candidates)
    return sum(1 for s, g in zip(id_scores, in_group, strict=True) if g and s < threshold) / sum(in_group)


@pytest.mark.parametrize("seed", range(12))
def test_group_rejection_against_brute_force(seed):
    from negalign_cli.compute.metrics import group_rejection, keep_threshold

    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    # coarse values make ties, which decide what "keeps 95%" means
    scores = np.round(rng.normal(size=n), int(rng.integers(0, 3)))
    group = rng.random(n) < rng.uniform(0.05, 0.6)
    group[rng.integers(n)] = True
    assert group_rejection(scores, group) == pytest.approx(_brute_force_rejection(scores, group))
    threshold = keep_threshold(scores)
    assert np.mean(scores >= threshold) >= 0.95
    assert not (scores > threshold).mean() >= 0.95 or threshold == scores.max()


def test_group_rejection_hand_worked():
    from negalign_cli.compute.metrics import group_rejection, keep_threshold

    scores = np.arange(20, dtype=float)  # keeping 95% of 20 = 19 images: threshold 1, only 0 rejected
    assert keep_threshold(scores) == 1.0
    group = np.zeros(20, bool)
    group[[0, 1, 5]] = True
    assert group_rejection(scores, group) == pytest.approx(1 / 3)
    assert group_rejection(scores, group, keep=0.5) == pytest.approx(1.0)  # threshold 10
    assert group_rejection(scores, group, keep=0.75) == pytest.approx(2 / 3)  # threshold 5 keeps image 5
    with pytest.raises(ValueError, match="no ID image"):
        group_rejection(scores, np.zeros(20, bool))
    with pytest.raises(ValueError, match="shape"):
        group_rejection(scores, group[:5])
