"""Model names, checked without torch: what ``--model`` may be, OpenAI's spellings, close names.

The CLI checks ``--model`` while it parses its options, before it lists or hashes an image and
before torch is imported (seconds): the names come from the JSON configs open_clip ships (the
same files ``open_clip.list_models()`` reads) and the project's own configs. The loader
(``models.py``) and the Python API (``api.py``) use the same names and the same mapping.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from negalign_cli.defaults import DEFAULT_PRETRAINED
from negalign_cli.errors import NegalignError

# OpenAI's model names (``clip.load``) and the open_clip architecture each one is.
OPENAI_ARCHS = {
    "RN50": "RN50",
    "RN101": "RN101",
    "RN50x4": "RN50x4",
    "RN50x16": "RN50x16",
    "RN50x64": "RN50x64",
    "ViT-B/32": "ViT-B-32",
    "ViT-B/16": "ViT-B-16",
    "ViT-L/14": "ViT-L-14",
    "ViT-L/14@336px": "ViT-L-14-336",
}
LOCAL_DIR = "local-dir:"  # open_clip's schema for a folder holding a model's config and weights
_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")  # what open_clip asks of a model config


def _config_names(folder: Path) -> tuple[str, ...]:
    """The stems of the model configs in ``folder``, as open_clip registers them."""
    names = []
    for path in sorted(folder.glob("*.json")):
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and all(key in config for key in _CONFIG_KEYS):
            names.append(path.stem)
    return tuple(names)


@functools.cache
def project_model_names() -> tuple[str, ...]:
    """The project's own architectures (``negalign-toy``, ``negalign-tiny-test``)."""
    from negalign_cli.assets import model_config_dir

    return _config_names(model_config_dir())


@functools.cache
def open_clip_model_names() -> tuple[str, ...]:
    """open_clip's architectures, read from the package's ``model_configs`` folder without
    importing it (importing open_clip imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return ()
    return tuple(
        name
        for location in spec.submodule_search_locations
        for name in _config_names(Path(location) / "model_configs")
    )


def known_model_names() -> tuple[str, ...]:
    """Every name ``--model`` takes: the project's models, open_clip's, then OpenAI's spellings."""
    project = project_model_names()
    return (*project, *(n for n in open_clip_model_names() if n not in project), *OPENAI_ARCHS)


def resolve_model_name(name: str, pretrained: str | None = None) -> tuple[str, str | None]:
    """``(open_clip architecture, weights)``: OpenAI's spelling (``ViT-B/16``) is open_clip's
    ``ViT-B-16`` with OpenAI's weights unless ``pretrained`` says otherwise; any other name is
    returned as it is."""
    if name in OPENAI_ARCHS:
        return OPENAI_ARCHS[name], pretrained or DEFAULT_PRETRAINED
    return name, pretrained


def closest_model_names(name: str, n: int = 3) -> list[str]:
    """The known names nearest to ``name`` (difflib, ignoring case)."""
    by_lower: dict[str, str] = {}
    for known in known_model_names():
        by_lower.setdefault(known.lower(), known)
    return [by_lower[m] for m in difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=0.6)]


def check_model_name(name: str) -> str:
    """``name`` if it is a model negalign can build (``local-dir:`` folders are checked when the
    model is loaded); otherwise a :class:`NegalignError` naming the closest known names."""
    if name.startswith(LOCAL_DIR) or name in OPENAI_ARCHS:
        return name
    if name in project_model_names() or name in open_clip_model_names():
        return name
    close = closest_model_names(name)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise NegalignError(f"unknown model architecture {name!r}: {hint}`negalign models` lists the known ones")


# --------------------------------------------------------------------------- `negalign models`
def _natural_key(name: str) -> list[int | str]:
    """open_clip's order of architectures (``open_clip.factory._natural_key``): numbers by value."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def open_clip_architectures() -> list[str]:
    """``open_clip.list_models()`` once the project's configs are registered (its architectures and
    the project's, in open_clip's natural order), without importing open_clip."""
    return sorted({*open_clip_model_names(), *project_model_names()}, key=_natural_key)


# What open_clip's pretrained.py may import when it is read without open_clip (anything else: the
# file has changed, and open_clip itself is imported instead).
_PRETRAINED_IMPORTS = {"copy", "hashlib", "os", "urllib", "warnings", "functools", "typing", "tqdm", "json"}


@functools.cache
def open_clip_pretrained_tags() -> dict[str, tuple[str, ...]]:
    """open_clip's weight tags by architecture, as ``open_clip.list_pretrained()`` lists them, read
    without importing open_clip (which imports torch: seconds). Its ``pretrained.py`` runs in a
    namespace of its own, its siblings ``constants`` and ``version`` read from their files and
    safetensors' torch support reported absent; if the file wants anything else (a newer open_clip),
    open_clip is imported and asked."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(next(iter(spec.submodule_search_locations)))
    try:
        table = _read_pretrained_table(folder)
    except Exception:  # the file changed beyond what it can be read without open_clip
        import open_clip

        listed: dict[str, list[str]] = {}
        for arch, tag in open_clip.list_pretrained():
            listed.setdefault(arch, []).append(tag)
        return {arch: tuple(tags) for arch, tags in listed.items()}
    return {arch: tuple(tags) for arch, tags in table.items()}


class _Refused(ImportError):
    pass


def _read_pretrained_table(folder: Path) -> dict[str, dict[str, object]]:
    import builtins
    import types

    real_import = builtins.__import__

    def run(name: str, namespace: dict[str, object]) -> dict[str, object]:
        path = folder / f"{name}.py"
        exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), namespace)
        return namespace

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):  # noqa: A002
        if level == 1 and name in ("constants", "version"):  # from .constants import ...
            return types.SimpleNamespace(**run(name, fresh(f"open_clip.{name}")))
        if level == 0 and name == "safetensors.torch":  # optional in the file: "not installed"
            raise ImportError(name)
        if level != 0 or name.split(".")[0] not in _PRETRAINED_IMPORTS:
            raise _Refused(name)
        return real_import(name, globals, locals, fromlist, level)

    def fresh(module: str) -> dict[str, object]:
        return {"__name__": module, "__builtins__": {**vars(builtins), "__import__": guarded_import}}

    table = run("pretrained", fresh("open_clip.pretrained"))["_PRETRAINED"]
    if not isinstance(table, dict):
        raise TypeError("open_clip's _PRETRAINED is not a dict")
    return table


@dataclass(frozen=True)
class Architecture:
    """A row of `negalign models`."""

    name: str
    source: str  # "negalign" or "open_clip"
    needs_weights: bool
    tags: tuple[str, ...]
    description: str = ""


def list_architectures(project: Mapping[str, Any]) -> list[Architecture]:
    """The project's models first (``project``: name → ``models.ProjectModel``), then every open_clip
    architecture with its weight tags; what ``models.list_architectures()`` lists, without torch."""
    tags = open_clip_pretrained_tags()
    infos = [
        Architecture(m.name, "negalign", needs_weights=m.seed is None, tags=(), description=m.description)
        for m in project.values()
    ]
    for arch in open_clip_architectures():
        if arch not in project:
            infos.append(Architecture(arch, "open_clip", needs_weights=True, tags=tags.get(arch, ())))
    return infos
