"""Fault suite: runs interrupted by SIGINT, SIGTERM or SIGKILL after a random number of batches
resume on the next run and end with exactly the result of an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from negalign_cli.stages import files
from tests.faults.helpers import cli
from tests.helpers import TINY
from tests.helpers.images import make_image_folder

SLOW = Path(__file__).resolve().parents[1] / "helpers" / "slow_negalign.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def negalign(*args: str) -> subprocess.CompletedProcess:
    """A real `python -m negalign_cli` process (tests/test_launch.py uses it too)."""
    return subprocess.run(
        [sys.executable, "-m", "negalign_cli", *args], env=ENV, capture_output=True, text=True
    )


def interrupt(markers: Path, after: int, sig: int, *args: str) -> int:
    """Run slowly, send ``sig`` once ``after`` batches are done (the run waits there for it);
    returns the exit code."""
    markers.mkdir(parents=True, exist_ok=True)
    (markers / "hold-at").write_text(str(after))
    process = subprocess.Popen(
        [sys.executable, str(SLOW), str(markers), *args],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while len(list(markers.glob("batch-*"))) < after:
        assert process.poll() is None, (
            f"finished before {after} batches: {process.stderr.read().decode()[-400:]}"
        )
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(sig)
    process.wait(timeout=60)
    stderr = process.stderr.read().decode()
    assert "Traceback" not in stderr, stderr
    return process.returncode


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    make_image_folder(root / "imgs", per_class=24)  # 48 images: 12 batches of 4
    (root / "nouns.txt").write_text("\n".join(f"thing number {i}" for i in range(40)) + "\n")
    return root


def command_args(data: Path, command: str, cam: Path) -> tuple[list[str], str]:
    """The command line of one case (without cache and --out) and the file it is judged by."""
    images = ["--images", str(data / "imgs"), "--workers", "0", "--batch-size", "4", *TINY]
    if command == "embed":
        return ["embed", "images", *images], files.IMAGE_EMBEDDINGS
    if command == "cam":
        return ["cam", "--classes", "waterbird", *images], files.BACKGROUND_EMBEDDINGS
    score = ["score", "--images-dir", str(cam), "--classes", "waterbird", "--nouns", str(data / "nouns.txt")]
    return [*score, "--groups", "4", "--batch-size", "16", *TINY], files.SCORES


@pytest.fixture(scope="module")
def clean(data, tmp_path_factory):
    """Each command's uninterrupted run, in-process, on its own cache: computed once per command and
    shared by its cases (read, never written); `score` scores the clean `cam` run's folder."""
    root = tmp_path_factory.mktemp("clean")
    done: dict[str, Path] = {}

    def expected(command: str) -> Path:
        if command not in done:
            cam = expected("cam") if command == "score" else root / "unused"
            args, _ = command_args(data, command, cam)
            result = cli(*args, "--cache-dir", str(root / f"cache-{command}"), "--out", str(root / command))
            assert result.exit_code == 0, result.output
            done[command] = root / command
        return done[command]

    return expected


# Every command meets a hard kill, every signal meets an image stage; the full cross product cost
# two more minutes of CI for little more (the signal handling is shared by all commands).
# make test meets the two signals a command handles (SIGTERM, SIGINT) on the two image stages; the
# hard kills (SIGKILL: nothing to handle, the cache's atomic writes are what is tested) run under ci
# (make test-ci, which CI runs).
CASES = [
    ("embed", signal.SIGTERM, ()),
    ("embed", signal.SIGKILL, (pytest.mark.ci,)),
    ("cam", signal.SIGINT, ()),
    ("cam", signal.SIGKILL, (pytest.mark.ci,)),
    ("score", signal.SIGKILL, (pytest.mark.ci,)),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "command,sig", [pytest.param(c, s, marks=m, id=f"{c}-{s.name}") for c, s, m in CASES]
)
def test_an_interrupted_run_resumes_exactly(data, clean, tmp_path, command, sig):
    """The interrupted run is a real process (the signal is the point); the clean run it is compared
    with and the resumed run are in-process."""
    rng = random.Random(f"{command}{sig}")
    expected = clean(command)
    args, out_file = command_args(data, command, clean("cam") if command == "score" else expected)
    cache = ["--cache-dir", str(tmp_path / "c")]
    code = interrupt(tmp_path / "markers", rng.randint(2, 6), sig, *args, *cache)
    assert code != 0
    if sig == signal.SIGINT:
        assert code == 130
    resumed = cli(*args, *cache, "--out", str(tmp_path / "got"))
    assert resumed.exit_code == 0, resumed.output
    if command != "score":
        assert (
            "from the cache" in resumed.stderr and ", 0 from the cache" not in resumed.stderr
        )  # resumed, not redone
        np.testing.assert_allclose(
            np.load(tmp_path / "got" / out_file), np.load(expected / out_file), atol=1e-6
        )
        for name in (files.IMAGE_TABLE,):
            pd.testing.assert_frame_equal(
                pd.read_parquet(tmp_path / "got" / name), pd.read_parquet(expected / name)
            )
    else:
        got = pd.read_parquet(tmp_path / "got" / out_file)
        pd.testing.assert_frame_equal(got, pd.read_parquet(expected / out_file), atol=1e-6)


@pytest.mark.slow
def test_two_runs_on_one_cache_at_once(data, tmp_path):
    """Two `cam` processes on the same images and cache: both succeed, with one result."""
    args = [sys.executable, str(SLOW), str(tmp_path / "m")]
    (tmp_path / "m").mkdir()
    command = [
        "cam",
        "--images",
        str(data / "imgs"),
        "--classes",
        "waterbird",
        "--workers",
        "0",
        "--batch-size",
        "4",
        *TINY,
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    runs = [
        subprocess.Popen(
            [*args, *command, "--out", str(tmp_path / f"out{i}")],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (_stdout, stderr) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, stderr
    hits = sum("cache hit" in stdout or "computed by another process" in stderr for stdout, stderr in outputs)
    assert hits >= 1  # the second waited for the first and reused its result
    for name in (files.BACKGROUND_EMBEDDINGS, files.IMAGE_EMBEDDINGS, files.CAMS):
        assert (tmp_path / "out0" / name).read_bytes() == (tmp_path / "out1" / name).read_bytes()
