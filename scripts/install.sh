#!/usr/bin/env bash
# `make install`: negalign in editable mode with its dev tools into the venv at $1, torch pinned ($2).
# Usage: scripts/install.sh VENV_BIN "torch==X torchvision==Y"
#
# It installs with uv when uv can be had (pip installs it into the venv first): uv unpacks the
# torch wheels (about 4 GB with the CUDA libraries) in parallel, so a fresh install takes about 26 s
# on a 2-core machine when uv's cache already holds the wheels, against 110-138 s with pip
# (docs/performance.md). uv does not read pip's configuration, so the package sources pip is set up
# with (find-links, index URLs, constraints: pip config list and PIP_* variables) are handed to it.
# Bytecode is compiled at install (--compile-bytecode), as pip does: where PYTHONDONTWRITEBYTECODE
# is set, nothing compiles it later, and every process would compile torch again (an import of torch
# and open_clip took 10 s instead of 4.5 s); negalign_cli's own modules are compiled too. Should uv be
# missing or fail, pip does the install.
set -euo pipefail
BIN=$1
read -r -a PINS <<<"$2"
PY="$BIN/python"
# NEGALIGN_BYTECODE=lazy leaves the compiling to the first import of each module: only for a run
# that writes bytecode (PYTHONDONTWRITEBYTECODE unset), as .ci/run does; the first processes then
# compile what they import, and nothing else is compiled.
UV_COMPILE=(--compile-bytecode)
PIP_COMPILE=()
if [ "${NEGALIGN_BYTECODE:-}" = lazy ]; then
    UV_COMPILE=()
    PIP_COMPILE=(--no-compile)
fi
if [ "${NEGALIGN_INSTALL_WITH:-uv}" = uv ] && "$PY" -m pip install -q uv 2>/dev/null; then
    mapfile -t SOURCES < <("$PY" -m pip config list | "$PY" scripts/pip_sources.py)
    # unsafe-best-match: the newest fitting version from any source, as pip chooses
    if "$BIN/uv" pip install -q --python "$PY" --index-strategy unsafe-best-match "${UV_COMPILE[@]}" "${SOURCES[@]}" \
        -e '.[dev]' "${PINS[@]}"; then
        INSTALLED=uv
    else
        echo "install: uv failed; installing with pip instead" >&2
    fi
fi
[ -n "${INSTALLED:-}" ] || "$PY" -m pip install -q "${PIP_COMPILE[@]}" -e '.[dev]' "${PINS[@]}"
# The package itself is installed in editable mode, from this folder, which neither installer compiles.
[ "${NEGALIGN_BYTECODE:-}" = lazy ] || "$PY" -m compileall -q negalign_cli >/dev/null
