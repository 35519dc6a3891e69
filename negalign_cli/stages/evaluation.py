"""The ``evaluate`` stage: metrics, lambda sweep, the method table, plots."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from negalign_cli import __version__
from negalign_cli.cache.statcache import StatCache, sha256_files
from negalign_cli.cache.store import ArtifactStore, StageResult, StageSpec
from negalign_cli.cache.workspace import Workspace
from negalign_cli.compute.evaluation import (
    ALIGN,
    ID_SET,
    MEAN,
    STAR,
    all_metrics,
    average_metrics,
    best_lambda,
    calibration_problem,
    check_set_names,
    final_score,
    fit_calibration,
    group_sets,
    lambda_sweeps,
    nonfinite_final,
    statistics,
)
from negalign_cli.compute.metrics import CONVENTIONS, DEFINITIONS, RECALL_LEVEL, group_rejection
from negalign_cli.compute.score_columns import SCORE_COLUMNS, method_columns, score_column, seed_column
from negalign_cli.defaults import DEFAULT_LAMBDAS, NEGALIGN
from negalign_cli.errors import NegalignError
from negalign_cli.lazy import lazy_module
from negalign_cli.reporting import NullReporter, RecordingReporter, Reporter
from negalign_cli.stages import files
from negalign_cli.stages.score_table import CSV_SEPARATORS, ScoreTable, as_table, score_file_format

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq
else:  # a cache hit (a key, a lookup, a copy) imports none: they load when the stage computes;
    # a miss reads parquet score files with pyarrow alone (stages/score_table.py): no pandas
    np, pd, pq = lazy_module("numpy"), lazy_module("pandas"), lazy_module("pyarrow.parquet")

FITTED = "fitted on the ID set"  # the source of M3 statistics fitted by evaluate itself
# 2: ROC of every method, labelled histograms, --ood-group; 3: S_final overflows and reserved set
# names refused (an evaluation cached before would still serve them); 4: table.csv (the paper-style
# table) and --benchmark; 5: ID accuracy from ImageNet-1K WordNet-id labels
EVALUATE_STAGE, EVALUATE_VERSION = "evaluate", 5
METHODS = method_columns()


def parse_lambdas(text: str | None) -> list[float] | None:
    """``sweep`` (NegAlign's published grid), ``0,0.5,1`` or a single value."""
    if text is None:
        return None
    if text.strip().lower() == "sweep":
        return list(DEFAULT_LAMBDAS)
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise NegalignError(
            f"cannot read --lambda {text!r}: use sweep, a value, or values like 0,0.5,1"
        ) from exc
    if not values or not all(math.isfinite(v) for v in values):
        raise NegalignError(f"cannot read --lambda {text!r}: use sweep, a value, or values like 0,0.5,1")
    return sorted(set(values))


def parse_ood(items: list[str], option: str = "--ood", required: bool = True) -> list[tuple[str, Path]]:
    """``NAME=FILE`` pairs of ``option``; names must be unique."""
    pairs = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise NegalignError(f"{option} takes NAME=FILE, got {item!r}")
        pairs.append((name.strip(), Path(path.strip()).expanduser()))
    names = [n for n, _ in pairs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise NegalignError(f"{option} name(s) given more than once: {', '.join(duplicated)}")
    if not pairs and required:
        raise NegalignError(f"give at least one {option} NAME=FILE")
    return pairs


def parse_ood_groups(items: list[str] | None) -> list[tuple[str, list[str]]]:
    """``NAME=set1,set2`` pairs (``--ood-group``, repeatable), e.g. OpenOOD's
    ``near=ssb_hard,ninco`` and ``far=inaturalist,textures,openimage_o``. The members are checked
    against the ``--ood`` names when the evaluation runs."""
    groups = []
    for item in items or []:
        name, sep, members = item.partition("=")
        sets = [m.strip() for m in members.split(",") if m.strip()]
        if not sep or not name.strip() or not sets:
            raise NegalignError(f"--ood-group takes NAME=SET1,SET2 (names given to --ood), got {item!r}")
        groups.append((name.strip(), sets))
    return groups


def read_score_file(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise NegalignError(f"score file not found: {path}")
    kind = score_file_format(path)
    try:
        frame = pd.read_parquet(path) if kind == "parquet" else pd.read_csv(path, sep=CSV_SEPARATORS[kind])
    except Exception as exc:  # pandas/pyarrow raise many types for a broken file
        raise NegalignError(f"cannot read score file {path}: {str(exc).splitlines()[0][:160]}") from exc
    if frame.empty:
        raise NegalignError(f"score file {path} has no rows")
    return frame


@dataclass
class EvaluateRequest:
    id_path: Path
    oods: list[tuple[str, Path]]
    score_column: str | None = None
    lambdas: list[float] | None = None
    compare: bool = False
    convention: str = "neglabel"
    select_on: str | None = None
    scale_stabilize: bool = False
    calibration_path: Path | None = None
    drop_nonfinite: bool = False
    allow_mixed_settings: bool = False
    groups: list[tuple[str, list[str]]] = field(default_factory=list)
    id_groups: list[tuple[str, Path]] = field(default_factory=list)
    benchmark: str | None = None  # a preset (negalign_cli.presets): its groups and published rows
    extra: dict = field(default_factory=dict)

    def params(self) -> dict[str, Any]:
        id_groups = {"id_groups": [name for name, _ in self.id_groups]} if self.id_groups else {}
        return id_groups | {
            "oods": [name for name, _ in self.oods],
            "score_column": self.score_column,
            "lambdas": self.lambdas,
            "compare": self.compare,
            "convention": self.convention,
            "select_on": self.select_on,
            "scale_stabilize": self.scale_stabilize,
            "drop_nonfinite": self.drop_nonfinite,
            "allow_mixed_settings": self.allow_mixed_settings,
            # only when given, so that the keys of earlier evaluations stay valid
            **({"ood_groups": {name: sets for name, sets in self.groups}} if self.groups else {}),
            **({"benchmark": self.benchmark} if self.benchmark else {}),
            "paths": self.paths(),
        }

    def paths(self) -> dict[str, str]:
        """Each file as given, as results.json records it: a result names the files it was asked
        about (the same bytes at another path are another result, whose report finds its files),
        and a score file's name says how it is read (the same bytes named .csv and .tsv are
        different tables)."""
        files = [("id", self.id_path), *((f"ood:{name}", path) for name, path in self.oods)]
        files += [(f"id-group:{name}", path) for name, path in self.id_groups]
        if self.calibration_path is not None:
            files.append(("calibration", self.calibration_path))
        return {key: str(path) for key, path in files}


def read_score_table(path: Path) -> ScoreTable:
    """A score file's rows for ``evaluate`` (parquet read by pyarrow alone; ``read_score_file``'s
    checks and values)."""
    return ScoreTable.read(path)


def _invalid_cam(frame: ScoreTable) -> np.ndarray:
    """Rows whose ``cam_valid`` is False (a missing or empty column marks none)."""
    if "cam_valid" not in frame.columns:
        return np.zeros(len(frame), dtype=bool)
    kind = frame.kind("cam_valid")
    if kind == "bool":
        return ~frame.bools("cam_valid")
    if kind is not None:  # a number: False where 0 (NaN marks nothing), as astype(bool) reads it
        return frame.numeric("cam_valid") == 0
    valid = frame.series("cam_valid")
    return (valid.notna() & ~valid.fillna(True).astype(bool)).to_numpy()


def _usable(frame: ScoreTable, column: str) -> bool:
    if column not in frame.columns:
        return False
    if column in frame.usable:  # known from the file's summary
        return frame.usable[column]
    if frame.plain(column):
        return not bool(np.isnan(frame.numeric(column)).all())
    return bool(pd.to_numeric(frame.series(column), errors="coerce").notna().any())


def load_calibration(
    path: Path, what: str | None = None, seed: int | None = None
) -> dict[str, dict[str, float]]:
    """M3 statistics from a JSON file (a results.json of ``evaluate --scale-stabilize``, or its
    ``calibration`` block alone); ``what`` names where it came from in errors (default: the path);
    ``seed``: a group seed's own statistics, as ``parse_calibration``."""
    return parse_calibration(read_calibration(path, what), what or str(path), seed)


def read_calibration(path: Path, what: str | None = None) -> Any:
    """A calibration file's JSON, unparsed (``parse_calibration`` takes it)."""
    from negalign_cli.stages.results_json import loads_results

    try:
        return loads_results(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NegalignError(
            f"cannot read calibration file {what or path}: {str(exc).splitlines()[0][:120]}"
        ) from exc


def parse_calibration(data: Any, what: str, seed: int | None = None) -> dict[str, dict[str, float]]:
    """M3 statistics (mean and std of S* and P_align) from a mapping, or from a results.json's
    ``calibration`` block; refused unless finite with non-negative std. ``what`` names the source.

    ``seed``: the statistics of group seed ``seed`` (the seed a score file was made with), from the
    ``calibration_by_seed`` block a results.json of group-seeded score files holds (its
    ``calibration`` is the first seed's only); refused when that block lacks the seed. A file with
    one calibration gives it for every seed."""
    by_seed = data.get("calibration_by_seed") if isinstance(data, Mapping) else None
    if seed is not None and isinstance(by_seed, Mapping):
        if str(seed) not in by_seed:
            raise NegalignError(
                f"{what} holds M3 statistics for group seed(s) {', '.join(map(str, by_seed))}, not for "
                f"seed {seed} of these score files: calibrate on ID scores made with the same --group-seeds"
            )
        return parse_calibration(by_seed[str(seed)], f"{what} (group seed {seed})")
    if isinstance(data, Mapping) and isinstance(data.get("calibration"), Mapping):
        data = data["calibration"]
    try:
        calibration = {
            k: {"mean": float(data[k]["mean"]), "std": float(data[k]["std"])} for k in (STAR, ALIGN)
        }
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise NegalignError(
            f"{what} holds no mean/std for {STAR} and {ALIGN}: give the calibration block of a "
            "results.json written by `evaluate --scale-stabilize` (or that results.json)"
        ) from exc
    problem = calibration_problem(calibration)
    if problem is not None:
        raise NegalignError(
            f"M3 statistics ({what}) hold {problem}: give the calibration block of a results.json "
            "written by `evaluate --scale-stabilize`"
        )
    return calibration


def evaluate(request: EvaluateRequest, workspace: Workspace, reporter: Reporter | None = None) -> StageResult:
    reporter = reporter or NullReporter()
    if request.convention not in CONVENTIONS:
        raise NegalignError(f"unknown --metrics {request.convention!r}: use neglabel or openood")
    names = [name for name, _ in request.oods]
    if request.select_on is not None and request.select_on not in names:
        raise NegalignError(
            f"--select-lambda-on {request.select_on!r} is not one of the --ood names ({', '.join(names)})"
        )
    try:
        check_set_names(names)
    except ValueError as exc:
        raise NegalignError(f"--ood: {exc}") from exc
    if request.benchmark:
        apply_benchmark(request, reporter)
    try:
        group_sets(request.groups, names)
    except ValueError as exc:
        raise NegalignError(f"--ood-group: {exc}") from exc
    stat_cache = workspace.store.stat_cache  # a score file unchanged since it was hashed is not read
    inputs = {"id": _file_digest(request.id_path, stat_cache) if request.id_path.is_file() else "missing"}
    for name, path in request.oods:
        inputs[f"ood:{name}"] = _file_digest(path, stat_cache) if path.is_file() else "missing"
    _warn_same_content(request, inputs, reporter)
    if request.calibration_path is not None:
        if not request.calibration_path.is_file():
            raise NegalignError(f"--calibration file not found: {request.calibration_path}")
        inputs["calibration"] = _file_digest(request.calibration_path, stat_cache)
    for name, path in request.id_groups:
        inputs[f"id-group:{name}"] = _group_digest(path)
    spec = StageSpec(EVALUATE_STAGE, EVALUATE_VERSION, request.params(), inputs)
    store = workspace.store
    return store.run(spec, lambda folder: _evaluate(request, folder, reporter, store, inputs), reporter)


def apply_benchmark(request: EvaluateRequest, reporter: Reporter) -> None:
    """``--benchmark NAME``: group the ``--ood`` sets by the preset's groups (unless --ood-group
    gives groups), and warn for each set the preset expects that no ``--ood`` name matches (names
    match case-insensitively, see ``presets.match_sets``)."""
    from negalign_cli.presets import get_preset, match_sets

    preset = get_preset(request.benchmark or "")
    request.benchmark = preset.name
    matched = match_sets(preset, [name for name, _ in request.oods])
    given: dict[str, list[str]] = {}
    for name, spec_name in matched.items():
        given.setdefault(spec_name, []).append(name)
    twice = {spec_name: names for spec_name, names in given.items() if len(names) > 1}
    if twice:
        shown = "; ".join(f"{' and '.join(names)} are both {spec_name}" for spec_name, names in twice.items())
        raise NegalignError(
            f"--benchmark {preset.name}: two --ood names match one set of the benchmark ({shown}): "
            "its means would count that set twice; give each set once"
        )
    for spec in preset.ood_sets:
        if spec.name not in matched.values() and not spec.optional:
            reporter.warn(
                f"--benchmark {preset.name} expects the OOD set {spec.name}, and no --ood name matches it: "
                "the mean is not the benchmark's"
            )
    for name, _ in request.oods:
        if name not in matched:
            reporter.warn(
                f"--ood {name} is not a set of the {preset.name} benchmark "
                f"({', '.join(s.name for s in preset.ood_sets)}): it is in no group"
            )
    if not request.groups:
        groups: dict[str, list[str]] = {}
        group_of = {spec.name: spec.group for spec in preset.ood_sets}
        for name, set_name in matched.items():
            if group_of.get(set_name):
                groups.setdefault(str(group_of[set_name]), []).append(name)
        request.groups = list(groups.items())


def benchmark_block(request: EvaluateRequest) -> dict[str, Any]:
    """results.json's ``benchmark``: the preset, its set each --ood name is, and its published rows
    (figures in %, keyed by the --ood names; the ``neglabel`` convention) where it has some."""
    from negalign_cli.presets import citation, get_preset, match_sets, published_data, published_rows

    preset = get_preset(request.benchmark or "")
    matched = match_sets(preset, [name for name, _ in request.oods])
    block: dict[str, Any] = {"name": preset.name, "sets": matched, "published": []}
    if not preset.published:
        return block
    setting = published_data()["settings"][preset.published]
    block["backbone"] = setting["backbone"]
    block["published_convention"] = published_data()["metric_convention"]["name"]
    for row in published_rows(preset):
        per_set = {
            name: {"auroc": row.per_set[set_name].auroc, "fpr95": row.per_set[set_name].fpr95}
            for name, set_name in matched.items()
            if set_name in row.per_set
        }
        sources = [f.source for f in row.per_set.values()] + ([row.average.source] if row.average else [])
        block["published"].append(
            {
                "method": row.method,
                "citation": "; ".join(citation(key) for key in dict.fromkeys(sources)),
                "method_citation": row.method_citation,
                "note": row.note,
                "per_set": per_set,
                "average": {"auroc": row.average.auroc, "fpr95": row.average.fpr95} if row.average else None,
                # the published average is the run's mean only when the run has all its sets
                "covers_all_sets": set(row.per_set) <= set(matched.values())
                and len(matched) == len(request.oods),
            }
        )
    return block


def _warn_same_content(request: EvaluateRequest, inputs: dict[str, str], reporter: Reporter) -> None:
    """Warn when an OOD file holds the same bytes as the ID file (ID would be scored against
    itself: every method near 50% AUROC) or as another OOD file."""
    seen = {inputs["id"]: f"the ID file {request.id_path}"}
    for name, path in request.oods:
        digest = inputs[f"ood:{name}"]
        if digest == "missing":
            continue
        if digest in seen:
            reporter.warn(
                f"--ood {name}={path} has the same content as {seen[digest]} (sha256 {digest[:12]}): "
                "check that you gave the file you meant"
            )
        else:
            seen[digest] = f"--ood {name}"


# ----------------------------------------------------------------------------- group seeds
SEED_DDOF = 1  # the std over group seeds is the sample standard deviation, as papers report it
SEED_STD = "sample standard deviation over the group seeds (ddof = 1, numpy.std(..., ddof=1))"


@dataclass(frozen=True)
class _Seeds:
    """The group seeds of score files made by ``score --group-seeds`` and their grouped columns."""

    seeds: list[int]
    columns: list[str]

    def frames(self, frames: dict[str, ScoreTable], seed: int) -> dict[str, ScoreTable]:
        """The score files as group seed ``seed`` scored them: its columns in the plain names."""
        return {
            name: frame.with_columns({c: seed_column(c, seed) for c in self.columns})
            for name, frame in frames.items()
        }

    def methods(self, selection: _Selection) -> set[str]:
        """The evaluated methods whose scores depend on the seed (NegAlign through S*)."""
        grouped = {m for m, column in selection.columns.items() if column in self.columns}
        return grouped | ({NEGALIGN} if selection.negalign and STAR in self.columns else set())


def _group_seeds(request: EvaluateRequest) -> _Seeds | None:
    """The group seeds the score files were made with (``score --group-seeds``), the same in
    every file, or None when none has several."""
    from negalign_cli.stages.score_files import read_score_metadata  # pyarrow: not on a hit

    paths = [(ID_SET, request.id_path), *request.oods]
    metadata = {name: read_score_metadata(path) for name, path in paths}
    recorded = {name: (meta.get("config") or {}).get("group_seeds") for name, meta in metadata.items()}
    if not any(recorded.values()):
        return None
    if len({json.dumps(seeds) for seeds in recorded.values()}) > 1:
        shown = "; ".join(f"{n}: {','.join(map(str, s)) if s else 'one seed'}" for n, s in recorded.items())
        raise NegalignError(
            f"the score files were made with different --group-seeds ({shown}): score every set with "
            "the same `score --group-seeds`"
        )
    columns = metadata[ID_SET].get("seeded_columns") or []
    seeds = [int(seed) for seed in recorded[ID_SET] or []]
    for name, path in paths:
        header = set(pq.read_schema(path).names)
        missing = [seed_column(c, s) for s in seeds for c in columns if seed_column(c, s) not in header]
        if missing or metadata[name].get("seeded_columns") != columns:
            raise NegalignError(
                f"{name} score file {path} lacks the per-seed column(s) {', '.join(missing) or columns}: "
                "it was not written by `score --group-seeds`; score it again"
            )
    return _Seeds(seeds, list(columns))


@dataclass
class _SeedReporter:
    """What evaluating a later group seed says: its warnings (marked with the seed); the rest was
    said for the first seed already."""

    inner: Reporter
    seed: int

    def info(self, message: str) -> None:
        self.inner.debug(f"group seed {self.seed}: {message}")

    def debug(self, message: str) -> None:
        self.inner.debug(f"group seed {self.seed}: {message}")

    def warn(self, message: str) -> None:
        self.inner.warn(f"group seed {self.seed}: {message}")

    def progress(self, description: str, total: int | None):
        return self.inner.progress(description, total)


def seed_spread(metric_dicts: Sequence[Mapping[str, Mapping[str, float]]]) -> tuple[dict, dict]:
    """The mean and the sample std (ddof = 1) over group seeds of each metric in each convention."""
    first = metric_dicts[0]
    values = {c: {n: [m[c][n] for m in metric_dicts] for n in first[c]} for c in first}
    mean = {c: {n: float(np.mean(v)) for n, v in by.items()} for c, by in values.items()}
    std = {c: {n: float(np.std(v, ddof=SEED_DDOF)) for n, v in by.items()} for c, by in values.items()}
    return mean, std


def summarise_seeds(per_seed: list[dict], seeds: Sequence[int], seeded: set[str]) -> dict:
    """One results.json from the evaluations of several group seeds: the first seed's, where every
    metric of a method that depends on the seed is the mean over the seeds, with its sample std
    beside it (``std``, same layout), and the λ each seed chose (``lambda_by_seed``); NegAlign's
    λ sweep likewise (its best λ is the best of the mean sweep). Methods that do not depend on the
    seed keep their one value and have no ``std``. ``group_seeds`` says how, and holds each seed's
    metrics."""
    import copy

    results = copy.deepcopy(per_seed[0])
    convention = results["metrics_convention"]
    paths: list[tuple[str, ...]] = [("ood", name) for name in results["ood"]] + [
        ("groups", name) for name in results.get("groups", {})
    ]
    paths.append(("mean",))

    def at(block: dict, path: tuple[str, ...]) -> dict:
        for key in path:
            block = block[key]
        return block

    for path in paths:
        block, blocks = at(results, path), [at(r, path) for r in per_seed]
        for method, entry in block["methods"].items():
            if method not in seeded:
                continue
            entries = [b["methods"][method] for b in blocks]
            entry["metrics"], entry["std"] = seed_spread([e["metrics"] for e in entries])
            if "lambda" in entry:
                entry["lambda_by_seed"] = {str(s): e["lambda"] for s, e in zip(seeds, entries, strict=True)}
        if "lambda_sweep" in block and NEGALIGN in seeded:
            for key, point in block["lambda_sweep"].items():
                point["metrics"], point["std"] = seed_spread(
                    [b["lambda_sweep"][key]["metrics"] for b in blocks]
                )
            sweep = block["lambda_sweep"]
            best = max(sorted(sweep, key=float), key=lambda k: sweep[k]["metrics"][convention]["auroc"])
            block["best_lambda"] = sweep[best]["lambda"]
            block["best_auroc"] = sweep[best]["metrics"][convention]["auroc"]
            block["best_lambda_by_seed"] = {
                str(s): b["best_lambda"] for s, b in zip(seeds, blocks, strict=True)
            }
    if "lambda_sweep" in results["mean"]:
        for key in ("best_lambda", "best_auroc", "lambda_sweep"):
            results[key] = results["mean"][key]
    if "lambda_selection" in results:
        results["lambda_selection"]["lambda_by_seed"] = {
            str(s): r["lambda_selection"]["lambda"] for s, r in zip(seeds, per_seed, strict=True)
        }
    if "calibration" in results:
        results["calibration_by_seed"] = {
            str(s): r["calibration"] for s, r in zip(seeds, per_seed, strict=True)
        }
    for name, group in results.get("id_groups", {}).items():
        shares = [r["id_groups"][name] for r in per_seed]
        group["rejected_std"] = {}
        for method in group["rejected"]:
            if method in seeded:
                values = [g["rejected"][method] for g in shares]
                group["rejected"][method] = float(np.mean(values))
                group["rejected_std"][method] = float(np.std(values, ddof=SEED_DDOF))
        if NEGALIGN in seeded:
            for key in group["negalign_sweep"]:
                group["negalign_sweep"][key] = float(np.mean([g["negalign_sweep"][key] for g in shares]))
    results["group_seeds"] = {
        "seeds": list(seeds),
        "std": SEED_STD,
        "ddof": SEED_DDOF,
        "methods": [m for m in results["mean"]["methods"] if m in seeded],
        "first_seed": f"statistics, calibration, roc.png and score_hist.png are group seed {seeds[0]}'s",
        "per_seed": {
            str(s): {
                "/".join(path): {m: e["metrics"] for m, e in at(r, path)["methods"].items() if m in seeded}
                for path in paths
            }
            for s, r in zip(seeds, per_seed, strict=True)
        },
    }
    return results


@dataclass
class _Selection:
    """What one evaluation computes: plain columns by method label, and whether NegAlign is in."""

    columns: dict[str, str]
    negalign: bool


def _evaluate(
    request: EvaluateRequest,
    folder: Path,
    reporter: Reporter,
    store: ArtifactStore | None = None,
    digests: Mapping[str, str] | None = None,
) -> dict:
    """``digests``: the score files' sha256 (the stage's inputs), for the summaries and figure
    keys that name the files rather than hash their data."""
    from negalign_cli.heap import reused_heap

    with reused_heap():  # the sweep's full-length temporaries reuse freed memory: no page faults
        return _evaluate_files(request, folder, reporter, store, digests)


def _evaluate_files(
    request: EvaluateRequest,
    folder: Path,
    reporter: Reporter,
    store: ArtifactStore | None = None,
    digests: Mapping[str, str] | None = None,
) -> dict:
    frames = _read_frames(request, digests)  # the files' schemas: each column is read when used
    seeds = _group_seeds(request)
    if seeds is None:
        run = _run(request, frames, reporter, store)
        results, metric_rows, figures = run.results, _metric_rows(run), None
    else:  # every seed evaluated as its own score file would be, then mean ± std over the seeds
        runs = [
            _run(
                request,
                seeds.frames(frames, seed),
                reporter if i == 0 else _SeedReporter(reporter, seed),
                store,
                seed,
            )
            for i, seed in enumerate(seeds.seeds)
        ]
        run = runs[0]  # the figures and statistics: the first seed's (its columns are the plain ones)
        results = summarise_seeds([r.results for r in runs], seeds.seeds, seeds.methods(run.selection))
        metric_rows = [
            {"group_seed": seed, **row}
            for seed, r in zip(seeds.seeds, runs, strict=True)
            for row in _metric_rows(r)
        ]
        figures = run.results
    _write_outputs(
        folder, request, results, metric_rows, run.id_frame, run.ood_frames, store, reporter, figures
    )
    return {"counts": {"id": len(run.id_frame), **{f"ood:{n}": len(f) for n, f in run.ood_frames.items()}}}


@dataclass
class _Run:
    """One evaluation of the score files (of one group seed)."""

    results: dict
    rows: list[dict]  # metrics.csv's rows per OOD set
    id_frame: ScoreTable
    ood_frames: dict[str, ScoreTable]
    selection: _Selection


def _run(
    request: EvaluateRequest,
    frames: dict[str, ScoreTable],
    reporter: Reporter,
    store: ArtifactStore | None = None,
    seed: int | None = None,
) -> _Run:
    """results.json's content (and metrics.csv's rows) for the score files ``frames`` (as group
    seed ``seed`` scored them, if any); each file's statistics (and the ID accuracy) from the
    cache (``store``) when its kept rows were summarised before."""
    frames = dict(frames)
    selection = _select(request, frames, reporter)
    cam_invalid, excluded = _exclude_invalid_cams(frames, selection, reporter)
    paths = {ID_SET: request.id_path, **dict(request.oods)}
    dropped = _drop_nonfinite(
        frames, _needed_columns(request, selection), request.drop_nonfinite, reporter, paths
    )
    calibration = _calibration(request, frames[ID_SET], seed) if selection.negalign else None
    if selection.negalign:
        _check_calibration(calibration, paths)
        overflow = _drop_overflow(
            frames, _lambdas(request), calibration, request.drop_nonfinite, reporter, paths
        )
        dropped = {name: count + overflow[name] for name, count in dropped.items()}
    id_frame = frames[ID_SET]
    ood_frames = {name: frame for name, frame in frames.items() if name != ID_SET}
    sweeps = _sweeps(request, id_frame, ood_frames, calibration) if selection.negalign else {}
    chosen, rule = _choose_lambdas(request, sweeps)

    results: dict[str, Any] = {
        "negalign_version": __version__,
        "metrics_convention": request.convention,
        "metric_definitions": DEFINITIONS,
        "config": {**request.params(), "score_files": _score_configs(request)},
        "id": {
            "file": str(request.id_path),
            "n": len(id_frame),
            "dropped_nonfinite": dropped[ID_SET],
            "cam_invalid": cam_invalid[ID_SET],
            "excluded_invalid_cam": excluded[ID_SET],
        },
        "ood": {},
    }
    summaries = _summaries(request, frames, store, reporter)
    results["id"]["accuracy"] = summaries[ID_SET]["accuracy"]
    results["columns"] = _column_descriptions(selection)
    if calibration is not None:
        results["calibration"] = calibration
    if rule is not None:
        results["lambda_selection"] = {"rule": rule, "lambda": chosen}
    rows: list[dict] = []
    # each file's statistics once (they were computed per OOD block and again below)
    stats = {name: summary["statistics"] for name, summary in summaries.items()}
    for name, frame in ood_frames.items():
        block = _ood_block(
            request, name, id_frame, frame, selection, sweeps.get(name), chosen.get(name), rows, stats
        )
        block.update(
            dropped_nonfinite=dropped[name],
            cam_invalid=cam_invalid[name],
            excluded_invalid_cam=excluded[name],
        )
        results["ood"][name] = block
    groups = group_sets(request.groups, list(results["ood"]))
    if groups:
        results["groups"] = {
            name: {"sets": sets, **_mean_block({s: results["ood"][s] for s in sets}, request.convention)}
            for name, sets in groups.items()
        }
    results["mean"] = _mean_block(results["ood"], request.convention)
    if request.benchmark:
        results["benchmark"] = benchmark_block(request)
    if "lambda_sweep" in results["mean"]:  # the method's published top-level keys
        for key in ("best_lambda", "best_auroc", "lambda_sweep"):
            results[key] = results["mean"][key]
    if request.id_groups:
        results["id_groups"] = _id_groups(request, id_frame, selection, sweeps, results["mean"], calibration)
    results["statistics"] = {"id": stats[ID_SET]}
    for name in ood_frames:
        results["statistics"][f"ood:{name}"] = stats[name]
    return _Run(results, rows, id_frame, ood_frames, selection)


# what evaluate keeps of each score file's kept rows that no λ changes: its statistics, which of
# the columns drawn hold a number, the ID accuracy (1: first)
SUMMARY_STAGE, SUMMARY_VERSION, SUMMARY = "evaluate-summary", 1, "summary.json"


def _summaries(
    request: EvaluateRequest,
    frames: Mapping[str, ScoreTable],
    store: ArtifactStore | None,
    reporter: Reporter,
) -> dict[str, dict[str, Any]]:
    """Each set's ``statistics`` (and the ID set's ``accuracy``, and ``usable``: which score
    columns hold a number) of its kept rows: an artifact keyed by the file's digest and the rows
    kept, so a new λ grid neither computes them again nor reads the columns they need. Without a
    store, or for a table whose file's digest is unknown, computed."""
    from negalign_cli.stages.figures import _Quieter

    checked = [c for c in dict.fromkeys((*METHODS.values(), ALIGN, request.score_column)) if c]
    out = {}
    for name, frame in frames.items():
        accuracy = name == ID_SET

        def summarise(frame: ScoreTable = frame, accuracy: bool = accuracy) -> dict[str, Any]:
            summary: dict[str, Any] = {
                "statistics": statistics(_stat_columns(frame)),
                "usable": [c for c in checked if _usable(frame, c)],
            }
            return summary | ({"accuracy": id_accuracy(frame)} if accuracy else {})

        if store is None or frame.digest is None:
            summary = summarise()
        else:
            renamed = {c: frame.origin(c) for c in frame.columns if frame.origin(c) != c}  # group seeds
            params = {
                "evaluate": EVALUATE_VERSION,
                "checked": checked,
                "renamed": renamed,
                "accuracy": accuracy,
            }
            spec = StageSpec(
                SUMMARY_STAGE,
                SUMMARY_VERSION,
                params,
                {"file": str(frame.file_key), "rows": frame.rows_digest()},
            )

            def compute(folder: Path, summarise=summarise) -> None:
                (folder / SUMMARY).write_text(json.dumps(summarise()), encoding="utf-8")

            result = store.run(spec, compute, _Quieter(reporter))
            summary = json.loads(result.artifact.file(SUMMARY).read_text(encoding="utf-8"))
        frame.usable.update({c: c in summary["usable"] for c in checked})
        out[name] = summary
    return out


def _label_key(values: pd.Series) -> np.ndarray:
    """Class names compared loosely: lower case, ``_``/``-`` as spaces, outer spaces dropped."""
    text = values.astype(str).str.strip().str.lower().str.replace(r"[_\-\s]+", " ", regex=True)
    return text.to_numpy(dtype=object)


def id_accuracy(frame: ScoreTable | pd.DataFrame) -> dict[str, Any]:
    """Zero-shot top-1 accuracy on the ID set, where the score file's ``label`` column (the
    ImageFolder class folder, or a manifest's label) says what each image is: labels that are all
    integers are class indices (OpenOOD's image lists), compared with ``pred_class``; otherwise
    they are class names, compared with ``pred_name`` (case, ``_`` and ``-`` ignored), and only
    when at least half the distinct labels name a class some image was predicted as (else they are
    not class names). ImageNet-1K's WordNet ids (``n01440764``) are class indices by their sorted
    order (:func:`_wnid_accuracy`). Returns ``{"top1", "n", "labels"}``, or
    ``{"top1": None, "note"}`` saying what is missing. Integer labels of a parquet file are
    compared as arrays; other labels (names, WordNet ids) through pandas' string methods."""
    table = as_table(frame)
    if "label" not in table.columns or "pred_class" not in table.columns:
        return {"top1": None, "note": "the ID score file has no label or pred_class column"}
    indices = _index_accuracy(table)
    return indices if indices is not None else _frame_accuracy(table.to_frame())


def _index_accuracy(table: ScoreTable) -> dict[str, Any] | None:
    """``id_accuracy`` where the labels and ``pred_class`` are plain integer columns (class
    indices: every label known, every one an integer), else None."""
    if not (_signed_int(table, "label") and _signed_int(table, "pred_class")):
        return None
    hits = table.integers("label") == table.integers("pred_class")
    return {"top1": float(hits.mean()), "n": len(table), "labels": "class indices"}


def _signed_int(table: ScoreTable, column: str) -> bool:
    kind = table.kind(column)
    return kind is not None and kind.startswith("int") and not table.has_nulls(column)


def _frame_accuracy(frame: pd.DataFrame) -> dict[str, Any]:
    """``id_accuracy`` of a DataFrame with a label and a pred_class column."""
    labels = frame["label"]
    known = labels.notna() & (labels.astype(str).str.strip() != "")
    if not known.all():
        return {
            "top1": None,
            "note": f"{int((~known).sum())} of {len(frame)} ID rows have no label (list the ID images "
            "as an ImageFolder tree or a manifest with labels)",
        }
    numbers = pd.to_numeric(labels, errors="coerce")
    if numbers.notna().all() and (numbers == numbers.round()).all():
        hits = numbers.to_numpy(dtype=np.int64) == pd.to_numeric(frame["pred_class"]).to_numpy(dtype=np.int64)
        return {"top1": float(hits.mean()), "n": len(frame), "labels": "class indices"}
    text = labels.astype(str).str.strip()
    if text.str.fullmatch(r"n\d{8}").all():
        return _wnid_accuracy(frame, text)
    if "pred_name" not in frame.columns:
        return {"top1": None, "note": "the ID labels are names and the score file has no pred_name column"}
    wanted, predicted = _label_key(labels), _label_key(frame["pred_name"])
    distinct = set(wanted)
    named = distinct & set(predicted)
    if 2 * len(named) < len(distinct):
        example = sorted(distinct - named)[0]
        return {
            "top1": None,
            "note": f"the ID labels (e.g. {example!r}) are not class names: only {len(named)} of "
            f"{len(distinct)} name a predicted class",
        }
    return {"top1": float((wanted == predicted).mean()), "n": len(frame), "labels": "class names"}


def _wnid_accuracy(frame: pd.DataFrame, wnids: pd.Series) -> dict[str, Any]:
    """Top-1 where the ID labels are ImageNet-1K WordNet ids (ImageNet's class folders): each id's
    position in the sorted list of the 1,000 (``assets/imagenet_wnids.txt``) is its class index.
    Compared with ``pred_class`` when the score file's classes are the ``imagenet`` preset in its
    order (every ``pred_name`` is the preset's name at its ``pred_class``); else the id's class name
    is compared with ``pred_name``, as class names are; else a note says what is missing."""
    from negalign_cli.assets import class_presets, imagenet_wnids

    order = pd.Series(np.arange(len(imagenet_wnids())), index=list(imagenet_wnids()))
    index = wnids.map(order)
    if index.isna().any():
        outside = wnids[index.isna()]
        return {
            "top1": None,
            "note": f"{len(outside)} of {len(frame)} ID labels are WordNet ids outside ImageNet-1K's "
            f"1,000 classes (e.g. {outside.iloc[0]!r}): no class to compare the prediction with",
        }
    truth = index.to_numpy(dtype=np.int64)
    names = np.array(class_presets()["imagenet"], dtype=object)
    if "pred_name" not in frame.columns:
        return {
            "top1": None,
            "note": "the ID labels are WordNet ids and the score file has no pred_name column",
        }
    predicted = pd.to_numeric(frame["pred_class"]).to_numpy(dtype=np.int64)
    inside = (predicted >= 0) & (predicted < len(names))
    if inside.all() and (frame["pred_name"].astype(str).to_numpy() == names[predicted]).all():
        return {
            "top1": float((truth == predicted).mean()),
            "n": len(frame),
            "labels": "ImageNet-1K WordNet ids",
        }
    wanted, guessed = _label_key(pd.Series(names[truth])), _label_key(frame["pred_name"])
    distinct = set(wanted)
    if 2 * len(distinct & set(guessed)) < len(distinct):
        return {
            "top1": None,
            "note": "the ID labels are ImageNet-1K WordNet ids and the score file's classes are not "
            f"ImageNet-1K's (e.g. predicted {str(frame['pred_name'].iloc[0])!r}): "
            "score with --classes imagenet",
        }
    return {
        "top1": float((wanted == guessed).mean()),
        "n": len(frame),
        "labels": "ImageNet-1K WordNet ids, as class names",
    }


def _column_descriptions(selection: _Selection) -> dict[str, dict[str, str]]:
    """What each evaluated method computes and where it was published (from the score registry)."""
    out = {}
    for label, name in selection.columns.items():
        column = score_column(name)
        if column is not None:
            out[label] = {"column": name, "formula": column.description, "reference": column.reference}
    if selection.negalign:
        out[NEGALIGN] = {"column": f"{STAR} + λ·{ALIGN}", "formula": "S* + λ·P_align", "reference": ""}
    return out


def _read_frames(request: EvaluateRequest, digests: Mapping[str, str] | None = None) -> dict[str, ScoreTable]:
    """The ID and OOD score files (ID first), refusing files made by different models, and files
    made with different score settings, classes or negatives unless --allow-mixed-settings."""
    from negalign_cli.stages.score_files import read_score_metadata  # pyarrow: not on a hit

    known = digests or {}
    frames = {ID_SET: ScoreTable.read(request.id_path, known.get("id"))}
    frames.update({name: ScoreTable.read(path, known.get(f"ood:{name}")) for name, path in request.oods})
    metadata = {name: read_score_metadata(path) for name, path in [(ID_SET, request.id_path), *request.oods]}
    models = {name: meta.get("model") for name, meta in metadata.items()}
    if len({m for m in models.values() if m}) > 1:
        shown = ", ".join(f"{n}={m[:12]}" for n, m in models.items() if m)
        raise NegalignError(f"score files come from different models ({shown})")
    if not request.allow_mixed_settings:
        differing = _differing_settings(metadata)
        if differing:
            raise NegalignError(
                f"the score files were made with different settings ({'; '.join(differing)}): their scores "
                "are not comparable; rescore with the same settings, or pass --allow-mixed-settings"
            )
    return frames


def _differing_settings(metadata: dict[str, dict]) -> list[str]:
    """'name: ID=value, near=value' for every score setting (and the classes and negatives) that
    is not the same in all files that record it (files from other tools record none)."""
    recorded = {name: meta for name, meta in metadata.items() if meta.get("config") is not None}
    if len(recorded) < 2:
        return []
    settings: dict[str, dict[str, Any]] = {}
    for name, meta in recorded.items():
        flat = {**meta["config"], "classes": meta.get("classes"), "negatives": meta.get("negatives")}
        for key, value in flat.items():
            settings.setdefault(key, {})[name] = value
    out = []
    for key, values in sorted(settings.items()):
        if len(values) < len(recorded) or len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            shown = ", ".join(f"{n}={str(v)[:16]}" for n, v in values.items())
            out.append(f"{key}: {shown}")
    return out


def _select(request: EvaluateRequest, frames: dict[str, ScoreTable], reporter: Reporter) -> _Selection:
    """Which columns are evaluated: --score, --lambda (NegAlign), --compare (the method table);
    with none of them, the method's own score: NegAlign where P_align exists, else NegLabel*."""
    negalign_ok = all(_usable(f, STAR) and _usable(f, ALIGN) for f in frames.values())
    default_score = request.score_column is None and request.lambdas is None and not request.compare
    if request.lambdas is not None and not negalign_ok:
        raise NegalignError(
            f"--lambda needs the {STAR} and {ALIGN} columns in every file "
            f"({ALIGN} is empty when `score` ran without `cam`)"
        )
    columns: dict[str, str] = {}
    if request.score_column is not None:
        columns[request.score_column] = request.score_column
    if request.compare:
        for method, column in METHODS.items():
            if all(_usable(f, column) for f in frames.values()):
                columns[method] = column
            else:
                reporter.info(f"{method}: column {column} missing or empty in a file, left out of the table")
        if not negalign_ok:
            reporter.info(
                f"{NEGALIGN}: needs {STAR} and {ALIGN} in every file (run `cam` before `score`), left out"
            )
    if default_score and not negalign_ok and all(_usable(f, STAR) for f in frames.values()):
        columns["NegLabel*"] = STAR
    negalign = negalign_ok and (request.lambdas is not None or request.compare or default_score)
    if not columns and not negalign:
        raise NegalignError(
            "nothing to evaluate: these files have no negalign score columns; give --score COLUMN"
        )
    for name, frame in frames.items():
        absent = [
            c for c in _needed_columns(request, _Selection(columns, negalign)) if c not in frame.columns
        ]
        if absent:
            present = ", ".join(map(str, frame.columns))
            raise NegalignError(f"{name} score file lacks column(s) {', '.join(absent)}; it has {present}")
    return _Selection(columns, negalign)


def _needed_columns(request: EvaluateRequest, selection: _Selection) -> list[str]:
    return sorted(set(selection.columns.values()) | ({STAR, ALIGN} if selection.negalign else set()))


def _exclude_invalid_cams(
    frames: dict[str, ScoreTable], selection: _Selection, reporter: Reporter
) -> tuple[dict[str, int], dict[str, int]]:
    """Count rows with an invalid CAM per set; under `score --invalid-cam exclude` their P_align is
    undefined and NegAlign cannot rank them, so they leave every method's evaluation (same rows)."""
    cam_invalid, excluded = {}, {}
    for name in list(frames):
        frame = frames[name]
        invalid = _invalid_cam(frame)
        cam_invalid[name] = int(invalid.sum())
        gone = invalid & _missing(frame, ALIGN) if selection.negalign else None
        excluded[name] = int(gone.sum()) if gone is not None else 0
        if gone is not None and gone.any():
            reporter.info(
                f"{name}: {excluded[name]} row(s) with an invalid CAM excluded (--invalid-cam exclude)"
            )
            frames[name] = frame.filter(~gone)
    return cam_invalid, excluded


def _missing(frame: ScoreTable, column: str) -> np.ndarray:
    """Rows where ``column`` holds no number (``pd.to_numeric(..., errors="coerce").isna()``)."""
    if frame.plain(column):
        return np.isnan(frame.numeric(column))
    return pd.to_numeric(frame.series(column), errors="coerce").isna().to_numpy()


def _drop_nonfinite(
    frames: dict[str, ScoreTable],
    needed: list[str],
    drop: bool,
    reporter: Reporter,
    paths: Mapping[str, Path] | None = None,
) -> dict[str, int]:
    """NaN/inf in an evaluated column is an error, or (``--drop-nonfinite``) the row is left out."""
    dropped = {}
    for name in list(frames):
        where = f"{name} ({paths[name]})" if paths else name
        bad = _nonfinite_rows(frames[name], needed)
        if bad.any():
            if not drop:
                raise NegalignError(
                    f"{where}: {int(bad.sum())} row(s) have NaN/inf in {', '.join(needed)}; "
                    "pass --drop-nonfinite to leave them out"
                )
            reporter.warn(f"{where}: left out {int(bad.sum())} row(s) with NaN/inf scores")
            frames[name] = frames[name].filter(~bad)
        dropped[name] = int(bad.sum())
        if frames[name].empty:
            raise NegalignError(f"{where}: no rows left to evaluate")
    return dropped


def _nonfinite_rows(frame: ScoreTable, needed: list[str]) -> np.ndarray:
    """Rows with NaN/inf (or no number) in one of the columns ``needed``."""
    if all(frame.plain(c) for c in needed):
        bad = np.zeros(len(frame), dtype=bool)
        for column in needed:  # a handful of columns, each vectorised over every row
            bad |= ~np.isfinite(frame.numeric(column))
        return bad
    values = frame.to_frame()[needed].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    return ~np.isfinite(values).all(axis=1)


def _drop_overflow(
    frames: dict[str, ScoreTable],
    lambdas: Sequence[float],
    calibration: dict | None,
    drop: bool,
    reporter: Reporter,
    paths: Mapping[str, Path] | None = None,
) -> dict[str, int]:
    """Finite S* and P_align too large to combine: S_final = S* + λ·P_align (z-scored with M3's
    statistics when there are any) overflows to inf at one of ``lambdas``. An error naming the
    file and the columns, or (``--drop-nonfinite``) the row is left out, as NaN/inf rows are."""
    dropped = {}
    combined = f"{STAR} + λ·{ALIGN}"
    if calibration is not None:
        combined += f" (z-scored, M3 statistics {calibration['source']})"
    for name in list(frames):
        where = f"{name} ({paths[name]})" if paths else name
        star, align = _values(frames[name], STAR), _values(frames[name], ALIGN)
        bad = nonfinite_final(star, align, lambdas, calibration)
        if bad.any():
            if not drop:
                first = int(np.flatnonzero(bad)[0])
                at = [lam for lam in lambdas if nonfinite_final(star, align, [lam], calibration).any()]
                raise NegalignError(
                    f"{where}: S_final = {combined} overflows to inf for {int(bad.sum())} row(s) at λ = "
                    f"{', '.join(f'{lam:g}' for lam in at)} (first: row {frames[name].row_label(first)}, "
                    f"{STAR}={star[first]:.4g}, {ALIGN}={align[first]:.4g}): finite scores too large to "
                    "combine; check how the file was made, or pass --drop-nonfinite to leave them out"
                )
            reporter.warn(f"{where}: left out {int(bad.sum())} row(s) whose S_final = {combined} overflows")
            frames[name] = frames[name].filter(~bad)
            if frames[name].empty:
                raise NegalignError(f"{where}: no rows left to evaluate")
        dropped[name] = int(bad.sum())
    return dropped


def _values(frame: ScoreTable, name: str) -> np.ndarray:
    return frame.numeric(name, errors="raise")


def _calibration(request: EvaluateRequest, id_frame: ScoreTable, seed: int | None = None) -> dict | None:
    """M3's statistics: from --calibration FILE (group seed ``seed``'s where the file has them per
    seed), or fitted on the ID set; None without M3."""
    if request.calibration_path is not None:
        path = request.calibration_path
        seed = seed if seed is not None else _recorded_seed(request.id_path)
        return {**load_calibration(path, seed=seed), "source": str(path)}
    if request.scale_stabilize:
        return {
            **fit_calibration(_values(id_frame, STAR), _values(id_frame, ALIGN)),
            "source": FITTED,
        }
    return None


def _recorded_seed(path: Path) -> int | None:
    """The group seed a score file of one seed was made with (``score --group-seed S``; 0 by
    default), or None where the file does not say (CSV files, files of earlier versions)."""
    from negalign_cli.stages.score_files import read_score_metadata  # pyarrow: not on a hit

    seed = (read_score_metadata(path).get("config") or {}).get("group_seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def _lambdas(request: EvaluateRequest) -> list[float]:
    """The λ NegAlign is evaluated at: --lambda, else the published sweep."""
    return request.lambdas or list(DEFAULT_LAMBDAS)


def _check_calibration(calibration: dict | None, paths: Mapping[str, Path]) -> None:
    """M3's statistics must be finite (an infinite std would make every z-score 0), their
    standard deviations not negative."""
    problem = calibration_problem(calibration) if calibration is not None else None
    if calibration is not None and problem is not None:
        fix = (
            f"the ID scores ({paths[ID_SET]}) cannot be standardised; check how the file was made"
            if calibration["source"] == FITTED
            else "give the calibration block of a results.json written by `evaluate --scale-stabilize`"
        )
        raise NegalignError(f"M3 statistics ({calibration['source']}) hold {problem}: {fix}")


def _sweeps(
    request: EvaluateRequest,
    id_frame: ScoreTable,
    ood_frames: dict[str, ScoreTable],
    calibration: dict | None,
) -> dict[str, dict[float, dict]]:
    oods = {name: (_values(frame, STAR), _values(frame, ALIGN)) for name, frame in ood_frames.items()}
    id_star, id_align = _values(id_frame, STAR), _values(id_frame, ALIGN)
    return lambda_sweeps(id_star, id_align, oods, _lambdas(request), calibration)


def _choose_lambdas(request: EvaluateRequest, sweeps: dict[str, dict]) -> tuple[dict[str, float], str | None]:
    """λ per OOD set: the best on each set (the method's protocol, optimistic), or the best on
    the validation set ``--select-lambda-on`` applied to every set."""
    if not sweeps:
        return {}, None
    if request.select_on is not None:
        lam = best_lambda(sweeps[request.select_on], request.convention)
        return {name: lam for name in sweeps}, (
            f"best AUROC on the OOD set {request.select_on!r}, applied to every set "
            f"({request.select_on!r} still counts in the mean; --ood-group test=SET,... gives a mean over "
            "the test sets alone)"
        )
    chosen = {name: best_lambda(sweep, request.convention) for name, sweep in sweeps.items()}
    return chosen, "best AUROC on each test OOD set (the method's published protocol; optimistic)"


def _ood_block(
    request: EvaluateRequest,
    name: str,
    id_frame: ScoreTable,
    frame: ScoreTable,
    selection: _Selection,
    sweep: dict[float, dict] | None,
    lam: float | None,
    rows: list[dict],
    stats: Mapping[str, dict] | None = None,
) -> dict[str, Any]:
    """One OOD set's results (and its rows of metrics.csv, appended to ``rows``); ``stats``: each
    file's ``statistics`` by set name, when already computed."""
    if stats is None:
        stats = {ID_SET: statistics(_stat_columns(id_frame)), name: statistics(_stat_columns(frame))}
    block: dict[str, Any] = {
        "file": str(dict(request.oods)[name]),
        "n": len(frame),
        "statistics": {"id": stats[ID_SET], "ood": stats[name]},
        "methods": {},
    }
    for method, column in selection.columns.items():
        metrics = all_metrics(_values(id_frame, column), _values(frame, column))
        block["methods"][method] = {"column": column, "metrics": metrics}
        rows.append(_row(name, method, None, metrics, request.convention))
    if sweep is not None and lam is not None:
        block["best_lambda"] = best_lambda(sweep, request.convention)
        block["best_auroc"] = sweep[block["best_lambda"]][request.convention]["auroc"]
        block["lambda_sweep"] = {str(value): {"lambda": value, "metrics": m} for value, m in sweep.items()}
        block["methods"][NEGALIGN] = {"column": f"{STAR} + λ·{ALIGN}", "lambda": lam, "metrics": sweep[lam]}
        rows.append(_row(name, NEGALIGN, lam, sweep[lam], request.convention))
        for other, metrics in sweep.items():
            rows.append(_row(name, f"{NEGALIGN} sweep", other, metrics, request.convention))
    return block


# ----------------------------------------------------------------------------- ID subgroups
def _file_digest(path: Path, stat_cache: StatCache | None = None) -> str:
    return sha256_files([path], stat_cache)[0]


def _group_digest(path: Path) -> str:
    """What the cache key records of a group (a manifest or a folder): the real paths it lists,
    all that its result depends on (a manifest's paths are relative to its folder: the same bytes
    elsewhere are another group)."""
    if not path.exists():
        raise NegalignError(f"--id-group file not found: {path}")
    return hashlib.sha256("\n".join(_group_paths(path)).encode()).hexdigest()


def _group_paths(path: Path) -> list[str]:
    """The real paths a group lists (a manifest, relative to its folder, or a folder of images).
    Nothing is read but the list: a group may name images anywhere."""
    from negalign_cli.inputs.listing import list_images

    return [os.path.realpath(p) for p in list_images(path, allow_outside_root=True).paths]


def _id_groups(
    request: EvaluateRequest,
    id_frame: ScoreTable,
    selection: _Selection,
    sweeps: dict[str, dict[float, dict]],
    mean: dict,
    calibration: dict | None,
) -> dict[str, Any]:
    """Per ID subgroup: the share of its images each method rejects at the threshold that keeps
    95% of all ID images (NegAlign at every swept λ). Images are matched by their real path."""
    if "path" not in id_frame.columns:
        raise NegalignError("--id-group matches images by path, and the ID score file has no path column")
    real = np.array([os.path.realpath(str(p)) for p in id_frame.series("path")], dtype=object)
    scores = {method: _values(id_frame, column) for method, column in selection.columns.items()}
    lambdas = sorted(next(iter(sweeps.values()))) if sweeps else []
    sweep_scores = {
        lam: final_score(_values(id_frame, STAR), _values(id_frame, ALIGN), lam, calibration)
        for lam in lambdas
    }
    lam = mean["methods"].get(NEGALIGN, {}).get("lambda")
    out: dict[str, Any] = {}
    for name, path in request.id_groups:
        listed = set(_group_paths(path))
        in_group = np.isin(real, list(listed))
        if not in_group.any():
            raise NegalignError(
                f"--id-group {name}: none of its {len(listed)} image(s) is a row of the ID score file "
                "(images are matched by path: list the files the ID set was scored from)"
            )
        rejected = {method: group_rejection(values, in_group) for method, values in scores.items()}
        if lam is not None:
            rejected[NEGALIGN] = group_rejection(sweep_scores[lam], in_group)
        out[name] = {
            "file": str(path),
            "n": int(in_group.sum()),
            "listed_not_in_id": len(listed - set(real[in_group])),
            "keep": RECALL_LEVEL,
            "rejected": rejected,
            "negalign_sweep": {
                str(value): group_rejection(values, in_group) for value, values in sweep_scores.items()
            },
        }
    return out


def _metric_rows(run: _Run) -> list[dict]:
    """metrics.csv's rows: per set, per group and the mean."""
    results, convention = run.results, run.results["metrics_convention"]
    return run.rows + [
        _row(name, m, b.get("lambda"), b["metrics"], convention)
        for name, block in [*results.get("groups", {}).items(), (MEAN, results["mean"])]
        for m, b in block["methods"].items()
    ]


def _write_outputs(
    folder: Path,
    request: EvaluateRequest,
    results: dict,
    metric_rows: list[dict],
    id_frame: ScoreTable,
    ood_frames: dict[str, ScoreTable],
    store: ArtifactStore | None = None,
    reporter: Reporter | None = None,
    figures: dict | None = None,
) -> None:
    """results.json, metrics.csv (``metric_rows``: per set, per group and the mean), table.csv (the
    paper-style table, ``paper_table``), roc.png and score_hist.png (of ``figures``, the results the
    frames were evaluated to, when ``results`` summarise several group seeds).
    The figures are copied from the cache (``store``) when their data are unchanged: the
    histograms of the stored columns whatever the λ grid, the ROC curves unless NegAlign's λ
    changed."""
    from negalign_cli.stages.csv_rows import write_rows_csv
    from negalign_cli.stages.results_json import dumps_results  # null for NaN/inf: standard JSON

    (folder / files.RESULTS).write_text(dumps_results(results), encoding="utf-8")
    # what pd.DataFrame(rows).to_csv(path, index=False, ...) wrote, without importing pandas
    write_rows_csv(folder / files.METRICS, metric_rows, float_format="%.4f")
    from negalign_cli.stages.paper_table import csv_rows, paper_table

    write_rows_csv(folder / files.TABLE, csv_rows(paper_table(results)))
    roc_figure(store, folder / files.ROC_PLOT, figures or results, id_frame, ood_frames, reporter)
    frames = {ID_SET: id_frame, **ood_frames}
    components = [
        c
        for c in (*METHODS.values(), ALIGN, request.score_column)
        if c and all(_usable(f, c) for f in frames.values())
    ]
    histogram_figure(
        store, folder / files.HISTOGRAM_PLOT, id_frame, ood_frames, list(dict.fromkeys(components)), reporter
    )


def histogram_figure(
    store: ArtifactStore | None,
    target: Path,
    id_frame: ScoreTable | pd.DataFrame,
    ood_frames: Mapping[str, ScoreTable | pd.DataFrame],
    columns: list[str],
    reporter: Reporter | None = None,
) -> bool:
    """score_hist.png (``plots.plot_histograms``) from the cache when the columns drawn, their
    values and labels are unchanged, else drawn. Returns whether it came from the cache."""
    from negalign_cli.stages import plots
    from negalign_cli.stages.figures import cached_figure

    tables = {ID_SET: as_table(id_frame), **{name: as_table(f) for name, f in ood_frames.items()}}

    named = all(t.digest is not None for t in tables.values())  # keyed by the files, not their data

    def drawn(frame: ScoreTable) -> dict[str, Any]:  # the values the histograms bin
        return {c: _column_token(frame, c, "drawn") if named else _drawn_values(frame, c) for c in columns}

    def draw(path: Path) -> None:  # the DataFrames the histograms are drawn from (imports pandas)
        frames = {name: table.to_frame() for name, table in tables.items()}
        id_rows = frames.pop(ID_SET)
        plots.plot_histograms(path, id_rows, frames, columns)

    material = {
        "columns": columns,
        "labels": {c: (known.label if (known := score_column(c)) else c) for c in columns},
        "id": drawn(tables[ID_SET]),
        "ood": {name: drawn(frame) for name, frame in tables.items() if name != ID_SET},
    }
    return cached_figure(store, "histograms", material, draw, target, reporter)


def roc_figure(
    store: ArtifactStore | None,
    target: Path,
    results: dict,
    id_frame: ScoreTable | pd.DataFrame,
    ood_frames: Mapping[str, ScoreTable | pd.DataFrame],
    reporter: Reporter | None = None,
) -> bool:
    """roc.png (``plots.plot_roc`` of ``roc_curves``) from the cache when the curves are those of
    a figure drawn before, else drawn. The key names what the curves are computed from (each
    file's digest, the kept rows, each method's column or λ and M3 statistics) when every file's
    digest is known, else it hashes the curves. Returns whether it came from the cache."""
    from negalign_cli.stages import plots
    from negalign_cli.stages.figures import cached_figure

    id_table = as_table(id_frame)
    tables = {name: as_table(frame) for name, frame in ood_frames.items()}
    if id_table.digest is not None and all(t.digest is not None for t in tables.values()):
        material: Any = _roc_material(results, id_table, tables)
    else:
        material = roc_curves(results, id_table, tables)

    def draw(path: Path) -> None:
        plots.plot_roc(path, roc_curves(results, id_table, tables))

    return cached_figure(store, "roc", material, draw, target, reporter)


def _roc_material(results: dict, id_table: ScoreTable, tables: Mapping[str, ScoreTable]) -> dict[str, Any]:
    """What ``roc_curves`` computes each curve from, without computing it (the figure's key)."""
    calibration = results.get("calibration")
    m3 = {c: calibration[c] for c in (STAR, ALIGN)} if calibration is not None else None

    def scores(entry: dict, table: ScoreTable) -> Any:  # ``method_scores``' inputs
        if "lambda" in entry:
            parts = [_column_token(table, STAR, "values"), _column_token(table, ALIGN, "values")]
            return {"final": parts, "lambda": float(entry["lambda"]), "m3": m3}
        return _column_token(table, entry["column"], "values")

    return {
        name: {
            method_label(method, entry): (scores(entry, id_table), scores(entry, table))
            for method, entry in results["ood"][name]["methods"].items()
        }
        for name, table in tables.items()
    }


def _column_token(frame: ScoreTable, column: str, how: str) -> dict[str, str]:
    """What a figure key records of column ``column``'s kept values (converted ``how``: "drawn"
    by ``_drawn_values``, "values" by ``_values``): the file's digest, its column and the rows
    kept, which determine them (the conversions are pinned by tests/test_lambda_grid_read.py)."""
    return {
        "file": str(frame.file_key),
        "column": frame.origin(column),
        "rows": frame.rows_digest(),
        "as": how,
    }


def _drawn_values(frame: ScoreTable, column: str) -> np.ndarray:
    """``pd.to_numeric(column, errors="coerce").to_numpy(float64, na_value=nan)``."""
    if frame.plain(column):
        return frame.numeric(column)
    values = pd.to_numeric(frame.series(column), errors="coerce")
    return values.to_numpy(dtype=np.float64, na_value=np.nan)


def method_label(method: str, entry: dict) -> str:
    """A method's name as tables and figures show it: NegAlign with the λ it used."""
    lam = entry.get("lambda")
    if method == NEGALIGN:
        chosen = set((entry.get("lambda_by_seed") or {}).values()) | {lam}  # each group seed's λ
        if None in chosen:
            return f"{method} (λ per set)"
        return f"{method} (λ={lam:g})" if len(chosen) == 1 else f"{method} (λ per seed)"
    return method


def method_scores(entry: dict, frame: ScoreTable | pd.DataFrame, calibration: dict | None) -> np.ndarray:
    """The scores one method entry of results.json gave the rows of ``frame``: its column, or for
    NegAlign S* + λ·P_align at the entry's λ (z-scored with M3's statistics when there are any)."""
    frame = as_table(frame)
    if "lambda" in entry:
        return final_score(_values(frame, STAR), _values(frame, ALIGN), float(entry["lambda"]), calibration)
    return _values(frame, entry["column"])


def roc_curves(
    results: dict, id_frame: ScoreTable | pd.DataFrame, ood_frames: Mapping[str, ScoreTable | pd.DataFrame]
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """OOD set → method label → (ID scores, OOD scores), every method of the table."""
    calibration = results.get("calibration")
    return {
        name: {
            method_label(method, entry): (
                method_scores(entry, id_frame, calibration),
                method_scores(entry, frame, calibration),
            )
            for method, entry in results["ood"][name]["methods"].items()
        }
        for name, frame in ood_frames.items()
    }


def evaluated_rows(results: dict, frames: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The rows of the score files (``frames``: "ID" and the OOD names) that ``evaluate`` kept,
    by the same rules (invalid CAMs under ``--invalid-cam exclude``, NaN/inf rows under
    ``--drop-nonfinite``), for figures drawn later from the same files."""
    tables = {name: as_table(frame) for name, frame in frames.items()}
    return {name: table.to_frame() for name, table in evaluated_tables(results, tables).items()}


def evaluated_tables(results: dict, frames: Mapping[str, ScoreTable]) -> dict[str, ScoreTable]:
    """``evaluated_rows`` of ScoreTables (which know the rows of their files they keep)."""
    first = next(iter(results["ood"].values()))["methods"]
    columns = {m: e["column"] for m, e in first.items() if m != NEGALIGN}
    selection = _Selection(columns, NEGALIGN in first)
    frames = dict(frames)
    _exclude_invalid_cams(frames, selection, NullReporter())
    silent = RecordingReporter()  # evaluate said what it left out
    _drop_nonfinite(frames, _needed_columns(EvaluateRequest(Path(), []), selection), True, silent)
    if selection.negalign:
        sweep = next(iter(results["ood"].values()))["lambda_sweep"]
        lambdas = [float(entry["lambda"]) for entry in sweep.values()]
        _drop_overflow(frames, lambdas, results.get("calibration"), True, silent)
    return frames


def _stat_columns(frame: ScoreTable) -> dict[str, np.ndarray]:
    out = {}
    for name in SCORE_COLUMNS:
        if name in frame.columns:
            out[name] = frame.numeric(name)
    if "cam_valid" not in frame.columns:
        return out
    kind = frame.kind("cam_valid")
    if kind == "bool":
        if len(frame):
            out["cam_valid"] = frame.bools("cam_valid")
    elif kind is not None:  # a number: True where not 0, NaN (a missing value) as False
        values = frame.numeric("cam_valid")
        known = ~np.isnan(values)
        if known.any():
            out["cam_valid"] = known & (values != 0)
    else:
        valid = frame.series("cam_valid")
        if valid.notna().any():
            out["cam_valid"] = valid.fillna(False).to_numpy(dtype=bool)
    return out


def _row(ood: str, method: str, lam: float | None, metrics: dict, convention: str) -> dict:
    chosen = metrics[convention]
    return {
        "ood": ood,
        "method": method,
        "lambda": lam,
        "convention": convention,
        "auroc_pct": 100 * chosen["auroc"],
        "fpr95_pct": 100 * chosen["fpr95"],
        "aupr_in_pct": 100 * chosen["aupr_in"],
        "aupr_out_pct": 100 * chosen["aupr_out"],
    }


def _mean_block(blocks: dict[str, dict], convention: str) -> dict:
    mean: dict[str, Any] = {"methods": {}}
    first = next(iter(blocks.values()))
    for method in first["methods"]:
        entries = [b["methods"][method] for b in blocks.values()]
        mean["methods"][method] = {"metrics": average_metrics([e["metrics"] for e in entries])}
        if "lambda" in entries[0]:
            mean["methods"][method]["lambda"] = (
                entries[0]["lambda"] if len({e["lambda"] for e in entries}) == 1 else None
            )
    if "lambda_sweep" in first:
        sweep = {
            key: {
                "lambda": first["lambda_sweep"][key]["lambda"],
                "metrics": average_metrics([b["lambda_sweep"][key]["metrics"] for b in blocks.values()]),
            }
            for key in first["lambda_sweep"]
        }
        best = max(sorted(sweep, key=float), key=lambda k: sweep[k]["metrics"][convention]["auroc"])
        mean.update(
            best_lambda=sweep[best]["lambda"],
            best_auroc=sweep[best]["metrics"][convention]["auroc"],
            lambda_sweep=sweep,
        )
    return mean


def _score_configs(request: EvaluateRequest) -> dict[str, Any]:
    from negalign_cli.stages.score_files import read_score_metadata

    configs = {ID_SET: read_score_metadata(request.id_path).get("config")}
    for name, path in request.oods:
        configs[name] = read_score_metadata(path).get("config")
    return configs
