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
from pathlib import Path

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
