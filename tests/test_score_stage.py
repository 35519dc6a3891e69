from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from negalign_cli.cli.app import app
from negalign_cli.compute.scores import ScoreConfig
from negalign_cli.errors import NegalignError
from negalign_cli.inputs.words import WordList, load_templates
from negalign_cli.stages.score_files import read_score_metadata
from negalign_cli.stages.scoring import open_image_set, score_images
from negalign_cli.stages.text import text_embeddings
from negalign_cli.stages.vocab import (
    VocabEntry,
    negatives_from_lists,
    negatives_from_split,
    split_scores,
    split_vocab,
)
from tests.helpers import TINY
from tests.helpers.synthetic import write_image_set

runner = CliRunner()
NOUNS = (
    "ocean",
    "teapot",
    "forest",
    "brick wall",
    "sky",
    "lamp",
    "sand",
    "river",
    "kettle",
    "snow",
    "cup",
    "grass",
)
ADJS = ("rusty thing", "blue scene", "wet place", "shiny object")


@pytest.fixture()
def split_dir(tiny_model, workspace, tmp_path):
    entries = [VocabEntry(WordList("t", NOUNS), "noun"), VocabEntry(WordList("t", ADJS), "adj")]
    scores = split_scores(tiny_model, entries, workspace)
    # tau 0 makes every word obj or bg, so both sets are non-empty even on random weights
    split = split_vocab(scores.artifact, workspace, tau=0.0)
    return split.artifact.path


def test_score_stage_end_to_end(tiny_model, workspace, tmp_path, split_dir):
    images = write_image_set(tmp_path / "imgs", n=23, dim=64, seed=0)
    vocab = negatives_from_split(split_dir)
    assert vocab.words[: len(NOUNS)] == NOUNS and vocab.sources.count("adj") == 4
    classes = WordList("t", ("waterbirds", "landbirds"))
    config = ScoreConfig(groups=4, role_aware=True, include_ambiguous=True, neg_topk=3)
    result = score_images(tiny_model, open_image_set(images), classes, vocab, workspace, config)
    frame = pd.read_parquet(result.artifact.file("scores.parquet"))
    expected_columns = [
        "row",
        "path",
        "label",
        "pred_class",
        "pred_name",
        "s_mcm",
        "s_energy",
        "s_maxlogit",
        "s_neglabel_plain",
        "s_neglabel_star",
        "s_bg_pos",
        "s_bg_neg",
        "p_align",
        "s_multimatch",
        "s_negrefine",
        "cam_valid",
    ]
    assert sorted(frame.columns) == sorted(expected_columns)
    assert len(frame) == 23 and frame["path"].iloc[0] == "img_0.png"
    assert frame["cam_valid"].tolist() == [i % 7 != 0 for i in range(23)]
    # --invalid-cam fallback (the default): P_align of an invalid CAM comes from its (whole-image)
    # background like any other row
    np.testing.assert_allclose(frame["p_align"], frame["s_bg_pos"] - frame["s_bg_neg"], atol=1e-6)
    assert (frame.loc[~frame["cam_valid"], "p_align"] != 0).all()
    for policy, value in (("zero", 0.0), ("exclude", np.nan)):
        other = score_images(
            tiny_model, open_image_set(images), classes, vocab, workspace, replace(config, invalid_cam=policy)
        )
        changed = pd.read_parquet(other.artifact.file("scores.parquet"))
        invalid = ~changed["cam_valid"]
        np.testing.assert_array_equal(changed.loc[invalid, "p_align"], value)
        assert changed.loc[invalid, ["s_bg_pos", "s_bg_neg"]].isna().all().all()
        pd.testing.assert_frame_equal(changed[~invalid], frame[~invalid])  # valid rows are untouched
    with pytest.raises(NegalignError, match="unknown --invalid-cam"):
        score_images(
            tiny_model, open_image_set(images), classes, vocab, workspace, replace(config, invalid_cam="drop")
        )
    assert frame["s_negrefine"].to_numpy() == pytest.approx(
        frame["s_neglabel_plain"].to_numpy() + 2 * frame["s_multimatch"].to_numpy()
    )
    assert read_score_metadata(result.artifact.file("scores.parquet"))["model"] == tiny_model.fingerprint
    # the plain NegLabel equals a per-image recomputation from the stored inputs
    x = np.load(images / "image_embeddings.npy").astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    p = text_embeddings(tiny_model, classes.words, load_templates("noun"), workspace).vectors.astype(
        np.float64
    )
    nouns = text_embeddings(tiny_model, NOUNS, load_templates("noun"), workspace).vectors
    adjs = text_embeddings(tiny_model, ADJS, load_templates("adjective"), workspace).vectors
    n = np.concatenate([nouns, adjs]).astype(np.float64)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0)).numpy()
    for i in range(23):
        pos, neg = 100 * x[i] @ p.T, (100 * x[i] @ n.T)[order].reshape(4, 4)
        per_group = [np.exp(pos).sum() / (np.exp(pos).sum() + np.exp(g).sum()) for g in neg]
        assert frame["s_neglabel_plain"].iloc[i] == pytest.approx(np.mean(per_group), abs=2e-6)
    # a switch reruns only `score`: no text is encoded again
    before = workspace.items.count()
    plain = score_images(tiny_model, open_image_set(images), classes, vocab, workspace, ScoreConfig(groups=4))
    assert not plain.hit and workspace.items.count() == before
    again = score_images(tiny_model, open_image_set(images), classes, vocab, workspace, ScoreConfig(groups=4))
    assert again.hit
    plain_frame = pd.read_parquet(plain.artifact.file("scores.parquet"))
    np.testing.assert_array_equal(plain_frame["s_neglabel_star"], plain_frame["s_neglabel_plain"])
    np.testing.assert_array_equal(plain_frame["s_neglabel_plain"], frame["s_neglabel_plain"])


def test_without_cam_background_columns_are_empty(tiny_model, workspace, tmp_path):
    images = write_image_set(tmp_path / "imgs", n=9, dim=64, seed=1, cam=False)
    vocab = negatives_from_lists(WordList("t", NOUNS), None)
    result = score_images(
        tiny_model,
        open_image_set(images),
        WordList("t", ("a", "b")),
        vocab,
        workspace,
        ScoreConfig(groups=3),
        multimatch=False,
    )
    frame = pd.read_parquet(result.artifact.file("scores.parquet"))
    assert frame["p_align"].isna().all() and frame["cam_valid"].isna().all()
    assert frame["s_multimatch"].isna().all() and frame["s_neglabel_plain"].notna().all()
    with pytest.raises(NegalignError, match="--negatives-split"):
        score_images(
            tiny_model,
            open_image_set(images),
            WordList("t", ("a", "b")),
            vocab,
            workspace,
            ScoreConfig(groups=3, role_aware=True),
        )


def test_bad_image_folders(tmp_path, tiny_model, workspace):
    from tests.helpers.synthetic import write_manifest

    with pytest.raises(NegalignError, match="embed images"):
        open_image_set(tmp_path)
    images = write_image_set(tmp_path / "imgs", n=5, dim=64, seed=2)
    np.save(images / "image_embeddings.npy", np.zeros((4, 64), np.float16))
    vocab = negatives_from_lists(WordList("t", NOUNS), None)

    def score():
        return score_images(
            tiny_model,
            open_image_set(images),
            WordList("t", ("a", "b")),
            vocab,
            workspace,
            ScoreConfig(groups=3),
        )

    # a file that no longer matches the folder's manifest is refused before anything is read
    with pytest.raises(NegalignError, match="does not match its manifest.json .image_embeddings.npy has"):
        score()
    write_manifest(images)  # a consistent manifest over inconsistent files
    with pytest.raises(
        NegalignError, match="refers to 5 distinct embedding rows but image_embeddings.npy has 4"
    ):
        score()
    write_manifest(images, model="0000")
    with pytest.raises(NegalignError, match="embedded with model 0000"):
        score()
    (images / "manifest.json").unlink()
    with pytest.raises(NegalignError, match="manifest.json is missing"):
        score()


def test_score_cli(tmp_path, split_dir):
    images = write_image_set(tmp_path / "imgs", n=11, dim=64, seed=3)
    args = [
        "score",
        "--images-dir",
        str(images),
        "--classes",
        "waterbird",
        "--negatives-split",
        str(split_dir),
        "--groups",
        "4",
        "--cache-dir",
        str(tmp_path / "c"),
        "--out",
        str(tmp_path / "s"),
        *TINY,
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "11 images scored" in result.output and (tmp_path / "s" / "scores.parquet").is_file()
    assert "cache hit" in runner.invoke(app, args).output
    bad = runner.invoke(app, [*args, "--groups", "500"])
    assert bad.exit_code != 0 and "cannot fill --groups 500" in bad.output


def test_score_cli_takes_an_artifact_key(tmp_path):
    from negalign_cli.cache.store import ArtifactStore
    from tests.helpers.images import make_image_folder

    folder = make_image_folder(tmp_path / "imgs", per_class=2)
    nouns = tmp_path / "n.txt"
    nouns.write_text("ocean\nforest\nsand\nteapot\n")
    cache = ["--cache-dir", str(tmp_path / "c")]
    assert (
        runner.invoke(
            app, ["embed", "images", "--images", str(folder), "--workers", "0", *cache, *TINY]
        ).exit_code
        == 0
    )
    key = ArtifactStore(tmp_path / "c").records()[0]["key"]
    result = runner.invoke(
        app,
        [
            "score",
            "--images-dir",
            key[:10],
            "--classes",
            "waterbird",
            "--nouns",
            str(nouns),
            "--groups",
            "2",
            *cache,
            *TINY,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "4 images scored" in result.output and "background columns stay empty" in result.output


def test_byte_identical_files_are_scored_one_row_per_path(tmp_path):
    """Real datasets hold exact copies: `embed`/`cam` store one row per content, `score` writes
    one row per listed path, and the copies get equal scores."""
    import shutil

    from tests.helpers.images import make_image_folder

    folder = make_image_folder(tmp_path / "imgs", per_class=3)
    shutil.copy(folder / "birds" / "0.jpg", folder / "boats" / "copy of bird 0.jpg")
    shutil.copy(folder / "birds" / "1.png", folder / "birds" / "1 (2).png")
    shutil.copy(folder / "birds" / "1.png", folder / "boats" / "again.png")
    nouns = tmp_path / "n.txt"
    nouns.write_text("ocean\nforest\nsand\nteapot\nlamp\ncup\n")
    cache = ["--cache-dir", str(tmp_path / "c"), *TINY]
    split = runner.invoke(
        app, ["split-vocab", "--nouns", str(nouns), "--tau", "0", "--out", str(tmp_path / "split"), *cache]
    )
    assert split.exit_code == 0, split.output
    for command in (["embed", "images"], ["cam", "--classes", "waterbird"]):
        out = tmp_path / command[0]
        made = runner.invoke(
            app, [*command, "--images", str(folder), "--workers", "0", "--out", str(out), *cache]
        )
        assert made.exit_code == 0, made.output
        assert "6 of 9 images" in made.output
        assert "3 path(s) byte-identical to an earlier one" in made.output
        scored = runner.invoke(
            app,
            [
                "score",
                "--images-dir",
                str(out),
                "--classes",
                "waterbird",
                "--negatives-split",
                str(tmp_path / "split"),
                "--groups",
                "2",
                "--out",
                str(tmp_path / f"scores_{command[0]}"),
                *cache,
            ],
        )
        assert scored.exit_code == 0, scored.output
        assert "9 images scored" in scored.output
        frame = pd.read_parquet(tmp_path / f"scores_{command[0]}" / "scores.parquet").set_index("path")
        assert len(frame) == 9 and frame.index.is_unique
        images = pd.read_parquet(out / "images.parquet")
        assert images["row"].nunique() == 6 and len(np.load(out / "image_embeddings.npy")) == 6
        by_name = {Path(p).relative_to(folder).as_posix(): p for p in frame.index}
        columns = ["s_mcm", "s_neglabel_plain", "s_neglabel_star", "s_negrefine", "p_align"]
        for copy, original in (
            ("boats/copy of bird 0.jpg", "birds/0.jpg"),
            ("birds/1 (2).png", "birds/1.png"),
            ("boats/again.png", "birds/1.png"),
        ):
            a, b = frame.loc[by_name[copy]], frame.loc[by_name[original]]
            assert a["row"] == b["row"]
            for column in columns:
                assert a[column] == b[column] or (pd.isna(a[column]) and pd.isna(b[column]))
            assert a["label"] != b["label"] or copy.startswith("birds")  # labels stay per path


def test_cheap_checks_come_before_any_model_or_text_work(tmp_path, split_dir):
    """A request that cannot succeed fails at once: the role-aware group check runs before the
    weights are loaded (ViT-B-16/openai is not even on this machine) and before any text is encoded."""
    images = write_image_set(tmp_path / "imgs", n=5, dim=64, seed=3)
    base = [
        "score",
        "--images-dir",
        str(images),
        "--classes",
        "waterbird",
        "--negatives-split",
        str(split_dir),
    ]
    cache = ["--cache-dir", str(tmp_path / "c")]
    result = runner.invoke(app, [*base, "--role-aware", "--groups", "12", *cache])
    assert result.exit_code == 2 and "too few for 12 groups" in result.output, result.output
    assert "weights" not in result.output
    bad_policy = runner.invoke(app, [*base, "--invalid-cam", "skip", "--groups", "2", *cache])
    assert bad_policy.exit_code == 2 and "unknown --invalid-cam 'skip'" in bad_policy.output
    assert not (tmp_path / "c" / "vectors").exists()  # nothing was encoded
