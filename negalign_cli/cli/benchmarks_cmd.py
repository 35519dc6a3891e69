"""`negalign benchmarks [NAME] [--data-root DIR]`: the benchmark presets, their layout and sources,
and which of their sets a data root holds. Torch-free."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from negalign_cli.cli.console import guarded, stderr, stdout
from negalign_cli.presets import (
    PRESETS,
    Preset,
    check_counts,
    citation,
    count_images,
    expected_location,
    get_preset,
    locate,
    published_rows,
)

EXAMPLE = (
    "Example: negalign benchmarks; negalign benchmarks imagenet-mos; "
    "negalign benchmarks openood-imagenet --data-root ~/openood/data"
)


def _count(n: int | None) -> str:
    return "any" if n is None else f"{n:,}"


def _ood_cell(preset: Preset) -> str:
    lines = []
    for spec in preset.ood_sets:
        group = f" [{spec.group}]" if spec.group else ""
        optional = ", if present" if spec.optional else ""
        lines.append(f"{spec.name}{group} {_count(spec.count)}{optional}")
    return "\n".join(lines)


def _list_all() -> None:
    table = Table(title=f"{len(PRESETS)} benchmark presets", title_justify="left", show_lines=True)
    table.add_column("preset", style="bold", no_wrap=True)
    table.add_column("ID (images)")
    table.add_column(escape("OOD sets [group] images"))
    table.add_column("published rows")
    for preset in PRESETS:
        rows = published_rows(preset)
        table.add_row(
            preset.name,
            f"{preset.id_set.name} {_count(preset.id_set.count)}\nclasses: {preset.classes}",
            escape(_ood_cell(preset)),
            ", ".join(row.method for row in rows) if rows else "none",
        )
    stdout().print(table)
    stdout().print(
        "`negalign benchmarks NAME` shows a preset's layout and sources; add --data-root DIR to check it."
    )


def _show(preset: Preset, data_root: Path | None) -> list[str]:
    """Print one preset; with ``data_root``, which sets are present and their counts. Returns the
    count warnings."""
    console = stdout()
    console.print(f"[bold]{preset.name}[/]: {escape(preset.description)}")
    console.print(f"class names: --classes {preset.classes}")
    title = "sets, relative to --data-root" + (f" {data_root}" if data_root else "")
    table = Table(title=escape(title), title_justify="left", show_lines=True)
    table.add_column("set", style="bold", no_wrap=True)
    table.add_column("role")
    table.add_column("images", justify="right")
    table.add_column("expected layout", overflow="fold")
    if data_root is not None:
        table.add_column("found", justify="right")
    table.add_column("source", overflow="fold")
    counted: dict[str, int] = {}
    for index, spec in enumerate(preset.sets):
        role = "ID" if index == 0 else f"OOD {spec.group or ''}".strip()
        if spec.optional:
            role += " (optional)"
        cells = [spec.name, role, _count(spec.count), expected_location(spec)]
        if data_root is not None:
            resolved = locate(spec, data_root)
            if resolved.present:
                counted[spec.name] = count_images(resolved)
                cells.append(f"{counted[spec.name]:,}")
            else:
                cells.append("absent" if spec.optional else "[red]missing[/]")
        source = f"{spec.source.citation}. Get: {spec.source.get}"
        if spec.note:
            source += f" ({spec.note})"
        cells.append(source)
        table.add_row(*[cell if cell.startswith("[red]") else escape(cell) for cell in cells])
    console.print(table)
    for group in preset.id_groups:
        console.print(
            f"ID group [bold]{group.name}[/] ({_count(group.count)} images): {escape(group.description)}; "
            f"rows of metadata.csv with {group.rule}"
        )
    for note in preset.notes:
        console.print(f"note: {escape(note)}")
    rows = published_rows(preset)
    if rows:
        published = Table(
            title=f"published results, {rows[0].backbone} (AUROC ↑ / FPR@95 ↓, in %)",
            title_justify="left",
        )
        keys: list[str] = []  # the sources, numbered in order of first use
        published.add_column("set (AUROC / FPR@95)", style="bold", no_wrap=True)
        for row in rows:
            used = sorted({figure.source for figure in row.per_set.values()})
            keys += [key for key in used if key not in keys]
            marks = ",".join(str(keys.index(k) + 1) for k in used)
            published.add_column(escape(f"{row.method} [{marks}]"), justify="right", no_wrap=True)
        names = list(dict.fromkeys(n for row in rows for n in row.per_set))
        for name in names:
            published.add_row(
                name,
                *[
                    f"{row.per_set[name].auroc:.2f} / {row.per_set[name].fpr95:.2f}"
                    if name in row.per_set
                    else ""
                    for row in rows
                ],
            )
        published.add_row(
            "average",
            *[f"{row.average.auroc:.2f} / {row.average.fpr95:.2f}" if row.average else "n/p" for row in rows],
        )
        console.print(published)
        for number, key in enumerate(keys, start=1):
            console.print(escape(f"[{number}] {citation(key)}"))
        for row in rows:
            if row.note:
                console.print(escape(f"{row.method}: {row.note}"))
        console.print("n/p: the source prints no average. FPR@95 in the `neglabel` convention.")
    else:
        console.print("published rows: none recorded for this setting")
    if data_root is None:
        return []
    warnings = check_counts(preset, counted)
    missing = [s.name for s in preset.sets if s.name not in counted and not s.optional]
    if missing:
        console.print(f"[red]missing[/]: {escape(', '.join(missing))} (see the expected layout above)")
    elif not warnings:
        console.print(f"every set of {preset.name} is present with the expected image count")
    return warnings


@guarded
def benchmarks(
    name: Annotated[
        str | None,
        typer.Argument(
            help="A preset to show: its sets, layout, sources and published rows.", show_default=False
        ),
    ] = None,
    data_root: Annotated[
        Path | None,
        typer.Option(
            "--data-root",
            help="Check which of the sets this folder holds, and count their images (no image is opened).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """List the benchmark presets (ID set, OOD sets with their near/far groups and image counts), or
    show one preset's expected layout under --data-root, where each set comes from and the published
    results for its setting. Nothing downloads."""
    if data_root is not None and not data_root.expanduser().is_dir():
        from negalign_cli.errors import NegalignError

        raise NegalignError(f"--data-root {data_root} is not a folder")
    root = data_root.expanduser() if data_root is not None else None
    if name is None and root is None:
        _list_all()
        return
    presets = [get_preset(name)] if name is not None else list(PRESETS)
    warnings: list[str] = []
    for index, preset in enumerate(presets):
        if index:
            stdout().print()
        warnings += _show(preset, root)
    for warning in warnings:
        stderr().print(f"[yellow]warning:[/] {escape(warning)}")
