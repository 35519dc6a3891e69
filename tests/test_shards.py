"""Sharded runs: the plan, the shard slices, merge equal to one unsharded run byte for byte."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given
from hypothesis import strategies as st

from negalign_cli.errors import NegalignError
from negalign_cli.stages.shards import Shard, resolve_shard, shard_from_env
from tests.faults.helpers import cli, one_line_error
from tests.helpers.images import make_awkward_images, make_image_folder, rgb

ROW_FILES = {
    "embed": ["image_embeddings.npy", "images.parquet"],
    "cam": [
        "image_embeddings.npy",
        "images.parquet",
        "background_embeddings.npy",
        "cams.npy",
        "foreground.npy",
        "cam.parquet",
    ],
}


@given(st.integers(0, 500), st.integers(1, 40))
def test_shard_slices_cover_the_list_once(n, k):
    bounds = [Shard(i, k).bounds(n) for i in range(k)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_shard_from_the_scheduler():
    assert shard_from_env({}) is None
    slurm = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "5"}
    assert shard_from_env(slurm) == Shard(2, 4)
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "3"}) == Shard(1, 3)
    assert resolve_shard("2/5", slurm) == Shard(2, 5)  # the option wins
    assert Shard.parse("0/1").name == "shard-00000-of-00001"
    for bad in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises(NegalignError):
            Shard.parse(bad)
    with pytest.raises(NegalignError, match="SLURM_ARRAY_TASK_ID"):
        resolve_shard(None, {})


def _images(root):
    folder = make_image_folder(root / "data", per_class=4)
    make_awkward_images(folder / "odd")
    # byte-identical files on both sides of the 2-shard boundary, and an odd name
    rgb(99).save(folder / "birds" / "a copy.png")
    shutil.copyfile(folder / "birds" / "a copy.png", folder / "odd" / "zz copy.png")
    shutil.copyfile(folder / "birds" / "1.png", folder / "odd" / "ünïcode 1.png")
    return folder


def _command(kind):
    return ["embed", "images"] if kind == "embed" else ["cam", "--classes", "birds_classes.txt"]


@pytest.mark.parametrize("kind", ["embed", "cam"])
def test_two_shards_merged_equal_one_run(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEGALIGN_CACHE")  # so that each shard takes its own cache in its folder
    (tmp_path / "birds_classes.txt").write_text("bird\nboat\n")
    folder = _images(tmp_path)
    base = [*_command(kind), "--images", str(folder), "--batch-size", "3", "--workers", "0"]
    whole = cli(*base, "--cache-dir", "c-whole", "--out", "whole")
    assert whole.exit_code == 0, whole.output
    for i in (0, 1):
        shard = cli(*base, "--shard", f"{i}/2", "--shards-dir", "runs")
        assert shard.exit_code == 0, shard.output
        assert (tmp_path / "runs" / f"shard-0000{i}-of-00002" / "cache").is_dir()  # its own cache
    merged = cli("merge", "runs", "--cache-dir", "c-merge", "--out", "merged")
    assert merged.exit_code == 0, merged.output
    assert "merged 2 shard(s)" in merged.output
    for name in ROW_FILES[kind]:
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    first, second = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("whole", "merged"))
    assert first["key"] == second["key"]
    assert first["counts"]["duplicates"] == second["counts"]["duplicates"] == 2
    assert first["counts"]["skipped"] == second["counts"]["skipped"] == 2  # the corrupt and empty files
    # the merged artifact is the unsharded one: a one-process run on that cache is a cache hit
    again = cli(*base, "--cache-dir", "c-merge")
    assert again.exit_code == 0 and "cache hit" in again.output, again.output


def test_done_shards_are_skipped_and_the_plan_is_frozen(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = _images(tmp_path)
    base = ["embed", "images", "--images", str(folder), "--workers", "0", "--shards-dir", "runs"]
    assert cli(*base, "--shard", "0/3").exit_code == 0
    rerun = cli(*base, "--shard", "0/3")
    assert rerun.exit_code == 0 and "done already" in rerun.output, rerun.output
    one_line_error(cli("merge", "runs"), "2 of 3 shard(s) are not done (shard 1, 2)")
    # the scheduler's variables choose the shard
    slurm = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert cli(*base, env=slurm).exit_code == 0
    assert (tmp_path / "runs" / "shard-00001-of-00003" / "done.json").is_file()
    # a changed image list, another shard count, other settings: refused by the frozen plan
    rgb(123).save(folder / "birds" / "new.png")
    one_line_error(cli(*base, "--shard", "2/3"), "image list differ from the plan")
    (folder / "birds" / "new.png").unlink()
    one_line_error(cli(*base, "--shard", "2/4"), "differ from the plan")
    one_line_error(cli(*base, "--shard", "2/3", "--store-dtype", "float16"), "settings (store_dtype)")
    # a damaged finished shard is not done any more: it reruns alone
    artifact = tmp_path / "runs" / "shard-00000-of-00003" / "artifact" / "image_embeddings.npy"
    artifact.write_bytes(artifact.read_bytes()[:-8])
    assert cli(*base, "--shard", "2/3").exit_code == 0
    one_line_error(cli("merge", "runs"), "1 of 3 shard(s) are not done (shard 0)")
    redo = cli(*base, "--shard", "0/3")
    assert redo.exit_code == 0 and "done already" not in redo.output
    assert cli("merge", "runs", "--out", "m").exit_code == 0


def test_shard_option_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = make_image_folder(tmp_path / "data")
    one_line_error(
        cli("embed", "images", "--images", str(folder), "--shard", "0/2"), "--shard needs --shards-dir"
    )
    one_line_error(
        cli("embed", "images", "--images", str(folder), "--shards-dir", "r", "--shard", "0/2", "--out", "o"),
        "not --out",
    )
    one_line_error(cli("embed", "images", "--images", str(folder), "--shards-dir", "r"), "give --shard i/K")
    one_line_error(cli("merge", "nowhere"), "holds no plan.json")
    one_line_error(
        cli("embed", "images", "--images", str(folder), "--shards-dir", "r", "--shard", "0/7"),
        "7 shards for 6 images",
    )


def test_merge_refuses_a_shard_folder_of_another_shard(tmp_path, monkeypatch):
    """A copy of shard 0's folder in shard 1's place must not be merged as shard 1's slice."""
    monkeypatch.chdir(tmp_path)
    hearts = make_image_folder(tmp_path / "data", per_class=3)  # 6 images: two classes, 3 per shard
    base = ["embed", "images", "--images", str(hearts), "--workers", "0", "--shards-dir", "runs"]
    for i in (0, 1):
        assert cli(*base, "--shard", f"{i}/2").exit_code == 0
    runs = tmp_path / "runs"
    shutil.rmtree(runs / "shard-00001-of-00002")
    shutil.copytree(runs / "shard-00000-of-00002", runs / "shard-00001-of-00002")
    one_line_error(cli("merge", "runs", "--out", "m"), "holds the results of shard 0/2, not of shard 1/2")
    assert not (tmp_path / "m").exists()
    # even with its done.json edited to claim the right index, its rows name shard 0's images
    done = runs / "shard-00001-of-00002" / "done.json"
    record = json.loads(done.read_text())
    done.write_text(json.dumps({**record, "shard": [1, 2]}))
    one_line_error(cli("merge", "runs", "--out", "m"), "does not hold shard 1/2's images (row 0 is")
    # the misplaced folder is not "done": rerunning shard 1 replaces it, then the merge is whole
    done.write_text(json.dumps(record))
    assert "done already" not in cli(*base, "--shard", "1/2").output
    merged = cli("merge", "runs", "--out", "m")
    assert merged.exit_code == 0, merged.output
    import pandas as pd

    table = pd.read_parquet(tmp_path / "m" / "images.parquet")
    assert table["status"].eq("ok").all() and table["digest"].nunique() == 6


def test_merge_counts_this_runs_shards_on_a_cache_hit(tmp_path, monkeypatch):
    """After a K = 2 merge, the K = 3 merge of the same list is a cache hit of the same artifact;
    its line names this run's 3 shards (it said "merged 2 shard(s)", the cached merge's count)."""
    monkeypatch.chdir(tmp_path)
    folder = make_image_folder(tmp_path / "data", per_class=3)
    base = ["embed", "images", "--images", str(folder), "--workers", "0"]
    for count in (2, 3):
        for i in range(count):
            assert cli(*base, "--shard", f"{i}/{count}", "--shards-dir", f"runs{count}").exit_code == 0
        merged = cli("merge", f"runs{count}", "--cache-dir", "c-merge")
        assert merged.exit_code == 0, merged.output
        assert f"merged {count} shard(s), 6 of 6 images" in merged.output, merged.output
    assert "(cache hit)" in merged.output
