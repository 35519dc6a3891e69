"""A score file's rows as columns of numpy arrays, for ``evaluate``: read with pyarrow alone.

``evaluate`` needs a few columns of a score file as float64 arrays, a boolean mask or two and the
rows it keeps. Reading a parquet file through pandas costs the import of pandas (~0.5 s) and a
DataFrame of every column; a :class:`ScoreTable` reads the file's schema with
``pyarrow.parquet`` and a column the first time it is asked for (from the file opened then: a file
replaced at its path meanwhile is never mixed in), into numpy from its arrow buffers
(pyarrow's own ``to_numpy`` imports pandas). Every value is the one the DataFrame path gave
(``pd.read_parquet`` then ``pd.to_numeric(...).to_numpy(float64)``): columns of plain numeric
types (floats, integers, booleans without nulls) hold the same values and numpy casts them as
pandas did (a null is NaN, as pandas reads it); anything else (strings, nullable booleans,
categories, pandas extension types, a stored index, duplicated names) goes through pandas itself,
read the old way, so an odd file behaves exactly as before and only it pays for pandas. CSV and
TSV files are read by pandas (its type inference is the file's meaning) and wrapped.

Rows are filtered with :meth:`ScoreTable.filter` (a view: the kept positions of the file's rows),
and :meth:`ScoreTable.to_frame` gives the DataFrame the old path had, for drawing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from negalign_cli.errors import NegalignError
from negalign_cli.lazy import lazy_module

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
else:  # an `evaluate` cache hit reads no score file
    np, pd = lazy_module("numpy"), lazy_module("pandas")

# pandas' numpy dtypes a parquet column keeps when read back (pandas metadata ``numpy_type``):
# for these, the arrow buffers and numpy's cast give the values pandas gives
_PLAIN_NUMPY = {
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
}

# the numpy dtype pandas reads each plain arrow type into (no pandas metadata)
_ARROW_NUMPY = {"double": "float64", "float": "float32", "bool": "bool"} | {
    f"{sign}int{bits}": f"{sign}int{bits}" for sign in ("", "u") for bits in (8, 16, 32, 64)
}


class _Source:
    """The columns of one file, shared by every view (filtered rows, renamed columns) of it."""

    def __init__(
        self,
        path: Path | None,
        schema: Any = None,
        frame: Any = None,
        digest: str | None = None,
        handle: Any = None,
        format: str | None = None,
    ) -> None:
        self.path = path
        self.format = format  # how the file's bytes were read (``score_file_format``), when known
        # the file, opened once (a pyarrow NativeFile): every column and the frame are read from
        # it, so a file replaced at ``path`` meanwhile (a new `score --out`) is never mixed in
        self.handle = handle
        self.schema = schema  # the parquet file's arrow schema, or None (then ``frame`` holds the rows)
        self.digest = digest  # the file's sha256, when known: figure keys and summaries name it
        self._frame = frame
        self.kinds: dict[str, str] = {}  # column → its arrow type name, for plain numeric types
        self.arrow: dict[str, Any] = {}  # the columns read so far (a column is read when first used)
        self.numeric: dict[str, np.ndarray] = {}  # converted columns, every row of the file
        self.bools: dict[str, np.ndarray] = {}

    def column(self, name: str) -> Any:
        """Column ``name`` of the parquet file (a ChunkedArray), read on first use."""
        if name not in self.arrow:
            import pyarrow.parquet as pq

            try:
                with pq.ParquetFile(self.handle if self.handle is not None else self.path) as handle:
                    self.arrow[name] = handle.read(columns=[name]).column(0)
            except Exception as exc:  # a damaged column chunk
                raise NegalignError(
                    f"cannot read score file {self.path}: {str(exc).splitlines()[0][:160]}"
                ) from exc
        return self.arrow[name]

    def plain(self, name: str) -> str | None:
        """The arrow type of column ``name`` when it is a plain number (a boolean one only
        without nulls), else None."""
        kind = self.kinds.get(name)
        if kind == "bool" and self.column(name).null_count:
            return None
        return kind

    def frame(self) -> pd.DataFrame:
        """The file as the DataFrame path read it (``pd.read_parquet``), every row."""
        if self._frame is None:
            assert self.path is not None  # a table made from a frame has one
            self._frame = pd.read_parquet(self.handle if self.handle is not None else self.path)
        return self._frame


class ScoreTable:
    """The rows of a score file (or of a DataFrame) ``evaluate`` works on; see the module doc."""

    def __init__(
        self, source: _Source, names: list[str], origin: dict[str, str], n: int, rows: np.ndarray | None
    ) -> None:
        self._source = source
        self.columns = names  # the column names, in the file's order (the DataFrame's)
        self._origin = origin  # column → the source column holding its values (group seeds)
        self._n = n
        self._rows = rows  # kept positions in the file, or None for every row
        self.usable: dict[str, bool] = {}  # column → whether it holds a number (a summary's, cached)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_frame(
        cls, frame: pd.DataFrame, digest: str | None = None, format: str | None = None
    ) -> ScoreTable:
        """A table over a DataFrame (its values converted by pandas, exactly as before); ``digest``:
        the sha256 of the file it was read from, if any, and ``format``: how it was read."""
        names = list(frame.columns)
        source = _Source(None, frame=frame, digest=digest, format=format)
        return cls(source, names, {c: c for c in names}, len(frame), None)

    @classmethod
    def read(cls, path: Path, digest: str | None = None) -> ScoreTable:
        """A score file: parquet by pyarrow, CSV/TSV by pandas. Refused as ``evaluate`` refuses
        it: missing, unreadable or without rows. ``digest``: the file's sha256, when known."""
        if not path.is_file():
            raise NegalignError(f"score file not found: {path}")
        kind = score_file_format(path)
        try:
            if kind == "parquet":
                table = _read_parquet(path, digest)
            else:
                table = cls.from_frame(pd.read_csv(path, sep=CSV_SEPARATORS[kind]), digest, kind)
        except NegalignError:
            raise
        except Exception as exc:  # pandas/pyarrow raise many types for a broken file
            raise NegalignError(f"cannot read score file {path}: {str(exc).splitlines()[0][:160]}") from exc
        if table.empty:
            raise NegalignError(f"score file {path} has no rows")
        return table

    # ------------------------------------------------------------------ shape
    def __len__(self) -> int:
        return self._n

    @property
    def empty(self) -> bool:
        """As ``DataFrame.empty``: no rows or no columns."""
        return self._n == 0 or not self.columns

    @property
    def rows(self) -> np.ndarray:
        """The positions of the kept rows in the file (int64)."""
        return np.arange(self._n, dtype=np.int64) if self._rows is None else self._rows

    def row_label(self, position: int) -> Any:
        """The DataFrame index label of the kept row at ``position`` (a stored RangeIndex's)."""
        row = int(self.rows[position])
        source = self._source
        if source.schema is None:
            return source.frame().index[row]
        return _range_label(source.schema, row)

    def filter(self, keep: np.ndarray) -> ScoreTable:
        """The rows where the boolean mask ``keep`` is True (as ``frame[keep]``)."""
        kept = self.rows[np.asarray(keep, dtype=bool)]
        return ScoreTable(self._source, self.columns, self._origin, int(kept.size), kept)

    def with_columns(self, values: Mapping[str, str]) -> ScoreTable:
        """Column ``new`` holding the values of column ``old`` for each ``new → old`` of ``values``
        (as ``frame.assign(new=frame[old])``: an existing name keeps its place, a new one is last)."""
        names = self.columns + [c for c in values if c not in self.columns]
        origin = {**self._origin, **{new: self._origin[old] for new, old in values.items()}}
        return ScoreTable(self._source, names, origin, self._n, self._rows)

    # ------------------------------------------------------------------ values
    def plain(self, name: str) -> bool:
        """Whether column ``name`` is a plain numeric one (converted without pandas)."""
        return self._source.plain(self._origin[name]) is not None

    def numeric(self, name: str, errors: str = "coerce") -> np.ndarray:
        """``pd.to_numeric(frame[name], errors=errors).to_numpy(dtype=float64)`` of the kept rows
        (read only: a plain column's array is shared)."""
        if self.plain(name):
            return self._kept(self._plain_numeric(self._origin[name]))
        return pd.to_numeric(self.series(name), errors=errors).to_numpy(dtype=np.float64)  # type: ignore[call-overload]

    def bools(self, name: str) -> np.ndarray:
        """A boolean column without nulls (``plain`` and of arrow type bool) as a bool array."""
        source, column = self._source, self._origin[name]
        if column not in source.bools:
            array = _numpy(source.column(column))
            array.flags.writeable = False
            source.bools[column] = array
        return self._kept(source.bools[column])

    def integers(self, name: str) -> np.ndarray:
        """A plain integer column's kept values as int64 (``to_numpy(dtype=int64)``); only for a
        column without nulls (``has_nulls``)."""
        return self._kept(_numpy(self._source.column(self._origin[name]))).astype(np.int64)

    def has_nulls(self, name: str) -> bool:
        """Whether a plain column holds a null in any row of the file (kept or not)."""
        return bool(self._source.column(self._origin[name]).null_count)

    def kind(self, name: str) -> str | None:
        """The arrow type of a plain column (``bool``, ``double``, ``int64`` …), None otherwise."""
        return self._source.plain(self._origin[name])

    def series(self, name: str) -> pd.Series:
        """The kept rows of column ``name`` as the DataFrame path had them (imports pandas)."""
        frame = self._source.frame()
        column = frame[self._origin[name]]
        return column if self._rows is None else column.iloc[self._rows]

    def to_frame(self) -> pd.DataFrame:
        """The DataFrame the old path had: the file's frame, renamed columns assigned, rows kept."""
        frame = self._source.frame()
        renamed = {new: old for new, old in self._origin.items() if new != old}
        if renamed:
            frame = frame.assign(**{new: frame[old] for new, old in renamed.items()})
        return frame if self._rows is None else frame.iloc[self._rows]

    @property
    def digest(self) -> str | None:
        """The sha256 of the file the rows come from, when known."""
        return self._source.digest

    @property
    def file_key(self) -> str | None:
        """What a cache key records of the file: its sha256 and, unless parquet, how it was read
        (the same bytes named .csv and .tsv are different tables). None when the digest is unknown."""
        digest, kind = self._source.digest, self._source.format
        return digest if digest is None or kind in (None, "parquet") else f"{kind}:{digest}"

    def origin(self, name: str) -> str:
        """The file's column holding column ``name``'s values (another for a group seed's)."""
        return self._origin[name]

    def rows_digest(self) -> str:
        """Which rows of the file are kept: ``all``, or the sha256 of their positions."""
        if self._rows is None:
            return "all"
        return hashlib.sha256(np.ascontiguousarray(self._rows, dtype=np.int64).tobytes()).hexdigest()

    def _kept(self, full: np.ndarray) -> np.ndarray:
        return full if self._rows is None else full[self._rows]

    def _plain_numeric(self, column: str) -> np.ndarray:
        source = self._source
        if column not in source.numeric:
            array = _numpy(source.column(column)).astype(np.float64, copy=False)
            array.flags.writeable = False
            source.numeric[column] = array
        return source.numeric[column]


def as_table(frame: Any) -> ScoreTable:
    """``frame`` as a ScoreTable (a DataFrame is wrapped; a table is itself)."""
    return frame if isinstance(frame, ScoreTable) else ScoreTable.from_frame(frame)


def _numpy(column: Any) -> np.ndarray:
    """A plain column's values as numpy, read from its arrow buffers (pyarrow's ``to_numpy``
    imports pandas): the values as stored, and where a row is null NaN in float64 (integers with
    nulls become float64, as pandas reads them). Only for the types of ``_ARROW_NUMPY``."""
    kind = str(column.type)
    parts = []
    for chunk in column.chunks:
        size, offset = len(chunk), chunk.offset
        if size == 0:
            continue
        validity, data = chunk.buffers()[:2]
        if kind == "bool":
            values = _bits(data, offset, size)
        else:
            dtype = np.dtype(_ARROW_NUMPY[kind])
            values = np.frombuffer(data, dtype=dtype, count=offset + size)[offset:]
        if chunk.null_count:
            values = values.astype(np.float64)
            values[~_bits(validity, offset, size)] = np.nan
        parts.append(values)
    if not parts:
        return np.empty(0, dtype=np.dtype(_ARROW_NUMPY[kind]))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _bits(buffer: Any, offset: int, size: int) -> np.ndarray:
    """Arrow's bit-packed booleans (least significant bit first) as a bool array."""
    packed = np.frombuffer(buffer, dtype=np.uint8, count=(offset + size + 7) // 8)
    return np.unpackbits(packed, bitorder="little", count=offset + size)[offset:].astype(bool)


def _pandas_metadata(schema: Any) -> dict | None:
    raw = (schema.metadata or {}).get(b"pandas")
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        return {"odd": True}
    return meta if isinstance(meta, dict) else {"odd": True}


CSV_SEPARATORS = {"csv": ",", "tsv": "\t"}


def score_file_format(path: Path) -> str:
    """How a score file's bytes are read, by its suffix: ``parquet`` (.parquet, .pq), ``tsv``
    (.tsv, .tab) or ``csv`` (any other name)."""
    suffix = path.suffix.lower()
    return "parquet" if suffix in (".parquet", ".pq") else "tsv" if suffix in (".tsv", ".tab") else "csv"


def _read_parquet(path: Path, digest: str | None = None) -> ScoreTable:
    """A parquet score file through pyarrow (``ParquetFile``: ``pq.read_table`` imports pandas):
    its schema now, each column when first used. Files pandas would read into something other
    than plain named columns over a RangeIndex (a stored index, column levels, non-string names,
    duplicated names) are read by pandas, as before."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    opened = pa.OSFile(str(path))  # kept open: the columns read later come from this file
    try:
        with pq.ParquetFile(opened) as handle:  # (a ParquetFile given an open file leaves it open)
            schema, rows = handle.schema_arrow, handle.metadata.num_rows
    except BaseException:  # not a parquet file: the error is reported, the file closed now
        opened.close()
        raise
    names = list(schema.names)
    meta = _pandas_metadata(schema)
    numpy_types: dict[str, str] = {}
    odd = len(set(names)) != len(names)
    if meta is not None:
        index = meta.get("index_columns", [])
        odd |= bool(meta.get("odd")) or not isinstance(index, list)
        odd |= any(not (isinstance(i, dict) and i.get("kind") == "range") for i in index or [])
        odd |= len(meta.get("column_indexes") or []) > 1
        for entry in meta.get("columns") or []:
            if not isinstance(entry, dict):
                odd = True
                continue
            name, field = entry.get("name"), entry.get("field_name", entry.get("name"))
            odd |= name != field or not isinstance(name, str)
            if isinstance(field, str):
                numpy_types[field] = str(entry.get("numpy_type"))
    if odd:
        return ScoreTable.from_frame(pd.read_parquet(opened), digest, "parquet")
    source = _Source(path, schema=schema, digest=digest, handle=opened, format="parquet")
    for name in names:
        kind = str(schema.field(name).type)
        if kind in _ARROW_NUMPY and numpy_types.get(name, _ARROW_NUMPY[kind]) in _PLAIN_NUMPY:
            source.kinds[name] = kind
    return ScoreTable(source, names, {c: c for c in names}, rows, None)


def _range_label(schema: Any, row: int) -> int:
    """The index label pandas gives row ``row`` of a parquet file (its stored RangeIndex, else
    the position)."""
    meta = _pandas_metadata(schema) or {}
    for index in meta.get("index_columns") or []:
        if isinstance(index, dict) and index.get("kind") == "range":
            return int(index.get("start", 0)) + int(index.get("step", 1)) * row
    return row
