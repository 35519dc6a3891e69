"""Rich renderings of results that several commands print (evaluate, demo)."""

from __future__ import annotations

from rich.table import Table

from negalign_cli.cli.console import stdout


def render_results(results: dict) -> None:
    """The paper-style table (``paper_table``): methods as rows, sets, groups and the mean as
    columns, split into several tables when it would be wider than the terminal."""
    from negalign_cli.stages.paper_table import cell_text, column_title, footnotes, heading, paper_table

    paper = paper_table(results)
    console = stdout()
    labels = [paper.label(row) for row in paper.rows]
    first = max(len("method"), *(len(label) for label in labels)) + 3
    chunks: list[list[str]] = [[]]
    used = first + 1
    for column in paper.columns:
        texts = [cell_text(row.cells.get(column)) for row in paper.rows]  # mean±std over seeds is wider
        width = max(len("AUROC↑ / FPR↓"), *(len(part) for part in column_title(paper, column).split()))
        width = max(width, *(len(text) for text in texts)) + 3
        if chunks[-1] and used + width > console.width:
            chunks.append([])
            used = first + 1
        chunks[-1].append(column)
        used += width
    for number, columns in enumerate(chunks):
        title = heading(paper) if number == 0 else None
        table = Table(title=title, title_justify="left")
        table.add_column("method")
        for column in columns:
            table.add_column(f"{column_title(paper, column)}\nAUROC↑ / FPR↓", justify="right")
        for row, label in zip(paper.rows, labels, strict=True):
            cells = [cell_text(row.cells.get(c)) for c in columns]
            table.add_row(label, *cells)
        console.print(table)
    for note in footnotes(paper):
        console.print(note)
    if "lambda_selection" in results:
        stdout().print(f"λ chosen by: {results['lambda_selection']['rule']}")
    if "lambda_sweep" in results:
        convention = results["metrics_convention"]
        sweep = " ".join(
            f"{float(k):g}:{100 * v['metrics'][convention]['auroc']:.2f}"
            for k, v in results["lambda_sweep"].items()
        )
        stdout().print(f"λ sweep (mean AUROC %): {sweep}")

    render_id_groups(results)


def render_id_groups(results: dict) -> None:
    """Per ID subgroup (``evaluate --id-group``): the share each method rejects at the threshold
    that keeps 95% of all ID images."""
    for name, group in results.get("id_groups", {}).items():
        spread = group.get("rejected_std", {})  # over group seeds
        shares = ", ".join(
            f"{method} {100 * share:.1f}" + (f"±{100 * spread[method]:.1f}%" if method in spread else "%")
            for method, share in group["rejected"].items()
        )
        stdout().print(
            f"ID group {name} ({group['n']} images): share rejected at the threshold keeping "
            f"{100 * group['keep']:g}% of ID: {shares}"
        )


def render_bench(record: dict) -> Table:
    """The table of `negalign bench`: one row per flow, then the speed-up ratios."""
    env = record["environment"]
    table = Table(
        title=f"negalign bench — {env['model']}{' (QuickGELU)' if env.get('quick_gelu') else ''} "
        f"({env['image_size']} px, {env['precision']}) on "
        f"{env['device_name']} ({env['device']}, {env['cpu_threads']} CPU threads), "
        f"torch {env['versions']['torch']}",
        title_justify="left",
    )
    for name, justify in (("flow", "left"), ("images/s", "right"), ("peak MB", "right"), ("note", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in record["results"]:
        rate = row["images_per_s"]
        shown = f"{rate:,.1f}" if rate >= 10 else f"{rate:.3g}"
        note = row["note"]
        if row.get("distinct_pairs") is not None:
            pairs = row["distinct_pairs"]
            note += f"; {pairs:,} distinct pairs ({pairs / max(1, row['images']):.1f} per image)"
        table.add_row(row["flow"], shown, f"{row['peak_mb']:,.0f}", note)
    e2e = record.get("e2e")
    if e2e:
        table.add_section()
        files = e2e["files"]
        for phase in ("cold", "warm"):
            run = e2e[phase]
            stages = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in run["stages"].items())
            table.add_row(
                f"MOS-sized benchmark (e2e), {phase}",
                f"{e2e['total_images'] / run['seconds']:,.1f}",
                "",
                f"{run['seconds']:.2f} s files → method table ({stages}); {e2e['total_images']:,} JPEGs "
                f"(scale {e2e['scale']:g}, {files.get('mean_bytes', 0) / 1e3:.0f} KB each)",
            )
    table.add_section()
    for name, value in record["ratios"].items():
        table.add_row(name, f"{value:,.2f}×" if value >= 10 else f"{value:.3f}", "", "ratio in this run")
    return table
