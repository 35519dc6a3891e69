"""Content digests and canonical JSON, the basis of every cache key."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20
_PLAIN = {str, type(None)}


def canonical_json(obj: Any) -> str:
    """Serialise ``obj`` so that equal values always give the same text.

    Keys are sorted, separators fixed, tuples become lists; NaN/inf and objects JSON does not
    know are rejected, so that a key can never silently depend on ``repr``.
    """
    return json.dumps(
        _normalise(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def _normalise(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"cache-key mappings need string keys, got {key!r}")
            out[key] = _normalise(value)
        return out
    if isinstance(obj, (list, tuple)):
        if set(map(type, obj)) <= _PLAIN:  # long lists of paths and digests: no recursion
            return list(obj)
        return [_normalise(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"cache keys cannot hold non-finite floats ({obj})")
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _normalise(obj.item())
    raise TypeError(f"value of type {type(obj).__name__} cannot be part of a cache key: {obj!r}")


def sha256_text(text: str) -> str:
    # surrogateescape: file names that are not UTF-8 (os.fsdecode's lone surrogates) hash by their bytes
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def printable_path(path: str) -> str:
    """A file name as valid UTF-8 for tables and messages: bytes that are not UTF-8 show as U+FFFD."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def sha256_json(obj: Any) -> str:
    return sha256_text(canonical_json(obj))


def sha256_file(path: str | Path) -> str:
    return sha256_file_sized(path)[0]


def sha256_file_sized(path: str | Path) -> tuple[str, int]:
    """sha256 of a file's bytes, read in 1 MiB chunks, and how many bytes there were."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def sha256_lines(lines: Iterable[str]) -> str:
    """Digest of a list of strings (order matters; no string may contain a newline)."""
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
