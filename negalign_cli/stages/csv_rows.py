"""Rows of dicts to CSV without pandas, byte for byte what ``pd.DataFrame(rows).to_csv(path,
index=False, float_format=...)`` writes for the values ``evaluate`` puts in metrics.csv and
table.csv (str, float, int, bool and None; ``tests/test_lambda_grid_read.py`` compares the two).

pandas builds one column per key (in the order keys first appear), infers its type from the
values (a key missing from a row is NaN) and formats each type its own way: a float column (floats
and ints, with None or NaN as missing) with ``float_format`` or Python's shortest repr, an integer
column with ``str``, a boolean one as True/False, anything else (text, a mix) with ``str``; a
missing value is an empty field. Then Python's ``csv`` module writes the fields (minimal quoting,
``\\n`` line ends).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any

_ABSENT = object()


def _missing(value: Any) -> bool:
    return value is None or value is _ABSENT or (isinstance(value, float) and math.isnan(value))


def _column(values: list[Any], float_format: str | None) -> list[str]:
    present = [v for v in values if not _missing(v)]
    if present and all(isinstance(v, bool) for v in present) and len(present) == len(values):
        return [str(bool(v)) for v in values]
    if present and all(isinstance(v, Real) and not isinstance(v, bool) for v in present):
        if len(present) == len(values) and all(isinstance(v, Integral) for v in present):
            return [str(int(v)) for v in values]  # an integer column
        return ["" if _missing(v) else _float(float(v), float_format) for v in values]
    return ["" if _missing(v) else str(v) for v in values]


def _float(value: float, float_format: str | None) -> str:
    if math.isnan(value):
        return ""
    return float_format % value if float_format is not None else repr(value)


def rows_csv(rows: Sequence[dict[str, Any]], float_format: str | None = None) -> str:
    """The CSV text of ``rows`` (see the module doc)."""
    if not rows:
        return "\n"  # pandas writes an empty frame as one empty line
    names = list(dict.fromkeys(key for row in rows for key in row))
    columns = [_column([row.get(name, _ABSENT) for row in rows], float_format) for name in names]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow([str(name) for name in names])
    writer.writerows(zip(*columns, strict=True))
    return out.getvalue()


def write_rows_csv(path: Path, rows: Sequence[dict[str, Any]], float_format: str | None = None) -> None:
    """Write ``rows_csv(rows, float_format)`` to ``path`` (UTF-8)."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(rows_csv(rows, float_format))
