"""A new τ reruns what depends on τ and nothing else (issue 21): the plan `make -n` prints after a
TAU change, what real GNU make then runs (only split-vocab when the split's roles come out the
same, with no torch imported), and the launch driver's plan-only check without torch.

The cheap tests build a finished `make imagenet` state without running the model steps: the
split is real (`split-vocab` with the tiny model, its r-scores cached in this process), the other
steps are marked up to date by `make -t` (GNU make's own "touch"). The full real run on the toy
world, timed beside `import torch`, is marked ci."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.faults.helpers import cli, one_line_error
from tests.helpers.images import make_image_folder
from tests.helpers.pipelines import check_methods

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")

# `negalign ARGS` as `python -m negalign_cli` runs it; says on stderr whether torch was imported
WITNESS = """import runpy, sys
sys.argv = ["negalign", *sys.argv[1:]]
try:
    runpy.run_module("negalign_cli", run_name="__main__", alter_sys=True)
finally:
    sys.stderr.write("[witness] %s torch-imported=%s\\n" % (sys.argv[1], "torch" in sys.modules))
"""
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
    (root / "negalign_witness.py").write_text(WITNESS)
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
        f"NEGALIGN={sys.executable} {root / 'negalign_witness.py'}",
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
@pytest.mark.ci
@pytest.mark.slow
def test_make_imagenet_then_a_new_tau_on_the_toy_world(tmp_path):
    """The real pipeline on the toy world (the suite's one real `make imagenet`: its numbers against
    scikit-learn, then the plans `make -n` prints), then TAU=0.1 (the toy's roles do not move:
    |r| ≥ 0.33: only split-vocab runs, without torch); then a τ that moves
    words."""
    from negalign_cli.toy.demo import TOY_TAU
    from negalign_cli.toy.generate import ToySpec, generate_toy

    toy = tmp_path / "toy"
    generate_toy(toy, ToySpec(n_id=30, n_ood=12))
    (tmp_path / "negalign_witness.py").write_text(WITNESS)
    knobs = [
        f"NEGALIGN={sys.executable} {tmp_path / 'negalign_witness.py'}",
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
    first = make("imagenet", *knobs, f"TAU={TOY_TAU}")
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
