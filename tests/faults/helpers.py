"""Shared by the fault suite: the CLI in-process, and what a good failure looks like."""

from __future__ import annotations

from typer.testing import CliRunner

from negalign_cli.cli.app import app
from tests.helpers import TINY

runner = CliRunner()
MODEL_COMMANDS = {"embed", "cam", "score", "split-vocab", "mine-negatives"}


def cli(*args: str, env: dict | None = None):
    """`negalign ARGS` in this process; model commands get the tiny test model unless told."""
    argv = list(args)
    if argv and argv[0] in MODEL_COMMANDS and "--model" not in argv:
        argv += TINY
    return runner.invoke(app, argv, env={"COLUMNS": "200", **(env or {})})


def one_line_error(result, text: str, code: int = 2) -> str:
    """The command failed with exit ``code``, no traceback, and one `error:` line holding ``text``."""
    output = result.output
    assert result.exit_code == code, f"exit {result.exit_code}, wanted {code}:\n{output}"
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    after = output.split(errors[0], 1)[1].strip()
    assert after == "", f"the error continues past its line: {after!r}"
    return errors[0]
