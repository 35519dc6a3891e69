"""`make waterbirds` and `make imagenet` (pipelines.mk) on the toy world, up to results.json: the
numbers equal metrics recomputed from the score files with scikit-learn, `make -n` prints the real
plan, and a changed knob reruns its step and the steps after it, nothing before."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from negalign_cli.toy.demo import TOY_TAU
from negalign_cli.toy.generate import ToySpec, generate_toy
from tests.helpers.pipelines import (
    EXAMPLES,
    auroc,
    check_methods,
    example_env,
    run_example,
    torch_steps,
    unnamed,
    witness,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def make(*args: str, dry: bool = False) -> str:
    # a clean make: not the flags of a `make test` this runs under
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(HF_HUB_OFFLINE="1", COLUMNS="200")
    command = ["make", "-C", str(ROOT), *(["-n"] if dry else []), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def out_folders(plan: str) -> list[Path]:
    """The --out folder of every step a dry run plans."""
    return [Path(line.split(" --out ")[1].split()[0]) for line in plan.splitlines() if " --out " in line]


def assert_every_manifest(folders: list[Path]) -> None:
    """Each step's artifact is still there after the run: make deleted none as intermediate."""
    missing = [str(folder) for folder in folders if not (folder / "manifest.json").is_file()]
    assert not missing, f"manifest.json missing after the pipeline: {missing}"


def commands(plan: str) -> list[str]:
    """The negalign subcommands a dry run would run (sorted: make's order is its own)."""
    return sorted(
        line.split(" -m negalign_cli ")[1].split()[0]
        for line in plan.splitlines()
        if " -m negalign_cli " in line
    )


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    generate_toy(root / "toy", ToySpec(n_id=30, n_ood=12))
    return root


def toy_knobs(toy: Path) -> list[str]:
    """The toy model card's settings, and the toy's classes and vocabulary for the real lists."""
    return [
        f"NEGALIGN={sys.executable} -m negalign_cli",
        "PIPELINE_SETUP=",
        "MODEL=negalign-toy",
        "DEVICE=cpu",
        "WORKERS=0",
        f"TAU={TOY_TAU}",
        "GROUPS=1",
        "CAM_METHOD=gradxact",
        f"NOUNS={toy / 'toy/vocab.txt'}",
        "ADJS=",
        f"OUT={toy / 'runs'}",
        f"CACHE={toy / 'cache'}",
    ]


def waterbirds_knobs(toy: Path) -> list[str]:
    data = toy / "toy"
    return [
        *toy_knobs(toy),
        f"WATERBIRDS={data / 'id'}",
        f"PLACESBG={data / 'ood_spurious' / 'images'}",
        f"WATERBIRDS_CLASSES={data / 'classes.txt'}",
    ]


@pytest.fixture(scope="module")
def made_waterbirds(toy):
    """The real `make waterbirds-results` on the toy world (the suite's one), and the plan `make -n`
    printed before it."""
    plan = make("waterbirds-results", *waterbirds_knobs(toy), dry=True)
    make("waterbirds-results", *waterbirds_knobs(toy))
    return plan


@pytest.mark.slow
def test_make_waterbirds_on_the_toy_world(toy, made_waterbirds):
    data = toy / "toy"
    waterbirds = waterbirds_knobs(toy)
    plan = made_waterbirds
    assert commands(plan) == sorted(["split-vocab", "cam", "score", "cam", "score", "evaluate"])
    assert "--split test" in plan and str(data / "id" / "metadata.csv") in plan
    runs = toy / "runs" / "waterbirds"
    assert len(out_folders(plan)) == 6
    assert_every_manifest(out_folders(plan))
    results = json.loads((runs / "results" / "results.json").read_text())
    metadata = pd.read_csv(data / "id" / "metadata.csv")
    assert results["id"]["n"] == int((metadata["split"] == 2).sum()) == 15  # the test split only
    assert results["ood"]["placesbg"]["n"] == 12
    check_methods(results, runs, {"placesbg": "placesbg"})
    # background-only images against shapes: the toy CLIP separates them (model card)
    assert results["ood"]["placesbg"]["methods"]["NegAlign"]["metrics"]["neglabel"]["auroc"] > 0.9

    # make's own incrementality on top of the cache: nothing to do, then only what a knob touches
    assert commands(make("waterbirds-results", *waterbirds, dry=True)) == []
    assert commands(make("waterbirds-results", *waterbirds, "TAU=0.002", dry=True)) == sorted(
        ["split-vocab", "score", "score", "evaluate"]
    )
    assert commands(make("waterbirds-results", *waterbirds, "BLOCK=-2", dry=True)) == sorted(
        ["cam", "score", "cam", "score", "evaluate"]
    )
    assert commands(make("waterbirds-results", *waterbirds, "LAMBDAS=0,1", dry=True)) == ["evaluate"]
    assert commands(make("waterbirds-results", *waterbirds, dry=True)) == []  # a dry run writes nothing
    # the report is its own file target after results.json
    report_plan = make("waterbirds", *waterbirds, dry=True)
    assert commands(report_plan) == ["report"]
    assert f"report {runs / 'results'} --out {runs / 'report'}" in report_plan


@pytest.mark.slow
@pytest.mark.ci
def test_waterbirds_script_is_make_waterbirds_step_by_step_then_the_notebook_plot(toy, made_waterbirds):
    """examples/waterbirds.sh runs the steps of `make waterbirds` one by one: on the same data and
    cache, after make, every step that needs the model is a cache hit (no process imports torch)
    and its results are make's; then examples/plot_scores.py on its score files."""
    data = toy / "toy"
    env = example_env(data, toy / "cache", witness(toy))
    script = [str(EXAMPLES / "waterbirds.sh"), str(data / "id"), str(data / "ood_spurious/images"), "wb"]
    output = run_example(toy, env, "bash", *script)
    assert output.count("[witness]") == 6 and torch_steps(output) == [], output
    results = json.loads((toy / "wb/results/results.json").read_text())
    made = json.loads((toy / "runs/waterbirds/results/results.json").read_text())
    # make's numbers; each results.json names its own score files (evaluate, which imports no
    # torch, runs again for them: a hit used to name make's files)
    assert unnamed({"id": results["id"], **results["ood"]}) == unnamed({"id": made["id"], **made["ood"]})
    assert results["id"]["file"] == "wb/scores/id/scores.parquet"
    id_frame = pd.read_parquet(toy / "wb/scores/id/scores.parquet")
    ood_frame = pd.read_parquet(toy / "wb/scores/placesbg/scores.parquet")
    assert len(id_frame) == results["id"]["n"] == 15  # metadata.csv's test split
    methods = results["ood"]["placesbg"]["methods"]
    assert methods["NegLabel*"]["metrics"]["neglabel"]["auroc"] == pytest.approx(
        auroc(id_frame["s_neglabel_star"], ood_frame["s_neglabel_star"])
    )

    output = run_example(toy, env, sys.executable, str(EXAMPLES / "plot_scores.py"), "wb", "plot.png")
    assert (toy / "plot.png").stat().st_size > 10_000
    lam = methods["NegAlign"]["lambda"]
    id_final = id_frame["s_neglabel_star"] + lam * id_frame["p_align"]
    threshold = np.quantile(id_final, 0.05)
    ood_share = ((ood_frame["s_neglabel_star"] + lam * ood_frame["p_align"]) < threshold).mean()
    assert f"threshold {threshold:.4f}" in output
    assert f"'OOD: placesbg': {ood_share}" in output


def imagenet_knobs(toy: Path) -> list[str]:
    data = toy / "toy"
    return [
        *toy_knobs(toy),
        f"IMAGENET={data / 'id' / 'manifest.csv'}",
        f"OOD=spurious={data / 'ood_spurious' / 'images'} nonspurious={data / 'ood_nonspurious' / 'images'}",
        f"IMAGENET_CLASSES={data / 'classes.txt'}",
    ]


def test_make_imagenet_plans_every_step_once(tmp_path_factory):
    """The plan GNU make reads from pipelines.mk on a fresh run: one split, a cam and a score per
    set (a pattern rule for the OOD sets), one evaluate (its one real run, with the numbers checked:
    tests/test_pipeline_incremental.py, marked ci)."""
    toy = tmp_path_factory.mktemp("pipelines-plan")
    generate_toy(toy / "toy", ToySpec(n_id=10, n_ood=6))
    plan = make("imagenet-results", *imagenet_knobs(toy), dry=True)
    assert commands(plan) == sorted(["split-vocab", *["cam", "score"] * 3, "evaluate"])
    assert len(out_folders(plan)) == 8
    assert not (toy / "runs").exists()  # a dry run writes nothing


@pytest.mark.slow
def test_make_waterbirds_writes_the_report(toy):
    data = toy / "toy"
    make(
        "waterbirds",
        *toy_knobs(toy),
        f"WATERBIRDS={data / 'id'}",
        f"PLACESBG={data / 'ood_spurious' / 'images'}",
        f"WATERBIRDS_CLASSES={data / 'classes.txt'}",
    )
    report = toy / "runs" / "waterbirds" / "report"
    for name in ("report.html", "report.md", "report.tex"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    assert "NegAlign" in (report / "report.md").read_text()
    # the report was rendered from this run's results.json: its table holds the same AUROC
    results = json.loads((toy / "runs" / "waterbirds" / "results" / "results.json").read_text())
    auroc = results["ood"]["placesbg"]["methods"]["NegLabel*"]["metrics"]["neglabel"]["auroc"]
    assert f"{100 * auroc:.2f}" in (report / "report.md").read_text()


def test_pipelines_refuse_missing_folders():
    result = subprocess.run(
        ["make", "-C", str(ROOT), "-n", "waterbirds", "PLACESBG=x"], capture_output=True, text=True
    )
    assert result.returncode != 0 and "make waterbirds needs WATERBIRDS=DIR" in result.stderr
    result = subprocess.run(
        ["make", "-C", str(ROOT), "-n", "imagenet", "IMAGENET=x"], capture_output=True, text=True
    )
    assert result.returncode != 0 and "make imagenet needs OOD=" in result.stderr
