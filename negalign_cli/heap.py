"""Large temporary arrays without page faults, for array-heavy steps (``evaluate``'s λ sweep).

glibc's ``malloc`` serves each allocation above its mmap threshold (128 KiB at first, adjusted up
to 32 MiB) with a fresh ``mmap`` and hands it back to the system when it is freed; the top of the
heap is trimmed likewise. A step that makes and drops full-length numpy arrays by the dozen (the
metrics of a λ sweep: ~20 arrays of n_ID + n_OOD values per set and λ) therefore touches fresh
pages every time, one page fault per 4 KiB: at 4 × 10⁵ rows a third of the metrics' time.

``reused_heap()`` raises both thresholds for the duration of a ``with`` block, so a freed array's
memory stays in the heap and serves the next one; on leaving, the thresholds are set where glibc's
own adjustment would take them (32 MiB, trim at 64 MiB) and the heap's free memory is returned to
the system (``malloc_trim``). No value computed changes: only
where the memory comes from. Elsewhere than glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
# after the block: where glibc's own adjustment ends once it has freed a large mapped array (its
# DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems, the trim threshold twice that); setting a threshold
# turns that adjustment off for the process, so the block leaves them at its upper end
AFTER_MMAP_THRESHOLD, AFTER_TRIM_THRESHOLD = 32 << 20, 64 << 20
DEFAULT_TOP_PAD = 128 * 1024  # glibc's DEFAULT_TOP_PAD on 64-bit systems
REUSE_THRESHOLD = 1 << 30  # no allocation below 1 GiB is mmapped; the heap is not trimmed
REUSE_TOP_PAD = 64 << 20  # the heap grows 64 MiB at a time

_lock = threading.Lock()
_depth = 0


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.mallopt  # noqa: B018 - absent outside glibc
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


@contextmanager
def reused_heap() -> Iterator[bool]:
    """Keep freed memory in the heap for reuse while the block runs (nested blocks are fine).
    Yields whether the setting took effect (False outside glibc)."""
    global _depth
    libc = _libc()
    if libc is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(M_MMAP_THRESHOLD, REUSE_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, REUSE_THRESHOLD)
            libc.mallopt(M_TOP_PAD, REUSE_TOP_PAD)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_MMAP_THRESHOLD, AFTER_MMAP_THRESHOLD)
                libc.mallopt(M_TRIM_THRESHOLD, AFTER_TRIM_THRESHOLD)
                libc.mallopt(M_TOP_PAD, DEFAULT_TOP_PAD)
                libc.malloc_trim(0)
