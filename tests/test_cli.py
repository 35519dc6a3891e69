from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from negalign_cli import __version__
from negalign_cli.cli.app import app
from tests.helpers import TINY

runner = CliRunner()

COMMANDS = [
    [],
    ["models"],
    ["embed"],
    ["embed", "texts"],
    ["cache"],
    ["cache", "ls"],
    ["cache", "info"],
    ["cache", "gc"],
]


def run(*args, env=None):
    result = runner.invoke(app, list(args), env=env)
    return result


def negalign(*args, cwd=None, env=None):
    """The real console entry point in a subprocess: what a user sees."""
    return subprocess.run(
        [sys.executable, "-m", "negalign_cli", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_every_help_has_an_example(command):
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    if command:  # groups (embed, cache, toy) show examples too
        assert "Example: negalign" in result.output


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and result.output.strip() == f"negalign {__version__}"


def test_embed_texts_writes_files_then_hits(tmp_path):
    cache, out = tmp_path / "c", tmp_path / "d"
    args = [
        "embed",
        "texts",
        "--classes",
        "waterbird",
        "--model",
        "negalign-tiny-test",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
    ]
    first = run(*args)
    assert first.exit_code == 0, first.output
    assert "encoded 2" in first.output
    assert sorted(p.name for p in out.iterdir()) == ["class_embeddings.npy", "classes.txt", "manifest.json"]
    assert np.load(out / "class_embeddings.npy").shape == (2, 64)
    second = run(*args)
    assert second.exit_code == 0 and "cache hit" in second.output


def test_cache_dir_from_environment_and_flag_precedence(tmp_path):
    env_cache, flag_cache = tmp_path / "env", tmp_path / "flag"
    args = ["embed", "texts", "-c", "waterbird", "-q", *TINY]
    assert run(*args, env={"NEGALIGN_CACHE": str(env_cache)}).exit_code == 0
    assert (env_cache / "artifacts" / "embed-texts").is_dir()
    assert run(*args, "--cache-dir", str(flag_cache), env={"NEGALIGN_CACHE": str(env_cache)}).exit_code == 0
    assert (flag_cache / "artifacts" / "embed-texts").is_dir()


def test_cache_ls_info_gc(tmp_path):
    cache = str(tmp_path / "c")
    empty = run("cache", "ls", "--cache-dir", cache)
    assert empty.exit_code == 0 and "is empty" in empty.output
    assert run("embed", "texts", "-c", "waterbird", "--cache-dir", cache, "-q", *TINY).exit_code == 0
    filled = run("cache", "ls", "--cache-dir", cache)
    assert filled.exit_code == 0
    assert "embed-texts" in filled.output and "1 artifact(s)" in filled.output
    assert "2 vector(s) in 1 namespace(s)" in filled.output
    from negalign_cli.cache.store import ArtifactStore

    key = ArtifactStore(cache).records()[0]["key"]
    info = run("cache", "info", key[:8], "--cache-dir", cache)
    assert info.exit_code == 0 and key in info.output and "class_embeddings.npy" in info.output
    gc = run("cache", "gc", "--cache-dir", cache, "--items-older-than", "1d")
    assert gc.exit_code == 0 and "removed: 0 damaged unindexed artifact(s)" in gc.output
    gc = run("cache", "gc", "--cache-dir", cache, "--items-older-than", "0s", "--dry-run")
    assert gc.exit_code == 0 and "would remove" in gc.output and "2 per-item vector(s)" in gc.output
    bad = run("cache", "gc", "--cache-dir", cache, "--items-older-than", "soon")
    assert bad.exit_code != 0 and "cannot read age" in bad.output
    missing = run("cache", "info", "ffff0000", "--cache-dir", cache)
    assert missing.exit_code != 0 and "no artifact" in missing.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["embed", "texts", "-c", "waterbird", "--pretrained", "/nope/ViT.pt"],
            "checkpoint not found: /nope/ViT.pt",
        ),
        (["embed", "texts", "-c", "missing_classes.txt"], "class file not found"),
        (["embed", "texts", "-c", "birds"], "unknown class preset"),
        (["embed", "texts", "-c", "waterbird", "--model", "ViT-L-14"], "needs weights"),
        (["embed", "texts", "-c", "waterbird"], "could not get the weights ViT-B-16/openai"),
        (["embed", "texts", "-c", "waterbird", "--device", "tpu"], "unknown device"),
        (
            ["embed", "texts", "-c", "waterbird", "--device", "cpu", "--precision", "fp16"],
            "fp16 needs a CUDA",
        ),
        (["cache", "info", "ab"], "too short"),
    ],
)
def test_bad_input_gives_one_line_error(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)  # relative paths (missing_classes.txt) as a user's shell would see them
    result = run(*args, "--cache-dir", str(tmp_path / "c"))
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # an exit, not a crash
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr


def test_python_m_negalign_cli_smoke(tmp_path):
    """The one real `python -m negalign_cli` process of the CLI tests (the cases above run in-process):
    bad input through the real entry point is exit 2 and one `error:` line on stderr, no traceback."""
    bad = negalign(
        "embed", "texts", "-c", "missing_classes.txt", "--cache-dir", str(tmp_path / "c"), cwd=tmp_path
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    error_lines = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "class file not found" in error_lines[0], bad.stderr


def test_models_lists_project_and_open_clip():
    result = run("models", "--names")
    names = result.output.split()
    assert result.exit_code == 0 and names[0] == "negalign-tiny-test" and "ViT-B-16" in names
    table = run("models", "--filter", "tiny")
    assert "negalign-tiny-test" in table.output and "ViT-B-16" not in table.output


def test_random_weights_are_announced(tmp_path):
    cache = ["--cache-dir", str(tmp_path / "c")]
    tiny = run("embed", "texts", "-c", "waterbird", *TINY, *cache)
    assert tiny.exit_code == 0 and "has random weights" in tiny.output
    random = run(
        "embed", "texts", "-c", "waterbird", "--model", "negalign-toy", "--pretrained", "random", *cache
    )
    assert random.exit_code == 0 and "has random weights (random init, seed 0)" in random.output
    toy = run("embed", "texts", "-c", "waterbird", "--model", "negalign-toy", *cache)
    assert toy.exit_code == 0 and "random weights" not in toy.output
