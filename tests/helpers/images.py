"""Small image files of every awkward kind, for dataset and stage tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def rgb(seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size + 7, 3), dtype=np.uint8))


def make_image_folder(root: Path, per_class: int = 3) -> Path:
    for c, name in enumerate(("birds", "boats")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = rgb(10 * c + i)
            image.save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def make_awkward_images(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    files["corrupt"] = root / "corrupt.jpg"
    files["corrupt"].write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(200)))
    files["empty"] = root / "empty.png"
    files["empty"].write_bytes(b"")
    rgba = np.dstack([np.asarray(rgb(1)), np.full((40, 47), 128, np.uint8)])
    files["alpha"] = root / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(files["alpha"])
    files["sixteen"] = root / "sixteen.png"
    Image.fromarray((np.arange(40 * 47).reshape(40, 47) * 30).astype(np.uint16)).save(files["sixteen"])
    files["gray"] = root / "gray.png"
    rgb(2).convert("L").save(files["gray"])
    files["tiny"] = root / "tiny.png"
    rgb(3, size=10).save(files["tiny"])
    return files
