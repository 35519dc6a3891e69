"""Package data: class-name presets, prompt templates, model configs (see ATTRIBUTION.md)."""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path


def asset_path(name: str) -> Path:
    return Path(str(resources.files(__package__).joinpath(name)))


@functools.cache
def class_presets() -> dict[str, tuple[str, ...]]:
    data = json.loads(asset_path("class_names.json").read_text(encoding="utf-8"))
    return {name: tuple(words) for name, words in data.items()}


@functools.cache
def template_sets() -> dict[str, tuple[str, ...]]:
    data = json.loads(asset_path("templates.json").read_text(encoding="utf-8"))
    return {name: tuple(t) for name, t in data.items() if not name.startswith("_")}


@functools.cache
def csp_suffixes() -> tuple[str, ...]:
    return tuple(json.loads(asset_path("csp_suffixes.json").read_text(encoding="utf-8")))


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """ImageNet-1K's 1,000 WordNet ids (``n01440764``, ...) in sorted order: position = the class
    index of ImageNet-1K (ImageFolder's sorted class folders, OpenOOD's image-list labels) and of
    the ``imagenet`` class-name preset (``tench`` is ``n01440764``, index 0)."""
    lines = asset_path("imagenet_wnids.txt").read_text(encoding="utf-8").split()
    return tuple(lines)


def model_config_dir() -> Path:
    return asset_path("model_configs")


def negative_presets() -> dict[str, Path]:
    """Bundled negative-label lists by name (file stem under ``assets/negatives``)."""
    folder = asset_path("negatives")
    return {path.stem: path for path in sorted(folder.glob("*.txt"))}
