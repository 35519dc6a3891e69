"""`evaluate` reads parquet score files with pyarrow alone (issue 21): its row filters, per-file
statistics, accuracy, metrics and figure data come from numpy arrays (``stages/score_table.py``),
and a run with a new λ grid imports neither pandas nor scikit-learn, scipy or matplotlib.

The array path is checked for equality against the DataFrame path it replaced: the same stage
code over a ``ScoreTable`` that wraps ``pd.read_parquet``'s frame (every value converted by the
pandas calls the stage made before), on odd files: NaN and inf, invalid CAMs, ties, integer,
float32, string and nullable columns, several row groups, a stored RangeIndex, duplicated column
names, empty sets, labels of each kind, group seeds.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from negalign_cli.errors import NegalignError
from negalign_cli.reporting import RecordingReporter
from negalign_cli.stages.csv_rows import rows_csv
from negalign_cli.stages.evaluation import (
    EvaluateRequest,
    _drawn_values,
    _run,
    _Seeds,
    read_score_file,
    read_score_table,
    roc_curves,
)
from negalign_cli.stages.score_table import ScoreTable, _numpy
from tests.faults.helpers import cli
from tests.helpers import IMPORT_SPY
from tests.helpers.synthetic import score_frame, write_scores

ROOT = Path(__file__).resolve().parents[1]
SCORES = ("s_mcm", "s_energy", "s_maxlogit", "s_neglabel_plain", "s_neglabel_star", "s_multimatch", "p_align")


def _frame(n: int, seed: int, shift: float) -> pd.DataFrame:
    return score_frame(n, seed, shift, invalid=0.2)


def _odd(case: str, frame: pd.DataFrame, seed: int) -> pd.DataFrame | pa.Table:
    """``frame`` made odd as ``case`` says (a DataFrame, or an arrow table for what pandas cannot
    write)."""
    n = len(frame)
    rng = np.random.default_rng(100 + seed)
    some = rng.uniform(size=n) < 0.15
    if case == "nan and inf, dropped":
        frame.loc[some, "s_neglabel_star"] = np.nan
        frame.loc[rng.uniform(size=n) < 0.05, "p_align"] = np.inf
        frame.loc[rng.uniform(size=n) < 0.05, "s_mcm"] = -np.inf
    elif case == "invalid CAMs excluded":
        frame.loc[~frame["cam_valid"], "p_align"] = np.nan
    elif case == "cam_valid numbers with NaN":
        frame["cam_valid"] = np.where(some, np.nan, frame["cam_valid"].astype(float))
        frame.loc[frame["cam_valid"] == 0, "p_align"] = np.nan
    elif case == "cam_valid integers":
        frame["cam_valid"] = frame["cam_valid"].astype(np.int16)
    elif case == "cam_valid booleans with nulls":
        table = pa.Table.from_pandas(frame, preserve_index=False)
        valid = pa.array([None if s else bool(v) for s, v in zip(some, frame["cam_valid"], strict=True)])
        return table.set_column(table.schema.get_field_index("cam_valid"), "cam_valid", valid)
    elif case == "ties":
        for column in SCORES:
            frame[column] = frame[column].round(1)
    elif case == "integer, float32 and string columns":
        frame["s_energy"] = frame["s_energy"].round().astype(np.int64)
        frame["s_maxlogit"] = frame["s_maxlogit"].astype(np.float32)
        frame["s_multimatch"] = frame["s_multimatch"].round(3).astype(str)
        frame["p_align"] = frame["p_align"].astype(np.float32)
    elif case == "integers with nulls":
        table = pa.Table.from_pandas(frame, preserve_index=False)
        energy = pa.array([None if s else int(v) for s, v in zip(some, frame["s_energy"], strict=True)])
        return table.set_column(table.schema.get_field_index("s_energy"), "s_energy", energy)
    elif case in ("row groups and a RangeIndex", "a stored index column"):
        frame.index = pd.RangeIndex(5, 5 + 3 * n, 3)
    elif case == "S_final overflows":  # finite, but S* + 1e10·P_align is not: row label 5 + 3·4
        frame.index = pd.RangeIndex(5, 5 + 3 * n, 3)
        frame.iloc[4, frame.columns.get_loc("p_align")] = 1e300
    elif case == "duplicated column names":
        table = pa.Table.from_pandas(frame, preserve_index=False)
        return table.append_column("s_mcm", pa.array(frame["s_mcm"].to_numpy() + 1))
    elif case == "class indices":
        frame["label"] = rng.integers(0, 5, n)
        frame["pred_class"] = np.where(some, frame["label"], rng.integers(0, 5, n))
    elif case == "class names":
        names = np.array(["Tench", "gold_fish", "great-white shark"], dtype=object)
        frame["label"] = names[rng.integers(0, 3, n)]
        frame["pred_class"] = rng.integers(0, 3, n)
        frame["pred_name"] = names[frame["pred_class"]]
    elif case == "class indices as text":
        frame["label"] = rng.integers(0, 5, n).astype(str)
        frame["pred_class"] = rng.integers(0, 5, n)
    return frame


CASES = [
    "plain",
    "nan and inf, dropped",
    "invalid CAMs excluded",
    "cam_valid numbers with NaN",
    "cam_valid integers",
    "cam_valid booleans with nulls",
    "ties",
    "integer, float32 and string columns",
    "integers with nulls",
    "row groups and a RangeIndex",
    "a stored index column",
    "duplicated column names",
    "class indices",
    "class names",
    "class indices as text",
]
# the cases whose every evaluated column is a plain number: the array path uses no pandas
PLAIN = {
    "plain",
    "nan and inf, dropped",
    "invalid CAMs excluded",
    "cam_valid numbers with NaN",
    "cam_valid integers",
    "ties",
    "integers with nulls",
    "row groups and a RangeIndex",
    "class indices",
}


def _write(case: str, folder: Path, sizes=(40, 30, 25)) -> dict[str, Path]:
    paths = {}
    for (name, shift), n, seed in zip((("ID", 1.0), ("a", 0.0), ("b", 0.4)), sizes, range(3), strict=True):
        data = _odd(case, _frame(n, seed, shift), seed)
        path = paths[name] = folder / f"{name}.parquet"
        if isinstance(data, pd.DataFrame):
            # a RangeIndex is stored as metadata (None), or as a column (True)
            data = pa.Table.from_pandas(data, preserve_index={"a stored index column": True}.get(case))
        pq.write_table(data, path, row_group_size=None if case == "plain" else 7)
    return paths


def _old_read(path: Path) -> ScoreTable:
    """The DataFrame path: the frame ``pd.read_parquet`` gives, every value through pandas."""
    return ScoreTable.from_frame(read_score_file(path))


def _outcome(paths: dict[str, Path], read, seeds: _Seeds | None = None, **options) -> dict:
    """What the stage makes of ``paths`` read by ``read``: results.json, metrics.csv's rows, what
    it said, the figures' data; or the error."""
    request = EvaluateRequest(paths["ID"], [(n, p) for n, p in paths.items() if n != "ID"], **options)
    reporter = RecordingReporter()
    try:
        frames = {"ID": read(paths["ID"]), **{n: read(p) for n, p in request.oods}}
        if seeds is not None:
            frames = seeds.frames(frames, seeds.seeds[-1])
        run = _run(request, frames, reporter)
    except NegalignError as exc:
        return {"error": str(exc), "said": reporter.messages}
    curves = roc_curves(run.results, run.id_frame, run.ood_frames)
    tables = {"ID": run.id_frame, **run.ood_frames}
    return {
        "results": json.dumps(run.results, sort_keys=True),
        "metrics.csv": rows_csv(run.rows, float_format="%.4f"),
        "said": reporter.messages,
        "roc": {s: {m: [a.tobytes() for a in pair] for m, pair in c.items()} for s, c in curves.items()},
        "histograms": {
            name: {c: _drawn_values(t, c).tobytes() for c in SCORES if c in t.columns}
            for name, t in tables.items()
        },
        "kept": {name: t.to_frame().index.tolist() for name, t in tables.items()},
    }


@pytest.mark.parametrize("case", CASES)
def test_the_array_path_equals_the_dataframe_path(case, tmp_path, monkeypatch):
    """Every number, message and kept row is the DataFrame path's, on every odd file; a file
    whose columns are all plain numbers is read without pandas."""
    paths = _write(case, tmp_path)
    options = {"compare": True, "lambdas": [-1.0, 0.0, 0.5, 2.0], "drop_nonfinite": True}
    old = _outcome(paths, _old_read, **options)
    through_pandas = []
    original = ScoreTable.series

    def series(self, name):
        through_pandas.append(name)
        return original(self, name)

    monkeypatch.setattr(ScoreTable, "series", series)
    new = _outcome(paths, read_score_table, **options)
    assert new == old
    assert "error" not in new or case == "duplicated column names", new.get("error")
    if case in PLAIN:
        assert not through_pandas, f"read through pandas: {sorted(set(through_pandas))}"
    if case == "class indices":
        assert json.loads(new["results"])["id"]["accuracy"]["labels"] == "class indices"


@pytest.mark.parametrize(
    "options",
    [
        {"lambdas": [0.0, 1.0]},  # NaN refused without --drop-nonfinite
        {"lambdas": [0.0, 1.0], "scale_stabilize": True, "drop_nonfinite": True},
        {"score_column": "s_mcm"},
        {"lambdas": [0.0, 1e10]},  # S_final overflows: refused, naming the row by its index label
        {"lambdas": [0.0, 1e10], "drop_nonfinite": True},
    ],
)
def test_refusals_and_options_are_the_dataframe_paths(options, tmp_path):
    overflow = options["lambdas"][-1] == 1e10 if "lambdas" in options else False
    paths = _write("S_final overflows" if overflow else "nan and inf, dropped", tmp_path)
    new = _outcome(paths, read_score_table, **options)
    assert new == _outcome(paths, _old_read, **options)
    if overflow and not options.get("drop_nonfinite"):
        assert "first: row 17," in new["error"]
    elif overflow:
        assert json.loads(new["results"])["ood"]["a"]["dropped_nonfinite"] == 1


def test_an_empty_set_is_refused_as_before(tmp_path):
    """A score file without rows, and a set whose every row is dropped, are refused with the
    DataFrame path's words."""
    paths = _write("plain", tmp_path)
    pq.write_table(pa.Table.from_pandas(_frame(0, 1, 0.0), preserve_index=False), paths["a"])
    for read in (read_score_table, _old_read):
        with pytest.raises(NegalignError, match="has no rows"):
            read(paths["a"])
    paths = _write("plain", tmp_path)
    frame = _frame(12, 1, 0.0)
    frame["s_neglabel_star"] = np.inf  # every row dropped
    frame.to_parquet(paths["a"], index=False)
    options = {"lambdas": [0.0, 1.0], "drop_nonfinite": True}
    new = _outcome(paths, read_score_table, **options)
    assert new == _outcome(paths, _old_read, **options)
    assert "no rows left to evaluate" in new["error"]


def test_group_seed_columns_equal_the_dataframe_path(tmp_path):
    """``score --group-seeds`` columns (``s_neglabel_star@seed2`` evaluated as s_neglabel_star)."""
    paths = {}
    for (name, shift), seed in zip((("ID", 1.0), ("a", 0.0)), range(2), strict=True):
        frame = _frame(30, seed, shift)
        for s in (1, 2):
            frame[f"s_neglabel_star@seed{s}"] = frame["s_neglabel_star"] + 0.1 * s * np.sin(np.arange(30))
        paths[name] = tmp_path / f"{name}.parquet"
        frame.to_parquet(paths[name], index=False)
    seeds = _Seeds([1, 2], ["s_neglabel_star"])
    options = {"compare": True, "lambdas": [0.0, 1.0]}
    new = _outcome(paths, read_score_table, seeds, **options)
    assert new == _outcome(paths, _old_read, seeds, **options)
    assert new["results"] != _outcome(paths, read_score_table, **options)["results"]


def test_csv_files_and_frames_go_through_pandas(tmp_path):
    """A CSV score file is read by pandas (its type inference is the file's meaning)."""
    frame = _frame(20, 0, 1.0)
    frame.to_csv(tmp_path / "id.csv", index=False)
    table = read_score_table(tmp_path / "id.csv")
    assert not any(table.plain(c) for c in table.columns)
    np.testing.assert_array_equal(table.numeric("s_mcm"), frame["s_mcm"].to_numpy())


def test_buffers_read_with_offsets_and_chunks():
    """Columns are read from arrow's buffers: sliced chunks (an offset), several chunks, nulls in
    bit-packed validity, bit-packed booleans."""
    values = np.arange(40, dtype=np.float64) / 7
    mask = np.arange(40) % 9 == 4
    floats = pa.array(values, mask=mask)
    column = pa.chunked_array([floats.slice(3, 11), floats.slice(20, 13)])
    expected = np.where(mask, np.nan, values)
    np.testing.assert_array_equal(_numpy(column), np.r_[expected[3:14], expected[20:33]])
    ints = pa.chunked_array([pa.array(np.arange(30, dtype=np.int32), mask=mask[:30]).slice(5, 17)])
    np.testing.assert_array_equal(_numpy(ints), np.where(mask[:30], np.nan, np.arange(30.0))[5:22])
    flags = pa.chunked_array([pa.array(np.arange(40) % 3 == 0).slice(9, 19)])
    np.testing.assert_array_equal(_numpy(flags), (np.arange(40) % 3 == 0)[9:28])


@pytest.mark.parametrize(
    "rows",
    [
        [],
        [
            {"ood": "a", "lambda": None, "auroc_pct": 99.123456},
            {"ood": "b,c", "lambda": 0.5, "auroc_pct": 1 / 3},
        ],
        [{"group_seed": 1, "x": 2.0}, {"group_seed": 2, "x": float("nan")}],
        [{"a": 1}, {"a": None}, {"b": 'say "hi"\n'}],
        [{"flag": True}, {"flag": False}],
        [{"flag": True}, {"flag": None}],
        [{"m": "x", "v": -0.0}, {"m": 1.5, "v": float("inf")}],
        [{"v": 1e16}, {"v": np.float64(0.1)}, {"v": np.int64(3)}],
    ],
)
@pytest.mark.parametrize("float_format", [None, "%.4f"])
def test_csv_rows_are_pandas_to_csv(rows, float_format):
    """metrics.csv and table.csv are written without pandas, byte for byte what
    ``pd.DataFrame(rows).to_csv(index=False, float_format=...)`` wrote."""
    expected = io.StringIO()
    pd.DataFrame(rows).to_csv(expected, index=False, float_format=float_format)
    assert rows_csv(rows, float_format) == expected.getvalue()


# ----------------------------------------------------------------------------- the import guard
HEAVY = ("pandas", "sklearn", "scipy", "matplotlib", "torch")

_NEW_GRID = IMPORT_SPY + textwrap.dedent(
    """

    done = CliRunner().invoke(app, json.loads(sys.argv[1]), env={"COLUMNS": "200"})
    print(json.dumps({"code": done.exit_code, "output": done.output, "first": first,
                      "imported": [m for m in HEAVY if m in sys.modules]}))
    """
)


def test_a_new_lambda_grid_imports_no_pandas_sklearn_nor_matplotlib(tmp_path, data_figures):
    """`evaluate` computed here; then, in ONE fresh process, `evaluate` with a λ grid it has not
    seen (whose best λ is the same, so both figures come from the figure cache): the metrics are
    computed again from the parquet files, and none of HEAVY is imported. An import hook records
    where the first heavy import came from."""
    for name, seed, shift in (("id", 0, 1.0), ("a", 1, 0.0), ("b", 2, 0.4)):
        write_scores(
            tmp_path / f"{name}.parquet",
            60,
            seed,
            shift,
            label=np.arange(60) % 4,
            pred_class=np.arange(60) % 3,
        )
    argv = [
        "evaluate", "--id", str(tmp_path / "id.parquet"),
        "--ood", f"a={tmp_path / 'a.parquet'}", "--ood", f"b={tmp_path / 'b.parquet'}",
        "--compare", "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    first = cli(*argv, "--lambda", "0,1", "--out", str(tmp_path / "first"))
    assert first.exit_code == 0, first.output
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    again = [*argv, "--lambda", "-1,0,1", "--out", str(tmp_path / "grid")]
    done = subprocess.run(
        [sys.executable, "-c", _NEW_GRID, json.dumps(again), json.dumps(HEAVY)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["code"] == 0, seen["output"]
    assert "cache hit" not in " ".join(seen["output"].split()), "precondition: the grid is new"
    where = {m: seen["first"].get(m) for m in seen["imported"]}
    assert not seen["imported"], f"a new λ grid imported {seen['imported']}, first from {where}"
    old = json.loads((tmp_path / "first" / "results.json").read_text())
    new = json.loads((tmp_path / "grid" / "results.json").read_text())
    assert new["id"]["accuracy"] == old["id"]["accuracy"] and old["id"]["accuracy"]["top1"] is not None
    for name in ("a", "b"):
        assert new["ood"][name]["statistics"] == old["ood"][name]["statistics"]
        for lam in ("0.0", "1.0"):
            assert new["ood"][name]["lambda_sweep"][lam] == old["ood"][name]["lambda_sweep"][lam]
    for name in ("roc.png", "score_hist.png"):  # not drawn: the same λ wins
        assert (tmp_path / "grid" / name).read_bytes() == (tmp_path / "first" / name).read_bytes()


# ----------------------------------------------------------------------------- what a new grid reads
@pytest.fixture()
def data_figures(monkeypatch) -> None:
    """The ROC and histogram "figures" are the digest of the data they are drawn from (cheap,
    and a figure copied from the cache must hold the data a fresh draw would show)."""
    from negalign_cli.stages import plots
    from negalign_cli.stages.figures import data_digest

    def roc(path, curves):
        path.write_text(data_digest(curves))

    def histograms(path, id_frame, ood_frames, columns, labels=None):
        shown = {"id": id_frame[columns], "ood": {n: f[columns] for n, f in ood_frames.items()}}
        path.write_text(data_digest(shown))

    monkeypatch.setattr(plots, "plot_roc", roc)
    monkeypatch.setattr(plots, "plot_histograms", histograms)


def _columns_read(monkeypatch) -> list[str]:
    from negalign_cli.stages import score_table

    read: list[str] = []
    original = score_table._Source.column

    def column(self, name):
        if name not in self.arrow:
            read.append(name)
        return original(self, name)

    monkeypatch.setattr(score_table._Source, "column", column)
    return read


def test_a_new_grid_reads_only_the_columns_the_sweep_needs(tmp_path, monkeypatch, data_figures):
    """Statistics, the ID accuracy and which columns hold a number are an `evaluate-summary`
    artifact per file (its digest and kept rows), and the figures are keyed by the files: a new
    λ grid reads S*, P_align and cam_valid of each file, nothing else, and writes the statistics
    and accuracy a fresh evaluation (no cache) computes."""
    paths = _write("class indices", tmp_path)
    argv = ["evaluate", "--id", str(paths["ID"]), "--ood", f"a={paths['a']}", "--ood", f"b={paths['b']}"]
    read = _columns_read(monkeypatch)
    first = cli(
        *argv, "--lambda", "0,1", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "first")
    )
    assert first.exit_code == 0, first.output
    assert {"s_mcm", "label", "pred_class"} <= set(read)  # summarised: every column read
    read.clear()
    grid = cli(
        *argv, "--lambda", "-1,0,1", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "grid")
    )
    assert grid.exit_code == 0, grid.output
    assert sorted(read) == sorted(["s_neglabel_star", "p_align", "cam_valid"] * 3)
    fresh = cli(
        *argv, "--lambda", "-1,0,1", "--cache-dir", str(tmp_path / "fresh"), "--out", str(tmp_path / "f")
    )
    assert fresh.exit_code == 0, fresh.output
    for name in ("results.json", "metrics.csv", "table.csv", "roc.png", "score_hist.png"):
        assert (tmp_path / "grid" / name).read_bytes() == (tmp_path / "f" / name).read_bytes(), name


def test_summaries_follow_the_rows_kept_and_the_file(tmp_path, data_figures):
    """A grid that drops rows (S_final overflows at its λ, --drop-nonfinite) and an edited file
    are summarised again, and their figures drawn again: outputs equal a fresh evaluation's."""
    paths = _write("plain", tmp_path)
    frame = _frame(30, 1, 0.0)
    frame.loc[[3, 7], "p_align"] = 1e300  # finite, but S* + 1e10·P_align overflows
    frame.to_parquet(paths["a"], index=False)
    argv = ["evaluate", "--id", str(paths["ID"]), "--ood", f"a={paths['a']}", "--ood", f"b={paths['b']}"]
    argv += ["--compare", "--drop-nonfinite"]

    def outputs(lambdas: str, cache: str, out: str) -> dict:
        done = cli(
            *argv, "--lambda", lambdas, "--cache-dir", str(tmp_path / cache), "--out", str(tmp_path / out)
        )
        assert done.exit_code == 0, done.output
        names = ("results.json", "metrics.csv", "roc.png", "score_hist.png")
        return {n: (tmp_path / out / n).read_bytes() for n in names}

    kept_all = outputs("0,1", "cache", "one")
    dropped = outputs("0,1e10", "cache", "two")
    assert json.loads(dropped["results.json"])["ood"]["a"]["n"] == 28
    assert dropped == outputs("0,1e10", "fresh", "three")
    assert dropped["score_hist.png"] != kept_all["score_hist.png"]
    edited = _frame(30, 5, 0.0)
    edited.to_parquet(paths["a"], index=False)
    again = outputs("0,1", "cache", "four")
    assert again == outputs("0,1", "fresh2", "five")
    assert (
        json.loads(again["results.json"])["statistics"] != json.loads(kept_all["results.json"])["statistics"]
    )
