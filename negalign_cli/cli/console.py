"""Terminal output: a rich reporter for stages, error printing, consoles created lazily."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from negalign_cli.errors import NegalignError
from negalign_cli.reporting import Advance


@functools.cache
def stdout() -> Console:
    return Console(highlight=False)


@functools.cache
def stderr() -> Console:
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
            yield lambda n=1: None
            return
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        if total:
            columns.append(TimeRemainingColumn())
        with Progress(*columns, console=stderr(), transient=False) as bar:
            task = bar.add_task(escape(description), total=total)
            yield lambda n=1: bar.advance(task, n)


def fail(message: str, code: int = 2) -> typer.Exit:
    stderr().print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code)


F = TypeVar("F", bound=Callable[..., Any])


def guarded(function: F) -> F:
    """Turn :class:`NegalignError` into one red line on stderr and a non-zero exit code."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except NegalignError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted; finished work is kept in the cache and a rerun resumes", 130) from None

    return wrapper  # type: ignore[return-value]
