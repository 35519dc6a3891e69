"""`negalign launch --executor slurm` on a real SLURM cluster (slurmctld + slurmd + munge; CI starts a
one-node one with scripts/slurm-setup.sh): K = 2 runs of `embed images` and `cam` merged byte for
byte equal to one unsharded run, a requeued task waited for and resumed from its cache, a cancelled
task rerun alone, a changed list refused, sbatch refusals on one line, --max-wait.

Without a cluster (no `sinfo`, or no idle node) these tests skip, except in CI (`CI` set), where
they fail: CI must never skip them. The shards are slowed down (tests/helpers/slow_site: one
marker file per stored batch) so that a task can be requeued or cancelled mid-run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.helpers import cli, one_line_error
from tests.helpers import TINY
from tests.helpers.images import make_image_folder, rgb

ROOT = Path(__file__).resolve().parents[1]
SLOW_SITE = Path(__file__).resolve().parent / "helpers" / "slow_site"
WAIT = 600  # seconds: the CI machine is small and shared; the data is tiny


_UNREACHABLE: list[str] = []  # a controller found not answering once (sinfo takes ~10 s to say so)


def _cluster_problem(wait: float = 120.0) -> str | None:
    """Why the SLURM tests cannot run here, or None. A node still busy with an earlier test's
    tasks is waited for; a controller that does not answer is not."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return (
            "no SLURM here (sinfo/sbatch not on PATH); `scripts/slurm-setup.sh start` starts a one-node one"
        )
    if _UNREACHABLE:
        return _UNREACHABLE[0]
    deadline = time.monotonic() + wait
    while True:
        try:
            asked = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"sinfo failed ({exc})"
        if asked.returncode != 0:  # no controller to ask: waiting would not bring one (was: 2 min)
            _UNREACHABLE.append(
                f"sinfo failed: {asked.stderr.strip()[:160]}; `scripts/slurm-setup.sh start` starts one"
            )
            return _UNREACHABLE[0]
        states = asked.stdout.split()
        if "idle" in states:
            return None
        if time.monotonic() > deadline:
            return f"no idle SLURM node after {wait:.0f} s (sinfo: {', '.join(states) or 'nothing'})"
        time.sleep(1)


@pytest.fixture()
def slurm(tmp_path, monkeypatch):
    problem = _cluster_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests: {problem}")
        pytest.skip(problem)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEGALIGN_CACHE")  # merges go to ./.negalign-cache in tmp_path
    return tmp_path


def _array(shards_dir: Path) -> str:
    return json.loads((shards_dir / "launch.json").read_text())["array"]


def _start(args: list[str], markers: Path, delay: str = "1") -> subprocess.Popen:
    """`negalign ARGS` in the background, its shards slowed (one marker per stored batch)."""
    markers.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SLOW_SITE), str(ROOT)]),
        "NEGALIGN_TEST_MARKERS": str(markers),
        "NEGALIGN_TEST_BATCH_DELAY": delay,
        "HF_HUB_OFFLINE": "1",
        "COLUMNS": "200",
    }
    env.pop("NEGALIGN_CACHE", None)
    return subprocess.Popen(
        [sys.executable, "-m", "negalign_cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _until(condition, what: str, process: subprocess.Popen | None = None, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"ended before {what}: {process.stdout.read()}{process.stderr.read()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _scontrol(*args: str) -> None:
    subprocess.run(["scontrol", *args], check=True, capture_output=True)


def _state(task: str) -> str:
    found = subprocess.run(["squeue", "-h", "-j", task, "-o", "%T"], capture_output=True, text=True)
    return found.stdout.strip()


def _same_files(a: Path, b: Path, names) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow
@pytest.mark.ci
def test_embed_k2_requeued_task_resumes_and_a_changed_list_is_refused(slurm):
    tmp_path = slurm
    folder = make_image_folder(tmp_path / "imgs", per_class=6)  # 12 images, 6 per shard
    stage = ["embed", "images", "--images", str(folder), *TINY, "--batch-size", "1", "--workers", "0"]
    whole = cli(*stage, "--cache-dir", "c-whole", "--out", "whole")
    assert whole.exit_code == 0, whole.output
    launch = [*stage, "--shards", "2", "--shards-dir", "runs", "--executor", "slurm"]
    running = _start(["launch", *launch, "--out", "merged"], tmp_path / "markers")
    runs = tmp_path / "runs"
    # task 1 stored its first batch: SLURM requeues it (SIGTERM, same job id, pending again)
    _until(lambda: any((tmp_path / "markers").glob("task1-*")), "task 1's first batch", running)
    array = _array(runs)
    names = subprocess.run(["squeue", "-h", "-j", array, "-o", "%j"], capture_output=True, text=True)
    assert set(names.stdout.split()) == {"negalign-embed-images"}  # not submitit's default name
    _scontrol("requeue", f"{array}_1")  # it starts again once its credential expired (10 s here)
    _until(lambda: _state(f"{array}_1") == "PENDING", "the requeued task to be pending", timeout=120)
    out, err = running.communicate(timeout=WAIT)
    assert running.returncode == 0, out + err
    assert "2 shard(s) ran, 0 were done already" in out and "merged 2 shard(s)" in out, out
    assert "Traceback" not in err and "Bypassing sacct" not in err, err
    # what it waits for: counts (and SLURM's pending reason) each time they change
    assert re.search(
        rf"job array {array}: [0-2] pending( \([A-Za-z, ]+\))?, [1-2] running, [0-1] done", err
    ), err
    _same_files(tmp_path / "merged", tmp_path / "whole", ["image_embeddings.npy", "images.parquet"])
    # the requeued shard resumed from its own cache: fewer images computed the second time
    counts = json.loads((runs / "shard-00001-of-00002" / "artifact" / "manifest.json").read_text())["counts"]
    assert counts["cached"] >= 1 and counts["encoded"] < 6, counts
    assert len(list((tmp_path / "markers").glob("task1-*"))) < 6 + 6  # not run twice over

    # a changed image list is refused before anything is submitted (it used to merge the old run)
    rgb(77).save(folder / "birds" / "new.png")
    refused = cli("launch", *launch, "--out", "again")
    one_line_error(refused, "image list differ from the plan frozen in runs/plan.json")
    assert _array(runs) == array and not (tmp_path / "again").exists()


@pytest.mark.slow
@pytest.mark.ci
def test_cam_k2_a_cancelled_task_reruns_alone(slurm):
    tmp_path = slurm
    (tmp_path / "classes.txt").write_text("bird\nboat\n")
    folder = make_image_folder(tmp_path / "imgs", per_class=4)  # 8 images, 4 per shard
    stage = ["cam", "--classes", "classes.txt", "--images", str(folder), *TINY]
    stage += ["--batch-size", "1", "--workers", "0"]
    whole = cli(*stage, "--cache-dir", "c-whole", "--out", "whole")
    assert whole.exit_code == 0, whole.output
    launch = ["launch", *stage, "--shards", "2", "--shards-dir", "runs", "--executor", "slurm"]
    running = _start([*launch, "--no-merge"], tmp_path / "markers")
    _until(lambda: any((tmp_path / "markers").glob("task0-*")), "task 0's first batch", running)
    array = _array(tmp_path / "runs")
    subprocess.run(["scancel", f"{array}_0"], check=True)
    out, err = running.communicate(timeout=WAIT)
    assert running.returncode == 2, out + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "1 of 2 shard(s) failed: shard 0/2: SLURM ended it as CANCELLED" in errors[0]
    assert "run the same command again" in errors[0] and "Traceback" not in err
    # the relaunch runs shard 0 only, then merges: the bytes of the one-process run
    again = cli(*launch, "--out", "merged", "--cache-dir", "c-merge")
    assert again.exit_code == 0, again.output
    # the merge stores into launch's --cache-dir; each shard cached in its own folder
    assert (tmp_path / "c-merge" / "artifacts" / "cam").is_dir()
    assert not (tmp_path / ".negalign-cache").exists()
    for i in (0, 1):
        assert (tmp_path / "runs" / f"shard-0000{i}-of-00002" / "cache" / "vectors").is_dir()
    assert "1 shard(s) ran, 1 were done already" in again.output and "merged 2 shard(s)" in again.output
    names = ["image_embeddings.npy", "images.parquet", "background_embeddings.npy", "cams.npy"]
    _same_files(tmp_path / "merged", tmp_path / "whole", [*names, "foreground.npy", "cam.parquet"])


@pytest.mark.slow
def test_sbatch_refusals_max_wait_and_a_running_array(slurm):
    tmp_path = slurm
    folder = make_image_folder(tmp_path / "imgs", per_class=1)
    launch = ["launch", "embed", "images", "--images", str(folder), *TINY, "--workers", "0"]
    launch += ["--shards", "2", "--shards-dir", "runs", "--executor", "slurm"]
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    # this cluster has no GPU: asking for one is sbatch's error, on one line, exit 2, nothing queued
    one_line_error(cli(*launch, "--gpus-per-shard", "1"), "SLURM refused the job array: ")
    one_line_error(cli(*launch, "--partition", "nowhere"), "invalid partition")
    one_line_error(cli(*launch, "--time", "2h"), "--time must be a SLURM time")
    # a user error is found here, before submitting, not in every shard's log
    one_line_error(cli(*launch, "--bogus-option", "1"), "No such option: --bogus-option")
    (tmp_path / "classes.txt").write_text("bird\n")
    cam = ["launch", "cam", "--classes", "classes.txt", "--images", str(folder), *TINY]
    cam += ["--shards", "2", "--shards-dir", "runs-cam", "--executor", "slurm"]
    one_line_error(cli(*cam, "--bg-pool", "bogus"), "--bg-pool")  # failed in every shard's log
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before
    # --max-wait: the launcher stops waiting, the array runs on, and a relaunch does not run it twice
    waited = cli(*launch, "--max-wait", "00:00:02", "--job-name", "tiny")
    one_line_error(waited, "stopped waiting after --max-wait; job array")
    array = _array(tmp_path / "runs")
    try:
        one_line_error(cli(*launch), f"SLURM job array {array} of this --shards-dir still has")
    finally:
        subprocess.run(["scancel", array], check=False)
