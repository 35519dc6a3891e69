"""Property tests (hypothesis): invariances the scores and metrics must keep on any input."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from negalign_cli.compute.metrics import ood_metrics
from negalign_cli.compute.scores import ScoreConfig, ScoreInputs, compute_scores

D = 8
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _unit(values: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(values.astype(np.float32))
    return torch.nn.functional.normalize(tensor + 1e-3, dim=1)


def _inputs(images, classes, negatives) -> ScoreInputs:
    return ScoreInputs(
        images=_unit(images),
        classes=_unit(classes),
        negatives=_unit(negatives),
        class_names=[f"c{i}" for i in range(len(classes))],
        negative_names=[f"n{i}" for i in range(len(negatives))],
    )


vectors = st.integers(min_value=2, max_value=12).flatmap(
    lambda n: arrays(np.float64, (n, D), elements=st.floats(-1, 1, allow_nan=False, width=32))
)


@FAST
@given(
    images=vectors,
    classes=arrays(np.float64, (3, D), elements=st.floats(-1, 1, width=32)),
    negatives=arrays(np.float64, (8, D), elements=st.floats(-1, 1, width=32)),
    seed=st.integers(0, 10_000),
)
def test_scores_do_not_depend_on_image_order_and_copies_score_alike(images, classes, negatives, seed):
    config = ScoreConfig(groups=2)
    base = compute_scores(_inputs(images, classes, negatives), config)
    order = np.random.default_rng(seed).permutation(len(images))
    doubled = np.concatenate([images[order], images[order][:1]])  # shuffled, plus a copy of one row
    shuffled = compute_scores(_inputs(doubled, classes, negatives), config)
    for name, values in base.items():
        np.testing.assert_allclose(shuffled[name][:-1], values[order], rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(shuffled[name][-1], shuffled[name][0], rtol=1e-6, atol=1e-7, err_msg=name)


@FAST
@given(
    images=vectors,
    classes=arrays(np.float64, (3, D), elements=st.floats(-1, 1, width=32)),
    negatives=arrays(np.float64, (6, D), elements=st.floats(-1, 1, width=32)),
)
def test_neglabel_star_with_every_switch_off_is_neglabel(images, classes, negatives):
    scores = compute_scores(_inputs(images, classes, negatives), ScoreConfig(groups=3))
    np.testing.assert_array_equal(scores["s_neglabel_star"], scores["s_neglabel_plain"])


scores_1d = st.integers(min_value=2, max_value=40).flatmap(
    lambda n: arrays(np.float64, n, elements=st.floats(-5, 5, allow_nan=False, allow_infinity=False))
)


@FAST
@given(id_scores=scores_1d, ood_scores=scores_1d, kind=st.sampled_from(["exp", "cube", "affine"]))
def test_auroc_is_invariant_under_increasing_transforms(id_scores, ood_scores, kind):
    transform = {"exp": np.exp, "cube": lambda v: v**3 + v, "affine": lambda v: 3.0 * v - 7.0}[kind]
    both = np.concatenate([id_scores, ood_scores])
    mapped = transform(both)
    # strictly increasing in floating point too (exp(1e-84) == exp(0) ties two distinct values)
    assume(np.array_equal(np.sign(both[:, None] - both[None, :]), np.sign(mapped[:, None] - mapped[None, :])))
    for convention in ("neglabel", "openood"):
        before = ood_metrics(id_scores, ood_scores, convention)
        after = ood_metrics(transform(id_scores), transform(ood_scores), convention)
        assert abs(before.auroc - after.auroc) < 1e-12


@FAST
@given(id_scores=scores_1d, ood_scores=scores_1d)
def test_metrics_stay_in_range(id_scores, ood_scores):
    for convention in ("neglabel", "openood"):
        metrics = ood_metrics(id_scores, ood_scores, convention)
        for value in (metrics.auroc, metrics.fpr95, metrics.aupr_in, metrics.aupr_out):
            assert 0.0 <= value <= 1.0
