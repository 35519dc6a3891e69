"""Known-answer checks on the shipped negalign-toy checkpoint (figures: its model card).

The figures below are what ``negalign toy report --images 120`` prints for this checkpoint (the
same functions, seeds and images as these tests); the card lists the 300-image figures. The
checks are deterministic up to floating-point order, so the margins are small."""

from __future__ import annotations

import pytest

from negalign_cli.defaults import BG_POOLS, CAM_METHODS, DEFAULT_TAU
from negalign_cli.models import load_model
from negalign_cli.toy.generate import DISTRACTORS
from negalign_cli.toy.report import background_pooling, localisation, vocabulary_split, zero_shot
from negalign_cli.toy.world import BACKGROUNDS, SHAPES

N = 120
# `negalign toy report --images 120` on this checkpoint (card: the 300-image figures)
OBJECT_ACCURACY = 0.925  # card: 91.3% on 300 images (aim ≥ 90%)
LOCALISATION = {
    "gradcam block -1": 0.152,
    "gradcam block -2": 0.207,
    "gradcam block -3": 0.206,
    "gradcam block -4": 0.208,
    "gradxact block -1": 0.423,
    "gradxact block -2": 0.478,
    "gradxact block -3": 0.396,
    "gradxact block -4": 0.383,
    "random map": 0.088,
    "centre prior": 0.271,
}
POOLING = {
    "tokens": 0.508,
    "maskclip": 0.558,
    "clearclip": 0.808,
    "mask": 0.85,
    "whole image (reference)": 1.0,
}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from negalign_cli.cache.workspace import Workspace

    return load_model("negalign-toy"), Workspace.open(tmp_path_factory.mktemp("toy-cache"))


def test_checkpoint_loads_without_pretrained(toy):
    model, _ = toy
    assert model.weights.startswith("bundled checkpoint") and model.embed_dim == 64
    assert model.preprocess_cfg["size"] in (64, (64, 64))


def test_zero_shot_accuracy(toy):
    accuracy = zero_shot(*toy, n=N, seed=7)
    assert accuracy["background"] >= 0.99  # card: 100%
    assert accuracy["object"] == pytest.approx(OBJECT_ACCURACY, abs=0.02), accuracy  # chance 10%
    assert accuracy["object"] >= 0.90  # the aim the checkpoint was trained for


def test_role_table_at_the_methods_tau(toy):
    """Card: at NegAlign's own tau = 0.05 every shape is `obj` and every background `bg` (10/10
    each; aim ≥ 80%), with a wide gap: r ≥ +0.75 for shapes, r ≤ −0.34 for backgrounds, on these
    images (the previous checkpoint's |r| stayed below 0.016, all `ambiguous` at 0.05)."""
    split = vocabulary_split(*toy, tau=DEFAULT_TAU, distractors=DISTRACTORS)
    assert split["shapes_r_positive"] == 1.0 and split["backgrounds_r_negative"] == 1.0
    roles = split["roles"]
    assert roles["shapes"] == {"obj": len(SHAPES), "bg": 0, "ambiguous": 0}
    assert roles["backgrounds"] == {"obj": 0, "bg": len(BACKGROUNDS), "ambiguous": 0}
    assert min(split["r"][w] for w in SHAPES) > 0.6
    assert max(split["r"][w] for w in BACKGROUNDS) < -0.25
    # far from the threshold: the same table at 4× and at ¼ of tau
    for tau in (4 * DEFAULT_TAU, DEFAULT_TAU / 4):
        again = vocabulary_split(*toy, tau=tau, distractors=DISTRACTORS)["roles"]
        assert again["shapes"]["obj"] == len(SHAPES) and again["backgrounds"]["bg"] == len(BACKGROUNDS)


@pytest.fixture(scope="module")
def iou(toy):
    return localisation(*toy, n=N, seed=7, blocks=[-1, -2, -3, -4])


def test_localisation_baselines(iou):
    for baseline in ("random map", "centre prior"):
        assert iou[baseline] == pytest.approx(LOCALISATION[baseline], abs=0.005)


@pytest.mark.parametrize("block", [-1, -2, -3, -4])
@pytest.mark.parametrize("method", CAM_METHODS)
def test_cam_localisation_against_both_baselines(iou, method, block):
    name = f"{method} block {block}"
    expected = LOCALISATION[name]
    assert iou[name] == pytest.approx(expected, abs=0.02)
    for baseline in ("random map", "centre prior"):
        gap = expected - LOCALISATION[baseline]
        if abs(gap) >= 0.04:  # on the card's side of each baseline, where the card's gap is clear
            assert (iou[name] - iou[baseline]) * gap > 0, baseline
    if method == "gradxact":  # card: gradxact beats both baselines at every block, by a wide margin
        assert iou[name] >= iou["centre prior"] + 0.08 and iou[name] >= iou["random map"] + 0.25


def test_background_embeddings_name_the_background(toy):
    accuracy = background_pooling(*toy, n=N, seed=7)
    assert accuracy["whole image (reference)"] >= 0.99
    for mode in BG_POOLS:
        assert accuracy[mode] == pytest.approx(POOLING[mode], abs=0.03), mode  # chance 10%
