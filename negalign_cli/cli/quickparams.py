"""Typer's coercion of parameter values, without pydantic for the plain ones.

Typer (0.2x) coerces every parameter value, defaults included, through a pydantic ``TypeAdapter``
built on first use, so any command's first parse imports pydantic: ~0.1 s of a process that may
only find a cache hit. For the values a command line carries, the conversion is plain: a ``str``
for a ``str`` option, decimal digits for an ``int``, a path for a ``Path``, an enum member or its
exact value, a list of strings. Those are converted here to what the adapter returns; anything
else, and so every error, goes to Typer's own coercion, whose messages are unchanged.

``QuickGroup`` (the root's class) installs this on the parameters of the command it resolves;
where Typer's internals are not the ones this was written against, nothing is installed.
``tests/test_startup.py`` checks, for every parameter of every command, that the values converted
here equal Typer's.
"""

from __future__ import annotations

import os
import re
from enum import Enum
from pathlib import Path
from typing import Any, get_args, get_origin

import typer.core

_PASS = object()  # "not plain: let Typer coerce it"
_INT = re.compile(r"-?[0-9]{1,18}")
_FLOAT = re.compile(r"-?[0-9]{1,15}(\.[0-9]{1,15})?")


def _in_range(number: float, info: Any) -> bool:
    return (info.min is None or number >= info.min) and (info.max is None or number <= info.max)


def quick_value(param: Any, value: Any, ctx: Any) -> Any:
    """``value`` (not None) converted as Typer would for ``param``, or ``_PASS``."""
    descriptor = param.type_descriptor
    annotation, info = descriptor.annotation, descriptor.parameter_info
    if info.parser is not None or getattr(info, "click_type", None) is not None or descriptor.is_file:
        return _PASS
    if param.multiple or param.nargs == -1:
        if (
            get_origin(annotation) is list
            and get_args(annotation) == (str,)
            and isinstance(value, (list, tuple))
            and all(type(item) is str for item in value)
        ):
            return list(value)
        return _PASS
    if param.nargs != 1:
        return _PASS
    if annotation is str:
        return value if type(value) is str else _PASS
    if annotation is int:
        if info.clamp:
            return _PASS
        if type(value) is str and _INT.fullmatch(value):
            value = int(value)
        return value if type(value) is int and _in_range(value, info) else _PASS
    if annotation is float:
        if info.clamp:
            return _PASS
        if (type(value) is str and _FLOAT.fullmatch(value)) or (type(value) is int and abs(value) < 2**53):
            value = float(value)
        return value if type(value) is float and _in_range(value, info) else _PASS
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        if any(value is member for member in annotation):
            return value
        if type(value) is not str or ctx is None or ctx.token_normalize_func is not None:
            return _PASS
        fold = (lambda text: text) if info.case_sensitive else str.casefold
        for member in annotation:
            if fold(str(member.value)) == fold(value):
                return member
        return _PASS
    if annotation is Path:
        if info.path_type is not None or info.resolve_path or info.allow_dash or info.exists:
            return _PASS
        if not (info.file_okay and info.dir_okay) or info.writable:
            return _PASS
        if type(value) is str and value:
            value = Path(value)
        if not isinstance(value, Path):
            return _PASS
        try:
            os.stat(value)
        except OSError:
            return value
        except ValueError:  # a NUL byte: Typer's message
            return _PASS
        return value if not info.readable or os.access(value, os.R_OK) else _PASS
    return _PASS


def _install(param: Any) -> None:
    if (
        isinstance(param, typer.core._TyperParameter)
        and getattr(param, "_runtime_param", False) is None
        and hasattr(param, "type_descriptor")
    ):
        param._runtime_param = QuickCoercion(param)  # type: ignore[assignment]  # duck-typed


class QuickCoercion:
    """Stands in for a parameter's Typer ``RuntimeParam``: plain values here, the rest to it
    (built on first need, as Typer builds it)."""

    def __init__(self, param: Any) -> None:
        self.param = param
        self.full: Any = None

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        multi = param.multiple or param.nargs == -1
        if value is None:  # as Typer's RuntimeParam.coerce
            return () if multi else None
        if not (multi and isinstance(value, str)):
            converted = quick_value(param, value, ctx)
            if converted is not _PASS:
                return converted
        # a str for a multi-value parameter (an error), anything not plain: Typer's own
        if self.full is None:
            from typer._coercion import build_runtime_param

            self.full = build_runtime_param(param.type_descriptor)
        return self.full.coerce(value, param=param, ctx=ctx)


def install(command: Any, below: bool = True) -> None:
    """Quick coercion for every parameter of ``command`` (and of the commands under it, with
    ``below``) that Typer has not coerced yet."""
    for param in command.params:
        _install(param)
    if not getattr(command, "_quick_help", False):  # the help option is made per command, on first use
        made = command.get_help_option

        def get_help_option(ctx: Any) -> Any:
            option = made(ctx)
            if option is not None:
                _install(option)
            return option

        command.get_help_option = get_help_option
        command._quick_help = True
    for child in getattr(command, "commands", {}).values() if below else ():
        install(child)


_SUPPORTED = hasattr(typer.core, "_TyperParameter")
if _SUPPORTED:
    try:
        import typer._coercion  # noqa: F401  (the fallback above needs it)
    except ImportError:
        _SUPPORTED = False


class QuickGroup(typer.core.TyperGroup):
    """The root group: its own options and the command it resolves coerce plain values without
    pydantic."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if _SUPPORTED:
            install(self, below=False)
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name, command, rest = super().resolve_command(ctx, args)
        if _SUPPORTED and command is not None:
            install(command)
        return name, command, rest
