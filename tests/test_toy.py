from __future__ import annotations

from pathlib import Path

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
    assert len(SHAPES) >= 10 and len(BACKGROUNDS) >= 10  # 10 well-separated shapes: the model card says why
    assert len(set(SHAPES)) == len(SHAPES) and not set(SHAPES) & set(BACKGROUNDS)


def test_captions_use_the_vocabulary_splits_prompt_forms():
    from negalign_cli.assets import template_sets
    from negalign_cli.toy.world import BACKGROUND_PROMPTS, OBJECT_PROMPTS

    templates = template_sets()
    assert [t.format("{o}") for t in templates["object"]] == list(OBJECT_PROMPTS)
    assert [t.format("{b}") for t in templates["background"]] == list(BACKGROUND_PROMPTS)
    rng = np.random.default_rng(1)
    objects = [caption("ring", "lava", rng, shape_only=1.0) for _ in range(2000)]
    backgrounds = [caption(None, "lava", rng) for _ in range(2000)]
    object_forms = {p.format(o="ring") for p in OBJECT_PROMPTS}
    background_forms = {p.format(b="lava") for p in BACKGROUND_PROMPTS}
    assert 0.45 < np.mean([c in object_forms for c in objects]) < 0.55  # OBJECT_MIX: half
    assert 0.2 < np.mean([c == "ring" for c in objects]) < 0.3  # a quarter bare
    assert all("lava" not in c for c in objects)
    assert 0.55 < np.mean([c in background_forms for c in backgrounds]) < 0.65  # BACKGROUND_MIX
    assert 0.2 < np.mean([c == "lava" for c in backgrounds]) < 0.3
    assert not any(
        c in object_forms for c in (p.format(o="lava") for p in OBJECT_PROMPTS) if c in backgrounds
    )


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
    assert counts == {
        "id": 200,
        "id_minority": 40,
        "ood_spurious": 40,
        "ood_spurious_object": 40,
        "ood_nonspurious": 40,
        "train": 12,
    }
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
    from negalign_cli.inputs.listing import list_images

    test_split = list_images(root / "id" / "metadata.csv", split="test")
    assert len(test_split) == 100 and test_split.extra["place"] == [
        str(p) for p in meta["place"][meta["split"] == 2]
    ]
    assert test_split.paths[0] == str(root / "id" / meta["path"][meta["split"] == 2].iloc[0])
    row = meta.iloc[0]
    image = np.asarray(Image.open(root / "id" / row["path"]))
    mask = np.asarray(Image.open(root / "id" / row["mask"])) > 0
    assert image.shape == (64, 64, 3) and mask.any()
    # the mask is the drawn shape: its pixels differ from the texture around it
    assert np.abs(image[mask].astype(float).mean(0) - image[~mask].astype(float).mean(0)).max() > 10
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
    # the new splits: ID shapes on the other class's backgrounds; unknown shapes on the ID backgrounds
    minority = pd.read_csv(root / "id_minority" / "metadata.csv", keep_default_na=False)
    swapped = {"star": {"forest", "grass"}, "heart": {"water", "snow"}}
    assert set(minority["label"]) == {"star", "heart"} and (minority["group"] == "minority").all()
    assert all(b in swapped[s] for s, b in zip(minority["shape"], minority["background"], strict=True))
    objects = pd.read_csv(root / "ood_spurious_object" / "metadata.csv", keep_default_na=False)
    assert not set(objects["shape"]) & {"star", "heart"} and len(set(objects["shape"])) == len(SHAPES) - 2
    assert set(objects["background"]) <= {"water", "snow", "forest", "grass"}
    # a split folder holds images only (masks live in OUT/masks): a folder read yields the images
    for split in counts:
        files = [p for p in (root / split).rglob("*") if p.is_file()]
        assert sorted(p.suffix for p in files if p.suffix != ".png") == [".csv", ".csv"]
        assert sum(p.suffix == ".png" for p in files) == counts[split]
        assert len(list((root / "masks" / split).rglob("*.png"))) == counts[split]
    # the ID test set and its minority group, both readable as manifests
    from negalign_cli.inputs.listing import list_images

    test_set = list_images(root / "id_test.csv")
    assert len(test_set) == 240 and all(Path(p).is_file() for p in test_set.paths)
    group = list_images(root / "groups" / "minority.csv", allow_outside_root=True)
    expected = int((meta["group"] == "minority").sum()) + 40
    assert len(group) == expected and set(map(str, map(Path.resolve, map(Path, group.paths)))) <= {
        str(Path(p).resolve()) for p in test_set.paths
    }
    assert "caption" in pd.read_csv(root / "train" / "metadata.csv").columns
    manifest = pd.read_csv(root / "id" / "manifest.csv")
    assert list(manifest.columns) == ["path", "label"] and len(manifest) == 200
    # deterministic: a second generation writes identical bytes
    generate_toy(tmp_path / "again", spec)
    assert (tmp_path / "again" / "id" / row["path"]).read_bytes() == (root / "id" / row["path"]).read_bytes()
    with pytest.raises(NegalignError, match="correlation"):
        generate_toy(tmp_path / "bad", ToySpec(correlation=0.2))


def test_embedding_a_toy_split_folder_reads_its_images_only(tmp_path):
    from negalign_cli.inputs.listing import list_images

    generate_toy(tmp_path / "toy", ToySpec(seed=1, n_id=30, n_ood=4))
    listed = list_images(tmp_path / "toy" / "id")
    assert len(listed) == 30 and not any("mask" in p for p in listed.paths)


def test_role_swapped_training_scenes():
    """A wallpaper of a shape (shown with background prompt forms) and a blob of a texture (object
    forms): both differ from the usual scenes the way the prompt forms say."""
    from negalign_cli.toy.training import role_swapped_scene
    from negalign_cli.toy.world import (
        BACKGROUND_PROMPTS,
        OBJECT_PROMPTS,
        render_pattern,
        render_texture_object,
    )

    pattern = render_pattern("star", np.random.default_rng(0)).astype(float)
    colours, counts = np.unique(pattern.reshape(-1, 3), axis=0, return_counts=True)
    painted = counts.max() / counts.sum()
    assert 0.08 < painted < 0.5  # many small stars in one colour cover a fair share of the image
    blob = render_texture_object("lava", np.random.default_rng(0)).astype(float)
    corners = np.concatenate([blob[:6, :6].reshape(-1, 3), blob[-6:, -6:].reshape(-1, 3)])
    assert corners.std(axis=0).max() < 12  # the backdrop is plain
    standing = (np.abs(blob - blob[:6, :6].mean((0, 1))).max(axis=2) > 40).mean()
    assert 0.08 < standing < 0.6  # and one lava blob stands on it
    rng = np.random.default_rng(4)
    texts = [role_swapped_scene(rng)[1] for _ in range(200)]
    backgrounds_as_objects = [
        t for t in texts if any(t == p.format(o=b) for p in OBJECT_PROMPTS for b in BACKGROUNDS)
    ]
    shapes_as_backgrounds = [
        t for t in texts if any(t == p.format(b=s) for p in BACKGROUND_PROMPTS for s in SHAPES)
    ]
    assert len(backgrounds_as_objects) + len(shapes_as_backgrounds) == 200
    assert 70 < len(shapes_as_backgrounds) < 130


def test_training_batches_do_not_depend_on_the_workers():
    """Batch ``step`` is a function of (seed, stage, step): rendered here or by two spawned worker
    processes, a run draws the same images and captions, and a second stage draws other ones."""
    from negalign_cli.toy.training import TrainConfig, _batches, batch_for_step, to_tensor

    here = list(_batches(TrainConfig(steps=3), workers=0))
    spawned = list(_batches(TrainConfig(steps=3), workers=2))
    for (a, ca), (b, cb) in zip(here, spawned, strict=True):
        np.testing.assert_array_equal(a, b)
        assert ca == cb
    assert not np.array_equal(here[0][0], here[1][0])
    second_stage, _ = batch_for_step(TrainConfig(init="x.pt"), 1)
    assert not np.array_equal(second_stage, here[0][0])
    # the preprocessing: OpenAI's mean and std, channels first
    images = here[0][0][:4]
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    want = ((images / np.float32(255.0) - mean) / std).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(to_tensor(images).numpy(), want, atol=1e-5)


def test_toy_train_command_writes_a_loadable_checkpoint(tmp_path):
    """Two steps of `negalign toy train` on the CPU: the checkpoint (fp16, the bundled model's
    keys and shapes, under 10 MB), the log of each probe and the summary; auto workers are none on
    a CPU."""
    import json

    import torch
    from typer.testing import CliRunner

    from negalign_cli.cli.app import app
    from negalign_cli.models import PROJECT_MODELS, bundled_checkpoint
    from negalign_cli.toy.training import auto_workers

    assert auto_workers(torch.device("cpu")) == 0 and 0 <= auto_workers(torch.device("cuda")) <= 12
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["toy", "train", "--out", str(out), "--steps", "2", "--eval-every", "1", "--device", "cpu", "-q"]
    )
    assert result.exit_code == 0, result.output
    state = torch.load(out / "negalign-toy.pt", weights_only=True)
    bundled = torch.load(bundled_checkpoint(PROJECT_MODELS["negalign-toy"]), weights_only=True)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in bundled.items()}
    assert state["visual.conv1.weight"].dtype == torch.float16
    assert (out / "negalign-toy.pt").stat().st_size < 10_000_000
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2] and all(0 <= e["object"] <= 1 for e in log)
    summary = json.loads((out / "training.json").read_text())
    assert summary["config"]["steps"] == 2 and summary["final"] == log[-1]
