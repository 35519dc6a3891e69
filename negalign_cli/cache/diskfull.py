"""A full disk, however it shows up, becomes one error naming what was being written.

The operating system says ``ENOSPC`` (or ``EDQUOT``), usually without a file name (a ``write``
has none); SQLite says "database or disk is full" (``SQLITE_FULL``), or an I/O error when it
cannot grow its shared-memory file; numpy's ``tofile`` reports a short write as
``"N requested and M written"`` with no errno at all. Each write path of the cache (the vector
index and shards, the artifact index and folders, the stat cache, ``--out``) runs inside
:func:`writing`, which turns all of these into :func:`disk_full` for the path it writes, so the
message never sends the user to ``cache repair`` for a database that is healthy but has no room.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from negalign_cli.errors import NegalignError

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile on a full disk
_NEARLY_FULL = 1 << 20  # bytes: below this, an I/O error while writing is taken for a full disk


def mount_point(path: str | Path) -> Path:
    """The mount point of the file system holding ``path`` (or its nearest existing parent)."""
    here = Path(os.path.abspath(path))
    while not here.exists() and here != here.parent:
        here = here.parent
    while not os.path.ismount(here) and here != here.parent:
        here = here.parent
    return here


def free_bytes(path: str | Path) -> int | None:
    """Bytes an unprivileged writer may still use on the file system holding ``path``."""
    try:
        stats = os.statvfs(mount_point(path))
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def is_disk_full(exc: BaseException, path: str | Path | None = None) -> bool:
    """Whether ``exc`` is a write refused for lack of space (``path``: where it wrote, to tell an
    I/O error on a disk that has no room left from any other)."""
    if isinstance(exc, OSError):
        return exc.errno in _FULL_ERRNOS or (exc.errno is None and bool(_SHORT_WRITE.search(str(exc))))
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", "") or ""
        if name == "SQLITE_FULL" or "database or disk is full" in str(exc):
            return True
        if path is not None and (name.startswith("SQLITE_IOERR") or "disk I/O error" in str(exc)):
            free = free_bytes(path)
            return free is not None and free < _NEARLY_FULL
    return False


def disk_full(path: str | Path) -> NegalignError:
    """The one-line error: what was being written, and which file system needs room."""
    return NegalignError(
        f"disk full while writing {path}: free space on {mount_point(path)} and rerun "
        "(or point --cache-dir / --out at another disk)"
    )


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Run a write to ``path`` (a file, a database, a folder being filled); a full disk becomes
    :func:`disk_full`, anything else passes through unchanged."""
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        if is_disk_full(exc, path):
            raise disk_full(path) from exc
        raise
