"""scripts/pip_sources.py: the package sources pip is set up with, as uv options (make install)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pip_sources.py"
spec = importlib.util.spec_from_file_location("pip_sources", SCRIPT)
assert spec is not None and spec.loader is not None
pip_sources = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pip_sources)


def test_pip_config_list_becomes_uv_options():
    config = "\n".join(
        [
            ":env:.cert='/etc/ssl/certs/ca-certificates.crt'",
            ":env:.find-links='/opt/wheels'",
            "global.constraint='/etc/xdg/pip/constraints.txt'",
            "global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'",
            "global.find-links='/elsewhere'",
            "user.timeout='60'",
        ]
    )
    assert pip_sources.uv_options(config) == [
        "--find-links",
        "/opt/wheels",  # PIP_FIND_LINKS over the file's, as pip has it
        "--constraint",
        "/etc/xdg/pip/constraints.txt",
        "--extra-index-url",
        "file:///opt/a/simple",
        "--extra-index-url",
        "file:///opt/b/simple",
    ]


def test_no_index_and_nothing_set():
    assert pip_sources.uv_options("global.no-index='true'\nglobal.index-url='file:///x'") == [
        "--no-index",
        "--index-url",
        "file:///x",
    ]
    assert pip_sources.uv_options("global.no-index='false'") == []
    assert pip_sources.uv_options("") == []
