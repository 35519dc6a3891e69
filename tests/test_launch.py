"""`negalign launch` through submitit's local executor: shards as processes, a killed shard rerun
alone, the merge equal to one unsharded run."""

from __future__ import annotations

import json
import signal

import pytest

from tests.faults.helpers import cli, one_line_error
from tests.faults.test_interruptions import interrupt, negalign
from tests.helpers import TINY
from tests.helpers.images import make_image_folder


@pytest.mark.slow
@pytest.mark.ci  # three shard processes, one killed and rerun: make test-ci (CI runs it)
def test_launch_local_reruns_only_the_killed_shard(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEGALIGN_CACHE")
    folder = make_image_folder(tmp_path / "imgs", per_class=12)  # 24 images, 12 per shard
    stage = ["embed", "images", "--images", str(folder), *TINY, "--batch-size", "2", "--workers", "0"]
    whole = cli(*stage, "--cache-dir", "c-whole", "--out", "whole")  # in-process: not the point
    assert whole.exit_code == 0, whole.output
    # both shards through submitit's local executor, merged: the bytes of the one-process run
    fresh = negalign("launch", *stage, "--shards", "2", "--shards-dir", "fresh", "--out", "fresh-out")
    assert fresh.returncode == 0, fresh.stderr + fresh.stdout
    assert "2 shard(s) ran, 0 were done already" in fresh.stdout
    for name in ("image_embeddings.npy", "images.parquet"):
        assert (tmp_path / "fresh-out" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()

    runs = tmp_path / "runs"
    assert cli(*stage, "--shard", "0/2", "--shards-dir", str(runs)).exit_code == 0  # in-process
    # shard 1 is killed after 2 of its 6 batches: no done marker, but its cache keeps those images
    code = interrupt(
        tmp_path / "markers", 2, signal.SIGKILL, *stage, "--shard", "1/2", "--shards-dir", str(runs)
    )
    assert code == -signal.SIGKILL
    assert not (runs / "shard-00001-of-00002" / "done.json").exists()

    launched = negalign("launch", *stage, "--shards", "2", "--shards-dir", str(runs), "--out", "merged")
    assert launched.returncode == 0, launched.stderr + launched.stdout
    assert "1 shard(s) ran, 1 were done already" in launched.stdout
    shard_one = json.loads((runs / "shard-00001-of-00002" / "artifact" / "manifest.json").read_text())
    assert (
        0 < shard_one["counts"]["encoded"] < 12 and shard_one["counts"]["cached"] >= 2
    )  # resumed: batch 1 was stored before batch 2 began
    for name in ("image_embeddings.npy", "images.parquet"):
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert list((runs / "logs").iterdir())  # submitit kept the shard's log

    again = negalign("launch", *stage, "--shards", "2", "--shards-dir", str(runs), "--no-merge")
    assert again.returncode == 0 and "0 shard(s) ran, 2 were done already" in again.stdout


def test_launch_refuses_bad_requests(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = make_image_folder(tmp_path / "imgs")
    base = ["launch", "embed", "images", "--images", str(folder), "--shards", "2", "--shards-dir", "r"]
    one_line_error(cli(*base, "--executor", "pbs"), "--executor must be local or slurm")
    one_line_error(cli("launch", "score", "--shards", "2", "--shards-dir", "r"), "launch runs embed or cam")
    one_line_error(cli(*base, "--shard", "0/2"), "--shard is launch's to set")
    one_line_error(cli(*base, "--slurm-arg", "account"), "KEY=VALUE")


def test_slurm_executor_settings(tmp_path, monkeypatch):
    """The sbatch script submitit writes from launch's options (the real cluster runs are in
    tests/test_launch_slurm.py)."""
    from pathlib import Path

    from negalign_cli.errors import NegalignError
    from negalign_cli.stages.launch import LaunchConfig, _executor

    config = LaunchConfig(
        executor="slurm",
        array_parallelism=16,
        partition="gpu",
        cpus_per_shard=8,
        mem_gb=64,
        timeout_min=240,
        account="proj1",
        qos="high",
        gres="gpu:a100:1",
        constraint="a100",
        exclude="node7",
        mail_type="END,FAIL",
        mail_user="me@example.org",
        setup=("module load cuda",),
        slurm_extra={"reservation": "r1"},
    )
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM here
    with pytest.raises(NegalignError, match="needs SLURM's commands"):
        _executor(config, tmp_path / "logs", "cam")
    for name in ("srun", "sbatch", "squeue", "scontrol"):
        (tmp_path / name).write_text("#!/bin/sh\nexit 0\n")
        (tmp_path / name).chmod(0o755)
    executor = _executor(config, Path(tmp_path / "logs"), "cam")
    script = executor._make_submission_file_text("python -m negalign_cli", "uid")
    for line in (
        "--partition=gpu",
        "--cpus-per-task=8",
        "--mem=64GB",
        "--time=240",
        "--account=proj1",
        "--qos=high",
        "--gres=gpu:a100:1",
        "--constraint=a100",
        "--exclude=node7",
        "--mail-type=END,FAIL",
        "--mail-user=me@example.org",
        "--reservation=r1",
        "--job-name=negalign-cam",
        "\nmodule load cuda\n",
    ):
        assert line in script, line
    assert "gpus" not in script  # none asked for: a CPU partition refuses --gpus-per-node
    assert "/logs/%j/" in script  # an array task: logs/<array>_<task>/, made before the release
    assert executor.parameters["array_parallelism"] == 16
    # the job name is launch's to set (it lost to submitit's default as --slurm-arg job-name=X)
    named = LaunchConfig(executor="slurm", job_name="mine", gpus_per_shard=2)
    script = _executor(named, tmp_path / "logs", "cam")._make_submission_file_text("x", "uid")
    assert "--job-name=mine" in script and "--job-name=submitit" not in script
    assert "--gpus-per-node=2" in script
    with pytest.raises(NegalignError, match="--slurm-arg job_name repeats a launch option"):
        _executor(LaunchConfig(executor="slurm", slurm_extra={"job-name": "x"}), tmp_path / "logs")


def test_slurm_time_formats():
    from negalign_cli.errors import NegalignError
    from negalign_cli.stages.launch import parse_time

    assert parse_time("90") == 90 * 60
    assert parse_time("04:00:00") == 4 * 3600
    assert parse_time("1-12:00:00") == 36 * 3600
    assert parse_time("2-6") == 54 * 3600 and parse_time("0-0:30") == 30 * 60
    assert parse_time("5:30") == 330  # MM:SS
    for bad in ("2h", "", "1-", "0", "00:00:00", "1:2:3:4"):
        with pytest.raises(NegalignError, match="SLURM time|longer than zero"):
            parse_time(bad)


@pytest.mark.slow
def test_a_failing_shard_shows_its_error_line(tmp_path, monkeypatch):
    """A shard that fails on its node (here: --strict and an unreadable image, which only reading
    the image finds) is reported with its own one-line error, and exit 2 says "fix, then rerun"."""
    monkeypatch.chdir(tmp_path)
    folder = make_image_folder(tmp_path / "imgs", per_class=2)
    (folder / "boats" / "9.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")  # in shard 1
    stage = ["launch", "embed", "images", "--images", str(folder), *TINY, "--workers", "0", "--strict"]
    result = cli(*stage, "--shards", "2", "--shards-dir", "runs")
    line = one_line_error(result, "1 of 2 shard(s) failed: shard 1/2: skipped 1 image(s) (")
    assert "--strict turns skips into a failure" in line and "fix, then rerun" in line
    assert "(log " in line and "runs/logs/" in line
