"""The paper-style table of an evaluation: methods as rows, OOD sets as columns (AUROC ↑ / FPR@95 ↓
in each cell), then the group means (near, far, ...) and the mean over all sets; the published
rows of a ``--benchmark`` preset beside the run's own. One function (``paper_table``) builds the
rows from results.json; the console, table.csv and the report only format them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from negalign_cli.lazy import lazy_module

if TYPE_CHECKING:
    import numpy as np
else:  # only a published row's mean needs it: `evaluate` renders a cache hit without numpy
    np = lazy_module("numpy")

MEAN_COLUMN = "mean"
RUN, PUBLISHED = "this run", "published"


@dataclass(frozen=True)
class Cell:
    auroc: float  # in %
    fpr95: float  # in %
    # the sample std (ddof = 1) over group seeds, in %, of a method that depends on the seed
    auroc_std: float | None = None
    fpr95_std: float | None = None

    def text(self) -> str:
        """ "AUROC / FPR@95", each "mean±std" where the cell is a mean over group seeds."""
        return f"{_value(self.auroc, self.auroc_std)} / {_value(self.fpr95, self.fpr95_std)}"


def _value(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f}±{std:.2f}"


def cell_text(cell: Cell | None) -> str:
    """A cell as every renderer shows it: "AUROC / FPR@95", or a dash where there is no figure."""
    return cell.text() if cell is not None else "—"


@dataclass(frozen=True)
class Row:
    method: str
    source: str  # RUN or PUBLISHED
    cells: dict[str, Cell | None]  # column name -> its cell (None: no figure)
    citation: str = ""  # published rows: where the figures come from
    note: str = ""


@dataclass(frozen=True)
class PaperTable:
    convention: str
    definition: str  # the FPR@95 the convention computes, in words
    sets: list[str]
    groups: dict[str, list[str]]  # group column -> its member sets
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    id_top1: float | None = None  # zero-shot top-1 on the ID set (0-1), where the labels allow
    seeds: bool = False  # the run's cells are mean ± std over group seeds (table.csv: std columns)

    @property
    def columns(self) -> list[str]:
        """Every column of the cells: the sets, the groups, then the mean (only with 2+ sets)."""
        return [*self.sets, *self.groups, MEAN_COLUMN] if len(self.sets) > 1 else list(self.sets)

    def citations(self) -> list[str]:
        """The distinct citations of the published rows, in the order of the rows (footnote n is
        ``citations()[n - 1]``)."""
        return list(dict.fromkeys(row.citation for row in self.rows if row.citation))

    def label(self, row: Row) -> str:
        if row.source != PUBLISHED:
            return row.method
        return f"{row.method} (published [{self.citations().index(row.citation) + 1}])"


def _cell(entry: dict, convention: str) -> Cell:
    """A method entry's cell: its metrics, with their std over group seeds where it has one."""
    chosen, std = entry["metrics"][convention], (entry.get("std") or {}).get(convention)
    if std is None:
        return Cell(100 * float(chosen["auroc"]), 100 * float(chosen["fpr95"]))
    return Cell(
        100 * float(chosen["auroc"]),
        100 * float(chosen["fpr95"]),
        100 * float(std["auroc"]),
        100 * float(std["fpr95"]),
    )


def _run_label(method: str, results: dict) -> str:
    from negalign_cli.stages.evaluation import method_label

    return method_label(method, results["mean"]["methods"][method])


def _mean(cells: list[Cell | None]) -> Cell | None:
    if not cells or any(c is None for c in cells):
        return None
    present = [c for c in cells if c is not None]
    return Cell(float(np.mean([c.auroc for c in present])), float(np.mean([c.fpr95 for c in present])))


def paper_table(results: dict) -> PaperTable:
    """The table of an ``evaluate`` results.json, in its metric convention."""
    convention = results["metrics_convention"]
    sets = list(results["ood"])
    groups = {name: list(block["sets"]) for name, block in results.get("groups", {}).items()}
    rows = []
    for method in results["mean"]["methods"]:
        cells: dict[str, Cell | None] = {
            name: _cell(results["ood"][name]["methods"][method], convention) for name in sets
        }
        for name, block in results.get("groups", {}).items():
            cells[name] = _cell(block["methods"][method], convention)
        cells[MEAN_COLUMN] = _cell(results["mean"]["methods"][method], convention)
        rows.append(Row(_run_label(method, results), RUN, cells))
    notes = []
    seeds = results.get("group_seeds")
    if seeds:
        notes.append(
            f"mean±std over the NegLabel group seeds {', '.join(map(str, seeds['seeds']))} "
            f"(`score --group-seeds`; std: the sample standard deviation, ddof = {seeds['ddof']}); "
            "a cell without ± is a method that does not depend on the grouping (one value)"
        )
    accuracy = results.get("id", {}).get("accuracy") or {}
    top1 = accuracy.get("top1")
    if top1 is not None:
        notes.append(
            f"ID accuracy (zero-shot top-1, {accuracy['n']} ID images, labels read as "
            f"{accuracy['labels']}): {100 * top1:.2f}%"
        )
    elif accuracy.get("note"):
        notes.append(f"ID accuracy not computed: {accuracy['note']}")
    benchmark = results.get("benchmark")
    if benchmark:
        published = benchmark.get("published", [])
        if published and convention != benchmark.get("published_convention"):
            notes.append(
                f"published rows of {benchmark['name']} left out: they use the "
                f"{benchmark.get('published_convention')} convention, this run {convention}"
            )
        elif published:
            for entry in published:
                cells = {
                    name: Cell(float(f["auroc"]), float(f["fpr95"])) if f else None
                    for name, f in ((s, entry["per_set"].get(s)) for s in sets)
                }
                for name, members in groups.items():
                    cells[name] = _mean([cells[s] for s in members])
                average = entry.get("average")
                covers_all = entry.get("covers_all_sets", False)
                cells[MEAN_COLUMN] = (
                    Cell(float(average["auroc"]), float(average["fpr95"]))
                    if average and covers_all
                    else _mean([cells[s] for s in sets])
                )
                rows.append(Row(entry["method"], PUBLISHED, cells, entry["citation"], entry.get("note", "")))
            notes.append(
                f"published rows: {benchmark['backbone']}, as printed in their sources "
                f"({benchmark['published_convention']} convention); their group means, and a mean "
                "the source does not print, are the mean of the published per-set figures"
            )
    definition = results["metric_definitions"][convention]["fpr95"]
    return PaperTable(convention, definition, sets, groups, rows, notes, top1, bool(seeds))


def csv_rows(table: PaperTable) -> list[dict[str, Any]]:
    """table.csv: one row per method, ``<column> AUROC`` and ``<column> FPR@95`` (in %) for each
    set, group and the mean, with the convention, the source and the citation. Over group seeds
    each is the mean, beside ``<column> AUROC std`` and ``<column> FPR@95 std`` (the sample std;
    empty for a method that does not depend on the seed, and for published rows)."""
    out = []
    for row in table.rows:
        record: dict[str, Any] = {"method": row.method, "source": row.source}
        for column in table.columns:
            cell = row.cells.get(column)
            pairs: tuple[tuple[str, float | None, float | None], ...] = (
                ("AUROC", cell.auroc if cell else None, cell.auroc_std if cell else None),
                ("FPR@95", cell.fpr95 if cell else None, cell.fpr95_std if cell else None),
            )
            for name, value, std in pairs:
                record[f"{column} {name}"] = round(value, 4) if value is not None else None
                if table.seeds:
                    record[f"{column} {name} std"] = round(std, 4) if std is not None else None
        record["ID top-1"] = (
            round(100 * table.id_top1, 4) if row.source == RUN and table.id_top1 is not None else None
        )
        record["convention"] = table.convention
        record["citation"] = row.citation
        out.append(record)
    return out


def heading(table: PaperTable) -> str:
    """What every rendering states above the table: the metrics and their convention."""
    return f"AUROC ↑ / FPR@95 ↓ in % ({table.convention} convention: FPR@95 is {table.definition})"


def column_title(table: PaperTable, column: str) -> str:
    if column in table.groups:
        return f"{column} (mean)"
    return column


def footnotes(table: PaperTable) -> list[str]:
    out = [f"[{i}] {citation}" for i, citation in enumerate(table.citations(), 1)]
    out += [f"{row.method} (published): {row.note}" for row in table.rows if row.note]
    return out + table.notes
