"""``results.json`` as standard JSON (RFC 8259), which has no NaN nor infinity.

Python's ``json`` writes them as ``NaN``/``Infinity``, which browsers' ``JSON.parse``, ``jq`` and
most other readers refuse. :func:`dumps_results` writes each non-finite number as ``null`` and lists
it, with its path and value, in a ``nonfinite`` block (a statistic of a score column holding an
infinite value, say); :func:`loads_results` puts the values back, so that the project's readers
see the numbers ``evaluate`` computed. Imports no numpy (an ``evaluate`` hit reads results.json).
"""

from __future__ import annotations

import json
import math
from typing import Any

NONFINITE = "nonfinite"
NOTE = (
    "standard JSON has no NaN or infinity: each value listed here is null in this file; its path is "
    "the keys (and list indices) from the top of the file"
)


def _spelled(value: float) -> str:
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _replaced(value: Any, path: list[str | int], found: list[dict[str, Any]]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        found.append({"path": path, "value": _spelled(value)})
        return None
    if isinstance(value, dict):
        return {key: _replaced(item, [*path, key], found) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replaced(item, [*path, index], found) for index, item in enumerate(value)]
    return value


def dumps_results(results: dict[str, Any]) -> str:
    """``results`` as standard JSON text: non-finite numbers become null, listed under ``nonfinite``."""
    found: list[dict[str, Any]] = []
    clean = _replaced(results, [], found)
    if found:
        clean[NONFINITE] = {"note": NOTE, "values": found}
    return json.dumps(clean, indent=2, sort_keys=False, allow_nan=False)


def loads_results(text: str) -> Any:
    """A results.json's content with the values its ``nonfinite`` block lists put back (and the
    block removed); JSON without that block is returned as it reads. A listed value whose place
    is no longer in the file (a results.json cut down by hand, ``jq '{calibration, nonfinite}'``)
    is passed over; a block that is not a list of paths and values raises ValueError."""
    results = json.loads(text)
    block = results.pop(NONFINITE, None) if isinstance(results, dict) else None
    values = block.get("values", []) if isinstance(block, dict) else block
    if values is not None and not isinstance(values, list):
        raise ValueError(f"its {NONFINITE!r} block is not a list of paths and values")
    for entry in values or []:
        try:
            *parents, last = entry["path"]
            value = float(entry["value"])  # "NaN", "Infinity", "-Infinity"
        except (KeyError, TypeError, ValueError):
            shown = str(entry)[:60]
            raise ValueError(f"its {NONFINITE!r} block holds {shown}, not a path and a value") from None
        target = results
        try:
            for key in parents:
                target = target[key]
            if target[last] is None:  # still the null written in its place
                target[last] = value
        except (KeyError, IndexError, TypeError):
            continue  # that place is not in this file any more
    return results
