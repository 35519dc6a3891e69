"""`negalign CMD` builds only CMD (issue 21: every cache hit is a whole process, its start-up counts).

``main()`` looks the command up in ``app.COMMANDS`` and builds a root holding only it; the full app
answers what the table cannot (no arguments, root ``--help``/``--version``, unknown names). Pinned
here: every lazily built command equals the full app's (its click parameters, help and epilog), an
unknown name fails as before, and a fresh `negalign models` imports no other command's module.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer
import typer.core
from typer.testing import CliRunner

from negalign_cli.cli import app as app_module
from negalign_cli.cli.app import COMMANDS, app, build_app, named_command

runner = CliRunner()


def _commands(command, prefix=()):
    """(path, click command) for every command and group under ``command``."""
    yield prefix, command
    if isinstance(command, typer.core.TyperGroup):
        for name, child in command.commands.items():
            yield from _commands(child, (*prefix, name))


def _param_signature(param) -> tuple:
    return (
        type(param).__name__,
        param.name,
        tuple(param.opts),
        tuple(param.secondary_opts),
        param.required,
        repr(param.default),
        param.multiple,
        param.nargs,
        param.is_flag if isinstance(param, typer.core.TyperOption) else None,
        param.count if isinstance(param, typer.core.TyperOption) else None,
        getattr(param, "help", None),
        repr(param.envvar),
        param.hidden if isinstance(param, typer.core.TyperOption) else None,
        repr(param.type_descriptor.annotation),
        param.is_eager,
        getattr(param.callback, "__qualname__", None),
    )


def _command_signature(command) -> tuple:
    return (
        type(command).__name__,
        command.name,
        command.help,
        command.epilog,
        command.short_help,
        command.no_args_is_help,
        tuple(sorted(command.context_settings.items())),
        getattr(command.callback, "__qualname__", None),
        tuple(_param_signature(p) for p in command.params),
    )


def test_the_table_names_every_command_of_the_full_app():
    full = typer.main.get_command(app)
    assert list(full.commands) == list(COMMANDS)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_lazily_built_command_equals_the_full_apps(name):
    """The root built for one command holds that command (and, for a group, its subcommands)
    with the same parameters, help, epilog and settings as the full app, and the same root."""
    full = typer.main.get_command(app)
    lazy = typer.main.get_command(build_app([name]))
    assert list(lazy.commands) == [name]  # type: ignore[attr-defined]
    assert _command_signature(lazy)[:-1] == _command_signature(full)[:-1]  # the root, less its commands
    assert [_param_signature(p) for p in lazy.params] == [_param_signature(p) for p in full.params]
    wanted = dict(_commands(full.commands[name], (name,)))  # type: ignore[attr-defined]
    got = dict(_commands(lazy.commands[name], (name,)))  # type: ignore[attr-defined]
    assert list(got) == list(wanted)
    for path, command in wanted.items():
        assert _command_signature(got[path]) == _command_signature(command), path


def test_each_help_page_is_the_same_lazily_built():
    full = typer.main.get_command(app)
    for path, _ in _commands(full):
        if not path:
            continue
        args = [*path, "--help"]
        lazy = runner.invoke(build_app([path[0]]), args, env={"COLUMNS": "200"})
        whole = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert (lazy.exit_code, lazy.output) == (whole.exit_code, whole.output), path


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["models"], "models"),
        (["--debug", "embed", "texts"], "embed"),
        (["cache", "ls", "--help"], "cache"),
        ([], None),
        (["--help"], None),
        (["-h", "models"], None),
        (["--version"], None),
        (["--debug"], None),
        (["modles"], None),
        (["--no-such-flag", "models"], None),
        (["--", "models"], None),
    ],
)
def test_what_main_builds_lazily(argv, name):
    assert named_command(argv) == name


def _main(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    """``main()`` as the console script runs it: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["negalign", *argv])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_info:
        app_module.main()
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return (code if isinstance(code, int) else (0 if code is None else 1)), out, err


def test_an_unknown_command_fails_as_it_did(monkeypatch, capsys):
    """Click's own error, with its suggestion, from the full app; exit 2."""
    code, _, err = _main(monkeypatch, capsys, "modles")
    assert code == 2
    assert "No such command 'modles'" in err and "models" in err.split("No such command", 1)[1]
    expected = runner.invoke(app, ["modles"], env={"COLUMNS": "200"})
    assert expected.exit_code == 2
    assert "Did you mean 'models'?" in err

    def box(text: str) -> str:  # the error itself; the usage line names the program as it was started
        return " ".join(text[text.index("for help.") :].split())

    assert box(err) == box(expected.output)


def test_an_unknown_subcommand_fails_as_it_did(monkeypatch, capsys):
    code, _, err = _main(monkeypatch, capsys, "--debug", "embed", "imagez")
    assert code == 2
    assert "No such command 'imagez'" in err and "images" in err.split("No such command", 1)[1]
    assert "negalign embed [OPTIONS] COMMAND" in err


def test_version_debug_and_a_lazy_command_through_main(monkeypatch, capsys):
    code, out, _ = _main(monkeypatch, capsys, "--version")
    assert (code, out.strip()) == (0, f"negalign {app_module.__version__}")
    monkeypatch.delenv("NEGALIGN_DEBUG", raising=False)
    code, out, _ = _main(monkeypatch, capsys, "--debug", "models", "--names", "--filter", "negalign-tiny")
    assert (code, out.split()) == (0, ["negalign-tiny-test"])
    import os

    assert os.environ.get("NEGALIGN_DEBUG") == "1"  # --debug before a lazily built command still counts


def test_a_command_imports_only_its_own_module():
    """A fresh `negalign models` (the console script's main) imports models_cmd and none of the
    other command modules; `negalign --help` still imports them all (it lists every command)."""
    probe = (
        "import sys\n"
        "from negalign_cli.cli.app import main, COMMANDS\n"
        "sys.argv = ['negalign', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "names = sorted({f'negalign_cli.cli.{c.module}' for c in COMMANDS.values()})\n"
        "print('IMPORTED', ','.join(n for n in names if n in sys.modules))\n"
        "print('PYDANTIC' if 'pydantic' in sys.modules else 'NO-PYDANTIC')\n"
    )

    def imported(*argv: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True, timeout=120
        )
        line = next(line for line in done.stdout.splitlines() if line.startswith("IMPORTED"))
        return line.split(" ", 1)[1].split(",") if " " in line else []

    assert imported("models", "--names") == ["negalign_cli.cli.models_cmd"]
    assert imported("--help") == sorted({f"negalign_cli.cli.{c.module}" for c in COMMANDS.values()})


SAMPLES = [
    "3",
    "-1",
    "0",
    "007",
    "1.5",
    "-0.25",
    "abc",
    "",
    " 4",
    "fp16",
    "FP16",
    "bf16",
    "auto",
    "on",
    "/tmp",
    "a\x00b",
    "1e3",
    2,
    2.5,
    -3,
]


def _outcome(coercion, param, value, ctx):
    try:
        result = coercion.coerce(value, param=param, ctx=ctx)
    except Exception as exc:  # noqa: BLE001 - the error itself is compared
        return ("error", type(exc).__name__, getattr(exc, "message", str(exc)))
    return ("value", type(result), result)


def test_quick_coercion_equals_typers_for_every_parameter(tmp_path):
    """Every parameter of every command, its default and a spread of command-line strings: the
    value (and its type) or the error is the one Typer's pydantic coercion gives."""
    import typer._click
    from typer._coercion import build_runtime_param

    from negalign_cli.cli.quickparams import QuickCoercion

    unreadable = tmp_path / "locked"
    unreadable.write_text("x")
    unreadable.chmod(0)
    compared = quick = 0
    for path, command in _commands(typer.main.get_command(app)):
        ctx = typer._click.Context(command, info_name="negalign")
        for param in command.params:
            values = [param.default, None, *SAMPLES, str(tmp_path), str(unreadable)]
            if param.multiple:
                values += [("a", "b"), (), ["x"], ("a", 1)]
            for value in values:
                if type(value) is bool:
                    continue  # a flag's bool never reaches the coercion
                full = build_runtime_param(param.type_descriptor)
                want = _outcome(full, param, value, ctx)
                got = _outcome(QuickCoercion(param), param, value, ctx)
                assert got == want, (path, param.name, value)
                compared += 1
                from negalign_cli.cli import quickparams

                if value is not None and quickparams.quick_value(param, value, ctx) is not quickparams._PASS:
                    quick += 1
    assert compared > 1000 and quick > 300  # most defaults and plain strings take the quick path


def test_a_command_run_imports_no_pydantic(tmp_path):
    """A fresh `negalign toy generate` (ints with bounds, a float, a Path, a count, flags) parses
    every parameter without pydantic, and writes what it writes with Typer's coercion."""
    probe = (
        "import sys\n"
        "from negalign_cli.cli.app import main\n"
        "sys.argv = ['negalign', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    print('EXIT', exc.code)\n"
        "print('PYDANTIC' if 'pydantic' in sys.modules else 'NO-PYDANTIC')\n"
    )
    argv = ["toy", "generate", "--out", str(tmp_path / "toy"), "--n-id", "2", "--n-ood", "1", "-q"]
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120)
    assert "EXIT 0" in done.stdout and done.stdout.split()[-1] == "NO-PYDANTIC", done.stdout + done.stderr
    assert (tmp_path / "toy" / "classes.txt").exists()
    # a bad value still gets Typer's own message (through pydantic), exit 2
    bad = subprocess.run(
        [sys.executable, "-c", probe, *argv[:4], "--n-id", "1"], capture_output=True, text=True, timeout=120
    )
    assert "EXIT 2" in bad.stdout and "--n-id" in bad.stderr and "greater than or equal to 2" in bad.stderr
