"""A stat cache: (path, size, mtime_ns, ctime_ns, inode, device) -> content digest, so that an
unchanged file is not read and hashed again (the idea of DVC's state database and of git's index).

A file's cached digest is used only when its size, modification time, status-change time (both in
nanoseconds), inode and device all equal what they were when it was hashed; any change to one of
them hashes it again. The change time is what git's index also keys on: a program can set a file's
mtime back (``cp -p``, ``rsync -t``, ``os.utime``) but not its ctime, which the kernel sets on every
write, rename and ``utime`` call. Without it a file system re-created at the same path (a fresh
tmpfs hands out the same inode numbers and device; a re-created container volume) and filled with
same-size files whose mtimes were kept would match every old row with new content.
Two guards keep the shortcut honest:

* a file modified less than ``RACY_SECONDS`` before it was hashed is not recorded (a write in the
  same timestamp tick after the hash would leave its stat unchanged: git's "racily clean" entries);
* every row carries a BLAKE2b checksum of its path and digest, so a row damaged inside SQLite is
  ignored (the file is hashed again), never trusted; a damaged stat field simply no longer matches.

Setting the mtime back changes the ctime, so that too is caught (DVC, which keys on mtime alone,
documents it as a limit). What remains: a file changed by writing to its block device, and a
same-size rewrite with the mtime set back made within one kernel timestamp tick (a few ms) of the
file's previous change and of the hash (the first guard above looks at the mtime only). Delete
``<cache>/stat.db`` to hash everything again.

Batches: a request of many entries (an image folder's listing: 10⁵ paths) also keeps one row of the
``batch`` table, keyed by the exact list of entries (and the files that vouch for them), holding every
entry's stat and digest in two packed arrays, with one BLAKE2b checksum over the whole row. The next
request of the same list reads that one row and compares every entry's stat with it in one
vectorised step, instead of 10⁵ row lookups; the rule per entry is the one above (all five stat
fields equal, the racy guard), so it serves no digest a per-file row would not. Entries that do not
match (a changed or new file) fall back to the per-file rows, then to hashing; a list that changed
(a file added, removed or renamed) is another key, so its first request takes the per-file path
and writes its own batch. Rows are evicted oldest first past ``BATCH_BUDGET`` bytes.

The database is a cache of a cache: if it cannot be read it is set aside and every file is hashed.
A full disk is not damage: it is an error naming stat.db (the database is left as it is).
A locked database ("database is locked", which SQLite can answer at once while another connection
creates the file or switches it to WAL) is not damage either: the connection is tried again, and
after that the files are hashed without it.
Schema 2 added ``ctime_ns``; rows of schema 1 are dropped when the database is opened.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from negalign_cli import hashing
from negalign_cli.cache.diskfull import disk_full, is_disk_full
from negalign_cli.errors import NegalignError
from negalign_cli.lazy import lazy_module

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")  # a cache hit that needs no batched row imports no numpy

STAT_CACHE = "stat.db"  # its name under the cache root
RACY_SECONDS = 2.0
_CHUNK = 900 if sqlite3.sqlite_version_info < (3, 32, 0) else 8000
SCHEMA_VERSION = 2  # 2: ctime_ns in the key (rows of version 1 are dropped)
_SCHEMA = f"""
DROP TABLE IF EXISTS stat;
CREATE TABLE stat (
    path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, inode INTEGER,
    device INTEGER, digest TEXT, checksum BLOB
) WITHOUT ROWID;
{{BATCH_TABLE}}
PRAGMA user_version = {SCHEMA_VERSION};
"""
# One row per (long) list of entries: their stats and digests, packed (see ``_pack``). Created
# where missing, so a stat.db of schema 2 keeps its per-file rows.
_BATCH_TABLE = """
CREATE TABLE IF NOT EXISTS batch (
    key BLOB PRIMARY KEY, written INTEGER, bytes INTEGER, data BLOB, checksum BLOB
) WITHOUT ROWID
"""
_SCHEMA = _SCHEMA.replace("{BATCH_TABLE}", _BATCH_TABLE + ";")
BATCH_MIN = 64  # fewer entries than this: per-file rows only (a few queries cost nothing)
BATCH_BUDGET = 256 << 20  # bytes of batch rows kept (the newest is always kept)
BATCH_ROWS = 64  # at most this many batch rows
_BATCH_MAGIC = b"NSB1"


# size, mtime_ns, ctime_ns, inode, device of each entry; size -1: not usable (no digest remembered)
@functools.cache
def _stat_dtype() -> np.dtype:
    return np.dtype([("size", "<i8"), ("mtime", "<i8"), ("ctime", "<i8"), ("ino", "<u8"), ("dev", "<u8")])


_UNUSABLE = (-1, 0, 0, 0, 0)

Digest = tuple[str | None, str]  # (sha256 hex, "") or (None, why not)
Stat = tuple[int, int, int, int, int]  # size, mtime_ns, ctime_ns, inode, device


_U64 = 1 << 64


def _stat_row(key: bytes, seen: Stat, digest: str) -> tuple[Any, ...]:
    """A row of the ``stat`` table. SQLite's INTEGER is a signed 64-bit number, and an inode or a
    device number is an unsigned one (an inode can be ≥ 2**63 on NFS, overlayfs or FUSE file
    systems): those two are stored as their two's complement (a negative number), read back by
    :func:`_row_stat`."""
    size, mtime_ns, ctime_ns, inode, device = seen
    return (key, size, mtime_ns, ctime_ns, _signed(inode), _signed(device), digest, _checksum(key, digest))


def _signed(value: int) -> int:
    return value - _U64 if value >= _U64 >> 1 else value


def _row_stat(row: Sequence[Any]) -> Stat:
    """The stat a ``stat`` row (path, size, mtime_ns, ctime_ns, inode, device, ...) remembers."""
    return (row[1], row[2], row[3], row[4] % _U64, row[5] % _U64)


def _checksum(path: bytes, digest: str) -> bytes:
    """A row's checksum covers the path and the digest; the stat fields need none: a damaged one
    no longer matches the file's stat, so the file is hashed again."""
    return hashlib.blake2b(path + digest.encode(), digest_size=8).digest()


def _batch_key(joined: bytes, count: int, stat_paths: Sequence[str] | None) -> bytes:
    """What identifies a request: its entries in order (``joined``: their keys joined by NUL),
    and the files that vouch for them."""
    digest = hashlib.blake2b(b"negalign stat batch 1\0%d\0" % count, digest_size=20)
    digest.update(joined)
    if stat_paths is not None:
        digest.update(b"\1")
        digest.update("\0".join(stat_paths).encode("utf-8", "surrogateescape"))
    return digest.digest()


def _named_key(name: str) -> bytes:
    """The key of a blob kept by name (never equal to a batch's: another prefix)."""
    text = b"negalign stat named 1\0" + name.encode("utf-8", "surrogateescape")
    return hashlib.blake2b(text, digest_size=20).digest()


def _pack(stats: np.ndarray, digests: bytes) -> bytes:
    """A batch row's data: magic, entry count, the stat array, then 32 raw digest bytes per entry."""
    return _BATCH_MAGIC + len(stats).to_bytes(8, "little") + stats.tobytes() + digests


def _unpack(data: bytes, count: int) -> tuple[np.ndarray, bytes] | None:
    """(stats, raw digests) of a batch row of ``count`` entries, or None if it is not one."""
    head = len(_BATCH_MAGIC) + 8
    width = _stat_dtype().itemsize
    if (
        len(data) != head + count * (width + 32)
        or data[: len(_BATCH_MAGIC)] != _BATCH_MAGIC
        or int.from_bytes(data[len(_BATCH_MAGIC) : head], "little") != count
    ):
        return None
    stats = np.frombuffer(data, dtype=_stat_dtype(), count=count, offset=head)
    return stats, data[head + count * width :]


def _batch_checksum(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(key + data, digest_size=16).digest()


def _upgrade(db: sqlite3.Connection) -> None:
    """Create the table, or drop one of an older schema (its rows lack a field of the key)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:  # asked again, locked
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


_BUSY_TRIES = 20  # connections answered "database is locked" before working without the cache


def _is_busy(exc: sqlite3.DatabaseError) -> bool:
    """Whether ``exc`` says the database is locked by another connection (not damaged)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "database is locked" in str(exc)


class StatCache:
    """``<cache>/stat.db``: digests of files by their stat."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.hits = 0
        self.hashed = 0

    def _connect(self) -> sqlite3.Connection | None:
        set_aside = False
        for attempt in range(_BUSY_TRIES):
            db = None
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                    _upgrade(db)
                return db
            except sqlite3.DatabaseError as exc:
                if db is not None:
                    db.close()
                if is_disk_full(exc, self.path):
                    raise disk_full(self.path) from exc  # full, not damaged: left as it is
                if _is_busy(exc):
                    # another connection is creating the database or switching it to WAL (SQLite
                    # answers that at once, without its busy wait): busy, not damaged. Setting it
                    # aside here lost the rows the other connection had just written.
                    time.sleep(0.01 * (attempt + 1))
                    continue
                if set_aside:
                    return None
                self._set_aside()
                set_aside = True
            except OSError as exc:
                if is_disk_full(exc):
                    raise disk_full(self.path) from exc
                return None  # a read-only cache: hash everything, remember nothing
        return None

    def _set_aside(self) -> None:
        stamp = int(time.time())
        for suffix in ("", "-wal", "-shm"):
            part = self.path.with_name(self.path.name + suffix)
            with contextlib.suppress(OSError):
                part.rename(part.with_name(f"{part.name}.damaged-{stamp}"))

    def digests(
        self,
        paths: Sequence[str],
        hash_many: Callable[[list[int]], list[Digest]],
        stat_paths: Sequence[str] | None = None,
    ) -> list[Digest]:
        """The digest of every entry: from the cache where its file's stat is unchanged, else from
        ``hash_many`` (which gets the indices of the entries to read, and returns (digest, reason)
        for each). An entry is a file (``paths[i]``), or a part of the file ``stat_paths[i]``
        (a member of a tar shard, keyed ``paths[i]``), vouched for by that file's stat."""
        if not paths:
            return []
        started_ns = time.time_ns()
        result: list[Digest | None] = [None] * len(paths)
        stats: list[Stat | None] = [None] * len(paths)
        stat_of = paths if stat_paths is None else stat_paths
        stat = os.stat
        for i, path in enumerate(stat_of):
            try:
                st = stat(path)
            except FileNotFoundError:
                result[i] = (None, "file not found")
                continue
            except OSError as exc:
                result[i] = (None, f"cannot read: {exc.strerror or exc}")
                continue
            stats[i] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
        db = self._connect()
        keys = [p.encode("utf-8", "surrogateescape") for p in paths]  # os.fsencode, on POSIX
        batched = len(paths) >= BATCH_MIN and db is not None
        joined = b"\0".join(keys) if batched else b""
        batch_key = _batch_key(joined, len(paths), stat_paths) if batched else b""
        left = [True] * len(paths)  # entries not served by the batch row (numpy only for a batch)
        if batched and db is not None:
            now = np.array([s if s is not None else _UNUSABLE for s in stats], dtype=_stat_dtype())
            matched = np.zeros(len(paths), dtype=bool)
            try:
                matched = self._from_batch(db, batch_key, now, result)
                left = (~matched).tolist()
            except sqlite3.DatabaseError as exc:
                db.close()
                db = None
                if is_disk_full(exc, self.path):
                    raise disk_full(self.path) from exc
                if not _is_busy(exc):  # locked by another connection: hash these, keep the database
                    self._set_aside()
        # path -> (path, size, mtime_ns, ctime_ns, inode, device, digest, checksum)
        known: dict[bytes, tuple[Any, ...]] = {}
        if db is not None and any(left):
            try:
                wanted = [k for k, s, m in zip(keys, stats, left, strict=True) if s is not None and m]
                for start in range(0, len(wanted), _CHUNK):
                    chunk = wanted[start : start + _CHUNK]
                    query = (
                        "SELECT path, size, mtime_ns, ctime_ns, inode, device, digest, checksum FROM stat "
                        f"WHERE path IN ({','.join('?' * len(chunk))})"
                    )
                    known.update((row[0], row) for row in db.execute(query, chunk))
            except sqlite3.DatabaseError as exc:
                known = {}
                db.close()
                db = None
                if is_disk_full(exc, self.path):
                    raise disk_full(self.path) from exc
                if not _is_busy(exc):  # locked by another connection: hash these, keep the database
                    self._set_aside()
        todo: list[int] = []
        for i in [i for i, unserved in enumerate(left) if unserved]:
            seen = stats[i]
            if seen is None:
                continue
            key = keys[i]
            entry = known.get(key)
            if entry is not None and _row_stat(entry) == seen and _checksum(key, entry[6]) == entry[7]:
                result[i] = (entry[6], "")
            else:
                todo.append(i)
        self.hits += len(paths) - len(todo)
        self.hashed += len(todo)
        fresh = hash_many(todo) if todo else []
        rows = []
        racy = started_ns - int(RACY_SECONDS * 1e9)
        for i, (digest, reason) in zip(todo, fresh, strict=True):
            result[i] = (digest, reason)
            seen = stats[i]
            if digest is not None and seen is not None and seen[1] < racy:
                rows.append(_stat_row(keys[i], seen, digest))
        if db is not None:
            try:
                if rows:
                    db.execute("BEGIN IMMEDIATE")
                    db.executemany("INSERT OR REPLACE INTO stat VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                    db.execute("COMMIT")
                if batched:
                    with contextlib.suppress(sqlite3.Error):  # only ever saves work: never an error
                        self._to_batch(db, batch_key, now, matched, result, racy)
            except sqlite3.Error as exc:
                if is_disk_full(exc, self.path):
                    raise disk_full(self.path) from exc
            finally:
                db.close()
        return [r if r is not None else (None, "not processed") for r in result]

    def _from_batch(
        self, db: sqlite3.Connection, key: bytes, now: np.ndarray, result: list[Digest | None]
    ) -> np.ndarray:
        """Fill ``result`` from the batch row of this request where an entry's stat equals the one
        remembered; which entries were filled. A row that fails its checksum is not used."""
        matched = np.zeros(len(now), dtype=bool)
        data = self._get_batch(db, key)
        if data is None:
            return matched
        unpacked = _unpack(data, len(now))
        if unpacked is None:
            return matched
        stored, raw = unpacked
        matched = (stored == now) & (stored["size"] >= 0) & (now["size"] >= 0)
        hexed = raw.hex()
        if matched.all():  # the usual no-op: every entry, in one pass
            result[:] = [(hexed[j : j + 64], "") for j in range(0, 64 * len(now), 64)]
        else:
            for i in np.flatnonzero(matched).tolist():
                result[i] = (hexed[64 * i : 64 * i + 64], "")
        return matched

    def _to_batch(
        self,
        db: sqlite3.Connection,
        key: bytes,
        now: np.ndarray,
        matched: np.ndarray,
        result: list[Digest | None],
        racy: int,
    ) -> None:
        """Write this request's batch row when it would serve an entry the stored row did not (a
        file hashed or found in a per-file row now); evict the oldest rows past the budget. An
        entry is remembered on the per-file rule: a digest, a stat, modified before ``racy``."""
        usable = (now["size"] >= 0) & (now["mtime"] < racy)
        if not (usable & ~matched).any():
            return  # every entry is served by the stored row, or none can be remembered
        digests = [r[0] if r is not None else None for r in result]
        usable &= np.array([d is not None and len(d) == 64 for d in digests], dtype=bool)
        if not (usable & ~matched).any():
            return  # the stored row already serves every entry that can be served
        stats = now.copy()
        stats[~usable] = _UNUSABLE
        zero = "0" * 64
        try:
            raw = bytes.fromhex(
                "".join(
                    d if ok and d is not None else zero
                    for d, ok in zip(digests, usable.tolist(), strict=True)
                )
            )
        except ValueError:  # a digest that is not hex: remember no batch
            return
        self._put_batch(db, key, _pack(stats, raw))

    def _put_batch(self, db: sqlite3.Connection, key: bytes, data: bytes) -> None:
        """Store one batch row (checksummed); evict the oldest rows past the budget."""
        db.execute(_BATCH_TABLE)
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT OR REPLACE INTO batch VALUES (?, ?, ?, ?, ?)",
                (key, time.time_ns(), len(data), data, _batch_checksum(key, data)),
            )
            total, stale = 0, []
            for number, (old, size) in enumerate(
                db.execute("SELECT key, bytes FROM batch ORDER BY written DESC, key")
            ):
                total += size
                if number > 0 and (total > BATCH_BUDGET or number >= BATCH_ROWS):
                    stale.append((old,))
            db.executemany("DELETE FROM batch WHERE key = ?", stale)
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def _get_batch(self, db: sqlite3.Connection, key: bytes) -> bytes | None:
        """A batch row's data, or None (no such row, or one that fails its checksum)."""
        try:
            row = db.execute("SELECT data, checksum FROM batch WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # a stat.db made before batches: none yet
                return None
            raise
        if row is None or _batch_checksum(key, row[0]) != row[1]:
            return None
        return bytes(row[0])

    def recall(self, name: str) -> bytes | None:
        """What :meth:`remember` kept under ``name`` (a folder's listing), or None: never kept,
        evicted, damaged (it fails its checksum) or unreadable."""
        if not self.path.is_file():  # nothing kept yet: create nothing
            return None
        try:
            db = self._connect()
        except NegalignError:  # a full disk: nothing recalled, nothing lost
            return None
        if db is None:
            return None
        try:
            return self._get_batch(db, _named_key(name))
        except sqlite3.DatabaseError:
            return None
        finally:
            db.close()

    def remember(self, name: str, data: bytes) -> None:
        """Keep ``data`` under ``name`` beside the batches (checksummed, evicted with them). A cache
        that cannot be written remembers nothing: this only ever saves work."""
        try:
            db = self._connect()
        except NegalignError:  # a full disk
            return
        if db is None:
            return
        try:
            self._put_batch(db, _named_key(name), data)
        except sqlite3.Error:
            pass
        finally:
            db.close()

    def file_digests(self, paths: Sequence[str]) -> list[Digest]:
        """The sha256 of whole files (artifact outputs, ``--out`` exports, score files) by their
        stat: an unchanged file is not read. A file that cannot be read gets (None, why not); so
        does an empty one, which is not remembered (as for images, whose rows share these keys)."""

        def hash_many(todo: list[int]) -> list[Digest]:
            found: list[Digest] = []
            for i in todo:
                try:
                    digest, size = hashing.sha256_file_sized(paths[i])
                except OSError as exc:
                    found.append((None, str(exc)))
                    continue
                found.append((digest, "") if size else (None, "empty file"))
            return found

        return self.digests(paths, hash_many)


def sha256_files(paths: Sequence[str | Path], stat_cache: StatCache | None = None) -> list[str]:
    """The sha256 of each file's bytes. Every digest that verifies an artifact against its
    manifest (store lookups, ``--out`` folders, shard folders) or keys a stage on a file (score
    files) is taken here: with ``stat_cache``, a file whose size, mtime, ctime, inode and device
    are unchanged since it was hashed is not read again; any change re-hashes it. A file that
    cannot be read raises as :func:`negalign_cli.hashing.sha256_file` does; a ``stat.db`` that
    cannot be written (a full disk) is passed over: every file is hashed."""
    names = [os.path.abspath(p) for p in paths]
    if stat_cache is None or not names:
        return [hashing.sha256_file_sized(name)[0] for name in names]
    try:
        found = stat_cache.file_digests(names)
    except NegalignError:  # stat.db has no room (a full disk): a read still works, without it
        return [hashing.sha256_file_sized(name)[0] for name in names]
    # a file the cache did not hash (empty, unreadable) is read here: its digest, or what
    # sha256_file raises
    return [
        digest if digest is not None else hashing.sha256_file_sized(name)[0]
        for name, (digest, _) in zip(names, found, strict=True)
    ]
