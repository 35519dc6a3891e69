"""Per-item vector store: text and image embeddings cached one row per word or image.

A *namespace* fixes everything a vector depends on except the item itself (kind, model
fingerprint, precision, templates or preprocessing, stage parameters); an item is a word or an
image content digest. Vectors live in one diskcache ``Cache`` under ``<cache>/items`` with
eviction disabled, keyed ``"<namespace>:<item digest>"`` and tagged with the namespace, so that a
whole namespace can be evicted at once through diskcache's tag index.

Namespace records live apart, in a small ``diskcache.Index`` under ``<cache>/item-namespaces``:
the description, how many vectors it holds, when it was created and when it was last used. So
``cache ls`` reads a handful of records instead of scanning every key, and age-based pruning
needs no query against diskcache's private SQLite schema: ``--items-older-than`` drops the
namespaces (model + settings) that no run has used for that long.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import diskcache
import numpy as np
from filelock import FileLock

from negalign_cli.hashing import canonical_json, sha256_text

# Vectors are small (a few KiB); keep every one inside SQLite rather than as side files.
_INLINE_LIMIT = 1 << 20
_SIZE_LIMIT = 1 << 62
_TOUCH_EVERY = 60.0  # seconds between updates of a namespace's last-used time


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
    count: int = 0  # vectors stored
    last_used: float = 0.0  # time of the last put or lookup (seconds since the epoch)


class ItemStore:
    """The vectors (``<cache>/items``) and the namespace records (``<cache>/item-namespaces``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.path = self.root / "items"
        self.records_path = self.root / "item-namespaces"
        self._cache: diskcache.Cache | None = None
        self._records: diskcache.Index | None = None
        self._touched: dict[str, float] = {}

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

    @property
    def records(self) -> diskcache.Index:
        if self._records is None:
            self.root.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.root / "items-open.lock")):
                self._records = diskcache.Index(str(self.records_path))
        return self._records

    def close(self) -> None:
        for handle in (self._cache, self._records and self._records.cache):
            if handle is not None:
                handle.close()
        self._cache = self._records = None

    def namespace(
        self, kind: str, model: str, params: Mapping[str, Any], dim: int, dtype: str = "float32"
    ) -> Namespace:
        description = {"kind": kind, "model": model, "params": dict(params), "dim": int(dim), "dtype": dtype}
        ns_id = sha256_text(canonical_json(description))[:24]
        return Namespace(self, NamespaceInfo(ns_id, kind, model, dict(params), int(dim), dtype, time.time()))

    # -------------------------------------------------------------- records
    def record_use(self, info: NamespaceInfo, added: int = 0) -> None:
        """Create or update a namespace's record: count += added, last used = now."""
        now = time.time()
        with self.records.transact():
            stored = self.records.get(info.id)
            current = NamespaceInfo(**stored) if stored is not None else info
            self.records[info.id] = asdict(replace(current, count=current.count + added, last_used=now))
        self._touched[info.id] = now

    def touch(self, info: NamespaceInfo) -> None:
        """Mark a namespace as in use (at most once a minute per process: lookups stay cheap)."""
        if time.time() - self._touched.get(info.id, 0.0) >= _TOUCH_EVERY and info.id in self.records:
            self.record_use(info)

    # -------------------------------------------------------------- browse/gc
    def namespaces(self) -> list[NamespaceInfo]:
        return [NamespaceInfo(**record) for record in self.records.values()]

    def count(self) -> int:
        """Vectors stored, all namespaces together (diskcache keeps this number: no scan)."""
        return len(self.cache)

    def _evict(self, infos: list[NamespaceInfo], dry_run: bool) -> int:
        removed = 0
        for info in infos:
            if dry_run:
                removed += info.count
                continue
            removed += self.cache.evict(info.id)
            self.records.pop(info.id, None)
        return removed

    def evict_model(self, model_prefix: str, dry_run: bool = False) -> int:
        """Remove every vector of every namespace whose model fingerprint starts with the prefix."""
        return self._evict([i for i in self.namespaces() if i.model.startswith(model_prefix)], dry_run)

    def evict_older_than(self, seconds: float, dry_run: bool = False) -> int:
        """Remove the vectors of the namespaces no run has used for more than ``seconds``."""
        cutoff = time.time() - seconds
        return self._evict([i for i in self.namespaces() if i.last_used < cutoff], dry_run)


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
        self.store.touch(self.info)
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
        added = 0
        with cache.transact():
            for key, vector in zip(self._keys(items), vectors, strict=True):
                added += bool(cache.add(key, vector.tobytes(), tag=tag))
        self.store.record_use(self.info, added)
