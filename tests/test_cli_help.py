"""Every command's --help: walked from the Typer tree, so a new command cannot be forgotten."""

from __future__ import annotations

import subprocess
import sys

import typer
import typer.core
from typer.testing import CliRunner

from negalign_cli.cli.app import app

runner = CliRunner()


def command_paths() -> list[list[str]]:
    """Every command and group under the root, as argument lists (groups included)."""
    root = typer.main.get_command(app)
    paths: list[list[str]] = []

    def walk(command, prefix: list[str]) -> None:
        paths.append(prefix)
        if isinstance(command, typer.core.TyperGroup):
            for name, child in sorted(command.commands.items()):
                walk(child, [*prefix, name])

    walk(root, [])
    return paths


def test_the_tree_holds_every_command():
    names = {" ".join(p) for p in command_paths()}
    for expected in (
        "embed texts",
        "embed images",
        "cam",
        "score",
        "evaluate",
        "cache gc",
        "toy report",
        "demo",
    ):
        assert expected in names
    assert len(names) >= 18


def test_every_help_page_has_an_example_and_describes_every_option():
    for path in command_paths():
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        assert "Example" in result.output, f"`negalign {' '.join(path)} --help` shows no example"
        command = typer.main.get_command(app)
        for name in path:
            command = command.commands[name]  # type: ignore[attr-defined]
        options = [p for p in command.params if isinstance(p, typer.core.TyperOption) and not p.hidden]
        assert options or not path or isinstance(command, typer.core.TyperGroup), path
        for parameter in options:
            assert parameter.help, f"`negalign {' '.join(path)}` option {parameter.opts} has no help text"


def test_help_imports_no_torch():
    """`negalign --help` and every `negalign CMD --help` start without torch (speed is measured by
    benchmarks/cli_startup.py, not here)."""
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from negalign_cli.cli.app import app\n"
        "from tests.test_cli_help import command_paths\n"
        "runner = CliRunner()\n"
        "for path in command_paths():\n"
        "    assert runner.invoke(app, [*path, '--help']).exit_code == 0, path\n"
        "heavy = [m for m in ('torch', 'sklearn', 'pandas', 'matplotlib', 'open_clip') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"--help imported {result.stdout.strip()}"


def test_every_argument_has_help_text():
    """Positional arguments (cache info KEY, ...) are described like options."""
    root = typer.main.get_command(app)
    for path in command_paths():
        command = root
        for name in path:
            command = command.commands[name]  # type: ignore[attr-defined]
        for parameter in command.params:
            if isinstance(parameter, typer.core.TyperArgument):
                assert parameter.help, (
                    f"`negalign {' '.join(path)}` argument {parameter.name} has no help text"
                )


def test_demo_help_names_the_cache_the_demo_writes(tmp_path):
    """`negalign demo` keeps its cache under --out (demo-output/cache), and says so."""
    result = runner.invoke(app, ["demo", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "else OUT/cache, i.e. demo-output/cache" in text and ".negalign-cache" not in text
