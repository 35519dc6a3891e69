"""CAM settings and the packed CAM row layout, without torch: :class:`CamConfig` (its method and
pool names checked against the registries' names), the per-image row width and its unpacking.
Planning a ``cam`` run (its options, its cache key) and reading its rows need only this module;
the CAM maths (Grad-CAM, background pooling, packing a batch) is ``compute/vision.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar, overload

import numpy as np

from negalign_cli.defaults import BG_POOLS, CAM_METHODS
from negalign_cli.errors import NegalignError

T = TypeVar("T")


@overload
def registered(registry: Mapping[str, T], name: str, option: str) -> T: ...
@overload
def registered(registry: tuple[str, ...], name: str, option: str) -> str: ...
def registered(registry: Mapping[str, T] | tuple[str, ...], name: str, option: str) -> T | str:
    """``registry[name]`` (``name`` itself for a tuple of names); an unknown name is refused (never
    a silent fallback to another entry)."""
    if not isinstance(name, str) or name not in registry:
        raise NegalignError(f"unknown {option} {name!r}: use {', '.join(registry)}")
    return name if isinstance(registry, tuple) else registry[name]


@dataclass(frozen=True)
class CamConfig:
    """Grad-CAM and background-pooling settings. The method and pool names are checked against
    the registries' names (``defaults.CAM_METHODS`` and ``BG_POOLS``, which ``compute/vision.py``
    checks are those of ``CAM_METHOD_REGISTRY`` and ``BG_POOL_REGISTRY``) when the config is made;
    the ranges that need the model (the block) by :meth:`validate`."""

    method: str = "gradcam"
    block: int = -1
    fg_percentile: float = 80.0
    dilate: int = 1
    bg_pool: str = "tokens"

    def __post_init__(self) -> None:
        registered(CAM_METHODS, self.method, "--cam-method")
        registered(BG_POOLS, self.bg_pool, "--bg-pool")

    def validate(self, n_blocks: int) -> None:
        self.__post_init__()
        if not -n_blocks <= self.block < n_blocks:
            raise NegalignError(f"--block {self.block} is out of range for a tower of {n_blocks} blocks")
        if not 0 <= self.fg_percentile <= 100:
            raise NegalignError(f"--fg-percentile must be in [0, 100], got {self.fg_percentile}")
        if self.dilate < 0:
            raise NegalignError(f"--dilate must be ≥ 0, got {self.dilate}")


CAM_META = ("pred_class", "pred_score", "cam_valid", "fg_fraction")


def cam_row_width(embed_dim: int, cells: int) -> int:
    """Length of one packed CAM row: background | CAM | foreground | the four CAM_META values."""
    return embed_dim + 2 * cells + len(CAM_META)


@dataclass
class CamRows:
    """Packed CAM rows, unpacked (numpy): what the ``cam`` stage writes out."""

    background: np.ndarray  # (N, D) float32
    cams: np.ndarray  # (N, h, w) float32
    foreground: np.ndarray  # (N, h, w) bool, after dilation
    pred_class: np.ndarray  # (N,) int64
    pred_score: np.ndarray  # (N,) float32
    valid: np.ndarray  # (N,) bool
    fg_fraction: np.ndarray  # (N,) float32


def unpack_cam_rows(rows: np.ndarray, embed_dim: int, grid: tuple[int, int]) -> CamRows:
    """The inverse of :func:`pack_cam_rows` for rows of ``cam_row_width(embed_dim, h·w)`` values."""
    h, w = grid
    cells = h * w
    if rows.ndim != 2 or rows.shape[1] != cam_row_width(embed_dim, cells):
        raise ValueError(
            f"packed CAM rows must have {cam_row_width(embed_dim, cells)} columns, got {rows.shape}"
        )
    d = embed_dim
    meta = rows[:, d + 2 * cells :]
    return CamRows(
        background=rows[:, :d].astype(np.float32, copy=False),
        cams=rows[:, d : d + cells].reshape(-1, h, w).astype(np.float32, copy=False),
        foreground=rows[:, d + cells : d + 2 * cells].reshape(-1, h, w) > 0.5,
        pred_class=meta[:, 0].astype(np.int64),
        pred_score=meta[:, 1].astype(np.float32),
        valid=meta[:, 2] > 0.5,
        fg_fraction=meta[:, 3].astype(np.float32),
    )
