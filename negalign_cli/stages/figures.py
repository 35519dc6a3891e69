"""Figures as cached outputs: each PNG of ``evaluate`` and ``report`` is an artifact of the
``figure`` stage, keyed by a digest of exactly what it is drawn from (the arrays, labels and
settings the plotting function receives) and by the matplotlib version that draws it.

A figure whose data did not change is copied from the cache, not drawn: a second ``report`` on
the same ``evaluate`` folder draws nothing, and ``evaluate`` with a new λ grid redraws only the
figures whose data depend on λ (NegAlign's ROC curve when the λ it uses changes; the histograms
of the stored score columns never). The store verifies a cached PNG like any output (size and
sha256): an edited or truncated one is drawn again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from negalign_cli.cache.store import StageSpec
from negalign_cli.reporting import NullReporter, Reporter

if TYPE_CHECKING:
    from negalign_cli.cache.store import ArtifactStore

# 1: ROC curves, score histograms, the λ curve and the CAM grid of `evaluate` and `report`
# 2: drawn for the report's column (text ≥ 11 px), ROC on a log FPR axis, saturated scores on a
#    log-odds or rank scale, CAMs in a perceptual colormap over the image in grey
FIGURE_STAGE, FIGURE_VERSION = "figure", 3


def data_digest(material: Any) -> str:
    """The sha256 of what a figure is drawn from: nested mappings (in their order: the order of
    curves and panels is drawn), sequences, arrays (dtype, shape and bytes), frames and scalars."""
    digest = hashlib.sha256()
    _feed(digest, material)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    pd = sys.modules.get("pandas")  # a frame or series exists only once pandas is imported
    if pd is not None and isinstance(value, pd.DataFrame):
        digest.update(b"frame")
        _feed(digest, {str(c): value[c].to_numpy() for c in value.columns})
    elif pd is not None and isinstance(value, pd.Series):
        _feed(digest, value.to_numpy())
    elif isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            _feed(digest, value.tolist())
            return
        array = np.ascontiguousarray(value)
        digest.update(f"array {array.dtype.str} {array.shape}\n".encode())
        digest.update(array.data)
    elif isinstance(value, Mapping):
        digest.update(f"map {len(value)}\n".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"list {len(value)}\n".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, Path):
        digest.update(f"path {value}\n".encode())
    elif isinstance(value, np.generic):
        _feed(digest, value.item())
    else:
        digest.update(json.dumps(value, allow_nan=True, default=repr).encode() + b"\n")


def matplotlib_version() -> str:
    """The version of the library that draws the figures (its bytes change with it), read
    without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("matplotlib")
    except PackageNotFoundError:
        return "unknown"


def figure_spec(kind: str, material: Any) -> StageSpec:
    """The cache key of one figure: its kind, the matplotlib version and the data it shows."""
    return StageSpec(
        FIGURE_STAGE,
        FIGURE_VERSION,
        {"figure": kind, "matplotlib": matplotlib_version()},
        {"data": data_digest(material)},
    )


def cached_figure(
    store: ArtifactStore | None,
    kind: str,
    material: Any,
    draw: Callable[[Path], None],
    target: Path,
    reporter: Reporter | None = None,
) -> bool:
    """Write the figure ``kind`` to ``target``: copied from the cache when one drawn from the same
    ``material`` is there, else drawn by ``draw(path)`` into the cache first. Without a store it is
    simply drawn. Returns whether it came from the cache."""
    if store is None:
        draw(target)
        return False
    name = target.name

    def compute(folder: Path) -> None:
        draw(folder / name)

    result = store.run(figure_spec(kind, material), compute, _Quieter(reporter or NullReporter()))
    shutil.copyfile(result.artifact.file(name), target)
    return result.hit


class _Quieter(NullReporter):
    """The stage's reporter with the store's per-figure "cache hit" lines demoted to debug (a
    figure is a detail of the command that draws it); warnings (a corrupt cached figure) stay."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter

    def info(self, message: str) -> None:
        self.reporter.debug(message)

    def debug(self, message: str) -> None:
        self.reporter.debug(message)

    def warn(self, message: str) -> None:
        self.reporter.warn(message)
