"""`evaluate` fast (issue 21): metrics of every λ from one sort per set, and a hit that imports
neither pandas, pyarrow, scikit-learn nor matplotlib.

The metrics are checked for equality (not closeness) against the implementation they replaced (kept
here verbatim as ``reference_metrics``: scikit-learn's curves, one call per metric) and against
scikit-learn called directly, on data with heavy ties, saturated scores, tiny sets and many λ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn import metrics as skm

from negalign_cli.compute.evaluation import final_score, lambda_sweep, lambda_sweeps
from negalign_cli.compute.metrics import (
    OodMetrics,
    fpr_at_recall_neglabel,
    fpr_at_recall_openood,
    ood_metrics,
)
from tests.faults.helpers import cli
from tests.helpers import IMPORT_SPY
from tests.helpers.synthetic import write_scores

ROOT = Path(__file__).resolve().parents[1]

CONVENTIONS = ("neglabel", "openood")


# ----------------------------------------------------------------------------- the reference
# compute/metrics.py as it was before the metrics were computed from one sort (commit ed5a178)
def _labels(id_scores, ood_scores):
    scores = np.concatenate([id_scores, ood_scores]).astype(np.float64)
    is_id = np.concatenate([np.ones(len(id_scores), dtype=bool), np.zeros(len(ood_scores), dtype=bool)])
    return scores, is_id


def _reference_fpr_neglabel(id_scores, ood_scores, recall=0.95):
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


def _reference_fpr_openood(id_scores, ood_scores, recall=0.95):
    scores, is_id = _labels(id_scores, ood_scores)
    fpr, tpr, _ = skm.roc_curve(~is_id, -scores)
    return float(fpr[np.argmax(tpr >= recall)])


def reference_metrics(id_scores, ood_scores, convention):
    id_scores = np.asarray(id_scores, dtype=np.float64)
    ood_scores = np.asarray(ood_scores, dtype=np.float64)
    scores, is_id = _labels(id_scores, ood_scores)
    auroc = float(skm.roc_auc_score(is_id, scores))
    if convention == "neglabel":
        return OodMetrics(
            auroc=auroc,
            fpr95=_reference_fpr_neglabel(id_scores, ood_scores),
            aupr_in=float(skm.average_precision_score(is_id, scores)),
            aupr_out=float(skm.average_precision_score(~is_id, -scores)),
        )
    precision_in, recall_in, _ = skm.precision_recall_curve(is_id, scores)
    precision_out, recall_out, _ = skm.precision_recall_curve(~is_id, -scores)
    return OodMetrics(
        auroc=auroc,
        fpr95=_reference_fpr_openood(id_scores, ood_scores),
        aupr_in=min(1.0, float(skm.auc(recall_in, precision_in))),
        aupr_out=min(1.0, float(skm.auc(recall_out, precision_out))),
    )


def sklearn_direct(id_scores, ood_scores):
    """The figures scikit-learn gives, asked directly (AUROC, OpenOOD's FPR@95 and AUPRs)."""
    scores, is_id = _labels(id_scores, ood_scores)
    fpr, tpr, _ = skm.roc_curve(~is_id, -scores)
    return {
        "auroc": skm.roc_auc_score(is_id, scores),
        "auroc_out": skm.roc_auc_score(~is_id, -scores),
        "fpr95_openood": fpr[np.argmax(tpr >= 0.95)],
        "ap_in": skm.average_precision_score(is_id, scores),
        "ap_out": skm.average_precision_score(~is_id, -scores),
    }


def assert_same(id_scores, ood_scores):
    """Every metric equal to the reference's and scikit-learn's, to the last bit."""
    for convention in CONVENTIONS:
        assert ood_metrics(id_scores, ood_scores, convention) == reference_metrics(
            id_scores, ood_scores, convention
        ), convention
    fast = {c: ood_metrics(id_scores, ood_scores, c) for c in CONVENTIONS}
    direct = sklearn_direct(id_scores, ood_scores)
    assert fast["neglabel"].auroc == direct["auroc"] == fast["openood"].auroc
    assert fast["neglabel"].aupr_in == direct["ap_in"]
    assert fast["neglabel"].aupr_out == direct["ap_out"]
    assert fast["openood"].fpr95 == direct["fpr95_openood"]
    assert fpr_at_recall_neglabel(id_scores, ood_scores) == _reference_fpr_neglabel(id_scores, ood_scores)
    assert fpr_at_recall_openood(id_scores, ood_scores) == _reference_fpr_openood(id_scores, ood_scores)


# ----------------------------------------------------------------------------- fixed cases
CASES = {
    "hand-worked ties": ([5.0] * 10 + [4.0] * 9 + [2.0], [4.0] * 2 + [3.0] * 3 + [1.0] * 5),
    "saturated 0/1": ([1.0] * 30 + [0.0] * 3, [0.0] * 25 + [1.0] * 4),
    "all equal": ([0.5] * 7, [0.5] * 9),
    "one and one": ([1.0], [0.0]),
    "one and one reversed": ([0.0], [1.0]),
    "one and one tied": ([2.0], [2.0]),
    "perfect": ([1.0, 1.0], [-1.5, -1, -2, -2] + [0] * 16),
    "signed zeros": ([0.0, -0.0, 1.0, -0.0], [-0.0, 0.0, 0.0, -1.0]),
    "diagonal runs": ([3, 2, 1, 0, 3, 2, 1, 0, 5], [3, 2, 1, 0, 3, 2, 1, 0, -5]),
}


@pytest.mark.parametrize("case", CASES)
def test_fixed_cases_equal_the_reference_and_sklearn(case):
    id_scores, ood_scores = (np.asarray(v, dtype=np.float64) for v in CASES[case])
    assert_same(id_scores, ood_scores)


@pytest.mark.parametrize("decimals", [0, 1, 3])
def test_random_data_with_ties_equals_the_reference(decimals):
    rng = np.random.default_rng(decimals)
    id_scores = np.round(rng.normal(1.0, 1.0, 3000), decimals)
    ood_scores = np.round(rng.normal(0.0, 1.3, 2000), decimals)
    assert_same(id_scores, ood_scores)


# ----------------------------------------------------------------------------- properties
def _scores(max_size: int):
    coarse = st.sampled_from([-1.0, 0.0, 0.5, 1.0])  # heavy ties
    fine = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
    return st.one_of(
        arrays(np.float64, st.integers(1, max_size), elements=coarse),
        arrays(np.float64, st.integers(1, max_size), elements=fine),
        arrays(np.float64, st.integers(1, max_size), elements=st.sampled_from([0.0, 1.0])),
    )


# each example asks scikit-learn a dozen times: few examples, many values in each
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SWEEP = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(id_scores=_scores(60), ood_scores=_scores(60))
def test_any_scores_equal_the_reference_and_sklearn(id_scores, ood_scores):
    assert_same(id_scores, ood_scores)


@SWEEP
@given(
    id_star=_scores(40),
    data=st.data(),
    lambdas=st.lists(st.floats(-5, 20, allow_nan=False).map(lambda v: round(v, 2)), min_size=1, max_size=8),
    calibrated=st.booleans(),
)
def test_sweeps_equal_one_lambda_at_a_time(id_star, data, lambdas, calibrated):
    """Every λ of every set, from the batched sorts, equals the metrics of S_final computed at that
    λ alone (``final_score``), by the reference: the figures results.json held before."""
    n = id_star.size
    id_align = data.draw(arrays(np.float64, n, elements=st.sampled_from([-1.0, 0.0, 0.25, 1.0])))
    oods = {}
    for name in ("a", "b"):
        star = data.draw(_scores(40))
        align = data.draw(arrays(np.float64, star.size, elements=st.floats(-3, 3, width=16)))
        oods[name] = (star, align)
    calibration = (
        {"s_neglabel_star": {"mean": 0.3, "std": 1.7}, "p_align": {"mean": -0.1, "std": 0.6}}
        if calibrated
        else None
    )
    sweeps = lambda_sweeps(id_star, id_align, oods, lambdas, calibration)
    for name, (star, align) in oods.items():
        assert list(sweeps[name]) == list(dict.fromkeys(float(lam) for lam in lambdas))
        for lam in lambdas:
            id_final = final_score(id_star, id_align, lam, calibration)
            ood_final = final_score(star, align, lam, calibration)
            expected = {c: reference_metrics(id_final, ood_final, c).as_dict() for c in CONVENTIONS}
            assert sweeps[name][float(lam)] == expected, (name, lam)
        assert lambda_sweep(id_star, id_align, star, align, lambdas, calibration) == sweeps[name]


def test_sweeps_in_several_batches_equal_one_batch(monkeypatch):
    """λ batches (bounded memory) give the figures one batch gives."""
    from negalign_cli.compute import evaluation

    rng = np.random.default_rng(3)
    star, align = np.round(rng.normal(size=500), 1), rng.normal(size=500)
    oods = {"a": (np.round(rng.normal(-1, 1, 300), 1), rng.normal(-0.5, 1, 300))}
    lambdas = [0.0, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0]
    whole = lambda_sweeps(star, align, oods, lambdas)
    monkeypatch.setattr(evaluation, "SWEEP_BATCH_VALUES", 1000)  # two λ per batch
    assert lambda_sweeps(star, align, oods, lambdas) == whole


def test_non_finite_or_empty_scores_are_refused():
    with pytest.raises(ValueError, match="finite"):
        ood_metrics(np.array([1.0, np.nan]), np.array([0.0]))
    with pytest.raises(ValueError, match="finite"):
        ood_metrics(np.array([1.0]), np.array([-np.inf]))
    with pytest.raises(ValueError, match="at least one"):
        lambda_sweeps(np.array([]), np.array([]), {"a": (np.array([1.0]), np.array([0.0]))}, [0.0])


def test_sweeps_do_not_go_through_sklearn(monkeypatch):
    """The sweep is numpy only: scikit-learn's curves (a sort each, one per metric) are not called."""

    def refused(*args, **kwargs):
        raise AssertionError("scikit-learn called")

    for name in ("roc_auc_score", "roc_curve", "precision_recall_curve", "average_precision_score", "auc"):
        monkeypatch.setattr(skm, name, refused)
    rng = np.random.default_rng(0)
    sweeps = lambda_sweeps(
        rng.normal(1, 1, 200),
        rng.normal(size=200),
        {"a": (rng.normal(size=100), rng.normal(size=100))},
        [0, 1],
    )
    assert set(sweeps["a"]) == {0.0, 1.0}


@pytest.mark.parametrize("case", ["hand-worked ties", "saturated 0/1", "diagonal runs", "one and one tied"])
def test_roc_points_are_sklearns(case):
    """The ROC figure's points (``roc_points``, no scikit-learn) are ``roc_curve``'s."""
    from negalign_cli.compute.metrics import roc_points

    id_scores, ood_scores = (np.asarray(v, dtype=np.float64) for v in CASES[case])
    scores, is_id = _labels(id_scores, ood_scores)
    fpr, tpr, _ = skm.roc_curve(is_id, scores)
    ours = roc_points(id_scores, ood_scores)
    np.testing.assert_array_equal(ours[0], fpr)
    np.testing.assert_array_equal(ours[1], tpr)


# ----------------------------------------------------------------------------- a hit imports little
HEAVY = ("numpy", "pandas", "pyarrow", "sklearn", "scipy", "matplotlib", "torch")

_HIT = IMPORT_SPY + textwrap.dedent(
    """

    done = CliRunner().invoke(app, json.loads(sys.argv[1]), env={"COLUMNS": "200"})
    print(json.dumps({"code": done.exit_code, "output": done.output, "first": first,
                      "imported": [m for m in HEAVY if m in sys.modules]}))
    """
)


def test_a_hit_imports_no_pandas_pyarrow_sklearn_nor_numpy(tmp_path):
    """`evaluate` computed here, then rerun in ONE fresh process: the hit (keys from the stat cache,
    a lookup, the rendering, the copy to --out) imports none of HEAVY, and writes what the first run
    wrote. An import hook records where the first heavy import came from."""
    for name, seed, shift in (("id", 0, 1.0), ("a", 1, 0.0), ("b", 2, 0.4)):
        write_scores(tmp_path / f"{name}.parquet", 60, seed, shift)
    calibration = tmp_path / "m3.json"
    calibration.write_text(json.dumps({n: {"mean": 0.5, "std": 0.5} for n in ("s_neglabel_star", "p_align")}))
    argv = [
        "evaluate", "--id", str(tmp_path / "id.parquet"),
        "--ood", f"a={tmp_path / 'a.parquet'}", "--ood", f"b={tmp_path / 'b.parquet'}",
        "--ood-group", "both=a,b", "--compare", "--lambda", "0,0.5,2", "--calibration", str(calibration),
        "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    first = cli(*argv, "--out", str(tmp_path / "first"))
    assert first.exit_code == 0, first.output
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _HIT, json.dumps([*argv, "--out", str(tmp_path / "hit")]), json.dumps(HEAVY)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["code"] == 0, seen["output"]
    assert "cache hit" in " ".join(seen["output"].split()), seen["output"]
    where = {m: seen["first"].get(m) for m in seen["imported"]}
    assert not seen["imported"], f"an evaluate hit imported {seen['imported']}, first from {where}"
    for name in ("results.json", "metrics.csv", "table.csv", "roc.png", "score_hist.png"):
        assert (tmp_path / "hit" / name).read_bytes() == (tmp_path / "first" / name).read_bytes(), name
