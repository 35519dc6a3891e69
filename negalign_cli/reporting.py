"""How stages talk to whoever called them.

Stages never print. They receive a :class:`Reporter` (the CLI passes a rich one; library users
get :class:`NullReporter`, which forwards messages to :mod:`logging`) and use it for one-line
messages and progress.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Protocol

log = logging.getLogger("negalign")

Advance = Callable[[int], None]


class Reporter(Protocol):
    def info(self, message: str) -> None: ...

    def debug(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...

    def progress(self, description: str, total: int | None) -> contextlib.AbstractContextManager[Advance]: ...


class NullReporter:
    """Reporter for library use: messages go to the ``negalign`` logger, progress is silent."""

    def info(self, message: str) -> None:
        log.info(message)

    def debug(self, message: str) -> None:
        log.debug(message)

    def warn(self, message: str) -> None:
        log.warning(message)

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Advance]:
        yield _ignore


def _ignore(n: int = 1) -> None:
    """An ``Advance`` that does nothing (progress nobody watches)."""


class RecordingReporter(NullReporter):
    """Keeps every message; handy in notebooks and tests (``reporter.messages``)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str]] = []

    def info(self, message: str) -> None:
        self.messages.append(("info", message))

    def debug(self, message: str) -> None:
        self.messages.append(("debug", message))

    def warn(self, message: str) -> None:
        self.messages.append(("warn", message))

    def text(self) -> str:
        return "\n".join(m for _, m in self.messages)
