"""Known-answer checks on the shipped negalign-toy checkpoint (figures: its model card)."""

from __future__ import annotations

import pytest

from negalign_cli.models import load_model
from negalign_cli.toy.generate import DISTRACTORS
from negalign_cli.toy.report import background_pooling, localisation, vocabulary_split, zero_shot

N = 120


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
    assert accuracy["background"] >= 0.95  # card: 100%
    assert accuracy["object"] >= 0.45  # card: 58.7% on 300 images (55.8% on these 120); chance 8.3%


def test_vocabulary_split(toy):
    split = vocabulary_split(*toy, tau=0.001, distractors=DISTRACTORS)
    assert split["shapes_r_positive"] >= 0.9  # card: 12/12
    assert split["backgrounds_r_negative"] >= 0.8  # card: 9/10
    assert split["roles"]["shapes"]["bg"] == 0 and split["roles"]["backgrounds"]["obj"] == 0
    assert split["roles"]["shapes"]["obj"] >= 6 and split["roles"]["backgrounds"]["bg"] >= 6  # card: 8 and 8


def test_cam_localises_better_than_both_baselines(toy):
    iou = localisation(*toy, n=N, seed=7, blocks=[-1, -2])
    best = iou["gradxact block -1"]
    assert best >= iou["centre prior"] + 0.1  # card: 0.488 against 0.281
    assert best >= iou["random map"] + 0.25  # card: against 0.095
    assert (
        iou["gradcam block -1"] > iou["random map"]
    )  # card: 0.188, below the centre prior (as the design probe found)


def test_background_embeddings_name_the_background(toy):
    accuracy = background_pooling(*toy, n=N, seed=7)
    assert accuracy["whole image (reference)"] >= 0.95
    for mode in ("tokens", "maskclip", "mask"):
        assert accuracy[mode] >= 0.5, mode  # card: 74.7 / 68.7 / 78.3 %; chance 10%
    assert accuracy["clearclip"] >= 0.3  # card: 53.3%
