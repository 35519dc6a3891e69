"""Terminal output: a rich reporter for stages, error printing, consoles created lazily."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import typer
import typer.exceptions

from negalign_cli.defaults import DEBUG_ENV
from negalign_cli.errors import NegalignError
from negalign_cli.reporting import Advance, _ignore

if TYPE_CHECKING:
    from rich.console import Console

# rich is imported where output is drawn, not when a command module is: every run is a process


def escape(text: str) -> str:
    """rich's markup escape (``rich.markup.escape``), imported on first use."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


@functools.cache
def stdout() -> Console:
    from rich.console import Console

    return Console(highlight=False)


@functools.cache
def stderr() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


class RichReporter:
    """Messages and progress bars on stderr (stdout stays for tables and results)."""

    def __init__(self, verbosity: int = 0) -> None:
        self.verbosity = verbosity  # -1 quiet, 0 normal, 1+ verbose

    def info(self, message: str) -> None:
        if self.verbosity >= 0:
            stderr().print(f"[dim]·[/] {escape(message)}")

    def debug(self, message: str) -> None:
        if self.verbosity >= 1:
            stderr().print(f"[dim]  {escape(message)}[/]")

    def warn(self, message: str) -> None:
        stderr().print(f"[yellow]warning:[/] {escape(message)}")

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Advance]:
        if self.verbosity < 0:
            yield _ignore
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        if total:
            columns.append(TimeRemainingColumn())
        with Progress(*columns, console=stderr(), transient=False) as bar:
            task = bar.add_task(escape(description), total=total)

            def advance(n: int = 1) -> None:
                bar.advance(task, n)

            yield advance


def fail(message: str, code: int = 2) -> typer.Exit:
    stderr().print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # one line, never wrapped
    return typer.Exit(code)


F = TypeVar("F", bound=Callable[..., Any])


_TOO_LARGE = {errno.EFBIG}  # a full disk (ENOSPC, EDQUOT) is cache.diskfull's
_DENIED = {errno.EROFS, errno.EACCES, errno.EPERM}


def storage_failure(exc: BaseException) -> str | None:
    """One line for what the disk or a cache database refused (disk full, read-only, damaged)."""
    import sqlite3

    from negalign_cli.cache.diskfull import disk_full, is_disk_full

    cause: BaseException | None = exc
    for _ in range(16):  # a full disk behind a wrapped error too
        if cause is None or is_disk_full(cause):
            break
        cause = cause.__cause__ or cause.__context__
    if cause is not None and is_disk_full(cause):  # the write paths name their file; this is for the rest
        exc = cause
        # shutil's copies name the source first and the file being written second
        target = getattr(exc, "filename2", None) or getattr(exc, "filename", None)
        if target:
            return str(disk_full(target))
        return (
            "disk full while writing (the file was not named): free space on the disk of --cache-dir "
            "or --out and rerun"
        )
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f" {exc.filename}" if exc.filename else ""
        if exc.errno in _TOO_LARGE:
            return f"{exc.strerror or exc} while writing{where}: free some space, or use another disk"
        if exc.errno in _DENIED:
            return (
                f"cannot write{where} ({exc.strerror}): negalign writes its index and lock files even to "
                "read a cache; give --cache-dir (or --out) a folder you can write"
            )
        return f"{exc.strerror or exc}{where}"
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc)
        if "readonly" in text or "read-only" in text:
            return (
                "the cache is read-only: negalign writes its SQLite index even to read; use a "
                "writable --cache-dir"
            )
        if "disk is full" in text or "disk I/O" in text:
            return (
                f"the cache's database could not be written ({text}): free space, or use another --cache-dir"
            )
        return f"the cache's database refused the operation ({text}); if it persists: `negalign cache repair`"
    if isinstance(exc, sqlite3.DatabaseError):
        return f"a cache database is damaged ({exc}): run `negalign cache repair`"
    return None


def debug_enabled() -> bool:
    """``--debug`` (which sets the variable) or ``NEGALIGN_DEBUG=1``: full tracebacks on errors."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def guarded(function: F) -> F:
    """Every failure is one red line on stderr and a non-zero exit code: exit 2 for what the user
    can fix (:class:`NegalignError`), 130 for Ctrl-C, 1 for anything unexpected. With ``--debug``
    the traceback follows instead."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.exceptions.TyperException):  # usage errors: Typer's own
            raise
        except NegalignError as exc:
            if debug_enabled():
                raise
            raise fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            raise fail("interrupted; finished work is kept in the cache and a rerun resumes", 130) from None
        except Exception as exc:
            if debug_enabled():
                raise
            known = storage_failure(exc)
            if known is not None:
                raise fail(known, 2) from None
            detail = " ".join(str(exc).split())[:300] or "no message"
            raise fail(
                f"unexpected {type(exc).__name__}: {detail} (rerun with --debug or {DEBUG_ENV}=1 for the "
                "traceback, and please report it)",
                1,
            ) from None

    return wrapper  # type: ignore[return-value]
