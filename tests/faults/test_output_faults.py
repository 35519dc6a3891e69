"""Fault suite: outputs, artifacts and mismatches. Nothing half-written is ever taken for done."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from negalign_cli.stages import files
from tests.faults.helpers import cli, one_line_error
from tests.helpers.images import make_image_folder


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """split-vocab → cam (ID and OOD) → score, with the tiny model; returns the folders."""
    root = tmp_path_factory.mktemp("pipeline")
    cache = ["--cache-dir", str(root / "c")]
    nouns = root / "nouns.txt"
    nouns.write_text("ocean\nforest\nsand\nteapot\nlamp\ncup\nkettle\nsky\n")
    assert (
        cli(
            "split-vocab", "--nouns", str(nouns), "--tau", "0", "--out", str(root / "split"), *cache
        ).exit_code
        == 0
    )
    for name, seed_offset in (("id", 2), ("ood", 3)):
        folder = make_image_folder(root / f"imgs_{name}", per_class=seed_offset)
        made = cli(
            "cam",
            "--images",
            str(folder),
            "--classes",
            "waterbird",
            "--workers",
            "0",
            "--out",
            str(root / f"cam_{name}"),
            *cache,
        )
        assert made.exit_code == 0, made.output
        scored = cli(
            "score",
            "--images-dir",
            str(root / f"cam_{name}"),
            "--classes",
            "waterbird",
            "--negatives-split",
            str(root / "split"),
            "--groups",
            "2",
            "--out",
            str(root / f"scores_{name}"),
            *cache,
        )
        assert scored.exit_code == 0, scored.output
    return root


def _score(root: Path, images_dir: Path, *extra: str):
    return cli(
        "score", "--images-dir", str(images_dir), "--classes", "waterbird", "--negatives-split",
        str(root / "split"), "--groups", "2", "--cache-dir", str(root / "c"), *extra,
    )  # fmt: skip


# ----------------------------------------------------------------------------- --out
def test_disk_full_during_the_export_leaves_no_half_written_folder(pipeline, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = shutil.copyfile

    def full_on_third(src, dst, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            with open(dst, "wb") as handle:
                handle.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return original(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", full_on_third)
    out = tmp_path / "out"
    result = cli(
        "cam",
        "--images",
        str(pipeline / "imgs_id"),
        "--classes",
        "waterbird",
        "--workers",
        "0",
        "--cache-dir",
        str(pipeline / "c"),
        "--out",
        str(out),
    )
    one_line_error(result, "disk full while writing")
    assert sorted(p.name for p in out.iterdir()) == []  # nothing visible, no manifest
    monkeypatch.setattr(shutil, "copyfile", original)
    one_line_error(_score(pipeline, out), "not found")


@pytest.mark.parametrize(
    "name", [files.IMAGE_EMBEDDINGS, files.IMAGE_TABLE, files.BACKGROUND_EMBEDDINGS, files.CAM_TABLE]
)
@pytest.mark.parametrize("damage", ["truncate", "empty", "edit"])
def test_score_refuses_a_damaged_folder(pipeline, tmp_path, name, damage):
    folder = tmp_path / "copy"
    shutil.copytree(pipeline / "cam_id", folder)
    path = folder / name
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "edit": data[:-3] + b"abc"}[damage])
    one_line_error(_score(pipeline, folder), "does not match its manifest.json")


def test_score_refuses_a_folder_without_a_manifest(pipeline, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(pipeline / "cam_id", folder)
    (folder / "manifest.json").unlink()
    one_line_error(_score(pipeline, folder), "manifest.json is missing")


@pytest.mark.parametrize(
    "name",
    [
        files.IMAGE_EMBEDDINGS,
        files.IMAGE_TABLE,
        files.CAMS,
        files.FOREGROUND,
        files.CAM_TABLE,
        "manifest.json",
    ],
)
def test_a_damaged_artifact_file_is_detected_and_rebuilt(pipeline, tmp_path, name):
    """Corrupting any file of a cached `cam` artifact is reported and the artifact recomputed."""
    cache = tmp_path / "c"
    shutil.copytree(pipeline / "c", cache)
    args = [
        "cam",
        "--images",
        str(pipeline / "imgs_id"),
        "--classes",
        "waterbird",
        "--workers",
        "0",
        "--cache-dir",
        str(cache),
    ]
    first = cli(*args)
    assert "cache hit" in first.output
    folder = Path(first.output.split("cam artifact: ")[1].split()[0])
    target = folder / name
    target.write_bytes(target.read_bytes()[:-5])
    again = cli(*args)
    assert again.exit_code == 0 and "is corrupt" in again.output and "recomputing it" in again.output
    assert "cache hit" in cli(*args).output


# ----------------------------------------------------------------------------- mismatches
def test_evaluate_refuses_mixed_score_settings(pipeline, tmp_path):
    other = _score(
        pipeline,
        pipeline / "cam_ood",
        "--groups",
        "1",
        "--mcm-temperature",
        "0.01",
        "--out",
        str(tmp_path / "s"),
    )
    assert other.exit_code == 0, other.output
    base = [
        "evaluate",
        "--id",
        str(pipeline / "scores_id" / files.SCORES),
        "--ood",
        f"ood={tmp_path / 's' / files.SCORES}",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    line = one_line_error(cli(*base), "made with different settings")
    assert "groups: ID=2, ood=1" in line and "mcm_temperature" in line
    assert cli(*base, "--allow-mixed-settings").exit_code == 0


# ----------------------------------------------------------------------------- hygiene
@pytest.mark.slow
def test_writes_stay_under_out_and_the_cache(pipeline, tmp_path, monkeypatch):
    """No ./viz, no matplotlib cache in $HOME, no `pymp-*` or other temporary files in /tmp: real
    processes, with DataLoader workers, in an empty working folder (the refusal runs in-process there)."""
    import subprocess
    import sys

    home, work, tmp = tmp_path / "home", tmp_path / "work", tmp_path / "tmp"
    for folder in (home, work, tmp):
        folder.mkdir()
    env = {
        k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME")
    }
    env.update(HOME=str(home), TMPDIR=str(tmp), HF_HUB_OFFLINE="1", COLUMNS="200")

    def negalign(*args):
        return subprocess.run(
            [sys.executable, "-m", "negalign_cli", *args], cwd=work, env=env, capture_output=True, text=True
        )

    cache = ["--cache-dir", str(tmp_path / "c")]
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    no_out = cli("cam", "--images", str(pipeline / "imgs_id"), "--classes", "waterbird", "--viz", "2", *cache)
    assert no_out.exit_code == 2 and "--viz writes under --out" in no_out.stderr
    one_line_error(no_out, "--viz writes under --out")
    viz = negalign(
        "cam",
        "--images",
        str(pipeline / "imgs_id"),
        "--classes",
        "waterbird",
        "--viz",
        "2",
        "--workers",
        "2",
        "--model",
        "negalign-tiny-test",
        "--out",
        str(tmp_path / "o"),
        *cache,
    )
    assert viz.returncode == 0, viz.stderr
    plots = negalign(
        "evaluate",
        "--id",
        str(pipeline / "scores_id" / files.SCORES),
        "--ood",
        f"ood={pipeline / 'scores_ood' / files.SCORES}",
        "--out",
        str(tmp_path / "r"),
        *cache,
    )
    assert plots.returncode == 0, plots.stderr
    assert list(work.iterdir()) == [] and list(home.iterdir()) == [] and list(tmp.iterdir()) == []
    assert (
        len(list((tmp_path / "o" / "viz").glob("*.png"))) == 2 and (tmp_path / "r" / files.ROC_PLOT).is_file()
    )


@pytest.mark.slow
def test_workers_under_a_temporary_folder_too_long_for_a_socket(pipeline, tmp_path):
    """DataLoader workers pass tensors through a Unix socket under the temporary folder; with a
    TMPDIR (and a cache) whose paths are too long for one, the first batch was lost and `embed
    images` waited 10 minutes for the loader's timeout. A real process with real workers."""
    import subprocess
    import sys

    deep = tmp_path / ("t" * 40) / ("u" * 40)
    deep.mkdir(parents=True)
    assert len(os.fsencode(deep)) + 32 > 107  # …/pymp-xxxxxxxx/listener-xxxxxxxx cannot be bound
    env = {**os.environ, "TMPDIR": str(deep), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    args = ["embed", "images", "--images", str(pipeline / "imgs_id"), "--model", "negalign-tiny-test"]
    done = subprocess.run(
        [sys.executable, "-m", "negalign_cli", *args, "--workers", "2", "--cache-dir", str(deep / "c"),
         "--out", str(tmp_path / "workers")],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    alone = cli(
        *args, "--workers", "0", "--cache-dir", str(tmp_path / "c0"), "--out", str(tmp_path / "alone")
    )
    assert alone.exit_code == 0, alone.output
    np.testing.assert_array_equal(
        np.load(tmp_path / "workers" / files.IMAGE_EMBEDDINGS),
        np.load(tmp_path / "alone" / files.IMAGE_EMBEDDINGS),
    )


# ----------------------------------------------------------------------------- messages
def test_clear_messages(pipeline, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(64))
    line = one_line_error(
        cli(
            "embed", "texts", "-c", "waterbird", "--pretrained", str(junk), "--cache-dir", str(tmp_path / "c")
        ),
        "could not load",
    )
    assert "UnpicklingError" in line or "Error" in line and "not an open_clip state dict" in line
    line = one_line_error(
        cli(
            "embed",
            "texts",
            "-c",
            "waterbird",
            "-n",
            "negrefine-imagenet",
            "--cache-dir",
            str(tmp_path / "c"),
        ),
        "unknown bundled negative list",
    )
    assert "negrefine-imagenet-noun" in line
    line = one_line_error(
        cli(
            "evaluate",
            "--id",
            str(pipeline / "scores_id" / files.SCORES),
            "--ood",
            f"o={pipeline / 'scores_ood' / files.SCORES}",
            "--score",
            "s_nope",
            "--cache-dir",
            str(tmp_path / "c"),
        ),
        "lacks column(s) s_nope",
    )
    assert "s_mcm" in line  # names the columns it has
    line = one_line_error(
        cli(
            "embed",
            "texts",
            "-c",
            "waterbird",
            "--model",
            "ViT-B-32",
            "--pretrained",
            "openai",
            "--cache-dir",
            str(tmp_path / "c"),
        ),
        "could not get the weights ViT-B-32/openai",
    )
    assert "set HF_HUB_OFFLINE=1" not in line and line.rstrip().endswith(
        "negalign-toy"
    )  # already set: no advice


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    import negalign_cli.inputs.words as words

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(words, "load_classes", broken)
    args = ["embed", "texts", "-c", "waterbird", "--cache-dir", str(tmp_path / "c")]
    one_line_error(cli(*args), "unexpected ZeroDivisionError: a bug", code=1)
    debug = cli("--debug", *args)
    assert debug.exit_code != 0 and isinstance(debug.exception, ZeroDivisionError)


def test_json_of_every_exported_manifest_lists_what_the_folder_holds(pipeline):
    for name in ("cam_id", "scores_id", "split"):
        folder = pipeline / name
        manifest = json.loads((folder / "manifest.json").read_text())
        assert set(manifest["outputs"]) == {p.name for p in folder.iterdir() if p.name != "manifest.json"}
        assert np.all([(folder / n).stat().st_size == m["bytes"] for n, m in manifest["outputs"].items()])


def test_score_refuses_a_cam_folder_of_another_image_list(pipeline, tmp_path):
    """Same model, same number of images, different lists: P_align would land on the wrong rows."""
    other = make_image_folder(tmp_path / "other", per_class=2)  # as many images as imgs_id
    made = cli(
        "embed",
        "images",
        "--images",
        str(other),
        "--workers",
        "0",
        "--cache-dir",
        str(pipeline / "c"),
        "--out",
        str(tmp_path / "emb"),
    )
    assert made.exit_code == 0, made.output
    one_line_error(
        _score(pipeline, tmp_path / "emb", "--cam-dir", str(pipeline / "cam_id")), "different image lists"
    )
