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
OBJECT_ACCURACY = 0.7333  # card: 71.3%
LOCALISATION = {
    "gradcam block -1": 0.255,
    "gradcam block -2": 0.19,
    "gradcam block -3": 0.274,
    "gradcam block -4": 0.212,
    "gradxact block -1": 0.464,
    "gradxact block -2": 0.429,
    "gradxact block -3": 0.393,
    "gradxact block -4": 0.396,
    "random map": 0.088,
    "centre prior": 0.271,
}
POOLING = {
    "tokens": 0.825,
    "maskclip": 0.775,
    "clearclip": 0.6,
    "mask": 0.783,
    "whole image (reference)": 1.0,
}
TOY_TAU = 0.001  # the card's recommended tau for this checkpoint (its r-scores are tiny)


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
    assert accuracy["object"] >= OBJECT_ACCURACY - 0.02, accuracy  # chance 10%


def test_vocabulary_split(toy):
    split = vocabulary_split(*toy, tau=TOY_TAU, distractors=DISTRACTORS)
    assert split["shapes_r_positive"] == 1.0  # card: 10/10
    assert split["backgrounds_r_negative"] >= 0.9  # card: 9/10 (forest: +0.0006)
    roles = split["roles"]
    assert roles["shapes"]["bg"] == 0 and roles["backgrounds"]["obj"] == 0
    assert roles["shapes"]["obj"] >= 8 and roles["backgrounds"]["bg"] >= 8  # card: 8 and 8 of 10


def test_role_table_at_the_methods_tau(toy):
    """Card: at NegAlign's tau = 0.05 every trained word of this checkpoint is ambiguous (its
    |r| ≤ 0.016); the issue's aim (≥ 80% in role) is not met. A checkpoint that meets it fails
    here, and its card's figures replace these."""
    split = vocabulary_split(*toy, tau=DEFAULT_TAU, distractors=DISTRACTORS)
    roles = split["roles"]
    assert roles["shapes"]["ambiguous"] == len(SHAPES) and roles["backgrounds"]["ambiguous"] == len(
        BACKGROUNDS
    )
    assert max(abs(split["r"][w]) for w in (*SHAPES, *BACKGROUNDS)) < 0.02


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
        assert accuracy[mode] >= POOLING[mode] - 0.03, mode  # chance 10%
