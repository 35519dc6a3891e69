"""Fault suite: inputs that do not belong together are refused, never combined; an --out folder
holds only what its manifest lists.

- a CAM made for other classes or class prompts than `score` uses;
- a negatives split scored by another model (`score` and the Python API);
- a score artifact stored before the score registry changed (the key follows the registry);
- a CAM method or background pool name that no registry holds (no silent fallback);
- an --out folder reused by another command (stale files removed; `score`'s advice helps).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import negalign_cli.compute.score_columns as scores_module
import negalign_cli.inputs.words as words_module
from negalign_cli.cache.store import MANIFEST, ArtifactStore, StageSpec
from negalign_cli.compute.score_columns import SCORES, ScoreColumn
from negalign_cli.compute.scores import ScoreConfig
from negalign_cli.compute.vision import (
    BG_POOL_REGISTRY,
    CAM_METHOD_REGISTRY,
    CamConfig,
    cam_batch,
    cam_from_gradients,
)
from negalign_cli.defaults import BG_POOLS, CAM_METHODS
from negalign_cli.errors import NegalignError
from negalign_cli.inputs.words import WordList
from negalign_cli.reporting import RecordingReporter
from negalign_cli.stages import files
from negalign_cli.stages.scoring import open_image_set, score_images
from negalign_cli.stages.vocab import negatives_from_split
from tests.faults.helpers import cli, one_line_error
from tests.helpers.images import make_image_folder

CAM_FILES = (files.BACKGROUND_EMBEDDINGS, files.CAMS, files.FOREGROUND, files.CAM_TABLE)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images, two class lists, one split per model (tiny test model, toy model), a `cam` and an
    `embed images` folder made with the tiny model and classes A."""
    root = tmp_path_factory.mktemp("mismatch")
    cache = ["--cache-dir", str(root / "c")]
    make_image_folder(root / "imgs", per_class=2)
    (root / "classes_a.txt").write_text("birds\nboats\n")
    (root / "classes_b.txt").write_text("cats\ndogs\n")
    (root / "nouns.txt").write_text("ocean\nforest\nsand\nteapot\nlamp\ncup\nkettle\nsky\n")
    runs = [
        ("split-vocab", "--nouns", str(root / "nouns.txt"), "--tau", "0", "--out", str(root / "split_tiny")),
        ("split-vocab", "--nouns", str(root / "nouns.txt"), "--tau", "0", "--model", "negalign-toy",
         "--out", str(root / "split_toy")),
        ("cam", "--images", str(root / "imgs"), "--classes", str(root / "classes_a.txt"), "--workers", "0",
         "--out", str(root / "cam_a")),
        ("embed", "images", "--images", str(root / "imgs"), "--workers", "0", "--out", str(root / "emb")),
    ]  # fmt: skip
    for args in runs:
        done = cli(*args, *cache)
        assert done.exit_code == 0, done.output
    return root


def _score(world: Path, images_dir: Path, classes: str = "classes_a.txt", *extra: str):
    return cli(
        "score", "--images-dir", str(images_dir), "--classes", str(world / classes), "--groups", "2",
        "--cache-dir", str(world / "c"), *extra,
    )  # fmt: skip


# ----------------------------------------------------------------------------- 1: CAM classes, prompts
def test_score_refuses_a_cam_made_for_other_classes(world):
    split = ("--negatives-split", str(world / "split_tiny"))
    same = _score(world, world / "cam_a", "classes_a.txt", *split)
    assert same.exit_code == 0, same.output
    other = _score(world, world / "cam_a", "classes_b.txt", *split)
    line = one_line_error(other, "were computed for other classes")
    assert "classes_a.txt" in line and "classes_b.txt" in line  # which classes each side used
    # the same through --cam-dir beside an `embed images` folder
    beside = _score(world, world / "emb", "classes_b.txt", *split, "--cam-dir", str(world / "cam_a"))
    one_line_error(beside, "were computed for other classes")


def test_score_refuses_a_cam_made_with_other_class_prompts(world, monkeypatch):
    """A `cam` folder made by a negalign whose class templates differ (an upgrade changed them)."""
    real = words_module.template_sets()
    changed = {**real, "noun": (*real["noun"], "a blurry photo of a {}.")}
    monkeypatch.setattr(words_module, "template_sets", lambda: changed)
    done = _score(world, world / "cam_a", "classes_a.txt", "--nouns", str(world / "nouns.txt"))
    one_line_error(done, "other class prompt templates")


def test_cam_records_what_score_checks(world):
    manifest = json.loads((world / "cam_a" / MANIFEST).read_text())
    assert set(manifest["inputs"]) >= {"model", "classes", "class_templates"}
    assert manifest["sources"]["classes"].endswith("classes_a.txt")


# ----------------------------------------------------------------------------- 2: the split's model
def test_score_refuses_a_split_scored_by_another_model(world):
    recorded = json.loads((world / "split_toy" / MANIFEST).read_text())["inputs"]["model"]
    assert recorded != json.loads((world / "split_tiny" / MANIFEST).read_text())["inputs"]["model"]
    done = _score(world, world / "cam_a", "classes_a.txt", "--negatives-split", str(world / "split_toy"))
    line = one_line_error(done, "were scored by model")
    assert recorded[:16] in line and "split-vocab" in line


def test_the_api_refuses_a_split_scored_by_another_model(world):
    from negalign_cli.api import CLIPNegAlign

    settings = {
        "train_dataset": ["birds", "boats"],
        "arch": "negalign-tiny-test",
        "device": "cpu",
        "groups": 2,
        "use_role_aware_negatives": False,
        "cache_dir": world / "c",
    }
    with pytest.raises(NegalignError, match="were scored by model"):
        CLIPNegAlign(negatives_split=world / "split_toy", **settings)
    with CLIPNegAlign(negatives_split=world / "split_tiny", **settings) as model:  # its own model's split
        assert model.negatives.model is not None


def test_an_edited_split_is_refused_and_a_hand_made_one_is_named(world, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(world / "split_tiny", edited)
    table = pd.read_csv(edited / files.SPLIT_SCORES, keep_default_na=False)
    table.loc[0, "r_score"] += 0.5  # edited by hand after split-vocab wrote it
    table.to_csv(edited / files.SPLIT_SCORES, index=False)
    done = _score(world, world / "cam_a", "classes_a.txt", "--negatives-split", str(edited))
    one_line_error(done, "does not match its manifest.json")
    (edited / MANIFEST).unlink()  # a hand-made split: read as it is, its missing model named
    kept = _score(world, world / "cam_a", "classes_a.txt", "--negatives-split", str(edited))
    assert kept.exit_code == 0, kept.output
    assert "do not record the model" in kept.output
    assert negatives_from_split(edited).model is None


# ----------------------------------------------------------------------------- 5: registries
def test_the_score_key_follows_the_registry(world, tiny_model, workspace, monkeypatch):
    image_set = open_image_set(world / "cam_a")
    classes = WordList("t", ("birds", "boats"))
    negatives = negatives_from_split(world / "split_tiny")

    def run():
        return score_images(tiny_model, image_set, classes, negatives, workspace, ScoreConfig(groups=2))

    assert not run().hit
    assert run().hit  # unchanged registry: the stored artifact is reused
    extra = ScoreColumn("s_added", "Added", "a score added in a later version", method=True)
    monkeypatch.setattr(scores_module, "SCORES", (*SCORES, extra))
    assert not run().hit  # a new column: the stored artifact lacks it
    monkeypatch.setattr(scores_module, "SCORES", (dataclasses.replace(SCORES[0], version=2), *SCORES[1:]))
    assert not run().hit  # a column's formula changed


def test_cam_registries_name_what_the_cli_offers():
    assert tuple(CAM_METHOD_REGISTRY) == CAM_METHODS and tuple(BG_POOL_REGISTRY) == BG_POOLS


def test_unknown_cam_methods_and_pools_are_refused_at_every_entry_point(world, tiny_model, tmp_path):
    activation, gradient = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    with pytest.raises(NegalignError, match="unknown --cam-method 'gradxcat'"):
        cam_from_gradients(activation, gradient, "gradxcat")  # was: gradxact, silently
    with pytest.raises(NegalignError, match="unknown --cam-method"):
        CamConfig(method="gradxcat")
    with pytest.raises(NegalignError, match="unknown --bg-pool 'tokenz'"):
        CamConfig(bg_pool="tokenz")
    config = CamConfig()
    object.__setattr__(config, "bg_pool", "tokenz")  # a config that escaped the check
    images = torch.randn(2, 3, tiny_model.image_size, tiny_model.image_size)
    classes = torch.nn.functional.normalize(torch.randn(2, tiny_model.embed_dim), dim=-1)
    with pytest.raises(NegalignError, match="unknown --bg-pool"):
        cam_batch(tiny_model.model, images, classes, config)  # was: clearclip, silently
    from negalign_cli.api import CLIPNegAlign

    with pytest.raises(NegalignError, match="unknown bg_pool='tokenz'"):  # the API names its argument
        CLIPNegAlign(train_dataset=["a"], arch="negalign-tiny-test", bg_pool="tokenz", cache_dir=tmp_path)
    done = cli("cam", "--images", str(world / "imgs"), "--classes", "waterbird", "--cam-method", "gradxcat")
    one_line_error(done, "unknown --cam-method 'gradxcat': use gradcam, gradxact")


def test_every_registered_cam_method_and_pool_computes_its_own_result(tiny_model):
    torch.manual_seed(0)
    images = torch.randn(3, 3, tiny_model.image_size, tiny_model.image_size)
    classes = torch.nn.functional.normalize(torch.randn(2, tiny_model.embed_dim), dim=-1)
    cams = [cam_batch(tiny_model.model, images, classes, CamConfig(method=m)).cams for m in CAM_METHODS]
    assert not torch.allclose(cams[0], cams[1])
    pooled = [
        cam_batch(tiny_model.model, images, classes, CamConfig(bg_pool=p, fg_percentile=50)).background
        for p in BG_POOLS
    ]
    for i in range(len(pooled)):
        for j in range(i):
            assert not torch.allclose(pooled[i], pooled[j]), (BG_POOLS[i], BG_POOLS[j])


# ----------------------------------------------------------------------------- 14: a reused --out
def test_a_reused_out_keeps_only_the_new_outputs(world, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(world / "cam_a", out)  # a `cam --out` folder
    (out / "notes.txt").write_text("the user's own file\n")
    done = cli("embed", "images", "--images", str(world / "imgs"), "--workers", "0", "--out", str(out),
               "--cache-dir", str(world / "c"))  # fmt: skip
    assert done.exit_code == 0, done.output
    assert not any((out / name).exists() for name in CAM_FILES), sorted(p.name for p in out.iterdir())
    assert (out / "notes.txt").read_text() == "the user's own file\n"
    assert "removed" in done.output and files.CAM_TABLE in done.output
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["stage"] == "embed-images"
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["outputs"], MANIFEST, "notes.txt"])
    scored = _score(world, out, "classes_a.txt", "--nouns", str(world / "nouns.txt"))
    assert scored.exit_code == 0, scored.output  # was: refused, advising a rerun that changed nothing
    assert "no CAM outputs" in scored.output


def test_score_names_leftover_files_and_what_to_do(world, tmp_path):
    """A folder an older negalign left CAM files in, under an `embed images` manifest."""
    folder = tmp_path / "mixed"
    shutil.copytree(world / "emb", folder)
    for name in CAM_FILES:
        shutil.copyfile(world / "cam_a" / name, folder / name)
    done = _score(world, folder, "classes_a.txt", "--nouns", str(world / "nouns.txt"))
    line = one_line_error(done, "an earlier command left them there")
    assert "`embed-images` output" in line and "delete them" in line and "--cam-dir" in line


def test_drawings_of_the_previous_output_are_named(world, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(world / "cam_a", out)
    (out / files.VIZ_DIR).mkdir()
    (out / files.VIZ_DIR / "0.png").write_bytes(b"an overlay of the cam run")
    args = ("embed", "images", "--images", str(world / "imgs"), "--workers", "0", "--out", str(out),
            "--cache-dir", str(world / "c"))  # fmt: skip
    first = cli(*args)
    assert first.exit_code == 0, first.output
    assert f"warning: {files.VIZ_DIR} in {out} were drawn from the output" in first.output
    assert (out / files.VIZ_DIR / "0.png").is_file()  # named, never deleted
    again = cli(*args)  # the same artifact again: nothing in the folder is stale
    assert again.exit_code == 0 and "were drawn from" not in again.output, again.output


def test_export_removes_only_what_negalign_wrote(tmp_path):
    def compute(folder):
        (folder / "a.txt").write_text("new\n")

    artifact = ArtifactStore(tmp_path / "cache").run(StageSpec("demo", 1, {}), compute).artifact
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "escape.txt").write_text("outside --out\n")
    listed = {name: {"sha256": "0", "bytes": 0} for name in ("old.bin", "../escape.txt", "report")}
    (out / MANIFEST).write_text(json.dumps({"stage": "demo", "outputs": listed}))
    for name in ("old.bin", "cam.parquet", "notes.txt"):
        (out / name).write_text(name)
    (out / "report").mkdir()
    reporter = RecordingReporter()
    artifact.export(out, known={"cam.parquet"}, reporter=reporter)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", MANIFEST, "notes.txt", "report"]
    assert (tmp_path / "escape.txt").is_file()
    assert "removed cam.parquet, old.bin" in reporter.text()


def test_every_file_name_is_classed_for_exports():
    """A new file name in stages/files.py must say whether an export may remove it."""
    named = {value for key, value in vars(files).items() if key.isupper() and isinstance(value, str)}
    assert named <= files.ARTIFACT_FILES | files.RENDERED, named - files.ARTIFACT_FILES - files.RENDERED
    assert not files.ARTIFACT_FILES & files.RENDERED


def test_export_refuses_to_replace_or_remove_its_own_inputs(tmp_path):
    """`score --out <its cam folder>` deleted the CAM outputs it had just read, and `evaluate --out
    <its score folder>` the ID score file; an export over the command's inputs is refused before
    anything is written. Other files of another stage's output go as before (a reused --out)."""

    def compute(folder):
        (folder / "results.json").write_text("{}\n")

    artifact = ArtifactStore(tmp_path / "cache").run(StageSpec("evaluate", 1, {}), compute).artifact
    scored = tmp_path / "scored"  # another stage's output, with its manifest
    scored.mkdir()
    (scored / "scores.parquet").write_text("scores")
    (scored / MANIFEST).write_text(json.dumps({"stage": "score", "outputs": {"scores.parquet": {}}}))
    with pytest.raises(NegalignError, match="holds scores.parquet, an input of this evaluate"):
        artifact.export(scored, inputs=[scored / "scores.parquet"])
    assert sorted(p.name for p in scored.iterdir()) == [MANIFEST, "scores.parquet"]
    collected = tmp_path / "collected"  # score files gathered by hand: no manifest
    collected.mkdir()
    (collected / "scores.parquet").write_text("scores")
    (collected / "ood.parquet").write_text("ood")
    inputs = [collected / "ood.parquet", collected / "scores.parquet"]
    with pytest.raises(NegalignError, match="holds scores.parquet, an input of this evaluate"):
        artifact.export(collected, known={"scores.parquet"}, inputs=inputs)
    assert sorted(p.name for p in collected.iterdir()) == ["ood.parquet", "scores.parquet"]
    # inputs the export leaves alone do not stop it; without them, the reused --out is replaced
    artifact.export(collected, known={"scores.parquet"}, inputs=[collected / "ood.parquet"])
    assert sorted(p.name for p in collected.iterdir()) == [MANIFEST, "ood.parquet", "results.json"]
    artifact.export(scored, inputs=[tmp_path / "elsewhere" / "scores.parquet"])
    assert sorted(p.name for p in scored.iterdir()) == [MANIFEST, "results.json"]


def test_score_out_into_its_cam_folder_keeps_the_cam_outputs(world, tmp_path):
    """`score --images-dir X --out X` deleted the embeddings and CAM outputs it had just read."""
    folder = tmp_path / "cam"
    shutil.copytree(world / "cam_a", folder)
    before = sorted(p.name for p in folder.iterdir())
    done = _score(
        world, folder, "classes_a.txt", "--negatives-split", str(world / "split_tiny"), "--out", str(folder)
    )
    one_line_error(done, "an input of this score: writing the output there would replace or remove it")
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.parametrize("temperature", ["-1", "0", "nan", "inf"])
def test_score_refuses_an_mcm_temperature_that_is_not_above_zero(world, temperature):
    """A negative temperature made MCM the least similar class's probability (1 - p for two
    classes), exit 0; 0, nan and inf crashed as "unexpected". One line, before any weight loads."""
    split = ("--negatives-split", str(world / "split_tiny"))
    done = _score(world, world / "cam_a", "classes_a.txt", *split, "--mcm-temperature", temperature)
    one_line_error(done, "--mcm-temperature must be a finite number above 0")
