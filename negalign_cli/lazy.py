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


class LiveModule(ModuleType):
    """A stand-in for the module ``name`` that imports it when an attribute is first read and
    reads every attribute from the module itself, each time: what is set on the module later (a
    test's ``monkeypatch.setattr(torch, "compile", ...)``) is seen, as through ``import torch``."""

    def __getattr__(self, attribute: str) -> Any:  # every attribute: none is kept here
        module = self.__dict__.get("_module")
        if module is None:
            module = self.__dict__["_module"] = importlib.import_module(self.__name__)
        return getattr(module, attribute)


def lazy_module(name: str, *, live: bool = False) -> Any:
    """``name`` (a module), imported on first attribute access. ``live``: every attribute is read
    from the module (:class:`LiveModule`, for torch, whose attributes tests replace); else they are
    copied on first use (:class:`LazyModule`: plain reads afterwards, for numpy on hot paths)."""
    return LiveModule(name) if live else LazyModule(name)
