"""Every script in examples/ runs on the toy world, and what it prints or writes agrees with the
files the pipeline wrote (numbers recomputed here). Here: the bash scripts' plans (the negalign
commands they run, with their flags, checked with a recording NEGALIGN) and api_usage.py, in-process.
The real runs of the bash scripts (marked `ci`) follow the real `make waterbirds` and `make imagenet`
runs, whose steps they are, on the same data and cache: tests/test_pipelines.py (waterbirds.sh and
plot_scores.py) and tests/test_pipeline_incremental.py (imagenet.sh and ablation.sh)."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from negalign_cli.toy.demo import TOY_TAU
from negalign_cli.toy.generate import ToySpec, generate_toy
from tests.helpers.pipelines import EXAMPLES, auroc, example_env, run_example


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    generate_toy(root / "toy", ToySpec(n_id=20, n_ood=10))
    return root


def toy_env(toy: Path) -> dict[str, str]:
    """The toy model card's settings for the scripts' knobs (examples/common.sh)."""
    return example_env(toy / "toy", toy / "cache", f"{sys.executable} -m negalign_cli")


def run(toy: Path, *command: str, **env: str) -> str:
    return run_example(toy, {**toy_env(toy), **env}, *command)


def plan(toy: Path, tmp_path: Path, script: str, *args: str, **env: str) -> list[list[str]]:
    """The negalign commands ``script`` runs, in order, each as its argument list: NEGALIGN is a
    shell script that records its arguments and does nothing else (no torch, no files)."""
    recorder, log = tmp_path / "negalign", tmp_path / "plan.txt"
    recorder.write_text(
        '#!/bin/sh\nfor a in "$@"; do printf "%s\\037" "$a"; done >> "$PLAN"\necho >> "$PLAN"\n'
    )
    recorder.chmod(0o755)
    log.write_text("")
    run(toy, "bash", str(EXAMPLES / script), *args, NEGALIGN=str(recorder), PLAN=str(log), **env)
    return [line.rstrip("\037").split("\037") for line in log.read_text().splitlines()]


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_example_plans(toy, tmp_path):
    """What each script would run, with the toy knobs (and ablation.sh's own full grid): every
    step, its order, and the flags that tie the steps together."""
    data, cache = toy / "toy", str(toy / "cache")
    runtime = ["--model", "negalign-toy", "--device", "cpu", "--precision", "fp32", "--cache-dir", cache]
    cam = ["--cam-method", "gradxact", "--block=-1", "--workers", "0", *runtime]

    wb = plan(toy, tmp_path, "waterbirds.sh", str(data / "id"), str(data / "ood_spurious/images"), "wb")
    assert [c[0] for c in wb] == ["split-vocab", "cam", "cam", "score", "score", "evaluate"]
    negatives = ["--tau", str(TOY_TAU), "--nouns", str(data / "vocab.txt")]
    assert wb[0] == ["split-vocab", *negatives, *runtime, "--out", "wb/split"]
    assert wb[1] == ["cam", "--images", f"{data / 'id'}/metadata.csv", "--split", "test", "--classes",
                     str(data / "classes.txt"), *cam, "--out", "wb/cam/id"]  # fmt: skip
    assert wb[2] == ["cam", "--images", str(data / "ood_spurious/images"), "--classes",
                     str(data / "classes.txt"), *cam, "--out", "wb/cam/placesbg"]  # fmt: skip
    for command, name in zip(wb[3:5], ("id", "placesbg"), strict=True):
        assert command == ["score", "--images-dir", f"wb/cam/{name}", "--classes", str(data / "classes.txt"),
                           "--negatives-split", "wb/split", "--role-aware", "--groups", "1", *runtime,
                           "--out", f"wb/scores/{name}"]  # fmt: skip
    assert wb[5] == ["evaluate", "--id", "wb/scores/id/scores.parquet", "--ood",
                     "placesbg=wb/scores/placesbg/scores.parquet", "--compare", "--lambda", "sweep",
                     "--cache-dir", cache, "--out", "wb/results"]  # fmt: skip

    sets = [f"near={data / 'ood_spurious/images'}", f"far={data / 'ood_nonspurious/images'}"]
    imagenet = plan(toy, tmp_path, "imagenet.sh", str(data / "id/manifest.csv"), *sets)
    assert [c[0] for c in imagenet] == ["split-vocab", *["cam", "score"] * 3, "evaluate"]
    assert [flag(c, "--images") for c in imagenet[1:7:2]] == [
        str(data / "id/manifest.csv"), str(data / "ood_spurious/images"), str(data / "ood_nonspurious/images")
    ]  # fmt: skip
    out = "runs/imagenet"
    for cam_step, score_step, name in zip(
        imagenet[1:7:2], imagenet[2:7:2], ("id", "ood-near", "ood-far"), strict=True
    ):
        assert flag(cam_step, "--out") == f"{out}/cam/{name}" == flag(score_step, "--images-dir")
        assert flag(score_step, "--negatives-split") == f"{out}/split" and "--role-aware" in score_step
    assert imagenet[-1][:7] == ["evaluate", "--id", f"{out}/scores/id/scores.parquet",
                                "--ood", f"near={out}/scores/ood-near/scores.parquet",
                                "--ood", f"far={out}/scores/ood-far/scores.parquet"]  # fmt: skip

    # ablation.sh's own grid: 2 CAM methods × 2 blocks × 4 switch sets × M3 off/on
    ood = str(data / "ood_spurious/images")  # PYTHON: the final table reads results nobody wrote
    ablation = plan(toy, tmp_path, "ablation.sh", str(data / "id/metadata.csv"), ood, "abl", PYTHON="true")
    names = [c[0] for c in ablation]
    assert names[0] == "split-vocab" and names.count("cam") == 2 * 2 * 2
    assert names.count("score") == 2 * 2 * 4 * 2 and names.count("evaluate") == 2 * 2 * 4 * 2
    cams = [c for c in ablation if c[0] == "cam"]
    assert {(flag(c, "--cam-method"), next(a for a in c if a.startswith("--block="))) for c in cams} == {
        (m, f"--block={b}") for m in ("gradcam", "gradxact") for b in (-1, -2)
    }
    assert all(flag(c, "--split") == "test" for c in cams if c[2].endswith("metadata.csv"))
    scores = [c for c in ablation if c[0] == "score"]
    switches = {flag(c, "--out").split("/")[2].rsplit("-", 1)[1]: c for c in scores}
    assert set(switches) == {"plain", "m1", "m2", "m1m2"}
    assert "--neg-topk" not in switches["plain"] and "--role-aware" not in switches["plain"]
    assert flag(switches["m1"], "--neg-topk") == "10" and "--role-aware" not in switches["m1"]
    assert "--role-aware" in switches["m2"] and "--neg-topk" not in switches["m2"]
    assert flag(switches["m1m2"], "--neg-topk") == "10" and "--role-aware" in switches["m1m2"]
    evaluations = [c for c in ablation if c[0] == "evaluate"]
    for command in evaluations:
        run_dir = flag(command, "--id").removesuffix("/scores/id/scores.parquet")
        assert flag(command, "--ood") == f"ood={run_dir}/scores/ood/scores.parquet"
        assert ("--scale-stabilize" in command) == flag(command, "--out").endswith("m3-on")
    bad = subprocess.run(
        ["bash", str(EXAMPLES / "ablation.sh"), "id", "ood", "abl"],
        capture_output=True, text=True, cwd=toy,
        env={**toy_env(toy), "NEGALIGN": "true", "MODS": "m9"},
    )  # fmt: skip
    assert bad.returncode == 2 and "unknown switch set m9" in bad.stderr


def test_api_script(toy, monkeypatch, capsys):
    """The script's own code, run in this process as `python examples/api_usage.py ...` runs it
    (no process is the point here: the API is)."""
    data = toy / "toy"
    monkeypatch.chdir(toy)
    monkeypatch.setenv("NEGALIGN_CACHE", str(toy / "cache"))
    monkeypatch.setattr(
        sys,
        "argv",
        [
            str(EXAMPLES / "api_usage.py"),
            "--id",
            str(data / "id/images"),
            "--ood",
            str(data / "ood_spurious/images"),
            "--classes",
            "star,heart",
            "--nouns",
            str(data / "vocab.txt"),
            "--arch",
            "negalign-toy",
            "--device",
            "cpu",
            "--tau",
            str(TOY_TAU),
            "--groups",
            "1",
            "--cam-method",
            "gradxact",
            "--out",
            "api.csv",
        ],
    )
    runpy.run_path(str(EXAMPLES / "api_usage.py"), run_name="__main__")
    output = capsys.readouterr().out
    scores = pd.read_csv(toy / "api.csv")
    assert (scores["set"] == "id").sum() == 10 and (scores["set"] == "ood").sum() == 10
    id_rows, ood_rows = scores[scores["set"] == "id"], scores[scores["set"] == "ood"]
    for label, column in (("NegLabel*", "s_neglabel_star"), ("NegAlign (M3)", "s_final")):
        value = 100 * auroc(id_rows[column], ood_rows[column])
        assert f"{label:<14} AUROC {value:6.2f}" in output
    # M3: S_final = z(S*) + λ·z(P_align) with the printed ID statistics (λ = 1)
    stats = json.loads(output.split("ID images: ", 1)[1].splitlines()[0].replace("'", '"'))
    z = lambda c: (scores[c] - stats[c]["mean"]) / stats[c]["std"]  # noqa: E731
    np.testing.assert_allclose(scores["s_final"], z("s_neglabel_star") + z("p_align"), rtol=1e-6)
