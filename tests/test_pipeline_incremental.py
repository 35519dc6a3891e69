"""A new τ reruns what depends on τ and nothing else (issue 21): the plan `make -n` prints after a
TAU change, what real GNU make then runs (only split-vocab when the split's roles come out the
same, with no torch imported), and the launch driver's plan-only check without torch.

The cheap tests build a finished `make imagenet` state without running the model steps: the
split is real (`split-vocab` with the tiny model, its r-scores cached in this process), the other
steps are marked up to date by `make -t` (GNU make's own "touch"). The full real run on the toy
world is marked ci (its time beside `import torch` is benchmarks/pipeline_rerun.py's figure), and
so are examples/imagenet.sh and examples/ablation.sh after it, on its data and cache."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.faults.helpers import cli, one_line_error
from tests.helpers.images import make_image_folder
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

STEPS = ("split", "cam/id", "cam/ood-a", "cam/ood-b", "scores/id", "scores/ood-a", "scores/ood-b")


def make(*args: str, dry: bool = False, touch: bool = False) -> str:
    """GNU make on the repository's Makefile (not the flags of a `make test` this runs under)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(HF_HUB_OFFLINE="1", COLUMNS="200", PYTHONPATH=str(ROOT))
    flags = [*(["-n"] if dry else []), *(["-t"] if touch else [])]
    done = subprocess.run(
        ["make", "-C", str(ROOT), "--no-print-directory", *flags, *args],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def ran(output: str) -> list[str]:
    """The negalign commands make ran (or planned), sorted: make's order is its own."""
    return sorted(
        line.split("negalign_witness.py ")[1].split()[0]
        for line in output.splitlines()
        if "negalign_witness.py " in line
    )


def mtimes(runs: Path) -> dict[str, int]:
    """The times of every step's file after the split: cam, score, evaluate, report."""
    found = [*runs.glob("cam/*/manifest.json"), *runs.glob("scores/*/scores.parquet")]
    found += [runs / "results" / "results.json", runs / "report" / "report.html"]
    return {str(path.relative_to(runs)): path.stat().st_mtime_ns for path in found}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished `make imagenet` under root/runs at τ = taus[0]: the split made by split-vocab, the
    model steps after it marked up to date (`make -t`); taus: [τ0, τ1 (the same roles), τ2 (other
    roles)]."""
    root = tmp_path_factory.mktemp("incremental")
    (root / "nouns.txt").write_text("ocean\nforest\nsand\nteapot\nlamp\ncup\nkettle\nsky\n")
    # the r-scores, cached here: the split-vocab runs below only threshold them
    filled = cli(
        "split-vocab", "--nouns", str(root / "nouns.txt"), "--tau", "0", "--device", "cpu",
        "--cache-dir", str(root / "cache"), "--out", str(root / "r"),
    )  # fmt: skip
    assert filled.exit_code == 0, filled.output
    r = pd.read_csv(root / "r" / "split_scores.csv")["r_score"].abs().sort_values().to_numpy()
    assert r[0] > 0  # every word is obj or bg below min |r|, ambiguous above max |r|
    taus = [f"{r[0] / 4:.6g}", f"{r[0] / 2:.6g}", f"{r[-1] * 2:.6g}"]
    knobs = [
        f"NEGALIGN={witness(root)}",
        "PIPELINE_SETUP=",
        "MODEL=negalign-tiny-test",
        "DEVICE=cpu",
        f"NOUNS={root / 'nouns.txt'}",
        "ADJS=",
        f"OUT={root / 'runs'}",
        f"CACHE={root / 'cache'}",
        f"IMAGENET={root / 'id'}",
        f"OOD=a={root / 'a'} b={root / 'b'}",
        f"IMAGENET_CLASSES={root / 'classes.txt'}",
    ]
    runs = root / "runs" / "imagenet"
    made = make(f"{runs}/.content/split", *knobs, f"TAU={taus[0]}")
    assert ran(made) == ["split-vocab"], made
    for step in (*STEPS, "results", "report"):
        (runs / step).mkdir(parents=True, exist_ok=True)
    make("imagenet", *knobs, f"TAU={taus[0]}", touch=True)
    return runs, knobs, taus


def test_the_plan_after_a_new_tau_is_the_split_and_what_reads_it(finished):
    runs, knobs, taus = finished
    assert ran(make("imagenet", *knobs, f"TAU={taus[0]}", dry=True)) == []
    # make -n cannot know whether the new split's roles will differ: it plans what may follow
    assert ran(make("imagenet-results", *knobs, f"TAU={taus[1]}", dry=True)) == sorted(
        ["split-vocab", "score", "score", "score", "evaluate"]
    )
    plan = make("imagenet", *knobs, f"TAU={taus[1]}", dry=True)
    assert ran(plan) == sorted(["split-vocab", "score", "score", "score", "evaluate", "report"])
    assert f"--tau {taus[1]}" in plan and " cam " not in plan
    assert ran(make("imagenet", *knobs, f"TAU={taus[0]}", dry=True)) == []  # -n wrote nothing


def test_a_new_tau_that_moves_no_word_reruns_split_vocab_alone_without_torch(finished):
    runs, knobs, taus = finished
    before = mtimes(runs)
    output = make("imagenet", *knobs, f"TAU={taus[1]}")
    assert ran(output) == ["split-vocab"], output  # score would fail here: its cam folders are empty
    assert "[witness] split-vocab torch-imported=False" in output  # r-scores cached: numpy only
    assert mtimes(runs) == before
    assert json.loads((runs / "split" / "manifest.json").read_text())["params"]["tau"] == float(taus[1])
    assert ran(make("imagenet", *knobs, f"TAU={taus[1]}", dry=True)) == []  # and it stays done
    assert ran(make("imagenet", *knobs, f"TAU={taus[1]}")) == []

    # a τ above every |r|: every word becomes ambiguous, so score and what follows are out of date
    split_only = make(f"{runs}/.content/split", *knobs, f"TAU={taus[2]}")
    assert ran(split_only) == ["split-vocab"], split_only
    assert ran(make("imagenet", *knobs, f"TAU={taus[2]}", dry=True)) == sorted(
        ["score", "score", "score", "evaluate", "report"]
    )


def test_launch_refuses_weights_its_child_process_cannot_build_in_one_line(tmp_path, monkeypatch):
    """The driver's plan-only check builds a model its shard 0's cache does not know in a child
    process (tests/test_torch_free.py checks the driver itself imports no torch): the child's
    one-line error is the driver's."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint" * 64)
    images = make_image_folder(tmp_path / "imgs", per_class=1)
    launched = cli(
        "launch", "embed", "images", "--images", str(images), "--model", "negalign-tiny-test",
        "--pretrained", str(tmp_path / "junk.pt"), "--shards", "2", "--shards-dir", str(tmp_path / "runs"),
        "--cache-dir", str(tmp_path / "c"),
    )  # fmt: skip
    one_line_error(launched, f"could not load {tmp_path / 'junk.pt'} as negalign-tiny-test weights")
    assert not (tmp_path / "runs" / "plan.json").exists()  # nothing was queued


# ----------------------------------------------------------------------------- the full real run
@pytest.fixture(scope="module")
def made_imagenet(tmp_path_factory):
    """The real `make imagenet` on the toy world (the suite's one): (its folder, make's knobs, what
    make printed, the results.json it wrote). The toy and the cache are shared by the tests below,
    which only add to them."""
    from negalign_cli.toy.demo import TOY_TAU
    from negalign_cli.toy.generate import ToySpec, generate_toy

    tmp_path = tmp_path_factory.mktemp("imagenet")
    toy = tmp_path / "toy"
    generate_toy(toy, ToySpec(n_id=30, n_ood=12))
    knobs = [
        f"NEGALIGN={witness(tmp_path)}",
        "PIPELINE_SETUP=",
        "MODEL=negalign-toy",
        "DEVICE=cpu",
        "WORKERS=0",
        "GROUPS=1",
        "CAM_METHOD=gradxact",
        f"NOUNS={toy / 'vocab.txt'}",
        "ADJS=",
        f"OUT={tmp_path / 'runs'}",
        f"CACHE={tmp_path / 'cache'}",
        f"IMAGENET={toy / 'id' / 'manifest.csv'}",
        f"OOD=spurious={toy / 'ood_spurious' / 'images'} nonspurious={toy / 'ood_nonspurious' / 'images'}",
        f"IMAGENET_CLASSES={toy / 'classes.txt'}",
    ]
    printed = make("imagenet", *knobs, f"TAU={TOY_TAU}")
    return tmp_path, knobs, printed, (tmp_path / "runs/imagenet/results/results.json").read_bytes()


@pytest.mark.ci
@pytest.mark.slow
def test_make_imagenet_then_a_new_tau_on_the_toy_world(made_imagenet):
    """The real pipeline on the toy world (its numbers against scikit-learn, then the plans
    `make -n` prints), then TAU=0.1 (the toy's roles do not move: |r| ≥ 0.33: only split-vocab
    runs, without torch); then a τ that moves words."""
    from negalign_cli.toy.demo import TOY_TAU

    tmp_path, knobs, first, _ = made_imagenet
    assert ran(first) == sorted(["split-vocab", *["cam", "score"] * 3, "evaluate", "report"])
    runs = tmp_path / "runs" / "imagenet"
    results = (runs / "results" / "results.json").read_bytes()
    before = mtimes(runs)

    # the numbers: every method's AUROC against scikit-learn on the score files, the mean column
    recorded = json.loads(results)
    assert recorded["id"]["n"] == 30 and set(recorded["ood"]) == {"spurious", "nonspurious"}
    check_methods(recorded, runs, {"spurious": "ood-spurious", "nonspurious": "ood-nonspurious"})
    for method in ("MCM", "NegLabel", "NegRefine", "NegLabel*"):
        per_set = [
            recorded["ood"][s]["methods"][method]["metrics"]["neglabel"]["auroc"] for s in recorded["ood"]
        ]
        mean = recorded["mean"]["methods"][method]["metrics"]["neglabel"]["auroc"]
        assert mean == pytest.approx(statistics.fmean(per_set))
    # every step's artifact is still there (make deleted none as intermediate), the OOD sets' cam
    # folders too (a pattern rule made them)
    steps = [
        runs / "split",
        *(
            runs / kind / name
            for kind in ("cam", "scores")
            for name in ("id", "ood-spurious", "ood-nonspurious")
        ),
    ]
    assert all((folder / "manifest.json").is_file() for folder in steps), sorted(
        map(str, runs.rglob("manifest.json"))
    )
    # make's plans after the run: nothing to do, then only what a knob touches, never cam for τ
    assert ran(make("imagenet-results", *knobs, f"TAU={TOY_TAU}", dry=True)) == []
    assert ran(make("imagenet-results", *knobs, "TAU=0.002", dry=True)) == sorted(
        ["split-vocab", "score", "score", "score", "evaluate"]
    )
    assert ran(make("imagenet-results", *knobs, f"TAU={TOY_TAU}", "BLOCK=-2", dry=True)) == sorted(
        ["cam", "score"] * 3 + ["evaluate"]
    )
    assert ran(make("imagenet-results", *knobs, f"TAU={TOY_TAU}", "LAMBDAS=0,1", dry=True)) == ["evaluate"]
    assert mtimes(runs) == before  # dry runs write nothing

    # its speed beside `python -c "import torch"` is benchmarks/pipeline_rerun.py's figure (a timed
    # assertion on a loaded CI machine would be noise); here: what ran, and that nothing imported torch
    rerun = make("imagenet", *knobs, "TAU=0.1")
    assert ran(rerun) == ["split-vocab"], rerun
    assert "torch-imported=True" not in rerun
    assert mtimes(runs) == before and (runs / "results" / "results.json").read_bytes() == results

    # a τ above some words' |r|: they turn ambiguous, and score, evaluate and report run for real
    moved = make("imagenet", *knobs, "TAU=0.45")
    assert ran(moved) == sorted(["split-vocab", "score", "score", "score", "evaluate", "report"]), moved
    assert "torch-imported=True" not in moved.split("negalign_witness.py score")[0]  # the split alone
    assert (runs / "results" / "results.json").read_bytes() != results


@pytest.mark.ci
@pytest.mark.slow
def test_imagenet_script_is_make_imagenet_step_by_step_then_the_ablation_script(made_imagenet):
    """examples/imagenet.sh runs the steps of `make imagenet` one by one: on the same data and cache,
    after make, every step that needs the model is a cache hit (no process imports torch) and its
    results are make's.
    Then examples/ablation.sh on one combination (its grid is the plan test's, in
    tests/test_examples.py): its table against scikit-learn on its own score files."""
    tmp_path, _, _, made = made_imagenet
    data = tmp_path / "toy"
    env = example_env(data, tmp_path / "cache", witness(tmp_path), OUT="script/imagenet")
    sets = [f"spurious={data / 'ood_spurious/images'}", f"nonspurious={data / 'ood_nonspurious/images'}"]
    output = run_example(
        tmp_path, env, "bash", str(EXAMPLES / "imagenet.sh"), str(data / "id/manifest.csv"), *sets
    )
    assert output.count("[witness]") == 8 and torch_steps(output) == [], output
    results = json.loads((tmp_path / "script/imagenet/results/results.json").read_text())
    made = json.loads(made)
    assert results["id"]["n"] == 30 and list(results["ood"]) == ["spurious", "nonspurious"]
    # the same numbers; each results.json names its own score files (a hit used to name make's)
    assert unnamed(results["ood"]) == unnamed(made["ood"]) and results["mean"] == made["mean"]
    assert results["ood"]["spurious"]["file"] == "script/imagenet/scores/ood-spurious/scores.parquet"

    # the ablation on make's sets and block: its cam steps are hits too; only score with M1 (a
    # --neg-topk make did not ask for) computes
    ablation = [
        str(EXAMPLES / "ablation.sh"),
        str(data / "id/manifest.csv"),
        str(data / "ood_spurious/images"),
    ]
    output = run_example(
        tmp_path, {**env, "CAM_METHODS": "gradxact", "BLOCKS": "-1", "MODS": "m1m2"}, "bash", *ablation, "abl"
    )
    assert output.count("[witness]") == 7 and torch_steps(output) == ["score", "score"], output
    table = pd.read_csv(tmp_path / "abl/ablation.tsv", sep="\t")
    assert len(table) == 2  # 1 method × 1 block × 1 switch set (M1 + M2) × M3 off/on (kept small: CPU time)
    assert set(zip(table["switches"], table["m3"], strict=True)) == {("m1m2", "off"), ("m1m2", "on")}
    assert (table["cam_method"] == "gradxact").all() and (table["block"] == -1).all()
    scores = tmp_path / "abl/runs/gradxact-1-m1m2/scores"
    id_frame = pd.read_parquet(scores / "id/scores.parquet")
    ood_frame = pd.read_parquet(scores / "ood/scores.parquet")
    assert len(id_frame) == 30
    expected = auroc(id_frame["s_neglabel_star"], ood_frame["s_neglabel_star"])
    np.testing.assert_allclose(table["neglabel_star_auroc"], expected, atol=5e-5)  # printed to 4 places
    off = table[table["m3"] == "off"].iloc[0]
    final = lambda f, lam=off["negalign_lambda"]: f["s_neglabel_star"] + lam * f["p_align"]  # noqa: E731
    assert off["negalign_auroc"] == pytest.approx(auroc(final(id_frame), final(ood_frame)), abs=5e-5)
    assert "gradxact\t-1\tm1m2\ton" in output
    # M3 changes NegAlign's scale, not NegLabel*'s ranking
    assert table["neglabel_star_auroc"].nunique() == 1
