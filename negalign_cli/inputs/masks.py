"""Where an image's ground-truth object mask lives (the toy world writes one per image).

One function, so that a new layout only changes this file: a split folder's ``metadata.csv`` with
``path`` and ``mask`` columns (both relative to that folder) says it, else the mask has the image's
path with its ``images`` folder replaced by ``masks``. Real datasets have no masks: ``None``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd

METADATA = "metadata.csv"
IMAGES_FOLDER, MASKS_FOLDER = "images", "masks"


@functools.lru_cache(maxsize=32)
def _mask_column(folder: Path) -> dict[str, str]:
    """path → mask of one split folder's metadata.csv (empty when it has no mask column)."""
    try:
        frame = pd.read_csv(folder / METADATA, usecols=lambda c: c in ("path", "mask"), dtype=str)
    except (OSError, ValueError):
        return {}
    if not {"path", "mask"} <= set(frame.columns):
        return {}
    frame = frame.dropna()
    return dict(zip(frame["path"], frame["mask"], strict=True))


def find_mask(image: str | Path) -> Path | None:
    """The mask file of ``image``, or None where there is none."""
    image = Path(image).absolute()
    for folder in list(image.parents)[:4]:
        if (folder / METADATA).is_file():
            relative = image.relative_to(folder).as_posix()
            mask = _mask_column(folder).get(relative)
            if mask is not None:
                path = folder / mask
                return path if path.is_file() else None
    parts = list(image.parts)
    if IMAGES_FOLDER in parts:
        index = len(parts) - 1 - parts[::-1].index(IMAGES_FOLDER)
        parts[index] = MASKS_FOLDER
        path = Path(*parts)
        if path.is_file() and path != image:
            return path
    return None
