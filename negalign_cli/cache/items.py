"""Per-item vector store: text and image embeddings cached one row per word or image.

A *namespace* fixes everything a vector depends on except the item itself (kind, model
fingerprint, precision, templates or preprocessing, stage parameters); an item is a word or an
image content digest. Vectors live in one diskcache ``Cache`` with eviction disabled, keyed
``"<namespace>:<item digest>"`` and tagged with the namespace, so that a whole model's entries can
be evicted at once. Namespace descriptions are stored under ``"ns:<namespace>"``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache
import numpy as np
from filelock import FileLock

from negalign_cli.hashing import canonical_json, sha256_text

NAMESPACE_PREFIX = "ns:"
# Vectors are small (a few KiB); keep every one inside SQLite rather than as side files.
_INLINE_LIMIT = 1 << 20
_SIZE_LIMIT = 1 << 62


def item_digest(item: str) -> str:
    """Key of one item inside a namespace (words are hashed, so any text is a safe key)."""
    return sha256_text(item)[:40]


@dataclass(frozen=True)
class NamespaceInfo:
    id: str
    kind: str
    model: str
    params: dict[str, Any]
    dim: int
    dtype: str
    created: float


class ItemStore:
    """One diskcache ``Cache`` (eviction off) under ``<cache root>/items``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.path = self.root / "items"
        self._cache: diskcache.Cache | None = None

    @property
    def cache(self) -> diskcache.Cache:
        if self._cache is None:
            self.root.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.root / "items-open.lock")):
                self._cache = diskcache.Cache(
                    str(self.path),
                    eviction_policy="none",
                    size_limit=_SIZE_LIMIT,
                    cull_limit=0,
                    disk_min_file_size=_INLINE_LIMIT,
                    tag_index=True,
                    statistics=False,
                )
        return self._cache

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def namespace(
        self, kind: str, model: str, params: Mapping[str, Any], dim: int, dtype: str = "float32"
    ) -> Namespace:
        description = {"kind": kind, "model": model, "params": dict(params), "dim": int(dim), "dtype": dtype}
        ns_id = sha256_text(canonical_json(description))[:24]
        return Namespace(self, NamespaceInfo(ns_id, kind, model, dict(params), int(dim), dtype, time.time()))

    # -------------------------------------------------------------- browse/gc
    def namespaces(self) -> list[NamespaceInfo]:
        found = []
        for key in self.cache.iterkeys():
            if isinstance(key, str) and key.startswith(NAMESPACE_PREFIX):
                found.append(NamespaceInfo(**self.cache[key]))
        return found

    def count(self) -> int:
        return len(self.cache) - len(self.namespaces())

    def evict_model(self, model_prefix: str, dry_run: bool = False) -> int:
        """Remove every entry of every namespace whose model fingerprint starts with the prefix."""
        removed = 0
        for info in self.namespaces():
            if not info.model.startswith(model_prefix):
                continue
            if dry_run:
                removed += self._count_tag(info.id)
            else:
                removed += self.cache.evict(info.id)
                self.cache.delete(NAMESPACE_PREFIX + info.id)
        return removed

    def _count_tag(self, tag: str) -> int:
        with self._read_connection() as con:
            return con.execute("SELECT COUNT(*) FROM Cache WHERE tag = ?", (tag,)).fetchone()[0]

    def evict_older_than(self, seconds: float, dry_run: bool = False) -> int:
        """Remove entries stored more than ``seconds`` ago (namespace descriptions are kept)."""
        cutoff = time.time() - seconds
        # diskcache keeps the store time of each row in its SQLite table; its public API does not
        # expose a query by it, so read the keys directly (read-only) and delete through the API.
        with self._read_connection() as con:
            keys = [
                row[0]
                for row in con.execute("SELECT key FROM Cache WHERE store_time < ?", (cutoff,))
                if isinstance(row[0], str) and not row[0].startswith(NAMESPACE_PREFIX)
            ]
        if not dry_run:
            with self.cache.transact():
                for key in keys:
                    self.cache.delete(key)
        return len(keys)

    def _read_connection(self) -> sqlite3.Connection:
        self.cache  # noqa: B018 - make sure the database exists
        return sqlite3.connect(f"file:{self.path / 'cache.db'}?mode=ro", uri=True)


class Namespace:
    """Vectors of one kind from one model configuration."""

    def __init__(self, store: ItemStore, info: NamespaceInfo) -> None:
        self.store = store
        self.info = info
        self._dtype = np.dtype(info.dtype)

    @property
    def id(self) -> str:
        return self.info.id

    def _keys(self, items: Sequence[str]) -> list[str]:
        return [f"{self.info.id}:{item_digest(item)}" for item in items]

    def get_many(self, items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Return (vectors ``(n, dim)``, found mask ``(n,)``); rows not found are zero."""
        vectors = np.zeros((len(items), self.info.dim), dtype=self._dtype)
        found = np.zeros(len(items), dtype=bool)
        cache = self.store.cache
        for row, key in enumerate(self._keys(items)):
            raw = cache.get(key)
            if raw is not None:
                vectors[row] = np.frombuffer(raw, dtype=self._dtype)
                found[row] = True
        return vectors, found

    def put_many(self, items: Sequence[str], vectors: np.ndarray) -> None:
        """Store one vector per item, all in one transaction."""
        vectors = np.ascontiguousarray(vectors, dtype=self._dtype)
        if vectors.shape != (len(items), self.info.dim):
            raise ValueError(f"expected vectors of shape {(len(items), self.info.dim)}, got {vectors.shape}")
        cache = self.store.cache
        tag = self.info.id
        with cache.transact():
            ns_key = NAMESPACE_PREFIX + tag
            if ns_key not in cache:
                cache.set(ns_key, self.info.__dict__)
            for key, vector in zip(self._keys(items), vectors, strict=True):
                cache.set(key, vector.tobytes(), tag=tag)
