from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from negalign_cli.errors import NegalignError
from negalign_cli.toy.generate import ToySpec, generate_toy
from negalign_cli.toy.world import (
    BACKGROUNDS,
    SHAPES,
    caption,
    patch_mask,
    render,
    scene_rng,
    shape_mask,
    texture,
)


def test_world_has_enough_names():
    assert len(SHAPES) >= 12 and len(BACKGROUNDS) >= 10


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_are_sane(shape):
    mask = shape_mask(shape, 32, 32, 18, 0.4)
    area = mask.sum()
    assert 250 < area < 1100, area
    assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()
    assert mask[32, 32] or shape in ("ring", "crescent")  # the centre is inside, except for the hollow ones


def test_textures_differ_and_render_is_deterministic():
    means = [texture(b, np.random.default_rng(0)).mean(axis=(0, 1)) for b in BACKGROUNDS]
    for i in range(len(means)):
        for j in range(i + 1, len(means)):
            assert np.abs(means[i] - means[j]).max() > 0.02 or i == j
    a = render("star", "water", np.random.default_rng(5))
    b = render("star", "water", np.random.default_rng(5))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.image.dtype == np.uint8 and a.image.shape == (64, 64, 3)
    empty = render(None, "sand", np.random.default_rng(1))
    assert not empty.mask.any() and empty.shape is None
    with_object = render("circle", "snow", np.random.default_rng(9))
    inside = with_object.image[with_object.mask].astype(float)
    outside = with_object.image[~with_object.mask].astype(float)
    assert np.abs(inside.mean(0) - outside.mean(0)).max() > 20  # the shape is painted over the texture


def test_patch_mask_and_captions():
    mask = np.zeros((64, 64), bool)
    mask[:16, :12] = True
    grid = patch_mask(mask, 8)
    assert grid.shape == (8, 8) and grid[:2, :2].all()
    assert grid.sum() == 4  # the half-covered second column counts (0.5 ≥ 0.5)
    assert patch_mask(mask, 8, threshold=0.6).sum() == 2
    rng = np.random.default_rng(0)
    texts = [caption("star", "water", rng) for _ in range(50)]
    assert all("star" in t for t in texts) and any("water" in t for t in texts)
    assert all("star" not in caption(None, "water", rng) for _ in range(10))


def test_scene_rng_is_per_image():
    a = scene_rng(0, "id", 5).random(3)
    assert np.array_equal(a, scene_rng(0, "id", 5).random(3))
    assert not np.array_equal(a, scene_rng(0, "id", 6).random(3))
    assert not np.array_equal(a, scene_rng(0, "ood_spurious", 5).random(3))
    assert not np.array_equal(a, scene_rng(1, "id", 5).random(3))


def test_generate_toy(tmp_path):
    spec = ToySpec(seed=3, n_id=200, n_ood=40, n_train=12)
    counts = generate_toy(tmp_path / "toy", spec)
    assert counts == {"id": 200, "ood_spurious": 40, "ood_nonspurious": 40, "train": 12}
    root = tmp_path / "toy"
    assert (root / "classes.txt").read_text().split() == ["star", "heart"]
    vocab = (root / "vocab.txt").read_text().split("\n")
    assert "star" not in vocab and "heart" not in vocab and "water" in vocab and "circle" in vocab
    meta = pd.read_csv(root / "id" / "metadata.csv", keep_default_na=False)
    assert set(meta["label"]) == {"star", "heart"}
    majority = (meta["group"] == "majority").mean()
    assert 0.9 < majority <= 1.0
    star = meta[meta["label"] == "star"]
    on_water_group = star["background"].isin(["water", "snow"])
    assert (on_water_group == (star["group"] == "majority")).all()
    # Waterbirds' columns: the ID split reads as a Waterbirds metadata.csv with --split
    assert (meta["img_filename"] == meta["path"]).all()
    assert (meta["y"] == meta["label"].map({"star": 0, "heart": 1})).all()
    assert (meta["place"] == meta["background"].isin(["forest", "grass"]).astype(int)).all()
    assert meta["split"].value_counts().to_dict() == {2: 100, 0: 80, 1: 20}
    from negalign_cli.inputs.datasets import list_images

    test_split = list_images(root / "id" / "metadata.csv", split="test")
    assert len(test_split) == 100 and test_split.extra["place"] == [
        str(p) for p in meta["place"][meta["split"] == 2]
    ]
    assert test_split.paths[0] == str(root / "id" / meta["path"][meta["split"] == 2].iloc[0])
    row = meta.iloc[0]
    image = np.asarray(Image.open(root / "id" / row["path"]))
    mask = np.asarray(Image.open(root / "id" / row["mask"])) > 0
    assert image.shape == (64, 64, 3) and mask.any()
    spurious = pd.read_csv(root / "ood_spurious" / "metadata.csv", keep_default_na=False)
    assert (spurious["shape"] == "").all() and set(spurious["background"]) <= {
        "water",
        "snow",
        "forest",
        "grass",
    }
    for path in spurious["mask"][:5]:
        assert not np.asarray(Image.open(root / "ood_spurious" / path)).any()
    other = pd.read_csv(root / "ood_nonspurious" / "metadata.csv", keep_default_na=False)
    assert not set(other["shape"]) & {"star", "heart"}
    assert not set(other["background"]) & {"water", "snow", "forest", "grass"}
    assert "caption" in pd.read_csv(root / "train" / "metadata.csv").columns
    manifest = pd.read_csv(root / "id" / "manifest.csv")
    assert list(manifest.columns) == ["path", "label"] and len(manifest) == 200
    # deterministic: a second generation writes identical bytes
    generate_toy(tmp_path / "again", spec)
    assert (tmp_path / "again" / "id" / row["path"]).read_bytes() == (root / "id" / row["path"]).read_bytes()
    with pytest.raises(NegalignError, match="correlation"):
        generate_toy(tmp_path / "bad", ToySpec(correlation=0.2))
