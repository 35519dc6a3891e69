"""Modules imported on first use, for the modules a cache hit passes through.

``np = lazy_module("numpy")`` at module level stands for ``import numpy as np``: the name is bound
at once and numpy is imported the first time an attribute of it is read (``np.sort``), so a path
that never computes (``evaluate`` on a cache hit) never pays for the import. Write the real import
under ``if TYPE_CHECKING:`` beside it, for the type checker. ``tests/test_evaluate_fast.py`` checks
that an ``evaluate`` hit imports neither numpy nor pandas, pyarrow, scikit-learn or matplotlib.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule(ModuleType):
    """A stand-in for the module ``name`` that imports it when an attribute is first read, then
    holds the module's attributes itself (later reads are plain attribute reads)."""

    def __getattr__(self, attribute: str) -> Any:  # only for attributes not (yet) copied here
        module = importlib.import_module(self.__name__)
        self.__dict__.update(module.__dict__)
        return getattr(module, attribute)


def lazy_module(name: str) -> Any:
    """``name`` (a module), imported on first attribute access."""
    return LazyModule(name)
