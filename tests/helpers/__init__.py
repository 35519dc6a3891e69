from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

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
