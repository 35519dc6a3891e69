"""Exact quantiles: numpy's default ("linear") rule, computed on order statistics in float64. Pure.

``torch.quantile`` works in the input's dtype: for float32 input, q = 0.8 becomes
0.800000011920929, so on grids where 0.8·(n−1) is an integer (4×4, 14×14, 16×16) the threshold
lands one float step above the k-th value and a ``>=`` test drops that element. Here the position
p·(n−1)/100 is formed from the percentile in float64 (exact whenever it is an integer), the
neighbouring order statistics are read in float64, and they are interpolated the way numpy's
``_lerp`` does. Where the position is an integer the result is that order statistic exactly, as
``np.percentile(values.astype(float64), p)`` gives; elsewhere the two may differ by an ulp, since
numpy forms the position as (n−1)·(p/100).
"""

from __future__ import annotations

import math

import torch


def _at_position(values: torch.Tensor, position: float, dim: int, keepdim: bool) -> torch.Tensor:
    """Linear interpolation between the order statistics at floor(position) and the next one."""
    return _interpolate(torch.sort(values, dim=dim).values, position, dim, keepdim)


def _interpolate(ordered: torch.Tensor, position: float, dim: int, keepdim: bool) -> torch.Tensor:
    """Linear interpolation in float64 between two order statistics of ``ordered`` (sorted along
    ``dim``, in any floating dtype: sorting is exact in every precision and widening to float64
    is exact, so only the two neighbours are widened)."""
    n = ordered.shape[dim]
    low = min(int(math.floor(position)), n - 1)
    high = min(low + 1, n - 1)
    gamma = position - low
    a = ordered.narrow(dim, low, 1).to(torch.float64)
    b = ordered.narrow(dim, high, 1).to(torch.float64)
    diff = b - a
    # numpy's _lerp: a + (b − a)·t, or b − (b − a)·(1 − t) for t ≥ 0.5 (exact at both ends)
    result = a + diff * gamma if gamma < 0.5 else b - diff * (1.0 - gamma)
    return result if keepdim else result.squeeze(dim)


def percentile(values: torch.Tensor, percent: float, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """The ``percent``-th percentile along ``dim`` (linear interpolation between order statistics),
    in float64. ``percent`` is in [0, 100]; the position percent·(n−1)/100 is exact when integral."""
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percent}")
    n = _length(values, dim)
    return _at_position(values, float(percent) * (n - 1) / 100.0, dim, keepdim)


def percentile_of_sorted(
    ordered: torch.Tensor, percent: float, dim: int = -1, keepdim: bool = False
) -> torch.Tensor:
    """:func:`percentile` of values already sorted along ``dim`` (ascending, any floating dtype):
    the same float64 result, for callers that need the order statistics themselves too."""
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percent}")
    n = _length(ordered, dim)
    return _interpolate(ordered, float(percent) * (n - 1) / 100.0, dim, keepdim)


def quantile(values: torch.Tensor, q: float, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """The ``q``-quantile (q in [0, 1]) along ``dim``: position q·(n−1), as numpy computes it."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    return _at_position(values, float(q) * (_length(values, dim) - 1), dim, keepdim)


def _length(values: torch.Tensor, dim: int) -> int:
    n = values.shape[dim]
    if n == 0:
        raise ValueError("quantile of an empty dimension")
    return n
