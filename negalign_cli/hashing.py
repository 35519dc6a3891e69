"""Content digests and canonical JSON, the basis of every cache key."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import stat
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


def printable_paths(paths: list[str]) -> list[str]:
    """:func:`printable_path` of each; one encode of them all when every name is valid UTF-8."""
    try:
        "\0".join(paths).encode("utf-8")
    except UnicodeEncodeError:  # some name holds bytes that are not UTF-8 (lone surrogates)
        return [printable_path(p) for p in paths]
    return list(paths)


def sha256_json(obj: Any) -> str:
    return sha256_text(canonical_json(obj))


def sha256_file(path: str | Path) -> str:
    return sha256_file_sized(path)[0]


_KINDS = {
    stat.S_IFDIR: "directory",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


class NotRegularFile(OSError):
    """A path that is a FIFO, a device, a socket or a directory: never opened for reading (a FIFO
    blocks forever, a device may never end). ``kind`` names it; ``str()`` is the skip reason."""

    def __init__(self, path: str | Path, kind: str) -> None:
        super().__init__(errno.EINVAL, f"not a regular file ({kind})", str(path))
        self.kind = kind

    def __str__(self) -> str:
        return str(self.strerror)


def file_kind(mode: int) -> str:
    """``"file"`` for a regular file, else what it is (``fifo``, ``character device``, …)."""
    return "file" if stat.S_ISREG(mode) else _KINDS.get(stat.S_IFMT(mode), "special file")


def check_regular(path: str | Path) -> None:
    """Raise :class:`NotRegularFile` unless ``path`` (symlinks followed) is a regular file;
    ``FileNotFoundError`` and other ``OSError`` as ``os.stat`` raises them. Nothing is opened."""
    kind = file_kind(os.stat(path).st_mode)
    if kind != "file":
        raise NotRegularFile(path, kind)


def open_regular(path: str | Path) -> io.BufferedReader:
    """Open a regular file for reading in binary, checking its type first: every route that reads
    a user-named path goes through here, so a FIFO or a device in a list is refused with
    :class:`NotRegularFile`, never opened (a FIFO would block forever and ignore Ctrl-C). The open
    itself does not block (``O_NONBLOCK``) and the opened file's type is checked again, so a path
    swapped for a FIFO between the two checks is refused too."""
    return _open_checked(path)


def read_regular(path: str | Path) -> bytes:
    """The bytes of a small regular file (a manifest in ``--out``), opened as :func:`open_regular`
    opens a file (a FIFO is refused, never opened). Not a route to hashing: the tests that count
    the files a run hashes watch :func:`open_regular`."""
    with _open_checked(path) as handle:
        return handle.read()


def _open_checked(path: str | Path) -> io.BufferedReader:
    check_regular(path)
    nonblocking = getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, os.O_RDONLY | nonblocking | getattr(os, "O_CLOEXEC", 0))
    try:
        kind = file_kind(os.fstat(fd).st_mode)
        if kind != "file":
            raise NotRegularFile(path, kind)
        if nonblocking:
            os.set_blocking(fd, True)
        return open(fd, "rb")  # noqa: SIM115 (the caller closes it)
    except BaseException:
        os.close(fd)
        raise


def sha256_file_sized(path: str | Path) -> tuple[str, int]:
    """sha256 of a file's bytes, read in 1 MiB chunks, and how many bytes there were. A path that
    is not a regular file raises :class:`NotRegularFile` (see :func:`open_regular`)."""
    digest = hashlib.sha256()
    size = 0
    with open_regular(path) as handle:
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
