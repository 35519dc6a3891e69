"""The ``negalign`` command: one Typer app, one module per command group."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from negalign_cli import __version__
from negalign_cli.cli import (
    bench_cmd,
    benchmarks_cmd,
    cache_cmd,
    cam_cmd,
    embed_cmd,
    models_cmd,
    report_cmd,
    score_cmd,
    shard_cmd,
    toy_cmd,
    vocab_cmd,
)
from negalign_cli.defaults import DEBUG_ENV

app = typer.Typer(
    name="negalign",
    help="Zero-shot OOD detection with CLIP and negative labels: MCM, NegLabel, NegRefine and NegAlign, "
    "with every stage cached by content.",
    epilog="Example: negalign embed texts --classes waterbird --model negalign-tiny-test --out d",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"negalign {__version__}")
        raise typer.Exit()


@app.callback()
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


app.command("models", epilog=models_cmd.EXAMPLE)(models_cmd.models)
app.command("mine-negatives", epilog=vocab_cmd.MINE_EXAMPLE)(vocab_cmd.mine)
app.command("split-vocab", epilog=vocab_cmd.SPLIT_EXAMPLE)(vocab_cmd.split)
app.command("cam", epilog=cam_cmd.EXAMPLE)(cam_cmd.cam)
app.command("score", epilog=score_cmd.SCORE_EXAMPLE)(score_cmd.score)
app.command("evaluate", epilog=score_cmd.EVALUATE_EXAMPLE)(score_cmd.evaluate_command)
app.command("merge", epilog=shard_cmd.MERGE_EXAMPLE)(shard_cmd.merge)
app.command(
    "launch",
    epilog=shard_cmd.LAUNCH_EXAMPLE,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)(shard_cmd.launch)
app.command("bench", epilog=bench_cmd.EXAMPLE)(bench_cmd.bench)
app.command("benchmarks", epilog=benchmarks_cmd.EXAMPLE)(benchmarks_cmd.benchmarks)
app.command("report", epilog=report_cmd.EXAMPLE)(report_cmd.report)
app.command("demo", epilog="Example: negalign demo --out demo-output")(toy_cmd.demo)
app.command("sanity", epilog="Example: negalign sanity --model negalign-toy")(toy_cmd.sanity)
app.add_typer(embed_cmd.app, name="embed")
app.add_typer(toy_cmd.app, name="toy")
app.add_typer(cache_cmd.app, name="cache")


def main() -> None:
    app()
