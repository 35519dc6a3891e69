"""Per-item vector store: text and image embeddings cached one row per word or image.

A *namespace* fixes everything a vector depends on except the item itself (kind, model
fingerprint, precision, templates or preprocessing, stage parameters); an item is a word or an
image content digest.

Vectors live in append-only record files, memory-mapped on read, with a small SQLite index that
maps (namespace, item digest) to (shard, row)::

    vectors/index.db                  SQLite (WAL): item(ns, digest, shard, row), shard, ns
    vectors/<namespace>/meta.json     the namespace's row width and dtype
    vectors/<namespace>/<shard>.rec   records: item digest (20 B) | vector | BLAKE2b-8 of both

A record carries its own key and checksum, so the file is self-describing: a bit flipped in a
vector is caught on read (the vector is dropped and recomputed), and a lost or damaged index is
rebuilt from the record files alone (`negalign cache repair`); a missing index beside shard files
that hold vectors is refused with that hint, never recreated empty (it would orphan them). A shard
is (namespace, file number): the index numbers shards itself and records each one's file, and a
new file never takes a number an existing file has. Each process appends to a shard of
its own (never shared between writers), writes a batch, fsyncs it, and only then indexes it: a
killed run leaves at worst unindexed bytes at a shard's end, never an index entry pointing at
bytes that were not written. Writers roll over to a new shard at 1 GiB. On disk a vector costs its
raw bytes plus 28 bytes in its record and about 40 in the index.

Namespace records live apart, in a small ``diskcache.Index`` under ``<cache>/item-namespaces``:
the description, how many vectors it holds, when it was created and when it was last used. So
``cache ls`` reads a handful of records instead of scanning every key, and age-based pruning
drops whole namespaces (model + settings) that no run has used for that long.

Format 3 (this layout) replaced format 2 (one diskcache row per vector in ``<cache>/items``, 2.8×
the raw bytes). Format-2 vectors are not read: the next run recomputes what it needs once, and
``negalign cache gc`` removes the old ``items/`` folder and its namespace records.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import diskcache
from filelock import FileLock, Timeout

from negalign_cli.cache.diskfull import disk_full, is_disk_full, writing
from negalign_cli.cache.store import damaged
from negalign_cli.errors import NegalignError
from negalign_cli.hashing import canonical_json, sha256_text
from negalign_cli.lazy import lazy_module

if TYPE_CHECKING:
    import numpy as np
else:  # loaded by the first vector read or written: opening a Workspace (a cache hit) needs none
    np = lazy_module("numpy")

ITEM_FORMAT = 3
LEGACY_FORMAT = 2  # diskcache rows in <cache>/items: no longer read, removed by `cache gc`
_KEY = 20  # bytes of an item digest in a record
_CHECKSUM = 8  # bytes of the BLAKE2b checksum that ends a record (over the key and the vector)
_SHARD_BYTES = 1 << 30  # a writer starts a new shard file past this size
_LOOKUP = 900 if sqlite3.sqlite_version_info < (3, 32, 0) else 8000  # item digests per query
_TOUCH_EVERY = 60.0  # seconds between updates of a namespace's last-used time
_BUSY_MS = 120_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ns (num INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS shard (
    num INTEGER PRIMARY KEY AUTOINCREMENT, ns INTEGER NOT NULL, file INTEGER
);
CREATE TABLE IF NOT EXISTS item (
    ns INTEGER NOT NULL, digest BLOB NOT NULL, shard INTEGER NOT NULL, row INTEGER NOT NULL,
    PRIMARY KEY (ns, digest)
) WITHOUT ROWID;
"""


def item_digest(item: str) -> str:
    """Key of one item inside a namespace (words are hashed, so any text is a safe key)."""
    return sha256_text(item)[:40]


def _key(item: str) -> bytes:
    return bytes.fromhex(item_digest(item))


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
    format: int = LEGACY_FORMAT  # records written before format 3 lack the field


def _open_index(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), timeout=_BUSY_MS / 1000, isolation_level=None, check_same_thread=False)
    try:
        db.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a power cut may lose the last index transactions, never corrupt the index; the
        # vectors they pointed at are then recomputed (or found again by `cache repair`)
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(shard)")}
        if "file" not in columns:  # an index written before shard files were numbered apart
            with contextlib.suppress(sqlite3.OperationalError):  # another process added it first
                db.execute("ALTER TABLE shard ADD COLUMN file INTEGER")
    except BaseException:
        db.close()
        raise
    return db


def shard_files(path: Path) -> list[Path]:
    """The shard files under a vector store folder that hold at least one byte."""
    found = []
    for file in sorted(path.glob("*/*.rec")) if path.is_dir() else []:
        with contextlib.suppress(OSError):
            if file.stat().st_size > 0:
                found.append(file)
    return found


def _create_shard_file(folder: Path, number: int) -> tuple[int, int]:
    """Create ``<folder>/<number>.rec`` exclusively, or the next number past every shard file the
    folder holds (a file left by an older index, another writer's); (number, descriptor)."""
    while True:
        path = folder / f"{number:08d}.rec"
        try:
            return number, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            taken = [int(p.stem) for p in folder.glob("*.rec") if p.stem.isdigit()]
            number = max([number, *taken]) + 1


@dataclass
class _Writer:
    """This process's open shard for one namespace: rows are appended at ``rows * width``."""

    shard: int
    path: Path
    fd: int
    rows: int = 0


@dataclass
class _Mapped:
    array: np.ndarray  # (rows, record width) uint8, memory-mapped
    rows: int


class ItemStore:
    """The vectors (``<cache>/vectors``) and the namespace records (``<cache>/item-namespaces``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.path = self.root / "vectors"
        self.index_path = self.path / "index.db"
        self.records_path = self.root / "item-namespaces"
        self.legacy_path = self.root / "items"  # format 2
        self._db: sqlite3.Connection | None = None
        self._records: diskcache.Index | None = None
        self._touched: dict[str, float] = {}
        self._ns_nums: dict[str, int] = {}
        self._writers: dict[str, _Writer] = {}
        self._maps: dict[int, _Mapped] = {}
        self._shard_paths: dict[int, Path] = {}

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = self._open(self.path, self._open_existing_index)
        return self._db

    def _open_existing_index(self) -> sqlite3.Connection:
        """The index; never a new empty one beside shard files that hold vectors (it would orphan
        them all, and number new shards over theirs): that is refused, `cache repair` rebuilds it."""
        if not self.index_path.exists():
            held = shard_files(self.path)
            if held:
                raise NegalignError(
                    f"the vector index {self.index_path} is missing but {len(held)} shard file(s) under "
                    f"{self.path} hold vectors: run `negalign cache repair` to rebuild it from them"
                )
        with writing(self.index_path):
            return _open_index(self.index_path)

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
        with writing(self.root / "items-open.lock"):
            lock = FileLock(str(self.root / "items-open.lock"))
            lock.acquire()
        try:
            with writing(path):
                return make()
        except sqlite3.DatabaseError as exc:
            raise damaged(path, exc) from exc
        finally:
            lock.release()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self.db
        with writing(self.index_path):
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
                    db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        for writer in self._writers.values():
            with contextlib.suppress(OSError):
                os.close(writer.fd)
        self._writers.clear()
        self._maps.clear()
        self._ns_nums.clear()
        self._shard_paths.clear()
        if self._db is not None:
            self._db.close()
        if self._records is not None:
            self._records.cache.close()
        self._db = self._records = None

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
        info = NamespaceInfo(
            ns_id, kind, model, dict(params), int(dim), dtype, time.time(), format=ITEM_FORMAT
        )
        return Namespace(self, info)

    # -------------------------------------------------------------- index
    def _ns_num(self, ns_id: str, create: bool) -> int | None:
        num = self._ns_nums.get(ns_id)
        if num is None:
            row = self.db.execute("SELECT num FROM ns WHERE id = ?", (ns_id,)).fetchone()
            if row is None and create:
                with self._transaction() as db:
                    db.execute("INSERT OR IGNORE INTO ns (id) VALUES (?)", (ns_id,))
                    row = db.execute("SELECT num FROM ns WHERE id = ?", (ns_id,)).fetchone()
            if row is None:
                return None
            num = self._ns_nums[ns_id] = int(row[0])
        return num

    def _locate(self, ns_num: int, keys: Mapping[bytes, int]) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of each key (``keys`` maps a digest to its position; -1 where the index
        has none), one query per chunk of keys."""
        shards = np.full(len(keys), -1, dtype=np.int64)
        rows = np.full(len(keys), -1, dtype=np.int64)
        listed = list(keys)
        for start in range(0, len(listed), _LOOKUP):
            chunk = listed[start : start + _LOOKUP]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT digest, shard, row FROM item WHERE ns = ? AND digest IN ({marks})"
            found = self.db.execute(query, (ns_num, *chunk)).fetchall()
            if found:
                at = [keys[digest] for digest, _, _ in found]
                shards[at] = [shard for _, shard, _ in found]
                rows[at] = [row for _, _, row in found]
        return shards, rows

    def _forget(self, ns_num: int, keys: Sequence[bytes]) -> None:
        with self._transaction() as db:
            db.executemany("DELETE FROM item WHERE ns = ? AND digest = ?", [(ns_num, k) for k in keys])

    # -------------------------------------------------------------- shards
    def _folder(self, ns_id: str) -> Path:
        return self.path / ns_id

    def _shard_path(self, shard: int) -> Path | None:
        path = self._shard_paths.get(shard)
        if path is None:
            row = self.db.execute(
                "SELECT ns.id, COALESCE(shard.file, shard.num) FROM shard JOIN ns ON shard.ns = ns.num "
                "WHERE shard.num = ?",
                (shard,),
            ).fetchone()
            if row is None:
                return None
            path = self._shard_paths[shard] = self._folder(row[0]) / f"{int(row[1]):08d}.rec"
        return path

    def _writer(self, info: NamespaceInfo, ns_num: int, width: int) -> _Writer:
        writer = self._writers.get(info.id)
        if writer is not None and (writer.rows + 1) * width <= _SHARD_BYTES:
            return writer
        if writer is not None:
            os.close(writer.fd)
        folder = self._folder(info.id)
        meta = folder / "meta.json"
        with writing(meta):
            folder.mkdir(parents=True, exist_ok=True)
            if not meta.is_file():
                text = json.dumps({"dim": info.dim, "dtype": info.dtype, "namespace": info.id})
                _write_atomically(meta, text)
        # a shard is (namespace, file number); its index number is its own, and the file gets that
        # number unless a file already has it (left by an index that was lost): then the next free
        with self._transaction() as db:
            shard = int(db.execute("INSERT INTO shard (ns) VALUES (?)", (ns_num,)).lastrowid or 0)
            with writing(folder / f"{shard:08d}.rec"):
                number, fd = _create_shard_file(folder, shard)
            try:
                db.execute("UPDATE shard SET file = ? WHERE num = ?", (number, shard))
            except BaseException:
                os.close(fd)
                (folder / f"{number:08d}.rec").unlink(missing_ok=True)
                raise
        path = folder / f"{number:08d}.rec"
        _fsync_folder(folder)
        writer = self._writers[info.id] = _Writer(shard, path, fd)
        self._shard_paths[shard] = path
        return writer

    def _append(self, info: NamespaceInfo, ns_num: int, records: np.ndarray) -> tuple[int, int]:
        """Write records at the end of this process's shard and fsync them; (shard, first row)."""
        writer = self._writer(info, ns_num, records.shape[1])
        first = writer.rows
        data = records.tobytes()
        try:
            with writing(writer.path):
                written = 0
                while written < len(data):
                    written += os.pwrite(writer.fd, data[written:], first * records.shape[1] + written)
                os.fsync(writer.fd)
        except BaseException:
            # the bytes after ``first`` are unknown now: this shard takes no more rows
            self._writers.pop(info.id, None)
            with contextlib.suppress(OSError):
                os.close(writer.fd)
            raise
        writer.rows += len(records)
        return writer.shard, first

    def _rows(self, shard: int, rows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The records at ``rows`` of a shard (copied), and which of the rows exist in the file.
        Rows that fill most of their span (a rerun reads what one run wrote, in order) are read in
        one ``pread``; scattered rows are gathered from a memory map of the shard."""
        if not len(rows):
            return np.zeros((0, width), np.uint8), np.zeros(0, bool)
        low, high = int(rows.min()), int(rows.max())
        if high - low + 1 <= 2 * len(rows):
            path = self._shard_path(shard)
            try:
                data = np.fromfile(path or "", np.uint8, count=(high - low + 1) * width, offset=low * width)
            except (OSError, ValueError):
                data = np.zeros(0, np.uint8)
            block = data[: len(data) // width * width].reshape(-1, width)
            present = rows - low < len(block)
            if present.all():
                dense = len(rows) == len(block) and bool((np.diff(rows) == 1).all())
                return (block if dense else block[rows - low]), present
            out = np.zeros((len(rows), width), np.uint8)
            out[present] = block[rows[present] - low]
            return out, present
        need = high + 1
        mapped = self._maps.get(shard)
        if mapped is None or mapped.rows < need:
            path = self._shard_path(shard)
            size = path.stat().st_size if path is not None and path.is_file() else 0
            count = size // width
            if count == 0 or path is None:
                return np.zeros((len(rows), width), np.uint8), np.zeros(len(rows), bool)
            mapped = self._maps[shard] = _Mapped(np.memmap(path, np.uint8, "r", shape=(count, width)), count)
        present = rows < mapped.rows
        if present.all():
            return mapped.array[rows], present
        out = np.zeros((len(rows), width), np.uint8)
        out[present] = mapped.array[rows[present]]
        return out, present

    # -------------------------------------------------------------- records
    def record_use(self, info: NamespaceInfo, added: int = 0) -> None:
        """Create or update a namespace's record: count += added, last used = now."""
        now = time.time()
        with writing(self.records_path), self.records.transact():
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
        """Vectors stored, all namespaces together."""
        return int(self.db.execute("SELECT COUNT(*) FROM item").fetchone()[0])

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file()) if self.path.is_dir() else 0

    # -------------------------------------------------------------- leases
    @contextlib.contextmanager
    def lease(self, *namespaces: Namespace) -> Iterator[None]:
        """Hold the namespaces a run reads and writes: `cache gc` leaves them alone until the run
        ends (a lease is a JSON file plus a lock the run holds; a dead run's lock is free)."""
        folder = self.root / "leases"
        name = uuid.uuid4().hex
        with writing(folder):
            folder.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(folder / f"{name}.lock"))
            lock.acquire()
        record = folder / f"{name}.json"
        try:
            with writing(record):
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

    def drop(self, ns_id: str) -> int:
        """Remove one namespace's vectors (index rows first, then its shard files); how many."""
        writer = self._writers.pop(ns_id, None)
        if writer is not None:
            with contextlib.suppress(OSError):
                os.close(writer.fd)
        num = self._ns_num(ns_id, create=False)
        removed = 0
        if num is not None:
            with self._transaction() as db:
                removed = db.execute("DELETE FROM item WHERE ns = ?", (num,)).rowcount
                shards = [r[0] for r in db.execute("SELECT num FROM shard WHERE ns = ?", (num,))]
                db.execute("DELETE FROM shard WHERE ns = ?", (num,))
                db.execute("DELETE FROM ns WHERE num = ?", (num,))
            for shard in shards:
                self._maps.pop(shard, None)
                self._shard_paths.pop(shard, None)
            self._ns_nums.pop(ns_id, None)
        shutil.rmtree(self._folder(ns_id), ignore_errors=True)
        return removed

    def _evict(self, infos: list[NamespaceInfo], dry_run: bool) -> int:
        removed = 0
        for info in infos:
            if info.id in self.leased():  # asked again for each: a run may have started meanwhile
                continue
            if dry_run:
                removed += info.count
                continue
            self.records.pop(info.id, None)  # the record first: no vector is ever left without one
            removed += self.drop(info.id) if info.format >= ITEM_FORMAT else 0
        return removed

    def evict_model(self, model_prefix: str, dry_run: bool = False) -> int:
        """Remove every vector of every namespace whose model fingerprint starts with the prefix."""
        return self._evict([i for i in self.namespaces() if i.model.startswith(model_prefix)], dry_run)

    def evict_older_than(self, seconds: float, dry_run: bool = False) -> int:
        """Remove the vectors of the namespaces no run has used for more than ``seconds``."""
        cutoff = time.time() - seconds
        return self._evict([i for i in self.namespaces() if i.last_used < cutoff], dry_run)

    def remove_legacy(self, dry_run: bool = False) -> int:
        """Remove the format-2 store (``items/``) and its namespace records; the bytes freed."""
        freed = 0
        if self.leased():
            return 0  # a run is going on: the old store waits for the next gc
        if self.legacy_path.is_dir():
            freed = sum(p.stat().st_size for p in self.legacy_path.rglob("*") if p.is_file())
            if not dry_run:
                shutil.rmtree(self.legacy_path, ignore_errors=True)
        if not dry_run and self.records_path.is_dir():
            for info in self.namespaces():
                if info.format < ITEM_FORMAT:
                    self.records.pop(info.id, None)
        return freed

    # -------------------------------------------------------------- repair
    def repair(self) -> ItemRepair:
        """Check both databases; rebuild the vector index from the record files (every record
        whose checksum holds is kept) when it is damaged, missing, or does not know every shard
        file, and a damaged namespace-record store from what can still be read; say how much was
        lost. A full disk is an error that leaves both in place (they are not damaged)."""
        held = self.leased()
        if held:
            raise NegalignError(
                f"a running command is using {len(held)} vector namespace(s) of this cache: repair it "
                "after that command ends"
            )
        self.close()
        report = ItemRepair()
        why = self._index_problem()
        if why is not None:
            report.vectors_kept, report.vectors_lost = self.rebuild_index()
            report.index_problem = why
        if not database_healthy(self.records_path, lambda: diskcache.Index(str(self.records_path))):
            report.records_kept, report.records_rebuilt = self._salvage_records()
        return report

    def _index_problem(self) -> str | None:
        """Why the vector index must be rebuilt from the shard files; None if it need not be."""
        if not index_healthy(self.index_path):
            return "it was damaged"
        readable = self._layouts()  # a folder without its row width cannot be indexed anyway
        files = [f for f in shard_files(self.path) if f.stem.isdigit() and f.parent in readable]
        if not self.index_path.exists():
            return "it was missing" if files else None
        db = _open_index(self.index_path)
        try:
            query = "SELECT ns.id, COALESCE(shard.file, shard.num) FROM shard JOIN ns ON shard.ns = ns.num"
            known = {(str(ns_id), int(number)) for ns_id, number in db.execute(query)}
        except sqlite3.DatabaseError as exc:
            if is_disk_full(exc, self.index_path):
                raise disk_full(self.index_path) from exc
            return "it was damaged"
        finally:
            db.close()
        unknown = [f for f in files if (f.parent.name, int(f.stem)) not in known]
        if unknown:
            return f"it did not know {len(unknown)} shard file(s) that hold vectors"
        return None

    def _layouts(self) -> dict[Path, int]:
        """Namespace folders whose ``meta.json`` gives their record width (others cannot be read)."""
        widths = {}
        folders = sorted(p for p in self.path.iterdir() if p.is_dir()) if self.path.is_dir() else []
        for folder in folders:
            try:
                meta = json.loads((folder / "meta.json").read_text())
                widths[folder] = _KEY + int(meta["dim"]) * np.dtype(meta["dtype"]).itemsize + _CHECKSUM
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not a namespace folder (or one whose row width is unknown)
        return widths

    def rebuild_index(self) -> tuple[int, int]:
        """A new index from the record files: (kept, unreadable). It is built beside the old one
        and swapped in only when complete (the old one is moved aside then), so a failure (a full
        disk) leaves the old index as it was. A shard is indexed under its namespace and file
        number, with a number of its own in the index: two namespaces' ``00000001.rec`` stay two."""
        self.close()
        if self.path.exists() and not self.path.is_dir():
            _move_aside(self.path)  # a file where the store's folder belongs
        fresh = self.index_path.with_name(f"index.db.rebuild-{uuid.uuid4().hex[:8]}")
        try:
            with writing(fresh):
                self.path.mkdir(parents=True, exist_ok=True)
                self._db = _open_index(fresh)
            kept, lost = self._index_shards()
            self.close()  # the last connection: SQLite folds the WAL into the file and removes it
        except BaseException:
            self.close()
            for suffix in ("", "-wal", "-shm"):
                fresh.with_name(fresh.name + suffix).unlink(missing_ok=True)
            raise
        stamp = int(time.time())
        for suffix in ("", "-wal", "-shm"):  # a WAL left without its database goes too
            part = self.index_path.with_name(f"index.db{suffix}")
            if part.exists():
                part.rename(part.with_name(f"index.db{suffix}.damaged-{stamp}"))
        os.replace(fresh, self.index_path)
        _fsync_folder(self.path)
        return kept, lost

    def _index_shards(self) -> tuple[int, int]:
        kept = lost = 0
        for folder, width in self._layouts().items():
            ns_num = self._ns_num(folder.name, create=True)
            for path in sorted(folder.glob("*.rec")):
                if not path.stem.isdigit():
                    continue
                try:
                    data = np.fromfile(path, np.uint8)
                except OSError:
                    continue
                count = len(data) // width
                lost += int(len(data) % width != 0)  # a torn record at the end
                records = data[: count * width].reshape(count, width)
                good = _intact_rows(records)
                lost += int((~good).sum())
                rows = np.flatnonzero(good)
                with self._transaction() as db:
                    number = int(path.stem)
                    insert = "INSERT INTO shard (ns, file) VALUES (?, ?)"
                    shard = int(db.execute(insert, (ns_num, number)).lastrowid or 0)
                    before = db.total_changes
                    db.executemany(
                        "INSERT OR IGNORE INTO item VALUES (?, ?, ?, ?)",
                        [(ns_num, records[r, :_KEY].tobytes(), shard, int(r)) for r in rows],
                    )
                    kept += db.total_changes - before
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
        with writing(self.records_path):
            for ns_id, record in kept.items():
                self.records[ns_id] = record
        # namespaces whose record was lost: rebuilt from the vector index, so that `cache ls`
        # shows them and `cache gc` can remove them (what they were made with is unknown)
        counts: dict[str, int] = {}
        with contextlib.suppress(sqlite3.DatabaseError, NegalignError):
            query = "SELECT ns.id, COUNT(*) FROM item JOIN ns ON item.ns = ns.num GROUP BY ns.id"
            counts = {str(ns_id): int(n) for ns_id, n in self.db.execute(query)}
        rebuilt = 0
        now = time.time()
        for ns_id, count in counts.items():
            if ns_id not in kept:
                meta: dict[str, Any] = {}
                with contextlib.suppress(OSError, ValueError):
                    meta = json.loads((self._folder(ns_id) / "meta.json").read_text())
                info = NamespaceInfo(
                    ns_id,
                    "unknown (record lost)",
                    "",
                    {},
                    int(meta.get("dim", 0)),
                    str(meta.get("dtype", "")),
                    now,
                    count,
                    now,
                    ITEM_FORMAT,
                )
                with writing(self.records_path):
                    self.records[ns_id] = asdict(info)
                rebuilt += 1
        return len(kept), rebuilt


class Namespace:
    """Vectors of one kind from one model configuration."""

    def __init__(self, store: ItemStore, info: NamespaceInfo) -> None:
        self.store = store
        self.info = info
        self._dtype = np.dtype(info.dtype)
        self._size = info.dim * self._dtype.itemsize
        self.width = _KEY + self._size + _CHECKSUM  # bytes of one record
        self.corrupt = 0  # stored vectors that failed their checksum (dropped; recomputed by the caller)

    @property
    def id(self) -> str:
        return self.info.id

    def get_many(self, items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Return (vectors ``(n, dim)``, found mask ``(n,)``); rows not found are zero."""
        self.store.touch(self.info)
        vectors = np.zeros((len(items), self.info.dim), dtype=self._dtype)
        found = np.zeros(len(items), dtype=bool)
        ns_num = self.store._ns_num(self.info.id, create=False)
        if ns_num is None or not len(items):
            return vectors, found
        unique: dict[bytes, int] = {}
        inverse = np.fromiter(
            (unique.setdefault(_key(item), len(unique)) for item in items), np.int64, len(items)
        )
        keys = list(unique)
        shards, rows = self.store._locate(ns_num, unique)
        ok = np.zeros(len(keys), dtype=bool)
        distinct = len(keys) == len(items)  # then row i of the result is key i: no second copy
        values = vectors if distinct else np.zeros((len(keys), self.info.dim), dtype=self._dtype)
        for shard in np.unique(shards[shards >= 0]):
            at = np.flatnonzero(shards == shard)
            records, present = self.store._rows(int(shard), rows[at], self.width)
            wanted = np.frombuffer(b"".join(keys[i] for i in at), np.uint8).reshape(-1, _KEY)
            good = present & (records[:, :_KEY] == wanted).all(axis=1) & _intact_rows(records)
            ok[at[good]] = True
            if good.all():
                values[at] = records[:, _KEY : _KEY + self._size].view(self._dtype)
            else:
                values[at[good]] = records[good, _KEY : _KEY + self._size].view(self._dtype)
        bad = [keys[i] for i in np.flatnonzero((shards >= 0) & ~ok)]
        if bad:
            self.corrupt += len(bad)
            self.store._forget(ns_num, bad)  # a later put stores them again
        if distinct:
            return vectors, ok
        found[:] = ok[inverse]
        vectors[found] = values[inverse[found]]
        return vectors, found

    def put_many(self, items: Sequence[str], vectors: np.ndarray) -> None:
        """Store one vector per item not stored yet: appended to a shard, fsynced, then indexed."""
        vectors = np.ascontiguousarray(vectors, dtype=self._dtype)
        if vectors.shape != (len(items), self.info.dim):
            raise ValueError(f"expected vectors of shape {(len(items), self.info.dim)}, got {vectors.shape}")
        store = self.store
        ns_num = store._ns_num(self.info.id, create=True)
        assert ns_num is not None
        keys: dict[bytes, int] = {}
        for i, item in enumerate(items):
            keys.setdefault(_key(item), i)
        shards, _ = store._locate(ns_num, {key: j for j, key in enumerate(keys)})
        new = {key: i for (key, i), shard in zip(keys.items(), shards, strict=True) if shard < 0}
        added = 0
        if new:
            records = np.empty((len(new), self.width), np.uint8)
            records[:, :_KEY] = np.frombuffer(b"".join(new), np.uint8).reshape(-1, _KEY)
            records[:, _KEY : _KEY + self._size] = vectors[list(new.values())].view(np.uint8)
            records[:, -_CHECKSUM:] = _checksums(records)
            shard, first = store._append(self.info, ns_num, records)
            with store._transaction() as db:
                before = db.total_changes
                db.executemany(
                    "INSERT OR IGNORE INTO item VALUES (?, ?, ?, ?)",
                    [(ns_num, key, shard, first + j) for j, key in enumerate(new)],
                )
                added = db.total_changes - before
        store.record_use(self.info, added)


def _checksum(data: Any) -> bytes:
    return hashlib.blake2b(data, digest_size=_CHECKSUM).digest()


def _checksums(records: np.ndarray) -> np.ndarray:
    """``(n, 8)`` BLAKE2b checksums of each record's key and vector (``records``: ``(n, width)``)."""
    records = np.ascontiguousarray(records)
    width = records.shape[1]
    view = memoryview(records.reshape(-1).data)
    sums = b"".join(
        hashlib.blake2b(view[o : o + width - _CHECKSUM], digest_size=_CHECKSUM).digest()
        for o in range(0, records.size, width)
    )
    return np.frombuffer(sums, np.uint8).reshape(-1, _CHECKSUM)


def _intact_rows(records: np.ndarray) -> np.ndarray:
    """Which records' checksums match their key and vector."""
    if not len(records):
        return np.zeros(0, dtype=bool)
    return (_checksums(records) == records[:, -_CHECKSUM:]).all(axis=1)


@dataclass
class ItemRepair:
    """What `cache repair` did to the per-item store (None: the count could not be read)."""

    vectors_kept: int | None = None  # None: the vector index was intact
    vectors_lost: int | None = 0
    index_problem: str = ""  # why the vector index was rebuilt
    records_kept: int | None = None  # None: the namespace records were intact
    records_rebuilt: int = 0


def index_healthy(path: Path) -> bool:
    """The vector index opens, has its tables, and SQLite's integrity check finds nothing."""
    if not path.exists():
        return not path.parent.exists() or path.parent.is_dir()
    try:
        with writing(path):  # a full disk is not damage: never set a healthy index aside for it
            db = _open_index(path)
    except sqlite3.DatabaseError:
        return False
    try:
        with writing(path):
            return db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    except sqlite3.DatabaseError:
        return False
    finally:
        db.close()


def database_healthy(path: Path, make: Callable[[], Any]) -> bool:
    """The diskcache database opens and SQLite's integrity check finds nothing."""
    if not path.exists():
        return True
    if not path.is_dir():
        return False
    try:
        with writing(path):  # a full disk is not damage: never set a healthy database aside for it
            handle = make()
    except sqlite3.DatabaseError:
        return False
    cache = handle.cache if isinstance(handle, diskcache.Index) else handle
    try:
        with writing(path):
            return not cache.check()
    except sqlite3.DatabaseError:
        return False
    finally:
        cache.close()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
    if path.exists():
        path.rename(aside)
    return aside
