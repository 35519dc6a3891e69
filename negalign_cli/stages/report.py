"""The ``report`` stage: an ``evaluate`` folder as one self-contained HTML page, Markdown and LaTeX.

Reads ``RESULTS_DIR`` (an ``evaluate --out`` folder or artifact: ``results.json`` and its
``manifest.json``), finds the score files it evaluated (checked against the digests the manifest
recorded) and, beside each, the ``score`` manifest naming the ``cam`` folder it scored. Writes
``report.html`` (inline CSS, figures as ``data:`` URIs: it needs no network and no other file),
``report.md`` and ``report.tex`` (the same method table; they include ``figures/*.png``) and
``figures/``. What cannot be found (a score file moved, no CAM outputs) leaves its figure out, and
the report says so. The text is rendered again each time (it is cheap); each figure is an artifact
of the ``figure`` stage (:mod:`negalign_cli.stages.figures`), keyed by the data it is drawn from,
so a second report of the same folder copies its PNGs from the cache instead of drawing them. It
is written into a temporary folder inside ``--out`` and renamed into place.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from negalign_cli import __version__
from negalign_cli.cache.statcache import StatCache, sha256_files
from negalign_cli.cache.store import MANIFEST, ArtifactStore, verify_folder
from negalign_cli.compute.metrics import CONVENTIONS
from negalign_cli.defaults import DEFAULT_REPORT_CELLS, NEGALIGN
from negalign_cli.errors import NegalignError
from negalign_cli.reporting import NullReporter, Reporter
from negalign_cli.stages import files

if TYPE_CHECKING:
    from negalign_cli.stages.score_table import ScoreTable

# (key in results.json, column title, higher is better)
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("auroc", "AUROC", True),
    ("fpr95", "FPR@95", False),
    ("aupr_in", "AUPR-In", True),
    ("aupr_out", "AUPR-Out", True),
)
TEMPLATES = ("report.html.j2", "report.md.j2", "report.tex.j2")


@dataclass
class ScoreSet:
    """One evaluated score file (ID or an OOD set) and what was found beside it."""

    name: str
    recorded: str  # the path results.json recorded
    path: Path | None = None
    digest: str | None = None  # what evaluate's manifest recorded
    frame: pd.DataFrame | None = None
    table: ScoreTable | None = None  # the same rows, with the file's digest
    manifest: dict = field(default_factory=dict)  # the score artifact's manifest.json
    cam_folder: Path | None = None
    cam_manifest: dict = field(default_factory=dict)
    problem: str | None = None
    cam_problem: str | None = None  # why CAM outputs found beside it are not used


@dataclass
class ReportResult:
    out: Path
    written: list[Path]
    notes: list[str]


def _read_json(path: Path, what: str) -> dict:
    """A JSON file (a results.json's non-finite values put back: ``stages/results_json``)."""
    from negalign_cli.stages.results_json import loads_results

    try:
        return loads_results(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NegalignError(f"cannot read {what} {path}: {str(exc).splitlines()[0][:120]}") from exc


def _locate(recorded: str, bases: list[Path]) -> Path | None:
    """A path as recorded (absolute, or relative to where the command ran): tried as it is, then
    against each folder of ``bases`` (the results folder and its parents)."""
    path = Path(recorded).expanduser()
    if path.is_absolute():
        return path if path.exists() else None
    for base in [Path.cwd(), *bases]:
        if (base / path).exists():
            return base / path
    return None


def _bases(results_dir: Path) -> list[Path]:
    results_dir = results_dir.resolve()
    return [results_dir, *list(results_dir.parents)[:4]]


# every figure a report draws (those it cannot draw this time are removed from --out's figures/)
REPORT_FIGURES = (files.LAMBDA_PLOT, files.ROC_PLOT, files.HISTOGRAM_PLOT, files.CAM_GRID_PLOT)


def load_score_sets(
    results: dict, evaluate_manifest: dict, results_dir: Path, stat_cache: StatCache | None = None
) -> list[ScoreSet]:
    """ID then each OOD set, each with its frame (the rows evaluate kept) and CAM folder when found.
    Each score file is checked against the digest evaluate recorded (through ``stat_cache``: an
    unchanged file is not read for it)."""
    from negalign_cli.stages.evaluation import evaluated_tables, read_score_file
    from negalign_cli.stages.score_table import ScoreTable, score_file_format

    bases = _bases(results_dir)
    inputs = evaluate_manifest.get("inputs", {})
    sets = [ScoreSet("ID", results["id"]["file"], digest=inputs.get("id"))]
    sets += [
        ScoreSet(name, block["file"], digest=inputs.get(f"ood:{name}"))
        for name, block in results["ood"].items()
    ]
    for entry in sets:
        entry.path = _locate(entry.recorded, bases)
        if entry.path is None or not entry.path.is_file():
            entry.problem = f"score file {entry.recorded} not found"
            continue
        if entry.digest and sha256_files([entry.path], stat_cache)[0] != entry.digest:
            entry.problem = f"{entry.path} is not the file that was evaluated (its sha256 differs)"
            continue
        entry.frame = read_score_file(entry.path)
        manifest_path = entry.path.parent / MANIFEST
        if manifest_path.is_file():
            manifest = _read_json(manifest_path, "score manifest")
            digest = entry.digest or sha256_files([entry.path], stat_cache)[0]
            if _lists_output(manifest, digest):
                entry.manifest = manifest
            else:  # score files gathered in one folder: the manifest there is another file's
                entry.cam_problem = f"the manifest.json beside {entry.path} is another score file's"
        if entry.manifest:
            entry.cam_folder, entry.cam_manifest, entry.cam_problem = _scored_cams(
                entry.manifest, bases, stat_cache
            )
    found = {
        s.name: ScoreTable.from_frame(s.frame, s.digest, score_file_format(s.path) if s.path else None)
        for s in sets
        if s.frame is not None
    }
    if found:  # each set's rows as evaluate kept them (a set whose file is missing has none to keep)
        kept = evaluated_tables(results, found)  # knowing their files: figure keys name them
        for entry in sets:
            if entry.name in kept:
                entry.table = kept[entry.name]
                entry.frame = entry.table.to_frame()
    return sets


def _lists_output(manifest: dict, digest: str) -> bool:
    """Whether an artifact's manifest lists an output of sha256 ``digest``."""
    outputs = manifest.get("outputs")
    return isinstance(outputs, dict) and any(
        isinstance(entry, dict) and entry.get("sha256") == digest for entry in outputs.values()
    )


def _scored_cams(
    manifest: dict, bases: list[Path], stat_cache: StatCache | None
) -> tuple[Path | None, dict, str | None]:
    """The CAM folder a score artifact was computed from (its manifest's ``cam_dir``, else its
    ``images_dir``), its manifest, and why it is not used: its cams.npy and cam.parquet must be
    the files its manifest lists, and that cam.parquet the one the scores were computed from (a
    `cam` run again into the folder, or another set's folder, would caption and overlay other
    images' CAMs). (None, {}, None): no CAM outputs recorded or found."""
    recorded = manifest.get("cam_dir") or manifest.get("images_dir")
    folder = _locate(recorded, bases) if isinstance(recorded, str) and recorded else None
    if folder is None or not (folder / files.CAMS).is_file() or not (folder / files.CAM_TABLE).is_file():
        return None, {}, None
    cam_manifest, _ = verify_folder(folder, (files.CAMS, files.CAM_TABLE), stat_cache)  # sizes, sha256
    scored = (manifest.get("inputs") or {}).get("cam")
    if scored is None or (cam_manifest is None and not (folder / MANIFEST).is_file()):
        return None, {}, f"the CAM outputs in {folder} have no manifest to check them against"
    if cam_manifest is None or cam_manifest["outputs"][files.CAM_TABLE].get("sha256") != scored:
        return None, {}, f"the CAM outputs in {folder} are not the ones its scores were computed from"
    return folder, cam_manifest, None


# --- the method table -------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return f"{100 * value:.2f}"


def method_table(results: dict, convention: str) -> list[dict[str, Any]]:
    """Blocks of rows: each OOD set, each ``--ood-group`` mean, then the mean over all sets; in
    each block one row per method with its four metrics (percent, 2 decimals) and which of them
    are the block's best (ties all marked)."""
    blocks: list[tuple[str, str, dict]] = [(name, "set", block) for name, block in results["ood"].items()]
    blocks += [(name, "group", block) for name, block in results.get("groups", {}).items()]
    if len(results["ood"]) > 1:
        blocks.append(("mean", "mean", results["mean"]))
    from negalign_cli.stages.evaluation import method_label

    table = []
    for name, kind, block in blocks:
        rows: list[dict[str, Any]] = []
        for method, entry in block["methods"].items():
            values = {key: _fmt(entry["metrics"][convention][key]) for key, _, _ in METRICS}
            rows.append({"method": method_label(method, entry), "values": values, "best": set()})
        for key, _, higher in METRICS:
            shown = [float(row["values"][key]) for row in rows]
            target = max(shown) if higher else min(shown)
            for row, value in zip(rows, shown, strict=True):
                if len(rows) > 1 and value == target:
                    row["best"].add(key)
        for row, entry in zip(rows, block["methods"].values(), strict=True):  # mean±std over group seeds
            std = (entry.get("std") or {}).get(convention)
            if std is not None:
                row["values"] = {key: f"{value}±{_fmt(std[key])}" for key, value in row["values"].items()}
        label = name
        if kind == "group":
            label = f"{name} (mean of {', '.join(block['sets'])})"
        elif kind == "mean":
            label = f"mean of the {len(results['ood'])} OOD sets"
        n = results["ood"][name]["n"] if kind == "set" else None
        table.append({"name": name, "label": label, "kind": kind, "n": n, "rows": rows})
    return table


def paper_context(results: dict) -> dict[str, Any]:
    """The paper-style table (``paper_table``) as the templates show it: text only."""
    from negalign_cli.stages.paper_table import cell_text, column_title, footnotes, heading, paper_table

    paper = paper_table(results)
    return {
        "heading": heading(paper),
        "columns": [column_title(paper, c) for c in paper.columns],
        "rows": [
            {
                "label": paper.label(row),
                "source": row.source,
                "cells": [cell_text(row.cells.get(c)) for c in paper.columns],
            }
            for row in paper.rows
        ],
        "footnotes": footnotes(paper),
    }


def id_group_context(results: dict) -> dict[str, Any] | None:
    """``evaluate --id-group``'s table: per method (rows) and ID subgroup (columns), the share of
    the subgroup each method rejects at the threshold that keeps 95% of all ID images (so 5% of
    all ID: the first row); then NegAlign's share at each λ of the sweep. None without groups."""
    groups = results.get("id_groups") or {}
    if not groups:
        return None
    from negalign_cli.stages.evaluation import method_label

    names = list(groups)
    first = groups[names[0]]
    keep = float(first["keep"])
    mean_methods = results.get("mean", {}).get("methods", {})
    methods = list(dict.fromkeys(m for g in groups.values() for m in g["rejected"]))
    rows = [
        {
            "label": method_label(m, mean_methods.get(m, {})),
            "cells": [_share(groups[n]["rejected"].get(m)) for n in names],
        }
        for m in methods
    ]
    lambdas = list(dict.fromkeys(k for g in groups.values() for k in g.get("negalign_sweep", {})))
    sweep = [
        {
            "label": f"NegAlign at λ={float(k):g} (sweep)",
            "cells": [_share(groups[n].get("negalign_sweep", {}).get(k)) for n in names],
        }
        for k in lambdas
    ]
    return {
        "heading": f"Share of each ID subgroup rejected (in %) at the threshold that keeps "
        f"{100 * keep:g}% of all ID images (so {100 * (1 - keep):g}% of all ID is rejected): a share "
        "above that marks the subgroup a score treats as OOD",
        "columns": [f"{n} ({groups[n]['n']} images)" for n in names],
        "all_id": f"{100 * (1 - keep):.1f}",
        "rows": rows,
        "sweep": sweep,
        "notes": [
            f"{n}: {g['listed_not_in_id']} listed image(s) are not rows of the ID score file"
            for n, g in groups.items()
            if g.get("listed_not_in_id")
        ],
    }


def _share(value: float | None) -> str:
    return "—" if value is None else f"{100 * float(value):.1f}"


# --- figures ----------------------------------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels of a PNG, from its header: report.html shows each figure at its
    own width (one PNG pixel per CSS pixel), so that its text keeps the size it was drawn at."""
    with open(path, "rb") as handle:
        header = handle.read(24)
    if header[:8] != b"\x89PNG\r\n\x1a\n" or header[12:16] != b"IHDR":
        raise NegalignError(f"{path} is not a PNG file")
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def _main_entry(results: dict, set_name: str | None) -> tuple[str, dict]:
    """The score the CAM grid ranks by: NegAlign where evaluated (at the set's λ; for ID the
    common λ, else the first set's), else the first method of the table."""
    block = results["ood"][set_name] if set_name else next(iter(results["ood"].values()))
    methods = block["methods"]
    if NEGALIGN in methods:
        entry = methods[NEGALIGN]
        if set_name is None and results["mean"]["methods"][NEGALIGN].get("lambda") is not None:
            entry = {**entry, "lambda": results["mean"]["methods"][NEGALIGN]["lambda"]}
        return NEGALIGN, entry
    method = next(iter(methods))
    return method, methods[method]


@dataclass
class _CamPick:
    """One cell of the CAM grid before it is drawn: the image and its mask are read only when the
    grid is (a cached grid needs neither)."""

    image: Path
    mask_path: Path | None
    cam: np.ndarray
    caption: str


def _cam_picks(
    results: dict, sets: list[ScoreSet], cells: int
) -> tuple[list[tuple[str, list[_CamPick]]], list[str]]:
    """The CAM grid's rows (the most and least ID-like images of each set, by the score the
    grid ranks by) without reading an image; notes on what was left out."""
    from negalign_cli.inputs.masks import find_mask
    from negalign_cli.stages.evaluation import method_label, method_scores

    rows, notes = [], []
    bases = _bases(Path.cwd())
    for entry in sets:
        if entry.frame is None or entry.cam_folder is None:
            why = entry.cam_problem or "no CAM outputs found beside its score file"
            notes.append(f"{entry.name}: {why}; left out of the CAM grid")
            continue
        method, chosen = _main_entry(results, None if entry.name == "ID" else entry.name)
        scores = method_scores(chosen, entry.frame, results.get("calibration"))
        order = np.argsort(-scores, kind="mergesort")
        cams = np.load(entry.cam_folder / files.CAMS, mmap_mode="r")
        meta = pd.read_parquet(entry.cam_folder / files.CAM_TABLE)
        k = min(cells, len(order) // 2 or 1)
        label = method_label(method, chosen)
        for title, picks in (("most ID-like", order[:k]), ("least ID-like", order[::-1][:k])):
            row_cells = []
            for rank, index in enumerate(picks, 1):
                record = entry.frame.iloc[int(index)]
                image = _locate(str(record["path"]), bases) or Path(str(record["path"]))
                if not image.is_file():
                    notes.append(f"{entry.name}: image {record['path']} not found; left out of the CAM grid")
                    continue
                row = int(record["row"])
                valid = bool(meta["cam_valid"].iloc[row])
                caption = (
                    f"#{rank} {label}: {scores[index]:.4g}\n"
                    f"predicted class: {meta['pred_name'].iloc[row]}\n"
                    f"cosine to it: {float(meta['pred_score'].iloc[row]):.3f}"
                    + ("" if valid else "\nCAM invalid")
                )
                row_cells.append(_CamPick(image, find_mask(image), np.asarray(cams[row]), caption))
            if row_cells:
                rows.append((f"{entry.name}: {title}", row_cells))
    return rows, notes


def _cam_cells(picks: list[tuple[str, list[_CamPick]]], size: int) -> list:
    """The grid's cells drawn from ``picks``: each image's centre square, its mask where known."""
    from negalign_cli.stages.plots import CamCell, centre_square

    return [
        (
            title,
            [
                CamCell(
                    centre_square(p.image, size),
                    p.cam,
                    centre_square(p.mask_path, size, "L") > 127 if p.mask_path is not None else None,
                    p.caption,
                )
                for p in row
            ],
        )
        for title, row in picks
    ]


def _cam_rows(results: dict, sets: list[ScoreSet], cells: int, size: int) -> tuple[list, list[str]]:
    """The CAM grid's rows of :class:`CamCell` (images read); notes on what was left out."""
    picks, notes = _cam_picks(results, sets, cells)
    return _cam_cells(picks, size), notes


def _cam_material(picks: list[tuple[str, list[_CamPick]]], size: int, stat_cache: StatCache | None) -> dict:
    """What the CAM grid is drawn from, for its cache key: the titles, captions and CAMs, and the
    bytes of each image and mask (their sha256, through the stat cache: not read when unchanged)."""
    paths = [p for _, row in picks for pick in row for p in (pick.image, pick.mask_path) if p is not None]
    digests = dict(zip(paths, sha256_files(paths, stat_cache), strict=True)) if paths else {}
    return {
        "size": size,
        "rows": [
            (
                title,
                [
                    (
                        digests[p.image],
                        digests[p.mask_path] if p.mask_path is not None else None,
                        p.cam,
                        p.caption,
                    )
                    for p in row
                ],
            )
            for title, row in picks
        ],
    }


def _figures(
    results: dict,
    sets: list[ScoreSet],
    folder: Path,
    cells: int,
    advance: Callable[[int], None],
    store: ArtifactStore | None = None,
    stat_cache: StatCache | None = None,
    reporter: Reporter | None = None,
) -> tuple[dict[str, dict], list[str]]:
    """figure key → {file, title, caption}; notes on what was left out. Each figure is copied from
    the cache (``store``) when one was drawn from the same data, else drawn."""
    from negalign_cli.compute.evaluation import ALIGN
    from negalign_cli.stages import plots
    from negalign_cli.stages.evaluation import histogram_figure, roc_figure
    from negalign_cli.stages.figures import cached_figure

    convention = results["metrics_convention"]
    figures: dict[str, dict] = {}
    notes: list[str] = []
    if "lambda_sweep" in next(iter(results["ood"].values())):
        sweeps = {name: _sweep(block) for name, block in results["ood"].items()}
        chosen = {name: block["methods"][NEGALIGN].get("lambda") for name, block in results["ood"].items()}
        for name, block in [*results.get("groups", {}).items(), ("mean", results["mean"])]:
            if len(results["ood"]) > 1 or name != "mean":
                sweeps[name], chosen[name] = _sweep(block), block["methods"][NEGALIGN].get("lambda")
        cached_figure(
            store,
            "lambda",
            {"sweeps": sweeps, "chosen": chosen, "convention": convention},
            lambda path: plots.plot_lambda_curve(path, sweeps, chosen, convention),
            folder / files.LAMBDA_PLOT,
            reporter,
        )
        advance(1)
        rule = results.get("lambda_selection", {}).get("rule", "")
        figures["lambda"] = {
            "file": files.LAMBDA_PLOT,
            "title": "NegAlign's λ curve",
            "caption": f"AUROC and FPR@95 ({convention} convention) of S_final = S* + λ·P_align for each "
            f"λ of the sweep; ★ marks the λ each set uses ({rule}).",
        }
    else:
        notes.append("no λ sweep in results.json (NegAlign was not evaluated): no λ curve")
    frames = {s.name: s.frame for s in sets if s.frame is not None}
    tables = {s.name: s.table if s.table is not None else s.frame for s in sets if s.frame is not None}
    if len(frames) == len(sets):
        id_frame = frames.pop("ID")
        id_table = tables.pop("ID")
        roc_figure(store, folder / files.ROC_PLOT, results, id_table, tables, reporter)
        advance(1)
        figures["roc"] = {
            "file": files.ROC_PLOT,
            "title": "ROC curves of every method",
            "caption": "ID is the positive class; the false positive rate is on a log scale (the low-FPR "
            "end, where good detectors differ, gets most of the width; an FPR of 0 is drawn at "
            "1/(2·n_OOD)); the dashed line is 95% of ID kept (where FPR@95 is read), the dotted one chance.",
        }
        columns = [
            e["column"] for m, e in next(iter(results["ood"].values()))["methods"].items() if m != NEGALIGN
        ]
        columns += [ALIGN] if all(ALIGN in f.columns for f in [id_frame, *frames.values()]) else []
        usable = [
            c
            for c in dict.fromkeys(columns)
            if all(pd.to_numeric(f[c], errors="coerce").notna().any() for f in [id_frame, *frames.values()])
        ]
        histogram_figure(store, folder / files.HISTOGRAM_PLOT, id_table, tables, usable, reporter)
        advance(1)
        figures["histograms"] = {
            "file": files.HISTOGRAM_PLOT,
            "title": "Score histograms",
            "caption": "Each score of ID against each OOD set (densities: each set's area is 1). A score "
            "that saturates (over half its values in 2 of 200 equal bins, e.g. NegLabel's near 0 and 1) "
            "is binned as log-odds ln(s/(1-s)) when it lies in [0, 1] (a score of exactly 1 in float64 "
            "at ln(2^53), about 36.7), else as its percentile rank within the panel; each axis says which.",
        }
    else:
        notes += [f"{s.name}: {s.problem}; ROC curves and histograms left out" for s in sets if s.problem]
    picks, cam_notes = _cam_picks(results, sets, cells)
    notes += cam_notes
    if picks:
        size = 128
        cached_figure(
            store,
            "cam-grid",
            _cam_material(picks, size, stat_cache) if store is not None else None,
            lambda path: plots.plot_cam_grid(path, _cam_cells(picks, size)),
            folder / files.CAM_GRID_PLOT,
            reporter,
        )
        advance(1)
        figures["cams"] = {
            "file": files.CAM_GRID_PLOT,
            "title": "CAM overlays of the most and least ID-like images",
            "caption": "Ranked by the score named in each caption; under each image: the class the model "
            "predicts and the cosine between the image and that class's text embedding. The image is "
            "shown in dimmed grey under the CAM, so the heat reads the same over any object colour.",
        }
    return figures, notes


def _sweep(block: dict) -> dict[float, dict]:
    return {float(v["lambda"]): v["metrics"] for v in block["lambda_sweep"].values()}


# --- provenance -------------------------------------------------------------------------------


def _versions(*manifests: dict) -> dict[str, str]:
    import jinja2

    from negalign_cli.stages.figures import matplotlib_version

    versions: dict[str, str] = {}
    for manifest in manifests:
        for name, version in manifest.get("versions", {}).items():
            versions.setdefault(name, version)
    report = {
        "negalign (report)": __version__,
        "python (report)": platform.python_version(),
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "matplotlib": matplotlib_version(),  # read without importing it (the figures may be cached)
        "jinja2": jinja2.__version__,
    }
    for name, version in report.items():
        versions.setdefault(name, version)
    return versions


def provenance(results: dict, evaluate_manifest: dict, sets: list[ScoreSet]) -> dict[str, Any]:
    """Model fingerprint, data sets (digests, sizes), every setting, library versions, conventions."""
    models = {s.manifest.get("inputs", {}).get("model") for s in sets} - {None}
    descriptions = {s.manifest.get("model") for s in sets} - {None}
    datasets = []
    for entry in sets:
        block = results["id"] if entry.name == "ID" else results["ood"][entry.name]
        cam_inputs = entry.cam_manifest.get("inputs", {})
        cam_counts = entry.cam_manifest.get("counts", {})
        datasets.append(
            {
                "name": entry.name,
                "score_file": str(entry.path or entry.recorded),
                "score_sha256": entry.digest or (sha256_files([entry.path])[0] if entry.path else ""),
                "rows": block["n"],
                "dropped": block.get("dropped_nonfinite", 0) + block.get("excluded_invalid_cam", 0),
                "cam_invalid": block.get("cam_invalid", 0),
                "images_digest": cam_inputs.get("images", ""),
                "images": cam_counts.get("images", cam_counts.get("embedded", "")),
                "cam_folder": str(entry.cam_folder or ""),
            }
        )
    config = {k: v for k, v in results.get("config", {}).items() if k != "score_files"}
    score_configs = results.get("config", {}).get("score_files", {}) or {}
    distinct = {json.dumps(c, sort_keys=True) for c in score_configs.values()}
    settings: list[tuple[str, str]] = [(f"evaluate: {k}", json.dumps(v)) for k, v in config.items()]
    if len(distinct) == 1:
        settings += [
            (f"score: {k}", json.dumps(v)) for k, v in (next(iter(score_configs.values())) or {}).items()
        ]
    else:
        settings += [
            (f"score ({name}): {k}", json.dumps(v))
            for name, c in score_configs.items()
            for k, v in (c or {}).items()
        ]
    for what in ("classes", "negatives"):  # the digests of the word lists every score file used
        digests = {s.manifest.get("inputs", {}).get(what) for s in sets} - {None}
        if digests:
            settings.append((f"score: {what} (sha256 of the list)", ", ".join(sorted(digests))))
    cam_params = {
        json.dumps(s.cam_manifest.get("params", {}), sort_keys=True) for s in sets if s.cam_manifest
    }
    if len(cam_params) == 1:
        settings += [(f"cam: {k}", json.dumps(v)) for k, v in json.loads(cam_params.pop()).items()]
    if "calibration" in results:
        settings.append(("M3 calibration", json.dumps(results["calibration"])))
    if "lambda_selection" in results:
        settings.append(("λ selection", results["lambda_selection"]["rule"]))
    return {
        "model_fingerprints": sorted(models),
        "model_descriptions": sorted(descriptions),
        "datasets": datasets,
        "settings": settings,
        "versions": _versions(
            evaluate_manifest, *(s.manifest for s in sets), *(s.cam_manifest for s in sets)
        ),
        "selection_convention": results["metrics_convention"],
        "definitions": results["metric_definitions"],
        "evaluate_key": evaluate_manifest.get("key", ""),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


# --- rendering --------------------------------------------------------------------------------


def _tex(text: Any) -> str:
    replacements = {
        "\\": r"\textbackslash{}",
        "&": r"\&",
        "%": r"\%",
        "$": r"\$",
        "#": r"\#",
        "_": r"\_",
        "{": r"\{",
        "}": r"\}",
        "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}",
        "λ": r"$\lambda$",
        "±": r"$\pm$",
        "★": r"$\star$",
        "·": r"$\cdot$",
        "≥": r"$\geq$",
        "→": r"$\to$",
        "↑": r"$\uparrow$",
        "↓": r"$\downarrow$",
        "—": "---",
    }
    return "".join(replacements.get(ch, ch) for ch in str(text))


def _md(text: Any) -> str:
    return str(text).replace("|", r"\|").replace("*", r"\*").replace("_", r"\_")


def _environment():
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("negalign_cli", "assets/report"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["tex"] = _tex
    environment.filters["md"] = _md
    return environment


def verified_results(results_dir: Path, stat_cache: StatCache | None = None) -> dict:
    """The manifest of an ``evaluate`` folder whose every output (results.json first) still has
    the size and sha256 its manifest records; an edited, truncated or unvouched folder is refused:
    the report renders only what ``evaluate`` wrote."""
    from negalign_cli.stages.evaluation import EVALUATE_STAGE

    redo = "rerun `negalign evaluate ... --out` to write it again"
    if not (results_dir / MANIFEST).is_file():
        raise NegalignError(
            f"{results_dir} has no {MANIFEST}, so its {files.RESULTS} cannot be checked: give the "
            f"folder `evaluate --out` wrote (it holds both), or {redo}"
        )
    manifest, problem = verify_folder(results_dir, None, stat_cache)
    if manifest is None:
        raise NegalignError(
            f"{results_dir} does not match its {MANIFEST} ({problem}): it was edited or truncated "
            f"after `evaluate` wrote it; {redo}"
        )
    if manifest["stage"] != EVALUATE_STAGE or files.RESULTS not in manifest["outputs"]:
        raise NegalignError(
            f"{results_dir / MANIFEST} is the manifest of a `{manifest['stage']}` run, not of `evaluate`'s "
            f"{files.RESULTS}; give an `evaluate --out` folder"
        )
    return manifest


def build_report(
    results_dir: Path,
    out: Path | None = None,
    *,
    cells: int = DEFAULT_REPORT_CELLS,
    reporter: Reporter | None = None,
    stat_cache: StatCache | None = None,
    store: ArtifactStore | None = None,
) -> ReportResult:
    """Write report.html, report.md, report.tex and figures/ for an ``evaluate`` folder
    (``stat_cache``: the cache's, so that unchanged score files are not read to be checked;
    ``store``: the cache's artifact store, where the figures are kept: a figure drawn before from
    the same data is copied, not drawn)."""
    reporter = reporter or NullReporter()
    results_dir = Path(results_dir).expanduser()
    if not (results_dir / files.RESULTS).is_file():
        raise NegalignError(f"{results_dir} holds no {files.RESULTS}: give an `evaluate --out` folder")
    manifest = verified_results(results_dir, stat_cache)
    results = _read_json(results_dir / files.RESULTS, "results")
    if "ood" not in results or "mean" not in results or "metric_definitions" not in results:
        raise NegalignError(f"{results_dir / files.RESULTS} is not an `evaluate` results.json")
    out = Path(out).expanduser() if out is not None else results_dir / files.REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".negalign-report-", dir=out))
    try:
        with reporter.progress("report: reading the score files", 1) as advance:
            sets = load_score_sets(results, manifest, results_dir, stat_cache)
            advance(1)
        figures_dir = staging / files.REPORT_FIGURES
        figures_dir.mkdir()
        with reporter.progress("report: drawing the figures", 4) as advance:
            figures, notes = _figures(results, sets, figures_dir, cells, advance, store, stat_cache, reporter)
        for figure in figures.values():
            data = (figures_dir / figure["file"]).read_bytes()
            figure["data_uri"] = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
            figure["path"] = f"{files.REPORT_FIGURES}/{figure['file']}"
            figure["width"], figure["height"] = png_size(figures_dir / figure["file"])
        context = {
            "title": f"negalign report: {', '.join(results['ood'])}",
            "results": results,
            "conventions": sorted(CONVENTIONS, key=lambda c: c != results["metrics_convention"]),
            "tables": {c: method_table(results, c) for c in CONVENTIONS},
            "paper": paper_context(results),
            "id_groups": id_group_context(results),
            "metrics": METRICS,
            "figures": figures,
            "notes": notes,
            "provenance": provenance(results, manifest, sets),
            "columns": results.get("columns", {}),
        }
        environment = _environment()
        names = (files.REPORT_HTML, files.REPORT_MARKDOWN, files.REPORT_LATEX)
        for template, name in zip(TEMPLATES, names, strict=True):
            (staging / name).write_text(
                environment.get_template(template).render(**context), encoding="utf-8"
            )
        written = []
        target_figures = out / files.REPORT_FIGURES
        target_figures.mkdir(exist_ok=True)
        for figure in figures.values():
            os.replace(figures_dir / figure["file"], target_figures / figure["file"])
            written.append(target_figures / figure["file"])
        for name in names:
            os.replace(staging / name, out / name)
            written.append(out / name)
        drawn = {figure["file"] for figure in figures.values()}
        for name in sorted(set(REPORT_FIGURES) - drawn):  # an earlier report's figure: not this one's
            (target_figures / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for note in notes:
        reporter.info(note)
    return ReportResult(out, written, notes)
