"""Commands that need no model import no torch (issue 21, parts 2 and 3).

One subprocess runs the commands in-process (Typer's CliRunner), one after the other, on small real
inputs, and records after each which heavy modules it has imported so far; the commands that must
stay light run first, so that one of them importing torch cannot hide behind another. The inputs
(score files, an `evaluate` cache, two shards of `embed images --shard i/2` on the tiny model) are
made once, in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.helpers import cli
from tests.helpers.images import make_image_folder
from tests.helpers.synthetic import write_scores

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "torchvision", "matplotlib", "sklearn")

# Runs in the subprocess: argv[1] is a JSON list of [name, argv]; prints {name: {exit, output,
# heavy}} where heavy lists the HEAVY modules loaded once that step has run. The steps that were
# torch-free already come first, then the ones this change made so, then `launch`.
SCRIPT = """
import json, sys
from typer.testing import CliRunner
from negalign_cli.cli.app import app
heavy = HEAVY
steps = json.loads(sys.argv[1])
results = {"start": {"heavy": [m for m in heavy if m in sys.modules]}}
runner = CliRunner()
for name, argv in steps:
    if name == "launch":  # the last step: the library versions recorded before torch is imported
        from negalign_cli.cache.store import library_versions
        versions_before = library_versions()
        results["versions before"] = {"heavy": [m for m in heavy if m in sys.modules]}
    if name == "load_rgb":  # the report's CAM overlays read images this way
        from negalign_cli.inputs.datasets import load_rgb
        image = load_rgb(argv[0])
        outcome = {"exit": 0 if image.mode == "RGB" else 1, "output": image.mode}
    elif name == "launch machinery":  # what the launch driver imports besides its plan-only check
        import negalign_cli.cli.shard_cmd, negalign_cli.stages.launch, negalign_cli.stages.shards
        outcome = {"exit": 0, "output": ""}
    else:
        result = runner.invoke(app, argv, env={"COLUMNS": "200"})
        outcome = {"exit": result.exit_code, "output": result.output[-50000:]}
    outcome["heavy"] = [m for m in heavy if m in sys.modules]
    results[name] = outcome
import torch, open_clip  # the versions recorded without them equal their own
results["versions"] = {"before": versions_before, "after": library_versions()}
print(json.dumps(results))
""".replace("HEAVY", repr(HEAVY))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("torch-free")
    scores = {
        "id": write_scores(root / "id.parquet", 300, 0, shift=0.3),
        "near": write_scores(root / "near.parquet", 200, 1, shift=0.1),
        "far": write_scores(root / "far.parquet", 250, 2, shift=-0.2),
    }
    evaluate = ["evaluate", "--id", str(scores["id"]), "--ood", f"near={scores['near']}"]
    evaluate += ["--ood", f"far={scores['far']}", "--cache-dir", str(root / "cache")]
    made = cli(*evaluate, "--out", str(root / "results"))
    assert made.exit_code == 0, made.output
    images = make_image_folder(root / "data", per_class=2)
    shard_args = ["--images", str(images), "--workers", "0", "--shards-dir", str(root / "runs")]
    for i in (0, 1):
        shard = cli("embed", "images", *shard_args, "--shard", f"{i}/2", "--cache-dir", str(root / f"c{i}"))
        assert shard.exit_code == 0, shard.output
    key = json.loads((root / "results" / "manifest.json").read_text())["key"]
    steps = [
        ("cache ls", ["cache", "ls", "--cache-dir", str(root / "cache")]),
        ("cache info", ["cache", "info", key[:12], "--cache-dir", str(root / "cache")]),
        ("cache gc", ["cache", "gc", "--cache-dir", str(root / "cache")]),
        ("cache repair", ["cache", "repair", "--cache-dir", str(root / "cache")]),
        ("benchmarks", ["benchmarks"]),
        ("evaluate hit", [*evaluate, "--out", str(root / "results-again")]),
        ("launch machinery", []),
        ("merge", ["merge", str(root / "runs"), "--cache-dir", str(root / "merged-cache")]),
        ("evaluate miss", [*evaluate, "--lambda", "0,3", "--out", str(root / "results-3")]),
        ("report", ["report", str(root / "results"), "--cache-dir", str(root / "cache")]),
        ("load_rgb", [str(images / "birds" / "0.jpg")]),
        ("models", ["models"]),
        (
            "launch",
            [
                "launch",
                "embed",
                "images",
                *shard_args[:4],
                "--model",
                "negalign-tiny-test",
                "--shards",
                "2",
                "--shards-dir",
                str(root / "runs"),
                "--cache-dir",
                str(root / "launch-cache"),
            ],
        ),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("NEGALIGN_DEVICE", "NEGALIGN_DEBUG")}
    env.update(
        PYTHONPATH=str(REPO), NEGALIGN_CACHE=str(root / "env-cache"), HF_HUB_OFFLINE="1", COLUMNS="200"
    )
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(steps)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _light(world, step: str, unwanted=("torch", "open_clip", "torchvision")) -> None:
    outcome = world[step]
    assert outcome["exit"] == 0, outcome["output"]
    loaded = [m for m in unwanted if m in outcome["heavy"]]
    assert not loaded, f"`{step}` imported {', '.join(loaded)}"


def test_the_subprocess_starts_light(world):
    assert world["start"]["heavy"] == []


def test_an_evaluate_cache_hit_imports_no_torch_matplotlib_or_sklearn(world):
    assert "cache hit" in world["evaluate hit"]["output"]
    _light(world, "evaluate hit", HEAVY)


@pytest.mark.parametrize("step", ["cache ls", "cache info", "cache gc", "cache repair", "benchmarks"])
def test_cache_commands_and_benchmarks_import_no_torch(world, step):
    _light(world, step)


def test_the_launch_machinery_imports_no_torch(world):
    """shard_cmd, stages/launch.py and stages/shards.py (which used to import stages/images.py and
    inputs/datasets.py, torch both)."""
    _light(world, "launch machinery")


def test_merge_imports_no_torch(world):
    assert "merged 2 shard(s), 4 of 4 images" in world["merge"]["output"]
    _light(world, "merge")


def test_evaluate_computing_imports_no_torch(world):
    assert "cache hit" not in world["evaluate miss"]["output"]
    _light(world, "evaluate miss")


def test_report_imports_no_torch(world):
    assert "report.html" in world["report"]["output"]
    _light(world, "report")


def test_reading_an_image_for_the_report_imports_no_torch(world):
    _light(world, "load_rgb")


def test_models_lists_open_clips_tags_without_importing_it(world):
    output = world["models"]["output"]
    assert world["models"]["exit"] == 0, output
    assert "negalign-tiny-test" in output and "openai" in output
    assert "open_clip" not in world["models"]["heavy"]


def test_models_imports_no_torch(world):
    _light(world, "models")


def test_the_launch_driver_runs_its_plan_check_and_skips_done_shards(world):
    assert world["launch"]["exit"] == 0, world["launch"]["output"]
    assert "0 shard(s) ran, 2 were done already" in world["launch"]["output"]


def test_the_launch_driver_imports_no_torch(world):
    """Its plan-only check runs `embed images` as shard 0 in this process; shard 0's cache, new, has
    no fingerprint row for the model: a child process builds the model and writes the row."""
    _light(world, "launch")


def test_manifest_versions_are_read_without_importing_the_libraries(world):
    """A manifest written without torch loaded records the same versions (torch's build suffix
    included) as one written with it."""
    assert "torch" not in world["versions before"]["heavy"]
    before, after = world["versions"]["before"], world["versions"]["after"]
    assert before == after
    assert {"torch", "open_clip", "numpy"} <= set(before)


# ----------------------------------------------------------------------------- the model list
def test_the_torch_free_model_list_equals_open_clips():
    from negalign_cli import model_names, models

    light = [
        (a.name, a.source, a.needs_weights, a.tags)
        for a in model_names.list_architectures(models.PROJECT_MODELS)
    ]
    full = [(a.name, a.source, a.needs_weights, a.tags) for a in models.list_architectures()]
    assert light == full
    assert any(tags for *_, tags in light)  # tags were read, not an empty table


def test_a_pretrained_table_that_wants_torch_falls_back_to_open_clip(tmp_path):
    """A pretrained.py importing anything the reader does not allow is refused (the caller then
    imports open_clip), never run with torch behind its back."""
    from negalign_cli.model_names import _read_pretrained_table

    (tmp_path / "pretrained.py").write_text("import torch\n_PRETRAINED = {}\n")
    with pytest.raises(ImportError):
        _read_pretrained_table(tmp_path)
    (tmp_path / "pretrained.py").write_text(
        "from .version import __version__\n_PRETRAINED = {'A-1': dict(x=1, y=2), 'v': __version__}\n"
    )
    (tmp_path / "version.py").write_text("__version__ = '9.9'\n")
    assert _read_pretrained_table(tmp_path) == {"A-1": {"x": 1, "y": 2}, "v": "9.9"}
