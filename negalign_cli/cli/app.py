"""The ``negalign`` command: one Typer app, one module per command group.

Every cache hit is a whole process, so the start-up counts. The commands are a table (``COMMANDS``:
name -> module, function, epilog); ``main()`` builds and runs a root that holds only the command
its arguments name, so `negalign models` imports only ``models_cmd`` and builds one click command,
not all of them. Whatever the table cannot answer on its own (no arguments, ``--help`` or
``--version`` before a command, an unknown name) goes to the full app, ``app``, which is built on
first use (``from negalign_cli.cli.app import app``) from the same table: the same help, the same
errors. ``tests/test_startup.py`` compares the two.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple

import typer

from negalign_cli import __version__
from negalign_cli.cli.quickparams import QuickGroup
from negalign_cli.defaults import DEBUG_ENV

if TYPE_CHECKING:
    app: typer.Typer  # built on first use: see __getattr__


class Command(NamedTuple):
    """One entry of the table: ``negalign_cli.cli.<module>.<function>`` with the epilog held in
    the module's attribute ``epilog_attribute`` (or the literal ``epilog``); a group is a module
    whose ``app`` is a Typer (``function`` None)."""

    module: str
    function: str | None = None
    epilog_attribute: str | None = None
    epilog: str | None = None
    context_settings: dict[str, Any] | None = None


COMMANDS: dict[str, Command] = {
    "models": Command("models_cmd", "models", "EXAMPLE"),
    "mine-negatives": Command("vocab_cmd", "mine", "MINE_EXAMPLE"),
    "split-vocab": Command("vocab_cmd", "split", "SPLIT_EXAMPLE"),
    "cam": Command("cam_cmd", "cam", "EXAMPLE"),
    "score": Command("score_cmd", "score", "SCORE_EXAMPLE"),
    "evaluate": Command("score_cmd", "evaluate_command", "EVALUATE_EXAMPLE"),
    "merge": Command("shard_cmd", "merge", "MERGE_EXAMPLE"),
    "launch": Command(
        "shard_cmd",
        "launch",
        "LAUNCH_EXAMPLE",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    ),
    "bench": Command("bench_cmd", "bench", "EXAMPLE"),
    "benchmarks": Command("benchmarks_cmd", "benchmarks", "EXAMPLE"),
    "report": Command("report_cmd", "report", "EXAMPLE"),
    "demo": Command("toy_cmd", "demo", epilog="Example: negalign demo --out demo-output"),
    "sanity": Command("toy_cmd", "sanity", epilog="Example: negalign sanity --model negalign-toy"),
    "embed": Command("embed_cmd"),
    "toy": Command("toy_cmd"),
    "cache": Command("cache_cmd"),
}

# the root's own options that may come before the command's name (each a flag: no value)
_ROOT_FLAGS = {"--debug"}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"negalign {__version__}")
        raise typer.Exit()


def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[
        bool,
        typer.Option("--debug", help=f"Show the full traceback of an error (also {DEBUG_ENV}=1)."),
    ] = False,
) -> None:
    """Zero-shot OOD detection with CLIP and negative labels."""
    if debug:
        os.environ[DEBUG_ENV] = "1"


def build_app(names: list[str] | None = None) -> typer.Typer:
    """The root with the commands ``names`` (all of them when None), in the table's order; only
    their modules are imported."""
    built = typer.Typer(
        name="negalign",
        help="Zero-shot OOD detection with CLIP and negative labels: MCM, NegLabel, NegRefine and "
        "NegAlign, with every stage cached by content.",
        epilog="Example: negalign embed texts --classes waterbird --model negalign-tiny-test --out d",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        rich_markup_mode="markdown",
        context_settings={"help_option_names": ["-h", "--help"]},
        cls=QuickGroup,
    )
    built.callback()(root)
    for name, entry in COMMANDS.items():
        if names is not None and name not in names:
            continue
        module = importlib.import_module(f"negalign_cli.cli.{entry.module}")
        if entry.function is None:
            built.add_typer(module.app, name=name)
            continue
        epilog = getattr(module, entry.epilog_attribute) if entry.epilog_attribute else entry.epilog
        built.command(name, epilog=epilog, context_settings=entry.context_settings)(
            getattr(module, entry.function)
        )
    return built


def __getattr__(name: str) -> Any:
    """``app``: the full app, built once, on first use (tests, ``launch``'s local check)."""
    if name == "app":
        full = build_app()
        globals()["app"] = full
        return full
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def named_command(argv: list[str]) -> str | None:
    """The command ``argv`` runs, when the table alone can tell: the first argument after the
    root's flags, if it is a command's name; None for anything else (the full app answers)."""
    for arg in argv:
        if arg in _ROOT_FLAGS:
            continue
        return arg if arg in COMMANDS else None
    return None


def main() -> None:
    name = named_command(sys.argv[1:])
    if name is None:
        (globals().get("app") or __getattr__("app"))()
        return
    build_app([name])()
