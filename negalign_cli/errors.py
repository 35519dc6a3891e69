"""User-facing errors.

Anything the user can fix (a bad path, a bad option value, missing weights) raises
:class:`NegalignError` with a one-line message; the CLI prints that line and exits non-zero,
without a traceback. Bugs raise ordinary exceptions.
"""

from __future__ import annotations


class NegalignError(Exception):
    """An error caused by the input or the environment, reported to the user as one line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
