"""Fault suite: first contact. A model name or weights the run cannot have fail at once, in one
line, before any image is listed or hashed: an unknown --model (with the closest names), OpenAI's
spelling taken as the API takes it, and an open_clip tag that is not cached where the hub cannot
be reached (no minute of retries, no retry line printed twice). The Make pipelines' side of first
contact (every manifest kept, a knob replans only its steps) is in tests/test_pipelines.py."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from negalign_cli.errors import NegalignError
from negalign_cli.model_names import (
    OPENAI_ARCHS,
    check_model_name,
    known_model_names,
    open_clip_model_names,
    project_model_names,
    resolve_model_name,
)
from negalign_cli.models import _open_clip, load_model
from tests.faults.helpers import cli, one_line_error
from tests.helpers.images import make_image_folder

ROOT = Path(__file__).resolve().parents[2]
FAST = 20.0  # seconds: well under the old path (about a minute offline), with room for a loaded machine


# --------------------------------------------------------------------------- --model, at parse time
def test_names_come_from_the_same_configs_as_open_clip():
    """The torch-free list is open_clip's own registry (its JSON configs) plus the project's."""
    open_clip = _open_clip()  # registers the project's configs too
    assert set(open_clip_model_names()) | set(project_model_names()) == set(open_clip.list_models())
    assert {"negalign-toy", "negalign-tiny-test"} <= set(project_model_names())
    assert "ViT-B-16" in open_clip_model_names() and "ViT-B/16" in known_model_names()
    for openai_name, arch in OPENAI_ARCHS.items():
        assert arch in open_clip.list_models(), openai_name


def test_openai_spelling_is_open_clip_name_with_openai_weights():
    assert resolve_model_name("ViT-B/16") == ("ViT-B-16", "openai")
    assert resolve_model_name("ViT-L/14@336px", "laion2b") == ("ViT-L-14-336", "laion2b")
    assert resolve_model_name("negalign-toy") == ("negalign-toy", None)
    assert check_model_name("ViT-B/16") == "ViT-B/16"
    with pytest.raises(NegalignError, match=r"did you mean ViT-B-16\b"):
        check_model_name("ViT-B-61")
    with pytest.raises(NegalignError, match="did you mean negalign-toy"):
        check_model_name("negalign-toys")
    # the loader and the API meet the same check: the closest names, not a bare refusal
    with pytest.raises(NegalignError, match=r"unknown model architecture 'VIT-B-16'.*ViT-B-16"):
        load_model("VIT-B-16")


def test_unknown_model_fails_before_any_image_is_hashed(tmp_path):
    images = make_image_folder(tmp_path / "images")
    cache = tmp_path / "cache"
    for command in (["cam", "--classes", "waterbird"], ["embed", "images"]):
        result = cli(*command, "--images", str(images), "--model", "ViT-B-61", "--cache-dir", str(cache))
        line = one_line_error(result, "unknown model architecture 'ViT-B-61'")
        assert "did you mean ViT-B-16" in line and "negalign models" in line
        assert not cache.exists(), "the images were listed and hashed before the name was checked"
    # `negalign bench` checks its --model the same way
    assert "negalign-tiny-test" in one_line_error(cli("bench", "--model", "negalign-tiny"), "did you mean")


def test_launch_checks_the_shards_model_before_submitting(tmp_path):
    images = make_image_folder(tmp_path / "images")
    shards = tmp_path / "shards"
    for spelling in (["--model", "ViT-B-61"], ["--model=ViT-B-61"], ["-m", "ViT-B-61"]):
        command = ["launch", "cam", "--shards", "2", "--shards-dir", str(shards), "--images", str(images)]
        result = cli(*command, "--classes", "waterbird", *spelling)
        assert "did you mean ViT-B-16" in one_line_error(result, "unknown model architecture 'ViT-B-61'")
        assert not shards.exists(), "shards were planned before the name was checked"


def test_openai_spelling_is_accepted_by_the_cli(tmp_path):
    """`--model ViT-B/16` is ViT-B-16 with OpenAI's weights (here: not cached, so that error, at
    once, before the images are hashed: not 'unknown model')."""
    images = make_image_folder(tmp_path / "images")
    cache = tmp_path / "cache"
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    for name, weights in (("ViT-B/16", "ViT-B-16/openai"), ("ViT-B/32", "ViT-B-32/openai")):
        command = ["cam", "--images", str(images), "--classes", "waterbird", "--model", name]
        result = cli(*command, "--cache-dir", str(cache), env=env)
        one_line_error(result, f"could not get the weights {weights}")
        assert not cache.exists()


def test_the_name_check_imports_no_torch(tmp_path):
    """An unknown name is refused without importing torch (seconds on a loaded machine)."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from negalign_cli.cli.app import app\n"
        "result = CliRunner().invoke(app, ['cam', '--images', sys.argv[1], '--classes', 'waterbird', "
        "'--model', 'ViT-B-61'])\n"
        "print(result.exit_code, 'torch' in sys.modules, 'open_clip' in sys.modules)\n"
        "print(result.output)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env, timeout=120
    )
    first, *rest = done.stdout.splitlines()
    assert first == "2 False False", done.stdout + done.stderr
    assert any(line.startswith("error: unknown model architecture 'ViT-B-61'") for line in rest)


# --------------------------------------------------------------------------- weights, offline
def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed on return: connections to it are refused


@pytest.fixture()
def online_but_no_hub(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE unset (as a user has it), an empty HF cache, and a hub endpoint that refuses
    every connection: what a machine without a network sees, wherever the tests run."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read once, at import (conftest sets it)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE=1", "unreachable"])
def test_uncached_default_model_fails_fast_in_one_line(offline, tmp_path, request, capfd):
    if offline == "unreachable":
        env = request.getfixturevalue("online_but_no_hub")
    else:
        env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    result = cli("embed", "texts", "--classes", "waterbird", "--model", "ViT-B-16", env=env)
    elapsed = time.perf_counter() - started
    line = one_line_error(result, "could not get the weights ViT-B-16/openai")
    assert elapsed < FAST, f"{elapsed:.1f} s"
    assert "--pretrained PATH" in line and str(Path(env["HF_HOME"]) / "hub") in line
    assert ("HF_HUB_OFFLINE is set" if offline != "unreachable" else "cannot be reached") in line
    captured = capfd.readouterr()
    assert "Retry" not in result.output + captured.out + captured.err  # no retry, nothing printed twice


class _Unavailable(BaseHTTPRequestHandler):
    def do_HEAD(self):  # noqa: N802 (http.server's name)
        self.send_response(503)
        self.end_headers()

    do_GET = do_HEAD  # noqa: N815

    def log_message(self, *args):
        pass


def test_a_hub_that_does_not_answer_fails_fast(online_but_no_hub, monkeypatch):
    """A real server answering 503 (huggingface_hub would retry it five times per file)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("HF_HOME", online_but_no_hub["HF_HOME"])
        started = time.perf_counter()
        with pytest.raises(NegalignError, match=r"does not answer \(HTTP 503\).*--pretrained PATH"):
            load_model("ViT-B/32")
        assert time.perf_counter() - started < FAST
    finally:
        server.shutdown()
        server.server_close()


def test_cached_tag_weights_load_with_no_request(online_but_no_hub, monkeypatch, tmp_path):
    """Weights in the HF cache are loaded from it, offline, with no request (the hub here refuses
    every connection): a tag of the tiny model whose weights sit in the cache as
    huggingface_hub lays them out (refs/main, snapshots/COMMIT/FILE)."""
    from open_clip import pretrained

    tiny = load_model("negalign-tiny-test")
    trained = {k: v + 0.5 if v.is_floating_point() else v for k, v in tiny.model.state_dict().items()}
    repo = Path(online_but_no_hub["HF_HOME"]) / "hub" / "models--negalign--tiny-test"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    torch.save(trained, snapshot / "open_clip_pytorch_model.bin")
    registry = {
        **pretrained._PRETRAINED,
        "negalign-tiny-test": {"hubtest": pretrained._pcfg(hf_hub="negalign/tiny-test/")},
    }
    monkeypatch.setattr(pretrained, "_PRETRAINED", registry)
    for name, value in online_but_no_hub.items():
        monkeypatch.setenv(name, value)

    started = time.perf_counter()
    loaded = load_model("negalign-tiny-test", "hubtest")
    assert time.perf_counter() - started < FAST
    assert loaded.weights == "open_clip tag hubtest"
    assert loaded.fingerprint != tiny.fingerprint  # the cached weights, not a random init
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())


def test_open_clip_logging_leaves_the_root_logger_alone():
    """open_clip logs with logging.info(); on a root logger without handlers that installs one for
    good, and every library's log line (huggingface_hub's retries) is then printed twice."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()  # a plain process: no handler on the root logger
    try:
        load_model("negalign-tiny-test")
        assert root.handlers == []
    finally:
        root.handlers[:] = saved


def test_error_names_the_way_out_for_the_api_too(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(NegalignError) as caught:
        load_model("ViT-B-16")
    message = str(caught.value)
    assert "--pretrained PATH" in message and "negalign-toy" in message
    assert json.dumps(message).count("\\n") == 0  # one line
