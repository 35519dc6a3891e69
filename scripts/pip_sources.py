"""Print, one per line, the uv options that name the package sources pip is set up with.

Reads ``pip config list`` output on stdin (pip's own view of its files and PIP_* variables, e.g.
``:env:.find-links='/opt/wheels'``): find-links, index-url, extra-index-url, constraint and no-index
become ``--find-links DIR``, ``--index-url URL`` and so on, since uv does not read pip's settings.
Used by scripts/install.sh.
"""

from __future__ import annotations

import sys

FLAGS = {
    "find-links": "--find-links",
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "constraint": "--constraint",
    "no-index": "--no-index",
}


# pip's precedence: the site's file over the user's over the global one, PIP_* variables over all
RANK = {"global": 0, "user": 1, "site": 2, ":env:": 3}


def uv_options(config: str) -> list[str]:
    """The uv options for ``pip config list`` output ``config``; of a name set in several places,
    the value pip would use."""
    seen: dict[str, tuple[int, list[str]]] = {}
    for line in config.splitlines():
        key, _, value = line.partition("=")
        scope, _, name = key.strip().rpartition(".")
        rank = RANK.get(scope, 0)
        if name in FLAGS and value.strip() and rank >= seen.get(name, (-1, []))[0]:
            seen[name] = (rank, value.strip().strip("'\"").split())
    options: list[str] = []
    for name, (_, values) in seen.items():
        if name == "no-index":
            options += [FLAGS[name]] if values[0].lower() in ("1", "true", "yes", "on") else []
        else:
            for value in values:
                options += [FLAGS[name], value]
    return options


if __name__ == "__main__":
    print("\n".join(uv_options(sys.stdin.read())))
