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

import contextlib
import hashlib
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import diskcache
import numpy as np
from filelock import FileLock, Timeout

from negalign_cli.cache.store import damaged
from negalign_cli.errors import NegalignError
from negalign_cli.hashing import canonical_json, sha256_text

# Vectors are small (a few KiB); keep every one inside SQLite rather than as side files.
_INLINE_LIMIT = 1 << 20
# Each stored value is the vector's bytes followed by an 8-byte BLAKE2b checksum of them, verified
# on every read: bytes changed inside SQLite (which its own integrity check cannot see) are caught.
ITEM_FORMAT = 2
_CHECKSUM = 8
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
            self._cache = self._open(self.path, lambda: _vector_cache(self.path))
        return self._cache

    @property
    def records(self) -> diskcache.Index:
        if self._records is None:
            self._records = self._open(self.records_path, lambda: diskcache.Index(str(self.records_path)))
        return self._records

    def _open(self, path: Path, make: Callable[[], Any]) -> Any:
        if path.exists() and not path.is_dir():
            raise NegalignError(
                f"{path} is a file where a cache folder belongs: move it away, or run `negalign cache repair`"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / "items-open.lock")):
            try:
                return make()
            except sqlite3.DatabaseError as exc:
                raise damaged(path, exc) from exc

    def repair(self) -> ItemRepair:
        """Check both databases; move a damaged one aside, keep every vector (and namespace
        record) that can still be read, and say how many were lost."""
        held = self.leased()
        if held:
            raise NegalignError(
                f"a running command is using {len(held)} vector namespace(s) of this cache: repair it "
                "after that command ends"
            )
        self.close()
        report = ItemRepair()
        if not database_healthy(self.path, lambda: _vector_cache(self.path)):
            report.vectors_kept, report.vectors_lost = self._salvage_vectors()
        if not database_healthy(self.records_path, lambda: diskcache.Index(str(self.records_path))):
            report.records_kept, report.records_rebuilt = self._salvage_records()
        return report

    def _salvage_vectors(self) -> tuple[int, int | None]:
        aside = _move_aside(self.path)
        kept, lost = 0, 0
        try:
            old = _vector_cache(aside)
        except (sqlite3.DatabaseError, OSError):
            return 0, None  # nothing readable: every vector will be recomputed when needed
        new = self.cache
        try:
            keys = iter(old.iterkeys())
            while True:
                try:
                    key = next(keys)
                except StopIteration:
                    break
                except sqlite3.DatabaseError:
                    lost += 1
                    break
                try:
                    value, tag = old.get(key, tag=True)
                except sqlite3.DatabaseError:
                    lost += 1
                    continue
                if isinstance(key, str) and isinstance(value, bytes) and tag is not None:
                    new.set(key, value, tag=tag)
                    kept += 1
        finally:
            old.close()
        return kept, lost

    def _salvage_records(self) -> tuple[int, int]:
        aside = _move_aside(self.records_path)
        kept: dict[str, Any] = {}
        with contextlib.suppress(sqlite3.DatabaseError, OSError):
            old = diskcache.Index(str(aside))
            for ns_id in list(old.keys()):
                with contextlib.suppress(sqlite3.DatabaseError, TypeError):
                    kept[ns_id] = dict(old[ns_id])
            old.cache.close()
        for ns_id, record in kept.items():
            self.records[ns_id] = record
        # namespaces whose record was lost: rebuilt from the vectors' keys, so that `cache ls`
        # shows them and `cache gc` can remove them (what they were made with is unknown)
        counts: dict[str, int] = {}
        with contextlib.suppress(sqlite3.DatabaseError):
            for key in self.cache.iterkeys():
                if isinstance(key, str) and ":" in key:
                    counts[key.split(":", 1)[0]] = counts.get(key.split(":", 1)[0], 0) + 1
        rebuilt = 0
        now = time.time()
        for ns_id, count in counts.items():
            if ns_id not in kept:
                info = NamespaceInfo(ns_id, "unknown (record lost)", "", {}, 0, "", now, count, now)
                self.records[ns_id] = asdict(info)
                rebuilt += 1
        return len(kept), rebuilt

    def close(self) -> None:
        for handle in (self._cache, self._records.cache if self._records is not None else None):
            if handle is not None:
                handle.close()
        self._cache = self._records = None

    def namespace(
        self, kind: str, model: str, params: Mapping[str, Any], dim: int, dtype: str = "float32"
    ) -> Namespace:
        description = {
            "kind": kind,
            "model": model,
            "params": dict(params),
            "dim": int(dim),
            "dtype": dtype,
            "format": ITEM_FORMAT,
        }
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

    # -------------------------------------------------------------- leases
    @contextlib.contextmanager
    def lease(self, *namespaces: Namespace) -> Iterator[None]:
        """Hold the namespaces a run reads and writes: `cache gc` leaves them alone until the run
        ends (a lease is a JSON file plus a lock the run holds; a dead run's lock is free)."""
        folder = self.root / "leases"
        folder.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        lock = FileLock(str(folder / f"{name}.lock"))
        lock.acquire()
        record = folder / f"{name}.json"
        try:
            record.write_text(json.dumps({"pid": os.getpid(), "namespaces": [n.id for n in namespaces]}))
            yield
        finally:
            record.unlink(missing_ok=True)
            lock.release()
            (folder / f"{name}.lock").unlink(missing_ok=True)

    def leased(self) -> set[str]:
        """Namespaces held by a live run; leases of runs that died are removed."""
        folder = self.root / "leases"
        held: set[str] = set()
        for record in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            lock = FileLock(str(record.with_suffix(".lock")))
            try:
                lock.acquire(timeout=0)
            except (Timeout, RuntimeError):  # the run is alive (RuntimeError: in this very thread)
                with contextlib.suppress(OSError, ValueError):
                    held.update(json.loads(record.read_text()).get("namespaces", []))
                continue
            try:
                record.unlink(missing_ok=True)
            finally:
                lock.release()
                record.with_suffix(".lock").unlink(missing_ok=True)
        return held

    def _evict(self, infos: list[NamespaceInfo], dry_run: bool) -> int:
        removed = 0
        for info in infos:
            if info.id in self.leased():  # asked again for each: a run may have started meanwhile
                continue
            if dry_run:
                removed += info.count
                continue
            self.records.pop(info.id, None)  # the record first: no vector is ever left without one
            removed += self.cache.evict(info.id)
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
        self._size = info.dim * self._dtype.itemsize
        self.corrupt = 0  # stored vectors that failed their checksum (dropped; recomputed by the caller)

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
            if raw is None:
                continue
            if not _intact(raw, self._size):
                self.corrupt += 1
                cache.delete(key)  # a later put stores it again
                continue
            vectors[row] = np.frombuffer(raw, dtype=self._dtype, count=self.info.dim)
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
                data = vector.tobytes()
                added += bool(cache.add(key, data + _checksum(data), tag=tag))
        self.store.record_use(self.info, added)


def _checksum(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=_CHECKSUM).digest()


def _intact(raw: bytes, size: int) -> bool:
    """A stored value has the vector's length plus the checksum, and the checksum matches."""
    return len(raw) == size + _CHECKSUM and _checksum(raw[:size]) == raw[size:]


@dataclass
class ItemRepair:
    """What `cache repair` did to the per-item store (None: the count could not be read)."""

    vectors_kept: int | None = None  # None: the vector database was intact
    vectors_lost: int | None = 0
    records_kept: int | None = None  # None: the namespace records were intact
    records_rebuilt: int = 0


def _vector_cache(path: Path) -> diskcache.Cache:
    return diskcache.Cache(
        str(path),
        eviction_policy="none",
        size_limit=_SIZE_LIMIT,
        cull_limit=0,
        disk_min_file_size=_INLINE_LIMIT,
        tag_index=True,
        statistics=False,
    )


def database_healthy(path: Path, make: Callable[[], Any]) -> bool:
    """The database opens and SQLite's integrity check finds nothing."""
    if not path.exists():
        return True
    if not path.is_dir():
        return False
    try:
        handle = make()
    except sqlite3.DatabaseError:
        return False
    cache = handle.cache if isinstance(handle, diskcache.Index) else handle
    try:
        return not cache.check()
    except sqlite3.DatabaseError:
        return False
    finally:
        cache.close()


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
    if path.exists():
        path.rename(aside)
    return aside
