"""The planning layer's model identity (negalign_cli/modelref.py): a ModelRef's fingerprint from the
cache's fingerprint table equals the built model's, a changed checkpoint gets a new one, a stale
row is caught when the model is built, and a cache hit of every model command builds no model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from negalign_cli import models, settings
from negalign_cli.errors import NegalignError
from negalign_cli.modelref import TABLE_FILE, FingerprintTable, plan_model, resolve_ref
from tests.faults.helpers import cli, one_line_error
from tests.helpers.chain import model_chain

ROOT = Path(__file__).resolve().parents[1]


def _tiny_checkpoint(path: Path, shift: float = 0.0) -> Path:
    model = models.load_model("negalign-tiny-test").model
    state = {k: v + shift if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, path)
    return path


def _no_build(monkeypatch) -> None:
    """Building a model in this process fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built on the planning path")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(models, "_build", refuse)


# ----------------------------------------------------------------------------- the fingerprint
@pytest.mark.parametrize(
    "name, pretrained", [("negalign-tiny-test", None), ("negalign-toy", None), ("file", "")]
)
def test_the_tables_fingerprint_is_the_built_models(tmp_path, monkeypatch, name, pretrained):
    if name == "file":
        name, pretrained = "negalign-tiny-test", str(_tiny_checkpoint(tmp_path / "w.pt", shift=0.01))
    built = models.load_model(name, pretrained)
    first = plan_model(name, pretrained, tmp_path / "cache")  # no row yet: built now, the row written
    assert first.built and first.fingerprint == built.fingerprint
    assert resolve_ref(name, pretrained).table_key is not None
    _no_build(monkeypatch)
    again = plan_model(name, pretrained, tmp_path / "cache")
    assert not again.built
    assert again.fingerprint == built.fingerprint
    assert again.embed_dim == built.embed_dim and again.preprocess_cfg == built.preprocess_cfg
    assert again.describe() == built.describe()
    assert again.random_weights == built.random_weights
    assert (again.vision_blocks, again.grid) == (built.vision_blocks, built.grid)
    ref = again.ref  # the config-derived sizes agree with the built tower
    assert (ref.vision_layers, ref.grid, ref.embed_dim) == (built.vision_blocks, built.grid, built.embed_dim)


def test_a_changed_checkpoint_gets_a_new_fingerprint(tmp_path):
    path = _tiny_checkpoint(tmp_path / "w.pt", shift=0.01)
    before = plan_model("negalign-tiny-test", str(path), tmp_path / "cache")
    _tiny_checkpoint(path, shift=0.02)  # new bytes, same file name and size
    after = plan_model("negalign-tiny-test", str(path), tmp_path / "cache")
    assert after.built, "the row of the old file must not be used for the new bytes"
    assert after.fingerprint != before.fingerprint
    assert after.fingerprint == models.load_model("negalign-tiny-test", str(path)).fingerprint


def test_an_open_clip_tag_row_follows_its_cached_file(tmp_path, monkeypatch):
    """A tag's row records the stat of the tag's file in the Hugging Face cache (laid out as
    huggingface_hub does: refs/main, snapshots/COMMIT/FILE); new bytes there are a new fingerprint."""
    from open_clip import pretrained

    tiny = models.load_model("negalign-tiny-test").model
    snapshot = tmp_path / "hf" / "hub" / "models--negalign--tiny-test" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    weights = snapshot / "open_clip_pytorch_model.bin"

    def write(shift: float) -> None:
        torch.save(
            {k: v + shift if v.is_floating_point() else v for k, v in tiny.state_dict().items()}, weights
        )

    write(0.5)
    registry = {
        **pretrained._PRETRAINED,
        "negalign-tiny-test": {"hubtest": pretrained._pcfg(hf_hub="negalign/tiny-test/")},
    }
    monkeypatch.setattr(pretrained, "_PRETRAINED", registry)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first = plan_model("negalign-tiny-test", "hubtest", tmp_path / "cache")
    assert first.built and first.fingerprint == models.load_model("negalign-tiny-test", "hubtest").fingerprint
    again = plan_model("negalign-tiny-test", "hubtest", tmp_path / "cache")
    assert not again.built and again.fingerprint == first.fingerprint
    write(0.25)  # the cached file replaced (a new revision of the same tag)
    changed = plan_model("negalign-tiny-test", "hubtest", tmp_path / "cache")
    assert changed.built and changed.fingerprint != first.fingerprint
    assert changed.fingerprint == models.load_model("negalign-tiny-test", "hubtest").fingerprint


def test_a_damaged_row_is_not_trusted(tmp_path):
    plan_model("negalign-tiny-test", None, tmp_path)
    table = json.loads((tmp_path / TABLE_FILE).read_text())
    (row,) = table["rows"].values()
    row["entry"]["fingerprint"] = "0" * 64  # edited without its checksum
    (tmp_path / TABLE_FILE).write_text(json.dumps(table))
    again = plan_model("negalign-tiny-test", None, tmp_path)
    assert again.built and again.fingerprint == models.load_model("negalign-tiny-test").fingerprint


def test_a_stale_row_is_caught_when_the_model_is_built(tmp_path):
    cache = tmp_path / "cache"
    args = ("embed", "texts", "--classes", "waterbird", "--cache-dir", str(cache))
    assert cli(*args).exit_code == 0  # the row written
    ref = resolve_ref("negalign-tiny-test", None)
    table = FingerprintTable(cache)
    entry = table.get(ref)
    right = entry["fingerprint"]
    table.put(ref, {**entry, "fingerprint": "f" * 64})  # a row that no longer says the truth
    words = tmp_path / "words.txt"
    words.write_text("heron\nkayak\n")  # a miss: the model is built to encode them
    done = cli("embed", "texts", "--classes", str(words), "--cache-dir", str(cache))
    one_line_error(done, "stale entry")
    assert table.get(ref)["fingerprint"] == right  # rewritten
    stored = [json.loads(p.read_text()) for p in (cache / "artifacts").rglob("manifest.json")]
    assert all(m["inputs"]["model"] == right for m in stored), "a result was stored under the stale key"
    rerun = cli("embed", "texts", "--classes", str(words), "--cache-dir", str(cache))
    assert rerun.exit_code == 0, rerun.output


# ----------------------------------------------------------------------------- cache hits, no model
@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A cam → split-vocab → score chain and embed texts/images, run once (the model built)."""
    root = tmp_path_factory.mktemp("modelref")
    runs = model_chain(root)
    for args in runs.values():
        done = cli(*args)
        assert done.exit_code == 0, done.output
    return root, runs


@pytest.mark.parametrize(
    "command", ["embed texts", "embed images", "cam", "mine-negatives", "split-vocab", "score"]
)
def test_a_cache_hit_builds_no_model(chain, monkeypatch, command):
    _, runs = chain
    _no_build(monkeypatch)
    done = cli(*runs[command])
    assert done.exit_code == 0, done.output
    assert "cache hit" in done.output


def test_a_miss_after_a_hit_builds_the_model(chain, tmp_path):
    """The same lazy model computes when the artifact is missing: the row is verified, the result
    equals a run that built the model at once."""
    root, runs = chain
    words = tmp_path / "words.txt"
    words.write_text("heron\nkayak\n")
    done = cli(
        "embed",
        "texts",
        "--classes",
        str(words),
        "--out",
        str(tmp_path / "a"),
        runs["cam"][-2],
        runs["cam"][-1],
    )
    assert done.exit_code == 0 and "cache hit" not in done.output, done.output
    fresh = cli(
        "embed",
        "texts",
        "--classes",
        str(words),
        "--out",
        str(tmp_path / "b"),
        "--cache-dir",
        str(tmp_path / "c2"),
    )
    assert fresh.exit_code == 0, fresh.output
    assert (tmp_path / "a" / "class_embeddings.npy").read_bytes() == (
        tmp_path / "b" / "class_embeddings.npy"
    ).read_bytes()


_HIT = textwrap.dedent(
    """
    import json, sys
    from typer.testing import CliRunner
    from negalign_cli.cli.app import app
    done = CliRunner().invoke(app, sys.argv[1:])
    print(json.dumps({"code": done.exit_code, "output": done.output,
                      "open_clip": "open_clip" in sys.modules, "torch": "torch" in sys.modules}))
    """
)


def test_an_embed_images_hit_in_a_fresh_process(chain):
    """A real process: the hit of `embed images` imports no open_clip (no model was built)."""
    _, runs = chain
    device = "auto" if settings.no_gpu_driver() else "cpu"  # with a GPU driver, auto asks torch
    done = subprocess.run(
        [sys.executable, "-c", _HIT, *runs["embed images"], "--model", "negalign-tiny-test", "--device", device],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0 and "cache hit" in result["output"], result["output"]
    assert not result["open_clip"], "open_clip was imported: a model was built on a cache hit"
    assert not result["torch"], "torch was imported on a cache hit"


_PLAN = textwrap.dedent(
    """
    import json, sys
    from negalign_cli.modelref import plan_model
    from negalign_cli.settings import Runtime
    rt = Runtime.create(cache_dir=sys.argv[1], device=sys.argv[2])
    model = plan_model("negalign-toy", None, rt.cache_dir, rt.device)
    print(json.dumps({"built": model.built, "fingerprint": model.fingerprint, "blocks": model.vision_blocks,
                      "imported": sorted(m for m in ("torch", "numpy", "open_clip") if m in sys.modules)}))
    """
)


def test_planning_a_known_model_imports_no_torch(tmp_path):
    """The planning layer alone (modelref + the Runtime): with a row, no torch, numpy or open_clip."""
    plan_model("negalign-toy", None, tmp_path)  # the row
    device = "auto" if settings.no_gpu_driver() else "cpu"  # with a GPU driver, auto asks torch
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _PLAN, str(tmp_path), device], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["built"] and result["blocks"] == 4
    assert result["fingerprint"] == models.load_model("negalign-toy").fingerprint
    assert result["imported"] == []


# ----------------------------------------------------------------------------- the device, no torch
def test_auto_is_the_cpu_without_torch_when_there_is_no_gpu_driver(monkeypatch):
    def no_torch(*args, **kwargs):
        raise AssertionError("torch was asked")

    monkeypatch.setattr(settings, "resolve_device", no_torch)
    monkeypatch.setattr(settings, "no_gpu_driver", lambda: True)
    assert settings.resolve_device_name("auto") == "cpu"
    assert settings.resolve_device_name("cpu").type == "cpu"
    with pytest.raises(NegalignError, match="CUDA is not available"):
        settings.resolve_device_name("cuda:1")
    with pytest.raises(NegalignError, match="unknown device"):
        settings.resolve_device_name("gpu0")
    with pytest.raises(NegalignError, match="fp16 needs a CUDA device"):
        settings.Runtime.create(device="auto", precision="fp16")
