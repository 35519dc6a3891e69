from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# The start of a script a test runs in a fresh process (argv: a JSON payload, then the JSON list of
# module names HEAVY): an import hook records, for each module of HEAVY, the negalign_cli frames of
# its first import in ``first``; then the CLI's app and a runner are imported.
IMPORT_SPY = """
import json, sys, traceback
from importlib.abc import MetaPathFinder

first = {}

class Spy(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in HEAVY and name not in first:
            stack = [f for f in traceback.extract_stack() if "negalign_cli" in f.filename]
            first[name] = [f"{f.filename.split('negalign_cli')[-1]}:{f.lineno}" for f in stack]
        return None

HEAVY = tuple(json.loads(sys.argv[2]))
sys.meta_path.insert(0, Spy())
from typer.testing import CliRunner
from negalign_cli.cli.app import app
"""

# The CLI defaults to ViT-B-16 with OpenAI weights, which tests cannot download: they name the tiny model.
TINY = ["--model", "negalign-tiny-test"]


@contextlib.contextmanager
def in_process(cwd: Path | None = None, **env: str) -> Iterator[None]:
    """For module and session fixtures that run the CLI in-process, before the per-test isolation of
    tests/conftest.py is set up: what a command changes for its own process (TMPDIR, MPLCONFIGDIR,
    tempfile's folder), the working folder (``cwd``, if given) and the variables in ``env`` are undone
    afterwards."""
    import tempfile

    import pytest

    with pytest.MonkeyPatch.context() as patch:
        for name in ("TMPDIR", "MPLCONFIGDIR"):
            patch.setenv(name, os.environ.get(name, ""))
            if not os.environ[name]:
                patch.delenv(name)  # recorded as absent: removed again afterwards
        patch.setattr(tempfile, "tempdir", tempfile.tempdir)
        for name, value in env.items():
            patch.setenv(name, value)
        if cwd is not None:
            patch.chdir(cwd)
        yield


def _placeholder_png(path: Path, *_args: object, **_kwargs: object) -> None:
    from PIL import Image

    Image.new("RGB", (16, 12), (255, 255, 255)).save(path)


def placeholder_figures(patch: pytest.MonkeyPatch) -> None:
    """ROC curves and score histograms written as a small blank PNG instead of drawn (see the
    ``placeholder_figures`` fixture in tests/conftest.py)."""
    from negalign_cli.stages import plots

    patch.setattr(plots, "plot_roc", _placeholder_png)
    patch.setattr(plots, "plot_histograms", _placeholder_png)
