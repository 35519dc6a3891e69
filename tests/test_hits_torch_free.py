"""A cache hit of every model command imports no torch (issue 21, part 3).

The chain (embed texts, embed images, cam, mine-negatives, split-vocab, score) is run once in this
process with the tiny test model; then ONE fresh process reruns every command, in order, through the
in-process CLI and reports after each whether torch (or open_clip, sklearn, matplotlib) has been
imported, and if so by which module: an import hook records the stack of the first `import torch`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.faults.helpers import cli
from tests.helpers import IMPORT_SPY, TINY
from tests.helpers.chain import model_chain

ROOT = Path(__file__).resolve().parents[1]
# In this order: a command that imports torch hides whether the ones after it would.
COMMANDS = ("embed texts", "mine-negatives", "split-vocab", "score", "cam", "embed images")
HEAVY = ("torch", "open_clip", "sklearn", "matplotlib")

_RERUN = IMPORT_SPY + textwrap.dedent(
    """

    runs = json.loads(sys.argv[1])
    by = {}  # module -> the command whose rerun imported it
    runner = CliRunner()
    for name, argv in runs:
        done = runner.invoke(app, argv, env={"COLUMNS": "200"})
        for module in HEAVY:
            if module in sys.modules and module not in by:
                by[module] = name
        print(json.dumps({"command": name, "code": done.exit_code, "output": done.output,
                          "imported": {m: m in sys.modules for m in HEAVY}, "first": dict(first),
                          "by": dict(by)}))
    """
)


@pytest.fixture(scope="module")
def hits(tmp_path_factory):
    """Every command run once here (the model built, everything cached), then rerun in one fresh
    process: {command: what that process saw after its rerun}."""
    root = tmp_path_factory.mktemp("hits")
    runs = model_chain(root, *TINY)
    for name in runs:  # in the order their inputs need
        done = cli(*runs[name])
        assert done.exit_code == 0, f"{name}:\n{done.output}"
    # --device cpu: `auto` asks torch where a GPU driver is present (settings.no_gpu_driver)
    argv = [(name, [*runs[name], "--device", "cpu"]) for name in COMMANDS]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _RERUN, json.dumps(argv), json.dumps(HEAVY)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [s["command"] for s in seen] == list(COMMANDS), done.stdout[-3000:]
    return {s["command"]: s for s in seen}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_hit_imports_no_torch(hits, command):
    seen = hits[command]
    assert seen["code"] == 0, seen["output"]
    assert "cache hit" in " ".join(seen["output"].split()), seen["output"]
    heavy = [m for m, imported in seen["imported"].items() if imported]
    where = {m: seen["first"].get(m) for m in heavy}
    by = {m: seen["by"].get(m) for m in heavy}  # the rerun that imported each first
    assert not heavy, f"`{command}` hit imported {heavy} (first in the rerun of {by}, from {where})"
